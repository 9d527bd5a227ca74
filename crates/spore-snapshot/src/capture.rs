//! The daemon's side of a checkpoint: copy a runtime that waits inside `spore_checkpoint`
//! into an image.
//!
//! The runtime is single-threaded and blocked in a `read` on its control socket, so its
//! memory does not change while it is copied. Private pages are read with
//! `process_vm_readv`; which pages exist comes from `pagemap` (present or swapped pages of
//! anonymous regions, and the pages of private file mappings the process wrote, which are no
//! longer file pages). Everything else a file-backed region holds comes from the file again
//! at restore, which refuses a file whose identity changed.

use std::io::IoSliceMut;
use std::path::Path;
use std::time::Instant;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

use crate::context::{Context, CONTEXT_SIZE};
use crate::image::{self, prot, Codec, FdRecord, FileIdentity, Meta, PageRun, Region, RegionKind};
use crate::procfs::{self, MapLine, PAGE, PM_FILE, PM_PRESENT, PM_SWAPPED};
use crate::SnapshotError;

/// How to write the image.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Function name recorded in the image.
    pub function: String,
    /// Partition codec.
    pub codec: Codec,
    /// Pages per partition.
    pub partition_pages: u64,
    /// Compression threads.
    pub threads: usize,
    /// Leave zero pages out of the data (always on in practice; off only to measure what
    /// elision saves).
    pub elide_zero: bool,
    /// Descriptors a restore will provide (None: any). A runtime holding another one (a file
    /// its handler opened at import) is refused here, rather than at every restore.
    pub allowed_fds: Option<Vec<i32>>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            function: String::new(),
            codec: Codec::None,
            partition_pages: image::DEFAULT_PARTITION_PAGES,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            elide_zero: true,
            allowed_fds: None,
        }
    }
}

/// What a capture did.
#[derive(Debug, Clone)]
pub struct CaptureReport {
    /// The image's metadata.
    pub meta: Meta,
    /// Bytes of private pages read (stored + zero).
    pub private_bytes: u64,
    /// Size of the image file.
    pub file_bytes: u64,
    /// Time spent reading the process, ms.
    pub read_ms: f64,
    /// Time spent compressing and writing, ms.
    pub write_ms: f64,
}

fn prot_bits(m: &MapLine) -> u8 {
    (if m.read { prot::R } else { 0 })
        | (if m.write { prot::W } else { 0 })
        | (if m.exec { prot::X } else { 0 })
}

fn threads_of(pid: i32) -> Result<u32, SnapshotError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| SnapshotError::io(&path, e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| SnapshotError::Proc(format!("{path} has no Threads line")))
}

/// Reads `buf.len()` bytes at `addr` of `pid`.
fn read_remote(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
    let len = buf.len();
    let mut done = 0;
    while done < len {
        let remote = [RemoteIoVec {
            base: (addr + done as u64) as usize,
            len: len - done,
        }];
        let mut local = [IoSliceMut::new(&mut buf[done..])];
        let n = process_vm_readv(Pid::from_raw(pid), &mut local, &remote)
            .map_err(|e| SnapshotError::sys(format!("process_vm_readv at {addr:#x}"), e))?;
        if n == 0 {
            return Err(SnapshotError::Proc(format!(
                "no bytes readable at {addr:#x}"
            )));
        }
        done += n;
    }
    Ok(())
}

