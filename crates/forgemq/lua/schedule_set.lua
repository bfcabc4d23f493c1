-- schedule_set: create, change or remove a schedule (its state, in its topic's slot).
-- KEYS[1] schedule HASH: spec (JSON), rev, next (ms), anchor (ms), last, fired
-- ARGV[1] 'set', 'copy' or 'del'
-- set: ARGV[2] spec, ARGV[3] rev (a hash of the spec), ARGV[4] the first fire time (ms)
--      for a new or changed spec, ARGV[5] anchor (ms; every-N schedules count from it).
--      An unchanged spec (same rev) keeps its next fire time.
--      Returns {1, next} when it was written, {0, next} when it was unchanged.
-- copy: writes the fields given as pairs in ARGV[2..] only if the schedule does not exist
--      (moving a schedule to its topic's new layout never overwrites a newer spec).
--      Returns 1 when it wrote them, else 0.
-- del: returns 1 when it existed, else 0.

if ARGV[1] == 'del' then
  return redis.call('DEL', KEYS[1])
end
if ARGV[1] == 'copy' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  return 1
end
local rev = redis.call('HGET', KEYS[1], 'rev')
if rev == ARGV[3] then
  return {0, redis.call('HGET', KEYS[1], 'next')}
end
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'rev', ARGV[3], 'next', ARGV[4], 'anchor', ARGV[5])
return {1, ARGV[4]}
