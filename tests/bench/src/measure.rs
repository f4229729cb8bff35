//! What is measured and how: load generators (wrk for throughput, oha for fixed-rate latency),
//! the enforcer's CPU time and RSS from /proc, and the machine's idleness.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub use authz_tests::{cpu_us, rss_kib};

fn cpu_busy_fraction(over: Duration) -> Result<f64> {
    let read = || -> Result<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/stat")?;
        let v: Vec<u64> = s
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Ok((v.iter().sum(), idle))
    };
    let (t0, i0) = read()?;
    std::thread::sleep(over);
    let (t1, i1) = read()?;
    let total = (t1 - t0).max(1) as f64;
    Ok(1.0 - (i1 - i0) as f64 / total)
}

/// The machine's state before a run.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    /// Share of all CPUs busy in the last second before the run.
    pub busy: f64,
    pub loadavg_1m: f64,
    /// Seconds waited for the machine to become idle.
    pub waited_s: f64,
}

/// Waits (at most `max`) until less than 10% of the CPU time is busy, and says what it saw.
pub fn wait_idle(max: Duration) -> Result<Idle> {
    let start = Instant::now();
    let mut busy;
    loop {
        busy = cpu_busy_fraction(Duration::from_secs(1))?;
        if busy < 0.10 || start.elapsed() > max {
            break;
        }
    }
    let loadavg_1m = std::fs::read_to_string("/proc/loadavg")?
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0.0);
    Ok(Idle {
        busy,
        loadavg_1m,
        waited_s: start.elapsed().as_secs_f64(),
    })
}

/// Samples a process while a command runs: CPU time used and peak RSS.
pub struct Watched<T> {
    pub out: T,
    pub cpu_us: Option<u64>,
    pub peak_rss_kib: Option<u64>,
}

/// Runs `cmd` to completion while sampling `pid` (the enforcer) every 100 ms.
pub fn run_watching(mut cmd: Command, pid: Option<u32>) -> Result<Watched<String>> {
    let cpu0 = pid.map(cpu_us).transpose()?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the load generator")?;
    let mut peak = 0;
    while child.try_wait()?.is_none() {
        if let Some(p) = pid {
            peak = peak.max(rss_kib(p).unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu1 = pid.map(cpu_us).transpose()?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "load generator failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Watched {
        out: stdout,
        cpu_us: cpu0.zip(cpu1).map(|(a, b)| b - a),
        peak_rss_kib: pid.map(|_| peak),
    })
}

/// wrk's summary.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    /// Responses that were not 2xx/3xx (expected for the 403 scenario).
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            r.requests = line.split_whitespace().next().unwrap_or("0").parse()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            r.p50_ms = duration_ms(v).context("wrk p50")?;
        } else if let Some(v) = line.strip_prefix("99%") {
            r.p99_ms = duration_ms(v).context("wrk p99")?;
        }
    }
    if r.requests == 0 || r.rps == 0.0 {
        bail!("no requests in wrk output:\n{text}");
    }
    Ok(r)
}

/// oha's figures at a fixed rate (latency-corrected).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RateResult {
    pub rate: u32,
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Responses other than the expected status, plus transport errors.
    pub unexpected: u64,
}

/// Parses `oha --output-format json`; `expect` is the status every response should have.
pub fn parse_oha(text: &str, rate: u32, expect: u16) -> Result<RateResult> {
    let v: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("oha output: {text}"))?;
    let p = &v["latencyPercentiles"];
    let ms = |k: &str| {
        p[k].as_f64()
            .map(|s| s * 1000.0)
            .with_context(|| format!("oha: no {k}"))
    };
    let mut unexpected = 0;
    if let Some(codes) = v["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            if code != &expect.to_string() {
                unexpected += n.as_u64().unwrap_or(0);
            }
        }
    }
    if let Some(errs) = v["errorDistribution"].as_object() {
        // The run's end cutting requests short is not an answer of the target.
        unexpected += errs
            .iter()
            .filter(|(e, _)| !e.contains("aborted due to deadline"))
            .filter_map(|(_, n)| n.as_u64())
            .sum::<u64>();
    }
    Ok(RateResult {
        rate,
        achieved_rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: ms("p50")?,
        p99_ms: ms("p99")?,
        p999_ms: ms("p99.9")?,
        unexpected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output() {
        let text = "Running 10s test @ http://10.0.0.3:8080/x
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.60ms  400.00us  12.00ms   90.00%
    Req/Sec     8.76k   300.00     9.10k    70.00%
  Latency Distribution
     50%    2.60ms
     75%    2.80ms
     90%    3.00ms
     99%    4.00ms
  174280 requests in 10.00s, 25.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 174280
Requests/sec:  17428.00
Transfer/sec:      2.50MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(
            r,
            WrkResult {
                requests: 174280,
                rps: 17428.0,
                non_2xx: 174280,
                socket_errors: 3,
                p50_ms: 2.6,
                p99_ms: 4.0
            }
        );
        assert_eq!(duration_ms("780.00us"), Some(0.78));
        assert!(parse_wrk("unable to connect").is_err());
    }

    #[test]
    fn oha_output() {
        let text = r#"{"summary":{"successRate":1.0,"requestsPerSec":999.5},
            "latencyPercentiles":{"p50":0.00011,"p99":0.00022,"p99.9":0.0005},
            "statusCodeDistribution":{"200":9990,"503":3},"errorDistribution":{"connection closed":2,"aborted due to deadline":4}}"#;
        let r = parse_oha(text, 1000, 200).unwrap();
        assert_eq!(r.unexpected, 5);
        assert!((r.p99_ms - 0.22).abs() < 1e-9 && (r.p999_ms - 0.5).abs() < 1e-9);
    }
}
