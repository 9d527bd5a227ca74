//! Lazy restores: the runtime resumes before its private memory is installed, and a server
//! process installs each page on its first touch (userfaultfd), from the image.
//!
//! The restorer registers the image's anonymous regions with a userfaultfd (missing-page
//! mode, with fork, remap, remove and unmap events) and hands the descriptor to a server
//! outside the runtime (the sandbox init's parent, or `spore __restore`'s helper). The server
//! answers each fault with `UFFDIO_COPY` of the image's page, or `UFFDIO_ZEROPAGE` where the
//! image has none or the runtime discarded the range since (`MADV_DONTNEED`, `munmap`); it
//! follows `mremap` moves (a fault in a moved range is served from where the page was at
//! checkpoint) and serves forked children through the descriptors fork events bring.
//!
//! In `reap` mode the server also records which pages were faulted while the runtime served
//! its first invocation (until it has been quiet for [`QUIET`]) and writes that working set
//! next to the image (`IMAGE.ws`); the next restore installs those pages up front, in bulk,
//! and leaves only the rest to faults (REAP, ASPLOS'21, at the process level).
//!
//! The `userfaultfd` ioctls are issued by hand: the `userfaultfd` crate needs bindgen and
//! libclang at build time for what are five ioctls and one message layout.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::image::{Image, PageRun};
use crate::procfs::PAGE;
use crate::SnapshotError;

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const FEATURE_EVENT_FORK: u64 = 1 << 1;
const FEATURE_EVENT_REMAP: u64 = 1 << 2;
const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// How long the runtime must take no fault before a recorded working set is written.
pub const QUIET: Duration = Duration::from_millis(300);

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), SnapshotError> {
    // SAFETY: `arg` is the structure this request reads and writes, of the size encoded in
    // `req`.
    if unsafe { libc::ioctl(fd, req, arg as *mut T) } != 0 {
        return Err(SnapshotError::sys(what, nix::Error::last()));
    }
    Ok(())
}

/// Creates a userfaultfd with the events a lazy restore needs. Needs root (or
/// `vm.unprivileged_userfaultfd`): call it before the sandbox drops privileges.
pub fn create() -> Result<OwnedFd, SnapshotError> {
    // SAFETY: plain system call; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(SnapshotError::sys("userfaultfd", nix::Error::last()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    let mut api = Api {
        api: UFFD_API,
        features: FEATURE_EVENT_FORK
            | FEATURE_EVENT_REMAP
            | FEATURE_EVENT_REMOVE
            | FEATURE_EVENT_UNMAP,
        ioctls: 0,
    };
    ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api, "UFFDIO_API")?;
    Ok(fd)
}

/// Registers `[start, start+len)` for missing-page faults.
pub fn register(fd: &OwnedFd, start: u64, len: u64) -> Result<(), SnapshotError> {
    #[repr(C)]
    struct Register {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }
    let mut r = Register {
        start,
        len,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(
        fd.as_raw_fd(),
        UFFDIO_REGISTER,
        &mut r,
        &format!("UFFDIO_REGISTER {start:#x}"),
    )
}

/// An install that failed because the page is there already (`EEXIST`: another fault or
/// fork installed it) or the range or process went away (`ENOENT`, `ESRCH`) is done.
fn settled(r: Result<(), SnapshotError>) -> Result<(), SnapshotError> {
    match r {
        Err(SnapshotError::Sys {
            source: nix::Error::EEXIST | nix::Error::ENOENT | nix::Error::ESRCH,
            ..
        }) => Ok(()),
        other => other,
    }
}

/// Installs `len` bytes from `src` at `dst` (whole pages) and wakes the faulting thread.
/// `EEXIST` (someone installed it first) counts as done.
fn copy(fd: RawFd, dst: u64, src: *const u8, len: u64) -> Result<(), SnapshotError> {
    #[repr(C)]
    struct Copy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }
    let mut c = Copy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    settled(ioctl(fd, UFFDIO_COPY, &mut c, "UFFDIO_COPY"))
}

fn zeropage(fd: RawFd, start: u64, len: u64) -> Result<(), SnapshotError> {
    #[repr(C)]
    struct Zero {
        start: u64,
        len: u64,
        mode: u64,
        zeropage: i64,
    }
    let mut z = Zero {
        start,
        len,
        mode: 0,
        zeropage: 0,
    };
    settled(ioctl(fd, UFFDIO_ZEROPAGE, &mut z, "UFFDIO_ZEROPAGE"))
}

/// Finds the stored or zero run holding page `addr`.
fn run_of(runs: &[PageRun], addr: u64) -> Option<&PageRun> {
    let i = runs.partition_point(|r| r.addr <= addr);
    let r = runs.get(i.checked_sub(1)?)?;
    (addr < r.addr + r.pages * PAGE).then_some(r)
}

