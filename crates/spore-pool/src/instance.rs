//! One function instance: a sandboxed runtime process, its control socket, and the
//! invocation protocol over it (invoke, DAG wiring, pipelines, exit detail).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spore_core::{error_chain, FunctionError};
use spore_registry::store::now_unix_ms;
use spore_registry::FunctionRecord;
use spore_runtime::protocol::{self, FromRuntime, ToRuntime};
use spore_sandbox::cgroup::Cgroup;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::Notify;

use crate::logs::LogRing;
use crate::sandbox::{
    destroy_cgroup, first_frame, read_frame, send_fds, spawn_sandbox, ColdStart, InstanceEnv,
    Launch, StartError,
};

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
    /// The function's result is larger than any reply can be (the frame was refused before
    /// it was read; the instance is not reused).
    ResponseTooLarge {
        /// Its size, bytes.
        size: u64,
        /// The largest reply, bytes.
        limit: u64,
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
            InvokeFailure::ResponseTooLarge { size, limit } => FunctionError::platform(
                "Function.ResponseSizeTooLarge",
                format!(
                    "Response payload size ({size} bytes) exceeded maximum allowed payload size ({limit} bytes)."
                ),
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
    /// The runtime logged the error itself (no `[ERROR]` line to add).
    pub error_logged: bool,
    /// `CLOCK_MONOTONIC` nanoseconds when the handler was called (0: unknown).
    pub handler_start_ns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the handler returned (0: unknown).
    pub handler_end_ns: u64,
    /// (DAG nodes) the runtime's report.
    pub dag: Option<protocol::DagReport>,
    /// Modules the call imported for the first time in this instance (automatic warm-up).
    pub imported: Vec<String>,
    /// Modules of the warm-up that failed to import at this instance's start.
    pub unimportable: Vec<String>,
}

/// The frame of one invocation.
pub(crate) fn invoke_frame(
    request_id: &str,
    payload: &[u8],
    timeout_s: u32,
    client_context: Option<&serde_json::Value>,
) -> Vec<u8> {
    let deadline_ms = now_unix_ms() + u64::from(timeout_s) * 1000;
    protocol::encode(
        &ToRuntime::Invoke {
            request_id: request_id.to_owned(),
            deadline_ms,
            dag: None,
            client_context: client_context.cloned(),
        },
        payload,
    )
}

/// Most of an invocation's output kept (the last part).
const MAX_LOGS: usize = 64 * 1024;

/// The largest first invocation written behind a start request (a fork request, a spare's
/// go-ahead) before the instance is ready: a frame this small fits in the new socket's
/// buffer, so the write cannot wait on the instance. Larger ones are sent once it is ready.
pub(crate) const PIPELINED_MAX: usize = 64 * 1024;

/// Appends `more` to `logs`, keeping the last [`MAX_LOGS`] bytes (cut at a character).
fn append_logs(logs: &mut String, more: &str) {
    logs.push_str(more);
    if logs.len() > 2 * MAX_LOGS {
        let mut at = logs.len() - MAX_LOGS;
        while !logs.is_char_boundary(at) {
            at += 1;
        }
        logs.drain(..at);
    }
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
    Forked(Arc<ChildState>),
}

/// What a template reports about one forked child.
#[derive(Debug, Default)]
pub struct ChildState {
    pub(crate) exit: Mutex<Option<i32>>,
    pub(crate) error: Mutex<Option<String>>,
    pub(crate) changed: Notify,
}

impl ChildState {
    /// Waits up to `timeout` for the child's exit status.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if let Some(code) = *self.exit.lock().expect("child state") {
                return Some(code);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }
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
    /// When it became ready.
    pub created: Instant,
    /// How it started (set when the pools hand it out fresh).
    pub started: spore_core::StartKind,
    pub(crate) proc: Proc,
    pub(crate) sock: UnixStream,
    pub(crate) cgroup: Option<Cgroup>,
    pub(crate) memory_mb: u32,
    pub(crate) stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The first invocation's frame was sent already (pipelined behind a fork request).
    pub(crate) invoke_sent: bool,
    /// What the runtime printed while it imported the handler (taken by the first
    /// invocation's report).
    pub init_logs: String,
    /// What the current invocation printed so far (streamed `logs` frames): kept when it
    /// times out or the runtime dies.
    pub(crate) streamed: String,
    /// Spore helper processes in the instance's cgroup besides its init (a lazy restore's
    /// fault server).
    pub(crate) helpers: usize,
    /// (A cfork child) the template's resident memory, which the child maps and can read
    /// without it being charged to its own cgroup: counted in [`Instance::memory_peak_mb`].
    pub(crate) shared_bytes: u64,
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
    pub(crate) async fn spawn(
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
            created: Instant::now(),
            started: spore_core::StartKind::Cold,
            proc: Proc::Spawned(spawned.child),
            sock: spawned.sock,
            cgroup: Some(cgroup),
            memory_mb: m.memory_mb,
            stderr_tail: spawned.stderr_tail,
            invoke_sent: false,
            shared_bytes: 0,
            init_logs: String::new(),
            streamed: String::new(),
            helpers,
        };
        Ok((inst, spawned.go))
    }

    /// Waits (at most `init_timeout`) for the runtime started at `t0` to report ready,
    /// taking its snapshot on the way if `how` asks for one. On failure the sandbox is gone;
    /// the flag says a restore collided with the restorer's own layout.
    pub(crate) async fn await_ready(
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
            Ok(Ok(Some((FromRuntime::Ready { logs, .. }, _)))) => {
                self.init_ms = t0.elapsed().as_secs_f64() * 1000.0;
                self.init_logs = logs;
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

    /// Runs one invocation. On `Err` the instance is broken and must be destroyed.
    pub async fn invoke(
        &mut self,
        request_id: &str,
        payload: &[u8],
        timeout_s: u32,
        client_context: Option<&serde_json::Value>,
    ) -> Result<Reply, InvokeFailure> {
        let frame = (!std::mem::take(&mut self.invoke_sent))
            .then(|| invoke_frame(request_id, payload, timeout_s, client_context));
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
        let deadline_ms = now_unix_ms() + timeout.as_millis() as u64;
        let frame = protocol::encode(
            &ToRuntime::Invoke {
                request_id: request_id.to_owned(),
                deadline_ms,
                dag: Some(wiring),
                client_context: None,
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
        self.streamed.clear();
        let exchange = async {
            if let Some(frame) = &frame {
                self.sock.write_all(frame).await?;
            }
            if let Some(fds) = fds {
                send_fds(&self.sock, &fds).await?;
            }
            loop {
                match read_frame(&mut self.sock).await {
                    Ok(Some((FromRuntime::Logs { logs }, _))) => {
                        append_logs(&mut self.streamed, &logs)
                    }
                    other => return other,
                }
            }
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
                client_context: None,
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
                    error_logged,
                    handler_start_ns,
                    handler_end_ns,
                    dag,
                    imported,
                    unimportable,
                },
                body,
            ))) => Ok(Reply {
                imported,
                unimportable,
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
                logs: {
                    let mut all = std::mem::take(&mut self.streamed);
                    append_logs(&mut all, &logs);
                    all
                },
                error_logged,
            }),
            Ok(Some((other, _))) => Err(InvokeFailure::Exited {
                detail: format!("protocol violation: unexpected {other:?}"),
            }),
            Err(e) if too_long_body(&e).is_some() => {
                let size = too_long_body(&e).unwrap_or_default();
                // What follows the refused prefix is unread: the instance cannot serve again.
                Err(InvokeFailure::ResponseTooLarge {
                    size,
                    limit: limit.min(protocol::MAX_BODY as usize) as u64,
                })
            }
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

    /// What the current (failed) invocation printed before it failed.
    pub fn take_logs(&mut self) -> String {
        std::mem::take(&mut self.streamed)
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
        cg.process_count() > expected
    }

    /// Host pids of the processes in the instance's cgroup.
    pub fn pids(&self) -> Vec<i32> {
        self.cgroup.as_ref().map(Cgroup::pids).unwrap_or_default()
    }

    /// Memory charged to the instance's cgroup now, bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(Cgroup::memory_current)
    }

    /// Peak memory use of the sandbox, MiB: its cgroup's peak, plus (a cfork child) the
    /// template's resident memory it shares, since the function's code touches those pages
    /// as its own (an upper bound: pages the child copied on write count in both).
    pub fn memory_peak_mb(&self) -> Option<u64> {
        self.cgroup
            .as_ref()?
            .memory_peak()
            .map(|b| (b + self.shared_bytes).div_ceil(1 << 20))
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

/// The size of a reply body the protocol refused as too long, if that is what `e` is.
fn too_long_body(e: &std::io::Error) -> Option<u64> {
    match e.get_ref()?.downcast_ref::<protocol::ProtocolError>()? {
        protocol::ProtocolError::TooLong {
            what: "body", len, ..
        } => Some(u64::from(*len)),
        _ => None,
    }
}
