//! Pods and workloads: who is enrolled, and which destination address is which workload.
use std::{
    collections::BTreeMap,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
};

use crate::{
    config::ServiceSpec,
    world::{DecidedAt, Identity, Probe, World},
};

/// A workload as policies see it: its namespace, labels and identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub service_account: String,
}

/// A workload's labels as sorted pairs: one allocation (a `BTreeMap` node is half a kilobyte
/// even for one label, and the agent keeps one per pod of the cluster).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(m: &BTreeMap<String, String>) -> Labels {
        // A BTreeMap iterates in key order: the pairs come sorted.
        Labels(
            m.iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
        )
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(m: BTreeMap<String, String>) -> Labels {
        Labels::from(&m)
    }
}

impl Workload {
    fn of(w: &crate::config::WorkloadSpec) -> Arc<Workload> {
        Arc::new(Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            labels: Labels::from(&w.labels),
            service_account: w.service_account.clone(),
        })
    }
}

/// An enrolled pod: a source of redirected traffic.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Stable small id carried through the kernel maps (1-based).
    pub id: u32,
    pub workload: Arc<Workload>,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub ips: Vec<IpAddr>,
    /// Connections arriving at the pod are decided at the pod (its netns is captured).
    pub inbound: bool,
    pub exclude_inbound_ports: Vec<u16>,
    pub probes: Vec<Probe>,
    pub identity: Identity,
}

#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub pods: Vec<Arc<Pod>>,
    /// Address decided on the client's side (steered by connect4/6) -> workload.
    pub by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Every known address -> the pod or workload that has it: a peer's identity at the
    /// destination. An address that is not here (the host, the outside world) has none.
    pub sources: HashMap<IpAddr, Arc<Workload>>,
    /// Addresses whose connections are decided where they arrive (this node's captured pods, and
    /// other nodes' mesh pods): never decided on the client's side.
    pub decided_at_destination: std::collections::HashSet<IpAddr>,
    /// Every workload by `ns/name` (pods and workloads), for `check --to/--from`.
    pub by_name: HashMap<String, Arc<Workload>>,
    pub services: Vec<Arc<ServiceSpec>>,
    /// Enforced service address -> the service (with backends, one of them enforced).
    pub vips: HashMap<IpAddr, Vip>,
}

/// A steered service address: its service, and the backend the next connection gets.
#[derive(Debug)]
pub struct Vip {
    pub service: Arc<ServiceSpec>,
    /// Round robin over the backends on the connection's port: an even spread whatever the
    /// clients' source ports (Linux hands even ones to `connect()`) or the number of backends.
    next: AtomicUsize,
}

impl Clone for Vip {
    fn clone(&self) -> Vip {
        Vip {
            service: self.service.clone(),
            next: AtomicUsize::new(self.next.load(Relaxed)),
        }
    }
}

impl Registry {
    pub fn from_world(world: &World) -> Registry {
        let cfg = world;
        let mut reg = Registry {
            services: cfg.services.clone(),
            ..Default::default()
        };
        for (i, pod) in cfg.pods.iter().enumerate() {
            let p = &pod.spec;
            let workload = Arc::new(Workload {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                labels: Labels::from(&p.labels),
                service_account: p.service_account.clone(),
            });
            let known = pod.identity.is_known();
            if known {
                reg.by_name
                    .insert(format!("{}/{}", p.namespace, p.name), workload.clone());
            }
            for ip in &p.ips {
                // A pod the source does not vouch for yet is no one as a source.
                if known {
                    reg.sources.insert(normalize(*ip), workload.clone());
                }
                if p.inbound {
                    reg.decided_at_destination.insert(normalize(*ip));
                }
            }
            reg.pods.push(Arc::new(Pod {
                id: i as u32 + 1,
                workload,
                netns: p.netns.clone(),
                cgroup: p.cgroup.clone(),
                ips: p.ips.clone(),
                inbound: p.inbound,
                exclude_inbound_ports: p.exclude_inbound_ports.clone(),
                probes: pod.probes.clone(),
                identity: pod.identity,
            }));
        }
        // Not in `by_name` (offline `check` only): one name string less per cluster pod.
        for peer in &cfg.peers {
            for ip in peer.ips.iter() {
                reg.sources.insert(normalize(*ip), peer.workload.clone());
                match peer.decided {
                    DecidedAt::ItsNode => reg.decided_at_destination.insert(normalize(*ip)),
                    DecidedAt::Client => reg
                        .by_ip
                        .insert(normalize(*ip), peer.workload.clone())
                        .is_none(),
                };
            }
        }
        for w in &cfg.workloads {
            let workload = Workload::of(w);
            reg.by_name
                .insert(format!("{}/{}", w.namespace, w.name), workload.clone());
            for ip in &w.ips {
                reg.by_ip.insert(normalize(*ip), workload.clone());
                reg.sources.insert(normalize(*ip), workload.clone());
            }
        }
        let mut vips = HashMap::new();
        for s in &reg.services {
            // Steered when a backend is decided here or at its destination: the agent picks the
            // backend (as a waypoint would), and decides only for the former.
            let enforced = s.backends.iter().any(|b| {
                let ip = normalize(b.ip);
                reg.by_ip.contains_key(&ip) || reg.decided_at_destination.contains(&ip)
            });
            if enforced {
                for ip in &s.ips {
                    vips.insert(
                        normalize(*ip),
                        Vip {
                            service: s.clone(),
                            next: AtomicUsize::new(0),
                        },
                    );
                }
            }
        }
        reg.vips = vips;
        reg
    }

