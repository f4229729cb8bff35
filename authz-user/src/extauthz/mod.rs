//! CUSTOM authorization: MeshConfig `extensionProviders` (`envoyExtAuthzHttp`,
//! `envoyExtAuthzGrpc`), compiled as istiod compiles them for Envoy's ext_authz filter, and the
//! check itself: the request a CUSTOM rule matched is sent to the provider, whose answer is
//! applied as Envoy applies it (`failOpen`, `statusOnError` when it cannot answer).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

mod grpc;
mod http_service;
pub mod proto;

/// How many checks one provider may have in flight; more fail at once (as a provider that
/// cannot be reached: `statusOnError`, or allowed with `failOpen`).
pub const MAX_IN_FLIGHT: usize = 1024;
/// A provider's response body is read up to this size; a longer one is an error.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// Istio's default `timeout` (`extauthz.go`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// One `extensionProviders` entry, as MeshConfig has it. Entries of other kinds (tracing,
/// access logs) are kept out by the callers; an entry here has one of the two ext_authz kinds.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub envoy_ext_authz_http: Option<HttpSpec>,
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<GrpcSpec>,
}

impl ProviderSpec {
    /// Whether this entry is an external authorizer (the other kinds are not ours).
    pub fn is_ext_authz(&self) -> bool {
        self.envoy_ext_authz_http.is_some() || self.envoy_ext_authz_grpc.is_some()
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSpec {
    #[serde(default)]
    pub service: String,
    #[serde(default, deserialize_with = "port")]
    pub port: u32,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub path_prefix: String,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: String,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    /// Deprecated in Istio; used only when `includeRequestHeadersInCheck` is empty.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default)]
    pub include_request_body_in_check: Option<BodySpec>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcSpec {
    #[serde(default)]
    pub service: String,
    #[serde(default, deserialize_with = "port")]
    pub port: u32,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: String,
    #[serde(default)]
    pub include_request_body_in_check: Option<BodySpec>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BodySpec {
    #[serde(default)]
    pub max_request_bytes: u32,
    #[serde(default)]
    pub allow_partial_message: bool,
    #[serde(default)]
    pub pack_as_bytes: bool,
}

/// MeshConfig ports are uint32, written as numbers or (protobuf JSON) strings.
fn port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P {
        N(u32),
        S(String),
    }
    match P::deserialize(d)? {
        P::N(n) => Ok(n),
        P::S(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("port {s:?} is not a number"))),
    }
}

/// Resolves a provider's `service` host to addresses (the cluster's Services, or the file's).
pub type Resolver = Arc<dyn Fn(&str) -> Option<Vec<IpAddr>> + Send + Sync>;

/// A list of header-name patterns (Istio: `*` at one end is a suffix or prefix match, case
/// insensitive).
#[derive(Debug, Clone, Default)]
pub struct HeaderNames(Vec<NamePattern>);

#[derive(Debug, Clone)]
enum NamePattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl HeaderNames {
    fn new(list: &[String]) -> HeaderNames {
        HeaderNames(
            list.iter()
                .map(|h| {
                    let h = h.to_ascii_lowercase();
                    if let Some(s) = h.strip_prefix('*') {
                        NamePattern::Suffix(s.into())
                    } else if let Some(p) = h.strip_suffix('*') {
                        NamePattern::Prefix(p.into())
                    } else {
                        NamePattern::Exact(h)
                    }
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `name` is lowercase (as `http::HeaderName` keeps it).
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| match p {
            NamePattern::Exact(e) => name == e,
            NamePattern::Prefix(p) => name.starts_with(p.as_str()),
            NamePattern::Suffix(s) => name.ends_with(s.as_str()),
        })
    }
}

/// `includeRequestBodyInCheck`: the body is buffered (up to `max_bytes`) and sent with the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyCheck {
    pub max_bytes: usize,
    /// A longer body is cut to `max_bytes` for the check (else 413).
    pub allow_partial: bool,
    /// gRPC: the body as `raw_body` bytes rather than the `body` string.
    pub pack_as_bytes: bool,
}

/// The HTTP service's settings (what istiod puts in `http_service` and `allowed_headers`).
#[derive(Debug)]
pub struct HttpSettings {
    pub path_prefix: String,
    /// Request headers sent in the check besides `authorization`, `:method`, `:path` and host.
    pub request_headers: HeaderNames,
    /// `includeAdditionalHeadersInCheck`, in name order (set, overwriting).
    pub additional_headers: Vec<(HeaderName, HeaderValue)>,
    pub upstream_on_allow: HeaderNames,
    pub downstream_on_deny: HeaderNames,
    pub downstream_on_allow: HeaderNames,
}

#[derive(Debug)]
pub enum Kind {
    Http(HttpSettings),
    Grpc,
}

/// One compiled provider, with its connections (pooled, bounded).
pub struct Provider {
    pub name: String,
    /// The host as configured (a Service host, `ns/host`, or an address).
    pub service: String,
    pub port: u16,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: u16,
    pub body: Option<BodyCheck>,
    pub kind: Kind,
    resolve: Resolver,
    in_flight: Arc<tokio::sync::Semaphore>,
    http: http_service::Client,
    grpc: grpc::Client,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("service", &self.service)
            .field("port", &self.port)
            .field("kind", &self.kind)
            .finish()
    }
}

/// The status codes Istio accepts for `statusOnError` (Envoy's `StatusCode` enum).
const KNOWN_STATUS: &[u16] = &[
    100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 307, 308,
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 418,
    421, 422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
];

impl Provider {
    /// Compiles one entry, refusing what istiod refuses (each problem one message).
    pub fn compile(spec: &ProviderSpec, resolve: Resolver) -> Result<Provider, Vec<String>> {
        let mut errors = Vec::new();
        if let Err(e) = check_name(&spec.name) {
            errors.push(format!("invalid provider name {:?}: {e}", spec.name));
        }
        let (service, port, timeout, fail_open, status, body, kind) = match (
            &spec.envoy_ext_authz_http,
            &spec.envoy_ext_authz_grpc,
        ) {
            (Some(h), None) => {
                if !h.path_prefix.is_empty() && !h.path_prefix.starts_with('/') {
                    errors.push(format!(
                        "pathPrefix must begin with `/`, found: {:?}",
                        h.path_prefix
                    ));
                }
                for (field, list) in [
                    (
                        "includeRequestHeadersInCheck",
                        &h.include_request_headers_in_check,
                    ),
                    ("includeHeadersInCheck", &h.include_headers_in_check),
                    (
                        "headersToDownstreamOnDeny",
                        &h.headers_to_downstream_on_deny,
                    ),
                    (
                        "headersToDownstreamOnAllow",
                        &h.headers_to_downstream_on_allow,
                    ),
                    ("headersToUpstreamOnAllow", &h.headers_to_upstream_on_allow),
                ] {
                    if list.iter().any(|v| v == "*") {
                        errors.push(format!("a single wildcard (\"*\") is not supported, change it to either prefix or suffix match: {field}"));
                    }
                }
                let mut additional = Vec::new();
                for (k, v) in &h.include_additional_headers_in_check {
                    match (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        (Ok(n), Ok(v)) => additional.push((n, v)),
                        _ => errors.push(format!(
                            "includeAdditionalHeadersInCheck: {k:?}: {v:?} is not a valid header"
                        )),
                    }
                }
                let request = if h.include_request_headers_in_check.is_empty() {
                    &h.include_headers_in_check
                } else {
                    &h.include_request_headers_in_check
                };
                let settings = HttpSettings {
                    path_prefix: h.path_prefix.clone(),
                    request_headers: HeaderNames::new(request),
                    additional_headers: additional,
                    upstream_on_allow: HeaderNames::new(&h.headers_to_upstream_on_allow),
                    downstream_on_deny: HeaderNames::new(&h.headers_to_downstream_on_deny),
                    downstream_on_allow: HeaderNames::new(&h.headers_to_downstream_on_allow),
                };
                (
                    &h.service,
                    h.port,
                    &h.timeout,
                    h.fail_open,
                    &h.status_on_error,
                    h.include_request_body_in_check,
                    Kind::Http(settings),
                )
            }
            (None, Some(g)) => (
                &g.service,
                g.port,
                &g.timeout,
                g.fail_open,
                &g.status_on_error,
                g.include_request_body_in_check,
                Kind::Grpc,
            ),
            _ => {
                errors.push(
                    "exactly one of envoyExtAuthzHttp and envoyExtAuthzGrpc must be set".into(),
                );
                return Err(errors);
            }
        };
        if service.trim().is_empty() {
            errors.push("service must be set".into());
        }
        if !(1..=65535).contains(&port) {
            errors.push(format!(
                "port must be in the range [1, 65535], found: {port}"
            ));
        }
        let timeout = match timeout.as_deref() {
            None => DEFAULT_TIMEOUT,
            Some(t) => match parse_duration(t) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    errors.push(format!(
                        "invalid timeout {t:?} (a duration such as \"0.5s\")"
                    ));
                    DEFAULT_TIMEOUT
                }
            },
        };
        let status_on_error = if status.is_empty() {
            403
        } else {
            match status.trim().parse::<u16>() {
                Ok(c) if KNOWN_STATUS.contains(&c) => c,
                _ => {
                    errors.push(format!(
                        "unsupported statusOnError {status:?}, supported values: {KNOWN_STATUS:?}"
                    ));
                    403
                }
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Provider {
            name: spec.name.clone(),
            service: service.trim().to_string(),
            port: port as u16,
            timeout,
            fail_open,
            status_on_error,
            body: body.map(|b| BodyCheck {
                max_bytes: b.max_request_bytes as usize,
                allow_partial: b.allow_partial_message,
                pack_as_bytes: b.pack_as_bytes,
            }),
            kind,
            resolve,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            http: http_service::Client::new(),
            grpc: grpc::Client::default(),
        })
    }

    /// The provider's address now (an address as written, or the service's first address).
    fn address(&self) -> Result<SocketAddr, String> {
        let host = self
            .service
            .split_once('/')
            .map_or(self.service.as_str(), |(_, h)| h);
        let host_ip = host.trim_start_matches('[').trim_end_matches(']');
        let ip = match host_ip.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => (self.resolve)(host)
                .and_then(|ips| ips.first().copied())
                .ok_or_else(|| format!("service {host:?} is not known"))?,
        };
        Ok(SocketAddr::new(ip, self.port))
    }

