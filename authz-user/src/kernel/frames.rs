//! Frames as a pod sends them, for the source check's table test and its cost benchmark.
use std::net::{Ipv4Addr, Ipv6Addr};

const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 9];

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![];
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A TCP SYN from `src` (IPv4).
pub fn ipv4_tcp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&[
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff,
    ]);
    ip.extend_from_slice(&[0, 0, 0, 0]);
    ethernet(0x0800, &ip)
}

/// An ARP reply saying `sender` is at the pod's MAC; `ptype` IPv4 (0x0800) unless told.
pub fn arp(sender: Ipv4Addr, ptype: u16) -> Vec<u8> {
    let mut a = vec![0, 1];
    a.extend_from_slice(&ptype.to_be_bytes());
    a.extend_from_slice(&[6, 4, 0, 2]);
    a.extend_from_slice(&POD_MAC);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&PEER_MAC);
    a.extend_from_slice(&[10, 0, 0, 9]);
    ethernet(0x0806, &a)
}

/// An IPv6 packet from `src`: `headers` (extension headers, each `(next header, bytes)`) then
/// `upper` (protocol `proto`).
pub fn ipv6(src: Ipv6Addr, headers: &[(u8, Vec<u8>)], proto: u8, upper: &[u8]) -> Vec<u8> {
    let mut body = vec![];
    let first = headers.first().map_or(proto, |h| h.0);
    for (i, (_, h)) in headers.iter().enumerate() {
        let mut h = h.clone();
        h[0] = headers.get(i + 1).map_or(proto, |n| n.0);
        body.extend_from_slice(&h);
    }
    body.extend_from_slice(upper);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(body.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[first, 255]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&"fd00::9".parse::<Ipv6Addr>().unwrap().octets());
    ip.extend_from_slice(&body);
    ethernet(0x86dd, &ip)
}

/// A TCP SYN's header (for `ipv6`, protocol 6).
pub fn tcp_syn() -> Vec<u8> {
    vec![
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]
}

/// An ICMPv6 neighbour discovery message of `kind` (135 solicitation, 136 advertisement, 134
/// router advertisement) about `target` (for `ipv6`, protocol 58).
pub fn nd(kind: u8, target: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&POD_MAC);
    m
}

/// An 8-byte destination-options (or hop-by-hop) header; its next header is filled by `ipv6`.
pub fn options_header() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// A fragment header (first fragment); its next header is filled by `ipv6`.
pub fn fragment_header() -> Vec<u8> {
    vec![0, 0, 0, 1, 0, 0, 0, 7]
}

/// A frame of another ethertype (e.g. 0x8100, a VLAN tag, or 0x88cc, LLDP).
pub fn other(ethertype: u16) -> Vec<u8> {
    ethernet(ethertype, &[0; 46])
}
