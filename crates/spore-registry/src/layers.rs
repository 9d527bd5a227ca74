//! Lambda layers: versions of zip packages published once and mounted read-only under `/opt`
//! in the sandboxes of the functions that name them.
//!
//! Persisted under `<data-dir>/layers/`: `by-name/<name>/layer.json` (every version of one layer and
//! the next version number, written atomically; numbers are never reused, as Lambda's) and
//! `content/<sha256-hex>/` (the unpacked package, shared by every version and function with
//! that content). Content stays while a layer version or a function references it: deleting
//! a version that functions use leaves their copy, as Lambda does.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::code;
use crate::registry::{io_at, RegistryError};
use crate::store::{now_unix_ms, write_atomic};

/// Most layers one function may use (Lambda's limit).
pub const MAX_LAYERS: usize = 5;

/// Region and account in the ARNs Spore gives out (the same as its function ARNs).
pub const DEFAULT_ARN_PREFIX: &str = "arn:aws:lambda:local:000000000000";

static ARN_PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the region and account the daemon's ARNs name (once, at start: `spore serve
/// --region/--account-id`); later calls change nothing.
pub fn set_arn_prefix(region: &str, account_id: &str) {
    let _ = ARN_PREFIX.set(format!("arn:aws:lambda:{region}:{account_id}"));
}

/// `arn:aws:lambda:<region>:<account>`, as configured (or the default).
pub fn arn_prefix() -> &'static str {
    ARN_PREFIX
        .get()
        .map(String::as_str)
        .unwrap_or(DEFAULT_ARN_PREFIX)
}

/// The region the daemon's ARNs name.
pub fn region() -> &'static str {
    arn_prefix().split(':').nth(3).unwrap_or_default()
}

/// Checks that an ARN's `region` and `account` are the daemon's (see [`arn_prefix`]); the
/// error says what this daemon serves.
pub fn check_arn_home(arn: &str, region: &str, account: &str) -> Result<(), String> {
    let ours: Vec<&str> = arn_prefix().split(':').collect();
    let (our_region, our_account) = (ours.get(3).copied(), ours.get(4).copied());
    if our_region == Some(region) && our_account == Some(account) {
        return Ok(());
    }
    let mut shown: String = arn.chars().take(100).collect();
    if shown.len() < arn.len() {
        shown.push_str("...");
    }
    Err(format!(
        "{shown:?} names region {region:?} and account {account:?}: this Spore daemon serves region {:?}, account {:?}, and has nothing of another",
        our_region.unwrap_or_default(),
        our_account.unwrap_or_default()
    ))
}

/// One published version of a layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerVersion {
    /// The layer's name.
    pub name: String,
    /// Its version number (from 1).
    pub version: u64,
    /// Free-form description.
    #[serde(default)]
    pub description: String,
    /// License text or SPDX identifier, echoed back.
    #[serde(default)]
    pub license_info: Option<String>,
    /// Runtimes the publisher says it works with, echoed back.
    #[serde(default)]
    pub compatible_runtimes: Vec<String>,
    /// Instruction sets the publisher says it works with, echoed back.
    #[serde(default)]
    pub compatible_architectures: Vec<String>,
    /// Base64 SHA-256 of the zip.
    pub code_sha256: String,
    /// Hex SHA-256, the content directory's name.
    pub code_hex: String,
    /// Size of the zip, bytes.
    pub code_size: u64,
    /// Size unpacked, bytes.
    pub unzipped_size: u64,
    /// When it was published, ms since the epoch.
    pub created_ms: u64,
}

impl LayerVersion {
    /// `arn:aws:lambda:<region>:<account>:layer:<name>`.
    pub fn layer_arn(&self) -> String {
        layer_arn(&self.name)
    }

    /// `arn:aws:lambda:<region>:<account>:layer:<name>:<version>`.
    pub fn version_arn(&self) -> String {
        format!("{}:{}", layer_arn(&self.name), self.version)
    }
}

/// The ARN of layer `name` (without a version).
pub fn layer_arn(name: &str) -> String {
    format!("{}:layer:{name}", arn_prefix())
}

/// A layer as a function record holds it: enough to mount it and to answer `GetFunction`
/// after the version itself is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionLayer {
    /// The layer version's ARN.
    pub arn: String,
    /// Hex SHA-256 of its content (the content directory's name).
    pub code_hex: String,
    /// Size of its zip, bytes.
    pub code_size: u64,
    /// Size unpacked, bytes.
    pub unzipped_size: u64,
}

