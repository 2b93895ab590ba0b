//! The Redis queue: jobs, task lanes (Streams + consumer group), leases, retries, dead letters,
//! per-job events and results, and the worker registry.
//!
//! # Keys
//! | key | type | what |
//! |---|---|---|
//! | `pf:lane:{priority}:{variant}` | stream, group `workers` | one entry per task moved in from a backlog: `t` = task JSON, `l` = lease ms, `n` = tenant |
//! | `pf:job:{<id>}` | hash | job record: state, counts, timestamps, last error, manifest key |
//! | `pf:job:{<id>}:events` | stream, capped (`MAXLEN ~`) | `at` = unix ms, `e` = event JSON |
//! | `pf:job:{<id>}:results` | hash | image index → result JSON (recorded once, `HSETNX`) |
//! | `pf:job:{<id>}:controls` | hash | item index → inline control image bytes |
//! | `pf:dead` | stream, capped | dead-lettered tasks with their last error |
//! | `pf:idem:{tenant}:{key}` | string with TTL | `job_id spec_digest` |
//! | `pf:jobs`, `pf:jobs:t:{tenant}` | sorted sets (score 0) | job ids; UUIDv7 ids sort by time |
//! | `pf:worker:{id}` | string with TTL | worker registry entry (JSON) |
//! | `pf:workers` | set | ids of registered workers (stale ones are pruned on listing) |
//! | `pf:job:{<id>}:backlog:…`, `pf:fair:…`, `pf:tenant:…` | lists, hashes | per-tenant fair share: tasks wait in per-job backlogs and are moved into the lane stream in deficit-round-robin order; quotas and counters (see [`crate::fair`]) |
//!
//! # Leases
//! A delivered entry stays in the group's pending list (PEL). Its *idle time* is the lease clock:
//! delivery and the owner-checked heartbeat ([`Queue::extend_leases`], `XCLAIM … JUSTID`) reset it.
//! An entry idle for longer than its own lease (`l`, sized to steps × pixels at submit) is taken
//! over by the next puller ([`Queue::pull`] reclaims before reading new entries). The heartbeat
//! interval must be well below [`LeasePolicy::base_ms`].
//!
//! # Attempts
//! `attempt = prior_attempts + deliveries of this entry`. A failed attempt re-enqueues the task
//! with `prior_attempts` bumped (or dead-letters it when `attempt >= max_attempts` or the error is
//! permanent); a crashed delivery is counted by the PEL's delivery counter. Either way, after
//! `max_attempts` the task lands in `pf:dead` and is recorded as failed with its last error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use futures::future::try_join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use redis::{AsyncCommands, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tracing::{debug, info, instrument, warn};

use crate::error::{CoreError, Result};
use crate::fair::{BACKLOG_KEY, FairConfig, QuotaExceeded, QuotaKind, TenantQuota, TenantUsage};
use crate::model::{
    Event, EventKind, JobCounts, JobFilter, JobId, JobRecord, JobSpec, JobState, Lane, Page,
    PageRequest, Priority, ResultStatus, Task, TaskResult, TaskSpec, Variant, WorkerInfo,
};
use crate::now_ms;
use crate::scripts::Scripts;
use crate::storage::Storage;
use crate::validate::{LeasePolicy, Limits, assign_seeds, expand, manifest_key, validate_job};

/// The consumer group every lane stream has.
pub const GROUP: &str = "workers";
/// Dead-letter stream.
pub const DEAD_KEY: &str = "pf:dead";
const WORKERS_KEY: &str = "pf:workers";
const JOBS_KEY: &str = "pf:jobs";

fn job_key(job: &JobId) -> String {
    format!("pf:job:{{{job}}}")
}
fn events_key(job: &JobId) -> String {
    format!("pf:job:{{{job}}}:events")
}
fn results_key(job: &JobId) -> String {
    format!("pf:job:{{{job}}}:results")
}
fn controls_key(job: &JobId) -> String {
    format!("pf:job:{{{job}}}:controls")
}
fn tenant_jobs_key(tenant: &str) -> String {
    format!("pf:jobs:t:{tenant}")
}
fn idem_key(tenant: &str, key: &str) -> String {
    format!("pf:idem:{tenant}:{key}")
}
fn worker_key(id: &str) -> String {
    format!("pf:worker:{id}")
}

/// Queue behaviour. The defaults suit production; tests shrink the leases.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub limits: Limits,
    pub lease: LeasePolicy,
    /// Deliveries (crashes and failures together) before a task is dead-lettered.
    pub max_attempts: u32,
    /// Approximate cap of each job's event stream.
    pub events_maxlen: u64,
    /// Approximate cap of the dead-letter stream.
    pub dead_maxlen: u64,
    /// Tasks per pipelined write at submit (big jobs are written in chunks of this size).
    pub enqueue_chunk: usize,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// How often one queue handle looks for expired leases while pulling.
    pub reclaim_interval: Duration,
    /// How long a worker's registry entry lives without a heartbeat.
    pub worker_ttl: Duration,
    /// Redis response timeout for non-blocking commands (big pipelines need more than redis-rs'
    /// 500 ms default).
    pub response_timeout: Duration,
    /// Fair share between tenants: how lane streams are fed, and the per-tenant quotas.
    pub fair: FairConfig,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            lease: LeasePolicy::default(),
            max_attempts: 3,
            events_maxlen: 10_000,
            dead_maxlen: 100_000,
            enqueue_chunk: 5_000,
            idempotency_ttl: Duration::from_secs(7 * 24 * 3600),
            reclaim_interval: Duration::from_secs(1),
            worker_ttl: Duration::from_secs(30),
            response_timeout: Duration::from_secs(30),
            fair: FairConfig::default(),
        }
    }
}

/// What `submit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub job: JobId,
    /// `false` when an idempotency key matched an earlier submit (nothing was enqueued).
    pub created: bool,
    /// Images (tasks) of the job.
    pub total: u64,
}

/// What `complete` (or a final `fail`) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded; the job goes on.
    Recorded,
    /// Recorded, and it was the job's last task: the job is now in this terminal state. The caller
    /// should write the manifest ([`Queue::write_manifest`]).
    JobFinished(JobState),
    /// Another worker already recorded this task (a lease race); nothing was written.
    Duplicate,
    /// The job was cancelled; nothing was written (the caller may delete its upload).
    Canceled,
    /// The job no longer exists.
    Missing,
}

