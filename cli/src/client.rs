//! Talking to the coordinator: connecting, submitting (unary or streamed),
//! waiting with a progress bar, and turning gRPC statuses into sentences.

use std::time::Duration;

use anyhow::{Context, anyhow};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use pixfarm_proto::v1 as pb;
use pixfarm_proto::v1::farm_client::FarmClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::input::Parsed;

/// The client type every command uses: a channel plus the bearer token.
pub type Client = FarmClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let Some(t) = token else {
            return Ok(Self(None));
        };
        let mut v: MetadataValue<Ascii> = format!("Bearer {t}")
            .parse()
            .map_err(|_| anyhow!("the token must be printable ASCII"))?;
        // Keeps it out of Debug output and HPACK tables.
        v.set_sensitive(true);
        Ok(Self(Some(v)))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// Items above this count go through `SubmitJobStream`.
pub const STREAM_THRESHOLD: usize = 1000;
/// Budget of one streamed chunk, so inline control images never hit the
/// message size limit.
const CHUNK_BYTES: usize = 2 * 1024 * 1024;
const CHUNK_ITEMS: usize = 2000;
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// `host:port` or a URL; plain `host:port` means plaintext `http://`, or
/// `https://` when `tls` (a CA file was given).
pub fn normalize_address(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Connects without a token over plaintext (tests, `pixfarm dev`).
pub async fn connect(addr: &str) -> anyhow::Result<Client> {
    connect_with(&crate::config::ClientConfig::plain(addr)).await
}

/// Connects as `cfg` says: TLS when the address is `https://` or a CA is
/// given, mutual TLS with a client certificate, the token on every call.
pub async fn connect_with(cfg: &crate::config::ClientConfig) -> anyhow::Result<Client> {
    let addr = cfg.address.as_str();
    let tls_wanted = addr.starts_with("https://") || cfg.ca.is_some() || cfg.identity.is_some();
    let url = if tls_wanted && !addr.contains("://") {
        format!("https://{addr}")
    } else {
        normalize_address(addr)
    };
    if tls_wanted && url.starts_with("http://") {
        anyhow::bail!(
            "{url}: a CA file or client certificate was given, so use an https:// address"
        );
    }
    let mut endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("`{addr}` is not a valid coordinator address"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if tls_wanted {
        endpoint = endpoint
            .tls_config(client_tls(cfg)?)
            .with_context(|| format!("cannot set up TLS for {url}"))?;
    } else if cfg.token.is_some() && !is_loopback_url(&url) {
        eprintln!("warning: sending the token over plaintext to {url}; use https:// and a CA file");
    }
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow!(
            "cannot reach the coordinator at {url} ({}); is it running? Set --coordinator or PIXFARM_COORDINATOR",
            error_chain(&e)
        )
    })?;
    Ok(
        FarmClient::with_interceptor(channel, BearerToken::new(cfg.token.as_deref())?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
}

fn client_tls(cfg: &crate::config::ClientConfig) -> anyhow::Result<ClientTlsConfig> {
    pixfarm_coordinator::tls::install_crypto_provider();
    let mut tls = ClientTlsConfig::new();
    match &cfg.ca {
        Some(ca) => {
            let pem = pixfarm_coordinator::tls::read_pem("CA file", ca)?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        None => tls = tls.with_native_roots(),
    }
    if let Some((cert, key)) = &cfg.identity {
        tls = tls.identity(Identity::from_pem(
            pixfarm_coordinator::tls::read_pem("client certificate", cert)?,
            pixfarm_coordinator::tls::read_pem("client key", key)?,
        ));
    }
    if let Some(d) = &cfg.domain {
        tls = tls.domain_name(d.clone());
    }
    Ok(tls)
}

fn is_loopback_url(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or("");
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// A gRPC status as a sentence: `what` says what was attempted ("cannot get
/// job X"). Field violations are listed one per line, translated to input
/// file lines when `input` is known.
pub fn status_error(status: Status, what: &str, input: Option<&Parsed>) -> anyhow::Error {
    let mut msg = match status.code() {
        Code::Unavailable => format!(
            "{what}: the coordinator or its Redis/S3 is unavailable ({})",
            status.message()
        ),
        Code::DeadlineExceeded => format!("{what}: timed out ({})", status.message()),
        Code::Unauthenticated if status.message().contains("PIXFARM_TOKEN") => {
            format!("{what}: not authenticated ({})", status.message())
        }
        Code::Unauthenticated => format!(
            "{what}: not authenticated ({}); set PIXFARM_TOKEN or `token` in ~/.config/pixfarm/config.toml",
            status.message()
        ),
        Code::PermissionDenied => format!("{what}: permission denied ({})", status.message()),
        _ => format!("{what}: {}", status.message()),
    };
    if status.code() == Code::InvalidArgument
        && let Some(br) = status.get_details_bad_request()
    {
        msg = format!("{what}: the request is invalid");
        for v in br.field_violations.iter().take(20) {
            let place = input
                .and_then(|p| item_index(&v.field).and_then(|i| p.locate(i)))
                .map(|l| format!("{l}: "))
                .unwrap_or_default();
            msg.push_str(&format!("\n  {place}{}: {}", v.field, v.description));
        }
        if br.field_violations.len() > 20 {
            msg.push_str(&format!(
                "\n  … and {} more",
                br.field_violations.len() - 20
            ));
        }
    }
    anyhow!(msg)
}

/// `items[37].width` → 37.
pub fn item_index(field: &str) -> Option<usize> {
    let rest = field.strip_prefix("items[")?;
    rest.split(']').next()?.parse().ok()
}

/// Submits a job: unary for small inputs, streamed in chunks for big ones.
/// Submits a job, retrying transient failures (coordinator unreachable, UNAVAILABLE, a timeout)
/// with back-off. Every call carries an idempotency key, the caller's or one made for this
/// invocation, and each retry reuses it, so a submit whose reply was lost never creates a second
/// job: the retry answers with the first.
pub async fn submit(
    client: &mut Client,
    mut spec: pb::JobSpec,
    parsed: &Parsed,
) -> anyhow::Result<pb::SubmitJobResponse> {
    let what = format!("the coordinator rejected {}", parsed.file);
    let generated = spec.idempotency_key.is_empty();
    if generated {
        spec.idempotency_key = format!("cli-{}", uuid::Uuid::new_v4().simple());
    }
    let mut delay = std::time::Duration::from_millis(250);
    let mut tries = 1;
    loop {
        let resp = if parsed.items.len() <= STREAM_THRESHOLD {
            client
                .submit_job(pb::SubmitJobRequest {
                    job: Some(spec.clone()),
                    items: parsed.items.clone(),
                })
                .await
        } else {
            let chunks = chunk_items(spec.clone(), parsed.items.clone());
            client
                .submit_job_stream(futures::stream::iter(chunks))
                .await
        };
        match resp {
            Ok(r) => {
                let mut r = r.into_inner();
                // A retry that found the job its own earlier try made did create it.
                if generated && tries > 1 && !r.created {
                    r.created = true;
                }
                return Ok(r);
            }
            Err(s) if retryable(&s) && tries < SUBMIT_TRIES => {
                eprintln!(
                    "submit: {} ({}); retrying in {} ms with the same idempotency key",
                    s.message(),
                    s.code(),
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
                tries += 1;
            }
            Err(s) => return Err(status_error(s, &what, Some(parsed))),
        }
    }
}

/// Tries of one submit (the first and its retries).
const SUBMIT_TRIES: u32 = 6;

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

/// The header, then items in chunks bounded by count and encoded size.
pub fn chunk_items(spec: pb::JobSpec, items: Vec<pb::Item>) -> Vec<pb::SubmitJobChunk> {
    use pb::submit_job_chunk::Chunk;
    use prost::Message;
    let mut out = vec![pb::SubmitJobChunk {
        chunk: Some(Chunk::Header(spec)),
    }];
    let mut cur = Vec::new();
    let mut bytes = 0;
    for it in items {
        let len = it.encoded_len();
        if !cur.is_empty() && (cur.len() >= CHUNK_ITEMS || bytes + len > CHUNK_BYTES) {
            out.push(pb::SubmitJobChunk {
                chunk: Some(Chunk::Items(pb::ItemChunk {
                    items: std::mem::take(&mut cur),
                })),
            });
            bytes = 0;
        }
        bytes += len;
        cur.push(it);
    }
    if !cur.is_empty() {
        out.push(pb::SubmitJobChunk {
            chunk: Some(Chunk::Items(pb::ItemChunk { items: cur })),
        });
    }
    out
}

pub fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Unspecified => "UNKNOWN",
        pb::JobState::Queued => "QUEUED",
        pb::JobState::Running => "RUNNING",
        pb::JobState::Succeeded => "SUCCEEDED",
        pb::JobState::Partial => "PARTIAL",
        pb::JobState::Failed => "FAILED",
        pb::JobState::Canceled => "CANCELED",
    }
}

/// Follows a job until it finishes, with a progress bar and ETA over its
/// images. The bar's position comes from the job's counts (polled twice a
/// second, so it is right even when the capped event stream was trimmed);
/// the event stream supplies step progress and errors, and ends the wait at
/// `JobFinished`. A broken stream is resumed from the last event id.
/// Returns the final job record.
pub async fn wait(client: &mut Client, job_id: &str, quiet: bool) -> anyhow::Result<pb::Job> {
    let job = get_job(client, job_id).await?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(job.task_count)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut after = String::new();
    let mut failures = 0u32;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    'outer: loop {
        let j = get_job(client, job_id).await?;
        bar.set_position(j.done + j.failed + j.canceled);
        if is_terminal(j.state) {
            break;
        }
        let stream = client
            .watch_job(pb::WatchJobRequest {
                job_id: job_id.to_string(),
                after_event_id: after.clone(),
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::Unavailable && failures < 30 => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(s) => return Err(status_error(s, &format!("cannot watch job {job_id}"), None)),
        };
        let mut poller = client.clone();
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = poll.tick() => {
                    if let Ok(j) = get_job(&mut poller, job_id).await {
                        bar.set_position(j.done + j.failed + j.canceled);
                    }
                    continue;
                }
            };
            let ev = match ev {
                Some(Ok(ev)) => ev,
                // Broken or ended without a finish: reconnect from `after`.
                Some(Err(_)) | None => break,
            };
            failures = 0;
            after = ev.id.clone();
            match ev.kind {
                Some(pb::job_event::Kind::ItemFailed(f)) if !f.will_retry => {
                    bar.set_message(format!("image {} failed: {}", f.index, f.error));
                }
                Some(pb::job_event::Kind::ItemFailed(f)) => {
                    bar.set_message(format!("image {} will be retried: {}", f.index, f.error));
                }
                Some(pb::job_event::Kind::Progress(p)) => {
                    bar.set_message(format!("step {}/{} on {}", p.step, p.total, p.worker));
                }
                Some(pb::job_event::Kind::Finished(_)) => break 'outer,
                _ => {}
            }
        }
    }
    let mut job = get_job(client, job_id).await?;
    bar.set_position(job.done + job.failed + job.canceled);
    // The manifest follows the last image within moments (or a sweep writes it within seconds).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while job.manifest_pending && tokio::time::Instant::now() < deadline {
        bar.set_message("writing the manifest");
        tokio::time::sleep(Duration::from_millis(200)).await;
        job = get_job(client, job_id).await?;
    }
    bar.finish_and_clear();
    Ok(job)
}

