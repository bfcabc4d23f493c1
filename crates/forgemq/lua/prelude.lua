-- Shared helpers, prepended to every script by src/scripts.rs.

-- Milliseconds on Redis's own clock. Every lease deadline and due time comes from here,
-- never from a worker's clock, so skewed workers can neither expire live leases early nor
-- release delayed messages before they are due (DESIGN.md rule 3).
-- clock() gives it rounded down (now) and up (the first whole ms not before now).
-- Due times are set from the rounded-up value and compared with the rounded-down one, so
-- a delayed message never fires before its whole delay has passed, not even by the
-- fraction of a millisecond that rounding down alone would give away.
local function clock()
  local t = redis.call('TIME')
  local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return math.floor(us / 1000), math.ceil(us / 1000)
end

local function now_ms()
  local now = clock()
  return now
end

-- Leaves one wake-up token for a worker blocked on the topic's wake list. One token is
-- enough: a worker that finds more pending work after its fetch passes the token on, so
-- tokens never pile up while every worker is busy.
local function wake(key)
  if redis.call('LLEN', key) == 0 then
    redis.call('RPUSH', key, '1')
  end
end

-- Sets a top-level field of an envelope by appending `"name":value` before the closing
-- brace. Readers decode the envelope as a JSON object in which the last occurrence of a key
-- wins, so the body (and its `data`, which cjson would not round-trip: 299.99 and `[]`
-- change) is never re-encoded. A body that is not a JSON object is returned unchanged.
local function set_field(body, name, value)
  local head = string.match(body, '^(.*)}%s*$')
  if not head then
    return body
  end
  local sep = ','
  if string.match(head, '^%s*{%s*$') then
    sep = ''
  end
  return head .. sep .. cjson.encode(name) .. ':' .. cjson.encode(value) .. '}'
end

-- Reads a non-negative integer top-level field of an envelope; 0 when absent or unreadable.
local function get_count(body, name)
  local ok, t = pcall(cjson.decode, body)
  if ok and type(t) == 'table' then
    local n = tonumber(t[name])
    -- (n == n: not NaN; the bound keeps it an integer that formats as one, not `inf`.)
    if n and n == n and n >= 0 and n < 1e15 then
      return math.floor(n)
    end
  end
  return 0
end

