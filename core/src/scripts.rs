//! The Lua scripts behind every multi-key (or read-check-write) transition of the queue.
//!
//! Cluster note: a script touches either the keys of ONE job (`pf:job:{id}…`, which share the hash
//! tag `{id}`) or ONE lane stream, never both, so every script is single-slot. Where a transition
//! spans a job and a lane (record a result, then acknowledge the entry), the job script runs first
//! and is idempotent, so a crash between the two only causes a redelivery that records nothing.

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

/// Cancel a job. KEYS: job hash, events. ARGV: now, maxlen.
/// Returns `{code, state}`: code 1 cancelled now, 0 already terminal, -1 missing.
const CANCEL: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {-1, ''} end
if st ~= 'QUEUED' and st ~= 'RUNNING' then return {0, st} end
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

/// Acknowledge and delete entries (they are done; deleting keeps streams short). KEYS: lane.
/// ARGV: group, ids…
const ACK: &str = r#"
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return n
"#;

/// Re-enqueue a failed task for another attempt, if the caller still owns it. KEYS: lane.
/// ARGV: group, consumer, id, task JSON, lease ms. Returns the new entry id or false.
const REQUEUE: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return false end
local nid = redis.call('XADD', KEYS[1], '*', 't', ARGV[4], 'l', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return nid
"#;

pub(crate) struct Scripts {
    pub record: Script,
    pub mark_started: Script,
    pub note_error: Script,
    pub cancel: Script,
    pub reclaim: Script,
    pub extend: Script,
    pub ack: Script,
    pub requeue: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            record: Script::new(RECORD),
            mark_started: Script::new(MARK_STARTED),
            note_error: Script::new(NOTE_ERROR),
            cancel: Script::new(CANCEL),
            reclaim: Script::new(RECLAIM),
            extend: Script::new(EXTEND),
            ack: Script::new(ACK),
            requeue: Script::new(REQUEUE),
        }
    }
}
