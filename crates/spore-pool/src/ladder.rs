//! The start-path ladder for a fresh instance: a fork of the function's live cfork template
//! (started, or restored from its snapshot, when there is none), a restore into a spare
//! sandbox or a new one, or a start from scratch (snapshotted when the function asks for it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use spore_core::{MemoryMode, SandboxKind, StartKind};
use spore_registry::FunctionRecord;

use crate::instance::invoke_frame;
use crate::logs::LogRing;
use crate::sandbox::{ColdStart, InstanceEnv, StartError};
use crate::spare::Spare;
use crate::template::Template;
use crate::{Checkout, Instance, Pools};

impl Pools {
    /// Starts a fresh instance of `rec` (a container, or a fork of its template); a cfork
    /// child, and a restore into a spare sandbox, start with `how.first_invoke` pipelined
    /// (the instance then says it was sent).
    pub(crate) async fn start_fresh(
        &self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        log: Arc<LogRing>,
        how: &Checkout,
    ) -> Result<(Instance, StartKind), StartError> {
        let path = how.cold_path;
        let timeout = Duration::from_secs(u64::from(rec.manifest.timeout_s));
        let init_timeout = timeout.max(Duration::from_secs(10));
        match rec.manifest.sandbox {
            SandboxKind::Container => {
                // A container's runtime started from scratch reads its first frame only once
                // ready: the caller sends it. A spare's gets it behind the go-ahead.
                let code_dir = self.inner.registry.code_dir(rec);
                let (name, snaps) = (&rec.key(), &self.inner.snapshots);
                let restore = match path {
                    Some(StartKind::Restore) => true,
                    Some(_) => false,
                    None => rec.manifest.snapshot,
                };
                // Only snapshot users pay for looking at the store.
                let image = restore.then(|| snaps.current(name, rec.revision)).flatten();
                if let Some(image) = image {
                    let mode = how.restore_mode.unwrap_or(self.inner.cfg.snapshot_mode);
                    let spare = self.take_spare(name, rec.revision, &image, mode, false);
                    if let Some(spare) = spare {
                        let first = first_invoke_frame(how);
                        match spare.start(rec, init_timeout, first).await {
                            Ok(inst) => {
                                self.refill_spare(env, rec, &log, &image, SpareFor::Instance(mode));
                                return Ok((inst, StartKind::Restore));
                            }
                            Err(e) => {
                                tracing::info!(function = %name, "the spare sandbox failed ({e}); restoring in a new one")
                            }
                        }
                    }
                    let how = ColdStart::Restore(image.clone(), mode);
                    match Instance::start(
                        env,
                        rec,
                        code_dir.clone(),
                        log.clone(),
                        init_timeout,
                        how,
                    )
                    .await
                    {
                        Ok(inst) => {
                            self.refill_spare(env, rec, &log, &image, SpareFor::Instance(mode));
                            return Ok((inst, StartKind::Restore));
                        }
                        Err(e) => {
                            // A refused or failed image never runs: start from scratch, and
                            // take a new one.
                            tracing::warn!(function = %name, "restore failed, starting from scratch: {e}");
                            snaps.discard(&image);
                        }
                    }
                }
                let inst = self
                    .start_suspecting_warmup(env, rec, &log, || {
                        let how = self.init_how(rec);
                        Instance::start(env, rec, code_dir.clone(), log.clone(), init_timeout, how)
                    })
                    .await?;
                Ok((inst, StartKind::Cold))
            }
            SandboxKind::Cfork => {
                self.fork_instance(env, rec, log, init_timeout, first_invoke_frame(how), path)
                    .await
            }
        }
    }

