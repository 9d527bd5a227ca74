//! One function instance: a sandboxed runtime process and its control socket.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spore_core::FunctionError;
use spore_runtime::protocol::{self, FramePrefix, FromRuntime, ToRuntime, PREFIX_LEN};
use spore_runtime::RuntimeLaunch;
use spore_sandbox::cgroup::{Cgroup, Layout, Limits};
use spore_sandbox::{BindMount, SandboxSpec};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::logs::LogRing;
use crate::registry::FunctionRecord;

/// Host-wide settings every instance of a daemon shares.
#[derive(Debug)]
pub struct InstanceEnv {
    /// The Spore binary (re-executed as the sandbox init).
    pub exe: PathBuf,
    /// The host's cgroup layout.
    pub layout: Layout,
    /// Parent cgroup of this daemon's sandboxes.
    pub cgroup_parent: String,
    /// Empty directory the rootfs is built on.
    pub rootfs: PathBuf,
    /// Host directory holding the Python bootstrap.
    pub runtime_dir: PathBuf,
    /// Shared read-only Python packages, if present.
    pub packages_dir: Option<PathBuf>,
    /// CPU quota per instance, thousandths of a CPU.
    pub cpu_millis: u32,
    /// Process limit per instance.
    pub pids_max: u32,
    /// Size cap of `/tmp`, MiB.
    pub tmp_mb: u32,
    /// First uid of the range sandboxes run as (each instance gets its own).
    pub uid_base: u32,
    seq: AtomicU64,
}

impl InstanceEnv {
    /// Settings with the default limits.
    pub fn new(
        exe: PathBuf,
        layout: Layout,
        cgroup_parent: String,
        rootfs: PathBuf,
        runtime_dir: PathBuf,
        packages_dir: Option<PathBuf>,
    ) -> InstanceEnv {
        InstanceEnv {
            exe,
            layout,
            cgroup_parent,
            rootfs,
            runtime_dir,
            packages_dir,
            cpu_millis: 1000,
            pids_max: 64,
            tmp_mb: 64,
            uid_base: 200_000,
            seq: AtomicU64::new(1),
        }
    }

    /// A number unique within this daemon (instance ids, uids).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }
}

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The platform failed (cgroups, spawn, sandbox setup): not the function's fault.
    #[error("Could not start a sandbox: {0}")]
    Platform(String),
    /// The function's init failed (import error, crash during import).
    #[error("Function init failed: {0}")]
    Init(FunctionError),
}

/// Why an invocation did not produce a result.
#[derive(Debug, Clone, PartialEq)]
pub enum InvokeFailure {
    /// The deadline passed; the sandbox was killed.
    Timeout {
        /// The function's timeout.
        seconds: u32,
    },
    /// The memory cgroup's OOM killer ended the runtime.
    OutOfMemory {
        /// The limit, MiB.
        limit_mb: u32,
    },
    /// The runtime exited or broke the protocol.
    Exited {
        /// What is known (exit status, last stderr lines).
        detail: String,
    },
}

impl InvokeFailure {
    /// The failure as Lambda reports it to the caller.
    pub fn to_function_error(&self) -> FunctionError {
        match self {
            InvokeFailure::Timeout { seconds } => FunctionError::platform(
                "Sandbox.Timedout",
                format!("Task timed out after {seconds}.00 seconds"),
            ),
            InvokeFailure::OutOfMemory { limit_mb } => FunctionError::platform(
                "Runtime.OutOfMemory",
                format!("Runtime exited: the function exceeded its memory limit of {limit_mb} MB and was killed"),
            ),
            InvokeFailure::Exited { detail } => FunctionError::platform(
                "Runtime.ExitError",
                format!("Runtime exited with error: {detail}"),
            ),
        }
    }
}

/// What one invocation returned.
#[derive(Debug)]
pub struct Reply {
    /// The result JSON, or the function's error.
    pub outcome: Result<Vec<u8>, FunctionError>,
    /// Time the handler ran, as the runtime measured it, ms.
    pub handler_ms: f64,
    /// What the handler printed.
    pub logs: String,
    /// `CLOCK_MONOTONIC` nanoseconds when the handler was called (0: unknown).
    pub handler_start_ns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the handler returned (0: unknown).
    pub handler_end_ns: u64,
    /// (DAG nodes) the runtime's report.
    pub dag: Option<protocol::DagReport>,
}

