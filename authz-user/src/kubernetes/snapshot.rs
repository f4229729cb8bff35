//! From what the API server holds to what the agent enforces: the pods of this node to enroll,
//! the workload addresses to enforce, the services, and the policies. Pure: no I/O but the
//! `locate` callback the caller passes for this node's pods.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::core::DynamicObject;

use crate::{
    config::{PodSpec, ServicePort, ServiceSpec, WorkloadSpec},
    policy::{load_str, PolicySet, Problem},
};

/// Namespace or pod label that puts pods in the mesh: their node's agent decides every connection
/// arriving at them, with their policies.
pub const ENFORCE_LABEL: &str = "authz.io/enforce";
pub const ENFORCE_VALUE: &str = "enabled";
/// Pod annotation that keeps a pod out, whatever its namespace says.
pub const EXCLUDE_ANNOTATION: &str = "authz.io/exclude";

/// What to enforce, computed from the stores.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Desired {
    /// Pods of this node to enroll, located on the host.
    pub pods: Vec<PodSpec>,
    /// Mesh pods anywhere in the cluster, by address: each is decided at its own node (this
    /// node's, through `pods`), so here they are identities and Service backends.
    pub peers: Vec<WorkloadSpec>,
    pub services: Vec<ServiceSpec>,
    /// Pods of this node that should be enrolled but cannot be yet, and why.
    pub not_enrolled: Vec<NotEnrolled>,
    /// Anomalies worth a log line (an address two pods claim).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotEnrolled {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: super::discover::LocateError,
}

/// Where a pod of this node lives on the host: (cgroup, netns path).
pub type Locate<'a> =
    dyn FnMut(&str) -> Result<(PathBuf, PathBuf), super::discover::LocateError> + 'a;

fn name_of(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// Not on the host's network, and not finished (a finished pod's address is reused).
fn has_own_network(pod: &Pod) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    !host_network && !finished
}

/// Pods whose policies are enforced (protected destinations): in a labelled namespace or
/// labelled themselves, not excluded, with a network of their own.
pub fn in_mesh(pod: &Pod, enforced_namespaces: &HashSet<&str>) -> bool {
    let m = &pod.metadata;
    let labelled = m
        .labels
        .as_ref()
        .and_then(|l| l.get(ENFORCE_LABEL))
        .is_some_and(|v| v == ENFORCE_VALUE);
    let ns_labelled = m
        .namespace
        .as_deref()
        .is_some_and(|ns| enforced_namespaces.contains(ns));
    let excluded = m
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXCLUDE_ANNOTATION))
        .is_some_and(|v| v == "true");
    (labelled || ns_labelled) && !excluded && has_own_network(pod)
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(st) = pod.status.as_ref() else {
        return vec![];
    };
    let mut ips: Vec<IpAddr> = st
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = st.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips.retain(|ip: &IpAddr| !ip.is_loopback() && !ip.is_unspecified());
    ips
}

/// Istio's annotation for ports the sidecar does not capture inbound (comma-separated). A value
/// that does not parse, or too many ports, excludes nothing: capture is the safe side.
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

fn excluded_inbound_ports(pod: &Pod) -> Vec<u16> {
    let Some(v) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXCLUDE_INBOUND_PORTS_ANNOTATION))
    else {
        return vec![];
    };
    let ports: Option<Vec<u16>> = v
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().ok().filter(|p| *p != 0))
        .collect();
    match ports {
        Some(p) if p.len() <= crate::config::MAX_EXCLUDED_INBOUND_PORTS => p,
        _ => vec![],
    }
}

