//! Instances and the ways they start: per-function warm pools, cfork templates, spare
//! sandboxes for restores, snapshots of warm runtimes, the keep-alive and the idle-memory
//! budget.
//!
//! [`Pools`] answers one question for the rest of the control plane: "give me a ready
//! instance of function F (revision R) here, by this start path" ([`Pools::checkout`]), and
//! takes it back afterwards ([`Pools::checkin`]). Behind it is the start-path ladder, fastest
//! first: a warm instance, a fork of the function's live cfork template, a restore from the
//! function's snapshot (into a spare sandbox built ahead when there is one), a start from
//! scratch (snapshotted for a `snapshot = true` function).
//!
//! It knows the registry (records and code directories) and the sandbox, runtime and snapshot
//! crates; it knows nothing of the gateway, DAGs or other processing units. The DAG engine
//! frees instances it holds in idle pipelines through the hook [`Pools::set_reclaim`].
#![forbid(unsafe_code)]

pub mod build;
pub mod host;
pub mod instance;
mod ladder;
pub mod logs;
mod reaper;
pub mod sandbox;
pub mod settle;
pub mod snapshots;
pub mod spare;
pub mod template;
pub mod warmup;
pub mod work;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use spore_core::{ControlError, MemoryMode, StartKind};
use spore_registry::{FunctionRecord, SharedRegistry};
use spore_sandbox::cgroup::Cgroup;
use tokio::sync::Notify;

pub use host::cgroup_parent_name;
pub use instance::{monotonic_ns, Instance, InvokeFailure, Reply};
pub use sandbox::{InstanceEnv, StartError};
pub use snapshots::{SnapshotInfo, Snapshots};
pub use spore_sandbox::egress::{
    attach as attach_egress, Egress, Lease as EgressLease, Subnet as EgressSubnet,
};
pub use work::{Work, WorkGuard};

use crate::logs::LogRing;
use crate::spare::Spare;
use crate::template::Template;

/// How the pools behave.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Default most instances per function.
    pub max_instances: u32,
    /// Idle instances older than this are stopped.
    pub keep_alive: Duration,
    /// Most live cfork templates (least recently used ones are stopped beyond it).
    pub max_templates: usize,
    /// How restores install memory unless a request says otherwise.
    pub snapshot_mode: MemoryMode,
    /// Most memory idle instances and templates may hold together, MiB (None: no limit
    /// beyond the keep-alive).
    pub idle_memory_mb: Option<u64>,
    /// Where functions' logs are persisted (None: in memory only).
    pub logs_dir: Option<std::path::PathBuf>,
}

/// What a [`Pools::checkout`] asks for.
#[derive(Debug, Clone, Default)]
pub struct Checkout {
    /// Start a fresh instance, bypassing the warm pool.
    pub force_cold: bool,
    /// With `force_cold`: how the fresh instance starts (`Cold`, `Restore`, `Fork`); None =
    /// the function's default.
    pub cold_path: Option<StartKind>,
    /// How a restore installs memory (None: the pools' `snapshot_mode`).
    pub restore_mode: Option<MemoryMode>,
    /// The invocation the caller runs next, pipelined behind a fork request or a spare
    /// sandbox's go-ahead when the instance starts that way (it then says it was sent); None:
    /// the caller sends its own. A fresh instance checked out with one counts as a first
    /// invocation in flight until it is back (see [`settle`]).
    pub first_invoke: Option<FirstInvoke>,
    /// Give up waiting for a free slot at this time (`TooManyRequests`).
    pub deadline: Option<Instant>,
}

/// An invocation a fresh instance gets with its start request (a cfork child's fork request,
/// a spare sandbox's go-ahead).
#[derive(Debug, Clone)]
pub struct FirstInvoke {
    /// Its request id.
    pub request_id: String,
    /// The event.
    pub payload: bytes::Bytes,
    /// The function's timeout, s.
    pub timeout_s: u32,
    /// The caller's client context (decoded `X-Amz-Client-Context`).
    pub client_context: Option<serde_json::Value>,
}

