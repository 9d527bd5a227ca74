//! What a call into the control plane gives back, whichever subsystem served it: the outcome
//! of one invocation (local, forked, restored or relayed to another unit), its options, and
//! the platform's errors (each maps to one Lambda error shape at the gateway and to one
//! remote error kind on a unit link).

use crate::{FunctionError, MemoryMode, StartKind};

/// Errors the control plane returns to its callers (the gateway maps each to an HTTP status).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such function.
    #[error("Function not found: {0}")]
    NotFound(String),
    /// The function exists already.
    #[error("Function already exist: {0}")]
    Conflict(String),
    /// The resource is in use (a function a DAG runs) or in a state that forbids the
    /// operation (Lambda's `ResourceConflictException`).
    #[error("{0}")]
    InUse(String),
    /// A parameter is invalid.
    #[error("{0}")]
    InvalidParameter(String),
    /// The payload is not JSON.
    #[error("Could not parse request body into json: {0}")]
    InvalidRequestContent(String),
    /// The payload is larger than allowed.
    #[error("Request must be smaller than {limit} bytes for the {kind} invocation (got {size})")]
    RequestTooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
        /// `RequestResponse` or `Event`.
        kind: &'static str,
    },
    /// Every instance slot stayed busy until the deadline.
    #[error("Rate exceeded: all {0} instances of the function stayed busy")]
    TooManyRequests(u32),
    /// The daemon cannot serve this now (shutting down, or sandboxes unsupported here).
    #[error("{0}")]
    Unavailable(String),
    /// A platform failure.
    #[error("{0}")]
    Internal(String),
    /// The request conflicts with the resource's state (a version an alias points to).
    #[error("{0}")]
    ResourceConflict(String),
    /// A precondition the caller gave (`RevisionId`, `CodeSha256`) does not hold.
    #[error("{0}")]
    PreconditionFailed(String),
}

/// Options of one invocation.
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    /// Serve from a fresh instance, bypassing the warm pool.
    pub force_cold: bool,
    /// With `force_cold`: how the fresh instance starts (`Cold` = import from scratch,
    /// `Restore` = from the function's snapshot, `Fork`); None = the function's default.
    pub cold_path: Option<StartKind>,
    /// How a restore installs memory (None: the daemon's `snapshot_mode`).
    pub restore_mode: Option<MemoryMode>,
    /// Run on this processing unit rather than where the function is placed (a DAG node's
    /// `unit`).
    pub unit: Option<u32>,
    /// The caller's client context (`X-Amz-Client-Context`, decoded: a JSON object with
    /// `client`, `custom` and `env`), given to the handler as `context.client_context`.
    pub client_context: Option<serde_json::Value>,
}

/// The outcome of one invocation.
#[derive(Debug)]
pub struct Invocation {
    /// Request id.
    pub request_id: String,
    /// How the serving instance started.
    pub start: StartKind,
    /// Start-up time of a cold instance, ms (0 when warm).
    pub init_ms: f64,
    /// Time from the call to the result in the daemon, ms.
    pub total_ms: f64,
    /// Result JSON, or the function's error.
    pub outcome: Result<Vec<u8>, FunctionError>,
    /// Lambda-style log block (START/logs/END/REPORT).
    pub log: String,
    /// Where a fresh instance's start-up went (cfork: per step, ms); empty otherwise.
    pub breakdown: Vec<(String, f64)>,
    /// From the request reaching the daemon to the handler being called, ms (where the
    /// runtime reports it).
    pub to_handler_ms: Option<f64>,
    /// `CLOCK_MONOTONIC` ns when the handler started and returned (0: unknown).
    pub handler_ns: (u64, u64),
    /// The processing unit that ran it.
    pub unit: u32,
}

/// Formats an error with its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Checks that a non-empty payload is JSON.
pub fn check_json(payload: &[u8]) -> Result<(), ControlError> {
    if !payload.is_empty() {
        serde_json::from_slice::<serde::de::IgnoredAny>(payload)
            .map_err(|e| ControlError::InvalidRequestContent(e.to_string()))?;
    }
    Ok(())
}
