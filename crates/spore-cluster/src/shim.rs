//! A shim's side: a unit's daemon dials the control plane, serves its calls (invoke, deploy,
//! remove, sync, DAG segments) with the unit's own control plane, and takes neighbour links
//! from other shims for DAG values.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use spore_core::{ControlError, InvokeOptions};
use spore_registry::{FunctionSpec, SharedRegistry};
use spore_shim::link;
use spore_shim::{Answer, Call, LinkError, Message, RemoteError, RemoteErrorKind, Role, Service};

use crate::calls::{accept_each, answer_message, control_to_remote, parse_call};
use crate::units::EtcdView;
use crate::{SegmentHost, UnitHost, Units};

impl Units {
    /// Runs as a shim: takes neighbour links from other shims on `listener` and puts the DAG
    /// values they send on this unit's segments.
    pub async fn serve_neighbours(
        self: &Arc<Self>,
        host: Arc<dyn UnitHost>,
        segments: Arc<dyn SegmentHost>,
        listener: tokio::net::TcpListener,
    ) {
        accept_each(listener, "a neighbour link", |stream, peer| {
            let (units, host, segments) = (self.clone(), host.clone(), segments.clone());
            async move {
                let local_id = units.local.id;
                let r = link::accept(
                    stream,
                    units.local.clone(),
                    Role::Shim,
                    units.link_cfg.clone(),
                    |hello| {
                        if hello.role != Role::Shim || hello.unit.id == local_id {
                            return Err(format!(
                                "unit {local_id} takes neighbour links from other units' shims only"
                            ));
                        }
                        Ok(Arc::new(ShimSide {
                            host: host.clone(),
                            registry: units.registry.clone(),
                            synced: Arc::new(Mutex::new(HashMap::new())),
                            deploying: Arc::new(tokio::sync::Mutex::new(())),
                            segments: segments.clone(),
                            neighbour: true,
                        }) as Arc<dyn Service>)
                    },
                )
                .await;
                match r {
                    Ok(link) => {
                        tracing::info!(unit = link.peer().id, %peer, "neighbour link accepted");
                        let reason = link.closed().await;
                        tracing::info!(unit = link.peer().id, %reason, "neighbour link closed");
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "a neighbour's greeting failed"),
                }
            }
        })
        .await
    }

