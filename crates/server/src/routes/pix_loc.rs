//! Payload locations of the API Pix (`/api/v2/loc`) and what a location serves: the JWS-signed
//! payload of its charge (`GET /qr/v2/{token}`, the spec's `GET /{pixUrlAccessToken}`) and the
//! JWK Set that verifies it (`GET /qr/jwks`, the JWS header's `jku`).
//!
//! A location is a document (kind `pix-loc`, id its number, lookup its URL). Which charge it serves
//! is not written in it: it is the charge whose document's lookup is the URL, unique per kind, so a
//! location serves one charge at most and linking or unlinking is one write, to the charge.

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::api_pix::*;
use crate::audit_trail::Audit;
use crate::auth::{random_32, Tenant};
use crate::dto::rfc3339;
use crate::json::{reply, Path};
use crate::AppState;

pub const LOC_KIND: &str = "pix-loc";
/// Where the JWK Set is, on the locations' host.
pub const JWKS_PATH: &str = "/qr/jwks";

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredLoc {
    pub id: u64,
    /// The URL without scheme (as the BR Code's field 26.25 carries it).
    pub location: String,
    #[serde(rename = "tipoCob")]
    pub tipo_cob: String,
    pub created_at: u64,
}

/// A charge's location.
#[derive(Clone, Debug)]
pub struct Linked {
    pub id: u64,
    pub location: String,
    pub created_at: u64,
}

