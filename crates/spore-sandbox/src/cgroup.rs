//! Cgroups for sandboxes, on both layouts: v1 (one hierarchy per controller, as on this
//! machine's hybrid setup) and v2 (the unified hierarchy with controllers enabled).
//!
//! Written on plain file operations rather than a cgroups crate: the work is a handful of
//! writes, and the hybrid layout found here (v1 controllers plus a v2 mount with no
//! controllers) must be detected by what actually has controllers, which is easiest to get
//! right with the files in view.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::SandboxError;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Cgroup v1: one directory per controller under the root.
    V1 {
        /// Usually `/sys/fs/cgroup`.
        root: PathBuf,
    },
    /// Cgroup v2 with the memory, cpu and pids controllers available.
    V2 {
        /// Usually `/sys/fs/cgroup`.
        root: PathBuf,
    },
}

/// Limits applied to one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes (no swap on top).
    pub memory_bytes: u64,
    /// CPU quota in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: u32,
    /// Most processes (and threads) at once.
    pub pids_max: u32,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SandboxError + '_ {
    move |source| SandboxError::Cgroup {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), SandboxError> {
    fs::write(path, value).map_err(io_err(path))
}

impl Layout {
    /// Detects the layout under `/sys/fs/cgroup`.
    pub fn detect() -> Result<Layout, SandboxError> {
        Self::detect_at(Path::new(CGROUP_ROOT))
    }

    /// Detects the layout under `root` (tests point this elsewhere).
    pub fn detect_at(root: &Path) -> Result<Layout, SandboxError> {
        if let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) {
            let have: Vec<&str> = controllers.split_whitespace().collect();
            if ["memory", "pids", "cpu"].iter().all(|c| have.contains(c)) {
                return Ok(Layout::V2 {
                    root: root.to_owned(),
                });
            }
        }
        if V1_CONTROLLERS
            .iter()
            .all(|c| root.join(c).join("cgroup.procs").exists())
        {
            return Ok(Layout::V1 {
                root: root.to_owned(),
            });
        }
        Err(SandboxError::Unsupported(format!(
            "no usable cgroup hierarchy under {}: need v1 memory, cpu and pids hierarchies or v2 with those controllers",
            root.display()
        )))
    }

    /// The directories of cgroup `rel` (one per v1 controller, one for v2).
    fn dirs(&self, rel: &Path) -> Vec<PathBuf> {
        match self {
            Layout::V1 { root } => V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(rel))
                .collect(),
            Layout::V2 { root } => vec![root.join(rel)],
        }
    }

    /// Creates the parent group `name` that holds a daemon's sandboxes.
    pub fn create_parent(&self, name: &str) -> Result<(), SandboxError> {
        for dir in self.dirs(Path::new(name)) {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        if let Layout::V2 { root } = self {
            // Controllers must be enabled on every level above a group that uses them.
            for level in [root.clone(), root.join(name)] {
                let file = level.join("cgroup.subtree_control");
                write(&file, "+memory +cpu +pids")?;
            }
        }
        Ok(())
    }

    /// Kills and removes every group under parent `name` (left by a daemon that died), then
    /// the parent itself if `remove_parent`.
    pub fn sweep_parent(&self, name: &str, remove_parent: bool) -> Result<usize, SandboxError> {
        let mut swept = std::collections::BTreeSet::new();
        for dir in self.dirs(Path::new(name)) {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    swept.insert(entry.file_name());
                }
            }
        }
        for child in &swept {
            let group = Cgroup {
                dirs: self.dirs(&Path::new(name).join(child)),
                layout: self.clone(),
                spared: Vec::new(),
                hot: Arc::default(),
            };
            group.destroy()?;
        }
        if remove_parent {
            for dir in self.dirs(Path::new(name)) {
                remove_dir_retrying(&dir)?;
            }
        }
        Ok(swept.len())
    }
}

/// One sandbox's cgroup (a directory per v1 controller, or one v2 directory). A handle: a
/// clone names the same group (nothing is removed when one is dropped).
#[derive(Debug, Clone)]
pub struct Cgroup {
    layout: Layout,
    dirs: Vec<PathBuf>,
    /// Processes that may pass through the group but do not belong to it (a cfork template
    /// forks from inside its child's group): never killed, never counted.
    spared: Vec<i32>,
    /// Files read after every invocation, kept open (shared by clones of the handle).
    hot: Arc<HotFiles>,
}

