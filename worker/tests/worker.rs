//! The worker in-process against a real `redis-server`, the file store and the bundled tiny
//! checkpoint: renders a job, records every image once with a matching sha256, writes the
//! manifest, dead-letters a task whose control image cannot be decoded, and drains on shutdown.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use pixfarm_core::testing::RedisServer;
use pixfarm_core::{
    ControlKind, ControlSource, ControlSpec, ItemSpec, JobId, JobRecord, JobSpec, JobState, Lane,
    LeasePolicy, PageRequest, Priority, Queue, QueueConfig, ResultStatus, TaskResult, Variant,
};
use pixfarm_worker::{WorkerConfig, run};
use sha2::{Digest, Sha256};

fn model_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny-pixart-lcm"
    ))
}

fn config(redis: &RedisServer, out: &std::path::Path, id: &str) -> WorkerConfig {
    WorkerConfig {
        redis_url: redis.url(),
        storage_url: format!("file://{}", out.display()),
        model_dir: model_dir(),
        worker_id: Some(id.into()),
        max_batch: 4,
        heartbeat_ms: 200,
        lease_base_ms: 2_000,
        poll_ms: 100,
        lanes: vec![
            Lane::new(Priority::High, Variant::Base),
            Lane::new(Priority::Normal, Variant::Base),
            Lane::new(Priority::Normal, Variant::Control),
        ],
        controlnet_dir: Some(model_dir().join("controlnet")),
        ..WorkerConfig::default()
    }
}

