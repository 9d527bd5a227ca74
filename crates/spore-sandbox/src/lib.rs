//! Linux container sandboxes for function instances.
//!
//! A sandbox is started by re-executing the Spore binary as `spore __sandbox-init` with a
//! [`SandboxSpec`] in its environment ([`command`]). That helper is single-threaded, which is
//! what makes `unshare` + `fork` + mount work safe (the daemon itself is multi-threaded and never
//! forks to do this). The helper:
//!
//! 1. joins the instance's cgroups ([`cgroup`]: v1 and v2 layouts),
//! 2. unshares mount, pid, network, ipc, uts and cgroup namespaces and forks the namespace's
//!    pid 1,
//! 3. which builds a rootfs on a tmpfs from read-only binds, mounts `/proc`, `/dev`, a size-capped
//!    `/tmp`, `pivot_root`s into it, brings up loopback (the only interface),
//! 4. drops to an unprivileged uid with no capabilities and `no_new_privs`, installs a seccomp
//!    deny-list ([`seccomp`]) and execs the runtime.
//!
//! The helper stays as the pid namespace's parent and exits with the runtime's status; killing
//! it kills the namespace (pid 1 has `PDEATHSIG`), it kills the namespace itself when the
//! daemon exits ([`SandboxSpec::daemon_pid`], a pidfd), and [`cgroup::Cgroup::kill_all`] is the
//! catch-all that leaves nothing behind.
//!
//! Linux only. Needs root (or `CAP_SYS_ADMIN`); [`preflight`] says what is missing.

pub mod cgroup;
pub mod egress;
mod init;
mod netlink;
pub mod seccomp;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use init::run_init;

/// Name of the hidden subcommand that runs the in-sandbox init.
pub const INIT_SUBCOMMAND: &str = "__sandbox-init";
/// Environment variable carrying the JSON [`SandboxSpec`] to the init.
pub const SPEC_ENV: &str = "SPORE_SANDBOX_SPEC";
/// Exit status of the init when setting up the sandbox failed (before the runtime ran).
pub const SETUP_FAILED_EXIT: i32 = 125;
/// Exit status of a sandbox whose snapshot restore failed (the reason is on stderr); the
/// daemon then starts the function from scratch.
pub const RESTORE_FAILED_EXIT: i32 = 123;
/// Exit status of a sandbox init whose own mappings (placed by ASLR) overlap the image it was
/// to restore: nothing is wrong with the image, and a fresh process can try again.
pub const RESTORE_COLLISION_EXIT: i32 = 122;

/// Errors from preparing or checking sandboxes on the host.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The host lacks something sandboxes need.
    #[error("Sandboxes cannot run on this host: {0}")]
    Unsupported(String),
    /// A cgroup operation failed.
    #[error("Cgroup operation failed on {path}")]
    Cgroup {
        /// The file or directory involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The spec could not be encoded.
    #[error("Cannot encode the sandbox spec")]
    Spec(#[source] serde_json::Error),
}

/// One bind mount into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// Host path.
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: String,
    /// Mount read-only (all binds are `nosuid,nodev` regardless).
    pub read_only: bool,
}

