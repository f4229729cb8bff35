use super::*;

fn resolver() -> Resolver {
    Arc::new(|host: &str| {
        (host == "ext-authz.foo.svc.cluster.local").then(|| vec!["10.0.0.9".parse().unwrap()])
    })
}

fn spec(yaml: &str) -> ProviderSpec {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn compiles_istio_sample_providers() {
    let http = Provider::compile(
        &spec("name: sample-ext-authz-http\nenvoyExtAuthzHttp:\n  service: ext-authz.foo.svc.cluster.local\n  port: \"8000\"\n  includeRequestHeadersInCheck: [\"x-ext-authz\"]\n"),
        resolver(),
    )
    .unwrap();
    assert_eq!(http.port, 8000);
    assert_eq!(http.timeout, DEFAULT_TIMEOUT);
    assert_eq!(http.status_on_error, 403);
    assert!(!http.fail_open);
    assert_eq!(http.address().unwrap(), "10.0.0.9:8000".parse().unwrap());
    let Kind::Http(s) = &http.kind else { panic!() };
    assert!(s.request_headers.matches("x-ext-authz"));
    assert!(!s.request_headers.matches("x-other"));
    let grpc = Provider::compile(
        &spec("name: g\nenvoyExtAuthzGrpc:\n  service: foo/ext-authz.foo.svc.cluster.local\n  port: 9000\n  timeout: 0.5s\n  failOpen: true\n  statusOnError: \"503\"\n"),
        resolver(),
    )
    .unwrap();
    assert_eq!(grpc.timeout, Duration::from_millis(500));
    assert_eq!(grpc.status_on_error, 503);
    assert_eq!(grpc.authority(), "ext-authz.foo.svc.cluster.local");
    assert_eq!(grpc.address().unwrap(), "10.0.0.9:9000".parse().unwrap());
}

#[test]
fn refuses_what_istiod_refuses() {
    let cases = [
        ("name: Bad\nenvoyExtAuthzGrpc: {service: a, port: 1}\n", "uppercase"),
        ("name: a\nenvoyExtAuthzGrpc: {service: a, port: 0}\n", "port must be in the range"),
        ("name: a\nenvoyExtAuthzGrpc: {service: a, port: 1, statusOnError: \"999\"}\n", "unsupported statusOnError"),
        ("name: a\nenvoyExtAuthzHttp: {service: a, port: 1, pathPrefix: check}\n", "pathPrefix must begin"),
        ("name: a\nenvoyExtAuthzHttp: {service: a, port: 1, headersToUpstreamOnAllow: [\"*\"]}\n", "single wildcard"),
        ("name: a\nenvoyExtAuthzHttp: {service: a, port: 1, timeout: soon}\n", "invalid timeout"),
        ("name: a\n", "exactly one of"),
    ];
    for (yaml, want) in cases {
        let errors = Provider::compile(&spec(yaml), resolver()).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.contains(want)
                    || (want == "uppercase" && e.contains("invalid character"))),
            "{yaml}: {errors:?}"
        );
    }
    // Unknown fields are refused by the schema itself.
    assert!(serde_yaml::from_str::<ProviderSpec>(
        "name: a\nenvoyExtAuthzHttp: {service: a, port: 1, bogus: 1}\n"
    )
    .is_err());
}

fn http_settings(yaml: &str) -> HttpSettings {
    match Provider::compile(&spec(yaml), resolver()).unwrap().kind {
        Kind::Http(s) => s,
        Kind::Grpc => unreachable!(),
    }
}

