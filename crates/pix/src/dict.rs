//! DICT anti-scanning: per payer, a token bucket that key look-ups draw from
//! (`shared/spec/SOURCES.md`, from bacen/pix-dict-api): refilled at 2 tokens a minute up to 100
//! (a person) or 1,000 (a company); a look-up that finds a key costs 1, one that finds none costs
//! 20, a settled payment gives 1 back. An empty bucket answers 429.

use ledger::Timestamp;

pub const REFILL_PER_MINUTE: u64 = 2;
pub const CAPACITY_PERSON: u64 = 100;
pub const CAPACITY_COMPANY: u64 = 1_000;
pub const COST_FOUND: u64 = 1;
pub const COST_NOT_FOUND: u64 = 20;
pub const CREDIT_PAYMENT: u64 = 1;

const NANOS_PER_TOKEN: u64 = 60_000_000_000 / REFILL_PER_MINUTE;

/// A payer's bucket: tokens as of `at` (refills are computed on read, never stored ahead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub capacity: u64,
    pub tokens: u64,
    /// When `tokens` was last brought up to date; refill time before it is accounted for.
    pub at: Timestamp,
}

impl Bucket {
    /// A full bucket.
    pub fn new(capacity: u64, now: Timestamp) -> Bucket {
        Bucket { capacity, tokens: capacity, at: now }
    }

    /// Brings the tokens up to `now`, keeping the fraction of a token already earned.
    pub fn refill(&mut self, now: Timestamp) {
        if now <= self.at {
            return;
        }
        let earned = (now - self.at) / NANOS_PER_TOKEN;
        if self.tokens + earned >= self.capacity {
            self.tokens = self.capacity;
            self.at = now;
        } else {
            self.tokens += earned;
            self.at += earned * NANOS_PER_TOKEN;
        }
    }

    /// Whether a look-up may run now: at least one token (the cost is known only after it).
    pub fn admits(&mut self, now: Timestamp) -> bool {
        self.refill(now);
        self.tokens > 0
    }

    /// Charges a look-up's outcome; the bucket does not go below zero.
    pub fn charge(&mut self, found: bool, now: Timestamp) {
        self.refill(now);
        let cost = if found { COST_FOUND } else { COST_NOT_FOUND };
        self.tokens = self.tokens.saturating_sub(cost);
    }

    /// A settled payment gives a token back.
    pub fn credit(&mut self, now: Timestamp) {
        self.refill(now);
        self.tokens = (self.tokens + CREDIT_PAYMENT).min(self.capacity);
    }

    /// Seconds until a look-up is admitted again (0 when it is now).
    pub fn retry_after_seconds(&self) -> u64 {
        if self.tokens > 0 {
            0
        } else {
            NANOS_PER_TOKEN.div_ceil(1_000_000_000)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000_000_000;

    #[test]
    fn misses_drain_five_times_faster_than_the_refill() {
        let mut b = Bucket::new(CAPACITY_PERSON, 0);
        for _ in 0..5 {
            assert!(b.admits(0));
            b.charge(false, 0);
        }
        assert_eq!(b.tokens, 0);
        assert!(!b.admits(0));
        assert_eq!(b.retry_after_seconds(), 30);
        assert!(b.admits(MIN / 2), "one token after 30 s");
        b.charge(true, MIN / 2);
        assert!(!b.admits(MIN / 2));
        b.credit(MIN / 2);
        assert_eq!(b.tokens, 1);
        // Refill keeps fractions: 29 s then 1 s makes one token, not zero.
        let mut c = Bucket { capacity: 10, tokens: 0, at: 0 };
        c.refill(29_000_000_000);
        assert_eq!(c.tokens, 0);
        c.refill(30_000_000_000);
        assert_eq!(c.tokens, 1);
        c.refill(100 * MIN);
        assert_eq!(c.tokens, 10, "capped at capacity");
        c.credit(100 * MIN);
        assert_eq!(c.tokens, 10);
    }
}
