//! Envelope encryption, rotation, blind indexes, masking.

use vault::*;

fn keyring(versions: &[u32]) -> Keyring {
    let mut ring = Keyring::default();
    for v in versions {
        ring.add(Box::new(FileKek::new(*v, Secret32::random().unwrap())));
    }
    ring
}

#[test]
fn sealed_records_open_only_for_their_record_and_untouched() {
    let ring = keyring(&[1]);
    let (dek, _) = ring.new_data_key().unwrap();
    let sealed = seal(&dek, b"tenant-1/holder-9", b"52998224725").unwrap();
    assert!(!sealed.windows(11).any(|w| w == b"52998224725"), "no clear text in the ciphertext");
    assert_eq!(open(&dek, b"tenant-1/holder-9", &sealed).unwrap(), b"52998224725");
    // Moved to another record, altered anywhere, truncated, or under another key: refused.
    assert_eq!(open(&dek, b"tenant-1/holder-8", &sealed), Err(VaultError::Tampered));
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 1;
        assert_eq!(open(&dek, b"tenant-1/holder-9", &bad), Err(VaultError::Tampered), "byte {i}");
    }
    assert_eq!(open(&dek, b"tenant-1/holder-9", &sealed[..20]), Err(VaultError::Tampered));
    let (other, _) = ring.new_data_key().unwrap();
    assert_eq!(open(&other, b"tenant-1/holder-9", &sealed), Err(VaultError::Tampered));
    // Two seals of the same value differ (random nonces).
    assert_ne!(seal(&dek, b"r", b"x").unwrap(), seal(&dek, b"r", b"x").unwrap());
}

/// A KEK whose wrappings do not open (as a token that wraps with an IV of its own would, had its
/// IV not been kept): its data keys are refused before anything could be stored under them.
struct LosingKek(FileKek);

impl Kek for LosingKek {
    fn version(&self) -> u32 {
        self.0.version()
    }
    fn wrap(&self, dek: &Secret32) -> Result<Vec<u8>> {
        let mut wrapped = self.0.wrap(dek)?;
        wrapped[0] ^= 1;
        Ok(wrapped)
    }
    fn unwrap(&self, wrapped: &[u8]) -> Result<Secret32> {
        self.0.unwrap(wrapped)
    }
}

#[test]
fn a_wrapping_that_does_not_open_is_never_handed_out() {
    let mut ring = Keyring::default();
    ring.add(Box::new(LosingKek(FileKek::new(1, Secret32::random().unwrap()))));
    assert!(matches!(ring.new_data_key(), Err(VaultError::Unavailable(_))));
    // Nor in a rotation: the wrapping under the earlier version is kept.
    let mut ring = keyring(&[1]);
    let (_, wrapped) = ring.new_data_key().unwrap();
    ring.add(Box::new(LosingKek(FileKek::new(2, Secret32::random().unwrap()))));
    assert!(matches!(ring.rewrap(&wrapped), Err(VaultError::Unavailable(_))));
    assert!(ring.unwrap(&wrapped).is_ok());
}

#[test]
fn rotation_rewraps_data_keys_and_old_ciphertexts_stay_readable() {
    let v1 = Secret32::random().unwrap();
    let v1_copy = Secret32::from_bytes(*v1.expose());
    let mut ring = Keyring::default();
    ring.add(Box::new(FileKek::new(1, v1)));
    let (dek, wrapped_v1) = ring.new_data_key().unwrap();
    assert_eq!(wrapped_v1.kek_version, 1);
    let sealed = seal(&dek, b"card-1", b"4111111111111111").unwrap();

    ring.add(Box::new(FileKek::new(2, Secret32::random().unwrap())));
    assert_eq!(ring.current_version(), Some(2));
    let wrapped_v2 = ring.rewrap(&wrapped_v1).unwrap();
    assert_eq!(wrapped_v2.kek_version, 2);
    assert_ne!(wrapped_v2.wrapped, wrapped_v1.wrapped);
    assert_eq!(ring.rewrap(&wrapped_v2).unwrap(), wrapped_v2, "already current");
    // Both wrappings give the same data key, which opens what was sealed before the rotation.
    for w in [&wrapped_v1, &wrapped_v2] {
        let dek = ring.unwrap(w).unwrap();
        assert_eq!(open(&dek, b"card-1", &sealed).unwrap(), b"4111111111111111");
    }
    // New data keys use the new KEK.
    assert_eq!(ring.new_data_key().unwrap().1.kek_version, 2);
    // A node that only has v1 cannot read v2 wrappings, and says which version it lacks.
    let mut old = Keyring::default();
    old.add(Box::new(FileKek::new(1, v1_copy)));
    assert_eq!(old.unwrap(&wrapped_v2).err(), Some(VaultError::UnknownKek(2)));
    // A wrapping altered, or claimed by the wrong version, does not unwrap.
    let mut bad = wrapped_v2.clone();
    bad.wrapped[15] ^= 1;
    assert_eq!(ring.unwrap(&bad).err(), Some(VaultError::Tampered));
    let relabelled = WrappedKey { kek_version: 1, wrapped: wrapped_v2.wrapped.clone() };
    assert_eq!(ring.unwrap(&relabelled).err(), Some(VaultError::Tampered));
}

