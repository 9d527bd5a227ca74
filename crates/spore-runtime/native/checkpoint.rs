//! The in-process half of a template snapshot: `spore_checkpoint`, called by the Python
//! runtime (ctypes) at a quiescent point.
//!
//! The call records what a restorer cannot read from outside the process (the callee-saved
//! registers and the return address of this call, the FS base, MXCSR and the x87 control
//! word, the signal mask, every signal action with its kernel-level restorer, the alternate
//! signal stack, glibc's rseq area and where glibc caches the thread id) into one static
//! record, tells the daemon where that record is, and blocks until the daemon has copied the
//! process's memory. It then returns 0. A process restored from that memory resumes inside
//! the same call, which then returns 1: like `setjmp`, one call returns twice.
//!
//! The record's layout is mirrored by `spore_snapshot::context::Context` (no crates here, so
//! the two are kept in step by hand; both check `CONTEXT_MAGIC` and the size).
//! Compiled by `build.rs` into a small `no_std` shared object.
#![no_std]
#![allow(non_camel_case_types)]

use core::ffi::{c_char, c_int, c_long, c_void};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: abort never returns; nothing in this library panics (no indexing, no unwrap).
    unsafe { abort() }
}

#[link(name = "c")]
extern "C" {
    fn abort() -> !;
    fn syscall(number: c_long, ...) -> c_long;
    fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
    fn read(fd: c_int, buf: *mut c_void, count: usize) -> isize;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn __errno_location() -> *mut c_int;
}

/// `b"SPORECTX"` read as a little-endian u64.
const CONTEXT_MAGIC: u64 = u64::from_le_bytes(*b"SPORECTX");
const CONTEXT_VERSION: u32 = 1;
const SYS_RT_SIGACTION: c_long = 13;
const SYS_RT_SIGPROCMASK: c_long = 14;
const SYS_SIGALTSTACK: c_long = 131;
const SYS_ARCH_PRCTL: c_long = 158;
const SYS_GETTID: c_long = 186;
const SYS_GETPID: c_long = 39;
const ARCH_GET_FS: c_long = 0x1003;
const RTLD_DEFAULT: *mut c_void = core::ptr::null_mut();
/// The rseq signature glibc registers on x86-64.
const RSEQ_SIG: u32 = 0x5305_3053;
/// The length the kernel records for glibc's rseq area (glibc's `__rseq_size` says 20; the
/// kernel wants the registered length back to unregister, 32).
const RSEQ_KERNEL_LEN: u32 = 32;
const EINTR: c_int = 4;

/// A signal action as the kernel stores it (`struct kernel_sigaction` on x86-64).
#[repr(C)]
#[derive(Clone, Copy)]
struct KSigaction {
    handler: u64,
    flags: u64,
    restorer: u64,
    mask: u64,
}

/// The record. Offsets 16..88 are written by `spore_ctx_save` (assembly below).
#[repr(C)]
struct Context {
    magic: u64,
    size: u32,
    version: u32,
    rbx: u64,
    rbp: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rsp: u64,
    rip: u64,
    mxcsr: u32,
    fpcw: u32,
    fs_base: u64,
    sigmask: u64,
    rseq_area: u64,
    rseq_len: u32,
    rseq_sig: u32,
    tid_offset: i64,
    pid: i32,
    tid: i32,
    altstack_sp: u64,
    altstack_flags: i32,
    _pad: u32,
    altstack_size: u64,
    sigactions: [KSigaction; 64],
}

const ZERO_ACTION: KSigaction = KSigaction {
    handler: 0,
    flags: 0,
    restorer: 0,
    mask: 0,
};

