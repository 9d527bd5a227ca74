//! The DAG engine: runs a [`DagSpec`] as a whole, node by node, over shared memory (`shm`)
//! or over HTTP through the gateway (`http`, the baseline).
//!
//! **shm.** Nodes are launched in waves. A wave is every node whose predecessors are launched
//! and whose instance count is known (an `each` node's count is the length of its
//! predecessor's output, so it waits for that predecessor to finish). All instances of a wave
//! are acquired first (warm, or started: cfork or container), then every edge inside the wave
//! gets a ring (a memfd with eventfd doorbells, see `spore-ipc`) plus a Unix socket for large
//! payloads (sealed memfds), and every instance gets its wiring at once: producers write their
//! result straight into their consumers' rings, consumers block on them. Edges that cross
//! waves (into `each` nodes, and any edge leaving a wave) are relayed: the producer returns
//! its result in its reply and the daemon hands it to the next wave in the frame body.
//!
//! **http.** A node runs once all its predecessors finished; the engine posts its event to the
//! gateway's Invoke API (`/2015-03-31/functions/{name}/invocations`) like any client would, and
//! builds the next events from the JSON results.
//!
//! Failure: the first node that raises, times out or dies ends the run; the instances still
//! running (blocked on edges) are destroyed, finished ones go back to their pool, and every
//! ring and memfd is closed with the last descriptor that referred to it.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use serde::Serialize;
use spore_core::dag::{DagSpec, Transport};
use spore_core::{FunctionError, StartKind};
use spore_runtime::protocol::{DagWiring, EdgeFds, EventShape, PayloadKind, Segment};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::instance::{Instance, Reply};

pub(crate) mod pipeline;
pub(crate) mod spread;
use crate::registry::FunctionRecord;
use crate::{Control, ControlError};

/// Data bytes of each edge's ring.
const RING_CAPACITY: usize = 64 * 1024;
/// Results up to this size travel through the ring; larger ones as sealed memfds.
pub const INLINE_MAX: usize = 16 * 1024;
/// How long a consumer polls its ring before sleeping on the doorbell, us. On a VM, a
/// sleeping consumer takes 50-250 us to wake (measured on these machines); polling is what
/// makes a hop take microseconds, at the price of a busy CPU while it waits.
const SPIN_US: u64 = 2000;
/// Most instances one node may run (an `each` node over a longer list is an error).
pub const MAX_FANOUT: usize = 256;

/// Options of one DAG invocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct DagInvokeOptions {
    /// Overrides the DAG's transport.
    pub transport: Option<Transport>,
}

/// The node that failed, and how.
#[derive(Debug, Clone)]
pub struct NodeFailure {
    /// Node id.
    pub node: String,
    /// Its function.
    pub function: String,
    /// The error.
    pub error: FunctionError,
}

impl NodeFailure {
    /// The failure as the DAG's error: the node's error type, its message prefixed with the
    /// node.
    pub fn to_function_error(&self) -> FunctionError {
        FunctionError {
            error_type: self.error.error_type.clone(),
            message: format!(
                "node {:?} (function {}) failed: {}",
                self.node, self.function, self.error.message
            ),
            stack_trace: self.error.stack_trace.clone(),
        }
    }
}

/// Timing of one node instance.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRun {
    /// Node id.
    pub node: String,
    /// Instance index (`each` nodes run several).
    pub index: usize,
    /// Function.
    pub function: String,
    /// How its instance started.
    pub start: &'static str,
    /// Handler run time, ms.
    pub handler_ms: f64,
    /// Handler start, us after the DAG invocation began.
    pub handler_start_us: f64,
    /// Handler end, us after the DAG invocation began.
    pub handler_end_us: f64,
    /// (shm) When every input had arrived, us after the DAG invocation began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs_us: Option<f64>,
    /// (shm) When the result was on every output edge, us after the DAG invocation began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_us: Option<f64>,
    /// From the last predecessor's handler returning to this handler starting, us: one hop
    /// (encode, transfer, wake-up, decode). None for nodes without predecessors.
    pub hop_us: Option<f64>,
    /// The processing unit that ran it.
    pub unit: u32,
}

/// The outcome of a DAG invocation.
#[derive(Debug)]
pub struct DagRun {
    /// Request id.
    pub request_id: String,
    /// The transport used.
    pub transport: Transport,
    /// Some nodes run on other processing units: the control plane relayed every hop (over
    /// the neighbour link for those nodes) instead of wiring shared memory.
    pub relayed: bool,
    /// Some nodes run on other processing units, on a pipeline spread over the units: shared
    /// memory within each unit, the neighbour link between them.
    pub spread: bool,
    /// The sink's output (JSON; raw bytes if the sink returned bytes), or the failure.
    pub outcome: Result<Vec<u8>, NodeFailure>,
    /// Whether the output is raw bytes rather than JSON.
    pub raw: bool,
    /// From the call to the result, ms.
    pub total_ms: f64,
    /// Per node instance, in completion order.
    pub nodes: Vec<NodeRun>,
}

