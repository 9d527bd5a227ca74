//! Lambda REST API handlers and their JSON shapes.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use spore_control::{Control, ControlError, FunctionSpec, InvokeOptions};
use spore_core::StartKind;
use spore_core::{function_name_from_ref, FunctionManifest, SandboxKind};
use spore_registry::{FunctionRecord, LambdaSettings};

use crate::AppState;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Tag naming the sandbox kind (the Lambda API has no field for it).
pub const TAG_SANDBOX: &str = "spore:sandbox";
/// Tag setting the most instances of a function.
pub const TAG_MAX_INSTANCES: &str = "spore:max_instances";
/// Tag turning snapshots on (`true`) for a function.
pub const TAG_SNAPSHOT: &str = "spore:snapshot";
/// Tag naming a warm-up event file in the function's code (`warmup_event`).
pub const TAG_WARMUP_EVENT: &str = "spore:warmup_event";
/// Tag turning automatic warm-up off (`false`) or on (`true`, the default for Python).
pub const TAG_AUTO_WARMUP: &str = "spore:auto_warmup";
/// Tag pinning a function to a processing unit.
pub const TAG_UNIT: &str = "spore:unit";
/// Tag naming the accelerator a function needs.
pub const TAG_ACCELERATOR: &str = "spore:accelerator";
/// Tag naming the instruction set a function needs.
pub const TAG_ARCH: &str = "spore:arch";
/// Tag setting a function's network access (`egress` or `none`).
pub const TAG_NETWORK: &str = "spore:network";

/// Every `spore:` tag CreateFunction reads.
pub(crate) const SPORE_TAGS: &[&str] = &[
    TAG_SANDBOX,
    TAG_MAX_INSTANCES,
    TAG_SNAPSHOT,
    TAG_WARMUP_EVENT,
    TAG_AUTO_WARMUP,
    TAG_UNIT,
    TAG_ACCELERATOR,
    TAG_ARCH,
    TAG_NETWORK,
];

