//! Remote JWKS against an in-process server on loopback: first fetch, key rotation without a 401,
//! rate-limited refetch, outage (last good keys kept), never-fetched, timeout, SSRF guard, and
//! servers that answer 5xx, redirect (never followed) or send more than the size cap.
#![cfg(feature = "testkeys")]
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use authz::{
    config::PathNormalization,
    engine::{Conn, Decision, Engine, Request},
    jwt::{
        cache::TokenCache,
        remote::{Fetcher, JwksStore},
        testkeys::TestKey,
    },
    policy::{load_str, PolicyIndex, PolicySet},
    registry::Workload,
};
use bytes::Bytes;
use http::HeaderMap;
use serde_json::json;

/// Serves whatever `body` holds at /jwks, after `delay`; counts requests.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn jwks_server(body: String, delay: Duration) -> JwksServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(Mutex::new(body));
    let hits = Arc::new(AtomicUsize::new(0));
    let (b, h) = (body.clone(), hits.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let (b, h) = (b.clone(), h.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let (b, h) = (b.clone(), h.clone());
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        let body = b.lock().unwrap().clone();
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    JwksServer {
        addr,
        body,
        hits,
        task,
    }
}

fn engine(uri: &str, timeout: &str, store: &Arc<JwksStore>) -> Engine {
    let yaml = format!("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: iss\n    jwksUri: \"{uri}\"\n    timeout: {timeout}\n");
    let mut set = PolicySet::default();
    load_str(&yaml, "t.yaml", &mut set);
    assert!(set.is_valid(), "{:?}", set.problems);
    Engine::new(
        PolicyIndex::build(&set, "istio-system", Some(store)),
        Arc::new(TokenCache::new(0)),
        Some(store.clone()),
        PathNormalization::Base,
        "cluster.local",
    )
}

fn store(refresh: Duration) -> Arc<JwksStore> {
    let fetcher = Fetcher::new(None, Arc::new(|_: &str, _: &str| None), false).unwrap();
    JwksStore::new(fetcher, refresh)
}

async fn decide(e: &Engine, token: &str) -> Decision {
    let w = Workload {
        name: "w".into(),
        namespace: "foo".into(),
        labels: BTreeMap::new().into(),
        service_account: "w".into(),
    };
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let pol = e.policies_for(&w);
    let c = Conn {
        policies: &pol,
        source: None,
        destination: None,
        source_ip: None,
        dest_ip: None,
        dest_port: 80,
    };
    e.decide_http(
        &c,
        &Request {
            method: "GET",
            target: "/",
            host: "w",
            headers: &h,
            http2: false,
            body: None,
        },
    )
    .await
}

fn tok(k: &TestKey) -> String {
    k.token(json!({"iss": "iss", "sub": "s"}))
}

#[tokio::test]
async fn fetch_rotate_rate_limit_and_outage() {
    let k1 = TestKey::new("ES256", "k1");
    let k2 = TestKey::new("ES256", "k2");
    let k3 = TestKey::new("ES256", "k3");
    let srv = jwks_server(TestKey::jwks(&[&k1]), Duration::ZERO).await;
    let st = store(Duration::from_secs(3600));
    let e = engine(&format!("http://{}/jwks", srv.addr), "5s", &st);
    assert!(decide(&e, &tok(&k1)).await.allowed());
    assert!(srv.hits.load(Ordering::SeqCst) >= 1);

    // Rotation: the server now has k2; a k2 token triggers one refetch and passes (no 401 burst).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let fetched = srv.hits.load(Ordering::SeqCst);
    *srv.body.lock().unwrap() = TestKey::jwks(&[&k2]);
    let d = decide(&e, &tok(&k2)).await;
    assert!(d.allowed(), "{d:?}");
    let after_rotation = srv.hits.load(Ordering::SeqCst);
    assert_eq!(after_rotation, fetched + 1);
    // An unknown kid right after: no new fetch (rate limit), 401 with Envoy's message.
    let d = decide(&e, &tok(&k3)).await;
    assert_eq!(
        (d.status(), d.body_text()),
        (401, "Jwks doesn't have key to match kid or alg from Jwt")
    );
    assert_eq!(srv.hits.load(Ordering::SeqCst), after_rotation);

    // Outage: the server goes away, the last good keys stay.
    srv.task.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(decide(&e, &tok(&k2)).await.allowed());
}

#[tokio::test]
async fn never_fetched_and_timeout_fail_closed() {
    let k = TestKey::new("HS256", "k");
    // Nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let st = store(Duration::from_secs(3600));
    let e = engine(&format!("http://{dead}/jwks"), "1s", &st);
    let d = decide(&e, &tok(&k)).await;
    assert_eq!(
        (d.status(), d.body_text()),
        (401, "Jwks remote fetch is failed")
    );

    let slow = jwks_server(TestKey::jwks(&[&k]), Duration::from_secs(2)).await;
    let st = store(Duration::from_secs(3600));
    let e = engine(&format!("http://{}/jwks", slow.addr), "100ms", &st);
    let started = std::time::Instant::now();
    let d = decide(&e, &tok(&k)).await;
    assert_eq!(d.body_text(), "Jwks remote fetch is failed");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the rule's timeout bounds the fetch"
    );
}

