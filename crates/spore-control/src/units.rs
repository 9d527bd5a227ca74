//! Processing units: the control plane's table of units and their links, placement of
//! functions on units, invocations relayed to a unit's shim, and the shim's side (serving the
//! control plane's calls with its own [`Control`]).
//!
//! The control plane (`spore serve`) is unit 0 and runs sandboxes itself. Other units run
//! `spore shim --id N --control ADDR`: the shim dials the control plane's link listener
//! (`spore serve --link-listen ADDR`), greets it with its [`UnitInfo`], and keeps that one
//! connection: heartbeats carry its load both ways, and the control plane's calls (invoke,
//! deploy, remove, sync) travel on it. A shim that loses the link dials again with backoff;
//! the control plane marks a unit down the moment its link closes, fails the invocations in
//! flight there with an error naming the unit, and places unpinned functions elsewhere.
//!
//! **Placement.** A function pinned with `unit = N` runs on unit N or fails with the reason
//! (unit never registered, down, or lacking what the function needs). Otherwise the control
//! plane keeps the function where it first placed it while that unit stays up (warm instances
//! and cfork templates live there), and places it on the least loaded unit (invocations in
//! flight per core) that has the function's `arch` and `accelerator` and last reported at
//! least `memory_mb` available, preferring lower ids on ties; if no unit can run it, the
//! error lists what each unit lacks.
//!
//! **Code.** Every relayed invocation names the control plane's code id and carries the
//! manifest; a shim that does not hold exactly that answers `needs_code`, and the control
//! plane sends the package (the function's code directory, zipped) and calls again. Shims
//! thus need no state of their own to follow redeploys, restarts or re-placements.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use spore_shim::link::{self, LinkConfig};
use spore_shim::{
    Answer, Call, Link, LinkError, Message, RemoteError, RemoteErrorKind, Role, Service, UnitInfo,
    UnitLoad,
};

use crate::dag::spread::{self, ShimSegments};
use crate::registry::FunctionRecord;
use crate::{Control, ControlError, Invocation, InvokeOptions};

/// Extra time a relayed invocation gets over the function's timeout (start-up, transfer).
const RELAY_SLACK: Duration = Duration::from_secs(30);
/// Time allowed for a code package to reach a unit.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);

/// A unit's state as `spore units` and `GET /spore/v1/units` show it.
#[derive(Debug, Clone, Serialize)]
pub struct UnitStatus {
    /// What the unit declared.
    #[serde(flatten)]
    pub info: UnitInfo,
    /// `up` or `down`.
    pub state: &'static str,
    /// Seconds since the unit last changed state.
    pub since_s: f64,
    /// Why it is down (empty when up).
    pub reason: String,
    /// Whether this is the control plane's own unit.
    pub local: bool,
    /// Where its link comes from (empty for the local unit).
    pub peer: String,
    /// Its last reported load.
    pub load: UnitLoad,
    /// Invocations the control plane has in flight there.
    pub inflight: u32,
    /// Functions placed there.
    pub functions: Vec<String>,
    /// Membership in etcd (`registered`, `absent`, or why etcd is unreachable); None without
    /// etcd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<String>,
}

struct Entry {
    info: UnitInfo,
    link: Option<Link>,
    peer: String,
    reason: String,
    since: Instant,
    load: UnitLoad,
    inflight: Arc<AtomicU32>,
}

/// Where an invocation runs.
pub(crate) enum Placement {
    /// Here.
    Local,
    /// On a shim.
    Remote {
        unit: u32,
        link: Link,
        inflight: Arc<AtomicU32>,
    },
}

/// The control plane's table of units (its own included).
pub struct Units {
    local: UnitInfo,
    local_inflight: Arc<AtomicU32>,
    entries: Mutex<BTreeMap<u32, Entry>>,
    placed: Mutex<HashMap<String, u32>>,
    link_cfg: LinkConfig,
    etcd: Mutex<Option<EtcdView>>,
    /// Spread DAG pipelines' routers, by key: where units' reports go.
    routes: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<spread::Event>>>,
    /// (a shim) Its segments of spread DAG pipelines and its neighbour links.
    pub(crate) segments: ShimSegments,
}

