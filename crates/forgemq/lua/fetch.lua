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
  local base = key_base(KEYS[1])
  due = route_groups(base, KEYS[1], KEYS[7], due, nil, false, tonumber(due_scored[2]))
  if #due > 0 then
    local len = redis.call('RPUSH', KEYS[1], unpack(due))
    runs_push(KEYS[13], #due, tonumber(due_scored[2]))
    note_plain(base, len, #due)
  end
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

-- Leases the ids popped from `pending` (group nil) or from a group's list that are
-- runnable. Returns how many entries were passed without a lease (tombstones, duplicates,
-- orphans), how many were leased, and the ids that were not tombstones.
local function take(ids, group)
  local bodies = redis.call('HMGET', KEYS[5], unpack(ids))
  local again, leased, live = 0, 0, {}
  for i, id in ipairs(ids) do
    local body = bodies[i]
    local field = group and (group .. ' ' .. id) or id
    if tombstones and redis.call('HEXISTS', KEYS[10], field) == 1 then
      -- The entry of a cancelled message (cancel leaves it in the list rather than search
      -- the list for it). A body here belongs to a later publish of the same id, whose own
      -- entry (and readiness) comes further down this list or in another one.
      if redis.call('HINCRBY', KEYS[10], field, -1) <= 0 then
        redis.call('HDEL', KEYS[10], field)
      end
      redis.call('HINCRBY', KEYS[7], 'tombstones', -1)
      again = again + 1
    else
      live[#live + 1] = id
      if not body then
        -- An id without a body has nothing to run (its body was purged); drop it.
        orphans = orphans + 1
        finished[#finished + 1] = id
        again = again + 1
      elseif ledger and tonumber(redis.call('ZSCORE', KEYS[9], id) or '0') > now then
        -- Already processed within the ledger's window: a redelivery, not new work.
        skipped[#skipped + 1] = id
        again = again + 1
      else
        zargs[#zargs + 1] = deadline
        zargs[#zargs + 1] = id
        hargs[#hargs + 1] = id
        hargs[#hargs + 1] = token
        out[#out + 1] = id
        out[#out + 1] = body
        leased = leased + 1
      end
    end
  end
  return again, leased, live
end

-- Pops up to `count` entries of `pending` and leases them.
local function take_plain(count)
  local ids = redis.call('LPOP', KEYS[1], count)
  if not ids then
    return nil
  end
  -- Every popped entry leaves pending: those pushed at the head are in `ready`, the rest
  -- are the oldest of the runs.
  local from_head = redis.call('ZREM', KEYS[12], unpack(ids))
  runs_take(KEYS[13], #ids - from_head)
  return (take(ids, nil))
end

local base = key_base(KEYS[1])
local ring_key = base .. 'gring'
-- more: whether work that this topic could hand out now is left after this fetch.
local more = false
local popped = false
local want = n
if redis.call('EXISTS', ring_key) == 0 then
  -- No groups in use: pending is one list, taken from the head.
  -- The entries of cancelled messages (tombstones) are skipped without counting against
  -- n: popping goes on until n are leased, the list is empty, or a bounded number of
  -- entries were passed (the rest wait for the next fetch).
  local passed = 0
  while want > 0 do
    local again = take_plain(want)
    if not again then
      break
    end
    popped = true
    passed = passed + again
    want = math.min(again, 1000 - passed)
  end
  more = redis.call('LLEN', KEYS[1]) > 0
  if popped and not more then
    -- Nothing is ready: whatever the latency records still hold is stale.
    redis.call('DEL', KEYS[12], KEYS[13])
  end
else
  -- Fair groups: weighted round robin over the ring. Each group in turn gives up to its
  -- weight (within its max_active, none while paused), round after round, until n are
  -- leased; the ring then turns past the groups that had their turn, so the next fetch
  -- starts with the next group. A turn cut short by n carries over (`gcredit`: "<given>
  -- <group>"), so weights hold also for fetches of one message. A call looks at 100
  -- groups at a time: with more in the ring it gives one round per 100 and turns the ring
  -- past them (also when none of them could give), up to 4 times.
  local gconf, gactive, credit_key = base .. 'gconf', base .. 'gactive', base .. 'gcredit'
  local passed = 0
  for _ = 1, 4 do
    if want <= 0 then
      break
    end
    local ring = redis.call('LRANGE', ring_key, 0, 99)
    local L = #ring
    if L == 0 then
      break
    end
    local whole = L < 100 or redis.call('LLEN', ring_key) <= L
    local conf = redis.call('HMGET', gconf, unpack(ring))
    local act = redis.call('HMGET', gactive, unpack(ring))
    local lists, room, cap, weight, give = {}, {}, {}, {}, {}
    for i, g in ipairs(ring) do
      lists[i] = g == '' and KEYS[1] or (base .. 'g:' .. g)
      local max, w, paused = 0, 1, '0'
      if conf[i] then
        local a, b, c = string.match(conf[i], '^(%d+) (%d+) ([01])$')
        if a then
          max, w, paused = tonumber(a), math.max(1, tonumber(b)), c
        end
      end
      if paused == '1' then
        cap[i] = 0
      elseif max > 0 then
        cap[i] = math.max(0, max - (tonumber(act[i]) or 0))
      else
        cap[i] = math.huge
      end
      room[i] = 0
      if cap[i] > 0 then
        room[i] = math.min(cap[i], redis.call('LLEN', lists[i]))
      end
      weight[i] = w
      give[i] = 0
    end
    local credit = 0
    local held = redis.call('GET', credit_key)
    if held then
      local c, g = string.match(held, '^(%d+) (.*)$')
      if g == ring[1] then
        credit = tonumber(c)
      end
    end
    local last, left, carry, round = 0, want, nil, 0
    local turning = true
    while left > 0 and turning and (round == 0 or whole) do
      turning = false
      round = round + 1
      for i = 1, L do
        local quota = weight[i]
        local before = 0
        if round == 1 and i == 1 then
          before = math.min(credit, quota - 1)
          quota = quota - before
        end
        local k = math.min(quota, left, room[i] - give[i])
        if k > 0 then
          give[i] = give[i] + k
          left = left - k
          last = i
          turning = true
          if left == 0 then
            if k < quota and give[i] < room[i] then
              carry = string.format('%d %s', before + k, ring[i])
            end
            break
          end
        end
      end
    end
    if last == 0 then
      -- None of these groups can give now (paused, at their max_active).
      if whole then
        break
      end
      -- More groups wait behind them: turn the ring past these and look again.
      for _ = 1, L do
        redis.call('LMOVE', ring_key, ring_key, 'LEFT', 'RIGHT')
      end
    else
      local turns = last
      if carry then
        turns = last - 1
        redis.call('SET', credit_key, carry)
      else
        redis.call('DEL', credit_key)
      end
      for _ = 1, turns do
        redis.call('LMOVE', ring_key, ring_key, 'LEFT', 'RIGHT')
      end
      local again_total = 0
      for i, g in ipairs(ring) do
        if give[i] > 0 then
          popped = true
          local again, leased
          if g == '' then
            again = take_plain(give[i]) or 0
            leased = give[i] - again
          else
            local ids = redis.call('LPOP', lists[i], give[i])
            local live
            again, leased, live = take(ids, g)
            redis.call('HINCRBY', KEYS[7], 'grouped', -#ids)
            if #live > 0 then
              redis.call('ZREM', base .. 'gready', unpack(live))
            end
            if leased > 0 then
              redis.call('HINCRBY', gactive, g, leased)
            end
          end
          again_total = again_total + again
          if redis.call('LLEN', lists[i]) == 0 then
            redis.call('LREM', ring_key, 1, g)
          elseif cap[i] - leased > 0 then
            more = true
          end
        elseif room[i] > 0 then
          more = true
        end
      end
      if not whole then
        -- The groups behind these 100 may have work.
        more = true
      end
      passed = passed + again_total
      want = math.min(left + again_total, 1000 - passed)
    end
  end
  if redis.call('LLEN', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[13])
  end
  if redis.call('EXISTS', ring_key) == 0 then
    -- Every group is empty: nothing of the round robin needs to stay.
    redis.call('DEL', credit_key)
  end
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
  local groups = groups_of(base, finished)
  groups_forget(base, groups, finished)
end
if orphans > 0 then
  redis.call('HINCRBY', KEYS[7], 'orphans', orphans)
end
-- More work is waiting: pass the wake-up on to another blocked worker.
-- (Not when the rate limit has no token left: the woken worker would find none.)
if more and (not tokens or tokens - #zargs / 2 >= 1) then
  wake(KEYS[6])
end

local next_due = -1
if #out == 0 then
  -- This worker is about to wait and computes its wait from the delayed set itself, so a
  -- leftover token would only cost it an empty round trip. Not while work is pending
  -- (everything popped was skipped), and not for a manual fetch that will not wait.
  -- Work that no worker may take now (its group is paused or at its max_active) does
  -- not count: the settle that frees a place wakes a worker.
  if ARGV[6] == '1' and not more then
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
if tokens and #out == 2 * n and more then
  -- Limited, with work left: the caller may wait, until the next token at the latest.
  local left = tokens - n
  local due = now + math.ceil(math.max(0, 1 - left) * 1000 / rate)
  if next_due < 0 or due < next_due then
    next_due = due
  end
end
return {now, next_due, out, 0}
