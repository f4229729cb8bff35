//! The source check on the host side of each pod's interface: its entry (the pod's addresses),
//! then the program attached at tc ingress there (tcx where the kernel has it, else a clsact
//! filter), replacing a previous agent's attachment in place so the check never lapses.
use std::{net::IpAddr, sync::Arc};

use anyhow::{bail, Context, Result};
use authz_common::{SourceDrops, SourcePod, MAX_SOURCE_ADDRS};
use aya::{
    maps::PerCpuValues,
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
};

use super::{addr_key, pin, Kernel};
use crate::netns::HostSide;

pub const PROGRAM: &str = "authz_source";
/// The clsact filter's place (kernels without tcx): first, so a CNI's filters run after it.
const PRIORITY: u16 = 1;
const HANDLE: u16 = 0xa7e;

/// Packets a pod's interface dropped, by kind, summed over CPUs.
pub type Drops = SourceDrops;

fn tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

fn link_name(side_ino: u64, ifindex: u32) -> String {
    format!("source-{side_ino:x}-{ifindex}")
}

fn ifname(ifindex: u32) -> Result<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error()).context(format!("ifindex {ifindex}"));
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

impl Kernel {
    /// Binds the pod `key` (kernel id `pod_id`) to `addrs` and its link-local addresses on
    /// `side`: from now on the node drops what it sends from any other address.
    pub fn bind_source(
        &self,
        side: &HostSide,
        pod_id: u32,
        key: Arc<str>,
        addrs: &[IpAddr],
    ) -> Result<()> {
        let mut bound = self.bound.lock().unwrap();
        if let Some((ino, other)) = bound.get(&side.ifindex) {
            if *ino != side.netns_ino {
                bail!(
                    "ifindex {} of another namespace is already bound (pod {other}): this agent \
                     binds host ends in one namespace",
                    side.ifindex
                );
            }
        }
        let all: Vec<[u32; 4]> = addrs
            .iter()
            .copied()
            .chain(side.link_local.iter().map(|v6| IpAddr::V6(*v6)))
            .map(addr_key)
            .collect();
        if all.len() > MAX_SOURCE_ADDRS {
            bail!(
                "{} addresses, at most {MAX_SOURCE_ADDRS} are checked",
                all.len()
            );
        }
        let mut entry = SourcePod {
            count: all.len() as u32,
            pod_id,
            host_netns: side.netns_ino,
            ..Default::default()
        };
        entry.addrs[..all.len()].copy_from_slice(&all);
        // The entry first: an attached program with no entry drops everything.
        self.source_pods
            .lock()
            .unwrap()
            .insert(side.ifindex, entry, 0)
            .context("SOURCE_PODS insert")?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros = PerCpuValues::try_from(vec![SourceDrops::default(); cpus])?;
        // Counts survive a hot restart: only a new interface starts at zero.
        let mut drops = self.source_drops.lock().unwrap();
        if drops.get(&side.ifindex, 0).is_err() {
            drops
                .insert(side.ifindex, zeros, 0)
                .context("SOURCE_DROPS insert")?;
        }
        drop(drops);
        let mut ebpf = self.ebpf.lock().unwrap();
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .context("authz_source missing")?
            .try_into()?;
        let path = pin::link_path(&self.pins, &link_name(side.netns_ino, side.ifindex));
        side.netns
            .enter(|| attach(prog, side.ifindex, &path))?
            .with_context(|| {
                format!(
                    "attaching the source check to the host end of {} (ifindex {})",
                    side.pod_ifname, side.ifindex
                )
            })?;
        bound.insert(side.ifindex, (side.netns_ino, key));
        Ok(())
    }

    /// Removes the check from `side` (the pod is released), then its entry.
    pub fn unbind_source(&self, side: &HostSide) -> Result<()> {
        let path = pin::link_path(&self.pins, &link_name(side.netns_ino, side.ifindex));
        let detached = side.netns.enter(|| detach(side.ifindex, &path))?;
        self.bound.lock().unwrap().remove(&side.ifindex);
        let _ = self.source_pods.lock().unwrap().remove(&side.ifindex);
        let _ = self.source_drops.lock().unwrap().remove(&side.ifindex);
        detached
    }

