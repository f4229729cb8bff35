//! One decision: (request, destination workload, source) -> RequestAuthentication, then
//! AuthorizationPolicy -> allow (with header changes) or deny (status, body, policy, reason).
//! The proxy and `authz-agent check` both come through here, so they always agree.
use std::{net::IpAddr, sync::Arc};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::{
    authz::{self, Attrs, HttpAttrs, Identity, Peer},
    config::PathNormalization,
    extauthz::{self, HeaderOp},
    jwt::{
        self,
        cache::{TokenCache, VerifiedBy},
        extract::{self, Location},
        remote::JwksStore,
        Claims, JwtError,
    },
    normalize::{self, PathError},
    policy::{Custom, Keys, PolicyIndex, Provider, WorkloadPolicies},
    registry::Workload,
};

pub const RBAC_DENIED: &str = "RBAC: access denied";

pub struct Engine {
    index: PolicyIndex,
    cache: Arc<TokenCache>,
    store: Option<Arc<JwksStore>>,
    normalization: PathNormalization,
    trust_domain: String,
    /// Whether CUSTOM providers are asked (`check` only says which one would be).
    ask_providers: bool,
}

/// The request as the engine sees it.
pub struct Request<'a> {
    pub method: &'a str,
    /// Path and query as received (origin form).
    pub target: &'a str,
    /// Host header / :authority.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// HTTP/2 lets lowercase methods reach the policy; HTTP/1 answers 400.
    pub http2: bool,
    /// The body, buffered when the CUSTOM provider asked for it (`custom_body`).
    pub body: Option<&'a Bytes>,
}

/// Who is talking to whom. The destination is the policies that select it, computed when the
/// state in force was built (`state::State`), from its labels at that moment.
pub struct Conn<'a> {
    pub policies: &'a WorkloadPolicies,
    pub source: Option<&'a Workload>,
    /// The destination workload (its principal goes to CUSTOM providers).
    pub destination: Option<&'a Workload>,
    pub source_ip: Option<IpAddr>,
    pub dest_ip: Option<IpAddr>,
    pub dest_port: u16,
}

/// What the enforcer does with a request or connection, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Why, for logs, metrics and `check`.
    pub reason: Reason,
    pub policy: Option<String>,
    /// `iss/sub` of the verified token, if any.
    pub principal: Option<String>,
    /// AUDIT policies that matched (authorization ran).
    pub audits: Vec<authz::RuleMatch>,
    /// What the dry-run policies would have decided (when one applies).
    pub dry_run: Option<authz::DryRun>,
    /// The CUSTOM policy that matched, and its provider.
    pub custom: Option<CustomCheck>,
    /// The provider's headers for the client: on the response when allowed, on the reply
    /// when it denied.
    pub response_ops: Vec<HeaderOp>,
}

/// Sent on, changed so; or answered here.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow(Forward),
    Deny(Reply),
}

/// How an allowed request goes upstream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forward {
    /// The provider's changes to the request, applied first (its filter runs before the JWT
    /// filter).
    pub upstream_ops: Vec<HeaderOp>,
    /// Headers removed (after the provider's changes).
    pub remove_headers: Vec<HeaderName>,
    /// Headers set (after removal).
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// The path+query sent upstream (normalized; a verified query token removed); none for a
    /// TCP connection.
    pub target: Option<String>,
}

/// The local answer to a denied request (a denied connection is closed).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    /// Beside the body: `www-authenticate`, `connection: close`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// A CUSTOM policy matched: which, and what its provider did.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomCheck {
    pub policy: authz::RuleMatch,
    /// The provider's name (empty when the policy names none).
    pub provider: String,
    /// Whether the provider was asked (`check` does not ask), and why not when it could not be.
    pub asked: bool,
}

/// Why a request or connection was decided as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Refused before any policy: malformed, ambiguous or smuggling-prone.
    BadRequest(&'static str),
    /// A presented token failed, with Envoy's jwt_verify_lib reason.
    Jwt(JwtError),
    /// Authorization decided (allowed, denied by DENY, no ALLOW matched).
    Authz(authz::Why),
    /// A CUSTOM policy matched and its provider decided (or could not).
    Custom(CustomWhy),
}

/// What became of a CUSTOM check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomWhy {
    /// The provider denied.
    Denied,
    /// The provider could not be asked or did not answer: `statusOnError`.
    Unavailable,
    /// The provider could not be asked or did not answer, and `failOpen` let the request on.
    FailedOpen,
    /// The policy's provider is unknown, invalid, or one of several: denied.
    Unusable,
}

impl CustomWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            CustomWhy::Denied => "denied by CUSTOM provider",
            CustomWhy::Unavailable => "CUSTOM provider unavailable (statusOnError)",
            CustomWhy::FailedOpen => "CUSTOM provider unavailable, failOpen",
            CustomWhy::Unusable => "CUSTOM provider unknown or invalid: denied",
        }
    }
}

