//! Working inside a pod's network namespace from the agent: listeners and outbound sockets are
//! created there (setns on the calling thread, then back), and then used from anywhere.
use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::OnceLock,
};

use nix::sched::{setns, CloneFlags};

/// Accept queue of the pods' listeners.
const LISTEN_BACKLOG: libc::c_int = 1024;

/// The agent's own network namespace, captured before any thread moves.
static HOME: OnceLock<File> = OnceLock::new();

/// Call once at start-up, from the main thread.
pub fn init() -> io::Result<()> {
    if HOME.get().is_none() {
        let _ = HOME.set(File::open("/proc/self/ns/net")?);
    }
    Ok(())
}

#[derive(Debug)]
pub struct NetNs {
    file: File,
}

impl NetNs {
    pub fn open(path: &Path) -> io::Result<NetNs> {
        Ok(NetNs {
            file: File::open(path)?,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` with the calling thread in this namespace. `f` must not block on anything that
    /// could run other tasks on this thread.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = HOME
            .get()
            .ok_or_else(|| io::Error::other("netns::init was not called"))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stuck in a pod's namespace would send other pods' traffic from it.
            eprintln!("fatal: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }

    /// A non-blocking TCP socket created in this namespace.
    pub fn tcp_socket(&self, for_addr: &SocketAddr) -> io::Result<OwnedFd> {
        let domain = if for_addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        self.enter(|| {
            let fd = unsafe {
                libc::socket(
                    domain,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        })?
    }

    /// A listening socket bound in this namespace, with SO_REUSEPORT so a new agent can listen
    /// beside the old one during a hot restart.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        self.listen_with(addr, true)
    }

    /// A listening socket no other socket can share (no SO_REUSEPORT group to join).
    pub fn listen_exclusive(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        self.listen_with(addr, false)
    }

    fn listen_with(&self, addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
        use nix::sys::socket::{bind, setsockopt, sockopt, SockaddrStorage};
        let fd = self.tcp_socket(&addr)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        if reuse_port {
            setsockopt(&fd, sockopt::ReusePort, &true)?;
        }
        bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
        // The kernel caps the backlog at net.core.somaxconn. Not nix's Backlog: it refuses more
        // than the C library's SOMAXCONN, which is 128 in musl (the image's agent).
        if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(std::net::TcpListener::from(fd))
    }
}

/// The netns cookie of a socket (SO_NETNS_COOKIE), as the eBPF programs see it.
pub fn netns_cookie(fd: &impl AsFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Where one of a pod's interfaces enters the node: the host end of its veth, where the
/// source check is attached (a filter inside the pod could be skipped by a raw socket).
#[derive(Debug)]
pub struct HostSide {
    /// The namespace the host end lives in: the node's own on a node.
    pub netns: NetNs,
    /// That namespace's inode (its ifindexes are only unique there).
    pub netns_ino: u64,
    pub ifindex: u32,
    /// The interface inside the pod (for messages).
    pub pod_ifname: String,
    /// The pod's IPv6 link-local addresses on it, which its neighbour discovery uses.
    pub link_local: Vec<std::net::Ipv6Addr>,
}

/// Named namespaces (`ip netns`, CNI plugins): where a host end not in the agent's own
/// namespace is looked for.
const NAMED_NETNS: &str = "/var/run/netns";

/// The host ends of the pod's interfaces. Every interface carrying one of `pod_ips` must be a
/// veth whose other end is found outside the pod; otherwise what the pod sends cannot be
/// checked by the node, which is an error, never a silent pass.
pub fn host_sides(pod: &NetNs, pod_ips: &[std::net::IpAddr]) -> anyhow::Result<Vec<HostSide>> {
    use anyhow::{anyhow, bail, Context};
    use std::os::unix::fs::MetadataExt;
    let pod_ino = pod.file.metadata()?.ino();
    // The agent's own namespace first: the host end is there on a node.
    let mut candidates: Vec<File> = vec![home()?.file];
    if let Ok(dir) = std::fs::read_dir(NAMED_NETNS) {
        for e in dir.flatten() {
            if let Ok(f) = File::open(e.path()) {
                if f.metadata().is_ok_and(|m| m.ino() != pod_ino) {
                    candidates.push(f);
                }
            }
        }
    }
    let (links, addrs, nsids) = pod.enter(|| -> std::io::Result<_> {
        let links = crate::netlink::links()?;
        let addrs: Vec<(String, std::net::IpAddr)> = nix::ifaddrs::getifaddrs()
            .map_err(std::io::Error::from)?
            .filter_map(|a| {
                let sa = a.address?;
                let ip = if let Some(v4) = sa.as_sockaddr_in() {
                    std::net::IpAddr::V4(v4.ip())
                } else {
                    std::net::IpAddr::V6(sa.as_sockaddr_in6()?.ip())
                };
                Some((a.interface_name, ip))
            })
            .collect();
        let nsids: Vec<Option<i32>> = candidates
            .iter()
            .map(|c| crate::netlink::nsid(c).ok().flatten())
            .collect();
        Ok((links, addrs, nsids))
    })??;
    let mut sides = vec![];
    for link in links.iter().filter(|l| l.name != "lo") {
        let on_link = addrs
            .iter()
            .filter(|(n, _)| *n == link.name)
            .map(|(_, ip)| *ip);
        let carries = on_link.clone().any(|ip| pod_ips.contains(&ip));
        let (Some("veth"), Some(peer), Some(nsid)) =
            (link.kind.as_deref(), link.peer, link.peer_netnsid)
        else {
            if carries {
                bail!(
                    "interface {} carries the pod's address but is not a veth with its other end \
                     outside the pod (kind {:?}, peer {:?}, peer namespace id {:?}): the node \
                     cannot check what the pod sends",
                    link.name,
                    link.kind,
                    link.peer,
                    link.peer_netnsid
                );
            }
            continue;
        };
        let Some(at) = nsids.iter().position(|n| *n == Some(nsid)) else {
            bail!(
                "the other end of the pod's {} is in no namespace the agent can see (its own, \
                 or {NAMED_NETNS})",
                link.name
            );
        };
        let host = NetNs {
            file: candidates[at].try_clone()?,
        };
        let host_links = host.enter(crate::netlink::links)??;
        if !host_links.iter().any(|h| {
            h.index == peer && h.kind.as_deref() == Some("veth") && h.peer == Some(link.index)
        }) {
            bail!(
                "the other end of the pod's {} (ifindex {peer}) was not found",
                link.name
            );
        }
        sides.push(HostSide {
            netns_ino: host.file.metadata()?.ino(),
            netns: host,
            ifindex: peer,
            pod_ifname: link.name.clone(),
            link_local: on_link
                .filter_map(|ip| match ip {
                    std::net::IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(v6),
                    _ => None,
                })
                .collect(),
        });
    }
    if sides.is_empty() {
        return Err(anyhow!("no veth in the pod's network namespace"))
            .context("finding where the pod's packets enter the node");
    }
    Ok(sides)
}

/// The agent's own network namespace.
pub fn home() -> io::Result<NetNs> {
    let home = HOME
        .get()
        .ok_or_else(|| io::Error::other("netns::init was not called"))?;
    Ok(NetNs {
        file: home.try_clone()?,
    })
}
