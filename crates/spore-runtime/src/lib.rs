//! In-sandbox language runtimes and the protocol between the daemon and a runtime.
//!
//! A runtime instance holds one end of a Unix stream socket on fd 3. Both sides exchange
//! frames ([`protocol`]): a small JSON header plus an opaque body. The Python bootstrap
//! ([`PYTHON_BOOTSTRAP`]) and the Node.js one ([`NODE_BOOTSTRAP`]) import the handler,
//! report `ready` (or `init_error`), then serve `invoke` frames one at a time. Python
//! templates also fork children for cfork ([`PYTHON_CFORK`], [`CFORK_CHILD_LIB`]).
#![forbid(unsafe_code)]

pub mod protocol;

/// The Python bootstrap that runs inside the sandbox (written to the data dir and bound
/// read-only at [`PYTHON_BOOTSTRAP_PATH`]).
pub const PYTHON_BOOTSTRAP: &str = include_str!("../python/bootstrap.py");

/// The cfork template loop, a module the bootstrap imports in template mode (written next to
/// it).
pub const PYTHON_CFORK: &str = include_str!("../python/_spore_cfork.py");
/// The native set-up of a forked child (a small shared object built from
/// `native/cfork_child.rs`), loaded by the cfork template with ctypes.
pub const CFORK_CHILD_LIB: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/libspore_cfork_child.so"));
/// File name of [`CFORK_CHILD_LIB`] next to the bootstrap.
pub const CFORK_CHILD_LIB_FILE: &str = "libspore_cfork_child.so";

/// The in-process half of a template snapshot (`native/checkpoint.rs`), loaded by the
/// Python runtime with ctypes: records the context a restorer needs and waits while the daemon
/// copies the process.
pub const CHECKPOINT_LIB: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/libspore_checkpoint.so"));
/// File name of [`CHECKPOINT_LIB`] next to the bootstrap.
pub const CHECKPOINT_LIB_FILE: &str = "libspore_checkpoint.so";

/// DAG edges for Python (rings and sealed memfd payloads), a module the bootstrap imports
/// for DAG invocations and handlers may import (`spore_dag.buffer`); written next to it.
pub const PYTHON_DAG: &str = include_str!("../python/spore_dag.py");
/// File name of [`PYTHON_DAG`] next to the bootstrap.
pub const PYTHON_DAG_FILE: &str = "spore_dag.py";

/// File name of [`PYTHON_CFORK`] next to the bootstrap.
pub const PYTHON_CFORK_FILE: &str = "_spore_cfork.py";

/// Where the bootstrap appears inside the sandbox.
pub const PYTHON_BOOTSTRAP_PATH: &str = "/opt/spore/runtime/bootstrap.py";
/// Where the function's code appears inside the sandbox (Lambda's `LAMBDA_TASK_ROOT`).
pub const TASK_ROOT: &str = "/var/task";
/// Where the shared, read-only Python packages directory appears inside the sandbox.
pub const PACKAGES_ROOT: &str = "/opt/spore/python";
/// Where a function's dependency layer (built from its `requirements.txt` or `package.json`
/// at deploy) appears inside the sandbox: on `PYTHONPATH` and `NODE_PATH` after the
/// function's own folder.
pub const DEPS_ROOT: &str = "/opt/spore/deps";
/// The interpreter used inside sandboxes: the distribution's Python, whose start-up does not
/// pay for a user site or `.pth` imports (see FACTS.md: 15 ms vs 61 ms for pyenv's).
pub const PYTHON_INTERPRETER: &str = "/usr/bin/python3";
/// Where the runtime's own files appear inside the sandbox (Lambda's `LAMBDA_RUNTIME_DIR`).
pub const RUNTIME_DIR: &str = "/opt/spore/runtime";
/// The file descriptor the runtime finds its control socket on.
pub const CONTROL_FD: i32 = 3;

/// The Node.js bootstrap (written next to the Python one).
pub const NODE_BOOTSTRAP: &str = include_str!("../node/bootstrap.js");
/// File name of [`NODE_BOOTSTRAP`] in the runtime directory.
pub const NODE_BOOTSTRAP_FILE: &str = "bootstrap.js";
/// The Node.js interpreter used inside sandboxes.
pub const NODE_INTERPRETER: &str = "/usr/bin/node";

