//! The data path: accept a connection in a pod's namespace, either steered there by connect4/6
//! (outbound: the pod is the client) or by sk_lookup (inbound: the pod is the destination),
//! recover where it was going and who is calling, sniff the protocol, then decide and forward
//! (HTTP) or relay (TCP).
use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use authz_common::SockKey;
use bytes::BytesMut;
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};

use crate::{
    config::AgentSettings,
    kernel::{addr_key, key_addr, Kernel},
    metrics::Metrics,
    netns::NetNs,
    registry::Pod,
    state::{InForce, State, Target},
};

pub mod http;
pub mod io;
pub mod records;
pub mod tcp;
pub mod upstream;

/// What every connection handler shares. The state in force is swapped whole on a change; a
/// request is decided with the state of the moment it arrives.
pub struct Proxy {
    pub kernel: Arc<Kernel>,
    pub metrics: Arc<Metrics>,
    pub settings: AgentSettings,
    pub state: Arc<InForce>,
    /// Every connection holds a blocker from it; on stop, HTTP connections finish the request
    /// in flight and close, and the agent waits for the last blocker.
    pub drain: crate::drain::Watch,
    /// Connections open through the agent at once, all pods together (see `limits`).
    pub max_connections: u64,
    /// Connections open per client (see `limits`).
    pub clients: crate::limits::Clients,
    /// Bumped when new policies are in force: open TCP relays decide again.
    pub policies_changed: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    pub fn state(&self) -> Arc<State> {
        self.state.get()
    }
}

/// Which way a connection crosses the pod whose listener took it.
pub enum Direction {
    /// The pod is the client; the agent connects from the pod to the destination.
    Outbound,
    /// The pod is the destination; the agent connects to the application in the pod from
    /// 127.0.0.6 (IPv6: the destination address itself), a hop the kernel pairs for sk_msg.
    Inbound(Arc<Kernel>),
}

/// One redirected connection.
pub struct ConnCtx {
    /// Whose policies apply: the destination (`ns/name`), if this agent decides for it. Looked
    /// up in the state in force at each decision, so labels and policies are as they are now.
    pub destination: Option<Arc<str>>,
    /// The destination's own agent decides (a Service backend that is a captured pod): this hop
    /// only picks the backend and forwards, deciding and counting nothing.
    pub decided_at_destination: bool,
    /// The caller's identity: the enrolled pod (outbound) or the pod or workload that owns the
    /// peer address (inbound); None for a peer that is no known pod (host, outside world).
    pub source: Option<Arc<crate::registry::Workload>>,
    pub netns: Arc<NetNs>,
    /// The caller's address, as the destination sees it (ipBlocks, records).
    pub src_ip: Option<IpAddr>,
    /// Where the connection was going.
    pub dst: SocketAddr,
    pub direction: Direction,
    /// kubelet probe paths this connection may request unchecked (the kubelet opened it, to a
    /// probe port of the pod); empty for every other connection.
    pub probe_paths: Vec<String>,
    /// Counts the connection open while anything (a request, a relay, an upgraded tunnel) still
    /// uses it.
    pub _open: OpenGuard,
}

/// The agent's listeners inside one pod's namespace.
pub struct PodListeners {
    pub pod: Arc<Pod>,
    /// The pod's `ns/name`: its destination key in the state in force.
    pub key: Arc<str>,
    pub netns: Arc<NetNs>,
    pub netns_cookie: u64,
    /// The port of the listeners, recorded in the pod's map entry for connect4/6.
    pub port: u16,
    pub listeners: Vec<TcpListener>,
    /// Listeners sk_lookup hands the pod's inbound connections to (IPv4, then IPv6 if the pod
    /// has it), with their address family; empty for a pod not captured inbound.
    pub inbound: Vec<(u16, TcpListener)>,
}

