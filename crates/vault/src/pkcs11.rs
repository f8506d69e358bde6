//! A KEK that never leaves a PKCS#11 token: generated inside it as sensitive and non-extractable,
//! and used there for AES-256-GCM (`CKM_AES_GCM`) to wrap and unwrap data keys. Tested against
//! SoftHSM2; any PKCS#11 v2.40 module with AES-GCM works the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Kek, Result, Secret32, VaultError};

const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;
const WRAP_CONTEXT: &[u8] = b"rtpay vault dek wrap v1 pkcs11";

/// Where the KEK lives: the module, the token (by label) and its user PIN.
pub struct Pkcs11Config<'a> {
    pub module: &'a Path,
    pub token_label: &'a str,
    pub pin: &'a str,
}

pub struct Pkcs11Kek {
    version: u32,
    /// Where to find the key again when its session is lost (see [`Pkcs11Kek::with_session`]).
    module: PathBuf,
    token_label: String,
    pin: String,
    // A PKCS#11 session is used by one thread at a time; the key's handle is the session's.
    session: Mutex<Held>,
}

/// The KEK's session and key handle, and when a reconnect last failed.
struct Held {
    session: Session,
    key: ObjectHandle,
    failed_at: Option<std::time::Instant>,
}

/// How long after a failed reconnect the next one waits: a token still away is not asked to log
/// in on every operation (a PIN changed meanwhile would be locked by the attempts).
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// What an operation on the KEK's session failed with.
enum Failure {
    /// The operation itself (mapped by the caller).
    Op(cryptoki::error::Error),
    /// The session was lost and a new one could not be had: why (a wrong PIN, the key gone or
    /// not rtpay's, the token still away).
    Reconnect(VaultError),
}

/// One initialized context per module for the whole process. The library is initialized once
/// per process and finalized when its context is dropped, which would end every other session of
/// that module too: contexts are therefore shared and kept.
fn context(module: &Path) -> Result<Pkcs11> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut contexts = CONTEXTS.get_or_init(Default::default).lock().expect("contexts lock");
    if let Some(context) = contexts.get(module) {
        return Ok(context.clone());
    }
    let context = Pkcs11::new(module)
        .map_err(|e| VaultError::Config(format!("cannot load PKCS#11 module {}: {e}", module.display())))?;
    match context.initialize(CInitializeArgs::OsThreads) {
        Ok(()) | Err(cryptoki::error::Error::AlreadyInitialized) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(hsm("initialize")(e)),
    }
    contexts.insert(module.to_owned(), context.clone());
    Ok(context)
}

impl std::fmt::Debug for Pkcs11Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pkcs11Kek(v{})", self.version)
    }
}

fn hsm(what: &str) -> impl Fn(cryptoki::error::Error) -> VaultError + '_ {
    move |e| VaultError::Unavailable(format!("PKCS#11 {what}: {e}"))
}

/// An operation's failure as the vault reports it: the token's error, or why the session could
/// not be had again (a wrong PIN or a key not rtpay's is a configuration error, not a pause).
fn failure(what: &str) -> impl Fn(Failure) -> VaultError + '_ {
    move |f| match f {
        Failure::Op(e) => hsm(what)(e),
        Failure::Reconnect(why) => why,
    }
}

/// The label of KEK `version` in the token.
pub fn key_label(version: u32) -> String {
    format!("rtpay-kek-v{version}")
}

/// How an error says the session, not the operation, failed.
enum Lost {
    /// The handle is gone (the token went away and came back, an HSM's restart or fail-over, a
    /// network HSM's lost connection, the session closed): it must not be closed again, since
    /// the module may have given its number to a new session.
    Handle,
    /// The session stands but no longer reaches the key (logged out, the key's handle stale): it
    /// is closed once a new one is open.
    Key,
}

fn session_lost(e: &cryptoki::error::Error) -> Option<Lost> {
    use cryptoki::error::RvError::*;
    match e {
        cryptoki::error::Error::Pkcs11(
            SessionHandleInvalid | SessionClosed | DeviceRemoved | DeviceError | TokenNotPresent | TokenNotRecognized,
            _,
        ) => Some(Lost::Handle),
        cryptoki::error::Error::Pkcs11(UserNotLoggedIn | KeyHandleInvalid | ObjectHandleInvalid, _) => Some(Lost::Key),
        _ => None,
    }
}

