//! The vault as the server uses it: the keyring (reloaded when a data key names a KEK version this
//! node has not loaded, so a rotation done by `rtpay keys rotate` needs no restart), the blind
//! index, and each tenant's data key, created on first use and kept unwrapped in a bounded cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use store::{DataKeyRecord, Queries, StoreError};
use vault::{BlindIndex, Keyring, Secret32, VaultError, WrappedKey};

/// Unwrapped data keys kept at most; the cache is cleared when full.
pub const DEK_CACHE_LEN_MAX: usize = 10_000;

pub type Loader = Box<dyn Fn() -> Result<Keyring, VaultError> + Send + Sync>;
/// Creates KEK version N+1 and re-wraps every data key: (new version, keys re-wrapped).
/// How a rotation's error begins when the new version was added and some data keys could not
/// be re-wrapped under it: asked again, a rotation would add another version; the keys need
/// repair and a re-wrap instead.
pub const ROTATION_INCOMPLETE: &str = "the rotation is incomplete: ";

pub type Rotator = Box<dyn Fn(&dyn Queries) -> Result<(u32, usize), String> + Send + Sync>;

pub struct VaultService {
    keyring: RwLock<Keyring>,
    loader: Loader,
    index: BlindIndex,
    deks: Mutex<HashMap<u128, Arc<Secret32>>>,
    rotator: Option<Rotator>,
}

impl std::fmt::Debug for VaultService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultService(..)")
    }
}

/// What went wrong, for the caller to turn into a response.
#[derive(Debug)]
pub enum VaultFailure {
    Store(StoreError),
    Vault(VaultError),
}

impl From<StoreError> for VaultFailure {
    fn from(e: StoreError) -> Self {
        VaultFailure::Store(e)
    }
}

impl From<VaultError> for VaultFailure {
    fn from(e: VaultError) -> Self {
        VaultFailure::Vault(e)
    }
}

impl VaultService {
    pub fn new(loader: Loader, index_key: &Secret32) -> Result<VaultService, VaultError> {
        let keyring = loader()?;
        if keyring.current_version().is_none() {
            return Err(VaultError::Config("no key-encryption key configured".into()));
        }
        Ok(VaultService {
            keyring: RwLock::new(keyring),
            loader,
            index: BlindIndex::new(index_key),
            deks: Mutex::new(HashMap::new()),
            rotator: None,
        })
    }

    pub fn with_rotator(mut self, rotator: Rotator) -> VaultService {
        self.rotator = Some(rotator);
        self
    }

    /// Rotates the KEK and loads the new keyring. Blocking. A rotation done is reported done even
    /// when the keys cannot be loaded again at once (the key file or token read failed): asked
    /// again, an operator would rotate once more. This node then keeps its keyring until a data
    /// key under the new version needs it (`unwrap` loads the keys then); the data keys it makes
    /// meanwhile are wrapped under a version it holds, which still opens.
    pub fn rotate(&self, queries: &dyn Queries) -> Result<(u32, usize), String> {
        let rotator = self.rotator.as_ref().ok_or("key rotation is not configured on this node")?;
        let result = rotator(queries)?;
        match (self.loader)() {
            Ok(keyring) => *self.keyring.write().expect("keyring lock") = keyring,
            Err(e) => tracing::warn!(
                error = %e,
                kek_version = result.0,
                "the key-encryption key was rotated, but this node could not load the keys again yet"
            ),
        }
        Ok(result)
    }

    pub fn index(&self) -> &BlindIndex {
        &self.index
    }

    fn unwrap(&self, key: &WrappedKey) -> Result<Secret32, VaultError> {
        match self.keyring.read().expect("keyring lock").unwrap(key) {
            Err(VaultError::UnknownKek(_)) => {}
            other => return other,
        }
        // Rotated elsewhere: load the keys again, once.
        let fresh = (self.loader)()?;
        let result = fresh.unwrap(key);
        *self.keyring.write().expect("keyring lock") = fresh;
        result
    }

