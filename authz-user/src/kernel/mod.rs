//! Loading and attaching the eBPF programs, and the agent's side of their maps.
//! Maps and links are pinned in bpffs (`pin`): they outlive the process, so when the agent dies
//! the programs keep applying the fail mode, and the next agent adopts the maps.
use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use authz_common::{
    counter, maps, AgentState, InboundPod, ListenerKey, OrigDst, PodInfo, SockKey, SourceDrops,
    SourcePod, FAIL_CLOSED, FAIL_OPEN,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, SockHash},
    programs::{
        links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSockAddr, SchedClassifier,
        SkLookup, SkMsg, SockOps,
    },
    Ebpf, EbpfLoader,
};

use crate::config::FailMode;

mod addr;
pub mod frames;
pub mod pin;
pub mod source;
pub use addr::{addr_key, key_addr};

/// The layout of the pinned state (maps, their key and value sizes, what the programs mean by
/// them). Bump it with any change to `PINNED_MAPS` or to what a pinned map's entries mean; the
/// `layout_fingerprint` test fails until it is. Agents adopt only their own layout's state and
/// take over any other's (`Kernel::retire_previous`).
pub const LAYOUT: u32 = 2;

/// The layout this agent pins under: `LAYOUT`, unless a test asks for another
/// (`AUTHZ_TEST_LAYOUT`, so an upgrade or rollback between layouts can be shown with one build).
pub fn layout() -> u32 {
    std::env::var("AUTHZ_TEST_LAYOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LAYOUT)
}

/// The maps pinned under `<bpffs>/v<layout>/maps`, with the key and value sizes this build
/// expects of them: a map of the wrong layout there is refused rather than misread.
const PINNED_MAPS: [(&str, usize, usize); 14] = [
    (maps::ENROLLED_PODS, 8, std::mem::size_of::<PodInfo>()),
    (maps::ENFORCED_IPS, 16, 1),
    (maps::ORIG_DST, 8, std::mem::size_of::<OrigDst>()),
    (
        maps::CONN_ORIG,
        std::mem::size_of::<SockKey>(),
        std::mem::size_of::<OrigDst>(),
    ),
    (maps::NO_REDIRECT, std::mem::size_of::<SockKey>(), 1),
    (maps::SOCK_HASH, std::mem::size_of::<SockKey>(), 4),
    (maps::AGENT_STATE, 4, std::mem::size_of::<AgentState>()),
    (maps::INBOUND_PODS, 8, std::mem::size_of::<InboundPod>()),
    (
        maps::INBOUND_LISTENERS,
        std::mem::size_of::<ListenerKey>(),
        4,
    ),
    (maps::HOP_COOKIES, 8, 1),
    (maps::HOP_PEERS, std::mem::size_of::<SockKey>(), 1),
    (maps::KUBELET_CONNS, std::mem::size_of::<SockKey>(), 8),
    (maps::SOURCE_PODS, 4, std::mem::size_of::<SourcePod>()),
    (maps::SOURCE_DROPS, 4, std::mem::size_of::<SourceDrops>()),
];

pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/authz"));
/// The sk_lookup program alone, loaded once per protected pod (see `protect`).
static INBOUND_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/authz-inbound"));

/// Kernel counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelCounters {
    pub connect_redirected: u64,
    pub socks_mapped: u64,
    pub skmsg_redirected: u64,
    pub skmsg_missed: u64,
    pub skmsg_bytes: u64,
    pub connect_refused: u64,
    pub connect_bypassed: u64,
    pub connect_pending: u64,
    pub inbound_captured: u64,
    pub inbound_refused: u64,
    pub inbound_bypassed: u64,
    pub inbound_pending: u64,
}

