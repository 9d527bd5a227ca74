//! Rings for Python runtimes: the ring of `spore-ipc` (the very same `ring_core.rs`) behind a
//! small C interface that the runtime calls through ctypes.
//!
//! Compiled by `build.rs` with the workspace's `rustc` into a shared object with no crates
//! (only `std` and a few libc calls declared below), embedded in the daemon and written next
//! to the runtime's bootstrap. Python cannot order its stores and loads the way the ring's
//! wake-up protocol needs (a store-load fence), hence native code.
//!
//! Return codes: `0` (or a length) on success, [`TIMEOUT`], [`TOO_LARGE`], [`CORRUPT`],
//! [`BAD_ARG`]; `spore_ring_error` gives the last error's text.
#![allow(clippy::missing_safety_doc)]

#[path = "../src/ring_core.rs"]
mod ring_core;

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::Duration;

use ring_core::{Bells, ConsumerCore, CoreError, ProducerCore, View};

const TIMEOUT: isize = -1;
const TOO_LARGE: isize = -2;
const CORRUPT: isize = -3;
const BAD_ARG: isize = -4;

const PROT_READ: c_int = 1;
const PROT_WRITE: c_int = 2;
const MAP_SHARED: c_int = 1;
const POLLIN: i16 = 1;

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: i16,
    revents: i16,
}

extern "C" {
    fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> c_int;
    fn poll(fds: *mut PollFd, n: u64, timeout: c_int) -> c_int;
    fn read(fd: c_int, buf: *mut c_void, n: usize) -> isize;
    fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    fn close(fd: c_int) -> c_int;
    fn recvmsg(fd: c_int, msg: *mut MsgHdr, flags: c_int) -> isize;
    fn sendmsg(fd: c_int, msg: *const MsgHdr, flags: c_int) -> isize;
}

#[repr(C)]
struct IoVec {
    base: *mut c_void,
    len: usize,
}

#[repr(C)]
struct MsgHdr {
    name: *mut c_void,
    namelen: u32,
    iov: *mut IoVec,
    iovlen: usize,
    control: *mut c_void,
    controllen: usize,
    flags: c_int,
}

#[repr(C)]
struct CmsgHdr {
    len: usize,
    level: c_int,
    kind: c_int,
}

const SOL_SOCKET: c_int = 1;
const SCM_RIGHTS: c_int = 1;
const MSG_CMSG_CLOEXEC: c_int = 0x4000_0000;
const MSG_NOSIGNAL: c_int = 0x4000;
/// Most descriptors one `spore_fds_recv` takes.
const MAX_FDS: usize = 252;

thread_local! {
    static LAST: RefCell<String> = const { RefCell::new(String::new()) };
}

fn fail(code: isize, what: String) -> isize {
    LAST.with(|l| *l.borrow_mut() = what);
    code
}

fn core_fail(e: CoreError) -> isize {
    match e {
        CoreError::Timeout => fail(TIMEOUT, "timed out waiting for the peer".into()),
        CoreError::TooLarge { len, limit } => fail(
            TOO_LARGE,
            format!("message of {len} bytes exceeds the ring's limit of {limit} bytes"),
        ),
        CoreError::Corrupt(what) => fail(CORRUPT, format!("corrupt ring: {what}")),
    }
}

/// An eventfd doorbell (owned).
struct Efd(c_int);

impl Bells for Efd {
    fn ring(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to an fd we own.
        let _ = unsafe { write(self.0, (&one as *const u64).cast(), 8) };
    }

    fn wait(&self, left: Duration) {
        let ms = c_int::try_from(left.as_millis().max(1)).unwrap_or(c_int::MAX);
        let mut p = PollFd { fd: self.0, events: POLLIN, revents: 0 };
        let mut buf = 0u64;
        // SAFETY: one valid pollfd; the read fills at most 8 bytes of a live u64 (the fd is
        // non-blocking, so an empty bell returns EAGAIN at once).
        unsafe {
            poll(&mut p, 1, ms);
            read(self.0, (&mut buf as *mut u64).cast(), 8);
        }
    }
}

impl Drop for Efd {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed once.
        unsafe { close(self.0) };
    }
}

enum End {
    Producer(ProducerCore),
    Consumer(ConsumerCore),
}

/// One end of a ring, as Python holds it (an opaque pointer).
pub struct Ring {
    end: End,
    map: *mut c_void,
    len: usize,
    data_ready: Efd,
    space_ready: Efd,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `spore_ring_open` with this length and is unmapped
        // once; the core that pointed into it is dropped with `self`, unused from here on.
        unsafe { munmap(self.map, self.len) };
    }
}

