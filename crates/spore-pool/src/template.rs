//! cfork templates: a warm, sandboxed runtime per function that has imported the handler and
//! forks a child into a fresh sandbox for each new instance.
//!
//! The template runs as root of its own user namespace (see `spore_sandbox::IdMapping`), so
//! that it can give each child new pid, mount, network, ipc and uts namespaces; the child then
//! empties its capability bounding set, drops to an unprivileged uid, adds the seccomp filter
//! that completes the template's and serves invocations on its own socket. The daemon sends each fork request with descriptors (`SCM_RIGHTS`): the child's
//! socket and the `cgroup.procs` files of a cgroup it made for the child.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spore_runtime::protocol::{self, FromRuntime, ToRuntime};
use spore_sandbox::IdMapping;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;

use spore_core::error_chain;
use spore_registry::FunctionRecord;

use crate::instance::{monotonic_ns, ChildState, Instance, Proc};
use crate::logs::LogRing;
use crate::sandbox::{
    create_cgroup, destroy_cgroup, first_frame, platform, read_frame, send_go, sendmsg_fds,
    spawn_sandbox, ColdStart, InstanceEnv, Launch, StartError,
};

/// What a template says when it refuses to fork because it has several threads.
const THREADED_TEMPLATE: &str = "forking a multi-threaded process is unsafe";
/// Ids mapped into each template's user namespace.
const IDS_PER_TEMPLATE: u32 = 65_536;
/// First host id of template user namespaces (above any ordinary account).
const HOST_ID_BASE: u32 = 1 << 24;
/// Uids of forked children (inside the template's namespace) start here.
const CHILD_UID_BASE: u32 = 1000;
/// Cgroups kept ready per template, so that a fork does not wait for one to be made.
const SPARE_CGROUPS: usize = 2;
/// Network namespaces a template keeps ready (made in quiet moments, ~0.25 MiB of kernel
/// memory each, charged to the template): a burst of this many starts waits for none. With
/// 4, a burst of 16 waited for 12 (`spore bench burst`: overhead p99 84 -> 52 ms at 16).
const NETNS_POOL: u32 = 16;
/// Memory charged to a template's cgroup per live child: its pooled network namespace
/// (~230 KiB of kernel memory) and the pages the template rewrote after forking it, whose old
/// copies only the child still maps. Measured with 1000 live `hello` children: 248 MiB of such
/// pages plus 88 MiB of kernel memory, ~335 KiB a child; this leaves twice that.
const CHILD_KIB: u32 = 768;

#[derive(Debug, Default)]
struct Shared {
    alive: AtomicBool,
    /// Set when the daemon stops the template (eviction, redeploy), as opposed to its dying.
    stopped: AtomicBool,
    children: Mutex<HashMap<String, Arc<ChildState>>>,
    /// (Egress functions) the template's descriptors of pooled network namespaces the daemon
    /// has given egress, ready for a fork.
    netns: Mutex<Vec<i32>>,
    /// Woken when one is added to `netns` (or the template dies).
    netns_added: tokio::sync::Notify,
    /// Starts waiting for an equipped namespace now (a burst): told to the template with
    /// each fork request, so that it makes more.
    netns_waiting: std::sync::atomic::AtomicU32,
}

/// What equipping a template's pooled network namespaces with egress needs.
struct Equip {
    egress: Arc<spore_sandbox::egress::Egress>,
    /// The sandbox's outer init: the runtime is its grandchild.
    init: u32,
}

/// The host pid of the process `depth` generations below `init` (each the first child).
fn descendant(init: u32, depth: u32) -> Option<u32> {
    let mut pid = init;
    for _ in 0..depth {
        pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
    }
    Some(pid)
}

/// How long an egress fork waits for an egress-ready namespace before it fails.
const NETNS_WAIT: Duration = Duration::from_secs(10);

