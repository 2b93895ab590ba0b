//! In-process tests of the coordinator over real gRPC on 127.0.0.1:0, against
//! a real `redis-server` (no workers: these check the API layer: codes, field
//! violations, paging, idempotency, events, health and reflection).

mod common;

use std::time::Duration;

use anyhow::Result;
use common::violations;
use futures::StreamExt;
use pixfarm_coordinator::{FarmService, serve_with};
use pixfarm_core::testing::RedisServer;
use pixfarm_core::{Queue, QueueConfig, Storage};
use pixfarm_proto::v1 as pb;
use pixfarm_proto::v1::farm_client::FarmClient;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    redis: RedisServer,
    client: FarmClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Result<Self> {
        let redis = RedisServer::start().await?;
        let dir = tempfile::tempdir()?;
        let queue = Queue::connect(&redis.url(), QueueConfig::default()).await?;
        queue.ensure_groups().await?;
        let storage = Storage::open(&format!("file://{}", dir.path().display())).await?;
        let service = FarmService::new(queue, storage, (64, 64));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve_with(service, 4 * 1024 * 1024, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        let client = FarmClient::connect(format!("http://{addr}")).await?;
        Ok(Self {
            redis,
            client,
            stop: Some(stop),
            server,
            addr,
            _dir: dir,
        })
    }

    async fn redis(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.redis.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// Entries in every lane stream plus tasks in the fair-share backlogs: what workers could
    /// pull.
    async fn enqueued(&self) -> Result<u64> {
        let mut c = self.redis().await?;
        let mut n = 0;
        for lane in pixfarm_core::Lane::all() {
            let len: u64 = redis::cmd("XLEN")
                .arg(lane.key())
                .query_async(&mut c)
                .await?;
            n += len;
        }
        let backlog: Vec<u64> = redis::cmd("HVALS")
            .arg(pixfarm_core::fair::BACKLOG_KEY)
            .query_async(&mut c)
            .await?;
        Ok(n + backlog.iter().sum::<u64>())
    }
}

fn item(prompt: &str) -> pb::Item {
    pb::Item {
        prompt: prompt.into(),
        seed: Some(1),
        ..Default::default()
    }
}

fn request(items: Vec<pb::Item>) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        job: Some(pb::JobSpec::default()),
        items,
    }
}