fn headers(list: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in list {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

#[test]
fn http_check_request_carries_what_envoy_sends() {
    let s = http_settings("name: a\nenvoyExtAuthzHttp:\n  service: a\n  port: 1\n  pathPrefix: /check\n  includeRequestHeadersInCheck: [\"X-Ext-*\"]\n  includeAdditionalHeadersInCheck: {x-added: yes, x-ext-authz: overwritten}\n");
    let h = headers(&[
        ("authorization", "Bearer t"),
        ("x-ext-authz", "allow"),
        ("x-ext-other", "1"),
        ("x-ext-other", "2"),
        ("cookie", "secret"),
    ]);
    let input = CheckInput {
        method: "POST",
        path: "/headers?a=1",
        host: "httpbin.foo",
        headers: &h,
        http2: false,
        source: None,
        destination: None,
        source_principal: None,
        destination_principal: None,
        body: None,
    };
    let r = http_service::request("127.0.0.1:9".parse().unwrap(), &s, &input).unwrap();
    assert_eq!(r.method(), "POST");
    assert_eq!(
        r.uri().path_and_query().unwrap().as_str(),
        "/check/headers?a=1"
    );
    let rh = r.headers();
    assert_eq!(rh["host"], "httpbin.foo");
    assert_eq!(rh["content-length"], "0");
    assert_eq!(rh["authorization"], "Bearer t");
    assert_eq!(rh["x-ext-other"], "1,2");
    assert_eq!(rh["x-ext-authz"], "overwritten");
    assert_eq!(rh["x-added"], "yes");
    assert!(
        !rh.contains_key("cookie"),
        "only listed headers go to the provider"
    );
}

#[test]
fn http_answers_read_as_envoy_reads_them() {
    let s = http_settings("name: a\nenvoyExtAuthzHttp:\n  service: a\n  port: 1\n  headersToUpstreamOnAllow: [x-user, x-remove-me]\n  headersToDownstreamOnAllow: [x-trace]\n  headersToDownstreamOnDeny: [x-reason]\n");
    let ok = http_service::answer(
        &s,
        http::StatusCode::OK,
        &headers(&[
            ("x-user", "alice"),
            ("x-trace", "t1"),
            ("x-other", "no"),
            ("x-envoy-auth-headers-to-remove", "cookie, x-remove-me"),
            ("transfer-encoding", "chunked"),
        ]),
        Bytes::new(),
    );
    let Answer::Allowed(a) = ok else {
        panic!("{ok:?}")
    };
    assert_eq!(
        a.upstream,
        vec![
            HeaderOp::Set("x-user".parse().unwrap(), "alice".parse().unwrap()),
            HeaderOp::Remove("cookie".parse().unwrap()),
            HeaderOp::Remove("x-remove-me".parse().unwrap()),
        ]
    );
    assert_eq!(
        a.downstream,
        vec![HeaderOp::Append(
            "x-trace".parse().unwrap(),
            "t1".parse().unwrap()
        )]
    );
    let denied = http_service::answer(
        &s,
        http::StatusCode::UNAUTHORIZED,
        &headers(&[
            ("x-reason", "nope"),
            ("www-authenticate", "Basic"),
            ("x-other", "no"),
            ("content-length", "4"),
        ]),
        Bytes::from_static(b"nope"),
    );
    let Answer::Denied(d) = denied else { panic!() };
    assert_eq!(d.status, 401);
    assert_eq!(d.body, Bytes::from_static(b"nope"));
    let names: Vec<&str> = d.headers.iter().map(|o| o.name().as_str()).collect();
    assert_eq!(names, ["x-reason", "www-authenticate"]);
    // Without headersToDownstreamOnDeny every header but host goes back to the client.
    let all = http_settings("name: a\nenvoyExtAuthzHttp: {service: a, port: 1}\n");
    let Answer::Denied(d) = http_service::answer(
        &all,
        http::StatusCode::FORBIDDEN,
        &headers(&[("x-a", "1"), ("host", "h")]),
        Bytes::new(),
    ) else {
        panic!()
    };
    assert_eq!(
        d.headers
            .iter()
            .map(|o| o.name().as_str())
            .collect::<Vec<_>>(),
        ["x-a"]
    );
    // A 5xx is the provider failing, not a deny.
    assert!(matches!(
        http_service::answer(
            &all,
            http::StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            Bytes::new()
        ),
        Answer::Error(_)
    ));
}

#[test]
fn grpc_answers_read_as_envoy_reads_them() {
    use proto::*;
    let hv = |k: &str, v: &str, append: Option<bool>| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.into(),
            value: v.into(),
            raw_value: vec![],
        }),
        append: append.map(|value| BoolValue { value }),
        append_action: 0,
    };
    let ok = grpc::answer(CheckResponse {
        status: Some(RpcStatus {
            code: 0,
            message: String::new(),
        }),
        http_response: Some(HttpResponse::Ok(OkHttpResponse {
            headers: vec![
                hv("x-a", "1", None),
                hv("x-b", "2", Some(true)),
                hv("content-length", "9", None),
            ],
            headers_to_remove: vec!["cookie".into()],
            response_headers_to_add: vec![hv("x-c", "3", None)],
        })),
    });
    assert_eq!(
        ok,
        Answer::Allowed(Allowed {
            upstream: vec![
                HeaderOp::Set("x-a".parse().unwrap(), "1".parse().unwrap()),
                HeaderOp::Append("x-b".parse().unwrap(), "2".parse().unwrap()),
                HeaderOp::Remove("cookie".parse().unwrap()),
            ],
            downstream: vec![HeaderOp::Append(
                "x-c".parse().unwrap(),
                "3".parse().unwrap()
            )],
        })
    );
    let denied = grpc::answer(CheckResponse {
        status: Some(RpcStatus {
            code: 7,
            message: String::new(),
        }),
        http_response: None,
    });
    assert_eq!(
        denied,
        Answer::Denied(Denied {
            status: 403,
            body: Bytes::new(),
            headers: vec![]
        })
    );
    let denied = grpc::answer(CheckResponse {
        status: Some(RpcStatus {
            code: 7,
            message: String::new(),
        }),
        http_response: Some(HttpResponse::Denied(DeniedHttpResponse {
            status: Some(HttpStatus { code: 401 }),
            headers: vec![hv("x-why", "no", None)],
            body: "no".into(),
        })),
    });
    let Answer::Denied(d) = denied else { panic!() };
    assert_eq!((d.status, &d.body[..]), (401, &b"no"[..]));
}

