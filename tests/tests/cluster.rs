//! Kubernetes mode as a cluster runs it: several agents on this kernel, each a node (its own
//! `nodeName`, cgroup subtree, pin directory and admin port), against one API server, with pods
//! on each node and traffic between them, through the kernel path. Labels that change, addresses
//! that move to another pod, nodes whose agent goes away.
use std::time::{Duration, Instant};

use authz_tests::{
    fakeapi::{self, FakeApi},
    *,
};
use serde_json::{json, Value};

fn eventually(what: &str, agents: &[&Agent], mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if Instant::now() > deadline {
            let logs: Vec<String> = agents.iter().map(|a| a.log_text()).collect();
            panic!(
                "timed out waiting for: {what}\n{}",
                logs.join("\n---- next agent ----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One node's agent config: its own cgroup subtree (where its pods are), Kubernetes mode.
fn node_config(net: &Net, node: &str, extra: &str) -> String {
    std::fs::create_dir_all(net.node_root(node)).unwrap();
    format!(
        "agent: {{admin: \"{{ADMIN}}\", cgroupRoot: {}{extra}}}\nkubernetes: {{enabled: true, nodeName: {node}, kubeconfig: kubeconfig}}\n",
        net.node_root(node).display()
    )
}

/// Starts `node`'s agent (own pins and admin port) and says so on the API server, as its
/// DaemonSet pod would once ready.
fn start_node(net: &Net, api: &FakeApi, node: &str) -> Agent {
    start_node_with(net, api, node, "")
}

/// As `start_node`, with more `agent:` settings.
fn start_node_with(net: &Net, api: &FakeApi, node: &str, extra: &str) -> Agent {
    api.apply(fakeapi::agent_pod(node, true));
    let kubeconfig = api.kubeconfig();
    Agent::start_with_files(
        &node_config(net, node, extra),
        &[("kubeconfig", kubeconfig.as_str())],
    )
    .unwrap()
}

fn web_pod(name: &str, uid: &str, node: &str, h: &Host, labels: Value) -> Value {
    fakeapi::pod("foo", name, uid, node, &h.ip, labels, name)
}

fn deny_path(selector: Value, path: &str) -> Value {
    json!({"selector": {"matchLabels": selector}, "action": "DENY",
           "rules": [{"to": [{"operation": {"paths": [path]}}]}]})
}

/// The status `from` (in its pod) gets from `to`; 0 when there is no answer.
fn get(from: &Host, to: &str) -> u16 {
    curl(from, true, &[to]).map_or(0, |(code, _)| code)
}

/// A DENY selecting `quarantine: "true"` starts applying when the pod gains the label and stops
/// when it loses it, with the pod's listeners and enrollment kept; leaving the mesh (its
/// namespace unlabelled) and coming back work the same way.
#[test]
fn a_relabelled_pod_is_decided_with_its_labels_of_now_both_ways() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let (web_uid, sleep_uid) = (
        "5c0ffee0-0000-4000-8000-0000000e0001",
        "5c0ffee0-0000-4000-8000-0000000e0002",
    );
    let web = net.kube_pod_on("node-a", "web", 3, web_uid).unwrap();
    let sleep = net.kube_pod_on("node-a", "sleep", 2, sleep_uid).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    api.apply(web_pod(
        "web",
        web_uid,
        "node-a",
        &web,
        json!({"app": "web"}),
    ));
    api.apply(web_pod(
        "sleep",
        sleep_uid,
        "node-a",
        &sleep,
        json!({"app": "sleep"}),
    ));
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "quarantine",
        json!({"selector": {"matchLabels": {"quarantine": "true"}}, "action": "DENY", "rules": [{}]}),
    ));
    let a = start_node(&net, &api, "node-a");
    eventually("both pods enrolled", &[&a], || {
        a.metric("authz_pods_enrolled") == 2.0
    });
    let url = format!("http://{}:8000/headers", web.ip);
    assert_eq!(get(&sleep, &url), 200);

    for (labels, want) in [
        (json!({"app": "web", "quarantine": "true"}), 403),
        (json!({"app": "web"}), 200),
        (json!({"app": "web", "quarantine": "true"}), 403),
    ] {
        let enrolled = a.log_text().matches("pod enrolled").count();
        api.apply(web_pod("web", web_uid, "node-a", &web, labels.clone()));
        let t = Instant::now();
        eventually(&format!("{labels} gives {want}"), &[&a], || {
            get(&sleep, &url) == want
        });
        eprintln!("labels {labels}: {want} after {:?}", t.elapsed());
        // From outside every pod too: decided at the pod.
        assert_eq!(curl(&sleep, false, &[&url]).unwrap().0, want);
        assert_eq!(
            a.log_text().matches("pod enrolled").count(),
            enrolled,
            "a label change keeps the pod's enrollment and listeners"
        );
    }

    // The namespace leaves the mesh: the pod is no longer protected (its policies no longer
    // apply); back in, they do again.
    api.apply(fakeapi::namespace("foo", false));
    eventually("out of the mesh", &[&a], || get(&sleep, &url) == 200);
    api.apply(fakeapi::namespace("foo", true));
    eventually("back in the mesh", &[&a], || get(&sleep, &url) == 403);
}

/// A mesh pod deleted with a grace period releases its address, which goes at once to a pod
/// outside the mesh: from then on, the address has the new pod's identity (none), not the
/// terminating pod's principal.
#[test]
fn an_address_belongs_to_the_pod_that_holds_it_now() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let (web_uid, trusted_uid) = (
        "5c0ffee0-0000-4000-8000-0000000f0001",
        "5c0ffee0-0000-4000-8000-0000000f0002",
    );
    let web = net.kube_pod_on("node-a", "web", 3, web_uid).unwrap();
    let trusted = net
        .kube_pod_on("node-a", "trusted", 2, trusted_uid)
        .unwrap();
    net.serve(&web, "http", 8000).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    api.apply(fakeapi::namespace("bar", false));
    api.apply(web_pod(
        "web",
        web_uid,
        "node-a",
        &web,
        json!({"app": "web"}),
    ));
    let trusted_pod = web_pod(
        "trusted",
        trusted_uid,
        "node-a",
        &trusted,
        json!({"app": "trusted"}),
    );
    api.apply(trusted_pod.clone());
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "only-trusted",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/foo/sa/trusted"]}}]}]}),
    ));
    // The address's successive owners send from one interface here (the terminating pod's, on
    // node A), where on a cluster each would have its own, on its own node. Node A's source
    // check rightly drops what the terminating pod sends once the address is another pod's, so
    // it is off for this test, which is about whose identity an address carries.
    let a = start_node_with(&net, &api, "node-a", ", sourceCheck: off");
    eventually("enrolled", &[&a], || a.metric("authz_pods_enrolled") == 2.0);
    let url = format!("http://{}:8000/headers", web.ip);
    let from_the_address = || curl(&trusted, false, &[&url]).unwrap().0;
    eventually("the trusted pod is allowed", &[&a], || {
        from_the_address() == 200
    });

    // Terminating; its address reported at once by a new pod in another namespace, outside the
    // mesh, on another node.
    let mut going = trusted_pod.clone();
    going["metadata"]["deletionTimestamp"] = json!("2026-12-05T00:00:00Z");
    api.apply(going);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        from_the_address(),
        200,
        "still its address while no other pod reports it"
    );
    api.apply(fakeapi::pod(
        "bar",
        "newcomer",
        "5c0ffee0-0000-4000-8000-0000000f0003",
        "node-b",
        &trusted.ip,
        json!({}),
        "default",
    ));
    eventually("the newcomer has no principal", &[&a], || {
        from_the_address() == 403
    });
    api.delete("Pod", "foo", "trusted");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(from_the_address(), 403);
    // The address goes to a mesh pod with the principal: it is that pod's now.
    api.delete("Pod", "bar", "newcomer");
    api.apply(fakeapi::pod(
        "foo",
        "trusted-2",
        "5c0ffee0-0000-4000-8000-0000000f0004",
        "node-b",
        &trusted.ip,
        json!({"app": "trusted"}),
        "trusted",
    ));
    eventually("the new owner's principal", &[&a], || {
        from_the_address() == 200
    });
}

