//! Transaction limits of a payer (per holder): per transaction, per day, and per night with a
//! per-transaction cap at night. Night is 20:00–06:00 in America/Sao_Paulo, which has kept UTC−3
//! all year since 2019 (Decree 9,772/2019 ended daylight saving time). A person's default night
//! limit is R$1,000 (`shared/spec/SOURCES.md`). Lowering a limit takes effect at once; raising one
//! takes effect 24 hours after it was asked for.

use ledger::Timestamp;

const SEC: u64 = 1_000_000_000;
const HOUR: u64 = 3600 * SEC;
const DAY: u64 = 24 * HOUR;
/// America/Sao_Paulo's offset from UTC.
pub const OFFSET_HOURS: u64 = 3;
pub const NIGHT_STARTS_AT: u64 = 20;
pub const NIGHT_ENDS_AT: u64 = 6;
/// How long a raise waits before it applies.
pub const RAISE_DELAY: u64 = DAY;
/// R$1,000.00 in centavos.
pub const PERSON_NIGHT_DEFAULT: u64 = 100_000;

/// Limits in centavos; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_transaction: Option<u64>,
    pub daily: Option<u64>,
    pub nightly: Option<u64>,
    pub night_per_transaction: Option<u64>,
}

impl Limits {
    /// What a holder has before asking for anything: persons R$1,000 per transaction and per night
    /// at night; companies none.
    pub fn default_for(person: bool) -> Limits {
        if person {
            Limits {
                nightly: Some(PERSON_NIGHT_DEFAULT),
                night_per_transaction: Some(PERSON_NIGHT_DEFAULT),
                ..Limits::default()
            }
        } else {
            Limits::default()
        }
    }
}

fn raises(old: Option<u64>, new: Option<u64>) -> bool {
    match (old, new) {
        (_, None) => old.is_some(),
        (None, Some(_)) => false,
        (Some(o), Some(n)) => n > o,
    }
}

/// A holder's limits over time: those in force, and raises waiting for their time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub current: Limits,
    /// Limits asked for that raise some value, and when they apply.
    pub pending: Option<(Limits, Timestamp)>,
}

impl Schedule {
    pub fn new(current: Limits) -> Schedule {
        Schedule { current, pending: None }
    }

    /// The limits in force at `now`.
    pub fn at(&self, now: Timestamp) -> Limits {
        match self.pending {
            Some((limits, from)) if now >= from => limits,
            _ => self.current,
        }
    }

    /// Asks for `wanted` at `now`: each lowered (or unchanged) value applies at once, each raised
    /// one from `now + 24 h`.
    pub fn request(&self, wanted: Limits, now: Timestamp) -> Schedule {
        let base = self.at(now);
        let pick = |old: Option<u64>, new: Option<u64>| if raises(old, new) { old } else { new };
        let immediate = Limits {
            per_transaction: pick(base.per_transaction, wanted.per_transaction),
            daily: pick(base.daily, wanted.daily),
            nightly: pick(base.nightly, wanted.nightly),
            night_per_transaction: pick(base.night_per_transaction, wanted.night_per_transaction),
        };
        let pending = (immediate != wanted).then_some((wanted, now + RAISE_DELAY));
        Schedule { current: immediate, pending }
    }
}

/// The institution's night, in whole local (São Paulo) hours: from `start_hour` up to, not
/// including, `end_hour`, across midnight when `start_hour > end_hour`. The Central Bank's default
/// is 20:00–06:00; an institution may set another window (a customer may ask for 22:00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Night {
    pub start_hour: u64,
    pub end_hour: u64,
}

impl Default for Night {
    fn default() -> Night {
        Night { start_hour: NIGHT_STARTS_AT, end_hour: NIGHT_ENDS_AT }
    }
}

impl Night {
    /// Hours in 0..24, start and end apart.
    pub fn new(start_hour: u64, end_hour: u64) -> Option<Night> {
        (start_hour < 24 && end_hour < 24 && start_hour != end_hour).then_some(Night { start_hour, end_hour })
    }

    fn contains(self, hour: u64) -> bool {
        if self.start_hour < self.end_hour {
            (self.start_hour..self.end_hour).contains(&hour)
        } else {
            hour >= self.start_hour || hour < self.end_hour
        }
    }

    /// Which limit period `now` falls in.
    pub fn period(self, now: Timestamp) -> Period {
        let offset = OFFSET_HOURS * HOUR;
        let local = now.saturating_sub(offset);
        let local_day = local - local % DAY;
        let hour = (local % DAY) / HOUR;
        let night = self.contains(hour);
        // The night began today at `start_hour`, or yesterday when that is still ahead.
        let today = local_day + self.start_hour * HOUR;
        let night_start_local = if hour >= self.start_hour { today } else { today.saturating_sub(DAY) };
        Period { night, day_start: local_day + offset, night_start: night_start_local + offset }
    }
}

/// Which limit period a time falls in, as UTC nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub night: bool,
    /// Start of the local (São Paulo) calendar day.
    pub day_start: Timestamp,
    /// Start of the current night (`start_hour` local), when `night`.
    pub night_start: Timestamp,
}

/// The period of `now` under the default night (20:00–06:00).
pub fn period(now: Timestamp) -> Period {
    Night::default().period(now)
}

