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
const KEY_VERSION: &str = "spore-deps-v2";
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
    /// The interpreter version the function's runtime names (None: the host's default).
    pub version: Option<u32>,
    /// The exact interpreter that builds it (`python3.11`, `node20`): part of the key, so
    /// that functions on different interpreters never share a layer. [`detect`] sets the
    /// runtime's name; the caller sets the resolved one with [`Requirements::on_interpreter`].
    pub interpreter: String,
    /// The requirement files, `(name in the code directory, contents)`, in a fixed order.
    pub files: Vec<(String, Vec<u8>)>,
    /// Whether the requirements name something in the function's own code (a local path,
    /// `file:`, `-e`, `-r FILE`, a `file:`/`link:` npm dependency): then the build depends
    /// on the code package too.
    pub local: bool,
    /// The code package's digest, part of the key when [`Requirements::local`]: set with
    /// [`Requirements::with_code`].
    pub code_digest: Option<String>,
}

impl Requirements {
    /// The layer's content address: hex SHA-256 of the key version, the interpreter, the
    /// files and, when the requirements name local paths, the code package's digest.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(KEY_VERSION);
        h.update([0]);
        h.update(&self.interpreter);
        for (name, data) in &self.files {
            h.update([0]);
            h.update(name);
            h.update([0]);
            h.update((data.len() as u64).to_le_bytes());
            h.update(data);
        }
        if self.local {
            h.update([1]);
            h.update(self.code_digest.as_deref().unwrap_or_default());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// These requirements built by `interpreter` at `version` (see [`Requirements::interpreter`]).
    pub fn on_interpreter(mut self, interpreter: String, version: Option<u32>) -> Requirements {
        self.interpreter = interpreter;
        self.version = version;
        self
    }

    /// These requirements for the code package whose digest is `digest` (part of the key
    /// only when they name local paths).
    pub fn with_code(mut self, digest: &str) -> Requirements {
        self.code_digest = Some(digest.to_owned());
        self
    }
}

/// Whether a line of a `requirements.txt` names something in the function's code: a path
/// (absolute, relative, `file:`), an editable install, or another requirement or
/// constraint file. Network URLs (`https://...`) are not local.
fn python_line_is_local(line: &str) -> bool {
    // pip's comments: `#` at the start or after whitespace.
    let line = match line.find(" #").or_else(|| line.find("\t#")) {
        Some(i) => &line[..i],
        None => line,
    };
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return false;
    }
    let lower = line.to_ascii_lowercase();
    const LOCAL_OPTIONS: [&str; 8] = [
        "-e",
        "--editable",
        "-r",
        "--requirement",
        "-c",
        "--constraint",
        "-f",
        "--find-links",
    ];
    if LOCAL_OPTIONS.iter().any(|o| {
        lower == *o
            || lower.starts_with(&format!("{o} "))
            || lower.starts_with(&format!("{o}="))
            || (o.len() == 2 && lower.starts_with(o))
    }) {
        return true;
    }
    if lower.contains("file:") || lower.starts_with('.') || lower.starts_with('~') {
        return true;
    }
    // A path separator outside network URLs.
    let without_urls: String = lower
        .split_whitespace()
        .filter(|w| !w.contains("://"))
        .collect::<Vec<_>>()
        .join(" ");
    if without_urls.contains('/') || without_urls.contains('\\') {
        return true;
    }
    [".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar"]
        .iter()
        .any(|ext| without_urls.ends_with(ext))
}

