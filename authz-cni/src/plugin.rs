//! The CNI side: the runtime's environment and network configuration in, a result or an error
//! out, as the CNI spec (1.0.0 and 0.4.0) wants them. stdout carries only the result or the
//! error; what the plugin has to say besides goes to stderr, which runtimes log.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::wire::{self, PodClaim, Reply, Request};

/// Spec versions whose configuration and result formats this plugin reads and writes.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
pub const DEFAULT_SOCKET: &str = "/var/run/authz/cni.sock";
const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
/// Between attempts to reach an agent that is not there (yet, or again).
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// The CNI spec's well-known error codes, and this plugin's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The agent was reached and refused to enroll the pod.
    pub const REFUSED: u32 = 100;
}

/// An error as the spec wants it on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The runtime's `CNI_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`: `K=V;K=V`.
    pub args: Vec<(String, String)>,
}

impl Env {
    pub fn from(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "unknown CNI_COMMAND",
                    format!("{other:?}"),
                ))
            }
        };
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = Env {
            command,
            container_id: var("CNI_CONTAINERID").unwrap_or_default(),
            netns: var("CNI_NETNS").unwrap_or_default(),
            ifname: var("CNI_IFNAME").unwrap_or_default(),
            args,
        };
        // What the spec requires per command (DEL may come without a netns: the sandbox is gone).
        let missing = match command {
            Command::Version => None,
            _ if env.container_id.is_empty() => Some("CNI_CONTAINERID"),
            _ if env.ifname.is_empty() => Some("CNI_IFNAME"),
            Command::Add | Command::Check if env.netns.is_empty() => Some("CNI_NETNS"),
            _ => None,
        };
        if let Some(m) = missing {
            return Err(CniError::new(code::INVALID_ENV, "missing variable", m));
        }
        Ok(env)
    }

    fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// What the agent should do when it cannot be reached (or does not answer in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The ADD fails; the runtime retries; the pod does not start unprotected.
    #[default]
    Closed,
    /// The pod starts; the agent enrolls it when it finds it.
    Open,
}

/// This plugin's entry in the network configuration list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    #[serde(default)]
    pub fail_mode: FailMode,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The previous plugin's result, passed through untouched.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODE,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "{} (supported: {})",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf.timeout_seconds == 0 || conf.timeout_seconds > 600 {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid timeoutSeconds",
                "between 1 and 600",
            ));
        }
        Ok(conf)
    }

    fn at_least_0_4(&self) -> bool {
        !self.cni_version.starts_with("0.3.")
    }
}

/// The pod's addresses in a previous result (0.3.x/0.4.0 and 1.0.0 share the `ips` list): those
/// on an interface inside the sandbox, or on no interface named.
pub fn pod_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let bad = |why: &str| CniError::new(code::DECODE, "cannot read prevResult", why.to_string());
    let interfaces = prev.get("interfaces").and_then(Value::as_array);
    let in_sandbox = |i: u64| {
        interfaces
            .and_then(|list| list.get(i as usize))
            .and_then(|iface| iface.get("sandbox"))
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    let mut out = Vec::new();
    for ip in prev
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let address = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("an ips entry has no address"))?;
        let addr: IpAddr = address
            .split_once('/')
            .map(|(a, _)| a)
            .unwrap_or(address)
            .parse()
            .map_err(|_| bad(&format!("address {address:?}")))?;
        match ip.get("interface").and_then(Value::as_u64) {
            Some(i) if !in_sandbox(i) => continue,
            _ => {}
        }
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// Sends one request and reads the reply, with `deadline` for both.
pub fn ask(socket: &Path, req: &Request, deadline: Instant) -> std::io::Result<Reply> {
    use std::io::{Error, ErrorKind};
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Error::new(ErrorKind::TimedOut, "no time left"))?;
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream).take(wire::MAX_LINE as u64);
    let mut reply = String::new();
    if reader.read_line(&mut reply)? == 0 || !reply.ends_with('\n') {
        return Err(Error::new(
            ErrorKind::UnexpectedEof,
            "the agent closed the connection before replying",
        ));
    }
    serde_json::from_str(&reply).map_err(|e| Error::new(ErrorKind::InvalidData, e))
}

/// The agent, as the plugin reaches it.
pub trait Agent {
    fn ask(&mut self, req: &Request, deadline: Instant) -> std::io::Result<Reply>;
}

/// The agent behind a Unix socket.
pub struct SocketAgent(pub PathBuf);

impl Agent for SocketAgent {
    fn ask(&mut self, req: &Request, deadline: Instant) -> std::io::Result<Reply> {
        ask(&self.0, req, deadline)
    }
}

