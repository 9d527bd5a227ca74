//! Turning the calling process into the checkpointed runtime.
//!
//! Called in a fresh, single-threaded process that already sits in the function's sandbox
//! (namespaces, cgroup, user) with its control socket and standard descriptors in place.
//! The process's own address-space layout is random, the image's is fixed, so the two rarely
//! overlap; when they do, [`SnapshotError::Collision`] says so before anything changed and
//! the caller starts another process. The steps:
//!
//! 1. check the image's files (identity) and that no image region overlaps this process;
//! 2. map every region at its address (files privately, the rest anonymous) and install
//!    the stored pages ([`MemoryMode::Full`]: every page before resuming);
//! 3. restore the mm fields (`PR_SET_MM_MAP`: code, data, brk, stack, argv, environment),
//!    close every descriptor the runtime does not keep, restore signal actions and the
//!    alternate stack, move glibc's rseq registration and thread-id pointer to the image's
//!    thread, and move the kernel's vDSO pages to where the image expects them;
//! 4. jump to a small position-independent trampoline (below, in assembly) copied to a fresh
//!    page: it unmaps everything that belonged to this process, sets the FS base, the
//!    floating-point control state, the stack and the signal mask, and returns 1 from the
//!    runtime's `spore_checkpoint` call. The trampoline's two pages stay mapped.
//!
//! [`prepare`] does step 1 and the mapping half of step 2 (with the file pages the runtime
//! had resident mapped in from the page cache, and private copies made of the library pages
//! the install overwrites), which need nothing but the image: a sandbox built ahead of time
//! (a spare) does them before it is wanted, and [`Prepared::finish`] does the rest when it
//! is. Of the runtime's private memory a waiting spare holds only those copied library
//! pages (numpy's runtime: 2.1 MiB of its 15 MiB).
//!
//! Compared with CRIU's restorer this one is small because the runtime cooperates: it
//! stops inside a function call, so only callee-saved registers matter, and it is
//! single-threaded with known descriptors.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::os::fd::OwnedFd;

use crate::image::{FileIdentity, Image, Region, RegionKind};
use crate::install::{
    errno_err, install_all, map_region, populate_overwritten, prefetch_files, prot_flags, send_fd,
};
use crate::procfs::{self, MapLine, PAGE};
use crate::SnapshotError;

pub use crate::install::{install_scratch, recv_fd};
pub use spore_core::MemoryMode;

/// What the restore keeps from the calling process.
#[derive(Debug)]
pub struct RestoreOptions {
    /// How memory is installed.
    pub mode: MemoryMode,
    /// Descriptors already at their numbers that the restored runtime keeps (standard
    /// streams, its control socket); every other one is closed. Each descriptor the runtime
    /// had at checkpoint must be among them.
    pub keep_fds: Vec<i32>,
    /// Lazy and reap modes: a userfaultfd made by [`crate::lazy::create`] (which needs
    /// privileges the sandbox drops) and the socket to hand it to the fault server on.
    pub lazy: Option<(OwnedFd, std::os::unix::net::UnixStream)>,
    /// Reap mode: the working set, when the caller read it already (a sandbox reads it
    /// before its rootfs hides the data dir); otherwise it is read from beside the image.
    pub working_set: Option<Vec<u64>>,
}

const PR_SET_MM: libc::c_int = 35;
const PR_SET_MM_MAP: libc::c_ulong = 14;
const RSEQ_FLAG_UNREGISTER: libc::c_int = 1;
const RSEQ_SIG: u32 = 0x5305_3053;
const RSEQ_KERNEL_LEN: u32 = 32;

/// `struct prctl_mm_map` (linux/prctl.h).
#[repr(C)]
struct PrctlMmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: *mut u64,
    auxv_size: u32,
    exe_fd: u32,
}

/// What the trampoline reads (offsets are used by the assembly).
#[repr(C)]
struct TrampolineParams {
    fs_base: u64,
    sigmask: u64,
    callee_saved: [u64; 6],
    rsp: u64,
    rip: u64,
    mxcsr: u32,
    fpcw: u32,
    n_unmap: u64,
    // followed by n_unmap (addr, len) pairs
}

