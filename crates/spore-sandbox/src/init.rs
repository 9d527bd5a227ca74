//! The in-sandbox init: runs as `spore __sandbox-init`, single-threaded, as root.
//!
//! Parent (outside the new pid namespace): joins the cgroups, unshares the namespaces, forks,
//! and waits; its exit status is the runtime's (128 + signal when killed). Child (pid 1 of the
//! new namespace): builds the rootfs, drops privileges and execs the runtime.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{
    chdir, execve, fork, pivot_root, setgroups, sethostname, setresgid, setresuid, setsid,
    ForkResult, Gid, Uid,
};

use crate::{SandboxSpec, SETUP_FAILED_EXIT, SPEC_ENV};

/// A failed setup step: what was being done, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
struct InitError {
    step: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

trait Step<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, InitError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Step<T> for Result<T, E> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, InitError> {
        self.map_err(|e| InitError {
            step: what(),
            source: Box::new(e),
        })
    }
}

/// Entry point of `spore __sandbox-init`. Never returns.
pub fn run_init() -> ! {
    match init_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(&e),
    }
}

fn fail(e: &InitError) -> ! {
    let mut msg = format!("spore sandbox setup failed: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
    std::process::exit(SETUP_FAILED_EXIT)
}

fn init_main() -> Result<i32, InitError> {
    let json = std::env::var(SPEC_ENV).step(|| format!("reading {SPEC_ENV}"))?;
    let spec: SandboxSpec =
        serde_json::from_str(&json).step(|| "parsing the sandbox spec".into())?;
    // Single-threaded here (just exec'd), so moving this thread moves the process.
    for file in &spec.cgroup_join {
        fs::write(file, "0").step(|| format!("joining cgroup {}", file.display()))?;
    }
    setsid().step(|| "setsid".into())?;
    // The mount namespace is pid 1's alone (it unshares it itself): pivot_root moves the root
    // of every process in a namespace, and this parent must keep the host's /proc.
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET;
    if spec.user_namespace.is_none() {
        // A cfork template's children move themselves into cgroups outside the template's,
        // which a cgroup namespace rooted at the template's group would hide.
        flags |= CloneFlags::CLONE_NEWCGROUP;
    }
    // A lazy restore's pages are served by a helper process forked here, before the new
    // pid namespace exists (a process that unshared its pid namespace can no longer start
    // threads, and its later children would land in the sandbox's namespace). The sandbox's
    // runtime makes the userfaultfd and hands it over on this socket; the helper serves it
    // until this process (the sandbox's outer init) exits.
    let mode = match spec.restore_mode.as_deref() {
        None => spore_snapshot::restore::MemoryMode::Full,
        Some(m) => m
            .parse()
            .map_err(std::io::Error::other)
            .step(|| "the restore mode".into())?,
    };
    let lazy = match (&spec.restore, mode) {
        (Some(_), spore_snapshot::restore::MemoryMode::Full) | (None, _) => None,
        (Some(path), _) => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .step(|| "socketpair for the fault server".into())?;
            let outer = std::process::id() as i32;
            // SAFETY: single-threaded (see below); the child only serves faults and exits.
            match unsafe { fork() }.step(|| "fork of the fault server".into())? {
                ForkResult::Child => {
                    drop(theirs);
                    // Only the runtime may hold the control socket (stdin).
                    if let Ok(null) = fs::File::open("/dev/null") {
                        let _ = nix::unistd::dup2_stdin(null);
                    }
                    let served = spore_snapshot::image::Image::open(path).and_then(|image| {
                        spore_snapshot::restore::run_server(&ours, &image, mode, outer)
                    });
                    if let Err(e) = served {
                        eprintln!("spore restore: fault server: {e}");
                    }
                    std::process::exit(0);
                }
                ForkResult::Parent { .. } => Some(theirs),
            }
        }
    };
    if let Some(lease) = &spec.egress {
        // The network namespace comes first, so that the init (still in the host's) can give
        // it a veth pair before anything runs in it.
        give_egress(lease)?;
        flags.remove(CloneFlags::CLONE_NEWNET);
    }
    unshare(flags).step(|| "unsharing namespaces".into())?;
    // Pipes for the user-namespace handshake: the child says "unshared", the parent writes
    // its id maps (which needs CAP_SETUID in this, the parent, namespace) and says "go".
    let handshake = match spec.user_namespace {
        Some(_) => Some((
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).step(|| "pipe".into())?,
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).step(|| "pipe".into())?,
        )),
        None => None,
    };
    // SAFETY: this process was just exec'd as `spore __sandbox-init` and has started no
    // threads, so the child is a complete copy with no locks held by vanished threads.
    match unsafe { fork() }.step(|| "fork of the namespace init".into())? {
        ForkResult::Parent { child } => {
            drop(lazy);
            // Only the runtime may hold the control socket, so that its death is seen as EOF.
            let devnull = fs::File::open("/dev/null").step(|| "opening /dev/null".into())?;
            nix::unistd::dup2_stdin(devnull).step(|| "closing the control socket".into())?;
            if let (Some(map), Some(((unshared, _), (_, go)))) = (spec.user_namespace, handshake) {
                write_id_maps(child, map, unshared, go)?;
            }
            if let Some(daemon) = spec.daemon_pid {
                if let Err(e) = watch_daemon(daemon, child) {
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    return Err(e);
                }
            }
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).step(|| "waiting for the sandbox".into()),
                }
            }
        }
        ForkResult::Child => {
            let pipes = handshake.map(|((_, unshared), (go, _))| (unshared, go));
            let lazy = lazy.map(|theirs| (mode, theirs));
            match child_main(&spec, pipes, lazy) {
                Ok(never) => match never {},
                Err(e) => fail(&e),
            }
        }
    }
}

