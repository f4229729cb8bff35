//! sk_msg on SOCK_HASH: a message sent on one end of an app<->agent pair goes straight to the
//! other end's receive queue. With no peer yet, the sender stays on the TCP path for good.
use core::ptr::read_volatile;

use authz_common::counter;
use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};

use crate::{
    helpers::{count, endpoints, sock_key},
    maps::{NO_REDIRECT, SOCK_HASH},
};

#[sk_msg]
pub fn authz_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    let netns = unsafe { bpf_get_netns_cookie(md.cast()) };
    let key = unsafe {
        let (local, remote) = endpoints!(md);
        sock_key(
            netns,
            local,
            remote,
            read_volatile(&raw const (*md).local_port),
            read_volatile(&raw const (*md).remote_port),
        )
    };
    if unsafe { NO_REDIRECT.get(&key) }.is_some() {
        count(counter::SKMSG_MISSED, 1);
        return SK_PASS;
    }
    let mut peer = key.reversed();
    let size = u64::from(ctx.size());
    if SOCK_HASH.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(counter::SKMSG_REDIRECTED, 1);
        count(counter::SKMSG_BYTES, size);
    } else {
        let _ = NO_REDIRECT.insert(&key, &1, 0);
        count(counter::SKMSG_MISSED, 1);
    }
    // SK_PASS either way: with a redirect set it takes effect, without one the TCP path is used.
    SK_PASS
}
