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

pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state.store.engine.stats);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub async fn openapi() -> Response {
    let doc = crate::ApiDoc::openapi();
    reply(StatusCode::OK, &doc)
}
