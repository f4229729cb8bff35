//! AuthorizationPolicy evaluation: pure functions over a request model, no I/O.
//! Order (Istio): CUSTOM (`custom_match`: the engine asks the provider), DENY, then ALLOW (no
//! ALLOW policy -> allow; some but none matched -> deny). AUDIT never changes the decision.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use http::HeaderMap;
use ipnet::IpNet;
use serde_json::Value;

pub use crate::policy::compile::CompileError;
use crate::policy::types::Action;

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

    pub(crate) fn lower(v: &str) -> StrMatch {
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
        claim_at(&self.payload, path)
    }
}

/// The claim at `path` (`[a][b]` as ["a", "b"]) of a JWT payload.
pub fn claim_at<'a>(payload: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(payload, |v, part| v.get(part))
}

/// The source of a connection (an enrolled pod), borrowed from the workload for one decision.
#[derive(Debug, Clone)]
pub struct Peer<'a> {
    pub trust_domain: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// Made the first time a rule asks for it, then shared by every rule of the decision.
    principal: std::sync::OnceLock<String>,
}

impl<'a> Peer<'a> {
    pub fn new(trust_domain: &'a str, namespace: &'a str, service_account: &'a str) -> Self {
        Peer {
            trust_domain,
            namespace,
            service_account,
            principal: std::sync::OnceLock::new(),
        }
    }

    /// `<trust domain>/ns/<namespace>/sa/<service account>`, as `principals` match it.
    pub fn principal(&self) -> &str {
        self.principal.get_or_init(|| {
            format!(
                "{}/ns/{}/sa/{}",
                self.trust_domain, self.namespace, self.service_account
            )
        })
    }
}

/// The HTTP part of a request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// Normalized, without query or fragment.
    pub path: &'a str,
    /// What is forwarded as the request target (normalized path and query): Envoy's `:path`.
    pub path_and_query: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub identity: Option<&'a Identity>,
}

/// Everything a policy can look at. `http: None` for TCP connections.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a> {
    pub http: Option<HttpAttrs<'a>>,
    pub peer: Option<&'a Peer<'a>>,
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
    /// CUSTOM: the extension provider it names.
    pub provider: Option<String>,
    /// `None`: the policy has no rules (matches nothing).
    pub(crate) rules: Option<Vec<CRule>>,
}

