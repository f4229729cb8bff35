//! The plugin against the CNI spec's examples (1.0.0 and 0.4.0 results) and a scripted agent.
use std::io::{Error, ErrorKind};

use super::*;
use crate::wire::Outcome;

/// The spec's 1.0.0 example result (bridge + host-local).
fn result_1_0_0() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "00:11:22:33:44:55"},
            {"name": "veth3243", "mac": "55:44:33:22:11:11"},
            {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}
        ],
        "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.1.0.1"]}
    })
}

/// The spec's 0.4.0 result shape: `version` per address, IPv4 and IPv6, and an address on the
/// host's side that is not the pod's.
fn result_0_4_0() -> Value {
    json!({
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "cni0", "mac": "00:11:22:33:44:55"},
            {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}
        ],
        "ips": [
            {"version": "4", "address": "10.0.0.5/32", "gateway": "10.0.0.1", "interface": 1},
            {"version": "6", "address": "2001:db8::5/64", "interface": 1},
            {"version": "4", "address": "10.0.0.1/24", "interface": 0}
        ],
        "dns": {}
    })
}

fn conf(version: &str, prev: Option<Value>, extra: Value) -> Vec<u8> {
    let mut c = json!({"cniVersion": version, "name": "k8s-pod-network", "type": "authz-cni"});
    if let Some(p) = prev {
        c["prevResult"] = p;
    }
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn env(command: &str, args: &str) -> Env {
    let vars = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/blue"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
    ];
    Env::from(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap()
}

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=foo;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=1b4e28ba-2fa1-11d2-883f-0016d3cca427";

/// An agent that answers from a script and records what it was asked.
struct Scripted {
    answers: Vec<std::io::Result<Reply>>,
    asked: Vec<Request>,
}

impl Scripted {
    fn new(answers: Vec<std::io::Result<Reply>>) -> Scripted {
        Scripted {
            answers,
            asked: vec![],
        }
    }
}

impl Agent for Scripted {
    fn ask(&mut self, req: &Request, _deadline: Instant) -> std::io::Result<Reply> {
        self.asked.push(req.clone());
        if self.answers.is_empty() {
            return Err(Error::new(ErrorKind::ConnectionRefused, "no agent"));
        }
        self.answers.remove(0)
    }
}

fn run(e: &Env, stdin: &[u8], agent: &mut Scripted) -> (Result<Output, CniError>, Vec<String>) {
    let mut logged = vec![];
    let r = handle(e, stdin, agent, &mut |m| logged.push(m.to_string()));
    (r, logged)
}

#[test]
fn add_hands_the_pod_over_and_passes_the_result_through_1_0_0() {
    let mut agent = Scripted::new(vec![Ok(Reply::Ok(Outcome::Enrolled))]);
    let (out, _) = run(
        &env("ADD", POD_ARGS),
        &conf("1.0.0", Some(result_1_0_0()), json!({})),
        &mut agent,
    );
    assert_eq!(out.unwrap(), Some(result_1_0_0()), "prevResult unchanged");
    assert_eq!(
        agent.asked,
        [Request::Add(PodClaim {
            container_id: "abc123".into(),
            netns: "/var/run/netns/blue".into(),
            ifname: "eth0".into(),
            namespace: "foo".into(),
            name: "web-1".into(),
            uid: "1b4e28ba-2fa1-11d2-883f-0016d3cca427".into(),
            ips: vec!["10.1.0.5".parse().unwrap()],
        })]
    );
}

#[test]
fn the_pods_addresses_are_those_inside_the_sandbox_0_4_0() {
    assert_eq!(
        pod_ips(&result_0_4_0()).unwrap(),
        [
            "10.0.0.5".parse::<IpAddr>().unwrap(),
            "2001:db8::5".parse().unwrap()
        ],
        "the bridge's own address is not the pod's"
    );
    let mut agent = Scripted::new(vec![Ok(Reply::Ok(Outcome::Enrolled))]);
    let (out, _) = run(
        &env("ADD", POD_ARGS),
        &conf("0.4.0", Some(result_0_4_0()), json!({})),
        &mut agent,
    );
    assert_eq!(out.unwrap(), Some(result_0_4_0()));
    assert!(pod_ips(&json!({"ips": [{"address": "not-an-ip/24"}]})).is_err());
    assert!(pod_ips(&json!({"ips": [{"gateway": "10.0.0.1"}]})).is_err());
}

#[test]
fn an_agent_restarting_mid_add_is_asked_again() {
    let mut agent = Scripted::new(vec![
        Err(Error::new(
            ErrorKind::UnexpectedEof,
            "closed before replying",
        )),
        Err(Error::new(ErrorKind::ConnectionRefused, "not listening")),
        Ok(Reply::Ok(Outcome::Enrolled)),
    ]);
    let (out, _) = run(
        &env("ADD", POD_ARGS),
        &conf("1.0.0", Some(result_1_0_0()), json!({})),
        &mut agent,
    );
    assert!(out.is_ok());
    assert_eq!(agent.asked.len(), 3);
    assert_eq!(agent.asked[0], agent.asked[2], "the same request again");
}

#[test]
fn fail_mode_decides_when_the_agent_is_not_there() {
    let stdin = |mode: &str| {
        conf(
            "1.0.0",
            Some(result_1_0_0()),
            json!({"failMode": mode, "timeoutSeconds": 1}),
        )
    };
    let (out, _) = run(
        &env("ADD", POD_ARGS),
        &stdin("closed"),
        &mut Scripted::new(vec![]),
    );
    let err = out.unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN_LATER);
    let printed = err.to_json("1.0.0");
    assert_eq!(printed["cniVersion"], "1.0.0");
    assert_eq!(printed["code"], 11);
    assert!(printed["msg"]
        .as_str()
        .unwrap()
        .contains("cannot be reached"));

    let (out, logged) = run(
        &env("ADD", POD_ARGS),
        &stdin("open"),
        &mut Scripted::new(vec![]),
    );
    assert_eq!(out.unwrap(), Some(result_1_0_0()));
    assert!(logged[0].contains("failMode open"), "{logged:?}");
}

