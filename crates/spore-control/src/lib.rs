//! The control plane: the function lifecycle (create, update, delete over the registry), and
//! routing each call to the subsystem that serves it: an invocation to the pools of this unit
//! or to another unit, a DAG to the DAG engine, a unit's link to the cluster.
//!
//! [`Control`] is what the gateway calls. It owns the data dir (locked against a second
//! daemon), wires the subsystems together (`spore-pool`, `spore-cluster`, `spore-dag`, over
//! `spore-registry`), runs the keep-alive reaper, and on [`Control::shutdown`] drains
//! in-flight work and removes every sandbox and cgroup it made.
#![forbid(unsafe_code)]

mod deps;
pub mod extras;
mod hosts;
mod invoke;
mod provisioned;
mod versions;

pub use provisioned::ProvisionedStatus;
pub use versions::AliasSpec;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use spore_cluster::{UnitStatus, Units};
use spore_core::SandboxKind;
use spore_dag::{DagInvokeOptions, DagRun, Dags};
use spore_pool::{PoolConfig, Pools, SnapshotInfo, Snapshots, Work};
use spore_registry::store::DataDirLock;
use spore_registry::{FunctionRecord, Registry, SharedRegistry};

pub use deps::DepsMode;
pub use spore_core::{ControlError, Invocation, InvokeOptions};
pub use spore_pool::build::BuildLimits;
pub use spore_pool::cgroup_parent_name;
pub use spore_registry::FunctionSpec;

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
    /// The region named in ARNs.
    pub region: String,
    /// The account id named in ARNs.
    pub account_id: String,
    /// Offline package index (wheels, an npm cache under `npm/`) for dependency builds;
    /// None: builds reach the registries through network egress.
    pub build_index_dir: Option<PathBuf>,
    /// Limits of one dependency build.
    pub build_limits: BuildLimits,
    /// Network access of functions whose manifest does not say (egress, as on Lambda).
    pub default_network: spore_core::Network,
    /// Subnet of egress sandboxes (None: a free /21 of 10.214.0.0/16).
    pub egress_subnet: Option<spore_pool::EgressSubnet>,
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
            region: DEFAULT_REGION.to_owned(),
            account_id: DEFAULT_ACCOUNT_ID.to_owned(),
            build_index_dir: None,
            build_limits: BuildLimits::default(),
            default_network: spore_core::Network::Egress,
            egress_subnet: None,
        }
    }
}

/// The region ARNs name unless configured (`spore serve --region`).
pub const DEFAULT_REGION: &str = "local";
/// The account id ARNs name unless configured (`spore serve --account-id`).
pub const DEFAULT_ACCOUNT_ID: &str = "000000000000";

/// One finished invocation, as the dashboard lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentInvocation {
    /// When it finished, ms since the epoch.
    pub time_ms: u64,
    /// The function.
    pub function: String,
    /// Its request id.
    pub request_id: String,
    /// How its instance started (`warm`, `fork`, `restore`, `cold`).
    pub start: &'static str,
    /// From the call to the result, ms.
    pub duration_ms: f64,
    /// Start-up of a fresh instance, ms (0 when warm).
    pub init_ms: f64,
    /// The error type, if it failed.
    pub error: Option<String>,
    /// The unit that ran it.
    pub unit: u32,
}

/// How many finished invocations [`Control::recent_invocations`] keeps.
pub const RECENT_INVOCATIONS: usize = 500;

struct Inner {
    recent: std::sync::Mutex<std::collections::VecDeque<RecentInvocation>>,
    registry: SharedRegistry,
    work: Arc<Work>,
    pools: Pools,
    units: Arc<Units>,
    dags: Dags,
    region: String,
    account_id: String,
    /// One provisioned-concurrency pass at a time.
    keeper: tokio::sync::Mutex<()>,
    builds: deps::Builds,
    _lock: DataDirLock,
}

/// The control plane. Cheap to clone.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

