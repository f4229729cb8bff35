//! L4 relay for connections that are not HTTP.
use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{ConnCtx, Proxy};

pub async fn relay<S>(px: &Proxy, conn: &ConnCtx, mut downstream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    px.metrics.connections_tcp.fetch_add(1, Relaxed);
    if let Some(key) = &conn.destination {
        let state = px.state();
        let Some(dest) = state.target(key) else {
            px.metrics.request("deny", state.no_target_reason(key));
            return;
        };
        let d = state.engine.decide_tcp(&conn.engine_conn(dest));
        super::records::count(
            &px.metrics,
            &d,
            &super::records::Subject {
                workload: &dest.workload,
                source: conn.src_ip,
                method: None,
                host: None,
                target: None,
            },
        );
        if !d.allowed() {
            tracing::info!(target: "authz::deny", workload = %key, source = %conn.source_label(), policy = d.policy.as_deref().unwrap_or("-"), reason = %d.reason, "tcp connection denied");
            return;
        }
    }
    let mut changed = px.policies_changed.subscribe();
    let mut upstream = match super::upstream::connect(conn).await {
        Ok(s) => s,
        Err(e) => {
            px.metrics.upstream_connect_errors.fetch_add(1, Relaxed);
            tracing::debug!(dst = %conn.dst, "upstream connect failed: {e}");
            return;
        }
    };
    // Bytes read from either side count as activity; a relay idle for tcpIdleTimeout is closed.
    let clock = Clock::new();
    let mut down = Touch::new(&mut downstream, &clock);
    let mut up = Touch::new(&mut upstream, &clock);
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let idle = px.settings.tcp_idle_timeout;
    loop {
        tokio::select! {
            r = copy.as_mut() => {
                match r {
                    Ok((to, from)) => {
                        px.metrics.bytes_to_upstream.fetch_add(to, Relaxed);
                        px.metrics.bytes_from_upstream.fetch_add(from, Relaxed);
                    }
                    Err(e) => tracing::debug!(dst = %conn.dst, "relay ended: {e}"),
                }
                return;
            }
            Ok(()) = changed.changed() => {
                // A reload or an API-server change: a relay the policies now deny is closed, as
                // ztunnel closes open connections.
                if let Some(key) = &conn.destination {
                    let state = px.state();
                    let allowed = state.target(key).map(|dest| state.engine.decide_tcp(&conn.engine_conn(dest)));
                    let (policy, reason) = match &allowed {
                        Some(d) if d.allowed() => continue,
                        Some(d) => (d.policy.clone(), d.reason.to_string()),
                        None => (None, "destination gone".to_string()),
                    };
                    px.metrics.tcp_closed_by_policy.fetch_add(1, Relaxed);
                    tracing::info!(target: "authz::deny", workload = %key, source = %conn.source_label(), policy = policy.as_deref().unwrap_or("-"), reason = %reason, "open tcp connection closed: the policies now deny it");
                    return;
                }
            }
            _ = tokio::time::sleep(idle.saturating_sub(clock.idle())) => {
                if clock.idle() >= idle {
                    px.metrics.tcp_idle_timeouts.fetch_add(1, Relaxed);
                    tracing::debug!(dst = %conn.dst, "relay idle for {idle:?}: closed");
                    return;
                }
            }
        }
    }
}

/// When a relay last moved bytes.
struct Clock {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn idle(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Relaxed)))
    }
}

/// A stream that stamps the clock whenever it reads bytes.
struct Touch<'a, S> {
    inner: &'a mut S,
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl<'a, S> Touch<'a, S> {
    fn new(inner: &'a mut S, clock: &Clock) -> Self {
        Touch {
            inner,
            start: clock.start,
            last_ms: clock.last_ms.clone(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Touch<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = self.start.elapsed().as_millis() as u64;
            self.last_ms.store(now, Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touch<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
