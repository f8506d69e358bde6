//! ISO 8583 (1987) messages in the field layout of PyPI `pyiso8583`'s `default_ascii` spec:
//! everything ASCII, the MTI as 4 digits, bitmaps as 16 hex characters (a secondary bitmap when
//! bit 1 is set), fixed fields exactly their length, variable fields after a 2- or 3-digit
//! length. On the wire (TCP) each message follows a 2-byte big-endian length.

use std::collections::BTreeMap;

/// (length digits: 0 fixed, 2 LLVAR, 3 LLLVAR; the fixed length or the maximum) per field,
/// indexed by field number (0 and 1 are the MTI and the secondary bitmap, not fields).
const LAYOUT: [(u8, u16); 129] = [
    (0, 0),
    (0, 0),
    (2, 19),
    (0, 6),
    (0, 12),
    (0, 12),
    (0, 12),
    (0, 10),
    (0, 8),
    (0, 8),
    (0, 8),
    (0, 6),
    (0, 6),
    (0, 4),
    (0, 4),
    (0, 4),
    (0, 4),
    (0, 4),
    (0, 4),
    (0, 3),
    (0, 3),
    (0, 3),
    (0, 3),
    (0, 3),
    (0, 3),
    (0, 2),
    (0, 2),
    (0, 1),
    (0, 9),
    (0, 9),
    (0, 9),
    (0, 9),
    (2, 11),
    (2, 11),
    (2, 28),
    (2, 37),
    (3, 104),
    (0, 12),
    (0, 6),
    (0, 2),
    (0, 3),
    (0, 8),
    (0, 15),
    (0, 40),
    (2, 25),
    (2, 76),
    (3, 999),
    (3, 999),
    (3, 999),
    (0, 3),
    (0, 3),
    (0, 3),
    (0, 16),
    (0, 16),
    (3, 240),
    (3, 510),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (0, 16),
    (0, 16),
    (0, 1),
    (0, 2),
    (0, 3),
    (0, 3),
    (0, 3),
    (0, 4),
    (0, 4),
    (0, 6),
    (0, 10),
    (0, 10),
    (0, 10),
    (0, 10),
    (0, 10),
    (0, 10),
    (0, 10),
    (0, 10),
    (0, 12),
    (0, 12),
    (0, 12),
    (0, 12),
    (0, 16),
    (0, 16),
    (0, 16),
    (0, 16),
    (0, 42),
    (0, 1),
    (0, 2),
    (0, 5),
    (0, 7),
    (0, 42),
    (0, 16),
    (0, 17),
    (0, 25),
    (2, 11),
    (2, 11),
    (2, 17),
    (2, 28),
    (2, 28),
    (3, 100),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (3, 999),
    (0, 16),
];

/// Why a frame is not a message: the field, when one is to blame, and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatError {
    pub field: Option<u8>,
    pub reason: &'static str,
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.field {
            Some(n) => write!(f, "field {n}: {}", self.reason),
            None => f.write_str(self.reason),
        }
    }
}

fn fail<T>(field: Option<u8>, reason: &'static str) -> Result<T, FormatError> {
    Err(FormatError { field, reason })
}

/// A message: its type and its data elements (2..=128), each as the ASCII text on the wire.
/// `Debug` masks field 2 (the PAN) and leaves out the other card data: 14 (expiry), 34 (an
/// extended PAN), 35, 36 and 45 (track data), 52 (PIN block), 55 (chip data, which can carry
/// the track 2 equivalent, tag 57), and 48, 60–63 and 126, where some networks carry the CVV2.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub mti: String,
    fields: BTreeMap<u8, String>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        map.entry(&"mti", &self.mti);
        for (n, v) in &self.fields {
            match n {
                2 => map.entry(n, &mask(v)),
                14 | 34 | 35 | 36 | 45 | 48 | 52 | 55 | 60..=63 | 126 => map.entry(n, &"<withheld>"),
                _ => map.entry(n, v),
            };
        }
        map.finish()
    }
}

/// BIN (first 6) + last 4 of a card number; anything shorter is withheld whole.
fn mask(pan: &str) -> String {
    if pan.len() < 13 {
        return "<withheld>".into();
    }
    format!("{}{}{}", &pan[..6], "*".repeat(pan.len() - 10), &pan[pan.len() - 4..])
}

