-- layout: read or change the partition count of a topic, one slot at a time (the plain
-- topic's slot, then each partition's). Changing it is refused while any message is
-- stored, so that no message is left in keys that no worker reads any more.
-- KEYS[1] meta       HASH  partitions (absent = 1), frozen
-- KEYS[2] pending    LIST
-- KEYS[3] cancelled  SET
-- KEYS[4] active     ZSET
-- KEYS[5] delayed    ZSET
-- KEYS[6] dead       ZSET
-- ARGV[1] op: 'freeze' (publishing here is refused with TRYAGAIN until 'set' or 'thaw';
--         returns the number of messages stored here), 'set' (partitions = ARGV[2], no
--         longer frozen), 'thaw' (no longer frozen)
-- Returns the number of messages stored here (freeze), else 0.

local op = ARGV[1]
if op == 'freeze' then
  redis.call('HSET', KEYS[1], 'frozen', '1')
  local pending = redis.call('LLEN', KEYS[2]) - redis.call('SCARD', KEYS[3])
  return pending + redis.call('ZCARD', KEYS[4]) + redis.call('ZCARD', KEYS[5])
    + redis.call('ZCARD', KEYS[6])
elseif op == 'set' then
  redis.call('HSET', KEYS[1], 'partitions', ARGV[2])
  redis.call('HDEL', KEYS[1], 'frozen')
  return 0
elseif op == 'thaw' then
  redis.call('HDEL', KEYS[1], 'frozen')
  return 0
end
return redis.error_reply('ERR layout: unknown op ' .. tostring(op))
