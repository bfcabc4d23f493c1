-- heartbeat: a worker says it is alive (or, with an empty description, that it stopped).
-- KEYS[1] heartbeats  ZSET  worker id -> when its entry expires (ms, Redis clock)
-- KEYS[2] info        HASH  worker id -> '<last heartbeat ms> <description JSON>'
-- KEYS[3] started     HASH  worker id -> its first heartbeat (ms)
-- ARGV[1] worker id
-- ARGV[2] description; '' removes the worker (it stopped)
-- ARGV[3] ttl_ms: how long the entry stands without another heartbeat
-- Entries past their expiry are removed here, whoever's heartbeat it is, and the keys
-- themselves expire when no worker is left to beat: nothing outlives its workers.
-- Returns the Redis time (ms).

local now = now_ms()
local id = ARGV[1]
local ttl = tonumber(ARGV[3])
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
else
  redis.call('ZADD', KEYS[1], now + ttl, id)
  redis.call('HSET', KEYS[2], id, string.format('%d', now) .. ' ' .. ARGV[2])
  redis.call('HSETNX', KEYS[3], id, string.format('%d', now))
  -- Only ever later: a worker with a shorter ttl must not cut a longer one's short.
  for i = 1, 3 do
    if redis.call('PTTL', KEYS[i]) < ttl then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  end
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 100)
if #stale > 0 then
  redis.call('ZREM', KEYS[1], unpack(stale))
  redis.call('HDEL', KEYS[2], unpack(stale))
  redis.call('HDEL', KEYS[3], unpack(stale))
end
return now