/// The frame of one invocation.
pub(crate) fn invoke_frame(request_id: &str, payload: &[u8], timeout_s: u32) -> Vec<u8> {
    let deadline_ms = crate::store::now_unix_ms() + u64::from(timeout_s) * 1000;
    protocol::encode(
        &ToRuntime::Invoke {
            request_id: request_id.to_owned(),
            deadline_ms,
            dag: None,
        },
        payload,
    )
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock the runtimes stamp their steps with).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// How an instance's process came to be, which decides how its exit is observed.
#[derive(Debug)]
pub(crate) enum Proc {
    /// A sandbox of its own, started through the sandbox init (a child of the daemon).
    Spawned(Child),
    /// Forked from a cfork template, which reaps it and reports its exit.
    Forked(Arc<crate::template::ChildState>),
}

/// A live instance.
#[derive(Debug)]
pub struct Instance {
    /// Unique id (also the sandbox hostname).
    pub id: String,
    /// Registry revision of the function it runs.
    pub revision: u64,
    /// Time from spawn (or fork request) to `ready`, ms.
    pub init_ms: f64,
    /// Where the start-up time went (cfork: per step, ms), in order.
    pub breakdown: Vec<(String, f64)>,
    /// Last time it finished an invocation (or started).
    pub last_used: Instant,
    pub(crate) proc: Proc,
    pub(crate) sock: UnixStream,
    pub(crate) cgroup: Option<Cgroup>,
    pub(crate) memory_mb: u32,
    pub(crate) stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The first invocation's frame was sent already (pipelined behind a fork request).
    pub(crate) invoke_sent: bool,
    /// Spore helper processes in the instance's cgroup besides its init (a lazy restore's
    /// fault server).
    pub(crate) helpers: usize,
}

/// The parts of a freshly spawned sandbox.
pub(crate) struct Spawned {
    pub child: Child,
    pub sock: UnixStream,
    pub stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// A spare's go-ahead: the byte it waits for, then the restored runtime's environment.
    pub go: Option<Vec<u8>>,
}

/// Creates a cgroup under the daemon's parent (on a blocking thread). `inits` is the number
/// of Spore processes that sit in the group beside the function's (a spawned sandbox's init,
/// outside its pid namespace), added to the process limit.
pub(crate) async fn create_cgroup(
    env: &InstanceEnv,
    name: &str,
    memory_mb: u32,
    inits: u32,
) -> Result<Cgroup, StartError> {
    let limits = Limits {
        memory_bytes: u64::from(memory_mb) << 20,
        cpu_millis: env.cpu_millis,
        pids_max: env.pids_max + inits,
    };
    let layout = env.layout.clone();
    let (parent, name) = (env.cgroup_parent.clone(), name.to_owned());
    tokio::task::spawn_blocking(move || Cgroup::create(&layout, &parent, &name, limits))
        .await
        .map_err(|e| StartError::Platform(format!("cgroup task: {e}")))?
        .map_err(|e| StartError::Platform(error_chain(&e)))
}

/// A sandbox built ahead of time for a restore, waiting for the go-ahead: a restore into it
/// pays only for installing memory and resuming (the daemon keeps one per function that
/// restores, see `Control`).
#[derive(Debug)]
pub struct Spare {
    inst: Instance,
    go: Vec<u8>,
    how: ColdStart,
    revision: u64,
    image: PathBuf,
    ino: u64,
    /// When it was built.
    pub created: Instant,
}

impl Spare {
    /// Whether it restores the image now at `image` for `revision` (a replaced file has
    /// another inode; the spare holds the old one open).
    pub fn fits(&self, revision: u64, image: &std::path::Path) -> bool {
        self.revision == revision
            && self.image == image
            && std::fs::metadata(image)
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.ino)
    }

    /// Lets it restore; returns the instance once its runtime is ready (`init_ms` counts from
    /// the go-ahead).
    pub async fn start(
        mut self,
        rec: &FunctionRecord,
        init_timeout: Duration,
    ) -> Result<Instance, StartError> {
        let t0 = Instant::now();
        if let Err(e) = self.inst.sock.write_all(&self.go).await {
            self.inst.destroy().await;
            return Err(StartError::Platform(format!(
                "the spare sandbox is gone ({e})"
            )));
        }
        self.inst
            .await_ready(rec, &self.how, init_timeout, t0)
            .await
            .map_err(|(e, _)| e)
    }

    /// Host pids of its processes.
    pub fn pids(&self) -> Vec<i32> {
        self.inst.pids()
    }

    /// Stops it.
    pub async fn destroy(self) {
        self.inst.destroy().await;
    }
}

