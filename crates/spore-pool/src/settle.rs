//! Background preparation (the next restore's spare sandbox, cgroups for the next forks) waits
//! until the first invocations of fresh instances have been answered.
//!
//! On a host with few CPUs, building a spare sandbox (a process with its namespaces, mounts
//! and the image mapped) right after a start competes with the start's own first
//! invocation and its response. Measured on 2 vCPUs, `hello` restored into a spare: first
//! response 8.98 / 9.47 ms p50 with the next spare built at once, 7.07 / 7.28 ms with it
//! built after the response (two runs each, alternated). The preparation is for a later
//! start, so it can wait; it waits at most [`SETTLE_MAX`], so that a long first invocation,
//! or a stream of them, does not hold it back for long.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// The longest background preparation waits for first invocations to be answered.
pub const SETTLE_MAX: Duration = Duration::from_millis(100);

/// Once no first invocation is in flight (not after giving up at [`SETTLE_MAX`]): a moment
/// for the last one's response to leave the gateway.
const SETTLE_GRACE: Duration = Duration::from_millis(1);

/// Counts first invocations of fresh instances in flight.
#[derive(Debug, Default)]
pub struct Settle {
    in_flight: AtomicUsize,
    done: Notify,
}

impl Settle {
    /// A fresh instance is being started for an invocation (each `begin` is matched by one
    /// [`Settle::end`]).
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// That instance came back after its first invocation, or its start failed.
    pub fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
        }
    }

    /// First invocations in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Returns once no first invocation is in flight (plus a moment for the last response to
    /// go out), or after [`SETTLE_MAX`].
    pub async fn settled(&self) {
        let deadline = tokio::time::Instant::now() + SETTLE_MAX;
        loop {
            // Created before the check: an `end` between the two still wakes it.
            let done = self.done.notified();
            if self.in_flight() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(SETTLE_GRACE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[tokio::test]
    async fn settles_at_once_when_idle() {
        let s = Settle::default();
        let t = Instant::now();
        s.settled().await;
        assert!(t.elapsed() < SETTLE_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_last_first_call() {
        let s = Arc::new(Settle::default());
        s.begin();
        s.begin();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.settled().await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.end();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!waiter.is_finished(), "one first call is still in flight");
        s.end();
        let t = tokio::time::Instant::now();
        waiter.await.unwrap();
        assert!(
            t.elapsed() < SETTLE_MAX,
            "settled by the last end, not by the limit"
        );
        assert_eq!(s.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_limit() {
        let s = Settle::default();
        s.begin();
        let t = tokio::time::Instant::now();
        s.settled().await;
        assert!(t.elapsed() >= SETTLE_MAX);
    }
}
