//! The Lua scripts behind every multi-key (or read-check-write) transition of the queue.
//!
//! Cluster note: a script touches either the keys of ONE job (`pf:job:{id}…`, which share the hash
//! tag `{id}`) or ONE lane stream, never both, so every script is single-slot. Where a transition
//! spans a job and a lane (record a result, then acknowledge the entry), the job script runs first
//! and is idempotent, so a crash between the two only causes a redelivery that records nothing.
//! The fair-share scripts (submit, append, refill, ack, cancel; see `crate::fair`) are the
//! exception: they move tasks between per-job backlogs, per-tenant counters and a lane stream in
//! one step, which is what keeps the counters exact, so they need one Redis (or Sentinel).

use redis::Script;

/// Record a task outcome once. KEYS: job hash, results hash, events stream.
/// ARGV: index, result JSON, now ms, item event JSON, events maxlen, outcome (`ok`|`fail`), error.
/// Returns `{status, final_state}`; status is one of `recorded`, `finished`, `duplicate`,
/// `canceled`, `missing`.
const RECORD: &str = r#"
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
"#;

/// QUEUED → RUNNING on first pickup. KEYS: job hash, events. ARGV: now, event JSON, maxlen.
const MARK_STARTED: &str = r#"
if redis.call('HGET', KEYS[1], 'state') == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'started_ms', ARGV[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'at', ARGV[1], 'e', ARGV[2])
  return 1
end
return 0
"#;

/// Note a retried failure. KEYS: job hash, events. ARGV: now, event JSON, maxlen, error.
const NOTE_ERROR: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 0 end
redis.call('HSET', KEYS[1], 'last_error', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'at', ARGV[1], 'e', ARGV[2])
return 1
"#;

/// Cancel a job, and delete what is left of its backlogs (releasing the tenant's queued count, so
/// quotas free up at once). KEYS: job hash, events. ARGV: now, maxlen, job id, variants…
/// Returns `{code, state}`: code 1 cancelled now, 0 already terminal, -1 missing.
const CANCEL: &str = r#"
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
local ev = cjson.encode({type = 'job_finished', state = 'CANCELED',
  counts = {total = total, succeeded = ok, failed = failed, canceled = canceled}})
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'at', ARGV[1], 'e', ev)
return {1, 'CANCELED'}
"#;

