//! The systems under test, each enforcing the FAQ's skip-path policy in front of the same
//! backend: nothing (direct), the agent (transparent, through the kernel path), HAProxy and Envoy
//! (as a sidecar would: in the client's network namespace, on loopback). The inbound targets
//! enforce at the backend instead, for a client that is no pod: the agent capturing the backend
//! pod's inbound connections, HAProxy and Envoy as sidecars in the backend's namespace.
//!
//! CPU layout: the enforcer runs on CPU 0, the client and the backend on CPU 1.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use authz_tests::{data_dir, pod_yaml, wait_listening, workload_yaml, Agent, Host, Net};

use crate::pem;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Agent {
        threads: usize,
        cache: bool,
        extra_policies: usize,
        /// Issuers (`jwtRules`) on the backend's workload; the token is from the last in order.
        issuers: usize,
    },
    Haproxy,
    Envoy {
        cache: bool,
        /// JWT providers, as istiod writes one per `jwtRules` entry.
        issuers: usize,
    },
    /// The backend is a protected pod; the client is outside every pod. `source_check`: the
    /// node checks the pods' source addresses (the default); off for the cost of that check.
    AgentInbound {
        source_check: bool,
    },
    /// HAProxy in the backend's netns, on its address.
    HaproxyInbound,
    /// Envoy in the backend's netns, on its address, as Istio's sidecar takes inbound traffic.
    EnvoyInbound,
    /// `agent` with a CUSTOM policy on every path of the backend, asking `authz-extauthz`.
    AgentCustom(Provider),
    /// `envoy` with the same CUSTOM policy as istiod configures it (shadow rbac + ext_authz).
    EnvoyCustom(Provider),
}

/// A CUSTOM provider's protocol, as MeshConfig's `extensionProviders` has them. The provider
/// (`authz-extauthz`, Istio's sample's logic) runs on the enforcer's loopback on CPU 1, outside
/// the enforcer's CPU figure, and allows requests carrying `x-ext-authz: allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Http,
    Grpc,
}

pub const PROVIDER_HTTP_PORT: u16 = 15980;
pub const PROVIDER_GRPC_PORT: u16 = 15981;
/// What every request to a CUSTOM target carries, so the provider allows it and the target's
/// own policies decide as in the other targets.
const CUSTOM_HEADER: &str = "x-ext-authz: allow";

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Http => "bench-ext-authz-http",
            Provider::Grpc => "bench-ext-authz-grpc",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: &'static str,
    pub kind: Kind,
    pub about: &'static str,
}

