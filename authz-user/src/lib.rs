//! The node agent: steers enrolled pods' traffic through eBPF into itself and enforces Istio
//! `RequestAuthentication` and `AuthorizationPolicy` on it.
pub mod admin;
pub mod agent;
pub mod config;
pub mod kernel;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod registry;
pub mod authz;
pub mod engine;
pub mod jwt;
pub mod normalize;
pub mod policy;
pub mod cli;
