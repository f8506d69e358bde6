//! The state machine: applies a batch of events to a state and returns what changed.
//!
//! The machine never reads storage or the clock itself. The caller (the store's writer) prefetches
//! every account and transfer the batch can touch into a [`State`], passes the batch's wall-clock
//! `now`, and persists the [`Changes`] in one commit. Execution is deterministic: the same state,
//! clock and batch always give the same results and changes, which is what lets one machine serve
//! the embedded engine, the PostgreSQL engine and the model-based tests.

use crate::types::*;
use crate::Map;

/// Read access to the ledger state the batch needs. Anything absent is treated as not existing, so
/// the caller must prefetch every key that [`Prefetch::of_transfers`] lists.
pub trait State {
    fn account(&self, key: &AccountKey) -> Option<&Account>;
    fn transfer(&self, key: &TransferKey) -> Option<&Entry>;
}

/// The keys a batch reads, in the order they must be fetched (transfers first, since a post or
/// void names accounts only through its pending transfer).
#[derive(Default, Debug)]
pub struct Prefetch {
    pub transfers: Vec<TransferKey>,
}

impl Prefetch {
    pub fn of_transfers(events: &[TransferEvent]) -> Prefetch {
        let mut transfers = Vec::with_capacity(events.len() * 2);
        for event in events {
            transfers.push(event.key);
            if let EventKind::PostPending { pending_id, .. } | EventKind::VoidPending { pending_id } = event.kind {
                transfers.push(TransferKey { tenant: event.key.tenant, id: pending_id });
            }
        }
        transfers.sort_unstable();
        transfers.dedup();
        Prefetch { transfers }
    }

    /// Accounts a batch reads, given the transfers already fetched. Sorted, so that an engine that
    /// locks them does so in one global order and cannot deadlock.
    pub fn accounts_of(events: &[TransferEvent], state: &impl State) -> Vec<AccountKey> {
        let mut accounts = Vec::with_capacity(events.len() * 2);
        for event in events {
            let tenant = event.key.tenant;
            match event.kind {
                EventKind::Posted { debit, credit, .. } | EventKind::Pending { debit, credit, .. } => {
                    accounts.push(AccountKey { tenant, id: debit });
                    accounts.push(AccountKey { tenant, id: credit });
                }
                EventKind::PostPending { pending_id, .. } | EventKind::VoidPending { pending_id } => {
                    let key = TransferKey { tenant, id: pending_id };
                    if let Some(Entry::Created(p)) = state.transfer(&key) {
                        accounts.push(AccountKey { tenant, id: p.debit_account_id });
                        accounts.push(AccountKey { tenant, id: p.credit_account_id });
                    }
                }
            }
        }
        accounts.sort_unstable();
        accounts.dedup();
        accounts
    }
}

/// The engine clock: hands out unique, strictly increasing timestamps that follow the wall clock
/// when it moves forward and never go back when it does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub last: Timestamp,
}

impl Clock {
    /// The time at which an event decided at `now` is judged: after a wall clock that went back,
    /// or behind events ticked ahead of it, the ledger's own order runs ahead of `now`. A hold's
    /// expiry is judged at it by a post or void and by the sweep alike, so that no hold is too
    /// late to resolve and yet not late enough to release.
    pub fn judged_at(&self, now: Timestamp) -> Timestamp {
        now.max(self.last + 1)
    }

    pub fn tick(&mut self, now: Timestamp) -> Timestamp {
        let next = now.max(self.last + 1);
        self.last = next;
        next
    }
}

/// One event's answer: the result code, and the transfer for `created` / `exists`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub result: TransferResult,
    pub transfer: Option<Transfer>,
}

/// What a batch changed, for the store to persist in one commit.
#[derive(Default, Debug, Clone)]
pub struct Changes {
    /// Accounts created or whose balances or flags changed, final values, sorted by key.
    pub accounts: Vec<Account>,
    /// Entries to insert (new transfers and remembered failures), in timestamp order.
    pub inserted: Vec<Entry>,
    /// Pending transfers whose state changed (posted, voided or expired).
    pub pending_updates: Vec<(TransferKey, PendingState)>,
    /// The clock after the batch.
    pub clock: Clock,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.inserted.is_empty() && self.pending_updates.is_empty()
    }
}

