//! Preparing the host for sandboxes: the in-sandbox runtime files (rewritten to match this
//! binary), the shared packages directory, the cgroup preflight and the sweep of what a
//! crashed daemon left behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use spore_core::{error_chain, ControlError};
use spore_registry::store;

use crate::sandbox::InstanceEnv;
use crate::warmup;

/// What sandboxes of one daemon share, and how to build them here.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Data dir (runtime files, rootfs, snapshots).
    pub data_dir: PathBuf,
    /// Shared Python packages bound read-only into sandboxes (default `<data-dir>/packages`).
    pub packages_dir: Option<PathBuf>,
    /// The Spore binary, re-executed as the sandbox init.
    pub exe: PathBuf,
    /// CPU quota per instance, thousandths of a CPU.
    pub cpu_millis: u32,
    /// Process limit per instance.
    pub pids_max: u32,
    /// `/tmp` size cap per instance, MiB.
    pub tmp_mb: u32,
    /// Network access of functions whose manifest does not say.
    pub default_network: spore_core::Network,
    /// Subnet of egress sandboxes (None: a free /21 of 10.214.0.0/16).
    pub egress_subnet: Option<spore_sandbox::egress::Subnet>,
    /// The region functions see (`AWS_REGION`): the one the daemon's ARNs name.
    pub region: String,
}

/// The host, prepared.
#[derive(Debug)]
pub struct Host {
    /// The sandboxes' shared settings, or why sandboxes cannot run here (not root, no
    /// cgroups): then the registry works and invocations fail with the reason.
    pub env: Result<Arc<InstanceEnv>, String>,
    /// Digest of this build's runtime files: a snapshot holds that code in memory, so an
    /// image from another build is never restored.
    pub build: String,
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

/// Writes the runtime files, finds the packages and checks for sandbox support; `warnings`
/// gets what an operator should know (no packages, sandboxes swept or unsupported).
pub fn prepare(cfg: &HostConfig, warnings: &mut Vec<String>) -> Result<Host, ControlError> {
    let io = |what: &str, e: std::io::Error| ControlError::Internal(format!("{what}: {e}"));
    let run = cfg.data_dir.join("run");
    let rootfs = run.join("rootfs");
    let runtime_dir = cfg.data_dir.join("runtime").join("python");
    for d in [&rootfs, &runtime_dir] {
        std::fs::create_dir_all(d).map_err(|e| io("creating runtime directories", e))?;
    }
    // The in-sandbox runtime files, rewritten at every start so that they match this binary.
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
    // A snapshot holds its interpreter's memory too: another python3 (or node) never resumes it.
    build.update(spore_runtime::interpreters_identity().as_bytes());
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
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)))
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
            env.layer_content = cfg.data_dir.join("layers").join("content");
            env.deps_root = Some(spore_registry::deps::layers_root(&cfg.data_dir));
            env.default_network = cfg.default_network;
            env.region = cfg.region.clone();
            match warmup::Warmups::new(cfg.data_dir.join("warmup")) {
                Ok(w) => env.warmups = Some(Arc::new(w)),
                Err(e) => warnings.push(format!("automatic warm-up is off: {}", error_chain(&e))),
            }
            env
        })
        .map_err(|e| error_chain(&e));
    let env = match env {
        Ok(mut env) => {
            // The tag names the bridge, the veths and the table after the data dir, as the
            // cgroup parent does: daemons on other data dirs keep theirs.
            let tag = env.cgroup_parent["spore-".len()..]
                .get(..5)
                .unwrap_or("0")
                .to_owned();
            match spore_sandbox::egress::Egress::setup(&tag, cfg.egress_subnet) {
                Ok((egress, more)) => {
                    warnings.extend(more);
                    if cfg.default_network == spore_core::Network::Egress {
                        // With egress the default, forwarding is needed from the start.
                        egress.enable_forwarding().map_err(|e| {
                            ControlError::Unavailable(format!(
                                "network egress: {}",
                                error_chain(&e)
                            ))
                        })?;
                    }
                    env.egress = Ok(Arc::new(egress));
                }
                Err(e) if cfg.default_network == spore_core::Network::Egress => {
                    return Err(ControlError::Unavailable(format!(
                        "network egress is the default (--default-network egress) but cannot be set up: {}; install iproute2 and nftables, or start with --default-network none",
                        error_chain(&e)
                    )));
                }
                Err(e) => {
                    let why = error_chain(&e);
                    warnings.push(format!(
                        "functions with network \"egress\" cannot start: {why}"
                    ));
                    env.egress = Err(why);
                }
            }
            Ok(Arc::new(env))
        }
        Err(e) => Err(e),
    };
    if let Err(why) = &env {
        warnings.push(format!("invocations are disabled: {why}"));
    }
    Ok(Host {
        env,
        build: format!("{:08x}", build.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parent_names_differ_per_data_dir() {
        let a = cgroup_parent_name(Path::new("/var/lib/spore-a"));
        let b = cgroup_parent_name(Path::new("/var/lib/spore-b"));
        assert_ne!(a, b);
        assert!(a.starts_with("spore-") && a.len() == 18);
    }
}