static mut CONTEXT: Context = Context {
    magic: 0,
    size: 0,
    version: 0,
    rbx: 0,
    rbp: 0,
    r12: 0,
    r13: 0,
    r14: 0,
    r15: 0,
    rsp: 0,
    rip: 0,
    mxcsr: 0,
    fpcw: 0,
    fs_base: 0,
    sigmask: 0,
    rseq_area: 0,
    rseq_len: 0,
    rseq_sig: 0,
    tid_offset: -1,
    pid: 0,
    tid: 0,
    altstack_sp: 0,
    altstack_flags: 0,
    _pad: 0,
    altstack_size: 0,
    sigactions: [ZERO_ACTION; 64],
};

// The setjmp-like half: stores the callee-saved registers, the caller's stack pointer and
// return address, MXCSR and the x87 control word (the only floating-point state a function
// call must preserve), and returns 0. The restorer later loads the same values and jumps to
// the return address with eax = 1. Written in assembly because no Rust construct can capture
// the caller's stack pointer and return address.
core::arch::global_asm!(
    ".globl spore_ctx_save",
    ".hidden spore_ctx_save",
    ".type spore_ctx_save,@function",
    "spore_ctx_save:",
    "mov [rdi + 16], rbx",
    "mov [rdi + 24], rbp",
    "mov [rdi + 32], r12",
    "mov [rdi + 40], r13",
    "mov [rdi + 48], r14",
    "mov [rdi + 56], r15",
    "lea rax, [rsp + 8]",
    "mov [rdi + 64], rax",
    "mov rax, [rsp]",
    "mov [rdi + 72], rax",
    "stmxcsr [rdi + 80]",
    "fnstcw [rdi + 84]",
    "xor eax, eax",
    "ret",
    ".size spore_ctx_save, . - spore_ctx_save",
);

extern "C" {
    fn spore_ctx_save(ctx: *mut Context) -> c_int;
}

fn errno() -> c_int {
    // SAFETY: glibc's errno location is valid for the calling thread.
    unsafe { *__errno_location() }
}

/// Address of the context record (for tests and for the runtime's checkpoint message).
#[no_mangle]
pub extern "C" fn spore_checkpoint_context() -> *const c_void {
    // SAFETY: only the address is taken; nothing is read or written.
    unsafe { core::ptr::addr_of!(CONTEXT) as *const c_void }
}

/// Fills everything but the registers. Returns 0 or a negative errno.
///
/// # Safety
/// Single-threaded caller; `ctx` is the static record.
unsafe fn fill(ctx: *mut Context) -> c_int {
    // SAFETY (whole function): `ctx` points to the static record, written by this thread only;
    // every system call gets pointers into it of the sizes the kernel expects.
    unsafe {
        (*ctx).magic = CONTEXT_MAGIC;
        (*ctx).size = core::mem::size_of::<Context>() as u32;
        (*ctx).version = CONTEXT_VERSION;
        (*ctx).pid = syscall(SYS_GETPID) as i32;
        (*ctx).tid = syscall(SYS_GETTID) as i32;
        if syscall(SYS_ARCH_PRCTL, ARCH_GET_FS, core::ptr::addr_of_mut!((*ctx).fs_base)) != 0 {
            return -errno();
        }
        if syscall(
            SYS_RT_SIGPROCMASK,
            0,
            core::ptr::null::<u64>(),
            core::ptr::addr_of_mut!((*ctx).sigmask),
            8usize,
        ) != 0
        {
            return -errno();
        }
        let actions = core::ptr::addr_of_mut!((*ctx).sigactions) as *mut KSigaction;
        for sig in 1..=64i64 {
            let slot = actions.add(sig as usize - 1);
            *slot = ZERO_ACTION;
            // SIGKILL and SIGSTOP have no action; 32 and 33 are glibc's (their query works).
            if sig == 9 || sig == 19 {
                continue;
            }
            if syscall(SYS_RT_SIGACTION, sig, core::ptr::null::<KSigaction>(), slot, 8usize) != 0 {
                return -errno();
            }
        }
        #[repr(C)]
        struct StackT {
            sp: u64,
            flags: i32,
            size: u64,
        }
        let mut ss = StackT {
            sp: 0,
            flags: 0,
            size: 0,
        };
        if syscall(SYS_SIGALTSTACK, core::ptr::null::<StackT>(), &mut ss as *mut StackT) != 0 {
            return -errno();
        }
        (*ctx).altstack_sp = ss.sp;
        (*ctx).altstack_flags = ss.flags;
        (*ctx).altstack_size = ss.size;
        // glibc (2.35+) registers an rseq area at the thread pointer plus `__rseq_offset`.
        let offset = dlsym(RTLD_DEFAULT, c"__rseq_offset".as_ptr()) as *const isize;
        let size = dlsym(RTLD_DEFAULT, c"__rseq_size".as_ptr()) as *const u32;
        if !offset.is_null() && !size.is_null() && *size > 0 {
            (*ctx).rseq_area = ((*ctx).fs_base as i64 + *offset as i64) as u64;
            (*ctx).rseq_len = RSEQ_KERNEL_LEN;
            (*ctx).rseq_sig = RSEQ_SIG;
        } else {
            (*ctx).rseq_area = 0;
            (*ctx).rseq_len = 0;
            (*ctx).rseq_sig = 0;
        }
        // glibc caches the thread id in its thread descriptor (which starts at the thread
        // pointer on x86-64) and uses it for raise() and pthread_kill(); a restored process
        // has another id. The field's offset is not ABI, so find it: the one 4-byte slot in the
        // descriptor's first 2 KiB that holds this thread's id.
        let tcb = (*ctx).fs_base as *const i32;
        let mut found: i64 = -1;
        let mut i = 0usize;
        while i < 512 {
            if *tcb.add(i) == (*ctx).tid {
                if found >= 0 {
                    found = -1;
                    break;
                }
                found = (i * 4) as i64;
            }
            i += 1;
        }
        (*ctx).tid_offset = found;
    }
    0
}

