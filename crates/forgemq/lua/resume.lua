-- resume: unpause a topic and wake a worker, which passes the wake-up on while work remains.
-- KEYS[1] paused  STRING
-- KEYS[2] wake    LIST
-- Returns 1 if the topic was paused, else 0.

local was = redis.call('DEL', KEYS[1])
wake(KEYS[2])
return was
