//! ISO 4217 currencies and their minor units.
//!
//! Amounts everywhere are integers in the currency's minor unit (cents for USD, centavos for BRL,
//! yen for JPY). The table below is what makes "100" mean one dollar and one hundred yen; a code that
//! is not in it is refused at the edge, so the ledger never meets an unknown currency.

use std::fmt;

/// A validated ISO 4217 alphabetic code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

/// Active ISO 4217 codes with their minor-unit exponent (ISO 4217 amendment list, 2024), plus
/// precious-metal and fund codes left out on purpose: a payments ledger moves money, not ounces.
/// (alphabetic code, minor-unit exponent, numeric code).
const TABLE: &[(&str, u8, u16)] = &[
    ("AED", 2, 784),
    ("AFN", 2, 971),
    ("ALL", 2, 8),
    ("AMD", 2, 51),
    ("ANG", 2, 532),
    ("AOA", 2, 973),
    ("ARS", 2, 32),
    ("AUD", 2, 36),
    ("AWG", 2, 533),
    ("AZN", 2, 944),
    ("BAM", 2, 977),
    ("BBD", 2, 52),
    ("BDT", 2, 50),
    ("BGN", 2, 975),
    ("BHD", 3, 48),
    ("BIF", 0, 108),
    ("BMD", 2, 60),
    ("BND", 2, 96),
    ("BOB", 2, 68),
    ("BRL", 2, 986),
    ("BSD", 2, 44),
    ("BTN", 2, 64),
    ("BWP", 2, 72),
    ("BYN", 2, 933),
    ("BZD", 2, 84),
    ("CAD", 2, 124),
    ("CDF", 2, 976),
    ("CHF", 2, 756),
    ("CLP", 0, 152),
    ("CNY", 2, 156),
    ("COP", 2, 170),
    ("CRC", 2, 188),
    ("CUP", 2, 192),
    ("CVE", 2, 132),
    ("CZK", 2, 203),
    ("DJF", 0, 262),
    ("DKK", 2, 208),
    ("DOP", 2, 214),
    ("DZD", 2, 12),
    ("EGP", 2, 818),
    ("ERN", 2, 232),
    ("ETB", 2, 230),
    ("EUR", 2, 978),
    ("FJD", 2, 242),
    ("FKP", 2, 238),
    ("GBP", 2, 826),
    ("GEL", 2, 981),
    ("GHS", 2, 936),
    ("GIP", 2, 292),
    ("GMD", 2, 270),
    ("GNF", 0, 324),
    ("GTQ", 2, 320),
    ("GYD", 2, 328),
    ("HKD", 2, 344),
    ("HNL", 2, 340),
    ("HTG", 2, 332),
    ("HUF", 2, 348),
    ("IDR", 2, 360),
    ("ILS", 2, 376),
    ("INR", 2, 356),
    ("IQD", 3, 368),
    ("IRR", 2, 364),
    ("ISK", 0, 352),
    ("JMD", 2, 388),
    ("JOD", 3, 400),
    ("JPY", 0, 392),
    ("KES", 2, 404),
    ("KGS", 2, 417),
    ("KHR", 2, 116),
    ("KMF", 0, 174),
    ("KPW", 2, 408),
    ("KRW", 0, 410),
    ("KWD", 3, 414),
    ("KYD", 2, 136),
    ("KZT", 2, 398),
    ("LAK", 2, 418),
    ("LBP", 2, 422),
    ("LKR", 2, 144),
    ("LRD", 2, 430),
    ("LSL", 2, 426),
    ("LYD", 3, 434),
    ("MAD", 2, 504),
    ("MDL", 2, 498),
    ("MGA", 2, 969),
    ("MKD", 2, 807),
    ("MMK", 2, 104),
    ("MNT", 2, 496),
    ("MOP", 2, 446),
    ("MRU", 2, 929),
    ("MUR", 2, 480),
    ("MVR", 2, 462),
    ("MWK", 2, 454),
    ("MXN", 2, 484),
    ("MYR", 2, 458),
    ("MZN", 2, 943),
    ("NAD", 2, 516),
    ("NGN", 2, 566),
    ("NIO", 2, 558),
    ("NOK", 2, 578),
    ("NPR", 2, 524),
    ("NZD", 2, 554),
    ("OMR", 3, 512),
    ("PAB", 2, 590),
    ("PEN", 2, 604),
    ("PGK", 2, 598),
    ("PHP", 2, 608),
    ("PKR", 2, 586),
    ("PLN", 2, 985),
    ("PYG", 0, 600),
    ("QAR", 2, 634),
    ("RON", 2, 946),
    ("RSD", 2, 941),
    ("RUB", 2, 643),
    ("RWF", 0, 646),
    ("SAR", 2, 682),
    ("SBD", 2, 90),
    ("SCR", 2, 690),
    ("SDG", 2, 938),
    ("SEK", 2, 752),
    ("SGD", 2, 702),
    ("SHP", 2, 654),
    ("SLE", 2, 925),
    ("SOS", 2, 706),
    ("SRD", 2, 968),
    ("SSP", 2, 728),
    ("STN", 2, 930),
    ("SVC", 2, 222),
    ("SYP", 2, 760),
    ("SZL", 2, 748),
    ("THB", 2, 764),
    ("TJS", 2, 972),
    ("TMT", 2, 934),
    ("TND", 3, 788),
    ("TOP", 2, 776),
    ("TRY", 2, 949),
    ("TTD", 2, 780),
    ("TWD", 2, 901),
    ("TZS", 2, 834),
    ("UAH", 2, 980),
    ("UGX", 0, 800),
    ("USD", 2, 840),
    ("UYU", 2, 858),
    ("UYW", 4, 927),
    ("UZS", 2, 860),
    ("VED", 2, 926),
    ("VES", 2, 928),
    ("VND", 0, 704),
    ("VUV", 0, 548),
    ("WST", 2, 882),
    ("XAF", 0, 950),
    ("XCD", 2, 951),
    ("XCG", 2, 532),
    ("XOF", 0, 952),
    ("XPF", 0, 953),
    ("YER", 2, 886),
    ("ZAR", 2, 710),
    ("ZMW", 2, 967),
    ("ZWG", 2, 924),
];

