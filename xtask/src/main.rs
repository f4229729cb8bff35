//! `cargo xtask ...`: everything that is not a plain `cargo build`.
//!   setup  install the eBPF toolchain and test tools when missing
//!   build  setup + release build of the agent (eBPF object embedded)
//!   test   setup + fmt + clippy + build + unit tests + image + privileged end-to-end tests
//!          (one runs the image under containerd) + the 6.1 VM lane + fuzzing
//!   demo   setup + build + the skip-path scenario on demo pods, as a table
//!   image  the agent's OCI image (static, on scratch) with buildah
//!   vm-test  the kernel-path tests on Debian's 6.1 or 6.12 kernel in a VM (or the host's)
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod image;
mod setup;
mod vagrant;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need, skipping what is already there.
    Setup,
    /// Build the agent in release mode.
    Build,
    /// Run every test: unit tests, then the privileged end-to-end tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the skip-path scenario on demo pods and print what happened.
    Demo,
    /// Benchmark the agent side by side with direct, HAProxy and Envoy (needs root); writes
    /// tests/bench-results/<date>/. Arguments go to authz-bench (e.g. --secs 5 --targets agent,haproxy).
    Bench {
        /// Build the agent of this revision too and compare it with the working tree's, in one
        /// run, alternating (the agent targets both ways; writes compare.md).
        #[arg(long, value_name = "REV")]
        compare: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the kernel-path tests (kernel path, FAQ, fail modes, hot restart) on another kernel:
    /// Debian's 6.1 or 6.12 booted with the host's file system under qemu (virtme-ng), or the
    /// host's own; binaries built here, nothing built in the VM. Needs root.
    VmTest {
        /// 6.1 (Debian 12), 6.12 (Debian 12 backports, Debian 13), host, or a kernel image path.
        #[arg(long, default_value = "6.1")]
        kernel: vm::Kernel,
        /// Only build the binaries and write target/vm-lane.sh (for Vagrant, or another VM).
        #[arg(long)]
        prepare: bool,
        /// A test name filter, passed to every test binary.
        #[arg(trailing_var_arg = true)]
        filter: Vec<String>,
    },
    /// Build a Debian 12 box for Vagrant's libvirt provider from Debian's packages (cached
    /// under target/vagrant) and add it as `authz-debian12`. Needs root.
    VagrantBox,
    /// Run the kernel-path lane in a Vagrant VM (libvirt, the box above), or with `--nodes 2`
    /// a request between pods of two VMs, each with its agent; destroys the VMs after. Needs root.
    VagrantTest {
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        nodes: u8,
    },
    /// Build the agent's OCI image (static musl agent + CA bundle on scratch, buildah; no registry,
    /// no base image) into target/image/authz-agent.tar. Needs root.
    Image,
    /// Run every fuzz target for a bounded time (cargo fuzz, nightly), from a random seed.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup::run().map(|_| ()),
        Cmd::Build => setup::run().and_then(|env| build(&env)),
        Cmd::Test { args } => setup::run().and_then(|env| test(&env, &args)),
        Cmd::Demo => setup::run().and_then(|env| {
            build(&env)?;
            // The demo lives in the test crate (it uses the test pods); xtask only starts it.
            run(Command::new(root().join("target/release/authz-demo")))
        }),
        Cmd::Bench { compare, args } => {
            setup::run().and_then(|env| bench::run_bench(&env, compare.as_deref(), &args))
        }
        Cmd::VmTest {
            kernel,
            prepare,
            filter,
        } => setup::run().and_then(|env| {
            build(&env)?;
            if prepare {
                let script = vm::prepare(&env, &filter)?;
                eprintln!("xtask: wrote {}", script.display());
                return Ok(());
            }
            vm::run(&env, &kernel, &filter)
        }),
        Cmd::VagrantBox => vagrant::build_box().map(|_| ()),
        Cmd::VagrantTest { nodes } => setup::run().and_then(|env| vagrant::test(&env, nodes)),
        Cmd::Image => setup::run().and_then(|env| image::build(&env).map(|_| ())),
        Cmd::Fuzz { secs } => setup::run().and_then(|env| fuzz(&env, FuzzBudget::Secs(secs))),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Environment for cargo commands that build the eBPF part.
pub struct BuildEnv {
    pub path: String,
    pub ebpf_toolchain: String,
}

fn cargo(env: &BuildEnv) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root())
        .env("PATH", &env.path)
        .env("AUTHZ_EBPF_TOOLCHAIN", &env.ebpf_toolchain);
    c
}

fn run(mut c: Command) -> Result<()> {
    eprintln!("xtask: running {c:?}");
    let st = c.status().with_context(|| format!("starting {c:?}"))?;
    if !st.success() {
        bail!("{c:?} failed with {st}");
    }
    Ok(())
}

