//! The engine against a reference model written the slow, obvious way: whole-state snapshots for
//! linked chains, linear scans, no overlay. Random sequences of account creations, transfers,
//! repeats, two-phase operations, linked chains, clock moves and expiries must give the same result
//! codes, the same balances and a ledger that passes `verify`.

use std::collections::BTreeMap;

use ledger::*;
use proptest::prelude::*;

const TENANTS: u128 = 2;
const ACCOUNT_IDS: u128 = 5;
const TRANSFER_IDS: u128 = 24;

#[derive(Clone, Debug)]
struct ModelTransfer {
    tenant: u128,
    event: TransferEvent,
    debit: u128,
    credit: u128,
    amount: u64,
    expires_at: Option<u64>,
    state: PendingState,
}

#[derive(Clone, Debug)]
enum ModelEntry {
    Ok(ModelTransfer),
    Failed(TransferEvent, TransferResult),
}

#[derive(Clone, Debug, Default)]
struct Model {
    accounts: BTreeMap<(u128, u128), Account>,
    entries: BTreeMap<(u128, u128), ModelEntry>,
    last: u64,
}

impl Model {
    fn tick(&mut self, now: u64) -> u64 {
        self.last = now.max(self.last + 1);
        self.last
    }

    fn event_matches(t: &ModelTransfer, e: &TransferEvent) -> bool {
        let mut a = t.event.clone();
        let mut b = e.clone();
        a.linked = false;
        b.linked = false;
        a == b
    }

    fn apply(&mut self, now: u64, e: &TransferEvent) -> TransferResult {
        use TransferResult as R;
        if let Err(code) = validate_event(e) {
            return code;
        }
        let (tenant, id) = (e.key.tenant.0, e.key.id.0);
        match self.entries.get(&(tenant, id)) {
            Some(ModelEntry::Ok(t)) => {
                return if Self::event_matches(t, e) { R::Exists } else { R::ExistsWithDifferentFields }
            }
            Some(ModelEntry::Failed(first, code)) => {
                let (mut a, mut b) = (first.clone(), e.clone());
                a.linked = false;
                b.linked = false;
                return if a == b { *code } else { R::IdAlreadyFailed };
            }
            None => {}
        }
        let result = self.apply_new(now, e);
        if result != R::Created && !e.linked {
            let _ = self.tick(now);
            self.entries.insert((tenant, id), ModelEntry::Failed(e.clone(), result));
        }
        result
    }

