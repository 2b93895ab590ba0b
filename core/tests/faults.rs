//! The queue's fault windows, one test each, against a real `redis-server`: a job that ends
//! without its manifest, counters that leak when Redis forgets a delivery, half-made submits, a
//! stored image reported failed, re-rendered images, attempts spent on outages, lost dead letters
//! and stale failures on finished jobs.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{base, ok_result};
use pixfarm_core::testing::RedisServer;
use pixfarm_core::{
    EventKind, ItemSpec, JobFilter, JobSpec, JobState, Lane, LeasePolicy, PageRequest, Priority,
    Queue, QueueConfig, Recorded, ResultStatus, Storage, TenantQuotas, Variant,
};

const LEASE_MS: u64 = 300;

fn config(max_attempts: u32) -> QueueConfig {
    QueueConfig {
        lease: LeasePolicy {
            base_ms: LEASE_MS,
            per_step_megapixel_ms: 0,
        },
        max_attempts,
        reclaim_interval: Duration::ZERO,
        ..QueueConfig::default()
    }
}

fn job(n: usize) -> JobSpec {
    JobSpec::new(
        (0..n)
            .map(|i| ItemSpec::new(format!("prompt {i}"), 64, 64).with_seed(i as u64))
            .collect(),
    )
}

async fn pull(q: &Queue, worker: &str) -> Result<Vec<pixfarm_core::Task>> {
    Ok(q.pull(worker, &base(), 64, Duration::from_millis(20))
        .await?)
}

async fn store() -> Result<(tempfile::TempDir, Storage)> {
    let dir = tempfile::tempdir()?;
    let st = Storage::open(&format!("file://{}", dir.path().display())).await?;
    Ok((dir, st))
}

/// Hole 1 (a, b, c): reclaim dead-letters a job's last task, so no worker saw `JobFinished`; the
/// job is marked manifest-due in the same script, `GetJob` says so, and a sweep writes it.
#[tokio::test]
async fn a_job_ended_by_reclaim_still_gets_its_manifest() -> Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(&redis.url(), config(1)).await?;
    let (_d, st) = store().await?;
    let id = q.submit(job(1)).await?.job;
    assert_eq!(pull(&q, "a").await?.len(), 1);
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    assert!(
        pull(&q, "b").await?.is_empty(),
        "dead-lettered, not handed out"
    );
    let rec = q.get_job(&id).await?;
    assert_eq!(rec.state, JobState::Failed);
    assert!(rec.manifest_pending, "the manifest is due");
    assert!(rec.manifest_key.is_none());
    // A young marker is left to its finisher; an old one is swept.
    assert_eq!(
        q.sweep_manifests(&st, Duration::from_secs(60), 10).await?,
        0
    );
    assert_eq!(q.sweep_manifests(&st, Duration::ZERO, 10).await?, 1);
    let rec = q.get_job(&id).await?;
    assert!(!rec.manifest_pending);
    let key = rec.manifest_key.expect("manifest written");
    let body = st.get(&key).await?;
    assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 1);
    assert_eq!(q.sweep_manifests(&st, Duration::ZERO, 10).await?, 0);
    Ok(())
}

/// Hole 1 (d): a cancelled job gets a manifest of what it rendered.
#[tokio::test]
async fn a_cancelled_job_gets_a_manifest() -> Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(&redis.url(), config(3)).await?;
    let (_d, st) = store().await?;
    let id = q.submit(job(3)).await?.job;
    let tasks = pull(&q, "a").await?;
    q.complete(&tasks[0], &ok_result(&tasks[0], "a")).await?;
    q.cancel_job(&id).await?;
    assert!(q.get_job(&id).await?.manifest_pending);
    assert_eq!(q.sweep_manifests(&st, Duration::ZERO, 10).await?, 1);
    let rec = q.get_job(&id).await?;
    assert!(!rec.manifest_pending);
    let body = st.get(&rec.manifest_key.unwrap()).await?;
    assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 1);
    Ok(())
}