/// What differs between the sandboxes of one function.
pub(crate) struct Launch<'a> {
    /// Instance or template id (the hostname).
    pub id: &'a str,
    /// Host directory of the function's code.
    pub code_dir: PathBuf,
    /// Uid and gid the runtime runs as (unused for templates).
    pub uid: u32,
    /// For a cfork template: its user-namespace mapping and extra environment.
    pub template: Option<(spore_sandbox::IdMapping, Vec<(String, String)>)>,
    /// How the runtime comes up: imported from scratch (possibly offering itself for a
    /// snapshot), or restored from a snapshot.
    pub how: ColdStart,
    /// (A restore) build the sandbox now and restore only on the go-ahead (a spare).
    pub spare: bool,
}

/// How a sandbox's runtime comes up.
#[derive(Debug, Clone, Default)]
pub enum ColdStart {
    /// Start the runtime and import the handler.
    #[default]
    Init,
    /// As `Init`, and snapshot the warm runtime before it reports ready.
    InitAndSnapshot(Arc<crate::snapshots::Pending>),
    /// Restore the runtime from this image, installing memory in this mode.
    Restore(PathBuf, spore_snapshot::restore::MemoryMode),
}

/// Starts a sandbox for `rec` in a new cgroup of `memory_mb` (`inits` Spore processes beside
/// the runtime's): the runtime process, its control socket, and tasks draining its output into
/// `log`. On failure nothing is left behind.
pub(crate) async fn spawn_sandbox(
    env: &InstanceEnv,
    rec: &FunctionRecord,
    launch: Launch<'_>,
    log: Arc<LogRing>,
    memory_mb: u32,
    inits: u32,
) -> Result<(Cgroup, Spawned), StartError> {
    let cgroup = create_cgroup(env, launch.id, memory_mb, inits).await?;
    match spawn_in(env, rec, launch, log, &cgroup) {
        Ok(spawned) => Ok((cgroup, spawned)),
        Err(e) => {
            destroy_cgroup(cgroup).await;
            Err(e)
        }
    }
}

