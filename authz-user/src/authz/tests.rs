//! Table tests: policy YAML + request -> decision, per field and edge case.
use std::net::IpAddr;

use http::HeaderMap;

use super::*;
use crate::policy::{load_str, PolicySet};

fn policies(yaml: &str) -> Vec<Arc<Compiled>> {
    let mut set = PolicySet::default();
    load_str(yaml, "t.yaml", &mut set);
    assert!(set.is_valid(), "{:?}", set.problems);
    set.authorization_policies
        .iter()
        .map(|p| Arc::new(Compiled::try_new(p).unwrap()))
        .collect()
}

struct Req<'a> {
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    identity: Option<Identity>,
    peer: Option<Peer<'a>>,
    src: &'a str,
    port: u16,
    http: bool,
}

fn req<'a>() -> Req<'a> {
    Req {
        method: "GET",
        path: "/",
        host: "httpbin.foo",
        headers: vec![],
        identity: None,
        peer: Some(Peer::new("cluster.local", "foo", "sleep")),
        src: "10.0.0.2",
        port: 8000,
        http: true,
    }
}

fn ident(iss: &str, sub: &str, payload: serde_json::Value) -> Option<Identity> {
    Some(Identity {
        issuer: iss.into(),
        subject: sub.into(),
        payload: Arc::new(payload),
        space_delimited: Arc::new(vec!["scope".into(), "permission".into()]),
    })
}

fn allowed(p: &[Arc<Compiled>], r: &Req) -> bool {
    let mut h = HeaderMap::new();
    for (k, v) in &r.headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let src: IpAddr = r.src.parse().unwrap();
    let a = Attrs {
        http: r.http.then_some(HttpAttrs {
            method: r.method,
            path: r.path.split('?').next().unwrap_or(""),
            path_and_query: r.path,
            host: r.host,
            headers: &h,
            identity: r.identity.as_ref(),
        }),
        peer: r.peer.as_ref(),
        source_ip: Some(src),
        remote_ip: Some(src),
        dest_ip: Some("10.0.0.3".parse().unwrap()),
        dest_port: r.port,
        sni: None,
    };
    // A CUSTOM match is not the policies' to allow: the provider is asked.
    evaluate(p, &a).allowed && custom_match(p, &a).is_none()
}

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo}\n";

fn ap(spec: &str) -> Vec<Arc<Compiled>> {
    policies(&format!("{HEAD}spec:\n{spec}"))
}

#[test]
fn empty_spec_denies_all_and_empty_rule_allows_all() {
    assert!(allowed(&[], &req()), "no policy: allow");
    assert!(!allowed(&policies(&format!("{HEAD}spec: {{}}\n")), &req()));
    assert!(allowed(&ap("  rules: [{}]\n"), &req()));
    assert!(!allowed(&ap("  action: DENY\n  rules: [{}]\n"), &req()));
}

#[test]
fn deny_wins_over_allow_and_audit_changes_nothing() {
    let p = policies(&format!("{HEAD}spec:\n  rules: [{{}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: d, namespace: foo}}\nspec:\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [/admin]}}}}]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: foo}}\nspec:\n  action: AUDIT\n  rules: [{{}}]\n"));
    assert!(allowed(&p, &req()));
    assert!(!allowed(
        &p,
        &Req {
            path: "/admin",
            ..req()
        }
    ));
}

#[test]
fn dry_run_deny_does_not_deny() {
    let p = policies("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo, annotations: {istio.io/dry-run: \"true\"}}\nspec:\n  action: DENY\n  rules: [{}]\n");
    assert!(allowed(&p, &req()));
}

#[test]
fn custom_match_goes_to_the_provider() {
    let p = ap("  action: CUSTOM\n  provider: {name: ext}\n  rules: [{to: [{operation: {paths: [/x]}}]}]\n");
    assert!(!allowed(
        &p,
        &Req {
            path: "/x",
            ..req()
        }
    ));
    assert!(allowed(&p, &req()));
}

