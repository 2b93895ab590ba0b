//! Worker configuration: flags with `PIXFARM_*` environment fallbacks, validated before anything
//! starts so a bad setting is one clear sentence, not a failure deep inside a batch.

use std::path::PathBuf;
use std::time::Duration;

use pixfarm_core::{Lane, LeasePolicy, QueueConfig, Variant};

/// Settings of one render worker. Embed it in other CLIs with `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    /// Redis holding the queue.
    #[arg(
        long,
        env = "PIXFARM_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,

    /// Where images go: `file:///abs/dir` or `s3://bucket/prefix` (S3 endpoint from
    /// PIXFARM_S3_ENDPOINT / AWS_ENDPOINT_URL, credentials from the AWS environment).
    #[arg(
        long,
        env = "PIXFARM_STORAGE_URL",
        default_value = "file:///tmp/pixfarm/results"
    )]
    pub storage_url: String,

    /// Model directory in the diffusers layout.
    #[arg(
        long,
        env = "PIXFARM_MODEL_DIR",
        default_value = "models/pixart-lcm-shapes"
    )]
    pub model_dir: PathBuf,

    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long, env = "PIXFARM_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Transformer dtype: `auto` (f32 on CPU, bf16 on GPU), `f32`, `f16` or `bf16`.
    #[arg(long, env = "PIXFARM_DTYPE", default_value = "auto")]
    pub dtype: String,

    /// Most tasks pulled (and rendered together) at once.
    #[arg(long, env = "PIXFARM_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,

    /// Lanes served, highest priority first, as `priority:variant` (comma separated). Only list
    /// `*:control` lanes on workers that have a ControlNet adapter.
    #[arg(
        long,
        env = "PIXFARM_LANES",
        value_delimiter = ',',
        default_value = "high:base,normal:base,low:base"
    )]
    pub lanes: Vec<Lane>,

    /// Worker id (also the Redis consumer name). Default: `{host}-{pid}-{random}`.
    #[arg(long, env = "PIXFARM_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Milliseconds between heartbeats (lease extension and registry refresh). Must be well below
    /// the base lease.
    #[arg(long, env = "PIXFARM_HEARTBEAT_MS", default_value_t = 2_000)]
    pub heartbeat_ms: u64,

    /// Deliveries before a task is dead-lettered.
    #[arg(long, env = "PIXFARM_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,

    /// Base lease in milliseconds: an entry idle (no heartbeat) for longer than its lease is taken
    /// over by another worker. Keep it equal across the farm.
    #[arg(long, env = "PIXFARM_LEASE_BASE_MS", default_value_t = 30_000)]
    pub lease_base_ms: u64,

    /// Extra lease per step and megapixel, in milliseconds.
    #[arg(long, env = "PIXFARM_LEASE_PER_STEP_MPIX_MS", default_value_t = 2_000)]
    pub lease_per_step_mpix_ms: u64,

    /// How long one pull waits for new tasks, in milliseconds (also the longest delay before a
    /// drain starts).
    #[arg(long, env = "PIXFARM_POLL_MS", default_value_t = 1_000)]
    pub poll_ms: u64,

    /// Batches whose upload may still be in flight while the next one renders.
    #[arg(long, env = "PIXFARM_UPLOAD_DEPTH", default_value_t = 2)]
    pub upload_depth: usize,

    /// Emit a progress event per denoising step.
    #[arg(long, env = "PIXFARM_STEP_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub step_events: bool,

    /// Keep the T5 encoder off the device between encodes (saves memory on small GPUs).
    #[arg(long, env = "PIXFARM_OFFLOAD_TEXT_ENCODER", default_value_t = false)]
    pub offload_text_encoder: bool,

    /// Serve Prometheus metrics on `http://ADDR/metrics` (e.g. `0.0.0.0:9091`). Off when unset.
    #[arg(long, env = "PIXFARM_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// ControlNet-Transformer adapter directory (diffusers-community layout: `config.json` +
    /// `diffusion_pytorch_model.safetensors`; convert the original .pth with `pixfarm
    /// convert-controlnet`). A worker with one also serves the `control` lane of each priority in
    /// `--lanes`; a worker without one never receives controlled tasks.
    #[arg(long, env = "PIXFARM_CONTROLNET_DIR")]
    pub controlnet_dir: Option<PathBuf>,

    /// HED edge-detector weights (`ControlNetHED.pth` or a safetensors copy) for `hed` control
    /// images. Without them such images fail with that reason.
    #[arg(long, env = "PIXFARM_HED_WEIGHTS")]
    pub hed_weights: Option<PathBuf>,

    /// Undelivered tasks each lane stream is topped up to from the tenants' backlogs when this
    /// worker pulls or finishes tasks (keep it equal across the farm, at least workers × max
    /// batch).
    #[arg(long, env = "PIXFARM_FAIR_STREAM_TARGET", default_value_t = pixfarm_core::FairConfig::default().stream_target, value_parser = clap::value_parser!(u64).range(1..))]
    pub fair_stream_target: u64,

    /// Tasks a tenant moves into a lane stream per round-robin turn.
    #[arg(long, env = "PIXFARM_FAIR_QUANTUM", default_value_t = pixfarm_core::FairConfig::default().quantum, value_parser = clap::value_parser!(u32).range(1..))]
    pub fair_quantum: u32,

    /// The coordinator's tenants file (TOML or JSON). The worker reads each tenant's
    /// `allowed_input_prefixes` from it and refuses control images outside them and outside the
    /// tenant's own results. Without it only the tenant's own results are readable.
    #[arg(long, env = "PIXFARM_TENANT_QUOTAS")]
    pub tenant_quotas: Option<PathBuf>,

    /// How long an upload keeps retrying through a storage outage (the tasks stay leased, nothing
    /// counts as an attempt) before the tasks are given back to the queue, in milliseconds.
    #[arg(
        long,
        env = "PIXFARM_STORAGE_OUTAGE_HOLD_MS",
        default_value_t = 300_000
    )]
    pub storage_outage_hold_ms: u64,

    /// Render watchdog: a batch that takes longer than this many times its work estimate (the
    /// same estimate its leases are sized from) fails its tasks for a retry elsewhere, and the
    /// worker exits so its supervisor restarts it (a hung device cannot be recovered in-process).
    /// A held task is also no longer heartbeated past that deadline. 0 turns the watchdog off.
    #[arg(long, env = "PIXFARM_WATCHDOG_FACTOR", default_value_t = 4.0)]
    pub watchdog_factor: f64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379/".into(),
            storage_url: "file:///tmp/pixfarm/results".into(),
            model_dir: PathBuf::from("models/pixart-lcm-shapes"),
            device: "cpu".into(),
            dtype: "auto".into(),
            max_batch: 8,
            lanes: Lane::all_of(Variant::Base),
            worker_id: None,
            heartbeat_ms: 2_000,
            max_attempts: 3,
            lease_base_ms: 30_000,
            lease_per_step_mpix_ms: 2_000,
            poll_ms: 1_000,
            upload_depth: 2,
            step_events: true,
            offload_text_encoder: false,
            metrics_addr: None,
            controlnet_dir: None,
            hed_weights: None,
            fair_stream_target: pixfarm_core::FairConfig::default().stream_target,
            fair_quantum: pixfarm_core::FairConfig::default().quantum,
            tenant_quotas: None,
            storage_outage_hold_ms: 300_000,
            watchdog_factor: 4.0,
        }
    }
}

