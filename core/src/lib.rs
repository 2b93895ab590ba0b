//! # pixfarm-core
//!
//! The farm's shared core: the job model and its validation, the Redis queue that carries jobs
//! from the coordinator to the workers, and the object storage results land in. It holds no
//! networking of its own beyond Redis and S3 and knows nothing about protobuf or tensors: the
//! coordinator maps proto ↔ [`model`] types, the worker maps tasks ↔ pipeline requests.
//!
//! ## API summary
//! - [`model`]: [`JobSpec`] / [`ItemSpec`] (what clients submit; tenant defaults to
//!   `"default"`), [`TaskSpec`] / [`Task`] (one image, as queued / as delivered), [`TaskResult`]
//!   (recorded once per image; also one `manifest.jsonl` line), [`JobRecord`] + [`JobState`]
//!   (`QUEUED → RUNNING → SUCCEEDED | PARTIAL | FAILED`, or `CANCELED`), [`Event`] /
//!   [`EventKind`] (per-job event stream), [`WorkerInfo`], [`Lane`] (`priority × variant`).
//! - [`validate`]: [`validate_job`] returns *every* [`ValidationError`] (`items[3].width: must be
//!   a multiple of 16 …`); [`Limits`]; object keys ([`image_key`], [`manifest_key`]).
//! - [`queue::Queue`]: client side `submit`, `get_job`, `list_jobs`, `cancel_job`, `events` /
//!   `watch` (resumable by event id), `list_results`, `list_workers`, `dead_letters`,
//!   `lane_stats`; worker side `heartbeat_worker`, `pull` (reclaims expired leases, priority
//!   lanes first), `extend_leases` (owner-checked), `is_cancelled`, `progress`, `complete` /
//!   `complete_many` (recorded once, even under races), `fail` (retry, then dead letter),
//!   `write_manifest`.
//! - [`storage::Storage`]: `file:///dir` or `s3://bucket/prefix` (`PIXFARM_S3_ENDPOINT` or
//!   `AWS_ENDPOINT_URL`, `AWS_REGION`, AWS credential env vars); `put` retries with back-off,
//!   `get`, `presign_get`, `get_uri` (control images).
//! - [`CoreError`]: the one error enum (`NotFound`, `Invalid`, `Conflict`, `Redis`, `Storage`,
//!   …) the coordinator maps to gRPC codes.
//! - `testing` (cargo feature `testing`): a real `redis-server` child and the `s3s-fs` S3 server
//!   served in the test process, for tests.
//!
//! ## Example
//! ```no_run
//! use std::time::Duration;
//! use pixfarm_core::{ItemSpec, JobSpec, Lane, Queue, QueueConfig, Storage, TaskResult, Timings, Variant};
//!
//! # async fn demo() -> Result<(), pixfarm_core::CoreError> {
//! let queue = Queue::connect("redis://127.0.0.1:6379/", QueueConfig::default()).await?;
//! let storage = Storage::open("file:///tmp/pixfarm").await?;
//!
//! // Client: submit a job of two prompts, three images each.
//! let spec = JobSpec::new(vec![
//!     ItemSpec::new("a red fox in snow", 512, 512).with_images(3),
//!     ItemSpec::new("a lighthouse at dusk", 512, 512).with_seed(7).with_images(3),
//! ]);
//! let job = queue.submit(spec).await?.job;
//!
//! // Worker: pull, render, store, record.
//! let tasks = queue.pull("worker-1", &Lane::all_of(Variant::Base), 8, Duration::from_secs(1)).await?;
//! for task in &tasks {
//!     let png = bytes::Bytes::from_static(b"..."); // render + encode here
//!     storage.put(&task.spec.output_key, png, "image/png").await?;
//!     let result = TaskResult::succeeded(task, task.spec.output_key.clone(), "sha256".into(), "worker-1", Timings::default());
//!     if let pixfarm_core::Recorded::JobFinished(_) = queue.complete(task, &result).await? {
//!         queue.write_manifest(&task.spec.job, &storage).await?;
//!     }
//! }
//! println!("{:?}", queue.get_job(&job).await?.state);
//! # Ok(()) }
//! ```

pub mod auth;
pub mod control_access;
pub mod error;
pub mod fair;
#[cfg(feature = "metrics-http")]
pub mod metrics_http;
pub mod model;
pub mod queue;

pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;
pub mod validate;

pub use error::{CoreError, Result, ValidationError};
pub use fair::{FairConfig, QuotaExceeded, QuotaKind, TenantQuota, TenantQuotas, TenantUsage};
pub use model::*;
pub use queue::{DeadLetter, Failed, LaneStats, Queue, QueueConfig, Recorded, Submitted};
pub use storage::{PutNew, RetryPolicy, Storage, StorageOptions, StorageUrl};
pub use validate::{
    LeasePolicy, Limits, control_key, image_key, manifest_key, object_prefix, validate_job,
};

/// Wall-clock Unix milliseconds (records and events are read by humans and other machines, so
/// they use wall time; leases use Redis' own clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
