//! Building a function's dependency layer: `pip install --target` or `npm ci` run by the
//! function's own interpreter inside a build sandbox, isolated as a function is (namespaces,
//! a cgroup with memory and pid limits, an unprivileged uid, seccomp), with a time limit and
//! a size-capped scratch space that bounds the output.
//!
//! The sandbox sees the function's code read-only at `/var/task`, the offline index (if the
//! daemon has one) read-only at [`INDEX_ROOT`], and an empty output directory writable at
//! [`OUT_ROOT`]. The output directory is a tmpfs the daemon mounts for the build (size
//! [`BuildLimits::max_output_mb`], owned by the build's uid, `nosuid,nodev,noexec`; its pages
//! are charged to the build's cgroup), so that the limit holds while the build runs and a
//! build can never fill the host's disk. The package manager installs into the sandbox's
//! `/tmp` (a tmpfs of the limit plus room for its scratch files) and copies the result to
//! [`OUT_ROOT`]; after a successful build the daemon copies that tree onto disk (regular
//! files, directories and symlinks as links, never followed; anything else left out), seals
//! it, and unmounts the tmpfs, which it unmounts on every other path too.
//!
//! Requirements that name the function's own code (local paths) build from a writable copy
//! of it at [`TASK_COPY`]: pip cannot build a `setup.py` package in the read-only
//! `/var/task` (it writes `*.egg-info` beside it).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use spore_core::{error_chain, Runtime};
use spore_sandbox::cgroup::{Cgroup, Limits};
use spore_sandbox::{BindMount, SandboxSpec};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::sandbox::InstanceEnv;

/// Where the offline index appears inside a build sandbox.
pub const INDEX_ROOT: &str = "/opt/spore/index";
/// Where the output directory appears inside a build sandbox.
pub const OUT_ROOT: &str = "/opt/spore/build";
/// Where a build whose requirements name local paths finds its writable copy of the code.
pub const TASK_COPY: &str = "/tmp/task";

/// How a build reaches packages: the one place that decides a build sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildNetwork {
    /// No network at all: packages come only from this directory of wheels (`pip
    /// --no-index --find-links`) and npm cache (`<dir>/npm`, `npm ci --offline`), bound
    /// read-only.
    OfflineIndex(PathBuf),
    /// Network egress, as an egress function has (a veth into the daemon's bridge, NAT, the
    /// host's resolvers; never the host itself, link-local addresses or other sandboxes):
    /// pip and npm reach their registries.
    Egress,
}

/// Limits of one build.
#[derive(Debug, Clone, Copy)]
pub struct BuildLimits {
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Largest installed result, MiB.
    pub max_output_mb: u32,
    /// Memory of the build's cgroup, MiB (it holds the size-capped scratch space too).
    pub memory_mb: u32,
    /// Process (and thread) limit.
    pub pids_max: u32,
}

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            timeout: Duration::from_secs(300),
            max_output_mb: 250,
            memory_mb: 1536,
            pids_max: 256,
        }
    }
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The platform failed (cgroup, spawn): not the requirements' fault.
    #[error("Could not start the dependency build: {0}")]
    Platform(String),
    /// The package manager failed; its last lines say why.
    #[error("{tool} failed (exit status {status}):\n{tail}")]
    Failed {
        /// `pip` or `npm`.
        tool: &'static str,
        /// Its exit status (or 128 + signal).
        status: i32,
        /// The last lines of its output.
        tail: String,
    },
    /// The build ran past its time limit and was killed.
    #[error("The dependency build ran past its limit of {0} s and was stopped")]
    TimedOut(u64),
    /// The build ran out of memory.
    #[error("The dependency build ran out of memory (limit {0} MiB) and was stopped")]
    OutOfMemory(u32),
    /// The build's output filled its space.
    #[error("The dependency build's output reached the limit of {0} MiB (spore serve --build-max-mb) and the build failed:\n{1}")]
    OutputTooLarge(u32, String),
}

