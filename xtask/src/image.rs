//! `cargo xtask image`: the agent's OCI image, built with no registry and no base image: a
//! statically linked agent (musl) and the CA bundle HTTPS `jwksUri` needs, on `scratch`, with
//! buildah from Debian's packages. Written to `target/image/authz-agent.tar` (an OCI archive that
//! `podman load`, `ctr images import` and `skopeo copy` take) and tagged `authz-agent:dev` in
//! buildah's local storage.
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    cargo, root, run,
    setup::{apt_packages, ok, step},
    BuildEnv,
};

const TARGET: &str = "x86_64-unknown-linux-musl";
const TAG: &str = "authz-agent:dev";
/// Same place in the image as on Debian, where rustls-native-certs looks first.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub fn build(env: &BuildEnv) -> Result<PathBuf> {
    apt_packages(&["buildah", "musl-tools", "ca-certificates"])?;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l == TARGET)
    {
        step(&format!("rust target {TARGET} present"));
    } else {
        step(&format!("installing rust target {TARGET}"));
        if !ok("rustup", &["target", "add", TARGET]) {
            bail!("rustup target add {TARGET} failed");
        }
    }
    let mut c = cargo(env);
    c.args([
        "build",
        "--release",
        "--target",
        TARGET,
        "-p",
        "authz-user",
        "--bin",
        "authz-agent",
        "-p",
        "authz-cni",
        "--bin",
        "authz-cni",
    ]);
    run(c)?;
    // Static, or they would not start on scratch (nor the plugin on any node it is copied to).
    let static_stripped = |name: &str| -> Result<PathBuf> {
        let bin = root().join(format!("target/{TARGET}/release/{name}"));
        let ldd = Command::new("ldd").arg(&bin).output()?;
        let said = String::from_utf8_lossy(&ldd.stdout).to_string()
            + &String::from_utf8_lossy(&ldd.stderr);
        if !(said.contains("not a dynamic executable") || said.contains("statically linked")) {
            bail!("{} is not statically linked: {said}", bin.display());
        }
        let stripped = root().join("target/image").join(name);
        std::fs::create_dir_all(stripped.parent().unwrap())?;
        std::fs::copy(&bin, &stripped)?;
        if !ok("strip", &[&stripped.to_string_lossy()]) {
            bail!("strip failed");
        }
        Ok(stripped)
    };
    let stripped = static_stripped("authz-agent")?;
    let plugin = static_stripped("authz-cni")?;

    let buildah = |args: &[&str]| -> Result<String> {
        let out = Command::new("buildah")
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .context("running buildah")?;
        if !out.status.success() {
            bail!(
                "buildah {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let ctr = buildah(&["from", "scratch"])?;
    let result = (|| {
        buildah(&[
            "copy",
            &ctr,
            &stripped.to_string_lossy(),
            "/usr/local/bin/authz-agent",
        ])?;
        // The CNI plugin the agent installs on its node (beside it: where it looks).
        buildah(&[
            "copy",
            &ctr,
            &plugin.to_string_lossy(),
            "/usr/local/bin/authz-cni",
        ])?;
        buildah(&["copy", &ctr, CA_BUNDLE, CA_BUNDLE])?;
        buildah(&[
            "config",
            "--entrypoint",
            "[\"/usr/local/bin/authz-agent\"]",
            "--cmd",
            "[\"run\", \"--kubernetes\"]",
            "--label",
            "org.opencontainers.image.title=authz-agent",
            &ctr,
        ])?;
        buildah(&["commit", "--format", "oci", &ctr, TAG])
    })();
    let _ = buildah(&["rm", &ctr]);
    result?;
    let archive = root().join("target/image/authz-agent.tar");
    let _ = std::fs::remove_file(&archive);
    buildah(&[
        "push",
        TAG,
        &format!("oci-archive:{}:{TAG}", archive.display()),
    ])?;
    let mib = |p: &PathBuf| {
        std::fs::metadata(p)
            .map(|m| m.len() as f64 / 1048576.0)
            .unwrap_or(0.0)
    };
    eprintln!(
        "xtask image: {TAG} -> {} ({:.1} MiB; the agent {:.1} MiB, static)",
        archive.display(),
        mib(&archive),
        mib(&stripped)
    );
    Ok(archive)
}
