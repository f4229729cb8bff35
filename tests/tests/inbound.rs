//! Enforcement at the destination: a protected pod's policies hold for every client, through
//! sk_lookup in the pod's netns and the agent's inbound listener there. Clients: a network
//! namespace that is no pod (standing for the Internet), the host namespace, and an enrolled pod.
use std::time::{Duration, Instant};

use authz_tests::*;

/// The gateway pod of the JWT FAQ, the enrolled `sleep` pod, an outside client and the host.
struct Faq {
    net: Net,
    sleep: Host,
    gw: Host,
    internet: Host,
    agent: Agent,
}

/// The agent on the FAQ's skip-path policies, with `sleep` and the gateway `gw` as pods.
fn start_faq_agent(
    sleep: &Host,
    gw: &Host,
    agent_extra: &str,
    extra_policies: &[(&str, &str)],
) -> Agent {
    let ra = std::fs::read_to_string(data_dir().join("faq/skip-path/requestauthentication.yaml"))
        .unwrap();
    let ap =
        std::fs::read_to_string(data_dir().join("faq/skip-path/authorizationpolicy.yaml")).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"{agent_extra}}}\npods:\n{}{}policies: [policies]\n",
        pod_yaml(sleep, "foo", "{app: sleep}", "sleep"),
        pod_yaml(
            gw,
            "istio-system",
            "{istio: ingressgateway, app: istio-ingressgateway}",
            "istio-ingressgateway"
        ),
    );
    let mut files = vec![
        ("policies/ra.yaml", ra.as_str()),
        ("policies/ap.yaml", ap.as_str()),
    ];
    files.extend_from_slice(extra_policies);
    Agent::start_with_files(&cfg, &files).unwrap()
}

fn faq(agent_extra: &str, extra_policies: &[(&str, &str)]) -> Faq {
    let mut net = Net::new().unwrap();
    net.attach_host().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let gw = net.host("gw", 3).unwrap();
    let internet = net.host("internet", 9).unwrap();
    net.serve(&gw, "http", 80).unwrap();
    let agent = start_faq_agent(&sleep, &gw, agent_extra, extra_policies);
    Faq {
        net,
        sleep,
        gw,
        internet,
        agent,
    }
}

/// Who sends a request.
#[derive(Clone, Copy, Debug)]
enum Client<'a> {
    /// A process in a network namespace that is no pod.
    Outside(&'a Host),
    /// A process of the host (the test's own namespace, on the pods' bridge).
    Node,
    /// A process of an enrolled pod.
    Pod(&'a Host),
}

/// (status, body); status 0 when no connection was made (refused), with curl's message.
fn curl_from(client: Client, args: &[&str]) -> (u16, String) {
    let refused = |e: anyhow::Error| (0, format!("{e:#}"));
    match client {
        Client::Outside(h) => curl(h, false, args).unwrap_or_else(refused),
        Client::Pod(h) => curl(h, true, args).unwrap_or_else(refused),
        Client::Node => curl_node(args),
    }
}

fn get(client: Client, url: &str, token: Option<&str>) -> (u16, String) {
    let h;
    let mut args = vec![url];
    if let Some(t) = token {
        h = format!("Authorization: Bearer {t}");
        args.extend(["-H", h.as_str()]);
    }
    curl_from(client, &args)
}

/// Requests the gateway's server has answered, asked from inside its own netns (loopback is
/// never captured).
fn served(gw: &Host) -> u64 {
    let out = Net::run(
        gw,
        false,
        "curl",
        &["-sS", &format!("http://{}/__count", gw.ip)],
    )
    .unwrap();
    json(&String::from_utf8_lossy(&out.stdout))["count"]
        .as_u64()
        .expect("count")
}

#[test]
fn the_faq_holds_for_clients_outside_every_pod_the_host_and_pods() {
    if !require_root() {
        return;
    }
    let f = faq("", &[]);
    let token = demo_jwt();
    let bad = tampered(&token);
    let base = format!("http://{}", f.gw.ip);
    for client in [
        Client::Outside(&f.internet),
        Client::Node,
        Client::Pod(&f.sleep),
    ] {
        let before = served(&f.gw);
        let mut allowed = 0;
        for (path, tok, want, body_want) in faq_skip_path_cases(&token, &bad) {
            let (code, body) = get(client, &format!("{base}{path}"), tok);
            assert_eq!(
                code,
                want,
                "{client:?} {path} token={}: {body}\n{}",
                tok.is_some(),
                f.agent.log_text()
            );
            if let Some(b) = body_want {
                assert_eq!(body, b, "{client:?} {path}");
            }
            if code == 200 {
                allowed += 1;
                let v = json(&body);
                assert_eq!(
                    v["client"], "127.0.0.6",
                    "the application is reached through the agent's hop: {body}"
                );
                let xff = v["headers"]["x-forwarded-for"].as_str().unwrap_or("");
                let want_ip = match client {
                    Client::Outside(h) | Client::Pod(h) => h.ip.clone(),
                    Client::Node => format!("10.77.{}.254", f.net.subnet),
                };
                assert!(
                    xff.ends_with(&want_ip),
                    "X-Forwarded-For {xff:?}, want {want_ip}"
                );
            }
        }
        assert_eq!(
            served(&f.gw) - before,
            allowed,
            "{client:?}: the application saw only the allowed requests"
        );
    }
    assert!(f.agent.metric("authz_kernel_inbound_captured_total") >= 12.0);
    assert_eq!(
        f.agent.metric("authz_connections_redirected_total"),
        0.0,
        "pod to pod is decided at the destination only: the client side steered nothing"
    );
}

/// One request from an enrolled pod to a protected pod on the same node is decided once. The
/// policy needs the token's principal, which the first decision strips before forwarding: a
/// second decision would deny it.
#[test]
fn a_request_is_decided_exactly_once() {
    if !require_root() {
        return;
    }
    let need_principal = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: need-principal, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: ALLOW
  rules:
  - from: [{source: {requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]}}]
"#;
    let f = faq("", &[("policies/need.yaml", need_principal)]);
    let token = demo_jwt();
    let url = format!("http://{}/headers", f.gw.ip);
    let before = f.agent.requests_total();
    let (code, body) = get(Client::Pod(&f.sleep), &url, Some(&token));
    assert_eq!(code, 200, "{body}");
    assert!(
        json(&body)["headers"].get("authorization").is_none(),
        "the token was stripped by the one decision: {body}"
    );
    assert_eq!(
        f.agent.requests_total() - before,
        1.0,
        "decided exactly once"
    );
    let (code, _) = get(Client::Pod(&f.sleep), &url, None);
    assert_eq!(code, 403);
    assert_eq!(f.agent.requests_total() - before, 2.0);
}

