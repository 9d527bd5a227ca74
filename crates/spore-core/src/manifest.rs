//! The function manifest, `spore.toml`. Its keys are a contract: add keys, rename none.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Errors from reading or checking a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The TOML did not parse or had keys of the wrong type.
    #[error("Malformed spore.toml")]
    Parse(#[source] toml::de::Error),
    /// A key has a value Spore cannot use.
    #[error("Invalid `{key}` in spore.toml: {reason}")]
    Invalid {
        /// The manifest key at fault.
        key: &'static str,
        /// What is wrong and what would be right.
        reason: String,
    },
}

/// A language runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// The host's CPython 3 (`/usr/bin/python3`).
    Python3,
    /// Node.js (the host's `node`; the version is in the manifest's `runtime_name`), in
    /// container sandboxes only. (Named for the one version older records knew.)
    Node20,
}

impl Runtime {
    /// The canonical name written in manifests and reported by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Python3 => "python3",
            Runtime::Node20 => "node20",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Runtime {
    type Err = ManifestError;

    /// Accepts `python3`, `python3.N` (Lambda's names), `nodeN` and `nodejsN.x`: the kind
    /// of runtime (which version is installed is the daemon's to check).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match runtime_version(s) {
            Some((kind, _)) => Ok(kind),
            None => Err(ManifestError::Invalid {
                key: "runtime",
                reason: format!(
                    "unknown runtime {s:?}; use \"python3\" (or \"python3.N\") or \"nodejsN.x\""
                ),
            }),
        }
    }
}

/// The kind and version a runtime name asks for: `python3` (None: the host's default
/// python3), `python3.N` (N), `nodeN` / `nodejsN.x` (N); None if it is no runtime name.
pub fn runtime_version(name: &str) -> Option<(Runtime, Option<u32>)> {
    let number = |m: &str| {
        (!m.is_empty() && m.len() <= 4 && m.bytes().all(|b| b.is_ascii_digit()))
            .then(|| m.parse().ok())
            .flatten()
    };
    if name == "python3" {
        return Some((Runtime::Python3, None));
    }
    if let Some(minor) = name.strip_prefix("python3.").and_then(number) {
        return Some((Runtime::Python3, Some(minor)));
    }
    let major = name
        .strip_prefix("nodejs")
        .and_then(|r| r.strip_suffix(".x"))
        .or_else(|| name.strip_prefix("node"))
        .and_then(number)?;
    Some((Runtime::Node20, Some(major)))
}

/// How instances of a function are sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxKind {
    /// A fresh container (namespaces, cgroup, seccomp, rootfs) with a freshly started runtime.
    #[default]
    Container,
    /// Forked from the function's warm template into a fresh sandbox (Python).
    Cfork,
}

impl SandboxKind {
    /// The name used in manifests and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxKind::Container => "container",
            SandboxKind::Cfork => "cfork",
        }
    }
}

impl fmt::Display for SandboxKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxKind {
    type Err = ManifestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "container" => Ok(SandboxKind::Container),
            "cfork" => Ok(SandboxKind::Cfork),
            _ => Err(ManifestError::Invalid {
                key: "sandbox",
                reason: format!("unknown sandbox kind {s:?}; use \"container\" or \"cfork\""),
            }),
        }
    }
}

/// What a function's sandboxes may reach over the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Outbound connections to the internet (NAT through the host), never to the host
    /// itself, link-local or metadata addresses, or other sandboxes; as on Lambda.
    Egress,
    /// Loopback only.
    None,
}

impl Network {
    /// The name used in manifests, tags and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Egress => "egress",
            Network::None => "none",
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Network {
    type Err = ManifestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "egress" => Ok(Network::Egress),
            "none" => Ok(Network::None),
            _ => Err(ManifestError::Invalid {
                key: "network",
                reason: format!("unknown network setting {s:?}; use \"egress\" or \"none\""),
            }),
        }
    }
}

/// Smallest and largest memory limits, in MiB.
pub const MEMORY_MB_RANGE: std::ops::RangeInclusive<u32> = 32..=10240;
/// Smallest and largest timeouts, in seconds (Lambda's 900 s maximum).
pub const TIMEOUT_S_RANGE: std::ops::RangeInclusive<u32> = 1..=900;

