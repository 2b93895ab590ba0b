//! The job model: what a client submits ([`JobSpec`], [`ItemSpec`]), what the queue hands a worker
//! ([`Task`]), what a worker reports back ([`TaskResult`]) and what watchers see ([`Event`]).
//!
//! These are domain types, not protobuf types: the coordinator maps proto ↔ domain in one place, so
//! the queue and the worker never depend on the wire format.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The tenant used until authentication lands (issue 6): every job has a tenant from the start so
/// keys, indexes and object prefixes never need a migration.
pub const DEFAULT_TENANT: &str = "default";

/// Default LCM step count (PixArt-LCM is distilled for 4 steps).
pub const DEFAULT_STEPS: u32 = 4;

/// A job id: a UUIDv7 in canonical text form. UUIDv7 sorts by creation time as a string, which is
/// what lets the jobs index page newest-first with `ZREVRANGEBYLEX` and no extra timestamp key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// Parse a client-supplied id. Only canonical UUIDs are accepted, so an id can never smuggle
    /// Redis key syntax (`{`, `:`) or path segments into keys and object names.
    pub fn parse(s: &str) -> Option<Self> {
        let u = uuid::Uuid::parse_str(s).ok()?;
        Some(Self(u.hyphenated().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Scheduling priority: workers drain `High` lanes before `Normal` before `Low`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// In the order workers serve them.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(format!(
                "unknown priority `{other}` (expected high, normal or low)"
            )),
        }
    }
}

/// Model variant a task needs. Tasks with a control image go to separate lanes so a worker without
/// a ControlNet adapter never receives them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    #[default]
    Base,
    Control,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Base, Variant::Control];

    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Base => "base",
            Variant::Control => "control",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "base" => Ok(Variant::Base),
            "control" => Ok(Variant::Control),
            other => Err(format!(
                "unknown variant `{other}` (expected base or control)"
            )),
        }
    }
}

/// One task stream: a (priority, variant) pair. Its Redis key is `pf:lane:{priority}:{variant}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Lane {
    pub priority: Priority,
    pub variant: Variant,
}

impl Lane {
    pub fn new(priority: Priority, variant: Variant) -> Self {
        Self { priority, variant }
    }

    /// All lanes of `variant`, highest priority first.
    pub fn all_of(variant: Variant) -> Vec<Lane> {
        Priority::ALL
            .iter()
            .map(|&p| Lane::new(p, variant))
            .collect()
    }

    /// Every lane, highest priority first, base before control within a priority.
    pub fn all() -> Vec<Lane> {
        Priority::ALL
            .iter()
            .flat_map(|&p| Variant::ALL.iter().map(move |&v| Lane::new(p, v)))
            .collect()
    }

    /// The stream key.
    pub fn key(&self) -> String {
        format!("pf:lane:{}:{}", self.priority, self.variant)
    }

    /// Parse a lane from its key.
    pub fn from_key(key: &str) -> Option<Lane> {
        let rest = key.strip_prefix("pf:lane:")?;
        let (p, v) = rest.split_once(':')?;
        Some(Lane::new(p.parse().ok()?, v.parse().ok()?))
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.priority, self.variant)
    }
}

impl FromStr for Lane {
    type Err = String;
    /// `high:base`, `normal:control`, ...
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (p, v) = s.split_once(':').ok_or_else(|| {
            format!("lane `{s}` must look like `priority:variant`, e.g. `high:base`")
        })?;
        Ok(Lane::new(p.parse()?, v.parse()?))
    }
}

/// How the control image is to be interpreted (issue 4).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ControlKind {
    /// The image already is an edge map.
    #[default]
    Edge,
    /// The worker computes a Canny edge map from the image.
    Canny,
    /// The worker computes an HED edge map from the image.
    Hed,
}

impl ControlKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlKind::Edge => "edge",
            ControlKind::Canny => "canny",
            ControlKind::Hed => "hed",
        }
    }
}

impl FromStr for ControlKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "edge" => Ok(ControlKind::Edge),
            "canny" => Ok(ControlKind::Canny),
            "hed" => Ok(ControlKind::Hed),
            other => Err(format!(
                "unknown control kind `{other}` (expected edge, canny or hed)"
            )),
        }
    }
}

/// Where a control image comes from, as submitted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlSource {
    /// Image bytes (PNG or JPEG) sent with the job. Stored once per item in Redis, not once per task.
    Inline(#[serde(with = "bytes_b64")] Vec<u8>),
    /// `s3://bucket/key`, fetched by the worker.
    Uri(String),
}

