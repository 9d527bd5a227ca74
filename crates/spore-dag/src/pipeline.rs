//! Pre-wired pipelines: a deployed DAG's instances, kept connected between invocations.
//!
//! The first `shm` invocation of a DAG without `each` nodes acquires one instance per node,
//! creates every edge (rings and sockets, as in a wave), plus an edge from the daemon to
//! each source and one from the sink back to the daemon, and hands each instance its wiring
//! once. The instances then stay in the pipeline, blocked on their input rings: an
//! invocation is the daemon writing the input on the sources' edges and reading the result
//! from the sink's, with no frame to any instance in between. Each node has a page shared
//! with the daemon (`spore_ipc::page`) through which it learns the invocation's request id
//! and deadline and reports its timing.
//!
//! A pipeline is used by one invocation at a time; concurrent invocations build more. Idle
//! pipelines are kept like warm instances: stopped after the keep-alive, when the DAG or one
//! of its functions changes, on shutdown, and whenever an instance of one of their
//! functions is wanted and the function is at its instance limit. A failure (a handler
//! raising, a node dying, a node exceeding its deadline) ends the pipeline: every instance
//! in it is destroyed, and with the last descriptors every ring and memfd.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spore_core::dag::DagSpec;
use spore_core::{FunctionError, StartKind};
use spore_ipc::edge::{EdgeReceiver, EdgeSender, Value};
use spore_ipc::page::{NodePage, SlotTimes};
use spore_ipc::ring::{Consumer, Producer};
use spore_ipc::IpcError;
use spore_runtime::protocol::{EventShape, PipelineWiring};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::{
    fill_hops, new_edge, ring_fds, Launch, NodeFailure, NodeRun, Outcome, Plan, INLINE_MAX,
};
use spore_core::ControlError;
use spore_pool::{Instance, InvokeFailure};
use spore_registry::FunctionRecord;

use crate::Dags;

/// How often the daemon's wait for the sink's result looks at its cancel flag.
const POLL_SLICE: Duration = Duration::from_millis(10);
/// How long the daemon waits, after the result, for nodes to post their timing.
const SLOT_WAIT: Duration = Duration::from_millis(2);

/// The daemon's ends of a pipeline.
struct Ends {
    sources: Vec<EdgeSender>,
    sink: EdgeReceiver,
}

/// A DAG's instances, wired together and waiting for invocations.
pub(crate) struct Pipeline {
    spec: DagSpec,
    revisions: Vec<u64>,
    functions: BTreeSet<String>,
    ends: Option<Ends>,
    pages: Arc<Vec<NodePage>>,
    failures: mpsc::UnboundedReceiver<(usize, FunctionError)>,
    cancel: watch::Sender<bool>,
    members: Vec<JoinHandle<()>>,
    starts: Vec<StartKind>,
    seq: u64,
    last_used: Instant,
    /// The unit of each node.
    units: Vec<u32>,
    /// With nodes on other units: the segments and the router (`ends`, `pages` and
    /// `members` are then unused).
    spread: Option<crate::spread::Spread>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // The members destroy their instances; a receiver sees this or the sender gone.
        let _ = self.cancel.send(true);
    }
}

impl Pipeline {
    /// A pipeline whose nodes are spread over units.
    fn spread(plan: &Plan, sp: crate::spread::Spread) -> Pipeline {
        let (_, failures) = mpsc::unbounded_channel();
        Pipeline {
            spec: plan.spec.clone(),
            revisions: plan.recs.iter().map(|r| r.revision).collect(),
            functions: plan.recs.iter().map(|r| r.manifest.name.clone()).collect(),
            ends: None,
            pages: Arc::new(Vec::new()),
            failures,
            cancel: watch::channel(false).0,
            members: Vec::new(),
            starts: Vec::new(),
            seq: 0,
            last_used: Instant::now(),
            units: sp.units.clone(),
            spread: Some(sp),
        }
    }

