//! Function folders (a `spore.toml` beside the code): reading the manifest, zipping the
//! code, deploying both.

use std::path::{Path, PathBuf};

use spore_core::{FunctionManifest, ManifestError};

use crate::client::{Client, ClientError};

/// Errors of reading, packaging or deploying a function folder. The messages are the CLI's
/// own, so they keep its wording.
#[derive(Debug, thiserror::Error)]
pub enum FunctionDirError {
    /// `spore.toml` could not be read.
    #[error("reading {}: a function folder needs a spore.toml", path.display())]
    Read {
        /// The manifest's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `spore.toml` is not a valid manifest.
    #[error("in {}", path.display())]
    Manifest {
        /// The manifest's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ManifestError,
    },
    /// The folder could not be zipped.
    #[error("packaging {}", dir.display())]
    Package {
        /// The function folder.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The folder is larger than a deploy may be (checked before anything is sent).
    #[error("{} is too large to deploy: {what}", dir.display())]
    TooLarge {
        /// The function folder.
        dir: PathBuf,
        /// Which limit, and by how much.
        what: String,
    },
    /// The daemon refused the function or could not be reached.
    #[error("deploying {name}")]
    Deploy {
        /// The function's name.
        name: String,
        /// The cause.
        #[source]
        source: ClientError,
    },
}

/// Reads the manifest `dir/spore.toml`.
pub fn read_manifest(dir: &Path) -> Result<FunctionManifest, FunctionDirError> {
    let path = dir.join("spore.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(source) => return Err(FunctionDirError::Read { path, source }),
    };
    FunctionManifest::from_toml(&text).map_err(|source| FunctionDirError::Manifest { path, source })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Zips the function folder `dir`: the code a deploy uploads. Every deploy from a folder
/// packages it here, after checking the daemon's limits (file count and unpacked size
/// before zipping, the zip's size after), so that an oversized folder is refused here with
/// the limit named rather than by the daemon halfway through the upload.
pub fn zip_function_dir(dir: &Path) -> Result<Vec<u8>, FunctionDirError> {
    use spore_registry::code::{function_files, zip_dir, MAX_ENTRIES, MAX_UNPACKED, MAX_ZIP};
    let package = |source| FunctionDirError::Package {
        dir: dir.to_owned(),
        source,
    };
    let too_large = |what: String| FunctionDirError::TooLarge {
        dir: dir.to_owned(),
        what,
    };
    let files = function_files(dir).map_err(package)?;
    if files.len() > MAX_ENTRIES {
        return Err(too_large(format!(
            "more than {MAX_ENTRIES} files, the most a function's code may hold"
        )));
    }
    let mut unpacked = 0u64;
    for (path, _) in &files {
        unpacked += std::fs::metadata(path).map_err(package)?.len();
    }
    if unpacked > MAX_UNPACKED {
        return Err(too_large(format!(
            "its files take {}, more than the {} a function's code may take unpacked (put large packages in requirements.txt, or in the daemon's --packages-dir)",
            mib(unpacked),
            mib(MAX_UNPACKED)
        )));
    }
    let zip = zip_dir(dir).map_err(package)?;
    if zip.len() as u64 > MAX_ZIP {
        return Err(too_large(format!(
            "it zips to {}, more than the {} a deploy can carry (the API takes requests of at most {} MiB, the zip base64-encoded; Lambda's limit for a direct upload is 50 MB)",
            mib(zip.len() as u64),
            mib(MAX_ZIP),
            spore_registry::code::MAX_REQUEST >> 20
        )));
    }
    Ok(zip)
}

impl Client {
    /// Deploys the code in the folder `dir` under the manifest `m` (which may differ from the
    /// folder's own: another name, sandbox or unit).
    pub fn deploy_dir(
        &self,
        dir: &Path,
        m: &FunctionManifest,
    ) -> Result<serde_json::Value, FunctionDirError> {
        self.deploy_dir_with(dir, m, true, None)
    }

    /// As [`Client::deploy_dir`]; `build` false skips the dependency build, `progress`
    /// hears how far the upload got.
    pub fn deploy_dir_with(
        &self,
        dir: &Path,
        m: &FunctionManifest,
        build: bool,
        progress: Option<crate::signed::Progress>,
    ) -> Result<serde_json::Value, FunctionDirError> {
        let zip = zip_function_dir(dir)?;
        self.deploy_with(m, &zip, build, progress)
            .map_err(|source| FunctionDirError::Deploy {
                name: m.name.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_manifest(dir.path()).unwrap_err();
        assert!(matches!(e, FunctionDirError::Read { .. }), "{e:?}");
        assert!(e
            .to_string()
            .ends_with("spore.toml: a function folder needs a spore.toml"));
        std::fs::write(dir.path().join("spore.toml"), "name = [").unwrap();
        let e = read_manifest(dir.path()).unwrap_err();
        assert!(matches!(e, FunctionDirError::Manifest { .. }), "{e:?}");
        assert!(e.to_string().starts_with("in "));
    }

    #[test]
    fn zips_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("handler.py"),
            "def handler(e, c):\n    return e\n",
        )
        .unwrap();
        let zip = zip_function_dir(dir.path()).unwrap();
        assert_eq!(&zip[..2], b"PK");
        let e = zip_function_dir(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().starts_with("packaging "), "{e}");
    }
}
