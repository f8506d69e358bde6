//! Storage engines behind one port, and the single writer that applies ledger batches to them.
//!
//! Invariants this crate protects:
//! - nothing is acknowledged before it is durable: a batch's replies go out only after the one
//!   commit that persists it returned and, for the embedded engine, the sync made after it (see
//!   `durable`); nor is anything read before it is durable: an embedded read that saw a commit
//!   whose sync is running waits for that sync;
//! - a batch is all or nothing: a failed commit rolls back and every request in it is told the
//!   store is unavailable (a retry under the same ids is safe: ids are idempotency keys);
//! - per engine there is exactly one writer of ledger state; with PostgreSQL, writers of several
//!   nodes serialize on one row lock (`ledger_meta`), so there is one global order and no deadlock;
//! - money moves only through `ledger`'s state machine; this crate persists its `Changes` and never
//!   computes a balance itself.

mod audit_log;
mod durable;
mod engine;
mod generations;
mod migrations;
mod postgres;
mod rows;
mod sqlite;
mod sqlite_pcache;
mod sqlite_stmt;
mod sqlite_wal;

pub mod conformance;
pub mod testing;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub use audit_log::{
    audit_consistency, audit_inclusion, audit_key_signs, audit_root, audit_verify, AuditItem, AuditReport, SignedHead,
    AUDIT_PAGE_LEN_MAX,
};
pub use durable::{read_deferring, FencesOwed, ReadFence};
pub use engine::{Command, Engine, EngineStats, RecordsFn, Reply};
pub use postgres::KEY_ROTATION_LOCK;

/// Histogram bucket bounds of [`EngineStats`].
pub mod engine_buckets {
    pub use crate::engine::{BATCH_BUCKETS, COMMIT_BUCKETS_US};
}
use ledger::*;

/// The system's CA bundle (Debian's path): the roots PostgreSQL's certificate (without
/// `PGSSLROOTCERT`) and webhook receivers' (without `--webhook-ca`) are checked against.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The certificates of a PEM file, as rustls roots: PostgreSQL's (`PGSSLROOTCERT`) here, and the
/// server's webhook receivers'. Certificates rustls cannot use are skipped (a system bundle may
/// hold some); a file that is missing or holds something other than certificates is an error
/// naming it.
pub fn pem_roots(path: &Path) -> std::result::Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
        let _ = roots.add(cert);
    }
    Ok(roots)
}

/// Why the store could not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The database is unreachable or refused the commit. Nothing in the batch was acknowledged;
    /// the client should retry later (HTTP 503).
    Unavailable(String),
    /// The write queue is full: back-pressure, retry later (HTTP 503).
    Busy,
    /// Storage holds a value the code cannot read: a bug or an edit behind rtpay's back.
    Corrupt(String),
    /// A uniqueness rule of the control plane was broken.
    Conflict(String),
}

/// How an [`StoreError::Unavailable`] begins when the commit itself failed in a way that leaves
/// its outcome unknown (the connection lost during `COMMIT`, a sync that failed after it): the
/// batch may have been applied, with the audit entries it carried.
pub const COMMIT_IN_DOUBT: &str = "the commit's outcome is unknown";

impl StoreError {
    /// Whether the batch may have been committed all the same (see [`COMMIT_IN_DOUBT`]).
    pub fn in_doubt(&self) -> bool {
        matches!(self, StoreError::Unavailable(why) if why.starts_with(COMMIT_IN_DOUBT))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "storage unavailable: {why}"),
            StoreError::Busy => f.write_str("write queue full"),
            StoreError::Corrupt(why) => write!(f, "storage holds an unreadable value: {why}"),
            StoreError::Conflict(why) => write!(f, "conflict: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A tenant of the platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRecord {
    pub id: u128,
    pub name: String,
    pub created_at: Timestamp,
}

/// An API key; the secret itself is never stored, only its keyed hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: u128,
    pub tenant_id: u128,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    /// Space-separated scopes the key is limited to; `None`: every scope.
    pub scopes: Option<String>,
}

/// A tenant's data-encryption key, as stored: wrapped by the KEK of `kek_version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataKeyRecord {
    pub tenant_id: u128,
    pub kek_version: u32,
    pub wrapped: Vec<u8>,
}

