//! The DaemonSet as users run it: the agent's image (`cargo xtask image`) under containerd + runc
//! with the pod settings of deploy/kubernetes/daemonset.yaml (privileged) and of the Helm chart's
//! capabilities-only variant (`privileged=false`): host network and PID namespace, the host paths
//! it mounts with their propagation, read-only root, its security context, memory limit and env.
//! Kubernetes mode against the test API server (RBAC as deploy/ grants it), the FAQ's skip-path
//! policies on a gateway pod, asked from a namespace that is no pod, from the node and from a pod.
//!
//! The test plays kubelet: the ConfigMap as a volume, the service account's token and CA at
//! /var/run/secrets/kubernetes.io/serviceaccount, `KUBERNETES_SERVICE_HOST`/`_PORT`, and the agent
//! finds the API server in-cluster, over HTTPS with that CA and token, as it does in a cluster.
//! The ConfigMap is the shipped one with two values of this test: its own pin directory (tests
//! run side by side) and the test's cgroup root (the pods live under it).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use authz_tests::{
    container::{self, Containerd, Kubelet},
    fakeapi::{self, FakeApi},
    *,
};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};
use serde::Deserialize;
use serde_json::{json, Value};

const NODE: &str = "node-c";
const SLEEP_UID: &str = "5c0ffee0-0000-4000-8000-00000000c001";
const GW_UID: &str = "5c0ffee0-0000-4000-8000-00000000c002";

/// The image archive `cargo xtask test` builds and names in AUTHZ_IMAGE.
fn image() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AUTHZ_IMAGE") {
        return Some(p.into());
    }
    if std::env::var_os("CI").is_some() {
        panic!("AUTHZ_IMAGE not set: cargo xtask test builds the image and sets it");
    }
    eprintln!("skipped: AUTHZ_IMAGE not set (`cargo xtask test` builds the image and sets it)");
    None
}

/// The first object of `kind` in a multi-document YAML text, as its type.
fn object<T: for<'de> Deserialize<'de>>(text: &str, kind: &str) -> T {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        if v["kind"].as_str() == Some(kind) {
            return serde_yaml::from_value(v).unwrap();
        }
    }
    panic!("no {kind}");
}

fn deploy(file: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes")
            .join(file),
    )
    .unwrap()
}

#[test]
fn the_daemonset_runs_under_containerd_privileged_and_capabilities_only() {
    if !require_root() {
        return;
    }
    let Some(archive) = image() else { return };
    let Some(helm) = helm() else { return };
    let chart = helm_template(&helm, &["privileged=false"]);
    let variants = [
        (
            "privileged (deploy/kubernetes)",
            object::<DaemonSet>(&deploy("daemonset.yaml"), "DaemonSet"),
            object::<ConfigMap>(&deploy("configmap.yaml"), "ConfigMap"),
        ),
        (
            "capabilities-only (chart, privileged=false)",
            object::<DaemonSet>(&chart, "DaemonSet"),
            object::<ConfigMap>(&chart, "ConfigMap"),
        ),
    ];
    let ctd = Containerd::start().unwrap();
    let image_ref = ctd.import(&archive).unwrap();
    let image_config = container::image_config(&archive).unwrap();
    // One after the other: both listen on the manifest's admin port on the host network.
    for (variant, ds, cm) in variants {
        faq_in_container(variant, &ctd, &image_ref, &image_config, &ds, &cm);
    }
}