impl Message {
    pub fn new(mti: &str) -> Message {
        Message { mti: mti.to_owned(), fields: BTreeMap::new() }
    }

    pub fn get(&self, field: u8) -> Option<&str> {
        self.fields.get(&field).map(String::as_str)
    }

    pub fn set(&mut self, field: u8, value: impl Into<String>) -> &mut Message {
        assert!((2..=128).contains(&field), "fields are numbered 2..=128");
        self.fields.insert(field, value.into());
        self
    }

    pub fn remove(&mut self, field: u8) -> Option<String> {
        self.fields.remove(&field)
    }

    pub fn fields(&self) -> impl Iterator<Item = (u8, &str)> {
        self.fields.iter().map(|(n, v)| (*n, v.as_str()))
    }

    /// The wire form, without the length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        if self.mti.len() != 4 || !self.mti.bytes().all(|b| b.is_ascii_digit()) {
            return fail(None, "the MTI must be 4 digits");
        }
        let mut bitmap = [0u8; 16];
        for n in self.fields.keys() {
            let i = usize::from(*n - 1);
            bitmap[i / 8] |= 0x80 >> (i % 8);
        }
        let secondary = self.fields.keys().any(|n| *n > 64);
        if secondary {
            bitmap[0] |= 0x80;
        }
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(self.mti.as_bytes());
        let bitmap_len = if secondary { 16 } else { 8 };
        for byte in &bitmap[..bitmap_len] {
            out.extend_from_slice(format!("{byte:02X}").as_bytes());
        }
        for (n, value) in &self.fields {
            let (digits, len) = LAYOUT[usize::from(*n)];
            if !value.is_ascii() {
                return fail(Some(*n), "not ASCII");
            }
            match digits {
                0 if value.len() != usize::from(len) => return fail(Some(*n), "a fixed field must have its length"),
                0 => {}
                _ if value.len() > usize::from(len) => return fail(Some(*n), "longer than the field's maximum"),
                2 => out.extend_from_slice(format!("{:02}", value.len()).as_bytes()),
                _ => out.extend_from_slice(format!("{:03}", value.len()).as_bytes()),
            }
            out.extend_from_slice(value.as_bytes());
        }
        Ok(out)
    }

    /// Parses one message (without the length prefix). Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Message, FormatError> {
        if !bytes.is_ascii() {
            return fail(None, "the message is not ASCII");
        }
        if bytes.len() < 20 {
            return fail(None, "too short for an MTI and a bitmap");
        }
        let mti = &bytes[..4];
        if !mti.iter().all(u8::is_ascii_digit) {
            return fail(None, "the MTI must be 4 digits");
        }
        let hex = |text: &[u8]| -> Option<Vec<u8>> {
            text.chunks(2)
                .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
                .collect::<Option<Vec<u8>>>()
        };
        let mut bitmap = hex(&bytes[4..20]).ok_or(FormatError { field: None, reason: "the bitmap is not hex" })?;
        let mut at = 20;
        if bitmap[0] & 0x80 != 0 {
            let Some(second) = bytes.get(20..36) else { return fail(Some(1), "the secondary bitmap is truncated") };
            bitmap.extend(hex(second).ok_or(FormatError { field: Some(1), reason: "the bitmap is not hex" })?);
            at = 36;
        }
        let mut fields = BTreeMap::new();
        for n in 2..=(bitmap.len() * 8) as u8 {
            let i = usize::from(n - 1);
            if bitmap[i / 8] & (0x80 >> (i % 8)) == 0 {
                continue;
            }
            let (digits, max) = LAYOUT[usize::from(n)];
            let len = if digits == 0 {
                usize::from(max)
            } else {
                let Some(text) = bytes.get(at..at + usize::from(digits)) else {
                    return fail(Some(n), "the length is truncated");
                };
                if !text.iter().all(u8::is_ascii_digit) {
                    return fail(Some(n), "the length is not digits");
                }
                at += usize::from(digits);
                let len: usize = std::str::from_utf8(text).expect("ASCII").parse().expect("digits");
                if len > usize::from(max) {
                    return fail(Some(n), "longer than the field's maximum");
                }
                len
            };
            let Some(value) = bytes.get(at..at + len) else { return fail(Some(n), "the field is truncated") };
            at += len;
            fields.insert(n, String::from_utf8(value.to_vec()).expect("ASCII"));
        }
        if at != bytes.len() {
            return fail(None, "bytes left over after the last field");
        }
        Ok(Message { mti: String::from_utf8(mti.to_vec()).expect("ASCII"), fields })
    }
}

