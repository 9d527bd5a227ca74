//! The Lambda operations around a function that are not its code and configuration: tags,
//! resource policies, reserved concurrency, event-invoke configurations, account settings,
//! the empty answers for features a function has none of, and operations Spore refuses by
//! name.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use spore_control::ControlError;
use spore_registry::extras::{EventInvokeConfig, FunctionExtras};
use spore_registry::layers::arn_prefix;
use spore_registry::FunctionRecord;

use crate::lambda::{parse_json, split_ref, ApiError, ApiResult, QualifierQuery};
use crate::AppState;

/// Most bytes of a function's resource policy document (Lambda's 20 KB).
pub const MAX_POLICY_BYTES: usize = 20 * 1024;

/// Most tags of one function (Lambda's limit).
pub const MAX_TAGS: usize = 50;

pub(crate) fn function_arn(name: &str) -> String {
    format!("{}:function:{name}", arn_prefix())
}

/// The function a reference names, for settings Spore keeps per function (tags, policy,
/// concurrency, event-invoke configuration): a qualifier other than `$LATEST` is refused
/// by name rather than applied to the whole function.
pub(crate) fn unqualified(reference: &str, qualifier: Option<&str>) -> ApiResult<String> {
    match split_ref(reference, qualifier)? {
        (name, None) => Ok(name),
        (name, Some(q)) if q == "$LATEST" => Ok(name),
        (name, Some(q)) => Err(ApiError::invalid(format!(
            "Spore keeps this setting per function, not per version or alias: use {name} without the qualifier {q:?}"
        ))),
    }
}

/// The function a tag-operation ARN names (a function ARN; `$LATEST` or unqualified).
fn function_of_arn(arn: &str) -> ApiResult<String> {
    if !arn.starts_with("arn:") || !arn.contains(":function:") {
        return Err(ApiError::invalid(format!(
            "{arn} is not a function ARN: Spore tags functions only"
        )));
    }
    unqualified(arn, None)
}