/// Address-space bookkeeping of one process being served.
#[derive(Debug, Clone, Default)]
struct Space {
    /// Moves since the restore, in order: (to, from, len).
    moves: Vec<(u64, u64, u64)>,
    /// Ranges (current addresses) the process discarded: zero from now on.
    dropped: BTreeMap<u64, u64>,
}

impl Space {
    /// Where the page now at `addr` was at checkpoint.
    fn original(&self, addr: u64) -> u64 {
        let mut a = addr;
        for &(to, from, len) in self.moves.iter().rev() {
            if a >= to && a < to + len {
                a = from + (a - to);
            }
        }
        a
    }

    fn is_dropped(&self, addr: u64) -> bool {
        self.dropped
            .range(..=addr)
            .next_back()
            .is_some_and(|(_, &end)| addr < end)
    }

    fn drop_range(&mut self, start: u64, end: u64) {
        self.dropped.insert(start, end);
    }

    fn moved(&mut self, from: u64, to: u64, len: u64) {
        // Dropped ranges travel with the pages.
        let inside: Vec<(u64, u64)> = self
            .dropped
            .range(from..from + len)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            self.dropped.remove(&s);
            self.dropped
                .insert(to + (s - from), to + (e.min(from + len) - from));
        }
        self.moves.push((to, from, len));
    }
}

/// What a server did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ServeReport {
    /// Faults answered with an image page.
    pub copied: u64,
    /// Faults answered with zeros.
    pub zeroed: u64,
    /// Forked processes served as well.
    pub forks: u64,
    /// Pages in the working set written, if one was recorded.
    pub recorded: Option<u64>,
}

/// A pidfd for `pid` (readable once the process has exited).
pub fn pidfd(pid: i32) -> Result<OwnedFd, SnapshotError> {
    // SAFETY: plain system call; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(SnapshotError::sys("pidfd_open", nix::Error::last()));
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Serves faults on `uffd` (and on the descriptors of forked children) from `image` until
/// the restored process (`process`, a pidfd) exits or every descriptor is closed. With
/// `record`, writes the pages faulted until the first quiet spell to that working-set file.
pub fn serve(
    uffd: OwnedFd,
    image: &Image,
    record: Option<PathBuf>,
    process: OwnedFd,
) -> Result<ServeReport, SnapshotError> {
    let meta = &image.meta;
    let mut report = ServeReport::default();
    let mut fds: Vec<(OwnedFd, Space)> = vec![(uffd, Space::default())];
    // Partitions read (and checked) so far, kept: faults jump between them.
    let mut cached: std::collections::HashMap<usize, Vec<u8>> = std::collections::HashMap::new();
    let mut scratch = Vec::new();
    let mut recording: Option<(PathBuf, Vec<u64>)> = record.map(|p| (p, Vec::new()));
    let mut last_fault = Instant::now();
    let mut dirty = false;
    loop {
        let mut polls: Vec<libc::pollfd> = fds
            .iter()
            .map(|(fd, _)| fd.as_raw_fd())
            .chain(std::iter::once(process.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // While recording: a short timeout while pages are unsaved (saved after 1 ms without
        // faults, because the daemon may stop an instance right after its first response),
        // else a longer one to notice the quiet spell that ends the recording.
        let timeout = match &recording {
            Some(_) if dirty => 1,
            Some(_) => 50,
            None => -1,
        };
        // SAFETY: `polls` is a valid array of pollfd of the length passed.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = nix::Error::last();
            if e == nix::Error::EINTR {
                continue;
            }
            return Err(SnapshotError::sys("poll", e));
        }
        if let Some((path, pages)) = &mut recording {
            if n == 0 && dirty {
                pages.sort_unstable();
                pages.dedup();
                write_working_set(path, image, pages)?;
                report.recorded = Some(pages.len() as u64);
                dirty = false;
            }
            if n == 0 && last_fault.elapsed() >= QUIET {
                recording = None;
            }
        }
        let mut gone = Vec::new();
        let mut born = Vec::new();
        let exited = polls.last().is_some_and(|p| p.revents != 0);
        for (i, p) in polls.iter().enumerate().take(fds.len()) {
            if p.revents == 0 {
                continue;
            }
            let (fd, space) = &mut fds[i];
            let raw = fd.as_raw_fd();
            let mut msg = [0u8; 32];
            // SAFETY: reads at most 32 bytes (one uffd_msg) into `msg`.
            let got = unsafe { libc::read(raw, msg.as_mut_ptr() as *mut libc::c_void, 32) };
            if got != 32 {
                let e = nix::Error::last();
                if got < 0 && (e == nix::Error::EAGAIN || e == nix::Error::EINTR) {
                    continue;
                }
                // EOF or error: the process is gone.
                gone.push(i);
                continue;
            }
            let u64_at = |o: usize| u64::from_le_bytes(msg[o..o + 8].try_into().expect("8 bytes"));
            match msg[0] {
                EVENT_PAGEFAULT => {
                    let addr = u64_at(16) & !(PAGE - 1);
                    last_fault = Instant::now();
                    let orig = space.original(addr);
                    let stored = (!space.is_dropped(addr))
                        .then(|| run_of(&meta.runs, orig))
                        .flatten()
                        .filter(|r| !r.zero);
                    match stored {
                        Some(run) => {
                            let stream = run.first + (orig - run.addr) / PAGE;
                            let part = meta
                                .partitions
                                .partition_point(|p| p.first + p.pages <= stream);
                            let buf = match cached.entry(part) {
                                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                                std::collections::hash_map::Entry::Vacant(e) => {
                                    let p = meta.partitions[part];
                                    let mut buf = vec![0u8; (p.pages * PAGE) as usize];
                                    image.read_partition(part, &mut scratch, &mut buf)?;
                                    e.insert(buf)
                                }
                            };
                            let off = ((stream - meta.partitions[part].first) * PAGE) as usize;
                            copy(raw, addr, buf[off..].as_ptr(), PAGE)?;
                            report.copied += 1;
                            if let Some((_, pages)) = &mut recording {
                                pages.push(orig);
                                dirty = true;
                            }
                        }
                        None => {
                            zeropage(raw, addr, PAGE)?;
                            report.zeroed += 1;
                        }
                    }
                }
                EVENT_FORK => {
                    let child = u32::from_le_bytes(msg[8..12].try_into().expect("4 bytes"));
                    // SAFETY: the kernel installed this descriptor in our table for the event.
                    let child = unsafe { OwnedFd::from_raw_fd(child as RawFd) };
                    born.push((child, space.clone()));
                    report.forks += 1;
                }
                EVENT_REMAP => space.moved(u64_at(8), u64_at(16), u64_at(24)),
                EVENT_REMOVE | EVENT_UNMAP => space.drop_range(u64_at(8), u64_at(16)),
                _ => {}
            }
        }
        for i in gone.into_iter().rev() {
            fds.remove(i);
        }
        fds.extend(born);
        if fds.is_empty() || exited {
            if let Some((path, mut pages)) = recording.take() {
                pages.sort_unstable();
                pages.dedup();
                write_working_set(&path, image, &pages)?;
                report.recorded = Some(pages.len() as u64);
            }
            return Ok(report);
        }
    }
}

/// Magic of working-set files.
const WS_MAGIC: &[u8; 8] = b"SPOREWS1";

/// The working-set file of an image.
pub fn working_set_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".ws");
    PathBuf::from(p)
}

