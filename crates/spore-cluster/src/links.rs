//! The control plane's side of unit links: accepting shims' links (and their reports to
//! spread DAG pipelines), relaying invocations and code to units, etcd membership, probes.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use spore_core::{ControlError, Invocation, InvokeOptions};
use spore_registry::FunctionRecord;
use spore_shim::link;
use spore_shim::{
    Answer, Call, Link, LinkError, Message, RemoteError, RemoteErrorKind, Role, Service, UnitInfo,
    UnitLoad,
};

use crate::calls::{accept_each, answer_message, parse_call, remote_to_control};
use crate::tls::{ControlTls, Incoming};
use crate::units::{EtcdView, UnitStatus};
use crate::{SegmentEvent, UnitHost, Units};

/// Extra time a relayed invocation gets over the function's timeout (start-up, transfer).
const RELAY_SLACK: Duration = Duration::from_secs(30);
/// Time allowed for a code package to reach a unit.
pub(crate) const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);

/// The control plane's side of a unit's link: takes its heartbeats.
struct UnitSide {
    units: Arc<Units>,
    id: u32,
}

impl Service for UnitSide {
    fn call(
        &self,
        msg: Message,
    ) -> Pin<Box<dyn Future<Output = Result<Message, RemoteError>> + Send + 'static>> {
        // Units report to spread DAG pipelines' routers; they make no other calls.
        let units = self.units.clone();
        let id = self.id;
        Box::pin(async move {
            let call = parse_call(&msg)?;
            let (key, ev) = match call {
                Call::EdgeValue {
                    key,
                    seq,
                    edge,
                    raw,
                    deadline_ms,
                    request_id,
                    times,
                } => {
                    let value = spore_ipc::edge::Value {
                        raw,
                        bytes: msg.body.to_vec(),
                    };
                    let ev = SegmentEvent::Value {
                        seq,
                        deadline_ms,
                        request_id,
                        edge,
                        value,
                        times,
                    };
                    (key, ev)
                }
                Call::SegmentTimes { key, seq, times } => (key, SegmentEvent::Times { seq, times }),
                Call::SegmentFailed {
                    key,
                    seq,
                    node,
                    error,
                } => (key, SegmentEvent::Failed { seq, node, error }),
                other => {
                    return Err(RemoteError::new(
                        RemoteErrorKind::BadCall,
                        format!("a control plane does not serve {other:?} from unit {id}"),
                    ))
                }
            };
            if !units.deliver(&key, ev) {
                // The pipeline is gone (failed or stopped); the unit's report is moot.
                tracing::debug!(unit = id, %key, "a report for a stopped DAG pipeline");
            }
            Ok(answer_message(&Answer::Done, Bytes::new()))
        })
    }

    fn heartbeat(&self, load: Bytes) {
        if let Ok(l) = serde_json::from_slice::<UnitLoad>(&load) {
            self.units.record_load(self.id, l);
        }
    }
}

impl Units {
    /// Every unit and its state; `local_load` is this unit's own load.
    pub fn unit_statuses(&self, local_load: UnitLoad) -> Vec<UnitStatus> {
        let mut s = self.statuses();
        if let Some(first) = s.first_mut() {
            first.load = local_load;
        }
        // Pinned functions are listed on their unit too.
        for rec in self.registry.list() {
            let Some(u) = rec.manifest.unit else { continue };
            if let Some(st) = s.iter_mut().find(|st| st.info.id == u) {
                if !st.functions.contains(&rec.manifest.name) {
                    st.functions.push(rec.manifest.name);
                    st.functions.sort();
                }
            }
        }
        s
    }