/// Take over expired deliveries of one lane. KEYS: lane. ARGV: group, consumer, min idle ms (the
/// smallest lease), scan count, max to claim.
/// Returns `{{id, deliveries, {field, value, …}}, …}`. An entry is claimed only when it has been
/// idle (no delivery, no heartbeat) for at least its own lease (field `l`).
const RECLAIM: &str = r#"
local pend = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
local out = {}
local max = tonumber(ARGV[5])
for _, p in ipairs(pend) do
  if #out >= max then break end
  local id, idle, deliveries = p[1], tonumber(p[3]), tonumber(p[4])
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    local fields = e[1][2]
    local lease = tonumber(ARGV[3])
    for i = 1, #fields, 2 do
      if fields[i] == 'l' then lease = tonumber(fields[i + 1]) end
    end
    if idle >= lease then
      local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], lease, id)
      if #c > 0 and c[1] then
        out[#out + 1] = {id, deliveries + 1, c[1][2]}
      end
    end
  end
end
return out
"#;

/// Owner-checked lease extension. KEYS: lane. ARGV: group, consumer, ids…
/// Returns one 1/0 per id: 1 when the caller still owned it and its idle time was reset.
const EXTEND: &str = r#"
local res = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
return res
"#;

/// Acknowledge and delete entries (they are done; deleting keeps streams short), release their
/// tenant's counters (only when `XACK` says the entry was still pending, so a racing second
/// acknowledgement releases nothing), then refill the lane. KEYS: lane.
/// ARGV: group, lane name, stream target, quantum, ids…
const ACK: &str = r#"
local n = 0
for i = 5, #ARGV do
  local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if acked == 1 and #e == 1 then
    local f = e[1][2]
    for j = 1, #f, 2 do
      if f[j] == 'n' then
        local tk = 'pf:tenant:' .. f[j + 1]
        pf_dec(tk, 'in_flight', 1)
        pf_dec(tk, 'queued', 1)
      end
    end
  end
  n = n + acked
  redis.call('XDEL', KEYS[1], ARGV[i])
end
pf_refill(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
return n
"#;

/// Re-enqueue a failed task for another attempt, if the caller still owns it. The new entry keeps
/// the old one's tenant field, so the tenant's counters need no change. KEYS: lane.
/// ARGV: group, consumer, id, task JSON, lease ms. Returns the new entry id or false.
const REQUEUE: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return false end
local nid
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
local tenant = nil
if #e == 1 then
  local f = e[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'n' then tenant = f[j + 1] end
  end
end
if tenant then
  nid = redis.call('XADD', KEYS[1], '*', 't', ARGV[4], 'l', ARGV[5], 'n', tenant)
else
  nid = redis.call('XADD', KEYS[1], '*', 't', ARGV[4], 'l', ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return nid
"#;

/// Shared Lua functions, prepended to the scripts that move tasks between backlogs and lanes.
/// Key layout and invariants: see `crate::fair`.
const FAIR_LIB: &str = r#"
local function pf_dec(key, field, n)
  if redis.call('HINCRBY', key, field, -n) < 0 then redis.call('HSET', key, field, 0) end
end

-- Removes a job's backlog in one lane (cancel, or a job that vanished) and its ring entries.
local function pf_drop_backlog(job, tenant, lane)
  local bl = 'pf:job:{' .. job .. '}:backlog:' .. lane
  local n = redis.call('LLEN', bl)
  if n == 0 then return 0 end
  redis.call('DEL', bl)
  local tq = 'pf:fair:' .. lane .. ':t:' .. tenant
  redis.call('LREM', tq, 0, job)
  pf_dec('pf:tenant:' .. tenant, 'queued', n)
  pf_dec('pf:fair:backlog', lane, n)
  if redis.call('LLEN', tq) == 0 then
    redis.call('LREM', 'pf:fair:' .. lane .. ':ring', 0, tenant)
    redis.call('HDEL', 'pf:fair:' .. lane .. ':deficit', tenant)
    if redis.call('GET', 'pf:fair:' .. lane .. ':turn') == tenant then
      redis.call('DEL', 'pf:fair:' .. lane .. ':turn')
    end
  end
  return n
end

-- Deficit round robin: moves backlog tasks of `lane` (e.g. 'normal:base') into its stream until
-- the stream holds `target` undelivered entries. The ring's head tenant has the turn; a turn
-- adds `quantum` to its deficit once (the `turn` key remembers a turn cut short by a full
-- stream); each moved task costs 1. A tenant at its in-flight limit is passed over (and loses
-- its credit); a tenant whose backlog runs dry leaves the ring. Returns the tasks moved.
local function pf_refill(lane, target, quantum)
  local ring = 'pf:fair:' .. lane .. ':ring'
  local nring = redis.call('LLEN', ring)
  if nring == 0 then return 0 end
  local stream = 'pf:lane:' .. lane
  local pending = 0
  local p = redis.pcall('XPENDING', stream, 'workers')
  if type(p) == 'table' and p[1] then pending = tonumber(p[1]) or 0 end
  local room = target - (redis.call('XLEN', stream) - pending)
  if room <= 0 then return 0 end
  local dkey = 'pf:fair:' .. lane .. ':deficit'
  local turnkey = 'pf:fair:' .. lane .. ':turn'
  local moved, idle, guard = 0, 0, 0
  while room > 0 and guard < 100000 do
    guard = guard + 1
    local tenant = redis.call('LINDEX', ring, 0)
    if not tenant then break end
    local tkey = 'pf:tenant:' .. tenant
    local tq = 'pf:fair:' .. lane .. ':t:' .. tenant
    local deficit = tonumber(redis.call('HGET', dkey, tenant)) or 0
    if redis.call('GET', turnkey) ~= tenant then
      deficit = deficit + quantum
      redis.call('SET', turnkey, tenant)
    end
    local lim = redis.call('HMGET', tkey, 'in_flight', 'max_in_flight')
    local inflight, maxif = tonumber(lim[1]) or 0, tonumber(lim[2]) or 0
    local sent, blocked = 0, false
    while deficit >= 1 and room > 0 do
      if maxif > 0 and inflight >= maxif then blocked = true break end
      local job = redis.call('LINDEX', tq, 0)
      if not job then break end
      local st = redis.call('HGET', 'pf:job:{' .. job .. '}', 'state')
      if (not st) or st == 'CANCELED' then
        if pf_drop_backlog(job, tenant, lane) == 0 then redis.call('LREM', tq, 0, job) end
        if redis.call('LLEN', tq) == 0 then break end
      else
        local bl = 'pf:job:{' .. job .. '}:backlog:' .. lane
        local t = redis.call('LPOP', bl)
        if redis.call('LLEN', bl) == 0 then redis.call('LPOP', tq) end
        if t then
          local sp = string.find(t, ' ', 1, true)
          redis.call('XADD', stream, '*', 't', string.sub(t, sp + 1), 'l', string.sub(t, 1, sp - 1), 'n', tenant)
          inflight = inflight + 1
          deficit = deficit - 1
          room = room - 1
          moved = moved + 1
          sent = sent + 1
        end
      end
    end
    if sent > 0 then
      redis.call('HINCRBY', tkey, 'in_flight', sent)
      pf_dec('pf:fair:backlog', lane, sent)
      idle = 0
    elseif blocked then
      idle = idle + 1
    end
    if redis.call('LLEN', tq) == 0 then
      -- The tenant has nothing left here (a cancel may already have removed it from the ring).
      if redis.call('LINDEX', ring, 0) == tenant then redis.call('LPOP', ring) end
      redis.call('HDEL', dkey, tenant)
      redis.call('DEL', turnkey)
    elseif blocked or deficit < 1 then
      if blocked then deficit = 0 end
      redis.call('HSET', dkey, tenant, deficit)
      redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      redis.call('DEL', turnkey)
    else
      redis.call('HSET', dkey, tenant, deficit)
    end
    if idle > 0 and idle >= redis.call('LLEN', ring) then break end
  end
  return moved
end

-- Appends the task sections starting at ARGV[start] (count, then per section: lane, n, n entries)
-- to the job's backlogs, registers job and tenant for refill, counts them as queued, refills.
local function pf_push(job, tenant, start, target, quantum)
  local i = start
  local nsec = tonumber(ARGV[i])
  i = i + 1
  local moved = 0
  for _ = 1, nsec do
    local lane, n = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if n > 0 then
      local bl = 'pf:job:{' .. job .. '}:backlog:' .. lane
      local was = redis.call('LLEN', bl)
      local j = i
      while j < i + n do
        local e = math.min(j + 999, i + n - 1)
        redis.call('RPUSH', bl, unpack(ARGV, j, e))
        j = e + 1
      end
      if was == 0 then
        local tq = 'pf:fair:' .. lane .. ':t:' .. tenant
        redis.call('RPUSH', tq, job)
        if redis.call('LLEN', tq) == 1 then
          redis.call('RPUSH', 'pf:fair:' .. lane .. ':ring', tenant)
        end
      end
      redis.call('HINCRBY', 'pf:tenant:' .. tenant, 'queued', n)
      redis.call('HINCRBY', 'pf:fair:backlog', lane, n)
      moved = moved + pf_refill(lane, target, quantum)
    end
    i = i + n
  end
  return moved
end

local function pf_hset_range(key, first, last)
  local j = first
  while j < last do
    local e = math.min(j + 999, last)
    redis.call('HSET', key, unpack(ARGV, j, e))
    j = e + 1
  end
end
"#;

/// First (often only) chunk of a submit: admission (queued-task quota, then the rate limit's
/// token bucket on Redis' clock), the job record and indexes, the first tasks into the backlog,
/// refill. A refusal writes nothing and releases the idempotency key this submit claimed, so a
/// retry after the hint is a fresh submit.
/// KEYS: job hash, controls hash, events, tenant hash, rate bucket, jobs zset, tenant jobs zset,
/// idempotency key.
/// ARGV: job id, tenant, now, events maxlen, queued event JSON, total tasks, max queued (0 = none),
/// max in flight (0 = none), rate per s (0 = none), burst, idempotency value ('' = none), stream
/// target, quantum, 2×fields, field/value…, 2×controls, index/bytes…, then task sections.
/// Returns `{'ok', moved}`, `{'queued', queued now, limit}` or `{'rate', retry after ms}`.
const SUBMIT: &str = r#"
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
"#;

/// A further chunk of a big submit. Nothing is added to a job cancelled (or gone) meanwhile.
/// KEYS: job hash. ARGV: job id, tenant, stream target, quantum, task sections.
/// Returns the tasks refill moved, or -1 for a cancelled job.
const APPEND: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if (not st) or st == 'CANCELED' then return -1 end
return pf_push(ARGV[1], ARGV[2], 5, tonumber(ARGV[3]), tonumber(ARGV[4]))
"#;

/// Refill lanes before a pull (a no-op when their streams are full). KEYS: none (the lane keys are
/// derived, see the cluster note in `crate::fair`). ARGV: stream target, quantum, lane names….
const REFILL: &str = r#"
local moved = 0
for i = 3, #ARGV do
  moved = moved + pf_refill(ARGV[i], tonumber(ARGV[1]), tonumber(ARGV[2]))
end
return moved
"#;

fn with_lib(body: &str) -> Script {
    Script::new(&format!("{FAIR_LIB}\n{body}"))
}

pub(crate) struct Scripts {
    pub record: Script,
    pub mark_started: Script,
    pub note_error: Script,
    pub cancel: Script,
    pub reclaim: Script,
    pub extend: Script,
    pub ack: Script,
    pub requeue: Script,
    pub submit: Script,
    pub append: Script,
    pub refill: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            record: Script::new(RECORD),
            mark_started: Script::new(MARK_STARTED),
            note_error: Script::new(NOTE_ERROR),
            cancel: with_lib(CANCEL),
            reclaim: Script::new(RECLAIM),
            extend: Script::new(EXTEND),
            ack: with_lib(ACK),
            requeue: Script::new(REQUEUE),
            submit: with_lib(SUBMIT),
            append: with_lib(APPEND),
            refill: with_lib(REFILL),
        }
    }
}