/// A function manifest (`spore.toml`), checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionManifest {
    /// Function name, unique per daemon.
    pub name: String,
    /// Language runtime (its kind).
    pub runtime: Runtime,
    /// The runtime's name as given (`python3`, `python3.11`, `nodejs20.x`, `node20`): it
    /// picks the interpreter and is what the API reports. None in records written before it
    /// was kept (then the kind's name, and the host's default interpreter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_name: Option<String>,
    /// `module.function` (the module may be a path such as `pkg/mod`).
    pub handler: String,
    /// Memory limit of one instance, MiB.
    pub memory_mb: u32,
    /// Invocation timeout, seconds.
    pub timeout_s: u32,
    /// Sandbox kind.
    pub sandbox: SandboxKind,
    /// Environment variables given to the function.
    pub environment: BTreeMap<String, String>,
    /// Most concurrent instances (None: the daemon's default).
    pub max_instances: Option<u32>,
    /// Take a snapshot of the warm runtime at its first init and start later instances by
    /// restoring it (Python functions; for a cfork function, its template is snapshotted and
    /// restored, and instances fork from it).
    #[serde(default)]
    pub snapshot: bool,
    /// A file in the function's code holding an event (JSON) the runtime runs the handler on
    /// once, after importing it and before reporting ready (and before a snapshot is taken),
    /// with its result discarded: code the handler loads lazily on its first call (numpy's
    /// random generators and linear algebra, say) is then loaded in every fork and restore.
    /// Like SnapStart's priming; the handler must tolerate the call. Python only.
    #[serde(default)]
    pub warmup_event: Option<String>,
    /// Record the modules the handler imports on its calls and import them at start-up (in
    /// the cfork template, before a snapshot, in every fresh instance), so that a new
    /// instance's first call does not pay for them. On by default for Python functions;
    /// `false` turns it off (a module whose import has side effects the function wants at
    /// call time). Invalidated by every new revision of the function.
    #[serde(default = "yes")]
    pub auto_warmup: bool,
    /// Pin the function to this processing unit (None: the control plane places it).
    #[serde(default)]
    pub unit: Option<u32>,
    /// An accelerator the function needs (`gpu`, ...): it runs only on units that have one.
    #[serde(default)]
    pub accelerator: Option<String>,
    /// An instruction set the function needs (`x86_64`, `aarch64`, ...).
    #[serde(default)]
    pub arch: Option<String>,
    /// Network access of its sandboxes (None: the daemon's `--default-network`).
    #[serde(default)]
    pub network: Option<Network>,
}

/// The manifest as written, before checking (every key but `name` and `handler` optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    #[serde(default = "default_runtime")]
    runtime: String,
    handler: String,
    #[serde(default = "default_memory")]
    memory_mb: i64,
    #[serde(default = "default_timeout")]
    timeout_s: i64,
    #[serde(default)]
    sandbox: Option<String>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    max_instances: Option<i64>,
    #[serde(default)]
    snapshot: bool,
    #[serde(default)]
    warmup_event: Option<String>,
    #[serde(default)]
    auto_warmup: Option<bool>,
    #[serde(default)]
    unit: Option<i64>,
    #[serde(default)]
    accelerator: Option<String>,
    #[serde(default)]
    arch: Option<String>,
    #[serde(default)]
    network: Option<String>,
}

fn yes() -> bool {
    true
}

/// Whether `auto_warmup`, given or not, holds for `runtime`: on by default for Python,
/// refused by name where it cannot be honoured.
pub fn auto_warmup_for(runtime: Runtime, given: Option<bool>) -> Result<bool, ManifestError> {
    match (runtime, given) {
        (Runtime::Python3, g) => Ok(g.unwrap_or(true)),
        (_, Some(true)) => Err(ManifestError::Invalid {
            key: "auto_warmup",
            reason: "automatic warm-up is implemented for python3 functions".into(),
        }),
        (_, _) => Ok(false),
    }
}

fn default_runtime() -> String {
    "python3".into()
}
fn default_memory() -> i64 {
    128
}
fn default_timeout() -> i64 {
    30
}