/// A configuration problem, as a sentence naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

fn bad(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        message: message.into(),
    }
}

impl WorkerConfig {
    /// Checks every setting that can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch == 0 || self.max_batch > 256 {
            return Err(bad(
                "max batch (PIXFARM_MAX_BATCH)",
                format!("must be 1..=256, got {}", self.max_batch),
            ));
        }
        if self.lanes.is_empty() {
            return Err(bad("lanes (PIXFARM_LANES)", "serve at least one lane"));
        }
        match &self.controlnet_dir {
            None if self.serves_control() => {
                return Err(bad(
                    "lanes (PIXFARM_LANES)",
                    "control lanes need a ControlNet adapter (--controlnet-dir / PIXFARM_CONTROLNET_DIR)",
                ));
            }
            Some(dir) if !dir.is_dir() => {
                return Err(bad(
                    "ControlNet adapter (PIXFARM_CONTROLNET_DIR)",
                    format!("{} is not a directory", dir.display()),
                ));
            }
            _ => {}
        }
        if let Some(f) = &self.hed_weights
            && !f.is_file()
        {
            return Err(bad(
                "HED weights (PIXFARM_HED_WEIGHTS)",
                format!("{} is not a file", f.display()),
            ));
        }
        if self.max_attempts == 0 {
            return Err(bad(
                "max attempts (PIXFARM_MAX_ATTEMPTS)",
                "must be at least 1",
            ));
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 2 > self.lease_base_ms {
            return Err(bad(
                "heartbeat (PIXFARM_HEARTBEAT_MS)",
                format!(
                    "{} ms must be positive and at most half the base lease ({} ms), or live tasks get taken over",
                    self.heartbeat_ms, self.lease_base_ms
                ),
            ));
        }
        if self.poll_ms == 0 {
            return Err(bad("poll (PIXFARM_POLL_MS)", "must be positive"));
        }
        if let Some(id) = &self.worker_id
            && (id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(bad(
                "worker id (PIXFARM_WORKER_ID)",
                "must be 1-128 printable ASCII characters",
            ));
        }
        pixfarm_core::StorageUrl::parse(&self.storage_url)
            .map_err(|e| bad("storage URL (PIXFARM_STORAGE_URL)", e.to_string()))?;
        self.parse_device()?;
        self.parse_dtype()?;
        if let Some(p) = &self.tenant_quotas {
            pixfarm_core::TenantQuotas::load(p)
                .map_err(|e| bad("tenants file (PIXFARM_TENANT_QUOTAS)", e.to_string()))?;
        }
        if !(self.watchdog_factor == 0.0
            || (self.watchdog_factor.is_finite() && self.watchdog_factor >= 1.0))
        {
            return Err(bad(
                "watchdog factor (PIXFARM_WATCHDOG_FACTOR)",
                format!(
                    "{} must be 0 (off) or at least 1 (a batch may take that many times its estimate)",
                    self.watchdog_factor
                ),
            ));
        }
        if !self.model_dir.is_dir() {
            return Err(bad(
                "model directory (PIXFARM_MODEL_DIR)",
                format!("{} is not a directory", self.model_dir.display()),
            ));
        }
        Ok(())
    }

    /// The worker id, generated when not configured.
    pub fn resolved_worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}-{}",
                hostname(),
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..6]
            )
        })
    }

    pub fn parse_device(&self) -> Result<DeviceSpec, ConfigError> {
        let d = self.device.trim().to_ascii_lowercase();
        match d.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "metal" => Ok(DeviceSpec::Metal(0)),
            _ => {
                if let Some(n) = d.strip_prefix("cuda:")
                    && let Ok(n) = n.parse()
                {
                    return Ok(DeviceSpec::Cuda(n));
                }
                Err(bad(
                    "device (PIXFARM_DEVICE)",
                    format!("`{}` is not cpu, cuda, cuda:N or metal", self.device),
                ))
            }
        }
    }

    pub fn parse_dtype(&self) -> Result<Option<candle_core::DType>, ConfigError> {
        match self.dtype.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(None),
            "f32" | "float32" => Ok(Some(candle_core::DType::F32)),
            "f16" | "float16" | "half" => Ok(Some(candle_core::DType::F16)),
            "bf16" | "bfloat16" => Ok(Some(candle_core::DType::BF16)),
            other => Err(bad(
                "dtype (PIXFARM_DTYPE)",
                format!("`{other}` is not auto, f32, f16 or bf16"),
            )),
        }
    }

    /// The tenants file, when configured (already checked by [`WorkerConfig::validate`]).
    pub fn tenants(&self) -> Result<pixfarm_core::TenantQuotas, ConfigError> {
        match &self.tenant_quotas {
            None => Ok(Default::default()),
            Some(p) => pixfarm_core::TenantQuotas::load(p)
                .map_err(|e| bad("tenants file (PIXFARM_TENANT_QUOTAS)", e.to_string())),
        }
    }

    /// How long a batch of tasks may render or be held before the watchdog acts; `None` when off.
    /// The estimate is the batch's lease budget: the base once plus each task's share above it.
    pub fn watchdog_deadline(&self, leases_ms: &[u64]) -> Option<Duration> {
        if self.watchdog_factor == 0.0 {
            return None;
        }
        let base = self.lease_base_ms;
        let work: u64 = base
            + leases_ms
                .iter()
                .map(|l| l.saturating_sub(base))
                .sum::<u64>();
        Some(Duration::from_millis(
            (work as f64 * self.watchdog_factor) as u64,
        ))
    }

    /// The queue settings this worker uses (leases, attempts).
    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            lease: LeasePolicy {
                base_ms: self.lease_base_ms,
                per_step_megapixel_ms: self.lease_per_step_mpix_ms,
            },
            max_attempts: self.max_attempts,
            // Look for dead workers' tasks about twice per base lease.
            reclaim_interval: Duration::from_millis((self.lease_base_ms / 2).max(100)),
            worker_ttl: Duration::from_millis((self.heartbeat_ms * 5).max(5_000)),
            // Quotas are the coordinator's (it stores each tenant's in-flight limit with its
            // submits); the worker only needs to feed the streams the same way.
            fair: pixfarm_core::FairConfig {
                stream_target: self.fair_stream_target,
                quantum: self.fair_quantum,
                ..pixfarm_core::FairConfig::default()
            },
            ..QueueConfig::default()
        }
    }

    pub fn serves_control(&self) -> bool {
        self.lanes.iter().any(|l| l.variant == Variant::Control)
    }

    /// The lanes this worker pulls from, in order: `--lanes` as given, or, when an adapter is
    /// loaded and no control lane is listed, each listed lane followed by the control lane of the
    /// same priority (so priority order still holds across variants).
    pub fn lanes_served(&self) -> Vec<Lane> {
        if self.controlnet_dir.is_none() || self.serves_control() {
            return self.lanes.clone();
        }
        let mut out = Vec::with_capacity(self.lanes.len() * 2);
        for l in &self.lanes {
            out.push(*l);
            let c = Lane::new(l.priority, Variant::Control);
            if !self.lanes.contains(&c) && !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl DeviceSpec {
    /// Opens the device; CUDA through `pixart::cuda::open`, which refuses a binary built without
    /// CUDA, a missing driver and a GPU the kernels were not built for, each with its fix.
    pub fn open(self) -> Result<candle_core::Device, String> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(n) => pixart::cuda::open(n).map_err(|e| e.to_string()),
            DeviceSpec::Metal(n) => candle_core::Device::new_metal(n).map_err(|e| e.to_string()),
        }
    }

    pub fn describe(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
            DeviceSpec::Metal(n) => format!("metal:{n}"),
        }
    }
}

