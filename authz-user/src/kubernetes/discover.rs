//! Finding a pod of this node on the host: its cgroup (kubelet's layout, systemd or cgroupfs
//! driver, cgroup v2) and its network namespace (through a process of the pod; needs hostPID).
use std::path::{Path, PathBuf};

/// Why a pod of this node cannot be located on the host (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocateError {
    #[error("pod uid {0:?} is not a UUID")]
    BadUid(String),
    #[error("no cgroup for pod uid {uid} under {root} (kubepods, systemd or cgroupfs layout)")]
    NoCgroup { uid: String, root: PathBuf },
    #[error("no process in {0} yet (pod not started)")]
    NotStarted(PathBuf),
    #[error("process {0} of the pod is in the host's network namespace")]
    HostNetwork(u32),
    #[error("{path}: {why}")]
    Io { path: PathBuf, why: String },
}

/// Where kubelet puts a pod's cgroup, relative to the cgroup2 mount, for a pod UID.
/// systemd driver: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`
/// (guaranteed pods directly under `kubepods.slice`); cgroupfs: `kubepods/besteffort/pod<uid>`.
pub fn cgroup_candidates(uid: &str) -> Vec<PathBuf> {
    let u = uid.replace('-', "_");
    let mut out = vec![
        PathBuf::from(format!("kubepods.slice/kubepods-pod{u}.slice")),
        PathBuf::from(format!("kubepods/pod{uid}")),
    ];
    for qos in ["besteffort", "burstable"] {
        out.push(PathBuf::from(format!(
            "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"
        )));
        out.push(PathBuf::from(format!("kubepods/{qos}/pod{uid}")));
    }
    out
}

/// A pod UID is a UUID; anything else must not reach a path.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The pod's cgroup directory under `root`: kubelet's own paths first, then a bounded search
/// for nested layouts (kind, or kubelet in a slice of its own).
pub fn find_cgroup(root: &Path, uid: &str) -> Result<PathBuf, LocateError> {
    if !valid_uid(uid) {
        return Err(LocateError::BadUid(uid.into()));
    }
    for rel in cgroup_candidates(uid) {
        let p = root.join(rel);
        if p.is_dir() {
            return Ok(p);
        }
    }
    let names = [
        format!("pod{uid}"),
        format!("pod{}.slice", uid.replace('-', "_")),
    ];
    if let Some(p) = search(root, &names, 0) {
        return Ok(p);
    }
    Err(LocateError::NoCgroup {
        uid: uid.into(),
        root: root.into(),
    })
}

fn search(dir: &Path, names: &[String; 2], depth: usize) -> Option<PathBuf> {
    if depth > 4 {
        return None;
    }
    let rd = std::fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for e in rd.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name == names[0] || name.ends_with(&format!("-{}", names[1])) {
            return Some(e.path());
        }
        // Only descend where pods live; the rest of the hierarchy can be large.
        if name.contains("kubepods") || name.contains("kubelet") {
            subdirs.push(e.path());
        }
    }
    subdirs.sort();
    subdirs.iter().find_map(|d| search(d, names, depth + 1))
}

/// A process in the pod's cgroup or below it (the sandbox or a container), lowest PID first
/// so the same pod always gives the same answer.
pub fn pod_process(cgroup: &Path) -> Result<u32, LocateError> {
    fn walk(dir: &Path, depth: usize, best: &mut Option<u32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                *best = Some(best.map_or(pid, |b: u32| b.min(pid)));
            }
        }
        if depth >= 3 {
            return;
        }
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), depth + 1, best);
                }
            }
        }
    }
    let mut best = None;
    walk(cgroup, 0, &mut best);
    best.ok_or_else(|| LocateError::NotStarted(cgroup.into()))
}

/// The pod's cgroup and a path to its network namespace. The netns must differ from the
/// agent's own: a pod sharing the host's network is never enrolled.
pub fn locate(
    cgroup_root: &Path,
    proc_root: &Path,
    uid: &str,
) -> Result<(PathBuf, PathBuf), LocateError> {
    use std::os::unix::fs::MetadataExt;
    let cgroup = find_cgroup(cgroup_root, uid)?;
    let pid = pod_process(&cgroup)?;
    let netns = proc_root.join(format!("{pid}/ns/net"));
    let meta = |p: &Path| {
        std::fs::metadata(p).map_err(|e| LocateError::Io {
            path: p.into(),
            why: e.to_string(),
        })
    };
    let theirs = meta(&netns)?;
    let ours = meta(Path::new("/proc/self/ns/net"))?;
    if theirs.ino() == ours.ino() && theirs.dev() == ours.dev() {
        return Err(LocateError::HostNetwork(pid));
    }
    Ok((cgroup, netns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_layouts_are_found() {
        let root = std::env::temp_dir().join(format!("authz-discover-{}", std::process::id()));
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let layouts = [
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
            "kubepods.slice/kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
            "kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
        ];
        for l in layouts {
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join(l)).unwrap();
            std::fs::create_dir_all(
                root.join("kubepods/besteffort/pod00000000-0000-0000-0000-000000000000"),
            )
            .unwrap();
            assert_eq!(find_cgroup(&root, uid).unwrap(), root.join(l), "{l}");
        }
        assert!(find_cgroup(&root, "ffffffff-0000-0000-0000-000000000000").is_err());
        assert!(find_cgroup(&root, "../../etc").is_err());
        let _ = std::fs::remove_dir_all(&root);
    }
}
