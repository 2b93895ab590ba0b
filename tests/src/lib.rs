//! End-to-end harness: a whole farm per test, on real servers.
//!
//! [`Farm::start`] brings up a `redis-server` child (own port, optional AOF),
//! an S3 server (`s3s-fs`: the one `.ci/run` started, named by
//! `PIXFARM_TEST_S3_ENDPOINT`, else served inside this test process, always
//! so when the test must stop it), the coordinator in-process on `127.0.0.1:0`, and workers as separate
//! processes (so they can be `kill -9`ed) running the tiny checkpoint (the bundled trained model where a test judges images).
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use pixfarm_e2e::{Farm, FarmOptions};
//! let mut farm = Farm::start(FarmOptions::default()).await?;
//! farm.spawn_worker("w1")?;
//! let job = farm.submit(pixfarm_e2e::items(10, 64), Default::default()).await?;
//! let done = farm.wait(&job, std::time::Duration::from_secs(120)).await?;
//! assert_eq!(done.done, 10);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pixfarm_coordinator::{FarmService, serve_with};
use pixfarm_core::testing::{AppendFsync, RedisOptions, RedisServer, S3Server};
use pixfarm_core::{Lane, LeasePolicy, Queue, QueueConfig, Storage};
use pixfarm_proto::v1 as pb;
use pixfarm_proto::v1::farm_client::FarmClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub mod prom;

/// The bundled trained model (`models/pixart-lcm-shapes`, the farm's default), whose images
/// `tests/quality.rs` judges and whose adapter `tests/control.rs` drives.
pub fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/pixart-lcm-shapes")
}

/// The random tiny checkpoint: the delivery tests (kills, restarts, outages, fairness, scaling) run
/// several farms at once on two cores, where the trained model's heavier renders starved Redis
/// ("redis: timed out"); they test what the farm does with images, not what the images show.
pub fn tiny_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-pixart-lcm")
}

/// The worker binary: `PIXFARM_WORKER_BIN`, else `pixfarm-e2e-worker`, which
/// Cargo builds beside the integration tests (`target/<profile>/`, one level
/// above the test executable in `deps/`).
pub fn worker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PIXFARM_WORKER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    profile_dir.join("pixfarm-e2e-worker")
}