/// A live template.
#[derive(Debug)]
pub struct Template {
    /// Template id.
    pub id: String,
    /// Registry revision of the function it holds.
    pub revision: u64,
    /// Time it took to start (sandbox, interpreter, imports or restore), ms.
    pub init_ms: f64,
    /// Whether it was restored from a snapshot (else it imported the handler).
    pub restored: bool,
    /// When it became ready.
    pub created: Instant,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    helper: tokio::sync::Mutex<tokio::process::Child>,
    cgroup: Mutex<Option<spore_sandbox::cgroup::Cgroup>>,
    shared: Arc<Shared>,
    last_used: Mutex<Instant>,
    memory_mb: u32,
    spares: Mutex<Vec<spore_sandbox::cgroup::Cgroup>>,
    /// The template's own processes: they pass through each child's cgroup at fork, and
    /// must never be killed or counted with it.
    own_pids: Vec<i32>,
    /// Whether its children get egress (from the pooled namespaces the daemon equips).
    egress: bool,
    /// The runtime's resident memory once ready, which every child maps.
    shared_bytes: u64,
    /// Modules it imported for the automatic warm-up (given at start or with a fork).
    preloaded: Mutex<std::collections::HashSet<String>>,
    /// A module the warm-up imported started a thread: it cannot fork any more.
    warmup_failed: AtomicBool,
    /// Its failure turned the warm-up off on suspicion (not for a thread): undone if a
    /// template without the list fails too.
    warmup_undoable: AtomicBool,
}

impl Template {
    /// Starts a template of `rec` and waits until it has imported the handler: from scratch
    /// (possibly snapshotting itself before it prepares anything for children), or restored
    /// from a snapshot. A template's memory is always installed whole (`full`): pages served
    /// lazily would be lost to the children it forks before they arrive (userfaultfd does not
    /// follow a fork into a child registered by nobody).
    pub async fn start(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        init_timeout: Duration,
        max_instances: u32,
        how: ColdStart,
    ) -> Result<Arc<Template>, StartError> {
        Self::spawn(env, rec, code_dir, log, max_instances, how, false)
            .await?
            .finish(env, rec, init_timeout)
            .await
    }

    /// Builds a template's sandbox and starts its runtime; with `spare` (a restore), leaves
    /// it waiting for the go-ahead with the image mapped ([`PendingTemplate::finish`]
    /// sends it).
    pub(crate) async fn spawn(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        max_instances: u32,
        how: ColdStart,
        spare: bool,
    ) -> Result<PendingTemplate, StartError> {
        let how = match how {
            ColdStart::Restore(image, _) => {
                ColdStart::Restore(image, spore_snapshot::restore::MemoryMode::Full)
            }
            other => other,
        };
        let t0 = Instant::now();
        let m = &rec.manifest;
        // The function's own limit, plus the namespaces its live children hold, plus slack.
        let memory_mb = m.memory_mb + 16 + (max_instances + NETNS_POOL) * CHILD_KIB / 1024;
        let seq = env.next_seq();
        let id = format!("{}-tpl-{}-{seq}", m.name, std::process::id());
        let programs =
            spore_sandbox::seccomp::filters_for(spore_sandbox::seccomp::Profile::TemplateChild)
                .map_err(|e| StartError::Platform(error_chain(&e)))?;
        let hex: Vec<String> = programs
            .iter()
            .map(|p| {
                spore_sandbox::seccomp::program_bytes(p)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            })
            .collect();
        let mut extra_env = vec![
            ("SPORE_MODE".to_owned(), "template".to_owned()),
            ("SPORE_CFORK_NETNS_POOL".to_owned(), NETNS_POOL.to_string()),
            (
                "SPORE_CFORK_SECCOMP".to_owned(),
                serde_json::to_string(&hex).expect("json"),
            ),
        ];
        // A restored template imported what its snapshot's init did; the rest comes with
        // the first fork.
        let preload = if matches!(how, ColdStart::Restore(..)) {
            Vec::new()
        } else {
            env.preload_for(rec)
        };
        if !preload.is_empty() {
            extra_env.push(("SPORE_PRELOAD".to_owned(), preload.join(",")));
        }
        // Operators (and the tests) can force the pure-Python child set-up.
        if std::env::var("SPORE_CFORK_NATIVE").as_deref() == Ok("0") {
            extra_env.push(("SPORE_CFORK_NATIVE".to_owned(), "0".to_owned()));
        }
        let mapping = IdMapping {
            host_base: HOST_ID_BASE + (seq % 2000) as u32 * IDS_PER_TEMPLATE,
            count: IDS_PER_TEMPLATE,
        };
        let launch = Launch {
            id: &id,
            code_dir,
            uid: 0,
            template: Some((mapping, extra_env)),
            how: how.clone(),
            spare: spare && matches!(how, ColdStart::Restore(..)),
        };
        let (cgroup, spawned) = spawn_sandbox(env, rec, launch, log.clone(), memory_mb, 2).await?;
        Ok(PendingTemplate {
            id,
            t0,
            how,
            cgroup,
            spawned,
            log,
            preload,
        })
    }
}

