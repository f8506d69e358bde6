//! The institution's signature on dynamic BR Code payloads: a JWS (RFC 7515, compact form) with
//! ES256 (ECDSA P-256, SHA-256), as the Pix security manual lets a receiving PSP sign what it serves
//! at a location. The key is made once per database, kept sealed under the vault (the platform's
//! data key) as a document, and loaded once per node; its public half is served as a JWK Set at
//! the URL the JWS header's `jku` names.

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::oauth::{base64_decode, base64_encode};
use crate::vault_service::{VaultFailure, VaultService};

/// The document holding the sealed key (the platform's: tenant 0, which no tenant has).
pub const KEY_KIND: &str = "pix-jws-key";
const KEY_ID: &str = "es256";
const PLATFORM: u128 = 0;
const KEY_RECORD: &[u8] = b"pix-jws-key:es256";

pub struct PayloadSigner {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    /// The RFC 7638 thumbprint of the public key.
    kid: String,
    jwk: Value,
}

impl std::fmt::Debug for PayloadSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PayloadSigner(kid {})", self.kid)
    }
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    /// The PKCS#8 document, sealed, base64.
    sealed: String,
}

/// Base64url without padding (RFC 7515 §2).
pub fn base64url(bytes: &[u8]) -> String {
    base64_encode(bytes).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    if text.contains(['+', '/', '=']) {
        return None;
    }
    let mut padded = text.replace('-', "+").replace('_', "/");
    while !padded.len().is_multiple_of(4) {
        padded.push('=');
    }
    base64_decode(&padded)
}

impl PayloadSigner {
    /// The stored key, or a new one stored (another node's, if it stored one first). Blocking.
    pub fn load_or_create(vault: &VaultService, q: &dyn store::Queries) -> Result<PayloadSigner, VaultFailure> {
        let dek = vault.data_key(q, PLATFORM)?;
        let rng = SystemRandom::new();
        let stored = match q.document(KEY_KIND, PLATFORM, KEY_ID)? {
            Some(doc) => doc,
            None => {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| vault::VaultError::Unavailable("the system random source failed".into()))?;
                let sealed = vault::seal(&dek, KEY_RECORD, pkcs8.as_ref())?;
                let doc = store::Document {
                    kind: KEY_KIND.into(),
                    tenant_id: PLATFORM,
                    id: KEY_ID.into(),
                    lookup: None,
                    owner: None,
                    created_at: store::now_nanos(),
                    version: 1,
                    body: serde_json::to_string(&StoredKey { sealed: base64_encode(&sealed) }).expect("serializable"),
                };
                match q.insert_document(&doc) {
                    Ok(()) => doc,
                    Err(store::StoreError::Conflict(_)) => q
                        .document(KEY_KIND, PLATFORM, KEY_ID)?
                        .ok_or_else(|| store::StoreError::Corrupt("the payload signing key vanished".into()))?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let corrupt = |what: &str| VaultFailure::Store(store::StoreError::Corrupt(format!("the payload key: {what}")));
        let body: StoredKey = serde_json::from_str(&stored.body).map_err(|_| corrupt("not JSON"))?;
        let sealed = base64_decode(&body.sealed).ok_or_else(|| corrupt("not base64"))?;
        let pkcs8 = vault::open(&dek, KEY_RECORD, &sealed)?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|_| corrupt("not a P-256 key"))?;
        Ok(PayloadSigner::from_pair(pair, rng))
    }

    fn from_pair(pair: EcdsaKeyPair, rng: SystemRandom) -> PayloadSigner {
        // The public key is the uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        let (x, y) = (base64url(&point[1..33]), base64url(&point[33..65]));
        // RFC 7638: the members in lexicographic order, no white space.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = base64url(&Sha256::digest(canonical.as_bytes()));
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": "ES256"});
        PayloadSigner { pair, rng, kid, jwk }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWK Set with the public key.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// `payload` signed, in compact serialization; the header names the key and where its set is.
    pub fn sign(&self, payload: &Value, jku: &str) -> String {
        let header = json!({"alg": "ES256", "typ": "JWS", "kid": self.kid, "jku": jku});
        let input =
            format!("{}.{}", base64url(header.to_string().as_bytes()), base64url(payload.to_string().as_bytes()));
        let signature = self.pair.sign(&self.rng, input.as_bytes()).expect("ECDSA signing does not fail");
        format!("{input}.{}", base64url(signature.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn base64url_round_trips_without_padding() {
        for bytes in [&b""[..], b"f", b"fo", b"foo", &[0xfb, 0xff, 0xfe]] {
            let text = base64url(bytes);
            assert!(!text.contains(['=', '+', '/']), "{text}");
            assert_eq!(base64url_decode(&text).unwrap(), bytes);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url_decode("a+b"), None);
    }

    #[test]
    fn a_signature_verifies_with_the_published_key_and_fails_when_changed() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let signer = PayloadSigner::from_pair(pair, rng);
        let jws = signer.sign(&json!({"txid": "abc", "valor": {"original": "1.00"}}), "https://h/qr/jwks");
        let parts: Vec<&str> = jws.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value = serde_json::from_slice(&base64url_decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], signer.kid());
        let jwk = &signer.jwks()["keys"][0];
        let mut point = vec![4u8];
        point.extend(base64url_decode(jwk["x"].as_str().unwrap()).unwrap());
        point.extend(base64url_decode(jwk["y"].as_str().unwrap()).unwrap());
        let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point);
        let signature = base64url_decode(parts[2]).unwrap();
        assert_eq!(signature.len(), 64);
        let input = format!("{}.{}", parts[0], parts[1]);
        assert!(key.verify(input.as_bytes(), &signature).is_ok());
        let forged = format!("{}.{}", parts[0], base64url(br#"{"txid":"abd"}"#));
        assert!(key.verify(forged.as_bytes(), &signature).is_err());
    }
}
