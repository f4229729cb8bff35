//! Tokens and keys made here for every algorithm, plus the Istio sample fixtures.
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use serde_json::json;

use super::{keys::Jwks, *};

/// A signing key and its public JWK.
pub struct TestKey {
    pub alg: &'static str,
    pub jwk: serde_json::Value,
    sign: Box<dyn Fn(&[u8]) -> Vec<u8>>,
}

fn b64(b: &[u8]) -> String {
    B64.encode(b)
}

impl TestKey {
    pub fn new(alg: &'static str, kid: &str) -> TestKey {
        use aws_lc_rs::{rand::SystemRandom, signature::{self, KeyPair}};
        let rng = SystemRandom::new();
        match alg {
            "HS256" | "HS384" | "HS512" => {
                let mut secret = vec![0u8; 48];
                aws_lc_rs::rand::fill(&mut secret).unwrap();
                let a = match alg { "HS256" => aws_lc_rs::hmac::HMAC_SHA256, "HS384" => aws_lc_rs::hmac::HMAC_SHA384, _ => aws_lc_rs::hmac::HMAC_SHA512 };
                let key = aws_lc_rs::hmac::Key::new(a, &secret);
                TestKey { alg, jwk: json!({"kty": "oct", "kid": kid, "k": b64(&secret)}), sign: Box::new(move |m| aws_lc_rs::hmac::sign(&key, m).as_ref().to_vec()) }
            }
            "ES256" | "ES384" => {
                let (sa, crv, n) = if alg == "ES256" { (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32) } else { (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48) };
                let doc = signature::EcdsaKeyPair::generate_pkcs8(sa, &rng).unwrap();
                let kp = signature::EcdsaKeyPair::from_pkcs8(sa, doc.as_ref()).unwrap();
                let pt = kp.public_key().as_ref().to_vec();
                let jwk = json!({"kty": "EC", "kid": kid, "crv": crv, "x": b64(&pt[1..1 + n]), "y": b64(&pt[1 + n..])});
                TestKey { alg, jwk, sign: Box::new(move |m| kp.sign(&SystemRandom::new(), m).unwrap().as_ref().to_vec()) }
            }
            "ES512" => {
                use p521::ecdsa::{signature::Signer, Signature, SigningKey};
                let sk = SigningKey::random(&mut rand_core::OsRng);
                let pt = p521::ecdsa::VerifyingKey::from(&sk).to_encoded_point(false);
                let jwk = json!({"kty": "EC", "kid": kid, "crv": "P-521", "x": b64(pt.x().unwrap()), "y": b64(pt.y().unwrap())});
                TestKey { alg, jwk, sign: Box::new(move |m| { let s: Signature = sk.sign(m); s.to_bytes().to_vec() }) }
            }
            "EdDSA" => {
                let doc = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let kp = signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
                let jwk = json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(kp.public_key().as_ref())});
                TestKey { alg, jwk, sign: Box::new(move |m| kp.sign(m).as_ref().to_vec()) }
            }
            _ => {
                // RSA: one 2048-bit key from openssl, shared by the RS*/PS* cases.
                let (der, n) = rsa_key();
                let kp = signature::RsaKeyPair::from_pkcs8(&der).unwrap();
                let pad: &'static dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    _ => &signature::RSA_PSS_SHA512,
                };
                let jwk = json!({"kty": "RSA", "kid": kid, "n": b64(&n), "e": "AQAB"});
                TestKey {
                    alg,
                    jwk,
                    sign: Box::new(move |m| {
                        let mut sig = vec![0; kp.public_modulus_len()];
                        kp.sign(pad, &SystemRandom::new(), m, &mut sig).unwrap();
                        sig
                    }),
                }
            }
        }
    }

    pub fn token(&self, payload: serde_json::Value) -> String {
        let kid = self.jwk["kid"].as_str().unwrap();
        let h = b64(json!({"alg": self.alg, "kid": kid, "typ": "JWT"}).to_string().as_bytes());
        let p = b64(payload.to_string().as_bytes());
        let signed = format!("{h}.{p}");
        format!("{signed}.{}", b64(&(self.sign)(signed.as_bytes())))
    }

    pub fn jwks(keys: &[&TestKey]) -> String {
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
    }
}

fn rsa_key() -> (Vec<u8>, Vec<u8>) {
    static KEY: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("authz-rsa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("k.pem");
        let der = dir.join("k.der");
        let run = |args: &[&str]| assert!(std::process::Command::new("openssl").args(args).output().unwrap().status.success(), "openssl {args:?}");
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", pem.to_str().unwrap()]);
        run(&["pkcs8", "-topk8", "-nocrypt", "-in", pem.to_str().unwrap(), "-outform", "DER", "-out", der.to_str().unwrap()]);
        let out = std::process::Command::new("openssl").args(["rsa", "-in", pem.to_str().unwrap(), "-noout", "-modulus"]).output().unwrap();
        let hex = String::from_utf8(out.stdout).unwrap();
        let hex = hex.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let d = std::fs::read(&der).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (d, n)
    })
    .clone()
}