/// `n` small items of `size`×`size` with fixed seeds.
/// The fields named by a status's `google.rpc.BadRequest` detail, in order.
pub fn violations(s: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    s.get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

pub fn items(n: usize, size: u32) -> Vec<pb::Item> {
    (0..n)
        .map(|i| pb::Item {
            prompt: format!("test image {i}: a small red square on a blue background"),
            seed: Some(i as u64),
            width: Some(size),
            height: Some(size),
            steps: Some(2),
            ..Default::default()
        })
        .collect()
}

/// How a test's farm is set up.
#[derive(Debug, Clone)]
pub struct FarmOptions {
    /// Start a private `s3s-fs` (tests that stop S3) instead of the shared one.
    pub own_s3: bool,
    /// Redis with an append-only file (tests that restart Redis).
    pub redis_aof: bool,
    /// With `redis_aof`: fsync once a second (`appendfsync everysec`) instead of after every write.
    pub redis_fsync_everysec: bool,
    /// Base lease in ms (coordinator and workers).
    pub lease_base_ms: u64,
    pub max_attempts: u32,
    pub max_batch: usize,
    pub heartbeat_ms: u64,
    /// Extra worker environment.
    pub worker_env: Vec<(String, String)>,
    /// Serve the coordinator's `/metrics` ([`Farm::coordinator_metrics`]).
    pub coordinator_metrics: bool,
    /// Give each worker a `/metrics` port ([`WorkerProcess::metrics_addr`]).
    pub worker_metrics: bool,
    /// A tenants file (TOML: quotas, `allowed_input_prefixes`) for the coordinator's queue and,
    /// through `PIXFARM_TENANT_QUOTAS`, for every worker.
    pub tenants_toml: Option<String>,
    /// The model the workers load ([`tiny_model_dir`] unless a test judges images).
    pub model_dir: PathBuf,
}

impl Default for FarmOptions {
    fn default() -> Self {
        Self {
            own_s3: false,
            redis_aof: false,
            redis_fsync_everysec: false,
            lease_base_ms: 30_000,
            max_attempts: 3,
            max_batch: 8,
            heartbeat_ms: 500,
            worker_env: Vec::new(),
            coordinator_metrics: false,
            worker_metrics: false,
            tenants_toml: None,
            model_dir: tiny_model_dir(),
        }
    }
}

/// A worker child process, killed on drop.
pub struct WorkerProcess {
    pub id: String,
    pub child: Child,
    pub log: PathBuf,
    /// Where its `/metrics` is served, when [`FarmOptions::worker_metrics`] is set.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl WorkerProcess {
    /// SIGKILL: no drain, no acknowledgement, leases left to expire.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM: the worker drains and exits.
    pub fn terminate(&mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(())
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One farm: Redis, S3, a coordinator, workers.
pub struct Farm {
    pub redis: RedisServer,
    pub s3: S3Server,
    pub bucket: String,
    pub storage: Storage,
    pub queue: Queue,
    pub addr: std::net::SocketAddr,
    pub options: FarmOptions,
    pub workers: Vec<WorkerProcess>,
    pub logs: tempfile::TempDir,
    /// The coordinator's `/metrics`, when [`FarmOptions::coordinator_metrics`] is set.
    pub coordinator_metrics: Option<pixfarm_coordinator::metrics::MetricsServer>,
    /// [`FarmOptions::tenants_toml`] written out for the workers.
    tenants_file: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Farm {
    pub async fn start(options: FarmOptions) -> Result<Self> {
        if !options.model_dir.join("model_index.json").exists() {
            bail!(
                "the bundled model is missing at {}",
                options.model_dir.display()
            );
        }
        if !worker_bin().is_file() {
            bail!(
                "no worker binary at {} (set PIXFARM_WORKER_BIN or run through `cargo test -p pixfarm-e2e`)",
                worker_bin().display()
            );
        }
        let fsync = if options.redis_fsync_everysec {
            AppendFsync::EverySec
        } else {
            AppendFsync::Always
        };
        let redis = RedisServer::start_with_fsync(
            RedisOptions {
                aof: options.redis_aof,
            },
            fsync,
        )
        .await
        .context("start redis-server")?;
        let s3 = if options.own_s3 {
            S3Server::start().await
        } else {
            S3Server::from_env_or_start().await
        }
        .context("start s3s-fs")?;
        let bucket = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let storage = Storage::open_with(&s3.storage_url(&bucket), s3.storage_options()).await?;
        let queue = Queue::connect(&redis.url(), queue_config(&options)).await?;
        queue.ensure_groups().await?;
        let service = FarmService::new(queue.clone(), storage.clone(), (64, 64));
        let coordinator_metrics = if options.coordinator_metrics {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            Some(pixfarm_coordinator::metrics::start_on(l, queue.clone())?)
        } else {
            None
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = serve_with(service, 64 * 1024 * 1024, listener, async {
                let _ = rx.await;
            })
            .await;
        });
        let logs = tempfile::Builder::new().prefix("pixfarm-e2e-").tempdir()?;
        let tenants_file = match &options.tenants_toml {
            Some(t) => {
                let p = logs.path().join("tenants.toml");
                std::fs::write(&p, t)?;
                Some(p)
            }
            None => None,
        };
        Ok(Self {
            redis,
            s3,
            bucket,
            storage,
            queue,
            addr,
            options,
            workers: Vec::new(),
            logs,
            coordinator_metrics,
            tenants_file,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// Entries of every lane that `consumer` holds (delivered, not acknowledged).
    pub async fn held_by(&self, consumer: &str) -> Result<usize> {
        let mut c = redis::Client::open(self.redis.url())?
            .get_multiplexed_async_connection()
            .await?;
        let mut n = 0;
        for lane in Lane::all() {
            let v: Vec<redis::Value> = redis::cmd("XPENDING")
                .arg(lane.key())
                .arg(pixfarm_core::queue::GROUP)
                .arg("-")
                .arg("+")
                .arg(10_000)
                .arg(consumer)
                .query_async(&mut c)
                .await?;
            n += v.len();
        }
        Ok(n)
    }

    pub async fn client(&self) -> Result<FarmClient<Channel>> {
        Ok(FarmClient::connect(format!("http://{}", self.addr))
            .await?
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// Starts a worker process serving every lane, with the bundled model's ControlNet adapter loaded.
    pub fn spawn_worker(&mut self, id: &str) -> Result<()> {
        let log = self.logs.path().join(format!("{id}.log"));
        let out = std::fs::File::create(&log)?;
        let o = &self.options;
        let mut cmd = Command::new(worker_bin());
        cmd.env("PIXFARM_REDIS_URL", self.redis.url())
            .env("PIXFARM_STORAGE_URL", self.s3.storage_url(&self.bucket))
            .env("PIXFARM_MODEL_DIR", &o.model_dir)
            .env("PIXFARM_CONTROLNET_DIR", o.model_dir.join("controlnet"))
            .env("PIXFARM_DEVICE", "cpu")
            .env("PIXFARM_WORKER_ID", id)
            .env("PIXFARM_MAX_BATCH", o.max_batch.to_string())
            .env("PIXFARM_HEARTBEAT_MS", o.heartbeat_ms.to_string())
            .env("PIXFARM_LEASE_BASE_MS", o.lease_base_ms.to_string())
            .env("PIXFARM_LEASE_PER_STEP_MPIX_MS", "0")
            .env("PIXFARM_MAX_ATTEMPTS", o.max_attempts.to_string())
            .env("PIXFARM_POLL_MS", "200")
            .env(
                "PIXFARM_LANES",
                "high:base,normal:base,low:base,high:control,normal:control,low:control",
            )
            .env("PIXFARM_LOG", "info")
            .envs(self.s3.env())
            .envs(
                self.tenants_file
                    .iter()
                    .map(|p| ("PIXFARM_TENANT_QUOTAS", p.as_os_str())),
            )
            .envs(o.worker_env.iter().cloned())
            .stdout(out.try_clone()?)
            .stderr(out);
        let metrics_addr = if o.worker_metrics {
            // A port that was free a moment ago; the worker fails loudly if it was taken meanwhile.
            let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            cmd.env("PIXFARM_METRICS_ADDR", addr.to_string());
            Some(addr)
        } else {
            None
        };
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the worker {}", worker_bin().display()))?;
        self.workers.push(WorkerProcess {
            id: id.to_string(),
            child,
            log,
            metrics_addr,
        });
        Ok(())
    }

    /// The last lines of every worker's log (for failure messages).
    pub fn worker_logs(&self) -> String {
        let mut s = String::new();
        for w in &self.workers {
            let text = std::fs::read_to_string(&w.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            s.push_str(&format!(
                "--- worker {} ({})\n{}\n",
                w.id,
                w.log.display(),
                tail.join("\n")
            ));
        }
        s
    }

    pub async fn submit(&self, items: Vec<pb::Item>, spec: pb::JobSpec) -> Result<String> {
        let mut c = self.client().await?;
        let r = c
            .submit_job(pb::SubmitJobRequest {
                job: Some(spec),
                items,
            })
            .await?
            .into_inner();
        Ok(r.job_id)
    }

    pub async fn get(&self, job: &str) -> Result<pb::Job> {
        let mut c = self.client().await?;
        Ok(c.get_job(pb::GetJobRequest {
            job_id: job.to_string(),
        })
        .await?
        .into_inner())
    }

    /// Polls until the job is in a terminal state; fails with the worker logs
    /// after `timeout`.
    pub async fn wait(&self, job: &str, timeout: Duration) -> Result<pb::Job> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.get(job).await {
                Ok(j) if pixfarm::client::is_terminal(j.state) => {
                    return self.with_manifest(j).await;
                }
                Ok(j) if tokio::time::Instant::now() > deadline => bail!(
                    "job {job} still {} after {timeout:?} ({} done, {} failed of {})\n{}",
                    pixfarm::client::state_name(j.state),
                    j.done,
                    j.failed,
                    j.task_count,
                    self.worker_logs()
                ),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(e.context(self.worker_logs()));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The worker that records a job's last image writes the manifest right
    /// after; wait (briefly) for its key to appear in the job record.
    async fn with_manifest(&self, mut j: pb::Job) -> Result<pb::Job> {
        if j.state() == pb::JobState::Canceled {
            return Ok(j);
        }
        for _ in 0..150 {
            if !j.manifest_key.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            j = self.get(&j.id).await?;
        }
        Ok(j)
    }

    /// Polls until `pred(job)` holds.
    pub async fn wait_until(
        &self,
        job: &str,
        timeout: Duration,
        pred: impl Fn(&pb::Job) -> bool,
    ) -> Result<pb::Job> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(j) = self.get(job).await
                && pred(&j)
            {
                return Ok(j);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "condition on job {job} not reached in {timeout:?}\n{}",
                    self.worker_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every object key in the test's bucket under `prefix`.
    pub async fn s3_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let Storage::S3(s3) = &self.storage else {
            bail!("not an S3 store")
        };
        let mut keys: Vec<String> = Vec::new();
        let mut token = None;
        let mut start_after = None;
        loop {
            let r = s3
                .client()
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .set_start_after(start_after.take())
                .send()
                .await
                .context("list objects")?;
            keys.extend(
                r.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
            match r.next_continuation_token() {
                Some(t) => token = Some(t.to_string()),
                // s3s-fs 0.13 marks a truncated page but sends no continuation token: go on after
                // the last key instead (S3's StartAfter), which every S3 implementation honours.
                None if r.is_truncated() == Some(true) && !r.contents().is_empty() => {
                    start_after = keys.last().cloned();
                }
                None => break,
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Every result of a job (all pages).
    pub async fn results(&self, job: &str) -> Result<Vec<pb::Result>> {
        let mut c = pixfarm::client::connect(&self.addr.to_string()).await?;
        pixfarm::client::all_results(&mut c, job).await
    }

    /// Every event of a job, read straight from Redis (the ground truth for
    /// watch tests).
    pub async fn events(&self, job: &str) -> Result<Vec<pixfarm_core::Event>> {
        let id = pixfarm_core::JobId::parse(job).context("job id")?;
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.queue.events(&id, after.as_deref(), 1000, None).await?;
            if page.is_empty() {
                return Ok(out);
            }
            after = page.last().map(|e| e.id.clone());
            out.extend(page);
        }
    }

    /// Tasks enqueued and not yet acknowledged: entries waiting or pending in every lane stream,
    /// plus tasks still in the per-tenant fair-share backlogs.
    pub async fn lane_entries(&self) -> Result<u64> {
        let mut c = redis::Client::open(self.redis.url())?
            .get_multiplexed_async_connection()
            .await?;
        let mut n = 0;
        for lane in Lane::all() {
            let len: u64 = redis::cmd("XLEN")
                .arg(lane.key())
                .query_async(&mut c)
                .await?;
            n += len;
        }
        let backlog: u64 = self
            .queue
            .backlog_stats()
            .await?
            .iter()
            .map(|(_, b)| b)
            .sum();
        Ok(n + backlog)
    }

    /// Checks the invariants of a finished job: every rendered image is in S3
    /// exactly once under `{tenant}/{prefix}/{job}/{index:06}.png`, no other image is,
    /// the manifest has one line per result with distinct indices, and every
    /// index was recorded done at most once.
    pub async fn check_exactly_once(&self, job: &pb::Job) -> Result<ExactlyOnce> {
        let prefix = job
            .spec
            .as_ref()
            .map(|s| pixfarm_core::object_prefix(&s.tenant, &s.output_prefix))
            .unwrap_or_default();
        let dir = format!("{prefix}/{}/", job.id);
        let keys = self.s3_keys(&dir).await?;
        // Rendered images only; edge maps of controlled images sit beside them as `.control.png`.
        let pngs: Vec<&String> = keys
            .iter()
            .filter(|k| k.ends_with(".png") && !k.ends_with(".control.png"))
            .collect();
        let results = self.results(&job.id).await?;
        let done: Vec<&pb::Result> = results.iter().filter(|r| r.succeeded).collect();
        let mut by_index = BTreeMap::new();
        for r in &results {
            *by_index.entry(r.index).or_insert(0u32) += 1;
        }
        if by_index.values().any(|&n| n > 1) {
            bail!("an index has more than one result");
        }
        let expected: Vec<String> = done
            .iter()
            .map(|r| format!("{dir}{:06}.png", r.index))
            .collect();
        let mut got: Vec<String> = pngs.iter().map(|s| s.to_string()).collect();
        got.sort();
        let mut exp = expected.clone();
        exp.sort();
        if got != exp {
            bail!(
                "objects in S3 under {dir} do not match the recorded results: {} objects, {} results \
                 (objects {:?}, results {:?})",
                got.len(),
                exp.len(),
                &got[..got.len().min(3)],
                &exp[..exp.len().min(3)]
            );
        }
        let mut done_events = BTreeMap::new();
        for e in self.events(&job.id).await? {
            if let pixfarm_core::EventKind::ItemDone { index, .. } = e.kind {
                *done_events.entry(index).or_insert(0u32) += 1;
            }
        }
        if let Some((i, n)) = done_events.iter().find(|(_, n)| **n > 1) {
            bail!("image {i} was recorded done {n} times");
        }
        let manifest_lines = if job.manifest_key.is_empty() {
            None
        } else {
            let bytes = self.storage.get(&job.manifest_key).await?;
            let text = String::from_utf8(bytes.to_vec())?;
            let mut idx = Vec::new();
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l)?;
                idx.push(v["index"].as_u64().context("manifest line without index")?);
            }
            let n = idx.len();
            idx.sort();
            idx.dedup();
            if idx.len() != n {
                bail!("the manifest has duplicate indices");
            }
            Some(n)
        };
        Ok(ExactlyOnce {
            objects: got.len(),
            results: results.len(),
            manifest_lines,
        })
    }

    /// Stops the coordinator (workers are killed on drop).
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), h).await??;
        }
        Ok(())
    }
}

/// What [`Farm::check_exactly_once`] counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactlyOnce {
    pub objects: usize,
    pub results: usize,
    pub manifest_lines: Option<usize>,
}

fn queue_config(o: &FarmOptions) -> QueueConfig {
    QueueConfig {
        lease: LeasePolicy {
            base_ms: o.lease_base_ms,
            per_step_megapixel_ms: 0,
        },
        max_attempts: o.max_attempts,
        fair: pixfarm_core::FairConfig {
            quotas: o
                .tenants_toml
                .as_deref()
                .map(|t| pixfarm_core::TenantQuotas::parse(t).expect("a valid tenants file"))
                .unwrap_or_default(),
            ..Default::default()
        },
        ..QueueConfig::default()
    }
}
