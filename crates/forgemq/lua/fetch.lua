-- fetch: promote due delayed messages, then lease up to N pending messages.
-- KEYS[1] pending    LIST
-- KEYS[2] active     ZSET  id -> lease deadline (ms, Redis clock)
-- KEYS[3] lease      HASH  id -> lease token
-- KEYS[4] delayed    ZSET  id -> due time
-- KEYS[5] msg        HASH  id -> envelope
-- KEYS[6] wake       LIST
-- KEYS[7] stats      HASH
-- KEYS[8] paused     STRING  present while the topic is paused
-- KEYS[9] processed  ZSET  id -> until when a redelivery counts as a duplicate
-- KEYS[10] cancelled HASH  id -> tombstones: entries of cancelled messages still listed
-- KEYS[11] uniq      HASH  id -> unique key held until the message's final state
-- KEYS[12] ready     ZSET  id -> when it became ready (ms), for entries pushed at the head
-- KEYS[13] runs      LIST  "<count> <ms>": runs of tail entries by when they became ready
-- KEYS[14] limit     HASH  the topic's rate limit, a token bucket: rate (per second),
--                    burst, tokens, at (ms of the last refill; may be ahead of now while
--                    the bucket is drained by a remote 429). Absent: no limit.
-- KEYS[15] progress  HASH  KEYS[16] waiters  HASH (see settle.lua): a message skipped as
--                    a duplicate or dropped as an orphan is finished; its waiters are woken
-- ARGV[1] n             most messages to lease
-- ARGV[2] lease_ms      lease length
-- ARGV[3] token         lease token of this delivery: `{holder}/{random}`; the lease hash
--                       stores `{token}@{now}` (now: the first value returned), which
--                       is the token the caller settles and renews with, and says when
--                       the delivery started
-- ARGV[4] promote_limit most due delayed messages to promote in this call
-- ARGV[5] dedup         1: skip (delete and count) ids found in the processed ledger
-- ARGV[6] will_wait     1: the caller blocks on the wake list if this fetch finds nothing
-- Returns {now_ms, next_due_ms or -1, {id1, envelope1, ...}, paused (0/1)}.
-- next_due_ms is only computed when fewer than n were leased (the caller may wait next);
-- when the rate limit held the fetch back, it is when the next token is due.

local now = now_ms()
if redis.call('EXISTS', KEYS[8]) == 1 then
  -- Paused: hand out nothing; resuming leaves a fresh wake-up token.
  if ARGV[6] == '1' then
    redis.call('DEL', KEYS[6])
  end
  return {now, -1, {}, 1}
end

local n = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])

