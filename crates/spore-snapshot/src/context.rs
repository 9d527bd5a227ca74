//! The context record a runtime writes at its checkpoint call (`spore_checkpoint` in
//! `spore-runtime/native/checkpoint.rs`): registers at the call, FS base, signal state, rseq
//! area, and where glibc caches the thread id. This module mirrors that record's layout
//! (the native side has no crates, so the two are kept in step by hand and both carry
//! [`CONTEXT_MAGIC`], the version and the size).

use serde::{Deserialize, Serialize};

use crate::SnapshotError;

/// `b"SPORECTX"` as a little-endian u64, first field of the record.
pub const CONTEXT_MAGIC: u64 = u64::from_le_bytes(*b"SPORECTX");
/// Version of the record's layout.
pub const CONTEXT_VERSION: u32 = 1;
/// Size in bytes of the record.
pub const CONTEXT_SIZE: usize = 160 + 64 * 32;

/// One signal action as the kernel stores it (`struct kernel_sigaction`, x86-64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SigAction {
    /// Handler address, or `SIG_DFL` (0) / `SIG_IGN` (1).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// The `sa_restorer` trampoline (glibc's `__restore_rt`).
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

/// The decoded record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// Callee-saved registers at the checkpoint call: rbx, rbp, r12, r13, r14, r15.
    pub callee_saved: [u64; 6],
    /// Stack pointer after the checkpoint call returns.
    pub rsp: u64,
    /// Return address of the checkpoint call.
    pub rip: u64,
    /// MXCSR (SSE control and status).
    pub mxcsr: u32,
    /// x87 control word.
    pub fpcw: u32,
    /// FS base (the thread pointer).
    pub fs_base: u64,
    /// Blocked signals.
    pub sigmask: u64,
    /// Address of glibc's rseq area (0 = none registered).
    pub rseq_area: u64,
    /// Registered rseq length.
    pub rseq_len: u32,
    /// rseq signature.
    pub rseq_sig: u32,
    /// Offset from the thread pointer of glibc's cached thread id, if found.
    pub tid_offset: Option<u64>,
    /// Process id at checkpoint (in the runtime's pid namespace).
    pub pid: i32,
    /// Thread id at checkpoint.
    pub tid: i32,
    /// Alternate signal stack: base, flags, size.
    pub altstack: (u64, i32, u64),
    /// Signal actions 1..=64 (index 0 is signal 1).
    pub sigactions: Vec<SigAction>,
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

impl Context {
    /// Decodes the record from the bytes read at its address in the runtime.
    pub fn parse(b: &[u8]) -> Result<Context, SnapshotError> {
        let bad = |why: String| SnapshotError::Context(why);
        if b.len() < CONTEXT_SIZE {
            return Err(bad(format!("{} bytes, expected {CONTEXT_SIZE}", b.len())));
        }
        if u64_at(b, 0) != CONTEXT_MAGIC {
            return Err(bad("no SPORECTX magic at the given address".into()));
        }
        let (size, version) = (u32_at(b, 8) as usize, u32_at(b, 12));
        if version != CONTEXT_VERSION || size != CONTEXT_SIZE {
            return Err(bad(format!(
                "layout version {version} size {size}, this build reads version \
                 {CONTEXT_VERSION} size {CONTEXT_SIZE} (runtime library and daemon differ)"
            )));
        }
        let tid_offset = u64_at(b, 120) as i64;
        let sigactions = (0..64)
            .map(|i| {
                let o = 160 + i * 32;
                SigAction {
                    handler: u64_at(b, o),
                    flags: u64_at(b, o + 8),
                    restorer: u64_at(b, o + 16),
                    mask: u64_at(b, o + 24),
                }
            })
            .collect();
        let ctx = Context {
            callee_saved: std::array::from_fn(|i| u64_at(b, 16 + 8 * i)),
            rsp: u64_at(b, 64),
            rip: u64_at(b, 72),
            mxcsr: u32_at(b, 80),
            fpcw: u32_at(b, 84),
            fs_base: u64_at(b, 88),
            sigmask: u64_at(b, 96),
            rseq_area: u64_at(b, 104),
            rseq_len: u32_at(b, 112),
            rseq_sig: u32_at(b, 116),
            tid_offset: (tid_offset >= 0).then_some(tid_offset as u64),
            pid: u32_at(b, 128) as i32,
            tid: u32_at(b, 132) as i32,
            altstack: (u64_at(b, 136), u32_at(b, 144) as i32, u64_at(b, 152)),
            sigactions,
        };
        ctx.validate()?;
        Ok(ctx)
    }

    /// Checks what a restore relies on.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let bad = |why: &str| Err(SnapshotError::Context(why.to_owned()));
        if self.rsp == 0 || self.rsp % 8 != 0 {
            return bad("stack pointer is null or misaligned");
        }
        if self.rip == 0 || self.fs_base == 0 {
            return bad("return address or thread pointer is null");
        }
        if self.sigactions.len() != 64 {
            return bad("expected 64 signal actions");
        }
        if self.rseq_area != 0 && self.rseq_len < 32 {
            return bad("rseq area registered with a length under 32");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Vec<u8> {
        let mut b = vec![0u8; CONTEXT_SIZE];
        b[0..8].copy_from_slice(&CONTEXT_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&(CONTEXT_SIZE as u32).to_le_bytes());
        b[12..16].copy_from_slice(&CONTEXT_VERSION.to_le_bytes());
        for (i, v) in [
            1u64,
            2,
            3,
            4,
            5,
            6,
            0x7ff0,
            0x4000,
            0x1f80_0000_037f,
            0x9000,
        ]
        .iter()
        .enumerate()
        {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b[120..128].copy_from_slice(&0x2d0i64.to_le_bytes());
        b[160 + 32 * 14..168 + 32 * 14].copy_from_slice(&0xabcdu64.to_le_bytes());
        b
    }

    #[test]
    fn parses_the_native_layout() {
        let ctx = Context::parse(&record()).unwrap();
        assert_eq!(ctx.callee_saved, [1, 2, 3, 4, 5, 6]);
        assert_eq!((ctx.rsp, ctx.rip, ctx.fs_base), (0x7ff0, 0x4000, 0x9000));
        assert_eq!((ctx.mxcsr, ctx.fpcw), (0x037f, 0x1f80));
        assert_eq!(ctx.tid_offset, Some(0x2d0));
        assert_eq!(ctx.sigactions[14].handler, 0xabcd);
    }

    #[test]
    fn refuses_foreign_or_mismatched_records() {
        let mut b = record();
        b[0] ^= 1;
        assert!(Context::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut b = record();
        b[12] = 2;
        assert!(Context::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        assert!(Context::parse(&record()[..100]).is_err());
        let mut b = record();
        b[64..72].copy_from_slice(&0x7ff1u64.to_le_bytes());
        assert!(Context::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("misaligned"));
    }
}
