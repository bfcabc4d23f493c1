-- drop_dead: delete dead letters for good (the dead-letter browser's delete, `dlq purge`).
-- KEYS[1] dead   ZSET
-- KEYS[2] msg    HASH
-- KEYS[3] stats  HASH
-- ARGV[1] mode   'ids' (delete the ids that follow) or 'oldest' (delete up to ARGV[2] oldest)
-- ARGV    then the ids, or the count
-- Returns the ids deleted.

local doomed = {}
if ARGV[1] == 'oldest' then
  doomed = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
else
  local seen = {}
  for i = 2, #ARGV do
    local id = ARGV[i]
    if not seen[id] and redis.call('ZSCORE', KEYS[1], id) then
      seen[id] = true
      doomed[#doomed + 1] = id
    end
  end
end
if #doomed > 0 then
  redis.call('ZREM', KEYS[1], unpack(doomed))
  redis.call('HDEL', KEYS[2], unpack(doomed))
  redis.call('HINCRBY', KEYS[3], 'dead_deleted', #doomed)
end
return doomed
