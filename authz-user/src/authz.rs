//! AuthorizationPolicy evaluation: pure functions over a request model, no I/O.
//! Order (Istio): CUSTOM (unsupported here: a match denies), DENY, then ALLOW (no ALLOW policy
//! -> allow; some but none matched -> deny). AUDIT never changes the decision.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use http::HeaderMap;
use ipnet::IpNet;
use serde_json::Value;

use crate::policy::{
    load::AuthorizationPolicy,
    types::{Action, Condition, Operation, Rule, Source},
};

pub mod template;

/// Istio's string match: `*` = present (non-empty), `abc*` prefix, `*abc` suffix, else exact.
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
    /// Path templates with `{*}` / `{**}`.
    Template(regex::Regex),
}

impl StrMatch {
    pub fn new(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::Present
        } else if let Some(s) = v.strip_prefix('*') {
            StrMatch::Suffix(s.to_string())
        } else if let Some(p) = v.strip_suffix('*') {
            StrMatch::Prefix(p.to_string())
        } else {
            StrMatch::Exact(v.to_string())
        }
    }

    fn path(v: &str) -> StrMatch {
        if v.contains('{') {
            if let Ok(re) = template::compile(v) {
                return StrMatch::Template(re);
            }
        }
        StrMatch::new(v)
    }

    fn lower(v: &str) -> StrMatch {
        StrMatch::new(&v.to_ascii_lowercase())
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => s == e,
            StrMatch::Prefix(p) => s.starts_with(p.as_str()),
            StrMatch::Suffix(x) => s.ends_with(x.as_str()),
            StrMatch::Present => !s.is_empty(),
            StrMatch::Template(re) => re.is_match(s),
        }
    }
}

/// Parses an IP or a CIDR (a bare IP is a /32 or /128).
pub fn parse_cidr(v: &str) -> Option<IpNet> {
    if let Ok(n) = v.parse::<IpNet>() {
        return Some(n);
    }
    v.parse::<IpAddr>().ok().map(IpNet::from)
}

/// `[a][b][c]` -> ["a", "b", "c"].
pub fn claim_path(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let r = rest.strip_prefix('[')?;
        let end = r.find(']')?;
        let part = &r[..end];
        if part.is_empty() || part.contains('[') {
            return None;
        }
        out.push(part.to_string());
        rest = &r[end + 1..];
    }
    (!out.is_empty()).then_some(out)
}

/// A verified JWT identity, as authorization sees it.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    pub payload: Arc<Value>,
    /// Claims that are split on spaces (always `scope` and `permission`).
    pub space_delimited: Arc<Vec<String>>,
}

impl Identity {
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }

    fn claim(&self, path: &[String]) -> Option<&Value> {
        let mut v = self.payload.as_ref();
        for p in path {
            v = v.get(p)?;
        }
        Some(v)
    }
}

/// The source of a connection (an enrolled pod).
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Peer {
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The HTTP part of a request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// Normalized, without query or fragment.
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub identity: Option<&'a Identity>,
}

/// Everything a policy can look at. `http: None` for TCP connections.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a> {
    pub http: Option<HttpAttrs<'a>>,
    pub peer: Option<&'a Peer>,
    pub source_ip: Option<IpAddr>,
    pub remote_ip: Option<IpAddr>,
    pub dest_ip: Option<IpAddr>,
    pub dest_port: u16,
    pub sni: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub id: String,
    pub namespace: String,
    pub action: Action,
    pub dry_run: bool,
    pub selector: Option<BTreeMap<String, String>>,
    pub has_target_refs: bool,
    /// `None`: the policy has no rules (matches nothing).
    rules: Option<Vec<CRule>>,
}

#[derive(Debug, Clone)]
struct CRule {
    from: Option<Vec<CSource>>,
    to: Option<Vec<COp>>,
    when: Vec<CCond>,
    /// Uses a field that only HTTP has.
    http_only: bool,
}

#[derive(Debug, Clone, Default)]
struct Field<T> {
    pos: Option<Vec<T>>,
    neg: Option<Vec<T>>,
}

