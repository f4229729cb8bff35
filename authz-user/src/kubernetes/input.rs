//! Kubernetes mode's input: the API server's stores, and what the agent remembers between
//! snapshots (pods located on the host, pods not enrollable yet, policy versions).
use std::{
    collections::HashMap, net::IpAddr, path::PathBuf, sync::atomic::Ordering, time::Duration,
};

use anyhow::{Context, Result};

use crate::{config::Config, enroll::Applied, metrics::Metrics};

/// A pod of this node still not enrollable after this gets an Event.
pub const NOT_ENROLLED_EVENT_AFTER: Duration = Duration::from_secs(5);

/// Kubernetes mode: the API server's stores, and what the agent remembers between snapshots.
pub struct KubeInput {
    pub cluster: crate::kubernetes::Cluster,
    /// This node, and how the other nodes' agents are recognised.
    pub scope: crate::kubernetes::snapshot::Scope,
    pub cgroup_root: PathBuf,
    pub proc_root: PathBuf,
    pub policies: crate::kubernetes::snapshot::Policies,
    /// Pod UID -> (addresses, cgroup, netns) found on the host. Kept so a pod keeps the same
    /// netns path (the same process) for as long as its addresses do not change.
    pub located: HashMap<String, (Vec<IpAddr>, PathBuf, PathBuf)>,
    /// Pods of this node not enrolled yet, by `namespace/name`.
    pub not_enrolled: HashMap<String, Pending>,
    /// Snapshot warnings last logged.
    pub warnings: Vec<String>,
    pub events: Option<crate::kubernetes::events::Events>,
    /// Pods the last snapshot wanted enrolled (some may have failed to enroll).
    pub last_wanted: usize,
    /// `policies.generation` when last applied.
    pub applied_generation: u64,
}

impl KubeInput {
    pub async fn connect(cfg: &Config) -> Result<KubeInput> {
        use crate::kubernetes;
        let node = cfg
            .kubernetes
            .node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .filter(|n| !n.is_empty())
            .context("Kubernetes mode needs this node's name: --node-name, kubernetes.nodeName or $NODE_NAME")?;
        // The kubepods hierarchy is found below the cgroup the programs attach to.
        let cgroup_root = match &cfg.agent.cgroup_root {
            Some(p) => p.clone(),
            None => crate::kernel::cgroup2_mount()?,
        };
        let client = kubernetes::client(cfg.kubernetes.kubeconfig.as_deref()).await?;
        tracing::info!(node = %node, "connecting to the API server");
        let cluster = kubernetes::Cluster::start(client.clone(), None).await?;
        tracing::info!(
            pods = cluster.pods.state().len(),
            api = %cluster.istio_api_version,
            "first lists received from the API server"
        );
        let events = cfg
            .kubernetes
            .events
            .then(|| kubernetes::events::Events::new(client, &node));
        let agents = &cfg.kubernetes.agent_pods;
        let scope = crate::kubernetes::snapshot::Scope {
            node,
            enroll_all: cfg.kubernetes.enroll_all_pods,
            agent_namespace: agents.namespace.clone().unwrap_or_else(own_namespace),
            agent_labels: (&agents.labels).into(),
        };
        tracing::info!(namespace = %scope.agent_namespace, labels = ?agents.labels, "other nodes' agents are recognised by");
        Ok(KubeInput {
            cluster,
            scope,
            cgroup_root,
            proc_root: cfg.kubernetes.proc_root.clone(),
            policies: Default::default(),
            located: HashMap::new(),
            not_enrolled: HashMap::new(),
            warnings: Vec::new(),
            events,
            last_wanted: 0,
            applied_generation: 0,
        })
    }

