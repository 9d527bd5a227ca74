//! Shared-memory channels between processes on one host, for DAG edges between function
//! instances.
//!
//! - [`sealed`]: a payload in a sealed memfd. The producer writes it once; the fd is handed to
//!   consumers (over a Unix socket, `SCM_RIGHTS`), who map it read-only after checking the
//!   seals, so that the bytes cannot change under them: large payloads move without copies.
//! - [`ring`]: a bounded single-producer single-consumer ring of messages in a shared memfd,
//!   with eventfd doorbells for "data ready" and "space ready". Sends and receives take a
//!   timeout, so a slow or dead peer never blocks the other side forever.
//!
//! - [`edge`]: the daemon's end of a DAG edge (a ring plus a socket for memfds), speaking
//!   the Python runtime's message format.
//! - [`page`]: the page a pre-wired pipeline's node shares with the daemon (invocation
//!   header, timing slot).
//! - the same ring for Python runtimes: [`PY_NATIVE_LIB`].
//!
//! The peer may be a misbehaving function: everything read from shared memory is checked
//! before use, and a corrupt ring is an error, never a panic or an out-of-bounds access.

pub mod edge;
pub mod page;
pub mod ring;
mod ring_core;
pub mod sealed;

/// The native library (`native/spore_ipc_py.rs`, compiled by `build.rs` with the workspace's
/// `rustc`) through which Python runtimes use rings: the same `ring_core.rs` as [`ring`],
/// behind a small C interface for ctypes.
pub const PY_NATIVE_LIB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libspore_ipc.so"));

/// The file name runtimes load [`PY_NATIVE_LIB`] under.
pub const PY_NATIVE_LIB_FILE: &str = "libspore_ipc.so";

/// Errors of the channels.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// A system call failed.
    #[error("{what} failed")]
    Sys {
        /// The operation.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A message or payload exceeds what the channel can hold.
    #[error("Message of {len} bytes exceeds the channel's limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The peer did not make progress within the timeout.
    #[error("Timed out after {0:?} waiting for the peer")]
    Timeout(std::time::Duration),
    /// Shared state is inconsistent (a buggy or hostile peer).
    #[error("Corrupt channel: {0}")]
    Corrupt(String),
    /// A received memfd is not sealed against writes and resizing.
    #[error("Payload descriptor is not sealed (seals present: {0})")]
    NotSealed(String),
}

/// A new close-on-exec memfd named `name`, `len` zero bytes long, and a shared writable
/// mapping of it.
pub(crate) fn mapped_memfd(
    name: &str,
    len: usize,
) -> Result<(std::fs::File, memmap2::MmapRaw), IpcError> {
    let file = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .create(name)
        .map_err(|e| IpcError::Sys {
            what: "memfd_create",
            source: std::io::Error::other(e.to_string()),
        })?
        .into_file();
    file.set_len(len as u64).map_err(sys("sizing a memfd"))?;
    let map = memmap2::MmapRaw::map_raw(&file).map_err(sys("mapping a memfd"))?;
    Ok((file, map))
}

pub(crate) fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> IpcError {
    move |source| IpcError::Sys { what, source }
}

pub(crate) fn errno(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> IpcError {
    move |e| IpcError::Sys {
        what,
        source: std::io::Error::from(e),
    }
}