#[tokio::test]
async fn bad_documents_and_metadata_addresses_are_refused() {
    let k = TestKey::new("HS256", "k");
    let bad = jwks_server("{not json".into(), Duration::ZERO).await;
    let st = store(Duration::from_secs(3600));
    let e = engine(&format!("http://{}/jwks", bad.addr), "1s", &st);
    assert_eq!(
        decide(&e, &tok(&k)).await.body_text(),
        "Jwks remote fetch is failed"
    );

    let fetcher = Fetcher::new(None, Arc::new(|_: &str, _: &str| None), false).unwrap();
    let err = fetcher
        .get(
            "http://169.254.169.254/latest/meta-data",
            "foo",
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, authz::jwt::remote::FetchError::Forbidden { .. }),
        "{err}"
    );
}

/// Answers every connection with `head` (status line and headers) and `body_len` bytes of a
/// JSON-looking body.
async fn raw_server(head: &'static str, body_len: usize) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let mut body = String::from("{\"keys\":[");
                body.push_str(&" ".repeat(body_len.saturating_sub(body.len() + 2)));
                body.push_str("]}");
                let msg = format!("{head}Content-Length: {}\r\n\r\n", body.len());
                let _ = s.write_all(msg.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn huge_redirecting_and_failing_servers_are_refused() {
    let k = TestKey::new("HS256", "k");
    let good = jwks_server(TestKey::jwks(&[&k]), Duration::ZERO).await;
    let fetcher = Fetcher::new(None, Arc::new(|_: &str, _: &str| None), false).unwrap();
    let redirect: &'static str = Box::leak(
        format!(
            "HTTP/1.1 302 Found\r\nLocation: http://{}/jwks\r\n",
            good.addr
        )
        .into_boxed_str(),
    );
    use authz::jwt::remote::FetchError;
    type Expect = Box<dyn Fn(&FetchError) -> bool>;
    let status = |want: u16| move |e: &FetchError| matches!(e, FetchError::Status { status, .. } if *status == want);
    let cases: [(&str, SocketAddr, Expect); 3] = [
        (
            "5xx",
            raw_server("HTTP/1.1 503 Service Unavailable\r\n", 10).await,
            Box::new(status(503)),
        ),
        (
            "redirect",
            raw_server(redirect, 10).await,
            Box::new(status(302)),
        ),
        (
            "huge",
            raw_server("HTTP/1.1 200 OK\r\n", authz::jwt::keys::MAX_JWKS_BYTES + 1).await,
            Box::new(
                |e: &FetchError| matches!(e, FetchError::Body { why, .. } if why.contains("length limit")),
            ),
        ),
    ];
    for (name, addr, want) in cases {
        let uri = format!("http://{addr}/jwks");
        let err = fetcher
            .get(&uri, "foo", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(want(&err), "{name}: {err}");
        let st = store(Duration::from_secs(3600));
        let e = engine(&uri, "2s", &st);
        let d = decide(&e, &tok(&k)).await;
        assert_eq!(
            (d.status(), d.body_text()),
            (401, "Jwks remote fetch is failed"),
            "{name}"
        );
    }
    assert_eq!(
        good.hits.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
}