/// One process the pools run, as `spore ps` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessInfo {
    /// `instance`, `template` or `spare`.
    pub kind: &'static str,
    /// The function.
    pub function: String,
    /// Its id (the sandbox's hostname).
    pub id: String,
    /// Host pids of its processes.
    pub pids: Vec<i32>,
    /// How it started: `warm` is never shown, an instance keeps the start that made it.
    pub start: &'static str,
    /// `idle`, `busy`; a template `ready`; a spare `waiting`.
    pub state: &'static str,
    /// Seconds since it was ready.
    pub age_s: f64,
    /// Memory charged to its cgroup now (None: busy, or unknown).
    pub memory_bytes: Option<u64>,
}

impl ProcessInfo {
    /// An idle instance; its pids and memory are read now.
    fn idle(function: &str, i: &Instance) -> ProcessInfo {
        ProcessInfo {
            state: "idle",
            memory_bytes: i.memory_bytes(),
            ..ProcessInfo::instance(function, &i.id, i.started, i.created, i.cgroup.as_ref())
        }
    }

    /// A busy instance; its pids are read now.
    fn instance(
        function: &str,
        id: &str,
        start: StartKind,
        created: Instant,
        cgroup: Option<&Cgroup>,
    ) -> ProcessInfo {
        ProcessInfo {
            kind: "instance",
            function: function.to_owned(),
            id: id.to_owned(),
            pids: cgroup.map(Cgroup::pids).unwrap_or_default(),
            start: start.as_str(),
            state: "busy",
            age_s: created.elapsed().as_secs_f64(),
            memory_bytes: None,
        }
    }
}

/// An instance handed out by [`Pools::checkout`] and not back yet: what `processes` needs to
/// show it. Nothing is read from its cgroup until someone asks, so checkout stays free of
/// file I/O.
struct Busy {
    function: String,
    id: String,
    start: StartKind,
    created: Instant,
    cgroup: Option<Cgroup>,
    /// A fresh instance out for its first invocation (counted in `InstanceEnv::settle`).
    first: bool,
}

impl Busy {
    fn of(function: &str, i: &Instance, first: bool) -> Busy {
        Busy {
            function: function.to_owned(),
            id: i.id.clone(),
            start: i.started,
            created: i.created,
            cgroup: i.cgroup.clone(),
            first,
        }
    }
}

/// What one function holds on a unit.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FunctionStats {
    /// The function.
    pub name: String,
    /// Idle (warm) instances.
    pub idle: u32,
    /// Instances, idle or busy.
    pub total: u32,
    /// Whether it has a live cfork template.
    pub template: bool,
    /// Whether a spare sandbox waits for its next restore.
    pub spare: bool,
    /// Memory its idle instances and template hold, bytes (busy instances are counted by
    /// their invocations).
    pub memory_bytes: u64,
}

impl FunctionStats {
    fn new(name: &str) -> FunctionStats {
        FunctionStats {
            name: name.to_owned(),
            ..FunctionStats::default()
        }
    }
}

/// A ready instance, and how it started.
#[derive(Debug)]
pub struct Lease {
    /// The instance (give it back with [`Pools::checkin`]).
    pub instance: Instance,
    /// How it started (`Warm` if it came from the pool).
    pub start: StartKind,
}

#[derive(Debug, Default)]
struct PoolState {
    idle: Vec<Instance>,
    total: u32,
}

/// One function's instances: the idle ones, and how many exist (idle or busy).
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

/// Frees instances of a function held outside the pools (idle DAG pipelines).
type Reclaim = Box<dyn Fn(&str) + Send + Sync>;

struct Inner {
    cfg: PoolConfig,
    env: Result<Arc<InstanceEnv>, String>,
    registry: SharedRegistry,
    work: Arc<Work>,
    snapshots: Arc<Snapshots>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    logs: Mutex<HashMap<String, Arc<LogRing>>>,
    templates: Mutex<HashMap<String, Arc<Template>>>,
    /// One sandbox per function built ahead of its next restore (after a first restore).
    spares: Mutex<HashMap<String, Spare>>,
    /// Functions whose spare is being built (a burst of restores builds one, not one each).
    spares_building: Mutex<std::collections::HashSet<String>>,
    template_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    reclaim: OnceLock<Reclaim>,
    /// Instances handed out and not back yet, by id.
    busy: Mutex<HashMap<String, Busy>>,
}

/// Every function's instances, templates, spares and snapshots on this unit. Cheap to clone.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools").finish_non_exhaustive()
    }
}