    /// Joins the cluster in etcd as its control plane: announces `link` (the link listener's
    /// address) under a lease, reads back where functions were placed before a restart, and
    /// follows unit membership, until `stop` fires.
    pub async fn join_etcd(
        &self,
        client: crate::etcd::Etcd,
        link: String,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        match client.list("placement").await {
            Ok(placements) => {
                let known: std::collections::HashSet<String> = self
                    .registry
                    .list()
                    .into_iter()
                    .map(|r| r.manifest.name)
                    .collect();
                let mut n = 0;
                for (f, u) in placements {
                    if let (true, Ok(u)) = (known.contains(&f), u.parse::<u32>()) {
                        self.restore_placement(f, u);
                        n += 1;
                    }
                }
                if n > 0 {
                    tracing::info!(placements = n, "placements read back from etcd");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading placements from etcd"),
        }
        let value = serde_json::json!({ "link": link, "unit": self.local.id }).to_string();
        let registration = crate::etcd::Registration::start(
            client.clone(),
            [("control".to_owned(), value)].into_iter().collect(),
            stop.clone(),
        );
        *self.etcd.lock().expect("etcd lock") = Some(EtcdView {
            placements: Some(client.clone()),
            registration,
            members: None,
        });
        let units = self;
        let mut stop = stop;
        loop {
            let members = client.list("units").await.ok().map(|m| {
                m.into_iter()
                    .filter_map(|(k, v)| {
                        Some((
                            k.parse::<u32>().ok()?,
                            serde_json::from_str::<UnitInfo>(&v).ok()?,
                        ))
                    })
                    .collect::<BTreeMap<u32, UnitInfo>>()
            });
            if let Some(v) = units.etcd.lock().expect("etcd lock").as_mut() {
                v.members = members;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Accepts shims' links and joins on `listener` until the daemon stops (`host` says
    /// when it is shutting down), over mutual TLS (`tls`); forgets units down for longer
    /// than `unit_grace`.
    pub async fn serve_links(
        self: &Arc<Self>,
        host: Arc<dyn UnitHost>,
        listener: tokio::net::TcpListener,
        tls: Arc<ControlTls>,
        unit_grace: Duration,
    ) {
        let units = Arc::downgrade(self);
        tokio::spawn(async move {
            let tick = (unit_grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
            loop {
                tokio::time::sleep(tick).await;
                let Some(units) = units.upgrade() else { return };
                for id in units.forget_down(unit_grace) {
                    tracing::info!(
                        unit = id,
                        grace_s = unit_grace.as_secs_f64(),
                        "unit down longer than the grace period: forgotten"
                    );
                }
            }
        });
        accept_each(listener, "a unit link", |stream, peer| {
            let (units, host, tls) = (self.clone(), host.clone(), tls.clone());
            async move {
                let timeout = units.link_cfg.hello_timeout;
                match tls.accept(stream, timeout).await {
                    Err(e) => {
                        tracing::warn!(%peer, reason = %e, "a connection to the link port refused")
                    }
                    Ok(Incoming::Join(s)) => units.serve_join(s, peer, &tls).await,
                    Ok(Incoming::Link { stream, unit }) => {
                        units.serve_unit(stream, unit, peer, host).await
                    }
                }
            }
        })
        .await
    }

    /// One join: a shim presents its token and gets its unit certificate.
    async fn serve_join(
        &self,
        stream: tokio_rustls::server::TlsStream<crate::tls::Wire>,
        peer: std::net::SocketAddr,
        tls: &ControlTls,
    ) {
        let r = spore_shim::join::serve(stream, self.link_cfg.hello_timeout, |req| async move {
            if let Some(why) = self.already_up(req.unit) {
                return Err(why);
            }
            let (answer, token) = tls.grant(&req)?;
            tracing::info!(unit = req.unit, %peer, token, "unit joined: certificate issued");
            Ok(answer)
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(%peer, reason = %e, "a join refused");
        }
    }

    /// One unit's link, from the greeting to its close.
    async fn serve_unit(
        self: Arc<Self>,
        stream: tokio_rustls::server::TlsStream<crate::tls::Wire>,
        cert_unit: u32,
        peer: std::net::SocketAddr,
        host: Arc<dyn UnitHost>,
    ) {
        let local_id = self.local.id;
        let units = self.clone();
        let r = link::accept(
            stream,
            self.local.clone(),
            Role::Control,
            self.link_cfg.clone(),
            |hello| {
                if hello.role != Role::Shim {
                    return Err(format!(
                        "this is a control plane; it takes links from shims, not from a {:?}",
                        hello.role
                    ));
                }
                crate::tls::check_claim(hello.unit.id, cert_unit)?;
                if hello.unit.id == local_id {
                    return Err(format!(
                        "unit {local_id} is the control plane's own; give the shim another --id"
                    ));
                }
                if host.draining() {
                    return Err("the control plane is shutting down".into());
                }
                if let Some(why) = units.already_up(hello.unit.id) {
                    return Err(why);
                }
                Ok(Arc::new(UnitSide {
                    units: units.clone(),
                    id: hello.unit.id,
                }) as Arc<dyn Service>)
            },
        )
        .await;
        let link = match r {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%peer, unit = cert_unit, error = %e, "a unit's greeting refused");
                return;
            }
        };
        let id = link.peer().id;
        if let Err(why) = self.register(link.clone(), peer.to_string()) {
            tracing::warn!(unit = id, %peer, reason = %why, "a unit's link refused");
            link.close(&why);
            return;
        }
        tracing::info!(unit = id, %peer, arch = %link.peer().arch, cores = link.peer().cores, "unit up");
        // The unit drops functions the control plane no longer has.
        let names: Vec<String> = self
            .registry
            .list()
            .into_iter()
            .map(|r| r.manifest.name)
            .collect();
        let l2 = link.clone();
        tokio::spawn(async move {
            if let Err(e) = l2
                .call(
                    &Call::Sync { functions: names },
                    Bytes::new(),
                    DEPLOY_TIMEOUT,
                )
                .await
            {
                tracing::warn!(unit = id, error = %e, "syncing the unit's functions");
            }
        });
        let reason = link.closed().await;
        self.link_closed(&link, &reason);
    }

    /// Measures the link to unit `id`: `n` echo calls of `bytes` each way, one at a time;
    /// returns each round trip in microseconds.
    pub async fn echo_unit(
        &self,
        id: u32,
        bytes: usize,
        n: usize,
    ) -> Result<Vec<f64>, ControlError> {
        const MAX_BYTES: usize = 256 << 20;
        if bytes > MAX_BYTES || n == 0 || n > 10_000 {
            return Err(ControlError::InvalidParameter(format!(
                "an echo probe takes 1..=10000 calls of at most {MAX_BYTES} bytes (got {n} of {bytes})"
            )));
        }
        let link = self
            .entries()
            .get(&id)
            .and_then(|e| e.link.clone())
            .ok_or_else(|| {
                ControlError::NotFound(format!("unit {id} (not registered, or down)"))
            })?;
        let body = Bytes::from(vec![0x5a; bytes]);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let (answer, back) = link
                .call(&Call::Echo, body.clone(), DEPLOY_TIMEOUT)
                .await
                .map_err(|e| self.link_failure("an echo probe", id, &link, e))?;
            if !matches!(answer, Answer::Echoed) || back.len() != bytes {
                return Err(ControlError::Internal(format!(
                    "unit {id} answered an echo of {bytes} bytes with {answer:?} and {} bytes",
                    back.len()
                )));
            }
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(out)
    }

    /// Tells every live unit that a function is gone (best effort: units that miss it drop
    /// the function at their next greeting).
    pub fn remove_on_units(&self, name: &str) {
        self.unplace(name);
        for link in self.live_links() {
            let call = Call::Remove {
                function: name.to_owned(),
            };
            tokio::spawn(async move {
                let _ = link.call(&call, Bytes::new(), DEPLOY_TIMEOUT).await;
            });
        }
    }

    /// Runs an invocation on another unit.
    pub async fn invoke_remote(
        &self,
        rec: &FunctionRecord,
        unit: u32,
        link: &Link,
        payload: Bytes,
        opts: InvokeOptions,
    ) -> Result<Invocation, ControlError> {
        let name = &rec.manifest.name;
        let call = Call::Invoke {
            manifest: rec.manifest.clone(),
            code: rec.code_hex.clone(),
            force_cold: opts.force_cold,
            cold_path: opts.cold_path,
            restore_mode: opts.restore_mode.map(|m| m.as_str().to_owned()),
        };
        let timeout = Duration::from_secs(u64::from(rec.manifest.timeout_s)) + RELAY_SLACK;
        let t0 = Instant::now();
        let mut deployed = false;
        let (answer, out) = loop {
            match link.call(&call, payload.clone(), timeout).await {
                Ok(r) => break r,
                Err(LinkError::Remote(e)) if e.kind == RemoteErrorKind::NeedsCode && !deployed => {
                    deployed = true;
                    self.deploy_to(rec, unit, link).await?;
                }
                Err(e) => return Err(self.link_failure(name, unit, link, e)),
            }
        };
        let Answer::Invoked {
            request_id,
            start,
            init_ms,
            total_ms: unit_ms,
            error,
            log,
            mut breakdown,
            to_handler_ms,
            handler_ns,
        } = answer
        else {
            return Err(ControlError::Internal(format!(
                "unit {unit} answered an invocation of {name} with {answer:?}"
            )));
        };
        let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
        // Where a relayed invocation's time went: on the unit, and over the link and relay.
        breakdown.push(("unit".into(), unit_ms));
        breakdown.push(("relay".into(), total_ms - unit_ms));
        Ok(Invocation {
            request_id,
            start,
            init_ms,
            total_ms,
            outcome: match error {
                None => Ok(out.to_vec()),
                Some(e) => Err(e),
            },
            log,
            breakdown,
            to_handler_ms,
            handler_ns,
            unit,
        })
    }

    /// What a failed call to unit `unit` means for the caller (a closed link marks the unit
    /// down).
    pub fn link_failure(&self, name: &str, unit: u32, link: &Link, e: LinkError) -> ControlError {
        match e {
            LinkError::Remote(r) => remote_to_control(r, unit),
            LinkError::Closed(why) => {
                self.link_closed(link, &why);
                ControlError::Unavailable(format!(
                    "unit {unit} went down while running {name}: {why}"
                ))
            }
            LinkError::Timeout(t) => ControlError::Unavailable(format!(
                "unit {unit} did not answer an invocation of {name} within {:.0} s",
                t.as_secs_f64()
            )),
            other => ControlError::Internal(format!("unit {unit}, invoking {name}: {other}")),
        }
    }

    /// Sends a function's code and manifest to a unit.
    pub async fn deploy_to(
        &self,
        rec: &FunctionRecord,
        unit: u32,
        link: &Link,
    ) -> Result<(), ControlError> {
        let dir = self.registry.code_dir(rec);
        let zip = tokio::task::spawn_blocking(move || spore_registry::code::zip_dir(&dir))
            .await
            .map_err(|e| ControlError::Internal(e.to_string()))?
            .map_err(|e| {
                ControlError::Internal(format!(
                    "packing {}'s code for unit {unit}: {e}",
                    rec.manifest.name
                ))
            })?;
        let call = Call::Deploy {
            manifest: rec.manifest.clone(),
            description: rec.description.clone(),
            code: rec.code_hex.clone(),
        };
        tracing::info!(unit, function = %rec.manifest.name, bytes = zip.len(), "deploying to unit");
        link.call(&call, zip.into(), DEPLOY_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|e| self.link_failure(&rec.manifest.name, unit, link, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls::control_to_remote;

    #[test]
    fn errors_keep_their_kind_across_the_link() {
        for (e, want) in [
            (
                ControlError::NotFound("f".into()),
                RemoteErrorKind::NotFound,
            ),
            (
                ControlError::TooManyRequests(3),
                RemoteErrorKind::TooManyRequests,
            ),
            (
                ControlError::Unavailable("x".into()),
                RemoteErrorKind::Unavailable,
            ),
        ] {
            let r = control_to_remote(e);
            assert_eq!(r.kind, want);
            let back = remote_to_control(r, 4);
            assert!(back.to_string().contains("unit 4: "), "{back}");
        }
    }
}
