//! Identity the kernel vouches for: at the destination a peer is known by its address, so no pod
//! may send from an address that is not its own. A pod with CAP_NET_RAW tries what it can: claim
//! another pod's or the node's address in ARP and neighbour discovery, and send TCP from it.
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use authz_tests::*;

/// MAC address of `host`'s eth0.
fn mac_of(host: &Host) -> String {
    let out = Net::run(host, false, "cat", &["/sys/class/net/eth0/address"]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The link-layer address `host` has for `ip`, if any.
fn neighbour(host: &Host, ip: &str) -> Option<String> {
    let out = Net::run(host, false, "ip", &["neigh", "show", ip, "dev", "eth0"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_string)
}

fn ip_in(host: &Host, args: &[&str]) {
    let out = Net::run(host, false, "ip", args).unwrap();
    assert!(
        out.status.success(),
        "ip {args:?} in {}: {}",
        host.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The request `host` makes from a process outside its pod's cgroup (what a raw socket is to
/// the kernel: no connect hook sees it), from source address `from`.
fn forged_get(host: &Host, from: &str, url: &str) -> (u16, String) {
    let out = Net::run(
        host,
        false,
        "curl",
        &[
            "-sS",
            "-g",
            "-m",
            "3",
            "--interface",
            from,
            "-w",
            "\n%{http_code}",
            url,
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn forge(attacker: &Host, args: &[&str]) {
    let out = Net::run(attacker, true, &testsrv(), args).unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `authz_source_dropped_total` of one pod, by kind.
fn dropped(agent: &Agent, pod: &str) -> HashMap<String, f64> {
    let (_, text) = http_get(agent.admin, "/metrics").unwrap();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("authz_source_dropped_total{")?;
            let (labels, v) = rest.split_once("} ")?;
            labels
                .contains(&format!("pod=\"{pod}\""))
                .then(|| {
                    let kind = labels.split("kind=\"").nth(1)?.trim_end_matches('"');
                    Some((kind.to_string(), v.parse().ok()?))
                })
                .flatten()
        })
        .collect()
}

/// Packets a matchall filter on `dev` (in the hub) has seen.
fn filter_packets(net: &Net, dev: &str) -> u64 {
    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            net.hub(),
            "tc",
            "-s",
            "filter",
            "show",
            "dev",
            dev,
            "ingress",
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split("Sent ")
        .skip(1)
        .filter_map(|s| {
            s.split(" pkt")
                .next()?
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: who, namespace: foo}
spec:
  selector: {matchLabels: {app: victim}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/trusted"]}}]
  - from: [{source: {ipBlocks: ["NODE"]}}]
    to: [{operation: {paths: ["/node"]}}]
"#;

/// Fields drop in order: the agent stops before the namespaces go.
struct Scene {
    agent: Agent,
    net: Net,
    victim: Host,
    trusted: Host,
    attacker: Host,
}

/// A protected pod that lets in only the `trusted` pod's principal, and the node on `/node`; an
/// attacker pod beside them on the bridge. With `v6`, every pod also has `fd77:<subnet>::<n>`.
fn scene(v6: bool) -> Scene {
    let mut net = Net::new().unwrap();
    net.attach_host().unwrap();
    let mut victim = net.host("victim", 2).unwrap();
    let mut trusted = net.host("trusted", 3).unwrap();
    let mut attacker = net.host("attacker", 4).unwrap();
    let node = if v6 {
        let node6 = format!("fd77:{}::fe", net.subnet);
        for (h, last) in [(&mut victim, 2), (&mut trusted, 3), (&mut attacker, 4)] {
            let a = format!("fd77:{}::{last}", net.subnet);
            ip_in(
                h,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
            h.ip = format!("{}, {a}", h.ip);
        }
        node6
    } else {
        format!("10.77.{}.254", net.subnet)
    };
    // The server answers on every address of the victim.
    net.spawn(&victim, &testsrv(), &["http", "[::]:8000"])
        .unwrap();
    wait_listening(&victim, 8000).unwrap();
    // A CNI's own filter on the attacker's interface (mirroring what the pod sends to a spare
    // interface), which must keep seeing its packets.
    let hub = |args: &[&str]| {
        let mut a = vec!["netns", "exec", net.hub()];
        a.extend_from_slice(args);
        sh("ip", &a).unwrap();
    };
    hub(&[
        "ip", "link", "add", "mirror0", "type", "veth", "peer", "name", "mirror1",
    ]);
    hub(&["ip", "link", "set", "mirror0", "up"]);
    hub(&["ip", "link", "set", "mirror1", "up"]);
    hub(&["tc", "qdisc", "add", "dev", &attacker.host_if, "clsact"]);
    hub(&[
        "tc",
        "filter",
        "add",
        "dev",
        &attacker.host_if,
        "ingress",
        "pref",
        "50",
        "protocol",
        "all",
        "u32",
        "match",
        "u32",
        "0",
        "0",
        "at",
        "0",
        "action",
        "mirred",
        "egress",
        "mirror",
        "dev",
        "mirror0",
    ]);
    let policy = POLICY.replace("NODE", &node);
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}{}{}policies: [policies]\n",
        pod_yaml(&victim, "foo", "{app: victim}", "victim"),
        pod_yaml(&trusted, "foo", "{app: trusted}", "trusted"),
        pod_yaml(&attacker, "foo", "{app: attacker}", "attacker"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/who.yaml", &policy)]).unwrap();
    Scene {
        agent,
        net,
        victim,
        trusted,
        attacker,
    }
}

/// IPv4: an attacker pod claims the trusted pod's and the node's addresses in ARP, then sends TCP
/// from them. The node drops all of it at the attacker's interface, counted; the trusted pod and
/// the node keep their access and their neighbour entries; a CNI's filter on the same interface
/// still runs.
#[test]
fn a_pod_cannot_claim_another_pods_or_the_nodes_ipv4_address() {
    if !require_root() {
        return;
    }
    let s = scene(false);
    let subnet = s.net.subnet;
    let (victim_ip, trusted_ip) = (s.victim.ip.clone(), s.trusted.ip.clone());
    let node_ip = format!("10.77.{subnet}.254");
    let url = |p: &str| format!("http://{victim_ip}:8000{p}");
    let node_url = SocketAddr::new(victim_ip.parse().unwrap(), 8000);

    let before = filter_packets(&s.net, &s.attacker.host_if);
    assert_eq!(curl(&s.trusted, true, &[&url("/x")]).unwrap().0, 200);
    assert_eq!(curl(&s.attacker, true, &[&url("/x")]).unwrap().0, 403);
    assert_eq!(http_get(node_url, "/node").unwrap().0, 200);
    assert!(
        filter_packets(&s.net, &s.attacker.host_if) > before,
        "the other filter on the attacker's interface still sees its packets"
    );
    // The victim knows the trusted pod and the node; the kernel ignores ARP updates for an
    // entry younger than its locktime (1 s).
    let trusted_mac = mac_of(&s.trusted);
    assert_eq!(neighbour(&s.victim, &trusted_ip), Some(trusted_mac.clone()));
    let node_mac = neighbour(&s.victim, &node_ip).expect("the victim knows the node");
    std::thread::sleep(Duration::from_millis(1200));

    // ARP replies claiming the trusted pod's and the node's addresses.
    let victim_mac = mac_of(&s.victim);
    for claimed in [&trusted_ip, &node_ip] {
        forge(
            &s.attacker,
            &["forge-arp", "eth0", claimed, &victim_ip, &victim_mac],
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(neighbour(&s.victim, &trusted_ip), Some(trusted_mac));
    assert_eq!(neighbour(&s.victim, &node_ip), Some(node_mac));
    assert_eq!(
        http_get(node_url, "/node").unwrap().0,
        200,
        "the node still reaches the victim"
    );

    // TCP from the claimed addresses, with the victim's neighbour entries poisoned by hand (as
    // the ARP replies would have done): nothing reaches the victim.
    let attacker_mac = mac_of(&s.attacker);
    for claimed in [&trusted_ip, &node_ip] {
        ip_in(
            &s.attacker,
            &["addr", "add", &format!("{claimed}/32"), "dev", "eth0"],
        );
        ip_in(
            &s.victim,
            &[
                "neigh",
                "replace",
                claimed,
                "lladdr",
                &attacker_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
    }
    for (from, path) in [(&trusted_ip, "/x"), (&node_ip, "/node")] {
        let (code, body) = forged_get(&s.attacker, from, &url(path));
        assert_eq!(
            code,
            0,
            "from {from} (forged): {body}\n{}",
            s.agent.log_text()
        );
    }
    let d = dropped(&s.agent, "foo/attacker");
    assert!(d.get("arp").copied().unwrap_or(0.0) >= 2.0, "{d:?}");
    assert!(d.get("ipv4").copied().unwrap_or(0.0) >= 2.0, "{d:?}");
    let t = dropped(&s.agent, "foo/trusted");
    assert_eq!(
        t.values().sum::<f64>(),
        0.0,
        "nothing of the trusted pod's: {t:?}"
    );
    for claimed in [&trusted_ip, &node_ip] {
        ip_in(&s.victim, &["neigh", "del", claimed, "dev", "eth0"]);
    }
    assert_eq!(curl(&s.trusted, true, &[&url("/x")]).unwrap().0, 200);
    assert_eq!(http_get(node_url, "/node").unwrap().0, 200);
}

/// IPv6: the same with neighbour advertisements and IPv6 sources.
#[test]
fn a_pod_cannot_claim_another_pods_ipv6_address() {
    if !require_root() {
        return;
    }
    let s = scene(true);
    let subnet = s.net.subnet;
    let v6 = |last: u8| format!("fd77:{subnet}::{last}");
    let (victim6, trusted6, attacker6) = (v6(2), v6(3), v6(4));
    let url = |p: &str| format!("http://[{victim6}]:8000{p}");
    assert_eq!(curl(&s.trusted, true, &["-g", &url("/x")]).unwrap().0, 200);
    assert_eq!(curl(&s.attacker, true, &["-g", &url("/x")]).unwrap().0, 403);
    let trusted_mac = mac_of(&s.trusted);
    assert_eq!(neighbour(&s.victim, &trusted6), Some(trusted_mac.clone()));

    let victim_mac = mac_of(&s.victim);
    forge(
        &s.attacker,
        &[
            "forge-na",
            "eth0",
            &attacker6,
            &trusted6,
            &victim6,
            &victim_mac,
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(neighbour(&s.victim, &trusted6), Some(trusted_mac));

    let attacker_mac = mac_of(&s.attacker);
    ip_in(
        &s.attacker,
        &[
            "-6",
            "addr",
            "add",
            &format!("{trusted6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip_in(
        &s.victim,
        &[
            "-6",
            "neigh",
            "replace",
            &trusted6,
            "lladdr",
            &attacker_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    let (code, body) = forged_get(&s.attacker, &trusted6, &url("/x"));
    assert_eq!(code, 0, "forged: {body}\n{}", s.agent.log_text());
    let d = dropped(&s.agent, "foo/attacker");
    assert!(d.get("nd").copied().unwrap_or(0.0) >= 1.0, "{d:?}");
    assert!(d.get("ipv6").copied().unwrap_or(0.0) >= 1.0, "{d:?}");
    ip_in(&s.victim, &["-6", "neigh", "del", &trusted6, "dev", "eth0"]);
    assert_eq!(curl(&s.trusted, true, &["-g", &url("/x")]).unwrap().0, 200);
}

/// A root process in a protected pod binds the agent's listeners' ports in the pod with
/// SO_REUSEPORT: it must not receive any of the connections handed over for a decision.
#[test]
fn a_pod_process_cannot_take_connections_meant_for_the_agent() {
    if !require_root() {
        return;
    }
    use std::io::{BufRead, BufReader};
    let mut net = Net::new().unwrap();
    let victim = net.host("victim", 2).unwrap();
    let client = net.host("client", 3).unwrap();
    net.serve(&victim, "http", 8000).unwrap();
    let deny_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: allow-nothing, namespace: foo}\n\
        spec: {selector: {matchLabels: {app: victim}}}\n";
    let cfg = format!(
        "agent: {{admin: \"{{ADMIN}}\"}}\npods:\n{}{}policies: [policies]\n",
        pod_yaml(&victim, "foo", "{app: victim}", "victim"),
        pod_yaml(&client, "foo", "{app: client}", "client"),
    );
    let agent = Agent::start_with_files(&cfg, &[("policies/deny.yaml", deny_all)]).unwrap();
    let url = format!("http://{}:8000/x", victim.ip);
    assert_eq!(curl(&client, true, &[&url]).unwrap().0, 403);

    let ports: Vec<String> = loopback_listeners(&victim)
        .iter()
        .map(u16::to_string)
        .collect();
    assert!(!ports.is_empty());
    let mut args = vec!["steal", "6"];
    args.extend(ports.iter().map(String::as_str));
    let mut thief = Net::command(&victim, true, &testsrv(), &args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(thief.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("joined"), "{line}");
    let mut served = vec![];
    for _ in 0..30 {
        served.push(curl(&client, true, &[&url]).map(|r| r.0).unwrap_or(0));
    }
    line.clear();
    out.read_line(&mut line).unwrap();
    let _ = thief.wait();
    assert_eq!(line.trim(), "stolen 0", "{served:?}\n{}", agent.log_text());
    assert!(served.iter().all(|c| *c == 403), "{served:?}");
}
