//! `envoyExtAuthzGrpc`: `envoy.service.auth.v3.Authorization/Check` on one HTTP/2 channel per
//! provider address (multiplexed; rebuilt when the address changes). The request carries what
//! Envoy's would: every request header (pseudo-headers included), method, path, host, scheme,
//! protocol, both peers' addresses and principals.
use std::{collections::HashMap, net::SocketAddr, sync::Mutex, time::SystemTime};

use http::HeaderMap;
use tonic::transport::{Channel, Endpoint};

use super::{
    http_service::joined,
    op,
    proto::{self, CheckRequest, CheckResponse, HeaderValueOption, HttpResponse},
    Allowed, Answer, BodyCheck, CheckInput, Denied, HeaderOp,
};

#[derive(Default)]
pub struct Client {
    channel: Mutex<Option<(SocketAddr, Channel)>>,
}

impl Client {
    fn channel(&self, addr: SocketAddr, authority: &str) -> Result<Channel, String> {
        let mut slot = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, c)) = slot.as_ref() {
            if *a == addr {
                return Ok(c.clone());
            }
        }
        let origin: http::Uri = format!("http://{authority}")
            .parse()
            .map_err(|e| format!("authority {authority:?}: {e}"))?;
        let c = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .origin(origin)
            .tcp_nodelay(true)
            .connect_lazy();
        *slot = Some((addr, c.clone()));
        Ok(c)
    }

    pub async fn check(
        &self,
        addr: SocketAddr,
        authority: &str,
        body: Option<BodyCheck>,
        input: &CheckInput<'_>,
    ) -> Answer {
        let channel = match self.channel(addr, authority) {
            Ok(c) => c,
            Err(e) => return Answer::Error(e),
        };
        let mut grpc = tonic::client::Grpc::new(channel);
        if let Err(e) = grpc.ready().await {
            return Answer::Error(format!("provider unreachable: {e}"));
        }
        let codec = tonic_prost::ProstCodec::<CheckRequest, CheckResponse>::default();
        let path = http::uri::PathAndQuery::from_static(proto::CHECK_PATH);
        match grpc
            .unary(tonic::Request::new(request(input, body)), path, codec)
            .await
        {
            Ok(r) => answer(r.into_inner()),
            Err(status) => Answer::Error(format!("check failed: {status}")),
        }
    }
}

fn peer(addr: Option<SocketAddr>, principal: &Option<String>) -> Option<proto::Peer> {
    Some(proto::Peer {
        address: addr.map(|a| proto::Address {
            socket_address: Some(proto::SocketAddress {
                protocol: 0,
                address: a.ip().to_string(),
                port_value: a.port() as u32,
            }),
        }),
        service: String::new(),
        principal: principal.clone().unwrap_or_default(),
    })
}

/// The CheckRequest for `input`.
pub fn request(input: &CheckInput<'_>, body: Option<BodyCheck>) -> CheckRequest {
    let mut headers: HashMap<String, String> = HashMap::new();
    for name in input.headers.keys() {
        if let Some(v) = joined(input.headers, name) {
            headers.insert(
                name.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            );
        }
    }
    headers.insert(":authority".into(), input.host.into());
    headers.insert(":method".into(), input.method.into());
    headers.insert(":path".into(), input.path.into());
    headers.insert(":scheme".into(), "http".into());
    headers.remove("host");
    let size = content_length(input.headers).unwrap_or(0);
    let (text, raw) = match (input.body, body) {
        (Some(b), Some(c)) if c.pack_as_bytes => (String::new(), b.to_vec()),
        (Some(b), _) => (String::from_utf8_lossy(b).into_owned(), Vec::new()),
        (None, _) => (String::new(), Vec::new()),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    CheckRequest {
        attributes: Some(proto::AttributeContext {
            source: peer(input.source, &input.source_principal),
            destination: peer(input.destination, &input.destination_principal),
            request: Some(proto::Request {
                time: Some(proto::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                http: Some(proto::HttpRequest {
                    id: String::new(),
                    method: input.method.into(),
                    headers,
                    path: input.path.into(),
                    host: input.host.into(),
                    scheme: "http".into(),
                    query: String::new(),
                    fragment: String::new(),
                    size,
                    protocol: if input.http2 { "HTTP/2" } else { "HTTP/1.1" }.into(),
                    body: text,
                    raw_body: raw,
                }),
            }),
            context_extensions: HashMap::new(),
        }),
    }
}

fn content_length(h: &HeaderMap) -> Option<i64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn value(o: &HeaderValueOption) -> Option<(&str, &[u8])> {
    let h = o.header.as_ref()?;
    let v = if h.value.is_empty() && !h.raw_value.is_empty() {
        &h.raw_value[..]
    } else {
        h.value.as_bytes()
    };
    Some((h.key.as_str(), v))
}

/// Request headers (and a deny's reply headers): `append` true adds, else sets.
fn set_or_append(list: &[HeaderValueOption]) -> Vec<HeaderOp> {
    list.iter()
        .filter_map(|o| {
            let (k, v) = value(o)?;
            let make = if o.append.as_ref().is_some_and(|a| a.value) {
                HeaderOp::Append
            } else {
                HeaderOp::Set
            };
            op(make, k, v)
        })
        .collect()
}

/// The provider's answer, as Envoy reads it: status OK allows, anything else denies (403 unless
/// the denied response names a status).
pub fn answer(r: CheckResponse) -> Answer {
    let ok = r.status.as_ref().is_none_or(|s| s.code == 0);
    if ok {
        let Some(HttpResponse::Ok(o)) = r.http_response else {
            return Answer::Allowed(Allowed::default());
        };
        let mut upstream = set_or_append(&o.headers);
        for name in &o.headers_to_remove {
            if let Ok(n) = http::HeaderName::from_bytes(name.as_bytes()) {
                if !super::framing(&n) {
                    upstream.push(HeaderOp::Remove(n));
                }
            }
        }
        let downstream = o
            .response_headers_to_add
            .iter()
            .filter_map(|h| {
                let (k, v) = value(h)?;
                let make = match (h.append.as_ref(), h.append_action) {
                    (Some(a), _) if a.value => HeaderOp::Append,
                    (Some(_), _) => HeaderOp::Set,
                    (None, 1) => HeaderOp::AddIfAbsent,
                    (None, 2) => HeaderOp::Set,
                    (None, 3) => HeaderOp::OverwriteIfExists,
                    (None, _) => HeaderOp::Append,
                };
                op(make, k, v)
            })
            .collect();
        return Answer::Allowed(Allowed {
            upstream,
            downstream,
        });
    }
    let (status, headers, body) = match r.http_response {
        Some(HttpResponse::Denied(d)) => (
            d.status.map(|s| s.code).filter(|c| *c > 0).unwrap_or(403),
            set_or_append(&d.headers),
            d.body,
        ),
        _ => (403, Vec::new(), String::new()),
    };
    Answer::Denied(Denied {
        status: u16::try_from(status).unwrap_or(403),
        body: body.into(),
        headers,
    })
}