pub struct Kernel {
    // bpf_link attachments are always multi-program: `Single` only means "no flags".
    // Field order matters for drop: maps and logger go before the programs' links.
    enrolled: Mutex<HashMap<MapData, u64, PodInfo>>,
    enforced: Mutex<HashMap<MapData, [u32; 4], u8>>,
    conn_orig: Mutex<HashMap<MapData, SockKey, OrigDst>>,
    counters: PerCpuArray<MapData, u64>,
    state: Mutex<Array<MapData, AgentState>>,
    _sock_hash: SockHash<MapData, SockKey>,
    inbound_pods: Mutex<HashMap<MapData, u64, InboundPod>>,
    inbound_listeners: Mutex<SockHash<MapData, ListenerKey>>,
    hop_cookies: Mutex<HashMap<MapData, u64, u8>>,
    kubelet_conns: Mutex<HashMap<MapData, SockKey, u64>>,
    source_pods: Mutex<HashMap<MapData, u32, SourcePod>>,
    source_drops: Mutex<PerCpuHashMap<MapData, u32, SourceDrops>>,
    /// Host-side interfaces this agent binds: ifindex -> (its namespace's inode, the pod).
    bound: Mutex<std::collections::HashMap<u32, (u64, std::sync::Arc<str>)>>,
    /// This layout's pin directory, `<bpffs>/v<layout>`.
    pins: PathBuf,
    /// Other layouts' state found at start, retired once ours is in place.
    previous: Mutex<Vec<PathBuf>>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    // Pinned: dropping these closes our fds only; the attachments stay.
    _links: Vec<PinnedLink>,
    /// Keeps the loaded programs' fds for the agent's lifetime; the source check is attached
    /// from it as pods come.
    ebpf: Mutex<Ebpf>,
    pub cgroup_root: PathBuf,
    /// Whether the maps were adopted from a previous agent (hot restart or recovery).
    pub adopted: bool,
}

