//! Known ways Istio and Envoy were talked past, through the engine (the code the data path and
//! `check` share). Each case expects the Istio-safe answer.
#![cfg(feature = "testkeys")]
use std::{collections::BTreeMap, sync::Arc};

use authz::{
    config::PathNormalization,
    engine::{Conn, Decision, Engine, Request},
    jwt::{cache::TokenCache, testkeys::TestKey},
    policy::{load_str, PolicyIndex, PolicySet},
    registry::Workload,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine as _};
use http::HeaderMap;
use serde_json::json;

fn engine(yaml: &str, mode: PathNormalization) -> Engine {
    let mut set = PolicySet::default();
    load_str(yaml, "t.yaml", &mut set);
    assert!(set.is_valid(), "{:?}", set.problems);
    Engine::new(
        PolicyIndex::build(&set, "istio-system", None),
        Arc::new(TokenCache::new(100)),
        None,
        mode,
        "cluster.local",
    )
}

fn decide(
    e: &Engine,
    method: &str,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Decision {
    let w = Workload {
        name: "app".into(),
        namespace: "foo".into(),
        labels: BTreeMap::from([("app".into(), "app".into())]).into(),
        service_account: "app".into(),
    };
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let pol = e.policies_for(&w);
    let c = Conn {
        policies: &pol,
        source: None,
        destination: None,
        source_ip: None,
        dest_ip: None,
        dest_port: 80,
    };
    let r = Request {
        method,
        target,
        host,
        headers: &h,
        http2: false,
        body: None,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(e.decide_http(&c, &r))
}

const DENY_ADMIN: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: foo}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\", \"/admin/*\"]}}]}]\n";
const ALLOW_PUBLIC: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-public, namespace: foo}\nspec:\n  rules: [{to: [{operation: {notPaths: [\"/admin\", \"/admin/*\"]}}]}]\n";

#[test]
fn path_tricks_cannot_reach_admin() {
    for mode in [
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        for yaml in [DENY_ADMIN, ALLOW_PUBLIC] {
            let e = engine(yaml, mode);
            for p in [
                "/admin",
                "/admin/x",
                "/public/../admin",
                "/./admin",
                "/%61dmin",
                "/admin#frag",
                "/admin?x=1",
                "/../../admin",
                "/public\\..\\admin",
                "/%2e%2e/admin",
            ] {
                let d = decide(&e, "GET", p, "app", &[]);
                assert!(!d.allowed(), "{mode:?} {p}: {d:?}");
            }
            // What the policy does not name is left alone, and forwarded in the form it matched.
            for (p, fwd) in [("/public/a", "/public/a"), ("/public/./b", "/public/b")] {
                let d = decide(&e, "GET", p, "app", &[]);
                assert!(d.allowed(), "{mode:?} {p}");
                assert_eq!(
                    d.forward().and_then(|f| f.target.clone()).as_deref(),
                    Some(fwd)
                );
            }
        }
    }
    // Encoded slashes and double slashes: with DECODE_AND_MERGE_SLASHES they are /admin too.
    let e = engine(DENY_ADMIN, PathNormalization::DecodeAndMergeSlashes);
    for p in ["//admin", "/%2Fadmin", "/%2fadmin", "/%5Cadmin"] {
        assert!(!decide(&e, "GET", p, "app", &[]).allowed(), "{p}");
    }
    // With BASE they stay as they are and reach the upstream unchanged, so the upstream sees
    // exactly the path that did not match (Istio's documented behaviour for BASE).
    let e = engine(DENY_ADMIN, PathNormalization::Base);
    assert_eq!(
        decide(&e, "GET", "/%2Fadmin", "app", &[])
            .forward()
            .and_then(|f| f.target.clone())
            .as_deref(),
        Some("/%2Fadmin")
    );
    // NUL, invalid percent-encoding (a stray % that decoding would turn into a new escape:
    // /adm%6%39n -> /adm%69n, which an upstream decodes to /admin) and malformed requests: 400.
    for p in [
        "/admin%00",
        "/a%00b",
        "*",
        "/adm%6%39n",
        "/admin%",
        "/admin%zz",
        "/%%32%65%2e/admin",
    ] {
        assert_eq!(decide(&e, "GET", p, "app", &[]).status(), 400, "{p}");
    }
    assert_eq!(decide(&e, "delete", "/x", "app", &[]).status(), 400);
}

#[test]
fn host_tricks() {
    let e = engine("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: h, namespace: foo}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {hosts: [\"secret.example.com\", \"secret.example.com:*\"]}}]}]\n", PathNormalization::Base);
    for h in [
        "secret.example.com",
        "SECRET.Example.COM",
        "secret.example.com:80",
        "Secret.Example.Com:8080",
    ] {
        assert!(!decide(&e, "GET", "/", h, &[]).allowed(), "{h}");
    }
}

#[test]
fn token_tricks() {
    let k = TestKey::new("RS256", "k");
    let ra = format!("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: iss\n    jwks: '{}'\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: need, namespace: foo}}\nspec:\n  rules: [{{from: [{{source: {{requestPrincipals: [\"iss/*\"]}}}}]}}]\n", TestKey::jwks(&[&k]));
    let e = engine(&ra, PathNormalization::Base);
    let good = k.token(json!({"iss": "iss", "sub": "s"}));
    assert!(decide(
        &e,
        "GET",
        "/",
        "app",
        &[("authorization", &format!("Bearer {good}"))]
    )
    .allowed());
    let b = |s: &str| B64.encode(s.as_bytes());
    let payload = b(r#"{"iss":"iss","sub":"s"}"#);
    let hs_with_rsa_key = {
        let signed = format!("{}.{payload}", b(r#"{"alg":"HS256","kid":"k"}"#));
        let key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            TestKey::jwks(&[&k]).as_bytes(),
        );
        format!(
            "{signed}.{}",
            B64.encode(aws_lc_rs::hmac::sign(&key, signed.as_bytes()).as_ref())
        )
    };
    let cases = [
        format!("{}.{payload}.", b(r#"{"alg":"none"}"#)),
        format!("{}.{payload}.", b(r#"{"alg":"RS256","kid":"k"}"#)),
        hs_with_rsa_key,
        format!(
            "{}.{payload}.{}",
            b(r#"{"alg":"RS256","kid":"k","jku":"http://evil/jwks"}"#),
            good.rsplit('.').next().unwrap()
        ),
        format!(
            "{}.{payload}.{}",
            b(r#"{"alg":"RS256","kid":"../../etc/passwd"}"#),
            good.rsplit('.').next().unwrap()
        ),
        format!(
            "{}.{payload}.{}",
            b(r#"{"alg":"RS256","kid":"k","crit":["x"]}"#),
            good.rsplit('.').next().unwrap()
        ),
        format!(
            "{}.{}.{}",
            good.split('.').next().unwrap(),
            b(r#"{"iss":"iss","sub":"s","sub":"admin"}"#),
            good.rsplit('.').next().unwrap()
        ),
        format!(
            "{}.{}.{}",
            good.split('.').next().unwrap(),
            b(&format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
            good.rsplit('.').next().unwrap()
        ),
        "A".repeat(100_000),
    ];
    for (i, t) in cases.iter().enumerate() {
        let d = decide(
            &e,
            "GET",
            "/",
            "app",
            &[("authorization", &format!("Bearer {t}"))],
        );
        assert_eq!(d.status(), 401, "case {i}: {d:?}");
    }
    // Two Authorization headers (one valid): never treated as two separate tokens.
    let d = decide(
        &e,
        "GET",
        "/",
        "app",
        &[
            ("authorization", &format!("Bearer {good}")),
            ("authorization", "Bearer junk"),
        ],
    );
    assert_eq!(d.status(), 401);
    // A valid token next to a bad one in another location: every presented token must verify.
    let d = decide(
        &e,
        "GET",
        "/?access_token=bad.bad.bad",
        "app",
        &[("authorization", &format!("Bearer {good}"))],
    );
    assert_eq!(d.status(), 401);
}

#[test]
fn header_conditions_see_every_value() {
    let e = engine("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: t, namespace: foo}\nspec:\n  rules: [{when: [{key: \"request.headers[x-tenant]\", values: [\"a*\"], notValues: [ab]}]}]\n", PathNormalization::Base);
    assert!(decide(&e, "GET", "/", "app", &[("x-tenant", "abc")]).allowed());
    assert!(!decide(
        &e,
        "GET",
        "/",
        "app",
        &[("x-tenant", "abc"), ("x-tenant", "ab")]
    )
    .allowed());
}

/// A raw request head as the data path sees it: normalised by `head::normalize` (one authority,
/// hop-by-hop headers gone), then decided on exactly what would be forwarded.
fn decide_raw(
    e: &Engine,
    version: http::Version,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> (
    Result<authz::head::Head, authz::head::BadHead>,
    Option<Decision>,
    http::Request<()>,
) {
    let mut b = http::Request::builder()
        .version(version)
        .method(method)
        .uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut req = b.body(()).unwrap();
    let head = authz::head::normalize(&mut req);
    let d = head.as_ref().ok().map(|h| {
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let hs: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        decide(e, method, &target, &h.authority, &hs)
    });
    (head, d, req)
}

#[test]
fn data_path_classes_from_inside_a_pod() {
    const NO_ADMIN_HOST: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin-host, namespace: foo}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {hosts: [\"admin.internal\", \"admin.internal:*\"]}}]}]\n";
    let e = engine(NO_ADMIN_HOST, PathNormalization::Base);
    let v11 = http::Version::HTTP_11;
    // Two authorities: the absolute-form target's wins, in the decision and upstream.
    let (_, d, req) = decide_raw(
        &e,
        v11,
        "GET",
        "http://admin.internal/x",
        &[("host", "public")],
    );
    assert_eq!(d.unwrap().status(), 403);
    assert_eq!(req.headers()["host"], "admin.internal");
    let (_, d, req) = decide_raw(
        &e,
        v11,
        "GET",
        "http://public/x",
        &[("host", "admin.internal")],
    );
    assert!(d.unwrap().allowed());
    assert_eq!(req.uri().to_string(), "/x");
    assert_eq!(req.headers()["host"], "public");
    // HTTP/2: :authority and a disagreeing host header are refused.
    let (h, d, _) = decide_raw(
        &e,
        http::Version::HTTP_2,
        "GET",
        "http://admin.internal/x",
        &[("host", "public")],
    );
    assert!(h.is_err() && d.is_none());
    let (h, _, _) = decide_raw(
        &e,
        v11,
        "GET",
        "/x",
        &[("host", "a"), ("host", "admin.internal")],
    );
    assert!(h.is_err(), "two Host headers");
    // h2c: the upgrade never reaches the upstream; the request stays HTTP/1.1.
    let (h, d, req) = decide_raw(
        &e,
        v11,
        "GET",
        "/x",
        &[
            ("host", "public"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "H2C"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ],
    );
    assert!(d.unwrap().allowed() && !h.unwrap().upgrade);
    assert!(
        req.headers().get("upgrade").is_none() && req.headers().get("http2-settings").is_none()
    );
    // CONNECT to a denied authority is denied; to another, flagged for a 404, never a tunnel.
    let (h, d, _) = decide_raw(
        &e,
        v11,
        "CONNECT",
        "admin.internal:443",
        &[("host", "admin.internal:443")],
    );
    assert_eq!(d.unwrap().status(), 403);
    assert!(h.unwrap().connect);
}
