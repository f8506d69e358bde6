//! OAuth2 client credentials (RFC 6749 §4.4): tenants create clients with scopes; a client trades
//! its id and secret at `POST /oauth/token` for a short-lived access token bound to its tenant and
//! the granted scopes. Tokens are stateless: the payload and an HMAC-SHA256 under the server's key
//! (the same on every node), so any node checks them without storage.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{constant_time_eq, count_failure, guard, hex, new_secret, new_uuid, unhex, Tenant, ALL_SCOPES};
use crate::dto::{rfc3339, uuid_string};
use crate::json::{secret_reply, Json};
use crate::problem::Problem;
use crate::routes::query;
use crate::AppState;

/// How long an access token is good for.
pub const ACCESS_TOKEN_TTL_SECONDS: u64 = 300;
pub const ACCESS_TOKEN_PREFIX: &str = "rtpay_at_";
pub const CLIENT_SECRET_PREFIX: &str = "rtpay_cs_";
/// The token endpoint reads at most this much.
pub const TOKEN_REQUEST_LEN_MAX: usize = 4096;

/// Every scope a client may hold: the API Pix's (from its OpenAPI document) and rtpay's own. The
/// position is the scope's bit in a token.
pub const SCOPES: &[&str] = &[
    "cob.write",
    "cob.read",
    "cobr.write",
    "cobr.read",
    "rec.write",
    "rec.read",
    "solicrec.write",
    "solicrec.read",
    "cobv.write",
    "cobv.read",
    "lotecobv.write",
    "lotecobv.read",
    "pix.write",
    "pix.read",
    "webhook.read",
    "webhook.write",
    "webhookrec.read",
    "webhookrec.write",
    "webhookcobr.read",
    "webhookcobr.write",
    "payloadlocation.write",
    "payloadlocation.read",
    "payloadlocationrec.write",
    "payloadlocationrec.read",
    "accounts:write",
    "accounts:read",
    "transfers:write",
    "transfers:read",
    "holders:write",
    "holders:read",
    "audit:read",
    "cards:write",
    "cards:read",
    "cards:reveal",
    "pix:write",
    "pix:read",
];

pub fn scope_bit(scope: &str) -> Option<u64> {
    SCOPES.iter().position(|s| *s == scope).map(|i| 1u64 << i)
}

/// A request's list of scopes as bits: at least one, each known (422 naming the entry otherwise).
pub fn parse_scopes(scopes: &[String]) -> Result<u64, Problem> {
    if scopes.is_empty() {
        return Err(Problem::invalid("scopes", "invalid_scopes", "`scopes` must name at least one scope"));
    }
    let mut bits = 0;
    for (i, scope) in scopes.iter().enumerate() {
        bits |= scope_bit(scope).ok_or_else(|| {
            Problem::invalid(
                format!("scopes[{i}]"),
                "unknown_scope",
                format!("unknown scope `{scope}`; see docs/API.md"),
            )
        })?;
    }
    Ok(bits)
}

pub fn scope_names(bits: u64) -> String {
    SCOPES.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, s)| *s).collect::<Vec<_>>().join(" ")
}

/// The claims of an access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    pub client_id: u128,
    pub tenant_id: u128,
    pub expires_at: u64,
    pub scopes: u64,
}

const TOKEN_FORMAT: u8 = 1;

impl Claims {
    fn payload(&self) -> Vec<u8> {
        let mut out = vec![TOKEN_FORMAT];
        out.extend_from_slice(&self.client_id.to_be_bytes());
        out.extend_from_slice(&self.tenant_id.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.scopes.to_be_bytes());
        out
    }

    pub fn token(&self, state: &AppState) -> String {
        let payload = self.payload();
        let mac = state.keys.mac(b"oauth-access-token", &payload);
        format!("{ACCESS_TOKEN_PREFIX}{}.{}", hex(&payload), hex(&mac))
    }

