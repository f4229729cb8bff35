//! An in-process Kubernetes API server for tests, over real HTTP on loopback: list and watch
//! (resourceVersion, ADDED / MODIFIED / DELETED, BOOKMARK, 410 Gone after compaction) for pods,
//! services, namespaces, ConfigMaps and Istio's RequestAuthentication and AuthorizationPolicy (served at
//! v1 and v1beta1, as one set of objects), the security.istio.io group document, and Events
//! (recorded for the test to read). Tests change objects and can restart it or expire watches.
//!
//! Every request is authorized as a real API server's RBAC would for the agent's ServiceAccount,
//! against the ClusterRole, the Role and their bindings in `deploy/kubernetes/rbac.yaml`: what they do not grant
//! gets 403 Forbidden (a `Status`), and what they grant but no request used is reported
//! (`unused_grants`). Errors carry `Status` bodies (404, 409, 410, 422), and a watch without the
//! resourceVersion a client must send after its list is refused.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Body, Frame, Incoming},
    Method, Request, Response, StatusCode,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// A collection served.
struct Kind {
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    /// In the core group (`/api/v1`), else Istio's.
    core: bool,
}

const fn kind(kind: &'static str, plural: &'static str, namespaced: bool, core: bool) -> Kind {
    Kind {
        kind,
        plural,
        namespaced,
        core,
    }
}

const KINDS: &[Kind] = &[
    kind("Pod", "pods", true, true),
    kind("Service", "services", true, true),
    kind("Namespace", "namespaces", false, true),
    kind("ConfigMap", "configmaps", true, true),
    kind(
        "RequestAuthentication",
        "requestauthentications",
        true,
        false,
    ),
    kind("AuthorizationPolicy", "authorizationpolicies", true, false),
];
const ISTIO: &str = "security.istio.io";

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    obj: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// plural -> "ns/name" -> object
    objects: HashMap<&'static str, BTreeMap<String, Value>>,
    log: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    events: Vec<Value>,
    lists: HashMap<&'static str, u64>,
    watches: HashMap<&'static str, u64>,
    uid: u64,
}

struct Shared {
    state: Mutex<State>,
    rbac: Rbac,
    changes: broadcast::Sender<Change>,
    /// Istio versions served (v1 and v1beta1 by default).
    istio_versions: Mutex<Vec<&'static str>>,
    bookmark_every: Duration,
    /// In-cluster mode: HTTPS with a test CA, and the service account token every request must
    /// carry (401 otherwise, as a real API server answers).
    tls: Option<InCluster>,
}

struct InCluster {
    acceptor: tokio_rustls::TlsAcceptor,
    ca_pem: String,
    token: String,
}

pub struct FakeApi {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FakeApi {
    pub fn start() -> Result<FakeApi> {
        FakeApi::start_with(None)
    }

    /// As a pod reaches it: HTTPS on 127.0.0.1 with a certificate for that address from a test
    /// CA, and a service account token required on every request. `service_account` writes
    /// what kubelet mounts, `service_env` what it sets.
    pub fn start_in_cluster() -> Result<FakeApi> {
        let (cfg, ca_pem) = crate::test_tls(&["127.0.0.1", "kubernetes.default.svc"])?;
        FakeApi::start_with(Some(InCluster {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            ca_pem,
            token: format!("sa-token-{}", std::process::id()),
        }))
    }