fn is_zero(page: &[u8]) -> bool {
    // Folding 64-byte chunks lets the compiler vectorise the test.
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Turns one map line into a region, or `None` for what a restore does not recreate.
fn region_of(pid: i32, m: &MapLine) -> Result<Option<Region>, SnapshotError> {
    if m.name == "[vsyscall]" {
        return Ok(None);
    }
    let kind = if procfs::is_vdso(&m.name) {
        RegionKind::Special {
            name: m.name.clone(),
        }
    } else if m.shared && (m.write || m.inode == 0 || !m.name.starts_with('/')) {
        return Err(SnapshotError::Unsupported(format!(
            "shared memory {:?} at {:#x} (a template may map files shared only read-only)",
            m.name, m.start
        )));
    } else if m.inode != 0 && m.name.starts_with('/') {
        if m.name.ends_with(" (deleted)") || m.name.starts_with("/memfd:") {
            return Err(SnapshotError::Unsupported(format!(
                "mapping of {} at {:#x}, which no path can reopen",
                m.name, m.start
            )));
        }
        let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
        let meta = std::fs::metadata(&link).map_err(|e| SnapshotError::io(&link, e))?;
        RegionKind::File {
            path: m.name.clone().into(),
            offset: m.offset,
            identity: FileIdentity::of(&meta),
            shared: m.shared,
        }
    } else {
        RegionKind::Anon {
            name: m.name.clone(),
        }
    };
    Ok(Some(Region {
        start: m.start,
        end: m.end,
        prot: prot_bits(m),
        kind,
    }))
}

/// Appends page `addr` of the region starting at `region_start` to the runs (a run never
/// spans two regions).
fn push_run(runs: &mut Vec<PageRun>, region_start: u64, addr: u64, zero: bool, stream_pages: u64) {
    if let Some(last) = runs.last_mut() {
        if last.zero == zero && last.addr >= region_start && last.addr + last.pages * PAGE == addr {
            last.pages += 1;
            return;
        }
    }
    runs.push(PageRun {
        addr,
        pages: 1,
        first: if zero { 0 } else { stream_pages },
        zero,
    });
}

/// Copies runtime `pid`, waiting in `spore_checkpoint` with its context record at
/// `context_addr`, into an image at `path`.
pub fn capture(
    pid: i32,
    context_addr: u64,
    path: &Path,
    opts: &CaptureOptions,
) -> Result<CaptureReport, SnapshotError> {
    let started = Instant::now();
    let threads = threads_of(pid)?;
    if threads != 1 {
        return Err(SnapshotError::Unsupported(format!(
            "{threads} threads (a template must be single-threaded at its checkpoint; set \
             OPENBLAS_NUM_THREADS=1 and similar, or stop thread pools first)"
        )));
    }
    let mut record = vec![0u8; CONTEXT_SIZE];
    read_remote(pid, context_addr, &mut record)?;
    let context = Context::parse(&record)?;
    let pid_s = pid.to_string();
    let maps = procfs::maps(&pid_s)?;
    let mm = procfs::mm_fields(&pid_s, &maps)?;
    let pagemap = procfs::Pagemap::open(&pid_s)?;
    let mut regions = Vec::new();
    let mut runs = Vec::new();
    let mut stream: Vec<u8> = Vec::new();
    let mut private_bytes = 0;
    let mut buf = Vec::new();
    let mut file_resident: Vec<(u64, u64)> = Vec::new();
    for m in &maps {
        let Some(region) = region_of(pid, m)? else {
            continue;
        };
        let file_backed = matches!(region.kind, RegionKind::File { .. });
        let special = matches!(region.kind, RegionKind::Special { .. });
        regions.push(region);
        if special || !m.read {
            continue;
        }
        let entries = pagemap.entries(m.start, m.end)?;
        if file_backed {
            for (i, e) in entries.iter().enumerate() {
                if e & PM_PRESENT != 0 && e & PM_FILE != 0 {
                    let addr = m.start + i as u64 * PAGE;
                    match file_resident.last_mut() {
                        Some((a, n)) if *a + *n * PAGE == addr && *a >= m.start => *n += 1,
                        _ => file_resident.push((addr, 1)),
                    }
                }
            }
        }
        if m.shared {
            continue;
        }
        let keep = |e: u64| {
            if file_backed {
                (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0
            } else {
                e & (PM_PRESENT | PM_SWAPPED) != 0
            }
        };
        let mut i = 0;
        while i < entries.len() {
            if !keep(entries[i]) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < entries.len() && keep(entries[j]) {
                j += 1;
            }
            let addr = m.start + i as u64 * PAGE;
            buf.resize((j - i) * PAGE as usize, 0);
            read_remote(pid, addr, &mut buf)?;
            private_bytes += buf.len() as u64;
            for (k, page) in buf.chunks_exact(PAGE as usize).enumerate() {
                let zero = opts.elide_zero && is_zero(page);
                push_run(
                    &mut runs,
                    m.start,
                    addr + k as u64 * PAGE,
                    zero,
                    stream.len() as u64 / PAGE,
                );
                if !zero {
                    stream.extend_from_slice(page);
                }
            }
            i = j;
        }
    }
    if !regions
        .iter()
        .any(|r| r.start <= context_addr && context_addr + CONTEXT_SIZE as u64 <= r.end)
    {
        return Err(SnapshotError::Context(format!(
            "record address {context_addr:#x} is not inside any mapping"
        )));
    }
    let fds: Vec<FdRecord> = procfs::fds(&pid_s)?
        .into_iter()
        .map(|(fd, target)| FdRecord {
            fd,
            target: target.display().to_string(),
        })
        .collect();
    if let Some(allowed) = &opts.allowed_fds {
        if let Some(extra) = fds.iter().find(|f| !allowed.contains(&f.fd)) {
            return Err(SnapshotError::Unsupported(format!(
                "descriptor {} ({}) is open; a restored runtime gets only descriptors {allowed:?} \
                 (close files the handler opens at import, or open them per invocation)",
                extra.fd, extra.target
            )));
        }
    }
    let read_ms = started.elapsed().as_secs_f64() * 1e3;
    let written = Instant::now();
    let meta = Meta {
        function: opts.function.clone(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        context,
        mm,
        regions,
        runs,
        codec: opts.codec,
        partitions: Vec::new(),
        fds,
        file_resident,
    };
    let meta = image::write(path, meta, &stream, opts.partition_pages, opts.threads)?;
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| SnapshotError::io(path, e))?
        .len();
    Ok(CaptureReport {
        meta,
        private_bytes,
        file_bytes,
        read_ms,
        write_ms: written.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_test_and_runs() {
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
        let mut runs = Vec::new();
        push_run(&mut runs, 0x1000, 0x1000, false, 0);
        push_run(&mut runs, 0x1000, 0x2000, false, 1);
        push_run(&mut runs, 0x1000, 0x3000, true, 2);
        push_run(&mut runs, 0x1000, 0x5000, false, 2);
        push_run(&mut runs, 0x6000, 0x6000, false, 3);
        assert_eq!(runs.len(), 4);
        assert_eq!((runs[0].pages, runs[1].zero, runs[2].first), (2, true, 2));
        assert_eq!((runs[3].addr, runs[3].first), (0x6000, 3));
    }

    #[test]
    fn refuses_a_multithreaded_process() {
        // This test binary runs tests on several threads, or at least has the harness's.
        let me = std::process::id() as i32;
        let _t = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(2)));
        let err = capture(
            me,
            0,
            Path::new("/nonexistent/x"),
            &CaptureOptions::default(),
        );
        assert!(err.unwrap_err().to_string().contains("single-threaded"));
    }
}
