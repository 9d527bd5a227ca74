//! Process-level snapshots of warm language runtimes (Spore's answer to REAP and Sabre on
//! machines without hardware virtualisation).
//!
//! * [`capture`]: the daemon's side of a checkpoint. The runtime, at a quiescent point, calls
//!   `spore_checkpoint` (`spore-runtime/native/checkpoint.rs`), which records its registers
//!   and signal state ([`context`]) and blocks; the daemon then reads the memory map, the
//!   mm fields and every page the process owns (`/proc`, `process_vm_readv`) and writes an
//!   [`image`]: file-backed regions by path and identity, private pages stored (zero pages
//!   elided), cut into checksummed partitions, raw or compressed (lz4/zstd).
//! * [`restore`]: run inside a fresh process (the sandbox's init, after it built the
//!   sandbox) to turn that process into the checkpointed one: it maps every region at its
//!   address, installs the pages, restores mm fields, signal actions, rseq and the vDSO's
//!   place, keeps only the descriptors the runtime needs, and jumps back into the saved call,
//!   which returns "restored".
//! * [`procfs`]: the `/proc` readers both sides use.
//!
//! Only x86-64 Linux is supported; other targets get a clear error at restore.

pub mod capture;
pub mod context;
pub mod image;
mod install;
pub mod lazy;
pub mod procfs;
pub mod restore;

use std::path::Path;

pub use restore::{run_restorer, RESTORE_SUBCOMMAND};

/// Errors of capture, the image format and restore.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file or `/proc` entry could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// What was being accessed.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Sys {
        /// The call (and its object).
        call: String,
        /// errno.
        source: nix::Error,
    },
    /// `/proc` had something this code cannot read.
    #[error("reading /proc: {0}")]
    Proc(String),
    /// The runtime's context record is unusable.
    #[error("checkpoint context: {0}")]
    Context(String),
    /// The process has something a snapshot cannot hold.
    #[error("cannot snapshot this process: {0}")]
    Unsupported(String),
    /// The file does not start with the image magic.
    #[error("not a Spore snapshot image (bad magic)")]
    NotAnImage,
    /// The image was written by another format version.
    #[error("snapshot format version {found}, this build reads version {supported}")]
    Version {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A checksum does not match.
    #[error("snapshot image is corrupt: {0} checksum mismatch")]
    Checksum(String),
    /// The file ends early.
    #[error("snapshot image is truncated: {0}")]
    Truncated(String),
    /// The image is internally inconsistent.
    #[error("snapshot image is corrupt: {0}")]
    Corrupt(String),
    /// Compression failed.
    #[error("{0}")]
    Codec(String),
    /// A file the image maps changed since the checkpoint.
    #[error("{path} changed since the snapshot was taken ({what} differs)")]
    FileChanged {
        /// The file.
        path: String,
        /// What differs.
        what: &'static str,
    },
    /// The restoring process occupies an address the image needs; a fresh process (another
    /// address-space layout) can try again.
    #[error("the restorer occupies {0:#x}, which the image needs")]
    Collision(u64),
    /// The restore cannot proceed in this process.
    #[error("cannot restore: {0}")]
    Restore(String),
}

impl SnapshotError {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> SnapshotError {
        SnapshotError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub(crate) fn sys(call: impl Into<String>, source: nix::Error) -> SnapshotError {
        SnapshotError::Sys {
            call: call.into(),
            source,
        }
    }
}
