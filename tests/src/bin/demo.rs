//! `authz-demo` (what `cargo xtask demo` runs after building): pods in network namespaces, the
//! agent on the embedded default (file mode), the JWT FAQ's skip-path policies, a few requests,
//! and a table of what happened.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use authz_tests::{curl, pod_yaml, workload_yaml, Agent, Net};

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
    net.serve(&gw, "http", 80)?;
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
        "{:<24} {:<16} {:>8} {:>5}  reply",
        "request (from sleep)", "token", "expected", "got"
    );
    let mut bad = 0;
    for (path, tok, want) in &cases {
        let url = format!("http://{}{path}", gw.ip);
        let mut args = vec![url.as_str()];
        let header;
        if let Some(t) = tok {
            header = format!("Authorization: Bearer {t}");
            args.extend(["-H", &header]);
        }
        let (code, body) = curl(&sleep, true, &args)?;
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
            "GET {:<20} {:<16} {:>8} {:>5}  {reply}{mark}",
            path, label, want, code
        );
    }
    println!();
    let m = agent.metrics();
    println!(
        "kernel: {} connect() redirected, {} sk_msg redirects; agent: {} connections",
        m.get("authz_kernel_connect_redirected_total")
            .unwrap_or(&0.0),
        m.get("authz_kernel_skmsg_redirected_total").unwrap_or(&0.0),
        m.get("authz_connections_redirected_total").unwrap_or(&0.0),
    );
    drop(agent);
    drop(net);
    eprintln!("demo: cleaned up");
    if bad > 0 {
        anyhow::bail!("{bad} request(s) did not get the expected answer");
    }
    Ok(())
}
