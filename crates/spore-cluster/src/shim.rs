//! A shim's side: a unit's daemon joins the cluster (once, with a token), dials the control
//! plane over mutual TLS, serves its calls (invoke, deploy, remove, sync, DAG segments) with
//! the unit's own control plane, and takes and dials neighbour links (the same TLS) with
//! other shims for DAG values.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use spore_core::{ControlError, InvokeOptions};
use spore_registry::{FunctionSpec, SharedRegistry};
use spore_shim::link;
use spore_shim::{
    Answer, Call, Link, LinkError, Message, NoCalls, RemoteError, RemoteErrorKind, Role, Service,
};

use crate::calls::{accept_each, answer_message, control_to_remote, parse_call};
use crate::pki::UnitCredentials;
use crate::tls::{Peer, UnitTls};
use crate::tokens::JoinToken;
use crate::units::EtcdView;
use crate::{SegmentHost, UnitHost, Units};

/// What a shim needs to prove who it is: its data dir (where its certificate is, or goes)
/// and, until it has joined, a join token.
#[derive(Debug, Clone)]
pub struct ShimCredentials {
    /// The shim's data dir.
    pub data_dir: PathBuf,
    /// The token to join with, if the shim has no certificate for its unit yet (or should
    /// get a new one: the token names another CA, or the certificate expires within 30 days).
    pub token: Option<JoinToken>,
}

/// A stored certificate this close to its expiry is renewed by joining again (with a token).
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

impl ShimCredentials {
    /// The stored credentials if they serve unit `unit` as they are; the error says what
    /// to do when there are none and no token to join with.
    pub fn usable(&self, unit: u32) -> Result<Option<UnitCredentials>, String> {
        let stored = UnitCredentials::load(&self.data_dir).map_err(|e| crate::error_chain(&e))?;
        let why_not = match &stored {
            None => format!(
                "no unit certificate in {}",
                self.data_dir.join("cluster").display()
            ),
            Some(c) if c.unit != unit => format!(
                "the certificate in {} is unit {}'s, not unit {unit}'s",
                self.data_dir.join("cluster").display(),
                c.unit
            ),
            Some(c) => {
                let renew = c.not_after().is_none_or(|t| {
                    t.duration_since(std::time::SystemTime::now())
                        .map_or(true, |left| left < RENEW_BEFORE)
                });
                let other_ca = self
                    .token
                    .as_ref()
                    .is_some_and(|t| t.ca_fingerprint != c.ca_fingerprint());
                if !(renew || other_ca) {
                    return Ok(stored);
                }
                if self.token.is_none() {
                    tracing::warn!(unit, "the unit certificate expires within 30 days: give --join TOKEN to renew it");
                    return Ok(stored);
                }
                return Ok(None);
            }
        };
        match self.token {
            Some(_) => Ok(None),
            None => Err(format!(
                "{why_not}: give --join TOKEN (`spore cluster token` on the control plane's host prints one)"
            )),
        }
    }
}

impl Units {
    /// Runs as a shim: takes neighbour links from other shims on `listener` (mutual TLS
    /// with this unit's certificate) and puts the DAG values they send on this unit's
    /// segments.
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
                let Some(tls) = units.unit_tls() else {
                    tracing::warn!(%peer, "a neighbour link before this unit joined the cluster: dropped");
                    return;
                };
                let (stream, cert_unit) = match tls.accept(stream, units.link_cfg.hello_timeout).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, reason = %e, "a neighbour's connection refused");
                        return;
                    }
                };
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
                        crate::tls::check_claim(hello.unit.id, cert_unit)?;
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

    /// This shim's TLS, once it holds a unit certificate.
    pub(crate) fn unit_tls(&self) -> Option<Arc<UnitTls>> {
        self.unit_tls.lock().expect("unit tls lock").clone()
    }

    /// Dials unit `unit`'s shim at `addr` for a neighbour link (mutual TLS: the far side
    /// must hold unit `unit`'s certificate).
    pub async fn dial_neighbour(&self, unit: u32, addr: &str) -> Result<Link, LinkError> {
        let tls = self.unit_tls().ok_or_else(|| {
            LinkError::Handshake("this unit has not joined the cluster yet".into())
        })?;
        let s = tls
            .dial(addr, Peer::Unit(unit), self.link_cfg.hello_timeout)
            .await?;
        let link = link::connect(
            s,
            self.local.clone(),
            Role::Shim,
            Arc::new(NoCalls),
            self.link_cfg.clone(),
        )
        .await?;
        if link.peer().id != unit {
            link.close("not the unit dialed");
            return Err(LinkError::Handshake(format!(
                "{addr} is unit {}, not unit {unit}",
                link.peer().id
            )));
        }
        Ok(link)
    }

    /// This shim's TLS: from its stored certificate, or by joining the control plane at
    /// `control` with the token first.
    async fn ensure_tls(
        &self,
        creds: &ShimCredentials,
        control: &str,
    ) -> Result<Arc<UnitTls>, LinkError> {
        if let Some(t) = self.unit_tls() {
            return Ok(t);
        }
        let id = self.local.id;
        let setup = |e: String| LinkError::Handshake(e);
        let stored = creds.usable(id).map_err(setup)?;
        let c = match (stored, &creds.token) {
            (Some(c), _) => c,
            (None, Some(token)) => {
                let c = crate::tls::join(
                    &creds.data_dir,
                    control,
                    token,
                    id,
                    self.link_cfg.hello_timeout,
                )
                .await?;
                tracing::info!(unit = id, token = %token.id, control, "joined the cluster: unit certificate stored");
                c
            }
            (None, None) => unreachable!("usable() refuses this"),
        };
        let tls = Arc::new(UnitTls::new(&c).map_err(|e| setup(crate::error_chain(&e)))?);
        *self.unit_tls.lock().expect("unit tls lock") = Some(tls.clone());
        Ok(tls)
    }

    /// Runs this daemon as a unit's shim: dials the control plane at `control` (`HOST:PORT`,
    /// or where etcd says it is), joins the cluster first if it has no certificate yet,
    /// serves the control plane's calls, and dials again with backoff whenever the link
    /// drops, until `stop` fires.
    pub async fn run_shim(
        &self,
        host: Arc<dyn UnitHost>,
        segments: Arc<dyn SegmentHost>,
        control: Option<String>,
        etcd: Option<crate::etcd::Etcd>,
        creds: ShimCredentials,
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
        let mut last_failure = String::new();
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
                let tls = units.ensure_tls(&creds, &control).await?;
                let s = tls
                    .dial(&control, Peer::Control, units.link_cfg.hello_timeout)
                    .await?;
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
                    last_failure.clear();
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
                    // Each new reason once (a refusal, then the control plane down, ...).
                    let why = e.to_string();
                    if why != last_failure {
                        tracing::warn!(error = %why, "cannot link to the control plane; retrying");
                        last_failure = why;
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
                        // Not carried to other units yet.
                        client_context: None,
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
                lambda: Default::default(),
                layers: None,
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
