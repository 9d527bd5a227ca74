//! A shim's side of pipelines spread over units: its segments, by key, built on the control
//! plane's `segment_open` and fed by `edge_value` calls; what they report goes back over the
//! link to the control plane, or straight to a neighbour shim for an edge between two shims.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use spore_cluster::{SegmentEvent as Event, Units};
use spore_core::dag::DagSpec;
use spore_core::ControlError;
use spore_ipc::edge::Value;
use spore_shim::proto::spread_edges;
use spore_shim::{Answer, Call, Link};

use crate::spread::{graph, Reporter, Segment, CLOSE_TIMEOUT};
use crate::Dags;

/// A shim's segments, by key, how they report to the control plane, and its neighbour links
/// (to other shims, for DAG edges between them).
#[derive(Clone, Default)]
pub(crate) struct ShimSegments {
    segments: Arc<Mutex<HashMap<String, Arc<Segment>>>>,
    /// The link to the control plane (the latest).
    control: Arc<Mutex<Option<Link>>>,
    /// Neighbour links this shim dialed, by unit.
    dialed: Arc<Mutex<HashMap<u32, Link>>>,
}

/// Where a shim sends the values of its exits: per edge, the consumer's unit and its
/// neighbour address, when the consumer is on another shim that takes neighbour links.
struct Targets {
    edges: Vec<(Option<usize>, Option<usize>)>,
    units: Vec<u32>,
    neighbours: BTreeMap<u32, String>,
}

impl Targets {
    fn of(&self, edge: usize) -> Option<(u32, &str)> {
        let c = self.edges.get(edge)?.1?;
        let u = self.units[c];
        self.neighbours.get(&u).map(|a| (u, a.as_str()))
    }
}

impl ShimSegments {
    /// The link to the control plane, at each (re)connection.
    pub(crate) fn set_link(&self, link: Link) {
        *self.control.lock().expect("control link lock") = Some(link);
    }

    /// Drops every segment (the link to the control plane is gone).
    pub(crate) fn clear(&self) {
        self.segments.lock().expect("segments lock").clear();
    }