/// Everything the init needs to build one sandbox and start its process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Instance id (also the hostname).
    pub id: String,
    /// An empty host directory to build the rootfs on (in the sandbox's private mount
    /// namespace, so one directory serves any number of sandboxes).
    pub rootfs: PathBuf,
    /// Bind mounts, applied in order.
    pub binds: Vec<BindMount>,
    /// Symlinks in the rootfs, `(link path, target)`.
    pub symlinks: Vec<(String, String)>,
    /// Small generated files in the rootfs, `(path, contents)`.
    pub files: Vec<(String, String)>,
    /// Size cap of the writable `/tmp`, MiB.
    pub tmp_size_mb: u32,
    /// Unprivileged uid and gid the process runs as.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Program and arguments (absolute path inside the sandbox).
    pub argv: Vec<String>,
    /// Complete environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Files through which the init moves itself into its cgroups, before anything else, by
    /// writing `0` ([`cgroup::Cgroup::self_attach_files`]: v1's `tasks`, which spares the
    /// RCU grace period a `cgroup.procs` write waits out; the init is single-threaded then).
    pub cgroup_join: Vec<PathBuf>,
    /// `RLIMIT_NOFILE`.
    pub max_open_files: u64,
    /// Move stdin (fd 0, the control socket from the daemon) to this fd; 0 leaves it.
    pub control_fd: i32,
    /// Run the process as root of a new user namespace instead of as `uid`/`gid` (cfork
    /// templates): it keeps [`TEMPLATE_CAPS`] inside that namespace only, so that it can give
    /// each forked child namespaces of its own, and the seccomp filter still allows namespace
    /// operations (the child adds a filter that denies them).
    #[serde(default)]
    pub user_namespace: Option<IdMapping>,
    /// Restore this snapshot image (a host path, opened before the rootfs is built) instead
    /// of executing `argv`: the sandbox is built the same way, then its pid 1 becomes the
    /// snapshotted runtime.
    #[serde(default)]
    pub restore: Option<PathBuf>,
    /// How the restore installs memory: `full`, `lazy` or `reap` (the last two are served by
    /// the sandbox init's parent over userfaultfd).
    #[serde(default)]
    pub restore_mode: Option<String>,
    /// (With `restore`) build the sandbox, then wait for one byte on the control socket
    /// before restoring: a sandbox made ahead of time, so that a restore pays only for its
    /// memory. End of file instead of the byte: exit without restoring.
    #[serde(default)]
    pub wait_for_go: bool,
    /// The daemon that starts the sandbox (the init's parent): when that process exits, the
    /// init kills the sandbox and exits too, so that no sandbox outlives its daemon.
    #[serde(default)]
    pub daemon_pid: Option<u32>,
    /// Read-only directories merged at `/opt` (an overlay, lowest first: a later directory's
    /// files hide an earlier one's of the same path, as Lambda's layers), mounted before
    /// `binds`, so that binds under `/opt` land on top. Empty: no `/opt` overlay.
    #[serde(default)]
    pub opt_layers: Vec<PathBuf>,
    /// Network egress: the init gives the sandbox's network namespace a veth pair into the
    /// daemon's bridge with this address ([`egress::attach`]). None: loopback only.
    #[serde(default)]
    pub egress: Option<egress::Lease>,
}

/// A user-namespace id mapping: ids `0..count` inside are `host_base..host_base+count` outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    /// First host uid (and gid).
    pub host_base: u32,
    /// Number of ids mapped.
    pub count: u32,
}

/// Capabilities a cfork template keeps inside its user namespace: namespaces and mounts,
/// ids, loopback for its children, and CAP_SETPCAP, with which each child empties its
/// bounding set before dropping to its uid.
pub const TEMPLATE_CAPS: [caps::Capability; 5] = [
    caps::Capability::CAP_SYS_ADMIN,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_NET_ADMIN,
    caps::Capability::CAP_SETPCAP,
];

/// Builds the command that starts a sandbox: `exe __sandbox-init` with the spec in its
/// environment and nothing else inherited. The caller wires stdin (the control socket), stdout
/// and stderr.
pub fn command(exe: &Path, spec: &SandboxSpec) -> Result<std::process::Command, SandboxError> {
    let json = serde_json::to_string(spec).map_err(SandboxError::Spec)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(INIT_SUBCOMMAND).env_clear().env(SPEC_ENV, json);
    Ok(cmd)
}

