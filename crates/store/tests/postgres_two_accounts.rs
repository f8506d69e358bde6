//! The conformance suite on the PostgreSQL engine again, with a writer that keeps two accounts
//! between batches: nearly every batch reads its accounts back from the database, and must do
//! exactly what it does with all of them kept. (A test binary of its own: the bound is the
//! process's.)

use store::Location;

fn fresh() -> Location {
    store::limit_account_cache(2);
    Location::Postgres(store::testing::fresh_postgres_database())
}

store::conformance_tests!(fresh());
