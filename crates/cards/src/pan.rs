//! Card numbers: BINs, the Luhn check digit, generation.

/// A BIN (issuer identification number): 6 to 8 digits.
pub fn valid_bin(bin: &str) -> bool {
    (6..=8).contains(&bin.len()) && bin.bytes().all(|b| b.is_ascii_digit())
}

/// The Luhn check digit for `body` (all digits but the last).
pub fn check_digit(body: &[u8]) -> u8 {
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    b'0' + ((10 - sum % 10) % 10) as u8
}

/// Whether `pan` is 12..=19 digits with a valid Luhn check digit.
pub fn valid(pan: &str) -> bool {
    let bytes = pan.as_bytes();
    (12..=19).contains(&bytes.len())
        && bytes.iter().all(u8::is_ascii_digit)
        && check_digit(&bytes[..bytes.len() - 1]) == bytes[bytes.len() - 1]
}

/// A 16-digit PAN: `bin`, then digits from `random` (one byte per digit, reduced without bias by
/// rejection in the caller's source), then the check digit.
pub fn generate(bin: &str, mut random_digit: impl FnMut() -> u8) -> String {
    assert!(valid_bin(bin), "the BIN was validated");
    let mut digits: Vec<u8> = bin.as_bytes().to_vec();
    while digits.len() < 15 {
        let d = random_digit();
        assert!(d < 10, "a decimal digit");
        digits.push(b'0' + d);
    }
    let check = check_digit(&digits);
    digits.push(check);
    String::from_utf8(digits).expect("ASCII digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_agrees_with_published_test_numbers() {
        for pan in ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "4012888888881881"] {
            assert!(valid(pan), "{pan}");
        }
        assert!(!valid("4111111111111112"));
        assert!(!valid("41111111111a1111"));
        assert!(!valid("41111111111"));
    }

    #[test]
    fn generated_numbers_keep_the_bin_and_pass_luhn() {
        let mut n = 0u8;
        let pan = generate("40000012", || {
            n = (n + 7) % 10;
            n
        });
        assert_eq!(pan.len(), 16);
        assert!(pan.starts_with("40000012") && valid(&pan), "{pan}");
        assert!(valid_bin("123456") && valid_bin("12345678"));
        assert!(!valid_bin("12345") && !valid_bin("123456789") && !valid_bin("12345a"));
    }
}
