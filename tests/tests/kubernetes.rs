//! Kubernetes mode end to end: the agent binary reads pods, namespaces and policies from an API
//! server (the in-process fake, over HTTP), finds a pod laid out as kubelet lays it out (cgroup
//! under kubepods.slice, a process in the pod's netns), enrolls it, and enforces the
//! AuthorizationPolicy objects created and deleted through the API server, through the kernel path.
use std::time::{Duration, Instant};

use authz_tests::{
    fakeapi::{self, FakeApi},
    *,
};
use serde_json::json;

const NODE: &str = "node-a";
const SLEEP_UID: &str = "5c0ffee0-0000-4000-8000-00000000a001";
const OUTSIDER_UID: &str = "5c0ffee0-0000-4000-8000-00000000a003";
const HTTPBIN_UID: &str = "5c0ffee0-0000-4000-8000-00000000a002";

fn eventually(what: &str, agent: &Agent, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's config in Kubernetes mode on NODE, with the pods under `net`'s cgroup and the
/// kubeconfig beside it (the `files` of the agent); `admin` is "{ADMIN}" or "{ADMIN_ANY}".
fn kube_config(net: &Net, admin: &str, agent_extra: &str) -> String {
    format!(
        "agent: {{admin: \"{admin}\", cgroupRoot: {}{agent_extra}}}\nkubernetes: {{enabled: true, nodeName: {NODE}, kubeconfig: kubeconfig}}\n",
        net.cgroup_base().display()
    )
}

fn deny_get() -> serde_json::Value {
    json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "DENY",
           "rules": [{"to": [{"operation": {"paths": ["/get"]}}]}]})
}