/// Writes of a batch, layered over the state, with an undo journal for linked chains.
struct Overlay {
    accounts: Map<AccountKey, Account>,
    /// Each transfer the batch wrote, once, in the order first written; its final value.
    entries: Vec<Entry>,
    /// Whether `entries[i]` is new to the state (else it is a stored transfer that changed).
    new: Vec<bool>,
    /// Where each transfer written sits in `entries`.
    entry_at: Map<TransferKey, usize>,
    journal: Vec<Undo>,
}

enum Undo {
    Account(AccountKey, Option<Account>),
    /// A transfer first written: the last of `entries` when this is undone.
    TransferAdded(TransferKey),
    /// A transfer written before in the batch: what it was.
    TransferReplaced(usize, Entry),
}

struct View<'a, S: State> {
    state: &'a S,
    overlay: Overlay,
}

impl<'a, S: State> View<'a, S> {
    /// A view for a batch that writes about `transfers` transfers and `accounts` accounts: the
    /// overlay is sized for them once, instead of growing (and copying itself) on the way.
    fn new(state: &'a S, transfers: usize, accounts: usize) -> Self {
        View {
            state,
            overlay: Overlay {
                accounts: Map::with_capacity_and_hasher(accounts, Default::default()),
                entries: Vec::with_capacity(transfers),
                new: Vec::with_capacity(transfers),
                entry_at: Map::with_capacity_and_hasher(transfers, Default::default()),
                journal: Vec::new(),
            },
        }
    }

    fn account(&self, key: &AccountKey) -> Option<&Account> {
        self.overlay.accounts.get(key).or_else(|| self.state.account(key))
    }

    fn transfer(&self, key: &TransferKey) -> Option<&Entry> {
        match self.overlay.entry_at.get(key) {
            Some(&i) => Some(&self.overlay.entries[i]),
            None => self.state.transfer(key),
        }
    }

    fn put_account(&mut self, account: Account) {
        let key = account.key;
        let previous = self.overlay.accounts.insert(key, account);
        self.overlay.journal.push(Undo::Account(key, previous));
    }

    fn put_transfer(&mut self, key: TransferKey, entry: Entry) {
        let overlay = &mut self.overlay;
        match overlay.entry_at.entry(key) {
            std::collections::hash_map::Entry::Occupied(at) => {
                let i = *at.get();
                let previous = std::mem::replace(&mut overlay.entries[i], entry);
                overlay.journal.push(Undo::TransferReplaced(i, previous));
            }
            std::collections::hash_map::Entry::Vacant(at) => {
                at.insert(overlay.entries.len());
                overlay.new.push(self.state.transfer(&key).is_none());
                overlay.entries.push(entry);
                overlay.journal.push(Undo::TransferAdded(key));
            }
        }
    }

    fn mark(&self) -> usize {
        self.overlay.journal.len()
    }

    /// What was written so far is final: nothing will roll back past this point, so the undo
    /// records (copies of what each write replaced) can go.
    fn settle(&mut self) {
        self.overlay.journal.clear();
    }

    fn rollback(&mut self, mark: usize) {
        let overlay = &mut self.overlay;
        while overlay.journal.len() > mark {
            match overlay.journal.pop().expect("journal longer than mark") {
                Undo::Account(key, Some(previous)) => {
                    overlay.accounts.insert(key, previous);
                }
                Undo::Account(key, None) => {
                    overlay.accounts.remove(&key);
                }
                Undo::TransferReplaced(i, previous) => overlay.entries[i] = previous,
                Undo::TransferAdded(key) => {
                    // Undone in the reverse order of the writes, so what it added is last.
                    let entry = overlay.entries.pop().expect("an added transfer");
                    overlay.new.pop();
                    assert_eq!(entry.key(), key, "the journal undoes the last added transfer");
                    overlay.entry_at.remove(&key);
                }
            }
        }
    }

