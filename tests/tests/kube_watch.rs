//! The Kubernetes source against an API server over real HTTP (the in-process fake): what the
//! stores hold as objects are added, changed and deleted, across 410 Gone, API server
//! restarts and bookmarks. No root needed.
use std::time::{Duration, Instant};

use authz::kubernetes::{events::Events, snapshot, snapshot::Scope, Cluster};
use authz_tests::fakeapi::{self, FakeApi};
use serde_json::json;

struct Fixture {
    api: FakeApi,
    rt: tokio::runtime::Runtime,
    cluster: Cluster,
    client: kube::Client,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture(api: FakeApi) -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "authz-kube-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let kc = dir.join("kubeconfig");
    api.write_kubeconfig(&kc).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (client, cluster) = rt.block_on(async {
        let client = authz::kubernetes::client(Some(&kc)).await.unwrap();
        let cluster = tokio::time::timeout(
            Duration::from_secs(10),
            Cluster::start(
                client.clone(),
                None,
                ("istio-system".into(), "istio".into()),
            ),
        )
        .await
        .expect("stores ready within 10 s")
        .unwrap();
        (client, cluster)
    });
    Fixture {
        api,
        rt,
        cluster,
        client,
        _dir: TempDir(dir),
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn policy_names(c: &Cluster) -> Vec<String> {
    let mut v: Vec<String> = c
        .authorization_policies
        .state()
        .iter()
        .map(|o| o.metadata.name.clone().unwrap_or_default())
        .collect();
    v.sort();
    v
}

/// AuthorizationPolicy foo/<name> denying `path`.
fn deny_ap(name: &str, path: &str) -> serde_json::Value {
    fakeapi::istio("AuthorizationPolicy", "foo", name, deny(&[path]))
}

fn deny(paths: &[&str]) -> serde_json::Value {
    json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": paths}}]}]})
}

#[test]
fn policies_follow_add_change_delete() {
    let api = FakeApi::start().unwrap();
    api.apply(deny_ap("a", "/a"));
    let f = fixture(api);
    assert_eq!(f.cluster.istio_api_version, "security.istio.io/v1");
    assert_eq!(policy_names(&f.cluster), ["a"], "the first list");

    let mut pols = snapshot::Policies::default();
    let set = |pols: &mut snapshot::Policies| {
        pols.update(
            &f.cluster.istio_api_version,
            &f.cluster.request_authentications.state(),
            &f.cluster.authorization_policies.state(),
        )
        .0
    };
    f.api.apply(deny_ap("b", "/b"));
    eventually("b added", || policy_names(&f.cluster) == ["a", "b"]);

    f.api.apply(deny_ap("b", "/changed"));
    eventually("b changed", || {
        set(&mut pols)
            .authorization_policies
            .iter()
            .any(|p| p.name == "b" && format!("{:?}", p.spec).contains("/changed"))
    });

    f.api.delete("AuthorizationPolicy", "foo", "a");
    eventually("a deleted", || policy_names(&f.cluster) == ["b"]);
    assert_eq!(set(&mut pols).authorization_policies.len(), 1);

    f.api.apply(fakeapi::istio(
        "RequestAuthentication",
        "foo",
        "jwt",
        json!({"jwtRules": [{"issuer": "i", "jwks": "{\"keys\":[]}"}]}),
    ));
    eventually("RequestAuthentication added", || {
        f.cluster.request_authentications.state().len() == 1
    });
    // The watch never had to list again.
    assert_eq!(f.api.lists("authorizationpolicies"), 1);
}

#[test]
fn pods_services_and_namespaces_make_the_desired_state() {
    let api = FakeApi::start().unwrap();
    api.apply(fakeapi::namespace("mesh", true));
    api.apply(fakeapi::namespace("other", false));
    api.apply(fakeapi::pod(
        "mesh",
        "local",
        "11111111-0000-4000-8000-000000000001",
        "node-a",
        "10.1.0.1",
        json!({"app": "a"}),
        "sa-a",
    ));
    api.apply(fakeapi::pod(
        "mesh",
        "remote",
        "11111111-0000-4000-8000-000000000002",
        "node-b",
        "10.1.0.2",
        json!({"app": "b"}),
        "sa-b",
    ));
    api.apply(fakeapi::pod(
        "other",
        "outside",
        "11111111-0000-4000-8000-000000000003",
        "node-a",
        "10.1.0.3",
        json!({}),
        "default",
    ));
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "jwks", "namespace": "auth"},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80, "targetPort": 8080}]}}));
    let f = fixture(api);
    let mut locate = |uid: &str| {
        Ok((
            std::path::PathBuf::from(format!("/cg/{uid}")),
            std::path::PathBuf::from(format!("/ns/{uid}")),
        )
            .into())
    };
    let d = f.cluster.desired(&Scope::node("node-a", true), &mut locate);
    let names = |v: &[authz::world::Peer]| {
        v.iter()
            .map(|p| p.workload.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&d.peers),
        ["local", "remote"],
        "protected: mesh pods, any node"
    );
    let enrolled: Vec<&str> = d.pods.iter().map(|p| p.spec.name.as_str()).collect();
    assert_eq!(
        enrolled,
        ["local", "outside"],
        "steered: every pod of this node"
    );
    assert_eq!(d.pods[0].spec.service_account, "sa-a");
    assert_eq!(d.services.len(), 1);
    assert_eq!(d.services[0].ports[0].target_port, Some(8080));
    // The store keeps the agent's record of each pod: what it reads, parsed.
    let p = f
        .cluster
        .pods
        .state()
        .into_iter()
        .find(|p| p.name() == "local")
        .unwrap();
    assert_eq!((&*p.node, p.ready, p.running), ("node-a", true, true));

    // Labelling a namespace brings its pods in; a pod leaving takes its address out.
    f.api.apply(fakeapi::namespace("other", true));
    f.api.delete("Pod", "mesh", "remote");
    eventually("namespace labelled and pod gone", || {
        let d = f.cluster.desired(&Scope::node("node-a", true), &mut locate);
        names(&d.peers) == ["local", "outside"] && d.pods.len() == 2
    });
}

