//! Per-tenant fair share, quotas and the submit rate limit.
//!
//! # Why a backlog in front of the lane streams
//! Workers read a lane stream oldest entry first. If a submit appended its tasks straight to the
//! stream (as it once did), a 100k-task job of tenant A would sit in front of everything tenant B
//! submits later. So a submit now appends to a *per-job backlog*, and a Lua "refill" moves tasks
//! from the backlogs into the lane stream in deficit-round-robin (DRR) order over the lane's
//! tenants, only while the stream holds fewer than [`FairConfig::stream_target`] undelivered
//! entries. The stream stays short, so a newly arriving tenant's first task is at most
//! `stream_target + quantum × (tenants − 1)` entries away from the head.
//!
//! Refill runs inside the scripts that change the picture: the submit (its own lanes), the
//! acknowledgement (a finished task frees in-flight room and stream room), and once per pull
//! (every lane the worker serves; cheap when the stream is full). Leases, reclaim, retries and
//! dead letters work on stream entries exactly as before: a stream entry is the same task JSON
//! plus the field `n` (tenant) that the acknowledgement uses to keep the counters exact.
//!
//! Because the stream holds only a short, bounded window, consumer-group lag (`XINFO GROUPS …
//! lag`) no longer measures the whole queue: autoscalers should add the backlog, see
//! [`crate::Queue::backlog_stats`].
//!
//! # Keys
//! | key | type | what |
//! |---|---|---|
//! | `pf:job:{<id>}:backlog:{priority}:{variant}` | list | `"<lease_ms> <task JSON>"`, in index order |
//! | `pf:fair:{priority}:{variant}:t:{tenant}` | list | job ids of the tenant with a non-empty backlog in the lane, FIFO |
//! | `pf:fair:{priority}:{variant}:ring` | list | tenants with a non-empty backlog in the lane; the head's turn is running |
//! | `pf:fair:{priority}:{variant}:deficit` | hash | tenant → DRR deficit (tasks it may still send) |
//! | `pf:fair:{priority}:{variant}:turn` | string | tenant whose turn already got its quantum |
//! | `pf:fair:backlog` | hash | lane (`normal:base`) → tasks in backlogs |
//! | `pf:tenant:{tenant}` | hash | `queued` (backlog + stream entries not yet acknowledged), `in_flight` (stream entries not yet acknowledged), `max_in_flight` (0 = no limit) |
//! | `pf:tenant:{tenant}:rate` | hash, with TTL | token bucket: `tokens`, `ts` (Redis clock, ms) |
//!
//! # Invariants (kept by the scripts, each one atomic)
//! - A job id is in a tenant's lane list exactly while its backlog list in that lane is non-empty;
//!   a tenant is in the lane ring exactly while its lane list is non-empty.
//! - `queued` goes up when tasks enter a backlog (submit) and down when they leave the system:
//!   their stream entry is acknowledged (`XACK` returned 1, so at most once per entry, whether
//!   the task succeeded, was dead-lettered, or was dropped for a cancelled job) or their backlog
//!   is deleted by a cancel. `in_flight` goes up at refill and down at that same acknowledgement.
//!   A retry replaces the entry (same tenant field) and changes neither.
//!
//! # Limits
//! These scripts touch keys of several tenants and lanes, so, like the multi-lane blocking pull,
//! they assume one Redis (or Sentinel), not Redis Cluster. A job bigger than one submit chunk is
//! checked against `max_queued_tasks` as a whole but counted chunk by chunk, so two such jobs
//! submitted at the same moment may overshoot the quota by less than one job.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Lane backlog sizes (lane → tasks waiting in backlogs).
pub const BACKLOG_KEY: &str = "pf:fair:backlog";

pub(crate) fn tenant_key(tenant: &str) -> String {
    format!("pf:tenant:{tenant}")
}

pub(crate) fn rate_key(tenant: &str) -> String {
    format!("pf:tenant:{tenant}:rate")
}

/// How the lane streams are fed from the backlogs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FairConfig {
    /// Undelivered entries each lane stream is topped up to. Bigger means fewer refills and a
    /// longer wait for a newly arriving tenant; it should be at least workers × `max_batch` so
    /// no worker finds an empty stream while backlogs are full.
    pub stream_target: u64,
    /// Tasks a tenant may move into the stream per DRR turn. One worker batch (`max_batch`) keeps
    /// batches mostly single-tenant (same sizes group better) while still alternating quickly.
    pub quantum: u32,
    /// Per-tenant limits enforced at submit (queued tasks, rate) and at refill (tasks in flight).
    pub quotas: TenantQuotas,
}

impl Default for FairConfig {
    fn default() -> Self {
        Self {
            stream_target: 64,
            quantum: 8,
            quotas: TenantQuotas::default(),
        }
    }
}

impl FairConfig {
    pub fn validate(&self) -> Result<()> {
        if self.stream_target == 0 {
            return Err(CoreError::Config(
                "fair share stream_target must be at least 1".into(),
            ));
        }
        if self.quantum == 0 {
            return Err(CoreError::Config(
                "fair share quantum must be at least 1".into(),
            ));
        }
        self.quotas.validate()
    }
}