/// A template whose sandbox is built and whose runtime is starting (or, a spare, waiting
/// for the go-ahead to restore).
#[derive(Debug)]
pub(crate) struct PendingTemplate {
    id: String,
    t0: Instant,
    how: ColdStart,
    cgroup: spore_sandbox::cgroup::Cgroup,
    spawned: crate::sandbox::Spawned,
    log: Arc<LogRing>,
    preload: Vec<String>,
}

impl PendingTemplate {
    /// Host pids of its processes.
    pub fn pids(&self) -> Vec<i32> {
        self.cgroup.pids()
    }

    /// Stops it.
    pub async fn destroy(mut self) {
        let _ = self.spawned.child.start_kill();
        let _ = self.spawned.child.wait().await;
        destroy_cgroup(self.cgroup).await;
    }

    /// Waits (at most `init_timeout`) for the runtime to be ready, after sending a spare
    /// its go-ahead (its start then counts from there).
    pub async fn finish(
        self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        init_timeout: Duration,
    ) -> Result<Arc<Template>, StartError> {
        let mut this = self;
        if let Some(go) = this.spawned.go.take() {
            this.t0 = Instant::now();
            if let Err(e) = send_go(&mut this.spawned.sock, &go, init_timeout).await {
                this.destroy().await;
                return Err(e);
            }
        }
        let PendingTemplate {
            id,
            t0,
            how,
            cgroup,
            mut spawned,
            log,
            preload,
        } = this;
        let m = &rec.manifest;
        let restored = matches!(how, ColdStart::Restore(..));
        let deadline = tokio::time::Instant::now() + init_timeout;
        let mut breakdown = Vec::new();
        // The runtime is the only child of the template's pid-namespace init, itself the only
        // child of the sandbox's outer init.
        let runtime = spawned.child.id().map(|pid| (pid, 2));
        let first = first_frame(
            &mut spawned.sock,
            deadline,
            &how,
            runtime,
            &m.name,
            &mut breakdown,
        )
        .await;
        let (reader, writer) = spawned.sock.into_split();
        let mut helper = spawned.child;
        let failure = match first {
            Ok(Ok(Some((FromRuntime::Ready { logs, .. }, _)))) => {
                // The template's import output: once, before its first child's START.
                if !logs.is_empty() {
                    log.push_text(&logs);
                }
                None
            }
            Ok(Ok(Some((FromRuntime::InitError { error }, _)))) => Some(StartError::Init(error)),
            Ok(Ok(Some((other, _)))) => Some(StartError::Platform(format!(
                "template sent {other:?} before ready"
            ))),
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = tokio::time::timeout(Duration::from_secs(2), helper.wait()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let tail: Vec<String> = spawned
                    .stderr_tail
                    .lock()
                    .expect("tail")
                    .iter()
                    .cloned()
                    .collect();
                Some(StartError::Platform(format!(
                    "the cfork template exited during {} ({status:?}): {}",
                    if restored { "its restore" } else { "init" },
                    tail.join(" | ")
                )))
            }
            Err(_) => Some(StartError::Init(spore_core::FunctionError::platform(
                "Sandbox.Timedout",
                format!(
                    "Init timed out after {:.2} seconds",
                    init_timeout.as_secs_f64()
                ),
            ))),
        };
        if let Some(err) = failure {
            let _ = helper.start_kill();
            destroy_cgroup(cgroup).await;
            let _ = helper.wait().await;
            return Err(err);
        }
        let own_pids = cgroup.pids();
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            ..Shared::default()
        });
        if let Some((_, ms)) = breakdown.first() {
            tracing::info!(function = %m.name, "cfork template snapshot: {ms:.1} ms");
        }
        // The runtime's resident set (VmRSS) once ready: what a child shares with it.
        let shared_bytes = helper
            .id()
            .and_then(|init| descendant(init, 2))
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/statm")).ok())
            .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| {
                let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                    .ok()
                    .flatten()
                    .unwrap_or(4096);
                pages * page as u64
            });
        let egress = env.network_of(m) == spore_core::Network::Egress;
        let equip = match (egress, &env.egress, helper.id()) {
            (true, Ok(e), Some(init)) => Some(Equip {
                egress: e.clone(),
                init,
            }),
            _ => None,
        };
        tokio::spawn(read_reports(reader, shared.clone(), id.clone(), equip));
        Ok(Arc::new(Template {
            id,
            revision: rec.revision,
            init_ms: t0.elapsed().as_secs_f64() * 1000.0,
            restored,
            created: Instant::now(),
            writer: tokio::sync::Mutex::new(writer),
            helper: tokio::sync::Mutex::new(helper),
            cgroup: Mutex::new(Some(cgroup)),
            shared,
            last_used: Mutex::new(Instant::now()),
            memory_mb: m.memory_mb,
            spares: Mutex::new(Vec::new()),
            own_pids,
            egress,
            shared_bytes,
            preloaded: Mutex::new(preload.into_iter().collect()),
            warmup_failed: AtomicBool::new(false),
            warmup_undoable: AtomicBool::new(false),
        }))
    }
}