#[test]
fn operation_fields() {
    let paths = ap("  rules: [{to: [{operation: {paths: [/exact, \"/pre/*\", \"*/suf\", \"/t/{*}/x\", \"/g/{**}\"]}}]}]\n");
    for (p, want) in [
        ("/exact", true),
        ("/exact/", false),
        ("/EXACT", false),
        ("/pre/a/b", true),
        ("/a/suf", true),
        ("/t/1/x", true),
        ("/t/1/2/x", false),
        ("/g/", true),
        ("/g", false),
        ("/g/a/b", true),
        ("/other", false),
    ] {
        assert_eq!(allowed(&paths, &Req { path: p, ..req() }), want, "{p}");
    }
    let hosts = ap("  rules: [{to: [{operation: {hosts: [httpbin.foo, \"*.example.com\"]}}]}]\n");
    assert!(
        allowed(
            &hosts,
            &Req {
                host: "HTTPBIN.Foo",
                ..req()
            }
        ),
        "hosts are case-insensitive"
    );
    assert!(
        !allowed(
            &hosts,
            &Req {
                host: "httpbin.foo:8000",
                ..req()
            }
        ),
        "ports are not stripped"
    );
    assert!(allowed(
        &hosts,
        &Req {
            host: "a.example.com",
            ..req()
        }
    ));
    let methods = ap("  rules: [{to: [{operation: {methods: [GET], notPaths: [/private]}}]}]\n");
    assert!(allowed(&methods, &req()));
    assert!(
        !allowed(
            &methods,
            &Req {
                method: "get",
                ..req()
            }
        ),
        "methods are case-sensitive"
    );
    assert!(!allowed(
        &methods,
        &Req {
            path: "/private",
            ..req()
        }
    ));
    let ports = ap("  rules: [{to: [{operation: {ports: [\"8000\"]}}]}]\n");
    assert!(allowed(&ports, &req()));
    assert!(!allowed(
        &ports,
        &Req {
            port: 9000,
            ..req()
        }
    ));
}

#[test]
fn source_fields() {
    let p = ap("  rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]\n");
    assert!(allowed(&p, &req()));
    assert!(!allowed(
        &p,
        &Req {
            peer: None,
            ..req()
        }
    ));
    let p = ap("  rules: [{from: [{source: {namespaces: [\"f*\"], notNamespaces: [bar]}}]}]\n");
    assert!(allowed(&p, &req()));
    let p = ap("  rules: [{from: [{source: {serviceAccounts: [sleep, other/x]}}]}]\n");
    assert!(
        allowed(&p, &req()),
        "a bare service account is in the policy's namespace"
    );
    let p = ap("  rules: [{from: [{source: {serviceAccounts: [bar/sleep]}}]}]\n");
    assert!(!allowed(&p, &req()));
    let p =
        ap("  rules: [{from: [{source: {ipBlocks: [10.0.0.0/24], notIpBlocks: [10.0.0.9]}}]}]\n");
    assert!(allowed(&p, &req()));
    assert!(!allowed(
        &p,
        &Req {
            src: "10.0.0.9",
            ..req()
        }
    ));
    assert!(!allowed(
        &p,
        &Req {
            src: "10.1.0.1",
            ..req()
        }
    ));
}

#[test]
fn request_principals_split_at_the_last_slash() {
    let p = ap("  rules: [{from: [{source: {requestPrincipals: [\"https://issuer.example.com/path/user-1\"]}}]}]\n");
    assert!(allowed(
        &p,
        &Req {
            identity: ident(
                "https://issuer.example.com/path",
                "user-1",
                serde_json::json!({})
            ),
            ..req()
        }
    ));
    let star = ap("  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]\n");
    assert!(allowed(
        &star,
        &Req {
            identity: ident("i", "s", serde_json::json!({})),
            ..req()
        }
    ));
    assert!(
        !allowed(
            &star,
            &Req {
                identity: ident("i", "", serde_json::json!({})),
                ..req()
            }
        ),
        "no sub: * does not match"
    );
    assert!(!allowed(&star, &req()), "no token");
    let pre = ap("  rules: [{from: [{source: {requestPrincipals: [\"iss/*\", \"*x/sub\"]}}]}]\n");
    assert!(allowed(
        &pre,
        &Req {
            identity: ident("iss", "anything", serde_json::json!({})),
            ..req()
        }
    ));
    assert!(allowed(
        &pre,
        &Req {
            identity: ident("abx", "sub", serde_json::json!({})),
            ..req()
        }
    ));
    assert!(!allowed(
        &pre,
        &Req {
            identity: ident("abx", "other", serde_json::json!({})),
            ..req()
        }
    ));
}