#[test]
fn relists_after_410_and_keeps_the_last_state_while_away() {
    let api = FakeApi::start().unwrap();
    api.apply(deny_ap("a", "/a"));
    let f = fixture(api);
    let lists = f.api.lists("authorizationpolicies");
    f.api.stop();
    // While the API server is away the store keeps what it had.
    f.api.delete("AuthorizationPolicy", "foo", "a");
    f.api.apply(deny_ap("b", "/b"));
    f.api.compact();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        policy_names(&f.cluster),
        ["a"],
        "last state stays while the API server is away"
    );
    f.api.resume();
    eventually("relisted after 410", || policy_names(&f.cluster) == ["b"]);
    assert!(
        f.api.lists("authorizationpolicies") > lists,
        "a 410 makes the watcher list again"
    );
}

#[test]
fn restart_resumes_the_watch_without_a_relist() {
    let api = FakeApi::start().unwrap();
    api.apply(deny_ap("a", "/a"));
    let f = fixture(api);
    let lists = f.api.lists("authorizationpolicies");
    let watches = f.api.watches("authorizationpolicies");
    f.api.stop();
    f.api.apply(deny_ap("b", "/b"));
    std::thread::sleep(Duration::from_millis(500));
    f.api.resume();
    eventually("the change made while down arrives", || {
        policy_names(&f.cluster) == ["a", "b"]
    });
    assert!(f.api.watches("authorizationpolicies") > watches);
    assert_eq!(
        f.api.lists("authorizationpolicies"),
        lists,
        "resumed from its resourceVersion"
    );
}

#[test]
fn bookmarks_move_the_resume_point() {
    let api = FakeApi::start().unwrap();
    api.apply(deny_ap("a", "/a"));
    let f = fixture(api);
    let lists = f.api.lists("authorizationpolicies");
    // Other collections move the resourceVersion on; only a bookmark tells the policy watch.
    for i in 0..5 {
        f.api.apply(fakeapi::namespace(&format!("ns{i}"), false));
    }
    std::thread::sleep(Duration::from_millis(700));
    f.api.compact();
    f.api.restart(Duration::from_millis(50));
    f.api.apply(deny_ap("b", "/b"));
    eventually("b arrives", || policy_names(&f.cluster) == ["a", "b"]);
    assert_eq!(
        f.api.lists("authorizationpolicies"),
        lists,
        "resumed from the bookmark, above the compaction: no 410, no relist"
    );
    // The namespaces watch, which saw those events itself, resumed as well.
    assert_eq!(f.api.lists("namespaces"), 1);
}

