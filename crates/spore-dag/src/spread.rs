//! DAG pipelines spread over processing units.
//!
//! When some nodes of a fixed DAG (no `each` node) are placed on other units, its pipeline is
//! cut into one **segment** per unit. A segment is what a local pipeline is, for the nodes
//! of one unit: one instance per node, kept between invocations, blocked on shared-memory
//! rings. Edges with both ends on the unit stay rings between the two instances. An edge
//! that crosses units becomes two daemon-held ends: an **exit** on the producer's unit (a
//! ring whose consumer is a thread of that unit's daemon) and an **entry** on the
//! consumer's unit (a ring the daemon writes into). Values travel between the two over the
//! neighbour link as `edge_value` calls. Shims only link to the control plane, so a value
//! between two shims passes through it.
//!
//! The control plane numbers the edges (see [`spore_shim::proto::spread_edges`]), builds its
//! own segment, asks each other unit to build its one (`segment_open`) and routes: the DAG's
//! input to the entries of the sources, every value leaving a segment to the entry of its
//! consumer, and the value on the sink's exit is the result. Each segment's nodes report
//! their timing through their pages; units send theirs with the values they emit.
//!
//! Failure: a node failing on any unit ends the run and the whole pipeline (every segment is
//! closed and its instances destroyed), as a local pipeline does; a unit whose link closes
//! loses its segments (the shim drops them), and the control plane's run fails naming the
//! unit.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spore_core::dag::DagSpec;
use spore_core::{FunctionError, StartKind};
use spore_ipc::edge::{EdgeReceiver, EdgeSender, Value};
use spore_ipc::page::NodePage;
use spore_ipc::ring::{Consumer, Producer};
use spore_ipc::IpcError;
use spore_runtime::protocol::{EventShape, PipelineWiring};
use spore_shim::proto::{spread_edges, NodeTimes};
use spore_shim::{Answer, Call, Link};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use spore_cluster::SegmentEvent as Event;
use spore_core::ControlError;
use spore_registry::FunctionRecord;

use crate::{new_edge, ring_fds, Dags, Launch, NodeFailure, NodeRun, Outcome, Plan, INLINE_MAX};

/// How often an exit's thread looks at its stop flag.
const POLL_SLICE: Duration = Duration::from_millis(10);
/// How long a unit holds the sink's result back for its nodes' timing (a node writes its
/// timing just after its result).
const SLOT_WAIT: Duration = Duration::from_millis(2);
/// How long a unit still waits for late timing (a loaded host) to report it.
const LATE_TIMING: Duration = Duration::from_millis(50);
/// Time allowed for a unit to build its segment (instances may start cold).
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed for a unit to stop a segment.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The invocation a segment's pages are set up for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Invocation {
    seq: u64,
    deadline_ms: u64,
    request_id: String,
}

/// Where a segment's events go: the control plane's router, or a shim's link.
pub(crate) type Reporter = Arc<dyn Fn(Event) + Send + Sync>;

/// One unit's part of a pipeline.
pub(crate) struct Segment {
    /// Its nodes (index in the DAG) and their pages.
    pages: Arc<Vec<(usize, NodePage)>>,
    /// The daemon's producing ends of the edges entering the segment, by edge.
    entries: Arc<Mutex<HashMap<usize, EdgeSender>>>,
    /// The invocation the pages' headers hold.
    seq: Arc<Mutex<Invocation>>,
    /// How each node's instance started (node, start).
    pub(crate) starts: Vec<(usize, StartKind)>,
    cancel: watch::Sender<bool>,
    stop: Arc<AtomicBool>,
    members: Vec<JoinHandle<()>>,
}

impl Drop for Segment {
    fn drop(&mut self) {
        // The members destroy their instances; the exits' threads end within a slice.
        let _ = self.cancel.send(true);
        self.stop.store(true, Ordering::Release);
    }
}