/// A value relayed through the daemon.
#[derive(Debug, Clone)]
struct Value {
    kind: PayloadKind,
    bytes: Vec<u8>,
}

/// What the engine keeps of a finished node.
#[derive(Debug, Default, Clone)]
struct Done {
    /// Relayed values: one per instance, or (when it [splits](Plan::splits)) one per element
    /// of the one instance's list.
    values: Vec<Value>,
    /// `handler_end_ns` of each instance.
    ends: Vec<u64>,
}

/// The graph, resolved against the registry.
struct Plan {
    spec: DagSpec,
    preds: Vec<Vec<usize>>,
    succs: Vec<Vec<usize>>,
    order: Vec<usize>,
    sink: usize,
    recs: Vec<FunctionRecord>,
    /// The local unit's id.
    unit: u32,
}

impl Plan {
    fn new(control: &Control, spec: DagSpec) -> Result<Plan, ControlError> {
        let order = spec
            .order()
            .map_err(|e| ControlError::InvalidParameter(e.to_string()))?;
        let (preds, sink) = spread::graph(&spec);
        let mut succs = vec![Vec::new(); spec.nodes.len()];
        for (c, ps) in preds.iter().enumerate() {
            for &p in ps {
                succs[p].push(c);
            }
        }
        let mut recs = Vec::with_capacity(spec.nodes.len());
        for n in &spec.nodes {
            let rec = control.get_function(&n.function).map_err(|_| {
                ControlError::InvalidParameter(format!(
                    "DAG {:?}: node {:?} uses function {:?}, which does not exist",
                    spec.name, n.id, n.function
                ))
            })?;
            recs.push(rec);
        }
        Ok(Plan {
            spec,
            preds,
            succs,
            order,
            sink,
            recs,
            unit: control.inner.units.local().id,
        })
    }

    fn id(&self, n: usize) -> &str {
        &self.spec.nodes[n].id
    }

    fn each(&self, n: usize) -> bool {
        self.spec.nodes[n].each
    }

    /// Whether `n` returns its list one element per value (an `each` node follows it).
    fn splits(&self, n: usize) -> bool {
        self.succs[n].iter().any(|&c| self.each(c))
    }

    fn failure(&self, n: usize, error: FunctionError) -> NodeFailure {
        NodeFailure {
            node: self.id(n).to_owned(),
            function: self.spec.nodes[n].function.clone(),
            error,
        }
    }

    fn timeout(&self, n: usize) -> Duration {
        Duration::from_secs(u64::from(self.recs[n].manifest.timeout_s))
    }

    /// For each node for which `within` holds, by when it must be done after the run
    /// starts: the sum of the timeouts along its longest path through such nodes.
    fn deadlines(&self, within: impl Fn(usize) -> bool) -> Vec<Duration> {
        let mut path = vec![Duration::ZERO; self.spec.nodes.len()];
        for &n in self.order.iter().filter(|&&n| within(n)) {
            let before = self.preds[n]
                .iter()
                .filter(|&&p| within(p))
                .map(|&p| path[p])
                .max()
                .unwrap_or_default();
            path[n] = before + self.timeout(n);
        }
        path
    }

    /// The timing record of instance `index` of node `n` (`CLOCK_MONOTONIC` ns in; the hop
    /// is [filled in](fill_hops) once every predecessor is known). `edges`: when its inputs
    /// arrived and its result was sent, for shm runs.
    fn node_run(
        &self,
        n: usize,
        index: usize,
        start: StartKind,
        (start_ns, end_ns): (u64, u64),
        edges: Option<(u64, u64)>,
    ) -> NodeRun {
        let us = |ns: u64| ns as f64 / 1e3;
        NodeRun {
            node: self.id(n).to_owned(),
            index,
            function: self.spec.nodes[n].function.clone(),
            start: start.as_str(),
            handler_ms: end_ns.saturating_sub(start_ns) as f64 / 1e6,
            handler_start_us: us(start_ns),
            handler_end_us: us(end_ns),
            inputs_us: edges.map(|e| us(e.0)),
            sent_us: edges.map(|e| us(e.1)),
            hop_us: None,
            unit: self.unit,
        }
    }

