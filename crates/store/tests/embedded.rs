//! The conformance suite on the embedded (SQLite) engine, each case in its own directory.

use store::Location;

fn fresh() -> Location {
    let dir = std::env::temp_dir().join(format!("rtpay-store-test-{}-{}", std::process::id(), store::now_nanos()));
    Location::Embedded(dir)
}

store::conformance_tests!(fresh());
