//! The BR Code decoder (what `POST /v1/pix/brcode/decode`, payments by BR Code and incoming Pix
//! read): it never panics, on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = pix::brcode::decode(text);
    }
});
