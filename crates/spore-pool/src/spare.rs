//! Spare sandboxes: a restore's sandbox built ahead of time, waiting for the go-ahead: an
//! instance's (a container function's restore) or a cfork template's (its template's
//! restore, after an eviction).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spore_core::MemoryMode;
use spore_registry::FunctionRecord;

use crate::instance::{Instance, PIPELINED_MAX};
use crate::logs::LogRing;
use crate::sandbox::{send_go, ColdStart, InstanceEnv, StartError};
use crate::template::{PendingTemplate, Template};

/// A sandbox built ahead of time for a restore, waiting for the go-ahead with the image's
/// regions already mapped: a restore into it pays only for installing memory and resuming
/// (the daemon keeps one per function that restores, see `Pools`). Any memory mode: a lazy
/// or reap spare has its userfaultfd and fault server ready too, and a reap spare the
/// working set that was recorded when it was built.
#[derive(Debug)]
pub struct Spare {
    kind: Kind,
    revision: u64,
    image: PathBuf,
    ino: u64,
    mode: MemoryMode,
    /// (Reap) when the working set it read was written (None: there was none).
    working_set: Option<std::time::SystemTime>,
    /// When it was built.
    pub created: Instant,
}

/// What waits.
#[derive(Debug)]
enum Kind {
    Instance {
        inst: Instance,
        go: Vec<u8>,
        how: ColdStart,
    },
    Template(PendingTemplate),
}

impl Spare {
    /// Builds a sandbox that will restore `image` in memory mode `mode` on the go-ahead.
    pub async fn build(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        image: PathBuf,
        mode: MemoryMode,
    ) -> Result<Spare, StartError> {
        let ino = image_ino(&image)?;
        // Read before the sandbox reads it: a set recorded meanwhile makes this one stale.
        let working_set = working_set_written(&image, mode);
        let how = ColdStart::Restore(image.clone(), mode);
        let (inst, go) = Instance::spawn(env, rec, code_dir, log, &how, true).await?;
        let Some(go) = go else {
            inst.destroy().await;
            return Err(StartError::Platform("a spare without a go-ahead".into()));
        };
        Ok(Spare {
            kind: Kind::Instance { inst, go, how },
            revision: rec.revision,
            image,
            ino,
            mode,
            working_set,
            created: Instant::now(),
        })
    }

    /// Whether it restores the image now at `image` for `revision` in memory mode `mode` (a
    /// replaced file has another inode, the spare holds the old one open; a reap spare
    /// needs the working set recorded now).
    pub fn fits(&self, revision: u64, image: &std::path::Path, mode: MemoryMode) -> bool {
        self.revision == revision
            && self.image == image
            && self.mode == mode
            && image_ino(image).is_ok_and(|ino| ino == self.ino)
            && working_set_written(image, mode) == self.working_set
    }

    /// Builds the sandbox of a cfork template that will restore `image` on the go-ahead.
    pub async fn build_template(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        image: PathBuf,
        max_instances: u32,
    ) -> Result<Spare, StartError> {
        let ino = image_ino(&image)?;
        // Templates always restore whole (see `Template::start`).
        let how = ColdStart::Restore(image.clone(), MemoryMode::Full);
        let pending = Template::spawn(env, rec, code_dir, log, max_instances, how, true).await?;
        Ok(Spare {
            kind: Kind::Template(pending),
            revision: rec.revision,
            image,
            ino,
            mode: MemoryMode::Full,
            working_set: None,
            created: Instant::now(),
        })
    }

    /// Whether it is a cfork template's.
    pub fn is_template(&self) -> bool {
        matches!(self.kind, Kind::Template(_))
    }

    /// Lets it restore; returns the instance once its runtime is ready (`init_ms` counts from
    /// the go-ahead). `first`, an invocation frame, goes right behind the go-ahead: the
    /// restored runtime reads it as soon as it has sent `ready`, without waiting for the
    /// daemon to read that and write it (the instance then says it was sent).
    pub async fn start(
        self,
        rec: &FunctionRecord,
        init_timeout: Duration,
        first: Option<Vec<u8>>,
    ) -> Result<Instance, StartError> {
        let (mut inst, go, how) = match self.kind {
            Kind::Instance { inst, go, how } => (inst, go, how),
            Kind::Template(t) => {
                t.destroy().await;
                return Err(StartError::Platform(
                    "a template's spare sandbox cannot serve an instance".into(),
                ));
            }
        };
        let t0 = Instant::now();
        // Only small frames: with the go-ahead and the environment, they fit in the socket's
        // empty buffer, so the restored runtime need not read anything for this write to end.
        let first = first.filter(|f| f.len() <= PIPELINED_MAX);
        let go = match &first {
            Some(frame) => [go.as_slice(), frame].concat(),
            None => go,
        };
        if let Err(e) = send_go(&mut inst.sock, &go, init_timeout).await {
            inst.destroy().await;
            return Err(e);
        }
        let mut inst = inst
            .await_ready(rec, &how, init_timeout, t0)
            .await
            .map_err(|(e, _)| e)?;
        inst.invoke_sent = first.is_some();
        Ok(inst)
    }

    /// Lets a template's spare restore; returns the template once it is ready (its
    /// `init_ms` counts from the go-ahead).
    pub async fn start_template(
        self,
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        init_timeout: Duration,
    ) -> Result<Arc<Template>, StartError> {
        match self.kind {
            Kind::Template(t) => t.finish(env, rec, init_timeout).await,
            Kind::Instance { inst, .. } => {
                inst.destroy().await;
                Err(StartError::Platform(
                    "an instance's spare sandbox cannot serve a template".into(),
                ))
            }
        }
    }

    /// The memory mode it restores in.
    pub fn mode(&self) -> MemoryMode {
        self.mode
    }

    /// Host pids of its processes.
    pub fn pids(&self) -> Vec<i32> {
        match &self.kind {
            Kind::Instance { inst, .. } => inst.pids(),
            Kind::Template(t) => t.pids(),
        }
    }

    /// Stops it.
    pub async fn destroy(self) {
        match self.kind {
            Kind::Instance { inst, .. } => inst.destroy().await,
            Kind::Template(t) => t.destroy().await,
        }
    }
}

/// When `image`'s working set was written, for a reap restore (None: another mode, or none
/// recorded).
fn working_set_written(image: &std::path::Path, mode: MemoryMode) -> Option<std::time::SystemTime> {
    if mode != MemoryMode::Reap {
        return None;
    }
    std::fs::metadata(spore_snapshot::lazy::working_set_path(image))
        .and_then(|m| m.modified())
        .ok()
}

/// The inode of `image` (a replaced file has another: a spare holds the one it opened).
fn image_ino(image: &std::path::Path) -> Result<u64, StartError> {
    std::fs::metadata(image)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .map_err(|e| StartError::Platform(format!("{}: {e}", image.display())))
}
