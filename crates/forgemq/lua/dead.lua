-- dead: a delivery that failed for good goes to the dead-letter set.
-- KEYS[1] active  ZSET
-- KEYS[2] lease   HASH
-- KEYS[3] msg     HASH
-- KEYS[4] dead    ZSET  id -> time it died (ms, Redis clock)
-- KEYS[5] stats   HASH
-- ARGV[1] id
-- ARGV[2] token     lease token of the delivery
-- ARGV[3] envelope  rewritten by the worker: last error, history
-- Returns 1, or 0 when the lease was lost (nothing is written).

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  return 0
end

redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HSET', KEYS[3], id, ARGV[3])
redis.call('ZADD', KEYS[4], now_ms(), id)
redis.call('HINCRBY', KEYS[5], 'failed', 1)
redis.call('HINCRBY', KEYS[5], 'dead', 1)
return 1
