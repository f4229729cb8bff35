//! AuthorizationPolicy YAML -> what the engine evaluates (`authz::Compiled`). Compiling is
//! validating: `validate`, the agent and `check` all come through `Compiled::try_new`, so a rule
//! that is accepted is enforced with every field and condition it has.
use ipnet::IpNet;

use crate::{
    authz::{
        claim_path, parse_cidr, template, CCond, COp, CRule, CSource, Compiled, Field, Key,
        ReqPrincipal, StrMatch,
    },
    policy::{
        load::AuthorizationPolicy,
        types::{Action, Condition, Operation, Rule, Source},
    },
};

/// A value or field the engine cannot enforce as written: the policy is refused. `near` is text
/// of the YAML to point the `file:line` at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub near: String,
    pub message: String,
}

impl<T> Field<T> {
    /// Every value converted, or one error per value that cannot be (`name` is the YAML field).
    pub(crate) fn try_new(
        name: &str,
        pos: &Option<Vec<String>>,
        neg: &Option<Vec<String>>,
        f: impl Fn(&str) -> Result<T, String>,
        errors: &mut Vec<CompileError>,
    ) -> Field<T> {
        let mut conv = |v: &Option<Vec<String>>, field: String| {
            v.as_ref().map(|v| {
                v.iter()
                    .filter_map(|x| match f(x) {
                        Ok(t) => Some(t),
                        Err(message) => {
                            errors.push(CompileError {
                                near: x.clone(),
                                message: format!("{field}: {x:?} {message}"),
                            });
                            None
                        }
                    })
                    .collect()
            })
        };
        let (pos_name, neg_name) = if name.contains('.') || name.contains('[') {
            (format!("{name} values"), format!("{name} notValues"))
        } else {
            let mut c = name.chars();
            let first = c.next().map(|f| f.to_ascii_uppercase()).unwrap_or_default();
            (name.to_string(), format!("not{first}{}", c.as_str()))
        };
        Field {
            pos: conv(pos, pos_name),
            neg: conv(neg, neg_name),
        }
    }
}

impl Compiled {
    /// The one conversion from YAML types to what is evaluated; `validate`, the agent and
    /// `check` all go through it, so a rule accepted is enforced whole: nothing is dropped.
    pub fn try_new(p: &AuthorizationPolicy) -> Result<Compiled, Vec<CompileError>> {
        let ns = p.namespace.clone();
        let mut errors = Vec::new();
        let rules = p.spec.rules.as_ref().map(|rs| {
            rs.iter()
                .enumerate()
                .map(|(i, r)| compile_rule(r, &ns, &format!("rules[{i}]"), &mut errors))
                .collect()
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Compiled {
            id: p.id(),
            namespace: ns,
            action: p.spec.action,
            dry_run: p
                .metadata
                .annotations
                .get("istio.io/dry-run")
                .is_some_and(|v| v == "true"),
            selector: p.spec.selector.as_ref().map(|s| s.match_labels.clone()),
            has_target_refs: p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty(),
            provider: p.spec.provider.as_ref().map(|x| x.name.clone()),
            rules,
        })
    }

    /// Stands in for a policy that cannot be compiled (never the case for one that passed
    /// validation): it denies every request it could apply to, never allows more.
    pub fn deny_all(p: &AuthorizationPolicy) -> Compiled {
        Compiled {
            id: p.id(),
            namespace: p.namespace.clone(),
            action: Action::Deny,
            dry_run: false,
            selector: p.spec.selector.as_ref().map(|s| s.match_labels.clone()),
            has_target_refs: p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty(),
            provider: None,
            rules: Some(vec![CRule {
                from: None,
                to: None,
                when: vec![],
                http_only: false,
            }]),
        }
    }
}

fn compile_rule(r: &Rule, ns: &str, at: &str, errors: &mut Vec<CompileError>) -> CRule {
    let mark = errors.len();
    // Istio refuses an empty `from`/`to` and an empty source or operation: each would otherwise
    // silently match nothing (or everything).
    let mut refuse = |near: &str, message: String| {
        errors.push(CompileError {
            near: near.into(),
            message,
        })
    };
    if r.from.as_ref().is_some_and(Vec::is_empty) {
        refuse("from:", "from must not be empty".into());
    }
    if r.to.as_ref().is_some_and(Vec::is_empty) {
        refuse("to:", "to must not be empty".into());
    }
    let mut sources = Vec::new();
    for (j, f) in r.from.iter().flatten().enumerate() {
        match &f.source {
            Some(s) if *s != Source::default() => sources.push((j, s)),
            _ => refuse("from:", format!("from[{j}]: source must not be empty")),
        }
    }
    let mut operations = Vec::new();
    for (j, t) in r.to.iter().flatten().enumerate() {
        match &t.operation {
            Some(o) if *o != Operation::default() => operations.push((j, o)),
            _ => refuse("to:", format!("to[{j}]: operation must not be empty")),
        }
    }
    let from: Option<Vec<CSource>> = r.from.as_ref().map(|_| {
        sources
            .iter()
            .map(|(j, s)| {
                within(errors, &format!("from[{j}].source"), |e| {
                    compile_source(s, ns, e)
                })
            })
            .collect()
    });
    let to: Option<Vec<COp>> = r.to.as_ref().map(|_| {
        operations
            .iter()
            .map(|(j, o)| within(errors, &format!("to[{j}].operation"), |e| compile_op(o, e)))
            .collect()
    });
    let when: Vec<CCond> = r
        .when
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(j, c)| match compile_cond(c, errors) {
            Ok(c) => Some(c),
            Err(message) => {
                errors.push(CompileError {
                    near: c.key.clone(),
                    message: format!("when[{j}]: {message}"),
                });
                None
            }
        })
        .collect();
    let http_only = from.iter().flatten().any(|s| s.request_principals.is_set())
        || to
            .iter()
            .flatten()
            .any(|o| o.hosts.is_set() || o.methods.is_set() || o.paths.is_set())
        || when.iter().any(|c| c.http_only());
    for e in &mut errors[mark..] {
        e.message = format!("{at}: {}", e.message);
    }
    CRule {
        from,
        to,
        when,
        http_only,
    }
}