impl Segment {
    /// Writes invocation `seq`'s header into every page (once per invocation).
    pub(crate) fn begin(&self, seq: u64, deadline_ms: u64, request_id: &str) {
        let mut cur = self.seq.lock().expect("segment seq lock");
        if seq > cur.seq {
            for (_, p) in self.pages.iter() {
                p.write_header(seq, deadline_ms, request_id);
            }
            *cur = Invocation {
                seq,
                deadline_ms,
                request_id: request_id.to_owned(),
            };
        }
    }

    /// Puts `value` on entry `edge`. Small values go straight into the ring when it has
    /// room; otherwise a blocking task waits for room up to `left`.
    pub(crate) async fn deliver(
        &self,
        edge: usize,
        value: Value,
        left: Duration,
    ) -> Result<(), IpcError> {
        if value.bytes.len() <= INLINE_MAX {
            let mut entries = self.entries.lock().expect("entries lock");
            let s = entries.get_mut(&edge).ok_or_else(|| no_entry(edge))?;
            match s.send(&value, Duration::ZERO) {
                Err(IpcError::Timeout(_)) => {}
                done => return done,
            }
        }
        let entries = self.entries.clone();
        tokio::task::spawn_blocking(move || {
            let mut entries = entries.lock().expect("entries lock");
            let s = entries.get_mut(&edge).ok_or_else(|| no_entry(edge))?;
            s.send(&value, left)
        })
        .await
        .map_err(|e| IpcError::Corrupt(format!("the delivery task failed: {e}")))?
    }

    /// The timing its nodes reported for invocation `seq` so far.
    fn times(&self, seq: u64) -> Vec<NodeTimes> {
        slot_times(&self.pages, seq)
    }

    /// Stops it and waits until its instances are destroyed.
    pub(crate) async fn close(mut self) {
        let _ = self.cancel.send(true);
        for m in std::mem::take(&mut self.members) {
            let _ = m.await;
        }
    }
}

fn no_entry(edge: usize) -> IpcError {
    IpcError::Corrupt(format!("edge {edge} does not enter this segment"))
}

fn slot_times(pages: &[(usize, NodePage)], seq: u64) -> Vec<NodeTimes> {
    pages
        .iter()
        .filter_map(|(n, p)| {
            p.slot(seq).map(|t| NodeTimes {
                node: *n,
                inputs_ns: t.inputs_ns,
                start_ns: t.start_ns,
                end_ns: t.end_ns,
                sent_ns: t.sent_ns,
            })
        })
        .collect()
}

/// A DAG's predecessor lists and sink, from its spec.
pub(crate) fn graph(spec: &DagSpec) -> (Vec<Vec<usize>>, usize) {
    let index: BTreeMap<&str, usize> = spec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let preds: Vec<Vec<usize>> = spec
        .nodes
        .iter()
        .map(|n| n.after.iter().map(|a| index[a.as_str()]).collect())
        .collect();
    let sink = (0..spec.nodes.len())
        .find(|&i| !preds.iter().any(|ps| ps.contains(&i)))
        .expect("a validated DAG has a sink");
    (preds, sink)
}

/// What an exit's thread shares with its segment: the pages, the current invocation and
/// the stop flag.
type ExitParts = (
    Arc<Vec<(usize, NodePage)>>,
    Arc<Mutex<Invocation>>,
    Arc<AtomicBool>,
);

