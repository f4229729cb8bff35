//! The world as a source says it is: this node's pods to enroll (where they are on the host,
//! who they are, kubelet's probes of them), destinations decided at the client, services, and
//! the mesh pods of the cluster by address. The file source reads it from the config file
//! (`World::from_config`); the Kubernetes source builds it from the API server's stores
//! (`kubernetes::snapshot`). `state::State` puts one in force.
use std::{net::IpAddr, sync::Arc};

use serde::Serialize;

use crate::{
    config::{Config, PodSpec, ServiceSpec, WorkloadSpec},
    registry::Workload,
};

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct World {
    /// Pods of this node: enrolled as clients, and captured inbound unless `inbound: false`.
    pub pods: Vec<NodePod>,
    /// Destinations with no netns here: decided at the client (file mode).
    pub workloads: Vec<WorkloadSpec>,
    pub services: Vec<Arc<ServiceSpec>>,
    /// Mesh pods of the cluster, by address (Kubernetes mode): identities at destinations,
    /// Service backends, and decided where `decided` says.
    pub peers: Vec<Peer>,
}

/// A pod of this node, and kubelet's probes of it (Kubernetes mode), which pass its policies
/// when the kubelet makes them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePod {
    #[serde(flatten)]
    pub spec: PodSpec,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    #[serde(skip_serializing_if = "Identity::is_known")]
    pub identity: Identity,
}

/// Whether the source vouches for who a pod of this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Identity {
    /// Its labels and service account are the source's (the config file, the API server).
    #[default]
    Known,
    /// Handed over by the CNI plugin and not yet confirmed by the API server: enrolled (its
    /// connections steered, its inbound captured, its sources checked) but no policy can select
    /// it yet, so connections to it are refused and it is no one as a source.
    Claimed,
}

impl Identity {
    pub fn is_known(&self) -> bool {
        *self == Identity::Known
    }
}

/// A kubelet probe of a pod (from its containers' liveness, readiness and startup probes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Probe {
    /// `httpGet`: a GET of this path (query aside) on this port.
    Http { port: u16, path: String },
    /// `tcpSocket`: a connection to this port.
    Tcp { port: u16 },
    /// `grpc`: the gRPC health check on this port.
    Grpc { port: u16 },
}

/// A mesh pod of the cluster, by address. Its workload is the one the pod store holds, shared
/// (not copied) by the world and the registry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Peer {
    pub workload: Arc<Workload>,
    pub ips: Arc<[IpAddr]>,
    pub decided: DecidedAt,
}

/// Where connections to a mesh pod are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DecidedAt {
    /// At its node (this one's, or one running a ready agent), where they arrive.
    ItsNode,
    /// Its node runs no ready agent: this agent decides its pods' connections to it, at the
    /// client (the outbound path), so the pod is never left to no one.
    Client,
}

impl World {
    /// File mode: the config's pods (no probes), workloads and services; no peers.
    pub fn from_config(cfg: &Config) -> World {
        World {
            pods: cfg
                .pods
                .iter()
                .map(|spec| NodePod {
                    spec: spec.clone(),
                    probes: vec![],
                    identity: Identity::Known,
                })
                .collect(),
            workloads: cfg.workloads.clone(),
            services: cfg.services.clone(),
            peers: vec![],
        }
    }

    pub fn has_probes(&self) -> bool {
        self.pods.iter().any(|p| !p.probes.is_empty())
    }
}
