//! Invariant checking over a whole ledger, streamed: `rtpay verify` feeds it every account and every
//! transfer from storage, in any order, and it reports each violation it finds.
//!
//! Checked: per tenant and currency, Σ debits = Σ credits (posted and pending separately); every
//! account's balances equal the sums of the transfers that touch it; every transfer moves money
//! between two different accounts of its own currency; no account violates its flags; every
//! pending transfer is resolved (posted, voided or expired) at most once, before its expiry, and
//! its state agrees with the records that resolved it; a hold's expiry is its timestamp plus its
//! timeout; a transfer's state and pending id fit its kind; no hold is stored twice; timestamps
//! are unique, and none is past the ledger's stored clock (a clock left behind them would give
//! out their timestamps again after a restart, and every commit would fail).

use std::collections::{HashMap, HashSet};

use crate::types::*;
use crate::Currency;

/// One broken invariant, in words a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

#[derive(Default, Clone, Copy)]
struct Sums {
    debits_posted: u128,
    credits_posted: u128,
    debits_pending: u128,
    credits_pending: u128,
}

/// What a post or void must share with the hold it resolves: the accounts and the currency (the
/// machine copies them from the hold), and a later place in the ledger's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sides {
    debit: AccountId,
    credit: AccountId,
    currency: Currency,
    timestamp: Timestamp,
}

#[derive(Default)]
pub struct Verifier {
    accounts: HashMap<AccountKey, (Currency, Sums, Account)>,
    from_transfers: HashMap<AccountKey, Sums>,
    /// The currency of the transfers that touch each account (checked against the account's).
    transfer_currencies: HashMap<AccountKey, Currency>,
    /// pending key → (amount, state, its sides, its expiry)
    pendings: HashMap<TransferKey, (u64, PendingState, Sides, Option<Timestamp>)>,
    /// pending key → resolutions seen (kind, amount, their sides, their id)
    resolutions: HashMap<TransferKey, Vec<(TransferKind, u64, Sides, TransferId)>>,
    timestamps: HashSet<Timestamp>,
    /// The latest timestamp seen, and the ledger's stored clock (given by [`Verifier::clock`]).
    latest: Timestamp,
    clock: Option<Timestamp>,
    violations: Vec<Violation>,
    /// Every violation found, the ones past [`VIOLATIONS_MAX`] counted only.
    violations_found: u64,
    accounts_seen: u64,
    transfers_seen: u64,
}

/// Stop collecting after this many violations: one is enough to fail, a few help diagnose.
const VIOLATIONS_MAX: usize = 100;

impl Verifier {
    pub fn new() -> Verifier {
        Verifier::default()
    }

    fn violation(&mut self, text: String) {
        self.violations_found += 1;
        if self.violations.len() < VIOLATIONS_MAX {
            self.violations.push(Violation(text));
        }
    }

    /// The ledger's clock as stored: every timestamp seen must be at or below it.
    pub fn clock(&mut self, stored: Timestamp) {
        self.clock = Some(stored);
    }

    pub fn account(&mut self, account: &Account) {
        self.accounts_seen += 1;
        let a = account;
        self.latest = self.latest.max(a.timestamp);
        if a.debits_posted > AMOUNT_MAX
            || a.credits_posted > AMOUNT_MAX
            || a.debits_pending > AMOUNT_MAX
            || a.credits_pending > AMOUNT_MAX
        {
            self.violation(format!("account {:032x}: a balance exceeds 2^63-1", a.key.id.0));
        }
        let debits = u128::from(a.debits_posted) + u128::from(a.debits_pending);
        let credits = u128::from(a.credits_posted) + u128::from(a.credits_pending);
        if a.flags.debits_must_not_exceed_credits()
            && debits > u128::from(a.credits_posted) + u128::from(a.credit_limit)
        {
            self.violation(format!(
                "account {:032x}: debits {debits} exceed posted credits {} + limit {}",
                a.key.id.0, a.credits_posted, a.credit_limit
            ));
        }
        if a.flags.credits_must_not_exceed_debits()
            && credits > u128::from(a.debits_posted) + u128::from(a.credit_limit)
        {
            self.violation(format!(
                "account {:032x}: credits {credits} exceed posted debits {} + limit {}",
                a.key.id.0, a.debits_posted, a.credit_limit
            ));
        }
        if !self.timestamps.insert(a.timestamp) {
            self.violation(format!("account {:032x}: timestamp {} is not unique", a.key.id.0, a.timestamp));
        }
        let sums = Sums {
            debits_posted: a.debits_posted.into(),
            credits_posted: a.credits_posted.into(),
            debits_pending: a.debits_pending.into(),
            credits_pending: a.credits_pending.into(),
        };
        if self.accounts.insert(a.key, (a.currency, sums, a.clone())).is_some() {
            self.violation(format!("account {:032x} appears twice", a.key.id.0));
        }
    }

