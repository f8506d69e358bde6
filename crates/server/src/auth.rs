//! Who is calling: the operator (one bootstrap token) or a tenant (API keys).
//!
//! Secrets are 256 random bits, shown once, and stored only as HMAC-SHA256 under the server's
//! hash key, so a copy of the database does not yield usable keys. Comparisons of hashes are
//! constant-time. No secret is ever logged or echoed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::problem::Problem;
use crate::AppState;

/// How long a verified API key is trusted without asking storage again. Bounds how long a key
/// revoked on another node keeps working; a revocation on this node takes effect at once.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);
/// Verified keys remembered at most; the cache is cleared when full.
pub const KEY_CACHE_LEN_MAX: usize = 100_000;

pub const TENANT_SECRET_PREFIX: &str = "rtpay_sk_";
pub const OPERATOR_SECRET_PREFIX: &str = "rtpay_op_";

/// 32 bytes from the operating system's CSPRNG.
pub fn random_32() -> [u8; 32] {
    random_bytes()
}

/// `N` random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes
}

pub use audit::{hex, unhex};

/// A new secret: prefix + 64 hex digits (256 bits).
pub fn new_secret(prefix: &str) -> String {
    format!("{prefix}{}", hex(&random_32()))
}

/// A new API key secret: prefix, the key's id (32 hex digits, not secret), `_`, 256 random bits.
/// The id lets failed attempts be counted against the key they name.
pub fn new_api_key_secret(key_id: u128) -> String {
    format!("{TENANT_SECRET_PREFIX}{key_id:032x}_{}", hex(&random_32()))
}

/// The key id an API key secret names, if it is of the current format.
pub fn api_key_id(secret: &str) -> Option<u128> {
    let rest = secret.strip_prefix(TENANT_SECRET_PREFIX)?;
    let (id, random) = rest.split_once('_')?;
    if id.len() != 32 || random.len() != 64 {
        return None;
    }
    // Digit by digit: `u128::from_str_radix` was a fortieth of the HTTP worker's instructions.
    id.bytes().try_fold(0u128, |n, b| Some(n << 4 | u128::from(char::from(b).to_digit(16)?)))
}

/// A random (version 4) UUID.
pub fn new_uuid() -> uuid::Uuid {
    let bytes = random_32();
    uuid::Builder::from_random_bytes(bytes[..16].try_into().expect("16 bytes")).into_uuid()
}

/// The server's keys. `Debug` shows nothing.
pub struct Keys {
    /// HMAC-SHA256 keyed with the server's hash key, before any message: each hash starts from a
    /// copy, so the key's two blocks are hashed once, not on every request.
    keyed: Hmac<Sha256>,
    operator_hash: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub fn new(hash_key: [u8; 32], operator_token: &str) -> Keys {
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(&hash_key).expect("HMAC takes any key length");
        let operator_hash = keyed_hash(&keyed, b"operator", operator_token.as_bytes());
        Keys { keyed, operator_hash }
    }

    /// HMAC-SHA256 under the server's key, for `purpose` (e.g. signing access tokens).
    pub fn mac(&self, purpose: &[u8], message: &[u8]) -> [u8; 32] {
        keyed_hash(&self.keyed, purpose, message)
    }

    pub fn secret_hash(&self, secret: &str) -> [u8; 32] {
        keyed_hash(&self.keyed, b"api-key", secret.as_bytes())
    }

    pub fn is_operator(&self, token: &str) -> bool {
        constant_time_eq(&keyed_hash(&self.keyed, b"operator", token.as_bytes()), &self.operator_hash)
    }

    /// A stable id derived from a client's `Idempotency-Key`, so a repeated creation names the
    /// same resource.
    pub fn derived_id(&self, purpose: &[u8], tenant: u128, idempotency_key: &str) -> uuid::Uuid {
        let mut input = tenant.to_be_bytes().to_vec();
        input.extend_from_slice(idempotency_key.as_bytes());
        let digest = keyed_hash(&self.keyed, purpose, &input);
        uuid::Builder::from_custom_bytes(digest[..16].try_into().expect("16 bytes")).into_uuid()
    }