/// The exit of `edge`, fed by `node`: a thread that reads values and reports them.
fn spawn_exit(
    edge: usize,
    node: usize,
    to_output: bool,
    mut rx: EdgeReceiver,
    seg: ExitParts,
    report: Reporter,
) -> Result<(), ControlError> {
    let (pages, seq, stop) = seg;
    std::thread::Builder::new()
        .name(format!("spore-exit-{edge}"))
        .spawn(move || loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let value = match rx.recv(POLL_SLICE) {
                Ok(v) => v,
                Err(IpcError::Timeout(_)) => continue,
                Err(e) => {
                    // A ring or payload the producer broke: the run fails naming it (if its
                    // instance died instead, its member reports that too; the first wins).
                    let s = seq.lock().expect("segment seq lock").seq;
                    let error = FunctionError::platform(
                        "Spore.DagEdge",
                        format!("reading its result: {e}"),
                    );
                    report(Event::Failed {
                        seq: s,
                        node,
                        error,
                    });
                    return;
                }
            };
            let inv = seq.lock().expect("segment seq lock").clone();
            let s = inv.seq;
            // Polls the pages: briefly at first (a node writes its timing right after its
            // result), then every half millisecond, so that a late node does not cost a CPU.
            let wait_for = |pred: &dyn Fn(&[NodeTimes]) -> bool, limit: Duration| {
                let t0 = Instant::now();
                loop {
                    let t = slot_times(&pages, s);
                    if pred(&t) || t0.elapsed() >= limit {
                        return t;
                    }
                    if t0.elapsed() < Duration::from_micros(200) {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(500));
                    }
                }
            };
            // The DAG's result carries the timing of every node of the segment; any other
            // value goes at once. Timing that is not in yet follows.
            let all = |t: &[NodeTimes]| t.len() == pages.len();
            let (times, late) = if to_output {
                let t = wait_for(&all, SLOT_WAIT);
                let late = !all(&t);
                (t, late)
            } else {
                (Vec::new(), true)
            };
            report(Event::Value {
                seq: s,
                deadline_ms: inv.deadline_ms,
                request_id: inv.request_id,
                edge,
                value,
                times,
            });
            if late {
                let times = if to_output {
                    wait_for(&all, LATE_TIMING)
                } else {
                    wait_for(&|t| t.iter().any(|x| x.node == node), LATE_TIMING)
                };
                report(Event::Times { seq: s, times });
            }
        })
        .map(|_| ())
        .map_err(|e| ControlError::Internal(format!("starting an edge thread: {e}")))
}

