//! BR Code: the Pix QR code payload ("Pix copia e cola"), an EMV QRCPS merchant-presented TLV
//! string. Layout and rules: `shared/spec/SOURCES.md` (BR Code) — `00`=`01`; `01` = `11` static /
//! `12` dynamic; a merchant account template (`26`..`51`) with GUI `br.gov.bcb.pix` holding a key
//! (`01`, ≤ 77), a description (`02`) or a URL without scheme (`25`, ≤ 77); `52` MCC; `53`=`986`;
//! `54` amount (≤ 13); `58`=`BR`; `59` name ≤ 25; `60` city ≤ 15; `61` postal code; `62`/`05` txid
//! (`***` or `[A-Za-z0-9]{1,25}`); `63` CRC16/CCITT-FALSE over everything up to and including
//! `6304`; at most 512 bytes; characters outside template `64` are printable ASCII.
//!
//! [`decode`] accepts what the rules allow, and a few departures payers' apps accept in the wild
//! (amounts like `10` or `0.9`, a postal code that is not 8 digits), reported as warnings.

use std::fmt;

/// The globally unique identifier of Pix in a merchant account template (compared ignoring case).
pub const PIX_GUI: &str = "br.gov.bcb.pix";
pub const PAYLOAD_LEN_MAX: usize = 512;
pub const KEY_LEN_MAX: usize = 77;
pub const URL_LEN_MAX: usize = 77;
pub const NAME_LEN_MAX: usize = 25;
pub const CITY_LEN_MAX: usize = 15;
pub const TXID_LEN_MAX: usize = 25;
pub const AMOUNT_LEN_MAX: usize = 13;

/// A field's value: text, or (for templates) its sub-fields in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Template(Vec<(String, String)>),
}

/// Why a payload was refused: the field (`54`, `26.01`, or `payload` for the whole) and the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrCodeError {
    pub field: String,
    pub rule: String,
}

impl BrCodeError {
    fn new(field: impl Into<String>, rule: impl Into<String>) -> BrCodeError {
        BrCodeError { field: field.into(), rule: rule.into() }
    }
}

impl fmt::Display for BrCodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field {}: {}", self.field, self.rule)
    }
}

impl std::error::Error for BrCodeError {}

/// Point of initiation (`01`): a static code may be paid many times, a dynamic one points at a
/// charge by URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initiation {
    Static,
    Dynamic,
}

/// A decoded BR Code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrCode {
    /// Every field in payload order (templates with their sub-fields), the CRC included.
    pub fields: Vec<(String, Value)>,
    pub initiation: Option<Initiation>,
    /// The Pix key of a static code (a code may carry both a key and a URL: the key is paid).
    pub key: Option<String>,
    /// The payer-facing description (`26.02`).
    pub info: Option<String>,
    /// The charge's location (without scheme) of a dynamic code.
    pub url: Option<String>,
    pub mcc: String,
    /// In centavos; `None` when the payer chooses.
    pub amount: Option<u64>,
    pub name: String,
    pub city: String,
    pub postal_code: Option<String>,
    /// `None` when absent or `***` (no txid).
    pub txid: Option<String>,
    pub crc: u16,
    /// Departures from the strict rules that were accepted.
    pub warnings: Vec<BrCodeError>,
}

/// CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, no reflection, no final XOR.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

fn is_template(id: u8) -> bool {
    matches!(id, 26..=51 | 62 | 64 | 80..=99)
}

