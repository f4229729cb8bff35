//! Kubernetes mode: what one update costs on a large cluster. The agent recomputes the desired
//! state after every burst of watch events, so this is the work per API server change.
//!   cargo bench -p authz-user --bench kube
use std::{path::PathBuf, sync::Arc};

use authz::kubernetes::{
    pods::{Pod, PodRecord},
    snapshot::{desired, Policies, Scope},
};
use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::core::DynamicObject;
use serde_json::json;

const PODS: usize = 10_000;
const SERVICES: usize = 2_000;
const NAMESPACES: usize = 100;
const POLICIES: usize = 1_000;

type Cluster = (Vec<Arc<PodRecord>>, Vec<Arc<Namespace>>, Vec<Arc<Service>>);

fn cluster() -> Cluster {
    let namespaces = (0..NAMESPACES)
        .map(|i| {
            Arc::new(
                serde_json::from_value(json!({"metadata": {"name": format!("ns{i}"),
                    "labels": {"authz.io/enforce": "enabled"}}}))
                .unwrap(),
            )
        })
        .collect();
    let pods = (0..PODS)
        .map(|i| {
            let ip = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256 + 1);
            let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("p{i}"), "namespace": format!("ns{}", i % NAMESPACES),
                                 "uid": format!("00000000-0000-4000-8000-{i:012}"),
                                 "labels": {"app": format!("app{}", i % SERVICES)}},
                    "spec": {"nodeName": format!("node{}", i % 100), "serviceAccountName": "sa",
                             "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                    "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                               "conditions": [{"type": "Ready", "status": "True"}]},
                }))
                .unwrap();
            Arc::new(PodRecord::from_pod(&pod).unwrap())
        })
        .collect();
    let services = (0..SERVICES)
        .map(|i| {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": format!("s{i}"), "namespace": format!("ns{}", i % NAMESPACES)},
                    "spec": {"clusterIP": format!("10.96.{}.{}", i / 256, i % 256 + 1),
                             "selector": {"app": format!("app{i}")},
                             "ports": [{"port": 80, "targetPort": "http"}]},
                }))
                .unwrap(),
            )
        })
        .collect();
    (pods, namespaces, services)
}

fn policies() -> Vec<Arc<DynamicObject>> {
    (0..POLICIES)
        .map(|i| {
            Arc::new(
                serde_json::from_value(json!({
                    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": format!("ap{i}"), "namespace": format!("ns{}", i % NAMESPACES),
                                 "uid": format!("u{i}"), "resourceVersion": "1"},
                    "spec": {"selector": {"matchLabels": {"app": format!("app{i}")}}, "action": "DENY",
                             "rules": [{"to": [{"operation": {"paths": ["/admin/*"], "methods": ["POST"]}}]}]},
                }))
                .unwrap(),
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (pods, namespaces, services) = cluster();
    let mut g = c.benchmark_group("kubernetes");
    g.sample_size(20);
    g.bench_function(
        "desired state: 10k pods, 2k services, 100 namespaces",
        |b| {
            b.iter(|| {
                desired(
                    &Scope::node("node7", true),
                    &pods,
                    &namespaces,
                    &services,
                    &mut |uid: &str| Ok((PathBuf::from(uid), PathBuf::from(uid)).into()),
                )
            })
        },
    );
    let objs = policies();
    g.bench_function("policies: first load of 1k AuthorizationPolicies", |b| {
        b.iter(|| Policies::default().update("security.istio.io/v1", &[], &objs))
    });
    let mut warm = Policies::default();
    warm.update("security.istio.io/v1", &[], &objs);
    g.bench_function("policies: 1k unchanged AuthorizationPolicies", |b| {
        b.iter(|| warm.update("security.istio.io/v1", &[], &objs))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
