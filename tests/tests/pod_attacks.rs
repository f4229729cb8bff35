//! What an attacker inside an enrolled pod tried against the data path, through the kernel path:
//! h2c upgrade smuggling, two authorities, squatting the agent port, uncounted tunnels, and a
//! slow writer taken for TCP. Each case shows the protected request never reaches the upstream.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use authz_tests::*;

/// Skip-path policy on the upstream plus a DENY on the internal host name.
const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: skip-path, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {notPaths: [\"/productpage\", \"/ws\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-host, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {hosts: [\"admin.internal\", \"admin.internal:*\"]}}]}]
";

fn body_json(resp: &str) -> serde_json::Value {
    json(resp.split("\r\n\r\n").nth(1).unwrap_or(""))
}

fn upstream_count(net_host: &Host, ip: &str) -> u64 {
    let (_, body) = curl(net_host, false, &[&format!("http://{ip}:8000/__count")]).unwrap();
    json(&body)["count"].as_u64().unwrap()
}

struct Setup {
    net: Net,
    client: Host,
    web: Host,
    agent: Agent,
}

fn setup(agent_extra: &str, extra_pods: &[&str]) -> Setup {
    let mut net = Net::new().unwrap();
    let client = net.host("client", 2).unwrap();
    let web = net.host("web", 3).unwrap();
    let mut pods = pod_yaml(&client, "foo", "{app: client}", "client");
    for (name, last) in extra_pods.iter().zip(10..) {
        let h = net.host(name, last).unwrap();
        pods.push_str(&pod_yaml(&h, "foo", &format!("{{app: {name}}}"), name));
    }
    net.serve(&web, "http", 8000).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"{agent_extra}}}\npods:\n{pods}workloads:\n{}policies: [policies]\n",
        workload_yaml(&web, "foo", "{app: web}", "web"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/ap.yaml", POLICIES)]).unwrap();
    Setup {
        net,
        client,
        web,
        agent,
    }
}

#[test]
fn h2c_upgrade_is_stripped_so_no_stream_follows_unchecked() {
    if !require_root() {
        return;
    }
    let s = setup("", &[]);
    let ask = b"GET /productpage HTTP/1.1\r\nHost: w\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    // The upstream does switch to HTTP/2 when asked directly: the attack is real. (Its HTTP/2
    // side may reset the connection when nc half-closes instead of sending a preface, and a reset
    // can drop the 101 before nc reads it, so a few tries.)
    let switched =
        (0..5).any(|_| status_line(&send_raw(&s.web, false, &s.web.ip, ask)).contains("101"));
    assert!(switched, "upstream speaks h2c");
    let before = upstream_count(&s.web, &s.web.ip);
    let resp = send_raw(&s.client, true, &s.web.ip, ask);
    assert!(status_line(&resp).contains("200"), "{resp}");
    let seen = body_json(&resp);
    let headers = seen["headers"].as_object().unwrap();
    for h in ["upgrade", "http2-settings", "connection"] {
        assert!(!headers.contains_key(h), "{h} reached the upstream: {seen}");
    }
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(upstream_count(&s.web, &s.web.ip), before + 1);
    // A WebSocket upgrade to an allowed path still becomes a tunnel; to a denied one it never does.
    let ws =
        b"GET /ws HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nping";
    let resp = send_raw(&s.client, true, &s.web.ip, ws);
    assert!(status_line(&resp).contains("101"), "{resp}");
    assert!(resp.ends_with("ping"), "tunnel echoes: {resp:?}");
    let ws_denied =
        b"GET /admin HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let resp = send_raw(&s.client, true, &s.web.ip, ws_denied);
    assert!(status_line(&resp).contains("403"), "{resp}");
    // CONNECT: decided, then 404 as Envoy's sidecar answers; never a tunnel.
    let resp = send_raw(
        &s.client,
        true,
        &s.web.ip,
        b"CONNECT /productpage HTTP/1.1\r\nHost: w\r\n\r\n",
    );
    assert!(!status_line(&resp).contains("200"), "{resp}");
    let resp = send_raw(
        &s.client,
        true,
        &s.web.ip,
        b"CONNECT admin.internal:443 HTTP/1.1\r\nHost: admin.internal:443\r\n\r\n",
    );
    assert!(status_line(&resp).contains("403"), "{resp}");
}

#[test]
fn one_authority_is_decided_and_forwarded() {
    if !require_root() {
        return;
    }
    let s = setup("", &[]);
    let ip = s.web.ip.as_str();
    // HTTP/1.1 absolute form: the target's authority wins over Host (RFC 9112 3.2.2).
    let resp = send_raw(
        &s.client,
        true,
        ip,
        b"GET http://admin.internal/productpage HTTP/1.1\r\nHost: public\r\n\r\n",
    );
    assert!(status_line(&resp).contains("403"), "{resp}");
    let resp = send_raw(
        &s.client,
        true,
        ip,
        b"GET http://public/productpage HTTP/1.1\r\nHost: admin.internal\r\n\r\n",
    );
    assert!(status_line(&resp).contains("200"), "{resp}");
    let seen = body_json(&resp);
    assert_eq!(seen["headers"]["host"], "public");
    assert_eq!(seen["path"], "/productpage", "origin form upstream");
    // Two Host headers: refused.
    let resp = send_raw(
        &s.client,
        true,
        ip,
        b"GET /productpage HTTP/1.1\r\nHost: public\r\nHost: admin.internal\r\n\r\n",
    );
    assert!(status_line(&resp).contains("400"), "{resp}");
    // HTTP/2: :authority wins; a host header naming another authority is refused.
    let h2 = |authority: &str, host: &str| -> String {
        let out = Net::run(
            &s.client,
            true,
            &testsrv(),
            &[
                "h2req",
                &format!("{ip}:8000"),
                authority,
                host,
                "/productpage",
            ],
        )
        .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(h2("admin.internal", "public").starts_with("400"));
    assert!(h2("public", "admin.internal").starts_with("400"));
    assert!(h2("admin.internal", "-").starts_with("403"));
    let ok = h2("public", "public");
    assert!(ok.starts_with("200"), "{ok}");
    let seen = json(ok.split_once(' ').unwrap().1);
    assert!(
        seen["headers"].get("host").is_none_or(|h| h == "public"),
        "{seen}"
    );
}

/// Holds 127.0.0.1:port and [::1]:port in `host`'s netns as an unprivileged pod process could.
fn squat(net: &mut Net, host: &Host, port: u16) {
    for addr in ["127.0.0.1", "::1"] {
        net.spawn(host, "nc", &["-lk", addr, &port.to_string()])
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !loopback_listeners(host).contains(&port) {
        assert!(Instant::now() < deadline, "squatter listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_squatted_port_neither_blocks_enrollment_nor_stops_the_agent() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let client = net.host("client", 2).unwrap();
    let other = net.host("other", 4).unwrap();
    let web = net.host("web", 3).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    // The port agents used to take, and the old config's, held before the agent starts.
    squat(&mut net, &client, 15001);
    // A pod whose listener cannot open (its netns path is wrong) is pending: its cgroup is known,
    // so its connections to enforced destinations are refused, not sent direct.
    let broken = net.host("broken", 5).unwrap();
    let mut broken_entry = pod_yaml(&broken, "foo", "{app: broken}", "broken");
    broken_entry = broken_entry.replace(&broken.netns_path(), "/var/run/netns/authz-test-none");
    let cfg = format!(
        "agent: {{port: 15001, admin: \"{{ADMIN}}\"}}\npods:\n{}{}{broken_entry}workloads:\n{}policies: [policies]\n",
        pod_yaml(&client, "foo", "{app: client}", "client"),
        pod_yaml(&other, "foo", "{app: other}", "other"),
        workload_yaml(&web, "foo", "{app: web}", "web"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/ap.yaml", POLICIES)]).unwrap();
    let url = |p: &str| format!("http://{}:8000{p}", web.ip);
    for pod in [&client, &other] {
        let (code, _) = curl(pod, true, &[&url("/productpage")]).unwrap();
        assert_eq!(code, 200, "{}", pod.name);
        let (code, body) = curl(pod, true, &[&url("/api/v1/products/0")]).unwrap();
        assert_eq!(
            (code, body.as_str()),
            (403, "RBAC: access denied"),
            "{}",
            pod.name
        );
    }
    let ports = loopback_listeners(&client);
    assert!(
        ports.len() == 3 && ports.contains(&15001),
        "the squatter, and the agent's outbound and inbound listeners: {ports:?}"
    );
    let before = upstream_count(&web, &web.ip);
    let (a, _) = attempt(&broken, &url("/api/v1/products/0"));
    assert_eq!(a, Attempt::Refused, "a pending pod is refused");
    assert_eq!(
        upstream_count(&web, &web.ip),
        before,
        "nothing reached the upstream"
    );
    assert_eq!(agent.metric("authz_pods_enrolled"), 2.0);
    assert_eq!(agent.metric("authz_pods_not_enrolled"), 1.0);
    assert!(agent.metric("authz_kernel_connect_pending_total") >= 1.0);
    assert!(agent.log_text().contains("pod not enrolled, retrying"));
}

/// `authz-testsrv tunnels` in a pod: returns how many upgrades succeeded and the process holding
/// them (its stdin closes them).
fn tunnels(pod: &Host, ip: &str, n: usize) -> (u64, Child) {
    let mut c = Net::command(
        pod,
        true,
        &testsrv(),
        &["tunnels", &format!("{ip}:8000"), &n.to_string()],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (json(&line)["upgraded"].as_u64().unwrap(), c)
}

fn wait_metric(agent: &Agent, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.metric(name) != want {
        assert!(
            Instant::now() < deadline,
            "{name} = {} (want {want})",
            agent.metric(name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tunnels_count_towards_the_pod_and_agent_limits() {
    if !require_root() {
        return;
    }
    let s = setup(", maxConnectionsPerPod: 4, maxConnections: 6", &["second"]);
    let second = s
        .net
        .hosts
        .iter()
        .find(|h| h.name == "second")
        .unwrap()
        .clone();
    let ip = s.web.ip.clone();
    assert_eq!(s.agent.metric("authz_connections_max"), 6.0);
    let (up, a) = tunnels(&s.client, &ip, 8);
    assert_eq!(up, 4, "the pod's limit holds for upgraded tunnels");
    wait_metric(&s.agent, "authz_connections_active", 4.0);
    assert!(s.agent.metric("authz_connections_over_pod_limit_total") >= 4.0);
    // Another pod keeps working while this one is at its limit, and so does the admin port.
    let (code, _) = curl(&second, true, &[&format!("http://{ip}:8000/productpage")]).unwrap();
    assert_eq!(code, 200);
    let (code, _) = http_get(s.agent.admin, "/healthz").unwrap();
    assert_eq!(code, 200);
    wait_metric(&s.agent, "authz_connections_active", 4.0);
    // The agent-wide cap: the second pod gets what is left of it.
    let (up, b) = tunnels(&second, &ip, 4);
    assert_eq!(up, 2, "the agent's cap holds across pods");
    assert!(s.agent.metric("authz_connections_over_agent_limit_total") >= 2.0);
    let (code, _) = http_get(s.agent.admin, "/ready").unwrap();
    assert_eq!(code, 200, "admin answers at the cap");
    for mut c in [a, b] {
        drop(c.stdin.take());
        c.wait().unwrap();
    }
    wait_metric(&s.agent, "authz_connections_active", 0.0);
}

#[test]
fn a_slow_writer_is_still_http() {
    if !require_root() {
        return;
    }
    // ALLOW on a path only: at L4 the rule cannot match (Istio drops it), so a connection taken
    // for TCP is closed, and one taken for HTTP is served.
    let mut net = Net::new().unwrap();
    let client = net.host("client", 2).unwrap();
    let web = net.host("web", 3).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    let ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-page, namespace: foo}\nspec:\n  action: ALLOW\n  rules: [{to: [{operation: {paths: [\"/productpage\"]}}]}]\n";
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\", sniffTimeout: 2s}}\npods:\n{}workloads:\n{}policies: [policies]\n",
        pod_yaml(&client, "foo", "{app: client}", "client"),
        workload_yaml(&web, "foo", "{app: web}", "web"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/ap.yaml", ap)]).unwrap();
    let mut c = Net::command(
        &client,
        true,
        "nc",
        &["-q", "2", "-w", "5", &web.ip, "8000"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    {
        let stdin = c.stdin.as_mut().unwrap();
        for b in b"GET /productpage HTTP/1.1\r\nHost: w\r\n\r\n" {
            stdin.write_all(&[*b]).unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(c.stdin.take());
    let out = String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).to_string();
    assert!(status_line(&out).contains("200"), "served as HTTP: {out:?}");
    assert_eq!(agent.metric("authz_connections_tcp_total"), 0.0);
    // Bytes that cannot be HTTP are still TCP, and denied at L4 here.
    let out = send_raw(&client, true, &web.ip, b"\x16\x03\x01\x00\x05hello");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(agent.metric("authz_connections_tcp_total"), 1.0);
}
