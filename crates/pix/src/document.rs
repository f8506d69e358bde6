//! Brazilian taxpayer documents: CPF (persons, 11 digits) and CNPJ (companies, 14 characters; the
//! first 12 may be letters from July 2026, per Receita Federal's IN RFB 2.229/2024, the two check
//! digits stay numeric). Check digits are modulo 11; a character's value is its ASCII code − 48,
//! so digits keep their value and `A` is 17.

/// Why a document was refused, naming the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DocumentError {
    /// Wrong length after removing the punctuation `.`, `-`, `/`.
    Length {
        expected: usize,
        found: usize,
    },
    /// A character that is not allowed at that position.
    Character {
        position: usize,
    },
    /// Every digit the same (formally valid, never issued).
    Repeated,
    CheckDigits,
}

impl std::fmt::Display for DocumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DocumentError::Length { expected, found } => write!(f, "expected {expected} characters, found {found}"),
            DocumentError::Character { position } => write!(f, "character {} is not allowed there", position + 1),
            DocumentError::Repeated => f.write_str("all digits are the same"),
            DocumentError::CheckDigits => f.write_str("the check digits do not match"),
        }
    }
}

/// The document without punctuation, letters upper-cased.
pub fn normalize(text: &str) -> String {
    text.chars().filter(|c| !matches!(c, '.' | '-' | '/' | ' ')).map(|c| c.to_ascii_uppercase()).collect()
}

fn check_digit(values: &[u32], weights: &[u32]) -> u32 {
    let sum: u32 = values.iter().zip(weights).map(|(v, w)| v * w).sum();
    match sum % 11 {
        0 | 1 => 0,
        r => 11 - r,
    }
}

/// A valid CPF, normalized to 11 digits.
pub fn cpf(text: &str) -> Result<String, DocumentError> {
    let n = normalize(text);
    if n.len() != 11 {
        return Err(DocumentError::Length { expected: 11, found: n.chars().count() });
    }
    let digits: Vec<u32> = n
        .chars()
        .enumerate()
        .map(|(i, c)| c.to_digit(10).ok_or(DocumentError::Character { position: i }))
        .collect::<Result<_, _>>()?;
    if digits.iter().all(|d| *d == digits[0]) {
        return Err(DocumentError::Repeated);
    }
    let d1 = check_digit(&digits[..9], &[10, 9, 8, 7, 6, 5, 4, 3, 2]);
    let d2 = check_digit(&digits[..10], &[11, 10, 9, 8, 7, 6, 5, 4, 3, 2]);
    if digits[9] != d1 || digits[10] != d2 {
        return Err(DocumentError::CheckDigits);
    }
    Ok(n)
}

/// A valid CPF (11 characters once normalized) or CNPJ (any other length is judged as a CNPJ),
/// normalized, and whether it is a person's (CPF).
pub fn any(text: &str) -> Result<(String, bool), DocumentError> {
    if normalize(text).chars().count() == 11 {
        cpf(text).map(|d| (d, true))
    } else {
        cnpj(text).map(|d| (d, false))
    }
}

/// A valid CNPJ (numeric or alphanumeric), normalized to 14 characters.
pub fn cnpj(text: &str) -> Result<String, DocumentError> {
    let n = normalize(text);
    if n.chars().count() != 14 {
        return Err(DocumentError::Length { expected: 14, found: n.chars().count() });
    }
    let mut values = Vec::with_capacity(14);
    for (i, c) in n.chars().enumerate() {
        let ok = if i < 12 { c.is_ascii_digit() || c.is_ascii_uppercase() } else { c.is_ascii_digit() };
        if !ok {
            return Err(DocumentError::Character { position: i });
        }
        values.push(c as u32 - 48);
    }
    if values.iter().all(|v| *v == values[0]) {
        return Err(DocumentError::Repeated);
    }
    let d1 = check_digit(&values[..12], &[5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]);
    let d2 = check_digit(&values[..13], &[6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]);
    if values[12] != d1 || values[13] != d2 {
        return Err(DocumentError::CheckDigits);
    }
    Ok(n)
}