/// Two nodes, each with its agent, one API server: a client on B calling a mesh pod on A is
/// decided once, at A; a Service with a backend on each node is decided once per request, at
/// the backend's node, and spread over both; a rolling update of A's agent while traffic
/// crosses from B fails no request.
#[test]
fn a_request_crossing_nodes_is_decided_once_where_it_arrives() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let uids = [
        "5c0ffee0-0000-4000-8000-000000100001",
        "5c0ffee0-0000-4000-8000-000000100002",
        "5c0ffee0-0000-4000-8000-000000100003",
    ];
    let a_web = net.kube_pod_on("node-a", "aweb", 3, uids[0]).unwrap();
    let b_web = net.kube_pod_on("node-b", "bweb", 4, uids[1]).unwrap();
    let client = net.kube_pod_on("node-b", "client", 2, uids[2]).unwrap();
    net.serve(&a_web, "http", 8000).unwrap();
    net.serve(&b_web, "http", 8000).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    let both = json!({"app": "web", "svc": "both"});
    api.apply(web_pod("aweb", uids[0], "node-a", &a_web, both.clone()));
    api.apply(web_pod("bweb", uids[1], "node-b", &b_web, both));
    api.apply(web_pod(
        "client",
        uids[2],
        "node-b",
        &client,
        json!({"app": "client"}),
    ));
    let vip = format!("10.77.{}.100", net.subnet);
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "foo"},
        "spec": {"clusterIP": vip, "selector": {"svc": "both"}, "ports": [{"port": 80, "targetPort": 8000}]}}));
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "deny-path",
        deny_path(json!({"app": "web"}), "/deny"),
    ));
    let a = start_node(&net, &api, "node-a");
    let b = start_node(&net, &api, "node-b");
    eventually("each node enrolled its own pods", &[&a, &b], || {
        a.metric("authz_pods_enrolled") == 1.0 && b.metric("authz_pods_enrolled") == 2.0
    });

    // B's client -> A's pod: B does not touch it, A decides it.
    let at_a = |p: &str| format!("http://{}:8000{p}", a_web.ip);
    eventually("A decides", &[&a, &b], || {
        get(&client, &at_a("/deny")) == 403
    });
    let (ra, rb) = (a.requests_total(), b.requests_total());
    assert_eq!(get(&client, &at_a("/headers")), 200);
    assert_eq!(get(&client, &at_a("/deny")), 403);
    assert_eq!(a.requests_total() - ra, 2.0, "both decided at A");
    assert_eq!(b.requests_total() - rb, 0.0, "none at B");
    let (code, body) = curl(&client, true, &[&at_a("/headers")]).unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        json(&body)["headers"]["x-forwarded-for"],
        client.ip.as_str(),
        "A saw the client's own address"
    );

    // The Service: B picks a backend in turn, each request is decided where it arrives.
    let (ra, rb) = (a.requests_total(), b.requests_total());
    let (ia, ib) = (
        a.metric("authz_connections_inbound_total"),
        b.metric("authz_connections_inbound_total"),
    );
    for _ in 0..10 {
        assert_eq!(get(&client, &format!("http://{vip}/headers")), 200);
    }
    assert_eq!(get(&client, &format!("http://{vip}/deny")), 403);
    assert_eq!(
        (a.requests_total() - ra) + (b.requests_total() - rb),
        11.0,
        "each request decided exactly once"
    );
    let (na, nb) = (
        a.metric("authz_connections_inbound_total") - ia,
        b.metric("authz_connections_inbound_total") - ib,
    );
    assert!(
        (5.0..=6.0).contains(&na) && (5.0..=6.0).contains(&nb),
        "backends taken in turn: {na} at A, {nb} at B"
    );

    // A rolling update of A's agent (the surge pod beside the old one, on the same pins and
    // admin port) while B's client keeps calling A's pod: no failed request.
    let mut old = a;
    old.cleanup_on_drop = false;
    let kubeconfig = api.kubeconfig();
    let files = [("kubeconfig", kubeconfig.as_str())];
    let cfg = node_config(&net, "node-a", ", drainTimeout: 2s");
    let load = Load::start(&client, &at_a("/headers"));
    std::thread::sleep(Duration::from_millis(300));
    let new = Agent::spawn_at(&cfg, &files, &old.bpffs, old.admin).unwrap();
    eventually("the new agent of A ready", &[&new], || {
        new.log_text().contains("agent ready")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(old.stop().unwrap().success(), "{}", old.log_text());
    std::thread::sleep(Duration::from_millis(300));
    let (n, bad) = load.stop_not_ok();
    assert!(n >= 5, "requests during the handover: {n}");
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed: {bad:?}\nold:\n{}\nnew:\n{}",
        bad.len(),
        old.log_text(),
        new.log_text()
    );
    assert_eq!(get(&client, &at_a("/deny")), 403, "A's new agent decides");
}

