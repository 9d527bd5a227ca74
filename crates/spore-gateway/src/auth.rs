//! Who may call the API: every request but `/healthz` carries an AWS Signature Version 4
//! of one of the daemon's access keys, and the key may do what the request does (admin keys
//! everything, invoke-only keys invoking what their glob names). Refusals are 403s in
//! Lambda's error shapes (`UnrecognizedClientException`, `InvalidSignatureException`,
//! `AccessDeniedException`), which the AWS SDKs parse.
//!
//! Also the key management endpoints (`/spore/v1/keys`, admin keys only).

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use spore_auth::keys::KeyError;
use spore_auth::{Action, Key, KeyStore, RequestParts, SignatureError};

use crate::lambda::ApiError;
use crate::{AppState, MAX_BODY};

/// How the API checks its callers.
#[derive(Clone)]
pub enum Auth {
    /// Every request but `/healthz` is signed with one of these keys.
    Keys(Arc<RwLock<KeyStore>>),
    /// No checks (`spore serve --auth none`, loopback only): anyone who reaches the port may
    /// do anything.
    None,
}

impl Auth {
    /// Checks with the keys of `store`.
    pub fn keys(store: KeyStore) -> Auth {
        Auth::Keys(Arc::new(RwLock::new(store)))
    }
}

/// The key a request was signed with (in the request's extensions once it checked out).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's name.
    pub key: String,
}

/// A 403 in Lambda's shape, logged (method, path, why) for the operator's audit trail.
fn refused(parts: &axum::http::request::Parts, kind: &'static str, message: String) -> Response {
    tracing::info!(method = %parts.method, path = %parts.uri.path(), refusal = kind, "request refused: {message}");
    ApiError::new(StatusCode::FORBIDDEN, kind, message).into_response()
}

fn too_large(limit: usize) -> Response {
    tracing::warn!(
        refusal = "RequestEntityTooLargeException",
        "request refused: its body is over the limit of {limit} bytes"
    );
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLargeException",
        format!("Request must be smaller than {limit} bytes for the operation"),
    )
    .into_response()
}

/// Largest body a dashboard page takes (its login form).
const UI_MAX_BODY: usize = 64 * 1024;

/// What `method` on `path` does, for the key's permissions.
fn action(method: &axum::http::Method, path: &str) -> Action {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if method == axum::http::Method::POST {
        if let ["2015-03-31", "functions", name, "invocations"] = segs.as_slice() {
            let decoded = spore_auth::sigv4::percent_decode(name);
            // `name:qualifier` invokes a version or alias of `name`.
            let function = spore_core::function_name_from_ref(&decoded);
            return Action::Invoke {
                function: function.split(':').next().unwrap_or(function).to_owned(),
            };
        }
        if let ["dags", _, "invocations"] = segs.as_slice() {
            return Action::InvokeDag;
        }
    }
    Action::Manage
}

