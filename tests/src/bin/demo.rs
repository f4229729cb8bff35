//! `authz-demo` (what `cargo xtask demo` runs after building): pods in network namespaces, the
//! agent on the embedded default (file mode), the JWT FAQ's skip-path policies on the gateway
//! pod, the same requests from a client outside every pod (standing for the Internet) and from a
//! pod of the mesh, and a table of what happened. Both are decided at the gateway pod.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use authz_tests::{curl, pod_yaml, Agent, Net};

fn main() -> std::process::ExitCode {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    match run(&root) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(root: &Path) -> Result<()> {
    if std::fs::read_to_string("/proc/self/status")?
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2).is_none_or(|u| u != "0"))
    {
        anyhow::bail!("the demo needs root: it creates network namespaces and loads eBPF programs");
    }
    std::env::set_var("AUTHZ_AGENT_BIN", root.join("target/release/authz-agent"));
    std::env::set_var(
        "AUTHZ_TESTSRV_BIN",
        root.join("target/release/authz-testsrv"),
    );
    let data = root.join("tests/data");
    let token = std::fs::read_to_string(data.join("istio-samples/demo.jwt"))
        .context("sample token")?
        .trim()
        .to_string();
    let ra = std::fs::read_to_string(data.join("faq/skip-path/requestauthentication.yaml"))?;
    let ap = std::fs::read_to_string(data.join("faq/skip-path/authorizationpolicy.yaml"))?;

    eprintln!("demo: creating pods (network namespaces + cgroups)");
    let mut net = Net::new()?;
    let sleep = net.host("sleep", 2)?;
    let gw = net.host("ingressgw", 3)?;
    // A network namespace that is no pod: the user's curl outside the cluster.
    let internet = net.host("internet", 9)?;
    net.serve(&gw, "http", 80)?;
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}{}policies: [policies]\n",
        pod_yaml(&sleep, "foo", "{app: sleep}", "sleep"),
        pod_yaml(
            &gw,
            "istio-system",
            "{app: istio-ingressgateway}",
            "istio-ingressgateway"
        ),
    );
    eprintln!("demo: starting the agent");
    let agent = Agent::start_with_files(
        &cfg,
        &[("policies/ra.yaml", &ra), ("policies/ap.yaml", &ap)],
    )?;

    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let cases: Vec<(&str, Option<&str>, u16)> = vec![
        ("/productpage", None, 200),
        ("/api/v1/products/0", None, 403),
        ("/api/v1/products/1", None, 403),
        ("/productpage", Some(&token), 200),
        ("/api/v1/products/0", Some(&token), 200),
        ("/api/v1/products/1", Some(&token), 200),
        ("/api/v1/products/1", Some(&tampered), 401),
    ];
    println!();
    println!(
        "{:<9} {:<24} {:<10} {:>8} {:>5}  reply",
        "client", "request", "token", "expected", "got"
    );
    let mut bad = 0;
    let clients = [("internet", &internet, false), ("sleep", &sleep, true)];
    for ((client, host, in_pod), (path, tok, want)) in clients
        .iter()
        .flat_map(|c| cases.iter().map(move |r| (c, r)))
    {
        let url = format!("http://{}{path}", gw.ip);
        let mut args = vec![url.as_str()];
        let header;
        if let Some(t) = tok {
            header = format!("Authorization: Bearer {t}");
            args.extend(["-H", &header]);
        }
        let (code, body) = curl(host, *in_pod, &args)?;
        let label = match tok {
            None => "none",
            Some(t) if *t == token => "demo.jwt",
            Some(_) => "tampered",
        };
        let reply = if code == 200 {
            "forwarded".to_string()
        } else {
            body.trim().to_string()
        };
        let mark = if code == *want { "" } else { "  <-- MISMATCH" };
        if code != *want {
            bad += 1;
        }
        println!(
            "{:<9} GET {:<20} {:<10} {:>8} {:>5}  {reply}{mark}",
            client, path, label, want, code
        );
    }
    println!();
    let m = agent.metrics();
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
    println!(
        "kernel: {} inbound connections captured at the gateway pod, {} sk_msg redirects on the \
         agent-to-application hop; agent: {} requests decided",
        get("authz_kernel_inbound_captured_total"),
        get("authz_kernel_skmsg_redirected_total"),
        m.iter()
            .filter(|(k, _)| k.starts_with("authz_requests_total{"))
            .map(|(_, v)| v)
            .sum::<f64>(),
    );
    drop(agent);
    drop(net);
    eprintln!("demo: cleaned up");
    if bad > 0 {
        anyhow::bail!("{bad} request(s) did not get the expected answer");
    }
    Ok(())
}
