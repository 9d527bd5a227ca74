//! In-sandbox language runtimes and the protocol between the daemon and a runtime.
//!
//! A runtime instance holds one end of a Unix stream socket on fd 3. Both sides exchange
//! frames ([`protocol`]): a small JSON header plus an opaque body. The Python bootstrap
//! ([`PYTHON_BOOTSTRAP`]) imports the handler, reports `ready` (or `init_error`), then
//! serves `invoke` frames one at a time.
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

/// File name of [`PYTHON_CFORK`] next to the bootstrap.
pub const PYTHON_CFORK_FILE: &str = "_spore_cfork.py";

/// Where the bootstrap appears inside the sandbox.
pub const PYTHON_BOOTSTRAP_PATH: &str = "/opt/spore/runtime/bootstrap.py";
/// Where the function's code appears inside the sandbox (Lambda's `LAMBDA_TASK_ROOT`).
pub const TASK_ROOT: &str = "/var/task";
/// Where the shared, read-only Python packages directory appears inside the sandbox.
pub const PACKAGES_ROOT: &str = "/opt/spore/python";
/// The interpreter used inside sandboxes: the distribution's Python, whose start-up does not
/// pay for a user site or `.pth` imports (see FACTS.md: 15 ms vs 61 ms for pyenv's).
pub const PYTHON_INTERPRETER: &str = "/usr/bin/python3";
/// The file descriptor the runtime finds its control socket on.
pub const CONTROL_FD: i32 = 3;

/// What a Python runtime needs to know at start.
#[derive(Debug, Clone)]
pub struct PythonLaunch<'a> {
    /// Function name (for the context object).
    pub function_name: &'a str,
    /// `module.function`.
    pub handler: &'a str,
    /// Memory limit, MiB (for the context object).
    pub memory_mb: u32,
    /// User-defined environment variables.
    pub user_env: &'a std::collections::BTreeMap<String, String>,
}

impl PythonLaunch<'_> {
    /// The argv of the runtime process.
    pub fn argv(&self) -> Vec<String> {
        // -S: no site module (no dist-packages scan, no .pth imports); packages come from
        // PYTHONPATH. -B: never write .pyc into the read-only code directory.
        [PYTHON_INTERPRETER, "-S", "-B", PYTHON_BOOTSTRAP_PATH]
            .map(String::from)
            .to_vec()
    }

    /// The environment of the runtime process: the user's variables first, then Spore's and
    /// Lambda's reserved ones, which win.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .user_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let reserved = [
            ("PATH", "/usr/local/bin:/usr/bin:/bin".to_owned()),
            ("HOME", "/tmp".to_owned()),
            ("LANG", "C.UTF-8".to_owned()),
            ("TMPDIR", "/tmp".to_owned()),
            ("PYTHONPATH", format!("{TASK_ROOT}:{PACKAGES_ROOT}")),
            ("PYTHONDONTWRITEBYTECODE", "1".to_owned()),
            ("LAMBDA_TASK_ROOT", TASK_ROOT.to_owned()),
            ("AWS_LAMBDA_FUNCTION_NAME", self.function_name.to_owned()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                self.memory_mb.to_string(),
            ),
            ("_HANDLER", self.handler.to_owned()),
            ("SPORE_CONTROL_FD", CONTROL_FD.to_string()),
        ];
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
        let launch = PythonLaunch {
            function_name: "f",
            handler: "main.handler",
            memory_mb: 128,
            user_env: &user,
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
    }
}
