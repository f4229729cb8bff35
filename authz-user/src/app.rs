//! The agent's lifecycle: `build` reads the first world from its source, loads the policies,
//! attaches the programs, binds the admin port and enrolls the pods, and returns the `App`
//! holding what it bound; `App::run` serves until SIGTERM/SIGINT, putting each new world from
//! the source in force as one state, then drains.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Result;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::{
    admin::{self, Admin},
    agent,
    config::{Config, FailMode},
    drain, engine,
    enroll::{self, Applied},
    jwt::{cache::TokenCache, remote::JwksStore},
    kernel::Kernel,
    kubernetes::input::KubeInput,
    metrics::Metrics,
    policy::PolicySet,
    proxy::Proxy,
    readiness::Readiness,
    source::{FileSource, Source},
    state::{InForce, State},
    world::World,
};

/// How often the agent proves it is alive to the programs, and when they stop trusting it.
/// The programs apply the fail mode once the heartbeat is older than HEARTBEAT_STALE: well
/// within a second of the agent dying, with room for a heartbeat thread delayed by load.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
const HEARTBEAT_STALE: Duration = Duration::from_millis(700);
/// How often pods that could not be enrolled, and addresses the kernel refused, are retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A running agent: what `build` bound and started.
pub struct App {
    admin: Arc<Admin>,
    metrics: Arc<Metrics>,
    kernel: Arc<Kernel>,
    px: Arc<Proxy>,
    applied: Applied,
    source: Box<dyn Source>,
    store: Arc<JwksStore>,
    cache: Arc<TokenCache>,
    heartbeat: Heartbeat,
    drain: drain::Trigger,
    /// SIGTERM and SIGINT, listened for from the start of `build`: a signal that arrives once
    /// the agent reports ready (or before) is kept for `run`, never the default action.
    signals: Option<(Signal, Signal)>,
    cni: Option<Cni>,
}

/// The CNI plugin's socket this agent bound, and its installation.
struct Cni {
    socket: std::path::PathBuf,
    ino: u64,
    installer: Option<crate::cni::install::Installer>,
    remove_on_exit: bool,
}

impl Cni {
    /// Binds the plugin's socket (taking it over from a predecessor) and serves it, and keeps
    /// the plugin installed: before the API server is waited for, so a pod starting now waits
    /// in the runtime for its enrollment rather than failing.
    fn start(s: &crate::config::CniSettings) -> Result<(Cni, crate::cni::Claims)> {
        let claims = crate::cni::Claims::open(&s.state_dir)?;
        let server = crate::cni::Server::bind(&s.socket)?;
        let ino = server.ino();
        tracing::info!(socket = %s.socket.display(), "CNI plugin socket bound");
        tokio::spawn(server.serve(claims.clone(), s.timeout));
        let installer = crate::cni::install::Installer::from_settings(s)?;
        if let Some(i) = &installer {
            tracing::info!(bin = %i.bin_dir.display(), conf = %i.conf_dir.display(), fail_mode = ?s.fail_mode, "installing the CNI plugin");
            tokio::spawn(i.clone().keep(Duration::from_secs(1)));
        }
        Ok((
            Cni {
                socket: s.socket.clone(),
                ino,
                installer,
                remove_on_exit: s.remove_on_exit,
            },
            claims,
        ))
    }

    /// Leaving for good (no successor took the socket over): the socket goes, and the plugin
    /// with it when so configured, so the node's pods do not wait for an agent that is gone.
    fn stop(&self) {
        if !crate::cni::Server::still_ours(&self.socket, self.ino) {
            tracing::info!("a successor serves the CNI socket: the plugin stays installed");
            return;
        }
        let _ = std::fs::remove_file(&self.socket);
        match (&self.installer, self.remove_on_exit) {
            (Some(i), true) => match i.remove() {
                Ok(files) => tracing::info!(?files, "CNI plugin removed from the node's configuration"),
                Err(e) => tracing::warn!("removing the CNI plugin: {e:#}"),
            },
            (Some(_), false) => tracing::info!("the CNI plugin stays installed (removeOnExit: false); with failMode closed, pods wait for an agent"),
            (None, _) => {}
        }
    }
}

