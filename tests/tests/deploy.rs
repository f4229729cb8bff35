//! `deploy/`: the manifests and the rendered Helm chart are complete Kubernetes objects. Each
//! document is read as its k8s-openapi type and written back: a field the type does not know
//! (a typo) would be lost on the way, so the round trip must give the document back unchanged.
//! No cluster needed; Helm renders the chart (`cargo xtask test` installs it).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use authz_tests::{helm, helm_template};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    serde::de::DeserializeOwned,
};
use serde_json::Value;

#[derive(Default, Debug)]
struct Objects {
    daemonsets: Vec<DaemonSet>,
    config_maps: Vec<ConfigMap>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    namespaces: Vec<Namespace>,
}

fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value, origin: &str) -> T {
    let t: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
        panic!(
            "{origin}: {} is not a valid {}: {e}",
            doc["metadata"]["name"], doc["kind"]
        )
    });
    let back = strip_nulls(serde_json::to_value(&t).unwrap());
    if let Some(at) = first_difference(&strip_nulls(doc.clone()), &back, String::new()) {
        panic!(
            "{origin}: {} {}: {at} is lost when read as its type (unknown or misplaced field?)",
            doc["kind"], doc["metadata"]["name"]
        );
    }
    t
}

/// The JSON path of the first place where `b` differs from `a`.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.iter().find_map(|(k, v)| match y.get(k) {
            Some(w) => first_difference(v, w, format!("{at}.{k}")),
            None => Some(format!("{at}.{k}")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}[{i}]"))),
        _ => (a != b).then_some(at),
    }
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        v => v,
    }
}

fn parse(text: &str, origin: &str, out: &mut Objects) {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde_json::to_value(
            serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin}: {e}")),
        )
        .unwrap();
        if v.is_null() {
            continue;
        }
        match v["kind"].as_str() {
            Some("DaemonSet") => out.daemonsets.push(typed(&v, origin)),
            Some("ConfigMap") => out.config_maps.push(typed(&v, origin)),
            Some("ServiceAccount") => out.service_accounts.push(typed(&v, origin)),
            Some("ClusterRole") => out.cluster_roles.push(typed(&v, origin)),
            Some("ClusterRoleBinding") => out.bindings.push(typed(&v, origin)),
            Some("Role") => out.roles.push(typed(&v, origin)),
            Some("RoleBinding") => out.role_bindings.push(typed(&v, origin)),
            Some("Namespace") => out.namespaces.push(typed(&v, origin)),
            other => panic!("{origin}: unexpected kind {other:?}"),
        }
    }
}
use serde::Deserialize;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Objects {
    let mut out = Objects::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        parse(
            &std::fs::read_to_string(&f).unwrap(),
            &f.display().to_string(),
            &mut out,
        );
    }
    out
}

fn render(helm: &Path, set: &[&str]) -> Objects {
    let text = helm_template(helm, set);
    let mut objs = Objects::default();
    parse(&text, "helm template", &mut objs);
    objs
}

