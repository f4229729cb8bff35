//! Addresses in the kernel maps' form: IPv6 words in network order, IPv4 as v4-mapped.
use std::net::{IpAddr, Ipv6Addr};

pub fn addr_key(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

pub fn key_addr(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    v6.to_ipv4_mapped()
        .map(IpAddr::V4)
        .unwrap_or(IpAddr::V6(v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trips_and_matches_kernel_layout() {
        let ip: IpAddr = "10.77.0.3".parse().unwrap();
        let k = addr_key(ip);
        assert_eq!(k[3], u32::from_ne_bytes([10, 77, 0, 3]));
        assert_eq!(k[2], u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        assert_eq!(
            authz_common::v4_mapped(u32::from_ne_bytes([10, 77, 0, 3])),
            k
        );
        assert_eq!(key_addr(k), ip);
    }

    #[test]
    fn v6_round_trips() {
        let ip: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(key_addr(addr_key(ip)), ip);
    }
}
