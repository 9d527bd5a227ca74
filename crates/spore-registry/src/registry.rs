//! The function registry, persisted under `<data-dir>/functions/<name>/`:
//! `function.json` (the record, written atomically) and `code/<sha256-hex>/` (unpacked code).
//! Loaded at start; a record that cannot be read is reported and skipped, never fatal.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use spore_core::FunctionManifest;

use crate::code;
use crate::extras::FunctionExtras;
use crate::layers::{FunctionLayer, LayerStore};
use crate::store::{now_unix_ms, write_atomic};
use crate::versions::{Versions, VERSIONS_FILE};

/// A deployed function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// The manifest (configuration).
    pub manifest: FunctionManifest,
    /// Free-form description.
    #[serde(default)]
    pub description: String,
    /// Base64 SHA-256 of the code package (Lambda's `CodeSha256`).
    pub code_sha256: String,
    /// Hex SHA-256, the code directory's name.
    pub code_hex: String,
    /// Size of the zip, bytes.
    pub code_size: u64,
    /// Last change, ms since the epoch.
    pub last_modified_ms: u64,
    /// Bumped on every change of code or configuration.
    pub revision: u64,
    /// The published version this record is (None: `$LATEST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Lambda settings Spore stores and echoes as given.
    #[serde(default)]
    pub lambda: LambdaSettings,
    /// Layers mounted under `/opt`, in order (later ones override earlier files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<FunctionLayer>,
    /// Tags, policy, reserved concurrency, event-invoke configuration (changing them makes
    /// no new revision).
    #[serde(default)]
    pub extras: FunctionExtras,
    /// Content address of the dependency layer built from the code's requirement files
    /// (`<data-dir>/deps/<key>`; None: the function has none). Part of the record, so a
    /// change of layer is a new revision: templates and snapshots of the old one go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deps: Option<String>,
    /// A dependency build of this function in progress or failed (in memory only: a
    /// restarted daemon has none).
    #[serde(skip)]
    pub build: Option<BuildStatus>,
}

/// Lambda settings kept as the caller gave them (echoed back by the API).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LambdaSettings {
    /// The execution role's ARN (Spore has no IAM: stored and echoed, not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The architectures given (None: not given; the host's is reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `EphemeralStorage.Size`: the sandbox's `/tmp` size, MiB (None: the daemon's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_mb: Option<u32>,
}

impl FunctionRecord {
    /// The key of this record's pools, templates and snapshots: the function's name for
    /// `$LATEST`, `name:N` for published version N (names cannot hold `:`).
    pub fn key(&self) -> String {
        match self.version {
            None => self.manifest.name.clone(),
            Some(v) => format!("{}:{v}", self.manifest.name),
        }
    }

    /// Lambda's `RevisionId` of this record: changes with every change of code or
    /// configuration.
    pub fn revision_id(&self) -> String {
        format!(
            "{}-{}",
            self.code_hex.get(..12).unwrap_or_default(),
            self.revision
        )
    }

    /// Whether `other` has the same code and configuration (what publishing compares).
    pub fn same_code_and_config(&self, other: &FunctionRecord) -> bool {
        self.code_sha256 == other.code_sha256
            && self.manifest == other.manifest
            && self.lambda == other.lambda
            && self.layers == other.layers
            && self.deps == other.deps
    }

    /// The version as Lambda names it: `$LATEST` or the number.
    pub fn version_name(&self) -> String {
        self.version
            .map_or_else(|| "$LATEST".to_owned(), |v| v.to_string())
    }
}

