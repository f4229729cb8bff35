//! Decision records: a matched AUDIT rule and every dry-run verdict become one JSON line in the
//! agent's log (target `authz::record`) and a count. Never a token or a header value.
use std::net::IpAddr;

use crate::{engine::Decision, metrics::Metrics, registry::Workload};

/// The request a decision was about, as far as a record shows it.
pub struct Subject<'a> {
    pub workload: &'a Workload,
    pub source: Option<IpAddr>,
    /// HTTP only.
    pub method: Option<&'a str>,
    pub host: Option<&'a str>,
    /// Path and query as received; the query is never written.
    pub target: Option<&'a str>,
}

/// Counts a decision (`authz_requests_total`) and writes its records, if any.
pub fn count(metrics: &Metrics, d: &Decision, s: &Subject) {
    metrics.request(
        if d.allowed() { "allow" } else { "deny" },
        d.reason.as_str(),
    );
    emit(metrics, d, s);
}

fn emit(metrics: &Metrics, d: &Decision, s: &Subject) {
    if d.audits.is_empty() && d.dry_run.is_none() {
        return;
    }
    let base = serde_json::json!({
        "workload": format!("{}/{}", s.workload.namespace, s.workload.name),
        "method": s.method,
        "host": s.host,
        "path": s.target.map(|t| t.split('?').next().unwrap_or("")),
        "principal": d.principal,
        "source": s.source.map(|ip| ip.to_string()),
    });
    let decision = |allowed: bool| if allowed { "allow" } else { "deny" };
    for m in &d.audits {
        let mut r = base.clone();
        r["type"] = "audit".into();
        r["policy"] = m.policy.clone().into();
        r["rule"] = m.rule.into();
        r["decision"] = decision(d.allowed()).into();
        tracing::info!(target: "authz::record", "{r}");
        metrics.audit(&m.policy);
    }
    if let Some(dry) = &d.dry_run {
        let mut r = base;
        r["type"] = "dry-run".into();
        r["policy"] = dry.decided_by.as_ref().map(|m| m.policy.clone()).into();
        r["rule"] = dry.decided_by.as_ref().map(|m| m.rule).into();
        r["decision"] = decision(dry.allowed).into();
        tracing::info!(target: "authz::record", "{r}");
        metrics.dry_run(
            dry.decided_by.as_ref().map_or("-", |m| m.policy.as_str()),
            decision(dry.allowed),
        );
    }
}