// The last step of a restore, copied to a fresh page because it unmaps everything else
// this process had, including the code and the stack that called it. rdi = parameters.
// Hand-written because it must run without a stack, without relocations and from any
// address; nothing in it is specific to an image.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".globl spore_trampoline_start",
    ".hidden spore_trampoline_start",
    ".globl spore_trampoline_end",
    ".hidden spore_trampoline_end",
    "spore_trampoline_start:",
    "mov r12, rdi",
    "mov r13, [r12 + 88]",
    "lea r14, [r12 + 96]",
    "2:",
    "test r13, r13",
    "jz 3f",
    "mov eax, 11", // munmap
    "mov rdi, [r14]",
    "mov rsi, [r14 + 8]",
    "syscall",
    "add r14, 16",
    "dec r13",
    "jmp 2b",
    "3:",
    "mov eax, 158", // arch_prctl(ARCH_SET_FS, fs_base)
    "mov edi, 0x1002",
    "mov rsi, [r12]",
    "syscall",
    "ldmxcsr [r12 + 80]",
    "fldcw [r12 + 84]",
    "cld",
    // Switch to the runtime's stack before unblocking signals, so that a pending signal's
    // frame lands there.
    "mov rsp, [r12 + 64]",
    "mov eax, 14", // rt_sigprocmask(SIG_SETMASK, &sigmask, NULL, 8)
    "mov edi, 2",
    "lea rsi, [r12 + 8]",
    "xor edx, edx",
    "mov r10d, 8",
    "syscall",
    "mov rbx, [r12 + 16]",
    "mov rbp, [r12 + 24]",
    "mov r13, [r12 + 40]",
    "mov r14, [r12 + 48]",
    "mov r15, [r12 + 56]",
    "mov rcx, [r12 + 72]",
    "mov r12, [r12 + 32]",
    "mov eax, 1",
    "jmp rcx",
    "spore_trampoline_end:",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    static spore_trampoline_start: u8;
    static spore_trampoline_end: u8;
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// `[start, end)` minus the `taken` ranges (sorted by start).
fn subtract(start: u64, end: u64, taken: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut cur = start;
    for &(s, e) in taken {
        if e <= cur || s >= end {
            continue;
        }
        if s > cur {
            out.push((cur, s));
        }
        cur = cur.max(e);
        if cur >= end {
            break;
        }
    }
    if cur < end {
        out.push((cur, end));
    }
    out
}

/// Checks before anything changes: files unchanged, no overlap, one thread, descriptors.
fn preflight(
    image: &Image,
    own: &[MapLine],
    opts: &RestoreOptions,
) -> Result<HashMap<std::path::PathBuf, File>, SnapshotError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| SnapshotError::io("/proc/self/status", e))?;
    if !status
        .lines()
        .any(|l| l.split_whitespace().eq(["Threads:", "1"]))
    {
        return Err(SnapshotError::Restore(
            "the restoring process must be single-threaded".into(),
        ));
    }
    for rec in &image.meta.fds {
        if !opts.keep_fds.contains(&rec.fd) {
            return Err(SnapshotError::Restore(format!(
                "the runtime had descriptor {} ({}) open, and the restore was not given one",
                rec.fd, rec.target
            )));
        }
    }
    let mut files = HashMap::new();
    for r in &image.meta.regions {
        if let RegionKind::File { path, identity, .. } = &r.kind {
            if files.contains_key(path) {
                continue;
            }
            let file = File::open(path).map_err(|e| SnapshotError::io(path, e))?;
            let now = FileIdentity::of(&file.metadata().map_err(|e| SnapshotError::io(path, e))?);
            if let Some(what) = identity.differs(&now) {
                return Err(SnapshotError::FileChanged {
                    path: path.display().to_string(),
                    what,
                });
            }
            files.insert(path.clone(), file);
        }
    }
    for r in &image.meta.regions {
        let special = matches!(r.kind, RegionKind::Special { .. });
        for m in own {
            // Our own vDSO pages move out of the way; everything else must be free.
            if (special && procfs::is_vdso(&m.name)) || m.name == "[vsyscall]" {
                continue;
            }
            if overlaps((r.start, r.end), (m.start, m.end)) {
                return Err(SnapshotError::Collision(r.start.max(m.start)));
            }
        }
    }
    Ok(files)
}

