-- Shared by publish.lua and schedule_fire.lua (included after prelude.lua).

-- check_layout(meta, partitions, now): nil when the caller's partition count matches the
-- topic's layout (meta HASH), else the error to return: `PARTITIONED <n>` (the caller
-- re-reads the layout) or TRYAGAIN while the layout is frozen for a change.
local function check_layout(meta, partitions, now)
  local layout = redis.call('HMGET', meta, 'partitions', 'frozen')
  if layout[2] and tonumber(layout[2]) > now then
    return redis.error_reply('TRYAGAIN the partitions of this topic are being changed; try again')
  end
  if tonumber(layout[1] or '1') ~= tonumber(partitions) then
    return redis.error_reply('PARTITIONED ' .. (layout[1] or '1'))
  end
  return nil
end

-- store_messages(K, A, first, now, now_up): stores the messages given in A from index
-- `first` on, in groups of 3 (id, envelope, options), into the topic keys K[1..11] (the
-- layout of publish.lua's KEYS; unique-key indexes point into K). Returns one value per
-- message, as publish.lua describes.
local function store_messages(K, A, first, now, now_up)
  local G = 3
  local count = (#A - first + 1) / G
  if count == 0 then
    return {}
  end
  -- Message k: its id, and its delay, unique key index and unique key ttl.
  local ids, delays, uks, ttls, finals, groups = {}, {}, {}, {}, {}, {}
  for k = 1, count do
    local i = (k - 1) * G + first
    ids[k] = A[i]
    local options = A[i + 2]
    if options == '' then
      delays[k], uks[k] = 0, 0
    else
      local d, u, t, f, g = string.match(options, '^(%d+),(%d+),(%d+),([01]),?(.*)$')
      if not d then
        return redis.error_reply('ERR publish: bad options ' .. options)
      end
      delays[k], uks[k], ttls[k], finals[k] = tonumber(d), tonumber(u), t, f == '1'
      if g ~= '' then
        groups[k] = g
      end
    end
  end

  local results = {}
  local seen, claimed = {}, {}
  local ledger = redis.call('EXISTS', K[6]) == 1
  -- Preconditions first: which messages are new (also within this call). One HMGET looks
  -- up every id at once (callers send at most 1,000 per call).
  local stored = redis.call('HMGET', K[1], unpack(ids))
  for k = 1, count do
    local id, uk = ids[k], uks[k]
    local holder = false
    if uk > 0 then
      -- By key name: two messages of one call may carry the same unique key.
      holder = claimed[K[uk]] or redis.call('GET', K[uk])
    end
    if holder then
      results[k] = holder
    elseif seen[id] or stored[k]
        or (ledger and tonumber(redis.call('ZSCORE', K[6], id) or '0') > now) then
      results[k] = 0
    else
      seen[id] = true
      if uk > 0 then
        claimed[K[uk]] = id
      end
      results[k] = 1
    end
  end

  -- Then the writes, one command per structure for the whole call.
  local bodies, ready, later, held = {}, {}, {}, {}
  local grouped, indexed = {}, {}
  for k = 1, count do
    if results[k] == 1 then
      local id = ids[k]
      bodies[#bodies + 1] = id
      bodies[#bodies + 1] = A[(k - 1) * G + first + 1]
      if groups[k] then
        grouped[id] = groups[k]
        indexed[#indexed + 1] = id
        indexed[#indexed + 1] = groups[k]
      end
      if delays[k] > 0 then
        later[#later + 1] = now_up + delays[k]
        later[#later + 1] = id
      else
        ready[#ready + 1] = id
      end
      if uks[k] > 0 then
        redis.call('SET', K[uks[k]], id, 'PX', ttls[k])
        if finals[k] then
          held[#held + 1] = id
          held[#held + 1] = K[uks[k]]
        end
      end
    end
  end

  local written = #bodies / 2
  if written > 0 then
    redis.call('HSET', K[1], unpack(bodies))
    if #indexed > 0 then
      local base = key_base(K[2])
      redis.call('HSET', base .. 'group', unpack(indexed))
      ready = route_groups(base, K[2], K[5], ready, grouped, false, now)
    end
    if #ready > 0 then
      local len = redis.call('RPUSH', K[2], unpack(ready))
      runs_push(K[11], #ready, now)
      note_plain(key_base(K[2]), len, #ready)
    end
    if #later > 0 then
      redis.call('ZADD', K[3], unpack(later))
    end
    if #held > 0 then
      redis.call('HSET', K[8], unpack(held))
    end
    redis.call('HINCRBY', K[5], 'published', written)
    count_minute(K[7], now, 'p', written)
    -- A delayed message may be due before the time a blocked worker is waiting for, so it
    -- wakes a worker too; the worker recomputes its wait from the delayed set.
    wake(K[4])
  end
  return results
end
