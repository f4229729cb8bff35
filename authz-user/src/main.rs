use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "authz-agent",
    version,
    about = "Transparent Istio JWT/authorization enforcement with eBPF"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent (needs root: loads eBPF programs, enters pod namespaces).
    Run {
        /// The agent config; in Kubernetes mode optional (its `agent:` settings apply).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Read pods, services, namespaces and Istio policies from the API server (also
        /// `kubernetes.enabled` in the config).
        #[arg(long)]
        kubernetes: bool,
        /// Kubernetes mode: this kubeconfig instead of the in-cluster service account.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Kubernetes mode: this node's name [default: $NODE_NAME].
        #[arg(long)]
        node_name: Option<String>,
    },
    /// Decide one request against the policies (no privileges needed); prints JSON.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Destination workload or pod: NAMESPACE/NAME.
        #[arg(long)]
        to: String,
        /// Source pod or workload: NAMESPACE/NAME.
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        source_ip: Option<std::net::IpAddr>,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// 'Name: value', repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Detach and unpin everything an agent left in bpffs (its programs stay attached after it
    /// exits, applying the fail mode, until a new agent adopts them or this runs).
    Cleanup {
        /// Take `agent.bpffs` from this config.
        #[arg(long, short, conflicts_with = "bpffs")]
        config: Option<PathBuf>,
        /// The pin directory [default: /sys/fs/bpf/authz].
        #[arg(long)]
        bpffs: Option<PathBuf>,
    },
    /// Check config and policy files; every problem as file:line: message.
    Validate {
        #[arg(long, short)]
        config: Option<PathBuf>,
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_tracing();
    match cli.cmd {
        Cmd::Check {
            config,
            to,
            from,
            source_ip,
            method,
            path,
            host,
            port,
            headers,
        } => {
            let args = authz::cli::CheckArgs {
                config,
                to,
                from,
                source_ip,
                method,
                path,
                host,
                port,
                headers,
            };
            match authz::cli::check(&args) {
                Ok((json, allowed)) => {
                    println!("{json}");
                    ExitCode::from(if allowed { 0 } else { 1 })
                }
                Err(e) => {
                    eprintln!("authz-agent check: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Validate { config, paths } => {
            let (lines, ok) = authz::cli::validate(config.as_ref(), &paths);
            for l in lines {
                println!("{l}");
            }
            ExitCode::from(if ok { 0 } else { 2 })
        }
        Cmd::Cleanup { config, bpffs } => {
            let dir = match (config, bpffs) {
                (_, Some(d)) => Ok(d),
                (Some(c), None) => authz::config::Config::load(&c).map(|c| c.agent.bpffs),
                (None, None) => Ok(authz::config::AgentSettings::default().bpffs),
            };
            match dir
                .map_err(anyhow::Error::from)
                .and_then(|d| authz::agent::cleanup(&d))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("authz-agent cleanup: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run {
            config,
            kubernetes,
            kubeconfig,
            node_name,
        } => match authz::agent::run(config.as_deref(), kubernetes, kubeconfig, node_name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("authz-agent: {e:#}");
                if e.downcast_ref::<authz::config::ConfigError>().is_some() {
                    ExitCode::from(2)
                } else {
                    ExitCode::FAILURE
                }
            }
        },
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("AUTHZ_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("AUTHZ_LOG_FORMAT").is_ok_and(|v| v == "json");
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
