//! Test harness: real `spore serve` daemons on loopback with temporary data dirs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use spore_client::Http as Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_spore");

/// Whether this process can run sandboxes. Prints a SKIP line if not; with
/// `SPORE_REQUIRE_ROOT=1` a missing privilege is a failure instead.
pub fn can_sandbox(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let cgroups = spore_sandbox::cgroup::Layout::detect().is_ok();
    if root && cgroups {
        return true;
    }
    let why = if root {
        "no usable cgroup hierarchy"
    } else {
        "not running as root"
    };
    if std::env::var("SPORE_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test}: {why}, and SPORE_REQUIRE_ROOT=1");
    }
    eprintln!("SKIP {test}: {why} (sandboxes need root and cgroups)");
    false
}

/// The Lambda error type of a response (`x-amzn-ErrorType`), empty if none.
pub fn error_type(r: &reqwest::blocking::Response) -> String {
    r.headers()
        .get("x-amzn-errortype")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Runs a boto3 script with `args` against daemon `d`'s endpoint, signing with the key in its
/// data dir as the AWS tools read it (`AWS_SHARED_CREDENTIALS_FILE`). None: boto3 is not
/// installed (a failure with `SPORE_REQUIRE_ROOT=1`, which the set-up satisfies).
pub fn boto3(test: &str, d: &Daemon, script: &str, args: &[&str]) -> Option<std::process::Output> {
    let test_python = std::env::var_os("SPORE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-python"));
    if !test_python.join("boto3").is_dir() {
        assert_ne!(
            std::env::var("SPORE_REQUIRE_ROOT").as_deref(),
            Ok("1"),
            "boto3 is not installed in {}; run scripts/setup.sh",
            test_python.display()
        );
        eprintln!("SKIP {test}: boto3 not installed (run scripts/setup.sh)");
        return None;
    }
    Some(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(&d.endpoint)
            .args(args)
            .env("PYTHONPATH", &test_python)
            .env("AWS_SHARED_CREDENTIALS_FILE", d.data.join("credentials"))
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap(),
    )
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn sample(name: &str) -> PathBuf {
    repo_root().join("functions").join(name)
}

/// The shared packages dir (numpy, Pillow, pyaes) if the setup installed it.
pub fn packages_dir() -> Option<PathBuf> {
    let p = std::env::var_os("SPORE_PACKAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/python-packages"));
    p.join("numpy").is_dir().then_some(p)
}