#[tokio::test]
async fn submit_get_list_cancel_results() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut items = vec![item("a red fox"), item("a blue bird")];
    items[1].images_per_prompt = Some(3);
    items[1].width = Some(128);
    let mut req = request(items);
    req.job
        .as_mut()
        .unwrap()
        .labels
        .insert("team".into(), "vision".into());
    req.job.as_mut().unwrap().output_prefix = "runs/a".into();
    let r = h.client.submit_job(req).await?.into_inner();
    assert!(r.created);
    assert_eq!(r.task_count, 4);
    assert_eq!(h.enqueued().await?, 4);

    let job = h
        .client
        .get_job(pb::GetJobRequest {
            job_id: r.job_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(job.state(), pb::JobState::Queued);
    assert_eq!(
        (job.task_count, job.pending, job.done, job.item_count),
        (4, 4, 0, 2)
    );
    assert_eq!(job.spec.as_ref().unwrap().output_prefix, "runs/a");

    // Filter by label and state.
    let mut other = request(vec![item("other")]);
    other
        .job
        .as_mut()
        .unwrap()
        .labels
        .insert("team".into(), "audio".into());
    h.client.submit_job(other).await?;
    let list = h
        .client
        .list_jobs(pb::ListJobsRequest {
            labels: [("team".to_string(), "vision".to_string())].into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        list.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [r.job_id.as_str()]
    );
    let all = h
        .client
        .list_jobs(pb::ListJobsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(all.jobs.len(), 1);
    assert!(!all.next_page_token.is_empty(), "a second page exists");
    let page2 = h
        .client
        .list_jobs(pb::ListJobsRequest {
            page_size: 1,
            page_token: all.next_page_token,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(page2.jobs.len(), 1);
    assert_ne!(page2.jobs[0].id, all.jobs[0].id);

    // Nothing rendered yet.
    let res = h
        .client
        .list_results(pb::ListResultsRequest {
            job_id: r.job_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(res.results.is_empty());

    let c = h
        .client
        .cancel_job(pb::CancelJobRequest {
            job_id: r.job_id.clone(),
        })
        .await?
        .into_inner();
    let job = c.job.unwrap();
    assert_eq!(job.state(), pb::JobState::Canceled);
    assert_eq!(job.canceled + job.done + job.failed, job.task_count);
    let queued = h
        .client
        .list_jobs(pb::ListJobsRequest {
            state: pb::JobState::Canceled as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(queued.jobs.len(), 1);
    // Cancelling again: the job is finished.
    let e = h
        .client
        .cancel_job(pb::CancelJobRequest {
            job_id: r.job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    Ok(())
}

#[tokio::test]
async fn invalid_jobs_name_fields_and_enqueue_nothing() -> Result<()> {
    let mut h = Harness::start().await?;
    let cases: Vec<(Vec<pb::Item>, &str)> = vec![
        (vec![], "items"),
        (
            vec![pb::Item {
                width: Some(17),
                ..item("x")
            }],
            "items[0].width",
        ),
        (
            vec![pb::Item {
                steps: Some(0),
                ..item("x")
            }],
            "items[0].steps",
        ),
        (
            vec![pb::Item {
                steps: Some(100),
                ..item("x")
            }],
            "items[0].steps",
        ),
        (
            vec![pb::Item {
                prompt: String::new(),
                ..item("x")
            }],
            "items[0].prompt",
        ),
        (
            vec![pb::Item {
                prompt: "x".repeat(1 << 20),
                ..item("x")
            }],
            "items[0].prompt",
        ),
    ];
    for (items, field) in cases {
        let e = h.client.submit_job(request(items)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            violations(&e).iter().any(|f| f == field),
            "{field} not in {:?}",
            violations(&e)
        );
        assert!(
            e.message().contains(field),
            "message `{}` names {field}",
            e.message()
        );
    }
    // Many bad items: every one is named, the good ones are not.
    let mut items: Vec<pb::Item> = (0..40).map(|i| item(&format!("p{i}"))).collect();
    items[37].width = Some(17);
    items[3].steps = Some(9);
    items[5].control = Some(pb::Control {
        source: None,
        kind: "pencil".into(),
        scale: None,
        ..Default::default()
    });
    let e = h.client.submit_job(request(items)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let v = violations(&e);
    for f in [
        "items[3].steps",
        "items[5].control.kind",
        "items[5].control",
        "items[37].width",
    ] {
        assert!(v.iter().any(|x| x == f), "{f} in {v:?}");
    }
    assert!(e.message().contains("items[37].width"));
    assert_eq!(h.enqueued().await?, 0, "nothing enqueued for rejected jobs");
    let jobs = h
        .client
        .list_jobs(pb::ListJobsRequest::default())
        .await?
        .into_inner();
    assert!(jobs.jobs.is_empty());
    Ok(())
}

#[tokio::test]
async fn unknown_ids_are_not_found() -> Result<()> {
    let mut h = Harness::start().await?;
    let id = "0190c0de-0000-7000-8000-000000000000".to_string();
    for bad in [id.clone(), "not-a-uuid".to_string()] {
        let e = h
            .client
            .get_job(pb::GetJobRequest {
                job_id: bad.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{bad}");
        assert!(e.message().contains(&bad));
        let e = h
            .client
            .cancel_job(pb::CancelJobRequest {
                job_id: bad.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = h
            .client
            .list_results(pb::ListResultsRequest {
                job_id: bad.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = h
            .client
            .watch_job(pb::WatchJobRequest {
                job_id: bad.clone(),
                after_event_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let e = h
        .client
        .get_job(pb::GetJobRequest {
            job_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(violations(&e), ["job_id"]);
    Ok(())
}

#[tokio::test]
async fn idempotent_resubmit_returns_the_same_job() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut req = request(vec![item("a"), item("b")]);
    req.job.as_mut().unwrap().idempotency_key = "batch-42".into();
    let a = h.client.submit_job(req.clone()).await?.into_inner();
    let b = h.client.submit_job(req.clone()).await?.into_inner();
    assert!(a.created && !b.created);
    assert_eq!(a.job_id, b.job_id);
    assert_eq!(h.enqueued().await?, 2, "nothing enqueued twice");
    // Same key, different job: refused.
    req.items.push(item("c"));
    let e = h.client.submit_job(req).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(h.enqueued().await?, 2);
    Ok(())
}

#[tokio::test]
async fn streamed_submit_and_protocol_errors() -> Result<()> {
    use pb::submit_job_chunk::Chunk;
    let mut h = Harness::start().await?;
    let header = pb::SubmitJobChunk {
        chunk: Some(Chunk::Header(pb::JobSpec::default())),
    };
    let chunk = |range: std::ops::Range<usize>| pb::SubmitJobChunk {
        chunk: Some(Chunk::Items(pb::ItemChunk {
            items: range.map(|i| item(&format!("p{i}"))).collect(),
        })),
    };
    let msgs = vec![header.clone(), chunk(0..1000), chunk(1000..2500)];
    let r = h
        .client
        .submit_job_stream(futures::stream::iter(msgs))
        .await?
        .into_inner();
    assert_eq!(r.task_count, 2500);
    assert_eq!(h.enqueued().await?, 2500);

    // Item indices are global across chunks.
    let mut bad = chunk(1000..1010);
    if let Some(Chunk::Items(c)) = &mut bad.chunk {
        c.items[7].height = Some(0);
    }
    let e = h
        .client
        .submit_job_stream(futures::stream::iter(vec![
            header.clone(),
            chunk(0..1000),
            bad,
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(violations(&e), ["items[1007].height"]);

    let e = h
        .client
        .submit_job_stream(futures::stream::iter(vec![chunk(0..3)]))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), violations(&e)),
        (Code::InvalidArgument, vec!["header".to_string()])
    );
    let e = h
        .client
        .submit_job_stream(futures::stream::iter(vec![header.clone(), header.clone()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = h
        .client
        .submit_job_stream(futures::stream::iter(vec![header]))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), ["items"]);
    assert_eq!(
        h.enqueued().await?,
        2500,
        "rejected streams enqueue nothing"
    );
    Ok(())
}

#[tokio::test]
async fn watch_streams_events_and_ends_at_shutdown() -> Result<()> {
    let mut h = Harness::start().await?;
    let r = h
        .client
        .submit_job(request(vec![item("a")]))
        .await?
        .into_inner();
    let mut s = h
        .client
        .watch_job(pb::WatchJobRequest {
            job_id: r.job_id.clone(),
            after_event_id: String::new(),
        })
        .await?
        .into_inner();
    let first = s.next().await.expect("an event")?;
    assert!(matches!(
        first.kind,
        Some(pb::job_event::Kind::Queued(pb::JobQueued { task_count: 1 }))
    ));
    assert_eq!(first.job_id, r.job_id);
    // Cancel: the stream carries JobFinished and ends.
    h.client
        .cancel_job(pb::CancelJobRequest {
            job_id: r.job_id.clone(),
        })
        .await?;
    let mut kinds = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(10), s.next()).await? {
        kinds.push(e?.kind);
    }
    assert!(
        matches!(kinds.last(), Some(Some(pb::job_event::Kind::Finished(f))) if f.state() == pb::JobState::Canceled)
    );

    // A watch of a running job ends when the server shuts down, so shutdown does not hang.
    let r2 = h
        .client
        .submit_job(request(vec![item("b")]))
        .await?
        .into_inner();
    let mut s2 = h
        .client
        .watch_job(pb::WatchJobRequest {
            job_id: r2.job_id,
            after_event_id: String::new(),
        })
        .await?
        .into_inner();
    s2.next().await.expect("queued event")?;
    h.stop.take().unwrap().send(()).ok();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = s2.next().await {}
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(10), &mut h.server).await??;
    Ok(())
}

#[tokio::test]
async fn health_and_reflection() -> Result<()> {
    let h = Harness::start().await?;
    let channel = Channel::from_shared(format!("http://{}", h.addr))?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pixfarm.v1.Farm".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        r.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await?
        .into_inner();
    let msg = resp.next().await.expect("a reply")?;
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection reply {msg:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"pixfarm.v1.Farm".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    Ok(())
}
