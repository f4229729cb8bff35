//! HTTP/2 floods through the kernel path: Rapid Reset (CVE-2023-44487) and CONTINUATION floods
//! (CVE-2024-27316 family) end in the agent, are not multiplied to the upstream, and leave the
//! agent serving with bounded memory.
use authz_tests::*;

fn upstream_count(client: &Host, ip: &str) -> u64 {
    // Outside the pod's cgroup: straight to the test server, not counted as a request.
    let (code, body) = curl(client, false, &[&format!("http://{ip}:8000/__count")]).unwrap();
    assert_eq!(code, 200);
    json(&body)["count"].as_u64().unwrap()
}

fn flood(client: &Host, ip: &str, kind: &str, n: usize) -> serde_json::Value {
    let out = Net::run(
        client,
        true,
        &testsrv(),
        &["h2flood", &format!("{ip}:8000"), kind, &n.to_string()],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(String::from_utf8_lossy(&out.stdout).trim())
}

fn rss_mb(pid: u32) -> f64 {
    rss_kib(pid).unwrap() as f64 / 1024.0
}

#[test]
fn rapid_reset_and_continuation_floods_are_cut_off() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let web = net.host("web", 3).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    let cfg = one_pod_config(&sleep, &web, "");
    let agent = Agent::start(&cfg).unwrap();
    let pid = agent.child.id();

    // Rapid Reset: 1,000 streams opened and cancelled at once.
    let before = upstream_count(&sleep, &web.ip);
    let r = flood(&sleep, &web.ip, "rapid-reset", 1000);
    eprintln!("rapid reset: {r}");
    assert_eq!(r["goaway"], 11, "GOAWAY ENHANCE_YOUR_CALM: {r}");
    assert_eq!(r["closed"], true, "and closed the connection: {r}");
    let reached = upstream_count(&sleep, &web.ip) - before;
    eprintln!("upstream saw {reached} of 1000 cancelled streams");
    assert!(
        reached <= 20,
        "cancelled streams multiplied upstream: {reached}"
    );

    // CONTINUATION flood: one header block that never ends (about 2 MB of headers).
    let before = upstream_count(&sleep, &web.ip);
    let r = flood(&sleep, &web.ip, "continuation", 20_000);
    eprintln!("continuation: {r}");
    assert_eq!(r["goaway"], 11, "GOAWAY ENHANCE_YOUR_CALM: {r}");
    assert_eq!(r["closed"], true, "the agent cut the connection: {r}");
    assert_eq!(r["responses"], 0, "{r}");
    assert_eq!(
        upstream_count(&sleep, &web.ip),
        before,
        "nothing reached the upstream"
    );

    let (code, _) = curl(&sleep, true, &[&format!("http://{}:8000/after", web.ip)]).unwrap();
    assert_eq!(code, 200, "the agent still serves");
    assert!(
        rss_mb(pid) < 100.0,
        "agent RSS after the floods: {} MB",
        rss_mb(pid)
    );
}