/// A third node runs no agent: its mesh pods are decided at their clients' side, with their
/// labels of now. When A's agent goes away, A's pods fail as `failMode` says (closed: refused),
/// B's pods keep working, and B decides for A's pods at the client once A's agent is not ready.
#[test]
fn a_node_without_an_agent_is_never_a_hole() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let uids = [
        "5c0ffee0-0000-4000-8000-000000110001",
        "5c0ffee0-0000-4000-8000-000000110002",
        "5c0ffee0-0000-4000-8000-000000110003",
        "5c0ffee0-0000-4000-8000-000000110004",
    ];
    let a_web = net.kube_pod_on("node-a", "aweb", 3, uids[0]).unwrap();
    let b_web = net.kube_pod_on("node-b", "bweb", 4, uids[1]).unwrap();
    let c_web = net.kube_pod_on("node-c", "cweb", 5, uids[2]).unwrap();
    let client = net.kube_pod_on("node-b", "client", 2, uids[3]).unwrap();
    for h in [&a_web, &b_web, &c_web] {
        net.serve(h, "http", 8000).unwrap();
    }
    api.apply(fakeapi::namespace("foo", true));
    let web = json!({"app": "web"});
    api.apply(web_pod("aweb", uids[0], "node-a", &a_web, web.clone()));
    api.apply(web_pod("bweb", uids[1], "node-b", &b_web, web.clone()));
    api.apply(web_pod("cweb", uids[2], "node-c", &c_web, web.clone()));
    api.apply(web_pod(
        "client",
        uids[3],
        "node-b",
        &client,
        json!({"app": "client"}),
    ));
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "deny-path",
        deny_path(json!({"app": "web"}), "/deny"),
    ));
    let a = start_node(&net, &api, "node-a");
    let b = start_node(&net, &api, "node-b");
    eventually("enrolled", &[&a, &b], || {
        a.metric("authz_pods_enrolled") == 1.0 && b.metric("authz_pods_enrolled") == 2.0
    });
    let url = |h: &Host, p: &str| format!("http://{}:8000{p}", h.ip);

    // C's pod: decided by B, at the client.
    let rb = b.requests_total();
    assert_eq!(get(&client, &url(&c_web, "/deny")), 403);
    assert_eq!(get(&client, &url(&c_web, "/headers")), 200);
    assert_eq!(
        b.requests_total() - rb,
        2.0,
        "decided at B, the client's node"
    );
    // Its labels of now, there too.
    api.apply(web_pod(
        "cweb",
        uids[2],
        "node-c",
        &c_web,
        json!({"app": "other"}),
    ));
    eventually("C's pod relabelled", &[&b], || {
        get(&client, &url(&c_web, "/deny")) == 200
    });
    api.apply(web_pod("cweb", uids[2], "node-c", &c_web, web.clone()));
    eventually("and back", &[&b], || {
        get(&client, &url(&c_web, "/deny")) == 403
    });

    // A's agent is killed. A's pods: refused (failMode closed), never served unchecked.
    let mut a = a;
    let bpffs_a = a.bpffs.clone();
    let _ = a.child.kill();
    let _ = a.child.wait();
    eventually("A's pods refused", &[&b], || {
        attempt(&client, &url(&a_web, "/headers")).0 == Attempt::Refused
    });
    assert_eq!(get(&client, &url(&b_web, "/headers")), 200, "B's pods work");
    // kubelet marks A's agent not ready: B decides for A's pods at the client from then on
    // (a denied path never leaves B; an allowed one still meets A's fail mode).
    api.apply(fakeapi::agent_pod("node-a", false));
    let rb = b.requests_total();
    eventually("B decides for A's pods", &[&b], || {
        get(&client, &url(&a_web, "/deny")) == 403
    });
    assert!(b.requests_total() > rb);
    assert_ne!(get(&client, &url(&a_web, "/headers")), 200);
    // The pins go with A's agent's cleanup (what removing the agent from a node does).
    let out = std::process::Command::new(agent_bin())
        .args(["cleanup", "--bpffs"])
        .arg(&bpffs_a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        get(&client, &url(&a_web, "/deny")),
        403,
        "still decided, at B, with A's agent gone"
    );
    assert_eq!(get(&client, &url(&a_web, "/headers")), 200);
}

