//! The conformance suite on the embedded engine again, with a writer that keeps two accounts
//! between batches: nearly every batch reads its accounts back from storage, and must do exactly
//! what it does with all of them kept. (A test binary of its own: the bound is the process's.)

use store::Location;

fn fresh() -> Location {
    store::limit_account_cache(2);
    let dir = std::env::temp_dir().join(format!("rtpay-store-two-{}-{}", std::process::id(), store::now_nanos()));
    Location::Embedded(dir)
}

store::conformance_tests!(fresh());
