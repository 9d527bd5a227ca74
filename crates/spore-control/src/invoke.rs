//! The invocation path: checks, placement (here or on another unit), an instance from the
//! pools, the call, the Lambda-style report block and the metrics.

use std::time::{Duration, Instant};

use spore_cluster::{InflightCount, Placement};
use spore_core::{ControlError, FunctionError, Invocation, InvokeOptions, StartKind};
use spore_pool::{Checkout, FirstInvoke, StartError};

use crate::Control;

impl Control {
    /// Checks a payload for a synchronous or asynchronous invocation.
    pub fn check_payload(payload: &[u8], asynchronous: bool) -> Result<(), ControlError> {
        let (limit, kind) = if asynchronous {
            (spore_core::MAX_ASYNC_PAYLOAD, "Event")
        } else {
            (spore_core::MAX_SYNC_PAYLOAD, "RequestResponse")
        };
        if payload.len() > limit {
            return Err(ControlError::RequestTooLarge {
                size: payload.len(),
                limit,
                kind,
            });
        }
        spore_core::control::check_json(payload)
    }

    /// Invokes a function and waits for its result. Function failures (errors, timeouts,
    /// crashes) are an `Ok` [`Invocation`] whose outcome is `Err`; `Err` is for requests the
    /// platform could not serve.
    ///
    /// The invocation runs on a task of its own: a caller that gives up (an HTTP client that
    /// disconnects, a unit's call cancelled by the control plane) leaves it to finish, log its
    /// report and give its instance back, as Lambda does. (Dropped half-way, it would keep its
    /// instance slot forever.)
    pub async fn invoke(
        &self,
        name: &str,
        payload: bytes::Bytes,
        opts: InvokeOptions,
    ) -> Result<Invocation, ControlError> {
        self.invoke_as(name, payload, opts, uuid::Uuid::new_v4().to_string())
            .await
    }

    /// [`Control::invoke`] under request id `request_id`.
    pub(crate) async fn invoke_as(
        &self,
        name: &str,
        payload: bytes::Bytes,
        opts: InvokeOptions,
        request_id: String,
    ) -> Result<Invocation, ControlError> {
        Self::check_payload(&payload, false)?;
        let (me, name) = (self.clone(), name.to_owned());
        tokio::spawn(async move {
            let inv = me.invoke_attached(&name, payload, opts, request_id).await;
            if let Ok(i) = &inv {
                me.remember(&name, i);
            }
            inv
        })
        .await
        .map_err(|e| ControlError::Internal(format!("the invocation task failed: {e}")))?
    }

