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

/// Zips the function folder `dir`: the code a deploy uploads. Every deploy from a folder
/// packages it here.
pub fn zip_function_dir(dir: &Path) -> Result<Vec<u8>, FunctionDirError> {
    spore_registry::code::zip_dir(dir).map_err(|source| FunctionDirError::Package {
        dir: dir.to_owned(),
        source,
    })
}

impl Client {
    /// Deploys the code in the folder `dir` under the manifest `m` (which may differ from the
    /// folder's own: another name, sandbox or unit).
    pub fn deploy_dir(
        &self,
        dir: &Path,
        m: &FunctionManifest,
    ) -> Result<serde_json::Value, FunctionDirError> {
        self.deploy_dir_with(dir, m, true)
    }

    /// As [`Client::deploy_dir`]; `build` false skips the dependency build.
    pub fn deploy_dir_with(
        &self,
        dir: &Path,
        m: &FunctionManifest,
        build: bool,
    ) -> Result<serde_json::Value, FunctionDirError> {
        let zip = zip_function_dir(dir)?;
        self.deploy_with(m, &zip, build)
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
