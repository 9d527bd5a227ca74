//! The set-up of a child forked from a cfork template, as one native call.
//!
//! Compiled by `build.rs` with the workspace's `rustc` into a small `no_std` shared object
//! that the Python template loads with ctypes: done step by step from Python, the same
//! system calls cost several times more, because each Python step in a freshly forked child
//! touches (and so copies) shared pages. No crates: only libc, declared below.
#![no_std]
#![allow(non_camel_case_types)]

use core::ffi::{c_char, c_int, c_long, c_ulong, c_void};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: abort never returns; nothing in this library panics (no indexing, no unwrap).
    unsafe { abort() }
}

#[repr(C)]
struct timespec {
    tv_sec: c_long,
    tv_nsec: c_long,
}

#[repr(C)]
struct sock_fprog {
    len: u16,
    filter: *const u8,
}

#[link(name = "c")]
extern "C" {
    fn abort() -> !;
    fn syscall(number: c_long, ...) -> c_long;
    fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
    fn close(fd: c_int) -> c_int;
    fn dup2(old: c_int, new: c_int) -> c_int;
    fn setns(fd: c_int, nstype: c_int) -> c_int;
    fn unshare(flags: c_int) -> c_int;
    fn mount(src: *const c_char, target: *const c_char, fstype: *const c_char, flags: c_ulong, data: *const c_void) -> c_int;
    fn sethostname(name: *const c_char, len: usize) -> c_int;
    fn prctl(option: c_int, ...) -> c_int;
    fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
    fn clock_gettime(clock: c_int, ts: *mut timespec) -> c_int;
    fn __errno_location() -> *mut c_int;
}

const CLONE_NEWNS: c_int = 0x0002_0000;
const CLONE_NEWUTS: c_int = 0x0400_0000;
const CLONE_NEWIPC: c_int = 0x0800_0000;
const CLONE_NEWNET: c_int = 0x4000_0000;
const MS_NOSUID: c_ulong = 2;
const MS_NODEV: c_ulong = 4;
const MS_NOEXEC: c_ulong = 8;
const PR_SET_SECCOMP: c_int = 22;
const PR_CAPBSET_DROP: c_int = 24;
const EINVAL: c_int = 22;
const SECCOMP_MODE_FILTER: c_ulong = 2;
const SIOCGIFFLAGS: c_ulong = 0x8913;
const SIOCSIFFLAGS: c_ulong = 0x8914;
#[cfg(target_arch = "x86_64")]
const SYS_SETGROUPS: c_long = 116;
#[cfg(target_arch = "x86_64")]
const SYS_SETRESUID: c_long = 117;
#[cfg(target_arch = "x86_64")]
const SYS_SETRESGID: c_long = 119;
#[cfg(target_arch = "aarch64")]
const SYS_SETGROUPS: c_long = 159;
#[cfg(target_arch = "aarch64")]
const SYS_SETRESUID: c_long = 147;
#[cfg(target_arch = "aarch64")]
const SYS_SETRESGID: c_long = 149;
const SYS_CLOSE_RANGE: c_long = 436;

/// What the child needs; filled in by the template before it forks.
#[repr(C)]
pub struct ChildSetup {
    /// `tasks` / `cgroup.procs` files of the child's cgroup, open for writing.
    pub cgroup_fds: *const c_int,
    pub n_cgroup_fds: c_int,
    /// A pooled network namespace (loopback up), or -1 to create one.
    pub netns_fd: c_int,
    /// NUL-terminated hostname.
    pub hostname: *const c_char,
    /// NUL-terminated tmpfs options for /tmp.
    pub tmp_opts: *const c_char,
    pub uid: u32,
    /// Seccomp program: `filter_len` 8-byte `struct sock_filter` instructions.
    pub filter: *const u8,
    pub filter_len: u16,
    /// The child's control socket, moved to `control_fd`.
    pub inst_fd: c_int,
    pub control_fd: c_int,
    /// Receives CLOCK_MONOTONIC nanoseconds after each of the 5 steps.
    pub marks: *mut u64,
}

