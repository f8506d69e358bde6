//! Account holders: a person (CPF) or a company (CNPJ), stored only through the vault; outputs
//! show the document masked.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit_trail::Audit;
use crate::auth::{new_uuid, Tenant};
use crate::dto::{parse_id, rfc3339, uuid_string};
use crate::json::{reply, Json, Path};
use crate::problem::Problem;
use crate::routes::query;
use crate::routes::tenants::idempotency_key;
use crate::vault_service::VaultFailure;
use crate::AppState;

pub const HOLDER_NAME_LEN_MAX: usize = 200;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HolderBody {
    #[schema(format = Uuid)]
    pub id: Option<String>,
    /// `person` (document: CPF) or `company` (document: CNPJ, numeric or alphanumeric).
    #[schema(value_type = HolderKind)]
    pub kind: String,
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub name: String,
    /// The CPF (11 digits) or CNPJ (14 characters), with or without punctuation; its check digits
    /// are verified.
    pub document: String,
}

/// A holder's kind, for the document (the body reads it as text and names the field when it is
/// neither).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum HolderKind {
    Person,
    Company,
}

#[derive(Serialize, ToSchema)]
pub struct HolderView {
    pub id: String,
    pub kind: String,
    pub name: String,
    /// Masked: `***.982.247-**`, `**.222.333/0001-**`.
    pub document: String,
    /// Where the holder is, once set (`PUT /v1/holders/{id}/address`): a receiver's charges with a
    /// due date (API Pix `cobv`) show it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    pub created_at: String,
}

/// A Brazilian postal address, as the API Pix's `logradouro`, `cidade`, `uf` and `cep`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// 1 to 200 characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub street: String,
    /// 1 to 200 characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub city: String,
    /// The federative unit: `SP`, `RJ`, ... (27 of them).
    #[schema(pattern = "^(AC|AL|AP|AM|BA|CE|DF|ES|GO|MA|MT|MS|MG|PA|PB|PR|PE|PI|RJ|RN|RS|RO|RR|SC|SP|SE|TO)$")]
    pub state: String,
    /// The CEP: 8 digits.
    #[schema(pattern = "^[0-9]{8}$")]
    pub postal_code: String,
}

pub const ADDRESS_KIND: &str = "holder-address";
const UFS: [&str; 27] = [
    "AC", "AL", "AP", "AM", "BA", "CE", "DF", "ES", "GO", "MA", "MT", "MS", "MG", "PA", "PB", "PR", "PE", "PI", "RJ",
    "RN", "RS", "RO", "RR", "SC", "SP", "SE", "TO",
];

impl Address {
    /// Checks each field; trims the texts.
    pub fn checked(self) -> Result<Address, Problem> {
        let street = crate::dto::display_name("street", &self.street, 200)?;
        let city = crate::dto::display_name("city", &self.city, 200)?;
        if !UFS.contains(&self.state.as_str()) {
            return Err(Problem::invalid(
                "state",
                "invalid_state",
                "`state` must be a federative unit: SP, RJ, MG, ...",
            ));
        }
        if self.postal_code.len() != 8 || !self.postal_code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Problem::invalid(
                "postal_code",
                "invalid_postal_code",
                "`postal_code` must be a CEP: 8 digits",
            ));
        }
        Ok(Address { street, city, ..self })
    }
}

#[derive(Serialize, Deserialize)]
struct StoredAddress {
    /// The address as JSON, sealed under the tenant's data key, base64.
    sealed: String,
}

/// The holder's address, if set. Blocking.
pub fn read_address(
    vault: &crate::vault_service::VaultService,
    q: &dyn store::Queries,
    tenant: u128,
    holder: u128,
) -> Result<Option<Address>, VaultFailure> {
    let Some(doc) = q.document(ADDRESS_KIND, tenant, &uuid_string(holder))? else { return Ok(None) };
    let corrupt = || VaultFailure::Store(store::StoreError::Corrupt("a holder's address".into()));
    let stored: StoredAddress = serde_json::from_str(&doc.body).map_err(|_| corrupt())?;
    let sealed = crate::oauth::base64_decode(&stored.sealed).ok_or_else(corrupt)?;
    let dek = vault.data_key(q, tenant)?;
    let plain = vault::open(&dek, &record_id(tenant, holder, "address"), &sealed)?;
    Ok(Some(serde_json::from_slice(&plain).map_err(|_| corrupt())?))
}