/// The command a build runs (through `/bin/sh -c`) for `runtime` with `interpreter` (the
/// function's own: pip runs as `<interpreter> -m pip`, npm with the interpreter's directory
/// first on `PATH`); `local`: the requirements name the function's own code, so the build
/// works in a writable copy of it at [`TASK_COPY`].
fn script(
    runtime: Runtime,
    interpreter: &Path,
    local: bool,
    network: &BuildNetwork,
) -> (&'static str, String) {
    let offline = matches!(network, BuildNetwork::OfflineIndex(_));
    let task = spore_runtime::TASK_ROOT;
    // A writable copy (cp gives the build's uid the files; read-only modes are widened).
    let copy = format!("cp -R {task} {TASK_COPY} && chmod -R u+w {TASK_COPY} && ");
    match runtime {
        Runtime::Python3 => {
            let index = if offline {
                format!(" --no-index --find-links {INDEX_ROOT}")
            } else {
                String::new()
            };
            // Local paths: absolute ones are rewritten to the copy, relative ones resolve
            // against it (the working directory).
            let (prepare, requirements) = if local {
                (
                    format!(
                        "{copy}sed 's#{task}#{TASK_COPY}#g' {task}/requirements.txt > {TASK_COPY}/requirements.txt && cd {TASK_COPY} && "
                    ),
                    format!("{TASK_COPY}/requirements.txt"),
                )
            } else {
                (String::new(), format!("{task}/requirements.txt"))
            };
            (
                "pip",
                format!(
                    "{prepare}{} -m pip install --disable-pip-version-check --no-input --no-cache-dir \
                     --progress-bar off --no-warn-script-location --target /tmp/out \
                     -r {requirements}{index} && cp -R /tmp/out/. {OUT_ROOT}/",
                    interpreter.display(),
                ),
            )
        }
        Runtime::Node20 => {
            let cache = if offline {
                // npm writes to its cache even offline: work on a copy.
                format!("cp -R {INDEX_ROOT}/npm /tmp/npm-cache && ")
            } else {
                String::new()
            };
            let flags = if offline { " --offline" } else { "" };
            let path = interpreter
                .parent()
                .map(|d| format!("PATH={}:$PATH ", d.display()))
                .unwrap_or_default();
            // Local dependencies (`file:`) resolve against the whole code, copied; npm links
            // a `file:` folder into node_modules, so the links are followed when the result
            // is copied out (the copy stays inside the output's size limit).
            let (work, cp) = if local {
                (format!("{copy}cd {TASK_COPY}"), "cp -RL")
            } else {
                (
                    format!(
                        "mkdir -p /tmp/out && cd /tmp/out && \
                         for f in package.json package-lock.json npm-shrinkwrap.json; do \
                         if [ -f {task}/$f ]; then cp {task}/$f .; fi; done"
                    ),
                    "cp -R",
                )
            };
            (
                "npm",
                format!(
                    "{cache}{work} && \
                     {path}npm ci --omit=dev --no-audit --no-fund --ignore-scripts --cache /tmp/npm-cache{flags} && \
                     {cp} node_modules {OUT_ROOT}/",
                ),
            )
        }
    }
}

/// The tmpfs a build writes its output to, mounted on the host for the build's lifetime:
/// unmounted (lazily, should a process still hold it) and removed when dropped, on every
/// path.
struct Scratch {
    dir: PathBuf,
    mounted: bool,
}

impl Scratch {
    /// Mounts a tmpfs of `size_mb` MiB at `dir` (created here), owned by `uid`, mode 0700.
    fn mount(dir: &Path, size_mb: u32, uid: u32) -> std::io::Result<Scratch> {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir(dir)?;
        let mut s = Scratch {
            dir: dir.to_owned(),
            mounted: false,
        };
        let opts = format!("size={size_mb}m,mode=0700,uid={uid},gid={uid}");
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(opts.as_str()),
        )
        .map_err(std::io::Error::from)?;
        s.mounted = true;
        Ok(s)
    }

    /// Whether less than 1 MiB is left: a build that failed so ran out of output space.
    // The statvfs field types differ between targets.
    #[allow(clippy::useless_conversion)]
    fn is_full(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.dir)
            .map(|v| u64::from(v.blocks_available()) * u64::from(v.fragment_size()) < 1 << 20)
            .unwrap_or(false)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(dir = %self.dir.display(), "unmounting a build's output tmpfs: {e}");
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes what a build cut short by a daemon's stop left at `path` in the layers' root
/// (its staging directory, or its output tmpfs: unmounted first).
pub fn remove_leftover(path: &Path) -> std::io::Result<()> {
    if path.to_string_lossy().ends_with(".tmpfs") {
        // Not mounted (EINVAL) is fine: the directory is removed below.
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    }
    std::fs::remove_dir_all(path)
}

