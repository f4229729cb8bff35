//! Connections to the original destination, made from inside the source pod's network
//! namespace so the destination sees the pod's own address and routes.
use std::{io, net::SocketAddr, os::fd::FromRawFd, os::fd::IntoRawFd, sync::Arc};

use tokio::net::{TcpSocket, TcpStream};

use crate::netns::NetNs;

pub async fn connect(netns: &Arc<NetNs>, dst: SocketAddr) -> io::Result<TcpStream> {
    let fd = netns.tcp_socket(&dst)?;
    // Safety: a fresh, owned, non-blocking TCP socket.
    let sock = unsafe { TcpSocket::from_raw_fd(fd.into_raw_fd()) };
    sock.set_nodelay(true)?;
    sock.connect(dst).await
}
