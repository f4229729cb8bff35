//! The report: figures per target, ratios computed pair by pair in this run, and the targets.
use std::fmt::Write;

use serde::Serialize;

use crate::{Args, TargetResult, SCENARIOS};

#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub secs_per_run: u32,
    /// A niced busy loop kept CPU 0 awake during the fixed-rate runs.
    pub keep_awake: bool,
    pub wrk: String,
    pub oha: String,
    pub haproxy: String,
    pub envoy: String,
    pub backend_rss_kib: Option<u64>,
}

fn first_line(cmd: &std::path::Path, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "not found".into())
}

/// Today's UTC date, YYYY-MM-DD.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil((secs / 86_400) as i64)
}

fn civil(days: i64) -> String {
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

impl Environment {
    pub fn probe(args: &Args, backend_rss_kib: Option<u64>) -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Environment {
            date: today(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            secs_per_run: args.secs,
            keep_awake: args.keep_awake,
            wrk: first_line(&args.wrk, &["--version"]),
            oha: first_line(&args.oha, &["--version"]),
            haproxy: first_line(&args.haproxy, &["-v"]),
            // Envoy names its own binary's path first: only the version is the report's.
            envoy: {
                let line = first_line(&args.envoy, &["--version"]);
                match line.split_once("version:") {
                    Some((_, v)) => format!("envoy version: {}", v.trim()),
                    None => line,
                }
            },
            backend_rss_kib,
        }
    }
}

/// A target of the issue, checked against this run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub measured: f64,
    pub limit: f64,
    /// `true` when lower is better (measured must be <= limit).
    pub at_most: bool,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub what: String,
    pub value: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub environment: Environment,
    pub results: Vec<TargetResult>,
    pub ratios: Vec<Ratio>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(environment: Environment, results: Vec<TargetResult>) -> Report {
        let mut r = Report {
            environment,
            results,
            ratios: vec![],
            checks: vec![],
        };
        r.compute();
        r
    }

    fn get(&self, name: &str) -> Option<&TargetResult> {
        self.results.iter().find(|t| t.name == name)
    }

    /// Valid-token throughput.
    fn rps(&self, name: &str) -> Option<f64> {
        Some(self.get(name)?.throughput.first()?.wrk.rps)
    }

    fn cpu(&self, name: &str) -> Option<f64> {
        self.get(name)?.throughput.first()?.cpu_us_per_req
    }

    fn p99_at(&self, name: &str, rate: u32) -> Option<f64> {
        Some(
            self.get(name)?
                .latency
                .iter()
                .find(|l| l.rate == rate)?
                .p99_ms,
        )
    }

    fn compute(&mut self) {
        let mut ratios = vec![];
        let mut checks = vec![];
        let mut ratio = |what: String, a: Option<f64>, b: Option<f64>| -> Option<f64> {
            let (a, b) = (a?, b?);
            // A peer that added nothing (or less than noise) has no meaningful ratio.
            if b <= 0.0 || !(a / b).is_finite() {
                return None;
            }
            let v = a / b;
            ratios.push(Ratio { what, value: v });
            Some(v)
        };
        let mut check = |what: &str, measured: Option<f64>, limit: f64, at_most: bool| {
            if let Some(m) = measured {
                checks.push(Check {
                    what: what.into(),
                    measured: m,
                    limit,
                    at_most,
                    met: if at_most { m <= limit } else { m >= limit },
                });
            }
        };
        for peer in ["direct", "haproxy", "envoy", "envoy-jwtcache"] {
            ratio(
                format!("throughput agent / {peer}"),
                self.rps("agent"),
                self.rps(peer),
            );
        }
        ratio(
            "throughput agent-2t / agent".into(),
            self.rps("agent-2t"),
            self.rps("agent"),
        );
        for peer in ["haproxy", "envoy", "envoy-jwtcache"] {
            ratio(
                format!("CPU per request agent / {peer}"),
                self.cpu("agent"),
                self.cpu(peer),
            );
            ratio(
                format!("CPU per request agent-nocache / {peer}"),
                self.cpu("agent-nocache"),
                self.cpu(peer),
            );
        }
        let added = |n: &str| Some(self.p99_at(n, 1000)? - self.p99_at("direct", 1000)?);
        for peer in ["haproxy", "envoy"] {
            ratio(
                format!("added p99 at 1000 req/s agent / {peer}"),
                added("agent"),
                added(peer),
            );
        }
        // Inbound: the same request from a client outside every pod, enforced at the backend.
        for peer in ["haproxy-inbound", "envoy-inbound"] {
            ratio(
                format!("throughput agent-inbound / {peer}"),
                self.rps("agent-inbound"),
                self.rps(peer),
            );
            ratio(
                format!("CPU per request agent-inbound / {peer}"),
                self.cpu("agent-inbound"),
                self.cpu(peer),
            );
        }
        ratio(
            "throughput agent-inbound / direct".into(),
            self.rps("agent-inbound"),
            self.rps("direct"),
        );
        // The source check on the pods' interfaces: with it / without it.
        ratio(
            "throughput agent-inbound / agent-inbound-nocheck".into(),
            self.rps("agent-inbound"),
            self.rps("agent-inbound-nocheck"),
        );
        // Many issuers: the cost at 1,000 (and 10, 100) over the cost at 1.
        for n in [10, 100, 1000] {
            for who in ["agent", "envoy"] {
                ratio(
                    format!("CPU per request {who}-iss{n} / {who}"),
                    self.cpu(&format!("{who}-iss{n}")),
                    self.cpu(who),
                );
            }
        }
        // CUSTOM: the enforcer's CPU per request (the provider's is on another CPU, not counted).
        for p in ["http", "grpc"] {
            ratio(
                format!("CPU per request agent-custom-{p} / envoy-custom-{p}"),
                self.cpu(&format!("agent-custom-{p}")),
                self.cpu(&format!("envoy-custom-{p}")),
            );
            ratio(
                format!("throughput agent-custom-{p} / envoy-custom-{p}"),
                self.rps(&format!("agent-custom-{p}")),
                self.rps(&format!("envoy-custom-{p}")),
            );
        }
        let find = |what: &str| ratios.iter().find(|r| r.what == what).map(|r| r.value);
        for (dir, agent, suffix, min_direct) in [
            ("Outbound", "agent", "", 0.8),
            ("Inbound", "agent-inbound", "-inbound", 0.75),
        ] {
            check(
                &format!("{dir} CPU per request: agent / HAProxy"),
                find(&format!("CPU per request {agent} / haproxy{suffix}")),
                0.4,
                true,
            );
            check(
                &format!("{dir} CPU per request: agent / Envoy"),
                find(&format!("CPU per request {agent} / envoy{suffix}")),
                0.2,
                true,
            );
            check(
                &format!("{dir} throughput: agent / direct"),
                find(&format!("throughput {agent} / direct")),
                min_direct,
                false,
            );
            let awake = if self.environment.keep_awake {
                "CPU 0 kept awake"
            } else {
                "CPU 0 not kept awake: --keep-awake"
            };
            check(
                &format!("{dir} added p99 at 1000 req/s over direct, ms ({awake})"),
                added(agent),
                0.1,
                true,
            );
        }
        for (p, name) in [("http", "HTTP"), ("grpc", "gRPC")] {
            check(
                &format!("CUSTOM ({name} provider) CPU per request: agent / Envoy"),
                find(&format!(
                    "CPU per request agent-custom-{p} / envoy-custom-{p}"
                )),
                0.5,
                true,
            );
        }
        check(
            "CPU per request with 1,000 issuers / with 1: agent",
            find("CPU per request agent-iss1000 / agent"),
            1.1,
            true,
        );
        check(
            "RSS idle with 10 enrolled pods (MB)",
            self.get("agent")
                .and_then(|t| t.rss_idle_kib)
                .map(|k| k as f64 / 1024.0),
            20.0,
            true,
        );
        let peak_10k = self
            .get("agent-10k")
            .and_then(|t| t.throughput.iter().filter_map(|x| x.peak_rss_kib).max());
        check(
            "RSS with 10,000 policies, under load (MB)",
            peak_10k.map(|k| k as f64 / 1024.0),
            60.0,
            true,
        );
        self.ratios = ratios;
        self.checks = checks;
    }

    pub fn markdown(&self) -> String {
        let e = &self.environment;
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmark {}\n", e.date);
        let _ = writeln!(
            s,
            "Kernel {}, {} x {}. Enforcer pinned to CPU 0 (one worker), client and backend (nginx, one worker) on CPU 1. \
             wrk {WRK} connections / 2 threads; oha at fixed rates with latency correction, 50 connections; {} s per run. \
             Scenario: the skip-path policy (RequestAuthentication + DENY notRequestPrincipals/notPaths) with Istio's RS256 demo token. \
             The client and the backend share CPU 1 in every run, so throughput is bounded by what they manage on one core: \
             `direct` uses CPU 1 only, while an enforcer adds its work on CPU 0. With the agent, the client's bytes reach the agent by \
             sk_msg (no loopback TCP), which is why agent / direct can come near 1.\n",
            e.kernel,
            e.cpus,
            e.cpu,
            e.secs_per_run,
            WRK = 50
        );
        if e.keep_awake {
            let _ = writeln!(
                s,
                "CPU 0 kept awake during the fixed-rate runs (`--keep-awake`: a `nice -n 19` busy loop there).\n"
            );
        }
        let _ = writeln!(
            s,
            "Tools: {} | {} | {} | {}\n",
            e.wrk, e.oha, e.haproxy, e.envoy
        );
        let _ = writeln!(s, "## Throughput (wrk)\n");
        let _ = writeln!(s, "| target | request | req/s | p50 ms | p99 ms | enforcer CPU us/req | peak RSS MB | busy before |");
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
        for t in &self.results {
            for x in &t.throughput {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {:.0}% |",
                    t.name,
                    x.scenario,
                    x.wrk.rps,
                    x.wrk.p50_ms,
                    x.wrk.p99_ms,
                    x.cpu_us_per_req
                        .map(|c| format!("{c:.1}"))
                        .unwrap_or("-".into()),
                    x.peak_rss_kib
                        .map(|k| format!("{:.1}", k as f64 / 1024.0))
                        .unwrap_or("-".into()),
                    x.idle_before.busy * 100.0
                );
            }
        }
        let _ = writeln!(
            s,
            "\n## Latency at fixed rates, valid token (oha, latency-corrected)\n"
        );
        let _ = writeln!(
            s,
            "| target | rate | achieved | p50 ms | p99 ms | p99.9 ms |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        for t in &self.results {
            for l in &t.latency {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} |",
                    t.name, l.rate, l.achieved_rps, l.p50_ms, l.p99_ms, l.p999_ms
                );
            }
        }
        let _ = writeln!(s, "\n## Memory\n");
        let _ = writeln!(s, "| target | RSS idle MB | peak RSS under load MB |");
        let _ = writeln!(s, "|---|---:|---:|");
        for t in self.results.iter().filter(|t| t.rss_idle_kib.is_some()) {
            let peak = t.throughput.iter().filter_map(|x| x.peak_rss_kib).max();
            let _ = writeln!(
                s,
                "| {} | {:.1} | {} |",
                t.name,
                t.rss_idle_kib.unwrap_or(0) as f64 / 1024.0,
                peak.map(|k| format!("{:.1}", k as f64 / 1024.0))
                    .unwrap_or("-".into())
            );
        }
        let _ = writeln!(s, "\n## Ratios (same run)\n");
        for r in &self.ratios {
            let _ = writeln!(s, "- {}: {:.2}", r.what, r.value);
        }
        let _ = writeln!(s, "\n## Targets\n");
        let _ = writeln!(s, "| target | measured | limit | met |");
        let _ = writeln!(s, "|---|---:|---:|---|");
        for c in &self.checks {
            let verdict = if c.met {
                "yes".to_string()
            } else if c.at_most {
                format!("no: {:.0}% over", (c.measured / c.limit - 1.0) * 100.0)
            } else {
                format!("no: {:.0}% short", (1.0 - c.measured / c.limit) * 100.0)
            };
            let _ = writeln!(
                s,
                "| {} | {:.2} | {} {} | {} |",
                c.what,
                c.measured,
                if c.at_most { "<=" } else { ">=" },
                c.limit,
                verdict
            );
        }
        let _ = writeln!(
            s,
            "\nTargets: {}",
            self.results
                .iter()
                .map(|t| format!("`{}` {}", t.name, t.about))
                .collect::<Vec<_>>()
                .join("; ")
        );
        let _ = writeln!(
            s,
            "Requests: {}",
            SCENARIOS
                .iter()
                .map(|x| x.name)
                .collect::<Vec<_>>()
                .join("; ")
        );
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::civil(0), "1970-01-01");
        assert_eq!(super::civil(11_016), "2000-02-29");
        assert_eq!(super::civil(20_781), "2026-11-24");
    }
}
