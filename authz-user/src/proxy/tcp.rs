//! L4 relay for connections that are not HTTP.
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{ConnCtx, Proxy};

pub async fn relay<S>(px: &Proxy, conn: &ConnCtx, mut downstream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    px.metrics.connections_tcp.fetch_add(1, Relaxed);
    if let Some(dest) = &conn.destination {
        let d = px.engine().decide_tcp(&conn.engine_conn(dest));
        px.metrics
            .request(if d.allowed { "allow" } else { "deny" }, &d.reason);
        if !d.allowed {
            tracing::info!(target: "authz::deny", workload = %format!("{}/{}", dest.namespace, dest.name), source = %format!("{}/{}", conn.pod.workload.namespace, conn.pod.workload.name), policy = d.policy.as_deref().unwrap_or("-"), reason = %d.reason, "tcp connection denied");
            return;
        }
    }
    let mut upstream = match super::upstream::connect(&conn.netns, conn.dst).await {
        Ok(s) => s,
        Err(e) => {
            px.metrics.upstream_connect_errors.fetch_add(1, Relaxed);
            tracing::debug!(dst = %conn.dst, "upstream connect failed: {e}");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((to, from)) => {
            px.metrics.bytes_to_upstream.fetch_add(to, Relaxed);
            px.metrics.bytes_from_upstream.fetch_add(from, Relaxed);
        }
        Err(e) => tracing::debug!(dst = %conn.dst, "relay ended: {e}"),
    }
}
