//! After the agent exits, no program of ours stays loaded or attached. Its own test binary, so
//! no other agent runs meanwhile (cargo runs test binaries one after another).
use authz_tests::*;

fn ours() -> Vec<String> {
    loaded_bpf_programs()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("authz_"))
        .collect()
}

fn agent_for(net: &mut Net) -> Agent {
    let pod = net.host("p", 2).unwrap();
    let w = net.host("w", 3).unwrap();
    let cfg = format!(
        "agent: {{port: 15001, admin: \"{{ADMIN}}\"}}\npods:\n{}workloads:\n{}",
        pod_yaml(&pod, "foo", "{app: p}", "p"),
        workload_yaml(&w, "foo", "{app: w}", "w"),
    );
    Agent::start(&cfg).unwrap()
}

#[test]
fn nothing_left_attached_after_sigterm_or_sigkill() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let mut agent = agent_for(&mut net);
    assert_eq!(
        ours().len(),
        4,
        "connect4, connect6, sock_ops, sk_msg loaded: {:?}",
        ours()
    );
    let cg = cgroup2_root();
    let attached = sh("bpftool", &["cgroup", "show", cg.to_str().unwrap()]).unwrap();
    assert!(String::from_utf8_lossy(&attached.stdout).contains("authz_connect4"));
    assert!(agent.stop().unwrap().success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(ours().is_empty(), "left loaded after SIGTERM: {:?}", ours());
    let attached = sh("bpftool", &["cgroup", "show", cg.to_str().unwrap()]).unwrap();
    assert!(!String::from_utf8_lossy(&attached.stdout).contains("authz_"));

    // A crash must not leave anything behind either: links die with the process.
    let mut net2 = Net::new().unwrap();
    let mut agent = agent_for(&mut net2);
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(ours().is_empty(), "left loaded after SIGKILL: {:?}", ours());
}
