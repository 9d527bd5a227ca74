//! Frames from a runtime: the length prefix and the JSON header must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_runtime::protocol::{decode_header, FramePrefix, FromRuntime, ToRuntime, PREFIX_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() >= PREFIX_LEN {
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&data[..PREFIX_LEN]);
        let _ = FramePrefix::parse(prefix);
    }
    let _ = decode_header::<FromRuntime>(data);
    let _ = decode_header::<ToRuntime>(data);
});
