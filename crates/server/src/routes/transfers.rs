//! Transfers: create, batch, post or void a hold, read.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use ledger::{Entry, EventKind, Outcome, TransferEvent, TransferId, TransferKey, TransferResult, BATCH_LEN_MAX};
use store::{Command, Reply};

use crate::audit_trail::Audit;
use crate::auth::Tenant;
use crate::dto::*;
use crate::json::{reply, reply_json, Json, Path};
use crate::problem::Problem;
use crate::routes::{ledger_problem, query, submit};
use crate::AppState;

/// Submits `events` (a batch's items when `batch`, else one transfer of its own route).
async fn apply(
    state: &AppState,
    audit: &Audit,
    events: Vec<TransferEvent>,
    batch: bool,
) -> Result<Vec<Outcome>, Problem> {
    refuse_rail_holds(state, &events, batch).await?;
    match submit(state, audit, Command::Transfers(events)).await? {
        Reply::Transfers(outcomes) => Ok(outcomes),
        _ => Err(Problem::internal()),
    }
}

/// A hold a rail made (a Pix payment's, a MED block, a card authorization's) is posted or voided
/// by that rail alone, on the network's word: refused here (422 on the item's `pending_id`).
/// A hold's code never changes, so reading it before the commit is enough.
async fn refuse_rail_holds(state: &AppState, events: &[TransferEvent], batch: bool) -> Result<(), Problem> {
    // The field naming each hold: the path's `pending_id`, or the batch item's.
    let field = |i: usize, post: bool| match (batch, post) {
        (false, _) => "pending_id".to_owned(),
        (true, true) => format!("transfers[{i}].post_pending_id"),
        (true, false) => format!("transfers[{i}].void_pending_id"),
    };
    let holds: Vec<(String, TransferKey)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e.kind {
            EventKind::PostPending { pending_id, .. } => Some((field(i, true), pending_id, e.key.tenant)),
            EventKind::VoidPending { pending_id } => Some((field(i, false), pending_id, e.key.tenant)),
            _ => None,
        })
        .map(|(field, id, tenant)| (field, TransferKey { tenant, id }))
        .collect();
    if holds.is_empty() {
        return Ok(());
    }
    let railed = query(state, move |q| {
        for (field, key) in holds {
            if let Some(Entry::Created(t)) = q.entry(key)? {
                if crate::dto::RAIL_CODES.contains(&t.code) {
                    return Ok(Some(field));
                }
            }
        }
        Ok(None)
    })
    .await?;
    match railed {
        None => Ok(()),
        Some(field) => Err(Problem::invalid(
            field.clone(),
            "rail_hold",
            format!("`{field}` names a hold of the Pix or card rail: only the rail posts or voids it"),
        )),
    }
}

/// A transfer as its creation's answer showed it: a hold is `pending` then, whatever became of it
/// since. An exact repeat gets the body its first request got (a client retrying a create whose
/// answer it lost learns what that answer said); `GET` shows the transfer as it is now.
fn as_created(t: &ledger::Transfer) -> std::borrow::Cow<'_, ledger::Transfer> {
    if t.kind == ledger::TransferKind::Pending && t.state != ledger::PendingState::Pending {
        let mut first = t.clone();
        first.state = ledger::PendingState::Pending;
        std::borrow::Cow::Owned(first)
    } else {
        std::borrow::Cow::Borrowed(t)
    }
}

fn single(outcome: Option<Outcome>) -> Result<Response, Problem> {
    let outcome = outcome.ok_or_else(Problem::internal)?;
    match (outcome.result, outcome.transfer) {
        (TransferResult::Created, Some(t)) => Ok(reply_json(StatusCode::CREATED, TransferView::json(&t))),
        (TransferResult::Exists, Some(t)) => Ok(reply_json(StatusCode::OK, TransferView::json(&as_created(&t)))),
        (code, _) => Err(ledger_problem(code, "")),
    }
}

#[utoipa::path(post, path = "/v1/transfers", tag = "transfers", request_body = TransferBody,
    responses((status = 201, body = TransferView), (status = 200, body = TransferView, description = "exact repeat"),
        (status = 409, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)),
    security(("api_key" = [])))]
pub async fn create_transfer(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Json(body): Json<TransferBody>,
) -> Result<Response, Problem> {
    tenant.require("transfers:write")?;
    let event = body.into_event(tenant.ledger_id())?;
    // Only parsed ids reach the audit log: raw input could be anything, a card number included.
    audit.0.set_resource(uuid_string(event.key.id.0));
    single(apply(&state, &audit, vec![event], false).await?.into_iter().next())
}

