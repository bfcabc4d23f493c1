-- recover: deliveries whose lease expired (worker killed, frozen or cut off) go back to
-- pending, counting a recovery; past max_recoveries the message is poison (it keeps killing
-- its worker) and is dead-lettered instead.
-- KEYS[1] active   ZSET
-- KEYS[2] lease    HASH
-- KEYS[3] msg      HASH
-- KEYS[4] pending  LIST
-- KEYS[5] dead     ZSET
-- KEYS[6] wake     LIST
-- KEYS[7] stats    HASH
-- KEYS[8] uniq     HASH  id -> unique key held until the message's final state
-- KEYS[9] ready    ZSET  id -> when it became ready to run (ms)
-- KEYS[10] progress  KEYS[11] waiters (see settle.lua)
-- ARGV[1] max_recoveries
-- ARGV[2] limit    most expired leases handled per call
-- ARGV[3] dead_max_len, ARGV[4] dead_max_age: dead-letter retention (see settle.lua)
-- Returns {recovered, dead_lettered}.

local now = now_ms()
-- Strictly before now: a lease deadline equal to now is still live.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[2]))
if #expired == 0 then
  return {0, 0}
end

local max = tonumber(ARGV[1])
local base = key_base(KEYS[4])
local groups = groups_of(base, expired)
-- A group at its max_active has room again: a worker may be waiting for it.
if groups_leave(base, groups, expired) and redis.call('EXISTS', base .. 'gconf') == 1 then
  wake(KEYS[6])
end
local back = {}
local bodies = redis.call('HMGET', KEYS[3], unpack(expired))
local recovered, dead, orphans = 0, 0, 0
local died = {}
redis.call('ZREM', KEYS[1], unpack(expired))
redis.call('HDEL', KEYS[2], unpack(expired))
local now_text = string.format('%d', now)
for i, id in ipairs(expired) do
  local body = bodies[i]
  if body then
    local count = get_count(body, 'recoveries') + 1
    body = set_field(body, 'recoveries', count)
    if count > max then
      body = set_field(body, 'last_error',
        'lease expired ' .. count .. ' times: the worker crashed, hung or lost Redis while handling it (poison message)')
      redis.call('ZADD', KEYS[5], now, id)
      dead = dead + 1
      died[#died + 1] = id
    else
      back[#back + 1] = id
      recovered = recovered + 1
    end
    redis.call('HSET', KEYS[3], id, body)
  else
    -- Leased without a body (deleted behind ForgeMQ's back): nothing to run again.
    orphans = orphans + 1
    died[#died + 1] = id
  end
end
if orphans > 0 then
  redis.call('HINCRBY', KEYS[7], 'orphans', orphans)
  if dead == 0 then
    release_unique(KEYS[8], died)
  end
end

if recovered > 0 then
  -- To the head (of their group's list, for a grouped message), in the order they expired.
  local plain = route_groups(base, KEYS[4], KEYS[7], back, groups, true, now_text)
  if #plain > 0 then
    local since = {}
    for _, id in ipairs(plain) do
      since[#since + 1] = now_text
      since[#since + 1] = id
    end
    redis.call('ZADD', KEYS[9], unpack(since))
    note_plain(base, redis.call('LPUSH', KEYS[4], unpack(plain)), #plain)
  end
  redis.call('HINCRBY', KEYS[7], 'recovered', recovered)
  wake(KEYS[6])
end
if #died > 0 then
  groups_forget(base, groups, died)
  take_progress(KEYS[10], died)
  notify_finished(KEYS[11], died)
end
if dead > 0 then
  redis.call('HINCRBY', KEYS[7], 'dead', dead)
  release_unique(KEYS[8], died)
  trim_dead(KEYS[5], KEYS[3], KEYS[7], now, tonumber(ARGV[3]), tonumber(ARGV[4]))
end
return {recovered, dead}