/// What the control plane knows from etcd.
struct EtcdView {
    /// Where placements are recorded: the control plane's client. None on a shim, which must
    /// not touch the control plane's placement keys when its own registry changes.
    placements: Option<crate::etcd::Etcd>,
    /// Its own registration.
    registration: crate::etcd::Registration,
    /// Units with a live lease in etcd, at the last poll (None: the poll failed).
    members: Option<BTreeMap<u32, UnitInfo>>,
}

impl std::fmt::Debug for Units {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Units")
            .field("local", &self.local.id)
            .finish()
    }
}

impl Units {
    /// A table holding only the local unit.
    pub fn new(local: UnitInfo, link_cfg: LinkConfig) -> Units {
        Units {
            local,
            local_inflight: Arc::new(AtomicU32::new(0)),
            entries: Mutex::new(BTreeMap::new()),
            placed: Mutex::new(HashMap::new()),
            link_cfg,
            etcd: Mutex::new(None),
            routes: Mutex::new(HashMap::new()),
            segments: ShimSegments::default(),
        }
    }

    /// Where each unit up takes neighbour links, for those that do.
    pub(crate) fn neighbour_addrs(&self) -> BTreeMap<u32, String> {
        self.entries()
            .iter()
            .filter(|(_, e)| e.link.is_some())
            .filter_map(|(&id, e)| e.info.link.clone().map(|a| (id, a)))
            .collect()
    }

    /// Sends a spread pipeline's reports to `tx`.
    pub(crate) fn route(&self, key: &str, tx: tokio::sync::mpsc::UnboundedSender<spread::Event>) {
        self.routes
            .lock()
            .expect("routes lock")
            .insert(key.to_owned(), tx);
    }

    /// Forgets a spread pipeline's router.
    pub(crate) fn unroute(&self, key: &str) {
        self.routes.lock().expect("routes lock").remove(key);
    }

    /// Hands a report to a spread pipeline's router; false if there is none.
    pub(crate) fn deliver(&self, key: &str, ev: spread::Event) -> bool {
        let tx = self.routes.lock().expect("routes lock").get(key).cloned();
        tx.is_some_and(|tx| tx.send(ev).is_ok())
    }

    /// The link to unit `id`, if it is up.
    pub(crate) fn link_of(&self, id: u32) -> Option<Link> {
        self.entries().get(&id).and_then(|e| e.link.clone())
    }

    /// The local unit.
    pub fn local(&self) -> &UnitInfo {
        &self.local
    }

