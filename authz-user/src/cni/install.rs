//! Putting the plugin into the node's CNI configuration, as istio-cni's installer does: the
//! binary into the CNI bin directory, an entry at the end of the primary network's plugin chain
//! (a `.conf` turned into a `.conflist`), put back when the network plugin rewrites its file,
//! and taken out when the agent leaves for good.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::config::{CniSettings, FailMode};

/// The plugin's `type` in a conflist, and its binary's name.
pub const PLUGIN_TYPE: &str = "authz-cni";

/// What the installer puts where.
#[derive(Debug, Clone)]
pub struct Installer {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The binary to copy into `bin_dir`.
    pub binary: PathBuf,
    /// This plugin's entry in the chain.
    pub entry: Value,
}

/// What `ensure` found and did.
#[derive(Debug, PartialEq, Eq)]
pub enum Ensured {
    /// No network configuration yet (the network plugin has not written it): nothing to chain
    /// onto.
    NoNetwork,
    Present(PathBuf),
    /// Added (or brought up to date) in this file.
    Inserted(PathBuf),
    /// Left alone: the plugin cannot be chained there, and why.
    Refused(PathBuf, String),
}

impl Installer {
    /// The installer the settings describe; None when they name no directories.
    pub fn from_settings(s: &CniSettings) -> Result<Option<Installer>> {
        let (Some(bin_dir), Some(conf_dir)) = (&s.bin_dir, &s.conf_dir) else {
            return Ok(None);
        };
        let binary = match &s.plugin_binary {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context("the agent's own path")?
                .with_file_name(PLUGIN_TYPE),
        };
        Ok(Some(Installer {
            bin_dir: bin_dir.clone(),
            conf_dir: conf_dir.clone(),
            binary,
            entry: entry(&s.socket, s.fail_mode, s.timeout),
        }))
    }

