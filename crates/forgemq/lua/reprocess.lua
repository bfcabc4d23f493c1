-- reprocess: move one dead letter back to pending with a fresh set of retries.
-- KEYS[1] dead     ZSET
-- KEYS[2] msg      HASH
-- KEYS[3] pending  LIST
-- KEYS[4] wake     LIST
-- KEYS[5] stats    HASH
-- ARGV[1] id
-- Returns 1, or 0 when no dead letter has that id.

local id = ARGV[1]
local body = redis.call('HGET', KEYS[2], id)
if not redis.call('ZSCORE', KEYS[1], id) or not body then
  return 0
end

body = set_field(set_field(body, 'retry', 0), 'recoveries', 0)
redis.call('ZREM', KEYS[1], id)
redis.call('HSET', KEYS[2], id, body)
redis.call('RPUSH', KEYS[3], id)
redis.call('HINCRBY', KEYS[5], 'reprocessed', 1)
wake(KEYS[4])
return 1
