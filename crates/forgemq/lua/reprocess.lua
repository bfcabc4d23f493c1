-- reprocess: move dead letters back to pending, each with a fresh set of retries.
-- KEYS[1] dead     ZSET
-- KEYS[2] msg      HASH
-- KEYS[3] pending  LIST
-- KEYS[4] wake     LIST
-- KEYS[5] stats    HASH
-- KEYS[6] runs     LIST  "<count> <ms>": runs of tail entries by when they became ready
-- ARGV    ids (at most 1,000)
-- Returns one integer per id: 1 requeued, 0 no dead letter has that id.

local results, bodies = {}, {}
-- Preconditions first: which ids are dead letters with a body (an id given twice counts once).
for i, id in ipairs(ARGV) do
  local body = redis.call('HGET', KEYS[2], id)
  if body and not bodies[id] and redis.call('ZSCORE', KEYS[1], id) then
    bodies[id] = body
    results[i] = 1
  else
    results[i] = 0
  end
end

local n = 0
for i, id in ipairs(ARGV) do
  if results[i] == 1 then
    local body = set_field(set_field(bodies[id], 'retry', 0), 'recoveries', 0)
    redis.call('ZREM', KEYS[1], id)
    redis.call('HSET', KEYS[2], id, body)
    redis.call('RPUSH', KEYS[3], id)
    n = n + 1
  end
end
if n > 0 then
  runs_push(KEYS[6], n, now_ms())
  redis.call('HINCRBY', KEYS[5], 'reprocessed', n)
  wake(KEYS[4])
end
return results
