//! Small helpers shared by the programs.
use authz_common::{
    counter, Addr, AgentState, OrigDst, PodInfo, SockKey, FAIL_OPEN, MAX_CGROUP_DEPTH,
};
use aya_ebpf::helpers::generated::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns,
};

use crate::maps::{AGENT_STATE, COUNTERS, ENFORCED_IPS, ENROLLED_PODS, ORIG_DST};

#[inline(always)]
pub fn count(slot: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *p += n };
    }
}

/// The enrolled pod the current task belongs to: its own cgroup or the nearest enrolled ancestor.
#[inline(always)]
pub fn current_pod() -> Option<PodInfo> {
    let id = unsafe { bpf_get_current_cgroup_id() };
    if let Some(p) = unsafe { ENROLLED_PODS.get(&id) } {
        return Some(*p);
    }
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id != 0 {
            if let Some(p) = unsafe { ENROLLED_PODS.get(&id) } {
                return Some(*p);
            }
        }
        level -= 1;
    }
    None
}

/// What to do with a connection the agent should see.
pub enum Verdict {
    Redirect,
    /// Agent gone, fail open: let the connection go direct.
    Direct,
    /// Agent gone, fail closed: connect() fails at once.
    Refuse,
}

#[inline(always)]
pub fn agent_verdict() -> Verdict {
    let Some(state) = AGENT_STATE.get(0) else {
        return Verdict::Redirect;
    };
    let state: &AgentState = state;
    if state.stale_after_ns == 0 {
        return Verdict::Redirect;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if state.heartbeat_ns != 0 && now.saturating_sub(state.heartbeat_ns) <= state.stale_after_ns {
        return Verdict::Redirect;
    }
    if state.fail_mode == FAIL_OPEN {
        Verdict::Direct
    } else {
        Verdict::Refuse
    }
}

/// What connect4/6 do with a TCP `connect()`.
pub enum Steer {
    /// Not an enrolled pod's connection to an enforced address, or fail open: untouched.
    Leave,
    /// Fail closed, a pod whose listener is not open yet, or no room to record the destination.
    Refuse,
    /// Rewrite the destination to the pod's agent listener on this port (host order).
    To(u16),
}

/// The decision both connect programs share: `dst`/`port` (host order) as the application asked,
/// `family` the one it used; `cookie` is taken only for a connection that is steered.
#[inline(always)]
pub fn steer(cookie: impl FnOnce() -> u64, dst: Addr, port: u16, family: u16) -> Steer {
    let Some(pod) = current_pod() else {
        return Steer::Leave;
    };
    if unsafe { ENFORCED_IPS.get(&dst) }.is_none() {
        return Steer::Leave;
    }
    match agent_verdict() {
        Verdict::Redirect => {}
        Verdict::Direct => {
            count(counter::CONNECT_BYPASSED, 1);
            return Steer::Leave;
        }
        Verdict::Refuse => {
            count(counter::CONNECT_REFUSED, 1);
            return Steer::Refuse;
        }
    }
    if pod.agent_port == 0 {
        // Known pod, listener not open yet: refused, so a pod cannot stay unenrolled (e.g. by
        // holding the port first) and reach the destination unchecked.
        count(counter::CONNECT_PENDING, 1);
        return Steer::Refuse;
    }
    let orig = OrigDst {
        addr: dst,
        port,
        family,
        pod_id: pod.pod_id,
    };
    if ORIG_DST.insert(&cookie(), &orig, 0).is_err() {
        // Without a record the agent could not forward: refuse rather than pass unenforced.
        return Steer::Refuse;
    }
    count(counter::CONNECT_REDIRECTED, 1);
    Steer::To(pod.agent_port)
}

/// The endpoints of a socket (`$ctx`: a pointer to a ctx struct with the usual
/// family/local_ip4/remote_ip4/local_ip6/remote_ip6 fields) in the shared address form.
/// A macro so every load is a constant offset from the ctx pointer itself: the verifier rejects
/// loads through a ctx pointer that was moved, which is what passing field pointers produces.
macro_rules! endpoints {
    ($ctx:expr) => {{
        use core::ptr::read_volatile as rd;
        let c = $ctx;
        // Every field is loaded unconditionally: if the loads sat in the branches, LLVM would
        // merge them into one load at a computed offset, which the verifier refuses for ctx.
        let family = rd(&(*c).family);
        let l4 = rd(&(*c).local_ip4);
        let r4 = rd(&(*c).remote_ip4);
        let l6 = [
            rd(&(*c).local_ip6[0]),
            rd(&(*c).local_ip6[1]),
            rd(&(*c).local_ip6[2]),
            rd(&(*c).local_ip6[3]),
        ];
        let r6 = [
            rd(&(*c).remote_ip6[0]),
            rd(&(*c).remote_ip6[1]),
            rd(&(*c).remote_ip6[2]),
            rd(&(*c).remote_ip6[3]),
        ];
        if family == authz_common::AF_INET as u32 {
            (authz_common::v4_mapped(l4), authz_common::v4_mapped(r4))
        } else {
            (l6, r6)
        }
    }};
}
pub(crate) use endpoints;

/// A socket's 4-tuple in the shared key form. `remote_port_raw` is the kernel's
/// network-order-in-upper-half field; `local_port` is already host order.
#[inline(always)]
pub fn sock_key(
    netns: u64,
    local: Addr,
    remote: Addr,
    local_port: u32,
    remote_port_raw: u32,
) -> SockKey {
    SockKey {
        netns,
        local,
        remote,
        local_port,
        remote_port: u32::from_be(remote_port_raw),
    }
}
