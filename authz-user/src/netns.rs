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
        use nix::sys::socket::{bind, setsockopt, sockopt, SockaddrStorage};
        let fd = self.tcp_socket(&addr)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        setsockopt(&fd, sockopt::ReusePort, &true)?;
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

/// The addresses of the agent's own network namespace: on a node, the node's addresses (where
/// kubelet's probes come from).
pub fn own_addresses() -> std::collections::HashSet<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Default::default();
    };
    addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(std::net::IpAddr::V4(v4.ip()));
            }
            a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
        })
        .filter(|ip| !ip.is_loopback())
        .collect()
}
