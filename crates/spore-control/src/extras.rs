//! Layers, reserved concurrency, tags, resource policies, account limits and asynchronous
//! invocations with retries and destinations: the parts of the Lambda API around a function
//! that are not its code and configuration.

use std::time::{Duration, Instant};

use spore_core::{ControlError, InvokeOptions};
use spore_registry::code::MAX_UNPACKED;
use spore_registry::extras::{EventInvokeConfig, FunctionExtras};
use spore_registry::layers::{dir_size, FunctionLayer, LayerVersion, PublishSpec};
use spore_registry::{FunctionRecord, Registry};

use crate::Control;

/// Most instances one function may be given (`PutFunctionConcurrency`, the
/// `spore:max_instances` tag).
pub const MAX_FUNCTION_CONCURRENCY: u32 = 1024;

/// Memory Spore counts per instance when it works out how many the host can run at once,
/// MiB (Lambda's smallest memory size).
const MIB_PER_INSTANCE: u64 = 128;

/// First wait before retrying a failed asynchronous invocation; each further wait doubles.
/// (Lambda waits about a minute, then two; Spore retries sooner.)
pub const EVENT_RETRY_BASE: Duration = Duration::from_secs(1);

/// Refuses a function whose code and layers together unpack to more than Lambda's 250 MB.
pub(crate) fn check_size(reg: &Registry, rec: &FunctionRecord) -> Result<(), ControlError> {
    if rec.layers.is_empty() {
        return Ok(());
    }
    let code = dir_size(&reg.code_dir(rec));
    let total = code + rec.layers.iter().map(|l| l.unzipped_size).sum::<u64>();
    if total > MAX_UNPACKED {
        return Err(ControlError::InvalidParameter(format!(
            "Function code combined with layers exceeds the maximum allowed size of {MAX_UNPACKED} bytes (unzipped: {total} bytes)"
        )));
    }
    Ok(())
}

/// Spore's limits and what is used of them (`GetAccountSettings`).
#[derive(Debug, Clone, Copy)]
pub struct AccountSettings {
    /// Instances the host can run at once (its memory over 128 MiB, at most
    /// [`MAX_FUNCTION_CONCURRENCY`]).
    pub concurrent_executions: u32,
    /// What is left after the functions' reserved concurrency.
    pub unreserved_concurrent_executions: u32,
    /// Functions deployed.
    pub function_count: u64,
    /// Bytes of zipped code of functions and layers stored.
    pub total_code_size: u64,
}

/// Instances this host can run at once.
pub fn host_concurrency() -> u32 {
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024);
    u32::try_from(mem_mib / MIB_PER_INSTANCE)
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_FUNCTION_CONCURRENCY)
}

/// The reserved concurrency of `rec`: 0 (throttled), the manifest's instance limit, or none.
pub fn reserved_concurrency(rec: &FunctionRecord) -> Option<u32> {
    match rec.extras.reserved_concurrency {
        Some(0) => Some(0),
        _ => rec.manifest.max_instances,
    }
}

/// The function name an ARN of a Spore function names (`$LATEST` or unqualified).
fn destination_function(field: &str, arn: &str) -> Result<String, ControlError> {
    let parts: Vec<&str> = arn.split(':').collect();
    let service = parts.get(2).copied().unwrap_or_default();
    let refuse = |what: &str| {
        Err(ControlError::InvalidParameter(format!(
            "{field} {arn} is {what}: Spore delivers destinations to Spore functions only (arn:aws:lambda:<region>:<account>:function:<name>)"
        )))
    };
    match (parts.first().copied(), service) {
        (Some("arn"), "lambda") => {}
        (Some("arn"), "sqs") => return refuse("an Amazon SQS queue"),
        (Some("arn"), "sns") => return refuse("an Amazon SNS topic"),
        (Some("arn"), "events") => return refuse("an Amazon EventBridge event bus"),
        (Some("arn"), "s3") => return refuse("an Amazon S3 bucket"),
        _ => return refuse("not a function ARN"),
    }
    if let [_, _, _, region, account, "function", ..] = parts.as_slice() {
        spore_registry::layers::check_arn_home(arn, region, account)
            .map_err(|e| ControlError::InvalidParameter(format!("{field}: {e}")))?;
    }
    match parts.as_slice() {
        [_, _, _, _, _, "function", name] | [_, _, _, _, _, "function", name, "$LATEST"] => {
            Ok((*name).to_owned())
        }
        [_, _, _, _, _, "function", _, q] => Err(ControlError::InvalidParameter(format!(
            "{field} {arn} names version or alias {q}: Spore delivers destinations to $LATEST only"
        ))),
        _ => refuse("not a function ARN"),
    }
}

