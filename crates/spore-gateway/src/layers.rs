//! Lambda layers: `PublishLayerVersion`, `GetLayerVersion`, `GetLayerVersionByArn`,
//! `ListLayers`, `ListLayerVersions`, `DeleteLayerVersion`.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use spore_control::ControlError;
use spore_registry::layers::{self, LayerVersion, PublishSpec};

use crate::lambda::{decode_zip, parse_json, ApiError, ApiResult};
use crate::AppState;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ContentIn {
    zip_file: Option<String>,
    s3_bucket: Option<String>,
    s3_key: Option<String>,
    s3_object_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct PublishIn {
    content: ContentIn,
    #[serde(default)]
    description: String,
    license_info: Option<String>,
    #[serde(default)]
    compatible_runtimes: Vec<String>,
    #[serde(default)]
    compatible_architectures: Vec<String>,
}

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        "The resource you requested does not exist.",
    )
}

fn layer_error(e: layers::LayerError) -> ApiError {
    ControlError::from(e).into()
}

/// A layer version in Lambda's `GetLayerVersion` shape.
pub(crate) fn version_json(v: &LayerVersion) -> serde_json::Value {
    let mut out = serde_json::json!({
        "Content": {
            "Location": "",
            "CodeSha256": v.code_sha256,
            "CodeSize": v.code_size,
        },
        "LayerArn": v.layer_arn(),
        "LayerVersionArn": v.version_arn(),
        "Description": v.description,
        "CreatedDate": spore_registry::store::lambda_timestamp(v.created_ms),
        "Version": v.version,
        "CompatibleRuntimes": v.compatible_runtimes,
        "CompatibleArchitectures": v.compatible_architectures,
    });
    if let Some(l) = &v.license_info {
        out["LicenseInfo"] = l.clone().into();
    }
    out
}

/// The shorter shape of `ListLayerVersions` and `ListLayers`.
fn list_item(v: &LayerVersion) -> serde_json::Value {
    let mut out = version_json(v);
    if let Some(o) = out.as_object_mut() {
        o.remove("Content");
        o.remove("LayerArn");
    }
    out
}

fn version_number(v: &str) -> ApiResult<u64> {
    v.parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::invalid(format!("VersionNumber {v:?} is not a layer version")))
}

/// Lambda's runtime identifiers (its `Runtime` enum) besides the Python and Node.js ones
/// Spore parses: a layer's `CompatibleRuntimes` names only these.
const OTHER_RUNTIMES: &[&str] = &[
    "nodejs",
    "nodejs4.3",
    "nodejs4.3-edge",
    "nodejs6.10",
    "nodejs8.10",
    "java8",
    "java8.al2",
    "java11",
    "java17",
    "java21",
    "java25",
    "python2.7",
    "dotnetcore1.0",
    "dotnetcore2.0",
    "dotnetcore2.1",
    "dotnetcore3.1",
    "dotnet6",
    "dotnet8",
    "dotnet10",
    "go1.x",
    "ruby2.5",
    "ruby2.7",
    "ruby3.2",
    "ruby3.3",
    "ruby3.4",
    "provided",
    "provided.al2",
    "provided.al2023",
];

/// Whether `r` is a Lambda runtime name.
fn known_runtime(r: &str) -> bool {
    OTHER_RUNTIMES.contains(&r)
        || r != "python3" && spore_core::manifest::runtime_version(r).is_some()
}

/// `POST /2018-10-31/layers/{LayerName}/versions`.
pub(crate) async fn publish(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: PublishIn = parse_json(&body)?;
    if req.content.s3_bucket.is_some()
        || req.content.s3_key.is_some()
        || req.content.s3_object_version.is_some()
    {
        return Err(ApiError::invalid(
            "Content.S3Bucket is not supported by Spore: send Content.ZipFile",
        ));
    }
    let (name, version) = layers::parse_ref(&name).map_err(layer_error)?;
    if version.is_some() {
        return Err(ApiError::invalid("LayerName must not name a version"));
    }
    let zip = decode_zip(req.content.zip_file.as_deref())?;
    if req.description.chars().count() > 256 {
        return Err(ApiError::invalid(
            "Description is longer than 256 characters",
        ));
    }
    if req
        .license_info
        .as_deref()
        .is_some_and(|l| l.chars().count() > 512)
    {
        return Err(ApiError::invalid(
            "LicenseInfo is longer than 512 characters",
        ));
    }
    if req.compatible_runtimes.len() > 15 || req.compatible_architectures.len() > 2 {
        return Err(ApiError::invalid(
            "At most 15 CompatibleRuntimes and 2 CompatibleArchitectures",
        ));
    }
    if let Some(r) = req.compatible_runtimes.iter().find(|r| !known_runtime(r)) {
        let shown: String = r.chars().take(100).collect();
        return Err(ApiError::invalid(format!(
            "CompatibleRuntimes: {shown:?} is not a Lambda runtime name (python3.12, nodejs20.x, java21, provided.al2023, ...)"
        )));
    }
    let spec = PublishSpec {
        description: req.description,
        license_info: req.license_info,
        compatible_runtimes: req.compatible_runtimes,
        compatible_architectures: req.compatible_architectures,
    };
    let control = st.control.clone();
    let v = tokio::task::spawn_blocking(move || control.publish_layer(&name, &zip, spec))
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??;
    Ok((StatusCode::CREATED, axum::Json(version_json(&v))).into_response())
}

