//! The source check's verdicts, run by the kernel (`BPF_PROG_TEST_RUN`) on frames as a pod sends
//! them: its own addresses pass; another's, in any header that claims one, is dropped. Needs
//! root (outside CI the test says so and passes; in CI it must run).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use authz::kernel::{frames::*, source::Harness};

fn root() -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "must run as root in CI");
    eprintln!("skipped: needs root to load the program");
    false
}

#[test]
fn a_pod_sends_from_its_own_addresses_only() {
    if !root() {
        return;
    }
    let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    let own: Vec<IpAddr> = ["10.0.0.2", "fd00::2", "fe80::2"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let h = Harness::new(&own).unwrap();
    let unspecified = Ipv6Addr::UNSPECIFIED;
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "IPv4 from its address",
            ipv4_tcp(v4("10.0.0.2"), v4("10.0.0.9")),
            true,
        ),
        (
            "IPv4 from another pod's",
            ipv4_tcp(v4("10.0.0.3"), v4("10.0.0.9")),
            false,
        ),
        (
            "IPv4 from the node's",
            ipv4_tcp(v4("10.0.0.254"), v4("10.0.0.9")),
            false,
        ),
        ("ARP for its address", arp(v4("10.0.0.2"), 0x0800), true),
        ("ARP probe (0.0.0.0)", arp(v4("0.0.0.0"), 0x0800), true),
        (
            "ARP claiming another address",
            arp(v4("10.0.0.3"), 0x0800),
            false,
        ),
        (
            "ARP of another protocol",
            arp(v4("10.0.0.2"), 0x86dd),
            false,
        ),
        (
            "IPv6 from its address",
            ipv6(v6("fd00::2"), &[], 6, &tcp_syn()),
            true,
        ),
        (
            "IPv6 from its link-local",
            ipv6(v6("fe80::2"), &[], 6, &tcp_syn()),
            true,
        ),
        (
            "IPv6 from another pod's",
            ipv6(v6("fd00::3"), &[], 6, &tcp_syn()),
            false,
        ),
        (
            "IPv6 from another link-local",
            ipv6(v6("fe80::3"), &[], 6, &tcp_syn()),
            false,
        ),
        ("TCP from ::", ipv6(unspecified, &[], 6, &tcp_syn()), false),
        (
            "NA for its address",
            ipv6(v6("fe80::2"), &[], 58, &nd(136, v6("fd00::2"))),
            true,
        ),
        (
            "NA for another's",
            ipv6(v6("fe80::2"), &[], 58, &nd(136, v6("fd00::3"))),
            false,
        ),
        (
            "NA for another's behind options",
            ipv6(
                v6("fd00::2"),
                &[(60, options_header())],
                58,
                &nd(136, v6("fd00::3")),
            ),
            false,
        ),
        (
            "NA for another's behind two headers",
            ipv6(
                v6("fd00::2"),
                &[(0, options_header()), (60, options_header())],
                58,
                &nd(136, v6("fd00::3")),
            ),
            false,
        ),
        (
            "NS for a neighbour",
            ipv6(v6("fd00::2"), &[], 58, &nd(135, v6("fd00::9"))),
            true,
        ),
        (
            "DAD probe of its address",
            ipv6(unspecified, &[], 58, &nd(135, v6("fd00::2"))),
            true,
        ),
        (
            "DAD probe of another's",
            ipv6(unspecified, &[], 58, &nd(135, v6("fd00::3"))),
            false,
        ),
        (
            "router advertisement",
            ipv6(v6("fe80::2"), &[], 58, &nd(134, v6("::"))),
            false,
        ),
        (
            "redirect",
            ipv6(v6("fe80::2"), &[], 58, &nd(137, v6("fd00::3"))),
            false,
        ),
        (
            "a fragment from its address",
            ipv6(v6("fd00::2"), &[(44, fragment_header())], 6, &tcp_syn()),
            true,
        ),
        (
            "a fragment from ::",
            ipv6(
                unspecified,
                &[(44, fragment_header())],
                58,
                &nd(136, v6("fd00::2")),
            ),
            false,
        ),
        (
            "more extension headers than are walked",
            ipv6(
                v6("fd00::2"),
                &vec![(60, options_header()); 7],
                58,
                &nd(136, v6("fd00::2")),
            ),
            false,
        ),
        ("a VLAN-tagged frame", other(0x8100), false),
        ("another ethertype", other(0x88cc), false),
    ];
    let mut wrong = vec![];
    for (what, frame, pass) in &cases {
        let (got, _) = h.run(frame, 1).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        if got != *pass {
            wrong.push(format!(
                "{what}: {}",
                if got { "passed" } else { "dropped" }
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
