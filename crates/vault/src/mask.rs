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

/// Whether `text` holds a run of 13–19 digits that passes the Luhn check: something that may be a
/// card number, and so must not be logged or stored in clear.
pub fn holds_pan(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let run = &bytes[start..i];
        for len in 13..=19.min(run.len()) {
            for window in run.windows(len) {
                if luhn(window) {
                    return true;
                }
            }
        }
    }
    false
}

/// The Luhn check over ASCII digits.
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// `text` with every digit run that could be a card number shown as BIN + last 4.
pub fn redact_pans(text: &str) -> String {
    if !holds_pan(text) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 13 && holds_pan(run) {
            out.push_str(&pan(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}
