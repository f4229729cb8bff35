//! `--compare-agent`: two builds of the agent through the same targets in one run, alternating
//! (base then this build, then this build then base, ...), so drift of the machine falls on both
//! alike; reported as the ratio of the enforcer's CPU per request, this build over the base, with
//! its spread over the rounds.
use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::{
    check_answers, measure_throughput,
    targets::{self, Kind, Target, Tools, Topology},
    Args,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Build {
    Base,
    This,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub round: u32,
    pub build: Build,
    pub target: &'static str,
    pub scenario: &'static str,
    pub cpu_us_per_req: f64,
    pub rps: f64,
}

/// The agent targets among `chosen` (the others have no build to compare).
pub fn agent_targets(chosen: &[Target]) -> Vec<Target> {
    chosen
        .iter()
        .filter(|t| matches!(t.kind, Kind::Agent { .. } | Kind::AgentInbound { .. }))
        .cloned()
        .collect()
}

pub fn run(
    chosen: &[Target],
    topo: &Topology,
    tools: &Tools,
    args: &Args,
    token: &str,
    base: &Path,
) -> Result<Vec<Sample>> {
    if chosen.is_empty() {
        bail!("--compare-agent needs agent targets (agent, agent-inbound, ...)");
    }
    let mut samples = vec![];
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Build::Base, Build::This]
        } else {
            [Build::This, Build::Base]
        };
        for t in chosen {
            for build in order {
                let tools = Tools {
                    agent: match build {
                        Build::Base => base.to_path_buf(),
                        Build::This => tools.agent.clone(),
                    },
                    ..tools.clone()
                };
                eprintln!(
                    "authz-bench: round {}/{}, {} ({build:?} build)",
                    round + 1,
                    args.rounds,
                    t.name
                );
                let run = targets::start(t, topo, &tools)?;
                check_answers(topo, &run, t, token)?;
                std::thread::sleep(Duration::from_millis(500));
                for thr in measure_throughput(t, topo, &tools, args, token, &run)? {
                    let Some(cpu) = thr.cpu_us_per_req else {
                        bail!("{}: no CPU figure for the enforcer", t.name);
                    };
                    samples.push(Sample {
                        round,
                        build,
                        target: t.name,
                        scenario: thr.scenario,
                        cpu_us_per_req: cpu,
                        rps: thr.wrk.rps,
                    });
                }
            }
        }
    }
    Ok(samples)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Per target and scenario: each build's median CPU per request, and this build over the base
/// round by round (median, min-max); the same for throughput.
pub fn markdown(samples: &[Sample], base: &str) -> String {
    let mut out = format!(
        "# Agent builds compared\n\nBase: {base}; this build: the working tree. Each round runs both builds \
         through the same targets, in alternating order; ratios are this build over the base, \
         per round (median, min-max over rounds). Below 1.00 is cheaper / slower.\n\n\
         | target | scenario | CPU/req base (us) | CPU/req this (us) | CPU this / base | req/s this / base |\n\
         |---|---|---:|---:|---:|---:|\n"
    );
    let mut keys: Vec<(&str, &str)> = vec![];
    for s in samples {
        if !keys.contains(&(s.target, s.scenario)) {
            keys.push((s.target, s.scenario));
        }
    }
    for (target, scenario) in keys {
        let of = |b: Build| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.target == target && s.scenario == scenario && s.build == b)
                .collect()
        };
        let (b, t) = (of(Build::Base), of(Build::This));
        let ratios = |f: fn(&Sample) -> f64| -> Vec<f64> {
            t.iter()
                .filter_map(|x| b.iter().find(|y| y.round == x.round).map(|y| f(x) / f(y)))
                .collect()
        };
        let spread = |v: Vec<f64>| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.2} ({lo:.2}-{hi:.2})", median(v))
        };
        let _ = writeln!(
            out,
            "| {target} | {scenario} | {:.1} | {:.1} | {} | {} |",
            median(b.iter().map(|s| s.cpu_us_per_req).collect()),
            median(t.iter().map(|s| s.cpu_us_per_req).collect()),
            spread(ratios(|s| s.cpu_us_per_req)),
            spread(ratios(|s| s.rps)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(round: u32, build: Build, cpu: f64, rps: f64) -> Sample {
        Sample {
            round,
            build,
            target: "agent",
            scenario: "valid token",
            cpu_us_per_req: cpu,
            rps,
        }
    }

    #[test]
    fn ratios_are_taken_round_by_round() {
        let samples = [
            s(0, Build::Base, 40.0, 1000.0),
            s(0, Build::This, 30.0, 1200.0),
            s(1, Build::This, 36.0, 1100.0),
            s(1, Build::Base, 40.0, 1000.0),
            s(2, Build::Base, 50.0, 800.0),
            s(2, Build::This, 40.0, 1000.0),
        ];
        let md = markdown(&samples, "a");
        assert!(
            md.contains(
                "| agent | valid token | 40.0 | 36.0 | 0.80 (0.75-0.90) | 1.20 (1.10-1.25) |"
            ),
            "{md}"
        );
    }
}
