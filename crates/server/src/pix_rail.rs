//! Pix on rtpay's ledger: the institution's settings, the keys directory (DICT) kept in storage
//! as documents, and payments — each a ledger chain committed together with the payment's
//! documents and the payer's limit counters, so no payment exists without its money movement
//! and no money moves without its payment.
//!
//! A tenant's Pix settlement account (one per tenant, BRL) is its share of the institution's
//! reserve at the Central Bank: a payment between two tenants of this rtpay moves payer →
//! settlement(payer's tenant) and settlement(payee's tenant) → payee in one linked chain.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ledger::{
    AccountCommand, AccountFlags, AccountId, AccountKey, AccountResult, Currency, EventKind, NewAccount, TenantId,
    TransferEvent, TransferId, TransferKey, TransferResult,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit_trail::Audit;
use crate::dto::uuid_string;
use crate::problem::Problem;
use crate::vault_service::{VaultFailure, VaultService};
use crate::AppState;

pub const KEY_KIND: &str = "pix-key";
pub const PAYMENT_KIND: &str = "pix-payment";
pub const RECEIVED_KIND: &str = "pix-received";
pub const BUCKET_KIND: &str = "dict-bucket";
pub const LIMITS_KIND: &str = "pix-limits";

/// Keys per account (DICT): persons 5, companies 20.
pub const KEYS_PER_ACCOUNT_PERSON: u64 = 5;
pub const KEYS_PER_ACCOUNT_COMPANY: u64 = 20;

/// The institution this rtpay is.
#[derive(Clone, Debug, Default)]
pub struct PixSettings {
    /// The 8-character ISPB; `None`: Pix routes answer 503.
    pub ispb: Option<String>,
    /// When night limits apply.
    pub night: pix::limits::Night,
}

/// What Pix needs from the shared state.
#[derive(Default)]
pub struct PixRuntime {
    /// Tenants whose settlement account is known to exist (it is opened once, idempotently).
    settled: Mutex<HashSet<u128>>,
}

impl AppState {
    pub fn ispb(&self) -> Result<&str, Problem> {
        self.pix.ispb.as_deref().ok_or_else(|| {
            Problem::unavailable(
                "Pix is not configured on this server: start it with `rtpay serve --ispb NNNNNNNN`",
                3600,
            )
        })
    }

    pub fn vault_or_503(&self) -> Result<Arc<VaultService>, Problem> {
        self.vault.clone().ok_or_else(|| Problem::unavailable("the vault is not configured", 60))
    }
}

/// A key as stored: its value only sealed; found by its blind index (the document's lookup).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredKey {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub key_sealed: String,
    pub account_id: String,
    pub holder_id: String,
    pub created_at: String,
}

/// The blind index of a key (the DICT is keyed by it; keys are personal data).
pub fn key_lookup(vault: &VaultService, key: &pix::PixKey) -> String {
    crate::auth::hex(&vault.index().of(b"pix-key", key.value.as_bytes()))
}

/// Associated data of a sealed key.
pub fn key_record(tenant: u128, id: &str) -> Vec<u8> {
    format!("pix-key:{}:{id}", uuid_string(tenant)).into_bytes()
}

/// Owner column of an account's keys (unique across tenants).
pub fn account_owner(tenant: u128, account: u128) -> String {
    format!("{}:{}", uuid_string(tenant), uuid_string(account))
}

/// The tenant's Pix settlement account.
pub fn settlement_key(state: &AppState, tenant: u128) -> AccountKey {
    AccountKey {
        tenant: TenantId(tenant),
        id: AccountId(state.keys.derived_id(b"pix-settlement", tenant, "BRL").as_u128()),
    }
}

