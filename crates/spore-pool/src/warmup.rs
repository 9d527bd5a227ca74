//! Automatic warm-up: the modules a function's calls import, recorded per revision, so that
//! later instances import them at start-up (in the cfork template, before a snapshot, in a
//! fresh container) instead of on their first call.
//!
//! The runtime reports, with a call's result, the modules that call imported for the first
//! time in its instance. [`Warmups::record`] keeps their union per function key (a function or
//! one of its published versions) and [`stamp`] (revision, code and time of the change), on
//! disk under `<data-dir>/warmup/`, so that it outlives the daemon; a new revision, or a new
//! function of a deleted one's name, starts an empty list.
//!
//! The list is an optimisation, never a reason for a start to fail: a start that fails with
//! it and succeeds without it turns it off for that revision ([`Warmups::turn_off`]), and the
//! runtime stops importing once it has spent its time budget.
//!
//! Who may do what: the names come from the function's own runtime, and only that function's
//! later instances import them. They are checked (dotted identifiers, bounded in length and
//! number) before they are stored or passed to a runtime. The files are the daemon's (mode
//! 0600 in a 0700 directory).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use spore_registry::FunctionRecord;

/// Most modules kept per function revision.
pub const MAX_MODULES: usize = 2000;
/// Longest module name accepted.
pub const MAX_NAME: usize = 200;
/// How many times a growing list retakes a function's snapshot, per revision (a function
/// whose calls keep importing new modules must not keep discarding its snapshot).
pub const MAX_RETAKES: u32 = 2;

/// What is stored per function key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    /// The [`stamp`] of the record the list belongs to (lists written before stamps existed
    /// have none, and start over).
    #[serde(default)]
    stamp: String,
    modules: BTreeSet<String>,
    /// Snapshots discarded for this revision because the list grew.
    #[serde(default)]
    retakes: u32,
    /// Modules that failed to import at an instance's start: dropped from `modules`, and
    /// not taken again at this stamp (a module that imports in a call but not at start-up
    /// would otherwise come back after every call that imports it).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    skip: BTreeSet<String>,
    /// Why the warm-up was turned off for this revision (a preloaded module started a thread
    /// in a cfork template, or starts failed with the list and worked without it); None: on.
    /// The modules are kept, so that [`Warmups::turn_on`] can undo a wrong verdict.
    #[serde(default)]
    off: Option<String>,
    /// A start failed without the list too, after one with it had failed: the list is not
    /// the cause, and is not suspected again at this stamp (else a function failing for its
    /// own reasons would be started twice on every try).
    #[serde(default)]
    cleared: bool,
}

/// What [`Warmups::record`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Nothing new.
    Unchanged,
    /// The list grew; the function's snapshot should be retaken (the first few times).
    Grew {
        /// Whether the snapshot should be discarded and retaken now.
        retake_snapshot: bool,
    },
}

/// Errors of the warm-up store.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    /// Reading or writing a list failed.
    #[error("automatic warm-up list {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a function record's list is kept for: its revision, code digest and time of change.
/// The revision alone is not enough: a function deleted and created again starts at
/// revision 1 again, and a call of the old one still running must not fill the new one's list.
pub fn stamp(rec: &FunctionRecord) -> String {
    format!("{}-{}-{}", rec.revision, rec.code_hex, rec.last_modified_ms)
}

/// How long a runtime may spend importing the list, at start-up or before a cfork template's
/// fork: half the start's time limit (the function's timeout, at least 10 s), so that the
/// list can never time a start out by itself. The runtime stops at the first module that
/// ends past it, and imports the rest on demand.
pub fn preload_budget(m: &spore_core::FunctionManifest) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(m.timeout_s).max(10)) / 2
}

/// Every function's recorded modules. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Warmups {
    dir: PathBuf,
    cache: Mutex<HashMap<String, Entry>>,
}

