//! Civil (proleptic Gregorian, UTC) dates of [`Timestamp`]s, for the rules that speak in days,
//! months and hours: spending limits, identifiers that carry a date, RFC 3339 output.

use crate::Timestamp;

const NANOS_PER_DAY: u64 = 86_400 * 1_000_000_000;

/// The UTC civil date (year, month, day) of a time in nanoseconds since the epoch.
pub fn civil_date(nanos: Timestamp) -> (i64, i64, i64) {
    let days = (nanos / NANOS_PER_DAY) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Nanoseconds since the epoch at the start of a UTC civil date (dates before 1970 clamp to 0).
pub fn nanos_of_date(year: i64, month: i64, day: i64) -> Timestamp {
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days).unwrap_or(0) * NANOS_PER_DAY
}

/// Hours, minutes and seconds of the UTC day.
pub fn civil_time(nanos: Timestamp) -> (u32, u32, u32) {
    let secs = (nanos % NANOS_PER_DAY) / 1_000_000_000;
    ((secs / 3600) as u32, ((secs / 60) % 60) as u32, (secs % 60) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_and_known_days() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        // 2024-02-29T13:45:07Z
        let t = 1_709_214_307 * 1_000_000_000;
        assert_eq!(civil_date(t), (2024, 2, 29));
        assert_eq!(civil_time(t), (13, 45, 7));
        assert_eq!(nanos_of_date(2024, 2, 29), t - (13 * 3600 + 45 * 60 + 7) * 1_000_000_000);
        for days in (0..200_000u64).step_by(37) {
            let t = days * NANOS_PER_DAY;
            let (y, m, d) = civil_date(t);
            assert_eq!(nanos_of_date(y, m, d), t);
        }
    }
}
