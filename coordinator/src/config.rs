//! Coordinator configuration: flags and `PIXFARM_*` environment variables.
//!
//! It is a `clap::Args` so that the `pixfarm coordinator` subcommand and the
//! `pixfarm-coordinator` binary share one definition, and tests build it as a
//! plain struct (no environment mutation).

use std::net::SocketAddr;
use std::time::Duration;

use pixfarm_core::{LeasePolicy, QueueConfig, StorageOptions};

/// Everything the coordinator needs to start.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "PIXFARM_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Redis holding the queue, e.g. `redis://127.0.0.1:6379/`.
    #[arg(
        long,
        env = "PIXFARM_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,

    /// Where results are stored: `s3://bucket/prefix` or `file:///abs/dir`. The
    /// coordinator only presigns URLs for it; workers write to it.
    #[arg(long, env = "PIXFARM_STORAGE_URL")]
    pub storage_url: String,

    /// Size of items that give no width/height, as `WxH`.
    #[arg(long, env = "PIXFARM_DEFAULT_SIZE", default_value = "1024x1024", value_parser = parse_size)]
    pub default_size: (u32, u32),

    /// Lease of a task without heartbeat: this base …
    #[arg(long, env = "PIXFARM_LEASE_BASE_MS", default_value_t = LeasePolicy::default().base_ms)]
    pub lease_base_ms: u64,

    /// … plus this many ms per step × megapixel.
    #[arg(long, env = "PIXFARM_LEASE_PER_STEP_MPIX_MS", default_value_t = LeasePolicy::default().per_step_megapixel_ms)]
    pub lease_per_step_mpix_ms: u64,

    /// Largest accepted gRPC message (unary submits of big jobs should use the
    /// streaming submit instead of raising this).
    #[arg(long, env = "PIXFARM_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Lifetime of presigned result URLs, in seconds.
    #[arg(long, env = "PIXFARM_PRESIGN_EXPIRY_SECS", default_value_t = 3600)]
    pub presign_expiry_secs: u64,

    /// Serve Prometheus metrics on `http://ADDR/metrics` (e.g. `0.0.0.0:9090`).
    /// Off when unset; kept off the gRPC port so scrapes never queue behind clients.
    #[arg(long, env = "PIXFARM_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl CoordinatorConfig {
    /// A config with the defaults for the given Redis and storage (tests, `pixfarm dev`).
    pub fn new(redis_url: impl Into<String>, storage_url: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            redis_url: redis_url.into(),
            storage_url: storage_url.into(),
            default_size: (1024, 1024),
            lease_base_ms: LeasePolicy::default().base_ms,
            lease_per_step_mpix_ms: LeasePolicy::default().per_step_megapixel_ms,
            max_message_bytes: 64 * 1024 * 1024,
            presign_expiry_secs: 3600,
            metrics_addr: None,
        }
    }

    /// The queue settings the coordinator submits with (leases are fixed per
    /// task at submit time, so they are the coordinator's to choose).
    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            lease: LeasePolicy {
                base_ms: self.lease_base_ms,
                per_step_megapixel_ms: self.lease_per_step_mpix_ms,
            },
            ..QueueConfig::default()
        }
    }

    /// Storage options from the standard environment, with this config's presign expiry.
    pub fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            presign_expiry: Duration::from_secs(self.presign_expiry_secs),
            ..StorageOptions::from_env()
        }
    }
}

/// Parses `WxH` (e.g. `512x768`).
pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .trim()
        .to_ascii_lowercase()
        .split_once('x')
        .map(|(w, h)| (w.trim().to_string(), h.trim().to_string()))
        .ok_or_else(|| format!("size `{s}` is not WIDTHxHEIGHT, e.g. 512x512"))?;
    let w = w
        .parse()
        .map_err(|_| format!("size `{s}`: width `{w}` is not a whole number"))?;
    let h = h
        .parse()
        .map_err(|_| format!("size `{s}`: height `{h}` is not a whole number"))?;
    Ok((w, h))
}
