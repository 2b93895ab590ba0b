//! Queue tests against a real `redis-server` (one per test, on a free port).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use common::{base, ok_result};
use pixfarm_core::testing::{RedisOptions, RedisServer};
use pixfarm_core::{
    CoreError, EventKind, Failed, ItemSpec, JobFilter, JobId, JobSpec, JobState, Lane, LeasePolicy,
    PageRequest, Priority, Queue, QueueConfig, Recorded, ResultStatus, Storage, Task, TaskResult,
    Variant, WorkerInfo,
};

const LEASE_MS: u64 = 300;

fn config() -> QueueConfig {
    QueueConfig {
        lease: LeasePolicy {
            base_ms: LEASE_MS,
            per_step_megapixel_ms: 0,
        },
        max_attempts: 3,
        reclaim_interval: Duration::ZERO,
        worker_ttl: Duration::from_millis(500),
        ..QueueConfig::default()
    }
}

async fn setup() -> Result<(RedisServer, Queue)> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(&redis.url(), config()).await?;
    Ok((redis, q))
}

fn job(n: usize) -> JobSpec {
    JobSpec::new(
        (0..n)
            .map(|i| ItemSpec::new(format!("prompt {i}"), 64, 64).with_seed(i as u64 * 10))
            .collect(),
    )
}

/// Tasks of a lane not yet acknowledged: stream entries plus the fair-share backlog.
async fn lane_len(q: &Queue, lane: Lane) -> Result<u64> {
    let backlog = q
        .backlog_stats()
        .await?
        .into_iter()
        .find(|(l, _)| *l == lane)
        .map(|(_, n)| n)
        .unwrap_or(0);
    Ok(q.lane_stats()
        .await?
        .into_iter()
        .find(|s| s.lane == lane)
        .map(|s| s.length)
        .unwrap_or(0)
        + backlog)
}

async fn pull_all(q: &Queue, worker: &str, want: usize) -> Result<Vec<Task>> {
    let mut out = Vec::new();
    for _ in 0..50 {
        out.extend(
            q.pull(worker, &base(), 64, Duration::from_millis(50))
                .await?,
        );
        if out.len() >= want {
            break;
        }
    }
    Ok(out)
}

#[tokio::test]
async fn submit_expands_and_idempotency_returns_the_same_job() -> Result<()> {
    let (_r, q) = setup().await?;
    let spec = JobSpec::new(vec![
        ItemSpec::new("a", 64, 64).with_seed(5).with_images(3),
        ItemSpec::new("b", 64, 128).with_images(2),
    ])
    .with_idempotency_key("batch-1")
    .with_label("team", "x");
    let s1 = q.submit(spec.clone()).await?;
    assert!(s1.created);
    assert_eq!(s1.total, 5);
    let lane = Lane::new(Priority::Normal, Variant::Base);
    assert_eq!(lane_len(&q, lane).await?, 5);

    let s2 = q.submit(spec.clone()).await?;
    assert_eq!(s2.job, s1.job);
    assert!(!s2.created);
    assert_eq!(lane_len(&q, lane).await?, 5, "nothing enqueued twice");

    // Same key, different job: refused.
    let other = spec.clone().with_label("team", "y");
    assert!(matches!(q.submit(other).await, Err(CoreError::Conflict(_))));
    // Another tenant may use the same key.
    let mut t2 = spec.clone();
    t2.tenant = "other".into();
    assert_ne!(q.submit(t2).await?.job, s1.job);

    let rec = q.get_job(&s1.job).await?;
    assert_eq!(rec.state, JobState::Queued);
    assert_eq!(rec.counts.total, 5);
    assert_eq!(rec.labels.get("team").map(String::as_str), Some("x"));

    // Both tenants' jobs are queued: 5 + 5 tasks.
    let tasks = pull_all(&q, "w1", 10).await?;
    assert_eq!(tasks.len(), 10);
    let mut tasks: Vec<_> = tasks.into_iter().filter(|t| t.spec.job == s1.job).collect();
    tasks.sort_by_key(|t| t.spec.index);
    assert_eq!(
        tasks
            .iter()
            .map(|t| t.spec.seed)
            .take(3)
            .collect::<Vec<_>>(),
        [5, 6, 7]
    );
    assert_eq!(
        tasks[3].spec.seed + 1,
        tasks[4].spec.seed,
        "assigned seed recorded and incremented"
    );
    assert_eq!(tasks[4].spec.height, 128);
    assert!(tasks.iter().all(|t| t.attempt == 1));
    assert_eq!(q.get_job(&s1.job).await?.state, JobState::Running);
    Ok(())
}