/// Moves this process into a new network namespace with egress through `lease`: the veth
/// pair is made from the host's namespace (over netlink), naming the new one through this
/// process's descriptor of it.
fn give_egress(lease: &crate::egress::Lease) -> Result<(), InitError> {
    use std::os::fd::AsRawFd;
    let host = fs::File::open("/proc/self/ns/net")
        .step(|| "opening the host's network namespace".into())?;
    unshare(CloneFlags::CLONE_NEWNET).step(|| "unsharing the network namespace".into())?;
    let own = fs::File::open("/proc/self/ns/net")
        .step(|| "opening the sandbox's network namespace".into())?;
    nix::sched::setns(&host, CloneFlags::CLONE_NEWNET)
        .step(|| "returning to the host's network namespace".into())?;
    let path = format!("/proc/{}/fd/{}", std::process::id(), own.as_raw_fd());
    let attached =
        crate::egress::attach(lease, &path).step(|| "giving the sandbox network egress".into());
    nix::sched::setns(&own, CloneFlags::CLONE_NEWNET)
        .step(|| "entering the sandbox's network namespace".into())?;
    attached
}

/// Returns when the sandbox's pid 1 (`child`) has exited (not yet reaped), or once it has
/// been killed because the daemon (`daemon`, this process's parent) exited: killing pid 1
/// kills every process of its pid namespace, nested namespaces (a template's children)
/// included. The daemon is watched through a pidfd, which becomes readable when the whole
/// process has exited, whichever of its threads started this one (a parent-death signal
/// would follow the thread, and the daemon's tokio threads come and go).
fn watch_daemon(daemon: u32, child: nix::unistd::Pid) -> Result<(), InitError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let watched = spore_snapshot::lazy::pidfd(daemon as i32);
    if nix::unistd::getppid().as_raw() as u32 != daemon {
        // The daemon exited before the pidfd was opened (this process has a new parent), or
        // the number is another process's by now.
        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        return Ok(());
    }
    // Still our parent after the open: the pidfd is the daemon's.
    let watched = watched.step(|| "watching the daemon".into())?;
    let pid1 =
        spore_snapshot::lazy::pidfd(child.as_raw()).step(|| "watching the sandbox".into())?;
    loop {
        let mut fds = [
            PollFd::new(pid1.as_fd(), PollFlags::POLLIN),
            PollFd::new(watched.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).step(|| "watching the daemon".into()),
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[0]) {
            return Ok(());
        }
        if ready(&fds[1]) {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            return Ok(());
        }
    }
}

/// Parent side of the user-namespace handshake.
fn write_id_maps(
    child: nix::unistd::Pid,
    map: crate::IdMapping,
    unshared: std::os::fd::OwnedFd,
    go: std::os::fd::OwnedFd,
) -> Result<(), InitError> {
    let mut byte = [0u8; 1];
    let mut reader = fs::File::from(unshared);
    use std::io::{Read, Write};
    if reader
        .read(&mut byte)
        .step(|| "waiting for the user namespace".into())?
        == 0
    {
        // The child failed before unsharing; its error is on stderr and its status follows.
        return Ok(());
    }
    let line = format!("0 {} {}\n", map.host_base, map.count);
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{child}/{file}");
        fs::write(&path, &line).step(|| format!("writing {path}"))?;
    }
    fs::File::from(go)
        .write_all(b"g")
        .step(|| "releasing the sandbox".into())?;
    Ok(())
}

fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

type Handshake = (std::os::fd::OwnedFd, std::os::fd::OwnedFd);

fn child_main(
    spec: &SandboxSpec,
    handshake: Option<Handshake>,
    lazy: Option<(
        spore_snapshot::restore::MemoryMode,
        std::os::unix::net::UnixStream,
    )>,
) -> Result<Infallible, InitError> {
    die_with_parent()?;
    // A snapshot is read from the host's file system, before the rootfs hides it.
    let image = match &spec.restore {
        Some(path) => {
            match spore_snapshot::image::Image::open(path)
                .and_then(|mut image| image.move_fd_above(64).map(|()| image))
            {
                Ok(image) => Some(image),
                Err(e) => restore_failed(&e),
            }
        }
        None => None,
    };
    // So is a reap restore's working set.
    let working_set = match (&image, &lazy) {
        (Some(image), Some((spore_snapshot::restore::MemoryMode::Reap, _))) => {
            spore_snapshot::lazy::read_working_set(
                &spore_snapshot::lazy::working_set_path(&image.path),
                image,
            )
        }
        _ => None,
    };
    build_rootfs(spec)?;
    // userfaultfd needs privileges the sandbox is about to drop (and its seccomp filter
    // denies the call).
    // Both descriptors move above the numbers the set-up below assigns (the control socket
    // becomes fd 3).
    let lazy = match lazy {
        Some((mode, sock)) => {
            let moved = spore_snapshot::lazy::create().and_then(|uffd| {
                Ok((
                    mode,
                    fd_above(uffd, 64)?,
                    std::os::unix::net::UnixStream::from(fd_above(sock.into(), 64)?),
                ))
            });
            match moved {
                Ok(lazy) => Some(lazy),
                Err(e) => restore_failed(&e),
            }
        }
        None => None,
    };
    sethostname(&spec.id).step(|| "setting the hostname".into())?;
    loopback_up()?;
    let nofile = spec.max_open_files;
    setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile).step(|| "setting RLIMIT_NOFILE".into())?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).step(|| "setting RLIMIT_CORE".into())?;
    if spec.control_fd > 0 {
        move_stdin_to(spec.control_fd)?;
    }
    // Everything above the control fd closes on exec.
    // SAFETY: close_range only changes descriptor flags; no memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (spec.control_fd.max(2) + 1) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).step(|| "close_range".into());
    }
    let filters = match handshake {
        Some((unshared, go)) => {
            enter_user_namespace(unshared, go)?;
            pid_namespace_of_user_namespace(spec.control_fd)?;
            crate::seccomp::filters_for(crate::seccomp::Profile::Template)
        }
        None => {
            drop_privileges(spec.uid, spec.gid)?;
            crate::seccomp::filters()
        }
    }
    .step(|| "compiling the seccomp filter".into())?;
    for filter in &filters {
        seccompiler::apply_filter(filter).step(|| "installing the seccomp filter".into())?;
    }
    chdir(spec.cwd.as_str()).step(|| format!("chdir {}", spec.cwd))?;
    if let Some(image) = image {
        let (mode, lazy) = match lazy {
            Some((mode, uffd, sock)) => (mode, Some((uffd, sock))),
            None => (spore_snapshot::restore::MemoryMode::Full, None),
        };
        let opts = spore_snapshot::restore::RestoreOptions {
            mode,
            keep_fds: vec![0, 1, 2, spec.control_fd],
            lazy,
            working_set,
        };
        // The image's regions are mapped before the go-ahead: a spare then pays only for
        // the memory and the resume when it is wanted.
        let prepared = match spore_snapshot::restore::prepare(&image, &opts) {
            Ok(p) => p,
            Err(e) => restore_failed(&e),
        };
        if spec.wait_for_go {
            wait_for_go(spec.control_fd)?;
        }
        match prepared.finish() {
            Ok(never) => match never {},
            Err(e) => restore_failed(&e),
        }
    }
    let cstr = |s: &str| CString::new(s).step(|| format!("{s:?} has a NUL byte"));
    let argv = spec
        .argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = spec
        .env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let prog = argv
        .first()
        .ok_or_else(|| std::io::Error::other("empty argv"))
        .step(|| "starting the runtime".into())?;
    execve(prog, &argv, &env).step(|| format!("exec {}", spec.argv[0]))
}

