//! The JWT FAQ scenarios, end to end through the kernel path: a client pod sends plain HTTP,
//! the kernel steers it into the agent, the destination's Istio policies decide.
use authz_tests::*;

fn get(client: &Host, url: &str, resolve: &str, token: Option<&str>) -> (u16, String) {
    let mut args = vec!["--resolve", resolve, url];
    let h;
    if let Some(t) = token {
        h = format!("Authorization: Bearer {t}");
        args.extend(["-H", h.as_str()]);
    }
    curl(client, true, &args).unwrap()
}

/// JWKS served in the cluster: pod nginx-proxy in foo serves the sample JWKS at /get_jwks,
/// `jwksUri: http://nginx-proxy/get_jwks` resolves through the `services` section.
#[test]
fn jwks_served_in_the_cluster() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    net.attach_host().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let httpbin = net.host("httpbin", 3).unwrap();
    let nginx = net.host("nginx", 4).unwrap();
    net.serve(&httpbin, "http", 8000).unwrap();
    let jwks = data_dir().join("istio-samples/jwks.json");
    net.serve_args(&nginx, 80, &["file", "/get_jwks", jwks.to_str().unwrap()])
        .unwrap();
    let ra =
        std::fs::read_to_string(data_dir().join("faq/jwks-in-cluster/requestauthentication.yaml"))
            .unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}services:\n  - {{name: nginx-proxy, namespace: foo, ips: [{}], ports: [{{port: 80}}]}}\n  - {{name: httpbin, namespace: foo, ips: [{}], ports: [{{port: 8000}}]}}\npolicies: [policies]\n",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        workload_yaml(&httpbin, "foo", "{app: httpbin}", "httpbin"),
        nginx.ip,
        httpbin.ip,
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/ra.yaml", &ra)]).unwrap();
    let url = "http://httpbin.foo:8000/headers";
    let resolve = format!("httpbin.foo:8000:{}", httpbin.ip);
    let token = demo_jwt();

    let (code, body) = get(&sleep, url, &resolve, Some(&token));
    assert_eq!(code, 200, "{body}\n{}", agent.log_text());
    let v = json(&body);
    assert!(
        v["headers"].get("authorization").is_none(),
        "token stripped before the upstream: {body}"
    );
    assert_eq!(v["client"], sleep.ip.as_str());

    let (code, body) = get(&sleep, url, &resolve, Some(&tampered(&token)));
    assert_eq!((code, body.as_str()), (401, "Jwt verification fails"));

    let (code, _) = get(&sleep, url, &resolve, None);
    assert_eq!(
        code, 200,
        "RequestAuthentication alone does not block requests without a token"
    );

    // The 401 carries Envoy's www-authenticate header.
    let out = Net::run(
        &sleep,
        true,
        "curl",
        &[
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--resolve",
            &resolve,
            "-H",
            &format!("Authorization: Bearer {}", tampered(&token)),
            url,
        ],
    )
    .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.contains("www-authenticate: bearer realm=\"http://httpbin.foo:8000/headers\", error=\"invalid_token\""), "{head}");
    assert!(
        agent.metric("authz_requests_total{decision=\"deny\",reason=\"Jwt verification fails\"}")
            >= 2.0
    );
}

/// JWKS outside the cluster over HTTPS (test CA given to the agent); then the JWKS server goes
/// away and valid tokens keep working on the keys fetched before.
#[test]
fn jwks_over_https_and_through_an_outage() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let httpbin = net.host("httpbin", 3).unwrap();
    net.serve(&httpbin, "http", 8000).unwrap();
    let dir = std::env::temp_dir().join(format!("authz-https-{}", std::process::id()));
    let jwks = std::fs::read(data_dir().join("istio-samples/jwks.json")).unwrap();
    let mut server = HttpsFile::start("/jwks.json", jwks, &dir).unwrap();
    let ra = std::fs::read_to_string(data_dir().join("faq/jwks-https/requestauthentication.yaml"))
        .unwrap()
        .replace("JWKS_PORT", &server.port.to_string());
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\", jwksCaFile: {}, tokenCacheSize: 0}}\npods:\n{}workloads:\n{}policies: [policies]\n",
        server.ca_file.display(),
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        workload_yaml(&httpbin, "foo", "{app: httpbin}", "httpbin"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/ra.yaml", &ra)]).unwrap();
    let url = format!("http://{}:8000/headers", httpbin.ip);
    let resolve = format!("unused:1:{}", httpbin.ip);
    let token = demo_jwt();
    let (code, body) = get(&sleep, &url, &resolve, Some(&token));
    assert_eq!(code, 200, "{body}\n{}", agent.log_text());
    assert_eq!(get(&sleep, &url, &resolve, Some(&tampered(&token))).0, 401);

    server.stop();
    for _ in 0..3 {
        let (code, body) = get(&sleep, &url, &resolve, Some(&token));
        assert_eq!(code, 200, "keys kept through the outage: {body}");
    }
    assert_eq!(get(&sleep, &url, &resolve, Some(&tampered(&token))).0, 401);
    let _ = std::fs::remove_dir_all(dir);
}