/// An API error in Lambda's shape: status, `x-amzn-ErrorType`, `{"Type", "message"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    /// An error of `kind` (Lambda's error type) with HTTP `status`.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "InvalidParameterValueException",
            message: message.into(),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        use ControlError as E;
        let (status, kind) = match &e {
            E::NotFound(_) => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            E::Conflict(_) | E::InUse(_) => (StatusCode::CONFLICT, "ResourceConflictException"),
            E::InvalidParameter(_) => (StatusCode::BAD_REQUEST, "InvalidParameterValueException"),
            E::InvalidRequestContent(_) => {
                (StatusCode::BAD_REQUEST, "InvalidRequestContentException")
            }
            E::RequestTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLargeException")
            }
            E::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException"),
            E::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceException"),
            E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "ServiceException"),
            E::ResourceConflict(_) => (StatusCode::CONFLICT, "ResourceConflictException"),
            E::PreconditionFailed(_) => (
                StatusCode::PRECONDITION_FAILED,
                "PreconditionFailedException",
            ),
        };
        ApiError {
            status,
            kind,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let who = if self.status.is_server_error() {
            "Service"
        } else {
            "User"
        };
        let body = serde_json::json!({ "Type": who, "message": self.message, "__type": self.kind });
        let mut resp = (self.status, axum::Json(body)).into_response();
        resp.headers_mut()
            .insert("x-amzn-ErrorType", HeaderValue::from_static(self.kind));
        resp
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CodeIn {
    zip_file: Option<String>,
    s3_bucket: Option<String>,
    image_uri: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
struct EnvironmentIo {
    #[serde(default)]
    variables: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateFunctionIn {
    function_name: String,
    runtime: Option<String>,
    handler: Option<String>,
    code: CodeIn,
    description: Option<String>,
    timeout: Option<i64>,
    memory_size: Option<i64>,
    environment: Option<EnvironmentIo>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    package_type: Option<String>,
    role: Option<String>,
    architectures: Option<Vec<String>>,
    ephemeral_storage: Option<EphemeralStorageIo>,
    #[serde(default)]
    publish: bool,
    layers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EphemeralStorageIo {
    size: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateConfigIn {
    runtime: Option<String>,
    handler: Option<String>,
    description: Option<String>,
    timeout: Option<i64>,
    memory_size: Option<i64>,
    environment: Option<EnvironmentIo>,
    role: Option<String>,
    ephemeral_storage: Option<EphemeralStorageIo>,
    revision_id: Option<String>,
    #[serde(default)]
    publish: bool,
    layers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateCodeIn {
    zip_file: Option<String>,
    #[serde(default)]
    publish: bool,
    #[serde(default)]
    dry_run: bool,
    revision_id: Option<String>,
    architectures: Option<Vec<String>>,
}

pub(crate) fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Malformed request body: {e}")))
}

/// Parameters a call may carry, with the values Spore can honour when they are not its own:
/// `None` accepts any value, `Some(check)` only values `check` accepts (a default, or what
/// the host can do). Anything else is refused by name, never dropped.
type Allowed = &'static [(&'static str, Option<fn(&serde_json::Value) -> bool>)];

fn is_empty_or_default(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.values().all(is_empty_or_default),
        serde_json::Value::Bool(b) => !b,
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Number(_) => false,
    }
}

/// The host's architecture as Lambda names it (`x86_64`, `arm64`).
fn host_arch() -> String {
    std::env::consts::ARCH.replace("aarch64", "arm64")
}

/// Checks `Architectures` (one of Lambda's two, that this unit or another one runs) and
/// returns the instruction set the function must then be placed on (None: the host's).
fn check_architectures(control: &Control, given: &[String]) -> ApiResult<Option<String>> {
    let [arch] = given else {
        return Err(ApiError::invalid(format!(
            "Architectures must name exactly one architecture, not {given:?}"
        )));
    };
    let isa = match arch.as_str() {
        "x86_64" => "x86_64",
        "arm64" => "aarch64",
        other => {
            return Err(ApiError::invalid(format!(
                "Architectures {other:?} must be x86_64 or arm64"
            )))
        }
    };
    if *arch == host_arch() {
        return Ok(None);
    }
    if control
        .unit_statuses()
        .iter()
        .any(|u| u.info.arch == isa && u.state == "up")
    {
        return Ok(Some(isa.to_owned()));
    }
    Err(ApiError::invalid(format!(
        "Architectures {arch} is not supported here: this host is {} and no processing unit of          that architecture is up",
        host_arch()
    )))
}

/// Checks `EphemeralStorage.Size` (Lambda's 512..=10240 MB): the size of the sandbox's `/tmp`.
fn check_ephemeral(e: &EphemeralStorageIo) -> ApiResult<u32> {
    range_i64("EphemeralStorage.Size", e.size, 512..=10240)
}

/// Parameters of create and update that Spore accepts only with their defaults (what deploy
/// tools send when nothing is set).
const DEFAULTS_ONLY: Allowed = &[
    (
        "TracingConfig",
        Some(|v| v["Mode"].as_str().is_none_or(|m| m == "PassThrough")),
    ),
    (
        "SnapStart",
        Some(|v| v["ApplyOn"].as_str().is_none_or(|m| m == "None")),
    ),
    ("VpcConfig", Some(is_empty_or_default)),
    ("DeadLetterConfig", Some(is_empty_or_default)),
    ("KMSKeyArn", Some(is_empty_or_default)),
    ("FileSystemConfigs", Some(is_empty_or_default)),
    ("ImageConfig", Some(is_empty_or_default)),
    (
        "LoggingConfig",
        Some(|v| v["LogFormat"].as_str().is_none_or(|f| f == "Text")),
    ),
];

/// The configuration both create and update take.
const CONFIG_KEYS: Allowed = &[
    ("Runtime", None),
    ("Handler", None),
    ("Description", None),
    ("Timeout", None),
    ("MemorySize", None),
    ("Environment", None),
    ("Layers", None),
    // Spore has no IAM: a role is stored and echoed, not used.
    ("Role", None),
    // The sandbox's /tmp size (checked against Lambda's range).
    ("EphemeralStorage", None),
    // Publishes a version after the change.
    ("Publish", None),
];

const CREATE_KEYS: &[Allowed] = &[
    CONFIG_KEYS,
    DEFAULTS_ONLY,
    &[
        ("FunctionName", None),
        ("Code", None),
        ("Tags", None),
        ("PackageType", None),
        ("Architectures", None),
        ("CodeSigningConfigArn", Some(is_empty_or_default)),
    ],
];

const UPDATE_CONFIG_KEYS: &[Allowed] = &[CONFIG_KEYS, DEFAULTS_ONLY, &[("RevisionId", None)]];

const UPDATE_CODE_KEYS: &[Allowed] = &[&[
    ("ZipFile", None),
    ("Publish", None),
    ("DryRun", None),
    ("Architectures", None),
    ("RevisionId", None),
]];

/// Refuses, by name, a parameter Spore does not know or cannot honour with the value given.
fn refuse_unsupported(body: &[u8], allowed: &[Allowed]) -> ApiResult<()> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return Ok(()); // the typed parse reports what is wrong
    };
    for (key, value) in &map {
        match allowed.iter().flat_map(|a| a.iter()).find(|(k, _)| k == key) {
            None => {
                return Err(ApiError::invalid(format!(
                    "{key} is not a parameter Spore knows for this operation; it was not applied"
                )))
            }
            Some((_, Some(ok))) if !ok(value) => {
                return Err(ApiError::invalid(format!(
                    "{key} = {value} is not supported by Spore (it would be ignored); leave it out or use its default"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn decode_zip(b64: Option<&str>) -> ApiResult<Vec<u8>> {
    let b64 = b64.ok_or_else(|| {
        ApiError::invalid("Code.ZipFile is required: Spore takes code as a base64 zip")
    })?;
    B64.decode(b64.trim())
        .map_err(|e| ApiError::invalid(format!("Code.ZipFile is not valid base64: {e}")))
}

fn range_i64(name: &str, v: i64, range: std::ops::RangeInclusive<u32>) -> ApiResult<u32> {
    u32::try_from(v)
        .ok()
        .filter(|x| range.contains(x))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "{name} {v} is out of range {}..={}",
                range.start(),
                range.end()
            ))
        })
}

pub(crate) fn configuration(control: &Control, rec: &FunctionRecord) -> serde_json::Value {
    let m = &rec.manifest;
    let version = rec.version.map(|v| v.to_string());
    let role = rec
        .lambda
        .role
        .clone()
        .unwrap_or_else(|| format!("arn:aws:iam::{}:role/spore", control.account_id()));
    let architectures = rec
        .lambda
        .architectures
        .clone()
        .unwrap_or_else(|| vec![host_arch()]);
    let mut c = serde_json::json!({
        "FunctionName": m.name,
        "FunctionArn": control.function_arn(&m.name, version.as_deref()),
        "Runtime": m.runtime_str(),
        "Role": role,
        "Handler": m.handler,
        "CodeSize": rec.code_size,
        "Description": rec.description,
        "Timeout": m.timeout_s,
        "MemorySize": m.memory_mb,
        "LastModified": spore_registry::store::lambda_timestamp(rec.last_modified_ms),
        "CodeSha256": rec.code_sha256,
        "Version": rec.version_name(),
        "Environment": { "Variables": m.environment },
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": architectures,
        "RevisionId": rec.revision_id(),
        // Not Lambda's: the SDKs ignore unknown keys; `spore ls` shows it.
        "SporeSandbox": m.sandbox.as_str(),
        "Layers": rec.layers.iter().map(|l| serde_json::json!({ "Arn": l.arn, "CodeSize": l.code_size })).collect::<Vec<_>>(),
    });
    if let Some(mb) = rec.lambda.ephemeral_mb {
        c["EphemeralStorage"] = serde_json::json!({ "Size": mb });
    }
    crate::deps::set_state(&mut c, rec);
    c
}

/// Spore's settings as tags, and the user's tags.
pub(crate) fn all_tags(rec: &FunctionRecord) -> BTreeMap<String, String> {
    let mut t = tags(rec);
    t.extend(rec.extras.tags.clone());
    t
}

fn tags(rec: &FunctionRecord) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    t.insert(
        TAG_SANDBOX.to_owned(),
        rec.manifest.sandbox.as_str().to_owned(),
    );
    if let Some(m) = rec.manifest.max_instances {
        t.insert(TAG_MAX_INSTANCES.to_owned(), m.to_string());
    }
    if rec.manifest.snapshot {
        t.insert(TAG_SNAPSHOT.to_owned(), "true".to_owned());
    }
    if let Some(u) = rec.manifest.unit {
        t.insert(TAG_UNIT.to_owned(), u.to_string());
    }
    if let Some(w) = &rec.manifest.warmup_event {
        t.insert(TAG_WARMUP_EVENT.to_owned(), w.clone());
    }
    if !rec.manifest.auto_warmup && rec.manifest.runtime == spore_core::Runtime::Python3 {
        t.insert(TAG_AUTO_WARMUP.to_owned(), "false".to_owned());
    }
    for (k, v) in [
        (TAG_ACCELERATOR, &rec.manifest.accelerator),
        (TAG_ARCH, &rec.manifest.arch),
    ] {
        if let Some(v) = v {
            t.insert(k.to_owned(), v.clone());
        }
    }
    if let Some(n) = rec.manifest.network {
        t.insert(TAG_NETWORK.to_owned(), n.as_str().to_owned());
    }
    t
}

/// The `spore:network` tag, if given: `egress` or `none`.
fn network_tag(
    tags: &BTreeMap<String, String>,
) -> Result<Option<spore_core::manifest::Network>, ApiError> {
    tags.get(TAG_NETWORK)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::invalid(format!(
                    "tag {TAG_NETWORK} must be \"egress\" or \"none\", not {v:?}"
                ))
            })
        })
        .transpose()
}

