//! The agent config file (YAML). Unknown fields are errors, so a typo never silently
//! changes what is enforced.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSettings,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    /// Shared with the registry (Kubernetes mode has one per Service of the cluster).
    pub services: Vec<std::sync::Arc<ServiceSpec>>,
    /// Files or folders of Istio YAML, relative to the config file.
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// Kubernetes mode: pods, services and policies come from the API server instead.
    #[serde(default)]
    pub kubernetes: KubernetesSettings,
    /// File mode's MeshConfig `extensionProviders` (the providers CUSTOM policies name), with
    /// Istio's schema; Kubernetes mode reads them from the `istio` ConfigMap instead.
    #[serde(default)]
    pub extension_providers: Vec<crate::extauthz::ProviderSpec>,
    /// The file this config was read from (for `file:line` in problems).
    #[serde(skip)]
    pub origin: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubernetesSettings {
    /// Same as `authz-agent run --kubernetes`.
    pub enabled: bool,
    /// This node's name, as pods' `spec.nodeName` has it; default: `$NODE_NAME` (downward API).
    pub node_name: Option<String>,
    /// Default: the in-cluster service account, else `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Report invalid policies as Events on the objects.
    pub events: bool,
    /// The host's /proc (pods' network namespaces are found through their processes).
    pub proc_root: PathBuf,
    /// Steer the connections of every pod of the node to Service addresses (true), or only of
    /// mesh pods (false). Mesh pods are decided where they run either way.
    pub enroll_all_pods: bool,
    /// The cluster's agents (this DaemonSet's pods): a node with a ready one decides its mesh
    /// pods' connections itself; mesh pods of a node without one are decided at the client.
    pub agent_pods: AgentPods,
    /// The chained CNI plugin (`authz-cni`): pods enrolled while the runtime sets up their
    /// network, before any of their containers runs.
    pub cni: CniSettings,
    /// Istio's mesh ConfigMap: its `mesh` key's `extensionProviders` are the providers CUSTOM
    /// policies name (istiod's: `istio` in `istio-system`; `istio-<revision>` for a revision).
    pub mesh_config: MeshConfigRef,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MeshConfigRef {
    pub namespace: String,
    pub name: String,
}

impl Default for MeshConfigRef {
    fn default() -> Self {
        MeshConfigRef {
            namespace: "istio-system".into(),
            name: "istio".into(),
        }
    }
}

/// The agent's side of the CNI plugin: the socket the plugin reaches it on, where claims are
/// kept across restarts, and the installation into the node's CNI configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CniSettings {
    pub enabled: bool,
    /// Where the plugin reaches the agent (root only).
    pub socket: PathBuf,
    /// Pods the plugin handed over, one file each, read again after a restart.
    pub state_dir: PathBuf,
    /// The node's CNI binary directory, as the agent sees it; unset: the plugin is not
    /// installed by the agent.
    pub bin_dir: Option<PathBuf>,
    /// The node's CNI configuration directory (the runtime's primary conflist is the first
    /// file in it by name); unset: not installed.
    pub conf_dir: Option<PathBuf>,
    /// The plugin binary to install; default: `authz-cni` beside the agent's executable.
    pub plugin_binary: Option<PathBuf>,
    /// The plugin's behaviour when the agent cannot be reached: `closed` fails the pod's
    /// network setup (the runtime retries), `open` lets it start unenrolled.
    pub fail_mode: FailMode,
    /// How long the plugin waits for the agent to enroll a pod.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A pod handed over by the plugin that the API server does not confirm within this is
    /// withdrawn (released, reported).
    #[serde(with = "humantime_serde")]
    pub reconcile_within: Duration,
    /// Take the plugin out of the node's configuration when the agent stops for good (no
    /// successor took its socket over).
    pub remove_on_exit: bool,
}

