//! The native Pix routes: keys (DICT), BR Codes and their images, payments.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use pix::brcode::{BrCode, Value};
use pix::{KeyType, PixKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit_trail::Audit;
use crate::auth::{new_uuid, random_32, Tenant};
use crate::dto::{parse_id, rfc3339, uuid_string};
use crate::json::{reply, Json, Params, Path};
use crate::oauth::base64_encode;
use crate::pix_rail::*;
use crate::problem::Problem;
use crate::routes::query;
use crate::vault_service::VaultFailure;
use crate::AppState;

pub const DESCRIPTION_LEN_MAX: usize = 140;

/// A Pix amount in centavos: what the API Pix's `\d{1,10}\.\d{2}` can carry, and not zero.
fn check_amount(field: &str, centavos: u64) -> Result<(), Problem> {
    if centavos == 0 || centavos > pix::amount::MAX_CENTAVOS {
        return Err(Problem::invalid(field, "invalid_amount", format!("`{field}` must be 1..=999999999999 centavos")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Keys

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    #[schema(format = Uuid)]
    pub account_id: String,
    /// `cpf`, `cnpj`, `email`, `phone` or `evp`.
    #[serde(rename = "type")]
    #[schema(value_type = PixKeyType)]
    pub kind: String,
    /// Required for `email` and `phone`; for `cpf`/`cnpj` it must be the holder's document; never
    /// for `evp` (generated).
    pub key: Option<String>,
}

/// A Pix key's type, for the document (the body reads it as text and names the field when it is
/// none of these).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum PixKeyType {
    Cpf,
    Cnpj,
    Email,
    Phone,
    Evp,
}

#[derive(Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub key: String,
    pub account_id: String,
    pub created_at: String,
}

fn key_type(text: &str) -> Result<KeyType, Problem> {
    KeyType::parse(text).ok_or_else(|| {
        Problem::invalid("type", "invalid_key_type", "`type` must be `cpf`, `cnpj`, `email`, `phone` or `evp`")
    })
}

fn invalid_key(field: &str, e: pix::KeyError) -> Problem {
    Problem::invalid(field, "invalid_key", format!("`{field}` is not a valid Pix key: {e}"))
}

#[utoipa::path(post, path = "/v1/pix/keys", tag = "pix", request_body = KeyBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes a registration safe to retry (an `evp` key too: the same random key)")),
    responses((status = 201, body = KeyView), (status = 200, body = KeyView, description = "the key is this account's already (a repeat)"),
        (status = 409, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)),
    security(("api_key" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    headers: axum::http::HeaderMap,
    Json(body): Json<KeyBody>,
) -> Result<Response, Problem> {
    tenant.require("pix:write")?;
    let ispb = state.ispb()?.to_owned();
    let vault = state.vault_or_503()?;
    let rt = state.pix_runtime.clone();
    let account = parse_id("account_id", &body.account_id)?;
    let kind = key_type(&body.kind)?;
    // A retry under its Idempotency-Key makes the same id and, for `evp`, the same random key: the
    // second registration finds the first.
    let idempotency = crate::routes::tenants::idempotency_key(&headers)?;
    let derived = |purpose: &[u8]| idempotency.as_ref().map(|k| state.keys.derived_id(purpose, tenant.id, k));
    let key = match (kind, &body.key) {
        (KeyType::Evp, None) => match derived(b"pix-evp") {
            Some(random) => pix::keys::new_evp(*random.as_bytes()),
            None => pix::keys::new_evp(random_32()[..16].try_into().expect("16 bytes")),
        },
        (KeyType::Evp, Some(_)) => {
            return Err(Problem::invalid("key", "invalid_key", "an `evp` key is generated: leave `key` out"))
        }
        (_, None) => {
            return Err(Problem::invalid("key", "missing_field", format!("a `{}` key needs `key`", kind.as_str())))
        }
        (_, Some(text)) => PixKey::parse(kind, text).map_err(|e| invalid_key("key", e))?,
    };
    let id = uuid_string(derived(b"pix-key").unwrap_or_else(new_uuid).as_u128());
    audit.0.set_resource(format!("pix-key:{id}"));
    let tenant_id = tenant.id;
    let now = store::now_nanos();
    let (key_out, id_out) = (key.clone(), id.clone());
    // The count of the account's keys and the insert, under the account's lock (per node).
    let _lock = state
        .pix_runtime
        .lock(&[state.keys.derived_id(b"pix-keys-lock", tenant_id, &uuid_string(account)).as_u128()])
        .await;
    let outcome = query(&state, move |q| {
        Ok((|| -> Result<Result<Option<StoredKey>, Problem>, VaultFailure> {
            let p = match party(&rt, &vault, q, &ispb, tenant_id, account)? {
                Ok(p) => p,
                Err(why) => {
                    return Ok(Err(Problem::invalid("account_id", "invalid_account", format!("`account_id`: {why}"))))
                }
            };
            let holder = q
                .holder(tenant_id, p.holder)?
                .ok_or(VaultFailure::Store(store::StoreError::Corrupt("an account's holder vanished".into())))?;
            // A document key is the holder's own document, of the right kind.
            if matches!(kind, KeyType::Cpf | KeyType::Cnpj) {
                let wanted = if kind == KeyType::Cpf { "person" } else { "company" };
                if holder.kind != wanted || vault.index().of(b"document", key.value.as_bytes()) != holder.document_index
                {
                    return Ok(Err(Problem::invalid(
                        "key",
                        "key_not_owned",
                        format!("a `{}` key must be the account holder's own document", kind.as_str()),
                    )));
                }
            }
            let owner = account_owner(tenant_id, account);
            let max = if p.person { KEYS_PER_ACCOUNT_PERSON } else { KEYS_PER_ACCOUNT_COMPANY };
            let dek = vault.data_key(q, tenant_id)?;
            let stored = StoredKey {
                id: id.clone(),
                kind: kind.as_str().to_owned(),
                key_sealed: base64_encode(&vault::seal(&dek, &key_record(tenant_id, &id), key.value.as_bytes())?),
                account_id: uuid_string(account),
                holder_id: uuid_string(p.holder),
                created_at: rfc3339(now),
            };
            // Registered already to this account, as this type: a repeat (at the account's limit too).
            let repeat = |q: &dyn store::Queries| -> Result<Option<StoredKey>, VaultFailure> {
                Ok(find_key(&vault, q, &key)?.and_then(|(found, k)| {
                    (found.tenant_id == tenant_id && k.account_id == stored.account_id && k.kind == stored.kind)
                        .then_some(k)
                }))
            };
            if let Some(k) = repeat(q)? {
                return Ok(Ok(Some(k)));
            }
            let doc = store::Document {
                kind: KEY_KIND.into(),
                tenant_id,
                id: id.clone(),
                lookup: Some(key_lookup(&vault, &key)),
                owner: Some(owner),
                created_at: now,
                version: 1,
                body: serde_json::to_string(&stored).expect("serializable"),
            };
            match q.insert_document_within(&doc, max) {
                Ok(true) => Ok(Ok(None)),

                Ok(false) => Ok(Err(Problem::invalid(
                    "account_id",
                    "key_limit",
                    format!("the account has {max} keys, the most a {} may have", holder.kind),
                ))),
                // A repeat running alongside, another key under this Idempotency-Key (its id), or
                // another account's key.
                Err(store::StoreError::Conflict(_)) => match repeat(q)? {
                    Some(k) => Ok(Ok(Some(k))),
                    None if q.document(KEY_KIND, tenant_id, &id)?.is_some() => Ok(Err(Problem::new(
                        StatusCode::CONFLICT,
                        "exists_with_different_fields",
                        "another key was registered under this Idempotency-Key",
                    )
                    .field("Idempotency-Key"))),
                    None => Ok(Err(Problem::new(
                        StatusCode::CONFLICT,
                        "key_exists",
                        "this key is registered already (keys are unique across the directory)",
                    )
                    .field("key"))),
                },
                Err(e) => Err(e.into()),
            }
        })())
    })
    .await?;
    let (status, id, created_at) = match outcome.map_err(Problem::from)?? {
        None => (StatusCode::CREATED, id_out, rfc3339(now)),
        Some(found) => (StatusCode::OK, found.id, found.created_at),
    };
    Ok(reply(
        status,
        &KeyView { id, kind: kind.as_str().into(), key: key_out.value, account_id: uuid_string(account), created_at },
    ))
}

/// Finds a key's document by its text (type inferred), in any tenant.
pub(crate) fn find_key(
    vault: &crate::vault_service::VaultService,
    q: &dyn store::Queries,
    key: &PixKey,
) -> store::Result<Option<(store::Document, StoredKey)>> {
    let Some(doc) = q.document_by_lookup(KEY_KIND, &key_lookup(vault, key))? else { return Ok(None) };
    let stored: StoredKey = serde_json::from_str(&doc.body).map_err(|e| store::StoreError::Corrupt(e.to_string()))?;
    Ok(Some((doc, stored)))
}

#[utoipa::path(delete, path = "/v1/pix/keys/{key}", tag = "pix", params(("key" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn delete_key(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(text): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("pix:write")?;
    state.ispb()?;
    let vault = state.vault_or_503()?;
    let key = PixKey::infer(&text).map_err(|e| invalid_key("key", e))?;
    let tenant_id = tenant.id;
    let deleted = query(&state, move |q| match find_key(&vault, q, &key)? {
        Some((doc, _)) if doc.tenant_id == tenant_id => {
            // Its webhook goes first: a webhook whose key is gone could be neither read nor
            // deleted through the API Pix, and would come back with the key registered again. A
            // failure between the two leaves the key, for the client to delete again.
            q.delete_document(crate::webhook::WEBHOOK_KIND, tenant_id, &key_lookup(&vault, &key))?;
            Ok(q.delete_document(KEY_KIND, tenant_id, &doc.id)?.then(|| doc.id.clone()))
        }
        _ => Ok(None),
    })
    .await?;
    let id = deleted.ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "not_found", "no such key in this tenant"))?;
    audit.0.set_resource(format!("pix-key:{id}"));
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Serialize, ToSchema)]
pub struct DirectoryAccount {
    pub ispb: String,
    pub branch: String,
    /// The account's number at the institution (here: its id without dashes).
    pub number: String,
    /// ISO 20022 account type: `CACC` (checking).
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Serialize, ToSchema)]
pub struct DirectoryEntry {
    pub key: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub owner: CreditorView,
    pub account: DirectoryAccount,
    pub created_at: String,
}