/// Builds the dependencies of the code in `code_dir` for `runtime` with `interpreter` into
/// `out_dir` (an empty directory the caller made, on disk), calling `on_line` with each line
/// of the package manager's output; `local`: the requirements name the code's own files.
/// The output is owned by root and readable by all when this returns `Ok`.
#[allow(clippy::too_many_arguments)]
pub async fn build_layer(
    env: &InstanceEnv,
    runtime: Runtime,
    interpreter: &Path,
    local: bool,
    code_dir: &Path,
    out_dir: &Path,
    network: &BuildNetwork,
    limits: BuildLimits,
    mut on_line: impl FnMut(String) + Send,
) -> Result<(), BuildError> {
    let platform =
        |what: &str, e: &dyn std::fmt::Display| BuildError::Platform(format!("{what}: {e}"));
    let seq = env.next_seq();
    let id = format!("build-{seq}");
    let uid = env.uid_base + (seq % 100_000) as u32;
    let mut scratch_name = out_dir.file_name().unwrap_or_default().to_owned();
    scratch_name.push(".tmpfs");
    let scratch = Scratch::mount(
        &out_dir.with_file_name(scratch_name),
        limits.max_output_mb,
        uid,
    )
    .map_err(|e| platform("mounting the build's output tmpfs", &e))?;
    let cg_limits = Limits {
        memory_bytes: u64::from(limits.memory_mb) << 20,
        cpu_millis: env.cpu_millis,
        pids_max: limits.pids_max,
    };
    let (layout, parent, name) = (env.layout.clone(), env.cgroup_parent.clone(), id.clone());
    let cgroup =
        tokio::task::spawn_blocking(move || Cgroup::create(&layout, &parent, &name, cg_limits))
            .await
            .map_err(|e| platform("cgroup task", &e))?
            .map_err(|e| BuildError::Platform(error_chain(&e)))?;
    let result = run_in(
        env,
        (runtime, interpreter, local),
        code_dir,
        &scratch.dir,
        network,
        limits,
        &id,
        uid,
        &cgroup,
        &mut on_line,
    )
    .await;
    let oom = cgroup.oom_killed();
    crate::sandbox::destroy_cgroup(cgroup).await;
    match result {
        Err(BuildError::Failed { tail, .. }) if scratch.is_full() => {
            Err(BuildError::OutputTooLarge(limits.max_output_mb, tail))
        }
        Err(BuildError::Failed { .. }) if oom => Err(BuildError::OutOfMemory(limits.memory_mb)),
        Ok(()) => {
            let out = out_dir.to_owned();
            // The guard moves into the task: the tmpfs goes once the copy is done (or the
            // task is dropped).
            tokio::task::spawn_blocking(move || {
                copy_tree(&scratch.dir, &out)?;
                drop(scratch);
                seal(&out)
            })
            .await
            .map_err(|e| platform("sealing task", &e))?
            .map_err(|e| platform("storing the layer", &e))
        }
        other => other,
    }
}

