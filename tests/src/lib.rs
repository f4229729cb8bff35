//! Test hosts for the end-to-end tests: network namespaces joined by a bridge (in a hub
//! namespace of their own), cgroup v2 directories for pods, processes started inside them, and
//! the agent as a child process. Everything is removed on drop, also when a test fails.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub mod container;
pub mod fakeapi;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Kernel tests need root. Outside CI they say so and skip; in CI (CI set) they fail instead.
pub fn require_root() -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("kernel tests must run as root in CI");
    }
    eprintln!("skipped: needs root (run `cargo xtask test` as root)");
    false
}

pub fn sh(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .min_by_key(|p| p.as_os_str().len())
        .expect("cgroup2 mounted")
}

/// A test host: a network namespace with one address on the test bridge, and a cgroup.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub cgroup: PathBuf,
    /// The bridge side of its veth (in the hub namespace), where the node sees what it sends.
    pub host_if: String,
}

impl Host {
    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.netns)
    }
}

/// A set of hosts on one bridge. Addresses are 10.<tag>.0.<n>/24, private to this set's hub.
pub struct Net {
    tag: String,
    /// Third octet of this set's 10.77.<subnet>.0/24.
    pub subnet: u32,
    host_link: Option<String>,
    /// Rules and links of `outside_masqueraded`, undone on drop.
    masquerade: Vec<Vec<String>>,
    hub: String,
    cg_base: PathBuf,
    pub hosts: Vec<Host>,
    children: Vec<Child>,
    n: u32,
}

