//! A test ext_authz provider, HTTP and gRPC (`envoy.service.auth.v3.Authorization/Check`),
//! deciding as Istio's `samples/extauthz` does: allowed when the request has `x-ext-authz:
//! allow`, else denied (403, its body), with the sample's result headers. More answers, by the
//! value of `x-ext-authz`, for the cases a provider can put an enforcer in:
//! `custom` denies with 401, `www-authenticate` and `x-reason`; `slow` answers after 3 s;
//! `error` fails (HTTP 500, gRPC UNAVAILABLE); `remove` allows and asks for `x-remove-me` to be
//! removed upstream.
//! An allow carries `x-ext-authz-check-received`: the check request as the provider saw it
//! (method, path, host and headers, minus those an enforcer adds for itself), so a test can
//! compare what two enforcers sent.
//! `authz-extauthz HTTP_ADDR GRPC_ADDR`
use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, time::Duration};

use authz::extauthz::proto::{
    CheckRequest, CheckResponse, DeniedHttpResponse, HeaderValue, HeaderValueOption, HttpResponse,
    HttpStatus, OkHttpResponse, RpcStatus,
};
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{body::Frame, body::Incoming, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpListener;

const CHECK_HEADER: &str = "x-ext-authz";
const DENY_BODY: &str =
    "denied by ext_authz for not found header `x-ext-authz: allow` in the request";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let http: SocketAddr = args
        .get(1)
        .map_or("127.0.0.1:8000", |s| s.as_str())
        .parse()?;
    let grpc: SocketAddr = args
        .get(2)
        .map_or("127.0.0.1:9000", |s| s.as_str())
        .parse()?;
    let h = TcpListener::bind(http).await?;
    let g = TcpListener::bind(grpc).await?;
    println!("listening {http} {grpc}");
    tokio::spawn(serve(h, false));
    serve(g, true).await;
    Ok(())
}

async fn serve(l: TcpListener, grpc: bool) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| async move {
                Ok::<_, Infallible>(if grpc {
                    check_grpc(req).await
                } else {
                    check_http(req).await
                })
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// Headers an enforcer adds for itself (request ids, forwarding, its own timeouts): left out of
/// the dump, which is about what the client's request carried to the provider.
fn own(name: &str) -> bool {
    name.starts_with("x-envoy-")
        || name.starts_with("x-forwarded-")
        || name == "x-request-id"
        || name == CHECK_RECEIVED
}

const CHECK_RECEIVED: &str = "x-ext-authz-check-received";

fn dump(method: &str, path: &str, host: &str, headers: &BTreeMap<String, String>) -> String {
    let mut out = format!("{method} {path} host={host}");
    for (k, v) in headers {
        if !own(k) {
            out.push_str(&format!("; {k}={v}"));
        }
    }
    out
}

async fn check_http(req: Request<Incoming>) -> Response<Body> {
    check_http_full(req).await.map(|b| b.boxed())
}

async fn check_http_full(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut headers = BTreeMap::new();
    for (k, v) in &parts.headers {
        if k != "host" {
            let e = headers
                .entry(k.as_str().to_string())
                .or_insert_with(String::new);
            if !e.is_empty() {
                e.push(',');
            }
            e.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
    }
    let host = parts
        .headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut seen = dump(parts.method.as_str(), path, host, &headers);
    if !body.is_empty() {
        seen.push_str(&format!("; body={}", String::from_utf8_lossy(&body)));
    }
    let value = parts
        .headers
        .get(CHECK_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let override_value = parts
        .headers
        .get("x-ext-authz-additional-header-override")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if value == "slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let b = Response::builder().header("x-ext-authz-additional-header-override", override_value);
    match value {
        "allow" | "slow" | "remove" => {
            let mut b = b
                .status(200)
                .header("x-ext-authz-check-result", "allowed")
                .header(CHECK_RECEIVED, seen)
                .header("x-ext-authz-response", "from-provider");
            if value == "remove" {
                b = b.header("x-envoy-auth-headers-to-remove", "x-remove-me");
            }
            b.body(Full::new(Bytes::new())).unwrap()
        }
        "error" => Response::builder()
            .status(500)
            .body(Full::new(Bytes::from_static(b"provider broke")))
            .unwrap(),
        "custom" => Response::builder()
            .status(401)
            .header("www-authenticate", "Bearer realm=\"ext\"")
            .header("x-reason", "custom denial")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"denied\":\"custom\"}")))
            .unwrap(),
        _ => b
            .status(403)
            .header("x-ext-authz-check-result", "denied")
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(DENY_BODY.as_bytes())))
            .unwrap(),
    }
}

