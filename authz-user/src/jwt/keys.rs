//! JWKS documents: parsing (every byte is hostile: errors with a reason, never a panic) and
//! key selection by kid/alg as jwt_verify_lib does it.
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use jsonwebtoken::DecodingKey;
use serde_json::Value;

use super::Alg;

pub enum Material {
    Std(DecodingKey),
    /// jsonwebtoken has no ES512.
    P521(Box<p521::ecdsa::VerifyingKey>),
}

pub struct Jwk {
    pub kid: Option<String>,
    pub alg: Option<String>,
    pub kty: Kty,
    pub material: Material,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kty {
    Rsa,
    Ec256,
    Ec384,
    Ec521,
    Oct,
    Ed25519,
}

impl Kty {
    pub fn fits(self, alg: Alg) -> bool {
        use Alg::*;
        matches!(
            (self, alg),
            (Kty::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (Kty::Ec256, ES256)
                | (Kty::Ec384, ES384)
                | (Kty::Ec521, ES512)
                | (Kty::Oct, HS256 | HS384 | HS512)
                | (Kty::Ed25519, EdDSA)
        )
    }
}

pub struct Jwks {
    pub keys: Vec<Jwk>,
    pub has_private_material: bool,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwks({} keys)", self.keys.len())
    }
}

/// Largest JWKS document accepted, inline or fetched.
pub const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why a JWKS document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("JWKS is not valid JSON: {0}")]
    NotJson(String),
    #[error("JWKS has no \"keys\" array")]
    NoKeysArray,
    /// Envoy's wording, with why each key was refused.
    #[error("Jwks doesn't have any valid public key{}", list(.0))]
    NoValidKey(Vec<(usize, KeyError)>),
}

fn list(errors: &[(usize, KeyError)]) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|(i, e)| format!("keys[{i}]: {e}"))
        .collect();
    format!(" ({})", parts.join("; "))
}

/// Why one key of a set is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("[{0}] field is missing or not a string")]
    Missing(&'static str),
    #[error("{0} is not base64url")]
    NotBase64(&'static str),
    #[error("RSA keys shorter than 2048 bits are refused")]
    RsaTooShort,
    #[error("EC curve {0:?} is not supported")]
    UnsupportedCurve(String),
    #[error("EC {curve} coordinates must be {bytes} bytes")]
    CoordinateSize { curve: &'static str, bytes: usize },
    #[error("EC P-521 point is not on the curve")]
    NotOnCurve,
    #[error("OKP curve must be Ed25519")]
    OkpCurve,
    #[error("Ed25519 [x] must be 32 bytes")]
    Ed25519Size,
    #[error("kty {0:?} is not supported")]
    UnsupportedKty(String),
    #[error("{0}")]
    Decoding(String),
}

impl Jwks {
    pub fn parse(bytes: &[u8]) -> Result<Jwks, JwksError> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| JwksError::NotJson(e.to_string()))?;
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NoKeysArray)?;
        let mut out = Jwks {
            keys: Vec::new(),
            has_private_material: false,
        };
        let mut errors = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if k.get("d").is_some() || k.get("p").is_some() {
                out.has_private_material = true;
            }
            match parse_key(k) {
                Ok(Some(j)) => out.keys.push(j),
                Ok(None) => {}
                Err(e) => errors.push((i, e)),
            }
        }
        if out.keys.is_empty() {
            return Err(JwksError::NoValidKey(errors));
        }
        Ok(out)
    }
}

fn s<'a>(k: &'a Value, f: &'static str) -> Result<&'a str, KeyError> {
    k.get(f)
        .and_then(Value::as_str)
        .filter(|x| !x.is_empty())
        .ok_or(KeyError::Missing(f))
}

fn b64(v: &str, what: &'static str) -> Result<Vec<u8>, KeyError> {
    B64.decode(v).map_err(|_| KeyError::NotBase64(what))
}

fn decoding(e: jsonwebtoken::errors::Error) -> KeyError {
    KeyError::Decoding(e.to_string())
}

fn parse_key(k: &Value) -> Result<Option<Jwk>, KeyError> {
    let kty = s(k, "kty")?;
    let kid = k.get("kid").and_then(Value::as_str).map(String::from);
    let alg = k.get("alg").and_then(Value::as_str).map(String::from);
    if k.get("use")
        .and_then(Value::as_str)
        .is_some_and(|u| u != "sig")
    {
        return Ok(None);
    }
    let (kty, material) = match kty {
        "RSA" => {
            let (n, e) = (s(k, "n")?, s(k, "e")?);
            let nb = b64(n, "RSA [n]")?;
            b64(e, "RSA [e]")?;
            if nb.len() < 256 - 1 {
                return Err(KeyError::RsaTooShort);
            }
            (
                Kty::Rsa,
                Material::Std(DecodingKey::from_rsa_components(n, e).map_err(decoding)?),
            )
        }
        "EC" => {
            let crv = s(k, "crv")?;
            let (x, y) = (s(k, "x")?, s(k, "y")?);
            let (xb, yb) = (b64(x, "EC [x]")?, b64(y, "EC [y]")?);
            let (curve, bytes) = match crv {
                "P-256" => ("P-256", 32),
                "P-384" => ("P-384", 48),
                "P-521" => ("P-521", 66),
                c => return Err(KeyError::UnsupportedCurve(c.into())),
            };
            if xb.len() != bytes || yb.len() != bytes {
                return Err(KeyError::CoordinateSize { curve, bytes });
            }
            match curve {
                "P-256" => (
                    Kty::Ec256,
                    Material::Std(DecodingKey::from_ec_components(x, y).map_err(decoding)?),
                ),
                "P-384" => (
                    Kty::Ec384,
                    Material::Std(DecodingKey::from_ec_components(x, y).map_err(decoding)?),
                ),
                _ => {
                    let mut sec1 = Vec::with_capacity(133);
                    sec1.push(4);
                    sec1.extend_from_slice(&xb);
                    sec1.extend_from_slice(&yb);
                    let vk = p521::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                        .map_err(|_| KeyError::NotOnCurve)?;
                    (Kty::Ec521, Material::P521(Box::new(vk)))
                }
            }
        }
        "oct" => {
            let kb = b64(s(k, "k")?, "oct [k]")?;
            (Kty::Oct, Material::Std(DecodingKey::from_secret(&kb)))
        }
        "OKP" => {
            if s(k, "crv")? != "Ed25519" {
                return Err(KeyError::OkpCurve);
            }
            let x = s(k, "x")?;
            if b64(x, "OKP [x]")?.len() != 32 {
                return Err(KeyError::Ed25519Size);
            }
            (
                Kty::Ed25519,
                Material::Std(DecodingKey::from_ed_components(x).map_err(decoding)?),
            )
        }
        other => return Err(KeyError::UnsupportedKty(other.into())),
    };
    Ok(Some(Jwk {
        kid,
        alg,
        kty,
        material,
    }))
}
