//! Compiles `native/spore_ipc_py.rs` (rings for Python runtimes) into `libspore_ipc.so`;
//! `lib.rs` embeds it.

include!("native/compile.rs");

fn main() {
    compile_cdylib("native/spore_ipc_py.rs", "spore_ipc", &["src/ring_core.rs"]);
}
