// Compiles one Rust source file into a shared object in OUT_DIR with the same `rustc` that
// builds the workspace (no crates, no cargo), for the native helpers that language runtimes
// load with ctypes. Included by the build scripts of `spore-ipc` and `spore-runtime`.

fn compile_cdylib(src: &str, crate_name: &str, deps: &[&str]) -> std::path::PathBuf {
    for f in std::iter::once(&src).chain(deps) {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"))
        .join(format!("lib{crate_name}.so"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut cmd = std::process::Command::new(rustc);
    cmd.args(["--crate-type", "cdylib", "--crate-name", crate_name, "--edition", "2021"])
        .args(["-C", "opt-level=2", "-C", "panic=abort", "-C", "debuginfo=0"])
        .args(["-C", "strip=debuginfo"]);
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
        .expect("running rustc for a native runtime library");
    assert!(status.success(), "compiling {src} failed");
    out
}