/// Errors of layer operations (besides storage, which is a [`RegistryError`]).
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// No such layer version.
    #[error("Layers: layer version {0} does not exist")]
    NotFound(String),
    /// A name, ARN or limit is not respected.
    #[error("{0}")]
    Invalid(String),
    /// Storing failed, or the package was refused.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What a publish gives besides the zip.
#[derive(Debug, Clone, Default)]
pub struct PublishSpec {
    /// Description.
    pub description: String,
    /// License text.
    pub license_info: Option<String>,
    /// Compatible runtimes.
    pub compatible_runtimes: Vec<String>,
    /// Compatible architectures.
    pub compatible_architectures: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LayerFile {
    next_version: u64,
    versions: BTreeMap<u64, LayerVersion>,
}

/// Every layer, in memory and on disk.
#[derive(Debug)]
pub struct LayerStore {
    dir: PathBuf,
    layers: BTreeMap<String, LayerFile>,
}

/// Checks a layer name as Lambda does: 1 to 140 characters of letters, digits, `-` and `_`.
pub fn check_name(name: &str) -> Result<(), LayerError> {
    let ok = !name.is_empty()
        && name.len() <= 140
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(LayerError::Invalid(format!(
            "Layer name {:?} must be 1 to 140 letters, digits, hyphens or underscores",
            shown(name)
        )))
    }
}

/// At most the first 100 characters of `s`, for an error message that names a bad value.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(100).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

/// Splits a layer name or layer ARN (`arn:aws:lambda:<region>:<account>:layer:<name>`, with or
/// without `:<version>`) into the name and the version it names, if any. An ARN must name the
/// daemon's region and account (see [`arn_prefix`]), and a version is written canonically.
pub fn parse_ref(reference: &str) -> Result<(String, Option<u64>), LayerError> {
    let parts: Vec<&str> = reference.split(':').collect();
    let (name, version) = match parts.as_slice() {
        [name] => (*name, None),
        ["arn", _, "lambda", region, account, "layer", name, rest @ ..] if rest.len() <= 1 => {
            check_arn_home(reference, region, account).map_err(LayerError::Invalid)?;
            (*name, rest.first().copied())
        }
        _ => {
            return Err(LayerError::Invalid(format!(
                "{:?} is not a layer name or layer ARN (arn:aws:lambda:<region>:<account>:layer:<name>[:<version>])",
                shown(reference)
            )))
        }
    };
    check_name(name)?;
    let version = version
        .map(|v| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0 && n.to_string() == v)
                .ok_or_else(|| {
                    LayerError::Invalid(format!(
                        "Layer version {:?} in {:?} is not a version number (1, 2, ... without sign or leading zeros)",
                        shown(v),
                        shown(reference)
                    ))
                })
        })
        .transpose()?;
    Ok((name.to_owned(), version))
}

impl LayerStore {
    /// Opens (creating) `<data-dir>/layers` and loads every layer; unreadable ones are
    /// returned as warnings.
    pub fn open(data_dir: &Path) -> Result<(LayerStore, Vec<String>), RegistryError> {
        let dir = data_dir.join("layers");
        let content = dir.join("content");
        fs::create_dir_all(&content).map_err(io_at(&content))?;
        let by_name = dir.join("by-name");
        fs::create_dir_all(&by_name).map_err(io_at(&by_name))?;
        let mut layers = BTreeMap::new();
        let mut warnings = Vec::new();
        for entry in fs::read_dir(&by_name).map_err(io_at(&by_name))?.flatten() {
            let path = entry.path().join("layer.json");
            if !path.exists() {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<LayerFile>(&b).map_err(|e| e.to_string()))
            {
                Ok(f) => {
                    layers.insert(entry.file_name().to_string_lossy().into_owned(), f);
                }
                Err(e) => warnings.push(format!("{}: unreadable ({e}); skipped", path.display())),
            }
        }
        Ok((LayerStore { dir, layers }, warnings))
    }

    /// Host directory of the unpacked content with this hex digest.
    pub fn content_dir(&self, code_hex: &str) -> PathBuf {
        self.dir.join("content").join(code_hex)
    }

