-- watch: a caller waits for a message to finish (Client::wait_result). The final states
-- (settle, cancel, recover, purge) push one token per registered waiter on the list
-- `<waiters>:<id>`, on which the caller blocks.
-- KEYS[1] msg      HASH
-- KEYS[2] dead     ZSET
-- KEYS[3] waiters  HASH  id -> callers waiting for it to finish
-- ARGV[1] id
-- ARGV[2] 'add': register a waiter if the message is there and not dead; 'drop': take one
--         back (its wait timed out).
-- Returns 1 registered (wait for the token), 0 otherwise (for 'add': it has finished or
-- is unknown; read its status).

local id = ARGV[1]
if ARGV[2] == 'drop' then
  local n = tonumber(redis.call('HGET', KEYS[3], id))
  if n and n > 1 then
    redis.call('HINCRBY', KEYS[3], id, -1)
  elseif n then
    redis.call('HDEL', KEYS[3], id)
  end
  return 0
end
if redis.call('HEXISTS', KEYS[1], id) == 0 or redis.call('ZSCORE', KEYS[2], id) then
  return 0
end
redis.call('HINCRBY', KEYS[3], id, 1)
return 1