/// Whether `name` is a module name the runtime may import: dotted Python identifiers (ASCII),
/// at most [`MAX_NAME`] bytes, no private-looking top level that names the runtime itself.
pub fn valid_module(name: &str) -> bool {
    let ident = |p: &str| {
        let mut c = p.chars();
        matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    };
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(ident)
        && name != "__main__"
        && name != "bootstrap"
        && !name.starts_with("_spore")
}

impl Warmups {
    /// The store under `dir` (made, mode 0700, if missing).
    pub fn new(dir: PathBuf) -> Result<Warmups, WarmupError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| WarmupError::Io {
                path: dir.clone(),
                source,
            })?;
        Ok(Warmups {
            dir,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        // Keys are function names (letters, digits, `-`, `_`) with an optional `:version`.
        self.dir.join(format!("{key}.json"))
    }

    /// The entry of `key`, from the cache or its file (a missing or unreadable file is an
    /// empty list: the warm-up is an optimisation, never a reason for a start to fail).
    fn entry<'a>(&self, cache: &'a mut HashMap<String, Entry>, key: &str) -> &'a mut Entry {
        cache.entry(key.to_owned()).or_insert_with(|| {
            let path = self.path(key);
            match std::fs::read(&path) {
                Ok(bytes) => serde_json::from_slice::<Entry>(&bytes)
                    .map(|mut e| {
                        e.modules.retain(|m| valid_module(m));
                        e
                    })
                    .unwrap_or_else(|err| {
                        tracing::warn!(path = %path.display(), "ignoring an unreadable warm-up list: {err}");
                        Entry::default()
                    }),
                Err(_) => Entry::default(),
            }
        })
    }

    /// The modules to import for `key` at `stamp` (empty: none recorded, another revision,
    /// or turned off).
    pub fn modules(&self, key: &str, stamp: &str) -> Vec<String> {
        let mut cache = self.cache.lock().expect("warmups lock");
        let e = self.entry(&mut cache, key);
        if e.stamp != stamp || e.off.is_some() {
            return Vec::new();
        }
        e.modules.iter().cloned().collect()
    }

    /// Adds the modules a call of `key` at `stamp` imported, and drops those that failed to
    /// import at an instance's start (`failed`); names that are not module names are ignored.
    /// Persists the list when it changed. The caller checks that `stamp` is the function's
    /// current one: another stamp starts the list over.
    pub fn record(
        &self,
        key: &str,
        stamp: &str,
        names: &[String],
        failed: &[String],
    ) -> Result<Recorded, WarmupError> {
        let mut cache = self.cache.lock().expect("warmups lock");
        let e = self.entry(&mut cache, key);
        if e.stamp != stamp {
            *e = Entry {
                stamp: stamp.to_owned(),
                ..Entry::default()
            };
        }
        if e.off.is_some() {
            return Ok(Recorded::Unchanged);
        }
        let mut dropped = false;
        for n in failed.iter().filter(|n| valid_module(n)) {
            if e.skip.len() < MAX_MODULES && e.modules.remove(n.as_str()) {
                e.skip.insert(n.clone());
                dropped = true;
            }
        }
        let before = e.modules.len();
        for n in names.iter().filter(|n| valid_module(n)) {
            if e.modules.len() >= MAX_MODULES {
                break;
            }
            if !e.skip.contains(n.as_str()) {
                e.modules.insert(n.clone());
            }
        }
        if e.modules.len() == before {
            if dropped {
                self.save(key, e)?;
            }
            return Ok(Recorded::Unchanged);
        }
        let retake_snapshot = e.retakes < MAX_RETAKES;
        if retake_snapshot {
            e.retakes += 1;
        }
        // Saved under the lock: two records must not interleave on the file (a list is a few
        // KiB, written only when it grows).
        self.save(key, e)?;
        Ok(Recorded::Grew { retake_snapshot })
    }

    /// Turns the warm-up of `key` at `stamp` off, saying why (until the next revision).
    /// Returns whether this call turned it off: false when it was off already, or when the
    /// list is another stamp's (a start of an older revision, or of a deleted function,
    /// changes nothing).
    pub fn turn_off(&self, key: &str, stamp: &str, why: &str) -> Result<bool, WarmupError> {
        let mut cache = self.cache.lock().expect("warmups lock");
        let e = self.entry(&mut cache, key);
        if e.stamp != stamp || e.off.is_some() {
            return Ok(false);
        }
        e.off = Some(why.to_owned());
        self.save(key, e)?;
        Ok(true)
    }

    /// Undoes a [`Warmups::turn_off`] that returned true (the start that failed with the list
    /// failed without it too: the list was not the cause), and stops suspecting the list at
    /// this stamp.
    pub fn turn_on(&self, key: &str, stamp: &str) -> Result<(), WarmupError> {
        let mut cache = self.cache.lock().expect("warmups lock");
        let e = self.entry(&mut cache, key);
        if e.stamp != stamp || e.off.is_none() {
            return Ok(());
        }
        e.off = None;
        e.cleared = true;
        self.save(key, e)
    }

    /// Whether a failed start of `key` at `stamp` may be blamed on its list: there is one,
    /// it is on, and it was not cleared of blame before.
    pub fn suspect(&self, key: &str, stamp: &str) -> bool {
        let mut cache = self.cache.lock().expect("warmups lock");
        let e = self.entry(&mut cache, key);
        e.stamp == stamp && e.off.is_none() && !e.cleared && !e.modules.is_empty()
    }

    /// Why the warm-up of `key` at `stamp` is off (None: on, or nothing recorded).
    pub fn off_reason(&self, key: &str, stamp: &str) -> Option<String> {
        let mut cache = self.cache.lock().expect("warmups lock");
        let e = self.entry(&mut cache, key);
        (e.stamp == stamp).then(|| e.off.clone()).flatten()
    }

    /// Forgets `key` (a deleted function or version).
    pub fn remove(&self, key: &str) {
        let mut cache = self.cache.lock().expect("warmups lock");
        cache.remove(key);
        let _ = std::fs::remove_file(self.path(key));
    }

    fn save(&self, key: &str, e: &Entry) -> Result<(), WarmupError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(key);
        let tmp = path.with_extension("json.tmp");
        let io = |source| WarmupError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(e).expect("an entry serialises");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// The directory the lists are kept in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn module_names_are_checked() {
        for ok in ["numpy", "numpy.random._pcg64", "_hashlib", "a1.b_2"] {
            assert!(valid_module(ok), "{ok}");
        }
        let long = "a".repeat(MAX_NAME + 1);
        for bad in [
            "",
            "numpy..random",
            ".numpy",
            "1abc",
            "os,sys",
            "a b",
            "é",
            "__main__",
            "bootstrap",
            "_spore_cfork",
            long.as_str(),
        ] {
            assert!(!valid_module(bad), "{bad:?}");
        }
    }

    #[test]
    fn lists_grow_per_revision_persist_and_reset_on_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let w = Warmups::new(dir.path().join("warmup")).unwrap();
        assert!(w.modules("f", "1").is_empty());
        let r = w.record(
            "f",
            "1",
            &names(&["numpy.random", "bad name", "secrets"]),
            &[],
        );
        assert_eq!(
            r.unwrap(),
            Recorded::Grew {
                retake_snapshot: true
            }
        );
        assert_eq!(
            w.record("f", "1", &names(&["secrets"]), &[]).unwrap(),
            Recorded::Unchanged
        );
        assert_eq!(w.modules("f", "1"), names(&["numpy.random", "secrets"]));
        // Another daemon on the same data dir reads it back.
        let again = Warmups::new(dir.path().join("warmup")).unwrap();
        assert_eq!(again.modules("f", "1"), names(&["numpy.random", "secrets"]));
        assert!(again.modules("f", "2").is_empty(), "another revision");
        // Snapshots are retaken a bounded number of times.
        assert_eq!(
            again.record("f", "1", &names(&["a"]), &[]).unwrap(),
            Recorded::Grew {
                retake_snapshot: true
            }
        );
        assert_eq!(
            again.record("f", "1", &names(&["b"]), &[]).unwrap(),
            Recorded::Grew {
                retake_snapshot: false
            }
        );
        // A new revision starts over.
        again.record("f", "2", &names(&["json"]), &[]).unwrap();
        assert_eq!(again.modules("f", "2"), names(&["json"]));
        assert!(again.modules("f", "1").is_empty());
        // Turned off, it stays off until the next revision.
        assert!(again.suspect("f", "2"));
        assert!(
            !again.turn_off("f", "1", "stale").unwrap(),
            "another stamp: no-op"
        );
        assert!(again.turn_off("f", "2", "a thread").unwrap());
        assert!(!again.turn_off("f", "2", "again").unwrap(), "off already");
        assert!(!again.suspect("f", "2"));
        assert_eq!(
            again.record("f", "2", &names(&["zlib"]), &[]).unwrap(),
            Recorded::Unchanged
        );
        assert!(again.modules("f", "2").is_empty());
        assert_eq!(again.off_reason("f", "2").as_deref(), Some("a thread"));
        // Off survives a restart of the daemon, and a wrong verdict is undone with the
        // list intact.
        let third = Warmups::new(dir.path().join("warmup")).unwrap();
        assert!(third.modules("f", "2").is_empty());
        third.turn_on("f", "2").unwrap();
        assert_eq!(third.modules("f", "2"), names(&["json"]));
        assert_eq!(third.off_reason("f", "2"), None);
        assert!(
            !third.suspect("f", "2"),
            "cleared of blame: not suspected again"
        );
        again.turn_off("f", "2", "a thread").unwrap();
        again.record("f", "3", &names(&["zlib"]), &[]).unwrap();
        assert_eq!(again.modules("f", "3"), names(&["zlib"]));
        // A module that failed to import at a start is dropped, and a call that imports it
        // again does not bring it back.
        again.record("f", "3", &names(&["gone"]), &[]).unwrap();
        assert_eq!(again.modules("f", "3"), names(&["gone", "zlib"]));
        let r = again.record("f", "3", &[], &names(&["gone"])).unwrap();
        assert_eq!(r, Recorded::Unchanged);
        assert_eq!(again.modules("f", "3"), names(&["zlib"]));
        again.record("f", "3", &names(&["gone"]), &[]).unwrap();
        assert_eq!(again.modules("f", "3"), names(&["zlib"]));
        let reread = Warmups::new(dir.path().join("warmup")).unwrap();
        assert_eq!(
            reread.modules("f", "3"),
            names(&["zlib"]),
            "dropped on disk too"
        );
        again.remove("f");
        assert!(!dir.path().join("warmup/f.json").exists());
    }

    #[test]
    fn a_corrupt_list_is_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let w = Warmups::new(dir.path().to_path_buf()).unwrap();
        std::fs::write(dir.path().join("f.json"), b"{not json").unwrap();
        assert!(w.modules("f", "1").is_empty());
        std::fs::write(
            dir.path().join("g.json"),
            br#"{"stamp":"1","modules":["ok","not ok","os,sys"]}"#,
        )
        .unwrap();
        assert_eq!(w.modules("g", "1"), names(&["ok"]));
    }

    #[test]
    fn the_list_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let w = Warmups::new(dir.path().to_path_buf()).unwrap();
        let many: Vec<String> = (0..MAX_MODULES + 50).map(|i| format!("m{i}")).collect();
        w.record("f", "1", &many, &[]).unwrap();
        assert_eq!(w.modules("f", "1").len(), MAX_MODULES);
    }
}