    /// The number of instances of `n`, from its predecessor's result if it runs `each`.
    fn count(&self, n: usize, done: &[Option<Done>]) -> Result<usize, NodeFailure> {
        if !self.each(n) {
            return Ok(1);
        }
        let p = self.preds[n][0];
        let d = done[p]
            .as_ref()
            .expect("an each node waits for its predecessor");
        let k = d.values.len();
        if k > MAX_FANOUT {
            return Err(self.failure(
                n,
                FunctionError::platform(
                    "Spore.DagFanOutTooLarge",
                    format!(
                        "node {:?} returned a list of {k} elements; an `each` node runs at most {MAX_FANOUT} instances",
                        self.id(p)
                    ),
                ),
            ));
        }
        Ok(k)
    }
}

/// One instance's feed: where each part of its event comes from.
enum Feed {
    Input,
    Relayed(Value),
    Edge(usize),
    List(Vec<Feed>),
}

/// An edge between two instances of one wave.
struct Edge {
    producer: OwnedFdSet,
    consumer: OwnedFdSet,
}

type OwnedFdSet = [OwnedFd; 4];

fn new_edge() -> Result<Edge, ControlError> {
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        ControlError::Internal(format!("creating a DAG edge: {what}: {e}"))
    };
    let ring = spore_ipc::ring::create(RING_CAPACITY).map_err(|e| internal("ring", &e))?;
    let theirs = ring.try_clone().map_err(|e| internal("ring", &e))?;
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(|e| internal("socketpair", &e))?;
    Ok(Edge {
        producer: [ring.memory, ring.data_ready, ring.space_ready, a.into()],
        consumer: [
            theirs.memory,
            theirs.data_ready,
            theirs.space_ready,
            b.into(),
        ],
    })
}

/// What one instance of a wave gets.
struct Launch {
    node: usize,
    index: usize,
    wiring: DagWiring,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Launch {
    /// The launch of pipeline node `node` (id `id`): no edges yet, the input as its event.
    fn pipeline_node(node: usize, id: &str) -> Launch {
        Launch {
            node,
            index: 0,
            wiring: DagWiring {
                node: id.to_owned(),
                fds: 0,
                event: EventShape::Input,
                outputs: Vec::new(),
                reply: false,
                split: false,
                inline_max: INLINE_MAX,
                spin_us: 0,
                pipeline: None,
            },
            body: Vec::new(),
            fds: Vec::new(),
        }
    }

    fn push_edge(&mut self, set: OwnedFdSet) -> EdgeFds {
        let base = self.fds.len();
        self.fds.extend(set);
        [base, base + 1, base + 2, base + 3]
    }
}

/// What a finished instance task hands back.
struct Finished {
    node: usize,
    index: usize,
    start: StartKind,
    result: Result<Reply, FunctionError>,
}

impl Control {
    /// Runs a deployed DAG on `input` (JSON) and returns the sink's output.
    ///
    /// Like [`Control::invoke`], the run continues on a task of its own if its caller gives up,
    /// so that the instances it holds go back to their pools.
    pub async fn invoke_dag(
        &self,
        name: &str,
        input: &[u8],
        opts: DagInvokeOptions,
    ) -> Result<DagRun, ControlError> {
        let (me, name, input) = (self.clone(), name.to_owned(), input.to_vec());
        tokio::spawn(async move { me.invoke_dag_attached(&name, &input, opts).await })
            .await
            .map_err(|e| ControlError::Internal(format!("the DAG task failed: {e}")))?
    }

