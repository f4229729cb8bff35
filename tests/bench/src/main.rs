//! `authz-bench`: the same scenario against each target in one run, figures side by side.
//! Started by `cargo xtask bench`, which installs the tools and passes their paths.
mod chart;
mod compare;
mod measure;
mod pem;
mod report;
mod targets;

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use authz_tests::{curl, demo_jwt, require_root, tampered, Net};
use clap::Parser;
use serde::Serialize;

use measure::{Idle, RateResult, WrkResult};
use targets::{Running, Target, Tools, Topology};

#[derive(Parser)]
#[command(about = "Benchmark the agent side by side with direct, HAProxy and Envoy")]
pub struct Args {
    /// Folder for report.md, report.json and chart.png.
    #[arg(long)]
    out: PathBuf,
    /// Seconds per load run.
    #[arg(long, default_value_t = 10)]
    pub secs: u32,
    /// Only these targets (comma-separated names); `direct` is always run, as the baseline.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Another build of the agent (e.g. the merge base's): the agent targets run with it and
    /// with this one, alternating, and the ratio of CPU per request is reported (compare.md).
    #[arg(long)]
    compare_agent: Option<PathBuf>,
    /// What to call the base build in compare.md (e.g. its revision); its path by default.
    #[arg(long)]
    base_label: Option<String>,
    /// Rounds of the comparison; each runs both builds, in alternating order.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Keep the enforcer's CPU awake during the fixed-rate runs (a `nice -n 19` busy loop on
    /// CPU 0), so added latency is the enforcer's work and not an idle core's wake-up.
    #[arg(long)]
    pub keep_awake: bool,
    /// Fixed rates (req/s) for the latency runs.
    #[arg(long, value_delimiter = ',', default_values_t = [1000u32, 5000])]
    rates: Vec<u32>,
    #[arg(long, env = "AUTHZ_BENCH_WRK", default_value = "wrk")]
    wrk: PathBuf,
    #[arg(long, env = "AUTHZ_BENCH_OHA", default_value = "oha")]
    oha: PathBuf,
    #[arg(long, env = "AUTHZ_BENCH_HAPROXY", default_value = "haproxy")]
    haproxy: PathBuf,
    #[arg(long, env = "AUTHZ_BENCH_ENVOY", default_value = "envoy")]
    envoy: PathBuf,
    #[arg(long, env = "AUTHZ_BENCH_NGINX", default_value = "nginx")]
    nginx: PathBuf,
}

/// One kind of request of the FAQ's skip-path scenario.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub path: &'static str,
    pub token: bool,
    pub expect: u16,
}

pub const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "valid token, protected path",
        path: "/api/v1/products/1",
        token: true,
        expect: 200,
    },
    Scenario {
        name: "no token, /productpage",
        path: "/productpage",
        token: false,
        expect: 200,
    },
    Scenario {
        name: "no token, protected path (403)",
        path: "/api/v1/products/1",
        token: false,
        expect: 403,
    },
];

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub scenario: &'static str,
    pub wrk: WrkResult,
    /// Enforcer CPU time per request, microseconds.
    pub cpu_us_per_req: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub idle_before: Idle,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    pub name: &'static str,
    pub about: &'static str,
    pub rss_idle_kib: Option<u64>,
    pub throughput: Vec<Throughput>,
    /// Valid-token scenario at fixed rates.
    pub latency: Vec<RateResult>,
}

const WRK_THREADS: &str = "2";
const WRK_CONNECTIONS: &str = "50";
const OHA_CONNECTIONS: &str = "50";

fn client_cmd(
    topo: &Topology,
    run: &Running,
    program: &std::path::Path,
    args: &[String],
) -> std::process::Command {
    let mut a: Vec<&str> = vec!["-c", "1", program.to_str().unwrap()];
    a.extend(args.iter().map(String::as_str));
    Net::command(&topo.client, run.client_in_pod, "taskset", &a)
}

/// The status a target gives: the Istio answer, or the backend's 200 when nothing enforces.
fn expected(s: &Scenario, enforcing: bool) -> u16 {
    if enforcing {
        s.expect
    } else {
        200
    }
}