    /// Runs `start`, a start of `rec` from scratch. When it fails in a way its automatic
    /// warm-up can cause (the listed modules, imported together, ran out of time or memory,
    /// or crashed the runtime) while the function has a list, the list is turned off and
    /// the start runs again without it. If that start fails too, the list was not the cause:
    /// it is turned back on and not suspected again at this revision (a function failing
    /// for its own reasons is not started twice on every try), and the second failure is
    /// returned. An error the runtime reports itself (the handler's import failed) comes
    /// before the list is imported.
    async fn start_suspecting_warmup<T, F, Fut>(
        &self,
        env: &InstanceEnv,
        rec: &FunctionRecord,
        log: &LogRing,
        start: F,
    ) -> Result<T, StartError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StartError>>,
    {
        let (key, stamp) = (rec.key(), crate::warmup::stamp(rec));
        let warmups = env.warmups.as_ref().filter(|w| {
            rec.manifest.auto_warmup && !env.preload_for(rec).is_empty() && w.suspect(&key, &stamp)
        });
        let first = start().await;
        let suspect = match &first {
            Ok(_) => return first,
            Err(StartError::Platform(_)) => true,
            Err(StartError::Init(e)) => matches!(
                e.error_type.as_str(),
                "Sandbox.Timedout" | "Runtime.OutOfMemory" | "Runtime.ExitError"
            ),
        };
        let (Some(w), true, Err(first_err)) = (warmups, suspect, &first) else {
            return first;
        };
        // A start of a record that is no longer current (redeployed, deleted) blames nothing.
        if !self.inner.registry.is_current(rec) {
            return first;
        }
        let why = format!(
            "a start that imported the modules its calls had imported failed ({first_err})"
        );
        let turned = match w.turn_off(&key, &stamp, &why) {
            Ok(turned) => turned,
            Err(e) => {
                tracing::warn!(function = %key, "{}", spore_core::error_chain(&e));
                return first;
            }
        };
        // Off now (by this start, or by a concurrent one): again, without the list.
        let second = start().await;
        if second.is_ok() && turned {
            tracing::warn!(function = %key, "automatic warm-up turned off for this revision: {why}, and one without them worked");
            log.push_text(&format!(
                "spore: automatic warm-up turned off until the next deploy: {why}, and one without them worked"
            ));
        } else if second.is_err() && turned {
            // Not the list's fault: back on, and not suspected again at this revision.
            if let Err(e) = w.turn_on(&key, &stamp) {
                tracing::warn!(function = %key, "{}", spore_core::error_chain(&e));
            }
        }
        second
    }

    /// How a start from scratch goes: an import, snapshotted if the function asks for
    /// snapshots and has no usable one (nor a capture under way).
    fn init_how(&self, rec: &FunctionRecord) -> ColdStart {
        rec.manifest
            .snapshot
            .then(|| self.inner.snapshots.begin(&rec.key(), rec.revision))
            .flatten()
            .map_or(ColdStart::Init, ColdStart::InitAndSnapshot)
    }

    /// Starts a cfork instance: forked from the live template, or from a new one, imported or
    /// restored from the function's snapshot (then the start counts as `cold` or `restore`
    /// and includes the template's start). `cold_path` `init` or `restore` replaces the live
    /// template with one started that way.
    async fn fork_instance(
        &self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        log: Arc<LogRing>,
        init_timeout: Duration,
        first_invoke: Option<Vec<u8>>,
        cold_path: Option<StartKind>,
    ) -> Result<(Instance, StartKind), StartError> {
        let fresh = match cold_path {
            Some(StartKind::Cold) => Some(false),
            Some(StartKind::Restore) => Some(true),
            _ => None,
        };
        let (mut template, mut started) = self
            .template_for(env, rec, log.clone(), init_timeout, fresh)
            .await?;
        let mut forked = template
            .fork(env, rec, Duration::from_secs(10), first_invoke.clone())
            .await;
        if forked.is_err() && template.was_stopped() {
            // The reaper (or a redeploy) stopped the template between our getting it and
            // forking: go to the next one.
            (template, started) = self
                .template_for(env, rec, log.clone(), init_timeout, None)
                .await?;
            forked = template
                .fork(env, rec, Duration::from_secs(10), first_invoke.clone())
                .await;
        }
        if forked.is_err() && !template.is_alive() {
            self.drop_template(&rec.key(), &template);
            if template.warmup_failed() {
                // Its automatic warm-up is off now: a new template, without it, serves. If
                // that fails too, the warm-up was not the cause: back on (unless a module
                // started a thread, which is certain).
                let undo = template.warmup_undoable();
                let retried = self.template_for(env, rec, log, init_timeout, fresh).await;
                forked = match retried {
                    Ok((t, spent)) => {
                        (template, started) = (t, spent);
                        template
                            .fork(env, rec, Duration::from_secs(10), first_invoke)
                            .await
                    }
                    Err(e) => Err(e),
                };
                if forked.is_err() && undo {
                    if let Some(w) = &env.warmups {
                        let _ = w.turn_on(&rec.key(), &crate::warmup::stamp(rec));
                    }
                }
            }
        }
        let mut inst = forked?;
        if let Some(spent) = started {
            // This call waited for the template's build: count it and say so in the
            // breakdown, and report the start as the template's (cold or restore).
            inst.init_ms += spent;
            inst.breakdown.insert(0, ("template".to_owned(), spent));
            let kind = if template.restored {
                StartKind::Restore
            } else {
                StartKind::Cold
            };
            return Ok((inst, kind));
        }
        Ok((inst, StartKind::Fork))
    }