impl Dags {
    /// Builds this unit's segment of `spec` spread over `units` (one per node): `recs` are
    /// the nodes placed here. `Ok(Err)` is a function's init failure (nothing is kept).
    pub(crate) async fn build_segment(
        &self,
        spec: &DagSpec,
        units: &[u32],
        recs: BTreeMap<usize, FunctionRecord>,
        request_id: &str,
        report: Reporter,
    ) -> Result<Result<Segment, (usize, FunctionError)>, ControlError> {
        let me = self.inner.units.local().id;
        let (preds, sink) = graph(spec);
        let edges = spread_edges(&preds, sink);
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            ControlError::Internal(format!(
                "building unit {me}'s segment of DAG {:?}: {what}: {e}",
                spec.name
            ))
        };
        let here = |x: Option<usize>| x.is_some_and(|n| units[n] == me);
        let mut launches: BTreeMap<usize, Launch> = recs
            .keys()
            .map(|&n| (n, Launch::pipeline_node(n, &spec.nodes[n].id)))
            .collect();
        let mut items: BTreeMap<usize, Vec<EventShape>> = BTreeMap::new();
        let mut entries = HashMap::new();
        let mut exits = Vec::new();
        for (k, &(from, to)) in edges.iter().enumerate() {
            let (f, t) = (here(from), here(to));
            if !f && !t {
                continue;
            }
            let e = new_edge()?;
            if f {
                let p = launches.get_mut(&from.expect("here")).expect("a launch");
                let out = p.push_edge(e.producer);
                p.wiring.outputs.push(out);
            } else {
                let (fds, sock) = ring_fds(e.producer);
                let ring = Producer::open(fds).map_err(|e| internal("an entry", &e))?;
                entries.insert(
                    k,
                    EdgeSender {
                        ring,
                        sock,
                        inline_max: INLINE_MAX,
                    },
                );
            }
            if t {
                let c = to.expect("here");
                let l = launches.get_mut(&c).expect("a launch");
                let fds = l.push_edge(e.consumer);
                items.entry(c).or_default().push(EventShape::Ring { fds });
            } else {
                let (fds, sock) = ring_fds(e.consumer);
                let ring = Consumer::open(fds).map_err(|e| internal("an exit", &e))?;
                exits.push((k, from.expect("here"), to.is_none(), ring, sock));
            }
        }
        let mut pages = Vec::with_capacity(launches.len());
        for (n, l) in &mut launches {
            let mut it = items.remove(n).unwrap_or_default();
            l.wiring.event = if it.len() == 1 {
                it.pop().expect("one")
            } else {
                EventShape::List { items: it }
            };
            let (page, fd) = NodePage::create().map_err(|e| internal("a node's page", &e))?;
            l.wiring.pipeline = Some(PipelineWiring { page: l.fds.len() });
            l.fds.push(fd);
            l.wiring.fds = l.fds.len();
            pages.push((*n, page));
        }
        let instances = match self
            .acquire_each(recs.iter().map(|(&n, r)| (n, r.clone())).collect())
            .await?
        {
            Ok(i) => i,
            Err(f) => return Ok(Err(f)),
        };
        let seq = Arc::new(Mutex::new(Invocation::default()));
        let (cancel, cancel_rx) = watch::channel(false);
        let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<(usize, FunctionError)>();
        let mut members = Vec::with_capacity(launches.len());
        let mut starts = Vec::with_capacity(launches.len());
        for ((n, l), (inst, start)) in launches.into_iter().zip(instances) {
            starts.push((n, start));
            members.push(self.spawn_member(
                recs[&n].clone(),
                l,
                inst,
                request_id,
                cancel_rx.clone(),
                fail_tx.clone(),
            ));
        }
        {
            let (seq, report) = (seq.clone(), report.clone());
            members.push(tokio::spawn(async move {
                while let Some((node, error)) = fail_rx.recv().await {
                    let seq = seq.lock().expect("segment seq lock").seq;
                    report(Event::Failed { seq, node, error });
                }
            }));
        }
        let pages = Arc::new(pages);
        let stop = Arc::new(AtomicBool::new(false));
        let seg = Segment {
            pages: pages.clone(),
            entries: Arc::new(Mutex::new(entries)),
            seq: seq.clone(),
            starts,
            cancel,
            stop: stop.clone(),
            members,
        };
        for (k, node, to_output, ring, sock) in exits {
            let rx = EdgeReceiver { ring, sock };
            let parts = (pages.clone(), seq.clone(), stop.clone());
            spawn_exit(k, node, to_output, rx, parts, report.clone())?;
        }
        Ok(Ok(seg))
    }
}

/// The control plane's part of a spread pipeline: its own segment, the other units'
/// segments (by their links) and the router's inbox.
pub(crate) struct Spread {
    key: String,
    /// The unit of each node.
    pub(super) units: Vec<u32>,
    edges: Vec<(Option<usize>, Option<usize>)>,
    local: Option<Segment>,
    remotes: BTreeMap<u32, Link>,
    inbox: mpsc::UnboundedReceiver<Event>,
    /// How each node's instance started.
    starts: Vec<StartKind>,
    routes: Arc<spore_cluster::Units>,
    /// Tasks that report a unit's link closing.
    watchers: Vec<tokio::task::AbortHandle>,
}

impl Drop for Spread {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
        self.routes.unroute(&self.key);
        let remotes = std::mem::take(&mut self.remotes);
        if remotes.is_empty() {
            return;
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let key = self.key.clone();
            h.spawn(close_remotes(key, remotes));
        }
    }
}

async fn close_remotes(key: String, remotes: BTreeMap<u32, Link>) {
    for (unit, link) in remotes {
        let call = Call::SegmentClose { key: key.clone() };
        if let Err(e) = link.call(&call, Bytes::new(), CLOSE_TIMEOUT).await {
            tracing::debug!(unit, error = %e, "closing a DAG segment");
        }
    }
}