    /// Like [`Keys::derived_id`], but sorting where `anchor` sorts: the upper 64 bits (with the
    /// version) are the anchor's, the lower 64 the keyed hash's (with the RFC 9562 variant). With a
    /// time-ordered anchor (a UUIDv7 payment id), the ids of one payment's transfers then append
    /// to the transfer id index instead of dirtying a random page each; the hash still makes them
    /// unguessable and distinct per `idempotency_key`.
    pub fn derived_id_near(&self, purpose: &[u8], tenant: u128, idempotency_key: &str, anchor: u128) -> uuid::Uuid {
        let hashed = self.derived_id(purpose, tenant, idempotency_key).as_u128();
        const LOW: u128 = (1 << 64) - 1;
        let low = (hashed & LOW & !(0b11 << 62)) | (0b10 << 62);
        uuid::Uuid::from_u128((anchor & !LOW) | low)
    }
}

fn keyed_hash(keyed: &Hmac<Sha256>, purpose: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = keyed.clone();
    mac.update(purpose);
    mac.update(b"\0");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Verified keys: secret hash → (the key as a tenant credential, when verified); and OAuth
/// clients seen live (not revoked) → when.
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<ledger::Map<[u8; 32], (Tenant, Instant)>>,
    clients: Mutex<ledger::Map<u128, Instant>>,
    /// API keys and OAuth clients revoked on this node since it started: an answer from storage
    /// read before a revocation is not cached after it, and a connection's proven key
    /// ([`ConnectionKey`]) is trusted only while this has not moved.
    revocations: AtomicU64,
}

impl KeyCache {
    /// The key and when storage vouched for it.
    fn get(&self, hash: &[u8; 32]) -> Option<(Tenant, Instant)> {
        let entries = self.entries.lock().expect("key cache lock");
        entries.get(hash).filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL).copied()
    }

    /// Remembers a key storage vouched for, unless a key was revoked on this node since the
    /// caller read `revocations` (before asking storage): the answer may predate the revocation.
    fn put(&self, hash: [u8; 32], tenant: Tenant, at: Instant, revocations: u64) {
        let mut entries = self.entries.lock().expect("key cache lock");
        if self.revocations() != revocations {
            return;
        }
        if entries.len() >= KEY_CACHE_LEN_MAX {
            entries.clear();
        }
        entries.insert(hash, (tenant, at));
    }

    pub fn forget_key(&self, key_id: u128) {
        // Under the lock, so that a `put` either comes before (and is removed here) or sees the
        // count moved.
        let mut entries = self.entries.lock().expect("key cache lock");
        entries.retain(|_, (t, _)| t.key_id != key_id);
        self.revocations.fetch_add(1, Ordering::SeqCst);
    }

    fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::SeqCst)
    }

    fn client_live(&self, client: u128) -> bool {
        let clients = self.clients.lock().expect("key cache lock");
        clients.get(&client).is_some_and(|at| at.elapsed() < KEY_CACHE_TTL)
    }

    /// Like [`KeyCache::put`], for an OAuth client storage found live.
    fn put_client(&self, client: u128, revocations: u64) {
        let mut clients = self.clients.lock().expect("key cache lock");
        if self.revocations() != revocations {
            return;
        }
        if clients.len() >= KEY_CACHE_LEN_MAX {
            clients.clear();
        }
        clients.insert(client, Instant::now());
    }

    pub fn forget_client(&self, client: u128) {
        let mut clients = self.clients.lock().expect("key cache lock");
        clients.remove(&client);
        self.revocations.fetch_add(1, Ordering::SeqCst);
    }
}

/// The API key a connection last proved, so that its next requests with the same secret skip
/// the keyed hash (a twentieth of the HTTP worker's time at the peak) and the shared cache's lock.
/// Trusted as long as the shared cache would trust it: [`KEY_CACHE_TTL`] from when storage
/// vouched for the key, and no revocation on this node since. Each connection has its own
/// (see [`crate::Peer`]); it holds the secret as long as the connection lives, as the
/// connection's own read buffers do (neither is wiped when freed).
#[derive(Default)]
pub struct ConnectionKey(Mutex<Option<ProvenKey>>);

/// No `Debug`: it holds a secret.
struct ProvenKey {
    secret: Box<[u8]>,
    tenant: Tenant,
    /// When storage vouched for the key.
    at: Instant,
    /// [`KeyCache::revocations`] before the key was verified.
    revocations: u64,
}

