//! One view of a request head for the decision and the upstream: a single authority, and the
//! hop-by-hop headers handled as Envoy does. Runs before the decision, so what is decided is
//! exactly what is forwarded.
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

/// What the head says once normalised.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// The request's one authority (`hosts`, `:authority`), as forwarded.
    pub authority: String,
    /// An HTTP/1.1 upgrade other than h2c (WebSocket...): after the decision, a 101 from the
    /// upstream turns the connection into a tunnel.
    pub upgrade: bool,
    /// `CONNECT`: decided like any request, then answered 404 as Envoy's sidecar does (its routes
    /// match paths, which CONNECT has none of); never tunnelled.
    pub connect: bool,
}

/// Why a head is refused with 400.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadHead {
    #[error("more than one Host header")]
    MultipleHosts,
    #[error("Host header is not visible ASCII")]
    HostNotAscii,
    #[error("Host header and :authority disagree")]
    ConflictingAuthority,
}

/// Headers that belong to one hop and never reach the upstream (RFC 9110 7.6.1; Envoy removes
/// the same set). `upgrade` is put back for an upgrade that is allowed through.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("http2-settings"),
    header::UPGRADE,
];

/// Whether any hop-by-hop header is present: most requests have none, and one pass over their
/// few names costs less than looking each of the five up.
fn has_hop_by_hop(h: &HeaderMap) -> bool {
    h.keys().any(|k| HOP_BY_HOP.contains(k))
}

/// Normalises `req` in place: the URI is origin-form for HTTP/1 with `Host` set to the one
/// authority; in HTTP/2 `:authority` wins and a `host` header is dropped (refused if it names
/// another authority). `Upgrade: h2c` and `HTTP2-Settings` are removed, so the request goes on as
/// HTTP/1.1 and no HTTP/2 stream can follow it unchecked.
pub fn normalize<B>(req: &mut Request<B>) -> Result<Head, BadHead> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(BadHead::MultipleHosts);
    }
    let host = match &host {
        Some(h) => Some(h.to_str().map_err(|_| BadHead::HostNotAscii)?.to_string()),
        None => None,
    };
    let uri_authority = req.uri().authority().map(|a| a.as_str().to_string());
    let authority = if req.version() == Version::HTTP_2 {
        match (uri_authority, host) {
            (Some(a), Some(h)) if !a.eq_ignore_ascii_case(&h) => {
                return Err(BadHead::ConflictingAuthority)
            }
            (Some(a), _) => {
                req.headers_mut().remove(header::HOST);
                a
            }
            (None, Some(h)) => h,
            (None, None) => String::new(),
        }
    } else {
        // RFC 9112 3.2.2: with an absolute-form target, the target's authority is the one and
        // `Host` is replaced by it.
        match uri_authority {
            Some(a) => {
                let origin = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
                    .to_string();
                if *req.method() != Method::CONNECT {
                    *req.uri_mut() =
                        Uri::try_from(origin).unwrap_or_else(|_| Uri::from_static("/"));
                }
                let v = HeaderValue::from_str(&a).map_err(|_| BadHead::HostNotAscii)?;
                req.headers_mut().insert(header::HOST, v);
                a
            }
            None => host.unwrap_or_default(),
        }
    };
    let connect = *req.method() == Method::CONNECT;
    let upgrade =
        req.version() == Version::HTTP_11 && !connect && strip_hop_by_hop(req.headers_mut());
    if (req.version() != Version::HTTP_11 || connect) && has_hop_by_hop(req.headers()) {
        for h in &HOP_BY_HOP {
            req.headers_mut().remove(h);
        }
    }
    if let Some(te) = req.headers().get(header::TE) {
        if !te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            req.headers_mut().remove(header::TE);
        }
    }
    Ok(Head {
        authority,
        upgrade,
        connect,
    })
}