fn spawn_in(
    env: &InstanceEnv,
    rec: &FunctionRecord,
    launch: Launch<'_>,
    log: Arc<LogRing>,
    cgroup: &Cgroup,
) -> Result<Spawned, StartError> {
    let Launch {
        id,
        code_dir,
        uid,
        template,
        how,
        spare,
    } = launch;
    let is_template = template.is_some();
    let m = &rec.manifest;
    let launch = RuntimeLaunch {
        runtime: m.runtime,
        function_name: &m.name,
        handler: &m.handler,
        memory_mb: m.memory_mb,
        user_env: &m.environment,
        warmup_event: m.warmup_event.as_deref(),
    };
    let mut spec = SandboxSpec {
        id: id.to_owned(),
        rootfs: env.rootfs.clone(),
        binds: vec![],
        symlinks: vec![],
        files: vec![],
        tmp_size_mb: env.tmp_mb,
        uid,
        gid: uid,
        argv: launch.argv(),
        env: launch.env(),
        cwd: spore_runtime::TASK_ROOT.to_owned(),
        cgroup_join: cgroup.self_attach_files(),
        max_open_files: 1024,
        control_fd: spore_runtime::CONTROL_FD,
        user_namespace: None,
        restore: None,
        restore_mode: None,
        wait_for_go: false,
    };
    if rec.manifest.snapshot {
        // A runtime is snapshotted single-threaded: keep numerical libraries from starting
        // thread pools at import (unless the function sets these itself).
        for key in ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
            if !spec.env.iter().any(|(k, _)| k == key) {
                spec.env.push((key.into(), "1".into()));
            }
        }
    }
    match how {
        ColdStart::Init => {}
        ColdStart::InitAndSnapshot(_) => spec.env.push(("SPORE_CHECKPOINT".into(), "1".into())),
        ColdStart::Restore(image, mode) => {
            spec.restore = Some(image);
            spec.restore_mode = Some(mode.as_str().to_owned());
        }
    }
    if let Some((mapping, extra_env)) = template {
        spec.user_namespace = Some(mapping);
        spec.env.extend(extra_env);
    }
    spore_sandbox::host_runtime_rootfs(&mut spec);
    spec.binds.push(BindMount {
        source: code_dir,
        target: spore_runtime::TASK_ROOT.into(),
        read_only: true,
    });
    spec.binds.push(BindMount {
        source: env.runtime_dir.clone(),
        target: "/opt/spore/runtime".into(),
        read_only: true,
    });
    if let Some(pkgs) = &env.packages_dir {
        spec.binds.push(BindMount {
            source: pkgs.clone(),
            target: spore_runtime::PACKAGES_ROOT.into(),
            read_only: true,
        });
    }
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(platform("socketpair"))?;
    let mut go = None;
    if spec.restore.is_some() {
        // The restored runtime reads its environment first (it has the checkpointed one). A
        // few KiB into an empty socket buffer: this write does not block. A spare gets it
        // behind its go-ahead byte.
        let frame = protocol::encode(
            &ToRuntime::Environment {
                vars: spec.env.iter().cloned().collect(),
            },
            b"",
        );
        if spare {
            spec.wait_for_go = true;
            go = Some([b"g".as_slice(), &frame].concat());
        } else {
            std::io::Write::write_all(&mut &ours, &frame).map_err(platform("socket"))?;
        }
    }
    ours.set_nonblocking(true).map_err(platform("socket"))?;
    let sock = UnixStream::from_std(ours).map_err(platform("socket"))?;
    let mut cmd = spore_sandbox::command(&env.exe, &spec)
        .map_err(|e| StartError::Platform(error_chain(&e)))?;
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| StartError::Platform(format!("spawning {}: {e}", env.exe.display())))?;
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(drain(out, log.clone(), None, None));
    }
    if let Some(err) = child.stderr.take() {
        let echo = is_template.then(|| id.to_owned());
        tokio::spawn(drain(err, log, Some(stderr_tail.clone()), echo));
    }
    Ok(Spawned {
        child,
        sock,
        stderr_tail,
        go,
    })
}

/// The first frame a starting runtime sends after its checkpoint, if it offers one: a
/// runtime started with `ColdStart::InitAndSnapshot` waits in its checkpoint call, is copied
/// (`runtime`: the sandbox's outer init, host pid, and how many generations below it the
/// runtime is) and told how that went, then reports ready. The snapshot's time goes into
/// `breakdown`.
pub(crate) async fn first_frame(
    sock: &mut UnixStream,
    deadline: tokio::time::Instant,
    how: &ColdStart,
    runtime: Option<(u32, u32)>,
    function: &str,
    breakdown: &mut Vec<(String, f64)>,
) -> Result<std::io::Result<Option<(FromRuntime, Vec<u8>)>>, tokio::time::error::Elapsed> {
    let first = tokio::time::timeout_at(deadline, read_frame(sock)).await;
    let Ok(Ok(Some((FromRuntime::Checkpoint { context }, _)))) = &first else {
        return first;
    };
    let (context, t) = (*context, Instant::now());
    let taken = match (how, runtime) {
        (ColdStart::InitAndSnapshot(pending), Some((init, depth))) => {
            capture_runtime(init, depth, pending, context).await
        }
        (ColdStart::InitAndSnapshot(_), None) => Err("the sandbox exited".to_owned()),
        _ => Err("the runtime offered a snapshot nobody asked for".to_owned()),
    };
    let status = match taken {
        Ok(()) => 0u8,
        Err(why) => {
            tracing::warn!(function = %function, "snapshot not taken: {why}");
            1
        }
    };
    breakdown.push(("snapshot".into(), t.elapsed().as_secs_f64() * 1e3));
    // The runtime waits for one raw status byte, then reports ready.
    if let Err(e) = sock.write_all(&[status]).await {
        return Ok(Err(e));
    }
    tokio::time::timeout_at(deadline, read_frame(sock)).await
}

