use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "authz-agent", version, about = "Transparent Istio JWT/authorization enforcement with eBPF")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent (needs root: loads eBPF programs, enters pod namespaces).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { config } => match authz::agent::run(&config) {
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
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
