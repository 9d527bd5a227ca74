//! A bounded single-producer single-consumer ring of messages in a shared memfd, with eventfd
//! doorbells.
//!
//! Layout: a 4 KiB header page, then `capacity` data bytes (a power of two). The header holds
//! a magic number, the capacity, the producer's `tail` and the consumer's `head` (byte
//! positions that only grow, each on its own cache line) and two "waiting" flags. A message is
//! an 8-byte record header (`u32` length, `u32` kind) and the payload padded to 8 bytes; a
//! record that would cross the end of the buffer is preceded by a wrap marker. A side rings
//! its peer's doorbell (an eventfd) only when the peer said it is waiting, so a busy pipeline
//! costs no system calls.
//!
//! Hand-written rather than taken from a crate: the ring lives between processes that do not
//! trust each other and one side may be Python (through `mmap` and `os.eventfd`), so its layout
//! must be simple, fixed and fully validated on every read.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapRaw;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EfdFlags;

use crate::{errno, sys, IpcError};

const MAGIC: u64 = 0x5350_4f52_4552_4e47; // "SPORERNG"
const HEADER: usize = 4096;
const TAIL_OFF: usize = 64;
const PRODUCER_WAITING_OFF: usize = 72;
const HEAD_OFF: usize = 128;
const CONSUMER_WAITING_OFF: usize = 136;
const RECORD: u64 = 8;
const KIND_MESSAGE: u32 = 0;
const KIND_WRAP: u32 = 1;

/// The descriptors of a ring: its memory and its two doorbells. Both ends open the same set.
#[derive(Debug)]
pub struct RingFds {
    /// The shared memfd.
    pub memory: OwnedFd,
    /// Rung by the producer when data is ready.
    pub data_ready: OwnedFd,
    /// Rung by the consumer when space is free.
    pub space_ready: OwnedFd,
}

impl RingFds {
    /// Duplicates the descriptors (e.g. to send them to another process).
    pub fn try_clone(&self) -> Result<RingFds, IpcError> {
        Ok(RingFds {
            memory: self.memory.try_clone().map_err(sys("dup"))?,
            data_ready: self.data_ready.try_clone().map_err(sys("dup"))?,
            space_ready: self.space_ready.try_clone().map_err(sys("dup"))?,
        })
    }
}

/// Creates a ring of `capacity` data bytes (rounded up to a power of two, at least 4 KiB).
pub fn create(capacity: usize) -> Result<RingFds, IpcError> {
    let cap = capacity.max(4096).next_power_of_two();
    let mfd = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .create("spore-ring")
        .map_err(|e| IpcError::Sys {
            what: "memfd_create",
            source: std::io::Error::other(e.to_string()),
        })?;
    let file = mfd.into_file();
    file.set_len((HEADER + cap) as u64)
        .map_err(sys("sizing the ring"))?;
    let map = MmapRaw::map_raw(&file).map_err(sys("mapping the ring"))?;
    // SAFETY: the mapping is HEADER + cap bytes long, writable, and not yet shared with
    // anyone; the two words written are 8-aligned (the mapping is page-aligned).
    unsafe {
        (map.as_mut_ptr().add(8) as *mut u64).write_volatile(cap as u64);
        (map.as_mut_ptr() as *mut u64).write_volatile(MAGIC);
    }
    let bell = || {
        nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )
        .map(OwnedFd::from)
        .map_err(errno("eventfd"))
    };
    Ok(RingFds {
        memory: file.into(),
        data_ready: bell()?,
        space_ready: bell()?,
    })
}

/// One end's view of a ring.
struct Shared {
    map: MmapRaw,
    cap: u64,
    fds: RingFds,
}

