//! Hand-written cases for the rules that matter most to a person reading a statement.

use ledger::*;

const T: TenantId = TenantId(7);
const NOW: u64 = 1_700_000_000_000_000_000;

fn brl() -> Currency {
    Currency::parse("BRL").unwrap()
}

fn open(l: &mut MemoryLedger, id: u128, flags: u16, limit: u64) {
    let new = NewAccount {
        key: AccountKey { tenant: T, id: AccountId(id) },
        currency: brl(),
        code: 1,
        flags: AccountFlags(flags),
        credit_limit: limit,
        metadata: None,
        holder: None,
    };
    let r = l.accounts(NOW, &[AccountCommand::Create(new)]);
    assert_eq!(r[0].0, AccountResult::Created);
}

fn ev(id: u128, kind: EventKind) -> TransferEvent {
    TransferEvent { key: TransferKey { tenant: T, id: TransferId(id) }, kind, code: 0, metadata: None, linked: false }
}

fn posted(id: u128, d: u128, c: u128, amount: u64) -> TransferEvent {
    ev(id, EventKind::Posted { debit: AccountId(d), credit: AccountId(c), amount })
}

/// A hold of `amount` from Alice to Bob.
fn hold(id: u128, amount: u64, timeout_seconds: u32) -> TransferEvent {
    ev(id, EventKind::Pending { debit: AccountId(ALICE), credit: AccountId(BOB), amount, timeout_seconds })
}

fn balance(l: &MemoryLedger, id: u128) -> (u64, u64, u64, u64, i128) {
    let a = &l.accounts[&AccountKey { tenant: T, id: AccountId(id) }];
    (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending, a.available())
}

const BANK: u128 = 1;
const ALICE: u128 = 2;
const BOB: u128 = 3;

fn setup() -> MemoryLedger {
    let mut l = MemoryLedger::new();
    open(&mut l, BANK, 0, 0);
    open(&mut l, ALICE, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS, 0);
    open(&mut l, BOB, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS, 0);
    assert_eq!(l.transfers(NOW, &[posted(100, BANK, ALICE, 1000)])[0].result, TransferResult::Created);
    l
}

#[test]
fn spending_exactly_the_balance_is_allowed_one_more_is_not() {
    let mut l = setup();
    assert_eq!(l.transfers(NOW, &[posted(1, ALICE, BOB, 1001)])[0].result, TransferResult::InsufficientFunds);
    assert_eq!(l.transfers(NOW, &[posted(2, ALICE, BOB, 1000)])[0].result, TransferResult::Created);
    assert_eq!(balance(&l, ALICE), (1000, 1000, 0, 0, 0));
}

#[test]
fn a_failure_that_depended_on_state_stays_failed() {
    let mut l = setup();
    let big = posted(1, ALICE, BOB, 5000);
    assert_eq!(l.transfers(NOW, std::slice::from_ref(&big))[0].result, TransferResult::InsufficientFunds);
    l.transfers(NOW, &[posted(2, BANK, ALICE, 10_000)]);
    // Alice now has the money, but the same request under the same id keeps its first outcome.
    assert_eq!(l.transfers(NOW, &[big])[0].result, TransferResult::InsufficientFunds);
    assert_eq!(l.transfers(NOW, &[posted(1, ALICE, BOB, 4000)])[0].result, TransferResult::IdAlreadyFailed);
    assert_eq!(balance(&l, BOB), (0, 0, 0, 0, 0));
}

#[test]
fn repeats_return_the_first_outcome_and_different_bodies_are_refused() {
    let mut l = setup();
    let first = l.transfers(NOW, &[posted(1, ALICE, BOB, 10)]);
    let again = l.transfers(NOW + 5, &[posted(1, ALICE, BOB, 10)]);
    assert_eq!(again[0].result, TransferResult::Exists);
    assert_eq!(again[0].transfer, first[0].transfer);
    assert_eq!(l.transfers(NOW, &[posted(1, ALICE, BOB, 11)])[0].result, TransferResult::ExistsWithDifferentFields);
    assert_eq!(balance(&l, BOB), (0, 10, 0, 0, 10));
}