    /// The service account volume kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount.
    pub fn service_account(&self, dir: &Path) -> Result<()> {
        let Some(tls) = &self.shared.tls else {
            bail!("not started in-cluster");
        };
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), &tls.token)?;
        std::fs::write(dir.join("ca.crt"), &tls.ca_pem)?;
        std::fs::write(dir.join("namespace"), SERVICE_ACCOUNT.0)?;
        Ok(())
    }

    /// The environment kubelet gives every container for the API server.
    pub fn service_env(&self) -> Vec<(String, String)> {
        vec![
            ("KUBERNETES_SERVICE_HOST".into(), self.addr.ip().to_string()),
            (
                "KUBERNETES_SERVICE_PORT".into(),
                self.addr.port().to_string(),
            ),
        ]
    }

    fn start_with(tls: Option<InCluster>) -> Result<FakeApi> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            rbac: Rbac::from_manifest(&crate::tests_dir().join("../deploy/kubernetes/rbac.yaml"))?,
            state: Mutex::new(State {
                rv: 100,
                ..Default::default()
            }),
            changes,
            istio_versions: Mutex::new(vec!["v1", "v1beta1"]),
            bookmark_every: Duration::from_millis(200),
            tls,
        });
        let listener = rt.block_on(bind("127.0.0.1:0".parse()?))?;
        let addr = listener.local_addr()?;
        let server = rt.spawn(serve(shared.clone(), listener));
        Ok(FakeApi {
            shared,
            addr,
            rt,
            server: Mutex::new(Some(server)),
        })
    }

    /// Serve only these versions of security.istio.io (e.g. `["v1beta1"]`, an older Istio).
    pub fn serve_istio_versions(&self, versions: &[&'static str]) {
        *self.shared.istio_versions.lock().unwrap() = versions.to_vec();
    }

    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// The kubeconfig, written to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.kubeconfig())?;
        Ok(())
    }

    /// Creates or replaces an object (its `kind` picks the collection). Returns its resourceVersion.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let &Kind {
            plural, namespaced, ..
        } = KINDS
            .iter()
            .find(|k| k.kind == kind)
            .unwrap_or_else(|| panic!("fake API server: unknown kind {kind:?}"));
        let mut st = self.shared.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let key = object_key(&obj, namespaced);
        let existing = st.objects.get(plural).and_then(|m| m.get(&key)).cloned();
        let uid = match existing.as_ref() {
            Some(e) => e["metadata"]["uid"].clone(),
            None => match obj["metadata"]["uid"].as_str() {
                Some(u) => json!(u),
                None => {
                    st.uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012x}", st.uid))
                }
            },
        };
        obj["metadata"]["uid"] = uid;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let type_ = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects
            .entry(plural)
            .or_default()
            .insert(key, obj.clone());
        let change = Change {
            rv,
            plural,
            obj: json!({"type": type_, "object": obj}),
        };
        st.log.push(change.clone());
        let _ = self.shared.changes.send(change);
        rv
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let &Kind {
            plural, namespaced, ..
        } = KINDS.iter().find(|k| k.kind == kind).expect("kind");
        let key = if namespaced {
            format!("{namespace}/{name}")
        } else {
            name.to_string()
        };
        let mut st = self.shared.state.lock().unwrap();
        let Some(mut obj) = st.objects.get_mut(plural).and_then(|m| m.remove(&key)) else {
            return false;
        };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let change = Change {
            rv: st.rv,
            plural,
            obj: json!({"type": "DELETED", "object": obj}),
        };
        st.log.push(change.clone());
        let _ = self.shared.changes.send(change);
        true
    }

    /// Forgets history up to now, as etcd compaction does: a watch that resumes from an older
    /// resourceVersion gets 410 Gone and must list again.
    pub fn compact(&self) {
        let mut st = self.shared.state.lock().unwrap();
        st.compacted = st.rv;
        st.log.clear();
    }

    /// Compacts and ends every open watch, so every client relists.
    pub fn expire_watches(&self) {
        self.compact();
        self.stop();
        self.resume();
    }

    /// Drops every connection and stops listening (the objects stay).
    pub fn stop(&self) {
        if let Some(s) = self.server.lock().unwrap().take() {
            s.abort();
            let _ = self.rt.block_on(s);
        }
    }

    /// Listens again on the same address.
    pub fn resume(&self) {
        let listener = self
            .rt
            .block_on(async {
                for _ in 0..100 {
                    if let Ok(l) = bind(self.addr).await {
                        return Ok(l);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                bail!("cannot listen on {} again", self.addr)
            })
            .unwrap();
        *self.server.lock().unwrap() = Some(self.rt.spawn(serve(self.shared.clone(), listener)));
    }

    /// An API server restart: down for `down`, then back with the same objects and history.
    pub fn restart(&self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.resume();
    }

    /// Events posted or patched so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().events.clone()
    }

    /// Grants of the ClusterRole that no request used, as `verb group/resource` (least
    /// privilege: each is a permission the manifest could drop).
    pub fn unused_grants(&self) -> Vec<String> {
        self.shared.rbac.unused()
    }

    /// Requests refused as RBAC would, as `verb group/resource`.
    pub fn forbidden(&self) -> Vec<String> {
        self.shared.rbac.forbidden.lock().unwrap().clone()
    }

    /// How many lists and watches of a collection (plural) clients made.
    pub fn lists(&self, plural: &str) -> u64 {
        *self
            .shared
            .state
            .lock()
            .unwrap()
            .lists
            .get(plural)
            .unwrap_or(&0)
    }
    pub fn watches(&self, plural: &str) -> u64 {
        *self
            .shared
            .state
            .lock()
            .unwrap()
            .watches
            .get(plural)
            .unwrap_or(&0)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(s) = self.server.lock().unwrap().take() {
            s.abort();
        }
    }
}