impl Default for CniSettings {
    fn default() -> Self {
        CniSettings {
            enabled: false,
            socket: PathBuf::from("/var/run/authz/cni.sock"),
            state_dir: PathBuf::from("/var/run/authz/cni"),
            bin_dir: None,
            conf_dir: None,
            plugin_binary: None,
            fail_mode: FailMode::Closed,
            timeout: Duration::from_secs(30),
            reconcile_within: Duration::from_secs(60),
            remove_on_exit: true,
        }
    }
}

/// How the agents of the cluster are recognised among its pods.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AgentPods {
    /// Default: this agent's own namespace (its service account's), else `authz-system`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels every agent pod carries (all must match).
    pub labels: BTreeMap<String, String>,
}

impl Default for AgentPods {
    fn default() -> Self {
        AgentPods {
            namespace: None,
            labels: BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "authz-agent".to_string(),
            )]),
        }
    }
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        KubernetesSettings {
            enabled: false,
            node_name: None,
            kubeconfig: None,
            events: true,
            proc_root: PathBuf::from("/proc"),
            enroll_all_pods: true,
            agent_pods: AgentPods::default(),
            cni: CniSettings::default(),
            mesh_config: MeshConfigRef::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Closed,
    Open,
}

/// Whether the node checks the source of what each pod sends (the host end of its veth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceCheck {
    /// A pod's packets must carry its own addresses; a pod whose interface cannot be checked
    /// is not enrolled (its connections are refused) until it can be.
    #[default]
    Enforce,
    /// No check: identity at the destination rests on addresses alone (a pod with CAP_NET_RAW
    /// can claim another's). For networks whose pods have no veth on the node.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    None,
    #[default]
    #[serde(alias = "DEFAULT")]
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AgentSettings {
    /// Deprecated and ignored: the agent's listener in each pod's netns takes a port the kernel
    /// picks at enrollment (recorded in the pod's map entry), so a pod cannot squat it first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Metrics and health, in the agent's own netns.
    pub admin: SocketAddr,
    /// cgroup v2 directory the programs attach to; default: the cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    pub trust_domain: String,
    pub fail_mode: FailMode,
    pub path_normalization: PathNormalization,
    /// Extra CA bundle (PEM) trusted for HTTPS jwksUri, beside the system roots.
    pub jwks_ca_file: Option<PathBuf>,
    /// How often remote JWKS are refreshed.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_interval: Duration,
    /// Verified-token cache size (entries); 0 turns it off.
    pub token_cache_size: usize,
    /// How long to wait for a client's first bytes before treating the connection as TCP.
    #[serde(with = "humantime_serde")]
    pub sniff_timeout: Duration,
    /// Worker threads of the data path; 0 = one per CPU.
    pub worker_threads: usize,
    /// Allow jwksUri hosts on link-local and cloud-metadata addresses.
    pub allow_link_local_jwks: bool,
    /// bpffs directory where the programs' maps and links are pinned, so enforcement (and the
    /// fail mode) outlives the agent process and a new agent adopts it. One per agent on a node.
    pub bpffs: PathBuf,
    /// On SIGTERM: how long open connections may finish before the agent exits.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Connections one client may have open through the agent: a pod calling out, or one
    /// source address calling a protected pod (connections still sending their request head
    /// included); more are closed at once. Counted per client, never against the destination,
    /// and at most three quarters of `maxConnections`, so no client starves another pod or the node.
    pub max_connections_per_pod: u64,
    /// Connections open through the agent at once, all pods together; more are closed at once.
    /// 0 (default) = as many as the descriptor limit allows, which the agent raises to its hard
    /// limit at start; a larger value is lowered to that.
    pub max_connections: u64,
    /// How long a client may take to send a request head (also between keep-alive requests).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A TCP relay with no byte either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// Source addresses bound by the kernel on each pod's interface (see `SourceCheck`).
    pub source_check: SourceCheck,
    /// The kubelet's cgroup (v2 directory): only connections its processes open count as its
    /// probes. Unset: the cgroup of the process named `kubelet`, if the agent sees one (the
    /// DaemonSet has hostPID); none found, no connection passes as a probe.
    pub kubelet_cgroup: Option<PathBuf>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            port: None,
            admin: "127.0.0.1:15020".parse().unwrap(),
            cgroup_root: None,
            root_namespace: "istio-system".into(),
            trust_domain: "cluster.local".into(),
            fail_mode: FailMode::Closed,
            path_normalization: PathNormalization::Base,
            jwks_ca_file: None,
            jwks_refresh_interval: Duration::from_secs(20 * 60),
            token_cache_size: 10_000,
            sniff_timeout: Duration::from_millis(300),
            worker_threads: 0,
            allow_link_local_jwks: false,
            bpffs: PathBuf::from("/sys/fs/bpf/authz"),
            drain_timeout: Duration::from_secs(5),
            max_connections_per_pod: 4096,
            max_connections: 0,
            header_read_timeout: Duration::from_secs(30),
            tcp_idle_timeout: Duration::from_secs(3600),
            source_check: SourceCheck::Enforce,
            kubelet_cgroup: None,
        }
    }
}

