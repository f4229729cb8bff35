//! `authz-agent run`: bring the kernel path up, enroll the pods, serve, follow changes to the
//! config and policy files, and take it all down on SIGINT/SIGTERM.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    task::AbortHandle,
};

use crate::{
    admin::{self, Admin},
    config::{Config, PodSpec},
    engine,
    jwt::{cache::TokenCache, remote::JwksStore},
    kernel::Kernel,
    metrics::Metrics,
    netns,
    proxy::{self, PodListeners, Proxy},
    registry::Registry,
};

/// How often the agent proves it is alive to the programs, and when they stop trusting it.
/// The programs apply the fail mode once the heartbeat is older than HEARTBEAT_STALE: well
/// within a second of the agent dying, with room for a heartbeat thread delayed by load.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
const HEARTBEAT_STALE: Duration = Duration::from_millis(700);
/// How often config and policy files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Kubernetes mode: how long events may keep arriving before the agent applies them together.
const KUBE_SETTLE: Duration = Duration::from_millis(50);
const KUBE_SETTLE_MAX: Duration = Duration::from_secs(5);
/// Kubernetes mode: how often pods of this node that could not be enrolled (not started yet,
/// say) are tried again.
const RETRY_ENROLL_EVERY: Duration = Duration::from_secs(1);
/// Kubernetes mode: a pod of this node still not enrollable after this gets an Event.
const NOT_ENROLLED_EVENT_AFTER: Duration = Duration::from_secs(5);

/// Where pods, services and policies come from.
pub enum Source {
    /// The config file and the policy files it names, watched for changes.
    File(PathBuf),
    /// The API server (`kubernetes:` in the config, or `run --kubernetes`).
    Kubernetes,
}

/// `config`: the config file (optional in Kubernetes mode). `kubernetes`: force Kubernetes mode.
pub fn run(
    config: Option<&Path>,
    kubernetes: bool,
    kubeconfig: Option<PathBuf>,
    node_name: Option<String>,
) -> Result<()> {
    let mut cfg = match config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    // With no config file, running in a pod means Kubernetes mode.
    let in_cluster = config.is_none() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    cfg.kubernetes.enabled |= kubernetes || in_cluster;
    if kubeconfig.is_some() {
        cfg.kubernetes.kubeconfig = kubeconfig;
    }
    if node_name.is_some() {
        cfg.kubernetes.node_name = node_name;
    }
    let source = if cfg.kubernetes.enabled {
        {
            if !(cfg.pods.is_empty()
                && cfg.workloads.is_empty()
                && cfg.services.is_empty()
                && cfg.policies.is_empty())
            {
                return Err(crate::config::ConfigError::Invalid {
                    path: config.map(|p| p.display().to_string()).unwrap_or_default(),
                    message: "Kubernetes mode: pods, workloads, services and policies come from the API server; remove them from the file".into(),
                }
                .into());
            }
            Source::Kubernetes
        }
    } else {
        match config {
            Some(p) => Source::File(p.to_path_buf()),
            None => anyhow::bail!("--config is required outside Kubernetes mode"),
        }
    };
    netns::init().context("opening the agent's own netns")?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.agent.worker_threads > 0 {
        rt.worker_threads(cfg.agent.worker_threads);
    }
    rt.enable_all().build()?.block_on(run_async(source, cfg))
}

/// An enrolled pod and the task serving its listeners.
struct Enrolled {
    spec: PodSpec,
    cgroup_id: u64,
    server: AbortHandle,
}

/// What the agent has put in the kernel and started, so a reload can change just the difference.
struct State {
    pods: HashMap<(String, String), Enrolled>,
    /// Pods that should be enrolled and are not (yet): retried every second.
    pending: HashMap<(String, String), PendingPod>,
    enforced: HashSet<IpAddr>,
    /// Destination addresses the kernel refused last time: retried every second.
    failed_ips: HashSet<IpAddr>,
}