impl Default for Reason {
    fn default() -> Reason {
        Reason::Authz(authz::Why::NoPolicy)
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadRequest(why) => why,
            Reason::Jwt(e) => e.message(),
            Reason::Authz(w) => w.as_str(),
            Reason::Custom(w) => w.as_str(),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Decision {
    fn new(verdict: Verdict, reason: Reason, policy: Option<String>) -> Decision {
        Decision {
            verdict,
            reason,
            policy,
            principal: None,
            audits: vec![],
            dry_run: None,
            custom: None,
            response_ops: vec![],
        }
    }

    fn deny(status: u16, body: &str, reason: Reason, policy: Option<String>) -> Decision {
        let reply = Reply {
            status,
            body: Bytes::copy_from_slice(body.as_bytes()),
            headers: vec![],
        };
        Decision::new(Verdict::Deny(reply), reason, policy)
    }

    pub fn allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow(_))
    }

    /// The status the client sees from the enforcer: the reply's, or 200 when sent on.
    pub fn status(&self) -> u16 {
        match &self.verdict {
            Verdict::Allow(_) => 200,
            Verdict::Deny(r) => r.status,
        }
    }

    /// The reply body as text (a provider's non-UTF-8 body reads as empty); "allowed" when
    /// sent on.
    pub fn body_text(&self) -> &str {
        match &self.verdict {
            Verdict::Allow(_) => "allowed",
            Verdict::Deny(r) => std::str::from_utf8(&r.body).unwrap_or(""),
        }
    }

    /// How it goes upstream, when allowed.
    pub fn forward(&self) -> Option<&Forward> {
        match &self.verdict {
            Verdict::Allow(f) => Some(f),
            Verdict::Deny(_) => None,
        }
    }

    /// The local answer, when denied.
    pub fn reply(&self) -> Option<&Reply> {
        match &self.verdict {
            Verdict::Deny(r) => Some(r),
            Verdict::Allow(_) => None,
        }
    }

    fn reply_mut(&mut self) -> Option<&mut Reply> {
        match &mut self.verdict {
            Verdict::Deny(r) => Some(r),
            Verdict::Allow(_) => None,
        }
    }
}

impl Engine {
    pub fn new(
        index: PolicyIndex,
        cache: Arc<TokenCache>,
        store: Option<Arc<JwksStore>>,
        normalization: PathNormalization,
        trust_domain: &str,
    ) -> Engine {
        Engine {
            index,
            cache,
            store,
            normalization,
            trust_domain: trust_domain.into(),
            ask_providers: true,
        }
    }

    /// An engine that never asks CUSTOM providers (`check`): a CUSTOM match is reported, and
    /// the rest decided as if the provider allowed.
    pub fn without_providers(mut self) -> Engine {
        self.ask_providers = false;
        self
    }

    pub fn index(&self) -> &PolicyIndex {
        &self.index
    }

    /// The policies that select `w` as its labels are now. Not cached here: the state in force
    /// computes them once per destination when it is built.
    pub fn policies_for(&self, w: &Workload) -> WorkloadPolicies {
        self.index.for_workload(w)
    }

    fn spiffe(&self, w: Option<&Workload>) -> Option<String> {
        w.map(|w| {
            format!(
                "spiffe://{}/ns/{}/sa/{}",
                self.trust_domain, w.namespace, w.service_account
            )
        })
    }

    fn peer<'a>(&'a self, w: Option<&'a Workload>) -> Option<Peer<'a>> {
        w.map(|w| Peer::new(&self.trust_domain, &w.namespace, &w.service_account))
    }

    /// A non-HTTP connection: only the L4 parts of the policies (HTTP-only fields drop ALLOW
    /// rules and are ignored in DENY rules, as Istio compiles them for TCP).
    pub fn decide_tcp(&self, c: &Conn) -> Decision {
        let pol = c.policies;
        let peer = self.peer(c.source);
        let a = Attrs {
            http: None,
            peer: peer.as_ref(),
            source_ip: c.source_ip,
            remote_ip: c.source_ip,
            dest_ip: c.dest_ip,
            dest_port: c.dest_port,
            sni: None,
        };
        if let Some((p, rule)) = authz::custom_match(&pol.authz, &a) {
            let why = authz::Why::CustomOnTcp;
            let mut d = Decision::deny(
                403,
                "connection closed due to policy rejection",
                Reason::Authz(why),
                Some(p.id.clone()),
            );
            d.custom = Some(CustomCheck {
                policy: authz::RuleMatch {
                    policy: p.id.clone(),
                    rule,
                },
                provider: p.provider.clone().unwrap_or_default(),
                asked: false,
            });
            return d;
        }
        let v = authz::evaluate(&pol.authz, &a);
        let mut d = if v.allowed {
            Decision::new(
                Verdict::Allow(Forward::default()),
                Reason::Authz(v.reason),
                v.policy,
            )
        } else {
            Decision::deny(
                403,
                "connection closed due to policy rejection",
                Reason::Authz(v.reason),
                v.policy,
            )
        };
        d.audits = v.audits;
        d.dry_run = v.dry_run;
        d
    }

