-- Cancel a job, and delete what is left of its backlogs (releasing the tenant's queued count, so
-- quotas free up at once), and mark its manifest due (a cancelled job gets a manifest of what it
-- did render). KEYS: job hash, events, manifest-due zset. ARGV: now, maxlen, job id, variants…
-- Returns `{code, state}`: code 1 cancelled now, 0 already terminal, -1 missing.
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {-1, ''} end
if st ~= 'QUEUED' and st ~= 'RUNNING' then return {0, st} end
local info = redis.call('HMGET', KEYS[1], 'tenant', 'priority')
if info[1] and info[2] then
  for i = 4, #ARGV do
    pf_drop_backlog(ARGV[3], info[1], info[2] .. ':' .. ARGV[i])
  end
end
local v = redis.call('HMGET', KEYS[1], 'total', 'succeeded', 'failed')
local total, ok, failed = tonumber(v[1]), tonumber(v[2] or '0'), tonumber(v[3] or '0')
local canceled = total - ok - failed
redis.call('HSET', KEYS[1], 'state', 'CANCELED', 'canceled', canceled, 'finished_ms', ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[3])
local ev = cjson.encode({type = 'job_finished', state = 'CANCELED',
  counts = {total = total, succeeded = ok, failed = failed, canceled = canceled}})
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'at', ARGV[1], 'e', ev)
return {1, 'CANCELED'}
