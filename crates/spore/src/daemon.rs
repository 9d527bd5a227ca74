//! A daemon started and stopped by a CLI command (`demo`, `bench`) when none is running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::client::Client;

/// A `spore serve` child process with a temporary data dir; stopped with SIGTERM (so that it
/// removes its sandboxes and cgroups) and waited for on drop.
pub struct ManagedDaemon {
    child: Child,
    /// Its endpoint.
    pub endpoint: String,
    // Dropped after the daemon has exited (fields drop after Drop::drop runs).
    _data: tempfile::TempDir,
}

impl ManagedDaemon {
    /// Starts `spore serve` on a free loopback port with a fresh data dir under `parent` and
    /// `extra` arguments; its log goes to `parent/daemon.log`.
    pub fn start(
        parent: &Path,
        packages_dir: Option<PathBuf>,
        extra: &[String],
    ) -> Result<ManagedDaemon> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let data = tempfile::Builder::new()
            .prefix("data-")
            .tempdir_in(parent)
            .context("creating a data dir")?;
        let exe = std::env::current_exe().context("locating the spore binary")?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--keep-alive-s",
            "600",
            "--data-dir",
        ])
        .arg(data.path());
        if let Some(p) = packages_dir {
            cmd.arg("--packages-dir").arg(p);
        }
        cmd.args(extra);
        let log_path = parent.join("daemon.log");
        let log = std::fs::File::create(&log_path).context("creating the daemon log")?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting spore serve")?;
        let endpoint_file = data.path().join("run").join("endpoint");
        let mut daemon = ManagedDaemon {
            child,
            endpoint: String::new(),
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(e) = std::fs::read_to_string(&endpoint_file) {
                daemon.endpoint = e.trim().to_owned();
                if Client::new(&daemon.endpoint)?.healthy() {
                    return Ok(daemon);
                }
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "spore serve exited with {status}; see {}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "spore serve did not come up within 20 s; see {}",
                    log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl ManagedDaemon {
    /// Its data dir.
    pub fn data_dir(&self) -> &Path {
        self._data.path()
    }
}

impl Drop for ManagedDaemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
