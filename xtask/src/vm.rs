//! `cargo xtask vm-test`: the privileged end-to-end tests on another kernel. The kernel (Debian's
//! package for the release asked for) boots under qemu with the host's root file system through
//! virtme-ng, and runs the test binaries already built on the host: nothing is built inside the
//! VM. KVM when the CPU offers it, software emulation otherwise.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{
    root,
    setup::{apt_packages, ok, step},
    BuildEnv,
};

/// The tests that prove the kernel path: steering, the FAQ, fail modes, hot restart, several
/// nodes, identity (the source check), upgrades across layouts.
pub const LANE: &[&str] = &[
    "kernel_path",
    "faq",
    "inbound",
    "fail_modes",
    "hot_restart",
    "cluster",
    "identity",
    "upgrade",
];
const VIRTME_NG: &str = "virtme-ng==1.42";
/// Debian 12's kernel series, and the one its backports (and Debian 13) ship.
const SERIES: &[(&str, &str)] = &[("6.1", "bookworm"), ("6.12", "bookworm-backports")];

/// Refuses a kernel older than the agent's minimum (5.15) before any test runs, naming what it
/// lacks (the agent checks it again at start).
const MINIMUM_CHECK: &str = "v=$(uname -r); major=${v%%.*}; rest=${v#*.}; minor=${rest%%[!0-9]*}\n\
if [ \"$major\" -lt 5 ] || { [ \"$major\" -eq 5 ] && [ \"$minor\" -lt 15 ]; }; then\n\
  echo \"kernel $v is older than 5.15, the minimum: bpf_get_netns_cookie in sock_ops and sk_msg programs\"; exit 2\nfi\n";

/// Which kernel to boot.
#[derive(Debug, Clone)]
pub enum Kernel {
    /// Debian's package of this series ("6.1", "6.12").
    Debian(String),
    /// No VM: the lane on the host's own kernel.
    Host,
    /// A kernel image whose modules are installed under /lib/modules.
    Image(PathBuf),
}

impl std::str::FromStr for Kernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Kernel, String> {
        Ok(match s {
            "host" => Kernel::Host,
            _ if SERIES.iter().any(|(v, _)| *v == s) => Kernel::Debian(s.to_string()),
            _ if Path::new(s).is_file() => Kernel::Image(PathBuf::from(s)),
            _ => {
                return Err(format!(
                    "{s:?}: use 6.1, 6.12, host or the path of a kernel image"
                ))
            }
        })
    }
}

/// Runs the lane's test binaries on `kernel`, with `filter` passed to each; fails when any test
/// fails.
pub fn run(env: &BuildEnv, kernel: &Kernel, filter: &[String]) -> Result<()> {
    let started = std::time::Instant::now();
    let script = prepare(env, filter)?;
    let script = format!("cd {} && sh {}", root().display(), script.display());
    let st = match kernel {
        Kernel::Host => Command::new("sh").args(["-c", &script]).status()?,
        Kernel::Debian(series) => {
            let image = debian_kernel(series)?;
            boot(&image, &script)?
        }
        Kernel::Image(image) => boot(image, &script)?,
    };
    eprintln!(
        "xtask vm-test: {} on {kernel:?} in {:.0?}",
        if st.success() { "passed" } else { "FAILED" },
        started.elapsed()
    );
    if !st.success() {
        bail!("tests failed on {kernel:?}");
    }
    Ok(())
}

