//! Kubernetes mode: pods, services, namespaces and Istio policies from the API server, kept by
//! watchers (list, then watch; relist on 410 Gone; retried with backoff): pods in the agent's
//! own store (`pods`), the rest in reflector stores.
//! A store keeps its last full state while its watch reconnects, so the agent keeps enforcing
//! what it last knew through an API server outage.
use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
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
pub mod pods;
pub mod snapshot;

pub const ISTIO_GROUP: &str = "security.istio.io";

/// The stores, and a signal raised whenever one of them changes.
pub struct Cluster {
    pub pods: pods::PodStore,
    pub namespaces: Store<Namespace>,
    pub services: Store<Service>,
    pub request_authentications: Store<DynamicObject>,
    pub authorization_policies: Store<DynamicObject>,
    /// Istio's mesh ConfigMap (its `mesh` key holds MeshConfig, whose `extensionProviders` the
    /// CUSTOM policies name).
    pub mesh_config: Store<ConfigMap>,
    /// Where that ConfigMap is: (namespace, name).
    pub mesh_config_at: (String, String),
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
    config: watcher::Config,
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
    let stream = watcher(api, config)
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

/// Runs the pod watcher into the agent's own store: a pod is kept as a `PodRecord`, and only an
/// update that changes one wakes the agent.
fn spawn_pod_watch(api: Api<pods::Pod>, store: pods::PodStore, changed: Arc<Notify>) {
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    if store.apply(ev) {
                        changed.notify_one();
                    }
                }
                Err(e) => tracing::warn!(
                    resource = "pods",
                    "watch: {e}; retrying, the last state stays in force"
                ),
            }
        }
    });
}

impl Cluster {
    /// Starts the watchers and waits until every store has its first full list.
    pub async fn start(
        client: Client,
        istio_api_version: Option<String>,
        mesh_config_at: (String, String),
    ) -> Result<Cluster> {
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
        let pods = pods::PodStore::default();
        spawn_pod_watch(
            Api::<pods::Pod>::all(client.clone()),
            pods.clone(),
            changed.clone(),
        );
        let (namespaces, w) = reflector::store();
        spawn_watch(
            "namespaces",
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
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
            watcher::Config::default(),
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
            watcher::Config::default(),
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
            watcher::Config::default(),
            w,
            trim_policy,
            changed.clone(),
        );
        let (mesh_config, w) = reflector::store();
        spawn_watch(
            "configmaps",
            Api::<ConfigMap>::namespaced(client.clone(), &mesh_config_at.0),
            watcher::Config::default().fields(&format!("metadata.name={}", mesh_config_at.1)),
            w,
            |c: &mut ConfigMap| {
                trim_meta(&mut c.metadata);
                c.binary_data = None;
            },
            changed.clone(),
        );
        let cluster = Cluster {
            mesh_config,
            mesh_config_at,
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
            let _ = self.mesh_config.wait_until_ready().await;
        };
        let mut all = std::pin::pin!(all);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), &mut all).await {
                Ok(()) => return,
                Err(_) => tracing::warn!("still waiting for the first list of pods, namespaces, services, Istio policies and the mesh ConfigMap from the API server"),
            }
        }
    }

    /// What to enforce now, as `scope` sees it; `locate` finds this node's pods on the host.
    pub fn desired(
        &self,
        scope: &snapshot::Scope,
        locate: &mut snapshot::Locate,
    ) -> snapshot::Desired {
        snapshot::desired(
            scope,
            &self.pods.state(),
            &self.namespaces.state(),
            &self.services.state(),
            locate,
        )
    }
}