    /// Copies the binary in (through a temporary file, so the runtime never runs half a
    /// binary) unless the same bytes are there.
    pub fn install_binary(&self) -> Result<bool> {
        let want = std::fs::read(&self.binary)
            .with_context(|| format!("reading the plugin binary {}", self.binary.display()))?;
        let dest = self.bin_dir.join(PLUGIN_TYPE);
        if std::fs::read(&dest).is_ok_and(|have| have == want) {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.bin_dir)?;
        let tmp = self.bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
        std::fs::write(&tmp, &want).with_context(|| format!("writing {}", tmp.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &dest)?;
        Ok(true)
    }

    /// The plugin chained last in the primary network's configuration, written only when it
    /// is missing or differs.
    pub fn ensure(&self) -> Result<Ensured> {
        let Some(path) = primary(&self.conf_dir) else {
            return Ok(Ensured::NoNetwork);
        };
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let conf: Value = match serde_json::from_slice(&text) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Ok(Ensured::Refused(path, "not a JSON object".into())),
        };
        let version = conf.get("cniVersion").and_then(Value::as_str).unwrap_or("");
        if !authz_cni::plugin::SUPPORTED_VERSIONS.contains(&version) {
            return Ok(Ensured::Refused(
                path,
                format!(
                    "cniVersion {version:?}: the plugin speaks {}",
                    authz_cni::plugin::SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let (list, out) = match conf.get("plugins") {
            Some(Value::Array(_)) => (conf.clone(), path.clone()),
            Some(_) => return Ok(Ensured::Refused(path, "plugins is not a list".into())),
            // A single-plugin `.conf`: the same network as a list, under `.conflist`.
            None => {
                let name = conf.get("name").cloned().unwrap_or(Value::Null);
                (
                    json!({"cniVersion": version, "name": name, "plugins": [conf]}),
                    path.with_extension("conflist"),
                )
            }
        };
        let mut list = list;
        let plugins = list["plugins"].as_array_mut().expect("checked above");
        let ours = |p: &Value| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE);
        if out == path
            && plugins.last() == Some(&self.entry)
            && plugins.iter().filter(|p| ours(p)).count() == 1
        {
            return Ok(Ensured::Present(path));
        }
        // Last in the chain: it needs the network plugin's result (the pod's addresses).
        plugins.retain(|p| !ours(p));
        plugins.push(self.entry.clone());
        write_atomic(&out, &serde_json::to_vec_pretty(&list)?)?;
        if out != path {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing {} (now {})", path.display(), out.display()))?;
        }
        Ok(Ensured::Inserted(out))
    }

    /// Takes the plugin out of every configuration in the directory, and its binary away.
    pub fn remove(&self) -> Result<Vec<PathBuf>> {
        let mut changed = Vec::new();
        for path in conf_files(&self.conf_dir) {
            let Ok(mut conf) = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<Value>(&b)?))
            else {
                continue;
            };
            let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
                continue;
            };
            let before = plugins.len();
            plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
            if plugins.len() != before {
                write_atomic(&path, &serde_json::to_vec_pretty(&conf)?)?;
                changed.push(path);
            }
        }
        match std::fs::remove_file(self.bin_dir.join(PLUGIN_TYPE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing the plugin binary: {e}"),
        }
        Ok(changed)
    }

    /// Keeps the plugin installed: the binary, then the chain every `every` (a network plugin
    /// rewriting its file drops the entry; it is back within `every`).
    pub async fn keep(self, every: Duration) {
        let mut last: Option<String> = None;
        loop {
            let said = match self.install_binary().and_then(|_| self.ensure()) {
                Ok(Ensured::Present(_)) => None,
                Ok(Ensured::Inserted(p)) => {
                    tracing::info!(conflist = %p.display(), "CNI plugin chained");
                    None
                }
                Ok(Ensured::NoNetwork) => Some(format!(
                    "no network configuration in {} yet: the plugin is chained once the network plugin writes one",
                    self.conf_dir.display()
                )),
                Ok(Ensured::Refused(p, why)) => {
                    Some(format!("CNI plugin not chained into {}: {why}", p.display()))
                }
                Err(e) => Some(format!("CNI plugin installation: {e:#}")),
            };
            if said != last {
                if let Some(s) = &said {
                    tracing::warn!("{s}");
                }
                last = said;
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// The plugin's entry: where the agent is and what to do without it.
pub fn entry(socket: &Path, fail_mode: FailMode, timeout: Duration) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "agentSocket": socket,
        "failMode": match fail_mode { FailMode::Closed => "closed", FailMode::Open => "open" },
        "timeoutSeconds": timeout.as_secs(),
    })
}

/// The configuration files a runtime reads, in the order it reads them (libcni's: by name).
fn conf_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "conf" | "conflist" | "json"))
        })
        .collect();
    files.sort();
    files
}

