-- consumers: a worker says how it consumes one topic (or, with concurrency '', that it
-- stopped), in the topic's slot, for the topic's own view of who consumes it.
-- KEYS[1] workers  HASH  worker id -> 'concurrency,in_flight,expires_ms'
-- ARGV[1] worker id
-- ARGV[2] concurrency ('' removes the worker)
-- ARGV[3] in flight
-- ARGV[4] ttl_ms: how long the entry stands without another heartbeat
-- Entries past their expiry are removed here, and the key expires when no worker is left.
-- Returns 1.

local now = now_ms()
local ttl = tonumber(ARGV[4])
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1],
    ARGV[2] .. ',' .. ARGV[3] .. ',' .. string.format('%d', now + ttl))
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end
-- A topic has a few workers, not thousands: reading them all is cheap.
local all = redis.call('HGETALL', KEYS[1])
local stale = {}
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], ',(%d+)$') or '0')
  if expires < now then
    stale[#stale + 1] = all[i]
  end
end
if #stale > 0 then
  redis.call('HDEL', KEYS[1], unpack(stale))
end
return 1
