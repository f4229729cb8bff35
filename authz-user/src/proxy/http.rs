//! HTTP/1.1 and HTTP/2 (prior knowledge) on a redirected connection: every request is decided on
//! its own, then forwarded on one upstream connection per downstream connection.
use std::{convert::Infallible, sync::atomic::Ordering::Relaxed, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{
    combinators::{BoxBody, UnsyncBoxBody},
    BodyExt, Either, Full,
};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Mutex,
};

use super::{ConnCtx, Proxy};
use crate::engine::Verdict;

pub type Body = BoxBody<Bytes, hyper::Error>;
/// What goes upstream: the client's body as it streams in, or one buffered for a CUSTOM check.
type UpBody = Either<Incoming, UnsyncBoxBody<Bytes, hyper::Error>>;

pub async fn serve<S>(px: Arc<Proxy>, conn: Arc<ConnCtx>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    px.metrics.connections_http.fetch_add(1, Relaxed);
    let upstream = Arc::new(Upstream {
        conn: conn.clone(),
        metrics: px.metrics.clone(),
        h1: Mutex::new(None),
        h2: Mutex::new(None),
    });
    let header_read_timeout = px.settings.header_read_timeout;
    let metrics = px.metrics.clone();
    let px_draining = px.drain.draining();
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = requests.clone();
    let service = hyper::service::service_fn(move |req| {
        counted.fetch_add(1, Relaxed);
        let px = px.clone();
        let upstream = upstream.clone();
        async move { Ok::<_, Infallible>(handle(&px, &upstream, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Clients may shut down their write side while they wait for the answer (half-close); a slow
    // client gets headerReadTimeout to send a request head.
    builder
        .http1()
        .keep_alive(true)
        .half_close(true)
        .max_buf_size(64 * 1024)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    // Rapid Reset and CONTINUATION floods: a client that cancels streams faster than they are
    // served, or sends a header block past the size cap, gets GOAWAY (ENHANCE_YOUR_CALM).
    builder
        .http2()
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(64)
        .max_header_list_size(64 * 1024);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    // When the agent stops: a connection that has had a request closes once that request is
    // answered (at once if idle). A connection whose first request has not been read yet gets to
    // send it: closing it now would answer a request already on its way with an empty reply.
    let mut draining = px_draining;
    let (mut stopping, mut asked) = (false, false);
    let result = loop {
        tokio::select! {
            r = served.as_mut() => break r,
            _ = draining.wait_for(|d| *d), if !stopping => stopping = true,
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)), if stopping && !asked => {
                if requests.load(Relaxed) > 0 {
                    asked = true;
                    served.as_mut().graceful_shutdown();
                }
            }
        }
    };
    if let Err(e) = result {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_timeout())
        {
            metrics.header_timeouts.fetch_add(1, Relaxed);
        }
        tracing::debug!(dst = %conn.dst, "http connection ended: {e}");
    }
}

async fn handle(px: &Proxy, upstream: &Upstream, req: Request<Incoming>) -> Response<Body> {
    let mut response_ops = Vec::new();
    let mut resp = forward(px, upstream, req, &mut response_ops).await;
    // A CUSTOM provider's headers for the client go on whatever answer the request gets.
    for op in &response_ops {
        op.apply(resp.headers_mut());
    }
    resp
}

async fn forward(
    px: &Proxy,
    upstream: &Upstream,
    req: Request<Incoming>,
    response_ops: &mut Vec<crate::extauthz::HeaderOp>,
) -> Response<Body> {
    let mut req = req.map(Either::Left);
    let conn = &upstream.conn;
    // One authority and no hop-by-hop headers from here on: the decision and the upstream see
    // the same request.
    let head = match crate::head::normalize(&mut req) {
        Ok(h) => h,
        Err(e) => {
            px.metrics.request("deny", "bad request");
            tracing::debug!(dst = %conn.dst, "request refused: {e}");
            return local_reply(StatusCode::BAD_REQUEST, "Bad Request");
        }
    };
    if conn.is_probe(req.method(), req.uri().path()) {
        px.metrics.request("allow", "kubelet probe");
    } else if let Some(key) = &conn.destination {
        let state = px.state();
        let Some(dest) = state.target(key) else {
            // The destination left this agent's care (released, or moved) since the connection
            // was accepted: never decided with what it used to be. Or it is a pod the CNI
            // plugin handed over that the API server has not confirmed: no policy selects it yet.
            px.metrics.request("deny", state.no_target_reason(key));
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let engine_conn = conn.engine_conn(dest);
        let http2 = req.version() == Version::HTTP_2;
        let wants_body = state.engine.custom_body(
            &engine_conn,
            &crate::engine::Request {
                method: req.method().as_str(),
                target: &target,
                host: &head.authority,
                headers: req.headers(),
                http2,
                body: None,
            },
        );
        // A CUSTOM provider that wants the body gets it before anything is forwarded.
        let mut check_body = None;
        if let Some(b) = wants_body {
            let (parts, body) = req.into_parts();
            let Either::Left(incoming) = body else {
                unreachable!("the body is the client's until here")
            };
            match Box::pin(buffer(incoming, b)).await {
                Ok((for_check, upstream)) => {
                    check_body = Some(for_check);
                    req = Request::from_parts(parts, Either::Right(upstream));
                }
                Err(reply) => return reply,
            }
        }
        let erq = crate::engine::Request {
            method: req.method().as_str(),
            target: &target,
            host: &head.authority,
            headers: req.headers(),
            http2,
            body: check_body.as_ref(),
        };
        let d = state.engine.decide_http(&engine_conn, &erq).await;
        super::records::count(
            &px.metrics,
            &d,
            &super::records::Subject {
                workload: &dest.workload,
                source: conn.src_ip,
                method: Some(req.method().as_str()),
                host: Some(&head.authority),
                target: Some(&target),
            },
        );
        *response_ops = d.response_ops;
        let fwd = match d.verdict {
            Verdict::Allow(fwd) => fwd,
            Verdict::Deny(reply) => {
                tracing::info!(
                    target: "authz::deny",
                    workload = %key,
                    source = %conn.source_label(),
                    method = %req.method(),
                    path = %target.split('?').next().unwrap_or(""),
                    status = reply.status,
                    policy = d.policy.as_deref().unwrap_or("-"),
                    reason = %d.reason,
                    "request denied"
                );
                let status = StatusCode::from_u16(reply.status)
                    .ok()
                    .filter(|s| !s.is_informational())
                    .unwrap_or(StatusCode::FORBIDDEN);
                let mut r = local_reply(status, reply.body);
                for (k, v) in reply.headers {
                    r.headers_mut().insert(k, v);
                }
                return r;
            }
        };
        let h = req.headers_mut();
        for op in &fwd.upstream_ops {
            op.apply(h);
        }
        for k in &fwd.remove_headers {
            h.remove(k);
        }
        for (k, v) in fwd.set_headers {
            h.insert(k, v);
        }
        if let Some(t) = fwd.target {
            if t != target {
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = t.parse().ok();
                if let Ok(u) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
        }
        if let (super::Direction::Inbound(_), Some(ip)) = (&conn.direction, conn.src_ip) {
            // The application sees the agent's hop address; the client's goes in
            // X-Forwarded-For, appended as Envoy's sidecar does.
            append_forwarded_for(req.headers_mut(), ip);
        }
    } else if !conn.decided_at_destination {
        px.metrics.request("allow", "not an enforced workload");
    }
    if head.connect {
        // Envoy's sidecar routes by path, which CONNECT has none of: 404, never a tunnel.
        return local_reply(StatusCode::NOT_FOUND, String::new());
    }
    let downstream_upgrade = head.upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut resp = match upstream.send(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(dst = %upstream.conn.dst, "upstream request failed: {e}");
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers",
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(down) = downstream_upgrade else {
            // A 101 to a request that asked for no upgrade (h2c was removed): never relayed.
            return local_reply(
                StatusCode::BAD_GATEWAY,
                "upstream switched protocols unasked",
            );
        };
        let up = hyper::upgrade::on(&mut resp);
        // The tunnel keeps the connection's context, so it stays counted for the pod and the
        // agent (maxConnectionsPerPod, the global cap, draining) until it closes.
        let conn = upstream.conn.clone();
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = (down.await, up.await) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up))
                        .await;
            }
            drop(conn);
        });
    }
    resp.map(|b| b.boxed())
}