impl fmt::Debug for ControlSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlSource::Inline(b) => write!(f, "Inline({} bytes)", b.len()),
            ControlSource::Uri(u) => write!(f, "Uri({u:?})"),
        }
    }
}

/// A control image attached to an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlSpec {
    pub source: ControlSource,
    #[serde(default)]
    pub kind: ControlKind,
    /// ControlNet conditioning scale, in `[0, 2]`.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Canny hysteresis thresholds on the gradient magnitude (OpenCV units; `kind = canny` only).
    /// Absent: the worker's defaults (100 and 200, as in the ControlNet Canny demos).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_threshold: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_threshold: Option<f32>,
}

fn default_scale() -> f32 {
    1.0
}

/// One line of a job: a prompt and how to render it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemSpec {
    pub prompt: String,
    /// `None`: a random seed is chosen at submit and recorded in every result.
    #[serde(default)]
    pub seed: Option<u64>,
    pub width: u32,
    pub height: u32,
    /// LCM steps, `1..=8`.
    #[serde(default = "default_steps")]
    pub steps: u32,
    /// Images rendered from this item, with seeds `seed, seed+1, …`.
    #[serde(default = "default_images")]
    pub images_per_prompt: u32,
    #[serde(default)]
    pub control: Option<ControlSpec>,
}

fn default_steps() -> u32 {
    DEFAULT_STEPS
}
fn default_images() -> u32 {
    1
}

impl ItemSpec {
    /// An item with the defaults (4 steps, one image, random seed).
    pub fn new(prompt: impl Into<String>, width: u32, height: u32) -> Self {
        Self {
            prompt: prompt.into(),
            seed: None,
            width,
            height,
            steps: DEFAULT_STEPS,
            images_per_prompt: 1,
            control: None,
        }
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub fn with_steps(mut self, steps: u32) -> Self {
        self.steps = steps;
        self
    }

    pub fn with_images(mut self, n: u32) -> Self {
        self.images_per_prompt = n;
        self
    }

    pub fn with_control(mut self, control: ControlSpec) -> Self {
        self.control = Some(control);
        self
    }

    pub fn variant(&self) -> Variant {
        if self.control.is_some() {
            Variant::Control
        } else {
            Variant::Base
        }
    }
}

/// A batch job as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Owner of the job; [`DEFAULT_TENANT`] until authentication lands.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub items: Vec<ItemSpec>,
    #[serde(default)]
    pub priority: Priority,
    /// A retried submit with the same key (per tenant) returns the same job instead of a new one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Object-key prefix of the results: `{output_prefix}/{job}/{index:06}.png`. May be empty.
    #[serde(default)]
    pub output_prefix: String,
    /// Free key/value labels; `list_jobs` can filter on them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

impl JobSpec {
    /// A job of the default tenant, normal priority, no prefix, no labels.
    pub fn new(items: Vec<ItemSpec>) -> Self {
        Self {
            tenant: DEFAULT_TENANT.to_string(),
            items,
            priority: Priority::Normal,
            idempotency_key: None,
            output_prefix: String::new(),
            labels: BTreeMap::new(),
        }
    }

    pub fn with_priority(mut self, p: Priority) -> Self {
        self.priority = p;
        self
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.output_prefix = prefix.into();
        self
    }

    pub fn with_label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// Number of images (= tasks) the job expands to.
    pub fn total_images(&self) -> u64 {
        self.items
            .iter()
            .map(|i| u64::from(i.images_per_prompt))
            .sum()
    }
}

/// Where a task's control image is to be read from (a resolved [`ControlSource`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRef {
    /// Bytes stored once per item under the job's key (see `Queue::control_image`).
    Inline { item: u32 },
    /// `s3://bucket/key`.
    Uri(String),
}

/// The control part of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskControl {
    pub source: ControlRef,
    pub kind: ControlKind,
    pub scale: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_threshold: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_threshold: Option<f32>,
}

/// One image to render: what is stored in a lane stream entry. Self-contained, so a worker needs
/// no extra lookup to render it (except inline control bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub job: JobId,
    pub tenant: String,
    /// Global image index within the job (`0..total`).
    pub index: u64,
    /// Index of the item it came from.
    pub item: u32,
    pub prompt: String,
    /// Always set: assigned at submit when the item had none.
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<TaskControl>,
    /// Object key the PNG is stored under.
    pub output_key: String,
    /// How long a delivery may go without a heartbeat before another worker may take it over;
    /// sized to the work (steps × pixels) at submit.
    pub lease_ms: u64,
    /// Failed deliveries before this stream entry (failures re-enqueue with this bumped).
    #[serde(default)]
    pub prior_attempts: u32,
    /// Unix milliseconds of the submit, for queue-latency timings.
    #[serde(default)]
    pub submitted_ms: u64,
}

