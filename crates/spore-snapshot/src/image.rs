//! The snapshot file format.
//!
//! ```text
//! 0      header, 64 bytes: magic "SPORESNP", version, flags, where the data and metadata
//!        sections are, the metadata's CRC-32, and the header's own CRC-32
//! 4096   data: the stored pages in address order, cut into partitions of up to
//!        `partition_pages` pages, each stored raw or compressed on its own (lz4 or zstd)
//!        with its CRC-32, so that partitions decompress in parallel and a fault needs only
//!        its partition
//! ...    metadata (JSON): the context record, mm fields, every region (file-backed ones
//!        with the file's identity), the page runs (address, count, zero or stored), the
//!        partition table, and the descriptors the runtime had open
//! ```
//!
//! Zero pages are never stored: a run marked `zero` is installed as zeros. Every check a
//! reader makes names what is wrong (magic, version, which checksum, which bound), so a
//! corrupt, truncated or foreign file is refused before anything is mapped.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::procfs::{MmFields, PAGE};
use crate::SnapshotError;

/// First bytes of every image.
pub const MAGIC: [u8; 8] = *b"SPORESNP";
/// The format version this build reads and writes.
pub const VERSION: u32 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Where the data section starts.
pub const DATA_OFFSET: u64 = 4096;
/// Default partition size: 256 pages (1 MiB) decompress in ~0.3 ms with zstd here.
pub const DEFAULT_PARTITION_PAGES: u64 = 256;
/// Largest partition a reader accepts (256 MiB), so that a damaged table cannot make it
/// allocate without bound.
pub const MAX_PARTITION_PAGES: u64 = 65_536;
/// Largest metadata section a reader accepts.
const MAX_META: u64 = 64 << 20;

/// How partitions are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "lowercase")]
pub enum Codec {
    /// Raw pages.
    None,
    /// lz4 block format.
    Lz4,
    /// zstd at a level.
    Zstd {
        /// Compression level.
        level: i32,
    },
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::None => f.write_str("raw"),
            Codec::Lz4 => f.write_str("lz4"),
            Codec::Zstd { level } => write!(f, "zstd-{level}"),
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Codec, String> {
        match s {
            "raw" | "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd { level: 1 }),
            _ => match s.strip_prefix("zstd-").map(str::parse) {
                Some(Ok(level)) if (1..=19).contains(&level) => Ok(Codec::Zstd { level }),
                _ => Err(format!(
                    "unknown codec {s:?} (raw, lz4, zstd, zstd-1 .. zstd-19)"
                )),
            },
        }
    }
}

/// What backs a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RegionKind {
    /// Private anonymous memory (`name` is `[heap]`, `[stack]`, `[anon:...]` or empty).
    Anon {
        /// Pseudo-name from the maps file.
        name: String,
    },
    /// A mapping of a file; pages the process wrote to a private one are stored in the image.
    File {
        /// Path (as the runtime saw it).
        path: PathBuf,
        /// File offset of the region's start.
        offset: u64,
        /// Identity at checkpoint: a restore refuses a file that changed.
        identity: FileIdentity,
        /// A read-only shared mapping (such as glibc's `gconv-modules.cache`): mapped shared
        /// again, nothing stored.
        #[serde(default)]
        shared: bool,
    },
    /// The kernel's `[vdso]`, `[vvar]` or `[vvar_vclock]`, moved into place at restore.
    Special {
        /// The pseudo-name.
        name: String,
    },
}

/// A file's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
}

impl FileIdentity {
    /// Identity of an open file or a path.
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        }
    }

    /// What differs from `other`, if anything.
    pub fn differs(&self, other: &FileIdentity) -> Option<&'static str> {
        if self.size != other.size {
            Some("size")
        } else if self.mtime_ns != other.mtime_ns {
            Some("modification time")
        } else if self.ino != other.ino || self.dev != other.dev {
            Some("inode")
        } else {
            None
        }
    }
}

/// Protection bits of a region.
pub mod prot {
    /// Readable.
    pub const R: u8 = 1;
    /// Writable.
    pub const W: u8 = 2;
    /// Executable.
    pub const X: u8 = 4;
}