impl Pools {
    /// Pools over `registry`'s functions; `env` is the host's sandbox settings (or why
    /// sandboxes cannot run here).
    pub fn new(
        cfg: PoolConfig,
        env: Result<Arc<InstanceEnv>, String>,
        registry: SharedRegistry,
        work: Arc<Work>,
        snapshots: Snapshots,
    ) -> Pools {
        Pools {
            inner: Arc::new(Inner {
                cfg,
                env,
                registry,
                work,
                snapshots: Arc::new(snapshots),
                pools: Mutex::new(HashMap::new()),
                logs: Mutex::new(HashMap::new()),
                templates: Mutex::new(HashMap::new()),
                spares: Mutex::new(HashMap::new()),
                spares_building: Mutex::new(std::collections::HashSet::new()),
                template_locks: Mutex::new(HashMap::new()),
                reclaim: OnceLock::new(),
                busy: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Records the modules a call of `rec` imported for the first time in its instance
    /// (automatic warm-up): later instances import them at start-up. When the list grows,
    /// the function's snapshot is retaken (a bounded number of times per revision), so that
    /// restores have them too.
    /// A call of a revision that is no longer current (redeployed, or deleted, perhaps
    /// created again under the same name) records nothing.
    /// `unimportable`: listed modules that failed to import at the instance's start, which
    /// the list drops (and does not take again for this revision).
    pub fn record_imports(
        &self,
        rec: &FunctionRecord,
        imported: &[String],
        unimportable: &[String],
    ) {
        if (imported.is_empty() && unimportable.is_empty()) || !rec.manifest.auto_warmup {
            return;
        }
        let Ok(env) = &self.inner.env else { return };
        let Some(w) = &env.warmups else { return };
        if !self.inner.registry.is_current(rec) {
            return;
        }
        let key = rec.key();
        match w.record(&key, &warmup::stamp(rec), imported, unimportable) {
            Ok(warmup::Recorded::Unchanged) => {}
            Ok(warmup::Recorded::Grew { retake_snapshot }) => {
                tracing::debug!(function = %key, modules = imported.len(), "automatic warm-up list grew");
                if retake_snapshot && rec.manifest.snapshot {
                    let removed = self.inner.snapshots.remove(&key);
                    if removed > 0 {
                        tracing::info!(function = %key, "snapshot retaken with the modules its calls import");
                    }
                }
            }
            Err(e) => tracing::warn!(function = %key, "{}", spore_core::error_chain(&e)),
        }
    }

    /// Forgets the automatic warm-up of `key` (a deleted function or version).
    pub fn forget_warmup(&self, key: &str) {
        if let Ok(env) = &self.inner.env {
            if let Some(w) = &env.warmups {
                w.remove(key);
            }
        }
    }

    /// Sets what frees a function's instances held outside the pools when its pool is full
    /// (set once; later calls are ignored).
    pub fn set_reclaim(&self, reclaim: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.inner.reclaim.set(Box::new(reclaim));
    }

    /// The host's sandbox settings, or `Unavailable` with why invocations cannot run here.
    pub fn env(&self) -> Result<Arc<InstanceEnv>, ControlError> {
        self.inner.env.clone().map_err(|why| {
            ControlError::Unavailable(format!("invocations are disabled on this host: {why}"))
        })
    }

    /// The snapshot store.
    pub fn snapshots(&self) -> &Snapshots {
        &self.inner.snapshots
    }

    /// The function's log (read back from its file the first time it is asked for).
    pub fn log(&self, name: &str) -> Arc<LogRing> {
        self.inner
            .logs
            .lock()
            .expect("logs lock")
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(match &self.inner.cfg.logs_dir {
                    Some(dir) => LogRing::open(dir.join(format!("{name}.jsonl"))),
                    None => LogRing::in_memory(),
                })
            })
            .clone()
    }

    /// Drops a deleted function's log, files included.
    pub fn remove_log(&self, name: &str) {
        let ring = self.inner.logs.lock().expect("logs lock").remove(name);
        match (ring, &self.inner.cfg.logs_dir) {
            (Some(ring), _) => ring.remove_files(),
            // Never read since start-up: only its files are left.
            (None, Some(dir)) => logs::remove_files_at(&dir.join(format!("{name}.jsonl"))),
            (None, None) => {}
        }
    }

    /// The most instances `rec` may run at once.
    pub fn max_instances(&self, rec: &FunctionRecord) -> u32 {
        rec.manifest
            .max_instances
            .unwrap_or(self.inner.cfg.max_instances)
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

    fn existing_pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.inner
            .pools
            .lock()
            .expect("pools lock")
            .get(name)
            .cloned()
    }

    fn pools_snapshot(&self) -> Vec<(String, Arc<Pool>)> {
        self.inner
            .pools
            .lock()
            .expect("pools lock")
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect()
    }

    /// A ready instance of `rec`: warm from the pool, else started fresh (the start-path
    /// ladder). The outer `Err` is a request the pools could not serve (no free slot before
    /// the deadline, sandboxes unavailable); the inner one a fresh start that failed (its slot
    /// is free again).
    pub async fn checkout(
        &self,
        rec: &FunctionRecord,
        how: Checkout,
    ) -> Result<Result<Lease, StartError>, ControlError> {
        let env = self.env()?;
        let name = &rec.key();
        let pool = self.pool(name);
        let max = self.max_instances(rec);
        let deadline = how.deadline.unwrap_or_else(|| {
            Instant::now()
                + Duration::from_secs(u64::from(rec.manifest.timeout_s))
                    .max(Duration::from_secs(10))
        });
        let slot = self
            .acquire(name, &pool, rec.revision, max, how.force_cold, deadline)
            .await?;
        // An invocation's fresh instance (not a DAG node's, held for a whole pipeline) counts
        // from before its start, so that what the start sets off in the background sees it.
        let first = matches!(slot, Slot::Cold) && how.first_invoke.is_some();
        if first {
            env.settle.begin();
        }
        let lease = match slot {
            Slot::Warm(inst) => Ok(Lease {
                instance: *inst,
                start: StartKind::Warm,
            }),
            Slot::Cold => match self
                .start_fresh(&env, rec, self.log(&rec.manifest.name), &how)
                .await
            {
                Ok((mut instance, start)) => {
                    instance.started = start;
                    Ok(Lease { instance, start })
                }
                Err(e) => {
                    Self::release_slot(&pool);
                    if first {
                        env.settle.end();
                    }
                    Err(e)
                }
            },
        };
        if let Ok(l) = &lease {
            let busy = Busy::of(name, &l.instance, first);
            self.inner
                .busy
                .lock()
                .expect("busy lock")
                .insert(l.instance.id.clone(), busy);
        }
        Ok(lease)
    }

    /// Gives an instance from [`Pools::checkout`] back: kept warm if `reusable` and still of
    /// the function's current revision, else stopped.
    pub fn checkin(&self, rec: &FunctionRecord, inst: Instance, reusable: bool) {
        self.unbusy(&inst.id);
        let name = &rec.key();
        let pool = self.pool(name);
        let max = self.max_instances(rec);
        let current = self.inner.registry.revision(name);
        self.release(&pool, inst, reusable && current == Some(rec.revision), max);
    }

    /// An instance from [`Pools::checkout`] was destroyed by its holder: frees its slot.
    pub fn forget(&self, name: &str, id: &str) {
        self.unbusy(id);
        Self::release_slot(&self.pool(name));
    }

    /// An instance handed out is back (or gone); a first invocation's ends the wait of
    /// background preparation for it.
    fn unbusy(&self, id: &str) {
        let gone = self.inner.busy.lock().expect("busy lock").remove(id);
        if let (Some(Busy { first: true, .. }), Ok(env)) = (gone, &self.inner.env) {
            env.settle.end();
        }
    }

    /// Every process this unit runs for functions: instances (idle and busy), templates and
    /// spare sandboxes, oldest first.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let mut out: Vec<ProcessInfo> = self
            .inner
            .busy
            .lock()
            .expect("busy lock")
            .values()
            .map(|b| {
                let cgroup = b.cgroup.as_ref();
                ProcessInfo::instance(&b.function, &b.id, b.start, b.created, cgroup)
            })
            .collect();
        for (name, pool) in self.pools_snapshot() {
            let st = pool.state.lock().expect("pool lock");
            out.extend(st.idle.iter().map(|i| ProcessInfo::idle(&name, i)));
        }
        let templates = self.template_list();
        for (name, t) in templates {
            out.push(ProcessInfo {
                kind: "template",
                function: name,
                id: t.id.clone(),
                pids: t.pids(),
                start: if t.restored { "restore" } else { "cold" },
                state: if t.is_alive() { "ready" } else { "dead" },
                age_s: t.created.elapsed().as_secs_f64(),
                memory_bytes: t.memory_bytes(),
            });
        }
        for (name, s) in self.inner.spares.lock().expect("spares lock").iter() {
            out.push(ProcessInfo {
                kind: "spare",
                function: name.clone(),
                id: String::new(),
                pids: s.pids(),
                start: "restore",
                state: "waiting",
                age_s: s.created.elapsed().as_secs_f64(),
                memory_bytes: None,
            });
        }
        out.sort_by(|a, b| b.age_s.total_cmp(&a.age_s));
        out
    }

    async fn acquire(
        &self,
        name: &str,
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
            // Instances held elsewhere (idle DAG pipelines) free their slots and notify.
            if let Some(reclaim) = self.inner.reclaim.get() {
                reclaim(name);
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(ControlError::TooManyRequests(max));
            }
        }
    }

