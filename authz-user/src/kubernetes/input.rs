//! Kubernetes mode's source: the API server's stores, and what the agent remembers between
//! snapshots (pods located on the host, pods not enrollable yet, policy versions).
use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::IpAddr,
    path::PathBuf,
    pin::Pin,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    cni::{ClaimState, Claims},
    config::{Config, PodSpec},
    enroll::{Applied, PodKey},
    metrics::Metrics,
    source::{Source, Update},
    waiting::Waiting,
    world::{Identity, NodePod, World},
};

/// How long events may keep arriving before the agent applies them together.
const SETTLE: Duration = Duration::from_millis(50);
const SETTLE_MAX: Duration = Duration::from_secs(5);

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
    /// The mesh ConfigMap's resourceVersion last read (None: there is none).
    mesh_version: Option<String>,
    /// What was last logged about the providers and the CUSTOM policies naming them.
    mesh_problems: Vec<String>,
    /// Pods the CNI plugin handed over (None: the plugin is not in use), and for how long one
    /// the API server does not confirm is held.
    pub claims: Option<Claims>,
    pub reconcile_within: Duration,
    /// The pods the last snapshot wanted enrolled.
    wanted: HashSet<PodKey>,
    /// Claims given up by the last snapshot, and why (told to the plugin, then forgotten).
    withdrawn: HashMap<String, String>,
    /// Claims the API server has not confirmed yet, as of the last snapshot.
    unconfirmed: usize,
    /// When the last read started, until its cost is taken; what reading and applying it
    /// cost, and when that ended (for pacing).
    read_started: Option<Instant>,
    last_cost: Duration,
    last_end: Instant,
}

