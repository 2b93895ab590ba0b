-- First (often only) chunk of a submit: admission (queued-task quota, then the rate limit's
-- token bucket on Redis' clock), the job record and indexes, the first tasks into the backlog,
-- refill. A refusal writes nothing and releases the idempotency key this submit claimed, so a
-- retry after the hint is a fresh submit.
-- KEYS: job hash, controls hash, events, tenant hash, rate bucket, jobs zset, tenant jobs zset,
-- idempotency key.
-- ARGV: job id, tenant, now, events maxlen, queued event JSON, total tasks, max queued (0 = none),
-- max in flight (0 = none), rate per s (0 = none), burst, idempotency value ('' = none), stream
-- target, quantum, 2×fields, field/value…, 2×controls, index/bytes…, then task sections.
-- Returns `{'ok', moved}`, `{'queued', queued now, limit}` or `{'rate', retry after ms}`.
local total, maxq = tonumber(ARGV[6]), tonumber(ARGV[7])
local function release_idem()
  if ARGV[11] ~= '' and redis.call('GET', KEYS[8]) == ARGV[11] then redis.call('DEL', KEYS[8]) end
end
local queued = tonumber(redis.call('HGET', KEYS[4], 'queued')) or 0
if maxq > 0 and queued + total > maxq then
  release_idem()
  return {'queued', queued, maxq}
end
local rate, burst = tonumber(ARGV[9]), tonumber(ARGV[10])
local tokens, now_srv = 0, 0
if rate > 0 then
  local t = redis.call('TIME')
  now_srv = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', KEYS[5], 'tokens', 'ts')
  tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now_srv
  tokens = math.min(burst, tokens + math.max(0, now_srv - ts) * rate / 1000)
  if tokens < 1 then
    release_idem()
    return {'rate', math.ceil((1 - tokens) * 1000 / rate)}
  end
  redis.call('HSET', KEYS[5], 'tokens', tostring(tokens - 1), 'ts', string.format('%d', now_srv))
  redis.call('PEXPIRE', KEYS[5], math.ceil(burst * 1000 / rate) + 1000)
end
redis.call('HSET', KEYS[4], 'max_in_flight', ARGV[8])
local i = 14
local nf = tonumber(ARGV[i])
pf_hset_range(KEYS[1], i + 1, i + nf)
i = i + nf + 1
local nc = tonumber(ARGV[i])
pf_hset_range(KEYS[2], i + 1, i + nc)
i = i + nc + 1
redis.call('ZADD', KEYS[6], 0, ARGV[1])
redis.call('ZADD', KEYS[7], 0, ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'at', ARGV[3], 'e', ARGV[5])
return {'ok', pf_push(ARGV[1], ARGV[2], i, tonumber(ARGV[12]), tonumber(ARGV[13]))}
