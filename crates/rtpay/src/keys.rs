//! Where the vault's keys come from, and `rtpay keys rotate`.
//!
//! `--kek file:PATH` (the default, `file:<data>/kek`): a key file of `<version> <64 hex>` lines,
//! created with version 1 on first start (mode 0600). `--kek pkcs11:MODULE#TOKEN`: KEKs labelled
//! `rtpay-kek-v<N>` inside the PKCS#11 token with that label, the user PIN from
//! `RTPAY_PKCS11_PIN`; version 1 is generated in the token on first start.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use server::vault_service::Loader;
use vault::pkcs11::{Pkcs11Config, Pkcs11Kek};
use vault::{FileKek, Keyring, Secret32, VaultError, WrappedKey};

use crate::serve::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekConfig {
    File(PathBuf),
    Pkcs11 { module: PathBuf, token: String },
}

impl FromStr for KekConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("file:") {
            return Ok(KekConfig::File(path.into()));
        }
        if let Some(rest) = s.strip_prefix("pkcs11:") {
            let (module, token) = rest.split_once('#').ok_or("expected pkcs11:MODULE#TOKEN-LABEL")?;
            return Ok(KekConfig::Pkcs11 { module: module.into(), token: token.to_owned() });
        }
        Err("expected file:PATH or pkcs11:MODULE#TOKEN-LABEL".into())
    }
}

impl KekConfig {
    pub fn or_default(config: Option<KekConfig>, data: &Path) -> KekConfig {
        config.unwrap_or_else(|| KekConfig::File(data.join("kek")))
    }
}

fn pin() -> Result<String, VaultError> {
    std::env::var("RTPAY_PKCS11_PIN").map_err(|_| VaultError::Config("RTPAY_PKCS11_PIN is not set".into()))
}

/// Adds `line` to the key file at `path`, or makes the file with it. The file is replaced whole:
/// a write that fails halfway leaves the keys it held as they were, never a torn line that no
/// start could read past.
fn append_private(path: &Path, line: &str) -> std::io::Result<()> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return crate::serve::write_private(path, line),
        Err(e) => return Err(e),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    crate::serve::replace_private(path, &text)
}