pub(crate) async fn create_function(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let deps = crate::deps::deps_mode(&headers)?;
    let req: CreateFunctionIn = parse_json(&body)?;
    refuse_unsupported(&body, CREATE_KEYS)?;
    crate::settings::check_tags(&req.tags, true)?;
    let user_tags = crate::settings::user_tags(&req.tags);
    crate::settings::check_tag_count(user_tags.len())?;
    let layers = req
        .layers
        .as_deref()
        .map(|l| st.control.resolve_layers(l))
        .transpose()?;
    if req.package_type.as_deref().is_some_and(|p| p != "Zip") || req.code.image_uri.is_some() {
        return Err(ApiError::invalid("Only PackageType Zip is supported"));
    }
    if req.code.s3_bucket.is_some() {
        return Err(ApiError::invalid(
            "Code.S3Bucket is not supported: send Code.ZipFile",
        ));
    }
    let zip = decode_zip(req.code.zip_file.as_deref())?;
    let arch = req
        .architectures
        .as_deref()
        .map(|a| check_architectures(&st.control, a))
        .transpose()?
        .flatten();
    let ephemeral_mb = req
        .ephemeral_storage
        .as_ref()
        .map(check_ephemeral)
        .transpose()?;
    let runtime = req
        .runtime
        .ok_or_else(|| ApiError::invalid("Runtime is required"))?;
    let handler = req
        .handler
        .ok_or_else(|| ApiError::invalid("Handler is required"))?;
    let sandbox = match req.tags.get(TAG_SANDBOX) {
        Some(s) => s
            .parse::<SandboxKind>()
            .map_err(|e| ApiError::invalid(e.to_string()))?,
        None => SandboxKind::Container,
    };
    let max_instances = req
        .tags
        .get(TAG_MAX_INSTANCES)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::invalid(format!("tag {TAG_MAX_INSTANCES} must be a number")))
                .and_then(|n| range_i64(TAG_MAX_INSTANCES, n, 1..=1024))
        })
        .transpose()?;
    let snapshot = match req.tags.get(TAG_SNAPSHOT).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "tag {TAG_SNAPSHOT} must be true or false, not {other:?}"
            )))
        }
    };
    let unit = req
        .tags
        .get(TAG_UNIT)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::invalid(format!("tag {TAG_UNIT} must be a number")))
                .and_then(|n| range_i64(TAG_UNIT, n, 0..=65535))
        })
        .transpose()?;
    let parsed_runtime: spore_core::Runtime = runtime
        .parse()
        .map_err(|e: spore_core::ManifestError| ApiError::invalid(e.to_string()))?;
    let auto_warmup = match req.tags.get(TAG_AUTO_WARMUP).map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "tag {TAG_AUTO_WARMUP} must be true or false, not {other:?}"
            )))
        }
    };
    let auto_warmup = spore_core::manifest::auto_warmup_for(parsed_runtime, auto_warmup).map_err(
        |e| match e {
            // The manifest's error names spore.toml; here the setting came as a tag.
            spore_core::ManifestError::Invalid { reason, .. } => {
                ApiError::invalid(format!("tag {TAG_AUTO_WARMUP}: {reason}"))
            }
            other => ApiError::invalid(format!("tag {TAG_AUTO_WARMUP}: {other}")),
        },
    )?;
    let manifest = FunctionManifest {
        name: req.function_name,
        runtime: parsed_runtime,
        auto_warmup,
        runtime_name: Some(runtime.clone()),
        handler,
        memory_mb: range_i64(
            "MemorySize",
            req.memory_size.unwrap_or(128),
            spore_core::manifest::MEMORY_MB_RANGE,
        )?,
        timeout_s: range_i64(
            "Timeout",
            req.timeout.unwrap_or(3),
            spore_core::manifest::TIMEOUT_S_RANGE,
        )?,
        sandbox,
        environment: req.environment.unwrap_or_default().variables,
        max_instances,
        snapshot,
        warmup_event: req.tags.get(TAG_WARMUP_EVENT).cloned(),
        unit,
        accelerator: req.tags.get(TAG_ACCELERATOR).cloned(),
        arch: arch.or_else(|| req.tags.get(TAG_ARCH).cloned()),
        network: network_tag(&req.tags)?,
    };
    let spec = FunctionSpec {
        manifest,
        description: req.description.unwrap_or_default(),
        lambda: LambdaSettings {
            role: req.role,
            architectures: req.architectures,
            ephemeral_mb,
        },
        layers,
    };
    let control = st.control.clone();
    let rec = tokio::task::spawn_blocking(move || control.create_function_with(spec, &zip, deps))
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??;
    let rec = if user_tags.is_empty() {
        rec
    } else {
        st.control.update_extras(&rec.manifest.name, |e| {
            e.tags = user_tags;
            Ok(())
        })?;
        st.control.get_function(&rec.manifest.name)?
    };
    st.control.prewarm(&rec.manifest.name);
    let rec = if req.publish {
        crate::versions::publish_after(&st, &rec.manifest.name.clone(), rec)?
    } else {
        rec
    };
    Ok((
        StatusCode::CREATED,
        axum::Json(configuration(&st.control, &rec)),
    )
        .into_response())
}