    /// The interfaces this agent has bound.
    pub fn bound_ifindexes(&self) -> std::collections::HashSet<u32> {
        self.bound.lock().unwrap().keys().copied().collect()
    }

    /// What each bound pod's interface dropped, by pod.
    pub fn source_drops(&self) -> Vec<(Arc<str>, Drops)> {
        let bound = self.bound.lock().unwrap();
        let drops = self.source_drops.lock().unwrap();
        bound
            .iter()
            .filter_map(|(ifindex, (_, pod))| {
                let per_cpu = drops.get(ifindex, 0).ok()?;
                let sum = per_cpu.iter().fold(Drops::default(), |a, d| Drops {
                    ipv4: a.ipv4 + d.ipv4,
                    ipv6: a.ipv6 + d.ipv6,
                    arp: a.arp + d.arp,
                    nd: a.nd + d.nd,
                    other: a.other + d.other,
                });
                Some((pod.clone(), sum))
            })
            .collect()
    }
}

/// Attaches `prog` at ingress of `ifindex` in the calling thread's namespace, replacing the
/// previous agent's attachment in place when there is one (tcx: the pinned link is updated;
/// clsact: the filter at our priority and handle is replaced).
fn attach(prog: &mut SchedClassifier, ifindex: u32, path: &std::path::Path) -> Result<()> {
    let name = ifname(ifindex)?;
    if tcx() {
        if let Ok(old) = PinnedLink::from_pin(path) {
            let link = SchedClassifierLink::try_from(FdLink::from(old))?;
            if let Ok(id) = prog.attach_to_link(link) {
                // Still pinned at `path`: dropping our fd keeps it attached.
                let _: FdLink = prog.take_link(id)?.try_into()?;
                return Ok(());
            }
            // A link whose interface went (an ifindex used again): replaced below.
        }
        let id = prog.attach_with_options(
            &name,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        pin::pin_replacing(link, path)?;
        return Ok(());
    }
    if let Err(e) = tc::qdisc_add_clsact(&name) {
        // Already there (ours from before, or a CNI's) is what we want.
        if !format!("{e:?}").contains("EEXIST") && !e.to_string().contains("exists") {
            tracing::debug!(ifindex, "clsact: {e}");
        }
    }
    let options = NlOptions {
        priority: PRIORITY,
        handle: TcHandle::new(0, HANDLE),
        classid: None,
    };
    let existing = SchedClassifierLink::attached(
        &name,
        TcAttachType::Ingress,
        PRIORITY,
        options.handle,
        None,
    )?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        Err(_) => prog.attach_with_options(
            &name,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(options),
        )?,
    };
    // A filter stays on the interface without this process; dropping the link would remove it.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// Removes the check from `ifindex` in the calling thread's namespace. An interface that is
/// gone took its filter with it.
fn detach(ifindex: u32, path: &std::path::Path) -> Result<()> {
    if tcx() || path.exists() {
        return match pin::unpin_detach(path) {
            Ok(()) => Ok(()),
            Err(_) if ifname(ifindex).is_err() => {
                let _ = std::fs::remove_file(path);
                Ok(())
            }
            Err(e) => Err(e),
        };
    }
    let Ok(name) = ifname(ifindex) else {
        return Ok(());
    };
    use aya::programs::links::Link as _;
    let link = SchedClassifierLink::attached(
        &name,
        TcAttachType::Ingress,
        PRIORITY,
        TcHandle::new(0, HANDLE),
        None,
    )?;
    link.detach().context("removing the source check filter")?;
    Ok(())
}

/// `cleanup` and taking over from another layout: removes the clsact filters a stopped agent
/// left (tcx links are pinned and go with the other links), finding each interface's namespace
/// by the inode its entry recorded; but not on the interfaces in `keep`, where the caller's own
/// filter has replaced it in place.
pub fn cleanup_filters(
    maps_dir: &std::path::Path,
    keep: &std::collections::HashSet<u32>,
) -> Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let path = maps_dir.join(authz_common::maps::SOURCE_PODS);
    if !path.exists() {
        return Ok(0);
    }
    let data = aya::maps::MapData::from_pin(&path).context("opening SOURCE_PODS")?;
    // Another layout's entries may not read as ours: then there is nothing we can find by them.
    let Ok(map) = aya::maps::HashMap::<_, u32, SourcePod>::try_from(aya::maps::Map::HashMap(data))
    else {
        return Ok(0);
    };
    // `cleanup` runs in a process of its own: entering namespaces needs the way home first.
    crate::netns::init()?;
    let mut spaces: Vec<crate::netns::NetNs> = vec![];
    if let Ok(home) = crate::netns::NetNs::open(std::path::Path::new("/proc/self/ns/net")) {
        spaces.push(home);
    }
    if let Ok(dir) = std::fs::read_dir("/var/run/netns") {
        spaces.extend(
            dir.flatten()
                .filter_map(|e| crate::netns::NetNs::open(&e.path()).ok()),
        );
    }
    let mut removed = 0;
    for (ifindex, entry) in map.iter().flatten() {
        if keep.contains(&ifindex) {
            continue;
        }
        let Some(ns) = spaces.iter().find(|n| {
            n.file()
                .metadata()
                .is_ok_and(|m| m.ino() == entry.host_netns)
        }) else {
            continue;
        };
        let gone = ns.enter(|| {
            let Ok(name) = ifname(ifindex) else {
                return false;
            };
            use aya::programs::links::Link as _;
            SchedClassifierLink::attached(
                &name,
                TcAttachType::Ingress,
                PRIORITY,
                TcHandle::new(0, HANDLE),
                None,
            )
            .is_ok_and(|l| l.detach().is_ok())
        });
        if gone.unwrap_or(false) {
            removed += 1;
        }
    }
    Ok(removed)
}