/// Every KEK version configured; with `create`, version 1 is made when there is none.
pub fn load(config: &KekConfig, create: bool) -> Result<Keyring, VaultError> {
    let mut ring = Keyring::default();
    match config {
        KekConfig::File(path) => {
            if !path.exists() {
                if !create {
                    return Err(VaultError::Config(format!("no key file at {}", path.display())));
                }
                append_private(path, &FileKek::file_line(1)?)
                    .map_err(|e| VaultError::Config(format!("cannot write {}: {e}", path.display())))?;
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| VaultError::Config(format!("cannot read {}: {e}", path.display())))?;
            for kek in FileKek::parse_file(&text)? {
                ring.add(Box::new(kek));
            }
        }
        KekConfig::Pkcs11 { module, token } => {
            let pin = pin()?;
            let p11 = Pkcs11Config { module, token_label: token, pin: &pin };
            for version in 1.. {
                match Pkcs11Kek::open(&p11, version, create && version == 1) {
                    Ok(kek) => ring.add(Box::new(kek)),
                    Err(VaultError::UnknownKek(_)) => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(ring)
}

pub fn loader(config: KekConfig) -> Loader {
    Box::new(move || load(&config, false))
}

/// Whether [`index_key`] would make a new index key (none in the environment, where `env`, nor
/// in the directory).
pub fn index_key_missing(data: &Path, env: bool) -> bool {
    let in_env = env && std::env::var("RTPAY_INDEX_KEY").is_ok();
    !in_env && !data.join("index-key").exists()
}

/// Whether [`load`] with `create` would make version 1: no key file, or a token holding no KEK.
/// Any other failure (a wrong PIN, an unreachable token, a malformed file) is not "missing":
/// loading reports it as it is.
pub fn kek_missing(config: &KekConfig) -> bool {
    match config {
        KekConfig::File(path) => !path.exists(),
        KekConfig::Pkcs11 { .. } => matches!(load(config, false), Ok(ring) if ring.current_version().is_none()),
    }
}

/// The blind-index key: `RTPAY_INDEX_KEY` (64 hex digits; the same on every node) where `env`,
/// else `<data>/index-key`, created on first start.
pub fn index_key(data: &Path, env: bool) -> Result<Secret32, Error> {
    let path = data.join("index-key");
    if index_key_missing(data, env) {
        crate::serve::write_private(&path, &new_index_key()?)?;
    }
    let text = match std::env::var("RTPAY_INDEX_KEY").ok().filter(|_| env) {
        Some(v) => v,
        None => std::fs::read_to_string(&path)?,
    };
    let bytes = vault::unhex(text.trim()).filter(|b| b.len() == 32).ok_or("the index key must be 64 hex digits")?;
    Ok(Secret32::from_bytes(bytes.try_into().expect("32 bytes")))
}

fn new_index_key() -> Result<String, VaultError> {
    Ok(vault::hex(Secret32::random()?.expose()))
}

/// The files `rtpay keys init` writes: the secrets every node of a PostgreSQL cluster must share,
/// under the names `rtpay serve` gives them in a data directory.
pub const CLUSTER_FILES: [&str; 5] = ["secret-key", "index-key", "operator-token", "audit-signing-key", "kek"];

/// Writes a new cluster's shared secrets into `dir` (made with mode 0700 if missing), each file
/// with mode 0600: the API secrets' hashing key, the blind-index key, the operator token, the
/// audit signing key and version 1 of the key-encryption keys. Their names are those `rtpay serve`
/// reads from its data directory, so the directory (a Kubernetes Secret mounted there, say) can
/// be every node's `--data`. Refuses, writing nothing, when any of them exists: a key replaced
/// makes what it protects unreadable.
pub fn init(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let contents = [
        crate::serve::new_hash_key(),
        new_index_key()?,
        server::auth::new_secret(server::auth::OPERATOR_SECRET_PREFIX),
        crate::serve::new_audit_key()?,
        FileKek::file_line(1)?,
    ];
    if let Some(path) = CLUSTER_FILES.iter().map(|name| dir.join(name)).find(|p| p.exists()) {
        return Err(format!("{} exists; keys init never replaces a key", path.display()).into());
    }
    if !dir.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        parent.map_or(Ok(()), std::fs::create_dir_all).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut written = Vec::new();
    for (name, text) in CLUSTER_FILES.iter().zip(&contents) {
        let path = dir.join(name);
        if let Err(e) = crate::serve::write_private(&path, text) {
            for done in &written {
                let _ = std::fs::remove_file(done);
            }
            return Err(format!("cannot write {}: {e}", path.display()).into());
        }
        written.push(path);
    }
    Ok(written)
}

/// Adds KEK version N+1 and re-wraps every tenant's data key under it. Old versions stay, so
/// anything not yet re-wrapped (or cached by a running node) stays readable. Returns (new
/// version, data keys re-wrapped).
pub fn rotate(config: &KekConfig, queries: &dyn store::Queries) -> Result<(u32, usize), Error> {
    let _turn = rotation_turn(config, queries, true)?;
    let version = add_version_in_turn(config, queries)?;
    Ok((version, rewrap_in_turn(config, queries)?.1))
}

/// A rotation's turn: rotations take turns. Two at once (a retried `POST /v1/keys/rotate`, or
/// `rtpay keys rotate` beside a server, or two nodes over one PKCS#11 token) each added "version
/// N+1" with a key of its own, and data keys re-wrapped under the one that lost no longer opened.
/// Every rotation holds, in this order: `ROTATING` (this process's), the storage's turn
/// ([`store::Queries::key_rotation_turn`]: every process over the same database, on any host),
/// and, when it adds a line to a key file, an exclusive `flock` on `<file>.lock` (every process
/// of the host using that file, whatever its database). A re-wrap alone writes no key file, and
/// takes no file lock: its key file may be on a read-only mount.
struct Turn {
    _file: Option<std::fs::File>,
    _storage: Box<dyn Send>,
    _process: std::sync::MutexGuard<'static, ()>,
}

fn rotation_turn(config: &KekConfig, queries: &dyn store::Queries, adds_version: bool) -> Result<Turn, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    static ROTATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let process = ROTATING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let storage = queries.key_rotation_turn()?;
    let file = match config {
        KekConfig::File(path) if adds_version => {
            // The file a symbolic link names: two links to one key file take one lock.
            let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            let mut name = path.as_os_str().to_owned();
            name.push(".lock");
            let lock = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&name)?;
            loop {
                // SAFETY: flock on a descriptor this function owns; blocks until granted.
                if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(format!("cannot lock {}: {e}", PathBuf::from(name).display()).into());
                }
            }
            Some(lock)
        }
        KekConfig::File(_) | KekConfig::Pkcs11 { .. } => None,
    };
    Ok(Turn { _file: file, _storage: storage, _process: process })
}

/// Adds KEK version N+1 to the key source, and re-wraps nothing: the first half of a rotation
/// whose key file every node reads from its own copy (a Kubernetes Secret). Once every node's
/// copy holds the new version, [`rewrap`] puts the data keys under it; a node meeting a data key
/// under a version its copy lacks answers 503 until its copy catches up.
pub fn add_version(config: &KekConfig, queries: &dyn store::Queries) -> Result<u32, Error> {
    let _turn = rotation_turn(config, queries, true)?;
    add_version_in_turn(config, queries)
}

/// Adds version N+1, N being the newest this node's key source holds; refused when tenants' data
/// keys are already wrapped under N+1 or later: this node's copy of the key file is behind
/// another's (each node reading its own copy, a rotation elsewhere added N+1 with another key),
/// and a second "N+1" would wrap data keys no other node can open.
fn add_version_in_turn(config: &KekConfig, queries: &dyn store::Queries) -> Result<u32, Error> {
    let next = load(config, false)?.current_version().ok_or("no key-encryption key configured")? + 1;
    if let Some(used) = queries.data_keys()?.iter().map(|k| k.kek_version).max().filter(|&v| v >= next) {
        return Err(format!(
            "tenants' data keys are wrapped under key-encryption key version {used}, and this node's newest \
             is {}: its key source is behind the cluster's; give it the current key file (nothing was added)",
            next - 1
        )
        .into());
    }
    match config {
        KekConfig::File(path) => append_private(path, &FileKek::file_line(next)?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        KekConfig::Pkcs11 { module, token } => {
            let pin = pin()?;
            Pkcs11Kek::open(&Pkcs11Config { module, token_label: token, pin: &pin }, next, true)?;
        }
    }
    let loaded = load(config, false)?.current_version();
    assert_eq!(loaded, Some(next), "the new version is current");
    Ok(next)
}

/// Re-wraps every tenant's data key under the newest KEK version the key source holds, adding
/// none. Returns (that version, data keys re-wrapped).
pub fn rewrap(config: &KekConfig, queries: &dyn store::Queries) -> Result<(u32, usize), Error> {
    let _turn = rotation_turn(config, queries, false)?;
    rewrap_in_turn(config, queries)
}

fn rewrap_in_turn(config: &KekConfig, queries: &dyn store::Queries) -> Result<(u32, usize), Error> {
    let ring = load(config, false)?;
    let current = ring.current_version().ok_or("no key-encryption key configured")?;
    let mut rewrapped = 0;
    // One data key that does not open (storage edited, a version this node lacks) is no reason
    // to leave the others under the old version: each is tried, and those that failed are named.
    let mut failed = Vec::new();
    for key in queries.data_keys()? {
        let old = WrappedKey { kek_version: key.kek_version, wrapped: key.wrapped.clone() };
        let new = match ring.rewrap(&old) {
            Ok(new) => new,
            Err(e) => {
                failed.push(format!(
                    "tenant {} (version {}: {e})",
                    uuid::Uuid::from_u128(key.tenant_id),
                    key.kek_version
                ));
                continue;
            }
        };
        if new.kek_version != key.kek_version {
            let record =
                store::DataKeyRecord { tenant_id: key.tenant_id, kek_version: new.kek_version, wrapped: new.wrapped };
            if queries.rewrap_data_key(&record, key.kek_version)? {
                rewrapped += 1;
            }
        }
    }
    if !failed.is_empty() {
        return Err(format!(
            "{}key-encryption key version {current} is current and {rewrapped} data key(s) were re-wrapped under it, \
             but {} could not be: {}; they stay under their versions. Once they are repaired, run \
             `rtpay keys rotate --rewrap-only` (rotating again would add another version)",
            server::vault_service::ROTATION_INCOMPLETE,
            failed.len(),
            failed.join(", ")
        )
        .into());
    }
    Ok((current, rewrapped))
}