    fn into_changes(self, clock: Clock) -> Changes {
        let Overlay { accounts, entries, new, .. } = self.overlay;
        let mut accounts: Vec<Account> = accounts.into_values().collect();
        accounts.sort_unstable_by_key(|a| a.key);
        let mut pending_updates = Vec::new();
        // Usually every entry is new, and they move over whole.
        let mut inserted = if new.iter().all(|n| *n) {
            entries
        } else {
            let mut inserted = Vec::with_capacity(entries.len());
            for (entry, new) in entries.into_iter().zip(new) {
                if new {
                    inserted.push(entry);
                } else if let Entry::Created(t) = entry {
                    pending_updates.push((t.key, t.state));
                }
            }
            inserted
        };
        // Entries are written in the order they take their timestamps: this sort finds them in
        // order in one pass, and keeps the order a promise of `Changes` whatever the writes.
        inserted.sort_unstable_by_key(Entry::timestamp);
        pending_updates.sort_unstable_by_key(|(k, _)| *k);
        Changes { accounts, inserted, pending_updates, clock }
    }
}

/// Checks what can be checked without state. The API runs this on every event before submitting,
/// so that a batch with one invalid event is refused whole and nothing is applied.
pub fn validate_event(event: &TransferEvent) -> Result<(), TransferResult> {
    if event.key.id.0 == 0 {
        return Err(TransferResult::IdMustNotBeZero);
    }
    if event.metadata.as_ref().is_some_and(|m| m.len() > METADATA_LEN_MAX) {
        return Err(TransferResult::MetadataTooLong);
    }
    let check_amount = |amount: u64| match amount {
        0 => Err(TransferResult::AmountMustNotBeZero),
        a if a > AMOUNT_MAX => Err(TransferResult::AmountExceedsMax),
        _ => Ok(()),
    };
    match event.kind {
        EventKind::Posted { debit, credit, amount } => {
            check_amount(amount)?;
            if debit == credit {
                return Err(TransferResult::AccountsMustBeDifferent);
            }
        }
        EventKind::Pending { debit, credit, amount, timeout_seconds } => {
            check_amount(amount)?;
            if debit == credit {
                return Err(TransferResult::AccountsMustBeDifferent);
            }
            if timeout_seconds > TIMEOUT_SECONDS_MAX {
                return Err(TransferResult::TimeoutExceedsMax);
            }
        }
        EventKind::PostPending { pending_id, amount } => {
            if let Some(amount) = amount {
                check_amount(amount)?;
            }
            if pending_id == event.key.id {
                return Err(TransferResult::PendingIdMustBeDifferent);
            }
            if pending_id.0 == 0 {
                return Err(TransferResult::PendingTransferNotFound);
            }
        }
        EventKind::VoidPending { pending_id } => {
            if pending_id == event.key.id {
                return Err(TransferResult::PendingIdMustBeDifferent);
            }
            if pending_id.0 == 0 {
                return Err(TransferResult::PendingTransferNotFound);
            }
        }
    }
    Ok(())
}

/// Checks a new account request without state.
pub fn validate_account(new: &NewAccount) -> Result<(), AccountResult> {
    if new.key.id.0 == 0 {
        return Err(AccountResult::IdMustNotBeZero);
    }
    if !new.flags.is_known() {
        return Err(AccountResult::UnknownFlags);
    }
    if new.flags.debits_must_not_exceed_credits() && new.flags.credits_must_not_exceed_debits() {
        return Err(AccountResult::FlagsAreMutuallyExclusive);
    }
    if new.credit_limit > 0
        && !new.flags.debits_must_not_exceed_credits()
        && !new.flags.credits_must_not_exceed_debits()
    {
        return Err(AccountResult::CreditLimitRequiresBalanceFlag);
    }
    if new.credit_limit > AMOUNT_MAX {
        return Err(AccountResult::CreditLimitExceedsMax);
    }
    if new.metadata.as_ref().is_some_and(|m| m.len() > METADATA_LEN_MAX) {
        return Err(AccountResult::MetadataTooLong);
    }
    Ok(())
}

/// An account command, applied in the same batches as transfers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountCommand {
    Create(NewAccount),
    Close(AccountKey),
}

