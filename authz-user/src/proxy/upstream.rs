//! Connections to the original destination. Outbound: made from inside the source pod's network
//! namespace so the destination sees the pod's own address and routes. Inbound: made inside the
//! destination pod from 127.0.0.6 (IPv6: the destination address itself), a source only the pod
//! itself can have, which the capture program lets through; the kernel pairs the hop's two ends for sk_msg.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, IntoRawFd},
};

use tokio::net::{TcpSocket, TcpStream};

use super::{ConnCtx, Direction};

/// Istio's sidecar connects to the application from this address too.
pub const INBOUND_HOP_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

pub async fn connect(conn: &ConnCtx) -> io::Result<TcpStream> {
    let dst = conn.dst;
    let fd = conn.netns.tcp_socket(&dst)?;
    // Safety: a fresh, owned, non-blocking TCP socket.
    let sock = unsafe { TcpSocket::from_raw_fd(fd.into_raw_fd()) };
    sock.set_nodelay(true)?;
    if let Direction::Inbound(kernel) = &conn.direction {
        let from = match dst {
            SocketAddr::V4(_) => SocketAddr::new(INBOUND_HOP_V4.into(), 0),
            // IPv6 has no loopback range to pick from (Istio's ::6 needs an address added to
            // the pod's loopback), and ::1 cannot reach a link-local address: the hop comes from
            // the destination address itself, which the capture program also leaves alone.
            SocketAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(*v6.ip(), 0, 0, v6.scope_id())),
        };
        sock.bind(from)?;
        // Only an optimisation: without the mark the hop goes through loopback TCP.
        if let Some(cookie) = socket_cookie(&sock) {
            let _ = kernel.hop(cookie);
        }
    }
    sock.connect(dst).await
}

fn socket_cookie(sock: &impl AsRawFd) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cookie)
}