    async fn invoke_attached(
        &self,
        name: &str,
        payload: bytes::Bytes,
        opts: InvokeOptions,
        request_id: String,
    ) -> Result<Invocation, ControlError> {
        let _work = self.inner.work.begin();
        if self.inner.work.is_draining() {
            return Err(ControlError::Unavailable(
                "the daemon is shutting down".into(),
            ));
        }
        let pools = &self.inner.pools;
        pools.env()?;
        let rec = self.get_function(name)?;
        Self::refuse_unless_active(&rec)?;
        let _counted = match self.inner.units.place_node(&rec, opts.unit)? {
            Placement::Local => self.inner.units.local_guard(),
            Placement::Remote {
                unit,
                link,
                inflight,
            } => {
                let _counted = InflightCount::new(inflight);
                return self
                    .inner
                    .units
                    .invoke_remote(&rec, unit, &link, payload, opts)
                    .await;
            }
        };
        let t0 = Instant::now();
        let t0_ns = spore_pool::monotonic_ns();
        let timeout = Duration::from_secs(u64::from(rec.manifest.timeout_s));
        // Every version of a function logs to the function's log (`name` may be `name:N`).
        let log = pools.log(&rec.manifest.name);
        let version = rec.version_name();
        let checkout = Checkout {
            force_cold: opts.force_cold,
            cold_path: opts.cold_path,
            restore_mode: opts.restore_mode,
            // A cfork child, and a restore into a spare sandbox, start with this invocation
            // pipelined.
            first_invoke: Some(FirstInvoke {
                request_id: request_id.clone(),
                payload: payload.clone(),
                timeout_s: rec.manifest.timeout_s,
                client_context: opts.client_context.clone(),
            }),
            deadline: Some(t0 + timeout),
        };
        let lease = match pools.checkout(&rec, checkout).await? {
            Ok(lease) => lease,
            Err(StartError::Platform(msg)) => {
                metrics::counter!("spore_platform_errors_total", "function" => name.to_owned())
                    .increment(1);
                return Err(ControlError::Internal(msg));
            }
            Err(StartError::Init(err)) => {
                let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
                let block = report_block(
                    &request_id,
                    &version,
                    "",
                    total_ms,
                    rec.manifest.memory_mb,
                    None,
                    Some(total_ms),
                    Some(&err),
                    false,
                );
                log.push_invocation(&request_id, &block);
                record_metrics(name, StartKind::Cold, total_ms, Some(&err));
                return Ok(Invocation {
                    request_id,
                    start: StartKind::Cold,
                    init_ms: total_ms,
                    total_ms,
                    outcome: Err(err),
                    log: block,
                    breakdown: Vec::new(),
                    to_handler_ms: None,
                    handler_ns: (0, 0),
                    unit: self.inner.units.local().id,
                });
            }
        };
        let (mut inst, start) = (lease.instance, lease.start);
        let fresh = start != StartKind::Warm;
        let init_ms = if fresh { inst.init_ms } else { 0.0 };
        let breakdown = std::mem::take(&mut inst.breakdown);
        // What the instance printed at init goes before its first START line, as in Lambda.
        let init_logs = std::mem::take(&mut inst.init_logs);
        let result = inst
            .invoke(
                &request_id,
                &payload,
                rec.manifest.timeout_s,
                opts.client_context.as_ref(),
            )
            .await;
        let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let peak = inst.memory_peak_mb();
        let mut to_handler_ms = None;
        let mut handler_ns = (0, 0);
        let mut error_logged = false;
        let (outcome, logs, handler_ms, reusable) = match result {
            Ok(reply) => {
                let reusable = !inst.has_strays();
                handler_ns = (reply.handler_start_ns, reply.handler_end_ns);
                if reply.handler_start_ns > t0_ns {
                    to_handler_ms = Some((reply.handler_start_ns - t0_ns) as f64 / 1e6);
                }
                error_logged = reply.error_logged;
                pools.record_imports(&rec, &reply.imported, &reply.unimportable);
                (reply.outcome, reply.logs, reply.handler_ms, reusable)
            }
            Err(failure) => {
                // Timeouts, OOM kills and crashes concern the operator too.
                let mut e = failure.to_function_error();
                if matches!(failure, spore_pool::InvokeFailure::Exited { .. }) {
                    // Lambda's words for a runtime that exited mid-invocation.
                    e.message = format!("RequestId: {request_id} Error: {}", e.message);
                }
                tracing::info!(function = %name, request_id = %request_id, error = %e.error_type, "{}", e.message);
                // What it printed before the timeout or the crash is kept.
                (Err(e), inst.take_logs(), total_ms - init_ms, false)
            }
        };
        pools.checkin(&rec, inst, reusable);
        let block = report_block(
            &request_id,
            &version,
            &logs,
            handler_ms,
            rec.manifest.memory_mb,
            peak,
            fresh.then_some(init_ms),
            outcome.as_ref().err(),
            error_logged,
        );
        if !init_logs.is_empty() {
            log.push_text(&init_logs);
        }
        log.push_invocation(&request_id, &block);
        // The tail (`LogType=Tail`) of a fresh instance's first invocation shows its init
        // output too.
        let block = if init_logs.is_empty() {
            block
        } else {
            let mut with_init = init_logs;
            if !with_init.ends_with('\n') {
                with_init.push('\n');
            }
            with_init + &block
        };
        record_metrics(name, start, total_ms, outcome.as_ref().err());
        if fresh {
            metrics::histogram!("spore_init_duration_seconds", "function" => name.to_owned(), "start" => start.as_str())
                .record(init_ms / 1000.0);
        }
        Ok(Invocation {
            request_id,
            start,
            init_ms,
            total_ms,
            outcome,
            log: block,
            breakdown,
            to_handler_ms,
            handler_ns,
            unit: self.inner.units.local().id,
        })
    }

    /// Queues an asynchronous (`Event`) invocation; its outcome goes to the function's log
    /// and its destination (see `run_event`). Returns its request id, the one the function
    /// runs and logs with (every retry keeps it, as on Lambda).
    pub fn invoke_async(&self, name: &str, payload: Vec<u8>) -> Result<String, ControlError> {
        self.invoke_async_at(name, payload, 0)
    }

