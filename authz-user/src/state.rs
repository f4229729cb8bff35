//! The state in force: what the source (the config file, or the API server) says the world is
//! (`world::World`), the registry built from it, the compiled policies and, for every destination this agent
//! decides for, the policies that select it as its labels are now. One immutable value, built
//! whole and swapped whole (`InForce`): the proxy, the admin endpoint, the JWKS resolver and
//! enrollment all read the same one, so none can lag behind another.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use crate::{
    config::AgentSettings,
    engine::Engine,
    jwt::cache::TokenCache,
    policy::{PolicyIndex, PolicySet, WorkloadPolicies},
    registry::{Registry, Workload},
    world::World,
};

/// A destination this agent decides for: its workload and the policies that select it.
pub struct Target {
    pub workload: Arc<Workload>,
    pub policies: Arc<WorkloadPolicies>,
}

pub struct State {
    /// What the source said (the file, or the cluster's pods, services and peers); served by
    /// /config_dump.
    pub world: Arc<World>,
    pub registry: Arc<Registry>,
    pub engine: Arc<Engine>,
    /// Every destination decided here (captured pods, client-side workloads), by `ns/name`.
    targets: HashMap<String, Arc<Target>>,
}

impl State {
    /// Builds the state for `world` with `engine`. A destination whose labels did not change
    /// keeps the policies `prev` computed with the same engine: pods coming and going cost
    /// nothing for the others.
    pub fn new(world: Arc<World>, engine: Arc<Engine>, prev: Option<&State>) -> State {
        let registry = Arc::new(Registry::from_world(&world));
        let prev = prev.filter(|p| Arc::ptr_eq(&p.engine, &engine));
        let mut targets = HashMap::with_capacity(registry.destinations().size_hint().0);
        for w in registry.destinations() {
            let key = key(w);
            let kept = prev
                .and_then(|p| p.targets.get(&key))
                .filter(|t| *t.workload == **w)
                .map(|t| t.policies.clone());
            let policies = kept.unwrap_or_else(|| Arc::new(engine.policies_for(w)));
            targets.insert(
                key,
                Arc::new(Target {
                    workload: w.clone(),
                    policies,
                }),
            );
        }
        State {
            world,
            registry,
            engine,
            targets,
        }
    }

    /// Nothing enrolled, no policy: what is in force before the first world is read.
    pub fn empty(agent: &AgentSettings) -> State {
        let engine = Engine::new(
            PolicyIndex::build(&PolicySet::default(), &agent.root_namespace, None),
            Arc::new(TokenCache::new(0)),
            None,
            agent.path_normalization,
            &agent.trust_domain,
        );
        State::new(Arc::default(), Arc::new(engine), None)
    }

    /// The destination `ns/name` as it is now; None once it is no longer one of this agent's.
    pub fn target(&self, key: &str) -> Option<&Arc<Target>> {
        self.targets.get(key)
    }

    /// Why `key` is no destination here: a claimed pod not confirmed yet, or gone.
    pub fn no_target_reason(&self, key: &str) -> &'static str {
        let claimed = self.registry.pods.iter().any(|p| {
            !p.identity.is_known() && format!("{}/{}", p.workload.namespace, p.workload.name) == key
        });
        if claimed {
            "identity not confirmed"
        } else {
            "destination gone"
        }
    }

    pub fn targets(&self) -> usize {
        self.targets.len()
    }
}

/// A workload's key: `namespace/name`.
pub fn key(w: &Workload) -> String {
    format!("{}/{}", w.namespace, w.name)
}

/// The state in force, swapped whole.
pub struct InForce(RwLock<Arc<State>>);

impl InForce {
    pub fn new(state: State) -> InForce {
        InForce(RwLock::new(Arc::new(state)))
    }

    pub fn get(&self) -> Arc<State> {
        self.0.read().unwrap().clone()
    }

    pub fn swap(&self, state: State) -> Arc<State> {
        let new = Arc::new(state);
        *self.0.write().unwrap() = new.clone();
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PathNormalization;

    const DENY_QUARANTINE: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: q, namespace: foo}\nspec:\n  selector: {matchLabels: {quarantine: \"true\"}}\n  action: DENY\n  rules: [{}]\n";

    fn engine(yaml: &str) -> Arc<Engine> {
        let mut set = PolicySet::default();
        crate::policy::load_str(yaml, "t.yaml", &mut set);
        assert!(set.is_valid(), "{:?}", set.problems);
        Arc::new(Engine::new(
            PolicyIndex::build(&set, "istio-system", None),
            Arc::new(TokenCache::new(0)),
            None,
            PathNormalization::Base,
            "cluster.local",
        ))
    }

    fn config(labels: &str) -> Arc<World> {
        let yaml = format!(
            "workloads:\n- {{name: web, namespace: foo, labels: {labels}, ips: [10.0.0.1]}}\n- {{name: db, namespace: foo, labels: {{app: db}}, ips: [10.0.0.2]}}\n"
        );
        Arc::new(World::from_config(
            &crate::config::Config::parse(&yaml, "t.yaml").unwrap(),
        ))
    }

    fn denied(s: &State, key: &str) -> bool {
        !s.target(key).unwrap().policies.authz.is_empty()
    }

    #[test]
    fn labels_select_policies_as_they_are_in_each_state_both_ways() {
        let e = engine(DENY_QUARANTINE);
        let plain = State::new(config("{app: web}"), e.clone(), None);
        assert!(!denied(&plain, "foo/web"));
        let quarantined = State::new(
            config("{app: web, quarantine: \"true\"}"),
            e.clone(),
            Some(&plain),
        );
        assert!(denied(&quarantined, "foo/web"), "the DENY starts applying");
        let released = State::new(config("{app: web}"), e.clone(), Some(&quarantined));
        assert!(!denied(&released, "foo/web"), "and stops");
        // An unchanged destination keeps what was computed for it.
        assert!(Arc::ptr_eq(
            &released.target("foo/db").unwrap().policies,
            &quarantined.target("foo/db").unwrap().policies
        ));
        assert!(plain.target("foo/gone").is_none());
    }

    #[test]
    fn a_new_engine_recomputes_every_destination() {
        let plain = State::new(config("{app: web}"), engine(""), None);
        let after = State::new(config("{app: web}"), engine(DENY_QUARANTINE), Some(&plain));
        assert!(!Arc::ptr_eq(
            &after.target("foo/db").unwrap().policies,
            &plain.target("foo/db").unwrap().policies
        ));
    }
}
