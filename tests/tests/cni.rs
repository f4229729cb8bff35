//! The chained CNI plugin under a real runtime: containerd (a daemon of the test's own) starts
//! containers with CNI networking as kubelet's CRI calls would (`ctr run --cni`: the task is
//! created, the CNI chain sets its network up, then the task starts), with Debian's bridge and
//! host-local plugins as the cluster's network and `authz-cni` chained after them by the agent's
//! installer. The agent runs in Kubernetes mode against the in-process API server.
use std::{
    path::Path,
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use authz_tests::{
    container::{CniNode, Containerd},
    fakeapi::{self, FakeApi},
    *,
};
use serde_json::json;

const NODE: &str = "node-a";
const SLEEP_UID: &str = "c41c0000-0000-4000-8000-00000000c001";
const HTTPBIN_UID: &str = "c41c0000-0000-4000-8000-00000000c002";
const WEB_UID: &str = "c41c0000-0000-4000-8000-00000000c003";
const LATE_UID: &str = "c41c0000-0000-4000-8000-00000000c004";
const RESTART_UID: &str = "c41c0000-0000-4000-8000-00000000c005";
const UNKNOWN_UID: &str = "c41c0000-0000-4000-8000-00000000c006";
const GHOST_UID: &str = "c41c0000-0000-4000-8000-00000000c007";

fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// kubelet's pod cgroup (cgroupfs driver, BestEffort), made before the sandbox as kubelet does.
fn pod_cgroup(net: &Net, uid: &str) -> std::path::PathBuf {
    let cg = net
        .cgroup_base()
        .join(format!("kubepods/besteffort/pod{uid}"));
    std::fs::create_dir_all(&cg).unwrap();
    cg
}

/// A pod the API server knows before its sandbox exists: scheduled here, no address yet.
fn scheduled_pod(name: &str, uid: &str, labels: serde_json::Value, sa: &str) -> serde_json::Value {
    let mut p = fakeapi::pod("foo", name, uid, NODE, "192.0.2.99", labels, sa);
    p["status"] = json!({"phase": "Pending"});
    p
}

/// Requests from a pod in a loop until stopped: every status seen (0: no answer).
struct Hammer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<u16>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hammer {
    fn start(from: &Host, url: &str) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<u16>>> = Arc::default();
        let (s, v, from, url) = (
            stop.clone(),
            Arc::clone(&seen),
            from.clone(),
            url.to_string(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let out = Net::run(
                    &from,
                    true,
                    "curl",
                    &[
                        "-s",
                        "-o",
                        "/dev/null",
                        "-m",
                        "1",
                        "-w",
                        "%{http_code}",
                        &url,
                    ],
                );
                let code = out
                    .ok()
                    .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                    .unwrap_or(0);
                v.lock().unwrap().push(code);
                if code == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Hammer {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<u16> {
        self.seen.lock().unwrap().clone()
    }

    fn stop(mut self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen()
    }
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Pod `name` (uid) of namespace foo, started by the runtime with `script` as its one
/// container, its sandbox's network set up by the CNI chain; kubelet's CNI_ARGS name it.
fn start_pod(
    node: &CniNode,
    ctd: &Containerd,
    net: &Net,
    name: &str,
    uid: &str,
    script: &str,
) -> Child {
    node.pod_args(name, "foo", name, uid).unwrap();
    node.run(
        ctd,
        name,
        &pod_cgroup(net, uid).join(name),
        &["/bin/sh", "-c", script],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn pods_started_by_the_runtime_are_enrolled_before_their_containers_run() {
    if !require_root() {
        return;
    }
    assert!(
        Path::new("/usr/lib/cni/bridge").exists(),
        "Debian's containernetworking-plugins are needed (cargo xtask test installs them)"
    );
    let api = FakeApi::start().unwrap();
    let mut net = Net::new().unwrap();
    let sleep = net.kube_pod("sleep", 2, SLEEP_UID).unwrap();
    let httpbin = net.kube_pod("httpbin", 3, HTTPBIN_UID).unwrap();
    net.serve(&httpbin, "http", 8000).unwrap();
    let node = CniNode::new(net.hub(), net.subnet, &cni_bin()).unwrap();
    let web_ip = format!("10.77.{}.150", net.subnet);
    let vip = format!("10.77.{}.200", net.subnet);

    api.apply(fakeapi::namespace("foo", true));
    api.apply(fakeapi::pod(
        "foo",
        "sleep",
        SLEEP_UID,
        NODE,
        &sleep.ip,
        json!({"app": "sleep"}),
        "sleep",
    ));
    api.apply(fakeapi::pod(
        "foo",
        "httpbin",
        HTTPBIN_UID,
        NODE,
        &httpbin.ip,
        json!({"app": "httpbin"}),
        "httpbin",
    ));
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "foo"},
        "spec": {"clusterIP": vip, "selector": {"app": "httpbin"}, "ports": [{"port": 80, "targetPort": 8000}]}}));
    // httpbin answers /ip only to the web pods' identity; web refuses /private to everyone.
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "httpbin-from-web",
        json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/foo/sa/web"]}}],
                          "to": [{"operation": {"paths": ["/ip"]}}]}]}),
    ));
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "web-private",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
               "rules": [{"to": [{"operation": {"paths": ["/private"]}}]}]}),
    ));
    for (name, uid) in [
        ("web", WEB_UID),
        ("late", LATE_UID),
        ("restart", RESTART_UID),
    ] {
        api.apply(scheduled_pod(name, uid, json!({"app": "web"}), "web"));
    }

    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\", cgroupRoot: {cg}}}\nkubernetes: {{enabled: true, nodeName: {NODE}, kubeconfig: kubeconfig, cni: {{enabled: true, socket: {d}/agent/cni.sock, stateDir: {d}/agent/claims, binDir: {bin}, confDir: {conf}, pluginBinary: {plugin}, timeout: 15s, reconcileWithin: 3s}}}}\n",
        cg = net.cgroup_base().display(),
        d = node.dir.display(),
        bin = node.bin_dir.display(),
        conf = node.conf_dir.display(),
        plugin = node.plugin.display(),
    );
    let kubeconfig = api.kubeconfig();
    let files = [("kubeconfig", kubeconfig.as_str())];
    // Its pins are adopted by the agent started after it is killed; whichever is dropped
    // cleans them up, whatever fails.
    let mut agent = Agent::start_with_files(&cfg, &files).unwrap();
    let bpffs = agent.bpffs.clone();

    // Installed: the binary in the node's CNI directory, chained last in the primary network,
    // and back there when the network plugin rewrites its file.
    until("the plugin chained", Duration::from_secs(10), || {
        node.chain() == ["bridge", "authz-cni"]
    });
    assert!(node.bin_dir.join("authz-cni").exists());
    std::fs::write(node.primary(), node.primary_conf(net.subnet)).unwrap();
    assert_eq!(node.chain(), ["bridge"]);
    until(
        "the plugin chained again after a rewrite",
        Duration::from_secs(5),
        || node.chain() == ["bridge", "authz-cni"],
    );

    let ctd = Containerd::start().unwrap();
    // Inbound: a client calls web's address over and over from before web exists. Every answer
    // it ever gets for /private is the policy's: the container cannot serve before the pod is
    // captured.
    let hammer = Hammer::start(&sleep, &format!("http://{web_ip}:8080/private"));
    // Outbound: web's very first connections go to the Service address (reachable only
    // steered) and are decided with web's identity.
    let script = format!(
        "for p in /ip /headers; do curl -s -o /dev/null -m 5 -w '%{{http_code}}\\n' http://{vip}$p; done > /out/web.first; exec /testsrv http 0.0.0.0:8080"
    );
    let mut web = start_pod(&node, &ctd, &net, "web", WEB_UID, &script);
    until("web's first requests", Duration::from_secs(30), || {
        if let Ok(Some(st)) = web.try_wait() {
            panic!("web's ctr run exited with {st}: {}", stderr_of(&mut web));
        }
        lines(&node.out.join("web.first")).len() == 2
    });
    assert_eq!(
        lines(&node.out.join("web.first")),
        ["200", "403"],
        "the first connections were steered and decided with web's identity"
    );
    until(
        "web serving behind its policy",
        Duration::from_secs(30),
        || hammer.seen().contains(&403),
    );
    std::thread::sleep(Duration::from_millis(300));
    let seen = hammer.stop();
    assert!(
        !seen.contains(&200),
        "/private was served without the policy: {seen:?}"
    );
    let (code, _) = curl(&sleep, true, &[&format!("http://{web_ip}:8080/public")]).unwrap();
    assert_eq!(code, 200, "other paths are served");
    assert_eq!(agent.metric("authz_cni_claims"), 1.0);
    let claims = node.dir.join("agent/claims");
    assert!(claims
        .join(format!("{}.json", CniNode::sandbox("web")))
        .exists());

    // The container goes: the chain's DEL releases the claim.
    node.kill(&ctd, "web");
    assert!(wait_exit(&mut web, Duration::from_secs(30)).is_some());
    until("the claim released", Duration::from_secs(10), || {
        std::fs::read_dir(&claims).unwrap().count() == 0
    });

    // The agent dies: with failMode closed the sandbox does not start, and nothing runs in it.
    agent.child.kill().unwrap();
    let _ = agent.child.wait();
    assert_eq!(
        node.chain(),
        ["bridge", "authz-cni"],
        "a crash leaves the plugin"
    );
    node.pod_args("late", "foo", "late", LATE_UID).unwrap();
    let out = node
        .run(
            &ctd,
            "late",
            &pod_cgroup(&net, LATE_UID).join("late"),
            &["/bin/sh", "-c", "touch /out/late.ran"],
        )
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the sandbox started: {said}");
    assert!(said.contains("cannot be reached"), "{said}");
    assert!(!node.out.join("late.ran").exists());

    // A pod whose ADD starts while the agent is down, and a new agent within the plugin's
    // timeout (15 s: an agent starting on a loaded machine takes a few): the ADD completes
    // once it has the pod enrolled.
    let script = format!(
        "curl -sS -o /dev/null -m 10 -w '%{{http_code}}\\n' http://{vip}/ip > /out/restart.first 2> /out/restart.err"
    );
    let mut restart = start_pod(&node, &ctd, &net, "restart", RESTART_UID, &script);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !node.out.join("restart.first").exists(),
        "ran before any agent had the pod"
    );
    let mut again = Agent::spawn(&cfg, &files, &bpffs).unwrap();
    again.wait_ready().unwrap();
    let st = wait_exit(&mut restart, Duration::from_secs(30)).expect("the container ran");
    assert!(
        st.success(),
        "{st}: {} {:?}",
        stderr_of(&mut restart),
        std::fs::read_to_string(node.out.join("restart.err"))
    );
    assert_eq!(lines(&node.out.join("restart.first")), ["200"]);

    // A pod the API server does not know yet (its watch behind, or down): enrolled with a
    // claimed identity, so no policy can select it and every connection to it is refused,
    // until the API server confirms it; then its policies apply.
    let serve_and_say_ip = |name: &str| {
        format!("ip -4 -o addr show dev eth0 > /out/{name}.ip; exec /testsrv http 0.0.0.0:8080")
    };
    let mut unknown = start_pod(
        &node,
        &ctd,
        &net,
        "unknown",
        UNKNOWN_UID,
        &serve_and_say_ip("unknown"),
    );
    let ip_of = |name: &str| -> Option<String> {
        let text = std::fs::read_to_string(node.out.join(format!("{name}.ip"))).ok()?;
        let after = text.split(" inet ").nth(1)?;
        Some(after.split('/').next()?.to_string())
    };
    until("unknown started", Duration::from_secs(30), || {
        if let Ok(Some(st)) = unknown.try_wait() {
            panic!(
                "unknown's ctr run exited with {st}: {}",
                stderr_of(&mut unknown)
            );
        }
        ip_of("unknown").is_some()
    });
    let unknown_ip = ip_of("unknown").unwrap();
    let code = |path: &str| {
        curl(&sleep, true, &[&format!("http://{unknown_ip}:8080{path}")])
            .map(|(c, _)| c)
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = 0;
    while Instant::now() < deadline && refused < 5 {
        match code("/public") {
            503 => refused += 1,
            0 => std::thread::sleep(Duration::from_millis(100)),
            c => panic!("a pod of no known identity answered {c}"),
        }
    }
    assert_eq!(refused, 5, "connections to the claimed pod are refused");
    assert!(again
        .metrics()
        .contains_key("authz_requests_total{decision=\"deny\",reason=\"identity not confirmed\"}"));
    // Confirmed, it is enrolled again in place: /private is refused all along, never served.
    let hammer = Hammer::start(&sleep, &format!("http://{unknown_ip}:8080/private"));
    api.apply(scheduled_pod(
        "unknown",
        UNKNOWN_UID,
        json!({"app": "web"}),
        "web",
    ));
    until(
        "confirmed by the API server",
        Duration::from_secs(10),
        || code("/public") == 200,
    );
    assert_eq!(code("/private"), 403, "its policies apply once it is known");
    until(
        "the hammer sees the policy",
        Duration::from_secs(10),
        || hammer.seen().contains(&403),
    );
    let seen = hammer.stop();
    assert!(
        !seen.contains(&200),
        "/private while the claim was confirmed: {seen:?}"
    );

    // A claim the API server never confirms, though it has spoken since: withdrawn, reported.
    let mut ghost = start_pod(
        &node,
        &ctd,
        &net,
        "ghost",
        GHOST_UID,
        &serve_and_say_ip("ghost"),
    );
    until("ghost started", Duration::from_secs(30), || {
        ip_of("ghost").is_some()
    });
    assert_eq!(again.metric("authz_cni_claims_withdrawn_total"), 0.0);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        again.metric("authz_cni_claims_withdrawn_total"),
        0.0,
        "not withdrawn while the API server has said nothing since"
    );
    let mut elsewhere = fakeapi::pod(
        "foo",
        "elsewhere",
        "c41c0000-0000-4000-8000-00000000c0ff",
        "node-b",
        "192.0.2.50",
        json!({"app": "elsewhere"}),
        "default",
    );
    elsewhere["metadata"]["labels"]["touch"] = json!("1");
    api.apply(elsewhere);
    until("the ghost claim withdrawn", Duration::from_secs(10), || {
        again.metric("authz_cni_claims_withdrawn_total") == 1.0
    });
    // Counted when the snapshot gives it up; its file goes once the plugin has been told.
    let ghost_file = claims.join(format!("{}.json", CniNode::sandbox("ghost")));
    until("the ghost claim forgotten", Duration::from_secs(10), || {
        !ghost_file.exists()
    });
    assert!(again.log_text().contains("CNI claim withdrawn"));
    for (id, child) in [("unknown", &mut unknown), ("ghost", &mut ghost)] {
        node.kill(&ctd, id);
        assert!(wait_exit(child, Duration::from_secs(30)).is_some());
    }

    // Leaving for good (no successor on the socket): the plugin is taken out of the
    // configuration and its binary removed, so the node's pods do not wait for it.
    again.stop().unwrap();
    assert_eq!(node.chain(), ["bridge"]);
    assert!(!node.bin_dir.join("authz-cni").exists());
    drop(again);
    drop(agent);
    let _ = web.wait();
}