impl ConnectionKey {
    fn get(&self, secret: &str, revocations: u64) -> Option<Tenant> {
        let proven = self.0.lock().expect("connection key lock");
        let proven = proven.as_ref()?;
        let same = constant_time_eq(&proven.secret, secret.as_bytes());
        (same && proven.revocations == revocations && proven.at.elapsed() < KEY_CACHE_TTL).then_some(proven.tenant)
    }

    fn put(&self, secret: &str, tenant: Tenant, at: Instant, revocations: u64) {
        let proven = ProvenKey { secret: secret.as_bytes().into(), tenant, at, revocations };
        *self.0.lock().expect("connection key lock") = Some(proven);
    }
}

pub(crate) fn bearer(parts: &Parts) -> Result<&str, Problem> {
    let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
    let value = values
        .next()
        .ok_or_else(|| Problem::unauthorized("missing Authorization header; use `Authorization: Bearer <secret>`"))?;
    // Two credentials: which one a proxy in front read is anyone's guess. One request, one.
    if values.next().is_some() {
        return Err(Problem::new(
            axum::http::StatusCode::BAD_REQUEST,
            "duplicate_header",
            "more than one Authorization header; send exactly one",
        )
        .field("Authorization"));
    }
    let value = value.to_str().map_err(|_| Problem::unauthorized("the Authorization header is not ASCII"))?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| Problem::unauthorized("expected `Bearer <secret>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Problem::unauthorized("expected `Bearer <secret>`"));
    }
    Ok(token.trim())
}

/// The client's address: as the request's audit slot has it (behind trusted proxies, the one
/// they name), or else the connection's.
fn source(parts: &Parts) -> Option<std::net::IpAddr> {
    let addr = match parts.extensions.get::<std::sync::Arc<crate::audit_trail::Slot>>().and_then(|s| s.client()) {
        Some(addr) => addr,
        None => parts.extensions.get::<axum::extract::ConnectInfo<crate::Peer>>()?.0.addr,
    };
    Some(canonical(addr.ip()))
}

/// An address as the failure budget counts it. One client, one count: on a dual-stack listener
/// IPv4 peers arrive as `::ffff:a.b.c.d`; an IPv6 client is its /64 (the least a network hands
/// one subscriber), or each of its 2^64 addresses would bring a fresh budget.
pub(crate) fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    /// NAT64's well-known prefix (RFC 6052): each address is an IPv4 client's, counted as such.
    const NAT64: u128 = 0x0064_ff9b << 96;
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) if u128::from(v6) >> 32 == NAT64 >> 32 => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::from(u128::from(v6) as u32))
        }
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// Before any credential is checked: a source over its failure budget, or a locked id, waits.
pub(crate) fn guard(parts: &Parts, state: &AppState, id: Option<&str>) -> Result<(), Problem> {
    let now = Instant::now();
    if let Err(wait) = state.auth_guard.source_allowed(source(parts), now) {
        return Err(Problem::too_many(
            "auth_throttled",
            "too many failed authentications from this address; retry later",
            wait,
        ));
    }
    if let Some(wait) = id.and_then(|id| state.auth_guard.locked(id, now)) {
        return Err(Problem::too_many(
            "credential_locked",
            "this credential is locked after repeated failed authentications",
            wait,
        ));
    }
    Ok(())
}

/// Counts a failed authentication (see [`count_failure`]) and returns `problem`.
pub(crate) fn failed(parts: &Parts, state: &AppState, id: Option<&str>, problem: Problem) -> Problem {
    count_failure(parts, state, id);
    problem
}