#[test]
fn older_istio_serves_v1beta1_only() {
    let api = FakeApi::start().unwrap();
    api.serve_istio_versions(&["v1beta1"]);
    api.apply(deny_ap("a", "/a"));
    let f = fixture(api);
    assert_eq!(f.cluster.istio_api_version, "security.istio.io/v1beta1");
    assert_eq!(policy_names(&f.cluster), ["a"]);
    let (set, reports) = snapshot::Policies::default().update(
        &f.cluster.istio_api_version,
        &[],
        &f.cluster.authorization_policies.state(),
    );
    assert!(reports.is_empty(), "{reports:?}");
    assert_eq!(set.authorization_policies.len(), 1);
}

#[test]
fn invalid_policy_becomes_an_event_on_the_object() {
    let api = FakeApi::start().unwrap();
    api.apply(fakeapi::istio(
        "AuthorizationPolicy",
        "foo",
        "bad",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["GET"], "hosts": []}}]}], "selector": {"matchLabels": {"app": "x"}}, "targetRefs": [{"kind": "Gateway", "name": "g"}]}),
    ));
    let f = fixture(api);
    let (set, reports) = snapshot::Policies::default().update(
        &f.cluster.istio_api_version,
        &[],
        &f.cluster.authorization_policies.state(),
    );
    assert!(
        set.authorization_policies.is_empty(),
        "an invalid policy is not enforced"
    );
    assert_eq!(reports.len(), 1);
    let message = reports[0]
        .problems
        .iter()
        .find(|p| !p.warning)
        .unwrap()
        .message
        .clone();
    assert!(
        message.contains("only one of targetRefs or workloadSelector"),
        "{message}"
    );
    let events = Events::new(f.client.clone(), "node-a");
    f.rt.block_on(events.publish(&reports[0]));
    let posted = f.api.events();
    assert_eq!(posted.len(), 1, "{posted:?}");
    let ev = &posted[0];
    assert_eq!(ev["regarding"]["kind"], "AuthorizationPolicy");
    assert_eq!(ev["regarding"]["name"], "bad");
    assert_eq!(ev["regarding"]["namespace"], "foo");
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "InvalidPolicy");
    assert!(ev["note"].as_str().unwrap().contains(&message), "{ev}");
}

#[test]
fn the_api_server_holds_rbac_and_answers_with_status_objects() {
    let api = FakeApi::start().unwrap();
    let get = |path: &str| authz_tests::http_get(api.addr, path).unwrap();
    // What deploy/kubernetes/rbac.yaml does not grant is 403 with a Status, served or not.
    let (code, body) = get("/api/v1/secrets");
    assert_eq!(code, 403, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (st["kind"].as_str(), st["reason"].as_str()),
        (Some("Status"), Some("Forbidden"))
    );
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("system:serviceaccount:authz-system:authz-agent"),
        "{st}"
    );
    assert_eq!(get("/api/v1/namespaces/foo/configmaps").0, 403);
    assert_eq!(api.forbidden(), ["list /secrets", "list /configmaps"]);
    // What it grants is served; a watch must resume from a list's resourceVersion.
    let (code, list) = get("/api/v1/pods");
    assert_eq!(code, 200, "{list}");
    let (code, body) = get("/api/v1/pods?watch=true");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("resourceVersion"), "{body}");
    // Every grant of the role is listed as unused until a request uses it.
    let unused = api.unused_grants();
    assert!(!unused.contains(&"list /pods".to_string()), "{unused:?}");
    assert!(
        unused.contains(&"watch security.istio.io/authorizationpolicies".to_string()),
        "{unused:?}"
    );
}

/// A large first list comes in pages, as a real API server serves it (`limit` and `continue`),
/// and every pod is in the store once.
#[test]
fn the_first_list_is_paged() {
    let api = FakeApi::start().unwrap();
    for i in 0..1200 {
        api.apply(fakeapi::pod(
            "mesh",
            &format!("p{i:04}"),
            &format!("00000000-0000-4000-8000-{i:012}"),
            "node-b",
            &format!("10.2.{}.{}", i / 250, i % 250 + 1),
            json!({"app": "a"}),
            "default",
        ));
    }
    let f = fixture(api);
    assert_eq!(f.cluster.pods.len(), 1200);
    assert!(
        f.api.lists("pods") >= 3,
        "pages of at most 500: {} lists",
        f.api.lists("pods")
    );
}
