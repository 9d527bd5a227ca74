//! `spore shim` child processes: a second (or third) processing unit for the demo and
//! `spore bench xpu`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use spore_client::Client;

/// A `spore shim` child, in a network namespace or not (stopped with SIGTERM on drop, its
/// data dir removed once it exited), and its unit id.
pub(crate) struct ShimProcess(Child, PathBuf, u32);

/// A join token from the control plane whose data dir is `data_dir` (`spore cluster token`).
pub(crate) fn join_token(data_dir: &Path) -> Result<String> {
    let out = Command::new(std::env::current_exe()?)
        .args(["cluster", "token", "--ttl", "1h", "--data-dir"])
        .arg(data_dir)
        .stderr(Stdio::inherit())
        .output()
        .context("running spore cluster token")?;
    ensure!(out.status.success(), "spore cluster token failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl ShimProcess {
    /// Starts unit `id` dialing `control` and joining with `token`, inside `netns` if given;
    /// its data dir and log go under `parent`.
    pub(crate) fn spawn(
        netns: Option<&str>,
        id: u32,
        control: &str,
        token: &str,
        parent: &Path,
        extra: &[String],
    ) -> Result<ShimProcess> {
        std::fs::create_dir_all(parent)?;
        let data = parent.join(format!("unit-{id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let log = std::fs::File::create(parent.join(format!("shim-{id}.log")))?;
        let exe = std::env::current_exe()?;
        let mut cmd = match netns {
            Some(ns) => {
                // nsenter switches only the network namespace (`ip netns exec` would also
                // mount a new /sys, hiding the cgroup hierarchies sandboxes need).
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(["shim", "--id", &id.to_string(), "--control", control])
            .arg("--data-dir")
            .arg(&data)
            .args(["--keep-alive-s", "600"])
            .env("SPORE_JOIN_TOKEN", token)
            .args(extra);
        if let Some(p) = packages_dir() {
            cmd.arg("--packages-dir").arg(p);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(ShimProcess(
            cmd.spawn().context("starting the shim")?,
            data,
            id,
        ))
    }

    /// Waits until the control plane lists this unit as up.
    pub(crate) fn wait_up(&self, client: &Client) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let units = client.units()?;
            if units["Units"]
                .as_array()
                .is_some_and(|u| u.iter().any(|u| u["id"] == self.2 && u["state"] == "up"))
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "unit {} did not register within 30 s (see its log under .spore/)",
                self.2
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The shared Python packages, if the setup installed them.
pub(crate) fn packages_dir() -> Option<PathBuf> {
    std::env::var_os("SPORE_PACKAGES_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from("target/python-packages");
            p.join("numpy").is_dir().then_some(p)
        })
        .map(|p| p.canonicalize().unwrap_or(p))
}

impl Drop for ShimProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                let _ = std::fs::remove_dir_all(&self.1);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}
