//! The conformance suite every storage engine must pass, written once and instantiated per engine
//! with [`conformance_tests!`]. Each case gets a fresh, empty location from the engine's factory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger::*;

use crate::{ApiKeyRecord, Location, Page, Store, StoreError, TenantRecord};

pub const NOW: u64 = 1_800_000_000_000_000_000;
const T: TenantId = TenantId(0xA1);
const OTHER: TenantId = TenantId(0xB2);

fn brl() -> Currency {
    Currency::parse("BRL").unwrap()
}

fn new_account(tenant: TenantId, id: u128, flags: u16) -> AccountCommand {
    AccountCommand::Create(NewAccount {
        key: AccountKey { tenant, id: AccountId(id) },
        currency: brl(),
        code: 10,
        flags: AccountFlags(flags),
        credit_limit: 0,
        metadata: Some(r#"{"name":"test"}"#.into()),
        holder: Some(id + 1_000),
    })
}

fn event(id: u128, kind: EventKind) -> TransferEvent {
    TransferEvent { key: TransferKey { tenant: T, id: TransferId(id) }, kind, code: 1, metadata: None, linked: false }
}

fn posted(id: u128, d: u128, c: u128, amount: u64) -> TransferEvent {
    event(id, EventKind::Posted { debit: AccountId(d), credit: AccountId(c), amount })
}

fn open_fixed(location: &Location) -> (Store, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(NOW));
    let clock = now.clone();
    let store = Store::open_with_clock(location, Arc::new(move || clock.load(Ordering::SeqCst))).expect("open store");
    (store, now)
}

const BANK: u128 = 1;
const ALICE: u128 = 2;
const BOB: u128 = 3;

fn setup(store: &Store) {
    let results = store
        .engine
        .accounts(vec![
            new_account(T, BANK, 0),
            new_account(T, ALICE, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS),
            new_account(T, BOB, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS),
        ])
        .unwrap();
    assert!(results.iter().all(|(r, _)| *r == AccountResult::Created), "{results:?}");
    let out = store.engine.transfers(vec![posted(100, BANK, ALICE, 1_000)]).unwrap();
    assert_eq!(out[0].result, TransferResult::Created);
}

fn balances(store: &Store, id: u128) -> (u64, u64, u64, u64) {
    let a = store.queries.account(AccountKey { tenant: T, id: AccountId(id) }).unwrap().expect("account exists");
    (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)
}