/// The agent's permissions as `deploy/kubernetes/rbac.yaml` grants them.
/// (apiGroups, resources, verbs, the namespace of a Role's rule).
type Rule = (Vec<String>, Vec<String>, Vec<String>, Option<String>);

struct Rbac {
    /// (apiGroups, resources, verbs, namespace) of each rule: a ClusterRole's hold everywhere,
    /// a Role's in its namespace only.
    rules: Vec<Rule>,
    used: Mutex<BTreeSet<(String, String, String)>>,
    forbidden: Mutex<Vec<String>>,
}

const SERVICE_ACCOUNT: (&str, &str) = ("authz-system", "authz-agent");

impl Rbac {
    /// The rules of the ClusterRoles that ClusterRoleBindings grant the agent's ServiceAccount,
    /// and of the Roles that RoleBindings grant it (in their namespace).
    fn from_manifest(path: &Path) -> Result<Rbac> {
        use serde::Deserialize;
        let text = std::fs::read_to_string(path)?;
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).map_err(anyhow::Error::from))
            .collect::<Result<_>>()?;
        let bound: Vec<&str> = docs
            .iter()
            .filter(|d| d["kind"] == "ClusterRoleBinding" && d["roleRef"]["kind"] == "ClusterRole")
            .filter(|d| {
                d["subjects"].as_array().into_iter().flatten().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["namespace"] == SERVICE_ACCOUNT.0
                        && s["name"] == SERVICE_ACCOUNT.1
                })
            })
            .filter_map(|d| d["roleRef"]["name"].as_str())
            .collect();
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        };
        let rule = |r: &Value, ns: Option<String>| {
            (
                strings(&r["apiGroups"]),
                strings(&r["resources"]),
                strings(&r["verbs"]),
                ns,
            )
        };
        let mut rules: Vec<_> = docs
            .iter()
            .filter(|d| d["kind"] == "ClusterRole")
            .filter(|d| {
                d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| bound.contains(&n))
            })
            .flat_map(|d| d["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| rule(&r, None))
            .collect();
        let role_bound: Vec<(&str, &str)> = docs
            .iter()
            .filter(|d| d["kind"] == "RoleBinding" && d["roleRef"]["kind"] == "Role")
            .filter(|d| {
                d["subjects"].as_array().into_iter().flatten().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["namespace"] == SERVICE_ACCOUNT.0
                        && s["name"] == SERVICE_ACCOUNT.1
                })
            })
            .filter_map(|d| {
                Some((
                    d["metadata"]["namespace"].as_str()?,
                    d["roleRef"]["name"].as_str()?,
                ))
            })
            .collect();
        for d in docs.iter().filter(|d| d["kind"] == "Role") {
            let (Some(ns), Some(name)) = (
                d["metadata"]["namespace"].as_str(),
                d["metadata"]["name"].as_str(),
            ) else {
                continue;
            };
            if role_bound.contains(&(ns, name)) {
                for r in d["rules"].as_array().into_iter().flatten() {
                    rules.push(rule(r, Some(ns.to_string())));
                }
            }
        }
        Ok(Rbac {
            rules,
            used: Mutex::new(BTreeSet::new()),
            forbidden: Mutex::new(Vec::new()),
        })
    }

    fn allows(&self, group: &str, resource: &str, verb: &str, namespace: Option<&str>) -> bool {
        let any = |list: &[String], x: &str| list.iter().any(|v| v == x || v == "*");
        let ok = self.rules.iter().any(|(g, r, v, ns)| {
            any(g, group)
                && any(r, resource)
                && any(v, verb)
                && ns.as_deref().is_none_or(|ns| Some(ns) == namespace)
        });
        if ok {
            self.used
                .lock()
                .unwrap()
                .insert((group.into(), resource.into(), verb.into()));
        } else {
            self.forbidden
                .lock()
                .unwrap()
                .push(format!("{verb} {group}/{resource}"));
        }
        ok
    }

    fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut out = Vec::new();
        for (groups, resources, verbs, _) in &self.rules {
            for g in groups {
                for r in resources {
                    for v in verbs {
                        if !used.contains(&(g.clone(), r.clone(), v.clone())) {
                            out.push(format!("{v} {g}/{r}"));
                        }
                    }
                }
            }
        }
        out
    }
}

