//! The agent's descriptor budget: raised to the hard limit at start, and a cap on proxied
//! connections kept below it, so a flood makes the agent refuse new connections instead of
//! `accept()` failing for every pod, the admin port and JWKS fetches. Within the cap, every
//! connection counts against the client that opened it (`Clients`), never against the pod it
//! goes to: one client holding all it may (slow request heads included) takes nothing from a
//! destination's other clients, nor from the destination's own outbound calls.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

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

/// Who opened a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// An enrolled pod calling out (`ns/name`).
    Pod(Arc<str>),
    /// The peer of a connection arriving at a protected pod (a pod of any node, the node, the
    /// outside world as the node sees it).
    Addr(IpAddr),
}

/// A client's share of the agent-wide cap: as configured, never more than three quarters of the
/// cap, so whatever one client holds, a quarter of the node's budget is left for the others.
pub fn per_client(configured: u64, agent_cap: u64) -> u64 {
    configured.min((agent_cap - agent_cap / 4).max(1))
}

/// Connections open per client, each client held to `limit`.
pub struct Clients {
    limit: u64,
    open: Mutex<HashMap<Client, u64, foldhash::fast::RandomState>>,
}

impl Clients {
    pub fn new(limit: u64) -> Clients {
        Clients {
            limit,
            open: Mutex::default(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts one more connection of `client`; false (nothing counted) at its limit.
    pub fn take(&self, client: &Client) -> bool {
        let mut open = self.open.lock().unwrap();
        let n = open.entry(client.clone()).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    /// One connection of `client` closed.
    pub fn release(&self, client: &Client) {
        let mut open = self.open.lock().unwrap();
        if let Some(n) = open.get_mut(client) {
            *n -= 1;
            if *n == 0 {
                open.remove(client);
            }
        }
    }

    /// Clients with a connection open (the table never keeps the others).
    pub fn len(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_budget_and_the_table_forgets_idle_ones() {
        let clients = Clients::new(2);
        let (a, b) = (
            Client::Addr("10.0.0.1".parse().unwrap()),
            Client::Pod("foo/b".into()),
        );
        assert!(clients.take(&a) && clients.take(&a));
        assert!(!clients.take(&a), "a is at its limit");
        assert!(
            clients.take(&b) && clients.take(&b),
            "b is not touched by a"
        );
        clients.release(&a);
        assert!(clients.take(&a), "a freed slot is a's again");
        for _ in 0..2 {
            clients.release(&a);
            clients.release(&b);
        }
        assert!(clients.is_empty());
    }

    #[test]
    fn one_client_leaves_a_quarter_of_the_agent_to_the_others() {
        assert_eq!(per_client(4096, 1_000_000), 4096);
        assert_eq!(per_client(4096, 1000), 750);
        assert_eq!(per_client(4, 6), 4);
        assert_eq!(per_client(10, 1), 1);
    }

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
