//! The few rtnetlink queries the agent needs to find where a pod's interface enters the node:
//! the links of the calling thread's network namespace (with their veth peer) and the id a
//! namespace has for another. Answers come from the kernel; they are parsed defensively anyway.
use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// One network interface as the namespace it lives in sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`, ... (None for loopback and devices without a kind).
    pub kind: Option<String>,
    /// The other end's ifindex (veth), in the namespace `peer_netnsid` names.
    pub peer: Option<u32>,
    /// The id this namespace gives the peer's namespace; None when the peer is here.
    pub peer_netnsid: Option<i32>,
}

/// Every link of the calling thread's network namespace.
pub fn links() -> io::Result<Vec<Link>> {
    let sock = socket()?;
    let mut req = header(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, IFINFOMSG_LEN);
    req.extend_from_slice(&[0u8; IFINFOMSG_LEN]);
    send(&sock, &req)?;
    let mut out = vec![];
    recv_all(&sock, |kind, body| {
        if kind == RTM_NEWLINK && body.len() >= IFINFOMSG_LEN {
            let index = u32::from_ne_bytes(body[4..8].try_into().unwrap());
            out.push(parse_link(index, &body[IFINFOMSG_LEN..]));
        }
    })?;
    Ok(out)
}

/// The id the calling thread's namespace gives the namespace `other` (None: it has none, so no
/// interface here has a peer there).
pub fn nsid(other: &File) -> io::Result<Option<i32>> {
    let sock = socket()?;
    let mut req = header(RTM_GETNSID, NLM_F_REQUEST, 4 + 8);
    req.extend_from_slice(&[0u8; 4]); // rtgenmsg, padded
    attr(
        &mut req,
        NETNSA_FD,
        &(other.as_raw_fd() as u32).to_ne_bytes(),
    );
    send(&sock, &req)?;
    let mut id = None;
    recv_all(&sock, |kind, body| {
        if kind == RTM_NEWNSID && body.len() >= 4 {
            for (t, v) in attrs(&body[4..]) {
                if t == NETNSA_NSID && v.len() == 4 {
                    id = Some(i32::from_ne_bytes(v.try_into().unwrap()));
                }
            }
        }
    })?;
    Ok(id.filter(|i| *i >= 0))
}

fn parse_link(index: u32, mut rest: &[u8]) -> Link {
    let mut link = Link {
        index,
        name: String::new(),
        kind: None,
        peer: None,
        peer_netnsid: None,
    };
    for (t, v) in attrs(std::mem::take(&mut rest)) {
        match t {
            IFLA_IFNAME => link.name = cstr(v),
            IFLA_LINK if v.len() == 4 => {
                link.peer = Some(u32::from_ne_bytes(v.try_into().unwrap()))
            }
            IFLA_LINK_NETNSID if v.len() == 4 => {
                link.peer_netnsid = Some(i32::from_ne_bytes(v.try_into().unwrap()))
            }
            IFLA_LINKINFO => {
                for (t, v) in attrs(v) {
                    if t == IFLA_INFO_KIND {
                        link.kind = Some(cstr(v));
                    }
                }
            }
            _ => {}
        }
    }
    // A link that is its own "peer" (IFLA_LINK = own index, same namespace) has none. In another
    // namespace the same number is another device: ifindexes are per namespace.
    if link.peer == Some(0) || (link.peer == Some(index) && link.peer_netnsid.is_none()) {
        link.peer = None;
    }
    link
}

fn cstr(v: &[u8]) -> String {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// The (type, value) attributes in `buf`; stops at the first malformed one.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, value))
    })
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn header(kind: u16, flags: u16, payload: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(NLMSG_HDRLEN + payload);
    h.extend_from_slice(&((NLMSG_HDRLEN + payload) as u32).to_ne_bytes());
    h.extend_from_slice(&kind.to_ne_bytes());
    h.extend_from_slice(&flags.to_ne_bytes());
    h.extend_from_slice(&1u32.to_ne_bytes()); // seq
    h.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    h
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn socket() -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(sock: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    let r = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads replies until the dump ends (or the single answer of a plain request), handing each
/// message's type and body to `each`.
fn recv_all(sock: &OwnedFd, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut msgs = &buf[..n as usize];
        let mut multi = false;
        while msgs.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
            let flags = u16::from_ne_bytes([msgs[6], msgs[7]]);
            if len < NLMSG_HDRLEN || len > msgs.len() {
                return Err(io::Error::other("malformed netlink message"));
            }
            let body = &msgs[NLMSG_HDRLEN..len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = body
                        .get(0..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                        .unwrap_or(-libc::EIO);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                _ => each(kind, body),
            }
            multi |= flags & 2 != 0; // NLM_F_MULTI
            msgs = &msgs[align(len).min(msgs.len())..];
        }
        if !multi {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_stop_at_a_malformed_one() {
        let mut buf = vec![];
        attr(&mut buf, IFLA_IFNAME, b"eth0\0");
        attr(&mut buf, IFLA_LINK, &7u32.to_ne_bytes());
        let link = parse_link(3, &buf);
        assert_eq!(link.name, "eth0");
        assert_eq!(link.peer, Some(7));
        // A peer with the same ifindex in another namespace is a peer.
        let mut other = buf.clone();
        attr(&mut other, IFLA_LINK_NETNSID, &0i32.to_ne_bytes());
        let mut same = vec![];
        attr(&mut same, IFLA_LINK, &3u32.to_ne_bytes());
        assert_eq!(parse_link(3, &same).peer, None);
        attr(&mut same, IFLA_LINK_NETNSID, &1i32.to_ne_bytes());
        assert_eq!(parse_link(3, &same).peer, Some(3));
        assert_eq!(parse_link(3, &other).peer_netnsid, Some(0));
        // A length past the end: nothing more is read.
        buf.extend_from_slice(&[200, 0, 5, 0]);
        assert_eq!(attrs(&buf).count(), 2);
    }

    #[test]
    fn this_namespace_has_a_loopback_link() {
        let links = links().unwrap();
        assert!(links.iter().any(|l| l.name == "lo"), "{links:?}");
    }
}