/// Asks until a reply comes or the deadline passes: an agent restarting in the middle of an ADD
/// (the connection refused, or closed before the reply) is asked again; it treats a repeated
/// request as the same one.
fn ask_until(
    agent: &mut dyn Agent,
    req: &Request,
    deadline: Instant,
) -> Result<Reply, std::io::Error> {
    loop {
        match agent.ask(req, deadline) {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() + RETRY_EVERY >= deadline => return Err(e),
            Err(_) => std::thread::sleep(RETRY_EVERY),
        }
    }
}

/// What the plugin prints on success (None: nothing, as DEL and CHECK print).
pub type Output = Option<Value>;

/// One invocation: the environment, the configuration on stdin, the agent.
pub fn handle(
    env: &Env,
    stdin: &[u8],
    agent: &mut dyn Agent,
    log: &mut dyn FnMut(&str),
) -> Result<Output, CniError> {
    if env.command == Command::Version {
        let v: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
        let asked = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("1.0.0");
        return Ok(Some(
            json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let conf = NetConf::parse(stdin)?;
    let deadline = Instant::now() + Duration::from_secs(conf.timeout_seconds);
    // Only Kubernetes pods are the agent's; anything else passes through.
    let pod = (
        env.arg("K8S_POD_NAMESPACE"),
        env.arg("K8S_POD_NAME"),
        env.arg("K8S_POD_UID"),
    );
    match env.command {
        Command::Version => unreachable!("answered above"),
        Command::Add => {
            let prev = conf.prev_result.clone().ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "no prevResult",
                    "authz-cni is chained after the network plugin in a conflist",
                )
            })?;
            let (Some(namespace), Some(name)) = (pod.0, pod.1) else {
                log("not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME): passed through");
                return Ok(Some(prev));
            };
            let Some(uid) = pod.2 else {
                return unreachable_agent(
                    &conf,
                    Some(prev),
                    log,
                    CniError::new(
                        code::INVALID_ENV,
                        "K8S_POD_UID missing",
                        "the runtime does not name the pod's uid; the agent cannot find the pod",
                    ),
                );
            };
            let claim = PodClaim {
                container_id: env.container_id.clone(),
                netns: env.netns.clone().into(),
                ifname: env.ifname.clone(),
                namespace: namespace.into(),
                name: name.into(),
                uid: uid.into(),
                ips: pod_ips(&prev)?,
            };
            match ask_until(agent, &Request::Add(claim), deadline) {
                Ok(Reply::Ok(_)) => Ok(Some(prev)),
                Ok(Reply::Error(why)) => Err(CniError::new(
                    code::REFUSED,
                    "the node agent did not enroll the pod",
                    why,
                )),
                Err(e) => unreachable_agent(&conf, Some(prev), log, agent_down(&conf, e)),
            }
        }
        Command::Del => {
            // Best effort: DEL must succeed when there is nothing left to release.
            if pod.0.is_some() {
                let req = Request::Del {
                    container_id: env.container_id.clone(),
                };
                match ask_until(agent, &req, deadline) {
                    Ok(Reply::Ok(_)) => {}
                    Ok(Reply::Error(why)) => log(&format!("DEL: the agent said: {why}")),
                    Err(e) => log(&format!(
                        "DEL: agent at {} not reached ({e}); it releases the pod when it finds it gone",
                        conf.agent_socket.display()
                    )),
                }
            }
            Ok(None)
        }
        Command::Check => {
            if !conf.at_least_0_4() {
                return Err(CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    "CHECK needs cniVersion 0.4.0 or later",
                    conf.cni_version.clone(),
                ));
            }
            if conf.prev_result.is_none() {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "no prevResult",
                    "CHECK needs the previous result",
                ));
            }
            if pod.0.is_none() || pod.1.is_none() {
                return Ok(None);
            }
            let req = Request::Check {
                container_id: env.container_id.clone(),
            };
            match ask_until(agent, &req, deadline) {
                Ok(Reply::Ok(_)) => Ok(None),
                Ok(Reply::Error(why)) => Err(CniError::new(
                    code::REFUSED,
                    "the pod is not enrolled as ADD left it",
                    why,
                )),
                Err(e) => unreachable_agent(&conf, None, log, agent_down(&conf, e)),
            }
        }
    }
}

fn agent_down(conf: &NetConf, e: std::io::Error) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        "the node agent cannot be reached",
        format!(
            "{}: {e} (for {} s; failMode closed)",
            conf.agent_socket.display(),
            conf.timeout_seconds
        ),
    )
}

/// `failMode`: closed refuses, open lets the pod start (and says so on stderr).
fn unreachable_agent(
    conf: &NetConf,
    pass: Output,
    log: &mut dyn FnMut(&str),
    err: CniError,
) -> Result<Output, CniError> {
    match conf.fail_mode {
        FailMode::Closed => Err(err),
        FailMode::Open => {
            log(&format!(
                "{}: {}; failMode open: the pod starts and the agent enrolls it when it finds it",
                err.msg, err.details
            ));
            Ok(pass)
        }
    }
}

#[cfg(test)]
mod tests;
