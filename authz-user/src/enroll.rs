//! Bringing the kernel and the pods' listeners in line with the registry, in two steps: a pure
//! plan (what is applied + what is wanted -> operations) and an executor that records each
//! operation only once it succeeded. An address counts as enforced only after the kernel took
//! it; a failure leaves the rest applied and is retried; a pod that cannot be enrolled stays
//! pending (its connections to enforced destinations refused) and never stops the others.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{atomic::Ordering, Arc},
};

use anyhow::Context;
use tokio::task::AbortHandle;

use crate::{
    proxy::{self, PodListeners, Proxy},
    registry::{Pod, Registry},
    state::State,
    waiting::Waiting,
    world::NodePod,
};

/// A pod by (namespace, name).
pub type PodKey = (String, String);

/// An enrolled pod and the task serving its listeners.
pub struct Enrolled {
    pub spec: NodePod,
    pub cgroup_id: u64,
    /// The netns cookie of a pod captured inbound.
    pub protected: Option<u64>,
    /// The host ends of its interfaces, where the node checks what it sends.
    pub sources: Vec<crate::netns::HostSide>,
    pub server: AbortHandle,
}

/// A pod whose enrollment failed. With a cgroup id, its kernel entry is in place with no port:
/// its connections to enforced destinations are refused until it is enrolled.
pub struct PendingPod {
    pub spec: NodePod,
    pub cgroup_id: Option<u64>,
    /// The netns cookie of an inbound capture kept from before (a renewal that failed): its
    /// connections are refused until the pod is enrolled again, and it goes when forgotten.
    pub captured: Option<u64>,
    pub waiting: Waiting,
}

/// What the agent has put in the kernel and started.
#[derive(Default)]
pub struct Applied {
    pub pods: HashMap<PodKey, Enrolled>,
    /// Pods that should be enrolled and are not (yet).
    pub pending: HashMap<PodKey, PendingPod>,
    pub enforced: HashSet<IpAddr>,
    /// Destination addresses the kernel refused last time.
    pub failed_ips: HashSet<IpAddr>,
}

impl Applied {
    /// Something failed last time and is worth another try.
    pub fn needs_retry(&self) -> bool {
        !self.pending.is_empty() || !self.failed_ips.is_empty()
    }

    /// cgroup ids this agent holds in the kernel, enrolled or pending.
    pub fn cgroup_ids(&self) -> HashSet<u64> {
        self.pods
            .values()
            .map(|p| p.cgroup_id)
            .chain(self.pending.values().filter_map(|p| p.cgroup_id))
            .collect()
    }
}

/// One kernel-and-listener operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// An enrolled pod gone, or moved (another netns, cgroup, identity or address): its kernel
    /// entry and listeners go.
    Release(PodKey),
    /// A pending pod no longer wanted as it was: its pending kernel entry goes.
    Forget(PodKey),
    /// An enrolled pod in the same place whose identity, addresses or probes changed (a claim
    /// confirmed, a restart of its sandbox keeping the cgroup): its new listeners, capture and
    /// source check replace the old ones in place, so it is never uncaptured in between.
    Renew(PodKey),
    /// A wanted pod that is not enrolled.
    Enroll(PodKey),
    Unenforce(IpAddr),
    Enforce(IpAddr),
}

/// Whether a pod stays where it was on the host: the same network namespace and cgroup.
pub fn same_place(a: &NodePod, b: &NodePod) -> bool {
    a.spec.netns == b.spec.netns && a.spec.cgroup == b.spec.cgroup
}

/// Whether an enrolled pod can stay as it is: the same place on the host and the same identity.
/// Labels are not part of it: a relabelled pod keeps its listeners and open connections, and
/// every decision for it reads its labels from the state in force (`state::State::target`).
pub fn same_enrollment(a: &NodePod, b: &NodePod) -> bool {
    let (same, a, b) = (
        a.probes == b.probes && a.identity == b.identity,
        &a.spec,
        &b.spec,
    );
    same && a.netns == b.netns
        && a.cgroup == b.cgroup
        && a.service_account == b.service_account
        && a.ips == b.ips
        && a.inbound == b.inbound
        && a.exclude_inbound_ports == b.exclude_inbound_ports
}

