//! Fair share, quotas and the submit rate limit, against a real `redis-server` (one per test).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Result, bail};
use common::{base, ok_result as ok};
use pixfarm_core::testing::{RedisOptions, RedisServer};
use pixfarm_core::{
    CoreError, Failed, FairConfig, ItemSpec, JobFilter, JobId, JobSpec, JobState, Lane,
    LeasePolicy, PageRequest, Priority, Queue, QueueConfig, QuotaKind, Recorded, Task, TenantQuota,
    TenantQuotas, TenantUsage, Variant,
};

const LEASE_MS: u64 = 300;

fn config(stream_target: u64, quantum: u32, quotas: TenantQuotas) -> QueueConfig {
    QueueConfig {
        lease: LeasePolicy {
            base_ms: LEASE_MS,
            per_step_megapixel_ms: 0,
        },
        max_attempts: 3,
        reclaim_interval: Duration::ZERO,
        fair: FairConfig {
            stream_target,
            quantum,
            quotas,
        },
        ..QueueConfig::default()
    }
}

async fn setup(cfg: QueueConfig) -> Result<(RedisServer, Queue)> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(&redis.url(), cfg).await?;
    Ok((redis, q))
}

fn job(tenant: &str, n: usize) -> JobSpec {
    let mut s = JobSpec::new(
        (0..n)
            .map(|i| ItemSpec::new(format!("{tenant} prompt {i}"), 64, 64).with_seed(i as u64))
            .collect(),
    );
    s.tenant = tenant.to_string();
    s
}

fn quotas_for(tenant: &str, q: TenantQuota) -> TenantQuotas {
    let mut t = TenantQuotas::default();
    t.tenants.insert(tenant.to_string(), q);
    t
}

/// Pulls until `want` tasks or until the lanes run dry (stopping well before the test lease
/// expires, so nothing pulled here is redelivered by a later pull).
async fn pull_n(q: &Queue, worker: &str, max_batch: usize, want: usize) -> Result<Vec<Task>> {
    let mut out = Vec::new();
    for _ in 0..20 {
        if out.len() >= want {
            break;
        }
        let got = q
            .pull(
                worker,
                &base(),
                max_batch.min(want - out.len()),
                Duration::from_millis(5),
            )
            .await?;
        if got.is_empty() && !out.is_empty() {
            break;
        }
        out.extend(got);
    }
    Ok(out)
}

async fn usage(q: &Queue, tenant: &str) -> Result<(u64, u64)> {
    let u: TenantUsage = q.tenant_usage(tenant).await?;
    Ok((u.queued, u.in_flight))
}

async fn backlog_total(q: &Queue) -> Result<u64> {
    Ok(q.backlog_stats().await?.iter().map(|(_, n)| n).sum())
}

async fn stream_total(q: &Queue) -> Result<u64> {
    Ok(q.lane_stats().await?.iter().map(|s| s.length).sum())
}

/// Three tenants, A first with the biggest job: after the stream's initial window (all A), the
/// stream is fed `quantum` tasks per tenant per round until B and C run dry.
#[tokio::test]
async fn deficit_round_robin_interleaves_three_tenants() -> Result<()> {
    let (_r, q) = setup(config(6, 2, TenantQuotas::default())).await?;
    q.submit(job("a", 30)).await?;
    q.submit(job("b", 10)).await?;
    q.submit(job("c", 10)).await?;
    assert_eq!(
        stream_total(&q).await?,
        6,
        "the stream holds only the target"
    );
    assert_eq!(backlog_total(&q).await?, 44);

    let mut order = String::new();
    let mut next_index = std::collections::HashMap::<String, u64>::new();
    for _ in 0..50 {
        let t = pull_n(&q, "w", 1, 1).await?;
        assert_eq!(t.len(), 1, "after {order}");
        let t = &t[0];
        // Each tenant's tasks arrive in index order.
        let expect = next_index.entry(t.spec.tenant.clone()).or_insert(0);
        assert_eq!(t.spec.index, *expect, "tenant {}", t.spec.tenant);
        *expect += 1;
        order.push_str(&t.spec.tenant.to_uppercase());
        q.complete(t, &ok(t, "w")).await?;
    }
    let expected = format!("{}{}{}", "A".repeat(6), "AABBCC".repeat(5), "A".repeat(14));
    assert_eq!(order, expected);
    for t in ["a", "b", "c"] {
        assert_eq!(usage(&q, t).await?, (0, 0), "tenant {t}");
    }
    assert_eq!(backlog_total(&q).await?, 0);
    assert_eq!(stream_total(&q).await?, 0);
    Ok(())
}