impl Net {
    pub fn new() -> Result<Net> {
        let seq = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{}", std::process::id() % 10000, seq);
        let hub = format!("azt{tag}hub");
        sh("ip", &["netns", "add", &hub])?;
        let cg_base = cgroup2_root().join(format!("authz-test-{tag}"));
        let net = Net {
            tag,
            subnet: seq % 250,
            host_link: None,
            masquerade: vec![],
            hub: hub.clone(),
            cg_base: cg_base.clone(),
            hosts: vec![],
            children: vec![],
            n: 0,
        };
        std::fs::create_dir_all(&cg_base)?;
        sh("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        sh("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        sh("ip", &["-n", &hub, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// Connects the test process's own namespace (where the agent runs) to the bridge as
    /// 10.77.<subnet>.254, as a node reaches its pods.
    pub fn attach_host(&mut self) -> Result<()> {
        let (a, b) = (format!("h{}", self.tag), format!("g{}", self.tag));
        sh(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        )?;
        sh("ip", &["link", "set", &b, "netns", &self.hub])?;
        sh(
            "ip",
            &["-n", &self.hub, "link", "set", &b, "master", "br0", "up"],
        )?;
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.77.{}.254/24", self.subnet),
                "dev",
                &a,
            ],
        )?;
        sh("ip", &["link", "set", &a, "up"])?;
        self.host_link = Some(a);
        Ok(())
    }

    /// Adds a host at 10.77.<subnet>.<last>.
    pub fn host(&mut self, name: &str, last: u8) -> Result<Host> {
        self.n += 1;
        let netns = format!("azt{}{}", self.tag, name);
        let ip = format!("10.77.{}.{last}", self.subnet);
        sh("ip", &["netns", "add", &netns])?;
        let (a, b) = (
            format!("a{}x{}", self.tag, self.n),
            format!("b{}x{}", self.tag, self.n),
        );
        sh(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        )?;
        sh("ip", &["link", "set", &a, "netns", &netns])?;
        sh("ip", &["link", "set", &b, "netns", &self.hub])?;
        sh(
            "ip",
            &["-n", &self.hub, "link", "set", &b, "master", "br0", "up"],
        )?;
        sh("ip", &["-n", &netns, "link", "set", &a, "name", "eth0"])?;
        sh(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ],
        )?;
        sh("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
        sh("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        let cgroup = self.cg_base.join(name);
        std::fs::create_dir_all(&cgroup)?;
        let h = Host {
            name: name.into(),
            netns,
            ip,
            cgroup,
            host_if: b,
        };
        self.hosts.push(h.clone());
        Ok(h)
    }

    /// A client outside the node whose connections to the pods the node forwards and
    /// masquerades to its own address on the pods' bridge (10.77.<subnet>.254), as kube-proxy
    /// does for a NodePort or LoadBalancer Service with `externalTrafficPolicy: Cluster`. Its
    /// own link is 10.78.<subnet>.0/24; nothing it sends leaves this machine. Needs
    /// `attach_host` first.
    pub fn outside_masqueraded(&mut self, name: &str) -> Result<Host> {
        let netns = format!("azt{}{}", self.tag, name);
        let (node_if, ext_if) = (format!("m{}", self.tag), format!("n{}", self.tag));
        let (node_ip, ext_ip) = (
            format!("10.78.{}.1", self.subnet),
            format!("10.78.{}.2", self.subnet),
        );
        let (outside, pods) = (
            format!("10.78.{}.0/24", self.subnet),
            format!("10.77.{}.0/24", self.subnet),
        );
        sh("ip", &["netns", "add", &netns])?;
        self.masquerade.push(vec![
            "ip".into(),
            "netns".into(),
            "del".into(),
            netns.clone(),
        ]);
        sh(
            "ip",
            &[
                "link", "add", &node_if, "type", "veth", "peer", "name", &ext_if,
            ],
        )?;
        self.masquerade.push(vec![
            "ip".into(),
            "link".into(),
            "del".into(),
            node_if.clone(),
        ]);
        sh("ip", &["link", "set", &ext_if, "netns", &netns])?;
        sh(
            "ip",
            &["addr", "add", &format!("{node_ip}/24"), "dev", &node_if],
        )?;
        sh("ip", &["link", "set", &node_if, "up"])?;
        for args in [
            vec!["addr", "add", &format!("{ext_ip}/24"), "dev", &ext_if],
            vec!["link", "set", &ext_if, "name", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", &pods, "via", &node_ip],
        ] {
            let mut a = vec!["-n", netns.as_str()];
            a.extend(args.iter().copied());
            sh("ip", &a)?;
        }
        let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        self.masquerade.push(vec![
            "sh".into(),
            "-c".into(),
            format!("echo {} > /proc/sys/net/ipv4/ip_forward", forward.trim()),
        ]);
        for rule in [
            vec![
                "-t",
                "nat",
                "POSTROUTING",
                "-s",
                &outside,
                "-d",
                &pods,
                "-j",
                "MASQUERADE",
            ],
            vec![
                "-t", "filter", "FORWARD", "-s", &outside, "-d", &pods, "-j", "ACCEPT",
            ],
            vec![
                "-t", "filter", "FORWARD", "-s", &pods, "-d", &outside, "-j", "ACCEPT",
            ],
        ] {
            let (table, rest) = (rule[..2].to_vec(), &rule[2..]);
            let mut add: Vec<&str> = table.clone();
            add.push("-I");
            add.extend_from_slice(rest);
            sh("iptables", &add)?;
            let mut del: Vec<String> = vec!["iptables".into()];
            del.extend(table.iter().map(|s| s.to_string()));
            del.push("-D".into());
            del.extend(rest.iter().map(|s| s.to_string()));
            self.masquerade.push(del);
        }
        let cgroup = self.cg_base.join(name);
        std::fs::create_dir_all(&cgroup)?;
        Ok(Host {
            name: name.into(),
            netns,
            ip: ext_ip,
            cgroup,
            host_if: node_if,
        })
    }

    /// A cgroup for the node's kubelet (an agent's `kubeletCgroup`): what runs in it is the
    /// kubelet to the agent.
    pub fn kubelet_cgroup(&self) -> PathBuf {
        let cg = self.cg_base.join("kubelet.service");
        std::fs::create_dir_all(&cg).expect("kubelet cgroup");
        cg
    }

    /// The namespace holding the bridge and the host side of every host's veth.
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// The cgroup all of this set's pods are under (an agent's `cgroupRoot`).
    pub fn cgroup_base(&self) -> &Path {
        &self.cg_base
    }

    /// A pod as kubelet lays it out (systemd driver, BestEffort):
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice`, with a
    /// container scope below it holding a long-running process in the pod's netns (the sandbox
    /// the agent finds the netns through). Commands `in_pod` run in that container's cgroup.
    pub fn kube_pod(&mut self, name: &str, last: u8, uid: &str) -> Result<Host> {
        let h = self.host(name, last)?;
        let _ = std::fs::remove_dir(&h.cgroup);
        self.sandbox(h, &self.cg_base.clone(), uid)
    }

    /// The cgroup subtree of node `node` when several agents share this kernel, each a node:
    /// that agent's `cgroupRoot`, where kubelet of that node puts its pods.
    pub fn node_root(&self, node: &str) -> PathBuf {
        self.cg_base.join(node)
    }

    /// As `kube_pod`, on node `node` (below `node_root(node)`).
    pub fn kube_pod_on(&mut self, node: &str, name: &str, last: u8, uid: &str) -> Result<Host> {
        let h = self.host(name, last)?;
        let _ = std::fs::remove_dir(&h.cgroup);
        self.sandbox(h, &self.node_root(node), uid)
    }

    /// `host`'s network namespace and address as a new pod `uid` on `node`: a pod deleted and
    /// recreated elsewhere with the same address (a new sandbox in the same netns).
    pub fn kube_pod_again(&mut self, host: &Host, node: &str, uid: &str) -> Result<Host> {
        self.sandbox(host.clone(), &self.node_root(node), uid)
    }

    /// kubelet's layout for pod `uid` below `root`, with a process in `h`'s netns.
    fn sandbox(&mut self, mut h: Host, root: &Path, uid: &str) -> Result<Host> {
        let pod = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        h.cgroup = pod.join(format!("cri-containerd-{}.scope", h.name));
        std::fs::create_dir_all(&h.cgroup)?;
        if let Some(saved) = self.hosts.iter_mut().find(|x| x.name == h.name) {
            saved.cgroup = h.cgroup.clone();
        }
        let child = Net::command(&h, true, "sleep", &["infinity"])
            .stdout(Stdio::null())
            .spawn()?;
        self.children.push(child);
        Ok(h)
    }

    /// A command that runs in `host`'s netns, and in its cgroup when `in_pod`.
    pub fn command(host: &Host, in_pod: bool, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.netns, program]).args(args);
        if in_pod {
            let procs = host.cgroup.join("cgroup.procs");
            unsafe {
                c.pre_exec(move || {
                    // "0" moves the writing process; children inherit the cgroup.
                    std::fs::write(&procs, "0")
                });
            }
        }
        c
    }

    pub fn run(host: &Host, in_pod: bool, program: &str, args: &[&str]) -> Result<Output> {
        Net::command(host, in_pod, program, args)
            .output()
            .with_context(|| format!("{program} in {}", host.name))
    }

    /// Starts a long-running process in `host` (outside its pod cgroup), killed on drop.
    pub fn spawn(&mut self, host: &Host, program: &str, args: &[&str]) -> Result<()> {
        let child = Net::command(host, false, program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        self.children.push(child);
        Ok(())
    }

    /// Starts the test server (`authz-testsrv MODE ip:port`) and waits until it accepts.
    pub fn serve(&mut self, host: &Host, mode: &str, port: u16) -> Result<()> {
        self.serve_args(host, port, &[mode])
    }

    /// As `serve`, with more arguments after the address (e.g. `file` mode's path and file).
    pub fn serve_args(&mut self, host: &Host, port: u16, args: &[&str]) -> Result<()> {
        let addr = format!("{}:{port}", host.ip);
        let mut a = vec![args[0], addr.as_str()];
        a.extend_from_slice(&args[1..]);
        self.spawn(host, &testsrv(), &a)?;
        wait_listening(host, port)
    }
}

/// Waits return as soon as what they wait for happens; their limits only bound a failure, and are
/// long enough for an emulated VM (where starting a process takes seconds).
const WAIT: Duration = Duration::from_secs(90);

pub fn wait_listening(host: &Host, port: u16) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let out = Net::run(host, false, "ss", &["-Hltn", &format!("sport = :{port}")])?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on {}:{port}", host.name)
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in &self.hosts {
            let _ = std::fs::write(h.cgroup.join("cgroup.kill"), "1");
        }
        std::thread::sleep(Duration::from_millis(50));
        let _ = std::fs::write(self.cg_base.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(20));
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).output();
        }
        remove_cgroup_tree(&self.cg_base);
        for undo in self.masquerade.iter().rev() {
            let _ = Command::new(&undo[0]).args(&undo[1..]).output();
        }
        if let Some(l) = &self.host_link {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub])
            .output();
    }
}

/// cgroup directories can only be removed leaves first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A binary of the workspace: `$ENV` if set, else target/release, else target/debug.
fn built(name: &str, env: &str, how: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    for profile in ["release", "debug"] {
        let p = target_dir().join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not built: run `{how}` (cargo xtask build does)")
}

/// The agent binary.
pub fn agent_bin() -> PathBuf {
    built(
        "authz-agent",
        "AUTHZ_AGENT_BIN",
        "cargo build --release -p authz-user",
    )
}

/// The test server binary, built beside the agent.
pub fn testsrv() -> String {
    built(
        "authz-testsrv",
        "AUTHZ_TESTSRV_BIN",
        "cargo build --release -p authz-tests --bins",
    )
    .to_string_lossy()
    .into_owned()
}

/// The test ext_authz provider (HTTP and gRPC), built beside the agent.
pub fn extauthz_bin() -> PathBuf {
    built(
        "authz-extauthz",
        "AUTHZ_EXTAUTHZ_BIN",
        "cargo build --release -p authz-tests --bins",
    )
}

/// The CNI plugin binary, built beside the agent.
pub fn cni_bin() -> PathBuf {
    built(
        "authz-cni",
        "AUTHZ_CNI_BIN",
        "cargo build --release -p authz-cni",
    )
}

/// Envoy 1.40 (the peer the differential tests compare with): `$AUTHZ_ENVOY`, else the one
/// `cargo xtask test` installs under target/. None when neither is there.
pub fn envoy_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AUTHZ_ENVOY") {
        return Some(PathBuf::from(p));
    }
    std::fs::read_dir(target_dir().join("bench-tools/venv/lib"))
        .ok()?
        .flatten()
        .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.exists())
}

/// A child process killed (and reaped) on drop, whatever the test does.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test ext_authz provider on 127.0.0.1 (HTTP, gRPC ports), once both accept.
pub fn start_extauthz(http: u16, grpc: u16) -> KillOnDrop {
    let child = Command::new(extauthz_bin())
        .args([format!("127.0.0.1:{http}"), format!("127.0.0.1:{grpc}")])
        .stdout(Stdio::null())
        .spawn()
        .expect("authz-extauthz starts");
    let p = KillOnDrop(child);
    for port in [http, grpc] {
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "authz-extauthz not listening on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    p
}

/// A free TCP port on the loopback of the test process's namespace.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running agent (a child process), stopped with SIGTERM on drop.
pub struct Agent {
    pub child: Child,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// This agent's pin directory (its own, so agents of parallel tests do not adopt each other).
    pub bpffs: PathBuf,
    /// Run `authz-agent cleanup` on drop (off for an agent whose pins a successor adopts).
    pub cleanup_on_drop: bool,
}

impl Agent {
    /// Writes `config` (which must use `admin: "{ADMIN}"` inside the `agent:` flow mapping) and
    /// starts the agent.
    pub fn start(config: &str) -> Result<Agent> {
        Agent::start_with_files(config, &[])
    }

    /// As `start`, with extra files written beside the config (e.g. policies).
    pub fn start_with_files(config: &str, files: &[(&str, &str)]) -> Result<Agent> {
        Agent::start_pinned(config, files, &fresh_bpffs())
    }

    /// As `start_with_files`, running the agent binary `bin` (another build of the agent, as
    /// the benchmark's comparison of two revisions does).
    pub fn start_bin(bin: &Path, config: &str, files: &[(&str, &str)]) -> Result<Agent> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut agent = Agent::spawn_program(bin, config, files, &fresh_bpffs(), admin, &[])?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// As `start_with_files`, with the given pin directory: a second agent on the same one
    /// adopts the first's maps (hot restart).
    pub fn start_pinned(config: &str, files: &[(&str, &str)], bpffs: &Path) -> Result<Agent> {
        let mut agent = Agent::spawn(config, files, bpffs)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Starts the agent without waiting for it to be ready.
    pub fn spawn(config: &str, files: &[(&str, &str)], bpffs: &Path) -> Result<Agent> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        Agent::spawn_at(config, files, bpffs, admin)
    }

    /// As `spawn`, with this admin address (a successor shares its predecessor's, as a
    /// DaemonSet's surge pod does on the host network).
    pub fn spawn_at(
        config: &str,
        files: &[(&str, &str)],
        bpffs: &Path,
        admin: SocketAddr,
    ) -> Result<Agent> {
        Agent::spawn_with_env(config, files, bpffs, admin, &[])
    }

    /// As `spawn_at`, with extra environment (e.g. `AUTHZ_TEST_LAYOUT`, an agent of another
    /// layout version).
    pub fn spawn_with_env(
        config: &str,
        files: &[(&str, &str)],
        bpffs: &Path,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        Agent::spawn_program(&agent_bin(), config, files, bpffs, admin, env)
    }

    fn spawn_program(
        bin: &Path,
        config: &str,
        files: &[(&str, &str)],
        bpffs: &Path,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!(
            "authz-agent-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir)?;
        for (name, text) in files {
            let p = dir.join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(p, text)?;
        }
        let cfg = dir.join("agent.yaml");
        std::fs::write(&cfg, fill_config(config, admin, bpffs))?;
        let log = dir.join("agent.log");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env(
                "AUTHZ_LOG",
                std::env::var("AUTHZ_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Agent {
            child,
            admin,
            dir,
            log,
            bpffs: bpffs.to_path_buf(),
            cleanup_on_drop: true,
        })
    }

    /// Waits until the agent reports ready.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/ready") {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("agent exited with {st}: {}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("agent not ready in time: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `config` as this agent reads it (for tests that rewrite the config file).
    pub fn fill(&self, config: &str) -> String {
        fill_config(config, self.admin, &self.bpffs)
    }

    /// `authz-agent cleanup` on this agent's pin directory.
    pub fn cleanup(&self) -> Result<()> {
        let out = Command::new(agent_bin())
            .args(["cleanup", "--bpffs"])
            .arg(&self.bpffs)
            .output()?;
        if !out.status.success() {
            bail!("cleanup: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Prometheus samples: `name{labels}` -> value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let (_, body) = http_get(self.admin, "/metrics").expect("metrics");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.metrics().get(name).copied().unwrap_or(0.0)
    }

    /// Requests this agent counted, every decision and reason together.
    pub fn requests_total(&self) -> f64 {
        self.metrics()
            .iter()
            .filter(|(k, _)| k.starts_with("authz_requests_total{"))
            .map(|(_, v)| v)
            .sum()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("agent did not exit on SIGTERM: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failing test shows the agent's counters of what it refused and dropped.
        if std::thread::panicking() {
            if let Ok((_, text)) = http_get(self.admin, "/metrics") {
                for l in text.lines().filter(|l| {
                    !l.starts_with('#')
                        && (l.contains("dropped") || l.contains("refused") || l.contains("pending"))
                }) {
                    eprintln!("{l}");
                }
            }
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
        // A failing test shows what its agents said (the last lines).
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- agent {} log (last lines) ---", self.admin);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if self.cleanup_on_drop {
            if let Err(e) = self.cleanup() {
                eprintln!("{e:#}");
            }
        }
        if std::env::var_os("AUTHZ_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A pin directory of its own, so agents of parallel tests do not adopt each other.
pub fn fresh_bpffs() -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/authz-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ))
}

/// `"{ADMIN}"` becomes the admin address on loopback, `"{ADMIN_ANY}"` the same port on all
/// addresses (as in a DaemonSet, for the kubelet's probes); both add the pin directory.
fn fill_config(config: &str, admin: SocketAddr, bpffs: &Path) -> String {
    config
        .replace(
            "\"{ADMIN}\"",
            &format!("\"{admin}\", bpffs: \"{}\"", bpffs.display()),
        )
        .replace(
            "\"{ADMIN_ANY}\"",
            &format!(
                "\"0.0.0.0:{}\", bpffs: \"{}\"",
                admin.port(),
                bpffs.display()
            ),
        )
}

/// A command run on the node (the test process's namespace), in `cgroup` (e.g. the kubelet's).
pub fn node_command(cgroup: &Path, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    let procs = cgroup.join("cgroup.procs");
    unsafe {
        c.pre_exec(move || std::fs::write(&procs, "0"));
    }
    c
}

/// A minimal HTTP/1.0 GET for the admin port (test process namespace).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// curl inside a pod (in its cgroup): returns (status, body).
pub fn curl(host: &Host, in_pod: bool, args: &[&str]) -> Result<(u16, String)> {
    let mut a = vec!["-sS", "-m", "20", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let out = Net::run(host, in_pod, "curl", &a)?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    if code == "000" || !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// A JSON body (the test server's echo), or a panic naming what came instead.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// How a connection attempt from a pod ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// An HTTP answer: (status, body).
    Answer(u16, String),
    /// connect() failed at once (curl exit 7: refused).
    Refused,
    /// Anything else: curl's exit code and message.
    Failed(i32, String),
}

/// Attempts from a pod in a loop until stopped: (started, outcome, duration) of each.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Attempt, Duration)>>,
}

impl Load {
    pub fn start(pod: &Host, url: &str) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, pod, url) = (stop.clone(), pod.clone(), url.to_string());
        let thread = std::thread::spawn(move || {
            let mut log = vec![];
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let (a, took) = attempt(&pod, &url);
                log.push((at, a, took));
            }
            log
        });
        Load { stop, thread }
    }

    pub fn stop(self) -> Vec<(Instant, Attempt, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }

    /// Stops; (attempts made, those not answered 200).
    pub fn stop_not_ok(self) -> (usize, Vec<Attempt>) {
        let log = self.stop();
        let n = log.len();
        let bad = log
            .into_iter()
            .map(|(_, a, _)| a)
            .filter(|a| !matches!(a, Attempt::Answer(200, _)))
            .collect();
        (n, bad)
    }
}

/// How fast this machine runs what the tests time: the best of three refused connections from a
/// pod (curl started in the pod's netns and cgroup, to a loopback port nobody listens on, so
/// nothing is steered). Time limits are stated for a fast host and stretched by it, so the same
/// assertion holds on the host and in an emulated VM (where starting a process takes seconds),
/// and still fails when something really hangs.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// The measured attempt.
    pub attempt: Duration,
}

impl Pace {
    pub fn measure(pod: &Host) -> Pace {
        let attempt = (0..3)
            .map(|_| {
                let t = Instant::now();
                let _ = Net::run(
                    pod,
                    true,
                    "curl",
                    &["-sS", "-m", "3", "http://127.0.0.1:9/"],
                );
                t.elapsed()
            })
            .min()
            .unwrap();
        Pace { attempt }
    }

    /// A limit of `d` on a fast host, plus room for three attempts at this machine's pace.
    pub fn after(&self, d: Duration) -> Duration {
        d + 3 * self.attempt
    }

    /// How long `n` attempts take here.
    pub fn attempts(&self, n: u32) -> Duration {
        n * self.attempt
    }
}

/// One curl from `host` (in its pod cgroup) with a 3 s cap, and how long it took.
pub fn attempt(host: &Host, url: &str) -> (Attempt, Duration) {
    let t = Instant::now();
    let out = Net::run(
        host,
        true,
        "curl",
        &["-sS", "-m", "3", "-w", "\n%{http_code}", url],
    )
    .expect("running curl");
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let a = match out.status.code() {
        Some(0) => {
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
            Attempt::Answer(code.trim().parse().unwrap_or(0), body.to_string())
        }
        Some(7) => Attempt::Refused,
        c => Attempt::Failed(
            c.unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ),
    };
    (a, took)
}

/// Ids and names of the loaded BPF programs (bpftool), to prove nothing is left behind. Ids only
/// grow, so a test tells its own programs from an earlier test's, which the kernel releases
/// asynchronously once that test's cgroup and network namespaces are gone.
pub fn loaded_bpf_programs() -> Result<Vec<(u64, String)>> {
    let out = sh("bpftool", &["-j", "prog", "show"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// The ports listening on 127.0.0.1 in `host`'s netns (in test pods, the agent's listener).
pub fn loopback_listeners(host: &Host) -> Vec<u16> {
    let out = Net::run(host, false, "ss", &["-Hltn"]).expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .strip_prefix("127.0.0.1:")?
                .parse()
                .ok()
        })
        .collect()
}

/// Sends `bytes` from `host` to ip:8000 with nc (in the pod's cgroup when `in_pod`) and returns
/// what came back; nc closes 1 s after its input ends.
pub fn send_raw(host: &Host, in_pod: bool, ip: &str, bytes: &[u8]) -> String {
    use std::io::Write;
    let mut c = Net::command(host, in_pod, "nc", &["-q", "1", "-w", "3", ip, "8000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting nc");
    c.stdin.as_mut().unwrap().write_all(bytes).unwrap();
    drop(c.stdin.take());
    String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).to_string()
}

/// The first line of a raw HTTP response.
pub fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

/// Pod YAML entry for the agent config.
pub fn pod_yaml(h: &Host, ns: &str, labels: &str, sa: &str) -> String {
    format!(
        "  - {{name: {}, namespace: {ns}, labels: {labels}, serviceAccount: {sa}, netns: {}, cgroup: {}, ips: [{}]}}\n",
        h.name,
        h.netns_path(),
        h.cgroup.display(),
        h.ip
    )
}

pub fn workload_yaml(h: &Host, ns: &str, labels: &str, sa: &str) -> String {
    format!(
        "  - {{name: {}, namespace: {ns}, labels: {labels}, serviceAccount: {sa}, ips: [{}]}}\n",
        h.name, h.ip
    )
}

/// An agent config with one enrolled pod and one workload, both in namespace foo with
/// `app: <host name>` and their host name as service account; `agent_extra` goes inside the
/// `agent:` mapping (e.g. `", failMode: open"`).
pub fn one_pod_config(pod: &Host, workload: &Host, agent_extra: &str) -> String {
    format!(
        "agent: {{admin: \"{{ADMIN}}\"{agent_extra}}}\npods:\n{}workloads:\n{}",
        pod_yaml(pod, "foo", &format!("{{app: {}}}", pod.name), &pod.name),
        workload_yaml(
            workload,
            "foo",
            &format!("{{app: {}}}", workload.name),
            &workload.name
        ),
    )
}

/// CPU time (user + system, all threads) of a process, in microseconds.
pub fn cpu_us(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} gone"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(ticks * 1_000_000 / hz)
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// A long-lived line-echo connection from a pod (nc inside its cgroup), killed on drop.
pub struct Echo {
    child: Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl Echo {
    pub fn open(pod: &Host, ip: &str, port: u16) -> Echo {
        let mut child = Net::command(pod, true, "nc", &[ip, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting nc");
        let input = child.stdin.take().unwrap();
        let output = std::io::BufReader::new(child.stdout.take().unwrap());
        Echo {
            child,
            input,
            output,
        }
    }

    /// Sends a line and returns the echoed one, or None when the connection is gone. (nc keeps
    /// its stdout open after the network side closes, so only use this where an answer is due.)
    pub fn echo(&mut self, s: &str) -> Option<String> {
        use std::io::BufRead;
        self.input.write_all(format!("{s}\n").as_bytes()).ok()?;
        self.input.flush().ok()?;
        let mut l = String::new();
        match self.output.read_line(&mut l) {
            Ok(n) if n > 0 => Some(l.trim().to_string()),
            _ => None,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The repository's test data folder.
pub fn data_dir() -> PathBuf {
    tests_dir().join("data")
}

/// This crate's directory: `$AUTHZ_TESTS_DIR` where the tests run from a copy of the tree
/// elsewhere (a VM's synced folder), else where they were built.
pub fn tests_dir() -> PathBuf {
    std::env::var_os("AUTHZ_TESTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The Istio sample token (RS256, iss = sub = testing@secure.istio.io).
pub fn demo_jwt() -> String {
    std::fs::read_to_string(data_dir().join("istio-samples/demo.jwt"))
        .unwrap()
        .trim()
        .to_string()
}

/// The same token with its signature altered.
pub fn tampered(token: &str) -> String {
    let mut t = token.to_string();
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    t
}

/// An HTTPS server on 127.0.0.1 (the agent's namespace, outside every pod) serving one file,
/// with a certificate for `localhost` from a test CA. Stops when dropped or `stop`ped.
pub struct HttpsFile {
    pub port: u16,
    pub ca_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpsFile {
    pub fn start(path: &str, body: Vec<u8>, dir: &Path) -> Result<HttpsFile> {
        let (cfg, ca_pem) = test_tls(&["localhost"])?;
        std::fs::create_dir_all(dir)?;
        let ca_file = dir.join("jwks-ca.pem");
        std::fs::write(&ca_file, ca_pem)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let path = path.to_string();
        let body = bytes::Bytes::from(body);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => return,
                        Ok((s, _)) = listener.accept() => {
                            let (acceptor, path, body) = (acceptor.clone(), path.clone(), body.clone());
                            tokio::spawn(async move {
                                let Ok(tls) = acceptor.accept(s).await else { return };
                                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                    let ok = req.uri().path() == path;
                                    let body = if ok { body.clone() } else { bytes::Bytes::new() };
                                    async move {
                                        Ok::<_, std::convert::Infallible>(hyper::Response::builder().status(if ok { 200 } else { 404 }).body(http_body_util::Full::new(body)).unwrap())
                                    }
                                });
                                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), svc).await;
                            });
                        }
                    }
                }
            });
        });
        Ok(HttpsFile {
            port,
            ca_file,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// The server goes away (an outage).
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HttpsFile {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Helm: `AUTHZ_HELM`, else target/tools/helm, else `helm` on PATH. None (the test says why and
/// skips) only outside CI and `cargo xtask test`, which installs it.
pub fn helm() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("AUTHZ_HELM").map(PathBuf::from),
        Some(target_dir().join("tools/helm")),
        Some(PathBuf::from("helm")),
    ];
    for c in candidates.into_iter().flatten() {
        if Command::new(&c)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(c);
        }
    }
    if std::env::var_os("CI").is_some() || std::env::var_os("AUTHZ_HELM").is_some() {
        panic!("helm not found (cargo xtask setup installs it under target/tools)");
    }
    eprintln!("skipped: helm not found (`cargo xtask test` installs it under target/tools)");
    None
}

/// The chart in deploy/helm rendered with `--set` values, as installed in authz-system.
pub fn helm_template(helm: &Path, set: &[&str]) -> String {
    let chart = tests_dir().join("../deploy/helm/authz-agent");
    let mut c = Command::new(helm);
    c.args(["template", "authz-agent"])
        .arg(&chart)
        .args(["--namespace", "authz-system"]);
    for s in set {
        c.args(["--set", s]);
    }
    let out = c.output().expect("running helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm output is UTF-8")
}

/// A TLS server config with a certificate for `names` (DNS names or IP addresses) from a fresh
/// test CA, and that CA in PEM for the client to trust.
pub fn test_tls(names: &[&str]) -> Result<(rustls::ServerConfig, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let leaf = CertificateParams::new(names)?
        .signed_by(&leaf_key, &Issuer::from_params(&ca_params, &ca_key))?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )?;
    Ok((cfg, ca.pem()))
}

/// curl from the test's own namespace (the node): (status, body); status 0 when no connection
/// was made, with curl's message as the body.
pub fn curl_node(args: &[&str]) -> (u16, String) {
    let mut a = vec!["-sS", "-m", "10", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let out = Command::new("curl")
        .args(&a)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let body = format!("{body}{}", String::from_utf8_lossy(&out.stderr));
    (code.trim().parse().unwrap_or(0), body)
}

/// The JWT FAQ's "skip JWT for some paths" at the gateway: (path, token, status, body when it
/// is Envoy's own). `token` is valid, `bad` a tampered one.
pub fn faq_skip_path_cases<'a>(
    token: &'a str,
    bad: &'a str,
) -> [(&'static str, Option<&'a str>, u16, Option<&'static str>); 4] {
    [
        ("/productpage", None, 200, None),
        ("/api/v1/products/0", None, 403, Some("RBAC: access denied")),
        ("/api/v1/products/0", Some(token), 200, None),
        (
            "/productpage",
            Some(bad),
            401,
            Some("Jwt verification fails"),
        ),
    ]
}