    /// The host the provider is called by (`:authority` of gRPC calls: the service's host,
    /// as istiod sets it).
    fn authority(&self) -> &str {
        self.service
            .split_once('/')
            .map_or(self.service.as_str(), |(_, h)| h)
    }

    /// Asks the provider, within `timeout`; never fails: what it could not do is an `Error`.
    pub async fn check(&self, input: &CheckInput<'_>) -> Answer {
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return Answer::Error(format!("more than {MAX_IN_FLIGHT} checks in flight"));
        };
        let addr = match self.address() {
            Ok(a) => a,
            Err(e) => return Answer::Error(e),
        };
        let asked = async {
            match &self.kind {
                Kind::Http(s) => self.http.check(addr, s, input).await,
                Kind::Grpc => {
                    self.grpc
                        .check(addr, self.authority(), self.body, input)
                        .await
                }
            }
        };
        match tokio::time::timeout(self.timeout, asked).await {
            Ok(a) => a,
            Err(_) => Answer::Error(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// What the request gets from an answer: an error becomes `statusOnError` (empty body),
    /// or an allow with `failOpen`.
    pub fn outcome(&self, a: Answer) -> Outcome {
        match a {
            Answer::Allowed(ok) => Outcome::Allow(ok),
            Answer::Denied(d) => Outcome::Deny(d),
            Answer::Error(_) if self.fail_open => Outcome::Allow(Allowed::default()),
            Answer::Error(_) => Outcome::Deny(Denied {
                status: self.status_on_error,
                body: Bytes::new(),
                headers: Vec::new(),
            }),
        }
    }
}

/// A DNS-1123 label, at most 63 characters (istiod's rule: provider names end up in metadata
/// keys and policy names).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err(format!("too long (max 63 characters): {}", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "invalid character {c:?} (only lowercase letters, digits, and hyphens allowed)"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("cannot start or end with hyphen".into());
    }
    Ok(())
}