/// What woke the agent.
enum Event {
    Stop(&'static str),
    Changed,
    Retry,
}

/// Loads, attaches, binds and enrolls; the agent is ready when this returns.
pub async fn build(source: agent::Source, cfg: Config) -> Result<App> {
    let signals = Some((
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    ));
    // The admin endpoint first: alive (and not ready) while the API server is awaited.
    let metrics = Arc::new(Metrics::default());
    // One state in force from here on, read by the admin endpoint, the JWKS resolver and the
    // proxy alike: empty until the first world is read.
    let in_force = Arc::new(InForce::new(State::empty(&cfg.agent)));
    let admin = Arc::new(Admin {
        ready: Readiness::default(),
        metrics: metrics.clone(),
        kernel: Default::default(),
        settings: Config {
            agent: cfg.agent.clone(),
            kubernetes: cfg.kubernetes.clone(),
            ..Default::default()
        },
        state: in_force.clone(),
    });
    let admin_listener = admin::bind(cfg.agent.admin).await?;
    tokio::spawn(admin::serve(admin.clone(), admin_listener));
    // The first world: from the files, or from the API server's first full lists.
    let mut cni = None;
    let (source, world, set): (Box<dyn Source>, World, PolicySet) = match source {
        agent::Source::Kubernetes => {
            let (started, claims) = match cfg.kubernetes.cni.enabled {
                true => {
                    let (c, claims) = Cni::start(&cfg.kubernetes.cni)?;
                    (Some(c), Some(claims))
                }
                false => (None, None),
            };
            cni = started;
            let mut k = KubeInput::connect(&cfg, claims).await?;
            let (world, set) = k.first(&metrics);
            (Box::new(k), world, set)
        }
        agent::Source::File(path) => {
            let (f, world, set) = FileSource::open(path, &cfg)?;
            (Box::new(f), world, set)
        }
    };
    // The world's services first, so the first JWKS fetches resolve `jwksUri` hosts by them.
    let world = Arc::new(world);
    let empty = in_force.get().engine.clone();
    in_force.swap(State::new(world.clone(), empty, None));
    let resolving = in_force.clone();
    let store = engine::jwks_store(&cfg, move || resolving.get().registry.clone())?;
    let cache = Arc::new(TokenCache::new(cfg.agent.token_cache_size));
    let eng = engine::build_from(&cfg.agent, &set, Some(&store), cache.clone());
    drop(set);
    tracing::info!(
        request_authentications = eng.index().request_authentications,
        authorization_policies = eng.index().authorization_policies,
        "policies loaded"
    );
    let kubelet = match &cfg.agent.kubelet_cgroup {
        Some(path) => Some(path.clone()),
        None => crate::kernel::find_kubelet_cgroup(),
    };
    match &kubelet {
        Some(path) => {
            tracing::info!(cgroup = %path.display(), "kubelet probes recognised by origin")
        }
        None => tracing::warn!(
            "no kubelet process found (and agent.kubeletCgroup not set): no connection passes \
             as a kubelet probe; probes are decided by the pods' policies"
        ),
    }
    let kernel = Arc::new(Kernel::load(
        cfg.agent.cgroup_root.as_deref(),
        kubelet.as_deref(),
        &cfg.agent.bpffs,
    )?);
    tracing::info!(
        cgroup = %kernel.cgroup_root.display(),
        bpffs = %cfg.agent.bpffs.display(),
        layout = crate::kernel::layout(),
        adopted = kernel.adopted,
        taking_over = kernel.taking_over(),
        "eBPF programs attached"
    );
    kernel.spawn_log_pump();
    kernel.heartbeat(cfg.agent.fail_mode, HEARTBEAT_STALE)?;
    let _ = admin.kernel.set(kernel.clone());

    let max_connections = connection_cap(&cfg, &metrics);
    let (drain, draining) = drain::channel();
    let state = in_force.swap(State::new(world, Arc::new(eng), None));
    let px = Arc::new(Proxy {
        max_connections,
        clients: crate::limits::Clients::new(crate::limits::per_client(
            cfg.agent.max_connections_per_pod,
            max_connections,
        )),
        policies_changed: tokio::sync::watch::channel(0).0,
        kernel: kernel.clone(),
        metrics: metrics.clone(),
        settings: cfg.agent.clone(),
        state: in_force,
        drain: draining,
    });
    // A pod that cannot be enrolled is reported and retried; it never stops the agent.
    let mut applied = Applied::default();
    enroll::apply(&px, &mut applied, &state);
    drop(state);
    if kernel.adopted {
        forget_stale(&kernel, &applied);
    }
    let mut source = source;
    source.applied(&mut applied);
    release_freed_memory();
    let heartbeat = Heartbeat::start(kernel.clone(), cfg.agent.fail_mode);
    // An upgrade or a rollback: our programs now beside the other layout's, every pod enrolled
    // in our maps; the old ones go, so every connection met either theirs or ours.
    if kernel.taking_over() {
        kernel.retire_previous();
    }
    admin.ready.set_ready();
    tracing::info!(pods = applied.pods.len(), workloads = applied.enforced.len(), admin = %cfg.agent.admin, "agent ready");
    Ok(App {
        admin,
        metrics,
        kernel,
        px,
        applied,
        source,
        store,
        cache,
        heartbeat,
        drain,
        signals,
        cni,
    })
}

impl App {
    /// Serves until SIGTERM or SIGINT, then stops (see `stop`).
    pub async fn run(mut self) -> Result<()> {
        let (mut term, mut int) = self.signals.take().expect("signals are taken once, here");
        let mut retry = tokio::time::interval(RETRY_EVERY);
        loop {
            let retrying = self.source.retrying(&self.applied);
            let event = tokio::select! {
                _ = term.recv() => Event::Stop("SIGTERM"),
                _ = int.recv() => Event::Stop("SIGINT"),
                _ = self.source.changed() => Event::Changed,
                _ = retry.tick(), if retrying => Event::Retry,
            };
            match event {
                Event::Stop(signal) => {
                    tracing::info!("{signal}: shutting down");
                    break;
                }
                Event::Changed | Event::Retry => self.update(),
            }
        }
        self.stop().await;
        Ok(())
    }