/// What must hold of any rendering: the agent can run as the issue and the README say.
fn check_complete(o: &Objects, origin: &str) {
    assert_eq!(o.daemonsets.len(), 1, "{origin}");
    assert_eq!(o.config_maps.len(), 1, "{origin}");
    assert_eq!(o.service_accounts.len(), 1, "{origin}");
    assert_eq!(o.cluster_roles.len(), 1, "{origin}");
    assert_eq!(o.bindings.len(), 1, "{origin}");
    let ds = &o.daemonsets[0];
    let ns = ds.metadata.namespace.as_deref().unwrap();
    let sa = &o.service_accounts[0];
    assert_eq!(sa.metadata.namespace.as_deref(), Some(ns));
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name, "{origin}");
    assert_eq!(
        pod.host_pid,
        Some(true),
        "{origin}: pods' processes give their netns"
    );
    assert!(
        pod.tolerations.as_ref().is_some_and(|t| !t.is_empty()),
        "{origin}: runs on every node"
    );
    // The binding gives the role to the agent's service account.
    let b = &o.bindings[0];
    assert_eq!(
        b.role_ref.name,
        o.cluster_roles[0].metadata.name.clone().unwrap()
    );
    let subject = &b.subjects.as_ref().unwrap()[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace.as_deref(), Some(ns));
    // Least privilege: read what is watched, write Events only.
    let mut verbs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in o.cluster_roles[0].rules.as_ref().unwrap() {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                verbs.insert(format!("{g}/{res}"), r.verbs.clone());
            }
        }
    }
    let read = vec!["list".to_string(), "watch".into()];
    for res in [
        "/pods",
        "/services",
        "/namespaces",
        "security.istio.io/requestauthentications",
        "security.istio.io/authorizationpolicies",
    ] {
        assert_eq!(verbs.remove(res), Some(read.clone()), "{origin}: {res}");
    }
    assert_eq!(
        verbs.remove("events.k8s.io/events"),
        Some(vec!["create".to_string(), "patch".into()])
    );
    assert!(verbs.is_empty(), "{origin}: more than needed: {verbs:?}");
    // Istio's mesh ConfigMap, read in its namespace only.
    assert_eq!((o.roles.len(), o.role_bindings.len()), (1, 1), "{origin}");
    let (role, rb) = (&o.roles[0], &o.role_bindings[0]);
    let rules = role.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1, "{origin}");
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["configmaps".to_string()][..])
    );
    assert_eq!(rules[0].verbs, read, "{origin}");
    assert_eq!(rb.role_ref.name, role.metadata.name.clone().unwrap());
    assert_eq!(rb.metadata.namespace, role.metadata.namespace);
    let subject = &rb.subjects.as_ref().unwrap()[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace.as_deref(), Some(ns));

    // The config the agent will read is valid, in Kubernetes mode, and agrees with the pod.
    let cm = &o.config_maps[0];
    let text = &cm.data.as_ref().unwrap()["agent.yaml"];
    let cfg = authz::config::Config::parse(text, origin).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.kubernetes.enabled);
    assert_eq!(
        role.metadata.namespace.as_deref(),
        Some(cfg.kubernetes.mesh_config.namespace.as_str()),
        "{origin}: the Role is where the agent reads the mesh ConfigMap"
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.args.as_ref().unwrap(),
        &["run", "--config", "/etc/authz/agent.yaml"]
    );
    let mounts: BTreeMap<&str, &str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    let volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let host_path = |mount: &str| -> String {
        let v = volumes[mounts
            .get(mount)
            .unwrap_or_else(|| panic!("{origin}: nothing mounted at {mount}"))];
        v.host_path
            .as_ref()
            .map(|h| h.path.clone())
            .unwrap_or_default()
    };
    assert_eq!(host_path("/sys/fs/bpf"), "/sys/fs/bpf");
    assert_eq!(host_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
    assert_eq!(host_path("/var/run/netns"), "/var/run/netns");
    assert_eq!(
        host_path(cfg.kubernetes.proc_root.to_str().unwrap()),
        "/proc"
    );
    assert!(cfg.agent.bpffs.starts_with("/sys/fs/bpf"));
    let cm_volume = volumes[mounts["/etc/authz"]].config_map.as_ref().unwrap();
    assert_eq!(Some(&cm_volume.name), cm.metadata.name.as_ref());
    // Probes on the admin port the config opens, on all addresses (the kubelet is not in the pod).
    assert!(
        cfg.agent.admin.ip().is_unspecified(),
        "{origin}: admin must be reachable by the kubelet"
    );
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/ready"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                cfg.agent.admin.port() as i32
            )
        );
    }
    let env: BTreeMap<&str, &k8s_openapi::api::core::v1::EnvVar> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let node = env["NODE_NAME"]
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(node.field_path, "spec.nodeName");
    let res = c.resources.as_ref().unwrap();
    assert!(res
        .requests
        .as_ref()
        .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")));
    // Rolling updates surge (the new agent adopts the old one's pins beside it): no host port
    // may keep the surge pod off the node.
    let ru = ds
        .spec
        .as_ref()
        .unwrap()
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(ru.max_surge, Some(IntOrString::Int(1)), "{origin}");
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)), "{origin}");
    assert!(
        pod.containers.iter().all(|c| c.ports.is_none()),
        "{origin}: a port on the host network is a host port"
    );
    let grace = pod.termination_grace_period_seconds.unwrap() as u64;
    assert!(
        grace > cfg.agent.drain_timeout.as_secs(),
        "{origin}: room to drain"
    );
}

#[test]
fn manifests_are_complete_objects() {
    let o = manifests();
    assert_eq!(o.namespaces.len(), 1);
    check_complete(&o, "deploy/kubernetes");
    let c = &o.daemonsets[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
}

#[test]
fn helm_chart_renders_the_same_objects() {
    let Some(helm) = helm() else { return };
    let lint = std::process::Command::new(&helm)
        .arg("lint")
        .arg(deploy_dir().join("helm/authz-agent"))
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&lint.stdout)
    );
    let chart = render(&helm, &[]);
    check_complete(&chart, "helm template");
    // With the default values the chart gives what deploy/kubernetes has.
    let plain = manifests();
    let pod =
        |o: &Objects| -> PodSpec { o.daemonsets[0].spec.clone().unwrap().template.spec.unwrap() };
    assert_eq!(pod(&chart), pod(&plain), "DaemonSet pod spec");
    assert_eq!(chart.cluster_roles[0].rules, plain.cluster_roles[0].rules);
    assert_eq!(chart.roles[0].rules, plain.roles[0].rules);
    assert_eq!(chart.config_maps[0].data, plain.config_maps[0].data);
}

#[test]
fn helm_values_change_what_they_say() {
    let Some(helm) = helm() else { return };
    let o = render(
        &helm,
        &[
            "privileged=false",
            "agent.adminPort=9901",
            "kubernetes.events=false",
            "image.tag=9.9.9",
            "agent.failMode=open",
        ],
    );
    check_complete_without_events(&o);
    let pod = o.daemonsets[0].spec.clone().unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/authz-agent/authz-agent:9.9.9")
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert!(caps.add.as_ref().unwrap().iter().any(|c| c == "BPF"));
    assert_eq!(caps.drop.as_ref().unwrap(), &["ALL"]);
    let bpffs = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .unwrap();
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "Bidirectional needs privileged"
    );
    let cfg = authz::config::Config::parse(
        &o.config_maps[0].data.as_ref().unwrap()["agent.yaml"],
        "chart",
    )
    .unwrap();
    assert_eq!(cfg.agent.admin.port(), 9901);
    assert!(!cfg.kubernetes.events);
    assert_eq!(cfg.agent.fail_mode, authz::config::FailMode::Open);
}

/// As check_complete, for a rendering with Events off (no events rule).
fn check_complete_without_events(o: &Objects) {
    let rules = o.cluster_roles[0].rules.as_ref().unwrap();
    assert!(rules
        .iter()
        .all(|r| !r.api_groups.iter().flatten().any(|g| g == "events.k8s.io")));
    let cm = &o.config_maps[0];
    authz::config::Config::parse(&cm.data.as_ref().unwrap()["agent.yaml"], "chart").unwrap();
    assert_eq!(o.daemonsets.len(), 1);
}