/// Splits `text` into (id, value) pairs; `within` names the enclosing field in errors.
fn split(text: &str, within: &str) -> Result<Vec<(String, String)>, BrCodeError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let at = |what: &str| {
            let field = match out.last() {
                Some((id, _)) if within.is_empty() => format!("after {id}"),
                Some((id, _)) => format!("{within}, after {id}"),
                None if within.is_empty() => "payload".to_owned(),
                None => within.to_owned(),
            };
            BrCodeError::new(field, what.to_owned())
        };
        if chars.len() - i < 4 {
            return Err(at("truncated: a field needs a 2-digit id and a 2-digit length"));
        }
        let head: String = chars[i..i + 4].iter().collect();
        if !head.bytes().all(|b| b.is_ascii_digit()) {
            return Err(at(&format!("`{head}` is not a 2-digit id followed by a 2-digit length")));
        }
        let id = head[..2].to_owned();
        let len: usize = head[2..].parse().expect("two ASCII digits");
        let name = if within.is_empty() { id.clone() } else { format!("{within}.{id}") };
        if len == 0 {
            return Err(BrCodeError::new(name, "a field may not be empty"));
        }
        if chars.len() - i - 4 < len {
            return Err(BrCodeError::new(
                name,
                format!("declares {len} characters but only {} remain", chars.len() - i - 4),
            ));
        }
        if out.iter().any(|(seen, _)| *seen == id) {
            return Err(BrCodeError::new(name, "appears more than once"));
        }
        out.push((id, chars[i + 4..i + 4 + len].iter().collect()));
        i += 4 + len;
    }
    Ok(out)
}

fn printable(field: &str, text: &str) -> Result<(), BrCodeError> {
    match text.chars().find(|c| !(' '..='~').contains(c)) {
        None => Ok(()),
        Some(c) => Err(BrCodeError::new(field, format!("`{c}` is outside the EMV character set (printable ASCII)"))),
    }
}

fn text<'a>(fields: &'a [(String, Value)], id: &str) -> Option<&'a str> {
    fields.iter().find(|(i, _)| i == id).and_then(|(_, v)| match v {
        Value::Text(t) => Some(t.as_str()),
        Value::Template(_) => None,
    })
}

fn sub<'a>(subs: &'a [(String, String)], id: &str) -> Option<&'a str> {
    subs.iter().find(|(i, _)| i == id).map(|(_, v)| v.as_str())
}

