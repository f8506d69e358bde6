//! Operator routes: tenants and their API keys.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::audit_trail::Audit;
use crate::auth::{new_api_key_secret, new_uuid, Operator};
use crate::dto::*;
use crate::json::{secret_reply, Json, OptionalJson, Path};
use crate::problem::Problem;
use crate::routes::query;
use crate::AppState;

pub const TENANT_NAME_LEN_MAX: usize = 200;

#[utoipa::path(post, path = "/v1/tenants", tag = "operator", request_body = TenantBody,
    responses((status = 201, body = TenantView), (status = 401, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("operator" = [])))]
pub async fn create_tenant(
    State(state): State<AppState>,
    _operator: Operator,
    audit: Audit,
    headers: HeaderMap,
    Json(body): Json<TenantBody>,
) -> Result<Response, Problem> {
    let name = crate::dto::display_name("name", &body.name, TENANT_NAME_LEN_MAX)?;
    let id = match idempotency_key(&headers)? {
        Some(key) => state.keys.derived_id(b"tenant", 0, &key),
        None => new_uuid(),
    };
    let now = store::now_nanos();
    let tenant = store::TenantRecord { id: id.as_u128(), name: name.clone(), created_at: now };
    audit.0.set_resource(uuid_string(tenant.id));
    let key = store::ApiKeyRecord {
        id: new_uuid().as_u128(),
        tenant_id: tenant.id,
        created_at: now,
        revoked_at: None,
        scopes: None,
    };
    let secret = new_api_key_secret(key.id);
    let hash = state.keys.secret_hash(&secret);
    let record = tenant.clone();
    let key_record = key.clone();
    query(&state, move |q| q.create_tenant(&record, &key_record, &hash)).await.map_err(|p| {
        if p.code == "conflict" {
            Problem::new(StatusCode::CONFLICT, "exists", format!("tenant {} was already created under this Idempotency-Key; its API key was shown once. Create a new key with POST /v1/tenants/{{id}}/api-keys", uuid_string(id.as_u128()))).field("Idempotency-Key")
        } else {
            p
        }
    })?;
    tracing::info!(tenant = %uuid_string(tenant.id), "tenant created");
    // The key's secret is shown only with its entry recorded. Unrecorded, the key is revoked
    // (best effort: a crash here leaves a key whose secret no one has seen) and the answer names
    // the tenant, which a retry under the same Idempotency-Key finds made.
    if crate::routes::record_before_answer(&state, &audit, StatusCode::CREATED).await.is_err() {
        let (tenant_id, key_id) = (tenant.id, key.id);
        let _ = query(&state, move |q| q.revoke_api_key(tenant_id, key_id, store::now_nanos())).await;
        state.key_cache.forget_key(key_id);
        return Err(Problem::unavailable(
            format!(
                "tenant {} was created, but its creation could not be recorded in the audit log, so its API key \
                 was revoked unseen; once the log takes entries again, make one with POST /v1/tenants/{{id}}/api-keys",
                uuid_string(tenant.id)
            ),
            2,
        ));
    }
    Ok(secret_reply(
        StatusCode::CREATED,
        &TenantView {
            id: uuid_string(tenant.id),
            name,
            created_at: rfc3339(now),
            api_key: ApiKeyView { id: uuid_string(key.id), secret, scopes: None },
        },
    ))
}

#[utoipa::path(post, path = "/v1/tenants/{id}/api-keys", tag = "operator", request_body(content = Option<ApiKeyBody>,
        description = "optional: without `scopes` the key holds every scope"),
    params(("id" = String, Path, description = "tenant id"),
        ("Idempotency-Key" = Option<String>, Header, description = "a repeat answers 409 instead of creating a second key")),
    responses((status = 201, body = ApiKeyView), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "a key was already made under this Idempotency-Key (its secret was shown once)")),
    security(("operator" = [])))]
pub async fn create_api_key(
    State(state): State<AppState>,
    _operator: Operator,
    audit: Audit,
    headers: HeaderMap,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<ApiKeyBody>,
) -> Result<Response, Problem> {
    let tenant_id = parse_id("id", &id)?;
    audit.0.set_resource(format!("tenant {}", uuid_string(tenant_id)));
    let scopes = match body.and_then(|b| b.scopes) {
        Some(list) => Some(crate::oauth::scope_names(crate::oauth::parse_scopes(&list)?)),
        None => None,
    };
    if query(&state, move |q| q.tenant(tenant_id)).await?.is_none() {
        return Err(Problem::not_found("tenant"));
    }
    let key_id = match idempotency_key(&headers)? {
        Some(key) => state.keys.derived_id(b"api-key", tenant_id, &key),
        None => new_uuid(),
    };
    let key = store::ApiKeyRecord {
        id: key_id.as_u128(),
        tenant_id,
        created_at: store::now_nanos(),
        revoked_at: None,
        scopes: scopes.clone(),
    };
    let secret = new_api_key_secret(key.id);
    audit.0.set_resource(format!("tenant {} key {key_id}", uuid_string(tenant_id)));
    let hash = state.keys.secret_hash(&secret);
    let record = key.clone();
    query(&state, move |q| q.create_api_key(&record, &hash)).await.map_err(|p| {
        if p.code == "conflict" {
            Problem::new(
                StatusCode::CONFLICT,
                "exists",
                "a key was already created under this Idempotency-Key; its secret was shown once",
            )
            .field("Idempotency-Key")
        } else {
            p
        }
    })?;
    // Shown only with its entry recorded; unrecorded, revoked unseen (best effort).
    if crate::routes::record_before_answer(&state, &audit, StatusCode::CREATED).await.is_err() {
        let _ = query(&state, move |q| q.revoke_api_key(tenant_id, key_id.as_u128(), store::now_nanos())).await;
        state.key_cache.forget_key(key_id.as_u128());
        return Err(Problem::unavailable(
            "the key's creation could not be recorded in the audit log, so it was revoked unseen; retry later",
            2,
        ));
    }
    let scopes = scopes.map(|s| s.split(' ').map(str::to_owned).collect());
    Ok(secret_reply(StatusCode::CREATED, &ApiKeyView { id: uuid_string(key.id), secret, scopes }))
}

#[utoipa::path(delete, path = "/v1/tenants/{id}/api-keys/{key_id}", tag = "operator",
    params(("id" = String, Path, description = "tenant id"), ("key_id" = String, Path, description = "API key id")),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem)),
    security(("operator" = [])))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    _operator: Operator,
    audit: Audit,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let tenant_id = parse_id("id", &id)?;
    let key_id = parse_id("key_id", &key_id)?;
    audit.0.set_resource(format!("tenant {} key {}", uuid_string(tenant_id), uuid_string(key_id)));
    let revoked = query(&state, move |q| q.revoke_api_key(tenant_id, key_id, store::now_nanos())).await;
    // Forgotten whatever the answer: a revocation committed whose answer was lost (503), retried
    // and found made (404), stops the key at once on this node all the same.
    state.key_cache.forget_key(key_id);
    if !revoked? {
        return Err(Problem::not_found("live API key of this tenant"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The `Idempotency-Key` header, if any: 1..=255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let text =
        value.to_str().ok().filter(|v| !v.is_empty() && v.len() <= 255 && v.bytes().all(|b| b.is_ascii_graphic()));
    match text {
        Some(v) => Ok(Some(v.to_owned())),
        None => Err(Problem::invalid(
            "Idempotency-Key",
            "invalid_idempotency_key",
            "`Idempotency-Key` must be 1..=255 visible ASCII characters",
        )),
    }
}
