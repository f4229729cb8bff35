//! From what the API server holds to what the agent enforces: the pods of this node to enroll,
//! the workload addresses to enforce, the services, and the policies. Pure: no I/O but the
//! `locate` callback the caller passes for this node's pods.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::core::DynamicObject;

use super::pods::PodRecord;
use crate::{
    config::{PodSpec, ServicePort, ServiceSpec},
    policy::{load_str, PolicySet, Problem},
    world::{DecidedAt, Identity, NodePod, Peer},
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
    pub pods: Vec<NodePod>,
    /// Mesh pods anywhere in the cluster, by address: each is decided at its own node (this
    /// node's, through `pods`), so here they are identities and Service backends.
    pub peers: Vec<Peer>,
    pub services: Vec<Arc<ServiceSpec>>,
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

/// Maps for one computation over the whole cluster: keys are the agent's own (addresses, names
/// from the API server's store), hashed fast.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Where a pod of this node lives on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    /// The addresses the CNI plugin reported, when the pod was handed over by it (fresher than
    /// the API server's, which kubelet learns from the same result later).
    pub ips: Option<Vec<IpAddr>>,
}

impl From<(PathBuf, PathBuf)> for Located {
    fn from((cgroup, netns): (PathBuf, PathBuf)) -> Located {
        Located {
            cgroup,
            netns,
            ips: None,
        }
    }
}

/// Finds a pod of this node on the host, by uid.
pub type Locate<'a> = dyn FnMut(&str) -> Result<Located, super::discover::LocateError> + 'a;

fn name_of(p: &PodRecord) -> String {
    format!("{}/{}", p.namespace(), p.name())
}

/// Pods whose policies are enforced (protected destinations): in a labelled namespace or
/// labelled themselves, not excluded, with a network of their own.
pub fn in_mesh(pod: &PodRecord, enforced_namespaces: &HashSet<&str>) -> bool {
    (pod.enforce_label || enforced_namespaces.contains(pod.namespace()))
        && !pod.excluded
        && pod.has_own_network()
}

/// Istio's annotation for ports the sidecar does not capture inbound (comma-separated). A value
/// that does not parse, or too many ports, excludes nothing: capture is the safe side.
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// Whose view the desired state is: this node's, and how it knows the other agents.
#[derive(Debug, Clone)]
pub struct Scope {
    pub node: String,
    /// Every pod of the node is a steered client (not only mesh pods).
    pub enroll_all: bool,
    /// The namespace and labels of the cluster's agent pods.
    pub agent_namespace: String,
    pub agent_labels: crate::registry::Labels,
}

impl Scope {
    /// `node`'s view, with the agents recognised by their default namespace and labels.
    pub fn node(node: &str, enroll_all: bool) -> Scope {
        let agents = crate::config::AgentPods::default();
        Scope {
            node: node.into(),
            enroll_all,
            agent_namespace: "authz-system".into(),
            agent_labels: (&agents.labels).into(),
        }
    }

    fn is_agent(&self, p: &PodRecord) -> bool {
        p.namespace() == self.agent_namespace
            && self
                .agent_labels
                .iter()
                .all(|(k, v)| p.workload.labels.get(k) == Some(v))
    }
}

