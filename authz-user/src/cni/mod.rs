//! The agent's side of the CNI plugin (`authz-cni`): the socket the plugin hands pods over on,
//! the claims it made (one file each, so a restarted agent still has them), and what became of
//! each (`ClaimState`), which the socket's ADD waits for. The Kubernetes source reads the claims
//! (`kubernetes::input`): a claimed pod is located by its uid and the runtime's netns, before
//! any process of it exists; the API server stays the source of truth for who the pod is.
use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
pub use authz_cni::wire::{Outcome, PodClaim, Reply, Request};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{watch, Notify},
};

pub mod install;

/// At most this many addresses in a claim (a pod has one per family, maybe a few more).
const MAX_IPS: usize = 16;
/// A plugin has this long to send its request once connected.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);

/// A pod the plugin handed over, and when (wall clock: it survives a restart of the agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Claim {
    pub pod: PodClaim,
    /// Seconds since the epoch.
    pub claimed_at: u64,
}

impl Claim {
    pub fn made(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.claimed_at)
    }

    pub fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Duration::from_secs(now.saturating_sub(self.claimed_at))
    }
}

/// What became of a claim, as the last apply left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimState {
    Enrolled,
    /// The pod is not one this agent enrolls (outside the mesh, or enrollment limited to it).
    NotEnrolled,
    /// Still to be enrolled, and why not yet.
    Pending(String),
    /// Given up (the API server does not confirm the pod), and why.
    Withdrawn(String),
}

/// Claims by sandbox (container id), their files, and their states.
#[derive(Clone)]
pub struct Claims {
    inner: Arc<Mutex<HashMap<String, Claim>>>,
    dir: PathBuf,
    /// Raised when a claim comes or goes: the source reads the world again.
    pub changed: Arc<Notify>,
    states: Arc<watch::Sender<Arc<HashMap<String, ClaimState>>>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    #[error("container id {0:?}: 1 to 128 of [A-Za-z0-9_.-]")]
    ContainerId(String),
    #[error("pod uid {0:?} is not a UUID")]
    Uid(String),
    #[error("pod {0:?}: namespace and name are DNS labels/subdomains")]
    Name(String),
    #[error("netns {0:?}: an absolute path is expected")]
    Netns(PathBuf),
    #[error("{0} addresses: at most {MAX_IPS}; none loopback or unspecified")]
    Ips(usize),
}

fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Everything in a claim comes from the runtime, as root; still, it names files and paths.
pub fn validate(p: &PodClaim) -> Result<(), ClaimError> {
    let id_ok = !p.container_id.is_empty()
        && p.container_id.len() <= 128
        && p.container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !p.container_id.starts_with('.');
    if !id_ok {
        return Err(ClaimError::ContainerId(p.container_id.clone()));
    }
    if p.uid.is_empty()
        || p.uid.len() > 64
        || !p.uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        return Err(ClaimError::Uid(p.uid.clone()));
    }
    if !dns_name(&p.namespace) || !dns_name(&p.name) {
        return Err(ClaimError::Name(format!("{}/{}", p.namespace, p.name)));
    }
    if !p.netns.is_absolute() || p.netns.components().any(|c| c.as_os_str() == "..") {
        return Err(ClaimError::Netns(p.netns.clone()));
    }
    if p.ips.len() > MAX_IPS
        || p.ips
            .iter()
            .any(|ip| ip.is_loopback() || ip.is_unspecified())
    {
        return Err(ClaimError::Ips(p.ips.len()));
    }
    Ok(())
}