/// Runs `f`, prefixing the errors it adds with where they are.
fn within<T>(
    errors: &mut Vec<CompileError>,
    at: &str,
    f: impl FnOnce(&mut Vec<CompileError>) -> T,
) -> T {
    let mark = errors.len();
    let out = f(errors);
    for e in &mut errors[mark..] {
        e.message = format!("{at}: {}", e.message);
    }
    out
}

fn ip(v: &str) -> Result<IpNet, String> {
    parse_cidr(v).ok_or_else(|| "is not an IP address or CIDR".to_string())
}

fn port(v: &str) -> Result<u16, String> {
    v.parse().map_err(|_| "is not a port (0-65535)".to_string())
}

fn compile_source(s: &Source, ns: &str, errors: &mut Vec<CompileError>) -> CSource {
    let sa = |v: &str| -> Result<(Option<String>, String), String> {
        Ok(match v.split_once('/') {
            Some((n, a)) => (Some(n.to_string()), a.to_string()),
            None => (Some(ns.to_string()), v.to_string()),
        })
    };
    let any = |v: &str| Ok(StrMatch::new(v));
    CSource {
        principals: Field::try_new("principals", &s.principals, &s.not_principals, any, errors),
        request_principals: Field::try_new(
            "requestPrincipals",
            &s.request_principals,
            &s.not_request_principals,
            |v| Ok(ReqPrincipal::new(v)),
            errors,
        ),
        namespaces: Field::try_new("namespaces", &s.namespaces, &s.not_namespaces, any, errors),
        service_accounts: Field::try_new(
            "serviceAccounts",
            &s.service_accounts,
            &s.not_service_accounts,
            sa,
            errors,
        ),
        trust_domains: Field::try_new(
            "trustDomains",
            &s.trust_domains,
            &s.not_trust_domains,
            any,
            errors,
        ),
        ip_blocks: Field::try_new("ipBlocks", &s.ip_blocks, &s.not_ip_blocks, ip, errors),
        remote_ip_blocks: Field::try_new(
            "remoteIpBlocks",
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            ip,
            errors,
        ),
    }
}