impl PodListeners {
    /// Binds 127.0.0.1 (and [::1] where the pod has IPv6) inside the pod's netns on one port:
    /// `reuse` when given (the port a previous agent recorded, so a hot restart listens beside
    /// it), else one the kernel picks, which the pod cannot have taken in advance. A port whose
    /// IPv6 side is taken is given up for another.
    ///
    /// For a pod captured inbound, also binds its inbound listeners on 127.0.0.1 and [::1]
    /// (sk_lookup hands them connections for any address), on ports the kernel picks and
    /// without SO_REUSEPORT: no process of the pod can join them and take a share of what they
    /// are handed. A hot restart hands over by replacing the listener in the kernel's map.
    pub fn open(pod: Arc<Pod>, reuse: Option<u16>) -> anyhow::Result<PodListeners> {
        use anyhow::Context;
        let name = format!("{}/{}", pod.workload.namespace, pod.workload.name);
        let netns = Arc::new(
            NetNs::open(&pod.netns)
                .with_context(|| format!("pod {name}: netns {}", pod.netns.display()))?,
        );
        let mut tries = reuse.into_iter().chain(std::iter::repeat_n(0, 8));
        let (v4, v6) = loop {
            let Some(port) = tries.next() else {
                anyhow::bail!("pod {name}: no port free on both 127.0.0.1 and [::1] in its netns");
            };
            let v4 = match netns.listen(SocketAddr::from(([127, 0, 0, 1], port))) {
                Ok(l) => l,
                Err(e) if port != 0 && e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("pod {name}: listening on 127.0.0.1 in its netns")
                    })
                }
            };
            let port = v4.local_addr()?.port();
            match netns.listen(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))) {
                Ok(v6) => break (v4, Some(v6)),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => {
                    tracing::debug!(pod = %name, "no IPv6 listener: {e}");
                    break (v4, None);
                }
            }
        };
        let netns_cookie = crate::netns::netns_cookie(&v4).context("SO_NETNS_COOKIE")?;
        // During a hot restart the old agent closes its listener while the new one listens on the
        // same port (SO_REUSEPORT): connections still in the old one's accept queue move to the
        // new one instead of being reset (kernel >= 5.14).
        match netns.enter(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")) {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                // Said once: it is the same for every pod (a capabilities-only container has a
                // read-only /proc/sys).
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "tcp_migrate_req cannot be set in pods' network namespaces ({e}): \
                         connections waiting in a listener's queue during a hot restart are \
                         reset instead of moved to the new agent"
                    )
                });
                tracing::debug!(pod = %name, "tcp_migrate_req not set: {e}")
            }
        }
        let port = v4.local_addr()?.port();
        let has_v6 = v6.is_some();
        let mut listeners = vec![TcpListener::from_std(v4)?];
        if let Some(v6) = v6 {
            listeners.push(TcpListener::from_std(v6)?);
        }
        let mut inbound = vec![];
        if pod.inbound {
            let bind = |ip: IpAddr| netns.listen_exclusive(SocketAddr::new(ip, 0));
            let l4 = bind(IpAddr::from([127, 0, 0, 1]))
                .with_context(|| format!("pod {name}: inbound listener on 127.0.0.1"))?;
            inbound.push((authz_common::AF_INET, TcpListener::from_std(l4)?));
            if has_v6 {
                let l6 = bind(IpAddr::from(std::net::Ipv6Addr::LOCALHOST))
                    .with_context(|| format!("pod {name}: inbound listener on [::1]"))?;
                inbound.push((authz_common::AF_INET6, TcpListener::from_std(l6)?));
            }
        }
        Ok(PodListeners {
            key: crate::state::key(&pod.workload).into(),
            pod,
            netns,
            netns_cookie,
            port,
            listeners,
            inbound,
        })
    }
}

