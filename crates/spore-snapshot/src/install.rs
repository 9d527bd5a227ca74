//! Installing a snapshot's memory: mapping its regions at their addresses and writing the
//! stored pages (on several threads, partition by partition), prefetching the files it maps,
//! and passing a userfaultfd between the restorer and its fault server.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::image::{prot, Codec, Image, Region, RegionKind};
use crate::procfs::PAGE;
use crate::SnapshotError;

pub(crate) const MAP_FIXED_NOREPLACE: libc::c_int = 0x10_0000;
const MADV_POPULATE_READ: libc::c_int = 22;
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Allocates the pages of `[addr, addr + len)` in one call, before they are written: writing
/// them one by one costs a page fault each, which on a VM without hardware virtualisation
/// traps to the hypervisor (measured here: ~2.5 us a page, most of an install). Failing
/// (a kernel before 5.14) is harmless: the writes then fault the pages in.
fn populate_write(addr: u64, len: usize) {
    // SAFETY: MADV_POPULATE_WRITE only faults in pages of a mapping that is already there
    // and writable (the caller's destination); it changes no contents.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
}
/// Most threads installing partitions at once.
pub(crate) const INSTALL_THREADS: usize = 4;

pub(crate) fn errno_err(call: impl Into<String>) -> SnapshotError {
    SnapshotError::sys(call, nix::Error::last())
}

pub(crate) fn prot_flags(p: u8) -> libc::c_int {
    (if p & prot::R != 0 { libc::PROT_READ } else { 0 })
        | (if p & prot::W != 0 {
            libc::PROT_WRITE
        } else {
            0
        })
        | (if p & prot::X != 0 { libc::PROT_EXEC } else { 0 })
}

/// Maps one region; writable for now if pages will be written into it.
pub(crate) fn map_region(
    r: &Region,
    files: &HashMap<std::path::PathBuf, File>,
) -> Result<(), SnapshotError> {
    let len = (r.end - r.start) as usize;
    let mut p = prot_flags(r.prot);
    let shared = matches!(r.kind, RegionKind::File { shared: true, .. });
    if p != libc::PROT_NONE && !shared {
        p |= libc::PROT_READ | libc::PROT_WRITE;
    }
    let (flags, fd, offset) = match &r.kind {
        RegionKind::File { path, offset, .. } => (
            if shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            },
            files[path].as_raw_fd(),
            *offset as libc::off_t,
        ),
        RegionKind::Anon { name } => {
            let grows = if name == "[stack]" {
                libc::MAP_GROWSDOWN
            } else {
                0
            };
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | grows, -1, 0)
        }
        RegionKind::Special { .. } => return Ok(()),
    };
    // SAFETY: the range was checked to be free of this process's mappings
    // (MAP_FIXED_NOREPLACE fails rather than replace anything).
    let addr = unsafe {
        libc::mmap(
            r.start as *mut libc::c_void,
            len,
            p,
            flags | MAP_FIXED_NOREPLACE,
            fd,
            offset,
        )
    };
    if addr == libc::MAP_FAILED {
        let err = nix::Error::last();
        if err == nix::Error::EEXIST {
            // Something of ours (a late allocation) took the place.
            return Err(SnapshotError::Collision(r.start));
        }
        return Err(SnapshotError::sys(
            format!("mmap of {:#x}-{:#x}", r.start, r.end),
            err,
        ));
    }
    if addr as u64 != r.start {
        return Err(SnapshotError::Restore(format!(
            "the kernel placed {:#x} at {addr:p} (no MAP_FIXED_NOREPLACE?)",
            r.start
        )));
    }
    Ok(())
}

