//! Stopping gently: a trigger every connection handler watches (HTTP connections finish the
//! request in flight, idle ones close at once), and a bounded wait for open connections.
use std::{sync::atomic::Ordering, time::Duration};

use crate::metrics::Metrics;

/// Starts the drain; dropping it without `start` never drains.
pub struct Trigger(tokio::sync::watch::Sender<bool>);

/// What connection handlers hold: `draining()` turns true once.
pub type Watch = tokio::sync::watch::Receiver<bool>;

pub fn channel() -> (Trigger, Watch) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (Trigger(tx), rx)
}

impl Trigger {
    /// Tells every connection to finish; then waits, at most `timeout`, until none is open.
    pub async fn drain(self, metrics: &Metrics, timeout: Duration) {
        let _ = self.0.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let open = metrics.connections_active.load(Ordering::Relaxed)
                + metrics.connections_starting.load(Ordering::Relaxed);
            if open == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(open, "drain timeout: closing the remaining connections");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_open_connections_up_to_the_timeout() {
        let metrics = Metrics::default();
        let (trigger, mut watch) = channel();
        metrics.connections_active.store(1, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let waiting = trigger.drain(&metrics, Duration::from_millis(200));
        tokio::pin!(waiting);
        tokio::select! {
            _ = &mut waiting => panic!("returned with a connection open"),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        assert!(*watch.borrow_and_update(), "handlers see the drain");
        metrics.connections_active.store(0, Ordering::Relaxed);
        waiting.await;
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "returns once none is open"
        );
        // A connection that never closes: the timeout ends the wait.
        let (trigger, _watch) = channel();
        metrics.connections_starting.store(1, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        trigger.drain(&metrics, Duration::from_millis(100)).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