impl<T> Field<T> {
    fn new(
        pos: &Option<Vec<String>>,
        neg: &Option<Vec<String>>,
        f: impl Fn(&str) -> Option<T>,
    ) -> Field<T> {
        Field {
            pos: pos
                .as_ref()
                .map(|v| v.iter().filter_map(|x| f(x)).collect()),
            neg: neg
                .as_ref()
                .map(|v| v.iter().filter_map(|x| f(x)).collect()),
        }
    }
    fn is_set(&self) -> bool {
        self.pos.is_some() || self.neg.is_some()
    }
    /// (any pos) AND NOT (any neg); unset parts match.
    fn eval(&self, m: impl Fn(&T) -> bool) -> bool {
        self.pos.as_ref().is_none_or(|v| v.iter().any(&m))
            && !self.neg.as_ref().is_some_and(|v| v.iter().any(&m))
    }
}

#[derive(Debug, Clone)]
struct CSource {
    principals: Field<StrMatch>,
    request_principals: Field<ReqPrincipal>,
    namespaces: Field<StrMatch>,
    service_accounts: Field<(Option<String>, String)>,
    trust_domains: Field<StrMatch>,
    ip_blocks: Field<IpNet>,
    remote_ip_blocks: Field<IpNet>,
}

#[derive(Debug, Clone)]
struct COp {
    hosts: Field<StrMatch>,
    ports: Field<u16>,
    methods: Field<StrMatch>,
    paths: Field<StrMatch>,
}

#[derive(Debug, Clone)]
enum Key {
    Header(http::HeaderName),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    SourceServiceAccount,
    SourceTrustDomain,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    AuthClaim(Vec<String>),
    DestinationIp,
    DestinationPort,
    Sni,
    /// Envoy filter metadata: never present here.
    Experimental,
}

#[derive(Debug, Clone)]
enum CondValues {
    Str(Field<StrMatch>),
    Principal(Field<ReqPrincipal>),
    Ip(Field<IpNet>),
    Port(Field<u16>),
}

#[derive(Debug, Clone)]
struct CCond {
    key: Key,
    values: CondValues,
}

/// `requestPrincipals` value: issuer and subject matched separately (split at the last `/`).
#[derive(Debug, Clone)]
struct ReqPrincipal {
    iss: StrMatch,
    sub: StrMatch,
}

impl ReqPrincipal {
    fn new(v: &str) -> ReqPrincipal {
        if v == "*" {
            return ReqPrincipal {
                iss: StrMatch::Present,
                sub: StrMatch::Present,
            };
        }
        match v.rsplit_once('/') {
            Some((iss, sub)) => ReqPrincipal {
                iss: if iss == "*" {
                    StrMatch::Present
                } else if let Some(s) = iss.strip_prefix('*') {
                    StrMatch::Suffix(s.into())
                } else {
                    StrMatch::Exact(iss.into())
                },
                sub: if sub == "*" {
                    StrMatch::Present
                } else if let Some(p) = sub.strip_suffix('*') {
                    StrMatch::Prefix(p.into())
                } else {
                    StrMatch::Exact(sub.into())
                },
            },
            None if v.starts_with('*') => ReqPrincipal {
                iss: StrMatch::Present,
                sub: StrMatch::Suffix(v[1..].into()),
            },
            None if v.ends_with('*') => ReqPrincipal {
                iss: StrMatch::Prefix(v[..v.len() - 1].into()),
                sub: StrMatch::Present,
            },
            // A principal without '/' cannot be iss/sub: it never matches.
            None => ReqPrincipal {
                iss: StrMatch::Exact(v.into()),
                sub: StrMatch::Exact("\0".into()),
            },
        }
    }
    fn matches(&self, id: &Identity) -> bool {
        self.iss.matches(&id.issuer) && self.sub.matches(&id.subject)
    }
}

impl Compiled {
    pub fn new(p: &AuthorizationPolicy) -> Compiled {
        let ns = p.namespace.clone();
        Compiled {
            id: p.id(),
            namespace: ns.clone(),
            action: p.spec.action,
            dry_run: p
                .metadata
                .annotations
                .get("istio.io/dry-run")
                .is_some_and(|v| v == "true"),
            selector: p.spec.selector.as_ref().map(|s| s.match_labels.clone()),
            has_target_refs: p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty(),
            rules: p
                .spec
                .rules
                .as_ref()
                .map(|rs| rs.iter().map(|r| compile_rule(r, &ns)).collect()),
        }
    }