#[test]
fn partial_post_releases_the_rest_and_a_second_post_is_refused() {
    let mut l = setup();
    let hold = hold(1, 600, 0);
    assert_eq!(l.transfers(NOW, &[hold])[0].result, TransferResult::Created);
    assert_eq!(balance(&l, ALICE), (0, 1000, 600, 0, 400));
    let too_much = ev(2, EventKind::PostPending { pending_id: TransferId(1), amount: Some(601) });
    assert_eq!(l.transfers(NOW, &[too_much])[0].result, TransferResult::ExceedsPendingTransferAmount);
    let post = ev(3, EventKind::PostPending { pending_id: TransferId(1), amount: Some(250) });
    assert_eq!(l.transfers(NOW, &[post])[0].result, TransferResult::Created);
    assert_eq!(balance(&l, ALICE), (250, 1000, 0, 0, 750));
    assert_eq!(balance(&l, BOB), (0, 250, 0, 0, 250));
    let void = ev(4, EventKind::VoidPending { pending_id: TransferId(1) });
    assert_eq!(l.transfers(NOW, &[void])[0].result, TransferResult::PendingTransferAlreadyPosted);
}

#[test]
fn a_hold_expires_exactly_at_its_timeout() {
    let mut l = setup();
    let hold = hold(1, 600, 2);
    let created = l.transfers(NOW, &[hold]);
    let expires_at = created[0].transfer.as_ref().unwrap().expires_at.unwrap();
    assert_eq!(l.expire(expires_at - 1), 0);
    let post = ev(2, EventKind::PostPending { pending_id: TransferId(1), amount: None });
    assert_eq!(l.transfers(expires_at, &[post])[0].result, TransferResult::PendingTransferExpired);
    assert_eq!(l.expire(expires_at), 1);
    assert_eq!(balance(&l, ALICE), (0, 1000, 0, 0, 1000));
    let void = ev(3, EventKind::VoidPending { pending_id: TransferId(1) });
    assert_eq!(l.transfers(expires_at, &[void])[0].result, TransferResult::PendingTransferExpired);
}

/// After the wall clock went back, the ledger's clock runs ahead of it: a hold whose expiry lies
/// between the two is expired for a post, whose timestamp would come after it, and so for the
/// sweep too, at the same wall clock (it waited for the wall clock to catch up, and meanwhile the
/// hold could be neither resolved nor released).
#[test]
fn a_hold_expires_by_the_ledgers_clock_when_the_wall_clock_went_back() {
    let mut l = setup();
    let hold = hold(1, 600, 2);
    let expires_at = l.transfers(NOW, &[hold])[0].transfer.as_ref().unwrap().expires_at.unwrap();
    // Something happens at the expiry's instant, then the wall clock steps back a second.
    assert_eq!(l.transfers(expires_at, &[posted(2, BANK, ALICE, 1)])[0].result, TransferResult::Created);
    let post = ev(3, EventKind::PostPending { pending_id: TransferId(1), amount: None });
    let out = l.transfers(expires_at - 1_000_000_000, &[post]);
    assert_eq!(out[0].result, TransferResult::PendingTransferExpired);
    assert_eq!(balance(&l, BOB), (0, 0, 0, 600, 0), "still held until the sweep, never posted");
    assert_eq!(l.expire(expires_at - 1_000_000_000), 1, "the sweep judges it expired at the same time");
    assert_eq!(balance(&l, BOB), (0, 0, 0, 0, 0), "released");
}

#[test]
fn a_linked_chain_applies_whole_or_not_at_all() {
    let mut l = setup();
    let mut a = posted(1, ALICE, BOB, 700);
    a.linked = true;
    let b = posted(2, ALICE, BOB, 700);
    let out = l.transfers(NOW, &[a.clone(), b.clone()]);
    assert_eq!(out[0].result, TransferResult::LinkedEventFailed);
    assert_eq!(out[1].result, TransferResult::InsufficientFunds);
    assert_eq!(balance(&l, ALICE), (0, 1000, 0, 0, 1000));
    // The retry gets the same answers, even though each alone would now succeed.
    let again = l.transfers(NOW, &[a, b]);
    assert_eq!(
        again.iter().map(|o| o.result).collect::<Vec<_>>(),
        [TransferResult::LinkedEventFailed, TransferResult::InsufficientFunds]
    );
}