pub fn all() -> Vec<Target> {
    use Kind::*;
    vec![
        Target {
            name: "direct",
            kind: Direct,
            about: "client -> backend, nothing in between (lower bound)",
        },
        Target {
            name: "agent",
            kind: Agent {
                threads: 1,
                cache: true,
                extra_policies: 0,
                issuers: 1,
            },
            about: "this agent, 1 worker, verified-token cache on",
        },
        Target {
            name: "agent-nocache",
            kind: Agent {
                threads: 1,
                cache: false,
                extra_policies: 0,
                issuers: 1,
            },
            about: "this agent, 1 worker, verified-token cache off",
        },
        Target {
            name: "agent-10k",
            kind: Agent {
                threads: 1,
                cache: true,
                extra_policies: 10_000,
                issuers: 1,
            },
            about: "this agent, 1 worker, 10,000 more policies loaded",
        },
        Target {
            name: "agent-2t",
            kind: Agent {
                threads: 2,
                cache: true,
                extra_policies: 0,
                issuers: 1,
            },
            about: "this agent, 2 workers on CPUs 0-1 (scaling)",
        },
        Target {
            name: "haproxy",
            kind: Haproxy,
            about: "HAProxy, 1 thread, jwt_verify (no token cache)",
        },
        Target {
            name: "envoy",
            kind: Envoy {
                cache: false,
                issuers: 1,
            },
            about: "Envoy, 1 worker, Istio's jwt_authn + rbac",
        },
        Target {
            name: "envoy-jwtcache",
            kind: Envoy {
                cache: true,
                issuers: 1,
            },
            about: "Envoy, 1 worker, with jwt_cache_config",
        },
        Target {
            name: "agent-iss10",
            kind: Agent {
                threads: 1,
                cache: true,
                extra_policies: 0,
                issuers: 10,
            },
            about: "this agent, 1 worker, 10 issuers on the workload",
        },
        Target {
            name: "agent-iss100",
            kind: Agent {
                threads: 1,
                cache: true,
                extra_policies: 0,
                issuers: 100,
            },
            about: "this agent, 1 worker, 100 issuers on the workload",
        },
        Target {
            name: "agent-iss1000",
            kind: Agent {
                threads: 1,
                cache: true,
                extra_policies: 0,
                issuers: 1000,
            },
            about: "this agent, 1 worker, 1,000 issuers on the workload",
        },
        Target {
            name: "envoy-iss10",
            kind: Envoy {
                cache: false,
                issuers: 10,
            },
            about: "Envoy, 1 worker, Istio's filters with 10 JWT providers",
        },
        Target {
            name: "envoy-iss100",
            kind: Envoy {
                cache: false,
                issuers: 100,
            },
            about: "Envoy, 1 worker, Istio's filters with 100 JWT providers",
        },
        Target {
            name: "envoy-iss1000",
            kind: Envoy {
                cache: false,
                issuers: 1000,
            },
            about: "Envoy, 1 worker, Istio's filters with 1,000 JWT providers",
        },
        Target {
            name: "agent-custom-http",
            kind: AgentCustom(Provider::Http),
            about: "this agent, 1 worker, a CUSTOM policy on every path: HTTP ext_authz provider",
        },
        Target {
            name: "agent-custom-grpc",
            kind: AgentCustom(Provider::Grpc),
            about: "this agent, 1 worker, a CUSTOM policy on every path: gRPC ext_authz provider",
        },
        Target {
            name: "envoy-custom-http",
            kind: EnvoyCustom(Provider::Http),
            about: "Envoy, 1 worker, Istio's filters with the CUSTOM policy: HTTP ext_authz",
        },
        Target {
            name: "envoy-custom-grpc",
            kind: EnvoyCustom(Provider::Grpc),
            about: "Envoy, 1 worker, Istio's filters with the CUSTOM policy: gRPC ext_authz",
        },
        Target {
            name: "agent-inbound",
            kind: AgentInbound { source_check: true },
            about:
                "this agent at the destination: client outside every pod -> backend pod (sk_lookup)",
        },
        Target {
            name: "agent-inbound-nocheck",
            kind: AgentInbound {
                source_check: false,
            },
            about: "agent-inbound without the source check on the pods' interfaces (its cost)",
        },
        Target {
            name: "haproxy-inbound",
            kind: HaproxyInbound,
            about: "HAProxy as a sidecar in the backend's netns, client outside every pod",
        },
        Target {
            name: "envoy-inbound",
            kind: EnvoyInbound,
            about:
                "Envoy as Istio's inbound sidecar in the backend's netns, client outside every pod",
        },
    ]
}

/// Paths of the programs the benchmark drives.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The agent binary the agent targets run.
    pub agent: PathBuf,
    pub wrk: PathBuf,
    pub oha: PathBuf,
    pub haproxy: PathBuf,
    pub envoy: PathBuf,
    pub nginx: PathBuf,
    /// The CUSTOM targets' provider.
    pub extauthz: PathBuf,
}

/// The pods: `client` (enrolled in the agent runs), `server` (the backend) and nine idle pods,
/// so the agent's idle RSS is measured with ten enrolled pods.
pub struct Topology {
    // Dropped in this order: the backend, then the namespaces and cgroups.
    backend: Proc,
    _net: Net,
    pub client: Host,
    pub server: Host,
    pub idle: Vec<Host>,
    pub dir: PathBuf,
}

pub const BACKEND_PORT: u16 = 8080;

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pinned(host: &Host, in_pod: bool, cpus: &str, program: &Path, args: &[&str]) -> Command {
    let mut a = vec!["-c", cpus, program.to_str().unwrap()];
    a.extend_from_slice(args);
    Net::command(host, in_pod, "taskset", &a)
}