    fn apply_new(&mut self, now: u64, e: &TransferEvent) -> TransferResult {
        use TransferResult as R;
        let tenant = e.key.tenant.0;
        match e.kind {
            EventKind::Posted { debit, credit, amount } | EventKind::Pending { debit, credit, amount, .. } => {
                let pending = matches!(e.kind, EventKind::Pending { .. });
                let Some(d) = self.accounts.get(&(tenant, debit.0)).cloned() else {
                    return R::DebitAccountNotFound;
                };
                let Some(c) = self.accounts.get(&(tenant, credit.0)).cloned() else {
                    return R::CreditAccountNotFound;
                };
                if d.currency != c.currency {
                    return R::CurrencyMismatch;
                }
                if d.flags.closed() {
                    return R::DebitAccountClosed;
                }
                if c.flags.closed() {
                    return R::CreditAccountClosed;
                }
                let a = amount as u128;
                let max = AMOUNT_MAX as u128;
                let (dp, cp, dh, ch) = (
                    d.debits_posted as u128,
                    c.credits_posted as u128,
                    d.debits_pending as u128,
                    c.credits_pending as u128,
                );
                if pending {
                    if dh + a > max {
                        return R::OverflowsDebitsPending;
                    }
                    if ch + a > max {
                        return R::OverflowsCreditsPending;
                    }
                } else {
                    if dp + a > max {
                        return R::OverflowsDebitsPosted;
                    }
                    if cp + a > max {
                        return R::OverflowsCreditsPosted;
                    }
                }
                if dp + dh + a > max {
                    return R::OverflowsDebits;
                }
                if cp + ch + a > max {
                    return R::OverflowsCredits;
                }
                if d.flags.debits_must_not_exceed_credits()
                    && dp + dh + a > d.credits_posted as u128 + d.credit_limit as u128
                {
                    return R::InsufficientFunds;
                }
                if c.flags.credits_must_not_exceed_debits()
                    && cp + ch + a > c.debits_posted as u128 + c.credit_limit as u128
                {
                    return R::ExceedsDebits;
                }
                let ts = self.tick(now);
                let timeout = match e.kind {
                    EventKind::Pending { timeout_seconds, .. } => timeout_seconds,
                    _ => 0,
                };
                let d = self.accounts.get_mut(&(tenant, debit.0)).unwrap();
                if pending {
                    d.debits_pending += amount
                } else {
                    d.debits_posted += amount
                }
                let c = self.accounts.get_mut(&(tenant, credit.0)).unwrap();
                if pending {
                    c.credits_pending += amount
                } else {
                    c.credits_posted += amount
                }
                self.entries.insert(
                    (tenant, e.key.id.0),
                    ModelEntry::Ok(ModelTransfer {
                        tenant,
                        event: e.clone(),
                        debit: debit.0,
                        credit: credit.0,
                        amount,
                        expires_at: (pending && timeout > 0).then(|| ts + timeout as u64 * 1_000_000_000),
                        state: if pending { PendingState::Pending } else { PendingState::Final },
                    }),
                );
                R::Created
            }
            EventKind::PostPending { pending_id, .. } | EventKind::VoidPending { pending_id } => {
                let Some(ModelEntry::Ok(p)) = self.entries.get(&(tenant, pending_id.0)).cloned() else {
                    return R::PendingTransferNotFound;
                };
                match p.state {
                    PendingState::Final => return R::PendingTransferNotPending,
                    PendingState::Posted => return R::PendingTransferAlreadyPosted,
                    PendingState::Voided => return R::PendingTransferAlreadyVoided,
                    PendingState::Expired => return R::PendingTransferExpired,
                    PendingState::Pending => {}
                }
                let at = now.max(self.last + 1);
                if p.expires_at.is_some_and(|expires| expires <= at) {
                    return R::PendingTransferExpired;
                }
                let post = match e.kind {
                    EventKind::PostPending { amount, .. } => Some(amount.unwrap_or(p.amount)),
                    _ => None,
                };
                if post.is_some_and(|a| a > p.amount) {
                    return R::ExceedsPendingTransferAmount;
                }
                let _ = self.tick(now);
                let d = self.accounts.get_mut(&(tenant, p.debit)).unwrap();
                d.debits_pending -= p.amount;
                d.debits_posted += post.unwrap_or(0);
                let c = self.accounts.get_mut(&(tenant, p.credit)).unwrap();
                c.credits_pending -= p.amount;
                c.credits_posted += post.unwrap_or(0);
                if let Some(ModelEntry::Ok(pm)) = self.entries.get_mut(&(tenant, pending_id.0)) {
                    pm.state = if post.is_some() { PendingState::Posted } else { PendingState::Voided };
                }
                self.entries.insert(
                    (tenant, e.key.id.0),
                    ModelEntry::Ok(ModelTransfer {
                        tenant,
                        event: e.clone(),
                        debit: p.debit,
                        credit: p.credit,
                        amount: post.unwrap_or(p.amount),
                        expires_at: None,
                        state: PendingState::Final,
                    }),
                );
                R::Created
            }
        }
    }

    fn batch(&mut self, now: u64, events: &[TransferEvent]) -> Vec<TransferResult> {
        use TransferResult as R;
        let mut out = Vec::new();
        let mut start = 0;
        while start < events.len() {
            let mut end = start;
            while end < events.len() && events[end].linked {
                end += 1;
            }
            if end == events.len() {
                out.extend((start..end).map(|_| R::LinkedEventChainOpen));
                break;
            }
            let chain = &events[start..=end];
            if chain.len() == 1 {
                out.push(self.apply(now, &chain[0]));
            } else {
                let snapshot = self.clone();
                let mut failure = None;
                let mut results = Vec::with_capacity(chain.len());
                for (i, e) in chain.iter().enumerate() {
                    let r = self.apply(now, e);
                    if r != R::Created && r != R::Exists {
                        failure = Some((i, r));
                        break;
                    }
                    // An id made earlier in this chain, or before it, reads as exists.
                    results.push(r);
                }
                match failure {
                    None => out.extend(results),
                    Some((at, code)) => {
                        *self = snapshot;
                        let remember = !code.is_validation()
                            && validate_event(&chain[at]).is_ok()
                            && code != R::IdAlreadyFailed
                            && code != R::ExistsWithDifferentFields;
                        for (i, e) in chain.iter().enumerate() {
                            let k = (e.key.tenant.0, e.key.id.0);
                            let r = match self.entries.get(&k) {
                                Some(ModelEntry::Failed(first, r))
                                    if {
                                        let (mut a, mut b) = (first.clone(), e.clone());
                                        a.linked = false;
                                        b.linked = false;
                                        a == b
                                    } =>
                                {
                                    *r
                                }
                                _ if i == at => code,
                                _ => R::LinkedEventFailed,
                            };
                            if remember && validate_event(e).is_ok() && !self.entries.contains_key(&k) {
                                let _ = self.tick(now);
                                self.entries.insert(k, ModelEntry::Failed(e.clone(), r));
                            }
                            out.push(r);
                        }
                    }
                }
            }
            start = end + 1;
        }
        out
    }

