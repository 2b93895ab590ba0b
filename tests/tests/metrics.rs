//! `/metrics` during a real job (issue 5): real redis-server and s3s-fs, the
//! coordinator in-process with its metrics endpoint, two worker processes with
//! theirs. The queue-depth gauge must start at the job's size and fall to zero,
//! and the workers' counters must add up to the job's size.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pixfarm_e2e::prom::{self, Sample};
use pixfarm_e2e::{Farm, FarmOptions, items};
use pixfarm_proto::v1 as pb;

const JOB: usize = 120;
const LONG: Duration = Duration::from_secs(300);

async fn scrape(addr: SocketAddr) -> Result<Vec<Sample>> {
    prom::parse(&prom::get(addr, "/metrics").await?)
}

fn value(s: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    prom::sum(s, name, labels).unwrap_or(0.0)
}

/// Scrapes `addr` until `pred` holds (the queue gauges refresh every 2 s).
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    pred: impl Fn(&[Sample]) -> bool,
) -> Result<Vec<Sample>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(addr).await?;
        if pred(&s) {
            return Ok(s);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached in 20 s; last scrape:\n{:#?}",
            s.iter()
                .filter(|x| x.name.starts_with("pixfarm_"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a freshly spawned process answers on its metrics port.
async fn wait_up(addr: SocketAddr) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match prom::get(addr, "/healthz").await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_job_from_full_queue_to_zero() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        coordinator_metrics: true,
        worker_metrics: true,
        max_batch: 4,
        ..Default::default()
    })
    .await?;
    let coord = farm
        .coordinator_metrics
        .as_ref()
        .context("coordinator metrics not started")?
        .local_addr();

    // Submitted before any worker exists, so the gauges must show the whole job waiting.
    let job = farm
        .submit(
            items(JOB, 64),
            pb::JobSpec {
                output_prefix: "metrics".into(),
                ..Default::default()
            },
        )
        .await?;
    let n = JOB as f64;
    let before = scrape_until(coord, "queue depth = job size", |s| {
        value(s, "pixfarm_queue_depth_tasks", &[]) == n
    })
    .await?;
    // Nothing delivered yet: the job is split between the stream's undelivered window (lag) and
    // the fair-share backlog behind it.
    let lane = [("lane", "normal:base")];
    assert_eq!(
        value(&before, "pixfarm_lane_lag_tasks", &lane)
            + value(&before, "pixfarm_lane_backlog_tasks", &lane),
        n,
        "lag + backlog = job size"
    );
    assert!(value(&before, "pixfarm_lane_lag_tasks", &lane) > 0.0);
    assert_eq!(
        value(&before, "pixfarm_lane_pending_tasks", &[]),
        0.0,
        "no worker yet: nothing pending"
    );
    assert_eq!(value(&before, "pixfarm_jobs_submitted_total", &[]), 1.0);
    assert_eq!(value(&before, "pixfarm_tasks_submitted_total", &[]), n);
    assert_eq!(
        value(
            &before,
            "pixfarm_rpc_requests_total",
            &[("method", "SubmitJob"), ("code", "Ok")]
        ),
        1.0
    );

    farm.spawn_worker("m1")?;
    farm.spawn_worker("m2")?;
    let workers: Vec<SocketAddr> = farm
        .workers
        .iter()
        .map(|w| w.metrics_addr.context("worker metrics not enabled"))
        .collect::<Result<_>>()?;

    for (w, addr) in farm.workers.iter().zip(&workers) {
        wait_up(*addr).await.with_context(|| {
            format!(
                "worker {} never served /metrics\n{}",
                w.id,
                farm.worker_logs()
            )
        })?;
    }

    // While the job runs, the coordinator and the workers answer scrapes.
    let mut depths = vec![n];
    let mut saw_worker_in_flight = false;
    loop {
        let j = farm.get(&job).await?;
        let s = scrape(coord).await?;
        depths.push(value(&s, "pixfarm_queue_depth_tasks", &[]));
        for w in &workers {
            let ws = scrape(*w).await.with_context(|| farm.worker_logs())?;
            if value(&ws, "pixfarm_worker_tasks_in_flight", &[]) > 0.0 {
                saw_worker_in_flight = true;
            }
        }
        if pixfarm::client::is_terminal(j.state) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let j = farm.wait(&job, LONG).await?;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{j:?}");
    assert_eq!((j.done, j.failed), (JOB as u64, 0));
    // Stream length and backlog are read by separate commands while refills move tasks between
    // them, so a single sample may be off by a refill; it never exceeds the job.
    assert!(
        depths.iter().all(|&d| (0.0..=n).contains(&d)),
        "queue depth outside 0..={n} during the job: {depths:?}"
    );

    let after = scrape_until(coord, "queue depth back to 0", |s| {
        value(s, "pixfarm_queue_depth_tasks", &[]) == 0.0
    })
    .await?;
    assert_eq!(value(&after, "pixfarm_lane_lag_tasks", &[]), 0.0);
    assert_eq!(value(&after, "pixfarm_lane_backlog_tasks", &[]), 0.0);
    assert_eq!(value(&after, "pixfarm_lane_pending_tasks", &[]), 0.0);
    assert_eq!(value(&after, "pixfarm_dead_letters", &[]), 0.0);
    assert!(
        value(
            &after,
            "pixfarm_rpc_requests_total",
            &[("method", "GetJob"), ("code", "Ok")]
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            "pixfarm_rpc_duration_seconds_count",
            &[("method", "GetJob")]
        ) >= 1.0
    );

    // Worker counters add up to the job: every task completed exactly once across the two
    // workers, none failed, retried or recorded twice, and every image went through one render,
    // one encode and one upload.
    let mut totals = std::collections::BTreeMap::<&str, f64>::new();
    let names = [
        "pixfarm_worker_tasks_completed_total",
        "pixfarm_worker_tasks_failed_total",
        "pixfarm_worker_tasks_retried_total",
        "pixfarm_worker_tasks_duplicate_total",
        "pixfarm_worker_batch_size_sum",
        "pixfarm_worker_image_duration_seconds_count",
        "pixfarm_worker_upload_duration_seconds_count",
        "pixfarm_worker_task_latency_seconds_count",
        "pixfarm_worker_tasks_in_flight",
    ];
    let mut per_worker = Vec::new();
    for (w, addr) in farm.workers.iter().zip(&workers) {
        let s = scrape(*addr).await?;
        // Every series of a worker carries its id.
        let completed = value(
            &s,
            "pixfarm_worker_tasks_completed_total",
            &[("worker", w.id.as_str())],
        );
        per_worker.push((w.id.clone(), completed));
        for name in names {
            *totals.entry(name).or_default() += value(&s, name, &[]);
        }
        assert!(
            value(&s, "pixfarm_worker_batch_size_count", &[]) >= 1.0,
            "{} rendered no batch",
            w.id
        );
    }
    assert_eq!(
        totals["pixfarm_worker_tasks_completed_total"], n,
        "{per_worker:?}"
    );
    assert_eq!(totals["pixfarm_worker_tasks_failed_total"], 0.0);
    assert_eq!(totals["pixfarm_worker_tasks_retried_total"], 0.0);
    assert_eq!(totals["pixfarm_worker_tasks_duplicate_total"], 0.0);
    assert_eq!(totals["pixfarm_worker_batch_size_sum"], n);
    assert_eq!(totals["pixfarm_worker_image_duration_seconds_count"], n);
    assert_eq!(totals["pixfarm_worker_upload_duration_seconds_count"], n);
    assert_eq!(totals["pixfarm_worker_task_latency_seconds_count"], n);
    assert_eq!(totals["pixfarm_worker_tasks_in_flight"], 0.0);
    assert!(
        saw_worker_in_flight,
        "no scrape caught a worker holding tasks"
    );
    // The counters agree with the recorded results, worker by worker.
    let results = farm.results(&job).await?;
    for (id, completed) in &per_worker {
        let recorded = results.iter().filter(|r| &r.worker == id).count() as f64;
        assert_eq!(*completed, recorded, "worker {id}");
    }
    let once = farm.check_exactly_once(&j).await?;
    assert_eq!((once.objects, once.manifest_lines), (JOB, Some(JOB)));
    farm.shutdown().await
}
