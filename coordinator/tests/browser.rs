//! The web gallery in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs) against the gallery over a real `redis-server` and S3 server. The browser runs the
//! page's JavaScript and loads the thumbnails from the S3 server through the gallery's
//! presigned-URL redirects under the Content-Security-Policy; the test reads the DOM it dumps and
//! saves a screenshot as an artefact (`$CARGO_TARGET_TMPDIR/web-gallery/`).
//!
//! Chromium's command line cannot send a bearer token, so this farm runs without authentication
//! (the tenant, token, cookie and CSRF rules are covered over HTTP in `tests/web.rs`). Skipped,
//! saying so, when no `chromium` is installed (`PIXFARM_CHROMIUM` names another binary).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pixfarm_coordinator::Authenticator;
use pixfarm_coordinator::web::{self, WebState};
use pixfarm_core::testing::{RedisServer, S3Server};
use pixfarm_core::{
    ItemSpec, JobId, JobSpec, Lane, Queue, QueueConfig, Storage, Task, TaskResult, Timings, Variant,
};

const XSS: &str = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> a cat";

/// A 1×1 PNG (red).
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0xfc, 0xcf, 0xc0, 0x50,
    0x0f, 0x00, 0x04, 0x85, 0x01, 0x80, 0x84, 0xa9, 0x8c, 0x21, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PIXFARM_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(move |d| d.join(name))
                .collect::<Vec<_>>()
        })
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `extra` flags (`--dump-dom` or `--screenshot=…`); returns
/// its stdout.
fn browse(bin: &Path, profile: &Path, url: &str, extra: &[String]) -> Result<String> {
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,900",
            // Let the page's script run (lazy grid, event stream) before the DOM is dumped.
            "--run-all-compositor-stages-before-draw",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "chromium failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn tasks_of(queue: &Queue, job: &JobId, want: usize) -> Result<Vec<Task>> {
    let mut out = Vec::new();
    for _ in 0..20 {
        let t = queue
            .pull(
                "w-browser",
                &Lane::all_of(Variant::Base),
                100,
                Duration::from_millis(100),
            )
            .await?;
        out.extend(t.into_iter().filter(|t| &t.spec.job == job));
        if out.len() >= want {
            out.sort_by_key(|t| t.spec.index);
            return Ok(out);
        }
    }
    bail!("only {} tasks pulled", out.len())
}

async fn complete(queue: &Queue, storage: &Storage, task: &Task) -> Result<()> {
    storage
        .put(&task.spec.output_key, PNG.to_vec().into(), "image/png")
        .await?;
    let res = TaskResult::succeeded(
        task,
        task.spec.output_key.clone(),
        "00".into(),
        "w-browser",
        Timings::default(),
    );
    queue.complete(task, &res).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gallery_in_headless_chromium() -> Result<()> {
    let Some(bin) = chromium() else {
        eprintln!(
            "SKIPPED: no chromium on PATH (apt-get install chromium, or set PIXFARM_CHROMIUM)"
        );
        return Ok(());
    };
    let redis = RedisServer::start().await?;
    let s3 = S3Server::from_env_or_start().await?;
    let queue = Queue::connect(&redis.url(), QueueConfig::default()).await?;
    queue.ensure_groups().await?;
    let bucket = format!(
        "browser-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let storage = Storage::open_with(&s3.storage_url(&bucket), s3.storage_options()).await?;
    let state = WebState::new(queue.clone(), storage.clone(), Authenticator::disabled()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = web::start(listener, state, async {
        let _ = rx.await;
    })?;
    let base = format!("http://{}", server.addr);

    let n = 8;
    let items = (0..n)
        .map(|i| {
            let p = if i == 0 {
                XSS.to_string()
            } else {
                format!("a shape number {i}")
            };
            ItemSpec::new(p, 64, 64).with_seed(i as u64)
        })
        .collect();
    let mut spec = JobSpec::new(items);
    spec.labels.insert("suite".into(), "browser".into());
    let job = queue.submit(spec).await?.job;
    let tasks = tasks_of(&queue, &job, n).await?;
    for t in &tasks[..2] {
        complete(&queue, &storage, t).await?;
    }

    let profile = tempfile::tempdir()?;
    let dump = |url: String| {
        let bin = bin.clone();
        let profile = profile.path().to_path_buf();
        tokio::task::spawn_blocking(move || browse(&bin, &profile, &url, &["--dump-dom".into()]))
    };

    // The jobs page shows the running job; its progress advances.
    let t = std::time::Instant::now();
    let dom = dump(format!("{base}/jobs")).await??;
    eprintln!(
        "chromium: jobs page dumped in {} ms",
        t.elapsed().as_millis()
    );
    let row = format!("id=\"job-{}\"", job.as_str());
    assert!(dom.contains(&row), "{dom}");
    assert!(dom.contains("class=\"state running\""), "{dom}");
    assert!(dom.contains("2/8 done"), "{dom}");
    for t in &tasks[2..5] {
        complete(&queue, &storage, t).await?;
    }
    let dom = dump(format!("{base}/jobs")).await??;
    assert!(dom.contains("5/8 done"), "progress advanced: {dom}");

    // The job page: one thumbnail per result, prompts as text, the XSS prompt inert.
    let dom = dump(format!("{base}/jobs/{}", job.as_str())).await??;
    assert_eq!(dom.matches("<figure class=\"card ok\"").count(), 5, "{dom}");
    assert!(dom.contains("a shape number 4"), "{dom}");
    assert!(
        dom.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;"),
        "{dom}"
    );
    assert!(!dom.contains("<script>document.title"), "{dom}");
    assert!(!dom.contains("<img src=\"x\""), "{dom}");
    assert!(
        !dom.contains("<title>pwned"),
        "the script did not run: {dom}"
    );

    // A screenshot as an artefact.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-gallery");
    std::fs::create_dir_all(&dir)?;
    let shot = dir.join("job.png");
    let _ = std::fs::remove_file(&shot);
    {
        let (bin, profile, url, shot) = (
            bin.clone(),
            profile.path().to_path_buf(),
            format!("{base}/jobs/{}", job.as_str()),
            shot.clone(),
        );
        tokio::task::spawn_blocking(move || {
            browse(
                &bin,
                &profile,
                &url,
                &[format!("--screenshot={}", shot.display())],
            )
        })
        .await??;
    }
    let png =
        std::fs::read(&shot).with_context(|| format!("no screenshot at {}", shot.display()))?;
    assert!(
        png.starts_with(&PNG[..8]) && png.len() > 5_000,
        "{} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
    let _ = stop.send(());
    Ok(())
}