/// Counts a failed authentication against the source and `id`; a lock it causes is audited.
/// With client certificates, a connection counts against a credential's lock only if its
/// certificate is of a kind that could present that credential: a connection with no
/// certificate, with one that names no rtpay identity, a tenant's or a client's against the
/// operator, the operator's against a tenant's, or an OAuth client's against an API key, could
/// never use it, and must not lock out those who can. (A tenant's certificate still counts
/// against another tenant's key it names: which tenant a failed key belongs to is not known
/// without it. An OAuth client's certificate counts only against that client.)
pub(crate) fn count_failure(parts: &Parts, state: &AppState, id: Option<&str>) {
    use crate::limits::AfterFailure;
    use crate::tls::PeerIdentity as P;
    let id = id.filter(|id| match parts.extensions.get::<P>() {
        None => true,
        Some(P::Anonymous | P::Unbound) => false,
        Some(P::Operator) => operator_lock(id),
        Some(P::Tenant(_)) => !operator_lock(id),
        Some(P::Client(c)) => {
            id.strip_prefix("client:").and_then(|u| uuid::Uuid::parse_str(u).ok()) == Some(uuid::Uuid::from_u128(*c))
        }
    });
    if let Some(slot) = parts.extensions.get::<std::sync::Arc<crate::audit_trail::Slot>>() {
        slot.mark_failure_counted();
    }
    if state.auth_guard.failed(source(parts), id, Instant::now()) == AfterFailure::Locked {
        let id = id.expect("only an id can be locked");
        tracing::warn!(credential = id, "credential locked after repeated failed authentications");
        let slot = parts.extensions.get::<std::sync::Arc<crate::audit_trail::Slot>>();
        let draft = audit::Draft {
            tenant: None,
            actor: "anonymous".into(),
            action: "auth.lock".into(),
            resource: id.to_owned(),
            request_id: slot.map(|s| s.request_id.clone()).unwrap_or_default(),
            source: slot.map(|s| s.source()).unwrap_or_default(),
            outcome: format!("locked for {} s", crate::limits::LOCK_DURATION.as_secs()),
        };
        let submitted = state.store.engine.submit(store::Command::Audit(vec![draft]), Box::new(|_| {}));
        if submitted.is_err() {
            tracing::error!(credential = id, "the lock could not be recorded in the audit log");
        }
    }
}

/// Whom a credential may be presented by, under mTLS.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Credential {
    Operator,
    ApiKey {
        tenant: u128,
    },
    /// An OAuth client's secret or access token.
    Client {
        tenant: u128,
        client: u128,
    },
}

impl Credential {
    fn presented_by(self, peer: crate::tls::PeerIdentity) -> bool {
        use crate::tls::PeerIdentity as P;
        match (self, peer) {
            (Credential::Operator, P::Operator) => true,
            (Credential::ApiKey { tenant }, P::Tenant(t)) => t == tenant,
            (Credential::Client { tenant, .. }, P::Tenant(t)) => t == tenant,
            (Credential::Client { client, .. }, P::Client(c)) => c == client,
            _ => false,
        }
    }
}

/// With mTLS, the credential must belong to the identity the client certificate names. A refusal
/// is recorded in the audit log whatever the method: a credential presented with another
/// identity's certificate (or none) may well be a stolen one. It counts as a failed
/// authentication against the source (not against the credential, which its owner may still
/// use): else a caller could repeat it, each time one append to the audit log, with no limit.
pub(crate) fn bound_to(parts: &Parts, state: &AppState, credential: Credential) -> Result<(), Problem> {
    let problem = match parts.extensions.get::<crate::tls::PeerIdentity>() {
        None => return Ok(()),
        Some(peer) if credential.presented_by(*peer) => return Ok(()),
        Some(crate::tls::PeerIdentity::Anonymous) => Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            "client_certificate_required",
            "this listener requires a client certificate issued for the caller",
        ),
        Some(_) => Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            "client_certificate_mismatch",
            "the client certificate is issued for another identity than the credential",
        ),
    };
    if let Some(slot) = parts.extensions.get::<std::sync::Arc<crate::audit_trail::Slot>>() {
        slot.record_read();
    }
    count_failure(parts, state, None);
    Err(problem)
}

/// On a listener that takes client certificates, a connection that presented none, or one naming
/// no rtpay identity, can never be admitted: it is refused before any credential is looked at, so
/// that a wrong secret and a right one get the same answer (no oracle for stolen credentials).
pub(crate) fn certificate_can_admit(parts: &Parts) -> Result<(), Problem> {
    let problem = match parts.extensions.get::<crate::tls::PeerIdentity>() {
        Some(crate::tls::PeerIdentity::Anonymous) => Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            "client_certificate_required",
            "this listener requires a client certificate issued for the caller",
        ),
        Some(crate::tls::PeerIdentity::Unbound) => Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            "client_certificate_mismatch",
            "the client certificate names no identity a credential could be issued to",
        ),
        _ => return Ok(()),
    };
    if let Some(slot) = parts.extensions.get::<std::sync::Arc<crate::audit_trail::Slot>>() {
        slot.record_read();
    }
    Err(problem)
}

