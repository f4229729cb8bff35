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

impl Jwks {
    pub fn parse(bytes: &[u8]) -> Result<Jwks, String> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(format!("JWKS is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not valid JSON: {e}"))?;
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("JWKS has no \"keys\" array")?;
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
                Err(e) => errors.push(format!("keys[{i}]: {e}")),
            }
        }
        if out.keys.is_empty() {
            return Err(if errors.is_empty() {
                "Jwks doesn't have any valid public key".into()
            } else {
                format!(
                    "Jwks doesn't have any valid public key ({})",
                    errors.join("; ")
                )
            });
        }
        Ok(out)
    }
}

fn s<'a>(k: &'a Value, f: &str) -> Result<&'a str, String> {
    k.get(f)
        .and_then(Value::as_str)
        .filter(|x| !x.is_empty())
        .ok_or_else(|| format!("[{f}] field is missing or not a string"))
}

fn parse_key(k: &Value) -> Result<Option<Jwk>, String> {
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
            let nb = B64.decode(n).map_err(|_| "RSA [n] is not base64url")?;
            B64.decode(e).map_err(|_| "RSA [e] is not base64url")?;
            if nb.len() < 256 - 1 {
                return Err("RSA keys shorter than 2048 bits are refused".into());
            }
            (
                Kty::Rsa,
                Material::Std(DecodingKey::from_rsa_components(n, e).map_err(|e| e.to_string())?),
            )
        }
        "EC" => {
            let crv = s(k, "crv")?;
            let (x, y) = (s(k, "x")?, s(k, "y")?);
            let (xb, yb) = (
                B64.decode(x).map_err(|_| "EC [x] is not base64url")?,
                B64.decode(y).map_err(|_| "EC [y] is not base64url")?,
            );
            let want = match crv {
                "P-256" => 32,
                "P-384" => 48,
                "P-521" => 66,
                c => return Err(format!("EC curve {c:?} is not supported")),
            };
            if xb.len() != want || yb.len() != want {
                return Err(format!("EC {crv} coordinates must be {want} bytes"));
            }
            match crv {
                "P-256" => (
                    Kty::Ec256,
                    Material::Std(
                        DecodingKey::from_ec_components(x, y).map_err(|e| e.to_string())?,
                    ),
                ),
                "P-384" => (
                    Kty::Ec384,
                    Material::Std(
                        DecodingKey::from_ec_components(x, y).map_err(|e| e.to_string())?,
                    ),
                ),
                _ => {
                    let mut sec1 = Vec::with_capacity(133);
                    sec1.push(4);
                    sec1.extend_from_slice(&xb);
                    sec1.extend_from_slice(&yb);
                    let vk = p521::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                        .map_err(|_| "EC P-521 point is not on the curve")?;
                    (Kty::Ec521, Material::P521(Box::new(vk)))
                }
            }
        }
        "oct" => {
            let kb = B64
                .decode(s(k, "k")?)
                .map_err(|_| "oct [k] is not base64url")?;
            (Kty::Oct, Material::Std(DecodingKey::from_secret(&kb)))
        }
        "OKP" => {
            if s(k, "crv")? != "Ed25519" {
                return Err("OKP curve must be Ed25519".into());
            }
            let x = s(k, "x")?;
            if B64.decode(x).map_err(|_| "OKP [x] is not base64url")?.len() != 32 {
                return Err("Ed25519 [x] must be 32 bytes".into());
            }
            (
                Kty::Ed25519,
                Material::Std(DecodingKey::from_ed_components(x).map_err(|e| e.to_string())?),
            )
        }
        other => return Err(format!("kty {other:?} is not supported")),
    };
    Ok(Some(Jwk {
        kid,
        alg,
        kty,
        material,
    }))
}
