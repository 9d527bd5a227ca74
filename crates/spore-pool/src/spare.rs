//! Spare sandboxes: a restore's sandbox built ahead of time, waiting for the go-ahead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spore_core::MemoryMode;
use spore_registry::FunctionRecord;
use tokio::io::AsyncWriteExt;

use crate::instance::Instance;
use crate::logs::LogRing;
use crate::sandbox::{ColdStart, InstanceEnv, StartError};

/// A sandbox built ahead of time for a restore, waiting for the go-ahead: a restore into it
/// pays only for installing memory and resuming (the daemon keeps one per function that
/// restores, see `Pools`).
#[derive(Debug)]
pub struct Spare {
    inst: Instance,
    go: Vec<u8>,
    how: ColdStart,
    revision: u64,
    image: PathBuf,
    ino: u64,
    /// When it was built.
    pub created: Instant,
}

impl Spare {
    /// Builds a sandbox that will restore `image` (memory mode `full`) on the go-ahead.
    pub async fn build(
        env: &Arc<InstanceEnv>,
        rec: &FunctionRecord,
        code_dir: PathBuf,
        log: Arc<LogRing>,
        image: PathBuf,
    ) -> Result<Spare, StartError> {
        let ino = std::fs::metadata(&image)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .map_err(|e| StartError::Platform(format!("{}: {e}", image.display())))?;
        let how = ColdStart::Restore(image.clone(), MemoryMode::Full);
        let (inst, go) = Instance::spawn(env, rec, code_dir, log, &how, true).await?;
        let Some(go) = go else {
            inst.destroy().await;
            return Err(StartError::Platform("a spare without a go-ahead".into()));
        };
        Ok(Spare {
            inst,
            go,
            how,
            revision: rec.revision,
            image,
            ino,
            created: Instant::now(),
        })
    }

    /// Whether it restores the image now at `image` for `revision` (a replaced file has
    /// another inode; the spare holds the old one open).
    pub fn fits(&self, revision: u64, image: &std::path::Path) -> bool {
        self.revision == revision
            && self.image == image
            && std::fs::metadata(image)
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.ino)
    }

    /// Lets it restore; returns the instance once its runtime is ready (`init_ms` counts from
    /// the go-ahead).
    pub async fn start(
        mut self,
        rec: &FunctionRecord,
        init_timeout: Duration,
    ) -> Result<Instance, StartError> {
        let t0 = Instant::now();
        if let Err(e) = self.inst.sock.write_all(&self.go).await {
            self.inst.destroy().await;
            return Err(StartError::Platform(format!(
                "the spare sandbox is gone ({e})"
            )));
        }
        self.inst
            .await_ready(rec, &self.how, init_timeout, t0)
            .await
            .map_err(|(e, _)| e)
    }

    /// Host pids of its processes.
    pub fn pids(&self) -> Vec<i32> {
        self.inst.pids()
    }

    /// Stops it.
    pub async fn destroy(self) {
        self.inst.destroy().await;
    }
}