/// Checks a txid as BR Codes carry it (`62.05`): `***` (none) or `[A-Za-z0-9]{1,25}`.
pub fn valid_txid(txid: &str) -> bool {
    txid == "***" || (txid.len() <= TXID_LEN_MAX && !txid.is_empty() && txid.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Parses an amount field: strict `\d+\.\d{2}`; also, with a warning, digits with no or fewer
/// decimals (`10`, `10.`, `0.9`).
fn amount(text: &str, warnings: &mut Vec<BrCodeError>) -> Result<u64, BrCodeError> {
    let bad = || BrCodeError::new("54", "the amount must be digits with a `.` and two decimals, at most 13 characters");
    if text.len() > AMOUNT_LEN_MAX || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.contains('.') || frac.len() > 2 || (int.is_empty() && frac.is_empty()) {
        return Err(bad());
    }
    if int.is_empty() || frac.len() != 2 {
        warnings.push(BrCodeError::new("54", format!("`{text}` is not written with two decimals")));
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
    let frac: u64 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    let centavos = int.checked_mul(100).and_then(|c| c.checked_add(frac)).ok_or_else(bad)?;
    if centavos == 0 {
        return Err(BrCodeError::new(
            "54",
            "the amount must be greater than zero (omit the field to let the payer choose)",
        ));
    }
    Ok(centavos)
}

/// Decodes and checks a payload.
pub fn decode(payload: &str) -> Result<BrCode, BrCodeError> {
    if payload.len() > PAYLOAD_LEN_MAX {
        return Err(BrCodeError::new(
            "payload",
            format!("{} bytes; a BR Code has at most {PAYLOAD_LEN_MAX}", payload.len()),
        ));
    }
    let top = split(payload, "")?;
    match top.first() {
        Some((id, v)) if id == "00" && v == "01" => {}
        Some((id, _)) if id == "00" => return Err(BrCodeError::new("00", "the payload format indicator must be `01`")),
        _ => return Err(BrCodeError::new("00", "the payload must start with the format indicator `000201`")),
    }
    match top.last() {
        Some((id, v)) if id == "63" && v.len() == 4 => {}
        Some((id, _)) if id == "63" => return Err(BrCodeError::new("63", "the CRC must be 4 hexadecimal characters")),
        _ => return Err(BrCodeError::new("63", "the payload must end with the CRC field `6304`")),
    }
    // The CRC covers everything before its 4 characters, `6304` included.
    let crc_text = &top.last().expect("checked").1;
    let crc = u16::from_str_radix(crc_text, 16)
        .ok()
        .filter(|_| crc_text.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| BrCodeError::new("63", "the CRC must be 4 hexadecimal characters"))?;
    let covered = &payload.as_bytes()[..payload.len() - 4];
    let expected = crc16(covered);
    if crc != expected {
        return Err(BrCodeError::new(
            "63",
            format!("CRC16 mismatch: the payload says {crc_text}, its content gives {expected:04X}"),
        ));
    }

    let mut fields = Vec::with_capacity(top.len());
    for (id, value) in top {
        let n: u8 = id.parse().expect("two ASCII digits");
        if n != 64 {
            printable(&id, &value)?;
        }
        let value = if is_template(n) { Value::Template(split(&value, &id)?) } else { Value::Text(value) };
        fields.push((id, value));
    }
    let mut warnings = Vec::new();

    let initiation = match text(&fields, "01") {
        None => None,
        Some("11") => Some(Initiation::Static),
        Some("12") => Some(Initiation::Dynamic),
        Some(_) => {
            return Err(BrCodeError::new("01", "the point of initiation must be `11` (static) or `12` (dynamic)"))
        }
    };

    // The Pix template sits among the merchant account templates (26-51); some issuers carry
    // the URL in a second template with the same GUI among 80-99 (Stark Bank's dynamic codes).
    let pix_templates: Vec<(&str, &[(String, String)])> = fields
        .iter()
        .filter_map(|(id, v)| match v {
            Value::Template(subs) if matches!(id.parse::<u8>(), Ok(26..=51 | 80..=99)) => {
                sub(subs, "00").filter(|gui| gui.eq_ignore_ascii_case(PIX_GUI)).map(|_| (id.as_str(), subs.as_slice()))
            }
            _ => None,
        })
        .collect();
    let Some(&(pix_id, _)) = pix_templates.iter().find(|(id, _)| id.as_bytes()[0] < b'8') else {
        return Err(BrCodeError::new("26", format!("no merchant account template (26-51) with the GUI `{PIX_GUI}`")));
    };
    let found = |sub_id: &str| {
        pix_templates.iter().find_map(|(id, subs)| sub(subs, sub_id).map(|v| (format!("{id}.{sub_id}"), v.to_owned())))
    };
    let (key_at, key) = found("01").unzip();
    let (url_at, url) = found("25").unzip();
    let (key_at, url_at) = (key_at.unwrap_or_default(), url_at.unwrap_or_default());
    let info = found("02").map(|(_, v)| v);
    if let Some(k) = &key {
        if k.chars().count() > KEY_LEN_MAX {
            return Err(BrCodeError::new(key_at, format!("the key has at most {KEY_LEN_MAX} characters")));
        }
    }
    if let Some(u) = &url {
        if u.chars().count() > URL_LEN_MAX {
            return Err(BrCodeError::new(url_at, format!("the URL has at most {URL_LEN_MAX} characters")));
        }
        if u.contains("://") {
            return Err(BrCodeError::new(url_at, "the URL is written without its scheme (no `https://`)"));
        }
    }
    if key.is_none() && url.is_none() {
        return Err(BrCodeError::new(pix_id, "the Pix template needs a key (01) or a URL (25)"));
    }
    if initiation == Some(Initiation::Dynamic) && url.is_none() {
        return Err(BrCodeError::new("01", "a dynamic BR Code (`12`) carries the charge's URL (25), not a key"));
    }

    let mcc = text(&fields, "52").ok_or_else(|| BrCodeError::new("52", "the merchant category code is required"))?;
    if mcc.len() != 4 || !mcc.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BrCodeError::new("52", "the merchant category code is 4 digits"));
    }
    if text(&fields, "53") != Some("986") {
        return Err(BrCodeError::new("53", "the currency must be `986` (BRL)"));
    }
    let amount = text(&fields, "54").map(|a| amount(a, &mut warnings)).transpose()?;
    if text(&fields, "58") != Some("BR") {
        return Err(BrCodeError::new("58", "the country code must be `BR`"));
    }
    let name = text(&fields, "59").ok_or_else(|| BrCodeError::new("59", "the merchant name is required"))?;
    if name.len() > NAME_LEN_MAX {
        return Err(BrCodeError::new("59", format!("the merchant name has at most {NAME_LEN_MAX} characters")));
    }
    let city = text(&fields, "60").ok_or_else(|| BrCodeError::new("60", "the merchant city is required"))?;
    if city.len() > CITY_LEN_MAX {
        return Err(BrCodeError::new("60", format!("the merchant city has at most {CITY_LEN_MAX} characters")));
    }
    let postal_code = text(&fields, "61").map(str::to_owned);
    if let Some(p) = &postal_code {
        if p.len() > 10 {
            return Err(BrCodeError::new("61", "the postal code has at most 10 characters"));
        }
        if p.len() != 8 || !p.bytes().all(|b| b.is_ascii_digit()) {
            warnings.push(BrCodeError::new("61", "a Brazilian postal code (CEP) is 8 digits"));
        }
    }
    let mut txid = None;
    if let Some((_, Value::Template(extra))) = fields.iter().find(|(id, _)| id == "62") {
        if let Some(t) = sub(extra, "05") {
            // Payers accept any EMV characters here (the Central Bank's own manual shows
            // `RP12345678-2019`); what rtpay writes is letters and digits only (see `encode`).
            if t.len() > TXID_LEN_MAX {
                return Err(BrCodeError::new("62.05", format!("the txid has at most {TXID_LEN_MAX} characters")));
            }
            txid = (t != "***").then(|| t.to_owned());
        }
    }
    let (name, city, mcc) = (name.to_owned(), city.to_owned(), mcc.to_owned());
    Ok(BrCode { fields, initiation, key, info, url, mcc, amount, name, city, postal_code, txid, crc, warnings })
}

/// What to put in a BR Code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// The receiver's Pix key (static code), or
    pub key: Option<String>,
    /// the charge's location without scheme (dynamic code).
    pub url: Option<String>,
    pub info: Option<String>,
    /// Centavos; `None`: the payer chooses.
    pub amount: Option<u64>,
    pub name: String,
    pub city: String,
    pub txid: Option<String>,
}

