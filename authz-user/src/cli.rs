//! `authz-agent check` and `authz-agent validate`: the engine with no privileges.
use std::{net::IpAddr, path::PathBuf, sync::Arc};

use anyhow::{anyhow, bail, Context, Result};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::{config::Config, engine, jwt::cache::TokenCache, registry::Registry};

pub struct CheckArgs {
    pub config: PathBuf,
    pub to: String,
    pub from: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub headers: Vec<String>,
}

/// Runs one request through the engine; returns the JSON line and whether it was allowed.
pub fn check(a: &CheckArgs) -> Result<(serde_json::Value, bool)> {
    let cfg = Config::load(&a.config)?;
    let registry = Arc::new(Registry::from_world(&crate::world::World::from_config(
        &cfg,
    )));
    let dest = registry.by_name.get(&a.to).cloned().ok_or_else(|| {
        anyhow!(
            "--to {}: no such workload or pod in the config (use NAMESPACE/NAME)",
            a.to
        )
    })?;
    let source = match &a.from {
        Some(f) => Some(
            registry
                .by_name
                .get(f)
                .cloned()
                .ok_or_else(|| anyhow!("--from {f}: no such workload or pod in the config"))?,
        ),
        None => None,
    };
    let mut headers = HeaderMap::new();
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("--header {h:?}: expected 'Name: value'"))?;
        let k = HeaderName::from_bytes(k.trim().as_bytes())
            .with_context(|| format!("--header {h:?}: bad name"))?;
        let v = HeaderValue::from_str(v.trim_start())
            .with_context(|| format!("--header {h:?}: bad value"))?;
        headers.append(k, v);
    }
    let dest_ip = cfg
        .workloads
        .iter()
        .find(|w| w.namespace == dest.namespace && w.name == dest.name)
        .and_then(|w| w.ips.first().copied())
        .or_else(|| {
            cfg.pods
                .iter()
                .find(|p| p.namespace == dest.namespace && p.name == dest.name)
                .and_then(|p| p.ips.first().copied())
        });
    let source_ip = a.source_ip.or_else(|| {
        let s = source.as_ref()?;
        cfg.pods
            .iter()
            .find(|p| p.namespace == s.namespace && p.name == s.name)
            .and_then(|p| p.ips.first().copied())
    });
    let port = a.port.unwrap_or(80);
    let host = a
        .host
        .clone()
        .unwrap_or_else(|| format!("{}.{}", dest.name, dest.namespace));
    if !a.path.starts_with('/') {
        bail!("--path must start with '/'");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let reg = registry.clone();
        let store = engine::jwks_store(&cfg, move || reg.clone())?;
        let (eng, set) = engine::build(&cfg, Some(&store), Arc::new(TokenCache::new(0)));
        // `check` never calls a CUSTOM provider: it says which one would be asked.
        let eng = eng.without_providers();
        if !set.is_valid() {
            let msgs: Vec<String> = set.errors().map(|p| p.to_string()).collect();
            bail!("invalid policies:\n{}", msgs.join("\n"));
        }
        let policies = eng.policies_for(&dest);
        let conn = engine::Conn {
            policies: &policies,
            source: source.as_deref(),
            destination: Some(&dest),
            source_ip,
            dest_ip,
            dest_port: port,
        };
        let req = engine::Request {
            method: &a.method,
            target: &a.path,
            host: &host,
            headers: &headers,
            http2: false,
            body: None,
        };
        let d = eng.decide_http(&conn, &req).await;
        // What the upstream request would lose (null) or get, when allowed.
        let mut hdrs = serde_json::Map::new();
        let reason = match &d.verdict {
            engine::Verdict::Allow(fwd) => {
                for k in &fwd.remove_headers {
                    if headers.contains_key(k) {
                        hdrs.insert(k.to_string(), serde_json::Value::Null);
                    }
                }
                for (k, v) in &fwd.set_headers {
                    hdrs.insert(k.to_string(), String::from_utf8_lossy(v.as_bytes()).into());
                }
                "allowed".to_string()
            }
            engine::Verdict::Deny(reply) => String::from_utf8_lossy(&reply.body).into_owned(),
        };
        let out = serde_json::json!({
            "allowed": d.allowed(),
            "status": d.status(),
            "reason": reason,
            "policy": d.policy,
            "principal": d.principal,
            "headers": hdrs,
            "detail": d.reason.as_str(),
            // AUDIT policies that matched, and what enforcing the dry-run ones would give.
            // A CUSTOM policy matched: its provider would be asked first (check does not ask
            // it; the rest is decided as if it allowed).
            "custom": d.custom.as_ref().map(|c| serde_json::json!({
                "policy": c.policy.policy,
                "provider": c.provider,
                "asked": c.asked,
            })),
            "audit": d.audits.iter().map(|m| m.policy.clone()).collect::<Vec<_>>(),
            "dryRun": d.dry_run.as_ref().map(|r| serde_json::json!({
                "allowed": r.allowed,
                "policy": r.decided_by.as_ref().map(|m| m.policy.clone()),
            })),
        });
        Ok((out, d.allowed()))
    })
}

/// Every problem as `file:line: message`; returns whether all is valid.
pub fn validate(config: Option<&PathBuf>, paths: &[PathBuf]) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    let mut all = paths.to_vec();
    let mut cfg = None;
    if let Some(c) = config {
        match Config::load(c) {
            Ok(c) => {
                all.extend(c.policies.iter().cloned());
                cfg = Some(c);
            }
            Err(e) => {
                lines.push(e.to_string());
                ok = false;
            }
        }
    }
    let mut set = crate::policy::load_paths(&all);
    if let Some(c) = &cfg {
        crate::policy::load::add_config_providers(&mut set, c);
    }
    // Without a config there are no providers to know: CUSTOM policies are checked against
    // the config's (or the cluster's) providers only.
    if cfg.is_some() {
        set.check_custom();
    }
    for p in &set.problems {
        lines.push(p.to_string());
    }
    ok &= set.is_valid();
    (lines, ok)
}
