//! Admin endpoint in the agent's own namespace: /healthz (the process answers), /ready
//! (enforcing), /metrics, /config_dump.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{kernel::Kernel, metrics::Metrics};

pub struct Admin {
    pub ready: crate::readiness::Readiness,
    pub metrics: Arc<Metrics>,
    /// Set once the programs are loaded (kernel counters on /metrics).
    pub kernel: std::sync::OnceLock<Arc<Kernel>>,
    /// The agent's settings, as it started with them.
    pub settings: crate::config::Config,
    /// The state in force; its world (the pods, workloads, services and peers in force) is
    /// rendered as YAML, with the settings, only when /config_dump is asked for.
    pub state: Arc<crate::state::InForce>,
}

pub async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait instead of spinning on the error.
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req, peer)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    // SO_REUSEPORT: during a rolling update the next agent starts beside this one on the
    // node's network (DaemonSet maxSurge) and listens on the same port.
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(128)
    };
    bind().with_context(|| format!("admin listener on {addr}"))
}

fn route(admin: &Admin, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        // Liveness: answered as soon as the agent runs, also while it waits for the API server.
        "/healthz" => reply(StatusCode::OK, "ok\n".into()),
        "/ready" => {
            if admin.ready.is_ready() {
                reply(StatusCode::OK, "ok\n".into())
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        "/metrics" => {
            let k = admin.kernel.get();
            let mut text = admin.metrics.render(k.map(|k| k.counters()));
            if let Some(k) = k {
                crate::metrics::render_source_drops(&mut text, &k.source_drops());
            }
            reply(StatusCode::OK, text)
        }
        // The whole inventory (every pod, in Kubernetes mode): only from the node itself, even
        // when the admin port listens on all addresses for the kubelet's probes.
        "/config_dump" if !peer.ip().is_loopback() => reply(
            StatusCode::FORBIDDEN,
            "config_dump is served to loopback clients only\n".into(),
        ),
        "/config_dump" => {
            let state = admin.state.get();
            let dump = Dump {
                agent: &admin.settings.agent,
                kubernetes: &admin.settings.kubernetes,
                world: &state.world,
            };
            reply(
                StatusCode::OK,
                serde_yaml::to_string(&dump).unwrap_or_default(),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// /config_dump: the settings, then the world in force.
#[derive(serde::Serialize)]
struct Dump<'a> {
    agent: &'a crate::config::AgentSettings,
    kubernetes: &'a crate::config::KubernetesSettings,
    #[serde(flatten)]
    world: &'a crate::world::World,
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
