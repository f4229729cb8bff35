//! JWTs: parsing, checks in Envoy's order (format, issuer, time, audience, signature), the
//! exact jwt_verify_lib status strings, and the verified-token cache.
use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use serde_json::Value;

pub mod cache;
pub mod extract;
pub mod keys;
pub mod remote;

use keys::{Jwks, Material};

/// Clock skew allowed on `exp` and `nbf` (Envoy's default).
pub const CLOCK_SKEW_SECS: i64 = 60;
/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtError {
    BadFormat,
    HeaderBadBase64,
    HeaderBadJson,
    HeaderBadAlg,
    HeaderNotImplementedAlg,
    HeaderBadKid,
    PayloadBadBase64,
    PayloadBadJson,
    IssNotString,
    SubNotString,
    IatNotInteger,
    NbfNotInteger,
    ExpNotInteger,
    AudNotString,
    SignatureBadBase64,
    UnknownIssuer,
    AudienceNotAllowed,
    Expired,
    NotYetValid,
    VerificationFail,
    KidAlgMismatch,
    FetchFail,
    NoValidKeys,
}

impl JwtError {
    /// The reply body Envoy sends (jwt_verify_lib status strings).
    pub fn message(self) -> &'static str {
        use JwtError::*;
        match self {
            BadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            HeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
            HeaderBadJson => "Jwt header is an invalid JSON",
            HeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            HeaderNotImplementedAlg => "Jwt header [alg] is not supported",
            HeaderBadKid => "Jwt header [kid] field is not a string",
            PayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
            PayloadBadJson => "Jwt payload is an invalid JSON",
            IssNotString => "Jwt payload [iss] field is not a string",
            SubNotString => "Jwt payload [sub] field is not a string",
            IatNotInteger => "Jwt payload [iat] field is not an integer",
            NbfNotInteger => "Jwt payload [nbf] field is not an integer",
            ExpNotInteger => "Jwt payload [exp] field is not an integer",
            AudNotString => "Jwt payload [aud] field is not a string or string list",
            SignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
            UnknownIssuer => "Jwt issuer is not configured",
            AudienceNotAllowed => "Audiences in Jwt are not allowed",
            Expired => "Jwt is expired",
            NotYetValid => "Jwt not yet valid",
            VerificationFail => "Jwt verification fails",
            KidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            FetchFail => "Jwks remote fetch is failed",
            NoValidKeys => "Jwks doesn't have any valid public key",
        }
    }

    pub fn status(self) -> u16 {
        if self == JwtError::AudienceNotAllowed {
            403
        } else {
            401
        }
    }

    /// How much an error says about a token: a real verdict beats "not my issuer".
    pub fn weight(self) -> u8 {
        if self == JwtError::UnknownIssuer {
            1
        } else {
            2
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::upper_case_acronyms)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    ES512,
    HS256,
    HS384,
    HS512,
    EdDSA,
}

impl Alg {
    fn parse(s: &str) -> Option<Alg> {
        use Alg::*;
        Some(match s {
            "RS256" => RS256,
            "RS384" => RS384,
            "RS512" => RS512,
            "PS256" => PS256,
            "PS384" => PS384,
            "PS512" => PS512,
            "ES256" => ES256,
            "ES384" => ES384,
            "ES512" => ES512,
            "HS256" => HS256,
            "HS384" => HS384,
            "HS512" => HS512,
            "EdDSA" => EdDSA,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        use Alg::*;
        match self {
            RS256 => "RS256",
            RS384 => "RS384",
            RS512 => "RS512",
            PS256 => "PS256",
            PS384 => "PS384",
            PS512 => "PS512",
            ES256 => "ES256",
            ES384 => "ES384",
            ES512 => "ES512",
            HS256 => "HS256",
            HS384 => "HS384",
            HS512 => "HS512",
            EdDSA => "EdDSA",
        }
    }
    fn jsonwebtoken(self) -> Option<jsonwebtoken::Algorithm> {
        use jsonwebtoken::Algorithm as A;
        Some(match self {
            Alg::RS256 => A::RS256,
            Alg::RS384 => A::RS384,
            Alg::RS512 => A::RS512,
            Alg::PS256 => A::PS256,
            Alg::PS384 => A::PS384,
            Alg::PS512 => A::PS512,
            Alg::ES256 => A::ES256,
            Alg::ES384 => A::ES384,
            Alg::HS256 => A::HS256,
            Alg::HS384 => A::HS384,
            Alg::HS512 => A::HS512,
            Alg::EdDSA => A::EdDSA,
            Alg::ES512 => return None,
        })
    }
}

/// The parts of a token every check needs.
#[derive(Debug, Clone)]
pub struct Claims {
    pub alg: Alg,
    pub kid: Option<String>,
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    pub payload: Arc<Value>,
    /// The payload segment as received (for outputPayloadToHeader).
    pub payload_b64: String,
}

fn int_claim(v: Option<&Value>, err: JwtError) -> Result<Option<i64>, JwtError> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or(err),
        Some(_) => Err(err),
    }
}