    /// [`Control::invoke_async`] for an invocation `depth` destinations down a chain (0: a
    /// caller's; a destination's record is one more than the invocation it reports).
    pub(crate) fn invoke_async_at(
        &self,
        name: &str,
        payload: Vec<u8>,
        depth: u32,
    ) -> Result<String, ControlError> {
        Self::check_payload(&payload, true)?;
        self.get_function(name)?;
        if self.inner.work.is_draining() {
            return Err(ControlError::Unavailable(
                "the daemon is shutting down".into(),
            ));
        }
        let this = self.clone();
        let name = name.to_owned();
        let id = uuid::Uuid::new_v4().to_string();
        let request_id = id.clone();
        // Retries and destinations as the function's event-invoke configuration says.
        tokio::spawn(async move { this.run_event(name, payload, request_id, depth).await });
        Ok(id)
    }
}

fn record_metrics(name: &str, start: StartKind, total_ms: f64, error: Option<&FunctionError>) {
    metrics::counter!("spore_invocations_total", "function" => name.to_owned(), "start" => start.as_str()).increment(1);
    if let Some(e) = error {
        metrics::counter!("spore_invocation_errors_total", "function" => name.to_owned(), "type" => e.error_type.clone()).increment(1);
    }
    metrics::histogram!("spore_invocation_duration_seconds", "function" => name.to_owned(), "start" => start.as_str()).record(total_ms / 1000.0);
}

/// The invocation's log block. `error_logged`: the runtime wrote the error's entry itself.
#[allow(clippy::too_many_arguments)]
fn report_block(
    request_id: &str,
    version: &str,
    logs: &str,
    duration_ms: f64,
    memory_mb: u32,
    peak_mb: Option<u64>,
    init_ms: Option<f64>,
    error: Option<&FunctionError>,
    error_logged: bool,
) -> String {
    let mut s = format!("START RequestId: {request_id} Version: {version}\n");
    s.push_str(logs);
    if !logs.is_empty() && !logs.ends_with('\n') {
        s.push('\n');
    }
    if let Some(e) = error.filter(|_| !error_logged) {
        s.push_str(&format!("[ERROR] {}: {}\n", e.error_type, e.message));
    }
    s.push_str(&format!("END RequestId: {request_id}\n"));
    s.push_str(&format!(
        "REPORT RequestId: {request_id}\tDuration: {duration_ms:.2} ms\tBilled Duration: {} ms\tMemory Size: {memory_mb} MB",
        duration_ms.ceil() as u64
    ));
    if let Some(p) = peak_mb {
        s.push_str(&format!("\tMax Memory Used: {p} MB"));
    }
    if let Some(i) = init_ms {
        s.push_str(&format!("\tInit Duration: {i:.2} ms"));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_checks() {
        assert!(Control::check_payload(b"", false).is_ok());
        assert!(Control::check_payload(b"{\"a\": 1}", false).is_ok());
        assert!(matches!(
            Control::check_payload(b"{nope", false),
            Err(ControlError::InvalidRequestContent(_))
        ));
        let big = format!("\"{}\"", "a".repeat(spore_core::MAX_ASYNC_PAYLOAD)).into_bytes();
        assert!(Control::check_payload(&big, false).is_ok());
        assert!(matches!(
            Control::check_payload(&big, true),
            Err(ControlError::RequestTooLarge { .. })
        ));
    }

    #[test]
    fn report_block_shape() {
        let err = FunctionError::platform("Sandbox.Timedout", "Task timed out after 1.00 seconds");
        let b = report_block(
            "r1",
            "3",
            "hello",
            12.3,
            128,
            Some(20),
            Some(40.0),
            Some(&err),
            false,
        );
        assert!(b.starts_with("START RequestId: r1 Version: 3\n"));
        assert!(b.contains("hello\n[ERROR] Sandbox.Timedout"));
        assert!(b.contains("Init Duration: 40.00 ms"));
        assert!(b.contains("Max Memory Used: 20 MB"));
        // A runtime that logged its error itself gets no second line.
        let b = report_block(
            "r1",
            "$LATEST",
            "[ERROR] X: y\n",
            1.0,
            128,
            None,
            None,
            Some(&err),
            true,
        );
        assert_eq!(b.matches("[ERROR]").count(), 1, "{b}");
    }
}