#[test]
fn a_chain_sent_again_answers_exists_for_what_it_made_and_creates_only_what_is_new() {
    let mut l = setup();
    let chain = |events: &[TransferEvent]| -> Vec<TransferEvent> {
        let mut events = events.to_vec();
        let last = events.len() - 1;
        for e in &mut events[..last] {
            e.linked = true;
        }
        events
    };
    let results = |out: Vec<Outcome>| out.iter().map(|o| o.result).collect::<Vec<_>>();
    let first = chain(&[posted(1, ALICE, BOB, 100), posted(2, BOB, ALICE, 40)]);
    assert_eq!(results(l.transfers(NOW, &first)), [TransferResult::Created, TransferResult::Created]);
    // The whole chain again: each event exists, and nothing moves twice.
    assert_eq!(results(l.transfers(NOW, &first)), [TransferResult::Exists, TransferResult::Exists]);
    assert_eq!(balance(&l, BOB), (40, 100, 0, 0, 60));
    // A chain naming an earlier transfer and a new one, and the new one twice.
    let mixed = chain(&[posted(1, ALICE, BOB, 100), posted(3, ALICE, BOB, 5), posted(3, ALICE, BOB, 5)]);
    assert_eq!(
        results(l.transfers(NOW, &mixed)),
        [TransferResult::Exists, TransferResult::Created, TransferResult::Exists]
    );
    assert_eq!(balance(&l, BOB), (40, 105, 0, 0, 65));
}

#[test]
fn timestamps_are_unique_and_increasing_even_when_the_clock_stands_still_or_goes_back() {
    let mut l = setup();
    let a = l.transfers(NOW, &[posted(1, BANK, BOB, 1), posted(2, BANK, BOB, 1)]);
    let b = l.transfers(NOW - 1_000_000, &[posted(3, BANK, BOB, 1)]);
    let ts: Vec<u64> = a.iter().chain(&b).map(|o| o.transfer.as_ref().unwrap().timestamp).collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "{ts:?}");
}

#[test]
fn closed_accounts_take_no_new_transfers_but_holds_can_still_be_voided() {
    let mut l = setup();
    let hold = hold(1, 10, 0);
    l.transfers(NOW, &[hold]);
    let closed = l.accounts(NOW, &[AccountCommand::Close(AccountKey { tenant: T, id: AccountId(ALICE) })]);
    assert_eq!(closed[0].0, AccountResult::Closed);
    assert_eq!(l.transfers(NOW, &[posted(2, ALICE, BOB, 1)])[0].result, TransferResult::DebitAccountClosed);
    assert_eq!(l.transfers(NOW, &[posted(3, BOB, ALICE, 1)])[0].result, TransferResult::CreditAccountClosed);
    let void = ev(4, EventKind::VoidPending { pending_id: TransferId(1) });
    assert_eq!(l.transfers(NOW, &[void])[0].result, TransferResult::Created);
}

/// Creating an account again: a request for it closed does not match it open (409), while the
/// request that created it open still matches it after it was closed (a retry reads `exists`).
#[test]
fn a_request_to_create_an_account_closed_does_not_match_it_open() {
    let mut l = setup();
    let new = |flags: u16| NewAccount {
        key: AccountKey { tenant: T, id: AccountId(9) },
        currency: brl(),
        code: 1,
        flags: AccountFlags(flags),
        credit_limit: 0,
        metadata: None,
        holder: None,
    };
    let create = |l: &mut MemoryLedger, flags: u16| l.accounts(NOW, &[AccountCommand::Create(new(flags))])[0].0;
    assert_eq!(create(&mut l, 0), AccountResult::Created);
    assert_eq!(create(&mut l, AccountFlags::CLOSED), AccountResult::ExistsWithDifferentFields);
    assert!(!l.accounts[&new(0).key].flags.closed(), "nothing closed");
    assert_eq!(l.accounts(NOW, &[AccountCommand::Close(new(0).key)])[0].0, AccountResult::Closed);
    assert_eq!(create(&mut l, 0), AccountResult::Exists);
    assert_eq!(create(&mut l, AccountFlags::CLOSED), AccountResult::Exists);
}

