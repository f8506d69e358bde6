//! The conformance suite on the PostgreSQL engine, each case in a database of its own on the
//! server named by `RTPAY_TEST_POSTGRES_URL` (default: the local server on 127.0.0.1:5432).
//! `scripts/test` installs and starts that server where it is missing; if it is not reachable
//! these tests fail, they do not skip.

use store::Location;

fn fresh() -> Location {
    Location::Postgres(store::testing::fresh_postgres_database())
}

store::conformance_tests!(fresh());

const TENANT: ledger::TenantId = ledger::TenantId(9);

/// A BRL account of [`TENANT`].
fn account(id: u128, flags: u16) -> ledger::AccountCommand {
    use ledger::*;
    AccountCommand::Create(NewAccount {
        key: AccountKey { tenant: TENANT, id: AccountId(id) },
        currency: Currency::parse("BRL").unwrap(),
        code: 1,
        flags: AccountFlags(flags),
        credit_limit: 0,
        metadata: None,
        holder: None,
    })
}

fn posted(id: u128, debit: u128, credit: u128, amount: u64) -> ledger::TransferEvent {
    use ledger::*;
    TransferEvent {
        key: TransferKey { tenant: TENANT, id: TransferId(id) },
        kind: EventKind::Posted { debit: AccountId(debit), credit: AccountId(credit), amount },
        code: 1,
        metadata: None,
        linked: false,
    }
}

/// Records a migration this rtpay does not know, as a later rtpay's would be.
fn add_future_migration(client: &mut postgres::Client) {
    client
        .execute(
            "INSERT INTO schema_migrations (version, name, applied_at) \
             SELECT max(version) + 1, 'future', 0 FROM schema_migrations",
            &[],
        )
        .unwrap();
}

/// A database migrated by a later rtpay (a schema version this one does not know) is refused by
/// every way in: the writer, migrations, reads beside a server, and appends beside one.
#[test]
fn a_newer_schema_is_refused() {
    let url = store::testing::fresh_postgres_database();
    let location = Location::Postgres(url.clone());
    store::Store::open(&location).unwrap().close();
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    add_future_migration(&mut client);
    let refused = store::Store::open(&location).err().expect("the writer refuses");
    assert!(refused.to_string().contains("newer than this rtpay knows"), "{refused}");
    assert!(store::Store::migrate(&location).is_err());
    assert!(store::Store::open_queries(&location).is_err());
    let signer = std::sync::Arc::new(audit::Signer::from_pkcs8(&audit::Signer::generate_pkcs8().unwrap()).unwrap());
    assert!(store::Store::append_audit_beside(&location, signer, Vec::new()).is_err());
}

/// A node already serving when a newer rtpay migrates the database stops writing (503, nothing
/// applied) rather than write as its older version knew to; it writes again once the schema is
/// one it knows (here, the future migration's row removed).
#[test]
fn a_running_node_stops_writing_once_a_newer_rtpay_migrates() {
    use ledger::*;
    let url = store::testing::fresh_postgres_database();
    let location = Location::Postgres(url.clone());
    let node = store::Store::open(&location).unwrap();
    node.engine.accounts(vec![account(1, 0), account(2, 0)]).unwrap();
    assert_eq!(node.engine.transfers(vec![posted(10, 1, 2, 5)]).unwrap()[0].result, TransferResult::Created);
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    add_future_migration(&mut client);
    let refused = node.engine.transfers(vec![posted(11, 1, 2, 5)]).expect_err("the older node stops writing");
    assert!(matches!(refused, store::StoreError::Unavailable(_)), "{refused}");
    assert!(refused.to_string().contains("newer than this rtpay knows"), "{refused}");
    let count = |client: &mut postgres::Client| -> i64 {
        client.query_one("SELECT count(*) FROM transfers", &[]).unwrap().get(0)
    };
    assert_eq!(count(&mut client), 1, "nothing applied");
    client.execute("DELETE FROM schema_migrations WHERE name = 'future'", &[]).unwrap();
    assert_eq!(node.engine.transfers(vec![posted(11, 1, 2, 5)]).unwrap()[0].result, TransferResult::Created);
    assert_eq!(count(&mut client), 2);
    node.close();
}