/// Opens the tenant's settlement account if this node has not seen it open.
pub async fn ensure_settlement(state: &AppState, audit: &Audit, tenant: u128) -> Result<AccountKey, Problem> {
    let key = settlement_key(state, tenant);
    if state.pix_runtime.settled.lock().expect("not poisoned").contains(&tenant) {
        return Ok(key);
    }
    let open = AccountCommand::Create(NewAccount {
        key,
        currency: Currency::parse("BRL").expect("BRL is ISO 4217"),
        code: 7600,
        flags: AccountFlags::default(),
        credit_limit: 0,
        metadata: Some(r#"{"rtpay":"pix settlement"}"#.into()),
        holder: None,
    });
    match crate::routes::submit(state, audit, store::Command::Accounts(vec![open])).await? {
        store::Reply::Accounts(r) if matches!(r.first(), Some((AccountResult::Created | AccountResult::Exists, _))) => {
            state.pix_runtime.settled.lock().expect("not poisoned").insert(tenant);
            Ok(key)
        }
        _ => Err(Problem::internal()),
    }
}

/// Who receives a payment, as the payer sees it.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
pub struct CreditorView {
    pub ispb: String,
    /// Masked for persons (`Maria S.`).
    pub name: String,
    /// Masked (`***.982.247-**`).
    pub document: String,
    /// `person` or `company`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A Pix payment, as stored and shown.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct PaymentView {
    pub id: String,
    pub end_to_end_id: String,
    /// `completed`, `processing` or `rejected`.
    pub status: String,
    /// Why a payment was rejected (a ledger result code, `limit_exceeded`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_detail: Option<String>,
    pub debit_account_id: String,
    /// Centavos.
    pub amount: u64,
    /// `key`, `brcode` or `manual`.
    pub initiation: String,
    pub creditor: CreditorView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: String,
}

/// A payment document: the view plus the request's fingerprint (idempotency by id).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredPayment {
    pub view: PaymentView,
    pub fingerprint: String,
}

/// A Pix received by an account of this rtpay (the receiver tenant's record).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredReceived {
    pub end_to_end_id: String,
    pub credit_account_id: String,
    pub amount: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txid: Option<String>,
    pub payer: CreditorView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// RFC 3339.
    pub received_at: String,
    /// Nanoseconds, for listings.
    pub received_at_nanos: u64,
}

/// The party on one side of an on-us payment, resolved from storage.
#[derive(Clone, Debug)]
pub struct Party {
    pub tenant: u128,
    pub account: u128,
    pub holder: u128,
    pub person: bool,
    pub view: CreditorView,
}

/// Reads an account's holder and shows it as the other side sees it (name masked for persons).
pub fn party(
    vault: &VaultService,
    q: &dyn store::Queries,
    ispb: &str,
    tenant: u128,
    account: u128,
) -> Result<Result<Party, &'static str>, VaultFailure> {
    let Some(acct) =
        q.account(AccountKey { tenant: TenantId(tenant), id: AccountId(account) }).map_err(VaultFailure::Store)?
    else {
        return Ok(Err("no such account"));
    };
    if acct.currency.as_str() != "BRL" {
        return Ok(Err("the account is not in BRL"));
    }
    let Some(holder_id) = acct.holder else {
        return Ok(Err("the account has no holder (Pix needs the CPF or CNPJ behind an account)"));
    };
    let Some(h) = q.holder(tenant, holder_id).map_err(VaultFailure::Store)? else {
        return Ok(Err("the account's holder is missing"));
    };
    let dek = vault.data_key(q, tenant)?;
    let name = vault::open(&dek, &crate::routes::holders::record_id(tenant, holder_id, "name"), &h.name_sealed)?;
    let doc = vault::open(&dek, &crate::routes::holders::record_id(tenant, holder_id, "document"), &h.document_sealed)?;
    let name = String::from_utf8_lossy(&name).into_owned();
    let person = h.kind == "person";
    Ok(Ok(Party {
        tenant,
        account,
        holder: holder_id,
        person,
        view: CreditorView {
            ispb: ispb.to_owned(),
            name: if person { pix::keys::mask_person_name(&name) } else { name },
            document: vault::mask::document(&String::from_utf8_lossy(&doc)),
            kind: h.kind,
        },
    }))
}

/// The first failure of a linked chain, or `Created` / `Exists`.
pub fn chain_result(reply: &store::Reply) -> TransferResult {
    match reply {
        store::Reply::Transfers(outcomes) => {
            let failed = outcomes.iter().map(|o| o.result).find(|r| {
                !matches!(r, TransferResult::Created | TransferResult::Exists | TransferResult::LinkedEventFailed)
            });
            failed.unwrap_or(if outcomes.iter().all(|o| o.result == TransferResult::Exists) {
                TransferResult::Exists
            } else {
                TransferResult::Created
            })
        }
        _ => TransferResult::Created,
    }
}

