//! MED, the Central Bank's special return mechanism: a fraud claim on a received Pix places a
//! cautionary block on the receiver's funds (up to the Pix's amount less what was refunded, at
//! most what the account has, for at most 72 hours), then either returns them to the payer as a
//! refund of nature `MED_FRAUDE` or releases them. The block is a ledger hold (a pending transfer
//! with a 72-hour timeout, so it lapses by itself), the return posts it, the release voids it;
//! each step is a writer commit with its audit entry.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use ledger::{AccountId, AccountKey, EventKind, PendingState, TenantId, TransferEvent, TransferId, TransferKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api_pix::{read_received, refunds_of, RefundDoc, StoredRefund, REFUND_KIND};
use crate::audit_trail::Audit;
use crate::auth::Tenant;
use crate::dto::{rfc3339, uuid_string};
use crate::json::{reply, Json, Path};
use crate::pix_rail::*;
use crate::problem::Problem;
use crate::routes::query;
use crate::AppState;

pub const MED_KIND: &str = "pix-med";
/// How long a cautionary block may hold the funds.
pub const BLOCK_SECONDS: u32 = 72 * 3600;
pub const REASON_LEN_MAX: usize = 140;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MedBody {
    /// The received Pix the claim is about.
    pub end_to_end_id: String,
    /// Centavos to block (at most what may be blocked: more is taken as all); default: all that
    /// may be.
    #[schema(minimum = 1)]
    pub amount: Option<u64>,
    #[schema(
        min_length = 1,
        max_length = 140,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub reason: String,
}

/// A claim as stored and shown.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct MedView {
    pub end_to_end_id: String,
    /// This claim's id: its ledger transfers are named after it, so a claim whose hold failed
    /// (the funds left between the check and the commit) can be made again.
    pub claim_id: String,
    /// `blocked`, `returned`, `released` (by the receiver's institution, or the 72 hours lapsed),
    /// `return_failed` (returned through the SPI, which refused it: the money went back to the
    /// receiver, and a claim may be opened again).
    pub status: String,
    /// Centavos held.
    pub amount: u64,
    pub reason: String,
    pub blocked_at: String,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<String>,
    /// The refund (`MED_FRAUDE`) of a return, as `/api/v2/pix/{e2eid}` lists it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<String>,
}

/// The claim's `n`th transfer: 1 the hold, 2 its post (return), 3 the payer's credit in another
/// tenant, 4 its void (release), 6 the credit back of a return another institution's SPI refused.
fn hold_key(state: &AppState, tenant: u128, claim: &str, n: u32) -> TransferKey {
    TransferKey {
        tenant: TenantId(tenant),
        id: TransferId(state.keys.derived_id(b"pix-med", tenant, &format!("{claim}:{n}")).as_u128()),
    }
}

fn med_document(tenant: u128, at: u64, version: u64, view: &MedView) -> store::Record {
    store::Record::Document(store::Document {
        kind: MED_KIND.into(),
        tenant_id: tenant,
        id: view.end_to_end_id.clone(),
        lookup: None,
        owner: None,
        created_at: at,
        version,
        body: serde_json::to_string(view).expect("serializable"),
    })
}

/// The claim, with the ledger's word on a block that lapsed.
fn read_med(
    state: &AppState,
    q: &dyn store::Queries,
    tenant: u128,
    e2e: &str,
) -> store::Result<Option<(store::Document, MedView)>> {
    let Some(doc) = q.document(MED_KIND, tenant, e2e)? else { return Ok(None) };
    let mut view: MedView = serde_json::from_str(&doc.body).map_err(|e| store::StoreError::Corrupt(e.to_string()))?;
    if view.status == "blocked" {
        if let Some(ledger::Entry::Created(hold)) = q.entry(hold_key(state, tenant, &view.claim_id, 1))? {
            if hold.state == PendingState::Expired {
                view.status = "released".into();
            }
        }
    }
    Ok(Some((doc, view)))
}

fn lock_of(state: &AppState, tenant: u128, e2e: &str) -> u128 {
    // The refunds' lock: a block and refunds of one Pix share the received amount.
    state.keys.derived_id(b"pix-refund-lock", tenant, e2e).as_u128()
}