#[test]
fn policies_from_the_api_server_are_enforced_on_discovered_pods() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let sleep = net.kube_pod("sleep", 2, SLEEP_UID).unwrap();
    // A mesh pod of this node: the agent captures its inbound connections and decides them there.
    let httpbin = net.kube_pod("httpbin", 3, HTTPBIN_UID).unwrap();
    net.serve(&httpbin, "http", 8000).unwrap();

    api.apply(fakeapi::namespace("foo", true));
    api.apply(fakeapi::pod(
        "foo",
        "httpbin",
        HTTPBIN_UID,
        NODE,
        &httpbin.ip,
        json!({"app": "httpbin"}),
        "httpbin",
    ));
    let vip = format!("10.77.{}.100", net.subnet);
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "foo"},
        "spec": {"clusterIP": vip, "selector": {"app": "httpbin"}, "ports": [{"port": 80, "targetPort": 8000}]}}));

    let cfg = kube_config(&net, "{ADMIN}", "");
    let kubeconfig = api.kubeconfig();
    let files = [("kubeconfig", kubeconfig.as_str())];
    let agent = Agent::start_with_files(&cfg, &files).unwrap();
    eventually("httpbin protected", &agent, || {
        agent.metric("authz_pods_enrolled") == 1.0
    });

    // The pod appears on the API server: the agent finds its cgroup and netns and enrolls it.
    api.apply(fakeapi::pod(
        "foo",
        "sleep",
        SLEEP_UID,
        NODE,
        &sleep.ip,
        json!({"app": "sleep"}),
        "sleep",
    ));
    eventually("sleep enrolled", &agent, || {
        agent.metric("authz_pods_enrolled") == 2.0
    });
    assert!(
        agent.log_text().contains("pod enrolled"),
        "{}",
        agent.log_text()
    );

    let url = format!("http://{}:8000/get", httpbin.ip);
    let get = || curl(&sleep, true, &[&url]).unwrap();
    let inbound = agent.metric("authz_connections_inbound_total");
    let (code, body) = get();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body)["headers"]["x-forwarded-for"],
        sleep.ip.as_str(),
        "the client's address, as the destination's agent saw it"
    );
    assert!(
        agent.metric("authz_connections_inbound_total") > inbound,
        "the request went through the agent at the destination"
    );

    // A DENY policy created through the API server changes what the pod gets...
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "deny-get",
        deny_get(),
    ));
    eventually("deny enforced", &agent, || {
        get() == (403, "RBAC: access denied".into())
    });
    let (code, _) = curl(
        &sleep,
        true,
        &[&format!("http://{}:8000/headers", httpbin.ip)],
    )
    .unwrap();
    assert_eq!(code, 200, "other paths still allowed");

    // A client outside the mesh, even one that excludes itself, cannot walk around the policy:
    // every pod of the node is steered to protected destinations.
    let outsider = net.kube_pod("outsider", 4, OUTSIDER_UID).unwrap();
    api.apply(fakeapi::namespace("bar", false));
    let mut o = fakeapi::pod(
        "bar",
        "outsider",
        OUTSIDER_UID,
        NODE,
        &outsider.ip,
        json!({}),
        "default",
    );
    o["metadata"]["annotations"] = json!({"authz.io/exclude": "true"});
    api.apply(o);
    eventually("outsider enrolled", &agent, || {
        agent.metric("authz_pods_enrolled") == 3.0
    });
    assert_eq!(
        curl(&outsider, true, &[&url]).unwrap(),
        (403, "RBAC: access denied".into())
    );

    // Through the Service's cluster IP (an address no interface has): the agent picks the
    // backend and connects to it from the pod; the backend's policies apply where it is.
    let (code, body) = curl(&sleep, true, &[&format!("http://{vip}/get")]).unwrap();
    assert_eq!(
        (code, body.as_str()),
        (403, "RBAC: access denied"),
        "policy applies through the service"
    );
    let (code, body) = curl(&sleep, true, &[&format!("http://{vip}/headers")]).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["headers"]["x-forwarded-for"], sleep.ip.as_str());

    // ...and stays in force while the API server is away.
    api.stop();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        get().0,
        403,
        "last good state stays while the API server is down"
    );
    api.resume();

    // An invalid new version is reported as an Event and the previous version stays.
    let mut bad = deny_get();
    bad["rules"][0]["to"][0]["operation"]["bogus"] = json!(true);
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "deny-get",
        bad,
    ));
    eventually("an Event on the invalid version", &agent, || {
        api.events().iter().any(|e| {
            e["regarding"]["name"] == "deny-get"
                && e["reason"] == "InvalidPolicy"
                && e["note"].as_str().is_some_and(|n| {
                    n.contains("bogus") && n.contains("previous valid version stays")
                })
        })
    });
    assert_eq!(get().0, 403, "the previous valid version stays in force");
    assert!(agent.metric("authz_policies_rejected_total") >= 1.0);

    // Deleting the policy changes it back.
    api.delete("AuthorizationPolicy", "foo", "deny-get");
    eventually("deny lifted", &agent, || get().0 == 200);

    // A RequestAuthentication from the API server, its JWKS inline in the object.
    let jwks = std::fs::read_to_string(data_dir().join("istio-samples/jwks.json")).unwrap();
    api.apply(fakeapi::istio(
        "RequestAuthentication",
        "foo",
        "jwt",
        json!({"selector": {"matchLabels": {"app": "httpbin"}},
               "jwtRules": [{"issuer": "testing@secure.istio.io", "jwks": jwks}]}),
    ));
    let token = demo_jwt();
    let with = |t: &str| {
        curl(
            &sleep,
            true,
            &["-H", &format!("Authorization: Bearer {t}"), &url],
        )
        .unwrap()
    };
    eventually("token checked", &agent, || {
        with(&tampered(&token)) == (401, "Jwt verification fails".into())
    });
    assert_eq!(with(&token).0, 200);
    api.delete("RequestAuthentication", "foo", "jwt");
    eventually("RequestAuthentication gone", &agent, || {
        with(&tampered(&token)).0 == 200
    });

    // A relist (410 Gone) in between changes nothing.
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "deny-get",
        deny_get(),
    ));
    eventually("deny again", &agent, || get().0 == 403);
    api.expire_watches();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get().0, 403);

    // The client pod goes away: it is released, its connections no longer steered; the
    // destination's policies still hold for it, as for any client.
    let before = agent.metric("authz_kernel_connect_redirected_total");
    api.delete("Pod", "foo", "sleep");
    eventually("sleep released", &agent, || {
        agent.metric("authz_pods_enrolled") == 2.0
    });
    let (code, _) = get();
    assert_eq!(code, 403, "decided at the destination");
    assert_eq!(
        agent.metric("authz_kernel_connect_redirected_total"),
        before
    );
    rbac_held(&api);
}