impl TaskSpec {
    /// Tasks in one group can be rendered as one batched pipeline call.
    pub fn group_key(&self) -> GroupKey {
        GroupKey {
            width: self.width,
            height: self.height,
            steps: self.steps,
            controlled: self.control.is_some(),
        }
    }

    pub fn variant(&self) -> Variant {
        if self.control.is_some() {
            Variant::Control
        } else {
            Variant::Base
        }
    }
}

/// What makes tasks batchable together: same size, same step count, and whether they are
/// controlled. Control kinds and scales may mix in one batch (edge maps are made per image and the
/// adapter takes a scale per row); controlled and plain tasks are kept apart so plain images never
/// pay for the adapter's extra blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub controlled: bool,
}

/// A task as delivered to one worker: the spec plus the delivery handle needed to ack, extend or
/// fail it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub spec: TaskSpec,
    pub lane: Lane,
    /// Stream entry id within the lane.
    pub entry_id: String,
    /// 1 for the first delivery; counts crashed deliveries (reclaims) and failed attempts.
    pub attempt: u32,
}

/// Lifecycle of a job.
///
/// ```text
/// QUEUED ──(first task pulled)──▶ RUNNING ──(every task done or failed)──▶ SUCCEEDED | PARTIAL | FAILED
///    └──────────────(cancel_job)───────┴──▶ CANCELED
/// ```
/// `SUCCEEDED`: every image rendered. `FAILED`: every image failed. `PARTIAL`: some of each.
/// `CANCELED`: cancelled by a client; images recorded before the cancel stay, nothing is recorded
/// after it. The four right-hand states are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Partial,
    Failed,
    Canceled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Partial,
        JobState::Failed,
        JobState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Partial => "PARTIAL",
            JobState::Failed => "FAILED",
            JobState::Canceled => "CANCELED",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .iter()
            .copied()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown job state `{s}`"))
    }
}

/// Task counts of a job. `total = succeeded + failed + canceled + pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JobCounts {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Tasks that will never run because the job was cancelled (fixed at cancel time).
    pub canceled: u64,
}

impl JobCounts {
    pub fn pending(&self) -> u64 {
        self.total
            .saturating_sub(self.succeeded + self.failed + self.canceled)
    }
}

/// The job record as stored (`pf:job:{id}` hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub tenant: String,
    pub state: JobState,
    pub priority: Priority,
    pub output_prefix: String,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub items: u64,
    pub counts: JobCounts,
    /// Unix milliseconds.
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// The most recent task error (retried or final), for `GetJob` and the CLI.
    pub last_error: Option<String>,
    /// Object key of `manifest.jsonl`, once written.
    pub manifest_key: Option<String>,
    /// The job ended (or its results changed after it ended) and its manifest is not written yet;
    /// a worker or the coordinator writes it shortly.
    #[serde(default)]
    pub manifest_pending: bool,
}

/// Outcome of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Succeeded,
    Failed,
}

/// Where the time of one image went, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Submit (enqueue) to pickup by a worker.
    #[serde(default)]
    pub queue_ms: f64,
    /// The image's share of its batch's render time.
    #[serde(default)]
    pub render_ms: f64,
    /// PNG encoding.
    #[serde(default)]
    pub encode_ms: f64,
    /// Storage upload (including retries).
    #[serde(default)]
    pub upload_ms: f64,
    /// Images rendered together in the batched call.
    #[serde(default)]
    pub batch_size: u32,
}

/// The render parameters of an image, as recorded in results and the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<TaskControl>,
    /// Object key of the edge map that guided the render (control tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_key: Option<String>,
}

/// One recorded image (or final failure): a value of the `pf:job:{id}:results` hash and one line of
/// the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub index: u64,
    pub status: ResultStatus,
    pub prompt: String,
    pub seed: u64,
    pub parameters: Parameters,
    /// Object key (succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Hex SHA-256 of the stored PNG (succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Worker that rendered (or last tried) the image.
    pub worker: String,
    #[serde(default)]
    pub timings: Timings,
    /// Final error (failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Deliveries used.
    #[serde(default)]
    pub attempts: u32,
    /// Unix milliseconds when recorded.
    #[serde(default)]
    pub finished_ms: u64,
}