    async fn invoke_dag_attached(
        &self,
        name: &str,
        input: &[u8],
        opts: DagInvokeOptions,
    ) -> Result<DagRun, ControlError> {
        if input.len() > spore_runtime::protocol::MAX_BODY as usize {
            return Err(ControlError::RequestTooLarge {
                size: input.len(),
                limit: spore_runtime::protocol::MAX_BODY as usize,
                kind: "DAG",
            });
        }
        Self::check_json(input)?;
        self.inner
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _guard = crate::InflightGuard(&self.inner);
        if self
            .inner
            .draining
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(ControlError::Unavailable(
                "the daemon is shutting down".into(),
            ));
        }
        let spec = self.get_dag(name)?;
        let transport = opts.transport.unwrap_or(spec.transport);
        let plan = Plan::new(self, spec)?;
        let t0 = Instant::now();
        let t0_ns = crate::instance::monotonic_ns();
        let request_id = uuid::Uuid::new_v4().to_string();
        // Where each node runs. A fixed DAG with nodes on other units runs as a pipeline
        // spread over them (shared memory within a unit, the neighbour link between units);
        // any other DAG with such nodes is relayed hop by hop by the control plane.
        let me = self.inner.units.local().id;
        let mut units = Vec::with_capacity(plan.recs.len());
        for (rec, node) in plan.recs.iter().zip(&plan.spec.nodes) {
            units.push(match self.inner.units.place_node(rec, node.unit)? {
                crate::units::Placement::Local => me,
                crate::units::Placement::Remote { unit, .. } => unit,
            });
        }
        let spread = units.iter().any(|&u| u != me);
        let relayed = spread && !(transport == Transport::Shm && pipeline::pipelinable(&plan));
        let (outcome, raw, mut nodes) = match transport {
            _ if relayed => self.run_http(&plan, input, true).await?,
            Transport::Shm => {
                for (n, rec) in plan.recs.iter().enumerate() {
                    if rec.manifest.runtime != spore_core::Runtime::Python3 {
                        return Err(ControlError::InvalidParameter(format!(
                            "DAG {name:?}: node {:?} runs {} functions; the shm transport serves Python functions (use --transport http)",
                            plan.id(n),
                            rec.manifest.runtime
                        )));
                    }
                }
                if pipeline::pipelinable(&plan) {
                    self.run_pipelined(&plan, input, &request_id, units).await?
                } else {
                    self.run_shm(&plan, input, &request_id).await?
                }
            }
            Transport::Http => self.run_http(&plan, input, false).await?,
        };
        let origin = t0_ns as f64 / 1e3;
        for n in &mut nodes {
            n.handler_start_us -= origin;
            n.handler_end_us -= origin;
            for t in [&mut n.inputs_us, &mut n.sent_us].into_iter().flatten() {
                *t -= origin;
            }
        }
        metrics::counter!("spore_dag_invocations_total", "dag" => name.to_owned(), "transport" => transport.to_string()).increment(1);
        Ok(DagRun {
            request_id,
            transport,
            relayed,
            spread: spread && !relayed,
            outcome,
            raw,
            total_ms: t0.elapsed().as_secs_f64() * 1000.0,
            nodes,
        })
    }

    async fn run_shm(
        &self,
        plan: &Plan,
        input: &[u8],
        request_id: &str,
    ) -> Result<(Result<Vec<u8>, NodeFailure>, bool, Vec<NodeRun>), ControlError> {
        let n_nodes = plan.spec.nodes.len();
        let mut launched = vec![false; n_nodes];
        let mut done: Vec<Option<Done>> = vec![None; n_nodes];
        let mut runs = Vec::new();
        loop {
            // The next wave, in topological order.
            let mut wave = Vec::new();
            for &n in &plan.order {
                let ready = !launched[n]
                    && plan.preds[n].iter().all(|&p| launched[p])
                    && (!plan.each(n) || done[plan.preds[n][0]].is_some());
                if ready {
                    launched[n] = true;
                    wave.push(n);
                }
            }
            if wave.is_empty() {
                break;
            }
            let mut counts = vec![0usize; n_nodes];
            for &n in &wave {
                match plan.count(n, &done) {
                    Ok(k) => counts[n] = k,
                    Err(f) => return Ok((Err(f), false, runs)),
                }
            }
            if let Err(f) = self
                .run_wave(
                    plan, &wave, &counts, input, request_id, &mut done, &mut runs,
                )
                .await?
            {
                return Ok((Err(f), false, runs));
            }
        }
        let sink = done[plan.sink].take().expect("the sink ran");
        Ok(match sink_output(plan, sink) {
            Ok((bytes, raw)) => (Ok(bytes), raw, runs),
            Err(e) => (Err(plan.failure(plan.sink, e)), false, runs),
        })
    }