pub(crate) fn record_id(tenant: u128, id: u128, field: &str) -> Vec<u8> {
    let mut out = tenant.to_be_bytes().to_vec();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(field.as_bytes());
    out
}

#[utoipa::path(post, path = "/v1/holders", tag = "holders", request_body = HolderBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes a creation without `id` safe to retry")),
    responses((status = 201, body = HolderView), (status = 200, body = HolderView, description = "an exact repeat"),
        (status = 409, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)),
    security(("api_key" = [])))]
pub async fn create_holder(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    headers: HeaderMap,
    Json(body): Json<HolderBody>,
) -> Result<Response, Problem> {
    tenant.require("holders:write")?;
    let vault = state.vault.clone().ok_or_else(|| Problem::unavailable("the vault is not configured", 60))?;
    let document = match body.kind.as_str() {
        "person" => pix::document::cpf(&body.document),
        "company" => pix::document::cnpj(&body.document),
        _ => return Err(Problem::invalid("kind", "invalid_kind", "`kind` must be `person` or `company`")),
    }
    .map_err(|e| {
        let what = if body.kind == "person" { "CPF" } else { "CNPJ" };
        Problem::invalid("document", "invalid_document", format!("`document` is not a valid {what}: {e}"))
    })?;
    let name = crate::dto::display_name("name", &body.name, HOLDER_NAME_LEN_MAX)?;
    let id = match (&body.id, idempotency_key(&headers)?) {
        (Some(id), _) => parse_id("id", id)?,
        (None, Some(key)) => state.keys.derived_id(b"holder", tenant.id, &key).as_u128(),
        (None, None) => new_uuid().as_u128(),
    };
    audit.0.set_resource(uuid_string(id));
    let (tenant_id, kind) = (tenant.id, body.kind.clone());
    let masked = vault::mask::document(&document);
    let created_at = store::now_nanos();
    let (name_out, kind_out) = (name.clone(), kind.clone());
    let result = query(&state, move |q| {
        let outcome = (|| -> Result<Option<(u64, Option<Address>)>, VaultFailure> {
            let dek = vault.data_key(q, tenant_id)?;
            let record = store::HolderRecord {
                tenant_id,
                id,
                kind,
                name_sealed: vault::seal(&dek, &record_id(tenant_id, id, "name"), name.as_bytes())?,
                document_sealed: vault::seal(&dek, &record_id(tenant_id, id, "document"), document.as_bytes())?,
                document_index: vault.index().of(b"document", document.as_bytes()),
                created_at,
            };
            match q.create_holder(&record) {
                Ok(()) => Ok(None),
                Err(store::StoreError::Conflict(e)) => {
                    // A repeat (a retry with its id or `Idempotency-Key`) finds the holder it made.
                    let conflict = || VaultFailure::Store(store::StoreError::Conflict(e.clone()));
                    let Some(h) = q.holder(tenant_id, id)?.filter(|h| h.kind == record.kind) else {
                        return Err(conflict());
                    };
                    let same_name =
                        vault::open(&dek, &record_id(tenant_id, id, "name"), &h.name_sealed)? == name.as_bytes();
                    let same_document = vault::open(&dek, &record_id(tenant_id, id, "document"), &h.document_sealed)?
                        == document.as_bytes();
                    if !(same_name && same_document) {
                        return Err(conflict());
                    }
                    Ok(Some((h.created_at, read_address(&vault, q, tenant_id, id)?)))
                }
                Err(e) => Err(e.into()),
            }
        })();
        Ok(outcome)
    })
    .await?;
    let view = |created_at, address| HolderView {
        id: uuid_string(id),
        kind: kind_out,
        name: name_out,
        document: masked,
        address,
        created_at: rfc3339(created_at),
    };
    match result {
        Ok(None) => Ok(reply(StatusCode::CREATED, &view(created_at, None))),
        Ok(Some((created_at, address))) => Ok(reply(StatusCode::OK, &view(created_at, address))),
        Err(VaultFailure::Store(store::StoreError::Conflict(_))) => Err(Problem::new(
            StatusCode::CONFLICT,
            "exists",
            "a holder with this id exists with another name or document, or another holder has this document \
             in this tenant",
        )
        .field("document")),
        Err(f) => Err(Problem::from(f)),
    }
}