/// An account holder; name and document are stored only sealed by the vault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderRecord {
    pub tenant_id: u128,
    pub id: u128,
    /// `person` or `company`.
    pub kind: String,
    pub name_sealed: Vec<u8>,
    pub document_sealed: Vec<u8>,
    /// Blind index of the normalized document: unique per tenant.
    pub document_index: [u8; 32],
    pub created_at: Timestamp,
}

/// A card authorization (with its captures, reversals and refunds), as stored: the columns
/// looked up or summed, and the rest as the server's JSON `body`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationRow {
    pub tenant_id: u128,
    pub id: u128,
    pub card_id: u128,
    /// DE37 of the authorization.
    pub rrn: String,
    pub created_at: Timestamp,
    /// What it counts against the card's limits now (held or captured, less reversed).
    pub spend: u64,
    /// When its standing hold lapses (the ledger releases it), if it has one: from then on its
    /// `spend` no longer counts against the card's limits. 0: it holds nothing.
    pub held_until: Timestamp,
    pub body: String,
}

/// A row written by the writer in a batch's transaction, beside the ledger's changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Inserted or replaced; the answer to the message that changed it is kept under the
    /// message's key (the first answer stays if the key was seen before).
    Authorization { row: AuthorizationRow, message: Option<([u8; 32], Vec<u8>)> },
    /// Inserted or replaced (by kind, tenant and id). Its `lookup` must be unique by construction
    /// (a conflict would fail the whole batch).
    Document(Document),
    /// Adds `delta` to a counter (what a payer spent in a period, say).
    Count { scope: String, period: u64, delta: i64 },
}

/// A precondition of a request, checked by the writer after the batch's lock is taken, so across
/// all nodes of a cluster; a request whose guard fails is not applied and gets
/// [`StoreError::Conflict`]. Two requests of one batch guarding the same document or counter: the
/// second fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// The document is at `version` (0: it does not exist).
    Document { kind: String, tenant_id: u128, id: String, version: u64 },
    /// The counter's total for `period` is at most `max` (an absent counter counts 0): a limit
    /// that admitted a payment still admits it. Counters change only in the writer's batches.
    CounterAtMost { scope: String, period: u64, max: i64 },
    /// The card authorization's stored body is `body` (`None`: it does not exist): the record a
    /// capture or reversal was decided on is still the one stored, whichever node wrote it.
    Authorization { tenant_id: u128, id: u128, body: Option<String> },
}

impl Guard {
    /// The document must still be as it was read.
    pub fn of(doc: &Document) -> Guard {
        Guard::Document { kind: doc.kind.clone(), tenant_id: doc.tenant_id, id: doc.id.clone(), version: doc.version }
    }
}

/// A domain record kept as the server's JSON `body`, with the columns it is found by: Pix keys,
/// payments, charges, refunds, webhooks. One table serves every kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub kind: String,
    pub tenant_id: u128,
    /// Unique per kind and tenant.
    pub id: String,
    /// Unique per kind across tenants (a key's blind index, an EndToEndId), if any.
    pub lookup: Option<String>,
    /// What listings group by (an account, a holder), if any.
    pub owner: Option<String>,
    pub created_at: Timestamp,
    /// Increases by one with each change: updates compare and set on it.
    pub version: u64,
    pub body: String,
}

/// Where a listing of an owner's documents ([`Queries::documents_by_owner`]) goes on from: the
/// last document it gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerCursor {
    pub created_at: Timestamp,
    pub id: String,
    pub tenant_id: u128,
}

impl OwnerCursor {
    pub fn of(doc: &Document) -> OwnerCursor {
        OwnerCursor { created_at: doc.created_at, id: doc.id.clone(), tenant_id: doc.tenant_id }
    }

    /// Where a reader that got `page` (asking for at most `limit`) goes on from: after its last
    /// document, or from the start (`None`) when it was the last page.
    pub fn next(page: &[Document], limit: usize) -> Option<OwnerCursor> {
        (page.len() >= limit).then(|| page.last().map(OwnerCursor::of)).flatten()
    }
}