/// The interpreters this host has for `runtime`: (the name a function gives, the
/// interpreter's path), e.g. `("python3.11", "/usr/bin/python3.11")`, `("nodejs20.x",
/// "/usr/bin/node")`. Python: every `/usr/bin/python3.N`; Node.js: `/usr/bin/node` and
/// `/usr/local/bin/node`, by their major version.
pub fn installed(runtime: spore_core::Runtime) -> Vec<(String, std::path::PathBuf)> {
    let mut found = Vec::new();
    match runtime {
        spore_core::Runtime::Python3 => {
            if let Ok(dir) = std::fs::read_dir("/usr/bin") {
                for entry in dir.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let minor = name
                        .strip_prefix("python3.")
                        .and_then(|m| m.parse::<u32>().ok());
                    if let Some(minor) = minor {
                        found.push((format!("python3.{minor}"), entry.path()));
                    }
                }
            }
        }
        spore_core::Runtime::Node20 => {
            for path in [NODE_INTERPRETER, "/usr/local/bin/node"] {
                if let Some(major) = node_major(std::path::Path::new(path)) {
                    let name = format!("nodejs{major}.x");
                    if !found.iter().any(|(n, _)| *n == name) {
                        found.push((name, path.into()));
                    }
                }
            }
        }
    }
    found.sort();
    found
}

/// Every runtime name this host can run, for messages (`python3`, `python3.11`, `nodejs20.x`).
pub fn installed_names() -> Vec<String> {
    let mut names = Vec::new();
    if std::path::Path::new(PYTHON_INTERPRETER).exists() {
        names.push("python3".to_owned());
    }
    for kind in [spore_core::Runtime::Python3, spore_core::Runtime::Node20] {
        names.extend(installed(kind).into_iter().map(|(n, _)| n));
    }
    names
}

/// The interpreter that runs a function whose runtime is `runtime` at `version` (None: the
/// host's default `python3`, or `node`), or why there is none.
pub fn interpreter(
    runtime: spore_core::Runtime,
    version: Option<u32>,
) -> Result<std::path::PathBuf, String> {
    let (name, default) = match (runtime, version) {
        (spore_core::Runtime::Python3, None) => ("python3".to_owned(), PYTHON_INTERPRETER),
        (spore_core::Runtime::Python3, Some(m)) => (format!("python3.{m}"), ""),
        (spore_core::Runtime::Node20, None) => ("node".to_owned(), NODE_INTERPRETER),
        (spore_core::Runtime::Node20, Some(m)) => (format!("nodejs{m}.x"), ""),
    };
    if !default.is_empty() && std::path::Path::new(default).exists() {
        return Ok(default.into());
    }
    if let Some((_, path)) = installed(runtime).into_iter().find(|(n, _)| *n == name) {
        return Ok(path);
    }
    Err(format!(
        "runtime {name} is not installed on this host; installed: {}",
        installed_names().join(", ")
    ))
}