/// The operations that take `enrolled`/`pending`/`enforced` to `wanted` pods and `wanted_ips`:
/// releases first, then renewals and enrollments, then addresses. Pure.
pub fn plan<'a>(
    enrolled: impl IntoIterator<Item = (&'a PodKey, &'a NodePod)>,
    pending: impl IntoIterator<Item = (&'a PodKey, &'a NodePod)>,
    enforced: &HashSet<IpAddr>,
    wanted: &[NodePod],
    wanted_ips: &HashSet<IpAddr>,
) -> Vec<Op> {
    let want: HashMap<PodKey, &NodePod> = wanted
        .iter()
        .map(|p| ((p.spec.namespace.clone(), p.spec.name.clone()), p))
        .collect();
    let stays = |k: &PodKey, s: &NodePod| want.get(k).is_some_and(|w| same_enrollment(w, s));
    let mut ops = Vec::new();
    let mut kept = HashSet::new();
    let mut releases: Vec<Op> = Vec::new();
    let mut renewed: Vec<PodKey> = Vec::new();
    for (k, s) in enrolled {
        if stays(k, s) {
            kept.insert(k.clone());
        } else if want.get(k).is_some_and(|w| same_place(w, s)) {
            kept.insert(k.clone());
            renewed.push(k.clone());
        } else {
            releases.push(Op::Release(k.clone()));
        }
    }
    renewed.sort();
    for (k, s) in pending {
        if !stays(k, s) {
            releases.push(Op::Forget(k.clone()));
        }
    }
    releases.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    ops.extend(releases);
    ops.extend(renewed.into_iter().map(Op::Renew));
    for p in wanted {
        let k = (p.spec.namespace.clone(), p.spec.name.clone());
        if !kept.contains(&k) {
            ops.push(Op::Enroll(k));
        }
    }
    let mut gone: Vec<IpAddr> = enforced.difference(wanted_ips).copied().collect();
    gone.sort();
    ops.extend(gone.into_iter().map(Op::Unenforce));
    let mut new: Vec<IpAddr> = wanted_ips.difference(enforced).copied().collect();
    new.sort();
    ops.extend(new.into_iter().map(Op::Enforce));
    ops
}

/// The destination addresses a registry enforces: workloads and service addresses.
pub fn wanted_ips(registry: &Registry) -> HashSet<IpAddr> {
    registry
        .by_ip
        .keys()
        .chain(registry.vips.keys())
        .copied()
        .collect()
}

/// Plans against the state in force, then executes.
pub fn apply(px: &Arc<Proxy>, applied: &mut Applied, state: &State) {
    let ops = plan(
        applied.pods.iter().map(|(k, e)| (k, &e.spec)),
        applied.pending.iter().map(|(k, p)| (k, &p.spec)),
        &applied.enforced,
        &state.world.pods,
        &wanted_ips(&state.registry),
    );
    execute(px, applied, ops, state);
}