/// Limits of one tenant; `None` means no limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuota {
    /// Tasks submitted and not yet finished (waiting in the backlog or in a lane stream). A
    /// submit that would go over is refused whole.
    pub max_queued_tasks: Option<u64>,
    /// Tasks moved into a lane stream and not yet finished. Refill skips a tenant at its limit,
    /// so its tasks wait in the backlog while other tenants' tasks flow.
    pub max_in_flight_tasks: Option<u64>,
    /// Sustained submits (jobs) per second.
    pub submit_rate: Option<f64>,
    /// Submits allowed in a burst above the rate (bucket size); defaults to 1 with a rate.
    pub submit_burst: Option<u32>,
    /// `s3://bucket/prefix/` locations whose objects the tenant may name as control images,
    /// besides its own results (see [`crate::control_access`]). A tenant's list replaces the
    /// default's.
    pub allowed_input_prefixes: Option<Vec<String>>,
}

impl TenantQuota {
    /// `other`'s set fields over `self`'s.
    fn overlay(&self, other: &TenantQuota) -> TenantQuota {
        TenantQuota {
            max_queued_tasks: other.max_queued_tasks.or(self.max_queued_tasks),
            max_in_flight_tasks: other.max_in_flight_tasks.or(self.max_in_flight_tasks),
            submit_rate: other.submit_rate.or(self.submit_rate),
            submit_burst: other.submit_burst.or(self.submit_burst),
            allowed_input_prefixes: other
                .allowed_input_prefixes
                .clone()
                .or_else(|| self.allowed_input_prefixes.clone()),
        }
    }

    fn validate(&self, who: &str) -> Result<()> {
        let bad = |field: &str, msg: &str| {
            Err(CoreError::Config(format!(
                "tenant quotas: {who}.{field} {msg}"
            )))
        };
        if self.max_queued_tasks == Some(0) {
            return bad(
                "max_queued_tasks",
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if self.max_in_flight_tasks == Some(0) {
            return bad(
                "max_in_flight_tasks",
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if let Some(r) = self.submit_rate
            && !(r.is_finite() && r > 0.0)
        {
            return bad(
                "submit_rate",
                "must be a positive number of submits per second",
            );
        }
        if self.submit_burst == Some(0) {
            return bad("submit_burst", "must be at least 1");
        }
        for (i, p) in self.allowed_input_prefixes.iter().flatten().enumerate() {
            if let Err(m) = crate::control_access::check_prefix(p) {
                return bad(&format!("allowed_input_prefixes[{i}]"), &m);
            }
        }
        Ok(())
    }
}

/// Quotas of every tenant: `default` for tenants not named, `tenants.<name>` overriding it field
/// by field. Read from a TOML or JSON file:
///
/// ```toml
/// [default]
/// max_queued_tasks = 200000
/// max_in_flight_tasks = 256
/// submit_rate = 2.0      # jobs per second
/// submit_burst = 10
///
/// [tenants.render-team]
/// max_queued_tasks = 2000000
/// allowed_input_prefixes = ["s3://shared-inputs/render-team/"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuotas {
    #[serde(default)]
    pub default: TenantQuota,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantQuota>,
}

impl TenantQuotas {
    /// The limits that apply to `tenant`.
    pub fn for_tenant(&self, tenant: &str) -> TenantQuota {
        match self.tenants.get(tenant) {
            Some(q) => self.default.overlay(q),
            None => self.default.clone(),
        }
    }

    /// Every problem is a `Config` error naming the tenant and field.
    pub fn validate(&self) -> Result<()> {
        self.default.validate("default")?;
        for (name, q) in &self.tenants {
            if name.is_empty() {
                return Err(CoreError::Config(
                    "tenant quotas: a tenant name is empty".into(),
                ));
            }
            q.validate(&format!("tenants.{name}"))?;
        }
        Ok(())
    }

    /// Parses TOML, or JSON when the text starts with `{`, and validates it.
    pub fn parse(text: &str) -> Result<Self> {
        let q: TenantQuotas = if text.trim_start().starts_with('{') {
            serde_json::from_str(text)
                .map_err(|e| CoreError::Config(format!("tenant quotas (JSON): {e}")))?
        } else {
            toml::from_str(text)
                .map_err(|e| CoreError::Config(format!("tenant quotas (TOML): {e}")))?
        };
        q.validate()?;
        Ok(q)
    }

    /// Reads and validates a quota file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CoreError::Config(format!("tenant quotas file {}: {e}", path.display()))
        })?;
        Self::parse(&text).map_err(|e| match e {
            CoreError::Config(m) => CoreError::Config(format!("{} ({})", m, path.display())),
            other => other,
        })
    }
}

/// A tenant's live counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    /// Submitted and not finished (backlog + stream).
    pub queued: u64,
    /// In a lane stream and not finished.
    pub in_flight: u64,
}

/// Which limit refused a submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaKind {
    MaxQueuedTasks,
    SubmitRate,
}

impl QuotaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::MaxQueuedTasks => "max_queued_tasks",
            QuotaKind::SubmitRate => "submit_rate",
        }
    }
}

/// What a refused submit tells the client: which quota, the numbers, and when a retry may pass.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaExceeded {
    pub tenant: String,
    pub quota: QuotaKind,
    pub message: String,
    /// When a retry may succeed: the token bucket's refill time for the rate limit; `None` for
    /// the queued-task quota (it frees up as tasks finish, which nobody can predict).
    pub retry_after: Option<Duration>,
}