    /// Whether the request must be buffered before it is decided: a CUSTOM policy matches it
    /// and its provider wants the body (`includeRequestBodyInCheck`). Cheap when no provider
    /// of the destination does.
    pub fn custom_body(&self, c: &Conn<'_>, r: &Request<'_>) -> Option<extauthz::BodyCheck> {
        let Some(Custom::Provider(p)) = &c.policies.custom else {
            return None;
        };
        let body = p.body?;
        let (path, query) = normalize::normalize(r.target, self.normalization).ok()?;
        let target = format!("{path}{query}");
        let peer = self.peer(c.source);
        let a = self.attrs(c, r, &path, &target, r.headers, None, peer.as_ref());
        authz::custom_match(&c.policies.authz, &a).map(|_| body)
    }

    #[allow(clippy::too_many_arguments)]
    fn attrs<'a>(
        &self,
        c: &Conn<'_>,
        r: &'a Request<'_>,
        path: &'a str,
        target: &'a str,
        headers: &'a HeaderMap,
        identity: Option<&'a Identity>,
        peer: Option<&'a Peer<'a>>,
    ) -> Attrs<'a> {
        Attrs {
            http: Some(HttpAttrs {
                method: r.method,
                path,
                path_and_query: target,
                host: r.host,
                headers,
                identity,
            }),
            peer,
            source_ip: c.source_ip,
            remote_ip: c.source_ip,
            dest_ip: c.dest_ip,
            dest_port: c.dest_port,
            sni: None,
        }
    }

    /// Istio's HTTP filter order: CUSTOM (the provider asked), then RequestAuthentication,
    /// then DENY and ALLOW.
    pub async fn decide_http(&self, c: &Conn<'_>, r: &Request<'_>) -> Decision {
        if !r.http2 && r.method.bytes().any(|b| b.is_ascii_lowercase()) {
            return bad_request("lowercase method");
        }
        if let Some(why) = framing_problem(r) {
            return bad_request(why);
        }
        let (path, mut query) = match normalize::normalize(r.target, self.normalization) {
            Ok(p) => p,
            Err(PathError::Nul) => return bad_request("NUL in path"),
            Err(PathError::Invalid) => return bad_request("path is not in origin form"),
            Err(PathError::BadEscape) => return bad_request("malformed percent-encoding in path"),
        };
        let pol = c.policies;
        let mut fwd = Forward {
            remove_headers: pol.sanitize.clone(),
            ..Default::default()
        };
        let (mut custom, mut response_ops) = (None, vec![]);
        let peer = self.peer(c.source);

        // CUSTOM: its rules see no token (they may not use one).
        let mut changed_headers: Option<HeaderMap> = None;
        if pol.custom.is_some() {
            let target = format!("{path}{query}");
            let a = self.attrs(c, r, &path, &target, r.headers, None, peer.as_ref());
            if let Some((p, rule)) = authz::custom_match(&pol.authz, &a) {
                let check = CustomCheck {
                    policy: authz::RuleMatch {
                        policy: p.id.clone(),
                        rule,
                    },
                    provider: p.provider.clone().unwrap_or_default(),
                    asked: false,
                };
                // Boxed, as every rare path here: the request's future stays small, and hyper
                // moves it on every request.
                match Box::pin(self.custom(c, r, &target, check)).await {
                    Err(deny) => return *deny,
                    Ok((check, allowed)) => {
                        custom = Some(check);
                        response_ops = allowed.downstream;
                        if !allowed.upstream.is_empty() {
                            // The filters after it see the request as the provider left it.
                            let mut h = r.headers.clone();
                            for op in &allowed.upstream {
                                op.apply(&mut h);
                            }
                            changed_headers = Some(h);
                        }
                        fwd.upstream_ops = allowed.upstream;
                    }
                }
            }
        }
        let headers = changed_headers.as_ref().unwrap_or(r.headers);

        // RequestAuthentication.
        let cors_preflight = r.method == "OPTIONS"
            && headers.contains_key(http::header::ORIGIN)
            && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
        let mut identity: Option<(Identity, bool)> = None;
        if !cors_preflight && !pol.providers.is_empty() {
            let now = jwt::now_secs();
            for loc in &pol.locations {
                for token in extract::extract(loc, headers, &query) {
                    // Only the providers of the token's issuer can verify it; every other one
                    // would say "issuer not configured", the weakest answer.
                    let (mut best, mut ok) =
                        (None::<JwtError>, None::<(Arc<Claims>, Arc<Provider>)>);
                    let mut cached = self.cache.entry(&token);
                    let parsed: String;
                    let iss = match &cached {
                        Some((_, claims)) => Ok(claims.iss.as_str()),
                        None => match jwt::parse(&token) {
                            Ok((claims, _, _)) => {
                                parsed = claims.iss;
                                Ok(parsed.as_str())
                            }
                            Err(e) => Err(e),
                        },
                    };
                    let candidates = match iss {
                        Ok(iss) => Some(pol.providers_for(iss)),
                        Err(e) => {
                            best = Some(e);
                            None
                        }
                    };
                    for p in candidates
                        .into_iter()
                        .flatten()
                        .filter(|p| p.locations.contains(loc))
                    {
                        match self.verify(&token, p, now, &mut cached).await {
                            Ok(claims) => {
                                ok = Some((claims, p.clone()));
                                break;
                            }
                            Err(e) => {
                                if best.is_none_or(|b| e.weight() > b.weight()) {
                                    best = Some(e);
                                }
                            }
                        }
                    }
                    let Some((claims, p)) = ok else {
                        let e = best.unwrap_or(JwtError::UnknownIssuer);
                        let mut deny =
                            Decision::deny(e.status(), e.message(), Reason::Jwt(e), None);
                        if let Some(reply) = deny.reply_mut() {
                            let www = www_authenticate(r, &path);
                            reply.headers.push((http::header::WWW_AUTHENTICATE, www));
                        }
                        deny.custom = custom;
                        deny.response_ops = response_ops;
                        return deny;
                    };
                    apply_outputs(&mut fwd, loc, &claims, &p, &mut query);
                    let from_header = matches!(loc, Location::Header { .. });
                    if identity.as_ref().is_none_or(|(_, h)| !h && from_header) {
                        identity = Some((
                            Identity {
                                issuer: claims.iss.clone(),
                                subject: claims.sub.clone(),
                                payload: claims.payload.clone(),
                                space_delimited: p.space_delimited.clone(),
                            },
                            from_header,
                        ));
                    }
                }
            }
        }
        let identity = identity.map(|(i, _)| i);
        let principal = identity.as_ref().map(Identity::principal);

        // AuthorizationPolicy.
        let target = format!("{path}{query}");
        let a = self.attrs(
            c,
            r,
            &path,
            &target,
            headers,
            identity.as_ref(),
            peer.as_ref(),
        );
        let v = authz::evaluate(&pol.authz, &a);
        let mut d = if v.allowed {
            fwd.target = Some(target);
            Decision::new(Verdict::Allow(fwd), Reason::Authz(v.reason), v.policy)
        } else {
            Decision::deny(403, RBAC_DENIED, Reason::Authz(v.reason), v.policy)
        };
        d.principal = principal;
        d.audits = v.audits;
        d.dry_run = v.dry_run;
        d.custom = custom;
        d.response_ops = response_ops;
        d
    }

    /// Asks the workload's CUSTOM provider about a request one of its policies matched: the
    /// changes it allows with, or the reply that ends the request.
    async fn custom(
        &self,
        c: &Conn<'_>,
        r: &Request<'_>,
        target: &str,
        mut check: CustomCheck,
    ) -> Result<(CustomCheck, extauthz::Allowed), Box<Decision>> {
        let denied = |status: u16, body: Bytes, why: CustomWhy, check: CustomCheck| {
            let reply = Reply {
                status,
                body,
                headers: vec![],
            };
            let policy = Some(check.policy.policy.clone());
            let mut d = Decision::new(Verdict::Deny(reply), Reason::Custom(why), policy);
            d.custom = Some(check);
            d
        };
        let p = match &c.policies.custom {
            Some(Custom::Provider(p)) if p.name == check.provider => p.clone(),
            Some(Custom::Unusable(why)) => {
                tracing::debug!(policy = %check.policy.policy, "CUSTOM policy cannot be checked: {why}");
                let body = Bytes::from_static(RBAC_DENIED.as_bytes());
                return Err(Box::new(denied(403, body, CustomWhy::Unusable, check)));
            }
            // Cannot be: the workload's provider is the one its CUSTOM policies name.
            _ => {
                let body = Bytes::from_static(RBAC_DENIED.as_bytes());
                return Err(Box::new(denied(403, body, CustomWhy::Unusable, check)));
            }
        };
        if !self.ask_providers {
            return Ok((check, extauthz::Allowed::default()));
        }
        check.asked = true;
        let source = c.source_ip.map(|ip| std::net::SocketAddr::new(ip, 0));
        let destination = c
            .dest_ip
            .map(|ip| std::net::SocketAddr::new(ip, c.dest_port));
        let input = extauthz::CheckInput {
            method: r.method,
            path: target,
            host: r.host,
            headers: r.headers,
            http2: r.http2,
            source,
            destination,
            source_principal: self.spiffe(c.source),
            destination_principal: self.spiffe(c.destination),
            body: r.body,
        };
        let answer = p.check(&input).await;
        let failed = match &answer {
            extauthz::Answer::Error(e) => {
                tracing::warn!(provider = %p.name, policy = %check.policy.policy, "CUSTOM check failed: {e}");
                true
            }
            _ => false,
        };
        match p.outcome(answer) {
            extauthz::Outcome::Allow(a) => Ok((check, a)),
            extauthz::Outcome::Deny(den) => {
                let why = if failed {
                    CustomWhy::Unavailable
                } else {
                    CustomWhy::Denied
                };
                let mut d = denied(den.status, den.body, why, check);
                d.response_ops = den.headers;
                Err(Box::new(d))
            }
        }
    }

    /// One token against one provider: issuer, time, audience, then the signature, unless
    /// `cached` says this provider verified it with the key set in force (then its claims are
    /// taken: no other provider can use them).
    async fn verify(
        &self,
        token: &str,
        p: &Provider,
        now: i64,
        cached: &mut Option<(VerifiedBy, Arc<Claims>)>,
    ) -> Result<Arc<Claims>, JwtError> {
        let (jwks, generation, remote) = match &p.keys {
            Keys::Inline(j) => (Some(j.clone()), 0, None),
            Keys::Remote(r) => match r.current() {
                Some((j, g)) => (Some(j), g, Some(r)),
                None => (None, 0, Some(r)),
            },
        };
        // Issuer, time and audience are checked on every use, cached or not (Envoy's order).
        let checks = |claims: &Claims| -> Result<(), JwtError> {
            if !p.issuer.is_empty() && claims.iss != p.issuer {
                return Err(JwtError::UnknownIssuer);
            }
            jwt::check_time(claims, now)?;
            jwt::check_audience(claims, &p.audiences)
        };
        if let Some((_, claims)) = cached.take_if(|(by, _)| *by == (p.uid, generation)) {
            checks(&claims)?;
            return Ok(claims);
        }
        let (claims, signed, sig) = jwt::parse(token)?;
        checks(&claims)?;
        let store = self.store.as_ref();
        let (jwks, generation) = match (jwks, remote, store) {
            (Some(j), _, _) => (j, generation),
            (None, Some(r), Some(s)) => {
                // Never fetched (or every fetch failed): one rate-limited attempt, then fail.
                Box::pin(r.refetch_if_allowed(&s.fetcher)).await;
                r.current().ok_or(JwtError::FetchFail)?
            }
            _ => return Err(JwtError::FetchFail),
        };
        match jwt::verify_signature(&claims, signed, sig, &jwks) {
            Ok(()) => {
                let claims = Arc::new(claims);
                self.cache.put(token, p.uid, generation, &claims, now);
                Ok(claims)
            }
            Err(JwtError::KidAlgMismatch) if remote.is_some() && store.is_some() => {
                // Key rotation: fetch again (rate-limited) before answering 401.
                let (r, s) = (remote.unwrap(), store.unwrap());
                if Box::pin(r.refetch_if_allowed(&s.fetcher)).await {
                    if let Some((j, g)) = r.current() {
                        jwt::verify_signature(&claims, signed, sig, &j)?;
                        let claims = Arc::new(claims);
                        self.cache.put(token, p.uid, g, &claims, now);
                        return Ok(claims);
                    }
                }
                Err(JwtError::KidAlgMismatch)
            }
            Err(e) => Err(e),
        }
    }
}

