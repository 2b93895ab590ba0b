//! `/login` and `/logout`: the token goes into a `Secure; HttpOnly; SameSite=Strict` cookie,
//! never into a URL or a log line.

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tracing::{info, warn};

use super::{COOKIE, WebError, WebState, check_post, html};

pub(super) fn form_html(message: &str) -> String {
    format!(
        "<h1>Sign in</h1><p>{}</p>\
         <form method=\"post\" action=\"/login\" class=\"login\">\
         <label>Token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" \
         required autofocus></label> <button>Sign in</button></form>",
        html::esc(message)
    )
}

pub(super) async fn show(State(state): State<WebState>, headers: HeaderMap) -> Response {
    if state.caller(&headers).is_ok() && state.inner.auth.is_enabled() {
        return Redirect::to("/jobs").into_response();
    }
    html::page(
        "Sign in",
        None,
        &form_html("Sign in with a pixfarm token (the same one the CLI uses)."),
    )
    .into_response()
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

pub(super) async fn submit(
    State(state): State<WebState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "cross-site")
    {
        return WebError::Forbidden("cross-site request refused".into()).into_response();
    }
    let token = form.token.trim();
    // A cookie value may not hold `;`, `,` or spaces; no valid token does either.
    let plausible = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',' && b != b'"');
    match state
        .inner
        .auth
        .authenticate_token(token)
        .filter(|_| plausible)
    {
        Some(ctx) => {
            info!(token = %ctx.name, tenant = %ctx.tenant, "web: signed in");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/jobs".to_string()),
                    (
                        header::SET_COOKIE,
                        format!("{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict"),
                    ),
                ],
            )
                .into_response()
        }
        None => {
            warn!("web: sign-in with an invalid token");
            (
                StatusCode::UNAUTHORIZED,
                html::page(
                    "Sign in",
                    None,
                    &form_html("That token is not valid (or was revoked)."),
                ),
            )
                .into_response()
        }
    }
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub(super) async fn logout(
    State(state): State<WebState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let caller = match state.caller(&headers) {
        Ok(c) => c,
        Err(e) => return super::page_error(e),
    };
    if let Err(e) = check_post(&caller, &headers, &form.csrf) {
        return e.into_response();
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login".to_string()),
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"),
            ),
        ],
    )
        .into_response()
}