pub struct Daemon {
    pub child: Option<Child>,
    pub endpoint: String,
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub http: Client,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start() -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("spore-test-")
            .tempdir()
            .unwrap();
        let data = tmp.path().join("data");
        let mut d = Daemon::start_at(&data, &[]);
        d._tmp = Some(tmp);
        d
    }

    /// Starts a daemon on a new data dir with extra environment variables.
    pub fn start_with_env(env: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("spore-test-")
            .tempdir()
            .unwrap();
        let data = tmp.path().join("data");
        let mut d = Daemon::launch(&data, &[], env);
        d._tmp = Some(tmp);
        d
    }

    /// Starts a daemon on an existing (or new) data dir.
    pub fn start_at(data: &Path, extra: &[&str]) -> Daemon {
        Daemon::launch(data, extra, &[])
    }

    fn launch(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        std::fs::create_dir_all(data).unwrap();
        let log = data.with_extension(format!(
            "log-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grace-s",
            "10",
            "--data-dir",
        ])
        .arg(data)
        .args(extra);
        if let Some(p) = packages_dir() {
            cmd.arg("--packages-dir").arg(p);
        }
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .env("RUST_LOG", "info");
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().unwrap();
        let endpoint_file = data.join("run/endpoint");
        // Requests are signed with the admin key the daemon writes to its data dir at start.
        let mut http = Client::new(Duration::from_secs(60), None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(e) = std::fs::read_to_string(&endpoint_file) {
                let e = e.trim().to_owned();
                if http
                    .get(format!("{e}/healthz"))
                    .send()
                    .is_ok_and(|r| r.status().is_success())
                {
                    let creds =
                        spore_auth::credentials::read_profile(&data.join("credentials"), "default")
                            .unwrap();
                    http = http.with_credentials(creds);
                    return Daemon {
                        child: Some(child),
                        endpoint: e,
                        data: data.to_owned(),
                        _tmp: None,
                        http,
                        log,
                    };
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "daemon exited with {st}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the `spore` CLI against this daemon, signing with its admin key (found in its
    /// data dir, as root on the daemon's host finds it).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .env("SPORE_ENDPOINT", &self.endpoint)
            .env("SPORE_DATA_DIR", &self.data)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    /// GET `path`, parsed as JSON.
    pub fn get_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates a function from a folder through CreateFunction.
    pub fn create(&self, dir: &Path) -> reqwest::blocking::Response {
        self.create_as(dir, None, None)
    }

    /// Creates a function from a folder, optionally under another name and sandbox kind.
    pub fn create_as(
        &self,
        dir: &Path,
        name: Option<&str>,
        sandbox: Option<&str>,
    ) -> reqwest::blocking::Response {
        let mut m = spore_core::FunctionManifest::from_toml(
            &std::fs::read_to_string(dir.join("spore.toml")).unwrap(),
        )
        .unwrap();
        if let Some(n) = name {
            m.name = n.to_owned();
        }
        let sandbox = sandbox.unwrap_or(m.sandbox.as_str());
        let zip = spore_registry::code::zip_dir(dir).unwrap();
        let body = json!({
            "FunctionName": m.name, "Runtime": m.runtime_str(), "Handler": m.handler,
            "MemorySize": m.memory_mb, "Timeout": m.timeout_s,
            "Environment": { "Variables": m.environment },
            "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip) },
            "Tags": { "spore:sandbox": sandbox },
        });
        let mut body = body;
        if let Some(max) = m.max_instances {
            body["Tags"]["spore:max_instances"] = max.to_string().into();
        }
        if m.snapshot {
            body["Tags"]["spore:snapshot"] = "true".into();
        }
        if let Some(w) = &m.warmup_event {
            body["Tags"]["spore:warmup_event"] = w.clone().into();
        }
        if let Some(n) = m.network {
            body["Tags"]["spore:network"] = n.as_str().into();
        }
        if !m.auto_warmup && m.runtime == spore_core::Runtime::Python3 {
            body["Tags"]["spore:auto_warmup"] = "false".into();
        }
        self.http
            .post(self.url("/2015-03-31/functions"))
            .json(&body)
            .send()
            .unwrap()
    }

    pub fn deploy(&self, dir: &Path) {
        let r = self.create(dir);
        assert_eq!(r.status(), 201, "create failed: {}", r.text().unwrap());
    }

    /// Deploys the folder as a function named `name` that snapshots its runtime.
    pub fn deploy_snapshotted(&self, dir: &Path, name: &str) {
        self.deploy_snapshotted_in(dir, name, None)
    }

    /// As [`Daemon::deploy_snapshotted`], in sandbox `sandbox` (None: the manifest's).
    pub fn deploy_snapshotted_in(&self, dir: &Path, name: &str, sandbox: Option<&str>) {
        let tmp = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
            }
        }
        let manifest = tmp.path().join("spore.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, format!("{text}\nsnapshot = true\n")).unwrap();
        let r = self.create_as(tmp.path(), Some(name), sandbox);
        assert_eq!(r.status(), 201, "create failed: {}", r.text().unwrap());
    }

    /// Deploys the folder as a cfork function named `name`.
    pub fn deploy_cfork(&self, dir: &Path, name: &str) {
        let r = self.create_as(dir, Some(name), Some("cfork"));
        assert_eq!(r.status(), 201, "create failed: {}", r.text().unwrap());
    }

    pub fn invoke_raw(
        &self,
        name: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> reqwest::blocking::Response {
        let mut req = self
            .http
            .post(self.url(&format!("/2015-03-31/functions/{name}/invocations")))
            .body(payload.to_vec());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send().unwrap()
    }

    /// Invokes and returns (function error?, start kind, body JSON).
    pub fn invoke(&self, name: &str, payload: Value) -> (bool, String, Value) {
        let r = self.invoke_raw(name, payload.to_string().as_bytes(), &[]);
        assert_eq!(r.status(), 200, "invoke {name}");
        let err = r.headers().get("x-amz-function-error").is_some();
        let start = r
            .headers()
            .get("x-spore-start")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (err, start, r.json().unwrap())
    }

    /// Invokes with `X-Spore-Cold: how` and `headers`, expecting success: (start kind, body).
    pub fn invoke_start(
        &self,
        name: &str,
        how: &str,
        payload: &Value,
        headers: &[(&str, &str)],
    ) -> (String, Value) {
        let mut all = vec![("X-Spore-Cold", how)];
        all.extend_from_slice(headers);
        let r = self.invoke_raw(name, payload.to_string().as_bytes(), &all);
        assert_eq!(r.status(), 200, "invoke {name}");
        assert!(
            r.headers().get("x-amz-function-error").is_none(),
            "{name} failed"
        );
        let start = r.headers()["x-spore-start"].to_str().unwrap().to_owned();
        (start, r.json().unwrap())
    }

    /// SIGTERM, wait, and check that nothing is left: cgroups, mounts, processes.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "daemon did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "daemon exit {status}: {}",
            self.log_text()
        );
        assert_no_leaks(&self.data);
    }
}

/// Sends SIGTERM and waits up to `grace` for the child to exit; then kills it.
pub fn terminate(mut c: Child, grace: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c, Duration::from_secs(30));
        }
    }
}

/// Asserts that a stopped daemon left no cgroup, mount or sandbox process behind.
pub fn assert_no_leaks(data: &Path) {
    let parent = spore_control::cgroup_parent_name(data);
    for ctrl in ["memory", "cpu", "pids", "unified"] {
        let p = Path::new("/sys/fs/cgroup").join(ctrl).join(&parent);
        assert!(!p.exists(), "cgroup {} left behind", p.display());
    }
    assert!(
        !Path::new("/sys/fs/cgroup").join(&parent).exists(),
        "v2 cgroup left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data_s = data.to_string_lossy();
    assert!(
        !mounts.contains(data_s.as_ref()),
        "a mount under {data_s} is left"
    );
    let rootfs = data.join("run/rootfs");
    if rootfs.exists() {
        assert_eq!(
            std::fs::read_dir(&rootfs).unwrap().count(),
            0,
            "rootfs mount point not empty"
        );
    }
}

/// A `spore shim` child and its log (stopped with SIGTERM on drop).
pub struct Shim {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Shim {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c, Duration::from_secs(20));
        }
    }
}

/// Runs `spore cluster ARGS --data-dir DATA` (a control plane's CA and tokens); returns what
/// it printed on stdout, trimmed.
pub fn cluster(args: &[&str], data: &Path) -> String {
    let out = Command::new(BIN)
        .arg("cluster")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spore cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