/// An enrolled pod: its outbound connections to enforced workloads are intercepted, and (with
/// `inbound`, the default) connections arriving at it from anywhere are decided by its policies.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// A netns file (`ip netns` or /proc/PID/ns/net).
    pub netns: PathBuf,
    /// A cgroup v2 directory.
    pub cgroup: PathBuf,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Decide connections arriving at this pod (from other pods, the host, or outside) with its
    /// policies, at the pod itself.
    #[serde(default = "yes")]
    pub inbound: bool,
    /// Ports whose inbound connections are never captured (Istio's
    /// `traffic.sidecar.istio.io/excludeInboundPorts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_inbound_ports: Vec<u16>,
}

fn yes() -> bool {
    true
}

/// Ports a pod may exclude from inbound capture: the kernel entry's room
/// (`authz_common::MAX_EXCLUDED_PORTS`) less one for the agent's own listener.
pub const MAX_EXCLUDED_INBOUND_PORTS: usize = 13;

/// A destination that policies can select; traffic to its IPs is enforced.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub ips: Vec<IpAddr>,
}

/// A service name, so `jwksUri` and `hosts` resolve as they would in a cluster.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The pods behind the service. Where any is an enforced workload, connections to the
    /// service's addresses are enforced too: the agent picks a backend, applies that workload's
    /// policies and connects to it, as a waypoint would.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<ServiceBackend>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceBackend {
    pub ip: IpAddr,
    /// Service port -> the port on this backend (`targetPort`, named ports resolved).
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// Where the port goes on the workload; default: the same port.
    #[serde(default)]
    pub target_port: Option<u16>,
}

