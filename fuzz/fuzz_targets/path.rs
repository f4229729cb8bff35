//! Path normalization: never panics, and is idempotent (normalizing twice changes nothing), so
//! the policy and the upstream see the same path.
#![no_main]
use authz::{config::PathNormalization, normalize::normalize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else { return };
    for mode in [PathNormalization::None, PathNormalization::Base, PathNormalization::MergeSlashes, PathNormalization::DecodeAndMergeSlashes] {
        if let Ok((path, query)) = normalize(target, mode) {
            assert!(path.starts_with('/'));
            if mode != PathNormalization::None && !query.contains('#') {
                let again = normalize(&format!("{path}{query}"), mode).unwrap();
                assert_eq!(again.0, path, "not idempotent for {target:?} in {mode:?}");
            }
        }
    }
    let _ = authz::authz::template::compile(target);
});