/// Every target must give the Istio answer to each request kind before it is measured.
pub fn check_answers(topo: &Topology, run: &Running, t: &Target, token: &str) -> Result<()> {
    let (name, enforcing) = (t.name, t.kind != targets::Kind::Direct);
    let bad = tampered(token);
    let mut cases: Vec<(String, Option<&str>, u16)> = SCENARIOS
        .iter()
        .map(|s| {
            (
                s.path.to_string(),
                s.token.then_some(token),
                expected(s, enforcing),
            )
        })
        .collect();
    cases.push((
        "/productpage".into(),
        Some(bad.as_str()),
        if enforcing { 401 } else { 200 },
    ));
    for (path, tok, want) in cases {
        let auth = tok.map(|t| format!("Authorization: Bearer {t}"));
        let url = format!("{}{path}", run.base);
        let mut args = vec!["-o", "/dev/null", url.as_str()];
        if let Some(h) = &auth {
            args.extend(["-H", h.as_str()]);
        }
        for h in &run.headers {
            args.extend(["-H", h.as_str()]);
        }
        let (code, _) = curl(&topo.client, run.client_in_pod, &args)?;
        if code != want {
            bail!(
                "{name}: {path} (token: {}) answered {code}, expected {want}",
                if tok.is_some() { "yes" } else { "no" }
            );
        }
    }
    Ok(())
}

/// Each scenario under wrk's full load: throughput and the enforcer's CPU per request.
/// A lowest-priority busy loop on CPU 0, killed on drop: the enforcer preempts it at once, and
/// the core never goes idle between requests.
fn keep_cpu0_awake() -> Result<targets::Proc> {
    let child = std::process::Command::new("taskset")
        .args([
            "-c",
            "0",
            "nice",
            "-n",
            "19",
            "sh",
            "-c",
            "while :; do :; done",
        ])
        .spawn()
        .context("starting the busy loop")?;
    Ok(targets::Proc(child))
}

pub fn measure_throughput(
    t: &Target,
    topo: &Topology,
    tools: &Tools,
    args: &Args,
    token: &str,
    run: &Running,
) -> Result<Vec<Throughput>> {
    let auth = format!("Authorization: Bearer {token}");
    let mut throughput = vec![];
    for s in SCENARIOS {
        let idle_before = measure::wait_idle(Duration::from_secs(30))?;
        let mut a: Vec<String> = [
            "-t",
            WRK_THREADS,
            "-c",
            WRK_CONNECTIONS,
            "-d",
            &format!("{}s", args.secs),
            "--latency",
        ]
        .map(String::from)
        .to_vec();
        if s.token {
            a.extend(["-H".into(), auth.clone()]);
        }
        for h in &run.headers {
            a.extend(["-H".into(), h.clone()]);
        }
        a.push(format!("{}{}", run.base, s.path));
        let w = measure::run_watching(client_cmd(topo, run, &tools.wrk, &a), run.pid)?;
        let wrk = measure::parse_wrk(&w.out)?;
        let wrong = if expected(&s, t.kind != targets::Kind::Direct) == 200 {
            wrk.non_2xx
        } else {
            wrk.requests - wrk.non_2xx
        };
        if wrong > 0 || wrk.socket_errors > 0 {
            bail!(
                "{}: {}: {wrong} wrong answers, {} socket errors",
                t.name,
                s.name,
                wrk.socket_errors
            );
        }
        let cpu_us_per_req = w.cpu_us.map(|c| c as f64 / wrk.requests as f64);
        eprintln!(
            "  {:32} {:>9.0} req/s  p99 {:.2} ms  cpu/req {}",
            s.name,
            wrk.rps,
            wrk.p99_ms,
            cpu_us_per_req
                .map(|c| format!("{c:.1} us"))
                .unwrap_or("-".into())
        );
        throughput.push(Throughput {
            scenario: s.name,
            wrk,
            cpu_us_per_req,
            peak_rss_kib: w.peak_rss_kib,
            idle_before,
        });
    }
    Ok(throughput)
}