/// Copies the tree at `src` into the existing directory `dst`: directories, regular files,
/// and symlinks as symlinks (never followed); FIFOs, sockets and devices are left out.
fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    let mut stack = vec![(src.to_owned(), dst.to_owned())];
    while let Some((from, to)) = stack.pop() {
        for e in std::fs::read_dir(&from)? {
            let e = e?;
            let (path, target) = (e.path(), to.join(e.file_name()));
            let ft = e.file_type()?;
            if ft.is_dir() {
                std::fs::create_dir(&target)?;
                stack.push((path, target));
            } else if ft.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&path)?, &target)?;
            } else if ft.is_file() {
                use std::os::unix::fs::OpenOptionsExt;
                let mut input = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)?;
                let mut output = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)?;
                std::io::copy(&mut input, &mut output)?;
                use std::os::unix::fs::PermissionsExt;
                let mode = input.metadata()?.permissions().mode();
                output.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_in(
    env: &InstanceEnv,
    (runtime, interpreter, local): (Runtime, &Path, bool),
    code_dir: &Path,
    out_dir: &Path,
    network: &BuildNetwork,
    limits: BuildLimits,
    id: &str,
    uid: u32,
    cgroup: &Cgroup,
    on_line: &mut (impl FnMut(String) + Send),
) -> Result<(), BuildError> {
    let platform =
        |what: &str, e: &dyn std::fmt::Display| BuildError::Platform(format!("{what}: {e}"));
    let (tool, script) = script(runtime, interpreter, local, network);
    let mut spec = SandboxSpec {
        id: id.to_owned(),
        rootfs: env.rootfs.clone(),
        binds: vec![],
        symlinks: vec![],
        files: vec![],
        // The installed result and the package manager's scratch files.
        tmp_size_mb: limits.max_output_mb + 256,
        uid,
        gid: uid,
        argv: vec!["/bin/sh".into(), "-c".into(), script],
        env: vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), "/tmp".into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
            ("npm_config_update_notifier".into(), "false".into()),
        ],
        cwd: "/tmp".into(),
        cgroup_join: cgroup.self_attach_files(),
        max_open_files: 4096,
        control_fd: 0,
        user_namespace: None,
        restore: None,
        restore_mode: None,
        wait_for_go: false,
        daemon_pid: Some(std::process::id()),
        opt_layers: Vec::new(),
        egress: None,
    };
    spore_sandbox::host_runtime_rootfs(&mut spec);
    let mut dirs = vec![(code_dir.to_owned(), spore_runtime::TASK_ROOT.to_owned())];
    match network {
        BuildNetwork::OfflineIndex(index) => dirs.push((index.clone(), INDEX_ROOT.to_owned())),
        BuildNetwork::Egress => {
            let egress = env.egress.as_ref().map_err(|why| {
                BuildError::Platform(format!(
                    "a dependency build needs network egress, which this daemon cannot give ({why}); give spore serve --build-index-dir, or vendor the packages and deploy with --no-build"
                ))
            })?;
            spec.files
                .push(("/etc/resolv.conf".into(), egress.resolv_conf()));
            spec.egress = Some(
                egress
                    .lease()
                    .map_err(|e| BuildError::Platform(error_chain(&e)))?,
            );
        }
    }
    crate::sandbox::bind_read_only_dirs(&mut spec, &dirs);
    spec.binds.push(BindMount {
        source: out_dir.to_owned(),
        target: OUT_ROOT.into(),
        read_only: false,
    });
    let devnull = std::fs::File::open("/dev/null").map_err(|e| platform("/dev/null", &e))?;
    let mut cmd = spore_sandbox::command(&env.exe, &spec)
        .map_err(|e| BuildError::Platform(error_chain(&e)))?;
    cmd.stdin(Stdio::from(OwnedFd::from(devnull)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| platform(&format!("spawning {}", env.exe.display()), &e))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(lines_into(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(lines_into(err, tx));
    }
    let mut tail = std::collections::VecDeque::new();
    let deadline = tokio::time::Instant::now() + limits.timeout;
    // Output until both pipes close (the sandbox exited, or the deadline).
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => {
                if tail.len() == 20 {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                on_line(line);
            }
            Ok(None) => break,
            Err(_) => {
                let _ = child.start_kill();
                let _ = cgroup.kill_all();
                let _ = child.wait().await;
                return Err(BuildError::TimedOut(limits.timeout.as_secs()));
            }
        }
    }
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(s) => s.map_err(|e| platform("waiting for the build", &e))?,
        Err(_) => {
            let _ = child.start_kill();
            let _ = cgroup.kill_all();
            return Err(BuildError::TimedOut(limits.timeout.as_secs()));
        }
    };
    if status.success() {
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    if code == spore_sandbox::SETUP_FAILED_EXIT {
        return Err(BuildError::Platform(format!(
            "the build sandbox could not be set up: {}",
            tail.into_iter().collect::<Vec<_>>().join("\n")
        )));
    }
    Err(BuildError::Failed {
        tool,
        status: code,
        tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
    })
}