async fn resolve(
    state: AppState,
    tenant: Tenant,
    audit: Audit,
    pending_id: String,
    body: ResolveBody,
    post: bool,
) -> Result<Response, Problem> {
    let pending_id = TransferId(parse_id("pending_id", &pending_id)?);
    let kind = if post {
        EventKind::PostPending { pending_id, amount: body.amount.map(|a| check_amount("amount", a)).transpose()? }
    } else {
        if body.amount.is_some() {
            return Err(Problem::invalid("amount", "field_not_allowed", "`amount` is not allowed when voiding a hold"));
        }
        EventKind::VoidPending { pending_id }
    };
    let event =
        EventParts { prefix: "", tenant: tenant.ledger_id(), id: &body.id, code: body.code, metadata: body.metadata }
            .finish(kind)?;
    audit.0.set_resource(format!("{} (hold {})", uuid_string(event.key.id.0), uuid_string(pending_id.0)));
    single(apply(&state, &audit, vec![event], false).await?.into_iter().next())
}

#[utoipa::path(post, path = "/v1/transfers/{pending_id}/post", tag = "transfers", request_body = ResolveBody,
    params(("pending_id" = String, Path)),
    responses((status = 201, body = TransferView), (status = 200, body = TransferView), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = [])))]
pub async fn post_pending(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(pending_id): Path<String>,
    Json(body): Json<ResolveBody>,
) -> Result<Response, Problem> {
    tenant.require("transfers:write")?;
    resolve(state, tenant, audit, pending_id, body, true).await
}

#[utoipa::path(post, path = "/v1/transfers/{pending_id}/void", tag = "transfers", request_body = crate::dto::VoidBody,
    params(("pending_id" = String, Path)),
    responses((status = 201, body = TransferView), (status = 200, body = TransferView), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = [])))]
pub async fn void_pending(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path(pending_id): Path<String>,
    Json(body): Json<ResolveBody>,
) -> Result<Response, Problem> {
    tenant.require("transfers:write")?;
    resolve(state, tenant, audit, pending_id, body, false).await
}

#[utoipa::path(post, path = "/v1/transfers/batch", tag = "transfers", request_body = BatchBody,
    responses((status = 200, body = BatchView, description = "one result per transfer, in order"),
        (status = 422, body = Problem, description = "an invalid item: nothing was applied")),
    security(("api_key" = [])))]
pub async fn create_batch(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Json(body): Json<BatchBody>,
) -> Result<Response, Problem> {
    tenant.require("transfers:write")?;
    if body.transfers.is_empty() || body.transfers.len() > BATCH_LEN_MAX {
        return Err(Problem::invalid(
            "transfers",
            "invalid_batch_len",
            format!("`transfers` must hold 1..={BATCH_LEN_MAX} items"),
        ));
    }
    let linked = body.linked.unwrap_or(false);
    let mut events: Vec<TransferEvent> = Vec::with_capacity(body.transfers.len());
    // An id given twice must name the same transfer both times: two different bodies under one id
    // are a conflict the request shows alone, refused whole (unlinked, the first would be applied
    // and the second answered `exists_with_different_fields`).
    let mut first_of = std::collections::HashMap::with_capacity(body.transfers.len());
    for (index, item) in body.transfers.into_iter().enumerate() {
        let mut event = item.into_event(index, tenant.ledger_id())?;
        event.linked = linked;
        if let Some(&first) = first_of.get(&event.key.id) {
            if events[first] != event {
                return Err(Problem::invalid(
                    format!("transfers[{index}].id"),
                    "duplicate_id",
                    format!("transfers[{first}] has this id with another body: one id names one transfer"),
                ));
            }
        } else {
            first_of.insert(event.key.id, index);
        }
        events.push(event);
    }
    if let Some(last) = events.last_mut() {
        last.linked = false;
    }
    let first = events.first().map(|e| uuid_string(e.key.id.0)).unwrap_or_default();
    audit.0.set_resource(format!("{} transfers from {first}", events.len()));
    let ids: Vec<TransferId> = events.iter().map(|e| e.key.id).collect();
    let outcomes = apply(&state, &audit, events, true).await?;
    let results = outcomes
        .into_iter()
        .zip(ids)
        .enumerate()
        .map(|(index, (o, id))| BatchResult {
            index,
            id: uuid_string(id.0),
            result: o.result.as_str(),
            transfer: o.transfer.as_ref().map(|t| match o.result {
                TransferResult::Exists => TransferView::of(&as_created(t)),
                _ => TransferView::of(t),
            }),
        })
        .collect();
    Ok(reply(StatusCode::OK, &BatchView { results }))
}

#[utoipa::path(get, path = "/v1/transfers/{id}", tag = "transfers", params(("id" = String, Path)),
    responses((status = 200, body = TransferView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_transfer(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("transfers:read")?;
    let key = TransferKey { tenant: tenant.ledger_id(), id: TransferId(parse_id("id", &id)?) };
    match query(&state, move |q| q.entry(key)).await? {
        Some(Entry::Created(t)) => Ok(reply_json(StatusCode::OK, TransferView::json(&t))),
        // A remembered failure is not a transfer.
        Some(Entry::Failed { .. }) | None => Err(Problem::not_found("transfer")),
    }
}
