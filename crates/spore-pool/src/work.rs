//! The daemon's work in flight: invocations, DAG runs and background starts each hold a
//! [`WorkGuard`]; a shutdown stops new work and waits for what is in flight to finish.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Work in flight, and whether the daemon is draining. Shared by every subsystem.
#[derive(Debug, Default)]
pub struct Work {
    draining: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
}

/// One piece of work in flight; dropping it ends it.
#[derive(Debug)]
pub struct WorkGuard(Arc<Work>);

impl Drop for WorkGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Work {
    /// Nothing in flight, not draining.
    pub fn new() -> Arc<Work> {
        Arc::new(Work::default())
    }

    /// Counts one piece of work in flight until the guard drops (callers check
    /// [`Work::is_draining`] after this, so that a shutdown either sees them or they see it).
    pub fn begin(self: &Arc<Self>) -> WorkGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        WorkGuard(self.clone())
    }

    /// Whether the daemon stopped taking work.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Pieces of work in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Stops taking work and waits up to `grace` for what is in flight.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + grace;
        loop {
            // Registered before the count is read, so that the last guard's wake-up between
            // the two is not lost.
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.inflight.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline.into(), idle)
                .await
                .is_err()
            {
                tracing::warn!(
                    "{} invocations still running after {grace:?}; stopping them",
                    self.inflight.load(Ordering::Acquire)
                );
                break;
            }
        }
    }
}
