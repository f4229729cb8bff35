//! `envoyExtAuthzHttp`: the check is an HTTP request to the provider (the original method, the
//! path behind `pathPrefix`, the original host, `authorization` and the configured headers,
//! no body unless asked); 200 allows, 5xx is an error, anything else denies with the provider's
//! status, body and headers (Envoy's raw HTTP client).
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as Pool},
    rt::TokioExecutor,
};

use super::{op, Allowed, Answer, CheckInput, Denied, HeaderOp, HttpSettings, MAX_RESPONSE_BODY};

/// Idle connections kept per provider address.
const IDLE_PER_HOST: usize = 32;

/// The header the provider lists upstream headers to remove in (Envoy's).
const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

pub struct Client {
    pool: Pool<HttpConnector, Full<Bytes>>,
}

impl Client {
    pub fn new() -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let pool = Pool::builder(TokioExecutor::new())
            .pool_max_idle_per_host(IDLE_PER_HOST)
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build(connector);
        Client { pool }
    }

    pub async fn check(
        &self,
        addr: SocketAddr,
        s: &HttpSettings,
        input: &CheckInput<'_>,
    ) -> Answer {
        let req = match request(addr, s, input) {
            Ok(r) => r,
            Err(e) => return Answer::Error(e),
        };
        let resp = match self.pool.request(req).await {
            Ok(r) => r,
            Err(e) => return Answer::Error(format!("provider unreachable: {e}")),
        };
        let (parts, body) = resp.into_parts();
        let body = match Limited::new(body, MAX_RESPONSE_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Answer::Error(format!("provider's answer unreadable: {e}")),
        };
        answer(s, parts.status, &parts.headers, body)
    }
}

/// The check request: what Envoy's raw HTTP client sends for Istio's configuration.
pub fn request(
    addr: SocketAddr,
    s: &HttpSettings,
    input: &CheckInput<'_>,
) -> Result<Request<Full<Bytes>>, String> {
    let body = input.body.cloned().unwrap_or_default();
    let uri = format!("http://{addr}{}{}", s.path_prefix, input.path);
    let mut b = Request::builder()
        .method(input.method)
        .uri(uri)
        .header(http::header::CONTENT_LENGTH, body.len());
    let h = b.headers_mut().expect("builder without errors so far");
    h.insert(
        http::header::HOST,
        HeaderValue::from_str(input.host).map_err(|_| "host is not a header value".to_string())?,
    );
    // `keys()` yields each name once, however many values it has.
    for name in input.headers.keys() {
        let wanted =
            name == http::header::AUTHORIZATION || s.request_headers.matches(name.as_str());
        if !wanted || name == http::header::CONTENT_LENGTH || name == http::header::HOST {
            continue;
        }
        // Repeated headers travel as one, joined with ',' (the check request's map form).
        if let Some(v) = joined(input.headers, name) {
            h.insert(name.clone(), v);
        }
    }
    for (n, v) in &s.additional_headers {
        h.insert(n.clone(), v.clone());
    }
    b.body(Full::new(body)).map_err(|e| e.to_string())
}

/// Every value of `name`, joined with ','.
pub fn joined(h: &HeaderMap, name: &http::HeaderName) -> Option<HeaderValue> {
    let mut all = h.get_all(name).iter();
    let first = all.next()?;
    let mut out = first.as_bytes().to_vec();
    for v in all {
        out.push(b',');
        out.extend_from_slice(v.as_bytes());
    }
    HeaderValue::from_bytes(&out).ok()
}

/// The provider's answer, as Envoy reads it.
pub fn answer(s: &HttpSettings, status: StatusCode, headers: &HeaderMap, body: Bytes) -> Answer {
    if status.is_server_error() {
        return Answer::Error(format!("provider answered {status}"));
    }
    let relayed = |n: &http::HeaderName| {
        n.as_str() != HEADERS_TO_REMOVE && !super::connection_level(n.as_str())
    };
    let headers_out = || headers.iter().filter(|(n, _)| relayed(n));
    if status == StatusCode::OK {
        let mut upstream: Vec<HeaderOp> = headers_out()
            .filter(|(n, _)| s.upstream_on_allow.matches(n.as_str()))
            .filter_map(|(n, v)| op(HeaderOp::Set, n.as_str(), v.as_bytes()))
            .collect();
        for v in headers.get_all(HEADERS_TO_REMOVE) {
            for name in v.to_str().unwrap_or("").split(',') {
                let name = name.trim();
                if !name.is_empty() {
                    if let Ok(n) = http::HeaderName::from_bytes(name.as_bytes()) {
                        // Pseudo-headers and framing stay (Envoy refuses to remove them too).
                        if !super::framing(&n) {
                            upstream.push(HeaderOp::Remove(n));
                        }
                    }
                }
            }
        }
        let downstream = headers_out()
            .filter(|(n, _)| s.downstream_on_allow.matches(n.as_str()))
            .filter_map(|(n, v)| op(HeaderOp::Append, n.as_str(), v.as_bytes()))
            .collect();
        return Answer::Allowed(Allowed {
            upstream,
            downstream,
        });
    }
    // A deny: every header but host when none is listed; else the listed ones and those that
    // make the answer what it is.
    let keep = |n: &str| {
        if s.downstream_on_deny.is_empty() {
            n != "host"
        } else {
            s.downstream_on_deny.matches(n) || matches!(n, "www-authenticate" | "location")
        }
    };
    let headers = headers_out()
        .filter(|(n, _)| keep(n.as_str()))
        .filter_map(|(n, v)| op(HeaderOp::Set, n.as_str(), v.as_bytes()))
        .collect();
    Answer::Denied(Denied {
        status: status.as_u16(),
        body,
        headers,
    })
}
