//! cgroup/connect6: as connect4 for IPv6 sockets. A v4-mapped destination goes to
//! ::ffff:127.0.0.1, a real IPv6 one to [::1], both at the agent port in the pod's netns.
use core::ptr::{read_volatile, write_volatile};

use authz_common::{AF_INET, AF_INET6};
use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::helpers::{steer, Steer};

const IPPROTO_TCP: u32 = 6;
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect6)]
pub fn authz_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let dst = read_ip6(sa);
    let mapped = dst[0] == 0 && dst[1] == 0 && dst[2] == u32::from_be(0xffff);
    let cookie = || unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let port = u16::from_be(sa.user_port as u16);
    let family = if mapped { AF_INET } else { AF_INET6 };
    match steer(cookie, dst, port, family) {
        Steer::Leave => ALLOW,
        Steer::Refuse => REFUSE,
        Steer::To(agent_port) => {
            write_ip6(
                sa,
                if mapped {
                    [0, 0, u32::from_be(0xffff), u32::from_be(0x7f00_0001)]
                } else {
                    [0, 0, 0, u32::from_be(1)]
                },
            );
            sa.user_port = u32::from(agent_port.to_be());
            ALLOW
        }
    }
}

// The verifier only accepts ctx accesses at constant offsets from the ctx pointer: copy the
// address word by word instead of as an array.
#[inline(always)]
fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    unsafe {
        [
            read_volatile(&sa.user_ip6[0]),
            read_volatile(&sa.user_ip6[1]),
            read_volatile(&sa.user_ip6[2]),
            read_volatile(&sa.user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, ip: [u32; 4]) {
    unsafe {
        write_volatile(&mut sa.user_ip6[0], ip[0]);
        write_volatile(&mut sa.user_ip6[1], ip[1]);
        write_volatile(&mut sa.user_ip6[2], ip[2]);
        write_volatile(&mut sa.user_ip6[3], ip[3]);
    }
}