impl Kernel {
    /// Loads the programs, adopting the maps pinned under `bpffs` by a previous agent (or pinning
    /// new ones), attaches them to `cgroup_root` (default: the cgroup2 mount) and pins the links,
    /// replacing a previous agent's only after ours are attached.
    pub fn load(
        cgroup_root: Option<&Path>,
        kubelet_cgroup: Option<&Path>,
        bpffs: &Path,
    ) -> Result<Kernel> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        check_release(release.trim())?;
        raise_memlock();
        let cgroup_root = match cgroup_root {
            Some(p) => p.to_path_buf(),
            None => cgroup2_mount()?,
        };
        let pins = pin::layout_dir(bpffs, layout());
        pin::prepare(&pins)?;
        let previous = pin::other_layouts(bpffs, &pins);
        let maps_dir = pin::maps_dir(&pins);
        let adopted = maps_dir.join(maps::ENROLLED_PODS).exists();
        let mut loader = EbpfLoader::new();
        for name in PINNED_MAPS.iter().map(|m| m.0).chain([maps::COUNTERS]) {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut ebpf = loader.load(OBJECT).with_context(|| {
            format!(
                "loading the eBPF object (maps pinned under {})",
                maps_dir.display()
            )
        })?;
        check_layouts(&ebpf, &maps_dir)?;
        // The logger owns the log ring buffer: it must live as long as the programs.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("eBPF logger not initialised: {e}");
                None
            }
        };
        let cg = File::open(&cgroup_root)
            .with_context(|| format!("opening cgroup {}", cgroup_root.display()))?;

        // sk_msg must be on the sockhash before sock_ops inserts sockets into it. It attaches to
        // the (pinned) map itself and replaces a previous agent's program there.
        let sock_hash: SockHash<MapData, SockKey> = take(&mut ebpf, maps::SOCK_HASH)?;
        let prog: &mut SkMsg = program(&mut ebpf, "authz_sk_msg")?.try_into()?;
        prog.load().context("loading authz_sk_msg")?;
        let id = prog
            .attach(sock_hash.fd())
            .context("attaching authz_sk_msg")?;
        // Kept attached when we exit: the map holds it, and it goes with the map at cleanup.
        std::mem::forget(prog.take_link(id)?);

        let mut links = vec![];
        for name in ["authz_connect4", "authz_connect6"] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup_root.display()))?;
            links.push(pin_link(prog.take_link(id)?, &pins, name)?);
        }
        let prog: &mut SockOps = program(&mut ebpf, "authz_sock_ops")?.try_into()?;
        prog.load().context("loading authz_sock_ops")?;
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching authz_sock_ops to {}", cgroup_root.display()))?;
        links.push(pin_link(prog.take_link(id)?, &pins, "authz_sock_ops")?);
        match kubelet_cgroup {
            Some(path) => {
                let prog: &mut SockOps = program(&mut ebpf, "authz_kubelet")?.try_into()?;
                prog.load().context("loading authz_kubelet")?;
                let kc = File::open(path)
                    .with_context(|| format!("opening the kubelet's cgroup {}", path.display()))?;
                let id = prog
                    .attach(&kc, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching authz_kubelet to {}", path.display()))?;
                links.push(pin_link(prog.take_link(id)?, &pins, "authz_kubelet")?);
            }
            // No kubelet known: no connection passes as its probe.
            None => pin::unpin_detach(&pin::link_path(&pins, "authz_kubelet"))?,
        }
        let prog: &mut SchedClassifier = program(&mut ebpf, source::PROGRAM)?.try_into()?;
        prog.load().context("loading authz_source")?;

        Ok(Kernel {
            enrolled: Mutex::new(take(&mut ebpf, maps::ENROLLED_PODS)?),
            enforced: Mutex::new(take(&mut ebpf, maps::ENFORCED_IPS)?),
            conn_orig: Mutex::new(take(&mut ebpf, maps::CONN_ORIG)?),
            counters: take(&mut ebpf, maps::COUNTERS)?,
            state: Mutex::new(take(&mut ebpf, maps::AGENT_STATE)?),
            _sock_hash: sock_hash,
            inbound_pods: Mutex::new(take(&mut ebpf, maps::INBOUND_PODS)?),
            inbound_listeners: Mutex::new(take(&mut ebpf, maps::INBOUND_LISTENERS)?),
            hop_cookies: Mutex::new(take(&mut ebpf, maps::HOP_COOKIES)?),
            kubelet_conns: Mutex::new(take(&mut ebpf, maps::KUBELET_CONNS)?),
            source_pods: Mutex::new(take(&mut ebpf, maps::SOURCE_PODS)?),
            source_drops: Mutex::new(take(&mut ebpf, maps::SOURCE_DROPS)?),
            bound: Mutex::default(),
            pins,
            previous: Mutex::new(previous),
            logger: Mutex::new(logger),
            _links: links,
            ebpf: Mutex::new(ebpf),
            cgroup_root,
            adopted,
        })
    }

    /// Whether state of another layout was found at start (an upgrade or a rollback).
    pub fn taking_over(&self) -> bool {
        !self.previous.lock().unwrap().is_empty()
    }

    /// Removes the state other layouts left (their programs detached, their maps unpinned),
    /// once ours is in place: called after the first enrollment, so every pod meets either the
    /// old programs or ours, and the fail mode in between.
    pub fn retire_previous(&self) {
        let previous = std::mem::take(&mut *self.previous.lock().unwrap());
        let keep = self.bound_ifindexes();
        for dir in previous {
            match pin::retire(&dir, &keep) {
                Ok(r) => tracing::info!(
                    state = %dir.display(),
                    links = r.links,
                    maps = r.maps,
                    "took over from another layout's agent: its programs detached, its maps unpinned"
                ),
                Err(e) => {
                    tracing::error!(state = %dir.display(), "another layout's state not fully removed: {e:#}")
                }
            }
        }
    }

    /// Enrolled cgroup ids (including a previous agent's, when adopted).
    pub fn enrolled_ids(&self) -> Vec<u64> {
        self.enrolled.lock().unwrap().keys().flatten().collect()
    }

    /// Enforced workload addresses (including a previous agent's, when adopted).
    pub fn enforced_ips(&self) -> Vec<IpAddr> {
        self.enforced
            .lock()
            .unwrap()
            .keys()
            .flatten()
            .map(key_addr)
            .collect()
    }

    /// Marks the agent gone at once (clean exit), so the fail mode applies without waiting for
    /// the heartbeat to go stale; unless a successor's heartbeat has already taken over.
    pub fn stop_heartbeat(&self, fail_mode: FailMode) -> Result<()> {
        let mut map = self.state.lock().unwrap();
        let me = std::process::id();
        if map.get(&0, 0).is_ok_and(|s| s.agent_pid != me) {
            return Ok(());
        }
        let state = AgentState {
            heartbeat_ns: 0,
            stale_after_ns: 1,
            fail_mode: fail_code(fail_mode),
            agent_pid: me,
        };
        map.set(0, state, 0).context("AGENT_STATE set")
    }

    /// Enrolls the pod of cgroup `id` with its listener at `agent_port`; 0 marks it pending
    /// (its connections to enforced destinations are refused until its listener is open).
    pub fn enroll(&self, id: u64, pod_id: u32, agent_port: u16) -> Result<()> {
        let info = PodInfo {
            pod_id,
            agent_port,
            _pad: 0,
        };
        self.enrolled
            .lock()
            .unwrap()
            .insert(id, info, 0)
            .context("ENROLLED_PODS insert")
    }

    /// The listener port recorded for the pod of cgroup `id` (by this agent or the one it
    /// adopted the maps from); None when not enrolled or pending.
    pub fn enrolled_port(&self, id: u64) -> Option<u16> {
        let map = self.enrolled.lock().unwrap();
        map.get(&id, 0)
            .ok()
            .map(|p| p.agent_port)
            .filter(|p| *p != 0)
    }

    pub fn release(&self, cgroup_id: u64) -> Result<()> {
        self.enrolled
            .lock()
            .unwrap()
            .remove(&cgroup_id)
            .context("ENROLLED_PODS remove")
    }

    pub fn enforce(&self, ip: IpAddr) -> Result<()> {
        self.enforced
            .lock()
            .unwrap()
            .insert(addr_key(ip), authz_common::ENFORCED, 0)
            .context("ENFORCED_IPS insert")
    }

    pub fn unenforce(&self, ip: IpAddr) -> Result<()> {
        self.enforced
            .lock()
            .unwrap()
            .remove(&addr_key(ip))
            .context("ENFORCED_IPS remove")
    }

    /// Protects the pod whose netns is `netns` (cookie `cookie`): records how its inbound
    /// connections are captured, then attaches a copy of the sk_lookup program that knows the
    /// cookie, replacing a previous agent's (attached first, then the old one detached). Until `inbound_listen` gives it a listener, the
    /// pod's inbound TCP connections are refused.
    pub fn protect(&self, cookie: u64, netns: &File, pod: InboundPod) -> Result<()> {
        self.inbound_pods
            .lock()
            .unwrap()
            .insert(cookie, pod, 0)
            .context("INBOUND_PODS insert")?;
        let path = pin::link_path(&self.pins, &inbound_link_name(cookie));
        // Attached even when a previous agent's copy is (its link pinned at `path`): ours goes
        // in beside it and the old one is detached after, so the pod is never uncaptured and no
        // program of an older version stays.
        let maps_dir = pin::maps_dir(&self.pins);
        let mut loader = EbpfLoader::new();
        for name in PINNED_MAPS.iter().map(|m| m.0).chain([maps::COUNTERS]) {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        loader.override_global(authz_common::INBOUND_NETNS_GLOBAL, &cookie, true);
        let mut ebpf = loader
            .load(INBOUND_OBJECT)
            .context("loading the inbound program")?;
        let prog: &mut SkLookup = program(&mut ebpf, "authz_sk_lookup")?.try_into()?;
        prog.load().context("loading authz_sk_lookup")?;
        let id = prog
            .attach(netns)
            .context("attaching authz_sk_lookup to the pod's netns")?;
        // Pinned, the link keeps the program attached without this process.
        pin::pin_replacing(FdLink::from(prog.take_link(id)?), &path)?;
        Ok(())
    }

    /// Netns cookies of every protected pod, including a previous agent's.
    pub fn protected_cookies(&self) -> Vec<u64> {
        self.inbound_pods.lock().unwrap().keys().flatten().collect()
    }

    /// Hands the pod's inbound connections of `family` to `listener` (replacing a previous
    /// agent's listener; the kernel drops a closed one from the map by itself).
    pub fn inbound_listen(
        &self,
        cookie: u64,
        family: u16,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<()> {
        let key = ListenerKey {
            netns: cookie,
            family: u32::from(family),
            _pad: 0,
        };
        self.inbound_listeners
            .lock()
            .unwrap()
            .insert(key, listener.as_raw_fd(), 0)
            .context("INBOUND_LISTENERS insert")
    }

    /// Stops protecting a pod's netns: its entry goes (the program then passes everything), then
    /// the program is detached.
    pub fn unprotect(&self, cookie: u64) -> Result<()> {
        let _ = self.inbound_pods.lock().unwrap().remove(&cookie);
        let mut l = self.inbound_listeners.lock().unwrap();
        for family in [authz_common::AF_INET, authz_common::AF_INET6] {
            let _ = l.remove(&ListenerKey {
                netns: cookie,
                family: u32::from(family),
                _pad: 0,
            });
        }
        pin::unpin_detach(&pin::link_path(&self.pins, &inbound_link_name(cookie)))
    }

    /// Whether the connection from `peer` to `local` is one the kubelet itself opened (recorded
    /// by `authz_kubelet` on its cgroup, moments ago).
    pub fn opened_by_kubelet(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        let key = SockKey {
            netns: 0,
            local: addr_key(peer.ip()),
            remote: addr_key(local.ip()),
            local_port: u32::from(peer.port()),
            remote_port: u32::from(local.port()),
        };
        let Ok(at) = self.kubelet_conns.lock().unwrap().get(&key, 0) else {
            return false;
        };
        boottime_ns().saturating_sub(at) <= authz_common::KUBELET_CONN_MAX_AGE_NS
    }

    /// Marks the agent's socket `cookie` as the agent end of an inbound hop, before connect(),
    /// so sock_ops pairs it with the application's end.
    pub fn hop(&self, cookie: u64) -> Result<()> {
        self.hop_cookies
            .lock()
            .unwrap()
            .insert(cookie, 1, 0)
            .context("HOP_COOKIES insert")
    }

    /// The original destination of a redirected connection, seen from the agent's accepted
    /// socket; the entry is consumed.
    pub fn take_orig_dst(&self, key: &SockKey) -> Option<OrigDst> {
        let mut map = self.conn_orig.lock().unwrap();
        let v = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(v)
    }

    pub fn heartbeat(&self, fail_mode: FailMode, stale_after: Duration) -> Result<()> {
        let state = AgentState {
            heartbeat_ns: boottime_ns(),
            stale_after_ns: stale_after.as_nanos() as u64,
            fail_mode: fail_code(fail_mode),
            agent_pid: std::process::id(),
        };
        self.state
            .lock()
            .unwrap()
            .set(0, state, 0)
            .context("AGENT_STATE set")
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |slot: u32| -> u64 {
            self.counters
                .get(&slot, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            connect_redirected: sum(counter::CONNECT_REDIRECTED),
            socks_mapped: sum(counter::SOCKS_MAPPED),
            skmsg_redirected: sum(counter::SKMSG_REDIRECTED),
            skmsg_missed: sum(counter::SKMSG_MISSED),
            skmsg_bytes: sum(counter::SKMSG_BYTES),
            connect_refused: sum(counter::CONNECT_REFUSED),
            connect_bypassed: sum(counter::CONNECT_BYPASSED),
            connect_pending: sum(counter::CONNECT_PENDING),
            inbound_captured: sum(counter::INBOUND_CAPTURED),
            inbound_refused: sum(counter::INBOUND_REFUSED),
            inbound_bypassed: sum(counter::INBOUND_BYPASSED),
            inbound_pending: sum(counter::INBOUND_PENDING),
        }
    }

    /// Forwards the programs' aya-log records to the agent's log until the runtime stops.
    pub fn spawn_log_pump(self: &std::sync::Arc<Self>) {
        use std::os::fd::AsRawFd;
        let Some(fd) = self.logger.lock().unwrap().as_ref().map(|l| l.as_raw_fd()) else {
            return;
        };
        // Borrowed fd: the logger (owned by `self`, kept alive by `k`) outlives the AsyncFd.
        #[allow(deprecated)] // the fd-safe replacement is not in this tokio yet
        let Ok(afd) =
            tokio::io::unix::AsyncFd::with_interest(Fd(fd), tokio::io::Interest::READABLE)
        else {
            return;
        };
        let k = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = afd.readable().await else {
                    return;
                };
                if let Some(l) = k.logger.lock().unwrap().as_mut() {
                    l.flush();
                }
                guard.clear_ready();
            }
        });
    }
}

