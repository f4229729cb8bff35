//! Agent counters, exposed in Prometheus text format by `admin`.
use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
};

use crate::kernel::KernelCounters;

#[derive(Default)]
pub struct Metrics {
    pub connections_redirected: AtomicU64,
    /// Connections sk_lookup handed to the agent at their destination pod.
    pub connections_inbound: AtomicU64,
    pub connections_unknown_origin: AtomicU64,
    pub connections_active: AtomicU64,
    /// Accepted, not yet counted in connections_active (a drain waits for these too).
    pub connections_starting: AtomicU64,
    /// Connections closed at once because their pod was at `maxConnectionsPerPod`.
    pub connections_over_pod_limit: AtomicU64,
    /// Connections closed at once because the agent had `maxConnections` open.
    pub connections_over_agent_limit: AtomicU64,
    /// The agent-wide cap in force (from `maxConnections` and the descriptor limit).
    pub connections_max: AtomicU64,
    /// HTTP connections closed because a request head did not arrive within headerReadTimeout.
    pub header_timeouts: AtomicU64,
    /// TCP relays closed after tcpIdleTimeout without a byte either way.
    pub tcp_idle_timeouts: AtomicU64,
    /// Open TCP relays closed because new policies deny them.
    pub tcp_closed_by_policy: AtomicU64,
    pub connections_tcp: AtomicU64,
    pub connections_http: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    /// Connections to a service address with no backend on the port asked for (closed).
    pub connections_no_backend: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_from_upstream: AtomicU64,
    /// (decision, reason) -> count.
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// AUDIT policy -> matched requests or connections.
    audits: Mutex<BTreeMap<String, u64>>,
    /// (policy that would decide, or "-"; would-be result) -> dry-run verdicts.
    dry_runs: Mutex<BTreeMap<(String, &'static str), u64>>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Pods enrolled now, and pods that should be but cannot be yet (Kubernetes mode).
    pub pods_enrolled: AtomicU64,
    pub pods_not_enrolled: AtomicU64,
    /// Pods located but whose listener or kernel entry failed: pending, their connections to
    /// enforced destinations refused, retried.
    pub pods_pending: AtomicU64,
    /// Policy objects (or versions of them) found invalid and not enforced (Kubernetes mode).
    pub policies_rejected: AtomicU64,
    /// Pods handed over by the CNI plugin and held now; claims withdrawn (never confirmed by
    /// the API server).
    pub cni_claims: AtomicU64,
    pub cni_claims_withdrawn: AtomicU64,
}

impl Metrics {
    pub fn request(&self, decision: &'static str, reason: &'static str) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((decision, reason))
            .or_default() += 1;
    }

    pub fn audit(&self, policy: &str) {
        *self
            .audits
            .lock()
            .unwrap()
            .entry(policy.to_string())
            .or_default() += 1;
    }

    pub fn dry_run(&self, policy: &str, result: &'static str) {
        *self
            .dry_runs
            .lock()
            .unwrap()
            .entry((policy.to_string(), result))
            .or_default() += 1;
    }

