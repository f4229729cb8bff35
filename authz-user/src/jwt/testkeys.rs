//! Keys and signed tokens for every algorithm, for tests and benchmarks (feature `testkeys`).
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use serde_json::json;

/// Signs a JWT's signing input.
type Signer = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// A signing key and its public JWK.
pub struct TestKey {
    pub alg: &'static str,
    pub jwk: serde_json::Value,
    sign: Signer,
}

fn b64(b: &[u8]) -> String {
    B64.encode(b)
}

impl TestKey {
    pub fn new(alg: &'static str, kid: &str) -> TestKey {
        use aws_lc_rs::{
            rand::SystemRandom,
            signature::{self, KeyPair},
        };
        let rng = SystemRandom::new();
        match alg {
            "HS256" | "HS384" | "HS512" => {
                let mut secret = vec![0u8; 48];
                aws_lc_rs::rand::fill(&mut secret).unwrap();
                let a = match alg {
                    "HS256" => aws_lc_rs::hmac::HMAC_SHA256,
                    "HS384" => aws_lc_rs::hmac::HMAC_SHA384,
                    _ => aws_lc_rs::hmac::HMAC_SHA512,
                };
                let key = aws_lc_rs::hmac::Key::new(a, &secret);
                TestKey {
                    alg,
                    jwk: json!({"kty": "oct", "kid": kid, "k": b64(&secret)}),
                    sign: Box::new(move |m| aws_lc_rs::hmac::sign(&key, m).as_ref().to_vec()),
                }
            }
            "ES256" | "ES384" => {
                let (sa, crv, n) = if alg == "ES256" {
                    (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)
                } else {
                    (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)
                };
                let doc = signature::EcdsaKeyPair::generate_pkcs8(sa, &rng).unwrap();
                let kp = signature::EcdsaKeyPair::from_pkcs8(sa, doc.as_ref()).unwrap();
                let pt = kp.public_key().as_ref().to_vec();
                let jwk = json!({"kty": "EC", "kid": kid, "crv": crv, "x": b64(&pt[1..1 + n]), "y": b64(&pt[1 + n..])});
                TestKey {
                    alg,
                    jwk,
                    sign: Box::new(move |m| {
                        kp.sign(&SystemRandom::new(), m).unwrap().as_ref().to_vec()
                    }),
                }
            }
            "ES512" => {
                use p521::ecdsa::{signature::Signer, Signature, SigningKey};
                let sk = SigningKey::random(&mut rand_core::OsRng);
                let pt = p521::ecdsa::VerifyingKey::from(&sk).to_encoded_point(false);
                let jwk = json!({"kty": "EC", "kid": kid, "crv": "P-521", "x": b64(pt.x().unwrap()), "y": b64(pt.y().unwrap())});
                TestKey {
                    alg,
                    jwk,
                    sign: Box::new(move |m| {
                        let s: Signature = sk.sign(m);
                        s.to_bytes().to_vec()
                    }),
                }
            }
            "EdDSA" => {
                let doc = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let kp = signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
                let jwk = json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(kp.public_key().as_ref())});
                TestKey {
                    alg,
                    jwk,
                    sign: Box::new(move |m| kp.sign(m).as_ref().to_vec()),
                }
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
        let h = b64(json!({"alg": self.alg, "kid": kid, "typ": "JWT"})
            .to_string()
            .as_bytes());
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
        let run = |args: &[&str]| {
            assert!(
                std::process::Command::new("openssl")
                    .args(args)
                    .output()
                    .unwrap()
                    .status
                    .success(),
                "openssl {args:?}"
            )
        };
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            pem.to_str().unwrap(),
        ]);
        run(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            pem.to_str().unwrap(),
            "-outform",
            "DER",
            "-out",
            der.to_str().unwrap(),
        ]);
        let out = std::process::Command::new("openssl")
            .args(["rsa", "-in", pem.to_str().unwrap(), "-noout", "-modulus"])
            .output()
            .unwrap();
        let hex = String::from_utf8(out.stdout).unwrap();
        let hex = hex.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let d = std::fs::read(&der).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (d, n)
    })
    .clone()
}

pub const ALGS: [&str; 13] = [
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256",
    "PS384", "PS512", "EdDSA",
];
