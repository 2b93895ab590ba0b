//! `/jobs/{id}`: one job: header, cancel, failures, manifest, and a paged, lazy-loaded grid of
//! its results; the images, edge maps and manifest behind it; its live events.

use std::convert::Infallible;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use futures::{Stream, StreamExt};
use pixfarm_core::auth::Action;
use pixfarm_core::{EventKind, JobId, PageRequest, ResultStatus, Storage, TaskResult};
use serde::Deserialize;
use tracing::info;

use super::{WebError, WebState, check_post, html, jobs::progress_json, page_error};
use html::esc;

/// Results per page of the grid (the first is rendered with the page, the rest fetched as the
/// grid scrolls into view).
const GRID_PAGE: usize = 48;
/// Failures listed on the job page itself.
const FAILURES_SHOWN: usize = 20;

pub(super) async fn page(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    render(&state, &headers, &id)
        .await
        .unwrap_or_else(page_error)
}

async fn render(state: &WebState, headers: &HeaderMap, id: &str) -> Result<Response, WebError> {
    let caller = state.require(headers, Action::Read)?;
    let (id, rec) = state.visible_job(&caller.ctx, id).await?;
    let first = state
        .queue()
        .list_results(
            &id,
            &PageRequest {
                size: GRID_PAGE,
                token: None,
            },
        )
        .await?;
    let jid = id.as_str();
    let mut body = format!(
        "<h1>Job <code>{jid}</code></h1><section class=\"job\" data-job=\"{jid}\" \
         data-terminal=\"{}\"><p><span class=\"state {st}\" data-field=\"state\">{st}</span> \
         <span class=\"progress\" data-field=\"progress\">{}</span></p>\
         <dl class=\"meta\"><dt>Tenant</dt><dd>{}</dd><dt>Priority</dt><dd>{:?}</dd>\
         <dt>Labels</dt><dd>{}</dd><dt>Submitted</dt><dd>{}</dd><dt>Images/s</dt>\
         <dd data-field=\"rate\">{}</dd></dl>",
        rec.state.is_terminal(),
        html::progress_bar(&rec.counts),
        esc(&rec.tenant),
        rec.priority,
        html::labels(&rec),
        html::time(rec.created_ms),
        html::throughput(&rec, html::now_ms())
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "–".into()),
        st = html::state(rec.state),
    );
    if rec.manifest_key.is_some() {
        body.push_str(&format!(
            "<p><a class=\"manifest\" href=\"/jobs/{jid}/manifest\" download>Download manifest.jsonl</a></p>"
        ));
    }
    if !rec.state.is_terminal() && caller.ctx.role.allows(Action::Cancel) {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/jobs/{jid}/cancel\" class=\"cancel\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Cancel job</button></form>",
            esc(&caller.csrf)
        ));
    }
    if let Some(e) = &rec.last_error {
        body.push_str(&format!("<p class=\"error\">Last error: {}</p>", esc(e)));
    }
    body.push_str("</section>");
    if rec.counts.failed > 0 {
        let failed: Vec<TaskResult> = state
            .queue()
            .all_results(&id)
            .await?
            .into_iter()
            .filter(|r| r.status == ResultStatus::Failed)
            .take(FAILURES_SHOWN)
            .collect();
        body.push_str("<h2>Failed items</h2><ul class=\"failures\">");
        for r in &failed {
            body.push_str(&format!(
                "<li>#{} <span class=\"prompt\">{}</span>: <span class=\"error\">{}</span></li>",
                r.index,
                esc(&r.prompt),
                esc(r.error.as_deref().unwrap_or("failed"))
            ));
        }
        body.push_str("</ul>");
    }
    body.push_str(&format!(
        "<h2>Results</h2><div class=\"grid\" id=\"grid\" data-job=\"{jid}\">"
    ));
    for r in &first.items {
        body.push_str(&card(&id, r));
    }
    body.push_str("</div>");
    match &first.next_token {
        Some(next) => body.push_str(&format!(
            "<p id=\"more\" data-next=\"/jobs/{jid}/results?page={}\"><a href=\"/jobs/{jid}/results?page={}\">More results</a></p>",
            html::url_enc(next),
            html::url_enc(next)
        )),
        None if first.items.is_empty() => {
            body.push_str("<p class=\"empty\" id=\"no-results\">No results yet.</p>")
        }
        None => {}
    }
    let who = html::Who {
        name: &caller.ctx.name,
        tenant: &caller.ctx.tenant,
        role: caller.ctx.role.as_str(),
        csrf: &caller.csrf,
    };
    Ok(html::page(&format!("Job {}", &jid[..8]), Some(&who), &body).into_response())
}