fn set_mm(image: &Image) -> Result<(), SnapshotError> {
    let mm = &image.meta.mm;
    let map = PrctlMmMap {
        start_code: mm.start_code,
        end_code: mm.end_code,
        start_data: mm.start_data,
        end_data: mm.end_data,
        start_brk: mm.start_brk,
        brk: mm.brk,
        start_stack: mm.start_stack,
        arg_start: mm.arg_start,
        arg_end: mm.arg_end,
        env_start: mm.env_start,
        env_end: mm.env_end,
        auxv: std::ptr::null_mut(),
        auxv_size: 0,
        exe_fd: u32::MAX,
    };
    // SAFETY: `map` is a valid prctl_mm_map of the size passed.
    let rc = unsafe {
        libc::prctl(
            PR_SET_MM,
            PR_SET_MM_MAP,
            &map as *const PrctlMmMap,
            std::mem::size_of::<PrctlMmMap>(),
            0,
        )
    };
    if rc != 0 {
        return Err(errno_err("prctl(PR_SET_MM_MAP)"));
    }
    Ok(())
}

fn close_others(keep: &[i32]) -> Result<(), SnapshotError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd >= 0)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    let mut next = 0u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > next {
            // SAFETY: closes descriptors no Rust object here relies on after this point (the
            // image file and the files mapped above are no longer needed).
            if unsafe { libc::close_range(next, fd - 1, 0) } != 0 {
                return Err(errno_err("close_range"));
            }
        }
        if fd == u32::MAX {
            break;
        }
        next = fd + 1;
    }
    Ok(())
}

fn restore_signals(image: &Image) -> Result<(), SnapshotError> {
    let ctx = &image.meta.context;
    for (i, a) in ctx.sigactions.iter().enumerate() {
        let sig = i as libc::c_long + 1;
        if sig == libc::SIGKILL as libc::c_long || sig == libc::SIGSTOP as libc::c_long {
            continue;
        }
        let act = [a.handler, a.flags, a.restorer, a.mask];
        // SAFETY: `act` has the layout of the kernel's sigaction (handler, flags, restorer,
        // mask), 8-byte mask.
        let rc =
            unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, act.as_ptr(), 0usize, 8usize) };
        if rc != 0 {
            return Err(errno_err(format!("rt_sigaction({sig})")));
        }
    }
    // The image's alternate signal stack, or none: this process's own (Rust's runtime gives
    // the main thread one) is unmapped with the rest of the restorer, and a handler installed
    // with SA_ONSTACK (as Python installs every one) would then fault on delivery.
    let (sp, flags, size) = ctx.altstack;
    let ss = if flags & libc::SS_DISABLE == 0 {
        libc::stack_t {
            ss_sp: sp as *mut libc::c_void,
            ss_flags: 0,
            ss_size: size as usize,
        }
    } else {
        libc::stack_t {
            ss_sp: std::ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        }
    };
    // SAFETY: a valid stack_t; an enabled stack's memory is part of the mapped image.
    if unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) } != 0 {
        return Err(errno_err("sigaltstack"));
    }
    Ok(())
}

/// Moves glibc's rseq registration and clear-tid pointer from this thread to the image's.
fn restore_thread(image: &Image) -> Result<(), SnapshotError> {
    let ctx = &image.meta.context;
    // SAFETY: looks up a data symbol of the C library by a NUL-terminated name.
    let off = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) } as *const isize;
    if !off.is_null() {
        let mut fs: u64 = 0;
        // SAFETY: ARCH_GET_FS writes the FS base into `fs`.
        unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut fs as *mut u64) };
        // SAFETY: `off` points to glibc's exported `__rseq_offset`.
        let area = (fs as i64 + unsafe { *off } as i64) as u64;
        // SAFETY: unregisters this thread's own area (same address, length and signature
        // glibc registered); failure only means none was registered.
        unsafe {
            libc::syscall(
                libc::SYS_rseq,
                area,
                RSEQ_KERNEL_LEN,
                RSEQ_FLAG_UNREGISTER,
                RSEQ_SIG,
            )
        };
    }
    if ctx.rseq_area != 0 {
        // SAFETY: the area lies in the image's thread control block, mapped above.
        let rc =
            unsafe { libc::syscall(libc::SYS_rseq, ctx.rseq_area, ctx.rseq_len, 0, ctx.rseq_sig) };
        if rc != 0 {
            return Err(errno_err("rseq registration"));
        }
    }
    if let Some(off) = ctx.tid_offset {
        let slot = ctx.fs_base + off;
        // SAFETY: gettid has no arguments.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        // SAFETY: `slot` is glibc's cached tid in the image's thread descriptor (found by the
        // checkpoint), inside mapped, writable image memory.
        unsafe {
            std::ptr::write_volatile(slot as *mut i32, tid);
            libc::syscall(libc::SYS_set_tid_address, slot);
        }
    }
    Ok(())
}

