-- Note a retried failure on a job that is still going and whose task is not recorded yet (a
-- stale failure must not touch a finished job or an image already recorded).
-- KEYS: job hash, events, results hash. ARGV: now, event JSON, maxlen, error, index.
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'QUEUED' and st ~= 'RUNNING' then return 0 end
if redis.call('HEXISTS', KEYS[3], ARGV[5]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'last_error', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'at', ARGV[1], 'e', ARGV[2])
return 1