fn measure_target(
    t: &Target,
    topo: &Topology,
    tools: &Tools,
    args: &Args,
    token: &str,
) -> Result<TargetResult> {
    eprintln!("authz-bench: {} ({})", t.name, t.about);
    let run = targets::start(t, topo, tools)?;
    check_answers(topo, &run, t, token)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle_kib = run.pid.map(measure::rss_kib).transpose()?;
    let throughput = measure_throughput(t, topo, tools, args, token, &run)?;
    let auth = format!("Authorization: Bearer {token}");
    let mut latency = vec![];
    for &rate in &args.rates {
        measure::wait_idle(Duration::from_secs(30))?;
        let _awake = args.keep_awake.then(keep_cpu0_awake).transpose()?;
        let mut a: Vec<String> = [
            "--no-tui",
            "--output-format",
            "json",
            "-z",
            &format!("{}s", args.secs),
            "-q",
            &rate.to_string(),
            "--latency-correction",
            // Requests in flight at the deadline finish instead of counting as errors.
            "-w",
            "-c",
            OHA_CONNECTIONS,
        ]
        .map(String::from)
        .to_vec();
        a.extend(["-H".into(), auth.clone()]);
        for h in &run.headers {
            a.extend(["-H".into(), h.clone()]);
        }
        a.push(format!("{}{}", run.base, SCENARIOS[0].path));
        let w = measure::run_watching(client_cmd(topo, &run, &tools.oha, &a), run.pid)?;
        let r = measure::parse_oha(&w.out, rate, 200)?;
        eprintln!(
            "  at {rate:>5} req/s: p50 {:.3} p99 {:.3} p99.9 {:.3} ms",
            r.p50_ms, r.p99_ms, r.p999_ms
        );
        if r.unexpected > 0 {
            bail!(
                "{}: {} unexpected answers at {rate} req/s",
                t.name,
                r.unexpected
            );
        }
        latency.push(r);
    }
    Ok(TargetResult {
        name: t.name,
        about: t.about,
        rss_idle_kib,
        throughput,
        latency,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !require_root() {
        bail!("the benchmark needs root: it builds pods from network namespaces and loads eBPF programs");
    }
    let tools = Tools {
        agent: authz_tests::agent_bin(),
        wrk: args.wrk.clone(),
        oha: args.oha.clone(),
        haproxy: args.haproxy.clone(),
        envoy: args.envoy.clone(),
        nginx: args.nginx.clone(),
        extauthz: authz_tests::extauthz_bin(),
    };
    // A comparison runs the agent in both directions unless told otherwise.
    let wanted: Vec<String> = match (&args.compare_agent, args.targets.is_empty()) {
        (Some(_), true) => vec!["agent".into(), "agent-inbound".into()],
        _ => args.targets.clone(),
    };
    let chosen: Vec<Target> = targets::all()
        .into_iter()
        .filter(|t| t.name == "direct" || wanted.is_empty() || wanted.iter().any(|n| n == t.name))
        .collect();
    std::fs::create_dir_all(&args.out)?;
    let work = std::env::temp_dir().join(format!("authz-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let topo = Topology::new(&tools, &work)?;
    let token = demo_jwt();
    if let Some(base) = &args.compare_agent {
        let chosen = compare::agent_targets(&chosen);
        let samples = compare::run(&chosen, &topo, &tools, &args, &token, base)?;
        drop(topo);
        let _ = std::fs::remove_dir_all(&work);
        let label = args
            .base_label
            .clone()
            .unwrap_or_else(|| base.display().to_string());
        let md = compare::markdown(&samples, &label);
        std::fs::write(args.out.join("compare.md"), &md)?;
        std::fs::write(
            args.out.join("compare.json"),
            serde_json::to_string_pretty(&samples)?,
        )?;
        println!("{md}");
        eprintln!("authz-bench: wrote {}", args.out.display());
        return Ok(());
    }
    let mut results = vec![];
    for t in &chosen {
        results.push(
            measure_target(t, &topo, &tools, &args, &token)
                .with_context(|| format!("target {}", t.name))?,
        );
    }
    let backend_rss = measure::rss_kib(topo.backend_pid()).ok();
    drop(topo);
    let _ = std::fs::remove_dir_all(&work);
    let env = report::Environment::probe(&args, backend_rss);
    let rep = report::Report::new(env, results);
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&rep)?,
    )?;
    std::fs::write(args.out.join("report.md"), rep.markdown())?;
    chart::draw(&rep, &args.out.join("chart.png"))?;
    println!("{}", rep.markdown());
    eprintln!("authz-bench: wrote {}", args.out.display());
    Ok(())
}