    fn drop_template(&self, name: &str, template: &Arc<Template>) {
        let mut templates = self.inner.templates.lock().expect("templates lock");
        if templates
            .get(name)
            .is_some_and(|t| Arc::ptr_eq(t, template))
        {
            templates.remove(name);
        }
        let t = template.clone();
        tokio::spawn(async move { t.destroy().await });
    }

    /// The live template of `rec`, started if there is none (or it died, or is stale):
    /// restored from the function's snapshot if it has one, else imported (and snapshotted,
    /// for a `snapshot = true` function). `fresh` = Some(restore?) replaces a live template
    /// with a new one started that way. Returns with it how long this call spent on the
    /// template's build (its whole start, or the part it waited for another task's), if any.
    async fn template_for(
        &self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        log: Arc<LogRing>,
        init_timeout: Duration,
        fresh: Option<bool>,
    ) -> Result<(Arc<Template>, Option<f64>), StartError> {
        let name = &rec.key();
        let lock = self
            .inner
            .template_locks
            .lock()
            .expect("template locks")
            .entry(name.clone())
            .or_default()
            .clone();
        let current = || {
            self.inner
                .templates
                .lock()
                .expect("templates lock")
                .get(name)
                .cloned()
        };
        // The usable template there was before waiting, if any: a call that waited only for
        // other calls to pass (a burst) did not wait for a build.
        let before = current().filter(|t| t.is_alive() && t.revision == rec.revision);
        let waiting = std::time::Instant::now();
        let _creating = lock.lock().await;
        let waited_ms = waiting.elapsed().as_secs_f64() * 1000.0;
        if let Some(t) = current() {
            if t.is_alive() && t.revision == rec.revision && fresh.is_none() {
                // Over a millisecond for a template that appeared meanwhile: another task (a
                // prewarm, a concurrent call) was building it, and this call waited for it.
                let built_meanwhile = before.as_ref().is_none_or(|b| !Arc::ptr_eq(b, &t));
                return Ok((t, (built_meanwhile && waited_ms > 1.0).then_some(waited_ms)));
            }
            self.drop_template(name, &t);
        }
        self.evict_templates(self.inner.cfg.max_templates.saturating_sub(1));
        let code_dir = self.inner.registry.code_dir(rec);
        let max_instances = self.max_instances(rec);
        let snaps = &self.inner.snapshots;
        let restore = fresh.unwrap_or(rec.manifest.snapshot);
        // Only snapshot users pay for looking at the store.
        let image = restore.then(|| snaps.current(name, rec.revision)).flatten();
        let mut template = None;
        if let Some(image) = &image {
            // Into the sandbox built for it ahead of time, if there is one.
            if let Some(spare) = self.take_spare(name, rec.revision, image, MemoryMode::Full, true)
            {
                match spare.start_template(env, rec, init_timeout).await {
                    Ok(t) => template = Some(t),
                    Err(e) => {
                        tracing::info!(function = %name, "the template's spare sandbox failed ({e}); restoring in a new one")
                    }
                }
            }
        }
        if let Some(image) = image.filter(|_| template.is_none()) {
            let how = ColdStart::Restore(image.clone(), MemoryMode::Full);
            // Twice: a restore can collide with the restorer's own (random) layout, which a
            // second process does not share.
            let mut why = String::new();
            for _ in 0..2 {
                let started = Template::start(
                    env,
                    rec,
                    code_dir.clone(),
                    log.clone(),
                    init_timeout,
                    max_instances,
                    how.clone(),
                )
                .await;
                match started {
                    Ok(t) => {
                        template = Some(t);
                        break;
                    }
                    Err(e) => why = e.to_string(),
                }
            }
            if template.is_none() {
                // A refused or failed image never runs: import instead, and take a new one.
                tracing::warn!(function = %name, "restoring the cfork template failed, starting it from scratch: {why}");
                snaps.discard(&image);
            }
        }
        let template = match template {
            Some(t) => t,
            None => {
                self.start_suspecting_warmup(env, rec, &log, || {
                    let how = self.init_how(rec);
                    let (code_dir, log) = (code_dir.clone(), log.clone());
                    Template::start(env, rec, code_dir, log, init_timeout, max_instances, how)
                })
                .await?
            }
        };
        template.refill_spares(env);
        tracing::info!(
            function = %name,
            template = %template.id,
            how = if template.restored { "restored" } else { "imported" },
            "cfork template started in {:.1} ms",
            template.init_ms
        );
        self.inner
            .templates
            .lock()
            .expect("templates lock")
            .insert(name.clone(), template.clone());
        let spent = template.init_ms;
        Ok((template, Some(spent)))
    }