/// Reads the 2-byte big-endian length of the frame at the start of `buf`: `None` until whole.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    buf.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
}

/// `message` with its 2-byte big-endian length in front.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let len = u16::try_from(message.len()).expect("a message fits a 2-byte length");
    let mut out = Vec::with_capacity(message.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encoded by `pyiso8583` 4.x with `specs.default_ascii` (the independent implementation).
    const PYISO8583_0100: &[u8] = b"0100F0200000000000000000004000000000164111111111111111000000000000001000000001000000000000000000000000000000000000000000";

    #[test]
    fn agrees_with_pyiso8583() {
        let m = Message::decode(PYISO8583_0100).unwrap();
        assert_eq!(m.mti, "0100");
        assert_eq!(m.get(2), Some("4111111111111111"));
        assert_eq!(m.get(3), Some("000000"));
        assert_eq!(m.get(4), Some("000000001000"));
        assert_eq!(m.get(11), Some("000001"));
        assert_eq!(m.get(90), Some("0".repeat(42).as_str()));
        assert_eq!(m.encode().unwrap(), PYISO8583_0100);
        let shown = format!("{m:?}");
        assert!(!shown.contains("4111111111111111") && shown.contains("411111******1111"), "{shown}");
        let mut card_data = m.clone();
        for (n, v) in [
            (14, "2912"),
            (34, "4111111111111111"),
            (35, "4111111111111111=29121010000012300000"),
            (45, "B4111111111111111^PRADO/JOANA^2912101"),
            (52, "0123456789ABCDEF"),
            (55, "9F2608A1B2C3D4E5F6A7B8570F4111111111111111D2912101"),
            (48, "CVV2=737"),
            (61, "CVC2 838"),
            (126, "CV939"),
        ] {
            card_data.set(n, v);
        }
        let shown = format!("{card_data:?}");
        for hidden in ["2912", "4111111111111111", "PRADO", "0123456789ABCDEF", "9F26", "737", "838", "939"] {
            assert!(!shown.contains(hidden), "{hidden} in {shown}");
        }
        assert!(shown.contains("000000001000"), "other fields are shown: {shown}");
    }

    #[test]
    fn malformed_frames_name_the_rule() {
        let cases: &[(&[u8], Option<u8>, &str)] = &[
            (b"01", None, "too short for an MTI and a bitmap"),
            (b"01X0F020000000000000", None, "the MTI must be 4 digits"),
            (b"0100G020000000000000", None, "the bitmap is not hex"),
            (b"0100F02000000000000000", Some(1), "the secondary bitmap is truncated"),
            (b"0100400000000000000016411111", Some(2), "the field is truncated"),
            (b"010040000000000000002", Some(2), "the length is truncated"),
            (b"0100400000000000000099", Some(2), "longer than the field's maximum"),
            (b"01004000000000000000x1", Some(2), "the length is not digits"),
            (b"01002000000000000000000000extra", None, "bytes left over after the last field"),
            ("0100200000000000000000000é".as_bytes(), None, "the message is not ASCII"),
        ];
        for (bytes, field, reason) in cases {
            assert_eq!(
                Message::decode(bytes),
                Err(FormatError { field: *field, reason }),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn encoding_checks_lengths() {
        let mut m = Message::new("0110");
        m.set(39, "0");
        assert_eq!(m.encode().unwrap_err().field, Some(39));
        m.set(39, "00").set(2, "4".repeat(20));
        assert_eq!(m.encode().unwrap_err().field, Some(2));
        m.set(2, "4111111111111111").set(100, "12345");
        let wire = m.encode().unwrap();
        assert_eq!(Message::decode(&wire).unwrap(), m, "a secondary bitmap round-trips");
        assert_eq!(frame_len(&frame(&wire)), Some(wire.len()));
    }
}