/// Hole 2: Redis lost the delivery (AOF `everysec`, a promoted replica), so the worker's `XACK`
/// answers 0. Its counters must still be released, or a tenant at `max_in_flight_tasks` never gets
/// another task.
#[tokio::test]
async fn counters_come_back_when_redis_forgot_a_delivery() -> Result<()> {
    let redis = RedisServer::start().await?;
    let mut cfg = config(3);
    cfg.fair.quotas = TenantQuotas::parse("[default]\nmax_in_flight_tasks = 1\n")?;
    let q = Queue::connect(&redis.url(), cfg).await?;
    q.submit(job(2)).await?;
    let first = pull(&q, "a").await?;
    assert_eq!(first.len(), 1, "the in-flight quota lets one through");
    // Forget the delivery: the entry is in the stream but no longer pending.
    let mut c = q.connection();
    let lane = Lane::new(Priority::Normal, Variant::Base);
    let _: i64 = redis::cmd("XACK")
        .arg(lane.key())
        .arg("workers")
        .arg(&first[0].entry_id)
        .query_async(&mut c)
        .await?;
    q.complete(&first[0], &ok_result(&first[0], "a")).await?;
    let usage = q.tenant_usage("default").await?;
    assert_eq!(
        (usage.queued, usage.in_flight),
        (1, 1),
        "released, refilled"
    );
    let second = pull(&q, "a").await?;
    assert_eq!(second.len(), 1, "the tenant is not blocked");
    q.complete(&second[0], &ok_result(&second[0], "a")).await?;
    let usage = q.tenant_usage("default").await?;
    assert_eq!((usage.queued, usage.in_flight), (0, 0));
    Ok(())
}

/// Hole 3: a submit is all or nothing. Two racing submits with one key and a job bigger than a
/// chunk (so both stage chunks) make exactly one job; the loser's staged chunks vanish and the
/// tenant's queued count is the job's size, not twice it. A refused submit leaves no key behind.
#[tokio::test]
async fn racing_and_refused_submits_make_at_most_one_job() -> Result<()> {
    let redis = RedisServer::start().await?;
    let mut cfg = config(3);
    cfg.enqueue_chunk = 2;
    cfg.fair.quotas = TenantQuotas::parse("[default]\nmax_queued_tasks = 7\n")?;
    let q = Queue::connect(&redis.url(), cfg).await?;
    let spec = job(5).with_idempotency_key("k1");
    let (a, b) = tokio::join!(q.submit(spec.clone()), q.submit(spec.clone()));
    let (a, b) = (a?, b?);
    assert_eq!(a.job, b.job);
    assert_eq!(u32::from(a.created) + u32::from(b.created), 1);
    let jobs = q
        .list_jobs(&JobFilter::default(), &PageRequest::default())
        .await?;
    assert_eq!(jobs.items.len(), 1);
    assert_eq!(q.tenant_usage("default").await?.queued, 5);
    let mut c = q.connection();
    let staged: Vec<String> = redis::cmd("KEYS")
        .arg("pf:job:*:stage:*")
        .query_async(&mut c)
        .await?;
    assert!(staged.is_empty(), "no staged chunk left: {staged:?}");
    // Over the queued quota: refused, and the key is free for the retry after the quota clears.
    let big = job(3).with_idempotency_key("k2");
    assert!(q.submit(big.clone()).await.is_err());
    let ik: Option<String> = redis::cmd("GET")
        .arg("pf:idem:default:k2")
        .query_async(&mut c)
        .await?;
    assert!(ik.is_none(), "a refused submit claims no key");
    for t in pull(&q, "a").await? {
        q.complete(&t, &ok_result(&t, "a")).await?;
    }
    assert_eq!(q.tenant_usage("default").await?.queued, 0);
    assert!(q.submit(big).await?.created);
    Ok(())
}

/// Hole 4: the worker holding the last allowed attempt stalls past its lease, another worker's
/// reclaim dead-letters the task, then the first worker's upload lands. The stored image wins:
/// the job counts it as done and the manifest is due again.
#[tokio::test]
async fn a_late_success_replaces_a_dead_lettered_failure() -> Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(&redis.url(), config(1)).await?;
    let (_d, st) = store().await?;
    let id = q.submit(job(1)).await?.job;
    let a = pull(&q, "a").await?;
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    assert!(pull(&q, "b").await?.is_empty());
    assert_eq!(q.get_job(&id).await?.state, JobState::Failed);
    q.sweep_manifests(&st, Duration::ZERO, 10).await?;
    assert!(!q.get_job(&id).await?.manifest_pending);
    let r = q.complete(&a[0], &ok_result(&a[0], "a")).await?;
    assert_eq!(r, Recorded::JobFinished(JobState::Succeeded));
    let rec = q.get_job(&id).await?;
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!((rec.counts.succeeded, rec.counts.failed), (1, 0));
    assert!(rec.manifest_pending, "the manifest must be rewritten");
    let results = q.all_results(&id).await?;
    assert_eq!(results[0].status, ResultStatus::Succeeded);
    // A failure arriving after a success changes nothing.
    let again = q.complete(&a[0], &ok_result(&a[0], "a")).await?;
    assert_eq!(again, Recorded::Duplicate);
    Ok(())
}

