//! Compiles `native/cfork_child.rs` into a small shared object (no crates, `no_std`) with
//! the same `rustc` that builds the workspace; `lib.rs` embeds it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "native/cfork_child.rs";
    println!("cargo:rerun-if-changed={src}");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("libspore_cfork_child.so");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--crate-type",
        "cdylib",
        "--crate-name",
        "spore_cfork_child",
        "--edition",
        "2021",
    ])
    .args([
        "-C",
        "opt-level=2",
        "-C",
        "panic=abort",
        "-C",
        "debuginfo=0",
        "-C",
        "strip=debuginfo",
    ]);
    if let (Ok(target), Ok(host)) = (std::env::var("TARGET"), std::env::var("HOST")) {
        if target != host {
            cmd.args(["--target", &target]);
        }
    }
    let status = cmd
        .arg("-o")
        .arg(&out)
        .arg(src)
        .status()
        .expect("running rustc for the cfork child library");
    assert!(status.success(), "compiling {src} failed");
}