impl Control {
    /// Opens the data dir and prepares the host. Sandboxes being unsupported here (not root,
    /// no cgroups) is not fatal: the registry works and invocations fail with the reason.
    pub fn open(cfg: ControlConfig) -> Result<(Control, Vec<String>), ControlError> {
        // Layer ARNs name the same region and account as function ARNs.
        spore_registry::layers::set_arn_prefix(&cfg.region, &cfg.account_id);
        let io = |what: &str, e: std::io::Error| ControlError::Internal(format!("{what}: {e}"));
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| io("creating the data dir", e))?;
        // Records, keys, snapshots and code are the daemon's: no other local user lists or
        // reads anything under the data dir (sandboxes get what they need bound in).
        spore_registry::store::make_private(&cfg.data_dir)
            .map_err(|e| io("making the data dir private", e))?;
        let lock = DataDirLock::acquire(&cfg.data_dir)
            .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        let (registry, mut warnings) = Registry::open(&cfg.data_dir)?;
        let registry = SharedRegistry::new(registry);
        let host = spore_pool::host::prepare(
            &spore_pool::host::HostConfig {
                data_dir: cfg.data_dir.clone(),
                packages_dir: cfg.packages_dir.clone(),
                exe: cfg.exe.clone(),
                cpu_millis: cfg.cpu_millis,
                pids_max: cfg.pids_max,
                tmp_mb: cfg.tmp_mb,
                default_network: cfg.default_network,
                egress_subnet: cfg.egress_subnet,
                region: cfg.region.clone(),
            },
            &mut warnings,
        )?;
        let snapshots = Snapshots::new(
            cfg.data_dir.join("snapshots"),
            cfg.snapshot_codec,
            host.build,
        )
        .map_err(|e| io("creating the snapshots directory", e))?;
        let logs_dir = cfg.data_dir.join("logs");
        std::fs::create_dir_all(&logs_dir).map_err(|e| io("creating the logs directory", e))?;
        let work = Work::new();
        let pools = Pools::new(
            PoolConfig {
                max_instances: cfg.max_instances,
                keep_alive: cfg.keep_alive,
                max_templates: cfg.max_templates,
                snapshot_mode: cfg.snapshot_mode,
                idle_memory_mb: cfg.idle_memory_mb,
                logs_dir: Some(logs_dir),
            },
            host.env,
            registry.clone(),
            work.clone(),
            snapshots,
        );
        let units = Arc::new(Units::new(
            cfg.unit
                .clone()
                .unwrap_or_else(|| spore_shim::UnitInfo::detect(0, None, None)),
            cfg.link.clone(),
            registry.clone(),
        ));
        let dags = Dags::new(
            registry.clone(),
            pools.clone(),
            units.clone(),
            work.clone(),
            &cfg.data_dir,
        );
        // A full pool frees the instances idle DAG pipelines hold (a weak handle: the pools
        // must not keep the engine alive).
        let weak = dags.downgrade();
        pools.set_reclaim(move |function| {
            if let Some(d) = weak.upgrade() {
                d.reclaim(function);
            }
        });
        let control = Control {
            inner: Arc::new(Inner {
                recent: std::sync::Mutex::new(std::collections::VecDeque::new()),
                registry,
                work,
                pools,
                units,
                dags,
                region: cfg.region.clone(),
                account_id: cfg.account_id.clone(),
                keeper: tokio::sync::Mutex::new(()),
                builds: deps::Builds::new(cfg.build_index_dir.clone(), cfg.build_limits),
                _lock: lock,
            }),
        };
        control.inner.dags.set_invoker(hosts::invoker(&control));
        control.check_layers();
        Ok((control, warnings))
    }

    /// The region ARNs name.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// The account id ARNs name.
    pub fn account_id(&self) -> &str {
        &self.inner.account_id
    }

    /// The ARN of function `name` (with `:qualifier` if `qualifier` is given).
    pub fn function_arn(&self, name: &str, qualifier: Option<&str>) -> String {
        let mut arn = format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.inner.region, self.inner.account_id
        );
        if let Some(q) = qualifier {
            arn.push(':');
            arn.push_str(q);
        }
        arn
    }

    /// Checks a function's configuration.
    fn check_spec(spec: &FunctionSpec) -> Result<(), ControlError> {
        versions::check_description(Some(&spec.description))?;
        spec.manifest
            .validate()
            .map_err(|e| ControlError::InvalidParameter(e.to_string()))?;
        // The interpreter the runtime names must be on this host (never another one run
        // silently in its place).
        spore_runtime::interpreter(spec.manifest.runtime, spec.manifest.runtime_version())
            .map_err(ControlError::InvalidParameter)?;
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

    /// Creates a function from a zip package (building its dependencies).
    pub fn create_function(
        &self,
        spec: FunctionSpec,
        zip: &[u8],
    ) -> Result<FunctionRecord, ControlError> {
        self.create_function_with(spec, zip, DepsMode::Build)
    }

    /// Creates a function from a zip package. With requirement files whose layer is not
    /// built yet, the function is returned `Pending` and the build runs in the background.
    pub fn create_function_with(
        &self,
        spec: FunctionSpec,
        zip: &[u8],
        deps: DepsMode,
    ) -> Result<FunctionRecord, ControlError> {
        Self::check_spec(&spec)?;
        let reg = self.inner.registry.lock();
        let name = spec.manifest.name.clone();
        if reg.get(&name).is_some() {
            return Err(ControlError::Conflict(name));
        }
        let (code_sha256, code_hex, code_size) = reg
            .install_code(&name, zip)
            .inspect_err(|e| tracing::warn!(function = %name, "code package refused: {e}"))?;
        let code_dir = reg.dir_of_code(&name, &code_hex);
        drop(reg);
        let plan = Self::check_warmup_event(&spec.manifest, &code_dir)
            .and_then(|()| self.plan_deps(&code_dir, &spec.manifest, &code_hex, deps));
        let mut reg = self.inner.registry.lock();
        let plan = match plan {
            Ok(plan) => plan,
            Err(e) => {
                reg.discard_code(&name);
                return Err(e);
            }
        };
        // A layer found before the lock may have been pruned since (the prune runs under it).
        let plan = plan.map(|(req, build)| {
            let build = build || !reg.deps_dir(&req.key()).is_dir();
            (req, build)
        });
        let rec = FunctionRecord {
            manifest: spec.manifest,
            description: spec.description,
            code_sha256,
            code_hex,
            code_size,
            last_modified_ms: 0,
            revision: 0,
            version: None,
            lambda: spec.lambda,
            layers: spec.layers.unwrap_or_default(),
            extras: Default::default(),
            deps: plan.as_ref().map(|(req, _)| req.key()),
            build: None,
        };
        if let Err(e) = extras::check_size(&reg, &rec) {
            reg.discard_code(&name);
            return Err(e);
        }
        let mut rec = reg.put(rec)?;
        let pending = match plan {
            Some((req, true)) => {
                let (b, status) = self.new_build(&name, req, code_dir, None);
                reg.set_build(&name, Some(status.clone()));
                rec.build = Some(status);
                Some(b)
            }
            _ => None,
        };
        drop(reg);
        if let Some(b) = pending {
            self.start_build(b)?;
        }
        self.inner.pools.retire(&name);
        tracing::info!(function = %name, runtime = %rec.manifest.runtime, sandbox = %rec.manifest.sandbox.as_str(), code = %rec.code_hex, "function created");
        Ok(rec)
    }

    /// Replaces a function's code (building its dependencies).
    pub fn update_code(&self, name: &str, zip: &[u8]) -> Result<FunctionRecord, ControlError> {
        self.update_code_with(name, zip, DepsMode::Build, None)
    }

    /// Replaces a function's code if its `RevisionId` is `revision_id` (when given; checked
    /// under the registry's lock, else `PreconditionFailed`), building its dependencies.
    pub fn update_code_if(
        &self,
        name: &str,
        zip: &[u8],
        revision_id: Option<&str>,
    ) -> Result<FunctionRecord, ControlError> {
        self.update_code_with(name, zip, DepsMode::Build, revision_id)
    }

    /// Replaces a function's code if its `RevisionId` is `revision_id` (when given). With
    /// requirement files whose layer is not built yet, the function keeps its current code
    /// (`LastUpdateStatus: InProgress`) until the build succeeds, and is returned at once.
    pub fn update_code_with(
        &self,
        name: &str,
        zip: &[u8],
        deps: DepsMode,
        revision_id: Option<&str>,
    ) -> Result<FunctionRecord, ControlError> {
        let reg = self.inner.registry.lock();
        let mut rec = reg
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        versions::check_revision(&rec, revision_id)?;
        let (b64, hex, size) = reg
            .install_code(name, zip)
            .inspect_err(|e| tracing::warn!(function = %name, "code package refused: {e}"))?;
        let code_dir = reg.dir_of_code(name, &hex);
        drop(reg);
        Self::check_warmup_event(&rec.manifest, &code_dir)?;
        let plan = self.plan_deps(&code_dir, &rec.manifest, &hex, deps)?;
        let mut reg = self.inner.registry.lock();
        // The record may have changed while the lock was released: check again.
        rec = reg
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        versions::check_revision(&rec, revision_id)?;
        let plan = plan.map(|(req, build)| {
            let build = build || !reg.deps_dir(&req.key()).is_dir();
            (req, build)
        });
        if let Some((req, true)) = plan {
            let mut next = rec.clone();
            (next.code_sha256, next.code_hex, next.code_size) = (b64, hex, size);
            extras::check_size(&reg, &next)?;
            let (b, status) = self.new_build(name, req, code_dir, Some((zip.to_vec(), next)));
            if !reg.set_build(name, Some(status.clone())) {
                return Err(ControlError::NotFound(name.into()));
            }
            drop(reg);
            rec.build = Some(status);
            self.start_build(b)?;
            tracing::info!(function = %name, "function code update waits for its dependency build");
            return Ok(rec);
        }
        (rec.code_sha256, rec.code_hex, rec.code_size) = (b64, hex, size);
        extras::check_size(&reg, &rec)?;
        rec.deps = plan.map(|(req, _)| req.key());
        rec.build = None;
        let rec = reg.put(rec)?;
        drop(reg);
        self.prune_layers();
        self.inner.pools.retire(name);
        tracing::info!(function = %name, revision = rec.revision, code = %rec.code_hex, "function code updated");
        Ok(rec)
    }

    /// Replaces a function's configuration (the name cannot change).
    pub fn update_config(&self, spec: FunctionSpec) -> Result<FunctionRecord, ControlError> {
        self.update_config_if(spec, None)
    }

    /// Replaces a function's configuration if its `RevisionId` is `revision_id` (when given;
    /// checked under the registry's lock, else `PreconditionFailed`).
    pub fn update_config_if(
        &self,
        spec: FunctionSpec,
        revision_id: Option<&str>,
    ) -> Result<FunctionRecord, ControlError> {
        Self::check_spec(&spec)?;
        let name = spec.manifest.name.clone();
        // A change of interpreter needs the dependency layer built by the new one.
        let before = self.get_function(&name)?;
        let interpreter = |m: &spore_core::FunctionManifest| {
            deps::interpreter_name(m.runtime, m.runtime_version())
        };
        let replan = if before.deps.is_some()
            && interpreter(&before.manifest) != interpreter(&spec.manifest)
        {
            let code_dir = self
                .inner
                .registry
                .lock()
                .dir_of_code(&name, &before.code_hex);
            let plan =
                self.plan_deps(&code_dir, &spec.manifest, &before.code_hex, DepsMode::Build)?;
            Some((plan, code_dir))
        } else {
            None
        };
        let mut reg = self.inner.registry.lock();
        let mut rec = reg
            .get(&name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.clone()))?;
        versions::check_revision(&rec, revision_id)?;
        if replan.is_some() && rec.code_hex != before.code_hex {
            return Err(ControlError::InUse(
                "The function's code changed during this update: try again".into(),
            ));
        }
        rec.manifest = spec.manifest;
        rec.description = spec.description;
        rec.lambda = spec.lambda;
        if let Some(l) = spec.layers {
            rec.layers = l;
        }
        extras::check_size(&reg, &rec)?;
        let mut pending = None;
        if let Some((plan, code_dir)) = replan {
            rec.deps = plan.as_ref().map(|(req, _)| req.key());
            if let Some((req, build)) = plan {
                if build || !reg.deps_dir(&req.key()).is_dir() {
                    // Pending until the new interpreter's layer is built.
                    let (b, status) = self.new_build(&name, req, code_dir, None);
                    rec.build = Some(status);
                    pending = Some(b);
                }
            }
        }
        let rec = reg.put(rec)?;
        if let Some(status) = pending.as_ref().and(rec.build.clone()) {
            reg.set_build(&name, Some(status));
        }
        drop(reg);
        if let Some(b) = pending {
            tracing::info!(function = %name, "the new runtime's dependency layer is being built");
            self.start_build(b)?;
        }
        self.inner.pools.retire(&name);
        self.inner.units.unplace(&name);
        tracing::info!(function = %name, revision = rec.revision, "function configuration updated");
        Ok(rec)
    }

    /// Deletes a function; its instances stop (busy ones when their invocation ends).
    /// Refused while a DAG uses it.
    pub fn delete_function(&self, name: &str) -> Result<FunctionRecord, ControlError> {
        self.delete_function_with(name, false).map(|(rec, _)| rec)
    }

    /// Deletes a function. A function that DAGs use is refused with their names unless
    /// `force`, which deletes it anyway and returns the DAGs it leaves broken (they stay
    /// deployed; their invocations fail until the function is deployed again).
    pub fn delete_function_with(
        &self,
        name: &str,
        force: bool,
    ) -> Result<(FunctionRecord, Vec<String>), ControlError> {
        let users: Vec<String> = self
            .inner
            .dags
            .list_dags()
            .into_iter()
            .filter(|d| d.nodes.iter().any(|n| n.function == name))
            .map(|d| d.name)
            .collect();
        if !users.is_empty() && !force && self.inner.registry.get(name).is_ok() {
            tracing::warn!(function = %name, dags = ?users, "delete refused: DAGs use the function");
            return Err(ControlError::InUse(format!(
                "Function {name} is used by DAG {}: delete {} first, or force the delete (spore rm --force), which leaves {} broken",
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" },
                if users.len() == 1 { "it" } else { "them" },
            )));
        }
        let versions = self.version_keys(name);
        let rec = self
            .inner
            .registry
            .lock()
            .remove(name)?
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        self.inner.pools.retire(name);
        self.inner.pools.snapshots().remove(name);
        self.inner.pools.forget_warmup(name);
        for key in &versions {
            self.inner.pools.retire(key);
            self.inner.pools.snapshots().remove(key);
            self.inner.pools.forget_warmup(key);
        }
        self.inner.pools.remove_log(name);
        self.inner.units.remove_on_units(name);
        self.prune_layers();
        if users.is_empty() {
            tracing::info!(function = %name, "function deleted");
        } else {
            tracing::warn!(function = %name, broken_dags = ?users, "function deleted; DAGs that use it are broken");
        }
        Ok((rec, users))
    }

    /// Every stored snapshot.
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        self.inner.pools.snapshots().list()
    }

    /// Removes a function's snapshots (the next init takes a new one if the function asks
    /// for snapshots); returns how many were removed.
    pub fn remove_snapshots(&self, name: &str) -> Result<usize, ControlError> {
        match self.inner.pools.snapshots().remove(name) {
            0 => Err(ControlError::NotFound(format!("snapshot of {name}"))),
            n => Ok(n),
        }
    }

    /// One function's record.
    pub fn get_function(&self, name: &str) -> Result<FunctionRecord, ControlError> {
        self.inner.registry.get(name)
    }

    /// All records.
    pub fn list_functions(&self) -> Vec<FunctionRecord> {
        self.inner.registry.list()
    }

    /// The last `n` log lines of a function.
    pub fn logs(&self, name: &str, n: usize) -> Result<Vec<String>, ControlError> {
        self.get_function(name)?;
        Ok(self.inner.pools.log(name).tail(n))
    }

    /// A function's log lines that `q` selects.
    pub fn log_lines(
        &self,
        name: &str,
        q: &spore_pool::logs::LogQuery,
    ) -> Result<Vec<spore_pool::logs::LogLine>, ControlError> {
        self.get_function(name)?;
        Ok(self.inner.pools.log(name).query(q))
    }

    /// A function's new log lines, from now on.
    pub fn follow_logs(
        &self,
        name: &str,
    ) -> Result<tokio::sync::broadcast::Receiver<spore_pool::logs::LogLine>, ControlError> {
        self.get_function(name)?;
        Ok(self.inner.pools.log(name).follow())
    }

    /// Number of idle and total instances of a function.
    pub fn instance_counts(&self, name: &str) -> (usize, u32) {
        self.inner.pools.instance_counts(name)
    }

    /// Host pids of a function's idle instances.
    pub fn instance_pids(&self, name: &str) -> Vec<i32> {
        self.inner.pools.instance_pids(name)
    }

    /// The last finished invocations, oldest first.
    pub fn recent_invocations(&self) -> Vec<RecentInvocation> {
        self.inner
            .recent
            .lock()
            .expect("recent lock")
            .iter()
            .cloned()
            .collect()
    }

    /// What each function holds on this unit now.
    pub fn function_stats(&self) -> Vec<spore_pool::FunctionStats> {
        self.inner.pools.stats()
    }

    /// Every process this unit runs for functions (instances, templates, spares), and each
    /// idle DAG pipeline (its DAG, instances, seconds idle).
    pub fn processes(&self) -> (Vec<spore_pool::ProcessInfo>, Vec<(String, usize, f64)>) {
        (
            self.inner.pools.processes(),
            self.inner.dags.pipelines_info(),
        )
    }

    /// Idle pre-wired DAG pipelines.
    pub fn idle_pipelines(&self) -> usize {
        self.inner.dags.idle_pipelines()
    }

    /// The last run of each DAG: its nodes' timing.
    pub fn last_dag_runs(&self) -> std::collections::BTreeMap<String, spore_dag::LastRun> {
        self.inner.dags.last_runs()
    }

    fn remember(&self, name: &str, inv: &Invocation) {
        let r = RecentInvocation {
            time_ms: spore_registry::store::now_unix_ms(),
            function: name.to_owned(),
            request_id: inv.request_id.clone(),
            start: inv.start.as_str(),
            duration_ms: inv.total_ms,
            init_ms: inv.init_ms,
            error: inv.outcome.as_ref().err().map(|e| e.error_type.clone()),
            unit: inv.unit,
        };
        let mut recent = self.inner.recent.lock().expect("recent lock");
        if recent.len() == RECENT_INVOCATIONS {
            recent.pop_front();
        }
        recent.push_back(r);
    }

    /// Sets the gauges of what the daemon holds now (instances by state, templates, spares,
    /// pipelines, units, work in flight, memory per function): called before each scrape.
    pub fn record_gauges(&self) {
        let stats = self.inner.pools.stats();
        for s in &stats {
            let f = s.name.clone();
            metrics::gauge!("spore_instances", "function" => f.clone(), "state" => "idle")
                .set(f64::from(s.idle));
            metrics::gauge!("spore_instances", "function" => f.clone(), "state" => "busy")
                .set(f64::from(s.total - s.idle));
            metrics::gauge!("spore_templates", "function" => f.clone())
                .set(f64::from(u8::from(s.template)));
            metrics::gauge!("spore_spares", "function" => f.clone())
                .set(f64::from(u8::from(s.spare)));
            metrics::gauge!("spore_idle_memory_bytes", "function" => f).set(s.memory_bytes as f64);
        }
        metrics::gauge!("spore_pipelines_idle").set(self.inner.dags.idle_pipelines() as f64);
        metrics::gauge!("spore_inflight").set(self.inner.work.inflight() as f64);
        let units = self.inner.units.statuses();
        for state in ["up", "down"] {
            let n = units.iter().filter(|u| u.state == state).count();
            metrics::gauge!("spore_units", "state" => state).set(n as f64);
        }
    }

    /// Host pids of a function's live template, if it has one.
    pub fn template_pids(&self, name: &str) -> Option<Vec<i32>> {
        self.inner.pools.template_pids(name)
    }

    /// Host pids and memory mode of a function's spare sandbox (built for its next
    /// restore), if it has one.
    pub fn spare(&self, name: &str) -> Option<(Vec<i32>, spore_core::MemoryMode)> {
        self.inner.pools.spare(name)
    }

    /// Stops the idle instances and the cfork template of `name` now, releasing their
    /// memory (an operator's `spore evict`, and benchmarks that measure what comes back):
    /// the next start restores from the function's snapshot if it has one. Busy instances
    /// are left to finish. Returns once they are gone.
    pub async fn evict(&self, name: &str) -> Result<Evicted, ControlError> {
        self.get_function(name)?;
        let restorable = self.inner.pools.restorable(name);
        let (instances, template) = self.inner.pools.evict(name).await;
        Ok(Evicted {
            instances,
            template,
            restorable,
        })
    }

    /// Starts the template of a cfork function in the background (after a deploy), so that
    /// its first invocation forks instead of waiting for the template.
    pub fn prewarm(&self, name: &str) {
        let Ok(rec) = self.get_function(name) else {
            return;
        };
        if rec.build.as_ref().is_some_and(|b| b.creating && !b.done) {
            return; // its dependencies are not built yet
        }
        // A function pinned to another unit is forked there, never here.
        if rec
            .manifest
            .unit
            .is_some_and(|u| u != self.inner.units.local().id)
        {
            return;
        }
        self.inner.pools.prewarm(rec);
    }

    /// Stops instances idle for longer than the keep-alive, and keeps provisioned
    /// concurrency's instances started; runs until the process ends.
    pub fn spawn_reaper(&self) {
        let keeper = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                if keeper.inner.work.is_draining() {
                    return;
                }
                keeper.keep_provisioned().await;
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.inner.pools.reap_interval());
            loop {
                tick.tick().await;
                if this.inner.work.is_draining() {
                    return;
                }
                this.inner.dags.reap(this.inner.pools.keep_alive());
                this.inner.pools.reap().await;
            }
        });
    }

    /// Stops taking invocations, waits up to `grace` for those in flight, then stops every
    /// instance and removes this daemon's cgroups.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.work.drain(grace).await;
        self.inner.dags.close_pipelines().await;
        self.inner.pools.shutdown().await;
    }

    // DAGs: the engine's API, as the gateway calls it.

    /// Runs a deployed DAG on `input` (JSON) and returns the sink's output.
    pub async fn invoke_dag(
        &self,
        name: &str,
        input: &[u8],
        opts: DagInvokeOptions,
    ) -> Result<DagRun, ControlError> {
        self.inner.dags.invoke_dag(name, input, opts).await
    }

    /// Deploys (creates or replaces) a DAG after checking it and that its functions exist.
    pub fn put_dag(
        &self,
        spec: spore_core::dag::DagSpec,
    ) -> Result<spore_core::dag::DagSpec, ControlError> {
        self.inner.dags.put_dag(spec)
    }

    /// A deployed DAG.
    pub fn get_dag(&self, name: &str) -> Result<spore_core::dag::DagSpec, ControlError> {
        self.inner.dags.get_dag(name)
    }

    /// All deployed DAGs, by name.
    pub fn list_dags(&self) -> Vec<spore_core::dag::DagSpec> {
        self.inner.dags.list_dags()
    }

    /// Removes a DAG (its functions stay).
    pub fn delete_dag(&self, name: &str) -> Result<spore_core::dag::DagSpec, ControlError> {
        self.inner.dags.delete_dag(name)
    }

    /// Where the gateway listens, for DAG hops over HTTP.
    pub fn set_gateway_url(&self, url: String) {
        self.inner.dags.set_gateway_url(url);
    }

    /// The key DAG hops over HTTP sign their calls to the gateway with.
    pub fn set_gateway_credentials(&self, creds: Option<spore_auth::Credentials>) {
        self.inner.dags.set_gateway_credentials(creds);
    }

    // Units: the cluster's API, as the gateway and the binary call it.

    /// Every unit and its state.
    pub fn unit_statuses(&self) -> Vec<UnitStatus> {
        self.inner.units.unit_statuses(self.load())
    }

    /// This unit's load.
    pub fn load(&self) -> spore_shim::UnitLoad {
        let (instances, templates) = self.inner.pools.totals();
        spore_shim::UnitLoad {
            inflight: self.inner.work.inflight() as u32,
            instances,
            templates,
            mem_available_mb: spore_shim::proto::meminfo_mb("MemAvailable"),
            neighbours: self.inner.dags.neighbours(),
        }
    }

    /// Joins the cluster in etcd as its control plane: announces `link` (the link listener's
    /// address) under a lease, reads back where functions were placed before a restart, and
    /// follows unit membership, until `stop` fires.
    pub async fn join_etcd(
        &self,
        client: spore_cluster::etcd::Etcd,
        link: String,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        self.inner.units.join_etcd(client, link, stop).await
    }

    /// Accepts shims' links and joins on `listener` (mutual TLS, `tls`) until the daemon
    /// stops; forgets units down for longer than `unit_grace`.
    pub async fn serve_links(
        &self,
        listener: tokio::net::TcpListener,
        tls: std::sync::Arc<spore_cluster::tls::ControlTls>,
        unit_grace: std::time::Duration,
    ) {
        self.inner
            .units
            .serve_links(hosts::unit_host(self), listener, tls, unit_grace)
            .await
    }

    /// Runs as a shim: takes neighbour links from other shims on `listener` and puts the DAG
    /// values they send on this unit's segments.
    pub async fn serve_neighbours(&self, listener: tokio::net::TcpListener) {
        self.inner
            .units
            .serve_neighbours(
                hosts::unit_host(self),
                self.inner.dags.segment_host(),
                listener,
            )
            .await
    }

    /// Measures the link to unit `id`: `n` echo calls of `bytes` each way, one at a time;
    /// returns each round trip in microseconds.
    pub async fn echo_unit(
        &self,
        id: u32,
        bytes: usize,
        n: usize,
    ) -> Result<Vec<f64>, ControlError> {
        self.inner.units.echo_unit(id, bytes, n).await
    }

    /// Runs this daemon as a unit's shim: dials the control plane at `control` (`HOST:PORT`),
    /// serves its calls, and dials again with backoff whenever the link drops, until
    /// `stop` fires.
    pub async fn run_shim(
        &self,
        control: Option<String>,
        etcd: Option<spore_cluster::etcd::Etcd>,
        creds: spore_cluster::ShimCredentials,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        self.inner
            .units
            .run_shim(
                hosts::unit_host(self),
                self.inner.dags.segment_host(),
                control,
                etcd,
                creds,
                stop,
            )
            .await
    }
}