/// The agent never asked for what deploy/kubernetes/rbac.yaml does not grant; what it grants
/// and this run did not use is reported.
fn rbac_held(api: &FakeApi) {
    assert!(
        api.forbidden().is_empty(),
        "requests the ClusterRole does not grant: {:?}",
        api.forbidden()
    );
    eprintln!(
        "RBAC: granted by deploy/kubernetes/rbac.yaml and not used in this run: {:?}",
        api.unused_grants()
    );
}

#[test]
fn a_pod_that_cannot_be_found_is_reported_and_retried() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let httpbin_uid = "5c0ffee0-0000-4000-8000-00000000b002";
    let httpbin = net.kube_pod("httpbin", 3, httpbin_uid).unwrap();
    net.serve(&httpbin, "http", 8000).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    api.apply(fakeapi::pod(
        "foo",
        "httpbin",
        httpbin_uid,
        NODE,
        &httpbin.ip,
        json!({"app": "httpbin"}),
        "httpbin",
    ));
    // Scheduled here, but its sandbox is not there yet.
    let uid = "5c0ffee0-0000-4000-8000-00000000b001";
    api.apply(fakeapi::pod(
        "foo",
        "sleep",
        uid,
        NODE,
        "10.77.250.2",
        json!({"app": "sleep"}),
        "sleep",
    ));
    let cfg = kube_config(&net, "{ADMIN}", "");
    let kubeconfig = api.kubeconfig();
    let files = [("kubeconfig", kubeconfig.as_str())];
    let agent = Agent::start_with_files(&cfg, &files).unwrap();
    eventually("reported", &agent, || {
        agent.metric("authz_pods_not_enrolled") == 1.0
    });
    assert!(
        agent.log_text().contains("no cgroup for pod uid"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        agent.metric("authz_pods_enrolled"),
        1.0,
        "httpbin only: sleep is never half-enrolled"
    );
    // Still not enrollable after a moment: an Event on the pod says why.
    eventually("an Event on the pod", &agent, || {
        api.events().iter().any(|e| {
            e["regarding"]["kind"] == "Pod"
                && e["regarding"]["name"] == "sleep"
                && e["regarding"]["uid"] == uid
                && e["reason"] == "NotEnrolled"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("no cgroup for pod uid"))
        })
    });

    // The sandbox starts: the next retry enrolls it, with no change on the API server.
    let sleep = net.kube_pod("sleep", 2, uid).unwrap();
    api.apply(fakeapi::pod(
        "foo",
        "sleep",
        uid,
        NODE,
        &sleep.ip,
        json!({"app": "sleep"}),
        "sleep",
    ));
    eventually("enrolled once its sandbox runs", &agent, || {
        agent.metric("authz_pods_enrolled") == 2.0 && agent.metric("authz_pods_not_enrolled") == 0.0
    });
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "deny-get",
        deny_get(),
    ));
    let url = format!("http://{}:8000/get", httpbin.ip);
    eventually("enforced", &agent, || {
        curl(&sleep, true, &[&url]).unwrap().0 == 403
    });
}

#[test]
fn waits_alive_for_an_api_server_that_is_not_there_yet() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    api.stop();
    let mut net = Net::new().unwrap();
    net.attach_host().unwrap();
    let cfg = kube_config(&net, "{ADMIN_ANY}", "");
    let kubeconfig = api.kubeconfig();
    let files = [("kubeconfig", kubeconfig.as_str())];
    let mut agent = Agent::spawn(&cfg, &files, &fresh_bpffs()).unwrap();
    // Alive (a liveness probe must not kill it), not ready, and still trying.
    eventually("alive", &agent, || {
        http_get(agent.admin, "/healthz").is_ok_and(|r| r.0 == 200)
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(http_get(agent.admin, "/ready").unwrap().0, 503);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().contains("retrying in"),
        "{}",
        agent.log_text()
    );
    api.resume();
    agent.wait_ready().unwrap();
    // On all addresses (as in the DaemonSet) the probes and metrics answer anyone, the
    // inventory only the node itself.
    let outside: std::net::SocketAddr = format!("10.77.{}.254:{}", net.subnet, agent.admin.port())
        .parse()
        .unwrap();
    assert_eq!(http_get(outside, "/ready").unwrap().0, 200);
    assert_eq!(http_get(outside, "/metrics").unwrap().0, 200);
    assert_eq!(http_get(outside, "/config_dump").unwrap().0, 403);
    assert_eq!(http_get(agent.admin, "/config_dump").unwrap().0, 200);
}

