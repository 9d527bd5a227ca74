//! The control plane's table of processing units and their links, and placement of functions
//! on units.
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
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use spore_shim::link::LinkConfig;
use spore_shim::{Link, UnitInfo, UnitLoad};

use spore_core::ControlError;
use spore_registry::{FunctionRecord, SharedRegistry};

use crate::SegmentEvent;

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

pub(crate) struct Entry {
    pub(crate) info: UnitInfo,
    pub(crate) link: Option<Link>,
    peer: String,
    reason: String,
    since: Instant,
    load: UnitLoad,
    inflight: Arc<AtomicU32>,
}

/// Where an invocation runs.
pub enum Placement {
    /// Here.
    Local,
    /// On a shim.
    Remote {
        /// The unit.
        unit: u32,
        /// Its link.
        link: Link,
        /// Its count of invocations in flight (see [`InflightCount`]).
        inflight: Arc<AtomicU32>,
    },
}

/// The control plane's table of units (its own included).
pub struct Units {
    pub(crate) local: UnitInfo,
    local_inflight: Arc<AtomicU32>,
    entries: Mutex<BTreeMap<u32, Entry>>,
    placed: Mutex<HashMap<String, u32>>,
    pub(crate) link_cfg: LinkConfig,
    pub(crate) etcd: Mutex<Option<EtcdView>>,
    /// Spread DAG pipelines' routers, by key: where units' reports go.
    routes: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<SegmentEvent>>>,
    /// The functions (their code, for units that need it; pins, for the units' listing).
    pub(crate) registry: SharedRegistry,
    /// A shim's TLS (its unit certificate), once it has one: for neighbour links.
    pub(crate) unit_tls: Mutex<Option<Arc<crate::tls::UnitTls>>>,
}

/// What the control plane knows from etcd.
pub(crate) struct EtcdView {
    /// Where placements are recorded: the control plane's client. None on a shim, which must
    /// not touch the control plane's placement keys when its own registry changes.
    pub(crate) placements: Option<crate::etcd::Etcd>,
    /// Its own registration.
    pub(crate) registration: crate::etcd::Registration,
    /// Units with a live lease in etcd, at the last poll (None: the poll failed).
    pub(crate) members: Option<BTreeMap<u32, UnitInfo>>,
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
    pub fn new(local: UnitInfo, link_cfg: LinkConfig, registry: SharedRegistry) -> Units {
        Units {
            local,
            local_inflight: Arc::new(AtomicU32::new(0)),
            entries: Mutex::new(BTreeMap::new()),
            placed: Mutex::new(HashMap::new()),
            link_cfg,
            etcd: Mutex::new(None),
            routes: Mutex::new(HashMap::new()),
            registry,
            unit_tls: Mutex::new(None),
        }
    }

    /// Where each unit up takes neighbour links, for those that do.
    pub fn neighbour_addrs(&self) -> BTreeMap<u32, String> {
        self.entries()
            .iter()
            .filter(|(_, e)| e.link.is_some())
            .filter_map(|(&id, e)| e.info.link.clone().map(|a| (id, a)))
            .collect()
    }

    /// Sends a spread pipeline's reports to `tx`.
    pub fn route(&self, key: &str, tx: tokio::sync::mpsc::UnboundedSender<SegmentEvent>) {
        self.routes
            .lock()
            .expect("routes lock")
            .insert(key.to_owned(), tx);
    }

    /// Forgets a spread pipeline's router.
    pub fn unroute(&self, key: &str) {
        self.routes.lock().expect("routes lock").remove(key);
    }

    /// Hands a report to a spread pipeline's router; false if there is none.
    pub fn deliver(&self, key: &str, ev: SegmentEvent) -> bool {
        let tx = self.routes.lock().expect("routes lock").get(key).cloned();
        tx.is_some_and(|tx| tx.send(ev).is_ok())
    }

    /// The link to unit `id`, if it is up.
    pub fn link_of(&self, id: u32) -> Option<Link> {
        self.entries().get(&id).and_then(|e| e.link.clone())
    }

    /// The local unit.
    pub fn local(&self) -> &UnitInfo {
        &self.local
    }

    /// The settings of this unit's links.
    pub fn link_cfg(&self) -> &LinkConfig {
        &self.link_cfg
    }

    pub(crate) fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Entry>> {
        self.entries.lock().expect("units lock")
    }

    /// Why a new link for unit `id` is refused while the unit is up (its link open), if it is.
    pub(crate) fn already_up(&self, id: u32) -> Option<String> {
        up_reason(id, self.entries().get(&id)?)
    }