impl AccountCommand {
    pub fn key(&self) -> AccountKey {
        match self {
            AccountCommand::Create(new) => new.key,
            AccountCommand::Close(key) => *key,
        }
    }
}

/// Applies account commands. Returns each command's result and the account as it now stands.
pub fn apply_accounts(
    state: &impl State,
    clock: &mut Clock,
    now: Timestamp,
    commands: &[AccountCommand],
) -> (Vec<(AccountResult, Option<Account>)>, Changes) {
    let mut view = View::new(state, 0, commands.len());
    let mut results = Vec::with_capacity(commands.len());
    for command in commands {
        let result = match command {
            AccountCommand::Create(new) => match validate_account(new) {
                Err(code) => (code, None),
                Ok(()) => match view.account(&new.key) {
                    Some(existing) if existing.matches(new) => (AccountResult::Exists, Some(existing.clone())),
                    Some(_) => (AccountResult::ExistsWithDifferentFields, None),
                    None => {
                        let account = Account {
                            key: new.key,
                            currency: new.currency,
                            code: new.code,
                            flags: new.flags,
                            credit_limit: new.credit_limit,
                            metadata: new.metadata.clone(),
                            holder: new.holder,
                            timestamp: clock.tick(now),
                            debits_posted: 0,
                            credits_posted: 0,
                            debits_pending: 0,
                            credits_pending: 0,
                        };
                        view.put_account(account.clone());
                        (AccountResult::Created, Some(account))
                    }
                },
            },
            AccountCommand::Close(key) => match view.account(key) {
                None => (AccountResult::AccountNotFound, None),
                Some(existing) if existing.flags.closed() => (AccountResult::AlreadyClosed, Some(existing.clone())),
                Some(existing) => {
                    let mut account = existing.clone();
                    account.flags.0 |= AccountFlags::CLOSED;
                    view.put_account(account.clone());
                    (AccountResult::Closed, Some(account))
                }
            },
        };
        results.push(result);
        view.settle();
    }
    (results, view.into_changes(*clock))
}

/// Applies a batch of transfer events. `now` is the wall clock; each created transfer gets a
/// unique timestamp from `clock`. Events whose `linked` flag is set form a chain with the events
/// that follow, up to and including the first one without the flag: the chain applies whole or
/// not at all.
pub fn apply_transfers(
    state: &impl State,
    clock: &mut Clock,
    now: Timestamp,
    events: &[TransferEvent],
) -> (Vec<Outcome>, Changes) {
    assert!(events.len() <= BATCH_LEN_MAX * 64, "batch too large");
    // Each event writes a transfer (a post or void also the pending one) and two accounts, which
    // batches share: sized for the transfers, the accounts grow as they come.
    let mut view = View::new(state, events.len(), 0);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(events.len());
    let mut start = 0;
    while start < events.len() {
        let mut end = start;
        while end < events.len() && events[end].linked {
            end += 1;
        }
        if end == events.len() {
            // The last event is linked to nothing: the chain is open and nothing in it applies.
            for _ in start..end {
                outcomes.push(Outcome { result: TransferResult::LinkedEventChainOpen, transfer: None });
            }
            break;
        }
        let chain = &events[start..=end];
        apply_chain(&mut view, clock, now, chain, &mut outcomes);
        view.settle();
        start = end + 1;
    }
    debug_assert_eq!(outcomes.len(), events.len());
    (outcomes, view.into_changes(*clock))
}