    /// Stops least recently used templates until at most `keep` remain.
    fn evict_templates(&self, keep: usize) {
        let evicted: Vec<(String, Arc<Template>)> = {
            let mut templates = self.inner.templates.lock().expect("templates lock");
            let mut by_age: Vec<(String, Instant)> = templates
                .iter()
                .map(|(n, t)| (n.clone(), t.last_used()))
                .collect();
            by_age.sort_by_key(|(_, used)| *used);
            let excess = templates.len().saturating_sub(keep);
            by_age
                .into_iter()
                .take(excess)
                .filter_map(|(n, _)| templates.remove(&n).map(|t| (n, t)))
                .collect()
        };
        for (name, t) in evicted {
            tracing::info!("evicting cfork template {} (least recently used)", t.id);
            tokio::spawn(async move { t.destroy().await });
            self.leave_template_spare(&name);
        }
    }

    /// Starts the template of cfork function `rec` in the background (after a deploy), so
    /// that its first invocation forks instead of waiting for the template.
    pub fn prewarm(&self, rec: FunctionRecord) {
        let Ok(env) = self.inner.env.clone() else {
            return;
        };
        if rec.manifest.sandbox != SandboxKind::Cfork {
            return;
        }
        let this = self.clone();
        // Counted as in flight, so that a shutdown waits for the template and removes it.
        let guard = self.inner.work.begin();
        tokio::spawn(async move {
            let _guard = guard;
            let log = this.log(&rec.manifest.name);
            let timeout =
                Duration::from_secs(u64::from(rec.manifest.timeout_s)).max(Duration::from_secs(10));
            if let Err(e) = this
                .template_for(&env, &rec, log.clone(), timeout, None)
                .await
            {
                log.push_text(&format!("starting the cfork template failed: {e}"));
            }
        });
    }

    /// Takes `name`'s spare sandbox if it restores `image` at `revision` in `mode` (a
    /// template's if `template`); a stale one (or one of another kind) is stopped.
    fn take_spare(
        &self,
        name: &str,
        revision: u64,
        image: &std::path::Path,
        mode: MemoryMode,
        template: bool,
    ) -> Option<Spare> {
        let spare = self
            .inner
            .spares
            .lock()
            .expect("spares lock")
            .remove(name)?;
        if spare.fits(revision, image, mode) && spare.is_template() == template {
            return Some(spare);
        }
        tokio::spawn(spare.destroy());
        None
    }

    /// Builds, in the background, a spare sandbox for the next restore of the cfork template
    /// of `name` that just left memory (if it can come back from a snapshot): it holds
    /// almost none of the runtime's private memory (only copies of the library pages the
    /// restore overwrites), and the next call restores into it instead of building a sandbox
    /// first. It goes after the keep-alive like any spare.
    pub(crate) fn leave_template_spare(&self, name: &str) {
        let Ok(env) = self.inner.env.clone() else {
            return;
        };
        let Some(rec) = self.inner.registry.lock().get(name).cloned() else {
            return;
        };
        if rec.manifest.sandbox != SandboxKind::Cfork || !rec.manifest.snapshot {
            return;
        }
        let Some(image) = self.inner.snapshots.current(name, rec.revision) else {
            return;
        };
        // At most as many template spares as live templates: functions cycling through the
        // template limit must not pile up sandboxes.
        let held = (self.inner.spares.lock().expect("spares lock").values())
            .filter(|s| s.is_template())
            .count();
        if held >= self.inner.cfg.max_templates {
            return;
        }
        let log = self.log(&rec.manifest.name);
        let max = self.max_instances(&rec);
        self.refill_spare(&env, &rec, &log, &image, SpareFor::Template(max));
    }

