use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Builds the eBPF programs (authz-ebpf) with the nightly toolchain and bpf-linker and leaves the
/// object in OUT_DIR, where `kernel` embeds it. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_KERNEL").is_none() {
        // The engine alone: nothing to embed.
        return Ok(());
    }
    let toolchain = std::env::var("AUTHZ_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    println!("cargo:rerun-if-env-changed=AUTHZ_EBPF_TOOLCHAIN");
    // aya-build watches the eBPF crate's folder only; the programs also embed the shared types.
    println!("cargo:rerun-if-changed=../authz-common");
    let meta = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../authz-ebpf");
    let root = meta.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let toolchain: &'static str = Box::leak(toolchain.into_boxed_str());
    aya_build::build_ebpf(
        [Package {
            name: "authz-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        if toolchain == "nightly" {
            Toolchain::Nightly
        } else {
            Toolchain::Custom(toolchain)
        },
    )
    .context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}