/// Where a returned block goes: the payer's account on us in the same tenant, else the tenant's
/// settlement account (and from the payer's tenant's settlement to the payer, when on us).
fn payer_of(received: &StoredReceived) -> Result<Option<(u128, u128)>, Problem> {
    super::api_pix::payer_here(received).map_err(Problem::from)
}

#[utoipa::path(post, path = "/v1/pix/med", tag = "pix", request_body = MedBody,
    responses((status = 201, body = MedView), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem)), security(("api_key" = [])))]
pub async fn open_claim(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Json(body): Json<MedBody>,
) -> Result<Response, Problem> {
    tenant.require("pix:write")?;
    state.ispb()?;
    let reason = crate::dto::display_name("reason", &body.reason, REASON_LEN_MAX)?;
    if body.amount == Some(0) {
        return Err(Problem::invalid("amount", "invalid_amount", "`amount` must be at least 1 centavo"));
    }
    // Checked before it is named in the audit log: raw input could be anything, a card number
    // or a document included.
    if !pix::ids::end_to_end_id_shape('E', &body.end_to_end_id) {
        return Err(Problem::invalid(
            "end_to_end_id",
            "invalid_end_to_end_id",
            "`end_to_end_id` must be an EndToEndId: `E`, then 31 letters and digits",
        ));
    }
    let (tenant_id, e2e) = (tenant.id, body.end_to_end_id.clone());
    audit.0.set_resource(format!("pix-med:{e2e}"));
    let _lock = state.pix_runtime.lock(&[lock_of(&state, tenant_id, &e2e)]).await;
    let (st, e2e2) = (state.clone(), e2e.clone());
    let found = query(&state, move |q| {
        let Some((received_doc, received)) = read_received(q, tenant_id, &e2e2)? else {
            return Ok(Err(Problem::not_found("received Pix")));
        };
        // A claim whose return the SPI refused may be made again (the money went back to the
        // receiver); its document moves on from the failed one's version.
        let prior = match read_med(&st, q, tenant_id, &e2e2)? {
            Some((doc, view)) if view.status == "return_failed" => doc.version,
            Some(_) => {
                return Ok(Err(Problem::new(StatusCode::CONFLICT, "claim_exists", "this Pix has a MED claim already")
                    .field("end_to_end_id")))
            }
            None => 0,
        };
        let refunded: u64 = refunds_of(q, tenant_id, &e2e2)?
            .iter()
            .filter(|r| r.refund.status != "NAO_REALIZADO")
            .map(|r| r.centavos)
            .sum();
        let account = uuid::Uuid::parse_str(&received.credit_account_id)
            .map_err(|e| store::StoreError::Corrupt(e.to_string()))?
            .as_u128();
        let available = q
            .account(AccountKey { tenant: TenantId(tenant_id), id: AccountId(account) })?
            .map_or(0, |a| a.available().max(0) as u64);
        Ok(Ok((received_doc, received, refunded, account, available, prior)))
    })
    .await??;
    let (received_doc, received, refunded, account, available, prior) = found;
    let claimable = received.amount.saturating_sub(refunded);
    let amount = body.amount.unwrap_or(claimable).min(claimable).min(available);
    if amount == 0 {
        return Err(Problem::invalid(
            "amount",
            "nothing_to_block",
            "nothing can be blocked: the Pix was refunded in full, or the account holds no funds",
        ));
    }
    let credit = match payer_of(&received)? {
        Some((t, payer)) if t == tenant_id => payer,
        _ => ensure_settlement(&state, tenant_id).await?.id.0,
    };
    let claim_id = uuid_string(crate::auth::new_uuid().as_u128());
    let hold = TransferEvent {
        key: hold_key(&state, tenant_id, &claim_id, 1),
        kind: EventKind::Pending {
            debit: AccountId(account),
            credit: AccountId(credit),
            amount,
            timeout_seconds: BLOCK_SECONDS,
        },
        code: crate::dto::MED_CODE,
        metadata: Some(format!(r#"{{"pix_med":"{e2e}"}}"#)),
        linked: false,
    };
    let now = store::now_nanos();
    let view = MedView {
        end_to_end_id: e2e.clone(),
        claim_id,
        status: "blocked".into(),
        amount,
        reason,
        blocked_at: rfc3339(now),
        expires_at: rfc3339(now + u64::from(BLOCK_SECONDS) * 1_000_000_000),
        resolved_at: None,
        refund_id: None,
    };
    let record = view.clone();
    // A block shares the received amount with refunds, across every node (see `refund_put`).
    let guards = vec![store::Guard::of(&received_doc)];
    let bumped = super::api_pix::bumped(&received_doc);
    let records: store::RecordsFn = Box::new(move |reply| match reply.chain_result() {
        ledger::TransferResult::Created => vec![bumped.clone(), med_document(tenant_id, now, prior + 1, &record)],
        _ => vec![bumped.clone()],
    });
    let answer =
        crate::routes::submit_guarded(&state, &audit, store::Command::Transfers(vec![hold]), Some(records), guards)
            .await?;
    match answer.chain_result() {
        ledger::TransferResult::Created => Ok(reply(StatusCode::CREATED, &view)),
        failure => Err(crate::routes::ledger_problem(failure, "")),
    }
}

#[utoipa::path(get, path = "/v1/pix/med/{e2e}", tag = "pix", params(("e2e" = String, Path)),
    responses((status = 200, body = MedView), (status = 404, body = Problem)), security(("api_key" = [])))]