    /// Publishes a new version of `name` from `zip` (checked and unpacked as function code).
    pub fn publish(
        &mut self,
        name: &str,
        zip: &[u8],
        spec: PublishSpec,
    ) -> Result<LayerVersion, LayerError> {
        check_name(name)?;
        let (b64, hex) = code::digest(zip);
        let final_dir = self.content_dir(&hex);
        let unzipped_size = if final_dir.exists() {
            dir_size(&final_dir)
        } else {
            let staging = self
                .dir
                .join("content")
                .join(format!(".staging-{}", uuid::Uuid::new_v4()));
            let size = match code::unpack(zip, &staging) {
                Ok(size) => size,
                Err(e) => {
                    let _ = fs::remove_dir_all(&staging);
                    return Err(RegistryError::from(e).into());
                }
            };
            fs::rename(&staging, &final_dir).map_err(io_at(&final_dir))?;
            size
        };
        let mut file = self.layers.get(name).cloned().unwrap_or_default();
        let version = file.next_version.max(1);
        let v = LayerVersion {
            name: name.to_owned(),
            version,
            description: spec.description,
            license_info: spec.license_info,
            compatible_runtimes: spec.compatible_runtimes,
            compatible_architectures: spec.compatible_architectures,
            code_sha256: b64,
            code_hex: hex,
            code_size: zip.len() as u64,
            unzipped_size,
            created_ms: now_unix_ms(),
        };
        file.next_version = version + 1;
        file.versions.insert(version, v.clone());
        self.save(name, &file)?;
        self.layers.insert(name.to_owned(), file);
        Ok(v)
    }

    fn save(&self, name: &str, file: &LayerFile) -> Result<(), RegistryError> {
        let ldir = self.dir.join("by-name").join(name);
        fs::create_dir_all(&ldir).map_err(io_at(&ldir))?;
        let path = ldir.join("layer.json");
        let bytes = serde_json::to_vec_pretty(file).expect("layers serialize");
        write_atomic(&path, &bytes).map_err(io_at(&path))
    }

    /// One version of a layer.
    pub fn get(&self, name: &str, version: u64) -> Option<&LayerVersion> {
        self.layers.get(name)?.versions.get(&version)
    }

