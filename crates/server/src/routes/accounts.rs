//! Accounts: open, read, close, list their transfers.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use ledger::{AccountCommand, AccountId, AccountKey, AccountResult};
use store::{Command, Reply};

use crate::audit_trail::Audit;
use crate::auth::{new_uuid, Tenant};
use crate::dto::*;
use crate::json::{reply, Json, Params, Path};
use crate::problem::Problem;
use crate::routes::{cursor_of, page_params, query, submit, tenants::idempotency_key};
use crate::AppState;

#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", request_body = AccountBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes a creation without `id` safe to retry")),
    responses((status = 201, body = AccountView), (status = 200, body = AccountView, description = "exists, same fields"),
        (status = 409, body = Problem), (status = 422, body = Problem), (status = 401, body = Problem)),
    security(("api_key" = [])))]
pub async fn create_account(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    headers: HeaderMap,
    Json(body): Json<AccountBody>,
) -> Result<Response, Problem> {
    tenant.require("accounts:write")?;
    let key = idempotency_key(&headers)?;
    // What named the account: a conflict names it back.
    let named_by = if body.id.is_none() && key.is_some() { "Idempotency-Key" } else { "id" };
    let new = body.into_new(tenant.ledger_id(), || match &key {
        Some(key) => state.keys.derived_id(b"account", tenant.id, key).as_u128(),
        None => new_uuid().as_u128(),
    })?;
    audit.0.set_resource(uuid_string(new.key.id.0));
    if let Some(holder) = new.holder {
        // Holders are never deleted, so a holder seen here still exists when the account is made.
        if query(&state, move |q| q.holder(tenant.id, holder)).await?.is_none() {
            return Err(Problem::invalid("holder_id", "unknown_holder", "`holder_id` names no holder of this tenant"));
        }
    }
    let Reply::Accounts(results) = submit(&state, &audit, Command::Accounts(vec![AccountCommand::Create(new)])).await?
    else {
        return Err(Problem::internal());
    };
    match results.into_iter().next() {
        Some((AccountResult::Created, Some(a))) => Ok(reply(StatusCode::CREATED, &AccountView::of(&a))),
        Some((AccountResult::Exists, Some(a))) => Ok(reply(StatusCode::OK, &AccountView::of(&a))),
        Some((AccountResult::ExistsWithDifferentFields, _)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "exists_with_different_fields",
            "an account with this id exists with different fields",
        )
        .field(named_by)),
        Some((code, _)) => Err(Problem::invalid("id", code.as_str(), format!("the account was refused: {code}"))),
        None => Err(Problem::internal()),
    }
}

fn account_key(tenant: &Tenant, id: &str) -> Result<AccountKey, Problem> {
    Ok(AccountKey { tenant: tenant.ledger_id(), id: AccountId(parse_id("id", id)?) })
}

#[utoipa::path(get, path = "/v1/accounts/{id}", tag = "accounts", params(("id" = String, Path)),
    responses((status = 200, body = AccountView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_account(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("accounts:read")?;
    let key = account_key(&tenant, &id)?;
    match query(&state, move |q| q.account(key)).await? {
        Some(a) => Ok(reply(StatusCode::OK, &AccountView::of(&a))),
        None => Err(Problem::not_found("account")),
    }
}

#[utoipa::path(post, path = "/v1/accounts/{id}/close", tag = "accounts", params(("id" = String, Path)),
    responses((status = 200, body = AccountView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn close_account(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("accounts:write")?;
    let key = account_key(&tenant, &id)?;
    audit.0.set_resource(uuid_string(key.id.0));
    // A rail's settlement account (the SPI's or the card network's side of the tenant's
    // payments) stays open: closed, every incoming Pix would be refused for good (the refusal is
    // remembered under its EndToEndId), every payment out and capture too. Its id is derived
    // from the tenant and its currency, so it cannot name another account.
    if let Some(account) = query(&state, move |q| q.account(key)).await? {
        let currency = account.currency;
        let rail = key == crate::pix_rail::settlement_key(&state, tenant.id)
            || key == crate::card_network::settlement_key(&state, tenant.id, currency);
        if rail {
            return Err(Problem::invalid(
                "id",
                "rail_account",
                "`id` names a settlement account of the Pix or card rail, which stays open",
            ));
        }
    }
    let Reply::Accounts(results) = submit(&state, &audit, Command::Accounts(vec![AccountCommand::Close(key)])).await?
    else {
        return Err(Problem::internal());
    };
    match results.into_iter().next() {
        Some((AccountResult::Closed | AccountResult::AlreadyClosed, Some(a))) => {
            Ok(reply(StatusCode::OK, &AccountView::of(&a)))
        }
        _ => Err(Problem::not_found("account")),
    }
}

#[utoipa::path(get, path = "/v1/accounts/{id}/transfers", tag = "accounts",
    params(("id" = String, Path), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "1..=1000, default 50"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page")),
    responses((status = 200, body = TransferPage), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = [])))]
pub async fn list_account_transfers(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Params(params): Params,
) -> Result<Response, Problem> {
    tenant.require("accounts:read")?;
    let key = account_key(&tenant, &id)?;
    let page = page_params(&params)?;
    let result = query(&state, move |q| {
        if q.account(key)?.is_none() {
            return Ok(None);
        }
        q.account_transfers(key, page).map(Some)
    })
    .await?;
    let Some(transfers) = result else { return Err(Problem::not_found("account")) };
    let Some(transfers) = transfers else {
        return Err(Problem::invalid(
            "cursor",
            "invalid_cursor",
            "`cursor` must be a `next_cursor` of this account's listing",
        ));
    };
    let next_cursor =
        (transfers.len() == page.limit).then(|| transfers.last().map(|t| cursor_of(t.timestamp))).flatten();
    Ok(reply(StatusCode::OK, &TransferPage { data: transfers.iter().map(TransferView::of).collect(), next_cursor }))
}
