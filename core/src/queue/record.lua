-- Record a task outcome once. KEYS: job hash, results hash, events stream.
-- ARGV: index, result JSON, now ms, item event JSON, events maxlen, outcome (`ok`|`fail`), error.
-- Returns `{status, final_state}`; status is one of `recorded`, `finished`, `duplicate`,
-- `canceled`, `missing`.
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'missing', ''} end
if st == 'CANCELED' then return {'canceled', st} end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return {'duplicate', st} end
local now = ARGV[3]
if ARGV[6] == 'ok' then
  redis.call('HINCRBY', KEYS[1], 'succeeded', 1)
else
  redis.call('HINCRBY', KEYS[1], 'failed', 1)
  redis.call('HSET', KEYS[1], 'last_error', ARGV[7])
end
if st == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'started_ms', now)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'at', now, 'e', ARGV[4])
local v = redis.call('HMGET', KEYS[1], 'total', 'succeeded', 'failed')
local total, ok, failed = tonumber(v[1]), tonumber(v[2] or '0'), tonumber(v[3] or '0')
if ok + failed >= total then
  local final = 'PARTIAL'
  if failed == 0 then final = 'SUCCEEDED' elseif ok == 0 then final = 'FAILED' end
  redis.call('HSET', KEYS[1], 'state', final, 'finished_ms', now)
  local ev = cjson.encode({type = 'job_finished', state = final,
    counts = {total = total, succeeded = ok, failed = failed, canceled = 0}})
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'at', now, 'e', ev)
  return {'finished', final}
end
return {'recorded', 'RUNNING'}