impl Spread {
    /// Whether its segments are still there (every unit's link is up).
    pub(super) fn alive(&self) -> bool {
        self.remotes.values().all(|l| l.close_reason().is_none())
    }

    /// Stops every segment and waits for this unit's instances to be destroyed.
    pub(super) async fn close(mut self) {
        let remotes = std::mem::take(&mut self.remotes);
        close_remotes(self.key.clone(), remotes).await;
        if let Some(seg) = self.local.take() {
            seg.close().await;
        }
    }
}

impl Dags {
    /// Builds a spread pipeline for `plan` with nodes on `units`: this unit's segment and
    /// every other unit's (asking each over its link, sending code where a unit lacks it).
    pub(super) async fn build_spread(
        &self,
        plan: &Plan,
        units: Vec<u32>,
        request_id: &str,
    ) -> Result<Result<Spread, NodeFailure>, ControlError> {
        let me = self.inner.units.local().id;
        let key = uuid::Uuid::new_v4().to_string();
        let (tx, inbox) = mpsc::unbounded_channel();
        let routes = self.inner.units.clone();
        routes.route(&key, tx.clone());
        let (preds, _) = graph(&plan.spec);
        let mut spread = Spread {
            key: key.clone(),
            edges: spread_edges(&preds, plan.sink),
            units,
            local: None,
            remotes: BTreeMap::new(),
            inbox,
            starts: vec![StartKind::Warm; plan.spec.nodes.len()],
            routes,
            watchers: Vec::new(),
        };
        let mut by_unit: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (n, &u) in spread.units.iter().enumerate() {
            by_unit.entry(u).or_default().push(n);
        }
        let mut neighbours = self.inner.units.neighbour_addrs();
        neighbours.retain(|u, _| by_unit.contains_key(u));
        for (&u, nodes) in &by_unit {
            if u == me {
                continue;
            }
            let link = match self.inner.units.link_of(u) {
                Some(l) => l,
                None => {
                    return Err(ControlError::Unavailable(format!(
                        "unit {u} went down while DAG {:?} was being set up",
                        plan.spec.name
                    )))
                }
            };
            let mut functions: Vec<(spore_core::FunctionManifest, String)> = Vec::new();
            for &n in nodes {
                let r = &plan.recs[n];
                if !functions.iter().any(|(m, _)| m.name == r.manifest.name) {
                    functions.push((r.manifest.clone(), r.code_hex.clone()));
                }
            }
            let call = Call::SegmentOpen {
                key: key.clone(),
                spec: plan.spec.clone(),
                units: spread.units.clone(),
                functions,
                neighbours: neighbours.clone().into_iter().collect(),
            };
            let mut deployed = false;
            let answer = loop {
                match link.call(&call, Bytes::new(), OPEN_TIMEOUT).await {
                    Ok((a, _)) => break a,
                    Err(spore_shim::LinkError::Remote(e))
                        if e.kind == spore_shim::RemoteErrorKind::NeedsCode && !deployed =>
                    {
                        deployed = true;
                        let mut sent = std::collections::BTreeSet::new();
                        for &n in nodes {
                            if sent.insert(&plan.recs[n].manifest.name) {
                                self.inner.units.deploy_to(&plan.recs[n], u, &link).await?;
                            }
                        }
                    }
                    Err(e) => {
                        let name = format!("DAG {}", plan.spec.name);
                        return Err(self.inner.units.link_failure(&name, u, &link, e));
                    }
                }
            };
            let (l, tx) = (link.clone(), tx.clone());
            let watcher = tokio::spawn(async move {
                let reason = l.closed().await;
                let _ = tx.send(Event::UnitDown { unit: u, reason });
            });
            spread.watchers.push(watcher.abort_handle());
            spread.remotes.insert(u, link);
            match answer {
                Answer::SegmentOpened {
                    failed: Some((n, e)),
                    ..
                } if n < plan.spec.nodes.len() => return Ok(Err(plan.failure(n, e))),
                Answer::SegmentOpened { starts, .. } if starts.len() == nodes.len() => {
                    for (&n, s) in nodes.iter().zip(starts) {
                        spread.starts[n] = s;
                    }
                }
                other => {
                    return Err(ControlError::Internal(format!(
                        "unit {u} answered a segment's set-up with {other:?}"
                    )))
                }
            }
        }
        if let Some(nodes) = by_unit.get(&me) {
            let recs = nodes.iter().map(|&n| (n, plan.recs[n].clone())).collect();
            // A value leaving this unit's segment for another unit goes there straight from
            // the exit's thread; everything else goes through the router.
            let direct = DirectExit {
                key: key.clone(),
                edges: spread.edges.clone(),
                units: spread.units.clone(),
                remotes: spread.remotes.clone(),
                handle: tokio::runtime::Handle::current(),
            };
            let report: Reporter = Arc::new(move |ev| match ev {
                Event::Value {
                    seq,
                    deadline_ms,
                    request_id,
                    edge,
                    value,
                    ..
                } if direct.remote(edge).is_some() => {
                    if let Err(failed) = direct.send(seq, deadline_ms, request_id, edge, value) {
                        let _ = tx.send(failed);
                    }
                }
                ev => {
                    let _ = tx.send(ev);
                }
            });
            let units = spread.units.clone();
            let seg = match self
                .build_segment(&plan.spec, &units, recs, request_id, report)
                .await?
            {
                Ok(s) => s,
                Err((n, e)) => return Ok(Err(plan.failure(n, e))),
            };
            for &(n, s) in &seg.starts {
                spread.starts[n] = s;
            }
            spread.local = Some(seg);
        }
        Ok(Ok(spread))
    }