/// The major version of the `node` at `path` (`node --version`), asked once per path.
fn node_major(path: &std::path::Path) -> Option<u32> {
    static SEEN: std::sync::Mutex<Vec<(std::path::PathBuf, Option<u32>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().ok()?;
    if let Some((_, m)) = seen.iter().find(|(p, _)| p == path) {
        return *m;
    }
    let major = (|| {
        let out = std::process::Command::new(path)
            .arg("--version")
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        text.trim()
            .strip_prefix('v')?
            .split('.')
            .next()?
            .parse()
            .ok()
    })();
    seen.push((path.to_owned(), major));
    major
}

/// What identifies the host's interpreters (their resolved paths, sizes and modification
/// times): a snapshot holds one interpreter's memory, so an image taken under another (an
/// upgraded python3, say) must not be restored.
pub fn interpreters_identity() -> String {
    let mut text = String::new();
    let mut paths: Vec<std::path::PathBuf> = vec![PYTHON_INTERPRETER.into()];
    for kind in [spore_core::Runtime::Python3, spore_core::Runtime::Node20] {
        paths.extend(installed(kind).into_iter().map(|(_, p)| p));
    }
    for p in paths {
        let real = std::fs::canonicalize(&p).unwrap_or(p);
        let meta = std::fs::metadata(&real).ok();
        let (len, mtime) = meta.map_or((0, 0), |m| {
            use std::os::unix::fs::MetadataExt;
            (m.len(), m.mtime())
        });
        text.push_str(&format!("{}:{len}:{mtime};", real.display()));
    }
    text
}

/// What a runtime needs to know at start.
#[derive(Debug, Clone)]
pub struct RuntimeLaunch<'a> {
    /// The language runtime.
    pub runtime: spore_core::Runtime,
    /// The interpreter version the function's runtime names (None: the host's default).
    pub version: Option<u32>,
    /// Function name (for the context object).
    pub function_name: &'a str,
    /// The version running: `$LATEST` or a published version's number.
    pub function_version: &'a str,
    /// `module.function`.
    pub handler: &'a str,
    /// Memory limit, MiB (for the context object and heap sizing).
    pub memory_mb: u32,
    /// User-defined environment variables.
    pub user_env: &'a std::collections::BTreeMap<String, String>,
    /// The warm-up event file, relative to the code directory (Python).
    pub warmup_event: Option<&'a str>,
    /// Modules to import after the handler, before `ready` (Python's automatic warm-up:
    /// what earlier calls of this revision imported).
    pub preload: &'a [String],
    /// The region the function sees (`AWS_REGION`, `AWS_DEFAULT_REGION`, its ARN).
    pub region: &'a str,
    /// How the instance was started (`AWS_LAMBDA_INITIALIZATION_TYPE`): `on-demand`, or
    /// `provisioned-concurrency` for instances started ahead of invocations.
    pub initialization_type: &'a str,
    /// The instance's log stream (`AWS_LAMBDA_LOG_STREAM_NAME`, `context.log_stream_name`):
    /// see [`log_stream_name`].
    pub log_stream_name: &'a str,
}

/// The default region functions see when the daemon sets none.
pub const DEFAULT_REGION: &str = "us-east-1";
/// `AWS_LAMBDA_INITIALIZATION_TYPE` of an instance started for an invocation.
pub const ON_DEMAND: &str = "on-demand";