/// Hole 5: a worker recorded an image and died before acknowledging it; the entry's lease runs
/// out and the next pull would hand it out again. It is dropped there instead of being rendered
/// and stored a second time.
#[tokio::test]
async fn recorded_images_are_not_handed_out_again() -> Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(&redis.url(), config(3)).await?;
    q.submit(job(2)).await?;
    let tasks = pull(&q, "a").await?;
    assert_eq!(tasks.len(), 2);
    q.complete(&tasks[1], &ok_result(&tasks[1], "a")).await?;
    // Recorded, but the acknowledgement never happened (it names an entry that is not there).
    let mut ghost = tasks[0].clone();
    ghost.entry_id = "0-1".into();
    q.complete(&ghost, &ok_result(&tasks[0], "a")).await?;
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    assert!(
        pull(&q, "b").await?.is_empty(),
        "recorded: not rendered again"
    );
    let mut c = q.connection();
    let len: u64 = redis::cmd("XLEN")
        .arg(tasks[0].lane.key())
        .query_async(&mut c)
        .await?;
    assert_eq!(len, 0, "the stale entry is acknowledged and deleted");
    let usage = q.tenant_usage("default").await?;
    assert_eq!((usage.queued, usage.in_flight), (0, 0));
    Ok(())
}

/// Hole 7: an infrastructure failure gives the task back without counting an attempt, however
/// often it happens.
#[tokio::test]
async fn deferred_tasks_keep_their_attempts() -> Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(&redis.url(), config(2)).await?;
    let id = q.submit(job(1)).await?.job;
    for _ in 0..5 {
        let t = pull(&q, "a").await?;
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].attempt, 1, "an outage is not the task's attempt");
        assert!(q.defer("a", &t[0], "storage: connection refused").await?);
    }
    let t = pull(&q, "a").await?;
    q.complete(&t[0], &ok_result(&t[0], "a")).await?;
    assert_eq!(q.get_job(&id).await?.state, JobState::Succeeded);
    assert!(q.dead_letters(10).await?.is_empty());
    Ok(())
}

/// Hole 8: the dead letter is written with the failure (one script), once; a stale retried
/// failure does not touch a finished job.
#[tokio::test]
async fn dead_letters_are_written_once_and_stale_failures_ignored() -> Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(&redis.url(), config(1)).await?;
    let id = q.submit(job(2)).await?.job;
    let t = pull(&q, "a").await?;
    q.fail("a", &t[0], "bad prompt", false).await?;
    // A replay of the same failure (a worker that lost the reply) adds no second dead letter.
    q.fail("a", &t[0], "bad prompt", false).await?;
    let dead = q.dead_letters(10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].job.clone(), dead[0].index),
        (id.clone(), t[0].spec.index)
    );
    q.complete(&t[1], &ok_result(&t[1], "a")).await?;

    let q3 = Queue::connect(&redis.url(), config(3)).await?;
    let id2 = q3.submit(job(1)).await?.job;
    let a = pull(&q3, "a").await?;
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    let b = pull(&q3, "b").await?;
    q3.complete(&b[0], &ok_result(&b[0], "b")).await?;
    // worker-a wakes up and reports a retryable failure of the finished task.
    q3.fail("a", &a[0], "late timeout", true).await?;
    let rec = q3.get_job(&id2).await?;
    assert_eq!(rec.state, JobState::Succeeded);
    assert!(rec.last_error.is_none(), "{:?}", rec.last_error);
    let evs = q3.events(&id2, None, 100, None).await?;
    let after_finish = evs
        .iter()
        .skip_while(|e| !matches!(e.kind, EventKind::JobFinished { .. }))
        .skip(1)
        .count();
    assert_eq!(after_finish, 0, "no event after the job finished");
    Ok(())
}