/// Installs the stored pages and zero runs for which `wanted(address)` holds (every page in
/// full mode; file regions, plus the working set in reap mode, otherwise).
pub(crate) fn install_all(
    image: &Image,
    wanted: &(dyn Fn(u64) -> bool + Sync),
) -> Result<(), SnapshotError> {
    let meta = &image.meta;
    // Zero runs in anonymous memory are already zero; in file mappings they overwrite the
    // file's bytes.
    for run in meta.runs.iter().filter(|r| r.zero) {
        if meta.in_file_region(run.addr) && wanted(run.addr) {
            // SAFETY: the run lies inside a region mapped writable above.
            unsafe { std::ptr::write_bytes(run.addr as *mut u8, 0, (run.pages * PAGE) as usize) };
        }
    }
    // The pieces of stored runs inside each partition: (address, first stream page, pages).
    let stored: Vec<_> = meta.runs.iter().filter(|r| !r.zero).collect();
    let mut plan: Vec<Vec<(u64, u64, u64)>> = Vec::with_capacity(meta.partitions.len());
    let mut k = 0; // first stored run that may overlap the partition
    for p in &meta.partitions {
        let (p_first, p_end) = (p.first, p.first + p.pages);
        let mut pieces = Vec::new();
        while k < stored.len() && stored[k].first + stored[k].pages <= p_first {
            k += 1;
        }
        let mut j = k;
        while j < stored.len() && stored[j].first < p_end {
            let r = stored[j];
            let s = r.first.max(p_first);
            let e = (r.first + r.pages).min(p_end);
            // Split into the wanted sub-runs.
            let mut at = s;
            while at < e {
                let addr = |page: u64| r.addr + (page - r.first) * PAGE;
                if !wanted(addr(at)) {
                    at += 1;
                    continue;
                }
                let mut end = at + 1;
                while end < e && wanted(addr(end)) {
                    end += 1;
                }
                pieces.push((addr(at), at, end - at));
                at = end;
            }
            j += 1;
        }
        plan.push(pieces);
    }
    // Partitions are independent: up to `INSTALL_THREADS` threads read, check and
    // decompress them side by side into disjoint destinations. The threads have exited
    // when the scope ends, before anything per-thread (rseq, the thread pointer) is touched.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(INSTALL_THREADS)
        .min(plan.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || -> Result<(), SnapshotError> {
        let mut scratch = Vec::new();
        let mut unpacked = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(pieces) = plan.get(i) else {
                return Ok(());
            };
            install_partition(image, i, pieces, &mut scratch, &mut unpacked)?;
        }
    };
    if plan.iter().all(Vec::is_empty) {
        return work();
    }
    on_threads(threads, &work)
}

/// Runs `work` on `threads` threads, this one included, until each returns; the first error
/// wins. The helpers have exited when this returns.
pub(crate) fn on_threads(
    threads: usize,
    work: &(dyn Fn() -> Result<(), SnapshotError> + Sync),
) -> Result<(), SnapshotError> {
    if threads <= 1 {
        return work();
    }
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mine = work();
        helpers
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(SnapshotError::Restore("an install thread panicked".into()))
                })
            })
            .chain(std::iter::once(mine))
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ())
    })
}

/// Installs every stored page of `image` into a fresh anonymous area of this process (not at
/// the image's addresses) with `threads` threads, as a restore does (read, check, decompress,
/// and the destination's page faults), then unmaps it. What `spore bench memory-restore`
/// times: the memory part of a restore alone, Sabre's Figure 9.
pub fn install_scratch(image: &Image, threads: usize) -> Result<(), SnapshotError> {
    let len = (image.meta.stored_pages() * PAGE) as usize;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a new private anonymous mapping; nothing else refers to it.
    let area = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if area == libc::MAP_FAILED {
        return Err(errno_err("mmap of a scratch area"));
    }
    let base = area as usize;
    let next = std::sync::atomic::AtomicUsize::new(0);

    let work = || -> Result<(), SnapshotError> {
        let mut scratch = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(p) = image.meta.partitions.get(i) else {
                return Ok(());
            };
            let at = base as u64 + p.first * PAGE;
            populate_write(at, (p.pages * PAGE) as usize);
            // SAFETY: partition i's pages land in their own slice of the scratch area (the
            // partitions cut the stream into disjoint ranges), written by this thread only.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    (base + (p.first * PAGE) as usize) as *mut u8,
                    (p.pages * PAGE) as usize,
                )
            };
            image.read_partition(i, &mut scratch, out)?;
        }
    };
    let result = on_threads(threads, &work);
    // SAFETY: the area mapped above, no longer used by any thread (the scope joined them).
    unsafe { libc::munmap(area, len) };
    result
}