    /// The settings of this unit's links.
    pub(crate) fn link_cfg(&self) -> &LinkConfig {
        &self.link_cfg
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Entry>> {
        self.entries.lock().expect("units lock")
    }

    /// Records a unit that just greeted; a live link of the same unit is replaced (a shim
    /// that restarted before its old link timed out).
    fn register(&self, link: Link, peer: String) {
        let id = link.peer().id;
        let old = self.entries().insert(
            id,
            Entry {
                info: link.peer().clone(),
                link: Some(link),
                peer,
                reason: String::new(),
                since: Instant::now(),
                load: UnitLoad::default(),
                inflight: Arc::new(AtomicU32::new(0)),
            },
        );
        if let Some(l) = old.and_then(|e| e.link) {
            l.close(&format!("replaced by a new link from unit {id}"));
        }
    }

    /// A placement of `function` on `unit` from before a restart (kept while that unit is
    /// up and fits).
    fn restore_placement(&self, function: String, unit: u32) {
        self.placed
            .lock()
            .expect("placed lock")
            .insert(function, unit);
    }

    /// Marks a unit down if `link` is still its link.
    fn link_closed(&self, link: &Link, reason: &str) {
        let id = link.peer().id;
        let mut entries = self.entries();
        if let Some(e) = entries.get_mut(&id) {
            if e.link.as_ref().is_some_and(|l| l.id() == link.id()) {
                tracing::warn!(unit = id, reason, "unit down");
                e.link = None;
                e.reason = reason.to_owned();
                e.since = Instant::now();
                e.load = UnitLoad::default();
            }
        }
        drop(entries);
        self.placed
            .lock()
            .expect("placed lock")
            .retain(|_, u| *u != id);
    }

    fn record_load(&self, id: u32, load: UnitLoad) {
        if let Some(e) = self.entries().get_mut(&id) {
            e.load = load;
        }
    }

    /// Every unit, the local one first.
    pub fn statuses(&self) -> Vec<UnitStatus> {
        let placed = self.placed.lock().expect("placed lock").clone();
        let on = |id: u32| {
            let mut f: Vec<String> = placed
                .iter()
                .filter(|(_, u)| **u == id)
                .map(|(n, _)| n.clone())
                .collect();
            f.sort();
            f
        };
        let mut out = vec![UnitStatus {
            info: self.local.clone(),
            state: "up",
            since_s: 0.0,
            reason: String::new(),
            local: true,
            peer: String::new(),
            load: UnitLoad::default(),
            inflight: self.local_inflight.load(Ordering::Relaxed),
            functions: on(self.local.id),
            etcd: None,
        }];
        // Lock order everywhere: entries, then placed, then etcd.
        let entries = self.entries();
        let etcd = self.etcd.lock().expect("etcd lock");
        if let Some(v) = etcd.as_ref() {
            out[0].etcd = Some(v.registration.state());
        }
        let member = |id: u32| -> Option<String> {
            let v = etcd.as_ref()?;
            Some(match &v.members {
                None => "unreachable".into(),
                Some(m) if m.contains_key(&id) => "registered".into(),
                Some(_) => "absent".into(),
            })
        };
        for (id, e) in entries.iter() {
            out.push(UnitStatus {
                info: e.info.clone(),
                state: if e.link.is_some() { "up" } else { "down" },
                since_s: e.since.elapsed().as_secs_f64(),
                reason: e.reason.clone(),
                local: false,
                peer: e.peer.clone(),
                load: e.load.clone(),
                inflight: e.inflight.load(Ordering::Relaxed),
                functions: on(*id),
                etcd: member(*id),
            });
        }
        // Units registered in etcd that never linked here.
        if let Some(members) = etcd.as_ref().and_then(|v| v.members.as_ref()) {
            for (id, info) in members {
                if *id == self.local.id || out.iter().any(|u| u.info.id == *id) {
                    continue;
                }
                out.push(UnitStatus {
                    info: info.clone(),
                    state: "down",
                    since_s: 0.0,
                    reason: "registered in etcd, but no link to this control plane".into(),
                    local: false,
                    peer: String::new(),
                    load: UnitLoad::default(),
                    inflight: 0,
                    functions: on(*id),
                    etcd: Some("registered".into()),
                });
            }
        }
        out
    }

    /// Live links (for calls to every unit).
    fn live_links(&self) -> Vec<Link> {
        self.entries()
            .values()
            .filter_map(|e| e.link.clone())
            .collect()
    }

    /// Where `rec`'s next invocation runs when a DAG node pins it to `pin` (None: where
    /// [`Units::place`] puts it).
    pub(crate) fn place_node(
        &self,
        rec: &FunctionRecord,
        pin: Option<u32>,
    ) -> Result<Placement, ControlError> {
        match (pin, rec.manifest.unit) {
            (None, _) => self.place(rec),
            (Some(p), Some(u)) if p != u => Err(ControlError::InvalidParameter(format!(
                "a DAG node pins function {} to unit {p}, but the function is pinned to unit {u}",
                rec.manifest.name
            ))),
            (Some(p), _) => self.pinned(rec, p),
        }
    }

    /// Where `rec`'s next invocation runs.
    pub(crate) fn place(&self, rec: &FunctionRecord) -> Result<Placement, ControlError> {
        if let Some(u) = rec.manifest.unit {
            return self.pinned(rec, u);
        }
        let m = &rec.manifest;
        let (arch, acc) = (m.arch.as_deref(), m.accelerator.as_deref());
        let name = &m.name;
        let entries = self.entries();
        let remote = |id: u32, e: &Entry| -> Option<Placement> {
            e.link.clone().map(|link| Placement::Remote {
                unit: id,
                link,
                inflight: e.inflight.clone(),
            })
        };
        // Sticky: stay where the function was placed while that unit is up and fits.
        let mut placed = self.placed.lock().expect("placed lock");
        if let Some(&u) = placed.get(name) {
            if u == self.local.id && self.local.lacks(arch, acc).is_none() {
                return Ok(Placement::Local);
            }
            if let Some(p) = entries
                .get(&u)
                .filter(|e| e.info.lacks(arch, acc).is_none())
                .and_then(|e| remote(u, e))
            {
                return Ok(p);
            }
        }
        // Least loaded: invocations in flight per core; lower ids win ties.
        let score = |inflight: &AtomicU32, cores: u32| {
            (f64::from(inflight.load(Ordering::Relaxed)) + 1.0) / f64::from(cores.max(1))
        };
        let mut best: Option<(f64, u32)> = None;
        let mut lacking = Vec::new();
        match self.local.lacks(arch, acc) {
            None => best = Some((score(&self.local_inflight, self.local.cores), self.local.id)),
            Some(why) => lacking.push(why),
        }
        for (&id, e) in entries.iter() {
            if e.link.is_none() {
                lacking.push(format!("unit {id} is down"));
                continue;
            }
            if let Some(why) = e.info.lacks(arch, acc) {
                lacking.push(why);
                continue;
            }
            // A unit that reported less free memory than one instance needs is passed over
            // (0: not reported yet).
            let free = e.load.mem_available_mb;
            if free > 0 && free < u64::from(m.memory_mb) {
                lacking.push(format!(
                    "unit {id} has {free} MiB available, the function needs {} MiB",
                    m.memory_mb
                ));
                continue;
            }
            let s = score(&e.inflight, e.info.cores);
            if best.is_none_or(|(b, _)| s < b) {
                best = Some((s, id));
            }
        }
        let Some((_, id)) = best else {
            let needs: Vec<String> = [
                arch.map(|a| format!("arch {a}")),
                acc.map(|a| format!("accelerator {a}")),
            ]
            .into_iter()
            .flatten()
            .collect();
            return Err(ControlError::Unavailable(format!(
                "no unit can run function {name} (it needs {}): {}",
                if needs.is_empty() {
                    "nothing special".into()
                } else {
                    needs.join(" and ")
                },
                lacking.join("; ")
            )));
        };
        placed.insert(name.clone(), id);
        self.persist_placement(name, Some(id));
        if id == self.local.id {
            return Ok(Placement::Local);
        }
        Ok(remote(id, &entries[&id]).expect("a live unit was picked"))
    }

    /// Where `rec` runs when pinned to unit `u`: there, or an error saying why not.
    fn pinned(&self, rec: &FunctionRecord, u: u32) -> Result<Placement, ControlError> {
        let m = &rec.manifest;
        let (arch, acc) = (m.arch.as_deref(), m.accelerator.as_deref());
        let name = &m.name;
        let entries = self.entries();
        if u == self.local.id {
            if let Some(why) = self.local.lacks(arch, acc) {
                return Err(ControlError::Unavailable(format!(
                    "function {name} is pinned to unit {u}, but {why}"
                )));
            }
            return Ok(Placement::Local);
        }
        let e = entries.get(&u).ok_or_else(|| {
            ControlError::Unavailable(format!(
                "function {name} is pinned to unit {u}, which has not registered (start `spore shim --id {u} --control ADDR`)"
            ))
        })?;
        if let Some(why) = e.info.lacks(arch, acc) {
            return Err(ControlError::Unavailable(format!(
                "function {name} is pinned to unit {u}, but {why}"
            )));
        }
        let link = e.link.clone().ok_or_else(|| {
            ControlError::Unavailable(format!(
                "function {name} is pinned to unit {u}, which is down ({:.0} s): {}",
                e.since.elapsed().as_secs_f64(),
                e.reason
            ))
        })?;
        Ok(Placement::Remote {
            unit: u,
            link,
            inflight: e.inflight.clone(),
        })
    }

    /// Forgets where a function was placed (deleted or changed).
    pub(crate) fn unplace(&self, name: &str) {
        if self
            .placed
            .lock()
            .expect("placed lock")
            .remove(name)
            .is_some()
        {
            self.persist_placement(name, None);
        }
    }

    /// Writes a placement to etcd (in the background; a failure is logged, the placement
    /// holds in memory).
    fn persist_placement(&self, name: &str, unit: Option<u32>) {
        let Some(client) = self
            .etcd
            .lock()
            .expect("etcd lock")
            .as_ref()
            .and_then(|v| v.placements.clone())
        else {
            return;
        };
        let key = format!("placement/{name}");
        tokio::spawn(async move {
            let r = match unit {
                Some(u) => client.put(&key, &u.to_string(), None).await,
                None => client.delete(&key).await,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, key, "recording a placement in etcd");
            }
        });
    }

