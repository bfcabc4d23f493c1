-- publish: store new messages and make them pending (or delayed).
-- KEYS[1] msg        HASH  id -> envelope
-- KEYS[2] pending    LIST  ids ready to run
-- KEYS[3] delayed    ZSET  id -> due time (ms, Redis clock)
-- KEYS[4] wake       LIST  wake-up token for blocked workers
-- KEYS[5] stats      HASH  counters
-- KEYS[6] processed  ZSET  ledger of recently processed ids (deduplicating workers)
-- KEYS[7] minutes    HASH  per-minute counters (see count_minute)
-- KEYS[8] uniq       HASH  id -> unique key it holds until its final state
-- KEYS[9] meta       HASH  the topic's layout: partitions (absent = 1), frozen (until when)
-- KEYS[10] ready     ZSET  id -> when it became ready (ms), for entries pushed at the head
-- KEYS[11] runs      LIST  "<count> <ms>": runs of tail entries by when they became ready
-- KEYS[12..] unique-key STRINGs (id of the message that holds the key), as referenced below
-- ARGV[1] the number of partitions the caller believes the topic has (1: a plain topic).
--         Another number in meta means the caller's layout is out of date: nothing is
--         written and the reply is the error `PARTITIONED <n>` (the caller re-reads it);
--         a frozen layout (being changed) is `TRYAGAIN`.
-- ARGV    then groups of 3: id, envelope, options; options is '' for a message to run now
--         without a unique key (the common case: nothing to convert), else
--         '<delay_ms>,<unique_key_index>,<unique_ttl_ms>,<until_final>' (delay 0 = now;
--         index 0 = no unique key, else an index into KEYS; until_final 1 = the key is
--         released when the message reaches a final state, 0 = it holds for its ttl)
-- Returns one value per message: 1 written; 0 an envelope with that id already exists or
-- the id was processed recently (a retried publish, or a caller-chosen id used twice); or
-- the id (a string) of the message that holds its unique key. Nothing is written for a
-- message that is not new.

local G = 3
local now, now_up = clock()
local layout = redis.call('HMGET', KEYS[9], 'partitions', 'frozen')
if layout[2] and tonumber(layout[2]) > now then
  return redis.error_reply('TRYAGAIN the partitions of this topic are being changed; try again')
end
if tonumber(layout[1] or '1') ~= tonumber(ARGV[1]) then
  return redis.error_reply('PARTITIONED ' .. (layout[1] or '1'))
end
local count = (#ARGV - 1) / G
if count == 0 then
  return {}
end
-- Message k: its id, and its delay, unique key index and unique key ttl.
local ids, delays, uks, ttls, finals = {}, {}, {}, {}, {}
for k = 1, count do
  local i = (k - 1) * G + 2
  ids[k] = ARGV[i]
  local options = ARGV[i + 2]
  if options == '' then
    delays[k], uks[k] = 0, 0
  else
    local d, u, t, f = string.match(options, '^(%d+),(%d+),(%d+),([01])$')
    if not d then
      return redis.error_reply('ERR publish: bad options ' .. options)
    end
    delays[k], uks[k], ttls[k], finals[k] = tonumber(d), tonumber(u), t, f == '1'
  end
end

local results = {}
local seen, claimed = {}, {}
local ledger = redis.call('EXISTS', KEYS[6]) == 1
-- Preconditions first: which messages are new (also within this call). One HMGET looks
-- up every id at once (callers send at most 1,000 per call).
local stored = redis.call('HMGET', KEYS[1], unpack(ids))
for k = 1, count do
  local id, uk = ids[k], uks[k]
  local holder = false
  if uk > 0 then
    -- By key name: two messages of one call may carry the same unique key.
    holder = claimed[KEYS[uk]] or redis.call('GET', KEYS[uk])
  end
  if holder then
    results[k] = holder
  elseif seen[id] or stored[k]
      or (ledger and tonumber(redis.call('ZSCORE', KEYS[6], id) or '0') > now) then
    results[k] = 0
  else
    seen[id] = true
    if uk > 0 then
      claimed[KEYS[uk]] = id
    end
    results[k] = 1
  end
end

-- Then the writes, one command per structure for the whole call.
local bodies, ready, later, held = {}, {}, {}, {}
for k = 1, count do
  if results[k] == 1 then
    local id = ids[k]
    bodies[#bodies + 1] = id
    bodies[#bodies + 1] = ARGV[(k - 1) * G + 3]
    if delays[k] > 0 then
      later[#later + 1] = now_up + delays[k]
      later[#later + 1] = id
    else
      ready[#ready + 1] = id
    end
    if uks[k] > 0 then
      redis.call('SET', KEYS[uks[k]], id, 'PX', ttls[k])
      if finals[k] then
        held[#held + 1] = id
        held[#held + 1] = KEYS[uks[k]]
      end
    end
  end
end

local written = #bodies / 2
if written > 0 then
  redis.call('HSET', KEYS[1], unpack(bodies))
  if #ready > 0 then
    redis.call('RPUSH', KEYS[2], unpack(ready))
    runs_push(KEYS[11], #ready, now)
  end
  if #later > 0 then
    redis.call('ZADD', KEYS[3], unpack(later))
  end
  if #held > 0 then
    redis.call('HSET', KEYS[8], unpack(held))
  end
  redis.call('HINCRBY', KEYS[5], 'published', written)
  count_minute(KEYS[7], now, 'p', written)
  -- A delayed message may be due before the time a blocked worker is waiting for, so it
  -- wakes a worker too; the worker recomputes its wait from the delayed set.
  wake(KEYS[4])
end
return results