fn now() -> u64 {
    let mut ts = timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { clock_gettime(1, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn errno() -> c_int {
    // SAFETY: glibc's errno location is always valid for the calling thread.
    unsafe { *__errno_location() }
}

/// Fails with `step * 1000 + errno`.
fn check(rc: c_long, step: c_int) -> Result<(), c_int> {
    if rc < 0 {
        Err(step * 1000 + errno())
    } else {
        Ok(())
    }
}

unsafe fn loopback_up() -> Result<(), c_int> {
    let s = socket(2, 2 | 0o2000000, 0); // AF_INET, SOCK_DGRAM | SOCK_CLOEXEC
    check(s as c_long, 3)?;
    let mut ifr = [0u8; 40];
    ifr[0] = b'l';
    ifr[1] = b'o';
    let rc = ioctl(s, SIOCGIFFLAGS, ifr.as_mut_ptr());
    if rc == 0 {
        let flags = u16::from_ne_bytes([ifr[16], ifr[17]]) | 0x1 | 0x40; // IFF_UP | IFF_RUNNING
        let b = flags.to_ne_bytes();
        ifr[16] = b[0];
        ifr[17] = b[1];
    }
    let rc = if rc == 0 { ioctl(s, SIOCSIFFLAGS, ifr.as_ptr()) } else { rc };
    close(s);
    check(rc as c_long, 3)
}

/// Drops every capability from the bounding set, up to the kernel's last (which answers the
/// next number with EINVAL). Needs CAP_SETPCAP, which the template holds in its namespace.
fn drop_bounding_set() -> Result<(), c_int> {
    for cap in 0..64 as c_ulong {
        // SAFETY: PR_CAPBSET_DROP takes integer arguments only.
        let rc = unsafe { prctl(PR_CAPBSET_DROP, cap, 0 as c_ulong, 0 as c_ulong, 0 as c_ulong) };
        if rc < 0 {
            return match errno() {
                EINVAL if cap > 0 => Ok(()),
                e => Err(7000 + e),
            };
        }
    }
    Ok(())
}

unsafe fn run(s: &ChildSetup) -> Result<(), c_int> {
    let marks = s.marks;
    // 1. cgroup: a single-threaded process moves itself by writing "0".
    for i in 0..s.n_cgroup_fds.max(0) as usize {
        let fd = *s.cgroup_fds.add(i);
        if write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err(1000 + errno());
        }
        close(fd);
    }
    *marks = now();
    // 2. namespaces.
    if s.netns_fd >= 0 {
        check(setns(s.netns_fd, CLONE_NEWNET) as c_long, 2)?;
        close(s.netns_fd);
        check(unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS) as c_long, 2)?;
    } else {
        check(unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) as c_long, 2)?;
    }
    *marks.add(1) = now();
    // 3. mounts: /proc of the new pid namespace, a private /tmp.
    let none = core::ptr::null();
    check(mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), MS_NOSUID | MS_NODEV | MS_NOEXEC, none) as c_long, 4)?;
    check(mount(c"tmpfs".as_ptr(), c"/tmp".as_ptr(), c"tmpfs".as_ptr(), MS_NOSUID | MS_NODEV, s.tmp_opts.cast()) as c_long, 5)?;
    *marks.add(2) = now();
    // 4. hostname, loopback.
    let mut len = 0;
    while *s.hostname.add(len) != 0 && len < 64 {
        len += 1;
    }
    check(sethostname(s.hostname, len) as c_long, 6)?;
    if s.netns_fd < 0 {
        loopback_up()?;
    }
    *marks.add(3) = now();
    // 5. privileges: an empty bounding set (while CAP_SETPCAP is still effective), an
    // unprivileged uid (which clears every other capability set), then the filter.
    drop_bounding_set()?;
    let ids = [s.uid];
    check(syscall(SYS_SETGROUPS, 1 as c_long, ids.as_ptr()), 7)?;
    let id = s.uid as c_long;
    check(syscall(SYS_SETRESGID, id, id, id), 7)?;
    check(syscall(SYS_SETRESUID, id, id, id), 7)?;
    let prog = sock_fprog { len: s.filter_len, filter: s.filter };
    check(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog as *const sock_fprog, 0 as c_ulong, 0 as c_ulong) as c_long, 8)?;
    // Only the control socket (and stdio) stays open.
    if s.inst_fd != s.control_fd {
        check(dup2(s.inst_fd, s.control_fd) as c_long, 9)?;
        close(s.inst_fd);
    }
    check(syscall(SYS_CLOSE_RANGE, (s.control_fd + 1) as c_long, 0xFFFF_FFFF as c_long, 0 as c_long), 9)?;
    *marks.add(4) = now();
    Ok(())
}

/// Sets the calling (freshly forked, single-threaded) child up. Returns 0, or
/// `step * 1000 + errno` (steps: 1 cgroup, 2 namespaces, 3 loopback, 4 /proc, 5 /tmp,
/// 6 hostname, 7 bounding set and ids, 8 seccomp, 9 descriptors).
///
/// # Safety
/// `setup` points to a valid `ChildSetup` whose pointers are valid for its lengths, and the
/// caller is single-threaded.
#[no_mangle]
pub unsafe extern "C" fn spore_cfork_child_setup(setup: *const ChildSetup) -> c_int {
    match run(&*setup) {
        Ok(()) => 0,
        Err(code) => code,
    }
}