fn apply_chain<S: State>(
    view: &mut View<'_, S>,
    clock: &mut Clock,
    now: Timestamp,
    chain: &[TransferEvent],
    outcomes: &mut Vec<Outcome>,
) {
    let mark = view.mark();
    let clock_before = *clock;
    let first = outcomes.len();
    let mut failed: Option<(usize, TransferResult)> = None;
    for (i, event) in chain.iter().enumerate() {
        let outcome = apply_one(view, clock, now, event);
        if !outcome.result.is_ok() && chain.len() > 1 {
            failed = Some((i, outcome.result));
            outcomes.push(outcome);
            break;
        }
        outcomes.push(outcome);
    }
    let Some((failed_at, code)) = failed else {
        return;
    };

    // Undo the whole chain, then answer: the failing event with its code, the others with
    // `linked_event_failed`. When the failure depended on state, every event in the chain is
    // remembered as failed, so a retry of the chain can never succeed half-way later.
    view.rollback(mark);
    *clock = clock_before;
    outcomes.truncate(first);
    // A chain failed by one event's request alone (its own validation; a zero `pending_id`
    // fails it as `pending_transfer_not_found`) is not remembered: the same chain fails the
    // same way again, and a corrected one must be free to succeed.
    let remember = code.is_remembered()
        && validate_event(&chain[failed_at]).is_ok()
        && !matches!(code, TransferResult::IdAlreadyFailed | TransferResult::ExistsWithDifferentFields);
    for (i, event) in chain.iter().enumerate() {
        let result = match view.transfer(&event.key) {
            // An event remembered as failed keeps its first outcome, whichever event failed now.
            Some(Entry::Failed { event: first, result, .. }) if strip_link(first) == strip_link(event) => *result,
            _ if i == failed_at => code,
            _ => TransferResult::LinkedEventFailed,
        };
        if remember && validate_event(event).is_ok() && view.transfer(&event.key).is_none() {
            let timestamp = clock.tick(now);
            view.put_transfer(event.key, Entry::Failed { event: event.clone(), result, timestamp });
        }
        outcomes.push(Outcome { result, transfer: None });
    }
}

fn apply_one<S: State>(view: &mut View<'_, S>, clock: &mut Clock, now: Timestamp, event: &TransferEvent) -> Outcome {
    let fail = |result| Outcome { result, transfer: None };
    if let Err(code) = validate_event(event) {
        return fail(code);
    }
    match view.transfer(&event.key) {
        Some(Entry::Created(existing)) => {
            return if existing.matches(event) {
                Outcome { result: TransferResult::Exists, transfer: Some(existing.clone()) }
            } else {
                fail(TransferResult::ExistsWithDifferentFields)
            };
        }
        Some(Entry::Failed { event: first, result, .. }) => {
            let result = if strip_link(first) == strip_link(event) { *result } else { TransferResult::IdAlreadyFailed };
            return fail(result);
        }
        None => {}
    }
    let result = match event.kind {
        EventKind::Posted { debit, credit, amount } => create(view, clock, now, event, debit, credit, amount, None),
        EventKind::Pending { debit, credit, amount, timeout_seconds } => {
            create(view, clock, now, event, debit, credit, amount, Some(timeout_seconds))
        }
        EventKind::PostPending { pending_id, amount } => resolve(view, clock, now, event, pending_id, Some(amount)),
        EventKind::VoidPending { pending_id } => resolve(view, clock, now, event, pending_id, None),
    };
    match result {
        Ok(transfer) => Outcome { result: TransferResult::Created, transfer: Some(transfer) },
        Err(code) => {
            // A lone event's state-dependent failure is remembered under its id.
            if !event.linked && code.is_remembered() {
                let timestamp = clock.tick(now);
                view.put_transfer(event.key, Entry::Failed { event: event.clone(), result: code, timestamp });
            }
            fail(code)
        }
    }
}

fn strip_link(event: &TransferEvent) -> TransferEvent {
    TransferEvent { linked: false, ..event.clone() }
}