/// One result of the grid: image (or error), prompt, parameters; worker and timings on click.
fn card(job: &JobId, r: &TaskResult) -> String {
    let jid = job.as_str();
    let n = r.index;
    let p = &r.parameters;
    let control = match &p.control {
        Some(c) => format!(
            "<dt>Control</dt><dd>{} × {:.2}</dd>",
            esc(&format!("{:?}", c.kind).to_lowercase()),
            c.scale
        ),
        None => String::new(),
    };
    let edge = if p.control_key.is_some() {
        format!(
            "<img class=\"edge\" loading=\"lazy\" src=\"/jobs/{jid}/edges/{n}\" alt=\"edge map of #{n}\">"
        )
    } else {
        String::new()
    };
    let picture = match r.status {
        ResultStatus::Succeeded => format!(
            "<a href=\"/jobs/{jid}/images/{n}\"><img loading=\"lazy\" src=\"/jobs/{jid}/images/{n}\" \
             width=\"{}\" height=\"{}\" alt=\"{}\"></a>{edge}",
            p.width,
            p.height,
            esc(&r.prompt)
        ),
        ResultStatus::Failed => format!(
            "<div class=\"error\">failed: {}</div>",
            esc(r.error.as_deref().unwrap_or("unknown error"))
        ),
    };
    let t = &r.timings;
    format!(
        "<figure class=\"card {}\" data-index=\"{n}\"><div class=\"pics\">{picture}</div><figcaption>\
         <p class=\"prompt\">{}</p><dl><dt>#</dt><dd>{n}</dd><dt>Seed</dt><dd>{}</dd><dt>Size</dt>\
         <dd>{}×{}</dd><dt>Steps</dt><dd>{}</dd>{control}</dl><details><summary>worker, timings</summary>\
         <dl><dt>Worker</dt><dd>{}</dd><dt>Queue</dt><dd>{:.0} ms</dd><dt>Render</dt><dd>{:.0} ms</dd>\
         <dt>Encode</dt><dd>{:.0} ms</dd><dt>Attempts</dt><dd>{}</dd></dl></details></figcaption></figure>",
        if r.status == ResultStatus::Failed {
            "failed"
        } else {
            "ok"
        },
        esc(&r.prompt),
        r.seed,
        p.width,
        p.height,
        p.steps,
        esc(&r.worker),
        t.queue_ms,
        t.render_ms,
        t.encode_ms,
        r.attempts,
    )
}

#[derive(Deserialize)]
pub(super) struct ResultsQuery {
    #[serde(default)]
    page: String,
    #[serde(default)]
    size: Option<usize>,
}