/// What `fail` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Re-enqueued for another attempt.
    Retrying { attempt: u32 },
    /// Lease lost meanwhile: another worker owns the task, nothing was done.
    NotOwner,
    /// Attempts exhausted (or permanent): dead-lettered and recorded as failed.
    DeadLettered(Recorded),
}

/// A dead-lettered task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: String,
    pub job: JobId,
    pub index: u64,
    pub error: String,
    pub attempts: u32,
    pub task: TaskSpec,
}

/// Depth of one lane, for autoscaling (KEDA) and benchmarks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneStats {
    pub lane: Lane,
    /// Entries in the stream (waiting + delivered but not yet acknowledged).
    pub length: u64,
    /// Delivered and not yet acknowledged.
    pub pending: u64,
}

/// A handle on the queue. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Queue {
    client: redis::Client,
    conn: ConnectionManager,
    /// Blocking reads (`XREADGROUP BLOCK`) get their own connection so they never stall the
    /// multiplexed one that everything else shares.
    blocking: Arc<Mutex<Option<ConnectionManager>>>,
    config: Arc<QueueConfig>,
    scripts: Arc<Scripts>,
    last_reclaim: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Connects (the connection manager reconnects by itself after a Redis restart) and makes sure
    /// every lane stream and its consumer group exist.
    pub async fn connect(url: &str, config: QueueConfig) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| CoreError::Config(format!("invalid Redis URL `{url}`: {e}")))?;
        let conn = ConnectionManager::new_with_config(
            client.clone(),
            Self::manager_config(&config, false),
        )
        .await?;
        let q = Self {
            client,
            conn,
            blocking: Arc::new(Mutex::new(None)),
            config: Arc::new(config),
            scripts: Arc::new(Scripts::new()),
            last_reclaim: Arc::new(std::sync::Mutex::new(None)),
        };
        q.ensure_groups().await?;
        Ok(q)
    }

    fn manager_config(config: &QueueConfig, blocking: bool) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_response_timeout(if blocking {
                None
            } else {
                Some(config.response_timeout)
            })
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(6)
            .set_max_delay(Duration::from_secs(2))
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// A connection for ad-hoc commands (benchmarks, tests, admin tools).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Creates the lane streams and the `workers` group (idempotent; also after a Redis restart
    /// that lost data).
    pub async fn ensure_groups(&self) -> Result<()> {
        let mut c = self.conn.clone();
        for lane in Lane::all() {
            let r: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(lane.key())
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut c)
                .await;
            match r {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------------
    // Client side
    // ------------------------------------------------------------------------------------------

    /// Validates and enqueues a job: one stream entry per image. Nothing is written for an invalid
    /// job. With an idempotency key, a repeated submit of the same spec returns the first job
    /// (`created: false`); the same key with a different spec is a `Conflict`. A tenant over its
    /// `max_queued_tasks` quota or its submit rate gets `QuotaExceeded` (with a retry hint for
    /// the rate), and nothing is written. Tasks go to the job's fair-share backlog and reach the
    /// lane streams through the refill (see [`crate::fair`]).
    #[instrument(skip_all, fields(tenant = %spec.tenant, items = spec.items.len()))]
    pub async fn submit(&self, mut spec: JobSpec) -> Result<Submitted> {
        validate_job(&spec, &self.config.limits).map_err(CoreError::Invalid)?;
        let digest = spec_digest(&spec);
        let job = JobId::new();
        let total = spec.total_images();
        let mut c = self.conn.clone();

        if let Some(key) = &spec.idempotency_key {
            let ik = idem_key(&spec.tenant, key);
            let value = format!("{job} {digest}");
            let set: Option<String> = redis::cmd("SET")
                .arg(&ik)
                .arg(&value)
                .arg("NX")
                .arg("EX")
                .arg(self.config.idempotency_ttl.as_secs().max(1))
                .query_async(&mut c)
                .await?;
            if set.is_none() {
                let existing: Option<String> = c.get(&ik).await?;
                if let Some(existing) = existing {
                    let (id, d) = existing.split_once(' ').unwrap_or((&existing, ""));
                    if d != digest {
                        return Err(CoreError::Conflict(format!(
                            "idempotency key `{key}` was used for a different job ({id})"
                        )));
                    }
                    let id = JobId(id.to_string());
                    info!(job = %id, "idempotent resubmit, returning the existing job");
                    return Ok(Submitted {
                        job: id,
                        created: false,
                        total,
                    });
                }
                // Expired between SET and GET: fall through and claim it now.
                let _: () = c
                    .set_ex(&ik, &value, self.config.idempotency_ttl.as_secs().max(1))
                    .await?;
            }
        }

        assign_seeds(&mut spec);
        let tasks = expand(&job, &spec, &self.config.lease);
        let now = now_ms();
        let jk = job_key(&job);
        let labels =
            serde_json::to_string(&spec.labels).map_err(|e| CoreError::corrupt("labels", e))?;

        // The job record, inline control images, indexes and the first chunk of tasks go in one
        // script, after the tenant's quota and rate limit admit the job; bigger jobs continue in
        // further chunks (each one atomic). Tasks land in the job's backlog and reach the lane
        // streams through the fair-share refill (see `crate::fair`).
        let quota = self.config.fair.quotas.for_tenant(&spec.tenant);
        let ev = event_json(&EventKind::Queued { total })?;
        let fields: Vec<(&str, String)> = vec![
            ("id", job.to_string()),
            ("tenant", spec.tenant.clone()),
            ("state", JobState::Queued.as_str().to_string()),
            ("priority", spec.priority.as_str().to_string()),
            ("prefix", spec.output_prefix.clone()),
            ("labels", labels),
            ("idem", spec.idempotency_key.clone().unwrap_or_default()),
            ("digest", digest.clone()),
            ("items", spec.items.len().to_string()),
            ("total", total.to_string()),
            ("succeeded", "0".into()),
            ("failed", "0".into()),
            ("canceled", "0".into()),
            ("created_ms", now.to_string()),
        ];
        let idem_value = spec
            .idempotency_key
            .as_ref()
            .map(|_| format!("{job} {digest}"))
            .unwrap_or_default();
        let fair = &self.config.fair;
        let chunk = self.config.enqueue_chunk.max(1);
        let parts: Vec<&[TaskSpec]> = if tasks.is_empty() {
            vec![&tasks[..0]]
        } else {
            tasks.chunks(chunk).collect()
        };
        for (n, part) in parts.into_iter().enumerate() {
            let sections = backlog_sections(part, spec.priority, now)?;
            if n == 0 {
                let mut inv = self.scripts.submit.prepare_invoke();
                inv.key(&jk)
                    .key(controls_key(&job))
                    .key(events_key(&job))
                    .key(crate::fair::tenant_key(&spec.tenant))
                    .key(crate::fair::rate_key(&spec.tenant))
                    .key(JOBS_KEY)
                    .key(tenant_jobs_key(&spec.tenant))
                    .key(idem_key(
                        &spec.tenant,
                        spec.idempotency_key.as_deref().unwrap_or(""),
                    ))
                    .arg(job.as_str())
                    .arg(&spec.tenant)
                    .arg(now)
                    .arg(self.config.events_maxlen)
                    .arg(&ev)
                    .arg(total)
                    .arg(quota.max_queued_tasks.unwrap_or(0))
                    .arg(quota.max_in_flight_tasks.unwrap_or(0))
                    .arg(quota.submit_rate.unwrap_or(0.0))
                    .arg(quota.submit_burst.unwrap_or(1))
                    .arg(&idem_value)
                    .arg(fair.stream_target)
                    .arg(fair.quantum)
                    .arg(fields.len() * 2);
                for (k, v) in &fields {
                    inv.arg(*k).arg(v);
                }
                let controls: Vec<(usize, &[u8])> = spec
                    .items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| match &item.control {
                        Some(crate::model::ControlSpec {
                            source: crate::model::ControlSource::Inline(b),
                            ..
                        }) => Some((i, b.as_slice())),
                        _ => None,
                    })
                    .collect();
                inv.arg(controls.len() * 2);
                for (i, b) in controls {
                    inv.arg(i).arg(b);
                }
                push_sections(&mut inv, &sections);
                let reply: Vec<Value> = inv.invoke_async(&mut c).await?;
                admit(&spec.tenant, total, &quota, &reply)?;
            } else {
                let mut inv = self.scripts.append.prepare_invoke();
                inv.key(&jk)
                    .arg(job.as_str())
                    .arg(&spec.tenant)
                    .arg(fair.stream_target)
                    .arg(fair.quantum);
                push_sections(&mut inv, &sections);
                let moved: i64 = inv.invoke_async(&mut c).await?;
                if moved < 0 {
                    info!(job = %job, "job cancelled while its tasks were being enqueued");
                    break;
                }
            }
        }
        info!(job = %job, total, "job enqueued");
        Ok(Submitted {
            job,
            created: true,
            total,
        })
    }

    /// The job record; `NotFound` for unknown ids.
    pub async fn get_job(&self, job: &JobId) -> Result<JobRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, String> = c.hgetall(job_key(job)).await?;
        if h.is_empty() {
            return Err(CoreError::not_found("job", job.as_str()));
        }
        parse_job(job, &h)
    }

    /// Jobs, newest first, filtered; `page.token` continues a previous listing.
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        page: &PageRequest,
    ) -> Result<Page<JobRecord>> {
        let size = page.size.clamp(1, 1000);
        let key = match &filter.tenant {
            Some(t) => tenant_jobs_key(t),
            None => JOBS_KEY.to_string(),
        };
        let mut c = self.conn.clone();
        let mut start = match &page.token {
            Some(t) => format!("({t}"),
            None => "+".to_string(),
        };
        let mut out = Vec::new();
        let scan = (size * 2).max(64);
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(&key)
                .arg(&start)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(scan)
                .query_async(&mut c)
                .await?;
            let exhausted = ids.len() < scan;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(job_key(&JobId(id.clone())));
            }
            let hashes: Vec<HashMap<String, String>> = if ids.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut c).await?
            };
            for (id, h) in ids.iter().zip(hashes) {
                start = format!("({id}");
                if h.is_empty() {
                    continue;
                }
                let rec = parse_job(&JobId(id.clone()), &h)?;
                let state_ok = filter.states.is_empty() || filter.states.contains(&rec.state);
                let labels_ok = filter
                    .labels
                    .iter()
                    .all(|(k, v)| rec.labels.get(k) == Some(v));
                if state_ok && labels_ok {
                    out.push(rec);
                    if out.len() == size {
                        return Ok(Page {
                            items: out,
                            next_token: Some(id.clone()),
                        });
                    }
                }
            }
            if exhausted {
                return Ok(Page {
                    items: out,
                    next_token: None,
                });
            }
        }
    }

    /// Cancels a job: its state becomes `CANCELED` at once, tasks still in its backlog are deleted
    /// (freeing the tenant's queued quota), tasks already in a lane stream are dropped by workers
    /// when pulled, running ones stop between denoising steps, and nothing is recorded afterwards.
    /// Cancelling a finished job is a `Conflict`.
    #[instrument(skip(self), fields(job = %job))]
    pub async fn cancel_job(&self, job: &JobId) -> Result<JobRecord> {
        let mut c = self.conn.clone();
        let (code, state): (i64, String) = self
            .scripts
            .cancel
            .key(job_key(job))
            .key(events_key(job))
            .arg(now_ms())
            .arg(self.config.events_maxlen)
            .arg(job.as_str())
            .arg(Variant::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>())
            .invoke_async(&mut c)
            .await?;
        match code {
            -1 => Err(CoreError::not_found("job", job.as_str())),
            0 => Err(CoreError::Conflict(format!(
                "job {job} already finished ({state})"
            ))),
            _ => self.get_job(job).await,
        }
    }

    /// Events of a job after `after` (a previous event id; `None`: from the start), at most
    /// `count`. With `block`, waits up to that long for the first new event.
    pub async fn events(
        &self,
        job: &JobId,
        after: Option<&str>,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Event>> {
        let after = after.unwrap_or("0-0");
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count.max(1));
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(events_key(job)).arg(after);
        let reply: Option<StreamReadReply> = match block {
            // Each blocking read gets its own connection so many watchers never queue behind each
            // other on the shared multiplexed one.
            Some(_) => {
                let mut conn = self.client.get_multiplexed_async_connection().await?;
                cmd.query_async(&mut conn).await?
            }
            None => {
                let mut c = self.conn.clone();
                cmd.query_async(&mut c).await?
            }
        };
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            for e in k.ids {
                let at: u64 = e.get("at").unwrap_or(0);
                let raw: String = e.get("e").unwrap_or_default();
                let kind: EventKind = serde_json::from_str(&raw)
                    .map_err(|err| CoreError::corrupt(format!("event {}", e.id), err))?;
                out.push(Event {
                    id: e.id.clone(),
                    at_ms: at,
                    kind,
                });
            }
        }
        Ok(out)
    }

    /// A stream of the job's events from `after`, ending after the `JobFinished` event. Resume a
    /// broken watch by passing the last event id seen.
    pub fn watch(
        &self,
        job: JobId,
        after: Option<String>,
    ) -> impl Stream<Item = Result<Event>> + Send + 'static {
        let q = self.clone();
        futures::stream::unfold(
            (after, false, std::collections::VecDeque::<Event>::new()),
            move |(mut after, mut done, mut buf)| {
                let q = q.clone();
                let job = job.clone();
                async move {
                    loop {
                        if let Some(e) = buf.pop_front() {
                            if matches!(e.kind, EventKind::JobFinished { .. }) {
                                done = true;
                            }
                            after = Some(e.id.clone());
                            return Some((Ok(e), (after, done, buf)));
                        }
                        if done {
                            return None;
                        }
                        match q
                            .events(&job, after.as_deref(), 256, Some(Duration::from_secs(5)))
                            .await
                        {
                            Ok(evs) if evs.is_empty() => {
                                // Nothing new: make sure the job still exists (and has not finished
                                // with its final event trimmed away).
                                match q.get_job(&job).await {
                                    Ok(rec) if rec.state.is_terminal() => {
                                        let e = Event {
                                            id: after.clone().unwrap_or_else(|| "0-0".into()),
                                            at_ms: rec.finished_ms.unwrap_or_else(now_ms),
                                            kind: EventKind::JobFinished {
                                                state: rec.state,
                                                counts: rec.counts,
                                            },
                                        };
                                        return Some((Ok(e), (after, true, buf)));
                                    }
                                    Ok(_) => continue,
                                    Err(e) => return Some((Err(e), (after, true, buf))),
                                }
                            }
                            Ok(evs) => buf.extend(evs),
                            Err(e) => return Some((Err(e), (after, true, buf))),
                        }
                    }
                }
            },
        )
    }

    /// Results (succeeded and finally failed images) in index order; `page.token` is the next
    /// index to look at.
    pub async fn list_results(&self, job: &JobId, page: &PageRequest) -> Result<Page<TaskResult>> {
        let size = page.size.clamp(1, 10_000);
        let mut c = self.conn.clone();
        let total: Option<u64> = c.hget(job_key(job), "total").await?;
        let total = total.ok_or_else(|| CoreError::not_found("job", job.as_str()))?;
        let mut next: u64 = match &page.token {
            Some(t) => t.parse().map_err(|_| {
                CoreError::Invalid(vec![crate::error::ValidationError::job(
                    "page_token",
                    "is not a valid token",
                )])
            })?,
            None => 0,
        };
        let mut out = Vec::new();
        let chunk = (size as u64 * 2).max(256);
        while next < total && out.len() < size {
            let end = (next + chunk).min(total);
            let fields: Vec<u64> = (next..end).collect();
            let vals: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(results_key(job))
                .arg(&fields)
                .query_async(&mut c)
                .await?;
            for (idx, v) in fields.iter().zip(vals) {
                next = idx + 1;
                if let Some(v) = v {
                    out.push(
                        serde_json::from_str(&v)
                            .map_err(|e| CoreError::corrupt(format!("result {idx}"), e))?,
                    );
                    if out.len() == size {
                        break;
                    }
                }
            }
        }
        Ok(Page {
            items: out,
            next_token: (next < total).then(|| next.to_string()),
        })
    }

    /// Every recorded result of a job, in index order.
    pub async fn all_results(&self, job: &JobId) -> Result<Vec<TaskResult>> {
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, kv): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(results_key(job))
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            for (k, v) in kv {
                out.push(
                    serde_json::from_str::<TaskResult>(&v)
                        .map_err(|e| CoreError::corrupt(format!("result {k}"), e))?,
                );
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort_by_key(|r| r.index);
        out.dedup_by_key(|r| r.index);
        Ok(out)
    }

    /// Live workers (entries that expired are pruned from the registry set).
    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c.smembers(WORKERS_KEY).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|i| worker_key(i)).collect();
        let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for (id, v) in ids.into_iter().zip(vals) {
            match v.and_then(|v| serde_json::from_str::<WorkerInfo>(&v).ok()) {
                Some(w) => out.push(w),
                None => stale.push(id),
            }
        }
        if !stale.is_empty() {
            let _: () = c.srem(WORKERS_KEY, &stale).await?;
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The most recent dead letters, newest first.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>> {
        let mut c = self.conn.clone();
        let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(DEAD_KEY)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        for (id, fields) in v {
            let f: HashMap<String, String> = fields.into_iter().collect();
            let task: TaskSpec =
                serde_json::from_str(f.get("t").map(String::as_str).unwrap_or("null"))
                    .map_err(|e| CoreError::corrupt(format!("dead letter {id}"), e))?;
            out.push(DeadLetter {
                id,
                job: task.job.clone(),
                index: task.index,
                error: f.get("error").cloned().unwrap_or_default(),
                attempts: f.get("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
                task,
            });
        }
        Ok(out)
    }

    /// Length and pending count of every lane.
    pub async fn lane_stats(&self) -> Result<Vec<LaneStats>> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        for lane in Lane::all() {
            let length: u64 = c.xlen(lane.key()).await?;
            let summary: Value = redis::cmd("XPENDING")
                .arg(lane.key())
                .arg(GROUP)
                .query_async(&mut c)
                .await?;
            let pending = match summary {
                Value::Array(v) => v
                    .first()
                    .and_then(|x| redis::from_redis_value_ref::<u64>(x).ok())
                    .unwrap_or(0),
                _ => 0,
            };
            out.push(LaneStats {
                lane,
                length,
                pending,
            });
        }
        Ok(out)
    }

    /// Tasks waiting in the fair-share backlogs of every lane (not yet in the lane stream), for
    /// autoscaling: the stream's consumer-group lag only shows the short window refill keeps there.
    pub async fn backlog_stats(&self) -> Result<Vec<(Lane, u64)>> {
        let mut c = self.conn.clone();
        let h: HashMap<String, i64> = c.hgetall(BACKLOG_KEY).await?;
        Ok(Lane::all()
            .into_iter()
            .map(|lane| {
                let n = h.get(&lane.to_string()).copied().unwrap_or(0).max(0) as u64;
                (lane, n)
            })
            .collect())
    }

    /// A tenant's live counters (what the quotas are checked against).
    pub async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage> {
        let mut c = self.conn.clone();
        let (queued, in_flight): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(crate::fair::tenant_key(tenant))
            .arg("queued")
            .arg("in_flight")
            .query_async(&mut c)
            .await?;
        Ok(TenantUsage {
            queued: queued.unwrap_or(0).max(0) as u64,
            in_flight: in_flight.unwrap_or(0).max(0) as u64,
        })
    }

    /// Tops up the streams of `lanes` from the tenants' backlogs in deficit-round-robin order
    /// (one script call; a no-op for full streams). Submit and acknowledgement refill their own
    /// lanes; `pull` calls this too so a lane never waits on a backlog. Returns the tasks moved.
    pub async fn refill(&self, lanes: &[Lane]) -> Result<u64> {
        if lanes.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn.clone();
        let mut inv = self.scripts.refill.prepare_invoke();
        inv.arg(self.config.fair.stream_target)
            .arg(self.config.fair.quantum);
        for lane in lanes {
            inv.arg(lane.to_string());
        }
        let moved: i64 = inv.invoke_async(&mut c).await?;
        Ok(moved.max(0) as u64)
    }

    // ------------------------------------------------------------------------------------------
    // Worker side
    // ------------------------------------------------------------------------------------------

    /// Registers or refreshes a worker's registry entry (expires after `worker_ttl` without a
    /// heartbeat).
    pub async fn heartbeat_worker(&self, info: &WorkerInfo) -> Result<()> {
        let mut c = self.conn.clone();
        let mut info = info.clone();
        info.last_heartbeat_ms = now_ms();
        let json = serde_json::to_string(&info).map_err(|e| CoreError::corrupt("worker", e))?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(worker_key(&info.id))
            .arg(json)
            .arg("PX")
            .arg(self.config.worker_ttl.as_millis() as u64)
            .ignore();
        pipe.sadd(WORKERS_KEY, &info.id).ignore();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Same as [`Queue::heartbeat_worker`]; named for readability at start-up.
    pub async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        self.heartbeat_worker(info).await
    }

    /// Removes a worker's registry entry (clean shutdown).
    pub async fn deregister_worker(&self, id: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.del(worker_key(id))
            .ignore()
            .srem(WORKERS_KEY, id)
            .ignore();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Removes `worker`'s consumer from the lanes' groups after a clean drain, so restarts with new
    /// ids do not pile up consumers. Lanes where it still holds pending entries are left alone
    /// (those entries must stay claimable).
    pub async fn remove_consumer(&self, worker: &str, lanes: &[Lane]) -> Result<()> {
        let mut c = self.conn.clone();
        for lane in lanes {
            let pending: Vec<Value> = redis::cmd("XPENDING")
                .arg(lane.key())
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(worker)
                .query_async(&mut c)
                .await?;
            if pending.is_empty() {
                let _: i64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(lane.key())
                    .arg(GROUP)
                    .arg(worker)
                    .query_async(&mut c)
                    .await?;
            }
        }
        Ok(())
    }

    /// Pulls up to `max_batch` tasks for `worker` from `lanes` (given highest priority first):
    /// first expired leases (when a reclaim is due), then new entries lane by lane, and when there
    /// are none, blocks up to `block` on all lanes at once. Tasks of cancelled jobs are
    /// acknowledged and dropped here; tasks out of attempts are dead-lettered here. Jobs of the
    /// returned tasks are marked `RUNNING`.
    #[instrument(skip(self, lanes), fields(worker = %worker))]
    pub async fn pull(
        &self,
        worker: &str,
        lanes: &[Lane],
        max_batch: usize,
        block: Duration,
    ) -> Result<Vec<Task>> {
        let max_batch = max_batch.max(1);
        let mut tasks = Vec::new();
        if self.reclaim_due() {
            tasks.extend(self.reclaim(worker, lanes, max_batch).await?);
        }
        self.refill(lanes).await?;
        let mut c = self.conn.clone();
        for lane in lanes {
            if tasks.len() >= max_batch {
                break;
            }
            let reply = self
                .read_group(&mut c, worker, &[*lane], max_batch - tasks.len(), None)
                .await?;
            tasks.extend(reply);
        }
        if tasks.is_empty() && !block.is_zero() {
            let mut guard = self.blocking.lock().await;
            if guard.is_none() {
                *guard = Some(
                    ConnectionManager::new_with_config(
                        self.client.clone(),
                        Self::manager_config(&self.config, true),
                    )
                    .await?,
                );
            }
            let bc = guard.as_mut().expect("set above");
            tasks = self
                .read_group(bc, worker, lanes, max_batch, Some(block))
                .await?;
            // XREADGROUP over several streams returns up to COUNT from *each*; keep priority order.
            tasks.sort_by_key(|t| {
                lanes
                    .iter()
                    .position(|l| *l == t.lane)
                    .unwrap_or(usize::MAX)
            });
            if tasks.len() > max_batch {
                // Put the surplus back at once by re-enqueueing it (keeps the batch bounded).
                let surplus = tasks.split_off(max_batch);
                for t in surplus {
                    self.requeue(worker, &t, t.spec.prior_attempts).await?;
                }
            }
        }
        if tasks.is_empty() {
            return Ok(tasks);
        }
        self.drop_cancelled(worker, tasks).await
    }

    /// Reads new entries from `lanes` for `worker`; recreates groups lost with a Redis restart.
    async fn read_group(
        &self,
        conn: &mut ConnectionManager,
        worker: &str,
        lanes: &[Lane],
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Task>> {
        if lanes.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(worker)
            .arg("COUNT")
            .arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for l in lanes {
            cmd.arg(l.key());
        }
        for _ in lanes {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = match cmd.query_async(conn).await {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                warn!("consumer group missing (Redis lost its data?): recreating");
                self.ensure_groups().await?;
                cmd.query_async(conn).await?
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            let lane =
                Lane::from_key(&k.key).ok_or_else(|| CoreError::corrupt("lane key", &k.key))?;
            for e in k.ids {
                let raw: String = e.get("t").unwrap_or_default();
                let spec: TaskSpec = serde_json::from_str(&raw)
                    .map_err(|err| CoreError::corrupt(format!("task {}", e.id), err))?;
                let attempt = spec.prior_attempts + 1;
                out.push(Task {
                    spec,
                    lane,
                    entry_id: e.id,
                    attempt,
                });
            }
        }
        Ok(out)
    }

    fn reclaim_due(&self) -> bool {
        let mut last = self.last_reclaim.lock().expect("poisoned");
        let now = tokio::time::Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < self.config.reclaim_interval => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// Takes over up to `max` tasks whose lease expired (their worker died or stalled), in lane
    /// order. Tasks that have used up their attempts are dead-lettered instead of returned.
    #[instrument(skip(self, lanes), fields(worker = %worker))]
    pub async fn reclaim(&self, worker: &str, lanes: &[Lane], max: usize) -> Result<Vec<Task>> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        for lane in lanes {
            if out.len() >= max {
                break;
            }
            let rows: Vec<(String, u32, Vec<String>)> = self
                .scripts
                .reclaim
                .key(lane.key())
                .arg(GROUP)
                .arg(worker)
                .arg(self.config.lease.base_ms)
                .arg(((max - out.len()) * 4).max(64))
                .arg(max - out.len())
                .invoke_async(&mut c)
                .await?;
            for (id, deliveries, fields) in rows {
                let raw = fields
                    .chunks(2)
                    .find(|kv| kv[0] == "t")
                    .and_then(|kv| kv.get(1))
                    .cloned()
                    .unwrap_or_default();
                let spec: TaskSpec = serde_json::from_str(&raw)
                    .map_err(|err| CoreError::corrupt(format!("task {id}"), err))?;
                let attempt = spec.prior_attempts + deliveries;
                let task = Task {
                    spec,
                    lane: *lane,
                    entry_id: id,
                    attempt,
                };
                warn!(job = %task.spec.job, index = task.spec.index, attempt, "lease expired, task reclaimed");
                if attempt > self.config.max_attempts {
                    let err = format!(
                        "gave up after {} attempts: the worker holding the task stopped (lease expired)",
                        attempt - 1
                    );
                    self.dead_letter(worker, &task, &err).await?;
                } else {
                    out.push(task);
                }
            }
        }
        Ok(out)
    }

    /// Drops (acks) tasks of cancelled or deleted jobs and marks the jobs of the rest `RUNNING`.
    async fn drop_cancelled(&self, worker: &str, tasks: Vec<Task>) -> Result<Vec<Task>> {
        let jobs: Vec<JobId> = {
            let mut seen = HashSet::new();
            tasks
                .iter()
                .filter(|t| seen.insert(t.spec.job.clone()))
                .map(|t| t.spec.job.clone())
                .collect()
        };
        let cancelled = self.is_cancelled(&jobs).await?;
        let (keep, drop): (Vec<Task>, Vec<Task>) = tasks
            .into_iter()
            .partition(|t| !cancelled.contains(&t.spec.job));
        if !drop.is_empty() {
            debug!(n = drop.len(), "dropping tasks of cancelled jobs");
            self.ack(&drop).await?;
        }
        let live: Vec<&JobId> = jobs.iter().filter(|j| !cancelled.contains(*j)).collect();
        let ev = event_json(&EventKind::Started {
            worker: worker.to_string(),
        })?;
        let now = now_ms();
        try_join_all(live.into_iter().map(|j| {
            let mut c = self.conn.clone();
            let ev = ev.clone();
            async move {
                let _: i64 = self
                    .scripts
                    .mark_started
                    .key(job_key(j))
                    .key(events_key(j))
                    .arg(now)
                    .arg(ev)
                    .arg(self.config.events_maxlen)
                    .invoke_async(&mut c)
                    .await?;
                Ok::<_, CoreError>(())
            }
        }))
        .await?;
        Ok(keep)
    }

    /// Owner-checked lease extension: resets the lease clock of each task this worker still owns.
    /// Returns one flag per task, `false` where the lease was lost (another worker took it over;
    /// the caller should stop working on it — its result would be discarded as a duplicate anyway).
    pub async fn extend_leases(&self, worker: &str, tasks: &[Task]) -> Result<Vec<bool>> {
        let mut by_lane: BTreeMap<Lane, Vec<usize>> = BTreeMap::new();
        for (i, t) in tasks.iter().enumerate() {
            by_lane.entry(t.lane).or_default().push(i);
        }
        let mut out = vec![false; tasks.len()];
        let mut c = self.conn.clone();
        for (lane, idx) in by_lane {
            let mut inv = self.scripts.extend.key(lane.key());
            inv.arg(GROUP).arg(worker);
            for &i in &idx {
                inv.arg(&tasks[i].entry_id);
            }
            let flags: Vec<i64> = inv.invoke_async(&mut c).await?;
            for (&i, f) in idx.iter().zip(flags) {
                out[i] = f == 1;
            }
        }
        Ok(out)
    }

    /// Which of `jobs` are cancelled (or gone). One round trip; cheap enough to call between
    /// denoising steps.
    pub async fn is_cancelled(&self, jobs: &[JobId]) -> Result<HashSet<JobId>> {
        if jobs.is_empty() {
            return Ok(HashSet::new());
        }
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        for j in jobs {
            pipe.hget(job_key(j), "state");
        }
        let states: Vec<Option<String>> = pipe.query_async(&mut c).await?;
        Ok(jobs
            .iter()
            .zip(states)
            .filter(|(_, s)| {
                s.as_deref()
                    .is_none_or(|s| s == JobState::Canceled.as_str())
            })
            .map(|(j, _)| j.clone())
            .collect())
    }

    /// The inline control image of `item` of `job`.
    pub async fn control_image(&self, job: &JobId, item: u32) -> Result<Bytes> {
        let mut c = self.conn.clone();
        let v: Option<Vec<u8>> = c.hget(controls_key(job), item).await?;
        v.map(Bytes::from)
            .ok_or_else(|| CoreError::not_found("control image", format!("{job} item {item}")))
    }

    /// Appends a step-progress event for a job's tasks in the running batch.
    pub async fn progress(
        &self,
        job: &JobId,
        indices: &[u64],
        step: u32,
        total: u32,
        worker: &str,
    ) -> Result<()> {
        let ev = event_json(&EventKind::Step {
            indices: indices.to_vec(),
            step,
            total,
            worker: worker.to_string(),
        })?;
        let mut c = self.conn.clone();
        let _: String = redis::cmd("XADD")
            .arg(events_key(job))
            .arg("MAXLEN")
            .arg("~")
            .arg(self.config.events_maxlen)
            .arg("*")
            .arg("at")
            .arg(now_ms())
            .arg("e")
            .arg(ev)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Records a rendered image once, then acknowledges the entry. Call it only after the image is
    /// stored. A task another worker already recorded writes nothing (`Duplicate`); a task of a
    /// cancelled job writes nothing (`Canceled`). Either way the entry is acknowledged.
    #[instrument(skip_all, fields(job = %task.spec.job, index = task.spec.index))]
    pub async fn complete(&self, task: &Task, result: &TaskResult) -> Result<Recorded> {
        let key = result.key.clone().unwrap_or_default();
        let ev = EventKind::ItemDone {
            index: task.spec.index,
            key,
            worker: result.worker.clone(),
        };
        let r = self.record(task, result, &ev, "ok", "").await?;
        self.ack(std::slice::from_ref(task)).await?;
        Ok(r)
    }

    /// [`Queue::complete`] for many tasks: records run concurrently (pipelined on the multiplexed
    /// connection) and entries are acknowledged with one script call per lane.
    pub async fn complete_many(&self, done: &[(Task, TaskResult)]) -> Result<Vec<Recorded>> {
        let recs = try_join_all(done.iter().map(|(task, result)| {
            let ev = EventKind::ItemDone {
                index: task.spec.index,
                key: result.key.clone().unwrap_or_default(),
                worker: result.worker.clone(),
            };
            async move { self.record(task, result, &ev, "ok", "").await }
        }))
        .await?;
        let tasks: Vec<Task> = done.iter().map(|(t, _)| t.clone()).collect();
        self.ack(&tasks).await?;
        Ok(recs)
    }

    async fn record(
        &self,
        task: &Task,
        result: &TaskResult,
        ev: &EventKind,
        outcome: &str,
        error: &str,
    ) -> Result<Recorded> {
        let job = &task.spec.job;
        let json = serde_json::to_string(result).map_err(|e| CoreError::corrupt("result", e))?;
        let mut c = self.conn.clone();
        let (status, state): (String, String) = self
            .scripts
            .record
            .key(job_key(job))
            .key(results_key(job))
            .key(events_key(job))
            .arg(task.spec.index)
            .arg(json)
            .arg(now_ms())
            .arg(event_json(ev)?)
            .arg(self.config.events_maxlen)
            .arg(outcome)
            .arg(error)
            .invoke_async(&mut c)
            .await?;
        Ok(match status.as_str() {
            "recorded" => Recorded::Recorded,
            "finished" => {
                let st: JobState = state
                    .parse()
                    .map_err(|e: String| CoreError::corrupt("job state", e))?;
                info!(job = %job, state = %st, "job finished");
                Recorded::JobFinished(st)
            }
            "duplicate" => Recorded::Duplicate,
            "canceled" => Recorded::Canceled,
            _ => Recorded::Missing,
        })
    }

    /// Acknowledges and deletes the entries of `tasks` without recording anything (tasks of
    /// cancelled jobs, or already recorded ones).
    pub async fn ack(&self, tasks: &[Task]) -> Result<()> {
        let mut by_lane: BTreeMap<Lane, Vec<&str>> = BTreeMap::new();
        for t in tasks {
            by_lane.entry(t.lane).or_default().push(&t.entry_id);
        }
        let mut c = self.conn.clone();
        for (lane, ids) in by_lane {
            let mut inv = self.scripts.ack.key(lane.key());
            inv.arg(GROUP)
                .arg(lane.to_string())
                .arg(self.config.fair.stream_target)
                .arg(self.config.fair.quantum);
            for id in ids {
                inv.arg(id);
            }
            let _: i64 = inv.invoke_async(&mut c).await?;
        }
        Ok(())
    }

    /// Reports a failed attempt. A `retryable` failure with attempts left re-enqueues the task
    /// (`Retrying`); otherwise the task goes to the dead-letter stream and is recorded as failed
    /// with `error`, which may finish the job.
    #[instrument(skip_all, fields(job = %task.spec.job, index = task.spec.index, attempt = task.attempt))]
    pub async fn fail(
        &self,
        worker: &str,
        task: &Task,
        error: &str,
        retryable: bool,
    ) -> Result<Failed> {
        let will_retry = retryable && task.attempt < self.config.max_attempts;
        if will_retry {
            let ev = EventKind::ItemFailed {
                index: task.spec.index,
                error: error.to_string(),
                attempt: task.attempt,
                will_retry: true,
                worker: worker.to_string(),
            };
            let mut c = self.conn.clone();
            let _: i64 = self
                .scripts
                .note_error
                .key(job_key(&task.spec.job))
                .key(events_key(&task.spec.job))
                .arg(now_ms())
                .arg(event_json(&ev)?)
                .arg(self.config.events_maxlen)
                .arg(error)
                .invoke_async(&mut c)
                .await?;
            warn!(error, "task failed, retrying");
            return Ok(if self.requeue(worker, task, task.attempt).await? {
                Failed::Retrying {
                    attempt: task.attempt + 1,
                }
            } else {
                Failed::NotOwner
            });
        }
        warn!(error, "task failed for good, dead-lettering");
        Ok(Failed::DeadLettered(
            self.dead_letter(worker, task, error).await?,
        ))
    }

    /// Re-enqueues `task` with `prior_attempts` set, if `worker` still owns it.
    async fn requeue(&self, worker: &str, task: &Task, prior_attempts: u32) -> Result<bool> {
        let mut spec = task.spec.clone();
        spec.prior_attempts = prior_attempts;
        let json = serde_json::to_string(&spec).map_err(|e| CoreError::corrupt("task", e))?;
        let mut c = self.conn.clone();
        let id: Option<String> = self
            .scripts
            .requeue
            .key(task.lane.key())
            .arg(GROUP)
            .arg(worker)
            .arg(&task.entry_id)
            .arg(json)
            .arg(spec.lease_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(id.is_some())
    }

    /// Records a final failure, appends to `pf:dead`, acknowledges the entry.
    async fn dead_letter(&self, worker: &str, task: &Task, error: &str) -> Result<Recorded> {
        let result = TaskResult::failed(task, error.to_string(), worker);
        let ev = EventKind::ItemFailed {
            index: task.spec.index,
            error: error.to_string(),
            attempt: task.attempt,
            will_retry: false,
            worker: worker.to_string(),
        };
        let r = self.record(task, &result, &ev, "fail", error).await?;
        if r != Recorded::Duplicate && r != Recorded::Canceled {
            let json =
                serde_json::to_string(&task.spec).map_err(|e| CoreError::corrupt("task", e))?;
            let mut c = self.conn.clone();
            let _: String = redis::cmd("XADD")
                .arg(DEAD_KEY)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.config.dead_maxlen)
                .arg("*")
                .arg("job")
                .arg(task.spec.job.as_str())
                .arg("index")
                .arg(task.spec.index)
                .arg("error")
                .arg(error)
                .arg("attempts")
                .arg(task.attempt)
                .arg("t")
                .arg(json)
                .query_async(&mut c)
                .await?;
        }
        self.ack(std::slice::from_ref(task)).await?;
        Ok(r)
    }

    /// Writes `{prefix}/{job}/manifest.jsonl` (one JSON line per recorded image, in index order)
    /// and notes its key in the job record. Idempotent: whoever finishes the job calls it, and a
    /// second call rewrites the same content. Returns the key.
    #[instrument(skip(self, storage), fields(job = %job))]
    pub async fn write_manifest(&self, job: &JobId, storage: &Storage) -> Result<String> {
        let rec = self.get_job(job).await?;
        let results = self.all_results(job).await?;
        let mut body = Vec::with_capacity(results.len() * 256);
        for r in &results {
            serde_json::to_writer(&mut body, r).map_err(|e| CoreError::corrupt("result", e))?;
            body.push(b'\n');
        }
        let key = manifest_key(
            &crate::validate::object_prefix(&rec.tenant, &rec.output_prefix),
            job,
        );
        storage
            .put(&key, Bytes::from(body), "application/x-ndjson")
            .await?;
        let mut c = self.conn.clone();
        let _: () = c.hset(job_key(job), "manifest_key", &key).await?;
        info!(key, lines = results.len(), "manifest written");
        Ok(key)
    }
}

/// Backlog entries of one submit chunk, grouped by lane in index order: `(lane name, entries)`,
/// each entry `"<lease_ms> <task JSON>"` (the lease travels separately into the stream entry).
fn backlog_sections(
    part: &[TaskSpec],
    priority: Priority,
    now: u64,
) -> Result<Vec<(String, Vec<String>)>> {
    let mut by_lane: BTreeMap<Lane, Vec<String>> = BTreeMap::new();
    for t in part {
        let mut t = t.clone();
        t.submitted_ms = now;
        let json = serde_json::to_string(&t).map_err(|e| CoreError::corrupt("task", e))?;
        by_lane
            .entry(Lane::new(priority, t.variant()))
            .or_default()
            .push(format!("{} {json}", t.lease_ms));
    }
    Ok(by_lane
        .into_iter()
        .map(|(lane, v)| (lane.to_string(), v))
        .collect())
}

fn push_sections(inv: &mut redis::ScriptInvocation<'_>, sections: &[(String, Vec<String>)]) {
    inv.arg(sections.len());
    for (lane, entries) in sections {
        inv.arg(lane).arg(entries.len());
        for e in entries {
            inv.arg(e);
        }
    }
}

/// Turns the submit script's admission verdict into `Ok` or a `QuotaExceeded` naming the quota
/// and the numbers.
fn admit(tenant: &str, total: u64, quota: &TenantQuota, reply: &[Value]) -> Result<()> {
    let text = |i: usize| {
        reply
            .get(i)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .unwrap_or_default()
    };
    let num = |i: usize| {
        reply
            .get(i)
            .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
            .unwrap_or(0)
            .max(0) as u64
    };
    match text(0).as_str() {
        "ok" => Ok(()),
        "queued" => {
            let (queued, limit) = (num(1), num(2));
            Err(CoreError::QuotaExceeded(Box::new(QuotaExceeded {
                tenant: tenant.to_string(),
                quota: QuotaKind::MaxQueuedTasks,
                message: format!(
                    "tenant `{tenant}` has {queued} tasks queued; {total} more would exceed its \
                     max_queued_tasks quota of {limit} (wait for tasks to finish, or cancel some)"
                ),
                retry_after: None,
            })))
        }
        "rate" => {
            let wait = Duration::from_millis(num(1).max(1));
            let rate = quota.submit_rate.unwrap_or(0.0);
            let burst = quota.submit_burst.unwrap_or(1);
            Err(CoreError::QuotaExceeded(Box::new(QuotaExceeded {
                tenant: tenant.to_string(),
                quota: QuotaKind::SubmitRate,
                message: format!(
                    "tenant `{tenant}` is over its submit_rate quota of {rate} jobs/s \
                     (burst {burst}); retry after {} ms",
                    wait.as_millis()
                ),
                retry_after: Some(wait),
            })))
        }
        other => Err(CoreError::corrupt("submit script reply", other)),
    }
}

/// Digest of a spec as submitted (before random seeds are assigned), to tell an idempotent retry
/// from a key reused for another job.
fn spec_digest(spec: &JobSpec) -> String {
    let mut h = Sha256::new();
    // serde_json of a derive-Serialize struct with BTreeMap labels is deterministic.
    h.update(serde_json::to_vec(spec).unwrap_or_default());
    hex::encode(&h.finalize()[..16])
}

fn event_json(kind: &EventKind) -> Result<String> {
    serde_json::to_string(kind).map_err(|e| CoreError::corrupt("event", e))
}

fn parse_job(job: &JobId, h: &HashMap<String, String>) -> Result<JobRecord> {
    let get = |k: &str| h.get(k).map(String::as_str).unwrap_or("");
    let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
    let opt = |k: &str| h.get(k).filter(|v| !v.is_empty()).cloned();
    let state: JobState = get("state")
        .parse()
        .map_err(|e: String| CoreError::corrupt(format!("job {job}"), e))?;
    let priority: Priority = get("priority").parse().unwrap_or_default();
    let labels = match h.get("labels") {
        Some(l) if !l.is_empty() => serde_json::from_str(l)
            .map_err(|e| CoreError::corrupt(format!("job {job} labels"), e))?,
        _ => BTreeMap::new(),
    };
    Ok(JobRecord {
        id: job.clone(),
        tenant: get("tenant").to_string(),
        state,
        priority,
        output_prefix: get("prefix").to_string(),
        labels,
        idempotency_key: opt("idem"),
        items: num("items").unwrap_or(0),
        counts: JobCounts {
            total: num("total").unwrap_or(0),
            succeeded: num("succeeded").unwrap_or(0),
            failed: num("failed").unwrap_or(0),
            canceled: num("canceled").unwrap_or(0),
        },
        created_ms: num("created_ms").unwrap_or(0),
        started_ms: num("started_ms"),
        finished_ms: num("finished_ms"),
        last_error: opt("last_error"),
        manifest_key: opt("manifest_key"),
    })
}

/// Whether a result status counts as a rendered image.
pub fn is_success(r: &TaskResult) -> bool {
    r.status == ResultStatus::Succeeded
}