impl FunctionManifest {
    /// Parses and checks a `spore.toml`.
    pub fn from_toml(text: &str) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(ManifestError::Parse)?;
        let runtime: Runtime = raw.runtime.parse()?;
        let manifest = FunctionManifest {
            name: raw.name,
            runtime,
            auto_warmup: auto_warmup_for(runtime, raw.auto_warmup)?,
            runtime_name: Some(raw.runtime),
            handler: raw.handler,
            memory_mb: in_range("memory_mb", raw.memory_mb, &MEMORY_MB_RANGE)?,
            timeout_s: in_range("timeout_s", raw.timeout_s, &TIMEOUT_S_RANGE)?,
            sandbox: raw.sandbox.as_deref().unwrap_or("container").parse()?,
            environment: raw.environment,
            max_instances: raw
                .max_instances
                .map(|m| in_range("max_instances", m, &(1..=1024)))
                .transpose()?,
            snapshot: raw.snapshot,
            warmup_event: raw.warmup_event,
            unit: raw
                .unit
                .map(|u| in_range("unit", u, &(0..=65535)))
                .transpose()?,
            accelerator: raw.accelerator,
            arch: raw.arch,
            network: raw.network.as_deref().map(str::parse).transpose()?,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// The runtime's name as given (or, for older records, the kind's).
    pub fn runtime_str(&self) -> &str {
        self.runtime_name
            .as_deref()
            .unwrap_or_else(|| self.runtime.as_str())
    }

    /// The interpreter version the runtime's name asks for (Python's minor, Node's major);
    /// None: the host's default.
    pub fn runtime_version(&self) -> Option<u32> {
        runtime_version(self.runtime_str()).and_then(|(_, v)| v)
    }

    /// Checks the invariants of every field (used for manifests built from API requests too).
    pub fn validate(&self) -> Result<(), ManifestError> {
        if let Some(name) = &self.runtime_name {
            if runtime_version(name).map(|(kind, _)| kind) != Some(self.runtime) {
                return Err(ManifestError::Invalid {
                    key: "runtime",
                    reason: format!("{name:?} is not a {} runtime", self.runtime),
                });
            }
        }
        crate::validate_function_name(&self.name)?;
        validate_handler(&self.handler)?;
        in_range("memory_mb", i64::from(self.memory_mb), &MEMORY_MB_RANGE)?;
        in_range("timeout_s", i64::from(self.timeout_s), &TIMEOUT_S_RANGE)?;
        if self.snapshot && self.runtime != Runtime::Python3 {
            return Err(ManifestError::Invalid {
                key: "snapshot",
                reason: "snapshots are implemented for python3 functions (Node.js runs \
                         background threads, which a process snapshot cannot resume)"
                    .into(),
            });
        }
        if let Some(path) = &self.warmup_event {
            validate_warmup_event(path)?;
            if self.runtime != Runtime::Python3 {
                return Err(ManifestError::Invalid {
                    key: "warmup_event",
                    reason: "warm-up events are implemented for python3 functions".into(),
                });
            }
        }
        for (key, value) in [("accelerator", &self.accelerator), ("arch", &self.arch)] {
            if let Some(v) = value {
                let ok = !v.is_empty()
                    && v.len() <= 32
                    && v.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    });
                if !ok {
                    return Err(ManifestError::Invalid {
                        key,
                        reason: format!(
                            "{v:?} is not a valid name (lowercase letters, digits, '-' and '_', up to 32)"
                        ),
                    });
                }
            }
        }
        for key in self.environment.keys() {
            let ok = !key.is_empty()
                && !key.as_bytes()[0].is_ascii_digit()
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(ManifestError::Invalid {
                    key: "environment",
                    reason: format!("{key:?} is not a valid variable name"),
                });
            }
        }
        let size: usize = self
            .environment
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if size > MAX_ENVIRONMENT_BYTES {
            return Err(ManifestError::Invalid {
                key: "environment",
                reason: format!(
                    "the variables take {size} bytes (names and values); Lambda's limit, which Spore keeps, is {MAX_ENVIRONMENT_BYTES} (4 KB): keep larger data in the code package or a file"
                ),
            });
        }
        Ok(())
    }
}