/// 403 as the API server words it for a ServiceAccount.
fn forbidden(group: &str, resource: &str, verb: &str, namespace: Option<&str>) -> Reply {
    let scope = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".into(),
    };
    let (ns, sa) = SERVICE_ACCOUNT;
    reply(
        StatusCode::FORBIDDEN,
        status(
            403,
            "Forbidden",
            &format!("{resource} is forbidden: User \"system:serviceaccount:{ns}:{sa}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}"),
        ),
    )
}

fn object_key(obj: &Value, namespaced: bool) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if namespaced {
        format!(
            "{}/{name}",
            obj["metadata"]["namespace"].as_str().unwrap_or("default")
        )
    } else {
        name.to_string()
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(128)
}

async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    // Connections live in this set: aborting the server task drops them all.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = {
                let shared = shared.clone();
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(authenticated(&shared, req).await) }
                })
            };
            let http = hyper::server::conn::http1::Builder::new();
            match &shared.tls {
                None => {
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                }
                Some(tls) => {
                    let Ok(stream) = tls.acceptor.accept(stream).await else {
                        return;
                    };
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

/// A response body fed from a channel (a watch stream).
struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

type Reply = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

/// In-cluster mode: the service account's bearer token, or 401 as the API server answers.
async fn authenticated(shared: &Arc<Shared>, req: Request<Incoming>) -> Reply {
    if let Some(tls) = &shared.tls {
        let want = format!("Bearer {}", tls.token);
        let given = req.headers().get(hyper::header::AUTHORIZATION);
        if given.and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
            return reply(
                StatusCode::UNAUTHORIZED,
                status(401, "Unauthorized", "Unauthorized"),
            );
        }
    }
    route(shared, req).await
}

fn reply(status: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// (plural, api version to report) for a collection path, or None.
fn collection(path: &str) -> Option<(&'static Kind, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest.to_vec()),
        ["apis", group, version, rest @ ..] if *group == ISTIO => {
            (format!("{ISTIO}/{version}"), rest.to_vec())
        }
        _ => return None,
    };
    let plural = match rest.as_slice() {
        [plural] => *plural,
        ["namespaces", _, plural] => *plural,
        _ => return None,
    };
    let k = KINDS.iter().find(|k| k.plural == plural)?;
    let core = api_version == "v1";
    (k.core == core).then_some((k, api_version))
}

/// (API group, resource, namespace) of a collection path, served or not.
fn resource_of(path: &str) -> Option<(String, String, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", group, _, rest @ ..] => (*group, rest),
        _ => return None,
    };
    match rest {
        [resource] => Some((group.into(), resource.to_string(), None)),
        ["namespaces", ns, resource] => {
            Some((group.into(), resource.to_string(), Some(ns.to_string())))
        }
        _ => None,
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    if path == format!("/apis/{ISTIO}") {
        let versions: Vec<Value> = shared
            .istio_versions
            .lock()
            .unwrap()
            .iter()
            .map(|v| json!({"groupVersion": format!("{ISTIO}/{v}"), "version": v}))
            .collect();
        if versions.is_empty() {
            return reply(
                StatusCode::NOT_FOUND,
                status(404, "NotFound", "no such group"),
            );
        }
        let preferred = versions[0].clone();
        return reply(
            StatusCode::OK,
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": ISTIO,
                   "versions": versions, "preferredVersion": preferred}),
        );
    }
    if let Some(rest) = path.strip_prefix("/apis/events.k8s.io/v1/namespaces/") {
        let Some((ns, "events", name)) = rest.split_once('/').map(|(ns, r)| {
            let (coll, name) = r.split_once('/').unwrap_or((r, ""));
            (ns.to_string(), coll, name.to_string())
        }) else {
            return reply(
                StatusCode::NOT_FOUND,
                status(404, "NotFound", &format!("{path}: not served")),
            );
        };
        let method = req.method().clone();
        let verb = match method {
            Method::POST => "create",
            Method::PATCH => "patch",
            Method::GET if name.is_empty() => "list",
            Method::GET => "get",
            Method::PUT => "update",
            Method::DELETE => "delete",
            _ => "unknown",
        };
        if !shared
            .rbac
            .allows("events.k8s.io", "events", verb, Some(&ns))
        {
            return forbidden("events.k8s.io", "events", verb, Some(&ns));
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let Ok(ev) = serde_json::from_slice::<Value>(&body) else {
            return reply(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", "body is not JSON"),
            );
        };
        match method {
            Method::POST => {
                let ev_name = ev["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if ev_name.is_empty()
                    || ev["reason"].as_str().unwrap_or_default().is_empty()
                    || ev["regarding"].is_null()
                {
                    return reply(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        status(
                            422,
                            "Invalid",
                            "Event is invalid: metadata.name, reason and regarding are required",
                        ),
                    );
                }
                let mut st = shared.state.lock().unwrap();
                let taken = st.events.iter().any(|e| {
                    e["metadata"]["name"].as_str() == Some(&ev_name)
                        && e["metadata"]["namespace"].as_str().unwrap_or(&ns) == ns
                });
                if taken {
                    return reply(
                        StatusCode::CONFLICT,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("events.events.k8s.io \"{ev_name}\" already exists"),
                        ),
                    );
                }
                st.events.push(ev.clone());
                return reply(StatusCode::CREATED, ev);
            }
            Method::PATCH => {
                let mut st = shared.state.lock().unwrap();
                if !st
                    .events
                    .iter()
                    .any(|e| e["metadata"]["name"].as_str() == Some(name.as_str()))
                {
                    return reply(
                        StatusCode::NOT_FOUND,
                        status(
                            404,
                            "NotFound",
                            &format!("events.events.k8s.io \"{name}\" not found"),
                        ),
                    );
                }
                st.events.push(ev.clone());
                return reply(StatusCode::OK, ev);
            }
            _ => {
                return reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    status(405, "MethodNotAllowed", "events: POST or PATCH"),
                )
            }
        }
    }
    // Authorization comes first, as in a real API server: a resource the role does not grant is
    // 403 whether or not it is served.
    if let Some((group, resource, namespace)) = resource_of(&path) {
        let q = query(&req);
        let verb = match (req.method().clone(), q.get("watch").map(String::as_str)) {
            (Method::GET, Some("true" | "1")) => "watch",
            (Method::GET, _) => "list",
            (Method::POST, _) => "create",
            (Method::PUT, _) => "update",
            (Method::PATCH, _) => "patch",
            (Method::DELETE, _) => "deletecollection",
            _ => "unknown",
        };
        if !shared
            .rbac
            .allows(&group, &resource, verb, namespace.as_deref())
        {
            return forbidden(&group, &resource, verb, namespace.as_deref());
        }
    }
    let Some((
        &Kind {
            kind,
            plural,
            namespaced,
            ..
        },
        api_version,
    )) = collection(&path)
    else {
        return reply(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", &format!("{path}: not served")),
        );
    };
    if api_version.starts_with(ISTIO)
        && !shared
            .istio_versions
            .lock()
            .unwrap()
            .iter()
            .any(|v| api_version.ends_with(&format!("/{v}")))
    {
        return reply(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", "version not served"),
        );
    }
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", "read-only"),
        );
    }
    let q = query(&req);
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if watching
        && q.get("resourceVersion")
            .is_none_or(|v| v.is_empty() || v == "0")
    {
        // A client that lists then watches must resume from the list's resourceVersion; one
        // that does not would miss the changes in between.
        return reply(
            StatusCode::BAD_REQUEST,
            status(
                400,
                "BadRequest",
                "watch without the resourceVersion of a previous list",
            ),
        );
    }
    let namespace = path
        .split("/namespaces/")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .filter(|_| namespaced && path.contains("/namespaces/"))
        .map(str::to_string);
    let select = move |obj: &Value| {
        namespace
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
    };
    let versioned = {
        let api_version = api_version.clone();
        move |mut obj: Value| {
            obj["apiVersion"] = json!(api_version);
            obj
        }
    };
    if watching {
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        let mut sub = shared.changes.subscribe();
        let backlog: Vec<Change>;
        let gone;
        {
            let mut st = shared.state.lock().unwrap();
            *st.watches.entry(plural).or_default() += 1;
            gone = from < st.compacted;
            backlog = st
                .log
                .iter()
                .filter(|c| c.plural == plural && c.rv > from)
                .cloned()
                .collect();
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            if gone {
                let _ = tx
                    .send(line(
                        json!({"type": "ERROR", "object": status(410, "Expired",
                        &format!("too old resource version: {from}"))}),
                    ))
                    .await;
                return;
            }
            let mut last = from;
            for c in backlog {
                last = c.rv;
                let mut ev = c.obj.clone();
                ev["object"] = versioned(ev["object"].take());
                if !select(&ev["object"]) {
                    continue;
                }
                if tx.send(line(ev)).await.is_err() {
                    return;
                }
            }
            let mut tick = tokio::time::interval(shared.bookmark_every);
            loop {
                tokio::select! {
                    c = sub.recv() => match c {
                        Ok(c) if c.plural == plural && c.rv > last => {
                            last = c.rv;
                            let mut ev = c.obj.clone();
                            ev["object"] = versioned(ev["object"].take());
                            if select(&ev["object"]) && tx.send(line(ev)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    _ = tick.tick(), if bookmarks => {
                        let rv = shared.state.lock().unwrap().rv.max(last);
                        let bm = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": rv.to_string()}}});
                        if tx.send(line(bm)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(ChanBody(rx).boxed())
            .unwrap();
    }
    // Pages as a real API server serves them: `limit` items, then a `continue` token naming where
    // the next page starts; every page carries the first page's resourceVersion.
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let resume = match q.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => match decode_continue(token) {
            Some(r) => Some(r),
            None => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    status(400, "BadRequest", "continue key is not valid"),
                )
            }
        },
    };
    let (rv, page, more) = {
        let mut st = shared.state.lock().unwrap();
        *st.lists.entry(plural).or_default() += 1;
        let (rv, after) = resume.unwrap_or((st.rv, String::new()));
        let mut page = Vec::new();
        let mut more = None;
        let mut last_served = None;
        if let Some(objects) = st.objects.get(plural) {
            let mut rest = objects
                .range::<String, _>((
                    std::ops::Bound::Excluded(&after),
                    std::ops::Bound::Unbounded,
                ))
                .filter(|(_, o)| select(o));
            for (key, o) in rest.by_ref() {
                page.push(versioned(o.clone()));
                if page.len() == limit {
                    last_served = Some(key.clone());
                    break;
                }
            }
            if let Some(last) = last_served {
                let remaining = rest.count();
                if remaining > 0 {
                    more = Some((encode_continue(rv, &last), remaining));
                }
            }
        }
        (rv, page, more)
    };
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some((token, remaining)) = more {
        meta["continue"] = json!(token);
        meta["remainingItemCount"] = json!(remaining);
    }
    reply(
        StatusCode::OK,
        json!({"kind": format!("{kind}List"), "apiVersion": api_version,
               "metadata": meta, "items": page}),
    )
}

/// A list's `continue` token: the snapshot's resourceVersion and the last key served, in hex
/// (opaque to clients, as the API server's is).
fn encode_continue(rv: u64, last: &str) -> String {
    format!("{rv}:{last}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (rv, last) = text.split_once(':')?;
    Some((rv.parse().ok()?, last.to_string()))
}

/// A Namespace, labelled for enforcement when `enforce`.
pub fn namespace(name: &str, enforce: bool) -> Value {
    let labels = if enforce {
        json!({"authz.io/enforce": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A running, ready Pod with one address, on `node`.
pub fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    ip: &str,
    labels: Value,
    sa: &str,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels,
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "example/app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

/// The agent pod of `node` (the DaemonSet's: host network, its namespace and labels), ready or
/// not: how every agent learns which nodes decide their own pods.
pub fn agent_pod(node: &str, ready: bool) -> Value {
    let mut p = pod(
        "authz-system",
        &format!("authz-agent-{node}"),
        &format!("uid-authz-agent-{node}"),
        node,
        "192.0.2.1",
        json!({"app.kubernetes.io/name": "authz-agent"}),
        "authz-agent",
    );
    p["spec"]["hostNetwork"] = json!(true);
    p["status"]["conditions"][0]["status"] = json!(if ready { "True" } else { "False" });
    p
}

/// A `security.istio.io` object (the version is the one served to each client).
pub fn istio(kind: &str, ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": kind,
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}