    /// Whether any rule matches.
    pub fn matches(&self, a: &Attrs) -> bool {
        let Some(rules) = &self.rules else {
            return false;
        };
        let allow = self.action == Action::Allow;
        rules.iter().any(|r| {
            if a.http.is_none() && allow && r.http_only {
                // Istio drops ALLOW rules with HTTP-only fields from TCP filter chains.
                return false;
            }
            r.from
                .as_ref()
                .is_none_or(|f| f.iter().any(|s| s.matches(a)))
                && r.to.as_ref().is_none_or(|t| t.iter().any(|o| o.matches(a)))
                && r.when.iter().all(|c| c.matches(a))
        })
    }
}

fn compile_rule(r: &Rule, ns: &str) -> CRule {
    let from: Option<Vec<CSource>> = r.from.as_ref().map(|f| {
        f.iter()
            .filter_map(|x| x.source.as_ref())
            .map(|s| compile_source(s, ns))
            .collect()
    });
    let to: Option<Vec<COp>> = r.to.as_ref().map(|t| {
        t.iter()
            .filter_map(|x| x.operation.as_ref())
            .map(compile_op)
            .collect()
    });
    let when: Vec<CCond> = r.when.iter().flatten().filter_map(compile_cond).collect();
    let http_only = from.iter().flatten().any(|s| s.request_principals.is_set())
        || to
            .iter()
            .flatten()
            .any(|o| o.hosts.is_set() || o.methods.is_set() || o.paths.is_set())
        || when.iter().any(|c| c.http_only());
    CRule {
        from,
        to,
        when,
        http_only,
    }
}

fn compile_source(s: &Source, ns: &str) -> CSource {
    let sa = |v: &str| -> Option<(Option<String>, String)> {
        Some(match v.split_once('/') {
            Some((n, a)) => (Some(n.to_string()), a.to_string()),
            None => (Some(ns.to_string()), v.to_string()),
        })
    };
    CSource {
        principals: Field::new(&s.principals, &s.not_principals, |v| Some(StrMatch::new(v))),
        request_principals: Field::new(&s.request_principals, &s.not_request_principals, |v| {
            Some(ReqPrincipal::new(v))
        }),
        namespaces: Field::new(&s.namespaces, &s.not_namespaces, |v| Some(StrMatch::new(v))),
        service_accounts: Field::new(&s.service_accounts, &s.not_service_accounts, sa),
        trust_domains: Field::new(&s.trust_domains, &s.not_trust_domains, |v| {
            Some(StrMatch::new(v))
        }),
        ip_blocks: Field::new(&s.ip_blocks, &s.not_ip_blocks, parse_cidr),
        remote_ip_blocks: Field::new(&s.remote_ip_blocks, &s.not_remote_ip_blocks, parse_cidr),
    }
}

fn compile_op(o: &Operation) -> COp {
    COp {
        hosts: Field::new(&o.hosts, &o.not_hosts, |v| Some(StrMatch::lower(v))),
        ports: Field::new(&o.ports, &o.not_ports, |v| v.parse().ok()),
        methods: Field::new(&o.methods, &o.not_methods, |v| Some(StrMatch::new(v))),
        paths: Field::new(&o.paths, &o.not_paths, |v| Some(StrMatch::path(v))),
    }
}

fn compile_cond(c: &Condition) -> Option<CCond> {
    let k = c.key.as_str();
    let key = if let Some(h) = k
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
    {
        Key::Header(http::HeaderName::from_bytes(h.as_bytes()).ok()?)
    } else if let Some(rest) = k.strip_prefix("request.auth.claims") {
        Key::AuthClaim(claim_path(rest)?)
    } else {
        match k {
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "source.namespace" => Key::SourceNamespace,
            "source.principal" => Key::SourcePrincipal,
            "source.serviceAccount" => Key::SourceServiceAccount,
            "source.trustDomain" => Key::SourceTrustDomain,
            "request.auth.principal" => Key::AuthPrincipal,
            "request.auth.audiences" => Key::AuthAudiences,
            "request.auth.presenter" => Key::AuthPresenter,
            "destination.ip" => Key::DestinationIp,
            "destination.port" => Key::DestinationPort,
            "connection.sni" => Key::Sni,
            _ if k.starts_with("experimental.envoy.filters.") => Key::Experimental,
            _ => return None,
        }
    };
    let values = match key {
        Key::SourceIp | Key::RemoteIp | Key::DestinationIp => {
            CondValues::Ip(Field::new(&c.values, &c.not_values, parse_cidr))
        }
        Key::DestinationPort => {
            CondValues::Port(Field::new(&c.values, &c.not_values, |v| v.parse().ok()))
        }
        Key::AuthPrincipal => CondValues::Principal(Field::new(&c.values, &c.not_values, |v| {
            Some(ReqPrincipal::new(v))
        })),
        _ => CondValues::Str(Field::new(&c.values, &c.not_values, |v| {
            Some(StrMatch::new(v))
        })),
    };
    Some(CCond { key, values })
}