    /// Checks a token's MAC and expiry; the reason is for the 401's detail.
    pub fn verify(state: &AppState, token: &str, now: u64) -> Result<Claims, &'static str> {
        let body = token.strip_prefix(ACCESS_TOKEN_PREFIX).ok_or("not an access token")?;
        let (payload, mac) = body.split_once('.').ok_or("malformed access token")?;
        let (payload, mac) =
            (unhex(payload).ok_or("malformed access token")?, unhex(mac).ok_or("malformed access token")?);
        let expected = state.keys.mac(b"oauth-access-token", &payload);
        let mac: [u8; 32] = mac.try_into().map_err(|_| "the access token is not valid")?;
        if !constant_time_eq(&mac, &expected) {
            return Err("the access token is not valid");
        }
        if payload.len() != 49 || payload[0] != TOKEN_FORMAT {
            return Err("malformed access token");
        }
        let u128_at = |i: usize| u128::from_be_bytes(payload[i..i + 16].try_into().expect("16 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(payload[i..i + 8].try_into().expect("8 bytes"));
        let claims =
            Claims { client_id: u128_at(1), tenant_id: u128_at(17), expires_at: u64_at(33), scopes: u64_at(41) };
        if claims.expires_at <= now {
            return Err("the access token expired");
        }
        Ok(claims)
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuthClientBody {
    /// Scopes the client may request: at least one.
    #[schema(min_items = 1)]
    pub scopes: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct OAuthClientView {
    pub client_id: String,
    /// Shown once.
    pub client_secret: String,
    pub scopes: Vec<String>,
    pub created_at: String,
}

#[utoipa::path(post, path = "/v1/oauth-clients", tag = "oauth", request_body = OAuthClientBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "a repeat answers 409 instead of creating a second client")),
    responses((status = 201, body = OAuthClientView), (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 409, body = Problem, description = "a client was already made under this Idempotency-Key (its secret was shown once)")),
    security(("api_key" = [])))]
pub async fn create_client(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: crate::audit_trail::Audit,
    headers: axum::http::HeaderMap,
    Json(body): Json<OAuthClientBody>,
) -> Result<Response, Problem> {
    if tenant.scopes != ALL_SCOPES {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "api_key_required",
            "OAuth clients are created with an unscoped API key",
        ));
    }
    let bits = parse_scopes(&body.scopes)?;
    // A retry under its key makes no second live client whose secret nobody saw.
    let id = match crate::routes::tenants::idempotency_key(&headers)? {
        Some(key) => state.keys.derived_id(b"oauth-client", tenant.id, &key),
        None => new_uuid(),
    };
    audit.0.set_resource(format!("client:{}", uuid_string(id.as_u128())));
    let secret = new_secret(CLIENT_SECRET_PREFIX);
    let record = store::OAuthClientRecord {
        id: id.as_u128(),
        tenant_id: tenant.id,
        scopes: scope_names(bits),
        created_at: store::now_nanos(),
        revoked_at: None,
    };
    let hash = state.keys.secret_hash(&secret);
    let stored = record.clone();
    query(&state, move |q| q.create_oauth_client(&stored, &hash)).await.map_err(|p| match p.code.as_str() {
        "conflict" => Problem::new(
            StatusCode::CONFLICT,
            "exists",
            "a client was already created under this Idempotency-Key; its secret was shown once",
        )
        .field("Idempotency-Key"),
        _ => p,
    })?;
    // Shown only with its entry recorded; unrecorded, revoked unseen (best effort).
    if crate::routes::record_before_answer(&state, &audit, StatusCode::CREATED).await.is_err() {
        let (tenant_id, client_id) = (tenant.id, record.id);
        let _ = query(&state, move |q| q.revoke_oauth_client(tenant_id, client_id, store::now_nanos())).await;
        state.key_cache.forget_client(client_id);
        return Err(Problem::unavailable(
            "the client's creation could not be recorded in the audit log, so it was revoked unseen; retry later",
            2,
        ));
    }
    Ok(secret_reply(
        StatusCode::CREATED,
        &OAuthClientView {
            client_id: uuid_string(record.id),
            client_secret: secret,
            scopes: record.scopes.split(' ').map(str::to_owned).collect(),
            created_at: rfc3339(record.created_at),
        },
    ))
}