impl Template {
    /// Makes cgroups for the next forks, up to [`SPARE_CGROUPS`], in the background.
    pub fn refill_spares(self: &Arc<Self>, env: &Arc<InstanceEnv>) {
        let left = self.spares.lock().expect("spares").len();
        let missing = SPARE_CGROUPS.saturating_sub(left);
        for _ in 0..missing {
            let (this, env) = (self.clone(), env.clone());
            tokio::spawn(async move {
                // While one is left, made once the forks in flight have answered (see
                // `settle`); with none left, the next fork would make its own: made now.
                if left > 0 {
                    env.settle.settled().await;
                }
                let name = format!("{}-c{}", this.id, env.next_seq());
                match create_cgroup(&env, &name, this.memory_mb, 0).await {
                    Ok(cg) if this.is_alive() => {
                        // Refills that overlapped (a burst) make no more than the pool holds.
                        let extra = {
                            let mut spares = this.spares.lock().expect("spares");
                            if spares.len() < SPARE_CGROUPS {
                                spares.push(cg);
                                None
                            } else {
                                Some(cg)
                            }
                        };
                        if let Some(cg) = extra {
                            destroy_cgroup(cg).await;
                        }
                    }
                    Ok(cg) => destroy_cgroup(cg).await,
                    Err(e) => tracing::warn!("preparing a cgroup for cfork: {e}"),
                }
            });
        }
    }

    /// Whether the daemon stopped it (a fork that raced with that can go to a new one).
    pub fn was_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Whether a module its automatic warm-up imported started a thread (it was stopped).
    pub fn warmup_failed(&self) -> bool {
        self.warmup_failed.load(Ordering::Acquire)
    }

    /// Whether its failure turned the warm-up off on suspicion only (see `warmup_undoable`).
    pub fn warmup_undoable(&self) -> bool {
        self.warmup_undoable.load(Ordering::Acquire)
    }

    /// Whether the template still answers.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Memory its cgroup holds (the template alone: children have their own groups).
    pub fn memory_bytes(&self) -> Option<u64> {
        self.cgroup
            .lock()
            .expect("template cgroup")
            .as_ref()
            .and_then(spore_sandbox::cgroup::Cgroup::memory_current)
    }