/// A tenant that submits after a big backlog of another gets its first task within the stream
/// window, and the old submit order no longer decides who goes next.
#[tokio::test]
async fn late_tenant_starts_within_one_window() -> Result<()> {
    let target = 16;
    let (_r, q) = setup(config(target, 4, TenantQuotas::default())).await?;
    q.submit(job("a", 2000)).await?;
    let b = q.submit(job("b", 20)).await?.job;
    let mut before_b = 0;
    loop {
        let t = pull_n(&q, "w", 8, 8).await?;
        if t.is_empty() {
            bail!("ran dry before B's first task");
        }
        let first_b = t.iter().position(|t| t.spec.job == b);
        before_b += first_b.unwrap_or(t.len());
        q.complete_many(
            &t.iter()
                .map(|t| (t.clone(), ok(t, "w")))
                .collect::<Vec<_>>(),
        )
        .await?;
        if first_b.is_some() {
            break;
        }
    }
    // The window (16 A tasks) plus one A turn (4) at most.
    assert!(
        before_b <= target as usize + 4,
        "{before_b} A tasks before B's first"
    );
    Ok(())
}

#[tokio::test]
async fn queued_quota_refuses_the_whole_job_and_names_the_numbers() -> Result<()> {
    let quotas = quotas_for(
        "a",
        TenantQuota {
            max_queued_tasks: Some(10),
            ..TenantQuota::default()
        },
    );
    let (_r, q) = setup(config(4, 2, quotas)).await?;
    q.submit(job("a", 8)).await?;
    let refused = q
        .submit(job("a", 3).with_idempotency_key("retry-me"))
        .await
        .unwrap_err();
    match &refused {
        CoreError::QuotaExceeded(e) => {
            assert_eq!(e.quota, QuotaKind::MaxQueuedTasks);
            assert_eq!(e.tenant, "a");
            assert_eq!(e.retry_after, None);
        }
        other => bail!("expected QuotaExceeded, got {other:?}"),
    }
    let msg = refused.to_string();
    for part in ["`a`", "8 tasks queued", "3 more", "max_queued_tasks", "10"] {
        assert!(msg.contains(part), "{part:?} in {msg}");
    }
    // Nothing was written for the refused job.
    assert_eq!(usage(&q, "a").await?.0, 8);
    let jobs = q
        .list_jobs(
            &JobFilter {
                tenant: Some("a".into()),
                ..JobFilter::default()
            },
            &PageRequest {
                size: 100,
                token: None,
            },
        )
        .await?;
    assert_eq!(jobs.items.len(), 1);
    // Other tenants are not affected (the default has no limit).
    q.submit(job("b", 50)).await?;

    // Finish 2 of A's tasks: now 3 more fit, and the refused idempotency key is free again.
    let mut done = 0;
    while done < 2 {
        for t in pull_n(&q, "w", 1, 1).await? {
            if t.spec.tenant == "a" && done < 2 {
                q.complete(&t, &ok(&t, "w")).await?;
                done += 1;
            } else {
                q.complete(&t, &ok(&t, "w")).await?;
            }
        }
    }
    assert_eq!(usage(&q, "a").await?.0, 6);
    let s = q
        .submit(job("a", 3).with_idempotency_key("retry-me"))
        .await?;
    assert!(s.created);
    assert_eq!(usage(&q, "a").await?.0, 9);
    Ok(())
}

#[tokio::test]
async fn in_flight_quota_holds_a_tenant_back_at_refill() -> Result<()> {
    let quotas = quotas_for(
        "a",
        TenantQuota {
            max_in_flight_tasks: Some(3),
            ..TenantQuota::default()
        },
    );
    let (_r, q) = setup(config(10, 2, quotas)).await?;
    q.submit(job("a", 10)).await?;
    q.submit(job("b", 5)).await?;
    let got = pull_n(&q, "w", 20, 20).await?;
    let a: Vec<&Task> = got.iter().filter(|t| t.spec.tenant == "a").collect();
    let b = got.len() - a.len();
    assert_eq!(
        (a.len(), b),
        (3, 5),
        "A is held at 3 in flight; B is not held back"
    );
    assert_eq!(usage(&q, "a").await?, (10, 3));
    // A finished task makes room for exactly one more of A.
    q.complete(a[0], &ok(a[0], "w")).await?;
    assert_eq!(usage(&q, "a").await?, (9, 3));
    let more = pull_n(&q, "w", 20, 20).await?;
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].spec.tenant, "a");
    Ok(())
}