pub fn desired(
    node: &str,
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    services: &[Arc<Service>],
    enroll_all: bool,
    locate: &mut Locate,
) -> Desired {
    let enforced_ns: HashSet<&str> = namespaces
        .iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ENFORCE_LABEL))
                .is_some_and(|v| v == ENFORCE_VALUE)
        })
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    let mut out = Desired::default();
    let mut sorted: Vec<&Arc<Pod>> = pods.iter().collect();
    // Where two pods claim one address (one terminating, its address already given to a new
    // pod), the first claimant keeps it: pods being deleted come last.
    fn key(p: &Pod) -> (bool, &str, &str) {
        let m = &p.metadata;
        (
            m.deletion_timestamp.is_some(),
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or(""),
        )
    }
    sorted.sort_by(|a, b| key(a).cmp(&key(b)));
    let mut taken: HashMap<IpAddr, &Arc<Pod>> = HashMap::new();
    for pod in sorted {
        let mesh = in_mesh(pod, &enforced_ns);
        let local = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        // Every pod of the node with a network of its own is steered as a client (unless
        // enrollment is limited to the mesh), for Service addresses; mesh pods are also
        // captured inbound.
        let enroll = local && has_own_network(pod) && (mesh || enroll_all);
        if !mesh && !enroll {
            continue;
        }
        let m = &pod.metadata;
        let (Some(name), Some(namespace)) = (m.name.clone(), m.namespace.clone()) else {
            continue;
        };
        let labels: BTreeMap<String, String> = m.labels.clone().unwrap_or_default();
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let mut ips = pod_ips(pod);
        if mesh {
            // Two pods claiming one address: the first keeps it (a live pod before one being
            // deleted, then by namespace/name), so traffic to it never meets two sets of policies.
            ips.retain(|ip| match taken.get(ip) {
                Some(other) => {
                    out.warnings.push(format!(
                        "address {ip} is claimed by {} and {}; it goes to the first until one of them goes",
                        name_of(other),
                        name_of(pod)
                    ));
                    false
                }
                None => true,
            });
            for ip in &ips {
                taken.insert(*ip, pod);
            }
            if !ips.is_empty() {
                out.peers.push(WorkloadSpec {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    labels: labels.clone(),
                    service_account: service_account.clone(),
                    ips: ips.clone(),
                });
            }
        }
        if !enroll {
            continue;
        }
        let uid = m.uid.clone().unwrap_or_default();
        match locate(&uid) {
            Ok((cgroup, netns)) => out.pods.push(PodSpec {
                name,
                namespace,
                labels,
                service_account,
                netns,
                cgroup,
                ips,
                // Mesh pods are captured inbound; other pods of the node are only clients.
                inbound: mesh,
                exclude_inbound_ports: excluded_inbound_ports(pod),
                probes: probes(pod),
            }),
            Err(reason) => out.not_enrolled.push(NotEnrolled {
                namespace,
                name,
                uid,
                reason,
            }),
        }
    }
    // Pods by (namespace, label, value): a service's candidates are the pods carrying the first
    // pair of its selector, not every pod of its namespace.
    let mut by_label: HashMap<(&str, &str, &str), Vec<&Arc<Pod>>> = HashMap::new();
    for p in pods {
        let Some(ns) = p.metadata.namespace.as_deref() else {
            continue;
        };
        for (k, v) in p.metadata.labels.iter().flatten() {
            by_label.entry((ns, k, v)).or_default().push(p);
        }
    }
    for s in services {
        let (Some(name), Some(namespace)) = (&s.metadata.name, &s.metadata.namespace) else {
            continue;
        };
        let Some(spec) = &s.spec else { continue };
        let ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if ips.is_empty() {
            continue;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target_port = match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) => {
                        u16::try_from(*t).ok()
                    }
                    _ => None,
                };
                Some(ServicePort { port, target_port })
            })
            .collect();
        let mut ips = ips;
        ips.sort();
        let candidates = spec
            .selector
            .as_ref()
            .and_then(|sel| sel.iter().next())
            .and_then(|(k, v)| by_label.get(&(namespace.as_str(), k.as_str(), v.as_str())))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let backends = backends(spec, candidates, &taken);
        out.services.push(ServiceSpec {
            name: name.clone(),
            namespace: namespace.clone(),
            ips,
            ports,
            backends,
        });
    }
    out.services
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The ready pods a service selects (among `pods`: those of its namespace with the first pair of
/// its selector), each with the service's ports mapped to the pod's
/// (`targetPort` as a number, a container port name, or absent: the same port). A service with
/// no selector has none (its endpoints are managed by hand; not enforced by address).
fn backends(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    pods: &[&Arc<Pod>],
    live: &HashMap<IpAddr, &Arc<Pod>>,
) -> Vec<crate::config::ServiceBackend> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return vec![];
    };
    let mut out = Vec::new();
    for pod in pods {
        let m = &pod.metadata;
        if m.deletion_timestamp.is_some() {
            continue;
        }
        let labels = m.labels.as_ref();
        if !selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        {
            continue;
        }
        let st = pod.status.as_ref();
        let ready = st
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let running = st.and_then(|s| s.phase.as_deref()) == Some("Running");
        if !ready || !running {
            continue;
        }
        let named = |name: &str| named_port(pod, name);
        let ports: Vec<ServicePort> = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target = match &p.target_port {
                    None => port,
                    Some(IntOrString::Int(t)) => u16::try_from(*t).ok()?,
                    Some(IntOrString::String(name)) => named(name)?,
                };
                Some(ServicePort {
                    port,
                    target_port: Some(target),
                })
            })
            .collect();
        for ip in pod_ips(pod) {
            // An address two pods claim is nobody's.
            if live.get(&ip).is_some_and(|owner| !Arc::ptr_eq(owner, pod)) {
                continue;
            }
            out.push(crate::config::ServiceBackend {
                ip,
                ports: ports.clone(),
            });
        }
    }
    out.sort_by_key(|b| b.ip);
    out
}