impl KubeInput {
    pub async fn connect(cfg: &Config, claims: Option<Claims>) -> Result<KubeInput> {
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
        let mesh = &cfg.kubernetes.mesh_config;
        let cluster = kubernetes::Cluster::start(
            client.clone(),
            None,
            (mesh.namespace.clone(), mesh.name.clone()),
        )
        .await?;
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
            mesh_version: None,
            mesh_problems: Vec::new(),
            claims,
            reconcile_within: cfg.kubernetes.cni.reconcile_within,
            wanted: HashSet::new(),
            withdrawn: HashMap::new(),
            unconfirmed: 0,
            read_started: None,
            last_cost: Duration::ZERO,
            last_end: Instant::now(),
        })
    }

    /// This moment's world (pods, services, peers), and the valid policies.
    pub fn snapshot(&mut self, metrics: &Metrics) -> (World, crate::policy::PolicySet) {
        // A pod found on the host stays found while it keeps its addresses (a sandbox restart
        // gives it new ones, and maybe another netns).
        let store = &self.cluster.pods;
        let addresses = |uid: &str| store.get(uid).map(|p| p.ips.to_vec());
        self.located
            .retain(|uid, (ips, _, _)| addresses(uid).as_ref() == Some(ips));
        let root = self.cgroup_root.clone();
        let proc_root = self.proc_root.clone();
        let located = &mut self.located;
        // A pod the CNI plugin handed over is where the runtime said, with the addresses its
        // network plugin gave it: found before any process of it runs.
        let claims = self.claims.as_ref().map(Claims::all).unwrap_or_default();
        let claimed: HashMap<&str, &crate::cni::Claim> =
            claims.iter().map(|c| (c.pod.uid.as_str(), c)).collect();
        let mut locate = |uid: &str| {
            use crate::kubernetes::snapshot::Located;
            if let Some(c) = claimed.get(uid) {
                return Ok(Located {
                    cgroup: crate::kubernetes::discover::find_cgroup(&root, uid)?,
                    netns: c.pod.netns.clone(),
                    ips: Some(c.pod.ips.clone()),
                });
            }
            if let Some((_, cg, ns)) = located.get(uid) {
                return Ok((cg.clone(), ns.clone()).into());
            }
            let (cg, ns) = crate::kubernetes::discover::locate(&root, &proc_root, uid)?;
            let ips = addresses(uid).unwrap_or_default();
            located.insert(uid.to_string(), (ips, cg.clone(), ns.clone()));
            Ok((cg, ns).into())
        };
        let mut d = self.cluster.desired(&self.scope, &mut locate);
        self.claimed_pods(&claims, &mut d, metrics);
        let mut now = HashMap::new();
        for p in d.not_enrolled {
            let key = format!("{}/{}", p.namespace, p.name);
            let prev = self.not_enrolled.remove(&key).map(|n| n.waiting);
            let (mut waiting, news) = Waiting::renew(prev, p.reason.to_string());
            if news {
                tracing::info!(pod = %key, "pod not enrolled yet, retrying: {}", p.reason);
            }
            // A sandbox starting takes a moment; a pod still not enrollable after that is
            // reported where its owner looks.
            if waiting.report_due() {
                tracing::warn!(pod = %key, "pod cannot be enrolled: {}", p.reason);
                if let Some(ev) = &self.events {
                    let (ev, pod) = (ev.clone(), p.clone());
                    tokio::spawn(async move { ev.pod_not_enrolled(&pod).await });
                }
            }
            now.insert(key, Pending { pod: p, waiting });
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

        let (mut set, reports) = self.policies.update(
            &self.cluster.istio_api_version,
            &self.cluster.request_authentications.state(),
            &self.cluster.authorization_policies.state(),
        );
        self.mesh_providers(&mut set);
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
        self.wanted = d
            .pods
            .iter()
            .map(|p| (p.spec.namespace.clone(), p.spec.name.clone()))
            .collect();
        let world = World {
            pods: d.pods,
            workloads: vec![],
            services: d.services,
            peers: d.peers,
        };
        (world, set)
    }

    /// The mesh ConfigMap's `extensionProviders` into `set`; a changed ConfigMap counts as a
    /// policy change. Problems are logged once per version of it.
    fn mesh_providers(&mut self, set: &mut crate::policy::PolicySet) {
        let (ns, name) = &self.cluster.mesh_config_at;
        let cm = self
            .cluster
            .mesh_config
            .state()
            .into_iter()
            .find(|c| c.metadata.name.as_deref() == Some(name.as_str()));
        let version = cm
            .as_ref()
            .map(|c| c.metadata.resource_version.clone().unwrap_or_default());
        let text = cm
            .as_ref()
            .and_then(|c| c.data.as_ref()?.get("mesh").cloned())
            .unwrap_or_default();
        let origin = format!("ConfigMap {ns}/{name} (mesh)");
        let before = set.problems.len();
        crate::policy::load::add_mesh_providers(set, &text, &origin);
        let of_mesh = set.problems.len();
        set.check_custom();
        if version != self.mesh_version {
            self.mesh_version = version;
            self.policies.generation += 1;
            tracing::info!(
                providers = set.extension_providers.len(),
                "extension providers read from {origin}"
            );
        }
        // Problems with the providers, or CUSTOM policies naming none: logged when they change.
        let problems: Vec<String> = set.problems[before..]
            .iter()
            .map(|p| p.to_string())
            .collect();
        if problems != self.mesh_problems {
            for (p, text) in set.problems[before..].iter().zip(&problems) {
                if p.warning {
                    tracing::warn!("{text}");
                } else {
                    tracing::error!("{text}");
                }
            }
            self.mesh_problems = problems;
            // The ConfigMap's own problems go back to it as an Event (the CUSTOM policies'
            // are in the log, and in `validate`).
            let own = set.problems[before..of_mesh].to_vec();
            if let (Some(ev), Some(cm), false) = (&self.events, &cm, own.is_empty()) {
                let r = crate::kubernetes::snapshot::Report {
                    kind: "ConfigMap".into(),
                    api_version: "v1".into(),
                    namespace: ns.clone(),
                    name: name.clone(),
                    uid: cm.metadata.uid.clone().unwrap_or_default(),
                    problems: own,
                    kept_previous: false,
                };
                let ev = ev.clone();
                tokio::spawn(async move { ev.mesh_config(&r).await });
            }
        }
    }

    /// Claims the API server has not confirmed: enrolled with a claimed identity while they are
    /// young, withdrawn once `reconcile_within` passed or when the API server places the pod
    /// elsewhere. Claims the API server confirms were located by `desired` already.
    fn claimed_pods(
        &mut self,
        claims: &[crate::cni::Claim],
        d: &mut crate::kubernetes::snapshot::Desired,
        metrics: &Metrics,
    ) {
        use crate::kubernetes::snapshot::NotEnrolled;
        self.unconfirmed = 0;
        metrics
            .cni_claims
            .store(claims.len() as u64, Ordering::Relaxed);
        for c in claims {
            let p = &c.pod;
            let why = match self.cluster.pods.get(&p.uid) {
                Some(r) if *r.node != *self.scope.node => Some(format!(
                    "the API server has pod {}/{} on node {:?}, not this one",
                    r.namespace(),
                    r.name(),
                    r.node
                )),
                Some(r) if r.host_network => Some(format!(
                    "the API server has pod {}/{} on the host's network",
                    r.namespace(),
                    r.name()
                )),
                Some(r) => {
                    if (r.namespace(), r.name()) != (p.namespace.as_str(), p.name.as_str()) {
                        tracing::warn!(uid = %p.uid, claimed = %format!("{}/{}", p.namespace, p.name), api = %format!("{}/{}", r.namespace(), r.name()), "the CNI plugin named the pod otherwise; the API server's name holds");
                    }
                    continue;
                }
                // Given up only once the API server has spoken since the claim and still has no
                // such pod: an outage (or a watch gone quiet) keeps the pod enrolled and refused.
                None if c.age() > self.reconcile_within
                    && self
                        .cluster
                        .pods
                        .heard()
                        .is_some_and(|h| h > c.made() + Duration::from_secs(1)) =>
                {
                    Some(format!(
                        "the API server has no pod {}/{} with uid {} after {:?}",
                        p.namespace, p.name, p.uid, self.reconcile_within
                    ))
                }
                None => None,
            };
            if let Some(why) = why {
                tracing::warn!(pod = %format!("{}/{}", p.namespace, p.name), sandbox = %p.container_id, "CNI claim withdrawn: {why}");
                metrics.cni_claims_withdrawn.fetch_add(1, Ordering::Relaxed);
                self.withdrawn.insert(p.container_id.clone(), why);
                continue;
            }
            // Not known to the API server yet (a watch behind, or an outage): enrolled, but no
            // policy selects it until it is known, so connections to it are refused.
            self.unconfirmed += 1;
            match crate::kubernetes::discover::find_cgroup(&self.cgroup_root, &p.uid) {
                Ok(cgroup) => d.pods.push(NodePod {
                    spec: PodSpec {
                        name: p.name.clone(),
                        namespace: p.namespace.clone(),
                        labels: Default::default(),
                        service_account: String::new(),
                        netns: p.netns.clone(),
                        cgroup,
                        ips: p.ips.clone(),
                        inbound: true,
                        exclude_inbound_ports: vec![],
                    },
                    probes: vec![],
                    identity: Identity::Claimed,
                }),
                Err(reason) => d.not_enrolled.push(NotEnrolled {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    uid: p.uid.clone(),
                    reason,
                }),
            }
        }
    }

    /// What became of each claim after an apply.
    fn claim_states(&mut self, applied: &Applied) -> HashMap<String, ClaimState> {
        let Some(claims) = &self.claims else {
            return HashMap::new();
        };
        let mut states: HashMap<String, ClaimState> = self
            .withdrawn
            .drain()
            .map(|(id, why)| (id, ClaimState::Withdrawn(why)))
            .collect();
        for c in claims.all() {
            let p = &c.pod;
            if states.contains_key(&p.container_id) {
                continue;
            }
            // The API server's name for the pod, when it knows it.
            let key: PodKey = match self.cluster.pods.get(&p.uid) {
                Some(r) => (r.namespace().to_string(), r.name().to_string()),
                None => (p.namespace.clone(), p.name.clone()),
            };
            let state = if applied
                .pods
                .get(&key)
                .is_some_and(|e| e.spec.spec.netns == p.netns)
            {
                ClaimState::Enrolled
            } else if let Some(w) = applied.pending.get(&key) {
                ClaimState::Pending(w.waiting.reason().to_string())
            } else if let Some(n) = self.not_enrolled.get(&format!("{}/{}", key.0, key.1)) {
                ClaimState::Pending(n.waiting.reason().to_string())
            } else if !self.wanted.contains(&key) {
                ClaimState::NotEnrolled
            } else {
                ClaimState::Pending("being enrolled".into())
            };
            states.insert(p.container_id.clone(), state);
        }
        states
    }

    /// The first world, from the first full lists.
    pub fn first(&mut self, metrics: &Metrics) -> (World, crate::policy::PolicySet) {
        let (world, set) = self.snapshot(metrics);
        self.applied_generation = self.policies.generation;
        self.last_wanted = world.pods.len();
        (world, set)
    }

    /// Some pod of this node waits to be enrolled, or an address to be enforced.
    pub fn pending(&self, applied: &Applied) -> bool {
        !self.not_enrolled.is_empty()
            || applied.needs_retry()
            || applied.pods.len() < self.last_wanted
    }
}

