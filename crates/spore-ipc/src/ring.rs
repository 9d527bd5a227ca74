//! A bounded single-producer single-consumer ring of messages in a shared memfd, with eventfd
//! doorbells.
//!
//! The layout and algorithm live in `ring_core.rs`, shared with the native library that
//! Python runtimes load (see [`crate::PY_NATIVE_LIB`]); this module adds the memfd, the
//! mapping and the eventfds.
//!
//! Hand-written rather than taken from a crate: the ring lives between processes that do not
//! trust each other and one side is a Python runtime, so its layout must be simple, fixed and
//! fully validated on every read.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use memmap2::MmapRaw;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EfdFlags;

use crate::ring_core::{self, Bells, ConsumerCore, CoreError, ProducerCore, View};
use crate::{errno, sys, IpcError};

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
    let len = ring_core::mapping_len(capacity);
    let (file, map) = crate::mapped_memfd("spore-ring", len)?;
    // SAFETY: the mapping is `len` bytes long, writable, zeroed (a fresh memfd), page-aligned
    // and not yet shared with anyone.
    unsafe { View::init(map.as_mut_ptr(), len) };
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

/// An eventfd doorbell.
struct Bell(OwnedFd);

impl Bells for Bell {
    fn ring(&self) {
        let _ = nix::unistd::write(&self.0, &1u64.to_ne_bytes());
    }

    fn wait(&self, left: Duration) {
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        // An error (EINTR) only ends this wait early; the caller looks again.
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(ms));
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(&self.0, &mut buf);
    }
}

fn core_error(e: CoreError, timeout: Duration) -> IpcError {
    match e {
        CoreError::TooLarge { len, limit } => IpcError::TooLarge { len, limit },
        CoreError::Timeout => IpcError::Timeout(timeout),
        CoreError::Corrupt(what) => IpcError::Corrupt(what),
    }
}

/// One end's mapping and bells.
struct Shared {
    // Keeps the mapping behind the core's view alive.
    _map: MmapRaw,
    data_ready: Bell,
    space_ready: Bell,
}

fn open(fds: RingFds) -> Result<(Shared, View), IpcError> {
    let file = std::fs::File::from(fds.memory);
    let len = file.metadata().map_err(sys("stat of the ring"))?.len();
    let len = usize::try_from(len)
        .map_err(|_| IpcError::Corrupt(format!("ring memory of {len} bytes")))?;
    let map = MmapRaw::map_raw(&file).map_err(sys("mapping the ring"))?;
    // SAFETY: the mapping is `len` bytes, readable and writable, page-aligned, and lives in
    // `Shared` beside the view for as long as the view does.
    let view =
        unsafe { View::open(map.as_mut_ptr(), len) }.map_err(|e| core_error(e, Duration::ZERO))?;
    Ok((
        Shared {
            _map: map,
            data_ready: Bell(fds.data_ready),
            space_ready: Bell(fds.space_ready),
        },
        view,
    ))
}

/// The sending end.
pub struct Producer {
    core: ProducerCore,
    s: Shared,
}

impl Producer {
    /// Opens the producing end of a ring.
    pub fn open(fds: RingFds) -> Result<Producer, IpcError> {
        let (s, view) = open(fds)?;
        Ok(Producer {
            core: ProducerCore::new(view),
            s,
        })
    }

    /// Polls for space this long before sleeping on the doorbell (trades CPU for latency).
    pub fn set_spin(&mut self, spin: Duration) {
        self.core.spin = spin;
    }

    /// The largest message this ring takes.
    pub fn max_message(&self) -> usize {
        self.core.view().max_message()
    }

    /// Sends one message, waiting up to `timeout` for space.
    pub fn send(&mut self, msg: &[u8], timeout: Duration) -> Result<(), IpcError> {
        self.core
            .send(msg, timeout, &self.s.data_ready, &self.s.space_ready)
            .map_err(|e| core_error(e, timeout))
    }
}

/// The receiving end.
pub struct Consumer {
    core: ConsumerCore,
    s: Shared,
}

impl Consumer {
    /// Opens the consuming end of a ring.
    pub fn open(fds: RingFds) -> Result<Consumer, IpcError> {
        let (s, view) = open(fds)?;
        Ok(Consumer {
            core: ConsumerCore::new(view),
            s,
        })
    }

    /// Polls for data this long before sleeping on the doorbell (trades CPU for latency).
    pub fn set_spin(&mut self, spin: Duration) {
        self.core.spin = spin;
    }

    /// Receives one message, waiting up to `timeout` for one.
    pub fn recv(&mut self, timeout: Duration) -> Result<Vec<u8>, IpcError> {
        self.core
            .recv(
                timeout,
                &self.s.space_ready,
                &self.s.data_ready,
                <[u8]>::to_vec,
            )
            .map_err(|e| core_error(e, timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;

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
    fn no_wake_up_is_lost_in_a_ping_pong() {
        // Two rings, two threads, one message in flight: this side's receives sleep on the
        // doorbell, racing the peer's send. A lost wake-up (the sender missing the
        // receiver's waiting flag) shows up as a receive that times out with the message
        // already in the ring.
        let (ab, ba) = (create(4096).unwrap(), create(4096).unwrap());
        let mut a_tx = Producer::open(ab.try_clone().unwrap()).unwrap();
        let mut b_rx = Consumer::open(ab).unwrap();
        // The echo polls, so its reply lands while this side is still on its way to sleep:
        // the window in which a wake-up can be lost.
        b_rx.set_spin(Duration::from_millis(5));
        let mut b_tx = Producer::open(ba.try_clone().unwrap()).unwrap();
        let mut a_rx = Consumer::open(ba).unwrap();
        let n = 100_000u32;
        let wait = Duration::from_secs(2);
        let echo = std::thread::spawn(move || {
            for _ in 0..n {
                let m = b_rx.recv(wait).expect("b waits");
                b_tx.send(&m, wait).unwrap();
            }
        });
        let mut stalls = 0;
        for i in 0..n {
            let t = Instant::now();
            a_tx.send(&i.to_le_bytes(), wait).unwrap();
            let m = a_rx
                .recv(wait)
                .unwrap_or_else(|e| panic!("round trip {i}: {e}"));
            assert_eq!(m, i.to_le_bytes());
            // A lost wake-up sleeps until the receive's timeout, then finds the message.
            if t.elapsed() > wait / 2 {
                stalls += 1;
            }
        }
        echo.join().unwrap();
        assert_eq!(
            stalls, 0,
            "{stalls} of {n} round trips waited out their timeout"
        );
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
        let (_keep, raw) = open(fds.try_clone().unwrap()).unwrap();
        raw.corrupt_first_len(u32::MAX);
        assert!(matches!(c.recv(T), Err(IpcError::Corrupt(_))));
        // ... or moves the tail far ahead.
        raw.corrupt_tail(u64::MAX / 2);
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