/// The text of the calling thread's last error; returns its length (copied up to `cap`).
#[no_mangle]
pub unsafe extern "C" fn spore_ring_error(buf: *mut u8, cap: usize) -> usize {
    LAST.with(|l| {
        let l = l.borrow();
        let n = l.len().min(cap);
        if !buf.is_null() {
            // SAFETY: the caller gives `cap` writable bytes at `buf`; n <= cap.
            unsafe { std::ptr::copy_nonoverlapping(l.as_ptr(), buf, n) };
        }
        l.len()
    })
}

/// Opens one end of a ring, taking ownership of the three descriptors (closed on failure
/// too). Returns null on failure (see `spore_ring_error`).
#[no_mangle]
pub unsafe extern "C" fn spore_ring_open(memory: c_int, data_ready: c_int, space_ready: c_int, producer: c_int) -> *mut Ring {
    let data_ready = Efd(data_ready);
    let space_ready = Efd(space_ready);
    // SAFETY: the caller hands over ownership of `memory`.
    let file = unsafe { std::fs::File::from_raw_fd(memory) };
    let len = match file.metadata() {
        Ok(m) => m.len() as usize,
        Err(e) => {
            fail(BAD_ARG, format!("stat of the ring: {e}"));
            return std::ptr::null_mut();
        }
    };
    let fd = file.into_raw_fd();
    // SAFETY: maps `len` bytes of the memfd shared; checked for failure below.
    let map = unsafe { mmap(std::ptr::null_mut(), len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) };
    // SAFETY: the fd is ours; the mapping keeps the memory alive without it.
    unsafe { close(fd) };
    if map as isize == -1 {
        fail(BAD_ARG, format!("mapping the ring: {}", std::io::Error::last_os_error()));
        return std::ptr::null_mut();
    }
    // SAFETY: `map` is `len` readable, writable, page-aligned bytes that live in the `Ring`
    // beside the view (unmapped only when it is dropped).
    let view = match unsafe { View::open(map.cast(), len) } {
        Ok(v) => v,
        Err(e) => {
            core_fail(e);
            // SAFETY: the mapping made above, unused by anyone else.
            unsafe { munmap(map, len) };
            return std::ptr::null_mut();
        }
    };
    let end = if producer != 0 {
        End::Producer(ProducerCore::new(view))
    } else {
        End::Consumer(ConsumerCore::new(view))
    };
    Box::into_raw(Box::new(Ring { end, map, len, data_ready, space_ready }))
}

/// The largest message the ring takes.
#[no_mangle]
pub unsafe extern "C" fn spore_ring_max_message(ring: *const Ring) -> usize {
    // SAFETY: the caller passes a pointer from `spore_ring_open`, not yet closed.
    let Some(r) = (unsafe { ring.as_ref() }) else { return 0 };
    match &r.end {
        End::Producer(p) => p.view().max_message(),
        End::Consumer(c) => c.view().max_message(),
    }
}

/// Sends `len` bytes from `msg`, waiting up to `timeout_ms` for space after spinning
/// `spin_us`. Returns 0 or a negative code.
#[no_mangle]
pub unsafe extern "C" fn spore_ring_send(ring: *mut Ring, msg: *const u8, len: usize, timeout_ms: u64, spin_us: u64) -> isize {
    // SAFETY: the caller passes a pointer from `spore_ring_open`, not yet closed, used by one
    // thread at a time.
    let Some(r) = (unsafe { ring.as_mut() }) else { return fail(BAD_ARG, "null ring".into()) };
    let End::Producer(p) = &mut r.end else { return fail(BAD_ARG, "send on the consuming end".into()) };
    if msg.is_null() && len > 0 {
        return fail(BAD_ARG, "null message".into());
    }
    let bytes: &[u8] = if len == 0 {
        &[]
    } else {
        // SAFETY: the caller gives `len` readable bytes at `msg`.
        unsafe { std::slice::from_raw_parts(msg, len) }
    };
    p.spin = Duration::from_micros(spin_us);
    match p.send(bytes, Duration::from_millis(timeout_ms), &r.data_ready, &r.space_ready) {
        Ok(()) => 0,
        Err(e) => core_fail(e),
    }
}

/// Receives one message into `buf` (`cap` bytes, at least the ring's largest message),
/// waiting up to `timeout_ms` after spinning `spin_us`. Returns its length or a negative code.
#[no_mangle]
pub unsafe extern "C" fn spore_ring_recv(ring: *mut Ring, buf: *mut u8, cap: usize, timeout_ms: u64, spin_us: u64) -> isize {
    // SAFETY: as in `spore_ring_send`.
    let Some(r) = (unsafe { ring.as_mut() }) else { return fail(BAD_ARG, "null ring".into()) };
    let End::Consumer(c) = &mut r.end else { return fail(BAD_ARG, "receive on the producing end".into()) };
    if buf.is_null() || cap < c.view().max_message() {
        return fail(BAD_ARG, format!("receive buffer of {cap} bytes is under the ring's message limit"));
    }
    c.spin = Duration::from_micros(spin_us);
    let got = c.recv(Duration::from_millis(timeout_ms), &r.space_ready, &r.data_ready, |m| {
        // SAFETY: m.len() <= max_message <= cap (checked above): within the caller's buffer.
        unsafe { std::ptr::copy_nonoverlapping(m.as_ptr(), buf, m.len()) };
        m.len() as isize
    });
    match got {
        Ok(n) => n,
        Err(e) => core_fail(e),
    }
}