/// 400, and the connection is closed after it so nothing after a bad request is read as a request.
fn bad_request(why: &'static str) -> Decision {
    let mut d = Decision::deny(400, "Bad Request", Reason::BadRequest(why), None);
    if let Some(reply) = d.reply_mut() {
        let close = HeaderValue::from_static("close");
        reply.headers.push((http::header::CONNECTION, close));
    }
    d
}

/// Message framing a front end and an upstream could read differently (request smuggling):
/// Content-Length with Transfer-Encoding, several Content-Length values, a Transfer-Encoding
/// other than exactly `chunked`.
fn framing_problem(r: &Request) -> Option<&'static str> {
    if r.http2 {
        return None;
    }
    let cl: Vec<_> = r
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .collect();
    let te: Vec<_> = r
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .collect();
    if !cl.is_empty() && !te.is_empty() {
        return Some("Content-Length with Transfer-Encoding");
    }
    if cl.len() > 1 || cl.first().is_some_and(|v| v.as_bytes().contains(&b',')) {
        return Some("several Content-Length values");
    }
    if te.len() > 1
        || te
            .first()
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"chunked"))
    {
        return Some("Transfer-Encoding other than chunked");
    }
    None
}

/// After a token verified: strip it unless forwarded, and set the output headers.
fn apply_outputs(
    d: &mut Forward,
    loc: &Location,
    claims: &Claims,
    p: &Provider,
    query: &mut String,
) {
    if !p.forward_original_token {
        match loc {
            Location::Header { name, .. } => {
                if !d.remove_headers.contains(name) {
                    d.remove_headers.push(name.clone());
                }
            }
            Location::Param(name) => *query = extract::remove_param(query, name),
            Location::Cookie(_) => {}
        }
    }
    if let Some(h) = &p.output_payload_to_header {
        if let Ok(v) = HeaderValue::from_str(&claims.payload_b64) {
            d.set_headers.push((h.clone(), v));
        }
    }
    for (h, path) in &p.claim_to_headers {
        let Some(v) = authz::claim_at(&claims.payload, path) else {
            continue;
        };
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            // Lists go out as base64 of their JSON, as Envoy does.
            serde_json::Value::Array(_) => {
                base64::engine::general_purpose::STANDARD.encode(v.to_string())
            }
            _ => continue,
        };
        if let Ok(v) = HeaderValue::from_str(&text) {
            d.set_headers.push((h.clone(), v));
        }
    }
}

