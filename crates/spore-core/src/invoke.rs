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

/// A function error in Lambda's shape (`errorMessage`, `errorType`, `requestId`,
/// `stackTrace`; Node.js functions' errors carry `trace` instead of `stackTrace`, as Lambda's
/// Node.js runtime writes them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawFunctionError")]
pub struct FunctionError {
    /// Human-readable message.
    pub message: String,
    /// Exception class, or a `Runtime.*` / `Sandbox.*` type for platform-detected failures.
    pub error_type: String,
    /// Formatted traceback lines, innermost last.
    pub stack_trace: Vec<String>,
    /// What only some errors have (boxed: errors travel inside many results).
    pub extra: Option<Box<ErrorExtra>>,
}

/// The parts of a [`FunctionError`] that only a runtime's errors have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorExtra {
    /// The invocation's request id (errors a runtime reports from a handler).
    pub request_id: Option<String>,
    /// (Node.js) the error's stack, its first line the error itself; written instead of
    /// `stackTrace` when set.
    pub trace: Vec<String>,
}

#[derive(Deserialize)]
struct RawFunctionError {
    #[serde(rename = "errorMessage")]
    message: String,
    #[serde(rename = "errorType")]
    error_type: String,
    #[serde(rename = "stackTrace", default)]
    stack_trace: Vec<String>,
    #[serde(rename = "requestId", default)]
    request_id: Option<String>,
    #[serde(default)]
    trace: Vec<String>,
}

impl From<RawFunctionError> for FunctionError {
    fn from(r: RawFunctionError) -> Self {
        let extra = (r.request_id.is_some() || !r.trace.is_empty()).then(|| {
            Box::new(ErrorExtra {
                request_id: r.request_id,
                trace: r.trace,
            })
        });
        FunctionError {
            message: r.message,
            error_type: r.error_type,
            stack_trace: r.stack_trace,
            extra,
        }
    }
}

impl Serialize for FunctionError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("errorMessage", &self.message)?;
        m.serialize_entry("errorType", &self.error_type)?;
        if let Some(r) = self.request_id() {
            m.serialize_entry("requestId", r)?;
        }
        match &self.extra {
            Some(x) if !x.trace.is_empty() => m.serialize_entry("trace", &x.trace)?,
            _ => m.serialize_entry("stackTrace", &self.stack_trace)?,
        }
        m.end()
    }
}

impl FunctionError {
    /// A platform-detected error with no traceback.
    pub fn platform(error_type: &str, message: impl Into<String>) -> Self {
        FunctionError {
            message: message.into(),
            error_type: error_type.to_owned(),
            stack_trace: Vec::new(),
            extra: None,
        }
    }

    /// The request id the runtime reported with the error, if any.
    pub fn request_id(&self) -> Option<&str> {
        self.extra.as_ref()?.request_id.as_deref()
    }
}

impl fmt::Display for FunctionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_is_lambdas() {
        let mut e = FunctionError::platform("ValueError", "bad");
        e.extra = Some(Box::new(ErrorExtra {
            request_id: Some("r1".into()),
            trace: vec![],
        }));
        e.stack_trace = vec!["  File \"/var/task/main.py\", line 2, in handler\n".into()];
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["requestId"], "r1");
        assert_eq!(v["stackTrace"].as_array().unwrap().len(), 1);
        assert_eq!(serde_json::from_value::<FunctionError>(v).unwrap(), e);
        // Node.js: `trace`, no `stackTrace`; no request id when there is none.
        let mut n = FunctionError::platform("Error", "boom");
        n.extra = Some(Box::new(ErrorExtra {
            request_id: None,
            trace: vec![
                "Error: boom".into(),
                "    at handler (/var/task/index.js:1:1)".into(),
            ],
        }));
        let v = serde_json::to_value(&n).unwrap();
        assert!(
            v.get("stackTrace").is_none() && v.get("requestId").is_none(),
            "{v}"
        );
        assert_eq!(v["trace"][0], "Error: boom");
        assert_eq!(serde_json::from_value::<FunctionError>(v).unwrap(), n);
        // Older records (no request id, no trace) still load.
        let old: FunctionError =
            serde_json::from_str(r#"{"errorMessage":"m","errorType":"T","stackTrace":[]}"#)
                .unwrap();
        assert_eq!(old, FunctionError::platform("T", "m"));
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