impl Shared {
    fn open(fds: RingFds) -> Result<Shared, IpcError> {
        let file = std::fs::File::from(fds.memory.try_clone().map_err(sys("dup"))?);
        let len = file.metadata().map_err(sys("stat of the ring"))?.len();
        if len < (HEADER + 4096) as u64 {
            return Err(IpcError::Corrupt(format!(
                "ring memory of {len} bytes is too small"
            )));
        }
        let map = MmapRaw::map_raw(&file).map_err(sys("mapping the ring"))?;
        // SAFETY: the mapping is at least HEADER bytes long (checked) and page-aligned.
        let (magic, cap) = unsafe {
            (
                (map.as_ptr() as *const u64).read_volatile(),
                (map.as_ptr().add(8) as *const u64).read_volatile(),
            )
        };
        if magic != MAGIC {
            return Err(IpcError::Corrupt("bad magic".into()));
        }
        if !cap.is_power_of_two() || cap < 4096 || HEADER as u64 + cap != len {
            return Err(IpcError::Corrupt(format!(
                "capacity {cap} does not match the ring's {len} bytes"
            )));
        }
        Ok(Shared { map, cap, fds })
    }

    fn atomic64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the 8-aligned header offsets, inside the mapping, which
        // lives as long as `self`; other processes only ever access it atomically too.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    fn atomic32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as for `atomic64`, with a 4-aligned offset.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HEADER is within the mapping (checked at open).
        unsafe { self.map.as_mut_ptr().add(HEADER) }
    }

    fn ring(bell: &OwnedFd) {
        let _ = nix::unistd::write(bell, &1u64.to_ne_bytes());
    }

    /// Waits for `bell` until `deadline`; clears it.
    fn wait(bell: &OwnedFd, deadline: Instant, timeout: Duration) -> Result<(), IpcError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(IpcError::Timeout(timeout));
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(bell.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(errno("poll")(e)),
        }
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(bell, &mut buf);
        Ok(())
    }
}