/// The platform operator.
pub struct Operator;

const OPERATOR_ID: &str = "operator";
/// The operator token's lock on the routes tenants share with it (the audit log's): wrong tokens
/// there lock the token there only, so that anyone who can reach them cannot lock the operator out
/// of its own routes (of revoking a leaked key, say), and guesses there are still bounded.
const OPERATOR_SHARED_ID: &str = "operator:shared";

fn operator_lock(id: &str) -> bool {
    id == OPERATOR_ID || id == OPERATOR_SHARED_ID
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        Operator::admit(parts, state, OPERATOR_ID)
    }
}

impl Operator {
    /// The operator, by its token; a wrong token counts against the source and `lock`: the
    /// operator's own on its routes, [`OPERATOR_SHARED_ID`] on the routes it shares with tenants.
    fn admit(parts: &mut Parts, state: &AppState, lock: &str) -> Result<Operator, Problem> {
        guard(parts, state, Some(lock))?;
        certificate_can_admit(parts)?;
        let token = match bearer(parts) {
            Ok(t) => t,
            Err(p) => return Err(failed(parts, state, None, p)),
        };
        if state.keys.is_operator(token) {
            // Named before the certificate is checked: a refusal for the certificate is recorded
            // as the credential's, not as an anonymous request.
            crate::audit_trail::identify(parts, None, "operator".into());
            bound_to(parts, state, Credential::Operator)?;
            state.auth_guard.succeeded(lock);
            Ok(Operator)
        } else {
            Err(failed(parts, state, Some(lock), Problem::unauthorized("the operator token is not valid")))
        }
    }
}

/// An authenticated tenant.
#[derive(Clone, Copy, Debug)]
pub struct Tenant {
    pub id: u128,
    /// The API key's id, or the OAuth client's.
    pub key_id: u128,
    /// Scope bits (`oauth::SCOPES`); an unscoped API key holds them all.
    pub scopes: u64,
    /// An OAuth access token (else an API key).
    pub oauth: bool,
}

/// The scopes of an unscoped API key: every one.
pub const ALL_SCOPES: u64 = u64::MAX;

impl Tenant {
    /// 403 naming the missing scope, for credentials without it.
    pub fn require(&self, scope: &str) -> Result<(), Problem> {
        let bit = crate::oauth::scope_bit(scope).expect("routes name known scopes");
        if self.scopes & bit == 0 {
            let what = if self.oauth { "access token" } else { "API key" };
            return Err(Problem::new(
                axum::http::StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("the {what} lacks the scope `{scope}`"),
            )
            .field(scope.to_owned()));
        }
        Ok(())
    }