/// Protobuf's duration form ("0.5s", "600s"), or a humantime one ("500ms").
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(secs) = s
        .strip_suffix('s')
        .filter(|v| !v.ends_with('m') && !v.ends_with('n') && !v.ends_with('u'))
    {
        if let Ok(f) = secs.parse::<f64>() {
            return (f.is_finite() && f >= 0.0).then(|| Duration::from_secs_f64(f));
        }
    }
    humantime::parse_duration(s).ok()
}

/// What the check is about: the request as the filter sees it (path normalized).
pub struct CheckInput<'a> {
    pub method: &'a str,
    /// Normalized path and query, as forwarded.
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub http2: bool,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>` of each side, where known.
    pub source_principal: Option<String>,
    pub destination_principal: Option<String>,
    /// The buffered body (`includeRequestBodyInCheck`).
    pub body: Option<&'a Bytes>,
}

/// A header change the provider asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOp {
    Set(HeaderName, HeaderValue),
    Append(HeaderName, HeaderValue),
    AddIfAbsent(HeaderName, HeaderValue),
    OverwriteIfExists(HeaderName, HeaderValue),
    Remove(HeaderName),
}

impl HeaderOp {
    pub fn apply(&self, h: &mut HeaderMap) {
        match self {
            HeaderOp::Set(n, v) => {
                h.insert(n.clone(), v.clone());
            }
            HeaderOp::Append(n, v) => {
                h.append(n.clone(), v.clone());
            }
            HeaderOp::AddIfAbsent(n, v) => {
                if !h.contains_key(n) {
                    h.insert(n.clone(), v.clone());
                }
            }
            HeaderOp::OverwriteIfExists(n, v) => {
                if h.contains_key(n) {
                    h.insert(n.clone(), v.clone());
                }
            }
            HeaderOp::Remove(n) => {
                h.remove(n);
            }
        }
    }

    fn name(&self) -> &HeaderName {
        match self {
            HeaderOp::Set(n, _)
            | HeaderOp::Append(n, _)
            | HeaderOp::AddIfAbsent(n, _)
            | HeaderOp::OverwriteIfExists(n, _)
            | HeaderOp::Remove(n) => n,
        }
    }
}

/// Connection-level headers: they frame the message between two hops, never relayed from a
/// provider's answer.
fn connection_level(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "trailer"
            | "content-length"
    )
}

/// Headers a provider may not change: they frame the message or name its route, and a
/// difference between what the agent and the application read is a smuggling risk.
fn framing(name: &HeaderName) -> bool {
    connection_level(name.as_str()) || name == http::header::HOST
}

/// An allow, with the changes to the upstream request and to the client's response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    pub upstream: Vec<HeaderOp>,
    pub downstream: Vec<HeaderOp>,
}

/// A deny, as the provider wrote it (or `statusOnError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub status: u16,
    pub body: Bytes,
    pub headers: Vec<HeaderOp>,
}

/// What the provider answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Allowed(Allowed),
    Denied(Denied),
    /// Unreachable, timed out, a 5xx or a broken answer.
    Error(String),
}

/// What the request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow(Allowed),
    Deny(Denied),
}

/// A header op from the provider's strings, or None when the name or value is not valid or the
/// header is one no provider may set.
fn op(make: fn(HeaderName, HeaderValue) -> HeaderOp, name: &str, value: &[u8]) -> Option<HeaderOp> {
    let n = HeaderName::from_bytes(name.as_bytes()).ok()?;
    let v = HeaderValue::from_bytes(value).ok()?;
    let o = make(n, v);
    (!framing(o.name())).then_some(o)
}

#[cfg(test)]
mod tests;