impl Control {
    /// Publishes a new version of layer `name`.
    pub fn publish_layer(
        &self,
        name: &str,
        zip: &[u8],
        spec: PublishSpec,
    ) -> Result<LayerVersion, ControlError> {
        let v = self.inner.registry.lock().layers.publish(name, zip, spec)?;
        tracing::info!(layer = %name, version = v.version, code = %v.code_hex, "layer version published");
        Ok(v)
    }

    /// One layer version.
    pub fn layer_version(&self, name: &str, version: u64) -> Option<LayerVersion> {
        self.inner
            .registry
            .lock()
            .layers
            .get(name, version)
            .cloned()
    }

    /// Every version of one layer, oldest first.
    pub fn layer_versions(&self, name: &str) -> Vec<LayerVersion> {
        self.inner.registry.lock().layers.versions(name)
    }

    /// The latest version of every layer.
    pub fn latest_layers(&self) -> Vec<LayerVersion> {
        self.inner.registry.lock().layers.latest()
    }

    /// Deletes a layer version; functions that use it keep its content.
    pub fn delete_layer_version(&self, name: &str, version: u64) -> Result<(), ControlError> {
        let mut reg = self.inner.registry.lock();
        reg.layers.delete(name, version)?;
        reg.prune_layers();
        Ok(())
    }

    /// Resolves the layer version ARNs of a function's `Layers`.
    pub fn resolve_layers(&self, arns: &[String]) -> Result<Vec<FunctionLayer>, ControlError> {
        Ok(self.inner.registry.lock().layers.resolve(arns)?)
    }

    /// Changes `name`'s tags, policy, concurrency or event-invoke configuration (no new
    /// revision). `change` may refuse.
    pub fn update_extras<T>(
        &self,
        name: &str,
        change: impl FnOnce(&mut FunctionExtras) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        self.inner
            .registry
            .lock()
            .update_extras(name, change)
            .ok_or_else(|| ControlError::NotFound(name.into()))?
    }

    /// Sets (`Some`) or removes (`None`) `name`'s reserved concurrency: its instance limit,
    /// or with 0 a function every invocation of which is throttled.
    pub fn set_reserved_concurrency(
        &self,
        name: &str,
        reserved: Option<u32>,
    ) -> Result<FunctionRecord, ControlError> {
        let host = host_concurrency();
        let mut reg = self.inner.registry.lock();
        let rec = reg
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        if let Some(n) = reserved {
            let others: u64 = reg
                .list()
                .filter(|r| r.manifest.name != name)
                .filter_map(reserved_concurrency)
                .map(u64::from)
                .sum();
            if n > MAX_FUNCTION_CONCURRENCY || others + u64::from(n) > u64::from(host) {
                return Err(ControlError::InvalidParameter(format!(
                    "Specified ReservedConcurrentExecutions for function decreases account's UnreservedConcurrentExecution below its minimum value of [0] (this host runs at most {host} instances at once; other functions reserve {others})"
                )));
            }
        }
        let mut new = rec.clone();
        match reserved {
            Some(0) => new.extras.reserved_concurrency = Some(0),
            Some(n) => {
                new.extras.reserved_concurrency = None;
                new.manifest.max_instances = Some(n);
            }
            None => {
                new.extras.reserved_concurrency = None;
                new.manifest.max_instances = None;
            }
        }
        if new.manifest == rec.manifest {
            let extras = new.extras.clone();
            reg.update_extras(name, |e| {
                *e = extras;
                Ok::<_, ControlError>(())
            })
            .ok_or_else(|| ControlError::NotFound(name.into()))??;
            return Ok(new);
        }
        // A new instance limit: the pools (and a cfork template sized for it) start over.
        let new = reg.put(new)?;
        drop(reg);
        self.inner.pools.retire(name);
        tracing::info!(function = %name, reserved = ?reserved, "reserved concurrency changed");
        Ok(new)
    }

