//! A daemon started and stopped by a CLI command (`demo`, `bench`) when none is running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::client::{Client, ClientError};

/// Errors of starting a daemon. The messages are the CLI's own, so they keep its wording.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A file, folder or the child process could not be made (the text says which).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Duplicating the log's handle or polling the child failed.
    #[error(transparent)]
    Os(#[from] std::io::Error),
    /// The client of the new daemon could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `spore serve` exited before it answered.
    #[error("spore serve exited with {status}; see {}", log.display())]
    Exited {
        /// How it exited.
        status: ExitStatus,
        /// Its log.
        log: PathBuf,
    },
    /// `spore serve` did not answer in time.
    #[error("spore serve did not come up within 20 s; see {}", log.display())]
    Timeout {
        /// Its log.
        log: PathBuf,
    },
}

/// Wraps the error of one I/O step of a start in what the step was doing.
fn doing(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

type Result<T> = std::result::Result<T, DaemonError>;

/// A `spore serve` child process with a temporary data dir; stopped with SIGTERM (so that it
/// removes its sandboxes and cgroups) and waited for on drop.
///
/// The daemon is this process's own executable (`std::env::current_exe`) run as
/// `spore serve`: only the `spore` binary (and what it calls) can start one.
pub struct ManagedDaemon {
    child: Child,
    /// Its endpoint.
    pub endpoint: String,
    // Dropped after the daemon has exited (fields drop after Drop::drop runs).
    _data: tempfile::TempDir,
}

impl ManagedDaemon {
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `spore serve` on a free loopback port with a fresh data dir under `parent` and
    /// `extra` arguments; its log goes to `parent/daemon.log`.
    pub fn start(
        parent: &Path,
        packages_dir: Option<PathBuf>,
        extra: &[String],
    ) -> Result<ManagedDaemon> {
        std::fs::create_dir_all(parent).map_err(doing(format!("creating {}", parent.display())))?;
        let data = tempfile::Builder::new()
            .prefix("data-")
            .tempdir_in(parent)
            .map_err(doing("creating a data dir"))?;
        let exe = std::env::current_exe().map_err(doing("locating the spore binary"))?;
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
        let log = std::fs::File::create(&log_path).map_err(doing("creating the daemon log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().map_err(doing("starting spore serve"))?;
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
                return Err(DaemonError::Exited {
                    status,
                    log: log_path,
                });
            }
            if Instant::now() > deadline {
                return Err(DaemonError::Timeout { log: log_path });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl ManagedDaemon {
    /// The admin key it wrote to its data dir at start (None: it runs without one).
    pub fn credentials(&self) -> Result<Option<spore_auth::Credentials>> {
        let file = self.data_dir().join("credentials");
        spore_auth::credentials::read_profile(&file, "default").map_err(|source| DaemonError::Io {
            what: format!("reading the daemon's key in {}", file.display()),
            source,
        })
    }

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