impl Claims {
    /// The claims kept in `dir` (created, root only); a file that does not read as a claim is
    /// removed with a warning.
    pub fn open(dir: &Path) -> Result<Claims> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let mut claims = HashMap::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let read = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Claim>(&b).ok())
                .filter(|c| validate(&c.pod).is_ok());
            match read {
                Some(c) => {
                    claims.insert(c.pod.container_id.clone(), c);
                }
                None => {
                    tracing::warn!(file = %path.display(), "not a CNI claim; removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if !claims.is_empty() {
            tracing::info!(claims = claims.len(), dir = %dir.display(), "pods handed over by the CNI plugin before a restart");
        }
        Ok(Claims {
            inner: Arc::new(Mutex::new(claims)),
            dir: dir.into(),
            changed: Arc::new(Notify::new()),
            states: Arc::new(watch::channel(Arc::default()).0),
        })
    }

    fn file(&self, container_id: &str) -> PathBuf {
        self.dir.join(format!("{container_id}.json"))
    }

    /// Records a claim (on disk first). The same sandbox again is the same claim; a new sandbox
    /// of the same pod replaces the old one's.
    pub fn add(&self, pod: PodClaim) -> Result<()> {
        validate(&pod)?;
        let mut inner = self.inner.lock().unwrap();
        if inner.get(&pod.container_id).is_some_and(|c| c.pod == pod) {
            return Ok(());
        }
        let claim = Claim {
            claimed_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            pod,
        };
        let path = self.file(&claim.pod.container_id);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&claim)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        let older: Vec<String> = inner
            .values()
            .filter(|c| c.pod.uid == claim.pod.uid && c.pod.container_id != claim.pod.container_id)
            .map(|c| c.pod.container_id.clone())
            .collect();
        for id in older {
            inner.remove(&id);
            let _ = std::fs::remove_file(self.file(&id));
        }
        inner.insert(claim.pod.container_id.clone(), claim);
        drop(inner);
        self.changed.notify_one();
        Ok(())
    }

    /// Forgets a sandbox's claim; false when there was none.
    pub fn remove(&self, container_id: &str) -> bool {
        let gone = self.inner.lock().unwrap().remove(container_id).is_some();
        if gone {
            let _ = std::fs::remove_file(self.file(container_id));
            self.changed.notify_one();
        }
        gone
    }

    /// The pod's latest claim.
    pub fn by_uid(&self, uid: &str) -> Option<Claim> {
        self.inner
            .lock()
            .unwrap()
            .values()
            .filter(|c| c.pod.uid == uid)
            .max_by_key(|c| c.claimed_at)
            .cloned()
    }

    pub fn all(&self) -> Vec<Claim> {
        let mut v: Vec<Claim> = self.inner.lock().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.pod.container_id.cmp(&b.pod.container_id));
        v
    }

    pub fn is_empty(&self) -> bool {
        self.inner.lock().unwrap().is_empty()
    }

    /// After an apply: what became of each claim. Withdrawn claims are forgotten here.
    pub fn publish(&self, states: HashMap<String, ClaimState>) {
        for (id, s) in &states {
            if matches!(s, ClaimState::Withdrawn(_)) {
                self.inner.lock().unwrap().remove(id);
                let _ = std::fs::remove_file(self.file(id));
            }
        }
        self.states.send_if_modified(|old| {
            if **old == states {
                return false;
            }
            *old = Arc::new(states);
            true
        });
    }

    pub fn state(&self, container_id: &str) -> Option<ClaimState> {
        self.states.borrow().get(container_id).cloned()
    }

    /// Waits until the sandbox's pod is enrolled, known not to be the agent's, or withdrawn;
    /// at `within`, the reason it is still pending.
    async fn settled(&self, container_id: &str, within: Duration) -> Reply {
        let mut rx = self.states.subscribe();
        let wait = async {
            loop {
                let state = rx.borrow_and_update().get(container_id).cloned();
                match state {
                    Some(ClaimState::Enrolled) => return Reply::Ok(Outcome::Enrolled),
                    Some(ClaimState::NotEnrolled) => return Reply::Ok(Outcome::NotEnrolled),
                    Some(ClaimState::Withdrawn(why)) => return Reply::Error(why),
                    Some(ClaimState::Pending(_)) | None => {}
                }
                if rx.changed().await.is_err() {
                    return Reply::Error("the agent is stopping".into());
                }
            }
        };
        match tokio::time::timeout(within, wait).await {
            Ok(r) => r,
            Err(_) => Reply::Error(match self.state(container_id) {
                Some(ClaimState::Pending(why)) => format!("not enrolled within {within:?}: {why}"),
                _ => format!("not enrolled within {within:?} (the agent has not read the API server's pods yet)"),
            }),
        }
    }
}

/// The socket the plugin talks to: bound (replacing a predecessor's: a successor takes it
/// over), root only.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's inode: still ours at exit, or a successor's.
    ino: u64,
}

impl Server {
    pub fn bind(path: &Path) -> Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let ino = std::fs::metadata(path)?.ino();
        Ok(Server {
            listener,
            path: path.into(),
            ino,
        })
    }

    /// Whether the socket file is still the one this agent bound (no successor took it).
    pub fn still_ours(path: &Path, ino: u64) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.ino() == ino)
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves the plugin: every connection one request, answered once settled (an ADD waits
    /// for the pod's enrollment, up to `timeout` less a second, so the plugin hears why).
    pub async fn serve(self, claims: Claims, timeout: Duration) {
        let within = timeout
            .saturating_sub(Duration::from_secs(1))
            .max(Duration::from_millis(500));
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("CNI socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let claims = claims.clone();
            tokio::spawn(async move {
                if let Err(e) = one(stream, &claims, within).await {
                    tracing::warn!("CNI request: {e:#}");
                }
            });
        }
    }
}