#[tokio::test]
async fn invalid_jobs_enqueue_nothing() -> Result<()> {
    let (_r, q) = setup().await?;
    let mut spec = job(40);
    spec.items[37].width = 17;
    spec.items[3].steps = 0;
    spec.items[4].steps = 100;
    spec.items[5].prompt = String::new();
    spec.items[6].prompt = "x".repeat(1_000_000);
    let err = q.submit(spec).await.unwrap_err();
    let CoreError::Invalid(errs) = err else {
        panic!("expected Invalid, got {err}")
    };
    let paths: Vec<String> = errs.iter().map(|e| e.path()).collect();
    assert_eq!(
        paths,
        [
            "items[3].steps",
            "items[4].steps",
            "items[5].prompt",
            "items[6].prompt",
            "items[37].width"
        ]
    );
    assert!(matches!(
        q.submit(JobSpec::new(vec![])).await,
        Err(CoreError::Invalid(_))
    ));
    for lane in Lane::all() {
        assert_eq!(lane_len(&q, lane).await?, 0);
    }
    assert!(
        q.list_jobs(
            &JobFilter::default(),
            &PageRequest {
                size: 10,
                token: None
            }
        )
        .await?
        .items
        .is_empty()
    );
    let unknown = JobId::new();
    assert!(matches!(
        q.get_job(&unknown).await,
        Err(CoreError::NotFound { .. })
    ));
    assert!(matches!(
        q.cancel_job(&unknown).await,
        Err(CoreError::NotFound { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn priority_lanes_are_served_first() -> Result<()> {
    let (_r, q) = setup().await?;
    let low = q.submit(job(3).with_priority(Priority::Low)).await?.job;
    let high = q.submit(job(2).with_priority(Priority::High)).await?.job;
    let first = q.pull("w", &base(), 3, Duration::from_millis(10)).await?;
    assert_eq!(first.len(), 3);
    assert!(
        first[..2]
            .iter()
            .all(|t| t.spec.job == high && t.lane.priority == Priority::High)
    );
    assert_eq!(first[2].spec.job, low);
    Ok(())
}

#[tokio::test]
async fn complete_records_once_and_finishes_the_job() -> Result<()> {
    let (_r, q) = setup().await?;
    let dir = tempfile::tempdir()?;
    let storage = Storage::open(&format!("file://{}", dir.path().display())).await?;
    let id = q.submit(job(4).with_prefix("runs")).await?.job;
    let tasks = pull_all(&q, "w1", 4).await?;
    assert_eq!(tasks.len(), 4);
    for (i, t) in tasks.iter().enumerate() {
        let r = q.complete(t, &ok_result(t, "w1")).await?;
        if i < 3 {
            assert_eq!(r, Recorded::Recorded);
        } else {
            assert_eq!(r, Recorded::JobFinished(JobState::Succeeded));
        }
    }
    // A second completion of the same task writes nothing.
    assert_eq!(
        q.complete(&tasks[0], &ok_result(&tasks[0], "w2")).await?,
        Recorded::Duplicate
    );
    let rec = q.get_job(&id).await?;
    assert_eq!(
        (rec.state, rec.counts.succeeded, rec.counts.failed),
        (JobState::Succeeded, 4, 0)
    );
    for lane in Lane::all() {
        let s = q
            .lane_stats()
            .await?
            .into_iter()
            .find(|s| s.lane == lane)
            .unwrap();
        assert_eq!((s.length, s.pending), (0, 0), "acked and deleted");
    }

    let page1 = q
        .list_results(
            &id,
            &PageRequest {
                size: 3,
                token: None,
            },
        )
        .await?;
    assert_eq!(
        page1.items.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(page1.items[0].worker, "w1");
    let page2 = q
        .list_results(
            &id,
            &PageRequest {
                size: 3,
                token: page1.next_token,
            },
        )
        .await?;
    assert_eq!(page2.items.iter().map(|r| r.index).collect::<Vec<_>>(), [3]);
    assert!(page2.next_token.is_none());

    let key = q.write_manifest(&id, &storage).await?;
    assert_eq!(key, format!("default/runs/{id}/manifest.jsonl"));
    let body = storage.get(&key).await?;
    let lines: Vec<TaskResult> = String::from_utf8(body.to_vec())?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[2].key.as_deref(),
        Some(format!("default/runs/{id}/000002.png").as_str())
    );
    assert_eq!(lines[2].seed, 20);
    assert_eq!(
        q.get_job(&id).await?.manifest_key.as_deref(),
        Some(key.as_str())
    );

    let evs = q.events(&id, None, 100, None).await?;
    let finished = evs
        .iter()
        .filter(|e| matches!(e.kind, EventKind::JobFinished { .. }))
        .count();
    assert_eq!(finished, 1);
    assert!(matches!(evs[0].kind, EventKind::Queued { total: 4 }));
    assert!(matches!(evs[1].kind, EventKind::Started { .. }));
    Ok(())
}

#[tokio::test]
async fn expired_lease_is_reclaimed_and_racing_completions_record_once() -> Result<()> {
    let (_r, q) = setup().await?;
    let q2 = q.clone();
    let id = q.submit(job(10)).await?.job;
    let a = pull_all(&q, "worker-a", 10).await?;
    assert_eq!(a.len(), 10);
    // Nothing to take over while the lease runs.
    assert!(
        q2.pull("worker-b", &base(), 64, Duration::from_millis(10))
            .await?
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    let b = pull_all(&q2, "worker-b", 10).await?;
    assert_eq!(b.len(), 10, "worker-b takes over every expired task");
    assert!(b.iter().all(|t| t.attempt == 2));
    // worker-a lost its leases.
    assert!(q.extend_leases("worker-a", &a).await?.iter().all(|ok| !ok));

    // Both finish at the same time: each index is recorded exactly once.
    let qa = q.clone();
    let qb = q2.clone();
    let (ra, rb) = tokio::join!(
        async move {
            let mut v = Vec::new();
            for t in &a {
                v.push(qa.complete(t, &ok_result(t, "worker-a")).await.unwrap());
            }
            v
        },
        async move {
            let done: Vec<_> = b
                .iter()
                .rev()
                .map(|t| (t.clone(), ok_result(t, "worker-b")))
                .collect();
            qb.complete_many(&done).await.unwrap()
        }
    );
    let recorded = ra
        .iter()
        .chain(&rb)
        .filter(|r| matches!(r, Recorded::Recorded | Recorded::JobFinished(_)))
        .count();
    let dups = ra
        .iter()
        .chain(&rb)
        .filter(|r| **r == Recorded::Duplicate)
        .count();
    assert_eq!((recorded, dups), (10, 10));
    let finished = ra
        .iter()
        .chain(&rb)
        .filter(|r| matches!(r, Recorded::JobFinished(_)))
        .count();
    assert_eq!(finished, 1);
    let rec = q.get_job(&id).await?;
    assert_eq!((rec.state, rec.counts.succeeded), (JobState::Succeeded, 10));
    let results = q.all_results(&id).await?;
    assert_eq!(
        results.iter().map(|r| r.index).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn owner_checked_heartbeat_keeps_the_lease() -> Result<()> {
    let (_r, q) = setup().await?;
    q.submit(job(2)).await?;
    let a = pull_all(&q, "worker-a", 2).await?;
    // Heartbeat for three lease periods: nobody can take the tasks.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(LEASE_MS / 2)).await;
        assert_eq!(q.extend_leases("worker-a", &a).await?, [true, true]);
        assert!(
            q.pull("worker-b", &base(), 64, Duration::from_millis(1))
                .await?
                .is_empty()
        );
    }
    // Another worker cannot extend tasks it does not own.
    assert_eq!(q.extend_leases("worker-b", &a).await?, [false, false]);
    // Heartbeats stop: the tasks move.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    let b = pull_all(&q, "worker-b", 2).await?;
    assert_eq!(b.len(), 2);
    assert_eq!(q.extend_leases("worker-a", &a).await?, [false, false]);
    assert_eq!(q.extend_leases("worker-b", &b).await?, [true, true]);
    Ok(())
}

#[tokio::test]
async fn failures_retry_then_dead_letter() -> Result<()> {
    let (_r, q) = setup().await?;
    let id = q.submit(job(2)).await?.job;
    let tasks = pull_all(&q, "w", 2).await?;
    assert_eq!(tasks.len(), 2);
    let good = tasks.iter().find(|t| t.spec.index == 1).unwrap();
    q.complete(good, &ok_result(good, "w")).await?;
    let mut bad = tasks.iter().find(|t| t.spec.index == 0).unwrap().clone();
    let mut attempts = vec![bad.attempt];
    let mut last = q.fail("w", &bad, "boom 0", true).await?;
    assert_eq!(last, Failed::Retrying { attempt: 2 });
    for round in 1..3 {
        let t = pull_all(&q, "w", 1).await?;
        assert_eq!(t.len(), 1, "only index 0 comes back");
        bad = t[0].clone();
        assert_eq!(bad.spec.index, 0);
        attempts.push(bad.attempt);
        last = q.fail("w", &bad, &format!("boom {round}"), true).await?;
    }
    let last = Some(last);
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(
        last,
        Some(Failed::DeadLettered(Recorded::JobFinished(
            JobState::Partial
        )))
    );
    let rec = q.get_job(&id).await?;
    assert_eq!((rec.counts.succeeded, rec.counts.failed), (1, 1));
    assert_eq!(rec.last_error.as_deref(), Some("boom 2"));
    let dead = q.dead_letters(10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].job.clone(), dead[0].index, dead[0].attempts),
        (id.clone(), 0, 3)
    );
    let results = q.all_results(&id).await?;
    assert_eq!(results[0].status, ResultStatus::Failed);
    assert_eq!(results[0].error.as_deref(), Some("boom 2"));
    let evs = q.events(&id, None, 100, None).await?;
    let retries = evs
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::ItemFailed {
                    will_retry: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(retries, 2);
    Ok(())
}

#[tokio::test]
async fn crashed_deliveries_count_towards_max_attempts() -> Result<()> {
    let (_r, q) = setup().await?;
    let id = q.submit(job(1)).await?.job;
    for attempt in 1..=3 {
        let t = pull_all(&q, &format!("w{attempt}"), 1).await?;
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].attempt, attempt);
        // The worker "dies": no heartbeat, no ack.
        tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    }
    assert!(
        q.pull("w4", &base(), 8, Duration::from_millis(10))
            .await?
            .is_empty()
    );
    let rec = q.get_job(&id).await?;
    assert_eq!((rec.state, rec.counts.failed), (JobState::Failed, 1));
    assert!(rec.last_error.unwrap().contains("lease expired"));
    assert_eq!(q.dead_letters(10).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn cancel_stops_the_job_and_counts_add_up() -> Result<()> {
    let (_r, q) = setup().await?;
    let id = q.submit(job(6)).await?.job;
    let other = q.submit(job(2)).await?.job;
    let first = q.pull("w", &base(), 2, Duration::from_millis(10)).await?;
    assert_eq!(first.len(), 2);
    q.complete(&first[0], &ok_result(&first[0], "w")).await?;
    assert!(q.is_cancelled(std::slice::from_ref(&id)).await?.is_empty());

    let rec = q.cancel_job(&id).await?;
    assert_eq!(rec.state, JobState::Canceled);
    assert_eq!(
        (rec.counts.succeeded, rec.counts.failed, rec.counts.canceled),
        (1, 0, 5)
    );
    assert_eq!(rec.counts.pending(), 0);
    assert!(
        q.is_cancelled(&[id.clone(), other.clone()])
            .await?
            .contains(&id)
    );
    assert!(matches!(
        q.cancel_job(&id).await,
        Err(CoreError::Conflict(_))
    ));

    // The in-flight task finishing after the cancel records nothing.
    assert_eq!(
        q.complete(&first[1], &ok_result(&first[1], "w")).await?,
        Recorded::Canceled
    );
    // Queued tasks of the cancelled job are dropped at pull; the other job's come through.
    let rest = pull_all(&q, "w", 2).await?;
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|t| t.spec.job == other));
    let rec = q.get_job(&id).await?;
    assert_eq!((rec.counts.succeeded, rec.counts.canceled), (1, 5));
    assert_eq!(q.all_results(&id).await?.len(), 1);
    let last = q.events(&id, None, 100, None).await?.pop().unwrap();
    assert!(matches!(
        last.kind,
        EventKind::JobFinished {
            state: JobState::Canceled,
            ..
        }
    ));
    Ok(())
}

#[tokio::test]
async fn events_resume_from_an_id_without_gaps() -> Result<()> {
    let (_r, q) = setup().await?;
    let id = q.submit(job(5)).await?.job;
    let tasks = pull_all(&q, "w", 5).await?;
    for t in &tasks[..2] {
        q.complete(t, &ok_result(t, "w")).await?;
    }
    let all_so_far = q.events(&id, None, 1000, None).await?;
    let cut = all_so_far.last().unwrap().id.clone();

    // A watcher that saw up to `cut` reconnects while more happens.
    let watcher = {
        let q = q.clone();
        let id = id.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            q.watch(id, Some(cut)).collect::<Vec<_>>().await
        })
    };
    for t in &tasks[2..] {
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.progress(&id, &[t.spec.index], 1, 4, "w").await?;
        q.complete(t, &ok_result(t, "w")).await?;
    }
    let seen: Vec<_> = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await??
        .into_iter()
        .collect::<Result<_, _>>()?;
    let full = q.events(&id, None, 1000, None).await?;
    let expected: Vec<_> = full
        .iter()
        .skip_while(|e| e.id != cut)
        .skip(1)
        .cloned()
        .collect();
    assert_eq!(seen, expected);
    assert!(matches!(
        seen.last().unwrap().kind,
        EventKind::JobFinished {
            state: JobState::Succeeded,
            ..
        }
    ));
    let done = seen
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ItemDone { .. }))
        .count();
    assert_eq!(done, 3);
    // Blocking read with nothing new returns empty after the timeout.
    let last = full.last().unwrap().id.clone();
    assert!(
        q.events(&id, Some(&last), 10, Some(Duration::from_millis(50)))
            .await?
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn list_jobs_filters_and_pages() -> Result<()> {
    let (_r, q) = setup().await?;
    let mut ids = Vec::new();
    for i in 0..7 {
        let spec = job(1).with_label("batch", if i % 2 == 0 { "even" } else { "odd" });
        ids.push(q.submit(spec).await?.job);
    }
    q.cancel_job(&ids[6]).await?;
    let all = q
        .list_jobs(
            &JobFilter::default(),
            &PageRequest {
                size: 3,
                token: None,
            },
        )
        .await?;
    assert_eq!(
        all.items.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![ids[6].clone(), ids[5].clone(), ids[4].clone()]
    );
    let next = q
        .list_jobs(
            &JobFilter::default(),
            &PageRequest {
                size: 10,
                token: all.next_token,
            },
        )
        .await?;
    assert_eq!(next.items.len(), 4);
    assert!(next.next_token.is_none());

    let even = JobFilter {
        labels: [("batch".to_string(), "even".to_string())].into(),
        ..Default::default()
    };
    let page = q
        .list_jobs(
            &even,
            &PageRequest {
                size: 10,
                token: None,
            },
        )
        .await?;
    assert_eq!(page.items.len(), 4);
    let queued_even = JobFilter {
        states: vec![JobState::Queued],
        ..even
    };
    assert_eq!(
        q.list_jobs(
            &queued_even,
            &PageRequest {
                size: 10,
                token: None
            }
        )
        .await?
        .items
        .len(),
        3
    );
    let tenant = JobFilter {
        tenant: Some("nobody".into()),
        ..Default::default()
    };
    assert!(
        q.list_jobs(
            &tenant,
            &PageRequest {
                size: 10,
                token: None
            }
        )
        .await?
        .items
        .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn worker_registry_expires() -> Result<()> {
    let (_r, q) = setup().await?;
    let w = WorkerInfo {
        id: "w1".into(),
        host: "h".into(),
        device: "cpu".into(),
        ..Default::default()
    };
    q.register_worker(&w).await?;
    q.heartbeat_worker(&WorkerInfo {
        id: "w2".into(),
        ..Default::default()
    })
    .await?;
    let ws = q.list_workers().await?;
    assert_eq!(
        ws.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        ["w1", "w2"]
    );
    assert!(ws[0].last_heartbeat_ms > 0);
    q.deregister_worker("w2").await?;
    assert_eq!(q.list_workers().await?.len(), 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(q.list_workers().await?.is_empty(), "TTL expired");
    Ok(())
}

#[tokio::test]
async fn survives_a_redis_restart_with_aof() -> Result<()> {
    let mut redis = RedisServer::start_with(RedisOptions { aof: true }).await?;
    let q = Queue::connect(&redis.url(), config()).await?;
    let id = q.submit(job(4)).await?.job;
    let t = q.pull("w", &base(), 2, Duration::from_millis(10)).await?;
    q.complete(&t[0], &ok_result(&t[0], "w")).await?;
    redis.restart().await?;
    // The same handle reconnects by itself (a few retries while Redis comes back).
    let mut got = Vec::new();
    for _ in 0..100 {
        match q.pull("w", &base(), 8, Duration::from_millis(10)).await {
            Ok(v) => {
                got.extend(v);
                if got.len() >= 2 {
                    break;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(got.len(), 2, "the two queued tasks survived");
    for x in got.iter().chain(std::iter::once(&t[1])) {
        q.complete(x, &ok_result(x, "w")).await?;
    }
    let rec = q.get_job(&id).await?;
    assert_eq!((rec.state, rec.counts.succeeded), (JobState::Succeeded, 4));
    let unique: HashSet<u64> = q.all_results(&id).await?.iter().map(|r| r.index).collect();
    assert_eq!(unique.len(), 4);
    Ok(())
}

#[tokio::test]
async fn big_jobs_are_enqueued_in_chunks() -> Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(
        &redis.url(),
        QueueConfig {
            enqueue_chunk: 1000,
            ..config()
        },
    )
    .await?;
    let spec = JobSpec::new(vec![ItemSpec::new("p", 64, 64).with_images(50); 100]);
    let t = std::time::Instant::now();
    let s = q.submit(spec).await?;
    let ms = t.elapsed().as_millis();
    assert_eq!(s.total, 5000);
    assert_eq!(
        lane_len(&q, Lane::new(Priority::Normal, Variant::Base)).await?,
        5000
    );
    eprintln!("submitted 5000 tasks in {ms} ms");
    Ok(())
}
