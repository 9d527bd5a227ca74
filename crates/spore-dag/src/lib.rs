//! The DAG engine: runs a [`DagSpec`] as a whole, node by node, over shared memory (`shm`)
//! or over HTTP through the gateway (`http`, the baseline), keeps pre-wired pipelines between
//! invocations, spreads pipelines over processing units, and stores deployed DAG specs.
//!
//! [`Dags`] asks `spore-pool` for instances ([`Pools::checkout`]) and `spore-cluster` for
//! where nodes run and for links to other units; a hop through the full invocation path
//! (relayed DAGs) goes through an [`Invoker`] the control plane hands in. It knows nothing
//! of the control plane itself or the gateway.
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

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use spore_core::dag::{DagSpec, Transport};
use spore_core::{FunctionError, StartKind};
use spore_runtime::protocol::{DagWiring, EdgeFds, EventShape, PayloadKind, Segment};
use tokio::sync::watch;
use tokio::task::JoinSet;

use spore_cluster::{SegmentHost, Units};
use spore_core::{ControlError, Invocation, InvokeOptions};
use spore_ipc::ring::RingFds;
use spore_pool::{Pools, Reply, Work};
use spore_registry::{FunctionRecord, SharedRegistry};

mod http;
pub(crate) mod pipeline;
mod segments;
mod specs;
pub(crate) mod spread;
mod waves;

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
            extra: self.error.extra.clone(),
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
    fn new(control: &Dags, spec: DagSpec) -> Result<Plan, ControlError> {
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
    // A failure (128 bytes with its FunctionError) is rare and ends the run: not worth a box.
    #[allow(clippy::result_large_err)]
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

/// A run's outcome, as the engine reports it: the sink's output (and whether it is raw
/// bytes) or the failure, and the nodes' timing.
pub(crate) type Outcome = (Result<Vec<u8>, NodeFailure>, bool, Vec<NodeRun>);

/// A ring's descriptors and its payload socket, from one end's set.
pub(crate) fn ring_fds(set: OwnedFdSet) -> (RingFds, UnixStream) {
    let [memory, data_ready, space_ready, sock] = set;
    (
        RingFds {
            memory,
            data_ready,
            space_ready,
        },
        UnixStream::from(sock),
    )
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

/// Runs one invocation through the control plane's whole invocation path (placement, relay
/// to other units, pools): the hops of a DAG relayed node by node.
pub trait Invoker: Send + Sync + 'static {
    /// Invokes `name` on `payload`.
    fn invoke(
        &self,
        name: String,
        payload: bytes::Bytes,
        opts: InvokeOptions,
    ) -> spore_cluster::BoxFuture<'static, Result<Invocation, ControlError>>;
}

struct Inner {
    registry: SharedRegistry,
    pools: Pools,
    units: Arc<Units>,
    work: Arc<Work>,
    /// Where deployed DAG specs are stored.
    dags_dir: PathBuf,
    /// Idle pre-wired DAG pipelines, by DAG.
    pipelines: Mutex<HashMap<String, Vec<pipeline::Pipeline>>>,
    /// The gateway's base URL, for DAG hops over HTTP (set once it listens).
    gateway_url: Mutex<Option<String>>,
    /// The key HTTP hops sign with.
    gateway_creds: Mutex<Option<spore_auth::Credentials>>,
    http: reqwest::Client,
    /// The full invocation path, for relayed DAGs (set once by the control plane).
    invoker: OnceLock<Arc<dyn Invoker>>,
    /// (a shim) Its segments of spread DAG pipelines and its neighbour links.
    segments: segments::ShimSegments,
    /// Each DAG's last run.
    last: Mutex<BTreeMap<String, LastRun>>,
}

/// The DAG engine of one unit. Cheap to clone.
#[derive(Clone)]
pub struct Dags {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dags").finish_non_exhaustive()
    }
}

/// A handle on the engine that does not keep it alive (for hooks the engine's own parts
/// hold, such as the pools' reclaim).
#[derive(Clone)]
pub struct WeakDags(std::sync::Weak<Inner>);

impl WeakDags {
    /// The engine, if it is still alive.
    pub fn upgrade(&self) -> Option<Dags> {
        self.0.upgrade().map(|inner| Dags { inner })
    }
}

impl Dags {
    /// A handle that does not keep the engine alive.
    pub fn downgrade(&self) -> WeakDags {
        WeakDags(Arc::downgrade(&self.inner))
    }

