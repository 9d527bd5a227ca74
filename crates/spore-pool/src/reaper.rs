//! Leaving memory: the keep-alive, the idle-memory budget, an operator's eviction, retiring a
//! function's instances after a change, and the shutdown that stops everything.

use std::sync::Arc;
use std::time::Duration;

use spore_core::error_chain;

use crate::template::Template;
use crate::{spawn_destroy, Instance, Pool, Pools};

impl Pools {
    /// One pass of the keep-alive: stops instances, restorable templates and spares idle for
    /// longer than it, then enforces the idle-memory budget.
    pub async fn reap(&self) {
        let keep = self.inner.cfg.keep_alive;
        for (_, pool) in self.pools_snapshot() {
            spawn_destroy(pool.take_idle(|i| i.last_used.elapsed() > keep));
        }
        // A template that can come back from its snapshot leaves memory like an idle
        // instance; one that cannot stays (only the template count bounds those).
        let idle: Vec<String> = self
            .template_list()
            .into_iter()
            .filter(|(name, t)| t.last_used().elapsed() > keep && self.restorable(name))
            .map(|(name, _)| name)
            .collect();
        for name in idle {
            self.stop_template(&name, "idle for longer than the keep-alive");
        }
        self.stop_spares(|_, s| s.created.elapsed() > keep).await;
        if let Some(budget) = self.inner.cfg.idle_memory_mb {
            self.enforce_idle_budget(budget << 20);
        }
    }

    /// How often [`Pools::reap`] should run.
    pub fn reap_interval(&self) -> Duration {
        Duration::from_secs(1).min(self.inner.cfg.keep_alive)
    }

    /// The keep-alive.
    pub fn keep_alive(&self) -> Duration {
        self.inner.cfg.keep_alive
    }

    /// Every live template, by function.
    pub(crate) fn template_list(&self) -> Vec<(String, Arc<Template>)> {
        self.inner
            .templates
            .lock()
            .expect("templates lock")
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }

    /// Whether `name`'s next start can restore from a snapshot.
    pub fn restorable(&self, name: &str) -> bool {
        self.inner
            .registry
            .lock()
            .get(name)
            .filter(|r| r.manifest.snapshot)
            .and_then(|r| self.inner.snapshots.current(name, r.revision))
            .is_some()
    }

    /// Stops `name`'s template (if it is still the one live), logging why.
    fn stop_template(&self, name: &str, why: &str) -> bool {
        let t = self
            .inner
            .templates
            .lock()
            .expect("templates lock")
            .remove(name);
        let Some(t) = t else {
            return false;
        };
        tracing::info!(
            "stopping the cfork template {} ({why}); it comes back from its snapshot",
            t.id
        );
        tokio::spawn(async move { t.destroy().await });
        self.leave_template_spare(name);
        true
    }

    /// Stops idle instances and cfork templates until those left hold at most `budget`
    /// bytes: first the ones whose function can be restored from a snapshot (cheap to bring
    /// back), then the longest idle. Templates count as idle (busy children have cgroups of
    /// their own); only restorable ones are stopped.
    fn enforce_idle_budget(&self, budget: u64) {
        /// What holds idle memory.
        enum Holder {
            Instance(Arc<Pool>, String),
            Template(String),
        }
        // (restorable, idle since, bytes, holder)
        let mut idle = Vec::new();
        for (name, pool) in &self.pools_snapshot() {
            let restorable = self.restorable(name);
            let st = pool.state.lock().expect("pool lock");
            for inst in &st.idle {
                let bytes = inst.memory_bytes().unwrap_or(0);
                idle.push((
                    restorable,
                    inst.last_used,
                    bytes,
                    Holder::Instance(pool.clone(), inst.id.clone()),
                ));
            }
        }
        for (name, t) in self.template_list() {
            let bytes = t.memory_bytes().unwrap_or(0);
            idle.push((
                self.restorable(&name),
                t.last_used(),
                bytes,
                Holder::Template(name),
            ));
        }
        let mut total: u64 = idle.iter().map(|x| x.2).sum();
        if total <= budget {
            return;
        }
        idle.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (restorable, _, bytes, holder) in idle {
            if total <= budget {
                break;
            }
            let (pool, id) = match holder {
                Holder::Instance(pool, id) => (pool, id),
                Holder::Template(template) => {
                    let why = format!(
                        "{:.1} MiB, to keep idle memory under {} MiB",
                        bytes as f64 / 1048576.0,
                        budget >> 20
                    );
                    if restorable && self.stop_template(&template, &why) {
                        total = total.saturating_sub(bytes);
                    }
                    continue;
                }
            };
            let taken = pool.take_idle(|i| i.id == id);
            if !taken.is_empty() {
                tracing::info!(
                    "stopping idle instance {id} ({:.1} MiB{}) to keep idle instances under {} MiB",
                    bytes as f64 / 1048576.0,
                    if restorable {
                        ", restorable from its snapshot"
                    } else {
                        ""
                    },
                    budget >> 20
                );
                total = total.saturating_sub(bytes);
                spawn_destroy(taken);
            }
        }
    }