/// Which documents a listing returns: one kind of one tenant, created in `[from, to)`, oldest
/// first, after the cursor.
#[derive(Clone, Debug)]
pub struct DocumentQuery<'a> {
    pub kind: &'a str,
    pub tenant_id: u128,
    pub owner: Option<&'a str>,
    pub from: Timestamp,
    pub to: Timestamp,
    /// Only documents after this (created_at, id).
    pub after: Option<(Timestamp, String)>,
    pub limit: usize,
}

/// A card as stored: sealed number, blind index, status; the rest as the server's JSON `body`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardRow {
    pub tenant_id: u128,
    pub id: u128,
    /// Blind index of the card number: unique across the platform.
    pub pan_index: [u8; 32],
    pub status: String,
    pub body: String,
}

/// An OAuth2 client of a tenant; its secret is stored only as a keyed hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthClientRecord {
    pub id: u128,
    pub tenant_id: u128,
    /// Space-separated, as in RFC 6749.
    pub scopes: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// Which transfers of an account a listing returns.
#[derive(Clone, Copy, Debug)]
pub struct Page {
    /// Only transfers strictly older than this one (the cursor): the timestamp of a transfer of
    /// the same listing, as the previous page ended. Any other value is refused (the embedded
    /// engine walks each account's transfers as a chain, from a transfer of the chain).
    pub before: Option<Timestamp>,
    pub limit: usize,
}

/// The most rows one listing returns.
pub const PAGE_LEN_MAX: usize = 1000;

/// Accounts a writer keeps in memory between batches, at most (with one batch's on top): the rest
/// are read from storage when a batch names them. Memory then depends on this bound, not on how
/// many accounts there are.
pub const ACCOUNT_CACHE_MAX: usize = 1_000_000;

static ACCOUNT_CACHE_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(ACCOUNT_CACHE_MAX);

