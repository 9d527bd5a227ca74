//! Lambda's function states for dependency builds (what `GetFunction` says of a function
//! whose build runs or failed), Spore's `X-Spore-Build` header on create and code updates,
//! and `X-Spore-Force` on deletes.

use axum::http::{HeaderMap, StatusCode};
use spore_control::DepsMode;
use spore_registry::FunctionRecord;

use crate::lambda::ApiError;

/// Header with which a create or code update skips the dependency build (`skip`: the
/// package vendors its packages; `spore deploy --no-build`).
pub(crate) const BUILD_HEADER: &str = "x-spore-build";

/// How a create or code update treats requirement files, from [`BUILD_HEADER`].
pub(crate) fn deps_mode(headers: &HeaderMap) -> Result<DepsMode, ApiError> {
    match headers.get(BUILD_HEADER).map(|v| v.to_str().unwrap_or("?")) {
        None | Some("build") => Ok(DepsMode::Build),
        Some("skip") => Ok(DepsMode::Skip),
        Some(other) => Err(ApiError::invalid(format!(
            "X-Spore-Build {other:?} must be build or skip"
        ))),
    }
}

/// Sets Lambda's state fields of `config` from `rec`'s dependency build, and Spore's
/// `SporeBuild` (the build's output, which `spore deploy` streams).
pub(crate) fn set_state(config: &mut serde_json::Value, rec: &FunctionRecord) {
    let Some(b) = &rec.build else {
        return;
    };
    let obj = config
        .as_object_mut()
        .expect("a configuration is an object");
    let mut set = |k: &str, v: serde_json::Value| {
        obj.insert(k.to_owned(), v);
    };
    match (b.creating, &b.failed) {
        _ if b.done => {}
        (true, None) => {
            set("State", "Pending".into());
            set(
                "StateReason",
                "The function's dependencies are being built".into(),
            );
            set("StateReasonCode", "Creating".into());
            set("LastUpdateStatus", "InProgress".into());
        }
        (true, Some(why)) => {
            set("State", "Failed".into());
            set("StateReason", why.clone().into());
            set("StateReasonCode", "InvalidConfiguration".into());
            set("LastUpdateStatus", "Failed".into());
            set("LastUpdateStatusReason", why.clone().into());
            set("LastUpdateStatusReasonCode", "InvalidConfiguration".into());
        }
        (false, None) => {
            set("LastUpdateStatus", "InProgress".into());
            set(
                "LastUpdateStatusReason",
                "The function's new dependencies are being built".into(),
            );
            set("LastUpdateStatusReasonCode", "Creating".into());
        }
        (false, Some(why)) => {
            set("LastUpdateStatus", "Failed".into());
            set("LastUpdateStatusReason", why.clone().into());
            set("LastUpdateStatusReasonCode", "InvalidConfiguration".into());
        }
    }
    set(
        "SporeBuild",
        serde_json::json!({ "Lines": b.lines.as_slice(), "Dropped": b.dropped }),
    );
}

/// Header with which a delete removes a function that DAGs use (`true`); the answer's
/// [`BROKEN_DAGS_HEADER`] names the DAGs that no longer run.
pub(crate) const FORCE_HEADER: &str = "x-spore-force";
/// Header of a forced delete's answer: the DAGs that used the function, comma-separated.
pub(crate) const BROKEN_DAGS_HEADER: &str = "x-spore-broken-dags";

/// Whether a delete is forced, from [`FORCE_HEADER`].
pub(crate) fn force(headers: &HeaderMap) -> Result<bool, ApiError> {
    match headers.get(FORCE_HEADER).map(|v| v.to_str().unwrap_or("?")) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "X-Spore-Force {other:?} must be true or false"
        ))),
    }
}

/// The answer to a delete: 204, naming the DAGs it broke.
pub(crate) fn deleted(broken: &[String]) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&broken.join(",")) {
        if !broken.is_empty() {
            resp.headers_mut().insert(BROKEN_DAGS_HEADER, v);
        }
    }
    resp
}