/// Counter scopes of a payer's spending (per local day and per night, see `pix::limits`).
pub fn spend_scopes(holder: u128) -> (String, String) {
    (format!("pix-day:{}", uuid_string(holder)), format!("pix-night:{}", uuid_string(holder)))
}

const HOUR: u64 = 3_600_000_000_000;

/// Counter periods of a time: (day index, night index) in hours since the epoch of their start.
pub fn spend_periods(night: pix::limits::Night, now: u64) -> (u64, Option<u64>) {
    let p = night.period(now);
    (p.day_start / HOUR, p.night.then_some(p.night_start / HOUR))
}

/// What a payer spent so far today and tonight.
pub fn spent(q: &dyn store::Queries, holder: u128, night: pix::limits::Night, now: u64) -> store::Result<(u64, u64)> {
    let (day_scope, night_scope) = spend_scopes(holder);
    let (day, night) = spend_periods(night, now);
    let d = q.counter_total(&day_scope, day, day + 1)?.max(0) as u64;
    let n = match night {
        Some(n) => q.counter_total(&night_scope, n, n + 1)?.max(0) as u64,
        None => 0,
    };
    Ok((d, n))
}

/// A holder's Pix limits in centavos; `null` or absent: no limit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    pub per_transaction: Option<u64>,
    pub daily: Option<u64>,
    pub nightly: Option<u64>,
    pub night_per_transaction: Option<u64>,
}

impl From<LimitsBody> for pix::limits::Limits {
    fn from(b: LimitsBody) -> Self {
        pix::limits::Limits {
            per_transaction: b.per_transaction,
            daily: b.daily,
            nightly: b.nightly,
            night_per_transaction: b.night_per_transaction,
        }
    }
}

