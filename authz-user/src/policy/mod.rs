//! Istio resources: types, loading with `file:line` problems, validation, and the index that
//! tells which policies apply to a workload.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use http::HeaderName;

use crate::{
    authz::Compiled,
    jwt::{
        extract::Location,
        keys::Jwks,
        remote::{JwksStore, RemoteJwks},
    },
    registry::Workload,
};

pub mod compile;
pub mod load;
pub mod types;
pub mod validate;

pub use load::{load_config, load_paths, load_str, PolicySet, Problem};

/// Where a rule's keys come from.
pub enum Keys {
    Inline(Arc<Jwks>),
    Remote(Arc<RemoteJwks>),
}

/// One compiled `jwtRules` entry.
pub struct Provider {
    /// Unique within the process: the verified-token cache is keyed by it.
    pub uid: u64,
    pub policy: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: Keys,
    pub locations: Vec<Location>,
    pub output_payload_to_header: Option<HeaderName>,
    pub forward_original_token: bool,
    pub claim_to_headers: Vec<(HeaderName, Vec<String>)>,
    pub space_delimited: Arc<Vec<String>>,
}

/// The CUSTOM provider of a workload: the one its CUSTOM policies name, or why none can be
/// asked (then the requests they match are denied, as istiod's "deny due to bad CUSTOM action").
#[derive(Debug, Clone)]
pub enum Custom {
    Provider(Arc<crate::extauthz::Provider>),
    Unusable(Arc<str>),
}

/// What applies to one workload, ready for the data path.
#[derive(Default)]
pub struct WorkloadPolicies {
    /// Set when a CUSTOM policy applies.
    pub custom: Option<Custom>,
    /// Sorted by issuer, as Istio does.
    pub providers: Vec<Arc<Provider>>,
    /// Where each issuer's providers are in `providers`.
    issuers: std::collections::HashMap<String, std::ops::Range<usize>>,
    /// How many providers (first in `providers`) accept any issuer.
    any_issuer: usize,
    pub authz: Vec<Arc<Compiled>>,
    /// Every location any provider reads, once.
    pub locations: Vec<Location>,
    /// Output headers of every provider: removed from every request (anti-spoofing).
    pub sanitize: Vec<HeaderName>,
}

impl WorkloadPolicies {
    /// The providers that may verify a token from `iss`, in order: those that accept any issuer,
    /// then those of `iss`. One hash lookup, so a workload with a thousand issuers costs a
    /// request what one with a single issuer does.
    pub fn providers_for<'a>(&'a self, iss: &str) -> impl Iterator<Item = &'a Arc<Provider>> {
        let of_iss = self.issuers.get(iss).cloned().unwrap_or_default();
        self.providers[..self.any_issuer]
            .iter()
            .chain(&self.providers[of_iss])
    }

    /// Sorts the providers by issuer, as Istio does, and indexes them by it.
    fn index_providers(&mut self) {
        self.providers.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        self.issuers.clear();
        for (i, p) in self.providers.iter().enumerate() {
            self.issuers
                .entry(p.issuer.clone())
                .and_modify(|r| r.end = i + 1)
                .or_insert(i..i + 1);
        }
        self.any_issuer = self.issuers.remove("").map_or(0, |r| r.end);
    }
}

struct RaEntry {
    namespace: String,
    selector: Option<BTreeMap<String, String>>,
    has_target_refs: bool,
    providers: Vec<Arc<Provider>>,
}

/// All loaded policies, by namespace.
pub struct PolicyIndex {
    root_namespace: String,
    /// Extension providers by name: compiled, or why not.
    providers: std::collections::HashMap<String, Result<Arc<crate::extauthz::Provider>, String>>,
    ras: Vec<RaEntry>,
    aps: Vec<Arc<Compiled>>,
    pub request_authentications: usize,
    pub authorization_policies: usize,
}

static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn selects(selector: &Option<BTreeMap<String, String>>, w: &Workload) -> bool {
    selector
        .as_ref()
        .is_none_or(|s| s.iter().all(|(k, v)| w.labels.get(k) == Some(v.as_str())))
}

