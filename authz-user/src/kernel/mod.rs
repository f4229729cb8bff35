//! Loading and attaching the eBPF programs, and the agent's side of their maps.
//! Everything attached here is detached when `Kernel` is dropped.
use std::{
    fs::File,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use authz_common::{
    counter, maps, AgentState, Enforced, OrigDst, PodInfo, SockKey, FAIL_CLOSED, FAIL_OPEN,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps},
    Ebpf,
};

use crate::config::FailMode;

mod addr;
pub use addr::{addr_key, key_addr};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/authz"));

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
}

pub struct Kernel {
    // bpf_link attachments are always multi-program: `Single` only means "no flags".
    // Field order matters for drop: maps and logger go before the programs' links.
    enrolled: Mutex<HashMap<MapData, u64, PodInfo>>,
    enforced: Mutex<HashMap<MapData, [u32; 4], Enforced>>,
    conn_orig: Mutex<HashMap<MapData, SockKey, OrigDst>>,
    counters: PerCpuArray<MapData, u64>,
    state: Mutex<Array<MapData, AgentState>>,
    _sock_hash: SockHash<MapData, SockKey>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    ebpf: Ebpf,
    pub cgroup_root: PathBuf,
}

impl Kernel {
    /// Loads the programs and attaches them to `cgroup_root` (default: the cgroup2 mount).
    pub fn load(cgroup_root: Option<&Path>) -> Result<Kernel> {
        raise_memlock();
        let cgroup_root = match cgroup_root {
            Some(p) => p.to_path_buf(),
            None => cgroup2_mount()?,
        };
        let mut ebpf = Ebpf::load(OBJECT).context("loading the eBPF object")?;
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

        for name in ["authz_connect4", "authz_connect6"] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            prog.attach(&cg, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup_root.display()))?;
        }
        let prog: &mut SockOps = program(&mut ebpf, "authz_sock_ops")?.try_into()?;
        prog.load().context("loading authz_sock_ops")?;
        prog.attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching authz_sock_ops to {}", cgroup_root.display()))?;

        let sock_hash: SockHash<MapData, SockKey> = take(&mut ebpf, maps::SOCK_HASH)?;
        // sk_msg must be on the sockhash before sock_ops inserts sockets into it.
        let prog: &mut SkMsg = program(&mut ebpf, "authz_sk_msg")?.try_into()?;
        prog.load().context("loading authz_sk_msg")?;
        prog.attach(sock_hash.fd())
            .context("attaching authz_sk_msg")?;

        Ok(Kernel {
            enrolled: Mutex::new(take(&mut ebpf, maps::ENROLLED_PODS)?),
            enforced: Mutex::new(take(&mut ebpf, maps::ENFORCED_IPS)?),
            conn_orig: Mutex::new(take(&mut ebpf, maps::CONN_ORIG)?),
            counters: take(&mut ebpf, maps::COUNTERS)?,
            state: Mutex::new(take(&mut ebpf, maps::AGENT_STATE)?),
            _sock_hash: sock_hash,
            logger: Mutex::new(logger),
            ebpf,
            cgroup_root,
        })
    }

    /// Enrolls the pod whose cgroup is `cgroup`; returns the cgroup id.
    pub fn enroll(&self, cgroup: &Path, pod_id: u32, agent_port: u16) -> Result<u64> {
        let id = cgroup_id(cgroup)?;
        let info = PodInfo {
            pod_id,
            agent_port,
            _pad: 0,
        };
        self.enrolled
            .lock()
            .unwrap()
            .insert(id, info, 0)
            .context("ENROLLED_PODS insert")?;
        Ok(id)
    }

    pub fn release(&self, cgroup_id: u64) -> Result<()> {
        self.enrolled
            .lock()
            .unwrap()
            .remove(&cgroup_id)
            .context("ENROLLED_PODS remove")
    }

    pub fn enforce(&self, ip: IpAddr, workload_id: u32) -> Result<()> {
        let v = Enforced {
            workload_id,
            _pad: 0,
        };
        self.enforced
            .lock()
            .unwrap()
            .insert(addr_key(ip), v, 0)
            .context("ENFORCED_IPS insert")
    }

    pub fn unenforce(&self, ip: IpAddr) -> Result<()> {
        self.enforced
            .lock()
            .unwrap()
            .remove(&addr_key(ip))
            .context("ENFORCED_IPS remove")
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
            fail_mode: match fail_mode {
                FailMode::Closed => FAIL_CLOSED,
                FailMode::Open => FAIL_OPEN,
            },
            _pad: 0,
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

    /// Names of the programs as the kernel lists them (for health output).
    pub fn program_names(&self) -> Vec<String> {
        self.ebpf.programs().map(|(n, _)| n.to_string()).collect()
    }
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

/// cgroup v2 ids are the inode numbers of the cgroup directories.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("cgroup {}", path.display()))?;
    if !meta.is_dir() {
        bail!("cgroup {} is not a directory", path.display());
    }
    Ok(meta.ino())
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

fn raise_memlock() {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}
