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
    /// Put the CNI plugin into the node's CNI configuration, or take it out (what the agent does
    /// itself with kubernetes.cni.binDir and confDir set).
    Cni {
        #[command(subcommand)]
        cmd: CniCmd,
    },
    /// Check config and policy files; every problem as file:line: message.
    Validate {
        #[arg(long, short)]
        config: Option<PathBuf>,
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CniCmd {
    /// Copy the plugin binary in and chain it last in the primary network configuration.
    Install {
        /// The node's CNI binary directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The node's CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The plugin binary [default: authz-cni beside this executable].
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// The agent's socket, as the plugin reaches it.
        #[arg(long, default_value = "/var/run/authz/cni.sock")]
        socket: PathBuf,
        /// closed: a pod does not start while the agent cannot be reached; open: it starts
        /// unenrolled.
        #[arg(long, default_value = "closed")]
        fail_mode: String,
        /// How long the plugin waits for the agent, in seconds.
        #[arg(long, default_value_t = 30)]
        timeout_seconds: u64,
    },
    /// Take the plugin out of every configuration in the directory and remove its binary.
    Uninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

fn cni(cmd: CniCmd) -> anyhow::Result<()> {
    use authz::cni::install::{Ensured, Installer};
    use authz::config::CniSettings;
    match cmd {
        CniCmd::Install {
            bin_dir,
            conf_dir,
            plugin,
            socket,
            fail_mode,
            timeout_seconds,
        } => {
            let settings = CniSettings {
                socket,
                bin_dir: Some(bin_dir),
                conf_dir: Some(conf_dir),
                plugin_binary: plugin,
                fail_mode: serde_yaml::from_str(&fail_mode)
                    .map_err(|_| anyhow::anyhow!("--fail-mode: closed or open"))?,
                timeout: std::time::Duration::from_secs(timeout_seconds),
                ..Default::default()
            };
            let i = Installer::from_settings(&settings)?.expect("directories given");
            i.install_binary()?;
            match i.ensure()? {
                Ensured::Present(p) | Ensured::Inserted(p) => {
                    println!("chained into {}", p.display());
                    Ok(())
                }
                Ensured::NoNetwork => anyhow::bail!(
                    "no network configuration in {} to chain onto",
                    i.conf_dir.display()
                ),
                Ensured::Refused(p, why) => anyhow::bail!("{}: {why}", p.display()),
            }
        }
        CniCmd::Uninstall { bin_dir, conf_dir } => {
            let settings = CniSettings {
                bin_dir: Some(bin_dir),
                conf_dir: Some(conf_dir),
                plugin_binary: Some(PathBuf::new()),
                ..Default::default()
            };
            let i = Installer::from_settings(&settings)?.expect("directories given");
            for p in i.remove()? {
                println!("removed from {}", p.display());
            }
            Ok(())
        }
    }
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
        Cmd::Cni { cmd } => match cni(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("authz-agent cni: {e:#}");
                ExitCode::FAILURE
            }
        },
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
