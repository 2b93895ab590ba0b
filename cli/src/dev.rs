//! `pixfarm dev`: the whole farm on one machine, in one command.
//!
//! Uses `REDIS_URL` or starts a `redis-server` child on a free port (killed on
//! exit), stores results under `./pixfarm-dev/store` (the `file://` store),
//! runs the coordinator and one worker in this process, submits
//! `examples/prompts.jsonl`, shows progress and prints where the images are.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use pixfarm_coordinator::CoordinatorConfig;
use pixfarm_proto::v1 as pb;
use pixfarm_worker::WorkerConfig;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::{client, input, sheet};

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Model directory in the diffusers layout (by default the bundled model the project trains itself,
    /// which draws coloured shapes at 64×64: see models/README.md).
    #[arg(
        long,
        env = "PIXFARM_MODEL_DIR",
        default_value = "models/pixart-lcm-shapes"
    )]
    pub model: PathBuf,
    /// ControlNet adapter directory; default: the model's `controlnet/` folder when it has one
    /// (the bundled model does), so the sample batch's edge-guided lines render too.
    #[arg(long, env = "PIXFARM_CONTROLNET_DIR")]
    pub controlnet_dir: Option<PathBuf>,
    /// Prompts to render (JSONL or plain text).
    #[arg(long, default_value = "examples/prompts.jsonl")]
    pub prompts: PathBuf,
    /// Size of items that do not set one, as WxH (the bundled model was trained at 64×64).
    #[arg(long, default_value = "64x64", value_parser = input::parse_size)]
    pub size: (u32, u32),
    /// Working directory: results go to DIR/store.
    #[arg(long, default_value = "pixfarm-dev")]
    pub dir: PathBuf,
    /// Redis to use instead of starting one.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Coordinator address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Web gallery address (port 0: any free port); its URL is printed.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub web_addr: std::net::SocketAddr,
    /// Do not serve the web gallery.
    #[arg(long)]
    pub no_web: bool,
    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long, env = "PIXFARM_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Most images rendered together.
    #[arg(long, default_value_t = 4)]
    pub max_batch: usize,
    /// Keep the farm running after the sample batch (until Ctrl-C), so other
    /// `pixfarm` commands can use it.
    #[arg(long)]
    pub keep_running: bool,
}

/// A `redis-server` child that dies with us.
struct RedisChild {
    child: Child,
    url: String,
}

impl RedisChild {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let data = dir.join("redis");
        std::fs::create_dir_all(&data)?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--dir"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context(
                "cannot start redis-server; install it (Debian/Ubuntu: `sudo apt-get install redis-server`) or set REDIS_URL",
            )?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > deadline {
                bail!("redis-server did not start listening on port {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if !args.model.join("model_index.json").exists() {
        bail!(
            "no model at {} (expected a diffusers directory with model_index.json); run from the repository root, \
             or pass --model DIR",
            args.model.display()
        );
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let store = dir.join("store");
    std::fs::create_dir_all(&store)?;
    let storage_url = format!("file://{}", store.display());

    let redis = match &args.redis_url {
        Some(url) => {
            println!("using Redis at {url}");
            None
        }
        None => {
            let r = RedisChild::start(&dir).await?;
            println!(
                "started redis-server at {} (data in {})",
                r.url,
                dir.join("redis").display()
            );
            Some(r)
        }
    };
    let redis_url = args
        .redis_url
        .clone()
        .unwrap_or_else(|| redis.as_ref().map(|r| r.url.clone()).unwrap_or_default());

    let result = run_farm(&args, &redis_url, &storage_url, &store).await;
    if let Some(r) = redis {
        r.stop().await;
    }
    result
}

async fn run_farm(
    args: &DevArgs,
    redis_url: &str,
    storage_url: &str,
    store: &Path,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut cconf = CoordinatorConfig::new(redis_url, storage_url);
    cconf.default_size = args.size;
    // A local playground: no tokens, no TLS (the coordinator logs both loudly).
    cconf.auth.insecure_no_auth = true;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let web = if args.no_web {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(args.web_addr)
                .await
                .with_context(|| format!("cannot listen on {}", args.web_addr))?,
        )
    };
    let web_url = match &web {
        Some(l) => Some(format!("http://{}/", l.local_addr()?)),
        None => None,
    };
    let coordinator = tokio::spawn(pixfarm_coordinator::serve_all(
        cconf,
        listener,
        web,
        stopped(stop_rx.clone()),
    ));
    if let Some(url) = &web_url {
        println!("web gallery: {url}");
    }

    let wconf = WorkerConfig {
        redis_url: redis_url.to_string(),
        storage_url: storage_url.to_string(),
        model_dir: args.model.clone(),
        device: args.device.clone(),
        max_batch: args.max_batch,
        worker_id: Some("dev-worker".into()),
        controlnet_dir: args
            .controlnet_dir
            .clone()
            .or_else(|| Some(args.model.join("controlnet")).filter(|d| d.is_dir())),
        ..WorkerConfig::default()
    };
    let mut worker = tokio::spawn(pixfarm_worker::run(wconf, stopped(stop_rx.clone())));
    println!(
        "coordinator on {addr}, one worker ({}), results under {}",
        args.device,
        store.display()
    );

    // A worker that dies (say, the model does not load) ends the wait with its error.
    let mut worker_done = false;
    let addr_text = addr.to_string();
    let outcome = tokio::select! {
        r = submit_and_wait(args, &addr_text, store) => r,
        w = &mut worker => {
            worker_done = true;
            Err(match w {
                Ok(Err(e)) => anyhow::anyhow!(e).context("the worker stopped"),
                Ok(Ok(())) => anyhow::anyhow!("the worker stopped unexpectedly"),
                Err(e) => anyhow::anyhow!("the worker panicked: {e}"),
            })
        }
    };

    if outcome.is_ok() && args.keep_running {
        println!("farm running; try `pixfarm --coordinator {addr} list`. Ctrl-C stops it.");
        pixfarm_coordinator::shutdown_signal().await;
    }
    let _ = stop_tx.send(true);
    if !worker_done {
        match tokio::time::timeout(Duration::from_secs(60), worker).await {
            Ok(Ok(Err(e))) if outcome.is_ok() => {
                return Err(anyhow::anyhow!(e).context("the worker failed"));
            }
            Ok(_) => {}
            Err(_) => eprintln!("the worker did not stop within 60 s"),
        }
    }
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(10), coordinator).await
        && outcome.is_ok()
    {
        return Err(anyhow::anyhow!(e).context("the coordinator failed"));
    }
    outcome
}

