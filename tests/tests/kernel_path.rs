//! The transparent kernel path, for real: pods are netns + cgroups, the agent is the real
//! binary, traffic goes through connect4, sock_ops and sk_msg.
use std::{io::Write, process::Stdio, time::Duration};

use authz_tests::*;

struct Setup {
    net: Net,
    client: Host,
    server: Host,
    agent: Agent,
}

/// client (enrolled pod) -> server (enforced workload) on :8000 (HTTP) and :9000 (echo).
fn setup() -> Setup {
    let mut net = Net::new().unwrap();
    let client = net.host("sleep", 2).unwrap();
    let server = net.host("httpbin", 3).unwrap();
    net.serve(&server, "http", 8000).unwrap();
    net.serve(&server, "echo", 9000).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}",
        pod_yaml(&client, "foo", "{app: sleep}", "sleep"),
        workload_yaml(&server, "foo", "{app: httpbin}", "httpbin"),
    );
    let agent = Agent::start(&cfg).unwrap();
    Setup {
        net,
        client,
        server,
        agent,
    }
}

#[test]
fn enrolled_pod_goes_through_agent_with_its_own_source_ip() {
    if !require_root() {
        return;
    }
    let s = setup();
    let migrate = |h: &Host| {
        let out = Net::run(h, false, "cat", &["/proc/sys/net/ipv4/tcp_migrate_req"]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        migrate(&s.client),
        "1",
        "set in the enrolled pod's netns (hot restart)"
    );
    assert_eq!(migrate(&s.server), "0", "and only there");
    let before = s.agent.metrics();
    let url = format!("http://{}:8000/headers", s.server.ip);
    let (code, body) = curl(&s.client, true, &[&url]).unwrap();
    assert_eq!(code, 200, "{body}\n{}", s.agent.log_text());
    assert_eq!(
        json(&body)["client"],
        s.client.ip.as_str(),
        "destination must see the pod's own IP"
    );
    let after = s.agent.metrics();
    let d = |k: &str| after.get(k).unwrap_or(&0.0) - before.get(k).unwrap_or(&0.0);
    assert_eq!(d("authz_connections_redirected_total"), 1.0);
    assert_eq!(d("authz_kernel_connect_redirected_total"), 1.0);
    assert_eq!(
        d("authz_kernel_sockets_mapped_total"),
        2.0,
        "app and agent ends both mapped"
    );
    assert!(
        d("authz_kernel_skmsg_redirected_total") >= 2.0,
        "request and response carried by sk_msg"
    );
}

#[test]
fn large_streamed_body_arrives_intact_and_sk_msg_carries_it() {
    if !require_root() {
        return;
    }
    let s = setup();
    let path = s.agent.dir.join("body.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..64 {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let expect = sh("sha256sum", &[path.to_str().unwrap()]).unwrap();
    let expect = String::from_utf8_lossy(&expect.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let before = s.agent.metric("authz_kernel_skmsg_redirected_bytes_total");
    let url = format!("http://{}:8000/upload", s.server.ip);
    let data = format!("@{}", path.display());
    // Chunked upload of 64 MiB, then a second request on the same (kept-alive) connection.
    let (code, body) = curl(
        &s.client,
        true,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &data,
            &url,
            "--next",
            "-w",
            "\n%{http_code}",
            &format!("http://{}:8000/second", s.server.ip),
        ],
    )
    .unwrap();
    assert_eq!(code, 200);
    let first = body.lines().next().unwrap();
    let v = json(first);
    assert_eq!(v["body_len"], 64 * 1024 * 1024);
    assert_eq!(v["body_sha256"], expect.as_str());
    assert!(
        body.contains("\"path\":\"/second\""),
        "keep-alive second request answered: {body}"
    );
    assert_eq!(
        s.agent.metric("authz_connections_redirected_total"),
        1.0,
        "both requests on one connection"
    );
    let moved = s.agent.metric("authz_kernel_skmsg_redirected_bytes_total") - before;
    assert!(
        moved >= 64.0 * 1024.0 * 1024.0,
        "sk_msg carried the body between app and agent: {moved}"
    );
}

#[test]
fn non_http_is_relayed_at_l4() {
    if !require_root() {
        return;
    }
    let s = setup();
    let mut child = Net::command(&s.client, true, "nc", &["-q", "1", &s.server.ip, "9000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"\x00\x01binary hello\n")
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"\x00\x01binary hello\n");
    assert_eq!(s.agent.metric("authz_connections_tcp_total"), 1.0);
}

#[test]
fn process_outside_pod_cgroup_is_not_redirected() {
    if !require_root() {
        return;
    }
    let s = setup();
    let url = format!("http://{}:8000/headers", s.server.ip);
    let (code, _) = curl(&s.client, false, &[&url]).unwrap();
    assert_eq!(code, 200);
    assert_eq!(s.agent.metric("authz_kernel_connect_redirected_total"), 0.0);
    assert_eq!(s.agent.metric("authz_connections_redirected_total"), 0.0);
}

#[test]
fn non_workload_address_is_not_redirected() {
    if !require_root() {
        return;
    }
    let mut s = setup();
    let other = s.net.host("other", 9).unwrap();
    s.net.serve(&other, "http", 8000).unwrap();
    let (code, body) = curl(&s.client, true, &[&format!("http://{}:8000/", other.ip)]).unwrap();
    assert_eq!(code, 200);
    assert_eq!(json(&body)["client"], s.client.ip.as_str());
    assert_eq!(s.agent.metric("authz_kernel_connect_redirected_total"), 0.0);
}

#[test]
fn two_pods_with_the_same_ports_do_not_mix() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let a = net.host("pa", 2).unwrap();
    let b = net.host("pb", 4).unwrap();
    let server = net.host("srv", 3).unwrap();
    net.serve(&server, "http", 8000).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}{}workloads:\n{}",
        pod_yaml(&a, "foo", "{app: a}", "a"),
        pod_yaml(&b, "foo", "{app: b}", "b"),
        workload_yaml(&server, "foo", "{app: srv}", "srv"),
    );
    let agent = Agent::start(&cfg).unwrap();
    let url = format!("http://{}:8000/who", server.ip);
    // Same local port in both pods, at the same time, several rounds.
    for round in 0..5 {
        let port = (41000 + round).to_string();
        let spawn = |h: &Host| {
            Net::command(
                h,
                true,
                "curl",
                &["-sS", "-m", "10", "--local-port", &port, &url],
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
        };
        let (ca, cb) = (spawn(&a), spawn(&b));
        let (oa, ob) = (
            ca.wait_with_output().unwrap(),
            cb.wait_with_output().unwrap(),
        );
        let (ja, jb) = (
            json(&String::from_utf8_lossy(&oa.stdout)),
            json(&String::from_utf8_lossy(&ob.stdout)),
        );
        assert_eq!(ja["client"], a.ip.as_str());
        assert_eq!(jb["client"], b.ip.as_str());
    }
    assert_eq!(agent.metric("authz_connections_redirected_total"), 10.0);
    assert_eq!(agent.metric("authz_connections_unknown_origin_total"), 0.0);
}

#[test]
fn dialing_the_agent_port_directly_forwards_nothing() {
    if !require_root() {
        return;
    }
    let s = setup();
    let ports = loopback_listeners(&s.client);
    assert_eq!(
        ports.len(),
        2,
        "the agent's outbound and inbound listeners in the pod: {ports:?}"
    );
    for port in &ports {
        let url = format!("http://127.0.0.1:{port}/");
        let out = Net::run(&s.client, true, "curl", &["-sS", "-m", "5", &url]).unwrap();
        assert!(
            !out.status.success(),
            "a connection the kernel did not hand over is closed (port {port})"
        );
    }
    assert_eq!(
        s.agent.metric("authz_connections_unknown_origin_total"),
        2.0
    );
}

#[test]
fn a_stopped_agent_fails_closed_until_cleanup() {
    if !require_root() {
        return;
    }
    let mut s = setup();
    let st = s.agent.stop().unwrap();
    assert!(st.success(), "clean exit: {}", s.agent.log_text());
    let url = format!("http://{}:8000/headers", s.server.ip);
    let pace = Pace::measure(&s.client);
    let (a, took) = attempt(&s.client, &url);
    assert_eq!(a, Attempt::Refused, "fail closed after the agent stopped");
    assert!(
        took < pace.after(Duration::from_secs(1)),
        "refused at once, not hung: {took:?} ({pace:?})"
    );
    assert!(
        loopback_listeners(&s.client).is_empty(),
        "listener removed from the pod netns"
    );

    s.agent.cleanup().unwrap();
    assert!(!s.agent.bpffs.exists(), "pin directory removed");
    let (code, body) = curl(&s.client, true, &[&url]).unwrap();
    assert_eq!(code, 200, "pod reaches the server directly after cleanup");
    assert_eq!(json(&body)["client"], s.client.ip.as_str());
}
