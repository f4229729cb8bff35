//! Pods as the agent keeps them. The watcher decodes only the fields the agent reads (`Pod`
//! here, not k8s-openapi's: a whole pod with its containers' env, volumes and managedFields is
//! kilobytes to build and throw away), and the store keeps one `PodRecord` per pod, parsed once
//! when the pod changes. An update that changes nothing the agent reads (most pod status churn)
//! leaves the store as it was and wakes nothing.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use k8s_openapi::apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString};
use serde::Deserialize;

use super::snapshot::{
    ENFORCE_LABEL, ENFORCE_VALUE, EXCLUDE_ANNOTATION, EXCLUDE_INBOUND_PORTS_ANNOTATION,
};
use crate::{
    registry::{Labels, Workload},
    world::Probe,
};

/// A Pod as the watcher decodes it: only the fields the agent reads. serde skips the rest
/// (containers' env and volumes, managedFields, other annotations) without building them.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default, deserialize_with = "read_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<Spec>,
    pub status: Option<Status>,
}

impl k8s_openapi::Resource for Pod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Pod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    pub liveness_probe: Option<ContainerProbe>,
    pub readiness_probe: Option<ContainerProbe>,
    pub startup_probe: Option<ContainerProbe>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: Option<String>,
    pub container_port: i32,
    pub protocol: Option<String>,
}

/// A container's probe, as kubelet reads it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerProbe {
    pub http_get: Option<HttpGet>,
    pub tcp_socket: Option<TcpSocket>,
    pub grpc: Option<Grpc>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HttpGet {
    pub path: Option<String>,
    pub port: IntOrString,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TcpSocket {
    pub port: IntOrString,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Grpc {
    pub port: i32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

/// The metadata the agent and the watcher read; other annotations (a kubectl
/// last-applied-configuration can be kilobytes) are skipped, not copied.
fn read_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        #[serde(default, deserialize_with = "read_annotations")]
        annotations: Option<BTreeMap<String, String>>,
        deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    }
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        annotations: m.annotations,
        deletion_timestamp: m.deletion_timestamp,
        ..Default::default()
    })
}

fn read_annotations<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Wanted;
    impl<'de> serde::de::Visitor<'de> for Wanted {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of annotations")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(k) = a.next_key::<String>()? {
                if k == EXCLUDE_ANNOTATION || k == EXCLUDE_INBOUND_PORTS_ANNOTATION {
                    out.insert(k, a.next_value::<String>()?);
                } else {
                    a.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(Some(out))
        }
    }
    d.deserialize_option(Wanted)
}

/// What the agent reads of a pod.
#[derive(Debug, PartialEq, Eq)]
pub struct PodRecord {
    /// Namespace, name, labels and service account: shared with the registry and the config in
    /// force, never copied.
    pub workload: Arc<Workload>,
    pub uid: Arc<str>,
    pub node: Box<str>,
    /// status.podIPs then status.podIP, without loopback or unspecified ones.
    pub ips: Arc<[IpAddr]>,
    pub host_network: bool,
    /// Succeeded or Failed: its address may already be another pod's.
    pub finished: bool,
    pub running: bool,
    pub ready: bool,
    /// metadata.deletionTimestamp is set.
    pub deleting: bool,
    /// The pod carries `authz.io/enforce: enabled`.
    pub enforce_label: bool,
    /// The pod carries `authz.io/exclude: "true"`.
    pub excluded: bool,
    pub exclude_inbound_ports: Box<[u16]>,
    pub probes: Box<[Probe]>,
    /// Named TCP container ports, for services' named targetPorts.
    pub named_ports: Box<[(Box<str>, u16)]>,
}