impl Topology {
    pub fn new(tools: &Tools, dir: &Path) -> Result<Topology> {
        let mut net = Net::new()?;
        let client = net.host("client", 2)?;
        let server = net.host("server", 3)?;
        let idle = (0..9)
            .map(|i| net.host(&format!("idle{i}"), 10 + i))
            .collect::<Result<Vec<_>>>()?;
        // The backend: nginx, one process, 200 and a short body on every path.
        let conf = dir.join("backend-nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
                 events {{ worker_connections 4096; multi_accept on; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
                 client_body_temp_path {dir}/tmp;\n  proxy_temp_path {dir}/tmp;\n  fastcgi_temp_path {dir}/tmp;\n  uwsgi_temp_path {dir}/tmp;\n  scgi_temp_path {dir}/tmp;\n\
                 server {{\n    listen {ip}:{BACKEND_PORT} reuseport backlog=4096;\n    default_type text/plain;\n\
                 location / {{ return 200 \"hello from backend\\n\"; }}\n  }}\n}}\n",
                dir = dir.display(),
                ip = server.ip
            ),
        )?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        let child = pinned(
            &server,
            false,
            "1",
            &tools.nginx,
            &[
                "-e",
                &dir.join("nginx-error.log").to_string_lossy(),
                "-c",
                &conf.to_string_lossy(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting nginx")?;
        let backend = Proc(child);
        wait_listening(&server, BACKEND_PORT)?;
        Ok(Topology {
            backend,
            _net: net,
            client,
            server,
            idle,
            dir: dir.to_path_buf(),
        })
    }

    pub fn backend_pid(&self) -> u32 {
        self.backend.0.id()
    }
}

/// A started target: where the client sends requests, and the enforcer's pid.
pub struct Running {
    /// `http://host:port` the client uses.
    pub base: String,
    /// Whether the client runs in the enrolled pod's cgroup (the agent's interception).
    pub client_in_pod: bool,
    pub pid: Option<u32>,
    /// Headers every request carries (`-H` for curl, wrk and oha).
    pub headers: Vec<String>,
    _agent: Option<Agent>,
    _proc: Option<Proc>,
    _provider: Option<Proc>,
}

fn wait_port_in(host: &Host, port: u16, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if wait_listening(host, port).is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited with {st}");
        }
        if Instant::now() > deadline {
            bail!("{what} not listening on {port}");
        }
    }
}

/// The issuers before the demo token's in order (`iss-0000`, ...): what `n` issuers add to one.
fn extra_issuers(n: usize) -> impl Iterator<Item = String> {
    (0..n.saturating_sub(1)).map(|i| format!("iss-{i:04}"))
}

fn policies(extra: usize, issuers: usize) -> Result<Vec<(String, String)>> {
    let dir = data_dir().join("faq/skip-path");
    let mut files = vec![
        (
            "policies/ra.yaml".to_string(),
            std::fs::read_to_string(dir.join("requestauthentication.yaml"))?,
        ),
        (
            "policies/ap.yaml".to_string(),
            std::fs::read_to_string(dir.join("authorizationpolicy.yaml"))?,
        ),
    ];
    if extra > 0 {
        // Root-namespace policies with selectors: each one is matched against every workload's
        // labels when the policy set is indexed, none selects the benchmark's backend.
        let mut text = String::with_capacity(extra * 300);
        for i in 0..extra {
            text.push_str(&format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: extra-{i}, namespace: istio-system}}\n\
                 spec:\n  selector: {{matchLabels: {{app: svc-{i}}}}}\n  action: ALLOW\n  rules:\n  - to: [{{operation: {{paths: [\"/svc-{i}/*\"], methods: [GET]}}}}]\n---\n"
            ));
        }
        files.push(("policies/extra.yaml".to_string(), text));
    }
    if issuers > 1 {
        // More jwtRules on the backend's workload, all with the demo key set, none the token's.
        let jwks = std::fs::read_to_string(data_dir().join("istio-samples/jwks.json"))?;
        let jwks = jwks.replace('\n', "");
        let mut text = String::from(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: issuers, namespace: istio-system}\nspec:\n  selector: {matchLabels: {app: istio-ingressgateway}}\n  jwtRules:\n",
        );
        for iss in extra_issuers(issuers) {
            text.push_str(&format!("  - issuer: {iss}\n    jwks: '{jwks}'\n"));
        }
        files.push(("policies/issuers.yaml".to_string(), text));
    }
    Ok(files)
}

pub fn start(t: &Target, topo: &Topology, tools: &Tools) -> Result<Running> {
    let server = &topo.server;
    match t.kind {
        Kind::Direct => Ok(Running {
            base: format!("http://{}:{BACKEND_PORT}", server.ip),
            client_in_pod: false,
            pid: None,
            headers: vec![],
            _agent: None,
            _proc: None,
            _provider: None,
        }),
        Kind::Agent {
            threads,
            cache,
            extra_policies,
            issuers,
        } => start_agent(topo, tools, threads, cache, extra_policies, issuers, None),
        Kind::AgentCustom(provider) => start_agent(topo, tools, 1, true, 0, 1, Some(provider)),
        Kind::EnvoyCustom(provider) => start_envoy(topo, tools, false, 1, Some(provider)),
        Kind::AgentInbound { source_check } => {
            // The backend pod and the idle pods are protected; the client is no pod.
            let mut pods = pod_yaml(
                server,
                "istio-system",
                "{app: istio-ingressgateway}",
                "istio-ingressgateway",
            );
            for h in &topo.idle {
                pods.push_str(&pod_yaml(
                    h,
                    "foo",
                    &format!("{{app: {}}}", h.name),
                    "default",
                ));
            }
            // `sourceCheck` only when off (enforce is the default): builds from before the check
            // existed run this target too (`--compare`).
            let cfg = format!(
                "agent: {{admin: \"{{ADMIN}}\", workerThreads: 1{}}}\npods:\n{pods}policies: [policies]\n",
                if source_check { "" } else { ", sourceCheck: off" }
            );
            let files = policies(0, 1)?;
            let refs: Vec<(&str, &str)> = files
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            let agent = Agent::start_bin(&tools.agent, &cfg, &refs)?;
            let pid = agent.child.id();
            authz_tests::sh("taskset", &["-a", "-cp", "0", &pid.to_string()])?;
            Ok(Running {
                base: format!("http://{}:{BACKEND_PORT}", server.ip),
                client_in_pod: false,
                pid: Some(pid),
                headers: vec![],
                _agent: Some(agent),
                _proc: None,
                _provider: None,
            })
        }
        Kind::HaproxyInbound | Kind::EnvoyInbound => {
            let haproxy = t.kind == Kind::HaproxyInbound;
            let (cfg, port) = if haproxy {
                let jwks = std::fs::read_to_string(data_dir().join("istio-samples/jwks.json"))?;
                let pem_path = topo.dir.join("pub.pem");
                std::fs::write(&pem_path, pem::rsa_pem_from_jwks(&jwks)?)?;
                let cfg = topo.dir.join("haproxy-inbound.cfg");
                let text = haproxy_cfg(&pem_path, &server.ip)
                    .replace("bind 127.0.0.1:10001", &format!("bind {}:10001", server.ip));
                std::fs::write(&cfg, text)?;
                (cfg, 10001)
            } else {
                let jwks = topo.dir.join("jwks.json");
                std::fs::copy(data_dir().join("istio-samples/jwks.json"), &jwks)?;
                let cfg = topo.dir.join("envoy-inbound.yaml");
                let text = envoy_cfg(&jwks, &server.ip, false, 1, None).replace(
                    "address: 127.0.0.1, port_value: 10002",
                    &format!("address: {}, port_value: 10002", server.ip),
                );
                std::fs::write(&cfg, text)?;
                (cfg, 10002)
            };
            let cfg_s = cfg.to_string_lossy().to_string();
            let args: Vec<&str> = if haproxy {
                vec!["-db", "-f", &cfg_s]
            } else {
                vec![
                    "-c",
                    &cfg_s,
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warn",
                    "--disable-hot-restart",
                ]
            };
            let program = if haproxy {
                &tools.haproxy
            } else {
                &tools.envoy
            };
            let mut child = pinned(server, false, "0", program, &args)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {}", t.name))?;
            wait_port_in(server, port, &mut child, t.name)?;
            let pid = child.id();
            Ok(Running {
                base: format!("http://{}:{port}", server.ip),
                client_in_pod: false,
                pid: Some(pid),
                headers: vec![],
                _agent: None,
                _proc: Some(Proc(child)),
                _provider: None,
            })
        }
        Kind::Haproxy => {
            let jwks = std::fs::read_to_string(data_dir().join("istio-samples/jwks.json"))?;
            let pem_path = topo.dir.join("pub.pem");
            std::fs::write(&pem_path, pem::rsa_pem_from_jwks(&jwks)?)?;
            let cfg = topo.dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_cfg(&pem_path, &server.ip))?;
            let cfg = cfg.to_string_lossy();
            sidecar(topo, &tools.haproxy, &["-db", "-f", &cfg], 10001, "haproxy")
        }
        Kind::Envoy { cache, issuers } => start_envoy(topo, tools, cache, issuers, None),
    }
}

/// The provider of a CUSTOM target, on the loopback of the enforcer's network namespace (the
/// node's for the agent, the client pod's for Envoy as a sidecar), on CPU 1 with the client and
/// the backend: its CPU is not the enforcer's.
fn start_provider(tools: &Tools, netns: Option<&Host>) -> Result<Proc> {
    let addrs = [
        format!("127.0.0.1:{PROVIDER_HTTP_PORT}"),
        format!("127.0.0.1:{PROVIDER_GRPC_PORT}"),
    ];
    let mut cmd = match netns {
        Some(h) => pinned(h, false, "1", &tools.extauthz, &[&addrs[0], &addrs[1]]),
        None => {
            let mut c = Command::new("taskset");
            c.args(["-c", "1"]).arg(&tools.extauthz).args(&addrs);
            c
        }
    };
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting authz-extauthz")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in [PROVIDER_HTTP_PORT, PROVIDER_GRPC_PORT] {
        loop {
            let listening = match netns {
                Some(h) => wait_listening(h, port).is_ok(),
                None => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            };
            if listening {
                break;
            }
            if let Some(st) = child.try_wait()? {
                bail!("authz-extauthz exited with {st}");
            }
            if Instant::now() > deadline {
                bail!("authz-extauthz not listening on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Proc(child))
}

/// MeshConfig's entry for the provider (Istio's sample's settings: the HTTP check carries
/// `x-ext-authz`, the gRPC one every header).
fn provider_yaml(provider: Provider) -> String {
    let ip = "127.0.0.1";
    match provider {
        Provider::Http => format!(
            "  - name: {}\n    envoyExtAuthzHttp:\n      service: {ip}\n      port: \"{PROVIDER_HTTP_PORT}\"\n      includeRequestHeadersInCheck: [x-ext-authz]\n",
            provider.name()
        ),
        Provider::Grpc => format!(
            "  - name: {}\n    envoyExtAuthzGrpc:\n      service: {ip}\n      port: {PROVIDER_GRPC_PORT}\n",
            provider.name()
        ),
    }
}

/// A CUSTOM policy on every path of the backend's workload.
fn custom_policy(provider: Provider) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext-authz, namespace: istio-system}}\n\
         spec:\n  selector: {{matchLabels: {{app: istio-ingressgateway}}}}\n  action: CUSTOM\n  provider: {{name: {}}}\n\
         \x20 rules:\n  - to: [{{operation: {{paths: [\"/*\"]}}}}]\n",
        provider.name()
    )
}

#[allow(clippy::too_many_arguments)]
fn start_agent(
    topo: &Topology,
    tools: &Tools,
    threads: usize,
    cache: bool,
    extra_policies: usize,
    issuers: usize,
    custom: Option<Provider>,
) -> Result<Running> {
    let server = &topo.server;
    let mut pods = pod_yaml(&topo.client, "foo", "{app: sleep}", "sleep");
    for h in &topo.idle {
        pods.push_str(&pod_yaml(
            h,
            "foo",
            &format!("{{app: {}}}", h.name),
            "default",
        ));
    }
    let providers = custom
        .map(|p| format!("extensionProviders:\n{}", provider_yaml(p)))
        .unwrap_or_default();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\", workerThreads: {threads}, tokenCacheSize: {}}}\npods:\n{pods}workloads:\n{}{providers}policies: [policies]\n",
        if cache { 10_000 } else { 0 },
        workload_yaml(server, "istio-system", "{app: istio-ingressgateway}", "istio-ingressgateway"),
    );
    let mut files = policies(extra_policies, issuers)?;
    let provider = match custom {
        Some(p) => {
            files.push(("policies/custom.yaml".into(), custom_policy(p)));
            Some(start_provider(tools, None)?)
        }
        None => None,
    };
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let agent = Agent::start_bin(&tools.agent, &cfg, &refs)?;
    let pid = agent.child.id();
    // Pin every thread the agent has (its runtime's threads exist once it is healthy).
    let cpus = if threads > 1 { "0,1" } else { "0" };
    authz_tests::sh("taskset", &["-a", "-cp", cpus, &pid.to_string()])?;
    Ok(Running {
        base: format!("http://{}:{BACKEND_PORT}", server.ip),
        client_in_pod: true,
        pid: Some(pid),
        headers: custom
            .map(|_| CUSTOM_HEADER.to_string())
            .into_iter()
            .collect(),
        _agent: Some(agent),
        _proc: None,
        _provider: provider,
    })
}

fn start_envoy(
    topo: &Topology,
    tools: &Tools,
    cache: bool,
    issuers: usize,
    custom: Option<Provider>,
) -> Result<Running> {
    let server = &topo.server;
    let jwks = topo.dir.join("jwks.json");
    std::fs::copy(data_dir().join("istio-samples/jwks.json"), &jwks)?;
    let cfg = topo.dir.join("envoy.yaml");
    std::fs::write(&cfg, envoy_cfg(&jwks, &server.ip, cache, issuers, custom))?;
    let provider = custom
        .map(|_| start_provider(tools, Some(&topo.client)))
        .transpose()?;
    let cfg = cfg.to_string_lossy();
    let args = [
        "-c",
        &cfg,
        "--concurrency",
        "1",
        "--log-level",
        "warn",
        "--disable-hot-restart",
    ];
    let mut run = sidecar(topo, &tools.envoy, &args, 10002, "envoy")?;
    if custom.is_some() {
        run.headers.push(CUSTOM_HEADER.to_string());
    }
    run._provider = provider;
    Ok(run)
}

/// An enforcer as a sidecar: in the client pod's namespace on CPU 0, listening on `port` of its
/// loopback, where the client sends its requests.
fn sidecar(
    topo: &Topology,
    program: &Path,
    args: &[&str],
    port: u16,
    what: &str,
) -> Result<Running> {
    let mut child = pinned(&topo.client, false, "0", program, args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    wait_port_in(&topo.client, port, &mut child, what)?;
    Ok(Running {
        base: format!("http://127.0.0.1:{port}"),
        client_in_pod: false,
        pid: Some(child.id()),
        headers: vec![],
        _agent: None,
        _proc: Some(Proc(child)),
        _provider: None,
    })
}

/// HAProxy emulating RequestAuthentication + the DENY policy, as far as HAProxy can: one PEM
/// key, no kid, claims checked by ACLs.
fn haproxy_cfg(pem: &Path, backend_ip: &str) -> String {
    let pem = pem.display();
    let www =
        r#"hdr www-authenticate 'Bearer realm="%[req.hdr(host)]%[path]", error="invalid_token"'"#;
    format!(
        r#"global
    nbthread 1
    maxconn 8000
    tune.bufsize 16384
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
frontend jwt_in
    bind 127.0.0.1:10001
    http-request set-var(txn.bearer) http_auth_bearer
    acl has_token var(txn.bearer) -m found
    acl has_token_nonempty var(txn.bearer) -m len gt 0
    http-request set-var(txn.now) date if has_token
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg') if has_token
    http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss') if has_token
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int') if has_token
    http-request set-var(txn.nbf) var(txn.bearer),jwt_payload_query('$.nbf','int') if has_token
    acl alg_ok var(txn.alg) -m str RS256
    acl iss_ok var(txn.iss) -m str testing@secure.istio.io
    acl expired var(txn.exp),sub(txn.now) -m int le 0
    acl not_yet var(txn.nbf),sub(txn.now) -m int gt 60
    acl sig_ok var(txn.bearer),jwt_verify("RS256","{pem}") -m int 1
    acl path_public path /productpage
    http-request return status 401 content-type text/plain string "Jwt verification fails" {www} if has_token !has_token_nonempty
    http-request return status 401 content-type text/plain string "Jwt verification fails" {www} if has_token !alg_ok or has_token !iss_ok
    http-request return status 401 content-type text/plain string "Jwt is expired" {www} if has_token expired or has_token not_yet
    http-request return status 401 content-type text/plain string "Jwt verification fails" {www} if has_token !sig_ok
    http-request return status 403 content-type text/plain string "RBAC: access denied" if !has_token !path_public
    http-request del-header Authorization if has_token
    default_backend app
backend app
    http-reuse always
    server b1 {backend_ip}:{BACKEND_PORT} maxconn 1000
"#
    )
}

/// The filter chain Istio generates for the same two objects (jwt_authn + rbac DENY).
/// With `issuers` > 1, one provider per issuer as istiod writes them: sorted by issuer
/// (`origins-<i>`, the demo token's last) in istiod's requirement tree for several rules.
/// With `custom`, Istio's CUSTOM filters first (before jwt_authn): an rbac shadow policy marking the
/// requests the policy matches, and ext_authz enabled by that mark (istiod's defaults: timeout
/// 600 s, status on error 403, fail closed).
fn envoy_cfg(
    jwks: &Path,
    backend_ip: &str,
    cache: bool,
    issuers: usize,
    custom: Option<Provider>,
) -> String {
    let cache = if cache {
        "\n                  jwt_cache_config: {jwt_cache_size: 100}"
    } else {
        ""
    };
    let issuers: Vec<String> = extra_issuers(issuers)
        .chain(["testing@secure.istio.io".to_string()])
        .collect();
    let mut providers = String::new();
    let mut requirements = String::new();
    for (i, iss) in issuers.iter().enumerate() {
        providers.push_str(&format!(
            "                origins-{i}:\n                  issuer: {iss}\n                  local_jwks:\n                    filename: {jwks}\n                  payload_in_metadata: {iss}\n                  forward: false{cache}\n",
            jwks = jwks.display()
        ));
        requirements.push_str(&format!(
            "                    - provider_name: origins-{i}\n"
        ));
    }
    // One rule: any(P0, allow_missing). N rules: any(P0, .., Pn, all(any(Pi, allow_missing)..)).
    if issuers.len() == 1 {
        requirements.push_str("                    - allow_missing: {}\n");
    } else {
        requirements.push_str(
            "                    - requires_all:\n                        requirements:\n",
        );
        for i in 0..issuers.len() {
            requirements.push_str(&format!(
                "                        - requires_any:\n                            requirements:\n                            - provider_name: origins-{i}\n                            - allow_missing: {{}}\n"
            ));
        }
    }
    let (custom_filters, custom_cluster) = custom
        .map(|p| envoy_custom(p, "127.0.0.1"))
        .unwrap_or_default();
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 9901}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10002}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: AUTO
          generate_request_id: false
          route_config:
            name: local
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: app}}
          http_filters:
{custom_filters}          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
{providers}              rules:
              - match: {{prefix: "/"}}
                requires:
                  requires_any:
                    requirements:
{requirements}
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  ns[istio-system]-policy[test-exclude]-rule[0]:
                    permissions:
                    - not_rule:
                        url_path: {{path: {{exact: /productpage}}}}
                    principals:
                    - not_id:
                        sourced_metadata:
                          metadata_matcher:
                            filter: envoy.filters.http.jwt_authn
                            path: [{{key: testing@secure.istio.io}}, {{key: iss}}]
                            value: {{present_match: true}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {backend_ip}, port_value: {BACKEND_PORT}}}}}}}
{custom_cluster}"#,
    )
}

/// Istio's CUSTOM filters and the provider's cluster, for `envoy_cfg`.
fn envoy_custom(provider: Provider, ip: &str) -> (String, String) {
    let service = match provider {
        Provider::Http => format!(
            "              http_service:
                server_uri: {{uri: \"http://{ip}:{PROVIDER_HTTP_PORT}\", cluster: extauthz, timeout: 600s}}
              allowed_headers:
                patterns: [{{exact: x-ext-authz, ignore_case: true}}]
"
        ),
        Provider::Grpc => format!(
            "              grpc_service:
                envoy_grpc: {{cluster_name: extauthz, authority: \"{ip}\"}}
                timeout: 600s
"
        ),
    };
    let filters = format!(
        "          - name: envoy.filters.http.rbac
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              shadow_rules:
                action: DENY
                policies:
                  istio-ext-authz-ns[istio-system]-policy[ext-authz]-rule[0]:
                    permissions:
                    - and_rules:
                        rules:
                        - or_rules:
                            rules:
                            - url_path: {{path: {{prefix: /}}}}
                    principals:
                    - and_ids: {{ids: [{{any: true}}]}}
              shadow_rules_stat_prefix: istio_ext_authz_
          - name: envoy.filters.http.ext_authz
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              status_on_error: {{code: 403}}
              filter_enabled_metadata:
                filter: envoy.filters.http.rbac
                path: [{{key: istio_ext_authz_shadow_effective_policy_id}}]
                value: {{string_match: {{prefix: istio-ext-authz}}}}
{service}"
    );
    let (port, h2) = match provider {
        Provider::Http => (PROVIDER_HTTP_PORT, ""),
        Provider::Grpc => (
            PROVIDER_GRPC_PORT,
            "    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
",
        ),
    };
    let cluster = format!(
        "  - name: extauthz
    connect_timeout: 1s
    type: STATIC
{h2}    load_assignment:
      cluster_name: extauthz
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}
"
    );
    (filters, cluster)
}