/// Sends `msg` on `fd`, then waits for the daemon's one status byte. 0 = snapshot taken.
#[inline(never)]
fn announce_and_wait(fd: c_int, msg: *const u8, len: usize) -> c_int {
    let mut sent = 0usize;
    while sent < len {
        // SAFETY: `msg` has `len` readable bytes (the caller's contract).
        let n = unsafe { write(fd, msg.add(sent) as *const c_void, len - sent) };
        if n < 0 {
            if errno() == EINTR {
                continue;
            }
            return -errno();
        }
        sent += n as usize;
    }
    let mut status = 0u8;
    loop {
        // SAFETY: one byte into a local.
        let n = unsafe { read(fd, &mut status as *mut u8 as *mut c_void, 1) };
        if n == 1 {
            return if status == 0 { 0 } else { -(status as c_int) };
        }
        if n == 0 {
            return -104; // ECONNRESET: the daemon went away
        }
        if errno() != EINTR {
            return -errno();
        }
    }
}

/// Takes a snapshot of the calling process: records the context, writes `msg` (`len` bytes,
/// the runtime's checkpoint frame naming [`spore_checkpoint_context`]) to `fd` and waits for
/// the daemon's status byte.
///
/// Returns 0 when the snapshot was taken (the caller carries on), 1 in a process restored
/// from it, and a negative errno (or the daemon's negated status) on failure.
///
/// # Safety
/// Call from the only thread of the process, with `msg` valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn spore_checkpoint(fd: c_int, msg: *const u8, len: usize) -> c_int {
    // SAFETY: single-threaded by contract; CONTEXT is only touched here.
    let ctx = unsafe { core::ptr::addr_of_mut!(CONTEXT) };
    // SAFETY: as above.
    let rc = unsafe { fill(ctx) };
    if rc != 0 {
        return rc;
    }
    // SAFETY: the record is valid; this returns a second time (with 1) in a restored process,
    // and nothing after it depends on state changed between the two returns.
    if unsafe { spore_ctx_save(ctx) } != 0 {
        return 1;
    }
    announce_and_wait(fd, msg, len)
}