#[test]
fn errors_follow_fail_open_and_status_on_error() {
    let closed = Provider::compile(
        &spec("name: a\nenvoyExtAuthzGrpc: {service: a, port: 1, statusOnError: \"503\"}\n"),
        resolver(),
    )
    .unwrap();
    assert_eq!(
        closed.outcome(Answer::Error("down".into())),
        Outcome::Deny(Denied {
            status: 503,
            body: Bytes::new(),
            headers: vec![]
        })
    );
    let open = Provider::compile(
        &spec("name: a\nenvoyExtAuthzGrpc: {service: a, port: 1, failOpen: true}\n"),
        resolver(),
    )
    .unwrap();
    assert_eq!(
        open.outcome(Answer::Error("down".into())),
        Outcome::Allow(Allowed::default())
    );
}

#[tokio::test]
async fn unreachable_and_slow_providers_are_errors() {
    // Nothing listens on the port: an error, quickly.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let p = Provider::compile(
        &spec(&format!(
            "name: a\nenvoyExtAuthzHttp: {{service: 127.0.0.1, port: {port}}}\n"
        )),
        resolver(),
    )
    .unwrap();
    let h = HeaderMap::new();
    let input = CheckInput {
        method: "GET",
        path: "/",
        host: "h",
        headers: &h,
        http2: false,
        source: None,
        destination: None,
        source_principal: None,
        destination_principal: None,
        body: None,
    };
    assert!(matches!(p.check(&input).await, Answer::Error(_)));
    // Accepts and never answers: the timeout ends the check.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        }
    });
    for kind in ["envoyExtAuthzHttp", "envoyExtAuthzGrpc"] {
        let p = Provider::compile(
            &spec(&format!(
                "name: a\n{kind}: {{service: 127.0.0.1, port: {port}, timeout: 0.2s}}\n"
            )),
            resolver(),
        )
        .unwrap();
        let a = p.check(&input).await;
        assert!(
            matches!(&a, Answer::Error(e) if e.contains("no answer")),
            "{kind}: {a:?}"
        );
    }
}

mod engine {
    use std::sync::Arc;

    use http::HeaderMap;

    use crate::{
        config::PathNormalization,
        engine::{Conn, CustomWhy, Engine, Reason, Request},
        jwt::cache::TokenCache,
        policy::{load::add_mesh_providers, load_str, PolicyIndex, PolicySet},
        registry::Workload,
    };