    /// Takes `name`'s template and idle instances out of the tables (callers stop them);
    /// waiters for an instance are woken to start their own.
    fn take_idle(&self, name: &str) -> (Option<Arc<Template>>, Vec<Instance>) {
        let template = self
            .inner
            .templates
            .lock()
            .expect("templates lock")
            .remove(name);
        let idle = match self.existing_pool(name) {
            Some(pool) => {
                let idle = pool.take_idle(|_| true);
                pool.notify.notify_waiters();
                idle
            }
            None => Vec::new(),
        };
        (template, idle)
    }

    /// Stops the idle instances, the template and the spare of `name` now, releasing their
    /// memory; busy instances are left to finish. Returns once they are gone: how many idle
    /// instances were stopped, and whether a template was.
    pub async fn evict(&self, name: &str) -> (usize, bool) {
        let (template, idle) = self.take_idle(name);
        let out = (idle.len(), template.is_some());
        for inst in idle {
            inst.destroy().await;
        }
        let restorable = template.is_some() && self.restorable(name);
        if let Some(t) = template {
            t.destroy().await;
        }
        self.stop_spares(|n, _| n == name).await;
        if restorable {
            // What holds almost no memory stays: the template's next restore goes into a
            // sandbox built for it.
            self.leave_template_spare(name);
        }
        out
    }

    /// Stops the idle instances, the template and the spare of `name` in the background
    /// (after a change or delete).
    pub fn retire(&self, name: &str) {
        let (template, idle) = self.take_idle(name);
        if let Some(t) = template {
            tokio::spawn(async move { t.destroy().await });
        }
        spawn_destroy(idle);
        let spare = self.inner.spares.lock().expect("spares lock").remove(name);
        if let Some(s) = spare {
            tokio::spawn(s.destroy());
        }
    }

    /// Stops every instance, template and spare, and removes this daemon's cgroups (after
    /// the work in flight drained).
    pub async fn shutdown(&self) {
        let all: Vec<Instance> = self
            .pools_snapshot()
            .iter()
            .flat_map(|(_, p)| p.take_idle(|_| true))
            .collect();
        for inst in all {
            inst.destroy().await;
        }
        let templates: Vec<Arc<Template>> = self
            .inner
            .templates
            .lock()
            .expect("templates lock")
            .drain()
            .map(|(_, t)| t)
            .collect();
        for t in templates {
            t.destroy().await;
        }
        self.stop_spares(|_, _| true).await;
        if let Ok(env) = &self.inner.env {
            let (layout, parent) = (env.layout.clone(), env.cgroup_parent.clone());
            let res = tokio::task::spawn_blocking(move || layout.sweep_parent(&parent, true)).await;
            if let Ok(Err(e)) = res {
                tracing::warn!("removing this daemon's cgroups: {}", error_chain(&e));
            }
            if let Ok(egress) = env.egress.clone() {
                // The sandboxes are gone: the bridge, the veths left and the table go too.
                let _ = tokio::task::spawn_blocking(move || egress.teardown()).await;
            }
        }
    }
}
