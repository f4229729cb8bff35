//! Engine benchmarks: signature verification per algorithm, a cached token check, one decision
//! among 10 / 1,000 / 10,000 policies (10 of which select the workload), one decision with 1 /
//! 10 / 100 / 1,000 issuers (`jwtRules`) on the workload, and loading 10,000 policies. `cargo bench -p authz-user --features testkeys --bench engine`.
use std::{collections::BTreeMap, hint::black_box, sync::Arc, time::Duration};

use authz::{
    config::PathNormalization,
    engine::{Conn, Engine, Request},
    jwt::{
        self,
        cache::TokenCache,
        keys::Jwks,
        testkeys::{TestKey, ALGS},
    },
    policy::{load_str, PolicyIndex, PolicySet},
    registry::Workload,
};
use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BenchmarkGroup, Criterion,
};
use http::HeaderMap;
use serde_json::json;

fn verify(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(20);
    for alg in ALGS {
        let k = TestKey::new(alg, "k");
        let jwks = Jwks::parse(TestKey::jwks(&[&k]).as_bytes()).unwrap();
        let t = k.token(json!({"iss": "i", "sub": "s", "exp": jwt::now_secs() + 3600}));
        g.bench_function(alg, |b| {
            b.iter(|| {
                let (c, signed, sig) = jwt::parse(black_box(&t)).unwrap();
                jwt::verify_signature(&c, signed, sig, &jwks).unwrap();
            })
        });
    }
    g.finish();
}

/// `n` AuthorizationPolicies over 100 namespaces; 10 select app=httpbin in foo, the rest other apps.
fn mesh(n: usize, with_ra: &TestKey) -> String {
    let mut y = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n  - issuer: iss\n    jwks: '{}'\n",
        TestKey::jwks(&[with_ra])
    );
    for i in 0..n {
        let (ns, app) = if i < 10 {
            ("foo".to_string(), "httpbin".to_string())
        } else {
            (format!("ns{}", i % 100), format!("app{i}"))
        };
        y.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: {}\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"iss/*\"]}}}}]\n    to: [{{operation: {{methods: [GET], paths: [\"/api/{i}/*\"]}}}}]\n    when: [{{key: \"request.headers[x-tenant]\", values: [\"t{i}\"]}}]\n",
            if i % 2 == 0 { "ALLOW" } else { "DENY" }
        ));
    }
    y
}

/// The group's timing, shared by the decision benchmarks.
fn decision_group<'c>(c: &'c mut Criterion, name: &str) -> BenchmarkGroup<'c, WallTime> {
    let mut g = c.benchmark_group(name);
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(20);
    g
}

/// Loads `yaml`, checks that a GET of `target` with `headers` to httpbin (app=httpbin in foo) is
/// allowed, then benchmarks that decision as `name`.
fn bench_decision(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    name: String,
    yaml: &str,
    target: &str,
    headers: &HeaderMap,
) {
    let w = Workload {
        name: "httpbin".into(),
        namespace: "foo".into(),
        labels: BTreeMap::from([("app".into(), "httpbin".into())]).into(),
        service_account: "httpbin".into(),
    };
    let mut set = PolicySet::default();
    load_str(yaml, "bench.yaml", &mut set);
    assert!(set.is_valid(), "{:?}", set.problems.first());
    let engine = Engine::new(
        PolicyIndex::build(&set, "istio-system", None),
        Arc::new(TokenCache::new(10_000)),
        None,
        PathNormalization::Base,
        "cluster.local",
    );
    let pol = engine.policies_for(&w);
    let conn = Conn {
        policies: &pol,
        source: None,
        destination: None,
        source_ip: None,
        dest_ip: None,
        dest_port: 8000,
    };
    let req = Request {
        method: "GET",
        target,
        host: "httpbin.foo",
        headers,
        http2: false,
        body: None,
    };
    assert!(rt.block_on(engine.decide_http(&conn, &req)).allowed());
    g.bench_function(name, |b| {
        b.iter(|| rt.block_on(engine.decide_http(&conn, black_box(&req))))
    });
}

fn decide(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let k = TestKey::new("RS256", "k");
    let token = format!(
        "Bearer {}",
        k.token(json!({"iss": "iss", "sub": "s", "exp": jwt::now_secs() + 3600}))
    );
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, token.parse().unwrap());
    headers.insert("x-tenant", "t0".parse().unwrap());
    let mut g = decision_group(c, "decide");
    for n in [10usize, 1_000, 10_000] {
        bench_decision(
            &mut g,
            &rt,
            format!("cached_token_{n}_policies"),
            &mesh(n, &k),
            "/api/0/items?x=1",
            &headers,
        );
    }
    g.finish();
}

/// One RequestAuthentication with `n` jwtRules of distinct issuers (`iss-0000`...), all with
/// `key`'s key set, and an ALLOW for any request principal.
fn issuers(n: usize, key: &TestKey) -> String {
    let jwks = TestKey::jwks(&[key]);
    let mut y = String::from(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: foo}\nspec:\n  selector: {matchLabels: {app: httpbin}}\n  jwtRules:\n",
    );
    for i in 0..n {
        y.push_str(&format!("  - issuer: iss-{i:04}\n    jwks: '{jwks}'\n"));
    }
    y.push_str("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: any, namespace: foo}\nspec:\n  selector: {matchLabels: {app: httpbin}}\n  rules:\n  - from: [{source: {requestPrincipals: [\"*\"]}}]\n");
    y
}

/// A decision for a token from the last issuer in order, with 1 to 1,000 issuers on the
/// workload: the cost should not grow with their number (Envoy's does, Istio issue 49691).
fn many_issuers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let k = TestKey::new("RS256", "k");
    let mut g = decision_group(c, "issuers");
    for n in [1usize, 10, 100, 1_000] {
        let token = k.token(
            json!({"iss": format!("iss-{:04}", n - 1), "sub": "s", "exp": jwt::now_secs() + 3600}),
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        bench_decision(
            &mut g,
            &rt,
            format!("cached_token_{n}_issuers"),
            &issuers(n, &k),
            "/",
            &headers,
        );
    }
    g.finish();
}

fn cached_check(c: &mut Criterion) {
    let k = TestKey::new("RS256", "k");
    let t = k.token(json!({"iss": "iss", "sub": "s", "exp": jwt::now_secs() + 3600}));
    let (claims, _, _) = jwt::parse(&t).unwrap();
    let cache = TokenCache::new(10_000);
    cache.put(&t, 1, 0, &std::sync::Arc::new(claims), jwt::now_secs());
    let now = jwt::now_secs();
    c.bench_function("cached_token_check", |b| {
        b.iter(|| {
            let c = cache.get(black_box(&t), 1, 0).unwrap();
            jwt::check_time(&c, now).unwrap();
            jwt::check_audience(&c, &[]).unwrap();
        })
    });
}

fn load(c: &mut Criterion) {
    let k = TestKey::new("HS256", "k");
    let yaml = mesh(10_000, &k);
    let mut g = c.benchmark_group("load");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(100));
    g.bench_function("10000_policies", |b| {
        b.iter(|| {
            let mut set = PolicySet::default();
            load_str(black_box(&yaml), "bench.yaml", &mut set);
            PolicyIndex::build(&set, "istio-system", None)
        })
    });
    g.finish();
}

criterion_group!(benches, verify, cached_check, decide, many_issuers, load);
criterion_main!(benches);
