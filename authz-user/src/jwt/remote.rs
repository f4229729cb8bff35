//! Remote JWKS: fetched by the agent itself (its sockets are never redirected), over HTTP or
//! HTTPS (system roots plus an optional CA file), shared by all connections, refreshed in the
//! background with backoff, kept through outages, and refetched (rate-limited) when a token
//! names a key the set does not have.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

use super::keys::{Jwks, MAX_JWKS_BYTES};

/// Maps a host name to addresses the way cluster DNS would (services of the config).
pub type ServiceResolver = Arc<dyn Fn(&str, &str) -> Option<Vec<IpAddr>> + Send + Sync>;

/// Why a JWKS (or OIDC discovery) fetch failed; the last good keys stay in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{uri}: {why}")]
    BadUri { uri: String, why: String },
    #[error("{0}: only http and https are supported")]
    Scheme(String),
    #[error("{0}: no host")]
    NoHost(String),
    #[error("{uri}: resolving {host}: {why}")]
    Resolve {
        uri: String,
        host: String,
        why: String,
    },
    #[error("{uri}: {host} resolves only to link-local or metadata addresses (refused; set agent.allowLinkLocalJwks to allow)")]
    Forbidden { uri: String, host: String },
    #[error("{uri}: connecting to {addr}: {why}")]
    Connect {
        uri: String,
        addr: SocketAddr,
        why: String,
    },
    #[error("{uri}: TLS: {why}")]
    Tls { uri: String, why: String },
    #[error("{uri}: HTTP: {why}")]
    Http { uri: String, why: String },
    #[error("{uri}: HTTP status {status} (redirects are not followed)")]
    Status { uri: String, status: u16 },
    #[error("{uri}: reading body: {why}")]
    Body { uri: String, why: String },
    #[error("fetching {uri}: timed out after {after:?}")]
    Timeout { uri: String, after: Duration },
    #[error("OIDC discovery for {issuer}: {why}")]
    Discovery { issuer: String, why: String },
    #[error("{uri}: {source}")]
    Jwks {
        uri: String,
        source: super::keys::JwksError,
    },
}

/// Least time between two fetches triggered by requests (unknown kid, never fetched).
const REFETCH_GAP: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub struct Fetcher {
    tls: Arc<rustls::ClientConfig>,
    resolve: ServiceResolver,
    allow_link_local: bool,
}

impl Fetcher {
    /// How service hosts resolve (shared with the CUSTOM providers).
    pub fn resolver(&self) -> ServiceResolver {
        self.resolve.clone()
    }

    pub fn new(
        ca_file: Option<&Path>,
        resolve: ServiceResolver,
        allow_link_local: bool,
    ) -> anyhow::Result<Fetcher> {
        use anyhow::Context;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        if let Some(f) = ca_file {
            let pem =
                std::fs::read(f).with_context(|| format!("reading CA file {}", f.display()))?;
            for c in rustls_pemfile::certs(&mut &pem[..]) {
                roots
                    .add(c.with_context(|| format!("parsing CA file {}", f.display()))?)
                    .context("adding CA")?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Fetcher {
            tls: Arc::new(tls),
            resolve,
            allow_link_local,
        })
    }

    /// GET `uri` (as seen from `namespace`) and return the body, within `timeout`.
    pub async fn get(
        &self,
        uri: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<Bytes, FetchError> {
        tokio::time::timeout(timeout, self.get_inner(uri, namespace))
            .await
            .map_err(|_| FetchError::Timeout {
                uri: uri.into(),
                after: timeout,
            })?
    }

    async fn get_inner(&self, uri: &str, namespace: &str) -> Result<Bytes, FetchError> {
        let u: http::Uri = uri
            .parse()
            .map_err(|e: http::uri::InvalidUri| FetchError::BadUri {
                uri: uri.into(),
                why: e.to_string(),
            })?;
        let https = match u.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(FetchError::Scheme(uri.into())),
        };
        let host = u
            .host()
            .ok_or_else(|| FetchError::NoHost(uri.into()))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let port = u.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs: Vec<IpAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![ip]
        } else if let Some(ips) = (self.resolve)(&host, namespace) {
            ips
        } else {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| FetchError::Resolve {
                    uri: uri.into(),
                    host: host.clone(),
                    why: e.to_string(),
                })?
                .map(|a| a.ip())
                .collect()
        };
        let addr = addrs
            .into_iter()
            .find(|ip| self.allow_link_local || !forbidden(*ip))
            .ok_or_else(|| FetchError::Forbidden {
                uri: uri.into(),
                host: host.clone(),
            })?;
        let addr = SocketAddr::new(addr, port);
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| FetchError::Connect {
                uri: uri.into(),
                addr,
                why: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let path = u
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let authority = u
            .authority()
            .map(|a| a.as_str())
            .unwrap_or(&host)
            .to_string();
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Http {
                uri: uri.into(),
                why: e.to_string(),
            })?;
        let tls_error = |why: String| FetchError::Tls {
            uri: uri.into(),
            why,
        };
        let http_error = |why: String| FetchError::Http {
            uri: uri.into(),
            why,
        };
        let resp = if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| tls_error(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| tls_error(e.to_string()))?;
            send(TokioIo::new(tls), req).await.map_err(http_error)?
        } else {
            send(TokioIo::new(tcp), req).await.map_err(http_error)?
        };
        let status = resp.status();
        if status != http::StatusCode::OK {
            return Err(FetchError::Status {
                uri: uri.into(),
                status: status.as_u16(),
            });
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| FetchError::Body {
                uri: uri.into(),
                why: e.to_string(),
            })?;
        Ok(body.to_bytes())
    }
}