    /// Runs this daemon as a unit's shim: dials the control plane at `control` (`HOST:PORT`),
    /// serves its calls, and dials again with backoff whenever the link drops, until
    /// `stop` fires.
    pub async fn run_shim(
        &self,
        host: Arc<dyn UnitHost>,
        segments: Arc<dyn SegmentHost>,
        control: Option<String>,
        etcd: Option<crate::etcd::Etcd>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let units = self;
        if let Some(client) = &etcd {
            let info = serde_json::to_string(&units.local).expect("unit info serializes");
            let registration = crate::etcd::Registration::start(
                client.clone(),
                [(format!("units/{}", units.local.id), info)]
                    .into_iter()
                    .collect(),
                stop.clone(),
            );
            *units.etcd.lock().expect("etcd lock") = Some(EtcdView {
                placements: None,
                registration,
                members: None,
            });
        }
        let mut backoff = Duration::from_millis(100);
        let mut announced_failure = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let attempt = async {
                let control = match (&control, &etcd) {
                    (Some(c), _) => c.clone(),
                    (None, Some(client)) => discover(client).await?,
                    (None, None) => {
                        return Err(LinkError::Handshake(
                            "no control plane address: give --control or --etcd".into(),
                        ))
                    }
                };
                let s = tokio::net::TcpStream::connect(&control)
                    .await
                    .map_err(|e| LinkError::Handshake(format!("connecting to {control}: {e}")))?;
                let _ = s.set_nodelay(true);
                let link = link::connect(
                    s,
                    units.local.clone(),
                    Role::Shim,
                    Arc::new(ShimSide {
                        host: host.clone(),
                        registry: units.registry.clone(),
                        synced: Arc::new(Mutex::new(HashMap::new())),
                        deploying: Arc::new(tokio::sync::Mutex::new(())),
                        segments: segments.clone(),
                        neighbour: false,
                    }),
                    units.link_cfg.clone(),
                )
                .await?;
                segments.set_link(link.clone());
                Ok(link)
            };
            match attempt.await {
                Ok(link) => {
                    tracing::info!(unit = units.local.id, peer = %link.peer().id, "registered with the control plane");
                    backoff = Duration::from_millis(100);
                    announced_failure = false;
                    tokio::select! {
                        reason = link.closed() => {
                            tracing::warn!(%reason, "link to the control plane lost; dialing again");
                            // Its DAG segments served the control plane over this link.
                            segments.clear();
                        }
                        _ = stop.changed() => {
                            link.close(&format!("unit {} is shutting down", units.local.id));
                            // Let the GoAway go out.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                    }
                }
                Err(e) => {
                    if !announced_failure {
                        tracing::warn!(error = %e, "cannot reach the control plane; retrying");
                        announced_failure = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(3));
        }
    }
}

/// The control plane's link address, as it announced it in etcd.
async fn discover(client: &crate::etcd::Etcd) -> Result<String, LinkError> {
    let v = client
        .get("control")
        .await
        .map_err(|e| LinkError::Handshake(e.to_string()))?
        .ok_or_else(|| {
            LinkError::Handshake(format!(
                "no control plane is registered in etcd ({} is empty)",
                client.key("control")
            ))
        })?;
    let v: serde_json::Value = serde_json::from_str(&v)
        .map_err(|e| LinkError::Handshake(format!("{}: {e}", client.key("control"))))?;
    v["link"].as_str().map(str::to_owned).ok_or_else(|| {
        LinkError::Handshake(format!("{} has no link address", client.key("control")))
    })
}

/// A shim's side of its link: serves the control plane's calls with the unit's own host.
struct ShimSide {
    host: Arc<dyn UnitHost>,
    registry: SharedRegistry,
    /// Per function: the control plane's code id and manifest this unit holds.
    synced: Synced,
    /// Held while a package is installed.
    deploying: Arc<tokio::sync::Mutex<()>>,
    /// Its segments of spread DAG pipelines.
    segments: Arc<dyn SegmentHost>,
    /// The link comes from another shim (a neighbour): it carries DAG values only.
    neighbour: bool,
}

impl Service for ShimSide {
    fn call(
        &self,
        msg: Message,
    ) -> Pin<Box<dyn Future<Output = Result<Message, RemoteError>> + Send + 'static>> {
        let (host, registry) = (self.host.clone(), self.registry.clone());
        let synced = self.synced.clone();
        let deploying = self.deploying.clone();
        let segments = self.segments.clone();
        let neighbour = self.neighbour;
        Box::pin(async move {
            let call = parse_call(&msg)?;
            if neighbour && !matches!(call, Call::EdgeValue { .. }) {
                return Err(RemoteError::new(
                    RemoteErrorKind::BadCall,
                    "a neighbour link carries DAG values only",
                ));
            }
            let (answer, body) =
                serve(host, registry, synced, deploying, segments, call, msg.body).await?;
            Ok(answer_message(&answer, body))
        })
    }

    fn load(&self) -> Bytes {
        serde_json::to_vec(&self.host.load())
            .expect("load serializes")
            .into()
    }
}

type Synced = Arc<Mutex<HashMap<String, (String, spore_core::FunctionManifest)>>>;

async fn serve(
    host: Arc<dyn UnitHost>,
    registry: SharedRegistry,
    synced: Synced,
    deploying: Arc<tokio::sync::Mutex<()>>,
    segments: Arc<dyn SegmentHost>,
    call: Call,
    body: Bytes,
) -> Result<(Answer, Bytes), RemoteError> {
    match call {
        Call::Echo => Ok((Answer::Echoed, body)),
        Call::SegmentOpen {
            key,
            spec,
            units,
            functions,
            neighbours,
        } => {
            for (m, code) in &functions {
                let holds = synced
                    .lock()
                    .expect("synced lock")
                    .get(&m.name)
                    .is_some_and(|(c, mm)| c == code && mm == m);
                if !holds {
                    return Err(RemoteError::new(
                        RemoteErrorKind::NeedsCode,
                        format!("this unit does not hold {} at code {code}", m.name),
                    ));
                }
            }
            let answer = segments
                .open(key, spec, units, functions, neighbours)
                .await
                .map_err(control_to_remote)?;
            Ok((answer, Bytes::new()))
        }
        Call::EdgeValue {
            key,
            seq,
            edge,
            raw,
            deadline_ms,
            request_id,
            ..
        } => {
            let value = spore_ipc::edge::Value {
                raw,
                bytes: body.to_vec(),
            };
            segments
                .deliver(&key, seq, edge, value, deadline_ms, &request_id)
                .await
                .map_err(control_to_remote)?;
            Ok((Answer::Done, Bytes::new()))
        }
        Call::SegmentClose { key } => {
            segments.close(&key).await;
            Ok((Answer::Done, Bytes::new()))
        }
        Call::SegmentTimes { .. } | Call::SegmentFailed { .. } => Err(RemoteError::new(
            RemoteErrorKind::BadCall,
            "a unit takes DAG reports from no one; they go to the control plane",
        )),
        Call::Invoke {
            manifest,
            code,
            force_cold,
            cold_path,
            restore_mode,
        } => {
            let t0 = std::time::Instant::now();
            let name = manifest.name.clone();
            let holds = synced
                .lock()
                .expect("synced lock")
                .get(&name)
                .is_some_and(|(c, m)| *c == code && *m == manifest);
            if !holds {
                return Err(RemoteError::new(
                    RemoteErrorKind::NeedsCode,
                    format!("this unit does not hold {name} at code {code}"),
                ));
            }
            let restore_mode = restore_mode
                .map(|m| m.parse())
                .transpose()
                .map_err(|e| RemoteError::new(RemoteErrorKind::InvalidParameter, e))?;
            let inv = host
                .invoke(
                    name,
                    body,
                    InvokeOptions {
                        force_cold,
                        cold_path,
                        restore_mode,
                        unit: None,
                    },
                )
                .await
                .map_err(control_to_remote)?;
            let (error, out) = match inv.outcome {
                Ok(b) => (None, Bytes::from(b)),
                Err(e) => (Some(e), Bytes::new()),
            };
            let answer = Answer::Invoked {
                request_id: inv.request_id,
                start: inv.start,
                init_ms: inv.init_ms,
                total_ms: t0.elapsed().as_secs_f64() * 1000.0,
                error,
                log: inv.log,
                breakdown: inv.breakdown,
                to_handler_ms: inv.to_handler_ms,
                handler_ns: inv.handler_ns,
            };
            Ok((answer, out))
        }
        Call::Deploy {
            manifest,
            description,
            code,
        } => {
            let name = manifest.name.clone();
            let spec = FunctionSpec {
                manifest: manifest.clone(),
                description,
            };
            let h = host.clone();
            // Concurrent first calls may each bring the package: one installs it at a time,
            // and the others find it there and change nothing (a change would retire the
            // instances the first one started).
            let _one = deploying.lock().await;
            let rec = tokio::task::spawn_blocking(move || h.install(spec, &body))
                .await
                .map_err(|e| RemoteError::new(RemoteErrorKind::Internal, e.to_string()))?
                .map_err(control_to_remote)?;
            synced
                .lock()
                .expect("synced lock")
                .insert(name.clone(), (code, manifest));
            host.prewarm(&name);
            Ok((
                Answer::Deployed {
                    revision: rec.revision,
                },
                Bytes::new(),
            ))
        }
        Call::Remove { function } => {
            synced.lock().expect("synced lock").remove(&function);
            match host.remove(&function) {
                Ok(()) | Err(ControlError::NotFound(_)) => Ok((Answer::Removed, Bytes::new())),
                Err(e) => Err(control_to_remote(e)),
            }
        }
        Call::Sync { functions } => {
            let keep: std::collections::HashSet<String> = functions.into_iter().collect();
            let mut removed = Vec::new();
            for rec in registry.list() {
                let name = rec.manifest.name;
                if !keep.contains(&name) && host.remove(&name).is_ok() {
                    removed.push(name);
                }
            }
            synced
                .lock()
                .expect("synced lock")
                .retain(|n, _| keep.contains(n));
            Ok((Answer::Synced { removed }, Bytes::new()))
        }
    }
}
