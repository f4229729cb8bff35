//! cgroup/connect4: an enrolled pod's TCP connect() to an enforced workload goes to the agent's
//! listener at 127.0.0.1:<the pod's port> in the pod's own netns; the original destination is
//! kept by socket cookie for sock_ops.
use authz_common::{v4_mapped, AF_INET};
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};

use crate::helpers::{steer, Steer};

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
    let cookie = || unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let port = u16::from_be(sa.user_port as u16);
    match steer(cookie, v4_mapped(sa.user_ip4), port, AF_INET) {
        Steer::Leave => ALLOW,
        Steer::Refuse => REFUSE,
        Steer::To(agent_port) => {
            sa.user_ip4 = LOOPBACK_BE;
            sa.user_port = u32::from(agent_port.to_be());
            ALLOW
        }
    }
}