/// Counter files of a group read after every invocation, opened once: opening a cgroup file
/// walks its path through kernfs and costs more than the read (a profile of warm invocations
/// under load had a quarter of the daemon's CPU in those opens). A group removed under an open
/// file makes its reads fail (`ENODEV`), as a missing file would.
#[derive(Debug, Default)]
struct HotFiles {
    peak: OnceLock<Option<fs::File>>,
    procs: OnceLock<Option<fs::File>>,
}

/// Reads all of a cgroup file through a descriptor kept open, from offset 0 (kernfs files
/// are generated afresh by a read at offset 0).
fn read_open(slot: &OnceLock<Option<fs::File>>, path: impl FnOnce() -> PathBuf) -> Option<String> {
    let file = slot.get_or_init(|| fs::File::open(path()).ok()).as_ref()?;
    let mut out = Vec::with_capacity(64);
    let mut buf = [0u8; 4096];
    loop {
        let n = file.read_at(&mut buf, out.len() as u64).ok()?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).ok()
}

impl Cgroup {
    /// Creates group `parent/name` with `limits`.
    pub fn create(
        layout: &Layout,
        parent: &str,
        name: &str,
        limits: Limits,
    ) -> Result<Cgroup, SandboxError> {
        let rel = Path::new(parent).join(name);
        let group = Cgroup {
            dirs: layout.dirs(&rel),
            layout: layout.clone(),
            spared: Vec::new(),
            hot: Arc::default(),
        };
        for dir in &group.dirs {
            fs::create_dir(dir).map_err(io_err(dir))?;
        }
        if let Err(e) = group.apply(limits) {
            let _ = group.destroy();
            return Err(e);
        }
        Ok(group)
    }