/// Ready ahead of time: waits for the one byte the daemon sends when an instance is wanted;
/// exits when it closes the socket instead (this one is not wanted).
fn wait_for_go(control_fd: i32) -> Result<(), InitError> {
    let mut go = [0u8; 1];
    loop {
        // SAFETY: reads at most one byte into `go` from the control socket, which this
        // process holds at that number.
        let n = unsafe { libc::read(control_fd, go.as_mut_ptr().cast(), 1) };
        match n {
            1 => return Ok(()),
            0 => std::process::exit(0),
            _ if nix::errno::Errno::last() == nix::errno::Errno::EINTR => continue,
            _ => {
                return Err(std::io::Error::last_os_error())
                    .step(|| "waiting for the go-ahead".into())
            }
        }
    }
}

/// `fd` moved to the lowest free number >= `min` (close-on-exec).
fn fd_above(
    fd: std::os::fd::OwnedFd,
    min: i32,
) -> Result<std::os::fd::OwnedFd, spore_snapshot::SnapshotError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own; the original closes on drop.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(spore_snapshot::SnapshotError::Restore(format!(
            "moving a descriptor above {min}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

fn restore_failed(e: &spore_snapshot::SnapshotError) -> ! {
    eprintln!("spore restore failed: {e}");
    if matches!(e, spore_snapshot::SnapshotError::Collision(_)) {
        std::process::exit(crate::RESTORE_COLLISION_EXIT)
    }
    std::process::exit(crate::RESTORE_FAILED_EXIT)
}

fn mount_err(what: &str, target: &Path) -> impl FnOnce() -> String {
    let msg = format!("mounting {what} on {}", target.display());
    move || msg
}

/// Merges `spec.opt_layers` read-only at `/opt`: an overlay whose lowest layer is the root
/// tmpfs's own `/opt`, holding the mount points of the binds under `/opt` (the overlay is
/// read-only, so they could not be made after).
fn mount_opt_layers(spec: &SandboxSpec, root: &Path) -> Result<(), InitError> {
    let opt = inside(root, "/opt");
    fs::create_dir_all(&opt).step(|| "mkdir /opt".into())?;
    for bind in &spec.binds {
        if !bind.target.starts_with("/opt/") {
            continue;
        }
        let target = inside(root, &bind.target);
        if bind.source.is_dir() {
            fs::create_dir_all(&target).step(|| format!("mkdir {}", target.display()))?;
        } else {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).step(|| format!("mkdir {}", parent.display()))?;
            }
            fs::write(&target, b"").step(|| format!("creating {}", target.display()))?;
        }
    }
    let mut lower = Vec::with_capacity(spec.opt_layers.len() + 1);
    for dir in spec.opt_layers.iter().rev().chain(std::iter::once(&opt)) {
        let s = dir.to_str().unwrap_or(",");
        if s.contains([',', ':', '\\']) {
            return Err(std::io::Error::other("',', ':' or '\\' in the path"))
                .step(|| format!("layer directory {}", dir.display()));
        }
        lower.push(s.to_owned());
    }
    let data = format!("lowerdir={}", lower.join(":"));
    let mut flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // As the binds keep their source's noexec: layers on a noexec file system stay so.
    if spec
        .opt_layers
        .iter()
        .any(|d| statvfs(d.as_path()).is_ok_and(|st| st.flags().contains(FsFlags::ST_NOEXEC)))
    {
        flags |= MsFlags::MS_NOEXEC;
    }
    mount(
        Some("overlay"),
        &opt,
        Some("overlay"),
        flags,
        Some(data.as_str()),
    )
    .step(mount_err("the layers (overlay)", &opt))
}

fn build_rootfs(spec: &SandboxSpec) -> Result<(), InitError> {
    let none = None::<&str>;
    unshare(CloneFlags::CLONE_NEWNS).step(|| "unsharing the mount namespace".into())?;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .step(|| "making / private".into())?;
    let root = spec.rootfs.as_path();
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        base,
        Some("size=1m,mode=0755"),
    )
    .step(mount_err("the root tmpfs", root))?;
    if !spec.opt_layers.is_empty() {
        mount_opt_layers(spec, root)?;
    }

    for bind in &spec.binds {
        let target = inside(root, &bind.target);
        let is_dir = bind.source.is_dir();
        if is_dir {
            fs::create_dir_all(&target).step(|| format!("mkdir {}", target.display()))?;
        } else {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).step(|| format!("mkdir {}", parent.display()))?;
            }
            fs::write(&target, b"").step(|| format!("creating {}", target.display()))?;
        }
        mount(
            Some(bind.source.as_path()),
            &target,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .step(mount_err(&bind.source.to_string_lossy(), &target))?;
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | base;
        if bind.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        // Keep the flags the source mount has (noexec, atime policy).
        if let Ok(st) = statvfs(bind.source.as_path()) {
            let f = st.flags();
            for (fs_flag, ms_flag) in [
                (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
                (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
                (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
                (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            ] {
                if f.contains(fs_flag) {
                    flags |= ms_flag;
                }
            }
        }
        mount(none, &target, none, flags, none).step(mount_err("read-only flags", &target))?;
    }
    for (link, target) in &spec.symlinks {
        let path = inside(root, link);
        symlink(target, &path).step(|| format!("symlink {}", path.display()))?;
    }
    for (path, contents) in &spec.files {
        let file = inside(root, path);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent).step(|| format!("mkdir {}", parent.display()))?;
        }
        fs::write(&file, contents).step(|| format!("writing {}", file.display()))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644))
            .step(|| format!("chmod {}", file.display()))?;
    }

    let proc_dir = inside(root, "/proc");
    fs::create_dir_all(&proc_dir).step(|| "mkdir /proc".into())?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        base | MsFlags::MS_NOEXEC,
        none,
    )
    .step(mount_err("proc", &proc_dir))?;

    let dev = inside(root, "/dev");
    fs::create_dir_all(&dev).step(|| "mkdir /dev".into())?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .step(mount_err("the /dev tmpfs", &dev))?;
    for node in ["null", "zero", "full", "random", "urandom"] {
        let target = dev.join(node);
        fs::write(&target, b"").step(|| format!("creating /dev/{node}"))?;
        let host = Path::new("/dev").join(node);
        mount(Some(host.as_path()), &target, none, MsFlags::MS_BIND, none)
            .step(mount_err(&host.to_string_lossy(), &target))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).step(|| format!("symlink /dev/{link}"))?;
    }
    let tmp_opts = format!("size={}m,mode=1777", spec.tmp_size_mb);
    let private_dirs: &[&str] = if spec.user_namespace.is_some() {
        // A cfork template's children each mount their own /tmp; /dev/shm points there
        // rather than being one more mount on the fork path (and must not be the template's,
        // which all its children would share).
        symlink("/tmp", dev.join("shm")).step(|| "symlink /dev/shm".into())?;
        &["/tmp"]
    } else {
        &["/dev/shm", "/tmp"]
    };
    for dir in private_dirs {
        let target = inside(root, dir);
        fs::create_dir_all(&target).step(|| format!("mkdir {dir}"))?;
        mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            base,
            Some(tmp_opts.as_str()),
        )
        .step(mount_err("a tmpfs", &target))?;
    }

    mount(
        none,
        root,
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base,
        none,
    )
    .step(|| "making the root read-only".into())?;
    chdir(root).step(|| format!("chdir {}", root.display()))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves the
    // new root alone, with no directory needed for the old one.
    pivot_root(".", ".").step(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detaching the old root".into())?;
    chdir("/").step(|| "chdir /".into())?;
    Ok(())
}