    /// Every workload decided by this agent: its captured pods and its client-side workloads.
    pub fn destinations(&self) -> impl Iterator<Item = &Arc<Workload>> {
        // A claimed pod is none: no policy can select it yet, so its connections are refused.
        self.pods
            .iter()
            .filter(|p| p.inbound && p.identity.is_known())
            .map(|p| &p.workload)
            .chain(self.by_ip.values())
    }

    /// Where a connection to `dst` goes and whose policies apply. A service address takes its
    /// backends on that port in turn; None when the service has none there (the connection is
    /// closed, as a proxy would refuse).
    pub fn resolve(&self, dst: SocketAddr) -> Option<(SocketAddr, Option<Arc<Workload>>)> {
        let Some(vip) = self.vips.get(&normalize(dst.ip())) else {
            return Some((dst, self.workload_at(dst.ip()).cloned()));
        };
        let svc = &vip.service;
        // Per connection: count, then take the chosen one, with no allocation.
        let candidates = || {
            svc.backends.iter().filter_map(|b| {
                let p = b.ports.iter().find(|p| p.port == dst.port())?;
                Some((b.ip, p.target_port.unwrap_or(p.port)))
            })
        };
        let n = candidates().count();
        let pick = vip.next.fetch_add(1, Relaxed);
        let (ip, port) = candidates().nth(pick.checked_rem(n)?)?;
        Some((SocketAddr::new(ip, port), self.workload_at(ip).cloned()))
    }

    pub fn workload_at(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&normalize(ip))
    }

    /// The identity of a peer at the destination: the pod or workload with that address.
    pub fn source_at(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.sources.get(&normalize(ip))
    }

    /// Resolve a host name the way cluster DNS would for a client in `namespace`:
    /// `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local`.
    pub fn resolve_service(&self, host: &str, namespace: &str) -> Option<&ServiceSpec> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let parts: Vec<&str> = host.split('.').collect();
        let (name, ns) = match parts.as_slice() {
            [name] => (*name, namespace),
            [name, ns] | [name, ns, "svc"] => (*name, *ns),
            [name, ns, "svc", "cluster", "local"] => (*name, *ns),
            _ => return None,
        };
        self.services
            .iter()
            .find(|s| s.name == name && s.namespace == ns)
            .map(|s| &**s)
    }
}

/// v4-mapped IPv6 addresses are their IPv4 selves.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service with `n` backends on port 80 (target 8080), all client-side workloads.
    fn service_with(n: u8) -> Registry {
        let mut yaml = String::from("workloads:\n");
        let mut backends = String::new();
        for i in 1..=n {
            yaml += &format!("- {{name: b{i}, namespace: foo, ips: [10.0.0.{i}]}}\n");
            backends += &format!("{{ip: 10.0.0.{i}, ports: [{{port: 80, targetPort: 8080}}]}},");
        }
        yaml += &format!(
            "services:\n- {{name: s, namespace: foo, ips: [10.96.0.1], backends: [{backends}]}}\n"
        );
        Registry::from_world(&World::from_config(
            &crate::config::Config::parse(&yaml, "t.yaml").unwrap(),
        ))
    }

    #[test]
    fn backends_get_an_even_share_of_connections() {
        for n in [2u8, 3, 4] {
            let reg = service_with(n);
            let mut got: HashMap<IpAddr, usize> = HashMap::new();
            for _ in 0..1000 {
                let (to, w) = reg.resolve("10.96.0.1:80".parse().unwrap()).unwrap();
                assert_eq!(to.port(), 8080);
                assert!(w.is_some(), "the backend's policies apply");
                *got.entry(to.ip()).or_default() += 1;
            }
            let share = 1000.0 / f64::from(n);
            assert_eq!(got.len(), usize::from(n), "{got:?}");
            for (ip, c) in &got {
                let off = (*c as f64 - share).abs() / share;
                assert!(off <= 0.10, "{n} backends: {ip} got {c} of 1000 ({got:?})");
            }
        }
    }

    #[test]
    fn no_backend_on_the_port_is_refused_and_other_addresses_go_as_they_are() {
        let reg = service_with(2);
        assert!(reg.resolve("10.96.0.1:81".parse().unwrap()).is_none());
        let direct: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        assert_eq!(reg.resolve(direct).unwrap(), (direct, None));
    }
}