/// Sets how many accounts the writers opened afterwards keep between batches (at least one;
/// [`ACCOUNT_CACHE_MAX`] unless set; `rtpay serve --account-cache`, before its store opens). It
/// changes how often a batch reads accounts back from storage, never what a batch does: the
/// conformance suite runs the embedded engine with two.
pub fn limit_account_cache(max: usize) {
    ACCOUNT_CACHE_LIMIT.store(max.max(1), std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn account_cache_max() -> usize {
    ACCOUNT_CACHE_LIMIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Read and control-plane access, safe to share between threads. Reads see committed data only.
pub trait Queries: Send + Sync {
    /// Whether a point read (a few index pages) may run on an async task's own thread: true for
    /// an embedded engine, whose reads are a few page look-ups in memory; false for a client of a
    /// server, whose every read is a network round trip (and whose blocking client may not run
    /// inside an async runtime at all).
    fn point_reads_inline(&self) -> bool {
        false
    }

    fn account(&self, key: AccountKey) -> Result<Option<Account>>;
    fn entry(&self, key: TransferKey) -> Result<Option<Entry>>;
    /// Created transfers touching the account, newest first; `None` when `page.before` is not the
    /// timestamp of one of them.
    fn account_transfers(&self, key: AccountKey, page: Page) -> Result<Option<Vec<Transfer>>>;

    /// Broken links of the per-account transfer listings, for engines that keep them by hand
    /// (the embedded engine's chains); an index kept by the database has none to report.
    fn listing_violations(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn create_tenant(&self, tenant: &TenantRecord, key: &ApiKeyRecord, secret_hash: &[u8; 32]) -> Result<()>;
    fn tenant(&self, id: u128) -> Result<Option<TenantRecord>>;
    fn create_api_key(&self, key: &ApiKeyRecord, secret_hash: &[u8; 32]) -> Result<()>;
    /// Revokes a key of the tenant; false if no such live key.
    fn revoke_api_key(&self, tenant_id: u128, key_id: u128, at: Timestamp) -> Result<bool>;
    fn api_key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>>;

    /// Streams every account, then every transfer entry, from one consistent snapshot.
    fn scan(&self, accounts: &mut dyn FnMut(Account), entries: &mut dyn FnMut(Entry)) -> Result<()>;
    /// Cheap liveness check of the database.
    fn ping(&self) -> Result<()>;
    /// The database server's clock, in nanoseconds since the Unix epoch, where nodes share one
    /// database over the network (PostgreSQL); `None` for an embedded engine, whose only clock is
    /// its process's. See [`clock_skew`].
    fn database_time(&self) -> Result<Option<Timestamp>>;
    /// The ledger's clock as committed (`ledger_meta.last_timestamp`): the last timestamp the
    /// writers gave out, which every stored timestamp must be at or below.
    fn ledger_clock(&self) -> Result<Timestamp>;

    fn create_oauth_client(&self, client: &OAuthClientRecord, secret_hash: &[u8; 32]) -> Result<()>;
    /// The client with its secret hash.
    fn oauth_client(&self, id: u128) -> Result<Option<(OAuthClientRecord, [u8; 32])>>;
    /// Marks a live client of `tenant_id` revoked; false when there is none.
    fn revoke_oauth_client(&self, tenant_id: u128, id: u128, at: Timestamp) -> Result<bool>;

    fn data_key(&self, tenant_id: u128) -> Result<Option<DataKeyRecord>>;
    /// `Conflict` if the tenant has one already (another node made it first).
    fn create_data_key(&self, key: &DataKeyRecord) -> Result<()>;
    /// Every tenant's data key (one per tenant), for KEK rotation.
    fn data_keys(&self) -> Result<Vec<DataKeyRecord>>;
    /// Replaces a data key's wrapping if it is still under `old_kek_version`; false otherwise.
    fn rewrap_data_key(&self, key: &DataKeyRecord, old_kek_version: u32) -> Result<bool>;
    /// Waits for the turn of key-encryption key rotations over this storage, and holds it until
    /// the returned guard is dropped. Every process rotating over the same storage (a node's
    /// `POST /v1/keys/rotate`, `rtpay keys rotate` on any host) takes it, so two rotations never
    /// both add "version N+1", each with a key of its own, to a key source they share (a
    /// PKCS#11 token behind several nodes). PostgreSQL: a session advisory lock
    /// ([`KEY_ROTATION_LOCK`]) on a connection of the guard's own; embedded: an exclusive
    /// `flock` on `rtpay.db.rotation-lock`.
    fn key_rotation_turn(&self) -> Result<Box<dyn Send>>;
    /// `Conflict` if the id, or the document within the tenant, exists.
    fn create_holder(&self, holder: &HolderRecord) -> Result<()>;
    fn holder(&self, tenant_id: u128, id: u128) -> Result<Option<HolderRecord>>;

    /// A card product; its BIN is unique across the platform (`Conflict` otherwise).
    fn create_card_product(&self, tenant_id: u128, id: u128, bin: &str, body: &str) -> Result<()>;
    /// Whether any tenant's card product has this BIN.
    fn card_bin_taken(&self, bin: &str) -> Result<bool>;
    fn card_product(&self, tenant_id: u128, id: u128) -> Result<Option<String>>;
    /// A card; its number's blind index is unique across the platform (`Conflict` otherwise).
    fn create_card(&self, card: &CardRow) -> Result<()>;
    fn card(&self, tenant_id: u128, id: u128) -> Result<Option<CardRow>>;
    fn card_by_index(&self, pan_index: &[u8; 32]) -> Result<Option<CardRow>>;
    /// Sets status and body if the status is still `expected`; false otherwise.
    fn update_card(&self, card: &CardRow, expected: &str) -> Result<bool>;
    /// Inserts or replaces the authorization and, in the same transaction, remembers the answer
    /// to the message (by its key) that changed it; a message key seen before is `Conflict`.
    fn save_authorization(&self, row: &AuthorizationRow, message: Option<(&[u8; 32], &[u8])>) -> Result<()>;
    fn authorization(&self, tenant_id: u128, id: u128) -> Result<Option<AuthorizationRow>>;
    fn authorization_by_rrn(&self, card_id: u128, rrn: &str) -> Result<Option<AuthorizationRow>>;
    /// Newest first.
    fn card_authorizations(&self, tenant_id: u128, card_id: u128, limit: usize) -> Result<Vec<AuthorizationRow>>;
    /// The stored answer to a message seen before (sealed by the server).
    fn card_message(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>>;
    /// A card's spend since `day` and since `month` (less the holds that lapsed by `now`), and its
    /// authorizations since `minute`.
    fn card_spent(
        &self,
        card_id: u128,
        day: Timestamp,
        month: Timestamp,
        minute: Timestamp,
        now: Timestamp,
    ) -> Result<(u64, u64, u32)>;

    /// `Conflict` if the id (per kind and tenant) or the lookup (per kind) exists.
    fn insert_document(&self, doc: &Document) -> Result<()>;
    /// Inserts the document only while fewer than `max` documents of its kind have its owner
    /// (every tenant), the count and the insert atomic across every node: `Ok(false)` when `max`
    /// are there already. `Conflict` as for `insert_document`.
    fn insert_document_within(&self, doc: &Document, max: u64) -> Result<bool>;
    fn document(&self, kind: &str, tenant_id: u128, id: &str) -> Result<Option<Document>>;
    fn document_by_lookup(&self, kind: &str, lookup: &str) -> Result<Option<Document>>;
    /// Replaces the document if its stored version is still `expected_version` (the new one
    /// carries its own, normally `expected_version + 1`); false otherwise. `Conflict` if the new
    /// lookup is taken.
    fn update_document(&self, doc: &Document, expected_version: u64) -> Result<bool>;
    /// Compare and set from nothing as well: inserts the document if `expected_version` is 0 (none
    /// stored), else updates it as [`Queries::update_document`]; false when another write came
    /// first. For documents without a lookup (a taken lookup would read as a lost race).
    fn put_document(&self, doc: &Document, expected_version: u64) -> Result<bool> {
        if expected_version > 0 {
            return self.update_document(doc, expected_version);
        }
        match self.insert_document(doc) {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
    /// False when there was none.
    fn delete_document(&self, kind: &str, tenant_id: u128, id: &str) -> Result<bool>;
    fn documents(&self, query: &DocumentQuery<'_>) -> Result<Vec<Document>>;
    /// How many documents of the kind have this owner (every tenant).
    fn count_documents(&self, kind: &str, owner: &str) -> Result<u64>;
    /// Up to `limit` documents of a kind with this owner, across tenants, oldest first (by
    /// creation, then id, then tenant), after the cursor when one is given (an outbox: what is
    /// still to be done after a restart, read a page at a time).
    fn documents_by_owner(
        &self,
        kind: &str,
        owner: &str,
        after: Option<&OwnerCursor>,
        limit: usize,
    ) -> Result<Vec<Document>>;
    /// The sum of a counter over periods `[from, to)`.
    fn counter_total(&self, scope: &str, from: u64, to: u64) -> Result<i64>;

    /// Audit entries with `seq > after`, in order; only the tenant's when `tenant` is given.
    fn audit_entries(&self, after: u64, limit: usize, tenant: Option<u128>) -> Result<Vec<audit::Entry>>;
    /// The latest signed tree head.
    fn audit_head(&self) -> Result<Option<SignedHead>>;
    /// The first signed tree head: signed by the log's own key, whatever signed later ones.
    fn audit_first_head(&self) -> Result<Option<SignedHead>>;
    /// A stored perfect subtree (level 0: an entry's leaf hash), if the log has it.
    fn audit_node(&self, level: u8, index: u64) -> Result<Option<audit::Hash>>;
    /// Streams every entry in order from one snapshot, each signed head right after the entry
    /// that completes it (heads beyond the last entry at the end); stops when `visit` says false.
    fn audit_scan(&self, visit: &mut dyn FnMut(AuditItem) -> bool) -> Result<()>;
}

/// The writer side of an engine: used only by the [`Engine`]'s thread, inside one transaction per
/// batch.
pub(crate) trait Writer: Send {
    /// Starts the batch's transaction and returns the ledger clock as stored.
    fn begin(&mut self) -> Result<Clock>;
    /// Loads the entries among `keys` that exist into `into`.
    fn load_transfers(&mut self, keys: &[TransferKey], into: &mut MemoryLedger) -> Result<()>;
    /// Loads the accounts among `keys` that exist and are not in `into` yet.
    fn load_accounts(&mut self, keys: &[AccountKey], into: &mut MemoryLedger) -> Result<()>;
    /// The version of a document as this transaction sees it (0 when absent).
    fn document_version(&mut self, kind: &str, tenant_id: u128, id: &str) -> Result<u64>;
    /// A counter's total for one period as this transaction sees it (0 when absent).
    fn counter_total(&mut self, scope: &str, period: u64) -> Result<i64>;
    /// A card authorization's body as this transaction sees it.
    fn authorization_body(&mut self, tenant_id: u128, id: u128) -> Result<Option<String>>;
    /// Pending transfers due to expire by `now`.
    fn due_pendings(&mut self, now: Timestamp, limit: usize) -> Result<Vec<TransferKey>>;
    /// The earliest expiry among pending transfers as this transaction sees it (`None`: no hold
    /// has one). A batch sweeps whenever a hold is due, so an expired hold reserves nothing.
    fn earliest_due(&mut self) -> Result<Option<Timestamp>>;
    /// Persists the changes and the audit entries (with their times) and commits: durable when
    /// this returns Ok, unless the writer defers its syncs ([`Writer::deferred_sync`]).
    fn commit(&mut self, changes: &[Changes], audit: &[(Timestamp, audit::Draft)], records: &[Record]) -> Result<()>;
    fn rollback(&mut self);
    /// For a writer whose commits leave their sync to the engine: the sync, taken once, before the
    /// first batch. The engine then sends no reply of a committed batch before a sync made after
    /// its commit returned.
    fn deferred_sync(&mut self) -> Option<Box<dyn DeferredSync>> {
        None
    }
    /// Whether a commit was attempted since the last call (successful or not) whose sync is owed.
    fn sync_owed(&mut self) -> bool {
        false
    }

    /// Accounts kept in memory between batches (the `rtpay_ledger_cached_accounts` gauge).
    fn cached_accounts(&self) -> usize {
        0
    }
}

/// The sync a writer's commits leave to the engine's syncer thread (see `durable`).
pub(crate) trait DeferredSync: Send {
    /// Makes every commit whose `COMMIT` returned so far durable, and lets the reads waiting for
    /// them answer.
    fn sync(&mut self) -> std::io::Result<()>;
}

/// Where the data lives.
#[derive(Clone, Debug)]
pub enum Location {
    /// A data directory holding `rtpay.db` (SQLite, WAL, synchronous=FULL).
    Embedded(std::path::PathBuf),
    /// A PostgreSQL connection URL (`postgres://user@host:port/db`).
    Postgres(String),
}

/// An opened store: the engine (single writer) and shared read access.
pub struct Store {
    pub engine: Engine,
    pub queries: Arc<dyn Queries>,
    pub location: Location,
}

/// A signer whose key is never saved: heads it signs verify only in this process.
fn ephemeral_signer() -> Arc<audit::Signer> {
    let pkcs8 = audit::Signer::generate_pkcs8().expect("the system random generator works");
    Arc::new(audit::Signer::from_pkcs8(&pkcs8).expect("a generated key parses"))
}

/// Wall-clock nanoseconds since the UNIX epoch: the one clock of the process.
pub fn now_nanos() -> Timestamp {
    let since =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("the system clock is after 1970");
    u64::try_from(since.as_nanos()).expect("nanoseconds fit in u64 until 2554")
}

/// How far `clock` (a node's) is ahead of the database server's clock, in nanoseconds (negative:
/// behind); `None` on an embedded engine, which has no other clock. Of three readings, the one
/// with the shortest round trip counts, the database's time taken as read halfway through it: a
/// reading that had to open a connection, or waited on a dead one, would put the node behind by
/// half the wait. Nodes sharing a PostgreSQL database compare their own clocks to decide when
/// another node's lease on a webhook delivery, or its claim on an off-us Pix payment, has lapsed,
/// with margins of 2 and 5 s, and a node's writer expires holds by its clock (docs/OPERATIONS.md,
/// "Clocks").
pub fn clock_skew(queries: &dyn Queries, clock: &dyn Fn() -> Timestamp) -> Result<Option<i64>> {
    let mut best: Option<(u64, i128)> = None;
    for _ in 0..3 {
        let before = clock();
        let Some(database) = queries.database_time()? else { return Ok(None) };
        let after = clock();
        let round_trip = after.saturating_sub(before);
        let local = i128::from(before) + i128::from(round_trip / 2);
        if best.is_none_or(|(shortest, _)| round_trip < shortest) {
            best = Some((round_trip, local - i128::from(database)));
        }
    }
    let skew = best.map_or(0, |(_, skew)| skew);
    Ok(Some(i64::try_from(skew).unwrap_or(if skew < 0 { i64::MIN } else { i64::MAX })))
}

impl Store {
    /// Opens (creating if needed) and migrates the store, then starts its writer.
    pub fn open(location: &Location) -> Result<Store> {
        Self::open_with(location, Arc::new(now_nanos), ephemeral_signer())
    }

    pub fn open_with_clock(location: &Location, clock: Arc<dyn Fn() -> Timestamp + Send + Sync>) -> Result<Store> {
        Self::open_with(location, clock, ephemeral_signer())
    }

    /// Opens with the key that signs the audit log's tree heads (`rtpay serve` loads it from the
    /// data directory or a file; the other constructors use a throw-away key, for tests).
    pub fn open_with(
        location: &Location,
        clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
        signer: Arc<audit::Signer>,
    ) -> Result<Store> {
        let (writer, queries): (Box<dyn Writer>, Arc<dyn Queries>) = match location {
            Location::Embedded(dir) => sqlite::open(dir, signer)?,
            Location::Postgres(url) => postgres::open(url, signer)?,
        };
        Ok(Store { engine: Engine::start(writer, clock), queries, location: location.clone() })
    }

    /// Applies pending migrations without starting a writer; returns the versions applied.
    pub fn migrate(location: &Location) -> Result<Vec<u32>> {
        match location {
            Location::Embedded(dir) => sqlite::migrate_only(dir),
            Location::Postgres(url) => postgres::migrate_only(url),
        }
    }

    /// Checks every ledger invariant over everything stored.
    pub fn verify(&self) -> Result<verify::Report> {
        verify_with(self.queries.as_ref())
    }

    /// Read access only, with no writer: safe beside a running server (`rtpay verify`).
    pub fn open_queries(location: &Location) -> Result<Arc<dyn Queries>> {
        match location {
            Location::Embedded(dir) => sqlite::open_queries(dir),
            Location::Postgres(url) => postgres::open_queries(url),
        }
    }

    /// Appends audit entries without a writer of this process, safely beside running servers on
    /// the same storage: for operator actions taken on the command line (`rtpay keys rotate`).
    pub fn append_audit_beside(
        location: &Location,
        signer: Arc<audit::Signer>,
        drafts: Vec<audit::Draft>,
    ) -> Result<()> {
        match location {
            Location::Embedded(dir) => sqlite::append_audit_beside(dir, &signer, drafts, now_nanos()),
            Location::Postgres(url) => postgres::append_audit_beside(url, signer, drafts, now_nanos()),
        }
    }

    /// Stops the writer after the batches already queued.
    pub fn close(self) {
        self.engine.stop();
    }
}

/// Checks every ledger invariant over what `queries` reads, from one snapshot.
pub fn verify_with(queries: &dyn Queries) -> Result<verify::Report> {
    let mut verifier = verify::Verifier::new();
    // Two closures borrow one verifier: split the borrow with a RefCell.
    let cell = std::cell::RefCell::new(&mut verifier);
    queries.scan(&mut |a| cell.borrow_mut().account(&a), &mut |e| cell.borrow_mut().entry(&e))?;
    // Read after the snapshot: a commit since only moves the clock on.
    verifier.clock(queries.ledger_clock()?);
    let mut report = verifier.finish();
    let listing = queries.listing_violations()?;
    report.violations_found += listing.len() as u64;
    report.violations.extend(listing.into_iter().map(verify::Violation));
    Ok(report)
}

/// Whether a directory already holds an embedded store.
pub fn embedded_exists(dir: &Path) -> bool {
    dir.join(sqlite::DB_FILE).exists()
}