/// The standard rootfs of a host-runtime sandbox: `/usr` read-only with the merged-/usr
/// symlinks (or binds where the host has real directories), the dynamic loader cache, and a
/// minimal generated `/etc`.
pub fn host_runtime_rootfs(spec: &mut SandboxSpec) {
    spec.binds.push(BindMount {
        source: "/usr".into(),
        target: "/usr".into(),
        read_only: true,
    });
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(top);
        match std::fs::read_link(&host) {
            Ok(target) => spec
                .symlinks
                .push((format!("/{top}"), target.to_string_lossy().into_owned())),
            Err(_) if host.is_dir() => spec.binds.push(BindMount {
                source: host,
                target: format!("/{top}"),
                read_only: true,
            }),
            Err(_) => {}
        }
    }
    for etc in [
        "/etc/ld.so.cache",
        "/etc/localtime",
        "/etc/ssl",
        "/etc/mime.types",
    ] {
        if Path::new(etc).exists() {
            spec.binds.push(BindMount {
                source: etc.into(),
                target: etc.into(),
                read_only: true,
            });
        }
    }
    let (uid, gid) = (spec.uid, spec.gid);
    spec.files.extend([
        (
            "/etc/passwd".to_owned(),
            format!("root:x:0:0:root:/root:/bin/false\nsbx_user:x:{uid}:{gid}:function:/tmp:/bin/false\n"),
        ),
        ("/etc/group".to_owned(), format!("root:x:0:\nsbx_user:x:{gid}:\n")),
        ("/etc/hostname".to_owned(), format!("{}\n", spec.id)),
        (
            "/etc/hosts".to_owned(),
            format!("127.0.0.1 localhost {}\n::1 localhost\n", spec.id),
        ),
    ]);
}

/// Checks that this host can run sandboxes: root, Linux namespaces, a cgroup layout.
pub fn preflight() -> Result<cgroup::Layout, SandboxError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(SandboxError::Unsupported(
            "container sandboxes need root (CAP_SYS_ADMIN for namespaces, mounts and cgroups); run `spore serve` as root".into(),
        ));
    }
    for ns in ["mnt", "pid", "net", "ipc", "uts", "cgroup"] {
        if !Path::new("/proc/self/ns").join(ns).exists() {
            return Err(SandboxError::Unsupported(format!(
                "the kernel has no {ns} namespace"
            )));
        }
    }
    cgroup::Layout::detect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            rootfs: "/tmp/r".into(),
            binds: vec![],
            symlinks: vec![],
            files: vec![],
            tmp_size_mb: 16,
            uid: 1000,
            gid: 1000,
            argv: vec!["/bin/true".into()],
            env: vec![],
            cwd: "/".into(),
            cgroup_join: vec![],
            max_open_files: 1024,
            control_fd: 3,
            user_namespace: None,
            restore: None,
            restore_mode: None,
            wait_for_go: false,
            daemon_pid: Some(1),
            opt_layers: vec![],
            egress: None,
        }
    }

    #[test]
    fn command_carries_spec_and_nothing_else() {
        let spec = spec("i1");
        let cmd = command(Path::new("/bin/spore"), &spec).unwrap();
        let envs: Vec<_> = cmd.get_envs().collect();
        assert_eq!(envs.len(), 1);
        let json = envs[0].1.unwrap().to_str().unwrap();
        assert_eq!(serde_json::from_str::<SandboxSpec>(json).unwrap(), spec);
        assert_eq!(cmd.get_args().next().unwrap(), INIT_SUBCOMMAND);
    }

    #[test]
    fn rootfs_has_usr_and_etc() {
        let mut spec = spec("box");
        spec.user_namespace = Some(IdMapping {
            host_base: 1 << 20,
            count: 65536,
        });
        host_runtime_rootfs(&mut spec);
        assert!(spec.binds.iter().any(|b| b.target == "/usr" && b.read_only));
        assert!(spec
            .files
            .iter()
            .any(|(p, c)| p == "/etc/passwd" && c.contains(":1000:")));
        // /bin resolves either as a symlink (merged /usr) or a bind.
        assert!(
            spec.symlinks.iter().any(|(l, _)| l == "/bin")
                || spec.binds.iter().any(|b| b.target == "/bin")
        );
    }
}
