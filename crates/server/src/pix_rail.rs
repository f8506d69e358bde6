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
#[derive(Clone, Debug)]
pub struct PixSettings {
    /// The 8-character ISPB; `None`: Pix routes answer 503.
    pub ispb: Option<String>,
    /// When night limits apply.
    pub night: pix::limits::Night,
    /// The sandbox SPI's behaviour.
    pub simulator: crate::spi::SimulatorSettings,
    /// How long an off-us payment waits for the SPI's answer before the SPI is asked for its
    /// status; also how long after the payment's time it may still be sent.
    pub spi_timeout: std::time::Duration,
    /// The host charges' locations are on (`<host>/qr/v2/<token>`), which rtpay's listener serves
    /// (`--pix-location-host`).
    pub location_host: String,
}

/// Where locations are when no host is configured.
pub const LOCATION_HOST_DEFAULT: &str = "pix.rtpay.local";
/// The longest host whose locations fit the spec's 77 characters (`https://` + host +
/// `/qr/v2/cobv/` + 32 hexadecimal digits).
pub const LOCATION_HOST_LEN_MAX: usize = 77 - 8 - 12 - 32;

impl Default for PixSettings {
    fn default() -> Self {
        PixSettings {
            ispb: None,
            night: pix::limits::Night::default(),
            simulator: crate::spi::SimulatorSettings::default(),
            spi_timeout: SPI_TIMEOUT_DEFAULT,
            location_host: LOCATION_HOST_DEFAULT.into(),
        }
    }
}

/// The SPI settles within 40 s (IN BCB 5/2020); waiting longer is pointless.
pub const SPI_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(40);
/// Failures in a row that open the connector's breaker, and how long it stays open.
pub const BREAKER_THRESHOLD: u32 = 5;
pub const BREAKER_COOL_DOWN_NANOS: u64 = 30_000_000_000;

/// Stripes of the per-node locks that serialize a check and its commit (a payer's limits, a
/// charge paid once, a Pix's refunds): enough that unrelated work rarely waits.
const LOCK_STRIPES: usize = 256;
/// Parties a node remembers (then it starts over): bounded memory whatever the accounts.
const PARTY_CACHE_MAX: usize = 65_536;

/// What Pix needs from the shared state.
pub struct PixRuntime {
    locks: Vec<tokio::sync::Mutex<()>>,
    /// (tenant, account) → the party behind it (see [`party`]).
    parties: Mutex<std::collections::HashMap<(u128, u128), Party>>,
    /// Tenants whose settlement account is known to exist (it is opened once, idempotently).
    settled: Mutex<HashSet<u128>>,
    pub connector: Arc<dyn crate::spi::SpiConnector>,
    pub breaker: Mutex<pix::spi::Breaker>,
    /// Held while a batch of charges (`lotecobv`) is applied: one batch of a tenant at a time on a
    /// node (striped by tenant). Taken before any stripe, never while holding one.
    batches: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Payments' found look-ups not yet settled or charged, per (tenant, holder): each holds one of
    /// the holder's DICT tokens on this node (see `routes::pix::payment_lookup`).
    lookups_in_flight: Mutex<std::collections::HashMap<(u128, u128), u64>>,
    /// The key that signs the payloads at charges' locations, loaded on first use.
    pub signer: std::sync::OnceLock<Arc<crate::jws::PayloadSigner>>,
    /// Off-us payments a task of this node is settling (by tenant and payment id, the payment's
    /// key: two tenants may use one id): the sweep leaves them.
    settling: Mutex<HashSet<(u128, String)>>,
}

/// An off-us payment claimed in [`PixRuntime::settling`]; the claim ends when this is dropped
/// (its task finished, failed, panicked or was cancelled), and a sweep may then take it.
pub(crate) struct Claim {
    runtime: Arc<PixRuntime>,
    key: (u128, String),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.runtime.settling.lock().expect("not poisoned").remove(&self.key);
    }
}

/// Claims the tenant's off-us payment `id` for a task of this node, unless one has it.
pub(crate) fn claim(runtime: &Arc<PixRuntime>, tenant: u128, id: &str) -> Option<Claim> {
    let key = (tenant, id.to_owned());
    let fresh = runtime.settling.lock().expect("not poisoned").insert(key.clone());
    fresh.then(|| Claim { runtime: runtime.clone(), key })
}