/// Pins a cgroup attachment under `pins` as `program`'s link (replacing a previous agent's).
fn pin_link<L>(link: L, pins: &Path, program: &str) -> Result<PinnedLink>
where
    FdLink: TryFrom<L>,
{
    let link = FdLink::try_from(link)
        .map_err(|_| anyhow!("{program}: the kernel has no bpf_link for cgroups"))?;
    pin::pin_replacing(link, &pin::link_path(pins, program))
}

const _: () =
    assert!(crate::config::MAX_EXCLUDED_INBOUND_PORTS + 1 == authz_common::MAX_EXCLUDED_PORTS);

fn inbound_link_name(cookie: u64) -> String {
    format!("inbound-{cookie:016x}")
}

fn fail_code(m: FailMode) -> u32 {
    match m {
        FailMode::Closed => FAIL_CLOSED,
        FailMode::Open => FAIL_OPEN,
    }
}

/// Refuses adopted maps whose key or value size differs from this build's.
fn check_layouts(ebpf: &Ebpf, maps_dir: &Path) -> Result<()> {
    for (name, key, value) in PINNED_MAPS {
        let map = ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
        let data: &MapData = match map {
            aya::maps::Map::HashMap(d)
            | aya::maps::Map::PerCpuHashMap(d)
            | aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::Array(d)
            | aya::maps::Map::SockHash(d) => d,
            _ => bail!("map {name} has an unexpected type"),
        };
        let info = data.info()?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            bail!(
                "pinned map {} has key/value sizes {}/{}, this agent needs {key}/{value}: \
                 it was not made by this build's layout {LAYOUT}",
                maps_dir.join(name).display(),
                info.key_size(),
                info.value_size()
            );
        }
    }
    Ok(())
}

