//! What the source check costs per packet: the kernel runs the program (`BPF_PROG_TEST_RUN`) a
//! million times on each kind of frame and reports its mean time per run; five rounds, the
//! kinds alternating, median shown. Needs root.
//!
//!     sudo cargo run --release -p authz-user --example source_check_cost
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use authz::kernel::{frames::*, source::Harness};

fn main() -> anyhow::Result<()> {
    let own: Vec<IpAddr> = ["10.0.0.2", "fd00::2", "fe80::2"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let h = Harness::new(&own)?;
    let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    let kinds: Vec<(&str, Vec<u8>)> = vec![
        (
            "IPv4 TCP from the pod's address (passes)",
            ipv4_tcp(v4("10.0.0.2"), v4("10.0.0.9")),
        ),
        (
            "IPv4 TCP from another address (dropped)",
            ipv4_tcp(v4("10.0.0.3"), v4("10.0.0.9")),
        ),
        (
            "IPv6 TCP from the pod's address (passes)",
            ipv6(v6("fd00::2"), &[], 6, &tcp_syn()),
        ),
        (
            "ARP reply for the pod's address (passes)",
            arp(v4("10.0.0.2"), 0x0800),
        ),
        (
            "neighbour advertisement behind an options header (checked, passes)",
            ipv6(
                v6("fd00::2"),
                &[(60, options_header())],
                58,
                &nd(136, v6("fd00::2")),
            ),
        ),
    ];
    const ROUNDS: usize = 5;
    const REPEAT: u32 = 1_000_000;
    let mut ns: Vec<Vec<f64>> = vec![vec![]; kinds.len()];
    for _ in 0..ROUNDS {
        for (i, (_, frame)) in kinds.iter().enumerate() {
            let (_, d) = h.run(frame, REPEAT)?;
            ns[i].push(d.as_nanos() as f64);
        }
    }
    println!("source check, kernel's mean time per packet ({ROUNDS} rounds of {REPEAT}, median, min-max):");
    for ((what, _), mut v) in kinds.iter().zip(ns) {
        v.sort_by(f64::total_cmp);
        println!(
            "  {:>5.1} ns  ({:.1}-{:.1})  {what}",
            v[ROUNDS / 2],
            v[0],
            v[ROUNDS - 1]
        );
    }
    Ok(())
}