    /// Acquires, wires and runs the instances of one wave; `Ok(Err)` is a node's failure.
    #[allow(clippy::too_many_arguments)]
    async fn run_wave(
        &self,
        plan: &Plan,
        wave: &[usize],
        counts: &[usize],
        input: &[u8],
        request_id: &str,
        done: &mut [Option<Done>],
        runs: &mut Vec<NodeRun>,
    ) -> Result<Result<(), NodeFailure>, ControlError> {
        let in_wave = |n: usize| wave.contains(&n);
        self.check_fits(plan, wave.iter().map(|&n| (n, counts[n])))?;
        // Consumers poll only while there are CPUs for every instance of the wave: more
        // pollers than CPUs would starve the producers they wait for.
        let instances_in_wave: usize = wave.iter().map(|&n| counts[n]).sum();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let spin_us = if instances_in_wave <= cpus {
            SPIN_US
        } else {
            0
        };
        // The instances' wiring.
        let mut launches: Vec<Launch> = Vec::new();
        let mut slot = vec![0usize; plan.spec.nodes.len()];
        for &n in wave {
            slot[n] = launches.len();
            let reply = n == plan.sink || plan.succs[n].iter().any(|&c| !in_wave(c));
            let split = plan.splits(n);
            for index in 0..counts[n] {
                launches.push(Launch {
                    node: n,
                    index,
                    wiring: DagWiring {
                        node: plan.id(n).to_owned(),
                        fds: 0,
                        event: EventShape::Input,
                        outputs: Vec::new(),
                        reply,
                        split,
                        inline_max: INLINE_MAX,
                        spin_us,
                        pipeline: None,
                    },
                    body: Vec::new(),
                    fds: Vec::new(),
                });
            }
        }
        for &c in wave {
            for j in 0..counts[c] {
                let feed = if plan.preds[c].is_empty() {
                    launches[slot[c] + j].body = input.to_vec();
                    Feed::Input
                } else if plan.each(c) {
                    let d = done[plan.preds[c][0]].as_ref().expect("ran");
                    Feed::Relayed(d.values[j].clone())
                } else {
                    let mut parts = Vec::new();
                    for &p in &plan.preds[c] {
                        parts.push(if in_wave(p) {
                            let edges = (0..counts[p])
                                .map(|k| Feed::Edge(slot[p] + k))
                                .collect::<Vec<_>>();
                            if plan.each(p) {
                                Feed::List(edges)
                            } else {
                                edges.into_iter().next().expect("one instance")
                            }
                        } else {
                            let d = done[p].as_ref().expect("earlier wave");
                            let vals = d
                                .values
                                .iter()
                                .cloned()
                                .map(Feed::Relayed)
                                .collect::<Vec<_>>();
                            if plan.each(p) || plan.splits(p) {
                                Feed::List(vals)
                            } else {
                                vals.into_iter().next().expect("one value")
                            }
                        });
                    }
                    if parts.len() == 1 {
                        parts.pop().expect("one")
                    } else {
                        Feed::List(parts)
                    }
                };
                let me = slot[c] + j;
                let shape = Self::place(&mut launches, me, feed)?;
                launches[me].wiring.event = shape;
            }
        }
        for l in &mut launches {
            l.wiring.fds = l.fds.len();
        }

        // Instances, all acquired before any runs (a consumer must exist for its producer).
        let nodes: Vec<usize> = launches.iter().map(|l| l.node).collect();
        let instances = match self.acquire_nodes(plan, &nodes).await? {
            Ok(i) => i,
            Err(f) => return Ok(Err(f)),
        };

        // Run them all; the first failure cancels the rest.
        let wave_start = Instant::now();
        let in_wave_path = plan.deadlines(in_wave);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        // Consumers first, so that they wait on their rings before their producers send.
        for (l, (mut inst, start)) in launches.into_iter().zip(instances).rev() {
            let this = self.clone();
            let rec = plan.recs[l.node].clone();
            let deadline = wave_start + in_wave_path[l.node];
            let mut cancel = cancel_rx.clone();
            let request_id = request_id.to_owned();
            tasks.spawn(async move {
                let timeout = deadline.saturating_duration_since(Instant::now());
                let exchange = inst.invoke_dag(
                    &request_id,
                    l.wiring,
                    &l.body,
                    l.fds,
                    timeout,
                    rec.manifest.timeout_s,
                );
                let result = tokio::select! {
                    r = exchange => Some(r),
                    _ = cancel.wait_for(|c| *c) => None,
                };
                let result = match result {
                    None => {
                        // Blocked on an edge whose producer failed: not reusable.
                        this.give_back(&rec, inst, false);
                        return None;
                    }
                    Some(Ok(reply)) => {
                        let reusable = !inst.has_strays();
                        this.log_ring(&rec.manifest.name).push_text(&reply.logs);
                        this.give_back(&rec, inst, reusable);
                        Ok(reply)
                    }
                    Some(Err(failure)) => {
                        this.give_back(&rec, inst, false);
                        Err(failure.to_function_error())
                    }
                };
                Some(Finished {
                    node: l.node,
                    index: l.index,
                    start,
                    result,
                })
            });
        }
        let mut failure = None;
        let mut replies: Vec<Vec<(usize, Reply)>> =
            (0..plan.spec.nodes.len()).map(|_| Vec::new()).collect();
        while let Some(r) = tasks.join_next().await {
            let Some(fin) = r.map_err(|e| ControlError::Internal(format!("node task: {e}")))?
            else {
                continue;
            };
            match fin.result {
                Ok(Reply {
                    outcome: Err(e), ..
                })
                | Err(e) => {
                    if failure.is_none() {
                        failure = Some(plan.failure(fin.node, e));
                        let _ = cancel_tx.send(true);
                    }
                }
                Ok(reply) => {
                    runs.push(plan.node_run(
                        fin.node,
                        fin.index,
                        fin.start,
                        (reply.handler_start_ns, reply.handler_end_ns),
                        reply.dag.as_ref().map(|d| (d.inputs_ns, d.sent_ns)),
                    ));
                    replies[fin.node].push((fin.index, reply));
                }
            }
        }
        if let Some(f) = failure {
            return Ok(Err(f));
        }
        for &n in wave {
            let mut rs = std::mem::take(&mut replies[n]);
            rs.sort_by_key(|(i, _)| *i);
            let mut values = Vec::new();
            for (_, r) in &rs {
                let body = r.outcome.as_ref().expect("succeeded");
                let segs = r
                    .dag
                    .as_ref()
                    .map(|d| d.segments.clone())
                    .unwrap_or_default();
                for s in segs {
                    let bytes = body.get(s.offset..s.offset + s.len).ok_or_else(|| {
                        ControlError::Internal(format!(
                            "node {:?} replied with a segment outside its body",
                            plan.id(n)
                        ))
                    })?;
                    values.push(Value {
                        kind: s.kind,
                        bytes: bytes.to_vec(),
                    });
                }
            }
            done[n] = Some(Done {
                values,
                ends: rs.iter().map(|(_, r)| r.handler_end_ns).collect(),
            });
        }
        let ends: Vec<&[u64]> = done
            .iter()
            .map(|d| d.as_ref().map_or(&[][..], |d| &d.ends[..]))
            .collect();
        fill_hops(plan, &ends, runs);
        Ok(Ok(()))
    }

