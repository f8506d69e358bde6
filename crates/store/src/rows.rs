//! Ledger values as flat columns, shared by both engines so that the mapping is written once and
//! checked once: what is written is exactly what is read back.

use std::borrow::Cow;

use ledger::*;

/// The columns of [`EntryRow`], in the order both engines select them.
pub const ENTRY_COLUMNS: &str = "timestamp, tenant_id, id, result, kind, debit_account_id, credit_account_id, amount, \
     currency, pending_id, amount_defaulted, timeout_seconds, expires_at, code, metadata, state";

/// The columns of [`AccountRow`], in the order both engines select them.
pub const ACCOUNT_COLUMNS: &str = "tenant_id, id, currency, code, flags, credit_limit, metadata, timestamp, \
     debits_posted, credits_posted, debits_pending, credits_pending, holder_id";

/// Every column of the `transfers` table, engine-neutral.
/// Written rows borrow their texts from the entry (no copy per row); read rows own them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRow<'a> {
    pub timestamp: i64,
    pub tenant_id: u128,
    pub id: u128,
    /// 0 for a created transfer, otherwise the remembered failure's result code.
    pub result: i16,
    pub kind: i16,
    pub debit_account_id: Option<u128>,
    pub credit_account_id: Option<u128>,
    pub amount: Option<i64>,
    pub currency: Option<Cow<'a, str>>,
    pub pending_id: Option<u128>,
    pub amount_defaulted: bool,
    pub timeout_seconds: i64,
    pub expires_at: Option<i64>,
    pub code: i32,
    pub metadata: Option<Cow<'a, str>>,
    pub state: i16,
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).expect("ledger values fit in i64 (AMOUNT_MAX = 2^63-1)")
}

fn u64_of(v: i64, what: &str) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("{what} is negative in storage"))
}

impl<'a> EntryRow<'a> {
    pub fn of(entry: &'a Entry) -> EntryRow<'a> {
        match entry {
            Entry::Created(t) => EntryRow {
                timestamp: i64_of(t.timestamp),
                tenant_id: t.key.tenant.0,
                id: t.key.id.0,
                result: 0,
                kind: t.kind as i16,
                debit_account_id: Some(t.debit_account_id.0),
                credit_account_id: Some(t.credit_account_id.0),
                amount: Some(i64_of(t.amount)),
                currency: Some(Cow::Borrowed(t.currency.as_str())),
                pending_id: t.pending_id.map(|p| p.0),
                amount_defaulted: t.amount_defaulted,
                timeout_seconds: i64::from(t.timeout_seconds),
                expires_at: t.expires_at.map(i64_of),
                code: i32::from(t.code),
                metadata: t.metadata.as_deref().map(Cow::Borrowed),
                state: t.state as i16,
            },
            Entry::Failed { event, result, timestamp } => {
                let mut row = EntryRow {
                    timestamp: i64_of(*timestamp),
                    tenant_id: event.key.tenant.0,
                    id: event.key.id.0,
                    result: result.as_u16() as i16,
                    kind: 0,
                    debit_account_id: None,
                    credit_account_id: None,
                    amount: None,
                    currency: None,
                    pending_id: None,
                    amount_defaulted: false,
                    timeout_seconds: 0,
                    expires_at: None,
                    code: i32::from(event.code),
                    metadata: event.metadata.as_deref().map(Cow::Borrowed),
                    state: PendingState::Final as i16,
                };
                match event.kind {
                    EventKind::Posted { debit, credit, amount } => {
                        row.kind = TransferKind::Posted as i16;
                        row.debit_account_id = Some(debit.0);
                        row.credit_account_id = Some(credit.0);
                        row.amount = Some(i64_of(amount));
                    }
                    EventKind::Pending { debit, credit, amount, timeout_seconds } => {
                        row.kind = TransferKind::Pending as i16;
                        row.debit_account_id = Some(debit.0);
                        row.credit_account_id = Some(credit.0);
                        row.amount = Some(i64_of(amount));
                        row.timeout_seconds = i64::from(timeout_seconds);
                    }
                    EventKind::PostPending { pending_id, amount } => {
                        row.kind = TransferKind::PostPending as i16;
                        row.pending_id = Some(pending_id.0);
                        row.amount = amount.map(i64_of);
                    }
                    EventKind::VoidPending { pending_id } => {
                        row.kind = TransferKind::VoidPending as i16;
                        row.pending_id = Some(pending_id.0);
                    }
                }
                row
            }
        }
    }

    pub fn into_entry(self) -> Result<Entry, String> {
        let kind = u8::try_from(self.kind)
            .ok()
            .and_then(TransferKind::from_u8)
            .ok_or_else(|| format!("unknown transfer kind {}", self.kind))?;
        let key = TransferKey { tenant: TenantId(self.tenant_id), id: TransferId(self.id) };
        let code = u16::try_from(self.code).map_err(|_| format!("code {} out of range", self.code))?;
        let timestamp = u64_of(self.timestamp, "timestamp")?;
        let need = |v: Option<u128>, what: &str| v.ok_or_else(|| format!("transfer {:032x}: {what} missing", self.id));
        let amount = self.amount.map(|a| u64_of(a, "amount")).transpose()?;
        let timeout_seconds = u32::try_from(self.timeout_seconds).map_err(|_| "timeout out of range".to_owned())?;
        if self.result != 0 {
            let result = u16::try_from(self.result)
                .ok()
                .and_then(TransferResult::from_u16)
                .ok_or_else(|| format!("unknown result code {}", self.result))?;
            let event_kind = match kind {
                TransferKind::Posted => EventKind::Posted {
                    debit: AccountId(need(self.debit_account_id, "debit")?),
                    credit: AccountId(need(self.credit_account_id, "credit")?),
                    amount: amount.ok_or("amount missing")?,
                },
                TransferKind::Pending => EventKind::Pending {
                    debit: AccountId(need(self.debit_account_id, "debit")?),
                    credit: AccountId(need(self.credit_account_id, "credit")?),
                    amount: amount.ok_or("amount missing")?,
                    timeout_seconds,
                },
                TransferKind::PostPending => {
                    EventKind::PostPending { pending_id: TransferId(need(self.pending_id, "pending id")?), amount }
                }
                TransferKind::VoidPending => {
                    EventKind::VoidPending { pending_id: TransferId(need(self.pending_id, "pending id")?) }
                }
            };
            let metadata = self.metadata.map(Cow::into_owned);
            let event = TransferEvent { key, kind: event_kind, code, metadata, linked: false };
            return Ok(Entry::Failed { event, result, timestamp });
        }
        let currency = self.currency.as_deref().ok_or("currency missing")?;
        let state = u8::try_from(self.state)
            .ok()
            .and_then(PendingState::from_u8)
            .ok_or_else(|| format!("unknown pending state {}", self.state))?;
        Ok(Entry::Created(Transfer {
            key,
            debit_account_id: AccountId(need(self.debit_account_id, "debit")?),
            credit_account_id: AccountId(need(self.credit_account_id, "credit")?),
            amount: amount.ok_or("amount missing")?,
            currency: Currency::parse(currency).map_err(|e| format!("currency {currency:?} {e}"))?,
            kind,
            pending_id: self.pending_id.map(TransferId),
            amount_defaulted: self.amount_defaulted,
            timeout_seconds,
            expires_at: self.expires_at.map(|v| u64_of(v, "expires_at")).transpose()?,
            code,
            metadata: self.metadata.map(Cow::into_owned),
            timestamp,
            state,
        }))
    }
}

/// Every column of the `accounts` table, engine-neutral.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountRow {
    pub tenant_id: u128,
    pub id: u128,
    pub currency: String,
    pub code: i32,
    pub flags: i32,
    pub credit_limit: i64,
    pub metadata: Option<String>,
    pub timestamp: i64,
    pub debits_posted: i64,
    pub credits_posted: i64,
    pub debits_pending: i64,
    pub credits_pending: i64,
    pub holder_id: Option<u128>,
}

