//! The DAG API: deploy, list, describe, delete and invoke function DAGs.
//!
//! - `POST /dags` (body: the DAG file, TOML, or the same as JSON) creates or replaces a DAG.
//! - `GET /dags`, `GET /dags/{name}`, `DELETE /dags/{name}`.
//! - `POST /dags/{name}/invocations[?transport=shm|http][&timing=1]`: the body is the input
//!   event; the answer is the sink's output, or (with `X-Amz-Function-Error: Unhandled`) the
//!   failing node's error in Lambda's shape plus `"node"`. With `timing=1` the answer is
//!   `{"Result": <output>, "Timing": {...}}` with per-node timings.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use spore_core::dag::{DagSpec, Transport};
use spore_dag::DagInvokeOptions;

use crate::lambda::{ApiError, ApiResult};
use crate::AppState;

pub(crate) async fn put_dag(State(st): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::invalid("the DAG file is not UTF-8"))?;
    let spec: DagSpec = if text.trim_start().starts_with('{') {
        serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(format!("Malformed DAG JSON: {e}")))?
    } else {
        DagSpec::from_toml(text).map_err(|e| ApiError::invalid(spore_core::error_chain(&e)))?
    };
    let spec = st.control.put_dag(spec)?;
    Ok((StatusCode::CREATED, axum::Json(spec)).into_response())
}

pub(crate) async fn list_dags(State(st): State<AppState>) -> Response {
    axum::Json(json!({ "Dags": st.control.list_dags() })).into_response()
}

pub(crate) async fn get_dag(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(st.control.get_dag(&name)?).into_response())
}

pub(crate) async fn delete_dag(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    st.control.delete_dag(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct InvokeQuery {
    transport: Option<String>,
    timing: Option<String>,
}

pub(crate) async fn invoke_dag(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<InvokeQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let transport = match q.transport.as_deref() {
        None => None,
        Some("shm") => Some(Transport::Shm),
        Some("http") => Some(Transport::Http),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "transport {other:?} must be shm or http"
            )))
        }
    };
    let timing = match q.timing.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "timing {other:?} must be 1 or 0"
            )))
        }
    };
    let run = st
        .control
        .invoke_dag(&name, &body, DagInvokeOptions { transport })
        .await?;
    let (mut out, failed, raw) = match &run.outcome {
        Ok(bytes) => (bytes.clone(), false, run.raw),
        Err(f) => {
            let mut v = serde_json::to_value(f.to_function_error()).expect("errors serialize");
            v["node"] = json!(f.node);
            (serde_json::to_vec(&v).expect("json"), true, false)
        }
    };
    // "link": nodes on other units; the control plane relayed every hop. "shm+link": a
    // pipeline spread over units.
    let transport = if run.relayed {
        "link".to_owned()
    } else if run.spread {
        format!("{}+link", run.transport)
    } else {
        run.transport.to_string()
    };
    let transport = transport.as_str();
    if timing {
        let result: serde_json::Value = if raw {
            json!({ "bytes": out.len() })
        } else {
            serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
        };
        out = serde_json::to_vec(&json!({
            "Result": result,
            "Timing": { "transport": transport, "total_ms": run.total_ms, "nodes": run.nodes },
        }))
        .expect("json");
    }
    let mut resp = (StatusCode::OK, out).into_response();
    let h = resp.headers_mut();
    let ctype = if raw && !timing {
        "application/octet-stream"
    } else {
        "application/json"
    };
    h.insert("content-type", HeaderValue::from_static(ctype));
    if failed {
        h.insert(
            "x-amz-function-error",
            HeaderValue::from_static("Unhandled"),
        );
    }
    for (k, v) in [
        ("x-spore-transport", transport.to_owned()),
        ("x-spore-duration-ms", format!("{:.3}", run.total_ms)),
        ("x-amzn-requestid", run.request_id.clone()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    Ok(resp)
}
