//! sock_ops on the kubelet's cgroup: every TCP connection the kubelet opens is recorded, by its
//! 4-tuple, before its SYN leaves. At the pod, a connection found here is the kubelet's (its
//! probes pass); anything else that merely carries a node address (another host process, traffic
//! forwarded or masqueraded by the node, a forging pod) is decided by the pod's policies.
use authz_common::SockKey;
use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, helpers::generated::bpf_ktime_get_boot_ns,
    macros::sock_ops, programs::SockOpsContext,
};

use crate::{
    helpers::{endpoints, sock_key},
    maps::KUBELET_CONNS,
};

#[sock_ops]
pub fn authz_kubelet(ctx: SockOpsContext) -> u32 {
    // The source port is bound by now, and the SYN not sent yet.
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let ops = ctx.ops;
        let (local, remote) = unsafe { endpoints!(ops) };
        let key: SockKey = sock_key(0, local, remote, ctx.local_port(), ctx.remote_port());
        let now = unsafe { bpf_ktime_get_boot_ns() };
        let _ = KUBELET_CONNS.insert(&key, &now, 0);
    }
    0
}
