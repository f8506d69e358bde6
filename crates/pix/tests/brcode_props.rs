//! Properties of the BR Code codec: decoding never panics, whatever the input; what we encode
//! decodes to what we put in; a changed character breaks the CRC or a rule.

use pix::brcode::{decode, encode, Spec};
use proptest::prelude::*;

fn spec() -> impl Strategy<Value = Spec> {
    (
        "[a-z0-9.]{1,30}@[a-z]{1,10}\\.com",
        proptest::option::of(1u64..=9_999_999_999u64),
        "[A-Za-z ]{0,12}[A-Za-z][A-Za-z ]{0,12}",
        "[A-Za-z ]{0,7}[A-Za-z][A-Za-z ]{0,7}",
        proptest::option::of("[A-Za-z0-9]{1,25}"),
        proptest::option::of("[ -~]{1,30}"),
    )
        .prop_map(|(key, amount, name, city, txid, info)| Spec {
            key: Some(key),
            url: None,
            info,
            amount,
            name,
            city,
            txid,
        })
}

proptest! {
    #[test]
    fn decoding_never_panics(input in "\\PC{0,600}") {
        let _ = decode(&input);
    }

    #[test]
    fn decoding_tlv_shaped_noise_never_panics(input in "(0002010[0-9]{3}[ -~]{0,40}){1,8}6304[0-9A-F]{4}") {
        let _ = decode(&input);
    }

    #[test]
    fn encode_then_decode_round_trips(s in spec()) {
        let payload = match encode(&s) {
            Ok(p) => p,
            // Only a key and description too long for the 99-character template may be refused.
            Err(e) => { prop_assert_eq!(e.field.as_str(), "26"); return Ok(()); }
        };
        let code = decode(&payload).unwrap();
        prop_assert!(code.warnings.is_empty());
        prop_assert_eq!(code.key, s.key);
        prop_assert_eq!(code.amount, s.amount);
        prop_assert_eq!(code.name, s.name.trim());
        prop_assert_eq!(code.city, s.city.trim());
        prop_assert_eq!(code.txid, s.txid);
    }

    #[test]
    fn one_changed_character_is_caught(s in spec(), at in any::<prop::sample::Index>(), with in "[A-Za-z0-9]") {
        let Ok(payload) = encode(&s) else { return Ok(()) };
        let i = at.index(payload.len());
        let mut bytes = payload.clone().into_bytes();
        // The CRC's hexadecimal digits are read in either case: the same value.
        prop_assume!(!bytes[i].eq_ignore_ascii_case(&with.as_bytes()[0]));
        bytes[i] = with.as_bytes()[0];
        let changed = String::from_utf8(bytes).unwrap();
        prop_assert!(decode(&changed).is_err(), "{} accepted after changing byte {}", changed, i);
    }
}
