-- layout: read or change the partition count of a topic, one slot at a time (the plain
-- topic's slot, then each partition's). Changing it is refused while any message is
-- stored, so that no message is left in keys that no worker reads any more.
-- KEYS[1] meta       HASH  partitions (absent = 1); frozen (until when, ms) and its owner
-- KEYS[2] pending    LIST
-- KEYS[3] stats      HASH  (its `tombstones` counter: listed entries of cancelled messages)
-- KEYS[4] active     ZSET
-- KEYS[5] delayed    ZSET
-- KEYS[6] dead       ZSET
-- ARGV[1] op: 'freeze' (publishing here is refused with TRYAGAIN until 'set' or 'thaw', or
--         for at most ARGV[4] ms should the changer die; refused while another owner's
--         freeze holds; returns the number of messages stored here), 'set' (partitions =
--         ARGV[2], no longer frozen), 'thaw' (no longer frozen)
-- ARGV[3] owner: a random token of the change; 'set' and 'thaw' act on a freeze of this
--         owner or on none.
-- Returns the number of messages stored here (freeze), else 0.

local op, owner = ARGV[1], ARGV[3]
local now = now_ms()
local held = redis.call('HMGET', KEYS[1], 'frozen', 'owner')
local frozen_by_other = held[1] and tonumber(held[1]) > now and held[2] ~= owner
if op == 'freeze' then
  if frozen_by_other then
    return redis.error_reply('BUSY another change of this topic\'s partitions is under way; try again in a few seconds')
  end
  redis.call('HSET', KEYS[1], 'frozen', string.format('%d', now + tonumber(ARGV[4])), 'owner', owner)
  local tombstones = tonumber(redis.call('HGET', KEYS[3], 'tombstones') or '0')
  local grouped = tonumber(redis.call('HGET', KEYS[3], 'grouped') or '0')
  local pending = redis.call('LLEN', KEYS[2]) + grouped - tombstones
  return pending + redis.call('ZCARD', KEYS[4]) + redis.call('ZCARD', KEYS[5])
    + redis.call('ZCARD', KEYS[6])
end
if frozen_by_other then
  return redis.error_reply('BUSY another change of this topic\'s partitions is under way; try again in a few seconds')
end
if op == 'set' then
  redis.call('HSET', KEYS[1], 'partitions', ARGV[2])
  redis.call('HDEL', KEYS[1], 'frozen', 'owner')
  return 0
elseif op == 'thaw' then
  redis.call('HDEL', KEYS[1], 'frozen', 'owner')
  return 0
end
return redis.error_reply('ERR layout: unknown op ' .. tostring(op))
