//! Connections to the original destination. Outbound: made from inside the source pod's network
//! namespace so the destination sees the pod's own address and routes. Inbound: made inside the
//! destination pod from 127.0.0.6 (IPv6: ::1), a source only the pod itself can have, which the
//! capture program lets through; the kernel pairs the hop's two ends for sk_msg.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
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
        let from: IpAddr = if dst.is_ipv4() {
            INBOUND_HOP_V4.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        };
        sock.bind(SocketAddr::new(from, 0))?;
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