    /// Whether the pipeline was built for this DAG, these function revisions and these
    /// units, and its segments on other units are still there.
    fn fits(&self, plan: &Plan, units: &[u32]) -> bool {
        self.spec == plan.spec
            && self.units == units
            && self.spread.as_ref().is_none_or(|s| s.alive())
            && self
                .revisions
                .iter()
                .eq(plan.recs.iter().map(|r| &r.revision))
    }

    /// Whether one of its instances runs `function`.
    pub(crate) fn uses(&self, function: &str) -> bool {
        self.functions.contains(function)
    }

    /// The DAG it serves.
    pub(crate) fn dag(&self) -> &str {
        &self.spec.name
    }

    /// Time since its last invocation.
    /// How many local instances it holds.
    pub(crate) fn instances(&self) -> usize {
        self.members.len()
    }

    pub(crate) fn idle_for(&self) -> Duration {
        self.last_used.elapsed()
    }

    /// Stops it and waits until its instances are destroyed.
    pub(crate) async fn close(mut self) {
        if let Some(sp) = self.spread.take() {
            sp.close().await;
        }
        let _ = self.cancel.send(true);
        for m in std::mem::take(&mut self.members) {
            let _ = m.await;
        }
    }
}

/// Whether `plan` can run as a pipeline: its graph is fixed (no `each` node).
pub(super) fn pipelinable(plan: &Plan) -> bool {
    !plan.spec.nodes.iter().any(|n| n.each)
}

impl Dags {
    /// Runs `plan` on an idle pipeline of its DAG, or on a new one; `units` is where each
    /// node runs.
    pub(super) async fn run_pipelined(
        &self,
        plan: &Plan,
        input: &[u8],
        request_id: &str,
        units: Vec<u32>,
    ) -> Result<Outcome, ControlError> {
        let me = self.inner.units.local().id;
        let mut pipe = match self.take_pipeline(plan, &units) {
            Some(p) => p,
            None if units.iter().all(|&u| u == me) => {
                match self.build_pipeline(plan, request_id).await? {
                    Ok(p) => p,
                    Err(f) => return Ok((Err(f), false, Vec::new())),
                }
            }
            None => match self.build_spread(plan, units, request_id).await? {
                Ok(sp) => Pipeline::spread(plan, sp),
                Err(f) => return Ok((Err(f), false, Vec::new())),
            },
        };
        let (outcome, healthy) = if let Some(sp) = pipe.spread.as_mut() {
            pipe.seq += 1;
            self.run_spread(plan, sp, pipe.seq, input, request_id).await
        } else {
            self.run_on(plan, &mut pipe, input, request_id).await?
        };
        if healthy && !self.inner.work.is_draining() {
            pipe.last_used = Instant::now();
            self.inner
                .pipelines
                .lock()
                .expect("pipelines lock")
                .entry(plan.spec.name.clone())
                .or_default()
                .push(pipe);
        }
        Ok(outcome)
    }

    /// An idle pipeline that fits `plan` (stale ones of its DAG are stopped).
    fn take_pipeline(&self, plan: &Plan, units: &[u32]) -> Option<Pipeline> {
        let mut all = self.inner.pipelines.lock().expect("pipelines lock");
        let idle = all.get_mut(&plan.spec.name)?;
        while let Some(p) = idle.pop() {
            if p.fits(plan, units) {
                return Some(p);
            }
        }
        None
    }

    /// Stops the idle pipelines for which `pick` holds; returns how many.
    pub(crate) fn evict_pipelines(&self, pick: impl Fn(&Pipeline) -> bool) -> usize {
        let mut gone = Vec::new();
        {
            let mut all = self.inner.pipelines.lock().expect("pipelines lock");
            for idle in all.values_mut() {
                let (out, keep): (Vec<_>, Vec<_>) = idle.drain(..).partition(|p| pick(p));
                *idle = keep;
                gone.extend(out);
            }
            all.retain(|_, v| !v.is_empty());
        }
        let n = gone.len();
        drop(gone);
        n
    }