fn build(env: &BuildEnv) -> Result<()> {
    let mut c = cargo(env);
    c.args([
        "build",
        "--release",
        "-p",
        "authz-user",
        "-p",
        "authz-cni",
        "-p",
        "authz-tests",
        "--bins",
    ]);
    run(c)
}

fn test(env: &BuildEnv, extra: &[String]) -> Result<()> {
    let started = std::time::Instant::now();
    // Formatting and lints first: cheap, and a failure says what to fix.
    let mut c = cargo(env);
    c.args(["fmt", "--all", "--", "--check"]);
    run(c)?;
    let mut c = cargo(env);
    c.args([
        "clippy",
        "--workspace",
        "--exclude",
        "authz-ebpf",
        "--all-targets",
        "--features",
        "authz-user/testkeys",
        "--",
        "-D",
        "warnings",
    ]);
    run(c)?;
    build(env)?;
    // Unit and pure tests of every crate.
    let mut c = cargo(env);
    c.args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "authz-tests",
        "--exclude",
        "authz-ebpf",
        "--features",
        "authz-user/testkeys",
    ])
    .args(extra);
    run(c)?;
    // End-to-end tests through the kernel path: root, real namespaces and cgroups.
    if unsafe_geteuid() != 0 {
        bail!("the end-to-end tests need root (they create network namespaces and load eBPF programs)");
    }
    let helm = setup::helm()?;
    // The image, for the test that runs it under containerd as the DaemonSet does.
    let image = image::build(env)?;
    // containerd runs the image, and starts pods through the CNI chain with Debian's plugins.
    setup::apt_packages(&["containerd", "containernetworking-plugins"])?;
    // Envoy 1.40, which the CUSTOM test compares the agent with request by request.
    setup::apt_packages(&["python3-venv"])?;
    let envoy = bench::envoy()?;
    let mut c = cargo(env);
    c.args(["test", "--release", "-p", "authz-tests"])
        .args(extra)
        .env("AUTHZ_AGENT_BIN", root().join("target/release/authz-agent"))
        .env("AUTHZ_ENVOY", envoy)
        .env("AUTHZ_HELM", helm)
        .env("AUTHZ_IMAGE", image)
        .args(["--", "--test-threads=2"]);
    run(c)?;
    // The kernel-path lane again on the oldest kernel we claim (Debian 12's 6.1), in a VM. A
    // filtered run (`cargo xtask test NAME`) is a developer's quick loop: it skips the lane.
    if extra.is_empty() {
        vm::run(env, &vm::Kernel::Debian("6.1".into()), &[])?;
    } else {
        eprintln!("xtask: test filter given: skipping the 6.1 VM lane (run `cargo xtask vm-test`)");
    }
    // Each fuzz target for a fixed number of runs from a fixed seed: a regression in hostile-input
    // handling fails the suite, and the same commit always gives the same result. Open-ended
    // exploration is `cargo xtask fuzz`.
    let runs = std::env::var("AUTHZ_FUZZ_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    fuzz(env, FuzzBudget::Runs(runs))?;
    eprintln!("xtask: all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

const FUZZ_TARGETS: &[&str] = &["jwt", "jwks", "policy_yaml", "path", "request"];

enum FuzzBudget {
    /// Wall-clock seconds per target, random seed.
    Secs(u64),
    /// Inputs per target, fixed seed: reproducible.
    Runs(u64),
}

fn fuzz(env: &BuildEnv, budget: FuzzBudget) -> Result<()> {
    setup::cargo_fuzz(env)?;
    for t in FUZZ_TARGETS {
        // New inputs go to a scratch folder; the seed corpus in the repo is only read.
        let scratch = std::env::temp_dir().join(format!("authz-fuzz-{t}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        let mut c = Command::new("rustup");
        c.current_dir(root())
            .env("PATH", &env.path)
            .args([
                "run",
                &env.ebpf_toolchain,
                "cargo",
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                t,
            ])
            .arg(&scratch)
            .arg(root().join("fuzz/corpus").join(t))
            .args(["--", "-print_final_stats=0"]);
        match budget {
            FuzzBudget::Secs(secs) => c.arg(format!("-max_total_time={secs}")),
            FuzzBudget::Runs(runs) => c.args([format!("-runs={runs}"), "-seed=1".into()]),
        };
        let r = run(c);
        let _ = std::fs::remove_dir_all(&scratch);
        r.with_context(|| format!("fuzz target {t} found a failure (see fuzz/artifacts/{t}/)"))?;
    }
    Ok(())
}

/// Today's UTC date, YYYY-MM-DD.
fn today_utc() -> String {
    Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "undated".into())
}

fn unsafe_geteuid() -> u32 {
    // Read from /proc to avoid a libc dependency in xtask.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(2).and_then(|u| u.parse().ok()))
        .unwrap_or(u32::MAX)
}
