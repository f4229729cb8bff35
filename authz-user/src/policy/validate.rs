//! Validation as Istio's admission does it, each problem at the line it concerns.
use std::sync::Arc;

use super::{
    load::{line_of, AuthorizationPolicy, Problem, RequestAuthentication},
    types::{Action, Condition, Source},
};
use crate::jwt::keys::Jwks;

struct Report<'a> {
    file: Arc<str>,
    doc: &'a str,
    start: usize,
    out: Vec<Problem>,
}

impl Report<'_> {
    fn err(&mut self, near: &str, message: String) {
        let line = line_of(self.doc, self.start, near);
        self.out.push(Problem {
            file: self.file.clone(),
            line,
            message,
            warning: false,
        });
    }
    fn warn(&mut self, near: &str, message: String) {
        let line = line_of(self.doc, self.start, near);
        self.out.push(Problem {
            file: self.file.clone(),
            line,
            message,
            warning: true,
        });
    }
}

pub fn request_authentication(r: &RequestAuthentication, doc: &str) -> Vec<Problem> {
    let mut rep = Report {
        file: r.origin.file.clone(),
        doc,
        start: r.origin.line,
        out: vec![],
    };
    let id = format!("RequestAuthentication {}", r.id());
    if r.name.is_empty() {
        rep.err("metadata", format!("{id}: metadata.name is required"));
    }
    let has_refs = r.spec.target_ref.is_some() || !r.spec.target_refs.is_empty();
    if has_refs && r.spec.selector.is_some() {
        rep.err(
            "targetRef",
            format!("{id}: only one of targetRefs or workloadSelector can be set"),
        );
    } else if has_refs {
        rep.warn("targetRef", format!("{id}: targetRefs attach to gateways and waypoints, which this agent does not run; the policy is ignored"));
    }
    for (i, rule) in r.spec.jwt_rules.iter().enumerate() {
        let at = format!("{id}: jwtRules[{i}]");
        if rule.issuer.is_empty() && rule.jwks_uri.is_empty() {
            rep.err("jwtRules", format!("{at}: issuer or jwksUri must be set"));
        }
        if !rule.jwks.is_empty() && !rule.jwks_uri.is_empty() {
            rep.err(
                "jwksUri",
                format!("{at}: only one of jwks or jwksUri can be set"),
            );
        }
        if !rule.jwks_uri.is_empty() {
            match http::Uri::try_from(rule.jwks_uri.as_str()) {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http") | Some("https"))
                        && u.host().is_some() => {}
                _ => rep.err(
                    "jwksUri",
                    format!(
                        "{at}: jwksUri {:?} is not an http or https URL",
                        rule.jwks_uri
                    ),
                ),
            }
        }
        if !rule.jwks.is_empty() {
            match Jwks::parse(rule.jwks.as_bytes()) {
                Ok(j) if j.has_private_material => {
                    rep.warn("jwks", format!("{at}: jwks contains private key material"))
                }
                Ok(_) => {}
                Err(e) => rep.err("jwks", format!("{at}: jwks: {e}")),
            }
        }
        if rule.audiences.iter().any(String::is_empty) {
            rep.err(
                "audiences",
                format!("{at}: audiences must not contain an empty value"),
            );
        }
        for h in &rule.from_headers {
            if h.name.is_empty() {
                rep.err("fromHeaders", format!("{at}: fromHeaders name is required"));
            } else if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                rep.err(
                    "fromHeaders",
                    format!("{at}: fromHeaders name {:?} is not a header name", h.name),
                );
            }
        }
        if rule.from_params.iter().any(String::is_empty) {
            rep.err(
                "fromParams",
                format!("{at}: fromParams must not contain an empty value"),
            );
        }
        if rule.from_cookies.iter().any(String::is_empty) {
            rep.err(
                "fromCookies",
                format!("{at}: fromCookies must not contain an empty value"),
            );
        }
        if !rule.output_payload_to_header.is_empty()
            && http::HeaderName::from_bytes(rule.output_payload_to_header.as_bytes()).is_err()
        {
            rep.err(
                "outputPayloadToHeader",
                format!(
                    "{at}: outputPayloadToHeader {:?} is not a header name",
                    rule.output_payload_to_header
                ),
            );
        }
        for c in &rule.output_claim_to_headers {
            if c.header.is_empty() || c.claim.is_empty() {
                rep.err(
                    "outputClaimToHeaders",
                    format!("{at}: outputClaimToHeaders needs both header and claim"),
                );
            } else if !c
                .header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                rep.err(
                    "outputClaimToHeaders",
                    format!(
                        "{at}: outputClaimToHeaders header {:?} must match ^[-_A-Za-z0-9]+$",
                        c.header
                    ),
                );
            }
        }
        if let Some(t) = &rule.timeout {
            match humantime::parse_duration(t) {
                Ok(d) if !d.is_zero() => {}
                _ => rep.err(
                    "timeout",
                    format!("{at}: timeout {t:?} is not a positive duration"),
                ),
            }
        }
        if rule.space_delimited_claims.iter().any(String::is_empty) {
            rep.err(
                "spaceDelimitedClaims",
                format!("{at}: spaceDelimitedClaims must not contain an empty value"),
            );
        }
    }
    rep.out
}