    pub fn ledger_id(&self) -> ledger::TenantId {
        ledger::TenantId(self.id)
    }
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let token = bearer(parts);
        // A secret that names its key is throttled, and its failures counted, against that key
        // (any other credential against its source only).
        let named = token.as_ref().ok().and_then(|t| api_key_id(t));
        let lock_id = named.map(|id| credential_name("key", id));
        guard(parts, state, lock_id.as_deref())?;
        certificate_can_admit(parts)?;
        let token = match token {
            Ok(t) if t.starts_with(crate::oauth::ACCESS_TOKEN_PREFIX) => {
                let claims = match crate::oauth::Claims::verify(state, t, store::now_nanos()) {
                    Ok(c) => c,
                    Err(why) => return Err(failed(parts, state, None, Problem::unauthorized(why))),
                };
                let tenant =
                    Tenant { id: claims.tenant_id, key_id: claims.client_id, scopes: claims.scopes, oauth: true };
                // A token outlives nothing: its client revoked, it stops working (within the
                // cache's second on other nodes).
                if !state.key_cache.client_live(claims.client_id) {
                    let id = claims.client_id;
                    let revocations = state.key_cache.revocations();
                    match crate::routes::query(state, move |q| q.oauth_client(id)).await? {
                        Some((c, _)) if c.revoked_at.is_none() && c.tenant_id == claims.tenant_id => {
                            state.key_cache.put_client(id, revocations)
                        }
                        _ => {
                            let problem = Problem::unauthorized("the OAuth client of this token was revoked");
                            return Err(failed(parts, state, None, problem));
                        }
                    }
                }
                return admit(parts, state, tenant, None, None);
            }
            Ok(t) if t.starts_with(TENANT_SECRET_PREFIX) => t,
            Ok(_) => return Err(failed(parts, state, None, Problem::unauthorized("the API key is not valid"))),
            Err(p) => return Err(failed(parts, state, None, p)),
        };
        let connection = parts.extensions.get::<axum::extract::ConnectInfo<crate::Peer>>().map(|c| c.0.key.clone());
        // Read before the key is verified: a revocation from here on makes the proof stale.
        let revocations = state.key_cache.revocations();
        let tenant = match connection.as_ref().and_then(|c| c.get(token, revocations)) {
            Some(tenant) => tenant,
            None => {
                let hash = state.keys.secret_hash(token);
                let (tenant, at) = match state.key_cache.get(&hash) {
                    Some(known) => known,
                    None => match crate::routes::query(state, move |q| q.api_key_by_hash(&hash)).await? {
                        Some(key) if key.revoked_at.is_none() => {
                            let scopes = match &key.scopes {
                                None => ALL_SCOPES,
                                Some(names) => {
                                    names.split(' ').filter_map(crate::oauth::scope_bit).fold(0, |a, b| a | b)
                                }
                            };
                            let tenant = Tenant { id: key.tenant_id, key_id: key.id, scopes, oauth: false };
                            let at = Instant::now();
                            state.key_cache.put(hash, tenant, at, revocations);
                            (tenant, at)
                        }
                        Some(key) => {
                            let id = credential_name("key", key.id);
                            let problem = Problem::unauthorized("the API key was revoked");
                            return Err(failed(parts, state, Some(&id), problem));
                        }
                        None => {
                            let problem = Problem::unauthorized("the API key is not valid");
                            return Err(failed(parts, state, lock_id.as_deref(), problem));
                        }
                    },
                };
                if let Some(connection) = &connection {
                    connection.put(token, tenant, at, revocations);
                }
                tenant
            }
        };
        // The key's name for the audit log is the lock id already made, when it names this key.
        let name = lock_id.clone().filter(|_| named == Some(tenant.key_id));
        admit(parts, state, tenant, name, lock_id.as_deref())
    }
}

/// `key:<id>` or `client:<id>`: how a credential is named in the audit log and the lock-out.
fn credential_name(kind: &str, id: u128) -> String {
    let mut name = String::with_capacity(kind.len() + 37);
    name.push_str(kind);
    name.push(':');
    name.push_str(&crate::dto::uuid_string(id));
    name
}

/// After a credential checked out: the certificate binding, the audit actor
/// (`key:<id>` or `client:<id>`; `name`, when the caller has it made), and the tenant's rate. The
/// credential's failures (counted under `lock_id`) are forgotten once its certificate fits too:
/// the right key from the wrong certificate is no success.
fn admit(
    parts: &Parts,
    state: &AppState,
    tenant: Tenant,
    name: Option<String>,
    lock_id: Option<&str>,
) -> Result<Tenant, Problem> {
    let (credential, kind) = match tenant.oauth {
        true => (Credential::Client { tenant: tenant.id, client: tenant.key_id }, "client"),
        false => (Credential::ApiKey { tenant: tenant.id }, "key"),
    };
    let name = name.unwrap_or_else(|| credential_name(kind, tenant.key_id));
    // Named before the certificate is checked, as the operator is.
    crate::audit_trail::identify(parts, Some(tenant.id), name);
    bound_to(parts, state, credential)?;
    if let Some(id) = lock_id {
        state.auth_guard.succeeded(id);
    }
    if let Err(wait) = state.tenant_rate.take(tenant.id, Instant::now()) {
        return Err(Problem::too_many("rate_limited", "the tenant's request rate limit is reached", wait));
    }
    Ok(tenant)
}

/// The operator or a tenant: for routes both may read (the audit log).
#[derive(Clone, Copy, Debug)]
pub enum Caller {
    Operator,
    Tenant(Tenant),
}