impl PodRecord {
    /// None for a pod without a name or namespace (the API server never sends one).
    pub fn from_pod(p: &Pod) -> Option<PodRecord> {
        let m = &p.metadata;
        let spec = p.spec.as_ref();
        let st = p.status.as_ref();
        let labels = m.labels.clone().unwrap_or_default();
        let annotation = |k: &str| m.annotations.as_ref().and_then(|a| a.get(k));
        let service_account = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let mut ips: Vec<IpAddr> = st
            .into_iter()
            .flat_map(|s| &s.pod_ips)
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if let Some(ip) = st
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|s| s.parse().ok())
        {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips.retain(|ip| !ip.is_loopback() && !ip.is_unspecified());
        let phase = st.and_then(|s| s.phase.as_deref());
        let named_ports = spec
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| &c.ports)
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some((
                    p.name.as_deref()?.into(),
                    u16::try_from(p.container_port).ok()?,
                ))
            })
            .collect();
        Some(PodRecord {
            uid: m.uid.as_deref().unwrap_or_default().into(),
            node: spec
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or_default()
                .into(),
            ips: ips.into(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            running: phase == Some("Running"),
            ready: st.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            }),
            deleting: m.deletion_timestamp.is_some(),
            enforce_label: labels
                .get(ENFORCE_LABEL)
                .is_some_and(|v| v == ENFORCE_VALUE),
            excluded: annotation(EXCLUDE_ANNOTATION).is_some_and(|v| v == "true"),
            exclude_inbound_ports: annotation(EXCLUDE_INBOUND_PORTS_ANNOTATION)
                .map(|v| excluded_inbound_ports(v))
                .unwrap_or_default()
                .into(),
            probes: spec.map(probes).unwrap_or_default().into(),
            named_ports,
            workload: Arc::new(Workload {
                name: m.name.clone()?,
                namespace: m.namespace.clone()?,
                labels: Labels::from(&labels),
                service_account,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.workload.name
    }

    pub fn namespace(&self) -> &str {
        &self.workload.namespace
    }

    /// Not on the host's network, and not finished (a finished pod's address is reused).
    pub fn has_own_network(&self) -> bool {
        !self.host_network && !self.finished
    }

    pub fn named_port(&self, name: &str) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, p)| *p)
    }

    /// The store's order: namespace, name (then uid, for a total order).
    pub fn order(&self, other: &PodRecord) -> std::cmp::Ordering {
        (self.namespace(), self.name(), &*self.uid).cmp(&(
            other.namespace(),
            other.name(),
            &*other.uid,
        ))
    }

    /// As `self`, sharing `old`'s workload when it is the same (so an unchanged pod keeps the
    /// one the registry already holds).
    fn sharing(mut self, old: &PodRecord) -> PodRecord {
        if self.workload == old.workload {
            self.workload = old.workload.clone();
        }
        self
    }
}

/// Istio's `traffic.sidecar.istio.io/excludeInboundPorts` (comma-separated). A value that does
/// not parse, or too many ports, excludes nothing: capture is the safe side.
fn excluded_inbound_ports(v: &str) -> Vec<u16> {
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

/// kubelet's liveness, readiness and startup probes of the pod's containers; a named port is
/// resolved against the containers' ports, an unresolvable one dropped.
fn probes(spec: &Spec) -> Vec<Probe> {
    let port = |p: &IntOrString| -> Option<u16> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        }
    };
    let mut out: Vec<Probe> = spec
        .containers
        .iter()
        .flat_map(|c| [&c.liveness_probe, &c.readiness_probe, &c.startup_probe])
        .flatten()
        .filter_map(|p| {
            if let Some(h) = &p.http_get {
                let path = h.path.as_deref().unwrap_or("/");
                // A path kubelet could not send as one request line gets no exemption.
                if path.contains(['\n', '\r', ' ']) || !path.starts_with('/') {
                    return None;
                }
                return Some(Probe::Http {
                    port: port(&h.port)?,
                    path: path.to_string(),
                });
            }
            if let Some(t) = &p.tcp_socket {
                return Some(Probe::Tcp {
                    port: port(&t.port)?,
                });
            }
            let g = p.grpc.as_ref()?;
            Some(Probe::Grpc {
                port: u16::try_from(g.port).ok()?,
            })
        })
        .collect();
    out.sort_by_key(|p| format!("{p:?}"));
    out.dedup();
    out
}

