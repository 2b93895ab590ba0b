//! Authentication, roles, tenant isolation, limits and TLS of the coordinator,
//! over real gRPC against a real `redis-server` and a real S3 server
//! (`s3s-fs`, served in the test process or named by `.ci/run`), with certificates made at test time by `tests/certs/gen.sh`.
//!
//! Every refusal is checked twice: the status code, and that nothing changed
//! in Redis (no job written, no task enqueued, the job still QUEUED).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::violations;
use futures::StreamExt;
use pixfarm_coordinator::{Authenticator, FarmService, ServeOptions, serve_with_options};
use pixfarm_core::auth::hash_token;
use pixfarm_core::testing::{RedisServer, S3Server};
use pixfarm_core::{Lane, Limits, Queue, QueueConfig, Storage, TaskResult, Timings, Variant};
use pixfarm_proto::v1 as pb;
use pixfarm_proto::v1::farm_client::FarmClient;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const A_SUBMIT: &str = "tok-a-submit-0123456789";
const A_READ: &str = "tok-a-read-0123456789";
const B_SUBMIT: &str = "tok-b-submit-0123456789";
const ADMIN: &str = "tok-admin-0123456789";
const WORKER: &str = "tok-worker-0123456789";
const MAX_MESSAGE: usize = 64 * 1024;
const PRESIGN_SECS: u64 = 600;

type Client = FarmClient<InterceptedService<Channel, Bearer>>;

/// Test-side bearer interceptor (the CLI's lives in the `pixfarm` crate,
/// which depends on this one).
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(v.as_str()).unwrap(),
            );
        }
        Ok(r)
    }
}

fn tokens_toml(entries: &[(&str, &str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, token, tenant, role)| {
            format!(
                "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\ntenant = \"{tenant}\"\nrole = \"{role}\"\n\n",
                hash_token(token)
            )
        })
        .collect()
}

fn all_tokens() -> String {
    tokens_toml(&[
        ("a-submit", A_SUBMIT, "team-a", "submit"),
        ("a-read", A_READ, "team-a", "read"),
        ("b-submit", B_SUBMIT, "team-b", "submit"),
        ("ops", ADMIN, "ops", "admin"),
        ("fleet", WORKER, "ops", "worker"),
    ])
}

/// Server-side TLS files for [`Harness::start`].
struct Tls {
    certs: PathBuf,
    mutual: bool,
}

struct Harness {
    redis: RedisServer,
    _s3: S3Server,
    queue: Queue,
    storage: Storage,
    addr: std::net::SocketAddr,
    tokens: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(tls: Option<Tls>) -> Result<Self> {
        Self::start_with(tls, Limits::default()).await
    }

