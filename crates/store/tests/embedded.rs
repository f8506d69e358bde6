//! The conformance suite on the embedded (SQLite) engine, each case in its own directory.

use store::Location;

fn fresh() -> Location {
    let dir = std::env::temp_dir().join(format!("rtpay-store-test-{}-{}", std::process::id(), store::now_nanos()));
    Location::Embedded(dir)
}

store::conformance_tests!(fresh());

/// Migrations are not applied beside a running store: its writer keeps what they could change in
/// memory.
#[test]
fn migrate_waits_for_the_directory_lock() {
    let location = fresh();
    let store = store::Store::open(&location).unwrap();
    let refused = store::Store::migrate(&location).expect_err("refused beside a running store");
    assert!(refused.to_string().contains("another rtpay process"), "{refused}");
    store.close();
    assert!(store::Store::migrate(&location).unwrap().is_empty(), "up to date, nothing applied");
}

/// An embedded engine has no clock but its process's: there is nothing to be off from.
#[test]
fn an_embedded_engine_has_no_other_clock() {
    let store = store::Store::open(&fresh()).unwrap();
    assert_eq!(store.queries.database_time().unwrap(), None);
    assert_eq!(store::clock_skew(store.queries.as_ref(), &store::now_nanos).unwrap(), None);
    store.close();
}
