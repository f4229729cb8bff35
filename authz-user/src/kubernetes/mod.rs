//! Kubernetes mode: pods, services, namespaces and Istio policies from the API server, kept in
//! reflector stores by watchers (list, then watch; relist on 410 Gone; retried with backoff).
//! A store keeps its last full state while its watch reconnects, so the agent keeps enforcing
//! what it last knew through an API server outage.
use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{
    api::{Api, ApiResource, DynamicObject},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Client,
};
use tokio::sync::Notify;

pub mod discover;
pub mod events;
#[cfg(feature = "kernel")]
pub mod input;
pub mod snapshot;

pub const ISTIO_GROUP: &str = "security.istio.io";

/// The stores, and a signal raised whenever one of them changes.
pub struct Cluster {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub services: Store<Service>,
    pub request_authentications: Store<DynamicObject>,
    pub authorization_policies: Store<DynamicObject>,
    /// `security.istio.io/v1` or `v1beta1`, whichever the API server prefers.
    pub istio_api_version: String,
    pub changed: Arc<Notify>,
}

/// Connects to the API server: `kubeconfig` if given, else in-cluster, else `$KUBECONFIG` or
/// `~/.kube/config`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster service account and no kubeconfig")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// The served version of Istio's security API to watch: v1 where served (Istio 1.22+), else
/// v1beta1. Both are views of the same objects, so only one is watched.
pub async fn istio_version(client: &Client) -> Result<String> {
    let req = http::Request::get(format!("/apis/{ISTIO_GROUP}"))
        .body(Vec::new())
        .expect("static request");
    let group: k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroup = client
        .request(req)
        .await
        .with_context(|| format!("API group {ISTIO_GROUP} (are Istio's CRDs installed?)"))?;
    let served: Vec<&str> = group.versions.iter().map(|v| v.version.as_str()).collect();
    for v in ["v1", "v1beta1"] {
        if served.contains(&v) {
            return Ok(v.to_string());
        }
    }
    anyhow::bail!("{ISTIO_GROUP} serves {served:?}, neither v1 nor v1beta1")
}

fn istio_resource(version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: ISTIO_GROUP.into(),
        version: version.into(),
        api_version: format!("{ISTIO_GROUP}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Keeps only what the agent reads of a pod, so the store stays small on large clusters.
fn trim_pod(p: &mut Pod) {
    let m = &mut p.metadata;
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
    m.generate_name = None;
    if let Some(a) = &mut m.annotations {
        a.retain(|k, _| {
            k == snapshot::EXCLUDE_ANNOTATION || k == snapshot::EXCLUDE_INBOUND_PORTS_ANNOTATION
        });
    }
    if let Some(s) = &mut p.spec {
        // kubelet's probes, kept as one short string: they pass the pod's policies.
        let probes = snapshot::probe_lines(s);
        if !probes.is_empty() {
            m.annotations
                .get_or_insert_with(Default::default)
                .insert(snapshot::PROBES_KEY.into(), probes.join("\n"));
        }
        // Named container ports (for services' named targetPorts) kept as one short string; the
        // containers themselves go (a `Container` is kilobytes even when empty).
        let named: Vec<String> = s
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let name = p.name.as_deref()?;
                // A name with the list's separators could forge another entry: dropped.
                (!name.contains([',', '='])).then(|| format!("{name}={}", p.container_port))
            })
            .collect();
        if !named.is_empty() {
            m.annotations
                .get_or_insert_with(Default::default)
                .insert(snapshot::NAMED_PORTS_KEY.into(), named.join(","));
        }
        *s = k8s_openapi::api::core::v1::PodSpec {
            node_name: s.node_name.take(),
            service_account_name: s.service_account_name.take(),
            host_network: s.host_network,
            ..Default::default()
        };
    }
    if let Some(st) = &mut p.status {
        *st = k8s_openapi::api::core::v1::PodStatus {
            phase: st.phase.take(),
            pod_ip: st.pod_ip.take(),
            pod_ips: st.pod_ips.take(),
            conditions: st
                .conditions
                .take()
                .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect()),
            ..Default::default()
        };
    }
}

fn trim_meta(m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    m.managed_fields = None;
    m.owner_references = None;
}

fn trim_service(s: &mut Service) {
    trim_meta(&mut s.metadata);
    s.metadata.annotations = None;
    s.status = None;
    if let Some(spec) = &mut s.spec {
        *spec = k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: spec.cluster_ip.take(),
            cluster_ips: spec.cluster_ips.take(),
            ports: spec.ports.take(),
            selector: spec.selector.take(),
            ..Default::default()
        };
    }
}

fn trim_policy(o: &mut DynamicObject) {
    trim_meta(&mut o.metadata);
    // Keep the annotations: `istio.io/dry-run` is one.
    if let Some(map) = o.data.as_object_mut() {
        map.retain(|k, _| k == "spec");
    }
}