/// Up to this many compare-and-set attempts on one document (a bucket, limits) before answering 503.
const COMPARE_AND_SET_TRIES: usize = 8;

#[derive(Serialize, Deserialize)]
struct StoredBucket {
    capacity: u64,
    tokens: u64,
    at: u64,
}

/// A directory look-up for `payer`, charged to its DICT bucket (1 found, 20 not): the key's
/// document, or 429 when the bucket is empty.
fn charged_lookup(
    q: &dyn store::Queries,
    vault: &crate::vault_service::VaultService,
    tenant: u128,
    payer: &Party,
    key: &PixKey,
) -> store::Result<Result<Option<(store::Document, StoredKey)>, Problem>> {
    let mut found = None;
    let charged = update_bucket(q, tenant, payer.holder, payer.person, |bucket, now| {
        if !bucket.admits(now) {
            return Ok(false);
        }
        found = find_key(vault, q, key)?;
        bucket.charge(found.is_some(), now);
        Ok(true)
    })?;
    Ok(charged.map(|()| found))
}

/// A payment's look-up: like [`charged_lookup`], except that a found key is not charged yet. A
/// settled payment gives its look-up back, so found-and-settled costs nothing and writes nothing;
/// the caller charges the found look-up ([`charge_found_lookup`]) when the payment does not settle.
/// A key not found is charged (20) here, at once.
///
/// Found look-ups not yet charged are counted against the bucket per node
/// ([`reserve_lookup`]), so payments in flight at once cannot look up more keys than the payer has
/// tokens for.
/// The key, and the token its look-up holds (none when the look-up was charged already: a key
/// that appeared between the two reads).
type Found = Option<((store::Document, StoredKey), Option<LookupReservation>)>;
fn payment_lookup(
    q: &dyn store::Queries,
    rt: &std::sync::Arc<PixRuntime>,
    vault: &crate::vault_service::VaultService,
    tenant: u128,
    payer: &Party,
    key: &PixKey,
) -> store::Result<Result<Found, Problem>> {
    let capacity = if payer.person { pix::dict::CAPACITY_PERSON } else { pix::dict::CAPACITY_COMPANY };
    let mut bucket = match q.document(BUCKET_KIND, tenant, &uuid_string(payer.holder))? {
        Some(doc) => {
            let b: StoredBucket =
                serde_json::from_str(&doc.body).map_err(|e| store::StoreError::Corrupt(e.to_string()))?;
            pix::dict::Bucket { capacity, tokens: b.tokens.min(capacity), at: b.at }
        }
        None => pix::dict::Bucket::new(capacity, store::now_nanos()),
    };
    let reserved =
        if bucket.admits(store::now_nanos()) { reserve_lookup(rt, tenant, payer.holder, bucket.tokens) } else { None };
    let Some(reservation) = reserved else {
        return Ok(Err(Problem::too_many(
            "dict_rate_limited",
            "this payer's directory look-ups are used up (DICT anti-scanning); they refill at 2 per minute",
            std::time::Duration::from_secs(pix::dict::Bucket { tokens: 0, ..bucket }.retry_after_seconds()),
        )));
    };
    match find_key(vault, q, key)? {
        Some(found) => Ok(Ok(Some((found, Some(reservation))))),
        None => {
            drop(reservation);
            Ok(charged_lookup(q, vault, tenant, payer, key)?.map(|missed| missed.map(|f| (f, None))))
        }
    }
}

/// Charges a payment's found look-up to the payer's bucket (the payment did not settle).
fn charge_found_lookup(q: &dyn store::Queries, tenant: u128, holder: u128, person: bool) -> store::Result<()> {
    update_bucket(q, tenant, holder, person, |bucket, now| {
        bucket.charge(true, now);
        Ok(true)
    })
    .map(drop)
}

/// Applies `change` to a payer holder's DICT bucket (brought up to date), under compare and set;
/// `change` answers false to refuse (the bucket is empty): then 429.
fn update_bucket(
    q: &dyn store::Queries,
    tenant: u128,
    holder: u128,
    person: bool,
    mut change: impl FnMut(&mut pix::dict::Bucket, u64) -> store::Result<bool>,
) -> store::Result<Result<(), Problem>> {
    let capacity = if person { pix::dict::CAPACITY_PERSON } else { pix::dict::CAPACITY_COMPANY };
    let id = uuid_string(holder);
    for _ in 0..COMPARE_AND_SET_TRIES {
        let now = store::now_nanos();
        let existing = q.document(BUCKET_KIND, tenant, &id)?;
        let mut bucket = match &existing {
            Some(doc) => {
                let b: StoredBucket =
                    serde_json::from_str(&doc.body).map_err(|e| store::StoreError::Corrupt(e.to_string()))?;
                pix::dict::Bucket { capacity, tokens: b.tokens.min(capacity), at: b.at }
            }
            None => pix::dict::Bucket::new(capacity, now),
        };
        if !change(&mut bucket, now)? {
            return Ok(Err(Problem::too_many(
                "dict_rate_limited",
                "this payer's directory look-ups are used up (DICT anti-scanning); they refill at 2 per minute",
                std::time::Duration::from_secs(bucket.retry_after_seconds()),
            )));
        }
        let body = serde_json::to_string(&StoredBucket { capacity, tokens: bucket.tokens, at: bucket.at })
            .expect("serializable");
        let (expected, doc) = match existing {
            Some(doc) => (doc.version, store::Document { version: doc.version + 1, body, ..doc }),
            None => (
                0,
                store::Document {
                    kind: BUCKET_KIND.into(),
                    tenant_id: tenant,
                    id: id.clone(),
                    lookup: None,
                    owner: None,
                    created_at: now,
                    version: 1,
                    body,
                },
            ),
        };
        if q.put_document(&doc, expected)? {
            return Ok(Ok(()));
        }
    }
    Err(store::StoreError::Busy)
}

#[utoipa::path(get, path = "/v1/pix/keys/{key}", tag = "pix",
    params(("key" = String, Path), ("payer_account_id" = String, Query, format = Uuid)),
    responses((status = 200, body = DirectoryEntry), (status = 404, body = Problem), (status = 429, body = Problem)),
    security(("api_key" = [])))]