-- Keeps the dead-letter set within its retention: entries older than max_age ms and, past
-- max_len entries, the oldest ones are deleted together with their bodies and counted as
-- `dead_trimmed`, so that a topic that fails forever cannot fill Redis. 0 = no limit.
local function trim_dead(dead_key, msg_key, stats_key, now, max_len, max_age)
  local doomed = {}
  if max_age > 0 then
    doomed = redis.call('ZRANGEBYSCORE', dead_key, '-inf', '(' .. (now - max_age), 'LIMIT', 0, 1000)
  end
  if max_len > 0 then
    local excess = redis.call('ZCARD', dead_key) - #doomed - max_len
    if excess > 0 then
      local oldest = redis.call('ZRANGE', dead_key, #doomed, #doomed + math.min(excess, 1000) - 1)
      for _, id in ipairs(oldest) do
        doomed[#doomed + 1] = id
      end
    end
  end
  if #doomed > 0 then
    redis.call('ZREM', dead_key, unpack(doomed))
    redis.call('HDEL', msg_key, unpack(doomed))
    redis.call('HINCRBY', stats_key, 'dead_trimmed', #doomed)
  end
end

-- Results, progress and waiters (Client::message_status, Client::wait_result).
-- `progress` HASH id -> the last progress a running handler reported (JSON), until the
-- message reaches a final state. `results` HASH id -> record of a finished message (JSON:
-- state, finished_at, until, retry, result, progress); `finished` LIST of the ids in the
-- order they finished, which says which records go first. `waiters` HASH id -> callers
-- waiting for that id to finish; each is woken by a token on the LIST `<waiters>:<id>`.

-- The progress of ids that reach a final state, as a table id -> JSON; their entries go.
local function take_progress(progress_key, ids)
  local out = {}
  if #ids == 0 or redis.call('EXISTS', progress_key) == 0 then
    return out
  end
  local values = redis.call('HMGET', progress_key, unpack(ids))
  for i, v in ipairs(values) do
    if v then
      out[ids[i]] = v
    end
  end
  redis.call('HDEL', progress_key, unpack(ids))
  return out
end

-- The record of a finished message. stamp: `"finished_at":<ms>,"until":<ms>` (the same
-- for every record of a call); retry: a number or digits; members: more JSON object
-- members from the worker (`"result":…` or `"error":…`), progress: a JSON text; either
-- may be nil. Readers ignore a record whose `until` has passed.
local function finished_record(state, stamp, retry, members, progress)
  local extra = ''
  if members then
    extra = ',' .. members
  end
  if progress then
    extra = extra .. ',"progress":' .. progress
  end
  return '{"state":"' .. state .. '",' .. stamp .. ',"retry":' .. retry .. extra .. '}'
end

-- The stamp of the records written now, kept for max_age ms (0: no age limit, until 0).
local function record_stamp(now, max_age)
  local until_ms = 0
  if max_age > 0 then
    until_ms = now + max_age
  end
  return string.format('"finished_at":%d,"until":%d', now, until_ms)
end

-- Keeps the records of finished messages (ids[i] -> records[i]), the last max_len of
-- them (max_len 0: none): the oldest go in bulk once there are a tenth more, so the cost
-- per message stays one list push and, later, one pop. Both keys expire max_age after the
-- last record (a topic that goes quiet keeps none); readers skip records past `until`.
-- max_age 0: no age limit.
local function keep_records(results_key, finished_key, ids, records, max_len, max_age)
  if max_len <= 0 or #ids == 0 then
    return
  end
  local fields = {}
  for i, id in ipairs(ids) do
    fields[2 * i - 1] = id
    fields[2 * i] = records[i]
  end
  redis.call('HSET', results_key, unpack(fields))
  local len = redis.call('RPUSH', finished_key, unpack(ids))
  if len > max_len + math.floor(max_len / 10) then
    local gone = redis.call('LPOP', finished_key, math.min(len - max_len, 1000))
    redis.call('HDEL', results_key, unpack(gone))
  end
  if max_age > 0 then
    redis.call('PEXPIRE', results_key, max_age)
    redis.call('PEXPIRE', finished_key, max_age)
  end
end

-- Wakes the callers waiting for these ids to finish: one token per waiter on the id's
-- list, which lives a minute (a waiter between its check and its BLPOP still finds it).
local function notify_finished(waiters_key, ids)
  if #ids == 0 or redis.call('EXISTS', waiters_key) == 0 then
    return
  end
  local counts = redis.call('HMGET', waiters_key, unpack(ids))
  local woken = {}
  for i, c in ipairs(counts) do
    local n = tonumber(c)
    if n then
      if n > 0 then
        local tokens = {}
        for j = 1, math.min(n, 1000) do
          tokens[j] = '1'
        end
        local list = waiters_key .. ':' .. ids[i]
        redis.call('RPUSH', list, unpack(tokens))
        redis.call('PEXPIRE', list, 60000)
      end
      woken[#woken + 1] = ids[i]
    end
  end
  if #woken > 0 then
    redis.call('HDEL', waiters_key, unpack(woken))
  end
end

-- Adds n to a per-minute counter of a topic for the dashboard's throughput chart: a ring
-- of 60 one-minute slots in one hash (`<slot>:m` holds the minute a slot counts, `<slot>:<kind>`
-- the count), so the hash never holds more than an hour, however sparse the traffic.
local function count_minute(key, now, kind, n)
  local minute = math.floor(now / 60000)
  local slot = minute % 60
  if tonumber(redis.call('HGET', key, slot .. ':m')) ~= minute then
    redis.call('HSET', key, slot .. ':m', minute, slot .. ':p', 0, slot .. ':d', 0, slot .. ':f', 0)
  end
  redis.call('HINCRBY', key, slot .. ':' .. kind, n)
end

-- Releases the unique keys of messages that reached a final state (done, cancelled, purged,
-- dead). `uniq_key` is the topic's index (id -> full name of the unique key it holds); a key
-- is deleted only while it still names this id (after its ttl another message may hold it).
local function release_unique(uniq_key, ids)
  if #ids == 0 or redis.call('EXISTS', uniq_key) == 0 then
    return
  end
  local held = redis.call('HMGET', uniq_key, unpack(ids))
  local gone = {}
  for i, name in ipairs(held) do
    if name then
      if redis.call('GET', name) == ids[i] then
        redis.call('DEL', name)
      end
      gone[#gone + 1] = ids[i]
    end
  end
  if #gone > 0 then
    redis.call('HDEL', uniq_key, unpack(gone))
  end
end

-- Queue latency, cheaply. Entries pushed at the tail of pending (publish, promotion of due
-- delayed messages, a retry without delay, reprocess) become ready in time order, so they
-- are kept as runs: the LIST `runs` holds "<count> <ms>" items, oldest first, meaning
-- "the next <count> tail entries of pending became ready at <ms>". One item per call, not
-- per message. Entries pushed at the head (recovered and released messages) are out of
-- order; they go to the ZSET `ready` (id -> ms). The oldest ready message is then the older
-- of the first run and the first `ready` member.

-- count more tail entries became ready at ms. A time not after the last run's joins that
-- run (a promoted message whose due time is older than the last publish is counted from
-- that publish: off by the promotion's delay at most).
local function runs_push(key, count, ms)
  if count <= 0 then
    return
  end
  local last = redis.call('LINDEX', key, -1)
  if last then
    local n, at = string.match(last, '^(%d+) (%d+)$')
    if at and ms <= tonumber(at) then
      redis.call('LSET', key, -1, string.format('%d %s', tonumber(n) + count, at))
      return
    end
  end
  redis.call('RPUSH', key, string.format('%d %d', count, ms))
end

-- count tail entries left pending (taken by a fetch, tombstones included).
local function runs_take(key, count)
  while count > 0 do
    local head = redis.call('LINDEX', key, 0)
    if not head then
      return
    end
    local n, at = string.match(head, '^(%d+) (%d+)$')
    n = tonumber(n) or 0
    if n > count then
      redis.call('LSET', key, 0, string.format('%d %s', n - count, at))
      return
    end
    redis.call('LPOP', key)
    count = count - n
  end
end

-- Fair groups (PublishOptions::group). A message with a group waits in its group's own
-- list `<base>g:<group>` instead of `pending`, where `<base>` is the topic's key prefix
-- `NS:{T}:` (its keys share the topic's hash tag, so the slot is the same). Beside them:
-- `gring`   LIST  the groups with listed entries, each once, in the order fetch visits
--                 them (round robin); '' stands for `pending`, the ungrouped messages, and
--                 is in the ring while the ring exists and `pending` is not empty
-- `group`   HASH  id -> its group, while the message is pending, delayed or active
-- `gactive` HASH  group -> its messages being handled now
-- `gconf`   HASH  group -> "<max_active> <weight> <paused>" (absent: 0 1 0; 0 = no cap)
-- The stats hash counts the grouped entries listed (`grouped`, tombstones included), so
-- that pending = LLEN pending + grouped - tombstones without visiting every group.
-- `gready`  ZSET  id -> when it became ready, for every listed grouped entry (not its
--                 tombstones); `ready` and the runs describe `pending` only.
-- A tombstone of a grouped entry is the `cancelled` field `<group> <id>` (ids and group
-- names have no spaces), so that it is used up only by an entry of that group's list.

-- The key prefix `NS:{T}:` of a topic, from its pending key.
local function key_base(pending_key)
  return string.sub(pending_key, 1, -8)
end

-- The groups of ids, as a table id -> group (empty when no message of the topic has one).
local function groups_of(base, ids)
  local out = {}
  if #ids == 0 or redis.call('EXISTS', base .. 'group') == 0 then
    return out
  end
  local found = redis.call('HMGET', base .. 'group', unpack(ids))
  for i, g in ipairs(found) do
    if g then
      out[ids[i]] = g
    end
  end
  return out
end

-- Called after `count` entries were pushed onto `pending`, which then held `len`: while
-- groups are in use, `pending` takes its turn in the ring once it has entries.
local function note_plain(base, len, count)
  if count > 0 and len == count and redis.call('EXISTS', base .. 'gring') == 1 then
    redis.call('RPUSH', base .. 'gring', '')
  end
end

-- Pushes the grouped ids among ids onto their groups' lists (at the head when head),
-- ready since ms (in `gready`), and returns the others, which the caller pushes onto
-- pending (then calls note_plain). groups: id -> group (nil: looked up).
local function route_groups(base, pending_key, stats_key, ids, groups, head, ms)
  if #ids == 0 then
    return ids
  end
  groups = groups or groups_of(base, ids)
  if next(groups) == nil then
    return ids
  end
  local plain, by_group, order = {}, {}, {}
  for _, id in ipairs(ids) do
    local g = groups[id]
    if g then
      if not by_group[g] then
        by_group[g] = {}
        order[#order + 1] = g
      end
      local list = by_group[g]
      list[#list + 1] = id
    else
      plain[#plain + 1] = id
    end
  end
  local cmd = head and 'LPUSH' or 'RPUSH'
  local since, n = {}, 0
  for _, g in ipairs(order) do
    local list = by_group[g]
    if redis.call(cmd, base .. 'g:' .. g, unpack(list)) == #list then
      -- The group had no entries: it joins the ring (and `pending` with it when the
      -- ring is new).
      if redis.call('RPUSH', base .. 'gring', g) == 1 and redis.call('LLEN', pending_key) > 0 then
        redis.call('RPUSH', base .. 'gring', '')
      end
    end
    for _, id in ipairs(list) do
      since[#since + 1] = ms
      since[#since + 1] = id
    end
    n = n + #list
  end
  if n > 0 then
    redis.call('ZADD', base .. 'gready', unpack(since))
    redis.call('HINCRBY', stats_key, 'grouped', n)
  end
  return plain
end

-- Deliveries of ids left `active` (settled, released, recovered): their groups' counts
-- go down. Returns whether any had a group.
local function groups_leave(base, groups, ids)
  local dec, any = {}, false
  for _, id in ipairs(ids) do
    local g = groups[id]
    if g then
      dec[g] = (dec[g] or 0) + 1
      any = true
    end
  end
  for g, k in pairs(dec) do
    if redis.call('HINCRBY', base .. 'gactive', g, -k) <= 0 then
      redis.call('HDEL', base .. 'gactive', g)
    end
  end
  return any
end

-- Ids that reached a final state leave the group index.
local function groups_forget(base, groups, ids)
  local gone = {}
  for _, id in ipairs(ids) do
    if groups[id] then
      gone[#gone + 1] = id
    end
  end
  if #gone > 0 then
    redis.call('HDEL', base .. 'group', unpack(gone))
  end
end
