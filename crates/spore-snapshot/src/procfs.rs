//! What a snapshot reads from `/proc`: the memory map, the mm fields of `stat`, page flags
//! from `pagemap`, and a process's open descriptors.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::SnapshotError;

/// The page size on every platform Spore snapshots (x86-64).
pub const PAGE: u64 = 4096;

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapLine {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Shared (`s`) rather than private (`p`).
    pub shared: bool,
    /// File offset.
    pub offset: u64,
    /// Device `major:minor` as printed.
    pub dev: String,
    /// Inode (0 for anonymous memory).
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`...), empty for anonymous memory.
    pub name: String,
}

impl MapLine {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the mapping is empty (never, for lines the kernel prints).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Whether `name` is one of the kernel's per-process mappings a restore moves rather than
/// recreates (`[vdso]`, `[vvar]`, `[vvar_vclock]`).
pub fn is_vdso(name: &str) -> bool {
    matches!(name, "[vdso]" | "[vvar]" | "[vvar_vclock]")
}

/// Parses the text of a maps file.
pub fn parse_maps(text: &str) -> Result<Vec<MapLine>, SnapshotError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_map_line)
        .collect()
}

fn parse_map_line(line: &str) -> Result<MapLine, SnapshotError> {
    let bad = || SnapshotError::Proc(format!("unreadable maps line {line:?}"));
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or_else(bad)?;
    let perms = it.next().ok_or_else(bad)?.as_bytes();
    let offset = it.next().ok_or_else(bad)?;
    let dev = it.next().ok_or_else(bad)?;
    let inode = it.next().ok_or_else(bad)?;
    let name = it.next().unwrap_or("").trim_start().to_owned();
    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad());
    if perms.len() != 4 {
        return Err(bad());
    }
    let (start, end) = (hex(start)?, hex(end)?);
    if end <= start || start % PAGE != 0 || end % PAGE != 0 {
        return Err(bad());
    }
    Ok(MapLine {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: hex(offset)?,
        dev: dev.to_owned(),
        inode: inode.parse().map_err(|_| bad())?,
        name,
    })
}

/// Reads and parses `/proc/<pid>/maps` (`pid` may be `"self"`).
pub fn maps(pid: &str) -> Result<Vec<MapLine>, SnapshotError> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).map_err(|e| SnapshotError::io(&path, e))?;
    parse_maps(&text)
}

/// The memory-layout fields a restore hands to `PR_SET_MM_MAP`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmFields {
    /// Start of the executable's code.
    pub start_code: u64,
    /// End of the executable's code.
    pub end_code: u64,
    /// Start of its data.
    pub start_data: u64,
    /// End of its data.
    pub end_data: u64,
    /// Start of the heap (`brk` area).
    pub start_brk: u64,
    /// Current program break.
    pub brk: u64,
    /// Bottom of the main stack at exec.
    pub start_stack: u64,
    /// argv strings.
    pub arg_start: u64,
    /// End of the argv strings.
    pub arg_end: u64,
    /// Environment strings.
    pub env_start: u64,
    /// End of the environment strings.
    pub env_end: u64,
}

/// Reads the mm fields of `/proc/<pid>/stat`; `brk` is taken from the `[heap]` mapping's end
/// (or `start_brk` when there is none).
pub fn mm_fields(pid: &str, maps: &[MapLine]) -> Result<MmFields, SnapshotError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| SnapshotError::io(&path, e))?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| SnapshotError::Proc(format!("unreadable {path}")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| -> Result<u64, SnapshotError> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| SnapshotError::Proc(format!("{path}: field {n} missing")))
    };
    let start_brk = field(47)?;
    let brk = maps
        .iter()
        .find(|m| m.name == "[heap]")
        .map(|m| m.end)
        .unwrap_or(start_brk);
    Ok(MmFields {
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk,
        brk,
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
    })
}

/// Page present in memory.
pub const PM_PRESENT: u64 = 1 << 63;
/// Page swapped out.
pub const PM_SWAPPED: u64 = 1 << 62;
/// Page is a file page or shared anonymous (not a private copy).
pub const PM_FILE: u64 = 1 << 61;

/// Reader of `/proc/<pid>/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens the pagemap of `pid`.
    pub fn open(pid: &str) -> Result<Pagemap, SnapshotError> {
        let path = format!("/proc/{pid}/pagemap");
        let file = File::open(&path).map_err(|e| SnapshotError::io(&path, e))?;
        Ok(Pagemap { file })
    }

    /// One entry per page of `[start, end)`.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<u64>, SnapshotError> {
        let n = ((end - start) / PAGE) as usize;
        let mut raw = vec![0u8; n * 8];
        self.file
            .read_exact_at(&mut raw, start / PAGE * 8)
            .map_err(|e| SnapshotError::io("pagemap", e))?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

/// Open descriptors of `pid`: number and link target.
pub fn fds(pid: &str) -> Result<Vec<(i32, PathBuf)>, SnapshotError> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| SnapshotError::io(&dir, e))? {
        let entry = entry.map_err(|e| SnapshotError::io(&dir, e))?;
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A descriptor closed between listing and reading is simply not there any more.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            out.push((fd, target));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "555555554000-555555556000 r--p 00000000 08:01 1234    /usr/bin/python3.11\n\
                    7ffff7fc1000-7ffff7fc5000 r--p 00000000 00:00 0                          [vvar]\n\
                    7ffff7ff0000-7ffff7ff1000 rw-p 00000000 00:00 0 \n\
                    7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0    [stack]\n\
                    7f0000000000-7f0000001000 rw-s 00000000 00:01 77   /memfd:spore ring (deleted)\n";
        let maps = parse_maps(text).unwrap();
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[0].name, "/usr/bin/python3.11");
        assert_eq!(maps[0].inode, 1234);
        assert!(maps[0].read && !maps[0].write && !maps[0].shared);
        assert_eq!(maps[1].name, "[vvar]");
        assert_eq!(maps[2].name, "");
        assert_eq!(maps[3].len(), 0x21000);
        assert!(maps[4].shared);
        assert_eq!(maps[4].name, "/memfd:spore ring (deleted)");
        assert!(parse_maps("zz-10 rw-p 0 0 0").is_err());
        assert!(parse_maps("2000-1000 rw-p 00000000 00:00 0").is_err());
    }

    #[test]
    fn reads_own_process() {
        let maps = maps("self").unwrap();
        assert!(maps.iter().any(|m| m.name == "[stack]"));
        let mm = mm_fields("self", &maps).unwrap();
        assert!(mm.start_code < mm.end_code && mm.start_brk <= mm.brk);
        let pm = Pagemap::open("self").unwrap();
        let stack = maps.iter().find(|m| m.name == "[stack]").unwrap();
        let entries = pm.entries(stack.start, stack.end).unwrap();
        // The top of the stack is in use, so present (pagemap hides frame numbers, not flags).
        assert!(entries.last().unwrap() & PM_PRESENT != 0);
        assert!(fds("self")
            .unwrap()
            .iter()
            .any(|(fd, _)| *fd == 0 || *fd == 2));
    }
}