/// A DaemonSet rolling update with maxSurge: the new agent starts beside the old one on the same
/// pins and the same admin port, then the old one is stopped. No request fails and the policy
/// holds throughout.
#[test]
fn rolling_update_hands_over_without_a_failed_request() {
    rolling_update(None);
}

/// The same across a layout change (an upgrade whose pinned maps differ): the new agent takes the
/// old one's state over beside it instead of adopting it, and no request fails either.
#[test]
fn rolling_update_across_a_layout_change_hands_over_without_a_failed_request() {
    rolling_update(Some("1"));
}

/// A rolling update on one node; `old_layout`: the old agent pins as that layout version.
fn rolling_update(old_layout: Option<&str>) {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let uid = "5c0ffee0-0000-4000-8000-00000000c001";
    let sleep = net.kube_pod("sleep", 2, uid).unwrap();
    // A mesh pod of this node: the handover keeps its inbound capture too.
    let httpbin_uid = "5c0ffee0-0000-4000-8000-00000000c002";
    let httpbin = net.kube_pod("httpbin", 3, httpbin_uid).unwrap();
    net.serve(&httpbin, "http", 8000).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    api.apply(fakeapi::pod(
        "foo",
        "httpbin",
        httpbin_uid,
        NODE,
        &httpbin.ip,
        json!({"app": "httpbin"}),
        "httpbin",
    ));
    api.apply(fakeapi::pod(
        "foo",
        "sleep",
        uid,
        NODE,
        &sleep.ip,
        json!({"app": "sleep"}),
        "sleep",
    ));
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "deny-get",
        deny_get(),
    ));
    let cfg = kube_config(&net, "{ADMIN}", ", drainTimeout: 2s");
    let kubeconfig = api.kubeconfig();
    let files = [("kubeconfig", kubeconfig.as_str())];
    let env: Vec<(&str, &str)> = old_layout
        .map(|v| ("AUTHZ_TEST_LAYOUT", v))
        .into_iter()
        .collect();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut old = Agent::spawn_with_env(&cfg, &files, &fresh_bpffs(), admin, &env).unwrap();
    old.wait_ready().unwrap();
    old.cleanup_on_drop = false;
    let denied = format!("http://{}:8000/get", httpbin.ip);
    eventually("enforcing", &old, || {
        curl(&sleep, true, &[&denied]).unwrap().0 == 403
    });

    let load = Load::start(&sleep, &format!("http://{}:8000/headers", httpbin.ip));
    std::thread::sleep(Duration::from_millis(300));
    // The surge pod: same pins, same admin port (both listen with SO_REUSEPORT).
    let new = Agent::spawn_at(&cfg, &files, &old.bpffs, old.admin).unwrap();
    eventually("the new agent ready", &new, || {
        new.log_text().contains("agent ready")
    });
    std::thread::sleep(Duration::from_millis(300));
    let st = old.stop().unwrap();
    assert!(st.success(), "{}", old.log_text());
    std::thread::sleep(Duration::from_millis(300));
    let (n, bad) = load.stop_not_ok();
    assert!(n >= 10, "requests during the handover: {n}");
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed: {bad:?}\nold:\n{}\nnew:\n{}",
        bad.len(),
        old.log_text(),
        new.log_text()
    );
    assert_eq!(
        curl(&sleep, true, &[&denied]).unwrap().0,
        403,
        "the policy holds with the new agent\nold:\n{}\nnew:\n{}",
        old.log_text(),
        new.log_text()
    );
    assert!(new.metric("authz_connections_inbound_total") > 0.0);
    if let Some(v) = old_layout {
        assert!(
            new.log_text().contains("took over from another layout"),
            "{}",
            new.log_text()
        );
        assert!(
            !old.bpffs.join(format!("v{v}")).exists(),
            "the old layout's state is gone"
        );
    }
}

