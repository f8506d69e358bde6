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
const TABLE: &[(&str, u8)] = &[
    ("AED", 2),
    ("AFN", 2),
    ("ALL", 2),
    ("AMD", 2),
    ("ANG", 2),
    ("AOA", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("AWG", 2),
    ("AZN", 2),
    ("BAM", 2),
    ("BBD", 2),
    ("BDT", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BIF", 0),
    ("BMD", 2),
    ("BND", 2),
    ("BOB", 2),
    ("BRL", 2),
    ("BSD", 2),
    ("BTN", 2),
    ("BWP", 2),
    ("BYN", 2),
    ("BZD", 2),
    ("CAD", 2),
    ("CDF", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CRC", 2),
    ("CUP", 2),
    ("CVE", 2),
    ("CZK", 2),
    ("DJF", 0),
    ("DKK", 2),
    ("DOP", 2),
    ("DZD", 2),
    ("EGP", 2),
    ("ERN", 2),
    ("ETB", 2),
    ("EUR", 2),
    ("FJD", 2),
    ("FKP", 2),
    ("GBP", 2),
    ("GEL", 2),
    ("GHS", 2),
    ("GIP", 2),
    ("GMD", 2),
    ("GNF", 0),
    ("GTQ", 2),
    ("GYD", 2),
    ("HKD", 2),
    ("HNL", 2),
    ("HTG", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("IRR", 2),
    ("ISK", 0),
    ("JMD", 2),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KGS", 2),
    ("KHR", 2),
    ("KMF", 0),
    ("KPW", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("KYD", 2),
    ("KZT", 2),
    ("LAK", 2),
    ("LBP", 2),
    ("LKR", 2),
    ("LRD", 2),
    ("LSL", 2),
    ("LYD", 3),
    ("MAD", 2),
    ("MDL", 2),
    ("MGA", 2),
    ("MKD", 2),
    ("MMK", 2),
    ("MNT", 2),
    ("MOP", 2),
    ("MRU", 2),
    ("MUR", 2),
    ("MVR", 2),
    ("MWK", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("MZN", 2),
    ("NAD", 2),
    ("NGN", 2),
    ("NIO", 2),
    ("NOK", 2),
    ("NPR", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PAB", 2),
    ("PEN", 2),
    ("PGK", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("QAR", 2),
    ("RON", 2),
    ("RSD", 2),
    ("RUB", 2),
    ("RWF", 0),
    ("SAR", 2),
    ("SBD", 2),
    ("SCR", 2),
    ("SDG", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("SHP", 2),
    ("SLE", 2),
    ("SOS", 2),
    ("SRD", 2),
    ("SSP", 2),
    ("STN", 2),
    ("SVC", 2),
    ("SYP", 2),
    ("SZL", 2),
    ("THB", 2),
    ("TJS", 2),
    ("TMT", 2),
    ("TND", 3),
    ("TOP", 2),
    ("TRY", 2),
    ("TTD", 2),
    ("TWD", 2),
    ("TZS", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("UYU", 2),
    ("UYW", 4),
    ("UZS", 2),
    ("VED", 2),
    ("VES", 2),
    ("VND", 0),
    ("VUV", 0),
    ("WST", 2),
    ("XAF", 0),
    ("XCD", 2),
    ("XCG", 2),
    ("XOF", 0),
    ("XPF", 0),
    ("YER", 2),
    ("ZAR", 2),
    ("ZMW", 2),
    ("ZWG", 2),
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
        match TABLE.binary_search_by(|(c, _)| c.as_bytes().cmp(bytes)) {
            Ok(_) => Ok(Currency([bytes[0], bytes[1], bytes[2]])),
            Err(_) => Err(CurrencyError::Unknown),
        }
    }

    /// The code as text, e.g. `"BRL"`.
    pub fn as_str(&self) -> &str {
        // The constructor only accepts ASCII upper-case letters.
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }

    /// The number of decimal places of the minor unit (2 for BRL, 0 for JPY, 3 for KWD).
    pub fn minor_units(&self) -> u8 {
        let i = TABLE.binary_search_by(|(c, _)| c.as_bytes().cmp(&self.0[..])).expect("constructed from the table");
        TABLE[i].1
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
        let cases = [("BRL", 2), ("USD", 2), ("JPY", 0), ("KWD", 3), ("UYW", 4), ("CLP", 0)];
        for (code, exponent) in cases {
            let currency = Currency::parse(code).unwrap();
            assert_eq!(currency.as_str(), code);
            assert_eq!(currency.minor_units(), exponent, "{code}");
        }
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