/// Where the agent keeps a pod's named container ports once the containers are trimmed away
/// (`name=port,...`): a whole `Container` per pod would cost kilobytes.
pub const NAMED_PORTS_KEY: &str = "authz.io/internal-named-ports";

/// Where the agent keeps a pod's kubelet probes once the containers are trimmed away, one per
/// line: `http PORT PATH`, `tcp PORT`, `grpc PORT`.
pub const PROBES_KEY: &str = "authz.io/internal-probes";

/// The liveness, readiness and startup probes of a pod spec's containers, in `PROBES_KEY` form;
/// a named port is resolved against the containers' ports, an unresolvable one dropped.
pub fn probe_lines(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let port = |p: &IntOrString| -> Option<u16> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        }
    };
    let mut out: Vec<String> = spec
        .containers
        .iter()
        .flat_map(|c| [&c.liveness_probe, &c.readiness_probe, &c.startup_probe])
        .flatten()
        .filter_map(|p| {
            if let Some(h) = &p.http_get {
                let path = h.path.as_deref().unwrap_or("/");
                // kubelet sends the path as written; one that could break the line form is
                // dropped (and so gets no exemption).
                if path.contains(['\n', '\r', ' ']) || !path.starts_with('/') {
                    return None;
                }
                return Some(format!("http {} {path}", port(&h.port)?));
            }
            if let Some(t) = &p.tcp_socket {
                return Some(format!("tcp {}", port(&t.port)?));
            }
            let g = p.grpc.as_ref()?;
            Some(format!("grpc {}", u16::try_from(g.port).ok()?))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn probes(pod: &Pod) -> Vec<crate::config::Probe> {
    use crate::config::Probe;
    let lines = match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PROBES_KEY))
    {
        Some(v) => v.lines().map(str::to_string).collect(),
        None => pod.spec.as_ref().map(probe_lines).unwrap_or_default(),
    };
    lines
        .iter()
        .filter_map(|l| {
            let mut f = l.splitn(3, ' ');
            let (kind, port) = (f.next()?, f.next()?.parse().ok()?);
            Some(match kind {
                "http" => Probe::Http {
                    port,
                    path: f.next()?.to_string(),
                },
                "tcp" => Probe::Tcp { port },
                "grpc" => Probe::Grpc { port },
                _ => return None,
            })
        })
        .collect()
}

/// A named container port of the pod: from the trimmed form, or from the containers.
fn named_port(pod: &Pod, name: &str) -> Option<u16> {
    if let Some(list) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(NAMED_PORTS_KEY))
    {
        return list
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok());
    }
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// One Istio object as the agent last saw it.
struct Entry {
    uid: String,
    resource_version: String,
    /// The last version that was valid; it stays in force while a newer one is invalid.
    good: Option<PolicySet>,
}

/// A policy object that was just found invalid (or valid with warnings).
#[derive(Debug, Clone)]
pub struct Report {
    pub kind: String,
    pub api_version: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub problems: Vec<Problem>,
    /// A previous valid version of the object stays in force.
    pub kept_previous: bool,
}

/// Istio objects, parsed and validated once per resourceVersion, with the same loader and
/// messages as files.
#[derive(Default)]
pub struct Policies {
    entries: HashMap<(String, String, String), Entry>,
    /// Changes whenever an object is added, changed or removed.
    pub generation: u64,
}

