//! The control plane: the function registry, per-function warm pools of sandboxed instances,
//! and the invocation path (warm instance, else a cold start in a fresh sandbox).
//!
//! [`Control`] is what the gateway calls. It owns the data dir (locked against a second
//! daemon), sweeps sandboxes a crashed daemon left behind, reaps idle instances after the
//! keep-alive, and on [`Control::shutdown`] drains in-flight invocations and removes every
//! sandbox and cgroup it made.
#![forbid(unsafe_code)]

pub mod code;
pub mod dag;
pub mod etcd;
pub mod instance;
pub mod logs;
pub mod registry;
pub mod snapshots;
pub mod store;
pub mod template;
pub mod units;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spore_core::{FunctionError, FunctionManifest, SandboxKind, StartKind};
use tokio::sync::Notify;

use crate::instance::{error_chain, ColdStart, Instance, InstanceEnv, StartError};
use crate::logs::LogRing;
use crate::registry::{FunctionRecord, Registry, RegistryError};
use crate::store::DataDirLock;
use crate::template::Template;

/// Errors the control plane returns to its callers (the gateway maps each to an HTTP status).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such function.
    #[error("Function not found: {0}")]
    NotFound(String),
    /// The function exists already.
    #[error("Function already exist: {0}")]
    Conflict(String),
    /// A parameter is invalid.
    #[error("{0}")]
    InvalidParameter(String),
    /// The payload is not JSON.
    #[error("Could not parse request body into json: {0}")]
    InvalidRequestContent(String),
    /// The payload is larger than allowed.
    #[error("Request must be smaller than {limit} bytes for the {kind} invocation (got {size})")]
    RequestTooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
        /// `RequestResponse` or `Event`.
        kind: &'static str,
    },
    /// Every instance slot stayed busy until the deadline.
    #[error("Rate exceeded: all {0} instances of the function stayed busy")]
    TooManyRequests(u32),
    /// The daemon cannot serve this now (shutting down, or sandboxes unsupported here).
    #[error("{0}")]
    Unavailable(String),
    /// A platform failure.
    #[error("{0}")]
    Internal(String),
}

impl From<RegistryError> for ControlError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Code(c) => ControlError::InvalidParameter(c.to_string()),
            other => ControlError::Internal(error_chain(&other)),
        }
    }
}

/// What [`Control::evict`] stopped.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Evicted {
    /// Idle instances stopped.
    pub instances: usize,
    /// Whether a cfork template was stopped.
    pub template: bool,
    /// Whether the function's next start restores from a snapshot.
    pub restorable: bool,
}

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Data dir (registry, runtime files, lock).
    pub data_dir: PathBuf,
    /// Shared Python packages bound read-only into sandboxes (default `<data-dir>/packages`).
    pub packages_dir: Option<PathBuf>,
    /// The Spore binary, re-executed as the sandbox init.
    pub exe: PathBuf,
    /// Default most instances per function.
    pub max_instances: u32,
    /// Idle instances older than this are stopped.
    pub keep_alive: Duration,
    /// CPU quota per instance, thousandths of a CPU.
    pub cpu_millis: u32,
    /// Process limit per instance.
    pub pids_max: u32,
    /// `/tmp` size cap per instance, MiB.
    pub tmp_mb: u32,
    /// Most live cfork templates (least recently used ones are stopped beyond it).
    pub max_templates: usize,
    /// How snapshot images store their pages. Raw by default: on these machines reading
    /// raw pages from the page cache restores faster than decompressing lz4 or zstd
    /// (docs/benchmarks.md, snapshots).
    pub snapshot_codec: spore_snapshot::image::Codec,
    /// How restores install memory unless a request says otherwise (full by default).
    pub snapshot_mode: spore_snapshot::restore::MemoryMode,
    /// Most memory idle instances may hold together, MiB (None: no limit beyond the
    /// keep-alive). Over it, the reaper stops idle instances and cfork templates, those it
    /// can restore from a snapshot first, then the longest idle (templates only if they can
    /// be restored).
    pub idle_memory_mb: Option<u64>,
    /// The processing unit this daemon is (None: unit 0, described from this host).
    pub unit: Option<spore_shim::UnitInfo>,
    /// Settings of links to other units.
    pub link: spore_shim::LinkConfig,
}

impl ControlConfig {
    /// Settings with defaults for everything but the paths.
    pub fn new(data_dir: PathBuf, exe: PathBuf) -> Self {
        ControlConfig {
            data_dir,
            packages_dir: None,
            exe,
            max_instances: 8,
            keep_alive: Duration::from_secs(300),
            cpu_millis: 1000,
            pids_max: 64,
            tmp_mb: 64,
            max_templates: 16,
            snapshot_codec: spore_snapshot::image::Codec::None,
            snapshot_mode: spore_snapshot::restore::MemoryMode::Full,
            idle_memory_mb: None,
            unit: None,
            link: spore_shim::LinkConfig::default(),
        }
    }
}

/// A function's configuration as given by a create or update call.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The manifest.
    pub manifest: FunctionManifest,
    /// Description.
    pub description: String,
}

/// Options of one invocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct InvokeOptions {
    /// Serve from a fresh instance, bypassing the warm pool.
    pub force_cold: bool,
    /// With `force_cold`: how the fresh instance starts (`Cold` = import from scratch,
    /// `Restore` = from the function's snapshot, `Fork`); None = the function's default.
    pub cold_path: Option<StartKind>,
    /// How a restore installs memory (None: the daemon's `snapshot_mode`).
    pub restore_mode: Option<spore_snapshot::restore::MemoryMode>,
    /// Run on this processing unit rather than where the function is placed (a DAG node's
    /// `unit`).
    pub unit: Option<u32>,
}

/// The outcome of one invocation.
#[derive(Debug)]
pub struct Invocation {
    /// Request id.
    pub request_id: String,
    /// How the serving instance started.
    pub start: StartKind,
    /// Start-up time of a cold instance, ms (0 when warm).
    pub init_ms: f64,
    /// Time from the call to the result in the daemon, ms.
    pub total_ms: f64,
    /// Result JSON, or the function's error.
    pub outcome: Result<Vec<u8>, FunctionError>,
    /// Lambda-style log block (START/logs/END/REPORT).
    pub log: String,
    /// Where a fresh instance's start-up went (cfork: per step, ms); empty otherwise.
    pub breakdown: Vec<(String, f64)>,
    /// From the request reaching the daemon to the handler being called, ms (where the
    /// runtime reports it).
    pub to_handler_ms: Option<f64>,
    /// `CLOCK_MONOTONIC` ns when the handler started and returned (0: unknown).
    pub handler_ns: (u64, u64),
    /// The processing unit that ran it.
    pub unit: u32,
}