#[test]
fn when_conditions() {
    let c = |when: &str| ap(&format!("  rules: [{{when: [{when}]}}]\n"));
    let tenant = c("{key: \"request.headers[x-tenant]\", values: [\"a*\"], notValues: [ab]}");
    assert!(allowed(
        &tenant,
        &Req {
            headers: vec![("x-tenant", "abc")],
            ..req()
        }
    ));
    assert!(
        !allowed(
            &tenant,
            &Req {
                headers: vec![("x-tenant", "abc"), ("x-tenant", "ab")],
                ..req()
            }
        ),
        "each value of a repeated header"
    );
    assert!(!allowed(&tenant, &req()));
    let present = c("{key: \"request.headers[x-a]\", values: [\"*\"]}");
    assert!(
        allowed(
            &present,
            &Req {
                headers: vec![("x-a", "")],
                ..req()
            }
        ),
        "* on headers = present"
    );
    let groups = c("{key: \"request.auth.claims[groups]\", values: [group1]}");
    assert!(allowed(
        &groups,
        &Req {
            identity: ident(
                "i",
                "s",
                serde_json::json!({"groups": ["group1", "group2"]})
            ),
            ..req()
        }
    ));
    assert!(!allowed(
        &groups,
        &Req {
            identity: ident("i", "s", serde_json::json!({"groups": "group10"})),
            ..req()
        }
    ));
    let nested = c("{key: \"request.auth.claims[nested][key1]\", values: [v1]}");
    assert!(allowed(
        &nested,
        &Req {
            identity: ident("i", "s", serde_json::json!({"nested": {"key1": "v1"}})),
            ..req()
        }
    ));
    let scope = c("{key: \"request.auth.claims[scope]\", values: [write]}");
    assert!(
        allowed(
            &scope,
            &Req {
                identity: ident("i", "s", serde_json::json!({"scope": "read write"})),
                ..req()
            }
        ),
        "scope is space-delimited"
    );
    let aud = c("{key: request.auth.audiences, values: [bar]}");
    assert!(allowed(
        &aud,
        &Req {
            identity: ident("i", "s", serde_json::json!({"aud": ["foo", "bar"]})),
            ..req()
        }
    ));
    let ip = c("{key: source.ip, values: [10.0.0.0/8]}");
    assert!(allowed(&ip, &req()));
    let port = c("{key: destination.port, notValues: [\"8000\"]}");
    assert!(!allowed(&port, &req()));
    let ns = c("{key: source.namespace, values: [foo]}");
    assert!(allowed(&ns, &req()));
    let principal = c("{key: request.auth.principal, values: [i/s]}");
    assert!(allowed(
        &principal,
        &Req {
            identity: ident("i", "s", serde_json::json!({})),
            ..req()
        }
    ));
}

#[test]
fn tcp_drops_http_allow_rules_and_ignores_http_fields_in_deny() {
    let allow = ap(
        "  rules: [{to: [{operation: {paths: [/a]}}]}, {to: [{operation: {ports: [\"9000\"]}}]}]\n",
    );
    assert!(
        !allowed(
            &allow,
            &Req {
                http: false,
                ..req()
            }
        ),
        "the path rule is dropped, the port rule does not match"
    );
    assert!(allowed(
        &allow,
        &Req {
            http: false,
            port: 9000,
            ..req()
        }
    ));
    let deny = ap(
        "  action: DENY\n  rules: [{to: [{operation: {methods: [POST], ports: [\"8000\"]}}]}]\n",
    );
    assert!(
        !allowed(
            &deny,
            &Req {
                http: false,
                ..req()
            }
        ),
        "DENY methods+ports denies all TCP on the port"
    );
    assert!(
        allowed(
            &deny,
            &Req {
                http: true,
                ..req()
            }
        ),
        "GET over HTTP is not denied"
    );
}

