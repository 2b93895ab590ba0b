//! Coordinator configuration: flags and `PIXFARM_*` environment variables.
//!
//! It is a `clap::Args` so that the `pixfarm coordinator` subcommand and the
//! `pixfarm-coordinator` binary share one definition, and tests build it as a
//! plain struct (no environment mutation).

use std::net::SocketAddr;
use std::time::Duration;

use pixfarm_core::{LeasePolicy, Limits, QueueConfig, StorageOptions};

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

    // Who may call: tokens file, or explicit no-auth mode.
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,

    // TLS / mutual TLS on the gRPC port.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,

    // Limits on what a client may submit.
    #[command(flatten)]
    pub limits: LimitArgs,

    /// Fair share between tenants, their quotas and submit rate limits.
    #[command(flatten)]
    pub fair: FairArgs,

    /// Lifetime of presigned result URLs, in seconds.
    #[arg(
        long,
        visible_alias = "presign-ttl",
        env = "PIXFARM_PRESIGN_EXPIRY_SECS",
        default_value_t = 3600
    )]
    pub presign_expiry_secs: u64,

    /// Serve Prometheus metrics on `http://ADDR/metrics` (e.g. `0.0.0.0:9090`).
    /// Off when unset; kept off the gRPC port so scrapes never queue behind clients.
    #[arg(long, env = "PIXFARM_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Serve the web gallery (jobs, results, workers) on `http://ADDR/`, behind the same tokens
    /// and roles as gRPC. Off when unset.
    #[arg(long, env = "PIXFARM_WEB_ADDR")]
    pub web_addr: Option<SocketAddr>,
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
            auth: crate::auth::AuthArgs::default(),
            tls: crate::tls::TlsArgs::default(),
            limits: LimitArgs::default(),
            fair: FairArgs::default(),
            presign_expiry_secs: 3600,
            metrics_addr: None,
            web_addr: None,
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
            limits: self.limits.apply(Limits::default()),
            fair: self.fair.fair_config(),
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

/// Limits on everything a client controls. Each is checked at submit and
/// reported as `INVALID_ARGUMENT` naming the field (`items[3].prompt`); unset
/// flags keep the defaults of [`pixfarm_core::Limits`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitArgs {
    /// Items (prompts) per job [default: 1000000].
    #[arg(long, env = "PIXFARM_MAX_ITEMS")]
    pub max_items: Option<usize>,
    /// Images per job after images_per_prompt expansion [default: 10000000].
    #[arg(long, env = "PIXFARM_MAX_IMAGES")]
    pub max_images: Option<u64>,
    /// Prompt length in UTF-8 bytes [default: 8192].
    #[arg(long, env = "PIXFARM_MAX_PROMPT_BYTES")]
    pub max_prompt_bytes: Option<usize>,
    /// Largest width or height in pixels [default: 2048].
    #[arg(long, env = "PIXFARM_MAX_IMAGE_SIDE")]
    pub max_image_side: Option<u32>,
    /// Inline control image size in bytes [default: 8388608].
    #[arg(long, env = "PIXFARM_MAX_CONTROL_BYTES")]
    pub max_control_bytes: Option<usize>,
}

impl LimitArgs {
    /// `base` with the limits given on the command line.
    pub fn apply(&self, mut base: Limits) -> Limits {
        if let Some(v) = self.max_items {
            base.max_items = v;
        }
        if let Some(v) = self.max_images {
            base.max_images = v;
        }
        if let Some(v) = self.max_prompt_bytes {
            base.max_prompt_bytes = v;
        }
        if let Some(v) = self.max_image_side {
            base.max_size = v;
        }
        if let Some(v) = self.max_control_bytes {
            base.max_control_bytes = v;
        }
        base
    }
}

/// Fair share: how lane streams are fed from the per-tenant backlogs, and the per-tenant quotas
/// (see `pixfarm_core::fair`). Without a quota file every tenant is unlimited (`pixfarm dev`).
#[derive(Debug, Clone, clap::Args)]
pub struct FairArgs {
    /// Tenant quotas file, TOML or JSON (`[default]` and `[tenants.NAME]` with
    /// `max_queued_tasks`, `max_in_flight_tasks`, `submit_rate`, `submit_burst`); read and
    /// checked at start. No limits when unset.
    #[arg(long, env = "PIXFARM_TENANT_QUOTAS", value_parser = parse_quota_file)]
    pub tenant_quotas: Option<pixfarm_core::TenantQuotas>,
    /// Undelivered tasks each lane stream is topped up to from the backlogs (at least
    /// workers × max batch; smaller lets a newly arriving tenant start sooner).
    #[arg(long, env = "PIXFARM_FAIR_STREAM_TARGET", default_value_t = pixfarm_core::FairConfig::default().stream_target, value_parser = clap::value_parser!(u64).range(1..))]
    pub fair_stream_target: u64,
    /// Tasks a tenant moves into a lane stream per round-robin turn.
    #[arg(long, env = "PIXFARM_FAIR_QUANTUM", default_value_t = pixfarm_core::FairConfig::default().quantum, value_parser = clap::value_parser!(u32).range(1..))]
    pub fair_quantum: u32,
}

impl Default for FairArgs {
    fn default() -> Self {
        let d = pixfarm_core::FairConfig::default();
        Self {
            tenant_quotas: None,
            fair_stream_target: d.stream_target,
            fair_quantum: d.quantum,
        }
    }
}

impl FairArgs {
    pub fn fair_config(&self) -> pixfarm_core::FairConfig {
        pixfarm_core::FairConfig {
            stream_target: self.fair_stream_target,
            quantum: self.fair_quantum,
            quotas: self.tenant_quotas.clone().unwrap_or_default(),
        }
    }
}

fn parse_quota_file(path: &str) -> Result<pixfarm_core::TenantQuotas, String> {
    pixfarm_core::TenantQuotas::load(std::path::Path::new(path)).map_err(|e| e.to_string())
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
