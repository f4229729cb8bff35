//! The plugin binary the container runtime runs: `CNI_*` variables and the network
//! configuration on stdin; the result or an error on stdout, as the CNI spec wants.
use std::{io::Read, process::ExitCode};

use authz_cni::plugin::{self, CniError, Env, SocketAgent};

/// A network configuration is a few kilobytes; more is refused.
const MAX_STDIN: u64 = 1 << 20;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    // The version to answer in: the configuration's, when it has one.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .unwrap_or_else(|| "1.0.0".into());
    let result = (|| {
        if read.is_err() || stdin.len() as u64 > MAX_STDIN {
            return Err(CniError {
                code: plugin::code::DECODE,
                msg: "cannot read the network configuration".into(),
                details: "stdin unreadable or over 1 MiB".into(),
            });
        }
        let env = Env::from(|k| std::env::var(k).ok())?;
        let socket = plugin::NetConf::parse(&stdin)
            .map(|c| c.agent_socket)
            .unwrap_or_else(|_| plugin::DEFAULT_SOCKET.into());
        let mut log = |m: &str| eprintln!("authz-cni: {m}");
        plugin::handle(&env, &stdin, &mut SocketAgent(socket), &mut log)
    })();
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("authz-cni: {}: {}", e.msg, e.details);
            ExitCode::FAILURE
        }
    }
}