/// Copies the runtime waiting in its checkpoint call at `context` into `pending`: the process
/// `depth` generations below the sandbox's outer init `init` (host pid), each the only child
/// of its parent.
async fn capture_runtime(
    init: u32,
    depth: u32,
    pending: &Arc<crate::snapshots::Pending>,
    context: u64,
) -> Result<(), String> {
    let pending = pending.clone();
    tokio::task::spawn_blocking(move || {
        let mut pid = init;
        for _ in 0..depth {
            let path = format!("/proc/{pid}/task/{pid}/children");
            pid = std::fs::read_to_string(&path)
                .map_err(|e| format!("{path}: {e}"))?
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or("the sandbox has no runtime process")?;
        }
        pending.capture(pid as i32, context)
    })
    .await
    .map_err(|e| format!("snapshot task: {e}"))?
}

pub(crate) fn platform(what: &str) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |e| StartError::Platform(format!("{what}: {e}"))
}

impl Instance {
    /// Starts an instance of `rec` whose code is in `code_dir`, waiting until its handler is
    /// imported (at most `init_timeout`).
    pub async fn start(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        init_timeout: Duration,
        how: ColdStart,
    ) -> Result<Instance, StartError> {
        let first = Self::start_once(
            env,
            rec,
            code_dir.clone(),
            log.clone(),
            init_timeout,
            how.clone(),
        )
        .await;
        match first {
            Err((_, true)) => {
                // The restorer's random layout overlapped the image: a new process has
                // another one.
                tracing::info!(function = %rec.manifest.name, "restore collided with the restorer's own mappings; trying a fresh sandbox");
                Self::start_once(env, rec, code_dir, log, init_timeout, how)
                    .await
                    .map_err(|(e, _)| e)
            }
            other => other.map_err(|(e, _)| e),
        }
    }

    /// One attempt of [`Instance::start`]; the flag says a restore collided.
    async fn start_once(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        init_timeout: Duration,
        how: ColdStart,
    ) -> Result<Instance, (StartError, bool)> {
        let t0 = Instant::now();
        let (inst, _) = Self::spawn(env, rec, code_dir, log, &how, false)
            .await
            .map_err(|e| (e, false))?;
        inst.await_ready(rec, &how, init_timeout, t0).await
    }

    /// Builds the sandbox and starts its runtime (or, as a spare, leaves it waiting for the
    /// go-ahead, returned with it).
    async fn spawn(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        how: &ColdStart,
        spare: bool,
    ) -> Result<(Instance, Option<Vec<u8>>), StartError> {
        let m = &rec.manifest;
        let seq = env.next_seq();
        let id = format!("{}-{}-{seq}", m.name, std::process::id());
        let uid = env.uid_base + (seq % 100_000) as u32;
        let launch = Launch {
            id: &id,
            code_dir,
            uid,
            template: None,
            how: how.clone(),
            spare,
        };
        let helpers = match how {
            ColdStart::Restore(_, mode) if *mode != spore_snapshot::restore::MemoryMode::Full => 1,
            _ => 0,
        };
        let (cgroup, spawned) =
            spawn_sandbox(env, rec, launch, log, m.memory_mb, 1 + helpers as u32).await?;
        let inst = Instance {
            id,
            revision: rec.revision,
            init_ms: 0.0,
            breakdown: Vec::new(),
            last_used: Instant::now(),
            proc: Proc::Spawned(spawned.child),
            sock: spawned.sock,
            cgroup: Some(cgroup),
            memory_mb: m.memory_mb,
            stderr_tail: spawned.stderr_tail,
            invoke_sent: false,
            helpers,
        };
        Ok((inst, spawned.go))
    }

