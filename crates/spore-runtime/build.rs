//! Compiles `native/cfork_child.rs` and `native/checkpoint.rs` into small shared objects (no crates, `no_std`) with
//! the same `rustc` that builds the workspace; `lib.rs` embeds it.

include!("../spore-ipc/native/compile.rs");

fn main() {
    compile_cdylib("native/cfork_child.rs", "spore_cfork_child", &[]);
    compile_cdylib("native/checkpoint.rs", "spore_checkpoint", &[]);
}
