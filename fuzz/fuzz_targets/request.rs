//! A request head (method, target, headers) through what the data path does to it: one
//! authority and no hop-by-hop headers (`head::normalize`), then the whole engine: extraction,
//! framing checks, normalization, authorization. Never panics; what is decided is what would be
//! forwarded.
#![no_main]
use std::{collections::BTreeMap, sync::Arc};

use authz::{
    config::PathNormalization,
    engine::{Conn, Engine, Request},
    head,
    jwt::cache::TokenCache,
    policy::{load_str, PolicyIndex, PolicySet},
    registry::Workload,
};
use libfuzzer_sys::fuzz_target;

const POLICIES: &str = concat!(
    "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: foo}\nspec:\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    fromHeaders: [{name: authorization, prefix: 'Bearer '}, {name: x-token}]\n    fromParams: [access_token]\n    fromCookies: [session]\n    outputPayloadToHeader: x-payload\n    jwks: '",
    include_str!("../../tests/data/istio-samples/jwks.json"),
    "'\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap, namespace: foo}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {notRequestPrincipals: ['*']}}]\n    to: [{operation: {notPaths: [/public/*], hosts: ['*.foo']}}]\n    when: [{key: 'request.headers[x-tenant]', notValues: ['a*']}]\n"
);

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let (Some(method), Some(target)) = (lines.next(), lines.next()) else { return };
    let (Ok(m), Ok(uri)) = (http::Method::from_bytes(method.as_bytes()), http::Uri::try_from(target)) else { return };
    let mut req = http::Request::builder().method(m).uri(uri).body(()).unwrap();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(v.trim())) {
                req.headers_mut().append(k, v);
            }
        }
    }
    let Ok(h) = head::normalize(&mut req) else { return };
    // The invariants the data path relies on: one Host, equal to the authority decided on; no
    // h2c and no hop-by-hop header left but an allowed upgrade's.
    let hosts: Vec<_> = req.headers().get_all("host").iter().collect();
    assert!(hosts.len() <= 1);
    if req.uri().authority().is_some() && *req.method() != http::Method::CONNECT {
        panic!("absolute form left for the upstream");
    }
    if let Some(v) = hosts.first() {
        assert_eq!(v.as_bytes(), h.authority.as_bytes());
    }
    for name in ["keep-alive", "proxy-connection", "http2-settings"] {
        assert!(!req.headers().contains_key(name));
    }
    if let Some(u) = req.headers().get("upgrade") {
        assert!(h.upgrade);
        assert!(u.to_str().unwrap().split(',').all(|t| !t.trim().eq_ignore_ascii_case("h2c")));
    }
    let mut set = PolicySet::default();
    load_str(POLICIES, "p.yaml", &mut set);
    let engine = Engine::new(PolicyIndex::build(&set, "istio-system", None), Arc::new(TokenCache::new(16)), None, PathNormalization::Base, "cluster.local");
    let w = Workload { name: "w".into(), namespace: "foo".into(), labels: BTreeMap::new().into(), service_account: "w".into() };
    let pol = engine.policies_for(&w);
    let c = Conn { policies: &pol, source: None, destination: None, source_ip: None, dest_ip: None, dest_port: 80 };
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let r = Request { method: req.method().as_str(), target: &target, host: &h.authority, headers: req.headers(), http2: false, body: None };
    let d = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(engine.decide_http(&c, &r));
    assert!(d.allowed() || d.status() >= 400);
});