/// Installs partition `i`, whose pages go to `pieces` (address, first stream page, pages).
pub(crate) fn install_partition(
    image: &Image,
    i: usize,
    pieces: &[(u64, u64, u64)],
    scratch: &mut Vec<u8>,
    unpacked: &mut Vec<u8>,
) -> Result<(), SnapshotError> {
    let p = image.meta.partitions[i];
    if pieces.is_empty() {
        return Ok(());
    }
    let whole = pieces.iter().map(|x| x.2).sum::<u64>() == p.pages;
    if image.meta.codec == Codec::None && whole {
        // Read straight into place, then check the bytes where they landed (a partition only
        // partly wanted goes through the buffer below, to check all of it).
        let mut hasher = crc32fast::Hasher::new();
        for &(addr, first, pages) in pieces {
            let len = (pages * PAGE) as usize;
            populate_write(addr, len);
            // SAFETY: [addr, addr+len) lies inside a region mapped writable above, belongs to
            // this partition only (so no other thread writes it), and no Rust reference
            // aliases it.
            let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
            image
                .file()
                .read_exact_at(dst, p.offset + (first - p.first) * PAGE)
                .map_err(|e| SnapshotError::io(&image.path, e))?;
            hasher.update(dst);
        }
        if hasher.finalize() != p.crc {
            return Err(SnapshotError::Checksum(format!("partition {i}")));
        }
        return Ok(());
    }
    let contiguous = pieces.windows(2).all(|w| w[0].0 + w[0].2 * PAGE == w[1].0);
    if whole && contiguous {
        // One destination for the whole partition: decompress straight into place (no
        // second copy through a buffer).
        let (addr, len) = (pieces[0].0, (p.pages * PAGE) as usize);
        populate_write(addr, len);
        // SAFETY: as below: the partition's pages, in a region mapped writable, written by
        // this thread only, aliased by no Rust reference.
        let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
        return image.read_partition(i, scratch, dst);
    }
    unpacked.resize((p.pages * PAGE) as usize, 0);
    image.read_partition(i, scratch, unpacked)?;
    for &(addr, first, pages) in pieces {
        let off = ((first - p.first) * PAGE) as usize;
        let len = (pages * PAGE) as usize;
        populate_write(addr, len);
        // SAFETY: as above; the source is this thread's own buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(unpacked[off..off + len].as_ptr(), addr as *mut u8, len)
        };
    }
    Ok(())
}

/// Maps the file pages the runtime had resident at checkpoint in bulk (from the page cache,
/// reading what is missing): touched one by one they would cost a fault each.
pub(crate) fn prefetch_files(image: &Image) {
    for &(addr, pages) in &image.meta.file_resident {
        // SAFETY: MADV_POPULATE_READ only faults pages of existing mappings in (a run outside
        // any mapping gets ENOMEM and changes nothing); failing is harmless, the runtime then
        // faults the pages itself.
        unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                (pages * PAGE) as usize,
                MADV_POPULATE_READ,
            )
        };
    }
}

/// Copies in, ahead of the install, the file pages the install will overwrite: the pages of
/// private file mappings the runtime had written (a library's data, relocations; numpy's
/// runtime: 542 pages). A write to such a page copies the file's page first, which on a
/// cold page cache is a synchronous read from disk per page (measured here: ~30 ms of that
/// runtime's restore). Done in bulk now, a spare does it before it is wanted, for the price
/// of holding those pages while it waits; the install then writes into pages already its
/// own.
pub(crate) fn populate_overwritten(image: &Image) {
    let meta = &image.meta;
    for run in meta.runs.iter().filter(|r| meta.in_file_region(r.addr)) {
        populate_write(run.addr, (run.pages * PAGE) as usize);
    }
}

/// Hands `fd` over `sock` (SCM_RIGHTS).
pub(crate) fn send_fd(
    sock: &std::os::unix::net::UnixStream,
    fd: &OwnedFd,
) -> Result<(), SnapshotError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [std::io::IoSlice::new(b"u")];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| SnapshotError::sys("handing the userfaultfd to its server", e))?;
    Ok(())
}

/// Receives the descriptor [`send_fd`] sent (the fault server's side).
pub fn recv_fd(sock: &std::os::unix::net::UnixStream) -> Result<OwnedFd, SnapshotError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| SnapshotError::sys("receiving the userfaultfd", e))?;
    for c in msg
        .cmsgs()
        .map_err(|e| SnapshotError::sys("reading the control message", e))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel installed this descriptor for us with the message.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(SnapshotError::Restore(
        "the restorer closed its socket without a userfaultfd".into(),
    ))
}