/// Counters go back to zero whichever way tasks leave: success, racing duplicate completions
/// after a lease expiry (a crash mid-batch), cancel (backlog, stream and in flight), dead letter.
#[tokio::test]
async fn counters_return_to_zero_on_every_exit_path() -> Result<()> {
    let (_r, q) = setup(config(4, 2, TenantQuotas::default())).await?;

    // Crash mid-batch: worker-a takes 4 tasks, completes 1 and "dies"; worker-b takes the other 3
    // over after the lease; then the dead worker wakes up and completes them too (duplicates).
    let id = q.submit(job("t", 6)).await?.job;
    let a = pull_n(&q, "worker-a", 4, 4).await?;
    assert_eq!(a.len(), 4);
    q.complete(&a[0], &ok(&a[0], "worker-a")).await?;
    // The ack left no undelivered entry in the stream, so the last two tasks moved in.
    assert_eq!(usage(&q, "t").await?, (5, 5));
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    let b = pull_n(&q, "worker-b", 8, 5).await?;
    assert_eq!(b.len(), 5, "3 reclaimed + 2 fresh");
    assert_eq!(b.iter().filter(|t| t.attempt == 2).count(), 3);
    for t in &b {
        q.complete(t, &ok(t, "worker-b")).await?;
    }
    for t in &a[1..] {
        assert_eq!(
            q.complete(t, &ok(t, "worker-a")).await?,
            Recorded::Duplicate
        );
    }
    assert_eq!(q.get_job(&id).await?.state, JobState::Succeeded);
    assert_eq!(usage(&q, "t").await?, (0, 0));

    // Cancel with tasks in flight, in the stream and in the backlog.
    let id = q.submit(job("t", 20)).await?.job;
    let running = pull_n(&q, "w", 2, 2).await?;
    assert_eq!(usage(&q, "t").await?, (20, 4));
    q.cancel_job(&id).await?;
    assert_eq!(
        usage(&q, "t").await?,
        (4, 4),
        "the backlog was released at once"
    );
    assert_eq!(backlog_total(&q).await?, 0);
    for t in &running {
        assert_eq!(q.complete(t, &ok(t, "w")).await?, Recorded::Canceled);
    }
    assert!(
        pull_n(&q, "w", 8, 8).await?.is_empty(),
        "stream entries dropped"
    );
    assert_eq!(usage(&q, "t").await?, (0, 0));

    // Dead letter (a permanent failure) and a retry (the entry is replaced, not released).
    let id = q.submit(job("t", 2)).await?.job;
    let t = pull_n(&q, "w", 2, 2).await?;
    assert_eq!(
        q.fail("w", &t[0], "flaky", true).await?,
        Failed::Retrying { attempt: 2 }
    );
    assert_eq!(usage(&q, "t").await?, (2, 2));
    let again = pull_n(&q, "w", 2, 1).await?;
    assert_eq!(again.len(), 1);
    assert!(matches!(
        q.fail("w", &again[0], "bad prompt", false).await?,
        Failed::DeadLettered(_)
    ));
    assert!(matches!(
        q.fail("w", &t[1], "bad prompt", false).await?,
        Failed::DeadLettered(Recorded::JobFinished(JobState::Failed))
    ));
    assert_eq!(q.get_job(&id).await?.counts.failed, 2);
    assert_eq!(usage(&q, "t").await?, (0, 0));
    assert_eq!(stream_total(&q).await?, 0);
    assert_eq!(backlog_total(&q).await?, 0);
    Ok(())
}

#[tokio::test]
async fn submit_rate_limit_refuses_with_a_retry_hint() -> Result<()> {
    let quotas = quotas_for(
        "a",
        TenantQuota {
            submit_rate: Some(4.0),
            submit_burst: Some(2),
            ..TenantQuota::default()
        },
    );
    let (_r, q) = setup(config(8, 2, quotas)).await?;
    q.submit(job("a", 1)).await?;
    q.submit(job("a", 1)).await?;
    let e = q.submit(job("a", 1)).await.unwrap_err();
    let CoreError::QuotaExceeded(x) = &e else {
        bail!("expected QuotaExceeded, got {e:?}")
    };
    assert_eq!(x.quota, QuotaKind::SubmitRate);
    let wait = x.retry_after.expect("a retry hint");
    // 4/s: a token every 250 ms.
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(250),
        "{wait:?}"
    );
    assert!(e.to_string().contains("retry after"), "{e}");
    assert!(e.to_string().contains("submit_rate"), "{e}");
    // Another tenant is not limited; A passes again after the hint.
    q.submit(job("b", 1)).await?;
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    q.submit(job("a", 1)).await?;
    assert_eq!(usage(&q, "a").await?.0, 3, "refused submits queued nothing");
    Ok(())
}

