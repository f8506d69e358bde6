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