/// Most bytes a function's environment may take, names and values together (Lambda's 4 KB).
pub const MAX_ENVIRONMENT_BYTES: usize = 4096;

fn in_range(
    key: &'static str,
    value: i64,
    range: &std::ops::RangeInclusive<u32>,
) -> Result<u32, ManifestError> {
    u32::try_from(value)
        .ok()
        .filter(|v| range.contains(v))
        .ok_or_else(|| ManifestError::Invalid {
            key,
            reason: format!(
                "{value} is out of range {}..={}",
                range.start(),
                range.end()
            ),
        })
}

/// A warm-up event path: relative, inside the code package, at most 256 bytes.
fn validate_warmup_event(path: &str) -> Result<(), ManifestError> {
    let bad = |reason: &str| ManifestError::Invalid {
        key: "warmup_event",
        reason: format!("{path:?} {reason}"),
    };
    if path.is_empty() || path.len() > 256 {
        return Err(bad("must be 1 to 256 bytes"));
    }
    if path.starts_with('/') || path.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(bad(
            "must be a relative path inside the function's code (no leading /, no .., no //)",
        ));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(bad("has control characters"));
    }
    Ok(())
}

/// Checks a handler string: `module.function`, the module a dotted or slashed path of
/// identifiers.
pub fn validate_handler(handler: &str) -> Result<(), ManifestError> {
    let bad = |why: &str| ManifestError::Invalid {
        key: "handler",
        reason: format!(
            "{handler:?} {why}; write it as \"module.function\", e.g. \"main.handler\""
        ),
    };
    let (module, func) = handler.rsplit_once('.').ok_or_else(|| bad("has no '.'"))?;
    let ident = |s: &str| {
        !s.is_empty()
            && !s.as_bytes()[0].is_ascii_digit()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if !ident(func) {
        return Err(bad("does not end in a function name"));
    }
    if !module.split(['/', '.']).all(ident) {
        return Err(bad("has a module path that is not made of identifiers"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environments_over_4_kb_are_refused() {
        let mut m =
            FunctionManifest::from_toml("name = \"f\"\nruntime = \"python3\"\nhandler = \"m.h\"\n")
                .unwrap();
        m.environment.insert("BIG".into(), "x".repeat(4093));
        assert!(m.validate().is_ok());
        m.environment.insert("BIG".into(), "x".repeat(4094));
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("environment") && e.contains("4096"), "{e}");
    }

    #[test]
    fn full_manifest() {
        let m = FunctionManifest::from_toml(
            r#"
name = "hello"
runtime = "python3.11"
handler = "main.handler"
memory_mb = 256
timeout_s = 5
sandbox = "cfork"
[environment]
GREETING = "hi"
"#,
        )
        .unwrap();
        assert_eq!(m.runtime, Runtime::Python3);
        assert_eq!(m.runtime_str(), "python3.11");
        assert_eq!(m.runtime_version(), Some(11));
        assert_eq!(m.memory_mb, 256);
        assert_eq!(m.sandbox, SandboxKind::Cfork);
        assert_eq!(m.environment["GREETING"], "hi");
    }

    #[test]
    fn warmup_events_are_relative_paths_in_the_code() {
        let m = FunctionManifest::from_toml(
            "name = \"a\"\nhandler = \"m.f\"\nwarmup_event = \"events/warm.json\"",
        )
        .unwrap();
        assert_eq!(m.warmup_event.as_deref(), Some("events/warm.json"));
        for bad in ["", "a//b", "a/../b", "/x", "a\nb"] {
            assert!(validate_warmup_event(bad).is_err(), "{bad:?}");
        }
        assert!(validate_warmup_event(&"x".repeat(257)).is_err());
    }

    #[test]
    fn defaults() {
        let m = FunctionManifest::from_toml("name = \"a\"\nhandler = \"m.f\"\n").unwrap();
        assert_eq!(
            (m.runtime, m.memory_mb, m.timeout_s, m.sandbox),
            (Runtime::Python3, 128, 30, SandboxKind::Container)
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("name = \"a\"\nhandler = \"nodot\"", "handler"),
            ("name = \"a b\"\nhandler = \"m.f\"", "name"),
            (
                "name = \"a\"\nhandler = \"m.f\"\nmemory_mb = 1",
                "memory_mb",
            ),
            (
                "name = \"a\"\nhandler = \"m.f\"\ntimeout_s = 0",
                "timeout_s",
            ),
            (
                "name = \"a\"\nhandler = \"m.f\"\nruntime = \"cobol\"",
                "runtime",
            ),
            (
                "name = \"a\"\nhandler = \"m.f\"\nsandbox = \"vm\"",
                "sandbox",
            ),
            (
                "name = \"a\"\nhandler = \"m.f\"\nwarmup_event = \"../x.json\"",
                "warmup_event",
            ),
            (
                "name = \"a\"\nhandler = \"m.f\"\nwarmup_event = \"/etc/passwd\"",
                "warmup_event",
            ),
            (
                "name = \"a\"\nhandler = \"m.f\"\nruntime = \"node20\"\nwarmup_event = \"e.json\"",
                "warmup_event",
            ),
        ];
        for (text, key) in cases {
            let err = FunctionManifest::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} -> {err}");
        }
        let err = FunctionManifest::from_toml("name = \"a\"\nhandler = \"m.f\"\nbogus = 1");
        assert!(matches!(err, Err(ManifestError::Parse(_))));
        assert!(matches!(
            FunctionManifest::from_toml("not toml ["),
            Err(ManifestError::Parse(_))
        ));
    }

    #[test]
    fn runtime_names_keep_their_version() {
        assert_eq!(runtime_version("python3"), Some((Runtime::Python3, None)));
        assert_eq!(
            runtime_version("python3.9"),
            Some((Runtime::Python3, Some(9)))
        );
        assert_eq!(
            runtime_version("nodejs22.x"),
            Some((Runtime::Node20, Some(22)))
        );
        assert_eq!(runtime_version("node20"), Some((Runtime::Node20, Some(20))));
        for bad in [
            "python",
            "python3.",
            "python3.x",
            "nodejs",
            "nodejs20",
            "node",
            "java21",
        ] {
            assert_eq!(runtime_version(bad), None, "{bad}");
        }
        // Records written before the name was kept load, and report the kind's name.
        let old = r#"{"name":"f","runtime":"node20","handler":"index.h","memory_mb":128,
            "timeout_s":3,"sandbox":"container","environment":{},"max_instances":null}"#;
        let m: FunctionManifest = serde_json::from_str(old).unwrap();
        assert_eq!((m.runtime, m.runtime_str()), (Runtime::Node20, "node20"));
        let m: FunctionManifest = serde_json::from_str(&old.replace("node20", "python3")).unwrap();
        assert_eq!((m.runtime_str(), m.runtime_version()), ("python3", None));
        // A name of another kind than the record's is refused.
        let mut m = FunctionManifest::from_toml("name = \"a\"\nhandler = \"m.f\"\n").unwrap();
        m.runtime_name = Some("nodejs20.x".into());
        assert!(m.validate().unwrap_err().to_string().contains("runtime"));
    }

    #[test]
    fn handlers() {
        for ok in ["main.handler", "pkg/mod.fn_1", "a.b.c"] {
            assert!(validate_handler(ok).is_ok(), "{ok}");
        }
        for bad in ["main", ".f", "m.", "1m.f", "m.f-g", "../x.f"] {
            assert!(validate_handler(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod network_tests {
    use super::*;

    #[test]
    fn network_key_is_egress_none_or_the_default() {
        let base = "name = \"a\"\nhandler = \"m.f\"\n";
        assert_eq!(FunctionManifest::from_toml(base).unwrap().network, None);
        for (v, want) in [("egress", Network::Egress), ("none", Network::None)] {
            let m = FunctionManifest::from_toml(&format!("{base}network = \"{v}\"")).unwrap();
            assert_eq!(m.network, Some(want));
        }
        let err = FunctionManifest::from_toml(&format!("{base}network = \"vpc\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`network`") && err.contains("vpc"), "{err}");
    }
}
