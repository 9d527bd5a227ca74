//! The function registry: what is deployed, persisted in the data dir.
//!
//! It owns the function records (`function.json`, written atomically), the unpacked code
//! packages (zip checks: size, entry count, paths, permissions), the data dir's lock against a
//! second daemon, and the small file helpers every subsystem that writes under the data dir
//! uses. Every other control-plane crate (`spore-pool`, `spore-cluster`, `spore-dag`,
//! `spore-control`) reads records through a [`SharedRegistry`]; only `spore-control` changes
//! them. It knows nothing of sandboxes, instances, units or DAGs.
#![forbid(unsafe_code)]

pub mod code;
pub mod deps;
pub mod extras;
pub mod layers;
pub mod registry;
pub mod store;
pub mod versions;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use spore_core::{error_chain, ControlError, FunctionManifest};

pub use registry::{BuildStatus, FunctionRecord, LambdaSettings, Registry, RegistryError};
pub use versions::{Alias, Provisioned, Versions};

/// A function's configuration as given by a create or update call.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The manifest.
    pub manifest: FunctionManifest,
    /// Description.
    pub description: String,
    /// Lambda settings stored and echoed as given.
    pub lambda: LambdaSettings,
    /// Layers, resolved (None: keep what the function has; a create gets none).
    pub layers: Option<Vec<layers::FunctionLayer>>,
}

impl From<RegistryError> for ControlError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Code(c) => ControlError::InvalidParameter(c.to_string()),
            other => ControlError::Internal(error_chain(&other)),
        }
    }
}

impl From<layers::LayerError> for ControlError {
    fn from(e: layers::LayerError) -> Self {
        match e {
            // What a function's `Layers` name must exist (Lambda answers 400 here too).
            layers::LayerError::NotFound(_) => ControlError::InvalidParameter(e.to_string()),
            layers::LayerError::Invalid(m) => ControlError::InvalidParameter(m),
            layers::LayerError::Registry(r) => r.into(),
        }
    }
}

/// The registry, shared by the control plane's subsystems. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedRegistry(Arc<Mutex<Registry>>);

impl SharedRegistry {
    /// Shares `registry`.
    pub fn new(registry: Registry) -> SharedRegistry {
        SharedRegistry(Arc::new(Mutex::new(registry)))
    }

    /// Locks the registry (for a change: keep the guard short, never across an await).
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.0.lock().expect("registry lock")
    }

    /// One function's record, or `NotFound`.
    pub fn get(&self, name: &str) -> Result<FunctionRecord, ControlError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))
    }

    /// Whether `rec` is still what its key names: the same revision of the same function (not
    /// a deleted one's, nor an older revision's).
    pub fn is_current(&self, rec: &FunctionRecord) -> bool {
        self.lock().get(&rec.key()).is_some_and(|r| {
            r.revision == rec.revision
                && r.last_modified_ms == rec.last_modified_ms
                && r.code_hex == rec.code_hex
        })
    }

    /// Every record.
    pub fn list(&self) -> Vec<FunctionRecord> {
        self.lock().list().cloned().collect()
    }

    /// The revision `name` has now (None: deleted).
    pub fn revision(&self, name: &str) -> Option<u64> {
        self.lock().get(name).map(|r| r.revision)
    }

    /// Where `rec`'s layers are unpacked, in order.
    pub fn layer_dirs(&self, rec: &FunctionRecord) -> Vec<PathBuf> {
        self.lock().layer_dirs(rec)
    }

    /// Where `rec`'s dependency layer is (None: it has none).
    pub fn deps_dir(&self, rec: &FunctionRecord) -> Option<PathBuf> {
        let key = rec.deps.as_deref()?;
        Some(self.lock().deps_dir(key))
    }

    /// Where `rec`'s code is unpacked.
    pub fn code_dir(&self, rec: &FunctionRecord) -> PathBuf {
        self.lock().code_dir(rec)
    }
}