pub async fn lookup_key(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(text): Path<String>,
    Params(params): Params,
) -> Result<Response, Problem> {
    tenant.require("pix:read")?;
    let ispb = state.ispb()?.to_owned();
    let vault = state.vault_or_503()?;
    let rt = state.pix_runtime.clone();
    let payer = params.get("payer_account_id").ok_or_else(|| {
        Problem::invalid(
            "payer_account_id",
            "missing_field",
            "`payer_account_id` is required (DICT look-ups are rate-limited per payer)",
        )
    })?;
    let payer = parse_id("payer_account_id", payer)?;
    let key = PixKey::infer(&text).map_err(|e| invalid_key("key", e))?;
    let tenant_id = tenant.id;
    let outcome = query(&state, move |q| {
        Ok((|| -> Result<Result<DirectoryEntry, Problem>, VaultFailure> {
            let payer = match party(&rt, &vault, q, &ispb, tenant_id, payer)? {
                Ok(p) => p,
                Err(why) => {
                    return Ok(Err(Problem::invalid(
                        "payer_account_id",
                        "invalid_account",
                        format!("`payer_account_id`: {why}"),
                    )))
                }
            };
            let found = match charged_lookup(q, &vault, tenant_id, &payer, &key)? {
                Ok(found) => found,
                Err(p) => return Ok(Err(p)),
            };
            let Some((doc, stored)) = found else {
                return Ok(Err(Problem::new(StatusCode::NOT_FOUND, "key_not_found", "no such key in the directory")));
            };
            let account = uuid::Uuid::parse_str(&stored.account_id).map(|u| u.as_u128()).unwrap_or_default();
            let owner = match party(&rt, &vault, q, &ispb, doc.tenant_id, account)? {
                Ok(p) => p,
                Err(_) => {
                    return Ok(Err(Problem::new(
                        StatusCode::NOT_FOUND,
                        "key_not_found",
                        "no such key in the directory",
                    )))
                }
            };
            Ok(Ok(DirectoryEntry {
                key: key.value.clone(),
                kind: stored.kind,
                owner: owner.view,
                account: DirectoryAccount {
                    ispb: ispb.clone(),
                    branch: "0001".into(),
                    number: stored.account_id.replace('-', ""),
                    kind: "CACC".into(),
                },
                created_at: stored.created_at,
            }))
        })())
    })
    .await?;
    Ok(reply(StatusCode::OK, &outcome.map_err(Problem::from)??))
}

// ---------------------------------------------------------------------------------------------
// Limits

#[derive(Serialize, ToSchema)]
pub struct PendingLimits {
    pub limits: LimitsBody,
    /// When the raise applies (24 hours after it was asked for).
    pub effective_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct LimitsView {
    pub holder_id: String,
    /// The limits in force now.
    pub limits: LimitsBody,
    /// Raises asked for that are not in force yet.
    pub pending: Option<PendingLimits>,
}

fn limits_view(holder: u128, schedule: &pix::limits::Schedule, now: u64) -> LimitsView {
    LimitsView {
        holder_id: uuid_string(holder),
        limits: schedule.at(now).into(),
        pending: schedule
            .pending
            .filter(|(_, from)| *from > now)
            .map(|(l, from)| PendingLimits { limits: l.into(), effective_at: rfc3339(from) }),
    }
}

/// The holder's kind (`person`: default night limits), or 404.
fn holder_kind(q: &dyn store::Queries, tenant: u128, holder: u128) -> store::Result<Option<bool>> {
    Ok(q.holder(tenant, holder)?.map(|h| h.kind == "person"))
}

#[utoipa::path(get, path = "/v1/holders/{id}/pix-limits", tag = "pix", params(("id" = String, Path)),
    responses((status = 200, body = LimitsView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_limits(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("pix:read")?;
    let holder = parse_id("id", &id)?;
    let tenant_id = tenant.id;
    let schedule = query(&state, move |q| match holder_kind(q, tenant_id, holder)? {
        Some(person) => Ok(Some(limits_of(q, tenant_id, holder, person)?.0)),
        None => Ok(None),
    })
    .await?
    .ok_or_else(|| Problem::not_found("holder"))?;
    Ok(reply(StatusCode::OK, &limits_view(holder, &schedule, store::now_nanos())))
}

#[utoipa::path(put, path = "/v1/holders/{id}/pix-limits", tag = "pix", params(("id" = String, Path)),
    request_body = LimitsBody,
    responses((status = 200, body = LimitsView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = [])))]
pub async fn set_limits(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(id): Path<String>,
    Json(body): Json<LimitsBody>,
) -> Result<Response, Problem> {
    tenant.require("pix:write")?;
    let holder = parse_id("id", &id)?;
    for (field, value) in [
        ("per_transaction", body.per_transaction),
        ("daily", body.daily),
        ("nightly", body.nightly),
        ("night_per_transaction", body.night_per_transaction),
    ] {
        if let Some(v) = value {
            check_amount(field, v)?;
        }
    }
    audit.0.set_resource(format!("pix-limits:{}", uuid_string(holder)));
    let tenant_id = tenant.id;
    let saved = query(&state, move |q| {
        let Some(person) = holder_kind(q, tenant_id, holder)? else { return Ok(None) };
        // Compare and set: a concurrent change makes us start over from what it wrote.
        for _ in 0..COMPARE_AND_SET_TRIES {
            let now = store::now_nanos();
            let (schedule, version) = limits_of(q, tenant_id, holder, person)?;
            let next = schedule.request(body.into(), now);
            let stored =
                StoredLimits { current: next.current.into(), pending: next.pending.map(|(l, t)| (l.into(), t)) };
            let doc = store::Document {
                kind: LIMITS_KIND.into(),
                tenant_id,
                id: uuid_string(holder),
                lookup: None,
                owner: None,
                created_at: now,
                version: version + 1,
                body: serde_json::to_string(&stored).expect("serializable"),
            };
            if q.put_document(&doc, version)? {
                return Ok(Some((next, now)));
            }
        }
        Err(store::StoreError::Busy)
    })
    .await?;
    let (schedule, now) = saved.ok_or_else(|| Problem::not_found("holder"))?;
    Ok(reply(StatusCode::OK, &limits_view(holder, &schedule, now)))
}

// ---------------------------------------------------------------------------------------------
// BR Codes

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecodeBody {
    pub payload: String,
}

#[derive(Serialize, ToSchema)]
pub struct Warning {
    pub field: String,
    pub rule: String,
}

#[derive(Serialize, ToSchema)]
pub struct DecodedView {
    /// `static` or `dynamic` (absent point of initiation reads as static).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Centavos.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
    pub merchant_name: String,
    pub merchant_city: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txid: Option<String>,
    pub mcc: String,
    pub crc: String,
    /// Every field by its EMV id (templates as objects).
    #[schema(value_type = Object)]
    pub fields: serde_json::Value,
    /// Departures from the strict rules that were accepted.
    pub warnings: Vec<Warning>,
}

fn decoded_view(code: &BrCode) -> DecodedView {
    let fields = code
        .fields
        .iter()
        .map(|(id, v)| {
            let value = match v {
                Value::Text(t) => serde_json::Value::String(t.clone()),
                Value::Template(subs) => serde_json::Value::Object(
                    subs.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
                ),
            };
            (id.clone(), value)
        })
        .collect();
    DecodedView {
        kind: if code.initiation == Some(pix::brcode::Initiation::Dynamic) { "dynamic" } else { "static" }.into(),
        key: code.key.clone(),
        url: code.url.clone(),
        description: code.info.clone(),
        amount: code.amount,
        merchant_name: code.name.clone(),
        merchant_city: code.city.clone(),
        postal_code: code.postal_code.clone(),
        txid: code.txid.clone(),
        mcc: code.mcc.clone(),
        crc: format!("{:04X}", code.crc),
        fields: serde_json::Value::Object(fields),
        warnings: code.warnings.iter().map(|w| Warning { field: w.field.clone(), rule: w.rule.clone() }).collect(),
    }
}

fn brcode_problem(field: &str, e: pix::brcode::BrCodeError) -> Problem {
    Problem::invalid(
        field,
        "invalid_brcode",
        format!("`{field}` is not a valid BR Code: field {}: {}", e.field, e.rule),
    )
}

#[utoipa::path(post, path = "/v1/pix/brcode/decode", tag = "pix", request_body = DecodeBody,
    responses((status = 200, body = DecodedView), (status = 422, body = Problem)), security(("api_key" = [])))]
