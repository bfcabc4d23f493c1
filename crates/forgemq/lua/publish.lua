-- publish: store new messages and make them pending (or delayed).
-- KEYS[1] msg        HASH  id -> envelope
-- KEYS[2] pending    LIST  ids ready to run
-- KEYS[3] delayed    ZSET  id -> due time (ms, Redis clock)
-- KEYS[4] wake       LIST  wake-up token for blocked workers
-- KEYS[5] stats      HASH  counters
-- KEYS[6] processed  ZSET  ledger of recently processed ids (deduplicating workers)
-- KEYS[7] minutes    HASH  per-minute counters (see count_minute)
-- KEYS[8..] unique-key STRINGs (id of the message that holds the key), as referenced below
-- ARGV    groups of 5: id, delay_ms (0 = now), envelope, unique_key_index (0 = none; else
--         an index into KEYS), unique_ttl_ms
-- Returns one value per message: 1 written; 0 an envelope with that id already exists or
-- the id was processed recently (a retried publish, or a caller-chosen id used twice); or
-- the id (a string) of the message that holds its unique key. Nothing is written for a
-- message that is not new.

local G = 5
local now, now_up = clock()
local results = {}
local seen, claimed = {}, {}
local ledger = redis.call('EXISTS', KEYS[6]) == 1
-- Preconditions first: which messages are new (also within this call).
for i = 1, #ARGV, G do
  local id, uk = ARGV[i], tonumber(ARGV[i + 3])
  local holder = false
  if uk > 0 then
    -- By key name: two messages of one call may carry the same unique key.
    holder = claimed[KEYS[uk]] or redis.call('GET', KEYS[uk])
  end
  if holder then
    results[#results + 1] = holder
  elseif seen[id] or redis.call('HEXISTS', KEYS[1], id) == 1
      or (ledger and tonumber(redis.call('ZSCORE', KEYS[6], id) or '0') > now) then
    results[#results + 1] = 0
  else
    seen[id] = true
    if uk > 0 then
      claimed[KEYS[uk]] = id
    end
    results[#results + 1] = 1
  end
end

local written = 0
for i = 1, #ARGV, G do
  if results[(i - 1) / G + 1] == 1 then
    local id, delay, uk = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 3])
    redis.call('HSET', KEYS[1], id, ARGV[i + 2])
    if delay > 0 then
      redis.call('ZADD', KEYS[3], now_up + delay, id)
    else
      redis.call('RPUSH', KEYS[2], id)
    end
    if uk > 0 then
      redis.call('SET', KEYS[uk], id, 'PX', ARGV[i + 4])
    end
    written = written + 1
  end
end

if written > 0 then
  redis.call('HINCRBY', KEYS[5], 'published', written)
  count_minute(KEYS[7], now, 'p', written)
  -- A delayed message may be due before the time a blocked worker is waiting for, so it
  -- wakes a worker too; the worker recomputes its wait from the delayed set.
  wake(KEYS[4])
end
return results