    /// Counts an invocation on the local unit while the guard lives.
    pub(crate) fn local_guard(&self) -> InflightCount {
        InflightCount::new(self.local_inflight.clone())
    }
}

/// Counts one invocation in flight on a unit.
pub(crate) struct InflightCount(Arc<AtomicU32>);

impl InflightCount {
    pub(crate) fn new(c: Arc<AtomicU32>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        InflightCount(c)
    }
}

impl Drop for InflightCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

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
                    let ev = spread::Event::Value {
                        seq,
                        deadline_ms,
                        request_id,
                        edge,
                        value,
                        times,
                    };
                    (key, ev)
                }
                Call::SegmentTimes { key, seq, times } => {
                    (key, spread::Event::Times { seq, times })
                }
                Call::SegmentFailed {
                    key,
                    seq,
                    node,
                    error,
                } => (key, spread::Event::Failed { seq, node, error }),
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

/// The call a message carries.
fn parse_call(msg: &Message) -> Result<Call, RemoteError> {
    serde_json::from_slice(&msg.header)
        .map_err(|e| RemoteError::new(RemoteErrorKind::BadCall, format!("unreadable call: {e}")))
}

/// The message of an answer.
fn answer_message(answer: &Answer, body: Bytes) -> Message {
    Message {
        header: serde_json::to_vec(answer)
            .expect("answers serialize")
            .into(),
        body,
    }
}