fn assert_verified(store: &Store) {
    let report = store.verify().unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

pub fn accounts_round_trip(location: Location) {
    let (store, _) = open_fixed(&location);
    let created = store.engine.accounts(vec![new_account(T, 9, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)]).unwrap();
    assert_eq!(created[0].0, AccountResult::Created);
    let stored = store.queries.account(AccountKey { tenant: T, id: AccountId(9) }).unwrap().unwrap();
    assert_eq!(Some(&stored), created[0].1.as_ref());
    assert_eq!(stored.metadata.as_deref(), Some(r#"{"name":"test"}"#));
    assert_eq!(stored.holder, Some(1_009), "the holder reference is stored");
    let again = store.engine.accounts(vec![new_account(T, 9, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)]).unwrap();
    assert_eq!(again[0].0, AccountResult::Exists);
    let different = store.engine.accounts(vec![new_account(T, 9, 0)]).unwrap();
    assert_eq!(different[0].0, AccountResult::ExistsWithDifferentFields);
    let AccountCommand::Create(mut other_holder) = new_account(T, 9, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
    else {
        unreachable!()
    };
    other_holder.holder = None;
    let different = store.engine.accounts(vec![AccountCommand::Create(other_holder)]).unwrap();
    assert_eq!(different[0].0, AccountResult::ExistsWithDifferentFields, "the holder is part of the account");
    // Ids are scoped by tenant: the same id elsewhere is another account, and reads do not cross.
    assert_eq!(store.engine.accounts(vec![new_account(OTHER, 9, 0)]).unwrap()[0].0, AccountResult::Created);
    assert_eq!(store.queries.account(AccountKey { tenant: TenantId(0xC3), id: AccountId(9) }).unwrap(), None);
    let closed =
        store.engine.accounts(vec![AccountCommand::Close(AccountKey { tenant: T, id: AccountId(9) })]).unwrap();
    assert_eq!(closed[0].0, AccountResult::Closed);
    assert!(store.queries.account(AccountKey { tenant: T, id: AccountId(9) }).unwrap().unwrap().flags.closed());
    assert_verified(&store);
}

pub fn transfers_round_trip(location: Location) {
    let (store, _) = open_fixed(&location);
    setup(&store);
    let out = store.engine.transfers(vec![posted(1, ALICE, BOB, 300)]).unwrap();
    assert_eq!(out[0].result, TransferResult::Created);
    let transfer = out[0].transfer.clone().unwrap();
    let stored = store.queries.entry(TransferKey { tenant: T, id: TransferId(1) }).unwrap().unwrap();
    assert_eq!(stored, Entry::Created(transfer.clone()));
    assert_eq!(store.engine.transfers(vec![posted(1, ALICE, BOB, 300)]).unwrap()[0].transfer, Some(transfer));
    assert_eq!(
        store.engine.transfers(vec![posted(1, ALICE, BOB, 301)]).unwrap()[0].result,
        TransferResult::ExistsWithDifferentFields
    );
    let failed = store.engine.transfers(vec![posted(2, ALICE, BOB, 5_000)]).unwrap();
    assert_eq!(failed[0].result, TransferResult::InsufficientFunds);
    assert!(matches!(
        store.queries.entry(TransferKey { tenant: T, id: TransferId(2) }).unwrap(),
        Some(Entry::Failed { result: TransferResult::InsufficientFunds, .. })
    ));
    // Two-phase: hold, partial post; hold, void.
    let hold = event(
        3,
        EventKind::Pending { debit: AccountId(ALICE), credit: AccountId(BOB), amount: 200, timeout_seconds: 0 },
    );
    let post = event(4, EventKind::PostPending { pending_id: TransferId(3), amount: Some(150) });
    let hold2 = event(
        5,
        EventKind::Pending { debit: AccountId(ALICE), credit: AccountId(BOB), amount: 100, timeout_seconds: 60 },
    );
    let void = event(6, EventKind::VoidPending { pending_id: TransferId(5) });
    for e in [hold, post, hold2, void] {
        assert_eq!(store.engine.transfers(vec![e]).unwrap()[0].result, TransferResult::Created);
    }
    assert_eq!(balances(&store, ALICE), (450, 1000, 0, 0));
    assert_eq!(balances(&store, BOB), (0, 450, 0, 0));
    let pending = store.queries.entry(TransferKey { tenant: T, id: TransferId(3) }).unwrap().unwrap();
    assert!(matches!(pending, Entry::Created(Transfer { state: PendingState::Posted, .. })));
    // A linked chain that fails leaves nothing behind.
    let mut a = posted(7, ALICE, BOB, 500);
    a.linked = true;
    let b = posted(8, ALICE, BOB, 501);
    let out = store.engine.transfers(vec![a, b]).unwrap();
    assert_eq!(out[0].result, TransferResult::LinkedEventFailed);
    assert_eq!(out[1].result, TransferResult::InsufficientFunds);
    assert_eq!(balances(&store, ALICE), (450, 1000, 0, 0));
    assert_verified(&store);
}

pub fn durable_across_restart(location: Location) {
    let before;
    {
        let (store, _) = open_fixed(&location);
        setup(&store);
        store.engine.transfers(vec![posted(1, ALICE, BOB, 10), posted(2, ALICE, BOB, 9_999)]).unwrap();
        before = (balances(&store, ALICE), balances(&store, BOB));
        store.close();
    }
    let (store, _) = open_fixed(&location);
    assert_eq!((balances(&store, ALICE), balances(&store, BOB)), before);
    // A transfer created before the restart, sent again, is found: the first outcome, no money.
    let first = match store.queries.entry(TransferKey { tenant: T, id: TransferId(1) }).unwrap() {
        Some(Entry::Created(t)) => t,
        other => panic!("{other:?}"),
    };
    let again = store.engine.transfers(vec![posted(1, ALICE, BOB, 10)]).unwrap();
    assert_eq!(again[0].result, TransferResult::Exists);
    assert_eq!(again[0].transfer.as_ref(), Some(&first));
    assert_eq!((balances(&store, ALICE), balances(&store, BOB)), before);
    // The clock continues after the stored one, and remembered failures are still remembered.
    store.engine.transfers(vec![posted(20, BANK, ALICE, 1_000_000)]).unwrap();
    let retry = store.engine.transfers(vec![posted(2, ALICE, BOB, 9_999)]).unwrap();
    assert_eq!(retry[0].result, TransferResult::InsufficientFunds);
    let new = store.engine.transfers(vec![posted(3, ALICE, BOB, 9_999)]).unwrap();
    assert_eq!(new[0].result, TransferResult::Created);
    let ts_old = match store.queries.entry(TransferKey { tenant: T, id: TransferId(1) }).unwrap().unwrap() {
        Entry::Created(t) => t.timestamp,
        e => panic!("{e:?}"),
    };
    assert!(new[0].transfer.as_ref().unwrap().timestamp > ts_old);
    // The listing goes on from where it was before the restart.
    let alice = AccountKey { tenant: T, id: AccountId(ALICE) };
    let listed: Vec<TransferId> = store
        .queries
        .account_transfers(alice, Page { before: None, limit: 10 })
        .unwrap()
        .unwrap()
        .iter()
        .map(|t| t.key.id)
        .collect();
    assert_eq!(listed, [3, 20, 1, 100].map(TransferId));
    assert_verified(&store);
}

pub fn holds_expire(location: Location) {
    let (store, now) = open_fixed(&location);
    setup(&store);
    let hold = event(
        1,
        EventKind::Pending { debit: AccountId(ALICE), credit: AccountId(BOB), amount: 400, timeout_seconds: 1 },
    );
    store.engine.transfers(vec![hold]).unwrap();
    assert_eq!(balances(&store, ALICE), (0, 1000, 400, 0));
    now.fetch_add(2_000_000_000, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while balances(&store, ALICE) != (0, 1000, 0, 0) {
        assert!(Instant::now() < deadline, "hold not released by the sweeper");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(balances(&store, BOB), (0, 0, 0, 0));
    let post = event(2, EventKind::PostPending { pending_id: TransferId(1), amount: None });
    assert_eq!(store.engine.transfers(vec![post]).unwrap()[0].result, TransferResult::PendingTransferExpired);
    assert_verified(&store);
}

/// A hold past its expiry reserves nothing, swept or not: the first batch after it is due releases
/// it before the batch's own transfers, whenever the last sweep ran, so a transfer it would have
/// blocked goes through, and a void of it in the same batch finds it expired.
pub fn an_expired_hold_blocks_nothing(location: Location) {
    let (store, now) = open_fixed(&location);
    setup(&store);
    let hold = event(
        1,
        EventKind::Pending { debit: AccountId(ALICE), credit: AccountId(BOB), amount: 1_000, timeout_seconds: 1 },
    );
    assert_eq!(store.engine.transfers(vec![hold]).unwrap()[0].result, TransferResult::Created);
    let spend = posted(2, ALICE, BOB, 1_000);
    assert_eq!(store.engine.transfers(vec![spend]).unwrap()[0].result, TransferResult::InsufficientFunds);
    // Due now; the engine's timed sweep (every `EXPIRY_INTERVAL` of wall time) has not come round.
    now.fetch_add(2_000_000_000, Ordering::SeqCst);
    let void = event(3, EventKind::VoidPending { pending_id: TransferId(1) });
    let out = store.engine.transfers(vec![void, posted(4, ALICE, BOB, 1_000)]).unwrap();
    assert_eq!(out[0].result, TransferResult::PendingTransferExpired);
    assert_eq!(out[1].result, TransferResult::Created);
    assert_eq!(balances(&store, ALICE), (1_000, 1_000, 0, 0));
    assert_eq!(balances(&store, BOB), (0, 1_000, 0, 0));
    assert_verified(&store);
}

/// More holds fall due than one sweep releases (here while the clock jumps; in life while no node
/// ran batches): a transfer behind them is not judged against a hold that reserves nothing, and so
/// is not failed under its id for good.
pub fn a_backlog_of_due_holds_blocks_nothing(location: Location) {
    let (store, now) = open_fixed(&location);
    setup(&store);
    let hold = |id| {
        event(id, EventKind::Pending { debit: AccountId(BANK), credit: AccountId(BOB), amount: 1, timeout_seconds: 1 })
    };
    let others: Vec<TransferEvent> =
        (0..2 * crate::engine::EXPIRY_SWEEP_MAX as u128 + 1).map(|i| hold(10_000 + i)).collect();
    for chunk in others.chunks(4_000) {
        let out = store.engine.transfers(chunk.to_vec()).unwrap();
        assert!(out.iter().all(|o| o.result == TransferResult::Created));
    }
    // Alice's hold falls due last (the sweep takes the earliest first).
    let alices = event(
        1,
        EventKind::Pending { debit: AccountId(ALICE), credit: AccountId(BOB), amount: 1_000, timeout_seconds: 1 },
    );
    assert_eq!(store.engine.transfers(vec![alices]).unwrap()[0].result, TransferResult::Created);
    now.fetch_add(2_000_000_000, Ordering::SeqCst);
    let out = store.engine.transfers(vec![posted(2, ALICE, BOB, 1_000)]).unwrap();
    assert_eq!(out[0].result, TransferResult::Created);
    assert_eq!(balances(&store, ALICE), (1_000, 1_000, 0, 0));
    assert_eq!(balances(&store, BOB), (0, 1_000, 0, 0));
    assert_verified(&store);
}

pub fn listing_is_stable_under_inserts(location: Location) {
    let (store, now) = open_fixed(&location);
    setup(&store);
    for i in 0..25u128 {
        now.fetch_add(1, Ordering::SeqCst);
        store.engine.transfers(vec![posted(1000 + i, ALICE, BOB, 1)]).unwrap();
    }
    let key = AccountKey { tenant: T, id: AccountId(ALICE) };
    let first = store.queries.account_transfers(key, Page { before: None, limit: 10 }).unwrap().unwrap();
    assert_eq!(first.len(), 10);
    assert_eq!(first[0].key.id, TransferId(1024));
    // New transfers arrive between pages: they are newer than the cursor and do not shift pages.
    for i in 0..5u128 {
        store.engine.transfers(vec![posted(2000 + i, BOB, ALICE, 1)]).unwrap();
    }
    let mut seen: Vec<TransferId> = first.iter().map(|t| t.key.id).collect();
    let mut cursor = first.last().map(|t| t.timestamp);
    loop {
        let page = store.queries.account_transfers(key, Page { before: cursor, limit: 10 }).unwrap().unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.windows(2).all(|w| w[0].timestamp > w[1].timestamp), "newest first");
        seen.extend(page.iter().map(|t| t.key.id));
        cursor = page.last().map(|t| t.timestamp);
    }
    let mut expected: Vec<TransferId> = (0..25u128).rev().map(|i| TransferId(1000 + i)).collect();
    expected.push(TransferId(100));
    assert_eq!(seen, expected);
    // A cursor must be a transfer of this listing: not another account's, not a failure, not
    // a made-up number.
    let bobs = store.engine.transfers(vec![posted(3000, BANK, BOB, 1)]).unwrap()[0].transfer.clone().unwrap();
    let failed = store.engine.transfers(vec![posted(3001, ALICE, BOB, 1 << 40)]).unwrap();
    assert_eq!(failed[0].result, TransferResult::InsufficientFunds);
    let failed_at = match store.queries.entry(TransferKey { tenant: T, id: TransferId(3001) }).unwrap() {
        Some(Entry::Failed { timestamp, .. }) => timestamp,
        other => panic!("{other:?}"),
    };
    for before in [bobs.timestamp, failed_at, 12_345, u64::MAX] {
        let page = store.queries.account_transfers(key, Page { before: Some(before), limit: 10 }).unwrap();
        assert!(page.is_none(), "cursor {before} is not one of ALICE's transfers: {page:?}");
    }
    let bob = AccountKey { tenant: T, id: AccountId(BOB) };
    let page =
        store.queries.account_transfers(bob, Page { before: Some(bobs.timestamp), limit: 100 }).unwrap().unwrap();
    assert_eq!(page.len(), 30, "BOB's transfers before his last: 25 from ALICE, 5 to her");
    assert_eq!(page.iter().filter(|t| t.debit_account_id == AccountId(BOB)).count(), 5);
    assert!(page.windows(2).all(|w| w[0].timestamp > w[1].timestamp), "newest first");
    assert_verified(&store);
}

pub fn tenants_and_keys(location: Location) {
    let (store, _) = open_fixed(&location);
    let q = &store.queries;
    let tenant = TenantRecord { id: 77, name: "acme".into(), created_at: NOW };
    let key =
        ApiKeyRecord { id: 5, tenant_id: 77, created_at: NOW, revoked_at: None, scopes: Some("accounts:read".into()) };
    q.create_tenant(&tenant, &key, &[1; 32]).unwrap();
    assert_eq!(q.tenant(77).unwrap(), Some(tenant.clone()));
    assert_eq!(q.api_key_by_hash(&[1; 32]).unwrap(), Some(key.clone()));
    assert_eq!(q.api_key_by_hash(&[2; 32]).unwrap(), None);
    let second = ApiKeyRecord { id: 6, ..key.clone() };
    q.create_api_key(&second, &[2; 32]).unwrap();
    assert!(matches!(
        q.create_api_key(&ApiKeyRecord { id: 7, ..key.clone() }, &[2; 32]),
        Err(crate::StoreError::Conflict(_))
    ));
    assert!(!q.revoke_api_key(78, 5, NOW).unwrap(), "another tenant cannot revoke");
    assert!(q.revoke_api_key(77, 5, NOW + 1).unwrap());
    assert!(!q.revoke_api_key(77, 5, NOW + 2).unwrap(), "already revoked");
    assert_eq!(q.api_key_by_hash(&[1; 32]).unwrap().unwrap().revoked_at, Some(NOW + 1));
    assert!(matches!(
        q.create_tenant(&tenant, &ApiKeyRecord { id: 8, ..key }, &[3; 32]),
        Err(crate::StoreError::Conflict(_))
    ));
    assert_eq!(q.api_key_by_hash(&[3; 32]).unwrap(), None, "a failed tenant creation leaves no key");
    q.ping().unwrap();
}

/// Many threads move money among few accounts at once; the ledger must end balanced, with no
/// overdraft, and with every acknowledged transfer stored.
pub fn concurrent_writers(location: Location) {
    let store = Arc::new(Store::open(&location).unwrap());
    setup(&store);
    let funded: Vec<u128> = (10..16).collect();
    let mut commands = Vec::new();
    for id in &funded {
        commands.push(new_account(T, *id, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS));
    }
    store.engine.accounts(commands).unwrap();
    let fund: Vec<TransferEvent> = funded.iter().map(|id| posted(500 + id, BANK, *id, 100)).collect();
    assert!(store.engine.transfers(fund).unwrap().iter().all(|o| o.result == TransferResult::Created));
    let threads: Vec<_> = (0..8u128)
        .map(|t| {
            let store = store.clone();
            let funded = funded.clone();
            std::thread::spawn(move || {
                let mut created = Vec::new();
                for i in 0..150u128 {
                    let d = funded[((t + i) % 6) as usize];
                    let c = funded[((t * 7 + i * 3 + 1) % 6) as usize];
                    if d == c {
                        continue;
                    }
                    let id = 1_000_000 + t * 10_000 + i;
                    let out = store.engine.transfers(vec![posted(id, d, c, 7)]).unwrap();
                    if out[0].result == TransferResult::Created {
                        created.push(id);
                    } else {
                        assert_eq!(out[0].result, TransferResult::InsufficientFunds);
                    }
                }
                created
            })
        })
        .collect();
    let created: Vec<u128> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(!created.is_empty());
    for id in &created {
        let entry = store.queries.entry(TransferKey { tenant: T, id: TransferId(*id) }).unwrap();
        assert!(matches!(entry, Some(Entry::Created(_))), "acknowledged transfer {id} missing");
    }
    let total: u64 = funded
        .iter()
        .map(|id| {
            let (dp, cp, _, _) = balances(&store, *id);
            assert!(dp <= cp, "account {id} overdrawn: {dp} > {cp}");
            cp - dp
        })
        .sum();
    assert_eq!(total, 600, "money was created or destroyed");
    assert_verified(&store);
}

/// The engine gives exactly what the pure ledger gives for the same commands and clock, holds
/// that expire included: before each batch the model releases what is due, as the engine must.
pub fn agrees_with_memory_ledger(location: Location) {
    let (store, now) = open_fixed(&location);
    let mut model = MemoryLedger::new();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let accounts: Vec<AccountCommand> = (1..=4)
        .map(|id| new_account(T, id, if id == 1 { 0 } else { AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS }))
        .collect();
    let t = now.load(Ordering::SeqCst);
    let got = store.engine.accounts(accounts.clone()).unwrap();
    assert_eq!(got, model.accounts(t, &accounts));
    for round in 0..60 {
        // Now and then past a second: holds made with a time-out of 1 or 2 s come due.
        let step = if next(5) == 0 { 700_000_000 + next(700_000_000) } else { next(3) * 1_000 };
        now.fetch_add(step, Ordering::SeqCst);
        let t = now.load(Ordering::SeqCst);
        model.expire(t);
        let events: Vec<TransferEvent> = (0..1 + next(6))
            .map(|_| {
                let id = 1 + next(40) as u128;
                let kind = match next(5) {
                    0 | 1 => EventKind::Posted {
                        debit: AccountId(1 + next(4) as u128),
                        credit: AccountId(1 + next(4) as u128),
                        amount: 1 + next(50),
                    },
                    2 => EventKind::Pending {
                        debit: AccountId(1 + next(4) as u128),
                        credit: AccountId(1 + next(4) as u128),
                        amount: 1 + next(50),
                        timeout_seconds: next(3) as u32,
                    },
                    3 => EventKind::PostPending { pending_id: TransferId(1 + next(40) as u128), amount: None },
                    _ => EventKind::VoidPending { pending_id: TransferId(1 + next(40) as u128) },
                };
                TransferEvent { linked: next(4) == 0, ..event(id, kind) }
            })
            .collect();
        let mut events = events;
        events.last_mut().unwrap().linked = false;
        let events: Vec<TransferEvent> =
            events.into_iter().filter(|e| validate_event(e).is_ok() || !e.linked).collect();
        let mut events = events;
        if let Some(last) = events.last_mut() {
            last.linked = false;
        }
        let got = store.engine.transfers(events.clone()).unwrap();
        let expected = model.transfers(t, &events);
        assert_eq!(got, expected, "round {round}");
    }
    let mut stored: Map<AccountKey, Account> = Map::default();
    store.queries.scan(&mut |a| drop(stored.insert(a.key, a)), &mut |_| {}).unwrap();
    assert_eq!(stored, model.accounts);
    // Every id as stored: created (with its hold's state), failed, or never used. (A failure is
    // stored without its `linked` flag, which idempotency does not compare.)
    let unlinked = |entry: Option<Entry>| match entry {
        Some(Entry::Failed { mut event, result, timestamp }) => {
            event.linked = false;
            Some(Entry::Failed { event, result, timestamp })
        }
        entry => entry,
    };
    for id in 1..=40 {
        let key = TransferKey { tenant: T, id: TransferId(id) };
        let stored = unlinked(store.queries.entry(key).unwrap());
        assert_eq!(stored, unlinked(model.transfers.get(&key).cloned()), "transfer {id}");
    }
    // Each account's listing, read three at a time, is the model's created transfers touching it,
    // newest first.
    for id in 1..=4 {
        let key = AccountKey { tenant: T, id: AccountId(id) };
        let mut expected: Vec<&Transfer> = model
            .transfers
            .values()
            .filter_map(|e| match e {
                Entry::Created(t) if t.debit_account_id == key.id || t.credit_account_id == key.id => Some(t),
                _ => None,
            })
            .collect();
        expected.sort_by_key(|t| std::cmp::Reverse(t.timestamp));
        let mut listed = Vec::new();
        let mut before = None;
        loop {
            let page = store.queries.account_transfers(key, Page { before, limit: 3 }).unwrap().unwrap();
            listed.extend(page.iter().cloned());
            match page.last() {
                Some(t) if page.len() == 3 => before = Some(t.timestamp),
                _ => break,
            }
        }
        assert_eq!(listed.iter().collect::<Vec<_>>(), expected, "account {id}");
    }
    assert_verified(&store);
}

/// A log long enough to have stored subtrees (level 4 and up: 16 leaves and more) beside the lower
/// ones proofs hash from leaves, appended in batches of uneven sizes: every inclusion and
/// consistency proof verifies against the signed head, and the leaves alone give the same root.
pub fn audit_proofs_over_stored_and_hashed_subtrees(location: Location) {
    let pkcs8 = audit::Signer::generate_pkcs8().unwrap();
    let signer = Arc::new(audit::Signer::from_pkcs8(&pkcs8).unwrap());
    let store = Store::open_with(&location, Arc::new(|| NOW), signer.clone()).unwrap();
    let mut appended = 0;
    for batch in [1usize, 20, 3, 17, 29] {
        let drafts = (0..batch).map(|i| draft(None, &format!("entry {}", appended + i))).collect();
        store.engine.execute(crate::Command::Audit(drafts)).unwrap();
        appended += batch;
    }
    let size = appended as u64;
    let head = store.queries.audit_head().unwrap().unwrap();
    assert_eq!(head.head.size, size);
    assert!(audit::verify_head(signer.public_key(), &head.head, &head.signature));
    let entries = store.queries.audit_entries(0, 1000, None).unwrap();
    let leaves: Vec<audit::Hash> = entries.iter().map(audit::Entry::leaf_hash).collect();
    // RFC 6962's MTH, straight from the leaves.
    fn mth(leaves: &[audit::Hash]) -> audit::Hash {
        match leaves.len() {
            0 => audit::merkle::empty_root(),
            1 => leaves[0],
            n => {
                let k = 1 << (usize::BITS - 1 - (n - 1).leading_zeros());
                audit::merkle::node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }
    assert_eq!(mth(&leaves), head.head.root, "the leaves alone give the signed root");
    assert_eq!(crate::audit_root(store.queries.as_ref(), size).unwrap(), head.head.root);
    for seq in 1..=size {
        let proof = crate::audit_inclusion(store.queries.as_ref(), seq, size).unwrap();
        assert!(audit::merkle::verify_inclusion(seq - 1, size, &leaves[seq as usize - 1], &proof, &head.head.root));
    }
    for first in 1..=size {
        let old_root = crate::audit_root(store.queries.as_ref(), first).unwrap();
        assert_eq!(old_root, mth(&leaves[..first as usize]), "root of {first}");
        let proof = crate::audit_consistency(store.queries.as_ref(), first, size).unwrap();
        assert!(audit::merkle::verify_consistency(first, size, &old_root, &head.head.root, &proof), "from {first}");
    }
    store.close();
}

fn draft(tenant: Option<u128>, action: &str) -> audit::Draft {
    audit::Draft {
        tenant,
        actor: "operator".into(),
        action: action.into(),
        resource: "r1".into(),
        request_id: "req".into(),
        source: "127.0.0.1:1".into(),
        outcome: String::new(),
    }
}

/// Audit entries commit with the ledger work they describe, are numbered from 1 in order, and
/// every stored head, proof and leaf checks out; a second process's key cannot pass as this one's.
pub fn audit_log(location: Location) {
    let pkcs8 = audit::Signer::generate_pkcs8().unwrap();
    let signer = Arc::new(audit::Signer::from_pkcs8(&pkcs8).unwrap());
    let now = Arc::new(AtomicU64::new(NOW));
    let clock = now.clone();
    let store = Store::open_with(&location, Arc::new(move || clock.load(Ordering::SeqCst)), signer.clone()).unwrap();
    setup(&store);
    assert_eq!(store.queries.audit_head().unwrap(), None);
    // A control-plane action, then a transfer whose entry takes the ledger's outcome.
    let mut d = draft(None, "POST /v1/tenants");
    d.outcome = "201".into();
    assert!(matches!(store.engine.execute(crate::Command::Audit(vec![d])).unwrap(), crate::Reply::Audited));
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .engine
        .submit_audited(
            crate::Command::Transfers(vec![posted(900, BANK, ALICE, 5)]),
            Some(draft(Some(T.0), "POST /v1/transfers")),
            Box::new(move |r| drop(tx.send(r))),
        )
        .unwrap();
    rx.recv().unwrap().unwrap();
    // A refused transfer is audited with its result code.
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .engine
        .submit_audited(
            crate::Command::Transfers(vec![posted(901, ALICE, BOB, 1_000_000_000_000)]),
            Some(draft(Some(T.0), "POST /v1/transfers")),
            Box::new(move |r| drop(tx.send(r))),
        )
        .unwrap();
    rx.recv().unwrap().unwrap();
    for i in 0..7 {
        let mut d = draft(Some(OTHER.0), "POST /v1/accounts");
        d.outcome = format!("{}", 200 + i);
        store.engine.execute(crate::Command::Audit(vec![d])).unwrap();
    }

    let all = store.queries.audit_entries(0, 100, None).unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    assert!(all.windows(2).all(|w| w[0].time < w[1].time), "times are the ledger clock's: increasing");
    assert_eq!(all[1].draft.outcome, "created");
    assert_eq!(all[2].draft.outcome, "insufficient_funds");
    // The transfer's entry is no older than the transfer itself.
    let transfer = match store.queries.entry(TransferKey { tenant: T, id: TransferId(900) }).unwrap() {
        Some(Entry::Created(t)) => t,
        other => panic!("{other:?}"),
    };
    assert!(all[1].time > transfer.timestamp);
    let mine = store.queries.audit_entries(0, 100, Some(T.0)).unwrap();
    assert_eq!(mine.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(store.queries.audit_entries(3, 2, None).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);

    let head = store.queries.audit_head().unwrap().unwrap();
    assert_eq!(head.head.size, 10);
    assert!(audit::verify_head(signer.public_key(), &head.head, &head.signature));
    assert_eq!(crate::audit_root(store.queries.as_ref(), 10).unwrap(), head.head.root);
    for seq in 1..=10u64 {
        let proof = crate::audit_inclusion(store.queries.as_ref(), seq, 10).unwrap();
        let leaf = all[seq as usize - 1].leaf_hash();
        assert!(audit::merkle::verify_inclusion(seq - 1, 10, &leaf, &proof, &head.head.root), "entry {seq}");
    }
    for first in 1..=10u64 {
        let old_root = crate::audit_root(store.queries.as_ref(), first).unwrap();
        let proof = crate::audit_consistency(store.queries.as_ref(), first, 10).unwrap();
        assert!(audit::merkle::verify_consistency(first, 10, &old_root, &head.head.root, &proof));
    }
    let report = crate::audit_verify(store.queries.as_ref(), signer.public_key(), None).unwrap();
    assert_eq!((report.entries, report.finding), (10, None));
    assert_eq!(report.heads, 10, "one signed head per batch");
    let stranger = audit::Signer::from_pkcs8(&audit::Signer::generate_pkcs8().unwrap()).unwrap();
    let report = crate::audit_verify(store.queries.as_ref(), stranger.public_key(), None).unwrap();
    assert_eq!(report.finding, Some(audit::Finding::Signature { size: 1 }));

    // The tree goes on where it stopped after a restart.
    store.close();
    let store = Store::open_with(&location, Arc::new(move || now.load(Ordering::SeqCst)), signer.clone()).unwrap();
    store.engine.execute(crate::Command::Audit(vec![draft(None, "after restart")])).unwrap();
    let report = crate::audit_verify(store.queries.as_ref(), signer.public_key(), None).unwrap();
    assert_eq!((report.entries, report.finding), (11, None));

    // An operator action from the command line, beside the running writer (whose clock is far
    // behind the wall clock here), then the writer again: one tree, times still increasing, and
    // the ledger clock moved past the entry so later transfers stay after it.
    Store::append_audit_beside(&location, signer.clone(), vec![draft(None, "keys.rotate")]).unwrap();
    store.engine.execute(crate::Command::Audit(vec![draft(None, "after the command line")])).unwrap();
    let out = store.engine.transfers(vec![posted(902, BANK, ALICE, 1)]).unwrap();
    let all = store.queries.audit_entries(0, 100, None).unwrap();
    let actions: Vec<&str> = all[10..].iter().map(|e| e.draft.action.as_str()).collect();
    assert_eq!(actions, ["after restart", "keys.rotate", "after the command line"]);
    assert!(all.windows(2).all(|w| w[0].time < w[1].time), "times increase across both writers");
    let created = out[0].transfer.as_ref().expect("created").timestamp;
    assert!(created > all[12].time, "the ledger clock is past the command line's entry");
    let report = crate::audit_verify(store.queries.as_ref(), signer.public_key(), None).unwrap();
    assert_eq!((report.entries, report.finding), (13, None));
    // The log's own key is the one that signed its first head; a stray key appends nothing (its
    // writer finds the newest head signed by another key) and is not let on.
    let stray = Arc::new(audit::Signer::from_pkcs8(&audit::Signer::generate_pkcs8().unwrap()).unwrap());
    assert!(crate::audit_key_signs(store.queries.as_ref(), signer.public_key()).unwrap());
    assert!(!crate::audit_key_signs(store.queries.as_ref(), stray.public_key()).unwrap());
    let refused = Store::append_audit_beside(&location, stray.clone(), vec![draft(None, "stray")]);
    assert!(matches!(&refused, Err(StoreError::Corrupt(why)) if why.contains("not its newest head")), "{refused:?}");
    assert_eq!(store.queries.audit_entries(0, 100, None).unwrap().len(), 13);
    assert!(!crate::audit_key_signs(store.queries.as_ref(), stray.public_key()).unwrap());

    // Storage changed behind the writers' backs: the last entry rewritten with its edge
    // recomputed and its head removed. Appending would sign the changed history, so nothing is
    // appended, by the running writer (which finds another edge than its own) or by one
    // beside it; restored, both append again.
    let saved = store.queries.audit_entries(0, 100, None).unwrap();
    let mut forged = audit::Frontier::default();
    let mut nodes = Vec::new();
    for (i, entry) in saved.iter().enumerate() {
        let mut draft = entry.draft.clone();
        if i == saved.len() - 1 {
            draft.outcome = "forged".into();
        }
        forged.append(audit::entry_leaf_hash(entry.seq, entry.time, &draft), &mut nodes);
    }
    let original = tamper_audit_edge(
        &location,
        &forged.encode(),
        "CREATE TABLE saved_heads AS SELECT * FROM audit_heads; DELETE FROM audit_heads WHERE size = 13",
    );
    let refused = store.engine.execute(crate::Command::Audit(vec![draft(None, "signed over the forgery")]));
    assert!(matches!(&refused, Err(StoreError::Corrupt(why)) if why.contains("not its newest head")), "{refused:?}");
    let refused = Store::append_audit_beside(&location, signer.clone(), vec![draft(None, "beside")]);
    assert!(matches!(&refused, Err(StoreError::Corrupt(_))), "{refused:?}");
    tamper_audit_edge(&location, &original, "INSERT INTO audit_heads SELECT * FROM saved_heads WHERE size = 13");
    store.engine.execute(crate::Command::Audit(vec![draft(None, "restored")])).unwrap();
    let report = crate::audit_verify(store.queries.as_ref(), signer.public_key(), None).unwrap();
    assert_eq!((report.entries, report.finding), (14, None));
    store.close();
}

/// Edits storage behind the writers' backs: sets the stored audit edge to `frontier` (encoded)
/// and runs `sql`, in one transaction; gives the edge it replaced.
fn tamper_audit_edge(location: &Location, frontier: &[u8], sql: &str) -> Vec<u8> {
    match location {
        Location::Embedded(dir) => {
            let mut conn = rusqlite::Connection::open(dir.join("rtpay.db")).unwrap();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
            let old: Vec<u8> =
                tx.query_row("SELECT audit_frontier FROM ledger_meta WHERE id = 1", [], |r| r.get(0)).unwrap();
            tx.execute("UPDATE ledger_meta SET audit_frontier = ?1 WHERE id = 1", [frontier]).unwrap();
            tx.execute_batch(sql).unwrap();
            tx.commit().unwrap();
            old
        }
        Location::Postgres(url) => {
            let mut client = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
            let mut tx = client.transaction().unwrap();
            let old: Vec<u8> =
                tx.query_one("SELECT audit_frontier FROM ledger_meta WHERE id = 1 FOR UPDATE", &[]).unwrap().get(0);
            tx.execute("UPDATE ledger_meta SET audit_frontier = $1 WHERE id = 1", &[&frontier]).unwrap();
            tx.batch_execute(sql).unwrap();
            tx.commit().unwrap();
            old
        }
    }
}

/// Data keys and holders: stored as given, unique where they must be, re-wrapped only from the
/// version the rotation saw.
pub fn vault_records(location: Location) {
    let (store, _) = open_fixed(&location);
    let q = store.queries.as_ref();
    assert_eq!(q.data_key(T.0).unwrap(), None);
    let key = crate::DataKeyRecord { tenant_id: T.0, kek_version: 1, wrapped: vec![1, 2, 3] };
    q.create_data_key(&key).unwrap();
    assert!(matches!(q.create_data_key(&key), Err(crate::StoreError::Conflict(_))));
    assert_eq!(q.data_key(T.0).unwrap(), Some(key.clone()));
    let rewrapped = crate::DataKeyRecord { kek_version: 2, wrapped: vec![4, 5], ..key.clone() };
    assert!(q.rewrap_data_key(&rewrapped, 1).unwrap());
    assert!(!q.rewrap_data_key(&rewrapped, 1).unwrap(), "already re-wrapped by someone else");
    assert_eq!(q.data_keys().unwrap(), vec![rewrapped]);

    // Key rotations take turns across processes: another opener of the storage (as `rtpay keys
    // rotate` on another host) waits for the turn until its holder lets it go.
    let other = Store::open_queries(&location).unwrap();
    let turn = q.key_rotation_turn().unwrap();
    let (granted, waited) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let turn = other.key_rotation_turn().unwrap();
        granted.send(()).unwrap();
        drop(turn);
    });
    assert!(waited.recv_timeout(Duration::from_millis(500)).is_err(), "the turn is taken");
    drop(turn);
    waited.recv_timeout(Duration::from_secs(30)).expect("the turn is granted once let go");
    waiter.join().unwrap();

    let holder = crate::HolderRecord {
        tenant_id: T.0,
        id: 77,
        kind: "person".into(),
        name_sealed: vec![9; 40],
        document_sealed: vec![8; 40],
        document_index: [7; 32],
        created_at: NOW,
    };
    q.create_holder(&holder).unwrap();
    assert_eq!(q.holder(T.0, 77).unwrap(), Some(holder.clone()));
    assert_eq!(q.holder(OTHER.0, 77).unwrap(), None, "tenants are walls");
    let same_document = crate::HolderRecord { id: 78, ..holder.clone() };
    assert!(matches!(q.create_holder(&same_document), Err(crate::StoreError::Conflict(_))));
    // The same document under another tenant is another holder.
    q.create_holder(&crate::HolderRecord { tenant_id: OTHER.0, ..holder }).unwrap();

    // OAuth clients (their tenant must exist).
    let tenant = crate::TenantRecord { id: T.0, name: "t".into(), created_at: NOW };
    let api_key = crate::ApiKeyRecord { id: 5, tenant_id: T.0, created_at: NOW, revoked_at: None, scopes: None };
    q.create_tenant(&tenant, &api_key, &[1; 32]).unwrap();
    let client = crate::OAuthClientRecord {
        id: 9,
        tenant_id: T.0,
        scopes: "cob.read pix.write".into(),
        created_at: NOW,
        revoked_at: None,
    };
    q.create_oauth_client(&client, &[3; 32]).unwrap();
    assert!(matches!(q.create_oauth_client(&client, &[4; 32]), Err(crate::StoreError::Conflict(_))));
    assert_eq!(q.oauth_client(9).unwrap(), Some((client, [3; 32])));
    assert_eq!(q.oauth_client(10).unwrap(), None);
    assert!(!q.revoke_oauth_client(OTHER.0, 9, NOW).unwrap(), "another tenant cannot revoke");
    assert!(q.revoke_oauth_client(T.0, 9, NOW + 1).unwrap());
    assert!(!q.revoke_oauth_client(T.0, 9, NOW + 2).unwrap(), "already revoked");
    assert_eq!(q.oauth_client(9).unwrap().unwrap().0.revoked_at, Some(NOW + 1));
    store.close();
}

/// Card products, cards and authorizations: unique where they must be, found by blind index,
/// status changed only from the status expected, each message answered once, spend summed.
pub fn card_records(location: Location) {
    let (store, _) = open_fixed(&location);
    let q = store.queries.as_ref();
    assert!(!q.card_bin_taken("40000012").unwrap());
    q.create_card_product(T.0, 1, "40000012", "{}").unwrap();
    assert!(q.card_bin_taken("40000012").unwrap(), "for every tenant");
    assert!(!q.card_bin_taken("4000001").unwrap());
    assert!(matches!(q.create_card_product(OTHER.0, 2, "40000012", "{}"), Err(crate::StoreError::Conflict(_))));
    assert_eq!(q.card_product(T.0, 1).unwrap().as_deref(), Some("{}"));
    assert_eq!(q.card_product(OTHER.0, 1).unwrap(), None, "tenants are walls");

    let card = crate::CardRow { tenant_id: T.0, id: 10, pan_index: [5; 32], status: "active".into(), body: "a".into() };
    q.create_card(&card).unwrap();
    let twin = crate::CardRow { tenant_id: OTHER.0, id: 11, ..card.clone() };
    assert!(matches!(q.create_card(&twin), Err(crate::StoreError::Conflict(_))), "numbers are unique");
    assert_eq!(q.card_by_index(&[5; 32]).unwrap(), Some(card.clone()));
    assert_eq!(q.card_by_index(&[6; 32]).unwrap(), None);
    assert_eq!(q.card(OTHER.0, 10).unwrap(), None);
    let blocked = crate::CardRow { status: "blocked".into(), body: "b".into(), ..card.clone() };
    assert!(!q.update_card(&blocked, "inactive").unwrap(), "only from the status expected");
    assert!(q.update_card(&blocked, "active").unwrap());
    assert_eq!(q.card(T.0, 10).unwrap(), Some(blocked));

    let auth = |id: u128, created_at: u64, spend: u64| crate::AuthorizationRow {
        tenant_id: T.0,
        id,
        card_id: 10,
        rrn: format!("rrn{id}"),
        created_at,
        spend,
        held_until: 0,
        body: format!("{{\"id\":{id}}}"),
    };
    // Spend is summed per UTC day of the authorization.
    const DAY: u64 = 86_400_000_000_000;
    let day = NOW - NOW % DAY;
    q.save_authorization(&auth(1, day - 1, 500), Some((&[1; 32], &b"answer 1"[..]))).unwrap();
    q.save_authorization(&auth(2, day + 1, 300), Some((&[2; 32], &b"answer 2"[..]))).unwrap();
    q.save_authorization(&auth(3, NOW, 200), None).unwrap();
    assert!(matches!(
        q.save_authorization(&auth(4, NOW, 1), Some((&[1; 32], &b"again"[..]))),
        Err(crate::StoreError::Conflict(_))
    ));
    assert_eq!(q.authorization(T.0, 4).unwrap(), None, "a refused message leaves no authorization");
    assert_eq!(q.card_message(&[1; 32]).unwrap().as_deref(), Some(&b"answer 1"[..]));
    assert_eq!(q.card_message(&[9; 32]).unwrap(), None);
    // A capture rewrites the authorization in place.
    q.save_authorization(&auth(2, day + 1, 250), Some((&[3; 32], &b"captured"[..]))).unwrap();
    assert_eq!(q.authorization(T.0, 2).unwrap().unwrap().spend, 250);
    assert_eq!(q.authorization(OTHER.0, 2).unwrap(), None);
    assert_eq!(q.authorization_by_rrn(10, "rrn2").unwrap().unwrap().id, 2);
    assert_eq!(q.authorization_by_rrn(11, "rrn2").unwrap(), None);
    let listed: Vec<u128> = q.card_authorizations(T.0, 10, 10).unwrap().iter().map(|a| a.id).collect();
    assert_eq!(listed, vec![3, 2, 1], "newest first");
    assert_eq!(q.card_authorizations(OTHER.0, 10, 10).unwrap(), vec![]);
    assert_eq!(q.card_spent(10, day, day - DAY, NOW, NOW).unwrap(), (450, 950, 1));
    assert_eq!(q.card_spent(10, day, day, NOW + 1, NOW + 1).unwrap(), (450, 450, 0));
    // A reversal takes the spend back off the authorization's own day.
    q.save_authorization(&auth(1, day - 1, 0), None).unwrap();
    assert_eq!(q.card_spent(10, day, day - DAY, day, NOW).unwrap(), (450, 450, 2));
    // A hold counts until it lapses, then no more: yesterday's 500, lapsing at NOW + 10.
    let held = crate::AuthorizationRow { held_until: NOW + 10, ..auth(1, day - 1, 500) };
    q.save_authorization(&held, None).unwrap();
    assert_eq!(q.authorization(T.0, 1).unwrap().unwrap().held_until, NOW + 10);
    assert_eq!(q.card_spent(10, day, day - DAY, day, NOW + 9).unwrap(), (450, 950, 2));
    assert_eq!(q.card_spent(10, day, day - DAY, day, NOW + 10).unwrap(), (450, 450, 2), "lapsed");
    // Today's 300 lapsing too: off the day's spend and the month's.
    let today = crate::AuthorizationRow { held_until: NOW + 20, ..auth(2, day + 1, 250) };
    q.save_authorization(&today, None).unwrap();
    assert_eq!(q.card_spent(10, day, day - DAY, day, NOW + 20).unwrap(), (200, 200, 2));
    // Captured after it lapsed (posted on its own): it counts again.
    q.save_authorization(&auth(2, day + 1, 250), None).unwrap();
    assert_eq!(q.card_spent(10, day, day - DAY, day, NOW + 20).unwrap(), (450, 450, 2));
    // A month that began after the hold was made subtracts nothing for it.
    assert_eq!(q.card_spent(10, day, day, day, NOW + 20).unwrap(), (450, 450, 2));
    store.close();
}

/// Documents (one table for every kind of domain record) and counters, through the queries and
/// through the writer's batch.
/// Requests guarded by a document's version apply only while it is at that version, whichever
/// node wrote it; a refused one leaves no trace.
pub fn guarded_requests(location: Location) {
    let (store, _) = open_fixed(&location);
    setup(&store);
    let q = store.queries.as_ref();
    let charge = |version: u64| crate::Document {
        kind: "pix-cob".into(),
        tenant_id: T.0,
        id: "charge".into(),
        lookup: None,
        owner: None,
        created_at: NOW,
        version,
        body: format!("{{\"v\":{version}}}"),
    };
    q.insert_document(&charge(1)).unwrap();
    let guard =
        |version: u64| crate::Guard::Document { kind: "pix-cob".into(), tenant_id: T.0, id: "charge".into(), version };
    // A transfer of `amount` (Alice to Bob) with the records made from its reply, applied only if
    // `guards` hold; its answer comes on the receiver.
    let guarded = |id: u128, amount: u64, records: crate::RecordsFn, guards: Vec<crate::Guard>| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let command = crate::Command::Transfers(vec![posted(id, ALICE, BOB, amount)]);
        store.engine.submit_guarded(command, None, Some(records), guards, Box::new(move |r| drop(tx.send(r)))).unwrap();
        rx
    };
    let submit = |id: u128, guards: Vec<crate::Guard>| {
        let next = guards.first().and_then(|g| match g {
            crate::Guard::Document { id, version, .. } => {
                Some(crate::Document { id: id.clone(), ..charge(version + 1) })
            }
            crate::Guard::CounterAtMost { .. } | crate::Guard::Authorization { .. } => None,
        });
        let records: crate::RecordsFn = Box::new(move |_| next.iter().cloned().map(crate::Record::Document).collect());
        guarded(id, 100, records, guards)
    };
    let ok = |r: crate::Result<crate::Reply>| r.map(|r| r.chain_result());
    assert_eq!(ok(submit(200, vec![guard(1)]).recv().unwrap()), Ok(TransferResult::Created));
    assert_eq!(q.document("pix-cob", T.0, "charge").unwrap().unwrap().version, 2);
    // Stale: nothing applied, neither the transfer nor its records.
    let stale = submit(201, vec![guard(1)]).recv().unwrap();
    assert!(matches!(stale, Err(crate::StoreError::Conflict(_))), "{stale:?}");
    assert_eq!(q.entry(TransferKey { tenant: T, id: TransferId(201) }).unwrap(), None);
    assert_eq!(balances(&store, BOB), (0, 100, 0, 0));
    // Two at once on one version, in one batch or two: exactly one applies.
    let (a, b) = (submit(202, vec![guard(2)]), submit(203, vec![guard(2)]));
    let results = [a.recv().unwrap(), b.recv().unwrap()];
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert_eq!(balances(&store, BOB), (0, 200, 0, 0));
    // Version 0: the document must not exist.
    let absent = crate::Guard::Document { kind: "pix-cob".into(), tenant_id: T.0, id: "none".into(), version: 0 };
    assert!(submit(204, vec![absent]).recv().unwrap().is_ok());
    assert!(matches!(submit(205, vec![guard(0)]).recv().unwrap(), Err(crate::StoreError::Conflict(_))));

    // A counter limit: each request adds 40 to the counter if, under the lock, the total is at
    // most 100 - 40 (a limit of 100). Absent, it counts 0.
    let spend = |id: u128, period: u64| {
        let records: crate::RecordsFn =
            Box::new(move |_| vec![crate::Record::Count { scope: "spend".into(), period, delta: 40 }]);
        guarded(id, 1, records, vec![crate::Guard::CounterAtMost { scope: "spend".into(), period, max: 60 }])
    };
    assert!(spend(300, 7).recv().unwrap().is_ok(), "0 + 40 fits");
    assert!(spend(301, 7).recv().unwrap().is_ok(), "40 + 40 fits");
    let over = spend(302, 7).recv().unwrap();
    assert!(matches!(over, Err(crate::StoreError::Conflict(_))), "80 + 40 does not: {over:?}");
    assert_eq!(q.counter_total("spend", 7, 8).unwrap(), 80);
    assert_eq!(q.entry(TransferKey { tenant: T, id: TransferId(302) }).unwrap(), None);
    // Many at once (one batch or several): the limit holds, and as many as fit apply.
    let waits: Vec<_> = (0..6u128).map(|id| spend(400 + id, 8)).collect();
    let applied = waits.into_iter().filter(|rx| rx.recv().unwrap().is_ok()).count();
    assert!((1..=2).contains(&applied), "{applied} applied: 40 each under a limit of 100");
    assert_eq!(q.counter_total("spend", 8, 9).unwrap(), 40 * applied as i64);

    // A card authorization as read: absent, then at the body a step left.
    let step_at_once = |transfer: u128, body: &str, guard: crate::Guard| {
        let row = crate::AuthorizationRow {
            tenant_id: T.0,
            id: 77,
            card_id: 10,
            rrn: "rrn".into(),
            created_at: NOW,
            spend: 5,
            held_until: 0,
            body: body.to_owned(),
        };
        let records: crate::RecordsFn =
            Box::new(move |_| vec![crate::Record::Authorization { row: row.clone(), message: None }]);
        guarded(transfer, 1, records, vec![guard])
    };
    let step = |transfer: u128, body: &str, guard: crate::Guard| step_at_once(transfer, body, guard).recv().unwrap();
    let read = |body: Option<&str>| crate::Guard::Authorization { tenant_id: T.0, id: 77, body: body.map(Into::into) };
    assert!(step(500, "approved", read(None)).is_ok());
    assert_eq!(q.authorization(T.0, 77).unwrap().unwrap().body, "approved");
    let twin = step(501, "approved again", read(None));
    assert!(matches!(twin, Err(crate::StoreError::Conflict(_))), "it exists now: {twin:?}");
    assert!(step(502, "captured", read(Some("approved"))).is_ok());
    let stale = step(503, "reversed", read(Some("approved")));
    assert!(matches!(stale, Err(crate::StoreError::Conflict(_))), "decided on a stale record: {stale:?}");
    assert_eq!(q.authorization(T.0, 77).unwrap().unwrap().body, "captured", "the stale step wrote nothing");
    assert_eq!(q.entry(TransferKey { tenant: T, id: TransferId(503) }).unwrap(), None);
    assert!(step(504, "reversed", read(Some("captured"))).is_ok());
    // Two steps at once on one record as read, in one batch or two: exactly one applies.
    let (a, b) = (step_at_once(505, "x", read(Some("reversed"))), step_at_once(506, "y", read(Some("reversed"))));
    let results = [a.recv().unwrap(), b.recv().unwrap()];
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert_verified(&store);
}

pub fn documents(location: Location) {
    let (store, _) = open_fixed(&location);
    let q = store.queries.as_ref();
    let doc = |tenant: u128, id: &str, lookup: Option<&str>, owner: Option<&str>, at: u64| crate::Document {
        kind: "pix-key".into(),
        tenant_id: tenant,
        id: id.into(),
        lookup: lookup.map(Into::into),
        owner: owner.map(Into::into),
        created_at: at,
        version: 1,
        body: format!("{{\"id\":\"{id}\"}}"),
    };
    let conflict = |r: crate::Result<()>| matches!(r, Err(crate::StoreError::Conflict(_)));
    q.insert_document(&doc(T.0, "a", Some("L1"), Some("acct1"), NOW)).unwrap();
    q.insert_document(&doc(T.0, "b", Some("L2"), Some("acct1"), NOW)).unwrap();
    q.insert_document(&doc(T.0, "c", None, Some("acct2"), NOW + 5)).unwrap();
    q.insert_document(&doc(T.0, "d", None, None, NOW + 10)).unwrap();
    q.insert_document(&doc(OTHER.0, "a", None, Some("acct1"), NOW)).unwrap();
    assert!(conflict(q.insert_document(&doc(T.0, "a", None, None, NOW))), "ids are unique per tenant");
    assert!(conflict(q.insert_document(&doc(OTHER.0, "z", Some("L1"), None, NOW))), "lookups across tenants");
    let other_kind = crate::Document { kind: "pix-payment".into(), ..doc(OTHER.0, "z", Some("L1"), None, NOW) };
    q.insert_document(&other_kind).unwrap();
    // Compare and set from nothing: the first put from version 0 inserts, a second one loses, and
    // so does a put from a version no longer stored.
    let put = |version: u64, body: &str| crate::Document {
        kind: "pix-limits".into(),
        version,
        body: body.into(),
        ..doc(T.0, "p", None, None, NOW)
    };
    assert!(q.put_document(&put(1, "first"), 0).unwrap());
    assert!(!q.put_document(&put(1, "twin"), 0).unwrap(), "another put from nothing came first");
    assert!(q.put_document(&put(2, "second"), 1).unwrap());
    assert!(!q.put_document(&put(2, "stale"), 1).unwrap(), "version 1 is gone");
    assert_eq!(q.document("pix-limits", T.0, "p").unwrap().map(|d| (d.version, d.body)), Some((2, "second".into())));

    assert_eq!(q.document("pix-key", T.0, "a").unwrap(), Some(doc(T.0, "a", Some("L1"), Some("acct1"), NOW)));
    assert_eq!(q.document("pix-payment", T.0, "a").unwrap(), None);
    assert_eq!(q.document_by_lookup("pix-key", "L2").unwrap().unwrap().id, "b");
    assert_eq!(q.document_by_lookup("pix-payment", "L1").unwrap().unwrap().tenant_id, OTHER.0);
    assert_eq!(q.document_by_lookup("pix-key", "nope").unwrap(), None);
    assert_eq!(q.count_documents("pix-key", "acct1").unwrap(), 3, "owners count across tenants");
    let owned: Vec<(u128, String)> =
        q.documents_by_owner("pix-key", "acct1", None, 10).unwrap().into_iter().map(|d| (d.tenant_id, d.id)).collect();
    assert_eq!(owned.len(), 3, "across tenants: {owned:?}");
    assert!(owned.contains(&(OTHER.0, "a".into())) && owned.contains(&(T.0, "b".into())), "{owned:?}");
    assert_eq!(q.documents_by_owner("pix-key", "acct1", None, 2).unwrap().len(), 2, "at most the limit");
    assert!(q.documents_by_owner("pix-key", "nobody", None, 10).unwrap().is_empty());
    // Read a page at a time, each after the last one's last document: the same documents in the
    // same order, none twice, none left out, though two tenants' "a" were made at the same time.
    let mut paged = Vec::new();
    let mut after: Option<crate::OwnerCursor> = None;
    loop {
        let page = q.documents_by_owner("pix-key", "acct1", after.as_ref(), 1).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(crate::OwnerCursor::of(last));
        paged.extend(page.into_iter().map(|d| (d.tenant_id, d.id)));
        assert!(paged.len() <= 3, "{paged:?}");
    }
    assert_eq!(paged, owned);
    // A reader goes on after a full page's last document, and from the start after a short one.
    let page = q.documents_by_owner("pix-key", "acct1", None, 2).unwrap();
    assert_eq!(crate::OwnerCursor::next(&page, 2), Some(crate::OwnerCursor::of(&page[1])), "after a full page");
    assert_eq!(crate::OwnerCursor::next(&page, 3), None, "a short page was the last");
    assert_eq!(crate::OwnerCursor::next(&[], 2), None);
    // Inserting within a count per owner (across tenants), in a kind of its own.
    let counted = |tenant: u128, id: &str, lookup: Option<&str>, owner: &str| crate::Document {
        kind: "counted".into(),
        ..doc(tenant, id, lookup, Some(owner), NOW)
    };
    assert!(q.insert_document_within(&counted(T.0, "a", None, "o1"), 2).unwrap(), "0 of 2");
    assert!(q.insert_document_within(&counted(OTHER.0, "a", None, "o1"), 2).unwrap(), "1 of 2");
    assert!(!q.insert_document_within(&counted(T.0, "b", None, "o1"), 2).unwrap(), "2 of 2");
    assert_eq!(q.document("counted", T.0, "b").unwrap(), None, "refused: not inserted");
    assert!(q.insert_document_within(&counted(T.0, "b", None, "o1"), 3).unwrap(), "2 of 3");
    assert_eq!(q.count_documents("counted", "o1").unwrap(), 3);
    let still = q.insert_document_within(&counted(T.0, "c", Some("L1"), "o2"), 5);
    assert!(still.unwrap(), "another kind's lookup does not collide");
    let again = q.insert_document_within(&counted(T.0, "d", Some("L1"), "o2"), 5);
    assert!(matches!(again, Err(crate::StoreError::Conflict(_))), "lookups still unique per kind: {again:?}");
    assert_eq!(q.count_documents("counted", "o2").unwrap(), 1);
    // Many at once, each on a connection of its own: never more than the limit.
    let inserted = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..8)
            .map(|i| s.spawn(move || q.insert_document_within(&counted(T.0, &format!("w{i}"), None, "o3"), 5)))
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap().unwrap()).filter(|inserted| *inserted).count()
    });
    assert_eq!(inserted, 5, "five of eight fit");
    assert_eq!(q.count_documents("counted", "o3").unwrap(), 5);

    // Compare and set on the version.
    let changed = crate::Document { version: 2, body: "{}".into(), ..doc(T.0, "a", Some("L9"), Some("acct1"), NOW) };
    assert!(!q.update_document(&changed, 7).unwrap());
    assert!(q.update_document(&changed, 1).unwrap());
    assert!(!q.update_document(&changed, 1).unwrap(), "the second writer loses");
    assert_eq!(q.document_by_lookup("pix-key", "L9").unwrap(), Some(changed.clone()));
    assert_eq!(q.document_by_lookup("pix-key", "L1").unwrap(), None);
    let taken = crate::Document { version: 2, lookup: Some("L2".into()), ..doc(T.0, "c", None, None, NOW) };
    assert!(matches!(q.update_document(&taken, 1), Err(crate::StoreError::Conflict(_))));

    // Listings: one tenant and kind, a time range, oldest first, by cursor.
    let page = |owner: Option<&str>, after: Option<(u64, String)>, limit: usize| {
        q.documents(&crate::DocumentQuery {
            kind: "pix-key",
            tenant_id: T.0,
            owner,
            from: NOW,
            to: NOW + 11,
            after,
            limit,
        })
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect::<Vec<_>>()
    };
    assert_eq!(page(None, None, 10), ["a", "b", "c", "d"]);
    assert_eq!(page(Some("acct1"), None, 10), ["a", "b"]);
    assert_eq!(page(None, None, 2), ["a", "b"]);
    assert_eq!(page(None, Some((NOW, "b".into())), 2), ["c", "d"]);
    assert_eq!(page(None, Some((NOW, "a".into())), 10), ["b", "c", "d"]);
    let narrow = q
        .documents(&crate::DocumentQuery {
            kind: "pix-key",
            tenant_id: T.0,
            owner: None,
            from: NOW + 1,
            to: NOW + 10,
            after: None,
            limit: 10,
        })
        .unwrap();
    assert_eq!(narrow.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["c"], "[from, to)");

    assert!(q.delete_document("pix-key", T.0, "d").unwrap());
    assert!(!q.delete_document("pix-key", T.0, "d").unwrap());
    assert!(!q.delete_document("pix-key", OTHER.0, "b").unwrap(), "tenants are walls");

    // The writer: a document and counters committed with a batch.
    let written = crate::Document { kind: "pix-payment".into(), ..doc(T.0, "p1", Some("E1"), Some("h1"), NOW) };
    let records = vec![
        crate::Record::Document(written.clone()),
        crate::Record::Count { scope: "spend:h1".into(), period: 7, delta: 500 },
        crate::Record::Count { scope: "spend:h1".into(), period: 7, delta: -200 },
        crate::Record::Count { scope: "spend:h1".into(), period: 8, delta: 50 },
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .engine
        .submit_with(
            crate::Command::Audit(vec![]),
            None,
            Some(Box::new(move |_| records.clone())),
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        )
        .unwrap();
    assert!(rx.recv().unwrap());
    assert_eq!(q.document("pix-payment", T.0, "p1").unwrap(), Some(written.clone()));
    let replaced = crate::Document { version: 2, body: "{\"status\":\"done\"}".into(), ..written };
    let again = vec![crate::Record::Document(replaced.clone())];
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .engine
        .submit_with(
            crate::Command::Audit(vec![]),
            None,
            Some(Box::new(move |_| again.clone())),
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        )
        .unwrap();
    assert!(rx.recv().unwrap());
    assert_eq!(q.document("pix-payment", T.0, "p1").unwrap(), Some(replaced));
    assert_eq!(q.counter_total("spend:h1", 7, 8).unwrap(), 300);
    assert_eq!(q.counter_total("spend:h1", 0, 100).unwrap(), 350);
    assert_eq!(q.counter_total("spend:h2", 0, 100).unwrap(), 0);
    store.close();
}

/// Instantiates the suite for one engine. `$factory` is an expression giving a fresh, empty
/// [`Location`] on each call.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        #[test]
        fn accounts_round_trip() {
            $crate::conformance::accounts_round_trip($factory)
        }
        #[test]
        fn transfers_round_trip() {
            $crate::conformance::transfers_round_trip($factory)
        }
        #[test]
        fn durable_across_restart() {
            $crate::conformance::durable_across_restart($factory)
        }
        #[test]
        fn holds_expire() {
            $crate::conformance::holds_expire($factory)
        }
        #[test]
        fn an_expired_hold_blocks_nothing() {
            $crate::conformance::an_expired_hold_blocks_nothing($factory)
        }
        #[test]
        fn a_backlog_of_due_holds_blocks_nothing() {
            $crate::conformance::a_backlog_of_due_holds_blocks_nothing($factory)
        }
        #[test]
        fn listing_is_stable_under_inserts() {
            $crate::conformance::listing_is_stable_under_inserts($factory)
        }
        #[test]
        fn tenants_and_keys() {
            $crate::conformance::tenants_and_keys($factory)
        }
        #[test]
        fn vault_records() {
            $crate::conformance::vault_records($factory)
        }
        #[test]
        fn card_records() {
            $crate::conformance::card_records($factory)
        }
        #[test]
        fn guarded_requests() {
            $crate::conformance::guarded_requests($factory)
        }
        #[test]
        fn documents() {
            $crate::conformance::documents($factory)
        }
        #[test]
        fn audit_log() {
            $crate::conformance::audit_log($factory)
        }
        #[test]
        fn audit_proofs_over_stored_and_hashed_subtrees() {
            $crate::conformance::audit_proofs_over_stored_and_hashed_subtrees($factory)
        }
        #[test]
        fn concurrent_writers() {
            $crate::conformance::concurrent_writers($factory)
        }
        #[test]
        fn agrees_with_memory_ledger() {
            $crate::conformance::agrees_with_memory_ledger($factory)
        }
    };
}
