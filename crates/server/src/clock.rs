//! Watches this node's clock against the database's. Nodes sharing a PostgreSQL database tell
//! from their own clocks when another node's lease on a webhook delivery (2 s margin) or its
//! claim on an off-us Pix payment (5 s margin) has lapsed: a node ahead takes over work another
//! node is still doing, and one behind stamps its own leases and claims early, so that the others
//! take its work over. rtpay does not correct clocks (time sync does): it measures, exports
//! `rtpay_clock_skew_seconds`, and logs an error while a node is off.

use std::time::Duration;

use crate::AppState;

/// How often the clock is measured.
const INTERVAL: Duration = Duration::from_secs(60);

/// The most a node's clock may be off the database's before it is reported: a quarter of the
/// smallest margin a lease leaves, so that two nodes off in opposite directions, unreported, still
/// differ by half of it at most.
pub const SKEW_MAX: Duration = Duration::from_millis(500);

/// Whether a measured skew (nanoseconds) is past [`SKEW_MAX`], either way.
pub fn too_far(skew: i64) -> bool {
    u128::from(skew.unsigned_abs()) > SKEW_MAX.as_nanos()
}

/// Measures now and every [`INTERVAL`], on an engine with a clock of its own (PostgreSQL); on an
/// embedded engine there is one clock and nothing to watch. Started once per node.
pub fn watch(state: &AppState) {
    let state = state.clone();
    tokio::spawn(async move {
        let mut off = false;
        loop {
            let queries = state.store.queries.clone();
            match tokio::task::spawn_blocking(move || store::clock_skew(queries.as_ref(), &store::now_nanos)).await {
                Ok(Ok(None)) => return,
                Ok(Ok(Some(skew))) => {
                    *state.metrics.clock_skew.lock().expect("metrics lock") = Some(skew);
                    let was_off = std::mem::replace(&mut off, too_far(skew));
                    if off {
                        tracing::error!(
                            skew_seconds = skew as f64 / 1e9,
                            "this node's clock is more than 0.5 s off PostgreSQL's (positive: ahead): nodes may take over each other's webhook deliveries and off-us Pix early, and holds expire by this clock; fix its time sync"
                        );
                    } else if was_off {
                        tracing::info!(
                            skew_seconds = skew as f64 / 1e9,
                            "this node's clock is within 0.5 s of PostgreSQL's again"
                        );
                    }
                }
                // The database is away (its outage is reported where requests meet it): no reading
                // is exported rather than an old one.
                Ok(Err(e)) => {
                    *state.metrics.clock_skew.lock().expect("metrics lock") = None;
                    tracing::debug!(error = %e, "the database's clock could not be read");
                }
                Err(_) => {}
            }
            tokio::time::sleep(INTERVAL).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skew_past_half_a_second_either_way_is_too_far() {
        assert!(!too_far(0));
        assert!(!too_far(500_000_000));
        assert!(!too_far(-500_000_000));
        assert!(too_far(500_000_001));
        assert!(too_far(-500_000_001));
        assert!(too_far(i64::MIN));
    }
}