    /// Whether `name` has reserved concurrency 0 (every invocation is throttled).
    pub fn is_throttled(&self, name: &str) -> bool {
        self.inner
            .registry
            .lock()
            .get(name)
            .is_some_and(|r| r.extras.reserved_concurrency == Some(0))
    }

    /// Checks an event-invoke configuration's destinations: Spore functions other than
    /// `name` itself, that exist.
    pub fn check_destinations(
        &self,
        name: &str,
        cfg: &EventInvokeConfig,
    ) -> Result<(), ControlError> {
        for (field, arn) in [
            ("DestinationConfig.OnSuccess.Destination", &cfg.on_success),
            ("DestinationConfig.OnFailure.Destination", &cfg.on_failure),
        ] {
            let Some(arn) = arn else { continue };
            let dest = destination_function(field, arn)?;
            if dest == name {
                return Err(ControlError::InvalidParameter(format!(
                    "{field} {arn} is the function itself: a destination must be another function"
                )));
            }
            if self.inner.registry.lock().get(&dest).is_none() {
                return Err(ControlError::InvalidParameter(format!(
                    "{field} {arn}: function {dest} does not exist"
                )));
            }
        }
        Ok(())
    }

    /// Spore's limits and their use.
    pub fn account_settings(&self) -> AccountSettings {
        let host = host_concurrency();
        let reg = self.inner.registry.lock();
        let reserved: u64 = reg
            .list()
            .filter_map(reserved_concurrency)
            .map(u64::from)
            .sum();
        let code: u64 = reg.list().map(|r| r.code_size).sum();
        let layers: u64 = reg
            .layers
            .latest()
            .iter()
            .flat_map(|l| reg.layers.versions(&l.name))
            .map(|v| v.code_size)
            .sum();
        AccountSettings {
            concurrent_executions: host,
            unreserved_concurrent_executions: u32::try_from(
                u64::from(host).saturating_sub(reserved),
            )
            .unwrap_or(0),
            function_count: reg.list().count() as u64,
            total_code_size: code + layers,
        }
    }

    /// Most invocations in one chain of destinations (an invocation, the destination that
    /// gets its record, that destination's destination, ...): Lambda's recursive-loop
    /// detection stops such a chain after about 16.
    pub const MAX_DESTINATION_DEPTH: u32 = 16;