/// The source check run by the kernel on packets given here, on no interface
/// (`BPF_PROG_TEST_RUN`, which hands them in as if received on the loopback device): the
/// program's verdicts for tests, and its cost per packet for the benchmark. Private maps, nothing
/// attached. Needs root.
pub struct Harness {
    ebpf: aya::Ebpf,
}

impl Harness {
    /// The program with one pod on the loopback device owning `addrs`.
    pub fn new(addrs: &[IpAddr]) -> Result<Harness> {
        super::raise_memlock();
        let mut ebpf = aya::EbpfLoader::new()
            .load(super::OBJECT)
            .context("loading the eBPF object")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .context("authz_source missing")?
            .try_into()?;
        prog.load()?;
        let mut pods: aya::maps::HashMap<_, u32, SourcePod> = aya::maps::HashMap::try_from(
            ebpf.map_mut(authz_common::maps::SOURCE_PODS)
                .context("SOURCE_PODS missing")?,
        )?;
        let mut entry = SourcePod {
            count: addrs.len() as u32,
            pod_id: 1,
            ..Default::default()
        };
        for (slot, a) in entry.addrs.iter_mut().zip(addrs) {
            *slot = addr_key(*a);
        }
        pods.insert(LOOPBACK_IFINDEX, entry, 0)?;
        Ok(Harness { ebpf })
    }

    /// Whether the check lets `frame` (Ethernet and up) through, and the kernel's mean time
    /// per run over `repeat` runs.
    pub fn run(&self, frame: &[u8], repeat: u32) -> Result<(bool, std::time::Duration)> {
        use aya::programs::TestRun;
        let prog: &SchedClassifier = self
            .ebpf
            .program(PROGRAM)
            .context("authz_source missing")?
            .try_into()?;
        let r = prog.test_run(aya::programs::TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        // TC_ACT_SHOT (2) drops; anything else goes on.
        Ok((r.return_value != 2, r.duration))
    }
}

/// The loopback device, which `BPF_PROG_TEST_RUN` hands packets in on.
const LOOPBACK_IFINDEX: u32 = 1;