/// One mapping of the checkpointed process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// First address.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// [`prot`] bits.
    pub prot: u8,
    /// What backs it.
    #[serde(flatten)]
    pub kind: RegionKind,
}

/// Consecutive pages with content in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// First address.
    pub addr: u64,
    /// Number of pages.
    pub pages: u64,
    /// Index of the first page in the stored page stream (unused for zero runs).
    pub first: u64,
    /// All zeros (nothing stored).
    pub zero: bool,
}

/// One independently stored slice of the page stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Offset in the file.
    pub offset: u64,
    /// Stored (possibly compressed) bytes.
    pub stored: u64,
    /// First stream page.
    pub first: u64,
    /// Pages.
    pub pages: u64,
    /// CRC-32 of the stored bytes.
    pub crc: u32,
}

/// A descriptor the runtime had open at checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRecord {
    /// Number.
    pub fd: i32,
    /// Link target in `/proc/PID/fd`.
    pub target: String,
}

/// Everything but the pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Function the image belongs to (informational).
    pub function: String,
    /// Seconds since the epoch at checkpoint.
    pub created_unix: u64,
    /// Registers and signal state.
    pub context: Context,
    /// `PR_SET_MM_MAP` fields.
    pub mm: MmFields,
    /// Every mapping, sorted by address.
    pub regions: Vec<Region>,
    /// Stored and zero page runs, sorted by address.
    pub runs: Vec<PageRun>,
    /// How partitions are stored.
    #[serde(flatten)]
    pub codec: Codec,
    /// Partitions, in stream order.
    pub partitions: Vec<Partition>,
    /// Descriptors open at checkpoint.
    pub fds: Vec<FdRecord>,
    /// Pages of file mappings that were resident (mapped from the page cache) at
    /// checkpoint, as (address, pages) runs: a restore maps them in bulk instead of taking
    /// one fault per page as the runtime touches them.
    #[serde(default)]
    pub file_resident: Vec<(u64, u64)>,
}

impl Meta {
    /// Pages stored in the data section.
    pub fn stored_pages(&self) -> u64 {
        self.partitions.iter().map(|p| p.pages).sum()
    }

    /// Zero pages (not stored).
    pub fn zero_pages(&self) -> u64 {
        self.runs.iter().filter(|r| r.zero).map(|r| r.pages).sum()
    }

    /// Whether `addr` lies in a file-backed region (whose written pages are always installed
    /// up front: userfaultfd cannot serve private file mappings).
    pub fn in_file_region(&self, addr: u64) -> bool {
        self.regions
            .iter()
            .any(|r| matches!(r.kind, RegionKind::File { .. }) && r.start <= addr && addr < r.end)
    }

    /// Bytes of all the mappings.
    pub fn mapped_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.end - r.start).sum()
    }

    /// Checks internal consistency; every reader calls this before using the metadata.
    pub fn validate(&self, data_end: u64) -> Result<(), SnapshotError> {
        let bad = |why: String| Err(SnapshotError::Corrupt(why));
        let mut last = 0;
        for r in &self.regions {
            if r.start % PAGE != 0 || r.end % PAGE != 0 || r.end <= r.start || r.start < last {
                return bad(format!(
                    "region {:#x}-{:#x} is misaligned, empty or out of order",
                    r.start, r.end
                ));
            }
            last = r.end;
        }
        let mut last = 0;
        let mut stream = 0;
        for run in &self.runs {
            let end = run
                .pages
                .checked_mul(PAGE)
                .and_then(|l| run.addr.checked_add(l));
            let Some(end) = end.filter(|_| run.pages > 0 && run.addr % PAGE == 0) else {
                return bad(format!(
                    "page run at {:#x} is misaligned or empty",
                    run.addr
                ));
            };
            if run.addr < last {
                return bad(format!(
                    "page run at {:#x} overlaps its predecessor",
                    run.addr
                ));
            }
            last = end;
            let inside = self
                .regions
                .iter()
                .any(|r| r.start <= run.addr && end <= r.end);
            if !inside {
                return bad(format!(
                    "page run at {:#x} lies outside every region",
                    run.addr
                ));
            }
            if !run.zero {
                if run.first != stream {
                    return bad(format!(
                        "page run at {:#x} is out of stream order",
                        run.addr
                    ));
                }
                stream += run.pages;
            }
        }
        let mut first = 0;
        let mut offset = DATA_OFFSET;
        for (i, p) in self.partitions.iter().enumerate() {
            if p.pages > MAX_PARTITION_PAGES {
                return bad(format!("partition {i} claims {} pages", p.pages));
            }
            if p.first != first || p.offset != offset || p.pages == 0 {
                return bad(format!("partition {i} does not follow its predecessor"));
            }
            if self.codec == Codec::None && p.stored != p.pages * PAGE {
                return bad(format!("raw partition {i} has {} bytes", p.stored));
            }
            first += p.pages;
            offset += p.stored;
        }
        if first != stream {
            return bad(format!(
                "partitions hold {first} pages, the runs need {stream}"
            ));
        }
        if offset > data_end {
            return bad(format!(
                "partitions end at byte {offset}, past the data section's end {data_end}"
            ));
        }
        Ok(())
    }
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Compresses one partition.
pub fn compress(codec: Codec, raw: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    match codec {
        Codec::None => Ok(raw.to_vec()),
        Codec::Lz4 => Ok(lz4_flex::block::compress(raw)),
        Codec::Zstd { level } => zstd::bulk::compress(raw, level)
            .map_err(|e| SnapshotError::Codec(format!("zstd compression failed: {e}"))),
    }
}