    /// Checks that the instances a run needs at once, `(node, count)`, fit each function's
    /// limit (or the run would wait on itself).
    fn check_fits(
        &self,
        plan: &Plan,
        counts: impl Iterator<Item = (usize, usize)>,
    ) -> Result<(), ControlError> {
        let mut per_fn: BTreeMap<&str, (&FunctionRecord, usize)> = BTreeMap::new();
        for (n, k) in counts {
            let rec = &plan.recs[n];
            per_fn.entry(&rec.manifest.name).or_insert((rec, 0)).1 += k;
        }
        for (name, (rec, k)) in per_fn {
            let max = self.max_instances(rec) as usize;
            if k > max {
                return Err(ControlError::InvalidParameter(format!(
                    "DAG {:?} needs {k} instances of function {name:?} at once, above its max_instances of {max}",
                    plan.spec.name
                )));
            }
        }
        Ok(())
    }

    /// One instance for each entry of `nodes` (node indices), acquired concurrently, in
    /// order. `Ok(Err)` is a function's init failure; then the others went back.
    async fn acquire_nodes(
        &self,
        plan: &Plan,
        nodes: &[usize],
    ) -> Result<Result<Vec<(Instance, StartKind)>, NodeFailure>, ControlError> {
        let recs = nodes.iter().map(|&n| (n, plan.recs[n].clone())).collect();
        Ok(self
            .acquire_each(recs)
            .await?
            .map_err(|(n, e)| plan.failure(n, e)))
    }

    /// One instance for each `(node, function)`, acquired concurrently, in order. `Ok(Err)`
    /// is a function's init failure, with its node; then the others went back.
    pub(crate) async fn acquire_each(
        &self,
        recs: Vec<(usize, FunctionRecord)>,
    ) -> Result<Result<Vec<(Instance, StartKind)>, (usize, FunctionError)>, ControlError> {
        let mut got = JoinSet::new();
        for (k, (_, rec)) in recs.iter().enumerate() {
            let this = self.clone();
            let rec = rec.clone();
            got.spawn(async move { (k, this.dag_instance(&rec).await) });
        }
        let mut instances: Vec<Option<(Instance, StartKind)>> =
            (0..recs.len()).map(|_| None).collect();
        let mut init_failure = None;
        let mut platform_failure = None;
        while let Some(r) = got.join_next().await {
            let (k, r) = r.map_err(|e| ControlError::Internal(format!("instance task: {e}")))?;
            match r {
                Ok(i) => instances[k] = Some(i),
                Err(Ok(e)) => {
                    init_failure.get_or_insert((recs[k].0, e));
                }
                Err(Err(e)) => {
                    platform_failure.get_or_insert(e);
                }
            }
        }
        if platform_failure.is_none() && init_failure.is_none() {
            return Ok(Ok(instances.into_iter().flatten().collect()));
        }
        for (i, (_, rec)) in instances.into_iter().zip(&recs) {
            if let Some((inst, _)) = i {
                self.give_back(rec, inst, true);
            }
        }
        match (platform_failure, init_failure) {
            (Some(e), _) => Err(e),
            (_, Some(f)) => Ok(Err(f)),
            (None, None) => unreachable!("checked above"),
        }
    }