/// A pod deleted on A and recreated on B with the same address: its identity (as a client) and
/// its policies (as a destination) follow it to B.
#[test]
fn a_pod_recreated_on_another_node_takes_its_identity_and_policies_along() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let uids = [
        "5c0ffee0-0000-4000-8000-000000120001",
        "5c0ffee0-0000-4000-8000-000000120002",
        "5c0ffee0-0000-4000-8000-000000120003",
    ];
    let web = net.kube_pod_on("node-a", "web", 3, uids[0]).unwrap();
    let mover = net.kube_pod_on("node-a", "mover", 4, uids[1]).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    net.serve(&mover, "http", 8000).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    api.apply(web_pod(
        "web",
        uids[0],
        "node-a",
        &web,
        json!({"app": "web"}),
    ));
    api.apply(fakeapi::pod(
        "foo",
        "mover",
        uids[1],
        "node-a",
        &mover.ip,
        json!({"app": "mover"}),
        "mover-a",
    ));
    // web refuses the principal the mover has on A; the mover denies /deny wherever it runs.
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "not-mover-a",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/foo/sa/mover-a"]}}]}]}),
    ));
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "deny-path",
        deny_path(json!({"app": "mover"}), "/deny"),
    ));
    let a = start_node(&net, &api, "node-a");
    let b = start_node(&net, &api, "node-b");
    eventually("enrolled on A", &[&a], || {
        a.metric("authz_pods_enrolled") == 2.0
    });
    let to_web = format!("http://{}:8000/headers", web.ip);
    let to_mover = format!("http://{}:8000/deny", mover.ip);
    assert_eq!(get(&mover, &to_web), 403, "mover-a is refused at web");
    let ra = a.requests_total();
    assert_eq!(get(&web, &to_mover), 403, "decided at A");
    assert_eq!(a.requests_total() - ra, 1.0);

    // Deleted on A, recreated on B with the same address and another service account.
    api.delete("Pod", "foo", "mover");
    let moved = net.kube_pod_again(&mover, "node-b", uids[2]).unwrap();
    api.apply(fakeapi::pod(
        "foo",
        "mover",
        uids[2],
        "node-b",
        &mover.ip,
        json!({"app": "mover"}),
        "mover-b",
    ));
    eventually("moved: released on A, enrolled on B", &[&a, &b], || {
        a.metric("authz_pods_enrolled") == 1.0 && b.metric("authz_pods_enrolled") == 1.0
    });
    eventually("its new identity at web", &[&a, &b], || {
        get(&moved, &to_web) == 200
    });
    let (ra, rb) = (a.requests_total(), b.requests_total());
    assert_eq!(get(&web, &to_mover), 403, "its policies, now at B");
    assert_eq!(
        (a.requests_total() - ra, b.requests_total() - rb),
        (0.0, 1.0),
        "decided at B only"
    );
}
