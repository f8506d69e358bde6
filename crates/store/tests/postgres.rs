//! The conformance suite on the PostgreSQL engine, each case in a database of its own on the
//! server named by `RTPAY_TEST_POSTGRES_URL` (default: the local server on 127.0.0.1:5432).
//! `scripts/test` installs and starts that server where it is missing; if it is not reachable
//! these tests fail, they do not skip.

use store::Location;

fn fresh() -> Location {
    Location::Postgres(store::testing::fresh_postgres_database())
}

store::conformance_tests!(fresh());