    /// Builds a spare sandbox for `rec`'s next restore from `image`, in the background,
    /// unless it has one (or the daemon is stopping).
    fn refill_spare(
        &self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        log: &Arc<LogRing>,
        image: &std::path::Path,
        spare: SpareFor,
    ) {
        let name = rec.key();
        // Counted as in flight before the drain check, so that a shutdown either sees it
        // and waits for it (then stops it), or it sees the shutdown and builds nothing.
        let guard = self.inner.work.begin();
        if self.inner.work.is_draining()
            || self
                .inner
                .spares
                .lock()
                .expect("spares lock")
                .contains_key(&name)
            || !self
                .inner
                .spares_building
                .lock()
                .expect("spares lock")
                .insert(name.clone())
        {
            return;
        }
        let (this, env, rec, log) = (self.clone(), env.clone(), rec.clone(), log.clone());
        let image = image.to_owned();
        tokio::spawn(async move {
            let _guard = guard;
            // Whatever happens below, this function's build is over when the task ends.
            struct Building(Pools, String);
            impl Drop for Building {
                fn drop(&mut self) {
                    self.0
                        .inner
                        .spares_building
                        .lock()
                        .expect("spares lock")
                        .remove(&self.1);
                }
            }
            let _building = Building(this.clone(), name.clone());
            // Built once the start that asked for it has answered (see `settle`), unless the
            // daemon began to shut down meanwhile.
            env.settle.settled().await;
            if this.inner.work.is_draining() {
                return;
            }
            let code_dir = this.inner.registry.code_dir(&rec);
            let built = match spare {
                SpareFor::Instance(mode) => {
                    Spare::build(&env, &rec, code_dir, log, image, mode).await
                }
                SpareFor::Template(max) => {
                    Spare::build_template(&env, &rec, code_dir, log, image, max).await
                }
            };
            match built {
                Ok(spare) => {
                    let stale = {
                        let mut spares = this.inner.spares.lock().expect("spares lock");
                        let current = this.inner.registry.revision(&name) == Some(rec.revision);
                        if this.inner.work.is_draining() || !current || spares.contains_key(&name) {
                            Some(spare)
                        } else {
                            spares.insert(name, spare);
                            None
                        }
                    };
                    if let Some(s) = stale {
                        s.destroy().await;
                    }
                }
                Err(e) => tracing::warn!(function = %name, "building a spare sandbox: {e}"),
            }
        });
    }

    /// Stops every spare sandbox `stop` selects.
    pub(crate) async fn stop_spares(&self, stop: impl Fn(&str, &Spare) -> bool) {
        let gone: Vec<Spare> = {
            let mut spares = self.inner.spares.lock().expect("spares lock");
            let names: Vec<String> = spares
                .iter()
                .filter(|(n, s)| stop(n, s))
                .map(|(n, _)| n.clone())
                .collect();
            names.iter().filter_map(|n| spares.remove(n)).collect()
        };
        for s in gone {
            s.destroy().await;
        }
    }
}

/// What a spare sandbox is built for.
#[derive(Debug, Clone, Copy)]
enum SpareFor {
    /// An instance's restore, in this memory mode.
    Instance(MemoryMode),
    /// A cfork template's restore (its instance limit sizes the template's cgroup).
    Template(u32),
}

/// The frame of the caller's first invocation, to send behind a start request.
fn first_invoke_frame(how: &Checkout) -> Option<Vec<u8>> {
    how.first_invoke.as_ref().map(|f| {
        invoke_frame(
            &f.request_id,
            &f.payload,
            f.timeout_s,
            f.client_context.as_ref(),
        )
    })
}