/// Carries out `ops`; each is recorded in `applied` only once it succeeded.
pub fn execute(px: &Arc<Proxy>, applied: &mut Applied, ops: Vec<Op>, state: &State) {
    let registry = &state.registry;
    let kernel = &px.kernel;
    applied.failed_ips.clear();
    for op in ops {
        match op {
            Op::Release(k) => {
                if let Some(e) = applied.pods.remove(&k) {
                    let _ = kernel.release(e.cgroup_id);
                    retire(kernel, &k, &e, &[], None);
                    tracing::info!(pod = %format!("{}/{}", k.0, k.1), netns = %e.spec.spec.netns.display(), ips = ?e.spec.spec.ips, "pod released");
                }
            }
            Op::Renew(k) => {
                let Some(old) = applied.pods.remove(&k) else {
                    continue;
                };
                let Some((pod, spec)) = find(state, &k) else {
                    let _ = kernel.release(old.cgroup_id);
                    retire(kernel, &k, &old, &[], None);
                    continue;
                };
                renew_one(px, applied, k, pod, spec, old);
            }
            Op::Forget(k) => {
                let Some(p) = applied.pending.remove(&k) else {
                    continue;
                };
                if let Some(id) = p.cgroup_id {
                    let _ = kernel.release(id);
                }
                if let Some(cookie) = p.captured {
                    if let Err(e) = kernel.unprotect(cookie) {
                        tracing::warn!(pod = %format!("{}/{}", k.0, k.1), "inbound capture not removed: {e:#}");
                    }
                }
            }
            Op::Enroll(k) => {
                let Some((pod, spec)) = find(state, &k) else {
                    continue;
                };
                enroll_one(px, applied, k, pod, spec);
            }
            Op::Unenforce(ip) => match kernel.unenforce(ip) {
                Ok(()) => {
                    applied.enforced.remove(&ip);
                }
                // Still enforced in the kernel: stricter, never looser; retried.
                Err(e) => {
                    tracing::error!(%ip, "destination not released, retrying: {e:#}");
                    applied.failed_ips.insert(ip);
                }
            },
            Op::Enforce(ip) => match kernel.enforce(ip) {
                Ok(()) => {
                    applied.enforced.insert(ip);
                    let name = match (registry.by_ip.get(&ip), registry.vips.get(&ip)) {
                        (Some(w), _) => format!("{}/{}", w.namespace, w.name),
                        (None, Some(v)) => {
                            format!("service {}/{}", v.service.namespace, v.service.name)
                        }
                        _ => String::new(),
                    };
                    tracing::info!(ip = %ip, workload = %name, "destination enforced");
                }
                Err(e) => {
                    tracing::error!(%ip, "destination not enforced yet, retrying: {e:#}");
                    applied.failed_ips.insert(ip);
                }
            },
        }
    }
    px.metrics
        .pods_pending
        .store(applied.pending.len() as u64, Ordering::Relaxed);
    px.metrics
        .pods_enrolled
        .store(applied.pods.len() as u64, Ordering::Relaxed);
}

/// The registry's pod and the world's spec for `k`, when it is wanted.
fn find<'s>(state: &'s State, k: &PodKey) -> Option<(&'s Arc<Pod>, &'s NodePod)> {
    let pod = state
        .registry
        .pods
        .iter()
        .find(|p| p.workload.namespace == k.0 && p.workload.name == k.1)?;
    let spec = state
        .world
        .pods
        .iter()
        .find(|p| p.spec.namespace == k.0 && p.spec.name == k.1)?;
    Some((pod, spec))
}

/// Takes down what `old` put in place except what its successor `kept` (interfaces bound
/// again, the same capture): source checks, the inbound capture, then its listeners.
fn retire(
    kernel: &crate::kernel::Kernel,
    k: &PodKey,
    old: &Enrolled,
    kept_sides: &[crate::netns::HostSide],
    kept_capture: Option<u64>,
) {
    for side in &old.sources {
        if kept_sides.iter().any(|s| s.ifindex == side.ifindex) {
            continue;
        }
        if let Err(e) = kernel.unbind_source(side) {
            tracing::warn!(pod = %format!("{}/{}", k.0, k.1), "source check not removed: {e:#}");
        }
    }
    if let Some(cookie) = old.protected.filter(|c| Some(*c) != kept_capture) {
        if let Err(e) = kernel.unprotect(cookie) {
            tracing::warn!(pod = %format!("{}/{}", k.0, k.1), "inbound capture not removed: {e:#}");
        }
    }
    old.server.abort();
}