    const POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: foo}\nspec:\n  action: CUSTOM\n  provider: {name: PROVIDER}\n  rules: [{to: [{operation: {paths: [/headers]}}]}]\n";

    fn set(mesh: &str, provider: &str) -> PolicySet {
        let mut set = PolicySet::default();
        load_str(&POLICY.replace("PROVIDER", provider), "p.yaml", &mut set);
        add_mesh_providers(&mut set, mesh, "ConfigMap istio-system/istio (mesh)");
        set.check_custom();
        set
    }

    fn decide(set: &PolicySet, path: &str, ask: bool) -> crate::engine::Decision {
        let engine = Engine::new(
            PolicyIndex::build(set, "istio-system", None),
            Arc::new(TokenCache::new(0)),
            None,
            PathNormalization::Base,
            "cluster.local",
        );
        let engine = if ask {
            engine
        } else {
            engine.without_providers()
        };
        let w = Workload {
            name: "httpbin".into(),
            namespace: "foo".into(),
            labels: Default::default(),
            service_account: "httpbin".into(),
        };
        let pol = engine.policies_for(&w);
        let h = HeaderMap::new();
        let c = Conn {
            policies: &pol,
            source: None,
            destination: Some(&w),
            source_ip: None,
            dest_ip: None,
            dest_port: 8000,
        };
        let r = Request {
            method: "GET",
            target: path,
            host: "httpbin",
            headers: &h,
            http2: false,
            body: None,
        };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(engine.decide_http(&c, &r))
    }

    #[test]
    fn an_undefined_provider_is_reported_and_denies() {
        let s = set("", "nowhere");
        let w: Vec<String> = s.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            w.iter().any(|p| p.starts_with("p.yaml:1: warning: foo/ext: CUSTOM provider \"nowhere\" is not among the extensionProviders")),
            "{w:?}"
        );
        let d = decide(&s, "/headers", true);
        assert_eq!(
            (d.allowed(), d.status(), d.reason),
            (false, 403, Reason::Custom(CustomWhy::Unusable))
        );
        assert!(
            decide(&s, "/ip", true).allowed(),
            "not matched: not checked"
        );
    }

    #[test]
    fn a_defined_provider_is_asked_and_check_only_names_it() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mesh = format!("defaultConfig: {{}}\nextensionProviders:\n- name: zipkin\n  zipkin: {{service: z, port: 9411}}\n- name: ext\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {port}\n    statusOnError: \"503\"\n");
        let s = set(&mesh, "ext");
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(
            s.extension_providers.len(),
            1,
            "the zipkin entry is not an authorizer"
        );
        assert_eq!(
            s.extension_providers[0].1.line, 5,
            "where the provider is written"
        );
        // Nothing listens: asked, it fails, statusOnError.
        let d = decide(&s, "/headers", true);
        assert_eq!(
            (d.allowed(), d.status(), d.reason),
            (false, 503, Reason::Custom(CustomWhy::Unavailable))
        );
        assert!(d.custom.as_ref().unwrap().asked);
        // `check` does not ask: it names the provider and decides the rest.
        let d = decide(&s, "/headers", false);
        assert!(d.allowed());
        let c = d.custom.unwrap();
        assert_eq!(
            (c.provider.as_str(), c.policy.policy.as_str(), c.asked),
            ("ext", "foo/ext", false)
        );
    }

    #[test]
    fn bad_providers_are_problems_at_their_line() {
        let s = set("extensionProviders:\n- name: ext\n  envoyExtAuthzHttp: {service: a, port: 0}\n- name: ext\n  envoyExtAuthzGrpc: {service: a, port: 1}\n", "ext");
        let e: Vec<String> = s.errors().map(|p| p.to_string()).collect();
        assert!(e.iter().any(|p| p.contains(":2: extensionProviders[0] \"ext\": port must be in the range")), "{e:?}");
        assert!(
            e.iter().any(|p| p.contains("provider name must be unique")),
            "{e:?}"
        );
        // Neither entry of a duplicated name is used: what the policy matches is denied.
        assert_eq!(
            decide(&s, "/headers", true).reason,
            Reason::Custom(CustomWhy::Unusable)
        );
    }
}