/// Whether a `package.json` or lock file names a local dependency (`file:`, `link:`, a path,
/// a local tarball).
fn node_names_local(files: &[(String, Vec<u8>)]) -> bool {
    for (name, data) in files {
        let text = String::from_utf8_lossy(data);
        if text.contains("\"file:") || text.contains("\"link:") || text.contains("\"link\": true") {
            return true;
        }
        if name != "package.json" {
            continue;
        }
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
            continue;
        };
        for field in [
            "dependencies",
            "optionalDependencies",
            "devDependencies",
            "peerDependencies",
        ] {
            let Some(deps) = json.get(field).and_then(|d| d.as_object()) else {
                continue;
            };
            for spec in deps.values().filter_map(|v| v.as_str()) {
                let s = spec.trim();
                let url = s.contains("://");
                if s.starts_with('.')
                    || s.starts_with('/')
                    || s.starts_with('~')
                    || (!url
                        && (s.ends_with(".tgz") || s.ends_with(".tar.gz") || s.ends_with(".tar")))
                {
                    return true;
                }
            }
        }
    }
    false
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
            let local = text.lines().any(python_line_is_local);
            Ok(any.then(|| Requirements {
                runtime,
                version: None,
                interpreter: runtime.as_str().to_owned(),
                files: vec![("requirements.txt".into(), req)],
                local,
                code_digest: None,
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
            let local = node_names_local(&files);
            Ok(Some(Requirements {
                runtime,
                version: None,
                interpreter: runtime.as_str().to_owned(),
                files,
                local,
                code_digest: None,
            }))
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
            interpreter: "node20".into(),
            ..ra.clone()
        };
        assert_ne!(ra.key(), node.key(), "the runtime is part of the key");
        let py311 = ra.clone().on_interpreter("python3.11".into(), Some(11));
        let py312 = ra.clone().on_interpreter("python3.12".into(), Some(12));
        assert_ne!(
            py311.key(),
            py312.key(),
            "the interpreter is part of the key"
        );
        assert_eq!(
            py311.key(),
            ra.clone().on_interpreter("python3.11".into(), None).key(),
            "the same interpreter, named or the default, shares the layer"
        );
        assert!(!ra.local);
        assert_eq!(
            ra.clone().with_code("aa").key(),
            ra.clone().with_code("bb").key(),
            "requirements without local paths do not depend on the code"
        );
    }

    #[test]
    fn local_paths_make_the_key_cover_the_code() {
        for line in [
            "/var/task/pkg",
            "./pkg",
            "../pkg",
            ".",
            "pkg/",
            "file:///var/task/pkg",
            "pkg @ file:///var/task/pkg",
            "-e ./pkg",
            "--editable=./pkg",
            "-r other.txt",
            "-rother.txt",
            "--requirement other.txt",
            "-c constraints.txt",
            "--find-links wheels",
            "dist/pkg-1.0-py3-none-any.whl",
            "pkg-1.0.tar.gz",
        ] {
            assert!(python_line_is_local(line), "{line}");
        }
        for line in [
            "six==1.17.0",
            "requests[socks]>=2 ; python_version >= '3.8'",
            "# ./pkg",
            "six # ./pkg",
            "pkg @ https://example.com/pkg-1.0.tar.gz",
            "--index-url https://example.com/simple",
            "",
        ] {
            assert!(!python_line_is_local(line), "{line}");
        }
        let a = tempfile::tempdir().unwrap();
        fs::write(a.path().join("requirements.txt"), "/var/task/pkg\n").unwrap();
        let r = detect(a.path(), Runtime::Python3).unwrap().unwrap();
        assert!(r.local);
        assert_ne!(
            r.clone().with_code("aa").key(),
            r.clone().with_code("bb").key(),
            "a local package's layer depends on the code package"
        );
        assert_eq!(r.clone().with_code("aa").key(), r.with_code("aa").key());

        let files = |deps: &str| {
            vec![
                (
                    "package.json".to_owned(),
                    format!(r#"{{"dependencies":{deps}}}"#).into_bytes(),
                ),
                ("package-lock.json".to_owned(), b"{}".to_vec()),
            ]
        };
        assert!(node_names_local(&files(r#"{"x":"file:./x"}"#)));
        assert!(node_names_local(&files(r#"{"x":"link:../x"}"#)));
        assert!(node_names_local(&files(r#"{"x":"./x-1.0.0.tgz"}"#)));
        assert!(!node_names_local(&files(r#"{"ms":"2.1.3"}"#)));
        assert!(!node_names_local(&files(
            r#"{"ms":"https://registry.example/ms-2.1.3.tgz"}"#
        )));
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
