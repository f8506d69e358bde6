//! The institution's signature on dynamic BR Code payloads: a JWS (RFC 7515, compact form), as the
//! Pix security manual has a receiving PSP sign what it serves at a location; its public key is
//! served as a JWK Set at the URL the JWS header's `jku` names.
//!
//! The key is either
//! - the operator's, with its certificate chain (`--pix-jws-cert`, `--pix-jws-key`): ES256 for a
//!   P-256 key, RS256 for an RSA key of 2,048 to 4,096 bits. The JWK then carries the chain
//!   (`x5c`) and the certificate's thumbprints (`x5t`, `x5t#S256`), and every header names `x5t`,
//!   so a payer's app can check the certificate against the location's host, as the manual asks;
//! - or, without them, an ES256 key made once per database, kept sealed under the vault (the
//!   platform's data key) as a document and loaded once per node: enough to verify payloads
//!   against the JWK Set, but with no certificate for a payer's app to check.

use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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

enum SigningKey {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

pub struct PayloadSigner {
    key: SigningKey,
    rng: SystemRandom,
    /// The RFC 7638 thumbprint of the public key.
    kid: String,
    /// The certificate's SHA-1 thumbprint, named in every header, when the key has one.
    x5t: Option<String>,
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
        Ok(PayloadSigner::new(SigningKey::Es256(pair), rng, &[]))
    }

    /// The operator's key and its certificate chain (leaf first), from PEM files. Every error
    /// names the file and what is wrong with it; none holds key material.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<PayloadSigner, String> {
        let certs = crate::tls::read_certs(cert, "--pix-jws-cert")?;
        let key_file = || format!("--pix-jws-key {}", key.display());
        let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: no PEM private key: {e}", key_file()))?;
        let unsupported = || format!("{}: not a P-256 (ES256) or RSA (RS256) key", key_file());
        // ring signs with RSA keys of 2,048 to 4,096 bits.
        let rsa = |e: ring::error::KeyRejected| match e.to_string().as_str() {
            "TooSmall" => format!("{}: an RSA key under 2,048 bits", key_file()),
            "TooLarge" => format!("{}: an RSA key over 4,096 bits", key_file()),
            _ => unsupported(),
        };
        let rng = SystemRandom::new();
        let signing = match &der {
            PrivateKeyDer::Pkcs8(k) => {
                match EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, k.secret_pkcs8_der(), &rng) {
                    Ok(pair) => SigningKey::Es256(pair),
                    Err(_) => SigningKey::Rs256(RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).map_err(rsa)?),
                }
            }
            PrivateKeyDer::Pkcs1(k) => SigningKey::Rs256(RsaKeyPair::from_der(k.secret_pkcs1_der()).map_err(rsa)?),
            PrivateKeyDer::Sec1(_) => {
                return Err(format!(
                    "{}: an EC key in SEC1 form; give it as PKCS#8 (openssl pkcs8 -topk8 -nocrypt)",
                    key_file()
                ))
            }
            _ => return Err(unsupported()),
        };
        // The leaf certificate must be for this key.
        let provider_key = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|_| unsupported())?;
        rustls::sign::CertifiedKey::new(certs.clone(), provider_key).keys_match().map_err(|_| {
            format!("--pix-jws-cert {}: its first certificate is not for the key in {}", cert.display(), key.display())
        })?;
        Ok(PayloadSigner::new(signing, rng, &certs))
    }

    fn new(key: SigningKey, rng: SystemRandom, chain: &[CertificateDer<'_>]) -> PayloadSigner {
        // RFC 7638: the required members in lexicographic order, no white space.
        let (canonical, mut jwk) = match &key {
            SigningKey::Es256(pair) => {
                // The public key is the uncompressed point: 0x04, x, y.
                let point = pair.public_key().as_ref();
                let (x, y) = (base64url(&point[1..33]), base64url(&point[33..65]));
                (
                    format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
                    json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
                )
            }
            SigningKey::Rs256(pair) => {
                let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
                let minimal = |b: &[u8]| base64url(&b[b.iter().position(|&x| x != 0).unwrap_or(b.len())..]);
                let (n, e) = (minimal(&public.n), minimal(&public.e));
                (format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#), json!({"kty": "RSA", "n": n, "e": e}))
            }
        };
        let kid = base64url(&Sha256::digest(canonical.as_bytes()));
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!(alg(&key));
        let x5t = chain.first().map(|leaf| {
            let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, leaf.as_ref());
            jwk["x5c"] = chain.iter().map(|c| base64_encode(c.as_ref())).collect();
            jwk["x5t#S256"] = json!(base64url(&Sha256::digest(leaf.as_ref())));
            base64url(sha1.as_ref())
        });
        if let Some(t) = &x5t {
            jwk["x5t"] = json!(t);
        }
        PayloadSigner { key, rng, kid, x5t, jwk }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `ES256` or `RS256`.
    pub fn alg(&self) -> &'static str {
        alg(&self.key)
    }

    /// The JWK Set with the public key.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// `payload` signed, in compact serialization; the header names the key and where its set is.
    pub fn sign(&self, payload: &Value, jku: &str) -> String {
        let mut header = json!({"alg": self.alg(), "typ": "JWS", "kid": self.kid, "jku": jku});
        if let Some(t) = &self.x5t {
            header["x5t"] = json!(t);
        }
        let input =
            format!("{}.{}", base64url(header.to_string().as_bytes()), base64url(payload.to_string().as_bytes()));
        let signature = match &self.key {
            SigningKey::Es256(pair) => {
                pair.sign(&self.rng, input.as_bytes()).expect("ECDSA signing does not fail").as_ref().to_vec()
            }
            SigningKey::Rs256(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut signature)
                    .expect("RSA signing of a buffer of the modulus' length does not fail");
                signature
            }
        };
        format!("{input}.{}", base64url(&signature))
    }
}