/// The middleware: checks the signature and the key's permission, then hands the request
/// (body restored) on.
pub(crate) async fn check(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    // An oversize body is refused in Lambda's shape (with or without authentication), from
    // its declared length, before any of it is read.
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large(MAX_BODY);
    }
    let (parts, body) = req.into_parts();
    let store = match &st.auth {
        Auth::None => {
            let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
                return too_large(MAX_BODY);
            };
            return next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
        }
        Auth::Keys(store) => store.clone(),
    };
    // The dashboard's pages check their own session; what they take is a login form.
    let path = parts.uri.path();
    if path == "/ui" || path.starts_with("/ui/") {
        let Ok(bytes) = to_bytes(body, UI_MAX_BODY).await else {
            return too_large(UI_MAX_BODY);
        };
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    }
    let authorizations = parts
        .headers
        .get_all(axum::http::header::AUTHORIZATION)
        .iter()
        .count();
    // The dashboard's calls: a session cookie in place of a signature.
    if authorizations == 0 {
        if let Some(key) = crate::sessions::session_cookie(&parts.headers)
            .and_then(|s| st.sessions.key_of(&s))
            .and_then(|name| store.read().expect("keys lock").get(&name).cloned())
        {
            let reads = matches!(
                parts.method,
                axum::http::Method::GET | axum::http::Method::HEAD
            );
            let marked = parts
                .headers
                .get("x-spore-ui")
                .is_some_and(|v| v.as_bytes() == b"1");
            if !reads && !marked {
                return refused(
                    &parts,
                    "AccessDeniedException",
                    "a request authenticated by the dashboard's cookie that changes anything must carry X-Spore-UI: 1".into(),
                );
            }
            let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
                return too_large(MAX_BODY);
            };
            return authorized(key, parts, bytes, next).await;
        }
    }
    // Who signed, from the headers alone: an unsigned request or an unknown key is refused
    // before its body is read (a stranger cannot make the daemon hold 72 MiB a connection).
    if authorizations > 1 {
        return refused(
            &parts,
            "InvalidSignatureException",
            "the request has more than one Authorization header".into(),
        );
    }
    let claimed = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(spore_auth::sigv4::access_key_of);
    match claimed {
        None if authorizations == 0 => {
            return refused(
                &parts,
                "UnrecognizedClientException",
                SignatureError::Missing.to_string(),
            )
        }
        None => {
            return refused(
                &parts,
                "InvalidSignatureException",
                "Authorization header: not an AWS Signature Version 4 (AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/lambda/aws4_request, SignedHeaders=..., Signature=...)".into(),
            )
        }
        Some(id) if store.read().expect("keys lock").by_access_key(id).is_none() => {
            return refused(
                &parts,
                "UnrecognizedClientException",
                SignatureError::UnknownKey.to_string(),
            )
        }
        _ => {}
    }
    let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
        return too_large(MAX_BODY);
    };
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    // HTTP/1.1 always has Host; an absolute-form request line carries it in the URI.
    if !headers.iter().any(|(n, _)| n == "host") {
        if let Some(a) = parts.uri.authority() {
            headers.push(("host".into(), a.as_str().to_owned()));
        }
    }
    let signed = RequestParts {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body: &bytes,
    };
    let key: Result<Key, SignatureError> = {
        let store = store.read().expect("keys lock");
        spore_auth::sigv4::verify(
            &signed,
            |id| store.by_access_key(id).map(|k| k.secret_access_key.clone()),
            SystemTime::now(),
        )
        .and_then(|v| {
            // Spore's API is Lambda's: a signature for another service is not for it.
            if v.service != "lambda" {
                return Err(SignatureError::Malformed(format!(
                    "the request is signed for service {:?}; Spore's API is \"lambda\"",
                    v.service
                )));
            }
            Ok(store
                .by_access_key(&v.access_key_id)
                .cloned()
                .expect("the key verified"))
        })
    };
    let key = match key {
        Ok(k) => k,
        Err(e @ (SignatureError::Missing | SignatureError::UnknownKey)) => {
            return refused(&parts, "UnrecognizedClientException", e.to_string())
        }
        Err(e) => return refused(&parts, "InvalidSignatureException", e.to_string()),
    };
    authorized(key, parts, bytes, next).await
}

/// Request headers that steer how Spore starts instances, refused to invoke-only keys.
const OPERATOR_HEADERS: &[&str] = &["x-spore-cold", "x-spore-restore-mode"];

/// Checks that `key` may do what the request does, then hands it on.
async fn authorized(
    key: Key,
    mut parts: axum::http::request::Parts,
    bytes: axum::body::Bytes,
    next: Next,
) -> Response {
    let action = action(&parts.method, parts.uri.path());
    if !key.allows(&action) {
        let what = match &action {
            Action::Invoke { function } => format!("invoke function {function:?}"),
            Action::InvokeDag => "invoke DAGs".to_owned(),
            Action::Manage => format!("{} {}", parts.method, parts.uri.path()),
        };
        let scope = match &key.functions {
            Some(g) => format!("invoke functions matching {g:?}"),
            None => "invoke functions".to_owned(),
        };
        return refused(
            &parts,
            "AccessDeniedException",
            format!(
                "User: access key {:?} is not authorized to {what}: it may only {scope}",
                key.name
            ),
        );
    }
    // Start-path controls are the operator's: an invoke-only key that could force fresh
    // sandboxes or template rebuilds on every call would turn each invocation into a far
    // costlier one.
    if key.invoke_only {
        if let Some(h) = OPERATOR_HEADERS
            .iter()
            .find(|h| parts.headers.contains_key(**h))
        {
            return refused(
                &parts,
                "AccessDeniedException",
                format!(
                    "User: access key {:?} may only invoke: the {h} header (a start-path control) needs a key that may manage functions",
                    key.name
                ),
            );
        }
    }
    parts.extensions.insert(Caller { key: key.name });
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub(crate) struct NewKey {
    name: String,
    #[serde(default)]
    invoke_only: bool,
    #[serde(default)]
    functions: Option<String>,
}

fn key_json(k: &Key, secret: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "Name": k.name,
        "AccessKeyId": k.access_key_id,
        "InvokeOnly": k.invoke_only,
        "Functions": k.functions,
        "Created": spore_registry::store::lambda_timestamp(k.created_ms),
    });
    if secret {
        v["SecretAccessKey"] = k.secret_access_key.clone().into();
    }
    v
}

