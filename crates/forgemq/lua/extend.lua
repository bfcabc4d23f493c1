-- extend: renew the leases of deliveries still being handled.
-- KEYS[1] active  ZSET
-- KEYS[2] lease   HASH
-- ARGV[1] lease_ms  new lease length, from now (Redis clock)
-- ARGV    then pairs: token, id
-- Returns one integer per pair: 1 renewed, 0 lease lost (the handler is told).

local ids = {}
for i = 3, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
end
local owners = redis.call('HMGET', KEYS[2], unpack(ids))
local deadline = string.format('%d', now_ms() + tonumber(ARGV[1]))
local results, zargs = {}, {}
for i, id in ipairs(ids) do
  if owners[i] == ARGV[2 * i] then
    results[i] = 1
    zargs[#zargs + 1] = deadline
    zargs[#zargs + 1] = id
  else
    results[i] = 0
  end
end

if #zargs > 0 then
  redis.call('ZADD', KEYS[1], 'XX', unpack(zargs))
end
return results
