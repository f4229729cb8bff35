//! The node agent: steers enrolled pods' traffic through eBPF into itself and enforces Istio
//! `RequestAuthentication` and `AuthorizationPolicy` on it.
#[cfg(feature = "kernel")]
pub mod admin;
#[cfg(feature = "kernel")]
pub mod agent;
pub mod authz;
pub mod cli;
pub mod config;
pub mod engine;
pub mod head;
pub mod jwt;
#[cfg(feature = "kernel")]
pub mod kernel;
#[cfg(feature = "kube")]
pub mod kubernetes;
#[cfg(feature = "kernel")]
pub mod limits;
#[cfg(feature = "kernel")]
pub mod metrics;
#[cfg(feature = "kernel")]
pub mod netns;
pub mod normalize;
pub mod policy;
#[cfg(feature = "kernel")]
pub mod proxy;
pub mod registry;