pub const ALGS: [&str; 13] = ["ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"];

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
        let jwks = Jwks::parse(TestKey::jwks(&[&k]).as_bytes()).unwrap_or_else(|e| panic!("{alg}: {e}"));
        let t = k.token(json!({"iss": "i", "sub": "s", "exp": now_secs() + 600}));
        let c = check(&t, &jwks).unwrap_or_else(|e| panic!("{alg}: {e:?}"));
        assert_eq!(c.iss, "i");
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let mut sig = B64.decode(sig).unwrap();
        sig[5] ^= 1;
        let forged = format!("{signed}.{}", B64.encode(&sig));
        assert_eq!(check(&forged, &jwks).unwrap_err(), JwtError::VerificationFail, "{alg}");
    }
}

#[test]
fn key_selection_by_kid_and_alg() {
    let a = TestKey::new("ES256", "a");
    let b = TestKey::new("ES256", "b");
    let jwks = Jwks::parse(TestKey::jwks(&[&a, &b]).as_bytes()).unwrap();
    assert!(check(&b.token(json!({"iss": "i"})), &jwks).is_ok(), "kid b picks key b");
    let c = TestKey::new("ES256", "c");
    assert_eq!(check(&c.token(json!({})), &jwks).unwrap_err(), JwtError::KidAlgMismatch, "unknown kid");
    // A key whose alg differs from the token's is skipped.
    let mut jwk = a.jwk.clone();
    jwk["alg"] = json!("ES384");
    let jwks = Jwks::parse(json!({"keys": [jwk]}).to_string().as_bytes()).unwrap();
    assert_eq!(check(&a.token(json!({})), &jwks).unwrap_err(), JwtError::KidAlgMismatch);
    // HS/RS confusion: an HS256 token "signed" with the RSA public key finds no oct key.
    let rs = TestKey::new("RS256", "r");
    let rs_jwks = Jwks::parse(TestKey::jwks(&[&rs]).as_bytes()).unwrap();
    let h = B64.encode(br#"{"alg":"HS256","kid":"r"}"#);
    let p = B64.encode(br#"{"iss":"i"}"#);
    let mac = aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, rs.jwk["n"].as_str().unwrap().as_bytes()), format!("{h}.{p}").as_bytes());
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
        (format!("{}.{}.", B64.encode(br#"{"alg":"none"}"#), B64.encode(b"{}")), JwtError::BadFormat),
        (format!("{}.{}.c2ln", B64.encode(br#"{"alg":"none"}"#), B64.encode(b"{}")), JwtError::HeaderNotImplementedAlg),
        ("!!!.e30.c2ln".into(), JwtError::HeaderBadBase64),
        (format!("{}.e30.c2ln", B64.encode(b"not json")), JwtError::HeaderBadJson),
        (format!("{}.e30.c2ln", B64.encode(br#"{"typ":"JWT"}"#)), JwtError::HeaderBadAlg),
        (format!("{}.e30.c2ln", B64.encode(br#"{"alg":"HS256","crit":["exp"]}"#)), JwtError::HeaderNotImplementedAlg),
        (format!("{}.!!!.c2ln", B64.encode(br#"{"alg":"HS256"}"#)), JwtError::PayloadBadBase64),
        (format!("{}.{}.c2ln", B64.encode(br#"{"alg":"HS256"}"#), B64.encode(br#"{"exp":"soon"}"#)), JwtError::ExpNotInteger),
        (format!("{}.{}.c2ln", B64.encode(br#"{"alg":"HS256"}"#), B64.encode(br#"{"aud":7}"#)), JwtError::AudNotString),
        (k.token(json!({"exp": now_secs() - 61})), JwtError::Expired),
        (k.token(json!({"nbf": now_secs() + 61})), JwtError::NotYetValid),
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
    for doc in [&b"not json"[..], b"{}", b"{\"keys\": 5}", b"{\"keys\": []}", b"{\"keys\": [{\"kty\": \"RSA\"}]}", b"{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"AA\", \"y\": \"AA\"}]}", b"{\"keys\": [{\"kty\": \"RSA\", \"n\": \"AQAB\", \"e\": \"AQAB\"}]}", b"{\"keys\": [{\"kty\": \"XYZ\"}]}"] {
        assert!(Jwks::parse(doc).is_err(), "{}", String::from_utf8_lossy(doc));
    }
    assert!(Jwks::parse(&vec![b' '; keys::MAX_JWKS_BYTES + 1]).is_err());
}
