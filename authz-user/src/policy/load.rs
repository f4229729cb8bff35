//! Loading Istio YAML from files and folders (multi-document), with `file:line` for every
//! problem. Resources of other kinds are skipped and reported.
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use super::{
    types::{AuthorizationPolicySpec, Metadata, RequestAuthenticationSpec},
    validate,
};

/// Where a resource came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    /// 1-based line of the document's first line.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resource<S> {
    pub name: String,
    pub namespace: String,
    pub metadata: Metadata,
    pub spec: S,
    pub origin: Origin,
}

impl<S> Resource<S> {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

pub type RequestAuthentication = Resource<RequestAuthenticationSpec>;
pub type AuthorizationPolicy = Resource<AuthorizationPolicySpec>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: Arc<str>,
    pub line: usize,
    pub message: String,
    /// Warnings are reported but do not make the input invalid.
    pub warning: bool,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.warning {
            write!(f, "{}:{}: warning: {}", self.file, self.line, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

/// Everything loaded from a set of paths.
#[derive(Debug, Default, Clone)]
pub struct PolicySet {
    pub request_authentications: Vec<RequestAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// MeshConfig `extensionProviders` of the ext_authz kinds (CUSTOM), each where it came from.
    pub extension_providers: Vec<(crate::extauthz::ProviderSpec, Origin)>,
    pub problems: Vec<Problem>,
}

impl PolicySet {
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| !p.warning)
    }
    pub fn is_valid(&self) -> bool {
        self.errors().next().is_none()
    }
}

/// The policies of an agent config: its policy files, and its `extensionProviders`.
pub fn load_config(cfg: &crate::config::Config) -> PolicySet {
    let mut set = load_paths(&cfg.policies);
    add_config_providers(&mut set, cfg);
    set.check_custom();
    set
}

/// The config's `extensionProviders`, each with its `file:line`.
pub fn add_config_providers(set: &mut PolicySet, cfg: &crate::config::Config) {
    let file = cfg
        .origin
        .as_ref()
        .map_or("config".to_string(), |p| p.display().to_string());
    let text = cfg
        .origin
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let origins = cfg
        .extension_providers
        .iter()
        .map(|p| Origin {
            file: file.as_str().into(),
            line: provider_line(&text, &p.name),
        })
        .collect();
    set.add_providers(cfg.extension_providers.clone(), origins);
}

/// MeshConfig YAML (the `mesh` key of Istio's ConfigMap): its ext_authz `extensionProviders`.
/// Unparseable MeshConfig is a problem at `origin`; its other fields are not this agent's.
pub fn add_mesh_providers(set: &mut PolicySet, mesh: &str, origin: &str) {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Mesh {
        #[serde(default)]
        extension_providers: Vec<crate::extauthz::ProviderSpec>,
    }
    let parsed: Result<Option<Mesh>, _> = serde_yaml::from_str(mesh);
    let specs = match parsed {
        Ok(m) => m.unwrap_or_default().extension_providers,
        Err(e) => {
            set.problems.push(Problem {
                file: origin.into(),
                line: e.location().map_or(1, |l| l.line()),
                message: format!("MeshConfig is not valid YAML: {e}"),
                warning: false,
            });
            return;
        }
    };
    let origins = specs
        .iter()
        .map(|p| Origin {
            file: origin.into(),
            line: provider_line(mesh, &p.name),
        })
        .collect();
    set.add_providers(specs, origins);
}

/// The line of `name: <name>` under `extensionProviders:` (1 when not found).
fn provider_line(text: &str, name: &str) -> usize {
    let mut under = false;
    for (i, l) in text.lines().enumerate() {
        if l.starts_with("extensionProviders:") {
            under = true;
            continue;
        }
        if under {
            let t = l.trim_start().trim_start_matches("- ").trim();
            if let Some(v) = t.strip_prefix("name:") {
                if v.trim().trim_matches(|c| c == '"' || c == '\'') == name {
                    return i + 1;
                }
            }
        }
    }
    1
}

impl PolicySet {
    /// Adds MeshConfig `extensionProviders` (entries of the ext_authz kinds; others are not
    /// this agent's and are left out), each checked as istiod checks it.
    pub fn add_providers(
        &mut self,
        specs: Vec<crate::extauthz::ProviderSpec>,
        origins: Vec<Origin>,
    ) {
        let mut seen = std::collections::HashSet::new();
        for (i, (spec, origin)) in specs.into_iter().zip(origins).enumerate() {
            if !spec.is_ext_authz() {
                continue;
            }
            let mut problem = |message: String| {
                self.problems.push(Problem {
                    file: origin.file.clone(),
                    line: origin.line,
                    message,
                    warning: false,
                })
            };
            if !seen.insert(spec.name.clone()) {
                problem(format!(
                    "extensionProviders[{i}]: provider name must be unique, found duplicate: {}",
                    spec.name
                ));
            }
            if let Err(errors) =
                crate::extauthz::Provider::compile(&spec, std::sync::Arc::new(|_: &str| None))
            {
                for e in errors {
                    problem(format!("extensionProviders[{i}] {:?}: {e}", spec.name));
                }
            }
            self.extension_providers.push((spec, origin));
        }
    }