pub async fn decode_brcode(tenant: Tenant, Json(body): Json<DecodeBody>) -> Result<Response, Problem> {
    tenant.require("pix:read")?;
    let code = pix::brcode::decode(&body.payload).map_err(|e| brcode_problem("payload", e))?;
    Ok(reply(StatusCode::OK, &decoded_view(&code)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EncodeBody {
    /// A Pix key (static code).
    pub key: String,
    /// Centavos; absent: the payer chooses.
    #[schema(minimum = 1, maximum = 999999999999_u64)]
    pub amount: Option<u64>,
    pub merchant_name: String,
    pub merchant_city: String,
    /// 1 to 25 letters and digits.
    #[schema(pattern = r"^([A-Za-z0-9]{1,25}|\*\*\*)$")]
    pub txid: Option<String>,
    pub description: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct EncodedView {
    pub payload: String,
    /// Where the QR image of this payload is (PNG; `qr.svg` for SVG).
    pub png: String,
    pub svg: String,
}

fn image_path(kind: &str, payload: &str) -> String {
    let query: String = serde_urlencoded::to_string([("payload", payload)]).expect("encodable");
    format!("/v1/pix/brcode/qr.{kind}?{query}")
}

#[utoipa::path(post, path = "/v1/pix/brcode", tag = "pix", request_body = EncodeBody,
    responses((status = 200, body = EncodedView), (status = 422, body = Problem)), security(("api_key" = [])))]
pub async fn encode_brcode(tenant: Tenant, Json(body): Json<EncodeBody>) -> Result<Response, Problem> {
    tenant.require("pix:read")?;
    let key = PixKey::infer(&body.key).map_err(|e| invalid_key("key", e))?;
    if let Some(a) = body.amount {
        check_amount("amount", a)?;
    }
    let spec = pix::brcode::Spec {
        key: Some(key.value),
        url: None,
        info: body.description.clone(),
        amount: body.amount,
        name: body.merchant_name.clone(),
        city: body.merchant_city.clone(),
        txid: body.txid.clone(),
    };
    let payload = pix::brcode::encode(&spec).map_err(|e| {
        let field = match e.field.as_str() {
            "59" => "merchant_name",
            "60" => "merchant_city",
            "62.05" => "txid",
            "54" => "amount",
            "26.02" => "description",
            _ => "key",
        };
        Problem::invalid(field, "invalid_brcode", format!("`{field}`: {}", e.rule))
    })?;
    Ok(reply(
        StatusCode::OK,
        &EncodedView { png: image_path("png", &payload), svg: image_path("svg", &payload), payload },
    ))
}

/// Pixels per QR module in images, and the quiet zone in modules.
const MODULE_PIXELS: usize = 8;
const QUIET_MODULES: usize = 4;

fn qr_of(params: &HashMap<String, String>) -> Result<qrcode::QrCode, Problem> {
    let payload = params
        .get("payload")
        .ok_or_else(|| Problem::invalid("payload", "missing_field", "`payload` (the BR Code) is required"))?;
    pix::brcode::decode(payload).map_err(|e| brcode_problem("payload", e))?;
    qrcode::QrCode::with_error_correction_level(payload.as_bytes(), qrcode::EcLevel::M)
        .map_err(|e| Problem::invalid("payload", "invalid_brcode", format!("`payload` does not fit a QR code: {e}")))
}

/// Grayscale PNG of the code, black modules on white with the quiet zone.
pub fn qr_png(code: &qrcode::QrCode) -> Vec<u8> {
    let width = code.width();
    let colors = code.to_colors();
    let side = (width + 2 * QUIET_MODULES) * MODULE_PIXELS;
    let mut pixels = vec![255u8; side * side];
    for y in 0..width {
        for x in 0..width {
            if colors[y * width + x] == qrcode::Color::Dark {
                for dy in 0..MODULE_PIXELS {
                    let row = (y + QUIET_MODULES) * MODULE_PIXELS + dy;
                    let start = row * side + (x + QUIET_MODULES) * MODULE_PIXELS;
                    pixels[start..start + MODULE_PIXELS].fill(0);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("writing to memory");
    writer.write_image_data(&pixels).expect("writing to memory");
    writer.finish().expect("writing to memory");
    out
}

#[utoipa::path(get, path = "/v1/pix/brcode/qr.png", tag = "pix", params(("payload" = String, Query)),
    responses((status = 200, content_type = "image/png"), (status = 422, body = Problem)), security(("api_key" = [])))]
pub async fn brcode_png(tenant: Tenant, Params(params): Params) -> Result<Response, Problem> {
    tenant.require("pix:read")?;
    let code = qr_of(&params)?;
    Ok(([(header::CONTENT_TYPE, "image/png")], qr_png(&code)).into_response())
}

#[utoipa::path(get, path = "/v1/pix/brcode/qr.svg", tag = "pix", params(("payload" = String, Query)),
    responses((status = 200, content_type = "image/svg+xml"), (status = 422, body = Problem)), security(("api_key" = [])))]
pub async fn brcode_svg(tenant: Tenant, Params(params): Params) -> Result<Response, Problem> {
    tenant.require("pix:read")?;
    let code = qr_of(&params)?;
    let svg = code
        .render::<qrcode::render::svg::Color>()
        .module_dimensions(MODULE_PIXELS as u32, MODULE_PIXELS as u32)
        .quiet_zone(true)
        .build();
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

// ---------------------------------------------------------------------------------------------
// Payments

#[derive(Deserialize, Serialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct CreditorBody {
    pub ispb: String,
    pub branch: String,
    /// The account number (for accounts of this rtpay: the account id, with or without dashes).
    pub account: String,
    /// `CACC` checking, `SVGS` savings, `TRAN` transactional, `SLRY` salary.
    pub account_type: String,
    pub document: String,
    pub name: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    /// The payment's id (UUID): repeating it is safe.
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub debit_account_id: String,
    /// Centavos, 1..=999999999999.
    #[schema(minimum = 1, maximum = 999999999999_u64)]
    pub amount: u64,
    pub key: Option<String>,
    pub brcode: Option<String>,
    pub creditor: Option<CreditorBody>,
    pub description: Option<String>,
}

/// The request's fingerprint, keyed (the body holds documents and keys: a plain hash of it could
/// be reversed by trying every CPF).
fn fingerprint(vault: &crate::vault_service::VaultService, body: &PaymentBody) -> String {
    crate::auth::hex(&vault.index().of(b"pix-payment-body", &serde_json::to_vec(body).expect("serializable")))
}

/// Whether the SPI connector's breaker lets this payment through now (one trial when half-open).
fn spi_admits(state: &AppState) -> Option<pix::spi::Admitted> {
    state.pix_runtime.breaker.lock().expect("not poisoned").try_admit(store::now_nanos())
}

/// Where a payment goes, as the request says it.
enum Target {
    Key(PixKey),
    Account(u128),
    /// An account of this institution named by hand (a manual Pix), with the CPF or CNPJ the
    /// payer gave for its holder (as written): the receiving side confirms the two belong
    /// together — after a repeat is looked up, so that one made before this was checked answers.
    Manual(u128, String),
    External(pix::spi::Party),
    /// A charge's location (a dynamic BR Code).
    Cob(String),
}

/// A creditor at another institution, checked as the SPI would: a CPF or CNPJ, a name, a
/// branch of 1 to 4 digits, an account of 1 to 20 letters or digits.
fn creditor_party(c: &CreditorBody) -> Result<pix::spi::Party, Problem> {
    let (document, _) = pix::document::any(&c.document)
        .map_err(|e| Problem::invalid("creditor.document", "invalid_document", format!("`creditor.document`: {e}")))?;
    let name = crate::dto::display_name("creditor.name", &c.name, 140)?;
    if c.branch.is_empty() || c.branch.len() > 4 || !c.branch.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Problem::invalid("creditor.branch", "invalid_branch", "`creditor.branch` must be 1 to 4 digits"));
    }
    if c.account.is_empty() || c.account.len() > 20 || !c.account.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Problem::invalid(
            "creditor.account",
            "invalid_account",
            "`creditor.account` must be 1 to 20 letters or digits",
        ));
    }
    Ok(pix::spi::Party {
        ispb: c.ispb.clone(),
        branch: c.branch.clone(),
        account: c.account.clone(),
        account_type: c.account_type.clone(),
        document,
        name,
    })
}

#[utoipa::path(post, path = "/v1/pix/payments", tag = "pix", request_body = PaymentBody,
    responses((status = 201, body = PaymentView), (status = 200, body = PaymentView), (status = 409, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem)),
    security(("api_key" = [])))]
