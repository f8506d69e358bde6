//! Health, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use crate::json::reply;
use crate::problem::Problem;
use crate::routes::query;
use crate::AppState;

/// Liveness: the process answers.
pub async fn healthz() -> Response {
    reply(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// Readiness: storage answers too.
pub async fn readyz(State(state): State<AppState>) -> Result<Response, Problem> {
    query(&state, |q| q.ping()).await?;
    Ok(reply(StatusCode::OK, &serde_json::json!({"status": "ready"})))
}

/// The token a scraper must present at `/metrics` (`Authorization: Bearer <token>`), when set.
/// Never printed: its `Debug` says only that it is there.
#[derive(Clone)]
pub struct MetricsToken(std::sync::Arc<str>);

/// The shortest token accepted: 32 characters (at least 128 bits from a random generator).
pub const METRICS_TOKEN_LEN_MIN: usize = 32;

impl MetricsToken {
    pub fn new(token: &str) -> Result<MetricsToken, String> {
        if token.len() < METRICS_TOKEN_LEN_MIN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the metrics token must be at least {METRICS_TOKEN_LEN_MIN} visible ASCII characters (e.g. `openssl rand -hex 32`)"
            ));
        }
        Ok(MetricsToken(token.into()))
    }
}

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(..)")
    }
}

pub async fn metrics(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    if let Some(MetricsToken(token)) = &state.metrics_token {
        let (parts, _) = request.into_parts();
        // A wrong token is a failed authentication like any other: counted against the source,
        // which is throttled (429) once over its budget.
        if let Err(p) = crate::auth::guard(&parts, &state, None) {
            return p.into_response();
        }
        // Read as every credential is (`auth::bearer`): two of them are refused (400); a missing
        // or malformed one is answered as a wrong one, with the challenge below.
        let presented = match crate::auth::bearer(&parts) {
            Ok(t) => t,
            Err(p) if p.status == 400 => return crate::auth::failed(&parts, &state, None, p).into_response(),
            Err(_) => "",
        };
        if !crate::auth::constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            crate::auth::count_failure(&parts, &state, None);
            let mut response =
                Problem::unauthorized("`/metrics` needs `Authorization: Bearer <metrics token>`").into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"metrics\""));
            return response;
        }
    }
    let body = state.metrics.render(&state.store.engine.stats);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub async fn openapi() -> Response {
    let doc = crate::ApiDoc::openapi();
    reply(StatusCode::OK, &doc)
}
