//! Whether the agent enforces: `/ready` answers 200 only in between. Alive (`/healthz`) is
//! simply the process answering.
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    /// Programs attached, pods enrolled, policies in force.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Stopping, or not started yet: a rolling update waits for the successor's readiness.
    pub fn set_not_ready(&self) {
        self.0.store(false, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}
