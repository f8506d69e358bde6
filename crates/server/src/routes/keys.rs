//! Operator key management: rotating the vault's key-encryption key.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;

use crate::json::reply;
use crate::problem::Problem;
use crate::routes::query;
use crate::AppState;

#[derive(Serialize, ToSchema)]
pub struct RotationView {
    /// The KEK version now current.
    pub kek_version: u32,
    /// Tenants' data keys re-wrapped under it.
    pub rewrapped: usize,
}

/// Operator: a new key-encryption key, and every data key re-wrapped under it (audited like every
/// operator action). The same as `rtpay keys rotate`.
#[utoipa::path(post, path = "/v1/keys/rotate", tag = "operator",
    responses((status = 200, body = RotationView), (status = 401, body = Problem),
        (status = 500, body = Problem, description = "`rotation_incomplete`: the version was added, some data keys could not be re-wrapped (named); repair them and re-wrap, do not retry"),
        (status = 503, body = Problem)),
    security(("operator" = [])))]
pub async fn rotate_keys(State(state): State<AppState>, _operator: crate::auth::Operator) -> Result<Response, Problem> {
    let vault = state.vault.clone().ok_or_else(|| Problem::unavailable("the vault is not configured", 60))?;
    let result = query(&state, move |q| Ok(vault.rotate(q))).await?;
    match result {
        Ok((kek_version, rewrapped)) => {
            tracing::info!(kek_version, rewrapped, "key-encryption key rotated");
            Ok(reply(StatusCode::OK, &RotationView { kek_version, rewrapped }))
        }
        Err(why) => {
            tracing::warn!(%why, "key rotation failed");
            match why.strip_prefix(crate::vault_service::ROTATION_INCOMPLETE) {
                // Not to be retried: each retry would add a version and fail the same way.
                Some(detail) => Err(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "rotation_incomplete", detail)),
                None => Err(Problem::unavailable(format!("key rotation failed: {why}"), 30)),
            }
        }
    }
}