/// Enrolls `pod` again over `old` (the same netns and cgroup): the new listeners take the
/// capture and the cgroup entry from the old ones, which then close. If that fails the pod is
/// pending (its kernel entry refusing, its capture without listeners): closed, never open.
fn renew_one(
    px: &Arc<Proxy>,
    applied: &mut Applied,
    key: PodKey,
    pod: &Arc<Pod>,
    spec: &NodePod,
    old: Enrolled,
) {
    let kernel = &px.kernel;
    let name = format!("{}/{}", key.0, key.1);
    match enroll(px, pod, Start::Replacing(old.cgroup_id)) {
        Ok(done) => {
            retire(kernel, &key, &old, &done.sources, done.protected);
            tracing::info!(pod = %name, cgroup_id = done.cgroup_id, port = done.port, inbound = done.protected.is_some(), "pod enrolled again in place");
            applied.pods.insert(key, done.into_enrolled(spec));
        }
        Err((_, e)) => {
            // The capture stays (its listeners gone, connections are refused) until it is
            // enrolled again or released.
            if let Err(e) = kernel.enroll(old.cgroup_id, pod.id, 0) {
                tracing::error!(pod = %name, "pending entry not set, releasing: {e:#}");
                let _ = kernel.release(old.cgroup_id);
            }
            retire(kernel, &key, &old, &[], old.protected);
            let (waiting, _) = Waiting::renew(None, format!("{e:#}"));
            tracing::error!(pod = %name, "pod not enrolled again, retrying: {}", waiting.reason());
            applied.pending.insert(
                key,
                PendingPod {
                    spec: spec.clone(),
                    cgroup_id: Some(old.cgroup_id),
                    captured: old.protected,
                    waiting,
                },
            );
        }
    }
}

fn enroll_one(px: &Arc<Proxy>, applied: &mut Applied, key: PodKey, pod: &Arc<Pod>, spec: &NodePod) {
    let name = format!("{}/{}", key.0, key.1);
    let start = match applied.pending.get(&key).and_then(|p| p.cgroup_id) {
        Some(id) => Start::Known(id),
        None => Start::New,
    };
    match enroll(px, pod, start) {
        Ok(done) => {
            let kept = applied.pending.remove(&key).and_then(|p| p.captured);
            // A capture kept from before that this enrollment did not take over (its inbound
            // capture is now off) goes.
            if let Some(cookie) = kept.filter(|c| Some(*c) != done.protected) {
                let _ = px.kernel.unprotect(cookie);
            }
            tracing::info!(pod = %name, cgroup_id = done.cgroup_id, port = done.port, inbound = done.protected.is_some(), "pod enrolled");
            applied.pods.insert(key, done.into_enrolled(spec));
        }
        Err((cgroup_id, e)) => {
            let prev = applied.pending.remove(&key);
            let captured = prev.as_ref().and_then(|p| p.captured);
            let (waiting, news) = Waiting::renew(prev.map(|p| p.waiting), format!("{e:#}"));
            if news {
                tracing::error!(pod = %name, pending = cgroup_id.is_some(), "pod not enrolled, retrying: {}", waiting.reason());
            }
            applied.pending.insert(
                key,
                PendingPod {
                    spec: spec.clone(),
                    cgroup_id,
                    captured,
                    waiting,
                },
            );
        }
    }
}

/// What enrolling a pod put in place.
struct Done {
    cgroup_id: u64,
    server: AbortHandle,
    port: u16,
    /// The netns cookie, when the pod is captured inbound.
    protected: Option<u64>,
    sources: Vec<crate::netns::HostSide>,
}

impl Done {
    fn into_enrolled(self, spec: &NodePod) -> Enrolled {
        Enrolled {
            spec: spec.clone(),
            cgroup_id: self.cgroup_id,
            protected: self.protected,
            sources: self.sources,
            server: self.server,
        }
    }
}

/// Where an enrollment starts from.
enum Start {
    /// Nothing of the pod in the kernel that this agent knows of.
    New,
    /// Its pending entry is in place.
    Known(u64),
    /// This agent's own enrollment of it is in force and stays until the new one replaces it.
    Replacing(u64),
}