    pub fn render(&self, kernel: Option<KernelCounters>) -> String {
        let mut s = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "authz_connections_redirected_total",
            "Connections the agent accepted through the kernel redirect.",
            self.connections_redirected.load(Relaxed),
        );
        counter(
            "authz_connections_inbound_total",
            "Connections the agent accepted at their destination pod (sk_lookup).",
            self.connections_inbound.load(Relaxed),
        );
        counter(
            "authz_connections_unknown_origin_total",
            "Connections to the agent port with no recorded original destination (closed).",
            self.connections_unknown_origin.load(Relaxed),
        );
        counter(
            "authz_connections_over_pod_limit_total",
            "Redirected connections closed at once: their pod had maxConnectionsPerPod open.",
            self.connections_over_pod_limit.load(Relaxed),
        );
        counter(
            "authz_connections_over_agent_limit_total",
            "Redirected connections closed at once: the agent had maxConnections open.",
            self.connections_over_agent_limit.load(Relaxed),
        );
        counter(
            "authz_upstream_bytes_sent_total",
            "Bytes TCP relays sent to original destinations.",
            self.bytes_to_upstream.load(Relaxed),
        );
        counter(
            "authz_upstream_bytes_received_total",
            "Bytes TCP relays received from original destinations.",
            self.bytes_from_upstream.load(Relaxed),
        );
        counter(
            "authz_http_header_timeouts_total",
            "HTTP connections closed: no complete request head within headerReadTimeout.",
            self.header_timeouts.load(Relaxed),
        );
        counter(
            "authz_tcp_idle_timeouts_total",
            "TCP relays closed after tcpIdleTimeout without a byte either way.",
            self.tcp_idle_timeouts.load(Relaxed),
        );
        counter(
            "authz_tcp_closed_by_policy_total",
            "Open TCP relays closed because a policy change denies them.",
            self.tcp_closed_by_policy.load(Relaxed),
        );
        counter(
            "authz_connections_tcp_total",
            "Redirected connections relayed at L4.",
            self.connections_tcp.load(Relaxed),
        );
        counter(
            "authz_connections_http_total",
            "Redirected connections handled as HTTP.",
            self.connections_http.load(Relaxed),
        );
        counter(
            "authz_connections_no_backend_total",
            "Connections to a service address with no backend on that port (closed).",
            self.connections_no_backend.load(Relaxed),
        );
        counter(
            "authz_upstream_connect_errors_total",
            "Failed connections to original destinations.",
            self.upstream_connect_errors.load(Relaxed),
        );
        counter(
            "authz_reloads_total",
            "Successful policy/config reloads.",
            self.reloads_ok.load(Relaxed),
        );
        counter(
            "authz_reload_failures_total",
            "Rejected policy/config reloads (previous state kept).",
            self.reloads_failed.load(Relaxed),
        );
        counter(
            "authz_policies_rejected_total",
            "Policy objects (or versions of them) from the API server found invalid and not enforced.",
            self.policies_rejected.load(Relaxed),
        );
        if let Some(k) = kernel {
            counter(
                "authz_kernel_connect_redirected_total",
                "connect() calls the eBPF programs steered to the agent.",
                k.connect_redirected,
            );
            counter(
                "authz_kernel_sockets_mapped_total",
                "Sockets put in the sockhash by sock_ops.",
                k.socks_mapped,
            );
            counter(
                "authz_kernel_skmsg_redirected_total",
                "Messages sk_msg moved straight to the peer socket.",
                k.skmsg_redirected,
            );
            counter(
                "authz_kernel_skmsg_missed_total",
                "Messages sk_msg left on the TCP path (no peer).",
                k.skmsg_missed,
            );
            counter(
                "authz_kernel_skmsg_redirected_bytes_total",
                "Bytes sk_msg moved straight to the peer socket.",
                k.skmsg_bytes,
            );
            counter(
                "authz_kernel_connect_refused_total",
                "connect() refused while the agent was gone (fail closed).",
                k.connect_refused,
            );
            counter(
                "authz_kernel_connect_pending_total",
                "connect() refused because the pod's agent listener was not open yet.",
                k.connect_pending,
            );
            counter(
                "authz_kernel_connect_bypassed_total",
                "connect() let through directly while the agent was gone (fail open).",
                k.connect_bypassed,
            );
            counter(
                "authz_kernel_inbound_captured_total",
                "Inbound connections sk_lookup handed to the agent in the destination pod.",
                k.inbound_captured,
            );
            counter(
                "authz_kernel_inbound_refused_total",
                "Inbound connections refused while the agent was gone (fail closed).",
                k.inbound_refused,
            );
            counter(
                "authz_kernel_inbound_bypassed_total",
                "Inbound connections let through to the application while the agent was gone (fail open).",
                k.inbound_bypassed,
            );
            counter(
                "authz_kernel_inbound_pending_total",
                "Inbound connections refused because the pod's inbound listener was not open.",
                k.inbound_pending,
            );
        }
        let _ = writeln!(s, "# HELP authz_connections_active Connections open through the agent.\n# TYPE authz_connections_active gauge\nauthz_connections_active {}", self.connections_active.load(Relaxed));
        let _ = writeln!(s, "# HELP authz_connections_max Connections the agent takes at once before refusing new ones.\n# TYPE authz_connections_max gauge\nauthz_connections_max {}", self.connections_max.load(Relaxed));
        let _ = writeln!(s, "# HELP authz_pods_enrolled Pods whose connections the agent steers.\n# TYPE authz_pods_enrolled gauge\nauthz_pods_enrolled {}", self.pods_enrolled.load(Relaxed));
        let _ = writeln!(s, "# HELP authz_pods_not_enrolled Pods of this node that should be enrolled but cannot be yet.\n# TYPE authz_pods_not_enrolled gauge\nauthz_pods_not_enrolled {}", self.pods_not_enrolled.load(Relaxed) + self.pods_pending.load(Relaxed));
        let _ = writeln!(s, "# HELP authz_cni_claims Pods handed over by the CNI plugin and held.\n# TYPE authz_cni_claims gauge\nauthz_cni_claims {}", self.cni_claims.load(Relaxed));
        let _ = writeln!(s, "# HELP authz_cni_claims_withdrawn_total Pods handed over by the CNI plugin that the API server did not confirm, released.\n# TYPE authz_cni_claims_withdrawn_total counter\nauthz_cni_claims_withdrawn_total {}", self.cni_claims_withdrawn.load(Relaxed));
        let _ = writeln!(s, "# HELP authz_requests_total HTTP requests by decision and reason.\n# TYPE authz_requests_total counter");
        for ((d, r), v) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                s,
                "authz_requests_total{{decision=\"{d}\",reason=\"{}\"}} {v}",
                escape(r)
            );
        }
        let _ = writeln!(s, "# HELP authz_audit_total Requests and connections an AUDIT policy matched.\n# TYPE authz_audit_total counter");
        for (p, v) in self.audits.lock().unwrap().iter() {
            let _ = writeln!(s, "authz_audit_total{{policy=\"{}\"}} {v}", escape(p));
        }
        let _ = writeln!(s, "# HELP authz_dry_run_total Dry-run verdicts: the policy that would decide (\"-\" for none) and the would-be result.\n# TYPE authz_dry_run_total counter");
        for ((p, r), v) in self.dry_runs.lock().unwrap().iter() {
            let _ = writeln!(
                s,
                "authz_dry_run_total{{policy=\"{}\",result=\"{r}\"}} {v}",
                escape(p)
            );
        }
        s
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Packets each pod sent from an address that is not its own, dropped where they entered the
/// node, by kind (`ipv4`, `ipv6`, `arp`, `nd`, `other`).
pub fn render_source_drops(
    s: &mut String,
    drops: &[(std::sync::Arc<str>, authz_common::SourceDrops)],
) {
    let _ = writeln!(s, "# HELP authz_source_dropped_total Packets a pod sent that the node dropped: not from its own address (ipv4, ipv6), ARP or neighbour discovery claiming another address (arp, nd), or frames of another kind (other).\n# TYPE authz_source_dropped_total counter");
    let mut drops: Vec<_> = drops.iter().collect();
    drops.sort_by(|a, b| a.0.cmp(&b.0));
    for (pod, d) in drops {
        for (kind, v) in [
            ("ipv4", d.ipv4),
            ("ipv6", d.ipv6),
            ("arp", d.arp),
            ("nd", d.nd),
            ("other", d.other),
        ] {
            let _ = writeln!(
                s,
                "authz_source_dropped_total{{pod=\"{}\",kind=\"{kind}\"}} {v}",
                escape(pod)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_kept_is_exported() {
        let m = Metrics::default();
        m.bytes_to_upstream.store(7, Relaxed);
        m.bytes_from_upstream.store(9, Relaxed);
        m.connections_no_backend.store(1, Relaxed);
        m.upstream_connect_errors.store(2, Relaxed);
        m.connections_over_agent_limit.store(3, Relaxed);
        m.tcp_closed_by_policy.store(4, Relaxed);
        m.audit("foo/audit");
        m.dry_run("-", "allow");
        m.request("deny", "bad request");
        let text = m.render(None);
        for line in [
            "authz_upstream_bytes_sent_total 7",
            "authz_upstream_bytes_received_total 9",
            "authz_connections_no_backend_total 1",
            "authz_upstream_connect_errors_total 2",
            "authz_connections_over_agent_limit_total 3",
            "authz_tcp_closed_by_policy_total 4",
            "authz_audit_total{policy=\"foo/audit\"} 1",
            "authz_dry_run_total{policy=\"-\",result=\"allow\"} 1",
            "authz_requests_total{decision=\"deny\",reason=\"bad request\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
