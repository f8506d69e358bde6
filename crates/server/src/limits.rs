//! Abuse limits, per node: a token bucket of requests per tenant, a token bucket of failed
//! authentications per source address, and a lock on a credential id after repeated failures
//! (PCI DSS 8.3.4: at most 10 attempts, then locked for at least 30 minutes).
//!
//! Every map here is bounded ([`TRACKED_MAX`]); when one fills up it forgets everything, which can
//! only ever loosen a limit for a moment, never refuse a good request — but for the locks, which
//! are never forgotten early: a map full of locked ids tracks no new id until a lock ends.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tenants, sources or credential ids tracked at most per map.
pub const TRACKED_MAX: usize = 100_000;
/// Failed authentications a source may make in a burst...
pub const AUTH_FAILURES_BURST: f64 = 20.0;
/// ...and per minute after that.
pub const AUTH_FAILURES_PER_MINUTE: f64 = 10.0;
/// Consecutive failures that lock a credential id...
pub const LOCK_AFTER_FAILURES: u32 = 10;
/// ...for this long.
pub const LOCK_DURATION: Duration = Duration::from_secs(30 * 60);

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per key: `rate` tokens per second, at most `burst`.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<ledger::Map<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Copy> Buckets<K> {
    pub fn new(rate_per_second: f64, burst: f64) -> Self {
        assert!(rate_per_second > 0.0 && burst >= 1.0, "a bucket refills and holds at least one token");
        Buckets { rate: rate_per_second, burst, buckets: Mutex::new(ledger::Map::default()) }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("limits lock");
        if buckets.len() >= TRACKED_MAX && !buckets.contains_key(&key) {
            buckets.clear();
        }
        let b = buckets.entry(key).or_insert(Bucket { tokens: self.burst, at: now });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }

    /// Whether a token is there, without taking it.
    pub fn peek(&self, key: K, now: Instant) -> Result<(), Duration> {
        let buckets = self.buckets.lock().expect("limits lock");
        match buckets.get(&key) {
            None => Ok(()),
            Some(b) => {
                let tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
                if tokens >= 1.0 {
                    Ok(())
                } else {
                    Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
}

/// Failed authentications: throttled per source, and a credential id locked after
/// [`LOCK_AFTER_FAILURES`] in a row.
#[derive(Debug)]
pub struct AuthGuard {
    sources: Buckets<IpAddr>,
    ids: Mutex<Ids>,
}

/// The credential ids with failures, and when a full map may next be swept.
#[derive(Debug, Default)]
struct Ids {
    map: ledger::Map<String, Failures>,
    next_sweep: Option<Instant>,
}

impl Default for AuthGuard {
    fn default() -> Self {
        AuthGuard {
            sources: Buckets::new(AUTH_FAILURES_PER_MINUTE / 60.0, AUTH_FAILURES_BURST),
            ids: Mutex::new(Ids::default()),
        }
    }
}

/// What a failure led to.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterFailure {
    Counted,
    /// This failure locked the id.
    Locked,
}

impl AuthGuard {
    /// Before checking credentials: a source over its failure budget waits.
    pub fn source_allowed(&self, source: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        source.map_or(Ok(()), |ip| self.sources.peek(ip, now))
    }

    /// Whether the id is locked, and for how much longer.
    pub fn locked(&self, id: &str, now: Instant) -> Option<Duration> {
        let ids = self.ids.lock().expect("limits lock");
        ids.map.get(id).and_then(|f| f.locked_until).filter(|until| *until > now).map(|until| until - now)
    }

    pub fn failed(&self, source: Option<IpAddr>, id: Option<&str>, now: Instant) -> AfterFailure {
        if let Some(ip) = source {
            let _ = self.sources.take(ip, now);
        }
        let Some(id) = id else { return AfterFailure::Counted };
        let mut ids = self.ids.lock().expect("limits lock");
        if ids.map.len() >= TRACKED_MAX && !ids.map.contains_key(id) {
            // Forget only ids that are not locked: a full map must not unlock anyone. Swept at
            // most once a second, so a map full of locked ids is not walked on every failure.
            if ids.next_sweep.is_none_or(|at| at <= now) {
                ids.map.retain(|_, f| f.locked_until.is_some_and(|u| u > now));
                ids.next_sweep = Some(now + Duration::from_secs(1));
            }
            if ids.map.len() >= TRACKED_MAX {
                // Still full, of locked ids (anyone may name ids that exist nowhere): this one is
                // counted against its source only, and the map stays bounded.
                return AfterFailure::Counted;
            }
        }
        let f = ids.map.entry(id.to_owned()).or_default();
        if f.locked_until.is_some_and(|u| u > now) {
            return AfterFailure::Counted;
        }
        f.count += 1;
        if f.count >= LOCK_AFTER_FAILURES {
            f.count = 0;
            f.locked_until = Some(now + LOCK_DURATION);
            return AfterFailure::Locked;
        }
        AfterFailure::Counted
    }

    /// A success resets the id's count of failures in a row.
    pub fn succeeded(&self, id: &str) {
        let mut ids = self.ids.lock().expect("limits lock");
        if let Some(f) = ids.map.get_mut(id) {
            f.count = 0;
        }
    }
}

/// Seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u32 {
    (wait.as_secs_f64().ceil() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let b = Buckets::new(2.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.take(1u128, t0), Ok(()));
        }
        let wait = b.take(1, t0).unwrap_err();
        assert_eq!(retry_after_seconds(wait), 1);
        assert!(wait <= Duration::from_millis(500));
        assert_eq!(b.take(2, t0), Ok(()), "keys have their own buckets");
        assert!(b.take(1, t0 + Duration::from_millis(400)).is_err());
        assert_eq!(b.take(1, t0 + Duration::from_millis(500)), Ok(()));
        // Refill stops at the burst.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(b.take(1, later), Ok(()));
        }
        assert!(b.take(1, later).is_err());
    }

    #[test]
    fn ten_failures_in_a_row_lock_an_id_for_thirty_minutes() {
        let g = AuthGuard::default();
        let t0 = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for i in 1..LOCK_AFTER_FAILURES {
            assert_eq!(g.failed(Some(ip), Some("operator"), t0), AfterFailure::Counted, "failure {i}");
        }
        assert_eq!(g.locked("operator", t0), None);
        assert_eq!(g.failed(Some(ip), Some("operator"), t0), AfterFailure::Locked);
        assert_eq!(g.locked("operator", t0), Some(LOCK_DURATION));
        assert_eq!(g.locked("operator", t0 + LOCK_DURATION - Duration::from_secs(1)), Some(Duration::from_secs(1)));
        assert_eq!(g.locked("operator", t0 + LOCK_DURATION), None);
        // A success in between starts the count again.
        let g = AuthGuard::default();
        for _ in 1..LOCK_AFTER_FAILURES {
            g.failed(None, Some("k"), t0);
        }
        g.succeeded("k");
        assert_eq!(g.failed(None, Some("k"), t0), AfterFailure::Counted);
    }

    /// Ids anyone may name (a secret names its key, whether or not the key exists) cannot grow
    /// the map past its bound, even when every id in it is locked; and no lock is forgotten.
    #[test]
    fn a_map_full_of_locked_ids_stays_bounded_and_keeps_its_locks() {
        let g = AuthGuard::default();
        let t0 = Instant::now();
        {
            let mut ids = g.ids.lock().unwrap();
            for i in 0..TRACKED_MAX {
                ids.map.insert(format!("key:{i}"), Failures { count: 0, locked_until: Some(t0 + LOCK_DURATION) });
            }
        }
        for n in 0..3 * LOCK_AFTER_FAILURES {
            let later = t0 + Duration::from_millis(u64::from(n) * 500);
            assert_eq!(g.failed(None, Some("key:new"), later), AfterFailure::Counted);
        }
        assert_eq!(g.ids.lock().unwrap().map.len(), TRACKED_MAX);
        assert_eq!(g.locked("key:new", t0), None, "not tracked: the source's budget still counts it");
        assert_eq!(g.locked("key:7", t0), Some(LOCK_DURATION));
        // Once the locks end, the map makes room again.
        let after = t0 + LOCK_DURATION + Duration::from_secs(1);
        g.failed(None, Some("key:new"), after);
        assert_eq!(g.ids.lock().unwrap().map.len(), 1);
    }

    #[test]
    fn a_source_is_throttled_after_its_burst_of_failures() {
        let g = AuthGuard::default();
        let t0 = Instant::now();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..AUTH_FAILURES_BURST as u32 {
            assert_eq!(g.source_allowed(Some(ip), t0), Ok(()));
            g.failed(Some(ip), None, t0);
        }
        let wait = g.source_allowed(Some(ip), t0).unwrap_err();
        assert_eq!(retry_after_seconds(wait), 6, "10 per minute: one every 6 s");
        assert_eq!(g.source_allowed(Some("10.0.0.3".parse().unwrap()), t0), Ok(()));
        assert_eq!(g.source_allowed(Some(ip), t0 + Duration::from_secs(6)), Ok(()));
        assert_eq!(g.source_allowed(None, t0), Ok(()));
    }
}
