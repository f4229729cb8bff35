//! HTTP/1.1 and HTTP/2 (prior knowledge) on a redirected connection: every request is decided on
//! its own, then forwarded on one upstream connection per downstream connection.
use std::{convert::Infallible, sync::atomic::Ordering::Relaxed, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Incoming, client::conn::{http1, http2}};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{io::{AsyncRead, AsyncWrite}, sync::Mutex};

use super::{ConnCtx, Proxy};

pub type Body = BoxBody<Bytes, hyper::Error>;

pub async fn serve<S>(px: Arc<Proxy>, conn: Arc<ConnCtx>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    px.metrics.connections_http.fetch_add(1, Relaxed);
    let upstream = Arc::new(Upstream { conn: conn.clone(), h1: Mutex::new(None), h2: Mutex::new(None) });
    let service = hyper::service::service_fn(move |req| {
        let px = px.clone();
        let upstream = upstream.clone();
        async move { Ok::<_, Infallible>(handle(&px, &upstream, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).max_buf_size(64 * 1024);
    builder.http2().max_concurrent_streams(256);
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(io), service).await {
        tracing::debug!(dst = %conn.dst, "http connection ended: {e}");
    }
}

async fn handle(px: &Proxy, upstream: &Upstream, mut req: Request<Incoming>) -> Response<Body> {
    let upgrade = req.headers().contains_key(http::header::UPGRADE) && req.version() == Version::HTTP_11;
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    px.metrics.request("allow", "allowed");
    let mut resp = match upstream.send(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(dst = %upstream.conn.dst, "upstream request failed: {e}");
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers");
        }
    };
    if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) = (downstream_upgrade, resp.status()) {
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = (down.await, up.await) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up)).await;
            }
        });
    }
    resp.map(|b| b.boxed())
}

pub fn local_reply(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|n: Infallible| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    r
}

/// The upstream side of one downstream connection, connected on first use.
struct Upstream {
    conn: Arc<ConnCtx>,
    h1: Mutex<Option<http1::SendRequest<Incoming>>>,
    h2: Mutex<Option<http2::SendRequest<Incoming>>>,
}

impl Upstream {
    async fn send(&self, req: Request<Incoming>) -> anyhow::Result<Response<Incoming>> {
        if req.version() == Version::HTTP_2 {
            let mut slot = self.h2.lock().await;
            let sender = match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let io = TokioIo::new(super::upstream::connect(&self.conn.netns, self.conn.dst).await?);
                    let (s, c) = http2::handshake(TokioExecutor::new(), io).await?;
                    tokio::spawn(c);
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
            let io = TokioIo::new(super::upstream::connect(&self.conn.netns, self.conn.dst).await?);
            let (s, c) = http1::handshake(io).await?;
            tokio::spawn(c.with_upgrades());
            *slot = Some(s);
        }
        let sender = slot.as_mut().expect("connected above");
        Ok(sender.send_request(req).await?)
    }
}
