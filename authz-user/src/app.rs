//! The agent's lifecycle: `build` loads the policies, attaches the programs, binds the admin
//! port and enrolls the pods, and returns the `App` holding what it bound; `App::run` serves
//! until SIGTERM/SIGINT, following config-file or API-server changes, then drains.
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::{
    admin::{self, Admin},
    agent::Source,
    config::{Config, FailMode},
    drain, engine,
    enroll::{self, Applied},
    jwt::{cache::TokenCache, remote::JwksStore},
    kernel::Kernel,
    kubernetes::input::{KubeInput, NOT_ENROLLED_EVENT_AFTER},
    metrics::Metrics,
    policy::PolicySet,
    proxy::Proxy,
    readiness::Readiness,
    state::{InForce, State},
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
/// How often pods that could not be enrolled, and addresses the kernel refused, are retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Where the agent's pods, workloads and policies come from, with what it remembers of them.
enum Input {
    File {
        path: PathBuf,
        seen: Fingerprint,
    },
    Kube {
        k: Box<KubeInput>,
        /// The last update: what it cost, and when it ended.
        last_cost: Duration,
        last_end: Instant,
    },
}

/// A running agent: what `build` bound and started.
pub struct App {
    admin: Arc<Admin>,
    metrics: Arc<Metrics>,
    kernel: Arc<Kernel>,
    px: Arc<Proxy>,
    applied: Applied,
    input: Input,
    store: Arc<JwksStore>,
    cache: Arc<TokenCache>,
    heartbeat: Heartbeat,
    drain: drain::Trigger,
    /// SIGTERM and SIGINT, listened for from the start of `build`: a signal that arrives once
    /// the agent reports ready (or before) is kept for `run`, never the default action.
    signals: Option<(Signal, Signal)>,
}

/// Loads, attaches, binds and enrolls; the agent is ready when this returns.
pub async fn build(source: Source, cfg: Config) -> Result<App> {
    let signals = Some((
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    ));
    // The admin endpoint first: alive (and not ready) while the API server is awaited.
    let metrics = Arc::new(Metrics::default());
    // One state in force from here on, read by the admin endpoint, the JWKS resolver and the
    // proxy alike: empty until the first world is read.
    let in_force = Arc::new(InForce::new(State::empty(cfg.clone())));
    let admin = Arc::new(Admin {
        ready: Readiness::default(),
        metrics: metrics.clone(),
        kernel: Default::default(),
        state: in_force.clone(),
    });
    let admin_listener = admin::bind(cfg.agent.admin).await?;
    tokio::spawn(admin::serve(admin.clone(), admin_listener));
    // What to enforce first: from the files, or from the API server's first full lists.
    let (mut input, cfg, set) = match source {
        Source::Kubernetes => {
            let mut k = KubeInput::connect(&cfg).await?;
            let (cfg, set) = k.snapshot(&cfg, &metrics);
            k.applied_generation = k.policies.generation;
            k.last_wanted = cfg.pods.len();
            let input = Input::Kube {
                k: Box::new(k),
                last_cost: Duration::ZERO,
                last_end: Instant::now(),
            };
            (input, cfg, set)
        }
        Source::File(path) => {
            let set = crate::policy::load_paths(&cfg.policies);
            log_problems(&set);
            if !set.is_valid() {
                return Err(crate::config::ConfigError::Invalid {
                    path: "policies".into(),
                    message: "invalid policies (see above)".into(),
                }
                .into());
            }
            let seen = fingerprint(&path, &cfg);
            (Input::File { path, seen }, cfg, set)
        }
    };
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

    let max_connections = connection_cap(&cfg, &metrics);
    let (drain, draining) = drain::channel();
    let settings = cfg.agent.clone();
    let fail_mode = cfg.agent.fail_mode;
    let admin_addr = cfg.agent.admin;
    let state = in_force.swap(State::new(Arc::new(cfg), Arc::new(eng), None));
    let px = Arc::new(Proxy {
        max_connections,
        policies_changed: tokio::sync::watch::channel(0).0,
        kernel: kernel.clone(),
        metrics: metrics.clone(),
        settings,
        state: in_force,
        draining,
    });
    // A pod that cannot be enrolled is reported and retried; it never stops the agent.
    let mut applied = Applied::default();
    enroll::apply(&px, &mut applied, &state);
    drop(state);
    if kernel.adopted {
        forget_stale(&kernel, &applied);
    }
    if let Input::Kube { k, .. } = &mut input {
        report_pending(k, &mut applied);
    }
    release_freed_memory();
    let heartbeat = Heartbeat::start(kernel.clone(), fail_mode);
    admin.ready.set_ready();
    tracing::info!(pods = applied.pods.len(), workloads = applied.enforced.len(), admin = %admin_addr, "agent ready");
    Ok(App {
        admin,
        metrics,
        kernel,
        px,
        applied,
        input,
        store,
        cache,
        heartbeat,
        drain,
        signals,
    })
}

impl App {
    /// Serves until SIGTERM or SIGINT, then stops (see `stop`).
    pub async fn run(mut self) -> Result<()> {
        let (mut term, mut int) = self.signals.take().expect("signals are taken once, here");
        let mut watch = tokio::time::interval(WATCH_EVERY);
        let mut retry = tokio::time::interval(RETRY_EVERY);
        loop {
            let kube = match &self.input {
                Input::Kube { k, .. } => Some(k.cluster.changed.clone()),
                Input::File { .. } => None,
            };
            let changed = async {
                match &kube {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            let file_mode = matches!(self.input, Input::File { .. });
            let retrying = match &self.input {
                Input::Kube { k, .. } => k.pending(&self.applied),
                Input::File { .. } => self.applied.needs_retry(),
            };
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = watch.tick(), if file_mode => self.files_changed(),
                _ = changed => self.cluster_changed().await,
                _ = retry.tick(), if retrying => self.retry(),
            }
        }
        self.stop().await;
        Ok(())
    }

    /// File mode: reloads when the config or a policy file changed.
    fn files_changed(&mut self) {
        let Input::File { path, seen } = &mut self.input else {
            return;
        };
        let current = self.px.state().config.clone();
        let now = fingerprint(path, &current);
        if now == *seen {
            return;
        }
        *seen = now;
        match load_files(path, &current) {
            Ok((cfg, set)) => {
                *seen = fingerprint(path, &cfg);
                apply(
                    &self.px,
                    &mut self.applied,
                    cfg,
                    Some(&set),
                    &self.store,
                    &self.cache,
                );
                self.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "reload rejected, the previous configuration and policies stay in force: {e:#}"
                );
            }
        }
    }

    /// Kubernetes mode: the stores changed.
    async fn cluster_changed(&mut self) {
        let Input::Kube {
            last_cost,
            last_end,
            ..
        } = &self.input
        else {
            return;
        };
        // Let a burst of events (a relist, `kubectl apply -f dir/`) settle into one update, and
        // on a large, busy cluster keep updates to about a tenth of a core: the next starts no
        // sooner than nine times the last one's cost after it ended. After a quiet spell a
        // change waits only for the burst to settle.
        let duty = (*last_cost * 9).saturating_sub(last_end.elapsed());
        tokio::time::sleep(duty.clamp(KUBE_SETTLE, KUBE_SETTLE_MAX)).await;
        let started = Instant::now();
        self.apply_snapshot();
        if let Input::Kube {
            last_cost,
            last_end,
            ..
        } = &mut self.input
        {
            *last_cost = started.elapsed();
            *last_end = Instant::now();
        }
    }

    /// Pods not enrolled and addresses not enforced yet: another try.
    fn retry(&mut self) {
        match &self.input {
            Input::Kube { .. } => self.apply_snapshot(),
            Input::File { .. } => enroll::apply(&self.px, &mut self.applied, &self.px.state()),
        }
    }

    /// Kubernetes mode: applies what the stores hold now.
    fn apply_snapshot(&mut self) {
        let Input::Kube { k, .. } = &mut self.input else {
            return;
        };
        let state = self.px.state();
        let current = &state.config;
        let (cfg, set) = k.snapshot(current, &self.metrics);
        // Most events (pod status churn, objects the agent does not read) change nothing here.
        let same = cfg.pods == current.pods
            && cfg.peers == current.peers
            && cfg.workloads == current.workloads
            && cfg.services == current.services
            && k.policies.generation == k.applied_generation;
        if same {
            if k.pending(&self.applied) {
                // Only enrollments to retry: the state stays.
                enroll::apply(&self.px, &mut self.applied, &state);
                report_pending(k, &mut self.applied);
            }
        } else {
            k.last_wanted = cfg.pods.len();
            // The engine is rebuilt only when policies changed: pods and services coming and
            // going on a large cluster must not recompile every policy.
            let policies = (k.policies.generation != k.applied_generation).then_some(&set);
            k.applied_generation = k.policies.generation;
            apply(
                &self.px,
                &mut self.applied,
                cfg,
                policies,
                &self.store,
                &self.cache,
            );
            self.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
            report_pending(k, &mut self.applied);
        }
    }

    /// The programs, maps and enrollments stay pinned: from here the fail mode applies to new
    /// connections (or a successor agent takes them). Listeners close, then open connections
    /// get `drainTimeout` to finish.
    async fn stop(mut self) {
        self.metrics.pods_enrolled.store(0, Ordering::Relaxed);
        self.admin.ready.set_not_ready();
        self.heartbeat.stop();
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
        self.drain
            .drain(&self.metrics, settings.drain_timeout)
            .await;
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

fn log_problems(set: &PolicySet) {
    for p in &set.problems {
        if p.warning {
            tracing::warn!("{p}");
        } else {
            tracing::error!("{p}");
        }
    }
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

/// File mode: the config and its policies, read again. An error changes nothing.
fn load_files(config_path: &Path, old: &Config) -> Result<(Config, PolicySet)> {
    let mut cfg = Config::load(config_path)?;
    if cfg.agent != old.agent {
        tracing::warn!("changes under `agent:` need a restart; applying pods, workloads, services and policies only");
    }
    cfg.agent = old.agent.clone();
    let set = crate::policy::load_paths(&cfg.policies);
    log_problems(&set);
    if !set.is_valid() {
        anyhow::bail!("invalid policies (see above)");
    }
    Ok((cfg, set))
}

/// Puts `cfg` in force as one new state, with `set` compiled into a new engine (`set` None
/// keeps the engine in force: Kubernetes mode, pods or services changed, policies did not).
/// New requests, and open TCP relays, are decided by it from here, with every destination's
/// policies selected by its labels as they are now; then the kernel and the listeners are
/// brought in line (operations that fail are retried).
fn apply(
    px: &Arc<Proxy>,
    applied: &mut Applied,
    cfg: Config,
    set: Option<&PolicySet>,
    store: &Arc<JwksStore>,
    cache: &Arc<TokenCache>,
) {
    let prev = px.state();
    let engine = match set {
        Some(set) => Arc::new(engine::build_from(
            &cfg.agent,
            set,
            Some(store),
            cache.clone(),
        )),
        None => prev.engine.clone(),
    };
    let state = px
        .state
        .swap(State::new(Arc::new(cfg), engine, Some(&prev)));
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

/// Kubernetes mode: pods whose enrollment keeps failing get an Event, once per reason.
fn report_pending(k: &KubeInput, applied: &mut Applied) {
    let Some(ev) = &k.events else { return };
    for ((ns, name), p) in applied.pending.iter_mut() {
        if !p.reported && p.since.elapsed() >= NOT_ENROLLED_EVENT_AFTER {
            p.reported = true;
            let (ev, ns, name, reason) = (ev.clone(), ns.clone(), name.clone(), p.reason.clone());
            tokio::spawn(async move { ev.pod_pending(&ns, &name, &reason).await });
        }
    }
}

/// Modification times and sizes of the config file and every policy file.
type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn fingerprint(config_path: &Path, cfg: &Config) -> Fingerprint {
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
