//! Types shared by the eBPF programs and the agent: map keys and values, counter slots.
//! Every type is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
#![no_std]

/// Addresses are kept in IPv6 form (IPv4 as `::ffff:a.b.c.d`), each word in network byte order,
/// so one key type serves both families and v4-mapped sockets look like their IPv4 peers.
pub type Addr = [u32; 4];

/// `ENROLLED_PODS` value; the key is the pod's cgroup v2 id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub pod_id: u32,
    /// Agent listener port inside the pod's network namespace, host byte order; 0 while the
    /// pod is known but its listener is not open yet: its connections to enforced destinations
    /// are refused, never sent direct.
    pub agent_port: u16,
    pub _pad: u16,
}

/// Where a pod's connection was going before the redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    /// AF_INET or AF_INET6, as the application asked.
    pub family: u16,
    pub pod_id: u32,
}

/// One end of a TCP connection inside one network namespace. Including the netns cookie keeps
/// equal 127.0.0.1:port pairs of different pods apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local: Addr,
    pub remote: Addr,
    /// Host byte order.
    pub local_port: u32,
    /// Host byte order.
    pub remote_port: u32,
}

impl SockKey {
    /// The same connection seen from the other end.
    #[inline(always)]
    pub fn reversed(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// `INBOUND_PODS` value; the key is the pod's netns cookie. A pod with an entry is protected at
/// the destination: TCP connections arriving from outside its netns go to the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPod {
    /// Ports never captured (host order), 0 = unused slot; the agent's own outbound listener
    /// port is one of them.
    pub excluded: [u16; MAX_EXCLUDED_PORTS],
    /// The inbound listeners' ports (IPv4, IPv6; host order), for inspection.
    pub listen_port4: u16,
    pub listen_port6: u16,
    /// kubelet `tcpSocket` probe ports (0 = unused): the kubelet's own connections to them
    /// (`KUBELET_CONNS`) are not captured, so the probe reaches the application itself.
    pub tcp_probe_ports: [u16; MAX_PROBE_PORTS],
}

pub const MAX_EXCLUDED_PORTS: usize = 14;
pub const MAX_PROBE_PORTS: usize = 4;

/// `INBOUND_LISTENERS` key: the agent's inbound listener for one netns and address family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    /// AF_INET or AF_INET6.
    pub family: u32,
    pub _pad: u32,
}

/// `SOURCE_PODS` value; the key is the ifindex of the host side of a pod's interface, where
/// the pod's packets enter the node. Packets from the pod must carry one of `addrs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourcePod {
    /// The pod's addresses (IPv6 form, IPv4 mapped) and its IPv6 link-local ones; the first
    /// `count` slots are used.
    pub addrs: [Addr; MAX_SOURCE_ADDRS],
    pub count: u32,
    pub pod_id: u32,
    /// Inode of the network namespace the host side lives in (user space only: the ifindex is
    /// only unique there, and `cleanup` finds the interface by it).
    pub host_netns: u64,
}

pub const MAX_SOURCE_ADDRS: usize = 6;

/// `SOURCE_DROPS` value (per CPU): packets a pod sent that the node dropped, by kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceDrops {
    /// IPv4 from an address that is not the pod's.
    pub ipv4: u64,
    /// IPv6 from an address that is not the pod's (nor its link-local, nor `::` for ND).
    pub ipv6: u64,
    /// ARP whose sender address is not the pod's.
    pub arp: u64,
    /// Neighbour discovery claiming an address that is not the pod's, router advertisements
    /// and redirects.
    pub nd: u64,
    /// Frames of any other kind (VLAN-tagged, other ethertypes, unparseable headers).
    pub other: u64,
}

/// `ENFORCED_IPS` value: the address is enforced (the key's presence is what counts).
pub const ENFORCED: u8 = 1;

/// Heartbeat and fail mode, written by the agent (slot 0 of `AGENT_STATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentState {
    /// `bpf_ktime_get_boot_ns()` of the last heartbeat; 0 = never.
    pub heartbeat_ns: u64,
    /// How old a heartbeat may be before the agent counts as gone.
    pub stale_after_ns: u64,
    /// `FAIL_CLOSED` or `FAIL_OPEN`.
    pub fail_mode: u32,
    /// pid of the agent that wrote the heartbeat (user space only: at a clean exit an agent
    /// marks itself gone only if no successor has taken over).
    pub agent_pid: u32,
}

