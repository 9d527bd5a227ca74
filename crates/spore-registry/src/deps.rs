//! A function's own dependencies: which requirement files a code directory declares, the
//! content address of the layer they build into, and the layers' place in the data dir
//! (`<data-dir>/deps/<key>/`, read-only once built, shared by every function with the same
//! requirements and runtime).
//!
//! Python: a `requirements.txt` with at least one requirement. Node: a `package.json` with
//! `dependencies`, installed with `npm ci`, which needs the lock file (`package-lock.json` or
//! `npm-shrinkwrap.json`) beside it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use spore_core::Runtime;

/// Format of the key: bumped when what goes into a layer changes, so old layers are not reused.
const KEY_VERSION: &str = "spore-deps-v1";
/// Largest requirement file read, bytes.
pub const MAX_REQUIREMENT_FILE: u64 = 1 << 20;

/// Errors in a function's requirement files.
#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    /// A requirement file could not be read.
    #[error("Could not read {0}")]
    Read(String, #[source] io::Error),
    /// A requirement file is not usable as it is.
    #[error("{0}")]
    Invalid(String),
}

/// What a code directory asks to have built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirements {
    /// The runtime whose interpreter builds it.
    pub runtime: Runtime,
    /// The requirement files, `(name in the code directory, contents)`, in a fixed order.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Requirements {
    /// The layer's content address: hex SHA-256 of the key version, the runtime and the files.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(KEY_VERSION);
        h.update([0]);
        h.update(self.runtime.as_str());
        for (name, data) in &self.files {
            h.update([0]);
            h.update(name);
            h.update([0]);
            h.update((data.len() as u64).to_le_bytes());
            h.update(data);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn read_small(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, DepsError> {
    let path = dir.join(name);
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DepsError::Read(name.into(), e)),
    };
    if !meta.is_file() {
        return Err(DepsError::Invalid(format!("{name} is not a regular file")));
    }
    if meta.len() > MAX_REQUIREMENT_FILE {
        return Err(DepsError::Invalid(format!(
            "{name} is {} bytes, at most {MAX_REQUIREMENT_FILE}",
            meta.len()
        )));
    }
    fs::read(&path)
        .map(Some)
        .map_err(|e| DepsError::Read(name.into(), e))
}

/// The requirements the code in `dir` declares for `runtime` (None: nothing to build).
pub fn detect(dir: &Path, runtime: Runtime) -> Result<Option<Requirements>, DepsError> {
    match runtime {
        Runtime::Python3 => {
            let Some(req) = read_small(dir, "requirements.txt")? else {
                return Ok(None);
            };
            let text = String::from_utf8_lossy(&req);
            let any = text.lines().any(|l| {
                let l = l.split('#').next().unwrap_or_default().trim();
                !l.is_empty()
            });
            Ok(any.then(|| Requirements {
                runtime,
                files: vec![("requirements.txt".into(), req)],
            }))
        }
        Runtime::Node20 => {
            let Some(pkg) = read_small(dir, "package.json")? else {
                return Ok(None);
            };
            let json: serde_json::Value = serde_json::from_slice(&pkg)
                .map_err(|e| DepsError::Invalid(format!("package.json is not valid JSON: {e}")))?;
            let has_deps = json
                .get("dependencies")
                .and_then(|d| d.as_object())
                .is_some_and(|d| !d.is_empty());
            if !has_deps {
                return Ok(None);
            }
            let mut files = vec![("package.json".to_owned(), pkg)];
            for lock in ["package-lock.json", "npm-shrinkwrap.json"] {
                if let Some(data) = read_small(dir, lock)? {
                    files.push((lock.to_owned(), data));
                }
            }
            if files.len() == 1 {
                return Err(DepsError::Invalid(
                    "package.json has dependencies but no package-lock.json beside it: Spore installs them with `npm ci`, which needs the lock file (make one with `npm install --package-lock-only`), or vendor node_modules and deploy with --no-build".into(),
                ));
            }
            Ok(Some(Requirements { runtime, files }))
        }
    }
}

/// Where the layers live: `<data-dir>/deps`.
pub fn layers_root(data_dir: &Path) -> PathBuf {
    data_dir.join("deps")
}

/// Total size in bytes and number of entries under `dir` (symlinks counted, not followed).
pub fn tree_size(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let meta = e.metadata()?;
            entries += 1;
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                bytes += meta.len();
            }
        }
    }
    Ok((bytes, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_requirements_are_keyed_by_content_and_runtime() {
        let a = tempfile::tempdir().unwrap();
        assert_eq!(detect(a.path(), Runtime::Python3).unwrap(), None);
        fs::write(a.path().join("requirements.txt"), "# nothing\n\n").unwrap();
        assert_eq!(detect(a.path(), Runtime::Python3).unwrap(), None);
        fs::write(a.path().join("requirements.txt"), "six==1.17.0\n").unwrap();
        let ra = detect(a.path(), Runtime::Python3).unwrap().unwrap();
        let b = tempfile::tempdir().unwrap();
        fs::write(b.path().join("requirements.txt"), "six==1.17.0\n").unwrap();
        fs::write(b.path().join("main.py"), "other code\n").unwrap();
        let rb = detect(b.path(), Runtime::Python3).unwrap().unwrap();
        assert_eq!(ra.key(), rb.key(), "same requirements, same layer");
        assert_eq!(ra.key().len(), 64);
        fs::write(b.path().join("requirements.txt"), "six==1.16.0\n").unwrap();
        let rc = detect(b.path(), Runtime::Python3).unwrap().unwrap();
        assert_ne!(ra.key(), rc.key());
        let node = Requirements {
            runtime: Runtime::Node20,
            files: ra.files.clone(),
        };
        assert_ne!(ra.key(), node.key(), "the runtime is part of the key");
    }

    #[test]
    fn node_needs_a_lock_file_for_dependencies() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("package.json"), r#"{"type":"commonjs"}"#).unwrap();
        assert_eq!(detect(d.path(), Runtime::Node20).unwrap(), None);
        fs::write(
            d.path().join("package.json"),
            r#"{"dependencies":{"ms":"2.1.3"}}"#,
        )
        .unwrap();
        let e = detect(d.path(), Runtime::Node20).unwrap_err();
        assert!(e.to_string().contains("package-lock.json"), "{e}");
        fs::write(d.path().join("package-lock.json"), "{}").unwrap();
        let r = detect(d.path(), Runtime::Node20).unwrap().unwrap();
        assert_eq!(r.files.len(), 2);
        fs::write(d.path().join("package.json"), "{").unwrap();
        let e = detect(d.path(), Runtime::Node20).unwrap_err();
        assert!(
            e.to_string().contains("package.json is not valid JSON"),
            "{e}"
        );
    }
}