    /// The tenant's data key, creating and storing it on first use. Blocking: storage and maybe
    /// an HSM round trip.
    pub fn data_key(&self, queries: &dyn Queries, tenant: u128) -> Result<Arc<Secret32>, VaultFailure> {
        if let Some(dek) = self.deks.lock().expect("dek cache lock").get(&tenant) {
            return Ok(dek.clone());
        }
        let dek = match queries.data_key(tenant)? {
            Some(stored) => self.unwrap(&WrappedKey { kek_version: stored.kek_version, wrapped: stored.wrapped })?,
            None => {
                // Under the newest version there is: a rotation elsewhere (another node, `rtpay
                // keys rotate`) re-wrapped the keys stored then, and this node would otherwise
                // go on wrapping new ones under the version it loaded, which the operator may
                // then retire. Once per tenant, so loading again is cheap; if it fails, the
                // keys held still make one that opens.
                match (self.loader)() {
                    Ok(fresh) if fresh.current_version().is_some() => {
                        *self.keyring.write().expect("keyring lock") = fresh
                    }
                    Ok(_) => tracing::warn!("the key-encryption keys loaded again hold no version; kept those held"),
                    Err(e) => tracing::warn!(error = %e, "the key-encryption keys could not be loaded again"),
                }
                let (dek, wrapped) = self.keyring.read().expect("keyring lock").new_data_key()?;
                let record =
                    DataKeyRecord { tenant_id: tenant, kek_version: wrapped.kek_version, wrapped: wrapped.wrapped };
                match queries.create_data_key(&record) {
                    Ok(()) => dek,
                    // Another node made it first: use theirs.
                    Err(StoreError::Conflict(_)) => {
                        let theirs = queries
                            .data_key(tenant)?
                            .ok_or_else(|| StoreError::Corrupt("a data key vanished after a conflict".into()))?;
                        self.unwrap(&WrappedKey { kek_version: theirs.kek_version, wrapped: theirs.wrapped })?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let dek = Arc::new(dek);
        let mut cache = self.deks.lock().expect("dek cache lock");
        if cache.len() >= DEK_CACHE_LEN_MAX {
            cache.clear();
        }
        cache.insert(tenant, dek.clone());
        Ok(dek)
    }
}

impl From<VaultFailure> for crate::problem::Problem {
    /// An unreachable key store is 503 (nothing was written); anything else the vault refuses is a
    /// fault of ours, logged and answered 500.
    fn from(failure: VaultFailure) -> crate::problem::Problem {
        match failure {
            VaultFailure::Store(e) => e.into(),
            VaultFailure::Vault(VaultError::Unavailable(why)) => {
                tracing::warn!(%why, "key store unavailable");
                crate::problem::Problem::unavailable("the key store is unavailable; nothing was written", 5)
            }
            // Even after reloading its keys, this node lacks a version another rotated to: its
            // copy of the key file (a mounted Secret, say) has not caught up yet.
            VaultFailure::Vault(VaultError::UnknownKek(version)) => {
                tracing::warn!(version, "a data key is wrapped under a key-encryption key this node does not have");
                crate::problem::Problem::unavailable(
                    "a key-encryption key this node does not have yet protects this record; nothing was written",
                    30,
                )
            }
            VaultFailure::Vault(e) => {
                tracing::error!(error = %e, "vault failure");
                crate::problem::Problem::internal()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotation that committed is reported done though the keys could not be loaded again right
    /// after it; the node keeps serving with the keyring it had.
    #[test]
    fn a_rotation_done_is_reported_done_when_the_reload_fails() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = calls.clone();
        let kek = Secret32::random().unwrap();
        let loader: Loader = Box::new(move || {
            if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let mut ring = Keyring::default();
                ring.add(Box::new(vault::FileKek::new(1, Secret32::from_bytes(*kek.expose()))));
                Ok(ring)
            } else {
                Err(VaultError::Unavailable("the key file could not be read".into()))
            }
        });
        let service =
            VaultService::new(loader, &Secret32::random().unwrap()).unwrap().with_rotator(Box::new(|_| Ok((2, 7))));
        let dir = std::env::temp_dir().join(format!("rtpay-rotate-{}-{}", std::process::id(), store::now_nanos()));
        let store = store::Store::open(&store::Location::Embedded(dir.clone())).unwrap();
        assert_eq!(service.rotate(store.queries.as_ref()), Ok((2, 7)));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2, "the reload was tried");
        // The keyring it had still wraps new data keys, which open.
        let dek = service.data_key(store.queries.as_ref(), 5).expect("a data key");
        assert_eq!(service.data_key(store.queries.as_ref(), 5).expect("cached").expose(), dek.expose());
        store.close();
        let _ = std::fs::remove_dir_all(dir);
    }
}
