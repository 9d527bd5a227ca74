//! Lambda's versions and aliases: `PublishVersion`, `ListVersionsByFunction`, `CreateAlias`,
//! `GetAlias`, `UpdateAlias`, `DeleteAlias`, `ListAliases`, and the pagination they share
//! with `ListFunctions`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use spore_control::{AliasSpec, ControlError};
use spore_registry::{Alias, FunctionRecord};

use crate::lambda::{configuration, split_ref, ApiError, ApiResult};
use crate::AppState;

/// Most items a page holds (Lambda's `MaxItems` limit).
const MAX_ITEMS: usize = 10_000;
/// Items a page holds when `MaxItems` is not given (Lambda's 50).
const DEFAULT_ITEMS: usize = 50;

/// One page of `items` (in their order) after the item whose key is `marker`, at most
/// `max_items` of them, and the marker of the next page (the key of the page's last item)
/// if more follow. An unknown marker is refused.
pub(crate) fn paginate<T>(
    items: Vec<T>,
    marker: Option<&str>,
    max_items: Option<&str>,
    key: impl Fn(&T) -> String,
) -> ApiResult<(Vec<T>, Option<String>)> {
    let max = match max_items {
        None => DEFAULT_ITEMS,
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_ITEMS).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "MaxItems {m:?} must be a number from 1 to {MAX_ITEMS}"
                ))
            })?,
    };
    let start = match marker.filter(|m| !m.is_empty()) {
        None => 0,
        Some(m) => {
            items.iter().position(|i| key(i) == m).ok_or_else(|| {
                ApiError::invalid(format!(
                    "Marker {m:?} is not one this listing gave (or its item was deleted since)"
                ))
            })? + 1
        }
    };
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(start).take(max).collect();
    let next = (start + page.len() < total)
        .then(|| page.last().map(&key))
        .flatten();
    Ok((page, next))
}

/// Publishes `$LATEST` of `name` after a configuration update with `Publish=true`.
pub(crate) fn publish_now(st: &AppState, name: &str) -> ApiResult<FunctionRecord> {
    let rec = st.control.publish_version(name, None, None, None)?;
    st.control.prewarm(&rec.key());
    Ok(rec)
}

/// Publishes `$LATEST` of `name` after a create or code update with `Publish=true`; while
/// the dependency build it started runs, the version is published once it succeeds and
/// `rec` (`$LATEST`, `Pending` or `InProgress`) is returned.
pub(crate) fn publish_after(
    st: &AppState,
    name: &str,
    rec: FunctionRecord,
) -> ApiResult<FunctionRecord> {
    match st.control.publish_when_built(name)? {
        Some(v) => {
            st.control.prewarm(&v.key());
            Ok(v)
        }
        None => Ok(rec),
    }
}

/// The function a versions or aliases call names (never with a qualifier).
fn function(reference: &str) -> ApiResult<String> {
    match split_ref(reference, None)? {
        (name, None) => Ok(name),
        (name, Some(q)) => Err(ApiError::invalid(format!(
            "{name}:{q}: name the function without a qualifier for this operation"
        ))),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> ApiResult<T> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct PublishIn {
    code_sha256: Option<String>,
    description: Option<String>,
    revision_id: Option<String>,
}

fn parse<'a, T: Deserialize<'a> + Default>(body: &'a [u8]) -> ApiResult<T> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "Malformed request body (or a parameter Spore does not know): {e}"
        ))
    })
}

/// `POST /2015-03-31/functions/{name}/versions`: `PublishVersion`.
pub(crate) async fn publish_version(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: PublishIn = parse(&body)?;
    let name = function(&name)?;
    let control = st.control.clone();
    let rec = blocking(move || {
        control.publish_version(
            &name,
            req.code_sha256.as_deref(),
            req.revision_id.as_deref(),
            req.description,
        )
    })
    .await?;
    st.control.prewarm(&rec.key());
    Ok((
        StatusCode::CREATED,
        axum::Json(configuration(&st.control, &rec)),
    )
        .into_response())
}

/// `MaxItems` and `Marker` of a listing.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct PageQuery {
    #[serde(rename = "MaxItems")]
    max_items: Option<String>,
    #[serde(rename = "Marker")]
    marker: Option<String>,
    #[serde(rename = "FunctionVersion")]
    function_version: Option<String>,
}

