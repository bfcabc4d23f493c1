-- schedule_fire: claim a schedule's fire time, publish its messages and advance the
-- schedule, in one call. Any number of schedulers call it; the compare-and-set on the
-- stored next fire time lets exactly one of them act per fire time, and Redis's clock
-- decides that the time has come (none early).
-- KEYS[1..11] the topic's keys, as publish.lua
-- KEYS[12]    schedule HASH: spec, rev, next (ms), last (ms), fired (count)
-- KEYS[13..]  unique-key STRINGs, as publish.lua
-- ARGV[1] the partition count the caller believes the topic has (as publish.lua)
-- ARGV[2] 'tick' (a regular fire: the compare-and-set below) or 'now' (run it now: publish
--         only, the next fire time stays)
-- ARGV[3] the next fire time (ms) the caller read; ARGV[4] the spec revision it read
-- ARGV[5] the next fire time after this call (ms)
-- ARGV[6] the latest fire time among the messages of this call (ms; 0 when none)
-- ARGV[7..] the messages, in groups of 3 (id, envelope, options), as publish.lua
-- Returns {'fired', <publish results>...}; {'stale', next, rev, anchor} when the schedule moved on
-- or changed (another scheduler fired it, or it was set again); {'early', ms} when the
-- fire time has not come on Redis's clock; {'gone'} when the schedule does not exist.

local now, now_up = clock()
local refused = check_layout(KEYS[9], ARGV[1], now)
if refused then
  return refused
end
local state = redis.call('HMGET', KEYS[12], 'next', 'rev', 'anchor')
if not state[1] then
  return {'gone'}
end
if state[2] ~= ARGV[4] then
  return {'stale', state[1], state[2], state[3] or '0'}
end
local tick = ARGV[2] == 'tick'
if tick and state[1] ~= ARGV[3] then
  return {'stale', state[1], state[2], state[3] or '0'}
end
local latest = tonumber(ARGV[6])
local due = tonumber(ARGV[3])
if tick and due > latest then
  latest = due
end
if latest > now then
  return {'early', string.format('%d', latest - now)}
end
local results = store_messages(KEYS, ARGV, 7, now, now_up)
if results.err then
  return results
end
if tick then
  redis.call('HSET', KEYS[12], 'next', ARGV[5])
end
if tonumber(ARGV[6]) > 0 then
  redis.call('HSET', KEYS[12], 'last', ARGV[6])
  redis.call('HINCRBY', KEYS[12], 'fired', #results)
end
table.insert(results, 1, 'fired')
return results