fn default_sa() -> String {
    "default".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Config::parse(&text, &path.display().to_string())?;
        cfg.origin = Some(path.to_path_buf());
        let base = path.parent().unwrap_or(Path::new("."));
        for p in &mut cfg.policies {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(k) = &mut cfg.kubernetes.kubeconfig {
            if k.is_relative() {
                *k = base.join(&*k);
            }
        }
        Ok(cfg)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: origin.into(),
                line,
                column,
                message: e.to_string(),
            }
        })?;
        cfg.check().map_err(|message| ConfigError::Invalid {
            path: origin.into(),
            message,
        })?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        if self.agent.max_connections_per_pod == 0 {
            return Err("agent.maxConnectionsPerPod: must be at least 1".into());
        }
        if self.agent.header_read_timeout.is_zero() {
            return Err("agent.headerReadTimeout: must not be 0".into());
        }
        if self.agent.tcp_idle_timeout.is_zero() {
            return Err("agent.tcpIdleTimeout: must not be 0".into());
        }
        if !self.agent.bpffs.is_absolute() || self.agent.bpffs.parent().is_none() {
            return Err("agent.bpffs: must be an absolute directory below a bpffs mount".into());
        }
        if self.kubernetes.enabled
            && !(self.pods.is_empty()
                && self.workloads.is_empty()
                && self.services.is_empty()
                && self.policies.is_empty())
        {
            return Err("kubernetes.enabled: pods, workloads, services and policies come from the API server; remove them from the file".into());
        }
        let cni = &self.kubernetes.cni;
        if cni.enabled {
            if !self.kubernetes.enabled {
                return Err("kubernetes.cni.enabled: the CNI plugin hands over Kubernetes pods; it needs kubernetes.enabled".into());
            }
            if !(1..=600).contains(&cni.timeout.as_secs()) {
                return Err("kubernetes.cni.timeout: between 1s and 600s".into());
            }
            if cni.reconcile_within.is_zero() {
                return Err("kubernetes.cni.reconcileWithin: must not be 0".into());
            }
            if cni.bin_dir.is_some() != cni.conf_dir.is_some() {
                return Err("kubernetes.cni: binDir and confDir are set together (the plugin is installed into both) or not at all".into());
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.pods.iter().enumerate() {
            if p.name.is_empty() || p.namespace.is_empty() {
                return Err(format!("pods[{i}]: name and namespace are required"));
            }
            if !seen.insert(("pod", &p.namespace, &p.name)) {
                return Err(format!(
                    "pods[{i}]: duplicate pod {}/{}",
                    p.namespace, p.name
                ));
            }
            if p.exclude_inbound_ports.len() > MAX_EXCLUDED_INBOUND_PORTS
                || p.exclude_inbound_ports.contains(&0)
            {
                return Err(format!(
                    "pods[{i}] ({}/{}): excludeInboundPorts: at most {MAX_EXCLUDED_INBOUND_PORTS} ports, none 0",
                    p.namespace, p.name
                ));
            }
        }
        // A pod's address is decided at the pod; the same address as a workload would be
        // decided at the client too (twice).
        let mut ips: std::collections::HashMap<IpAddr, String> = self
            .pods
            .iter()
            .filter(|p| p.inbound)
            .flat_map(|p| {
                p.ips
                    .iter()
                    .map(move |ip| (*ip, format!("pod {}/{}", p.namespace, p.name)))
            })
            .collect();
        let mut workloads = std::collections::HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if w.name.is_empty() || w.namespace.is_empty() {
                return Err(format!("workloads[{i}]: name and namespace are required"));
            }
            // Policies are looked up per workload name: two workloads of one name, or a pod and
            // a workload of one name with different labels or identity, would share the wrong
            // ones.
            if !workloads.insert((&w.namespace, &w.name)) {
                return Err(format!(
                    "workloads[{i}]: duplicate workload {}/{}",
                    w.namespace, w.name
                ));
            }
            if let Some(p) = self
                .pods
                .iter()
                .find(|p| p.namespace == w.namespace && p.name == w.name)
            {
                if p.labels != w.labels || p.service_account != w.service_account {
                    return Err(format!(
                        "workloads[{i}]: {}/{} is also a pod with other labels or serviceAccount; one name is one workload",
                        w.namespace, w.name
                    ));
                }
            }
            if w.ips.is_empty() {
                return Err(format!(
                    "workloads[{i}] ({}/{}): ips: at least one address is required",
                    w.namespace, w.name
                ));
            }
            for ip in &w.ips {
                if let Some(other) = ips.insert(*ip, format!("{}/{}", w.namespace, w.name)) {
                    return Err(format!(
                        "workloads[{i}] ({}/{}): ip {ip} is already used by {other}",
                        w.namespace, w.name
                    ));
                }
                if ip.is_loopback() || ip.is_unspecified() {
                    return Err(format!("workloads[{i}]: ip {ip} cannot be enforced"));
                }
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            if s.name.is_empty() || s.namespace.is_empty() || s.ips.is_empty() {
                return Err(format!(
                    "services[{i}]: name, namespace and ips are required"
                ));
            }
            if !s.backends.is_empty() {
                for ip in &s.ips {
                    if ip.is_loopback() || ip.is_unspecified() {
                        return Err(format!("services[{i}]: ip {ip} cannot be enforced"));
                    }
                    if let Some(other) = ips.get(ip) {
                        return Err(format!(
                            "services[{i}] ({}/{}): ip {ip} is already used by {other}",
                            s.namespace, s.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_example_parses() {
        let cfg = Config::parse(
            r#"
agent:
  admin: 127.0.0.1:15020
pods:
  - name: sleep
    namespace: foo
    labels: {app: sleep}
    serviceAccount: sleep
    netns: /var/run/netns/sleep
    cgroup: /sys/fs/cgroup/unified/demo/sleep
    ips: [10.77.0.2]
workloads:
  - name: httpbin
    namespace: foo
    labels: {app: httpbin}
    serviceAccount: httpbin
    ips: [10.77.0.3]
policies: []
"#,
            "t.yaml",
        )
        .unwrap();
        assert_eq!(cfg.pods[0].service_account, "sleep");
        assert_eq!(cfg.agent.root_namespace, "istio-system");
        assert_eq!(cfg.agent.fail_mode, FailMode::Closed);
    }

    #[test]
    fn unknown_field_names_file_and_line() {
        let err =
            Config::parse("agent:\n  admin: 127.0.0.1:15020\n  prot: 1\n", "a.yaml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("a.yaml:3:"), "{msg}");
        assert!(msg.contains("prot"), "{msg}");
    }

    #[test]
    fn cni_settings_are_checked() {
        let ok = Config::parse(
            "kubernetes:\n  enabled: true\n  cni: {enabled: true, binDir: /b, confDir: /c, failMode: open, timeout: 10s}\n",
            "k.yaml",
        )
        .unwrap();
        assert_eq!(ok.kubernetes.cni.fail_mode, FailMode::Open);
        assert_eq!(ok.kubernetes.cni.reconcile_within, Duration::from_secs(60));
        for (bad, says) in [
            (
                "kubernetes:\n  cni: {enabled: true}\n",
                "needs kubernetes.enabled",
            ),
            (
                "kubernetes:\n  enabled: true\n  cni: {enabled: true, binDir: /b}\n",
                "together",
            ),
            (
                "kubernetes:\n  enabled: true\n  cni: {enabled: true, timeout: 0s}\n",
                "timeout",
            ),
            (
                "kubernetes:\n  enabled: true\n  cni: {enabled: true, failMode: maybe}\n",
                "k.yaml:3",
            ),
        ] {
            let err = Config::parse(bad, "k.yaml").unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_ip_is_an_error_with_line() {
        let err = Config::parse(
            "workloads:\n  - name: a\n    namespace: b\n    ips: [10.0.0.300]\n",
            "c.yaml",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("c.yaml:4:"), "{err}");
    }

    #[test]
    fn duplicate_workload_ip_rejected() {
        let err = Config::parse(
            "workloads:\n  - {name: a, namespace: n, ips: [10.0.0.1]}\n  - {name: b, namespace: n, ips: [10.0.0.1]}\n",
            "d.yaml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("already used by n/a"), "{err}");
    }

    #[test]
    fn one_name_is_one_workload() {
        let err = Config::parse(
            "workloads:\n  - {name: a, namespace: n, ips: [10.0.0.1]}\n  - {name: a, namespace: n, ips: [10.0.0.2]}\n",
            "d.yaml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("duplicate workload n/a"), "{err}");
        let err = Config::parse(
            "pods:\n  - {name: a, namespace: n, labels: {app: x}, netns: /n, cgroup: /c}\nworkloads:\n  - {name: a, namespace: n, labels: {app: y}, ips: [10.0.0.1]}\n",
            "d.yaml",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("also a pod with other labels"),
            "{err}"
        );
        Config::parse(
            "pods:\n  - {name: a, namespace: n, labels: {app: x}, netns: /n, cgroup: /c}\nworkloads:\n  - {name: a, namespace: n, labels: {app: x}, ips: [10.0.0.1]}\n",
            "d.yaml",
        )
        .unwrap();
    }
}