impl CSource {
    fn matches(&self, a: &Attrs) -> bool {
        let peer = a.peer;
        let principal = peer.map(Peer::principal);
        self.principals
            .eval(|m| principal.as_deref().is_some_and(|p| m.matches(p)))
            && self
                .namespaces
                .eval(|m| peer.is_some_and(|p| glob(m, &p.namespace)))
            && self.service_accounts.eval(|(ns, sa)| {
                peer.is_some_and(|p| {
                    ns.as_deref() == Some(p.namespace.as_str()) && *sa == p.service_account
                })
            })
            && self
                .trust_domains
                .eval(|m| peer.is_some_and(|p| m.matches(&p.trust_domain)))
            && self
                .ip_blocks
                .eval(|n| a.source_ip.is_some_and(|ip| n.contains(&ip)))
            && self
                .remote_ip_blocks
                .eval(|n| a.remote_ip.is_some_and(|ip| n.contains(&ip)))
            && match a.http {
                // TCP: the HTTP-only field is ignored (DENY/AUDIT; ALLOW rules were dropped).
                None => true,
                Some(h) => self
                    .request_principals
                    .eval(|m| h.identity.is_some_and(|id| m.matches(id))),
            }
    }
}

/// `namespaces` values may hold `*` anywhere (Istio turns it into `.*`).
fn glob(m: &StrMatch, s: &str) -> bool {
    match m {
        StrMatch::Exact(e) if e.contains('*') => {
            let parts: Vec<&str> = e.split('*').collect();
            let mut rest = s;
            for (i, p) in parts.iter().enumerate() {
                if i == 0 {
                    let Some(r) = rest.strip_prefix(p) else {
                        return false;
                    };
                    rest = r;
                } else if i == parts.len() - 1 {
                    return rest.ends_with(p);
                } else {
                    let Some(at) = rest.find(p) else { return false };
                    rest = &rest[at + p.len()..];
                }
            }
            true
        }
        m => m.matches(s),
    }
}

impl COp {
    fn matches(&self, a: &Attrs) -> bool {
        if !self.ports.eval(|p| *p == a.dest_port) {
            return false;
        }
        match a.http {
            None => true,
            Some(h) => {
                let host = h.host.to_ascii_lowercase();
                self.hosts.eval(|m| m.matches(&host))
                    && self.methods.eval(|m| m.matches(h.method))
                    && self.paths.eval(|m| m.matches(h.path))
            }
        }
    }
}

impl CCond {
    fn http_only(&self) -> bool {
        matches!(
            self.key,
            Key::Header(_)
                | Key::AuthPrincipal
                | Key::AuthAudiences
                | Key::AuthPresenter
                | Key::AuthClaim(_)
        )
    }