fn append_forwarded_for(h: &mut http::HeaderMap, ip: std::net::IpAddr) {
    const XFF: &str = "x-forwarded-for";
    // One header line: the values the client sent (if any), then this peer.
    let mut line = String::new();
    for v in h.get_all(XFF).iter().filter_map(|v| v.to_str().ok()) {
        line.push_str(v);
        line.push_str(", ");
    }
    let _ = std::fmt::Write::write_fmt(&mut line, format_args!("{ip}"));
    if let Ok(v) = http::HeaderValue::from_str(&line) {
        h.insert(XFF, v);
    }
}

/// An answer of the agent's own; `content-type: text/plain` when it has a body (Envoy's).
pub fn local_reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let body = body.into();
    let has_body = !body.is_empty();
    let mut r = Response::new(Full::new(body).map_err(|n: Infallible| match n {}).boxed());
    *r.status_mut() = status;
    if has_body {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
    }
    r
}

/// Reads the body for a CUSTOM check: all of it up to `max_bytes`; past that, 413 unless a
/// partial body may be checked, in which case the check gets the first `max_bytes`. The
/// upstream gets the whole body: what was read, then the rest as it streams in.
async fn buffer(
    mut body: Incoming,
    b: crate::extauthz::BodyCheck,
) -> Result<(Bytes, UnsyncBoxBody<Bytes, hyper::Error>), Response<Body>> {
    use futures_util::StreamExt;
    use hyper::body::Frame;
    let mut buf = bytes::BytesMut::new();
    let mut trailers = None;
    let mut ended = false;
    while buf.len() <= b.max_bytes {
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(Err(e)) => {
                tracing::debug!("request body unreadable: {e}");
                return Err(local_reply(StatusCode::BAD_REQUEST, "Bad Request"));
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => buf.extend_from_slice(&d),
                Err(f) => {
                    trailers = f.into_trailers().ok();
                    ended = true;
                    break;
                }
            },
        }
    }
    let read = buf.freeze();
    if read.len() > b.max_bytes && !b.allow_partial {
        return Err(local_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload Too Large",
        ));
    }
    let for_check = read.slice(..read.len().min(b.max_bytes));
    let mut frames = vec![Ok::<_, hyper::Error>(Frame::data(read))];
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    let head = futures_util::stream::iter(frames);
    let upstream = match ended {
        true => http_body_util::StreamBody::new(head).boxed_unsync(),
        false => http_body_util::StreamBody::new(head.chain(http_body_util::BodyStream::new(body)))
            .boxed_unsync(),
    };
    Ok((for_check, upstream))
}