pub fn desired(
    scope: &Scope,
    pods: &[Arc<PodRecord>],
    namespaces: &[Arc<Namespace>],
    services: &[Arc<Service>],
    locate: &mut Locate,
) -> Desired {
    let (node, enroll_all) = (scope.node.as_str(), scope.enroll_all);
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
    // Where two pods claim one address (one terminating, its address already given to a new
    // pod), the first claimant keeps it: pods being deleted come last, then by namespace/name.
    // The store keeps pods in that order already; a caller's list is sorted here.
    let mut sorted_copy = Vec::new();
    let pods: &[Arc<PodRecord>] = if pods.is_sorted_by(|a, b| a.order(b).is_le()) {
        pods
    } else {
        sorted_copy.extend(pods.iter().cloned());
        sorted_copy.sort_unstable_by(|a, b| a.order(b));
        &sorted_copy
    };
    let in_order = pods
        .iter()
        .filter(|p| !p.deleting)
        .chain(pods.iter().filter(|p| p.deleting));
    let mut taken: FastMap<IpAddr, &Arc<PodRecord>> = FastMap::default();
    taken.reserve(pods.len());
    // An address belongs to the pod that holds it now: a pod being deleted loses it to any live
    // pod reporting it, in the mesh or not, on any node.
    let held_by_live: std::collections::HashSet<IpAddr, foldhash::fast::RandomState> =
        if pods.iter().any(|p| p.deleting) {
            pods.iter()
                .filter(|p| !p.deleting && p.has_own_network())
                .flat_map(|p| p.ips.iter().copied())
                .collect()
        } else {
            Default::default()
        };
    // Nodes whose agent is ready decide their own mesh pods; this node's agent is this one.
    let agent_nodes: std::collections::HashSet<&str, foldhash::fast::RandomState> = pods
        .iter()
        .filter(|p| p.ready && p.running && !p.deleting && scope.is_agent(p))
        .map(|p| &*p.node)
        .collect();
    for pod in in_order {
        let mesh = in_mesh(pod, &enforced_ns);
        let local = &*pod.node == node;
        // Every pod of the node with a network of its own is steered as a client (unless
        // enrollment is limited to the mesh), for Service addresses; mesh pods are also
        // captured inbound.
        let enroll = local && pod.has_own_network() && (mesh || enroll_all);
        if !mesh && !enroll {
            continue;
        }
        // The record's own list, unless an address already went to another pod.
        let mut ips = pod.ips.clone();
        if pod.deleting && pod.ips.iter().any(|ip| held_by_live.contains(ip)) {
            ips = pod
                .ips
                .iter()
                .copied()
                .filter(|ip| !held_by_live.contains(ip))
                .collect();
        }
        if mesh {
            // Two pods claiming one address: the first keeps it (a live pod before one being
            // deleted, then by namespace/name), so traffic to it never meets two sets of policies.
            if ips.iter().any(|ip| taken.contains_key(ip)) {
                let mut kept = Vec::with_capacity(ips.len());
                for ip in ips.iter() {
                    match taken.get(ip) {
                        Some(other) => out.warnings.push(format!(
                            "address {ip} is claimed by {} and {}; it goes to the first until one of them goes",
                            name_of(other),
                            name_of(pod)
                        )),
                        None => kept.push(*ip),
                    }
                }
                ips = kept.into();
            }
            for ip in ips.iter() {
                taken.insert(*ip, pod);
            }
            if !ips.is_empty() {
                let decided = if local || agent_nodes.contains(&*pod.node) {
                    DecidedAt::ItsNode
                } else {
                    DecidedAt::Client
                };
                out.peers.push(Peer {
                    workload: pod.workload.clone(),
                    ips: ips.clone(),
                    decided,
                });
            }
        }
        if !enroll {
            continue;
        }
        let w = &pod.workload;
        match locate(&pod.uid) {
            Ok(at) => out.pods.push(NodePod {
                spec: PodSpec {
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    labels: w.labels.to_map(),
                    service_account: w.service_account.clone(),
                    netns: at.netns,
                    cgroup: at.cgroup,
                    ips: at.ips.unwrap_or_else(|| ips.to_vec()),
                    // Mesh pods are captured inbound; other pods of the node are only clients.
                    inbound: mesh,
                    exclude_inbound_ports: pod.exclude_inbound_ports.to_vec(),
                },
                probes: pod.probes.to_vec(),
                identity: Identity::Known,
            }),
            Err(reason) => out.not_enrolled.push(NotEnrolled {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                uid: pod.uid.to_string(),
                reason,
            }),
        }
    }
    // A service's candidates are the pods of its namespace carrying the first pair of its
    // selector: pods are indexed by the pairs services select on, not by every label they have.
    let mut by_label: FastMap<(&str, &str, &str), Vec<&Arc<PodRecord>>> = FastMap::default();
    for s in services {
        let first = s
            .spec
            .as_ref()
            .and_then(|spec| spec.selector.as_ref())
            .and_then(|sel| sel.iter().next());
        if let (Some(ns), Some((k, v))) = (s.metadata.namespace.as_deref(), first) {
            by_label.entry((ns, k, v)).or_default();
        }
    }
    for p in pods {
        for (k, v) in p.workload.labels.iter() {
            if let Some(list) = by_label.get_mut(&(p.namespace(), k, v)) {
                list.push(p);
            }
        }
    }
    for s in services {
        let (Some(name), Some(namespace)) = (&s.metadata.name, &s.metadata.namespace) else {
            continue;
        };
        let Some(spec) = &s.spec else { continue };
        let mut ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if ips.is_empty() {
            continue;
        }
        ips.sort();
        ips.dedup();
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
        let candidates = spec
            .selector
            .as_ref()
            .and_then(|sel| sel.iter().next())
            .and_then(|(k, v)| by_label.get(&(namespace.as_str(), k.as_str(), v.as_str())))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let backends = backends(spec, candidates, &taken);
        out.services.push(Arc::new(ServiceSpec {
            name: name.clone(),
            namespace: namespace.clone(),
            ips,
            ports,
            backends,
        }));
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
    pods: &[&Arc<PodRecord>],
    live: &FastMap<IpAddr, &Arc<PodRecord>>,
) -> Vec<crate::config::ServiceBackend> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return vec![];
    };
    let mut out = Vec::new();
    for pod in pods {
        if pod.deleting || !pod.ready || !pod.running {
            continue;
        }
        let labels = &pod.workload.labels;
        if !selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
        {
            continue;
        }
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
                    Some(IntOrString::String(name)) => pod.named_port(name)?,
                };
                Some(ServicePort {
                    port,
                    target_port: Some(target),
                })
            })
            .collect();
        for ip in pod.ips.iter().copied() {
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

    fn pod(v: serde_json::Value) -> Arc<PodRecord> {
        crate::kubernetes::pods::record(v)
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
    fn p(name: &str, ns: &str, node: &str, ip: &str, extra: serde_json::Value) -> Arc<PodRecord> {
        let mut v = json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        });
        merge(&mut v, extra);
        pod(v)
    }
    /// The agent pod of `node` (host network, the manifests' namespace and labels).
    fn agent_on(node: &str, ready: bool) -> Arc<PodRecord> {
        p(
            &format!("authz-agent-{node}"),
            "authz-system",
            node,
            "192.168.0.1",
            json!({"metadata": {"labels": {"app.kubernetes.io/name": "authz-agent"}},
                   "spec": {"hostNetwork": true},
                   "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}),
        )
    }

    /// The desired state seen from node n1, where no pod can be located.
    fn from_n1(
        pods: &[Arc<PodRecord>],
        namespaces: &[Arc<Namespace>],
        services: &[Arc<Service>],
    ) -> Desired {
        desired(
            &Scope::node("n1", true),
            pods,
            namespaces,
            services,
            &mut |uid| Err(crate::kubernetes::discover::LocateError::BadUid(uid.into())),
        )
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
                )
                    .into())
            }
        };
        let d = desired(
            &Scope::node("n1", false),
            &pods,
            &namespaces,
            &[],
            &mut locate,
        );
        let enrolled: Vec<&str> = d.pods.iter().map(|p| p.spec.name.as_str()).collect();
        assert_eq!(enrolled, ["a", "d"], "enrollment limited to the mesh");
        let enforced: Vec<&str> = d.peers.iter().map(|p| p.workload.name.as_str()).collect();
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
        assert_eq!(d.pods[0].spec.service_account, "a");
        assert_eq!(d.pods[0].spec.cgroup, PathBuf::from("/cg/uid-a"));

        // The default: every pod of the node with its own network is a steered client, the
        // excluded and unlabelled ones too; only mesh pods are protected destinations.
        let d = desired(
            &Scope::node("n1", true),
            &pods,
            &namespaces,
            &[],
            &mut locate,
        );
        let enrolled: Vec<&str> = d.pods.iter().map(|p| p.spec.name.as_str()).collect();
        assert_eq!(enrolled, ["a", "e", "c", "d"]);
        let enforced: Vec<&str> = d.peers.iter().map(|p| p.workload.name.as_str()).collect();
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
        assert_eq!(d.peers[0].workload.name, "b-new");
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
        assert_eq!(d.peers[0].workload.name, "a");
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
            agent_on("n2", true),
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

        let cfg = crate::world::World {
            peers: d.peers.clone(),
            services: d.services.clone(),
            ..Default::default()
        };
        let reg = crate::registry::Registry::from_world(&cfg);
        let vip = |port: u16| std::net::SocketAddr::new("10.96.0.1".parse().unwrap(), port);
        let (to, w) = reg.resolve(vip(80)).unwrap();
        assert_eq!(to, "10.0.0.1:8000".parse().unwrap());
        assert!(
            w.is_none(),
            "the backend is a mesh pod: its own node's agent decides, not this hop"
        );
        assert!(reg.decided_at_destination.contains(&to.ip()));
        assert!(
            reg.resolve(vip(83)).is_none(),
            "no backend on that port: refused"
        );
        let direct = "10.0.0.3:5000".parse().unwrap();
        assert_eq!(reg.resolve(direct).unwrap().0, direct);
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

    use crate::registry::Registry;

    /// A table row: what the case is, the other pods of the cluster, what is expected.
    type Case<T> = (&'static str, Vec<Arc<PodRecord>>, T);

    fn decided(d: &Desired, name: &str) -> Option<DecidedAt> {
        d.peers
            .iter()
            .find(|p| p.workload.name == name)
            .map(|p| p.decided)
    }

    #[test]
    fn mesh_pods_of_nodes_without_a_ready_agent_are_decided_at_the_client() {
        let namespaces = [ns("mesh", true)];
        let table: &[Case<Option<DecidedAt>>] = &[
            ("no agent on n2", vec![], Some(DecidedAt::Client)),
            (
                "a ready agent on n2",
                vec![agent_on("n2", true)],
                Some(DecidedAt::ItsNode),
            ),
            (
                "n2's agent not ready",
                vec![agent_on("n2", false)],
                Some(DecidedAt::Client),
            ),
            (
                "only n3 has one",
                vec![agent_on("n3", true)],
                Some(DecidedAt::Client),
            ),
        ];
        for (case, agents, want) in table {
            let mut pods = vec![p("web", "mesh", "n2", "10.0.0.1", json!({}))];
            pods.extend(agents.iter().cloned());
            let d = from_n1(&pods, &namespaces, &[]);
            assert_eq!(decided(&d, "web"), *want, "{case}");
            let reg = Registry::from_world(&crate::world::World {
                peers: d.peers.clone(),
                ..Default::default()
            });
            let ip = "10.0.0.1".parse().unwrap();
            // Decided exactly once: by this agent at the client, or where it arrives.
            assert_eq!(
                reg.workload_at(ip).is_some(),
                *want == Some(DecidedAt::Client),
                "{case}"
            );
            assert_eq!(
                reg.decided_at_destination.contains(&ip),
                *want == Some(DecidedAt::ItsNode),
                "{case}"
            );
        }
        // This node's own pods are this agent's, whatever the API server says of it.
        let d = from_n1(
            &[p("local", "mesh", "n1", "10.0.0.5", json!({}))],
            &namespaces,
            &[],
        );
        assert_eq!(decided(&d, "local"), Some(DecidedAt::ItsNode));
    }

    #[test]
    fn an_address_belongs_to_the_pod_that_holds_it_now() {
        let namespaces = [ns("mesh", true), ns("plain", false)];
        let deleting = json!({"metadata": {"deletionTimestamp": "2026-12-05T00:00:00Z"}});
        let old = p("old", "mesh", "n1", "10.0.0.7", deleting.clone());
        let table: &[Case<&[&str]>] = &[
            (
                "alone while terminating, it keeps its address",
                vec![],
                &["old"],
            ),
            (
                "a new pod outside the mesh reports it: nobody's identity",
                vec![p("new", "plain", "n2", "10.0.0.7", json!({}))],
                &[],
            ),
            (
                "a new mesh pod reports it: the new pod's",
                vec![p("new", "mesh", "n2", "10.0.0.7", json!({}))],
                &["new"],
            ),
            (
                "a finished pod holds nothing",
                vec![p(
                    "done",
                    "plain",
                    "n2",
                    "10.0.0.7",
                    json!({"status": {"phase": "Succeeded"}}),
                )],
                &["old"],
            ),
        ];
        for (case, others, want) in table {
            let mut pods = vec![old.clone()];
            pods.extend(others.iter().cloned());
            let d = from_n1(&pods, &namespaces, &[]);
            let reg = Registry::from_world(&crate::world::World {
                peers: d.peers.clone(),
                ..Default::default()
            });
            let owner = reg
                .source_at("10.0.0.7".parse().unwrap())
                .map(|w| w.name.clone());
            let want = want.first().map(|s| s.to_string());
            assert_eq!(owner, want, "{case}");
        }
    }
}
