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

/// Whether `text` holds something that may be a card number (see [`pan_spans`]), and so must not
/// be logged or stored in clear.
pub fn holds_pan(text: &str) -> bool {
    !pan_spans(text).is_empty()
}

/// Where `text` may hold card numbers, as byte ranges in order:
/// - a run of digits with a window of 13–19 digits that passes the Luhn check (the whole run);
/// - a card number as printed: a group of 4 digits at the start of a word, then groups of 3–6
///   digits each after one space or one dash (the same throughout), whose first 13–19 digits,
///   taken as whole groups, pass the Luhn check (`4111 1111 1111 1111`, `3782-822463-10005`).
///   A UUID's groups never start one: they follow a dash or a hex digit.
pub fn pan_spans(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
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
        if (13..=19.min(run.len())).any(|len| run.windows(len).any(luhn)) {
            spans.push((start, i));
            continue;
        }
        if let Some(end) = printed_pan(bytes, start) {
            spans.push((start, end));
            i = end;
        }
    }
    spans
}

/// The end of a card number printed in groups starting at `start` (see [`pan_spans`]).
fn printed_pan(bytes: &[u8], start: usize) -> Option<usize> {
    let word_start = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'-');
    if !word_start || bytes.get(start + 4).is_none_or(|b| b.is_ascii_digit()) {
        return None;
    }
    let separator = *bytes.get(start + 4).filter(|b| **b == b' ' || **b == b'-')?;
    let mut digits: Vec<u8> = bytes[start..start + 4].to_vec();
    let mut at = start + 4;
    let mut found = None;
    while bytes.get(at) == Some(&separator) {
        let group_start = at + 1;
        let mut end = group_start;
        while end < bytes.len() && bytes[end].is_ascii_digit() {
            end += 1;
        }
        if !(3..=6).contains(&(end - group_start)) || digits.len() + (end - group_start) > 19 {
            break;
        }
        digits.extend_from_slice(&bytes[group_start..end]);
        at = end;
        if digits.len() >= 13 && luhn(&digits) {
            found = Some(end);
        }
    }
    found
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

/// `text` with everything that could be a card number (see [`pan_spans`]) shown as BIN + last 4.
pub fn redact_pans(text: &str) -> String {
    let spans = pan_spans(text);
    if spans.is_empty() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (start, end) in spans {
        out.push_str(&text[copied..start]);
        out.push_str(&pan(&text[start..end]));
        copied = end;
    }
    out.push_str(&text[copied..]);
    out
}