impl AccountRow {
    pub fn of(a: &Account) -> AccountRow {
        AccountRow {
            tenant_id: a.key.tenant.0,
            id: a.key.id.0,
            currency: a.currency.as_str().to_owned(),
            code: i32::from(a.code),
            flags: i32::from(a.flags.0),
            credit_limit: i64_of(a.credit_limit),
            metadata: a.metadata.clone(),
            timestamp: i64_of(a.timestamp),
            debits_posted: i64_of(a.debits_posted),
            credits_posted: i64_of(a.credits_posted),
            debits_pending: i64_of(a.debits_pending),
            credits_pending: i64_of(a.credits_pending),
            holder_id: a.holder,
        }
    }

    pub fn into_account(self) -> Result<Account, String> {
        Ok(Account {
            key: AccountKey { tenant: TenantId(self.tenant_id), id: AccountId(self.id) },
            currency: Currency::parse(&self.currency).map_err(|e| format!("currency {:?} {e}", self.currency))?,
            code: u16::try_from(self.code).map_err(|_| "account code out of range".to_owned())?,
            flags: AccountFlags(u16::try_from(self.flags).map_err(|_| "account flags out of range".to_owned())?),
            credit_limit: u64_of(self.credit_limit, "credit_limit")?,
            metadata: self.metadata,
            holder: self.holder_id,
            timestamp: u64_of(self.timestamp, "timestamp")?,
            debits_posted: u64_of(self.debits_posted, "debits_posted")?,
            credits_posted: u64_of(self.credits_posted, "credits_posted")?,
            debits_pending: u64_of(self.debits_pending, "debits_pending")?,
            credits_pending: u64_of(self.credits_pending, "credits_pending")?,
        })
    }
}

pub fn uuid_bytes(v: u128) -> [u8; 16] {
    v.to_be_bytes()
}

pub fn u128_of(bytes: &[u8]) -> Result<u128, String> {
    let array: [u8; 16] = bytes.try_into().map_err(|_| format!("id of {} bytes, expected 16", bytes.len()))?;
    Ok(u128::from_be_bytes(array))
}