/// The pods the watcher has seen, by uid, and in namespace/name order (kept sorted as pods come
/// and go, so an update never sorts the cluster). Between a relist's start and end the previous
/// state stays readable (an API server outage keeps what was last known).
#[derive(Clone, Default)]
pub struct PodStore {
    inner: Arc<RwLock<Inner>>,
    ready: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<Arc<str>, Arc<PodRecord>>,
    /// The same pods in `PodRecord::order`.
    sorted: Vec<Arc<PodRecord>>,
    /// A relist in progress.
    next: Option<HashMap<Arc<str>, Arc<PodRecord>>>,
    ready: bool,
    /// When the watch last delivered anything (changed or not): the store's word is current
    /// as of then.
    heard: Option<std::time::SystemTime>,
}

impl PodStore {
    /// Every pod now, in namespace/name order.
    pub fn state(&self) -> Vec<Arc<PodRecord>> {
        self.inner.read().unwrap().sorted.clone()
    }

    pub fn get(&self, uid: &str) -> Option<Arc<PodRecord>> {
        self.inner.read().unwrap().live.get(uid).cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.read().unwrap().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once the first full list is in.
    pub async fn wait_until_ready(&self) {
        loop {
            let notified = self.ready.notified();
            if self.inner.read().unwrap().ready {
                return;
            }
            notified.await;
        }
    }

    /// When the API server last said anything about pods.
    pub fn heard(&self) -> Option<std::time::SystemTime> {
        self.inner.read().unwrap().heard
    }

    /// Applies one watcher event; true when what the agent reads changed.
    pub fn apply(&self, ev: kube::runtime::watcher::Event<Pod>) -> bool {
        use kube::runtime::watcher::Event;
        let mut s = self.inner.write().unwrap();
        s.heard = Some(std::time::SystemTime::now());
        match ev {
            Event::Init => {
                s.next = Some(HashMap::new());
                false
            }
            Event::InitApply(p) => {
                if let Some(r) = PodRecord::from_pod(&p) {
                    let old = s.live.get(&r.uid).cloned();
                    let r = match old {
                        Some(old) if *old == r => old,
                        Some(old) => Arc::new(r.sharing(&old)),
                        None => Arc::new(r),
                    };
                    s.next
                        .get_or_insert_with(HashMap::new)
                        .insert(r.uid.clone(), r);
                }
                false
            }
            Event::InitDone => {
                let next = s.next.take().unwrap_or_default();
                let changed = !s.ready
                    || next.len() != s.live.len()
                    || next
                        .iter()
                        .any(|(k, v)| s.live.get(k).is_none_or(|old| !Arc::ptr_eq(old, v)));
                s.live = next;
                let mut sorted: Vec<Arc<PodRecord>> = s.live.values().cloned().collect();
                sorted.sort_unstable_by(|a, b| a.order(b));
                s.sorted = sorted;
                if !s.ready {
                    s.ready = true;
                    self.ready.notify_waiters();
                }
                changed
            }
            Event::Apply(p) => {
                let Some(r) = PodRecord::from_pod(&p) else {
                    return false;
                };
                let old = s.live.get(&r.uid).cloned();
                if old.as_deref() == Some(&r) {
                    return false;
                }
                let r = Arc::new(match &old {
                    Some(old) => r.sharing(old),
                    None => r,
                });
                if let Some(old) = old {
                    s.unsort(&old);
                }
                let at = s.sorted.partition_point(|x| x.order(&r).is_lt());
                s.sorted.insert(at, r.clone());
                s.live.insert(r.uid.clone(), r);
                true
            }
            Event::Delete(p) => {
                let uid = p.metadata.uid.as_deref().unwrap_or_default();
                match s.live.remove(uid) {
                    Some(old) => {
                        s.unsort(&old);
                        true
                    }
                    None => false,
                }
            }
        }
    }
}

impl Inner {
    fn unsort(&mut self, old: &Arc<PodRecord>) {
        let at = self.sorted.partition_point(|x| x.order(old).is_lt());
        if self.sorted.get(at).is_some_and(|x| Arc::ptr_eq(x, old)) {
            self.sorted.remove(at);
        }
    }
}

#[cfg(test)]
pub(crate) fn record(v: serde_json::Value) -> Arc<PodRecord> {
    Arc::new(PodRecord::from_pod(&serde_json::from_value(v).unwrap()).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    fn pod(extra_status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "n", "uid": "u", "labels": {"app": "a"},
                "annotations": {"authz.io/exclude": "true", "big": "x",
                                "traffic.sidecar.istio.io/excludeInboundPorts": "9090, 9091"},
                "managedFields": [{"manager": "m"}]},
            "spec": {"nodeName": "node", "serviceAccountName": "sa", "containers": [
                {"name": "c", "image": "i", "ports": [
                    {"name": "http", "containerPort": 8080}, {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"containerPort": 7}],
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                 "livenessProbe": {"httpGet": {"path": "bad path", "port": 8080}},
                 "startupProbe": {"tcpSocket": {"port": 9000}}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                "conditions": [{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}],
                "extra": extra_status}
        }))
        .unwrap()
    }

