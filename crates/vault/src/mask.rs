//! What outputs show of sensitive values: a card number as its BIN (first 6) and last 4, a
//! document with the middle visible only, the way Brazilian services print them.

/// `4111111111111111` → `411111******1111`. Numbers too short to keep 10 digits hidden-or-shown
/// safely show only their last 4.
pub fn pan(pan: &str) -> String {
    let digits: Vec<char> = pan.chars().filter(char::is_ascii_digit).collect();
    let n = digits.len();
    if n < 13 {
        return format!(
            "{}{}",
            "*".repeat(n.saturating_sub(4)),
            digits[n.saturating_sub(4)..].iter().collect::<String>()
        );
    }
    let bin: String = digits[..6].iter().collect();
    let last4: String = digits[n - 4..].iter().collect();
    format!("{bin}{}{last4}", "*".repeat(n - 10))
}

/// CPF `52998224725` → `***.982.247-**`; CNPJ `11222333000181` → `**.222.333/0001-**`. Other
/// lengths: all but the last 2 hidden.
pub fn document(normalized: &str) -> String {
    let c: Vec<char> = normalized.chars().collect();
    let s = |a: usize, b: usize| c[a..b].iter().collect::<String>();
    match c.len() {
        11 => format!("***.{}.{}-**", s(3, 6), s(6, 9)),
        14 => format!("**.{}.{}/{}-**", s(2, 5), s(5, 8), s(8, 12)),
        n => format!("{}{}", "*".repeat(n.saturating_sub(2)), s(n.saturating_sub(2), n)),
    }
}
