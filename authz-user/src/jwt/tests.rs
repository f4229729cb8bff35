//! Tokens and keys made here for every algorithm, plus the Istio sample fixtures.
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use serde_json::json;

use super::{
    keys::Jwks,
    testkeys::{TestKey, ALGS},
    *,
};

fn check(token: &str, jwks: &Jwks) -> Result<Claims, JwtError> {
    let (c, signed, sig) = parse(token)?;
    check_time(&c, now_secs())?;
    verify_signature(&c, signed, sig, jwks)?;
    Ok(c)
}

#[test]
fn every_algorithm_verifies_and_rejects_a_bad_signature() {
    for alg in ALGS {
        let k = TestKey::new(alg, &format!("k-{alg}"));
        let jwks =
            Jwks::parse(TestKey::jwks(&[&k]).as_bytes()).unwrap_or_else(|e| panic!("{alg}: {e}"));
        let t = k.token(json!({"iss": "i", "sub": "s", "exp": now_secs() + 600}));
        let c = check(&t, &jwks).unwrap_or_else(|e| panic!("{alg}: {e:?}"));
        assert_eq!(c.iss, "i");
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let mut sig = B64.decode(sig).unwrap();
        sig[5] ^= 1;
        let forged = format!("{signed}.{}", B64.encode(&sig));
        assert_eq!(
            check(&forged, &jwks).unwrap_err(),
            JwtError::VerificationFail,
            "{alg}"
        );
    }
}

#[test]
fn key_selection_by_kid_and_alg() {
    let a = TestKey::new("ES256", "a");
    let b = TestKey::new("ES256", "b");
    let jwks = Jwks::parse(TestKey::jwks(&[&a, &b]).as_bytes()).unwrap();
    assert!(
        check(&b.token(json!({"iss": "i"})), &jwks).is_ok(),
        "kid b picks key b"
    );
    let c = TestKey::new("ES256", "c");
    assert_eq!(
        check(&c.token(json!({})), &jwks).unwrap_err(),
        JwtError::KidAlgMismatch,
        "unknown kid"
    );
    // A key whose alg differs from the token's is skipped.
    let mut jwk = a.jwk.clone();
    jwk["alg"] = json!("ES384");
    let jwks = Jwks::parse(json!({"keys": [jwk]}).to_string().as_bytes()).unwrap();
    assert_eq!(
        check(&a.token(json!({})), &jwks).unwrap_err(),
        JwtError::KidAlgMismatch
    );
    // HS/RS confusion: an HS256 token "signed" with the RSA public key finds no oct key.
    let rs = TestKey::new("RS256", "r");
    let rs_jwks = Jwks::parse(TestKey::jwks(&[&rs]).as_bytes()).unwrap();
    let h = B64.encode(br#"{"alg":"HS256","kid":"r"}"#);
    let p = B64.encode(br#"{"iss":"i"}"#);
    let mac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            rs.jwk["n"].as_str().unwrap().as_bytes(),
        ),
        format!("{h}.{p}").as_bytes(),
    );
    let t = format!("{h}.{p}.{}", B64.encode(mac.as_ref()));
    assert_eq!(check(&t, &rs_jwks).unwrap_err(), JwtError::KidAlgMismatch);
}

