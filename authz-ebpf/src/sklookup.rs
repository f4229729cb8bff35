//! sk_lookup, attached to one protected pod's netns: a TCP connection arriving from outside the
//! pod goes to the agent's inbound listener there, which decides with the pod's policies and
//! connects to the application itself. Each loaded copy knows its pod by the `POD_NETNS` global.
use core::ptr::read_volatile;

use authz_common::{
    counter, v4_mapped, Addr, InboundPod, ListenerKey, SockKey, AF_INET, KUBELET_CONN_MAX_AGE_NS,
};
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::generated::bpf_ktime_get_boot_ns,
    macros::sk_lookup,
    programs::SkLookupContext,
};

use crate::{
    helpers::{agent_verdict, count, Verdict},
    maps::{INBOUND_LISTENERS, INBOUND_PODS, KUBELET_CONNS},
};

const IPPROTO_TCP: u32 = 6;
const BPF_SK_LOOKUP_F_NO_REUSEPORT: u64 = 1 << 1;
/// ::1, words in network order.
const IPV6_LOOPBACK: [u32; 4] = [0, 0, 0, u32::from_be(1)];

/// The netns cookie of the pod this copy is attached to, set by the agent at load time.
#[unsafe(no_mangle)]
static POD_NETNS: u64 = 0;

#[sk_lookup]
pub fn authz_sk_lookup(ctx: SkLookupContext) -> u32 {
    let c = ctx.lookup;
    let (protocol, family, port, remote_port) = unsafe {
        (
            read_volatile(&(*c).protocol),
            read_volatile(&(*c).family),
            read_volatile(&(*c).local_port),
            u16::from_be(read_volatile(&(*c).remote_port)),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // Only what comes from outside the pod is captured.
    let (remote, local) = addresses(c, family);
    if from_inside(&remote, &local) {
        return SK_PASS;
    }
    let netns = unsafe { read_volatile(&POD_NETNS) };
    let Some(pod) = (unsafe { INBOUND_PODS.get(&netns) }) else {
        return SK_PASS;
    };
    let pod: &InboundPod = pod;
    if excluded(pod, port) || tcp_probe(pod, &remote, remote_port, &local, port) {
        return SK_PASS;
    }
    match agent_verdict() {
        Verdict::Redirect => {}
        Verdict::Direct => {
            count(counter::INBOUND_BYPASSED, 1);
            return SK_PASS;
        }
        Verdict::Refuse => {
            count(counter::INBOUND_REFUSED, 1);
            return SK_DROP;
        }
    }
    let key = ListenerKey {
        netns,
        family,
        _pad: 0,
    };
    // Exactly the agent's listener, never another member of a reuseport group (the listeners
    // have no SO_REUSEPORT either: a process of the pod could otherwise join and take a share).
    // A hot restart hands over by replacing the map entry.
    if INBOUND_LISTENERS
        .redirect_sk_lookup(&ctx, key, BPF_SK_LOOKUP_F_NO_REUSEPORT)
        .is_ok()
    {
        count(counter::INBOUND_CAPTURED, 1);
        SK_PASS
    } else {
        // Protected, but no listener (not open yet): refused, never delivered unchecked.
        count(counter::INBOUND_PENDING, 1);
        SK_DROP
    }
}

/// The peer and local addresses in the shared IPv6 form. Every field is loaded unconditionally:
/// loads inside the branches would be merged into one at a computed ctx offset, which the
/// verifier refuses.
#[inline(always)]
fn addresses(c: *mut aya_ebpf::bindings::bpf_sk_lookup, family: u32) -> (Addr, Addr) {
    let (r4, l4, r6, l6) = unsafe {
        (
            read_volatile(&(*c).remote_ip4),
            read_volatile(&(*c).local_ip4),
            [
                read_volatile(&(*c).remote_ip6[0]),
                read_volatile(&(*c).remote_ip6[1]),
                read_volatile(&(*c).remote_ip6[2]),
                read_volatile(&(*c).remote_ip6[3]),
            ],
            [
                read_volatile(&(*c).local_ip6[0]),
                read_volatile(&(*c).local_ip6[1]),
                read_volatile(&(*c).local_ip6[2]),
                read_volatile(&(*c).local_ip6[3]),
            ],
        )
    };
    if family == u32::from(AF_INET) {
        (v4_mapped(r4), v4_mapped(l4))
    } else {
        (r6, l6)
    }
}

/// A connection the pod makes to itself: from a loopback address (the agent's hop from
/// 127.0.0.6 among them; the kernel drops loopback sources arriving on any other device), or
/// from the very address it goes to.
#[inline(always)]
fn from_inside(remote: &Addr, local: &Addr) -> bool {
    let v4_loopback = remote[0] == 0
        && remote[1] == 0
        && remote[2] == u32::from_be(0x0000_ffff)
        && u32::from_be(remote[3]) >> 24 == 127;
    v4_loopback || *remote == IPV6_LOOPBACK || remote == local
}

/// kubelet's `tcpSocket` probe: a connection the kubelet itself opened (recorded on its cgroup
/// by `authz_kubelet`) to a probe port reaches the application itself (captured, the agent
/// would accept it whether the application is up or not). A node address alone is not enough.
#[inline(always)]
fn tcp_probe(pod: &InboundPod, remote: &Addr, remote_port: u16, local: &Addr, port: u32) -> bool {
    let mut i = 0;
    let mut hit = false;
    while i < pod.tcp_probe_ports.len() {
        let p = u32::from(pod.tcp_probe_ports[i]);
        if p != 0 && p == port {
            hit = true;
        }
        i += 1;
    }
    if !hit {
        return false;
    }
    // The kubelet's side of the connection.
    let key = SockKey {
        netns: 0,
        local: *remote,
        remote: *local,
        local_port: u32::from(remote_port),
        remote_port: port,
    };
    match unsafe { KUBELET_CONNS.get(&key) } {
        Some(at) => {
            unsafe { bpf_ktime_get_boot_ns() }.saturating_sub(*at) <= KUBELET_CONN_MAX_AGE_NS
        }
        None => false,
    }
}

#[inline(always)]
fn excluded(pod: &InboundPod, port: u32) -> bool {
    let mut i = 0;
    while i < pod.excluded.len() {
        let p = u32::from(pod.excluded[i]);
        if p != 0 && p == port {
            return true;
        }
        i += 1;
    }
    false
}
