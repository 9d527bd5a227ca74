//! Payloads in sealed memfds.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memfd::{FileSeal, Memfd, MemfdOptions};
use memmap2::Mmap;

use crate::{sys, IpcError};

/// The seals a consumer requires: no writes, no resizing, no further seal changes.
const REQUIRED: [FileSeal; 4] = [
    FileSeal::SealWrite,
    FileSeal::SealShrink,
    FileSeal::SealGrow,
    FileSeal::SealSeal,
];

/// An immutable payload in shared memory.
#[derive(Debug)]
pub struct SealedPayload {
    fd: OwnedFd,
    map: Option<Mmap>,
}

impl SealedPayload {
    /// Copies `bytes` into a new memfd and seals it.
    pub fn create(name: &str, bytes: &[u8]) -> Result<SealedPayload, IpcError> {
        let mfd = MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(name)
            .map_err(|e| IpcError::Sys {
                what: "memfd_create",
                source: std::io::Error::other(e.to_string()),
            })?;
        mfd.as_file()
            .write_all(bytes)
            .map_err(sys("writing the payload"))?;
        Self::seal(mfd)
    }

    /// Seals a memfd the caller has filled (e.g. through its own writable mapping, which
    /// must be unmapped first: a live shared writable mapping makes `F_SEAL_WRITE` fail).
    pub fn seal(mfd: Memfd) -> Result<SealedPayload, IpcError> {
        mfd.add_seals(&REQUIRED).map_err(|e| IpcError::Sys {
            what: "sealing the payload",
            source: std::io::Error::other(e.to_string()),
        })?;
        Self::from_memfd(mfd)
    }

    /// Takes a descriptor received from a peer: checks that it is a memfd sealed against
    /// writes and resizing, then maps it read-only.
    pub fn from_fd(fd: OwnedFd) -> Result<SealedPayload, IpcError> {
        let mfd = Memfd::try_from_fd(fd).map_err(|_| IpcError::NotSealed("not a memfd".into()))?;
        Self::from_memfd(mfd)
    }

    fn from_memfd(mfd: Memfd) -> Result<SealedPayload, IpcError> {
        let seals = mfd.seals().map_err(|e| IpcError::Sys {
            what: "reading seals",
            source: std::io::Error::other(e.to_string()),
        })?;
        if !REQUIRED[..3].iter().all(|s| seals.contains(s)) {
            return Err(IpcError::NotSealed(format!("{seals:?}")));
        }
        let file = mfd.into_file();
        let len = file.metadata().map_err(sys("stat of the payload"))?.len();
        // An empty file cannot be mapped; it is simply no bytes.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the memfd is sealed against writes, shrinking and growing (checked
            // above), so the mapped bytes cannot change or vanish while the map lives.
            Some(unsafe { Mmap::map(&file) }.map_err(sys("mapping the payload"))?)
        };
        Ok(SealedPayload {
            fd: file.into(),
            map,
        })
    }

    /// The bytes, mapped (no copy).
    pub fn as_bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The descriptor, to hand to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A second descriptor of the same payload.
    pub fn try_clone_fd(&self) -> Result<OwnedFd, IpcError> {
        self.fd.try_clone().map_err(sys("dup of the payload"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_a_second_descriptor() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let p = SealedPayload::create("t", &data).unwrap();
        let q = SealedPayload::from_fd(p.try_clone_fd().unwrap()).unwrap();
        assert_eq!(q.as_bytes(), &data[..]);
        assert_eq!(SealedPayload::create("e", b"").unwrap().as_bytes(), b"");
    }

    #[test]
    fn unsealed_or_foreign_descriptors_are_refused() {
        let mfd = MemfdOptions::default()
            .allow_sealing(true)
            .create("u")
            .unwrap();
        mfd.as_file().write_all(b"mutable").unwrap();
        let err = SealedPayload::from_fd(mfd.into_file().into()).unwrap_err();
        assert!(matches!(err, IpcError::NotSealed(_)), "{err}");
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(matches!(
            SealedPayload::from_fd(file.into()),
            Err(IpcError::NotSealed(_))
        ));
    }

    #[test]
    fn a_sealed_payload_cannot_be_changed() {
        let p = SealedPayload::create("s", b"fixed").unwrap();
        let mut f = std::fs::File::from(p.try_clone_fd().unwrap());
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(1).is_err());
        assert_eq!(p.as_bytes(), b"fixed");
    }
}
