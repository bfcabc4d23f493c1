-- purge: delete every message of a topic in every state. Counters stay (they are history)
-- and the topic stays registered; workers go on with whatever is published next, and
-- their acks for purged deliveries are refused as lease lost.
-- KEYS[1] msg  KEYS[2] pending  KEYS[3] active  KEYS[4] lease  KEYS[5] delayed
-- KEYS[6] dead  KEYS[7] wake  KEYS[8] stats  KEYS[9] processed
-- Returns the number of messages deleted.

local n = redis.call('HLEN', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[9])
redis.call('HINCRBY', KEYS[8], 'purged', n)
return n