/// Where a function's latest dependency build stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildStatus {
    /// Which build (a later deploy's build replaces an earlier one's status).
    pub id: u64,
    /// The build belongs to the function's creation (Lambda's `State: Pending`), not to an
    /// update of a function that keeps serving (`LastUpdateStatus: InProgress`).
    pub creating: bool,
    /// None while it runs; the reason when it failed.
    pub failed: Option<String>,
    /// It succeeded (its output stays readable until the next deploy).
    pub done: bool,
    /// A version is to be published once it succeeds (`Publish=true` on the create or code
    /// update that started it).
    pub publish: bool,
    /// The build's output lines so far (pip's or npm's), the last [`BUILD_LINES`] (shared:
    /// records are cloned on every invocation).
    pub lines: std::sync::Arc<Vec<String>>,
    /// Lines dropped from the front of `lines`.
    pub dropped: u64,
}

/// Most output lines a [`BuildStatus`] keeps.
pub const BUILD_LINES: usize = 400;

impl BuildStatus {
    /// Adds an output line, dropping the oldest beyond [`BUILD_LINES`].
    pub fn push_line(&mut self, line: String) {
        let lines = std::sync::Arc::make_mut(&mut self.lines);
        if lines.len() >= BUILD_LINES {
            lines.remove(0);
            self.dropped += 1;
        }
        lines.push(line);
    }
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The code package was refused.
    #[error(transparent)]
    Code(#[from] code::CodeError),
    /// Reading or writing the data dir failed.
    #[error("Registry storage failed at {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The registry: records in memory, mirrored on disk.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    functions: BTreeMap<String, FunctionRecord>,
    /// Published versions and aliases, by function.
    versions: BTreeMap<String, Versions>,
    /// Published layers.
    pub layers: LayerStore,
}

impl Registry {
    /// Opens (creating) `<data-dir>/functions` and loads every record; unreadable ones are
    /// returned as warnings.
    pub fn open(data_dir: &Path) -> Result<(Registry, Vec<String>), RegistryError> {
        let dir = data_dir.join("functions");
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let mut functions = BTreeMap::new();
        let mut versions = BTreeMap::new();
        let mut warnings = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))?.flatten() {
            let path = entry.path().join("function.json");
            if !path.exists() {
                continue; // a deploy that crashed before its record was written
            }
            // Records hold environments (secrets): data dirs from before this rule get it now.
            crate::store::make_private(&path).map_err(io_at(&path))?;
            let loaded = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<FunctionRecord>(&b).map_err(|e| e.to_string())
            });
            match loaded {
                Ok(rec) if entry.file_name().to_str() == Some(rec.manifest.name.as_str()) => {
                    match Versions::load(&entry.path()) {
                        Ok(Some(v)) => {
                            versions.insert(rec.manifest.name.clone(), v);
                        }
                        Ok(None) => {}
                        Err(e) => warnings.push(format!(
                            "{}: versions unreadable ({e}); the function has none",
                            entry.path().display()
                        )),
                    }
                    functions.insert(rec.manifest.name.clone(), rec);
                }
                Ok(rec) => warnings.push(format!(
                    "{}: names function {:?}, not its directory; skipped",
                    path.display(),
                    rec.manifest.name
                )),
                Err(e) => warnings.push(format!("{}: unreadable ({e}); skipped", path.display())),
            }
        }
        let (layers, layer_warnings) = LayerStore::open(data_dir)?;
        warnings.extend(layer_warnings);
        Ok((
            Registry {
                dir,
                functions,
                versions,
                layers,
            },
            warnings,
        ))
    }

    /// The record of `name`, or of a published version by its key `name:N`.
    pub fn get(&self, name: &str) -> Option<&FunctionRecord> {
        match name.split_once(':') {
            None => self.functions.get(name),
            Some((f, v)) => {
                let v: u64 = v.parse().ok()?;
                self.versions.get(f)?.versions.get(&v)
            }
        }
    }

    /// The published versions and aliases of `name` (empty if it has none).
    pub fn versions(&self, name: &str) -> Versions {
        self.versions.get(name).cloned().unwrap_or_default()
    }

    /// Every provisioned-concurrency setting: (function, qualifier, instances).
    pub fn provisioned(&self) -> Vec<(String, String, u32)> {
        self.versions
            .iter()
            .flat_map(|(f, v)| {
                v.provisioned
                    .iter()
                    .map(move |(q, p)| (f.clone(), q.clone(), p.requested))
            })
            .collect()
    }

    /// Replaces the versions and aliases of `name` (a function that exists), on disk
    /// atomically first; drops code directories no record references any more.
    pub fn put_versions(&mut self, name: &str, v: Versions) -> Result<(), RegistryError> {
        let path = self.dir.join(name).join(VERSIONS_FILE);
        let bytes = serde_json::to_vec_pretty(&v).expect("versions serialize");
        write_atomic(&path, &bytes).map_err(io_at(&path))?;
        self.versions.insert(name.to_owned(), v);
        if let Some(rec) = self.functions.get(name).cloned() {
            self.prune_code(&rec);
        }
        Ok(())
    }

    /// All records, by name.
    pub fn list(&self) -> impl Iterator<Item = &FunctionRecord> {
        self.functions.values()
    }

    /// Host directory of a record's unpacked code.
    pub fn code_dir(&self, rec: &FunctionRecord) -> PathBuf {
        self.dir
            .join(&rec.manifest.name)
            .join("code")
            .join(&rec.code_hex)
    }

    /// Host directory of `name`'s code package `hex`.
    pub fn dir_of_code(&self, name: &str, hex: &str) -> PathBuf {
        self.dir.join(name).join("code").join(hex)
    }

    /// Removes what a refused create left of `name` (nothing if it is deployed).
    pub fn discard_code(&self, name: &str) {
        if !self.functions.contains_key(name) {
            let _ = fs::remove_dir_all(self.dir.join(name));
        }
    }

    /// Unpacks a code package for `name` (a no-op if that exact package is there already).
    /// Returns `(sha256 base64, hex, zip size)`.
    pub fn install_code(
        &self,
        name: &str,
        zip: &[u8],
    ) -> Result<(String, String, u64), RegistryError> {
        let (b64, hex) = code::digest(zip);
        let code_root = self.dir.join(name).join("code");
        fs::create_dir_all(&code_root).map_err(io_at(&code_root))?;
        let final_dir = code_root.join(&hex);
        if !final_dir.exists() {
            let staging = code_root.join(format!(".staging-{}", uuid::Uuid::new_v4()));
            if let Err(e) = code::unpack(zip, &staging) {
                let _ = fs::remove_dir_all(&staging);
                // A refused package of a function that does not exist leaves nothing behind
                // (these only go if empty: a deployed function's are not).
                if !self.functions.contains_key(name) {
                    let _ = fs::remove_dir(&code_root);
                    let _ = fs::remove_dir(self.dir.join(name));
                }
                return Err(e.into());
            }
            fs::rename(&staging, &final_dir).map_err(io_at(&final_dir))?;
        }
        Ok((b64, hex, zip.len() as u64))
    }

    /// Stores a record (new or changed), bumping its revision and timestamp, and drops code
    /// directories no longer referenced.
    pub fn put(&mut self, mut rec: FunctionRecord) -> Result<FunctionRecord, RegistryError> {
        rec.version = None;
        rec.revision = self
            .functions
            .get(&rec.manifest.name)
            .map_or(1, |r| r.revision + 1);
        rec.last_modified_ms = now_unix_ms();
        let fdir = self.dir.join(&rec.manifest.name);
        fs::create_dir_all(&fdir).map_err(io_at(&fdir))?;
        let path = fdir.join("function.json");
        let bytes = serde_json::to_vec_pretty(&rec).expect("records serialize");
        write_atomic(&path, &bytes).map_err(io_at(&path))?;
        self.functions
            .insert(rec.manifest.name.clone(), rec.clone());
        self.prune_code(&rec);
        self.prune_layers();
        Ok(rec)
    }

    /// Changes what `name`'s record carries besides code and configuration (tags, policy,
    /// concurrency, event-invoke configuration) without a new revision: its instances,
    /// template and snapshots stay valid. `change` may refuse (nothing is written then).
    pub fn update_extras<T, E: From<RegistryError>>(
        &mut self,
        name: &str,
        change: impl FnOnce(&mut FunctionExtras) -> Result<T, E>,
    ) -> Option<Result<T, E>> {
        let rec = self.functions.get(name)?;
        let mut extras = rec.extras.clone();
        let out = match change(&mut extras) {
            Ok(out) => out,
            Err(e) => return Some(Err(e)),
        };
        let mut rec = rec.clone();
        rec.extras = extras;
        let path = self.dir.join(name).join("function.json");
        let bytes = serde_json::to_vec_pretty(&rec).expect("records serialize");
        if let Err(e) = write_atomic(&path, &bytes) {
            return Some(Err(io_at(&path)(e).into()));
        }
        self.functions.insert(name.to_owned(), rec);
        Some(Ok(out))
    }

    /// Drops layer content that no layer version and no function references any more.
    pub fn prune_layers(&self) {
        self.layers.prune(
            self.functions
                .values()
                .flat_map(|r| r.layers.iter().map(|l| l.code_hex.as_str())),
        );
    }

    /// Host directories of `rec`'s layers, in order.
    pub fn layer_dirs(&self, rec: &FunctionRecord) -> Vec<PathBuf> {
        rec.layers
            .iter()
            .map(|l| self.layers.content_dir(&l.code_hex))
            .collect()
    }

    fn prune_code(&self, rec: &FunctionRecord) {
        let code_root = self.dir.join(&rec.manifest.name).join("code");
        // Published versions keep the code they were published with.
        let mut keep: Vec<&str> = vec![rec.code_hex.as_str()];
        if let Some(v) = self.versions.get(&rec.manifest.name) {
            keep.extend(v.versions.values().map(|r| r.code_hex.as_str()));
        }
        if let Ok(entries) = fs::read_dir(&code_root) {
            for e in entries.flatten() {
                if !e.file_name().to_str().is_some_and(|n| keep.contains(&n)) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Sets (or clears) the in-memory build status of `name`; false if there is no such
    /// function.
    pub fn set_build(&mut self, name: &str, build: Option<BuildStatus>) -> bool {
        match self.functions.get_mut(name) {
            Some(rec) => {
                rec.build = build;
                true
            }
            None => false,
        }
    }

    /// Changes the in-memory build status of `name` in place, if it has one.
    pub fn update_build(&mut self, name: &str, f: impl FnOnce(&mut BuildStatus)) {
        if let Some(b) = self.functions.get_mut(name).and_then(|r| r.build.as_mut()) {
            f(b);
        }
    }

    /// Host directory of a dependency layer.
    pub fn deps_dir(&self, key: &str) -> PathBuf {
        crate::deps::layers_root(self.dir.parent().unwrap_or(&self.dir)).join(key)
    }

    /// Removes `name` and its code. Returns the record, if it existed.
    pub fn remove(&mut self, name: &str) -> Result<Option<FunctionRecord>, RegistryError> {
        let Some(rec) = self.functions.remove(name) else {
            return Ok(None);
        };
        self.versions.remove(name);
        let fdir = self.dir.join(name);
        // Drop the record first so that a crash midway leaves no half-function behind.
        let record = fdir.join("function.json");
        fs::remove_file(&record).map_err(io_at(&record))?;
        fs::remove_dir_all(&fdir).map_err(io_at(&fdir))?;
        self.prune_layers();
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, reg: &Registry, zip: &[u8]) -> FunctionRecord {
        let (b64, hex, size) = reg.install_code(name, zip).unwrap();
        FunctionRecord {
            manifest: FunctionManifest::from_toml(&format!(
                "name = \"{name}\"\nhandler = \"main.handler\""
            ))
            .unwrap(),
            description: String::new(),
            code_sha256: b64,
            code_hex: hex,
            code_size: size,
            last_modified_ms: 0,
            revision: 0,
            version: None,
            lambda: LambdaSettings::default(),
            layers: Vec::new(),
            extras: FunctionExtras::default(),
            deps: None,
            build: None,
        }
    }

    fn zip_with(text: &str) -> Vec<u8> {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("main.py"), text).unwrap();
        code::zip_dir(src.path()).unwrap()
    }

    #[test]
    fn a_refused_package_of_a_new_function_leaves_nothing_behind() {
        let data = tempfile::tempdir().unwrap();
        let (reg, _) = Registry::open(data.path()).unwrap();
        assert!(reg.install_code("newfn", b"not a zip").is_err());
        assert!(!data.path().join("functions/newfn").exists());
    }

    #[test]
    fn persists_and_recovers() {
        let data = tempfile::tempdir().unwrap();
        let (mut reg, warn) = Registry::open(data.path()).unwrap();
        assert!(warn.is_empty());
        let rec = record("f1", &reg, &zip_with("def handler(e, c): return 1\n"));
        let stored = reg.put(rec).unwrap();
        assert_eq!(stored.revision, 1);
        assert!(reg.code_dir(&stored).join("main.py").exists());

        // An update replaces the code and prunes the old directory.
        let old_dir = reg.code_dir(&stored);
        let rec2 = record("f1", &reg, &zip_with("def handler(e, c): return 2\n"));
        let stored2 = reg.put(rec2).unwrap();
        assert_eq!(stored2.revision, 2);
        assert!(!old_dir.exists());

        // A corrupt record of another function is skipped with a warning.
        fs::create_dir_all(data.path().join("functions/broken")).unwrap();
        fs::write(data.path().join("functions/broken/function.json"), "{oops").unwrap();

        let (reg2, warn) = Registry::open(data.path()).unwrap();
        assert_eq!(reg2.get("f1"), Some(&stored2));
        assert_eq!(warn.len(), 1, "{warn:?}");
        assert!(warn[0].contains("broken"));

        let mut reg2 = reg2;
        assert!(reg2.remove("f1").unwrap().is_some());
        assert!(!data.path().join("functions/f1").exists());
        assert!(reg2.remove("f1").unwrap().is_none());
    }

    #[test]
    fn versions_keep_their_code_persist_and_go_with_the_function() {
        let data = tempfile::tempdir().unwrap();
        let (mut reg, _) = Registry::open(data.path()).unwrap();
        let v1 = reg
            .put(record(
                "f",
                &reg,
                &zip_with("def handler(e, c): return 1\n"),
            ))
            .unwrap();
        let mut published = v1.clone();
        published.version = Some(1);
        let mut v = Versions {
            last: 1,
            ..Versions::default()
        };
        v.versions.insert(1, published.clone());
        reg.put_versions("f", v.clone()).unwrap();
        assert_eq!(published.key(), "f:1");
        assert_eq!(reg.get("f:1"), Some(&published));
        assert_eq!(reg.get("f:2"), None);
        assert_eq!(reg.get("f:x"), None);
        // $LATEST's new code does not prune the code version 1 runs.
        let v2 = reg
            .put(record(
                "f",
                &reg,
                &zip_with("def handler(e, c): return 2\n"),
            ))
            .unwrap();
        assert!(reg.code_dir(&published).join("main.py").exists());
        assert!(reg.code_dir(&v2).join("main.py").exists());
        let (reg2, warn) = Registry::open(data.path()).unwrap();
        assert!(warn.is_empty(), "{warn:?}");
        assert_eq!(reg2.versions("f"), v);
        assert_eq!(reg2.get("f:1"), Some(&published));
        // Without the version, its code goes at the next change.
        let mut reg2 = reg2;
        reg2.put_versions("f", Versions::default()).unwrap();
        assert!(!reg2.code_dir(&published).exists());
        reg2.remove("f").unwrap();
        assert_eq!(reg2.versions("f"), Versions::default());
        assert!(!data.path().join("functions/f").exists());
    }
}
