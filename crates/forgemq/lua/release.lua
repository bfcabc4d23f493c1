-- release: hand unfinished deliveries back at once (graceful shutdown), without counting
-- an attempt: the handler did not fail, the worker stopped.
-- KEYS[1] active   ZSET
-- KEYS[2] lease    HASH
-- KEYS[3] pending  LIST
-- KEYS[4] wake     LIST
-- KEYS[5] stats    HASH
-- KEYS[6] ready    ZSET  id -> when it became ready to run (ms)
-- ARGV    pairs: token, id
-- Returns one integer per pair: 1 released, 0 lease lost.

local ids = {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
end
local owners = redis.call('HMGET', KEYS[2], unpack(ids))
local results, back = {}, {}
for i, id in ipairs(ids) do
  if owners[i] == ARGV[2 * i - 1] then
    results[i] = 1
    back[#back + 1] = id
  else
    results[i] = 0
  end
end

if #back > 0 then
  redis.call('ZREM', KEYS[1], unpack(back))
  redis.call('HDEL', KEYS[2], unpack(back))
  local now_text = string.format('%d', now_ms())
  -- To the head (of their group's list, for a grouped message): these were taken first,
  -- so they run first.
  local base = key_base(KEYS[3])
  local groups = groups_of(base, back)
  groups_leave(base, groups, back)
  local plain = route_groups(base, KEYS[3], KEYS[5], back, groups, true, now_text)
  if #plain > 0 then
    local since = {}
    for _, id in ipairs(plain) do
      since[#since + 1] = now_text
      since[#since + 1] = id
    end
    redis.call('ZADD', KEYS[6], unpack(since))
    note_plain(base, redis.call('LPUSH', KEYS[3], unpack(plain)), #plain)
  end
  redis.call('HINCRBY', KEYS[5], 'released', #back)
  wake(KEYS[4])
end
return results
