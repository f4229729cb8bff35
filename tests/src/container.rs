//! The agent's image under a real container runtime: containerd (its own daemon, socket and
//! storage under a temporary directory) and runc, started as kubelet starts the DaemonSet's pod.
//! Every setting of the pod spec that changes how the container runs is translated to the
//! runtime; a setting the translation does not know fails the test instead of being dropped, so
//! the container runs exactly as the manifest says or not at all.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::Value;

/// A containerd of its own: nothing of the machine's runtime (if any) is touched.
pub struct Containerd {
    dir: PathBuf,
    daemon: Child,
    socket: PathBuf,
}

const NAMESPACE: &str = "authz-test";

impl Containerd {
    pub fn start() -> Result<Containerd> {
        let dir = std::env::temp_dir().join(format!("authz-containerd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("containerd.sock");
        // CRI is kubelet's door; the test plays kubelet through ctr, so it is not loaded.
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{s}\"\n",
            d = dir.display(),
            s = socket.display()
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log"))?)
            .spawn()
            .context(
                "starting containerd (apt package containerd; cargo xtask test installs it)",
            )?;
        let c = Containerd {
            dir,
            daemon,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr().arg("version").output()?.status.success() {
            if Instant::now() > deadline {
                bail!("containerd did not start: {}", c.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(c)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` on this daemon's socket and namespace.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE]);
        c
    }

    /// Imports an OCI archive; returns the image's name.
    pub fn import(&self, archive: &Path) -> Result<String> {
        let out = self
            .ctr()
            .args(["images", "import", "--snapshotter", "native"])
            .arg(archive)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr images import: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ls = self.ctr().args(["images", "ls", "-q"]).output()?;
        String::from_utf8_lossy(&ls.stdout)
            .lines()
            .next()
            .map(str::to_string)
            .context("no image after import")
    }

    /// The host PID of a running container's main process.
    pub fn task_pid(&self, id: &str) -> Result<u32> {
        let out = self.ctr().args(["tasks", "ls"]).output()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&id) && f.get(2) == Some(&"RUNNING"))
                    .then(|| f[1].parse().ok())
                    .flatten()
            })
            .with_context(|| format!("no running task {id}"))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Whatever a failed test left running: its tasks, containers and their shims.
        if let Ok(out) = self.ctr().args(["tasks", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr().args(["tasks", "rm", "-f", id]).output();
            }
        }
        if let Ok(out) = self.ctr().args(["containers", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr().args(["containers", "rm", id]).output();
            }
        }
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
        let prefix = self.dir.to_string_lossy().to_string();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut inside: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            inside.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in inside {
                let _ = Command::new("umount").args(["-l", m]).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the image says to run (its OCI config).
#[derive(Debug, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

/// Reads the image config out of an OCI archive (index -> manifest -> config).
pub fn image_config(archive: &Path) -> Result<ImageConfig> {
    let member = |name: &str| -> Result<Value> {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg(name)
            .output()?;
        if !out.status.success() {
            bail!("{name} not in {}", archive.display());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let blob = |digest: &Value| -> Result<Value> {
        let d = digest.as_str().context("digest")?;
        member(&format!("blobs/{}", d.replacen(':', "/", 1)))
    };
    let index = member("index.json")?;
    let manifest = blob(&index["manifests"][0]["digest"])?;
    let config = blob(&manifest["config"]["digest"])?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(ImageConfig {
        entrypoint: strings(&config["config"]["Entrypoint"]),
        cmd: strings(&config["config"]["Cmd"]),
        env: strings(&config["config"]["Env"]),
    })
}

/// What kubelet provides beside the pod spec.
pub struct Kubelet {
    pub node_name: String,
    /// Where each ConfigMap volume's files were written, by ConfigMap name.
    pub config_maps: Vec<(String, PathBuf)>,
    /// Where emptyDir volumes live.
    pub scratch: PathBuf,
    /// The service account volume kubelet mounts in every container (its directory here).
    pub service_account: Option<PathBuf>,
    /// What kubelet adds to every container's environment (the API server's address).
    pub env: Vec<(String, String)>,
    /// hostPath volumes the test stands in for with directories of its own (the node's CNI
    /// configuration must not be the machine's).
    pub host_paths: Vec<(String, PathBuf)>,
}

/// Where kubelet mounts the service account's token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// containerd's capabilities for a container that is not privileged, before the spec's drop
/// and add (the same set the CRI plugin starts from).
pub const RUNTIME_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The capabilities the container's process gets: None when privileged (all of them).
pub fn granted_caps(c: &Container) -> Option<Vec<String>> {
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        return None;
    }
    let caps = sc.capabilities.unwrap_or_default();
    let drop = caps.drop.unwrap_or_default();
    let mut set: Vec<String> = RUNTIME_DEFAULT_CAPS
        .iter()
        .map(|s| s.to_string())
        .filter(|c| !drop.iter().any(|d| d == "ALL" || d == c))
        .collect();
    for a in caps.add.unwrap_or_default() {
        if !set.contains(&a) {
            set.push(a);
        }
    }
    Some(set)
}

/// `ctr run` arguments that start `image` as container `id` the way kubelet (through CRI)
/// would start the pod's only container. Refuses settings it cannot honour.
pub fn ctr_run_args(
    pod: &PodSpec,
    image: &str,
    config: &ImageConfig,
    id: &str,
    k: &Kubelet,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--snapshotter".into(),
        "native".into(),
    ];
    if pod.containers.len() != 1 || pod.init_containers.as_ref().is_some_and(|v| !v.is_empty()) {
        bail!("one container and no init containers expected");
    }
    if pod.host_ipc == Some(true) || pod.share_process_namespace == Some(true) {
        bail!("hostIPC / shareProcessNamespace not translated");
    }
    if pod
        .security_context
        .as_ref()
        .is_some_and(|s| s != &Default::default())
    {
        bail!("a pod-level securityContext is not translated");
    }
    if pod.host_network == Some(true) {
        a.push("--net-host".into());
    }
    if pod.host_pid == Some(true) {
        // The node's PID namespace: this process's (it runs in the node's).
        a.push("--with-ns".into());
        a.push(format!("pid:/proc/{}/ns/pid", std::process::id()));
    }
    let c = &pod.containers[0];
    if c.command.is_some() || c.working_dir.is_some() || c.env_from.is_some() || c.tty == Some(true)
    {
        bail!("command / workingDir / envFrom / tty not translated");
    }

    // Security context, as the CRI plugin maps it.
    let sc = c.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged == Some(true);
    if sc.run_as_user.is_some_and(|u| u != 0)
        || sc.run_as_group.is_some()
        || sc.run_as_non_root == Some(true)
        || sc.proc_mount.is_some()
        || sc.se_linux_options.is_some()
    {
        bail!("runAsUser other than 0 / runAsGroup / runAsNonRoot / procMount / seLinuxOptions not translated");
    }
    if privileged {
        a.push("--privileged".into());
    } else {
        let caps = sc.capabilities.clone().unwrap_or_default();
        let drop = caps.drop.unwrap_or_default();
        for d in RUNTIME_DEFAULT_CAPS {
            if drop.iter().any(|x| x == "ALL" || x == d) {
                a.push("--cap-drop".into());
                a.push(format!("CAP_{d}"));
            }
        }
        for add in caps.add.unwrap_or_default() {
            a.push("--cap-add".into());
            a.push(format!("CAP_{add}"));
        }
    }
    // No new privileges unless escalation is allowed, which is the default (and privileged).
    if privileged || sc.allow_privilege_escalation != Some(false) {
        a.push("--allow-new-privs".into());
    }
    match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        // ctr applies no seccomp filter unless asked.
        None | Some("Unconfined") => {}
        Some("RuntimeDefault") => a.push("--seccomp".into()),
        Some(t) => bail!("seccompProfile {t} not translated"),
    }
    match sc.app_armor_profile.as_ref().map(|p| p.type_.as_str()) {
        // ctr applies no AppArmor profile unless asked (and this machine has none loaded).
        None | Some("Unconfined") => {}
        Some(t) => bail!("appArmorProfile {t} not translated"),
    }
    if sc.read_only_root_filesystem == Some(true) {
        a.push("--read-only".into());
    }
    if let Some(limit) = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
    {
        a.push("--memory-limit".into());
        a.push(bytes(&limit.0)?.to_string());
    }

    // Environment: the image's, kubelet's, then the container's (kubelet resolves fieldRefs).
    for e in &config.env {
        a.push("--env".into());
        a.push(e.clone());
    }
    for (k, v) in &k.env {
        a.push("--env".into());
        a.push(format!("{k}={v}"));
    }
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("spec.nodeName") => k.node_name.clone(),
                _ => bail!("env {}: only fieldRef spec.nodeName is translated", e.name),
            },
            _ => bail!("env {}: value or valueFrom expected", e.name),
        };
        a.push("--env".into());
        a.push(format!("{}={value}", e.name));
    }

    // Volumes: bind mounts with the propagation CRI gives each mode.
    let volumes = pod.volumes.clone().unwrap_or_default();
    let mut rootfs_propagation = None;
    for m in c.volume_mounts.clone().unwrap_or_default() {
        if m.sub_path.is_some() || m.sub_path_expr.is_some() {
            bail!("volumeMount {}: subPath not translated", m.name);
        }
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .with_context(|| format!("volumeMount {}: no such volume", m.name))?;
        let source = if let Some(cm) = &v.config_map {
            k.config_maps
                .iter()
                .find(|(name, _)| *name == cm.name)
                .map(|(_, dir)| dir.clone())
                .with_context(|| format!("ConfigMap {} not provided", cm.name))?
        } else if let Some(hp) = &v.host_path {
            let p = k
                .host_paths
                .iter()
                .find(|(node, _)| *node == hp.path)
                .map(|(_, here)| here.clone())
                .unwrap_or_else(|| PathBuf::from(&hp.path));
            match hp.type_.as_deref() {
                Some("DirectoryOrCreate") => std::fs::create_dir_all(&p)?,
                Some("Directory") if p.is_dir() => {}
                t => bail!("hostPath {} of type {t:?}: not a directory here", hp.path),
            }
            p
        } else if v.empty_dir.is_some() {
            let p = k.scratch.join(&v.name);
            std::fs::create_dir_all(&p)?;
            p
        } else {
            bail!(
                "volume {}: only configMap, hostPath and emptyDir are translated",
                v.name
            );
        };
        let mut options = vec!["rbind"];
        match m.mount_propagation.as_deref() {
            None | Some("None") => options.push("rprivate"),
            Some("HostToContainer") => {
                options.push("rslave");
                rootfs_propagation.get_or_insert("rslave");
            }
            Some("Bidirectional") => {
                if !privileged {
                    bail!("volumeMount {}: Bidirectional needs privileged", m.name);
                }
                options.push("rshared");
                rootfs_propagation = Some("rshared");
            }
            Some(p) => bail!("mountPropagation {p} not known"),
        }
        if m.read_only == Some(true) {
            options.push("ro");
        }
        a.push("--mount".into());
        a.push(format!(
            "type=bind,src={},dst={},options={}",
            source.display(),
            m.mount_path,
            options.join(":")
        ));
    }
    if let Some(sa) = &k.service_account {
        if pod.automount_service_account_token != Some(false) {
            a.push("--mount".into());
            a.push(format!(
                "type=bind,src={},dst={SERVICE_ACCOUNT_DIR},options=rbind:rprivate:ro",
                sa.display()
            ));
        }
    }
    if let Some(p) = rootfs_propagation {
        a.push("--rootfs-propagation".into());
        a.push(p.into());
    }

    a.push(image.into());
    a.push(id.into());
    // Kubernetes: `args` replace the image's Cmd, the Entrypoint stays (no `command`).
    a.extend(config.entrypoint.iter().cloned());
    match &c.args {
        Some(args) => a.extend(args.iter().cloned()),
        None => a.extend(config.cmd.iter().cloned()),
    }
    Ok(a)
}

/// A Kubernetes quantity of bytes ("512Mi", "1G", "1048576").
fn bytes(q: &str) -> Result<u64> {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().with_context(|| format!("quantity {q}"))?;
    let mult = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => bail!("quantity {q}: unit not translated"),
    };
    Ok(n * mult)
}

/// The effective capability names of a process, from /proc/PID/status.
pub fn effective_caps(pid: u32) -> Result<Vec<String>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("CapEff")?
        .trim();
    let bits = u64::from_str_radix(hex, 16)?;
    Ok(CAP_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| n.to_string())
        .collect())
}

/// Capability numbers as in linux/capability.h.
const CAP_NAMES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Whether a process's root file system is mounted read-only (from its mountinfo).
pub fn root_read_only(pid: u32) -> Result<bool> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    // The last mount on "/" is the one the process sees.
    info.lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&"/")).then(|| f[5].split(',').any(|o| o == "ro"))
        })
        .context("no root in mountinfo")
}

/// A node's CNI setup for `ctr run --cni`, kept off the machine's own: the test's network
/// configuration and plugin directories are bind-mounted over `/etc/cni/net.d` and
/// `/opt/cni/bin` in a mount namespace of ctr's own (on overlays of `/etc` and `/opt`, so nothing
/// is created on the machine), and ctr runs in the test's hub network namespace, so the bridge
/// plugin's host ends land on the hub's bridge beside the test's other pods.
///
/// ctr passes no `CNI_ARGS`; kubelet's CRI calls pass the pod's namespace, name and uid. The test
/// plays kubelet: the installed `authz-cni` is a wrapper that sets them per sandbox (from
/// `pod_args`) and runs the real plugin.
pub struct CniNode {
    pub dir: PathBuf,
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// Where the plugin's wrapper is: the agent installs it as `authz-cni`.
    pub plugin: PathBuf,
    /// Bind-mounted at /out in every container.
    pub out: PathBuf,
    rootfs: PathBuf,
    hub: String,
}

impl CniNode {
    /// The primary network: Debian's bridge plugin on the hub's `br0`, host-local addresses
    /// from 10.77.<subnet>.150 up (the first container gets .150).
    pub fn new(hub: &str, subnet: u32, real_plugin: &Path) -> Result<CniNode> {
        let dir = std::env::temp_dir().join(format!("authz-cni-{}-{subnet}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let node = CniNode {
            conf_dir: dir.join("net.d"),
            bin_dir: dir.join("bin"),
            plugin: dir.join("authz-cni-as-kubelet"),
            out: dir.join("out"),
            rootfs: dir.join("rootfs"),
            hub: hub.into(),
            dir,
        };
        for d in [
            &node.conf_dir,
            &node.bin_dir,
            &node.out,
            &node.dir.join("args"),
        ] {
            std::fs::create_dir_all(d)?;
        }
        for d in ["usr", "proc", "sys", "dev", "tmp", "etc", "out", "run"] {
            std::fs::create_dir_all(node.rootfs.join(d))?;
        }
        for l in ["bin", "lib", "lib64", "sbin"] {
            std::os::unix::fs::symlink(format!("usr/{l}"), node.rootfs.join(l))?;
        }
        std::fs::write(node.primary(), node.primary_conf(subnet))?;
        std::fs::write(
            &node.plugin,
            format!(
                "#!/bin/sh\n# kubelet's CRI call passes the pod's identity; ctr does not.\nargs={}/args/\"$CNI_CONTAINERID\"\n[ -f \"$args\" ] && export CNI_ARGS=\"$(cat \"$args\")\"\nexec {}\n",
                node.dir.display(),
                real_plugin.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&node.plugin, std::fs::Permissions::from_mode(0o755))?;
        Ok(node)
    }

    pub fn primary(&self) -> PathBuf {
        self.conf_dir.join("10-pods.conflist")
    }

    /// The network plugin's own configuration (what it writes, and writes again).
    pub fn primary_conf(&self, subnet: u32) -> String {
        serde_json::json!({"cniVersion": "1.0.0", "name": "pods", "plugins": [
            {"type": "bridge", "bridge": "br0", "isGateway": false,
             "ipam": {"type": "host-local", "dataDir": self.dir.join("ipam"),
                      "ranges": [[{"subnet": format!("10.77.{subnet}.0/24"),
                                   "rangeStart": format!("10.77.{subnet}.150"),
                                   "rangeEnd": format!("10.77.{subnet}.199")}]]}}]})
        .to_string()
    }

    /// The plugin types chained in the primary network, in order.
    pub fn chain(&self) -> Vec<String> {
        let v: Value = std::fs::read(self.primary())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        v["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str().map(String::from))
            .collect()
    }

    /// The sandbox id the runtime names container `id` by (ctr: `<namespace>-<id>`).
    pub fn sandbox(id: &str) -> String {
        format!("{NAMESPACE}-{id}")
    }

    /// Kubelet's CNI_ARGS for pod `ns/name` (uid) in container `id`'s sandbox.
    pub fn pod_args(&self, id: &str, ns: &str, name: &str, uid: &str) -> Result<()> {
        std::fs::write(
            self.dir.join("args").join(Self::sandbox(id)),
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={uid}"),
        )?;
        Ok(())
    }

    /// `ctr run --rm --cni` of `argv` as container `id` in cgroup `cgroup` (a directory below
    /// the cgroup2 mount), with the host's /usr and the test server at /testsrv, as kubelet
    /// starts a pod's container: the runtime creates the task, the CNI chain sets its network
    /// up, then the task starts. The command returns when the container exits (then the chain's
    /// DEL runs).
    pub fn run(&self, ctd: &Containerd, id: &str, cgroup: &Path, argv: &[&str]) -> Command {
        let rel = cgroup
            .strip_prefix(crate::cgroup2_root())
            .expect("a cgroup below the cgroup2 mount");
        let mounts = format!(
            "set -e\n\
             mkdir -p {d}/ov/eu {d}/ov/ew {d}/ov/ou {d}/ov/ow\n\
             mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/ov/eu,workdir={d}/ov/ew /etc\n\
             mount -t overlay overlay -o lowerdir=/opt,upperdir={d}/ov/ou,workdir={d}/ov/ow /opt\n\
             mkdir -p /etc/cni/net.d /opt/cni/bin\n\
             mount --bind {conf} /etc/cni/net.d\n\
             mount --bind {bin} /opt/cni/bin\n\
             exec \"$@\"\n",
            d = self.dir.display(),
            conf = self.conf_dir.display(),
            bin = self.bin_dir.display(),
        );
        let mut c = Command::new("ip");
        c.args([
            "netns", "exec", &self.hub, "unshare", "-m", "sh", "-c", &mounts, "sh",
        ])
        .arg("ctr")
        .arg("--address")
        .arg(&ctd.socket)
        .args(["--namespace", NAMESPACE, "run", "--rm", "--cni", "--cgroup"])
        .arg(format!("/{}", rel.display()))
        .args(["--env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
        .args(["--mount", "type=bind,src=/usr,dst=/usr,options=rbind:ro"])
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/testsrv,options=rbind:ro",
            crate::testsrv()
        ))
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/out,options=rbind:rw",
            self.out.display()
        ))
        .arg("--rootfs")
        .arg(&self.rootfs)
        .arg(id)
        .args(argv);
        c
    }

    /// Stops container `id` (its `ctr run` then runs the chain's DEL and removes it).
    pub fn kill(&self, ctd: &Containerd, id: &str) {
        let _ = ctd
            .ctr()
            .args(["tasks", "kill", "-s", "SIGKILL", id])
            .output();
    }
}

impl Drop for CniNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(container: Value) -> PodSpec {
        serde_json::from_value(serde_json::json!({
            "hostNetwork": true,
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [container],
        }))
        .unwrap()
    }

    fn args(p: &PodSpec) -> Result<Vec<String>> {
        let k = Kubelet {
            node_name: "n".into(),
            config_maps: vec![],
            scratch: std::env::temp_dir().join(format!("authz-ctr-unit-{}", std::process::id())),
            service_account: None,
            env: vec![],
            host_paths: vec![],
        };
        let image = ImageConfig {
            entrypoint: vec!["/agent".into()],
            cmd: vec!["default".into()],
            env: vec![],
        };
        ctr_run_args(p, "img", &image, "id", &k)
    }

    #[test]
    fn settings_it_cannot_honour_are_refused() {
        for (c, why) in [
            (
                serde_json::json!({"name": "a", "securityContext": {"runAsUser": 1000}}),
                "runAsUser",
            ),
            (
                serde_json::json!({"name": "a", "volumeMounts": [{"name": "scratch", "mountPath": "/x", "mountPropagation": "Bidirectional"}]}),
                "Bidirectional",
            ),
            (
                serde_json::json!({"name": "a", "command": ["/bin/sh"]}),
                "command",
            ),
            (
                serde_json::json!({"name": "a", "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "p"}}}),
                "seccompProfile",
            ),
            (
                serde_json::json!({"name": "a", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}),
                "fieldRef",
            ),
        ] {
            let e = args(&pod(c)).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn capabilities_and_arguments_follow_kubernetes() {
        let c = serde_json::json!({"name": "a", "args": ["run"],
            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"], "add": ["BPF"]}},
            "volumeMounts": [{"name": "scratch", "mountPath": "/x", "readOnly": true,
                "mountPropagation": "HostToContainer"}]});
        let p = pod(c);
        let a = args(&p).unwrap();
        let drops = a.iter().filter(|s| s.starts_with("CAP_")).count();
        assert_eq!(drops, RUNTIME_DEFAULT_CAPS.len() + 1, "{a:?}");
        assert!(a.contains(&"--read-only".to_string()));
        assert!(!a.contains(&"--allow-new-privs".to_string()));
        assert!(
            a.iter()
                .any(|s| s.ends_with("dst=/x,options=rbind:rslave:ro")),
            "{a:?}"
        );
        assert_eq!(a[a.len() - 4..], ["img", "id", "/agent", "run"]);
        assert_eq!(
            granted_caps(&p.containers[0]),
            Some(vec!["BPF".to_string()])
        );
    }
}
