-- Record a task outcome once. KEYS: job hash, results hash, events stream, manifest-due zset,
-- dead-letter stream.
-- ARGV: index, result JSON, now ms, item event JSON, events maxlen, outcome (`ok`|`fail`), error,
-- dead maxlen, attempts, task JSON, job id.
-- Returns `{status, final_state}`; status is one of `recorded`, `finished`, `duplicate`,
-- `canceled`, `missing`.
--
-- A success that arrives after the task was recorded as failed (its worker stalled past the lease,
-- another worker dead-lettered it, then the first one's upload landed) replaces the failure: the
-- image is in storage, so the job counts it and the manifest lists it.
-- A final failure appends its dead letter here, in the same step, so a crash cannot record the
-- failure and lose the dead letter. A job that becomes terminal (or changes its terminal counts) is
-- marked in the manifest-due set in the same step; the marker goes only when a manifest written
-- after it is stored (see `manifest.rs`).
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'missing', ''} end
if st == 'CANCELED' then return {'canceled', st} end
local ok_outcome = ARGV[6] == 'ok'
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  -- Recorded before: only a success over a recorded failure goes on.
  local was_failed = false
  if ok_outcome then
    local okp, r = pcall(cjson.decode, redis.call('HGET', KEYS[2], ARGV[1]))
    was_failed = okp and type(r) == 'table' and r.status == 'failed'
  end
  if not was_failed then return {'duplicate', st} end
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'failed', -1)
  redis.call('HINCRBY', KEYS[1], 'succeeded', 1)
elseif ok_outcome then
  redis.call('HINCRBY', KEYS[1], 'succeeded', 1)
else
  redis.call('HINCRBY', KEYS[1], 'failed', 1)
  redis.call('HSET', KEYS[1], 'last_error', ARGV[7])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'job', ARGV[11], 'index', ARGV[1],
    'error', ARGV[7], 'attempts', ARGV[9], 't', ARGV[10])
end
local now = ARGV[3]
if st == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'started_ms', now)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'at', now, 'e', ARGV[4])
local v = redis.call('HMGET', KEYS[1], 'total', 'succeeded', 'failed')
local total, ok, failed = tonumber(v[1]), tonumber(v[2] or '0'), tonumber(v[3] or '0')
if ok + failed >= total then
  local final = 'PARTIAL'
  if failed == 0 then final = 'SUCCEEDED' elseif ok == 0 then final = 'FAILED' end
  redis.call('HSET', KEYS[1], 'state', final)
  if redis.call('HEXISTS', KEYS[1], 'finished_ms') == 0 then
    redis.call('HSET', KEYS[1], 'finished_ms', now)
  end
  redis.call('ZADD', KEYS[4], now, ARGV[11])
  local ev = cjson.encode({type = 'job_finished', state = final,
    counts = {total = total, succeeded = ok, failed = failed, canceled = 0}})
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'at', now, 'e', ev)
  return {'finished', final}
end
return {'recorded', 'RUNNING'}