-- Due delayed messages join the tail of pending: a retry waits behind what was already ready.
-- They became ready at their due time, which is what the queue latency counts from.
local due_scored = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[4]))
if #due_scored > 0 then
  local due = {}
  for i = 1, #due_scored, 2 do
    due[#due + 1] = due_scored[i]
  end
  redis.call('ZREM', KEYS[4], unpack(due))
  redis.call('RPUSH', KEYS[1], unpack(due))
  runs_push(KEYS[13], #due, tonumber(due_scored[2]))
end

-- The rate limit: at most as many deliveries as whole tokens; none (and when the next
-- token comes) when there is none. Deliveries take tokens below, once leased.
local limit = redis.call('HMGET', KEYS[14], 'rate', 'burst', 'tokens', 'at')
local tokens, rate = nil, nil
if limit[1] then
  rate = tonumber(limit[1])
  local burst = tonumber(limit[2])
  local at = tonumber(limit[4] or now)
  tokens = tonumber(limit[3] or limit[2])
  if now > at then
    tokens = math.min(burst, tokens + (now - at) * rate / 1000)
    at = now
  end
  redis.call('HSET', KEYS[14], 'tokens', string.format('%.6f', tokens), 'at', string.format('%d', at))
  if tokens < 1 then
    -- Not a token before `at` (a drained bucket), then one every 1000 / rate ms.
    return {now, at + math.ceil((1 - tokens) * 1000 / rate), {}, 0}
  end
  n = math.min(n, math.floor(tokens))
end

local out = {}
local ledger = ARGV[5] == '1' and redis.call('EXISTS', KEYS[9]) == 1
local tombstones = redis.call('EXISTS', KEYS[10]) == 1
-- As a string once: Redis would otherwise format the number for every id.
local deadline = string.format('%d', now + lease_ms)
local token = ARGV[3] .. '@' .. string.format('%d', now)
local zargs, hargs, skipped, finished = {}, {}, {}, {}
local orphans = 0
-- The entries of cancelled messages (tombstones) are skipped without counting against n:
-- popping goes on until n are leased, the list is empty, or a bounded number of
-- tombstones were passed (the rest wait for the next fetch).
local want, passed, popped = n, 0, false
while want > 0 do
  local ids = redis.call('LPOP', KEYS[1], want)
  if not ids then
    break
  end
  popped = true
  local bodies = redis.call('HMGET', KEYS[5], unpack(ids))
  -- Every popped entry leaves pending: those pushed at the head are in `ready`, the rest
  -- are the oldest of the runs.
  local from_head = redis.call('ZREM', KEYS[12], unpack(ids))
  runs_take(KEYS[13], #ids - from_head)
  local again = 0
  for i, id in ipairs(ids) do
    local body = bodies[i]
    if tombstones and redis.call('HEXISTS', KEYS[10], id) == 1 then
      -- The entry of a cancelled message (cancel leaves it in the list rather than search
      -- the list for it). A body here belongs to a later publish of the same id, whose own
      -- entry (and readiness) comes further down the list.
      if redis.call('HINCRBY', KEYS[10], id, -1) <= 0 then
        redis.call('HDEL', KEYS[10], id)
      end
      redis.call('HINCRBY', KEYS[7], 'tombstones', -1)
      again = again + 1
    else
      if not body then
        -- An id without a body has nothing to run (its body was purged); drop it.
        orphans = orphans + 1
        finished[#finished + 1] = id
      elseif ledger and tonumber(redis.call('ZSCORE', KEYS[9], id) or '0') > now then
        -- Already processed within the ledger's window: a redelivery, not new work.
        skipped[#skipped + 1] = id
      else
        zargs[#zargs + 1] = deadline
        zargs[#zargs + 1] = id
        hargs[#hargs + 1] = id
        hargs[#hargs + 1] = token
        out[#out + 1] = id
        out[#out + 1] = body
      end
    end
  end
  passed = passed + again
  want = math.min(again, 1000 - passed)
end
if #zargs > 0 then
  redis.call('ZADD', KEYS[2], unpack(zargs))
  redis.call('HSET', KEYS[3], unpack(hargs))
  if tokens then
    redis.call('HSET', KEYS[14], 'tokens', string.format('%.6f', tokens - #zargs / 2))
  end
end
if #skipped > 0 then
  redis.call('HDEL', KEYS[5], unpack(skipped))
  redis.call('HINCRBY', KEYS[7], 'deduplicated', #skipped)
  for _, id in ipairs(skipped) do
    finished[#finished + 1] = id
  end
end
release_unique(KEYS[11], finished)
if #finished > 0 then
  take_progress(KEYS[15], finished)
  notify_finished(KEYS[16], finished)
end
if orphans > 0 then
  redis.call('HINCRBY', KEYS[7], 'orphans', orphans)
end
-- More work is waiting: pass the wake-up on to another blocked worker.
if popped then
  if redis.call('LLEN', KEYS[1]) > 0 then
    -- (Not when the rate limit has no token left: the woken worker would find none.)
    if not tokens or tokens - #zargs / 2 >= 1 then
      wake(KEYS[6])
    end
  else
    -- Nothing is ready: whatever the latency records still hold is stale.
    redis.call('DEL', KEYS[12], KEYS[13])
  end
end

local next_due = -1
if #out == 0 then
  -- This worker is about to wait and computes its wait from the delayed set itself, so a
  -- leftover token would only cost it an empty round trip. Not while work is pending
  -- (everything popped was skipped), and not for a manual fetch that will not wait.
  if ARGV[6] == '1' and redis.call('LLEN', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[6])
  end
end
-- (out holds an id and a body per message.)
if #out < 2 * n then
  local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  if first[2] then
    next_due = tonumber(first[2])
  end
end
if tokens and #out == 2 * n and redis.call('LLEN', KEYS[1]) > 0 then
  -- Limited, with work left: the caller may wait, until the next token at the latest.
  local left = tokens - n
  local due = now + math.ceil(math.max(0, 1 - left) * 1000 / rate)
  if next_due < 0 or due < next_due then
    next_due = due
  end
end
return {now, next_due, out, 0}
