-- purge: delete every message of a topic in every state, with the unique keys its messages
-- hold. Counters stay (they are history) and the topic stays registered; workers go on
-- with whatever is published next, and their acks for purged deliveries are refused as
-- lease lost. UNLINK frees the memory in the background, so a big topic does not block Redis.
-- KEYS[1] msg  KEYS[2] pending  KEYS[3] active  KEYS[4] lease  KEYS[5] delayed
-- KEYS[6] dead  KEYS[7] wake  KEYS[8] stats  KEYS[9] processed  KEYS[10] uniq
-- KEYS[11] cancelled  KEYS[12] purged_tokens (SET, kept an hour: the lease tokens of the
-- deliveries running now, whose refused outcomes are then not counted as duplicate runs)
-- KEYS[13] ready  KEYS[14] runs  KEYS[15] results  KEYS[16] finished  KEYS[17] progress
-- KEYS[18] waiters: callers waiting for a purged message are woken (it is gone)
-- Returns the number of messages deleted per state: {pending, active, delayed, dead}.

local tombstones = tonumber(redis.call('HGET', KEYS[8], 'tombstones') or '0')
local grouped = tonumber(redis.call('HGET', KEYS[8], 'grouped') or '0')
local pending = math.max(0, redis.call('LLEN', KEYS[2]) + grouped - tombstones)
-- The groups' lists, their ring, index and counts (their settings stay, like a limit).
local base = key_base(KEYS[2])
local gkeys = {base .. 'gring', base .. 'group', base .. 'gactive', base .. 'gcredit', base .. 'gready'}
for _, g in ipairs(redis.call('LRANGE', base .. 'gring', 0, -1)) do
  if g ~= '' then
    gkeys[#gkeys + 1] = base .. 'g:' .. g
  end
end
for i = 1, #gkeys, 1000 do
  redis.call('UNLINK', unpack(gkeys, i, math.min(i + 999, #gkeys)))
end
local active = redis.call('ZCARD', KEYS[3])
local delayed = redis.call('ZCARD', KEYS[5])
local dead = redis.call('ZCARD', KEYS[6])
local tokens = redis.call('HVALS', KEYS[4])
for i = 1, #tokens, 1000 do
  redis.call('SADD', KEYS[12], unpack(tokens, i, math.min(i + 999, #tokens)))
end
if #tokens > 0 then
  redis.call('PEXPIRE', KEYS[12], 3600000)
end
local held = redis.call('HVALS', KEYS[10])
for i = 1, #held, 1000 do
  redis.call('UNLINK', unpack(held, i, math.min(i + 999, #held)))
end
local waiting = {}
local pairs_ = redis.call('HGETALL', KEYS[18])
for i = 1, #pairs_, 2 do
  waiting[#waiting + 1] = pairs_[i]
end
for i = 1, #waiting, 1000 do
  notify_finished(KEYS[18], {unpack(waiting, i, math.min(i + 999, #waiting))})
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[9],
  KEYS[10], KEYS[11], KEYS[13], KEYS[14], KEYS[15], KEYS[16], KEYS[17])
redis.call('HDEL', KEYS[8], 'tombstones', 'grouped')
redis.call('HINCRBY', KEYS[8], 'purged', pending + active + delayed + dead)
return {pending, active, delayed, dead}
