//! Pix keys as the DICT accepts them: CPF, CNPJ (numeric or alphanumeric), e-mail, phone, EVP.
//! Rules: `shared/spec/SOURCES.md` and the DICT API (bacen/pix-dict-api): an e-mail key has at most
//! 77 characters, a phone key is E.164 with `+55`, an EVP is a random UUID.

use std::fmt;

use crate::document;

pub const EMAIL_LEN_MAX: usize = 77;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    Cpf,
    Cnpj,
    Email,
    Phone,
    Evp,
}

impl KeyType {
    pub fn parse(text: &str) -> Option<KeyType> {
        Some(match text {
            "cpf" => KeyType::Cpf,
            "cnpj" => KeyType::Cnpj,
            "email" => KeyType::Email,
            "phone" => KeyType::Phone,
            "evp" => KeyType::Evp,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Cpf => "cpf",
            KeyType::Cnpj => "cnpj",
            KeyType::Email => "email",
            KeyType::Phone => "phone",
            KeyType::Evp => "evp",
        }
    }
}

/// Why a key was refused: the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// A valid key in its normal form (the form the DICT stores and compares).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PixKey {
    pub kind: KeyType,
    pub value: String,
}

impl PixKey {
    /// Checks and normalizes `text` as a key of `kind`: documents without punctuation, e-mail in
    /// lower case, EVP in lower case.
    pub fn parse(kind: KeyType, text: &str) -> Result<PixKey, KeyError> {
        let value = match kind {
            KeyType::Cpf => document::cpf(text).map_err(|e| KeyError(format!("not a valid CPF: {e}")))?,
            KeyType::Cnpj => document::cnpj(text).map_err(|e| KeyError(format!("not a valid CNPJ: {e}")))?,
            KeyType::Email => email(text)?,
            KeyType::Phone => phone(text)?,
            KeyType::Evp => evp(text)?,
        };
        Ok(PixKey { kind, value })
    }

    /// Recognizes a key written without its type (paying by key): `…@…` e-mail (first: an e-mail's
    /// local part may begin with `+`), `+…` phone, a UUID, 11 digits CPF, 14 characters CNPJ.
    pub fn infer(text: &str) -> Result<PixKey, KeyError> {
        let t = text.trim();
        let kind = if t.contains('@') {
            KeyType::Email
        } else if t.starts_with('+') {
            KeyType::Phone
        } else if t.len() == 36 && t.bytes().filter(|b| *b == b'-').count() == 4 {
            KeyType::Evp
        } else if t.len() == 11 && t.bytes().all(|b| b.is_ascii_digit()) {
            KeyType::Cpf
        } else if t.len() == 14 && t.bytes().all(|b| b.is_ascii_alphanumeric()) {
            KeyType::Cnpj
        } else {
            return Err(KeyError(
                "not a Pix key: expected +55 phone, e-mail, UUID (EVP), 11-digit CPF or 14-character CNPJ".into(),
            ));
        };
        PixKey::parse(kind, t)
    }
}

fn email(text: &str) -> Result<String, KeyError> {
    let t = text.trim().to_ascii_lowercase();
    if t.chars().count() > EMAIL_LEN_MAX {
        return Err(KeyError(format!("an e-mail key has at most {EMAIL_LEN_MAX} characters")));
    }
    let Some((local, domain)) = t.split_once('@') else {
        return Err(KeyError("an e-mail key has the form local@domain".into()));
    };
    let local_ok = !local.is_empty()
        && local.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b))
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..");
    if !local_ok {
        return Err(KeyError("the part before `@` has characters an e-mail address may not have".into()));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !domain_ok {
        return Err(KeyError("the domain after `@` is not a valid host name with a dot".into()));
    }
    Ok(t)
}

fn phone(text: &str) -> Result<String, KeyError> {
    let t: String = text.trim().chars().filter(|c| !matches!(c, ' ' | '-' | '(' | ')')).collect();
    let digits = t.strip_prefix("+55").ok_or_else(|| KeyError("a phone key starts with +55 (E.164)".into()))?;
    let b = digits.as_bytes();
    // Area code 11-99 without zeros, then a 9-digit mobile number starting with 9.
    let ok = b.len() == 11 && b.iter().all(u8::is_ascii_digit) && b[0] != b'0' && b[1] != b'0' && b[2] == b'9';
    if !ok {
        return Err(KeyError(
            "a phone key is +55, a 2-digit area code and a 9-digit mobile number starting with 9".into(),
        ));
    }
    Ok(t)
}