/// Checks user tags as Lambda does. Spore's own settings (`spore:` tags) are set at create
/// only: changing them would change the function's configuration.
pub(crate) fn check_tags(tags: &BTreeMap<String, String>, spore_allowed: bool) -> ApiResult<()> {
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 {
            return Err(ApiError::invalid(format!(
                "Tag key {k:?} must be 1 to 128 characters"
            )));
        }
        if v.chars().count() > 256 {
            return Err(ApiError::invalid(format!(
                "Tag value of {k:?} is longer than 256 characters"
            )));
        }
        if k.to_ascii_lowercase().starts_with("aws:") {
            return Err(ApiError::invalid(format!(
                "Tag key {k:?}: the aws: prefix is reserved for AWS use"
            )));
        }
        if k.starts_with("spore:") {
            if !spore_allowed {
                return Err(ApiError::invalid(format!(
                    "Tag key {k:?}: spore: tags are Spore settings, given at CreateFunction only"
                )));
            }
            if !crate::lambda::SPORE_TAGS.contains(&k.as_str()) {
                return Err(ApiError::invalid(format!(
                    "Tag key {k:?} is not a Spore setting (known: {})",
                    crate::lambda::SPORE_TAGS.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// User tags (without `spore:` ones), checked against the limit.
pub(crate) fn user_tags(tags: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    tags.iter()
        .filter(|(k, _)| !k.starts_with("spore:"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub(crate) fn check_tag_count(n: usize) -> ApiResult<()> {
    if n > MAX_TAGS {
        return Err(ApiError::invalid(format!(
            "A function may have at most {MAX_TAGS} tags ({n} requested)"
        )));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct TagsIn {
    tags: BTreeMap<String, String>,
}

/// `POST /2017-03-31/tags/{ARN}`.
pub(crate) async fn tag_resource(
    State(st): State<AppState>,
    Path(arn): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let name = function_of_arn(&arn)?;
    let req: TagsIn = parse_json(&body)?;
    check_tags(&req.tags, false)?;
    st.control.update_extras(&name, |e| {
        let mut tags = e.tags.clone();
        tags.extend(req.tags);
        if tags.len() > MAX_TAGS {
            return Err(ControlError::InvalidParameter(format!(
                "A function may have at most {MAX_TAGS} tags ({} requested)",
                tags.len()
            )));
        }
        e.tags = tags;
        Ok(())
    })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /2017-03-31/tags/{ARN}?tagKeys=k1&tagKeys=k2`.
pub(crate) async fn untag_resource(
    State(st): State<AppState>,
    Path(arn): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult<Response> {
    let name = function_of_arn(&arn)?;
    let mut keys = Vec::new();
    for (k, v) in q {
        if k != "tagKeys" {
            return Err(ApiError::invalid(format!(
                "{k} is not a parameter of UntagResource"
            )));
        }
        keys.push(v);
    }
    if keys.is_empty() {
        return Err(ApiError::invalid("TagKeys is required"));
    }
    if let Some(k) = keys.iter().find(|k| k.starts_with("spore:")) {
        return Err(ApiError::invalid(format!(
            "Tag key {k:?}: spore: tags are Spore settings, given at CreateFunction only"
        )));
    }
    st.control.update_extras(&name, |e| {
        for k in &keys {
            e.tags.remove(k);
        }
        Ok(())
    })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /2017-03-31/tags/{ARN}`.
pub(crate) async fn list_tags(
    State(st): State<AppState>,
    Path(arn): Path<String>,
) -> ApiResult<Response> {
    let rec = st.control.get_function(&function_of_arn(&arn)?)?;
    Ok(axum::Json(serde_json::json!({ "Tags": crate::lambda::all_tags(&rec) })).into_response())
}

/// Checks that a `Qualifier` names `$LATEST`, a published version or an alias of `name`:
/// Spore keeps the resource policy and the event-invoke configuration per function, and
/// applies what is set through any of its qualifiers to the whole function.
fn check_qualifier(st: &AppState, name: &str, qualifier: Option<&str>) -> ApiResult<()> {
    st.control.resolve_qualifier(name, qualifier, false)?;
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct AddPermissionIn {
    statement_id: String,
    action: String,
    principal: String,
    source_arn: Option<String>,
    source_account: Option<String>,
    event_source_token: Option<String>,
    #[serde(rename = "PrincipalOrgID")]
    principal_org_id: Option<String>,
    revision_id: Option<String>,
    function_url_auth_type: Option<String>,
}

fn policy_revision(rec: &FunctionRecord) -> String {
    format!("policy-{}", rec.extras.policy_revision)
}

fn statement(name: &str, req: &AddPermissionIn) -> ApiResult<serde_json::Value> {
    let sid_ok = !req.statement_id.is_empty()
        && req.statement_id.len() <= 100
        && req
            .statement_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !sid_ok {
        return Err(ApiError::invalid(format!(
            "StatementId {:?} must be 1 to 100 letters, digits, '-', '_' or '.'",
            req.statement_id
        )));
    }
    let action_ok = req.action == "*"
        || req.action.strip_prefix("lambda:").is_some_and(|a| {
            a == "*" || (!a.is_empty() && a.bytes().all(|b| b.is_ascii_alphabetic()))
        });
    if !action_ok {
        return Err(ApiError::invalid(format!(
            "Action {:?} must be lambda:<Operation>, lambda:* or *",
            req.action
        )));
    }
    if req.function_url_auth_type.is_some() {
        return Err(ApiError::invalid(
            "FunctionUrlAuthType is not supported by Spore: it has no function URLs",
        ));
    }
    let p = &req.principal;
    let principal = if p == "*" {
        serde_json::json!("*")
    } else if p.ends_with(".amazonaws.com") {
        serde_json::json!({ "Service": p })
    } else if p.len() == 12 && p.bytes().all(|b| b.is_ascii_digit()) {
        serde_json::json!({ "AWS": format!("arn:aws:iam::{p}:root") })
    } else if p.starts_with("arn:") {
        serde_json::json!({ "AWS": p })
    } else {
        return Err(ApiError::invalid(format!(
            "Principal {p:?} must be *, a service (…​.amazonaws.com), an account id or an ARN"
        )));
    };
    let mut conditions = serde_json::Map::new();
    let mut equals = serde_json::Map::new();
    if let Some(a) = &req.source_account {
        equals.insert("AWS:SourceAccount".into(), a.clone().into());
    }
    if let Some(o) = &req.principal_org_id {
        equals.insert("aws:PrincipalOrgID".into(), o.clone().into());
    }
    if let Some(t) = &req.event_source_token {
        equals.insert("lambda:EventSourceToken".into(), t.clone().into());
    }
    if !equals.is_empty() {
        conditions.insert("StringEquals".into(), equals.into());
    }
    if let Some(a) = &req.source_arn {
        conditions.insert("ArnLike".into(), serde_json::json!({ "AWS:SourceArn": a }));
    }
    let mut s = serde_json::json!({
        "Sid": req.statement_id,
        "Effect": "Allow",
        "Principal": principal,
        "Action": req.action,
        "Resource": function_arn(name),
    });
    if !conditions.is_empty() {
        s["Condition"] = conditions.into();
    }
    Ok(s)
}

fn check_revision(given: Option<&str>, rec: &FunctionRecord) -> Result<(), ControlError> {
    match given {
        Some(r) if r != policy_revision(rec) => Err(ControlError::Conflict(format!(
            "RevisionId {r} does not match the policy's current revision {}",
            policy_revision(rec)
        ))),
        _ => Ok(()),
    }
}

/// `POST /2015-03-31/functions/{name}/policy` (`AddPermission`).
pub(crate) async fn add_permission(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    check_qualifier(&st, &name, q.qualifier.as_deref())?;
    let req: AddPermissionIn = parse_json(&body)?;
    let stmt = statement(&name, &req)?;
    let rec = st.control.get_function(&name)?;
    check_revision(req.revision_id.as_deref(), &rec).map_err(precondition)?;
    let sid = req.statement_id.clone();
    let added = stmt.clone();
    st.control
        .update_extras(&name, |e| {
            if e.policy.iter().any(|s| s["Sid"] == sid.as_str()) {
                return Err(ControlError::Conflict(format!(
                    "The statement id ({sid}) provided already exists. Please provide a new statement id, or remove the existing statement."
                )));
            }
            e.policy.push(added);
            let doc = serde_json::json!({
                "Version": "2012-10-17",
                "Id": "default",
                "Statement": e.policy,
            });
            let size = doc.to_string().len();
            if size > MAX_POLICY_BYTES {
                return Err(ControlError::InvalidParameter(format!(
                    "The final policy size ({size} bytes) is bigger than the limit ({MAX_POLICY_BYTES}): statement {sid} is not added"
                )));
            }
            e.policy_revision += 1;
            Ok(())
        })
        .map_err(conflict_as_is)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "Statement": stmt.to_string() })),
    )
        .into_response())
}

/// A `RevisionId` that does not match: Lambda's 412.
fn precondition(e: ControlError) -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        "PreconditionFailedException",
        e.to_string(),
    )
}

/// A conflict whose message is already Lambda's (not "Function already exist").
fn conflict_as_is(e: ControlError) -> ApiError {
    match e {
        ControlError::Conflict(m) => {
            ApiError::new(StatusCode::CONFLICT, "ResourceConflictException", m)
        }
        other => other.into(),
    }
}

/// `GET /2015-03-31/functions/{name}/policy`.
pub(crate) async fn get_policy(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    check_qualifier(&st, &name, q.qualifier.as_deref())?;
    let rec = st.control.get_function(&name)?;
    if rec.extras.policy.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "The resource you requested does not exist.",
        ));
    }
    let doc = serde_json::json!({
        "Version": "2012-10-17",
        "Id": "default",
        "Statement": rec.extras.policy,
    });
    Ok(axum::Json(serde_json::json!({
        "Policy": doc.to_string(),
        "RevisionId": policy_revision(&rec),
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct RemovePermissionQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
    #[serde(rename = "RevisionId")]
    revision_id: Option<String>,
}

/// `DELETE /2015-03-31/functions/{name}/policy/{StatementId}`.
pub(crate) async fn remove_permission(
    State(st): State<AppState>,
    Path((name, sid)): Path<(String, String)>,
    Query(q): Query<RemovePermissionQuery>,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    check_qualifier(&st, &name, q.qualifier.as_deref())?;
    let rec = st.control.get_function(&name)?;
    check_revision(q.revision_id.as_deref(), &rec).map_err(precondition)?;
    let removed = st.control.update_extras(&name, |e| {
        let before = e.policy.len();
        e.policy.retain(|s| s["Sid"] != sid.as_str());
        let removed = e.policy.len() < before;
        if removed {
            e.policy_revision += 1;
        }
        Ok(removed)
    })?;
    if !removed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!(
                "No policy is associated with the given resource: statement {sid} does not exist"
            ),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ConcurrencyIn {
    reserved_concurrent_executions: i64,
}

/// `PUT /2017-10-31/functions/{name}/concurrency`.
pub(crate) async fn put_concurrency(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    let req: ConcurrencyIn = parse_json(&body)?;
    let n = u32::try_from(req.reserved_concurrent_executions).map_err(|_| {
        ApiError::invalid(format!(
            "ReservedConcurrentExecutions {} must be 0 or more",
            req.reserved_concurrent_executions
        ))
    })?;
    let control = st.control.clone();
    tokio::task::spawn_blocking(move || control.set_reserved_concurrency(&name, Some(n)))
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??;
    Ok(axum::Json(serde_json::json!({ "ReservedConcurrentExecutions": n })).into_response())
}

/// `GET /2019-09-30/functions/{name}/concurrency`.
pub(crate) async fn get_concurrency(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let rec = st.control.get_function(&unqualified(&name, None)?)?;
    Ok(axum::Json(concurrency_json(&rec)).into_response())
}

/// `{"ReservedConcurrentExecutions": n}`, or `{}` without reserved concurrency.
pub(crate) fn concurrency_json(rec: &FunctionRecord) -> serde_json::Value {
    match spore_control::extras::reserved_concurrency(rec) {
        Some(n) => serde_json::json!({ "ReservedConcurrentExecutions": n }),
        None => serde_json::json!({}),
    }
}

/// `DELETE /2017-10-31/functions/{name}/concurrency`.
pub(crate) async fn delete_concurrency(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    let control = st.control.clone();
    tokio::task::spawn_blocking(move || control.set_reserved_concurrency(&name, None))
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Lambda's answer to an invocation of a function with reserved concurrency 0.
pub(crate) fn throttled() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequestsException",
        "Rate Exceeded. (ReservedFunctionConcurrentInvocationLimitExceeded: the function's reserved concurrency is 0)",
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct DestinationIn {
    destination: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct DestinationConfigIn {
    on_success: Option<DestinationIn>,
    on_failure: Option<DestinationIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct EventInvokeIn {
    maximum_retry_attempts: Option<i64>,
    maximum_event_age_in_seconds: Option<i64>,
    destination_config: Option<DestinationConfigIn>,
}

fn event_config_json(name: &str, c: &EventInvokeConfig) -> serde_json::Value {
    let mut dest = serde_json::Map::new();
    for (k, v) in [("OnSuccess", &c.on_success), ("OnFailure", &c.on_failure)] {
        dest.insert(
            k.into(),
            match v {
                Some(arn) => serde_json::json!({ "Destination": arn }),
                None => serde_json::json!({}),
            },
        );
    }
    serde_json::json!({
        "LastModified": c.last_modified_ms as f64 / 1000.0,
        "FunctionArn": format!("{}:$LATEST", function_arn(name)),
        "MaximumRetryAttempts": c.retries(),
        "MaximumEventAgeInSeconds": c.max_age_s(),
        "DestinationConfig": dest,
    })
}

/// Applies `req` over `base` (a put starts from the defaults, an update from what is set).
fn apply_event_config(
    mut base: EventInvokeConfig,
    req: EventInvokeIn,
) -> ApiResult<EventInvokeConfig> {
    if let Some(n) = req.maximum_retry_attempts {
        base.maximum_retry_attempts =
            Some(u32::try_from(n).ok().filter(|n| *n <= 2).ok_or_else(|| {
                ApiError::invalid(format!("MaximumRetryAttempts {n} is out of range 0..=2"))
            })?);
    }
    if let Some(n) = req.maximum_event_age_in_seconds {
        base.maximum_event_age_s = Some(
            u32::try_from(n)
                .ok()
                .filter(|n| (60..=21_600).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "MaximumEventAgeInSeconds {n} is out of range 60..=21600"
                    ))
                })?,
        );
    }
    if let Some(d) = req.destination_config {
        if let Some(s) = d.on_success {
            base.on_success = s.destination.filter(|a| !a.is_empty());
        }
        if let Some(f) = d.on_failure {
            base.on_failure = f.destination.filter(|a| !a.is_empty());
        }
    }
    base.last_modified_ms = spore_registry::store::now_unix_ms();
    Ok(base)
}

async fn put_or_update_event_config(
    st: AppState,
    name: String,
    q: QualifierQuery,
    body: Bytes,
    update: bool,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    check_qualifier(&st, &name, q.qualifier.as_deref())?;
    let req: EventInvokeIn = parse_json(&body)?;
    let rec = st.control.get_function(&name)?;
    let base = match (update, rec.extras.event_invoke) {
        (false, _) => EventInvokeConfig::default(),
        (true, Some(c)) => c,
        (true, None) => return Err(no_event_config(&name)),
    };
    let cfg = apply_event_config(base, req)?;
    st.control.check_destinations(&name, &cfg)?;
    let stored = cfg.clone();
    st.control.update_extras(&name, |e: &mut FunctionExtras| {
        e.event_invoke = Some(stored);
        Ok(())
    })?;
    Ok(axum::Json(event_config_json(&name, &cfg)).into_response())
}

fn no_event_config(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        format!(
            "The function {} doesn't have an EventInvokeConfig",
            function_arn(name)
        ),
    )
}

/// `PUT /2019-09-25/functions/{name}/event-invoke-config`.
pub(crate) async fn put_event_config(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    put_or_update_event_config(st, name, q, body, false).await
}

/// `POST /2019-09-25/functions/{name}/event-invoke-config`.
pub(crate) async fn update_event_config(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    put_or_update_event_config(st, name, q, body, true).await
}

/// `GET /2019-09-25/functions/{name}/event-invoke-config`.
pub(crate) async fn get_event_config(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    check_qualifier(&st, &name, q.qualifier.as_deref())?;
    let rec = st.control.get_function(&name)?;
    let cfg = rec
        .extras
        .event_invoke
        .ok_or_else(|| no_event_config(&name))?;
    Ok(axum::Json(event_config_json(&name, &cfg)).into_response())
}

/// `DELETE /2019-09-25/functions/{name}/event-invoke-config`.
pub(crate) async fn delete_event_config(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    check_qualifier(&st, &name, q.qualifier.as_deref())?;
    let had = st
        .control
        .update_extras(&name, |e| Ok(e.event_invoke.take().is_some()))?;
    if !had {
        return Err(no_event_config(&name));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /2019-09-25/functions/{name}/event-invoke-config/list`.
pub(crate) async fn list_event_configs(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    let rec = st.control.get_function(&name)?;
    let list: Vec<serde_json::Value> = rec
        .extras
        .event_invoke
        .iter()
        .map(|c| event_config_json(&name, c))
        .collect();
    Ok(axum::Json(serde_json::json!({ "FunctionEventInvokeConfigs": list })).into_response())
}

/// `GET /2016-08-19/account-settings/`.
pub(crate) async fn account_settings(State(st): State<AppState>) -> Response {
    let s = st.control.account_settings();
    let unzipped = spore_registry::code::MAX_UNPACKED;
    axum::Json(serde_json::json!({
        "AccountLimit": {
            // Spore sets no total: Lambda's default is given so that tools that check it pass.
            "TotalCodeSize": 80_530_636_800u64,
            "CodeSizeUnzipped": unzipped,
            "CodeSizeZipped": crate::MAX_BODY / 4 * 3,
            "ConcurrentExecutions": s.concurrent_executions,
            "UnreservedConcurrentExecutions": s.unreserved_concurrent_executions,
        },
        "AccountUsage": {
            "TotalCodeSize": s.total_code_size,
            "FunctionCount": s.function_count,
        },
    }))
    .into_response()
}

/// `GET /2020-06-30/functions/{name}/code-signing-config`: Spore functions have none.
pub(crate) async fn code_signing_config(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    st.control.get_function(&name)?;
    Ok(
        axum::Json(serde_json::json!({ "CodeSigningConfigArn": "", "FunctionName": name }))
            .into_response(),
    )
}

/// `GET /2021-07-20/functions/{name}/runtime-management-config`: runtimes follow the host.
pub(crate) async fn runtime_management_config(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> ApiResult<Response> {
    let name = unqualified(&name, None)?;
    check_qualifier(&st, &name, q.qualifier.as_deref())?;
    st.control.get_function(&name)?;
    Ok(axum::Json(serde_json::json!({
        "UpdateRuntimeOn": "Auto",
        "FunctionArn": format!("{}:$LATEST", function_arn(&name)),
    }))
    .into_response())
}

/// `GET /2015-03-31/event-source-mappings/`: Spore has no event source mappings.
pub(crate) async fn list_event_source_mappings() -> Response {
    axum::Json(serde_json::json!({ "EventSourceMappings": [] })).into_response()
}

/// `GET /2021-10-31/functions/{name}/urls`: Spore has no function URLs.
pub(crate) async fn list_function_url_configs(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    st.control.get_function(&unqualified(&name, None)?)?;
    Ok(axum::Json(serde_json::json!({ "FunctionUrlConfigs": [] })).into_response())
}

/// Operations Spore refuses, with why.
pub(crate) const REFUSED: &[(&str, &str)] = &[
    (
        "CreateFunctionUrlConfig",
        "Spore has no function URLs: invoke through the Lambda API",
    ),
    (
        "UpdateFunctionUrlConfig",
        "Spore has no function URLs: invoke through the Lambda API",
    ),
    (
        "InvokeWithResponseStream",
        "Spore does not stream responses: use Invoke",
    ),
    (
        "CreateEventSourceMapping",
        "Spore has no event sources (SQS, Kinesis, DynamoDB streams)",
    ),
    (
        "PutFunctionCodeSigningConfig",
        "Spore does not verify code signatures",
    ),
    (
        "PutRuntimeManagementConfig",
        "Spore's runtimes follow the host's interpreters",
    ),
    (
        "AddLayerVersionPermission",
        "Spore layers are shared by every key of the daemon; there is no cross-account sharing",
    ),
];

/// A refusal naming the operation.
pub(crate) fn refuse(op: &str) -> ApiError {
    let why = REFUSED
        .iter()
        .find(|(o, _)| *o == op)
        .map_or("", |(_, w)| *w);
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "UnsupportedOperationException",
        format!("{op} is not supported by Spore: {why}"),
    )
}

/// A handler refusing `op` (the route table names one per path).
pub(crate) fn refused(op: &'static str) -> impl Fn() -> std::future::Ready<ApiError> + Clone {
    move || std::future::ready(refuse(op))
}