/// Builds the lane's test binaries and writes `target/vm-lane.sh`, which runs them from the
/// repository's root with paths relative to it. The binaries it runs (the agent, the test
/// server, the tests) are linked into `target/vm-lane/`, so a VM that gets the tree synced
/// elsewhere needs only the sources and that folder (as the Vagrantfile does). Returns the
/// script's path relative to the root.
pub fn prepare(env: &BuildEnv, filter: &[String]) -> Result<PathBuf> {
    let binaries = test_binaries(env, LANE)?;
    let dir = root().join("target/vm-lane");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let release = root().join("target/release");
    for name in ["authz-agent", "authz-testsrv"] {
        link_or_copy(&release.join(name), &dir.join(name))?;
    }
    let filter: Vec<String> = filter.iter().map(|f| shell_quote(f)).collect();
    let mut script = format!(
        "#!/bin/sh\n# Written by `cargo xtask vm-test`: the kernel-path lane, run from the repository root.\n\
         export AUTHZ_AGENT_BIN=\"$PWD/target/vm-lane/authz-agent\" AUTHZ_TESTSRV_BIN=\"$PWD/target/vm-lane/authz-testsrv\" AUTHZ_TESTS_DIR=\"$PWD/tests\"\n\
         echo \"kernel: $(uname -r)\"\n{MINIMUM_CHECK}fail=0\ncd tests\n",
    );
    for (name, bin) in &binaries {
        link_or_copy(bin, &dir.join(name))?;
        script.push_str(&format!(
            "echo \"== {name}\"\n../target/vm-lane/{name} --test-threads=1 {} || fail=1\n",
            filter.join(" ")
        ));
    }
    script.push_str("exit $fail\n");
    let rel = PathBuf::from("target/vm-lane.sh");
    std::fs::write(root().join(&rel), script)?;
    Ok(rel)
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// Builds the test binaries (on the host) and returns (name, path) of those in `names`.
fn test_binaries(env: &BuildEnv, names: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let out = crate::cargo(env)
        .args([
            "test",
            "--release",
            "-p",
            "authz-tests",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .context("building the test binaries")?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if v["target"]["kind"][0] == "test" && names.contains(&name) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    found.sort_by_key(|(n, _)| names.iter().position(|x| x == n));
    if found.len() != names.len() {
        bail!("test binaries missing: found {found:?}, want {names:?}");
    }
    Ok(found)
}

/// Installs Debian's kernel of `series` (skipped when present) and returns its image.
fn debian_kernel(series: &str) -> Result<PathBuf> {
    let suite = SERIES
        .iter()
        .find(|(v, _)| *v == series)
        .map(|(_, s)| *s)
        .context("unknown series")?;
    if let Some(img) = installed_image(series) {
        step(&format!("kernel {series} present: {}", img.display()));
        return Ok(img);
    }
    if suite == "bookworm-backports" {
        let list = Path::new("/etc/apt/sources.list.d/bookworm-backports.list");
        if !list.exists() {
            step("adding bookworm-backports to apt's sources");
            std::fs::write(
                list,
                "deb http://deb.debian.org/debian bookworm-backports main\n",
            )?;
            if !ok("apt-get", &["update", "-qq"]) {
                bail!("apt-get update failed");
            }
        }
    } else if !ok("apt-cache", &["show", "linux-image-amd64/bookworm"]) {
        let _ = ok("apt-get", &["update", "-qq"]);
    }
    // The versioned package the suite's meta package points at, installed beside any other.
    let show = Command::new("apt-cache")
        .args(["show", &format!("linux-image-amd64/{suite}")])
        .output()?;
    let text = String::from_utf8_lossy(&show.stdout);
    let package = text
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .and_then(|d| d.split([',', ' ']).find(|p| p.starts_with("linux-image-")))
        .with_context(|| format!("no linux-image-amd64 in {suite}"))?
        .to_string();
    apt_packages(&[package.as_str()])?;
    installed_image(series)
        .with_context(|| format!("{package} installed no /boot/vmlinuz-{series}.*"))
}

fn installed_image(series: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.strip_prefix("vmlinuz-")
                .and_then(|v| v.strip_prefix(series))
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Boots `image` with the host's root file system and runs `script` as root inside.
fn boot(image: &Path, script: &str) -> Result<std::process::ExitStatus> {
    apt_packages(&["qemu-system-x86", "busybox-static"])?;
    let vng = virtme_ng()?;
    let kvm = kvm_usable();
    step(&format!(
        "booting {} ({})",
        image.display(),
        if kvm {
            "KVM"
        } else {
            "software emulation: expect minutes"
        }
    ));
    let mut c = Command::new(&vng);
    c.env(
        "PATH",
        format!(
            "{}:{}",
            vng.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    )
    .current_dir(root())
    .arg("--run")
    .arg(image)
    .args([
        "--user",
        "root",
        "--force-9p",
        "--memory",
        "2G",
        "--cpus",
        "2",
    ]);
    if !kvm {
        c.arg("--disable-kvm");
    }
    c.args(["--exec", script]);
    c.status().context("running virtme-ng")
}

/// virtme-ng from PyPI, in a venv of its own under target/tools.
fn virtme_ng() -> Result<PathBuf> {
    let venv = root().join("target/tools/virtme-ng");
    let vng = venv.join("bin/vng");
    if ok(&vng.to_string_lossy(), &["--version"]) {
        step("virtme-ng present");
        return Ok(vng);
    }
    if !ok("python3", &["-m", "venv", "--help"]) {
        apt_packages(&["python3-venv"])?;
    }
    step(&format!(
        "installing {VIRTME_NG} (PyPI) in {}",
        venv.display()
    ));
    let st = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()?;
    if !st.success() {
        bail!("python3 -m venv failed");
    }
    let st = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", VIRTME_NG])
        .status()?;
    if !st.success() {
        bail!("pip install {VIRTME_NG} failed");
    }
    Ok(vng)
}

/// KVM only when the CPU offers virtualization to this machine (a nested or paravirtual
/// /dev/kvm without it does not run stock kernels); `AUTHZ_VM_ACCEL=kvm|tcg` decides otherwise.
pub fn kvm_usable() -> bool {
    match std::env::var("AUTHZ_VM_ACCEL").as_deref() {
        Ok("kvm") => return true,
        Ok("tcg") => return false,
        _ => {}
    }
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Path::new("/dev/kvm").exists() && flags.split_whitespace().any(|f| f == "vmx" || f == "svm")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
