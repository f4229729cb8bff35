//! sock_ops: pairs both ends of each local hop in the sockhash, for sk_msg. Outbound: when a
//! redirected app socket becomes established, put it in the sockhash and leave its original
//! destination for the agent under the agent-side 4-tuple; the agent's accepted end follows.
//! Inbound: the agent's connection to the application (its cookie recorded by the agent) and
//! the application's accepted end. Attached to a common ancestor cgroup so both ends are seen.
use authz_common::{counter, SockKey};
use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;

use crate::{
    helpers::{count, endpoints, sock_key},
    maps::{CONN_ORIG, HOP_COOKIES, HOP_PEERS, ORIG_DST, SOCK_HASH},
};

#[sock_ops]
pub fn authz_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
        _ => {}
    }
    0
}

#[inline(always)]
fn key_of(ctx: &SockOpsContext) -> SockKey {
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let ops = ctx.ops;
    let (local, remote) = unsafe { endpoints!(ops) };
    sock_key(netns, local, remote, ctx.local_port(), ctx.remote_port())
}

/// A connecting end: an app socket steered to the agent, or the agent's inbound hop.
#[inline(always)]
fn active_established(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if unsafe { HOP_COOKIES.get(&cookie) }.is_some() {
        let _ = HOP_COOKIES.remove(&cookie);
        let mut key = key_of(ctx);
        if HOP_PEERS.insert(&key.reversed(), &1, 0).is_err() {
            return;
        }
        let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
        if SOCK_HASH.update(&mut key, ops, 0).is_ok() {
            count(counter::SOCKS_MAPPED, 1);
        }
        return;
    }
    let Some(orig) = (unsafe { ORIG_DST.get(&cookie) }).copied() else {
        return;
    };
    let _ = ORIG_DST.remove(&cookie);
    let mut key = key_of(ctx);
    if CONN_ORIG.insert(&key.reversed(), &orig, 0).is_err() {
        return;
    }
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    if SOCK_HASH.update(&mut key, ops, 0).is_ok() {
        count(counter::SOCKS_MAPPED, 1);
    }
    debug!(ctx, "sock_ops: app socket mapped, port {}", key.local_port);
}

/// An accepting end: the agent's end of an outbound hop (its CONN_ORIG entry stays for the
/// agent to read), or the application's end of an inbound hop.
#[inline(always)]
fn passive_established(ctx: &SockOpsContext) {
    let mut key = key_of(ctx);
    if unsafe { HOP_PEERS.get(&key) }.is_some() {
        let _ = HOP_PEERS.remove(&key);
    } else if unsafe { CONN_ORIG.get(&key) }.is_none() {
        return;
    }
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    if SOCK_HASH.update(&mut key, ops, 0).is_ok() {
        count(counter::SOCKS_MAPPED, 1);
    }
}
