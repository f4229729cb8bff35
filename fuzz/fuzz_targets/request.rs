//! A request head (method, target, headers) through the whole engine: extraction, framing
//! checks, normalization, authorization. Never panics.
#![no_main]
use std::{collections::BTreeMap, sync::Arc};

use authz::{
    config::PathNormalization,
    engine::{Conn, Engine, Request},
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
    let mut headers = http::HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(v.trim())) {
                headers.append(k, v);
            }
        }
    }
    let mut set = PolicySet::default();
    load_str(POLICIES, "p.yaml", &mut set);
    let engine = Engine::new(PolicyIndex::build(&set, "istio-system", None), Arc::new(TokenCache::new(16)), None, PathNormalization::Base, "cluster.local");
    let w = Workload { name: "w".into(), namespace: "foo".into(), labels: BTreeMap::new(), service_account: "w".into() };
    let c = Conn { destination: &w, source: None, source_ip: None, dest_ip: None, dest_port: 80 };
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("w.foo").to_string();
    let r = Request { method, target, host: &host, headers: &headers, http2: false };
    let d = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(engine.decide_http(&c, &r));
    assert!(d.allowed || d.status >= 400);
});
