//! Kubernetes mode at cluster scale: the real agent against the in-process API server holding
//! N pods (on other nodes), services and AuthorizationPolicies, against the same agent on an
//! empty cluster and on the same services and policies without pods, measured in the same run.
//! Reports time to ready, RSS (and per pod: against the run without pods), the agent's CPU per
//! pod status update while pods churn, and how long a new policy takes to be in force.
//! Then churn: pods created and deleted as rollouts do (each with a new name), `--pods` alive at
//! a time and `--lifecycle` created over the run: RSS before and after (memory must stay flat),
//! and the agent's CPU per pod created or deleted.
//! Targets: under 2 KB per pod, under 100 us per pod status update, a new policy in under
//! 100 ms at 10,000 pods, RSS after churn within 10% of before.
//! Every node of the cluster runs a ready agent (the DaemonSet's pods are on the API server).
//!   sudo target/release/authz-kube-scale [--pods 10000] [--lifecycle 50000]
use std::time::{Duration, Instant};

use anyhow::Result;
use authz_tests::{
    cpu_us,
    fakeapi::{self, FakeApi},
    fresh_bpffs, http_get, rss_kib, Agent, Net,
};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 2_000)]
    services: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Pod status updates sent while measuring the agent's CPU.
    #[arg(long, default_value_t = 2_000)]
    churn: usize,
    /// Pods created (and as many deleted) in the churn run; 0 skips it.
    #[arg(long, default_value_t = 50_000)]
    lifecycle: usize,
}

/// The cluster's nodes.
const NODES: usize = 100;

struct Sample {
    ready: Duration,
    rss_kib: u64,
    rss_after_kib: u64,
    cpu_us_per_change: f64,
    /// Per readiness flip: a change the agent reads (a Service's backends change).
    cpu_us_per_flip: f64,
    apply_ms: f64,
}

fn pod(i: usize, a: &Args) -> serde_json::Value {
    let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
    let mut p = fakeapi::pod(
        &format!("ns{}", i % a.namespaces),
        &format!("p{i}"),
        &format!("00000000-0000-4000-8000-{i:012}"),
        &format!("node{}", i % NODES),
        &ip,
        json!({"app": format!("app{}", i % a.services.max(1))}),
        "sa",
    );
    p["spec"]["containers"][0]["ports"] = json!([{"name": "http", "containerPort": 8080}]);
    p
}

/// Namespaces, and the DaemonSet's agent pod on every node.
fn base_cluster(api: &FakeApi, a: &Args) {
    for n in 0..a.namespaces {
        api.apply(fakeapi::namespace(&format!("ns{n}"), true));
    }
    for n in 0..NODES {
        api.apply(fakeapi::agent_pod(&format!("node{n}"), true));
    }
}

/// `a.services` Services and `a.policies` AuthorizationPolicies, spread over the namespaces.
fn objects(api: &FakeApi, a: &Args) {
    for s in 0..a.services {
        api.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("s{s}"), "namespace": format!("ns{}", s % a.namespaces)},
            "spec": {"clusterIP": format!("10.96.{}.{}", s / 250, s % 250 + 1),
                     "selector": {"app": format!("app{s}")}, "ports": [{"port": 80, "targetPort": "http"}]}}));
    }
    for p in 0..a.policies {
        api.apply(fakeapi::istio("AuthorizationPolicy", &format!("ns{}", p % a.namespaces), &format!("ap{p}"),
            json!({"selector": {"matchLabels": {"app": format!("app{p}")}}, "action": "DENY",
                   "rules": [{"to": [{"operation": {"paths": ["/admin/*"], "methods": ["POST"]}}]}]})));
    }
}

/// The benchmarked agent: Kubernetes mode on a node of its own.
fn agent_config(net: &Net) -> String {
    format!(
        "agent: {{admin: \"{{ADMIN}}\", cgroupRoot: {}}}\nkubernetes: {{enabled: true, nodeName: bench-node, kubeconfig: kubeconfig}}\n",
        net.cgroup_base().display()
    )
}

fn measure(a: &Args, with_pods: bool, with_objects: bool) -> Result<Sample> {
    let api = FakeApi::start()?;
    let net = Net::new()?;
    base_cluster(&api, a);
    if with_pods {
        for i in 0..a.pods {
            api.apply(pod(i, a));
        }
    }
    if with_objects {
        objects(&api, a);
    }
    let cfg = agent_config(&net);
    let kubeconfig = api.kubeconfig();
    let started = Instant::now();
    let mut agent = Agent::spawn(&cfg, &[("kubeconfig", kubeconfig.as_str())], &fresh_bpffs())?;
    agent.wait_ready()?;
    let ready = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.child.id();
    let rss = rss_kib(pid)?;

    // Churn: pod status updates that change nothing the agent uses, one every 5 ms, then one
    // that does (a policy), timed until the agent has applied it.
    let before = cpu_us(pid)?;
    // The empty cluster has no pods to churn: its CPU column stays empty.
    let n = if with_pods { a.churn } else { 0 };
    for k in 0..n {
        let i = k % a.pods.max(1);
        let mut p = pod(i, a);
        let probed = format!(
            "2026-01-01T{:02}:{:02}:{:02}Z",
            k / 3600 % 24,
            k / 60 % 60,
            k % 60
        );
        p["status"]["conditions"] =
            json!([{"type": "Ready", "status": "True", "lastProbeTime": probed}]);
        api.apply(p);
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    let cpu = cpu_us(pid)? - before;
    // Readiness flips, one every 5 ms: each changes a Service's backends. The agent coalesces
    // them and keeps its updates to about a tenth of a core.
    let flips = n / 10;
    let before = cpu_us(pid)?;
    for k in 0..flips {
        let mut p = pod(k % a.pods.max(1), a);
        let ready = if (k / a.pods.max(1)).is_multiple_of(2) {
            "False"
        } else {
            "True"
        };
        p["status"]["conditions"] = json!([{"type": "Ready", "status": ready}]);
        api.apply(p);
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let flip_cpu = cpu_us(pid)? - before;
    let applied = |agent: &Agent| {
        http_get(agent.admin, "/metrics")
            .ok()
            .and_then(|(_, m)| {
                m.lines().find_map(|l| {
                    l.strip_prefix("authz_reloads_total ")
                        .map(|v| v.trim().parse::<f64>().unwrap_or(0.0))
                })
            })
            .unwrap_or(0.0)
    };
    let reloads = applied(&agent);
    let t = Instant::now();
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "ns0",
        "late",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/late"]}}]}]}),
    ));
    while applied(&agent) <= reloads && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let apply_ms = t.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kib(pid)?;
    agent.stop()?;
    Ok(Sample {
        ready,
        rss_kib: rss,
        rss_after_kib: rss_after,
        cpu_us_per_change: if n == 0 { 0.0 } else { cpu as f64 / n as f64 },
        cpu_us_per_flip: if flips == 0 {
            0.0
        } else {
            flip_cpu as f64 / flips as f64
        },
        apply_ms,
    })
}