pub fn authorization_policy(r: &AuthorizationPolicy, doc: &str) -> Vec<Problem> {
    let mut rep = Report {
        file: r.origin.file.clone(),
        doc,
        start: r.origin.line,
        out: vec![],
    };
    let id = format!("AuthorizationPolicy {}", r.id());
    let spec = &r.spec;
    if r.name.is_empty() {
        rep.err("metadata", format!("{id}: metadata.name is required"));
    }
    let has_refs = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    if has_refs && spec.selector.is_some() {
        rep.err(
            "targetRef",
            format!("{id}: only one of targetRefs or workloadSelector can be set"),
        );
    } else if has_refs {
        rep.warn("targetRef", format!("{id}: targetRefs attach to gateways and waypoints, which this agent does not run; the policy is ignored"));
    }
    if spec.provider.is_some() && spec.action != Action::Custom {
        rep.err(
            "provider",
            format!("{id}: provider must only be set with action CUSTOM"),
        );
    }
    if matches!(spec.action, Action::Deny | Action::Custom) && spec.rules.is_none() {
        let action = if spec.action == Action::Deny {
            "DENY"
        } else {
            "CUSTOM"
        };
        rep.err("action", format!("{id}: a {action} policy without rules is meaningless; add an empty rule `{{}}` to match every request"));
    }
    if spec.action == Action::Custom && spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
        rep.err(
            "provider",
            format!("{id}: a CUSTOM policy must name its provider"),
        );
    }
    if r.metadata
        .annotations
        .get("istio.io/dry-run")
        .is_some_and(|v| v != "true" && v != "false")
    {
        rep.err(
            "istio.io/dry-run",
            format!("{id}: annotation istio.io/dry-run must be \"true\" or \"false\""),
        );
    }
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let at = format!("{id}: rules[{i}]");
        for (j, f) in rule.from.iter().flatten().enumerate() {
            if let Some(s) = &f.source {
                source(&mut rep, &format!("{at}: from[{j}].source"), s, spec.action);
            }
        }
        for (j, c) in rule.when.iter().flatten().enumerate() {
            condition(&mut rep, &format!("{at}: when[{j}]"), c, spec.action);
        }
    }
    // Values are checked by compiling them, the same conversion the engine uses: a rule that
    // passes here is enforced whole.
    if let Err(errors) = crate::authz::Compiled::try_new(r) {
        for e in errors {
            rep.err(&e.near, format!("{id}: {}", e.message));
        }
    }
    rep.out
}

fn source(rep: &mut Report, at: &str, s: &Source, action: Action) {
    if (s.service_accounts.is_some() || s.not_service_accounts.is_some())
        && (s.principals.is_some()
            || s.not_principals.is_some()
            || s.namespaces.is_some()
            || s.not_namespaces.is_some())
    {
        rep.err(
            "serviceAccounts",
            format!("{at}: serviceAccounts cannot be combined with principals or namespaces"),
        );
    }
    for (name, v) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        if let Some(v) = v {
            if v.len() > 16 {
                rep.err(name, format!("{at}: {name}: at most 16 values"));
            }
            for x in v {
                if x.is_empty() || x.contains('*') || x.len() > 320 || x.matches('/').count() > 1 {
                    rep.err(name, format!("{at}: {name}: {x:?} must be <namespace>/<name> or <name>, without wildcards"));
                }
            }
        }
    }
    for (name, v) in [
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ] {
        for x in v.iter().flatten() {
            let stars = x.matches('*').count();
            if x.contains('/')
                || stars > 1
                || (stars == 1 && !(x.starts_with('*') || x.ends_with('*')))
            {
                rep.err(name, format!("{at}: {name}: {x:?} must not contain '/' and may have one '*' at the start or end"));
            }
        }
    }
    if action == Action::Custom
        && (s.principals.is_some()
            || s.not_principals.is_some()
            || s.request_principals.is_some()
            || s.not_request_principals.is_some()
            || s.namespaces.is_some()
            || s.not_namespaces.is_some()
            || s.service_accounts.is_some()
            || s.not_service_accounts.is_some()
            || s.trust_domains.is_some()
            || s.not_trust_domains.is_some())
    {
        rep.err(
            "source",
            format!("{at}: identity fields are not supported with CUSTOM"),
        );
    }
}

fn condition(rep: &mut Report, at: &str, c: &Condition, action: Action) {
    let k = c.key.as_str();
    if action == Action::Custom
        && (k.starts_with("request.auth.")
            || matches!(
                k,
                "source.namespace"
                    | "source.principal"
                    | "source.serviceAccount"
                    | "source.trustDomain"
            ))
    {
        rep.err(k, format!("{at}: {k} is not supported with CUSTOM"));
    }
}
