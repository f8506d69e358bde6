//! Sensitive data at rest (card numbers, personal documents): envelope encryption, blind indexes,
//! masking, and the document rules that decide what may be stored at all.
//!
//! - Each tenant's records are sealed with a data-encryption key (DEK, AES-256-GCM, a random
//!   96-bit nonce per seal, the record's identity as associated data, so a ciphertext moved to
//!   another record does not open).
//! - DEKs are stored only wrapped by a key-encryption key (KEK) that lives in a [`Kek`] backend: a
//!   local key file for development ([`FileKek`]), a PKCS#11 token in production. Each KEK has a
//!   version; a [`Keyring`] holds the current one and the older ones, so rotation re-wraps DEKs
//!   without ever re-encrypting records, and old wrappings stay readable.
//! - Look-ups go through blind indexes: HMAC-SHA256 under a separate key, so equality can be
//!   tested without the value being stored in clear.
//!
//! Invariant: no key and no plaintext is ever in a `Debug` output or an error message.

pub mod mask;
pub mod pkcs11;

use std::collections::BTreeMap;
use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// Why the vault refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaultError {
    /// The KEK backend cannot be reached (an HSM that went away): retry later, nothing written.
    Unavailable(String),
    /// A ciphertext or wrapping failed authentication: altered, moved, or under another key.
    Tampered,
    /// No KEK of this version is configured.
    UnknownKek(u32),
    /// Bad configuration (a key file that is not a key).
    Config(String),
}

impl fmt::Display for VaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VaultError::Unavailable(why) => write!(f, "key store unavailable: {why}"),
            VaultError::Tampered => f.write_str("ciphertext failed authentication"),
            VaultError::UnknownKek(v) => write!(f, "no key-encryption key of version {v}"),
            VaultError::Config(why) => write!(f, "vault configuration: {why}"),
        }
    }
}

impl std::error::Error for VaultError {}

pub type Result<T> = std::result::Result<T, VaultError>;

/// 32 secret bytes, zeroed when dropped, never printed.
pub struct Secret32([u8; 32]);

impl Secret32 {
    pub fn random() -> Result<Secret32> {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).map_err(|_| VaultError::Unavailable("no system randomness".into()))?;
        Ok(Secret32(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Secret32 {
        Secret32(bytes)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for Secret32 {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a valid, aligned, exclusively borrowed byte; volatile so the zeroing stays.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32(..)")
    }
}

fn random_nonce() -> Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).map_err(|_| VaultError::Unavailable("no system randomness".into()))?;
    Ok(nonce)
}

/// AES-256-GCM: `nonce || ciphertext || tag`.
fn seal_with(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"));
    let nonce = random_nonce()?;
    let mut out = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out)
        .map_err(|_| VaultError::Tampered)?;
    let mut sealed = nonce.to_vec();
    sealed.extend_from_slice(&out);
    Ok(sealed)
}

fn open_with(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(VaultError::Tampered);
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"));
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).map_err(|_| VaultError::Tampered)?;
    let mut buf = sealed[NONCE_LEN..].to_vec();
    let plain = key.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| VaultError::Tampered)?;
    Ok(plain.to_vec())
}

/// A key-encryption key: wraps and unwraps data keys. Implementations keep the key where it
/// lives (a file in memory, or inside an HSM that never lets it out).
pub trait Kek: Send + Sync {
    fn version(&self) -> u32;
    fn wrap(&self, dek: &Secret32) -> Result<Vec<u8>>;
    fn unwrap(&self, wrapped: &[u8]) -> Result<Secret32>;
}

/// A KEK held in process memory, read from a key file: for development and `rtpay demo`.
pub struct FileKek {
    version: u32,
    key: Secret32,
}

impl fmt::Debug for FileKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileKek(v{})", self.version)
    }
}

const WRAP_CONTEXT: &[u8] = b"rtpay vault dek wrap v1";

impl FileKek {
    pub fn new(version: u32, key: Secret32) -> FileKek {
        FileKek { version, key }
    }

    /// A key file: one line per version, `<version> <64 hex digits>`; blank lines and `#` comments
    /// are ignored. Returns every version in it.
    pub fn parse_file(text: &str) -> Result<Vec<FileKek>> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || VaultError::Config(format!("key file line {}: expected `<version> <64 hex digits>`", n + 1));
            let (version, hex) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let version: u32 = version.parse().map_err(|_| bad())?;
            // Two keys under one version: which one wrapped what is unknown (the last used to win
            // silently, and data keys wrapped under the other failed to open as tampered).
            if keys.iter().any(|k: &FileKek| k.version == version) {
                return Err(VaultError::Config(format!(
                    "key file line {}: version {version} appears twice; keep the key it was rotated to",
                    n + 1
                )));
            }
            let bytes = unhex(hex.trim()).filter(|b| b.len() == 32).ok_or_else(bad)?;
            keys.push(FileKek::new(version, Secret32::from_bytes(bytes.try_into().expect("32 bytes"))));
        }
        if keys.is_empty() {
            return Err(VaultError::Config("the key file holds no key".into()));
        }
        Ok(keys)
    }

    /// The line a new key of `version` adds to a key file.
    pub fn file_line(version: u32) -> Result<String> {
        Ok(format!("{version} {}\n", hex(Secret32::random()?.expose())))
    }
}