#[test]
fn another_tenants_accounts_do_not_exist() {
    let mut l = setup();
    let mut e = posted(1, ALICE, BOB, 1);
    e.key.tenant = TenantId(8);
    assert_eq!(l.transfers(NOW, &[e])[0].result, TransferResult::DebitAccountNotFound);
}

/// Every violation is counted, though only the first hundred are kept to be shown (`rtpay verify`
/// printed the hundred as the count).
#[test]
fn verify_counts_every_violation_and_keeps_the_first_hundred() {
    let l = setup();
    let mut v = verify::Verifier::new();
    let template = l.accounts.values().next().unwrap().clone();
    for n in 0..150u128 {
        // Accounts whose balances no transfer accounts for.
        let mut a = template.clone();
        a.key.id = AccountId(1_000 + n);
        a.debits_posted = 1;
        a.credits_posted = 0;
        a.debits_pending = 0;
        a.credits_pending = 0;
        v.account(&a);
    }
    let report = v.finish();
    assert_eq!(report.violations.len(), 100);
    assert!(report.violations_found >= 150, "{}", report.violations_found);
}

/// A post that moved a hold's money to another account, its balances made to agree, still breaks
/// an invariant: a post or void names the hold's accounts and currency, and comes after it.
#[test]
fn verify_catches_a_post_between_other_accounts_than_its_hold() {
    let mut l = setup();
    let hold = hold(1, 300, 0);
    let post = ev(2, EventKind::PostPending { pending_id: TransferId(1), amount: None });
    assert!(l.transfers(NOW, &[hold, post]).iter().all(|o| o.result == TransferResult::Created));
    let report = |l: &MemoryLedger, edit: &dyn Fn(&mut Account), edit_post: &dyn Fn(&mut Transfer)| {
        let mut v = verify::Verifier::new();
        for a in l.accounts.values() {
            let mut a = a.clone();
            edit(&mut a);
            v.account(&a);
        }
        for (key, entry) in &l.transfers {
            match entry {
                Entry::Created(t) if key.id == TransferId(2) => {
                    let mut t = t.clone();
                    edit_post(&mut t);
                    v.entry(&Entry::Created(t));
                }
                e => v.entry(e),
            }
        }
        v.finish().violations
    };
    assert!(report(&l, &|_| {}, &|_| {}).is_empty());
    // The post credits the bank instead of Bob, and both balances say so.
    let moved = |a: &mut Account| match a.key.id.0 {
        BOB => a.credits_posted -= 300,
        BANK => a.credits_posted += 300,
        _ => {}
    };
    let violations = report(&l, &moved, &|t| t.credit_account_id = AccountId(BANK));
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].0.contains("other accounts"), "{violations:?}");
    let violations = report(&l, &|_| {}, &|t| t.timestamp -= 10);
    assert!(violations.iter().any(|v| v.0.contains("comes before the hold")), "{violations:?}");
}