async fn lines_into<R: AsyncRead + Unpin>(r: R, tx: tokio::sync::mpsc::Sender<String>) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if tx.send(line).await.is_err() {
            break;
        }
    }
}

/// Gives the layer to root, readable by all and writable by none but root: the build's uid
/// (which a later sandbox may get) keeps nothing in it.
fn seal(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        std::os::unix::fs::lchown(&d, Some(0), Some(0))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let path = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            std::os::unix::fs::lchown(&path, Some(0), Some(0))?;
            if ft.is_file() {
                let mode = std::fs::metadata(&path)?.permissions().mode();
                let exec = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(exec))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_builds_never_name_an_index_on_the_network() {
        let off = BuildNetwork::OfflineIndex("/idx".into());
        let py3 = Path::new("/usr/bin/python3.12");
        let (tool, py) = script(Runtime::Python3, py3, false, &off);
        assert_eq!(tool, "pip");
        assert!(py.starts_with("/usr/bin/python3.12 -m pip install"), "{py}");
        assert!(py.contains("-r /var/task/requirements.txt"), "{py}");
        assert!(!py.contains(TASK_COPY), "{py}");
        assert!(
            py.contains("--no-index --find-links /opt/spore/index"),
            "{py}"
        );
        assert!(py.contains("--target /tmp/out"), "{py}");
        let node = Path::new("/usr/local/bin/node");
        let (tool, js) = script(Runtime::Node20, node, false, &off);
        assert_eq!(tool, "npm");
        assert!(js.contains("npm ci") && js.contains("--offline"), "{js}");
        assert!(js.contains("PATH=/usr/local/bin:$PATH npm ci"), "{js}");
        let (_, online) = script(Runtime::Python3, py3, false, &BuildNetwork::Egress);
        assert!(!online.contains("--no-index"), "{online}");
    }

    #[test]
    fn local_requirements_build_from_a_writable_copy_of_the_code() {
        let py3 = Path::new("/usr/bin/python3.11");
        let (_, py) = script(Runtime::Python3, py3, true, &BuildNetwork::Egress);
        assert!(
            py.starts_with("cp -R /var/task /tmp/task && chmod -R u+w /tmp/task"),
            "{py}"
        );
        assert!(
            py.contains("sed 's#/var/task#/tmp/task#g' /var/task/requirements.txt > /tmp/task/requirements.txt && cd /tmp/task && /usr/bin/python3.11 -m pip"),
            "{py}"
        );
        assert!(py.contains("-r /tmp/task/requirements.txt"), "{py}");
        let (_, js) = script(
            Runtime::Node20,
            Path::new("/usr/bin/node"),
            true,
            &BuildNetwork::Egress,
        );
        assert!(
            js.contains("cd /tmp/task && PATH=/usr/bin:$PATH npm ci"),
            "{js}"
        );
    }

    #[test]
    fn the_copy_keeps_symlinks_as_links_and_leaves_fifos_out() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("pkg")).unwrap();
        std::fs::write(src.path().join("pkg/a.py"), "x = 1\n").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.path().join("pkg/out")).unwrap();
        nix::unistd::mkfifo(&src.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        copy_tree(src.path(), dst.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dst.path().join("pkg/a.py")).unwrap(),
            "x = 1\n"
        );
        let link = dst.path().join("pkg/out");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/etc/shadow"));
        assert!(!dst.path().join("fifo").exists());
    }
}