#[utoipa::path(delete, path = "/v1/oauth-clients/{id}", tag = "oauth", params(("id" = String, Path, description = "client id")),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("api_key" = [])))]
/// Revokes a client: its secret and every token issued to it stop working at once on this node
/// and within a second on the others.
pub async fn revoke_client(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: crate::audit_trail::Audit,
    crate::json::Path(id): crate::json::Path<String>,
) -> Result<Response, Problem> {
    if tenant.scopes != ALL_SCOPES {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "api_key_required",
            "OAuth clients are revoked with an unscoped API key",
        ));
    }
    let id = crate::dto::parse_id("id", &id)?;
    audit.0.set_resource(format!("client:{}", uuid_string(id)));
    let tenant_id = tenant.id;
    if !query(&state, move |q| q.revoke_oauth_client(tenant_id, id, store::now_nanos())).await? {
        return Err(Problem::not_found("live OAuth client of this tenant"));
    }
    state.key_cache.forget_client(id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// An RFC 6749 §5.2 error.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = serde_json::json!({ "error": error, "error_description": description });
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"rtpay\""));
    }
    response
}

/// Standard base64 with padding.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() { T[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= value(*c)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

/// `POST /oauth/token`, `application/x-www-form-urlencoded`.
pub async fn token(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    if let Err(p) = guard(&parts, &state, None) {
        return p.into_response();
    }
    // RFC 8705 §2: a connection whose certificate can name no client is an `invalid_client`.
    if let Err(p) = crate::auth::certificate_can_admit(&parts) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &p.detail);
    }
    let headers: &HeaderMap = &parts.headers;
    let body = match crate::json::limited_body(&parts.headers, body, TOKEN_REQUEST_LEN_MAX).await {
        Ok(body) => body,
        // 413, 408 or 400 for a body that cannot be read (RFC 6749 names no error for the first two;
        // `invalid_request` is the nearest).
        Err(p) => {
            let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::BAD_REQUEST);
            return oauth_error(status, "invalid_request", &p.detail);
        }
    };
    let Ok(form) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    };
    let field = |name: &str| -> Result<Option<&str>, Response> {
        let mut values = form.iter().filter(|(k, _)| k == name);
        let first = values.next().map(|(_, v)| v.as_str());
        if values.next().is_some() {
            return Err(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "a parameter is repeated"));
        }
        Ok(first)
    };
    let (grant_type, scope, form_id, form_secret) =
        match (field("grant_type"), field("scope"), field("client_id"), field("client_secret")) {
            (Ok(g), Ok(s), Ok(i), Ok(c)) => (g, s, i, c),
            (Err(r), ..) | (_, Err(r), ..) | (_, _, Err(r), _) | (_, _, _, Err(r)) => return r,
        };
    // Client authentication: HTTP Basic, or the form fields — not both; and one Basic at most.
    // (Each refusal before the client is known counts as a failed authentication of the address:
    // `audit_trail::record_after` counts every refused request it records without a credential.)
    if headers.get_all(header::AUTHORIZATION).iter().nth(1).is_some() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "more than one Authorization header");
    }
    let basic = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then(|| rest.trim().to_owned())
    });
    let (client_id, secret) = match (basic, form_id, form_secret) {
        (Some(encoded), None, None) => {
            let decoded = base64_decode(&encoded).and_then(|b| String::from_utf8(b).ok());
            match decoded.as_deref().and_then(|d| d.split_once(':')) {
                Some((id, secret)) => (id.to_owned(), secret.to_owned()),
                None => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "malformed Basic credentials"),
            }
        }
        (None, Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
        (Some(_), _, _) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "use HTTP Basic or the form fields, not both",
            )
        }
        _ => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "client authentication is required"),
    };
    match grant_type {
        Some("client_credentials") => {}
        Some(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only client_credentials is supported",
            )
        }
        None => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "grant_type is required"),
    }
    let unknown = || oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "unknown client or wrong secret");
    let Ok(id) = uuid::Uuid::parse_str(&client_id) else {
        count_failure(&parts, &state, None);
        return unknown();
    };
    let lock_id = format!("client:{id}");
    if let Err(p) = guard(&parts, &state, Some(&lock_id)) {
        return p.into_response();
    }
    let found = match query(&state, move |q| q.oauth_client(id.as_u128())).await {
        Ok(f) => f,
        Err(p) => return p.into_response(),
    };
    let hash = state.keys.secret_hash(&secret);
    let client = match found {
        Some((client, stored)) if client.revoked_at.is_none() && constant_time_eq(&hash, &stored) => client,
        Some((client, _)) => {
            // A tenant's certificate counts against its own tenant's clients only: this
            // client's tenant is known (unlike an API key's, whose wrong secret finds nothing).
            let other_tenant = matches!(parts.extensions.get::<crate::tls::PeerIdentity>(),
                Some(crate::tls::PeerIdentity::Tenant(t)) if *t != client.tenant_id);
            count_failure(&parts, &state, Some(lock_id.as_str()).filter(|_| !other_tenant));
            return unknown();
        }
        None => {
            count_failure(&parts, &state, None);
            return unknown();
        }
    };
    let credential = crate::auth::Credential::Client { tenant: client.tenant_id, client: client.id };
    // Named before the certificate is checked, as every credential is.
    crate::audit_trail::identify(&parts, Some(client.tenant_id), lock_id.clone());
    if let Err(p) = crate::auth::bound_to(&parts, &state, credential) {
        // RFC 8705 §2: a client whose certificate does not fit is an `invalid_client`.
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &p.detail);
    }
    state.auth_guard.succeeded(&lock_id);
    let allowed: u64 = client.scopes.split(' ').filter_map(scope_bit).fold(0, |a, b| a | b);
    // An empty `scope` is none requested (RFC 6749 §3.3: the client's own), not a token for nothing.
    let granted = match scope.filter(|s| !s.trim().is_empty()) {
        None => allowed,
        Some(requested) => {
            let mut bits = 0;
            for s in requested.split(' ').filter(|s| !s.is_empty()) {
                match scope_bit(s) {
                    Some(b) if allowed & b != 0 => bits |= b,
                    _ => {
                        return oauth_error(
                            StatusCode::BAD_REQUEST,
                            "invalid_scope",
                            &format!("the client may not request `{s}`"),
                        )
                    }
                }
            }
            bits
        }
    };
    let expires_at = store::now_nanos() + ACCESS_TOKEN_TTL_SECONDS * 1_000_000_000;
    let claims = Claims { client_id: client.id, tenant_id: client.tenant_id, expires_at, scopes: granted };
    let body = serde_json::json!({
        "access_token": claims.token(&state),
        "token_type": "Bearer",
        "expires_in": ACCESS_TOKEN_TTL_SECONDS,
        "scope": scope_names(granted),
    });
    let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for bytes in [&b""[..], b"f", b"fo", b"foo", b"foob", &[0, 255, 7, 128, 3]] {
            assert_eq!(base64_decode(&base64_encode(bytes)).unwrap(), bytes);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn base64_decodes_what_basic_auth_sends() {
        assert_eq!(base64_decode("YWxhZGRpbjpvcGVuc2VzYW1l").unwrap(), b"aladdin:opensesame");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode("Y"), None);
        assert_eq!(base64_decode("Y*=="), None);
    }

    #[test]
    fn scopes_round_trip_through_bits() {
        assert!(SCOPES.len() <= 64);
        let bits = scope_bit("cob.read").unwrap() | scope_bit("transfers:write").unwrap();
        assert_eq!(scope_names(bits), "cob.read transfers:write");
        assert_eq!(scope_bit("cob.delete"), None);
    }
}