/// A due hold that its accounts' pending balances do not cover (storage edited behind the ledger's
/// back) is left pending for `verify` to report, and the sweep goes on with the others: releasing
/// it would wrap a balance, and a panic would stop the process at every sweep. A post or void of
/// it is refused.
#[test]
fn a_hold_its_accounts_do_not_cover_is_left_for_verify() {
    let mut l = setup();
    assert!(l.transfers(NOW, &[hold(1, 100, 1)]).iter().all(|o| o.result == TransferResult::Created));
    let bob = AccountKey { tenant: T, id: AccountId(BOB) };
    l.accounts.get_mut(&bob).unwrap().credits_pending = 40;
    // Neither posted nor voided: refused, where it stopped the process (an assertion).
    for (id, kind) in [
        (2, EventKind::PostPending { pending_id: TransferId(1), amount: None }),
        (3, EventKind::VoidPending { pending_id: TransferId(1) }),
    ] {
        assert_eq!(l.transfers(NOW, &[ev(id, kind)])[0].result, TransferResult::PendingTransferInconsistent);
    }
    assert_eq!(l.expire(NOW + 2_000_000_000), 0);
    assert!(matches!(
        &l.transfers[&TransferKey { tenant: T, id: TransferId(1) }],
        Entry::Created(t) if t.state == PendingState::Pending
    ));
    assert_eq!(balance(&l, ALICE), (0, 1000, 100, 0, 900));
    // Not remembered under their ids: repaired, the same post goes through.
    l.accounts.get_mut(&bob).unwrap().credits_pending = 100;
    let post = ev(2, EventKind::PostPending { pending_id: TransferId(1), amount: Some(30) });
    assert_eq!(l.transfers(NOW, &[post])[0].result, TransferResult::Created);
    assert_eq!(balance(&l, ALICE), (30, 1000, 0, 0, 970));
}

/// A due hold its accounts' pending balances cover again (storage repaired) is released.
#[test]
fn a_hold_covered_again_is_released() {
    let mut l = setup();
    assert!(l.transfers(NOW, &[hold(1, 100, 1)]).iter().all(|o| o.result == TransferResult::Created));
    let bob = AccountKey { tenant: T, id: AccountId(BOB) };
    l.accounts.get_mut(&bob).unwrap().credits_pending = 40;
    assert_eq!(l.expire(NOW + 2_000_000_000), 0);
    l.accounts.get_mut(&bob).unwrap().credits_pending = 100;
    assert_eq!(l.expire(NOW + 2_000_000_000), 1, "covered again, it is released");
    assert_eq!(balance(&l, ALICE), (0, 1000, 0, 0, 1000));
}

/// A chain failed by one event's request alone (a post naming pending id zero) is not remembered:
/// its other events stay free, and the chain corrected goes through.
#[test]
fn a_chain_failed_by_a_malformed_event_is_not_remembered() {
    let mut l = setup();
    let hold = hold(1, 300, 0);
    assert_eq!(l.transfers(NOW, &[hold])[0].result, TransferResult::Created);
    let mut first = posted(2, ALICE, BOB, 10);
    first.linked = true;
    let results = |l: &mut MemoryLedger, pending: u128| {
        let post = ev(3, EventKind::PostPending { pending_id: TransferId(pending), amount: None });
        l.transfers(NOW, &[first.clone(), post]).iter().map(|o| o.result).collect::<Vec<_>>()
    };
    assert_eq!(results(&mut l, 0), [TransferResult::LinkedEventFailed, TransferResult::PendingTransferNotFound]);
    assert!(!l.transfers.contains_key(&TransferKey { tenant: T, id: TransferId(2) }), "nothing remembered");
    assert_eq!(results(&mut l, 1), [TransferResult::Created, TransferResult::Created]);
    assert_eq!(balance(&l, ALICE), (310, 1000, 0, 0, 690));
}

/// A verifier fed `l`'s accounts and its transfers, each created one as `edit` leaves it (storage
/// edited behind the ledger's back).
fn fed_verifier(l: &MemoryLedger, edit: &dyn Fn(&mut Transfer)) -> verify::Verifier {
    let mut v = verify::Verifier::new();
    l.accounts.values().for_each(|a| v.account(a));
    for entry in l.transfers.values() {
        match entry {
            Entry::Created(t) => {
                let mut t = t.clone();
                edit(&mut t);
                v.entry(&Entry::Created(t));
            }
            e => v.entry(e),
        }
    }
    v
}