#[test]
fn validation_errors_name_file_and_line() {
    let mut set = PolicySet::default();
    load_str(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: foo}\nspec:\n  action: DENY\n---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: y, namespace: foo}\nspec:\n  rules:\n  - when:\n    - key: request.bogus\n      values: [a]\n  - from:\n    - source:\n        ipBlocks: [10.0.0.300]\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: z}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: foo}\nspec:\n  jwtRules:\n  - audiences: [a]\n  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Gateway, name: g}]\n",
        "p.yaml",
        &mut set,
    );
    let text: Vec<String> = set.problems.iter().map(|p| p.to_string()).collect();
    let has = |s: &str| text.iter().any(|t| t.starts_with(s));
    assert!(
        has("p.yaml:5: AuthorizationPolicy foo/x: a DENY policy without rules"),
        "{text:#?}"
    );
    assert!(
        has("p.yaml:13: AuthorizationPolicy foo/y: rules[0]: when[0]: unknown attribute"),
        "{text:#?}"
    );
    assert!(
        has("p.yaml:17: AuthorizationPolicy foo/y: rules[1]: from[0].source: ipBlocks"),
        "{text:#?}"
    );
    assert!(
        has("p.yaml:19: warning: skipped: v1 ConfigMap"),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("issuer or jwksUri must be set")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("only one of targetRefs or workloadSelector")),
        "{text:#?}"
    );
    let mut set = PolicySet::default();
    load_str("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n  rulez: []\n", "q.yaml", &mut set);
    assert!(
        set.problems[0]
            .to_string()
            .starts_with("q.yaml:5: spec: unknown field `rulez`"),
        "{:?}",
        set.problems
    );
}

#[test]
fn conditions_the_engine_cannot_read_are_refused_or_never_match() {
    // Pseudo-headers are matched as Envoy does: against the authority, method, path and scheme.
    let c = |when: &str| ap(&format!("  rules: [{{when: [{when}]}}]\n"));
    let authority = c("{key: \"request.headers[:authority]\", values: [\"admin.*\"]}");
    assert!(allowed(
        &authority,
        &Req {
            host: "admin.internal",
            ..req()
        }
    ));
    assert!(!allowed(&authority, &req()));
    let method = c("{key: \"request.headers[:method]\", values: [POST]}");
    assert!(!allowed(&method, &req()));
    assert!(allowed(
        &method,
        &Req {
            method: "POST",
            ..req()
        }
    ));
    let path = c("{key: \"request.headers[:path]\", values: [\"/a?x=*\"]}");
    assert!(allowed(
        &path,
        &Req {
            path: "/a?x=1",
            ..req()
        }
    ));
    assert!(!allowed(&path, &req()));
    let scheme = c("{key: \"request.headers[:scheme]\", values: [https]}");
    assert!(!allowed(&scheme, &req()), "plaintext is http");
    // A name no request can carry: accepted by Istio, never matches: ALLOW gains nothing, DENY
    // denies nothing more.
    for when in [
        "{key: \"request.headers[x bad]\", values: [\"*\"]}",
        "{key: \"request.headers[x bad]\", notValues: [a]}",
        "{key: \"request.headers[:other]\", values: [\"*\"]}",
    ] {
        assert!(!allowed(&c(when), &req()), "{when}");
        let deny = ap(&format!("  action: DENY\n  rules: [{{when: [{when}]}}]\n"));
        assert!(allowed(&deny, &req()), "{when}");
    }
}

