//! Identifiers: the institution's ISPB, EndToEndIds of payments (`E…`) and refunds (`D…`, the
//! API Pix `rtrId`), and txids. Formats: `shared/spec/SOURCES.md` — 32 characters, the prefix,
//! the 8-character ISPB, `yyyyMMddHHmm` in UTC and 11 alphanumerics; since API Pix 2.9.0 an ISPB
//! may be alphanumeric. A cob's txid is `[a-zA-Z0-9]{26,35}`, a refund id `[a-zA-Z0-9]{1,35}`.

use ledger::time::{civil_date, civil_time};
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

/// `prefix` (`E` payment, `D` refund) + ISPB + `yyyyMMddHHmm` (UTC) + 11 characters drawn from
/// `random` (any bytes; each picks one of 62 letters and digits).
pub fn end_to_end_id(prefix: char, ispb: &str, at: Timestamp, random: [u8; 11]) -> String {
    let (y, mo, d) = civil_date(at);
    let (h, mi, _) = civil_time(at);
    let tail: String = random.iter().map(|b| ALNUM[usize::from(*b) % ALNUM.len()] as char).collect();
    format!("{prefix}{ispb}{y:04}{mo:02}{d:02}{h:02}{mi:02}{tail}")
}

/// Whether `text` is an EndToEndId with `prefix`: 32 characters, a valid ISPB, a plausible UTC
/// date and time, 11 letters or digits.
pub fn valid_end_to_end_id(prefix: char, text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() != E2E_LEN || !text.starts_with(prefix) || !alnum(text) {
        return false;
    }
    let num = |r: std::ops::Range<usize>| text[r].parse::<u32>().ok();
    let stamp_digits = b[9..21].iter().all(u8::is_ascii_digit);
    let plausible = match (num(9..13), num(13..15), num(15..17), num(17..19), num(19..21)) {
        (Some(y), Some(mo), Some(d), Some(h), Some(mi)) => {
            y >= 2020 && (1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60
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
        let id = end_to_end_id('E', "12345678", at, [0, 1, 2, 61, 62, 255, 10, 36, 35, 9, 100]);
        assert_eq!(id.len(), 32);
        assert_eq!(&id[..21], "E12345678202611241305");
        assert_eq!(&id[21..], "012z07AaZ9c");
        assert!(valid_end_to_end_id('E', &id));
        assert!(!valid_end_to_end_id('D', &id));
        assert!(!valid_end_to_end_id('E', &id[..31]));
        assert!(valid_end_to_end_id('E', "E9999999920240101000011111111111"));
        assert!(!valid_end_to_end_id('E', "E9999999920241301000011111111111"), "month 13");
        assert!(valid_end_to_end_id('D', "DAB12CD3420240101235911111111111"), "alphanumeric ISPB");
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