impl Linked {
    pub fn of(s: &StoredCob) -> Option<Linked> {
        Some(Linked {
            id: s.loc_id?,
            location: s.location.clone()?,
            created_at: s.loc_created_at.unwrap_or(s.created_at),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocRef {
    id: u64,
    #[serde(rename = "tipoCob")]
    tipo_cob: Option<String>,
}

/// A charge body's `loc` (`{"id"}`), if any.
pub fn loc_ref(v: Option<&Value>, kind: &'static str, prop: &str) -> PixResult<Option<u64>> {
    loc_ref_of(v, "cob", kind, prop)
}

/// A charge body's `loc` for a charge of type `tipo`.
pub fn loc_ref_of(v: Option<&Value>, tipo: &str, kind: &'static str, prop: &str) -> PixResult<Option<u64>> {
    let Some(v) = v else { return Ok(None) };
    let r: LocRef = crate::json_objects::from_value(v.clone())
        .map_err(|_| PixError::violation(kind, prop, "`loc` must be {\"id\": the number of a location}"))?;
    if r.tipo_cob.as_deref().is_some_and(|t| t != tipo) {
        return Err(PixError::violation(kind, prop, format!("this charge takes a location of `tipoCob` {tipo}")));
    }
    Ok(Some(r.id))
}

/// The txid of the charge the location serves, if one does (cob and cobv are one kind of
/// document: their txids are one namespace).
fn holder(q: &dyn store::Queries, loc: &StoredLoc) -> store::Result<Option<String>> {
    Ok(q.document_by_lookup(COB_KIND, &loc.location)?.map(|d| d.id))
}

fn read_loc(q: &dyn store::Queries, tenant: u128, id: u64) -> store::Result<Option<StoredLoc>> {
    match q.document(LOC_KIND, tenant, &id.to_string())? {
        Some(doc) => Ok(Some(serde_json::from_str(&doc.body).map_err(corrupt)?)),
        None => Ok(None),
    }
}

/// A new location of `tipo` (`cob`, `cobv`) under `prefix` ([`AppState::location_prefix`]).
pub fn create(q: &dyn store::Queries, tenant: u128, tipo: &str, now: u64, prefix: &str) -> PixResult<Linked> {
    for _ in 0..3 {
        let r = random_32();
        // Positive int64: the spec's `PayloadLocationId`.
        let id = u64::from_be_bytes(r[..8].try_into().expect("8 bytes")) >> 1;
        let loc = StoredLoc {
            id,
            location: match tipo {
                "cobv" => format!("{prefix}cobv/{}", crate::auth::hex(&r[8..24])),
                _ => format!("{prefix}{}", crate::auth::hex(&r[8..24])),
            },
            tipo_cob: tipo.to_owned(),
            created_at: now,
        };
        let doc = store::Document {
            kind: LOC_KIND.into(),
            tenant_id: tenant,
            id: id.to_string(),
            lookup: Some(loc.location.clone()),
            owner: None,
            created_at: now,
            version: 1,
            body: serde_json::to_string(&loc).expect("serializable"),
        };
        match q.insert_document(&doc) {
            Ok(()) => return Ok(Linked { id, location: loc.location, created_at: now }),
            Err(store::StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(corrupt("three random location ids were taken").into())
}

/// Location `id` for the charge `txid` of type `tipo`: it must exist, be of that type and serve no
/// other charge. The charge's write makes the link.
pub fn claim(
    q: &dyn store::Queries,
    tenant: u128,
    id: u64,
    tipo: &str,
    txid: &str,
    kind: &'static str,
    prop: &str,
) -> PixResult<Linked> {
    let loc = read_loc(q, tenant, id)?.ok_or_else(|| PixError::violation(kind, prop, "no location has this id"))?;
    if loc.tipo_cob != tipo {
        return Err(PixError::violation(kind, prop, format!("the location is of `tipoCob` {}", loc.tipo_cob)));
    }
    if holder(q, &loc)?.is_some_and(|t| t != txid) {
        return Err(PixError::violation(kind, prop, "the location serves another charge"));
    }
    Ok(Linked { id, location: loc.location, created_at: loc.created_at })
}

/// Where a charge's location is decided: its tenant, type and txid, and how errors name it.
pub struct Place<'a> {
    pub tenant: u128,
    pub tipo: &'a str,
    pub txid: &'a str,
    pub kind: &'static str,
    pub prop: &'a str,
}

impl Place<'_> {
    /// The charge's location after a request that asks for `wanted` (a `loc.id`), the charge
    /// having `have`: the same one kept, `wanted` claimed when it has none, a new one made under
    /// `fresh` (a location prefix) when it has none and asks none; another one than it has → 400.
    pub fn link(
        &self,
        q: &dyn store::Queries,
        wanted: Option<u64>,
        have: Option<Linked>,
        fresh: Option<&str>,
        now: u64,
    ) -> PixResult<Option<Linked>> {
        match (wanted, have, fresh) {
            (Some(id), Some(have), _) if id != have.id => Err(PixError::violation(
                self.kind,
                self.prop,
                "the charge has another location; unlink it first (DELETE /loc/{id}/txid)",
            )),
            (Some(id), None, _) => Ok(Some(claim(q, self.tenant, id, self.tipo, self.txid, self.kind, self.prop)?)),
            (None, None, Some(prefix)) => Ok(Some(create(q, self.tenant, self.tipo, now, prefix)?)),
            (_, have, _) => Ok(have),
        }
    }
}

fn loc_view(loc: &StoredLoc, txid: Option<&str>) -> Value {
    let mut v = json!({
        "id": loc.id,
        "location": format!("https://{}", loc.location),
        "tipoCob": loc.tipo_cob,
        "criacao": rfc3339(loc.created_at),
    });
    if let Some(t) = txid {
        v["txid"] = json!(t);
    }
    v
}

fn loc_not_found() -> PixError {
    PixError::new(StatusCode::NOT_FOUND, "PayloadLocationNaoEncontrado", "no location with this id")
}

fn loc_id(text: &str) -> PixResult<u64> {
    crate::dto::digits::<u64>(text).filter(|n| *n <= i64::MAX as u64).ok_or_else(loc_not_found)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocBody {
    #[serde(rename = "tipoCob")]
    tipo_cob: String,
}

pub async fn loc_post(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    PixBody(bytes): PixBody,
) -> PixResult<Response> {
    const K: &str = "PayloadLocationOperacaoInvalida";
    tenant.require("payloadlocation.write")?;
    state.ispb()?;
    let body: LocBody = body_of(&bytes, K, "tipoCob")?;
    if !matches!(body.tipo_cob.as_str(), "cob" | "cobv") {
        return Err(PixError::violation(K, "tipoCob", "must be cob or cobv"));
    }
    let tenant_id = tenant.id;
    let tipo = body.tipo_cob.clone();
    let prefix = state.location_prefix();
    let linked = pix_query(&state, move |q| create(q, tenant_id, &tipo, store::now_nanos(), &prefix)).await?;
    audit.0.set_resource(format!("pix-loc:{}", linked.id));
    let loc =
        StoredLoc { id: linked.id, location: linked.location, tipo_cob: body.tipo_cob, created_at: linked.created_at };
    let mut response = reply(StatusCode::CREATED, &loc_view(&loc, None));
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v2/loc/{}", loc.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

pub async fn loc_get(State(state): State<AppState>, tenant: Tenant, Path(id): Path<String>) -> PixResult<Response> {
    tenant.require("payloadlocation.read")?;
    state.ispb()?;
    let id = loc_id(&id)?;
    let tenant_id = tenant.id;
    let view = pix_query(&state, move |q| -> PixResult<Value> {
        let loc = read_loc(q, tenant_id, id)?.ok_or_else(loc_not_found)?;
        Ok(loc_view(&loc, holder(q, &loc)?.as_deref()))
    })
    .await?;
    Ok(reply(StatusCode::OK, &view))
}

pub async fn loc_list(State(state): State<AppState>, tenant: Tenant, RawQuery(raw): RawQuery) -> PixResult<Response> {
    const K: &str = "PayloadLocationConsultaInvalida";
    tenant.require("payloadlocation.read")?;
    state.ispb()?;
    let p = params_of(raw, K)?;
    let span = window(&p, K)?;
    let (page, per_page) = pagination(&p, K)?;
    let present = bool_param(&p, "txIdPresente", K)?;
    let tipo = p.get("tipoCob").cloned();
    if tipo.as_deref().is_some_and(|t| !matches!(t, "cob" | "cobv")) {
        return Err(PixError::violation(K, "tipoCob", "must be cob or cobv"));
    }
    let mut parametros = json!({"inicio": p["inicio"], "fim": p["fim"]});
    if let Some(b) = present {
        parametros["txIdPresente"] = json!(b);
    }
    if let Some(t) = &tipo {
        parametros["tipoCob"] = json!(t);
    }
    let tenant_id = tenant.id;
    let (locs, total) = pix_query(&state, move |q| -> PixResult<(Vec<Value>, usize)> {
        let docs = scan(q, LOC_KIND, tenant_id, span, |_| true)?;
        let mut matching = Vec::new();
        for doc in docs {
            let loc: StoredLoc = serde_json::from_str(&doc.body).map_err(corrupt)?;
            if tipo.as_ref().is_some_and(|t| *t != loc.tipo_cob) {
                continue;
            }
            let txid = holder(q, &loc)?;
            if present.is_some_and(|want| want != txid.is_some()) {
                continue;
            }
            matching.push(loc_view(&loc, txid.as_deref()));
        }
        let total = matching.len();
        Ok((matching.into_iter().skip(page.saturating_mul(per_page)).take(per_page).collect(), total))
    })
    .await?;
    parametros["paginacao"] = paginacao(page, per_page, total);
    Ok(reply(StatusCode::OK, &json!({"parametros": parametros, "loc": locs})))
}

/// `DELETE /loc/{id}/txid`: the charge keeps its status and loses its location.
pub async fn loc_unlink(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(id): Path<String>,
) -> PixResult<Response> {
    tenant.require("payloadlocation.write")?;
    state.ispb()?;
    let id = loc_id(&id)?;
    let tenant_id = tenant.id;
    audit.0.set_resource(format!("pix-loc:{}", crate::audit_trail::client_id(&id.to_string())));
    let (loc, txid) = pix_query(&state, move |q| -> PixResult<(StoredLoc, Option<String>)> {
        let loc = read_loc(q, tenant_id, id)?.ok_or_else(loc_not_found)?;
        let txid = holder(q, &loc)?;
        Ok((loc, txid))
    })
    .await?;
    if let Some(txid) = txid {
        let _guard = state.pix_runtime.lock(&[cob_lock(&state, tenant_id, &txid)]).await;
        let location = loc.location.clone();
        pix_query(&state, move |q| -> PixResult<()> {
            let Some((doc, mut stored)) = read_cob(q, tenant_id, &txid)? else { return Ok(()) };
            if stored.location.as_deref() != Some(location.as_str()) {
                return Ok(());
            }
            stored.loc_id = None;
            stored.location = None;
            stored.loc_created_at = None;
            let next = store::Document {
                version: doc.version + 1,
                lookup: None,
                body: serde_json::to_string(&stored).expect("serializable"),
                ..doc.clone()
            };
            if !q.update_document(&next, doc.version)? {
                let mut e = PixError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServicoIndisponivel",
                    "the charge changed meanwhile; retry",
                );
                e.retry_after_seconds = Some(1);
                return Err(e);
            }
            Ok(())
        })
        .await?;
    }
    Ok(reply(StatusCode::OK, &loc_view(&loc, None)))
}

// ---------------------------------------------------------------------------------------------
// What a location serves

fn signer(state: &AppState, q: &dyn store::Queries) -> PixResult<std::sync::Arc<crate::jws::PayloadSigner>> {
    if let Some(s) = state.pix_runtime.signer.get() {
        return Ok(s.clone());
    }
    let vault = state.vault_or_503()?;
    let loaded = std::sync::Arc::new(crate::jws::PayloadSigner::load_or_create(&vault, q)?);
    Ok(state.pix_runtime.signer.get_or_init(|| loaded).clone())
}

/// `body` signed with the institution's key, its JWK Set named in the header.
pub fn sign_payload(state: &AppState, q: &dyn store::Queries, body: &Value) -> PixResult<String> {
    Ok(signer(state, q)?.sign(body, &jku(state)))
}

/// The URL of the JWK Set, on the locations' host.
pub fn jku(state: &AppState) -> String {
    format!("https://{}{JWKS_PATH}", state.pix.location_host)
}

/// Whether `token` can end a location: 32 lowercase hexadecimal digits, as [`create`] writes.
pub fn is_token(token: &str) -> bool {
    token.len() == 32 && token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn payload_problem(status: StatusCode, detail: &str) -> PixError {
    PixError::new(status, "CobPayloadNaoEncontrado", detail)
}

/// `GET /qr/v2/{token}`: the charge at this location as a JWS (`application/jose`). Open to anyone
/// who has the URL (a capability URL); a charge that can no longer be paid answers 410.
pub async fn payload(State(state): State<AppState>, Path(token): Path<String>) -> PixResult<Response> {
    if !is_token(&token) {
        return Err(payload_problem(StatusCode::NOT_FOUND, "no charge at this location"));
    }
    let location = format!("{}{token}", state.location_prefix());
    let st = state.clone();
    let jws = pix_query(&state, move |q| -> PixResult<String> {
        let doc = q
            .document_by_lookup(COB_KIND, &location)?
            .ok_or_else(|| payload_problem(StatusCode::NOT_FOUND, "no charge at this location"))?;
        let stored: StoredCob = serde_json::from_str(&doc.body).map_err(corrupt)?;
        let now = store::now_nanos();
        let active = stored.status == pix::charge::CobStatus::Ativa.as_str();
        if !active || !pix::charge::cob_payable(stored.created_at, Some(stored.expiracao), now).unwrap_or(false) {
            return Err(payload_problem(StatusCode::GONE, "the charge at this location can no longer be paid"));
        }
        let payload = cob_payload(&st, q, &stored, doc.tenant_id, now)?;
        sign_payload(&st, q, &payload)
    })
    .await?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/jose")], jws).into_response())
}

/// `GET /qr/jwks`: the public key that verifies the payloads.
pub async fn jwks(State(state): State<AppState>) -> PixResult<Response> {
    let st = state.clone();
    let set = pix_query(&state, move |q| signer(&st, q).map(|s| s.jwks())).await?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/jwk-set+json")], set.to_string()).into_response())
}
