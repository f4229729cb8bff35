//! The kernel half of the authorizer. One program per file; every map lives in `maps.rs`.
//!
//! connect4/connect6 -> steer an enrolled pod's connect() to the agent and remember where it went;
//! kubelet (sock_ops on the kubelet's cgroup) -> record the connections the kubelet opens;
//! sock_ops -> pair the app socket and the agent's accepted socket in the sockhash;
//! sk_msg -> move bytes between the pair without the loopback TCP stack.
//! source -> on the host side of each pod's interface, drop what the pod sends from an address
//! that is not its own (IP, ARP, neighbour discovery);
//! sk_lookup (its own object, `inbound.rs`, one copy per protected pod) -> hand connections
//! arriving at a protected pod to the agent's inbound listener in that pod.
#![no_std]
#![no_main]

mod connect4;
mod connect6;
mod helpers;
mod kubelet;
mod maps;
mod skmsg;
mod sockops;
mod source;

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