    /// CUSTOM policies naming a provider that is not defined: reported; they stay in force
    /// and deny what they match (Istio's behaviour), so a missing provider never opens a path.
    pub fn check_custom(&mut self) {
        use crate::policy::types::Action;
        for p in &self.authorization_policies {
            if p.spec.action != Action::Custom {
                continue;
            }
            let name = p
                .spec
                .provider
                .as_ref()
                .map(|x| x.name.as_str())
                .unwrap_or("");
            if !self.extension_providers.iter().any(|(s, _)| s.name == name) {
                self.problems.push(Problem {
                    file: p.origin.file.clone(),
                    line: p.origin.line,
                    message: format!(
                        "{}: CUSTOM provider {name:?} is not among the extensionProviders: the requests this policy matches are denied",
                        p.id()
                    ),
                    warning: true,
                });
            }
        }
    }
}

/// Loads files and folders (recursively: *.yaml, *.yml, *.json), in a stable order.
pub fn load_paths(paths: &[PathBuf]) -> PolicySet {
    let mut set = PolicySet::default();
    for p in paths {
        let mut files = Vec::new();
        collect(p, &mut files, &mut set);
        files.sort();
        for f in files {
            match std::fs::read_to_string(&f) {
                Ok(text) => load_str(&text, &f.display().to_string(), &mut set),
                Err(e) => set.problems.push(Problem {
                    file: f.display().to_string().into(),
                    line: 0,
                    message: format!("cannot read: {e}"),
                    warning: false,
                }),
            }
        }
    }
    set
}

fn collect(p: &Path, out: &mut Vec<PathBuf>, set: &mut PolicySet) {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => match std::fs::read_dir(p) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let path = e.path();
                    let is_yaml = path
                        .extension()
                        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json");
                    if path.is_dir() || is_yaml {
                        collect(&path, out, set);
                    }
                }
            }
            Err(e) => set.problems.push(Problem {
                file: p.display().to_string().into(),
                line: 0,
                message: format!("cannot read folder: {e}"),
                warning: false,
            }),
        },
        Ok(_) => out.push(p.to_path_buf()),
        Err(e) => set.problems.push(Problem {
            file: p.display().to_string().into(),
            line: 0,
            message: format!("cannot read: {e}"),
            warning: false,
        }),
    }
}

#[derive(Deserialize)]
struct Head {
    #[serde(default, rename = "apiVersion")]
    api_version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc<S> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: S,
    #[serde(default)]
    #[serde(rename = "status")]
    _status: Option<serde_yaml::Value>,
}

/// Splits a YAML stream at `---` lines; returns (first line, text) per document.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") && line[3..].trim().is_empty() || line.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((start, cur));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

pub fn load_str(text: &str, file: &str, set: &mut PolicySet) {
    let file: Arc<str> = file.into();
    for (start, doc) in documents(text) {
        let err = |e: serde_yaml::Error| {
            let line = e.location().map(|l| l.line()).unwrap_or(1) + start - 1;
            let msg = e.to_string();
            // serde_yaml appends " at line N column M": the prefix already says where.
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            Problem {
                file: file.clone(),
                line,
                message: msg,
                warning: false,
            }
        };
        let head: Head = match serde_yaml::from_str(&doc) {
            Ok(h) => h,
            Err(e) => {
                set.problems.push(err(e));
                continue;
            }
        };
        let istio = matches!(
            head.api_version.as_str(),
            "security.istio.io/v1" | "security.istio.io/v1beta1"
        );
        let origin = Origin {
            file: file.clone(),
            line: start,
        };
        match (istio, head.kind.as_str()) {
            (true, "RequestAuthentication") => match serde_yaml::from_str::<Doc<RequestAuthenticationSpec>>(&doc) {
                Ok(d) => {
                    let r = resource(d.metadata, d.spec, origin);
                    let problems = validate::request_authentication(&r, &doc);
                    let bad = problems.iter().any(|p| !p.warning);
                    set.problems.extend(problems);
                    if !bad {
                        set.request_authentications.push(r);
                    }
                }
                Err(e) => set.problems.push(err(e)),
            },
            (true, "AuthorizationPolicy") => match serde_yaml::from_str::<Doc<AuthorizationPolicySpec>>(&doc) {
                Ok(d) => {
                    let r = resource(d.metadata, d.spec, origin);
                    let problems = validate::authorization_policy(&r, &doc);
                    let bad = problems.iter().any(|p| !p.warning);
                    set.problems.extend(problems);
                    if !bad {
                        set.authorization_policies.push(r);
                    }
                }
                Err(e) => set.problems.push(err(e)),
            },
            _ => set.problems.push(Problem {
                file: file.clone(),
                line: start,
                message: format!(
                    "skipped: {} {} is not a security.istio.io/v1 or v1beta1 RequestAuthentication or AuthorizationPolicy",
                    if head.api_version.is_empty() { "<no apiVersion>" } else { &head.api_version },
                    if head.kind.is_empty() { "<no kind>" } else { &head.kind }
                ),
                warning: true,
            }),
        }
    }
}

fn resource<S>(metadata: Metadata, spec: S, origin: Origin) -> Resource<S> {
    Resource {
        name: metadata.name.clone(),
        namespace: metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
        metadata,
        spec,
        origin,
    }
}

/// 1-based line (absolute) of the first line in `doc` containing `needle`, else the document start.
pub fn line_of(doc: &str, start: usize, needle: &str) -> usize {
    doc.lines()
        .position(|l| l.contains(needle))
        .map(|i| start + i)
        .unwrap_or(start)
}