/// Storage edited so that every balance still agrees with its transfers, each edit breaking a
/// rule: a transfer in another currency than its accounts', a post after its hold expired, a
/// hold whose expiry is not its timestamp plus its timeout, an expired hold that had none.
#[test]
fn verify_catches_a_transfer_in_another_currency_and_a_post_after_expiry() {
    let mut l = setup();
    let hold = hold(1, 300, 1);
    let post = ev(2, EventKind::PostPending { pending_id: TransferId(1), amount: None });
    assert!(l.transfers(NOW, &[hold, post]).iter().all(|o| o.result == TransferResult::Created));
    let report = |edit: &dyn Fn(&mut Transfer)| fed_verifier(&l, edit).finish().violations;
    assert_eq!(report(&|_| {}), []);
    let one = |edit: &dyn Fn(&mut Transfer), expected: &str| {
        let violations = report(edit);
        assert!(violations.iter().any(|v| v.0.contains(expected)), "{expected}: {violations:?}");
    };
    let usd = Currency::parse("USD").unwrap();
    one(
        &|t| {
            if t.key.id == TransferId(100) {
                t.currency = usd;
            }
        },
        "in BRL: transfers in USD touch it",
    );
    let hold_at = match &l.transfers[&TransferKey { tenant: T, id: TransferId(1) }] {
        Entry::Created(t) => t.timestamp,
        e => panic!("{e:?}"),
    };
    one(
        &|t| {
            if t.key.id == TransferId(2) {
                t.timestamp = hold_at + 1_000_000_000;
            }
        },
        "after the hold expired",
    );
    one(
        &|t| {
            if t.key.id == TransferId(1) {
                t.expires_at = Some(hold_at + 5_000_000_000);
            }
        },
        "not its timestamp",
    );
    one(
        &|t| {
            if t.key.id == TransferId(1) {
                t.timeout_seconds = 0;
                t.expires_at = None;
                t.state = PendingState::Expired;
            }
        },
        "expired but has no timeout",
    );
}

#[test]
fn verify_catches_an_edited_balance() {
    let mut l = setup();
    l.transfers(NOW, &[posted(1, ALICE, BOB, 10)]);
    let mut v = verify::Verifier::new();
    for a in l.accounts.values() {
        let mut a = a.clone();
        if a.key.id == AccountId(BOB) {
            a.credits_posted += 1;
        }
        v.account(&a);
    }
    for t in l.transfers.values() {
        v.entry(t);
    }
    let report = v.finish();
    assert!(report.violations.len() >= 2, "{:?}", report.violations);
}

/// A stored clock behind the stored timestamps (a restore, an edit), a transfer whose state or
/// pending id does not fit its kind, and a hold stored twice are each reported.
#[test]
fn verify_catches_a_clock_behind_a_misfit_state_and_a_hold_stored_twice() {
    let mut l = setup();
    let outcomes = l.transfers(NOW, &[posted(1, ALICE, BOB, 10), hold(2, 5, 0)]);
    assert!(outcomes.iter().all(|o| o.result == TransferResult::Created), "{outcomes:?}");
    let report = |clock: u64, edit: &dyn Fn(&mut Transfer), twice: bool| {
        let mut v = fed_verifier(&l, edit);
        if twice {
            // The hold again, under a timestamp of its own, its balances counted twice too.
            let Some(Entry::Created(h)) =
                l.transfers.values().find(|e| matches!(e, Entry::Created(t) if t.key.id == TransferId(2)))
            else {
                panic!("the hold is stored")
            };
            let mut again = h.clone();
            again.timestamp = clock - 1;
            v.entry(&Entry::Created(again));
        }
        v.clock(clock);
        v.finish().violations
    };
    let latest = l.transfers.values().map(|e| e.timestamp()).max().unwrap();
    assert!(report(latest, &|_| {}, false).is_empty());
    let behind = report(latest - 1, &|_| {}, false);
    assert!(behind.len() == 1 && behind[0].0.contains("stored clock"), "{behind:?}");
    let misfit = report(
        latest,
        &|t| {
            if t.kind == TransferKind::Posted {
                t.state = PendingState::Pending
            }
        },
        false,
    );
    assert!(misfit.iter().any(|v| v.0.contains("a Posted with state Pending")), "{misfit:?}");
    let twice = report(latest + 10, &|_| {}, true);
    assert!(twice.iter().any(|v| v.0.contains("stored twice")), "{twice:?}");
}
