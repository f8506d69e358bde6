//! Refunds of a Pix another institution paid: a pacs.004 payment return through the SPI, settled
//! as an off-us payment is ([`crate::pix_rail`]). The refund's money is held (the receiving
//! account → the tenant's settlement account, no time-out) in the commit that creates the refund
//! (`EM_PROCESSAMENTO`), with a return record the sweep lists; the return then goes to the
//! connector. Its verdict posts the hold (`DEVOLVIDO`: the money left through the SPI) or voids it
//! (`NAO_REALIZADO`: the receiver keeps it), in one commit with the refund's new status and the
//! webhook's notification, guarded on the return record being still in flight: of two nodes
//! recording a verdict, one applies it.
//!
//! A MED return differs in where its money waits: its block is posted to the settlement account
//! when the claim is returned (the receiver could not spend it anyway, and an account closed since
//! gives it up all the same), and a rejection credits it back and marks the claim `return_failed`.
//!
//! Invariant: a refund to another institution is never shown settled (`DEVOLVIDO`) before the
//! SPI accepted its return, and a refund's money leaves the receiving account only then; a return
//! is sent at most once, within its time-out, and one the SPI never received is refused (`AB03`)
//! only after every node's window to send it has passed.

use std::sync::Arc;

use ledger::{EventKind, TransferEvent, TransferKey, TransferResult};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit_trail::Audit;
use crate::dto::rfc3339;
use crate::pix_rail::{claim, sweep_due, Claim, IN_FLIGHT, VERDICT_TRIES};
use crate::routes::api_pix::{read_received, refund_outbox, refunds_of, RefundDoc, REFUND_KIND};
use crate::AppState;

/// A return's record: in flight (owned by [`IN_FLIGHT`]) until its verdict is recorded.
pub const RETURN_KIND: &str = "pix-return";

/// What sending a return, asking about it and recording its verdict need.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredReturn {
    /// The return record's id: the refund's document id, and for a MED return the claim's id
    /// after it (a claim opened again after a failed return makes a return of its own).
    pub record_id: String,
    /// The refund's document id (`EndToEndId:id`) and the refund's id.
    pub refund_doc: String,
    pub refund_id: String,
    /// The Pix it returns, and the institution that paid it.
    pub end_to_end_id: String,
    pub payer_ispb: String,
    /// The return's id (`rtrId`), by which the SPI is asked about it.
    pub return_id: String,
    pub amount: u64,
    /// `MD06` (a refund) or `FR01` (a MED return).
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remittance: Option<String>,
    /// How its verdict moves the money, and the code and metadata of what it moves.
    pub settles: Settles,
    pub code: u16,
    pub metadata: String,
    /// Until when it may be sent (nanoseconds since the epoch): its time plus the SPI time-out of
    /// the node that made it (see [`crate::pix_rail::StoredPayment::send_by`]).
    pub send_by: u64,
}

/// How a return's verdict moves its money (transfer and account ids).
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Settles {
    /// A refund's: its money is held (receiving account → settlement) until the verdict posts
    /// the hold or voids it (`settle`).
    Hold { hold: String, settle: String },
    /// A MED return's: its block was posted to the settlement account when the claim was
    /// returned (a blocked account, even one closed since, gives the money up); a rejection
    /// credits it back to the receiving account (`back`). Accepted, nothing more moves.
    Posted { settlement: String, account: String, back: String },
}

/// The return record of `stored`, in flight or (its verdict recorded) not.
pub fn return_document(tenant: u128, version: u64, at: u64, stored: &StoredReturn, in_flight: bool) -> store::Record {
    store::Record::Document(store::Document {
        kind: RETURN_KIND.into(),
        tenant_id: tenant,
        id: stored.record_id.clone(),
        lookup: None,
        owner: in_flight.then(|| IN_FLIGHT.to_owned()),
        created_at: at,
        version,
        body: serde_json::to_string(stored).expect("serializable"),
    })
}

