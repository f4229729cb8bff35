//! `authz-cni`: a CNI plugin chained after the cluster's network plugin. On ADD it hands the
//! pod's network namespace, addresses and identity to the node agent and returns only once the
//! agent has the pod enrolled, so no container of the pod runs before its traffic is steered and
//! captured. `plugin` is the CNI side (spec 1.0.0 and 0.4.0), `wire` what it says to the agent.
pub mod plugin;
pub mod wire;