#[allow(clippy::too_many_arguments)]
fn create<S: State>(
    view: &mut View<'_, S>,
    clock: &mut Clock,
    now: Timestamp,
    event: &TransferEvent,
    debit_id: AccountId,
    credit_id: AccountId,
    amount: u64,
    timeout_seconds: Option<u32>,
) -> Result<Transfer, TransferResult> {
    let tenant = event.key.tenant;
    let debit_key = AccountKey { tenant, id: debit_id };
    let credit_key = AccountKey { tenant, id: credit_id };
    let mut debit = view.account(&debit_key).ok_or(TransferResult::DebitAccountNotFound)?.clone();
    let mut credit = view.account(&credit_key).ok_or(TransferResult::CreditAccountNotFound)?.clone();
    if debit.currency != credit.currency {
        return Err(TransferResult::CurrencyMismatch);
    }
    if debit.flags.closed() {
        return Err(TransferResult::DebitAccountClosed);
    }
    if credit.flags.closed() {
        return Err(TransferResult::CreditAccountClosed);
    }
    let pending = timeout_seconds.is_some();
    let add = |balance: u64, code| match balance.checked_add(amount) {
        Some(sum) if sum <= AMOUNT_MAX => Ok(sum),
        _ => Err(code),
    };
    if pending {
        debit.debits_pending = add(debit.debits_pending, TransferResult::OverflowsDebitsPending)?;
        credit.credits_pending = add(credit.credits_pending, TransferResult::OverflowsCreditsPending)?;
    } else {
        debit.debits_posted = add(debit.debits_posted, TransferResult::OverflowsDebitsPosted)?;
        credit.credits_posted = add(credit.credits_posted, TransferResult::OverflowsCreditsPosted)?;
    }
    if u128::from(debit.debits_posted) + u128::from(debit.debits_pending) > u128::from(AMOUNT_MAX) {
        return Err(TransferResult::OverflowsDebits);
    }
    if u128::from(credit.credits_posted) + u128::from(credit.credits_pending) > u128::from(AMOUNT_MAX) {
        return Err(TransferResult::OverflowsCredits);
    }
    if debit.flags.debits_must_not_exceed_credits()
        && u128::from(debit.debits_posted) + u128::from(debit.debits_pending)
            > u128::from(debit.credits_posted) + u128::from(debit.credit_limit)
    {
        return Err(TransferResult::InsufficientFunds);
    }
    if credit.flags.credits_must_not_exceed_debits()
        && u128::from(credit.credits_posted) + u128::from(credit.credits_pending)
            > u128::from(credit.debits_posted) + u128::from(credit.credit_limit)
    {
        return Err(TransferResult::ExceedsDebits);
    }
    let timestamp = clock.tick(now);
    let timeout_seconds = timeout_seconds.unwrap_or(0);
    let transfer = Transfer {
        key: event.key,
        debit_account_id: debit_id,
        credit_account_id: credit_id,
        amount,
        currency: debit.currency,
        kind: if pending { TransferKind::Pending } else { TransferKind::Posted },
        pending_id: None,
        amount_defaulted: false,
        timeout_seconds,
        expires_at: (pending && timeout_seconds > 0).then(|| timestamp + u64::from(timeout_seconds) * 1_000_000_000),
        code: event.code,
        metadata: event.metadata.clone(),
        timestamp,
        state: if pending { PendingState::Pending } else { PendingState::Final },
    };
    view.put_account(debit);
    view.put_account(credit);
    view.put_transfer(event.key, Entry::Created(transfer.clone()));
    Ok(transfer)
}