fn alg(key: &SigningKey) -> &'static str {
    match key {
        SigningKey::Es256(_) => "ES256",
        SigningKey::Rs256(_) => "RS256",
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
        let signer = PayloadSigner::new(SigningKey::Es256(pair), rng, &[]);
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
        assert!(header.get("x5t").is_none() && jwk.get("x5c").is_none(), "no certificate, none named");
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rtpay-jws-{tag}-{}-{}", std::process::id(), store::now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
    }

    /// A certificate for `key` issued by a new CA for the locations' host: (the chain's PEM, leaf
    /// first; the leaf's and the CA's DER).
    fn certified(key: &rcgen::KeyPair) -> (String, Vec<Vec<u8>>) {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["qr.banco.example".to_owned()])
            .unwrap()
            .signed_by(key, &ca, &ca_key)
            .unwrap();
        (leaf.pem() + &ca.pem(), vec![leaf.der().to_vec(), ca.der().to_vec()])
    }

    /// Writes the chain and the key and loads them.
    fn load(dir: &std::path::Path, chain: &str, key_pem: &str) -> Result<PayloadSigner, String> {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, chain).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        PayloadSigner::from_pem_files(&cert, &key)
    }

    /// The header and the signature of a payload `signer` signed, after checking what the header
    /// and the JWK say of the certificate.
    fn signed_with_certificate(signer: &PayloadSigner, chain: &[Vec<u8>]) -> (String, Vec<u8>, Value) {
        let jws = signer.sign(&json!({"txid": "abc"}), "https://qr.banco.example/qr/jwks");
        let parts: Vec<&str> = jws.split('.').collect();
        let header: Value = serde_json::from_slice(&base64url_decode(parts[0]).unwrap()).unwrap();
        let jwk = signer.jwks()["keys"][0].clone();
        let sha1 = base64url(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &chain[0]).as_ref());
        assert_eq!(
            (&header["alg"], &header["kid"], &header["x5t"]),
            (&json!(signer.alg()), &json!(signer.kid()), &json!(sha1))
        );
        let x5c: Vec<Value> = chain.iter().map(|der| json!(base64_encode(der))).collect();
        assert_eq!(jwk["x5c"], json!(x5c), "the chain, leaf first, in standard base64");
        assert_eq!(jwk["x5t"], json!(sha1));
        assert_eq!(jwk["x5t#S256"], json!(base64url(&Sha256::digest(&chain[0]))));
        assert_eq!(
            (&jwk["alg"], &jwk["kid"], &jwk["use"]),
            (&json!(signer.alg()), &json!(signer.kid()), &json!("sig"))
        );
        (format!("{}.{}", parts[0], parts[1]), base64url_decode(parts[2]).unwrap(), jwk)
    }

    #[test]
    fn an_operators_p256_key_signs_es256_and_its_key_set_carries_the_chain() {
        let dir = temp_dir("es256");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (chain_pem, chain) = certified(&key);
        let signer = load(&dir, &chain_pem, &key.serialize_pem()).unwrap();
        assert_eq!(signer.alg(), "ES256");
        let (input, signature, jwk) = signed_with_certificate(&signer, &chain);
        let mut point = vec![4u8];
        point.extend(base64url_decode(jwk["x"].as_str().unwrap()).unwrap());
        point.extend(base64url_decode(jwk["y"].as_str().unwrap()).unwrap());
        assert_eq!(point, key.public_key_raw(), "the JWK is the certificate's key");
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point);
        assert!(public.verify(input.as_bytes(), &signature).is_ok());
        assert!(public.verify(b"other", &signature).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_operators_rsa_key_signs_rs256_and_its_key_set_carries_the_chain() {
        let dir = temp_dir("rs256");
        let key_pem = std::fs::read_to_string(fixture("rsa-2048-test-key.pem")).unwrap();
        let key = rcgen::KeyPair::from_pem_and_sign_algo(&key_pem, &rcgen::PKCS_RSA_SHA256).unwrap();
        let (chain_pem, chain) = certified(&key);
        let signer = load(&dir, &chain_pem, &key_pem).unwrap();
        assert_eq!(signer.alg(), "RS256");
        let (input, signature, jwk) = signed_with_certificate(&signer, &chain);
        let component = |name: &str| base64url_decode(jwk[name].as_str().unwrap()).unwrap();
        let (n, e) = (component("n"), component("e"));
        assert_eq!((n.len(), n[0] != 0, e.as_slice()), (256, true, &[1u8, 0, 1][..]), "minimal big-endian n and e");
        // RFC 7638's thumbprint over the required members, in order.
        let canonical =
            format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, jwk["e"].as_str().unwrap(), jwk["n"].as_str().unwrap());
        assert_eq!(signer.kid(), base64url(&Sha256::digest(canonical.as_bytes())));
        let public = ring::signature::RsaPublicKeyComponents { n: &n, e: &e };
        assert_eq!(signature.len(), 256);
        assert!(public.verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, input.as_bytes(), &signature).is_ok());
        assert!(public.verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, b"other", &signature).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_and_certificates_that_cannot_sign_payloads_are_refused_by_name() {
        let dir = temp_dir("refused");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (chain_pem, _) = certified(&key);
        let refusal = |chain: &str, key_pem: &str| load(&dir, chain, key_pem).map(|s| s.kid().to_owned()).unwrap_err();
        let e = refusal(&chain_pem, &other.serialize_pem());
        assert!(e.contains("--pix-jws-cert") && e.contains("is not for the key"), "{e}");
        let e = refusal("not a certificate\n", &key.serialize_pem());
        assert!(e.contains("--pix-jws-cert") && e.contains("no certificate"), "{e}");
        let e = refusal(&chain_pem, "not a key\n");
        assert!(e.contains("--pix-jws-key") && e.contains("no PEM private key"), "{e}");
        let sec1 = std::fs::read_to_string(fixture("p256-sec1-test-key.pem")).unwrap();
        let e = refusal(&chain_pem, &sec1);
        assert!(e.contains("--pix-jws-key") && e.contains("PKCS#8"), "{e}");
        let short = std::fs::read_to_string(fixture("rsa-1024-test-key.pem")).unwrap();
        let e = refusal(&chain_pem, &short);
        assert!(e.contains("--pix-jws-key") && e.contains("under 2,048 bits"), "{e}");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let e = refusal(&certified(&p384).0, &p384.serialize_pem());
        assert!(e.contains("not a P-256 (ES256) or RSA (RS256) key"), "{e}");
        // No refusal quotes the key it refused.
        for key_pem in [other.serialize_pem(), sec1, short, p384.serialize_pem()] {
            let e = refusal(&chain_pem, &key_pem);
            assert!(key_pem.lines().filter(|l| !l.starts_with("-----")).all(|l| !e.contains(l)), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