#[derive(Debug, Default)]
struct PoolState {
    idle: Vec<Instance>,
    total: u32,
}

#[derive(Debug, Default)]
struct Pool {
    state: Mutex<PoolState>,
    notify: Notify,
}

impl Pool {
    /// Takes the idle instances for which `pick` holds out of the pool (they no longer count
    /// against its limit).
    fn take_idle(&self, pick: impl Fn(&Instance) -> bool) -> Vec<Instance> {
        let mut st = self.state.lock().expect("pool lock");
        let (taken, kept): (Vec<_>, Vec<_>) = st.idle.drain(..).partition(|i| pick(i));
        st.idle = kept;
        st.total -= taken.len() as u32;
        taken
    }
}

enum Slot {
    Warm(Box<Instance>),
    Cold,
}

struct Inner {
    cfg: ControlConfig,
    env: Result<Arc<InstanceEnv>, String>,
    registry: Mutex<Registry>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    logs: Mutex<HashMap<String, Arc<LogRing>>>,
    templates: Mutex<HashMap<String, Arc<Template>>>,
    /// One sandbox per function built ahead of its next restore (after a first restore).
    spares: Mutex<HashMap<String, instance::Spare>>,
    template_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    draining: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
    /// Snapshots of warm runtimes.
    snapshots: Arc<snapshots::Snapshots>,
    /// Idle pre-wired DAG pipelines, by DAG.
    pipelines: Mutex<HashMap<String, Vec<dag::pipeline::Pipeline>>>,
    /// The gateway's base URL, for DAG hops over HTTP (set once it listens).
    gateway_url: Mutex<Option<String>>,
    http: reqwest::Client,
    /// Processing units and placement.
    units: Arc<units::Units>,
    _lock: DataDirLock,
}

/// The control plane. Cheap to clone.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

/// Name of this data dir's parent cgroup: stable per data dir, so that a restarted daemon
/// finds what its predecessor left, and daemons on other data dirs are left alone.
pub fn cgroup_parent_name(data_dir: &Path) -> String {
    use sha2::Digest;
    let canon = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_owned());
    let sum = sha2::Sha256::digest(canon.as_os_str().as_encoded_bytes());
    format!(
        "spore-{}",
        sum.iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

struct InflightGuard<'a>(&'a Inner);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Control {
    /// Opens the data dir and prepares the host. Sandboxes being unsupported here (not root,
    /// no cgroups) is not fatal: the registry works and invocations fail with the reason.
    pub fn open(cfg: ControlConfig) -> Result<(Control, Vec<String>), ControlError> {
        let io = |what: &str, e: std::io::Error| ControlError::Internal(format!("{what}: {e}"));
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| io("creating the data dir", e))?;
        let lock = DataDirLock::acquire(&cfg.data_dir)
            .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        let (registry, mut warnings) = Registry::open(&cfg.data_dir)?;