fn hv(k: &str, v: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: k.into(),
            value: v.into(),
            raw_value: vec![],
        }),
        append: None,
        append_action: 0,
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn check_grpc(req: Request<Incoming>) -> Response<Body> {
    // Answered as a gRPC stream: one length-prefixed message, then the status in trailers.
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let msg = body.get(5..).unwrap_or_default();
    let check = CheckRequest::decode(msg).unwrap_or_default();
    let http = check
        .attributes
        .and_then(|a| a.request)
        .and_then(|r| r.http)
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = http.headers.clone().into_iter().collect();
    let mut seen = dump(&http.method, &http.path, &http.host, &headers);
    if !http.body.is_empty() {
        seen.push_str(&format!("; body={}", http.body));
    }
    let value = headers.get(CHECK_HEADER).map(String::as_str).unwrap_or("");
    if value == "slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let resp = match value {
        "error" => return grpc_reply(None, 14),
        "allow" | "slow" | "remove" => CheckResponse {
            status: Some(RpcStatus {
                code: 0,
                message: String::new(),
            }),
            http_response: Some(HttpResponse::Ok(OkHttpResponse {
                headers: vec![
                    hv("x-ext-authz-check-result", "allowed"),
                    hv(CHECK_RECEIVED, &seen),
                    hv(
                        "x-ext-authz-additional-header-override",
                        "grpc-additional-header-override-value",
                    ),
                ],
                headers_to_remove: if value == "remove" {
                    vec!["x-remove-me".into()]
                } else {
                    vec![]
                },
                response_headers_to_add: vec![hv("x-ext-authz-response", "from-provider")],
            })),
        },
        "custom" => CheckResponse {
            status: Some(RpcStatus {
                code: 16,
                message: String::new(),
            }),
            http_response: Some(HttpResponse::Denied(DeniedHttpResponse {
                status: Some(HttpStatus { code: 401 }),
                headers: vec![
                    hv("www-authenticate", "Bearer realm=\"ext\""),
                    hv("x-reason", "custom denial"),
                ],
                body: "{\"denied\":\"custom\"}".into(),
            })),
        },
        _ => CheckResponse {
            status: Some(RpcStatus {
                code: 7,
                message: String::new(),
            }),
            http_response: Some(HttpResponse::Denied(DeniedHttpResponse {
                status: Some(HttpStatus { code: 403 }),
                headers: vec![hv("x-ext-authz-check-result", "denied")],
                body: DENY_BODY.into(),
            })),
        },
    };
    grpc_reply(Some(resp), 0)
}

/// One length-prefixed message (if any), then `grpc-status` in the trailers.
fn grpc_reply(msg: Option<CheckResponse>, status: u32) -> Response<Body> {
    let mut frames = Vec::new();
    if let Some(m) = msg {
        let enc = m.encode_to_vec();
        let mut buf = BytesMut::with_capacity(enc.len() + 5);
        buf.put_u8(0);
        buf.put_u32(enc.len() as u32);
        buf.put_slice(&enc);
        frames.push(Ok::<_, Infallible>(Frame::data(buf.freeze())));
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status.into());
    frames.push(Ok(Frame::trailers(trailers)));
    Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap()
}