/// The network the runtime uses: the first configuration file by name.
pub fn primary(dir: &Path) -> Option<PathBuf> {
    conf_files(dir).into_iter().next()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("configuration file name")?;
    // A name the runtime does not read (no .conf/.conflist/.json ending) until renamed.
    let tmp = path.with_file_name(format!(".{name}.authz-tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs(PathBuf);
    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup(tag: &str) -> (Dirs, Installer) {
        let root = std::env::temp_dir().join(format!("authz-install-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        std::fs::write(root.join("plugin"), b"\x7fELF plugin").unwrap();
        let i = Installer {
            bin_dir: root.join("bin"),
            conf_dir: root.join("net.d"),
            binary: root.join("plugin"),
            entry: entry(
                Path::new("/var/run/authz/cni.sock"),
                FailMode::Closed,
                Duration::from_secs(30),
            ),
        };
        (Dirs(root), i)
    }

    /// The chain's plugin types, in order.
    fn types(v: &Value) -> Vec<&str> {
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect()
    }

    fn read(p: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    const BRIDGE: &str = r#"{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}"#;

    #[test]
    fn chained_last_into_the_primary_conflist_and_kept_there() {
        let (_d, i) = setup("conflist");
        assert_eq!(i.ensure().unwrap(), Ensured::NoNetwork);
        let list = i.conf_dir.join("10-net.conflist");
        std::fs::write(
            &list,
            format!(r#"{{"cniVersion": "1.0.0", "name": "net", "plugins": [{BRIDGE}, {{"type": "portmap"}}]}}"#),
        )
        .unwrap();
        std::fs::write(i.conf_dir.join("99-other.conflist"), "{}").unwrap();
        assert_eq!(i.ensure().unwrap(), Ensured::Inserted(list.clone()));
        let v = read(&list);
        assert_eq!(types(&v), ["bridge", "portmap", "authz-cni"]);
        assert_eq!(v["plugins"][2]["failMode"], "closed");
        assert_eq!(
            i.ensure().unwrap(),
            Ensured::Present(list.clone()),
            "no rewrite when present"
        );
        // The network plugin rewrites its file: the entry comes back.
        std::fs::write(
            &list,
            format!(r#"{{"cniVersion": "1.0.0", "name": "net", "plugins": [{BRIDGE}]}}"#),
        )
        .unwrap();
        assert_eq!(i.ensure().unwrap(), Ensured::Inserted(list.clone()));
        assert_eq!(read(&list)["plugins"][1]["type"], "authz-cni");
        // An entry not last (or stale) is moved to the end, once.
        let mut v = read(&list);
        v["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "tuning"}));
        std::fs::write(&list, v.to_string()).unwrap();
        i.ensure().unwrap();
        let v = read(&list);
        assert_eq!(types(&v), ["bridge", "tuning", "authz-cni"]);
        assert_eq!(i.remove().unwrap(), vec![list.clone()]);
        let v = read(&list);
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2, "only ours went");
        assert_eq!(read(&i.conf_dir.join("99-other.conflist")), json!({}));
    }

    #[test]
    fn a_conf_becomes_a_conflist() {
        let (_d, i) = setup("conf");
        let conf = i.conf_dir.join("10-bridge.conf");
        std::fs::write(
            &conf,
            r#"{"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "bridge": "cni0"}"#,
        )
        .unwrap();
        let list = i.conf_dir.join("10-bridge.conflist");
        assert_eq!(i.ensure().unwrap(), Ensured::Inserted(list.clone()));
        assert!(!conf.exists());
        let v = read(&list);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["name"], "bridge-net");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1]["type"], "authz-cni");
        assert_eq!(primary(&i.conf_dir), Some(list));
    }

    #[test]
    fn what_cannot_be_chained_is_left_alone() {
        let (_d, i) = setup("refused");
        let list = i.conf_dir.join("05-net.conflist");
        let text = format!(r#"{{"cniVersion": "1.1.0", "name": "n", "plugins": [{BRIDGE}]}}"#);
        std::fs::write(&list, &text).unwrap();
        assert!(matches!(i.ensure().unwrap(), Ensured::Refused(_, why) if why.contains("1.1.0")));
        assert_eq!(std::fs::read_to_string(&list).unwrap(), text);
        std::fs::write(&list, "not json").unwrap();
        assert!(matches!(i.ensure().unwrap(), Ensured::Refused(..)));
    }

    #[test]
    fn the_binary_is_copied_once_and_removed() {
        let (_d, i) = setup("binary");
        assert!(i.install_binary().unwrap());
        assert!(!i.install_binary().unwrap(), "same bytes: not copied again");
        let dest = i.bin_dir.join(PLUGIN_TYPE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
        std::fs::write(&i.binary, b"\x7fELF new").unwrap();
        assert!(i.install_binary().unwrap(), "an upgrade replaces it");
        assert_eq!(std::fs::read(&dest).unwrap(), b"\x7fELF new");
        i.remove().unwrap();
        assert!(!dest.exists());
    }
}
