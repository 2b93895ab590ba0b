-- Commit a submit, all or nothing: the idempotency check, admission (queued-task quota, then the
-- rate limit's token bucket on Redis' clock), the job record and indexes, the staged chunks of a
-- big job (see `stage.lua`) and the last chunk into the backlog, refill, and only then the
-- idempotency key. A refusal writes nothing and drops the staged chunks; a key that is already
-- there returns its job and drops them too, so a retried or concurrent submit never makes a
-- second job and never answers with the id of a job that was not made.
-- KEYS: job hash, controls hash, events, tenant hash, rate bucket, jobs zset, tenant jobs zset,
-- idempotency key.
-- ARGV: job id, tenant, now, events maxlen, queued event JSON, total tasks, max queued (0 = none),
-- max in flight (0 = none), rate per s (0 = none), burst, idempotency value ('' = none), stream
-- target, quantum, idempotency ttl s, staged lane count, lane/n…, 2×fields, field/value…,
-- 2×controls, index/bytes…, then the last chunk's task sections.
-- Returns `{'ok', moved}`, `{'exists', "job digest"}`, `{'queued', queued now, limit}`,
-- `{'rate', retry after ms}` or `{'stage', lane}` (a staged chunk is gone: submit again).
local job = ARGV[1]
local total, maxq = tonumber(ARGV[6]), tonumber(ARGV[7])
local i = 15
local nstaged = tonumber(ARGV[i])
local staged = {}
for s = 1, nstaged do
  staged[s] = {ARGV[i + 2 * s - 1], tonumber(ARGV[i + 2 * s])}
end
i = i + 2 * nstaged + 1
local function stage_key(lane) return 'pf:job:{' .. job .. '}:stage:' .. lane end
local function drop_staged()
  for _, s in ipairs(staged) do redis.call('DEL', stage_key(s[1])) end
end
if ARGV[11] ~= '' then
  local existing = redis.call('GET', KEYS[8])
  if existing then
    drop_staged()
    return {'exists', existing}
  end
end
for _, s in ipairs(staged) do
  if redis.call('LLEN', stage_key(s[1])) ~= s[2] then
    drop_staged()
    return {'stage', s[1]}
  end
end
local queued = tonumber(redis.call('HGET', KEYS[4], 'queued')) or 0
if maxq > 0 and queued + total > maxq then
  drop_staged()
  return {'queued', queued, maxq}
end
local rate, burst = tonumber(ARGV[9]), tonumber(ARGV[10])
if rate > 0 then
  local t = redis.call('TIME')
  local now_srv = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', KEYS[5], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now_srv
  tokens = math.min(burst, tokens + math.max(0, now_srv - ts) * rate / 1000)
  if tokens < 1 then
    drop_staged()
    return {'rate', math.ceil((1 - tokens) * 1000 / rate)}
  end
  redis.call('HSET', KEYS[5], 'tokens', tostring(tokens - 1), 'ts', string.format('%d', now_srv))
  redis.call('PEXPIRE', KEYS[5], math.ceil(burst * 1000 / rate) + 1000)
end
redis.call('HSET', KEYS[4], 'max_in_flight', ARGV[8])
local nf = tonumber(ARGV[i])
pf_hset_range(KEYS[1], i + 1, i + nf)
i = i + nf + 1
local nc = tonumber(ARGV[i])
pf_hset_range(KEYS[2], i + 1, i + nc)
i = i + nc + 1
redis.call('ZADD', KEYS[6], 0, job)
redis.call('ZADD', KEYS[7], 0, job)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'at', ARGV[3], 'e', ARGV[5])
-- The staged chunks become the job's backlogs (they hold the lowest indices, so order is kept).
local target, quantum = tonumber(ARGV[12]), tonumber(ARGV[13])
local moved = 0
for _, s in ipairs(staged) do
  local lane, n = s[1], s[2]
  if n > 0 then
    redis.call('RENAME', stage_key(lane), 'pf:job:{' .. job .. '}:backlog:' .. lane)
    redis.call('PERSIST', 'pf:job:{' .. job .. '}:backlog:' .. lane)
    local tq = 'pf:fair:' .. lane .. ':t:' .. ARGV[2]
    redis.call('RPUSH', tq, job)
    if redis.call('LLEN', tq) == 1 then
      redis.call('RPUSH', 'pf:fair:' .. lane .. ':ring', ARGV[2])
    end
    redis.call('HINCRBY', 'pf:tenant:' .. ARGV[2], 'queued', n)
    redis.call('HINCRBY', 'pf:fair:backlog', lane, n)
    moved = moved + pf_refill(lane, target, quantum)
  end
end
moved = moved + pf_push(job, ARGV[2], i, target, quantum)
if ARGV[11] ~= '' then
  redis.call('SET', KEYS[8], ARGV[11], 'EX', ARGV[14])
end
return {'ok', moved}