/// `Bearer realm="<original URI, at most 256 chars>", error="invalid_token"`.
fn www_authenticate(r: &Request, path: &str) -> HeaderValue {
    let mut uri = format!("http://{}{}", r.host, path);
    uri.truncate(256);
    let uri: String = uri
        .chars()
        .filter(|c| *c != '"' && !c.is_control())
        .collect();
    HeaderValue::from_str(&format!("Bearer realm=\"{uri}\", error=\"invalid_token\""))
        .unwrap_or(HeaderValue::from_static("Bearer error=\"invalid_token\""))
}

/// Builds the JWKS store of a config: service names resolve as in a cluster.
/// The JWKS store; `jwksUri` hosts resolve through the services of `registry()`, which is read
/// at each fetch (the registry in force).
pub fn jwks_store(
    cfg: &crate::config::Config,
    registry: impl Fn() -> Arc<crate::registry::Registry> + Send + Sync + 'static,
) -> anyhow::Result<Arc<JwksStore>> {
    let resolve: jwt::remote::ServiceResolver = Arc::new(move |host, ns| {
        let r = registry();
        let s = r.resolve_service(host, ns)?;
        Some(s.ips.clone())
    });
    let fetcher = jwt::remote::Fetcher::new(
        cfg.agent.jwks_ca_file.as_deref(),
        resolve,
        cfg.agent.allow_link_local_jwks,
    )?;
    Ok(JwksStore::new(fetcher, cfg.agent.jwks_refresh_interval))
}