fn remote_to_control(e: RemoteError, unit: u32) -> ControlError {
    let msg = format!("unit {unit}: {}", e.message);
    match e.kind {
        RemoteErrorKind::NotFound => ControlError::NotFound(msg),
        RemoteErrorKind::InvalidParameter | RemoteErrorKind::NeedsCode => {
            ControlError::InvalidParameter(msg)
        }
        RemoteErrorKind::InvalidRequestContent => ControlError::InvalidRequestContent(msg),
        RemoteErrorKind::TooManyRequests => ControlError::Unavailable(msg),
        RemoteErrorKind::RequestTooLarge => ControlError::InvalidParameter(msg),
        RemoteErrorKind::Unavailable => ControlError::Unavailable(msg),
        RemoteErrorKind::Internal | RemoteErrorKind::BadCall => ControlError::Internal(msg),
    }
}

fn control_to_remote(e: ControlError) -> RemoteError {
    let kind = match &e {
        ControlError::NotFound(_) => RemoteErrorKind::NotFound,
        ControlError::Conflict(_) | ControlError::InvalidParameter(_) => {
            RemoteErrorKind::InvalidParameter
        }
        ControlError::InvalidRequestContent(_) => RemoteErrorKind::InvalidRequestContent,
        ControlError::RequestTooLarge { .. } => RemoteErrorKind::RequestTooLarge,
        ControlError::TooManyRequests(_) => RemoteErrorKind::TooManyRequests,
        ControlError::Unavailable(_) => RemoteErrorKind::Unavailable,
        ControlError::Internal(_) => RemoteErrorKind::Internal,
    };
    RemoteError::new(kind, e.to_string())
}