/// A pod located on this node whose listener cannot open (here: its loopback has no 127.0.0.1, so
/// nothing can bind it) stays pending: its connections to protected destinations are refused, not
/// sent direct; it is counted and gets an Event; the agent and the other pods go on.
#[test]
fn a_pod_whose_listener_cannot_open_is_refused_and_reported() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let uid = "5c0ffee0-0000-4000-8000-00000000c001";
    let broken = net.kube_pod("broken", 2, uid).unwrap();
    Net::run(
        &broken,
        false,
        "ip",
        &["addr", "del", "127.0.0.1/8", "dev", "lo"],
    )
    .unwrap();
    let httpbin = net.host("httpbin", 3).unwrap();
    net.serve(&httpbin, "http", 8000).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    api.apply(fakeapi::pod(
        "foo",
        "httpbin",
        "5c0ffee0-0000-4000-8000-00000000c002",
        "node-b",
        &httpbin.ip,
        json!({"app": "httpbin"}),
        "httpbin",
    ));
    // Client-side, a pod reaches mesh pods through Service addresses (pod addresses are
    // decided where they arrive).
    let vip = format!("10.77.{}.100", net.subnet);
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "foo"},
        "spec": {"clusterIP": vip, "selector": {"app": "httpbin"}, "ports": [{"port": 8000}]}}));
    api.apply(fakeapi::pod(
        "foo",
        "broken",
        uid,
        NODE,
        &broken.ip,
        json!({"app": "broken"}),
        "broken",
    ));
    let cfg = kube_config(&net, "{ADMIN}", "");
    let kubeconfig = api.kubeconfig();
    let agent = Agent::start_with_files(&cfg, &[("kubeconfig", kubeconfig.as_str())]).unwrap();
    eventually("pending", &agent, || {
        agent.metric("authz_pods_not_enrolled") == 1.0
    });
    let (a, _) = attempt(&broken, &format!("http://{vip}:8000/get"));
    assert_eq!(a, Attempt::Refused, "pending: refused, never direct");
    assert!(agent.metric("authz_kernel_connect_pending_total") >= 1.0);
    eventually("an Event on the pod", &agent, || {
        api.events().iter().any(|e| {
            e["regarding"]["name"] == "broken"
                && e["reason"] == "NotEnrolled"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("refused until the agent enrolls it"))
        })
    });
    // Its loopback address comes back: the next retry enrolls it.
    Net::run(
        &broken,
        false,
        "ip",
        &["addr", "add", "127.0.0.1/8", "dev", "lo"],
    )
    .unwrap();
    eventually("enrolled", &agent, || {
        agent.metric("authz_pods_enrolled") == 1.0 && agent.metric("authz_pods_not_enrolled") == 0.0
    });
    let (code, _) = curl(&broken, true, &[&format!("http://{vip}:8000/get")]).unwrap();
    assert_eq!(code, 200);
    rbac_held(&api);
}