#[test]
fn a_refusal_fails_the_add_whatever_the_fail_mode() {
    let mut agent = Scripted::new(vec![Ok(Reply::Error("no cgroup for the pod".into()))]);
    let (out, _) = run(
        &env("ADD", POD_ARGS),
        &conf("1.0.0", Some(result_1_0_0()), json!({"failMode": "open"})),
        &mut agent,
    );
    let err = out.unwrap_err();
    assert_eq!(err.code, code::REFUSED);
    assert!(err.details.contains("no cgroup"));
}

#[test]
fn not_a_kubernetes_pod_passes_through_and_asks_nothing() {
    let mut agent = Scripted::new(vec![]);
    let (out, _) = run(
        &env("ADD", "IgnoreUnknown=1"),
        &conf("1.0.0", Some(result_1_0_0()), json!({})),
        &mut agent,
    );
    assert_eq!(out.unwrap(), Some(result_1_0_0()));
    assert!(agent.asked.is_empty());
}

#[test]
fn del_always_succeeds_and_prints_nothing() {
    let mut agent = Scripted::new(vec![]);
    let (out, logged) = run(
        &env("DEL", POD_ARGS),
        &conf("1.0.0", None, json!({"timeoutSeconds": 1})),
        &mut agent,
    );
    assert_eq!(out.unwrap(), None);
    assert!(logged[0].contains("not reached"));
    let mut agent = Scripted::new(vec![Ok(Reply::Ok(Outcome::Released))]);
    let (out, _) = run(
        &env("DEL", POD_ARGS),
        &conf("0.4.0", Some(result_0_4_0()), json!({})),
        &mut agent,
    );
    assert_eq!(out.unwrap(), None);
    assert_eq!(
        agent.asked,
        [Request::Del {
            container_id: "abc123".into()
        }]
    );
}

#[test]
fn check_asks_the_agent_and_needs_0_4_0() {
    let mut agent = Scripted::new(vec![Ok(Reply::Error("not enrolled".into()))]);
    let (out, _) = run(
        &env("CHECK", POD_ARGS),
        &conf("1.0.0", Some(result_1_0_0()), json!({})),
        &mut agent,
    );
    assert_eq!(out.unwrap_err().code, code::REFUSED);
    let mut agent = Scripted::new(vec![Ok(Reply::Ok(Outcome::Enrolled))]);
    let (out, _) = run(
        &env("CHECK", POD_ARGS),
        &conf("0.4.0", Some(result_0_4_0()), json!({})),
        &mut agent,
    );
    assert_eq!(out.unwrap(), None);
    let (out, _) = run(
        &env("CHECK", POD_ARGS),
        &conf("0.3.1", Some(result_0_4_0()), json!({})),
        &mut Scripted::new(vec![]),
    );
    assert_eq!(out.unwrap_err().code, code::INCOMPATIBLE_VERSION);
}

#[test]
fn version_and_bad_input_answer_as_the_spec_says() {
    let e = env("VERSION", "");
    let (out, _) = run(&e, br#"{"cniVersion":"1.0.0"}"#, &mut Scripted::new(vec![]));
    let v = out.unwrap().unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x == "0.4.0"));
    let add = env("ADD", POD_ARGS);
    let (out, _) = run(&add, b"{not json", &mut Scripted::new(vec![]));
    assert_eq!(out.unwrap_err().code, code::DECODE);
    let (out, _) = run(
        &add,
        &conf("2.0.0", Some(result_1_0_0()), json!({})),
        &mut Scripted::new(vec![]),
    );
    assert_eq!(out.unwrap_err().code, code::INCOMPATIBLE_VERSION);
    let (out, _) = run(
        &add,
        &conf("1.0.0", None, json!({})),
        &mut Scripted::new(vec![]),
    );
    assert_eq!(
        out.unwrap_err().code,
        code::INVALID_CONFIG,
        "a chained plugin needs prevResult"
    );
    let missing = Env::from(|k| (k == "CNI_COMMAND").then(|| "ADD".to_string()));
    assert_eq!(missing.unwrap_err().code, code::INVALID_ENV);
    let del_without_netns = Env::from(|k| match k {
        "CNI_COMMAND" => Some("DEL".into()),
        "CNI_CONTAINERID" => Some("x".into()),
        "CNI_IFNAME" => Some("eth0".into()),
        _ => None,
    });
    assert!(
        del_without_netns.is_ok(),
        "DEL may come after the netns is gone"
    );
}

#[test]
fn the_wire_format_is_one_json_object() {
    let req = Request::Del {
        container_id: "c".into(),
    };
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        r#"{"op":"del","containerId":"c"}"#
    );
    let r: Reply = serde_json::from_str(r#"{"ok":"enrolled"}"#).unwrap();
    assert_eq!(r, Reply::Ok(Outcome::Enrolled));
    assert!(serde_json::from_str::<Request>(r#"{"op":"del","containerId":"c","x":1}"#).is_err());
}
