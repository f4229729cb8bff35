//! Per-pod limits: a pod at maxConnectionsPerPod gets further connections closed at once and
//! counted, while another pod on the node keeps being served.
use authz_tests::*;

/// One short connection: sends a line, returns what came back ("" when the connection was
/// closed without an answer).
fn probe(pod: &Host, ip: &str) -> String {
    let out = Net::run(
        pod,
        true,
        "sh",
        &["-c", &format!("echo probe | nc -q 1 -w 2 {ip} 9000")],
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_pod_at_its_connection_limit_does_not_starve_others() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let noisy = net.host("noisy", 2).unwrap();
    let quiet = net.host("quiet", 3).unwrap();
    let w = net.host("w", 4).unwrap();
    net.serve(&w, "echo", 9000).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\", maxConnectionsPerPod: 2}}\npods:\n{}{}workloads:\n{}",
        pod_yaml(&noisy, "foo", "{app: noisy}", "noisy"),
        pod_yaml(&quiet, "foo", "{app: quiet}", "quiet"),
        workload_yaml(&w, "foo", "{app: w}", "w"),
    );
    let agent = Agent::start(&cfg).unwrap();
    let mut a = Echo::open(&noisy, &w.ip, 9000);
    let mut b = Echo::open(&noisy, &w.ip, 9000);
    assert_eq!(a.echo("a").as_deref(), Some("a"));
    assert_eq!(b.echo("b").as_deref(), Some("b"));
    assert_eq!(
        probe(&noisy, &w.ip),
        "",
        "a third connection of the pod is closed"
    );
    assert_eq!(agent.metric("authz_connections_over_pod_limit_total"), 1.0);

    assert_eq!(probe(&quiet, &w.ip), "probe", "another pod is served");
    assert_eq!(
        a.echo("a2").as_deref(),
        Some("a2"),
        "open ones keep flowing"
    );

    drop(a);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(probe(&noisy, &w.ip), "probe", "a freed slot is reusable");
    assert_eq!(b.echo("b2").as_deref(), Some("b2"));
}

#[test]
fn an_idle_tcp_relay_is_closed_after_tcp_idle_timeout() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let pod = net.host("p", 2).unwrap();
    let w = net.host("w", 3).unwrap();
    net.serve(&w, "echo", 9000).unwrap();
    let cfg = one_pod_config(&pod, &w, ", tcpIdleTimeout: 1s");
    let agent = Agent::start(&cfg).unwrap();
    // Traffic every 0.5 s keeps the relay open past the timeout; then 2 s of silence closes it.
    let script = format!(
        "exec 3<>/dev/tcp/{}/9000
         for i in 1 2 3 4; do echo ping$i >&3; read -t 2 l <&3; echo got=$l; sleep 0.5; done
         sleep 2; echo late >&3 2>/dev/null; read -t 2 l <&3; echo late=$l",
        w.ip
    );
    let out = Net::run(&pod, true, "bash", &["-c", &script]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("got=ping1") && text.contains("got=ping4"),
        "active relay kept: {text}"
    );
    assert!(!text.contains("late=late"), "idle relay closed: {text}");
    assert_eq!(agent.metric("authz_tcp_idle_timeouts_total"), 1.0);
}

/// One pod holds as many slow connections (request heads never finished) as it may, spread over
/// two protected pods: the destinations' other clients and their own outbound calls keep
/// succeeding, because connections count against the client that opened them.
#[test]
fn a_client_holding_slow_connections_starves_no_one() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let victim = net.host("victim", 2).unwrap();
    let victim2 = net.host("victim2", 3).unwrap();
    let attacker = net.host("attacker", 4).unwrap();
    let other = net.host("other", 5).unwrap();
    let w = net.host("w", 6).unwrap();
    for h in [&victim, &victim2, &w] {
        net.serve(h, "http", 8000).unwrap();
    }
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\", maxConnectionsPerPod: 16, maxConnections: 256, \
         headerReadTimeout: 30s}}\npods:\n{}{}{}{}workloads:\n{}",
        pod_yaml(&victim, "foo", "{app: victim}", "victim"),
        pod_yaml(&victim2, "foo", "{app: victim2}", "victim2"),
        pod_yaml(&attacker, "foo", "{app: attacker}", "attacker"),
        pod_yaml(&other, "foo", "{app: other}", "other"),
        workload_yaml(&w, "foo", "{app: w}", "w"),
    );
    let agent = Agent::start(&cfg).unwrap();
    let targets = format!("{}:8000,{}:8000", victim.ip, victim2.ip);
    let slow = Net::command(&attacker, true, &testsrv(), &["slow", &targets, "40", "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until the attacker holds what it may.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while agent.metric("authz_connections_over_pod_limit_total") < 24.0 {
        assert!(std::time::Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (mut inbound_ok, mut outbound_ok, n) = (0, 0, 40);
    for i in 0..n {
        let v = if i % 2 == 0 { &victim } else { &victim2 };
        let (code, _) = curl(&other, true, &[&format!("http://{}:8000/get", v.ip)])
            .unwrap_or((0, String::new()));
        inbound_ok += usize::from(code == 200);
        let (code, _) =
            curl(v, true, &[&format!("http://{}:8000/get", w.ip)]).unwrap_or((0, String::new()));
        outbound_ok += usize::from(code == 200);
    }
    let out = slow.wait_with_output().unwrap();
    let held = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(held, "held 16", "the attacker keeps exactly its share");
    // 99% of 40 is all of them.
    assert_eq!(inbound_ok, n, "other clients of the destinations");
    assert_eq!(outbound_ok, n, "the destinations' own outbound calls");
}
