//! Stopping gently, by ownership: every connection holds a `Blocker` from accept to close;
//! the drain tells every handler to finish (HTTP connections finish the request in flight, idle
//! ones close at once) and waits, bounded, until the last blocker is dropped. No counter is
//! polled: the wait ends when the last connection lets go.
use std::{convert::Infallible, time::Duration};

use tokio::sync::{mpsc, watch};

/// Starts the drain; dropping it without `drain` never drains.
pub struct Trigger {
    draining: watch::Sender<bool>,
    /// The one blocker held until the drain starts: while it lives, `Watch::block` succeeds.
    held: mpsc::Sender<Infallible>,
    released: mpsc::Receiver<Infallible>,
}

/// What the data path holds: whether the agent is draining, and where blockers come from.
#[derive(Clone)]
pub struct Watch {
    draining: watch::Receiver<bool>,
    blockers: mpsc::WeakSender<Infallible>,
}

/// Held by one open connection (or one being accepted): the drain waits for it.
pub struct Blocker(#[allow(dead_code)] mpsc::Sender<Infallible>);

pub fn channel() -> (Trigger, Watch) {
    let (draining, rx) = watch::channel(false);
    let (held, released) = mpsc::channel(1);
    let watch = Watch {
        draining: rx,
        blockers: held.downgrade(),
    };
    (
        Trigger {
            draining,
            held,
            released,
        },
        watch,
    )
}

impl Watch {
    /// A blocker for a connection; None once every connection of a finished drain is gone.
    pub fn block(&self) -> Option<Blocker> {
        self.blockers.upgrade().map(Blocker)
    }

    /// Turns true once, when the drain starts.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.clone()
    }
}

impl Trigger {
    /// Tells every connection to finish, then waits at most `timeout` until none holds a
    /// blocker. Returns whether they all finished in time.
    pub async fn drain(self, timeout: Duration) -> bool {
        let Trigger {
            draining,
            held,
            mut released,
        } = self;
        let _ = draining.send(true);
        drop(held);
        // recv() gives None once the last sender (blocker) is dropped; nothing is ever sent.
        tokio::time::timeout(timeout, released.recv()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_the_last_blocker_up_to_the_timeout() {
        let (trigger, watch) = channel();
        let mut draining = watch.draining();
        let open = watch.block().expect("a blocker before the drain");
        let started = tokio::time::Instant::now();
        let waiting = trigger.drain(Duration::from_millis(500));
        tokio::pin!(waiting);
        tokio::select! {
            _ = &mut waiting => panic!("returned with a connection open"),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        assert!(*draining.borrow_and_update(), "handlers see the drain");
        drop(open);
        assert!(waiting.await, "finished in time");
        assert!(started.elapsed() < Duration::from_millis(500));

        // A connection that never closes: the timeout ends the wait.
        let (trigger, watch) = channel();
        let _stuck = watch.block().unwrap();
        let started = tokio::time::Instant::now();
        assert!(!trigger.drain(Duration::from_millis(100)).await);
        assert!(started.elapsed() >= Duration::from_millis(100));
        // Nothing open: at once.
        let (trigger, _watch) = channel();
        assert!(trigger.drain(Duration::from_secs(5)).await);
    }
}