async fn wait_done(q: &Queue, job: &JobId, timeout: Duration) -> Result<JobRecord> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let rec = q.get_job(job).await?;
        if rec.state.is_terminal() {
            return Ok(rec);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job not finished in {timeout:?}: {rec:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renders_records_and_drains() -> Result<()> {
    let redis = RedisServer::start().await?;
    let out = tempfile::tempdir()?;
    let qc = QueueConfig {
        lease: LeasePolicy {
            base_ms: 2_000,
            per_step_megapixel_ms: 0,
        },
        max_attempts: 2,
        ..QueueConfig::default()
    };
    let q = Queue::connect(&redis.url(), qc).await?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(run(config(&redis, out.path(), "w-test"), async {
        let _ = stop_rx.await;
    }));

    // Two sizes and two step counts: several groups; seeds given and assigned.
    let spec = JobSpec::new(vec![
        ItemSpec::new("a red fox", 64, 64)
            .with_seed(1)
            .with_images(3),
        ItemSpec::new("a blue bird", 64, 32)
            .with_steps(2)
            .with_images(2),
        ItemSpec::new("a green frog", 64, 64).with_seed(9),
    ])
    .with_prefix("runs/t1");
    let job = q.submit(spec).await?.job;

    // A control task whose image has a valid PNG header but truncated pixel data: fails on every attempt.
    let mut png = Vec::new();
    image::RgbImage::new(64, 64)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    // Keep the header (so submit accepts it) and cut the pixel data short.
    let idat = png
        .windows(4)
        .position(|w| w == b"IDAT")
        .expect("a PNG has IDAT");
    png.truncate(idat + 4 + 6);
    let bad = JobSpec::new(vec![ItemSpec::new("edges", 64, 64).with_control(
        ControlSpec {
            source: ControlSource::Inline(png),
            kind: ControlKind::Edge,
            scale: 1.0,
            low_threshold: None,
            high_threshold: None,
        },
    )]);
    let bad_job = q.submit(bad).await?.job;

    let rec = wait_done(&q, &job, Duration::from_secs(120)).await?;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    assert_eq!(
        (rec.counts.total, rec.counts.succeeded, rec.counts.failed),
        (6, 6, 0)
    );

    let results = q
        .list_results(
            &job,
            &PageRequest {
                size: 100,
                token: None,
            },
        )
        .await?
        .items;
    assert_eq!(results.len(), 6);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.index, i as u64);
        assert_eq!(r.status, ResultStatus::Succeeded);
        assert_eq!(r.worker, "w-test");
        let key = r.key.clone().unwrap();
        assert_eq!(key, format!("default/runs/t1/{job}/{i:06}.png"));
        let bytes = std::fs::read(out.path().join(&key))?;
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            r.sha256.clone().unwrap()
        );
        let img = image::load_from_memory(&bytes)?;
        assert_eq!(
            (img.width(), img.height()),
            (r.parameters.width, r.parameters.height)
        );
        assert!(r.timings.batch_size >= 1 && r.timings.render_ms > 0.0);
    }
    assert_eq!(results[0].seed, 1);
    assert_eq!(results[2].seed, 3);
    assert_eq!(results[4].seed, results[3].seed + 1);
    assert_eq!(results[3].parameters.steps, 2);

    // The manifest is written by whoever finished the job.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let manifest = loop {
        if let Some(k) = q.get_job(&job).await?.manifest_key {
            break std::fs::read_to_string(out.path().join(k))?;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no manifest");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines: Vec<TaskResult> = manifest
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines, results);

    let rec = wait_done(&q, &bad_job, Duration::from_secs(60)).await?;
    assert_eq!((rec.state, rec.counts.failed), (JobState::Failed, 1));
    assert!(
        rec.last_error
            .as_deref()
            .unwrap_or("")
            .contains("undecodable control image"),
        "{rec:?}"
    );
    let dead = q.dead_letters(10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].attempts, 1,
        "bytes that do not decode never will: dead-lettered on the first attempt"
    );

    // The registry entry is refreshed on the next heartbeat.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let workers = q.list_workers().await?;
        assert_eq!(workers.len(), 1);
        if workers[0].images_done >= 6 {
            assert_eq!(workers[0].id, "w-test");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("registry never showed the images: {workers:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop_tx.send(()).ok();
    tokio::time::timeout(Duration::from_secs(30), worker).await???;
    assert!(q.list_workers().await?.is_empty(), "deregistered on drain");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_job_renders_nothing_more() -> Result<()> {
    let redis = RedisServer::start().await?;
    let out = tempfile::tempdir()?;
    let q = Queue::connect(&redis.url(), QueueConfig::default()).await?;
    let job = q
        .submit(JobSpec::new(vec![
            ItemSpec::new("x", 64, 64).with_images(40),
        ]))
        .await?
        .job;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(run(config(&redis, out.path(), "w-cancel"), async {
        let _ = stop_rx.await;
    }));
    // Wait for the first image, then cancel.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while q.get_job(&job).await?.counts.succeeded == 0 {
        if tokio::time::Instant::now() > deadline {
            bail!("nothing rendered");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rec = q.cancel_job(&job).await?;
    assert_eq!(rec.state, JobState::Canceled);
    let at_cancel = rec.counts.succeeded;
    assert!(at_cancel < 40);
    // Give the worker time to go through the rest of the queue.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rec = q.get_job(&job).await?;
    assert_eq!(
        rec.counts.succeeded, at_cancel,
        "nothing recorded after the cancel"
    );
    assert_eq!(
        rec.counts.succeeded + rec.counts.failed + rec.counts.canceled,
        40
    );
    let stored = walk(out.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .count();
    assert_eq!(
        stored as u64, at_cancel,
        "no images stored after the cancel"
    );
    for l in q.lane_stats().await? {
        assert_eq!(
            l.length, 0,
            "queued tasks of the cancelled job were dropped: {l:?}"
        );
    }
    stop_tx.send(()).ok();
    tokio::time::timeout(Duration::from_secs(30), worker).await???;
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Hole 6: a render that runs past its watchdog deadline (here: a deadline of one base lease,
/// shorter than the render) fails its tasks for a retry elsewhere and stops the worker with a
/// clear error, instead of heartbeating the tasks forever; a second worker then renders them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_gives_back_an_overrunning_render() -> Result<()> {
    let redis = RedisServer::start().await?;
    let out = tempfile::tempdir()?;
    let qc = QueueConfig {
        lease: LeasePolicy {
            base_ms: 100,
            per_step_megapixel_ms: 0,
        },
        max_attempts: 3,
        ..QueueConfig::default()
    };
    let q = Queue::connect(&redis.url(), qc).await?;
    let spec = JobSpec::new(
        (0..4)
            .map(|i| ItemSpec::new(format!("slow {i}"), 512, 512).with_seed(i))
            .collect(),
    );
    let job = q.submit(spec).await?.job;

    let hung = WorkerConfig {
        lease_base_ms: 100,
        heartbeat_ms: 40,
        watchdog_factor: 1.0,
        ..config(&redis, out.path(), "w-watchdog")
    };
    let r = tokio::time::timeout(Duration::from_secs(120), run(hung, std::future::pending()))
        .await
        .expect("the watchdog stops the worker");
    let err = r.expect_err("the worker reports the watchdog");
    assert!(
        matches!(err, pixfarm_worker::WorkerError::EngineHung),
        "{err}"
    );
    let rec = q.get_job(&job).await?;
    assert!(!rec.state.is_terminal(), "{rec:?}");
    assert!(
        rec.last_error
            .as_deref()
            .is_some_and(|e| e.contains("watchdog")),
        "{rec:?}"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let healthy = WorkerConfig {
        lease_base_ms: 100,
        heartbeat_ms: 40,
        watchdog_factor: 0.0,
        ..config(&redis, out.path(), "w-healthy")
    };
    let worker = tokio::spawn(run(healthy, async {
        let _ = stop_rx.await;
    }));
    let rec = wait_done(&q, &job, Duration::from_secs(180)).await?;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    let _ = stop_tx.send(());
    worker.await??;
    Ok(())
}