/// Enrolls one pod: pending entry, listeners, inbound capture, then the entry with their port.
/// On error, returns the cgroup id when the pending entry is in place.
fn enroll(
    px: &Arc<Proxy>,
    pod: &Arc<Pod>,
    start: Start,
) -> Result<Done, (Option<u64>, anyhow::Error)> {
    let kernel = &px.kernel;
    // A previous agent's port (hot restart): listen beside it. Otherwise the pod is pending
    // until its listener is open.
    let pending_or_adopted = |id: u64| match kernel.enrolled_port(id) {
        Some(port) => Ok(Some(port)),
        None => kernel
            .enroll(id, pod.id, 0)
            .map(|()| None)
            .map_err(|e| (None, e)),
    };
    let (id, reuse) = match start {
        Start::New => {
            let id = crate::kernel::cgroup_id(&pod.cgroup).map_err(|e| (None, e))?;
            (id, pending_or_adopted(id)?)
        }
        Start::Known(id) => (id, pending_or_adopted(id)?),
        // Never beside our own listener: that one answers for the pod as it was.
        Start::Replacing(id) => (id, None),
    };
    let pl = PodListeners::open(pod.clone(), reuse).map_err(|e| (Some(id), e))?;
    let port = pl.port;
    let protected = protect(kernel, &pl).map_err(|e| (Some(id), e))?;
    // Before the pod's connections are served: the addresses they come from are its own.
    let sources = match px.settings.source_check {
        crate::config::SourceCheck::Enforce => {
            bind_sources(kernel, &pl).map_err(|e| (Some(id), e))?
        }
        crate::config::SourceCheck::Off => vec![],
    };
    kernel
        .enroll(id, pod.id, port)
        .with_context(|| format!("enrolling cgroup {}", pod.cgroup.display()))
        .map_err(|e| (Some(id), e))?;
    let server = tokio::spawn(proxy::serve(px.clone(), pl)).abort_handle();
    Ok(Done {
        cgroup_id: id,
        server,
        port,
        protected,
        sources,
    })
}

/// Binds the pod's addresses on the host end of each of its interfaces; all or none.
fn bind_sources(
    kernel: &crate::kernel::Kernel,
    pl: &PodListeners,
) -> anyhow::Result<Vec<crate::netns::HostSide>> {
    let sides = crate::netns::host_sides(&pl.netns, &pl.pod.ips)?;
    for side in &sides {
        tracing::info!(pod = %pl.key, interface = %side.pod_ifname, host_ifindex = side.ifindex, ips = ?pl.pod.ips, link_local = ?side.link_local, "source addresses bound");
    }
    for (i, side) in sides.iter().enumerate() {
        if let Err(e) = kernel.bind_source(side, pl.pod.id, pl.key.clone(), &pl.pod.ips) {
            for done in &sides[..i] {
                let _ = kernel.unbind_source(done);
            }
            return Err(e.context("binding the pod's source addresses"));
        }
    }
    Ok(sides)
}