    /// The engine over `registry`'s functions, `pools`' instances and `units`; DAG specs
    /// live under `<data_dir>/dags`.
    pub fn new(
        registry: SharedRegistry,
        pools: Pools,
        units: Arc<Units>,
        work: Arc<Work>,
        data_dir: &std::path::Path,
    ) -> Dags {
        Dags {
            inner: Arc::new(Inner {
                registry,
                pools,
                units,
                work,
                dags_dir: data_dir.join("dags"),
                pipelines: Mutex::new(HashMap::new()),
                gateway_url: Mutex::new(None),
                gateway_creds: Mutex::new(None),
                http: reqwest::Client::new(),
                invoker: OnceLock::new(),
                segments: segments::ShimSegments::default(),
                last: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Sets the full invocation path relayed DAGs use (set once; later calls are ignored).
    pub fn set_invoker(&self, invoker: Arc<dyn Invoker>) {
        let _ = self.inner.invoker.set(invoker);
    }

    /// This unit's segments of spread pipelines, as its links serve them.
    pub fn segment_host(&self) -> Arc<dyn SegmentHost> {
        Arc::new(self.clone())
    }

    /// Units this shim holds a live neighbour link to.
    pub fn neighbours(&self) -> Vec<u32> {
        self.inner.segments.neighbours()
    }

    /// Stops idle pipelines holding instances of `function` (its pool is full); their
    /// instances free their slots.
    pub fn reclaim(&self, function: &str) {
        self.evict_pipelines(|p| p.uses(function));
    }

    /// Stops pipelines idle for longer than `keep` (the keep-alive).
    pub fn reap(&self, keep: Duration) {
        self.evict_pipelines(|p| p.idle_for() > keep);
    }

    fn get_function(&self, name: &str) -> Result<FunctionRecord, ControlError> {
        self.inner.registry.get(name)
    }

    fn log_ring(&self, name: &str) -> Arc<spore_pool::logs::LogRing> {
        self.inner.pools.log(name)
    }
    /// Runs a deployed DAG on `input` (JSON) and returns the sink's output.
    ///
    /// Like the control plane's invoke, the run continues on a task of its own if its caller gives up,
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
        spore_core::control::check_json(input)?;
        let _guard = self.inner.work.begin();
        if self.inner.work.is_draining() {
            return Err(ControlError::Unavailable(
                "the daemon is shutting down".into(),
            ));
        }
        let spec = self.get_dag(name)?;
        let transport = opts.transport.unwrap_or(spec.transport);
        let plan = Plan::new(self, spec)?;
        let t0 = Instant::now();
        let t0_ns = spore_pool::monotonic_ns();
        let request_id = uuid::Uuid::new_v4().to_string();
        // Where each node runs. A fixed DAG with nodes on other units runs as a pipeline
        // spread over them (shared memory within a unit, the neighbour link between units);
        // any other DAG with such nodes is relayed hop by hop by the control plane.
        let me = self.inner.units.local().id;
        let mut units = Vec::with_capacity(plan.recs.len());
        for (rec, node) in plan.recs.iter().zip(&plan.spec.nodes) {
            units.push(match self.inner.units.place_node(rec, node.unit)? {
                spore_cluster::Placement::Local => me,
                spore_cluster::Placement::Remote { unit, .. } => unit,
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
        for hop in nodes.iter().filter_map(|n| n.hop_us) {
            metrics::histogram!("spore_dag_hop_seconds", "dag" => name.to_owned(), "transport" => transport.to_string())
                .record(hop / 1e6);
        }
        let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let last = LastRun {
            time_ms: spore_registry::store::now_unix_ms(),
            request_id: request_id.clone(),
            transport: transport.to_string(),
            total_ms,
            error: outcome
                .as_ref()
                .err()
                .map(|f| f.to_function_error().message),
            nodes: nodes.clone(),
        };
        self.inner
            .last
            .lock()
            .expect("last runs lock")
            .insert(name.to_owned(), last);
        Ok(DagRun {
            request_id,
            transport,
            relayed,
            spread: spread && !relayed,
            outcome,
            raw,
            total_ms,
            nodes,
        })
    }

    /// The last run of each DAG.
    pub fn last_runs(&self) -> BTreeMap<String, LastRun> {
        self.inner.last.lock().expect("last runs lock").clone()
    }
}

/// A DAG's last run, as the dashboard draws it.
#[derive(Debug, Clone, Serialize)]
pub struct LastRun {
    /// When it finished, ms since the epoch.
    pub time_ms: u64,
    /// Its request id.
    pub request_id: String,
    /// The transport.
    pub transport: String,
    /// From the call to the result, ms.
    pub total_ms: f64,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Per node instance.
    pub nodes: Vec<NodeRun>,
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