pub async fn create_payment(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Json(body): Json<PaymentBody>,
) -> Result<Response, Problem> {
    tenant.require("pix:write")?;
    let ispb = state.ispb()?.to_owned();
    let vault = state.vault_or_503()?;
    let rt = state.pix_runtime.clone();
    let id = uuid_string(parse_id("id", &body.id)?);
    let debit = parse_id("debit_account_id", &body.debit_account_id)?;
    check_amount("amount", body.amount)?;
    let description = match &body.description {
        Some(d) => Some(crate::dto::display_name("description", d, DESCRIPTION_LEN_MAX)?),
        None => None,
    };
    let given = [body.key.is_some(), body.brcode.is_some(), body.creditor.is_some()].iter().filter(|b| **b).count();
    if given != 1 {
        return Err(Problem::invalid("key", "invalid_creditor", "give exactly one of `key`, `brcode` or `creditor`"));
    }
    let mut txid = None;
    let (initiation, target) = if let Some(k) = &body.key {
        ("key", Target::Key(PixKey::infer(k).map_err(|e| invalid_key("key", e))?))
    } else if let Some(payload) = &body.brcode {
        let code = pix::brcode::decode(payload).map_err(|e| brcode_problem("brcode", e))?;
        // A static code's amount is the code's; a dynamic one's (a location and no key: paid as
        // its charge) is its charge's, checked against the charge: a code printed before the
        // charge was revised still pays it.
        let pays_a_charge = code.key.is_none() && code.url.is_some();
        if let (Some(a), false) = (code.amount, pays_a_charge) {
            if a != body.amount {
                return Err(Problem::invalid(
                    "amount",
                    "amount_mismatch",
                    format!("the BR Code asks for {} centavos; `amount` says {}", a, body.amount),
                ));
            }
        }
        txid = code.txid.clone();
        match (code.key.as_deref(), code.url.clone()) {
            (Some(key), _) => ("brcode", Target::Key(PixKey::infer(key).map_err(|e| invalid_key("brcode", e))?)),
            (None, Some(url)) => ("brcode", Target::Cob(url)),
            (None, None) => {
                return Err(Problem::invalid(
                    "brcode",
                    "invalid_brcode",
                    "the BR Code names neither a key nor a location",
                ))
            }
        }
    } else {
        let c = body.creditor.as_ref().expect("one of three");
        if !pix::ids::valid_ispb(&c.ispb) {
            return Err(Problem::invalid(
                "creditor.ispb",
                "invalid_ispb",
                "`creditor.ispb` must be 8 letters or digits",
            ));
        }
        if !matches!(c.account_type.as_str(), "CACC" | "SVGS" | "TRAN" | "SLRY") {
            return Err(Problem::invalid(
                "creditor.account_type",
                "invalid_account_type",
                "`creditor.account_type` must be CACC, SVGS, TRAN or SLRY",
            ));
        }
        if c.ispb != ispb {
            ("manual", Target::External(creditor_party(c)?))
        } else {
            let account = uuid::Uuid::try_parse(&c.account).map_err(|_| {
                Problem::invalid(
                    "creditor.account",
                    "invalid_account",
                    "`creditor.account` must be an account id of this institution",
                )
            })?;
            ("manual", Target::Manual(account.as_u128(), c.document.clone()))
        }
    };
    let print = fingerprint(&vault, &body);
    let tenant_id = tenant.id;
    let amount = body.amount;
    let night_window = state.pix.night;
    audit.0.set_resource(format!("pix-payment:{id}"));
    let (id2, ispb2, print2) = (id.clone(), ispb.clone(), print.clone());
    // A payer's running totals (when a daily or night limit counts them) and a charge are checked
    // and committed under their locks (per node); other payments of a payer run side by side.
    let (rt2, vault2, ispb3) = (rt.clone(), vault.clone(), ispb.clone());
    let limited_holder = super::read_now(&state, move |q| {
        Ok(match party(&rt2, &vault2, q, &ispb3, tenant_id, debit) {
            Ok(Ok(p)) => {
                let limits = limits_of(q, tenant_id, p.holder, p.person)?.0.at(store::now_nanos());
                (limits.daily.is_some() || limits.nightly.is_some()).then_some(p.holder)
            }
            // The preparation below answers what is wrong.
            _ => None,
        })
    })
    .await?;
    let mut lock_keys = Vec::new();
    if let Some(holder) = limited_holder {
        // The holder's: the totals are counted per holder, across their accounts.
        lock_keys.push(state.keys.derived_id(b"pix-payer-lock", tenant_id, &uuid_string(holder)).as_u128());
    }
    if let Target::Cob(url) = &target {
        let url = url.clone();
        if let Some((t, txid)) = query(&state, move |q| super::api_pix::locate_cob(q, &url)).await? {
            lock_keys.push(super::api_pix::cob_lock(&state, t, &txid));
        }
    }
    let _locks = state.pix_runtime.lock(&lock_keys).await;
    let prepared = super::read_now(&state, move |q| {
        Ok((|| -> Result<Result<Result<Prepared, PaymentView>, Problem>, VaultFailure> {
            let mut txid = txid;
            let mut concludes = None;
            let mut payee_key_index = None;
            let mut lookup = None;
            if let Some((_, stored)) = read_payment(q, tenant_id, &id2).map_err(VaultFailure::Store)? {
                if stored.fingerprint != print2 {
                    return Ok(Err(payment_exists_with_different_fields()));
                }
                return Ok(Ok(Err(stored.view)));
            }
            let payer = match party(&rt, &vault, q, &ispb2, tenant_id, debit)? {
                Ok(p) => p,
                Err(why) => {
                    return Ok(Err(Problem::invalid(
                        "debit_account_id",
                        "invalid_account",
                        format!("`debit_account_id`: {why}"),
                    )))
                }
            };
            let payee = match target {
                Target::Cob(url) => {
                    let (doc, cob) = match super::api_pix::payable_cob(q, &url, amount, "brcode")? {
                        Ok(found) => found,
                        Err(p) => return Ok(Err(p)),
                    };
                    txid = Some(cob.txid.clone());
                    payee_key_index = cob.chave_index.clone();
                    let account = uuid::Uuid::parse_str(&cob.account_id).map(|u| u.as_u128()).unwrap_or_default();
                    let tenant_of = doc.tenant_id;
                    concludes = Some(doc);
                    party(&rt, &vault, q, &ispb2, tenant_of, account)?.map(|p| {
                        let view = p.view.clone();
                        (Payee::OnUs(p), view)
                    })
                }
                Target::External(creditor) => {
                    let view = CreditorView {
                        ispb: creditor.ispb.clone(),
                        name: if creditor.document.len() == 11 {
                            pix::keys::mask_person_name(&creditor.name)
                        } else {
                            creditor.name.clone()
                        },
                        document: vault::mask::document(&creditor.document),
                        kind: if creditor.document.len() == 11 { "person" } else { "company" }.into(),
                    };
                    Ok((Payee::OffUs(creditor), view))
                }
                Target::Key(key) => {
                    // Resolving a key is a directory look-up: it draws on the payer's bucket.
                    let found = match payment_lookup(q, &rt, &vault, tenant_id, &payer, &key)? {
                        Ok(found) => found,
                        Err(p) => return Ok(Err(p)),
                    };
                    let Some(((doc, stored), held)) = found else {
                        return Ok(Err(Problem::invalid(
                            if initiation == "brcode" { "brcode" } else { "key" },
                            "key_not_found",
                            "no such key in the directory",
                        )));
                    };
                    payee_key_index = Some(doc.lookup.clone().unwrap_or_else(|| key_lookup(&vault, &key)));
                    lookup = held;
                    let account = uuid::Uuid::parse_str(&stored.account_id).map(|u| u.as_u128()).unwrap_or_default();
                    party(&rt, &vault, q, &ispb2, doc.tenant_id, account)?.map(|p| {
                        let view = p.view.clone();
                        (Payee::OnUs(p), view)
                    })
                }
                Target::Account(account) => party(&rt, &vault, q, &ispb2, tenant_id, account)?.map(|p| {
                    let view = p.view.clone();
                    (Payee::OnUs(p), view)
                }),
                // The document the payer gave must be the account holder's: a mistyped account
                // would otherwise pay whoever holds it.
                Target::Manual(account, given) => party(&rt, &vault, q, &ispb2, tenant_id, account)?.and_then(|p| {
                    if pix::document::any(&given).map(|(d, _)| d).as_ref() != Ok(&p.identity.document) {
                        return Err("`creditor.document` is not the account holder's CPF or CNPJ");
                    }
                    let view = p.view.clone();
                    Ok((Payee::OnUs(p), view))
                }),
            };
            // A payment refused here after its look-up found the key pays for the look-up.
            let mut charge_lookup = || match lookup.take() {
                Some(_) => charge_found_lookup(q, tenant_id, payer.holder, payer.person),
                None => Ok(()),
            };
            let (payee, creditor_view) = match payee {
                Ok(p) => p,
                Err(why) => {
                    charge_lookup()?;
                    return Ok(Err(Problem::invalid("creditor", "invalid_creditor", format!("the creditor: {why}"))));
                }
            };
            if matches!(&payee, Payee::OnUs(p) if p.tenant == payer.tenant && p.account == payer.account) {
                charge_lookup()?;
                return Ok(Err(Problem::invalid(
                    "debit_account_id",
                    "same_account",
                    "a payment to the paying account itself",
                )));
            }
            let now = store::now_nanos();
            let (schedule, _) = limits_of(q, tenant_id, payer.holder, payer.person)?;
            let limits = schedule.at(now);
            // What was spent is read only when a running total limits this payment.
            let totals_matter = limits.daily.is_some() || (limits.nightly.is_some() && night_window.period(now).night);
            let (day, night) =
                if totals_matter { spent(q, payer.tenant, payer.holder, night_window, now)? } else { (0, 0) };
            let refused = pix::limits::check(limits, night_window, amount, now, day, night)
                .err()
                .map(|b| ("limit_exceeded".to_owned(), b.describe()));
            let limit_guards = match refused {
                None => crate::pix_rail::limit_guards(&limits, night_window, payer.tenant, payer.holder, amount, now),
                Some(_) => Vec::new(),
            };
            let random = crate::auth::random_bytes();
            let view = PaymentView {
                id: id2.clone(),
                end_to_end_id: pix::ids::end_to_end_id('E', &ispb2, now, random),
                status: "processing".into(),
                reason: None,
                reason_detail: None,
                debit_account_id: uuid_string(debit),
                amount,
                initiation: initiation.into(),
                creditor: creditor_view,
                txid,
                description,
                created_at: rfc3339(now),
            };
            Ok(Ok(Ok(Prepared {
                payer,
                payee,
                amount,
                view,
                fingerprint: print2,
                refused,
                checked_at: now,
                limit_guards,
                concludes,
                payee_key_index,
                lookup,
            })))
        })())
    })
    .await?;
    match prepared.map_err(Problem::from)?? {
        Err(existing) => {
            let state2 = state.clone();
            let view = query(&state, move |q| reconcile(&state2, q, tenant_id, existing)).await?;
            Ok(reply(StatusCode::OK, &view))
        }
        Ok(mut prepared) => {
            // Only a payment that will go to the SPI asks the breaker: one refused on a limit is
            // recorded rejected, and sends nothing.
            let admitted = match prepared.payee {
                Payee::OffUs(_) if prepared.refused.is_none() => match spi_admits(&state) {
                    Some(admitted) => Some(admitted),
                    None => {
                        let now = store::now_nanos();
                        let wait = state.pix_runtime.breaker.lock().expect("not poisoned").retry_after_seconds(now);
                        return Err(Problem::unavailable(
                            "the SPI connector is failing; payments to other institutions are paused (circuit breaker open)",
                            u32::try_from(wait).unwrap_or(u32::MAX),
                        ));
                    }
                },
                _ => None,
            };
            let (holder, person) = (prepared.payer.holder, prepared.payer.person);
            // Held until the look-up is settled or charged.
            let held = prepared.lookup.take();
            let committed = commit_payment(&state, &audit, prepared).await;
            // A trial whose payment is not on its way to the SPI (the ledger refused it, a twin
            // made it, the commit failed) is given back: it would hold the breaker open another
            // cool-down for every tenant, with no outcome to close it.
            if let Some(admitted) = admitted {
                let sent = matches!(&committed, Ok((view, true)) if view.status == "processing");
                if !sent {
                    state.pix_runtime.breaker.lock().expect("not poisoned").give_back(admitted, store::now_nanos());
                }
            }
            match committed? {
                (view, true) => {
                    // A payment to a key that did not settle pays for its look-up (DICT); one that
                    // settled got it back.
                    if held.is_some() && view.status != "completed" {
                        let charged = query(&state, move |q| charge_found_lookup(q, tenant_id, holder, person)).await;
                        if charged.is_err() {
                            tracing::warn!("a payment's DICT look-up was not charged");
                        }
                    }
                    Ok(reply(StatusCode::CREATED, &view))
                }
                // A concurrent twin created it: answer what it stored, if this request is its twin.
                (_, false) => {
                    let (_, stored) = query(&state, move |q| read_payment(q, tenant_id, &id))
                        .await?
                        .ok_or_else(|| Problem::unavailable("the payment is being recorded; retry", 1))?;
                    if stored.fingerprint != print {
                        return Err(payment_exists_with_different_fields());
                    }
                    Ok(reply(StatusCode::OK, &stored.view))
                }
            }
        }
    }
}

