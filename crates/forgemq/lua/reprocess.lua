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
local now = now_ms()
local base = key_base(KEYS[3])
local plain, groups, indexed = {}, {}, {}
for i, id in ipairs(ARGV) do
  if results[i] == 1 then
    local body = set_field(set_field(bodies[id], 'retry', 0), 'recoveries', 0)
    redis.call('ZREM', KEYS[1], id)
    redis.call('HSET', KEYS[2], id, body)
    -- A grouped message goes back to its group (dead letters leave the group index).
    local ok, t = pcall(cjson.decode, body)
    if ok and type(t) == 'table' and type(t.group) == 'string' and t.group ~= '' then
      groups[id] = t.group
      indexed[#indexed + 1] = id
      indexed[#indexed + 1] = t.group
    else
      plain[#plain + 1] = id
    end
    n = n + 1
  end
end
if #indexed > 0 then
  redis.call('HSET', base .. 'group', unpack(indexed))
  local grouped = {}
  for i = 1, #indexed, 2 do
    grouped[#grouped + 1] = indexed[i]
  end
  route_groups(base, KEYS[3], KEYS[5], grouped, groups, false, now)
end
if #plain > 0 then
  note_plain(base, redis.call('RPUSH', KEYS[3], unpack(plain)), #plain)
  runs_push(KEYS[6], #plain, now)
end
if n > 0 then
  redis.call('HINCRBY', KEYS[5], 'reprocessed', n)
  wake(KEYS[4])
end
return results