pub async fn serve(px: Arc<Proxy>, mut pl: PodListeners) {
    // The accept loops own the listeners, so aborting this task closes them at once (a stopping
    // agent takes no new connections) while open connections, which share the rest, go on.
    let listeners = std::mem::take(&mut pl.listeners);
    let inbound_listeners = std::mem::take(&mut pl.inbound);
    let pl = Arc::new(pl);
    let mut tasks = tokio::task::JoinSet::new();
    let all = listeners
        .into_iter()
        .map(|l| (false, l))
        .chain(inbound_listeners.into_iter().map(|(_, l)| (true, l)));
    for (is_inbound, listener) in all {
        let (px, pl) = (px.clone(), pl.clone());
        tasks.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        // Held from accept on, so a stopping agent never exits between
                        // accepting a connection and holding it open.
                        let Some(starting) = Starting::new(&px) else {
                            continue;
                        };
                        let (px, pl) = (px.clone(), pl.clone());
                        tokio::spawn(async move {
                            let conn = if is_inbound {
                                inbound(&px, &pl, &stream, peer)
                            } else {
                                outbound(&px, &pl, &stream, peer)
                            };
                            if let Some(conn) = conn {
                                drop(starting);
                                serve_conn(px, conn, stream).await
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(pod = %pl.pod.workload.name, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// An outbound connection: the kernel recorded where the pod was connecting to.
fn outbound(
    px: &Arc<Proxy>,
    pl: &Arc<PodListeners>,
    stream: &TcpStream,
    peer: SocketAddr,
) -> Option<ConnCtx> {
    let local = stream.local_addr().ok()?;
    let key = SockKey {
        netns: pl.netns_cookie,
        local: addr_key(local.ip()),
        remote: addr_key(peer.ip()),
        local_port: u32::from(local.port()),
        remote_port: u32::from(peer.port()),
    };
    let Some(orig) = px.kernel.take_orig_dst(&key) else {
        // Not steered here by the kernel (e.g. a pod dialling the agent port itself): nothing to
        // enforce against, so nothing is forwarded.
        px.metrics.connections_unknown_origin.fetch_add(1, Relaxed);
        return None;
    };
    px.metrics.connections_redirected.fetch_add(1, Relaxed);
    let open = OpenGuard::take_counted(px, crate::limits::Client::Pod(pl.key.clone()))?;
    let state = px.state();
    let registry = &state.registry;
    let Some((dst, destination)) =
        registry.resolve(SocketAddr::new(key_addr(orig.addr), orig.port))
    else {
        // A service address with no backend on this port.
        px.metrics.connections_no_backend.fetch_add(1, Relaxed);
        return None;
    };
    let src_ip = pl
        .pod
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or(pl.pod.ips.first().copied());
    Some(ConnCtx {
        decided_at_destination: destination.is_none()
            && registry
                .decided_at_destination
                .contains(&crate::registry::normalize(dst.ip())),
        destination: destination.map(|w| crate::state::key(&w).into()),
        source: Some(pl.pod.workload.clone()),
        netns: pl.netns.clone(),
        src_ip,
        dst,
        direction: Direction::Outbound,
        probe_paths: vec![],
        _open: open,
    })
}

/// An inbound connection: sk_lookup handed it over, so its local address is where the peer was
/// connecting to, in this pod; the peer's identity is whatever pod or workload has its address.
fn inbound(
    px: &Arc<Proxy>,
    pl: &Arc<PodListeners>,
    stream: &TcpStream,
    peer: SocketAddr,
) -> Option<ConnCtx> {
    let local = stream.local_addr().ok()?;
    if local.ip().is_loopback() {
        // Dialled directly from inside the pod (sk_lookup never hands over a loopback
        // destination): forwarding it would connect the agent to itself.
        px.metrics.connections_unknown_origin.fetch_add(1, Relaxed);
        return None;
    }
    px.metrics.connections_inbound.fetch_add(1, Relaxed);
    let src = crate::registry::normalize(peer.ip());
    // Counted against whoever is calling, not against the pod: a client holding all it may
    // takes nothing from the pod's other clients or its own outbound calls.
    let open = OpenGuard::take_counted(px, crate::limits::Client::Addr(src))?;
    let source = px.state().registry.source_at(src).cloned();
    let probe_paths = probe_paths(&pl.pod, local.port(), || {
        px.kernel.opened_by_kubelet(peer, local)
    });
    Some(ConnCtx {
        destination: Some(pl.key.clone()),
        decided_at_destination: false,
        source,
        netns: pl.netns.clone(),
        src_ip: Some(src),
        dst: match local {
            // A link-local destination keeps its scope (the interface it arrived on).
            SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => local,
            _ => SocketAddr::new(crate::registry::normalize(local.ip()), local.port()),
        },
        direction: Direction::Inbound(px.kernel.clone()),
        probe_paths,
        _open: open,
    })
}

/// The path gRPC health probes request.
const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// The HTTP and gRPC probe paths of `pod` on `port`, when the kubelet itself opened the
/// connection (`by_kubelet`, asked only when there are any); none otherwise.
fn probe_paths(pod: &Pod, port: u16, by_kubelet: impl FnOnce() -> bool) -> Vec<String> {
    use crate::world::Probe;
    let paths: Vec<String> = pod
        .probes
        .iter()
        .filter_map(|p| match p {
            Probe::Http { port: p, path } if *p == port => {
                Some(path.split('?').next().unwrap_or("/").to_string())
            }
            Probe::Grpc { port: p } if *p == port => Some(GRPC_HEALTH_CHECK.to_string()),
            _ => None,
        })
        .collect();
    if paths.is_empty() || !by_kubelet() {
        return vec![];
    }
    paths
}

async fn serve_conn(px: Arc<Proxy>, conn: ConnCtx, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let conn = Arc::new(conn);
    // Wait until the bytes tell (a method and a space, or the whole HTTP/2 preface), at most
    // sniffTimeout: a client writing slowly is still HTTP.
    let mut first = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + px.settings.sniff_timeout;
    let sniffed = loop {
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut first)).await {
            Ok(Err(_)) => return,
            Ok(Ok(0)) if first.is_empty() => return,
            Ok(Ok(0)) => break io::sniff_final(&first),
            Ok(Ok(_)) => match io::sniff(&first) {
                Some(s) => break s,
                None => continue,
            },
            // Server-speaks-first protocols, or a client that stalls mid-token.
            Err(_) => break io::sniff_final(&first),
        }
    };
    let stream = io::Prefixed::new(first.freeze(), stream);
    match sniffed {
        io::Sniffed::Http1 | io::Sniffed::Http2 => http::serve(px.clone(), conn, stream).await,
        io::Sniffed::Tcp => tcp::relay(&px, &conn, stream).await,
    }
}

/// A connection accepted and not yet open (or closed): it blocks the drain meanwhile.
pub struct Starting {
    metrics: Arc<Metrics>,
    _blocker: crate::drain::Blocker,
}

impl Starting {
    /// None once the agent has drained.
    fn new(px: &Proxy) -> Option<Starting> {
        let blocker = px.drain.block()?;
        px.metrics.connections_starting.fetch_add(1, Relaxed);
        Some(Starting {
            metrics: px.metrics.clone(),
            _blocker: blocker,
        })
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.metrics.connections_starting.fetch_sub(1, Relaxed);
    }
}

/// Which limit refused a connection.
enum Limit {
    /// The client had `maxConnectionsPerPod` open.
    Client,
    Agent,
    /// The agent has drained.
    Drained,
}

/// One open connection, counted for the agent and its client while it lives; the drain waits
/// for it.
pub struct OpenGuard {
    px: Arc<Proxy>,
    client: crate::limits::Client,
    _blocker: crate::drain::Blocker,
}

impl OpenGuard {
    /// `take`, counting a refusal.
    fn take_counted(px: &Arc<Proxy>, client: crate::limits::Client) -> Option<Self> {
        match OpenGuard::take(px, client) {
            Ok(g) => Some(g),
            Err(Limit::Client) => {
                px.metrics.connections_over_pod_limit.fetch_add(1, Relaxed);
                None
            }
            Err(Limit::Agent) => {
                px.metrics
                    .connections_over_agent_limit
                    .fetch_add(1, Relaxed);
                None
            }
            Err(Limit::Drained) => None,
        }
    }

    fn take(px: &Arc<Proxy>, client: crate::limits::Client) -> Result<Self, Limit> {
        let blocker = px.drain.block().ok_or(Limit::Drained)?;
        if !px.clients.take(&client) {
            return Err(Limit::Client);
        }
        // The agent-wide cap sits below the descriptor limit, so the agent refuses a connection
        // before accept() fails for every pod and the admin port.
        if px.metrics.connections_active.fetch_add(1, Relaxed) >= px.max_connections {
            px.metrics.connections_active.fetch_sub(1, Relaxed);
            px.clients.release(&client);
            return Err(Limit::Agent);
        }
        Ok(OpenGuard {
            px: px.clone(),
            client,
            _blocker: blocker,
        })
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.px.clients.release(&self.client);
        self.px.metrics.connections_active.fetch_sub(1, Relaxed);
    }
}

impl ConnCtx {
    /// A kubelet probe: the probe's method and exact path on a connection from the node to a
    /// probe port. It passes the pod's policies, as Istio's probe rewrite lets it.
    pub fn is_probe(&self, method: &::http::Method, path: &str) -> bool {
        !self.probe_paths.is_empty()
            && self.probe_paths.iter().any(|p| {
                p == path
                    && if p == GRPC_HEALTH_CHECK {
                        method == ::http::Method::POST
                    } else {
                        method == ::http::Method::GET
                    }
            })
    }

    /// The caller for logs: `namespace/name`, or its address when it is no known workload.
    pub fn source_label(&self) -> String {
        match (&self.source, self.src_ip) {
            (Some(w), _) => format!("{}/{}", w.namespace, w.name),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "-".into(),
        }
    }

    pub fn engine_conn<'a>(&'a self, dest: &'a Target) -> crate::engine::Conn<'a> {
        crate::engine::Conn {
            policies: &dest.policies,
            source: self.source.as_deref(),
            destination: Some(&dest.workload),
            source_ip: self.src_ip,
            dest_ip: Some(self.dst.ip()),
            dest_port: self.dst.port(),
        }
    }
}