    /// `base` with this moment's pods, workloads and services, and the valid policies.
    pub fn snapshot(
        &mut self,
        base: &Config,
        metrics: &Metrics,
    ) -> (Config, crate::policy::PolicySet) {
        // A pod found on the host stays found while it keeps its addresses (a sandbox restart
        // gives it new ones, and maybe another netns).
        let store = &self.cluster.pods;
        let addresses = |uid: &str| store.get(uid).map(|p| p.ips.to_vec());
        self.located
            .retain(|uid, (ips, _, _)| addresses(uid).as_ref() == Some(ips));
        let root = self.cgroup_root.clone();
        let proc_root = self.proc_root.clone();
        let located = &mut self.located;
        let mut locate = |uid: &str| {
            if let Some((_, cg, ns)) = located.get(uid) {
                return Ok((cg.clone(), ns.clone()));
            }
            let (cg, ns) = crate::kubernetes::discover::locate(&root, &proc_root, uid)?;
            let ips = addresses(uid).unwrap_or_default();
            located.insert(uid.to_string(), (ips, cg.clone(), ns.clone()));
            Ok((cg, ns))
        };
        let d = self.cluster.desired(&self.scope, &mut locate);
        let mut now = HashMap::new();
        for p in d.not_enrolled {
            let key = format!("{}/{}", p.namespace, p.name);
            let mut pending = match self.not_enrolled.remove(&key) {
                Some(old) if old.pod.reason == p.reason => old,
                _ => {
                    tracing::info!(pod = %key, "pod not enrolled yet, retrying: {}", p.reason);
                    Pending {
                        pod: p,
                        since: std::time::Instant::now(),
                        reported: false,
                    }
                }
            };
            // A sandbox starting takes a moment; a pod still not enrollable after that is
            // reported where its owner looks.
            if !pending.reported && pending.since.elapsed() >= NOT_ENROLLED_EVENT_AFTER {
                pending.reported = true;
                tracing::warn!(pod = %key, "pod cannot be enrolled: {}", pending.pod.reason);
                if let Some(ev) = &self.events {
                    let (ev, pod) = (ev.clone(), pending.pod.clone());
                    tokio::spawn(async move { ev.pod_not_enrolled(&pod).await });
                }
            }
            now.insert(key, pending);
        }
        self.not_enrolled = now;
        if d.warnings != self.warnings {
            for w in &d.warnings {
                tracing::warn!("{w}");
            }
            self.warnings = d.warnings.clone();
        }
        metrics
            .pods_not_enrolled
            .store(self.not_enrolled.len() as u64, Ordering::Relaxed);

        let (set, reports) = self.policies.update(
            &self.cluster.istio_api_version,
            &self.cluster.request_authentications.state(),
            &self.cluster.authorization_policies.state(),
        );
        for r in reports {
            let bad = r.problems.iter().any(|p| !p.warning);
            for p in &r.problems {
                if p.warning {
                    tracing::warn!("{p}");
                } else {
                    tracing::error!("{p}");
                }
            }
            if bad {
                metrics.policies_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    object = %format!("{} {}/{}", r.kind, r.namespace, r.name),
                    "{}",
                    if r.kept_previous { "not enforced; its previous valid version stays in force" } else { "not enforced" }
                );
            }
            if let Some(ev) = &self.events {
                let ev = ev.clone();
                tokio::spawn(async move { ev.publish(&r).await });
            }
        }
        // Only the settings of `base`: its pods and workloads are about to be replaced.
        let cfg = Config {
            agent: base.agent.clone(),
            kubernetes: base.kubernetes.clone(),
            pods: d.pods,
            peers: d.peers,
            services: d.services,
            policies: vec![],
            workloads: vec![],
        };
        (cfg, set)
    }

    /// Some pod of this node waits to be enrolled, or an address to be enforced.
    pub fn pending(&self, applied: &Applied) -> bool {
        !self.not_enrolled.is_empty()
            || applied.needs_retry()
            || applied.pods.len() < self.last_wanted
    }
}

/// A pod of this node that cannot be enrolled yet.
pub struct Pending {
    pub pod: crate::kubernetes::snapshot::NotEnrolled,
    pub since: std::time::Instant,
    /// Warned about and posted as an Event on the pod.
    pub reported: bool,
}

/// The agent's own namespace, as its service account says (in a pod), else the manifests'.
fn own_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "authz-system".into())
}
