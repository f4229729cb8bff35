//! Where the world comes from. A source has one job: say when its world may have changed, and
//! read it. The file source is here; the Kubernetes one is `kubernetes::input::KubeInput`.
use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, SystemTime},
};

use anyhow::Result;

use crate::{
    config::{AgentSettings, Config},
    enroll::Applied,
    metrics::Metrics,
    policy::PolicySet,
    world::World,
};

/// A world read from a source, with the policies when they changed (None: the engine in force
/// stays).
pub struct Update {
    pub world: World,
    pub policies: Option<PolicySet>,
}

pub trait Source: Send {
    /// Resolves when the world may have changed (after the source's own pacing).
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;

    /// The world now, or None when nothing changed since `current`. An error refuses the change:
    /// the state in force stays.
    fn read(&mut self, current: &World, metrics: &Metrics) -> Result<Option<Update>>;

    /// Something is still to be done (a pod to enroll, an address to enforce): worth another
    /// `read` and apply every second.
    fn retrying(&self, applied: &Applied) -> bool {
        applied.needs_retry()
    }

    /// After each apply: report what is still pending where its owner looks.
    fn applied(&mut self, _applied: &mut Applied) {}
}

/// How often config and policy files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// The config file and the policy files it names, checked every 250 ms.
pub struct FileSource {
    path: PathBuf,
    /// The settings the agent started with: changes under `agent:` need a restart.
    agent: AgentSettings,
    /// The policy paths in force (the fingerprint covers them).
    policies: Vec<PathBuf>,
    seen: Fingerprint,
    tick: tokio::time::Interval,
}

impl FileSource {
    /// The source and its first world; invalid policies refuse the start.
    pub fn open(path: PathBuf, cfg: &Config) -> Result<(FileSource, World, PolicySet)> {
        let set = crate::policy::load_config(cfg);
        log_problems(&set);
        if !set.is_valid() {
            return Err(crate::config::ConfigError::Invalid {
                path: "policies".into(),
                message: "invalid policies (see above)".into(),
            }
            .into());
        }
        let source = FileSource {
            seen: fingerprint(&path, &cfg.policies),
            path,
            agent: cfg.agent.clone(),
            policies: cfg.policies.clone(),
            tick: tokio::time::interval(WATCH_EVERY),
        };
        Ok((source, World::from_config(cfg), set))
    }
}

impl Source for FileSource {
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                self.tick.tick().await;
                if fingerprint(&self.path, &self.policies) != self.seen {
                    return;
                }
            }
        })
    }

    fn read(&mut self, _current: &World, _metrics: &Metrics) -> Result<Option<Update>> {
        let now = fingerprint(&self.path, &self.policies);
        if now == self.seen {
            return Ok(None);
        }
        // Seen, valid or not: an invalid change is reported once, not every 250 ms.
        self.seen = now;
        let mut cfg = Config::load(&self.path)?;
        if cfg.agent != self.agent {
            tracing::warn!("changes under `agent:` need a restart; applying pods, workloads, services and policies only");
        }
        cfg.agent = self.agent.clone();
        let set = crate::policy::load_config(&cfg);
        log_problems(&set);
        if !set.is_valid() {
            anyhow::bail!("invalid policies (see above)");
        }
        self.policies = cfg.policies.clone();
        self.seen = fingerprint(&self.path, &self.policies);
        Ok(Some(Update {
            world: World::from_config(&cfg),
            policies: Some(set),
        }))
    }
}

pub fn log_problems(set: &PolicySet) {
    for p in &set.problems {
        if p.warning {
            tracing::warn!("{p}");
        } else {
            tracing::error!("{p}");
        }
    }
}

/// Modification times and sizes of the config file and every policy file.
type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn fingerprint(config_path: &Path, policies: &[PathBuf]) -> Fingerprint {
    let mut files = vec![config_path.to_path_buf()];
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                walk(&e.path(), out);
            }
        }
        out.push(p.to_path_buf());
    }
    for p in policies {
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