    fn expire(&mut self, now: u64) {
        // As a post or void judges a hold's expiry: at the ledger's time, never behind it.
        let now = now.max(self.last + 1);
        let due: Vec<(u128, u128)> = self
            .entries
            .iter()
            .filter_map(|(k, e)| match e {
                ModelEntry::Ok(t) if t.state == PendingState::Pending && t.expires_at.is_some_and(|at| at <= now) => {
                    Some(*k)
                }
                _ => None,
            })
            .collect();
        for k in due {
            let ModelEntry::Ok(t) = self.entries.get_mut(&k).unwrap() else { unreachable!() };
            t.state = PendingState::Expired;
            let (tenant, debit, credit, amount) = (t.tenant, t.debit, t.credit, t.amount);
            self.accounts.get_mut(&(tenant, debit)).unwrap().debits_pending -= amount;
            self.accounts.get_mut(&(tenant, credit)).unwrap().credits_pending -= amount;
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Accounts(Vec<NewAccount>),
    Transfers(Vec<TransferEvent>),
    /// An earlier batch of transfers sent again (a client's retry): the `.0`-th (modulo their
    /// number), whole, or with one event (the `.1`-th) changed as `.2` says: 0 as it was, 1 its
    /// amount, 2 its code, 3 its metadata, 4 its `linked` flag.
    Replay(usize, usize, u8),
    Close(u128, u128),
    Advance(u64),
    Expire,
}

/// `events` with its `at`-th event (modulo their number) changed as [`Op::Replay`] says.
fn changed(mut events: Vec<TransferEvent>, at: usize, change: u8) -> Vec<TransferEvent> {
    let n = events.len();
    let e = &mut events[at % n];
    match change {
        1 => match &mut e.kind {
            EventKind::Posted { amount, .. } | EventKind::Pending { amount, .. } => *amount = amount.wrapping_add(1),
            EventKind::PostPending { amount, .. } => *amount = Some(amount.map_or(1, |a| a.wrapping_add(1))),
            EventKind::VoidPending { pending_id } => pending_id.0 += 1,
        },
        2 => e.code ^= 1,
        3 => {
            e.metadata = Some(match e.metadata.take() {
                Some(_) => r#"{"retry":2}"#.to_owned(),
                None => r#"{"retry":1}"#.to_owned(),
            })
        }
        4 => e.linked = !e.linked,
        _ => {}
    }
    events
}

fn currency() -> impl Strategy<Value = Currency> {
    prop_oneof![4 => Just(Currency::parse("BRL").unwrap()), 1 => Just(Currency::parse("USD").unwrap())]
}

fn new_account() -> impl Strategy<Value = NewAccount> {
    (
        0..TENANTS,
        1..=ACCOUNT_IDS,
        currency(),
        0u16..3,
        prop_oneof![Just(0u16), Just(1), Just(2), Just(4), Just(3)],
        prop_oneof![3 => Just(0u64), 1 => 1u64..100],
        prop::option::of(0u128..2),
    )
        .prop_map(|(tenant, id, currency, code, flags, credit_limit, holder)| NewAccount {
            key: AccountKey { tenant: TenantId(tenant), id: AccountId(id) },
            currency,
            code,
            flags: AccountFlags(flags),
            credit_limit,
            metadata: None,
            holder,
        })
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![12 => 1u64..6, 8 => 1u64..40, 1 => Just(0u64), 1 => Just(AMOUNT_MAX), 1 => Just(AMOUNT_MAX / 2 + 1)]
}

fn event() -> impl Strategy<Value = TransferEvent> {
    let account = 0..=ACCOUNT_IDS;
    let transfer = 1..=TRANSFER_IDS;
    let kind = prop_oneof![
        4 => (account.clone(), account.clone(), amount()).prop_map(|(d, c, a)| EventKind::Posted { debit: AccountId(d), credit: AccountId(c), amount: a }),
        3 => (account.clone(), account, amount(), prop_oneof![Just(0u32), 1u32..4]).prop_map(|(d, c, a, t)| EventKind::Pending { debit: AccountId(d), credit: AccountId(c), amount: a, timeout_seconds: t }),
        2 => (transfer.clone(), prop::option::of(amount())).prop_map(|(p, a)| EventKind::PostPending { pending_id: TransferId(p), amount: a }),
        1 => transfer.clone().prop_map(|p| EventKind::VoidPending { pending_id: TransferId(p) }),
    ];
    (0..TENANTS, transfer, kind, 0u16..2, prop::bool::weighted(0.2)).prop_map(|(tenant, id, kind, code, linked)| {
        TransferEvent {
            key: TransferKey { tenant: TenantId(tenant), id: TransferId(id) },
            kind,
            code,
            metadata: None,
            linked,
        }
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => prop::collection::vec(new_account(), 1..4).prop_map(Op::Accounts),
        6 => prop::collection::vec(event(), 1..8).prop_map(|mut events| {
            // Most batches close their last chain; a few are left open on purpose.
            if let Some(last) = events.last_mut() { if last.linked && last.code == 0 { last.linked = false; } }
            Op::Transfers(events)
        }),
        3 => (any::<usize>(), any::<usize>(), 0u8..5).prop_map(|(batch, at, change)| Op::Replay(batch, at, change)),
        1 => (0..TENANTS, 1..=ACCOUNT_IDS).prop_map(|(tenant, id)| Op::Close(tenant, id)),
        1 => prop_oneof![(0u64..3_000_000_000), (0u64..4).prop_map(|s| s * 1_000_000_000)].prop_map(Op::Advance),
        1 => Just(Op::Expire),
    ]
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut engine = MemoryLedger::new();
    let mut model = Model::default();
    let mut now = 1_700_000_000_000_000_000u64;
    let mut sent: Vec<Vec<TransferEvent>> = Vec::new();
    for op in ops {
        let replayed;
        let op = match op {
            Op::Replay(_, _, _) if sent.is_empty() => continue,
            Op::Replay(batch, at, change) => {
                replayed = Op::Transfers(changed(sent[batch % sent.len()].clone(), *at, *change));
                &replayed
            }
            op => op,
        };
        match op {
            Op::Accounts(news) => {
                let commands: Vec<AccountCommand> = news.iter().cloned().map(AccountCommand::Create).collect();
                let results = engine.accounts(now, &commands);
                for (new, (result, _)) in news.iter().zip(results) {
                    let k = (new.key.tenant.0, new.key.id.0);
                    let expected = match validate_account(new) {
                        Err(code) => code,
                        Ok(()) => match model.accounts.get(&k) {
                            Some(a) if a.matches(new) => AccountResult::Exists,
                            Some(_) => AccountResult::ExistsWithDifferentFields,
                            None => {
                                let timestamp = model.tick(now);
                                model.accounts.insert(
                                    k,
                                    Account {
                                        key: new.key,
                                        currency: new.currency,
                                        code: new.code,
                                        flags: new.flags,
                                        credit_limit: new.credit_limit,
                                        metadata: None,
                                        holder: new.holder,
                                        timestamp,
                                        debits_posted: 0,
                                        credits_posted: 0,
                                        debits_pending: 0,
                                        credits_pending: 0,
                                    },
                                );
                                AccountResult::Created
                            }
                        },
                    };
                    prop_assert_eq!(result, expected, "account {:?}", new);
                }
            }
            Op::Close(tenant, id) => {
                let key = AccountKey { tenant: TenantId(*tenant), id: AccountId(*id) };
                let (result, _) = engine.accounts(now, &[AccountCommand::Close(key)])[0].clone();
                let expected = match model.accounts.get_mut(&(*tenant, *id)) {
                    None => AccountResult::AccountNotFound,
                    Some(a) if a.flags.closed() => AccountResult::AlreadyClosed,
                    Some(a) => {
                        a.flags.0 |= AccountFlags::CLOSED;
                        AccountResult::Closed
                    }
                };
                prop_assert_eq!(result, expected, "close {:?}", key);
            }
            Op::Replay(..) => unreachable!("replaced by the batch it replays"),
            Op::Transfers(events) => {
                sent.push(events.clone());
                let got: Vec<TransferResult> = engine.transfers(now, events).into_iter().map(|o| o.result).collect();
                let expected = model.batch(now, events);
                prop_assert_eq!(got, expected, "events {:?}", events);
            }
            Op::Advance(dt) => now += dt,
            Op::Expire => {
                engine.expire(now);
                model.expire(now);
            }
        }
        for (k, a) in &model.accounts {
            let e = &engine.accounts[&AccountKey { tenant: TenantId(k.0), id: AccountId(k.1) }];
            prop_assert_eq!(
                (e.debits_posted, e.credits_posted, e.debits_pending, e.credits_pending, e.flags),
                (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending, a.flags)
            );
        }
        prop_assert_eq!(engine.accounts.len(), model.accounts.len());
        prop_assert_eq!(engine.transfers.len(), model.entries.len());
        prop_assert_eq!(engine.clock.last, model.last);
    }
    let mut verifier = verify::Verifier::new();
    for a in engine.accounts.values() {
        verifier.account(a);
    }
    for t in engine.transfers.values() {
        verifier.entry(t);
    }
    let report = verifier.finish();
    prop_assert!(report.violations.is_empty(), "{:?}", report.violations);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]
    #[test]
    fn engine_agrees_with_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}