#[test]
fn values_istio_refuses_are_refused_not_dropped() {
    for (spec, want) in [
        (
            "  rules: [{to: [{operation: {ports: [\"80x\"]}}]}]\n",
            "rules[0]: to[0].operation: ports: \"80x\" is not a port",
        ),
        (
            "  rules: [{to: [{operation: {notPaths: [\"/a/{x}\"]}}]}]\n",
            "rules[0]: to[0].operation: notPaths: \"/a/{x}\"",
        ),
        (
            "  rules: [{from: [{source: {notIpBlocks: [nope]}}]}]\n",
            "rules[0]: from[0].source: notIpBlocks: \"nope\" is not",
        ),
        (
            "  rules: [{when: [{key: destination.port, values: [\"-1\"]}]}]\n",
            "rules[0]: destination.port values: \"-1\" is not a port",
        ),
        (
            "  rules: [{when: [{key: \"request.headers[]\", values: [a]}]}]\n",
            "rules[0]: when[0]: \"request.headers[]\" must be",
        ),
        (
            "  rules: [{when: [{key: request.auth.claims, values: [a]}]}]\n",
            "rules[0]: when[0]: \"request.auth.claims\" must be",
        ),
        (
            "  rules: [{when: [{key: source.ip}]}]\n",
            "rules[0]: when[0]: source.ip: at least one of values",
        ),
        (
            "  rules: [{from: [{}]}]\n",
            "rules[0]: from[0]: source must not be empty",
        ),
        (
            "  rules: [{to: [{operation: {}}]}]\n",
            "rules[0]: to[0]: operation must not be empty",
        ),
        (
            "  rules: [{from: []}]\n",
            "rules[0]: from must not be empty",
        ),
    ] {
        let mut set = PolicySet::default();
        load_str(&format!("{HEAD}spec:\n{spec}"), "t.yaml", &mut set);
        let text: Vec<String> = set.errors().map(|p| p.to_string()).collect();
        assert!(text.iter().any(|t| t.contains(want)), "{spec}: {text:#?}");
        assert!(set.authorization_policies.is_empty(), "{spec}: not loaded");
    }
}

/// A small deterministic generator (xorshift), so the property runs the same on every machine.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

const VALUES: &[&str] = &[
    "a",
    "a*",
    "*b",
    "*",
    "/x",
    "/x/*",
    "GET",
    "POST",
    "foo",
    "10.0.0.0/8",
    "8000",
    "80",
    "i/s",
    "admin.internal",
];
const KEYS: &[&str] = &[
    "request.headers[x-a]",
    "request.headers[:authority]",
    "request.headers[:method]",
    "request.headers[:path]",
    "request.headers[:scheme]",
    "request.headers[x bad]",
    "request.auth.claims[groups]",
    "request.auth.principal",
    "source.namespace",
    "source.ip",
    "destination.port",
    "connection.sni",
    "request.bogus",
];