/// `ListFunctions`' query: `MaxItems`, `Marker`, `FunctionVersion=ALL`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListFunctionsQuery {
    #[serde(rename = "MaxItems")]
    max_items: Option<String>,
    #[serde(rename = "Marker")]
    marker: Option<String>,
    #[serde(rename = "FunctionVersion")]
    function_version: Option<String>,
    #[serde(rename = "MasterRegion")]
    master_region: Option<String>,
}

pub(crate) async fn list_functions(
    State(st): State<AppState>,
    Query(q): Query<ListFunctionsQuery>,
) -> ApiResult<Response> {
    if q.master_region.is_some() {
        return Err(ApiError::invalid(
            "MasterRegion is not supported: Spore has no Lambda@Edge replicas",
        ));
    }
    let all = match q.function_version.as_deref() {
        None => false,
        Some("ALL") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "FunctionVersion {other:?} must be ALL"
            )))
        }
    };
    let mut recs = Vec::new();
    for rec in st.control.list_functions() {
        let name = rec.manifest.name.clone();
        recs.push(rec);
        if all {
            // A function deleted meanwhile has no versions to list.
            recs.extend(
                st.control
                    .list_versions(&name)
                    .unwrap_or_default()
                    .into_iter()
                    .skip(1),
            );
        }
    }
    let (page, next) =
        crate::versions::paginate(recs, q.marker.as_deref(), q.max_items.as_deref(), |r| {
            r.key()
        })?;
    let functions: Vec<_> = page.iter().map(|r| configuration(&st.control, r)).collect();
    let mut out = serde_json::json!({ "Functions": functions });
    if let Some(m) = next {
        out["NextMarker"] = m.into();
    }
    Ok(axum::Json(out).into_response())
}