    fn matches(&self, a: &Attrs) -> bool {
        if self.http_only() && a.http.is_none() {
            return true;
        }
        let id = a.http.and_then(|h| h.identity);
        let peer = a.peer;
        match (&self.key, &self.values) {
            (Key::Header(name), CondValues::Str(f)) => {
                let h = a.http.expect("checked above");
                // Each value of a repeated header on its own (CVE-2026-26308).
                f.eval(|m| {
                    h.headers.get_all(name).iter().any(|v| match m {
                        StrMatch::Present => true,
                        m => v.to_str().is_ok_and(|s| m.matches(s)),
                    })
                })
            }
            (Key::SourceIp, CondValues::Ip(f)) => {
                f.eval(|n| a.source_ip.is_some_and(|ip| n.contains(&ip)))
            }
            (Key::RemoteIp, CondValues::Ip(f)) => {
                f.eval(|n| a.remote_ip.is_some_and(|ip| n.contains(&ip)))
            }
            (Key::DestinationIp, CondValues::Ip(f)) => {
                f.eval(|n| a.dest_ip.is_some_and(|ip| n.contains(&ip)))
            }
            (Key::DestinationPort, CondValues::Port(f)) => f.eval(|p| *p == a.dest_port),
            (Key::SourceNamespace, CondValues::Str(f)) => {
                f.eval(|m| peer.is_some_and(|p| glob(m, &p.namespace)))
            }
            (Key::SourcePrincipal, CondValues::Str(f)) => {
                f.eval(|m| peer.is_some_and(|p| m.matches(&p.principal())))
            }
            (Key::SourceServiceAccount, CondValues::Str(f)) => f.eval(|m| {
                peer.is_some_and(|p| m.matches(&format!("{}/{}", p.namespace, p.service_account)))
            }),
            (Key::SourceTrustDomain, CondValues::Str(f)) => {
                f.eval(|m| peer.is_some_and(|p| m.matches(&p.trust_domain)))
            }
            (Key::AuthPrincipal, CondValues::Principal(f)) => {
                f.eval(|m| id.is_some_and(|i| m.matches(i)))
            }
            (Key::AuthAudiences, CondValues::Str(f)) => {
                f.eval(|m| id.is_some_and(|i| claim_matches(i.payload.get("aud"), m, false)))
            }
            (Key::AuthPresenter, CondValues::Str(f)) => {
                f.eval(|m| id.is_some_and(|i| claim_matches(i.payload.get("azp"), m, false)))
            }
            (Key::AuthClaim(path), CondValues::Str(f)) => f.eval(|m| {
                id.is_some_and(|i| {
                    let split = path.len() == 1 && i.space_delimited.iter().any(|c| *c == path[0]);
                    claim_matches(i.claim(path), m, split)
                })
            }),
            (Key::Sni, CondValues::Str(f)) => f.eval(|m| a.sni.is_some_and(|s| m.matches(s))),
            (Key::Experimental, CondValues::Str(f)) => f.eval(|_| false),
            _ => false,
        }
    }
}

/// A claim matches a value when it is a string that matches, or a list holding one.
fn claim_matches(v: Option<&Value>, m: &StrMatch, space_delimited: bool) -> bool {
    match v {
        Some(Value::String(s)) if space_delimited => s.split_whitespace().any(|x| m.matches(x)),
        Some(Value::String(s)) => m.matches(s),
        Some(Value::Array(a)) => a.iter().any(|x| x.as_str().is_some_and(|s| m.matches(s))),
        _ => false,
    }
}

/// The outcome of authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The policy that decided (`ns/name`), if one did.
    pub policy: Option<String>,
    pub reason: String,
    /// Dry-run policies that would have denied.
    pub dry_run_denied_by: Option<String>,
    /// AUDIT policies that matched.
    pub audited_by: Option<String>,
}

/// Evaluates the policies that apply to one workload.
pub fn evaluate(policies: &[Arc<Compiled>], a: &Attrs) -> Verdict {
    let mut v = Verdict {
        allowed: true,
        policy: None,
        reason: "allowed".into(),
        dry_run_denied_by: None,
        audited_by: None,
    };
    for p in policies.iter().filter(|p| p.action == Action::Audit) {
        if p.matches(a) && v.audited_by.is_none() {
            v.audited_by = Some(p.id.clone());
        }
    }
    for p in policies
        .iter()
        .filter(|p| p.action == Action::Custom && !p.dry_run)
    {
        if p.matches(a) {
            return deny(
                v,
                &p.id,
                "CUSTOM policy matched, and external authorization is not supported: denied",
            );
        }
    }
    for p in policies.iter().filter(|p| p.action == Action::Deny) {
        if p.matches(a) {
            if p.dry_run {
                v.dry_run_denied_by.get_or_insert_with(|| p.id.clone());
                continue;
            }
            return deny(v, &p.id, "denied by DENY policy");
        }
    }
    let allows: Vec<&Arc<Compiled>> = policies
        .iter()
        .filter(|p| p.action == Action::Allow && !p.dry_run)
        .collect();
    if allows.is_empty() {
        return v;
    }
    if let Some(p) = allows.iter().find(|p| p.matches(a)) {
        v.policy = Some(p.id.clone());
        v.reason = "allowed by ALLOW policy".into();
        return v;
    }
    v.allowed = false;
    v.reason = "no ALLOW policy matched".into();
    v
}

fn deny(mut v: Verdict, id: &str, reason: &str) -> Verdict {
    v.allowed = false;
    v.policy = Some(id.to_string());
    v.reason = reason.to_string();
    v
}

#[cfg(test)]
mod tests;
