//! Dependencies built at deploy: a create or code update whose package declares requirements
//! (`requirements.txt`, `package.json` with a lock file) gets a content-addressed,
//! read-only layer under `<data-dir>/deps/<key>`, built once per key in a build sandbox
//! (`spore_pool::build`) and shared by every function with the same requirements.
//!
//! A deploy whose layer exists already finishes at once. Otherwise the build runs in the
//! background: a new function is `Pending` until it ends (`Active` or `Failed`), an updated
//! one keeps serving its previous revision (`LastUpdateStatus: InProgress`) and switches to
//! the new code and layer only when the build succeeded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use spore_core::{error_chain, ControlError};
use spore_pool::build::{BuildLimits, BuildNetwork};
use spore_registry::deps::{self, Requirements};
use spore_registry::{BuildStatus, FunctionRecord};

use crate::Control;

/// How a deploy treats the package's requirement files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepsMode {
    /// Build (or reuse) the layer the requirement files describe.
    Build,
    /// Ignore them: the package vendors what it needs (`spore deploy --no-build`).
    Skip,
}

/// The dependency builds of a daemon: settings, and one lock per layer key so that two
/// deploys with the same requirements build once.
#[derive(Debug, Default)]
pub(crate) struct Builds {
    /// Offline package index bound into build sandboxes (None: the build reaches the registries through network egress).
    pub index_dir: Option<PathBuf>,
    /// Limits of one build.
    pub limits: BuildLimits,
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Builds {
    pub(crate) fn new(index_dir: Option<PathBuf>, limits: BuildLimits) -> Builds {
        Builds {
            index_dir,
            limits,
            ..Builds::default()
        }
    }

    /// The single choice point of a build's network.
    fn network(&self) -> BuildNetwork {
        match &self.index_dir {
            Some(dir) => BuildNetwork::OfflineIndex(dir.clone()),
            None => BuildNetwork::Egress,
        }
    }
}

/// The exact interpreter a build for `runtime` at `version` runs (`python3.11`, `node20`):
/// the host's default resolved to its version, so that a function naming that version and
/// one naming none share a layer, and functions on different interpreters never do.
pub(crate) fn interpreter_name(runtime: spore_core::Runtime, version: Option<u32>) -> String {
    match runtime {
        spore_core::Runtime::Python3 => match version.or_else(spore_runtime::host_python_minor) {
            Some(minor) => format!("python3.{minor}"),
            None => "python3".into(),
        },
        spore_core::Runtime::Node20 => match version.or_else(spore_runtime::host_node_major) {
            Some(major) => format!("node{major}"),
            None => "node".into(),
        },
    }
}

/// A build to start once the registry's lock is released.
pub(crate) struct PendingBuild {
    name: String,
    id: u64,
    req: Requirements,
    code_dir: PathBuf,
    /// For an update: the package, the record to store once built.
    update: Option<(Vec<u8>, FunctionRecord)>,
}

impl Control {
    /// Lambda's refusal to invoke a function that is `Pending` (its dependencies are being
    /// built) or `Failed` (their build failed): DAG hops and relayed calls get it too.
    /// [`Control::refuse_unless_active`] for `name` (a missing function passes: the call
    /// that follows reports it).
    pub fn check_active(&self, name: &str) -> Result<(), ControlError> {
        match self.get_function(name) {
            Ok(rec) => Self::refuse_unless_active(&rec),
            Err(_) => Ok(()),
        }
    }

    pub(crate) fn refuse_unless_active(rec: &FunctionRecord) -> Result<(), ControlError> {
        let state = match &rec.build {
            Some(b) if b.creating && !b.done => {
                if b.failed.is_none() {
                    "Pending"
                } else {
                    "Failed"
                }
            }
            _ => return Ok(()),
        };
        Err(ControlError::InUse(format!(
            "The operation cannot be performed at this time. The function is currently in the following state: {state}"
        )))
    }

    /// Refuses a package without the warm-up event file its manifest names.
    pub(crate) fn check_warmup_event(
        m: &spore_core::FunctionManifest,
        code_dir: &std::path::Path,
    ) -> Result<(), ControlError> {
        match &m.warmup_event {
            Some(w) if !code_dir.join(w).is_file() => Err(ControlError::InvalidParameter(format!(
                "warmup_event {w:?}: the code package has no such file (the path is relative to the function's folder)"
            ))),
            _ => Ok(()),
        }
    }