    fn release_slot(pool: &Pool) {
        pool.state.lock().expect("pool lock").total -= 1;
        pool.notify.notify_one();
    }

    fn release(&self, pool: &Pool, inst: Instance, reusable: bool, max: u32) {
        let draining = self.inner.work.is_draining();
        let reject = {
            let mut st = pool.state.lock().expect("pool lock");
            if reusable && !draining && st.total <= max {
                st.idle.push(inst);
                None
            } else if reusable && !draining && !st.idle.is_empty() {
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

    /// Number of idle and total instances of a function.
    pub fn instance_counts(&self, name: &str) -> (usize, u32) {
        self.existing_pool(name).map_or((0, 0), |p| {
            let st = p.state.lock().expect("pool lock");
            (st.idle.len(), st.total)
        })
    }

    /// Host pids of a function's idle instances.
    pub fn instance_pids(&self, name: &str) -> Vec<i32> {
        self.existing_pool(name).map_or_else(Vec::new, |p| {
            let st = p.state.lock().expect("pool lock");
            st.idle.iter().flat_map(Instance::pids).collect()
        })
    }

    /// Instances of every function (idle or busy), and live templates: this unit's load.
    pub fn totals(&self) -> (u32, u32) {
        let mut instances = 0;
        for pool in self.inner.pools.lock().expect("pools lock").values() {
            instances += pool.state.lock().expect("pool lock").total;
        }
        let templates = self.inner.templates.lock().expect("templates lock").len() as u32;
        (instances, templates)
    }

    /// What each function holds on this unit now (for the metrics' gauges).
    pub fn stats(&self) -> Vec<FunctionStats> {
        let mut out: HashMap<String, FunctionStats> = HashMap::new();
        for (name, pool) in self.pools_snapshot() {
            let st = pool.state.lock().expect("pool lock");
            let e = out
                .entry(name.clone())
                .or_insert_with(|| FunctionStats::new(&name));
            e.idle = st.idle.len() as u32;
            e.total = st.total;
            e.memory_bytes += st
                .idle
                .iter()
                .filter_map(Instance::memory_bytes)
                .sum::<u64>();
        }
        let templates = self.template_list();
        for (name, t) in templates {
            let e = out
                .entry(name.clone())
                .or_insert_with(|| FunctionStats::new(&name));
            e.template = t.is_alive();
            e.memory_bytes += t.memory_bytes().unwrap_or(0);
        }
        for name in self.inner.spares.lock().expect("spares lock").keys() {
            out.entry(name.clone())
                .or_insert_with(|| FunctionStats::new(name))
                .spare = true;
        }
        let mut v: Vec<FunctionStats> = out.into_values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
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

    /// Host pids and memory mode of a function's spare sandbox (built for its next
    /// restore), if it has one.
    pub fn spare(&self, name: &str) -> Option<(Vec<i32>, spore_core::MemoryMode)> {
        self.inner
            .spares
            .lock()
            .expect("spares lock")
            .get(name)
            .map(|s| (s.pids(), s.mode()))
    }
}

fn spawn_destroy(instances: Vec<Instance>) {
    for inst in instances {
        tokio::spawn(inst.destroy());
    }
}