/// Runs one watcher into its store, raising `changed` on every event.
fn spawn_watch<K>(
    what: &'static str,
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    trim: fn(&mut K),
    changed: Arc<Notify>,
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitApply(_)) | Ok(watcher::Event::Init) => {}
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(
                    resource = what,
                    "watch: {e}; retrying, the last state stays in force"
                ),
            }
        }
    });
}

impl Cluster {
    /// Starts the watchers and waits until every store has its first full list.
    pub async fn start(client: Client, istio_api_version: Option<String>) -> Result<Cluster> {
        let version = match istio_api_version {
            Some(v) => v,
            None => {
                // The API server may be restarting, or Istio's CRDs not installed yet: wait.
                let mut backoff = Duration::from_millis(500);
                loop {
                    match istio_version(&client).await {
                        Ok(v) => break v,
                        Err(e) => {
                            tracing::warn!("{e:#}; retrying in {backoff:?}");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
        };
        let changed = Arc::new(Notify::new());
        let (pods, w) = reflector::store();
        spawn_watch(
            "pods",
            Api::<Pod>::all(client.clone()),
            w,
            trim_pod,
            changed.clone(),
        );
        let (namespaces, w) = reflector::store();
        spawn_watch(
            "namespaces",
            Api::<Namespace>::all(client.clone()),
            w,
            |n: &mut Namespace| {
                trim_meta(&mut n.metadata);
                n.metadata.annotations = None;
                n.spec = None;
                n.status = None;
            },
            changed.clone(),
        );
        let (services, w) = reflector::store();
        spawn_watch(
            "services",
            Api::<Service>::all(client.clone()),
            w,
            trim_service,
            changed.clone(),
        );
        let ra = istio_resource(&version, "RequestAuthentication", "requestauthentications");
        let w = reflector::store::Writer::new(ra.clone());
        let request_authentications = w.as_reader();
        spawn_watch(
            "requestauthentications",
            Api::all_with(client.clone(), &ra),
            w,
            trim_policy,
            changed.clone(),
        );
        let ap = istio_resource(&version, "AuthorizationPolicy", "authorizationpolicies");
        let w = reflector::store::Writer::new(ap.clone());
        let authorization_policies = w.as_reader();
        spawn_watch(
            "authorizationpolicies",
            Api::all_with(client.clone(), &ap),
            w,
            trim_policy,
            changed.clone(),
        );
        let cluster = Cluster {
            pods,
            namespaces,
            services,
            request_authentications,
            authorization_policies,
            istio_api_version: format!("{ISTIO_GROUP}/{version}"),
            changed,
        };
        cluster.wait_ready().await;
        Ok(cluster)
    }

    async fn wait_ready(&self) {
        let all = async {
            let _ = self.pods.wait_until_ready().await;
            let _ = self.namespaces.wait_until_ready().await;
            let _ = self.services.wait_until_ready().await;
            let _ = self.request_authentications.wait_until_ready().await;
            let _ = self.authorization_policies.wait_until_ready().await;
        };
        let mut all = std::pin::pin!(all);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), &mut all).await {
                Ok(()) => return,
                Err(_) => tracing::warn!("still waiting for the first list of pods, namespaces, services and Istio policies from the API server"),
            }
        }
    }

    /// What to enforce now; `locate` finds this node's pods on the host. `enroll_all`: every
    /// pod of the node is a steered client, not only mesh pods.
    pub fn desired(
        &self,
        node: &str,
        enroll_all: bool,
        locate: &mut snapshot::Locate,
    ) -> snapshot::Desired {
        snapshot::desired(
            node,
            &self.pods.state(),
            &self.namespaces.state(),
            &self.services.state(),
            enroll_all,
            locate,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_pods_keep_what_is_read_and_nothing_forged() {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n", "uid": "u", "labels": {"app": "a"},
                "annotations": {"authz.io/exclude": "true", "big": "x", snapshot::NAMED_PORTS_KEY: "http=1"},
                "managedFields": [{"manager": "m"}]},
            "spec": {"nodeName": "node", "serviceAccountName": "sa", "containers": [
                {"name": "c", "image": "i", "ports": [
                    {"name": "http", "containerPort": 8080}, {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"name": "x=1,http", "containerPort": 9}, {"containerPort": 7}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}]}
        }))
        .unwrap();
        trim_pod(&mut p);
        let a = p.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            a.get(snapshot::NAMED_PORTS_KEY).map(String::as_str),
            Some("http=8080")
        );
        assert!(a.contains_key("authz.io/exclude") && !a.contains_key("big"));
        assert!(p.metadata.managed_fields.is_none());
        let spec = p.spec.as_ref().unwrap();
        assert!(spec.containers.is_empty());
        assert_eq!(spec.node_name.as_deref(), Some("node"));
        assert_eq!(spec.service_account_name.as_deref(), Some("sa"));
        let conditions = p.status.as_ref().unwrap().conditions.as_ref().unwrap();
        assert_eq!(conditions.len(), 1);
    }
}