/// At the destination, `principals` and `ipBlocks` come from the peer address: the pod that
/// has it, or nothing for a peer that is no pod.
#[test]
fn source_identity_comes_from_the_peer_address() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    net.attach_host().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let other = net.host("other", 4).unwrap();
    let api = net.host("api", 3).unwrap();
    let internet = net.host("internet", 9).unwrap();
    net.serve(&api, "http", 8000).unwrap();
    let policy = format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: who, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/foo/sa/sleep"]}}}}]
  - from: [{{source: {{ipBlocks: ["{}/32"]}}}}]
    to: [{{operation: {{paths: ["/open"]}}}}]
"#,
        internet.ip
    );
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}{}{}policies: [policies]\n",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        pod_yaml(&other, "foo", "{app: other}", "other"),
        pod_yaml(&api, "foo", "{app: api}", "api"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/who.yaml", &policy)]).unwrap();
    let u = |p: &str| format!("http://{}:8000{p}", api.ip);
    for (client, path, want) in [
        (Client::Pod(&sleep), "/x", 200),
        (Client::Pod(&other), "/x", 403),
        (Client::Outside(&internet), "/x", 403),
        (Client::Outside(&internet), "/open", 200),
        (Client::Node, "/open", 403),
        (Client::Pod(&other), "/open", 403),
    ] {
        let (code, body) = get(client, &u(path), None);
        assert_eq!(
            code,
            want,
            "{client:?} {path}: {body}\n{}",
            agent.log_text()
        );
    }
    // The other pod's identity is its own even from a process outside its cgroup: at the
    // destination, identity is the address.
    let (code, _) = get(Client::Outside(&sleep), &u("/x"), None);
    assert_eq!(code, 200);
}

/// Non-HTTP inbound gets the L4 parts: a TCP echo allowed from one pod and closed for another.
#[test]
fn tcp_inbound_is_decided_at_l4() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let other = net.host("other", 4).unwrap();
    let db = net.host("db", 3).unwrap();
    net.serve(&db, "echo", 5432).unwrap();
    let policy = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: foo}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
    to: [{operation: {ports: ["5432"]}}]
