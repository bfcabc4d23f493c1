-- fetch: promote due delayed messages, then lease up to N pending messages.
-- KEYS[1] pending  LIST
-- KEYS[2] active   ZSET  id -> lease deadline (ms, Redis clock)
-- KEYS[3] lease    HASH  id -> lease token
-- KEYS[4] delayed  ZSET  id -> due time
-- KEYS[5] msg      HASH  id -> envelope
-- KEYS[6] wake     LIST
-- KEYS[7] stats    HASH
-- ARGV[1] n             most messages to lease
-- ARGV[2] lease_ms      lease length
-- ARGV[3] token         random lease token of this delivery
-- ARGV[4] promote_limit most due delayed messages to promote in this call
-- Returns {now_ms, next_due_ms or -1, {id1, envelope1, id2, envelope2, ...}}.
-- next_due_ms is only computed when nothing was leased (the caller is about to wait).

local n = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local now = now_ms()

-- Due delayed messages join the tail of pending: a retry waits behind what was already ready.
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
if #due > 0 then
  redis.call('ZREM', KEYS[4], unpack(due))
  redis.call('RPUSH', KEYS[1], unpack(due))
end

local ids = redis.call('LPOP', KEYS[1], n)
local out = {}
if ids then
  local bodies = redis.call('HMGET', KEYS[5], unpack(ids))
  local deadline = now + lease_ms
  local zargs, hargs = {}, {}
  local orphans = 0
  for i, id in ipairs(ids) do
    local body = bodies[i]
    if body then
      zargs[#zargs + 1] = deadline
      zargs[#zargs + 1] = id
      hargs[#hargs + 1] = id
      hargs[#hargs + 1] = ARGV[3]
      out[#out + 1] = id
      out[#out + 1] = body
    else
      -- An id without a body has nothing to run (its body was purged); drop it.
      orphans = orphans + 1
    end
  end
  if #zargs > 0 then
    redis.call('ZADD', KEYS[2], unpack(zargs))
    redis.call('HSET', KEYS[3], unpack(hargs))
  end
  if orphans > 0 then
    redis.call('HINCRBY', KEYS[7], 'orphans', orphans)
  end
  -- More work is waiting: pass the wake-up on to another blocked worker.
  if redis.call('LLEN', KEYS[1]) > 0 then
    wake(KEYS[6])
  end
end

local next_due = -1
if #out == 0 then
  local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  if first[2] then
    next_due = tonumber(first[2])
  end
end
return {now, next_due, out}
