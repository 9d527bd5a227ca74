//! What a function record carries besides its code and configuration, and what changes
//! without making a new revision (its instances, cfork template and snapshots stay valid):
//! tags, the resource policy, reserved concurrency and the asynchronous-invocation settings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A function's tags, policy, concurrency and event-invoke configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionExtras {
    /// User tags (Spore's own `spore:` settings live in the manifest, not here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Reserved concurrency: the most instances the function may run (0: every invocation
    /// is throttled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_concurrency: Option<u32>,
    /// Resource policy statements, as Lambda returns them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy: Vec<serde_json::Value>,
    /// Bumped on every change of the policy (its `RevisionId`).
    #[serde(default)]
    pub policy_revision: u64,
    /// How asynchronous invocations are retried and where their results go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_invoke: Option<EventInvokeConfig>,
}

/// Lambda's `FunctionEventInvokeConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInvokeConfig {
    /// Retries after a failed attempt (0 to 2; None: Lambda's default, 2).
    pub maximum_retry_attempts: Option<u32>,
    /// Oldest an event may be and still be tried, seconds (60 to 21600; None: 21600).
    pub maximum_event_age_s: Option<u32>,
    /// Function ARN invoked with the record of a successful invocation.
    pub on_success: Option<String>,
    /// Function ARN invoked with the record of an invocation that failed for good.
    pub on_failure: Option<String>,
    /// Last change, ms since the epoch.
    pub last_modified_ms: u64,
}

impl EventInvokeConfig {
    /// Lambda's default number of retries.
    pub const DEFAULT_RETRIES: u32 = 2;
    /// Lambda's default (and largest) event age, seconds.
    pub const DEFAULT_MAX_AGE_S: u32 = 21_600;

    /// Retries in effect.
    pub fn retries(&self) -> u32 {
        self.maximum_retry_attempts.unwrap_or(Self::DEFAULT_RETRIES)
    }

    /// Maximum event age in effect, seconds.
    pub fn max_age_s(&self) -> u32 {
        self.maximum_event_age_s.unwrap_or(Self::DEFAULT_MAX_AGE_S)
    }
}