/// The host name, without a dependency: the kernel's value, else `$HOSTNAME`, else `localhost`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_deadline_scales_the_batchs_lease_budget() {
        let c = WorkerConfig {
            lease_base_ms: 10_000,
            watchdog_factor: 3.0,
            ..WorkerConfig::default()
        };
        // Base once, plus each task's share above the base: 10000 + 5000 + 15000, times 3.
        assert_eq!(
            c.watchdog_deadline(&[15_000, 25_000]),
            Some(Duration::from_millis(90_000))
        );
        let off = WorkerConfig {
            watchdog_factor: 0.0,
            ..c.clone()
        };
        assert_eq!(off.watchdog_deadline(&[15_000]), None);
        let bad = WorkerConfig {
            watchdog_factor: 0.5,
            ..c
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("PIXFARM_WATCHDOG_FACTOR")
        );
    }
    use clap::Parser;
    use pixfarm_core::Priority;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        w: WorkerConfig,
    }

    #[test]
    fn parses_flags_and_validates() {
        let dir = std::env::temp_dir();
        let cli = Cli::parse_from([
            "w",
            "--lanes",
            "high:base,low:control",
            "--max-batch",
            "4",
            "--model-dir",
            dir.to_str().unwrap(),
            "--storage-url",
            "s3://bucket/x",
            "--device",
            "cuda:1",
        ]);
        assert_eq!(cli.w.lanes.len(), 2);
        assert!(cli.w.serves_control());
        assert_eq!(cli.w.parse_device().unwrap(), DeviceSpec::Cuda(1));
        assert!(
            cli.w
                .validate()
                .unwrap_err()
                .to_string()
                .contains("control lanes need a ControlNet adapter")
        );
        let mut cli = cli;
        cli.w.controlnet_dir = Some(dir.clone());
        cli.w.validate().unwrap();

        let mut c = cli.w.clone();
        c.heartbeat_ms = 20_000;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("heartbeat")
        );
        let mut c = cli.w.clone();
        c.storage_url = "ftp://x".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("PIXFARM_STORAGE_URL")
        );
        let mut c = cli.w.clone();
        c.device = "tpu".into();
        assert!(c.validate().is_err());
        let mut c = cli.w;
        c.model_dir = "/definitely/not/here".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
        assert!(Cli::try_parse_from(["w", "--lanes", "urgent:base"]).is_err());
    }

    #[test]
    fn an_adapter_adds_the_control_lane_of_each_priority() {
        let mut c = WorkerConfig {
            lanes: vec![
                Lane::new(Priority::High, Variant::Base),
                Lane::new(Priority::Low, Variant::Base),
            ],
            ..WorkerConfig::default()
        };
        assert_eq!(c.lanes_served(), c.lanes, "no adapter: lanes as given");
        c.controlnet_dir = Some(std::env::temp_dir());
        assert_eq!(
            c.lanes_served(),
            [
                Lane::new(Priority::High, Variant::Base),
                Lane::new(Priority::High, Variant::Control),
                Lane::new(Priority::Low, Variant::Base),
                Lane::new(Priority::Low, Variant::Control),
            ]
        );
        c.lanes = vec![Lane::new(Priority::Normal, Variant::Control)];
        assert_eq!(
            c.lanes_served(),
            c.lanes,
            "explicit control lanes are kept as given"
        );
    }
}
