//! Identifiers: the institution's ISPB, EndToEndIds of payments (`E…`) and refunds (`D…`, the
//! API Pix `rtrId`), and txids. Formats: `shared/spec/SOURCES.md` — 32 characters, the prefix,
//! the 8-character ISPB, `yyyyMMddHHmm` in UTC and 11 alphanumerics; since API Pix 2.9.0 an ISPB
//! may be alphanumeric. A cob's txid is `[a-zA-Z0-9]{26,35}`, a refund id `[a-zA-Z0-9]{1,35}`.

use ledger::time::{civil_date, civil_time, nanos_of_date};
use ledger::Timestamp;

pub const ISPB_LEN: usize = 8;
pub const E2E_LEN: usize = 32;

const ALNUM: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn alnum(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// 8 letters or digits (upper case for letters).
pub fn valid_ispb(text: &str) -> bool {
    text.len() == ISPB_LEN && text.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// A cob's or cobv's txid: `[a-zA-Z0-9]{26,35}`.
pub fn valid_txid(text: &str) -> bool {
    (26..=35).contains(&text.len()) && alnum(text)
}

/// A refund (devolução) id: `[a-zA-Z0-9]{1,35}`.
pub fn valid_refund_id(text: &str) -> bool {
    (1..=35).contains(&text.len()) && alnum(text)
}

/// Letters and digits of an EndToEndId's tail that come from the clock; the rest are random.
pub const E2E_TIME_CHARS: usize = 5;
/// The random letters and digits that end an EndToEndId.
pub const E2E_RANDOM_CHARS: usize = 11 - E2E_TIME_CHARS;

/// `prefix` (`E` payment, `D` refund) + ISPB + `yyyyMMddHHmm` (UTC) + 11 letters and digits: the
/// microsecond within the minute in five base-62 digits, then six drawn from `random` (any bytes;
/// each picks one of 62). The SPI asks only that the tail make the id unique; making its head
/// the time means ids sort as they are made (`0-9A-Za-z` is ASCII order), so an index of them —
/// the receiver's record of every Pix — grows at its right edge instead of on a random page per
/// payment. Two ids of the same microsecond differ by the random part (62^6 ≈ 5.7 × 10^10).
pub fn end_to_end_id(prefix: char, ispb: &str, at: Timestamp, random: [u8; E2E_RANDOM_CHARS]) -> String {
    let (y, mo, d) = civil_date(at);
    let (h, mi, _) = civil_time(at);
    const MICROS_PER_MINUTE: u64 = 60_000_000;
    const _: () = assert!(MICROS_PER_MINUTE <= 62u64.pow(E2E_TIME_CHARS as u32));
    let mut micros = (at / 1_000) % MICROS_PER_MINUTE;
    let mut tail = [b'0'; 11];
    for c in tail[..E2E_TIME_CHARS].iter_mut().rev() {
        *c = ALNUM[(micros % 62) as usize];
        micros /= 62;
    }
    for (c, b) in tail[E2E_TIME_CHARS..].iter_mut().zip(random) {
        *c = ALNUM[usize::from(b) % ALNUM.len()];
    }
    let tail = std::str::from_utf8(&tail).expect("ASCII");
    format!("{prefix}{ispb}{y:04}{mo:02}{d:02}{h:02}{mi:02}{tail}")
}

/// When an EndToEndId says it was made, to the microsecond for the ids [`end_to_end_id`] makes
/// (the minute, then the five letters and digits of the microsecond within it); to the minute for
/// another institution's, whose tail is its own. `None`: not an EndToEndId.
pub fn end_to_end_time(text: &str) -> Option<Timestamp> {
    let prefix = text.chars().next()?;
    if !valid_end_to_end_id(prefix, text) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text[r].parse::<u64>().ok();
    let (y, mo, d, h, mi) = (num(9..13)?, num(13..15)?, num(15..17)?, num(17..19)?, num(19..21)?);
    let minute = nanos_of_date(y as i64, mo as i64, d as i64) + (h * 3600 + mi * 60) * 1_000_000_000;
    let micros = text.as_bytes()[21..21 + E2E_TIME_CHARS]
        .iter()
        .try_fold(0u64, |n, &c| Some(n * 62 + ALNUM.iter().position(|&a| a == c)? as u64))?;
    Some(if micros < 60_000_000 { minute + micros * 1_000 } else { minute })
}

/// Whether `text` is an EndToEndId with `prefix`: 32 characters, a valid ISPB, a UTC date that
/// exists (from 2020) and a time, 11 letters or digits. What a new id must be.
pub fn valid_end_to_end_id(prefix: char, text: &str) -> bool {
    shaped_end_to_end_id(prefix, text, true)
}

/// Whether `text` has an EndToEndId's shape, its date checked field by field only (a day up to
/// 31 in any month, any year from 2020): what ids to look up must be. Ids stored before the
/// dates were checked whole (the sandbox took any) are still found by them.
pub fn end_to_end_id_shape(prefix: char, text: &str) -> bool {
    shaped_end_to_end_id(prefix, text, false)
}

fn shaped_end_to_end_id(prefix: char, text: &str, date_exists: bool) -> bool {
    let b = text.as_bytes();
    if b.len() != E2E_LEN || !text.starts_with(prefix) || !alnum(text) {
        return false;
    }
    let num = |r: std::ops::Range<usize>| text[r].parse::<u32>().ok();
    let stamp_digits = b[9..21].iter().all(u8::is_ascii_digit);
    let plausible = match (num(9..13), num(13..15), num(15..17), num(17..19), num(19..21)) {
        (Some(y), Some(mo), Some(d), Some(h), Some(mi)) => {
            let (y, mo, d) = (i64::from(y), i64::from(mo), i64::from(d));
            let fields = y >= 2020 && (1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60;
            // (Up to 2199: the date must fit the ledger's nanosecond clock.)
            let exists = || y <= 2199 && civil_date(nanos_of_date(y, mo, d)) == (y, mo, d);
            fields && (!date_exists || exists())
        }
        _ => false,
    };
    valid_ispb(&text[1..9]) && stamp_digits && plausible
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_to_end_ids_follow_the_rule() {
        // 2026-11-24T13:05:00Z
        let at = 1_795_525_500 * 1_000_000_000;
        // 12.345678 s into the minute: 12,345,678 µs is `0pnfq` in base 62.
        let id = end_to_end_id('E', "12345678", at + 12_345_678_901, [0, 61, 62, 255, 36, 100]);
        assert_eq!(id.len(), 32);
        assert_eq!(&id[..21], "E12345678202611241305");
        assert_eq!(&id[21..], "0pnfq0z07ac");
        assert!(valid_end_to_end_id('E', &id));
        assert_eq!(end_to_end_time(&id), Some(at + 12_345_678_000), "to the microsecond");
        // Another institution's tail: the minute.
        assert_eq!(end_to_end_time("E6070119020261124130599zzzzzzzzz"), Some(at));
        assert_eq!(end_to_end_time("E607011902026112413"), None);
        assert!(!valid_end_to_end_id('D', &id));
        assert!(!valid_end_to_end_id('E', &id[..31]));
        assert!(valid_end_to_end_id('E', "E9999999920240101000011111111111"));
        assert!(!valid_end_to_end_id('E', "E9999999920241301000011111111111"), "month 13");
        assert!(!valid_end_to_end_id('E', "E9999999920260231000011111111111"), "February 31");
        assert!(!valid_end_to_end_id('E', "E9999999920250229000011111111111"), "February 29 of 2025");
        assert!(valid_end_to_end_id('E', "E9999999920240229000011111111111"), "February 29 of 2024");
        assert!(!valid_end_to_end_id('E', "E9999999920260100000011111111111"), "day 0");
        assert!(!valid_end_to_end_id('E', "E9999999999991231000011111111111"), "past the clock's range");
        // Looked up, an id of a date that does not exist (stored when the sandbox took any) is
        // still an id.
        assert!(end_to_end_id_shape('E', "E9999999920260231000011111111111"));
        assert!(!end_to_end_id_shape('E', "E9999999920241301000011111111111"), "month 13");
        assert!(!end_to_end_id_shape('E', "E99999999202602310000111111111"), "short");
        assert!(valid_end_to_end_id('D', "DAB12CD3420240101235911111111111"), "alphanumeric ISPB");
    }

    #[test]
    fn end_to_end_ids_sort_as_they_are_made() {
        let start = 1_795_525_500 * 1_000_000_000;
        let mut last = String::new();
        // Every 7 ms over two minutes, crossing the minute and the hour's digits.
        for step in 0..(120_000 / 7) {
            let id = end_to_end_id('E', "12345678", start + step * 7_000_000, [255; E2E_RANDOM_CHARS]);
            assert!(valid_end_to_end_id('E', &id), "{id}");
            assert!(id > last, "{id} after {last}");
            last = id;
        }
        // The last microsecond of a minute is the largest tail.
        let end = end_to_end_id('E', "12345678", start + 59_999_999_000, [0; E2E_RANDOM_CHARS]);
        assert_eq!(&end[21..26], "43kjv", "59,999,999 µs in base 62");
    }

    #[test]
    fn txids_and_ispbs() {
        assert!(valid_txid(&"a".repeat(26)));
        assert!(valid_txid(&"Z9".repeat(17)));
        assert!(!valid_txid(&"a".repeat(25)));
        assert!(!valid_txid(&"a".repeat(36)));
        assert!(!valid_txid(&format!("{}-", "a".repeat(30))));
        assert!(valid_refund_id("D1"));
        assert!(!valid_refund_id(""));
        assert!(valid_ispb("12345678") && valid_ispb("AB12CD34"));
        assert!(!valid_ispb("1234567") && !valid_ispb("ab12cd34"));
    }
}
