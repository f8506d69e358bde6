#![no_main]

use cards::iso8583::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        let wire = message.encode().expect("a decoded message encodes");
        assert_eq!(Message::decode(&wire).expect("and decodes again"), message);
    }
});