/// The object as the YAML a user wrote (spec and the metadata policies read).
pub fn render(kind: &str, api_version: &str, obj: &DynamicObject) -> String {
    let m = &obj.metadata;
    let doc = serde_json::json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": m.name,
            "namespace": m.namespace,
            "labels": m.labels.clone().unwrap_or_default(),
            "annotations": m.annotations.clone().unwrap_or_default(),
        },
        "spec": obj.data.get("spec").cloned().unwrap_or(serde_json::json!({})),
    });
    serde_yaml::to_string(&doc).unwrap_or_default()
}

impl Policies {
    /// Brings the cache up to date with the stores; returns the combined set and a report for
    /// every object that changed and has problems.
    pub fn update(
        &mut self,
        api_version: &str,
        request_authentications: &[Arc<DynamicObject>],
        authorization_policies: &[Arc<DynamicObject>],
    ) -> (PolicySet, Vec<Report>) {
        let mut reports = Vec::new();
        let mut seen = HashSet::new();
        for (kind, objs) in [
            ("RequestAuthentication", request_authentications),
            ("AuthorizationPolicy", authorization_policies),
        ] {
            for obj in objs {
                let m = &obj.metadata;
                let ns = m.namespace.clone().unwrap_or_default();
                let name = m.name.clone().unwrap_or_default();
                let uid = m.uid.clone().unwrap_or_default();
                let rv = m.resource_version.clone().unwrap_or_default();
                let key = (kind.to_string(), ns.clone(), name.clone());
                seen.insert(key.clone());
                if self
                    .entries
                    .get(&key)
                    .is_some_and(|e| e.uid == uid && e.resource_version == rv)
                {
                    continue;
                }
                self.generation += 1;
                let mut set = PolicySet::default();
                load_str(
                    &render(kind, api_version, obj),
                    &format!("{kind} {ns}/{name}"),
                    &mut set,
                );
                let valid = set.is_valid();
                // A recreated object (new uid) does not inherit the old one's last good version.
                let previous = self
                    .entries
                    .remove(&key)
                    .filter(|e| e.uid == uid)
                    .and_then(|e| e.good);
                let kept_previous = !valid && previous.is_some();
                if !set.problems.is_empty() {
                    reports.push(Report {
                        kind: kind.into(),
                        api_version: api_version.into(),
                        namespace: ns,
                        name,
                        uid: uid.clone(),
                        problems: set.problems.clone(),
                        kept_previous,
                    });
                }
                let good = if valid {
                    set.problems.clear();
                    Some(set)
                } else {
                    previous
                };
                self.entries.insert(
                    key,
                    Entry {
                        uid,
                        resource_version: rv,
                        good,
                    },
                );
            }
        }
        let before = self.entries.len();
        self.entries.retain(|k, _| seen.contains(k));
        if self.entries.len() != before {
            self.generation += 1;
        }
        let mut keys: Vec<&(String, String, String)> = self.entries.keys().collect();
        keys.sort();
        let mut all = PolicySet::default();
        for k in keys {
            if let Some(g) = &self.entries[k].good {
                all.request_authentications
                    .extend(g.request_authentications.iter().cloned());
                all.authorization_policies
                    .extend(g.authorization_policies.iter().cloned());
            }
        }
        (all, reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Arc<Pod> {
        Arc::new(serde_json::from_value(v).unwrap())
    }
    fn ns(name: &str, enforce: bool) -> Arc<Namespace> {
        let labels = if enforce {
            json!({ENFORCE_LABEL: ENFORCE_VALUE})
        } else {
            json!({})
        };
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap(),
        )
    }
    fn p(name: &str, ns: &str, node: &str, ip: &str, extra: serde_json::Value) -> Arc<Pod> {
        let mut v = json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        });
        merge(&mut v, extra);
        pod(v)
    }
    /// The desired state seen from node n1, where no pod can be located.
    fn from_n1(
        pods: &[Arc<Pod>],
        namespaces: &[Arc<Namespace>],
        services: &[Arc<Service>],
    ) -> Desired {
        desired("n1", pods, namespaces, services, true, &mut |uid| {
            Err(crate::kubernetes::discover::LocateError::BadUid(uid.into()))
        })
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn enrollment_table() {
        let namespaces = [ns("mesh", true), ns("plain", false)];
        let pods = [
            p("a", "mesh", "n1", "10.0.0.1", json!({})),
            p("b", "mesh", "n2", "10.0.0.2", json!({})),
            p("c", "plain", "n1", "10.0.0.3", json!({})),
            p(
                "d",
                "plain",
                "n1",
                "10.0.0.4",
                json!({"metadata": {"labels": {ENFORCE_LABEL: ENFORCE_VALUE}}}),
            ),
            p(
                "e",
                "mesh",
                "n1",
                "10.0.0.5",
                json!({"metadata": {"annotations": {EXCLUDE_ANNOTATION: "true"}}}),
            ),
            p(
                "f",
                "mesh",
                "n1",
                "10.0.0.6",
                json!({"spec": {"hostNetwork": true}}),
            ),
            p(
                "g",
                "mesh",
                "n1",
                "10.0.0.7",
                json!({"status": {"phase": "Succeeded"}}),
            ),
            p(
                "h",
                "mesh",
                "n1",
                "10.0.0.8",
                json!({"metadata": {"uid": "missing"}}),
            ),
        ];
        let mut locate = |uid: &str| {
            if uid == "missing" {
                Err(crate::kubernetes::discover::LocateError::NotStarted(
                    "/cg/missing".into(),
                ))
            } else {
                Ok((
                    PathBuf::from(format!("/cg/{uid}")),
                    PathBuf::from(format!("/ns/{uid}")),
                ))
            }
        };
        let d = desired("n1", &pods, &namespaces, &[], false, &mut locate);
        let enrolled: Vec<&str> = d.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(enrolled, ["a", "d"], "enrollment limited to the mesh");
        let enforced: Vec<&str> = d.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(enforced, ["a", "b", "h", "d"]); // by namespace, then name
        assert_eq!(d.not_enrolled.len(), 1);
        let ne = &d.not_enrolled[0];
        assert_eq!(
            (
                ne.namespace.as_str(),
                ne.name.as_str(),
                ne.uid.as_str(),
                ne.reason.to_string().as_str()
            ),
            (
                "mesh",
                "h",
                "missing",
                "no process in /cg/missing yet (pod not started)"
            )
        );
        assert_eq!(d.pods[0].service_account, "a");
        assert_eq!(d.pods[0].cgroup, PathBuf::from("/cg/uid-a"));

        // The default: every pod of the node with its own network is a steered client, the
        // excluded and unlabelled ones too; only mesh pods are protected destinations.
        let d = desired("n1", &pods, &namespaces, &[], true, &mut locate);
        let enrolled: Vec<&str> = d.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(enrolled, ["a", "e", "c", "d"]);
        let enforced: Vec<&str> = d.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(enforced, ["a", "b", "h", "d"]);
    }

    #[test]
    fn a_terminating_pod_yields_its_address() {
        let namespaces = [ns("mesh", true)];
        let pods = [
            p(
                "a-old",
                "mesh",
                "n2",
                "10.0.0.1",
                json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            ),
            p("b-new", "mesh", "n2", "10.0.0.1", json!({})),
        ];
        let d = from_n1(&pods, &namespaces, &[]);
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.peers[0].name, "b-new");
    }

    #[test]
    fn contested_address_goes_to_the_first_claimant() {
        let namespaces = [ns("mesh", true)];
        let pods = [
            p("a", "mesh", "n2", "10.0.0.1", json!({})),
            p("b", "mesh", "n2", "10.0.0.1", json!({})),
        ];
        let d = from_n1(&pods, &namespaces, &[]);
        assert_eq!(d.peers.len(), 1, "{:?}", d.peers);
        assert_eq!(d.peers[0].name, "a");
    }

    #[test]
    fn services_keep_int_target_ports() {
        let s: Arc<Service> = Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "jwks", "namespace": "auth"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [
                    {"port": 80, "targetPort": 8080}, {"port": 443, "targetPort": "https"}]}
            }))
            .unwrap(),
        );
        let headless: Arc<Service> = Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "h", "namespace": "auth"}, "spec": {"clusterIP": "None"}}))
                .unwrap(),
        );
        let d = from_n1(&[], &[], &[s, headless]);
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services[0].ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            d.services[0].ports,
            [
                ServicePort {
                    port: 80,
                    target_port: Some(8080)
                },
                ServicePort {
                    port: 443,
                    target_port: None
                }
            ]
        );
    }

    #[test]
    fn service_backends_are_ready_selected_pods_with_ports_mapped() {
        let namespaces = [ns("mesh", true)];
        let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]},
            "spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8000}]}]}});
        let pods = [
            p(
                "web-1",
                "mesh",
                "n2",
                "10.0.0.1",
                merge_into(
                    json!({"metadata": {"labels": {"app": "web"}}}),
                    ready.clone(),
                ),
            ),
            p(
                "web-2",
                "mesh",
                "n2",
                "10.0.0.2",
                merge_into(
                    json!({"metadata": {"labels": {"app": "web"}},
                "status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
                    json!({}),
                ),
            ),
            p("other", "mesh", "n2", "10.0.0.3", ready.clone()),
            p(
                "web-x",
                "elsewhere",
                "n2",
                "10.0.0.4",
                merge_into(json!({"metadata": {"labels": {"app": "web"}}}), ready),
            ),
        ];
        let svc: Arc<Service> = Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "mesh"},
                "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "web"}, "ports": [
                    {"port": 80, "targetPort": "http"}, {"port": 81, "targetPort": 9000}, {"port": 82},
                    {"port": 83, "targetPort": "missing"}, {"port": 53, "protocol": "UDP"}]}
            }))
            .unwrap(),
        );
        let d = from_n1(&pods, &namespaces, &[svc]);
        let b = &d.services[0].backends;
        assert_eq!(
            b.len(),
            1,
            "only the ready pod the selector picks, in the service's namespace: {b:?}"
        );
        assert_eq!(b[0].ip, "10.0.0.1".parse::<IpAddr>().unwrap());
        let ports: Vec<(u16, Option<u16>)> =
            b[0].ports.iter().map(|p| (p.port, p.target_port)).collect();
        assert_eq!(ports, [(80, Some(8000)), (81, Some(9000)), (82, Some(82))]);

        let cfg = crate::config::Config {
            peers: d.peers.clone(),
            services: d.services.clone(),
            ..Default::default()
        };
        let reg = crate::registry::Registry::from_config(&cfg);
        let vip = |port: u16| std::net::SocketAddr::new("10.96.0.1".parse().unwrap(), port);
        let (to, w) = reg.resolve(vip(80), 7).unwrap();
        assert_eq!(to, "10.0.0.1:8000".parse().unwrap());
        assert!(
            w.is_none(),
            "the backend is a mesh pod: its own node's agent decides, not this hop"
        );
        assert!(reg.decided_at_destination.contains(&to.ip()));
        assert!(
            reg.resolve(vip(83), 0).is_none(),
            "no backend on that port: refused"
        );
        let direct = "10.0.0.3:5000".parse().unwrap();
        assert_eq!(reg.resolve(direct, 0).unwrap().0, direct);
    }

    fn merge_into(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
        merge(&mut a, b);
        a
    }

    fn ap(name: &str, rv: &str, uid: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "foo", "uid": uid, "resourceVersion": rv},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn invalid_version_keeps_the_last_good_one() {
        let mut pols = Policies::default();
        let good = ap(
            "deny",
            "1",
            "u1",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
        );
        let (set, reports) = pols.update("security.istio.io/v1", &[], &[good]);
        assert_eq!(set.authorization_policies.len(), 1);
        assert!(reports.is_empty());

        let bad = ap(
            "deny",
            "2",
            "u1",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"], "bogus": 1}}]}]}),
        );
        let (set, reports) = pols.update("security.istio.io/v1", &[], std::slice::from_ref(&bad));
        assert_eq!(
            set.authorization_policies.len(),
            1,
            "the last good version stays"
        );
        assert_eq!(reports.len(), 1);
        assert!(reports[0].kept_previous);
        assert!(
            reports[0].problems[0].message.contains("bogus"),
            "{:?}",
            reports[0].problems
        );

        // Unchanged: not parsed or reported again.
        let (_, reports) = pols.update("security.istio.io/v1", &[], &[bad]);
        assert!(reports.is_empty());

        // Recreated under a new uid, invalid: nothing from the old object.
        let bad2 = ap("deny", "3", "u2", json!({"action": "DENY"}));
        let (set, reports) = pols.update("security.istio.io/v1", &[], &[bad2]);
        assert_eq!(set.authorization_policies.len(), 0);
        assert!(!reports[0].kept_previous);
        assert!(
            reports[0].problems[0]
                .message
                .contains("AuthorizationPolicy foo/deny"),
            "{:?}",
            reports[0].problems
        );

        // Deleted.
        let (set, _) = pols.update("security.istio.io/v1", &[], &[]);
        assert!(set.authorization_policies.is_empty());
        assert!(pols.entries.is_empty());
    }
}