fn compile_op(o: &Operation, errors: &mut Vec<CompileError>) -> COp {
    let path = |v: &str| -> Result<StrMatch, String> {
        if v.contains('{') || v.contains('}') {
            return template::compile(v)
                .map(StrMatch::Template)
                .map_err(|e| format!(": {e}"));
        }
        Ok(StrMatch::new(v))
    };
    COp {
        hosts: Field::try_new(
            "hosts",
            &o.hosts,
            &o.not_hosts,
            |v| Ok(StrMatch::lower(v)),
            errors,
        ),
        ports: Field::try_new("ports", &o.ports, &o.not_ports, port, errors),
        methods: Field::try_new(
            "methods",
            &o.methods,
            &o.not_methods,
            |v| Ok(StrMatch::new(v)),
            errors,
        ),
        paths: Field::try_new("paths", &o.paths, &o.not_paths, path, errors),
    }
}

/// The attribute a `when` key names; Err for a key Istio refuses.
fn condition_key(k: &str) -> Result<Key, String> {
    if let Some(rest) = k.strip_prefix("request.headers[") {
        let name = rest
            .strip_suffix(']')
            .filter(|n| !n.is_empty() && !n.contains(['[', ']']))
            .ok_or_else(|| format!("{k:?} must be request.headers[<name>]"))?;
        return Ok(match name {
            ":authority" => Key::Authority,
            ":method" => Key::Method,
            ":path" => Key::Path,
            ":scheme" => Key::Scheme,
            // Any other name that no HTTP request can carry: accepted, and never matches.
            _ => match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => Key::Header(h),
                Err(_) => Key::Never,
            },
        });
    }
    if let Some(rest) = k.strip_prefix("request.auth.claims") {
        return claim_path(rest)
            .map(Key::AuthClaim)
            .ok_or_else(|| format!("{k:?} must be request.auth.claims[<name>]..."));
    }
    if k.starts_with("experimental.envoy.filters.") {
        return if k.ends_with(']') && k.contains('[') {
            Ok(Key::Experimental)
        } else {
            Err(format!("unknown attribute {k:?}"))
        };
    }
    Ok(match k {
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
        _ => return Err(format!("unknown attribute {k:?}")),
    })
}

fn compile_cond(c: &Condition, errors: &mut Vec<CompileError>) -> Result<CCond, String> {
    let k = c.key.as_str();
    let key = condition_key(k)?;
    if c.values.is_none() && c.not_values.is_none() {
        return Err(format!(
            "{k}: at least one of values or notValues must be set"
        ));
    }
    let strs = |errors: &mut Vec<CompileError>| {
        Field::try_new(
            k,
            &c.values,
            &c.not_values,
            |v| Ok(StrMatch::new(v)),
            errors,
        )
    };
    let ips =
        |errors: &mut Vec<CompileError>| Field::try_new(k, &c.values, &c.not_values, ip, errors);
    Ok(match key {
        Key::Header(name) => CCond::Header(name, strs(errors)),
        Key::Authority => CCond::Authority(strs(errors)),
        Key::Method => CCond::Method(strs(errors)),
        Key::Path => CCond::Path(strs(errors)),
        Key::Scheme => CCond::Scheme(strs(errors)),
        Key::Never => CCond::Never,
        Key::SourceIp => CCond::SourceIp(ips(errors)),
        Key::RemoteIp => CCond::RemoteIp(ips(errors)),
        Key::SourceNamespace => CCond::SourceNamespace(strs(errors)),
        Key::SourcePrincipal => CCond::SourcePrincipal(strs(errors)),
        Key::SourceServiceAccount => CCond::SourceServiceAccount(strs(errors)),
        Key::SourceTrustDomain => CCond::SourceTrustDomain(strs(errors)),
        Key::AuthPrincipal => CCond::AuthPrincipal(Field::try_new(
            k,
            &c.values,
            &c.not_values,
            |v| Ok(ReqPrincipal::new(v)),
            errors,
        )),
        Key::AuthAudiences => CCond::AuthAudiences(strs(errors)),
        Key::AuthPresenter => CCond::AuthPresenter(strs(errors)),
        Key::AuthClaim(path) => CCond::AuthClaim(path, strs(errors)),
        Key::DestinationIp => CCond::DestinationIp(ips(errors)),
        Key::DestinationPort => {
            CCond::DestinationPort(Field::try_new(k, &c.values, &c.not_values, port, errors))
        }
        Key::Sni => CCond::Sni(strs(errors)),
        Key::Experimental => CCond::Experimental(strs(errors)),
    })
}
