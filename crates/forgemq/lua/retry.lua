-- retry: a failed delivery goes back to wait for its next attempt.
-- KEYS[1] active   ZSET
-- KEYS[2] lease    HASH
-- KEYS[3] msg      HASH
-- KEYS[4] delayed  ZSET
-- KEYS[5] pending  LIST
-- KEYS[6] wake     LIST
-- KEYS[7] stats    HASH
-- ARGV[1] id
-- ARGV[2] token     lease token of the failed delivery
-- ARGV[3] envelope  rewritten by the worker: retry + 1, last error, history
-- ARGV[4] delay_ms  backoff before the next attempt (0 = at once)
-- Returns 1, or 0 when the lease was lost (nothing is written).

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  return 0
end

local delay = tonumber(ARGV[4])
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HSET', KEYS[3], id, ARGV[3])
if delay > 0 then
  redis.call('ZADD', KEYS[4], now_ms() + delay, id)
else
  redis.call('RPUSH', KEYS[5], id)
end
redis.call('HINCRBY', KEYS[7], 'failed', 1)
redis.call('HINCRBY', KEYS[7], 'retried', 1)
wake(KEYS[6])
return 1
