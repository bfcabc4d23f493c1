-- cancel: remove a message that has not started (delayed or pending), e.g. the payment
-- check of an order that was paid. O(1) for a pending message: its entry stays in the
-- pending list as a tombstone that the fetch script skips (searching a list of a million
-- entries with LREM would block Redis for tens of milliseconds).
-- KEYS[1] delayed    ZSET
-- KEYS[2] pending    LIST
-- KEYS[3] active     ZSET
-- KEYS[4] dead       ZSET
-- KEYS[5] msg        HASH
-- KEYS[6] stats      HASH
-- KEYS[7] cancelled  HASH  id -> tombstones: entries of cancelled messages still listed
-- KEYS[8] uniq       HASH  id -> unique key held until the message's final state
-- KEYS[9] ready      ZSET  id -> when it became ready (ms), for entries pushed at the head
-- KEYS[10] results  KEYS[11] finished  KEYS[12] progress  KEYS[13] waiters (see settle.lua)
-- ARGV[1] id
-- ARGV[2] results_max_len, ARGV[3] results_max_age: retention of finished records
-- Returns the state it was in: 'delayed' or 'pending' (removed), 'active' or 'dead' (not
-- removed: a running message can't be cancelled, a dead one is deleted through the
-- dead-letter queue), or 'missing'.

local id = ARGV[1]
local state
if redis.call('ZSCORE', KEYS[1], id) then
  state = 'delayed'
elseif redis.call('ZSCORE', KEYS[3], id) then
  return 'active'
elseif redis.call('ZSCORE', KEYS[4], id) then
  return 'dead'
elseif redis.call('HEXISTS', KEYS[5], id) == 1 then
  -- A body in no other state is pending (the invariant checker vouches for that).
  state = 'pending'
else
  return 'missing'
end

local base = key_base(KEYS[2])
local groups = groups_of(base, {id})
if state == 'delayed' then
  redis.call('ZREM', KEYS[1], id)
else
  -- One tombstone per listed entry: an id cancelled, published again and cancelled again
  -- has two entries to skip. A grouped entry's tombstone names its group's list.
  local field = id
  if groups[id] then
    field = groups[id] .. ' ' .. id
  end
  redis.call('HINCRBY', KEYS[7], field, 1)
  redis.call('HINCRBY', KEYS[6], 'tombstones', 1)
  -- Its entry stays listed, so it stays counted in the queue latency (in `ready` or in the
  -- runs) until a fetch passes it: the fetch counts entries, tombstones included.
end
if groups[id] then
  -- A grouped entry is in `gready` while listed; its tombstone is not (a later publish of
  -- the same id puts its own entry there).
  if state == 'pending' then
    redis.call('ZREM', base .. 'gready', id)
  end
  groups_forget(base, groups, {id})
end
local now = now_ms()
local retry = get_count(redis.call('HGET', KEYS[5], id) or '', 'retry')
redis.call('HDEL', KEYS[5], id)
redis.call('HINCRBY', KEYS[6], 'cancelled', 1)
release_unique(KEYS[8], {id})
local progress = take_progress(KEYS[12], {id})
local max_age = tonumber(ARGV[3])
local record = finished_record('cancelled', record_stamp(now, max_age), retry, nil, progress[id])
keep_records(KEYS[10], KEYS[11], {id}, {record}, tonumber(ARGV[2]), max_age)
notify_finished(KEYS[13], {id})
return state