impl PixRuntime {
    pub fn new(connector: Arc<dyn crate::spi::SpiConnector>) -> PixRuntime {
        PixRuntime {
            locks: (0..LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            parties: Mutex::default(),
            settled: Mutex::default(),
            connector,
            breaker: Mutex::new(pix::spi::Breaker::new(BREAKER_THRESHOLD, BREAKER_COOL_DOWN_NANOS)),
            batches: (0..BATCH_STRIPES).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect(),
            lookups_in_flight: Mutex::default(),
            signer: std::sync::OnceLock::new(),
            settling: Mutex::default(),
        }
    }
}

const BATCH_STRIPES: usize = 16;

/// One DICT token of a holder held by a payment in flight; given back when dropped.
pub struct LookupReservation {
    rt: Arc<PixRuntime>,
    key: (u128, u128),
}

impl Drop for LookupReservation {
    fn drop(&mut self) {
        let mut map = self.rt.lookups_in_flight.lock().expect("not poisoned");
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Holds one of `tokens` (the holder's bucket as stored) for a payment's look-up, if one is not
/// held by another payment in flight on this node.
pub fn reserve_lookup(rt: &Arc<PixRuntime>, tenant: u128, holder: u128, tokens: u64) -> Option<LookupReservation> {
    let mut map = rt.lookups_in_flight.lock().expect("not poisoned");
    let held = map.entry((tenant, holder)).or_insert(0);
    if *held >= tokens {
        if *held == 0 {
            map.remove(&(tenant, holder));
        }
        return None;
    }
    *held += 1;
    Some(LookupReservation { rt: rt.clone(), key: (tenant, holder) })
}

impl PixRuntime {
    /// The lock a tenant's batches of charges take.
    pub fn batch_lock(&self, tenant: u128) -> Arc<tokio::sync::Mutex<()>> {
        self.batches[(tenant % BATCH_STRIPES as u128) as usize].clone()
    }

    /// Holds the stripes of `keys` (taken in stripe order, so two holders never deadlock) until
    /// the guards drop. Per node: nodes of a cluster do not see each other's.
    pub async fn lock(&self, keys: &[u128]) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = keys.iter().map(|k| (*k % LOCK_STRIPES as u128) as usize).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.locks[s].lock().await);
        }
        guards
    }
}

impl Default for PixRuntime {
    fn default() -> Self {
        PixRuntime::new(Arc::new(crate::spi::Simulator(crate::spi::SimulatorSettings::default())))
    }
}

impl AppState {
    /// Charges' locations begin with this (no scheme, as BR Codes carry them).
    pub fn location_prefix(&self) -> String {
        format!("{}/qr/v2/", self.pix.location_host)
    }

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

/// A document of `kind` with its body read as `T` (storage holding something else is corrupt).
pub fn read_document<T: serde::de::DeserializeOwned>(
    q: &dyn store::Queries,
    kind: &str,
    tenant: u128,
    id: &str,
) -> store::Result<Option<(store::Document, T)>> {
    match q.document(kind, tenant, id)? {
        Some(doc) => {
            let body = serde_json::from_str(&doc.body).map_err(|e| store::StoreError::Corrupt(e.to_string()))?;
            Ok(Some((doc, body)))
        }
        None => Ok(None),
    }
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
pub async fn ensure_settlement(state: &AppState, tenant: u128) -> Result<AccountKey, Problem> {
    let key = settlement_key(state, tenant);
    if state.pix_runtime.settled.lock().expect("not poisoned").contains(&tenant) {
        return Ok(key);
    }
    let open = AccountCommand::Create(NewAccount {
        key,
        currency: Currency::parse("BRL").expect("BRL is ISO 4217"),
        code: crate::dto::PIX_CODE,
        flags: AccountFlags::default(),
        credit_limit: 0,
        metadata: Some(r#"{"rtpay":"pix settlement"}"#.into()),
        holder: None,
    });
    // Not through the request's audit entry: the request records its own outcome.
    match crate::routes::submit_unrecorded(state, store::Command::Accounts(vec![open])).await? {
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
    /// The paying holder of an off-us payment still `processing` (whose spend counters a
    /// rejection gives back), for the node that settles it after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_holder: Option<String>,
    /// The periods its amount was counted in against the payer's limits, which a rejection gives
    /// back (an off-us payment still `processing`): the node that records the verdict may have
    /// another night (`--pix-night`), or the same node after a restart. Absent on payments stored
    /// before it was kept: their periods are worked out again from their time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted: Option<Counted>,
    /// Until when its pacs.008 may be sent (nanoseconds since the epoch; an off-us payment still
    /// `processing`): its time plus the SPI time-out of the node that made it. A sweep of any
    /// node takes the SPI's "never received" as final only after it (and [`SWEEP_MARGIN`]),
    /// whatever its own `--spi-timeout-ms`: nodes set differently, or one restarted with a
    /// shorter time-out, would otherwise void a hold whose payment is still being sent. Absent on
    /// payments stored before it was kept: the sweeping node's time-out counts from their time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_by: Option<u64>,
}

/// The counter periods a payment's amount went into: its day's, and its night's when it was made
/// at night ([`spend_periods`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    pub day: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub night: Option<u64>,
}

/// A payment's document, read: the one place it is parsed (a document that does not parse is
/// corrupt storage, never a payment to skip or to take for absent).
pub fn read_payment(
    q: &dyn store::Queries,
    tenant: u128,
    id: &str,
) -> store::Result<Option<(store::Document, StoredPayment)>> {
    read_document(q, PAYMENT_KIND, tenant, id)
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
    /// The paying account when it is of this rtpay (`tenant:account`), where a refund goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_account: Option<String>,
    /// The blind index of the key whose webhook heard of this Pix (one with a txid on a key):
    /// it hears of the Pix's refunds too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified_key: Option<String>,
    /// The keyed fingerprint of the message that brought it from another institution (the
    /// sandbox's request): a repeat of its EndToEndId with anything else is refused. Absent on
    /// on-us Pix and on records of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// The party on one side of an on-us payment, resolved from storage.
#[derive(Clone, Debug)]
pub struct Party {
    pub tenant: u128,
    pub account: u128,
    pub holder: u128,
    pub person: bool,
    pub view: CreditorView,
    /// What a pacs.008 names the payer by: never shown to the other side's users.
    pub identity: Identity,
}

/// A holder's full name and document (digits), for the SPI; its `Debug` shows neither.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub document: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(..)")
    }
}

impl Party {
    /// This party as the debtor of a pacs.008: its full name and document, not the masked view.
    pub fn debtor(&self) -> pix::spi::Party {
        pix::spi::Party {
            ispb: self.view.ispb.clone(),
            branch: "0001".into(),
            account: uuid_string(self.account).replace('-', ""),
            account_type: "CACC".into(),
            document: self.identity.document.clone(),
            name: self.identity.name.clone(),
        }
    }
}

/// Reads an account's holder and shows it as the other side sees it (name masked for persons).
///
/// What it reads never changes (an account's currency and holder, the holder's kind, name and
/// document), so each node keeps the answer ([`PixRuntime`]'s bounded party cache).
pub fn party(
    rt: &PixRuntime,
    vault: &VaultService,
    q: &dyn store::Queries,
    ispb: &str,
    tenant: u128,
    account: u128,
) -> Result<Result<Party, &'static str>, VaultFailure> {
    if let Some(p) = rt.parties.lock().expect("not poisoned").get(&(tenant, account)) {
        return Ok(Ok(p.clone()));
    }
    let found = read_party(vault, q, ispb, tenant, account)?;
    if let Ok(p) = &found {
        let mut cache = rt.parties.lock().expect("not poisoned");
        if cache.len() >= PARTY_CACHE_MAX {
            cache.clear();
        }
        cache.insert((tenant, account), p.clone());
    }
    Ok(found)
}

fn read_party(
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
    let document = String::from_utf8_lossy(&doc).into_owned();
    let person = h.kind == "person";
    Ok(Ok(Party {
        tenant,
        account,
        holder: holder_id,
        person,
        view: CreditorView {
            ispb: ispb.to_owned(),
            name: if person { pix::keys::mask_person_name(&name) } else { name.clone() },
            document: vault::mask::document(&document),
            kind: h.kind,
        },
        identity: Identity { name, document },
    }))
}

/// Counter scopes of a payer's spending (per local day and per night, see `pix::limits`): the
/// payer's tenant and holder, as every key in storage is the tenant's. (Until migration 13 on
/// SQLite, 11 on PostgreSQL, they named the holder alone, and two tenants' holders under one id
/// shared their totals: one tenant's customer spent another's limit.)
pub fn spend_scopes(tenant: u128, holder: u128) -> (String, String) {
    let (tenant, holder) = (uuid_string(tenant), uuid_string(holder));
    (format!("pix-day:{tenant}:{holder}"), format!("pix-night:{tenant}:{holder}"))
}

const HOUR: u64 = 3_600_000_000_000;

impl From<(u64, Option<u64>)> for Counted {
    fn from((day, night): (u64, Option<u64>)) -> Counted {
        Counted { day, night }
    }
}

/// Counter periods of a time: (day index, night index) in hours since the epoch of their start.
pub fn spend_periods(night: pix::limits::Night, now: u64) -> (u64, Option<u64>) {
    let p = night.period(now);
    (p.day_start / HOUR, p.night.then_some(p.night_start / HOUR))
}

/// The conditions under which the running-total limits that admitted `amount` still admit it:
/// each total is at most the limit less the amount (checked again by the writer under the batch's
/// lock).
pub fn limit_guards(
    limits: &pix::limits::Limits,
    night: pix::limits::Night,
    tenant: u128,
    holder: u128,
    amount: u64,
    now: u64,
) -> Vec<store::Guard> {
    let (day_scope, night_scope) = spend_scopes(tenant, holder);
    let (day, tonight) = spend_periods(night, now);
    let room = |limit: u64| i64::try_from(limit.saturating_sub(amount)).unwrap_or(i64::MAX);
    let mut guards = Vec::new();
    if let Some(limit) = limits.daily {
        guards.push(store::Guard::CounterAtMost { scope: day_scope, period: day, max: room(limit) });
    }
    if let (Some(limit), Some(n)) = (limits.nightly, tonight) {
        guards.push(store::Guard::CounterAtMost { scope: night_scope, period: n, max: room(limit) });
    }
    guards
}

/// What a payer spent so far today and tonight.
pub fn spent(
    q: &dyn store::Queries,
    tenant: u128,
    holder: u128,
    night: pix::limits::Night,
    now: u64,
) -> store::Result<(u64, u64)> {
    let (day_scope, night_scope) = spend_scopes(tenant, holder);
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
#[schema(as = PixLimits)]
pub struct LimitsBody {
    #[schema(minimum = 1, maximum = 999999999999_u64)]
    pub per_transaction: Option<u64>,
    #[schema(minimum = 1, maximum = 999999999999_u64)]
    pub daily: Option<u64>,
    #[schema(minimum = 1, maximum = 999999999999_u64)]
    pub nightly: Option<u64>,
    #[schema(minimum = 1, maximum = 999999999999_u64)]
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

/// Where a payment's money goes.
pub enum Payee {
    /// An account of this rtpay: settled at once.
    OnUs(Party),
    /// Another institution, through the SPI connector.
    OffUs(pix::spi::Party),
}

/// A payment ready to commit.
pub struct Prepared {
    pub payer: Party,
    pub payee: Payee,
    pub amount: u64,
    pub view: PaymentView,
    pub fingerprint: String,
    /// Why it is rejected before any money moves (a limit), if it is.
    pub refused: Option<(String, String)>,
    /// When the limits were checked: the spend is counted in that time's day and night.
    pub checked_at: u64,
    /// The running-total limits that admitted it, as conditions of its commit: across the
    /// nodes of a cluster, no two payments both fit under what only one of them fits.
    pub limit_guards: Vec<store::Guard>,
    /// The charge (cob) this payment concludes: its document as read, under the charge's lock.
    pub concludes: Option<store::Document>,
    /// The blind index of the key paid (on us), whose webhook hears of it.
    pub payee_key_index: Option<String>,
    /// The DICT token the payment's look-up holds until it settles or is charged.
    pub lookup: Option<LookupReservation>,
}

/// The charge's document concluded by the Pix `e2e`.
pub fn concluded_cob(doc: &store::Document, e2e: &str) -> Option<store::Record> {
    let mut stored: crate::routes::api_pix::StoredCob = serde_json::from_str(&doc.body).ok()?;
    stored.status = pix::charge::CobStatus::Concluida.as_str().into();
    stored.paid_by = Some(e2e.to_owned());
    Some(store::Record::Document(store::Document {
        version: doc.version + 1,
        body: serde_json::to_string(&stored).expect("serializable"),
        ..doc.clone()
    }))
}

/// The ledger id of a payment's `n`th transfer in the payer's tenant (1: an on-us payment's
/// transfer, the first of a chain through another tenant, or an off-us hold; 2: the hold's post or
/// void; the chain's second is [`payment_credit_transfer`]). It sorts where the payment's id
/// sorts (see [`crate::auth::Keys::derived_id_near`]).
pub fn payment_transfer(state: &AppState, tenant: u128, payment_id: &str, n: u32) -> TransferKey {
    let anchor = payment_anchor(payment_id);
    TransferKey {
        tenant: TenantId(tenant),
        id: TransferId(
            state.keys.derived_id_near(b"pix-transfer", tenant, &format!("{payment_id}:{n}"), anchor).as_u128(),
        ),
    }
}

/// Where a payment's transfer ids sort: at its id. The id is a UUID, parsed on the way in;
/// anything else (not reachable) sorts first.
fn payment_anchor(payment_id: &str) -> u128 {
    uuid::Uuid::parse_str(payment_id).map_or(0, |u| u.as_u128())
}

/// The ledger id of an on-us payment's transfer in another tenant (its settlement account to the
/// payee). A payment's id is unique only within the payer's tenant, so the payer's tenant names
/// it too. Named by the payment's id alone (as it was, `payment_transfer(payee's tenant, id,
/// 2)`), two tenants' payments under one id to one tenant's accounts met in one transfer id, and
/// the later one was rejected (`exists_with_different_fields`); and that tenant's own off-us
/// payment under the id could not post or void its hold.
pub fn payment_credit_transfer(
    state: &AppState,
    payer_tenant: u128,
    payee_tenant: u128,
    payment_id: &str,
) -> TransferKey {
    let anchor = payment_anchor(payment_id);
    let name = format!("{}:{payment_id}", crate::dto::uuid_string(payer_tenant));
    TransferKey {
        tenant: TenantId(payee_tenant),
        id: TransferId(state.keys.derived_id_near(b"pix-transfer-in", payee_tenant, &name, anchor).as_u128()),
    }
}

/// An off-us hold's time-out: none (0). Once the pacs.008 may have left, the money may have left
/// with it: a hold that expired by itself would give the payer back money the SPI paid out (a
/// node down for a while, a PostgreSQL outage, a lost answer). The hold is posted or voided on
/// the SPI's verdict only, from its answer or from a status query ([`resume`]).
pub(crate) const OFF_US_HOLD_TIMEOUT_SECONDS: u32 = 0;
/// Tries to record an SPI verdict (1, 2, 4, 8, 8 ... s apart); then a sweep takes it over.
pub(crate) const VERDICT_TRIES: u32 = 5;

/// The owner of an off-us payment's document while its verdict is not recorded: what the sweep
/// ([`resume`]) lists.
pub(crate) const IN_FLIGHT: &str = "spi-in-flight";

fn payment_document(tenant: u128, version: u64, at: u64, stored: &StoredPayment) -> store::Record {
    store::Record::Document(store::Document {
        kind: PAYMENT_KIND.into(),
        tenant_id: tenant,
        id: stored.view.id.clone(),
        lookup: Some(stored.view.end_to_end_id.clone()),
        // Only an off-us payment waiting for its verdict has an owner. Nothing counts or lists
        // payments by account: an owner for every payment would cost an index entry in the
        // writer's batch.
        owner: (stored.view.status == "processing").then(|| IN_FLIGHT.to_owned()),
        created_at: at,
        version,
        body: serde_json::to_string(stored).expect("serializable"),
    })
}

/// Commits a payment: its money movement (an on-us chain, or an off-us hold), the payment's
/// documents, the payer's spend counters and the audit entry, in one transaction. Answers the
/// payment as stored, and whether this request created it (a concurrent twin may have).
/// An off-us payment then goes to the SPI connector in the background.
pub async fn commit_payment(state: &AppState, audit: &Audit, p: Prepared) -> Result<(PaymentView, bool), Problem> {
    let payer_tenant = p.payer.tenant;
    let payment_id = p.view.id.clone();
    let now = p.checked_at;
    let send_by = now.saturating_add(state.pix.spi_timeout.as_nanos() as u64);
    let event = |key: TransferKey, kind: EventKind, linked: bool| TransferEvent {
        key,
        kind,
        code: crate::dto::PIX_CODE,
        // The payment's id, not its EndToEndId (drawn per request): a twin request then finds
        // its transfers `exists` and writes nothing.
        metadata: Some(format!(r#"{{"pix_payment":"{}"}}"#, p.view.id)),
        linked,
    };
    let posted = |debit: u128, credit: u128| EventKind::Posted {
        debit: AccountId(debit),
        credit: AccountId(credit),
        amount: p.amount,
    };
    let mut events = Vec::new();
    match (&p.refused, &p.payee) {
        (Some(_), _) => {}
        (None, Payee::OnUs(payee)) if payee.tenant == payer_tenant => {
            events.push(event(
                payment_transfer(state, payer_tenant, &payment_id, 1),
                posted(p.payer.account, payee.account),
                false,
            ));
        }
        (None, Payee::OnUs(payee)) => {
            let payer_settlement = ensure_settlement(state, payer_tenant).await?;
            let payee_settlement = ensure_settlement(state, payee.tenant).await?;
            let first = payment_transfer(state, payer_tenant, &payment_id, 1);
            events.push(event(first, posted(p.payer.account, payer_settlement.id.0), true));
            let second = payment_credit_transfer(state, payer_tenant, payee.tenant, &payment_id);
            events.push(event(second, posted(payee_settlement.id.0, payee.account), false));
        }
        (None, Payee::OffUs(_)) => {
            let settlement = ensure_settlement(state, payer_tenant).await?;
            // The hold never expires: only the SPI's verdict settles it (see [`settle_off_us`]).
            let hold = EventKind::Pending {
                debit: AccountId(p.payer.account),
                credit: settlement.id,
                amount: p.amount,
                timeout_seconds: OFF_US_HOLD_TIMEOUT_SECONDS,
            };
            events.push(event(payment_transfer(state, payer_tenant, &payment_id, 1), hold, false));
        }
    }
    let (day_scope, night_scope) = spend_scopes(p.payer.tenant, p.payer.holder);
    let (day, night) = spend_periods(state.pix.night, now);
    let off_us = matches!(p.payee, Payee::OffUs(_));
    let received_by = match &p.payee {
        Payee::OnUs(payee) => Some((payee.tenant, payee.account)),
        Payee::OffUs(_) => None,
    };
    let payer = p.payer.clone();
    let concludes = p.concludes.clone();
    let key_index = p.payee_key_index.clone();
    let (view, fingerprint, amount, refused) = (p.view.clone(), p.fingerprint.clone(), p.amount, p.refused.clone());
    let conclude = move |result: TransferResult| -> (PaymentView, Vec<store::Record>) {
        let mut view = view.clone();
        let mut records = Vec::new();
        match (&refused, result) {
            (Some((reason, detail)), _) => {
                view.status = "rejected".into();
                view.reason = Some(reason.clone());
                view.reason_detail = Some(detail.clone());
            }
            // A twin request created it first: it wrote the documents.
            (None, TransferResult::Exists) => return (view, records),
            (None, TransferResult::Created) => {
                view.status = if off_us { "processing" } else { "completed" }.into();
                records.push(store::Record::Count { scope: day_scope.clone(), period: day, delta: amount as i64 });
                if let Some(n) = night {
                    records.push(store::Record::Count { scope: night_scope.clone(), period: n, delta: amount as i64 });
                }
                if let Some((tenant, account)) = received_by {
                    let received = StoredReceived {
                        end_to_end_id: view.end_to_end_id.clone(),
                        credit_account_id: uuid_string(account),
                        amount,
                        txid: view.txid.clone(),
                        payer: payer.view.clone(),
                        description: view.description.clone(),
                        received_at: crate::dto::rfc3339(now),
                        received_at_nanos: now,
                        payer_account: Some(account_owner(payer.tenant, payer.account)),
                        notified_key: key_index.clone().filter(|_| view.txid.is_some()),
                        fingerprint: None,
                    };
                    records.push(received_document(tenant, now, &received));
                    // The webhook's delivery is due from this commit on (the API Pix notifies Pix
                    // with a txid only).
                    if let (Some(index), Some(txid)) = (&key_index, &view.txid) {
                        let pix = crate::routes::api_pix::pix_notification(
                            &view.end_to_end_id,
                            amount,
                            Some(txid),
                            view.description.as_deref(),
                            now,
                        );
                        records.push(crate::webhook::outbox_record(
                            tenant,
                            index,
                            &view.end_to_end_id,
                            None,
                            &pix,
                            now,
                        ));
                    }
                }
                if let Some(cob) = concludes.as_ref().and_then(|d| concluded_cob(d, &view.end_to_end_id)) {
                    records.push(cob);
                }
            }
            (None, failure) => {
                view.status = "rejected".into();
                view.reason = Some(failure.as_str().to_owned());
                view.reason_detail = Some(crate::routes::ledger_problem(failure, "").detail);
            }
        }
        let processing = view.status == "processing";
        let payer_holder = processing.then(|| uuid_string(payer.holder));
        let counted = processing.then_some(Counted { day, night });
        let send_by = processing.then_some(send_by);
        let stored =
            StoredPayment { view: view.clone(), fingerprint: fingerprint.clone(), payer_holder, counted, send_by };
        records.push(payment_document(payer.tenant, 1, now, &stored));
        (view, records)
    };
    let conclude = Arc::new(conclude);
    // What the commit writes when the payment settles (or is refused before any money moves: then
    // the result does not matter), made here and not on the writer's thread, which is the one
    // every payment waits for: the documents' JSON was 8 % of its time.
    let is_refused = p.refused.is_some();
    let (expected_view, expected_records) = conclude(TransferResult::Created);
    let ready = std::sync::Mutex::new(Some(expected_records));
    let in_batch = conclude.clone();
    let records: store::RecordsFn = Box::new(move |reply| {
        let result = reply.chain_result();
        if is_refused || result == TransferResult::Created {
            if let Some(records) = ready.lock().expect("not poisoned").take() {
                return records;
            }
        }
        in_batch(result).1
    });
    let command = if events.is_empty() { store::Command::Audit(vec![]) } else { store::Command::Transfers(events) };
    // The payment's id is new: its document must still be absent when this commits (a request
    // with the same id, on this node or another, may have committed since this one read), so that
    // no request overwrites another's payment, whatever each concluded. A charge is paid once,
    // across every node: its document must be as read when this commits; and the payer's running
    // totals must still leave room for it.
    let absent = store::Guard::Document {
        kind: PAYMENT_KIND.into(),
        tenant_id: payer_tenant,
        id: payment_id.clone(),
        version: 0,
    };
    let guards = std::iter::once(absent)
        .chain(p.concludes.iter().map(store::Guard::of))
        .chain(p.limit_guards.iter().cloned())
        .collect();
    let reply = match crate::routes::submit_guarded(state, audit, command, Some(records), guards).await {
        Ok(reply) => reply,
        Err(problem) => {
            // Another request committed this payment id first (a twin, or one with another
            // body): this one changed nothing, and the caller answers what that one stored.
            let id = payment_id.clone();
            let stored = crate::routes::query(state, move |q| q.document(PAYMENT_KIND, payer_tenant, &id)).await;
            return match stored {
                Ok(Some(_)) => Ok((expected_view, false)),
                _ => Err(problem),
            };
        }
    };
    let result = reply.chain_result();
    let view = if is_refused || result == TransferResult::Created { expected_view } else { conclude(result).0 };
    if result == TransferResult::Created && !is_refused {
        // The commit wrote the webhook's outbox entry (a Pix with a txid, on a key): deliver it.
        if let (Payee::OnUs(payee), Some(_), Some(_)) = (&p.payee, &view.txid, &p.payee_key_index) {
            crate::webhook::notify(state, payee.tenant, view.end_to_end_id.clone());
        }
        if let Payee::OffUs(creditor) = p.payee {
            let transfer = pix::spi::CreditTransfer {
                end_to_end_id: view.end_to_end_id.clone(),
                amount: p.amount,
                debtor: p.payer.debtor(),
                creditor,
                remittance: view.description.clone(),
            };
            let in_flight = InFlight {
                tenant: payer_tenant,
                holder: p.payer.holder,
                at: now,
                send_by,
                counted: Some(Counted { day, night }),
                view: view.clone(),
                fingerprint: p.fingerprint,
            };
            // Of twin requests, the one whose commit created the payment sends it, claiming it for
            // this node at once. A sweep of this node could hold it only once it is due, past the
            // window in which it may be sent (see `settle_off_us`): then the sweep settles it.
            match claim(&state.pix_runtime, payer_tenant, &payment_id) {
                Some(claimed) => drop(tokio::spawn(settle_off_us(state.clone(), in_flight, transfer, claimed))),
                None => {
                    tracing::warn!("an off-us payment was claimed by a sweep before it was sent; the sweep settles it")
                }
            }
        }
    }
    Ok((view, result != TransferResult::Exists || is_refused))
}

pub fn received_document(tenant: u128, at: u64, received: &StoredReceived) -> store::Record {
    store::Record::Document(store::Document {
        kind: RECEIVED_KIND.into(),
        tenant_id: tenant,
        id: received.end_to_end_id.clone(),
        // Unique per tenant by its id; a lookup across tenants could collide with a sandbox
        // client's EndToEndId and fail the whole writer batch.
        lookup: None,
        // No owner: the credited account is in the body, and nothing counts or lists received
        // Pix by account; an owner would cost an index entry (a random page, one per payee) in
        // the writer's batch.
        owner: None,
        created_at: at,
        version: 1,
        body: serde_json::to_string(received).expect("serializable"),
    })
}

/// An off-us payment waiting for its verdict.
struct InFlight {
    tenant: u128,
    holder: u128,
    /// When it was committed (its documents' and counters' time).
    at: u64,
    /// Until when it may be sent (see [`StoredPayment::send_by`]).
    send_by: u64,
    /// The periods it was counted in (none known for payments stored before they were kept).
    counted: Option<Counted>,
    view: PaymentView,
    fingerprint: String,
}

/// Sends an off-us payment to the connector, then records its verdict ([`record_verdict`]). No
/// answer within the time-out, or a connector error, is not a verdict: the SPI may have received
/// the payment and settled it. The node then asks the SPI what became of it
/// ([`settle_from_status`]), as a sweep would for a payment whose node stopped.
///
/// A payment is sent only within its SPI time-out from the payment's time (a slow commit, a wait
/// for a twin's claim): past it, a sweep of any node may soon ask the SPI about it, hear "never
/// received" and void its hold, and a pacs.008 sent after that would be paid with the payer's
/// money given back. Such a payment is settled from a status query instead (the SPI never got it:
/// rejected, AB03).
async fn settle_off_us(state: AppState, p: InFlight, transfer: pix::spi::CreditTransfer, claimed: Claim) {
    let connector = state.pix_runtime.connector.clone();
    let now = store::now_nanos();
    if now >= p.send_by {
        tracing::warn!("an off-us payment was not sent within its SPI time-out; settling it from its status");
        settle_from_status(&state, p).await;
        drop(claimed);
        return;
    }
    // The send ends with the window: a connector writes nothing once its future is dropped.
    let window = std::time::Duration::from_nanos(p.send_by - now);
    let budget = window.min(state.pix.spi_timeout);
    match tokio::time::timeout(budget, connector.send(transfer)).await {
        Ok(Ok(verdict)) => {
            state.pix_runtime.breaker.lock().expect("not poisoned").success();
            record_verdict(&state, p, verdict).await;
        }
        failed => {
            if connector_failed(failed.is_err(), budget, state.pix.spi_timeout) {
                state.pix_runtime.breaker.lock().expect("not poisoned").failure(store::now_nanos());
            }
            settle_from_status(&state, p).await;
        }
    }
    drop(claimed);
}

/// Whether a send that did not end in a verdict counts against the connector (towards opening
/// the breaker): an error always; a time-out only when the connector had at least half its own
/// time-out. A payment whose window a slow commit used up (the window is counted from its check)
/// timed out on rtpay's side: five such in a row opened the breaker on a healthy SPI.
fn connector_failed(timed_out: bool, budget: std::time::Duration, spi_timeout: std::time::Duration) -> bool {
    !timed_out || budget >= spi_timeout / 2
}

/// Posts an off-us payment's hold on acceptance or voids it on rejection, with the payment's new
/// status, in one commit, guarded on the payment's document being still as first stored: of two
/// nodes recording a verdict (the sender and a sweep after a restart), one applies and the other
/// finds it done.
async fn record_verdict(state: &AppState, p: InFlight, verdict: pix::spi::Status) {
    let InFlight { tenant, holder, at, counted, view, fingerprint, .. } = p;
    let amount = view.amount;
    let hold = payment_transfer(state, tenant, &view.id, 1);
    let kind = match verdict {
        pix::spi::Status::Accepted => EventKind::PostPending { pending_id: hold.id, amount: None },
        pix::spi::Status::Rejected(_) => EventKind::VoidPending { pending_id: hold.id },
    };
    let event = TransferEvent {
        key: payment_transfer(state, tenant, &view.id, 2),
        kind,
        code: crate::dto::PIX_CODE,
        metadata: Some(format!(r#"{{"pix_payment":"{}"}}"#, view.id)),
        linked: false,
    };
    let slot = crate::audit_trail::Slot::new("pix.spi.verdict".into(), crate::next_request_id(), None);
    slot.set_actor(Some(tenant), "spi".into());
    slot.set_resource(format!("pix-payment:{}", view.id));
    let audit = Audit(Arc::new(slot));
    let night = state.pix.night;
    let payment_id = view.id.clone();
    let records = Arc::new(move |reply: &store::Reply| -> Vec<store::Record> {
        let result = reply.chain_result();
        let mut records = Vec::new();
        let mut view = view.clone();
        let settled = matches!(verdict, pix::spi::Status::Accepted) && result == TransferResult::Created;
        if settled {
            view.status = "completed".into();
        } else {
            view.status = "rejected".into();
            let (reason, detail) = match verdict {
                pix::spi::Status::Rejected(r) => (r.code().to_owned(), r.describe().to_owned()),
                // Accepted, but the hold is gone: a hold made by an earlier rtpay (which gave off-us
                // holds a time-out) expired first.
                pix::spi::Status::Accepted => {
                    tracing::error!(
                        result = result.as_str(),
                        tenant = %uuid_string(tenant),
                        payment = %view.id,
                        end_to_end_id = %view.end_to_end_id,
                        "the SPI accepted an off-us payment whose hold the ledger no longer holds: reconcile it by hand"
                    );
                    (result.as_str().to_owned(), crate::routes::ledger_problem(result, "").detail)
                }
            };
            view.reason = Some(reason);
            view.reason_detail = Some(detail);
            // What was counted against the payer's limits at submission is given back, in the
            // periods it was counted in.
            let (day_scope, night_scope) = spend_scopes(tenant, holder);
            let Counted { day, night } = counted.unwrap_or_else(|| spend_periods(night, at).into());
            records.push(store::Record::Count { scope: day_scope, period: day, delta: -(amount as i64) });
            if let Some(n) = night {
                records.push(store::Record::Count { scope: night_scope, period: n, delta: -(amount as i64) });
            }
        }
        let stored = StoredPayment {
            view: view.clone(),
            fingerprint: fingerprint.clone(),
            payer_holder: None,
            counted: None,
            send_by: None,
        };
        records.push(payment_document(tenant, 2, at, &stored));
        records
    });
    let guard =
        store::Guard::Document { kind: PAYMENT_KIND.into(), tenant_id: tenant, id: payment_id.clone(), version: 1 };
    // The same transfer id on every try, so a retry never moves money twice.
    for attempt in 0..VERDICT_TRIES {
        let records = records.clone();
        let batch: store::RecordsFn = Box::new(move |reply| records(reply));
        let command = store::Command::Transfers(vec![event.clone()]);
        match crate::routes::submit_guarded(state, &audit, command, Some(batch), vec![guard.clone()]).await {
            Ok(_) => return,
            Err(e) => {
                // Another node may have recorded it (the guard failed): then there is nothing to do.
                let id = payment_id.clone();
                let current = crate::routes::query(state, move |q| read_payment(q, tenant, &id)).await;
                if let Ok(Some((doc, stored))) = current {
                    if doc.version != 1 {
                        let completed = stored.view.status == "completed";
                        let disagree = match verdict {
                            pix::spi::Status::Accepted => !completed,
                            pix::spi::Status::Rejected(_) => completed,
                        };
                        if disagree {
                            tracing::error!(
                                tenant = %uuid_string(tenant),
                                payment = %stored.view.id,
                                end_to_end_id = %stored.view.end_to_end_id,
                                recorded = %stored.view.status,
                                "an off-us payment's verdict disagrees with the one recorded before it: reconcile it by hand"
                            );
                        }
                        return;
                    }
                }
                tracing::warn!(code = %e.code, attempt, "an off-us payment's verdict could not be recorded; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1 << attempt.min(3))).await;
            }
        }
    }
    // The payment stays `processing`, its hold in place; a sweep asks the SPI again and records it.
    tracing::error!(
        tenant = %uuid_string(tenant),
        payment = %payment_id,
        "an off-us payment's verdict was not recorded; a sweep will record it"
    );
}

/// Off-us payments a sweep settles at most at once.
pub(crate) const SWEEP_MAX: usize = 1000;
/// How often each node looks for off-us payments whose verdict nobody is recording.
pub(crate) const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// How long after its SPI time-out a payment is due for a sweep: a payment is sent only within its
/// SPI time-out from its time (see [`settle_off_us`]), and this leaves its pacs.008 the time to
/// reach the SPI, and the nodes' clocks their differences, before a status query's "never
/// received" is taken as final.
pub(crate) const SWEEP_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Until when a payment of time `at` may be sent: as stored, or (stored before it was kept) by
/// this node's SPI time-out.
fn send_by(state: &AppState, at: u64, stored: Option<u64>) -> u64 {
    stored.unwrap_or_else(|| at.saturating_add(state.pix.spi_timeout.as_nanos() as u64))
}

/// When a payment that may be sent until `send_by` is due for a sweep (nanoseconds since the
/// epoch).
pub(crate) fn sweep_due(send_by: u64) -> u64 {
    send_by.saturating_add(SWEEP_MARGIN.as_nanos() as u64)
}

/// This node's clock as a sweep sees it: the only one (embedded), or one of several nodes' over
/// PostgreSQL, with its last measured skew against the database's (nanoseconds, positive: ahead;
/// `None`: not measured yet, or the last measurement failed).
#[derive(Clone, Copy, Debug)]
pub(crate) enum ClockReading {
    One,
    Shared(Option<i64>),
}

pub(crate) fn clock_reading(state: &AppState) -> ClockReading {
    match state.store.location {
        store::Location::Embedded(_) => ClockReading::One,
        store::Location::Postgres(_) => ClockReading::Shared(*state.metrics.clock_skew.lock().expect("metrics lock")),
    }
}

/// Whether the SPI's "never received" is final for a message that may be sent until `send_by`
/// (by another node's clock, perhaps): only past [`sweep_due`] by this node's clock, and, among
/// several nodes, only while this clock was last measured no more than half of [`SWEEP_MARGIN`]
/// ahead of the database's: a node whose clock runs ahead would void the hold of a payment
/// another node is still within its time to send, and the SPI could then pay it. Unmeasured (just
/// started, or the database away), it waits for a reading.
pub(crate) fn unknown_is_final(now: u64, send_by: u64, clock: ClockReading) -> bool {
    let trusted = match clock {
        ClockReading::One => true,
        ClockReading::Shared(skew) => skew.is_some_and(|s| s <= (SWEEP_MARGIN / 2).as_nanos() as i64),
    };
    now >= sweep_due(send_by) && trusted
}

/// Every node, every [`SWEEP_INTERVAL`], settles the off-us payments still waiting for a verdict
/// that no task of its own is waiting for, once their SPI time-out and [`SWEEP_MARGIN`] have
/// passed (their sender's node stopped, its recording failed, or the SPI had not settled them or
/// did not answer when their sender asked): it asks the SPI for each
/// payment's status, never sending it again, and records the verdict; a payment the SPI never
/// received is rejected as timed out (AB03), as its sender would have; one the SPI is still
/// processing waits for the next sweep. Started once per node.
pub fn resume(state: &AppState) {
    sweep_in_flight(state, PAYMENT_KIND, |state, doc, now| {
        let Some(p) = sweepable(state, &doc, now) else { return };
        let Some(claimed) = claim(&state.pix_runtime, doc.tenant_id, &p.view.id) else { return };
        tokio::spawn(settle_by_status(state.clone(), p, claimed));
    });
}

/// Every [`SWEEP_INTERVAL`], hands `visit` the documents of `kind` owned by [`IN_FLIGHT`] (with
/// the time it looked): a page per sweep, after the previous sweep's (see `webhook::resume`), so
/// that records behind many older ones the SPI is still processing are reached too.
pub(crate) fn sweep_in_flight(
    state: &AppState,
    kind: &'static str,
    visit: impl Fn(&AppState, store::Document, u64) + Send + 'static,
) {
    let state = state.clone();
    tokio::spawn(async move {
        let mut after: Option<store::OwnerCursor> = None;
        loop {
            let from = after.take();
            let found =
                crate::routes::query(&state, move |q| q.documents_by_owner(kind, IN_FLIGHT, from.as_ref(), SWEEP_MAX))
                    .await;
            if let Ok(docs) = found {
                after = store::OwnerCursor::next(&docs, SWEEP_MAX);
                let now = store::now_nanos();
                for doc in docs {
                    visit(&state, doc, now);
                }
            }
            tokio::time::sleep(SWEEP_INTERVAL).await;
        }
    });
}

/// The off-us payment `doc` holds, when it is due for a sweep at `now`: still `processing` as first
/// stored, past the moment it may be sent until and [`SWEEP_MARGIN`].
fn sweepable(state: &AppState, doc: &store::Document, now: u64) -> Option<InFlight> {
    let Ok(stored) = serde_json::from_str::<StoredPayment>(&doc.body) else {
        tracing::error!(tenant = %uuid_string(doc.tenant_id), id = %doc.id, "a payment's document does not parse: the sweep leaves it");
        return None;
    };
    let send_by = send_by(state, doc.created_at, stored.send_by);
    let holder = stored.payer_holder.as_deref().and_then(|h| uuid::Uuid::parse_str(h).ok());
    let (Some(holder), "processing", 1) = (holder, stored.view.status.as_str(), doc.version) else {
        return None;
    };
    (sweep_due(send_by) <= now).then(|| InFlight {
        tenant: doc.tenant_id,
        holder: holder.as_u128(),
        at: doc.created_at,
        send_by,
        counted: stored.counted,
        view: stored.view,
        fingerprint: stored.fingerprint,
    })
}

/// A sweep's settling of `p`, which it claimed.
async fn settle_by_status(state: AppState, p: InFlight, claimed: Claim) {
    settle_from_status(&state, p).await;
    drop(claimed);
}

/// Asks the SPI what became of `p` (a status query by EndToEndId) and records it: settled, its
/// verdict; never received, a rejection as timed out (AB03), as it will never be settled, but
/// only once the payment is due for a sweep ([`SWEEP_MARGIN`] past its SPI time-out): a pacs.008
/// sent a moment ago (its sender's connection failed after writing it) may still be on its way,
/// and the SPI would pay it after its hold was voided. A payment the SPI is still processing,
/// one it does not know yet, or a query it does not answer, is left `processing`, its hold in
/// place: a sweep asks again.
async fn settle_from_status(state: &AppState, p: InFlight) {
    let connector = state.pix_runtime.connector.clone();
    let unknown_is_final = unknown_is_final(store::now_nanos(), p.send_by, clock_reading(state));
    match tokio::time::timeout(state.pix.spi_timeout, connector.status(&p.view.end_to_end_id)).await {
        Ok(Ok(crate::spi::Found::Settled(verdict))) => record_verdict(state, p, verdict).await,
        Ok(Ok(crate::spi::Found::Unknown)) if unknown_is_final => {
            record_verdict(state, p, pix::spi::Status::Rejected(pix::spi::RejectReason::Timeout)).await
        }
        Ok(Ok(crate::spi::Found::Unknown | crate::spi::Found::InProcess)) => {}
        Ok(Err(_)) | Err(_) => tracing::warn!("the SPI did not answer a status query; asking again at the next sweep"),
    }
}

/// An off-us payment still `processing` whose hold the ledger has settled without its verdict
/// being recorded: what the ledger says is the truth. Only holds made by an earlier rtpay, which
/// gave them a time-out, can do so (they expired while rtpay was stopped); a verdict settles a
/// hold in the commit that records it.
pub fn reconcile(
    state: &AppState,
    q: &dyn store::Queries,
    tenant: u128,
    mut view: PaymentView,
) -> store::Result<PaymentView> {
    if view.status != "processing" {
        return Ok(view);
    }
    let mut hold = q.entry(payment_transfer(state, tenant, &view.id, 1))?;
    if hold.is_none() {
        // A payment stored by an earlier rtpay, whose transfer ids were the keyed hash alone.
        let legacy = state.keys.derived_id(b"pix-transfer", tenant, &format!("{}:1", view.id)).as_u128();
        hold = q.entry(TransferKey { tenant: TenantId(tenant), id: TransferId(legacy) })?;
    }
    let Some(ledger::Entry::Created(hold)) = hold else { return Ok(view) };
    // What the ledger says became of it: posted, or given back (without a verdict recorded, only
    // a time-out can have done that).
    let rejected = match hold.state {
        ledger::PendingState::Posted => None,
        ledger::PendingState::Voided | ledger::PendingState::Expired => Some(pix::spi::RejectReason::Timeout),
        ledger::PendingState::Pending | ledger::PendingState::Final => return Ok(view),
    };
    // A verdict settles the hold and records the payment in one commit: a hold found settled
    // after the payment was read `processing` may be that commit's, and the payment read again
    // then carries the verdict (and its reason).
    if let Some((_, stored)) = read_payment(q, tenant, &view.id)? {
        if stored.view.status != "processing" {
            return Ok(stored.view);
        }
    }
    match rejected {
        None => view.status = "completed".into(),
        Some(r) => {
            view.status = "rejected".into();
            view.reason = Some(r.code().into());
            view.reason_detail = Some(r.describe().into());
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_timed_out_by_its_own_short_window_is_not_the_connectors_failure() {
        let timeout = std::time::Duration::from_secs(3);
        assert!(connector_failed(false, std::time::Duration::from_millis(1), timeout), "an error counts");
        assert!(connector_failed(true, timeout, timeout), "its whole time-out");
        assert!(connector_failed(true, timeout / 2, timeout), "half of it");
        assert!(!connector_failed(true, std::time::Duration::from_millis(5), timeout), "a window used up");
    }

    /// "Never received" voids a hold only past the send window and its margin, and, among nodes,
    /// only on one whose clock was measured and not ahead by half the margin (it could be inside
    /// another node's window still).
    #[test]
    fn never_received_is_final_only_past_the_margin_by_a_clock_not_ahead() {
        let send_by = 1_000_000_000_000;
        let due = sweep_due(send_by);
        assert_eq!(due - send_by, SWEEP_MARGIN.as_nanos() as u64);
        use ClockReading::*;
        assert!(!unknown_is_final(due - 1, send_by, One));
        assert!(unknown_is_final(due, send_by, One), "embedded: one clock");
        assert!(unknown_is_final(due, send_by, Shared(Some(2_000_000_000))), "within the skew allowed");
        assert!(unknown_is_final(due, send_by, Shared(Some(-3_000_000_000))), "behind: late, not early");
        assert!(!unknown_is_final(due, send_by, Shared(Some(2_600_000_000))), "ahead past half the margin");
        assert!(!unknown_is_final(due + 60_000_000_000, send_by, Shared(Some(6_000_000_000))));
        assert!(!unknown_is_final(due + 60_000_000_000, send_by, Shared(None)), "not measured yet");
    }

    /// The payer of an off-us payment goes to the SPI under its full name and document (a pacs.008
    /// names the debtor), not as the other side's users see it (`Maria S.`, `***.982.247-**`, or
    /// no document at all, as before); neither shows in its `Debug`.
    #[test]
    fn the_spi_is_told_the_payers_full_name_and_document() {
        let dir = std::env::temp_dir().join(format!("rtpay-debtor-{}-{}", std::process::id(), store::now_nanos()));
        let store = store::Store::open(&store::Location::Embedded(dir.clone())).unwrap();
        let loader: crate::vault_service::Loader = Box::new(|| {
            let mut ring = vault::Keyring::default();
            ring.add(Box::new(vault::FileKek::new(1, vault::Secret32::from_bytes([3; 32]))));
            Ok(ring)
        });
        let vault = VaultService::new(loader, &vault::Secret32::from_bytes([4; 32])).unwrap();
        let (tenant, holder, account) = (7u128, 8u128, 9u128);
        let dek = vault.data_key(store.queries.as_ref(), tenant).unwrap();
        let sealed = |field: &str, text: &str| {
            vault::seal(&dek, &crate::routes::holders::record_id(tenant, holder, field), text.as_bytes()).unwrap()
        };
        store
            .queries
            .create_holder(&store::HolderRecord {
                tenant_id: tenant,
                id: holder,
                kind: "person".into(),
                name_sealed: sealed("name", "Maria Silva Souza"),
                document_sealed: sealed("document", "52998224725"),
                document_index: [0; 32],
                created_at: 1,
            })
            .unwrap();
        let created = store
            .engine
            .accounts(vec![ledger::AccountCommand::Create(ledger::NewAccount {
                key: AccountKey { tenant: TenantId(tenant), id: AccountId(account) },
                currency: ledger::Currency::parse("BRL").unwrap(),
                code: 1,
                flags: ledger::AccountFlags(0),
                credit_limit: 0,
                metadata: None,
                holder: Some(holder),
            })])
            .unwrap();
        assert_eq!(created[0].0, ledger::AccountResult::Created);
        let payer = read_party(&vault, store.queries.as_ref(), "12345678", tenant, account).unwrap().unwrap();
        assert_eq!((payer.view.name.as_str(), payer.view.document.as_str()), ("Maria S. S.", "***.982.247-**"));
        let debtor = payer.debtor();
        assert_eq!((debtor.name.as_str(), debtor.document.as_str()), ("Maria Silva Souza", "52998224725"));
        assert_eq!(debtor.ispb, "12345678");
        let shown = format!("{payer:?} {debtor:?}");
        assert!(!shown.contains("Silva") && !shown.contains("52998224725"), "{shown}");
        store.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A claim is on a tenant's payment: another tenant's payment under the same id is claimed
    /// apart (before, its sending task found it claimed and never sent it).
    #[test]
    fn an_off_us_claim_is_per_tenant_and_payment() {
        let runtime = Arc::new(PixRuntime::default());
        let first = claim(&runtime, 1, "p").expect("unclaimed");
        let other_tenant = claim(&runtime, 2, "p").expect("another tenant's payment");
        assert!(claim(&runtime, 1, "p").is_none(), "held");
        assert!(claim(&runtime, 1, "q").is_some(), "another payment");
        drop(first);
        assert!(claim(&runtime, 1, "p").is_some(), "given up");
        drop(other_tenant);
    }

    /// A connector that counts what it is asked: every send fails at once, every status query
    /// answers "never received".
    #[derive(Default)]
    struct Counting {
        sends: std::sync::atomic::AtomicU32,
        queries: std::sync::atomic::AtomicU32,
    }

    impl crate::spi::SpiConnector for Counting {
        fn send(&self, _: pix::spi::CreditTransfer) -> crate::spi::SpiFuture {
            self.sends.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err(crate::spi::SpiError("connection reset".into())) })
        }
        fn send_return(&self, _: pix::spi::PaymentReturn) -> crate::spi::SpiFuture {
            self.sends.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err(crate::spi::SpiError("connection reset".into())) })
        }
        fn status(&self, _: &str) -> crate::spi::StatusFuture {
            self.queries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(crate::spi::Found::Unknown) })
        }
    }

    /// A payment is sent only within its SPI time-out from its time; past it, its status is asked
    /// instead. A failed send is followed by a status query, not taken as a rejection, and "never
    /// received" is not final before the payment is due for a sweep: nothing is recorded (no
    /// payment document exists here, so recording would fail and retry for seconds).
    #[tokio::test]
    async fn an_off_us_payment_is_sent_only_within_its_time_out_and_a_failed_send_asks_the_status() {
        let dir = std::env::temp_dir().join(format!("rtpay-send-window-{}-{}", std::process::id(), store::now_nanos()));
        let store = Arc::new(store::Store::open(&store::Location::Embedded(dir.clone())).unwrap());
        let connector = Arc::new(Counting::default());
        let mut state = AppState::new(store.clone(), crate::auth::Keys::new([9; 32], "op"), Vec::new())
            .with_pix(PixSettings { spi_timeout: std::time::Duration::from_secs(1), ..PixSettings::default() });
        state.shared_mut().pix_runtime = Arc::new(PixRuntime::new(connector.clone()));
        let party = crate::spi::tests::party();
        let payment = |n: u128, at: u64| {
            let id = uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n).to_string();
            let e2e = format!("E9999999920261205{n:015}");
            let view: PaymentView = serde_json::from_value(serde_json::json!({
                "id": id, "end_to_end_id": e2e, "status": "processing",
                "debit_account_id": uuid_string(1), "amount": 100, "initiation": "manual",
                "creditor": {"ispb": "60701190", "name": "Maria S.", "document": "***.982.247-**", "type": "person"},
                "created_at": "2026-12-05T00:00:00Z"
            }))
            .unwrap();
            let transfer = pix::spi::CreditTransfer {
                end_to_end_id: e2e,
                amount: 100,
                debtor: party.clone(),
                creditor: party.clone(),
                remittance: None,
            };
            let send_by = send_by(&state, at, None);
            let p = InFlight { tenant: 7, holder: 8, at, send_by, counted: None, view, fingerprint: String::new() };
            (id, p, transfer)
        };
        let quick = std::time::Duration::from_millis(500);
        let counts = || {
            use std::sync::atomic::Ordering::SeqCst;
            (connector.sends.load(SeqCst), connector.queries.load(SeqCst))
        };
        // Made by a node whose time-out is 30 s, 2 s ago: this node's 1 s does not stop its send,
        // nor makes it due for this node's sweep; one stored before `send_by` was kept is, by this
        // node's time-out.
        let (id, mut p, transfer) = payment(3, store::now_nanos() - 2_000_000_000);
        p.send_by = p.at + 30_000_000_000;
        let stored = StoredPayment {
            view: p.view.clone(),
            fingerprint: String::new(),
            payer_holder: Some(uuid_string(8)),
            counted: None,
            send_by: Some(p.send_by),
        };
        let mut doc = match payment_document(7, 1, p.at - 6_000_000_000, &stored) {
            store::Record::Document(doc) => doc,
            _ => unreachable!("a document"),
        };
        assert!(sweepable(&state, &doc, store::now_nanos()).is_none(), "not due before its own time-out");
        doc.body = serde_json::to_string(&StoredPayment { send_by: None, ..stored }).unwrap();
        assert!(sweepable(&state, &doc, store::now_nanos()).is_some(), "due by this node's time-out");
        let claimed = claim(&state.pix_runtime, 7, &id).unwrap();
        let settled = tokio::time::timeout(quick, settle_off_us(state.clone(), p, transfer, claimed)).await;
        assert!(settled.is_ok(), "nothing recorded");
        assert_eq!(counts(), (1, 1), "(sends, status queries)");
        // Committed 2 s ago, past its 1 s time-out: never sent, asked about.
        let (id, p, transfer) = payment(1, store::now_nanos() - 2_000_000_000);
        let claimed = claim(&state.pix_runtime, 7, &id).unwrap();
        let settled = tokio::time::timeout(quick, settle_off_us(state.clone(), p, transfer, claimed)).await;
        assert!(settled.is_ok(), "nothing recorded");
        assert_eq!(counts(), (1, 2), "(sends, status queries)");
        // Committed now: sent; the send fails, so the SPI is asked.
        let (id, p, transfer) = payment(2, store::now_nanos());
        let claimed = claim(&state.pix_runtime, 7, &id).unwrap();
        let settled = tokio::time::timeout(quick, settle_off_us(state.clone(), p, transfer, claimed)).await;
        assert!(settled.is_ok(), "nothing recorded");
        assert_eq!(counts(), (2, 3), "(sends, status queries)");
        assert!(claim(&state.pix_runtime, 7, &id).is_some(), "the claim is given up");
        drop(state);
        Arc::try_unwrap(store).ok().expect("the test holds the store's last reference").close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What reads of an off-us payment still `processing` show: what the ledger did with its hold,
    /// found under the transfer id of either scheme (payments stored by an earlier rtpay have
    /// holds under the keyed hash alone).
    #[test]
    fn a_processing_payment_reads_as_its_hold_under_either_id_scheme() {
        let dir = std::env::temp_dir().join(format!("rtpay-reconcile-{}-{}", std::process::id(), store::now_nanos()));
        let store = Arc::new(store::Store::open(&store::Location::Embedded(dir.clone())).unwrap());
        let state = AppState::new(store.clone(), crate::auth::Keys::new([9; 32], "op"), Vec::new());
        let tenant = 0x7e;
        let (payer, settlement) = (AccountId(1), AccountId(2));
        let accounts = [payer, settlement]
            .map(|id| {
                AccountCommand::Create(NewAccount {
                    key: AccountKey { tenant: TenantId(tenant), id },
                    currency: Currency::parse("BRL").unwrap(),
                    code: 1,
                    flags: AccountFlags(0),
                    credit_limit: 0,
                    metadata: None,
                    holder: None,
                })
            })
            .to_vec();
        assert!(store.engine.accounts(accounts).unwrap().iter().all(|(r, _)| *r == AccountResult::Created));
        let apply = |kind: EventKind, id: TransferId| {
            let key = TransferKey { tenant: TenantId(tenant), id };
            let event = TransferEvent { key, kind, code: 1, metadata: None, linked: false };
            assert_eq!(store.engine.transfers(vec![event]).unwrap()[0].result, TransferResult::Created);
        };
        let legacy = |payment: &str| {
            TransferId(state.keys.derived_id(b"pix-transfer", tenant, &format!("{payment}:1")).as_u128())
        };
        let current = |payment: &str| payment_transfer(&state, tenant, payment, 1).id;
        let hold = |id: TransferId| {
            apply(EventKind::Pending { debit: payer, credit: settlement, amount: 100, timeout_seconds: 3600 }, id)
        };
        let post =
            |pending_id: TransferId, n: u128| apply(EventKind::PostPending { pending_id, amount: None }, TransferId(n));
        let void = |pending_id: TransferId, n: u128| apply(EventKind::VoidPending { pending_id }, TransferId(n));

        let payments: Vec<String> = (1..=6u128)
            .map(|n| uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n).to_string())
            .collect();
        let [posted_now, voided_now, posted_then, voided_then, pending_then, none] =
            <[String; 6]>::try_from(payments).unwrap();
        hold(current(&posted_now));
        post(current(&posted_now), 101);
        hold(current(&voided_now));
        void(current(&voided_now), 102);
        hold(legacy(&posted_then));
        post(legacy(&posted_then), 103);
        hold(legacy(&voided_then));
        void(legacy(&voided_then), 104);
        hold(legacy(&pending_then));

        let read = |payment: &str| {
            let view: PaymentView = serde_json::from_value(serde_json::json!({
                "id": payment, "end_to_end_id": "E9999999920261205000000000000001", "status": "processing",
                "debit_account_id": uuid_string(payer.0), "amount": 100, "initiation": "key",
                "creditor": {"ispb": "00000000", "name": "Maria S.", "document": "***.982.247-**", "type": "person"},
                "created_at": "2026-12-05T00:00:00Z"
            }))
            .unwrap();
            reconcile(&state, store.queries.as_ref(), tenant, view).unwrap()
        };
        for (payment, status) in [
            (&posted_now, "completed"),
            (&voided_now, "rejected"),
            (&posted_then, "completed"),
            (&voided_then, "rejected"),
            (&pending_then, "processing"),
            (&none, "processing"),
        ] {
            let view = read(payment);
            assert_eq!(view.status, status, "payment {payment}");
            if status == "rejected" {
                assert_eq!(view.reason.as_deref(), Some(pix::spi::RejectReason::Timeout.code()), "payment {payment}");
            } else {
                assert_eq!(view.reason, None, "payment {payment}");
            }
        }
        // A payment read `processing` just before its verdict's commit, whose hold is then read
        // voided by that commit: the verdict recorded with it is what the payment says (AC03),
        // not a time-out made up from the ledger.
        let verdict = PaymentView {
            id: voided_now.clone(),
            status: "rejected".into(),
            reason: Some(pix::spi::RejectReason::InvalidCreditorAccount.code().into()),
            ..read(&none)
        };
        let stored = StoredPayment {
            view: verdict,
            fingerprint: String::new(),
            payer_holder: None,
            counted: None,
            send_by: None,
        };
        store
            .queries
            .insert_document(&store::Document {
                kind: PAYMENT_KIND.into(),
                tenant_id: tenant,
                id: voided_now.clone(),
                lookup: None,
                owner: None,
                created_at: 1,
                version: 2,
                body: serde_json::to_string(&stored).unwrap(),
            })
            .unwrap();
        let view = read(&voided_now);
        assert_eq!((view.status.as_str(), view.reason.as_deref()), ("rejected", Some("AC03")), "{view:?}");
        drop(state);
        Arc::try_unwrap(store).ok().expect("the test holds the store's last reference").close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