struct Churn {
    rss_before_kib: u64,
    rss_after_kib: u64,
    cpu_us_per_change: f64,
    changes: usize,
    took: Duration,
}

/// Rollouts: `a.pods` alive; `a.lifecycle` new pods created, and as many of the oldest deleted,
/// in batches of 100 every 20 ms. Measured once the agent has caught up (no update for 2 s).
fn churn(a: &Args) -> Result<Churn> {
    let api = FakeApi::start()?;
    let net = Net::new()?;
    base_cluster(&api, a);
    objects(&api, a);
    for i in 0..a.pods {
        api.apply(pod(i, a));
    }
    let cfg = agent_config(&net);
    let kubeconfig = api.kubeconfig();
    let mut agent = Agent::spawn(&cfg, &[("kubeconfig", kubeconfig.as_str())], &fresh_bpffs())?;
    agent.wait_ready()?;
    let settled = |agent: &Agent| {
        let reloads = || agent.metric("authz_reloads_total");
        let mut last = (reloads(), Instant::now());
        while last.1.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(100));
            let now = reloads();
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
    };
    settled(&agent);
    let pid = agent.child.id();
    let rss_before = rss_kib(pid)?;
    let cpu_before = cpu_us(pid)?;
    let t = Instant::now();
    for k in 0..a.lifecycle {
        api.apply(pod(a.pods + k, a));
        api.delete("Pod", &format!("ns{}", k % a.namespaces), &format!("p{k}"));
        if k % 100 == 99 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    settled(&agent);
    let took = t.elapsed();
    let cpu = cpu_us(pid)? - cpu_before;
    let rss_after = rss_kib(pid)?;
    agent.stop()?;
    Ok(Churn {
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        cpu_us_per_change: cpu as f64 / (2 * a.lifecycle).max(1) as f64,
        changes: 2 * a.lifecycle,
        took,
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    let empty = measure(&a, false, false)?;
    let objects = measure(&a, false, true)?;
    let full = measure(&a, true, true)?;
    println!("| cluster | ready | RSS at ready / after churn | agent CPU per pod status update (nothing read changes) | per readiness flip | a new policy applied in |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, s) in [
        ("empty (baseline)", &empty),
        (
            &*format!(
                "no pods; {} services, {} policies, {} namespaces",
                a.services, a.policies, a.namespaces
            ),
            &objects,
        ),
        (
            &*format!(
                "{} pods, {} services, {} policies, {} namespaces",
                a.pods, a.services, a.policies, a.namespaces
            ),
            &full,
        ),
    ] {
        let us = |v: f64| {
            if v > 0.0 {
                format!("{v:.0} us")
            } else {
                "-".into()
            }
        };
        let (cpu, flip) = (us(s.cpu_us_per_change), us(s.cpu_us_per_flip));
        println!(
            "| {name} | {:.2} s | {:.1} / {:.1} MB | {cpu} | {flip} | {:.0} ms |",
            s.ready.as_secs_f64(),
            s.rss_kib as f64 / 1024.0,
            s.rss_after_kib as f64 / 1024.0,
            s.apply_ms
        );
    }
    println!(
        "\nRSS ratio (populated / empty): {:.2}",
        full.rss_kib as f64 / empty.rss_kib.max(1) as f64
    );
    if a.pods > 0 {
        let per_pod = |full: u64, base: u64| (full as f64 - base as f64) * 1024.0 / a.pods as f64;
        println!(
            "Per pod (against the same cluster without pods): {:.0} B at ready, {:.0} B after churn (target < 2048 B)",
            per_pod(full.rss_kib, objects.rss_kib),
            per_pod(full.rss_after_kib, objects.rss_after_kib),
        );
    }
    if a.lifecycle > 0 {
        let c = churn(&a)?;
        println!(
            "\n| churn | RSS before / after | change | agent CPU per pod created or deleted |\n|---|---:|---:|---:|"
        );
        println!(
            "| {} pods created and {} deleted over {:.0} s, {} alive | {:.1} / {:.1} MB | {:+.1}% | {:.0} us |",
            a.lifecycle,
            a.lifecycle,
            c.took.as_secs_f64(),
            a.pods,
            c.rss_before_kib as f64 / 1024.0,
            c.rss_after_kib as f64 / 1024.0,
            (c.rss_after_kib as f64 / c.rss_before_kib.max(1) as f64 - 1.0) * 100.0,
            c.cpu_us_per_change
        );
        eprintln!("({} changes)", c.changes);
    }
    Ok(())
}