/// Spins while `word` still holds `seen`, for at most `spin`; true if it changed.
fn spin_until(word: &AtomicU64, seen: u64, spin: Duration) -> bool {
    if spin.is_zero() {
        return false;
    }
    let until = Instant::now() + spin;
    while Instant::now() < until {
        if word.load(Ordering::Acquire) != seen {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

fn padded(len: u64) -> u64 {
    (len + 7) & !7
}

/// The sending end.
pub struct Producer {
    s: Shared,
    tail: u64,
    spin: Duration,
}

impl Producer {
    /// Opens the producing end of a ring.
    pub fn open(fds: RingFds) -> Result<Producer, IpcError> {
        let s = Shared::open(fds)?;
        let tail = s.atomic64(TAIL_OFF).load(Ordering::Acquire);
        Ok(Producer {
            s,
            tail,
            spin: Duration::ZERO,
        })
    }

    /// Polls for space this long before sleeping on the doorbell (trades CPU for latency).
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// The largest message this ring takes.
    pub fn max_message(&self) -> usize {
        (self.s.cap / 2 - RECORD) as usize
    }

    /// Sends one message, waiting up to `timeout` for space.
    pub fn send(&mut self, msg: &[u8], timeout: Duration) -> Result<(), IpcError> {
        let cap = self.s.cap;
        if msg.len() > self.max_message() {
            return Err(IpcError::TooLarge {
                len: msg.len(),
                limit: self.max_message(),
            });
        }
        let need = RECORD + padded(msg.len() as u64);
        let deadline = Instant::now() + timeout;
        loop {
            let head = self.s.atomic64(HEAD_OFF).load(Ordering::Acquire);
            let used = self.tail.wrapping_sub(head);
            if used > cap {
                return Err(IpcError::Corrupt(format!(
                    "consumer position {head} is not within the ring (tail {})",
                    self.tail
                )));
            }
            let pos = self.tail % cap;
            let to_end = cap - pos;
            let total = if need <= to_end { need } else { to_end + need };
            if cap - used >= total {
                let mut at = pos;
                if need > to_end {
                    self.write_record(at, 0, KIND_WRAP);
                    at = 0;
                }
                self.write_record(at, msg.len() as u32, KIND_MESSAGE);
                // SAFETY: `at + RECORD + len <= cap` (the record fits before the end, checked
                // through `total`), so the copy stays inside the data area; the consumer does
                // not read these bytes until the tail moves past them (Release below).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        msg.as_ptr(),
                        self.s.data().add((at + RECORD) as usize),
                        msg.len(),
                    );
                }
                self.tail += total;
                self.s
                    .atomic64(TAIL_OFF)
                    .store(self.tail, Ordering::Release);
                if self.s.atomic32(CONSUMER_WAITING_OFF).load(Ordering::SeqCst) != 0 {
                    Shared::ring(&self.s.fds.data_ready);
                }
                return Ok(());
            }
            // Full: spin a little, then say so, look again (the consumer may have just made
            // room), and sleep.
            if spin_until(self.s.atomic64(HEAD_OFF), head, self.spin) {
                continue;
            }
            self.s
                .atomic32(PRODUCER_WAITING_OFF)
                .store(1, Ordering::SeqCst);
            if self.s.atomic64(HEAD_OFF).load(Ordering::SeqCst) == head {
                Shared::wait(&self.s.fds.space_ready, deadline, timeout)?;
            }
            self.s
                .atomic32(PRODUCER_WAITING_OFF)
                .store(0, Ordering::SeqCst);
        }
    }

    fn write_record(&self, at: u64, len: u32, kind: u32) {
        let mut rec = [0u8; 8];
        rec[..4].copy_from_slice(&len.to_le_bytes());
        rec[4..].copy_from_slice(&kind.to_le_bytes());
        // SAFETY: records start 8-aligned and `at + RECORD <= cap` (positions advance in
        // multiples of 8 within a power-of-two capacity), inside the data area.
        unsafe { std::ptr::copy_nonoverlapping(rec.as_ptr(), self.s.data().add(at as usize), 8) };
    }
}

/// The receiving end.
pub struct Consumer {
    s: Shared,
    head: u64,
    spin: Duration,
}

impl Consumer {
    /// Opens the consuming end of a ring.
    pub fn open(fds: RingFds) -> Result<Consumer, IpcError> {
        let s = Shared::open(fds)?;
        let head = s.atomic64(HEAD_OFF).load(Ordering::Acquire);
        Ok(Consumer {
            s,
            head,
            spin: Duration::ZERO,
        })
    }

    /// Polls for data this long before sleeping on the doorbell (trades CPU for latency).
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Receives one message, waiting up to `timeout` for one.
    pub fn recv(&mut self, timeout: Duration) -> Result<Vec<u8>, IpcError> {
        let cap = self.s.cap;
        let deadline = Instant::now() + timeout;
        loop {
            let tail = self.s.atomic64(TAIL_OFF).load(Ordering::Acquire);
            let avail = tail.wrapping_sub(self.head);
            if avail > cap {
                return Err(IpcError::Corrupt(format!(
                    "producer position {tail} is not within the ring (head {})",
                    self.head
                )));
            }
            if avail == 0 {
                if spin_until(self.s.atomic64(TAIL_OFF), tail, self.spin) {
                    continue;
                }
                self.s
                    .atomic32(CONSUMER_WAITING_OFF)
                    .store(1, Ordering::SeqCst);
                if self.s.atomic64(TAIL_OFF).load(Ordering::SeqCst) == tail {
                    Shared::wait(&self.s.fds.data_ready, deadline, timeout)?;
                }
                self.s
                    .atomic32(CONSUMER_WAITING_OFF)
                    .store(0, Ordering::SeqCst);
                continue;
            }
            let pos = self.head % cap;
            if avail < RECORD || cap - pos < RECORD {
                return Err(IpcError::Corrupt("truncated record header".into()));
            }
            let mut rec = [0u8; 8];
            // SAFETY: `pos + RECORD <= cap` (checked), inside the data area; the bytes were
            // published by the producer's Release store of `tail` (Acquire load above).
            unsafe {
                std::ptr::copy_nonoverlapping(self.s.data().add(pos as usize), rec.as_mut_ptr(), 8)
            };
            let len = u64::from(u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]));
            let kind = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
            let step = match kind {
                KIND_WRAP => cap - pos,
                KIND_MESSAGE => RECORD + padded(len),
                other => return Err(IpcError::Corrupt(format!("unknown record kind {other}"))),
            };
            if step > avail || (kind == KIND_MESSAGE && step > cap - pos) {
                return Err(IpcError::Corrupt(format!(
                    "record of {len} bytes runs past the written data"
                )));
            }
            let msg = if kind == KIND_MESSAGE {
                let mut out = vec![0u8; len as usize];
                // SAFETY: `pos + RECORD + len <= cap` (checked through `step`), inside the
                // data area, published before `tail` as above.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.s.data().add((pos + RECORD) as usize),
                        out.as_mut_ptr(),
                        len as usize,
                    )
                };
                Some(out)
            } else {
                None
            };
            self.head += step;
            self.s
                .atomic64(HEAD_OFF)
                .store(self.head, Ordering::Release);
            if self.s.atomic32(PRODUCER_WAITING_OFF).load(Ordering::SeqCst) != 0 {
                Shared::ring(&self.s.fds.space_ready);
            }
            if let Some(m) = msg {
                return Ok(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn messages_cross_threads_in_order_through_wraps_and_full_rings() {
        let fds = create(4096).unwrap();
        let mut p = Producer::open(fds.try_clone().unwrap()).unwrap();
        let mut c = Consumer::open(fds).unwrap();
        let n = 5000usize;
        let sender = std::thread::spawn(move || {
            for i in 0..n {
                let msg = vec![(i % 251) as u8; i % 700];
                p.send(&msg, T).unwrap();
            }
        });
        for i in 0..n {
            let m = c.recv(T).unwrap();
            assert_eq!(m.len(), i % 700, "message {i}");
            assert!(m.iter().all(|&b| b == (i % 251) as u8));
        }
        sender.join().unwrap();
    }

    #[test]
    fn timeouts_and_limits() {
        let fds = create(4096).unwrap();
        let mut p = Producer::open(fds.try_clone().unwrap()).unwrap();
        let mut c = Consumer::open(fds).unwrap();
        let t0 = Instant::now();
        assert!(matches!(
            c.recv(Duration::from_millis(50)),
            Err(IpcError::Timeout(_))
        ));
        assert!(t0.elapsed() >= Duration::from_millis(40));
        assert!(matches!(
            p.send(&vec![0; 5000], T),
            Err(IpcError::TooLarge { .. })
        ));
        // Fill it; the next send times out instead of blocking for ever.
        let chunk = vec![1u8; 1000];
        let mut sent = 0;
        while p.send(&chunk, Duration::from_millis(20)).is_ok() {
            sent += 1;
        }
        assert!(sent >= 3);
        assert_eq!(c.recv(T).unwrap(), chunk);
        p.send(&chunk, T).unwrap();
    }

    #[test]
    fn a_corrupted_ring_is_an_error_not_a_crash() {
        let fds = create(4096).unwrap();
        let mut p = Producer::open(fds.try_clone().unwrap()).unwrap();
        let mut c = Consumer::open(fds.try_clone().unwrap()).unwrap();
        p.send(b"hello", T).unwrap();
        // A hostile producer rewrites the record header with an absurd length.
        let raw = Shared::open(fds.try_clone().unwrap()).unwrap();
        // SAFETY: the first record header is at the start of the data area.
        unsafe { std::ptr::copy_nonoverlapping(u32::MAX.to_le_bytes().as_ptr(), raw.data(), 4) };
        assert!(matches!(c.recv(T), Err(IpcError::Corrupt(_))));
        // ... or moves the tail far ahead.
        raw.atomic64(TAIL_OFF).store(u64::MAX / 2, Ordering::SeqCst);
        assert!(matches!(c.recv(T), Err(IpcError::Corrupt(_))));
        // A memfd that is not a ring is refused at open.
        let other = create(4096).unwrap();
        let file = std::fs::File::from(other.memory.try_clone().unwrap());
        file.set_len(100).unwrap();
        assert!(matches!(Consumer::open(other), Err(IpcError::Corrupt(_))));
    }

    proptest! {
        #[test]
        fn any_sequence_round_trips(sizes in proptest::collection::vec(0usize..2000, 1..60)) {
            let fds = create(8192).unwrap();
            let mut p = Producer::open(fds.try_clone().unwrap()).unwrap();
            let mut c = Consumer::open(fds).unwrap();
            for (i, len) in sizes.iter().enumerate() {
                let msg: Vec<u8> = (0..*len).map(|k| (k + i) as u8).collect();
                p.send(&msg, T).unwrap();
                prop_assert_eq!(c.recv(T).unwrap(), msg);
            }
        }
    }
}