#[tokio::test]
async fn backlogs_and_counters_survive_a_redis_restart_with_aof() -> Result<()> {
    let mut redis = RedisServer::start_with(RedisOptions { aof: true }).await?;
    let q = Queue::connect(&redis.url(), config(3, 2, TenantQuotas::default())).await?;
    let a = q.submit(job("a", 10)).await?.job;
    let b = q.submit(job("b", 5)).await?.job;
    let first = pull_n(&q, "w", 2, 2).await?;
    q.complete(&first[0], &ok(&first[0], "w")).await?;
    redis.restart().await?;
    let mut got = Vec::new();
    for _ in 0..200 {
        match q.pull("w", &base(), 4, Duration::from_millis(5)).await {
            Ok(v) => {
                for t in &v {
                    q.complete(t, &ok(t, "w")).await?;
                }
                got.extend(v);
                if got.len() >= 13 {
                    break;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    q.complete(&first[1], &ok(&first[1], "w")).await?;
    let seen: HashSet<(JobId, u64)> = got
        .iter()
        .chain(&first)
        .map(|t| (t.spec.job.clone(), t.spec.index))
        .collect();
    assert_eq!(seen.len(), 15, "every task delivered once");
    assert_eq!(q.get_job(&a).await?.state, JobState::Succeeded);
    assert_eq!(q.get_job(&b).await?.state, JobState::Succeeded);
    assert_eq!(usage(&q, "a").await?, (0, 0));
    assert_eq!(usage(&q, "b").await?, (0, 0));
    Ok(())
}

#[tokio::test]
async fn chunked_submits_keep_order_and_counts() -> Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::connect(
        &redis.url(),
        QueueConfig {
            enqueue_chunk: 100,
            ..config(50, 8, TenantQuotas::default())
        },
    )
    .await?;
    let id = q
        .submit(job("a", 350).with_priority(Priority::High))
        .await?
        .job;
    assert_eq!(usage(&q, "a").await?, (350, 50));
    let lane = Lane::new(Priority::High, Variant::Base);
    let bl = q.backlog_stats().await?;
    assert_eq!(bl.iter().find(|(l, _)| *l == lane).map(|x| x.1), Some(300));
    let mut indices = Vec::new();
    while indices.len() < 350 {
        let t = pull_n(&q, "w", 32, 32).await?;
        if t.is_empty() {
            bail!("ran dry after {}", indices.len());
        }
        indices.extend(t.iter().map(|t| t.spec.index));
        q.complete_many(
            &t.iter()
                .map(|t| (t.clone(), ok(t, "w")))
                .collect::<Vec<_>>(),
        )
        .await?;
    }
    assert_eq!(indices, (0..350).collect::<Vec<_>>());
    assert_eq!(q.get_job(&id).await?.state, JobState::Succeeded);
    assert_eq!(usage(&q, "a").await?, (0, 0));
    Ok(())
}

#[test]
fn quota_files_parse_merge_and_name_bad_fields() -> Result<()> {
    let toml = r#"
        [default]
        max_queued_tasks = 1000
        submit_rate = 2.5

        [tenants.render-team]
        max_queued_tasks = 50000
        max_in_flight_tasks = 64
    "#;
    let q = TenantQuotas::parse(toml)?;
    let rt = q.for_tenant("render-team");
    assert_eq!(rt.max_queued_tasks, Some(50000));
    assert_eq!(rt.max_in_flight_tasks, Some(64));
    assert_eq!(
        rt.submit_rate,
        Some(2.5),
        "unset fields come from the default"
    );
    assert_eq!(q.for_tenant("other").max_queued_tasks, Some(1000));

    let json = r#"{"tenants": {"x": {"submit_rate": 1.0, "submit_burst": 3}}}"#;
    let q = TenantQuotas::parse(json)?;
    assert_eq!(q.for_tenant("x").submit_burst, Some(3));
    assert_eq!(q.for_tenant("y"), TenantQuota::default());

    let bad = |text: &str, want: &[&str]| {
        let e = TenantQuotas::parse(text).unwrap_err().to_string();
        for w in want {
            assert!(e.contains(w), "{w:?} in {e}");
        }
    };
    bad(
        "[tenants.x]\nmax_in_flight_tasks = 0\n",
        &["tenants.x.max_in_flight_tasks", "at least 1"],
    );
    bad("[default]\nsubmit_rate = -1.0\n", &["default.submit_rate"]);
    bad("[default]\nmax_queue = 5\n", &["max_queue"]);
    bad(
        r#"{"tenants": {"x": {"submit_burst": 0}}}"#,
        &["tenants.x.submit_burst"],
    );
    Ok(())
}
