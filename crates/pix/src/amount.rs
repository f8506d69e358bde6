//! Amounts in reais as the API Pix writes them (`\d{1,10}\.\d{2}`, `shared/spec/pix-api/openapi.yaml`)
//! and as integer centavos, the ledger's minor unit for BRL.

/// The largest amount the API Pix format can carry: 9,999,999,999.99.
pub const MAX_CENTAVOS: u64 = 999_999_999_999;

/// Parses `\d{1,10}\.\d{2}` into centavos. Zero is a valid text; callers decide whether it is
/// a valid amount.
pub fn parse(text: &str) -> Option<u64> {
    let (int, frac) = text.split_once('.')?;
    if int.is_empty() || int.len() > 10 || frac.len() != 2 {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(int.parse::<u64>().ok()? * 100 + frac.parse::<u64>().ok()?)
}

/// Centavos as `123.45`.
pub fn format(centavos: u64) -> String {
    format!("{}.{:02}", centavos / 100, centavos % 100)
}

/// The rule [`parse`] enforces, for error messages.
pub const RULE: &str = "must match \\d{1,10}\\.\\d{2} (reais with two decimals, e.g. 10.50)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_api_format() {
        assert_eq!(parse("0.01"), Some(1));
        assert_eq!(parse("123.45"), Some(12_345));
        assert_eq!(parse("9999999999.99"), Some(MAX_CENTAVOS));
        assert_eq!(parse("0.00"), Some(0));
        for bad in ["", "1", "1.5", "1.500", ".50", "-1.00", "1,00", "+1.00", "12345678901.00", " 1.00", "1.0a"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(format(12_345), "123.45");
        assert_eq!(format(5), "0.05");
        assert_eq!(parse(&format(MAX_CENTAVOS)), Some(MAX_CENTAVOS));
    }
}