    /// When it last forked.
    pub fn last_used(&self) -> Instant {
        *self.last_used.lock().expect("last used")
    }

    /// Host pids of the template's processes (helper, outer init, runtime), for diagnostics.
    pub fn pids(&self) -> Vec<i32> {
        let guard = self.cgroup.lock().expect("template cgroup");
        let Some(cg) = guard.as_ref() else {
            return Vec::new();
        };
        let mut pids: Vec<i32> = cg
            .procs_files()
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Forks a new instance of `rec` into a sandbox of its own.
    pub async fn fork(
        self: &Arc<Self>,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        ready_timeout: Duration,
        first_invoke: Option<Vec<u8>>,
    ) -> Result<Instance, StartError> {
        let t0 = Instant::now();
        if !self.is_alive() {
            return Err(StartError::Platform("the cfork template is gone".into()));
        }
        *self.last_used.lock().expect("last used") = Instant::now();
        let m = &rec.manifest;
        let seq = env.next_seq();
        let id = format!("{}-{}-{seq}", m.name, std::process::id());
        let spare = self.spares.lock().expect("spares").pop();
        let mut cgroup = match spare {
            Some(cg) => cg,
            None => create_cgroup(env, &id, m.memory_mb, 0).await?,
        };
        cgroup.spare(&self.own_pids);
        let mut fds: Vec<OwnedFd> = Vec::new();
        let own = self
            .cgroup
            .lock()
            .expect("template cgroup")
            .as_ref()
            .map(|c| c.self_attach_files())
            .unwrap_or_default();
        let child_files = cgroup.self_attach_files();
        let sets = child_files.len() as u32;
        if own.len() != child_files.len() {
            destroy_cgroup(cgroup).await;
            return Err(StartError::Platform(
                "the cfork template is being stopped".into(),
            ));
        }
        for file in child_files.into_iter().chain(own) {
            match std::fs::OpenOptions::new().write(true).open(&file) {
                Ok(f) => fds.push(f.into()),
                Err(e) => {
                    destroy_cgroup(cgroup).await;
                    return Err(StartError::Platform(format!(
                        "opening {}: {e}",
                        file.display()
                    )));
                }
            }
        }
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                destroy_cgroup(cgroup).await;
                return Err(platform("socketpair")(e));
            }
        };
        fds.insert(0, theirs.into());
        let state = Arc::new(ChildState::default());
        self.shared
            .children
            .lock()
            .expect("children")
            .insert(id.clone(), state.clone());
        let waited = Instant::now();
        let netns = if self.egress {
            match self.take_netns().await {
                Ok(fd) => Some(fd),
                Err(why) => {
                    self.shared.children.lock().expect("children").remove(&id);
                    destroy_cgroup(cgroup).await;
                    return Err(StartError::Platform(why));
                }
            }
        } else {
            None
        };
        // Time spent waiting for an egress-ready namespace (none were equipped yet).
        let netns_wait_ms = waited.elapsed().as_secs_f64() * 1000.0;
        // What the function's calls imported since this template started: imported before
        // this fork, once.
        let preload: Vec<String> = {
            let mut done = self.preloaded.lock().expect("preloaded");
            env.preload_for(rec)
                .into_iter()
                .filter(|m| done.insert(m.clone()))
                .collect()
        };
        let frame = protocol::encode(
            &ToRuntime::Fork {
                cgroups: sets,
                id: id.clone(),
                uid: CHILD_UID_BASE + (seq % 60_000) as u32,
                tmp_mb: env.tmp_mb,
                netns,
                netns_waiting: self.shared.netns_waiting.load(Ordering::Relaxed),
                preload: preload.clone(),
            },
            b"",
        );
        let sent_ns = monotonic_ns();
        let sent = {
            let mut w = self.writer.lock().await;
            send_with_fds(&mut w, &frame, &fds).await
        };
        drop(fds);
        // The first invocation goes right behind the fork request: the child reads it as soon
        // as it is set up, without a round trip through the daemon. Only small frames, which
        // fit in the new socket's buffer, so that this write cannot block.
        let pipelined = first_invoke.filter(|f| f.len() <= crate::instance::PIPELINED_MAX);
        let mut invoke_sent = false;
        let sent = sent.and_then(|()| match &pipelined {
            Some(frame) => match std::io::Write::write_all(&mut &ours, frame) {
                Ok(()) => {
                    invoke_sent = true;
                    Ok(())
                }
                // The template refused the fork and closed the child's end already (a
                // threaded template): its answer, read next, says why; a child that does
                // come up gets its first invocation from the caller.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                Err(e) => Err(e),
            },
            None => Ok(()),
        });
        let result = match sent {
            Err(e) => Err(format!("sending the fork request: {e}")),
            // The template imports the warm-up's modules before it forks, within its budget.
            Ok(()) if !preload.is_empty() => {
                let more = crate::warmup::preload_budget(m);
                self.await_child(ours, &state, ready_timeout + more).await
            }
            Ok(()) => self.await_child(ours, &state, ready_timeout).await,
        };
        // Refilled now that the child has attached: making a cgroup while another process
        // attaches to one contends on the kernel's cgroup locks (measured: 5-18 ms stalls).
        self.refill_spares(env);
        match result {
            Ok((sock, phases)) => {
                let ready_ns = monotonic_ns();
                Ok(Instance {
                    id,
                    revision: rec.revision,
                    init_ms: t0.elapsed().as_secs_f64() * 1000.0,
                    breakdown: {
                        let mut b = breakdown(sent_ns, &phases, ready_ns);
                        if netns_wait_ms >= 0.05 {
                            b.insert(0, ("netns_wait".to_owned(), netns_wait_ms));
                        }
                        b
                    },
                    last_used: Instant::now(),
                    created: Instant::now(),
                    started: spore_core::StartKind::Cold,
                    proc: Proc::Forked(state),
                    sock,
                    cgroup: Some(cgroup),
                    memory_mb: m.memory_mb,
                    stderr_tail: Arc::default(),
                    invoke_sent,
                    shared_bytes: self.shared_bytes,
                    init_logs: String::new(),
                    streamed: String::new(),
                    helpers: 0,
                })
            }
            Err(why) => {
                self.shared.children.lock().expect("children").remove(&id);
                destroy_cgroup(cgroup).await;
                let threaded = why.contains(THREADED_TEMPLATE);
                let thread_from_list =
                    threaded && !self.preloaded.lock().expect("preloaded").is_empty();
                // The new modules are suspect only if importing them could be what failed:
                // the template died, hung past the wait, or could not be written to. (Its
                // death reaches `alive` through its own socket, which may lag this one.)
                if !preload.is_empty() && !threaded {
                    for _ in 0..20 {
                        if !self.is_alive() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                let list_suspect = !preload.is_empty()
                    && (!self.is_alive()
                        || why.contains("was not ready within")
                        || why.starts_with("sending the fork request"));
                if thread_from_list || list_suspect {
                    // The warm-up's modules are suspect (one started a thread, or importing
                    // them before this fork failed, hung or killed the template): off for
                    // this revision, and this template goes. The next one imports nothing
                    // extra; if its fork fails too, the caller turns the warm-up back on.
                    if let Some(w) = &env.warmups {
                        let stamp = crate::warmup::stamp(rec);
                        match w.turn_off(&rec.key(), &stamp, &why) {
                            Ok(turned) => self
                                .warmup_undoable
                                .store(turned && !thread_from_list, Ordering::Release),
                            Err(e) => tracing::warn!(function = %m.name, "{}", error_chain(&e)),
                        }
                    }
                    tracing::warn!(function = %m.name, "automatic warm-up turned off for this revision: {why}");
                    self.warmup_failed.store(true, Ordering::Release);
                    self.shared.alive.store(false, Ordering::Release);
                    return Err(StartError::Platform(format!(
                        "{why} (while the cfork template imported the modules the function's \
                         calls import, for the automatic warm-up: the warm-up is now off for \
                         this revision of the function, and its template is recreated for the \
                         next invocation; set auto_warmup = false to keep it off)"
                    )));
                }
                if threaded {
                    // The function's code (a library it imports) started threads: its error,
                    // not the platform's.
                    return Err(StartError::Init(spore_core::FunctionError::platform(
                        "Runtime.InitError",
                        why,
                    )));
                }
                let reason = if self.is_alive() {
                    why
                } else {
                    format!("the cfork template died during the fork ({why}); it is recreated for the next invocation")
                };
                Err(StartError::Platform(reason))
            }
        }
    }

    /// An egress-ready pooled network namespace (the template's descriptor), waiting up to
    /// [`NETNS_WAIT`] for the daemon to finish equipping one.
    async fn take_netns(&self) -> Result<i32, String> {
        let deadline = tokio::time::Instant::now() + NETNS_WAIT;
        if let Some(fd) = self.shared.netns.lock().expect("netns").pop() {
            return Ok(fd);
        }
        // Counted while waiting: later fork requests tell the template how many wait.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicU32);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.shared.netns_waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.shared.netns_waiting);
        loop {
            let added = self.shared.netns_added.notified();
            if let Some(fd) = self.shared.netns.lock().expect("netns").pop() {
                return Ok(fd);
            }
            if !self.is_alive() {
                return Err("the cfork template is gone".into());
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return Err(format!(
                    "no network namespace with egress was ready within {NETNS_WAIT:?} (see the daemon's log)"
                ));
            }
        }
    }

    async fn await_child(
        &self,
        ours: std::os::unix::net::UnixStream,
        state: &ChildState,
        timeout: Duration,
    ) -> Result<(UnixStream, Vec<(String, u64)>), String> {
        ours.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut sock = UnixStream::from_std(ours).map_err(|e| e.to_string())?;
        match tokio::time::timeout(timeout, read_frame(&mut sock)).await {
            Ok(Ok(Some((FromRuntime::Ready { phases, .. }, _)))) => Ok((sock, phases)),
            Ok(Ok(Some((other, _)))) => Err(format!("the child sent {other:?} before ready")),
            Ok(Ok(None)) | Ok(Err(_)) => {
                // The child (or the template, before forking) closed the socket: say why.
                let _ = state.wait_exit(Duration::from_millis(200)).await;
                let error = state.error.lock().expect("child state").clone();
                let exit = *state.exit.lock().expect("child state");
                Err(match (error, exit) {
                    (Some(e), _) => format!("the template refused the fork: {e}"),
                    (None, Some(code)) => {
                        format!("the forked child exited during set-up with status {code}")
                    }
                    (None, None) => "the forked child closed its socket during set-up".into(),
                })
            }
            Err(_) => Err(format!("the forked child was not ready within {timeout:?}")),
        }
    }

    /// Stops the template (its running children are not affected: they live in their own
    /// cgroups and are stopped with their instances).
    pub async fn destroy(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.alive.store(false, Ordering::Release);
        let mut helper = self.helper.lock().await;
        if let Ok(Some(status)) = helper.try_wait() {
            tracing::warn!("cfork template {} had exited by itself: {status}", self.id);
        }
        let _ = helper.start_kill();
        let cg = self.cgroup.lock().expect("template cgroup").take();
        if let Some(cg) = cg {
            destroy_cgroup(cg).await;
        }
        let spares: Vec<_> = self.spares.lock().expect("spares").drain(..).collect();
        for cg in spares {
            destroy_cgroup(cg).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), helper.wait()).await;
    }
}