impl Caller {
    /// The operator holds every scope; a tenant as its credential says.
    pub fn require(&self, scope: &str) -> Result<(), Problem> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Tenant(t) => t.require(scope),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        // Tenant secrets carry their prefix; anything else can only be the operator's token.
        let token = match bearer(parts) {
            Ok(t) => t,
            Err(p) => {
                guard(parts, state, None)?;
                return Err(failed(parts, state, None, p));
            }
        };
        if token.starts_with(TENANT_SECRET_PREFIX) || token.starts_with(crate::oauth::ACCESS_TOKEN_PREFIX) {
            Ok(Caller::Tenant(Tenant::from_request_parts(parts, state).await?))
        } else {
            // Under a lock of these routes' own: anyone who can reach them could otherwise lock
            // the operator out of its routes with ten wrong tokens (of revoking a leaked key, say).
            Operator::admit(parts, state, OPERATOR_SHARED_ID).map(|Operator| Caller::Operator)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure budget per client: an IPv4 address (however it arrives), an IPv6 /64.
    #[test]
    fn sources_are_counted_per_address_and_per_ipv6_64() {
        let ip = |text: &str| canonical(text.parse().unwrap());
        assert_eq!(ip("::ffff:192.0.2.7"), ip("192.0.2.7"));
        assert_ne!(ip("192.0.2.7"), ip("192.0.2.8"));
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(ip("2001:db8:1:2::1").to_string(), "2001:db8:1:2::");
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        // Behind a NAT64 gateway, each IPv4 client is its own.
        assert_eq!(ip("64:ff9b::c000:207"), ip("192.0.2.7"));
        assert_ne!(ip("64:ff9b::c000:207"), ip("64:ff9b::c000:208"));
    }

    #[test]
    fn a_connection_trusts_only_the_same_secret_within_the_cache_time_and_without_a_revocation() {
        let tenant = Tenant { id: 1, key_id: 2, scopes: ALL_SCOPES, oauth: false };
        let secret = new_api_key_secret(2);
        let key = ConnectionKey::default();
        assert!(key.get(&secret, 0).is_none(), "nothing proven yet");
        key.put(&secret, tenant, Instant::now(), 0);
        assert_eq!(key.get(&secret, 0).map(|t| t.id), Some(1));
        // Another secret of the same length, or one that only starts like it.
        let other = new_api_key_secret(2);
        assert_eq!(other.len(), secret.len());
        assert!(key.get(&other, 0).is_none());
        assert!(key.get(&secret[..secret.len() - 1], 0).is_none());
        assert!(key.get(&format!("{secret}0"), 0).is_none());
        // A key revoked on this node since the proof, whichever key it was.
        assert!(key.get(&secret, 1).is_none());
        // Storage vouched for the key longer ago than the shared cache trusts it.
        let Some(long_ago) = Instant::now().checked_sub(KEY_CACHE_TTL) else { return };
        key.put(&secret, tenant, long_ago, 0);
        assert!(key.get(&secret, 0).is_none());
    }

    #[test]
    fn an_api_key_secret_names_its_key() {
        for id in [0, 1, 0xabcdef, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210] {
            assert_eq!(api_key_id(&new_api_key_secret(id)), Some(id));
        }
        let random = "0".repeat(64);
        assert_eq!(
            api_key_id(&format!("rtpay_sk_{}_{random}", "ABCDEF".repeat(5) + "09")),
            Some(0xabcd_efab_cdef_abcd_efab_cdef_abcd_ef09)
        );
        for bad in [
            format!("rtpay_sk_{}_{random}", "g".repeat(32)),
            format!("rtpay_sk_+{}_{random}", "0".repeat(31)),
            format!("rtpay_sk_{}_{random}", "0".repeat(31)),
            format!("rtpay_sk_{}_{}", "0".repeat(32), "0".repeat(63)),
            format!("rtpay_op_{}_{random}", "0".repeat(32)),
            format!("rtpay_sk_{}{random}", "0".repeat(32)),
        ] {
            assert_eq!(api_key_id(&bad), None, "{bad}");
        }
    }

    #[test]
    fn forgetting_a_key_counts_a_revocation_and_an_answer_read_before_it_is_not_remembered() {
        let cache = KeyCache::default();
        let tenant = Tenant { id: 1, key_id: 9, scopes: ALL_SCOPES, oauth: false };
        let before = cache.revocations();
        cache.put([1; 32], tenant, Instant::now(), before);
        assert!(cache.get(&[1; 32]).is_some());
        // Storage answered for [2; 32] before the revocation; the answer arrives after it.
        cache.forget_key(9);
        assert_eq!(cache.revocations(), before + 1);
        assert!(cache.get(&[1; 32]).is_none(), "forgotten");
        cache.put([2; 32], tenant, Instant::now(), before);
        assert!(cache.get(&[2; 32]).is_none(), "an answer older than the revocation");
        cache.put([2; 32], tenant, Instant::now(), before + 1);
        assert!(cache.get(&[2; 32]).is_some());
        // The same for OAuth clients.
        cache.put_client(5, before + 1);
        assert!(cache.client_live(5));
        cache.forget_client(5);
        assert!(!cache.client_live(5));
        cache.put_client(5, before + 1);
        assert!(!cache.client_live(5), "an answer older than the revocation");
    }

    #[test]
    fn secrets_are_long_random_and_hash_distinctly() {
        let a = new_secret(TENANT_SECRET_PREFIX);
        let b = new_secret(TENANT_SECRET_PREFIX);
        assert_ne!(a, b);
        assert_eq!(a.len(), TENANT_SECRET_PREFIX.len() + 64);
        let keys = Keys::new([7; 32], "op");
        assert_ne!(keys.secret_hash(&a), keys.secret_hash(&b));
        assert_eq!(keys.secret_hash(&a), keys.secret_hash(&a));
        assert!(keys.is_operator("op"));
        assert!(!keys.is_operator("op "));
        let other = Keys::new([8; 32], "op");
        assert_ne!(keys.secret_hash(&a), other.secret_hash(&a), "the hash is keyed");
        assert!(!format!("{keys:?}").contains("op"));
    }

    #[test]
    fn a_secret_hash_is_hmac_sha256_of_purpose_and_secret_and_each_hash_starts_afresh() {
        let keys = Keys::new([7; 32], "op");
        // Python: hmac.new(bytes([7] * 32), b"api-key\x00rtpay_sk_abc", hashlib.sha256).hexdigest()
        let expected = "f2d6cd1fb6d43126af880ab7a727d7c21f9bc6b1853d6ad3c5a38dc35ff3ccb3";
        assert_eq!(hex(&keys.secret_hash("rtpay_sk_abc")), expected);
        // The keyed state is copied, never advanced: the same input hashes the same every time.
        assert_ne!(hex(&keys.secret_hash("rtpay_sk_abd")), expected);
        assert_eq!(hex(&keys.secret_hash("rtpay_sk_abc")), expected);
        assert!(keys.is_operator("op") && !keys.is_operator("op2"));
    }

    #[test]
    fn ids_derived_near_an_anchor_sort_with_it() {
        let keys = Keys::new([7; 32], "op");
        // Two UUIDv7 payment ids a millisecond apart, the earlier one with the larger random part.
        let early = 0x0190_0000_0001_7fff_bfff_ffff_ffff_ffffu128;
        let late = 0x0190_0000_0002_7000_8000_0000_0000_0000u128;
        let a = keys.derived_id_near(b"pix-transfer", 1, "early:1", early).as_u128();
        let b = keys.derived_id_near(b"pix-transfer", 1, "early:2", early).as_u128();
        let c = keys.derived_id_near(b"pix-transfer", 1, "late:1", late).as_u128();
        assert_eq!(a >> 64, early >> 64, "the anchor's upper half, version included");
        assert!(a < c && b < c, "ids sort where their anchors sort");
        assert_ne!(a, b, "distinct per key");
        assert_eq!(a, keys.derived_id_near(b"pix-transfer", 1, "early:1", early).as_u128(), "stable");
        assert_ne!(a, keys.derived_id_near(b"pix-transfer", 2, "early:1", early).as_u128(), "per tenant");
        let uuid = uuid::Uuid::from_u128(a);
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        // The lower half is the keyed hash's, not anything the anchor shows.
        let other = Keys::new([8; 32], "op");
        assert_ne!(a, other.derived_id_near(b"pix-transfer", 1, "early:1", early).as_u128());
    }

    #[test]
    fn hex_round_trips() {
        let bytes = random_32();
        assert_eq!(unhex(&hex(&bytes)).unwrap(), bytes);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