pub const FAIL_CLOSED: u32 = 0;
pub const FAIL_OPEN: u32 = 1;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// connect() calls rewritten to the agent.
    pub const CONNECT_REDIRECTED: u32 = 0;
    /// Established app<->agent sockets put in the sockhash.
    pub const SOCKS_MAPPED: u32 = 1;
    /// sk_msg calls redirected to the peer socket.
    pub const SKMSG_REDIRECTED: u32 = 2;
    /// sk_msg calls that found no peer and went through the TCP stack.
    pub const SKMSG_MISSED: u32 = 3;
    /// Bytes redirected by sk_msg.
    pub const SKMSG_BYTES: u32 = 4;
    /// connect() refused because the agent was gone (fail closed).
    pub const CONNECT_REFUSED: u32 = 5;
    /// connect() let through directly because the agent was gone (fail open).
    pub const CONNECT_BYPASSED: u32 = 6;
    /// connect() refused because the pod's listener was not open yet (enrollment pending).
    pub const CONNECT_PENDING: u32 = 7;
    /// Inbound connections handed to the agent's listener in the destination pod.
    pub const INBOUND_CAPTURED: u32 = 8;
    /// Inbound connections refused because the agent was gone (fail closed).
    pub const INBOUND_REFUSED: u32 = 9;
    /// Inbound connections let through to the application because the agent was gone (fail open).
    pub const INBOUND_BYPASSED: u32 = 10;
    /// Inbound connections refused because the pod's inbound listener was not open.
    pub const INBOUND_PENDING: u32 = 11;
    pub const COUNT: u32 = 12;
}

/// Map names, shared so the agent never spells them differently.
pub mod maps {
    pub const ENROLLED_PODS: &str = "ENROLLED_PODS";
    pub const ENFORCED_IPS: &str = "ENFORCED_IPS";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const CONN_ORIG: &str = "CONN_ORIG";
    pub const NO_REDIRECT: &str = "NO_REDIRECT";
    pub const SOCK_HASH: &str = "SOCK_HASH";
    pub const COUNTERS: &str = "COUNTERS";
    pub const AGENT_STATE: &str = "AGENT_STATE";
    pub const INBOUND_PODS: &str = "INBOUND_PODS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const HOP_COOKIES: &str = "HOP_COOKIES";
    pub const HOP_PEERS: &str = "HOP_PEERS";
    pub const KUBELET_CONNS: &str = "KUBELET_CONNS";
    pub const SOURCE_PODS: &str = "SOURCE_PODS";
    pub const SOURCE_DROPS: &str = "SOURCE_DROPS";
}

/// The global each loaded copy of the inbound program is given: the netns cookie of the pod
/// whose namespace it is attached to (sk_lookup programs cannot ask for it).
pub const INBOUND_NETNS_GLOBAL: &str = "POD_NETNS";

/// How long after the kubelet opened a connection its 4-tuple counts as the kubelet's: the
/// handshake takes microseconds, SYN retransmits a few seconds; a 4-tuple cannot be reused by
/// anyone else (the node's TIME_WAIT and conntrack hold it) within this time.
pub const KUBELET_CONN_MAX_AGE_NS: u64 = 10_000_000_000;

/// Deepest cgroup level connect4/6 walk up to find an enrolled ancestor (kubelet puts
/// containers two or three levels below the pod's cgroup).
pub const MAX_CGROUP_DEPTH: i32 = 12;

/// IPv4 address (network-order word) in the shared IPv6 form.
#[inline(always)]
pub fn v4_mapped(ip4_be: u32) -> Addr {
    [0, 0, u32::from_be(0x0000_ffff), ip4_be]
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for PodInfo {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for AgentState {}
    unsafe impl aya::Pod for InboundPod {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for SourcePod {}
    unsafe impl aya::Pod for SourceDrops {}
}