    /// The layer key of the package in `code_dir` for `runtime`, and whether it must be
    /// built (None: nothing to build, or `mode` skips it).
    pub(crate) fn plan_deps(
        &self,
        code_dir: &std::path::Path,
        manifest: &spore_core::FunctionManifest,
        code_hex: &str,
        mode: DepsMode,
    ) -> Result<Option<(Requirements, bool)>, ControlError> {
        if mode == DepsMode::Skip {
            return Ok(None);
        }
        let runtime = manifest.runtime;
        let Some(req) = deps::detect(code_dir, runtime)
            .map_err(|e| ControlError::InvalidParameter(error_chain(&e)))?
        else {
            return Ok(None);
        };
        let version = manifest.runtime_version();
        let req = req
            .on_interpreter(interpreter_name(runtime, version), version)
            .with_code(code_hex);
        let built = self.inner.registry.lock().deps_dir(&req.key()).is_dir();
        Ok(Some((req, !built)))
    }

    pub(crate) fn new_build(
        &self,
        name: &str,
        req: Requirements,
        code_dir: PathBuf,
        update: Option<(Vec<u8>, FunctionRecord)>,
    ) -> (PendingBuild, BuildStatus) {
        let id = self
            .inner
            .builds
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let status = BuildStatus {
            id,
            creating: update.is_none(),
            failed: None,
            done: false,
            publish: false,
            lines: Default::default(),
            dropped: 0,
        };
        (
            PendingBuild {
                name: name.to_owned(),
                id,
                req,
                code_dir,
                update,
            },
            status,
        )
    }