/// The refund's `n`th ledger transfer (1: the hold; 2: its post or void), under the ids refunds
/// have always had.
pub fn refund_transfer(state: &AppState, tenant: u128, end_to_end_id: &str, id: &str, n: u32) -> TransferKey {
    TransferKey {
        tenant: ledger::TenantId(tenant),
        id: ledger::TransferId(
            state.keys.derived_id(b"pix-refund", tenant, &format!("{end_to_end_id}:{id}:{n}")).as_u128(),
        ),
    }
}

fn metadata(end_to_end_id: &str, id: &str) -> String {
    format!(r#"{{"pix_refund":"{end_to_end_id}:{id}"}}"#)
}

/// The return of `refund` (of `amount` centavos, made at `at`) of the Pix `received`.
pub fn of_refund(
    state: &AppState,
    tenant: u128,
    received: &crate::pix_rail::StoredReceived,
    refund: &crate::routes::api_pix::StoredRefund,
    amount: u64,
    at: u64,
) -> StoredReturn {
    let (e2e, id) = (&received.end_to_end_id, refund.id.as_str());
    StoredReturn {
        record_id: format!("{e2e}:{id}"),
        refund_doc: format!("{e2e}:{id}"),
        refund_id: id.to_owned(),
        end_to_end_id: e2e.clone(),
        payer_ispb: received.payer.ispb.clone(),
        return_id: refund.rtr_id.clone(),
        amount,
        reason: "MD06".into(),
        remittance: refund.descricao.clone(),
        settles: Settles::Hold {
            hold: crate::dto::uuid_string(refund_transfer(state, tenant, e2e, id, 1).id.0),
            settle: crate::dto::uuid_string(refund_transfer(state, tenant, e2e, id, 2).id.0),
        },
        code: crate::dto::PIX_REFUND_CODE,
        metadata: metadata(e2e, id),
        send_by: at.saturating_add(state.pix.spi_timeout.as_nanos() as u64),
    }
}

/// The hold of a return: the receiving account → the tenant's settlement account, never expiring
/// (only the SPI's verdict settles it, as an off-us payment's hold).
pub fn hold_event(
    state: &AppState,
    tenant: u128,
    end_to_end_id: &str,
    id: &str,
    account: u128,
    settlement: u128,
    amount: u64,
) -> TransferEvent {
    TransferEvent {
        key: refund_transfer(state, tenant, end_to_end_id, id, 1),
        kind: EventKind::Pending {
            debit: ledger::AccountId(account),
            credit: ledger::AccountId(settlement),
            amount,
            timeout_seconds: crate::pix_rail::OFF_US_HOLD_TIMEOUT_SECONDS,
        },
        code: crate::dto::PIX_REFUND_CODE,
        metadata: Some(metadata(end_to_end_id, id)),
        linked: false,
    }
}

/// Sends the return made in the commit at `at` in the background, unless a task of this node has
/// it (a sweep: it then settles it).
pub fn start(state: &AppState, tenant: u128, at: u64, stored: StoredReturn) {
    match claim(&state.pix_runtime, tenant, &claim_id(&stored)) {
        Some(claimed) => drop(tokio::spawn(send(state.clone(), tenant, at, stored, claimed))),
        None => tracing::warn!("a Pix return was claimed by a sweep before it was sent; the sweep settles it"),
    }
}

/// A return's claim, apart from the payments' (`settling` holds both).
fn claim_id(stored: &StoredReturn) -> String {
    format!("return:{}", stored.record_id)
}

/// Sends the return within its window, then records its verdict; no answer or a connector error
/// is not a verdict: the SPI is asked instead (as [`crate::pix_rail`] does for payments).
async fn send(state: AppState, tenant: u128, at: u64, stored: StoredReturn, claimed: Claim) {
    let now = store::now_nanos();
    if now >= stored.send_by {
        tracing::warn!(tenant = %crate::dto::uuid_string(tenant), return_id = %stored.return_id, "a Pix return was not sent within its SPI time-out; settling it from its status");
        settle_from_status(&state, tenant, at, stored).await;
        drop(claimed);
        return;
    }
    let message = pix::spi::PaymentReturn {
        return_id: stored.return_id.clone(),
        original_end_to_end_id: stored.end_to_end_id.clone(),
        amount: stored.amount,
        payer_ispb: stored.payer_ispb.clone(),
        reason: if stored.reason == "FR01" { "FR01" } else { "MD06" },
        remittance: stored.remittance.clone(),
    };
    let window = std::time::Duration::from_nanos(stored.send_by - now);
    let connector = state.pix_runtime.connector.clone();
    match tokio::time::timeout(window, connector.send_return(message)).await {
        Ok(Ok(verdict)) => record(&state, tenant, at, stored, verdict).await,
        Ok(Err(_)) | Err(_) => settle_from_status(&state, tenant, at, stored).await,
    }
    drop(claimed);
}

/// Asks the SPI what became of the return and records it; "never received" is final only once
/// the return is due for a sweep. Otherwise it stays in flight, its hold in place.
async fn settle_from_status(state: &AppState, tenant: u128, at: u64, stored: StoredReturn) {
    let connector = state.pix_runtime.connector.clone();
    let clock = crate::pix_rail::clock_reading(state);
    let unknown_is_final = crate::pix_rail::unknown_is_final(store::now_nanos(), stored.send_by, clock);
    match tokio::time::timeout(state.pix.spi_timeout, connector.status(&stored.return_id)).await {
        Ok(Ok(crate::spi::Found::Settled(verdict))) => record(state, tenant, at, stored, verdict).await,
        Ok(Ok(crate::spi::Found::Unknown)) if unknown_is_final => {
            let timeout = pix::spi::Status::Rejected(pix::spi::RejectReason::Timeout);
            record(state, tenant, at, stored, timeout).await
        }
        Ok(Ok(crate::spi::Found::Unknown | crate::spi::Found::InProcess)) => {}
        Ok(Err(_)) | Err(_) => {
            tracing::warn!("the SPI did not answer a return's status query; asking again at the next sweep")
        }
    }
}

/// What the verdict on `stored` moves in the ledger (nothing: `None`).
fn verdict_event(tenant: u128, stored: &StoredReturn, verdict: pix::spi::Status) -> Option<Option<TransferEvent>> {
    let id = |text: &str| uuid::Uuid::parse_str(text).ok().map(|u| u.as_u128());
    let accepted = matches!(verdict, pix::spi::Status::Accepted);
    let (key, kind) = match &stored.settles {
        Settles::Hold { hold, settle } => {
            let pending_id = ledger::TransferId(id(hold)?);
            let kind = match accepted {
                true => EventKind::PostPending { pending_id, amount: None },
                false => EventKind::VoidPending { pending_id },
            };
            (id(settle)?, kind)
        }
        Settles::Posted { .. } if accepted => return Some(None),
        Settles::Posted { settlement, account, back } => {
            let (debit, credit) = (ledger::AccountId(id(settlement)?), ledger::AccountId(id(account)?));
            (id(back)?, EventKind::Posted { debit, credit, amount: stored.amount })
        }
    };
    Some(Some(TransferEvent {
        key: TransferKey { tenant: ledger::TenantId(tenant), id: ledger::TransferId(key) },
        kind,
        code: stored.code,
        metadata: Some(stored.metadata.clone()),
        linked: false,
    }))
}

/// Records the verdict on a return (see [`verdict_event`]: a refund's hold posted or voided, a
/// MED return's money credited back on a rejection), with the refund's final status, the MED
/// claim's (`return_failed` on a rejection, so that a claim may be opened again), and the
/// webhook's notification, in one commit guarded on the return record being still in flight.
/// Tried [`VERDICT_TRIES`] times; then a sweep takes it over.
async fn record(state: &AppState, tenant: u128, at: u64, stored: StoredReturn, verdict: pix::spi::Status) {
    let Some(event) = verdict_event(tenant, &stored, verdict) else {
        tracing::error!(return_id = %stored.return_id, "a Pix return's record names no transfer: reconcile it by hand");
        return;
    };
    let slot = crate::audit_trail::Slot::new("pix.spi.return-verdict".into(), crate::next_request_id(), None);
    slot.set_actor(Some(tenant), "spi".into());
    slot.set_resource(format!("pix-refund:{}", crate::audit_trail::client_id(&stored.refund_id)));
    let audit = Audit(Arc::new(slot));
    let guard = store::Guard::Document {
        kind: RETURN_KIND.into(),
        tenant_id: tenant,
        id: stored.record_id.clone(),
        version: 1,
    };
    let med = stored.refund_id == crate::routes::api_pix::MED_REFUND_ID;
    // The notification's delivery id: the refund's, or a MED return's own per claim (its record
    // is `{refund doc}:{claim id}`).
    let notified_as = match stored.record_id.rsplit_once(':') {
        Some((_, claim)) if med => crate::routes::api_pix::med_notified_as(claim),
        _ => stored.refund_id.clone(),
    };
    let notified_id = crate::webhook::delivery_id(&stored.end_to_end_id, Some(&notified_as));
    for attempt in 0..VERDICT_TRIES {
        // The refund as stored, its Pix and the Pix's other refunds (for the notification).
        let (doc_id, e2e) = (stored.refund_doc.clone(), stored.end_to_end_id.clone());
        let delivery_id = notified_id.clone();
        let read = crate::routes::query(state, move |q| {
            let refund = q.document(REFUND_KIND, tenant, &doc_id)?;
            let received = read_received(q, tenant, &e2e)?.map(|(_, r)| r);
            let others = refunds_of(q, tenant, &e2e)?;
            let claim = if med { q.document(crate::routes::med::MED_KIND, tenant, &e2e)? } else { None };
            // The notification's delivery, should one be there (a MED return's made before each
            // claim had its own delivery id shared one): the new one moves its version on, and the
            // commit is guarded on the version read, so that a sender of another still retrying
            // (or a redelivery asked for meanwhile) writes nothing over it, nor it over them.
            let delivery = if med { q.document(crate::webhook::DELIVERY_KIND, tenant, &delivery_id)? } else { None };
            Ok((refund, received, others, claim, delivery.map_or(0, |d| d.version)))
        })
        .await;
        let (refund_doc, received, others, claim, delivered) = match read {
            Ok((Some(doc), Some(received), others, claim, delivered)) => (doc, received, others, claim, delivered),
            Ok(_) => {
                tracing::error!(return_id = %stored.return_id, "a Pix return's refund or Pix is missing from storage: reconcile it by hand");
                return;
            }
            Err(e) => {
                tracing::warn!(code = %e.code, attempt, "a Pix return's refund could not be read; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1 << attempt.min(3))).await;
                continue;
            }
        };
        let guard_delivery = med && received.notified_key.is_some();
        let Ok(refund) = serde_json::from_str::<RefundDoc>(&refund_doc.body) else {
            tracing::error!(return_id = %stored.return_id, "a Pix return's refund does not parse: reconcile it by hand");
            return;
        };
        let earlier: Vec<_> = others.into_iter().map(|d| d.refund).filter(|r| r.id != stored.refund_id).collect();
        // A MED return the SPI refused leaves its claim open to be made again.
        let failed_claim = match (&claim, verdict) {
            (Some(doc), pix::spi::Status::Rejected(_)) => crate::routes::med::return_failed(doc, tenant),
            _ => None,
        };
        let (stored2, refund_doc2, notified_as2) = (stored.clone(), refund_doc.clone(), notified_as.clone());
        let records: store::RecordsFn = Box::new(move |reply| {
            let result = reply.chain_result();
            let mut refund = refund.clone();
            let r = &mut refund.refund;
            match verdict {
                pix::spi::Status::Accepted if result == TransferResult::Created => {
                    r.status = "DEVOLVIDO".into();
                    r.horario["liquidacao"] = json!(rfc3339(store::now_nanos()));
                }
                pix::spi::Status::Accepted => {
                    tracing::error!(
                        result = result.as_str(),
                        return_id = %stored2.return_id,
                        "the SPI accepted a Pix return whose hold the ledger no longer holds: reconcile it by hand"
                    );
                    r.status = "NAO_REALIZADO".into();
                    r.motivo = Some(crate::routes::ledger_problem(result, "").detail.chars().take(140).collect());
                }
                pix::spi::Status::Rejected(reason) => {
                    r.status = "NAO_REALIZADO".into();
                    let mut motivo = reason.describe().to_owned();
                    if result != TransferResult::Created {
                        // A MED return's money, credited back, refused by the receiving account.
                        tracing::error!(
                            result = result.as_str(),
                            return_id = %stored2.return_id,
                            "a refused Pix return's money could not go back to the receiving account: it stays in the settlement account; reconcile it by hand"
                        );
                        motivo = format!("{motivo}; the money stays in the settlement account ({})", result.as_str());
                    }
                    r.motivo = Some(motivo.chars().take(140).collect());
                }
            }
            let mut records = vec![
                store::Record::Document(store::Document {
                    version: refund_doc2.version + 1,
                    body: serde_json::to_string(&refund).expect("serializable"),
                    ..refund_doc2.clone()
                }),
                return_document(tenant, 2, at, &stored2, false),
            ];
            records.extend(failed_claim.clone());
            if let Some(index) = &received.notified_key {
                let mut outbox = refund_outbox(
                    tenant,
                    index,
                    &received,
                    &earlier,
                    &refund.refund,
                    &notified_as2,
                    store::now_nanos(),
                );
                if let store::Record::Document(d) = &mut outbox {
                    d.version = delivered + 1;
                }
                records.push(outbox);
            }
            records
        });
        let command = match &event {
            Some(event) => store::Command::Transfers(vec![event.clone()]),
            None => store::Command::Audit(vec![]),
        };
        let mut guards = vec![guard.clone()];
        if guard_delivery {
            guards.push(store::Guard::Document {
                kind: crate::webhook::DELIVERY_KIND.into(),
                tenant_id: tenant,
                id: notified_id.clone(),
                version: delivered,
            });
        }
        match crate::routes::submit_guarded(state, &audit, command, Some(records), guards).await {
            Ok(_) => {
                crate::webhook::notify(state, tenant, notified_id);
                return;
            }
            Err(e) => {
                // Another node may have recorded it (the guard failed): then there is nothing to do.
                let id = stored.record_id.clone();
                let current = crate::routes::query(state, move |q| q.document(RETURN_KIND, tenant, &id)).await;
                if matches!(current, Ok(Some(doc)) if doc.version != 1) {
                    return;
                }
                tracing::warn!(code = %e.code, attempt, "a Pix return's verdict could not be recorded; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1 << attempt.min(3))).await;
            }
        }
    }
    tracing::error!(return_id = %stored.return_id, "a Pix return's verdict was not recorded; a sweep will record it");
}

/// Every node, every [`crate::pix_rail::SWEEP_INTERVAL`], settles the returns still in flight that no task of its
/// own is settling, once they are due ([`sweep_due`]): it asks the SPI about each, never sending
/// it again. Started once per node, beside [`crate::pix_rail::resume`].
pub fn resume(state: &AppState) {
    crate::pix_rail::sweep_in_flight(state, RETURN_KIND, |state, doc, now| {
        let Ok(stored) = serde_json::from_str::<StoredReturn>(&doc.body) else {
            tracing::error!(id = %doc.id, "a Pix return's record does not parse: the sweep leaves it");
            return;
        };
        if doc.version != 1 || sweep_due(stored.send_by) > now {
            return;
        }
        let Some(claimed) = claim(&state.pix_runtime, doc.tenant_id, &claim_id(&stored)) else { return };
        let (state, tenant, at) = (state.clone(), doc.tenant_id, doc.created_at);
        tokio::spawn(async move {
            settle_from_status(&state, tenant, at, stored).await;
            drop(claimed);
        });
    });
}