    /// Runs an asynchronous invocation: tries, retries with back-off as the function's
    /// event-invoke configuration says (within its maximum event age), then sends the
    /// outcome to its destination, if it has one.
    pub(crate) async fn run_event(
        &self,
        name: String,
        payload: Vec<u8>,
        request_id: String,
        depth: u32,
    ) {
        let received = Instant::now();
        let received_ms = spore_registry::store::now_unix_ms();
        let cfg = match self.get_function(&name) {
            Ok(rec) => rec.extras.event_invoke.unwrap_or_default(),
            Err(_) => return,
        };
        let max_age = Duration::from_secs(u64::from(cfg.max_age_s()));
        let mut wait = EVENT_RETRY_BASE;
        let mut attempts = 0u32;
        let mut last: Option<(bool, serde_json::Value)> = None;
        let condition = loop {
            if received.elapsed() > max_age {
                break "EventAgeExceeded";
            }
            attempts += 1;
            let outcome = if self.is_throttled(&name) {
                Err(ControlError::TooManyRequests(0))
            } else {
                self.invoke_as(
                    &name,
                    payload.clone().into(),
                    InvokeOptions::default(),
                    request_id.clone(),
                )
                .await
            };
            match outcome {
                Ok(inv) => match inv.outcome {
                    Ok(body) => {
                        let body = serde_json::from_slice(&body).unwrap_or_else(|_| {
                            serde_json::Value::String(String::from_utf8_lossy(&body).into())
                        });
                        last = Some((true, body));
                        break "Success";
                    }
                    Err(e) => {
                        last = Some((false, serde_json::to_value(&e).unwrap_or_default()));
                    }
                },
                Err(ControlError::NotFound(_)) => return, // deleted meanwhile
                Err(e) => {
                    self.inner
                        .pools
                        .log(&name)
                        .push_text(&format!("asynchronous invocation {request_id} failed: {e}"));
                    last = None;
                }
            }
            if attempts > cfg.retries() {
                break "RetriesExhausted";
            }
            let left = max_age.saturating_sub(received.elapsed());
            tokio::time::sleep(wait.min(left + Duration::from_millis(1))).await;
            wait *= 2;
        };
        let dest = if condition == "Success" {
            &cfg.on_success
        } else {
            &cfg.on_failure
        };
        let Some(dest_arn) = dest else { return };
        let Ok(dest_name) = destination_function("Destination", dest_arn) else {
            return;
        };
        let request_payload: serde_json::Value =
            serde_json::from_slice(&payload).unwrap_or_default();
        let mut record = serde_json::json!({
            "version": "1.0",
            "timestamp": spore_registry::store::lambda_timestamp(received_ms),
            "requestContext": {
                "requestId": request_id,
                "functionArn": self.function_arn(&name, Some("$LATEST")),
                "condition": condition,
                "approximateInvokeCount": attempts,
            },
            "requestPayload": request_payload,
        });
        if let Some((ok, body)) = last {
            let mut ctx = serde_json::json!({ "statusCode": 200, "executedVersion": "$LATEST" });
            if !ok {
                ctx["functionError"] = "Unhandled".into();
            }
            record["responseContext"] = ctx;
            record["responsePayload"] = body;
        }
        if depth + 1 >= Self::MAX_DESTINATION_DEPTH {
            // Functions that name each other as destinations would call each other forever:
            // the chain stops here, as Lambda's recursive-loop detection stops it.
            tracing::warn!(function = %name, destination = %dest_name, request_id = %request_id, max = Self::MAX_DESTINATION_DEPTH, "destination chain stopped (a loop of destinations?)");
            self.inner.pools.log(&name).push_text(&format!(
                "asynchronous invocation {request_id}: not sent to destination {dest_arn}: the chain of destinations reached {} invocations (functions that name each other as destinations loop; Spore stops them, as Lambda does)",
                Self::MAX_DESTINATION_DEPTH
            ));
            return;
        }
        let bytes = serde_json::to_vec(&record).expect("records serialize");
        if let Err(e) = self.invoke_async_at(&dest_name, bytes, depth + 1) {
            self.inner.pools.log(&name).push_text(&format!(
                "asynchronous invocation {request_id}: destination {dest_arn} refused the record: {e}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_must_be_spore_functions() {
        assert_eq!(
            destination_function("D", "arn:aws:lambda:local:000000000000:function:sink").unwrap(),
            "sink"
        );
        assert_eq!(
            destination_function(
                "D",
                "arn:aws:lambda:local:000000000000:function:sink:$LATEST"
            )
            .unwrap(),
            "sink"
        );
        for (arn, says) in [
            ("arn:aws:sqs:us-east-1:1:queue", "SQS"),
            ("arn:aws:sns:us-east-1:1:topic", "SNS"),
            (
                "arn:aws:events:us-east-1:1:event-bus/default",
                "EventBridge",
            ),
            (
                "arn:aws:lambda:local:000000000000:function:sink:live",
                "$LATEST only",
            ),
            ("sink", "not a function ARN"),
            (
                "arn:aws:lambda:us-east-1:123456789012:function:sink",
                "this Spore daemon serves",
            ),
        ] {
            let e = destination_function("D", arn).unwrap_err().to_string();
            assert!(e.contains(says), "{arn}: {e}");
        }
    }

    #[test]
    fn the_host_runs_at_least_one_instance() {
        let n = host_concurrency();
        assert!((1..=MAX_FUNCTION_CONCURRENCY).contains(&n));
    }
}