/// The database's clock is read, and a node's clock set off from it shows by as much.
#[test]
fn a_nodes_clock_is_measured_against_the_databases() {
    let store = store::Store::open(&fresh()).unwrap();
    let queries = store.queries.clone();
    // This process and the test's PostgreSQL server read one machine's clock.
    let skew = store::clock_skew(queries.as_ref(), &store::now_nanos).unwrap().expect("PostgreSQL has a clock");
    assert!(skew.abs() < 500_000_000, "{skew} ns apart on one machine");
    let ahead = store::clock_skew(queries.as_ref(), &|| store::now_nanos() + 10_000_000_000).unwrap().unwrap();
    assert!((9_500_000_000..10_500_000_000).contains(&ahead), "{ahead} ns: a clock 10 s ahead");
    let behind = store::clock_skew(queries.as_ref(), &|| store::now_nanos() - 3_000_000_000).unwrap().unwrap();
    assert!((-3_500_000_000..-2_500_000_000).contains(&behind), "{behind} ns: a clock 3 s behind");
    store.close();
}

/// A fresh, migrated database whose connections default to repeatable read.
fn repeatable_read_database() -> Location {
    let url = store::testing::fresh_postgres_database();
    let location = Location::Postgres(url.clone());
    store::Store::migrate(&location).unwrap();
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let database: String = client.query_one("SELECT current_database()", &[]).unwrap().get(0);
    client
        .batch_execute(&format!("ALTER DATABASE \"{database}\" SET default_transaction_isolation = 'repeatable read'"))
        .unwrap();
    location
}

/// The count under a limit holds whatever the server's default isolation is: under repeatable
/// read, a snapshot taken before the lock was granted would miss the last holder's insert.
#[test]
fn counted_inserts_hold_under_a_repeatable_read_default() {
    let location = repeatable_read_database();
    let queries = store::Store::open_queries(&location).unwrap();
    let q = queries.as_ref();
    let inserted = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || {
                    let doc = store::Document {
                        kind: "counted".into(),
                        tenant_id: 1,
                        id: format!("d{i}"),
                        lookup: None,
                        owner: Some("owner".into()),
                        created_at: 1,
                        version: 1,
                        body: "{}".into(),
                    };
                    q.insert_document_within(&doc, 5).unwrap()
                })
            })
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).filter(|inserted| *inserted).count()
    });
    assert_eq!(inserted, 5);
    assert_eq!(q.count_documents("counted", "owner").unwrap(), 5);
}

/// Two writers (two nodes) on one database whose default isolation is repeatable read: every
/// batch still reads state after its lock, so concurrent transfers on the same accounts neither
/// fail nor overdraw.
#[test]
fn two_writers_under_a_repeatable_read_default() {
    use ledger::*;
    let location = repeatable_read_database();
    let (a, b) = (store::Store::open(&location).unwrap(), store::Store::open(&location).unwrap());
    let guarded = AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS;
    a.engine.accounts(vec![account(1, 0), account(2, guarded), account(3, guarded)]).unwrap();
    assert_eq!(a.engine.transfers(vec![posted(10, 1, 2, 500)]).unwrap()[0].result, TransferResult::Created);
    std::thread::scope(|s| {
        for (n, node) in [&a, &b].into_iter().enumerate() {
            for t in 0..2u128 {
                s.spawn(move || {
                    for i in 0..40u128 {
                        let id = 1_000 + (n as u128) * 1_000 + t * 100 + i;
                        let (d, c) = if i % 2 == 0 { (2, 3) } else { (3, 2) };
                        let out = node.engine.transfers(vec![posted(id, d, c, 30)]).unwrap();
                        assert!(
                            matches!(out[0].result, TransferResult::Created | TransferResult::InsufficientFunds),
                            "{:?}",
                            out[0].result
                        );
                    }
                });
            }
        }
    });
    let report = a.verify().unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    let balance = |id: u128| {
        let x = a.queries.account(AccountKey { tenant: TENANT, id: AccountId(id) }).unwrap().unwrap();
        x.credits_posted as i64 - x.debits_posted as i64
    };
    assert_eq!(balance(2) + balance(3), 500, "money moved only between the two wallets");
    assert!(balance(2) >= 0 && balance(3) >= 0);
}

