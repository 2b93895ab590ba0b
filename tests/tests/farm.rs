//! End-to-end tests of the farm (issue 3): real redis-server, real s3s-fs, the
//! coordinator in-process, workers as separate processes with the tiny
//! checkpoint at 64×64.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use pixfarm_e2e::{Farm, FarmOptions, items, violations};
use pixfarm_proto::v1 as pb;
use tonic::Code;

const LONG: Duration = Duration::from_secs(300);

fn spec(prefix: &str) -> pb::JobSpec {
    pb::JobSpec {
        output_prefix: prefix.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_render_200_images_exactly_once() -> Result<()> {
    let mut farm = Farm::start(FarmOptions::default()).await?;
    farm.spawn_worker("w1")?;
    farm.spawn_worker("w2")?;
    let job = farm.submit(items(200, 64), spec("two")).await?;
    let j = farm.wait(&job, LONG).await?;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{j:?}");
    assert_eq!((j.done, j.failed, j.task_count), (200, 0, 200));
    let once = farm.check_exactly_once(&j).await?;
    assert_eq!(once.objects, 200);
    assert_eq!(once.manifest_lines, Some(200));
    // Both workers took part, and results name them.
    let workers: BTreeSet<String> = farm
        .results(&job)
        .await?
        .into_iter()
        .map(|r| r.worker)
        .collect();
    assert_eq!(
        workers,
        BTreeSet::from(["w1".to_string(), "w2".to_string()]),
        "{}",
        farm.worker_logs()
    );
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_tasks_finish_elsewhere_after_the_lease() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        lease_base_ms: 3_000,
        max_batch: 8,
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("victim")?;
    let job = farm.submit(items(40, 64), spec("kill")).await?;
    // Wait until the victim is in the middle of a batch: it has reported step
    // progress, and not everything is done.
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let evs = farm.events(&job).await?;
        if evs.iter().any(|e| matches!(&e.kind, pixfarm_core::EventKind::Step { worker, .. } if worker == "victim")) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "victim never started\n{}",
            farm.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    farm.workers[0].kill9()?;
    let at_kill = farm.get(&job).await?;
    assert!(at_kill.done < 40, "the victim must die mid-job");
    farm.spawn_worker("survivor")?;
    let j = farm.wait(&job, LONG).await?;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{j:?}");
    assert_eq!((j.done, j.failed), (40, 0));
    let once = farm.check_exactly_once(&j).await?;
    assert_eq!((once.objects, once.manifest_lines), (40, Some(40)));
    let results = farm.results(&job).await?;
    let by_survivor = results.iter().filter(|r| r.worker == "survivor").count();
    assert!(by_survivor > 0, "the survivor rendered the rest");
    assert!(
        results
            .iter()
            .any(|r| r.worker == "survivor" && r.attempts >= 2),
        "the victim's in-flight tasks were redelivered after its lease"
    );
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_job_completes() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        redis_aof: true,
        lease_base_ms: 5_000,
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;
    let job = farm.submit(items(300, 64), spec("redis")).await?;
    let before = farm.wait_until(&job, LONG, |j| j.done >= 5).await?;
    farm.redis.restart().await?;
    assert!(before.done < 300, "the restart must happen mid-job");
    let j = farm.wait(&job, LONG).await?;
    assert_eq!(
        j.state(),
        pb::JobState::Succeeded,
        "{j:?}\n{}",
        farm.worker_logs()
    );
    assert_eq!(j.done, 300);
    let once = farm.check_exactly_once(&j).await?;
    assert_eq!((once.objects, once.manifest_lines), (300, Some(300)));
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_job_stops_new_images() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        max_batch: 4,
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;
    let job = farm.submit(items(200, 64), spec("cancel")).await?;
    farm.wait_until(&job, LONG, |j| j.done >= 4).await?;
    let mut c = farm.client().await?;
    let canceled = c
        .cancel_job(pb::CancelJobRequest {
            job_id: job.clone(),
        })
        .await?
        .into_inner()
        .job
        .unwrap();
    assert_eq!(canceled.state(), pb::JobState::Canceled);
    assert!(canceled.done < 200);
    // Let the worker finish its batch (it stops between steps) and drain.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let j = farm.get(&job).await?;
    assert_eq!(j.state(), pb::JobState::Canceled);
    assert_eq!(j.done, canceled.done, "no image recorded after the cancel");
    assert_eq!(
        j.done + j.failed + j.canceled,
        j.task_count,
        "counts add up: {j:?}"
    );
    // Nothing was recorded after the cancel event.
    let evs = farm.events(&job).await?;
    let finished = evs
        .iter()
        .position(|e| matches!(e.kind, pixfarm_core::EventKind::JobFinished { .. }))
        .expect("a finished event");
    assert!(
        !evs[finished..]
            .iter()
            .any(|e| matches!(e.kind, pixfarm_core::EventKind::ItemDone { .. })),
        "an image was recorded after the cancel"
    );
    let results = farm.results(&job).await?;
    assert_eq!(
        results.iter().filter(|r| r.succeeded).count() as u64,
        j.done
    );
    // Every stored image is a recorded one (uploads of canceled tasks are removed).
    let keys = farm.s3_keys(&format!("default/cancel/{job}/")).await?;
    let pngs = keys.iter().filter(|k| k.ends_with(".png")).count() as u64;
    assert_eq!(pngs, j.done, "{keys:?}");
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_resubmit_enqueues_once() -> Result<()> {
    let farm = Farm::start(FarmOptions::default()).await?;
    let mut c = farm.client().await?;
    let req = pb::SubmitJobRequest {
        job: Some(pb::JobSpec {
            idempotency_key: "nightly-2026-11-26".into(),
            ..Default::default()
        }),
        items: items(30, 64),
    };
    let a = c.submit_job(req.clone()).await?.into_inner();
    let b = c.submit_job(req.clone()).await?.into_inner();
    assert_eq!(a.job_id, b.job_id);
    assert!(a.created && !b.created);
    assert_eq!(farm.lane_entries().await?, 30);
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await?
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1);
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_task_is_dead_lettered_with_its_error() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        max_attempts: 3,
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;
    let mut its = items(5, 64);
    // A control image that does not exist: every attempt fails.
    its[2].control = Some(pb::Control {
        source: Some(pb::control::Source::Uri(format!(
            "s3://{}/default/missing/edge.png",
            farm.bucket
        ))),
        kind: "edge".into(),
        scale: Some(1.0),
        ..Default::default()
    });
    let job = farm.submit(its, spec("fail")).await?;
    let j = farm.wait(&job, LONG).await?;
    assert_eq!(j.state(), pb::JobState::Partial, "{j:?}");
    assert_eq!((j.done, j.failed), (4, 1));
    assert_eq!(j.failures.len(), 1);
    assert_eq!(j.failures[0].index, 2);
    assert_eq!(
        j.failures[0].attempts, 3,
        "dead-lettered after max_attempts"
    );
    assert!(!j.failures[0].error.is_empty());
    assert!(!j.last_error.is_empty());
    let dead = farm.queue.dead_letters(10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].index, dead[0].attempts), (2, 3));
    // The event stream shows the retries and the final failure.
    let evs = farm.events(&job).await?;
    let fails: Vec<bool> = evs
        .iter()
        .filter_map(|e| match &e.kind {
            pixfarm_core::EventKind::ItemFailed { will_retry, .. } => Some(*will_retry),
            _ => None,
        })
        .collect();
    assert_eq!(fails, [true, true, false]);
    farm.check_exactly_once(&j).await?;
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_for_10s_mid_job_loses_nothing() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        own_s3: true,
        max_batch: 4,
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;
    let job = farm.submit(items(200, 64), spec("s3down")).await?;
    farm.wait_until(&job, LONG, |j| j.done >= 3).await?;
    farm.s3.stop();
    let at_stop = farm.get(&job).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = farm.get(&job).await?;
    // Nothing is recorded without its object: progress stalls while S3 is down.
    assert!(
        at_stop.done < 200 && during.done < 200,
        "the outage must hit mid-job"
    );
    assert!(
        during.done <= at_stop.done + 4 * 2,
        "{} done during the outage",
        during.done - at_stop.done
    );
    farm.s3.start_again().await?;
    let j = farm.wait(&job, LONG).await?;
    assert_eq!(
        j.state(),
        pb::JobState::Succeeded,
        "{j:?}\n{}",
        farm.worker_logs()
    );
    assert_eq!((j.done, j.failed), (200, 0));
    let once = farm.check_exactly_once(&j).await?;
    assert_eq!((once.objects, once.manifest_lines), (200, Some(200)));
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_field_or_line_named() -> Result<()> {
    let farm = Farm::start(FarmOptions::default()).await?;
    let mut c = farm.client().await?;
    let one = |f: fn(&mut pb::Item)| {
        let mut it = items(1, 64);
        f(&mut it[0]);
        it
    };
    let cases: Vec<(&str, Vec<pb::Item>, &str)> = vec![
        ("no items", vec![], "items"),
        ("width 17", one(|i| i.width = Some(17)), "items[0].width"),
        ("steps 0", one(|i| i.steps = Some(0)), "items[0].steps"),
        ("steps 100", one(|i| i.steps = Some(100)), "items[0].steps"),
        (
            "empty prompt",
            one(|i| i.prompt = String::new()),
            "items[0].prompt",
        ),
        (
            "1 MB prompt",
            one(|i| i.prompt = "a".repeat(1 << 20)),
            "items[0].prompt",
        ),
    ];
    for (name, its, field) in cases {
        let e = c
            .submit_job(pb::SubmitJobRequest {
                job: Some(pb::JobSpec::default()),
                items: its,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}");
        assert_eq!(violations(&e), [field], "{name}");
        assert!(e.message().contains(field), "{name}: {}", e.message());
    }
    // The 38th item of 40 is bad: its index is named, and the CLI maps it to its line.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("prompts.jsonl");
    let mut text = String::new();
    for i in 0..40 {
        let w = if i == 37 { 17 } else { 64 };
        text.push_str(&format!(
            "{{\"prompt\": \"p{i}\", \"width\": {w}, \"height\": 64}}\n"
        ));
    }
    std::fs::write(&path, &text)?;
    let parsed = pixfarm::input::read_items(&path)?;
    let mut cli = pixfarm::client::connect(&farm.addr.to_string()).await?;
    let e = pixfarm::client::submit(&mut cli, pb::JobSpec::default(), &parsed)
        .await
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("prompts.jsonl line 38: items[37].width"),
        "{msg}"
    );
    // A malformed JSONL line 37 never reaches the coordinator.
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[36] = "{\"prompt\": \"p36\", \"width\": }".into();
    std::fs::write(&path, lines.join("\n"))?;
    let e = pixfarm::input::read_items(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        "prompts.jsonl line 37: expected value at column 28"
    );
    // Unknown job ids.
    let unknown = "0190c0de-0000-7000-8000-000000000000";
    let e = c
        .get_job(pb::GetJobRequest {
            job_id: unknown.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .cancel_job(pb::CancelJobRequest {
            job_id: unknown.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Nothing was enqueued or recorded for any of them.
    assert_eq!(farm.lane_entries().await?, 0);
    assert!(
        c.list_jobs(pb::ListJobsRequest::default())
            .await?
            .into_inner()
            .jobs
            .is_empty()
    );
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnecting_from_an_event_id_misses_nothing() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        max_batch: 4,
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;
    let job = farm.submit(items(24, 64), spec("watch")).await?;
    let mut c = farm.client().await?;
    let mut seen: Vec<pb::JobEvent> = Vec::new();
    let mut after = String::new();
    let mut reconnects = 0;
    // Read a few events per connection, then drop it and resume from the last id.
    'outer: loop {
        let mut s = c
            .watch_job(pb::WatchJobRequest {
                job_id: job.clone(),
                after_event_id: after.clone(),
            })
            .await?
            .into_inner();
        for _ in 0..3 {
            match tokio::time::timeout(LONG, s.next()).await? {
                Some(ev) => {
                    let ev = ev?;
                    after = ev.id.clone();
                    let finished = matches!(ev.kind, Some(pb::job_event::Kind::Finished(_)));
                    seen.push(ev);
                    if finished {
                        break 'outer;
                    }
                }
                None => break 'outer,
            }
        }
        reconnects += 1;
    }
    assert!(reconnects > 3, "the test reconnected ({reconnects} times)");
    let truth: Vec<String> = farm.events(&job).await?.into_iter().map(|e| e.id).collect();
    let got: Vec<String> = seen.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, truth, "every event exactly once, in order");
    let done = seen
        .iter()
        .filter(|e| matches!(e.kind, Some(pb::job_event::Kind::ItemDone(_))))
        .count();
    assert_eq!(done, 24);
    farm.shutdown().await
}