/// Removes the hop-by-hop headers of an HTTP/1.1 request; keeps `Upgrade` (without h2c) and
/// `Connection: upgrade` when another protocol is asked for. Returns whether one is.
fn strip_hop_by_hop(h: &mut HeaderMap) -> bool {
    if !has_hop_by_hop(h) {
        return false;
    }
    let asks_upgrade = tokens(h, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let protocols: Vec<String> = tokens(h, header::UPGRADE)
        .filter(|t| !t.eq_ignore_ascii_case("h2c"))
        .map(str::to_string)
        .collect();
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    if !asks_upgrade || protocols.is_empty() {
        return false;
    }
    match HeaderValue::from_str(&protocols.join(", ")) {
        Ok(v) => {
            h.insert(header::UPGRADE, v);
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            true
        }
        Err(_) => false,
    }
}

/// The comma-separated tokens of every value of a header.
fn tokens(h: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn names(r: &Request<()>) -> Vec<String> {
        let mut v: Vec<String> = r.headers().keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn h2c_upgrade_is_removed_and_the_request_stays_http1() {
        let mut r = req(
            Version::HTTP_11,
            "GET",
            "/productpage",
            &[
                ("host", "public"),
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAAP__"),
            ],
        );
        let h = normalize(&mut r).unwrap();
        assert!(!h.upgrade);
        assert_eq!(names(&r), ["host"]);
    }

    #[test]
    fn websocket_upgrade_is_kept_for_the_decision_then_the_tunnel() {
        let mut r = req(
            Version::HTTP_11,
            "GET",
            "/ws",
            &[
                ("host", "w"),
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket, h2c"),
                ("keep-alive", "timeout=5"),
                ("sec-websocket-key", "x"),
            ],
        );
        let h = normalize(&mut r).unwrap();
        assert!(h.upgrade);
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers()["connection"], "upgrade");
        assert!(r.headers().get("keep-alive").is_none());
        // Upgrade without `Connection: upgrade` is no upgrade.
        let mut r = req(Version::HTTP_11, "GET", "/", &[("upgrade", "websocket")]);
        assert!(!normalize(&mut r).unwrap().upgrade);
        assert!(r.headers().get("upgrade").is_none());
    }

    #[test]
    fn absolute_form_authority_wins_over_host() {
        let mut r = req(
            Version::HTTP_11,
            "GET",
            "http://admin.internal/productpage?x=1",
            &[("host", "public")],
        );
        let h = normalize(&mut r).unwrap();
        assert_eq!(h.authority, "admin.internal");
        assert_eq!(r.uri(), "/productpage?x=1");
        assert_eq!(r.headers()["host"], "admin.internal");
    }

    #[test]
    fn http2_authority_wins_and_a_conflicting_host_is_refused() {
        let mut r = req(
            Version::HTTP_2,
            "GET",
            "http://admin.internal/x",
            &[("host", "public")],
        );
        assert_eq!(normalize(&mut r), Err(BadHead::ConflictingAuthority));
        let mut r = req(
            Version::HTTP_2,
            "GET",
            "http://Admin.Internal/x",
            &[("host", "admin.internal")],
        );
        assert_eq!(normalize(&mut r).unwrap().authority, "Admin.Internal");
        assert!(r.headers().get("host").is_none());
        let mut r = req(Version::HTTP_2, "GET", "/x", &[("host", "public")]);
        assert_eq!(normalize(&mut r).unwrap().authority, "public");
    }

    #[test]
    fn two_hosts_are_refused_and_connect_is_flagged() {
        let mut r = req(
            Version::HTTP_11,
            "GET",
            "/",
            &[("host", "a"), ("host", "b")],
        );
        assert_eq!(normalize(&mut r), Err(BadHead::MultipleHosts));
        let mut r = req(
            Version::HTTP_11,
            "CONNECT",
            "admin.internal:443",
            &[("host", "admin.internal:443")],
        );
        let h = normalize(&mut r).unwrap();
        assert!(h.connect && !h.upgrade);
        assert_eq!(h.authority, "admin.internal:443");
    }

    #[test]
    fn te_other_than_trailers_is_dropped() {
        let mut r = req(Version::HTTP_11, "GET", "/", &[("te", "gzip")]);
        normalize(&mut r).unwrap();
        assert!(r.headers().get("te").is_none());
        let mut r = req(Version::HTTP_11, "GET", "/", &[("te", "trailers")]);
        normalize(&mut r).unwrap();
        assert_eq!(r.headers()["te"], "trailers");
    }
}