pub async fn get_claim(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(e2e): Path<String>,
) -> Result<Response, Problem> {
    tenant.require("pix:read")?;
    let tenant_id = tenant.id;
    let st = state.clone();
    let view = query(&state, move |q| read_med(&st, q, tenant_id, &e2e))
        .await?
        .ok_or_else(|| Problem::not_found("MED claim"))?;
    Ok(reply(StatusCode::OK, &view.1))
}

/// Returns the blocked funds to the payer (`return`) or releases them (`release`).
#[utoipa::path(post, path = "/v1/pix/med/{e2e}/{action}", tag = "pix", params(("e2e" = String, Path), ("action" = String, Path)),
    responses((status = 200, body = MedView), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("api_key" = [])))]
pub async fn resolve_claim(
    State(state): State<AppState>,
    tenant: Tenant,
    audit: Audit,
    Path((e2e, action)): Path<(String, String)>,
) -> Result<Response, Problem> {
    tenant.require("pix:write")?;
    let ispb = state.ispb()?.to_owned();
    let returning = match action.as_str() {
        "return" => true,
        "release" => false,
        _ => return Err(Problem::not_found("MED action (return or release)")),
    };
    if !pix::ids::end_to_end_id_shape('E', &e2e) {
        return Err(Problem::not_found("MED claim"));
    }
    let tenant_id = tenant.id;
    audit.0.set_resource(format!("pix-med:{e2e}"));
    let _lock = state.pix_runtime.lock(&[lock_of(&state, tenant_id, &e2e)]).await;
    let (st, e2e2) = (state.clone(), e2e.clone());
    let (doc, view, received_doc, received, earlier, refund_version) = query(&state, move |q| {
        let Some((doc, view)) = read_med(&st, q, tenant_id, &e2e2)? else {
            return Ok(Err(Problem::not_found("MED claim")));
        };
        let Some((received_doc, received)) = read_received(q, tenant_id, &e2e2)? else {
            return Err(store::StoreError::Corrupt("a MED claim without its Pix".into()));
        };
        // The refunds before this return (not an earlier, failed return of this Pix), and the
        // version the return's refund document moves on from.
        let refund_version =
            q.document(REFUND_KIND, tenant_id, &super::api_pix::med_refund_doc_id(&e2e2))?.map(|d| d.version);
        let earlier: Vec<StoredRefund> = refunds_of(q, tenant_id, &e2e2)?
            .into_iter()
            .map(|r| r.refund)
            .filter(|r| r.id != super::api_pix::MED_REFUND_ID)
            .collect();
        Ok(Ok((doc, view, received_doc, received, earlier, refund_version)))
    })
    .await??;
    if view.status != "blocked" {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "claim_resolved",
            format!("the claim is {} already", view.status),
        ));
    }
    let claim = view.claim_id.clone();
    let hold = hold_key(&state, tenant_id, &claim, 1);
    let mut events = Vec::new();
    let mut step = |kind: EventKind, key: TransferKey| {
        events.push(TransferEvent {
            key,
            kind,
            code: crate::dto::MED_CODE,
            metadata: Some(format!(r#"{{"pix_med":"{e2e}"}}"#)),
            linked: true,
        })
    };
    // Paid by another institution, the money goes back through the SPI (a pacs.004, `FR01`, see
    // `pix_return`): the block is posted to the settlement account now, as for a payer on us
    // (the account, even one closed since, gives up what it had blocked), and a rejection
    // credits it back.
    let payer = payer_of(&received)?;
    let off_us = payer.is_none();
    let mut payment_return = None;
    if returning {
        step(EventKind::PostPending { pending_id: hold.id, amount: None }, hold_key(&state, tenant_id, &claim, 2));
    }
    if returning && off_us {
        let account = uuid::Uuid::parse_str(&received.credit_account_id)
            .map_err(|_| Problem::from(store::StoreError::Corrupt("a received Pix's account".into())))?
            .as_u128();
        let settlement = ensure_settlement(&state, tenant_id).await?;
        payment_return = Some(crate::pix_return::Settles::Posted {
            settlement: uuid_string(settlement.id.0),
            account: uuid_string(account),
            back: uuid_string(hold_key(&state, tenant_id, &claim, 6).id.0),
        });
    } else if returning {
        // On us in another tenant: from that tenant's settlement account on to the payer.
        if let Some((payer_tenant, payer)) = payer.filter(|(t, _)| *t != tenant_id) {
            let theirs = ensure_settlement(&state, payer_tenant).await?;
            step(
                EventKind::Posted { debit: theirs.id, credit: AccountId(payer), amount: view.amount },
                hold_key(&state, payer_tenant, &claim, 3),
            );
        }
    } else {
        step(EventKind::VoidPending { pending_id: hold.id }, hold_key(&state, tenant_id, &claim, 4));
    }
    if let Some(last) = events.last_mut() {
        last.linked = false;
    }
    let now = store::now_nanos();
    let mut resolved = view.clone();
    resolved.status = if returning { "returned" } else { "released" }.into();
    resolved.resolved_at = Some(rfc3339(now));
    let refund = returning.then(|| {
        let random = crate::auth::random_bytes();
        RefundDoc {
            refund: StoredRefund {
                id: super::api_pix::MED_REFUND_ID.into(),
                rtr_id: pix::ids::end_to_end_id('D', &ispb, now, random),
                valor: pix::amount::format(view.amount),
                natureza: "MED_FRAUDE".into(),
                descricao: Some(view.reason.clone()),
                horario: match off_us {
                    true => serde_json::json!({"solicitacao": view.blocked_at}),
                    false => serde_json::json!({"solicitacao": view.blocked_at, "liquidacao": rfc3339(now)}),
                },
                status: if off_us { "EM_PROCESSAMENTO" } else { "DEVOLVIDO" }.into(),
                motivo: None,
            },
            centavos: view.amount,
            fingerprint: String::new(),
        }
    });
    if refund.is_some() {
        resolved.refund_id = Some(super::api_pix::MED_REFUND_ID.into());
    }
    let (record, version) = (resolved.clone(), doc.version);
    let owner = format!("{}:{e2e}", uuid_string(tenant_id));
    let refund_doc_id = super::api_pix::med_refund_doc_id(&e2e);
    // The return of a Pix another institution paid, as `pix_return` sends it.
    let payment_return = match (payment_return, &refund) {
        (Some(settles), Some(r)) => Some(crate::pix_return::StoredReturn {
            // Per claim: a claim opened again after a failed return makes its own.
            record_id: format!("{refund_doc_id}:{claim}"),
            refund_doc: refund_doc_id.clone(),
            refund_id: super::api_pix::MED_REFUND_ID.into(),
            end_to_end_id: e2e.clone(),
            payer_ispb: received.payer.ispb.clone(),
            return_id: r.refund.rtr_id.clone(),
            amount: view.amount,
            reason: "FR01".into(),
            remittance: None,
            settles,
            code: crate::dto::MED_CODE,
            metadata: format!(r#"{{"pix_med":"{e2e}"}}"#),
            send_by: now.saturating_add(state.pix.spi_timeout.as_nanos() as u64),
        }),
        _ => None,
    };
    let in_flight = payment_return.clone();
    // The return is a refund that reached `DEVOLVIDO`: the charge's key's webhook hears of it
    // (one through the SPI, once its verdict is recorded).
    let notice = received.notified_key.clone().filter(|_| refund.is_some() && payment_return.is_none());
    let notifying = notice.is_some();
    // The Pix's refunds as read, across every node (a refund of it committed meanwhile on another
    // node is in the notification, or this waits): the received Pix's document must be as read,
    // and moves its version on, as a refund's commit does.
    let guards = vec![store::Guard::of(&received_doc)];
    let bumped = super::api_pix::bumped(&received_doc);
    // This claim's notification's own delivery id (see `med_notified_as`).
    let notified_as = super::api_pix::med_notified_as(&claim);
    let notified_id = crate::webhook::delivery_id(&e2e, Some(&notified_as));
    let records: store::RecordsFn = Box::new(move |reply| match reply.chain_result() {
        ledger::TransferResult::Created => {
            let mut out = vec![bumped.clone(), med_document(tenant_id, doc.created_at, version + 1, &record)];
            if let (Some(r), Some(index)) = (&refund, &notice) {
                out.push(super::api_pix::refund_outbox(
                    tenant_id,
                    index,
                    &received,
                    &earlier,
                    &r.refund,
                    &notified_as,
                    now,
                ));
            }
            if let Some(r) = &refund {
                out.push(store::Record::Document(store::Document {
                    kind: REFUND_KIND.into(),
                    tenant_id,
                    id: refund_doc_id.clone(),
                    lookup: None,
                    owner: Some(owner.clone()),
                    created_at: now,
                    version: refund_version.map_or(1, |v| v + 1),
                    body: serde_json::to_string(r).expect("serializable"),
                }));
            }
            if let Some(stored) = &in_flight {
                out.push(crate::pix_return::return_document(tenant_id, 1, now, stored, true));
            }
            out
        }
        _ => vec![],
    });
    let answer =
        crate::routes::submit_guarded(&state, &audit, store::Command::Transfers(events), Some(records), guards).await?;
    match answer.chain_result() {
        ledger::TransferResult::Created => {
            if notifying {
                crate::webhook::notify(&state, tenant_id, notified_id);
            }
            if let Some(stored) = payment_return {
                crate::pix_return::start(&state, tenant_id, now, stored);
            }
            Ok(reply(StatusCode::OK, &resolved))
        }
        // The 72 hours lapsed between the read and the commit.
        ledger::TransferResult::PendingTransferExpired => Err(Problem::new(
            StatusCode::CONFLICT,
            "claim_resolved",
            "the block lapsed (72 hours); the funds were released",
        )),
        failure => Err(crate::routes::ledger_problem(failure, "")),
    }
}

/// The claim in `doc` moved on from `returned` to `return_failed` (its return through the SPI was
/// refused; the money went back to the receiver), so that a claim may be opened again; `None`
/// for a claim in another state.
pub(crate) fn return_failed(doc: &store::Document, tenant: u128) -> Option<store::Record> {
    let mut view: MedView = serde_json::from_str(&doc.body).ok()?;
    if view.status != "returned" {
        return None;
    }
    view.status = "return_failed".into();
    Some(med_document(tenant, doc.created_at, doc.version + 1, &view))
}

/// What an open claim holds of a Pix (counted against its refunds' total).
pub fn blocked_amount(state: &AppState, q: &dyn store::Queries, tenant: u128, e2e: &str) -> store::Result<u64> {
    Ok(read_med(state, q, tenant, e2e)?.filter(|(_, v)| v.status == "blocked").map_or(0, |(_, v)| v.amount))
}
