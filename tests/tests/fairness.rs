//! Fair share end to end: tenant A's 10,000-task backlog and tenant B's 100 tasks submitted
//! after it, two worker processes with the tiny checkpoint at 64×64, 1 step. B's first task must
//! start within a small bound and B must finish long before A. The figures are printed (run with
//! `--nocapture`) and recorded in BENCHMARKS.md, "Fair share".
//!
//! Jobs are submitted through `Queue::submit` with explicit tenants: without authentication the
//! gRPC API has no tenant field (the coordinator sets it from the caller's token), and this is
//! the same admission path the coordinator uses.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use pixfarm_core::{EventKind, ItemSpec, JobId, JobSpec, JobState};
use pixfarm_e2e::{Farm, FarmOptions};

const A_TASKS: usize = 10_000;
const B_TASKS: usize = 100;
const MAX_BATCH: usize = 8;
const WORKERS: usize = 2;

fn job(tenant: &str, n: usize) -> JobSpec {
    let mut s = JobSpec::new(
        (0..n)
            .map(|i| {
                ItemSpec::new(format!("{tenant} image {i}"), 64, 64)
                    .with_seed(i as u64)
                    .with_steps(1)
            })
            .collect(),
    );
    s.tenant = tenant.to_string();
    s
}

/// Unix ms of each `ItemDone` event of a job, in order.
async fn done_times(farm: &Farm, job: &JobId) -> Result<Vec<u64>> {
    Ok(farm
        .events(job.as_str())
        .await?
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::ItemDone { .. }))
        .map(|e| e.at_ms)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_small_tenant_is_served_within_a_bound_and_finishes_first() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        max_batch: MAX_BATCH,
        ..FarmOptions::default()
    })
    .await?;
    let target = farm.queue.config().fair.stream_target as usize;
    let quantum = farm.queue.config().fair.quantum as usize;
    for i in 0..WORKERS {
        farm.spawn_worker(&format!("w{i}"))?;
    }
    let a = farm.queue.submit(job("tenant-a", A_TASKS)).await?.job;

    // Let A reach a steady state (workers busy, A's window in the stream) before B arrives.
    farm.wait_until(a.as_str(), Duration::from_secs(120), |j| j.done >= 50)
        .await?;
    let a_before = farm.queue.get_job(&a).await?.counts.succeeded;
    let t0 = Instant::now();
    let b_submit_ms = pixfarm_core::now_ms();
    let b = farm.queue.submit(job("tenant-b", B_TASKS)).await?.job;

    let deadline = t0 + Duration::from_secs(240);
    let b_done_wall = loop {
        let rec = farm.queue.get_job(&b).await?;
        if rec.state.is_terminal() {
            break t0.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "B not finished after {:?}: {:?}\n{}",
                t0.elapsed(),
                rec.counts,
                farm.worker_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let b_rec = farm.queue.get_job(&b).await?;
    assert_eq!(b_rec.state, JobState::Succeeded);
    assert_eq!(b_rec.counts.succeeded, B_TASKS as u64);
    let a_rec = farm.queue.get_job(&a).await?;
    assert!(!a_rec.state.is_terminal(), "A is still running");

    // From the events: B's first and last image, and A's images finished in between.
    let b_times = done_times(&farm, &b).await?;
    let a_times = done_times(&farm, &a).await?;
    let b_first = *b_times.iter().min().expect("B has results");
    let b_last = *b_times.iter().max().expect("B has results");
    let a_before_b_first = a_times
        .iter()
        .filter(|&&t| t > b_submit_ms && t < b_first)
        .count();
    let a_during_b = a_times
        .iter()
        .filter(|&&t| t > b_submit_ms && t <= b_last)
        .count();
    let a_left = A_TASKS as u64 - a_rec.counts.succeeded - a_rec.counts.failed;
    let first_wait_ms = b_first.saturating_sub(b_submit_ms);
    let b_total_ms = b_last.saturating_sub(b_submit_ms);
    eprintln!(
        "fair share: A {A_TASKS} tasks ({a_before} done when B arrived), B {B_TASKS} tasks, \
         {WORKERS} workers x batch {MAX_BATCH}, stream target {target}, quantum {quantum}\n\
         B first image {first_wait_ms} ms after its submit, after {a_before_b_first} more A images; \
         B done in {b_total_ms} ms (poll saw it at {b_done_wall:?}), A images meanwhile {a_during_b}; \
         A still has {a_left} tasks left"
    );

    // Bound on B's first image, in tasks: the A window already in the stream (target), one A
    // turn, and what the workers already hold (each worker: the batch rendering plus the
    // batches waiting for upload, `upload_depth` 2 by default).
    let bound = target + quantum + WORKERS * MAX_BATCH * 3;
    assert!(
        a_before_b_first <= bound,
        "{a_before_b_first} A images before B's first (bound {bound})"
    );
    // With two tenants and equal quanta, A gets about as many images as B while B runs.
    assert!(
        a_during_b <= bound + 2 * B_TASKS,
        "{a_during_b} A images while B ran"
    );
    assert!(
        a_left > (A_TASKS as u64) * 8 / 10,
        "B finished long before A: {a_left} A tasks left"
    );

    // Cancel A: its backlog is released at once, stream entries are dropped by the workers, and
    // both tenants' counters return to zero.
    farm.queue.cancel_job(&a).await?;
    let mut last = (u64::MAX, u64::MAX);
    for _ in 0..300 {
        let ua = farm.queue.tenant_usage("tenant-a").await?;
        let ub = farm.queue.tenant_usage("tenant-b").await?;
        last = (ua.queued + ub.queued, ua.in_flight + ub.in_flight);
        if last == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, (0, 0), "counters back to zero after the cancel");
    assert_eq!(farm.lane_entries().await?, 0);
    farm.shutdown().await
}
