//! Running a DAG node by node over HTTP through the gateway (the baseline), or through the
//! control plane's own invocation path when nodes run on other units (relayed).

use std::time::Duration;

use spore_auth::Credentials;
use spore_core::{ControlError, FunctionError, StartKind};

use crate::*;

/// An HTTP hop's answer.
struct HttpReply {
    body: Vec<u8>,
    start: StartKind,
    handler_ns: (u64, u64),
    unit: Option<u32>,
}

/// One hop through the control plane's own invocation path (local, or relayed to a unit).
async fn direct_hop(
    control: &Dags,
    function: &str,
    unit: Option<u32>,
    event: Vec<u8>,
) -> Result<HttpReply, FunctionError> {
    let opts = spore_core::InvokeOptions {
        unit,
        ..Default::default()
    };
    let invoker = control.inner.invoker.get().cloned().ok_or_else(|| {
        FunctionError::platform("Spore.DagHop", "no invocation path is set for relayed DAGs")
    })?;
    let inv = invoker
        .invoke(function.to_owned(), event.into(), opts)
        .await
        .map_err(|e| FunctionError::platform("Spore.DagHop", e.to_string()))?;
    Ok(HttpReply {
        body: inv.outcome?,
        start: inv.start,
        handler_ns: inv.handler_ns,
        unit: Some(inv.unit),
    })
}

impl Dags {
    /// Where the gateway listens, for DAG hops over HTTP.
    pub fn set_gateway_url(&self, url: String) {
        *self.inner.gateway_url.lock().expect("gateway url lock") = Some(url);
    }

    /// The key DAG hops over HTTP sign their calls to the gateway with (None: unsigned, for
    /// a gateway without authentication).
    pub fn set_gateway_credentials(&self, creds: Option<Credentials>) {
        *self.inner.gateway_creds.lock().expect("gateway creds lock") = creds;
    }

    /// Runs node by node: each hop over HTTP through the gateway, or (`direct`) through this
    /// control plane's invocation path, which relays to other units over their links.
    pub(crate) async fn run_http(
        &self,
        plan: &Plan,
        input: &[u8],
        direct: bool,
    ) -> Result<(Result<Vec<u8>, NodeFailure>, bool, Vec<NodeRun>), ControlError> {
        let base = self
            .inner
            .gateway_url
            .lock()
            .expect("gateway url lock")
            .clone();
        let base = match (base, direct) {
            (_, true) => String::new(),
            (Some(b), false) => b,
            (None, false) => return Err(ControlError::Unavailable(
                "the http transport posts every hop to the gateway, which this daemon does not run"
                    .into(),
            )),
        };
        let n_nodes = plan.spec.nodes.len();
        // Per node: the JSON output of each instance, in order, once all finished.
        let mut outputs: Vec<Option<Vec<Vec<u8>>>> = vec![None; n_nodes];
        let mut partial: Vec<Vec<Option<Vec<u8>>>> = vec![Vec::new(); n_nodes];
        let mut ends: Vec<Vec<u64>> = vec![Vec::new(); n_nodes];
        let mut started = vec![false; n_nodes];
        let mut runs = Vec::new();
        let mut tasks = JoinSet::new();
        loop {
            for &n in &plan.order {
                if started[n] || !plan.preds[n].iter().all(|&p| outputs[p].is_some()) {
                    continue;
                }
                started[n] = true;
                let events = match http_events(plan, n, input, &outputs) {
                    Ok(e) => e,
                    Err(e) => return Ok((Err(plan.failure(n, e)), false, runs)),
                };
                partial[n] = vec![None; events.len()];
                if events.is_empty() {
                    outputs[n] = Some(Vec::new());
                    continue;
                }
                for (j, event) in events.into_iter().enumerate() {
                    let url = format!(
                        "{base}/2015-03-31/functions/{}/invocations",
                        plan.spec.nodes[n].function
                    );
                    let client = self.inner.http.clone();
                    let creds = self
                        .inner
                        .gateway_creds
                        .lock()
                        .expect("gateway creds lock")
                        .clone();
                    let timeout = plan.timeout(n) + Duration::from_secs(30);
                    if direct {
                        let me = self.clone();
                        let (function, unit) =
                            (plan.spec.nodes[n].function.clone(), plan.spec.nodes[n].unit);
                        tasks.spawn(async move {
                            (n, j, direct_hop(&me, &function, unit, event).await)
                        });
                    } else {
                        tasks.spawn(async move {
                            (
                                n,
                                j,
                                http_hop(&client, &url, creds.as_ref(), event, timeout).await,
                            )
                        });
                    }
                }
            }
            let Some(r) = tasks.join_next().await else {
                break;
            };
            let (n, j, r) = r.map_err(|e| ControlError::Internal(format!("http hop task: {e}")))?;
            match r {
                Err(e) => return Ok((Err(plan.failure(n, e)), false, runs)),
                Ok(reply) => {
                    let mut run = plan.node_run(n, j, reply.start, reply.handler_ns, None);
                    run.unit = reply.unit.unwrap_or(plan.unit);
                    runs.push(run);
                    partial[n][j] = Some(reply.body);
                    ends[n].push(reply.handler_ns.1);
                    if partial[n].iter().all(Option::is_some) {
                        outputs[n] = Some(
                            std::mem::take(&mut partial[n])
                                .into_iter()
                                .flatten()
                                .collect(),
                        );
                    }
                }
            }
        }
        fill_hops(plan, &ends, &mut runs);
        let sink = outputs[plan.sink].take().unwrap_or_default();
        let out = if plan.each(plan.sink) {
            json_list(sink.iter().map(|b| (PayloadKind::Json, b.as_slice())))
        } else {
            sink.into_iter().next().ok_or_else(|| {
                FunctionError::platform("Spore.DagResult", "the sink returned no value")
            })
        };
        Ok((out.map_err(|e| plan.failure(plan.sink, e)), false, runs))
    }
}

