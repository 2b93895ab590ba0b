//! The web gallery: server-rendered pages over the same [`Queue`] and [`Storage`] calls as the
//! gRPC service, behind the same bearer tokens, roles and tenant scoping.
//!
//! - `/jobs` (newest first, filter by state and label, live progress over server-sent events),
//!   `/jobs/{id}` (lazy-loaded, paged thumbnail grid, failures, manifest, cancel),
//!   `/workers`, `/login`.
//! - Who is calling: `Authorization: Bearer <token>`, or the token the login form stored in a
//!   `Secure; HttpOnly; SameSite=Strict` cookie. Never in a URL, never logged.
//! - Another tenant's job (or image) answers exactly like a job that does not exist (404).
//! - State-changing requests (cancel, logout) are POSTs with a CSRF token derived from the
//!   caller's token, and are refused from another origin.
//! - Every response carries a Content-Security-Policy without inline script or style; every
//!   piece of user input (prompts, labels, errors) is HTML-escaped.
//! - Images: a tenant-checked redirect to a presigned URL (S3), or a tenant-checked streamed
//!   proxy (`file://` store).
//!
//! Assets are embedded (`include_str!`); there is no build step.

mod html;
mod job;
mod jobs;
mod login;
mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use pixfarm_core::auth::Action;
use pixfarm_core::{CoreError, JobId, JobRecord, Queue, Storage};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::auth::{AuthContext, Authenticator};

/// Name of the cookie that holds the bearer token.
pub const COOKIE: &str = "pixfarm_token";

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct WebState {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Queue,
    storage: Storage,
    auth: Authenticator,
    csp: HeaderValue,
    /// Mixed into CSRF tokens. Random per process without authentication (every caller has the
    /// same empty token then); empty with tokens, so replicas behind a load balancer agree.
    csrf_secret: [u8; 32],
}

impl WebState {
    /// The gallery over an open queue and store.
    pub async fn new(queue: Queue, storage: Storage, auth: Authenticator) -> Self {
        // Images of an S3 store are presigned URLs on the S3 endpoint: allow that origin only.
        let img_origin = match &storage {
            Storage::S3(_) => storage
                .presign_get("probe")
                .await
                .ok()
                .and_then(|u| origin_of(&u)),
            Storage::File(_) => None,
        };
        let csp = format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'{}; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            img_origin.map(|o| format!(" {o}")).unwrap_or_default()
        );
        let csrf_secret = if auth.is_enabled() {
            [0; 32]
        } else {
            Sha256::digest(uuid::Uuid::new_v4().as_bytes()).into()
        };
        Self {
            inner: Arc::new(Inner {
                queue,
                storage,
                auth,
                csp: HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'",
                )),
                csrf_secret,
            }),
        }
    }

    fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// The caller's bearer token: the `Authorization` header, else the cookie.
    fn bearer(headers: &HeaderMap) -> Option<String> {
        if let Some(v) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            let (scheme, rest) = v.trim().split_once(' ')?;
            return scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string());
        }
        cookie(headers, COOKIE)
    }

    /// Who is calling, with the CSRF token that goes with their credentials.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, WebError> {
        let token = Self::bearer(headers).unwrap_or_default();
        if self.inner.auth.is_enabled() && token.is_empty() {
            return Err(WebError::Unauthenticated);
        }
        let ctx = self
            .inner
            .auth
            .authenticate_token(&token)
            .ok_or(WebError::Unauthenticated)?;
        let csrf = self.csrf_for(&token);
        Ok(Caller { ctx, csrf })
    }

    fn csrf_for(&self, token: &str) -> String {
        let mut h = Sha256::new();
        h.update(b"pixfarm-web-csrf\0");
        h.update(self.inner.csrf_secret);
        h.update(b"\0");
        h.update(token.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// The caller, who must be allowed `action`.
    fn require(&self, headers: &HeaderMap, action: Action) -> Result<Caller, WebError> {
        let caller = self.caller(headers)?;
        if !caller.ctx.role.allows(action) {
            warn!(token = %caller.ctx.name, role = %caller.ctx.role, action = action.as_str(), "web: permission denied");
            return Err(WebError::Forbidden(format!(
                "the token `{}` has the role `{}`, which may not {}",
                caller.ctx.name,
                caller.ctx.role,
                action.as_str()
            )));
        }
        Ok(caller)
    }

    /// The job `id` if the caller may see it; another tenant's job is [`WebError::NotFound`],
    /// exactly like one that does not exist.
    async fn visible_job(
        &self,
        ctx: &AuthContext,
        id: &str,
    ) -> Result<(JobId, JobRecord), WebError> {
        let id = JobId::parse(id).ok_or(WebError::NotFound)?;
        let rec = match self.queue().get_job(&id).await {
            Ok(r) => r,
            Err(CoreError::NotFound { .. }) => return Err(WebError::NotFound),
            Err(e) => return Err(e.into()),
        };
        if !ctx.sees(&rec.tenant) {
            warn!(token = %ctx.name, tenant = %ctx.tenant, job = %id, "web: job of another tenant requested");
            return Err(WebError::NotFound);
        }
        Ok((id, rec))
    }
}

/// An authenticated caller of a page.
pub(crate) struct Caller {
    ctx: AuthContext,
    /// The CSRF token forms must echo.
    csrf: String,
}

/// Refuses a state-changing request that comes from another site or lacks the caller's CSRF
/// token.
fn check_post(caller: &Caller, headers: &HeaderMap, csrf: &str) -> Result<(), WebError> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site == "cross-site"
    {
        return Err(WebError::Forbidden("cross-site request refused".into()));
    }
    if let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) && origin_of(origin).and_then(|o| o.split_once("://").map(|(_, h)| h.to_string()))
        != Some(host.to_string())
    {
        return Err(WebError::Forbidden(
            "request from another origin refused".into(),
        ));
    }
    if csrf.is_empty() || csrf != caller.csrf {
        return Err(WebError::Forbidden("missing or wrong CSRF token".into()));
    }
    Ok(())
}

