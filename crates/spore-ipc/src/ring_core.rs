//! The ring's layout and algorithm on a raw mapping, with no dependencies beyond `std`.
//!
//! This one file is compiled twice: into `spore-ipc` (the daemon's and benchmarks' side, see
//! `ring.rs`) and into the small native library that Python runtimes load with ctypes (see
//! `native/spore_ipc_py.rs`, built by `build.rs`), so that both ends of a ring run the same
//! code. Waiting on and ringing doorbells is left to the caller through [`Bells`].
//!
//! Layout: a 4 KiB header page, then `capacity` data bytes (a power of two). The header holds
//! a magic number, the capacity, the producer's `tail` and the consumer's `head` (byte
//! positions that only grow, each on its own cache line) and two "waiting" flags. A message is
//! an 8-byte record header (`u32` length, `u32` kind) and the payload padded to 8 bytes; a
//! record that would cross the end of the buffer is preceded by a wrap marker. A side rings
//! its peer's doorbell only when the peer said it is waiting, so a busy pipeline costs no
//! system calls.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const MAGIC: u64 = 0x5350_4f52_4552_4e47; // "SPORERNG"
pub const HEADER: usize = 4096;
pub const MIN_CAPACITY: usize = 4096;
const CAP_OFF: usize = 8;
const TAIL_OFF: usize = 64;
const PRODUCER_WAITING_OFF: usize = 72;
const HEAD_OFF: usize = 128;
const CONSUMER_WAITING_OFF: usize = 136;
const RECORD: u64 = 8;
const KIND_MESSAGE: u32 = 0;
const KIND_WRAP: u32 = 1;

/// What can go wrong on a ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// The message exceeds the ring's limit.
    TooLarge { len: usize, limit: usize },
    /// The peer made no progress in time.
    Timeout,
    /// The shared state is inconsistent (a buggy or hostile peer).
    Corrupt(String),
}

/// The doorbells of one ring end.
pub trait Bells {
    /// Wakes the peer (it said it is waiting).
    fn ring(&self);
    /// Sleeps until the peer rings or `left` passes, then clears the bell.
    fn wait(&self, left: Duration);
}

/// A validated view of a ring mapping.
pub struct View {
    base: *mut u8,
    cap: u64,
}

// SAFETY: the view only touches shared memory through atomics and bounds-checked copies;
// moving it to another thread changes nothing about that.
unsafe impl Send for View {}

/// The size of the mapping for `capacity` (rounded up to a power of two, at least 4 KiB).
pub fn mapping_len(capacity: usize) -> usize {
    HEADER + capacity.max(MIN_CAPACITY).next_power_of_two()
}

impl View {
    /// Writes a fresh header into a new mapping of `len` bytes (from [`mapping_len`]).
    ///
    /// # Safety
    /// `base` must point to `len` writable, zeroed bytes, page-aligned, not yet shared.
    pub unsafe fn init(base: *mut u8, len: usize) {
        // SAFETY: per the contract, both words are inside the mapping and 8-aligned.
        unsafe {
            (base.add(CAP_OFF) as *mut u64).write_volatile((len - HEADER) as u64);
            (base as *mut u64).write_volatile(MAGIC);
        }
    }

    /// Checks the header of a mapping of `len` bytes.
    ///
    /// # Safety
    /// `base` must point to `len` readable and writable bytes, page-aligned, that stay mapped
    /// for as long as the view lives.
    pub unsafe fn open(base: *mut u8, len: usize) -> Result<View, CoreError> {
        if len < HEADER + MIN_CAPACITY {
            return Err(CoreError::Corrupt(format!(
                "ring memory of {len} bytes is too small"
            )));
        }
        // SAFETY: the first two words are inside the mapping (len checked) and 8-aligned.
        let (magic, cap) = unsafe {
            (
                (base as *const u64).read_volatile(),
                (base.add(CAP_OFF) as *const u64).read_volatile(),
            )
        };
        if magic != MAGIC {
            return Err(CoreError::Corrupt("bad magic".into()));
        }
        if !cap.is_power_of_two() || cap < MIN_CAPACITY as u64 || HEADER as u64 + cap != len as u64
        {
            return Err(CoreError::Corrupt(format!(
                "capacity {cap} does not match the ring's {len} bytes"
            )));
        }
        Ok(View { base, cap })
    }