    /// Waits (at most `init_timeout`) for the runtime started at `t0` to report ready,
    /// taking its snapshot on the way if `how` asks for one. On failure the sandbox is gone;
    /// the flag says a restore collided with the restorer's own layout.
    async fn await_ready(
        mut self,
        rec: &FunctionRecord,
        how: &ColdStart,
        init_timeout: Duration,
        t0: Instant,
    ) -> Result<Instance, (StartError, bool)> {
        let m = &rec.manifest;
        let deadline = tokio::time::Instant::now() + init_timeout;
        let init = match &self.proc {
            Proc::Spawned(child) => child.id(),
            Proc::Forked(_) => None,
        };
        let first = first_frame(
            &mut self.sock,
            deadline,
            how,
            init.map(|pid| (pid, 1)),
            &m.name,
            &mut self.breakdown,
        )
        .await;
        let mut collision = false;
        let failure = match first {
            Ok(Ok(Some((FromRuntime::Ready { .. }, _)))) => {
                self.init_ms = t0.elapsed().as_secs_f64() * 1000.0;
                return Ok(self);
            }
            Ok(Ok(Some((FromRuntime::InitError { error }, _)))) => StartError::Init(error),
            Ok(Ok(Some((other, _)))) => {
                StartError::Platform(format!("runtime sent {other:?} before ready"))
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                let detail = self.exit_detail().await;
                collision = detail.collision;
                if detail.setup_failed || matches!(how, ColdStart::Restore(..)) {
                    StartError::Platform(detail.text)
                } else if self.oom_killed() {
                    StartError::Init(
                        InvokeFailure::OutOfMemory {
                            limit_mb: m.memory_mb,
                        }
                        .to_function_error(),
                    )
                } else {
                    StartError::Init(FunctionError::platform(
                        "Runtime.ExitError",
                        format!("Runtime exited during init: {}", detail.text),
                    ))
                }
            }
            Err(_) => StartError::Init(FunctionError::platform(
                "Sandbox.Timedout",
                format!(
                    "Init timed out after {:.2} seconds",
                    init_timeout.as_secs_f64()
                ),
            )),
        };
        self.destroy().await;
        Err((failure, collision))
    }

    /// Builds a sandbox that will restore `image` (memory mode `full`) on the go-ahead.
    pub async fn spare(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        image: PathBuf,
    ) -> Result<Spare, StartError> {
        let ino = std::fs::metadata(&image)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .map_err(|e| StartError::Platform(format!("{}: {e}", image.display())))?;
        let how = ColdStart::Restore(image.clone(), spore_snapshot::restore::MemoryMode::Full);
        let (inst, go) = Self::spawn(env, rec, code_dir, log, &how, true).await?;
        let Some(go) = go else {
            inst.destroy().await;
            return Err(StartError::Platform("a spare without a go-ahead".into()));
        };
        Ok(Spare {
            inst,
            go,
            how,
            revision: rec.revision,
            image,
            ino,
            created: Instant::now(),
        })
    }

    /// Runs one invocation. On `Err` the instance is broken and must be destroyed.
    pub async fn invoke(
        &mut self,
        request_id: &str,
        payload: &[u8],
        timeout_s: u32,
    ) -> Result<Reply, InvokeFailure> {
        let frame = (!std::mem::take(&mut self.invoke_sent))
            .then(|| invoke_frame(request_id, payload, timeout_s));
        let timeout = Duration::from_secs(u64::from(timeout_s));
        self.exchange(
            frame,
            None,
            timeout,
            timeout_s,
            spore_core::MAX_SYNC_PAYLOAD,
        )
        .await
    }

    /// Runs one invocation as a node of a DAG: `wiring` says where the event comes from and
    /// where the result goes, `fds` are the edges' descriptors it refers to. The instance
    /// must have no invocation pending (it was not forked with one). `timeout` bounds the
    /// whole exchange, waiting for inputs included; `timeout_s` is what a timeout reports.
    pub async fn invoke_dag(
        &mut self,
        request_id: &str,
        wiring: protocol::DagWiring,
        body: &[u8],
        fds: Vec<OwnedFd>,
        timeout: Duration,
        timeout_s: u32,
    ) -> Result<Reply, InvokeFailure> {
        debug_assert!(!self.invoke_sent, "a DAG node needs an idle instance");
        let deadline_ms = crate::store::now_unix_ms() + timeout.as_millis() as u64;
        let frame = protocol::encode(
            &ToRuntime::Invoke {
                request_id: request_id.to_owned(),
                deadline_ms,
                dag: Some(wiring),
            },
            body,
        );
        self.exchange(
            Some(frame),
            Some(fds),
            timeout,
            timeout_s,
            protocol::MAX_BODY as usize,
        )
        .await
    }