/// Posts (`post = Some(amount)`) or voids (`post = None`) a pending transfer.
fn resolve<S: State>(
    view: &mut View<'_, S>,
    clock: &mut Clock,
    now: Timestamp,
    event: &TransferEvent,
    pending_id: TransferId,
    post: Option<Option<u64>>,
) -> Result<Transfer, TransferResult> {
    let tenant = event.key.tenant;
    let pending_key = TransferKey { tenant, id: pending_id };
    let pending = match view.transfer(&pending_key) {
        Some(Entry::Created(t)) => t.clone(),
        _ => return Err(TransferResult::PendingTransferNotFound),
    };
    match pending.state {
        PendingState::Pending => {}
        PendingState::Final => return Err(TransferResult::PendingTransferNotPending),
        PendingState::Posted => return Err(TransferResult::PendingTransferAlreadyPosted),
        PendingState::Voided => return Err(TransferResult::PendingTransferAlreadyVoided),
        PendingState::Expired => return Err(TransferResult::PendingTransferExpired),
    }
    // Judged at the time the post or void would take: after a wall clock that went back, the
    // ledger's clock runs ahead of it, and a hold past its expiry in the ledger's own order of
    // events must not be resolved.
    let at = clock.judged_at(now);
    if pending.expires_at.is_some_and(|expires| expires <= at) {
        return Err(TransferResult::PendingTransferExpired);
    }
    let amount = match post {
        Some(Some(amount)) if amount > pending.amount => return Err(TransferResult::ExceedsPendingTransferAmount),
        Some(Some(amount)) => amount,
        Some(None) | None => pending.amount,
    };
    let debit_key = AccountKey { tenant, id: pending.debit_account_id };
    let credit_key = AccountKey { tenant, id: pending.credit_account_id };
    // A hold its accounts do not cover (storage edited behind the ledger) is refused, as the sweep
    // leaves it: resolving it would wrap a balance, and a panic would stop the node — at every
    // retry of the request, on every node.
    let (Some(mut debit), Some(mut credit)) = (view.account(&debit_key).cloned(), view.account(&credit_key).cloned())
    else {
        return Err(TransferResult::PendingTransferInconsistent);
    };
    if debit.debits_pending < pending.amount || credit.credits_pending < pending.amount {
        return Err(TransferResult::PendingTransferInconsistent);
    }
    debit.debits_pending -= pending.amount;
    credit.credits_pending -= pending.amount;
    if post.is_some() {
        // Cannot overflow: posted + pending ≤ AMOUNT_MAX held before and amount ≤ the hold.
        debit.debits_posted += amount;
        credit.credits_posted += amount;
    }
    let timestamp = clock.tick(now);
    let (kind, state) = match post {
        Some(_) => (TransferKind::PostPending, PendingState::Posted),
        None => (TransferKind::VoidPending, PendingState::Voided),
    };
    let transfer = Transfer {
        key: event.key,
        debit_account_id: pending.debit_account_id,
        credit_account_id: pending.credit_account_id,
        amount,
        currency: pending.currency,
        kind,
        pending_id: Some(pending_id),
        amount_defaulted: matches!(post, Some(None)),
        timeout_seconds: 0,
        expires_at: None,
        code: event.code,
        metadata: event.metadata.clone(),
        timestamp,
        state: PendingState::Final,
    };
    view.put_account(debit);
    view.put_account(credit);
    view.put_transfer(pending_key, Entry::Created(Transfer { state, ..pending }));
    view.put_transfer(event.key, Entry::Created(transfer.clone()));
    Ok(transfer)
}

/// Expires pending transfers whose timeout has passed by `now` as the ledger judges it
/// ([`Clock::judged_at`], as a post or void would), releasing their holds. Keys that are not
/// pending or not yet due are left alone, so the caller may pass a superset.
pub fn expire_pending(state: &impl State, clock: Clock, now: Timestamp, keys: &[TransferKey]) -> (usize, Changes) {
    let now = clock.judged_at(now);
    let mut view = View::new(state, keys.len(), 0);
    let mut expired = 0;
    for key in keys {
        let Some(Entry::Created(pending)) = view.transfer(key) else {
            continue;
        };
        if pending.state != PendingState::Pending || pending.expires_at.is_none_or(|at| at > now) {
            continue;
        }
        let pending = pending.clone();
        let tenant = key.tenant;
        let debit = view.account(&AccountKey { tenant, id: pending.debit_account_id }).cloned();
        let credit = view.account(&AccountKey { tenant, id: pending.credit_account_id }).cloned();
        // A hold its accounts do not cover (storage edited or restored apart from its accounts)
        // is left pending, for `rtpay verify` to report: releasing it would wrap a balance, and
        // refusing the whole sweep would stop every hold's release, on every node, at every
        // sweep.
        let (Some(mut debit), Some(mut credit)) = (debit, credit) else { continue };
        if debit.debits_pending < pending.amount || credit.credits_pending < pending.amount {
            continue;
        }
        debit.debits_pending -= pending.amount;
        credit.credits_pending -= pending.amount;
        view.put_account(debit);
        view.put_account(credit);
        view.put_transfer(*key, Entry::Created(Transfer { state: PendingState::Expired, ..pending }));
        view.settle();
        expired += 1;
    }
    // Expiry creates no transfer, so it takes no timestamp.
    (expired, view.into_changes(clock))
}