/// Milliseconds per start-up step from the child's `CLOCK_MONOTONIC` marks.
fn breakdown(sent_ns: u64, phases: &[(String, u64)], ready_ns: u64) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut prev = ("request", sent_ns);
    for (name, t) in phases {
        let label = match prev.0 {
            "request" => "request",
            _ => name.as_str(),
        };
        out.push((label.to_owned(), t.saturating_sub(prev.1) as f64 / 1e6));
        prev = (name.as_str(), *t);
    }
    out.push((
        "response".to_owned(),
        ready_ns.saturating_sub(prev.1) as f64 / 1e6,
    ));
    out
}

/// Sends `frame` with `fds` attached to its first byte.
async fn send_with_fds(
    w: &mut OwnedWriteHalf,
    frame: &[u8],
    fds: &[OwnedFd],
) -> std::io::Result<()> {
    let sent = sendmsg_fds(w.as_ref(), frame, fds).await?;
    if sent < frame.len() {
        w.write_all(&frame[sent..]).await?;
    }
    Ok(())
}

/// Reads the template's reports (child exits, refused forks) until it closes its socket.
async fn read_reports(
    mut reader: tokio::net::unix::OwnedReadHalf,
    shared: Arc<Shared>,
    id: String,
    equip: Option<Equip>,
) {
    let equip = equip.map(Arc::new);
    loop {
        match read_frame(&mut reader).await {
            Ok(Some((FromRuntime::Netns { fd }, _))) => {
                let Some(equip) = equip.clone() else {
                    tracing::warn!(
                        "cfork template {id} offered a network namespace nobody asked for"
                    );
                    continue;
                };
                let (shared, id) = (shared.clone(), id.clone());
                // Off the reader: a veth pair and its addresses take a few milliseconds.
                tokio::task::spawn_blocking(move || {
                    let done = descendant(equip.init, 2)
                        .ok_or_else(|| "the template's runtime process is gone".to_owned())
                        .and_then(|runtime| {
                            let lease = equip.egress.lease().map_err(|e| error_chain(&e))?;
                            spore_sandbox::egress::attach(
                                &lease,
                                &format!("/proc/{runtime}/fd/{fd}"),
                            )
                            .map_err(|e| error_chain(&e))
                        });
                    match done {
                        Ok(()) => {
                            shared.netns.lock().expect("netns").push(fd);
                            shared.netns_added.notify_waiters();
                        }
                        Err(e) => tracing::warn!(
                            "cfork template {id}: giving a pooled network namespace egress: {e}"
                        ),
                    }
                });
            }
            Ok(Some((FromRuntime::Exit { id, code }, _))) => {
                let state = shared.children.lock().expect("children").remove(&id);
                if let Some(s) = state {
                    *s.exit.lock().expect("child state") = Some(code);
                    s.changed.notify_waiters();
                }
            }
            Ok(Some((FromRuntime::ForkError { id, error }, _))) => {
                let state = shared.children.lock().expect("children").get(&id).cloned();
                if let Some(s) = state {
                    *s.error.lock().expect("child state") = Some(error);
                    s.changed.notify_waiters();
                }
            }
            Ok(Some((other, _))) => tracing::warn!("cfork template sent an unexpected {other:?}"),
            Ok(None) => {
                if shared.stopped.load(Ordering::Acquire) {
                    tracing::debug!("cfork template {id} closed its control socket");
                } else {
                    tracing::warn!("cfork template {id} closed its control socket");
                }
                break;
            }
            Err(e) => {
                tracing::warn!("cfork template {id}: unreadable report ({e}); treating it as gone");
                break;
            }
        }
    }
    shared.alive.store(false, Ordering::Release);
    shared.netns_added.notify_waiters();
    let children: Vec<Arc<ChildState>> = shared
        .children
        .lock()
        .expect("children")
        .values()
        .cloned()
        .collect();
    for c in children {
        c.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakdown_steps() {
        let phases = vec![
            ("fork".to_owned(), 1_100_000),
            ("forked".to_owned(), 1_600_000),
            ("ready".to_owned(), 2_000_000),
        ];
        let b = breakdown(1_000_000, &phases, 2_500_000);
        let names: Vec<&str> = b.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["request", "forked", "ready", "response"]);
        let total: f64 = b.iter().map(|(_, v)| v).sum();
        assert!((total - 1.5).abs() < 1e-9);
    }
}