fn key_error(e: KeyError) -> ApiError {
    match e {
        KeyError::NotFound(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            e.to_string(),
        ),
        KeyError::Exists(_) => ApiError::new(
            StatusCode::CONFLICT,
            "ResourceConflictException",
            e.to_string(),
        ),
        KeyError::Invalid(_) => ApiError::invalid(e.to_string()),
        KeyError::Io { .. } | KeyError::Corrupt { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            spore_core::error_chain(&e),
        ),
    }
}

fn store_of(st: &AppState) -> Result<Arc<RwLock<KeyStore>>, ApiError> {
    match &st.auth {
        Auth::Keys(s) => Ok(s.clone()),
        Auth::None => Err(ApiError::invalid(
            "this daemon runs with --auth none: it has no access keys to manage",
        )),
    }
}

/// `POST /spore/v1/keys`: makes a key; the answer is the only time its secret is shown.
pub(crate) async fn create_key(
    State(st): State<AppState>,
    Json(k): Json<NewKey>,
) -> Result<Response, ApiError> {
    let store = store_of(&st)?;
    let key = store
        .write()
        .expect("keys lock")
        .create(
            &k.name,
            k.invoke_only,
            k.functions,
            spore_registry::store::now_unix_ms(),
        )
        .map_err(key_error)?;
    tracing::info!(key = %key.name, invoke_only = key.invoke_only, functions = ?key.functions, "access key created");
    Ok((StatusCode::CREATED, Json(key_json(&key, true))).into_response())
}

/// `GET /spore/v1/keys`: every key, without secrets.
pub(crate) async fn list_keys(State(st): State<AppState>) -> Result<Response, ApiError> {
    let store = store_of(&st)?;
    let keys: Vec<serde_json::Value> = store
        .read()
        .expect("keys lock")
        .list()
        .iter()
        .map(|k| key_json(k, false))
        .collect();
    Ok(Json(serde_json::json!({ "Keys": keys })).into_response())
}

/// `DELETE /spore/v1/keys/{name}`.
pub(crate) async fn delete_key(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let store = store_of(&st)?;
    let key = store
        .write()
        .expect("keys lock")
        .remove(&name)
        .map_err(key_error)?;
    tracing::info!(key = %key.name, "access key removed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_follow_the_route() {
        use axum::http::Method;
        assert_eq!(
            action(&Method::POST, "/2015-03-31/functions/hello/invocations"),
            Action::Invoke {
                function: "hello".into()
            }
        );
        assert_eq!(
            action(
                &Method::POST,
                "/2015-03-31/functions/arn%3Aaws%3Alambda%3Ar%3A1%3Afunction%3Aimg-x/invocations"
            ),
            Action::Invoke {
                function: "img-x".into()
            }
        );
        assert_eq!(
            action(&Method::POST, "/dags/wc/invocations"),
            Action::InvokeDag
        );
        assert_eq!(
            action(&Method::GET, "/2015-03-31/functions/hello"),
            Action::Manage
        );
        assert_eq!(
            action(&Method::POST, "/2015-03-31/functions"),
            Action::Manage
        );
        assert_eq!(action(&Method::GET, "/metrics"), Action::Manage);
    }
}