"#;
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}{}{}policies: [policies]\n",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        pod_yaml(&other, "foo", "{app: other}", "other"),
        pod_yaml(&db, "foo", "{app: db}", "db"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/db.yaml", policy)]).unwrap();
    let once = |from: &Host| {
        use std::io::Write;
        let mut c = Net::command(from, true, "nc", &["-q", "1", "-w", "3", &db.ip, "5432"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.as_mut().unwrap().write_all(b"hello\n").unwrap();
        drop(c.stdin.take());
        String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).to_string()
    };
    assert_eq!(once(&sleep), "hello\n", "{}", agent.log_text());
    assert_eq!(once(&other), "", "closed without an answer");
    assert!(agent.log_text().contains("tcp connection denied"));
}

/// With the agent killed, inbound connections get the fail mode: refused (the application never
/// sees them) or let through to the application directly. `cleanup` then detaches everything.
#[test]
fn inbound_fail_modes_and_cleanup() {
    if !require_root() {
        return;
    }
    for mode in ["closed", "open"] {
        let mut f = faq(&format!(", failMode: {mode}"), &[]);
        let url = format!("http://{}/api/v1/products/0", f.gw.ip);
        let outside = Client::Outside(&f.internet);
        assert_eq!(get(outside, &url, None).0, 403);
        f.agent.child.kill().unwrap();
        f.agent.child.wait().unwrap();
        let killed = Instant::now();
        let before = served(&f.gw);
        let want = if mode == "closed" { 0 } else { 200 };
        let pace = Pace::measure(&f.internet);
        loop {
            let (code, _) = get(outside, &url, None);
            if code == want {
                break;
            }
            assert!(
                killed.elapsed() < pace.after(Duration::from_secs(5)),
                "{mode}: still {code} after {:?}",
                killed.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if mode == "closed" {
            assert_eq!(
                served(&f.gw),
                before,
                "fail closed: the application saw nothing"
            );
        } else {
            assert_eq!(
                served(&f.gw),
                before + 1,
                "fail open: straight to the application"
            );
        }
        f.agent.cleanup().unwrap();
        // Fail closed would still refuse if a capture program were left attached.
        assert_eq!(
            get(outside, &url, None).0,
            200,
            "after cleanup nothing captures the pod"
        );
    }
}

/// Every address of a protected pod is captured: its IPv6 address, and an IPv6 link-local
/// address the config does not name, get the same policies (the IPv6 side of the capture, the
/// inbound listener on [::1] and the hop from the pod's own address). The pod answers from them:
/// the node's source check lets a pod send from its `ips` and the link-local addresses it had
/// when it was enrolled.
#[test]
fn ipv6_and_link_local_addresses_are_captured_too() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let gw = net.host("gw", 3).unwrap();
    let internet = net.host("internet", 9).unwrap();
    for (h, last) in [(&gw, 3), (&internet, 9)] {
        let global = format!("fd77:{}::{last}/64", net.subnet);
        let link = format!("fe80::77:{last}/64");
        for a in [global, link] {
            let out = Net::run(
                h,
                false,
                "ip",
                &["-6", "addr", "add", &a, "dev", "eth0", "nodad"],
            )
            .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // One dual-stack server on every address of the pod.
    net.spawn(&gw, &testsrv(), &["http", "[::]:80"]).unwrap();
    wait_listening(&gw, 80).unwrap();
    let mut gw_listed = gw.clone();
    gw_listed.ip = format!("{}, fd77:{}::3", gw.ip, net.subnet);
    let agent = start_faq_agent(&sleep, &gw_listed, "", &[]);
    let outside = Client::Outside(&internet);
    for base in [
        format!("http://[fd77:{}::3]", net.subnet),
        "http://[fe80::77:3%25eth0]".to_string(),
    ] {
        let (code, body) = get(outside, &format!("{base}/api/v1/products/0"), None);
        assert_eq!(
            (code, body.as_str()),
            (403, "RBAC: access denied"),
            "{base}\n{}",
            agent.log_text()
        );
        let (code, body) = get(outside, &format!("{base}/productpage"), None);
        assert_eq!(code, 200, "{base}: {body}");
        let v = json(&body);
        let own: std::net::Ipv6Addr = base
            .trim_start_matches("http://[")
            .split(['%', ']'])
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            v["client"].as_str().and_then(|c| c.parse().ok()),
            Some(own),
            "through the agent's IPv6 hop, from the pod's own address: {body}"
        );
        assert!(
            v["headers"]["x-forwarded-for"]
                .as_str()
                .is_some_and(|x| x.ends_with(":9")),
            "the client's IPv6 address: {body}"
        );
    }
}
