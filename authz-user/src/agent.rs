//! `authz-agent run` and `cleanup`: which source the agent follows, the runtime, then the
//! lifecycle in `app` (build, run, drain).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{config::Config, netns};

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
    rt.enable_all()
        .build()?
        .block_on(async { crate::app::build(source, cfg).await?.run().await })
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