async fn send<IO>(
    io: IO,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut s, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    s.send_request(req).await.map_err(|e| e.to_string())
}

/// Link-local and cloud-metadata addresses: never a JWKS source unless allowed (SSRF guard).
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local()
                || v4.octets() == [100, 100, 100, 200]
                || v4.octets() == [192, 0, 0, 192]
        }
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.segments() == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254]
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| forbidden(IpAddr::V4(v4)))
        }
    }
}

/// One remote key set, shared by every rule that names the same URI.
pub struct RemoteJwks {
    pub uri: String,
    /// Set when jwksUri was empty: the URI comes from the issuer's OIDC discovery document.
    pub discover_from: Option<String>,
    pub namespace: String,
    pub timeout: Duration,
    keys: RwLock<Option<Arc<Jwks>>>,
    generation: AtomicU64,
    last_attempt: Mutex<Option<Instant>>,
    fetching: tokio::sync::Mutex<()>,
    pub last_error: Mutex<Option<FetchError>>,
}

impl RemoteJwks {
    pub fn current(&self) -> Option<(Arc<Jwks>, u64)> {
        self.keys
            .read()
            .unwrap()
            .clone()
            .map(|k| (k, self.generation.load(Ordering::Acquire)))
    }

    pub async fn refresh(&self, f: &Fetcher) -> Result<(), FetchError> {
        let _g = self.fetching.lock().await;
        *self.last_attempt.lock().unwrap() = Some(Instant::now());
        let uri = match &self.discover_from {
            None => self.uri.clone(),
            Some(issuer) => {
                let doc = f
                    .get(
                        &format!(
                            "{}/.well-known/openid-configuration",
                            issuer.trim_end_matches('/')
                        ),
                        &self.namespace,
                        self.timeout,
                    )
                    .await?;
                let discovery = |why: String| FetchError::Discovery {
                    issuer: issuer.clone(),
                    why,
                };
                let v: serde_json::Value =
                    serde_json::from_slice(&doc).map_err(|e| discovery(e.to_string()))?;
                v.get("jwks_uri")
                    .and_then(|u| u.as_str())
                    .ok_or_else(|| discovery("no jwks_uri".into()))?
                    .to_string()
            }
        };
        let r = match f.get(&uri, &self.namespace, self.timeout).await {
            Ok(body) => Jwks::parse(&body).map_err(|source| FetchError::Jwks {
                uri: uri.clone(),
                source,
            }),
            Err(e) => Err(e),
        };
        match r {
            Ok(jwks) => {
                *self.keys.write().unwrap() = Some(Arc::new(jwks));
                self.generation.fetch_add(1, Ordering::AcqRel);
                *self.last_error.lock().unwrap() = None;
                Ok(())
            }
            Err(e) => {
                // The last good keys stay in force.
                *self.last_error.lock().unwrap() = Some(e.clone());
                Err(e)
            }
        }
    }

    /// A request-triggered fetch (unknown kid, or no keys yet), at most once per REFETCH_GAP.
    /// When a fetch is already under way (the first one at start-up, say), waits for it instead.
    /// Returns whether the keys changed.
    pub async fn refetch_if_allowed(&self, f: &Fetcher) -> bool {
        let gen = self.generation.load(Ordering::Acquire);
        let allowed = {
            let mut last = self.last_attempt.lock().unwrap();
            if last.is_some_and(|t| t.elapsed() < REFETCH_GAP) {
                false
            } else {
                *last = Some(Instant::now());
                true
            }
        };
        if allowed {
            let _ = self.refresh(f).await;
        } else {
            drop(self.fetching.lock().await);
        }
        self.generation.load(Ordering::Acquire) != gen
    }
}

/// Every remote key set of the agent, keyed by (URI or issuer, namespace).
pub struct JwksStore {
    pub fetcher: Fetcher,
    refresh_every: Duration,
    sets: Mutex<HashMap<(String, String), Arc<RemoteJwks>>>,
}

impl JwksStore {
    pub fn new(fetcher: Fetcher, refresh_every: Duration) -> Arc<JwksStore> {
        Arc::new(JwksStore {
            fetcher,
            refresh_every,
            sets: Mutex::new(HashMap::new()),
        })
    }

    /// The shared set for a rule; the first caller starts its background refresh.
    pub fn get(
        self: &Arc<Self>,
        uri: &str,
        issuer: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Arc<RemoteJwks> {
        let key = (
            if uri.is_empty() {
                format!("oidc:{issuer}")
            } else {
                uri.to_string()
            },
            namespace.to_string(),
        );
        let mut sets = self.sets.lock().unwrap();
        if let Some(s) = sets.get(&key) {
            return s.clone();
        }
        let set = Arc::new(RemoteJwks {
            uri: uri.to_string(),
            discover_from: uri.is_empty().then(|| issuer.to_string()),
            namespace: namespace.to_string(),
            timeout,
            keys: RwLock::new(None),
            generation: AtomicU64::new(0),
            last_attempt: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(None),
        });
        sets.insert(key, set.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, s) = (Arc::downgrade(self), set.clone());
            rt.spawn(async move {
                let mut backoff = Duration::from_secs(1);
                loop {
                    let Some(store) = store.upgrade() else { return };
                    let wait = match s.refresh(&store.fetcher).await {
                        Ok(()) => {
                            backoff = Duration::from_secs(1);
                            tracing::info!(uri = %s.uri, "JWKS fetched");
                            store.refresh_every
                        }
                        Err(e) => {
                            tracing::warn!(uri = %s.uri, "JWKS fetch failed (retry in {backoff:?}; last good keys kept): {e}");
                            let w = backoff;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            w
                        }
                    };
                    drop(store);
                    tokio::time::sleep(wait).await;
                }
            });
        }
        set
    }
}
