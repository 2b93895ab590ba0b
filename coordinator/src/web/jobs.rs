//! `/jobs`: the caller's jobs, newest first, with live progress (`/jobs/events`).

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use pixfarm_core::auth::{Action, Role};
use pixfarm_core::{JobFilter, JobRecord, JobState, PageRequest};
use serde::Deserialize;

use super::{WebError, WebState, html, page_error};
use html::esc;

const PAGE_SIZE: usize = 50;

#[derive(Deserialize, Default)]
pub(super) struct JobsQuery {
    #[serde(default)]
    state: String,
    /// `key=value`.
    #[serde(default)]
    label: String,
    /// The previous page's `next_token`.
    #[serde(default)]
    page: String,
}

pub(super) async fn page(
    State(state): State<WebState>,
    headers: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Response {
    render(&state, &headers, q).await.unwrap_or_else(page_error)
}

async fn render(state: &WebState, headers: &HeaderMap, q: JobsQuery) -> Result<Response, WebError> {
    let caller = state.require(headers, Action::Read)?;
    let ctx = &caller.ctx;
    let states: Vec<JobState> = match q.state.as_str() {
        "" => Vec::new(),
        s => vec![
            s.parse()
                .map_err(|_| WebError::BadRequest(format!("state: `{s}` is not a job state")))?,
        ],
    };
    let mut labels = BTreeMap::new();
    if !q.label.is_empty() {
        let (k, v) = q
            .label
            .split_once('=')
            .ok_or_else(|| WebError::BadRequest("label: expected key=value".into()))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let filter = JobFilter {
        tenant: (ctx.role != Role::Admin).then(|| ctx.tenant.clone()),
        states,
        labels,
    };
    let page = state
        .queue()
        .list_jobs(
            &filter,
            &PageRequest {
                size: PAGE_SIZE,
                token: (!q.page.is_empty()).then(|| q.page.clone()),
            },
        )
        .await?;
    let now = html::now_ms();
    let mut body = String::from("<h1>Jobs</h1>");
    body.push_str(&filter_form(&q));
    if page.items.is_empty() {
        body.push_str("<p class=\"empty\">No jobs.</p>");
    } else {
        body.push_str(
            "<table class=\"jobs\"><thead><tr><th>Job</th><th>State</th><th>Progress</th>\
             <th>Tenant</th><th>Labels</th><th>Submitted</th><th>Images/s</th></tr></thead><tbody>",
        );
        for rec in &page.items {
            body.push_str(&row(rec, now));
        }
        body.push_str("</tbody></table>");
    }
    if let Some(next) = &page.next_token {
        body.push_str(&format!(
            "<p><a class=\"next\" href=\"/jobs?state={}&amp;label={}&amp;page={}\">Older jobs →</a></p>",
            html::url_enc(&q.state),
            html::url_enc(&q.label),
            html::url_enc(next)
        ));
    }
    let live: Vec<&str> = page
        .items
        .iter()
        .filter(|r| !r.state.is_terminal())
        .map(|r| r.id.as_str())
        .collect();
    if !live.is_empty() {
        // app.js opens one event stream for every job still running on this page.
        body.push_str(&format!(
            "<div id=\"live\" data-src=\"/jobs/events?ids={}\" hidden></div>",
            live.join(",")
        ));
    }
    let who = html::Who {
        name: &ctx.name,
        tenant: &ctx.tenant,
        role: ctx.role.as_str(),
        csrf: &caller.csrf,
    };
    Ok(html::page("Jobs", Some(&who), &body).into_response())
}

fn filter_form(q: &JobsQuery) -> String {
    let mut opts = String::from("<option value=\"\">any state</option>");
    for s in JobState::ALL {
        let name = html::state(s);
        opts.push_str(&format!(
            "<option value=\"{name}\"{}>{name}</option>",
            if q.state.eq_ignore_ascii_case(&name) {
                " selected"
            } else {
                ""
            }
        ));
    }
    format!(
        "<form method=\"get\" action=\"/jobs\" class=\"filter\"><select name=\"state\">{opts}</select> \
         <input name=\"label\" placeholder=\"label key=value\" value=\"{}\"> <button>Filter</button></form>",
        esc(&q.label)
    )
}

fn row(rec: &JobRecord, now: u64) -> String {
    let id = rec.id.as_str();
    format!(
        "<tr id=\"job-{id}\" data-job=\"{id}\"><td><a href=\"/jobs/{id}\"><code>{}</code></a></td>\
         <td><span class=\"state {st}\" data-field=\"state\">{st}</span></td>\
         <td class=\"progress\" data-field=\"progress\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td data-field=\"rate\">{}</td></tr>",
        &id[..8.min(id.len())],
        html::progress_bar(&rec.counts),
        esc(&rec.tenant),
        html::labels(rec),
        html::time(rec.created_ms),
        html::throughput(rec, now)
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "–".into()),
        st = html::state(rec.state),
    )
}

/// The JSON a progress event carries (app.js redraws the row or header from it).
pub(super) fn progress_json(rec: &JobRecord) -> String {
    serde_json::json!({
        "job": rec.id.as_str(),
        "state": html::state(rec.state),
        "total": rec.counts.total,
        "succeeded": rec.counts.succeeded,
        "failed": rec.counts.failed,
        "canceled": rec.counts.canceled,
        "rate": html::throughput(rec, html::now_ms()),
        "bar": html::progress_bar(&rec.counts),
    })
    .to_string()
}

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    #[serde(default)]
    ids: String,
}

/// Server-sent `progress` events for the running jobs of a jobs page (at most 100, only those
/// the caller may see; others are silently left out), coalesced: one event per job per burst of
/// job events.
pub(super) async fn events(
    State(state): State<WebState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, WebError> {
    let caller = state.require(&headers, Action::Read)?;
    let mut streams = Vec::new();
    for id in q.ids.split(',').filter(|s| !s.is_empty()).take(100) {
        let Ok((id, _)) = state.visible_job(&caller.ctx, id).await else {
            continue;
        };
        let job = id.clone();
        streams.push(
            state
                .queue()
                .watch(id, None)
                .map(move |_| job.clone())
                .boxed(),
        );
    }
    let queue = state.queue().clone();
    let events = futures::stream::select_all(streams)
        .ready_chunks(512)
        .then(move |jobs| {
            let queue = queue.clone();
            async move {
                let mut distinct = jobs;
                distinct.sort();
                distinct.dedup();
                let mut out = Vec::new();
                for job in distinct {
                    if let Ok(rec) = queue.get_job(&job).await {
                        out.push(Ok(SseEvent::default()
                            .event("progress")
                            .data(progress_json(&rec))));
                    }
                }
                futures::stream::iter(out)
            }
        })
        .flatten();
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