    /// Turns a feed into the event shape of instance `me`: relayed values go into its body,
    /// edges are created and handed to both ends.
    fn place(launches: &mut [Launch], me: usize, feed: Feed) -> Result<EventShape, ControlError> {
        Ok(match feed {
            Feed::Input => EventShape::Input,
            Feed::Relayed(v) => {
                let body = &mut launches[me].body;
                let segment = Segment {
                    offset: body.len(),
                    len: v.bytes.len(),
                    kind: v.kind,
                };
                body.extend_from_slice(&v.bytes);
                EventShape::Body { segment }
            }
            Feed::Edge(p) => {
                let e = new_edge()?;
                let out = launches[p].push_edge(e.producer);
                launches[p].wiring.outputs.push(out);
                EventShape::Ring {
                    fds: launches[me].push_edge(e.consumer),
                }
            }
            Feed::List(items) => {
                let mut shapes = Vec::with_capacity(items.len());
                for f in items {
                    shapes.push(Self::place(launches, me, f)?);
                }
                EventShape::List { items: shapes }
            }
        })
    }

    /// An instance for one DAG node: warm, or freshly started with no invocation pending.
    /// `Err(Ok)` is the function's init failure, `Err(Err)` the platform's.
    async fn dag_instance(
        &self,
        rec: &FunctionRecord,
    ) -> Result<(Instance, StartKind), Result<FunctionError, ControlError>> {
        let env = self.inner.env.clone().map_err(|why| {
            Err(ControlError::Unavailable(format!(
                "invocations are disabled on this host: {why}"
            )))
        })?;
        let name = &rec.manifest.name;
        let pool = self.pool(name);
        let max = self.max_instances(rec);
        let deadline = Instant::now()
            + Duration::from_secs(u64::from(rec.manifest.timeout_s)).max(Duration::from_secs(10));
        match self
            .acquire(&pool, rec.revision, max, false, deadline)
            .await
            .map_err(Err)?
        {
            crate::Slot::Warm(inst) => Ok((*inst, StartKind::Warm)),
            crate::Slot::Cold => match self
                .start_fresh(
                    &env,
                    rec,
                    self.log_ring(name),
                    None,
                    crate::InvokeOptions::default(),
                )
                .await
            {
                Ok(started) => Ok(started),
                Err(e) => {
                    self.release_slot(&pool);
                    Err(match e {
                        crate::instance::StartError::Platform(msg) => {
                            Err(ControlError::Internal(msg))
                        }
                        crate::instance::StartError::Init(err) => Ok(err),
                    })
                }
            },
        }
    }

    /// The most instances `rec` may run at once.
    fn max_instances(&self, rec: &FunctionRecord) -> u32 {
        rec.manifest
            .max_instances
            .unwrap_or(self.inner.cfg.max_instances)
    }

    /// Returns an instance to its function's pool (or destroys it).
    fn give_back(&self, rec: &FunctionRecord, inst: Instance, reusable: bool) {
        let name = &rec.manifest.name;
        let pool = self.pool(name);
        let max = self.max_instances(rec);
        let current = self.registry().get(name).map(|r| r.revision);
        self.release(&pool, inst, reusable && current == Some(rec.revision), max);
    }
}

/// Sets each run's hop: from the latest end among its node's predecessors to its start.
fn fill_hops<E: AsRef<[u64]>>(plan: &Plan, ends: &[E], runs: &mut [NodeRun]) {
    for r in runs.iter_mut().filter(|r| r.hop_us.is_none()) {
        let Some(n) = plan.spec.nodes.iter().position(|x| x.id == r.node) else {
            continue;
        };
        let last = plan.preds[n]
            .iter()
            .flat_map(|&p| ends[p].as_ref().iter().copied())
            .max();
        if let Some(end) = last {
            if end > 0 && r.handler_start_us > 0.0 {
                r.hop_us = Some(r.handler_start_us - end as f64 / 1e3);
            }
        }
    }
}

/// The DAG's result from its sink: the value, or a JSON list of an `each` sink's values.
fn sink_output(plan: &Plan, sink: Done) -> Result<(Vec<u8>, bool), FunctionError> {
    if !plan.each(plan.sink) {
        let v = sink.values.into_iter().next().ok_or_else(|| {
            FunctionError::platform("Spore.DagResult", "the sink returned no value")
        })?;
        return Ok((v.bytes, v.kind == PayloadKind::Bytes));
    }
    json_list(sink.values.iter().map(|v| (v.kind, v.bytes.as_slice()))).map(|b| (b, false))
}

