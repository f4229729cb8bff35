//! cgroup/connect4: an enrolled pod's TCP connect() to an enforced workload goes to the agent's
//! listener at 127.0.0.1:<port> in the pod's own netns; the original destination is kept by
//! socket cookie for sock_ops.
use authz_common::{counter, v4_mapped, OrigDst, AF_INET};
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use aya_log_ebpf::debug;

use crate::{
    helpers::{agent_verdict, count, current_pod, Verdict},
    maps::{ENFORCED_IPS, ORIG_DST},
};

const IPPROTO_TCP: u32 = 6;
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const LOOPBACK_BE: u32 = u32::from_be(0x7f00_0001);

#[cgroup_sock_addr(connect4)]
pub fn authz_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(pod) = current_pod() else {
        return ALLOW;
    };
    let dst = v4_mapped(sa.user_ip4);
    if unsafe { ENFORCED_IPS.get(&dst) }.is_none() {
        return ALLOW;
    }
    match agent_verdict() {
        Verdict::Redirect => {}
        Verdict::Direct => {
            count(counter::CONNECT_BYPASSED, 1);
            return ALLOW;
        }
        Verdict::Refuse => {
            count(counter::CONNECT_REFUSED, 1);
            return REFUSE;
        }
    }
    if pod.agent_port == 0 {
        // Known pod, listener not open yet: refused, so a pod cannot stay unenrolled (e.g. by
        // holding the port first) and reach the destination unchecked.
        count(counter::CONNECT_PENDING, 1);
        return REFUSE;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        addr: dst,
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET,
        pod_id: pod.pod_id,
    };
    if ORIG_DST.insert(&cookie, &orig, 0).is_err() {
        // Without a record the agent could not forward: refuse rather than pass unenforced.
        return REFUSE;
    }
    sa.user_ip4 = LOOPBACK_BE;
    sa.user_port = u32::from(pod.agent_port.to_be());
    count(counter::CONNECT_REDIRECTED, 1);
    debug!(
        &ctx,
        "connect4 redirected pod {} port {}", pod.pod_id, orig.port
    );
    ALLOW
}
