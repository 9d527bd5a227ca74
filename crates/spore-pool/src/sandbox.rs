//! Starting a sandboxed runtime: the settings every sandbox of a daemon shares, a sandbox's
//! cgroup, the sandbox init's spawn, the first frames a starting runtime sends (its snapshot
//! offer), and the descriptor-passing helpers of the control socket.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use spore_core::{error_chain, FunctionError, Network, Runtime};
use spore_registry::FunctionRecord;
use spore_runtime::protocol::{self, FramePrefix, FromRuntime, ToRuntime, PREFIX_LEN};
use spore_runtime::RuntimeLaunch;
use spore_sandbox::cgroup::{Cgroup, Layout, Limits};
use spore_sandbox::{BindMount, SandboxSpec};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::logs::LogRing;
use crate::snapshots::Pending;

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
    /// Directory of the unpacked layers, by content digest (`<data-dir>/layers/content`).
    pub layer_content: PathBuf,
    /// Where dependency layers live (`<data-dir>/deps`); None: functions have none here.
    pub deps_root: Option<PathBuf>,
    /// Network access of functions whose manifest does not say.
    pub default_network: Network,
    /// This daemon's egress (bridge, table, addresses), or why there is none.
    pub egress: Result<Arc<spore_sandbox::egress::Egress>, String>,
    /// The region functions see (`AWS_REGION`, `AWS_DEFAULT_REGION`, their ARN).
    pub region: String,
    /// What functions' calls imported, for their automatic warm-up (None: not kept here).
    pub warmups: Option<Arc<crate::warmup::Warmups>>,
    /// First invocations of fresh instances in flight, which background preparation waits
    /// for.
    pub settle: Arc<crate::settle::Settle>,
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
            layer_content: PathBuf::new(),
            deps_root: None,
            default_network: Network::None,
            egress: Err("network egress is not set up".into()),
            region: spore_runtime::DEFAULT_REGION.to_owned(),
            warmups: None,
            settle: Arc::default(),
            seq: AtomicU64::new(1),
        }
    }

    /// The modules `rec`'s instances import at start-up (its automatic warm-up): what its
    /// calls imported so far at this revision; empty when it has none or turned it off.
    pub fn preload_for(&self, rec: &FunctionRecord) -> Vec<String> {
        match &self.warmups {
            Some(w) if rec.manifest.auto_warmup && rec.manifest.runtime == Runtime::Python3 => {
                // One environment variable holds the list: well under the kernel's 128 KiB.
                let mut total = 0;
                w.modules(&rec.key(), &crate::warmup::stamp(rec))
                    .into_iter()
                    .take_while(|m| {
                        total += m.len() + 1;
                        total <= 32 * 1024
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// The network setting that applies to `m`.
    pub fn network_of(&self, m: &spore_core::FunctionManifest) -> Network {
        m.network.unwrap_or(self.default_network)
    }

    /// The egress of this daemon, for a function that needs it.
    pub fn egress_for(
        &self,
        function: &str,
    ) -> Result<&Arc<spore_sandbox::egress::Egress>, StartError> {
        self.egress.as_ref().map_err(|why| {
            StartError::Platform(format!(
                "function {function} has network \"egress\", which this daemon cannot give: {why}"
            ))
        })
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

/// The parts of a freshly spawned sandbox.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub child: Child,
    pub sock: UnixStream,
    pub stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// A spare's go-ahead: the byte it waits for, then the restored runtime's environment.
    pub go: Option<Vec<u8>>,
}

/// Sends a spare sandbox its go-ahead (and whatever follows it), within `timeout`: a restore
/// that stalls before reading must not hold the caller past its init timeout here either.
pub(crate) async fn send_go(
    sock: &mut UnixStream,
    go: &[u8],
    timeout: std::time::Duration,
) -> Result<(), StartError> {
    let wrote = match tokio::time::timeout(timeout, sock.write_all(go)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("it read nothing within the init timeout".to_owned()),
    };
    wrote.map_err(|e| StartError::Platform(format!("the spare sandbox is gone ({e})")))
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
    InitAndSnapshot(Arc<Pending>),
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
    let version = rec.version_name();
    let log_stream = spore_runtime::log_stream_name(
        spore_registry::store::now_unix_ms(),
        &version,
        random_u128(),
    );
    // A template is given its list by its caller, which remembers what it sent.
    let preload = if is_template {
        Vec::new()
    } else {
        env.preload_for(rec)
    };
    let launch = RuntimeLaunch {
        preload: &preload,
        runtime: m.runtime,
        version: m.runtime_version(),
        function_name: &m.name,
        function_version: &version,
        handler: &m.handler,
        memory_mb: m.memory_mb,
        user_env: &m.environment,
        warmup_event: m.warmup_event.as_deref(),
        region: &env.region,
        initialization_type: spore_runtime::ON_DEMAND,
        log_stream_name: &log_stream,
    };
    let mut spec = SandboxSpec {
        id: id.to_owned(),
        rootfs: env.rootfs.clone(),
        binds: vec![],
        symlinks: vec![],
        files: vec![],
        tmp_size_mb: rec.lambda.ephemeral_mb.unwrap_or(env.tmp_mb),
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
        daemon_pid: Some(std::process::id()),
        opt_layers: rec
            .layers
            .iter()
            .map(|l| env.layer_content.join(&l.code_hex))
            .collect(),
        egress: None,
    };
    if m.runtime == Runtime::Python3 && !m.auto_warmup {
        // The runtime then reports no imports (the pool would ignore them).
        spec.env.push(("SPORE_AUTO_WARMUP".into(), "0".into()));
    } else if m.runtime == Runtime::Python3 {
        let budget = crate::warmup::preload_budget(m).as_millis();
        spec.env
            .push(("SPORE_PRELOAD_BUDGET_MS".into(), budget.to_string()));
    }
    if !spec.opt_layers.is_empty() {
        layer_paths(&mut spec.env);
    }
    if rec.manifest.snapshot || is_template {
        // A runtime is snapshotted, and a cfork template forks, single-threaded: keep
        // numerical libraries from starting thread pools at import (unless the function sets
        // these itself).
        for key in [
            "OPENBLAS_NUM_THREADS",
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "NUMEXPR_NUM_THREADS",
        ] {
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
    let egress = env.network_of(m) == Network::Egress;
    if egress {
        let e = env.egress_for(&m.name)?;
        spec.files
            .push(("/etc/resolv.conf".into(), e.resolv_conf()));
        if !is_template {
            // A template's own namespace keeps loopback only; its children get egress-ready
            // namespaces the daemon equips (`Template::equip_netns`).
            spec.egress = Some(
                e.lease()
                    .map_err(|e| StartError::Platform(error_chain(&e)))?,
            );
        }
    }
    if let Some((mapping, extra_env)) = template {
        spec.user_namespace = Some(mapping);
        spec.env.extend(extra_env);
        if egress {
            spec.env.push(("SPORE_CFORK_EGRESS".into(), "1".into()));
        }
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
    bind_read_only_dirs(&mut spec, &layer_dirs(env, rec)?);
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

/// Where Lambda's runtimes look in `/opt` for what layers bring: Python packages in
/// `/opt/python` and `/opt/python/lib/python3.N/site-packages` (after the function's own
/// code), Node modules in `/opt/nodejs/node_modules`, programs in `/opt/bin`, libraries in
/// `/opt/lib`.
fn layer_paths(env: &mut Vec<(String, String)>) {
    static PYTHON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let python = PYTHON.get_or_init(|| {
        let target = std::fs::read_link(spore_runtime::PYTHON_INTERPRETER).ok()?;
        let name = target.file_name()?.to_str()?.to_owned();
        let minor = name.strip_prefix("python3.")?;
        minor.parse::<u32>().ok().map(|_| name)
    });
    let mut py = vec!["/opt/python".to_owned()];
    if let Some(p) = python {
        py.push(format!("/opt/python/lib/{p}/site-packages"));
    }
    let py = py.join(":");
    let mut set = |key: &str, f: &dyn Fn(Option<&str>) -> String| match env
        .iter_mut()
        .find(|(k, _)| k == key)
    {
        Some((_, v)) => *v = f(Some(v)),
        None => env.push((key.to_owned(), f(None))),
    };
    set("PYTHONPATH", &|v| match v {
        // After the function's code, before Spore's shared packages.
        Some(v) => match v.split_once(':') {
            Some((task, rest)) => format!("{task}:{py}:{rest}"),
            None => format!("{v}:{py}"),
        },
        None => py.clone(),
    });
    set("NODE_PATH", &|v| match v {
        Some(v) => format!("{v}:/opt/nodejs/node20/node_modules:/opt/nodejs/node_modules"),
        None => "/opt/nodejs/node20/node_modules:/opt/nodejs/node_modules".to_owned(),
    });
    // Each directory once (the runtime may name it already: `LD_LIBRARY_PATH` starts with
    // `/opt/lib`, as Lambda's).
    let append = |v: Option<&str>, dir: &str, default: &str| match v {
        Some(v) if v.split(':').any(|d| d == dir) => v.to_owned(),
        Some(v) if !v.is_empty() => format!("{v}:{dir}"),
        _ if default.is_empty() => dir.to_owned(),
        _ => format!("{default}:{dir}"),
    };
    set("PATH", &|v| {
        append(v, "/opt/bin", "/usr/local/bin:/usr/bin:/bin")
    });
    set("LD_LIBRARY_PATH", &|v| append(v, "/opt/lib", ""));
}

/// The read-only directories a function's sandboxes get beside its code, `(host directory,
/// path inside)`: its dependency layer, if it has one (which must be built).
fn layer_dirs(
    env: &InstanceEnv,
    rec: &FunctionRecord,
) -> Result<Vec<(PathBuf, String)>, StartError> {
    let mut dirs = Vec::new();
    if let (Some(key), Some(root)) = (&rec.deps, &env.deps_root) {
        let dir = root.join(key);
        if !dir.is_dir() {
            return Err(StartError::Platform(format!(
                "the function's dependency layer {key} is not built (its build is running or failed: see the function's State)"
            )));
        }
        dirs.push((dir, spore_runtime::DEPS_ROOT.to_owned()));
    }
    Ok(dirs)
}

/// Binds each `(host directory, path inside)` read-only into the sandbox, in order.
pub(crate) fn bind_read_only_dirs(spec: &mut SandboxSpec, dirs: &[(PathBuf, String)]) {
    for (source, target) in dirs {
        spec.binds.push(BindMount {
            source: source.clone(),
            target: target.clone(),
            read_only: true,
        });
    }
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
    pending: &Arc<Pending>,
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

pub(crate) async fn destroy_cgroup(cg: Cgroup) {
    match tokio::task::spawn_blocking(move || cg.destroy()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("removing a sandbox cgroup: {}", error_chain(&e)),
        Err(e) => tracing::warn!("cgroup removal task: {e}"),
    }
}

/// 128 random bits (from the standard library's randomly keyed hasher: enough to tell log
/// streams apart, not a secret).
fn random_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let word = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        h.finish()
    };
    (u128::from(word()) << 64) | u128::from(word())
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
    let header_len = p.header_len as usize;
    if p.body_len > 16 * 1024 {
        // A large body is read into its own buffer: no copy of it afterwards.
        let mut header = vec![0u8; header_len];
        sock.read_exact(&mut header).await?;
        let mut body = vec![0u8; p.body_len as usize];
        sock.read_exact(&mut body).await?;
        let msg = protocol::decode_header(&header).map_err(std::io::Error::other)?;
        return Ok(Some((msg, body)));
    }
    // A small frame's header and body in one read: a reply usually arrives whole, and each
    // read is a system call on the warm path.
    let mut rest = vec![0u8; header_len + p.body_len as usize];
    sock.read_exact(&mut rest).await?;
    let msg = protocol::decode_header(&rest[..header_len]).map_err(std::io::Error::other)?;
    Ok(Some((msg, rest.split_off(header_len))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_follow_the_code_and_precede_spores_packages() {
        let mut env = vec![
            (
                "PYTHONPATH".to_owned(),
                "/var/task:/opt/spore/python".to_owned(),
            ),
            ("NODE_PATH".to_owned(), "/var/task/node_modules".to_owned()),
            ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
        ];
        layer_paths(&mut env);
        let get = |k: &str| env.iter().find(|(key, _)| key == k).unwrap().1.clone();
        let py = get("PYTHONPATH");
        assert!(
            py.starts_with("/var/task:/opt/python:") && py.ends_with(":/opt/spore/python"),
            "{py}"
        );
        assert_eq!(
            get("NODE_PATH"),
            "/var/task/node_modules:/opt/nodejs/node20/node_modules:/opt/nodejs/node_modules"
        );
        assert_eq!(get("PATH"), "/usr/bin:/bin:/opt/bin");
        assert_eq!(get("LD_LIBRARY_PATH"), "/opt/lib");
        // A directory the runtime names already is not named twice.
        let mut env = vec![(
            "LD_LIBRARY_PATH".to_owned(),
            "/opt/lib:/var/task/lib".to_owned(),
        )];
        layer_paths(&mut env);
        let ld = env.iter().find(|(k, _)| k == "LD_LIBRARY_PATH").unwrap();
        assert_eq!(ld.1, "/opt/lib:/var/task/lib");
    }
}
