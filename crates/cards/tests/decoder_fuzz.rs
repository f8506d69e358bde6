//! The ISO 8583 decoder against arbitrary and mutated input: it never panics, and what it
//! accepts encodes to a message that decodes the same. (`fuzz/` holds the same property as a cargo-fuzz
//! target for longer runs.)

use cards::iso8583::Message;
use proptest::prelude::*;

fn valid_message() -> impl Strategy<Value = Message> {
    let fields = prop::collection::btree_map(
        prop_oneof![Just(2u8), Just(3), Just(4), Just(11), Just(14), Just(18), Just(37), Just(39), Just(90), Just(102)],
        "[0-9]{0,42}",
        0..8,
    );
    ("0[1-8][0-4]0", fields).prop_map(|(mti, fields)| {
        let mut m = Message::new(&mti);
        for (n, digits) in fields {
            let value = match n {
                2 => format!("4{}", "1".repeat(15)),
                3 | 11 => "0".repeat(6),
                4 | 37 => "1".repeat(12),
                14 | 18 => "2".repeat(4),
                39 => "00".into(),
                90 => "9".repeat(42),
                _ => digits.chars().take(28).collect(),
            };
            m.set(n, value);
        }
        m
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(m) = Message::decode(&bytes) {
            prop_assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn mutated_messages_never_panic_and_round_trip_when_accepted(
        m in valid_message(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let wire = m.encode().unwrap();
        prop_assert_eq!(&Message::decode(&wire).unwrap(), &m);
        let mut bytes = wire.clone();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if let Ok(decoded) = Message::decode(&bytes) {
            // The same message again (hex case in a bitmap may differ from the bytes).
            prop_assert_eq!(Message::decode(&decoded.encode().unwrap()).unwrap(), decoded);
        }
    }
}
