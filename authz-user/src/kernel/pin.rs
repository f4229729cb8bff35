//! bpffs pinning: the maps and links live under one directory so enforcement outlives the agent
//! process (the heartbeat turns a dead agent into the configured fail mode), a new agent adopts
//! them, and `authz-agent cleanup` removes them.
//!
//! Layout: `<bpffs>/v<layout>/maps/<MAP>` and `<bpffs>/v<layout>/links/<program>`, one directory
//! per layout version (`kernel::LAYOUT`): an agent adopts only its own layout's state, and takes
//! over any other's (an upgrade or a rollback) by building its own beside it, then retiring it.
//! Agents from before versioning pinned under `<bpffs>/maps` and `<bpffs>/links` (the legacy
//! layout, taken over the same way).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};

/// statfs magic of a bpf file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted when nothing is.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

pub fn maps_dir(dir: &Path) -> PathBuf {
    dir.join("maps")
}

pub fn link_path(dir: &Path, program: &str) -> PathBuf {
    dir.join("links").join(program)
}

// f_type is i64 on x86-64 but narrower on some architectures.
#[allow(clippy::useless_conversion)]
fn is_bpffs(path: &Path) -> bool {
    // (i64 with glibc, u64 with musl.)
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| i64::try_from(s.filesystem_type().0).ok() == Some(BPF_FS_MAGIC))
}

/// The directory of layout `layout` under the agent's bpffs directory.
pub fn layout_dir(base: &Path, layout: u32) -> PathBuf {
    base.join(format!("v{layout}"))
}

/// State of other layouts under `base` than `mine`: the legacy layout (`base` itself, when it
/// has `maps/`) and every `v*` directory but `mine`.
pub fn other_layouts(base: &Path, mine: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    if maps_dir(base).exists() || base.join("links").exists() {
        found.push(base.to_path_buf());
    }
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let p = e.path();
            let versioned = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .is_some_and(|v| v.parse::<u32>().is_ok());
            if versioned && p != mine && p.is_dir() {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

/// Creates `dir` (and its `maps/`, `links/`) on a bpf file system; mounts bpffs on /sys/fs/bpf
/// first when `dir` is under it and nothing is mounted there yet.
pub fn prepare(dir: &Path) -> Result<()> {
    let mount = Path::new(BPFFS_MOUNT);
    if dir.starts_with(mount) {
        // Agents starting together must not each mount bpffs: a second mount would hide the
        // first one's pins. Check and mount under a lock.
        let _lock = lock_file("/run/authz-agent-bpffs.lock")?;
        if !is_bpffs(mount) {
            std::fs::create_dir_all(mount).with_context(|| format!("creating {BPFFS_MOUNT}"))?;
            nix::mount::mount(
                Some("bpf"),
                mount,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("mounting bpffs on {BPFFS_MOUNT}"))?;
            tracing::info!("mounted bpffs on {BPFFS_MOUNT}");
        }
    }
    for d in [maps_dir(dir), dir.join("links")] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpf file system (set agent.bpffs to a directory under a bpffs mount)",
            dir.display()
        );
    }
    Ok(())
}

/// An exclusive flock on `path`, released when the file is dropped.
fn lock_file(path: &str) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    // SAFETY: flock on an open file descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {path}"));
    }
    Ok(f)
}

/// Pins `link` at `path`, replacing (and detaching) a link a previous agent pinned there.
/// The new link is attached before the old one goes, so enforcement has no gap.
pub fn pin_replacing(link: FdLink, path: &Path) -> Result<PinnedLink> {
    if path.exists() {
        detach_pinned(path)?;
    }
    link.pin(path)
        .with_context(|| format!("pinning link at {}", path.display()))
}

/// Detaches the link pinned at `path` (even while another process holds it) and unpins it.
fn detach_pinned(path: &Path) -> Result<()> {
    let old = PinnedLink::from_pin(path)
        .with_context(|| format!("opening pinned link {}", path.display()))?;
    let fd: FdLink = old
        .unpin()
        .with_context(|| format!("unpinning {}", path.display()))?;
    use aya::programs::links::Link as _;
    fd.detach()
        .with_context(|| format!("detaching {}", path.display()))?;
    Ok(())
}

/// Detaches and unpins the link at `path`; nothing there is nothing to do.
pub fn unpin_detach(path: &Path) -> Result<()> {
    if path.exists() {
        detach_pinned(path)?;
    }
    Ok(())
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Detaches every pinned link and unpins every map under `base`, whatever layout pinned them,
/// then removes `base`. Idempotent: a missing directory is nothing to do.
pub fn cleanup(base: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    if !base.exists() {
        return Ok(removed);
    }
    if !is_bpffs(base) {
        bail!(
            "{} is not on a bpf file system; not touching it",
            base.display()
        );
    }
    for dir in other_layouts(base, Path::new("")) {
        let r = retire(&dir, &Default::default())?;
        removed.links += r.links;
        removed.maps += r.maps;
    }
    match std::fs::remove_dir(base) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", base.display())),
    }
    Ok(removed)
}

/// Removes one layout's state: its source-check filters (but those on `keep`, which the caller
/// has since replaced with its own), every pinned link, every map; then its directories (not the
/// legacy layout's base, which holds the others).
pub fn retire(dir: &Path, keep: &std::collections::HashSet<u32>) -> Result<Removed> {
    let mut removed = Removed::default();
    // Links first: once they are gone no program steers traffic into maps we then drop.
    removed.links += super::source::cleanup_filters(&maps_dir(dir), keep)?;
    if let Ok(entries) = std::fs::read_dir(dir.join("links")) {
        for e in entries.flatten() {
            let done = detach_pinned(&e.path());
            // A source check's link whose interface went with its pod: nothing left to detach.
            if done.is_err() && e.file_name().to_string_lossy().starts_with("source-") {
                let _ = std::fs::remove_file(e.path());
            } else {
                done?;
            }
            removed.links += 1;
        }
    }
    if let Ok(entries) = std::fs::read_dir(maps_dir(dir)) {
        for e in entries.flatten() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("unpinning {}", e.path().display()))?;
            removed.maps += 1;
        }
    }
    let versioned = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('v'));
    let mut dirs = vec![dir.join("links"), maps_dir(dir)];
    if versioned {
        dirs.push(dir.to_path_buf());
    }
    for d in dirs {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", d.display())),
        }
    }
    Ok(removed)
}
