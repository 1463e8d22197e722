//! Keys for the registry tokens: Berth's own ECDSA P-256 signing keys (made
//! here or read from a PEM file), and the public keys of an external token
//! issuer (PEM keys or certificates, or a JWKS document).

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot generate a signing key")]
    Generate,
    #[error("not an ECDSA P-256 private key: {0}")]
    NotP256(String),
    #[error("no private key in the PEM file")]
    NoKey,
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error(
        "no usable public key (RSA, ECDSA P-256/P-384 or Ed25519, as a public key or certificate) in the file"
    )]
    NoPublicKey,
    #[error("invalid JWKS document: {0}")]
    Jwks(String),
}

/// One of Berth's signing keys. Tokens carry its id (`kid`), so that keys
/// can be rotated: every key still listed verifies, the newest signs.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    public: Vec<u8>,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.kid)
    }
}

/// A key id: the first 96 bits of the SHA-256 of the public key, in
/// base64url (16 characters).
pub fn key_id(public: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&Sha256::digest(public)[..12])
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, KeyError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Generate)?;
        SigningKey::from_pkcs8(doc.as_ref())
    }

    /// From PKCS#8 or SEC1 (`EC PRIVATE KEY`) DER.
    pub fn from_der(der: &[u8]) -> Result<SigningKey, KeyError> {
        let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| KeyError::NotP256(e.to_string()))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| KeyError::NotP256("cannot serialize".into()))?;
        SigningKey::from_pkcs8(pkcs8.as_ref())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, KeyError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|e| KeyError::NotP256(e.to_string()))?;
        let public = pair.public_key().as_ref().to_vec();
        Ok(SigningKey {
            kid: key_id(&public),
            pkcs8: pkcs8.to_vec(),
            encoding: EncodingKey::from_ec_der(pkcs8),
            public,
        })
    }

    /// Every private key in a PEM file, in order (the first signs; the
    /// others verify tokens signed before a rotation).
    pub fn from_pem(pem: &[u8]) -> Result<Vec<SigningKey>, KeyError> {
        let mut keys = Vec::new();
        for item in rustls_pki_types::PrivateKeyDer::pem_slice_iter(pem) {
            let key = item.map_err(|e| KeyError::Pem(e.to_string()))?;
            keys.push(SigningKey::from_der(key.secret_der())?);
        }
        if keys.is_empty() {
            return Err(KeyError::NoKey);
        }
        Ok(keys)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub(crate) fn encoding(&self) -> &EncodingKey {
        &self.encoding
    }

    pub fn verifying(&self) -> VerifyingKey {
        VerifyingKey {
            kid: Some(self.kid.clone()),
            key: DecodingKey::from_ec_der(&self.public),
            algorithms: vec![Algorithm::ES256],
        }
    }

    /// The public key as a JWK (for `/auth/jwks`).
    pub fn jwk(&self) -> serde_json::Value {
        // An uncompressed point: 0x04 || x || y.
        let (x, y) = self.public[1..].split_at(32);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
            "kid": self.kid, "x": b64(x), "y": b64(y),
        })
    }
}

/// A public key that verifies tokens, with the algorithms it may be used
/// with (never HMAC: a public key must not double as a shared secret).
#[derive(Clone)]
pub struct VerifyingKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({:?}, {:?})", self.kid, self.algorithms)
    }
}

impl VerifyingKey {
    /// Every public key or certificate in a PEM file.
    pub fn from_pem(pem: &[u8]) -> Result<Vec<VerifyingKey>, KeyError> {
        let text = std::str::from_utf8(pem).map_err(|_| KeyError::Pem("not text".into()))?;
        let out: Vec<VerifyingKey> = pem_blocks(text)
            .filter_map(|block| public_key(block.as_bytes()))
            .collect();
        if out.is_empty() {
            return Err(KeyError::NoPublicKey);
        }
        Ok(out)
    }

    /// The signature keys of a JWKS document.
    pub fn from_jwks(json: &[u8]) -> Result<Vec<VerifyingKey>, KeyError> {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(json).map_err(|e| KeyError::Jwks(e.to_string()))?;
        let mut out = Vec::new();
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let family = key.family();
            let algorithms: Vec<Algorithm> = match jwk.common.key_algorithm {
                Some(alg) => match alg.to_string().parse::<Algorithm>() {
                    Ok(a) if a.family() == family => vec![a],
                    _ => continue,
                },
                None => family.algorithms().to_vec(),
            };
            if algorithms.is_empty() || family == jsonwebtoken::AlgorithmFamily::Hmac {
                continue;
            }
            out.push(VerifyingKey {
                kid: jwk.common.key_id.clone(),
                key,
                algorithms,
            });
        }
        if out.is_empty() {
            return Err(KeyError::Jwks("no usable signature key".into()));
        }
        Ok(out)
    }
}

/// The `-----BEGIN ...-----` to `-----END ...-----` blocks of a PEM text
/// (the JWT crate reads only the first block it is given).
fn pem_blocks(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let start = rest.find("-----BEGIN ")?;
        let end_marker = start + rest[start..].find("-----END ")?;
        let after = end_marker + "-----END ".len();
        let close = after + rest[after..].find("-----")? + "-----".len();
        let block = &rest[start..close];
        rest = &rest[close..];
        Some(block)
    })
}

fn public_key(pem: &[u8]) -> Option<VerifyingKey> {
    use jsonwebtoken::AlgorithmFamily;
    let (key, family) = if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        (k, AlgorithmFamily::Ec)
    } else if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        (k, AlgorithmFamily::Rsa)
    } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        (k, AlgorithmFamily::Ed)
    } else {
        return None;
    };
    Some(VerifyingKey {
        kid: None,
        key,
        algorithms: family.algorithms().to_vec(),
    })
}
