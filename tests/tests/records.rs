//! Decision records through the kernel path: a matched AUDIT rule and a dry-run verdict each
//! write one JSON line to the agent's log and are counted; no token or header value is written.
use authz_tests::*;

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-admin, namespace: foo}
spec:
  action: AUDIT
  rules: [{to: [{operation: {paths: [/other]}}]}, {to: [{operation: {paths: [\"/admin*\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: trial-deny
  namespace: foo
  annotations: {istio.io/dry-run: \"true\"}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]
";

fn records(agent: &Agent) -> Vec<serde_json::Value> {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("authz::record"))
        .filter_map(|l| l.find('{').map(|i| json(&l[i..])))
        .collect()
}

#[test]
fn audit_and_dry_run_leave_records() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let client = net.host("client", 2).unwrap();
    let web = net.host("web", 3).unwrap();
    net.serve(&web, "http", 8000).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}policies: [policies]\n",
        pod_yaml(&client, "foo", "{app: client}", "client"),
        workload_yaml(&web, "foo", "{app: web}", "web"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/ap.yaml", POLICIES)]).unwrap();
    let secret = "Bearer not-a-real-token-but-secret";
    let (code, _) = curl(
        &client,
        true,
        &[
            "-H",
            &format!("Authorization: {secret}"),
            &format!("http://{}:8000/admin/users?key=hidden", web.ip),
        ],
    )
    .unwrap();
    assert_eq!(code, 200, "AUDIT and dry-run never change the decision");
    let (code, _) = curl(&client, true, &[&format!("http://{}:8000/home", web.ip)]).unwrap();
    assert_eq!(code, 200);
    let r = records(&agent);
    let audit: Vec<_> = r.iter().filter(|x| x["type"] == "audit").collect();
    assert_eq!(audit.len(), 1, "{r:#?}");
    let a = audit[0];
    assert_eq!(a["policy"], "foo/audit-admin");
    assert_eq!(a["rule"], 1);
    assert_eq!(a["decision"], "allow");
    assert_eq!(a["workload"], "foo/web");
    assert_eq!(a["method"], "GET");
    assert_eq!(a["path"], "/admin/users", "no query");
    assert_eq!(a["source"], client.ip.as_str());
    let dry: Vec<_> = r.iter().filter(|x| x["type"] == "dry-run").collect();
    assert_eq!(dry.len(), 2, "one per request: {r:#?}");
    assert_eq!(dry[0]["decision"], "deny");
    assert_eq!(dry[0]["policy"], "foo/trial-deny");
    assert_eq!(dry[1]["decision"], "allow");
    assert!(dry[1]["policy"].is_null());
    let log = agent.log_text();
    // As a user reads them (shown in the README).
    for l in log.lines().filter(|l| l.contains("authz::record")) {
        println!("{l}");
    }
    assert!(!log.contains("secret") && !log.contains("hidden"), "{log}");
    assert_eq!(
        agent.metric("authz_audit_total{policy=\"foo/audit-admin\"}"),
        1.0
    );
    assert_eq!(
        agent.metric("authz_dry_run_total{policy=\"foo/trial-deny\",result=\"deny\"}"),
        1.0
    );
    assert_eq!(
        agent.metric("authz_dry_run_total{policy=\"-\",result=\"allow\"}"),
        1.0
    );
}
