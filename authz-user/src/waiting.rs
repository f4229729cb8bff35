//! How long a pod has waited to be enrolled, why, and whether its owner was told: one type for
//! every cause (not found on the host yet, in `kubernetes::input`; found but not enrollable, in
//! `enroll`), so both are logged when they start or change reason and reported once after the
//! same delay.
use std::time::{Duration, Instant};

/// A pod still not enrolled after this is reported where its owner looks (an Event).
pub const REPORT_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Waiting {
    reason: String,
    since: Instant,
    reported: bool,
}

impl Waiting {
    /// Still waiting, now for `reason`: the clock goes on for the same reason and starts again
    /// for another (which is news: the bool says so, for a log line).
    pub fn renew(prev: Option<Waiting>, reason: String) -> (Waiting, bool) {
        match prev {
            Some(w) if w.reason == reason => (w, false),
            _ => (
                Waiting {
                    reason,
                    since: Instant::now(),
                    reported: false,
                },
                true,
            ),
        }
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Waiting for `REPORT_AFTER` and not reported yet: true once, then it counts as reported.
    pub fn report_due(&mut self) -> bool {
        let due = !self.reported && self.since.elapsed() >= REPORT_AFTER;
        self.reported |= due;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_goes_on_for_one_reason_and_restarts_for_another() {
        let (w, news) = Waiting::renew(None, "no cgroup".into());
        assert!(news);
        let (mut w, news) = Waiting::renew(Some(w), "no cgroup".into());
        assert!(!news);
        assert!(!w.report_due(), "not before REPORT_AFTER");
        w.since -= REPORT_AFTER;
        assert!(w.report_due());
        assert!(!w.report_due(), "reported once");
        let (w, news) = Waiting::renew(Some(w), "no process".into());
        assert!(news && !w.reported && w.reason() == "no process");
    }
}