async fn one(stream: UnixStream, claims: &Claims, within: Duration) -> Result<()> {
    // Only root hands pods over (the runtime runs the plugin as root); the file mode says so
    // too.
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let reply = if cred.uid() != 0 {
        Reply::Error(format!("uid {} may not hand pods over", cred.uid()))
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new(read).take(authz_cni::wire::MAX_LINE as u64);
        let n = tokio::time::timeout(REQUEST_WITHIN, reader.read_line(&mut line))
            .await
            .context("no request within 5 s")??;
        if n == 0 || !line.ends_with('\n') {
            anyhow::bail!("request not terminated by a newline (or over 64 KiB)");
        }
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error(format!("not a request: {e}")),
            Ok(req) => handle(claims, req, within).await,
        }
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

async fn handle(claims: &Claims, req: Request, within: Duration) -> Reply {
    match req {
        Request::Add(pod) => {
            let (id, what) = (
                pod.container_id.clone(),
                format!("{}/{} ({})", pod.namespace, pod.name, pod.uid),
            );
            tracing::info!(pod = %what, sandbox = %id, netns = %pod.netns.display(), ips = ?pod.ips, "CNI ADD");
            if let Err(e) = claims.add(pod) {
                return Reply::Error(format!("{e:#}"));
            }
            let r = claims.settled(&id, within).await;
            match &r {
                Reply::Ok(o) => tracing::info!(pod = %what, outcome = ?o, "CNI ADD answered"),
                Reply::Error(e) => tracing::warn!(pod = %what, "CNI ADD refused: {e}"),
            }
            r
        }
        Request::Del { container_id } => {
            let had = claims.remove(&container_id);
            tracing::info!(sandbox = %container_id, known = had, "CNI DEL");
            Reply::Ok(Outcome::Released)
        }
        Request::Check { container_id } => match claims.state(&container_id) {
            Some(ClaimState::Enrolled) => Reply::Ok(Outcome::Enrolled),
            Some(ClaimState::NotEnrolled) => Reply::Ok(Outcome::NotEnrolled),
            Some(ClaimState::Pending(why)) | Some(ClaimState::Withdrawn(why)) => Reply::Error(why),
            None => Reply::Error(format!("no pod handed over for sandbox {container_id}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: &str, uid: &str) -> PodClaim {
        PodClaim {
            container_id: id.into(),
            netns: "/var/run/netns/cni-1".into(),
            ifname: "eth0".into(),
            namespace: "foo".into(),
            name: "web".into(),
            uid: uid.into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("authz-claims-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn hostile_claims_are_refused() {
        let ok = claim("abc", "1b4e28ba-2fa1-11d2");
        assert!(validate(&ok).is_ok());
        for bad in [
            PodClaim {
                container_id: "../../etc/x".into(),
                ..ok.clone()
            },
            PodClaim {
                container_id: ".hidden".into(),
                ..ok.clone()
            },
            PodClaim {
                uid: "../x".into(),
                ..ok.clone()
            },
            PodClaim {
                namespace: "Foo Bar".into(),
                ..ok.clone()
            },
            PodClaim {
                netns: "relative/netns".into(),
                ..ok.clone()
            },
            PodClaim {
                ips: vec!["127.0.0.1".parse().unwrap()],
                ..ok.clone()
            },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn claims_survive_a_restart_and_a_new_sandbox_replaces_the_old() {
        let d = dir("restart");
        let c = Claims::open(&d).unwrap();
        c.add(claim("sb1", "aaaa")).unwrap();
        c.add(claim("sb2", "bbbb")).unwrap();
        std::fs::write(d.join("junk.json"), "{").unwrap();
        let again = Claims::open(&d).unwrap();
        assert_eq!(again.all().len(), 2);
        assert!(
            !d.join("junk.json").exists(),
            "a file that is no claim goes"
        );
        again.add(claim("sb3", "aaaa")).unwrap();
        let ids: Vec<String> = again
            .all()
            .into_iter()
            .map(|c| c.pod.container_id)
            .collect();
        assert_eq!(ids, ["sb2", "sb3"]);
        assert_eq!(again.by_uid("aaaa").unwrap().pod.container_id, "sb3");
        assert!(!d.join("sb1.json").exists());
        assert!(again.remove("sb2"));
        assert!(!again.remove("sb2"));
        assert_eq!(Claims::open(&d).unwrap().all().len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn an_add_is_answered_once_its_pod_is_settled() {
        let d = dir("settle");
        let claims = Claims::open(&d).unwrap();
        claims.add(claim("sb1", "aaaa")).unwrap();
        let waiter = {
            let c = claims.clone();
            tokio::spawn(async move { c.settled("sb1", Duration::from_secs(5)).await })
        };
        claims.publish(HashMap::from([(
            "sb1".to_string(),
            ClaimState::Pending("no cgroup yet".into()),
        )]));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "pending is no answer");
        claims.publish(HashMap::from([("sb1".to_string(), ClaimState::Enrolled)]));
        assert_eq!(waiter.await.unwrap(), Reply::Ok(Outcome::Enrolled));
        // Still pending at the bound: the reason is the answer.
        claims.publish(HashMap::from([(
            "sb1".to_string(),
            ClaimState::Pending("no cgroup yet".into()),
        )]));
        match claims.settled("sb1", Duration::from_millis(100)).await {
            Reply::Error(e) => assert!(e.contains("no cgroup yet"), "{e}"),
            r => panic!("{r:?}"),
        }
        // Withdrawn: refused, and the claim is gone with its file.
        claims.publish(HashMap::from([(
            "sb1".to_string(),
            ClaimState::Withdrawn("unknown to the API server".into()),
        )]));
        assert!(claims.all().is_empty());
        assert!(!d.join("sb1.json").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