struct Fd(std::os::fd::RawFd);
impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The oldest kernel the programs run on, and what each newer feature is for.
pub const MINIMUM_KERNEL: (u32, u32) = (5, 15);
const NEEDS: &str =
    "bpf_get_netns_cookie in sock_ops and sk_msg programs (5.15), SO_NETNS_COOKIE (5.14), \
bpf_get_current_ancestor_cgroup_id in cgroup/connect4 and connect6 (5.7)";

/// Refuses a kernel older than `MINIMUM_KERNEL`, naming what it lacks. A release that does not
/// parse is let through: the load itself then says what failed.
pub fn check_release(release: &str) -> Result<()> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let (min_major, min_minor) = MINIMUM_KERNEL;
    if (major, minor) < (min_major, min_minor) {
        bail!("kernel {release} is too old: the agent needs {min_major}.{min_minor} or later for {NEEDS}");
    }
    Ok(())
}

/// cgroup v2 ids are the inode numbers of the cgroup directories.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("cgroup {}", path.display()))?;
    if !meta.is_dir() {
        bail!("cgroup {} is not a directory", path.display());
    }
    Ok(meta.ino())
}

/// The cgroup of the process named `kubelet` (the first found), under the cgroup2 mount. In a
/// container with its own cgroup namespace, `/proc/<pid>/cgroup` names it relative to ours (with
/// `..` steps): the path below the mount is then found by the directory that holds the pid.
pub fn find_kubelet_cgroup() -> Option<PathBuf> {
    let mount = cgroup2_mount().ok()?;
    let (pid, rel) = std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if comm.trim() != "kubelet" {
            return None;
        }
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
        Some((pid, rel))
    })?;
    cgroup_of(&mount, &rel, pid)
}