/// A JSON list of JSON values.
fn json_list<'a>(
    values: impl Iterator<Item = (PayloadKind, &'a [u8])>,
) -> Result<Vec<u8>, FunctionError> {
    let mut out = b"[".to_vec();
    for (i, (kind, bytes)) in values.enumerate() {
        if kind == PayloadKind::Bytes {
            return Err(FunctionError::platform(
                "Spore.DagResult",
                "a list of results holds raw bytes, which JSON cannot carry",
            ));
        }
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(if bytes.is_empty() { b"null" } else { bytes });
    }
    out.push(b']');
    Ok(out)
}

/// An HTTP hop's answer.
struct HttpReply {
    body: Vec<u8>,
    start: StartKind,
    handler_ns: (u64, u64),
    unit: Option<u32>,
}

/// One hop through the control plane's own invocation path (local, or relayed to a unit).
async fn direct_hop(
    control: &Control,
    function: &str,
    unit: Option<u32>,
    event: Vec<u8>,
) -> Result<HttpReply, FunctionError> {
    let opts = crate::InvokeOptions {
        unit,
        ..Default::default()
    };
    let inv = control
        .invoke(function, event.into(), opts)
        .await
        .map_err(|e| FunctionError::platform("Spore.DagHop", e.to_string()))?;
    Ok(HttpReply {
        body: inv.outcome?,
        start: inv.start,
        handler_ns: inv.handler_ns,
        unit: Some(inv.unit),
    })
}

impl Control {
    /// Where the gateway listens, for DAG hops over HTTP.
    pub fn set_gateway_url(&self, url: String) {
        *self.inner.gateway_url.lock().expect("gateway url lock") = Some(url);
    }

    /// Runs node by node: each hop over HTTP through the gateway, or (`direct`) through this
    /// control plane's invocation path, which relays to other units over their links.
    async fn run_http(
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
                            (n, j, http_hop(&client, &url, event, timeout).await)
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
    event: Vec<u8>,
    timeout: Duration,
) -> Result<HttpReply, FunctionError> {
    let platform = |msg: String| FunctionError::platform("Spore.DagHttpHop", msg);
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(event)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| platform(format!("POST {url}: {}", crate::instance::error_chain(&e))))?;
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
            message: e.message,
            error_type: e.error_type,
            stack_trace: e.stack_trace,
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

impl Control {
    fn dag_path(&self, name: &str) -> std::path::PathBuf {
        self.inner
            .cfg
            .data_dir
            .join("dags")
            .join(format!("{name}.json"))
    }

    /// Deploys (creates or replaces) a DAG after checking it and that its functions exist.
    pub fn put_dag(&self, spec: DagSpec) -> Result<DagSpec, ControlError> {
        spec.validate()
            .map_err(|e| ControlError::InvalidParameter(e.to_string()))?;
        Plan::new(self, spec.clone())?;
        let path = self.dag_path(&spec.name);
        let io =
            |e: std::io::Error| ControlError::Internal(format!("storing DAG {:?}: {e}", spec.name));
        std::fs::create_dir_all(path.parent().expect("in the dags dir")).map_err(io)?;
        crate::store::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&spec).expect("a spec serializes"),
        )
        .map_err(io)?;
        self.evict_pipelines(|p| p.dag() == spec.name);
        Ok(spec)
    }

    /// A deployed DAG.
    pub fn get_dag(&self, name: &str) -> Result<DagSpec, ControlError> {
        spore_core::validate_function_name(name)
            .map_err(|_| ControlError::NotFound(format!("DAG {name}")))?;
        let bytes = std::fs::read(self.dag_path(name))
            .map_err(|_| ControlError::NotFound(format!("DAG {name}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ControlError::Internal(format!("stored DAG {name:?} is unreadable: {e}")))
    }

    /// All deployed DAGs, by name.
    pub fn list_dags(&self) -> Vec<DagSpec> {
        let mut out: Vec<DagSpec> = std::fs::read_dir(self.inner.cfg.data_dir.join("dags"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".json")
                    .map(str::to_owned)
            })
            .filter_map(|name| self.get_dag(&name).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Removes a DAG (its functions stay).
    pub fn delete_dag(&self, name: &str) -> Result<DagSpec, ControlError> {
        let spec = self.get_dag(name)?;
        std::fs::remove_file(self.dag_path(name))
            .map_err(|e| ControlError::Internal(format!("removing DAG {name:?}: {e}")))?;
        self.evict_pipelines(|p| p.dag() == name);
        Ok(spec)
    }
}
