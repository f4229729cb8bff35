//! Policy YAML: loading, validation and indexing never panic.
#![no_main]
use authz::policy::{load_str, PolicyIndex, PolicySet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut set = PolicySet::default();
    load_str(text, "fuzz.yaml", &mut set);
    let _ = PolicyIndex::build(&set, "istio-system", None);
});