impl From<pix::limits::Limits> for LimitsBody {
    fn from(l: pix::limits::Limits) -> Self {
        LimitsBody {
            per_transaction: l.per_transaction,
            daily: l.daily,
            nightly: l.nightly,
            night_per_transaction: l.night_per_transaction,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub struct StoredLimits {
    pub current: LimitsBody,
    pub pending: Option<(LimitsBody, u64)>,
}

impl StoredLimits {
    pub fn schedule(&self) -> pix::limits::Schedule {
        pix::limits::Schedule { current: self.current.into(), pending: self.pending.map(|(l, t)| (l.into(), t)) }
    }
}

pub fn limits_of(
    q: &dyn store::Queries,
    tenant: u128,
    holder: u128,
    person: bool,
) -> store::Result<(pix::limits::Schedule, u64)> {
    match q.document(LIMITS_KIND, tenant, &uuid_string(holder))? {
        Some(doc) => {
            let stored: StoredLimits =
                serde_json::from_str(&doc.body).map_err(|e| store::StoreError::Corrupt(e.to_string()))?;
            Ok((stored.schedule(), doc.version))
        }
        None => Ok((pix::limits::Schedule::new(pix::limits::Limits::default_for(person)), 0)),
    }
}

/// An on-us payment ready to commit.
pub struct OnUs {
    pub payer: Party,
    pub payee: Party,
    pub amount: u64,
    pub view: PaymentView,
    pub fingerprint: String,
    /// Why it is rejected before any money moves (a limit), if it is.
    pub refused: Option<(String, String)>,
}

/// Commits an on-us payment: the ledger chain, the payment and received documents, the payer's
/// spend counters, and the audit entry, in one transaction. Answers the payment as stored.
pub async fn commit_on_us(state: &AppState, audit: &Audit, p: OnUs) -> Result<PaymentView, Problem> {
    let payer_tenant = p.payer.tenant;
    let payment_id = p.view.id.clone();
    let id_for = |n: u32| TransferKey {
        tenant: TenantId(0),
        id: TransferId(state.keys.derived_id(b"pix-transfer", payer_tenant, &format!("{payment_id}:{n}")).as_u128()),
    };
    let now = store::now_nanos();
    let mut events = Vec::new();
    if p.refused.is_none() {
        let event = |key: TransferKey, tenant: u128, debit: u128, credit: u128| TransferEvent {
            key: TransferKey { tenant: TenantId(tenant), ..key },
            kind: EventKind::Posted { debit: AccountId(debit), credit: AccountId(credit), amount: p.amount },
            code: 7600,
            metadata: Some(format!(r#"{{"pix":"{}"}}"#, p.view.end_to_end_id)),
            linked: false,
        };
        if p.payer.tenant == p.payee.tenant {
            events.push(event(id_for(1), payer_tenant, p.payer.account, p.payee.account));
        } else {
            let payer_settlement = ensure_settlement(state, audit, p.payer.tenant).await?;
            let payee_settlement = ensure_settlement(state, audit, p.payee.tenant).await?;
            let mut first = event(id_for(1), payer_tenant, p.payer.account, payer_settlement.id.0);
            first.linked = true;
            events.push(first);
            events.push(event(id_for(2), p.payee.tenant, payee_settlement.id.0, p.payee.account));
        }
    }
    let (day_scope, night_scope) = spend_scopes(p.payer.holder);
    let (day, night) = spend_periods(state.pix.night, now);
    let (payer, payee) = (p.payer.clone(), p.payee.clone());
    let (view, fingerprint, amount, refused) = (p.view, p.fingerprint, p.amount, p.refused);
    let conclude = move |result: TransferResult| -> (PaymentView, Vec<store::Record>) {
        let mut view = view.clone();
        let mut records = Vec::new();
        match (&refused, result) {
            (Some((reason, detail)), _) => {
                view.status = "rejected".into();
                view.reason = Some(reason.clone());
                view.reason_detail = Some(detail.clone());
            }
            (None, TransferResult::Created | TransferResult::Exists) => {
                view.status = "completed".into();
                records.push(store::Record::Count { scope: day_scope.clone(), period: day, delta: amount as i64 });
                if let Some(n) = night {
                    records.push(store::Record::Count { scope: night_scope.clone(), period: n, delta: amount as i64 });
                }
                let received = StoredReceived {
                    end_to_end_id: view.end_to_end_id.clone(),
                    credit_account_id: uuid_string(payee.account),
                    amount,
                    txid: view.txid.clone(),
                    payer: payer.view.clone(),
                    description: view.description.clone(),
                    received_at: crate::dto::rfc3339(now),
                    received_at_nanos: now,
                };
                records.push(store::Record::Document(store::Document {
                    kind: RECEIVED_KIND.into(),
                    tenant_id: payee.tenant,
                    id: view.end_to_end_id.clone(),
                    lookup: Some(view.end_to_end_id.clone()),
                    owner: Some(account_owner(payee.tenant, payee.account)),
                    created_at: now,
                    version: 1,
                    body: serde_json::to_string(&received).expect("serializable"),
                }));
            }
            (None, failure) => {
                view.status = "rejected".into();
                view.reason = Some(failure.as_str().to_owned());
                view.reason_detail = Some(crate::routes::ledger_problem(failure, "").detail);
            }
        }
        let stored = StoredPayment { view: view.clone(), fingerprint: fingerprint.clone() };
        records.push(store::Record::Document(store::Document {
            kind: PAYMENT_KIND.into(),
            tenant_id: payer.tenant,
            id: view.id.clone(),
            lookup: Some(view.end_to_end_id.clone()),
            owner: Some(account_owner(payer.tenant, payer.account)),
            created_at: now,
            version: 1,
            body: serde_json::to_string(&stored).expect("serializable"),
        }));
        (view, records)
    };
    let conclude = Arc::new(conclude);
    let in_batch = conclude.clone();
    let records: store::RecordsFn = Box::new(move |reply| in_batch(chain_result(reply)).1);
    let command = if events.is_empty() { store::Command::Audit(vec![]) } else { store::Command::Transfers(events) };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let draft = audit.0.draft(String::new());
    state.store.engine.submit_with(command, Some(draft), Some(records), Box::new(move |r| drop(tx.send(r))))?;
    audit.0.mark_recorded();
    let reply = rx.await.map_err(|_| Problem::unavailable("the writer stopped", 2))??;
    Ok(conclude(chain_result(&reply)).0)
}