    /// Stops every idle pipeline and waits for their instances to be destroyed.
    /// Each idle pre-wired pipeline: its DAG, how many instances it holds, and how long it
    /// has been idle.
    pub fn pipelines_info(&self) -> Vec<(String, usize, f64)> {
        self.inner
            .pipelines
            .lock()
            .expect("pipelines lock")
            .iter()
            .flat_map(|(dag, ps)| {
                ps.iter()
                    .map(|p| (dag.clone(), p.instances(), p.idle_for().as_secs_f64()))
            })
            .collect()
    }

    /// Idle pre-wired pipelines, all DAGs together.
    pub fn idle_pipelines(&self) -> usize {
        self.inner
            .pipelines
            .lock()
            .expect("pipelines lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Stops every idle pipeline and waits until their instances are gone.
    pub async fn close_pipelines(&self) {
        let all: Vec<Pipeline> = self
            .inner
            .pipelines
            .lock()
            .expect("pipelines lock")
            .drain()
            .flat_map(|(_, v)| v)
            .collect();
        for p in all {
            p.close().await;
        }
    }

    /// Acquires one instance per node, wires them and hands each its wiring.
    async fn build_pipeline(
        &self,
        plan: &Plan,
        request_id: &str,
    ) -> Result<Result<Pipeline, NodeFailure>, ControlError> {
        let n_nodes = plan.spec.nodes.len();
        self.check_fits(plan, (0..n_nodes).map(|n| (n, 1)))?;
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            ControlError::Internal(format!(
                "building the pipeline of DAG {:?}: {what}: {e}",
                plan.spec.name
            ))
        };
        let mut launches: Vec<Launch> = (0..n_nodes)
            .map(|n| Launch::pipeline_node(n, plan.id(n)))
            .collect();
        // A source reads the input from the daemon; any other node one edge per
        // predecessor (a list of them for several, in `after` order).
        let mut sources = Vec::new();
        for c in 0..n_nodes {
            let mut items = Vec::new();
            if plan.preds[c].is_empty() {
                let e = new_edge()?;
                let (fds, sock) = ring_fds(e.producer);
                sources.push(EdgeSender {
                    ring: Producer::open(fds).map_err(|e| internal("a source edge", &e))?,
                    sock,
                    inline_max: INLINE_MAX,
                });
                items.push(EventShape::Ring {
                    fds: launches[c].push_edge(e.consumer),
                });
            }
            for &p in &plan.preds[c] {
                let e = new_edge()?;
                let out = launches[p].push_edge(e.producer);
                launches[p].wiring.outputs.push(out);
                items.push(EventShape::Ring {
                    fds: launches[c].push_edge(e.consumer),
                });
            }
            launches[c].wiring.event = if items.len() == 1 {
                items.pop().expect("one")
            } else {
                EventShape::List { items }
            };
        }
        let e = new_edge()?;
        let out = launches[plan.sink].push_edge(e.producer);
        launches[plan.sink].wiring.outputs.push(out);
        let (fds, sock) = ring_fds(e.consumer);
        let sink = EdgeReceiver {
            ring: Consumer::open(fds).map_err(|e| internal("the sink's edge", &e))?,
            sock,
        };
        let mut pages = Vec::with_capacity(n_nodes);
        for l in &mut launches {
            let (page, fd) = NodePage::create().map_err(|e| internal("a node's page", &e))?;
            l.wiring.pipeline = Some(PipelineWiring { page: l.fds.len() });
            l.fds.push(fd);
            l.wiring.fds = l.fds.len();
            pages.push(page);
        }

        let nodes: Vec<usize> = (0..n_nodes).collect();
        let instances = match self.acquire_nodes(plan, &nodes).await? {
            Ok(i) => i,
            Err(f) => return Ok(Err(f)),
        };
        let (cancel, cancel_rx) = watch::channel(false);
        let (fail_tx, failures) = mpsc::unbounded_channel();
        let mut members = Vec::with_capacity(n_nodes);
        let mut starts = Vec::with_capacity(n_nodes);
        for (l, (inst, start)) in launches.into_iter().zip(instances) {
            starts.push(start);
            members.push(self.spawn_member(
                plan.recs[l.node].clone(),
                l,
                inst,
                request_id,
                cancel_rx.clone(),
                fail_tx.clone(),
            ));
        }
        Ok(Ok(Pipeline {
            spec: plan.spec.clone(),
            revisions: plan.recs.iter().map(|r| r.revision).collect(),
            functions: plan.recs.iter().map(|r| r.manifest.name.clone()).collect(),
            ends: Some(Ends { sources, sink }),
            pages: Arc::new(pages),
            failures,
            cancel,
            members,
            starts,
            seq: 0,
            last_used: Instant::now(),
            units: vec![self.inner.units.local().id; n_nodes],
            spread: None,
        }))
    }

    /// The task that keeps one node's instance in its pipeline: it reports the node's
    /// failure, and destroys the instance when the pipeline ends.
    pub(super) fn spawn_member(
        &self,
        rec: FunctionRecord,
        launch: Launch,
        mut inst: Instance,
        request_id: &str,
        mut cancel: watch::Receiver<bool>,
        failures: mpsc::UnboundedSender<(usize, FunctionError)>,
    ) -> JoinHandle<()> {
        let this = self.clone();
        let request_id = request_id.to_owned();
        tokio::spawn(async move {
            let log = this.log_ring(&rec.manifest.name);
            let served = {
                let serve = inst.serve_pipeline(&request_id, launch.wiring, launch.fds, |text| {
                    log.push_text(&text)
                });
                tokio::select! {
                    r = serve => Some(r),
                    _ = cancel.wait_for(|c| *c) => None,
                }
            };
            if let Some(r) = served {
                let error = match r {
                    Ok(reply) => {
                        log.push_text(&reply.logs);
                        reply.outcome.err().unwrap_or_else(|| {
                            FunctionError::platform(
                                "Spore.DagPipeline",
                                "the node left its pipeline without an error",
                            )
                        })
                    }
                    Err(f) => f.to_function_error(),
                };
                let _ = failures.send((launch.node, error));
            }
            let id = inst.id.clone();
            inst.destroy().await;
            this.inner.pools.forget(&rec.manifest.name, &id);
        })
    }

    /// One invocation on `pipe`; the flag says whether the pipeline can serve again.
    async fn run_on(
        &self,
        plan: &Plan,
        pipe: &mut Pipeline,
        input: &[u8],
        request_id: &str,
    ) -> Result<(Outcome, bool), ControlError> {
        let n_nodes = plan.spec.nodes.len();
        pipe.seq += 1;
        let seq = pipe.seq;
        // A node must be done within the sum of the timeouts along its longest path.
        let mut path = vec![Duration::ZERO; n_nodes];
        for &n in &plan.order {
            path[n] = plan.preds[n]
                .iter()
                .map(|&p| path[p])
                .max()
                .unwrap_or_default()
                + plan.timeout(n);
        }
        let total = path.iter().copied().max().unwrap_or_default();
        let t0 = Instant::now();
        let deadline_ms = spore_registry::store::now_unix_ms() + total.as_millis() as u64;
        for p in pipe.pages.iter() {
            p.write_header(seq, deadline_ms, request_id);
        }
        let Some(mut ends) = pipe.ends.take() else {
            return Err(ControlError::Internal(
                "a DAG pipeline lost its edges".into(),
            ));
        };
        let value = Value {
            raw: false,
            bytes: if input.is_empty() {
                b"{}".to_vec()
            } else {
                input.to_vec()
            },
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let (flag, pages, end_at) = (cancel.clone(), pipe.pages.clone(), t0 + total);
        let mut io = tokio::task::spawn_blocking(move || {
            let r = exchange(&mut ends, &value, &flag, end_at, &pages, seq);
            (ends, r)
        });
        let failure = loop {
            // The node the run waits on: the first, in topological order, without a result.
            let culprit = plan
                .order
                .iter()
                .copied()
                .find(|&n| pipe.pages[n].slot(seq).is_none());
            let wake = culprit.map_or(t0 + total, |n| t0 + path[n]);
            tokio::select! {
                r = &mut io => {
                    let (ends, r) = r.map_err(|e| ControlError::Internal(format!("pipeline task: {e}")))?;
                    match r {
                        Ok((out, times)) => {
                            pipe.ends = Some(ends);
                            let runs = node_runs(plan, pipe, &times);
                            pipe.starts.fill(StartKind::Warm);
                            return Ok(((Ok(out.bytes), out.raw, runs), true));
                        }
                        Err(e) => break plan.failure(
                            plan.sink,
                            FunctionError::platform("Spore.DagEdge", format!("reading the DAG's result: {e}")),
                        ),
                    }
                }
                Some((n, e)) = pipe.failures.recv() => break plan.failure(n, e),
                _ = tokio::time::sleep_until(wake.into()) => {
                    if let Some(n) = culprit {
                        if Instant::now() >= t0 + path[n] && pipe.pages[n].slot(seq).is_none() {
                            let seconds = plan.recs[n].manifest.timeout_s;
                            break plan.failure(n, InvokeFailure::Timeout { seconds }.to_function_error());
                        }
                    }
                }
            }
        };
        cancel.store(true, Ordering::Release);
        Ok(((Err(failure), false, Vec::new()), false))
    }
}

/// The blocking part of an invocation: the input to every source, the result from the
/// sink, then the nodes' timing (waiting briefly for the last ones to post it).
fn exchange(
    ends: &mut Ends,
    input: &Value,
    cancel: &AtomicBool,
    end_at: Instant,
    pages: &[NodePage],
    seq: u64,
) -> Result<(Value, Vec<Option<SlotTimes>>), IpcError> {
    let left = || {
        end_at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    for s in &mut ends.sources {
        s.send(input, left())?;
    }
    let out = loop {
        match ends.sink.recv(POLL_SLICE) {
            Ok(v) => break v,
            Err(IpcError::Timeout(_))
                if !cancel.load(Ordering::Acquire) && Instant::now() < end_at => {}
            Err(e) => return Err(e),
        }
    };
    let until = Instant::now() + SLOT_WAIT;
    loop {
        let times: Vec<Option<SlotTimes>> = pages.iter().map(|p| p.slot(seq)).collect();
        if times.iter().all(Option::is_some) || Instant::now() >= until {
            return Ok((out, times));
        }
        std::thread::yield_now();
    }
}

/// The nodes' timing from their slots, in completion order.
fn node_runs(plan: &Plan, pipe: &Pipeline, times: &[Option<SlotTimes>]) -> Vec<NodeRun> {
    let mut runs = Vec::new();
    let mut ends: Vec<Vec<u64>> = vec![Vec::new(); times.len()];
    for (n, t) in times.iter().enumerate() {
        let Some(t) = t else { continue };
        runs.push(NodeRun {
            node: plan.id(n).to_owned(),
            index: 0,
            function: plan.spec.nodes[n].function.clone(),
            start: pipe.starts[n].as_str(),
            handler_ms: t.end_ns.saturating_sub(t.start_ns) as f64 / 1e6,
            handler_start_us: t.start_ns as f64 / 1e3,
            handler_end_us: t.end_ns as f64 / 1e3,
            inputs_us: Some(t.inputs_ns as f64 / 1e3),
            sent_us: Some(t.sent_ns as f64 / 1e3),
            hop_us: None,
            unit: plan.unit,
        });
        ends[n].push(t.end_ns);
    }
    fill_hops(plan, &ends, &mut runs);
    runs.sort_by(|a, b| a.handler_end_us.total_cmp(&b.handler_end_us));
    runs
}