/// Parses a token without verifying it. Cheap failures first.
pub fn parse(token: &str) -> Result<(Claims, &str, &str), JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::BadFormat);
    }
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(sig), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(JwtError::BadFormat);
    };
    if sig.is_empty() {
        // Unsigned (alg "none") tokens: Envoy answers with the format error.
        return Err(JwtError::BadFormat);
    }
    let hb = B64
        .decode(h.trim_end_matches('='))
        .map_err(|_| JwtError::HeaderBadBase64)?;
    let header: Value = serde_json::from_slice(&hb).map_err(|_| JwtError::HeaderBadJson)?;
    let header = header.as_object().ok_or(JwtError::HeaderBadJson)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::HeaderBadAlg)?;
    let alg = Alg::parse(alg).ok_or(JwtError::HeaderNotImplementedAlg)?;
    if header.contains_key("crit") {
        // No extension is understood, so a token that demands one is refused (RFC 7515 4.1.11).
        return Err(JwtError::HeaderNotImplementedAlg);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::HeaderBadKid),
    };
    let pb = B64
        .decode(p.trim_end_matches('='))
        .map_err(|_| JwtError::PayloadBadBase64)?;
    let payload: Value = serde_json::from_slice(&pb).map_err(|_| JwtError::PayloadBadJson)?;
    let obj = payload.as_object().ok_or(JwtError::PayloadBadJson)?;
    let string = |k: &str, e| match obj.get(k) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(e),
    };
    let iss = string("iss", JwtError::IssNotString)?;
    let sub = string("sub", JwtError::SubNotString)?;
    int_claim(obj.get("iat"), JwtError::IatNotInteger)?;
    let nbf = int_claim(obj.get("nbf"), JwtError::NbfNotInteger)?;
    let exp = int_claim(obj.get("exp"), JwtError::ExpNotInteger)?;
    let aud = match obj.get("aud") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or(JwtError::AudNotString)?,
        Some(_) => return Err(JwtError::AudNotString),
    };
    Ok((
        Claims {
            alg,
            kid,
            iss,
            sub,
            aud,
            exp,
            nbf,
            payload: Arc::new(payload),
            payload_b64: p.to_string(),
        },
        &token[..h.len() + 1 + p.len()],
        sig,
    ))
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn check_time(c: &Claims, now: i64) -> Result<(), JwtError> {
    if c.exp
        .is_some_and(|exp| now > exp.saturating_add(CLOCK_SKEW_SECS))
    {
        return Err(JwtError::Expired);
    }
    if c.nbf
        .is_some_and(|nbf| nbf > now.saturating_add(CLOCK_SKEW_SECS))
    {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

pub fn check_audience(c: &Claims, allowed: &[String]) -> Result<(), JwtError> {
    if allowed.is_empty()
        || c.aud
            .iter()
            .any(|a| allowed.iter().any(|b| norm_aud(a) == norm_aud(b)))
    {
        Ok(())
    } else {
        Err(JwtError::AudienceNotAllowed)
    }
}

/// Envoy compares audiences without scheme and trailing slash.
fn norm_aud(a: &str) -> &str {
    let a = a
        .strip_prefix("https://")
        .or_else(|| a.strip_prefix("http://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

/// Signature check against a JWKS, selecting keys as jwt_verify_lib does: a kid on both sides
/// must agree, a key's alg must equal the token's, the key type must fit; first success wins.
pub fn verify_signature(
    c: &Claims,
    signed: &str,
    sig_b64: &str,
    jwks: &Jwks,
) -> Result<(), JwtError> {
    let sig = B64
        .decode(sig_b64.trim_end_matches('='))
        .map_err(|_| JwtError::SignatureBadBase64)?;
    let mut tried = false;
    for k in &jwks.keys {
        if let (Some(a), Some(b)) = (&c.kid, &k.kid) {
            if a != b {
                continue;
            }
        }
        if k.alg.as_deref().is_some_and(|a| a != c.alg.name()) || !k.kty.fits(c.alg) {
            continue;
        }
        tried = true;
        let ok = match &k.material {
            Material::P521(vk) => {
                use p521::ecdsa::signature::Verifier;
                p521::ecdsa::Signature::from_slice(&sig)
                    .is_ok_and(|s| vk.verify(signed.as_bytes(), &s).is_ok())
            }
            Material::Std(dk) => match c.alg.jsonwebtoken() {
                Some(alg) => jsonwebtoken::crypto::verify(
                    sig_b64.trim_end_matches('='),
                    signed.as_bytes(),
                    dk,
                    alg,
                )
                .unwrap_or(false),
                None => false,
            },
        };
        if ok {
            return Ok(());
        }
    }
    Err(if tried {
        JwtError::VerificationFail
    } else {
        JwtError::KidAlgMismatch
    })
}

#[cfg(any(test, feature = "testkeys"))]
pub mod testkeys;
#[cfg(test)]
mod tests;
