//! Snapshots of functions' warm runtimes on disk (`<data-dir>/snapshots/NAME@REVISION.snap`):
//! which one is current for a function, taking one, listing and removing them.
//!
//! A function with `snapshot = true` has its runtime copied at its first init (the runtime
//! offers itself before reporting ready; see `Instance::start`; a cfork function's template
//! likewise, see `Template::start`); later cold starts restore that image instead of
//! importing again. The file name (`NAME@REVISION-BUILD.snap`) carries the registry revision,
//! so a redeploy never restores old code, and a digest of Spore's runtime files, so an
//! upgrade never resumes the old runtime code an image holds in memory; files survive a
//! daemon restart (the runtime files they map are rewritten only when their content
//! changes).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use spore_snapshot::capture::{capture, CaptureOptions};
use spore_snapshot::image::{Codec, Image};

/// The snapshot store.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    codec: Codec,
    /// Digest of the runtime files of this build (in every file name).
    build: String,
    /// Functions whose snapshot is being taken now.
    busy: Mutex<HashSet<String>>,
    /// Functions (and the revision) whose runtime cannot be snapshotted: not tried again
    /// until a redeploy.
    refused: Mutex<std::collections::HashMap<String, u64>>,
}

/// A snapshot being taken; dropping it lets another attempt start.
#[derive(Debug)]
pub struct Pending {
    store: Arc<Snapshots>,
    function: String,
    revision: u64,
    path: PathBuf,
}

impl Pending {
    /// Copies runtime `pid` (host pid), waiting in its checkpoint call with its context record
    /// at `context`, into the image; older revisions' images go.
    pub fn capture(&self, pid: i32, context: u64) -> Result<(), String> {
        let opts = CaptureOptions {
            function: self.function.clone(),
            codec: self.store.codec,
            allowed_fds: Some(vec![0, 1, 2, spore_runtime::CONTROL_FD]),
            ..CaptureOptions::default()
        };
        let report = match capture(pid, context, &self.path, &opts) {
            Ok(report) => report,
            Err(e) => {
                if matches!(e, spore_snapshot::SnapshotError::Unsupported(_)) {
                    // The runtime itself is the problem: trying at every init would only cost.
                    self.store
                        .refused
                        .lock()
                        .expect("snapshots lock")
                        .insert(self.function.clone(), self.revision);
                }
                return Err(e.to_string());
            }
        };
        tracing::info!(
            function = %self.function,
            "snapshot taken: {} stored pages, {} zero, {:.1} MiB on disk ({:.1} ms read, {:.1} ms write)",
            report.meta.stored_pages(),
            report.meta.zero_pages(),
            report.file_bytes as f64 / 1048576.0,
            report.read_ms,
            report.write_ms
        );
        for old in self.store.files_of(&self.function) {
            if old != self.path {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.store
            .busy
            .lock()
            .expect("snapshots lock")
            .remove(&self.function);
    }
}

/// One stored snapshot, as `spore snapshot ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Function.
    pub function: String,
    /// Registry revision it was taken at.
    pub revision: u64,
    /// File.
    pub path: PathBuf,
    /// File size.
    pub file_bytes: u64,
    /// Bytes of all the runtime's mappings.
    pub mapped_bytes: u64,
    /// Pages stored.
    pub stored_pages: u64,
    /// Zero pages (not stored).
    pub zero_pages: u64,
    /// Codec of the partitions.
    pub codec: String,
    /// Seconds since the epoch.
    pub created_unix: u64,
    /// Why the file is unusable, if it is.
    pub error: Option<String>,
}

/// (function, revision, build) of a snapshot file name; the build is empty in names from
/// before builds were recorded.
fn parse_name(path: &Path) -> Option<(String, u64, String)> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".snap")?;
    let (name, rest) = stem.rsplit_once('@')?;
    let (rev, build) = rest.split_once('-').unwrap_or((rest, ""));
    Some((name.to_owned(), rev.parse().ok()?, build.to_owned()))
}