    #[test]
    fn a_record_keeps_what_is_read() {
        let r = PodRecord::from_pod(&pod(json!(null))).unwrap();
        assert_eq!((r.namespace(), r.name()), ("n", "a"));
        assert_eq!(r.workload.service_account, "sa");
        assert_eq!(&*r.node, "node");
        assert_eq!(r.ips.len(), 2);
        assert!(r.ready && r.running && r.excluded && !r.deleting && !r.finished);
        assert_eq!(&*r.exclude_inbound_ports, [9090, 9091]);
        assert_eq!(r.named_port("http"), Some(8080));
        assert_eq!(
            r.named_port("dns"),
            None,
            "UDP ports are not service targets"
        );
        assert_eq!(
            &*r.probes,
            [
                Probe::Http {
                    port: 8080,
                    path: "/ready".into()
                },
                Probe::Tcp { port: 9000 }
            ],
            "a path that is no request-line path is dropped"
        );
    }

    #[test]
    fn churn_that_changes_nothing_read_wakes_nothing() {
        let store = PodStore::default();
        assert!(!store.apply(Event::Init));
        assert!(!store.apply(Event::InitApply(pod(json!(null)))));
        assert!(store.apply(Event::InitDone), "the first list is a change");
        let before = store.state()[0].clone();
        // A status field the agent does not read.
        assert!(!store.apply(Event::Apply(pod(json!({"lastProbeTime": "now"})))));
        assert!(Arc::ptr_eq(&before, &store.state()[0]));
        // Readiness is read.
        let mut p = pod(json!(null));
        p.status.as_mut().unwrap().conditions.clear();
        assert!(store.apply(Event::Apply(p)));
        let after = store.state()[0].clone();
        assert!(!after.ready);
        assert!(
            Arc::ptr_eq(&before.workload, &after.workload),
            "the workload is shared, not copied"
        );
        // A relist with the same pods is no change; a pod gone from it is.
        store.apply(Event::Init);
        store.apply(Event::InitApply({
            let mut p = pod(json!(null));
            p.status.as_mut().unwrap().conditions.clear();
            p
        }));
        assert!(!store.apply(Event::InitDone));
        store.apply(Event::Init);
        assert!(store.apply(Event::InitDone));
        assert!(store.is_empty());
    }

    #[test]
    fn the_store_stays_in_namespace_name_order() {
        let store = PodStore::default();
        store.apply(Event::Init);
        store.apply(Event::InitDone);
        let named = |ns: &str, name: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns,
                "uid": format!("{ns}-{name}")}}))
            .unwrap()
        };
        for (ns, name) in [("b", "x"), ("a", "z"), ("a", "y"), ("c", "a")] {
            assert!(store.apply(Event::Apply(named(ns, name))));
        }
        let order = |s: &PodStore| {
            s.state()
                .iter()
                .map(|p| format!("{}/{}", p.namespace(), p.name()))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&store), ["a/y", "a/z", "b/x", "c/a"]);
        assert!(store.apply(Event::Delete(named("a", "z"))));
        let mut relabelled = named("b", "x");
        relabelled.metadata.labels = Some([("k".to_string(), "v".to_string())].into());
        assert!(store.apply(Event::Apply(relabelled)));
        assert_eq!(order(&store), ["a/y", "b/x", "c/a"]);
        assert_eq!(store.len(), 3);
    }
}