/// Which limit a payment would break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breach {
    PerTransaction(u64),
    Daily(u64),
    Nightly(u64),
    NightPerTransaction(u64),
}

impl Breach {
    pub fn describe(self) -> String {
        let r = crate::amount::format;
        match self {
            Breach::PerTransaction(l) => format!("exceeds the per-transaction limit of R${}", r(l)),
            Breach::Daily(l) => format!("exceeds the daily limit of R${}", r(l)),
            Breach::Nightly(l) => format!("exceeds the night limit (night hours, Brasilia time) of R${}", r(l)),
            Breach::NightPerTransaction(l) => {
                format!("exceeds the night per-transaction limit (night hours, Brasilia time) of R${}", r(l))
            }
        }
    }
}

/// Checks a payment of `amount` at `now`, given what the payer already spent in today's (local)
/// day and in the current night.
pub fn check(
    limits: Limits,
    night: Night,
    amount: u64,
    now: Timestamp,
    spent_day: u64,
    spent_night: u64,
) -> Result<(), Breach> {
    let over = |limit: Option<u64>, total: u64| limit.filter(|l| total > *l);
    if let Some(l) = over(limits.per_transaction, amount) {
        return Err(Breach::PerTransaction(l));
    }
    if let Some(l) = over(limits.daily, spent_day.saturating_add(amount)) {
        return Err(Breach::Daily(l));
    }
    if night.period(now).night {
        if let Some(l) = over(limits.night_per_transaction, amount) {
            return Err(Breach::NightPerTransaction(l));
        }
        if let Some(l) = over(limits.nightly, spent_night.saturating_add(amount)) {
            return Err(Breach::Nightly(l));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-24 at `h`:00 in São Paulo.
    fn sp(h: u64) -> Timestamp {
        1_795_910_400 * SEC + (h + OFFSET_HOURS) * HOUR
    }

    #[test]
    fn night_is_20_to_6_in_sao_paulo() {
        assert!(!period(sp(6)).night);
        assert!(!period(sp(19) + 59 * 60 * SEC).night);
        assert!(period(sp(20)).night);
        assert!(period(sp(23)).night);
        assert!(period(sp(5)).night);
        assert_eq!(period(sp(23)).night_start, sp(20));
        assert_eq!(period(sp(2)).night_start, sp(20) - DAY);
        assert_eq!(period(sp(2)).day_start, sp(0));
        assert_eq!(period(sp(23)).day_start, sp(0));
        // A window that does not cross midnight, and one that starts at 22:00.
        let day_window = Night::new(9, 11).unwrap();
        assert!(!day_window.period(sp(8)).night && day_window.period(sp(9)).night && !day_window.period(sp(11)).night);
        assert_eq!(day_window.period(sp(10)).night_start, sp(9));
        let late = Night::new(22, 6).unwrap();
        assert!(!late.period(sp(21)).night && late.period(sp(22)).night && late.period(sp(3)).night);
        assert_eq!(late.period(sp(3)).night_start, sp(22) - DAY);
        assert_eq!(Night::new(5, 5), None);
        assert_eq!(Night::new(24, 5), None);
    }

    #[test]
    fn person_night_default_and_checks() {
        let l = Limits::default_for(true);
        assert_eq!(check(l, Night::default(), 100_000, sp(21), 0, 0), Ok(()));
        assert_eq!(check(l, Night::default(), 100_001, sp(21), 0, 0), Err(Breach::NightPerTransaction(100_000)));
        assert_eq!(check(l, Night::default(), 60_000, sp(21), 0, 50_000), Err(Breach::Nightly(100_000)));
        assert_eq!(check(l, Night::default(), 500_000, sp(12), 0, 0), Ok(()), "no limit by day");
        let daily = Limits { daily: Some(200_000), per_transaction: Some(150_000), ..l };
        assert_eq!(check(daily, Night::default(), 150_001, sp(12), 0, 0), Err(Breach::PerTransaction(150_000)));
        assert_eq!(check(daily, Night::default(), 100_000, sp(12), 100_001, 0), Err(Breach::Daily(200_000)));
        assert!(Limits::default_for(false) == Limits::default());
    }

    #[test]
    fn raises_wait_a_day_lowerings_apply_now() {
        let s = Schedule::new(Limits::default_for(true));
        let t = sp(10);
        let wanted = Limits {
            nightly: Some(500_000),
            night_per_transaction: Some(50_000),
            daily: Some(1_000_000),
            ..Limits::default()
        };
        let s = s.request(wanted, t);
        let now = s.at(t);
        assert_eq!(now.night_per_transaction, Some(50_000), "lowered at once");
        assert_eq!(now.nightly, Some(100_000), "raise waits");
        assert_eq!(now.daily, Some(1_000_000), "a new limit where there was none lowers");
        assert_eq!(s.at(t + RAISE_DELAY - 1).nightly, Some(100_000));
        assert_eq!(s.at(t + RAISE_DELAY), wanted);
        // Removing a limit is a raise.
        let s2 = Schedule::new(wanted).request(Limits { daily: None, ..wanted }, t);
        assert_eq!(s2.at(t).daily, Some(1_000_000));
        assert_eq!(s2.at(t + RAISE_DELAY).daily, None);
    }
}
