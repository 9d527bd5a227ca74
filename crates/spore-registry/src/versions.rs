//! Published versions and aliases of a function, persisted beside its record as
//! `<data-dir>/functions/<name>/versions.json` (written atomically; removed with the
//! function).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::FunctionRecord;

/// The file of a function's versions and aliases, in its directory.
pub const VERSIONS_FILE: &str = "versions.json";

/// An alias: a name for one version, optionally with a share of invocations routed to a
/// second one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alias {
    /// The alias's name.
    pub name: String,
    /// The version it points to (a number, or `$LATEST`).
    pub function_version: String,
    /// Free-form description.
    #[serde(default)]
    pub description: String,
    /// `RoutingConfig.AdditionalVersionWeights`: version -> share of invocations (0..1).
    #[serde(default)]
    pub additional_weights: BTreeMap<String, f64>,
    /// Changes on every update (Lambda's `RevisionId`).
    pub revision_id: String,
}

/// A function's published versions and aliases.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Versions {
    /// The last version number given (numbers are never reused, even after a delete).
    pub last: u64,
    /// Published versions, by number: immutable records.
    pub versions: BTreeMap<u64, FunctionRecord>,
    /// Aliases, by name.
    pub aliases: BTreeMap<String, Alias>,
    /// Provisioned concurrency, by qualifier (a version number or an alias).
    #[serde(default)]
    pub provisioned: BTreeMap<String, Provisioned>,
}

/// A provisioned-concurrency setting: instances kept started for a version or alias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provisioned {
    /// How many instances to keep.
    pub requested: u32,
    /// When it was set, ms since the epoch.
    pub last_modified_ms: u64,
}

impl Versions {
    /// Loads `dir/versions.json` (None: the function has never had versions).
    pub(crate) fn load(dir: &Path) -> Result<Option<Versions>, String> {
        let path = dir.join(VERSIONS_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The aliases that route invocations to `version` (as their version or by weight).
    pub fn aliases_of(&self, version: &str) -> Vec<&str> {
        self.aliases
            .values()
            .filter(|a| a.function_version == version || a.additional_weights.contains_key(version))
            .map(|a| a.name.as_str())
            .collect()
    }
}