fn gen_condition(g: &mut Gen) -> String {
    let key = g.pick(KEYS);
    let vals = |g: &mut Gen| {
        (0..1 + g.next() % 2)
            .map(|_| format!("\"{}\"", g.pick(VALUES)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match g.next() % 3 {
        0 => format!("{{key: \"{key}\", values: [{}]}}", vals(g)),
        1 => format!("{{key: \"{key}\", notValues: [{}]}}", vals(g)),
        _ => format!(
            "{{key: \"{key}\", values: [{}], notValues: [{}]}}",
            vals(g),
            vals(g)
        ),
    }
}

fn gen_requests(g: &mut Gen) -> Vec<Req<'static>> {
    (0..24)
        .map(|_| Req {
            method: g.pick(&["GET", "POST"]),
            path: g.pick(&["/x", "/x/y", "/a", "/x?q=1"]),
            host: g.pick(&["admin.internal", "foo", "a"]),
            headers: match g.next() % 3 {
                0 => vec![],
                1 => vec![("x-a", g.pick(&["a", "ab", "b"]))],
                _ => vec![("x-a", "a"), ("x-a", "xb")],
            },
            identity: ident("i", "s", serde_json::json!({"groups": ["a", "foo"]})),
            port: if g.next().is_multiple_of(2) { 8000 } else { 80 },
            ..req()
        })
        .collect()
}

#[test]
fn property_every_condition_is_compiled_and_conditions_only_narrow_allow() {
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for _ in 0..400 {
        let n = (g.next() % 3) as usize;
        let conds: Vec<String> = (0..n).map(|_| gen_condition(&mut g)).collect();
        let extra = gen_condition(&mut g);
        let yaml = |conds: &[String]| {
            format!(
                "{HEAD}spec:\n  rules: [{{to: [{{operation: {{methods: [GET, POST]}}}}], when: [{}]}}]\n",
                conds.join(", ")
            )
        };
        let load = |y: &str| {
            let mut set = PolicySet::default();
            load_str(y, "t.yaml", &mut set);
            set
        };
        let base = load(&yaml(&conds));
        let mut more = conds.clone();
        more.push(extra);
        let narrowed = load(&yaml(&more));
        for set in [&base, &narrowed] {
            // Accepted by validation <=> compiled, and nothing is dropped on the way.
            for p in &set.authorization_policies {
                let c = Compiled::try_new(p).expect("validated policies compile");
                let yaml_conds: Vec<usize> = p
                    .spec
                    .rules
                    .iter()
                    .flatten()
                    .map(|r| r.when.as_ref().map_or(0, Vec::len))
                    .collect();
                let compiled: Vec<usize> = c.matcher_counts().iter().map(|(_, w)| *w).collect();
                assert_eq!(compiled, yaml_conds);
                assert_eq!(c.matcher_counts()[0].0, 2, "methods: both values kept");
            }
        }
        if !(base.is_valid() && narrowed.is_valid()) {
            continue;
        }
        accepted += 1;
        let (b, m) = (
            Arc::new(Compiled::try_new(&base.authorization_policies[0]).unwrap()),
            Arc::new(Compiled::try_new(&narrowed.authorization_policies[0]).unwrap()),
        );
        for r in gen_requests(&mut g) {
            if allowed(std::slice::from_ref(&m), &r) {
                assert!(
                    allowed(std::slice::from_ref(&b), &r),
                    "a condition made ALLOW allow more: {more:?}"
                );
            }
        }
    }
    assert!(
        accepted > 100,
        "the generator reaches accepted policies: {accepted}"
    );
}

fn verdict(p: &[Arc<Compiled>], r: &Req) -> Verdict {
    let h = HeaderMap::new();
    let src: IpAddr = r.src.parse().unwrap();
    let a = Attrs {
        http: Some(HttpAttrs {
            method: r.method,
            path: r.path,
            path_and_query: r.path,
            host: r.host,
            headers: &h,
            identity: r.identity.as_ref(),
        }),
        peer: r.peer.as_ref(),
        source_ip: Some(src),
        remote_ip: Some(src),
        dest_ip: None,
        dest_port: r.port,
        sni: None,
    };
    evaluate(p, &a)
}

#[test]
fn audit_and_dry_run_are_reported_with_their_rule() {
    let p = policies(concat!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit-admin, namespace: foo}\nspec:\n  action: AUDIT\n  rules: [{to: [{operation: {paths: [/x]}}]}, {to: [{operation: {paths: [\"/admin*\"]}}]}]\n",
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: trial-deny, namespace: foo, annotations: {istio.io/dry-run: \"true\"}}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]\n",
    ));
    let admin = Req {
        path: "/admin/users",
        ..req()
    };
    let v = verdict(&p, &admin);
    assert!(v.allowed, "neither AUDIT nor dry-run changes the decision");
    assert_eq!(
        v.audits,
        vec![RuleMatch {
            policy: "foo/audit-admin".into(),
            rule: 1
        }]
    );
    let dry = v.dry_run.unwrap();
    assert!(!dry.allowed, "the dry-run DENY would deny");
    assert_eq!(
        dry.decided_by,
        Some(RuleMatch {
            policy: "foo/trial-deny".into(),
            rule: 0
        })
    );
    let v = verdict(&p, &req());
    assert!(v.audits.is_empty());
    assert_eq!(
        v.dry_run,
        Some(DryRun {
            allowed: true,
            decided_by: None
        })
    );
    // No dry-run policy for the workload: nothing to report.
    assert!(verdict(&ap("  rules: [{}]\n"), &req()).dry_run.is_none());
    // A dry-run ALLOW: enforced, it would deny what it does not match.
    let p = policies("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: trial-allow, namespace: foo, annotations: {istio.io/dry-run: \"true\"}}\nspec:\n  rules: [{to: [{operation: {paths: [/ok]}}]}]\n");
    let v = verdict(&p, &req());
    assert!(v.allowed);
    assert_eq!(
        v.dry_run,
        Some(DryRun {
            allowed: false,
            decided_by: None
        })
    );
}