/// Identity of an image a working set belongs to: its creation time and metadata size.
fn image_tag(image: &Image) -> u64 {
    image.meta.created_unix ^ (image.meta.runs.len() as u64) << 32 ^ image.file_size
}

fn write_working_set(path: &Path, image: &Image, pages: &[u64]) -> Result<(), SnapshotError> {
    let mut out = Vec::with_capacity(24 + pages.len() * 8 + 4);
    out.extend_from_slice(WS_MAGIC);
    out.extend_from_slice(&image_tag(image).to_le_bytes());
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let tmp = path.with_extension(format!("ws-tmp{}", std::process::id()));
    std::fs::write(&tmp, &out).map_err(|e| SnapshotError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SnapshotError::io(path, e))
}

/// Reads the working set recorded for `image`: sorted page addresses, or `None` when there
/// is none, it is damaged, or it belongs to another image.
pub fn read_working_set(path: &Path, image: &Image) -> Option<Vec<u64>> {
    let b = std::fs::read(path).ok()?;
    if b.len() < 28 || &b[..8] != WS_MAGIC {
        return None;
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let tag = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let n = u64::from_le_bytes(b[16..24].try_into().ok()?) as usize;
    if tag != image_tag(image) || body.len() != 24 + n * 8 {
        return None;
    }
    Some(
        body[24..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_bookkeeping_follows_moves_and_drops() {
        let mut s = Space::default();
        assert_eq!(s.original(0x5000), 0x5000);
        s.moved(0x1000, 0x9000, 0x2000);
        assert_eq!(s.original(0x9000), 0x1000);
        assert_eq!(s.original(0xa000), 0x2000);
        assert_eq!(s.original(0xb000), 0xb000);
        s.drop_range(0x9000, 0xa000);
        assert!(s.is_dropped(0x9000) && !s.is_dropped(0xa000));
        s.moved(0x9000, 0x20000, 0x2000);
        assert_eq!(s.original(0x21000), 0x2000);
        assert!(s.is_dropped(0x20000) && !s.is_dropped(0x9000));
        let runs = [
            PageRun {
                addr: 0x1000,
                pages: 2,
                first: 0,
                zero: false,
            },
            PageRun {
                addr: 0x5000,
                pages: 1,
                first: 0,
                zero: true,
            },
        ];
        assert_eq!(run_of(&runs, 0x2000).unwrap().addr, 0x1000);
        assert!(run_of(&runs, 0x3000).is_none());
        assert!(run_of(&runs, 0x5000).unwrap().zero);
        assert!(run_of(&runs, 0x0).is_none());
    }
}