/// Receives exactly one byte from the Unix socket `sock` with the descriptors attached to it
/// (at most `max`, and at most 252) into `fds`. Returns how many arrived, or a negative code.
#[no_mangle]
pub unsafe extern "C" fn spore_fds_recv(sock: c_int, fds: *mut c_int, max: usize) -> isize {
    let max = max.min(MAX_FDS);
    if fds.is_null() && max > 0 {
        return fail(BAD_ARG, "null descriptor array".into());
    }
    let mut byte = 0u8;
    let mut iov = IoVec { base: (&mut byte as *mut u8).cast(), len: 1 };
    // Room for a header and MAX_FDS descriptors, 8-aligned.
    let mut control = [0u64; (16 + MAX_FDS * 4) / 8 + 1];
    let mut msg = MsgHdr {
        name: std::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: control.as_mut_ptr().cast(),
        controllen: std::mem::size_of_val(&control),
        flags: 0,
    };
    // SAFETY: every pointer in `msg` refers to live locals of the sizes given.
    let n = unsafe { recvmsg(sock, &mut msg, MSG_CMSG_CLOEXEC) };
    if n != 1 {
        return fail(
            BAD_ARG,
            format!("receiving descriptors: {}", if n == 0 { "socket closed".to_string() } else { std::io::Error::last_os_error().to_string() }),
        );
    }
    let mut got = 0usize;
    let header = std::mem::size_of::<CmsgHdr>();
    if msg.controllen >= header {
        // SAFETY: the kernel wrote at least one header at the start of `control` (8-aligned).
        let c = unsafe { &*(control.as_ptr() as *const CmsgHdr) };
        if c.level == SOL_SOCKET && c.kind == SCM_RIGHTS && c.len >= header {
            let n = ((c.len - header) / 4).min(MAX_FDS);
            // SAFETY: the descriptors follow the header inside `control` (n bounded by its size).
            let data = unsafe { (control.as_ptr() as *const u8).add(header) as *const c_int };
            for i in 0..n {
                // SAFETY: i < n, inside the kernel-written data.
                let fd = unsafe { data.add(i).read_unaligned() };
                if i < max {
                    // SAFETY: i < max, inside the caller's array.
                    unsafe { *fds.add(i) = fd };
                    got += 1;
                } else {
                    // SAFETY: a descriptor we received and cannot hand on.
                    unsafe { close(fd) };
                }
            }
        }
    }
    got as isize
}

/// Sends one byte on the Unix socket `sock` with the descriptor `fd` attached.
#[no_mangle]
pub unsafe extern "C" fn spore_fd_send(sock: c_int, fd: c_int) -> isize {
    let mut byte = 0u8;
    let mut iov = IoVec { base: (&mut byte as *mut u8).cast(), len: 1 };
    let mut control = [0u64; 3];
    let header = std::mem::size_of::<CmsgHdr>();
    // SAFETY: `control` holds a header and one descriptor (24 bytes, 8-aligned).
    unsafe {
        (control.as_mut_ptr() as *mut CmsgHdr).write(CmsgHdr { len: header + 4, level: SOL_SOCKET, kind: SCM_RIGHTS });
        ((control.as_mut_ptr() as *mut u8).add(header) as *mut c_int).write_unaligned(fd);
    }
    let msg = MsgHdr {
        name: std::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: control.as_mut_ptr().cast(),
        controllen: 24,
        flags: 0,
    };
    // SAFETY: every pointer in `msg` refers to live locals of the sizes given.
    let n = unsafe { sendmsg(sock, &msg, MSG_NOSIGNAL) };
    if n != 1 {
        return fail(BAD_ARG, format!("sending a descriptor: {}", std::io::Error::last_os_error()));
    }
    0
}

/// Closes one end: unmaps the ring and closes its descriptors.
#[no_mangle]
pub unsafe extern "C" fn spore_ring_close(ring: *mut Ring) {
    if !ring.is_null() {
        // SAFETY: the pointer came from `Box::into_raw` in `spore_ring_open` and is closed
        // once (the caller forgets it).
        drop(unsafe { Box::from_raw(ring) });
    }
}