/// A payment id already taken by a payment with another body.
fn payment_exists_with_different_fields() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "exists_with_different_fields",
        "a payment with this id exists with different fields",
    )
    .field("id")
}

#[utoipa::path(get, path = "/v1/pix/payments/{id}", tag = "pix", params(("id" = String, Path)),
    responses((status = 200, body = PaymentView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_payment(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("pix:read")?;
    let id = uuid_string(parse_id("id", &id)?);
    let tenant_id = tenant.id;
    let state2 = state.clone();
    let view = query(&state, move |q| {
        let Some((_, stored)) = read_payment(q, tenant_id, &id)? else { return Ok(None) };
        reconcile(&state2, q, tenant_id, stored.view).map(Some)
    })
    .await?
    .ok_or_else(|| Problem::not_found("Pix payment"))?;
    Ok(reply(StatusCode::OK, &view))
}

// ---------------------------------------------------------------------------------------------
// Sandbox: Pix arriving from other institutions

#[derive(Deserialize, Serialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct IncomingPayer {
    pub ispb: String,
    pub name: String,
    /// CPF or CNPJ.
    pub document: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingBody {
    /// The payer institution's EndToEndId (`E` + its ISPB ...); generated when absent. Repeating
    /// it is safe: the Pix is credited once.
    pub end_to_end_id: Option<String>,
    /// Centavos.
    #[schema(minimum = 1, maximum = 999999999999_u64)]
    pub amount: u64,
    /// One of: a key of this tenant, an account of this tenant, a BR Code of one of its keys.
    pub key: Option<String>,
    #[schema(format = Uuid)]
    pub account_id: Option<String>,
    pub brcode: Option<String>,
    pub payer: IncomingPayer,
    pub description: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct IncomingView {
    pub end_to_end_id: String,
    pub credit_account_id: String,
    pub amount: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txid: Option<String>,
    pub payer: CreditorView,
    pub received_at: String,
}

impl From<StoredReceived> for IncomingView {
    fn from(r: StoredReceived) -> Self {
        IncomingView {
            end_to_end_id: r.end_to_end_id,
            credit_account_id: r.credit_account_id,
            amount: r.amount,
            txid: r.txid,
            payer: r.payer,
            received_at: r.received_at,
        }
    }
}

/// How far ahead of this node's clock an incoming EndToEndId's time may be (another institution's
/// clock).
const E2E_CLOCK_SKEW_NANOS: u64 = 5 * 60 * 1_000_000_000;

/// The sandbox SPI delivers a Pix from another institution: the tenant's settlement account (its
/// share of the reserve) pays the receiving account, once per EndToEndId.
#[utoipa::path(post, path = "/v1/sandbox/spi/incoming", tag = "pix", request_body = IncomingBody,
    responses((status = 201, body = IncomingView), (status = 200, body = IncomingView), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = [])))]
