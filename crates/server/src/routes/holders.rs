//! Account holders: a person (CPF) or a company (CNPJ), stored only through the vault; outputs
//! show the document masked.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit_trail::Audit;
use crate::auth::{new_uuid, Tenant};
use crate::dto::{parse_id, rfc3339, uuid_string};
use crate::json::{reply, Json, Path};
use crate::problem::Problem;
use crate::routes::query;
use crate::vault_service::VaultFailure;
use crate::AppState;

pub const HOLDER_NAME_LEN_MAX: usize = 200;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HolderBody {
    pub id: Option<String>,
    /// `person` (document: CPF) or `company` (document: CNPJ, numeric or alphanumeric).
    pub kind: String,
    pub name: String,
    pub document: String,
}

#[derive(Serialize, ToSchema)]
pub struct HolderView {
    pub id: String,
    pub kind: String,
    pub name: String,
    /// Masked: `***.982.247-**`, `**.222.333/0001-**`.
    pub document: String,
    pub created_at: String,
}

pub(crate) fn record_id(tenant: u128, id: u128, field: &str) -> Vec<u8> {
    let mut out = tenant.to_be_bytes().to_vec();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(field.as_bytes());
    out
}

#[utoipa::path(post, path = "/v1/holders", tag = "holders", request_body = HolderBody,
    responses((status = 201, body = HolderView), (status = 409, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem)),
    security(("api_key" = [])))]
pub async fn create_holder(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
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
    let id = match &body.id {
        Some(id) => parse_id("id", id)?,
        None => new_uuid().as_u128(),
    };
    audit.0.set_resource(uuid_string(id));
    let (tenant_id, kind) = (tenant.id, body.kind.clone());
    let masked = vault::mask::document(&document);
    let created_at = store::now_nanos();
    let (name_out, kind_out) = (name.clone(), kind.clone());
    let result = query(&state, move |q| {
        let outcome = (|| -> Result<(), VaultFailure> {
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
            q.create_holder(&record)?;
            Ok(())
        })();
        Ok(outcome)
    })
    .await?;
    match result {
        Ok(()) => Ok(reply(
            StatusCode::CREATED,
            &HolderView {
                id: uuid_string(id),
                kind: kind_out,
                name: name_out,
                document: masked,
                created_at: rfc3339(created_at),
            },
        )),
        Err(VaultFailure::Store(store::StoreError::Conflict(_))) => Err(Problem::new(
            StatusCode::CONFLICT,
            "exists",
            "a holder with this id, or with this document, exists in this tenant",
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
        let opened = (|| -> Result<(String, String), VaultFailure> {
            let dek = vault.data_key(q, tenant_id)?;
            let name = vault::open(&dek, &record_id(tenant_id, id, "name"), &h.name_sealed)?;
            let document = vault::open(&dek, &record_id(tenant_id, id, "document"), &h.document_sealed)?;
            Ok((String::from_utf8_lossy(&name).into_owned(), String::from_utf8_lossy(&document).into_owned()))
        })();
        Ok(Some((h.kind, h.created_at, opened)))
    })
    .await?;
    let (kind, created_at, opened) = found.ok_or_else(|| Problem::not_found("holder"))?;
    let (name, document) = opened.map_err(Problem::from)?;
    Ok(reply(
        StatusCode::OK,
        &HolderView {
            id: uuid_string(id),
            kind,
            name,
            document: vault::mask::document(&document),
            created_at: rfc3339(created_at),
        },
    ))
}