    /// One invocation on a spread pipeline (`seq`); the flag says whether it can serve
    /// again.
    pub(super) async fn run_spread(
        &self,
        plan: &Plan,
        sp: &mut Spread,
        seq: u64,
        input: &[u8],
        request_id: &str,
    ) -> (Outcome, bool) {
        let me = self.inner.units.local().id;
        let path = plan.deadlines(|_| true);
        let total = path.iter().copied().max().unwrap_or_default();
        let t0 = Instant::now();
        let deadline_ms = spore_registry::store::now_unix_ms() + total.as_millis() as u64;
        if let Some(seg) = &sp.local {
            seg.begin(seq, deadline_ms, request_id);
        }
        let mut times: BTreeMap<usize, NodeTimes> = BTreeMap::new();
        // Leftovers of earlier invocations are dropped; a failure is not.
        while let Ok(ev) = sp.inbox.try_recv() {
            match ev {
                Event::Failed { node, error, .. } => {
                    let f = plan.failure(known(plan, node), error);
                    return ((Err(f), false, Vec::new()), false);
                }
                Event::UnitDown { unit, reason } => {
                    let f = unit_down(plan, sp, &times, unit, &reason);
                    return ((Err(f), false, Vec::new()), false);
                }
                _ => {}
            }
        }
        let input = Value {
            raw: false,
            bytes: if input.is_empty() {
                b"{}".to_vec()
            } else {
                input.to_vec()
            },
        };
        let ctx = Delivery {
            seq,
            deadline_ms,
            request_id: request_id.to_owned(),
            end_at: t0 + total,
            me,
        };
        for k in 0..sp.edges.len() {
            if sp.edges[k].0.is_none() {
                if let Err(f) = self.route(plan, sp, &ctx, k, input.clone()).await {
                    return ((Err(f), false, Vec::new()), false);
                }
            }
        }
        let failure = loop {
            let culprit = plan.order.iter().copied().find(|n| !times.contains_key(n));
            let wake = culprit.map_or(t0 + total, |n| t0 + path[n]);
            tokio::select! {
                ev = sp.inbox.recv() => match ev {
                    None => break plan.failure(plan.sink, FunctionError::platform("Spore.DagPipeline", "the pipeline's router closed")),
                    Some(Event::Failed { node, error, .. }) => break plan.failure(known(plan, node), error),
                    Some(Event::UnitDown { unit, reason }) => break unit_down(plan, sp, &times, unit, &reason),
                    Some(Event::Times { seq: s, times: t }) if s == seq => {
                        times.extend(t.into_iter().map(|t| (t.node, t)));
                    }
                    Some(Event::Value { seq: s, edge, value, times: t, .. }) if s == seq => {
                        times.extend(t.into_iter().map(|t| (t.node, t)));
                        if sp.edges.get(edge).is_some_and(|e| e.1.is_none()) {
                            let runs = self.spread_runs(plan, sp, seq, times).await;
                            sp.starts.fill(StartKind::Warm);
                            return ((Ok(value.bytes), value.raw, runs), true);
                        }
                        if let Err(f) = self.route(plan, sp, &ctx, edge, value).await {
                            break f;
                        }
                    }
                    Some(_) => {}
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    if let Some(n) = culprit {
                        if Instant::now() >= t0 + path[n] && !times.contains_key(&n) {
                            let seconds = plan.recs[n].manifest.timeout_s;
                            break plan.failure(n, spore_pool::InvokeFailure::Timeout { seconds }.to_function_error());
                        }
                    }
                }
            }
        };
        ((Err(failure), false, Vec::new()), false)
    }