#[derive(Debug, Clone)]
pub(crate) struct CRule {
    pub(crate) from: Option<Vec<CSource>>,
    pub(crate) to: Option<Vec<COp>>,
    pub(crate) when: Vec<CCond>,
    /// Uses a field that only HTTP has.
    pub(crate) http_only: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Field<T> {
    pub(crate) pos: Option<Vec<T>>,
    pub(crate) neg: Option<Vec<T>>,
}

impl<T> Field<T> {
    /// Values compiled, positive and negative.
    fn len(&self) -> usize {
        self.pos.as_ref().map_or(0, Vec::len) + self.neg.as_ref().map_or(0, Vec::len)
    }
    pub(crate) fn is_set(&self) -> bool {
        self.pos.is_some() || self.neg.is_some()
    }
    /// (any pos) AND NOT (any neg); unset parts match.
    fn eval(&self, m: impl Fn(&T) -> bool) -> bool {
        self.pos.as_ref().is_none_or(|v| v.iter().any(&m))
            && !self.neg.as_ref().is_some_and(|v| v.iter().any(&m))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CSource {
    pub(crate) principals: Field<StrMatch>,
    pub(crate) request_principals: Field<ReqPrincipal>,
    pub(crate) namespaces: Field<StrMatch>,
    pub(crate) service_accounts: Field<(Option<String>, String)>,
    pub(crate) trust_domains: Field<StrMatch>,
    pub(crate) ip_blocks: Field<IpNet>,
    pub(crate) remote_ip_blocks: Field<IpNet>,
}

#[derive(Debug, Clone)]
pub(crate) struct COp {
    pub(crate) hosts: Field<StrMatch>,
    pub(crate) ports: Field<u16>,
    pub(crate) methods: Field<StrMatch>,
    pub(crate) paths: Field<StrMatch>,
}

/// The attribute a `when` key names (what the key string parses to, before its values).
#[derive(Debug, Clone)]
pub(crate) enum Key {
    Header(http::HeaderName),
    /// `request.headers[:authority]` and the other pseudo-headers, as Envoy matches them.
    Authority,
    Method,
    Path,
    Scheme,
    /// A header name no request can carry (Istio accepts it; it never matches).
    Never,
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

/// A compiled `when` condition: the attribute and its values in one variant, each with the
/// value type that attribute takes, so a key cannot be paired with values it cannot match.
#[derive(Debug, Clone)]
pub(crate) enum CCond {
    Header(http::HeaderName, Field<StrMatch>),
    Authority(Field<StrMatch>),
    Method(Field<StrMatch>),
    /// With the query, as Envoy's `:path`.
    Path(Field<StrMatch>),
    Scheme(Field<StrMatch>),
    /// A header name no request can carry: never matches, whichever of values or notValues is
    /// set (an ALLOW rule gains nothing, a DENY rule denies nothing more).
    Never,
    SourceIp(Field<IpNet>),
    RemoteIp(Field<IpNet>),
    SourceNamespace(Field<StrMatch>),
    SourcePrincipal(Field<StrMatch>),
    SourceServiceAccount(Field<StrMatch>),
    SourceTrustDomain(Field<StrMatch>),
    AuthPrincipal(Field<ReqPrincipal>),
    AuthAudiences(Field<StrMatch>),
    AuthPresenter(Field<StrMatch>),
    AuthClaim(Vec<String>, Field<StrMatch>),
    DestinationIp(Field<IpNet>),
    DestinationPort(Field<u16>),
    Sni(Field<StrMatch>),
    /// Envoy filter metadata: never present here.
    Experimental(Field<StrMatch>),
}

/// `requestPrincipals` value: issuer and subject matched separately (split at the last `/`).
#[derive(Debug, Clone)]
pub(crate) struct ReqPrincipal {
    iss: StrMatch,
    sub: StrMatch,
}

impl ReqPrincipal {
    pub(crate) fn new(v: &str) -> ReqPrincipal {
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
    /// Per rule: (values compiled in from/to, conditions compiled), for the property that
    /// compilation keeps every field.
    pub fn matcher_counts(&self) -> Vec<(usize, usize)> {
        self.rules
            .iter()
            .flatten()
            .map(|r| {
                let from: usize = r.from.iter().flatten().map(CSource::len).sum();
                let to: usize = r.to.iter().flatten().map(COp::len).sum();
                (from + to, r.when.len())
            })
            .collect()
    }

    /// Whether any rule matches.
    pub fn matches(&self, a: &Attrs) -> bool {
        self.matched_rule(a).is_some()
    }

    /// The index of the first rule that matches.
    pub fn matched_rule(&self, a: &Attrs) -> Option<usize> {
        let rules = self.rules.as_ref()?;
        let allow = self.action == Action::Allow;
        rules.iter().position(|r| {
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

impl CSource {
    fn len(&self) -> usize {
        self.principals.len()
            + self.request_principals.len()
            + self.namespaces.len()
            + self.service_accounts.len()
            + self.trust_domains.len()
            + self.ip_blocks.len()
            + self.remote_ip_blocks.len()
    }

    fn matches(&self, a: &Attrs) -> bool {
        let peer = a.peer;
        self.principals
            .eval(|m| peer.is_some_and(|p| m.matches(p.principal())))
            && self
                .namespaces
                .eval(|m| peer.is_some_and(|p| glob(m, p.namespace)))
            && self.service_accounts.eval(|(ns, sa)| {
                peer.is_some_and(|p| ns.as_deref() == Some(p.namespace) && *sa == p.service_account)
            })
            && self
                .trust_domains
                .eval(|m| peer.is_some_and(|p| m.matches(p.trust_domain)))
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
    fn len(&self) -> usize {
        self.hosts.len() + self.ports.len() + self.methods.len() + self.paths.len()
    }

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
    pub(crate) fn http_only(&self) -> bool {
        matches!(
            self,
            CCond::Header(..)
                | CCond::Authority(_)
                | CCond::Method(_)
                | CCond::Path(_)
                | CCond::Scheme(_)
                | CCond::Never
                | CCond::AuthPrincipal(_)
                | CCond::AuthAudiences(_)
                | CCond::AuthPresenter(_)
                | CCond::AuthClaim(..)
        )
    }

    fn matches(&self, a: &Attrs) -> bool {
        let Some(h) = a.http else {
            // TCP: HTTP-only conditions hold (matches_l4 says so for them).
            return self.matches_l4(a);
        };
        let id = h.identity;
        match self {
            CCond::Header(name, f) => {
                // Each value of a repeated header on its own (CVE-2026-26308).
                f.eval(|m| {
                    h.headers.get_all(name).iter().any(|v| match m {
                        StrMatch::Present => true,
                        m => v.to_str().is_ok_and(|s| m.matches(s)),
                    })
                })
            }
            CCond::Authority(f) => f.eval(|m| m.matches(h.host)),
            CCond::Method(f) => f.eval(|m| m.matches(h.method)),
            CCond::Path(f) => f.eval(|m| m.matches(h.path_and_query)),
            // Plaintext only: every request the agent sees is http.
            CCond::Scheme(f) => f.eval(|m| m.matches("http")),
            CCond::Never => false,
            CCond::AuthPrincipal(f) => f.eval(|m| id.is_some_and(|i| m.matches(i))),
            CCond::AuthAudiences(f) => {
                f.eval(|m| id.is_some_and(|i| claim_matches(i.payload.get("aud"), m, false)))
            }
            CCond::AuthPresenter(f) => {
                f.eval(|m| id.is_some_and(|i| claim_matches(i.payload.get("azp"), m, false)))
            }
            CCond::AuthClaim(path, f) => f.eval(|m| {
                id.is_some_and(|i| {
                    let split = path.len() == 1 && i.space_delimited.iter().any(|c| *c == path[0]);
                    claim_matches(i.claim(path), m, split)
                })
            }),
            _ => self.matches_l4(a),
        }
    }

    /// The conditions a TCP connection has too.
    fn matches_l4(&self, a: &Attrs) -> bool {
        let peer = a.peer;
        match self {
            CCond::SourceIp(f) => f.eval(|n| a.source_ip.is_some_and(|ip| n.contains(&ip))),
            CCond::RemoteIp(f) => f.eval(|n| a.remote_ip.is_some_and(|ip| n.contains(&ip))),
            CCond::DestinationIp(f) => f.eval(|n| a.dest_ip.is_some_and(|ip| n.contains(&ip))),
            CCond::DestinationPort(f) => f.eval(|p| *p == a.dest_port),
            CCond::SourceNamespace(f) => f.eval(|m| peer.is_some_and(|p| glob(m, p.namespace))),
            CCond::SourcePrincipal(f) => f.eval(|m| peer.is_some_and(|p| m.matches(p.principal()))),
            CCond::SourceServiceAccount(f) => f.eval(|m| {
                peer.is_some_and(|p| m.matches(&format!("{}/{}", p.namespace, p.service_account)))
            }),
            CCond::SourceTrustDomain(f) => {
                f.eval(|m| peer.is_some_and(|p| m.matches(p.trust_domain)))
            }
            CCond::Sni(f) => f.eval(|m| a.sni.is_some_and(|s| m.matches(s))),
            CCond::Experimental(f) => f.eval(|_| false),
            // HTTP-only conditions: ignored on TCP (DENY/AUDIT; ALLOW rules were dropped).
            CCond::Header(..)
            | CCond::Authority(_)
            | CCond::Method(_)
            | CCond::Path(_)
            | CCond::Scheme(_)
            | CCond::Never
            | CCond::AuthPrincipal(_)
            | CCond::AuthAudiences(_)
            | CCond::AuthPresenter(_)
            | CCond::AuthClaim(..) => true,
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

/// A policy and the rule of it that matched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuleMatch {
    pub policy: String,
    pub rule: usize,
}

/// What would happen if the dry-run policies were enforced with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    pub allowed: bool,
    /// The policy (and rule) that would decide; None when none would (no policy of an action
    /// applies, or no ALLOW matched).
    pub decided_by: Option<RuleMatch>,
}

/// The outcome of authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The policy that decided (`ns/name`), if one did.
    pub policy: Option<String>,
    pub reason: Why,
    /// AUDIT policies that matched, each with its first matching rule.
    pub audits: Vec<RuleMatch>,
    /// Set when a dry-run policy applies to the workload.
    pub dry_run: Option<DryRun>,
}

/// Why authorization decided as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// No policy of an action that decides applies.
    NoPolicy,
    AllowMatched,
    DenyMatched,
    NoAllowMatched,
    /// A CUSTOM policy matched a TCP connection: external authorization of TCP is not done
    /// here, so the connection is refused.
    CustomOnTcp,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::NoPolicy => "allowed",
            Why::AllowMatched => "allowed by ALLOW policy",
            Why::DenyMatched => "denied by DENY policy",
            Why::NoAllowMatched => "no ALLOW policy matched",
            Why::CustomOnTcp => {
                "CUSTOM policy matched a TCP connection, which is not checked externally: denied"
            }
        }
    }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first CUSTOM policy (dry-run ones aside) whose rules match: the request goes to its
/// provider before anything else is decided.
pub fn custom_match<'p>(policies: &'p [Arc<Compiled>], a: &Attrs) -> Option<(&'p Compiled, usize)> {
    policies
        .iter()
        .filter(|p| p.action == Action::Custom && !p.dry_run)
        .find_map(|p| p.matched_rule(a).map(|rule| (&**p, rule)))
}

/// Istio's order over the policies that count, once CUSTOM has passed: DENY, then ALLOW.
fn decide(policies: &[Arc<Compiled>], a: &Attrs, with_dry_run: bool) -> (Why, Option<RuleMatch>) {
    let counts = |p: &&Arc<Compiled>| with_dry_run || !p.dry_run;
    let first = |action: Action| {
        policies
            .iter()
            .filter(|p| p.action == action)
            .filter(counts)
            .find_map(|p| {
                p.matched_rule(a).map(|rule| RuleMatch {
                    policy: p.id.clone(),
                    rule,
                })
            })
    };
    if let Some(m) = first(Action::Deny) {
        return (Why::DenyMatched, Some(m));
    }
    let any_allow = policies
        .iter()
        .filter(counts)
        .any(|p| p.action == Action::Allow);
    if !any_allow {
        return (Why::NoPolicy, None);
    }
    match first(Action::Allow) {
        Some(m) => (Why::AllowMatched, Some(m)),
        None => (Why::NoAllowMatched, None),
    }
}

fn allows(w: Why) -> bool {
    matches!(w, Why::NoPolicy | Why::AllowMatched)
}

/// Evaluates the policies that apply to one workload.
pub fn evaluate(policies: &[Arc<Compiled>], a: &Attrs) -> Verdict {
    let audits = policies
        .iter()
        .filter(|p| p.action == Action::Audit)
        .filter_map(|p| {
            p.matched_rule(a).map(|rule| RuleMatch {
                policy: p.id.clone(),
                rule,
            })
        })
        .collect();
    let (why, by) = decide(policies, a, false);
    let dry_run = policies
        .iter()
        .any(|p| p.dry_run && p.action != Action::Audit)
        .then(|| {
            let (w, decided_by) = decide(policies, a, true);
            DryRun {
                allowed: allows(w),
                decided_by,
            }
        });
    Verdict {
        allowed: allows(why),
        policy: by.map(|m| m.policy),
        reason: why,
        audits,
        dry_run,
    }
}

#[cfg(test)]
mod tests;