fn loopback_up() -> Result<(), InitError> {
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .step(|| "opening a socket to configure loopback".into())?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in `req` into it; `req` is a
    // valid, live ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error()).step(|| "reading loopback flags".into());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags member.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq naming "lo" with its new flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(std::io::Error::last_os_error()).step(|| "bringing loopback up".into());
    }
    Ok(())
}

fn move_stdin_to(fd: i32) -> Result<(), InitError> {
    // SAFETY: dup2 onto `fd` replaces whatever it was; nothing in this process owns `fd`
    // (the init opens only CLOEXEC descriptors, closed by close_range/exec before use), and
    // the new descriptor is left open for the runtime (dup2 clears CLOEXEC).
    if unsafe { libc::dup2(0, fd) } < 0 {
        return Err(std::io::Error::last_os_error())
            .step(|| format!("dup2 of the control socket to fd {fd}"));
    }
    let devnull = fs::File::open("/dev/null").step(|| "opening /dev/null".into())?;
    nix::unistd::dup2_stdin(devnull).step(|| "replacing stdin".into())?;
    Ok(())
}

/// Child side of the user-namespace handshake: unshare, wait for the maps, become root of
/// the namespace with only [`crate::TEMPLATE_CAPS`].
fn enter_user_namespace(
    unshared: std::os::fd::OwnedFd,
    go: std::os::fd::OwnedFd,
) -> Result<(), InitError> {
    use std::io::{Read, Write};
    unshare(CloneFlags::CLONE_NEWUSER).step(|| "unsharing the user namespace".into())?;
    fs::File::from(unshared)
        .write_all(b"u")
        .step(|| "signalling the parent".into())?;
    let mut byte = [0u8; 1];
    if fs::File::from(go)
        .read(&mut byte)
        .step(|| "waiting for id maps".into())?
        == 0
    {
        return Err(std::io::Error::other(
            "the parent did not write the id maps",
        ))
        .step(|| "entering the user namespace".into());
    }
    let root_g = Gid::from_raw(0);
    setgroups(&[root_g]).step(|| "setgroups in the user namespace".into())?;
    setresgid(root_g, root_g, root_g).step(|| "setresgid in the user namespace".into())?;
    let root_u = Uid::from_raw(0);
    setresuid(root_u, root_u, root_u).step(|| "setresuid in the user namespace".into())?;
    die_with_parent()?;
    let keep: caps::CapsHashSet = crate::TEMPLATE_CAPS.into_iter().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, caps::CapSet::Bounding, cap)
                .step(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    for set in [caps::CapSet::Ambient, caps::CapSet::Inheritable] {
        caps::clear(None, set).step(|| format!("clearing the {set:?} capability set"))?;
    }
    // The exec of the runtime would cut the others to the bounding set; a restore has no
    // exec, so the restored template would keep every capability of its namespace.
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
        caps::set(None, set, &keep).step(|| format!("limiting the {set:?} capability set"))?;
    }
    prctl::set_no_new_privs().step(|| "setting no_new_privs".into())?;
    Ok(())
}