/// The events of node `n`'s instances, built from its predecessors' JSON outputs.
fn http_events(
    plan: &Plan,
    n: usize,
    input: &[u8],
    outputs: &[Option<Vec<Vec<u8>>>],
) -> Result<Vec<Vec<u8>>, FunctionError> {
    let out = |p: usize| outputs[p].as_ref().expect("predecessor finished");
    if plan.preds[n].is_empty() {
        return Ok(vec![input.to_vec()]);
    }
    if plan.each(n) {
        let p = plan.preds[n][0];
        let mut elements = Vec::new();
        for o in out(p) {
            let v: Vec<serde_json::Value> = serde_json::from_slice(o).map_err(|_| {
                FunctionError::platform(
                    "Spore.DagEachInput",
                    format!(
                        "the node runs once per element, but node {:?} did not return a list",
                        plan.id(p)
                    ),
                )
            })?;
            elements.extend(
                v.iter()
                    .map(|e| serde_json::to_vec(e).expect("a parsed value serializes")),
            );
        }
        if elements.len() > MAX_FANOUT {
            return Err(FunctionError::platform(
                "Spore.DagFanOutTooLarge",
                format!("node {:?} returned a list of {} elements; an `each` node runs at most {MAX_FANOUT} instances", plan.id(p), elements.len()),
            ));
        }
        return Ok(elements);
    }
    let mut parts = Vec::new();
    for &p in &plan.preds[n] {
        let o = out(p);
        parts.push(if plan.each(p) {
            json_list(o.iter().map(|b| (PayloadKind::Json, b.as_slice())))?
        } else {
            o.first().cloned().unwrap_or_default()
        });
    }
    Ok(vec![if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        json_list(parts.iter().map(|b| (PayloadKind::Json, b.as_slice())))?
    }])
}

/// One hop over HTTP: the Invoke API, as any client would call it.
async fn http_hop(
    client: &reqwest::Client,
    url: &str,
    creds: Option<&Credentials>,
    event: Vec<u8>,
    timeout: Duration,
) -> Result<HttpReply, FunctionError> {
    let platform = |msg: String| FunctionError::platform("Spore.DagHttpHop", msg);
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .body(event)
        .timeout(timeout)
        .build()
        .map_err(|e| platform(format!("POST {url}: {}", spore_core::error_chain(&e))))?;
    if let Some(c) = creds {
        sign(&mut req, c);
    }
    let resp = client
        .execute(req)
        .await
        .map_err(|e| platform(format!("POST {url}: {}", spore_core::error_chain(&e))))?;
    let status = resp.status();
    let header = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let failed = header("x-amz-function-error").is_some();
    let start = match header("x-spore-start").as_deref() {
        Some("cold") => StartKind::Cold,
        Some("fork") => StartKind::Fork,
        Some("restore") => StartKind::Restore,
        _ => StartKind::Warm,
    };
    let ns = |k: &str| header(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let handler_ns = (ns("x-spore-handler-start-ns"), ns("x-spore-handler-end-ns"));
    let unit = header("x-spore-unit").and_then(|u| u.parse().ok());
    let body = resp
        .bytes()
        .await
        .map_err(|e| platform(format!("reading the reply of {url}: {e}")))?
        .to_vec();
    if failed {
        #[derive(serde::Deserialize)]
        struct LambdaError {
            #[serde(rename = "errorMessage")]
            message: String,
            #[serde(rename = "errorType")]
            error_type: String,
            #[serde(rename = "stackTrace", default)]
            stack_trace: Vec<String>,
        }
        let e: LambdaError = serde_json::from_slice(&body)
            .map_err(|_| platform(format!("unreadable error from {url}")))?;
        return Err(FunctionError {
            stack_trace: e.stack_trace,
            ..FunctionError::platform(&e.error_type, e.message)
        });
    }
    if !status.is_success() {
        return Err(platform(format!(
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(HttpReply {
        body,
        start,
        handler_ns,
        unit,
    })
}

/// Signs `req` with `creds` (AWS Signature Version 4, service `lambda`, Spore's default
/// region), over its final method, address, headers and body.
fn sign(req: &mut reqwest::Request, creds: &Credentials) {
    let body = req.body().and_then(|b| b.as_bytes()).unwrap_or_default();
    let added = spore_auth::sigv4::sign_http(
        req.method(),
        req.url().as_str(),
        req.headers(),
        body,
        creds,
        std::time::SystemTime::now(),
    );
    req.headers_mut().extend(added);
}
