//! Invocation results shared by the control plane, the gateway and the CLI.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How the instance that served an invocation was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    /// A warm instance from the pool.
    Warm,
    /// A fresh instance started for this invocation from scratch: a new sandbox and runtime
    /// (or, for a cfork function without a live template, the template's start and a fork).
    Cold,
    /// A fresh instance forked from the function's live cfork template.
    Fork,
    /// A fresh instance restored from the function's snapshot.
    Restore,
}

impl StartKind {
    /// `warm`, `cold`, `fork` or `restore`, as in the `X-Spore-Start` header.
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Warm => "warm",
            StartKind::Cold => "cold",
            StartKind::Fork => "fork",
            StartKind::Restore => "restore",
        }
    }
}

impl fmt::Display for StartKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A function error in Lambda's shape (`errorMessage`, `errorType`, `stackTrace`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionError {
    /// Human-readable message.
    #[serde(rename = "errorMessage")]
    pub message: String,
    /// Exception class, or a `Runtime.*` / `Sandbox.*` type for platform-detected failures.
    #[serde(rename = "errorType")]
    pub error_type: String,
    /// Formatted traceback lines, innermost last.
    #[serde(rename = "stackTrace", default)]
    pub stack_trace: Vec<String>,
}

impl FunctionError {
    /// A platform-detected error with no traceback.
    pub fn platform(error_type: &str, message: impl Into<String>) -> Self {
        FunctionError {
            message: message.into(),
            error_type: error_type.to_owned(),
            stack_trace: Vec::new(),
        }
    }
}

impl fmt::Display for FunctionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

/// How a restore installs the memory of a snapshot image (the modes `spore-snapshot`
/// implements; an invocation may ask for one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryMode {
    /// Read every stored page before resuming.
    Full,
    /// Resume at once; a server installs each page on its first touch (userfaultfd).
    Lazy,
    /// Install the working set recorded at an earlier restore up front, the rest lazily; with
    /// no working set yet, as `Lazy`, recording one.
    Reap,
}

impl MemoryMode {
    /// `full`, `lazy` or `reap`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryMode::Full => "full",
            MemoryMode::Lazy => "lazy",
            MemoryMode::Reap => "reap",
        }
    }
}

impl std::str::FromStr for MemoryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<MemoryMode, String> {
        match s {
            "full" => Ok(MemoryMode::Full),
            "lazy" => Ok(MemoryMode::Lazy),
            "reap" => Ok(MemoryMode::Reap),
            "compressed" | "reap+compressed" => Err(format!(
                "memory mode {s:?}: compression is a property of the image (spore serve \
                 --snapshot-codec lz4|zstd-N); the modes are full, lazy and reap"
            )),
            _ => Err(format!("unknown memory mode {s:?} (full, lazy, reap)")),
        }
    }
}
