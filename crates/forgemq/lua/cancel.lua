-- cancel: remove a message that has not started (delayed or pending), e.g. the payment
-- check of an order that was paid.
-- KEYS[1] delayed  ZSET
-- KEYS[2] pending  LIST
-- KEYS[3] active   ZSET
-- KEYS[4] dead     ZSET
-- KEYS[5] msg      HASH
-- KEYS[6] stats    HASH
-- ARGV[1] id
-- Returns the state it was in: 'delayed' or 'pending' (removed), 'active' or 'dead' (not
-- removed: a running message can't be cancelled, a dead one is deleted through the
-- dead-letter queue), or 'missing'.

local id = ARGV[1]
local state = 'missing'
if redis.call('ZSCORE', KEYS[1], id) then
  state = 'delayed'
elseif redis.call('ZSCORE', KEYS[3], id) then
  return 'active'
elseif redis.call('ZSCORE', KEYS[4], id) then
  return 'dead'
elseif redis.call('HEXISTS', KEYS[5], id) == 1 then
  state = 'pending'
else
  return 'missing'
end

if state == 'delayed' then
  redis.call('ZREM', KEYS[1], id)
elseif redis.call('LREM', KEYS[2], 1, id) == 0 then
  -- A body in no state: not ours to delete here (the invariant checker reports it).
  return 'missing'
end
redis.call('HDEL', KEYS[5], id)
redis.call('HINCRBY', KEYS[6], 'cancelled', 1)
return state