/// `scheme://host[:port]` of a URL.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

/// The value of cookie `name`.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Why a request failed, rendered as a small page.
#[derive(Debug)]
pub(crate) enum WebError {
    /// No or unknown token: pages redirect to the login form, other resources answer 401.
    Unauthenticated,
    Forbidden(String),
    /// Missing, or another tenant's: one answer for both.
    NotFound,
    BadRequest(String),
    Conflict(String),
    Unavailable(String),
}

impl From<CoreError> for WebError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotFound { .. } => WebError::NotFound,
            CoreError::Invalid(v) => WebError::BadRequest(
                v.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            CoreError::Conflict(m) => WebError::Conflict(m),
            other => {
                tracing::error!(error = %other, "web: backend error");
                WebError::Unavailable("the queue or the store is unavailable; try again".into())
            }
        }
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, title, detail) = match self {
            WebError::Unauthenticated => {
                return (
                    StatusCode::UNAUTHORIZED,
                    html::page(
                        "Sign in",
                        None,
                        &login::form_html("Sign in with a pixfarm token."),
                    ),
                )
                    .into_response();
            }
            WebError::Forbidden(m) => (StatusCode::FORBIDDEN, "Forbidden", m),
            WebError::NotFound => (
                StatusCode::NOT_FOUND,
                "Not found",
                "no such job or image".to_string(),
            ),
            WebError::BadRequest(m) => (StatusCode::BAD_REQUEST, "Bad request", m),
            WebError::Conflict(m) => (StatusCode::CONFLICT, "Conflict", m),
            WebError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable", m),
        };
        let body = format!(
            "<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/jobs\">Jobs</a></p>",
            html::esc(title),
            html::esc(&detail)
        );
        (status, html::page(title, None, &body)).into_response()
    }
}

/// A page handler's error: unauthenticated callers go to the login form.
pub(crate) fn page_error(e: WebError) -> Response {
    match e {
        WebError::Unauthenticated => Redirect::to("/login").into_response(),
        e => e.into_response(),
    }
}

async fn security_headers(
    axum::extract::State(state): axum::extract::State<WebState>,
    mut res: Response,
) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, state.inner.csp.clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

async fn asset_css() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/app.css"))
}

async fn asset_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The gallery's routes.
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/jobs") }))
        .route("/login", get(login::show).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/jobs", get(jobs::page))
        .route("/jobs/events", get(jobs::events))
        .route("/jobs/{id}", get(job::page))
        .route("/jobs/{id}/results", get(job::results))
        .route("/jobs/{id}/events", get(job::events))
        .route("/jobs/{id}/images/{index}", get(job::image))
        .route("/jobs/{id}/edges/{index}", get(job::edge_map))
        .route("/jobs/{id}/manifest", get(job::manifest))
        .route("/jobs/{id}/cancel", post(job::cancel))
        .route("/workers", get(workers::page))
        .route("/assets/app.css", get(asset_css))
        .route("/assets/app.js", get(asset_js))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            security_headers,
        ))
        .with_state(state)
}

/// A running gallery: its address, and the task serving it (dropped: it keeps running until the
/// shutdown future passed to [`start`] completes).
pub struct WebServer {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves the gallery on `listener` until `shutdown` completes.
pub fn start(
    listener: TcpListener,
    state: WebState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<WebServer> {
    let addr = listener.local_addr()?;
    info!(url = %format!("http://{addr}/"), "web gallery listening");
    let app = router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok(WebServer { addr, task })
}
