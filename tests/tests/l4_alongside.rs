//! An open L4 connection keeps flowing while HTTP connections to another workload come and go.
use authz_tests::*;
use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
};

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
        "agent: {{port: 15001, admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}{}",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        workload_yaml(&web, "foo", "{app: web}", "web"),
        workload_yaml(&extra, "foo", "{app: extra}", "extra")
    );
    let _agent = Agent::start(&cfg).unwrap();
    let mut nc = Net::command(&sleep, true, "nc", &[&web.ip, "9000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut nc_in = nc.stdin.take().unwrap();
    let mut nc_out = BufReader::new(nc.stdout.take().unwrap());
    let mut echo = |s: &str| {
        nc_in.write_all(format!("{s}\n").as_bytes()).unwrap();
        nc_in.flush().unwrap();
        let mut l = String::new();
        nc_out.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    assert_eq!(echo("one"), "one");
    for i in 0..3 {
        let (c, _) = curl(&sleep, true, &[&format!("http://{}:8000/", extra.ip)]).unwrap();
        assert_eq!(c, 200);
        assert_eq!(echo(&format!("n{i}")), format!("n{i}"));
    }
    let _ = nc.kill();
    let _ = nc.wait();
}