/// `GET /2015-03-31/functions/{name}/versions`: `ListVersionsByFunction`.
pub(crate) async fn list_versions(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    if q.function_version.is_some() {
        return Err(ApiError::invalid(
            "FunctionVersion is not a parameter of ListVersionsByFunction",
        ));
    }
    let recs = st.control.list_versions(&function(&name)?)?;
    let (page, next) = paginate(recs, q.marker.as_deref(), q.max_items.as_deref(), |r| {
        r.version_name()
    })?;
    let versions: Vec<_> = page
        .iter()
        .map(|r| {
            let mut c = configuration(&st.control, r);
            if r.version.is_none() {
                // Listed among versions, $LATEST is named by a qualified ARN.
                c["FunctionArn"] = st
                    .control
                    .function_arn(&r.manifest.name, Some("$LATEST"))
                    .into();
            }
            c
        })
        .collect();
    let mut out = serde_json::json!({ "Versions": versions });
    if let Some(m) = next {
        out["NextMarker"] = m.into();
    }
    Ok(axum::Json(out).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct RoutingIo {
    #[serde(default)]
    additional_version_weights: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct AliasIn {
    name: Option<String>,
    function_version: Option<String>,
    description: Option<String>,
    routing_config: Option<RoutingIo>,
    revision_id: Option<String>,
}

fn alias_json(st: &AppState, function: &str, a: &Alias) -> serde_json::Value {
    let mut out = serde_json::json!({
        "AliasArn": st.control.function_arn(function, Some(&a.name)),
        "Name": a.name,
        "FunctionVersion": a.function_version,
        "Description": a.description,
        "RevisionId": a.revision_id,
    });
    if !a.additional_weights.is_empty() {
        out["RoutingConfig"] =
            serde_json::json!({ "AdditionalVersionWeights": a.additional_weights });
    }
    out
}

/// `POST /2015-03-31/functions/{name}/aliases`: `CreateAlias`.
pub(crate) async fn create_alias(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: AliasIn = parse(&body)?;
    if req.revision_id.is_some() {
        return Err(ApiError::invalid(
            "RevisionId is not a parameter of CreateAlias",
        ));
    }
    let name = function(&name)?;
    let alias = req
        .name
        .ok_or_else(|| ApiError::invalid("Name (the alias's) is required"))?;
    let spec = AliasSpec {
        function_version: req.function_version,
        description: req.description,
        additional_weights: req.routing_config.map(|r| r.additional_version_weights),
        revision_id: None,
    };
    let (control, n) = (st.control.clone(), name.clone());
    let a = blocking(move || control.create_alias(&n, &alias, spec)).await?;
    Ok((StatusCode::CREATED, axum::Json(alias_json(&st, &name, &a))).into_response())
}

/// `GET /2015-03-31/functions/{name}/aliases/{alias}`: `GetAlias`.
pub(crate) async fn get_alias(
    State(st): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<Response> {
    let name = function(&name)?;
    let a = st.control.get_alias(&name, &alias)?;
    Ok(axum::Json(alias_json(&st, &name, &a)).into_response())
}

/// `PUT /2015-03-31/functions/{name}/aliases/{alias}`: `UpdateAlias`.
pub(crate) async fn update_alias(
    State(st): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: AliasIn = parse(&body)?;
    if req.name.is_some() {
        return Err(ApiError::invalid(
            "Name is not a parameter of UpdateAlias: the alias is named in the path",
        ));
    }
    let name = function(&name)?;
    let spec = AliasSpec {
        function_version: req.function_version,
        description: req.description,
        additional_weights: req.routing_config.map(|r| r.additional_version_weights),
        revision_id: req.revision_id,
    };
    let (control, n) = (st.control.clone(), name.clone());
    let a = blocking(move || control.update_alias(&n, &alias, spec)).await?;
    Ok(axum::Json(alias_json(&st, &name, &a)).into_response())
}

/// `DELETE /2015-03-31/functions/{name}/aliases/{alias}`: `DeleteAlias`.
pub(crate) async fn delete_alias(
    State(st): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<Response> {
    let name = function(&name)?;
    let control = st.control.clone();
    blocking(move || control.delete_alias(&name, &alias)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /2015-03-31/functions/{name}/aliases`: `ListAliases` (`FunctionVersion` keeps those
/// that route to that version).
pub(crate) async fn list_aliases(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    let name = function(&name)?;
    let mut aliases = st.control.list_aliases(&name)?;
    if let Some(v) = &q.function_version {
        aliases.retain(|a| a.function_version == *v || a.additional_weights.contains_key(v));
    }
    let (page, next) = paginate(aliases, q.marker.as_deref(), q.max_items.as_deref(), |a| {
        a.name.clone()
    })?;
    let aliases: Vec<_> = page.iter().map(|a| alias_json(&st, &name, a)).collect();
    let mut out = serde_json::json!({ "Aliases": aliases });
    if let Some(m) = next {
        out["NextMarker"] = m.into();
    }
    Ok(axum::Json(out).into_response())
}

/// `?Qualifier=` and `?List=ALL` of the provisioned-concurrency calls.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ProvisionedQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
    #[serde(rename = "List")]
    list: Option<String>,
    #[serde(rename = "MaxItems")]
    max_items: Option<String>,
    #[serde(rename = "Marker")]
    marker: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ProvisionedIn {
    provisioned_concurrent_executions: i64,
}

fn provisioned_json(
    st: &AppState,
    function: &str,
    p: &spore_control::ProvisionedStatus,
) -> serde_json::Value {
    serde_json::json!({
        "FunctionArn": st.control.function_arn(function, Some(&p.qualifier)),
        "RequestedProvisionedConcurrentExecutions": p.requested,
        "AvailableProvisionedConcurrentExecutions": p.available,
        "AllocatedProvisionedConcurrentExecutions": p.available,
        "Status": p.status,
        "LastModified": spore_registry::store::lambda_timestamp(p.last_modified_ms),
    })
}

fn config_not_found(name: &str, qualifier: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ProvisionedConcurrencyConfigNotFoundException",
        format!("No Provisioned Concurrency Config found for this function: {name}:{qualifier}"),
    )
}

/// The function and qualifier a provisioned-concurrency call names (a qualifier is required).
fn qualified(reference: &str, q: &ProvisionedQuery) -> ApiResult<(String, String)> {
    match split_ref(reference, q.qualifier.as_deref())? {
        (name, Some(q)) => Ok((name, q)),
        (_, None) => Err(ApiError::invalid(
            "Qualifier is required: provisioned concurrency is set on a published version or an alias",
        )),
    }
}

/// `PUT /2019-09-30/functions/{name}/provisioned-concurrency?Qualifier=Q`:
/// `PutProvisionedConcurrencyConfig` (202; `IN_PROGRESS` until the instances are started).
pub(crate) async fn put_provisioned(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ProvisionedQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ProvisionedIn = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(format!(
            "Malformed request body (or a parameter Spore does not know): {e}"
        ))
    })?;
    let (name, qualifier) = qualified(&name, &q)?;
    let n = u32::try_from(req.provisioned_concurrent_executions).map_err(|_| {
        ApiError::invalid(format!(
            "ProvisionedConcurrentExecutions {} must be at least 1",
            req.provisioned_concurrent_executions
        ))
    })?;
    let p = st.control.put_provisioned(&name, &qualifier, n)?;
    let mut out = provisioned_json(&st, &name, &p);
    if let Some(o) = out.as_object_mut() {
        o.remove("FunctionArn");
    }
    Ok((StatusCode::ACCEPTED, axum::Json(out)).into_response())
}

/// `GET /2019-09-30/functions/{name}/provisioned-concurrency?Qualifier=Q` (or `?List=ALL`):
/// `GetProvisionedConcurrencyConfig` / `ListProvisionedConcurrencyConfigs`.
pub(crate) async fn get_provisioned(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ProvisionedQuery>,
) -> ApiResult<Response> {
    match q.list.as_deref() {
        Some("ALL") => {
            let name = function(&name)?;
            let all = st.control.list_provisioned(&name)?;
            let (page, next) = paginate(all, q.marker.as_deref(), q.max_items.as_deref(), |p| {
                p.qualifier.clone()
            })?;
            let configs: Vec<_> = page
                .iter()
                .map(|p| provisioned_json(&st, &name, p))
                .collect();
            let mut out = serde_json::json!({ "ProvisionedConcurrencyConfigs": configs });
            if let Some(m) = next {
                out["NextMarker"] = m.into();
            }
            Ok(axum::Json(out).into_response())
        }
        Some(other) => Err(ApiError::invalid(format!("List {other:?} must be ALL"))),
        None => {
            let (name, qualifier) = qualified(&name, &q)?;
            let p = st
                .control
                .get_provisioned(&name, &qualifier)?
                .ok_or_else(|| config_not_found(&name, &qualifier))?;
            let mut out = provisioned_json(&st, &name, &p);
            if let Some(o) = out.as_object_mut() {
                o.remove("FunctionArn");
            }
            Ok(axum::Json(out).into_response())
        }
    }
}

/// `DELETE /2019-09-30/functions/{name}/provisioned-concurrency?Qualifier=Q`:
/// `DeleteProvisionedConcurrencyConfig` (204).
pub(crate) async fn delete_provisioned(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ProvisionedQuery>,
) -> ApiResult<Response> {
    let (name, qualifier) = qualified(&name, &q)?;
    let control = st.control.clone();
    let (n, qq) = (name.clone(), qualifier.clone());
    if !blocking(move || control.delete_provisioned(&n, &qq)).await? {
        return Err(config_not_found(&name, &qualifier));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let items: Vec<u32> = (1..=5).collect();
        let key = |i: &u32| i.to_string();
        let (p, next) = paginate(items.clone(), None, Some("2"), key).unwrap();
        assert_eq!((p, next.as_deref()), (vec![1, 2], Some("2")));
        let (p, next) = paginate(items.clone(), Some("2"), Some("2"), key).unwrap();
        assert_eq!((p, next.as_deref()), (vec![3, 4], Some("4")));
        let (p, next) = paginate(items.clone(), Some("4"), Some("2"), key).unwrap();
        assert_eq!((p, next), (vec![5], None));
        let (p, next) = paginate(items.clone(), None, None, key).unwrap();
        assert_eq!((p.len(), next), (5, None));
        assert!(paginate(items.clone(), Some("9"), None, key).is_err());
        for bad in ["0", "x", "10001"] {
            assert!(
                paginate(items.clone(), None, Some(bad), key).is_err(),
                "{bad}"
            );
        }
    }
}