    pub fn entry(&mut self, entry: &Entry) {
        self.transfers_seen += 1;
        if !self.timestamps.insert(entry.timestamp()) {
            self.violation(format!("transfer timestamp {} is not unique", entry.timestamp()));
        }
        self.latest = self.latest.max(entry.timestamp());
        let Entry::Created(t) = entry else { return };
        // A move or a resolution is final; only a hold has a pending state. Only a resolution
        // names a hold.
        let fits = match t.kind {
            TransferKind::Pending => t.pending_id.is_none(),
            TransferKind::Posted => t.state == PendingState::Final && t.pending_id.is_none(),
            TransferKind::PostPending | TransferKind::VoidPending => t.state == PendingState::Final,
        };
        if !fits {
            self.violation(format!(
                "transfer {:032x}: a {:?} with state {:?} and pending id {:?}",
                t.key.id.0,
                t.kind,
                t.state,
                t.pending_id.map(|p| format!("{:032x}", p.0))
            ));
        }
        if t.amount == 0 || t.amount > AMOUNT_MAX {
            self.violation(format!("transfer {:032x}: amount {} out of range", t.key.id.0, t.amount));
        }
        let tenant = t.key.tenant;
        let debit = AccountKey { tenant, id: t.debit_account_id };
        let credit = AccountKey { tenant, id: t.credit_account_id };
        let amount = u128::from(t.amount);
        let sides = Sides {
            debit: t.debit_account_id,
            credit: t.credit_account_id,
            currency: t.currency,
            timestamp: t.timestamp,
        };
        if debit == credit {
            self.violation(format!("transfer {:032x}: debits and credits the same account", t.key.id.0));
        }
        for account in [debit, credit] {
            let seen = *self.transfer_currencies.entry(account).or_insert(t.currency);
            if seen != t.currency {
                self.violation(format!(
                    "transfer {:032x} in {} touches account {:032x}, which other transfers touch in {seen}",
                    t.key.id.0, t.currency, account.id.0
                ));
            }
        }
        match t.kind {
            TransferKind::Posted => {
                self.from_transfers.entry(debit).or_default().debits_posted += amount;
                self.from_transfers.entry(credit).or_default().credits_posted += amount;
            }
            TransferKind::Pending => {
                if t.state == PendingState::Pending {
                    self.from_transfers.entry(debit).or_default().debits_pending += amount;
                    self.from_transfers.entry(credit).or_default().credits_pending += amount;
                }
                if t.state == PendingState::Final {
                    self.violation(format!("pending transfer {:032x} has no pending state", t.key.id.0));
                }
                let due = (t.timeout_seconds > 0)
                    .then(|| t.timestamp.checked_add(u64::from(t.timeout_seconds) * 1_000_000_000))
                    .flatten();
                if t.expires_at != due || (t.timeout_seconds > 0 && due.is_none()) {
                    self.violation(format!(
                        "pending transfer {:032x}: expires at {:?}, not its timestamp {} plus its timeout of {} s",
                        t.key.id.0, t.expires_at, t.timestamp, t.timeout_seconds
                    ));
                }
                if t.state == PendingState::Expired && t.expires_at.is_none() {
                    self.violation(format!("pending transfer {:032x} expired but has no timeout", t.key.id.0));
                }
                if self.pendings.insert(t.key, (t.amount, t.state, sides, t.expires_at)).is_some() {
                    self.violation(format!("pending transfer {:032x} is stored twice", t.key.id.0));
                }
            }
            TransferKind::PostPending | TransferKind::VoidPending => {
                if t.kind == TransferKind::PostPending {
                    self.from_transfers.entry(debit).or_default().debits_posted += amount;
                    self.from_transfers.entry(credit).or_default().credits_posted += amount;
                }
                match t.pending_id {
                    Some(id) => self
                        .resolutions
                        .entry(TransferKey { tenant, id })
                        .or_default()
                        .push((t.kind, t.amount, sides, t.key.id)),
                    None => self.violation(format!("transfer {:032x}: post/void without pending id", t.key.id.0)),
                }
            }
        }
    }

