//! Unpacking an uploaded code package must never panic nor write outside its directory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("code");
    let _ = spore_control::code::unpack(data, &dest);
    for entry in std::fs::read_dir(dir.path()).expect("read_dir").flatten() {
        assert_eq!(entry.file_name(), "code", "wrote outside the code directory");
    }
});