/// Gives the runtime pid and network namespaces owned by its user namespace: a cfork
/// template must be able to `setns` back into its own after preparing new ones for children,
/// which needs CAP_SYS_ADMIN over the namespace's owner. This process stays as the outer
/// pid 1 and reaper, and exits with the runtime's status.
fn pid_namespace_of_user_namespace(control_fd: i32) -> Result<(), InitError> {
    unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNET)
        .step(|| "unsharing the template's pid and network namespaces".into())?;
    // SAFETY: single-threaded (see init_main), so fork copies a consistent process.
    match unsafe { fork() }.step(|| "fork of the template".into())? {
        ForkResult::Child => die_with_parent(),
        ForkResult::Parent { child } => {
            // SAFETY: fd `control_fd` is the control socket, owned by nothing else in this
            // process; the runtime holds its own copy, whose closing the daemon must see.
            unsafe { libc::close(control_fd) };
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => std::process::exit(128 + sig as i32),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).step(|| "waiting for the template".into()),
                }
            }
        }
    }
}

/// Has the kernel kill this process when its parent (a single-threaded init) exits. A change
/// of ids clears the setting, so it is made again after each: pid 1 must die with the
/// sandbox's outer init, and with it every process of its namespace.
fn die_with_parent() -> Result<(), InitError> {
    prctl::set_pdeathsig(Signal::SIGKILL).step(|| "setting the parent-death signal".into())
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), InitError> {
    if uid == 0 || gid == 0 {
        return Err(std::io::Error::other("uid and gid must not be 0"))
            .step(|| "dropping privileges".into());
    }
    let g = Gid::from_raw(gid);
    setgroups(&[g]).step(|| "setgroups".into())?;
    setresgid(g, g, g).step(|| "setresgid".into())?;
    for set in [
        caps::CapSet::Bounding,
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
    ] {
        caps::clear(None, set).step(|| format!("clearing the {set:?} capability set"))?;
    }
    let u = Uid::from_raw(uid);
    // Leaving uid 0 without SECBIT_KEEP_CAPS clears the permitted and effective sets.
    setresuid(u, u, u).step(|| "setresuid".into())?;
    die_with_parent()?;
    prctl::set_no_new_privs().step(|| "setting no_new_privs".into())?;
    let left = caps::read(None, caps::CapSet::Permitted).step(|| "reading capabilities".into())?;
    if !left.is_empty() {
        return Err(std::io::Error::other(format!(
            "capabilities left: {left:?}"
        )))
        .step(|| "dropping privileges".into());
    }
    Ok(())
}