/// Moves the whole mapping `[from, from+len)` to `to` (replacing what is there).
///
/// # Safety
/// `[from, from+len)` must be one whole mapping nothing references any more, and
/// `[to, to+len)` free or ours to replace.
unsafe fn move_whole(from: u64, to: u64, len: u64) -> Result<(), SnapshotError> {
    // SAFETY: the caller's contract.
    let r = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            len as usize,
            len as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(errno_err("mremap of the vDSO"));
    }
    Ok(())
}

/// Moves this process's vDSO and vvar pages to the image's addresses.
fn move_vdso(image: &Image, own: &[MapLine]) -> Result<(), SnapshotError> {
    let want: Vec<&Region> = image
        .meta
        .regions
        .iter()
        .filter(|r| matches!(r.kind, RegionKind::Special { .. }))
        .collect();
    let mut moves = Vec::new();
    for r in &want {
        let RegionKind::Special { name } = &r.kind else {
            continue;
        };
        let Some(m) = own.iter().find(|m| &m.name == name) else {
            return Err(SnapshotError::Restore(format!(
                "the image has {name} and this kernel gives none (another kernel?)"
            )));
        };
        if m.len() != r.end - r.start {
            return Err(SnapshotError::Restore(format!(
                "{name} is {} bytes here and {} in the image (another kernel?)",
                m.len(),
                r.end - r.start
            )));
        }
        moves.push((m.start, r.start, m.len()));
    }
    if moves.is_empty() {
        return Ok(());
    }
    // Through a free staging area first, so that no move lands on a page still to move.
    let total: u64 = moves.iter().map(|m| m.2).sum();
    // SAFETY: a fresh reservation the kernel places anywhere free.
    let stage = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if stage == libc::MAP_FAILED {
        return Err(errno_err("mmap of a vDSO staging area"));
    }
    let mut at = stage as u64;
    let mut staged = Vec::new();
    for &(from, to, len) in &moves {
        // SAFETY: a whole special mapping of ours onto our own reservation.
        unsafe { move_whole(from, at, len)? };
        staged.push((at, to, len));
        at += len;
    }
    for (from, to, len) in staged {
        // SAFETY: the target range is the image's vDSO place, checked free in preflight.
        unsafe { move_whole(from, to, len)? };
    }
    Ok(())
}

/// Turns this process into the image's runtime. Returns only on failure; on
/// [`SnapshotError::Collision`] nothing has changed yet.
///
/// After the memory is mapped (step 2 above) a failure leaves the process unusable: the
/// caller must exit.
pub fn restore(image: &Image, opts: &RestoreOptions) -> Result<Infallible, SnapshotError> {
    prepare(image, opts)?.finish()
}

/// A restore half done by [`prepare`]: the image's regions mapped, its stored pages not
/// installed yet.
/// Dropping it leaves the process with those mappings: it must exit instead of running on.
#[derive(Debug)]
pub struct Prepared<'a> {
    image: &'a Image,
    opts: &'a RestoreOptions,
    own: Vec<MapLine>,
    files: HashMap<std::path::PathBuf, File>,
}

