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
use crate::storage::Storage;
use crate::validate::{LeasePolicy, Limits, assign_seeds, expand, manifest_key, validate_job};
use scripts::Scripts;

mod cancel;
mod complete;
mod events;
mod fail;
mod manifest;
mod pull;
mod read;
mod scripts;
mod submit;
mod workers;

/// The consumer group every lane stream has.
pub const GROUP: &str = "workers";
/// Dead-letter stream.
pub const DEAD_KEY: &str = "pf:dead";
const WORKERS_KEY: &str = "pf:workers";
const JOBS_KEY: &str = "pf:jobs";
/// Jobs whose manifest is due (terminal, or changed after it was written): sorted set, score =
/// when it was marked (ms). A manifest written after the mark removes it.
pub const MANIFEST_DUE_KEY: &str = "pf:manifest:due";

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
}

fn event_json(kind: &EventKind) -> Result<String> {
    serde_json::to_string(kind).map_err(|e| CoreError::corrupt("event", e))
}

fn parse_job(job: &JobId, h: &HashMap<String, String>, manifest_due: bool) -> Result<JobRecord> {
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
        manifest_pending: manifest_due && state.is_terminal(),
    })
}

/// Whether a result status counts as a rendered image.
pub fn is_success(r: &TaskResult) -> bool {
    r.status == ResultStatus::Succeeded
}
