//! A test destination: an httpbin-like HTTP server (h1 + h2c) and a TCP echo server.
//! `authz-testsrv http ADDR` | `authz-testsrv echo ADDR` | `authz-testsrv file ADDR PATH FILE`
//! `authz-testsrv h2get ADDR PATH...`: an HTTP/2 (prior knowledge) client sending every path on one
//! connection, printing "STATUS BODY" per line.
//! Every HTTP reply is JSON: {client, method, path, version, headers, body_len, body_sha256}.
use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("http");
    let addr: SocketAddr = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("0.0.0.0:8000")
        .parse()?;
    if mode == "h2get" {
        return h2get(addr, &args[3..]).await;
    }
    let listener = TcpListener::bind(addr).await?;
    let file = match mode {
        "file" => Some((args[3].clone(), Bytes::from(std::fs::read(&args[4])?))),
        _ => None,
    };
    println!("listening {addr}");
    loop {
        let (mut stream, peer) = listener.accept().await?;
        let file = file.clone();
        match mode {
            "echo" => {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
            _ => {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let file = file.clone();
                        async move { Ok::<_, Infallible>(reply(peer, req, file).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

async fn reply(
    peer: SocketAddr,
    mut req: Request<Incoming>,
    file: Option<(String, Bytes)>,
) -> Response<Full<Bytes>> {
    if let Some((path, body)) = file {
        let status = if req.uri().path() == path { 200 } else { 404 };
        let body = if status == 200 { body } else { Bytes::new() };
        return Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
    }
    if req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v == "websocket")
    {
        // Minimal upgrade: switch protocols, then echo bytes.
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let version = format!("{:?}", req.version());
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).to_string();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push(',');
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_string(), v.into());
            }
        }
    }
    let mut body = req.into_body();
    let (mut len, mut sha) = (0u64, Sha256::new());
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            len += d.len() as u64;
            sha.update(d);
        }
    }
    let out = serde_json::json!({
        "client": peer.ip().to_string(),
        "client_port": peer.port(),
        "method": method,
        "path": path,
        "version": version,
        "headers": headers,
        "body_len": len,
        "body_sha256": format!("{:x}", sha.finalize()),
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(out.to_string())))
        .unwrap()
}

async fn h2get(addr: SocketAddr, paths: &[String]) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    for p in paths {
        let req =
            Request::get(format!("http://{addr}{p}")).body(http_body_util::Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        println!("{status} {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}