    /// Sends `value` on edge `k` to its consumer's segment (here, or on another unit).
    async fn route(
        &self,
        plan: &Plan,
        sp: &Spread,
        ctx: &Delivery,
        k: usize,
        value: Value,
    ) -> Result<(), NodeFailure> {
        let Some((_, Some(c))) = sp.edges.get(k).copied() else {
            return Err(plan.failure(
                plan.sink,
                FunctionError::platform("Spore.DagEdge", format!("no edge {k} in this DAG")),
            ));
        };
        let left = ctx
            .end_at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let unit = sp.units[c];
        if unit == ctx.me {
            let seg = sp.local.as_ref().expect("a local node has a local segment");
            return seg.deliver(k, value, left).await.map_err(|e| {
                plan.failure(
                    c,
                    FunctionError::platform("Spore.DagEdge", format!("delivering its input: {e}")),
                )
            });
        }
        let link = sp.remotes[&unit].clone();
        let call = Call::EdgeValue {
            key: sp.key.clone(),
            seq: ctx.seq,
            edge: k,
            raw: value.raw,
            deadline_ms: ctx.deadline_ms,
            request_id: ctx.request_id.clone(),
            times: Vec::new(),
        };
        let (routes, key, seq) = (self.inner.units.clone(), sp.key.clone(), ctx.seq);
        // The router goes on while the value travels; a failed delivery ends the run.
        tokio::spawn(async move {
            if let Err(e) = link.call(&call, Bytes::from(value.bytes), left).await {
                let error = FunctionError::platform(
                    "Spore.DagLink",
                    format!("delivering its input on unit {unit}: {e}"),
                );
                routes.deliver(
                    &key,
                    Event::Failed {
                        seq,
                        node: c,
                        error,
                    },
                );
            }
        });
        Ok(())
    }