impl Control {
    /// Every unit and its state.
    pub fn unit_statuses(&self) -> Vec<UnitStatus> {
        let mut s = self.inner.units.statuses();
        if let Some(first) = s.first_mut() {
            first.load = self.load();
        }
        // Pinned functions are listed on their unit too.
        for rec in self.list_functions() {
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

    /// This unit's load.
    pub fn load(&self) -> UnitLoad {
        let mut instances = 0;
        for pool in self.inner.pools.lock().expect("pools lock").values() {
            instances += pool.state.lock().expect("pool lock").total;
        }
        let mem_available_mb = spore_shim::proto::meminfo_mb("MemAvailable");
        UnitLoad {
            inflight: self.inner.inflight.load(Ordering::Relaxed) as u32,
            instances,
            templates: self.inner.templates.lock().expect("templates lock").len() as u32,
            mem_available_mb,
            neighbours: self.inner.units.segments.neighbours(),
        }
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
                    .list_functions()
                    .into_iter()
                    .map(|r| r.manifest.name)
                    .collect();
                let mut n = 0;
                for (f, u) in placements {
                    if let (true, Ok(u)) = (known.contains(&f), u.parse::<u32>()) {
                        self.inner.units.restore_placement(f, u);
                        n += 1;
                    }
                }
                if n > 0 {
                    tracing::info!(placements = n, "placements read back from etcd");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading placements from etcd"),
        }
        let value =
            serde_json::json!({ "link": link, "unit": self.inner.units.local.id }).to_string();
        let registration = crate::etcd::Registration::start(
            client.clone(),
            [("control".to_owned(), value)].into_iter().collect(),
            stop.clone(),
        );
        *self.inner.units.etcd.lock().expect("etcd lock") = Some(EtcdView {
            placements: Some(client.clone()),
            registration,
            members: None,
        });
        let units = self.inner.units.clone();
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

    /// Accepts shims' links on `listener` until the daemon stops.
    pub async fn serve_links(&self, listener: tokio::net::TcpListener) {
        accept_each(listener, "a unit link", |stream, peer| {
            let me = self.clone();
            async move {
                let units = me.inner.units.clone();
                let local_id = units.local.id;
                let r = link::accept(
                    stream,
                    units.local.clone(),
                    Role::Control,
                    units.link_cfg.clone(),
                    |hello| {
                        if hello.role != Role::Shim {
                            return Err(format!(
                                "this is a control plane; it takes links from shims, not from a {:?}",
                                hello.role
                            ));
                        }
                        if hello.unit.id == local_id {
                            return Err(format!(
                                "unit {local_id} is the control plane's own; give the shim another --id"
                            ));
                        }
                        if me.inner.draining.load(Ordering::Acquire) {
                            return Err("the control plane is shutting down".into());
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
                        tracing::warn!(%peer, error = %e, "a unit's greeting failed");
                        return;
                    }
                };
                let id = link.peer().id;
                tracing::info!(unit = id, %peer, arch = %link.peer().arch, cores = link.peer().cores, "unit up");
                units.register(link.clone(), peer.to_string());
                // The unit drops functions the control plane no longer has.
                let names: Vec<String> = me
                    .list_functions()
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
                units.link_closed(&link, &reason);
            }
        })
        .await
    }

    /// Runs as a shim: takes neighbour links from other shims on `listener` and puts the DAG
    /// values they send on this unit's segments.
    pub async fn serve_neighbours(&self, listener: tokio::net::TcpListener) {
        accept_each(listener, "a neighbour link", |stream, peer| {
            let me = self.clone();
            async move {
                let units = me.inner.units.clone();
                let local_id = units.local.id;
                let segments = units.segments.clone();
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
                            control: me.clone(),
                            synced: Arc::new(Mutex::new(HashMap::new())),
                            deploying: Arc::new(tokio::sync::Mutex::new(())),
                            segments,
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
            .inner
            .units
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
    pub(crate) fn remove_on_units(&self, name: &str) {
        self.inner.units.unplace(name);
        for link in self.inner.units.live_links() {
            let call = Call::Remove {
                function: name.to_owned(),
            };
            tokio::spawn(async move {
                let _ = link.call(&call, Bytes::new(), DEPLOY_TIMEOUT).await;
            });
        }
    }

    /// Runs an invocation on another unit.
    pub(crate) async fn invoke_remote(
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

    pub(crate) fn link_failure(
        &self,
        name: &str,
        unit: u32,
        link: &Link,
        e: LinkError,
    ) -> ControlError {
        match e {
            LinkError::Remote(r) => remote_to_control(r, unit),
            LinkError::Closed(why) => {
                self.inner.units.link_closed(link, &why);
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
    pub(crate) async fn deploy_to(
        &self,
        rec: &FunctionRecord,
        unit: u32,
        link: &Link,
    ) -> Result<(), ControlError> {
        let dir = self.registry().code_dir(rec);
        let zip = tokio::task::spawn_blocking(move || crate::code::zip_dir(&dir))
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

    /// Runs this daemon as a unit's shim: dials the control plane at `control` (`HOST:PORT`),
    /// serves its calls, and dials again with backoff whenever the link drops, until
    /// `stop` fires.
    pub async fn run_shim(
        &self,
        control: Option<String>,
        etcd: Option<crate::etcd::Etcd>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let units = self.inner.units.clone();
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
                let segments = units.segments.clone();
                let link = link::connect(
                    s,
                    units.local.clone(),
                    Role::Shim,
                    Arc::new(ShimSide {
                        control: self.clone(),
                        synced: Arc::new(Mutex::new(HashMap::new())),
                        deploying: Arc::new(tokio::sync::Mutex::new(())),
                        segments: segments.clone(),
                        neighbour: false,
                    }),
                    units.link_cfg.clone(),
                )
                .await?;
                segments.set_link(link.clone());
                Ok((link, segments))
            };
            match attempt.await {
                Ok((link, segments)) => {
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

/// Accepts connections on `listener` until the task is dropped (`what` names them in logs),
/// each with Nagle off, and serves each on a task of its own.
async fn accept_each<F, Fut>(listener: tokio::net::TcpListener, what: &str, serve: F)
where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting {what}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, peer));
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

/// A shim's side of its link: serves the control plane's calls with the unit's [`Control`].
struct ShimSide {
    control: Control,
    /// Per function: the control plane's code id and manifest this unit holds.
    synced: Synced,
    /// Held while a package is installed.
    deploying: Arc<tokio::sync::Mutex<()>>,
    /// Its segments of spread DAG pipelines.
    segments: ShimSegments,
    /// The link comes from another shim (a neighbour): it carries DAG values only.
    neighbour: bool,
}

impl Service for ShimSide {
    fn call(
        &self,
        msg: Message,
    ) -> Pin<Box<dyn Future<Output = Result<Message, RemoteError>> + Send + 'static>> {
        let control = self.control.clone();
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
                serve(control, synced, deploying, segments, call, msg.body).await?;
            Ok(answer_message(&answer, body))
        })
    }

    fn load(&self) -> Bytes {
        serde_json::to_vec(&self.control.load())
            .expect("load serializes")
            .into()
    }
}

type Synced = Arc<Mutex<HashMap<String, (String, spore_core::FunctionManifest)>>>;

async fn serve(
    control: Control,
    synced: Synced,
    deploying: Arc<tokio::sync::Mutex<()>>,
    segments: ShimSegments,
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
                .open(&control, key, spec, units, functions, neighbours)
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
            let inv = control
                .invoke(
                    &name,
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
            let spec = crate::FunctionSpec {
                manifest: manifest.clone(),
                description,
            };
            let c = control.clone();
            // Concurrent first calls may each bring the package: one installs it at a time,
            // and the others find it there and change nothing (a change would retire the
            // instances the first one started).
            let _one = deploying.lock().await;
            let rec = tokio::task::spawn_blocking(move || {
                let (_, hex) = crate::code::digest(&body);
                match c.get_function(&spec.manifest.name) {
                    Ok(r) if r.manifest == spec.manifest && r.code_hex == hex => Ok(r),
                    Ok(_) => {
                        c.update_config(spec.clone())?;
                        c.update_code(&spec.manifest.name, &body)
                    }
                    Err(_) => c.create_function(spec, &body),
                }
            })
            .await
            .map_err(|e| RemoteError::new(RemoteErrorKind::Internal, e.to_string()))?
            .map_err(control_to_remote)?;
            synced
                .lock()
                .expect("synced lock")
                .insert(name.clone(), (code, manifest));
            control.prewarm(&name);
            Ok((
                Answer::Deployed {
                    revision: rec.revision,
                },
                Bytes::new(),
            ))
        }
        Call::Remove { function } => {
            synced.lock().expect("synced lock").remove(&function);
            match control.delete_function(&function) {
                Ok(_) | Err(ControlError::NotFound(_)) => Ok((Answer::Removed, Bytes::new())),
                Err(e) => Err(control_to_remote(e)),
            }
        }
        Call::Sync { functions } => {
            let keep: std::collections::HashSet<String> = functions.into_iter().collect();
            let mut removed = Vec::new();
            for rec in control.list_functions() {
                let name = rec.manifest.name;
                if !keep.contains(&name) && control.delete_function(&name).is_ok() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(toml_extra: &str) -> FunctionRecord {
        let m = spore_core::FunctionManifest::from_toml(&format!(
            "name = \"f\"\nhandler = \"main.handler\"\n{toml_extra}"
        ))
        .unwrap();
        FunctionRecord {
            manifest: m,
            description: String::new(),
            code_sha256: String::new(),
            code_hex: "00".into(),
            code_size: 0,
            last_modified_ms: 0,
            revision: 1,
        }
    }

    fn units() -> Units {
        let mut local = UnitInfo::detect(0, Some("x86_64".into()), Some(vec![]));
        local.cores = 2;
        Units::new(local, LinkConfig::default())
    }

    fn err(r: Result<Placement, ControlError>) -> String {
        match r {
            Ok(_) => panic!("placed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn placement_without_other_units() {
        let u = units();
        assert!(matches!(u.place(&rec("")), Ok(Placement::Local)));
        assert!(matches!(u.place(&rec("unit = 0")), Ok(Placement::Local)));
        assert!(matches!(
            u.place(&rec("arch = \"x86_64\"")),
            Ok(Placement::Local)
        ));
        let e = err(u.place(&rec("unit = 5")));
        assert!(
            e.contains("pinned to unit 5, which has not registered"),
            "{e}"
        );
        let e = err(u.place(&rec("unit = 0\naccelerator = \"gpu\"")));
        assert!(e.contains("pinned to unit 0, but unit 0 has no gpu"), "{e}");
        let e = err(u.place(&rec("accelerator = \"gpu\"\narch = \"aarch64\"")));
        assert!(
            e.contains("no unit can run function f (it needs arch aarch64 and accelerator gpu): unit 0 is x86_64, not aarch64"),
            "{e}"
        );
        // Placed functions are listed on their unit.
        assert_eq!(u.statuses()[0].functions, ["f"]);
        u.unplace("f");
        assert!(u.statuses()[0].functions.is_empty());
    }

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
