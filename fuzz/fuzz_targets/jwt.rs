//! Token parsing and verification: any bytes, never a panic; a forged token never verifies.
#![no_main]
use authz::jwt::{self, keys::Jwks};
use libfuzzer_sys::fuzz_target;

const JWKS: &str = include_str!("../../tests/data/istio-samples/jwks.json");

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let jwks = Jwks::parse(JWKS.as_bytes()).unwrap();
    if let Ok((claims, signed, sig)) = jwt::parse(token) {
        let _ = jwt::check_time(&claims, jwt::now_secs());
        let _ = jwt::check_audience(&claims, &["a".to_string()]);
        let _ = jwt::verify_signature(&claims, signed, sig, &jwks);
    }
});