fn evp(text: &str) -> Result<String, KeyError> {
    let t = text.trim().to_ascii_lowercase();
    let b = t.as_bytes();
    let ok = b.len() == 36
        && b.iter()
            .enumerate()
            .all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { *c == b'-' } else { c.is_ascii_hexdigit() });
    if !ok {
        return Err(KeyError("an EVP key is a UUID (8-4-4-4-12 hexadecimal digits)".into()));
    }
    Ok(t)
}

/// An EVP key from 16 random bytes: a version 4 UUID in lower case.
pub fn new_evp(random: [u8; 16]) -> PixKey {
    let mut b = random;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let value = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);
    PixKey { kind: KeyType::Evp, value }
}

/// A person's name as others may see it: the first name, then each other word's initial
/// (`Maria Souza` → `Maria S.`). Companies' names are shown in full.
pub fn mask_person_name(name: &str) -> String {
    let mut words = name.split_whitespace();
    let mut out = words.next().unwrap_or("").to_owned();
    for w in words {
        if let Some(c) = w.chars().next() {
            out.push(' ');
            out.push(c);
            out.push('.');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_normalizes_and_refuses() {
        fn ok(k: KeyType, t: &str) -> Result<String, KeyError> {
            PixKey::parse(k, t).map(|p| p.value)
        }
        assert_eq!(ok(KeyType::Cpf, "529.982.247-25"), Ok("52998224725".into()));
        assert!(ok(KeyType::Cpf, "529.982.247-24").is_err());
        assert_eq!(ok(KeyType::Cnpj, "12.ABC.345/01DE-35"), Ok("12ABC34501DE35".into()));
        assert_eq!(ok(KeyType::Email, " Fulano.Tal@Example.COM "), Ok("fulano.tal@example.com".into()));
        for bad in ["no-at", "a@b", "a..b@x.com", "a@-x.com", ".a@x.com", "a b@x.com"] {
            assert!(ok(KeyType::Email, bad).is_err(), "{bad}");
        }
        let long = format!("{}@example.com", "a".repeat(66));
        assert!(ok(KeyType::Email, &long).is_err(), "78 characters");
        assert!(ok(KeyType::Email, &format!("{}@example.com", "a".repeat(65))).is_ok(), "77 characters");
        assert_eq!(ok(KeyType::Phone, "+55 (11) 98765-4321"), Ok("+5511987654321".into()));
        for bad in ["11987654321", "+5511887654321", "+551198765432", "+14155550100", "+5501987654321"] {
            assert!(ok(KeyType::Phone, bad).is_err(), "{bad}");
        }
        assert_eq!(
            ok(KeyType::Evp, "123E4567-E89B-42D3-A456-426614174000"),
            Ok("123e4567-e89b-42d3-a456-426614174000".into())
        );
        assert!(ok(KeyType::Evp, "123e4567e89b42d3a456426614174000").is_err());
    }

    #[test]
    fn infers_the_type() {
        assert_eq!(PixKey::infer("52998224725").unwrap().kind, KeyType::Cpf);
        assert_eq!(PixKey::infer("11222333000181").unwrap().kind, KeyType::Cnpj);
        assert_eq!(PixKey::infer("+5511987654321").unwrap().kind, KeyType::Phone);
        assert_eq!(PixKey::infer("a@b.co").unwrap().kind, KeyType::Email);
        // An e-mail key may begin with `+`: registered as one, it is found as one.
        let plus = PixKey::parse(KeyType::Email, "+promo@example.com").unwrap();
        assert_eq!(PixKey::infer("+promo@example.com").unwrap(), plus);
        assert_eq!(PixKey::infer("123e4567-e89b-42d3-a456-426614174000").unwrap().kind, KeyType::Evp);
        assert!(PixKey::infer("hello").is_err());
    }

    #[test]
    fn evp_is_a_version_4_uuid() {
        let k = new_evp([0xff; 16]);
        assert_eq!(k.value, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(PixKey::parse(KeyType::Evp, &k.value).unwrap(), k);
        assert_eq!(mask_person_name("Maria  da Souza"), "Maria d. S.");
    }
}