/// Checks the image against this process and maps its regions (step 1 and the mapping
/// half of step 2), with signals blocked from here on; [`Prepared::finish`] installs the
/// memory and resumes the runtime. On [`SnapshotError::Collision`] nothing has changed yet.
pub fn prepare<'a>(
    image: &'a Image,
    opts: &'a RestoreOptions,
) -> Result<Prepared<'a>, SnapshotError> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return Err(SnapshotError::Restore(
            "restore is implemented for x86-64 Linux only".into(),
        ));
    }
    let own = procfs::maps("self")?;
    let files = preflight(image, &own, opts)?;
    // From here on signals stay blocked until the trampoline sets the runtime's mask.
    let all = nix::sys::signal::SigSet::all();
    nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&all), None)
        .map_err(|e| SnapshotError::sys("sigprocmask", e))?;
    for r in &image.meta.regions {
        map_region(r, &files)?;
    }
    // The file pages the runtime had resident (disjoint from the stored ones, which are
    // private copies): mapped now, read-only from the page cache. Then the private copies
    // of those the install overwrites.
    prefetch_files(image);
    populate_overwritten(image);
    Ok(Prepared {
        image,
        opts,
        own,
        files,
    })
}

impl Prepared<'_> {
    /// Installs the memory, restores the rest of the process and resumes the runtime.
    /// Returns only on failure, which leaves the process unusable: the caller must exit.
    pub fn finish(self) -> Result<Infallible, SnapshotError> {
        let Prepared {
            image,
            opts,
            own,
            files,
        } = self;
        match (opts.mode, &opts.lazy) {
            (MemoryMode::Full, _) => install_all(image, &|_| true)?,
            (_, None) => {
                return Err(SnapshotError::Restore(format!(
                    "memory mode {} needs a userfaultfd and a fault server",
                    opts.mode.as_str()
                )))
            }
            (mode, Some((uffd, server))) => {
                let ws = match mode {
                    MemoryMode::Reap => opts
                        .working_set
                        .clone()
                        .or_else(|| {
                            crate::lazy::read_working_set(
                                &crate::lazy::working_set_path(&image.path),
                                image,
                            )
                        })
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                install_all(image, &|a| {
                    image.meta.in_file_region(a) || ws.binary_search(&a).is_ok()
                })?;
                for r in &image.meta.regions {
                    if matches!(r.kind, RegionKind::Anon { .. }) && r.prot != 0 {
                        crate::lazy::register(uffd, r.start, r.end - r.start)?;
                    }
                }
                send_fd(server, uffd)?;
            }
        }
        for r in &image.meta.regions {
            if matches!(r.kind, RegionKind::Special { .. }) {
                continue;
            }
            let p = prot_flags(r.prot);
            if p == libc::PROT_NONE {
                continue;
            }
            // SAFETY: the region was mapped by `prepare`; only its protection changes.
            if unsafe {
                libc::mprotect(r.start as *mut libc::c_void, (r.end - r.start) as usize, p)
            } != 0
            {
                return Err(errno_err(format!("mprotect of {:#x}", r.start)));
            }
        }
        drop(files);
        restore_signals(image)?;
        restore_thread(image)?;
        close_others(&opts.keep_fds)?;
        // The trampoline and its parameters, then everything else of ours goes.
        jump(image, &own)
    }
}