impl Snapshots {
    /// Opens (creating) the store under `dir`.
    pub fn new(dir: PathBuf, codec: Codec, build: String) -> std::io::Result<Snapshots> {
        std::fs::create_dir_all(&dir)?;
        // An image is a whole process's memory (its environment included): the daemon's
        // alone, also in data dirs from before this rule.
        spore_registry::store::make_private(&dir)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            spore_registry::store::make_private(&e.path())?;
        }
        Ok(Snapshots {
            dir,
            codec,
            build,
            busy: Mutex::new(HashSet::new()),
            refused: Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn path(&self, function: &str, revision: u64) -> PathBuf {
        self.dir
            .join(format!("{function}@{revision}-{}.snap", self.build))
    }

    fn files_of(&self, function: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| parse_name(p).is_some_and(|(n, _, _)| n == function))
            .collect()
    }

    /// The image to restore `function` at `revision` from, if there is one.
    pub fn current(&self, function: &str, revision: u64) -> Option<PathBuf> {
        let path = self.path(function, revision);
        path.is_file().then_some(path)
    }

    /// Starts taking a snapshot of `function` at `revision`, unless one exists or is being
    /// taken.
    pub fn begin(self: &Arc<Self>, function: &str, revision: u64) -> Option<Arc<Pending>> {
        if self.current(function, revision).is_some() {
            return None;
        }
        let refused = self.refused.lock().expect("snapshots lock").get(function) == Some(&revision);
        if refused {
            return None;
        }
        if !self
            .busy
            .lock()
            .expect("snapshots lock")
            .insert(function.to_owned())
        {
            return None;
        }
        Some(Arc::new(Pending {
            store: self.clone(),
            function: function.to_owned(),
            revision,
            path: self.path(function, revision),
        }))
    }

    /// Removes an image a restore refused (it is taken again at the next init).
    pub fn discard(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("removing snapshot {}: {e}", path.display());
        }
    }

    /// Removes every snapshot of `function`; returns how many.
    pub fn remove(&self, function: &str) -> usize {
        self.files_of(function)
            .into_iter()
            .filter(|p| std::fs::remove_file(p).is_ok())
            .count()
    }

    /// Every stored snapshot, by function name.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<SnapshotInfo> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|path| {
                let (function, revision, build) = parse_name(&path)?;
                let mut info = info(function, revision, path);
                if build != self.build && info.error.is_none() {
                    info.error = Some(format!(
                        "taken by another Spore build (runtime {build:?}, this one {:?}): not restored; replaced at the next init",
                        self.build
                    ));
                }
                Some(info)
            })
            .collect();
        out.sort_by(|a, b| {
            a.function
                .cmp(&b.function)
                .then(a.revision.cmp(&b.revision))
        });
        out
    }
}

fn info(function: String, revision: u64, path: PathBuf) -> SnapshotInfo {
    let file_bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
    let mut out = SnapshotInfo {
        function,
        revision,
        path,
        file_bytes,
        mapped_bytes: 0,
        stored_pages: 0,
        zero_pages: 0,
        codec: String::new(),
        created_unix: 0,
        error: None,
    };
    match Image::open(&out.path) {
        Ok(img) => {
            out.mapped_bytes = img.meta.mapped_bytes();
            out.stored_pages = img.meta.stored_pages();
            out.zero_pages = img.meta.zero_pages();
            out.codec = img.meta.codec.to_string();
            out.created_unix = img.meta.created_unix;
        }
        Err(e) => out.error = Some(e.to_string()),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_revisions_and_one_capture_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Snapshots::new(dir.path().join("s"), Codec::Lz4, "0badcafe".into()).unwrap());
        assert_eq!(
            parse_name(Path::new("/x/a-b@12-0badcafe.snap")),
            Some(("a-b".into(), 12, "0badcafe".into()))
        );
        assert_eq!(
            parse_name(Path::new("/x/a-b@12.snap")),
            Some(("a-b".into(), 12, String::new()))
        );
        assert_eq!(parse_name(Path::new("/x/a.snap")), None);
        assert!(store.current("f", 1).is_none());
        let p = store.begin("f", 1).unwrap();
        assert!(
            store.begin("f", 1).is_none(),
            "a second capture while one runs"
        );
        drop(p);
        std::fs::write(store.path("f", 1), b"junk").unwrap();
        assert!(store.current("f", 1).is_some());
        assert!(store.begin("f", 1).is_none(), "one exists already");
        let listed = store.list();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].error.as_deref().unwrap().contains("truncated"));
        // An image of another build is listed as such, never restored, and goes with the
        // function's others.
        std::fs::write(dir.path().join("s/f@1-12345678.snap"), b"junk").unwrap();
        std::fs::write(dir.path().join("s/f@1.snap"), b"junk").unwrap();
        assert_eq!(store.current("f", 1), Some(store.path("f", 1)));
        assert_eq!(store.list().len(), 3);
        assert_eq!(store.remove("f"), 3);
        assert!(store.list().is_empty());
        std::fs::write(dir.path().join("s/g@1-12345678.snap"), b"junk").unwrap();
        assert!(store.current("g", 1).is_none(), "another build's image");
        let listed = store.list();
        assert!(listed[0].error.is_some());
        assert!(store.begin("g", 1).is_some(), "a new one is taken");
    }
}
