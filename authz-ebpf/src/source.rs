//! tc ingress on the host side of each protected pod's interface (where the pod's packets enter
//! the node; a filter inside the pod could be skipped by a raw socket): a pod's packets must carry
//! one of its own addresses. IPv4 and IPv6 sources, ARP senders and neighbour advertisement
//! targets are checked, so no pod can take another pod's or the node's address, and identity at
//! the destination (the peer address) is what the node vouches for.
use core::ptr::read_volatile;

use authz_common::{v4_mapped, Addr, SourceDrops, SourcePod};
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};

use crate::maps::{SOURCE_DROPS, SOURCE_PODS};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_ICMPV6: u8 = 58;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;
/// Extension headers walked before giving up (and dropping).
const MAX_EXT_HEADERS: usize = 6;

/// Why a packet was dropped: the `SourceDrops` field it counts in.
enum Forged {
    Ipv4,
    Ipv6,
    Arp,
    Nd,
    Other,
}

#[classifier]
pub fn authz_source(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let (ifindex, vlan) = unsafe {
        (
            read_volatile(&(*skb).ifindex),
            read_volatile(&(*skb).vlan_present),
        )
    };
    // Attached, but no entry: the pod is being bound or released. Nothing gets out unchecked.
    let Some(pod) = (unsafe { SOURCE_PODS.get(&ifindex) }) else {
        return TC_ACT_SHOT as i32;
    };
    let verdict = if vlan != 0 {
        Err(Forged::Other)
    } else {
        check(&ctx, pod)
    };
    match verdict {
        // Next filter (a CNI's program on the same interface), then the stack.
        Ok(()) => TC_ACT_UNSPEC,
        Err(kind) => {
            count_drop(ifindex, kind);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn check(ctx: &TcContext, pod: &SourcePod) -> Result<(), Forged> {
    let proto = u16::from_be(unsafe { read_volatile(&(*ctx.skb.skb).protocol) } as u16);
    match proto {
        ETH_P_IP => {
            let src: u32 = load(ctx, ETH_HLEN + 12).ok_or(Forged::Other)?;
            if owns(pod, &v4_mapped(src)) {
                Ok(())
            } else {
                Err(Forged::Ipv4)
            }
        }
        ETH_P_ARP => arp(ctx, pod),
        ETH_P_IPV6 => ipv6(ctx, pod),
        _ => Err(Forged::Other),
    }
}

/// ARP for IPv4 over Ethernet only; the sender address is the pod's, or 0.0.0.0 (a probe).
#[inline(always)]
fn arp(ctx: &TcContext, pod: &SourcePod) -> Result<(), Forged> {
    let ptype: u16 = load(ctx, ETH_HLEN + 2).ok_or(Forged::Arp)?;
    let plen: u8 = load(ctx, ETH_HLEN + 5).ok_or(Forged::Arp)?;
    if u16::from_be(ptype) != ETH_P_IP || plen != 4 {
        return Err(Forged::Arp);
    }
    let spa: u32 = load(ctx, ETH_HLEN + 14).ok_or(Forged::Arp)?;
    if spa == 0 || owns(pod, &v4_mapped(spa)) {
        Ok(())
    } else {
        Err(Forged::Arp)
    }
}

/// The source is the pod's (or `::`, only for ICMPv6: duplicate address detection and MLD);
/// neighbour discovery claims only the pod's addresses; no router advertisements or redirects.
#[inline(always)]
fn ipv6(ctx: &TcContext, pod: &SourcePod) -> Result<(), Forged> {
    let src = load_addr(ctx, ETH_HLEN + 8).ok_or(Forged::Ipv6)?;
    let unspecified = src == [0; 4];
    if !unspecified && !owns(pod, &src) {
        return Err(Forged::Ipv6);
    }
    let mut next: u8 = load(ctx, ETH_HLEN + 6).ok_or(Forged::Ipv6)?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let len: u8 = load_var(ctx, off + 1).ok_or(Forged::Ipv6)?;
                next = load_var(ctx, off).ok_or(Forged::Ipv6)?;
                off += (usize::from(len) + 1) * 8;
            }
            // Neighbour discovery is never fragmented (the kernel drops fragmented ND), so
            // only the source counts.
            NEXTHDR_FRAGMENT => {
                return if unspecified {
                    Err(Forged::Ipv6)
                } else {
                    Ok(())
                }
            }
            NEXTHDR_ICMPV6 => return icmpv6(ctx, pod, off, unspecified),
            _ => {
                return if unspecified {
                    Err(Forged::Ipv6)
                } else {
                    Ok(())
                }
            }
        }
        i += 1;
    }
    Err(Forged::Other)
}

#[inline(always)]
fn icmpv6(ctx: &TcContext, pod: &SourcePod, off: usize, unspecified: bool) -> Result<(), Forged> {
    let kind: u8 = load_var(ctx, off).ok_or(Forged::Nd)?;
    match kind {
        ND_ROUTER_ADVERT | ND_REDIRECT => Err(Forged::Nd),
        // An advertisement claims its target; a solicitation from `::` probes its target for
        // the sender's own use.
        ND_NEIGHBOR_ADVERT | ND_NEIGHBOR_SOLICIT if kind == ND_NEIGHBOR_ADVERT || unspecified => {
            let target = load_addr_var(ctx, off + 8).ok_or(Forged::Nd)?;
            if owns(pod, &target) {
                Ok(())
            } else {
                Err(Forged::Nd)
            }
        }
        _ => Ok(()),
    }
}

#[inline(always)]
fn load_addr(ctx: &TcContext, off: usize) -> Option<Addr> {
    Some([
        load(ctx, off)?,
        load(ctx, off + 4)?,
        load(ctx, off + 8)?,
        load(ctx, off + 12)?,
    ])
}

/// `T` at a constant `off` from the Ethernet header: read in place when it lies in the packet's
/// linear part (the common case, and much cheaper), else copied out by the kernel.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() <= end {
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    } else {
        ctx.load::<T>(off).ok()
    }
}

/// `T` at an offset known only at run time (past extension headers): copied out by the kernel,
/// which the verifier can follow where direct reads at a computed offset would lose it.
#[inline(always)]
fn load_var<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

#[inline(always)]
fn load_addr_var(ctx: &TcContext, off: usize) -> Option<Addr> {
    Some([
        load_var(ctx, off)?,
        load_var(ctx, off + 4)?,
        load_var(ctx, off + 8)?,
        load_var(ctx, off + 12)?,
    ])
}

#[inline(always)]
fn owns(pod: &SourcePod, addr: &Addr) -> bool {
    let mut i = 0;
    let mut hit = false;
    while i < pod.addrs.len() {
        if (i as u32) < pod.count && pod.addrs[i] == *addr {
            hit = true;
        }
        i += 1;
    }
    hit
}

#[inline(always)]
fn count_drop(ifindex: u32, kind: Forged) {
    let Some(d) = SOURCE_DROPS.get_ptr_mut(&ifindex) else {
        return;
    };
    // Per-CPU value: no other writer while this program runs on this CPU.
    let d: &mut SourceDrops = unsafe { &mut *d };
    match kind {
        Forged::Ipv4 => d.ipv4 += 1,
        Forged::Ipv6 => d.ipv6 += 1,
        Forged::Arp => d.arp += 1,
        Forged::Nd => d.nd += 1,
        Forged::Other => d.other += 1,
    }
}