pub fn is_terminal(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded
            | pb::JobState::Partial
            | pb::JobState::Failed
            | pb::JobState::Canceled)
    )
}

pub async fn get_job(client: &mut Client, job_id: &str) -> anyhow::Result<pb::Job> {
    client
        .get_job(pb::GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| status_error(s, &format!("cannot get job {job_id}"), None))
}

/// Every result of a job (all pages).
pub async fn all_results(client: &mut Client, job_id: &str) -> anyhow::Result<Vec<pb::Result>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_results(pb::ListResultsRequest {
                job_id: job_id.to_string(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .map_err(|s| {
                status_error(s, &format!("cannot list the results of job {job_id}"), None)
            })?
            .into_inner();
        out.extend(page.results);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_fields() {
        assert_eq!(
            normalize_address("127.0.0.1:50051"),
            "http://127.0.0.1:50051"
        );
        assert_eq!(normalize_address("https://farm:443"), "https://farm:443");
        assert_eq!(item_index("items[37].width"), Some(37));
        assert_eq!(item_index("output_prefix"), None);
    }

    #[test]
    fn chunks_respect_count_and_bytes() {
        let items: Vec<pb::Item> = (0..4500)
            .map(|i| pb::Item {
                prompt: format!("p{i}"),
                ..Default::default()
            })
            .collect();
        let chunks = chunk_items(pb::JobSpec::default(), items);
        assert_eq!(chunks.len(), 1 + 3);
        let big = vec![
            pb::Item {
                prompt: "x".repeat(1_500_000),
                ..Default::default()
            };
            3
        ];
        assert_eq!(chunk_items(pb::JobSpec::default(), big).len(), 1 + 3);
    }
}
