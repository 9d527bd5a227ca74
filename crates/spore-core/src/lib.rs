//! Shared types of Spore: the function manifest (`spore.toml`), DAG specifications, function
//! names, runtimes, sandbox kinds, invocation options and results, the control plane's errors
//! and the structured function error.
//!
//! This crate has no I/O beyond parsing; every other crate depends on it, and it depends on no
//! other Spore crate.
#![forbid(unsafe_code)]

pub mod control;
pub mod dag;
pub mod invoke;
pub mod manifest;

pub use control::{error_chain, ControlError, Invocation, InvokeOptions};
pub use invoke::{ErrorExtra, FunctionError, MemoryMode, StartKind};
pub use manifest::{
    runtime_version, FunctionManifest, ManifestError, Network, Runtime, SandboxKind,
};

/// Largest synchronous invocation payload, request or response, in bytes (Lambda's 6 MB).
pub const MAX_SYNC_PAYLOAD: usize = 6 * 1024 * 1024;
/// Largest asynchronous (`Event`) invocation payload, in bytes (Lambda's 256 KiB).
pub const MAX_ASYNC_PAYLOAD: usize = 256 * 1024;

/// Checks a function name: 1-64 characters of ASCII letters, digits, `-` and `_` (Lambda's rule).
pub fn validate_function_name(name: &str) -> Result<(), ManifestError> {
    let ok_len = (1..=64).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(ManifestError::Invalid {
            key: "name",
            reason: format!(
                "{name:?} is not a valid function name: use 1-64 letters, digits, '-' or '_'"
            ),
        })
    }
}

/// Extracts the function name from a name, a partial ARN (`123:function:name`) or a full ARN
/// (`arn:aws:lambda:region:acct:function:name[:qualifier]`), as the Lambda API accepts all three.
pub fn function_name_from_ref(reference: &str) -> &str {
    let parts: Vec<&str> = reference.split(':').collect();
    match parts.iter().position(|p| *p == "function") {
        Some(i) if i + 1 < parts.len() => parts[i + 1],
        _ => reference,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_function_name("hello-world_1").is_ok());
        assert!(validate_function_name("").is_err());
        assert!(validate_function_name("a/b").is_err());
        assert!(validate_function_name(&"x".repeat(65)).is_err());
        assert!(validate_function_name("../etc").is_err());
    }

    #[test]
    fn arns() {
        assert_eq!(function_name_from_ref("hello"), "hello");
        assert_eq!(
            function_name_from_ref("arn:aws:lambda:us-east-1:123456789012:function:hello"),
            "hello"
        );
        assert_eq!(
            function_name_from_ref("arn:aws:lambda:us-east-1:123456789012:function:hello:$LATEST"),
            "hello"
        );
        assert_eq!(function_name_from_ref("123456789012:function:hi"), "hi");
    }
}