/// A hold another node let expire stays released: the node that made it, busy meanwhile, does not
/// write its own copy of the accounts back (a sweep that only expires holds takes no timestamp,
/// so the ledger clock could not tell the copy was old).
#[test]
fn a_hold_another_node_expired_stays_released() {
    use ledger::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    let location = Location::Postgres(store::testing::fresh_postgres_database());
    let tenant = TenantId(9);
    let key = |id: u128| AccountKey { tenant, id: AccountId(id) };
    let event = |id: u128, kind: EventKind| TransferEvent {
        key: TransferKey { tenant, id: TransferId(id) },
        kind,
        code: 1,
        metadata: None,
        linked: false,
    };
    let posted = |debit: u128, credit: u128| EventKind::Posted {
        debit: AccountId(debit),
        credit: AccountId(credit),
        amount: 10,
    };
    let a = store::Store::open(&location).unwrap();
    let accounts = (1..=4)
        .map(|id| {
            AccountCommand::Create(NewAccount {
                key: key(id),
                currency: Currency::parse("BRL").unwrap(),
                code: 1,
                flags: AccountFlags::default(),
                credit_limit: 0,
                metadata: None,
                holder: None,
            })
        })
        .collect();
    a.engine.accounts(accounts).unwrap();
    let hold = EventKind::Pending { debit: AccountId(1), credit: AccountId(2), amount: 100, timeout_seconds: 3_600 };
    assert_eq!(a.engine.transfers(vec![event(10, hold)]).unwrap()[0].result, TransferResult::Created);
    let pending = |id: u128| {
        let x = a.queries.account(key(id)).unwrap().unwrap();
        (x.debits_pending, x.credits_pending)
    };
    let busy = AtomicBool::new(true);
    std::thread::scope(|s| {
        // Node A stays busy between accounts of its own (an idle writer starts its next batch
        // without its copies), so it keeps the hold's accounts as it left them.
        s.spawn(|| {
            let mut id = 1_000;
            while busy.load(Ordering::Relaxed) {
                id += 1;
                assert_eq!(
                    a.engine.transfers(vec![event(id, posted(3, 4))]).unwrap()[0].result,
                    TransferResult::Created
                );
            }
        });
        // Node A stops when this scope ends, also by a failed assertion (else the test hangs).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&busy);
        // Node B's clock is two hours ahead: its idle sweep finds the hold due and releases it.
        let ahead = || store::now_nanos() + 7_200_000_000_000;
        let b = store::Store::open_with_clock(&location, std::sync::Arc::new(ahead)).unwrap();
        let started = std::time::Instant::now();
        while b.engine.stats.expired.load(Ordering::Relaxed) == 0 {
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "node B never swept the hold");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!((pending(1), pending(2)), ((0, 0), (0, 0)), "released by node B");
        // Node A, still busy, moves money from the hold's debit side, then to its credit side.
        assert_eq!(a.engine.transfers(vec![event(11, posted(1, 3))]).unwrap()[0].result, TransferResult::Created);
        assert_eq!(a.engine.transfers(vec![event(12, posted(3, 2))]).unwrap()[0].result, TransferResult::Created);
    });
    assert_eq!((pending(1), pending(2)), ((0, 0), (0, 0)), "node A wrote the released hold back");
    let report = a.verify().unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}