#[test]
fn format_and_time_errors_have_envoy_messages() {
    let k = TestKey::new("HS256", "k");
    let jwks = Jwks::parse(TestKey::jwks(&[&k]).as_bytes()).unwrap();
    let cases: Vec<(String, JwtError)> = vec![
        ("opaque-token".into(), JwtError::BadFormat),
        ("a.b".into(), JwtError::BadFormat),
        ("a.b.c.d".into(), JwtError::BadFormat),
        (
            format!(
                "{}.{}.",
                B64.encode(br#"{"alg":"none"}"#),
                B64.encode(b"{}")
            ),
            JwtError::BadFormat,
        ),
        (
            format!(
                "{}.{}.c2ln",
                B64.encode(br#"{"alg":"none"}"#),
                B64.encode(b"{}")
            ),
            JwtError::HeaderNotImplementedAlg,
        ),
        ("!!!.e30.c2ln".into(), JwtError::HeaderBadBase64),
        (
            format!("{}.e30.c2ln", B64.encode(b"not json")),
            JwtError::HeaderBadJson,
        ),
        (
            format!("{}.e30.c2ln", B64.encode(br#"{"typ":"JWT"}"#)),
            JwtError::HeaderBadAlg,
        ),
        (
            format!(
                "{}.e30.c2ln",
                B64.encode(br#"{"alg":"HS256","crit":["exp"]}"#)
            ),
            JwtError::HeaderNotImplementedAlg,
        ),
        (
            format!("{}.!!!.c2ln", B64.encode(br#"{"alg":"HS256"}"#)),
            JwtError::PayloadBadBase64,
        ),
        (
            format!(
                "{}.{}.c2ln",
                B64.encode(br#"{"alg":"HS256"}"#),
                B64.encode(br#"{"exp":"soon"}"#)
            ),
            JwtError::ExpNotInteger,
        ),
        (
            format!(
                "{}.{}.c2ln",
                B64.encode(br#"{"alg":"HS256"}"#),
                B64.encode(br#"{"aud":7}"#)
            ),
            JwtError::AudNotString,
        ),
        (k.token(json!({"exp": now_secs() - 61})), JwtError::Expired),
        (
            k.token(json!({"nbf": now_secs() + 61})),
            JwtError::NotYetValid,
        ),
        ("x".repeat(MAX_TOKEN_BYTES + 1), JwtError::BadFormat),
    ];
    for (t, want) in cases {
        assert_eq!(check(&t, &jwks).unwrap_err(), want, "{t:.60}");
    }
    // Inside the 60 s skew: still valid.
    assert!(check(&k.token(json!({"exp": now_secs() - 59})), &jwks).is_ok());
    assert!(check(&k.token(json!({"nbf": now_secs() + 59})), &jwks).is_ok());
    assert_eq!(JwtError::Expired.message(), "Jwt is expired");
    assert_eq!(JwtError::AudienceNotAllowed.status(), 403);
}

#[test]
fn time_is_checked_before_the_signature() {
    let k = TestKey::new("HS256", "k");
    let jwks = Jwks::parse(TestKey::jwks(&[&k]).as_bytes()).unwrap();
    let t = k.token(json!({"exp": 1}));
    let garbage = format!("{}.AAAA", t.rsplit_once('.').unwrap().0);
    assert_eq!(check(&garbage, &jwks).unwrap_err(), JwtError::Expired);
}

#[test]
fn istio_sample_fixtures() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/istio-samples");
    let jwks = Jwks::parse(&std::fs::read(dir.join("jwks.json")).unwrap()).unwrap();
    for f in ["demo.jwt", "groups-scope.jwt"] {
        let t = std::fs::read_to_string(dir.join(f)).unwrap();
        let c = check(t.trim(), &jwks).unwrap_or_else(|e| panic!("{f}: {e:?}"));
        assert_eq!(c.iss, "testing@secure.istio.io");
        assert_eq!(c.sub, "testing@secure.istio.io");
    }
}

#[test]
fn bad_jwks_documents_are_errors_not_panics() {
    for doc in [
        &b"not json"[..],
        b"{}",
        b"{\"keys\": 5}",
        b"{\"keys\": []}",
        b"{\"keys\": [{\"kty\": \"RSA\"}]}",
        b"{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"AA\", \"y\": \"AA\"}]}",
        b"{\"keys\": [{\"kty\": \"RSA\", \"n\": \"AQAB\", \"e\": \"AQAB\"}]}",
        b"{\"keys\": [{\"kty\": \"XYZ\"}]}",
    ] {
        assert!(
            Jwks::parse(doc).is_err(),
            "{}",
            String::from_utf8_lossy(doc)
        );
    }
    assert!(Jwks::parse(&vec![b' '; keys::MAX_JWKS_BYTES + 1]).is_err());
}
