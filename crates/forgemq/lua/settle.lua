-- settle: apply the outcomes of finished deliveries, many in one call: ack (done, body
-- deleted), retry (back to delayed or pending with a rewritten envelope) or dead
-- (to the dead-letter set with a rewritten envelope).
-- KEYS[1] active     ZSET
-- KEYS[2] lease      HASH
-- KEYS[3] msg        HASH
-- KEYS[4] delayed    ZSET
-- KEYS[5] pending    LIST
-- KEYS[6] dead       ZSET  id -> time it died (ms)
-- KEYS[7] wake       LIST
-- KEYS[8] stats      HASH
-- KEYS[9] processed  ZSET  id -> until when a redelivery counts as a duplicate (ms)
-- KEYS[10] minutes   HASH  per-minute counters (see count_minute)
-- KEYS[11] uniq      HASH  id -> unique key held until the message's final state
-- KEYS[12], KEYS[13] settled:0, settled:1  HASH  call id -> this script's answers, kept for
--                    30-60 s (two alternating 30 s generations)
-- KEYS[14] purged_tokens SET  lease tokens of deliveries whose message was purged
-- KEYS[15] ready     ZSET  id -> when it became ready (ms), for entries pushed at the head
-- KEYS[16] runs      LIST  "<count> <ms>": runs of tail entries by when they became ready
-- KEYS[17] results   HASH  id -> record of a finished message (see prelude.lua)
-- KEYS[18] finished  LIST  ids in the order they finished: which records go first
-- KEYS[19] progress  HASH  id -> progress reported by its running handler
-- KEYS[20] waiters   HASH  id -> callers waiting for it to finish
-- ARGV[1] dead_max_len   dead letters kept; older ones are deleted (0 = no cap)
-- ARGV[2] dead_max_age   ms a dead letter is kept (0 = forever)
-- ARGV[3] dedup_ttl      ms an acked id stays in the processed ledger (0 = no ledger)
-- ARGV[4] call_id        random id of this call, the same when the caller sends it again
-- ARGV[5] again          1: the caller sent this call before and got no answer (the
--                        record is looked up either way)
-- ARGV[6] results_max_len  records of finished messages kept (0 = none)
-- ARGV[7] results_max_age  ms a record is kept
-- ARGV[8] a              number of acks without a result, listed first as triples:
--                        token, id, retry (failed attempts before this one)
-- ARGV    then groups of 5 for the other outcomes: op ('done' | 'retry' | 'dead' |
--         'dead_as_is'), token, id, text, number. done: an ack with a result (text: JSON
--         object members for its record, `"result":…`, number: retry); retry and dead: the rewritten envelope and the
--         delay in ms; dead_as_is keeps the stored body (too large or unreadable to
--         rewrite in the worker), appends the error text as last_error to it.
-- Returns one integer per outcome, acks first: 1 applied, 0 lease lost (nothing written
-- for it). A call sent again after its reply was lost gets the answers of the first one:
-- what it applied is not reported as a lost lease.

local now, now_up = clock()
local generation = math.floor(now / 30000)
-- Always looked up, not only when the caller says it sends the call again: the cluster
-- client also replays a request by itself after a dropped connection.
local answers = redis.call('HGET', KEYS[12], ARGV[4]) or redis.call('HGET', KEYS[13], ARGV[4])
if answers then
  local out = {}
  for i = 1, #answers do
    out[i] = tonumber(string.sub(answers, i, i))
  end
  return out
end