    fn atomic64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the 8-aligned header offsets, inside the mapping, which
        // lives as long as `self`; other processes only ever access it atomically too.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn atomic32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as for `atomic64`, with a 4-aligned offset.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HEADER is within the mapping (checked at open).
        unsafe { self.base.add(HEADER) }
    }

    /// The largest message this ring takes.
    pub fn max_message(&self) -> usize {
        (self.cap / 2 - RECORD) as usize
    }

    /// Overwrites the producer's position, for tests that play a hostile peer.
    #[cfg(test)]
    pub fn corrupt_tail(&self, tail: u64) {
        self.atomic64(TAIL_OFF).store(tail, Ordering::SeqCst);
    }

    /// Overwrites the first record header's length, for tests that play a hostile peer.
    #[cfg(test)]
    pub fn corrupt_first_len(&self, len: u32) {
        // SAFETY: the first record header is at the start of the data area.
        unsafe { std::ptr::copy_nonoverlapping(len.to_le_bytes().as_ptr(), self.data(), 4) };
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

/// Sleeps on `bells` unless `word` moved past `seen` after `flag` was raised, so that a
/// doorbell rung between the last look and the flag is never lost.
fn park(
    v: &View,
    flag: usize,
    word: usize,
    seen: u64,
    bells: &dyn Bells,
    deadline: Instant,
) -> Result<(), CoreError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(CoreError::Timeout);
    }
    v.atomic32(flag).store(1, Ordering::SeqCst);
    if v.atomic64(word).load(Ordering::SeqCst) == seen {
        bells.wait(left);
    }
    v.atomic32(flag).store(0, Ordering::SeqCst);
    Ok(())
}

/// The sending end's algorithm.
pub struct ProducerCore {
    v: View,
    tail: u64,
    /// Polls for space this long before sleeping on the doorbell.
    pub spin: Duration,
}

impl ProducerCore {
    /// Takes the sending end of a checked view.
    pub fn new(v: View) -> ProducerCore {
        let tail = v.atomic64(TAIL_OFF).load(Ordering::Acquire);
        ProducerCore {
            v,
            tail,
            spin: Duration::ZERO,
        }
    }

    /// The view.
    pub fn view(&self) -> &View {
        &self.v
    }

    /// Sends one message, waiting up to `timeout` for space; `peer` is the consumer's bell.
    pub fn send(
        &mut self,
        msg: &[u8],
        timeout: Duration,
        peer: &dyn Bells,
        own: &dyn Bells,
    ) -> Result<(), CoreError> {
        let cap = self.v.cap;
        if msg.len() > self.v.max_message() {
            return Err(CoreError::TooLarge {
                len: msg.len(),
                limit: self.v.max_message(),
            });
        }
        let need = RECORD + padded(msg.len() as u64);
        let deadline = Instant::now() + timeout;
        loop {
            let head = self.v.atomic64(HEAD_OFF).load(Ordering::Acquire);
            let used = self.tail.wrapping_sub(head);
            if used > cap {
                return Err(CoreError::Corrupt(format!(
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
                        self.v.data().add((at + RECORD) as usize),
                        msg.len(),
                    );
                }
                self.tail += total;
                // SeqCst, not Release: this store and the load of the consumer's flag below
                // must not be reordered (a Release store may still sit in this CPU's store
                // buffer when the flag is read: the consumer then sees the old tail after
                // raising its flag, this side sees no flag, and the wake-up is lost). `park`
                // is the other half of this Dekker pair.
                self.v.atomic64(TAIL_OFF).store(self.tail, Ordering::SeqCst);
                if self.v.atomic32(CONSUMER_WAITING_OFF).load(Ordering::SeqCst) != 0 {
                    peer.ring();
                }
                return Ok(());
            }
            if !spin_until(self.v.atomic64(HEAD_OFF), head, self.spin) {
                park(&self.v, PRODUCER_WAITING_OFF, HEAD_OFF, head, own, deadline)?;
            }
        }
    }

    fn write_record(&self, at: u64, len: u32, kind: u32) {
        let mut rec = [0u8; 8];
        rec[..4].copy_from_slice(&len.to_le_bytes());
        rec[4..].copy_from_slice(&kind.to_le_bytes());
        // SAFETY: records start 8-aligned and `at + RECORD <= cap` (positions advance in
        // multiples of 8 within a power-of-two capacity), inside the data area.
        unsafe { std::ptr::copy_nonoverlapping(rec.as_ptr(), self.v.data().add(at as usize), 8) };
    }
}

/// The receiving end's algorithm.
pub struct ConsumerCore {
    v: View,
    head: u64,
    /// Polls for data this long before sleeping on the doorbell.
    pub spin: Duration,
}

impl ConsumerCore {
    /// Takes the receiving end of a checked view.
    pub fn new(v: View) -> ConsumerCore {
        let head = v.atomic64(HEAD_OFF).load(Ordering::Acquire);
        ConsumerCore {
            v,
            head,
            spin: Duration::ZERO,
        }
    }