/// Skipping JWT for some paths: the FAQ's policies on an ingress gateway in the root namespace.
#[test]
fn skip_jwt_for_some_paths() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let gw = net.host("gw", 3).unwrap();
    net.serve(&gw, "http", 80).unwrap();
    let ra = std::fs::read_to_string(data_dir().join("faq/skip-path/requestauthentication.yaml"))
        .unwrap();
    let ap =
        std::fs::read_to_string(data_dir().join("faq/skip-path/authorizationpolicy.yaml")).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}policies: [policies]\n",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        workload_yaml(
            &gw,
            "istio-system",
            "{app: istio-ingressgateway}",
            "istio-ingressgateway"
        ),
    );
    let agent = Agent::start_with_files(
        &cfg,
        &[("policies/ra.yaml", &ra), ("policies/ap.yaml", &ap)],
    )
    .unwrap();
    let token = demo_jwt();
    let resolve = format!("unused:1:{}", gw.ip);
    for (path, tok, want, body_want) in [
        ("/productpage", None, 200, None),
        ("/api/v1/products/0", None, 403, Some("RBAC: access denied")),
        ("/api/v1/products/1", None, 403, Some("RBAC: access denied")),
        ("/productpage", Some(token.as_str()), 200, None),
        ("/api/v1/products/0", Some(token.as_str()), 200, None),
        ("/api/v1/products/1", Some(token.as_str()), 200, None),
    ] {
        let (code, body) = get(&sleep, &format!("http://{}{path}", gw.ip), &resolve, tok);
        assert_eq!(code, want, "{path} token={}: {body}", tok.is_some());
        if let Some(b) = body_want {
            assert_eq!(body, b);
        }
    }
    // A denied request does not poison the keep-alive connection: deny, allow, deny on one.
    let u = |p: &str| format!("http://{}{p}", gw.ip);
    let out = Net::run(
        &sleep,
        true,
        "curl",
        &[
            "-sS",
            "-w",
            "%{http_code} ",
            "-o",
            "/dev/null",
            &u("/api/v1/products/0"),
            "-o",
            "/dev/null",
            &u("/productpage"),
            "-o",
            "/dev/null",
            &u("/api/v1/products/1"),
        ],
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "403 200 403");
    assert_eq!(
        agent.metric("authz_connections_redirected_total"),
        7.0,
        "the three requests shared one connection"
    );
}

/// HTTP/2 with prior knowledge (gRPC's usual case): each stream decided on its own; and an
/// `Upgrade` request decided before the protocol switch.
#[test]
fn http2_streams_and_upgrades_are_decided_per_request() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let web = net.host("web", 3).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    let ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: foo}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]\n";
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}policies: [policies]\n",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        workload_yaml(&web, "foo", "{app: web}", "web"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/ap.yaml", ap)]).unwrap();
    let u = |p: &str| format!("http://{}:8000{p}", web.ip);
    // Three streams on one HTTP/2 connection, each decided on its own.
    let addr = format!("{}:8000", web.ip);
    let out = Net::run(
        &sleep,
        true,
        &testsrv(),
        &["h2get", &addr, "/ok", "/admin/x", "/ok2"],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lines[0].starts_with("200 ") && lines[0].contains("\"version\":\"HTTP/2.0\""),
        "upstream over HTTP/2: {text}"
    );
    assert_eq!(lines[1], "403 RBAC: access denied");
    assert!(lines[2].starts_with("200 "), "{text}");
    assert_eq!(
        agent.metric("authz_connections_redirected_total"),
        1.0,
        "three streams on one connection"
    );

    let upgrade = |path: &str| {
        let out = Net::run(
            &sleep,
            true,
            "curl",
            &[
                "-sS",
                "-i",
                "-m",
                "2",
                "-H",
                "Connection: Upgrade",
                "-H",
                "Upgrade: websocket",
                &u(path),
            ],
        )
        .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        upgrade("/ws").contains("101"),
        "allowed upgrade switches protocols"
    );
    assert!(
        upgrade("/admin/ws").contains("403"),
        "denied upgrade never reaches the server"
    );
}