/// Captures the pod's inbound connections into `pl`'s inbound listeners: the capture entry and
/// program first (connections refused until a listener is in), then the listeners.
fn protect(kernel: &crate::kernel::Kernel, pl: &PodListeners) -> anyhow::Result<Option<u64>> {
    if pl.inbound.is_empty() {
        return Ok(None);
    }
    let mut excluded = [0u16; authz_common::MAX_EXCLUDED_PORTS];
    excluded[0] = pl.port;
    for (slot, p) in excluded[1..].iter_mut().zip(&pl.pod.exclude_inbound_ports) {
        *slot = *p;
    }
    let port_of = |family: u16| {
        pl.inbound
            .iter()
            .find(|(f, _)| *f == family)
            .and_then(|(_, l)| l.local_addr().ok())
            .map_or(0, |a| a.port())
    };
    let mut tcp_probe_ports = [0u16; authz_common::MAX_PROBE_PORTS];
    let tcp_probes = pl.pod.probes.iter().filter_map(|p| match p {
        crate::world::Probe::Tcp { port } => Some(*port),
        _ => None,
    });
    for (slot, p) in tcp_probe_ports.iter_mut().zip(tcp_probes) {
        *slot = p;
    }
    let entry = authz_common::InboundPod {
        excluded,
        listen_port4: port_of(authz_common::AF_INET),
        listen_port6: port_of(authz_common::AF_INET6),
        tcp_probe_ports,
    };
    kernel
        .protect(pl.netns_cookie, pl.netns.file(), entry)
        .context("attaching inbound capture")?;
    for (family, l) in &pl.inbound {
        kernel.inbound_listen(pl.netns_cookie, *family, l)?;
    }
    Ok(Some(pl.netns_cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, netns: &str, ip: &str) -> NodePod {
        let spec = crate::config::PodSpec {
            name: name.into(),
            namespace: "ns".into(),
            labels: Default::default(),
            service_account: "sa".into(),
            netns: netns.into(),
            cgroup: format!("/cg/{name}").into(),
            ips: vec![ip.parse().unwrap()],
            inbound: true,
            exclude_inbound_ports: vec![],
        };
        NodePod {
            spec,
            probes: vec![],
            identity: Default::default(),
        }
    }

    fn key(name: &str) -> PodKey {
        ("ns".into(), name.into())
    }

    fn ips(v: &[&str]) -> HashSet<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn plan_releases_then_enrolls_then_addresses() {
        let (a, b, c) = (
            pod("a", "/n/a", "10.0.0.1"),
            pod("b", "/n/b", "10.0.0.2"),
            pod("c", "/n/c", "10.0.0.3"),
        );
        let moved_b = pod("b", "/n/b2", "10.0.0.2");
        let enrolled = [(key("a"), a.clone()), (key("b"), b.clone())];
        let pending = [(key("c"), c.clone())];
        let ops = plan(
            enrolled.iter().map(|(k, s)| (k, s)),
            pending.iter().map(|(k, s)| (k, s)),
            &ips(&["10.1.0.1", "10.1.0.2"]),
            &[a.clone(), moved_b, c.clone(), pod("d", "/n/d", "10.0.0.4")],
            &ips(&["10.1.0.2", "10.1.0.3"]),
        );
        assert_eq!(
            ops,
            vec![
                Op::Release(key("b")),
                Op::Enroll(key("b")),
                Op::Enroll(key("c")),
                Op::Enroll(key("d")),
                Op::Unenforce("10.1.0.1".parse().unwrap()),
                Op::Enforce("10.1.0.3".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn a_pod_changed_in_place_is_renewed_not_released() {
        let a = pod("a", "/n/a", "10.0.0.1");
        let mut confirmed = a.clone();
        confirmed.identity = crate::world::Identity::Claimed;
        let enrolled = [(key("a"), confirmed)];
        let mut readdressed = a.clone();
        readdressed.spec.ips = vec!["10.0.0.7".parse().unwrap()];
        for wanted in [a.clone(), readdressed] {
            let ops = plan(
                enrolled.iter().map(|(k, s)| (k, s)),
                [],
                &HashSet::new(),
                std::slice::from_ref(&wanted),
                &HashSet::new(),
            );
            assert_eq!(ops, vec![Op::Renew(key("a"))]);
        }
        // Another cgroup is another place: released, then enrolled.
        let mut moved = a.clone();
        moved.spec.cgroup = "/cg/a2".into();
        let ops = plan(
            enrolled.iter().map(|(k, s)| (k, s)),
            [],
            &HashSet::new(),
            &[moved],
            &HashSet::new(),
        );
        assert_eq!(ops, vec![Op::Release(key("a")), Op::Enroll(key("a"))]);
    }

    #[test]
    fn nothing_to_do_when_applied_matches_and_failures_come_back() {
        let a = pod("a", "/n/a", "10.0.0.1");
        let enrolled = [(key("a"), a.clone())];
        let wanted = ips(&["10.1.0.1"]);
        let none = plan(
            enrolled.iter().map(|(k, s)| (k, s)),
            [],
            &wanted,
            std::slice::from_ref(&a),
            &wanted,
        );
        assert!(none.is_empty(), "{none:?}");
        // An address the kernel refused is not recorded as enforced: the next plan has it again.
        let again = plan(
            enrolled.iter().map(|(k, s)| (k, s)),
            [],
            &HashSet::new(),
            std::slice::from_ref(&a),
            &wanted,
        );
        assert_eq!(again, vec![Op::Enforce("10.1.0.1".parse().unwrap())]);
        // A pending pod no longer wanted is forgotten; a relabelled pod stays.
        let mut relabelled = a.clone();
        relabelled.spec.labels.insert("app".into(), "new".into());
        let ops = plan(
            enrolled.iter().map(|(k, s)| (k, s)),
            [(&key("gone"), &pod("gone", "/n/g", "10.0.0.9"))],
            &wanted,
            &[relabelled],
            &wanted,
        );
        assert_eq!(ops, vec![Op::Forget(key("gone"))]);
    }
}