    async fn start_with(tls: Option<Tls>, limits: Limits) -> Result<Self> {
        let redis = RedisServer::start().await?;
        let s3 = S3Server::from_env_or_start().await?;
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens.toml");
        std::fs::write(&tokens, all_tokens())?;
        let queue = Queue::connect(
            &redis.url(),
            QueueConfig {
                limits,
                ..QueueConfig::default()
            },
        )
        .await?;
        queue.ensure_groups().await?;
        let bucket = format!("auth-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut options = s3.storage_options();
        options.presign_expiry = Duration::from_secs(PRESIGN_SECS);
        let storage = Storage::open_with(&s3.storage_url(&bucket), options).await?;
        let service = FarmService::new(queue.clone(), storage.clone(), (64, 64));
        let tls = match tls {
            None => None,
            Some(t) => pixfarm_coordinator::tls::TlsArgs {
                tls_cert: Some(t.certs.join("server.pem")),
                tls_key: Some(t.certs.join("server.key")),
                tls_client_ca: t.mutual.then(|| t.certs.join("ca.pem")),
            }
            .server_config()?,
        };
        let options = ServeOptions {
            max_message_bytes: MAX_MESSAGE,
            auth: Authenticator::from_file(&tokens, Duration::from_millis(100))?,
            tls,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve_with_options(service, options, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        Ok(Self {
            redis,
            _s3: s3,
            queue,
            storage,
            addr,
            tokens,
            stop: Some(stop),
            server,
            _dir: dir,
        })
    }

    async fn client(&self, token: Option<&str>) -> Result<Client> {
        let ch = Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?;
        Ok(FarmClient::with_interceptor(ch, bearer(token)))
    }

    async fn redis(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.redis.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// Jobs in the global index and tasks in every lane stream: what a refused
    /// request must not have changed.
    async fn footprint(&self) -> Result<(u64, u64)> {
        let mut c = self.redis().await?;
        let jobs: u64 = redis::cmd("ZCARD")
            .arg("pf:jobs")
            .query_async(&mut c)
            .await?;
        let mut tasks = 0;
        for lane in Lane::all() {
            let n: u64 = redis::cmd("XLEN")
                .arg(lane.key())
                .query_async(&mut c)
                .await?;
            tasks += n;
        }
        Ok((jobs, tasks))
    }

    async fn state(&self, job: &str) -> Result<pixfarm_core::JobState> {
        let id = pixfarm_core::JobId::parse(job).context("job id")?;
        Ok(self.queue.get_job(&id).await?.state)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.server).await;
    }
}

fn bearer(token: Option<&str>) -> Bearer {
    Bearer(token.map(|t| format!("Bearer {t}")))
}

fn item(prompt: &str) -> pb::Item {
    pb::Item {
        prompt: prompt.into(),
        seed: Some(1),
        ..Default::default()
    }
}

fn request(prefix: &str, n: usize) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        job: Some(pb::JobSpec {
            output_prefix: prefix.into(),
            ..Default::default()
        }),
        items: (0..n).map(|i| item(&format!("prompt {i}"))).collect(),
    }
}

/// Calls every Farm RPC and returns each one's status code (OK or the error).
async fn every_rpc(c: &mut Client, job: &str) -> Vec<(&'static str, Code)> {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.err().map_or(Code::Ok, |s| s.code())
    }
    let watch = match c
        .watch_job(pb::WatchJobRequest {
            job_id: job.into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    vec![
        ("SubmitJob", code(c.submit_job(request("x", 1)).await)),
        (
            "SubmitJobStream",
            code(
                c.submit_job_stream(futures::stream::iter(vec![pb::SubmitJobChunk {
                    chunk: Some(pb::submit_job_chunk::Chunk::Header(pb::JobSpec::default())),
                }]))
                .await,
            ),
        ),
        (
            "GetJob",
            code(c.get_job(pb::GetJobRequest { job_id: job.into() }).await),
        ),
        (
            "ListJobs",
            code(c.list_jobs(pb::ListJobsRequest::default()).await),
        ),
        ("WatchJob", watch),
        (
            "CancelJob",
            code(
                c.cancel_job(pb::CancelJobRequest { job_id: job.into() })
                    .await,
            ),
        ),
        (
            "ListResults",
            code(
                c.list_results(pb::ListResultsRequest {
                    job_id: job.into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "ListWorkers",
            code(c.list_workers(pb::ListWorkersRequest {}).await),
        ),
    ]
}

#[tokio::test]
async fn missing_malformed_and_wrong_tokens_are_unauthenticated_and_change_nothing() -> Result<()> {
    let h = Harness::start(None).await?;
    let job = h
        .client(Some(A_SUBMIT))
        .await?
        .submit_job(request("runs", 2))
        .await?
        .into_inner()
        .job_id;
    let before = h.footprint().await?;
    assert_eq!(before, (1, 2));

    for token in [None, Some("wrong-token"), Some("")] {
        let mut c = h.client(token).await?;
        for (rpc, code) in every_rpc(&mut c, &job).await {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with {token:?}");
        }
    }
    // Not a bearer scheme, and the right token in the wrong scheme.
    for raw in ["Basic YTpi", A_SUBMIT, "Bearer"] {
        let ch = Endpoint::from_shared(format!("http://{}", h.addr))?
            .connect()
            .await?;
        let mut c = FarmClient::with_interceptor(ch, Bearer(Some(raw.to_string())));
        let e = c
            .get_job(pb::GetJobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{raw}");
    }
    assert_eq!(h.footprint().await?, before);
    assert_eq!(h.state(&job).await?, pixfarm_core::JobState::Queued);

    // Health and reflection need no token.
    let ch = Endpoint::from_shared(format!("http://{}", h.addr))?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pixfarm.v1.Farm".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    h.stop().await;
    Ok(())
}

#[tokio::test]
async fn roles_limit_what_a_valid_token_may_do() -> Result<()> {
    let h = Harness::start(None).await?;
    let mut a = h.client(Some(A_SUBMIT)).await?;
    let job = a.submit_job(request("runs", 2)).await?.into_inner().job_id;
    let before = h.footprint().await?;

    // A read-only token: reads its tenant, may not submit or cancel.
    let mut r = h.client(Some(A_READ)).await?;
    let codes = every_rpc(&mut r, &job).await;
    let expect = [
        ("SubmitJob", Code::PermissionDenied),
        ("SubmitJobStream", Code::PermissionDenied),
        ("GetJob", Code::Ok),
        ("ListJobs", Code::Ok),
        ("WatchJob", Code::Ok),
        ("CancelJob", Code::PermissionDenied),
        ("ListResults", Code::Ok),
        ("ListWorkers", Code::PermissionDenied),
    ];
    assert_eq!(codes, expect);
    let e = r.submit_job(request("runs", 1)).await.unwrap_err();
    assert!(
        e.message().contains("a-read") && e.message().contains("read"),
        "{}",
        e.message()
    );
    assert_eq!(
        h.footprint().await?,
        before,
        "a refused submit wrote nothing"
    );
    assert_eq!(h.state(&job).await?, pixfarm_core::JobState::Queued);

    // A worker token: only the worker list.
    let mut w = h.client(Some(WORKER)).await?;
    let codes: Vec<Code> = every_rpc(&mut w, &job)
        .await
        .into_iter()
        .map(|c| c.1)
        .collect();
    assert_eq!(
        codes,
        [
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::Ok
        ]
    );
    assert_eq!(h.footprint().await?, before);
    assert_eq!(h.state(&job).await?, pixfarm_core::JobState::Queued);

    // A submit token may not list workers; an admin may.
    let e = a.list_workers(pb::ListWorkersRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut admin = h.client(Some(ADMIN)).await?;
    admin.list_workers(pb::ListWorkersRequest {}).await?;
    h.stop().await;
    Ok(())
}

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_others_jobs() -> Result<()> {
    let h = Harness::start(None).await?;
    let mut a = h.client(Some(A_SUBMIT)).await?;
    let mut b = h.client(Some(B_SUBMIT)).await?;
    let mut admin = h.client(Some(ADMIN)).await?;

    let ja = a.submit_job(request("runs", 3)).await?.into_inner().job_id;
    let jb = b.submit_job(request("runs", 1)).await?.into_inner().job_id;
    let got = a
        .get_job(pb::GetJobRequest { job_id: ja.clone() })
        .await?
        .into_inner();
    assert_eq!(
        got.spec.unwrap().tenant,
        "team-a",
        "tenant comes from the token"
    );
    let before = h.footprint().await?;
    assert_eq!(before, (2, 4));

    // B on A's job: exactly what B sees for a job that does not exist.
    let ghost = uuid::Uuid::now_v7().to_string();
    for id in [&ja, &ghost] {
        let e = b
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e2 = b
            .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(e2.code(), Code::NotFound);
        let e3 = b
            .watch_job(pb::WatchJobRequest {
                job_id: id.clone(),
                ..Default::default()
            })
            .await
            .err()
            .context("watch of a foreign job must fail")?;
        assert_eq!(e3.code(), Code::NotFound);
        let e4 = b
            .list_results(pb::ListResultsRequest {
                job_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e4.code(), Code::NotFound);
        // The messages do not tell a foreign job from a missing one.
        assert_eq!(
            e.message().replace(id.as_str(), "ID"),
            e2.message().replace(id.as_str(), "ID")
        );
    }
    let foreign = b
        .get_job(pb::GetJobRequest { job_id: ja.clone() })
        .await
        .unwrap_err();
    let missing = b
        .get_job(pb::GetJobRequest {
            job_id: ghost.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        foreign.message().replace(&ja, "ID"),
        missing.message().replace(&ghost, "ID")
    );
    assert_eq!(h.footprint().await?, before);
    assert_eq!(h.state(&ja).await?, pixfarm_core::JobState::Queued);

    // Listing: each tenant sees its own; the admin sees both.
    let ids = |r: pb::ListJobsResponse| r.jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let la = ids(a
        .list_jobs(pb::ListJobsRequest::default())
        .await?
        .into_inner());
    let lb = ids(b
        .list_jobs(pb::ListJobsRequest::default())
        .await?
        .into_inner());
    let lr = ids(admin
        .list_jobs(pb::ListJobsRequest::default())
        .await?
        .into_inner());
    assert_eq!(la, [ja.as_str()]);
    assert_eq!(lb, [jb.as_str()]);
    assert_eq!(lr.len(), 2);

    // Naming another tenant at submit: refused for B, allowed for the admin.
    let mut req = request("runs", 1);
    req.job.as_mut().unwrap().tenant = "team-a".into();
    let e = b.submit_job(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("tenant"), "{}", e.message());
    let e = b
        .submit_job_stream(futures::stream::iter(vec![
            pb::SubmitJobChunk {
                chunk: Some(pb::submit_job_chunk::Chunk::Header(
                    req.job.clone().unwrap(),
                )),
            },
            pb::SubmitJobChunk {
                chunk: Some(pb::submit_job_chunk::Chunk::Items(pb::ItemChunk {
                    items: vec![item("x")],
                })),
            },
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(h.footprint().await?, before);
    let jadm = admin.submit_job(req).await?.into_inner().job_id;
    let rec = a
        .get_job(pb::GetJobRequest { job_id: jadm })
        .await?
        .into_inner();
    assert_eq!(rec.spec.unwrap().tenant, "team-a");

    // B cancels its own job; A's is untouched.
    b.cancel_job(pb::CancelJobRequest { job_id: jb.clone() })
        .await?;
    assert_eq!(h.state(&ja).await?, pixfarm_core::JobState::Queued);

    // Object keys start with the tenant; presigned URLs carry the configured expiry.
    let tasks = h
        .queue
        .pull(
            "w-test",
            &Lane::all_of(Variant::Base),
            10,
            Duration::from_millis(200),
        )
        .await?;
    let ta = tasks
        .iter()
        .find(|t| t.spec.job.to_string() == ja)
        .context("a task of A's job")?;
    assert_eq!(
        ta.spec.output_key,
        format!("team-a/runs/{ja}/{:06}.png", ta.spec.index)
    );
    h.storage
        .put(&ta.spec.output_key, b"png".to_vec().into(), "image/png")
        .await?;
    let res = TaskResult::succeeded(
        ta,
        ta.spec.output_key.clone(),
        "00".into(),
        "w-test",
        Timings::default(),
    );
    h.queue.complete(ta, &res).await?;
    let results = a
        .list_results(pb::ListResultsRequest {
            job_id: ja.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .results;
    let done = results.iter().find(|r| r.succeeded).context("one result")?;
    assert!(done.key.starts_with("team-a/"), "{}", done.key);
    assert!(
        done.url.contains(&format!("X-Amz-Expires={PRESIGN_SECS}")),
        "{}",
        done.url
    );
    h.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_removed_token_stops_working_after_reload() -> Result<()> {
    let h = Harness::start(None).await?;
    let mut b = h.client(Some(B_SUBMIT)).await?;
    b.list_jobs(pb::ListJobsRequest::default()).await?;

    // Rotate: B's token removed, a new one for B added.
    const B2: &str = "tok-b-rotated-0123456789";
    std::fs::write(
        &h.tokens,
        tokens_toml(&[
            ("a-submit", A_SUBMIT, "team-a", "submit"),
            ("b-new", B2, "team-b", "submit"),
        ]),
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match b.list_jobs(pb::ListJobsRequest::default()).await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => bail!("the removed token still works or failed oddly: {other:?}"),
        }
    }
    let before = h.footprint().await?;
    let e = b.submit_job(request("runs", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(h.footprint().await?, before);
    h.client(Some(B2))
        .await?
        .submit_job(request("runs", 1))
        .await?;

    // A broken file is refused: the tokens in force stay in force.
    std::fs::write(&h.tokens, "[[tokens]]\nname = \"x\"\nsha256 = \"nothex\"\n")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.client(Some(B2))
        .await?
        .list_jobs(pb::ListJobsRequest::default())
        .await?;
    h.stop().await;
    Ok(())
}

#[tokio::test]
async fn escaping_output_prefixes_are_rejected_naming_the_field() -> Result<()> {
    let h = Harness::start(None).await?;
    let mut a = h.client(Some(A_SUBMIT)).await?;
    for bad in [
        "..",
        "../team-b",
        "runs/../../team-b",
        "/etc",
        "a\\b",
        "a/./b",
        "a//b",
        "a\u{0}b",
        "a\nb",
        "caf\u{e9}",
        "\u{ff52}uns",             // fullwidth letters
        "a\u{202e}b",              // right-to-left override
        "team-b/\u{2024}\u{2024}", // one-dot leaders that look like `..`
    ] {
        let e = a.submit_job(request(bad, 1)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(violations(&e), ["output_prefix"], "{bad:?}");
        assert!(e.message().contains("output_prefix"), "{}", e.message());
    }
    assert_eq!(h.footprint().await?, (0, 0));
    h.stop().await;
    Ok(())
}

#[tokio::test]
async fn oversized_messages_and_limits_are_refused_with_clear_errors() -> Result<()> {
    let limits = Limits {
        max_items: 3,
        max_prompt_bytes: 100,
        max_size: 512,
        max_control_bytes: 1000,
        ..Limits::default()
    };
    let h = Harness::start_with(None, limits).await?;
    let mut a = h.client(Some(A_SUBMIT)).await?;

    // Over the gRPC message limit (64 KiB here): refused before decoding.
    let mut big = request("runs", 1);
    big.items[0].prompt = "x".repeat(MAX_MESSAGE + 1);
    let e = a.submit_job(big).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{}", e.message());

    // Each configured limit, with the field it concerns.
    let mut long = request("runs", 1);
    long.items[0].prompt = "y".repeat(101);
    let e = a.submit_job(long).await.unwrap_err();
    assert_eq!(violations(&e), ["items[0].prompt"]);
    assert!(
        e.message().contains("limit of 100 bytes"),
        "{}",
        e.message()
    );

    let e = a.submit_job(request("runs", 4)).await.unwrap_err();
    assert_eq!(violations(&e), ["items"]);
    assert!(e.message().contains("limit of 3"), "{}", e.message());

    let mut wide = request("runs", 1);
    wide.items[0].width = Some(1024);
    let e = a.submit_job(wide).await.unwrap_err();
    assert_eq!(violations(&e), ["items[0].width"]);
    assert!(e.message().contains("16..=512"), "{}", e.message());

    let mut ctl = request("runs", 1);
    ctl.items[0].control = Some(pb::Control {
        source: Some(pb::control::Source::Inline(vec![0u8; 1001])),
        kind: "canny".into(),
        ..Default::default()
    });
    let e = a.submit_job(ctl).await.unwrap_err();
    assert_eq!(violations(&e), ["items[0].control.image"]);
    assert!(
        e.message().contains("limit of 1000 bytes"),
        "{}",
        e.message()
    );

    // The streamed submit stops reading at the item limit.
    let chunks = vec![
        pb::SubmitJobChunk {
            chunk: Some(pb::submit_job_chunk::Chunk::Header(pb::JobSpec::default())),
        },
        pb::SubmitJobChunk {
            chunk: Some(pb::submit_job_chunk::Chunk::Items(pb::ItemChunk {
                items: (0..4).map(|i| item(&format!("p{i}"))).collect(),
            })),
        },
    ];
    let e = a
        .submit_job_stream(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), ["items"]);

    assert_eq!(h.footprint().await?, (0, 0), "nothing was enqueued");
    h.stop().await;
    Ok(())
}

/// Runs the committed generator into a temp dir.
fn make_certs(dir: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/certs/gen.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed (needs openssl): {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn tls_client(
    addr: std::net::SocketAddr,
    certs: &Path,
    identity: Option<(&str, &str)>,
    token: &str,
) -> Result<Client> {
    pixfarm_coordinator::tls::install_crypto_provider();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(certs.join("ca.pem"))?))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(certs.join(c))?,
            std::fs::read(certs.join(k))?,
        ));
    }
    let ch = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(FarmClient::with_interceptor(ch, bearer(Some(token))))
}

/// A call through a client that may fail at connect or at the first call;
/// returns the error text, or `None` if the call succeeded.
async fn try_list(c: Result<Client>) -> Option<String> {
    match c {
        Err(e) => Some(format!("{e:#}")),
        Ok(mut c) => match c.list_jobs(pb::ListJobsRequest::default()).await {
            Ok(_) => None,
            Err(s) => Some(format!("{s:?}")),
        },
    }
}

#[tokio::test]
async fn tls_and_mutual_tls_handshakes() -> Result<()> {
    let certs = tempfile::tempdir()?;
    make_certs(certs.path())?;

    // Server TLS: a client trusting the CA works; plaintext does not.
    let h = Harness::start(Some(Tls {
        certs: certs.path().to_path_buf(),
        mutual: false,
    }))
    .await?;
    let mut c = tls_client(h.addr, certs.path(), None, A_SUBMIT).await?;
    let job = c.submit_job(request("tls", 1)).await?.into_inner().job_id;
    assert_eq!(h.state(&job).await?, pixfarm_core::JobState::Queued);
    let plain = try_list(h.client(Some(A_SUBMIT)).await).await;
    assert!(plain.is_some(), "plaintext call to a TLS port must fail");
    // TLS does not replace the token.
    let mut anon = tls_client(h.addr, certs.path(), None, "nope").await?;
    let e = anon
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    h.stop().await;

    // Mutual TLS: no client certificate, or one from another CA, fails the handshake.
    let h = Harness::start(Some(Tls {
        certs: certs.path().to_path_buf(),
        mutual: true,
    }))
    .await?;
    let no_cert = try_list(tls_client(h.addr, certs.path(), None, A_SUBMIT).await).await;
    assert!(
        no_cert.is_some(),
        "mTLS without a client certificate must fail"
    );
    let foreign = try_list(
        tls_client(
            h.addr,
            certs.path(),
            Some(("other-client.pem", "other-client.key")),
            A_SUBMIT,
        )
        .await,
    )
    .await;
    assert!(foreign.is_some(), "a certificate from another CA must fail");
    assert_eq!(h.footprint().await?, (0, 0));
    let ok = try_list(
        tls_client(
            h.addr,
            certs.path(),
            Some(("client.pem", "client.key")),
            A_SUBMIT,
        )
        .await,
    )
    .await;
    assert_eq!(ok, None, "a client certificate from the CA is accepted");
    h.stop().await;
    Ok(())
}

#[tokio::test]
async fn watch_streams_only_the_callers_jobs() -> Result<()> {
    let h = Harness::start(None).await?;
    let mut a = h.client(Some(A_SUBMIT)).await?;
    let ja = a.submit_job(request("runs", 1)).await?.into_inner().job_id;
    let mut s = a
        .watch_job(pb::WatchJobRequest {
            job_id: ja.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await?
        .context("an event")??;
    assert_eq!(first.job_id, ja);
    h.stop().await;
    Ok(())
}

/// Hole 9, the confused deputy: a control image must be one its tenant may read. Tenant B naming
/// tenant A's render (or another bucket, or a path that climbs out) is refused with
/// PERMISSION_DENIED naming the field, and nothing is queued; its own results pass this check.
#[tokio::test]
async fn control_images_outside_the_tenants_prefixes_are_refused() -> Result<()> {
    let h = Harness::start(None).await?;
    let mut b = h.client(Some(B_SUBMIT)).await?;
    let a_root = h.storage.tenant_root("team-a").expect("an S3 store");
    let b_root = h.storage.tenant_root("team-b").expect("an S3 store");
    let bucket = a_root
        .trim_start_matches("s3://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let with_control = |uri: String| {
        let mut r = request("", 2);
        r.items[1].control = Some(pb::Control {
            source: Some(pb::control::Source::Uri(uri)),
            kind: "edge".into(),
            ..Default::default()
        });
        r
    };
    for bad in [
        format!("{a_root}runs/job/000000.png"),
        format!("s3://other-{bucket}/team-b/x.png"),
        format!("{b_root}../team-a/x.png"),
        format!("{b_root}%2e%2e/team-a/x.png"),
        format!("{b_root}a//x.png"),
    ] {
        let e = b.submit_job(with_control(bad.clone())).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{bad}: {}", e.message());
        assert_eq!(violations(&e), ["items[1].control.uri"], "{bad}");
        assert!(
            e.message().contains("items[1].control.uri"),
            "{}",
            e.message()
        );
    }
    assert_eq!(h.footprint().await?, (0, 0));
    // The tenant's own results pass the confinement check (this farm then refuses the job for
    // another reason: no worker serves the control lane).
    let own = b
        .submit_job(with_control(format!("{b_root}runs/job/000000.png")))
        .await;
    if let Err(e) = own {
        assert_ne!(e.code(), Code::PermissionDenied, "{}", e.message());
    }
    h.stop().await;
    Ok(())
}