    /// Sends `frame` (then, for a DAG node, one byte carrying `fds`), reads the reply; a
    /// result body over `limit` bytes is an error.
    async fn exchange(
        &mut self,
        frame: Option<Vec<u8>>,
        fds: Option<Vec<OwnedFd>>,
        timeout: Duration,
        timeout_s: u32,
        limit: usize,
    ) -> Result<Reply, InvokeFailure> {
        let exchange = async {
            if let Some(frame) = &frame {
                self.sock.write_all(frame).await?;
            }
            if let Some(fds) = fds {
                send_fds(&self.sock, &fds).await?;
            }
            read_frame(&mut self.sock).await
        };
        let reply = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return Err(InvokeFailure::Timeout { seconds: timeout_s }),
            Ok(r) => r,
        };
        self.reply(reply, limit).await
    }

    /// Serves `wiring` as one node of a pre-wired pipeline: the runtime keeps its edges open
    /// and runs an invocation per message on them, sending what handlers print to `on_logs`.
    /// Returns when the runtime leaves the pipeline (a handler failed: the reply holds its
    /// error) or dies. Cancel by dropping the future and destroying the instance.
    pub async fn serve_pipeline(
        &mut self,
        request_id: &str,
        wiring: protocol::DagWiring,
        fds: Vec<OwnedFd>,
        mut on_logs: impl FnMut(String),
    ) -> Result<Reply, InvokeFailure> {
        debug_assert!(!self.invoke_sent, "a pipeline node needs an idle instance");
        let frame = protocol::encode(
            &ToRuntime::Invoke {
                request_id: request_id.to_owned(),
                deadline_ms: 0,
                dag: Some(wiring),
            },
            &[],
        );
        let sent = async {
            self.sock.write_all(&frame).await?;
            send_fds(&self.sock, &fds).await
        };
        if let Err(e) = sent.await {
            return self.reply(Err(e), 0).await;
        }
        loop {
            match read_frame(&mut self.sock).await {
                Ok(Some((FromRuntime::Logs { logs }, _))) => on_logs(logs),
                other => return self.reply(other, protocol::MAX_BODY as usize).await,
            }
        }
    }

    /// The reply read from the runtime: its result, or why there is none.
    async fn reply(
        &mut self,
        reply: std::io::Result<Option<(FromRuntime, Vec<u8>)>>,
        limit: usize,
    ) -> Result<Reply, InvokeFailure> {
        self.last_used = Instant::now();
        match reply {
            Ok(Some((
                FromRuntime::Result {
                    error,
                    duration_ms,
                    logs,
                    handler_start_ns,
                    handler_end_ns,
                    dag,
                },
                body,
            ))) => Ok(Reply {
                handler_start_ns,
                handler_end_ns,
                dag,
                outcome: match error {
                    Some(e) => Err(e),
                    None if body.len() > limit => Err(FunctionError::platform(
                        "Function.ResponseSizeTooLarge",
                        format!(
                            "Response payload size ({} bytes) exceeded maximum allowed payload size ({limit} bytes).",
                            body.len(),
                        ),
                    )),
                    None => Ok(body),
                },
                handler_ms: duration_ms,
                logs,
            }),
            Ok(Some((other, _))) => Err(InvokeFailure::Exited {
                detail: format!("protocol violation: unexpected {other:?}"),
            }),
            Ok(None) | Err(_) => {
                let detail = self.exit_detail().await;
                if self.oom_killed() {
                    Err(InvokeFailure::OutOfMemory { limit_mb: self.memory_mb })
                } else {
                    Err(InvokeFailure::Exited { detail: detail.text })
                }
            }
        }
    }

    /// Whether processes other than the runtime (and the init outside it) are left in the
    /// sandbox, e.g. children the handler forked. Such an instance is not reused.
    pub fn has_strays(&self) -> bool {
        let Some(cg) = &self.cgroup else { return false };
        // A spawned sandbox's init sits in its cgroup beside the runtime; a forked child is
        // alone in its own (its template, passing through at fork, is spared).
        let expected = match self.proc {
            Proc::Spawned(_) => 2 + self.helpers,
            Proc::Forked(_) => 1,
        };
        cg.pids().len() > expected
    }

    /// Host pids of the processes in the instance's cgroup.
    pub fn pids(&self) -> Vec<i32> {
        self.cgroup.as_ref().map(Cgroup::pids).unwrap_or_default()
    }

    /// Memory charged to the instance's cgroup now, bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(Cgroup::memory_current)
    }

    /// Peak memory use of the sandbox, MiB.
    pub fn memory_peak_mb(&self) -> Option<u64> {
        self.cgroup
            .as_ref()?
            .memory_peak()
            .map(|b| b.div_ceil(1 << 20))
    }

    fn oom_killed(&self) -> bool {
        self.cgroup.as_ref().is_some_and(Cgroup::oom_killed)
    }

    pub(crate) async fn exit_detail(&mut self) -> ExitDetail {
        let code = match &mut self.proc {
            Proc::Spawned(child) => {
                match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                    Ok(Ok(s)) => s.code(),
                    _ => None,
                }
            }
            Proc::Forked(state) => state.wait_exit(Duration::from_secs(2)).await,
        };
        // Give the stderr drain a moment to catch the last lines.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let tail: Vec<String> = self
            .stderr_tail
            .lock()
            .expect("stderr tail")
            .iter()
            .cloned()
            .collect();
        let mut text = match code {
            Some(c) if c > 128 => format!("signal {}", c - 128),
            Some(c) => format!("exit status {c}"),
            None => "no exit status".to_owned(),
        };
        if !tail.is_empty() {
            text.push_str("; stderr: ");
            text.push_str(&tail.join(" | "));
        }
        ExitDetail {
            setup_failed: code == Some(spore_sandbox::SETUP_FAILED_EXIT),
            collision: code == Some(spore_sandbox::RESTORE_COLLISION_EXIT),
            text,
        }
    }

    /// Kills the sandbox and removes its cgroup.
    pub async fn destroy(mut self) {
        if let Proc::Spawned(child) = &mut self.proc {
            let _ = child.start_kill();
        }
        if let Some(cg) = self.cgroup.take() {
            destroy_cgroup(cg).await;
        }
        if let Proc::Spawned(child) = &mut self.proc {
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Reached only when an invocation was abandoned mid-way (e.g. a cancelled task):
        // the child is killed by kill_on_drop, the cgroup here.
        if let Some(cg) = self.cgroup.take() {
            std::thread::spawn(move || {
                if let Err(e) = cg.destroy() {
                    tracing::warn!("removing an abandoned sandbox cgroup: {}", error_chain(&e));
                }
            });
        }
    }
}

