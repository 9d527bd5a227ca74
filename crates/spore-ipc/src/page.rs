//! A pipeline node's page: one memfd page shared by the daemon and one node instance of a
//! pre-wired DAG pipeline.
//!
//! The daemon writes each invocation's header (sequence number, deadline, request id) before
//! it feeds the pipeline's sources; the node reads it when its inputs arrive, and after
//! sending its result writes its timing slot, sequence number last. Each node has its own
//! page, so a node can neither read nor forge another node's context or timing.
//!
//! Layout (little endian), shared with `spore_dag.py`:
//!
//! | offset | field |
//! |---:|---|
//! | 0 | header seq (u64) |
//! | 8 | deadline, unix ms (u64) |
//! | 16 | request id length (u32) |
//! | 20 | request id (up to 64 bytes) |
//! | 128 | slot seq (u64, written last) |
//! | 136 | inputs arrived, handler start, handler end, result sent (u64 each, `CLOCK_MONOTONIC` ns) |
//!
//! The node may write anything into its page: the daemon never reads the header back, and
//! takes the slot's figures as the node's claim (they are timing, nothing more).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;

use crate::IpcError;

/// Size of a page.
pub const PAGE: usize = 4096;
/// Offset of the slot.
pub const SLOT: usize = 128;
/// Longest request id a page holds (longer ones are cut).
pub const REQUEST_ID_MAX: usize = 64;

/// What a node reported for one invocation (`CLOCK_MONOTONIC` ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotTimes {
    /// Every input had arrived.
    pub inputs_ns: u64,
    /// The handler was called.
    pub start_ns: u64,
    /// The handler returned.
    pub end_ns: u64,
    /// The result was on every output edge.
    pub sent_ns: u64,
}

/// The daemon's end of a node's page.
#[derive(Debug)]
pub struct NodePage {
    map: MmapRaw,
}

impl NodePage {
    /// Creates a page; returns it and the descriptor to hand to the node.
    pub fn create() -> Result<(NodePage, OwnedFd), IpcError> {
        let (file, map) = crate::mapped_memfd("spore-pipeline", PAGE)?;
        Ok((NodePage { map }, file.into()))
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(off % 8 == 0 && off + 8 <= PAGE);
        // SAFETY: `off` is 8-aligned and inside the page-aligned mapping of PAGE bytes, which
        // lives as long as `self`; the daemon only touches it through atomics, and the node's
        // plain stores to it can at worst make the value wrong, never unsound to read.
        unsafe { &*(self.map.as_mut_ptr().add(off) as *const AtomicU64) }
    }

    /// Writes the header of invocation `seq`.
    pub fn write_header(&self, seq: u64, deadline_unix_ms: u64, request_id: &str) {
        let rid = &request_id.as_bytes()[..request_id.len().min(REQUEST_ID_MAX)];
        let mut bytes = [0u8; 8 + REQUEST_ID_MAX];
        bytes[..4].copy_from_slice(&(rid.len() as u32).to_le_bytes());
        bytes[4..4 + rid.len()].copy_from_slice(rid);
        // SAFETY: bytes 16..16 + 4 + REQUEST_ID_MAX (= 84 <= SLOT) lie inside the mapping;
        // the node reads them only after the daemon has fed this invocation (the ring's
        // Release/Acquire orders these stores before its reads).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(16),
                4 + rid.len(),
            );
        }
        self.word(8).store(deadline_unix_ms, Ordering::Relaxed);
        self.word(0).store(seq, Ordering::Release);
    }

    /// The node's timing for invocation `seq`, once it has written it.
    pub fn slot(&self, seq: u64) -> Option<SlotTimes> {
        if self.word(SLOT).load(Ordering::Acquire) != seq {
            return None;
        }
        let t = |i: usize| self.word(SLOT + 8 + 8 * i).load(Ordering::Relaxed);
        Some(SlotTimes {
            inputs_ns: t(0),
            start_ns: t(1),
            end_ns: t(2),
            sent_ns: t(3),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_slot_round_trip_through_the_shared_memory() {
        let (page, fd) = NodePage::create().unwrap();
        page.write_header(7, 1234, "req-1");
        let node = MmapRaw::map_raw(&std::fs::File::from(fd)).unwrap();
        // SAFETY: the node's mapping of the same PAGE bytes, read and written only here.
        let bytes = unsafe { std::slice::from_raw_parts_mut(node.as_mut_ptr(), PAGE) };
        assert_eq!(u64::from_le_bytes(bytes[0..8].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 1234);
        assert_eq!(u32::from_le_bytes(bytes[16..20].try_into().unwrap()), 5);
        assert_eq!(&bytes[20..25], b"req-1");
        assert_eq!(page.slot(7), None, "nothing written yet");
        for (i, v) in [10u64, 20, 30, 40].into_iter().enumerate() {
            bytes[SLOT + 8 + 8 * i..SLOT + 16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        bytes[SLOT..SLOT + 8].copy_from_slice(&7u64.to_le_bytes());
        assert_eq!(
            page.slot(7),
            Some(SlotTimes {
                inputs_ns: 10,
                start_ns: 20,
                end_ns: 30,
                sent_ns: 40
            })
        );
        assert_eq!(
            page.slot(8),
            None,
            "an older invocation's slot is not this one's"
        );
        let long = "x".repeat(100);
        page.write_header(8, 0, &long);
        assert_eq!(u32::from_le_bytes(bytes[16..20].try_into().unwrap()), 64);
    }
}