#[utoipa::path(get, path = "/v1/holders/{id}", tag = "holders", params(("id" = String, Path)),
    responses((status = 200, body = HolderView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_holder(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("holders:read")?;
    let vault = state.vault.clone().ok_or_else(|| Problem::unavailable("the vault is not configured", 60))?;
    let id = parse_id("id", &id)?;
    let tenant_id = tenant.id;
    let found = query(&state, move |q| {
        let Some(h) = q.holder(tenant_id, id)? else { return Ok(None) };
        let opened = (|| -> Result<(String, String, Option<Address>), VaultFailure> {
            let dek = vault.data_key(q, tenant_id)?;
            let name = vault::open(&dek, &record_id(tenant_id, id, "name"), &h.name_sealed)?;
            let document = vault::open(&dek, &record_id(tenant_id, id, "document"), &h.document_sealed)?;
            let address = read_address(&vault, q, tenant_id, id)?;
            Ok((String::from_utf8_lossy(&name).into_owned(), String::from_utf8_lossy(&document).into_owned(), address))
        })();
        Ok(Some((h.kind, h.created_at, opened)))
    })
    .await?;
    let (kind, created_at, opened) = found.ok_or_else(|| Problem::not_found("holder"))?;
    let (name, document, address) = opened.map_err(Problem::from)?;
    Ok(reply(
        StatusCode::OK,
        &HolderView {
            id: uuid_string(id),
            kind,
            name,
            document: vault::mask::document(&document),
            address,
            created_at: rfc3339(created_at),
        },
    ))
}

#[utoipa::path(put, path = "/v1/holders/{id}/address", tag = "holders", params(("id" = String, Path)),
    request_body = Address,
    responses((status = 200, body = Address), (status = 404, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem)),
    security(("api_key" = [])))]
pub async fn set_address(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(id): Path<String>,
    Json(body): Json<Address>,
) -> Result<Response, Problem> {
    tenant.require("holders:write")?;
    let vault = state.vault.clone().ok_or_else(|| Problem::unavailable("the vault is not configured", 60))?;
    let id = parse_id("id", &id)?;
    let address = body.checked()?;
    audit.0.set_resource(uuid_string(id));
    let tenant_id = tenant.id;
    let shown = address.clone();
    let outcome = query(&state, move |q| {
        Ok((|| -> Result<Result<(), Problem>, VaultFailure> {
            if q.holder(tenant_id, id)?.is_none() {
                return Ok(Err(Problem::not_found("holder")));
            }
            let dek = vault.data_key(q, tenant_id)?;
            let plain = serde_json::to_vec(&address).expect("serializable");
            let sealed = vault::seal(&dek, &record_id(tenant_id, id, "address"), &plain)?;
            let body = serde_json::to_string(&StoredAddress { sealed: crate::oauth::base64_encode(&sealed) })
                .expect("serializable");
            for _ in 0..3 {
                let (expected, next) = match q.document(ADDRESS_KIND, tenant_id, &uuid_string(id))? {
                    Some(doc) => (doc.version, store::Document { version: doc.version + 1, body: body.clone(), ..doc }),
                    None => (
                        0,
                        store::Document {
                            kind: ADDRESS_KIND.into(),
                            tenant_id,
                            id: uuid_string(id),
                            lookup: None,
                            owner: None,
                            created_at: store::now_nanos(),
                            version: 1,
                            body: body.clone(),
                        },
                    ),
                };
                if q.put_document(&next, expected)? {
                    return Ok(Ok(()));
                }
            }
            Ok(Err(Problem::unavailable("the address changed meanwhile; retry", 1)))
        })())
    })
    .await?;
    outcome.map_err(Problem::from)??;
    Ok(reply(StatusCode::OK, &shown))
}
