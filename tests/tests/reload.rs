//! Hot reload: policy and config changes apply to new requests within a second, open
//! connections stay up, and an invalid change keeps the previous policy in force.
use std::time::{Duration, Instant};

use authz_tests::*;

/// A DENY on an HTTP path, limited to port 8000: without the port it would also deny all TCP
/// to the workload (HTTP-only fields are ignored in DENY rules for TCP, as in Istio).
fn deny_path(path: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-path, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"{path}\"]\n        ports: [\"8000\"]\n")
}

/// Polls until `f` holds, for at most `limit`.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn policy_and_config_changes_apply_without_dropping_connections() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let pace = Pace::measure(&sleep);
    let web = net.host("web", 3).unwrap();
    let extra = net.host("extra", 4).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    net.serve(&web, "echo", 9000).unwrap();
    net.serve(&extra, "http", 8000).unwrap();
    let base = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        workload_yaml(&web, "foo", "{app: web}", "web"),
    );
    let cfg = format!("{base}policies: [policies]\n");
    let agent =
        Agent::start_with_files(&cfg, &[("policies/ap.yaml", &deny_path("/admin"))]).unwrap();
    let code = |h: &Host, path: &str| {
        curl(&sleep, true, &[&format!("http://{}:8000{path}", h.ip)])
            .unwrap()
            .0
    };
    assert_eq!(code(&web, "/admin"), 403);
    assert_eq!(code(&web, "/other"), 200);

    // A long-lived connection through the agent (L4 echo), kept across every reload below.
    let mut nc = Echo::open(&sleep, &web.ip, 9000);
    let mut echo = |s: &str| nc.echo(s).expect("the echo connection is open");
    assert_eq!(echo("one"), "one");

    // A valid change applies within a second.
    let policy = agent.dir.join("policies/ap.yaml");
    std::fs::write(&policy, deny_path("/other")).unwrap();
    assert!(
        within(pace.after(Duration::from_secs(1)), || code(&web, "/other")
            == 403),
        "new policy in force within 1 s"
    );
    assert_eq!(code(&web, "/admin"), 200);
    assert_eq!(echo("two"), "two", "open connection survived the reload");

    // An invalid change is reported with file:line and the previous policy stays.
    std::fs::write(&policy, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-path, namespace: foo}\nspec:\n  action: DENY\n").unwrap();
    assert!(within(pace.after(Duration::from_secs(2)), || agent
        .metric("authz_reload_failures_total")
        >= 1.0));
    assert!(
        agent.log_text().contains(
            "policies/ap.yaml:5: AuthorizationPolicy foo/deny-path: a DENY policy without rules"
        ),
        "{}",
        agent.log_text()
    );
    assert_eq!(code(&web, "/other"), 403);
    assert_eq!(code(&web, "/admin"), 200);
    assert_eq!(echo("two-b"), "two-b");

    // A config change: a new workload becomes enforced (its traffic now goes through the agent).
    let before = agent.metric("authz_kernel_connect_redirected_total");
    assert_eq!(code(&extra, "/"), 200);
    assert_eq!(
        agent.metric("authz_kernel_connect_redirected_total"),
        before,
        "not a workload yet"
    );
    std::fs::write(&policy, deny_path("/other")).unwrap();
    assert!(within(pace.after(Duration::from_secs(1)), || agent
        .metric("authz_reloads_total")
        >= 2.0));
    let cfg2 = format!(
        "{base}{}policies: [policies]\n",
        workload_yaml(&extra, "foo", "{app: extra}", "extra")
    );
    let cfg2 = agent.fill(&cfg2);
    std::fs::write(agent.dir.join("agent.yaml"), cfg2).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        echo("three"),
        "three",
        "open connection survived the config reload"
    );
    assert!(
        within(pace.after(Duration::from_secs(1)), || {
            let b = agent.metric("authz_kernel_connect_redirected_total");
            code(&extra, "/") == 200 && agent.metric("authz_kernel_connect_redirected_total") > b
        }),
        "new workload enforced within 1 s: {}",
        agent.log_text()
    );
}