    /// Records a unit that just greeted; refused (with the reason) while another link of
    /// the same unit is open: a restarted shim is let in once its old link has closed (at
    /// once when its process died, after the heartbeat timeout if its host did).
    pub(crate) fn register(&self, link: Link, peer: String) -> Result<(), String> {
        let id = link.peer().id;
        let mut entries = self.entries();
        if let Some(why) = entries.get(&id).and_then(|e| up_reason(id, e)) {
            return Err(why);
        }
        entries.insert(
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
        Ok(())
    }

    /// Forgets units down for longer than `grace`; returns their ids.
    pub fn forget_down(&self, grace: std::time::Duration) -> Vec<u32> {
        let mut gone = Vec::new();
        self.entries().retain(|&id, e| {
            let keep = e.link.is_some() || e.since.elapsed() <= grace;
            if !keep {
                gone.push(id);
            }
            keep
        });
        gone
    }

    /// A placement of `function` on `unit` from before a restart (kept while that unit is
    /// up and fits).
    pub(crate) fn restore_placement(&self, function: String, unit: u32) {
        self.placed
            .lock()
            .expect("placed lock")
            .insert(function, unit);
    }

    /// Marks a unit down if `link` is still its link.
    pub(crate) fn link_closed(&self, link: &Link, reason: &str) {
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

    pub(crate) fn record_load(&self, id: u32, mut load: UnitLoad) {
        load.neighbours
            .truncate(spore_shim::proto::limits::MAX_NEIGHBOURS);
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
    pub(crate) fn live_links(&self) -> Vec<Link> {
        self.entries()
            .values()
            .filter_map(|e| e.link.clone())
            .collect()
    }

    /// Where `rec`'s next invocation runs when a DAG node pins it to `pin` (None: where
    /// [`Units::place`] puts it).
    pub fn place_node(
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
    pub fn place(&self, rec: &FunctionRecord) -> Result<Placement, ControlError> {
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
                .filter(|e| e.info.lacks(arch, acc).is_none() && rec.layers.is_empty())
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
            // Layers are not sent to other units: a function with layers runs here.
            if !rec.layers.is_empty() {
                lacking.push(format!("unit {id} does not have the function's layers"));
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
        if !rec.layers.is_empty() {
            return Err(ControlError::InvalidParameter(format!(
                "function {name} uses layers, which are not sent to other processing units: it can run on unit {} only",
                self.local.id
            )));
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
    pub fn unplace(&self, name: &str) {
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
    pub fn local_guard(&self) -> InflightCount {
        InflightCount::new(self.local_inflight.clone())
    }
}

/// Why another link for unit `id` is refused, if its entry `e` has a link open.
fn up_reason(id: u32, e: &Entry) -> Option<String> {
    e.link.as_ref().filter(|l| l.close_reason().is_none())?;
    Some(format!(
        "unit {id} is already up (linked from {} for {:.0} s); a second link for it is refused",
        e.peer,
        e.since.elapsed().as_secs_f64()
    ))
}

/// Counts one invocation in flight on a unit.
pub struct InflightCount(Arc<AtomicU32>);

impl InflightCount {
    /// Counts one invocation on the unit behind `c` until dropped.
    pub fn new(c: Arc<AtomicU32>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        InflightCount(c)
    }
}

impl Drop for InflightCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
            version: None,
            lambda: Default::default(),
            layers: Vec::new(),
            extras: Default::default(),
            deps: None,
            build: None,
        }
    }

    fn units() -> Units {
        let mut local = UnitInfo::detect(0, Some("x86_64".into()), Some(vec![]));
        local.cores = 2;
        let dir = tempfile::tempdir().unwrap();
        let (registry, _) = spore_registry::Registry::open(dir.path()).unwrap();
        // The registry keeps its directory: leave it to the temp dir's cleaner.
        std::mem::forget(dir);
        Units::new(local, LinkConfig::default(), SharedRegistry::new(registry))
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
        // A function with layers runs here only (layers are not sent to other units).
        let mut layered = rec("");
        layered.layers.push(spore_registry::layers::FunctionLayer {
            arn: "arn:aws:lambda:local:000000000000:layer:l:1".into(),
            code_hex: "00".into(),
            code_size: 1,
            unzipped_size: 1,
        });
        assert!(matches!(u.place(&layered), Ok(Placement::Local)));
        layered.manifest.unit = Some(5);
        let e = err(u.place(&layered));
        assert!(e.contains("uses layers"), "{e}");
        // Placed functions are listed on their unit.
        assert_eq!(u.statuses()[0].functions, ["f"]);
        u.unplace("f");
        assert!(u.statuses()[0].functions.is_empty());
    }
}