pub async fn sandbox_incoming(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Json(body): Json<IncomingBody>,
) -> Result<Response, Problem> {
    tenant.require("pix:write")?;
    let ispb = state.ispb()?.to_owned();
    let vault = state.vault_or_503()?;
    let rt = state.pix_runtime.clone();
    check_amount("amount", body.amount)?;
    if !pix::ids::valid_ispb(&body.payer.ispb) || body.payer.ispb == ispb {
        return Err(Problem::invalid(
            "payer.ispb",
            "invalid_ispb",
            "`payer.ispb` must be another institution's ISPB (8 letters or digits)",
        ));
    }
    let (payer_document, payer_person) = pix::document::any(&body.payer.document)
        .map_err(|e| Problem::invalid("payer.document", "invalid_document", format!("`payer.document`: {e}")))?;
    let payer_name = crate::dto::display_name("payer.name", &body.payer.name, 140)?;
    let description = match &body.description {
        Some(d) => Some(crate::dto::display_name("description", d, DESCRIPTION_LEN_MAX)?),
        None => None,
    };
    let now = store::now_nanos();
    // An id of the EndToEndId's shape is looked up first (a repeat answers as stored, whatever
    // earlier versions took); a new Pix's must also be the payer institution's, on a date that
    // exists and has come.
    let invalid = |why: &str| Problem::invalid("end_to_end_id", "invalid_end_to_end_id", why.to_owned());
    let (e2e, refused) = match &body.end_to_end_id {
        Some(e) if pix::ids::end_to_end_id_shape('E', e) => {
            let refused = if !pix::ids::valid_end_to_end_id('E', e) {
                Some(invalid("`end_to_end_id` must be on a date that exists"))
            } else if e[1..9] != body.payer.ispb {
                Some(invalid("`end_to_end_id` must carry the payer's institution's ISPB (`payer.ispb`) after the E"))
            } else if pix::ids::end_to_end_time(e).is_none_or(|at| at > now.saturating_add(E2E_CLOCK_SKEW_NANOS)) {
                Some(invalid("`end_to_end_id`'s date and time (UTC) must not be in the future"))
            } else {
                None
            };
            (e.clone(), refused)
        }
        Some(_) => {
            return Err(invalid(
                "`end_to_end_id` must be E + ISPB + yyyyMMddHHmm + 11 letters or digits (32 characters), on a date \
                 that exists",
            ))
        }
        None => {
            let random = crate::auth::random_bytes();
            (pix::ids::end_to_end_id('E', &body.payer.ispb, now, random), None)
        }
    };
    // The message as parsed (spacing and key order are no difference), keyed: a repeat of its
    // EndToEndId must be the same message.
    let canonical = serde_json::to_vec(&body).expect("serializable");
    let fingerprint = crate::auth::hex(&vault.index().of(b"pix-incoming-body", &canonical));
    let given = [body.key.is_some(), body.account_id.is_some(), body.brcode.is_some()].iter().filter(|b| **b).count();
    if given != 1 {
        return Err(Problem::invalid("key", "invalid_creditor", "give exactly one of `key`, `account_id` or `brcode`"));
    }
    let mut txid = None;
    let target = if let Some(k) = &body.key {
        Target::Key(PixKey::infer(k).map_err(|e| invalid_key("key", e))?)
    } else if let Some(a) = &body.account_id {
        Target::Account(parse_id("account_id", a)?)
    } else {
        let payload = body.brcode.as_deref().expect("one of three");
        let code = pix::brcode::decode(payload).map_err(|e| brcode_problem("brcode", e))?;
        // A dynamic code's amount is its charge's, checked against the charge (see above).
        let pays_a_charge = code.key.is_none() && code.url.is_some();
        if !pays_a_charge && code.amount.is_some_and(|a| a != body.amount) {
            return Err(Problem::invalid("amount", "amount_mismatch", "`amount` differs from the BR Code's"));
        }
        txid = code.txid.clone();
        match (code.key.as_deref(), code.url.clone()) {
            (Some(key), _) => Target::Key(PixKey::infer(key).map_err(|e| invalid_key("brcode", e))?),
            (None, Some(url)) => Target::Cob(url),
            (None, None) => {
                return Err(Problem::invalid(
                    "brcode",
                    "invalid_brcode",
                    "the BR Code names neither a key nor a location",
                ))
            }
        }
    };
    let tenant_id = tenant.id;
    audit.0.set_resource(format!("pix-received:{e2e}"));
    let (e2e2, ispb2) = (e2e.clone(), ispb.clone());
    let mut lock_keys = Vec::new();
    if let Target::Cob(url) = &target {
        let url = url.clone();
        if let Some((t, txid)) = query(&state, move |q| super::api_pix::locate_cob(q, &url)).await? {
            lock_keys.push(super::api_pix::cob_lock(&state, t, &txid));
        }
    }
    let _locks = state.pix_runtime.lock(&lock_keys).await;
    let amount = body.amount;
    let resolved = query(&state, move |q| {
        type Resolved = (Party, Option<String>, Option<store::Document>, Option<String>);
        Ok((|| -> Result<Result<Result<Resolved, StoredReceived>, Problem>, VaultFailure> {
            let (mut txid, mut concludes, mut key_index) = (txid, None, None);
            if let Some(doc) = q.document(RECEIVED_KIND, tenant_id, &e2e2)? {
                let stored: StoredReceived = serde_json::from_str(&doc.body)
                    .map_err(|e| VaultFailure::Store(store::StoreError::Corrupt(e.to_string())))?;
                return Ok(Ok(Err(stored)));
            }
            let account = match target {
                Target::Key(key) => match find_key(&vault, q, &key)? {
                    Some((doc, stored)) if doc.tenant_id == tenant_id => {
                        key_index = doc.lookup.clone();
                        uuid::Uuid::parse_str(&stored.account_id).map(|u| u.as_u128()).unwrap_or_default()
                    }
                    _ => return Ok(Err(Problem::invalid("key", "key_not_found", "no such key in this tenant"))),
                },
                Target::Account(a) | Target::Manual(a, _) => a,
                Target::Cob(url) => {
                    let (doc, cob) = match super::api_pix::payable_cob(q, &url, amount, "brcode")? {
                        Ok(found) if found.0.tenant_id == tenant_id => found,
                        Ok(_) => {
                            return Ok(Err(Problem::invalid(
                                "brcode",
                                "charge_not_found",
                                "no such charge in this tenant",
                            )))
                        }
                        Err(p) => return Ok(Err(p)),
                    };
                    txid = Some(cob.txid.clone());
                    key_index = cob.chave_index.clone();
                    concludes = Some(doc);
                    uuid::Uuid::parse_str(&cob.account_id).map(|u| u.as_u128()).unwrap_or_default()
                }
                // Only `key`, `account_id` and `brcode` make targets here.
                Target::External(_) => return Ok(Err(Problem::internal())),
            };
            Ok(match party(&rt, &vault, q, &ispb2, tenant_id, account)? {
                Ok(p) => Ok(Ok((p, txid, concludes, key_index))),
                Err(why) => Err(Problem::invalid("account_id", "invalid_account", format!("the receiver: {why}"))),
            })
        })())
    })
    .await?;
    let (payee, txid, concludes, key_index) = match resolved.map_err(Problem::from)?? {
        // The same Pix again: its first answer. Another Pix under its EndToEndId: refused, as a
        // transfer's id with a different body is.
        Err(existing) => return repeated(existing, &fingerprint, body.amount, &body.payer.ispb, &description),
        Ok(_) if refused.is_some() => return Err(refused.expect("checked")),
        Ok(p) => p,
    };
    let settlement = ensure_settlement(&state, tenant_id).await?;
    let received = StoredReceived {
        end_to_end_id: e2e.clone(),
        credit_account_id: uuid_string(payee.account),
        amount: body.amount,
        txid,
        payer: CreditorView {
            ispb: body.payer.ispb.clone(),
            name: if payer_person { pix::keys::mask_person_name(&payer_name) } else { payer_name },
            document: vault::mask::document(&payer_document),
            kind: if payer_person { "person" } else { "company" }.into(),
        },
        description,
        received_at: rfc3339(now),
        received_at_nanos: now,
        payer_account: None,
        notified_key: None,
        fingerprint: Some(fingerprint.clone()),
    };
    let event = ledger::TransferEvent {
        key: ledger::TransferKey {
            tenant: ledger::TenantId(tenant_id),
            id: ledger::TransferId(state.keys.derived_id(b"pix-received", tenant_id, &e2e).as_u128()),
        },
        kind: ledger::EventKind::Posted {
            debit: settlement.id,
            credit: ledger::AccountId(payee.account),
            amount: body.amount,
        },
        code: crate::dto::PIX_CODE,
        metadata: Some(format!(r#"{{"pix":"{e2e}"}}"#)),
        linked: false,
    };
    let guards = concludes.iter().map(store::Guard::of).collect();
    let tenant_for = tenant_id;
    // The API Pix notifies Pix associated with a txid only (and their refunds, later, through the
    // same key's webhook); the delivery is due from the commit on.
    let key_index = key_index.filter(|_| received.txid.is_some());
    let received = StoredReceived { notified_key: key_index.clone(), ..received };
    let record = received.clone();
    let outbox = key_index.clone().map(|index| {
        let pix = super::api_pix::pix_notification(
            &received.end_to_end_id,
            received.amount,
            received.txid.as_deref(),
            received.description.as_deref(),
            now,
        );
        crate::webhook::outbox_record(tenant_id, &index, &received.end_to_end_id, None, &pix, now)
    });
    let records: store::RecordsFn = Box::new(move |reply| match reply.chain_result() {
        ledger::TransferResult::Created => {
            let mut records = vec![received_document(tenant_for, now, &record)];
            records.extend(concludes.as_ref().and_then(|d| concluded_cob(d, &record.end_to_end_id)));
            records.extend(outbox.clone());
            records
        }
        _ => vec![],
    });
    let answer =
        crate::routes::submit_guarded(&state, &audit, store::Command::Transfers(vec![event]), Some(records), guards)
            .await?;
    match answer.chain_result() {
        ledger::TransferResult::Created => {
            // The commit wrote the webhook's outbox entry: deliver it.
            if key_index.is_some() {
                crate::webhook::notify(&state, tenant_id, e2e.clone());
            }
            Ok(reply(StatusCode::CREATED, &IncomingView::from(received)))
        }
        // A request with the same EndToEndId committed first: answered as a repeat, with what it
        // stored.
        ledger::TransferResult::Exists => {
            let stored = query(&state, move |q| super::api_pix::read_received(q, tenant_id, &e2e))
                .await?
                .ok_or_else(|| Problem::unavailable("the Pix is being recorded; retry", 1))?;
            repeated(stored.1, &fingerprint, body.amount, &body.payer.ispb, &received.description)
        }
        failure => Err(crate::routes::ledger_problem(failure, "")),
    }
}

/// The answer to a Pix received again under its EndToEndId: its first answer when the message is
/// the same (by its fingerprint; by amount, payer institution and description for records of
/// earlier versions), else refused, as a transfer's id with a different body is.
fn repeated(
    existing: StoredReceived,
    fingerprint: &str,
    amount: u64,
    payer_ispb: &str,
    description: &Option<String>,
) -> Result<Response, Problem> {
    let same = match &existing.fingerprint {
        Some(stored) => stored == fingerprint,
        None => existing.amount == amount && existing.payer.ispb == payer_ispb && existing.description == *description,
    };
    if !same {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "exists_with_different_fields",
            "a Pix with this end_to_end_id was received with a different message (amount, receiver, payer or description)",
        )
        .field("end_to_end_id"));
    }
    Ok(reply(StatusCode::OK, &IncomingView::from(existing)))
}