impl PolicyIndex {
    pub fn build(
        set: &PolicySet,
        root_namespace: &str,
        store: Option<&Arc<JwksStore>>,
    ) -> PolicyIndex {
        let mut ras = Vec::new();
        for ra in &set.request_authentications {
            let mut providers = Vec::new();
            for rule in &ra.spec.jwt_rules {
                let keys = if !rule.jwks.is_empty() {
                    match Jwks::parse(rule.jwks.as_bytes()) {
                        Ok(j) => Keys::Inline(Arc::new(j)),
                        Err(_) => continue, // rejected by validation already
                    }
                } else {
                    let timeout = rule
                        .timeout
                        .as_deref()
                        .and_then(|t| humantime::parse_duration(t).ok())
                        .unwrap_or(Duration::from_secs(5));
                    match store {
                        Some(s) => Keys::Remote(s.get(
                            &rule.jwks_uri,
                            &rule.issuer,
                            &ra.namespace,
                            timeout,
                        )),
                        None => continue,
                    }
                };
                let mut locations: Vec<Location> = rule
                    .from_headers
                    .iter()
                    .filter_map(|h| {
                        Some(Location::Header {
                            name: HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                            prefix: h.prefix.clone(),
                        })
                    })
                    .collect();
                locations.extend(rule.from_params.iter().map(|p| Location::Param(p.clone())));
                locations.extend(
                    rule.from_cookies
                        .iter()
                        .map(|c| Location::Cookie(c.clone())),
                );
                if locations.is_empty() {
                    locations = Location::defaults();
                }
                let mut space: Vec<String> = vec!["scope".into(), "permission".into()];
                space.extend(rule.space_delimited_claims.iter().cloned());
                providers.push(Arc::new(Provider {
                    uid: NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    policy: ra.id(),
                    issuer: rule.issuer.clone(),
                    audiences: rule.audiences.clone(),
                    keys,
                    locations,
                    output_payload_to_header: HeaderName::from_bytes(
                        rule.output_payload_to_header.as_bytes(),
                    )
                    .ok(),
                    forward_original_token: rule.forward_original_token,
                    claim_to_headers: rule
                        .output_claim_to_headers
                        .iter()
                        .filter_map(|c| {
                            Some((
                                HeaderName::from_bytes(c.header.as_bytes()).ok()?,
                                c.claim.split('.').map(String::from).collect(),
                            ))
                        })
                        .collect(),
                    space_delimited: Arc::new(space),
                }));
            }
            ras.push(RaEntry {
                namespace: ra.namespace.clone(),
                selector: ra.spec.selector.as_ref().map(|s| s.match_labels.clone()),
                has_target_refs: ra.spec.target_ref.is_some() || !ra.spec.target_refs.is_empty(),
                providers,
            });
        }
        let aps = set
            .authorization_policies
            .iter()
            .map(|p| {
                Arc::new(Compiled::try_new(p).unwrap_or_else(|errors| {
                    // Validation compiled it already, so this cannot happen; if it did, the
                    // policy denies rather than vanishes.
                    tracing::error!(policy = %p.id(), ?errors, "policy not compilable: it denies every request it applies to");
                    Compiled::deny_all(p)
                }))
            })
            .collect();
        let resolve: crate::extauthz::Resolver = match store {
            Some(s) => {
                let r = s.fetcher.resolver();
                Arc::new(move |host: &str| r(host, ""))
            }
            None => Arc::new(|_: &str| None),
        };
        let mut providers = std::collections::HashMap::new();
        for (spec, _) in &set.extension_providers {
            let compiled = crate::extauthz::Provider::compile(spec, resolve.clone())
                .map(Arc::new)
                .map_err(|e| format!("provider {:?} is invalid: {}", spec.name, e.join("; ")));
            // A name given twice is refused (validation says so); neither entry is used.
            let compiled = match providers.contains_key(&spec.name) {
                true => Err(format!(
                    "provider name {:?} is defined more than once",
                    spec.name
                )),
                false => compiled,
            };
            providers.insert(spec.name.clone(), compiled);
        }
        PolicyIndex {
            root_namespace: root_namespace.to_string(),
            providers,
            request_authentications: set.request_authentications.len(),
            authorization_policies: set.authorization_policies.len(),
            ras,
            aps,
        }
    }

    fn in_scope(&self, ns: &str, w: &Workload) -> bool {
        ns == self.root_namespace || ns == w.namespace
    }

    /// The policies that select `w`: root namespace + its namespace, selector subset match;
    /// policies with targetRefs never apply to workloads.
    pub fn for_workload(&self, w: &Workload) -> WorkloadPolicies {
        let mut out = WorkloadPolicies::default();
        for ra in &self.ras {
            if !ra.has_target_refs && self.in_scope(&ra.namespace, w) && selects(&ra.selector, w) {
                out.providers.extend(ra.providers.iter().cloned());
            }
        }
        out.index_providers();
        for p in &out.providers {
            for l in &p.locations {
                if !out.locations.contains(l) {
                    out.locations.push(l.clone());
                }
            }
            for h in p
                .output_payload_to_header
                .iter()
                .chain(p.claim_to_headers.iter().map(|(h, _)| h))
            {
                if !out.sanitize.contains(h) {
                    out.sanitize.push(h.clone());
                }
            }
        }
        out.authz = self
            .aps
            .iter()
            .filter(|p| {
                !p.has_target_refs && self.in_scope(&p.namespace, w) && selects(&p.selector, w)
            })
            .cloned()
            .collect();
        out.custom = self.custom_for(&out.authz);
        out
    }

    /// Istio's rule: one provider per workload.
    fn custom_for(&self, authz: &[Arc<Compiled>]) -> Option<Custom> {
        let mut names: Vec<&str> = authz
            .iter()
            .filter(|p| p.action == crate::policy::types::Action::Custom)
            .map(|p| p.provider.as_deref().unwrap_or(""))
            .collect();
        names.sort_unstable();
        names.dedup();
        match names.as_slice() {
            [] => None,
            [one] => Some(match self.providers.get(*one) {
                Some(Ok(p)) => Custom::Provider(p.clone()),
                Some(Err(e)) => Custom::Unusable(e.as_str().into()),
                None => Custom::Unusable(
                    format!("provider {one:?} is not among the extensionProviders").into(),
                ),
            }),
            many => Some(Custom::Unusable(
                format!("only one CUSTOM provider may apply to a workload, found {many:?}").into(),
            )),
        }
    }

    /// The extension providers by name (compiled, or why not).
    pub fn provider(&self, name: &str) -> Option<&Result<Arc<crate::extauthz::Provider>, String>> {
        self.providers.get(name)
    }
}