impl Pkcs11Kek {
    /// Opens KEK `version` in the token, generating it there first if `create` and it is absent.
    pub fn open(config: &Pkcs11Config<'_>, version: u32, create: bool) -> Result<Pkcs11Kek> {
        let (session, key) = Self::connect(config, version, create)?;
        Ok(Pkcs11Kek {
            version,
            module: config.module.to_owned(),
            token_label: config.token_label.to_owned(),
            pin: config.pin.to_owned(),
            session: Mutex::new(Held { session, key, failed_at: None }),
        })
    }

    /// Runs `op` on the key's session; when the session was lost, opens a new one, finds the key
    /// again (checked as at open) and runs `op` once more: a token that went away and came back
    /// serves again without a restart of the process. A reconnect that fails says why, and the
    /// next waits [`RECONNECT_PAUSE`].
    fn with_session<T>(
        &self,
        mut op: impl FnMut(&Session, ObjectHandle) -> std::result::Result<T, cryptoki::error::Error>,
    ) -> std::result::Result<T, Failure> {
        let mut held = self.session.lock().expect("session lock");
        let e = match op(&held.session, held.key) {
            Err(e) => e,
            Ok(value) => return Ok(value),
        };
        let Some(lost) = session_lost(&e) else { return Err(Failure::Op(e)) };
        if held.failed_at.is_some_and(|at| at.elapsed() < RECONNECT_PAUSE) {
            return Err(Failure::Op(e));
        }
        let config = Pkcs11Config { module: &self.module, token_label: &self.token_label, pin: &self.pin };
        let reconnected = Self::connect(&config, self.version, false).map_err(|e| match e {
            // The token was there at start: not there now, it is away (a restart, a fail-over),
            // not misnamed.
            VaultError::Config(why) if why.starts_with("no PKCS#11 token") => VaultError::Unavailable(why),
            other => other,
        });
        match reconnected {
            Ok((session, key)) => {
                let stale = std::mem::replace(&mut *held, Held { session, key, failed_at: None });
                match lost {
                    // Its number may be the new session's now: not closed (a small leak instead).
                    Lost::Handle => std::mem::forget(stale.session),
                    Lost::Key => drop(stale.session),
                }
                op(&held.session, held.key).map_err(Failure::Op)
            }
            Err(why) => {
                held.failed_at = Some(std::time::Instant::now());
                Err(Failure::Reconnect(why))
            }
        }
    }

    /// A logged-in session on the token and the handle of KEK `version` in it.
    fn connect(config: &Pkcs11Config<'_>, version: u32, create: bool) -> Result<(Session, ObjectHandle)> {
        let context = context(config.module)?;
        let mut found = None;
        for slot in context.get_slots_with_token().map_err(hsm("slots"))? {
            let info = context.get_token_info(slot).map_err(hsm("token info"))?;
            if info.label().trim_end() == config.token_label {
                found = Some(slot);
                break;
            }
        }
        let slot =
            found.ok_or_else(|| VaultError::Config(format!("no PKCS#11 token labelled {:?}", config.token_label)))?;
        let session = context.open_rw_session(slot).map_err(hsm("open session"))?;
        // Login is per application, not per session: with another version's session open (a
        // keyring holds several), the token already has us logged in.
        match session.login(UserType::User, Some(&AuthPin::new(config.pin.into()))) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
            Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::PinIncorrect, _)) => {
                return Err(VaultError::Config("the PKCS#11 PIN is not correct".into()))
            }
            Err(e) => return Err(VaultError::Unavailable(format!("PKCS#11 login: {e}"))),
        }
        let label = key_label(version);
        let template = [Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.clone().into_bytes())];
        let keys = session.find_objects(&template).map_err(hsm("find key"))?;
        // Two keys under one label (made outside rtpay, or by a rotation of another database on
        // the same token) would be picked between by the token's order, which may change: data
        // keys wrapped under the other would then not open.
        if keys.len() > 1 {
            return Err(VaultError::Config(format!(
                "{} keys labelled {label:?} on the PKCS#11 token; rtpay needs exactly one",
                keys.len()
            )));
        }
        let key = match keys.first() {
            Some(key) => {
                check_key(&session, *key, &label)?;
                *key
            }
            None if create => session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32usize.try_into().expect("fits")),
                        Attribute::Label(label.into_bytes()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                    ],
                )
                .map_err(hsm("generate key"))?,
            None => return Err(VaultError::UnknownKek(version)),
        };
        Ok((session, key))
    }

    /// The key's protection, as the token reports it: (sensitive, extractable).
    pub fn protection(&self) -> Result<(bool, bool)> {
        let attrs = self
            .with_session(|session, key| {
                session.get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable])
            })
            .map_err(failure("attributes"))?;
        let (mut sensitive, mut extractable) = (false, true);
        for a in attrs {
            match a {
                Attribute::Sensitive(v) => sensitive = v,
                Attribute::Extractable(v) => extractable = v,
                _ => {}
            }
        }
        Ok((sensitive, extractable))
    }

    fn aad(&self) -> Vec<u8> {
        let mut aad = WRAP_CONTEXT.to_vec();
        aad.extend_from_slice(&self.version.to_be_bytes());
        aad
    }
}