    /// The view.
    pub fn view(&self) -> &View {
        &self.v
    }

    /// Receives one message, waiting up to `timeout`; `take` gets the message's bytes in
    /// the ring (valid only during the call). `peer` is the producer's bell.
    pub fn recv<R>(
        &mut self,
        timeout: Duration,
        peer: &dyn Bells,
        own: &dyn Bells,
        take: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, CoreError> {
        let cap = self.v.cap;
        let deadline = Instant::now() + timeout;
        let mut take = Some(take);
        loop {
            let tail = self.v.atomic64(TAIL_OFF).load(Ordering::Acquire);
            let avail = tail.wrapping_sub(self.head);
            if avail > cap {
                return Err(CoreError::Corrupt(format!(
                    "producer position {tail} is not within the ring (head {})",
                    self.head
                )));
            }
            if avail == 0 {
                if !spin_until(self.v.atomic64(TAIL_OFF), tail, self.spin) {
                    park(&self.v, CONSUMER_WAITING_OFF, TAIL_OFF, tail, own, deadline)?;
                }
                continue;
            }
            let pos = self.head % cap;
            if avail < RECORD || cap - pos < RECORD {
                return Err(CoreError::Corrupt("truncated record header".into()));
            }
            let mut rec = [0u8; 8];
            // SAFETY: `pos + RECORD <= cap` (checked), inside the data area; the bytes were
            // published by the producer's Release store of `tail` (Acquire load above).
            unsafe {
                std::ptr::copy_nonoverlapping(self.v.data().add(pos as usize), rec.as_mut_ptr(), 8)
            };
            let len = u64::from(u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]));
            let kind = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
            let step = match kind {
                KIND_WRAP => cap - pos,
                KIND_MESSAGE => RECORD + padded(len),
                other => return Err(CoreError::Corrupt(format!("unknown record kind {other}"))),
            };
            if step > avail || (kind == KIND_MESSAGE && step > cap - pos) {
                return Err(CoreError::Corrupt(format!(
                    "record of {len} bytes runs past the written data"
                )));
            }
            let out = if kind == KIND_MESSAGE {
                // SAFETY: `pos + RECORD + len <= cap` (checked through `step`), inside the
                // data area, published before `tail` as above; the producer does not reuse
                // these bytes before `head` moves past them, after `take` returns.
                let msg = unsafe {
                    std::slice::from_raw_parts(
                        self.v.data().add((pos + RECORD) as usize),
                        len as usize,
                    )
                };
                take.take().map(|f| f(msg))
            } else {
                None
            };
            self.head += step;
            // SeqCst for the reason given in `ProducerCore::send`.
            self.v.atomic64(HEAD_OFF).store(self.head, Ordering::SeqCst);
            if self.v.atomic32(PRODUCER_WAITING_OFF).load(Ordering::SeqCst) != 0 {
                peer.ring();
            }
            if let Some(r) = out {
                return Ok(r);
            }
        }
    }
}