/// Policies rewritten every 100 ms while requests keep coming on keep-alive connections: no
/// request fails or gets another path's decision. `/admin` is denied by every version, `/ok` by
/// none, `/flip` by every other one.
#[test]
fn policies_changed_every_100ms_under_load() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let web = net.host("web", 3).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    let cfg = format!("{}policies: [policies]\n", one_pod_config(&sleep, &web, ""));
    let version = |i: usize| {
        let paths = if i.is_multiple_of(2) {
            "[\"/admin\", \"/flip\"]"
        } else {
            "[\"/admin\"]"
        };
        deny_path("X").replace("[\"X\"]", paths)
    };
    let agent = Agent::start_with_files(&cfg, &[("policies/ap.yaml", &version(0))]).unwrap();
    let policy = agent.dir.join("policies/ap.yaml");
    let reloads_before = agent.metric("authz_reloads_total");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, policy, tmp) = (stop.clone(), policy.clone(), agent.dir.join("ap.yaml.tmp"));
        std::thread::spawn(move || {
            let mut i = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::write(&tmp, version(i)).unwrap();
                std::fs::rename(&tmp, &policy).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let paths = ["/ok", "/admin", "/flip"];
    let mut seen = std::collections::HashMap::<(&str, String), usize>::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        // One curl, one keep-alive connection, 30 requests.
        let mut args = vec!["-s", "-w", "%{http_code}\\n"];
        let urls: Vec<String> = (0..10)
            .flat_map(|_| paths.iter().map(|p| format!("http://{}:8000{p}", web.ip)))
            .collect();
        for u in &urls {
            args.extend(["-o", "/dev/null", u.as_str()]);
        }
        let out = Net::run(&sleep, true, "curl", &args).unwrap();
        let codes = String::from_utf8_lossy(&out.stdout).to_string();
        let codes: Vec<&str> = codes.lines().collect();
        assert_eq!(codes.len(), urls.len(), "every request answered: {codes:?}");
        for (i, c) in codes.iter().enumerate() {
            *seen.entry((paths[i % 3], c.to_string())).or_default() += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let keys: Vec<_> = seen.keys().cloned().collect();
    for (path, code) in &keys {
        let ok = match *path {
            "/ok" => code == "200",
            "/admin" => code == "403",
            _ => code == "200" || code == "403",
        };
        assert!(ok, "{path} answered {code}: {seen:?}");
    }
    assert!(
        seen.contains_key(&("/flip", "200".into())) && seen.contains_key(&("/flip", "403".into())),
        "both versions were in force during the run: {seen:?}"
    );
    assert!(agent.metric("authz_reloads_total") - reloads_before >= 5.0);
    assert_eq!(
        agent.metric("authz_reload_failures_total"),
        0.0,
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_policy_change_closes_the_open_relays_it_denies() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let pace = Pace::measure(&sleep);
    let web = net.host("web", 3).unwrap();
    net.serve(&web, "echo", 9000).unwrap();
    net.serve(&web, "echo", 9001).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}policies: [policies]\n",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        workload_yaml(&web, "foo", "{app: web}", "web"),
    );
    let deny_port = |port: u16| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-port, namespace: foo}}\nspec:\n  action: DENY\n  rules: [{{to: [{{operation: {{ports: [\"{port}\"]}}}}]}}]\n")
    };
    let agent = Agent::start_with_files(&cfg, &[("policies/ap.yaml", &deny_port(1))]).unwrap();
    let mut denied = Echo::open(&sleep, &web.ip, 9000);
    let mut kept = Echo::open(&sleep, &web.ip, 9001);
    assert_eq!(denied.echo("one").as_deref(), Some("one"));
    assert_eq!(kept.echo("one").as_deref(), Some("one"));
    std::fs::write(agent.dir.join("policies/ap.yaml"), deny_port(9000)).unwrap();
    assert!(
        within(pace.after(Duration::from_secs(2)), || agent
            .metric("authz_tcp_closed_by_policy_total")
            == 1.0),
        "the relay to the now denied port is closed"
    );
    assert_eq!(
        kept.echo("two").as_deref(),
        Some("two"),
        "a relay the new policies still allow stays open"
    );
    assert_eq!(agent.metric("authz_connections_active"), 1.0);
}