/// Loads the config's policies and compiles an engine. Problems come back with the set.
pub fn build(
    cfg: &crate::config::Config,
    store: Option<&Arc<JwksStore>>,
    cache: Arc<TokenCache>,
) -> (Engine, crate::policy::PolicySet) {
    let set = crate::policy::load_config(cfg);
    (build_from(&cfg.agent, &set, store, cache), set)
}

/// Compiles an engine from loaded policies (files or the API server).
pub fn build_from(
    agent: &crate::config::AgentSettings,
    set: &crate::policy::PolicySet,
    store: Option<&Arc<JwksStore>>,
    cache: Arc<TokenCache>,
) -> Engine {
    let index = PolicyIndex::build(set, &agent.root_namespace, store);
    Engine::new(
        index,
        cache,
        store.cloned(),
        agent.path_normalization,
        &agent.trust_domain,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::{
        jwt::testkeys::TestKey,
        policy::{load_str, PolicySet},
    };

    fn engine(yaml: &str, cache: usize) -> (Engine, Arc<TokenCache>) {
        let mut set = PolicySet::default();
        load_str(yaml, "t.yaml", &mut set);
        assert!(set.is_valid(), "{:?}", set.problems);
        let cache = Arc::new(TokenCache::new(cache));
        (
            Engine::new(
                PolicyIndex::build(&set, "istio-system", None),
                cache.clone(),
                None,
                PathNormalization::Base,
                "cluster.local",
            ),
            cache,
        )
    }

    fn workload() -> Workload {
        Workload {
            name: "httpbin".into(),
            namespace: "foo".into(),
            labels: BTreeMap::from([("app".into(), "httpbin".into())]).into(),
            service_account: "httpbin".into(),
        }
    }

    fn decide(e: &Engine, method: &str, target: &str, headers: &[(&str, &str)]) -> Decision {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let pol = e.policies_for(&workload());
        let c = Conn {
            policies: &pol,
            source: None,
            destination: None,
            source_ip: None,
            dest_ip: None,
            dest_port: 8000,
        };
        let r = Request {
            method,
            target,
            host: "httpbin.foo:8000",
            headers: &h,
            http2: false,
            body: None,
        };
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(e.decide_http(&c, &r))
    }

    fn ra(rules: &str) -> String {
        format!("apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n{rules}")
    }

    fn rule(issuer: &str, k: &TestKey, extra: &str) -> String {
        format!(
            "  - issuer: {issuer}\n    jwks: '{}'\n{extra}",
            TestKey::jwks(&[k])
        )
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    #[test]
    fn missing_invalid_and_audience() {
        let k = TestKey::new("ES256", "k");
        let (e, _) = engine(&ra(&rule("iss", &k, "    audiences: [bar]\n")), 100);
        assert!(
            decide(&e, "GET", "/", &[]).allowed(),
            "no token: allowed, no identity"
        );
        let d = decide(
            &e,
            "GET",
            "/p?q=1",
            &[("authorization", "Bearer not-a-jwt")],
        );
        assert_eq!(
            (d.status(), d.body_text()),
            (
                401,
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            )
        );
        assert_eq!(
            d.reply().unwrap().headers[0].1,
            "Bearer realm=\"http://httpbin.foo:8000/p\", error=\"invalid_token\""
        );
        let d = decide(
            &e,
            "GET",
            "/",
            &[(
                "authorization",
                &bearer(&k.token(json!({"iss": "iss", "aud": "foo"}))),
            )],
        );
        assert_eq!(
            (d.status(), d.body_text()),
            (403, "Audiences in Jwt are not allowed")
        );
        let d = decide(
            &e,
            "GET",
            "/",
            &[(
                "authorization",
                &bearer(&k.token(json!({"iss": "iss", "sub": "s", "aud": ["x", "bar"]}))),
            )],
        );
        assert!(d.allowed());
        assert_eq!(d.principal.as_deref(), Some("iss/s"));
        assert!(
            d.forward()
                .unwrap()
                .remove_headers
                .contains(&http::header::AUTHORIZATION),
            "token stripped"
        );
        let d = decide(
            &e,
            "GET",
            "/",
            &[("authorization", &bearer(&k.token(json!({"iss": "other"}))))],
        );
        assert_eq!(
            (d.status(), d.body_text()),
            (401, "Jwt issuer is not configured")
        );
    }

    #[test]
    fn every_presented_token_must_verify() {
        let k = TestKey::new("HS256", "k");
        let (e, _) = engine(&ra(&rule("iss", &k, "")), 100);
        let good = k.token(json!({"iss": "iss", "sub": "a"}));
        let expired = k.token(json!({"iss": "iss", "exp": 1}));
        let d = decide(
            &e,
            "GET",
            &format!("/?access_token={expired}"),
            &[("authorization", &bearer(&good))],
        );
        assert_eq!((d.status(), d.body_text()), (401, "Jwt is expired"));
        let d = decide(&e, "GET", &format!("/x?a=1&access_token={good}"), &[]);
        assert!(d.allowed());
        assert_eq!(
            d.forward().unwrap().target.as_deref(),
            Some("/x?a=1"),
            "a verified query token is not forwarded"
        );
        let d = decide(
            &e,
            "GET",
            "/",
            &[
                ("authorization", &bearer(&good)),
                ("authorization", &bearer(&good)),
            ],
        );
        assert_eq!(
            d.status(),
            401,
            "repeated Authorization headers are joined, as Envoy does"
        );
    }

    #[test]
    fn same_issuer_rules_are_ored() {
        let k = TestKey::new("HS384", "k");
        let two = format!(
            "{}---\n{}",
            ra(&rule("iss", &k, "    audiences: [bar]\n")),
            ra(&rule("iss", &k, "")).replace("name: ra,", "name: ra2,")
        );
        let (e, _) = engine(&two, 100);
        assert!(decide(
            &e,
            "GET",
            "/",
            &[("authorization", &bearer(&k.token(json!({"iss": "iss"}))))]
        )
        .allowed());
    }

    #[test]
    fn locations_outputs_and_sanitizing() {
        let k = TestKey::new("EdDSA", "k");
        let extra = "    fromHeaders: [{name: x-token, prefix: 'Token '}]\n    outputPayloadToHeader: x-payload\n    outputClaimToHeaders: [{header: x-team, claim: org.team}, {header: x-groups, claim: groups}]\n";
        let yaml = format!("{}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: need-jwt, namespace: foo}}\nspec:\n  rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]\n", ra(&rule("iss", &k, extra)));
        let (e, _) = engine(&yaml, 100);
        let t = k.token(
            json!({"iss": "iss", "sub": "s", "org": {"team": "blue"}, "groups": ["a", "b"]}),
        );
        // A token where no rule looks is ignored: no identity, so the ALLOW needs one -> 403.
        let d = decide(&e, "GET", "/", &[("authorization", &bearer(&t))]);
        assert_eq!((d.status(), d.body_text()), (403, RBAC_DENIED));
        let d = decide(
            &e,
            "GET",
            "/",
            &[
                ("x-token", &format!("Token {t}")),
                ("x-payload", "spoofed"),
                ("x-team", "red"),
            ],
        );
        assert!(d.allowed(), "{d:?}");
        assert!(
            d.forward()
                .unwrap()
                .remove_headers
                .iter()
                .any(|h| h == "x-payload")
                && d.forward()
                    .unwrap()
                    .remove_headers
                    .iter()
                    .any(|h| h == "x-team"),
            "client values removed"
        );
        assert!(d
            .forward()
            .unwrap()
            .remove_headers
            .iter()
            .any(|h| h == "x-token"));
        let set: BTreeMap<String, String> = d
            .forward()
            .unwrap()
            .set_headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(set["x-payload"], t.split('.').nth(1).unwrap());
        assert_eq!(set["x-team"], "blue");
        assert_eq!(
            set["x-groups"],
            base64::engine::general_purpose::STANDARD.encode(r#"["a","b"]"#)
        );
        // Output headers are removed even from requests without a token.
        let d = decide(
            &e,
            "OPTIONS",
            "/",
            &[
                ("origin", "https://a"),
                ("access-control-request-method", "GET"),
                ("x-token", "Token garbage"),
                ("x-team", "red"),
            ],
        );
        assert_eq!(
            d.status(),
            403,
            "CORS preflight skips JWT (then authz needs an identity)"
        );
        assert_eq!(d.reason, Reason::Authz(authz::Why::NoAllowMatched));
    }

    #[test]
    fn a_token_is_verified_by_the_providers_of_its_issuer_only() {
        let (k, other) = (TestKey::new("RS256", "k"), TestKey::new("ES256", "o"));
        // Two rules for issuer b (the first with the wrong key), around others.
        let rules = [
            rule("a", &k, ""),
            rule("b", &other, ""),
            rule("b", &k, ""),
            rule("c", &k, "    audiences: [x]\n"),
        ]
        .concat();
        let (e, cache) = engine(&ra(&rules), 100);
        for round in ["verified", "cached"] {
            let d = decide(
                &e,
                "GET",
                "/",
                &[(
                    "authorization",
                    &bearer(&k.token(json!({"iss": "b", "sub": "s"}))),
                )],
            );
            assert_eq!(d.principal.as_deref(), Some("b/s"), "{round}: {d:?}");
        }
        assert_eq!(cache.len(), 1);
        let status = |iss: &str, key: &TestKey| {
            let t = key.token(json!({"iss": iss, "sub": "s"}));
            let d = decide(&e, "GET", "/", &[("authorization", &bearer(&t))]);
            (d.status(), d.body_text().to_string())
        };
        assert_eq!(status("a", &k).0, 200);
        assert_eq!(
            status("c", &k),
            (403, "Audiences in Jwt are not allowed".into())
        );
        assert_eq!(
            status("d", &k),
            (401, "Jwt issuer is not configured".into())
        );
        assert_eq!(status("", &k), (401, "Jwt issuer is not configured".into()));
        assert_eq!(
            status("a", &other),
            (
                401,
                "Jwks doesn't have key to match kid or alg from Jwt".into()
            )
        );
    }

    #[test]
    fn forward_original_token_and_cache() {
        let k = TestKey::new("RS256", "k");
        let (e, cache) = engine(
            &ra(&rule("iss", &k, "    forwardOriginalToken: true\n")),
            100,
        );
        let t = k.token(json!({"iss": "iss", "sub": "s", "exp": jwt::now_secs() + 600}));
        let d = decide(&e, "GET", "/", &[("authorization", &bearer(&t))]);
        assert!(
            d.allowed()
                && !d
                    .forward()
                    .unwrap()
                    .remove_headers
                    .contains(&http::header::AUTHORIZATION)
        );
        assert_eq!(cache.len(), 1);
        assert!(
            decide(&e, "GET", "/", &[("authorization", &bearer(&t))]).allowed(),
            "cache hit"
        );
        let (off, cache) = engine(&ra(&rule("iss", &k, "")), 0);
        assert!(decide(&off, "GET", "/", &[("authorization", &bearer(&t))]).allowed());
        assert!(cache.is_empty());
    }

    #[test]
    fn malformed_requests_get_400_and_paths_are_normalized() {
        let (e, _) = engine("", 0);
        assert_eq!(decide(&e, "get", "/", &[]).status(), 400);
        assert_eq!(decide(&e, "GET", "/a%00", &[]).status(), 400);
        assert_eq!(
            decide(&e, "GET", "/adm%6%39n", &[]).status(),
            400,
            "a stray % would decode to a new escape"
        );
        assert_eq!(
            decide(&e, "GET", "/a/../b/%2e/c#frag", &[])
                .forward()
                .unwrap()
                .target
                .as_deref(),
            Some("/b/c")
        );
    }
}
