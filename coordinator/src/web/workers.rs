//! `/workers`: the `ListWorkers` view (roles that may list workers).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use pixfarm_core::auth::Action;

use super::{WebError, WebState, html, page_error};
use html::esc;

pub(super) async fn page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    render(&state, &headers).await.unwrap_or_else(page_error)
}

async fn render(state: &WebState, headers: &HeaderMap) -> Result<Response, WebError> {
    let caller = state.require(headers, Action::ListWorkers)?;
    let mut workers = state.queue().list_workers().await?;
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    let now = html::now_ms();
    let mut body = format!("<h1>Workers</h1><p>{} live.</p>", workers.len());
    if !workers.is_empty() {
        body.push_str(
            "<table class=\"workers\"><thead><tr><th>Worker</th><th>Host</th><th>Device</th>\
             <th>Model</th><th>State</th><th>Lanes</th><th>Batch</th><th>Images/s</th>\
             <th>Images</th><th>Last heartbeat</th></tr></thead><tbody>",
        );
        for w in &workers {
            let lanes = w
                .lanes
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            body.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{:.2}</td><td>{}</td><td>{:.1} s ago</td></tr>",
                esc(&w.id),
                esc(&w.host),
                esc(&w.device),
                esc(&w.model),
                esc(&format!("{:?}", w.state).to_lowercase()),
                esc(&lanes),
                w.current_batch,
                w.images_per_sec,
                w.images_done,
                now.saturating_sub(w.last_heartbeat_ms) as f64 / 1000.0,
            ));
        }
        body.push_str("</tbody></table>");
    }
    let who = html::Who {
        name: &caller.ctx.name,
        tenant: &caller.ctx.tenant,
        role: caller.ctx.role.as_str(),
        csrf: &caller.csrf,
    };
    Ok(html::page("Workers", Some(&who), &body).into_response())
}
