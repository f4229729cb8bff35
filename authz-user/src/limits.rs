//! The agent's descriptor budget: raised to the hard limit at start, and a cap on proxied
//! connections kept below it, so a flood from one pod makes the agent refuse new connections
//! instead of `accept()` failing for every pod, the admin port and JWKS fetches.
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors kept for everything but proxied connections: listeners (two per pod), the admin
/// port, JWKS fetches, the kernel's maps and links.
const RESERVE: u64 = 4096;
/// Each proxied connection holds two descriptors (downstream and upstream).
const FDS_PER_CONNECTION: u64 = 2;

/// Raises the soft descriptor limit to the hard one; returns the limit now in force.
pub fn raise_nofile() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// The agent-wide connection cap: `configured` (0 = as many as the descriptors allow), never
/// more than the descriptors allow.
pub fn connection_cap(configured: u64, nofile: u64) -> u64 {
    let reserve = RESERVE.min(nofile / 2);
    let fit = (nofile.saturating_sub(reserve) / FDS_PER_CONNECTION).max(1);
    if configured == 0 {
        fit
    } else {
        configured.min(fit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_stays_below_the_descriptor_limit() {
        assert_eq!(connection_cap(0, 1_048_576), (1_048_576 - 4096) / 2);
        assert_eq!(connection_cap(100, 1_048_576), 100);
        assert_eq!(connection_cap(1_000_000, 65_536), (65_536 - 4096) / 2);
        // A tiny limit still leaves half the descriptors to the rest of the agent.
        assert_eq!(connection_cap(0, 1024), 256);
        assert!(connection_cap(0, 0) >= 1);
    }
}