    /// Reads the source: a new world goes in force as one state; otherwise what is pending
    /// (pods to enroll, addresses to enforce) is tried again against the state in force.
    fn update(&mut self) {
        let state = self.px.state();
        match self.source.read(&state.world, &self.metrics) {
            Ok(Some(update)) => {
                drop(state);
                apply(
                    &self.px,
                    &mut self.applied,
                    update.world,
                    update.policies.as_ref(),
                    &self.store,
                    &self.cache,
                );
                self.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {
                if self.applied.needs_retry() {
                    enroll::apply(&self.px, &mut self.applied, &state);
                }
            }
            Err(e) => {
                self.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "reload rejected, the previous configuration and policies stay in force: {e:#}"
                );
            }
        }
        self.source.applied(&mut self.applied);
    }

    /// The programs, maps and enrollments stay pinned: from here the fail mode applies to new
    /// connections (or a successor agent takes them). Listeners close, then open connections
    /// get `drainTimeout` to finish.
    async fn stop(mut self) {
        self.metrics.pods_enrolled.store(0, Ordering::Relaxed);
        self.admin.ready.set_not_ready();
        self.heartbeat.stop();
        if let Some(c) = &self.cni {
            c.stop();
        }
        // Still serving: a successor agent on the same pins shows up as a heartbeat not ours.
        tokio::time::sleep(2 * HEARTBEAT_EVERY).await;
        let settings = &self.px.settings;
        if let Err(e) = self.kernel.stop_heartbeat(settings.fail_mode) {
            tracing::warn!("marking the agent gone: {e:#}");
        }
        for (_, p) in self.applied.pods.drain() {
            p.server.abort();
        }
        // Idle HTTP connections close now, busy ones after their request; TCP relays run on.
        if !self.drain.drain(settings.drain_timeout).await {
            tracing::warn!(
                open = self.metrics.connections_active.load(Ordering::Relaxed),
                "drain timeout: closing the remaining connections"
            );
        }
        tracing::info!(
            bpffs = %settings.bpffs.display(),
            "stopped; enforcement stays pinned (`authz-agent cleanup` removes it)"
        );
    }
}

/// Refreshes the heartbeat from a plain thread: a busy runtime must not make the agent look dead
/// to the kernel.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(kernel: Arc<Kernel>, fail_mode: FailMode) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                if let Err(e) = kernel.heartbeat(fail_mode, HEARTBEAT_STALE) {
                    tracing::warn!("heartbeat: {e:#}");
                }
                std::thread::sleep(HEARTBEAT_EVERY);
            }
        });
        Heartbeat {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The agent-wide connection cap, after raising the descriptor limit.
fn connection_cap(cfg: &Config, metrics: &Metrics) -> u64 {
    let nofile = crate::limits::raise_nofile();
    let max = crate::limits::connection_cap(cfg.agent.max_connections, nofile);
    if cfg.agent.max_connections > max {
        tracing::warn!(
            asked = cfg.agent.max_connections,
            nofile,
            "agent.maxConnections lowered to {max} to fit the descriptor limit"
        );
    }
    if cfg.agent.port.is_some() {
        tracing::warn!(
            "agent.port is ignored: each pod's listener takes a port picked at enrollment"
        );
    }
    metrics.connections_max.store(max, Ordering::Relaxed);
    tracing::info!(nofile, max_connections = max, "descriptor limit");
    max
}

/// After adopting a previous agent's maps: pods and workloads it had that this configuration
/// does not have are released.
fn forget_stale(kernel: &Kernel, applied: &Applied) {
    let ours = applied.cgroup_ids();
    for id in kernel.enrolled_ids() {
        if !ours.contains(&id) {
            let _ = kernel.release(id);
            tracing::info!(cgroup_id = id, "released a pod left by the previous agent");
        }
    }
    for ip in kernel.enforced_ips() {
        if !applied.enforced.contains(&ip) {
            let _ = kernel.unenforce(ip);
            tracing::info!(%ip, "unenforced a workload left by the previous agent");
        }
    }
    let protected: std::collections::HashSet<u64> =
        applied.pods.values().filter_map(|p| p.protected).collect();
    for cookie in kernel.protected_cookies() {
        if !protected.contains(&cookie) {
            let _ = kernel.unprotect(cookie);
            tracing::info!(
                netns_cookie = cookie,
                "inbound capture left by the previous agent removed"
            );
        }
    }
}

/// Start and reload parse whole YAML documents and the kernel's BTF; hand the freed memory back
/// to the system so the agent's footprint is what it keeps, not what it once needed.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap pages. (glibc's; musl's allocator returns
    // freed pages by itself.)
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// Puts `world` in force as one new state, with `set` compiled into a new engine (`set` None
/// keeps the engine in force: Kubernetes mode, pods or services changed, policies did not).
/// New requests, and open TCP relays, are decided by it from here, with every destination's
/// policies selected by its labels as they are now; then the kernel and the listeners are
/// brought in line (operations that fail are retried).
fn apply(
    px: &Arc<Proxy>,
    applied: &mut Applied,
    world: World,
    set: Option<&PolicySet>,
    store: &Arc<JwksStore>,
    cache: &Arc<TokenCache>,
) {
    let prev = px.state();
    let engine = match set {
        Some(set) => Arc::new(engine::build_from(
            &px.settings,
            set,
            Some(store),
            cache.clone(),
        )),
        None => prev.engine.clone(),
    };
    let state = px
        .state
        .swap(State::new(Arc::new(world), engine, Some(&prev)));
    drop(prev);
    // Open TCP relays decide again: identities by address may have changed too.
    px.policies_changed.send_modify(|g| *g += 1);
    enroll::apply(px, applied, &state);
    release_freed_memory();
    tracing::info!(
        pods = applied.pods.len(),
        workloads = applied.enforced.len(),
        destinations = state.targets(),
        request_authentications = state.engine.index().request_authentications,
        authorization_policies = state.engine.index().authorization_policies,
        "applied"
    );
}
