-- group_set: set or remove the settings of one fair group (see prelude.lua).
-- KEYS[1] gconf  HASH  group -> "<max_active> <weight> <paused>"
-- KEYS[2] wake   LIST
-- ARGV[1] the group; ARGV[2] its settings, or '' to remove them (the defaults: no cap,
-- weight 1, not paused)
-- Returns 1 when the group had settings before, else 0.

local had = redis.call('HEXISTS', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
-- A resumed group or a higher cap lets a waiting worker take more now.
wake(KEYS[2])
return had