    /// Every version of `name`, oldest first (empty if there is none).
    pub fn versions(&self, name: &str) -> Vec<LayerVersion> {
        self.layers
            .get(name)
            .map(|f| f.versions.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The latest version of every layer that has one.
    pub fn latest(&self) -> Vec<LayerVersion> {
        self.layers
            .values()
            .filter_map(|f| f.versions.values().next_back().cloned())
            .collect()
    }

    /// Deletes one version (a no-op if it does not exist, as Lambda's). Its content stays
    /// while something references it; see [`LayerStore::prune`].
    pub fn delete(&mut self, name: &str, version: u64) -> Result<(), RegistryError> {
        let Some(mut file) = self.layers.get(name).cloned() else {
            return Ok(());
        };
        if file.versions.remove(&version).is_none() {
            return Ok(());
        }
        self.save(name, &file)?;
        self.layers.insert(name.to_owned(), file);
        Ok(())
    }

    /// Resolves layer version ARNs as a function's `Layers` names them, in order.
    pub fn resolve(&self, arns: &[String]) -> Result<Vec<FunctionLayer>, LayerError> {
        if arns.len() > MAX_LAYERS {
            return Err(LayerError::Invalid(format!(
                "Layers: {} layers given, a function may use at most {MAX_LAYERS}",
                arns.len()
            )));
        }
        let mut seen = BTreeMap::new();
        arns.iter()
            .map(|arn| {
                let (name, version) = parse_ref(arn).map_err(|e| match e {
                    LayerError::Invalid(m) => LayerError::Invalid(format!("Layers: {m}")),
                    e => e,
                })?;
                let version = version.ok_or_else(|| {
                    LayerError::Invalid(format!(
                        "Layers: {:?} names no version; give a layer version ARN (...:layer:{name}:<version>)",
                        shown(arn)
                    ))
                })?;
                match seen.insert(name.clone(), version) {
                    Some(v) if v == version => {
                        return Err(LayerError::Invalid(format!(
                            "Layers: layer version {name}:{version} is given twice"
                        )))
                    }
                    Some(_) => {
                        return Err(LayerError::Invalid(format!(
                            "Two different versions of the same layer are not allowed: {name}"
                        )))
                    }
                    None => {}
                }
                let v = self
                    .get(&name, version)
                    .ok_or_else(|| LayerError::NotFound(arn.clone()))?;
                Ok(FunctionLayer {
                    arn: v.version_arn(),
                    code_hex: v.code_hex.clone(),
                    code_size: v.code_size,
                    unzipped_size: v.unzipped_size,
                })
            })
            .collect()
    }

    /// Removes content that neither a layer version nor one of `in_use` (the digests the
    /// function records hold) references.
    pub fn prune<'a>(&self, in_use: impl IntoIterator<Item = &'a str>) {
        let mut keep: BTreeSet<&str> = in_use.into_iter().collect();
        for f in self.layers.values() {
            keep.extend(f.versions.values().map(|v| v.code_hex.as_str()));
        }
        let content = self.dir.join("content");
        if let Ok(entries) = fs::read_dir(&content) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if !name.starts_with('.') && !keep.contains(name.as_ref()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// Total size of the regular files under `dir`, bytes.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zip_with(path: &str, text: &str) -> Vec<u8> {
        let src = tempfile::tempdir().unwrap();
        let p = src.path().join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
        code::zip_dir(src.path()).unwrap()
    }

    #[test]
    fn versions_count_up_survive_a_reopen_and_are_never_reused() {
        let data = tempfile::tempdir().unwrap();
        let (mut s, _) = LayerStore::open(data.path()).unwrap();
        let a = s
            .publish(
                "libs",
                &zip_with("python/a.py", "A = 1\n"),
                PublishSpec::default(),
            )
            .unwrap();
        let b = s
            .publish(
                "libs",
                &zip_with("python/a.py", "A = 2\n"),
                PublishSpec::default(),
            )
            .unwrap();
        assert_eq!((a.version, b.version), (1, 2));
        assert_eq!(b.version_arn(), format!("{}:layer:libs:2", arn_prefix()));
        assert!(s.content_dir(&a.code_hex).join("python/a.py").is_file());
        s.delete("libs", 2).unwrap();
        let (mut s, warn) = LayerStore::open(data.path()).unwrap();
        assert!(warn.is_empty(), "{warn:?}");
        assert_eq!(s.versions("libs").len(), 1);
        let c = s
            .publish(
                "libs",
                &zip_with("python/a.py", "A = 3\n"),
                PublishSpec::default(),
            )
            .unwrap();
        assert_eq!(c.version, 3, "a deleted version's number is not reused");
    }

    #[test]
    fn content_stays_while_a_function_references_it() {
        let data = tempfile::tempdir().unwrap();
        let (mut s, _) = LayerStore::open(data.path()).unwrap();
        let a = s
            .publish(
                "libs",
                &zip_with("python/a.py", "A = 1\n"),
                PublishSpec::default(),
            )
            .unwrap();
        let used = s.resolve(&[a.version_arn()]).unwrap();
        s.delete("libs", 1).unwrap();
        s.prune(used.iter().map(|l| l.code_hex.as_str()));
        assert!(s.content_dir(&a.code_hex).is_dir());
        s.prune([]);
        assert!(!s.content_dir(&a.code_hex).exists());
        assert!(matches!(
            s.resolve(&[a.version_arn()]),
            Err(LayerError::NotFound(_))
        ));
    }

    #[test]
    fn resolve_refuses_bad_references_and_too_many_layers() {
        let data = tempfile::tempdir().unwrap();
        let (mut s, _) = LayerStore::open(data.path()).unwrap();
        let a = s
            .publish("l", &zip_with("bin/x", "x"), PublishSpec::default())
            .unwrap();
        for bad in [
            "l",
            "arn:aws:lambda:local:1:function:f",
            "arn:aws:lambda:x:1:layer:l:zero",
        ] {
            assert!(
                matches!(s.resolve(&[bad.to_owned()]), Err(LayerError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            s.resolve(&vec![a.version_arn(); 6]),
            Err(LayerError::Invalid(_))
        ));
        assert!(matches!(
            s.resolve(&[a.version_arn(), a.version_arn()]),
            Err(LayerError::Invalid(_))
        ));
        assert!(s.publish("bad/name", b"", PublishSpec::default()).is_err());
    }

    #[test]
    fn references_name_this_daemon_and_canonical_versions() {
        let data = tempfile::tempdir().unwrap();
        let (mut s, _) = LayerStore::open(data.path()).unwrap();
        let a = s
            .publish("l", &zip_with("bin/x", "x"), PublishSpec::default())
            .unwrap();
        assert_eq!(parse_ref(&a.version_arn()).unwrap(), ("l".into(), Some(1)));
        let other_region = a.version_arn().replacen(":local:", ":eu-west-1:", 1);
        let other_account = a
            .version_arn()
            .replacen(":000000000000:", ":123456789012:", 1);
        for bad in [other_region, other_account] {
            let e = parse_ref(&bad).unwrap_err().to_string();
            assert!(e.contains("this Spore daemon serves"), "{bad}: {e}");
        }
        for bad in ["01", "+1"] {
            let arn = format!("{}:{bad}", a.layer_arn());
            assert!(parse_ref(&arn).is_err(), "{arn}");
        }
        let e = s
            .resolve(&[a.version_arn(), a.version_arn()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        let e = parse_ref(&"x/".repeat(500)).unwrap_err().to_string();
        assert!(e.len() < 300, "{e}");
    }
}