/// `?Qualifier=` of the calls that take one.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct QualifierQuery {
    #[serde(rename = "Qualifier")]
    pub(crate) qualifier: Option<String>,
}

/// The function and qualifier a reference names (a name, `name:qualifier`, a partial or a
/// full ARN, and a `Qualifier` parameter; the two qualifiers must agree).
pub(crate) fn split_ref(
    reference: &str,
    qualifier: Option<&str>,
) -> ApiResult<(String, Option<String>)> {
    let parts: Vec<&str> = reference.split(':').collect();
    let home = match parts.as_slice() {
        ["arn", _, _, region, account, "function", ..] => Some((*region, *account)),
        [account, "function", _, ..] if account.bytes().all(|b| b.is_ascii_digit()) => {
            Some((spore_registry::layers::region(), *account))
        }
        _ => None,
    };
    if let Some((region, account)) = home {
        spore_registry::layers::check_arn_home(reference, region, account)
            .map_err(ApiError::invalid)?;
    }
    let (name, in_ref) = match parts.iter().position(|p| *p == "function") {
        Some(i) if i + 1 < parts.len() => (parts[i + 1], parts.get(i + 2).copied()),
        _ => match parts.as_slice() {
            [name, q] => (*name, Some(*q)),
            _ => (reference, None),
        },
    };
    let wanted = match (in_ref, qualifier) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(format!(
                "The derived qualifier from the function name {a:?} does not match the specified qualifier {b:?}"
            )))
        }
        (a, b) => a.or(b),
    };
    Ok((name.to_owned(), wanted.map(str::to_owned)))
}

/// The record a reference names: `$LATEST`, a published version, or an alias's version
/// (`pick`: chosen by the alias's routing weights, for an invocation). A version or alias
/// that does not exist is not found, never served by `$LATEST`.
pub(crate) fn resolve(
    control: &Control,
    reference: &str,
    qualifier: Option<&str>,
    pick: bool,
) -> ApiResult<FunctionRecord> {
    let (name, q) = split_ref(reference, qualifier)?;
    Ok(control.resolve_qualifier(&name, q.as_deref(), pick)?)
}

