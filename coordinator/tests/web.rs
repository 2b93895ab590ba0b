//! The web gallery over real HTTP, against a real `redis-server` and a real S3 server (SigV4
//! checked): pages render, prompts are escaped, another tenant sees nothing (404 exactly like a
//! missing job, also for guessed image URLs), cancel needs the right role and the CSRF token,
//! no token leads to the login form, live progress arrives over server-sent events.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pixfarm_coordinator::Authenticator;
use pixfarm_coordinator::web::{self, WebState};
use pixfarm_core::auth::hash_token;
use pixfarm_core::testing::{RedisServer, S3Server, http_get};
use pixfarm_core::{
    ItemSpec, JobId, JobSpec, JobState, Lane, Queue, QueueConfig, Storage, Task, TaskResult,
    Timings, Variant,
};
use tokio::sync::oneshot;

const A_SUBMIT: &str = "tok-a-submit-0123456789";
const A_READ: &str = "tok-a-read-0123456789";
const B_SUBMIT: &str = "tok-b-submit-0123456789";
const ADMIN: &str = "tok-admin-0123456789";
const XSS: &str = "<script>alert('pwned')</script> a red cube";

struct Harness {
    _redis: RedisServer,
    _s3: S3Server,
    queue: Queue,
    storage: Storage,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Result<Self> {
        let redis = RedisServer::start().await?;
        let s3 = S3Server::from_env_or_start().await?;
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens.toml");
        let entries = [
            ("a-submit", A_SUBMIT, "team-a", "submit"),
            ("a-read", A_READ, "team-a", "read"),
            ("b-submit", B_SUBMIT, "team-b", "submit"),
            ("ops", ADMIN, "ops", "admin"),
        ];
        let toml: String = entries
            .iter()
            .map(|(n, t, tenant, role)| {
                format!(
                    "[[tokens]]\nname = \"{n}\"\nsha256 = \"{}\"\ntenant = \"{tenant}\"\nrole = \"{role}\"\n\n",
                    hash_token(t)
                )
            })
            .collect();
        std::fs::write(&tokens, toml)?;
        let queue = Queue::connect(&redis.url(), QueueConfig::default()).await?;
        queue.ensure_groups().await?;
        let bucket = format!("web-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let storage = Storage::open_with(&s3.storage_url(&bucket), s3.storage_options()).await?;
        let auth = Authenticator::from_file(&tokens, Duration::from_secs(60))?;
        let state = WebState::new(queue.clone(), storage.clone(), auth).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (stop, rx) = oneshot::channel::<()>();
        let server = web::start(listener, state, async {
            let _ = rx.await;
        })?;
        Ok(Self {
            _redis: redis,
            _s3: s3,
            queue,
            storage,
            addr: server.addr,
            stop: Some(stop),
            _dir: dir,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A job of `tenant` with `n` items, the first with the XSS prompt.
    async fn submit(&self, tenant: &str, n: usize) -> Result<JobId> {
        let items = (0..n)
            .map(|i| {
                let p = if i == 0 {
                    XSS.to_string()
                } else {
                    format!("item {i}")
                };
                ItemSpec::new(p, 64, 64).with_seed(i as u64)
            })
            .collect();
        let mut spec = JobSpec::new(items);
        spec.tenant = tenant.to_string();
        spec.output_prefix = "runs".into();
        spec.labels.insert("batch".into(), "web-test".into());
        Ok(self.queue.submit(spec).await?.job)
    }

    async fn tasks_of(&self, job: &JobId, want: usize) -> Result<Vec<Task>> {
        let mut out = Vec::new();
        for _ in 0..20 {
            let tasks = self
                .queue
                .pull(
                    "w-web",
                    &Lane::all_of(Variant::Base),
                    100,
                    Duration::from_millis(100),
                )
                .await?;
            out.extend(tasks.into_iter().filter(|t| &t.spec.job == job));
            if out.len() >= want {
                out.sort_by_key(|t| t.spec.index);
                return Ok(out);
            }
        }
        bail!("only {} of {want} tasks pulled", out.len())
    }

    /// Records `task` as rendered (with an object in the store) like a worker does.
    async fn complete(&self, task: &Task) -> Result<()> {
        let body = format!("png-of-{}", task.spec.index).into_bytes();
        self.storage
            .put(&task.spec.output_key, body.into(), "image/png")
            .await?;
        let res = TaskResult::succeeded(
            task,
            task.spec.output_key.clone(),
            "00".into(),
            "w-web",
            Timings::default(),
        );
        self.queue.complete(task, &res).await?;
        Ok(())
    }

    /// A job of team-a with 3 items: #0 (XSS prompt) and #1 rendered, #2 failed for good.
    async fn job_with_results(&self) -> Result<JobId> {
        let job = self.submit("team-a", 3).await?;
        let tasks = self.tasks_of(&job, 3).await?;
        self.complete(&tasks[0]).await?;
        self.complete(&tasks[1]).await?;
        self.queue
            .fail("w-web", &tasks[2], "out of memory <b>boom</b>", false)
            .await?;
        Ok(job)
    }

    fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An HTTP answer.
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

enum Cred<'a> {
    None,
    Bearer(&'a str),
    Cookie(&'a str),
}

/// One request with ureq (blocking, on a blocking thread), redirects not followed.
async fn call(
    method: &str,
    url: String,
    cred: Cred<'_>,
    form: Option<Vec<(String, String)>>,
    extra: Vec<(&'static str, String)>,
) -> Result<Reply> {
    let method = method.to_string();
    let auth = match cred {
        Cred::None => None,
        Cred::Bearer(t) => Some(("Authorization", format!("Bearer {t}"))),
        Cred::Cookie(t) => Some(("Cookie", format!("pixfarm_token={t}"))),
    };
    tokio::task::spawn_blocking(move || {
        let agent = ureq::AgentBuilder::new().redirects(0).build();
        let mut req = agent.request(&method, &url);
        if let Some((k, v)) = &auth {
            req = req.set(k, v);
        }
        for (k, v) in &extra {
            req = req.set(k, v);
        }
        let res = match form {
            Some(f) => {
                let pairs: Vec<(&str, &str)> =
                    f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                req.send_form(&pairs)
            }
            None => req.call(),
        };
        let res = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(anyhow::anyhow!("{method} {url}: {e}")),
        };
        let status = res.status();
        let headers = res
            .headers_names()
            .into_iter()
            .map(|h| {
                let v = res.all(&h).join("\n");
                (h.to_ascii_lowercase(), v)
            })
            .collect();
        let body = res.into_string().unwrap_or_default();
        Ok(Reply {
            status,
            headers,
            body,
        })
    })
    .await?
}

async fn get(h: &Harness, path: &str, token: &str) -> Result<Reply> {
    call("GET", h.url(path), Cred::Bearer(token), None, vec![]).await
}

/// The CSRF token of the page's forms.
fn csrf_of(page: &str) -> Result<String> {
    let at = page
        .find("name=\"csrf\" value=\"")
        .context("no CSRF field on the page")?;
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    Ok(rest[..rest.find('"').context("unterminated value")?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_render_with_escaped_prompts_and_images() -> Result<()> {
    let h = Harness::start().await?;
    let job = h.job_with_results().await?;
    let id = job.as_str();

    let t = std::time::Instant::now();
    let r = get(&h, "/jobs", A_READ).await?;
    eprintln!("jobs page: {} ms", t.elapsed().as_millis());
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(&format!("/jobs/{id}")), "{}", r.body);
    assert!(r.body.contains("team-a") && r.body.contains("batch=web-test"));
    assert!(r.body.contains("2/3 done, 1 failed"), "{}", r.body);
    let csp = r.header("content-security-policy");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    // Filters.
    let r = get(&h, "/jobs?state=canceled", A_READ).await?;
    assert!(!r.body.contains(id));
    let r = get(&h, "/jobs?label=batch%3Dweb-test", A_READ).await?;
    assert!(r.body.contains(id));
    let r = get(&h, "/jobs?label=batch%3Dother", A_READ).await?;
    assert!(!r.body.contains(id));

    let r = get(&h, &format!("/jobs/{id}"), A_READ).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body.matches("<figure class=\"card").count(),
        3,
        "{}",
        r.body
    );
    assert_eq!(r.body.matches("<figure class=\"card ok\"").count(), 2);
    // The prompt is user input: it is text, never markup.
    assert!(!r.body.contains("<script>alert"), "{}", r.body);
    assert!(
        r.body
            .contains("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; a red cube")
    );
    assert!(r.body.contains("out of memory &lt;b&gt;boom&lt;/b&gt;"));
    assert!(
        !r.body.contains("Cancel job"),
        "a read token gets no cancel button"
    );
    assert!(
        !r.body.contains(A_READ),
        "the token never appears in a page"
    );

    // Images: a tenant-checked redirect to a presigned URL of the S3 server.
    let r = get(&h, &format!("/jobs/{id}/images/0"), A_READ).await?;
    assert!(matches!(r.status, 302 | 303 | 307), "{}", r.status);
    let loc = r.header("location").to_string();
    assert!(loc.contains("X-Amz-Signature"), "{loc}");
    let (status, bytes) = http_get(&loc).await?;
    assert_eq!((status, bytes.as_slice()), (200, b"png-of-0".as_slice()));
    assert_eq!(
        get(&h, &format!("/jobs/{id}/images/2"), A_READ)
            .await?
            .status,
        404,
        "a failed item has no image"
    );
    assert_eq!(
        get(&h, &format!("/jobs/{id}/images/3"), A_READ)
            .await?
            .status,
        404
    );

    // The paged fragment the grid loads as it scrolls.
    let r = get(&h, &format!("/jobs/{id}/results?size=2"), A_READ).await?;
    assert_eq!(r.body.matches("<figure").count(), 2);
    assert_eq!(
        r.header("x-next-page"),
        format!("/jobs/{id}/results?page=2")
    );

    // Workers: only for roles that may list them.
    assert_eq!(get(&h, "/workers", A_SUBMIT).await?.status, 403);
    let r = get(&h, "/workers", ADMIN).await?;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("0 live"), "{}", r.body);
    // Admins see every tenant.
    assert!(get(&h, "/jobs", ADMIN).await?.body.contains(id));
    h.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_sees_nothing_even_by_guessing_urls() -> Result<()> {
    let h = Harness::start().await?;
    let job = h.job_with_results().await?;
    let id = job.as_str();
    let before = h.queue.get_job(&job).await?.state;
    let r = get(&h, "/jobs", B_SUBMIT).await?;
    assert_eq!(r.status, 200);
    assert!(
        !r.body.contains(id) && !r.body.contains("team-a"),
        "{}",
        r.body
    );

    let missing = get(&h, &format!("/jobs/{}", JobId::new().as_str()), B_SUBMIT).await?;
    assert_eq!(missing.status, 404);
    for path in [
        format!("/jobs/{id}"),
        format!("/jobs/{id}/results"),
        format!("/jobs/{id}/images/0"),
        format!("/jobs/{id}/images/1"),
        format!("/jobs/{id}/edges/0"),
        format!("/jobs/{id}/manifest"),
        format!("/jobs/{id}/events"),
    ] {
        let r = get(&h, &path, B_SUBMIT).await?;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(
            r.body, missing.body,
            "{path} must read exactly like a missing job"
        );
        assert!(!r.body.contains("cube"), "{path}");
    }
    // Not on the multi-job event stream either (silently left out).
    let page = get(&h, "/jobs", B_SUBMIT).await?;
    let csrf = csrf_of(&page.body)?;
    let r = call(
        "POST",
        h.url(&format!("/jobs/{id}/cancel")),
        Cred::Bearer(B_SUBMIT),
        Some(vec![("csrf".into(), csrf)]),
        vec![],
    )
    .await?;
    assert_eq!(r.status, 404);
    assert_eq!(h.queue.get_job(&job).await?.state, before);
    h.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_leads_to_login_and_the_cookie_is_strict() -> Result<()> {
    let h = Harness::start().await?;
    let job = h.submit("team-a", 2).await?;
    let r = call("GET", h.url("/jobs"), Cred::None, None, vec![]).await?;
    assert_eq!((r.status, r.header("location")), (303, "/login"));
    let r = call(
        "GET",
        h.url(&format!("/jobs/{}", job.as_str())),
        Cred::None,
        None,
        vec![],
    )
    .await?;
    assert_eq!((r.status, r.header("location")), (303, "/login"));
    let r = call(
        "GET",
        h.url(&format!("/jobs/{}/images/0", job.as_str())),
        Cred::None,
        None,
        vec![],
    )
    .await?;
    assert_eq!(r.status, 401);
    assert_eq!(get(&h, "/jobs", "not-a-token").await?.status, 303);
    let r = call("GET", h.url("/login"), Cred::None, None, vec![]).await?;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("type=\"password\" name=\"token\""));

    let r = call(
        "POST",
        h.url("/login"),
        Cred::None,
        Some(vec![("token".into(), "wrong".into())]),
        vec![],
    )
    .await?;
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_empty());
    let r = call(
        "POST",
        h.url("/login"),
        Cred::None,
        Some(vec![("token".into(), A_SUBMIT.into())]),
        vec![],
    )
    .await?;
    assert_eq!((r.status, r.header("location")), (303, "/jobs"));
    let cookie = r.header("set-cookie");
    for attr in [
        "pixfarm_token=",
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    let r = call("GET", h.url("/jobs"), Cred::Cookie(A_SUBMIT), None, vec![]).await?;
    assert_eq!(r.status, 200);
    assert!(r.body.contains(job.as_str()));
    h.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_needs_the_role_and_the_csrf_token() -> Result<()> {
    let h = Harness::start().await?;
    let job = h.submit("team-a", 4).await?;
    let path = format!("/jobs/{}/cancel", job.as_str());
    let page = get(&h, &format!("/jobs/{}", job.as_str()), A_SUBMIT).await?;
    assert!(page.body.contains("Cancel job"));
    let csrf = csrf_of(&page.body)?;
    let read_csrf = csrf_of(&get(&h, "/jobs", A_READ).await?.body)?;
    let post = |cred: Cred<'static>, csrf: Option<String>, extra: Vec<(&'static str, String)>| {
        let form = csrf
            .map(|c| vec![("csrf".to_string(), c)])
            .unwrap_or_default();
        call("POST", h.url(&path), cred, Some(form), extra)
    };
    // A read token may not cancel, even with its own valid CSRF token.
    assert_eq!(
        post(Cred::Bearer(A_READ), Some(read_csrf), vec![])
            .await?
            .status,
        403
    );
    // No CSRF token, a wrong one, another user's, or another origin: refused.
    assert_eq!(
        post(Cred::Cookie(A_SUBMIT), None, vec![]).await?.status,
        403
    );
    assert_eq!(
        post(Cred::Cookie(A_SUBMIT), Some("00".repeat(16)), vec![])
            .await?
            .status,
        403
    );
    let b_csrf = csrf_of(&get(&h, "/jobs", B_SUBMIT).await?.body)?;
    assert_eq!(
        post(Cred::Cookie(A_SUBMIT), Some(b_csrf), vec![])
            .await?
            .status,
        403
    );
    let r = post(
        Cred::Cookie(A_SUBMIT),
        Some(csrf.clone()),
        vec![("Origin", "https://evil.example".into())],
    )
    .await?;
    assert_eq!(r.status, 403);
    let r = post(
        Cred::Cookie(A_SUBMIT),
        Some(csrf.clone()),
        vec![("Sec-Fetch-Site", "cross-site".into())],
    )
    .await?;
    assert_eq!(r.status, 403);
    assert_eq!(h.queue.get_job(&job).await?.state, JobState::Queued);

    let origin = format!("http://{}", h.addr);
    let r = post(Cred::Cookie(A_SUBMIT), Some(csrf), vec![("Origin", origin)]).await?;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(h.queue.get_job(&job).await?.state, JobState::Canceled);
    h.stop();
    Ok(())
}

/// Reads server-sent events until `done` says stop (or the deadline passes).
fn read_sse(
    url: String,
    token: &str,
    last_event_id: Option<String>,
    mut done: impl FnMut(&str, &str) -> bool,
) -> Result<Vec<(String, String, String)>> {
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(20))
        .build();
    let mut req = agent
        .get(&url)
        .set("Authorization", &format!("Bearer {token}"));
    if let Some(id) = &last_event_id {
        req = req.set("Last-Event-ID", id);
    }
    let res = req.call()?;
    assert_eq!(res.header("content-type"), Some("text/event-stream"));
    let mut reader = BufReader::new(res.into_reader());
    let (mut ev, mut data, mut id) = (String::new(), String::new(), String::new());
    let mut out = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        let l = line.trim_end_matches(['\r', '\n']).to_string();
        line.clear();
        if l.is_empty() {
            if !ev.is_empty() {
                out.push((ev.clone(), data.clone(), id.clone()));
                if done(&ev, &data) {
                    return Ok(out);
                }
            }
            ev.clear();
            data.clear();
            continue;
        }
        if let Some(v) = l.strip_prefix("event:") {
            ev = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            data = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("id:") {
            id = v.trim().to_string();
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_progress_over_server_sent_events() -> Result<()> {
    let h = Harness::start().await?;
    let job = h.submit("team-a", 3).await?;
    let tasks = h.tasks_of(&job, 3).await?;
    let url = h.url(&format!("/jobs/{}/events", job.as_str()));
    let reader = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            read_sse(url, A_READ, None, |ev, data| {
                ev == "progress" && data.contains("\"succeeded\":2")
            })
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.complete(&tasks[0]).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.complete(&tasks[1]).await?;
    let events = tokio::time::timeout(Duration::from_secs(30), reader).await???;
    assert!(
        events.iter().any(|(e, d, _)| e == "item" && d == "0"),
        "{events:?}"
    );
    let (_, last, id) = events.last().unwrap();
    assert!(last.contains("\"state\":\"running\""), "{last}");
    assert!(!id.is_empty(), "progress events carry the resume id");

    // Resumed from that id: only what came after (the third item).
    let from = id.clone();
    let resumed = tokio::task::spawn_blocking(move || {
        read_sse(url, A_READ, Some(from), |ev, data| {
            ev == "progress" && data.contains("\"succeeded\":3")
        })
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.complete(&tasks[2]).await?;
    let events = tokio::time::timeout(Duration::from_secs(30), resumed).await???;
    let items: Vec<&str> = events
        .iter()
        .filter(|(e, _, _)| e == "item")
        .map(|(_, d, _)| d.as_str())
        .collect();
    assert_eq!(items, ["2"], "{events:?}");
    h.stop();
    Ok(())
}

/// Page load of a 10,000-image job: the job page renders one grid page (not 10,000 cards), and a
/// page deep in the grid is as quick as the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10000_image_job_page_loads_fast() -> Result<()> {
    const N: usize = 10_000;
    let h = Harness::start().await?;
    let t = std::time::Instant::now();
    let job = h.submit("team-a", N).await?;
    let mut tasks = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while tasks.len() < N && std::time::Instant::now() < deadline {
        let pulled = h
            .queue
            .pull(
                "w-web",
                &Lane::all_of(Variant::Base),
                1000,
                Duration::from_millis(100),
            )
            .await?;
        let done: Vec<(Task, TaskResult)> = pulled
            .into_iter()
            .map(|t| {
                let r = TaskResult::succeeded(
                    &t,
                    t.spec.output_key.clone(),
                    "00".into(),
                    "w-web",
                    Timings::default(),
                );
                (t, r)
            })
            .collect();
        h.queue.complete_many(&done).await?;
        tasks.extend(done.into_iter().map(|(t, _)| t.spec.index));
    }
    assert_eq!(tasks.len(), N, "all tasks pulled");
    eprintln!("10,000 results recorded in {} ms", t.elapsed().as_millis());
    let id = job.as_str();
    let mut times = Vec::new();
    for path in [
        "/jobs".to_string(),
        format!("/jobs/{id}"),
        format!("/jobs/{id}/results?page=5000"),
        format!("/jobs/{id}/results?page=9990"),
    ] {
        let t = std::time::Instant::now();
        let r = get(&h, &path, A_READ).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(r.status, 200, "{path}");
        if path == format!("/jobs/{id}") {
            assert!(
                r.body.contains("10000/10000 done"),
                "{}",
                &r.body[..500.min(r.body.len())]
            );
            assert_eq!(r.body.matches("<figure").count(), 48, "one grid page only");
            eprintln!(
                "job page of 10,000 images: {ms:.1} ms, {} KiB",
                r.body.len() / 1024
            );
        } else {
            eprintln!("{path}: {ms:.1} ms, {} KiB", r.body.len() / 1024);
        }
        times.push(ms);
    }
    assert!(times.iter().all(|&ms| ms < 2000.0), "{times:?}");
    h.stop();
    Ok(())
}