/// A key found under a KEK's label must be what rtpay would have made: AES-256, sensitive and not
/// extractable (a key that can leave the token protects nothing the token is there for).
fn check_key(session: &Session, key: ObjectHandle, label: &str) -> Result<()> {
    let wanted = [
        AttributeType::KeyType,
        AttributeType::ValueLen,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Local,
        AttributeType::AlwaysSensitive,
        AttributeType::NeverExtractable,
    ];
    let attrs = session.get_attributes(key, &wanted).map_err(hsm("attributes"))?;
    let (mut aes, mut len, mut sensitive, mut extractable) = (false, 0usize, false, true);
    let (mut local, mut always_sensitive, mut never_extractable) = (false, false, false);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => aes = t == KeyType::AES,
            Attribute::ValueLen(l) => len = usize::from(l),
            Attribute::Sensitive(v) => sensitive = v,
            Attribute::Extractable(v) => extractable = v,
            Attribute::Local(v) => local = v,
            Attribute::AlwaysSensitive(v) => always_sensitive = v,
            Attribute::NeverExtractable(v) => never_extractable = v,
            _ => {}
        }
    }
    // Made in the token (not imported from known bytes), and never out of it.
    if aes && len == 32 && sensitive && !extractable && local && always_sensitive && never_extractable {
        return Ok(());
    }
    Err(VaultError::Config(format!(
        "the PKCS#11 key labelled {label:?} is not an AES-256 key made in the token, sensitive and never extractable; \
         rtpay refuses it"
    )))
}

impl Kek for Pkcs11Kek {
    fn version(&self) -> u32 {
        self.version
    }

    /// `iv || ciphertext || tag`, computed inside the token.
    fn wrap(&self, dek: &Secret32) -> Result<Vec<u8>> {
        let mut iv = [0u8; IV_LEN];
        SystemRandom::new().fill(&mut iv).map_err(|_| VaultError::Unavailable("no system randomness".into()))?;
        let aad = self.aad();
        let mut iv_param = iv;
        let sealed = self
            .with_session(|session, key| {
                // Given afresh to each try: a token may write its own IV over it.
                iv_param = iv;
                let params = GcmParams::new(&mut iv_param, &aad, TAG_BITS.into())?;
                session.encrypt(&Mechanism::AesGcm(params), key, dek.expose())
            })
            .map_err(failure("encrypt"))?;
        // The IV the token used: some tokens (CloudHSM, Luna in FIPS mode) make their own and
        // write it over the one given. Stored with the one given, such a wrapping never opened.
        let mut out = iv_param.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<Secret32> {
        if wrapped.len() != IV_LEN + 32 + 16 {
            return Err(VaultError::Tampered);
        }
        let stored_iv: [u8; IV_LEN] = wrapped[..IV_LEN].try_into().expect("12 bytes");
        let aad = self.aad();
        let plain = match self.with_session(|session, key| {
            let mut iv = stored_iv;
            let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
            session.decrypt(&Mechanism::AesGcm(params), key, &wrapped[IV_LEN..])
        }) {
            Ok(p) => p,
            Err(Failure::Op(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::EncryptedDataInvalid, _)))
            | Err(Failure::Op(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::EncryptedDataLenRange, _))) => {
                return Err(VaultError::Tampered)
            }
            // SoftHSM2 reports a failed GCM tag as CKR_GENERAL_ERROR; the session stays usable
            // (tested), so an unusable token shows up as the next operation's error.
            Err(Failure::Op(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::GeneralError, _))) => {
                return Err(VaultError::Tampered)
            }
            Err(e) => return Err(failure("decrypt")(e)),
        };
        let bytes: [u8; 32] = plain.as_slice().try_into().map_err(|_| VaultError::Tampered)?;
        Ok(Secret32::from_bytes(bytes))
    }
}