impl TaskResult {
    /// A success record for `task`.
    pub fn succeeded(
        task: &Task,
        key: String,
        sha256: String,
        worker: &str,
        timings: Timings,
    ) -> Self {
        Self {
            index: task.spec.index,
            status: ResultStatus::Succeeded,
            prompt: task.spec.prompt.clone(),
            seed: task.spec.seed,
            parameters: Parameters {
                width: task.spec.width,
                height: task.spec.height,
                steps: task.spec.steps,
                control: task.spec.control.clone(),
                control_key: None,
            },
            key: Some(key),
            sha256: Some(sha256),
            worker: worker.to_string(),
            timings,
            error: None,
            attempts: task.attempt,
            finished_ms: crate::now_ms(),
        }
    }

    /// A final-failure record for `task`.
    pub fn failed(task: &Task, error: String, worker: &str) -> Self {
        Self {
            index: task.spec.index,
            status: ResultStatus::Failed,
            prompt: task.spec.prompt.clone(),
            seed: task.spec.seed,
            parameters: Parameters {
                width: task.spec.width,
                height: task.spec.height,
                steps: task.spec.steps,
                control: task.spec.control.clone(),
                control_key: None,
            },
            key: None,
            sha256: None,
            worker: worker.to_string(),
            timings: Timings::default(),
            error: Some(error),
            attempts: task.attempt,
            finished_ms: crate::now_ms(),
        }
    }
}

/// What happened to a job, as stored in its capped event stream and streamed by `WatchJob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// Job accepted and enqueued.
    Queued { total: u64 },
    /// First task picked up by a worker.
    Started { worker: String },
    /// Denoising progress of a batch of this job's tasks.
    Step {
        indices: Vec<u64>,
        step: u32,
        total: u32,
        worker: String,
    },
    /// An image was rendered and recorded.
    ItemDone {
        index: u64,
        key: String,
        worker: String,
    },
    /// An attempt failed; `will_retry` says whether the task goes back to the queue.
    ItemFailed {
        index: u64,
        error: String,
        attempt: u32,
        will_retry: bool,
        worker: String,
    },
    /// The job reached a terminal state.
    JobFinished { state: JobState, counts: JobCounts },
}

/// One event with its stream id (the resume token for watchers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    /// Unix milliseconds.
    pub at_ms: u64,
    pub kind: EventKind,
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    #[default]
    Starting,
    Idle,
    Busy,
    Draining,
}

/// A worker's registry entry (`pf:worker:{id}`, expires unless heartbeated).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub device: String,
    pub model: String,
    pub state: WorkerState,
    pub lanes: Vec<Lane>,
    /// Tasks in the batch being rendered.
    pub current_batch: u32,
    /// Images per second over the recent past.
    pub images_per_sec: f64,
    pub images_done: u64,
    pub started_ms: u64,
    /// Unix milliseconds of the last heartbeat.
    pub last_heartbeat_ms: u64,
}

/// Paging for list calls: `token` is the opaque `next_token` of the previous page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub size: usize,
    pub token: Option<String>,
}

/// One page of results; `next_token` is `None` on the last page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_token: Option<String>,
}

/// Filters of `list_jobs` (all optional, combined with AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only this tenant's jobs.
    pub tenant: Option<String>,
    /// Any of these states (empty: all).
    pub states: Vec<JobState>,
    /// Every one of these labels must match.
    pub labels: BTreeMap<String, String>,
}

/// One line of `manifest.jsonl`.
pub type ManifestLine = TaskResult;

mod bytes_b64 {
    //! Inline control images in JSON (specs in tests, fixtures) as base64, not a number array.
    use serde::{Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }

    pub fn encode(b: &[u8]) -> String {
        let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
        for chunk in b.chunks(3) {
            let n = (u32::from(chunk[0]) << 16)
                | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(s: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(s.len() / 4 * 3);
        let mut acc = 0u32;
        let mut bits = 0;
        for c in s.bytes() {
            if c == b'=' {
                break;
            }
            let v = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or_else(|| format!("invalid base64 character {:?}", c as char))?
                as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn roundtrip() {
            for n in 0..20usize {
                let b: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
                assert_eq!(super::decode(&super::encode(&b)).unwrap(), b);
            }
            assert_eq!(super::encode(b"foobar"), "Zm9vYmFy");
            assert_eq!(super::encode(b"fo"), "Zm8=");
        }
    }
}
