//! `spore.toml` parsing and checking must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = spore_core::FunctionManifest::from_toml(text);
    }
});