async fn submit_and_wait(args: &DevArgs, addr: &str, store: &Path) -> anyhow::Result<()> {
    let parsed = input::read_items(&args.prompts)?;
    let parsed = input::apply_overrides(
        parsed,
        &input::Overrides {
            size: Some(args.size),
            ..Default::default()
        },
    );
    let mut c = client::connect(addr).await?;
    let spec = pb::JobSpec {
        output_prefix: "dev".into(),
        labels: [("source".to_string(), "pixfarm-dev".to_string())].into(),
        ..Default::default()
    };
    let resp = client::submit(&mut c, spec, &parsed).await?;
    println!(
        "submitted job {} ({} images from {})",
        resp.job_id,
        resp.task_count,
        args.prompts.display()
    );
    // Wait for the worker to load the model and render everything.
    let mut job = client::wait(&mut c, &resp.job_id, false).await?;
    // The worker writes the manifest just after the last image is recorded.
    for _ in 0..50 {
        if !job.manifest_key.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        job = client::get_job(&mut c, &resp.job_id).await?;
    }
    // Objects live under `{tenant}/{prefix}/{job}/` (the tenant is `default` without auth).
    let tenant = job
        .spec
        .as_ref()
        .map(|s| s.tenant.as_str())
        .filter(|t| !t.is_empty())
        .unwrap_or(pixfarm_core::model::DEFAULT_TENANT);
    let job_dir = store
        .join(pixfarm_core::object_prefix(tenant, "dev"))
        .join(&resp.job_id);
    println!(
        "job {} {}: {} images done, {} failed",
        job.id,
        client::state_name(job.state),
        job.done,
        job.failed
    );
    println!("images:   {}/", job_dir.display());
    if !job.manifest_key.is_empty() {
        let manifest = store.join(&job.manifest_key);
        println!("manifest: {}", manifest.display());
        // The store's root is DIR/store: the sheet goes beside it, where a person looks first (the
        // latest run's; every job's images stay in the store).
        let out = store.parent().unwrap_or(store).join("contact-sheet.png");
        let lines = sheet::read_manifest(&manifest)?;
        let n = sheet::write(&out, store, &lines)?;
        println!(
            "contact sheet ({n} images with their prompts): {}",
            out.display()
        );
    }
    if job.failed > 0 {
        bail!(
            "{} images failed; last error: {}",
            job.failed,
            job.last_error
        );
    }
    Ok(())
}
