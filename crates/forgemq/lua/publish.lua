-- publish: store new messages and make them pending (or delayed).
-- KEYS[1] msg      HASH  id -> envelope
-- KEYS[2] pending  LIST  ids ready to run
-- KEYS[3] delayed  ZSET  id -> due time (ms, Redis clock)
-- KEYS[4] wake     LIST  wake-up token for blocked workers
-- KEYS[5] stats    HASH  counters
-- ARGV    triples: id, delay_ms (0 = now), envelope
-- Returns one integer per message: 1 written, 0 an envelope with that id already exists
-- (a retried publish, or a caller-chosen id used twice; nothing is written for it).

local results = {}
local seen = {}
-- Preconditions first: which ids are new (also within this call).
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if seen[id] or redis.call('HEXISTS', KEYS[1], id) == 1 then
    results[#results + 1] = 0
  else
    seen[id] = true
    results[#results + 1] = 1
  end
end

local now = now_ms()
local written, ready = 0, 0
for i = 1, #ARGV, 3 do
  if results[(i + 2) / 3] == 1 then
    local id, delay = ARGV[i], tonumber(ARGV[i + 1])
    redis.call('HSET', KEYS[1], id, ARGV[i + 2])
    if delay > 0 then
      redis.call('ZADD', KEYS[3], now + delay, id)
    else
      redis.call('RPUSH', KEYS[2], id)
      ready = ready + 1
    end
    written = written + 1
  end
end

if written > 0 then
  redis.call('HINCRBY', KEYS[5], 'published', written)
  -- A delayed message may be due before the time a blocked worker is waiting for, so it
  -- wakes a worker too; the worker recomputes its wait from the delayed set.
  wake(KEYS[4])
end
return results