/// `GET /2018-10-31/layers/{LayerName}/versions/{VersionNumber}`.
pub(crate) async fn get_version(
    State(st): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (name, _) = layers::parse_ref(&name).map_err(layer_error)?;
    let v = st
        .control
        .layer_version(&name, version_number(&version)?)
        .ok_or_else(not_found)?;
    Ok(axum::Json(version_json(&v)).into_response())
}

/// `DELETE /2018-10-31/layers/{LayerName}/versions/{VersionNumber}`: functions that use the
/// version keep their copy.
pub(crate) async fn delete_version(
    State(st): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (name, _) = layers::parse_ref(&name).map_err(layer_error)?;
    let version = version_number(&version)?;
    let control = st.control.clone();
    tokio::task::spawn_blocking(move || control.delete_layer_version(&name, version))
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(rename = "CompatibleRuntime")]
    runtime: Option<String>,
    #[serde(rename = "CompatibleArchitecture")]
    arch: Option<String>,
    #[serde(rename = "MaxItems")]
    max_items: Option<usize>,
    #[serde(rename = "Marker")]
    marker: Option<String>,
    /// `LayerVersion` for `GetLayerVersionByArn`.
    find: Option<String>,
    #[serde(rename = "Arn")]
    arn: Option<String>,
}

impl ListQuery {
    fn matches(&self, v: &LayerVersion) -> bool {
        self.runtime
            .as_ref()
            .is_none_or(|r| v.compatible_runtimes.contains(r))
            && self
                .arch
                .as_ref()
                .is_none_or(|a| v.compatible_architectures.contains(a))
    }

    fn page<T>(&self, items: Vec<T>) -> ApiResult<(Vec<T>, Option<String>)> {
        let start = match &self.marker {
            Some(m) => m
                .parse::<usize>()
                .map_err(|_| ApiError::invalid(format!("Marker {m:?} is not one Spore gave")))?,
            None => 0,
        };
        let max = self.max_items.unwrap_or(50).clamp(1, 50);
        let total = items.len();
        let page: Vec<T> = items.into_iter().skip(start).take(max).collect();
        let next = (start + max < total).then(|| (start + max).to_string());
        Ok((page, next))
    }
}

/// `GET /2018-10-31/layers`: `ListLayers`, or with `find=LayerVersion&Arn=...`
/// `GetLayerVersionByArn`.
pub(crate) async fn list_layers(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    if let Some(find) = &q.find {
        if find != "LayerVersion" {
            return Err(ApiError::invalid(format!(
                "find={find:?} is not an operation Spore knows (LayerVersion)"
            )));
        }
        let arn = q
            .arn
            .as_deref()
            .ok_or_else(|| ApiError::invalid("Arn is required"))?;
        let (name, version) = layers::parse_ref(arn).map_err(layer_error)?;
        let version = version
            .ok_or_else(|| ApiError::invalid(format!("Arn {arn} names no layer version")))?;
        let v = st
            .control
            .layer_version(&name, version)
            .ok_or_else(not_found)?;
        return Ok(axum::Json(version_json(&v)).into_response());
    }
    let mut names: Vec<String> = st
        .control
        .latest_layers()
        .into_iter()
        .map(|v| v.name)
        .collect();
    names.sort();
    let items: Vec<serde_json::Value> = names
        .iter()
        .filter_map(|n| {
            let latest = st
                .control
                .layer_versions(n)
                .into_iter()
                .rev()
                .find(|v| q.matches(v))?;
            Some(serde_json::json!({
                "LayerName": n,
                "LayerArn": layers::layer_arn(n),
                "LatestMatchingVersion": list_item(&latest),
            }))
        })
        .collect();
    let (page, next) = q.page(items)?;
    let mut out = serde_json::json!({ "Layers": page });
    if let Some(m) = next {
        out["NextMarker"] = m.into();
    }
    Ok(axum::Json(out).into_response())
}

/// `GET /2018-10-31/layers/{LayerName}/versions`, newest first.
pub(crate) async fn list_versions(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    let (name, _) = layers::parse_ref(&name).map_err(layer_error)?;
    let items: Vec<serde_json::Value> = st
        .control
        .layer_versions(&name)
        .iter()
        .rev()
        .filter(|v| q.matches(v))
        .map(list_item)
        .collect();
    let (page, next) = q.page(items)?;
    let mut out = serde_json::json!({ "LayerVersions": page });
    if let Some(m) = next {
        out["NextMarker"] = m.into();
    }
    Ok(axum::Json(out).into_response())
}