/// `text` in the EMV character set: Portuguese accented letters lose their accent; anything else
/// outside printable ASCII is refused.
pub fn emv_text(field: &str, text: &str) -> Result<String, BrCodeError> {
    let mut out = String::with_capacity(text.len());
    for c in text.trim().chars() {
        let plain = match c {
            'á' | 'à' | 'â' | 'ã' | 'ä' => 'a',
            'Á' | 'À' | 'Â' | 'Ã' | 'Ä' => 'A',
            'é' | 'è' | 'ê' | 'ë' => 'e',
            'É' | 'È' | 'Ê' | 'Ë' => 'E',
            'í' | 'ì' | 'î' | 'ï' => 'i',
            'Í' | 'Ì' | 'Î' | 'Ï' => 'I',
            'ó' | 'ò' | 'ô' | 'õ' | 'ö' => 'o',
            'Ó' | 'Ò' | 'Ô' | 'Õ' | 'Ö' => 'O',
            'ú' | 'ù' | 'û' | 'ü' => 'u',
            'Ú' | 'Ù' | 'Û' | 'Ü' => 'U',
            'ç' => 'c',
            'Ç' => 'C',
            'ñ' => 'n',
            'Ñ' => 'N',
            c if (' '..='~').contains(&c) => c,
            c => {
                return Err(BrCodeError::new(
                    field,
                    format!("`{c}` cannot be written in a BR Code (printable ASCII only)"),
                ))
            }
        };
        out.push(plain);
    }
    Ok(out)
}

fn push(out: &mut String, id: &str, value: &str) {
    out.push_str(id);
    out.push_str(&format!("{:02}", value.chars().count()));
    out.push_str(value);
}