pub(crate) async fn get_function(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> ApiResult<Response> {
    let rec = resolve(&st.control, &name, q.qualifier.as_deref(), false)?;
    let key = rec.key();
    let (idle, total) = st.control.instance_counts(&key);
    let mut out = serde_json::json!({
        "Configuration": configuration(&st.control, &rec),
        "Code": { "RepositoryType": "Spore", "Location": "" },
        "Tags": all_tags(&rec),
        "Spore": {
            "Instances": { "Idle": idle, "Total": total, "IdlePids": st.control.instance_pids(&key) },
            "Template": st.control.template_pids(&key).map(|pids| serde_json::json!({ "Pids": pids })),
            "Spare": st.control.spare(&key).map(|(pids, mode)| {
                serde_json::json!({ "Pids": pids, "MemoryMode": mode.as_str() })
            }),
        },
    });
    // Lambda shows `Concurrency` only for a function with reserved concurrency.
    if spore_control::extras::reserved_concurrency(&rec).is_some() {
        out["Concurrency"] = crate::settings::concurrency_json(&rec);
    }
    Ok(axum::Json(out).into_response())
}

pub(crate) async fn get_configuration(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> ApiResult<Response> {
    let rec = resolve(&st.control, &name, q.qualifier.as_deref(), false)?;
    Ok(axum::Json(configuration(&st.control, &rec)).into_response())
}

pub(crate) async fn delete_function(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (name, qualifier) = split_ref(&name, q.qualifier.as_deref())?;
    let control = st.control.clone();
    match qualifier.as_deref() {
        None => {
            let force = crate::deps::force(&headers)?;
            let (_, broken) =
                tokio::task::spawn_blocking(move || control.delete_function_with(&name, force))
                    .await
                    .map_err(|e| ControlError::Internal(e.to_string()))??;
            return Ok(crate::deps::deleted(&broken));
        }
        Some("$LATEST") => {
            return Err(ApiError::invalid(
                "$LATEST cannot be deleted by qualifier: delete the function without one",
            ))
        }
        Some(v) if v.parse::<u64>().is_ok() => {
            let v = v.to_owned();
            tokio::task::spawn_blocking(move || control.delete_version(&name, &v))
                .await
                .map_err(|e| ControlError::Internal(e.to_string()))??;
        }
        Some(alias) => {
            // An alias is deleted with DeleteAlias; the function must exist to say so.
            st.control.get_alias(&name, alias)?;
            return Err(ApiError::invalid(format!(
                "{alias} is an alias: delete it with DeleteAlias, or delete a version by its number"
            )));
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn update_code(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let deps = crate::deps::deps_mode(&headers)?;
    let req: UpdateCodeIn = parse_json(&body)?;
    refuse_unsupported(&body, UPDATE_CODE_KEYS)?;
    let name = unqualified(&name)?;
    let current = st.control.get_function(&name)?;
    if let Some(a) = &req.architectures {
        let isa = check_architectures(&st.control, a)?;
        let now = current
            .lambda
            .architectures
            .clone()
            .unwrap_or_else(|| vec![host_arch()]);
        if *a != now || isa.is_some() && isa != current.manifest.arch {
            return Err(ApiError::invalid(format!(
                "Architectures {a:?} differs from the function's {now:?}: Spore changes a \
                 function's architecture with UpdateFunctionConfiguration's placement tags, not \
                 with its code"
            )));
        }
    }
    st.control
        .check_revision(&name, req.revision_id.as_deref())?;
    let zip = decode_zip(req.zip_file.as_deref())?;
    if req.dry_run {
        if req.publish {
            return Err(ApiError::invalid(
                "DryRun and Publish cannot both be true: a dry run changes nothing",
            ));
        }
        // Checked as a deploy would check it; nothing is stored.
        spore_registry::code::check(&zip).map_err(|e| ApiError::invalid(e.to_string()))?;
        let (sha, _) = spore_registry::code::digest(&zip);
        let mut c = configuration(&st.control, &current);
        c["CodeSha256"] = sha.into();
        c["CodeSize"] = zip.len().into();
        return Ok(axum::Json(c).into_response());
    }
    let control = st.control.clone();
    let rid = req.revision_id.clone();
    let rec = tokio::task::spawn_blocking(move || {
        control.update_code_with(&name, &zip, deps, rid.as_deref())
    })
    .await
    .map_err(|e| ControlError::Internal(e.to_string()))??;
    st.control.prewarm(&rec.manifest.name);
    let rec = if req.publish {
        crate::versions::publish_after(&st, &rec.manifest.name.clone(), rec)?
    } else {
        rec
    };
    Ok(axum::Json(configuration(&st.control, &rec)).into_response())
}

pub(crate) async fn update_configuration(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: UpdateConfigIn = parse_json(&body)?;
    refuse_unsupported(&body, UPDATE_CONFIG_KEYS)?;
    let name = unqualified(&name)?;
    let rec = st.control.get_function(&name)?;
    st.control
        .check_revision(&name, req.revision_id.as_deref())?;
    if req.publish
        && rec
            .build
            .as_ref()
            .is_some_and(|b| !b.done && b.failed.is_none())
    {
        return Err(ControlError::ResourceConflict(format!(
            "The operation cannot be performed at this time. An update is in progress for resource: {} (Publish: call PublishVersion once LastUpdateStatus is Successful)",
            st.control.function_arn(&name, None)
        ))
        .into());
    }
    let mut lambda = rec.lambda.clone();
    if let Some(e) = &req.ephemeral_storage {
        lambda.ephemeral_mb = Some(check_ephemeral(e)?);
    }
    if let Some(r) = req.role {
        lambda.role = Some(r);
    }
    let mut m = rec.manifest.clone();
    if let Some(r) = req.runtime {
        m.runtime = r
            .parse()
            .map_err(|e: spore_core::ManifestError| ApiError::invalid(e.to_string()))?;
        m.runtime_name = Some(r);
    }
    if let Some(h) = req.handler {
        m.handler = h;
    }
    if let Some(t) = req.timeout {
        m.timeout_s = range_i64("Timeout", t, spore_core::manifest::TIMEOUT_S_RANGE)?;
    }
    if let Some(mem) = req.memory_size {
        m.memory_mb = range_i64("MemorySize", mem, spore_core::manifest::MEMORY_MB_RANGE)?;
    }
    if let Some(env) = req.environment {
        m.environment = env.variables;
    }
    let spec = FunctionSpec {
        manifest: m,
        description: req.description.unwrap_or(rec.description),
        lambda,
        layers: req
            .layers
            .as_deref()
            .map(|l| st.control.resolve_layers(l))
            .transpose()?,
    };
    let control = st.control.clone();
    let rid = req.revision_id.clone();
    let rec = tokio::task::spawn_blocking(move || control.update_config_if(spec, rid.as_deref()))
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??;
    st.control.prewarm(&rec.manifest.name);
    let rec = if req.publish {
        crate::versions::publish_now(&st, &rec.manifest.name)?
    } else {
        rec
    };
    Ok(axum::Json(configuration(&st.control, &rec)).into_response())
}

/// The function an update names: its name or ARN, without a qualifier (an update always
/// changes `$LATEST`; a published version never changes).
fn unqualified(reference: &str) -> ApiResult<String> {
    match split_ref(reference, None)? {
        (name, None) => Ok(name),
        (name, Some(q)) => Err(ApiError::invalid(format!(
            "{name}:{q}: only $LATEST can be changed, and it is named without a qualifier \
             (published versions never change)"
        ))),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Decodes `X-Amz-Client-Context` (base64 of a JSON object with `client`, `custom`, `env`),
/// refusing what Lambda refuses with `InvalidRequestContentException`.
fn client_context(b64: &str) -> Result<serde_json::Value, ControlError> {
    let bad = |why: &str| {
        ControlError::InvalidRequestContent(format!(
            "Client context must be base64-encoded JSON: {why}"
        ))
    };
    if b64.len() > 3583 {
        // Lambda's limit.
        return Err(bad("larger than 3583 bytes"));
    }
    let raw = B64.decode(b64.trim()).map_err(|_| bad("not base64"))?;
    let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| bad("not JSON"))?;
    if !v.is_object() {
        return Err(bad("not a JSON object"));
    }
    Ok(v)
}

pub(crate) async fn invoke(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let rec = resolve(&st.control, &name, q.qualifier.as_deref(), true)?;
    let (name, version) = (rec.key(), rec.version_name());
    let kind = header(&headers, "x-amz-invocation-type").unwrap_or("RequestResponse");
    let tail = match header(&headers, "x-amz-log-type").unwrap_or("None") {
        "Tail" => true,
        "None" => false,
        other => {
            return Err(ApiError::invalid(format!(
                "X-Amz-Log-Type {other:?} must be None or Tail"
            )))
        }
    };
    let (force_cold, cold_path) = match header(&headers, "x-spore-cold") {
        None | Some("0" | "false" | "") => (false, None),
        Some("1" | "true") => (true, None),
        Some("init") => (true, Some(StartKind::Cold)),
        Some("fork") => (true, Some(StartKind::Fork)),
        Some("restore") => (true, Some(StartKind::Restore)),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "X-Spore-Cold {other:?} must be 0, 1 (the function's default start), init, fork \
                 or restore"
            )))
        }
    };
    let restore_mode = header(&headers, "x-spore-restore-mode")
        .map(|m| {
            m.parse::<spore_snapshot::restore::MemoryMode>()
                .map_err(|e| ApiError::invalid(format!("X-Spore-Restore-Mode: {e}")))
        })
        .transpose()?;
    st.control.check_active(&name)?;
    let client_context = header(&headers, "x-amz-client-context")
        .map(client_context)
        .transpose()?;
    match kind {
        "DryRun" => {
            Control::check_payload(&body, false)?;
            let mut resp = StatusCode::NO_CONTENT.into_response();
            if let Ok(v) = HeaderValue::from_str(&version) {
                resp.headers_mut().insert("x-amz-executed-version", v);
            }
            Ok(resp)
        }
        "Event" => {
            let id = st.control.invoke_async(&name, body.to_vec())?;
            let mut resp = StatusCode::ACCEPTED.into_response();
            for (k, v) in [
                ("x-amzn-RequestId", &id),
                ("x-amz-executed-version", &version),
            ] {
                if let Ok(v) = HeaderValue::from_str(v) {
                    resp.headers_mut().insert(k, v);
                }
            }
            Ok(resp)
        }
        "RequestResponse" => {
            if st.control.is_throttled(&name) {
                return Err(crate::settings::throttled());
            }
            let inv = st
                .control
                .invoke(
                    &name,
                    body,
                    InvokeOptions {
                        force_cold,
                        cold_path,
                        restore_mode,
                        unit: None,
                        client_context,
                    },
                )
                .await?;
            let (body, failed) = match inv.outcome {
                Ok(bytes) => (bytes, false),
                Err(e) => (serde_json::to_vec(&e).expect("errors serialize"), true),
            };
            let mut resp = (StatusCode::OK, body).into_response();
            let h = resp.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            if let Ok(v) = HeaderValue::from_str(&version) {
                h.insert("x-amz-executed-version", v);
            }
            if failed {
                h.insert(
                    "x-amz-function-error",
                    HeaderValue::from_static("Unhandled"),
                );
            }
            if tail {
                // The last 4 KB, from a character's start: clients decode it as UTF-8.
                let log = inv.log.as_str();
                let mut from = log.len().saturating_sub(4096);
                while !log.is_char_boundary(from) {
                    from += 1;
                }
                if let Ok(v) = HeaderValue::from_str(&B64.encode(&log[from..])) {
                    h.insert("x-amz-log-result", v);
                }
            }
            h.insert(
                "x-spore-start",
                HeaderValue::from_static(inv.start.as_str()),
            );
            if let Some(ms) = inv.to_handler_ms {
                if let Ok(v) = HeaderValue::from_str(&format!("{ms:.3}")) {
                    h.insert("x-spore-to-handler-ms", v);
                }
            }
            if !inv.breakdown.is_empty() {
                let text: Vec<String> = inv
                    .breakdown
                    .iter()
                    .map(|(step, ms)| format!("{step}={ms:.3}"))
                    .collect();
                if let Ok(v) = HeaderValue::from_str(&text.join(",")) {
                    h.insert("x-spore-breakdown", v);
                }
            }
            if inv.handler_ns.0 > 0 {
                for (k, ns) in [
                    ("x-spore-handler-start-ns", inv.handler_ns.0),
                    ("x-spore-handler-end-ns", inv.handler_ns.1),
                ] {
                    h.insert(k, HeaderValue::from(ns));
                }
            }
            for (k, v) in [
                ("x-spore-unit", inv.unit.to_string()),
                ("x-spore-init-ms", format!("{:.3}", inv.init_ms)),
                ("x-spore-duration-ms", format!("{:.3}", inv.total_ms)),
                ("x-amzn-requestid", inv.request_id),
            ] {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(k, v);
                }
            }
            Ok(resp)
        }
        other => Err(ApiError::invalid(format!(
            "X-Amz-Invocation-Type {other:?} must be RequestResponse, Event or DryRun"
        ))),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct LogsQuery {
    lines: Option<usize>,
    /// Only lines logged at or after this time, ms since the epoch.
    since_ms: Option<u64>,
    /// Only lines of this invocation.
    request_id: Option<String>,
}

fn log_event(l: &spore_pool::logs::LogLine) -> serde_json::Value {
    serde_json::json!({
        "timestamp": l.timestamp_ms,
        "requestId": l.request_id,
        "message": l.message,
    })
}

/// `GET /spore/v1/functions/{name}/logs?lines=N&since_ms=T&request_id=R`: the last lines
/// (`lines`, their text; `events`, with time and request id).
pub(crate) async fn logs(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    let query = spore_pool::logs::LogQuery {
        lines: q.lines.unwrap_or(100).min(spore_pool::logs::LOG_LINES),
        since_ms: q.since_ms,
        request_id: q.request_id,
    };
    let events = st
        .control
        .log_lines(function_name_from_ref(&name), &query)?;
    let lines: Vec<&str> = events.iter().map(|l| l.message.as_str()).collect();
    let events: Vec<serde_json::Value> = events.iter().map(log_event).collect();
    Ok(axum::Json(serde_json::json!({ "lines": lines, "events": events })).into_response())
}

/// `GET /spore/v1/functions/{name}/logs/stream`: new log lines as server-sent events (one
/// JSON event a line, as in `logs`), until the client goes away.
pub(crate) async fn follow_logs(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let rx = st.control.follow_logs(function_name_from_ref(&name))?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = match rx.recv().await {
            Ok(l) => Event::default().data(log_event(&l).to_string()),
            // A follower too slow for the function's output misses lines: say so.
            Err(RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(format!("{n} lines were skipped")),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(ev), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

pub(crate) async fn list_units(State(st): State<AppState>) -> Response {
    axum::Json(serde_json::json!({ "Units": st.control.unit_statuses() })).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct EchoQuery {
    bytes: usize,
    n: usize,
}

/// `POST /spore/v1/units/{id}/echo?bytes=N&n=K`: K echo calls of N bytes over the unit's link,
/// timed by the control plane.
pub(crate) async fn echo_unit(
    State(st): State<AppState>,
    Path(id): Path<u32>,
    Query(q): Query<EchoQuery>,
) -> ApiResult<Response> {
    let us = st.control.echo_unit(id, q.bytes, q.n).await?;
    Ok(
        axum::Json(serde_json::json!({ "Unit": id, "Bytes": q.bytes, "RoundTripsUs": us }))
            .into_response(),
    )
}

pub(crate) async fn list_snapshots(State(st): State<AppState>) -> Response {
    axum::Json(serde_json::json!({ "Snapshots": st.control.list_snapshots() })).into_response()
}

pub(crate) async fn delete_snapshots(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    st.control.remove_snapshots(function_name_from_ref(&name))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn evict(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let evicted = st.control.evict(function_name_from_ref(&name)).await?;
    Ok(axum::Json(evicted).into_response())
}

pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    match &st.metrics {
        Some(h) => {
            st.control.record_gauges();
            ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response(),
    }
}

pub(crate) async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "UnknownOperationException",
        message: "Unknown operation: see the Spore README for the supported API".into(),
    }
}
