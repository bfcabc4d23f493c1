-- ack: complete messages whose handler succeeded; their bodies are deleted.
-- KEYS[1] active  ZSET
-- KEYS[2] lease   HASH
-- KEYS[3] msg     HASH
-- KEYS[4] stats   HASH
-- ARGV    pairs: token, id (tokens may differ: one call completes many deliveries)
-- Returns one integer per pair: 1 acknowledged, 0 lease lost (another delivery owns the
-- message now, or it was already completed, recovered or purged).

local ids = {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
end
local owners = redis.call('HMGET', KEYS[2], unpack(ids))
local results, done = {}, {}
for i, id in ipairs(ids) do
  if owners[i] == ARGV[2 * i - 1] then
    results[i] = 1
    done[#done + 1] = id
  else
    results[i] = 0
  end
end

if #done > 0 then
  redis.call('ZREM', KEYS[1], unpack(done))
  redis.call('HDEL', KEYS[2], unpack(done))
  redis.call('HDEL', KEYS[3], unpack(done))
  redis.call('HINCRBY', KEYS[4], 'processed', #done)
end
return results