/// Decompresses one partition into `out` (exactly its page bytes).
pub fn decompress(codec: Codec, stored: &[u8], out: &mut [u8]) -> Result<(), SnapshotError> {
    let n = match codec {
        Codec::None => {
            if stored.len() != out.len() {
                return Err(SnapshotError::Corrupt(
                    "raw partition of the wrong size".into(),
                ));
            }
            out.copy_from_slice(stored);
            out.len()
        }
        Codec::Lz4 => lz4_flex::block::decompress_into(stored, out)
            .map_err(|e| SnapshotError::Corrupt(format!("lz4 partition: {e}")))?,
        Codec::Zstd { .. } => zstd::bulk::decompress_to_buffer(stored, out)
            .map_err(|e| SnapshotError::Corrupt(format!("zstd partition: {e}")))?,
    };
    if n != out.len() {
        return Err(SnapshotError::Corrupt(format!(
            "partition decompressed to {n} bytes, expected {}",
            out.len()
        )));
    }
    Ok(())
}

/// Where the page stream of `total` pages is cut into partitions of at most `max` pages:
/// also wherever the next stored run does not continue the previous one's addresses, so
/// that each partition lands in one contiguous range and a restore can decompress it
/// straight into place. (Streams whose stored runs do not tile them exactly, in order, are
/// cut every `max` pages.)
fn partition_bounds(runs: &[PageRun], total: u64, max: u64) -> Vec<(u64, u64)> {
    let mut segments = Vec::new();
    let mut next = 0;
    let mut end_addr = None;
    let mut start = 0;
    let mut tiled = true;
    for run in runs.iter().filter(|r| !r.zero && r.pages > 0) {
        if run.first != next {
            tiled = false;
            break;
        }
        if end_addr.is_some_and(|a| a != run.addr) && run.first > start {
            segments.push((start, run.first - start));
            start = run.first;
        }
        end_addr = Some(run.addr + run.pages * PAGE);
        next += run.pages;
    }
    if !tiled || next != total {
        segments = vec![(0, total)];
    } else if total > start {
        segments.push((start, total - start));
    }
    let mut out = Vec::new();
    for (first, pages) in segments {
        let mut at = first;
        while at < first + pages {
            let n = max.min(first + pages - at);
            out.push((at, n));
            at += n;
        }
    }
    out
}