pub(crate) struct ExitDetail {
    pub setup_failed: bool,
    /// The restorer collided with the image (another process may not).
    pub collision: bool,
    pub text: String,
}

pub(crate) async fn destroy_cgroup(cg: Cgroup) {
    match tokio::task::spawn_blocking(move || cg.destroy()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("removing a sandbox cgroup: {}", error_chain(&e)),
        Err(e) => tracing::warn!("cgroup removal task: {e}"),
    }
}

/// Formats an error with its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Copies a sandbox's output into the function's log; keeps the last stderr lines in `tail`
/// (for error reports) and, with `echo`, also writes them to the daemon's own log (templates:
/// their failures concern the platform, not one invocation).
async fn drain<R: AsyncRead + Unpin>(
    r: R,
    log: Arc<LogRing>,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    echo: Option<String>,
) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log.push_text(&line);
        if let Some(id) = &echo {
            tracing::warn!("{id}: {line}");
        }
        if let Some(t) = &tail {
            let mut t = t.lock().expect("stderr tail");
            if t.len() == 8 {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

/// Sends one byte with `fds` attached (`SCM_RIGHTS`).
pub(crate) async fn send_fds(stream: &UnixStream, fds: &[OwnedFd]) -> std::io::Result<()> {
    sendmsg_fds(stream, &[0u8], fds).await.map(drop)
}

/// Sends (a first part of) `bytes` in one `sendmsg` with `fds` attached to its first byte;
/// returns how many bytes went.
pub(crate) async fn sendmsg_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[OwnedFd],
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    use std::os::fd::AsRawFd;
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        stream.writable().await?;
        let res = stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &[std::io::IoSlice::new(bytes)],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match res {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads one frame; `None` on a clean EOF before the frame.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    sock: &mut R,
) -> std::io::Result<Option<(FromRuntime, Vec<u8>)>> {
    let mut prefix = [0u8; PREFIX_LEN];
    match sock.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let p = FramePrefix::parse(prefix).map_err(std::io::Error::other)?;
    let mut header = vec![0u8; p.header_len as usize];
    sock.read_exact(&mut header).await?;
    let mut body = vec![0u8; p.body_len as usize];
    sock.read_exact(&mut body).await?;
    let msg = protocol::decode_header(&header).map_err(std::io::Error::other)?;
    Ok(Some((msg, body)))
}