#[test]
fn key_files_parse_and_refuse_garbage_without_echoing_it() {
    let text = format!("# rtpay KEKs\n{}\n{}", FileKek::file_line(1).unwrap(), FileKek::file_line(2).unwrap());
    let keys = FileKek::parse_file(&text).unwrap();
    assert_eq!(keys.iter().map(Kek::version).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(format!("{:?}", keys[0]), "FileKek(v1)");
    let secret_line = "3 00112233445566778899aabbccddeeff00112233445566778899aabbccddee";
    for bad in ["", "# only a comment", "1 abc", "x 00", secret_line] {
        let e = FileKek::parse_file(bad).err().unwrap();
        assert!(!e.to_string().contains("00112233"), "{e}");
    }
    assert!(format!("{:?}", Secret32::random().unwrap()) == "Secret32(..)");
    // One version twice: which key wrapped what is unknown, so the file is refused, naming the line.
    let twice = format!(
        "{}{}{}",
        FileKek::file_line(1).unwrap(),
        FileKek::file_line(2).unwrap(),
        FileKek::file_line(2).unwrap()
    );
    let e = FileKek::parse_file(&twice).err().unwrap().to_string();
    assert!(e.contains("line 3") && e.contains("version 2 appears twice"), "{e}");
}

#[test]
fn blind_indexes_are_keyed_deterministic_and_separated_by_purpose() {
    let key = Secret32::random().unwrap();
    let index = BlindIndex::new(&key);
    let again = BlindIndex::new(&Secret32::from_bytes(*key.expose()));
    assert_eq!(index.of(b"document", b"52998224725"), again.of(b"document", b"52998224725"));
    assert_ne!(index.of(b"document", b"52998224725"), index.of(b"pan", b"52998224725"));
    assert_ne!(index.of(b"document", b"52998224725"), index.of(b"document", b"52998224726"));
    // Purpose and value cannot be shifted into each other.
    assert_ne!(index.of(b"ab", b"c"), index.of(b"a", b"bc"));
    let other = BlindIndex::new(&Secret32::random().unwrap());
    assert_ne!(index.of(b"document", b"x"), other.of(b"document", b"x"));
}

#[test]
fn masks_keep_bin_and_last_four_and_the_middle_of_documents() {
    assert_eq!(mask::pan("4111111111111111"), "411111******1111");
    assert_eq!(mask::pan("4111 1111 1111 1111"), "411111******1111");
    assert_eq!(mask::pan("5555555555554444123"), "555555*********4123");
    assert_eq!(mask::pan("123456"), "**3456");
    assert_eq!(mask::document("52998224725"), "***.982.247-**");
    assert_eq!(mask::document("11222333000181"), "**.222.333/0001-**");
    assert_eq!(mask::document("12ABC34501DE35"), "**.ABC.345/01DE-**");
}

#[test]
fn card_numbers_are_recognized_inside_text() {
    assert!(mask::luhn(b"4111111111111111"));
    assert!(!mask::luhn(b"4111111111111112"));
    assert!(mask::holds_pan("req-4111111111111111-x"));
    assert!(mask::holds_pan("378282246310005"));
    assert!(mask::holds_pan("x5555555555554444"));
    assert!(!mask::holds_pan("4111-1111-1111-1112"));
    // As printed: groups after single spaces or dashes, from a word's start.
    for printed in
        ["4111-1111-1111-1111", "card 4111 1111 1111 1111 exp 12/28", "\"3782 822463 10005\"", "4111 1111 1111 1111 12"]
    {
        assert!(mask::holds_pan(printed), "{printed}");
    }
    for not in [
        "4111 1111 1111 1112",
        "4111-1111 1111-1111",
        "x4111 1111 1111 1111",
        "12345678-1234-1234-1234-123456789012",
        "0a1b2c3d-4111-1111-1111-111111111111",
        "2026-12-06 08:53:03",
        "1..=9,223,372,036,854,775,807",
    ] {
        assert!(!mask::holds_pan(not), "{not}");
    }
    assert_eq!(mask::redact_pans("pay 4111 1111 1111 1111 now"), "pay 411111******1111 now");
    assert!(!mask::holds_pan("411111111111"), "12 digits is too short");
    assert!(!mask::holds_pan("a1b2c3-ff"));
    assert_eq!(
        mask::redact_pans("invalid type: string \"4111111111111111\", expected u64 at 12345"),
        "invalid type: string \"411111******1111\", expected u64 at 12345"
    );
}