/// A mesh pod of this node is protected for a client outside every pod; the kubelet's probes
/// pass a deny-all policy, recognised by the cgroup that opened them, never by address: the same
/// requests from another process of the node, and from a client outside the node masqueraded to
/// the node's address (a NodePort with `externalTrafficPolicy: Cluster`), are decided by the
/// policy, HTTP and raw bytes alike, whatever the query string.
#[test]
fn probes_pass_a_deny_all_policy_only_when_the_kubelet_makes_them() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    // The test's own namespace is the node: 10.77.<subnet>.254 on the pods' bridge.
    net.attach_host().unwrap();
    let kubelet = net.kubelet_cgroup();
    let outside = net.outside_masqueraded("ext").unwrap();
    let uid = "5c0ffee0-0000-4000-8000-00000000d001";
    let web = net.kube_pod("web", 3, uid).unwrap();
    let internet = net.host("internet", 9).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    net.serve(&web, "http", 8001).unwrap();
    net.serve(&web, "echo", 9000).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    let mut pod = fakeapi::pod(
        "foo",
        "web",
        uid,
        NODE,
        &web.ip,
        json!({"app": "web"}),
        "web",
    );
    pod["spec"]["containers"] = json!([{"name": "app", "image": "example/app:1",
        "ports": [{"name": "http", "containerPort": 8000}, {"name": "health", "containerPort": 8001}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "health"}},
        "startupProbe": {"tcpSocket": {"port": 8000}},
        "livenessProbe": {"tcpSocket": {"port": 9000}}}]);
    api.apply(pod);
    let cfg = kube_config(
        &net,
        "{ADMIN}",
        &format!(", kubeletCgroup: {}", kubelet.display()),
    );
    let kubeconfig = api.kubeconfig();
    let agent = Agent::start_with_files(&cfg, &[("kubeconfig", kubeconfig.as_str())]).unwrap();
    eventually("web protected", &agent, || {
        agent.metric("authz_pods_enrolled") == 1.0
    });
    // The serving port (8000, with a tcpSocket startup probe) and the health port (8001).
    let url = |p: &str| {
        let port = if p.starts_with("/healthz") {
            8001
        } else {
            8000
        };
        format!("http://{}:{port}{p}", web.ip)
    };
    let status = |mut c: Command| -> u16 {
        let out = c.output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let curl_args = |p: &str| -> Vec<String> {
        [
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url(p),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let from_kubelet = |p: &str| {
        let a = curl_args(p);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        status(node_command(&kubelet, "curl", &a))
    };
    let from_node = |p: &str| {
        let mut c = Command::new("curl");
        c.args(curl_args(p));
        status(c)
    };
    let from_outside = |p: &str| {
        let a = curl_args(p);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        status(Net::command(&outside, false, "curl", &a))
    };
    assert_eq!(curl(&internet, false, &[&url("/x")]).unwrap().0, 200);
    assert_eq!(from_outside("/x"), 200, "the masqueraded path works");

    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "allow-nothing",
        json!({"selector": {"matchLabels": {"app": "web"}}}),
    ));
    eventually("deny-all in force", &agent, || {
        curl(&internet, false, &[&url("/x")]).unwrap().0 == 403
    });
    assert_eq!(from_kubelet("/healthz"), 200, "{}", agent.log_text());
    assert_eq!(
        from_kubelet("/healthz/x"),
        403,
        "only the probe passes for the kubelet"
    );
    assert_eq!(from_kubelet("/healthz/../x"), 403);
    for p in ["/healthz", "/healthz?x=1", "/x", "/secret"] {
        assert_eq!(from_node(p), 403, "{p} from another process of the node");
        assert_eq!(
            from_outside(p),
            403,
            "{p} masqueraded to the node's address"
        );
    }
    assert_eq!(
        curl(&internet, false, &[&url("/healthz")]).unwrap().0,
        403,
        "the probe path from anywhere else is decided"
    );
    assert!(agent
        .metrics()
        .contains_key("authz_requests_total{decision=\"allow\",reason=\"kubelet probe\"}"));

    // The tcpSocket probe reaches the application itself from the kubelet; from anyone else,
    // the same port is captured and denied at L4.
    let echo = |mut c: Command| {
        let out = c.output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let nc = format!("echo ping | nc -q 1 -w 3 {} 9000", web.ip);
    use std::process::Command;
    assert_eq!(echo(node_command(&kubelet, "sh", &["-c", &nc])), "ping\n");
    let mut node = Command::new("sh");
    node.args(["-c", &nc]);
    assert_eq!(echo(node), "", "another process of the node: denied at L4");
    assert_eq!(
        echo(Net::command(&outside, false, "sh", &["-c", &nc])),
        "",
        "masqueraded: denied at L4"
    );
    assert_eq!(
        echo(Net::command(&internet, false, "sh", &["-c", &nc])),
        "",
        "denied at L4 for anyone else"
    );
    rbac_held(&api);
}

/// CUSTOM in Kubernetes mode: providers come from Istio's mesh ConfigMap (istio-system/istio,
/// key `mesh`), watched. A CUSTOM policy naming a provider not defined there denies what it
/// matches; once the ConfigMap defines it, the provider decides; a change to it takes effect.
#[test]
fn custom_providers_come_from_the_mesh_config_map() {
    if !require_root() {
        return;
    }
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let sleep = net.kube_pod("sleep", 2, SLEEP_UID).unwrap();
    let httpbin = net.kube_pod("httpbin", 3, HTTPBIN_UID).unwrap();
    net.serve(&httpbin, "http", 8000).unwrap();
    // The provider runs beside the agent (the agent calls it from the node).
    let (hp, gp) = (free_port(), free_port());
    let _provider = start_extauthz(hp, gp);
    api.apply(fakeapi::namespace("foo", true));
    for (name, uid, host) in [
        ("httpbin", HTTPBIN_UID, &httpbin),
        ("sleep", SLEEP_UID, &sleep),
    ] {
        api.apply(fakeapi::pod(
            "foo",
            name,
            uid,
            NODE,
            &host.ip,
            json!({"app": name}),
            name,
        ));
    }
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "ext-authz",
        json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "CUSTOM",
               "provider": {"name": "sample-ext-authz-http"},
               "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}]}),
    ));
    let cfg = kube_config(&net, "{ADMIN}", "");
    let kubeconfig = api.kubeconfig();
    let agent = Agent::start_with_files(&cfg, &[("kubeconfig", kubeconfig.as_str())]).unwrap();
    eventually("pods enrolled", &agent, || {
        agent.metric("authz_pods_enrolled") == 2.0
    });
    let get = |path: &str, value: &str| {
        curl(
            &sleep,
            true,
            &[
                "-H",
                &format!("x-ext-authz: {value}"),
                &format!("http://{}:8000{path}", httpbin.ip),
            ],
        )
        .unwrap()
    };
    // No mesh ConfigMap yet: the provider is unknown, so what the policy matches is denied.
    assert_eq!(
        get("/headers", "allow"),
        (403, "RBAC: access denied".into())
    );
    assert_eq!(
        get("/ip", "deny").0,
        200,
        "what the policy does not match is not checked"
    );
    assert!(
        agent
            .log_text()
            .contains("is not among the extensionProviders"),
        "{}",
        agent.log_text()
    );

    let mesh = |port: u16, extra: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": format!(
            "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\nextensionProviders:\n- name: otel\n  opentelemetry: {{service: otel.observability.svc.cluster.local, port: 4317}}\n- name: sample-ext-authz-http\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: \"{port}\"\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n{extra}"
        )}})
    };
    // The same name in another namespace is not Istio's mesh config.
    let mut elsewhere = mesh(hp, "");
    elsewhere["metadata"]["namespace"] = json!("foo");
    api.apply(elsewhere);
    api.apply(mesh(hp, ""));
    eventually("the provider decides", &agent, || {
        get("/headers", "allow").0 == 200
    });
    let (code, body) = get("/headers", "deny");
    assert_eq!(
        (code, body.as_str()),
        (
            403,
            "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
        )
    );
    // The ConfigMap changes: the provider is now unreachable, and its statusOnError applies.
    let closed = free_port();
    api.apply(mesh(closed, "    statusOnError: \"503\"\n"));
    eventually("statusOnError", &agent, || {
        get("/headers", "allow").0 == 503
    });
    assert_eq!(get("/ip", "allow").0, 200);
    // A ConfigMap whose providers have a problem says so on itself, as an Event.
    api.apply(mesh(
        hp,
        "- name: sample-ext-authz-http\n  envoyExtAuthzHttp: {service: 127.0.0.1, port: \"1\"}\n",
    ));
    eventually("an Event on the mesh ConfigMap", &agent, || {
        api.events().iter().any(|e| {
            e["regarding"]["kind"] == "ConfigMap"
                && e["regarding"]["name"] == "istio"
                && e["reason"] == "InvalidExtensionProvider"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("found duplicate: sample-ext-authz-http"))
        })
    });
    rbac_held(&api);
    assert!(
        !api.unused_grants().iter().any(|g| g.contains("configmaps")),
        "{:?}",
        api.unused_grants()
    );
}