local G = 5
local acks = tonumber(ARGV[8])
local first_group = 9 + 3 * acks
local n = acks + (#ARGV - first_group + 1) / G
if n == 0 then
  return {}
end
-- Outcome i: its id, token and (for failures) where its group starts in ARGV.
local ids, tokens, base = {}, {}, {}
for i = 1, acks do
  tokens[i] = ARGV[6 + 3 * i]
  ids[i] = ARGV[7 + 3 * i]
end
for i = acks + 1, n do
  local b = first_group + (i - acks - 1) * G
  base[i] = b
  tokens[i] = ARGV[b + 1]
  ids[i] = ARGV[b + 2]
end

-- Preconditions for every outcome before the first write: the lease is still ours, and
-- an id settled twice in one call counts once.
local owners = redis.call('HMGET', KEYS[2], unpack(ids))
local results, seen = {}, {}
local duplicate_runs = 0
for i = 1, n do
  if owners[i] == tokens[i] and not seen[ids[i]] then
    results[i] = 1
    seen[ids[i]] = true
  else
    results[i] = 0
    -- A handler ran to its end on a message whose lease expired meanwhile: it runs, will
    -- run or ran again elsewhere, a duplicate run (DESIGN.md rule 7). A delivery whose
    -- message was purged under it is not one.
    if owners[i] ~= tokens[i] and (owners[i] or redis.call('HEXISTS', KEYS[3], ids[i]) == 1
        or redis.call('SISMEMBER', KEYS[14], tokens[i]) == 0) then
      duplicate_runs = duplicate_runs + 1
    end
  end
end

local dedup_ttl = tonumber(ARGV[3])
local kbase = key_base(KEYS[5])
local settled = {}
for i = 1, n do
  if results[i] == 1 then
    settled[#settled + 1] = ids[i]
  end
end
local groups = groups_of(kbase, settled)
local acked, retried, dead = {}, 0, 0
-- Per acked message: failed attempts before it, and its result (false: none).
local acked_retry, acked_result = {}, {}
local final = {}
for i = 1, acks do
  if results[i] == 1 then
    acked[#acked + 1] = ids[i]
    acked_retry[#acked] = ARGV[8 + 3 * i]
    acked_result[#acked] = false
    final[#final + 1] = ids[i]
  end
end
for i = acks + 1, n do
  if results[i] == 1 then
    local b = base[i]
    local op, id = ARGV[b], ids[i]
    if op == 'done' then
      acked[#acked + 1] = id
      acked_retry[#acked] = ARGV[b + 4]
      acked_result[#acked] = ARGV[b + 3]
      final[#final + 1] = id
    elseif op == 'retry' then
      redis.call('HSET', KEYS[3], id, ARGV[b + 3])
      local delay = tonumber(ARGV[b + 4])
      if delay > 0 then
        redis.call('ZADD', KEYS[4], now_up + delay, id)
      elseif #route_groups(kbase, KEYS[5], KEYS[8], {id}, groups, false, now) > 0 then
        local len = redis.call('RPUSH', KEYS[5], id)
        runs_push(KEYS[16], 1, now)
        note_plain(kbase, len, 1)
      end
      retried = retried + 1
    elseif op == 'dead_as_is' then
      local body = redis.call('HGET', KEYS[3], id)
      if body then
        redis.call('HSET', KEYS[3], id, set_field(body, 'last_error', ARGV[b + 3]))
      end
      redis.call('ZADD', KEYS[6], now, id)
      dead = dead + 1
      final[#final + 1] = id
    else
      redis.call('HSET', KEYS[3], id, ARGV[b + 3])
      redis.call('ZADD', KEYS[6], now, id)
      dead = dead + 1
      final[#final + 1] = id
    end
  end
end

if #settled > 0 then
  redis.call('ZREM', KEYS[1], unpack(settled))
  redis.call('HDEL', KEYS[2], unpack(settled))
end
if #acked > 0 then
  redis.call('HDEL', KEYS[3], unpack(acked))
  redis.call('HINCRBY', KEYS[8], 'processed', #acked)
  count_minute(KEYS[10], now, 'd', #acked)
  if dedup_ttl > 0 then
    local zargs = {}
    local until_ms = string.format('%d', now + dedup_ttl)
    for _, id in ipairs(acked) do
      zargs[#zargs + 1] = until_ms
      zargs[#zargs + 1] = id
    end
    redis.call('ZADD', KEYS[9], unpack(zargs))
  end
end
release_unique(KEYS[11], final)
if next(groups) ~= nil then
  -- A group at its max_active has room again: a worker may be waiting for it.
  if groups_leave(kbase, groups, settled) and retried == 0
      and redis.call('EXISTS', kbase .. 'gconf') == 1 then
    wake(KEYS[7])
  end
  groups_forget(kbase, groups, final)
end
local progress = take_progress(KEYS[19], final)
local results_max_len = tonumber(ARGV[6])
if results_max_len > 0 and #acked > 0 then
  local max_age = tonumber(ARGV[7])
  local stamp = record_stamp(now, max_age)
  local records = {}
  for i, id in ipairs(acked) do
    records[i] = finished_record('done', stamp, acked_retry[i], acked_result[i] or nil, progress[id])
  end
  keep_records(KEYS[17], KEYS[18], acked, records, results_max_len, max_age)
end
notify_finished(KEYS[20], final)
if dedup_ttl > 0 then
  -- Expired ledger entries go whenever a deduplicating worker settles: bounded ledger.
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', '(' .. now)
end
if retried + dead > 0 then
  count_minute(KEYS[10], now, 'f', retried + dead)
end
if retried > 0 then
  redis.call('HINCRBY', KEYS[8], 'failed', retried)
  redis.call('HINCRBY', KEYS[8], 'retried', retried)
  -- A worker blocked with a long wait must recompute it for this due time.
  wake(KEYS[7])
end
if dead > 0 then
  redis.call('HINCRBY', KEYS[8], 'failed', dead)
  redis.call('HINCRBY', KEYS[8], 'dead', dead)
  trim_dead(KEYS[6], KEYS[3], KEYS[8], now, tonumber(ARGV[1]), tonumber(ARGV[2]))
end
if duplicate_runs > 0 then
  redis.call('HINCRBY', KEYS[8], 'duplicate_runs', duplicate_runs)
end

-- The answers, kept for a caller that sends this call again because its reply was lost.
local record = KEYS[12 + generation % 2]
if tonumber(redis.call('HGET', record, 'g')) ~= generation then
  -- This hash held the generation before last: its answers are over 30 s old.
  redis.call('DEL', record)
  redis.call('HSET', record, 'g', generation)
  redis.call('PEXPIRE', record, 65000)
end
redis.call('HSET', record, ARGV[4], table.concat(results))
return results