/// A pod whose enrollment failed. With a cgroup id, its kernel entry is in place with no port:
/// its connections to enforced destinations are refused until it is enrolled.
struct PendingPod {
    spec: PodSpec,
    cgroup_id: Option<u64>,
    reason: String,
    since: std::time::Instant,
    /// Posted as an Event on the pod (Kubernetes mode).
    reported: bool,
}

fn log_problems(set: &crate::policy::PolicySet) {
    for p in &set.problems {
        if p.warning {
            tracing::warn!("{p}");
        } else {
            tracing::error!("{p}");
        }
    }
}

async fn run_async(source: Source, cfg: Config) -> Result<()> {
    // The admin endpoint first: alive (and not ready) while the API server is awaited.
    let metrics = Arc::new(Metrics::default());
    let admin = Arc::new(Admin {
        ready: false.into(),
        metrics: metrics.clone(),
        kernel: Default::default(),
        dump: RwLock::new(Arc::new(cfg.clone())),
    });
    let admin_listener = admin::bind(cfg.agent.admin).await?;
    tokio::spawn(admin::serve(admin.clone(), admin_listener));
    // What to enforce first: from the files, or from the API server's first full lists.
    let (mut kube, config_path) = match source {
        Source::Kubernetes => (Some(KubeInput::connect(&cfg).await?), PathBuf::new()),
        Source::File(path) => (None, path),
    };
    let (cfg, set) = match &mut kube {
        Some(k) => {
            let (cfg, set) = k.snapshot(&cfg, &metrics);
            k.applied_generation = k.policies.generation;
            k.last_wanted = cfg.pods.len();
            (cfg, set)
        }
        None => {
            let set = crate::policy::load_paths(&cfg.policies);
            log_problems(&set);
            if !set.is_valid() {
                return Err(crate::config::ConfigError::Invalid {
                    path: "policies".into(),
                    message: "invalid policies (see above)".into(),
                }
                .into());
            }
            (cfg, set)
        }
    };
    let registry = Arc::new(Registry::from_config(&cfg));
    let shared_registry = Arc::new(RwLock::new(registry.clone()));
    let store = engine::jwks_store(&cfg, &shared_registry)?;
    let cache = Arc::new(TokenCache::new(cfg.agent.token_cache_size));
    let eng = engine::build_from(&cfg.agent, &set, Some(&store), cache.clone());
    drop(set);
    tracing::info!(
        request_authentications = eng.index().request_authentications,
        authorization_policies = eng.index().authorization_policies,
        "policies loaded"
    );
    let kernel = Arc::new(Kernel::load(
        cfg.agent.cgroup_root.as_deref(),
        &cfg.agent.bpffs,
    )?);
    tracing::info!(
        cgroup = %kernel.cgroup_root.display(),
        bpffs = %cfg.agent.bpffs.display(),
        adopted = kernel.adopted,
        "eBPF programs attached"
    );
    kernel.spawn_log_pump();
    kernel.heartbeat(cfg.agent.fail_mode, HEARTBEAT_STALE)?;

    let _ = admin.kernel.set(kernel.clone());
    *admin.dump.write().unwrap() = Arc::new(cfg.clone());

    let nofile = crate::limits::raise_nofile();
    let max_connections = crate::limits::connection_cap(cfg.agent.max_connections, nofile);
    if cfg.agent.max_connections > max_connections {
        tracing::warn!(
            asked = cfg.agent.max_connections,
            nofile,
            "agent.maxConnections lowered to {max_connections} to fit the descriptor limit"
        );
    }
    if cfg.agent.port.is_some() {
        tracing::warn!(
            "agent.port is ignored: each pod's listener takes a port picked at enrollment"
        );
    }
    metrics
        .connections_max
        .store(max_connections, Ordering::Relaxed);
    tracing::info!(nofile, max_connections, "descriptor limit");

    let (drain_tx, draining) = tokio::sync::watch::channel(false);
    let px = Arc::new(Proxy {
        max_connections,
        policies_changed: tokio::sync::watch::channel(0).0,
        kernel: kernel.clone(),
        metrics: metrics.clone(),
        settings: cfg.agent.clone(),
        engine: RwLock::new(Arc::new(eng)),
        registry: shared_registry.clone(),
        draining,
    });
    let mut state = State {
        pods: HashMap::new(),
        pending: HashMap::new(),
        enforced: HashSet::new(),
        failed_ips: HashSet::new(),
    };
    // From files, every pod must enroll at start; on reload, and always in Kubernetes mode
    // (pods come and go), a pod that cannot is reported and retried, never half-enrolled.
    apply_registry(&px, &mut state, &cfg, &registry);
    if kernel.adopted {
        forget_stale(&kernel, &state);
    }
    metrics
        .pods_enrolled
        .store(state.pods.len() as u64, Ordering::Relaxed);
    release_freed_memory();

    let hb_kernel = kernel.clone();
    let fail_mode = cfg.agent.fail_mode;
    let stop_heartbeat = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_hb = stop_heartbeat.clone();
    // A plain thread: a busy runtime must not make the agent look dead to the kernel.
    let hb = std::thread::spawn(move || {
        while !stop_hb.load(Ordering::Relaxed) {
            if let Err(e) = hb_kernel.heartbeat(fail_mode, HEARTBEAT_STALE) {
                tracing::warn!("heartbeat: {e:#}");
            }
            std::thread::sleep(HEARTBEAT_EVERY);
        }
    });

    admin.ready.store(true, Ordering::Release);
    tracing::info!(pods = state.pods.len(), workloads = state.enforced.len(), admin = %cfg.agent.admin, "agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut watch = tokio::time::interval(WATCH_EVERY);
    let mut retry = tokio::time::interval(RETRY_ENROLL_EVERY);
    let mut seen = fingerprint(&config_path, &cfg);
    let mut current = cfg;
    let mut last_cost = Duration::ZERO;
    loop {
        let changed = async {
            match &kube {
                Some(k) => k.cluster.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = watch.tick(), if kube.is_none() => {
                let now = fingerprint(&config_path, &current);
                if now == seen {
                    continue;
                }
                seen = now;
                match reload(&config_path, &current, &px, &mut state, &store, &cache) {
                    Ok(cfg) => {
                        metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
                        *admin.dump.write().unwrap() = Arc::new(cfg.clone());
                        seen = fingerprint(&config_path, &cfg);
                        current = cfg;
                    }
                    Err(e) => {
                        metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("reload rejected, the previous configuration and policies stay in force: {e:#}");
                    }
                }
            }
            _ = changed => {
                // Let a burst of events (a relist, `kubectl apply -f dir/`) settle into one
                // update, and on a large, busy cluster keep updates to about a tenth of a core.
                tokio::time::sleep((last_cost * 10).clamp(KUBE_SETTLE, KUBE_SETTLE_MAX)).await;
                let started = std::time::Instant::now();
                let k = kube.as_mut().expect("changed fires only in Kubernetes mode");
                current = apply_snapshot(k, &current, &px, &mut state, &store, &cache, &metrics);
                last_cost = started.elapsed();
                *admin.dump.write().unwrap() = Arc::new(current.clone());
            }
            _ = retry.tick(), if !state.pending.is_empty() || !state.failed_ips.is_empty() || kube.as_ref().is_some_and(|k| k.pending(&state)) => {
                match kube.as_mut() {
                    Some(k) => {
                        current = apply_snapshot(k, &current, &px, &mut state, &store, &cache, &metrics);
                    }
                    None => {
                        let registry = px.registry();
                        apply_registry(&px, &mut state, &current, &registry);
                        metrics.pods_enrolled.store(state.pods.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    metrics.pods_enrolled.store(0, Ordering::Relaxed);
    admin.ready.store(false, Ordering::Release);
    // The programs, maps and enrollments stay pinned: from here the fail mode applies to new
    // connections (or a successor agent takes them). Close the listeners, then let open
    // connections finish.
    stop_heartbeat.store(true, Ordering::Relaxed);
    let _ = hb.join();
    // Still serving: a successor agent on the same pins shows up as a heartbeat not ours.
    tokio::time::sleep(2 * HEARTBEAT_EVERY).await;
    if let Err(e) = kernel.stop_heartbeat(current.agent.fail_mode) {
        tracing::warn!("marking the agent gone: {e:#}");
    }
    for (_, p) in state.pods.drain() {
        p.server.abort();
    }
    // Idle HTTP connections close now, busy ones after their request; TCP relays run on.
    let _ = drain_tx.send(true);
    drain(&metrics, current.agent.drain_timeout).await;
    drop(px);
    drop(admin);
    drop(kernel);
    tracing::info!(
        bpffs = %current.agent.bpffs.display(),
        "stopped; enforcement stays pinned (`authz-agent cleanup` removes it)"
    );
    Ok(())
}

/// Waits for open connections to finish, at most `timeout`.
async fn drain(metrics: &Metrics, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let open = metrics.connections_active.load(Ordering::Relaxed)
            + metrics.connections_starting.load(Ordering::Relaxed);
        if open == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(open, "drain timeout: closing the remaining connections");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After adopting a previous agent's maps: pods and workloads it had that this configuration
/// does not have are released.
fn forget_stale(kernel: &Kernel, state: &State) {
    let ours: HashSet<u64> = state
        .pods
        .values()
        .map(|p| p.cgroup_id)
        .chain(state.pending.values().filter_map(|p| p.cgroup_id))
        .collect();
    for id in kernel.enrolled_ids() {
        if !ours.contains(&id) {
            let _ = kernel.release(id);
            tracing::info!(cgroup_id = id, "released a pod left by the previous agent");
        }
    }
    for ip in kernel.enforced_ips() {
        if !state.enforced.contains(&ip) {
            let _ = kernel.unenforce(ip);
            tracing::info!(%ip, "unenforced a workload left by the previous agent");
        }
    }
}

/// Start and reload parse whole YAML documents and the kernel's BTF; hand the freed memory back
/// to the system so the agent's footprint is what it keeps, not what it once needed.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe { libc::malloc_trim(0) };
}

/// Re-reads everything. A config or policy error changes nothing; once both are valid the new
/// policies are in force, and kernel operations that fail are retried (`apply_registry`).
fn reload(
    config_path: &Path,
    old: &Config,
    px: &Arc<Proxy>,
    state: &mut State,
    store: &Arc<JwksStore>,
    cache: &Arc<TokenCache>,
) -> Result<Config> {
    let cfg = Config::load(config_path)?;
    if cfg.agent != old.agent {
        tracing::warn!("changes under `agent:` need a restart; applying pods, workloads, services and policies only");
    }
    let mut cfg = cfg;
    cfg.agent = old.agent.clone();
    let set = crate::policy::load_paths(&cfg.policies);
    log_problems(&set);
    if !set.is_valid() {
        anyhow::bail!("invalid policies (see above)");
    }
    apply(px, state, &cfg, &set, store, cache);
    Ok(cfg)
}

/// Swaps in the engine and registry of `cfg` and `set`, then brings the kernel and the
/// listeners in line with them.
fn apply(
    px: &Arc<Proxy>,
    state: &mut State,
    cfg: &Config,
    set: &crate::policy::PolicySet,
    store: &Arc<JwksStore>,
    cache: &Arc<TokenCache>,
) {
    let eng = engine::build_from(&cfg.agent, set, Some(store), cache.clone());
    let registry = Arc::new(Registry::from_config(cfg));
    *px.registry.write().unwrap() = registry.clone();
    *px.engine.write().unwrap() = Arc::new(eng);
    // Open TCP relays re-check themselves against the new policies.
    px.policies_changed.send_modify(|g| *g += 1);
    apply_registry(px, state, cfg, &registry);
    px.metrics
        .pods_enrolled
        .store(state.pods.len() as u64, Ordering::Relaxed);
    release_freed_memory();
    tracing::info!(
        pods = state.pods.len(),
        workloads = state.enforced.len(),
        request_authentications = px.engine().index().request_authentications,
        authorization_policies = px.engine().index().authorization_policies,
        "applied"
    );
}

/// Kubernetes mode: the API server's stores, and what the agent remembers between snapshots.
struct KubeInput {
    cluster: crate::kubernetes::Cluster,
    node: String,
    cgroup_root: PathBuf,
    proc_root: PathBuf,
    enroll_all: bool,
    policies: crate::kubernetes::snapshot::Policies,
    /// Pod UID -> (addresses, cgroup, netns) found on the host. Kept so a pod keeps the same
    /// netns path (the same process) for as long as its addresses do not change.
    located: HashMap<String, (Vec<IpAddr>, PathBuf, PathBuf)>,
    /// Pods of this node not enrolled yet, by `namespace/name`.
    not_enrolled: HashMap<String, Pending>,
    /// Snapshot warnings last logged.
    warnings: Vec<String>,
    events: Option<crate::kubernetes::events::Events>,
    /// Pods the last snapshot wanted enrolled (some may have failed to enroll).
    last_wanted: usize,
    /// `policies.generation` when last applied.
    applied_generation: u64,
}

impl KubeInput {
    async fn connect(cfg: &Config) -> Result<KubeInput> {
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
        Ok(KubeInput {
            cluster,
            node,
            cgroup_root,
            proc_root: cfg.kubernetes.proc_root.clone(),
            enroll_all: cfg.kubernetes.enroll_all_pods,
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
    fn snapshot(&mut self, base: &Config, metrics: &Metrics) -> (Config, crate::policy::PolicySet) {
        let pods = self.cluster.pods.state();
        let live: HashMap<&str, Vec<IpAddr>> = pods
            .iter()
            .filter_map(|p| {
                let ips = p
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ips.as_ref())
                    .map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect())
                    .unwrap_or_default();
                Some((p.metadata.uid.as_deref()?, ips))
            })
            .collect();
        self.located
            .retain(|uid, (ips, _, _)| live.get(uid.as_str()) == Some(ips));
        let root = self.cgroup_root.clone();
        let proc_root = self.proc_root.clone();
        let located = &mut self.located;
        let mut locate = |uid: &str| {
            if let Some((_, cg, ns)) = located.get(uid) {
                return Ok((cg.clone(), ns.clone()));
            }
            let (cg, ns) = crate::kubernetes::discover::locate(&root, &proc_root, uid)?;
            let ips = live.get(uid).cloned().unwrap_or_default();
            located.insert(uid.to_string(), (ips, cg.clone(), ns.clone()));
            Ok((cg, ns))
        };
        let d = self
            .cluster
            .desired(&self.node, self.enroll_all, &mut locate);
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
            workloads: d.workloads,
            services: d.services,
            policies: vec![],
        };
        (cfg, set)
    }

    /// Some pod of this node waits to be enrolled.
    fn pending(&self, state: &State) -> bool {
        !self.not_enrolled.is_empty()
            || !state.pending.is_empty()
            || !state.failed_ips.is_empty()
            || state.pods.len() < self.last_wanted
    }
}

/// A pod of this node that cannot be enrolled yet.
struct Pending {
    pod: crate::kubernetes::snapshot::NotEnrolled,
    since: std::time::Instant,
    /// Warned about and posted as an Event on the pod.
    reported: bool,
}

/// Kubernetes mode: pods whose enrollment keeps failing get an Event, once per reason.
fn report_pending(k: &KubeInput, state: &mut State) {
    let Some(ev) = &k.events else { return };
    for ((ns, name), p) in state.pending.iter_mut() {
        if !p.reported && p.since.elapsed() >= NOT_ENROLLED_EVENT_AFTER {
            p.reported = true;
            let (ev, ns, name, reason) = (ev.clone(), ns.clone(), name.clone(), p.reason.clone());
            tokio::spawn(async move { ev.pod_pending(&ns, &name, &reason).await });
        }
    }
}

/// Kubernetes mode: applies what the stores hold now.
fn apply_snapshot(
    k: &mut KubeInput,
    current: &Config,
    px: &Arc<Proxy>,
    state: &mut State,
    store: &Arc<JwksStore>,
    cache: &Arc<TokenCache>,
    metrics: &Metrics,
) -> Config {
    let (cfg, set) = k.snapshot(current, metrics);
    // Most events (pod status churn, objects the agent does not read) change nothing here.
    let same = cfg.pods == current.pods
        && cfg.workloads == current.workloads
        && cfg.services == current.services
        && k.policies.generation == k.applied_generation;
    if same {
        if k.pending(state) {
            // Only enrollments to retry: the engine stays.
            let registry = px.registry();
            apply_registry(px, state, &cfg, &registry);
            metrics
                .pods_enrolled
                .store(state.pods.len() as u64, Ordering::Relaxed);
            report_pending(k, state);
        }
        return cfg;
    }
    k.last_wanted = cfg.pods.len();
    k.applied_generation = k.policies.generation;
    apply(px, state, &cfg, &set, store, cache);
    metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
    report_pending(k, state);
    cfg
}

/// Makes the kernel and the listeners match the registry: pods enrolled or released, workload
/// addresses enforced or not. A pod is first recorded pending (its connections to enforced
/// destinations refused), then its listener opens on a port of its own and the entry names it,
/// so a pod is never steered to a port nobody listens on, nor left to go direct. A pod that
/// cannot be enrolled stays pending, is reported and retried; it never stops the others.
fn apply_registry(px: &Arc<Proxy>, state: &mut State, cfg: &Config, registry: &Arc<Registry>) {
    let kernel = &px.kernel;
    let wanted: HashMap<(String, String), &PodSpec> = cfg
        .pods
        .iter()
        .map(|p| ((p.namespace.clone(), p.name.clone()), p))
        .collect();
    let gone: Vec<(String, String)> = state
        .pods
        .iter()
        .filter(|(k, e)| wanted.get(*k).is_none_or(|s| !same_enrollment(s, &e.spec)))
        .map(|(k, _)| k.clone())
        .collect();
    for k in gone {
        if let Some(e) = state.pods.remove(&k) {
            let _ = kernel.release(e.cgroup_id);
            e.server.abort();
            tracing::info!(pod = %format!("{}/{}", k.0, k.1), "pod released");
        }
    }
    let stale: Vec<(String, String)> = state
        .pending
        .iter()
        .filter(|(k, p)| wanted.get(*k).is_none_or(|s| !same_enrollment(s, &p.spec)))
        .map(|(k, _)| k.clone())
        .collect();
    for k in stale {
        if let Some(id) = state.pending.remove(&k).and_then(|p| p.cgroup_id) {
            let _ = kernel.release(id);
        }
    }
    for pod in &registry.pods {
        let key = (pod.workload.namespace.clone(), pod.workload.name.clone());
        if state.pods.contains_key(&key) {
            continue;
        }
        let spec = (*wanted[&key]).clone();
        let name = format!("{}/{}", key.0, key.1);
        let cgroup_id = state.pending.get(&key).and_then(|p| p.cgroup_id);
        match enroll(px, pod, cgroup_id) {
            Ok((cgroup_id, server, port)) => {
                state.pending.remove(&key);
                state.pods.insert(
                    key,
                    Enrolled {
                        spec,
                        cgroup_id,
                        server,
                    },
                );
                tracing::info!(pod = %name, cgroup_id, port, "pod enrolled");
            }
            Err((cgroup_id, e)) => {
                let reason = format!("{e:#}");
                match state.pending.get_mut(&key) {
                    Some(p) if p.reason == reason => p.cgroup_id = cgroup_id,
                    _ => {
                        tracing::error!(pod = %name, pending = cgroup_id.is_some(), "pod not enrolled, retrying: {reason}");
                        state.pending.insert(
                            key,
                            PendingPod {
                                spec,
                                cgroup_id,
                                reason,
                                since: std::time::Instant::now(),
                                reported: false,
                            },
                        );
                    }
                }
            }
        }
    }
    px.metrics
        .pods_pending
        .store(state.pending.len() as u64, Ordering::Relaxed);
    let ips: HashSet<IpAddr> = registry
        .by_ip
        .keys()
        .chain(registry.vips.keys())
        .copied()
        .collect();
    for ip in state.enforced.difference(&ips).copied().collect::<Vec<_>>() {
        if let Err(e) = kernel.unenforce(ip) {
            // Still enforced in the kernel: stricter, never looser; retried.
            tracing::error!(%ip, "destination not released, retrying: {e:#}");
            continue;
        }
        state.enforced.remove(&ip);
    }
    state.failed_ips.clear();
    for ip in ips {
        if !state.enforced.contains(&ip) {
            // Recorded as enforced only once the kernel has it; a failure leaves the rest
            // applied and is retried every second.
            if let Err(e) = kernel.enforce(ip) {
                tracing::error!(%ip, "destination not enforced yet, retrying: {e:#}");
                state.failed_ips.insert(ip);
                continue;
            }
            state.enforced.insert(ip);
            let name = match (registry.by_ip.get(&ip), registry.vips.get(&ip)) {
                (Some(w), _) => format!("{}/{}", w.namespace, w.name),
                (None, Some(s)) => format!("service {}/{}", s.namespace, s.name),
                _ => String::new(),
            };
            tracing::info!(ip = %ip, workload = %name, "destination enforced");
        }
    }
}

/// Enrolls one pod: pending entry, listeners, then the entry with their port. On error, returns
/// the cgroup id when the pending entry is in place.
fn enroll(
    px: &Arc<Proxy>,
    pod: &Arc<crate::registry::Pod>,
    known_id: Option<u64>,
) -> std::result::Result<(u64, AbortHandle, u16), (Option<u64>, anyhow::Error)> {
    let kernel = &px.kernel;
    let id = match known_id {
        Some(id) => id,
        None => crate::kernel::cgroup_id(&pod.cgroup).map_err(|e| (None, e))?,
    };
    // A previous agent's port (hot restart): listen beside it. Otherwise the pod is pending
    // until its listener is open.
    let reuse = kernel.enrolled_port(id);
    if reuse.is_none() {
        kernel.enroll(id, pod.id, 0).map_err(|e| (None, e))?;
    }
    let pl = PodListeners::open(pod.clone(), reuse).map_err(|e| (Some(id), e))?;
    let port = pl.port;
    kernel
        .enroll(id, pod.id, port)
        .with_context(|| format!("enrolling cgroup {}", pod.cgroup.display()))
        .map_err(|e| (Some(id), e))?;
    let server = tokio::spawn(proxy::serve(px.clone(), pl)).abort_handle();
    Ok((id, server, port))
}

/// Whether an enrolled pod can stay as it is: the same place on the host and the same identity.
/// Labels are not part of it (policies select destinations by labels, not sources), so a
/// relabelled pod keeps its open connections.
fn same_enrollment(a: &PodSpec, b: &PodSpec) -> bool {
    a.netns == b.netns
        && a.cgroup == b.cgroup
        && a.service_account == b.service_account
        && a.ips == b.ips
}

/// Modification times and sizes of the config file and every policy file.
fn fingerprint(config_path: &Path, cfg: &Config) -> Vec<(PathBuf, Option<(SystemTime, u64)>)> {
    let mut files = vec![config_path.to_path_buf()];
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                walk(&e.path(), out);
            }
        }
        out.push(p.to_path_buf());
    }
    for p in &cfg.policies {
        walk(p, &mut files);
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(&f)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            (f, m)
        })
        .collect()
}

/// `authz-agent cleanup`: detaches and unpins what agents left under `bpffs`.
pub fn cleanup(bpffs: &Path) -> Result<()> {
    let removed = crate::kernel::pin::cleanup(bpffs)?;
    println!(
        "{}: detached {} links, unpinned {} maps",
        bpffs.display(),
        removed.links,
        removed.maps
    );
    Ok(())
}