    fn apply(&self, limits: Limits) -> Result<(), SandboxError> {
        let period: u64 = 100_000;
        let quota = u64::from(limits.cpu_millis) * period / 1000;
        match &self.layout {
            Layout::V1 { .. } => {
                let (mem, cpu, pids) = (&self.dirs[0], &self.dirs[1], &self.dirs[2]);
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory_bytes.to_string())?;
                }
                write(&cpu.join("cpu.cfs_period_us"), &period.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&pids.join("pids.max"), &limits.pids_max.to_string())?;
            }
            Layout::V2 { .. } => {
                let dir = &self.dirs[0];
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes itself into to join this group.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The files through which a *single-threaded* process moves itself into this group by
    /// writing `0`: v1's `tasks`, where the kernel skips the global threadgroup lock for a
    /// thread moving itself (a `cgroup.procs` write takes it, and waits out an RCU grace
    /// period when no other writer was recent: measured 8-30 ms here against 0.1 ms); v2's
    /// `cgroup.procs`.
    pub fn self_attach_files(&self) -> Vec<PathBuf> {
        let file = match self.layout {
            Layout::V1 { .. } => "tasks",
            Layout::V2 { .. } => "cgroup.procs",
        };
        self.dirs.iter().map(|d| d.join(file)).collect()
    }

    fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    fn pids_dir(&self) -> &Path {
        self.dirs
            .last()
            .expect("a cgroup has at least one directory")
    }

    /// Whether the kernel's OOM killer has killed a process of this group.
    pub fn oom_killed(&self) -> bool {
        let file = match self.layout {
            Layout::V1 { .. } => "memory.oom_control",
            Layout::V2 { .. } => "memory.events",
        };
        fs::read_to_string(self.memory_dir().join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    /// Number of processes and threads in the group now.
    pub fn pids_current(&self) -> Option<u64> {
        fs::read_to_string(self.pids_dir().join("pids.current"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Memory charged to the group now, in bytes.
    pub fn memory_current(&self) -> Option<u64> {
        self.memory_counter("memory.usage_in_bytes", "memory.current")
    }

    /// Peak memory use in bytes, where the kernel reports it.
    pub fn memory_peak(&self) -> Option<u64> {
        let file = match self.layout {
            Layout::V1 { .. } => "memory.max_usage_in_bytes",
            Layout::V2 { .. } => "memory.peak",
        };
        read_open(&self.hot.peak, || self.memory_dir().join(file))?
            .trim()
            .parse()
            .ok()
    }

    /// How many of the group's own processes (spared ones left out) there are now, counted
    /// in one hierarchy: a process that forks leaves its child in every hierarchy it is in.
    pub fn process_count(&self) -> usize {
        read_open(&self.hot.procs, || self.pids_dir().join("cgroup.procs")).map_or(0, |t| {
            t.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .filter(|p| !self.spared.contains(p))
                .count()
        })
    }

    /// A byte counter of the memory controller, named `v1` or `v2` by hierarchy.
    fn memory_counter(&self, v1: &str, v2: &str) -> Option<u64> {
        let file = match self.layout {
            Layout::V1 { .. } => v1,
            Layout::V2 { .. } => v2,
        };
        fs::read_to_string(self.memory_dir().join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Marks processes that may pass through this group without belonging to it.
    pub fn spare(&mut self, pids: &[i32]) {
        self.spared.extend_from_slice(pids);
    }

    /// Host pids of the group's own processes (spared ones left out).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .procs_files()
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|p| !self.spared.contains(p));
        pids
    }

    /// Sends SIGKILL to every process in the group until it is empty (30 s at most: when a
    /// thousand sandboxes are stopped at once on two CPUs, their exits, each tearing down its
    /// namespaces, take seconds).
    pub fn kill_all(&self) -> Result<(), SandboxError> {
        if let (Layout::V2 { .. }, true) = (&self.layout, self.spared.is_empty()) {
            let kill_file = self.dirs[0].join("cgroup.kill");
            if kill_file.exists() {
                let _ = fs::write(&kill_file, "1");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Cgroup {
                    path: self.dirs[0].clone(),
                    source: io::Error::other(format!(
                        "{} processes still alive after SIGKILL",
                        pids.len()
                    )),
                });
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills everything in the group and removes its directories.
    pub fn destroy(&self) -> Result<(), SandboxError> {
        self.kill_all()?;
        for dir in &self.dirs {
            remove_dir_retrying(dir)?;
        }
        Ok(())
    }
}

/// `rmdir` of a cgroup directory; retried briefly because a killed task can take a moment to
/// leave the group.
fn remove_dir_retrying(dir: &Path) -> Result<(), SandboxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err(dir)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v1_and_v2_layouts() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(Layout::detect_at(tmp.path()).is_err());
        for c in V1_CONTROLLERS {
            fs::create_dir(tmp.path().join(c)).unwrap();
            fs::write(tmp.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        assert!(matches!(
            Layout::detect_at(tmp.path()),
            Ok(Layout::V1 { .. })
        ));
        // A v2 root with controllers wins over v1 directories.
        fs::write(
            tmp.path().join("cgroup.controllers"),
            "cpu io memory pids\n",
        )
        .unwrap();
        assert!(matches!(
            Layout::detect_at(tmp.path()),
            Ok(Layout::V2 { .. })
        ));
        // A v2 mount without the controllers (hybrid hosts) does not count.
        fs::write(tmp.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        assert!(matches!(
            Layout::detect_at(tmp.path()),
            Ok(Layout::V1 { .. })
        ));
    }

    /// A v1 group whose only directory is `dir`.
    fn group_in(dir: &Path) -> Cgroup {
        Cgroup {
            layout: Layout::V1 { root: dir.into() },
            dirs: vec![dir.to_owned()],
            spared: Vec::new(),
            hot: Arc::default(),
        }
    }

    #[test]
    fn reads_oom_counters() {
        let tmp = tempfile::tempdir().unwrap();
        let group = group_in(tmp.path());
        fs::write(
            tmp.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        .unwrap();
        assert!(!group.oom_killed());
        fs::write(
            tmp.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert!(group.oom_killed());
    }

    #[test]
    fn counters_kept_open_are_read_afresh() {
        let tmp = tempfile::tempdir().unwrap();
        let group = group_in(tmp.path());
        let file = tmp.path().join("memory.max_usage_in_bytes");
        fs::write(&file, "4096\n").unwrap();
        assert_eq!(group.memory_peak(), Some(4096));
        // The same descriptor, read again from the start, sees what the file says now.
        fs::write(&file, "1048576\n").unwrap();
        assert_eq!(group.memory_peak(), Some(1 << 20));
        let procs: String = (1..=2000).map(|p| format!("{p}\n")).collect();
        fs::write(tmp.path().join("cgroup.procs"), procs).unwrap();
        assert_eq!(group.process_count(), 2000, "a list longer than one read");
    }

    #[test]
    fn spared_processes_are_neither_listed_nor_killed() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("cgroup.procs"), "5\n7\n").unwrap();
        let mut group = group_in(tmp.path());
        assert_eq!(group.pids(), vec![5, 7]);
        assert_eq!(group.process_count(), 2);
        group.spare(&[7]);
        assert_eq!(group.pids(), vec![5]);
        assert_eq!(group.process_count(), 1);
        // Only spared processes left: nothing to kill, so kill_all returns at once.
        fs::write(tmp.path().join("cgroup.procs"), "7\n").unwrap();
        group.kill_all().unwrap();
    }
}