/// Why a currency code was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CurrencyError {
    /// Not three upper-case ASCII letters.
    Malformed,
    /// Well-formed but not an active ISO 4217 currency.
    Unknown,
}

impl fmt::Display for CurrencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CurrencyError::Malformed => f.write_str("must be three upper-case letters (ISO 4217)"),
            CurrencyError::Unknown => f.write_str("is not an active ISO 4217 currency"),
        }
    }
}

impl Currency {
    /// Parses an ISO 4217 alphabetic code such as `BRL`.
    pub fn parse(code: &str) -> Result<Currency, CurrencyError> {
        let bytes = code.as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_uppercase) {
            return Err(CurrencyError::Malformed);
        }
        match TABLE.binary_search_by(|(c, ..)| c.as_bytes().cmp(bytes)) {
            Ok(_) => Ok(Currency([bytes[0], bytes[1], bytes[2]])),
            Err(_) => Err(CurrencyError::Unknown),
        }
    }

    /// Every currency the ledger accepts, in code order.
    pub fn all() -> impl Iterator<Item = Currency> {
        TABLE.iter().map(|(c, ..)| Currency::parse(c).expect("the table's own code"))
    }

    /// The code as text, e.g. `"BRL"`.
    pub fn as_str(&self) -> &str {
        // The constructor only accepts ASCII upper-case letters.
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }

    /// The number of decimal places of the minor unit (2 for BRL, 0 for JPY, 3 for KWD).
    pub fn minor_units(&self) -> u8 {
        TABLE[self.index()].1
    }

    /// The ISO 4217 numeric code (986 for BRL), as card messages carry it (ISO 8583 DE49).
    pub fn numeric(&self) -> u16 {
        TABLE[self.index()].2
    }

    /// The first currency (alphabetically) whose numeric code is `code`. Two may share one: ANG
    /// and XCG are both 532 while the guilder is replaced, so where the currency expected is
    /// known, compare [`Currency::numeric`] instead.
    pub fn from_numeric(code: u16) -> Option<Currency> {
        TABLE.iter().find(|(_, _, n)| *n == code).map(|(c, ..)| Currency::parse(c).expect("the table's own code"))
    }

    fn index(&self) -> usize {
        TABLE.binary_search_by(|(c, ..)| c.as_bytes().cmp(&self.0[..])).expect("constructed from the table")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        for pair in TABLE.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} before {}", pair[0].0, pair[1].0);
        }
    }

    #[test]
    fn parses_known_codes_with_their_exponent() {
        let cases =
            [("BRL", 2, 986), ("USD", 2, 840), ("JPY", 0, 392), ("KWD", 3, 414), ("UYW", 4, 927), ("CLP", 0, 152)];
        for (code, exponent, numeric) in cases {
            let currency = Currency::parse(code).unwrap();
            assert_eq!(currency.as_str(), code);
            assert_eq!(currency.minor_units(), exponent, "{code}");
            assert_eq!(currency.numeric(), numeric, "{code}");
            assert_eq!(Currency::from_numeric(numeric), Some(currency));
        }
        assert_eq!(Currency::from_numeric(999), None);
        let (ang, xcg) = (Currency::parse("ANG").unwrap(), Currency::parse("XCG").unwrap());
        assert_eq!((ang.numeric(), xcg.numeric()), (532, 532), "a code two currencies share");
        assert_eq!(Currency::from_numeric(532), Some(ang));
    }

    #[test]
    fn refuses_bad_codes() {
        assert_eq!(Currency::parse("brl"), Err(CurrencyError::Malformed));
        assert_eq!(Currency::parse("BR"), Err(CurrencyError::Malformed));
        assert_eq!(Currency::parse("BRLL"), Err(CurrencyError::Malformed));
        assert_eq!(Currency::parse("XXX"), Err(CurrencyError::Unknown));
        assert_eq!(Currency::parse("ZZZ"), Err(CurrencyError::Unknown));
    }
}
