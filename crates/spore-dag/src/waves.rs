//! Running a DAG over shared memory in waves: each wave's instances are acquired at once,
//! wired with rings between them, and run; values crossing waves are relayed by the engine.

use std::collections::BTreeMap;

use spore_core::{ControlError, FunctionError, StartKind};
use spore_pool::{Checkout, Instance, StartError};
use spore_registry::FunctionRecord;
use tokio::task::JoinSet;

use crate::*;

impl Dags {
    pub(crate) async fn run_shm(
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
    pub(crate) fn check_fits(
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
    pub(crate) async fn acquire_nodes(
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
        let lease = self
            .inner
            .pools
            .checkout(rec, Checkout::default())
            .await
            .map_err(Err)?;
        match lease {
            Ok(l) => Ok((l.instance, l.start)),
            Err(StartError::Platform(msg)) => Err(Err(ControlError::Internal(msg))),
            Err(StartError::Init(err)) => Err(Ok(err)),
        }
    }

    /// The most instances `rec` may run at once.
    fn max_instances(&self, rec: &FunctionRecord) -> u32 {
        self.inner.pools.max_instances(rec)
    }

    /// Returns an instance to its function's pool (or destroys it).
    fn give_back(&self, rec: &FunctionRecord, inst: Instance, reusable: bool) {
        self.inner.pools.checkin(rec, inst, reusable);
    }
}