/// Writes an image: `meta` without partitions plus the stored page stream (`stream`, in run
/// order). Partitions are compressed on up to `threads` threads. The file appears atomically
/// (written beside it, synced, renamed).
pub fn write(
    path: &Path,
    mut meta: Meta,
    stream: &[u8],
    partition_pages: u64,
    threads: usize,
) -> Result<Meta, SnapshotError> {
    assert!(
        stream.len() as u64 % PAGE == 0,
        "page stream of whole pages"
    );
    let max = partition_pages.clamp(1, MAX_PARTITION_PAGES);
    let raw: Vec<&[u8]> = partition_bounds(&meta.runs, stream.len() as u64 / PAGE, max)
        .into_iter()
        .map(|(first, pages)| &stream[(first * PAGE) as usize..((first + pages) * PAGE) as usize])
        .collect();
    let codec = meta.codec;
    let mut stored: Vec<Option<Result<Vec<u8>, SnapshotError>>> = Vec::new();
    stored.resize_with(raw.len(), || None);
    let threads = threads.clamp(1, 16);
    std::thread::scope(|s| {
        let per = raw.len().div_ceil(threads).max(1);
        for (slots, parts) in stored.chunks_mut(per).zip(raw.chunks(per)) {
            s.spawn(move || {
                for (slot, part) in slots.iter_mut().zip(parts) {
                    *slot = Some(compress(codec, part));
                }
            });
        }
    });
    let tmp = path.with_extension("tmp");
    let result = (|| {
        // The daemon's alone: an image is a whole process's memory, environment included.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| SnapshotError::io(&tmp, e))?;
        let mut offset = DATA_OFFSET;
        let mut first = 0;
        meta.partitions.clear();
        file.write_all(&[0u8; DATA_OFFSET as usize])
            .map_err(|e| SnapshotError::io(&tmp, e))?;
        for (part, raw) in stored.into_iter().zip(&raw) {
            let bytes = part.expect("every partition compressed")?;
            file.write_all(&bytes)
                .map_err(|e| SnapshotError::io(&tmp, e))?;
            let pages = raw.len() as u64 / PAGE;
            meta.partitions.push(Partition {
                offset,
                stored: bytes.len() as u64,
                first,
                pages,
                crc: crc(&bytes),
            });
            offset += bytes.len() as u64;
            first += pages;
        }
        let json = serde_json::to_vec(&meta)
            .map_err(|e| SnapshotError::Corrupt(format!("encoding metadata: {e}")))?;
        file.write_all(&json)
            .map_err(|e| SnapshotError::io(&tmp, e))?;
        let header = encode_header(offset, json.len() as u64, crc(&json), offset - DATA_OFFSET);
        file.write_all_at(&header, 0)
            .map_err(|e| SnapshotError::io(&tmp, e))?;
        file.sync_all().map_err(|e| SnapshotError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| SnapshotError::io(path, e))?;
        if let Some(dir) = path.parent().and_then(|d| File::open(d).ok()) {
            // Best effort: the rename survives a crash once the directory is synced.
            let _ = dir.sync_all();
        }
        Ok(meta)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn encode_header(meta_off: u64, meta_len: u64, meta_crc: u32, data_len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    // 12..16: flags, none defined.
    h[16..24].copy_from_slice(&meta_off.to_le_bytes());
    h[24..32].copy_from_slice(&meta_len.to_le_bytes());
    h[32..36].copy_from_slice(&meta_crc.to_le_bytes());
    h[40..48].copy_from_slice(&DATA_OFFSET.to_le_bytes());
    h[48..56].copy_from_slice(&data_len.to_le_bytes());
    let c = crc(&h[..60]);
    h[60..64].copy_from_slice(&c.to_le_bytes());
    h
}

/// An opened, checked image.
#[derive(Debug)]
pub struct Image {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: Meta,
    /// Total file size.
    pub file_size: u64,
    file: File,
}

impl Image {
    /// Opens `path` and checks the header, the metadata checksum and the metadata's
    /// consistency (partition checksums are checked as partitions are read).
    pub fn open(path: &Path) -> Result<Image, SnapshotError> {
        let file = File::open(path).map_err(|e| SnapshotError::io(path, e))?;
        let file_size = file
            .metadata()
            .map_err(|e| SnapshotError::io(path, e))?
            .len();
        let mut h = [0u8; HEADER_LEN];
        if file_size < HEADER_LEN as u64 {
            return Err(SnapshotError::Truncated(format!(
                "{file_size} bytes, shorter than the header"
            )));
        }
        file.read_exact_at(&mut h, 0)
            .map_err(|e| SnapshotError::io(path, e))?;
        let meta = parse_header_and_meta(&h, file_size, |off, buf| {
            file.read_exact_at(buf, off)
                .map_err(|e| SnapshotError::io(path, e))
        })?;
        Ok(Image {
            path: path.to_owned(),
            meta,
            file_size,
            file,
        })
    }

    /// Moves the image's descriptor to the lowest free number >= `min` (close-on-exec), out of
    /// the way of descriptors a sandbox set-up places at fixed numbers.
    pub fn move_fd_above(&mut self, min: i32) -> Result<(), SnapshotError> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor this Image owns.
        let fd = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
        if fd < 0 {
            return Err(SnapshotError::io(
                &self.path,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else; the old one closes on drop.
        self.file = unsafe { File::from_raw_fd(fd) };
        Ok(())
    }

    /// The open file (for readers that place data straight into memory).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads partition `i`, checks its CRC and decompresses it into `out`
    /// (`pages * 4096` bytes). `scratch` holds compressed bytes between calls.
    pub fn read_partition(
        &self,
        i: usize,
        scratch: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<(), SnapshotError> {
        let p = self.meta.partitions[i];
        if self.meta.codec == Codec::None {
            self.file
                .read_exact_at(out, p.offset)
                .map_err(|e| SnapshotError::io(&self.path, e))?;
            return check_crc(i, out, p.crc);
        }
        scratch.resize(p.stored as usize, 0);
        self.file
            .read_exact_at(scratch, p.offset)
            .map_err(|e| SnapshotError::io(&self.path, e))?;
        check_crc(i, scratch, p.crc)?;
        decompress(self.meta.codec, scratch, out)
    }
}

/// Rewrites `src` into `dst` with another codec (and partition size): the same metadata and
/// pages, checked on the way (benchmarks compare codecs on one image this way).
pub fn transcode(
    src: &Image,
    dst: &Path,
    codec: Codec,
    partition_pages: u64,
    threads: usize,
) -> Result<Meta, SnapshotError> {
    let mut stream = vec![0u8; (src.meta.stored_pages() * PAGE) as usize];
    let mut scratch = Vec::new();
    for (i, p) in src.meta.partitions.iter().enumerate() {
        let at = (p.first * PAGE) as usize;
        let len = (p.pages * PAGE) as usize;
        src.read_partition(i, &mut scratch, &mut stream[at..at + len])?;
    }
    let mut meta = src.meta.clone();
    meta.codec = codec;
    write(dst, meta, &stream, partition_pages, threads)
}

/// Rewrites `src` raw into `dst` with its zero pages stored like any other (no zero
/// elision): the baseline of Sabre's Figure 9, a plain memory file.
pub fn transcode_with_zeros(
    src: &Image,
    dst: &Path,
    partition_pages: u64,
) -> Result<Meta, SnapshotError> {
    let mut scratch = Vec::new();
    let mut old = vec![0u8; (src.meta.stored_pages() * PAGE) as usize];
    for (i, p) in src.meta.partitions.iter().enumerate() {
        let at = (p.first * PAGE) as usize;
        let len = (p.pages * PAGE) as usize;
        src.read_partition(i, &mut scratch, &mut old[at..at + len])?;
    }
    let mut meta = src.meta.clone();
    let mut stream = Vec::with_capacity(old.len());
    for run in &mut meta.runs {
        let len = (run.pages * PAGE) as usize;
        let first = stream.len() as u64 / PAGE;
        if run.zero {
            stream.resize(stream.len() + len, 0);
        } else {
            let at = (run.first * PAGE) as usize;
            stream.extend_from_slice(&old[at..at + len]);
        }
        run.first = first;
        run.zero = false;
    }
    meta.codec = Codec::None;
    write(dst, meta, &stream, partition_pages, 1)
}

/// Parses and checks a whole image held in memory: header, metadata, and every partition
/// (checksum and decompression). What the fuzz target and the mutation tests drive.
pub fn check_bytes(bytes: &[u8]) -> Result<Meta, SnapshotError> {
    let h: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| {
            SnapshotError::Truncated(format!("{} bytes, shorter than the header", bytes.len()))
        })?;
    let slice = |off: u64, len: usize| {
        usize::try_from(off)
            .ok()
            .and_then(|o| bytes.get(o..o.checked_add(len)?))
            .ok_or_else(|| SnapshotError::Truncated(format!("nothing at byte {off}")))
    };
    let meta = parse_header_and_meta(h, bytes.len() as u64, |off, buf| {
        buf.copy_from_slice(slice(off, buf.len())?);
        Ok(())
    })?;
    let mut out = Vec::new();
    for (i, p) in meta.partitions.iter().enumerate() {
        let stored = slice(p.offset, usize::try_from(p.stored).unwrap_or(usize::MAX))?;
        check_crc(i, stored, p.crc)?;
        out.resize(usize::try_from(p.pages * PAGE).unwrap_or(0), 0);
        decompress(meta.codec, stored, &mut out)?;
    }
    Ok(meta)
}

/// Checks partition `i`'s stored bytes against its CRC.
pub fn check_crc(i: usize, bytes: &[u8], want: u32) -> Result<(), SnapshotError> {
    if crc(bytes) != want {
        return Err(SnapshotError::Checksum(format!("partition {i}")));
    }
    Ok(())
}

/// Parses the header and reads and checks the metadata with `read_at`.
pub fn parse_header_and_meta(
    h: &[u8; HEADER_LEN],
    file_size: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> Result<(), SnapshotError>,
) -> Result<Meta, SnapshotError> {
    if h[0..8] != MAGIC {
        return Err(SnapshotError::NotAnImage);
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: VERSION,
        });
    }
    if crc(&h[..60]) != u32_at(60) {
        return Err(SnapshotError::Checksum("header".into()));
    }
    let (meta_off, meta_len, meta_crc) = (u64_at(16), u64_at(24), u32_at(32));
    let (data_off, data_len) = (u64_at(40), u64_at(48));
    if data_off != DATA_OFFSET || meta_off != data_off.saturating_add(data_len) {
        return Err(SnapshotError::Corrupt(
            "section offsets are inconsistent".into(),
        ));
    }
    if meta_len > MAX_META {
        return Err(SnapshotError::Corrupt(format!(
            "metadata of {meta_len} bytes"
        )));
    }
    if meta_off.saturating_add(meta_len) > file_size {
        return Err(SnapshotError::Truncated(format!(
            "{file_size} bytes, the header promises {}",
            meta_off.saturating_add(meta_len)
        )));
    }
    let mut json = vec![0u8; meta_len as usize];
    read_at(meta_off, &mut json)?;
    if crc(&json) != meta_crc {
        return Err(SnapshotError::Checksum("metadata".into()));
    }
    let meta: Meta = serde_json::from_slice(&json)
        .map_err(|e| SnapshotError::Corrupt(format!("metadata: {e}")))?;
    meta.context.validate()?;
    meta.validate(meta_off)?;
    Ok(meta)
}

#[cfg(test)]
mod tests {

    #[test]
    fn partitions_are_cut_where_addresses_jump_and_at_the_limit() {
        let run = |addr: u64, pages: u64, first: u64, zero: bool| PageRun {
            addr,
            pages,
            first,
            zero,
        };
        let runs = [
            run(0x10000, 3, 0, false),
            run(0x13000, 2, 3, false), // continues the first
            run(0x15000, 4, 0, true),  // zeros: a gap in the stream's addresses
            run(0x19000, 5, 5, false),
            run(0x80000, 1, 10, false),
        ];
        assert_eq!(
            partition_bounds(&runs, 11, 4),
            vec![(0, 4), (4, 1), (5, 4), (9, 1), (10, 1)]
        );
        assert_eq!(
            partition_bounds(&runs, 11, 256),
            vec![(0, 5), (5, 5), (10, 1)]
        );
        // Runs that do not tile the stream: plain chunks.
        assert_eq!(
            partition_bounds(&runs[..2], 11, 4),
            vec![(0, 4), (4, 4), (8, 3)]
        );
        assert_eq!(partition_bounds(&[], 0, 4), vec![]);
        let gap = [run(0x1000, 3, 0, false), run(0x9000, 2, 5, false)];
        assert_eq!(partition_bounds(&gap, 7, 4), vec![(0, 4), (4, 3)]);
    }

    use super::*;
    use crate::context::SigAction;
    use proptest::prelude::*;

    pub(crate) fn sample_meta(codec: Codec, runs: Vec<PageRun>) -> Meta {
        Meta {
            function: "hello".into(),
            created_unix: 1,
            context: Context {
                callee_saved: [1, 2, 3, 4, 5, 6],
                rsp: 0x7fff_0000,
                rip: 0x40_1000,
                mxcsr: 0x1f80,
                fpcw: 0x37f,
                fs_base: 0x7f00_0000,
                sigmask: 0,
                rseq_area: 0,
                rseq_len: 0,
                rseq_sig: 0,
                tid_offset: Some(0x2d0),
                pid: 1,
                tid: 1,
                altstack: (0, 2, 0),
                sigactions: vec![SigAction::default(); 64],
            },
            mm: MmFields::default(),
            regions: vec![Region {
                start: 0x10_0000,
                end: 0x20_0000,
                prot: prot::R | prot::W,
                kind: RegionKind::Anon {
                    name: String::new(),
                },
            }],
            runs,
            codec,
            partitions: vec![],
            fds: vec![FdRecord {
                fd: 3,
                target: "socket:[1]".into(),
            }],
            file_resident: vec![],
        }
    }

    /// Runs over `pages` page-contents; returns runs and the stored stream.
    fn layout(pages: &[u8]) -> (Vec<PageRun>, Vec<u8>) {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut stream = Vec::new();
        let mut stored = 0;
        for (i, &fill) in pages.iter().enumerate() {
            let addr = 0x10_0000 + i as u64 * PAGE;
            let zero = fill == 0;
            if let Some(last) = runs.last_mut() {
                if last.zero == zero && last.addr + last.pages * PAGE == addr {
                    last.pages += 1;
                    if !zero {
                        stream.extend(std::iter::repeat_n(fill, PAGE as usize));
                        stored += 1;
                    }
                    continue;
                }
            }
            runs.push(PageRun {
                addr,
                pages: 1,
                first: if zero { 0 } else { stored },
                zero,
            });
            if !zero {
                stream.extend(std::iter::repeat_n(fill, PAGE as usize));
                stored += 1;
            }
        }
        (runs, stream)
    }

    fn roundtrip(codec: Codec, pages: &[u8], partition_pages: u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let (runs, stream) = layout(pages);
        let written = write(&path, sample_meta(codec, runs), &stream, partition_pages, 2).unwrap();
        let img = Image::open(&path).unwrap();
        assert_eq!(img.meta, written);
        let mut back = Vec::new();
        let mut scratch = Vec::new();
        for (i, p) in img.meta.partitions.iter().enumerate() {
            let mut out = vec![0u8; (p.pages * PAGE) as usize];
            img.read_partition(i, &mut scratch, &mut out).unwrap();
            back.extend(out);
        }
        assert_eq!(back, stream);
        assert_eq!(
            img.meta.zero_pages(),
            pages.iter().filter(|&&p| p == 0).count() as u64
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn every_codec_round_trips(pages in proptest::collection::vec(0u8..4, 0..40),
                                   partition_pages in 1u64..9) {
            for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 1 }] {
                roundtrip(codec, &pages, partition_pages);
            }
        }
    }

    fn written(codec: Codec) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let (runs, stream) = layout(&[1, 1, 0, 2, 3]);
        write(&path, sample_meta(codec, runs), &stream, 2, 1).unwrap();
        (dir, path)
    }

    #[test]
    fn refuses_damaged_files_naming_the_damage() {
        let (_d, path) = written(Codec::Lz4);
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&path, bytes).unwrap();
            let err = match Image::open(&path) {
                Err(e) => e.to_string(),
                Ok(img) => {
                    let mut out = vec![0u8; 2 * PAGE as usize];
                    let mut scratch = Vec::new();
                    (0..img.meta.partitions.len())
                        .find_map(|i| {
                            let n = (img.meta.partitions[i].pages * PAGE) as usize;
                            img.read_partition(i, &mut scratch, &mut out[..n]).err()
                        })
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                }
            };
            assert!(err.contains(want), "{want:?} not in {err:?}");
        };
        let mut b = good.clone();
        b[0] = b'X';
        check(&b, "not a Spore snapshot");
        let mut b = good.clone();
        b[8] = 9;
        check(&b, "version 9");
        let mut b = good.clone();
        b[20] ^= 1;
        check(&b, "header checksum");
        let mut b = good.clone();
        b[DATA_OFFSET as usize + 3] ^= 0x40;
        check(&b, "partition 0 checksum");
        let mut b = good.clone();
        let last = b.len() - 2;
        b[last] ^= 0x01;
        check(&b, "metadata checksum");
        check(&good[..good.len() - 10], "truncated");
        check(&good[..30], "truncated");
        check(&good, "");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any damage to a valid image is refused with an error (never a panic, never a
        /// silent success), except damage to bytes no reader looks at.
        #[test]
        fn damaged_images_are_refused(codec in 0u8..3, flips in proptest::collection::vec((any::<u32>(), 1u8..=255), 1..4),
                                      cut in proptest::option::of(any::<u32>())) {
            let codec = [Codec::None, Codec::Lz4, Codec::Zstd { level: 1 }][codec as usize];
            let (_d, path) = written(codec);
            let good = std::fs::read(&path).unwrap();
            let meta = check_bytes(&good).unwrap();
            let mut bad = good.clone();
            for (at, x) in &flips {
                let i = *at as usize % bad.len();
                bad[i] ^= x;
            }
            if let Some(c) = cut {
                bad.truncate(c as usize % bad.len());
            }
            // Bytes between the header and the data, and padding in the header, are unused.
            let used = |i: usize| (i < 36 || (40..HEADER_LEN).contains(&i)) || i >= DATA_OFFSET as usize;
            let touched = flips.iter().any(|(at, _)| used(*at as usize % good.len())) || cut.is_some();
            match check_bytes(&bad) {
                Ok(m) => prop_assert!(!touched || m == meta, "damage accepted"),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn transcoding_keeps_the_pages() {
        let (_d, path) = written(Codec::Lz4);
        let src = Image::open(&path).unwrap();
        let dst = path.with_extension("zst");
        let meta = transcode(&src, &dst, Codec::Zstd { level: 3 }, 1, 2).unwrap();
        assert_eq!(meta.runs, src.meta.runs);
        assert_eq!(meta.partitions.len(), 4);
        let back = Image::open(&dst).unwrap();
        let mut page = vec![0u8; PAGE as usize];
        let mut scratch = Vec::new();
        back.read_partition(2, &mut scratch, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 2),
            "third stored page is the 2-filled one"
        );
    }

    #[test]
    fn a_plain_memory_file_stores_the_zero_pages_too() {
        let (_d, path) = written(Codec::Lz4); // pages 1, 1, 0, 2, 3
        let src = Image::open(&path).unwrap();
        let dst = path.with_extension("plain");
        let meta = transcode_with_zeros(&src, &dst, 2).unwrap();
        assert_eq!(meta.zero_pages(), 0);
        assert_eq!(meta.stored_pages(), 5);
        assert!(meta.runs.iter().all(|r| !r.zero));
        let back = Image::open(&dst).unwrap();
        let mut stream = Vec::new();
        let mut scratch = Vec::new();
        for (i, p) in back.meta.partitions.iter().enumerate() {
            let mut out = vec![0u8; (p.pages * PAGE) as usize];
            back.read_partition(i, &mut scratch, &mut out).unwrap();
            stream.extend(out);
        }
        let fills: Vec<u8> = stream.chunks(PAGE as usize).map(|c| c[0]).collect();
        assert_eq!(
            fills,
            [1, 1, 0, 2, 3],
            "address order, the zero page in its place"
        );
        // The memory part of a restore, as the benchmark times it, reads and checks it all.
        crate::restore::install_scratch(&back, 2).unwrap();
        crate::restore::install_scratch(&src, 1).unwrap();
    }

    #[test]
    fn codec_names_parse() {
        assert_eq!("zstd-3".parse::<Codec>(), Ok(Codec::Zstd { level: 3 }));
        assert_eq!("lz4".parse::<Codec>(), Ok(Codec::Lz4));
        assert!("gzip".parse::<Codec>().is_err());
        assert!("zstd-99".parse::<Codec>().is_err());
        for c in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
            assert_eq!(c.to_string().parse::<Codec>(), Ok(c));
        }
    }
}