/// Encodes a BR Code (static with a key, dynamic with a URL), then checks it with [`decode`]: what
/// this returns decodes without warnings.
pub fn encode(spec: &Spec) -> Result<String, BrCodeError> {
    let mut account = String::new();
    push(&mut account, "00", PIX_GUI);
    match (&spec.key, &spec.url) {
        (Some(key), None) => push(&mut account, "01", key),
        (None, Some(url)) => push(&mut account, "25", url),
        _ => return Err(BrCodeError::new("26", "a BR Code carries a key or a URL, exactly one")),
    }
    if let Some(info) = spec.info.as_deref().filter(|i| !i.trim().is_empty()) {
        push(&mut account, "02", &emv_text("26.02", info)?);
    }
    if account.chars().count() > 99 {
        return Err(BrCodeError::new("26", "the key, URL and description together exceed 99 characters"));
    }
    let name = emv_text("59", &spec.name)?;
    let city = emv_text("60", &spec.city)?;
    for (field, value, max) in [("59", &name, NAME_LEN_MAX), ("60", &city, CITY_LEN_MAX)] {
        if value.is_empty() || value.len() > max {
            return Err(BrCodeError::new(field, format!("must have 1 to {max} characters")));
        }
    }
    let txid = spec.txid.clone().unwrap_or_else(|| "***".to_owned());
    if !valid_txid(&txid) {
        return Err(BrCodeError::new("62.05", "the txid must be `***` or 1 to 25 letters and digits"));
    }
    let mut out = String::new();
    push(&mut out, "00", "01");
    push(&mut out, "01", if spec.url.is_some() { "12" } else { "11" });
    push(&mut out, "26", &account);
    push(&mut out, "52", "0000");
    push(&mut out, "53", "986");
    if let Some(a) = spec.amount {
        if a == 0 {
            return Err(BrCodeError::new("54", "the amount must be greater than zero"));
        }
        let text = crate::amount::format(a);
        if text.len() > AMOUNT_LEN_MAX {
            return Err(BrCodeError::new("54", format!("the amount has at most {AMOUNT_LEN_MAX} characters")));
        }
        push(&mut out, "54", &text);
    }
    push(&mut out, "58", "BR");
    push(&mut out, "59", &name);
    push(&mut out, "60", &city);
    let mut extra = String::new();
    push(&mut extra, "05", &txid);
    push(&mut out, "62", &extra);
    out.push_str("6304");
    out.push_str(&format!("{:04X}", crc16(out.as_bytes())));
    let decoded = decode(&out)?;
    debug_assert!(decoded.warnings.is_empty());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_ccitt_false_check_value() {
        assert_eq!(crc16(b"123456789"), 0x29B1);
    }

    #[test]
    fn encodes_what_it_decodes() {
        let spec = Spec {
            key: Some("fulano@example.com".into()),
            amount: Some(1050),
            name: "João da Silva".into(),
            city: "São Paulo".into(),
            txid: Some("PEDIDO123".into()),
            ..Spec::default()
        };
        let payload = encode(&spec).unwrap();
        let code = decode(&payload).unwrap();
        assert_eq!(code.key.as_deref(), Some("fulano@example.com"));
        assert_eq!(code.amount, Some(1050));
        assert_eq!(code.name, "Joao da Silva");
        assert_eq!(code.city, "Sao Paulo");
        assert_eq!(code.txid.as_deref(), Some("PEDIDO123"));
        assert_eq!(code.initiation, Some(Initiation::Static));
        assert!(code.warnings.is_empty());
    }

    #[test]
    fn a_blank_description_is_left_out() {
        let spec = Spec {
            key: Some("a@a.com".into()),
            info: Some("  ".into()),
            name: "A".into(),
            city: "a".into(),
            ..Spec::default()
        };
        let payload = encode(&spec).unwrap();
        assert!(!payload.contains("0200"), "{payload}");
        assert_eq!(decode(&payload).unwrap().info, None);
    }

    #[test]
    fn refuses_what_cannot_be_encoded() {
        let base = Spec { key: Some("k".into()), name: "N".into(), city: "C".into(), ..Spec::default() };
        let err = |s: Spec| encode(&s).unwrap_err().field;
        assert_eq!(err(Spec { name: "x".repeat(26), ..base.clone() }), "59");
        assert_eq!(err(Spec { city: "日本".into(), ..base.clone() }), "60");
        assert_eq!(err(Spec { txid: Some("has-dash".into()), ..base.clone() }), "62.05");
        assert_eq!(err(Spec { url: Some("u".into()), ..base.clone() }), "26");
        assert_eq!(err(Spec { amount: Some(0), ..base.clone() }), "54");
    }
}