    /// Finishes the checks that need everything seen. Returns all violations found.
    pub fn finish(mut self) -> Report {
        if let Some(clock) = self.clock.filter(|clock| *clock < self.latest) {
            self.violation(format!(
                "the ledger's stored clock ({clock}) is behind a stored timestamp ({}): after a restart its next timestamps would be taken",
                self.latest
            ));
        }
        let mut totals: HashMap<(TenantId, Currency), Sums> = HashMap::new();
        let accounts = std::mem::take(&mut self.accounts);
        for (key, (currency, sums, _)) in &accounts {
            if let Some(moved) = self.transfer_currencies.get(key).filter(|moved| *moved != currency) {
                self.violation(format!("account {:032x} in {currency}: transfers in {moved} touch it", key.id.0));
            }
            let total = totals.entry((key.tenant, *currency)).or_default();
            total.debits_posted += sums.debits_posted;
            total.credits_posted += sums.credits_posted;
            total.debits_pending += sums.debits_pending;
            total.credits_pending += sums.credits_pending;
            let expected = self.from_transfers.get(key).copied().unwrap_or_default();
            if expected.debits_posted != sums.debits_posted
                || expected.credits_posted != sums.credits_posted
                || expected.debits_pending != sums.debits_pending
                || expected.credits_pending != sums.credits_pending
            {
                self.violation(format!(
                    "account {:032x}: balances (dp {}, cp {}, dh {}, ch {}) differ from its transfers (dp {}, cp {}, dh {}, ch {})",
                    key.id.0,
                    sums.debits_posted, sums.credits_posted, sums.debits_pending, sums.credits_pending,
                    expected.debits_posted, expected.credits_posted, expected.debits_pending, expected.credits_pending
                ));
            }
        }
        let orphans: Vec<AccountKey> =
            self.from_transfers.keys().filter(|k| !accounts.contains_key(k)).copied().collect();
        for key in orphans {
            self.violation(format!("transfers touch account {:032x}, which does not exist", key.id.0));
        }
        for ((tenant, currency), total) in &totals {
            if total.debits_posted != total.credits_posted {
                self.violation(format!(
                    "tenant {:032x} {currency}: posted debits {} ≠ posted credits {}",
                    tenant.0, total.debits_posted, total.credits_posted
                ));
            }
            if total.debits_pending != total.credits_pending {
                self.violation(format!(
                    "tenant {:032x} {currency}: pending debits {} ≠ pending credits {}",
                    tenant.0, total.debits_pending, total.credits_pending
                ));
            }
        }
        let resolutions = std::mem::take(&mut self.resolutions);
        for (key, list) in &resolutions {
            let Some(&(amount, state, held, expires_at)) = self.pendings.get(key) else {
                self.violation(format!("post/void of {:032x}, which is not a pending transfer", key.id.0));
                continue;
            };
            if list.len() > 1 {
                self.violation(format!("pending transfer {:032x} resolved {} times", key.id.0, list.len()));
                continue;
            }
            let (kind, resolved, sides, by) = list[0];
            if (sides.debit, sides.credit, sides.currency) != (held.debit, held.credit, held.currency) {
                self.violation(format!(
                    "transfer {:032x}: its {kind:?} of {:032x} names other accounts or another currency than the hold",
                    by.0, key.id.0
                ));
            }
            if sides.timestamp <= held.timestamp {
                self.violation(format!(
                    "transfer {:032x}: its {kind:?} of {:032x} comes before the hold",
                    by.0, key.id.0
                ));
            }
            if expires_at.is_some_and(|expires| sides.timestamp >= expires) {
                self.violation(format!(
                    "transfer {:032x}: its {kind:?} of {:032x} comes after the hold expired",
                    by.0, key.id.0
                ));
            }
            let agrees = match kind {
                TransferKind::PostPending => state == PendingState::Posted && resolved <= amount,
                _ => state == PendingState::Voided && resolved == amount,
            };
            if !agrees {
                self.violation(format!(
                    "pending transfer {:032x}: state {state:?} disagrees with its {kind:?}",
                    key.id.0
                ));
            }
        }
        let pendings = std::mem::take(&mut self.pendings);
        for (key, (_, state, _, _)) in &pendings {
            if matches!(state, PendingState::Posted | PendingState::Voided) && !resolutions.contains_key(key) {
                self.violation(format!("pending transfer {:032x} is {state:?} but nothing resolved it", key.id.0));
            }
        }
        Report {
            accounts: self.accounts_seen,
            transfers: self.transfers_seen,
            violations: self.violations,
            violations_found: self.violations_found,
        }
    }
}

/// The result of a verification.
#[derive(Debug)]
pub struct Report {
    pub accounts: u64,
    pub transfers: u64,
    /// The first violations found (at most 100: enough to diagnose).
    pub violations: Vec<Violation>,
    /// How many were found in all.
    pub violations_found: u64,
}