/// A pod of this node that cannot be located yet.
pub struct Pending {
    pub pod: crate::kubernetes::snapshot::NotEnrolled,
    pub waiting: Waiting,
}

/// The agent's own namespace, as its service account says (in a pod), else the manifests'.
fn own_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "authz-system".into())
}

impl Source for KubeInput {
    /// A store changed. A burst of events (a relist, `kubectl apply -f dir/`) settles into one
    /// update, and on a large, busy cluster updates keep to about a tenth of a core: the next
    /// starts no sooner than nine times the last one's cost after it ended. After a quiet spell
    /// a change waits only for the burst to settle.
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        // A pod handed over by the CNI plugin waits in the runtime: read at once.
        let claimed = self.claims.as_ref().map(|c| c.changed.clone());
        // Called again right after the last read was applied: that read's cost ends here.
        if let Some(started) = self.read_started.take() {
            self.last_end = Instant::now();
            self.last_cost = self.last_end.saturating_duration_since(started);
        }
        let changed = self.cluster.changed.clone();
        let duty = self.last_cost * 9;
        Box::pin(async move {
            let claim = async {
                match &claimed {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed.notified() => {
                    let wait = duty.saturating_sub(self.last_end.elapsed());
                    tokio::time::sleep(wait.clamp(SETTLE, SETTLE_MAX)).await;
                }
                _ = claim => {}
            }
        })
    }