impl Kek for FileKek {
    fn version(&self) -> u32 {
        self.version
    }

    fn wrap(&self, dek: &Secret32) -> Result<Vec<u8>> {
        let mut aad = WRAP_CONTEXT.to_vec();
        aad.extend_from_slice(&self.version.to_be_bytes());
        seal_with(self.key.expose(), &aad, dek.expose())
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<Secret32> {
        let mut aad = WRAP_CONTEXT.to_vec();
        aad.extend_from_slice(&self.version.to_be_bytes());
        let plain = open_with(self.key.expose(), &aad, wrapped)?;
        let bytes: [u8; 32] = plain.as_slice().try_into().map_err(|_| VaultError::Tampered)?;
        Ok(Secret32::from_bytes(bytes))
    }
}

/// A data key as stored: which KEK wrapped it, and the wrapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    pub kek_version: u32,
    pub wrapped: Vec<u8>,
}

/// Every KEK version this node can use; the highest is current (new wrappings use it).
#[derive(Default)]
pub struct Keyring {
    keks: BTreeMap<u32, Box<dyn Kek>>,
}

impl Keyring {
    pub fn add(&mut self, kek: Box<dyn Kek>) {
        self.keks.insert(kek.version(), kek);
    }

    pub fn current_version(&self) -> Option<u32> {
        self.keks.keys().next_back().copied()
    }

    fn current(&self) -> Result<&dyn Kek> {
        self.keks.values().next_back().map(|k| k.as_ref()).ok_or(VaultError::UnknownKek(0))
    }

    /// A fresh data key, and its wrapping under the current KEK.
    pub fn new_data_key(&self) -> Result<(Secret32, WrappedKey)> {
        let dek = Secret32::random()?;
        let kek = self.current()?;
        let wrapped = wrapped_checked(kek, &dek)?;
        Ok((dek, WrappedKey { kek_version: kek.version(), wrapped }))
    }

    pub fn unwrap(&self, key: &WrappedKey) -> Result<Secret32> {
        self.keks.get(&key.kek_version).ok_or(VaultError::UnknownKek(key.kek_version))?.unwrap(&key.wrapped)
    }

    /// Re-wraps a data key under the current KEK (rotation); the data key itself is unchanged, so
    /// nothing sealed under it needs touching. Already current: returned as is.
    pub fn rewrap(&self, key: &WrappedKey) -> Result<WrappedKey> {
        let current = self.current()?;
        if key.kek_version == current.version() {
            return Ok(key.clone());
        }
        let dek = self.unwrap(key)?;
        Ok(WrappedKey { kek_version: current.version(), wrapped: wrapped_checked(current, &dek)? })
    }
}

/// `dek` wrapped under `kek`, once the wrapping is seen to open to it: a wrapping is stored in
/// place of the data key (a rotation's over the only other one), so one that does not open (a
/// token that wraps otherwise than rtpay unwraps) would lose everything sealed under the key.
fn wrapped_checked(kek: &dyn Kek, dek: &Secret32) -> Result<Vec<u8>> {
    let wrapped = kek.wrap(dek)?;
    match kek.unwrap(&wrapped) {
        Ok(opened) if opened.expose() == dek.expose() => Ok(wrapped),
        _ => Err(VaultError::Unavailable(format!(
            "a data key wrapped under KEK version {} does not open again: nothing is stored under it",
            kek.version()
        ))),
    }
}

const RECORD_CONTEXT: &[u8] = b"rtpay vault record v1\0";

fn record_aad(record_id: &[u8]) -> Vec<u8> {
    let mut aad = RECORD_CONTEXT.to_vec();
    aad.extend_from_slice(record_id);
    aad
}

/// Seals a record's sensitive bytes under a data key; `record_id` (the record's identity, e.g.
/// tenant and id) is authenticated, so the ciphertext opens only for that record.
pub fn seal(dek: &Secret32, record_id: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    seal_with(dek.expose(), &record_aad(record_id), plaintext)
}

pub fn open(dek: &Secret32, record_id: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
    open_with(dek.expose(), &record_aad(record_id), sealed)
}

/// Keyed look-ups of sensitive values: HMAC-SHA256 under a key separate from every encryption key.
pub struct BlindIndex {
    key: ring::hmac::Key,
}

impl fmt::Debug for BlindIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindIndex(..)")
    }
}

impl BlindIndex {
    pub fn new(key: &Secret32) -> BlindIndex {
        BlindIndex { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose()) }
    }

    /// The index of `value` for `purpose` (e.g. `b"pan"`, `b"document"`): the same value under
    /// two purposes gives unrelated indexes. Normalize the value first.
    pub fn of(&self, purpose: &[u8], value: &[u8]) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(&(purpose.len() as u32).to_be_bytes());
        ctx.update(purpose);
        ctx.update(value);
        ctx.sign().as_ref().try_into().expect("SHA-256 is 32 bytes")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[(b >> 4) as usize] as char, DIGITS[(b & 15) as usize] as char]).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    // `from_str_radix` alone would take a sign: `+f` read as `0f`.
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}
