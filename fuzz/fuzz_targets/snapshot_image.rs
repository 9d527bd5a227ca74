//! Fuzzes the snapshot image parser: any input must be refused with an error or accepted
//! as a consistent image, never crash or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spore_snapshot::image::check_bytes(data);
});