    /// Runs `b` in the background (the caller holds no lock).
    pub(crate) fn start_build(&self, b: PendingBuild) -> Result<(), ControlError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            ControlError::Internal("dependency builds need the daemon's runtime".into())
        })?;
        let this = self.clone();
        handle.spawn(async move { this.build(b).await });
        Ok(())
    }

    fn with_status(&self, name: &str, id: u64, f: impl FnOnce(&mut BuildStatus)) {
        self.inner.registry.lock().update_build(name, |st| {
            if st.id == id {
                f(st);
            }
        });
    }

    async fn build(self, b: PendingBuild) {
        let key = b.req.key();
        let started = std::time::Instant::now();
        tracing::info!(function = %b.name, layer = %key, "dependency build started");
        // The key's lock, held until the record names the layer: [`Control::prune_layers`]
        // leaves a locked key's layer alone.
        let lock = {
            let mut keys = self.inner.builds.keys.lock().expect("build keys");
            keys.entry(key.clone()).or_default().clone()
        };
        let _held = lock.lock_owned().await;
        let result = self.build_layer(&b, &key).await;
        let name = b.name.as_str();
        match result {
            Ok(built) => {
                let mut reg = self.inner.registry.lock();
                let Some(cur) = reg.get(name).cloned() else {
                    return; // deleted meanwhile
                };
                if cur.build.as_ref().map(|s| s.id) != Some(b.id) {
                    return; // a newer deploy took over
                }
                match b.update {
                    None => {
                        let mut status = cur.build.clone();
                        if let Some(s) = &mut status {
                            s.done = true;
                        }
                        reg.set_build(name, status);
                    }
                    Some((zip, mut rec)) => {
                        // The staged code may have been pruned by a configuration change.
                        let stored = reg.install_code(name, &zip).and_then(|(b64, hex, size)| {
                            (rec.code_sha256, rec.code_hex, rec.code_size) = (b64, hex, size);
                            rec.manifest = cur.manifest.clone();
                            rec.description = cur.description.clone();
                            rec.deps = Some(key.clone());
                            rec.build = cur.build.clone().map(|mut s| {
                                s.done = true;
                                s
                            });
                            reg.put(rec)
                        });
                        if let Err(e) = stored {
                            let why = error_chain(&e);
                            drop(reg);
                            self.with_status(name, b.id, |s| s.failed = Some(why));
                            return;
                        }
                    }
                }
                let publish = reg
                    .get(name)
                    .and_then(|r| r.build.as_ref())
                    .is_some_and(|s| s.publish);
                drop(reg);
                self.inner.pools.retire(name);
                self.prune_layers();
                tracing::info!(function = %name, layer = %key, built, ms = started.elapsed().as_millis() as u64, "dependency build finished");
                self.prewarm(name);
                if publish {
                    match self.publish_version(name, None, None, None) {
                        Ok(rec) => self.prewarm(&rec.key()),
                        Err(e) => self.inner.pools.log(name).push_text(&format!(
                            "publishing a version after the dependency build failed: {e}"
                        )),
                    }
                }
            }
            Err(why) => {
                tracing::warn!(function = %name, layer = %key, "dependency build failed: {why}");
                self.with_status(name, b.id, |s| s.failed = Some(why));
            }
        }
    }

    /// Builds the layer `key` unless it exists (the caller holds the key's lock); Ok(true)
    /// if this call built it.
    async fn build_layer(&self, b: &PendingBuild, key: &str) -> Result<bool, String> {
        let final_dir = self.inner.registry.lock().deps_dir(key);
        if final_dir.is_dir() {
            return Ok(false);
        }
        let env = self.inner.pools.env().map_err(|e| e.to_string())?;
        let root = final_dir.parent().expect("layers have a parent").to_owned();
        let staging = root.join(format!(".staging-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&staging)
            .map_err(|e| format!("creating {}: {e}", staging.display()))?;
        let (name, id) = (b.name.clone(), b.id);
        let this = self.clone();
        let interpreter = spore_runtime::interpreter(b.req.runtime, b.req.version)
            .map_err(|e| format!("Dependency build failed: {e}"))?;
        let result = spore_pool::build::build_layer(
            &env,
            b.req.runtime,
            &interpreter,
            b.req.local,
            &b.code_dir,
            &staging,
            &self.inner.builds.network(),
            self.inner.builds.limits,
            move |line| {
                this.inner
                    .pools
                    .log(&name)
                    .push_text(&format!("[build] {line}"));
                this.with_status(&name, id, |s| s.push_line(line));
            },
        )
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(format!("Dependency build failed: {e}"));
        }
        let size = deps::tree_size(&staging)
            .map(|(bytes, _)| bytes)
            .unwrap_or(0);
        let max = u64::from(self.inner.builds.limits.max_output_mb) << 20;
        if size > max {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(format!(
                "Dependency build failed: the installed packages take {} MiB, more than the limit of {} MiB",
                size >> 20,
                max >> 20
            ));
        }
        std::fs::rename(&staging, &final_dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(&staging);
            format!("storing the layer at {}: {e}", final_dir.display())
        })?;
        Ok(true)
    }

    /// Removes the layers no function uses (and no build holds). Under the registry's lock,
    /// so that a deploy that found a layer and names it in its record cannot lose it between
    /// the two; the removal itself happens after a rename, outside the lock.
    pub(crate) fn prune_layers(&self) {
        let reg = self.inner.registry.lock();
        let root = reg.deps_dir("x");
        let Some(root) = root.parent() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(root) else {
            return;
        };
        let used: std::collections::HashSet<String> =
            reg.list().filter_map(|r| r.deps.clone()).collect();
        let keys = self.inner.builds.keys.lock().expect("build keys");
        let mut doomed = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let busy = keys.get(&name).is_some_and(|m| m.try_lock().is_err());
            if name.starts_with('.') || used.contains(&name) || busy {
                continue;
            }
            let trash = root.join(format!(".trash-{}", uuid::Uuid::new_v4()));
            if std::fs::rename(e.path(), &trash).is_ok() {
                doomed.push((name, trash));
            }
        }
        drop(keys);
        drop(reg);
        for (name, trash) in doomed {
            match std::fs::remove_dir_all(&trash) {
                Ok(()) => tracing::info!(layer = %name, "unused dependency layer removed"),
                Err(e) => tracing::warn!(layer = %name, "removing an unused dependency layer: {e}"),
            }
        }
    }

    /// Marks functions whose layer is missing at start (a build cut short by a restart) as
    /// failed, with the reason.
    pub(crate) fn check_layers(&self) {
        // Staging and trash directories of a daemon that stopped midway.
        let root = self.inner.registry.lock().deps_dir("x");
        if let Some(Ok(entries)) = root.parent().map(std::fs::read_dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    let _ = spore_pool::build::remove_leftover(&e.path());
                }
            }
        }
        self.prune_layers();
        let mut reg = self.inner.registry.lock();
        let missing: Vec<String> = reg
            .list()
            .filter(|r| r.deps.as_deref().is_some_and(|k| !reg.deps_dir(k).is_dir()))
            .map(|r| r.manifest.name.clone())
            .collect();
        for name in missing {
            reg.set_build(
                &name,
                Some(BuildStatus {
                    id: u64::MAX,
                    creating: true,
                    failed: Some(
                        "The dependency layer is missing (the daemon stopped during its build): deploy the function again".into(),
                    ),
                    done: false,
                    publish: false,
                    lines: Default::default(),
                    dropped: 0,
                }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spore_core::Runtime;

    #[test]
    fn layers_are_keyed_by_the_exact_interpreter() {
        assert_eq!(interpreter_name(Runtime::Python3, Some(12)), "python3.12");
        assert_eq!(interpreter_name(Runtime::Python3, Some(11)), "python3.11");
        assert_eq!(interpreter_name(Runtime::Node20, Some(22)), "node22");
        // The host's default resolves to its version: `python3` and `python3.N` of the same
        // interpreter share a layer.
        if let Some(minor) = spore_runtime::host_python_minor() {
            assert_eq!(
                interpreter_name(Runtime::Python3, None),
                format!("python3.{minor}")
            );
        }
        if let Some(major) = spore_runtime::host_node_major() {
            assert_eq!(
                interpreter_name(Runtime::Node20, None),
                format!("node{major}")
            );
        }
    }
}
