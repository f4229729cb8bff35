//! `cargo xtask vagrant-box` and `cargo xtask vagrant-test`: the kernel-path lane (and, with two
//! nodes, a request across two kernels) in Vagrant VMs on libvirt, on a Debian 12 box built here
//! from Debian's packages. The VMs are on isolated libvirt networks (no NAT, no route out): the
//! host reaches them, nothing else does.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{
    root,
    setup::{apt_packages, ok, step},
    vm, BuildEnv,
};

/// The box's name in `vagrant box list`.
pub const BOX: &str = "authz-debian12";

const HOST_PACKAGES: &[&str] = &[
    "vagrant",
    "vagrant-libvirt",
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "qemu-utils",
    "dnsmasq-base",
    "iptables",
    "rsync",
    "openssh-client",
    "debootstrap",
    "fdisk",
    "e2fsprogs",
];

/// Builds the box under target/vagrant (skipped when there) and adds it to Vagrant (skipped
/// when added). Returns the box file.
pub fn build_box() -> Result<PathBuf> {
    apt_packages(HOST_PACKAGES)?;
    let dir = root().join("target/vagrant");
    let file = dir.join(format!("{BOX}.box"));
    if file.exists() {
        step(&format!("box present: {}", file.display()));
    } else {
        std::fs::create_dir_all(&dir)?;
        step("building the box from Debian's packages (debootstrap; a few minutes)");
        let started = Instant::now();
        let st = Command::new("sh")
            .arg(root().join("vagrant/box.sh"))
            .arg(&dir)
            .arg(insecure_key()?)
            .status()
            .context("running vagrant/box.sh")?;
        if !st.success() {
            bail!("building the box failed");
        }
        step(&format!("box built in {:.0?}", started.elapsed()));
    }
    let list = Command::new("vagrant").args(["box", "list"]).output()?;
    let added = String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(BOX));
    if added {
        step(&format!("box {BOX} added"));
    } else {
        let st = Command::new("vagrant")
            .args(["box", "add", "--force", "--name", BOX])
            .arg(&file)
            .envs(vagrant_env())
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("vagrant box add failed");
        }
    }
    Ok(file)
}

/// Vagrant's insecure public key, which boxes carry for the first login (Vagrant then puts a
/// key of the machine's own in its place).
fn insecure_key() -> Result<PathBuf> {
    let gems = Path::new("/usr/share/rubygems-integration/all/gems");
    std::fs::read_dir(gems)
        .with_context(|| format!("{}: is Debian's vagrant installed?", gems.display()))?
        .flatten()
        .map(|e| e.path().join("keys/vagrant.pub"))
        .find(|p| {
            p.parent()
                .and_then(|k| k.parent())
                .and_then(|g| g.file_name())
                .is_some_and(|n| n.to_string_lossy().starts_with("vagrant-2"))
                && p.exists()
        })
        .context("Vagrant's insecure key (keys/vagrant.pub) not found")
}

fn vagrant_env() -> Vec<(&'static str, String)> {
    vec![
        ("VAGRANT_CHECKPOINT_DISABLE", "1".into()),
        ("VAGRANT_DEFAULT_PROVIDER", "libvirt".into()),
    ]
}

/// Runs the lane in a VM (`nodes` = 1) or the two-node check (`nodes` = 2) with `vagrant up`,
/// then destroys the VMs whatever happened.
pub fn test(env: &BuildEnv, nodes: u8) -> Result<()> {
    let started = Instant::now();
    build_box()?;
    crate::build(env)?;
    vm::prepare(env, &[])?;
    let daemons = Libvirt::start()?;
    let dir = root().join("vagrant");
    let kvm = vm::kvm_usable();
    let mut envs = vagrant_env();
    envs.extend([
        ("AUTHZ_BOX", BOX.to_string()),
        ("AUTHZ_NODES", nodes.to_string()),
        ("AUTHZ_ISOLATED", "1".into()),
        (
            "AUTHZ_LIBVIRT_DRIVER",
            if kvm { "kvm" } else { "qemu" }.to_string(),
        ),
    ]);
    if !kvm {
        envs.push(("AUTHZ_CPU_MODEL", "qemu64".into()));
    }
    step(&format!(
        "vagrant up: {nodes} VM(s) ({})",
        if kvm { "KVM" } else { "software emulation" }
    ));
    let up = run_filtered(
        Command::new("vagrant")
            .args(["up", "--no-parallel", "--provider", "libvirt"])
            .current_dir(&dir)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str()))),
    );
    let destroy = Command::new("vagrant")
        .args(["destroy", "-f"])
        .current_dir(&dir)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .status();
    drop(daemons);
    let passed = up?;
    eprintln!(
        "xtask vagrant-test: {} ({nodes} node(s)) in {:.0?}",
        if passed { "passed" } else { "FAILED" },
        started.elapsed()
    );
    if !destroy.is_ok_and(|s| s.success()) {
        bail!("vagrant destroy failed: see `virsh list --all`");
    }
    if !passed {
        bail!("the Vagrant lane failed");
    }
    Ok(())
}

/// Runs `c`, passing its output through except the box upload's thousands of progress lines.
fn run_filtered(c: &mut Command) -> Result<bool> {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running vagrant")?;
    let out = child.stdout.take().expect("piped");
    for line in BufReader::new(out).lines() {
        let line = line?;
        if !line.contains("Progress:") {
            println!("{line}");
        }
    }
    Ok(child.wait()?.success())
}

/// libvirt's daemons, started here when not running (no init system starts them on this kind
/// of machine); the ones started here are stopped on drop, and their firewall chains removed.
struct Libvirt {
    started: Vec<std::process::Child>,
}

impl Libvirt {
    fn start() -> Result<Libvirt> {
        let mut started = Vec::new();
        if Path::new("/run/libvirt/libvirt-sock").exists() {
            step("libvirtd running");
            return Ok(Libvirt { started });
        }
        step("starting virtlogd and libvirtd");
        for daemon in ["virtlogd", "libvirtd"] {
            started.push(
                Command::new(daemon)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("starting {daemon}"))?,
            );
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while !Path::new("/run/libvirt/libvirt-sock").exists() {
            if Instant::now() > deadline {
                bail!("libvirtd did not open its socket");
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Ok(Libvirt { started })
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        if self.started.is_empty() {
            return;
        }
        for child in self.started.iter_mut().rev() {
            let _ = ok("kill", &["-TERM", &child.id().to_string()]);
            let _ = child.wait();
        }
        // libvirt leaves its (empty) chains and the jumps to them behind.
        for tool in ["iptables", "ip6tables"] {
            for table in ["filter", "nat", "mangle"] {
                remove_libvirt_chains(tool, table);
            }
        }
    }
}

fn remove_libvirt_chains(tool: &str, table: &str) {
    let Ok(out) = Command::new(tool).args(["-t", table, "-S"]).output() else {
        return;
    };
    let rules = String::from_utf8_lossy(&out.stdout).to_string();
    for rule in rules.lines() {
        if let Some(r) = rule.strip_prefix("-A ") {
            if r.contains("-j LIBVIRT_") {
                let args: Vec<&str> = r.split_whitespace().collect();
                let _ = ok(tool, &[&["-t", table, "-D"][..], &args].concat());
            }
        }
    }
    for rule in rules.lines() {
        if let Some(chain) = rule.strip_prefix("-N ") {
            if chain.starts_with("LIBVIRT_") {
                let _ = ok(tool, &["-t", table, "-F", chain]);
                let _ = ok(tool, &["-t", table, "-X", chain]);
            }
        }
    }
}