        let run = cfg.data_dir.join("run");
        let rootfs = run.join("rootfs");
        let runtime_dir = cfg.data_dir.join("runtime").join("python");
        for d in [&rootfs, &runtime_dir] {
            std::fs::create_dir_all(d).map_err(|e| io("creating runtime directories", e))?;
        }
        // The in-sandbox runtime files, rewritten at every start so that they match this binary.
        use std::os::unix::fs::PermissionsExt;
        let runtime_files: [(&str, &[u8], u32); 7] = [
            (
                "bootstrap.py",
                spore_runtime::PYTHON_BOOTSTRAP.as_bytes(),
                0o644,
            ),
            (
                spore_runtime::PYTHON_CFORK_FILE,
                spore_runtime::PYTHON_CFORK.as_bytes(),
                0o644,
            ),
            (
                spore_runtime::NODE_BOOTSTRAP_FILE,
                spore_runtime::NODE_BOOTSTRAP.as_bytes(),
                0o644,
            ),
            (
                spore_runtime::CFORK_CHILD_LIB_FILE,
                spore_runtime::CFORK_CHILD_LIB,
                0o755,
            ),
            (
                spore_runtime::PYTHON_DAG_FILE,
                spore_runtime::PYTHON_DAG.as_bytes(),
                0o644,
            ),
            (
                spore_ipc::PY_NATIVE_LIB_FILE,
                spore_ipc::PY_NATIVE_LIB,
                0o755,
            ),
            (
                spore_runtime::CHECKPOINT_LIB_FILE,
                spore_runtime::CHECKPOINT_LIB,
                0o755,
            ),
        ];
        // The runtime code a snapshot holds in memory: an image taken with other runtime files
        // (another Spore build) would resume that other code, so it is not restored.
        let mut build = crc32fast::Hasher::new();
        build.update(env!("CARGO_PKG_VERSION").as_bytes());
        for (name, bytes, mode) in runtime_files {
            build.update(name.as_bytes());
            build.update(bytes);
            let path = runtime_dir.join(name);
            // Unchanged files keep their identity, so that snapshots (which map them and
            // check their inode and mtime) survive a daemon restart.
            if std::fs::read(&path).is_ok_and(|old| old == bytes) {
                continue;
            }
            store::write_atomic(&path, bytes)
                .and_then(|()| {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|e| io(&format!("writing the runtime file {}", path.display()), e))?;
        }
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io("chmod of the runtime directory", e))?;
        let packages = cfg
            .packages_dir
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("packages"));
        let packages_dir = if packages.is_dir() {
            Some(packages)
        } else {
            warnings.push(format!(
                "no Python packages directory at {}: functions can import only the standard library and their own code",
                packages.display()
            ));
            None
        };

        let parent = cgroup_parent_name(&cfg.data_dir);
        let env = spore_sandbox::preflight()
            .and_then(|layout| {
                let swept = layout.sweep_parent(&parent, false)?;
                if swept > 0 {
                    warnings.push(format!(
                        "removed {swept} sandboxes left by a previous daemon"
                    ));
                }
                layout.create_parent(&parent)?;
                Ok(layout)
            })
            .map(|layout| {
                let mut env = InstanceEnv::new(
                    cfg.exe.clone(),
                    layout,
                    parent,
                    rootfs,
                    runtime_dir,
                    packages_dir,
                );
                env.cpu_millis = cfg.cpu_millis;
                env.pids_max = cfg.pids_max;
                env.tmp_mb = cfg.tmp_mb;
                Arc::new(env)
            })
            .map_err(|e| error_chain(&e));
        if let Err(why) = &env {
            warnings.push(format!("invocations are disabled: {why}"));
        }
        let snapshots = snapshots::Snapshots::new(
            cfg.data_dir.join("snapshots"),
            cfg.snapshot_codec,
            format!("{:08x}", build.finalize()),
        )
        .map_err(|e| io("creating the snapshots directory", e))?;
        let units = Arc::new(units::Units::new(
            cfg.unit
                .clone()
                .unwrap_or_else(|| spore_shim::UnitInfo::detect(0, None, None)),
            cfg.link.clone(),
        ));
        let control = Control {
            inner: Arc::new(Inner {
                snapshots: Arc::new(snapshots),
                cfg,
                env,
                registry: Mutex::new(registry),
                pools: Mutex::new(HashMap::new()),
                logs: Mutex::new(HashMap::new()),
                templates: Mutex::new(HashMap::new()),
                spares: Mutex::new(HashMap::new()),
                template_locks: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                inflight: AtomicUsize::new(0),
                idle: Notify::new(),
                pipelines: Mutex::new(HashMap::new()),
                gateway_url: Mutex::new(None),
                http: reqwest::Client::new(),
                units,
                _lock: lock,
            }),
        };
        Ok((control, warnings))
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.registry.lock().expect("registry lock")
    }

    fn check_spec(spec: &FunctionSpec) -> Result<(), ControlError> {
        spec.manifest
            .validate()
            .map_err(|e| ControlError::InvalidParameter(e.to_string()))?;
        if spec.manifest.runtime == spore_core::Runtime::Node20 {
            if spec.manifest.sandbox == SandboxKind::Cfork {
                return Err(ControlError::InvalidParameter(
                    "runtime node20 cannot use sandbox \"cfork\": Node.js runs background threads (libuv's pool, V8's workers), and forking a multi-threaded process leaves the child with locks held by threads that no longer exist; use sandbox \"container\"".into(),
                ));
            }
            if !std::path::Path::new(spore_runtime::NODE_INTERPRETER).exists() {
                return Err(ControlError::InvalidParameter(format!(
                    "runtime node20 needs Node.js at {}, which is not installed on this host",
                    spore_runtime::NODE_INTERPRETER
                )));
            }
        }
        Ok(())
    }

    /// Creates a function from a zip package.
    pub fn create_function(
        &self,
        spec: FunctionSpec,
        zip: &[u8],
    ) -> Result<FunctionRecord, ControlError> {
        Self::check_spec(&spec)?;
        let mut reg = self.registry();
        let name = spec.manifest.name.clone();
        if reg.get(&name).is_some() {
            return Err(ControlError::Conflict(name));
        }
        let (code_sha256, code_hex, code_size) = reg.install_code(&name, zip)?;
        let rec = reg.put(FunctionRecord {
            manifest: spec.manifest,
            description: spec.description,
            code_sha256,
            code_hex,
            code_size,
            last_modified_ms: 0,
            revision: 0,
        })?;
        drop(reg);
        self.retire_idle(&name);
        Ok(rec)
    }

    /// Replaces a function's code.
    pub fn update_code(&self, name: &str, zip: &[u8]) -> Result<FunctionRecord, ControlError> {
        let mut reg = self.registry();
        let mut rec = reg
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        let (b64, hex, size) = reg.install_code(name, zip)?;
        (rec.code_sha256, rec.code_hex, rec.code_size) = (b64, hex, size);
        let rec = reg.put(rec)?;
        drop(reg);
        self.retire_idle(name);
        Ok(rec)
    }

    /// Replaces a function's configuration (the name cannot change).
    pub fn update_config(&self, spec: FunctionSpec) -> Result<FunctionRecord, ControlError> {
        Self::check_spec(&spec)?;
        let name = spec.manifest.name.clone();
        let mut reg = self.registry();
        let mut rec = reg
            .get(&name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.clone()))?;
        rec.manifest = spec.manifest;
        rec.description = spec.description;
        let rec = reg.put(rec)?;
        drop(reg);
        self.retire_idle(&name);
        self.inner.units.unplace(&name);
        Ok(rec)
    }

    /// Deletes a function; its instances stop (busy ones when their invocation ends).
    pub fn delete_function(&self, name: &str) -> Result<FunctionRecord, ControlError> {
        let rec = self
            .registry()
            .remove(name)?
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        self.retire_idle(name);
        self.inner.snapshots.remove(name);
        self.remove_on_units(name);
        Ok(rec)
    }

    /// Every stored snapshot.
    pub fn list_snapshots(&self) -> Vec<snapshots::SnapshotInfo> {
        self.inner.snapshots.list()
    }

    /// Removes a function's snapshots (the next init takes a new one if the function asks
    /// for snapshots); returns how many were removed.
    pub fn remove_snapshots(&self, name: &str) -> Result<usize, ControlError> {
        match self.inner.snapshots.remove(name) {
            0 => Err(ControlError::NotFound(format!("snapshot of {name}"))),
            n => Ok(n),
        }
    }

    /// One function's record.
    pub fn get_function(&self, name: &str) -> Result<FunctionRecord, ControlError> {
        self.registry()
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))
    }

    /// All records.
    pub fn list_functions(&self) -> Vec<FunctionRecord> {
        self.registry().list().cloned().collect()
    }

    /// The last `n` log lines of a function.
    pub fn logs(&self, name: &str, n: usize) -> Result<Vec<String>, ControlError> {
        self.get_function(name)?;
        Ok(self.log_ring(name).tail(n))
    }

    /// Number of idle and total instances of a function.
    pub fn instance_counts(&self, name: &str) -> (usize, u32) {
        let pool = self.existing_pool(name);
        pool.map_or((0, 0), |p| {
            let st = p.state.lock().expect("pool lock");
            (st.idle.len(), st.total)
        })
    }

    /// Host pids of a function's idle instances.
    pub fn instance_pids(&self, name: &str) -> Vec<i32> {
        let pool = self.existing_pool(name);
        pool.map_or_else(Vec::new, |p| {
            let st = p.state.lock().expect("pool lock");
            st.idle.iter().flat_map(Instance::pids).collect()
        })
    }

    fn log_ring(&self, name: &str) -> Arc<LogRing> {
        self.inner
            .logs
            .lock()
            .expect("logs lock")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn pool(&self, name: &str) -> Arc<Pool> {
        self.inner
            .pools
            .lock()
            .expect("pools lock")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Stops the idle instances and the cfork template of `name` now, releasing their
    /// memory (an operator's `spore evict`, and benchmarks that measure what comes back):
    /// the next start restores from the function's snapshot if it has one. Busy instances
    /// are left to finish. Returns once they are gone.
    pub async fn evict(&self, name: &str) -> Result<Evicted, ControlError> {
        self.get_function(name)?;
        let (template, idle) = self.take_idle(name);
        let out = Evicted {
            instances: idle.len(),
            template: template.is_some(),
            restorable: self.restorable(name),
        };
        for inst in idle {
            inst.destroy().await;
        }
        if let Some(t) = template {
            t.destroy().await;
        }
        self.stop_spares(|n, _| n == name).await;
        Ok(out)
    }

    /// Takes `name`'s spare sandbox if it restores `image` at `revision`; a stale one is
    /// stopped.
    fn take_spare(
        &self,
        name: &str,
        revision: u64,
        image: &std::path::Path,
    ) -> Option<instance::Spare> {
        let spare = self
            .inner
            .spares
            .lock()
            .expect("spares lock")
            .remove(name)?;
        if spare.fits(revision, image) {
            return Some(spare);
        }
        tokio::spawn(spare.destroy());
        None
    }

    /// Builds a spare sandbox for `rec`'s next restore from `image`, in the background,
    /// unless it has one (or the daemon is stopping).
    fn refill_spare(
        &self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        log: &Arc<LogRing>,
        image: &std::path::Path,
    ) {
        let name = rec.manifest.name.clone();
        if self.inner.draining.load(Ordering::Acquire)
            || self
                .inner
                .spares
                .lock()
                .expect("spares lock")
                .contains_key(&name)
        {
            return;
        }
        let (this, env, rec, log) = (self.clone(), env.clone(), rec.clone(), log.clone());
        let image = image.to_owned();
        // Counted as in flight, so that a shutdown waits for it and then stops it.
        self.inner.inflight.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let _guard = InflightGuard(&this.inner);
            let code_dir = this.registry().code_dir(&rec);
            match instance::Instance::spare(&env, &rec, code_dir, log, image).await {
                Ok(spare) => {
                    let stale = {
                        let mut spares = this.inner.spares.lock().expect("spares lock");
                        let current = this
                            .registry()
                            .get(&name)
                            .is_some_and(|r| r.revision == rec.revision);
                        if this.inner.draining.load(Ordering::Acquire)
                            || !current
                            || spares.contains_key(&name)
                        {
                            Some(spare)
                        } else {
                            spares.insert(name, spare);
                            None
                        }
                    };
                    if let Some(s) = stale {
                        s.destroy().await;
                    }
                }
                Err(e) => tracing::warn!(function = %name, "building a spare sandbox: {e}"),
            }
        });
    }

    /// Stops every spare sandbox `stop` selects.
    async fn stop_spares(&self, stop: impl Fn(&str, &instance::Spare) -> bool) {
        let gone: Vec<instance::Spare> = {
            let mut spares = self.inner.spares.lock().expect("spares lock");
            let names: Vec<String> = spares
                .iter()
                .filter(|(n, s)| stop(n, s))
                .map(|(n, _)| n.clone())
                .collect();
            names.iter().filter_map(|n| spares.remove(n)).collect()
        };
        for s in gone {
            s.destroy().await;
        }
    }

    /// Takes `name`'s template and idle instances out of the daemon's tables (callers stop
    /// them); waiters for an instance are woken to start their own.
    fn take_idle(&self, name: &str) -> (Option<Arc<Template>>, Vec<Instance>) {
        let template = self
            .inner
            .templates
            .lock()
            .expect("templates lock")
            .remove(name);
        let idle = match self.existing_pool(name) {
            Some(pool) => {
                let idle = pool.take_idle(|_| true);
                pool.notify.notify_waiters();
                idle
            }
            None => Vec::new(),
        };
        (template, idle)
    }

    /// Stops the idle instances and the template of `name` (after a change or delete).
    fn retire_idle(&self, name: &str) {
        let (template, idle) = self.take_idle(name);
        if let Some(t) = template {
            tokio::spawn(async move { t.destroy().await });
        }
        spawn_destroy(idle);
        let spare = self.inner.spares.lock().expect("spares lock").remove(name);
        if let Some(s) = spare {
            tokio::spawn(s.destroy());
        }
    }

    /// Checks a payload for a synchronous or asynchronous invocation.
    pub fn check_payload(payload: &[u8], asynchronous: bool) -> Result<(), ControlError> {
        let (limit, kind) = if asynchronous {
            (spore_core::MAX_ASYNC_PAYLOAD, "Event")
        } else {
            (spore_core::MAX_SYNC_PAYLOAD, "RequestResponse")
        };
        if payload.len() > limit {
            return Err(ControlError::RequestTooLarge {
                size: payload.len(),
                limit,
                kind,
            });
        }
        Self::check_json(payload)
    }

    /// Checks that a non-empty payload is JSON.
    fn check_json(payload: &[u8]) -> Result<(), ControlError> {
        if !payload.is_empty() {
            serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .map_err(|e| ControlError::InvalidRequestContent(e.to_string()))?;
        }
        Ok(())
    }

    /// Invokes a function and waits for its result. Function failures (errors, timeouts,
    /// crashes) are an `Ok` [`Invocation`] whose outcome is `Err`; `Err` is for requests the
    /// platform could not serve.
    ///
    /// The invocation runs on a task of its own: a caller that gives up (an HTTP client that
    /// disconnects, a unit's call cancelled by the control plane) leaves it to finish, log its
    /// report and give its instance back, as Lambda does. (Dropped half-way, it would keep its
    /// instance slot forever.)
    pub async fn invoke(
        &self,
        name: &str,
        payload: bytes::Bytes,
        opts: InvokeOptions,
    ) -> Result<Invocation, ControlError> {
        Self::check_payload(&payload, false)?;
        let (me, name) = (self.clone(), name.to_owned());
        tokio::spawn(async move { me.invoke_attached(&name, payload, opts).await })
            .await
            .map_err(|e| ControlError::Internal(format!("the invocation task failed: {e}")))?
    }

    async fn invoke_attached(
        &self,
        name: &str,
        payload: bytes::Bytes,
        opts: InvokeOptions,
    ) -> Result<Invocation, ControlError> {
        self.inner.inflight.fetch_add(1, Ordering::AcqRel);
        let _guard = InflightGuard(&self.inner);
        if self.inner.draining.load(Ordering::Acquire) {
            return Err(ControlError::Unavailable(
                "the daemon is shutting down".into(),
            ));
        }
        let env = self.inner.env.clone().map_err(|why| {
            ControlError::Unavailable(format!("invocations are disabled on this host: {why}"))
        })?;
        let rec = self.get_function(name)?;
        let _counted = match self.inner.units.place_node(&rec, opts.unit)? {
            units::Placement::Local => self.inner.units.local_guard(),
            units::Placement::Remote {
                unit,
                link,
                inflight,
            } => {
                let _counted = units::InflightCount::new(inflight);
                return self.invoke_remote(&rec, unit, &link, payload, opts).await;
            }
        };
        let t0 = Instant::now();
        let t0_ns = instance::monotonic_ns();
        let request_id = uuid::Uuid::new_v4().to_string();
        let pool = self.pool(name);
        let max = rec
            .manifest
            .max_instances
            .unwrap_or(self.inner.cfg.max_instances);
        let timeout = Duration::from_secs(u64::from(rec.manifest.timeout_s));
        let slot = self
            .acquire(&pool, rec.revision, max, opts.force_cold, t0 + timeout)
            .await?;
        let log = self.log_ring(name);

        let (mut inst, start) = match slot {
            Slot::Warm(inst) => (*inst, StartKind::Warm),
            Slot::Cold => {
                let first = instance::invoke_frame(&request_id, &payload, rec.manifest.timeout_s);
                match self
                    .start_fresh(&env, &rec, log.clone(), Some(first), opts)
                    .await
                {
                    Ok(started) => started,
                    Err(e) => {
                        self.release_slot(&pool);
                        return match e {
                            StartError::Platform(msg) => {
                                metrics::counter!("spore_platform_errors_total", "function" => name.to_owned()).increment(1);
                                Err(ControlError::Internal(msg))
                            }
                            StartError::Init(err) => {
                                let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
                                let block = report_block(
                                    &request_id,
                                    "",
                                    total_ms,
                                    rec.manifest.memory_mb,
                                    None,
                                    Some(total_ms),
                                    Some(&err),
                                );
                                log.push_text(&block);
                                record_metrics(name, StartKind::Cold, total_ms, Some(&err));
                                Ok(Invocation {
                                    request_id,
                                    start: StartKind::Cold,
                                    init_ms: total_ms,
                                    total_ms,
                                    outcome: Err(err),
                                    log: block,
                                    breakdown: Vec::new(),
                                    to_handler_ms: None,
                                    handler_ns: (0, 0),
                                    unit: self.inner.units.local().id,
                                })
                            }
                        };
                    }
                }
            }
        };
        let fresh = start != StartKind::Warm;
        let init_ms = if fresh { inst.init_ms } else { 0.0 };
        let breakdown = std::mem::take(&mut inst.breakdown);
        let result = inst
            .invoke(&request_id, &payload, rec.manifest.timeout_s)
            .await;
        let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let peak = inst.memory_peak_mb();
        let mut to_handler_ms = None;
        let mut handler_ns = (0, 0);
        let (outcome, logs, handler_ms, reusable) = match result {
            Ok(reply) => {
                let reusable = !inst.has_strays();
                handler_ns = (reply.handler_start_ns, reply.handler_end_ns);
                if reply.handler_start_ns > t0_ns {
                    to_handler_ms = Some((reply.handler_start_ns - t0_ns) as f64 / 1e6);
                }
                (reply.outcome, reply.logs, reply.handler_ms, reusable)
            }
            Err(failure) => (
                Err(failure.to_function_error()),
                String::new(),
                total_ms - init_ms,
                false,
            ),
        };
        let current = self.registry().get(name).map(|r| r.revision);
        self.release(&pool, inst, reusable && current == Some(rec.revision), max);
        let block = report_block(
            &request_id,
            &logs,
            handler_ms,
            rec.manifest.memory_mb,
            peak,
            fresh.then_some(init_ms),
            outcome.as_ref().err(),
        );
        log.push_text(&block);
        record_metrics(name, start, total_ms, outcome.as_ref().err());
        if fresh {
            metrics::histogram!("spore_init_duration_seconds", "function" => name.to_owned(), "start" => start.as_str())
                .record(init_ms / 1000.0);
        }
        Ok(Invocation {
            request_id,
            start,
            init_ms,
            total_ms,
            outcome,
            log: block,
            breakdown,
            to_handler_ms,
            handler_ns,
            unit: self.inner.units.local().id,
        })
    }

    /// Starts a fresh instance of `rec` (a container, or a fork of its template); a cfork
    /// child is forked with `first_invoke` pipelined (then already sent).
    async fn start_fresh(
        &self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        log: Arc<LogRing>,
        first_invoke: Option<Vec<u8>>,
        opts: InvokeOptions,
    ) -> Result<(Instance, StartKind), StartError> {
        let path = opts.cold_path;
        let timeout = Duration::from_secs(u64::from(rec.manifest.timeout_s));
        let init_timeout = timeout.max(Duration::from_secs(10));
        match rec.manifest.sandbox {
            SandboxKind::Container => {
                // A container's runtime reads its first frame only once ready: the caller
                // sends it.
                let code_dir = self.registry().code_dir(rec);
                let (name, snaps) = (&rec.manifest.name, &self.inner.snapshots);
                let restore = match path {
                    Some(StartKind::Restore) => true,
                    Some(_) => false,
                    None => rec.manifest.snapshot,
                };
                // Only snapshot users pay for looking at the store.
                let image = restore.then(|| snaps.current(name, rec.revision)).flatten();
                if let Some(image) = image {
                    let mode = opts.restore_mode.unwrap_or(self.inner.cfg.snapshot_mode);
                    let full = mode == spore_snapshot::restore::MemoryMode::Full;
                    let spare = full
                        .then(|| self.take_spare(name, rec.revision, &image))
                        .flatten();
                    if let Some(spare) = spare {
                        match spare.start(rec, init_timeout).await {
                            Ok(inst) => {
                                self.refill_spare(env, rec, &log, &image);
                                return Ok((inst, StartKind::Restore));
                            }
                            Err(e) => {
                                tracing::info!(function = %name, "the spare sandbox failed ({e}); restoring in a new one")
                            }
                        }
                    }
                    let how = ColdStart::Restore(image.clone(), mode);
                    match Instance::start(
                        env,
                        rec,
                        code_dir.clone(),
                        log.clone(),
                        init_timeout,
                        how,
                    )
                    .await
                    {
                        Ok(inst) => {
                            if full {
                                self.refill_spare(env, rec, &log, &image);
                            }
                            return Ok((inst, StartKind::Restore));
                        }
                        Err(e) => {
                            // A refused or failed image never runs: start from scratch, and
                            // take a new one.
                            tracing::warn!(function = %name, "restore failed, starting from scratch: {e}");
                            snaps.discard(&image);
                        }
                    }
                }
                let how = self.init_how(rec);
                let inst = Instance::start(env, rec, code_dir, log, init_timeout, how).await?;
                Ok((inst, StartKind::Cold))
            }
            SandboxKind::Cfork => {
                self.fork_instance(env, rec, log, init_timeout, first_invoke, opts)
                    .await
            }
        }
    }

    /// How a start from scratch goes: an import, snapshotted if the function asks for
    /// snapshots and has no usable one (nor a capture under way).
    fn init_how(&self, rec: &FunctionRecord) -> ColdStart {
        rec.manifest
            .snapshot
            .then(|| self.inner.snapshots.begin(&rec.manifest.name, rec.revision))
            .flatten()
            .map_or(ColdStart::Init, ColdStart::InitAndSnapshot)
    }

    /// Starts a cfork instance: forked from the live template, or from a new one, imported or
    /// restored from the function's snapshot (then the start counts as `cold` or `restore`
    /// and includes the template's start). `opts.cold_path` `init` or `restore` replaces the
    /// live template with one started that way.
    async fn fork_instance(
        &self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        log: Arc<LogRing>,
        init_timeout: Duration,
        first_invoke: Option<Vec<u8>>,
        opts: InvokeOptions,
    ) -> Result<(Instance, StartKind), StartError> {
        let fresh = match opts.cold_path {
            Some(StartKind::Cold) => Some(false),
            Some(StartKind::Restore) => Some(true),
            _ => None,
        };
        let (mut template, mut started) = self
            .template_for(env, rec, log.clone(), init_timeout, fresh)
            .await?;
        let mut forked = template
            .fork(env, rec, Duration::from_secs(10), first_invoke.clone())
            .await;
        if forked.is_err() && template.was_stopped() {
            // The reaper (or a redeploy) stopped the template between our getting it and
            // forking: go to the next one.
            (template, started) = self.template_for(env, rec, log, init_timeout, None).await?;
            forked = template
                .fork(env, rec, Duration::from_secs(10), first_invoke)
                .await;
        }
        if forked.is_err() && !template.is_alive() {
            self.drop_template(&rec.manifest.name, &template);
        }
        let mut inst = forked?;
        if started {
            inst.init_ms += template.init_ms;
            let kind = if template.restored {
                StartKind::Restore
            } else {
                StartKind::Cold
            };
            return Ok((inst, kind));
        }
        Ok((inst, StartKind::Fork))
    }

    fn drop_template(&self, name: &str, template: &Arc<Template>) {
        let mut templates = self.inner.templates.lock().expect("templates lock");
        if templates
            .get(name)
            .is_some_and(|t| Arc::ptr_eq(t, template))
        {
            templates.remove(name);
        }
        let t = template.clone();
        tokio::spawn(async move { t.destroy().await });
    }

    /// The live template of `rec`, started if there is none (or it died, or is stale):
    /// restored from the function's snapshot if it has one, else imported (and snapshotted,
    /// for a `snapshot = true` function). `fresh` = Some(restore?) replaces a live template
    /// with a new one started that way. Returns whether it was started now.
    async fn template_for(
        &self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        log: Arc<LogRing>,
        init_timeout: Duration,
        fresh: Option<bool>,
    ) -> Result<(Arc<Template>, bool), StartError> {
        let name = &rec.manifest.name;
        let lock = self
            .inner
            .template_locks
            .lock()
            .expect("template locks")
            .entry(name.clone())
            .or_default()
            .clone();
        let _creating = lock.lock().await;
        let existing = self
            .inner
            .templates
            .lock()
            .expect("templates lock")
            .get(name)
            .cloned();
        if let Some(t) = existing {
            if t.is_alive() && t.revision == rec.revision && fresh.is_none() {
                return Ok((t, false));
            }
            self.drop_template(name, &t);
        }
        self.evict_templates(self.inner.cfg.max_templates.saturating_sub(1));
        let code_dir = self.registry().code_dir(rec);
        let max_instances = rec
            .manifest
            .max_instances
            .unwrap_or(self.inner.cfg.max_instances);
        let snaps = &self.inner.snapshots;
        let restore = fresh.unwrap_or(rec.manifest.snapshot);
        // Only snapshot users pay for looking at the store.
        let image = restore.then(|| snaps.current(name, rec.revision)).flatten();
        let mut template = None;
        if let Some(image) = image {
            let how = ColdStart::Restore(image.clone(), spore_snapshot::restore::MemoryMode::Full);
            // Twice: a restore can collide with the restorer's own (random) layout, which a
            // second process does not share.
            let mut why = String::new();
            for _ in 0..2 {
                let started = Template::start(
                    env,
                    rec,
                    code_dir.clone(),
                    log.clone(),
                    init_timeout,
                    max_instances,
                    how.clone(),
                )
                .await;
                match started {
                    Ok(t) => {
                        template = Some(t);
                        break;
                    }
                    Err(e) => why = e.to_string(),
                }
            }
            if template.is_none() {
                // A refused or failed image never runs: import instead, and take a new one.
                tracing::warn!(function = %name, "restoring the cfork template failed, starting it from scratch: {why}");
                snaps.discard(&image);
            }
        }
        let template = match template {
            Some(t) => t,
            None => {
                let how = self.init_how(rec);
                Template::start(env, rec, code_dir, log, init_timeout, max_instances, how).await?
            }
        };
        template.refill_spares(env);
        self.inner
            .templates
            .lock()
            .expect("templates lock")
            .insert(name.clone(), template.clone());
        Ok((template, true))
    }

    /// Stops least recently used templates until at most `keep` remain.
    fn evict_templates(&self, keep: usize) {
        let evicted: Vec<Arc<Template>> = {
            let mut templates = self.inner.templates.lock().expect("templates lock");
            let mut by_age: Vec<(String, Instant)> = templates
                .iter()
                .map(|(n, t)| (n.clone(), t.last_used()))
                .collect();
            by_age.sort_by_key(|(_, used)| *used);
            let excess = templates.len().saturating_sub(keep);
            by_age
                .into_iter()
                .take(excess)
                .filter_map(|(n, _)| templates.remove(&n))
                .collect()
        };
        for t in evicted {
            tracing::info!("evicting cfork template {} (least recently used)", t.id);
            tokio::spawn(async move { t.destroy().await });
        }
    }

    /// Starts the template of a cfork function in the background (after a deploy), so that
    /// its first invocation forks instead of waiting for the template.
    pub fn prewarm(&self, name: &str) {
        let Ok(env) = self.inner.env.clone() else {
            return;
        };
        let Ok(rec) = self.get_function(name) else {
            return;
        };
        if rec.manifest.sandbox != SandboxKind::Cfork {
            return;
        }
        // A function pinned to another unit is forked there, never here.
        if rec
            .manifest
            .unit
            .is_some_and(|u| u != self.inner.units.local().id)
        {
            return;
        }
        let this = self.clone();
        // Counted as in flight, so that a shutdown waits for the template and removes it.
        self.inner.inflight.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let _guard = InflightGuard(&this.inner);
            let log = this.log_ring(&rec.manifest.name);
            let timeout =
                Duration::from_secs(u64::from(rec.manifest.timeout_s)).max(Duration::from_secs(10));
            if let Err(e) = this
                .template_for(&env, &rec, log.clone(), timeout, None)
                .await
            {
                log.push_text(&format!("starting the cfork template failed: {e}"));
            }
        });
    }

    /// Host pids of a function's live template, if it has one.
    pub fn template_pids(&self, name: &str) -> Option<Vec<i32>> {
        let t = self
            .inner
            .templates
            .lock()
            .expect("templates lock")
            .get(name)
            .cloned()?;
        t.is_alive().then(|| t.pids())
    }

    /// Host pids of a function's spare sandbox (built for its next restore), if it has one.
    pub fn spare_pids(&self, name: &str) -> Option<Vec<i32>> {
        self.inner
            .spares
            .lock()
            .expect("spares lock")
            .get(name)
            .map(instance::Spare::pids)
    }

    /// Queues an asynchronous (`Event`) invocation; its outcome goes to the function's log.
    pub fn invoke_async(&self, name: &str, payload: Vec<u8>) -> Result<String, ControlError> {
        Self::check_payload(&payload, true)?;
        self.get_function(name)?;
        if self.inner.draining.load(Ordering::Acquire) {
            return Err(ControlError::Unavailable(
                "the daemon is shutting down".into(),
            ));
        }
        let this = self.clone();
        let name = name.to_owned();
        let id = uuid::Uuid::new_v4().to_string();
        tokio::spawn(async move {
            if let Err(e) = this
                .invoke(&name, payload.into(), InvokeOptions::default())
                .await
            {
                this.log_ring(&name)
                    .push_text(&format!("asynchronous invocation failed: {e}"));
            }
        });
        Ok(id)
    }

    async fn acquire(
        &self,
        pool: &Pool,
        revision: u64,
        max: u32,
        force_cold: bool,
        deadline: Instant,
    ) -> Result<Slot, ControlError> {
        loop {
            let notified = pool.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut stale = Vec::new();
            let slot = {
                let mut st = pool.state.lock().expect("pool lock");
                let mut found = None;
                if !force_cold {
                    while let Some(inst) = st.idle.pop() {
                        if inst.revision == revision {
                            found = Some(Slot::Warm(Box::new(inst)));
                            break;
                        }
                        st.total -= 1;
                        stale.push(inst);
                    }
                }
                if found.is_none() && (st.total < max || force_cold) {
                    st.total += 1;
                    found = Some(Slot::Cold);
                }
                found
            };
            spawn_destroy(stale);
            if let Some(slot) = slot {
                return Ok(slot);
            }
            // Idle DAG pipelines may hold this function's instances: stop them (their
            // instances free their slots and notify).
            let name = self
                .inner
                .pools
                .lock()
                .expect("pools lock")
                .iter()
                .find(|(_, x)| std::ptr::eq(&***x, pool))
                .map(|(name, _)| name.clone());
            if let Some(name) = name {
                self.evict_pipelines(|p| p.uses(&name));
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(ControlError::TooManyRequests(max));
            }
        }
    }

    fn release_slot(&self, pool: &Pool) {
        pool.state.lock().expect("pool lock").total -= 1;
        pool.notify.notify_one();
    }

    fn release(&self, pool: &Pool, inst: Instance, reusable: bool, max: u32) {
        let reject = {
            let mut st = pool.state.lock().expect("pool lock");
            if reusable && !self.inner.draining.load(Ordering::Acquire) && st.total <= max {
                st.idle.push(inst);
                None
            } else if reusable
                && !self.inner.draining.load(Ordering::Acquire)
                && !st.idle.is_empty()
            {
                // Over the limit (a forced fresh start): keep the instance that just worked
                // and stop the one idle longest (a lazy restore's fault server also gets the
                // time to save the working set it is recording).
                st.total -= 1;
                let oldest = st.idle.remove(0);
                st.idle.push(inst);
                Some(oldest)
            } else {
                st.total -= 1;
                Some(inst)
            }
        };
        pool.notify.notify_one();
        spawn_destroy(reject.into_iter().collect());
    }

    fn existing_pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.inner
            .pools
            .lock()
            .expect("pools lock")
            .get(name)
            .cloned()
    }

    fn pools_snapshot(&self) -> Vec<Arc<Pool>> {
        self.inner
            .pools
            .lock()
            .expect("pools lock")
            .values()
            .cloned()
            .collect()
    }

    /// Stops instances idle for longer than the keep-alive; runs until the process ends.
    pub fn spawn_reaper(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs(1).min(this.inner.cfg.keep_alive));
            loop {
                tick.tick().await;
                if this.inner.draining.load(Ordering::Acquire) {
                    return;
                }
                let keep = this.inner.cfg.keep_alive;
                this.evict_pipelines(|p| p.idle_for() > keep);
                for pool in this.pools_snapshot() {
                    spawn_destroy(pool.take_idle(|i| i.last_used.elapsed() > keep));
                }
                // A template that can come back from its snapshot leaves memory like an idle
                // instance; one that cannot stays (only the template count bounds those).
                let idle: Vec<String> = this
                    .template_list()
                    .into_iter()
                    .filter(|(name, t)| t.last_used().elapsed() > keep && this.restorable(name))
                    .map(|(name, _)| name)
                    .collect();
                for name in idle {
                    this.stop_template(&name, "idle for longer than the keep-alive");
                }
                this.stop_spares(|_, s| s.created.elapsed() > keep).await;
                if let Some(budget) = this.inner.cfg.idle_memory_mb {
                    this.enforce_idle_budget(budget << 20);
                }
            }
        });
    }

    /// Every live template, by function.
    fn template_list(&self) -> Vec<(String, Arc<Template>)> {
        self.inner
            .templates
            .lock()
            .expect("templates lock")
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }

    /// Whether `name`'s next start can restore from a snapshot.
    fn restorable(&self, name: &str) -> bool {
        self.registry()
            .get(name)
            .filter(|r| r.manifest.snapshot)
            .and_then(|r| self.inner.snapshots.current(name, r.revision))
            .is_some()
    }

    /// Stops `name`'s template (if it is still the one live), logging why.
    fn stop_template(&self, name: &str, why: &str) -> bool {
        let t = self
            .inner
            .templates
            .lock()
            .expect("templates lock")
            .remove(name);
        let Some(t) = t else {
            return false;
        };
        tracing::info!(
            "stopping the cfork template {} ({why}); it comes back from its snapshot",
            t.id
        );
        tokio::spawn(async move { t.destroy().await });
        true
    }

    /// Stops idle instances and cfork templates until those left hold at most `budget`
    /// bytes: first the ones whose function can be restored from a snapshot (cheap to bring
    /// back), then the longest idle. Templates count as idle (busy children have cgroups of
    /// their own); only restorable ones are stopped.
    fn enforce_idle_budget(&self, budget: u64) {
        let pools: Vec<(String, Arc<Pool>)> = self
            .inner
            .pools
            .lock()
            .expect("pools lock")
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        /// What holds idle memory.
        enum Holder {
            Instance(Arc<Pool>, String),
            Template(String),
        }
        // (restorable, idle since, bytes, holder)
        let mut idle = Vec::new();
        for (name, pool) in &pools {
            let restorable = self.restorable(name);
            let st = pool.state.lock().expect("pool lock");
            for inst in &st.idle {
                let bytes = inst.memory_bytes().unwrap_or(0);
                idle.push((
                    restorable,
                    inst.last_used,
                    bytes,
                    Holder::Instance(pool.clone(), inst.id.clone()),
                ));
            }
        }
        for (name, t) in self.template_list() {
            let bytes = t.memory_bytes().unwrap_or(0);
            idle.push((
                self.restorable(&name),
                t.last_used(),
                bytes,
                Holder::Template(name),
            ));
        }
        let mut total: u64 = idle.iter().map(|x| x.2).sum();
        if total <= budget {
            return;
        }
        idle.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (restorable, _, bytes, holder) in idle {
            if total <= budget {
                break;
            }
            let (pool, id) = match holder {
                Holder::Instance(pool, id) => (pool, id),
                Holder::Template(template) => {
                    let why = format!(
                        "{:.1} MiB, to keep idle memory under {} MiB",
                        bytes as f64 / 1048576.0,
                        budget >> 20
                    );
                    if restorable && self.stop_template(&template, &why) {
                        total = total.saturating_sub(bytes);
                    }
                    continue;
                }
            };
            let taken = pool.take_idle(|i| i.id == id);
            if !taken.is_empty() {
                tracing::info!(
                    "stopping idle instance {id} ({:.1} MiB{}) to keep idle instances under {} MiB",
                    bytes as f64 / 1048576.0,
                    if restorable {
                        ", restorable from its snapshot"
                    } else {
                        ""
                    },
                    budget >> 20
                );
                total = total.saturating_sub(bytes);
                spawn_destroy(taken);
            }
        }
    }

    /// Stops taking invocations, waits up to `grace` for those in flight, then stops every
    /// instance and removes this daemon's cgroups.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + grace;
        while self.inner.inflight.load(Ordering::Acquire) > 0 {
            let idle = self.inner.idle.notified();
            if tokio::time::timeout_at(deadline.into(), idle)
                .await
                .is_err()
            {
                tracing::warn!(
                    "{} invocations still running after {grace:?}; stopping them",
                    self.inner.inflight.load(Ordering::Acquire)
                );
                break;
            }
        }
        self.close_pipelines().await;
        let all: Vec<Instance> = self
            .pools_snapshot()
            .iter()
            .flat_map(|p| p.take_idle(|_| true))
            .collect();
        for inst in all {
            inst.destroy().await;
        }
        let templates: Vec<Arc<Template>> = self
            .inner
            .templates
            .lock()
            .expect("templates lock")
            .drain()
            .map(|(_, t)| t)
            .collect();
        for t in templates {
            t.destroy().await;
        }
        self.stop_spares(|_, _| true).await;
        if let Ok(env) = &self.inner.env {
            let (layout, parent) = (env.layout.clone(), env.cgroup_parent.clone());
            let res = tokio::task::spawn_blocking(move || layout.sweep_parent(&parent, true)).await;
            if let Ok(Err(e)) = res {
                tracing::warn!("removing this daemon's cgroups: {}", error_chain(&e));
            }
        }
    }
}