    fn read(&mut self, current: &World, metrics: &Metrics) -> Result<Option<Update>> {
        self.read_started = Some(Instant::now());
        let (world, set) = self.snapshot(metrics);
        // Most events (pod status churn, objects the agent does not read) change nothing here.
        let policies_changed = self.policies.generation != self.applied_generation;
        if world == *current && !policies_changed {
            return Ok(None);
        }
        self.last_wanted = world.pods.len();
        self.applied_generation = self.policies.generation;
        // The engine is rebuilt only when policies changed: pods and services coming and going
        // on a large cluster must not recompile every policy.
        Ok(Some(Update {
            world,
            policies: policies_changed.then_some(set),
        }))
    }

    fn retrying(&self, applied: &Applied) -> bool {
        // A young claim not confirmed yet is looked at again until it is, or withdrawn.
        self.pending(applied) || self.unconfirmed > 0
    }

    /// Tells the CNI plugin's waiting ADDs what became of their pods; pods whose enrollment
    /// keeps failing get an Event, once per reason.
    fn applied(&mut self, applied: &mut Applied) {
        let states = self.claim_states(applied);
        if let Some(c) = &self.claims {
            c.publish(states);
        }
        let Some(ev) = &self.events else { return };
        for ((ns, name), p) in applied.pending.iter_mut() {
            if p.waiting.report_due() {
                let (ev, ns, name, reason) = (
                    ev.clone(),
                    ns.clone(),
                    name.clone(),
                    p.waiting.reason().to_string(),
                );
                tokio::spawn(async move { ev.pod_pending(&ns, &name, &reason).await });
            }
        }
    }
}
