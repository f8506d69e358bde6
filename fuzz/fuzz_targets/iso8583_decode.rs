//! The ISO 8583 decoder (what the card network's listener reads from a frame): it never panics,
//! and a message it accepts encodes to bytes that decode to the same message.
#![no_main]

use cards::iso8583::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(message) = Message::decode(bytes) {
        let encoded = message.encode().expect("a decoded message encodes");
        assert_eq!(Message::decode(&encoded).expect("an encoded message decodes"), message);
    }
});
