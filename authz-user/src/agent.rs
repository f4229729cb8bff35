//! `authz-agent run`: bring the kernel path up, enroll the pods, serve, and take it all down on
//! SIGINT/SIGTERM.
use std::{
    path::Path,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    admin::{self, Admin},
    engine,
    jwt::cache::TokenCache,
    config::Config,
    kernel::Kernel,
    metrics::Metrics,
    netns,
    proxy::{self, PodListeners, Proxy},
    registry::Registry,
};

/// How often the agent proves it is alive to the programs, and when they stop trusting it.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);
const HEARTBEAT_STALE: Duration = Duration::from_secs(2);

pub fn run(config_path: &Path) -> Result<()> {
    let cfg = Config::load(config_path)?;
    netns::init().context("opening the agent's own netns")?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.agent.worker_threads > 0 {
        rt.worker_threads(cfg.agent.worker_threads);
    }
    rt.enable_all().build()?.block_on(run_async(cfg))
}

async fn run_async(cfg: Config) -> Result<()> {
    let registry = Arc::new(Registry::from_config(&cfg));
    let shared_registry = Arc::new(std::sync::RwLock::new(registry.clone()));
    let store = engine::jwks_store(&cfg, &shared_registry)?;
    let cache = Arc::new(TokenCache::new(cfg.agent.token_cache_size));
    let (eng, set) = engine::build(&cfg, Some(&store), cache.clone());
    for p in &set.problems {
        if p.warning {
            tracing::warn!("{p}");
        } else {
            tracing::error!("{p}");
        }
    }
    if !set.is_valid() {
        return Err(crate::config::ConfigError::Invalid { path: "policies".into(), message: "invalid policies (see above)".into() }.into());
    }
    tracing::info!(request_authentications = eng.index().request_authentications, authorization_policies = eng.index().authorization_policies, "policies loaded");
    let metrics = Arc::new(Metrics::default());
    let kernel = Arc::new(Kernel::load(cfg.agent.cgroup_root.as_deref())?);
    tracing::info!(cgroup = %kernel.cgroup_root.display(), "eBPF programs attached");
    kernel.spawn_log_pump();
    kernel.heartbeat(cfg.agent.fail_mode, HEARTBEAT_STALE)?;

    let admin = Arc::new(Admin {
        ready: false.into(),
        metrics: metrics.clone(),
        kernel: Some(kernel.clone()),
        dump: std::sync::RwLock::new(serde_yaml::to_string(&cfg).unwrap_or_default()),
    });
    let admin_listener = admin::bind(cfg.agent.admin).await?;
    tokio::spawn(admin::serve(admin.clone(), admin_listener));

    let px = Arc::new(Proxy {
        kernel: kernel.clone(),
        metrics: metrics.clone(),
        settings: cfg.agent.clone(),
        engine: std::sync::RwLock::new(Arc::new(eng)),
        registry: shared_registry.clone(),
    });

    // Listeners first, then enrollment: a pod is never redirected to a port nobody listens on.
    let mut enrolled = Vec::new();
    let mut servers = tokio::task::JoinSet::new();
    for pod in &registry.pods {
        let pl = PodListeners::open(pod.clone(), cfg.agent.port)?;
        let id = kernel.enroll(&pod.cgroup, pod.id, cfg.agent.port).with_context(|| {
            format!("pod {}/{}: enrolling cgroup {}", pod.workload.namespace, pod.workload.name, pod.cgroup.display())
        })?;
        tracing::info!(pod = %format!("{}/{}", pod.workload.namespace, pod.workload.name), cgroup_id = id, "pod enrolled");
        enrolled.push(id);
        servers.spawn(proxy::serve(px.clone(), pl));
    }
    let mut enforced = Vec::new();
    for (ip, w) in &registry.by_ip {
        kernel.enforce(*ip, 0)?;
        tracing::info!(ip = %ip, workload = %format!("{}/{}", w.namespace, w.name), "destination enforced");
        enforced.push(*ip);
    }

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
    tracing::info!(pods = registry.pods.len(), workloads = enforced.len(), admin = %cfg.agent.admin, "agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    admin.ready.store(false, Ordering::Release);
    // Stop steering first, then close the listeners, then detach the programs.
    for id in enrolled {
        let _ = kernel.release(id);
    }
    for ip in enforced {
        let _ = kernel.unenforce(ip);
    }
    servers.abort_all();
    while servers.join_next().await.is_some() {}
    stop_heartbeat.store(true, Ordering::Relaxed);
    let _ = hb.join();
    drop(px);
    drop(admin);
    match Arc::try_unwrap(kernel) {
        Ok(k) => drop(k),
        Err(_) => tracing::debug!("kernel handle still shared at exit; detached by process exit"),
    }
    tracing::info!("detached; bye");
    Ok(())
}
