//! JWKS documents from a remote server: errors with a reason, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = authz::jwt::keys::Jwks::parse(data);
});
