//! HAProxy's `jwt_verify` takes a PEM public key, not a JWKS: the RSA key of a JWK as a
//! SubjectPublicKeyInfo in PEM.
use anyhow::{Context, Result};
use base64::Engine;

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        let mut v = vec![0x80 | bytes.len() as u8];
        v.extend(bytes);
        v
    }
}

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(der_len(body.len()));
    v.extend_from_slice(body);
    v
}

fn uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    let mut v = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
        v.push(0);
    }
    v.extend(trimmed);
    tlv(0x02, &v)
}

/// PEM of the first RSA key in a JWKS document.
pub fn rsa_pem_from_jwks(jwks: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(jwks)?;
    let key = v["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["kty"] == "RSA"))
        .context("no RSA key in the JWKS")?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.decode(key["n"].as_str().context("n")?)?;
    let e = b64.decode(key["e"].as_str().context("e")?)?;
    let rsa_key = tlv(0x30, &[uint(&n), uint(&e)].concat());
    // rsaEncryption OID 1.2.840.113549.1.1.1, NULL parameters.
    let alg = tlv(
        0x30,
        &[
            tlv(
                0x06,
                &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
            ),
            vec![0x05, 0x00],
        ]
        .concat(),
    );
    let spki = tlv(
        0x30,
        &[alg, tlv(0x03, &[&[0u8][..], &rsa_key].concat())].concat(),
    );
    let body = base64::engine::general_purpose::STANDARD.encode(spki);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    Ok(format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn der_lengths() {
        assert_eq!(super::der_len(5), vec![5]);
        assert_eq!(super::der_len(0x80), vec![0x81, 0x80]);
        assert_eq!(super::der_len(270), vec![0x82, 0x01, 0x0e]);
        assert_eq!(super::uint(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
    }

    /// The PEM made from Istio's sample JWKS verifies Istio's sample token.
    #[test]
    fn pem_verifies_the_demo_token() {
        let jwks = std::fs::read_to_string(authz_tests::data_dir().join("istio-samples/jwks.json"))
            .unwrap();
        let pem = super::rsa_pem_from_jwks(&jwks).unwrap();
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let token = authz_tests::demo_jwt();
        jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
        let bad = authz_tests::tampered(&token);
        assert!(jsonwebtoken::decode::<serde_json::Value>(&bad, &key, &v).is_err());
    }
}
