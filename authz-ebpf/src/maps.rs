//! Every map of the programs, in one place. The agent fills ENROLLED_PODS, ENFORCED_IPS,
//! AGENT_STATE, INBOUND_PODS, INBOUND_LISTENERS, HOP_COOKIES and SOURCE_PODS; the
//! programs fill the rest.
use authz_common::{
    AgentState, InboundPod, ListenerKey, OrigDst, PodInfo, SockKey, SourceDrops, SourcePod,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};

/// cgroup v2 id -> enrolled pod.
#[map]
pub static ENROLLED_PODS: HashMap<u64, PodInfo> = HashMap::with_max_entries(16_384, 0);

/// Workload address (IPv6 form) whose traffic the agent enforces.
#[map]
pub static ENFORCED_IPS: HashMap<[u32; 4], u8> = HashMap::with_max_entries(65_536, 0);

/// Socket cookie of a redirected app socket -> its original destination (connect time).
#[map]
pub static ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

/// Agent-side view of an established redirected connection -> original destination.
/// The agent reads and deletes the entry after accept().
#[map]
pub static CONN_ORIG: LruHashMap<SockKey, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

/// Senders whose first message found no peer: they stay on the TCP path for good, so bytes
/// cannot overtake bytes already queued in the peer's TCP receive queue.
#[map]
pub static NO_REDIRECT: LruHashMap<SockKey, u8> = LruHashMap::with_max_entries(65_536, 0);

/// Both ends of every app<->agent connection, keyed by their own 4-tuple + netns.
#[map]
pub static SOCK_HASH: SockHash<SockKey> = SockHash::with_max_entries(131_072, 0);

/// Per-CPU event counters, slots in `authz_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(authz_common::counter::COUNT, 0);

/// Slot 0: agent heartbeat and fail mode.
#[map]
pub static AGENT_STATE: Array<AgentState> = Array::with_max_entries(1, 0);

/// Pod netns cookie -> how its inbound connections are captured.
#[map]
pub static INBOUND_PODS: HashMap<u64, InboundPod> = HashMap::with_max_entries(16_384, 0);

/// The agent's inbound listener of each protected pod's netns, per address family.
#[map]
pub static INBOUND_LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(32_768, 0);

/// Socket cookies of the agent's connections to an application in its own pod (the inbound
/// local hop), recorded before connect() so sock_ops pairs both ends.
#[map]
pub static HOP_COOKIES: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65_536, 0);

/// The application's end of an inbound local hop, until it becomes established.
#[map]
pub static HOP_PEERS: LruHashMap<SockKey, u8> = LruHashMap::with_max_entries(65_536, 0);

/// Host-side ifindex of a pod's interface -> the addresses its packets may carry.
#[map]
pub static SOURCE_PODS: HashMap<u32, SourcePod> = HashMap::with_max_entries(16_384, 0);

/// Host-side ifindex -> packets from that pod dropped by the source check, per CPU.
#[map]
pub static SOURCE_DROPS: PerCpuHashMap<u32, SourceDrops> =
    PerCpuHashMap::with_max_entries(16_384, 0);

/// Connections the kubelet opened (4-tuple from its side, netns 0) -> when (boot ns).
#[map]
pub static KUBELET_CONNS: LruHashMap<SockKey, u64> = LruHashMap::with_max_entries(16_384, 0);