    /// The nodes' timing once the result is in: this unit's from its pages, the others'
    /// from their reports (waiting briefly for the last ones).
    async fn spread_runs(
        &self,
        plan: &Plan,
        sp: &mut Spread,
        seq: u64,
        mut times: BTreeMap<usize, NodeTimes>,
    ) -> Vec<NodeRun> {
        let n_nodes = plan.spec.nodes.len();
        // Usually every node's timing is in by now; the result is not held back for late
        // timing beyond a moment (timing is best effort, as in a local pipeline).
        let until = Instant::now() + SLOT_WAIT;
        loop {
            if let Some(seg) = &sp.local {
                times.extend(seg.times(seq).into_iter().map(|t| (t.node, t)));
            }
            if times.len() == n_nodes || Instant::now() >= until {
                break;
            }
            tokio::select! {
                Some(ev) = sp.inbox.recv() => match ev {
                    Event::Times { seq: s, times: t } | Event::Value { seq: s, times: t, .. } if s == seq => {
                        times.extend(t.into_iter().map(|t| (t.node, t)));
                    }
                    _ => {}
                },
                _ = tokio::time::sleep(Duration::from_micros(200)) => {}
            }
        }
        let mut runs = Vec::new();
        let mut ends: Vec<Vec<u64>> = vec![Vec::new(); n_nodes];
        for (&n, t) in &times {
            if n >= n_nodes {
                continue;
            }
            let mut run = plan.node_run(
                n,
                0,
                sp.starts[n],
                (t.start_ns, t.end_ns),
                Some((t.inputs_ns, t.sent_ns)),
            );
            run.unit = sp.units[n];
            runs.push(run);
            ends[n].push(t.end_ns);
        }
        crate::fill_hops(plan, &ends, &mut runs);
        runs.sort_by(|a, b| a.handler_end_us.total_cmp(&b.handler_end_us));
        runs
    }
}

/// `node` if the DAG has it, else its sink (a unit's report named a node that does not
/// exist: the run still fails, under the sink's name).
fn known(plan: &Plan, node: usize) -> usize {
    if node < plan.spec.nodes.len() {
        node
    } else {
        plan.sink
    }
}

/// The failure of a run whose unit `unit` went down: named after the first node there that
/// had not finished.
fn unit_down(
    plan: &Plan,
    sp: &Spread,
    times: &BTreeMap<usize, NodeTimes>,
    unit: u32,
    reason: &str,
) -> NodeFailure {
    let on_unit = |n: &usize| sp.units[*n] == unit;
    let node = plan
        .order
        .iter()
        .copied()
        .filter(on_unit)
        .find(|n| !times.contains_key(n))
        .or_else(|| plan.order.iter().copied().find(on_unit))
        .unwrap_or(plan.sink);
    plan.failure(
        node,
        FunctionError::platform(
            "Spore.UnitDown",
            format!("unit {unit} went down while running it: {reason}"),
        ),
    )
}

/// Sends the values of this unit's exits whose consumers are on other units, from the
/// exit's thread (one hand-off fewer than through the router).
struct DirectExit {
    key: String,
    edges: Vec<(Option<usize>, Option<usize>)>,
    units: Vec<u32>,
    remotes: BTreeMap<u32, Link>,
    handle: tokio::runtime::Handle,
}

impl DirectExit {
    /// The consumer of `edge` and its unit's link, if it is on another unit.
    fn remote(&self, edge: usize) -> Option<(usize, &Link)> {
        let c = self.edges.get(edge)?.1?;
        Some((c, self.remotes.get(&self.units[c])?))
    }

    /// Sends a value and waits for the unit to take it; the failure to report if it did not.
    fn send(
        &self,
        seq: u64,
        deadline_ms: u64,
        request_id: String,
        edge: usize,
        value: Value,
    ) -> Result<(), Event> {
        let (c, link) = self.remote(edge).expect("checked by the caller");
        let call = Call::EdgeValue {
            key: self.key.clone(),
            seq,
            edge,
            raw: value.raw,
            deadline_ms,
            request_id,
            times: Vec::new(),
        };
        let left = Duration::from_millis(
            deadline_ms
                .saturating_sub(spore_registry::store::now_unix_ms())
                .max(1),
        );
        let sent = self
            .handle
            .block_on(link.call(&call, Bytes::from(value.bytes), left));
        sent.map(|_| ()).map_err(|e| Event::Failed {
            seq,
            node: c,
            error: FunctionError::platform(
                "Spore.DagLink",
                format!("delivering its input on unit {}: {e}", self.units[c]),
            ),
        })
    }
}

/// One invocation's particulars, for deliveries.
struct Delivery {
    seq: u64,
    deadline_ms: u64,
    request_id: String,
    end_at: Instant,
    me: u32,
}