#[cfg(target_arch = "x86_64")]
fn jump(image: &Image, own_before: &[MapLine]) -> Result<Infallible, SnapshotError> {
    let ctx = &image.meta.context;
    // Both symbols are labels of the global_asm block above, in this binary.
    let (start, end) = (
        std::ptr::addr_of!(spore_trampoline_start) as usize,
        std::ptr::addr_of!(spore_trampoline_end) as usize,
    );
    let code_len = end - start;
    // Our mappings after the image went in, minus the image's ranges: what to unmap. Read
    // before the vDSO moves (reading /proc needs nothing from it, but nothing after the
    // move may call into glibc's vDSO helpers).
    let mut taken: Vec<(u64, u64)> = image
        .meta
        .regions
        .iter()
        .map(|r| (r.start, r.end))
        .collect();
    taken.sort_unstable();
    let now = procfs::maps("self")?;
    let mut unmap: Vec<(u64, u64)> = Vec::new();
    for m in now
        .iter()
        .filter(|m| m.name != "[vsyscall]" && !procfs::is_vdso(&m.name))
    {
        for (s, e) in subtract(m.start, m.end, &taken) {
            unmap.push((s, e - s));
        }
    }
    let params_len = std::mem::size_of::<TrampolineParams>() + 16 * (unmap.len() + 1);
    let total = (PAGE as usize + params_len).div_ceil(PAGE as usize) * PAGE as usize;
    // SAFETY: a fresh mapping the kernel places anywhere free (the image is already mapped,
    // so it cannot land on the image).
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return Err(errno_err("mmap of the trampoline"));
    }
    let page = page as u64;
    unmap.retain(|&(s, l)| !overlaps((s, s + l), (page, page + total as u64)));
    let params = TrampolineParams {
        fs_base: ctx.fs_base,
        sigmask: ctx.sigmask,
        callee_saved: ctx.callee_saved,
        rsp: ctx.rsp,
        rip: ctx.rip,
        mxcsr: ctx.mxcsr,
        fpcw: ctx.fpcw,
        n_unmap: unmap.len() as u64,
    };
    let params_at = page + PAGE;
    // SAFETY: the new mapping is `total` bytes, writable: the code fits in its first page
    // (asserted), the parameters and list after it (sized above).
    unsafe {
        assert!(code_len <= PAGE as usize, "trampoline larger than a page");
        std::ptr::copy_nonoverlapping(start as *const u8, page as *mut u8, code_len);
        std::ptr::write(params_at as *mut TrampolineParams, params);
        let list = (params_at as usize + std::mem::size_of::<TrampolineParams>()) as *mut u64;
        for (i, &(s, l)) in unmap.iter().enumerate() {
            list.add(2 * i).write(s);
            list.add(2 * i + 1).write(l);
        }
        if libc::mprotect(
            page as *mut libc::c_void,
            PAGE as usize,
            libc::PROT_READ | libc::PROT_EXEC,
        ) != 0
        {
            return Err(errno_err("mprotect of the trampoline"));
        }
    }
    // Last, because it moves the program break: nothing may allocate after it.
    set_mm(image)?;
    move_vdso(image, own_before)?;
    // SAFETY: the page holds the position-independent trampoline, which never returns: it
    // resumes the image's runtime inside its checkpoint call.
    unsafe {
        let entry: extern "C" fn(u64) -> ! = std::mem::transmute(page as usize);
        entry(params_at)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn jump(_: &Image, _: &[MapLine]) -> Result<Infallible, SnapshotError> {
    Err(SnapshotError::Restore(
        "restore is implemented for x86-64 Linux only".into(),
    ))
}

/// Starts the fault server of a lazy restore of this process as a grandchild (so that the
/// restored runtime never sees it as its own child) and makes the userfaultfd.
fn start_server(
    image: &Image,
    mode: MemoryMode,
) -> Result<(OwnedFd, std::os::unix::net::UnixStream), SnapshotError> {
    let me = std::process::id() as i32;
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| SnapshotError::io("socketpair", e))?;
    // SAFETY: this process is single-threaded (just exec'd as the restorer), so the children
    // are complete copies; they only run the server and exit.
    match unsafe { libc::fork() } {
        -1 => return Err(SnapshotError::sys("fork", nix::Error::last())),
        0 => {
            // SAFETY: as above.
            if unsafe { libc::fork() } != 0 {
                std::process::exit(0);
            }
            drop(ours);
            let code = match run_server(&theirs, image, mode, me) {
                Ok(report) => {
                    // For tests and benchmarks: how the faults were served.
                    if let Some(path) = std::env::var_os(FAULT_REPORT_ENV) {
                        let _ =
                            std::fs::write(path, serde_json::to_vec(&report).unwrap_or_default());
                    }
                    0
                }
                Err(e) => {
                    eprintln!("spore restore: fault server: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
        child => {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
        }
    }
    drop(theirs);
    Ok((crate::lazy::create()?, ours))
}

/// The fault server's side: receives the userfaultfd of restored process `pid` on `sock`
/// and serves it (recording a working set in reap mode when there is none yet).
pub fn run_server(
    sock: &std::os::unix::net::UnixStream,
    image: &Image,
    mode: MemoryMode,
    pid: i32,
) -> Result<crate::lazy::ServeReport, SnapshotError> {
    let process = crate::lazy::pidfd(pid)?;
    let uffd = recv_fd(sock)?;
    let ws = crate::lazy::working_set_path(&image.path);
    let record = (mode == MemoryMode::Reap && crate::lazy::read_working_set(&ws, image).is_none())
        .then_some(ws);
    crate::lazy::serve(uffd, image, record, process)
}

/// Environment variable naming a file where `spore __restore`'s fault server writes its
/// [`crate::lazy::ServeReport`] (JSON) when the restored process exits.
pub const FAULT_REPORT_ENV: &str = "SPORE_FAULT_REPORT";

/// First argument of a process that [`run_restorer`] handles.
pub const RESTORE_SUBCOMMAND: &str = "__restore";
/// Fresh processes tried when the restorer's own layout collides with the image's.
const RESTORE_ATTEMPTS: u32 = 8;

/// The argv of a restorer process: `exe __restore IMAGE MODE KEEP_FDS ATTEMPT`.
pub fn restorer_args(
    image: &std::path::Path,
    mode: &str,
    keep_fds: &[i32],
) -> Vec<std::ffi::OsString> {
    let fds: Vec<String> = keep_fds.iter().map(i32::to_string).collect();
    vec![
        RESTORE_SUBCOMMAND.into(),
        image.as_os_str().to_owned(),
        mode.into(),
        fds.join(",").into(),
        "1".into(),
    ]
}

/// Entry of a restorer process (`spore __restore IMAGE MODE KEEP_FDS ATTEMPT`): becomes the
/// image's runtime, or exits 1 with the reason on stderr. When this process's own layout
/// collides with the image it execs itself again (a new random layout), a few times.
pub fn run_restorer() -> ! {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let fail = |msg: String| -> ! {
        eprintln!("spore restore: {msg}");
        std::process::exit(1)
    };
    if args.len() != 5 {
        fail(format!(
            "usage: {RESTORE_SUBCOMMAND} IMAGE MODE KEEP_FDS ATTEMPT"
        ));
    }
    let path = std::path::PathBuf::from(&args[1]);
    let mode: MemoryMode = args[2]
        .to_string_lossy()
        .parse()
        .unwrap_or_else(|e| fail(e));
    let keep_fds: Vec<i32> = args[3]
        .to_string_lossy()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| fail(format!("bad descriptor {s:?}")))
        })
        .collect();
    let attempt: u32 = args[4].to_string_lossy().parse().unwrap_or(1);
    let image = Image::open(&path).unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));
    let lazy = match mode {
        MemoryMode::Full => None,
        _ => {
            Some(start_server(&image, mode).unwrap_or_else(|e| fail(format!("fault server: {e}"))))
        }
    };
    let err = match restore(
        &image,
        &RestoreOptions {
            mode,
            keep_fds,
            lazy,
            working_set: None,
        },
    ) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    if let (SnapshotError::Collision(_), true) = (&err, attempt < RESTORE_ATTEMPTS) {
        use std::os::unix::process::CommandExt;
        let mut next = args.clone();
        next[4] = (attempt + 1).to_string().into();
        let e = std::process::Command::new("/proc/self/exe")
            .args(&next)
            .exec();
        fail(format!("re-exec after an address collision: {e}"));
    }
    fail(format!("{}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_subtraction() {
        assert_eq!(subtract(0, 100, &[]), vec![(0, 100)]);
        assert_eq!(
            subtract(0, 100, &[(10, 20), (30, 40)]),
            vec![(0, 10), (20, 30), (40, 100)]
        );
        assert_eq!(subtract(10, 20, &[(0, 15), (18, 30)]), vec![(15, 18)]);
        assert!(subtract(10, 20, &[(0, 30)]).is_empty());
    }

    #[test]
    fn modes_parse_with_clear_errors() {
        assert_eq!("full".parse::<MemoryMode>(), Ok(MemoryMode::Full));
        assert_eq!("reap".parse::<MemoryMode>(), Ok(MemoryMode::Reap));
        assert_eq!("lazy".parse::<MemoryMode>(), Ok(MemoryMode::Lazy));
        assert!("compressed"
            .parse::<MemoryMode>()
            .unwrap_err()
            .contains("--snapshot-codec"));
        assert!("fast"
            .parse::<MemoryMode>()
            .unwrap_err()
            .contains("unknown"));
    }
}