fn spawn_destroy(instances: Vec<Instance>) {
    for inst in instances {
        tokio::spawn(inst.destroy());
    }
}

fn record_metrics(name: &str, start: StartKind, total_ms: f64, error: Option<&FunctionError>) {
    metrics::counter!("spore_invocations_total", "function" => name.to_owned(), "start" => start.as_str()).increment(1);
    if let Some(e) = error {
        metrics::counter!("spore_invocation_errors_total", "function" => name.to_owned(), "type" => e.error_type.clone()).increment(1);
    }
    metrics::histogram!("spore_invocation_duration_seconds", "function" => name.to_owned(), "start" => start.as_str()).record(total_ms / 1000.0);
}

fn report_block(
    request_id: &str,
    logs: &str,
    duration_ms: f64,
    memory_mb: u32,
    peak_mb: Option<u64>,
    init_ms: Option<f64>,
    error: Option<&FunctionError>,
) -> String {
    let mut s = format!("START RequestId: {request_id} Version: $LATEST\n");
    s.push_str(logs);
    if !logs.is_empty() && !logs.ends_with('\n') {
        s.push('\n');
    }
    if let Some(e) = error {
        s.push_str(&format!("[ERROR] {}: {}\n", e.error_type, e.message));
    }
    s.push_str(&format!("END RequestId: {request_id}\n"));
    s.push_str(&format!(
        "REPORT RequestId: {request_id}\tDuration: {duration_ms:.2} ms\tBilled Duration: {} ms\tMemory Size: {memory_mb} MB",
        duration_ms.ceil() as u64
    ));
    if let Some(p) = peak_mb {
        s.push_str(&format!("\tMax Memory Used: {p} MB"));
    }
    if let Some(i) = init_ms {
        s.push_str(&format!("\tInit Duration: {i:.2} ms"));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_checks() {
        assert!(Control::check_payload(b"", false).is_ok());
        assert!(Control::check_payload(b"{\"a\": 1}", false).is_ok());
        assert!(matches!(
            Control::check_payload(b"{nope", false),
            Err(ControlError::InvalidRequestContent(_))
        ));
        let big = format!("\"{}\"", "a".repeat(spore_core::MAX_ASYNC_PAYLOAD)).into_bytes();
        assert!(Control::check_payload(&big, false).is_ok());
        assert!(matches!(
            Control::check_payload(&big, true),
            Err(ControlError::RequestTooLarge { .. })
        ));
    }

    #[test]
    fn report_block_shape() {
        let err = FunctionError::platform("Sandbox.Timedout", "Task timed out after 1.00 seconds");
        let b = report_block("r1", "hello", 12.3, 128, Some(20), Some(40.0), Some(&err));
        assert!(b.starts_with("START RequestId: r1"));
        assert!(b.contains("hello\n[ERROR] Sandbox.Timedout"));
        assert!(b.contains("Init Duration: 40.00 ms"));
        assert!(b.contains("Max Memory Used: 20 MB"));
    }

    #[test]
    fn cgroup_parent_names_differ_per_data_dir() {
        let a = cgroup_parent_name(Path::new("/var/lib/spore-a"));
        let b = cgroup_parent_name(Path::new("/var/lib/spore-b"));
        assert_ne!(a, b);
        assert!(a.starts_with("spore-") && a.len() == 18);
    }
}