/// The directory under `mount` of the cgroup a process `pid` names as `rel` in its
/// `/proc/<pid>/cgroup` line, seen from our cgroup namespace.
fn cgroup_of(mount: &Path, rel: &str, pid: u32) -> Option<PathBuf> {
    let holds = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid.to_string()))
    };
    let below: PathBuf = Path::new(&rel)
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    let direct = mount.join(&below);
    if holds(&direct) {
        return Some(direct);
    }
    // Relative to a namespace root we cannot see: the directory ending with that path which
    // holds the pid (a bounded walk of the hierarchy).
    let mut stack = vec![(mount.to_path_buf(), 0usize)];
    let mut seen = 0;
    while let Some((dir, depth)) = stack.pop() {
        seen += 1;
        if seen > 50_000 {
            return None;
        }
        if dir.ends_with(&below) && holds(&dir) {
            return Some(dir);
        }
        if depth < 12 {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| (e.path(), depth + 1)),
                );
            }
        }
    }
    None
}

/// Where cgroup2 is mounted: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .min_by_key(|p| p.as_os_str().len())
        .ok_or_else(|| anyhow!("no cgroup2 file system is mounted"))
}

fn boottime_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

pub(crate) fn raise_memlock() {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod kubelet_tests {
    use super::cgroup_of;

    #[test]
    fn the_kubelets_cgroup_is_found_from_another_cgroup_namespace() {
        let root = std::env::temp_dir().join(format!("authz-cg-{}", std::process::id()));
        let kubelet = root.join("system.slice/kubelet.service");
        std::fs::create_dir_all(&kubelet).unwrap();
        std::fs::create_dir_all(root.join("kubepods.slice/pod1/ctr")).unwrap();
        std::fs::write(kubelet.join("cgroup.procs"), "7\n42\n").unwrap();
        // Seen from the host's namespace, and from a container's three levels down.
        assert_eq!(
            cgroup_of(&root, "/system.slice/kubelet.service", 42),
            Some(kubelet.clone())
        );
        assert_eq!(
            cgroup_of(&root, "/../../../system.slice/kubelet.service", 42),
            Some(kubelet.clone())
        );
        // Not the kubelet's pid there: not its cgroup.
        assert_eq!(cgroup_of(&root, "/system.slice/kubelet.service", 43), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

#[cfg(test)]
mod layout_tests {
    /// A change to the pinned maps must come with a new `LAYOUT`: then agents of different
    /// builds never adopt each other's state, they take it over. When this fails, bump `LAYOUT`
    /// and put the new fingerprint here.
    #[test]
    fn layout_fingerprint() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, key, value) in super::PINNED_MAPS {
            for b in format!("{name}:{key}:{value};").bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        assert_eq!(
            (super::LAYOUT, format!("{h:016x}")),
            (2, "9d8307f49946fc3a".to_string()),
            "the pinned maps changed: bump LAYOUT and record the new fingerprint"
        );
    }
}

#[cfg(test)]
mod release_tests {
    use super::check_release;

    #[test]
    fn kernels_older_than_the_minimum_are_refused_by_name() {
        for ok in [
            "6.1.0-57-amd64",
            "6.12.48+deb13-amd64",
            "5.15.0-91-generic",
            "6.18.44-fc-v1045",
            "weird",
        ] {
            check_release(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for old in ["5.14.21", "5.10.0-28-amd64", "4.19.0"] {
            let e = check_release(old).unwrap_err().to_string();
            assert!(e.contains(old) && e.contains("bpf_get_netns_cookie"), "{e}");
        }
    }
}