    /// Units this shim holds a live neighbour link to.
    pub(crate) fn neighbours(&self) -> Vec<u32> {
        let mut d = self.dialed.lock().expect("dialed lock");
        d.retain(|_, l| l.close_reason().is_none());
        let mut v: Vec<u32> = d.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The neighbour link to unit `unit` at `addr`: the one dialed before, or a new one.
    async fn neighbour(
        &self,
        units: &Units,
        unit: u32,
        addr: &str,
    ) -> Result<Link, spore_shim::LinkError> {
        let known = self.dialed.lock().expect("dialed lock").get(&unit).cloned();
        if let Some(l) = known.filter(|l| l.close_reason().is_none()) {
            return Ok(l);
        }
        let link = units.dial_neighbour(unit, addr).await?;
        tracing::info!(unit, %addr, "neighbour link up");
        self.dialed
            .lock()
            .expect("dialed lock")
            .insert(unit, link.clone());
        Ok(link)
    }

    fn reporter(&self, key: &str, targets: Targets, me: Arc<Units>) -> Reporter {
        let this = self.clone();
        let key = key.to_owned();
        let handle = tokio::runtime::Handle::current();
        let targets = Arc::new(targets);
        Arc::new(move |ev: Event| {
            let Some(link) = this.control.lock().expect("control link lock").clone() else {
                return;
            };
            let direct = match &ev {
                Event::Value { edge, .. } => targets.of(*edge).map(|(u, a)| (u, a.to_owned())),
                _ => None,
            };
            let (call, body) = match ev {
                Event::Value {
                    seq,
                    deadline_ms,
                    request_id,
                    edge,
                    value,
                    times,
                } => (
                    Call::EdgeValue {
                        key: key.clone(),
                        seq,
                        edge,
                        raw: value.raw,
                        deadline_ms,
                        request_id,
                        times,
                    },
                    Bytes::from(value.bytes),
                ),
                Event::Times { seq, times } => (
                    Call::SegmentTimes {
                        key: key.clone(),
                        seq,
                        times,
                    },
                    Bytes::new(),
                ),
                Event::Failed { seq, node, error } => (
                    Call::SegmentFailed {
                        key: key.clone(),
                        seq,
                        node,
                        error,
                    },
                    Bytes::new(),
                ),
                // Only the control plane watches units.
                Event::UnitDown { .. } => return,
            };
            let (this, me) = (this.clone(), me.clone());
            let send = async move {
                // A value for a node on another shim goes there over a neighbour link; if
                // that fails, through the control plane, which routes it.
                if let Some((unit, addr)) = direct {
                    let left = CLOSE_TIMEOUT;
                    match this.neighbour(&me, unit, &addr).await {
                        Ok(n) => match n.call(&call, body.clone(), left).await {
                            Ok(_) => return,
                            Err(e) => {
                                tracing::warn!(unit, error = %e, "a DAG value to a neighbour; through the control plane instead")
                            }
                        },
                        Err(e) => {
                            tracing::warn!(unit, error = %e, "no neighbour link; DAG values go through the control plane")
                        }
                    }
                }
                if let Err(e) = link.call(&call, body, CLOSE_TIMEOUT).await {
                    tracing::warn!(error = %e, "reporting to the control plane");
                }
            };
            // An exit's thread sends and waits; a task (failures) sends in the background.
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(send);
                }
                Err(_) => handle.block_on(send),
            }
        })
    }

    /// `segment_open`: builds this unit's segment (the caller checked that the unit holds
    /// `functions` at the control plane's code ids).
    pub(crate) async fn open(
        &self,
        control: &Dags,
        key: String,
        spec: DagSpec,
        units: Vec<u32>,
        functions: Vec<(spore_core::FunctionManifest, String)>,
        neighbours: Vec<(u32, String)>,
    ) -> Result<Answer, ControlError> {
        spec.validate()
            .map_err(|e| ControlError::InvalidParameter(e.to_string()))?;
        if units.len() != spec.nodes.len() {
            return Err(ControlError::InvalidParameter(format!(
                "DAG {:?} has {} nodes, but {} units were given",
                spec.name,
                spec.nodes.len(),
                units.len()
            )));
        }
        let me = control.inner.units.local().id;
        let mut recs = BTreeMap::new();
        for (n, node) in spec.nodes.iter().enumerate() {
            if units[n] != me {
                continue;
            }
            if !functions.iter().any(|(m, _)| m.name == node.function) {
                return Err(ControlError::InvalidParameter(format!(
                    "node {:?} runs here, but no manifest came for its function {}",
                    node.id, node.function
                )));
            }
            recs.insert(n, control.get_function(&node.function)?);
        }
        if recs.is_empty() {
            return Err(ControlError::InvalidParameter(format!(
                "no node of DAG {:?} is placed on unit {me}",
                spec.name
            )));
        }
        let (preds, sink) = graph(&spec);
        let targets = Targets {
            edges: spread_edges(&preds, sink),
            units: units.clone(),
            neighbours: neighbours.into_iter().filter(|(u, _)| *u != me).collect(),
        };
        let report = self.reporter(&key, targets, control.inner.units.clone());
        match control
            .build_segment(&spec, &units, recs, &key, report)
            .await?
        {
            Err(f) => Ok(Answer::SegmentOpened {
                starts: Vec::new(),
                failed: Some(f),
            }),
            Ok(seg) => {
                let starts = seg.starts.iter().map(|&(_, s)| s).collect();
                let old = self
                    .segments
                    .lock()
                    .expect("segments lock")
                    .insert(key, Arc::new(seg));
                drop(old);
                Ok(Answer::SegmentOpened {
                    starts,
                    failed: None,
                })
            }
        }
    }

    /// `edge_value`: puts a value on one of a segment's entries.
    pub(crate) async fn deliver(
        &self,
        key: &str,
        seq: u64,
        edge: usize,
        value: Value,
        deadline_ms: u64,
        request_id: &str,
    ) -> Result<(), ControlError> {
        let seg = self
            .segments
            .lock()
            .expect("segments lock")
            .get(key)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no DAG segment {key} on this unit")))?;
        seg.begin(seq, deadline_ms, request_id);
        let left = Duration::from_millis(
            deadline_ms
                .saturating_sub(spore_registry::store::now_unix_ms())
                .max(1),
        );
        seg.deliver(edge, value, left)
            .await
            .map_err(|e| ControlError::Internal(format!("DAG segment {key}, edge {edge}: {e}")))
    }

    /// `segment_close`: stops a segment and waits until its instances are destroyed.
    pub(crate) async fn close(&self, key: &str) {
        let seg = self.segments.lock().expect("segments lock").remove(key);
        if let Some(seg) = seg.and_then(|s| Arc::try_unwrap(s).ok()) {
            seg.close().await;
        }
    }
}

impl spore_cluster::SegmentHost for Dags {
    fn open(
        &self,
        key: String,
        spec: DagSpec,
        units: Vec<u32>,
        functions: Vec<(spore_core::FunctionManifest, String)>,
        neighbours: Vec<(u32, String)>,
    ) -> spore_cluster::BoxFuture<'_, Result<Answer, ControlError>> {
        Box::pin(
            self.inner
                .segments
                .open(self, key, spec, units, functions, neighbours),
        )
    }

    fn deliver<'a>(
        &'a self,
        key: &'a str,
        seq: u64,
        edge: usize,
        value: Value,
        deadline_ms: u64,
        request_id: &'a str,
    ) -> spore_cluster::BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(
            self.inner
                .segments
                .deliver(key, seq, edge, value, deadline_ms, request_id),
        )
    }

    fn close<'a>(&'a self, key: &'a str) -> spore_cluster::BoxFuture<'a, ()> {
        Box::pin(self.inner.segments.close(key))
    }

    fn set_link(&self, link: Link) {
        self.inner.segments.set_link(link);
    }

    fn clear(&self) {
        self.inner.segments.clear();
    }
}
