-- limit: set or drain a topic's rate limit (the token bucket fetch.lua applies).
-- KEYS[1] limit  HASH  rate (per second), burst, tokens, at (ms of the last refill)
-- ARGV[1] 'set': rate = ARGV[2], burst = ARGV[3]; a changed limit keeps its tokens up to
--         the new burst, a new one starts full.
--         'drain': no token for ARGV[2] ms (a remote 429 said to wait); nothing without a
--         limit. Returns 1 when there was a limit, else 0.

if ARGV[1] == 'set' then
  local burst = tonumber(ARGV[3])
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or ARGV[3])
  redis.call('HSET', KEYS[1], 'rate', ARGV[2], 'burst', ARGV[3],
    'tokens', string.format('%.6f', math.min(tokens, burst)))
  return 1
elseif ARGV[1] == 'drain' then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return 0
  end
  local until_ms = now_ms() + tonumber(ARGV[2])
  local at = tonumber(redis.call('HGET', KEYS[1], 'at') or '0')
  redis.call('HSET', KEYS[1], 'tokens', '0', 'at', string.format('%d', math.max(at, until_ms)))
  return 1
end
return redis.error_reply('ERR limit: unknown op ' .. tostring(ARGV[1]))
