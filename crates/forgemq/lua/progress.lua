-- progress: a running handler reports how far it got (Message::progress), kept until the
-- message reaches a final state. Token-fenced: a worker whose lease was lost (the message
-- runs elsewhere now) cannot write.
-- KEYS[1] lease     HASH  id -> lease token
-- KEYS[2] progress  HASH  id -> progress (JSON)
-- ARGV[1] id, ARGV[2] lease token, ARGV[3] progress
-- Returns 1 written, 0 lease lost (nothing written).

if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