// ---------------------------------------------------------------------------------------------
// Webhook secret and deliveries

#[derive(Serialize, ToSchema)]
pub struct WebhookSecretView {
    /// 64 hex digits: the HMAC-SHA256 key of `x-rtpay-signature: sha256=<hex>` over each
    /// notification's body.
    pub secret: String,
    pub header: String,
    /// The secret's generation: 0 until the first rotation.
    pub generation: u32,
    /// Until when the earlier secrets still in their rotations' overlaps sign too (more
    /// `sha256=` in the header), if one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<String>,
}

impl WebhookSecretView {
    fn of(state: &AppState, tenant: u128, generation: crate::webhook::SecretGeneration) -> WebhookSecretView {
        let now = store::now_nanos();
        WebhookSecretView {
            secret: crate::auth::hex(&crate::webhook::secret(state, tenant, generation.generation)),
            header: "x-rtpay-signature".into(),
            generation: generation.generation,
            previous_valid_until: generation.overlap_until(now).map(rfc3339),
        }
    }
}

#[utoipa::path(get, path = "/v1/pix/webhook-secret", tag = "pix",
    responses((status = 200, body = WebhookSecretView), (status = 503, body = Problem)), security(("api_key" = [])))]
pub async fn webhook_secret(State(state): State<AppState>, tenant: Tenant, audit: Audit) -> Result<Response, Problem> {
    // The key signs what the tenant's receivers trust: whoever holds it can forge a "Pix
    // received". Given to those who may configure webhooks, not to every reader, and each
    // reveal is written to the audit log.
    audit.0.set_resource("pix-webhook-secret");
    audit.0.record_read();
    tenant.require("webhook.write")?;
    let tenant_id = tenant.id;
    let (generation, _) = query(&state, move |q| crate::webhook::secret_generation(q, tenant_id)).await?;
    crate::routes::record_before_answer(&state, &audit, StatusCode::OK).await?;
    Ok(crate::json::secret_reply(StatusCode::OK, &WebhookSecretView::of(&state, tenant_id, generation)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecretBody {
    /// How long the secret before this one still signs (a second signature in each
    /// notification's header), in seconds: 0..=604800, default 86400.
    #[schema(minimum = 0, maximum = 604800)]
    pub overlap_seconds: Option<u64>,
}

/// Replaces the tenant's webhook secret (a leaked one, or on schedule): notifications are signed
/// under the new secret at once, and under the old one too until the overlap ends, so that the
/// receivers can take the new one on without refusing any. The new secret is in the answer (and
/// in `GET /v1/pix/webhook-secret`).
#[utoipa::path(post, path = "/v1/pix/webhook-secret/rotate", tag = "pix", request_body = RotateSecretBody,
    responses((status = 200, body = WebhookSecretView), (status = 409, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem)),
    security(("api_key" = [])))]
pub async fn rotate_webhook_secret(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Json(body): Json<RotateSecretBody>,
) -> Result<Response, Problem> {
    audit.0.set_resource("pix-webhook-secret");
    tenant.require("webhook.write")?;
    let overlap = body.overlap_seconds.unwrap_or(crate::webhook::OVERLAP_DEFAULT_SECONDS);
    if overlap > crate::webhook::OVERLAP_MAX_SECONDS {
        return Err(Problem::invalid(
            "overlap_seconds",
            "invalid_field",
            format!("must be an integer in 0..={} (seconds)", crate::webhook::OVERLAP_MAX_SECONDS),
        ));
    }
    let tenant_id = tenant.id;
    let rotated = query(&state, move |q| {
        crate::webhook::rotate_secret(q, tenant_id, store::now_nanos(), overlap.saturating_mul(1_000_000_000))
    })
    .await?
    .ok_or_else(|| {
        Problem::new(StatusCode::CONFLICT, "rotation_raced", "another rotation of the secret was stored first; read it")
    })?;
    Ok(crate::json::secret_reply(StatusCode::OK, &WebhookSecretView::of(&state, tenant_id, rotated)))
}

#[utoipa::path(get, path = "/v1/pix/webhook-deliveries/{e2e}", tag = "pix", params(("e2e" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn webhook_delivery(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(e2e): Path<String>,
) -> Result<Response, Problem> {
    // A delivery names the receiver's URL, which the API Pix shows only under `webhook.read`.
    tenant.require("webhook.read")?;
    let tenant_id = tenant.id;
    let doc = query(&state, move |q| q.document(crate::webhook::DELIVERY_KIND, tenant_id, &e2e))
        .await?
        .ok_or_else(|| Problem::not_found("webhook delivery"))?;
    let delivery: crate::webhook::Delivery = serde_json::from_str(&doc.body).map_err(|_| Problem::internal())?;
    Ok(reply(StatusCode::OK, &delivery))
}

/// Sends a delivered or failed notification again, from its first attempt: for a receiver that
/// was away longer than the retries last, or lost what it got. 202 with the delivery, `pending`.
#[utoipa::path(post, path = "/v1/pix/webhook-deliveries/{e2e}/retry", tag = "pix", params(("e2e" = String, Path)),
    responses((status = 202, body = Object), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 503, body = Problem)),
    security(("api_key" = [])))]
pub async fn webhook_redeliver(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    // An EndToEndId is named as sent; anything else (a refund id, raw input) with card-like
    // digits masked.
    let named = match id.split_once(':') {
        _ if !crate::webhook::is_delivery_id(&id) => crate::audit_trail::client_id(&id),
        Some((e2e, refund)) => format!("{e2e}:{}", crate::audit_trail::client_id(refund)),
        None => id.clone(),
    };
    audit.0.set_resource(format!("pix-webhook-delivery:{named}"));
    tenant.require("webhook.write")?;
    match crate::webhook::redeliver(&state, tenant.id, id).await {
        Ok(delivery) => Ok(reply(StatusCode::ACCEPTED, &delivery)),
        Err(crate::webhook::Redelivery::NotFound) => Err(Problem::not_found("webhook delivery")),
        Err(crate::webhook::Redelivery::Pending) => Err(Problem::new(
            StatusCode::CONFLICT,
            "delivery_pending",
            "the notification is being delivered: its attempts are under way",
        )),
        Err(crate::webhook::Redelivery::NoWebhook) => Err(Problem::new(
            StatusCode::CONFLICT,
            "no_webhook",
            "the Pix's key has no webhook now: configure one (PUT /api/v2/webhook/{chave}) first",
        )),
        Err(crate::webhook::Redelivery::Unavailable(why)) => Err(Problem::unavailable(why, 1)),
    }
}