fn faq_in_container(
    variant: &str,
    ctd: &Containerd,
    image_ref: &str,
    image_config: &container::ImageConfig,
    ds: &DaemonSet,
    cm: &ConfigMap,
) {
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let spec = &pod.containers[0];

    // The cluster: a gateway pod with the FAQ's policies, a client pod, a namespace that is no pod.
    let api = FakeApi::start_in_cluster().unwrap();
    let mut net = Net::new().unwrap();
    net.attach_host().unwrap();
    let sleep = net.kube_pod("sleep", 2, SLEEP_UID).unwrap();
    let gw = net.kube_pod("gw", 3, GW_UID).unwrap();
    let internet = net.host("internet", 9).unwrap();
    net.serve(&gw, "http", 80).unwrap();
    api.apply(fakeapi::namespace("foo", true));
    api.apply(fakeapi::namespace("istio-system", true));
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
        "istio-system",
        "gw",
        GW_UID,
        NODE,
        &gw.ip,
        json!({"istio": "ingressgateway", "app": "istio-ingressgateway"}),
        "istio-ingressgateway",
    ));
    for file in ["requestauthentication.yaml", "authorizationpolicy.yaml"] {
        let text = std::fs::read_to_string(data_dir().join("faq/skip-path").join(file)).unwrap();
        let v: Value = serde_yaml::from_str(&text).unwrap();
        api.apply(fakeapi::istio(
            v["kind"].as_str().unwrap(),
            v["metadata"]["namespace"].as_str().unwrap(),
            v["metadata"]["name"].as_str().unwrap(),
            v["spec"].clone(),
        ));
    }

    // The ConfigMap's files, as kubelet projects them.
    let dir = std::env::temp_dir().join(format!(
        "authz-container-{}-{}",
        std::process::id(),
        variant.len()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let config_dir = dir.join("configmap");
    std::fs::create_dir_all(&config_dir).unwrap();
    let bpffs = fresh_bpffs();
    let data = cm.data.clone().unwrap();
    let mut agent_yaml: serde_yaml::Value = serde_yaml::from_str(&data["agent.yaml"]).unwrap();
    agent_yaml["agent"]["bpffs"] = bpffs.to_string_lossy().into_owned().into();
    agent_yaml["agent"]["cgroupRoot"] = net.cgroup_base().to_string_lossy().into_owned().into();
    std::fs::write(
        config_dir.join("agent.yaml"),
        serde_yaml::to_string(&agent_yaml).unwrap(),
    )
    .unwrap();
    let service_account = dir.join("serviceaccount");
    api.service_account(&service_account).unwrap();
    let kubelet = Kubelet {
        node_name: NODE.into(),
        config_maps: vec![(cm.metadata.name.clone().unwrap(), config_dir.clone())],
        scratch: dir.join("volumes"),
        service_account: Some(service_account),
        env: api.service_env(),
        host_paths: ["/var/run/authz", "/opt/cni/bin", "/etc/cni/net.d"]
            .iter()
            .map(|p| (p.to_string(), dir.join("node").join(&p[1..])))
            .collect(),
    };

    // The node's network plugin wrote its configuration as a single-plugin .conf.
    let node_conf = dir.join("node/etc/cni/net.d");
    std::fs::create_dir_all(&node_conf).unwrap();
    std::fs::write(
        node_conf.join("10-bridge.conf"),
        r#"{"cniVersion": "1.0.0", "name": "pods", "type": "bridge", "bridge": "cni0"}"#,
    )
    .unwrap();

    let id = format!("authz-agent-{}", std::process::id());
    let args = container::ctr_run_args(&pod, image_ref, image_config, &id, &kubelet).unwrap();
    eprintln!("{variant}: ctr {}", args.join(" "));
    // The container's output (the agent logs to stderr) and ctr's own, in one file.
    let log = dir.join("agent.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = ctd
        .ctr()
        .args(&args)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Probes as kubelet sends them: the manifest's paths and port, on the node's address.
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().unwrap().http_get.clone().unwrap();
        let port = match get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n as u16,
            other => panic!("probe port {other:?}"),
        };
        (SocketAddr::from(([127, 0, 0, 1], port)), get.path.unwrap())
    };
    let (ready_at, ready_path) = probe(&spec.readiness_probe);
    let (live_at, live_path) = probe(&spec.liveness_probe);
    let mut agent = Agent {
        child,
        admin: ready_at,
        dir: dir.clone(),
        log,
        bpffs,
        cleanup_on_drop: true,
    };
    let why = |agent: &Agent| {
        format!(
            "{variant}: {}\ncontainerd: {}",
            agent.log_text(),
            ctd.log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(ready_at, &ready_path), Ok((200, _))) {
        if let Ok(Some(st)) = agent.child.try_wait() {
            panic!("container exited with {st}: {}", why(&agent));
        }
        assert!(Instant::now() < deadline, "not ready: {}", why(&agent));
        std::thread::sleep(Duration::from_millis(100));
    }
    while agent.metric("authz_pods_enrolled") < 2.0 {
        assert!(
            Instant::now() < deadline,
            "pods not enrolled: {}",
            why(&agent)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The image's plugin, installed on the node and chained after the node's network (its
    // .conf made a .conflist); it runs on the node, outside the image.
    let list = node_conf.join("10-bridge.conflist");
    while !std::fs::read_to_string(&list).is_ok_and(|t| t.contains("authz-cni")) {
        assert!(
            Instant::now() < deadline,
            "{variant}: plugin not chained: {}",
            why(&agent)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let chained: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
    assert_eq!(chained["plugins"][0]["type"], "bridge");
    assert_eq!(chained["plugins"][1]["type"], "authz-cni");
    assert_eq!(chained["plugins"][1]["failMode"], "closed");
    let version = std::process::Command::new(dir.join("node/opt/cni/bin/authz-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("\"supportedVersions\""),
        "{variant}: the installed plugin runs on the node: {version:?}"
    );

    // The process runs as the manifest says, seen from the kernel.
    let pid = ctd.task_pid(&id).unwrap();
    let mut caps = container::effective_caps(pid).unwrap();
    caps.sort();
    match container::granted_caps(spec) {
        None => assert_eq!(
            caps,
            {
                let mut all = container::effective_caps(std::process::id()).unwrap();
                all.sort();
                all
            },
            "{variant}: privileged has every capability"
        ),
        Some(mut want) => {
            want.sort();
            assert_eq!(caps, want, "{variant}: exactly the chart's capabilities");
        }
    }
    assert!(
        container::root_read_only(pid).unwrap(),
        "{variant}: read-only root"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let no_new_privs = status
        .lines()
        .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"]));
    assert_eq!(
        no_new_privs,
        spec.security_context
            .as_ref()
            .unwrap()
            .allow_privilege_escalation
            == Some(false),
        "{variant}: no_new_privs as allowPrivilegeEscalation says"
    );

    // The FAQ, decided at the gateway pod whoever asks.
    let token = demo_jwt();
    let bad = tampered(&token);
    let base = format!("http://{}", gw.ip);
    for (who, host, in_pod) in [
        ("outside", Some(&internet), false),
        ("node", None, false),
        ("pod", Some(&sleep), true),
    ] {
        for (path, tok, want, body_want) in faq_skip_path_cases(&token, &bad) {
            let url = format!("{base}{path}");
            let h = tok.map(|t| format!("Authorization: Bearer {t}"));
            let mut args = vec![url.as_str()];
            if let Some(h) = &h {
                args.extend(["-H", h.as_str()]);
            }
            let (code, body) = match host {
                Some(host) => curl(host, in_pod, &args).unwrap_or_else(|e| (0, format!("{e:#}"))),
                None => curl_node(&args),
            };
            assert_eq!(
                code,
                want,
                "{variant}: {who} {path} token={}: {body}\n{}",
                tok.is_some(),
                why(&agent)
            );
            if let Some(b) = body_want {
                assert_eq!(body, b, "{variant}: {who} {path}");
            }
        }
    }
    assert!(
        agent.metric("authz_kernel_inbound_captured_total") >= 12.0,
        "{variant}: through the capture"
    );
    assert!(
        matches!(http_get(live_at, &live_path), Ok((200, _))),
        "{variant}: liveness"
    );
    assert!(
        api.forbidden().is_empty(),
        "{variant}: refused by RBAC: {:?}",
        api.forbidden()
    );

    // What the capabilities-only variant cannot do: set tcp_migrate_req in the pods' network
    // namespaces (its /proc/sys is read-only), so connections queued in a listener during a hot
    // restart are reset instead of moved. The agent says so.
    let migrate = Net::run(&gw, false, "cat", &["/proc/sys/net/ipv4/tcp_migrate_req"]).unwrap();
    let migrate = String::from_utf8_lossy(&migrate.stdout).trim().to_string();
    if container::granted_caps(spec).is_none() {
        assert_eq!(migrate, "1", "{variant}: tcp_migrate_req set in the pod");
    } else {
        assert_eq!(migrate, "0", "{variant}: tcp_migrate_req cannot be set");
        assert!(
            agent.log_text().contains("tcp_migrate_req"),
            "{variant}: reported: {}",
            agent.log_text()
        );
    }

    // SIGTERM reaches the agent through the runtime; it drains and exits cleanly.
    let st = agent.stop().unwrap();
    assert!(st.success(), "{variant}: exit {st}: {}", why(&agent));
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
