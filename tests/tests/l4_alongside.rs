//! An open L4 connection keeps flowing while HTTP connections to another workload come and go.
use authz_tests::*;

#[test]
fn l4_connection_keeps_flowing_while_other_connections_come_and_go() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let sleep = net.host("sleep", 2).unwrap();
    let web = net.host("web", 3).unwrap();
    let extra = net.host("extra", 4).unwrap();
    net.serve(&web, "echo", 9000).unwrap();
    net.serve(&extra, "http", 8000).unwrap();
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}{}",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        workload_yaml(&web, "foo", "{app: web}", "web"),
        workload_yaml(&extra, "foo", "{app: extra}", "extra")
    );
    let _agent = Agent::start(&cfg).unwrap();
    let mut nc = Echo::open(&sleep, &web.ip, 9000);
    let mut echo = |s: &str| nc.echo(s).expect("the echo connection is open");
    assert_eq!(echo("one"), "one");
    for i in 0..3 {
        let (c, _) = curl(&sleep, true, &[&format!("http://{}:8000/", extra.ip)]).unwrap();
        assert_eq!(c, 200);
        assert_eq!(echo(&format!("n{i}")), format!("n{i}"));
    }
}