/// The upstream side of one downstream connection, connected on first use.
struct Upstream {
    conn: Arc<ConnCtx>,
    metrics: Arc<crate::metrics::Metrics>,
    h1: Mutex<Option<http1::SendRequest<UpBody>>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
}

impl Upstream {
    /// A connection to the original destination from the pod's netns, counted when it fails.
    async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        let r = super::upstream::connect(&self.conn).await;
        if r.is_err() {
            self.metrics.upstream_connect_errors.fetch_add(1, Relaxed);
        }
        r
    }

    // Connecting is boxed: the future of every request would otherwise carry its state.
    async fn connect_h1(&self) -> anyhow::Result<http1::SendRequest<UpBody>> {
        let io = TokioIo::new(self.connect().await?);
        let (s, c) = http1::handshake(io).await?;
        tokio::spawn(c.with_upgrades());
        Ok(s)
    }

    async fn connect_h2(&self) -> anyhow::Result<http2::SendRequest<UpBody>> {
        let io = TokioIo::new(self.connect().await?);
        let (s, c) = http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(c);
        Ok(s)
    }

    async fn send(&self, req: Request<UpBody>) -> anyhow::Result<Response<Incoming>> {
        if req.version() == Version::HTTP_2 {
            let mut slot = self.h2.lock().await;
            let sender = match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = Box::pin(self.connect_h2()).await?;
                    *slot = Some(s.clone());
                    s
                }
            };
            drop(slot);
            let mut sender = sender;
            sender.ready().await?;
            return Ok(sender.send_request(req).await?);
        }
        // HTTP/1: requests on one connection are sequential, so holding the lock is free.
        let mut slot = self.h1.lock().await;
        let reuse = match slot.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !reuse {
            *slot = Some(Box::pin(self.connect_h1()).await?);
        }
        let sender = slot.as_mut().expect("connected above");
        Ok(sender.send_request(req).await?)
    }
}
