//! Helpers for tests that need a real PostgreSQL server (this crate's and the binary's).

use std::sync::atomic::{AtomicU64, Ordering};

/// The server the tests use: `RTPAY_TEST_POSTGRES_URL`, or the local default that `scripts/test`
/// provides. It must name a database the user may connect to and create databases from.
pub fn admin_url() -> String {
    std::env::var("RTPAY_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates an empty database with a unique name and returns its URL. Panics, with the reason, if
/// the server cannot be reached: a test that needs PostgreSQL fails without it, never skips.
pub fn fresh_postgres_database() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let admin = admin_url();
    let name = format!(
        "rtpay_t_{}_{}_{}",
        std::process::id(),
        crate::now_nanos() % 1_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut client = ::postgres::Client::connect(&admin, ::postgres::NoTls).unwrap_or_else(|e| {
        panic!("PostgreSQL is required for this test and is not reachable at {admin}: {e}. Run scripts/test, which installs and starts it.")
    });
    client.batch_execute(&format!("CREATE DATABASE {name}")).expect("create test database");
    let mut config: ::postgres::Config = admin.parse().expect("admin URL parses");
    config.dbname(&name);
    // Rebuild a URL from the parts tests need: user, host, port, database.
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let (host, port) = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(::postgres::config::Host::Tcp(h)), Some(p)) => (h.clone(), *p),
        (Some(::postgres::config::Host::Tcp(h)), None) => (h.clone(), 5432),
        _ => ("127.0.0.1".to_owned(), 5432),
    };
    format!("postgres://{user}@{host}:{port}/{name}")
}

/// The holders and Pix spending counters of a store written before the counters were named per
/// tenant (SQLite's migration 13, PostgreSQL's 11): tenants 7 and 8 both hold a holder under
/// [`SPEND_HOLDER`], tenant 7 another one, and one counter names a holder nobody holds.
pub mod spend_counters {
    pub const SPEND_HOLDER: u128 = 0x0190_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_4a5b;
    pub const OTHER_HOLDER: u128 = 0x0190_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_ffff;
    const NOBODY: u128 = 0x0190_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_0000;

    pub fn id(v: u128) -> String {
        uuid::Uuid::from_u128(v).hyphenated().to_string()
    }

    /// (tenant, holder) pairs to insert as holders.
    pub fn holders() -> Vec<(u128, u128)> {
        vec![(7, SPEND_HOLDER), (8, SPEND_HOLDER), (7, OTHER_HOLDER)]
    }

    /// (scope, period, total) rows as the old names had them.
    pub fn old_counters() -> Vec<(String, i64, i64)> {
        vec![
            (format!("pix-day:{}", id(SPEND_HOLDER)), 5, 100),
            (format!("pix-night:{}", id(SPEND_HOLDER)), 6, 40),
            (format!("pix-day:{}", id(OTHER_HOLDER)), 5, 7),
            (format!("pix-day:{}", id(NOBODY)), 5, 9),
            ("other:x".to_owned(), 1, 3),
        ]
    }

    /// After the migration: each total under every tenant holding its holder, the old names gone,
    /// other counters as they were.
    pub fn check(q: &dyn crate::Queries) {
        let total = |scope: String, period: u64| q.counter_total(&scope, period, period + 1).unwrap();
        let (h, g) = (id(SPEND_HOLDER), id(OTHER_HOLDER));
        for tenant in [7, 8] {
            assert_eq!(total(format!("pix-day:{}:{h}", id(tenant)), 5), 100, "tenant {tenant}");
            assert_eq!(total(format!("pix-night:{}:{h}", id(tenant)), 6), 40, "tenant {tenant}");
        }
        assert_eq!(total(format!("pix-day:{}:{g}", id(7)), 5), 7);
        assert_eq!(total(format!("pix-day:{}:{g}", id(8)), 5), 0, "tenant 8 holds no such holder");
        for (scope, period, _) in old_counters().into_iter().filter(|(s, ..)| s.starts_with("pix-")) {
            assert_eq!(total(scope.clone(), period as u64), 0, "{scope} is gone");
        }
        assert_eq!(total("other:x".into(), 1), 3);
    }
}

/// Card authorizations stored before their holds' lapse was kept (SQLite's migration 14,
/// PostgreSQL's 12), with the holds they name: each takes its hold's expiry, when it is an
/// approved purchase whose hold is its tenant's.
pub mod lapsing_holds {
    pub const TENANT: u128 = 7;
    pub const OTHER_TENANT: u128 = 8;
    /// (tenant, id, expires_at) of the hold transfers.
    pub fn holds() -> Vec<(u128, u128, i64)> {
        vec![(TENANT, 0x11, 5_000), (TENANT, 0x12, 6_000), (OTHER_TENANT, 0x13, 7_000), (TENANT, 0x14, 8_000)]
    }

    /// (authorization id, body, held_until after the migration), all of [`TENANT`].
    pub fn authorizations() -> Vec<(u128, String, i64)> {
        let hold = |id: u128| uuid::Uuid::from_u128(id).hyphenated().to_string();
        vec![
            (1, format!(r#"{{"status":"approved","hold_id":"{}"}}"#, hold(0x11)), 5_000),
            (2, format!(r#"{{"status":"approved","credit":true,"hold_id":"{}"}}"#, hold(0x12)), 0),
            (3, format!(r#"{{"status":"approved","hold_id":"{}"}}"#, hold(0x13)), 0),
            (4, format!(r#"{{"status":"captured","hold_id":"{}"}}"#, hold(0x14)), 0),
            (5, r#"{"status":"declined","hold_id":null}"#.to_owned(), 0),
            (6, format!(r#"{{"status":"approved","credit":false,"hold_id":"{}"}}"#, hold(0x14)), 8_000),
        ]
    }
}
