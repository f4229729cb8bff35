//! What the plugin and the node agent say to each other over the agent's Unix socket: one JSON
//! request per line, one JSON reply per line. Shared by both sides so they cannot disagree.
use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The most a request or a reply may be: a pod's identity and a few addresses fit many times.
pub const MAX_LINE: usize = 64 * 1024;

/// A pod as the runtime hands it to the plugin on ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodClaim {
    /// The sandbox's id (CNI_CONTAINERID): DEL names the sandbox by it.
    pub container_id: String,
    /// The sandbox's network namespace (CNI_NETNS).
    pub netns: PathBuf,
    pub ifname: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's addresses, from the network plugin's result.
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "op", deny_unknown_fields)]
pub enum Request {
    /// Enroll this pod; the reply comes once it is enrolled (or cannot be).
    Add(PodClaim),
    /// The sandbox is going: release what ADD made.
    Del {
        #[serde(rename = "containerId")]
        container_id: String,
    },
    /// Is the sandbox's pod enrolled as ADD left it?
    Check {
        #[serde(rename = "containerId")]
        container_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Reply {
    /// Done: enrolled (ADD, CHECK) or released (DEL).
    Ok(Outcome),
    /// Refused, and why.
    Error(String),
}

/// What the agent did with an ADD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// Steered, captured inbound and source-checked as the agent's settings say.
    Enrolled,
    /// The pod is not one this node's agent enrolls (outside the mesh, host network).
    NotEnrolled,
    /// DEL done.
    Released,
}