/// A page of grid cards as an HTML fragment; the next page's URL is in `x-next-page`.
pub(super) async fn results(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Result<Response, WebError> {
    let caller = state.require(&headers, Action::Read)?;
    let (id, _) = state.visible_job(&caller.ctx, &id).await?;
    let page = state
        .queue()
        .list_results(
            &id,
            &PageRequest {
                size: q.size.unwrap_or(GRID_PAGE).clamp(1, 200),
                token: (!q.page.is_empty()).then(|| q.page.clone()),
            },
        )
        .await?;
    let mut body = String::new();
    for r in &page.items {
        body.push_str(&card(&id, r));
    }
    let mut res = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    if let Some(next) = page.next_token
        && let Ok(v) = HeaderValue::from_str(&format!(
            "/jobs/{}/results?page={}",
            id.as_str(),
            html::url_enc(&next)
        ))
    {
        res.headers_mut().insert("x-next-page", v);
    }
    Ok(res)
}

/// Server-sent events of one job: `progress` (counts, coalesced per burst) and `item` (the index
/// of a newly recorded image, for the grid). Resumable: each event carries the job event id, and
/// a reconnecting browser sends it back as `Last-Event-ID`.
pub(super) async fn events(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, WebError> {
    let caller = state.require(&headers, Action::Read)?;
    let (id, _) = state.visible_job(&caller.ctx, &id).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.bytes().all(|b| b.is_ascii_digit() || b == b'-') && !v.is_empty())
        .map(str::to_string);
    let queue = state.queue().clone();
    let job = id.clone();
    // Boxed: the watch stream owns everything it needs ('static) but its type names `queue`.
    let events = queue
        .watch(id, after)
        .boxed()
        .ready_chunks(512)
        .then(move |batch| {
            let queue = queue.clone();
            let job = job.clone();
            async move {
                let mut out = Vec::new();
                let mut last = None;
                for e in batch.into_iter().flatten() {
                    if let EventKind::ItemDone { index, .. }
                    | EventKind::ItemFailed {
                        index,
                        will_retry: false,
                        ..
                    } = e.kind
                    {
                        out.push(Ok(SseEvent::default()
                            .event("item")
                            .data(index.to_string())));
                    }
                    last = Some(e.id);
                }
                if let Ok(rec) = queue.get_job(&job).await {
                    let mut ev = SseEvent::default()
                        .event("progress")
                        .data(progress_json(&rec));
                    if let Some(id) = last {
                        ev = ev.id(id);
                    }
                    out.push(Ok(ev));
                }
                futures::stream::iter(out)
            }
        })
        .flatten();
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// The recorded result `index` of a job the caller may see.
async fn result_of(
    state: &WebState,
    headers: &HeaderMap,
    id: &str,
    index: &str,
) -> Result<TaskResult, WebError> {
    let caller = state.require(headers, Action::Read)?;
    let (id, rec) = state.visible_job(&caller.ctx, id).await?;
    let index: u64 = index.parse().map_err(|_| WebError::NotFound)?;
    if index >= rec.counts.total {
        return Err(WebError::NotFound);
    }
    let page = state
        .queue()
        .list_results(
            &id,
            &PageRequest {
                size: 1,
                token: Some(index.to_string()),
            },
        )
        .await?;
    page.items
        .into_iter()
        .find(|r| r.index == index)
        .ok_or(WebError::NotFound)
}

/// An object of the store, after the caller's tenant was checked: a redirect to a presigned URL
/// (S3, short-lived) or the bytes themselves (`file://` store).
async fn object(
    state: &WebState,
    key: &str,
    content_type: &'static str,
) -> Result<Response, WebError> {
    match state.storage() {
        Storage::S3(_) => {
            let url = state.storage().presign_get(key).await?;
            let mut res = Redirect::to(&url).into_response();
            res.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=60"),
            );
            Ok(res)
        }
        Storage::File(_) => {
            let bytes = state.storage().get(key).await?;
            Ok((
                [
                    (header::CONTENT_TYPE, content_type),
                    (header::CACHE_CONTROL, "private, max-age=3600"),
                ],
                bytes,
            )
                .into_response())
        }
    }
}

pub(super) async fn image(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, WebError> {
    let r = result_of(&state, &headers, &id, &index).await?;
    let key = r.key.ok_or(WebError::NotFound)?;
    object(&state, &key, "image/png").await
}

pub(super) async fn edge_map(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, WebError> {
    let r = result_of(&state, &headers, &id, &index).await?;
    let key = r.parameters.control_key.ok_or(WebError::NotFound)?;
    object(&state, &key, "image/png").await
}

pub(super) async fn manifest(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let caller = state.require(&headers, Action::Read)?;
    let (id, rec) = state.visible_job(&caller.ctx, &id).await?;
    let key = rec.manifest_key.ok_or(WebError::NotFound)?;
    let bytes = state.storage().get(&key).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}-manifest.jsonl\"", id.as_str()),
            ),
        ],
        bytes,
    )
        .into_response())
}

#[derive(Deserialize)]
pub(super) struct CancelForm {
    #[serde(default)]
    csrf: String,
}

pub(super) async fn cancel(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CancelForm>,
) -> Response {
    let run = async {
        let caller = state.require(&headers, Action::Cancel)?;
        check_post(&caller, &headers, &form.csrf)?;
        let (id, _) = state.visible_job(&caller.ctx, &id).await?;
        state.queue().cancel_job(&id).await?;
        info!(job = %id, token = %caller.ctx.name, "job canceled from the web gallery");
        Ok::<_, WebError>(
            (
                StatusCode::SEE_OTHER,
                [(header::LOCATION, format!("/jobs/{}", id.as_str()))],
            )
                .into_response(),
        )
    };
    run.await.unwrap_or_else(page_error)
}