/// A log stream name of Lambda's shape, `YYYY/MM/DD/[version]<32 hex>`, for an instance
/// started at `unix_ms` (UTC); `random` gives the 128 bits that tell instances apart.
pub fn log_stream_name(unix_ms: u64, version: &str, random: u128) -> String {
    let (y, m, d) = civil_from_days((unix_ms / 86_400_000) as i64);
    format!("{y:04}/{m:02}/{d:02}/[{version}]{random:032x}")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The minor version of the host's default `python3` (`/usr/bin/python3` links to
/// `python3.N`), read once; None if it cannot be told.
pub fn host_python_minor() -> Option<u32> {
    static MINOR: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *MINOR.get_or_init(|| {
        let target = std::fs::read_link(PYTHON_INTERPRETER).ok()?;
        let name = target.file_name()?.to_str()?;
        name.strip_prefix("python3.")?.parse().ok()
    })
}

/// The major version of the host's `node`, asked once (`node --version`); None if there is
/// no Node.js.
pub fn host_node_major() -> Option<u32> {
    node_major(std::path::Path::new(NODE_INTERPRETER))
}

impl RuntimeLaunch<'_> {
    /// The argv of the runtime process.
    pub fn argv(&self) -> Vec<String> {
        match self.runtime {
            // -S: no site module (no dist-packages scan, no .pth imports); packages come from
            // PYTHONPATH. -B: never write .pyc into the read-only code directory.
            spore_core::Runtime::Python3 => {
                let python = interpreter(self.runtime, self.version)
                    .unwrap_or_else(|_| PYTHON_INTERPRETER.into());
                vec![
                    python.to_string_lossy().into_owned(),
                    "-S".into(),
                    "-B".into(),
                    PYTHON_BOOTSTRAP_PATH.into(),
                ]
            }
            // The V8 heap gets most of the memory limit, as Lambda does.
            spore_core::Runtime::Node20 => vec![
                interpreter(self.runtime, self.version)
                    .unwrap_or_else(|_| NODE_INTERPRETER.into())
                    .to_string_lossy()
                    .into_owned(),
                format!("--max-old-space-size={}", (self.memory_mb * 7 / 8).max(16)),
                format!("/opt/spore/runtime/{NODE_BOOTSTRAP_FILE}"),
            ],
        }
    }

    /// `AWS_EXECUTION_ENV`: `AWS_Lambda_python3.N` / `AWS_Lambda_nodejsN.x` after the
    /// interpreter the function runs on.
    pub fn execution_env(&self) -> String {
        match self.runtime {
            spore_core::Runtime::Python3 => match self.version.or_else(host_python_minor) {
                Some(n) => format!("AWS_Lambda_python3.{n}"),
                None => "AWS_Lambda_python3".to_owned(),
            },
            spore_core::Runtime::Node20 => format!(
                "AWS_Lambda_nodejs{}.x",
                self.version.or_else(host_node_major).unwrap_or(20)
            ),
        }
    }

    /// The environment of the runtime process: the user's variables first, then Spore's and
    /// Lambda's reserved ones, which win.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .user_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut reserved = vec![
            ("PATH", "/usr/local/bin:/usr/bin:/bin".to_owned()),
            ("HOME", "/tmp".to_owned()),
            ("LANG", "C.UTF-8".to_owned()),
            ("TMPDIR", "/tmp".to_owned()),
            ("TZ", ":UTC".to_owned()),
            ("LAMBDA_TASK_ROOT", TASK_ROOT.to_owned()),
            ("LAMBDA_RUNTIME_DIR", RUNTIME_DIR.to_owned()),
            (
                "LD_LIBRARY_PATH",
                format!("/opt/lib:{TASK_ROOT}:{TASK_ROOT}/lib:/lib:/usr/lib"),
            ),
            ("AWS_REGION", self.region.to_owned()),
            ("AWS_DEFAULT_REGION", self.region.to_owned()),
            ("AWS_EXECUTION_ENV", self.execution_env()),
            (
                "AWS_LAMBDA_INITIALIZATION_TYPE",
                self.initialization_type.to_owned(),
            ),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", self.function_name),
            ),
            (
                "AWS_LAMBDA_LOG_STREAM_NAME",
                self.log_stream_name.to_owned(),
            ),
            ("AWS_LAMBDA_FUNCTION_NAME", self.function_name.to_owned()),
            (
                "AWS_LAMBDA_FUNCTION_VERSION",
                self.function_version.to_owned(),
            ),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                self.memory_mb.to_string(),
            ),
            ("_HANDLER", self.handler.to_owned()),
            ("SPORE_CONTROL_FD", CONTROL_FD.to_string()),
        ];
        match self.runtime {
            spore_core::Runtime::Python3 => {
                if let Some(w) = self.warmup_event {
                    reserved.push(("SPORE_WARMUP_EVENT", format!("{TASK_ROOT}/{w}")));
                }
                if !self.preload.is_empty() {
                    reserved.push(("SPORE_PRELOAD", self.preload.join(",")));
                }
                reserved.push((
                    "PYTHONPATH",
                    format!("{TASK_ROOT}:{DEPS_ROOT}:{PACKAGES_ROOT}"),
                ));
                reserved.push(("PYTHONDONTWRITEBYTECODE", "1".to_owned()));
            }
            spore_core::Runtime::Node20 => {
                reserved.push((
                    "NODE_PATH",
                    format!("{TASK_ROOT}/node_modules:{DEPS_ROOT}/node_modules"),
                ));
            }
        }
        env.retain(|(k, _)| !reserved.iter().any(|(r, _)| r == k));
        env.extend(reserved.into_iter().map(|(k, v)| (k.to_owned(), v)));
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_env_wins() {
        let mut user = std::collections::BTreeMap::new();
        user.insert("PATH".to_owned(), "/evil".to_owned());
        user.insert("MINE".to_owned(), "1".to_owned());
        let launch = RuntimeLaunch {
            runtime: spore_core::Runtime::Python3,
            version: None,
            function_name: "f",
            function_version: "$LATEST",
            handler: "main.handler",
            memory_mb: 128,
            user_env: &user,
            warmup_event: Some("event.json"),
            preload: &[],
            region: "eu-west-3",
            initialization_type: ON_DEMAND,
            log_stream_name: "2026/01/02/[$LATEST]00000000000000000000000000000001",
        };
        let env = launch.env();
        let get = |k: &str| {
            env.iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("PATH"), vec!["/usr/local/bin:/usr/bin:/bin"]);
        assert_eq!(get("MINE"), vec!["1"]);
        assert_eq!(get("_HANDLER"), vec!["main.handler"]);
        assert_eq!(get("SPORE_WARMUP_EVENT"), vec!["/var/task/event.json"]);
        assert_eq!(get("AWS_REGION"), vec!["eu-west-3"]);
        assert_eq!(get("AWS_DEFAULT_REGION"), vec!["eu-west-3"]);
        assert_eq!(get("AWS_LAMBDA_LOG_GROUP_NAME"), vec!["/aws/lambda/f"]);
        assert_eq!(get("AWS_LAMBDA_INITIALIZATION_TYPE"), vec!["on-demand"]);
        assert_eq!(get("TZ"), vec![":UTC"]);
        assert!(get("LD_LIBRARY_PATH")[0].starts_with("/opt/lib:"));
        assert!(get("AWS_EXECUTION_ENV")[0].starts_with("AWS_Lambda_python3"));
        let node = RuntimeLaunch {
            runtime: spore_core::Runtime::Node20,
            ..launch
        };
        assert!(node.argv()[0].ends_with("node"));
        assert!(node.argv().iter().any(|a| a == "--max-old-space-size=112"));
        assert!(node.env().iter().any(|(k, _)| k == "NODE_PATH"));
        assert!(node
            .env()
            .iter()
            .any(|(k, v)| k == "AWS_EXECUTION_ENV" && v.starts_with("AWS_Lambda_nodejs")));
    }

    #[test]
    fn interpreters_follow_the_runtime_name() {
        let py = interpreter(spore_core::Runtime::Python3, None).unwrap();
        assert_eq!(py, std::path::PathBuf::from(PYTHON_INTERPRETER));
        let minor = host_python_minor().expect("the host's python3 is python3.N");
        let exact = interpreter(spore_core::Runtime::Python3, Some(minor)).unwrap();
        assert_eq!(
            exact,
            std::path::PathBuf::from(format!("/usr/bin/python3.{minor}"))
        );
        let e = interpreter(spore_core::Runtime::Python3, Some(99)).unwrap_err();
        assert!(
            e.contains("python3.99") && e.contains(&format!("python3.{minor}")),
            "{e}"
        );
        let e = interpreter(spore_core::Runtime::Node20, Some(999)).unwrap_err();
        assert!(e.contains("nodejs999.x is not installed"), "{e}");
        let launch = RuntimeLaunch {
            runtime: spore_core::Runtime::Python3,
            version: Some(minor),
            function_name: "f",
            handler: "m.h",
            memory_mb: 128,
            user_env: &Default::default(),
            warmup_event: None,
            preload: &[],
            region: DEFAULT_REGION,
            function_version: "$LATEST",
            initialization_type: ON_DEMAND,
            log_stream_name: "s",
        };
        assert_eq!(launch.argv()[0], format!("/usr/bin/python3.{minor}"));
        assert_eq!(
            launch.execution_env(),
            format!("AWS_Lambda_python3.{minor}")
        );
    }

    #[test]
    fn log_stream_has_lambdas_shape() {
        // 2026-12-06 is day 20_793 since the epoch.
        let name = log_stream_name(20_793 * 86_400_000 + 5_000, "$LATEST", 0xab);
        assert_eq!(name, "2026/12/06/[$LATEST]000000000000000000000000000000ab");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
