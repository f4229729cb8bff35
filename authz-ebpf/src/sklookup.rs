//! sk_lookup, attached to one protected pod's netns: a TCP connection arriving from outside the
//! pod goes to the agent's inbound listener there, which decides with the pod's policies and
//! connects to the application itself. Each loaded copy knows its pod by the `POD_NETNS` global.
use core::ptr::read_volatile;

use authz_common::{counter, InboundPod, ListenerKey, AF_INET};
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};

use crate::{
    helpers::{agent_verdict, count, Verdict},
    maps::{INBOUND_LISTENERS, INBOUND_PODS},
};

const IPPROTO_TCP: u32 = 6;
/// ::1, words in network order.
const IPV6_LOOPBACK: [u32; 4] = [0, 0, 0, u32::from_be(1)];

/// The netns cookie of the pod this copy is attached to, set by the agent at load time.
#[unsafe(no_mangle)]
static POD_NETNS: u64 = 0;

#[sk_lookup]
pub fn authz_sk_lookup(ctx: SkLookupContext) -> u32 {
    let c = ctx.lookup;
    let (protocol, family, port) = unsafe {
        (
            read_volatile(&(*c).protocol),
            read_volatile(&(*c).family),
            read_volatile(&(*c).local_port),
        )
    };
    // Only TCP is captured, and only what comes from outside the pod.
    if protocol != IPPROTO_TCP || from_inside(c, family) {
        return SK_PASS;
    }
    let netns = unsafe { read_volatile(&POD_NETNS) };
    let Some(pod) = (unsafe { INBOUND_PODS.get(&netns) }) else {
        return SK_PASS;
    };
    let pod: &InboundPod = pod;
    if excluded(pod, port) {
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
    // No NO_REUSEPORT flag: during a hot restart the old and new agents' listeners share a
    // reuseport group, and the kernel spreads (and migrates) connections among them.
    if INBOUND_LISTENERS
        .redirect_sk_lookup(&ctx, key, 0)
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

/// A connection the pod makes to itself: from a loopback address (the agent's hop from
/// 127.0.0.6 among them; the kernel drops loopback sources arriving on any other device), or
/// from the very address it goes to.
#[inline(always)]
fn from_inside(c: *mut aya_ebpf::bindings::bpf_sk_lookup, family: u32) -> bool {
    unsafe {
        if family == u32::from(AF_INET) {
            let remote = u32::from_be(read_volatile(&(*c).remote_ip4));
            let local = read_volatile(&(*c).local_ip4);
            remote >> 24 == 127 || remote == u32::from_be(local)
        } else {
            let r = [
                read_volatile(&(*c).remote_ip6[0]),
                read_volatile(&(*c).remote_ip6[1]),
                read_volatile(&(*c).remote_ip6[2]),
                read_volatile(&(*c).remote_ip6[3]),
            ];
            let l = [
                read_volatile(&(*c).local_ip6[0]),
                read_volatile(&(*c).local_ip6[1]),
                read_volatile(&(*c).local_ip6[2]),
                read_volatile(&(*c).local_ip6[3]),
            ];
            r == IPV6_LOOPBACK || r == l
        }
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
