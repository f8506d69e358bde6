//! The PostgreSQL engine: any number of rtpay nodes over one database.
//!
//! Each node has one writer. A batch's transaction first locks the single `ledger_meta` row, so
//! batches of all nodes apply in one global order: no lost update, no overdraft, no double post,
//! and no deadlock (there is only one lock to wait for). The state a batch reads is read after the
//! lock is granted, so it is what the previous batch, from whichever node, committed. Each batch
//! is a handful of statements over arrays (`unnest`), whatever its size.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::postgres::{Client, NoTls, Row, Statement};
use ledger::*;
use uuid::Uuid;

use crate::generations::Generations;
use crate::migrations::{Migration, POSTGRES};
use crate::rows::{AccountRow, EntryRow, ACCOUNT_COLUMNS, ENTRY_COLUMNS};
use crate::*;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Silence on a connection after which TCP keepalive probes start (see `connect`).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// How long data sent may stay unacknowledged before the connection is given up (see `connect`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a session may sit idle inside a transaction before the server ends it (see `connect`).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(30);
const READERS_MAX: usize = 8;
/// An arbitrary constant naming the migration lock among PostgreSQL advisory locks.
const MIGRATION_LOCK: i64 = 0x7274_7061_7900_0001;
/// The advisory lock key-encryption key rotations take turns on ([`Queries::key_rotation_turn`]).
pub const KEY_ROTATION_LOCK: i64 = 0x7274_7061_7900_0002;

fn unavailable(e: ::postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return StoreError::Unavailable(format!("postgres: {}: {}", db.code().code(), db.message()));
    }
    StoreError::Unavailable(format!("postgres: {}", with_causes(&e)))
}

/// An error with its causes: "error performing TLS handshake" alone does not say the
/// certificate's issuer is unknown, nor "invalid connection string" which option is wrong.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    message
}

fn corrupt(e: String) -> StoreError {
    StoreError::Corrupt(e)
}

/// The TLS connector for `sslmode=require`: the server's certificate chain must lead to a root
/// in `PGSSLROOTCERT` (libpq's variable: a PEM file), else in the system's bundle, and name the
/// host connected to, as libpq's `verify-full` checks. Built once per process.
fn tls() -> Result<&'static tokio_postgres_rustls::MakeRustlsConnect> {
    static TLS: std::sync::OnceLock<std::result::Result<tokio_postgres_rustls::MakeRustlsConnect, String>> =
        std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let (path, named) = match std::env::var_os("PGSSLROOTCERT") {
            Some(p) => (std::path::PathBuf::from(p), "PGSSLROOTCERT"),
            None => (std::path::PathBuf::from(crate::SYSTEM_ROOTS), "the system's CA bundle"),
        };
        let roots = crate::pem_roots(&path).map_err(|e| format!("PostgreSQL TLS roots ({named}): {e}"))?;
        if roots.is_empty() {
            return Err(format!("PostgreSQL TLS roots ({named}, {}): no certificate", path.display()));
        }
        let config =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    })
    .as_ref()
    .map_err(|e| StoreError::Unavailable(e.clone()))
}

fn connect(url: &str) -> Result<Client> {
    let mut config: ::postgres::Config =
        url.parse().map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL URL: {}", with_causes(&e))))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    // A server that stops answering without closing the connection (a partition, a host gone)
    // is noticed within a minute, not after the kernel's defaults (two hours of keepalive
    // silence, a quarter of an hour of retransmissions): the writer's batch fails with 503 and
    // the next one reconnects. A URL that sets either keeps its own.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("rtpay");
    }
    let connected = match config.get_ssl_mode() {
        ::postgres::config::SslMode::Require => config.connect(tls()?.clone()),
        // `prefer` (the default) and `disable`: in clear, as before TLS was supported. A `prefer`
        // that tried TLS would fail against servers with self-signed certificates (Debian's
        // default) that connect today.
        _ => config.connect(NoTls),
    };
    let mut client = connected.map_err(unavailable)?;
    // Every transaction rtpay opens reads what was committed before each statement, whatever the
    // server's default: a batch reads state after its lock is granted, and a counted insert
    // counts after its advisory lock (under repeatable read both would read older snapshots).
    // Three more, whatever the server's, database's or role's defaults:
    // - a commit is on disk before it returns: with `synchronous_commit = off` a client would be
    //   answered for a transfer a crash could still lose (`local`, `remote_write`, `on` and
    //   `remote_apply` all wait for the local flush, and are kept);
    // - a session that stalls inside a transaction (a frozen node holding the batch lock, which
    //   every node's writer waits for) is ended by the server, releasing its locks. No
    //   transaction of rtpay's waits on anything but the database between its statements;
    // - bytea in text form is hex (`\x...`), as the writer reads the audit frontier: with the
    //   legacy `escape` output, every batch after the first audit entry failed as corrupt.
    client
        .batch_execute(&format!(
            "SET default_transaction_isolation = 'read committed'; \
             SET idle_in_transaction_session_timeout = {}; \
             SET bytea_output = 'hex'; \
             SELECT set_config('synchronous_commit', 'on', false) WHERE current_setting('synchronous_commit') = 'off'",
            IDLE_IN_TRANSACTION.as_millis()
        ))
        .map_err(unavailable)?;
    Ok(client)
}

fn apply_migrations(client: &mut Client, migrations: &[Migration]) -> Result<Vec<u32>> {
    let mut tx = client.transaction().map_err(unavailable)?;
    // Nodes starting together take turns; the second finds the work done.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).map_err(unavailable)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .map_err(unavailable)?;
    refuse_newer_schema(&mut tx, migrations)?;
    // A migration that only moves rows (11's) takes no table lock a running batch holds, so it
    // could interleave with a batch an older node had begun: it copied a counter before that
    // batch's update committed and deleted it after, losing the update. Batches hold
    // `ledger_meta`'s row: the migrations wait for the running one, and later ones wait for them
    // and then find the schema newer than their node knows (nodes of this version and later,
    // which read the version in a statement after the lock; an earlier node's batch that waited
    // here read it before: see OPERATIONS). Taken before any change here, so that a batch waiting
    // for a table this transaction altered cannot hold it.
    let meta = tx.query_one("SELECT to_regclass('ledger_meta') IS NOT NULL", &[]).map_err(unavailable)?;
    if meta.get::<_, bool>(0) {
        tx.execute("SELECT 1 FROM ledger_meta WHERE id = 1 FOR UPDATE", &[]).map_err(unavailable)?;
    }
    let mut applied = Vec::new();
    for m in migrations {
        let version = m.version as i32;
        let done = tx
            .query_opt("SELECT version FROM schema_migrations WHERE version = $1", &[&version])
            .map_err(unavailable)?;
        if done.is_none() {
            tx.batch_execute(m.sql).map_err(unavailable)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&version, &m.name, &(now_nanos() as i64)],
            )
            .map_err(unavailable)?;
            applied.push(m.version);
        }
    }
    tx.commit().map_err(unavailable)?;
    Ok(applied)
}

/// Refuses a database written by a later rtpay (see `migrations::refuse_newer`).
fn refuse_newer_schema(client: &mut impl ::postgres::GenericClient, migrations: &[Migration]) -> Result<()> {
    crate::migrations::refuse_newer(schema_version(client)?, migrations)
}

/// Refuses a database at another version than this rtpay's, newer or not yet migrated (see
/// `migrations::refuse_other`): for the commands that work beside the servers.
fn refuse_other_schema(client: &mut impl ::postgres::GenericClient) -> Result<()> {
    crate::migrations::refuse_other(schema_version(client)?, POSTGRES)
}

fn schema_version(client: &mut impl ::postgres::GenericClient) -> Result<Option<u32>> {
    let newest: Option<i32> =
        client.query_one("SELECT max(version) FROM schema_migrations", &[]).map_err(unavailable)?.get(0);
    Ok(newest.map(|v| v as u32))
}

pub(crate) fn migrate_only(url: &str) -> Result<Vec<u32>> {
    apply_migrations(&mut connect(url)?, POSTGRES)
}

pub(crate) fn open_queries(url: &str) -> Result<Arc<dyn Queries>> {
    refuse_other_schema(&mut connect(url)?)?;
    Ok(Arc::new(PgQueries { url: url.to_owned(), pool: Mutex::new(Vec::new()) }))
}

/// Appends audit entries from beside the running nodes (`rtpay keys rotate` on the command
/// line): one more writer batch, under the same cluster-wide lock, with only audit entries and
/// the clock moved past them.
pub(crate) fn append_audit_beside(
    url: &str,
    signer: Arc<audit::Signer>,
    drafts: Vec<audit::Draft>,
    now: Timestamp,
) -> Result<()> {
    refuse_other_schema(&mut connect(url)?)?;
    let mut writer = PgWriter::new(url, signer)?;
    let clock = writer.begin()?;
    let mut time = clock.last;
    let timed: Vec<(Timestamp, audit::Draft)> = drafts
        .into_iter()
        .map(|d| {
            time = now.max(time + 1);
            (time, d)
        })
        .collect();
    let changes = Changes { clock: Clock { last: time }, ..Changes::default() };
    writer.commit(&[changes], &timed, &[])
}

pub(crate) fn open(url: &str, signer: Arc<audit::Signer>) -> Result<(Box<dyn Writer>, Arc<dyn Queries>)> {
    let mut client = connect(url)?;
    apply_migrations(&mut client, POSTGRES)?;
    drop(client);
    let writer = PgWriter::new(url, signer)?;
    let queries = PgQueries { url: url.to_owned(), pool: Mutex::new(Vec::new()) };
    Ok((Box::new(writer), Arc::new(queries)))
}

fn uuid(v: u128) -> Uuid {
    Uuid::from_u128(v)
}

fn account_row(row: &Row) -> Result<AccountRow> {
    Ok(AccountRow {
        tenant_id: row.try_get::<_, Uuid>(0).map_err(unavailable)?.as_u128(),
        id: row.try_get::<_, Uuid>(1).map_err(unavailable)?.as_u128(),
        currency: row.try_get(2).map_err(unavailable)?,
        code: row.try_get(3).map_err(unavailable)?,
        flags: row.try_get(4).map_err(unavailable)?,
        credit_limit: row.try_get(5).map_err(unavailable)?,
        metadata: row.try_get(6).map_err(unavailable)?,
        timestamp: row.try_get(7).map_err(unavailable)?,
        debits_posted: row.try_get(8).map_err(unavailable)?,
        credits_posted: row.try_get(9).map_err(unavailable)?,
        debits_pending: row.try_get(10).map_err(unavailable)?,
        credits_pending: row.try_get(11).map_err(unavailable)?,
        holder_id: row.try_get::<_, Option<Uuid>>(12).map_err(unavailable)?.map(|u| u.as_u128()),
    })
}

fn entry_row(row: &Row) -> Result<EntryRow<'static>> {
    let opt = |i: usize| -> Result<Option<u128>> {
        Ok(row.try_get::<_, Option<Uuid>>(i).map_err(unavailable)?.map(|u| u.as_u128()))
    };
    Ok(EntryRow {
        timestamp: row.try_get(0).map_err(unavailable)?,
        tenant_id: row.try_get::<_, Uuid>(1).map_err(unavailable)?.as_u128(),
        id: row.try_get::<_, Uuid>(2).map_err(unavailable)?.as_u128(),
        result: row.try_get(3).map_err(unavailable)?,
        kind: row.try_get(4).map_err(unavailable)?,
        debit_account_id: opt(5)?,
        credit_account_id: opt(6)?,
        amount: row.try_get(7).map_err(unavailable)?,
        currency: row.try_get::<_, Option<String>>(8).map_err(unavailable)?.map(std::borrow::Cow::Owned),
        pending_id: opt(9)?,
        amount_defaulted: row.try_get(10).map_err(unavailable)?,
        timeout_seconds: row.try_get(11).map_err(unavailable)?,
        expires_at: row.try_get(12).map_err(unavailable)?,
        code: row.try_get(13).map_err(unavailable)?,
        metadata: row.try_get::<_, Option<String>>(14).map_err(unavailable)?.map(std::borrow::Cow::Owned),
        state: row.try_get(15).map_err(unavailable)?,
    })
}

struct PgWriter {
    url: String,
    conn: Option<Conn>,
    in_tx: bool,
    signer: Arc<audit::Signer>,
    /// The audit tree's right edge, read under the batch lock (other nodes append too).
    frontier: Option<audit::Frontier>,
    /// The last edge this writer wrote or held to its signed head (see `check_edge`): an edge
    /// another node left is checked once.
    trusted_edge: Option<crate::audit_log::Edge>,
    /// The edge the open batch's entries make; trusted once it commits.
    pending_edge: Option<crate::audit_log::Edge>,
    /// Accounts as this writer last committed or read them, valid while the count of commits in
    /// `ledger_meta` is the one this writer's last commit left there (`accounts_as_of`): every
    /// commit, by any node, adds one under the batch lock, so an unchanged count means no other
    /// node wrote since. (Not the ledger clock: a sweep that only expires holds does not move it.)
    /// Saves the batch's account look-up when one node does the writing. Bounded at the start of
    /// a batch, as the embedded writer's is (see `generations`).
    accounts: Generations<AccountKey, Account>,
    accounts_as_of: Option<i64>,
    /// The count of commits read under this batch's lock.
    locked_commits: i64,
    /// The earliest expiry among pending transfers, read with the lock (see
    /// [`Writer::earliest_due`]).
    earliest_due: Option<Timestamp>,
}

/// A writer connection with its statements prepared once: each batch is then four round trips
/// (begin + lock, load transfers, write everything, commit; a fifth loads accounts the writer does
/// not keep already), whatever its size.
struct Conn {
    client: Client,
    load_transfers: Statement,
    load_accounts: Statement,
    due: Statement,
    write: Statement,
    write_audited: Statement,
}

/// The ledger's writes of a batch: new entries, hold states, accounts.
const WRITE_CTES: &str = "\
    inserted AS (INSERT INTO transfers (timestamp, tenant_id, id, result, kind, debit_account_id, credit_account_id, \
        amount, currency, pending_id, amount_defaulted, timeout_seconds, expires_at, code, metadata, state) \
      SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::smallint[], $5::smallint[], $6::uuid[], \
        $7::uuid[], $8::bigint[], $9::text[], $10::uuid[], $11::boolean[], $12::bigint[], $13::bigint[], \
        $14::integer[], $15::text[], $16::smallint[]) RETURNING 1), \
    states AS (UPDATE transfers t SET state = u.state \
      FROM unnest($17::uuid[], $18::uuid[], $19::smallint[]) AS u(tenant_id, id, state) \
      WHERE t.tenant_id = u.tenant_id AND t.id = u.id RETURNING 1), \
    accounts AS (INSERT INTO accounts (tenant_id, id, currency, code, flags, credit_limit, metadata, timestamp, \
        debits_posted, credits_posted, debits_pending, credits_pending, holder_id) \
      SELECT * FROM unnest($20::uuid[], $21::uuid[], $22::text[], $23::integer[], $24::integer[], $25::bigint[], \
        $26::text[], $27::bigint[], $28::bigint[], $29::bigint[], $30::bigint[], $31::bigint[], $33::uuid[]) \
      ON CONFLICT (tenant_id, id) DO UPDATE SET flags = excluded.flags, \
        debits_posted = excluded.debits_posted, credits_posted = excluded.credits_posted, \
        debits_pending = excluded.debits_pending, credits_pending = excluded.credits_pending RETURNING 1)";

/// The audit's writes of a batch: its entries, the subtrees they complete, the signed head.
const AUDIT_CTES: &str = "\
    entries AS (INSERT INTO audit_entries (seq, time, tenant_id, actor, action, resource, request_id, source, \
        outcome, leaf_hash) \
      SELECT * FROM unnest($34::bigint[], $35::bigint[], $36::uuid[], $37::text[], $38::text[], $39::text[], \
        $40::text[], $41::text[], $42::text[], $43::bytea[]) RETURNING 1), \
    nodes AS (INSERT INTO audit_nodes (level, last_leaf, hash) \
      SELECT * FROM unnest($44::smallint[], $45::bigint[], $46::bytea[]) RETURNING 1), \
    head AS (INSERT INTO audit_heads (size, time, root, signature) VALUES ($47, $48, $49, $50) RETURNING 1)";

/// Every write of a batch without audit entries, in one statement: the ledger's and the clock.
fn write_sql() -> String {
    format!(
        "WITH {WRITE_CTES}, \
         clock AS (UPDATE ledger_meta SET last_timestamp = GREATEST(last_timestamp, $32), commits = commits + 1 \
           WHERE id = 1 RETURNING 1) \
         SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM states), (SELECT count(*) FROM accounts), \
           (SELECT count(*) FROM clock)"
    )
}

/// Every write of a batch with audit entries, in one statement: the ledger's, the audit's, and the
/// clock with the audit's new right edge (one update of the row: a statement may change a row once).
fn write_audited_sql() -> String {
    format!(
        "WITH {WRITE_CTES}, {AUDIT_CTES}, \
         clock AS (UPDATE ledger_meta SET last_timestamp = GREATEST(last_timestamp, $32), audit_frontier = $51, \
           commits = commits + 1 WHERE id = 1 RETURNING 1) \
         SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM states), (SELECT count(*) FROM accounts), \
           (SELECT count(*) FROM clock), (SELECT count(*) FROM entries), (SELECT count(*) FROM nodes), \
           (SELECT count(*) FROM head)"
    )
}

fn load_transfers_sql() -> String {
    format!(
        "SELECT {ENTRY_COLUMNS} FROM transfers WHERE (tenant_id, id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))"
    )
}

impl Conn {
    fn open(url: &str) -> Result<Conn> {
        let mut client = connect(url)?;
        // Each statement is planned once (planning the array statements at every execution was a
        // fifth of a batch), and the plan is one that is right whatever the tables hold: a plan
        // made when the tables were empty would otherwise scan them whole and hash-join the keys
        // for ever after (the writer's throughput fell by half that way). Every statement of the
        // writer finds rows by key, so index look-ups in nested loops are always the plan wanted;
        // these settings only steer the choice, a table without a usable index is still scanned.
        client
            .batch_execute(
                "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; \
                 SET enable_hashjoin = off; SET enable_mergejoin = off",
            )
            .map_err(unavailable)?;
        let load_transfers = client.prepare(&load_transfers_sql()).map_err(unavailable)?;
        let load_accounts = client
            .prepare(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE (tenant_id, id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))"
            ))
            .map_err(unavailable)?;
        let due = client
            .prepare(
                "SELECT tenant_id, id FROM transfers WHERE state = 1 AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
            )
            .map_err(unavailable)?;
        let write = client.prepare(&write_sql()).map_err(unavailable)?;
        let write_audited = client.prepare(&write_audited_sql()).map_err(unavailable)?;
        Ok(Conn { client, load_transfers, load_accounts, due, write, write_audited })
    }
}

impl PgWriter {
    fn new(url: &str, signer: Arc<audit::Signer>) -> Result<PgWriter> {
        Ok(PgWriter {
            url: url.to_owned(),
            conn: Some(Conn::open(url)?),
            in_tx: false,
            signer,
            frontier: None,
            trusted_edge: None,
            pending_edge: None,
            accounts: Generations::default(),
            accounts_as_of: None,
            locked_commits: 0,
            earliest_due: None,
        })
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connected in begin")
    }
}

impl Writer for PgWriter {
    fn begin(&mut self) -> Result<Clock> {
        assert!(!self.in_tx, "one batch at a time");
        // A batch's reads and commit add to the cache; between batches it is cut to its bound.
        self.accounts.bound(account_cache_max());
        let reused = self.conn.as_ref().is_some_and(|c| !c.client.is_closed());
        if !reused {
            self.conn = None;
            self.conn = Some(Conn::open(&self.url)?);
        }
        let lock_batch = |conn: &mut Conn| -> Result<LockRead> {
            // One round trip: open the transaction, take the cluster-wide batch lock, then read
            // the earliest hold's expiry and the schema's version in a statement of its own: its
            // snapshot is taken after the lock, so it sees the holds of the batches this one
            // waited for, and a migration that held the lock (see `apply_migrations`).
            let messages = conn
                .client
                .simple_query(
                    "BEGIN; SELECT last_timestamp, audit_frontier, commits FROM ledger_meta WHERE id = 1 FOR UPDATE; \
                     SELECT (SELECT min(expires_at) FROM transfers WHERE state = 1), \
                     (SELECT max(version) FROM schema_migrations); \
                     SELECT size, time, root, signature FROM audit_heads ORDER BY size DESC LIMIT 1",
                )
                .map_err(unavailable)?;
            // Each statement's rows come before its `CommandComplete`: BEGIN's (none), the
            // lock's, the expiry's, the newest signed head's (the audit edge is held to it).
            let mut statement = 0;
            let mut rows = (None, None, None);
            for m in &messages {
                match m {
                    ::postgres::SimpleQueryMessage::CommandComplete(_) => statement += 1,
                    ::postgres::SimpleQueryMessage::Row(row) if statement == 1 && rows.0.is_none() => {
                        rows.0 = Some(row)
                    }
                    ::postgres::SimpleQueryMessage::Row(row) if statement == 2 => rows.1 = Some(row),
                    ::postgres::SimpleQueryMessage::Row(row) if statement == 3 => rows.2 = Some(row),
                    _ => {}
                }
            }
            let newest = rows.2.map(text_head_row).transpose()?;
            let (last, frontier, commits) = rows
                .0
                .map(|row| {
                    (row.get(0).map(str::to_owned), row.get(1).map(str::to_owned), row.get(2).map(str::to_owned))
                })
                .ok_or_else(|| corrupt("ledger_meta has no row".into()))?;
            // As the embedded writer reads it: a negative expiry (edited storage) is due at once;
            // the sweep then leaves out the hold it cannot read (see `engine::sweep_due`).
            let due =
                rows.1.and_then(|row| row.get(0)).and_then(|d| d.parse::<i64>().ok()).map(|t| t.max(0) as Timestamp);
            let schema = rows.1.and_then(|row| row.get(1)).and_then(|v| v.parse::<u32>().ok());
            // A node started before a newer rtpay migrated the database writes as its own version
            // knew to: an older writer's batches could undo a newer one's (migration 9's count of
            // commits, which validates cached accounts, is one that earlier nodes never moved).
            // From the migration on, its writes wait for its upgrade: 503, and the other nodes
            // serve. (Read in each batch, under its lock: a migration committed while a batch ran
            // stops the next one. The connection is dropped on this error, its transaction too.)
            let known = POSTGRES.last().map_or(0, |m| m.version);
            if schema.is_some_and(|v| v > known) {
                return Err(StoreError::Unavailable(format!(
                    "the database's schema is at version {}, newer than this rtpay knows ({}): this node writes \
                     nothing until it is upgraded",
                    schema.unwrap_or_default(),
                    known
                )));
            }
            let commits = commits
                .and_then(|c| c.parse::<i64>().ok())
                .ok_or_else(|| corrupt("ledger_meta's count of commits is not a number".into()))?;
            let last = last.ok_or_else(|| corrupt("ledger clock is null".into()))?;
            let last = last.parse::<u64>().map_err(|_| corrupt(format!("ledger clock {last:?} is not a timestamp")))?;
            // bytea in text form: `\x` and hex.
            let frontier = match frontier {
                None => audit::Frontier::default(),
                Some(text) => {
                    let bytes = text
                        .strip_prefix("\\x")
                        .and_then(audit::unhex)
                        .ok_or_else(|| corrupt("audit frontier is not hex bytea".into()))?;
                    audit::Frontier::decode(&bytes).map_err(corrupt)?
                }
            };
            Ok((last, frontier, commits, due, newest))
        };
        let mut result = lock_batch(self.conn());
        // A connection the server closed while it sat idle (PostgreSQL restarted) is seen closed
        // only when a statement is sent on it, which then fails having done nothing: the batch
        // begins again on a new one, once, instead of answering 503 to everyone in it.
        if result.is_err() && reused && self.conn().client.is_closed() {
            self.conn = None;
            self.conn = Some(Conn::open(&self.url)?);
            result = lock_batch(self.conn());
        }
        let result = result.and_then(|(last, frontier, commits, due, newest)| {
            if self.trusted_edge != Some(crate::audit_log::edge_of(&frontier)) {
                self.trusted_edge = Some(crate::audit_log::check_edge(&frontier, newest.as_ref(), &self.signer)?);
            }
            Ok((last, frontier, commits, due))
        });
        match result {
            Ok((last, frontier, commits, due)) => {
                self.in_tx = true;
                self.frontier = Some(frontier);
                self.earliest_due = due;
                if self.accounts_as_of.take() != Some(commits) {
                    self.accounts.clear();
                }
                self.locked_commits = commits;
                Ok(Clock { last })
            }
            Err(e) => {
                // Whatever state the connection is in, a new one is the safe start.
                self.conn = None;
                Err(e)
            }
        }
    }

    fn load_transfers(&mut self, keys: &[TransferKey], into: &mut MemoryLedger) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let tenants: Vec<Uuid> = keys.iter().map(|k| uuid(k.tenant.0)).collect();
        let ids: Vec<Uuid> = keys.iter().map(|k| uuid(k.id.0)).collect();
        let conn = self.conn();
        let rows = conn.client.query(&conn.load_transfers, &[&tenants, &ids]).map_err(unavailable)?;
        for row in rows {
            let entry = entry_row(&row)?.into_entry().map_err(corrupt)?;
            into.transfers.insert(entry.key(), entry);
        }
        Ok(())
    }

    fn load_accounts(&mut self, keys: &[AccountKey], into: &mut MemoryLedger) -> Result<()> {
        let mut missing: Vec<&AccountKey> = Vec::new();
        for key in keys {
            if into.accounts.contains_key(key) {
                continue;
            }
            match self.accounts.touch(key).then(|| self.accounts.get(key)).flatten() {
                Some(account) => {
                    into.accounts.insert(*key, account.clone());
                }
                None => missing.push(key),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let tenants: Vec<Uuid> = missing.iter().map(|k| uuid(k.tenant.0)).collect();
        let ids: Vec<Uuid> = missing.iter().map(|k| uuid(k.id.0)).collect();
        let conn = self.conn();
        let rows = conn.client.query(&conn.load_accounts, &[&tenants, &ids]).map_err(unavailable)?;
        for row in rows {
            let account = account_row(&row)?.into_account().map_err(corrupt)?;
            // Read under the batch lock: current until this batch changes it.
            self.accounts.insert(account.key, account.clone());
            into.accounts.insert(account.key, account);
        }
        Ok(())
    }

    fn document_version(&mut self, kind: &str, tenant_id: u128, id: &str) -> Result<u64> {
        let conn = self.conn();
        let row = conn
            .client
            .query_opt(
                // Locked until the batch commits: a change made meanwhile outside the writer (a
                // compare-and-set update) waits, then finds the version moved on.
                "SELECT version FROM documents WHERE kind = $1 AND tenant_id = $2 AND id = $3 FOR UPDATE",
                &[&kind, &uuid(tenant_id), &id],
            )
            .map_err(unavailable)?;
        Ok(row.map(|r| r.try_get::<_, i64>(0)).transpose().map_err(unavailable)?.unwrap_or(0) as u64)
    }

    fn authorization_body(&mut self, tenant_id: u128, id: u128) -> Result<Option<String>> {
        // Locked until the batch commits, as a document's version is (the server writes
        // authorizations only in batches, which all hold the ledger_meta row lock anyway).
        let row = self
            .conn()
            .client
            .query_opt(
                "SELECT body FROM card_authorizations WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                &[&uuid(tenant_id), &uuid(id)],
            )
            .map_err(unavailable)?;
        row.map(|r| r.try_get::<_, String>(0)).transpose().map_err(unavailable)
    }

    fn counter_total(&mut self, scope: &str, period: u64) -> Result<i64> {
        // Counters change only in batches, which all hold the ledger_meta row lock: read after
        // it was granted, the total is current until this batch commits.
        let row = self
            .conn()
            .client
            .query_opt("SELECT total FROM counters WHERE scope = $1 AND period = $2", &[&scope, &(period as i64)])
            .map_err(unavailable)?;
        Ok(row.map(|r| r.try_get::<_, i64>(0)).transpose().map_err(unavailable)?.unwrap_or(0))
    }

    fn earliest_due(&mut self) -> Result<Option<Timestamp>> {
        Ok(self.earliest_due)
    }

    fn due_pendings(&mut self, now: Timestamp, limit: usize) -> Result<Vec<TransferKey>> {
        let conn = self.conn();
        let rows = conn.client.query(&conn.due, &[&(now as i64), &(limit as i64)]).map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(TransferKey {
                    tenant: TenantId(r.try_get::<_, Uuid>(0).map_err(unavailable)?.as_u128()),
                    id: TransferId(r.try_get::<_, Uuid>(1).map_err(unavailable)?.as_u128()),
                })
            })
            .collect()
    }

    fn commit(&mut self, changes: &[Changes], audit: &[(Timestamp, audit::Draft)], records: &[Record]) -> Result<()> {
        assert!(self.in_tx, "commit inside a batch");
        let result = self
            .write(changes, audit)
            .and_then(|()| {
                let client = &mut self.conn.as_mut().expect("connected in begin").client;
                records.iter().try_for_each(|record| match record {
                    Record::Authorization { row, message } => {
                        write_authorization(client, row, message.as_ref().map(|(k, r)| (k, r.as_slice())), true)
                    }
                    Record::Document(doc) => upsert_document(client, doc),
                    Record::Count { scope, period, delta } => client
                        .execute(
                            "INSERT INTO counters (scope, period, total) VALUES ($1, $2, $3) \
                             ON CONFLICT (scope, period) DO UPDATE SET total = counters.total + excluded.total",
                            &[scope, &(*period as i64), delta],
                        )
                        .map(drop)
                        .map_err(unavailable),
                })
            })
            .and_then(|()| {
                self.conn()
                    .client
                    .batch_execute("COMMIT")
                    .map_err(|e| StoreError::Unavailable(format!("{}: {}", crate::COMMIT_IN_DOUBT, unavailable(e))))
            });
        self.in_tx = false;
        match &result {
            Ok(()) => {
                for change in changes {
                    for account in &change.accounts {
                        self.accounts.insert(account.key, account.clone());
                    }
                }
                // What `write` left in ledger_meta.
                self.accounts_as_of = Some(self.locked_commits + 1);
                if let Some(edge) = self.pending_edge.take() {
                    self.trusted_edge = Some(edge);
                }
            }
            Err(_) => {
                // Committed or not, the cache is not trusted again (`accounts_as_of` is unset),
                // nor the edge (the next batch holds what it reads to its head).
                self.pending_edge = None;
                self.conn = None;
            }
        }
        result
    }

    fn cached_accounts(&self) -> usize {
        self.accounts.len()
    }

    fn rollback(&mut self) {
        self.pending_edge = None;
        if self.in_tx {
            self.in_tx = false;
            if let Some(conn) = self.conn.as_mut() {
                if conn.client.batch_execute("ROLLBACK").is_err() {
                    self.conn = None;
                } else {
                    // Nothing committed: the cache holds what was read under this batch's lock
                    // (changes enter it only once committed), current while the count of commits
                    // stays the one read then. An idle sweep (every 500 ms, nothing due) no
                    // longer empties it.
                    self.accounts_as_of = Some(self.locked_commits);
                }
            }
        }
    }
}

impl PgWriter {
    fn write(&mut self, changes: &[Changes], drafts: &[(Timestamp, audit::Draft)]) -> Result<()> {
        let entries: Vec<EntryRow> = changes.iter().flat_map(|c| c.inserted.iter().map(EntryRow::of)).collect();
        let timestamp: Vec<i64> = entries.iter().map(|r| r.timestamp).collect();
        let tenant: Vec<Uuid> = entries.iter().map(|r| uuid(r.tenant_id)).collect();
        let id: Vec<Uuid> = entries.iter().map(|r| uuid(r.id)).collect();
        let result: Vec<i16> = entries.iter().map(|r| r.result).collect();
        let kind: Vec<i16> = entries.iter().map(|r| r.kind).collect();
        let debit: Vec<Option<Uuid>> = entries.iter().map(|r| r.debit_account_id.map(uuid)).collect();
        let credit: Vec<Option<Uuid>> = entries.iter().map(|r| r.credit_account_id.map(uuid)).collect();
        let amount: Vec<Option<i64>> = entries.iter().map(|r| r.amount).collect();
        let currency: Vec<Option<&str>> = entries.iter().map(|r| r.currency.as_deref()).collect();
        let pending: Vec<Option<Uuid>> = entries.iter().map(|r| r.pending_id.map(uuid)).collect();
        let defaulted: Vec<bool> = entries.iter().map(|r| r.amount_defaulted).collect();
        let timeout: Vec<i64> = entries.iter().map(|r| r.timeout_seconds).collect();
        let expires: Vec<Option<i64>> = entries.iter().map(|r| r.expires_at).collect();
        let code: Vec<i32> = entries.iter().map(|r| r.code).collect();
        let metadata: Vec<Option<&str>> = entries.iter().map(|r| r.metadata.as_deref()).collect();
        let state: Vec<i16> = entries.iter().map(|r| r.state).collect();

        let updates: Vec<&(TransferKey, PendingState)> =
            changes.iter().flat_map(|c| c.pending_updates.iter()).collect();
        let u_tenant: Vec<Uuid> = updates.iter().map(|(k, _)| uuid(k.tenant.0)).collect();
        let u_id: Vec<Uuid> = updates.iter().map(|(k, _)| uuid(k.id.0)).collect();
        let u_state: Vec<i16> = updates.iter().map(|(_, s)| *s as i16).collect();

        // An account may change in several parts of a batch: the last value is the final one.
        let mut accounts: std::collections::BTreeMap<AccountKey, AccountRow> = std::collections::BTreeMap::new();
        let mut last = 0u64;
        for change in changes {
            for account in &change.accounts {
                accounts.insert(account.key, AccountRow::of(account));
            }
            last = last.max(change.clock.last);
        }
        let rows: Vec<&AccountRow> = accounts.values().collect();
        let a_tenant: Vec<Uuid> = rows.iter().map(|r| uuid(r.tenant_id)).collect();
        let a_id: Vec<Uuid> = rows.iter().map(|r| uuid(r.id)).collect();
        let a_currency: Vec<&str> = rows.iter().map(|r| r.currency.as_str()).collect();
        let a_code: Vec<i32> = rows.iter().map(|r| r.code).collect();
        let a_flags: Vec<i32> = rows.iter().map(|r| r.flags).collect();
        let a_limit: Vec<i64> = rows.iter().map(|r| r.credit_limit).collect();
        let a_metadata: Vec<Option<&str>> = rows.iter().map(|r| r.metadata.as_deref()).collect();
        let a_timestamp: Vec<i64> = rows.iter().map(|r| r.timestamp).collect();
        let dp: Vec<i64> = rows.iter().map(|r| r.debits_posted).collect();
        let cp: Vec<i64> = rows.iter().map(|r| r.credits_posted).collect();
        let dh: Vec<i64> = rows.iter().map(|r| r.debits_pending).collect();
        let ch: Vec<i64> = rows.iter().map(|r| r.credits_pending).collect();
        let a_holder: Vec<Option<Uuid>> = rows.iter().map(|r| r.holder_id.map(uuid)).collect();
        let last = last as i64;

        // The audit's columns, when the batch has entries.
        let append = (!drafts.is_empty())
            .then(|| crate::audit_log::append(self.frontier.as_ref().expect("read in begin"), drafts, &self.signer));
        self.pending_edge = append.as_ref().map(|a| crate::audit_log::edge_of(&a.frontier));
        let e: &[crate::audit_log::Appended] = append.as_ref().map_or(&[], |a| &a.entries);
        let seq: Vec<i64> = e.iter().map(|e| e.seq as i64).collect();
        let time: Vec<i64> = e.iter().map(|e| e.time as i64).collect();
        let e_tenant: Vec<Option<Uuid>> = e.iter().map(|e| e.draft.tenant.map(uuid)).collect();
        let text = |f: fn(&audit::Draft) -> &str| -> Vec<&str> { e.iter().map(|e| f(e.draft)).collect() };
        let (actor, action, resource) = (text(|d| &d.actor), text(|d| &d.action), text(|d| &d.resource));
        let (request, source, outcome) = (text(|d| &d.request_id), text(|d| &d.source), text(|d| &d.outcome));
        let leaf: Vec<&[u8]> = e.iter().map(|e| &e.leaf[..]).collect();
        let nodes = append.as_ref().map_or(&[][..], |a| &a.nodes[..]);
        let level: Vec<i16> = nodes.iter().map(|n| i16::from(n.level)).collect();
        let idx: Vec<i64> = nodes.iter().map(|n| crate::audit_log::last_leaf(n.level, n.index) as i64).collect();
        let hash: Vec<&[u8]> = nodes.iter().map(|n| &n.hash[..]).collect();
        let head = append.as_ref().map(|a| {
            let h = &a.head;
            (h.head.size as i64, h.head.time as i64, &h.head.root[..], &h.signature, a.frontier.encode())
        });

        let conn = self.conn();
        let mut params: Vec<&(dyn ::postgres::types::ToSql + Sync)> = vec![
            &timestamp,
            &tenant,
            &id,
            &result,
            &kind,
            &debit,
            &credit,
            &amount,
            &currency,
            &pending,
            &defaulted,
            &timeout,
            &expires,
            &code,
            &metadata,
            &state,
            &u_tenant,
            &u_id,
            &u_state,
            &a_tenant,
            &a_id,
            &a_currency,
            &a_code,
            &a_flags,
            &a_limit,
            &a_metadata,
            &a_timestamp,
            &dp,
            &cp,
            &dh,
            &ch,
            &last,
            &a_holder,
        ];
        let statement = match &head {
            None => &conn.write,
            Some((size, head_time, root, signature, frontier)) => {
                params.extend_from_slice(&[
                    &seq, &time, &e_tenant, &actor, &action, &resource, &request, &source, &outcome, &leaf, &level,
                    &idx, &hash, size, head_time, root, *signature, frontier,
                ]);
                &conn.write_audited
            }
        };
        let row = conn.client.query_one(statement, &params).map_err(unavailable)?;
        let updated: i64 = row.try_get(1).map_err(unavailable)?;
        assert_eq!(updated as usize, updates.len(), "pending updates name stored transfers");
        if head.is_some() {
            let written: i64 = row.try_get(4).map_err(unavailable)?;
            assert_eq!(written as usize, e.len(), "every audit entry is written");
        }
        Ok(())
    }
}

struct PgQueries {
    url: String,
    pool: Mutex<Vec<Client>>,
}

impl PgQueries {
    fn with<T>(&self, mut f: impl FnMut(&mut Client) -> Result<T>) -> Result<T> {
        self.with_retry(&mut f, true)
    }

    /// Without the retry: for writes (one cut after the server committed it would be applied
    /// again, and answered as a conflict) and for calls that hand rows to a visitor as they read
    /// them (a retry would visit some twice).
    fn with_once<T>(&self, mut f: impl FnMut(&mut Client) -> Result<T>) -> Result<T> {
        self.with_retry(&mut f, false)
    }

    fn with_retry<T>(&self, f: &mut dyn FnMut(&mut Client) -> Result<T>, retry: bool) -> Result<T> {
        let pooled = self.pool.lock().expect("pool lock").pop();
        let (mut client, was_pooled) = match pooled {
            Some(c) if !c.is_closed() => (c, true),
            _ => (connect(&self.url)?, false),
        };
        let mut result = f(&mut client);
        if result.is_err() && was_pooled && client.is_closed() {
            // A kept connection that died while idle (PostgreSQL restarted, a network cut): the
            // others kept with it are likely dead too. Drop them all (outside the lock: dropping
            // a client sends its goodbye), so that the next calls do not meet them one by one,
            // and try a read once more on a fresh one. (A write is not tried again: it may have
            // been applied before the connection died.)
            let dead = std::mem::take(&mut *self.pool.lock().expect("pool lock"));
            drop(dead);
            if retry {
                client = connect(&self.url)?;
                result = f(&mut client);
            }
        }
        if !client.is_closed() {
            let mut pool = self.pool.lock().expect("pool lock");
            if pool.len() < READERS_MAX {
                pool.push(client);
            }
        }
        result
    }
}

/// An authorization, inserted or replaced, and the answer to its message: a message seen before
/// is `Conflict`, or (for the writer, `keep_first`) keeps its first answer.
fn write_authorization(
    client: &mut impl ::postgres::GenericClient,
    row: &AuthorizationRow,
    message: Option<(&[u8; 32], &[u8])>,
    keep_first: bool,
) -> Result<()> {
    // The change to the card's spend on the authorization's day.
    let before: i64 = client
        .query_opt(
            "SELECT spend FROM card_authorizations WHERE tenant_id = $1 AND id = $2",
            &[&uuid(row.tenant_id), &uuid(row.id)],
        )
        .map_err(unavailable)?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(unavailable)?
        .unwrap_or(0);
    let delta = row.spend as i64 - before;
    if delta != 0 {
        client
            .execute(
                "INSERT INTO card_spend (card_id, day, spend) VALUES ($1, $2, $3) \
                 ON CONFLICT (card_id, day) DO UPDATE SET spend = card_spend.spend + excluded.spend",
                &[&uuid(row.card_id), &((row.created_at / DAY_NANOS) as i64), &delta],
            )
            .map_err(unavailable)?;
    }
    client
        .execute(
            "INSERT INTO card_authorizations (tenant_id, id, card_id, rrn, created_at, spend, body, held_until) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (tenant_id, id) DO UPDATE SET spend = excluded.spend, body = excluded.body, \
             held_until = excluded.held_until",
            &[
                &uuid(row.tenant_id),
                &uuid(row.id),
                &uuid(row.card_id),
                &row.rrn,
                &(row.created_at as i64),
                &(row.spend as i64),
                &row.body,
                &(row.held_until as i64),
            ],
        )
        .map_err(unavailable)?;
    if let Some((key, response)) = message {
        let sql = if keep_first {
            "INSERT INTO card_messages (key, response) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"
        } else {
            "INSERT INTO card_messages (key, response) VALUES ($1, $2)"
        };
        client
            .execute(sql, &[&&key[..], &response])
            .map_err(|e| map_conflict(e, "this message was answered before"))?;
    }
    Ok(())
}

/// Nanoseconds in a UTC day: `card_spend.day` is days since the epoch.
const DAY_NANOS: u64 = 86_400_000_000_000;
/// Recent authorizations are counted up to this many (above any velocity limit a product may set).
const RECENT_COUNT_MAX: i64 = 100_000;

const AUTH_COLUMNS: &str = "tenant_id, id, card_id, rrn, created_at, spend, body, held_until";

fn card_row(r: &Row) -> Result<CardRow> {
    Ok(CardRow {
        tenant_id: r.try_get::<_, Uuid>(0).map_err(unavailable)?.as_u128(),
        id: r.try_get::<_, Uuid>(1).map_err(unavailable)?.as_u128(),
        pan_index: hash_of(r.try_get::<_, &[u8]>(2).map_err(unavailable)?)?,
        status: r.try_get(3).map_err(unavailable)?,
        body: r.try_get(4).map_err(unavailable)?,
    })
}

fn authorization_row(r: &Row) -> Result<AuthorizationRow> {
    Ok(AuthorizationRow {
        tenant_id: r.try_get::<_, Uuid>(0).map_err(unavailable)?.as_u128(),
        id: r.try_get::<_, Uuid>(1).map_err(unavailable)?.as_u128(),
        card_id: r.try_get::<_, Uuid>(2).map_err(unavailable)?.as_u128(),
        rrn: r.try_get(3).map_err(unavailable)?,
        created_at: r.try_get::<_, i64>(4).map_err(unavailable)? as u64,
        spend: r.try_get::<_, i64>(5).map_err(unavailable)? as u64,
        held_until: r.try_get::<_, i64>(7).map_err(unavailable)? as u64,
        body: r.try_get(6).map_err(unavailable)?,
    })
}

const DOCUMENT_COLUMNS: &str = "kind, tenant_id, id, lookup, owner, created_at, version, body";

/// An owner's documents, oldest first: in the order of the `documents_by_owner` index.
const BY_OWNER: &str = "FROM documents WHERE kind = $1 AND owner = $2 ORDER BY created_at, id, tenant_id LIMIT $3";
/// The same, after a cursor: `(created_at, id, tenant_id)` past `($4, $5, $6)`.
const BY_OWNER_AFTER: &str =
    "FROM documents WHERE kind = $1 AND owner = $2 AND (created_at, id, tenant_id) > ($4, $5, $6) \
                              ORDER BY created_at, id, tenant_id LIMIT $3";

fn document_row(r: &Row) -> Result<Document> {
    Ok(Document {
        kind: r.try_get(0).map_err(unavailable)?,
        tenant_id: r.try_get::<_, Uuid>(1).map_err(unavailable)?.as_u128(),
        id: r.try_get(2).map_err(unavailable)?,
        lookup: r.try_get(3).map_err(unavailable)?,
        owner: r.try_get(4).map_err(unavailable)?,
        created_at: r.try_get::<_, i64>(5).map_err(unavailable)? as u64,
        version: r.try_get::<_, i64>(6).map_err(unavailable)? as u64,
        body: r.try_get(7).map_err(unavailable)?,
    })
}

fn upsert_document(client: &mut impl ::postgres::GenericClient, doc: &Document) -> Result<()> {
    client
        .execute(
            "INSERT INTO documents (kind, tenant_id, id, lookup, owner, created_at, version, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (kind, tenant_id, id) DO UPDATE SET \
             lookup = excluded.lookup, owner = excluded.owner, version = excluded.version, body = excluded.body",
            &[
                &doc.kind,
                &uuid(doc.tenant_id),
                &doc.id,
                &doc.lookup,
                &doc.owner,
                &(doc.created_at as i64),
                &(doc.version as i64),
                &doc.body,
            ],
        )
        .map_err(|e| map_conflict(e, "a document with this lookup exists"))?;
    Ok(())
}

fn map_conflict(e: ::postgres::Error, what: &str) -> StoreError {
    if e.code() == Some(&::postgres::error::SqlState::UNIQUE_VIOLATION) {
        return StoreError::Conflict(what.to_owned());
    }
    unavailable(e)
}

/// `Conflict` if the id (per kind and tenant) or the lookup (per kind) exists.
fn insert_document_row(client: &mut impl ::postgres::GenericClient, doc: &Document) -> Result<()> {
    client
        .execute(
            "INSERT INTO documents (kind, tenant_id, id, lookup, owner, created_at, version, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &doc.kind,
                &uuid(doc.tenant_id),
                &doc.id,
                &doc.lookup,
                &doc.owner,
                &(doc.created_at as i64),
                &(doc.version as i64),
                &doc.body,
            ],
        )
        .map_err(|e| map_conflict(e, "a document with this id or lookup exists"))?;
    Ok(())
}

impl Queries for PgQueries {
    fn insert_document(&self, doc: &Document) -> Result<()> {
        self.with_once(|c| insert_document_row(c, doc))
    }

    fn insert_document_within(&self, doc: &Document, max: u64) -> Result<bool> {
        self.with_once(|c| {
            // Read committed (as every connection of rtpay's): the count sees what the lock's
            // last holder committed.
            let mut tx = c.transaction().map_err(unavailable)?;
            if let Some(owner) = &doc.owner {
                // Every node counting this owner's documents of this kind takes turns, until its
                // transaction ends.
                tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))", &[&doc.kind, owner])
                    .map_err(unavailable)?;
                let count: i64 = tx
                    .query_one("SELECT COUNT(*) FROM documents WHERE kind = $1 AND owner = $2", &[&doc.kind, owner])
                    .map_err(unavailable)?
                    .get(0);
                if count as u64 >= max {
                    return Ok(false);
                }
            }
            insert_document_row(&mut tx, doc)?;
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
    }

    fn document(&self, kind: &str, tenant_id: u128, id: &str) -> Result<Option<Document>> {
        self.with(|c| {
            c.query_opt(
                &format!("SELECT {DOCUMENT_COLUMNS} FROM documents WHERE kind = $1 AND tenant_id = $2 AND id = $3"),
                &[&kind, &uuid(tenant_id), &id],
            )
            .map_err(unavailable)?
            .map(|r| document_row(&r))
            .transpose()
        })
    }

    fn document_by_lookup(&self, kind: &str, lookup: &str) -> Result<Option<Document>> {
        self.with(|c| {
            c.query_opt(
                &format!("SELECT {DOCUMENT_COLUMNS} FROM documents WHERE kind = $1 AND lookup = $2"),
                &[&kind, &lookup],
            )
            .map_err(unavailable)?
            .map(|r| document_row(&r))
            .transpose()
        })
    }

    fn update_document(&self, doc: &Document, expected_version: u64) -> Result<bool> {
        self.with_once(|c| {
            let n = c
                .execute(
                    "UPDATE documents SET lookup = $4, owner = $5, version = $6, body = $7 \
                     WHERE kind = $1 AND tenant_id = $2 AND id = $3 AND version = $8",
                    &[
                        &doc.kind,
                        &uuid(doc.tenant_id),
                        &doc.id,
                        &doc.lookup,
                        &doc.owner,
                        &(doc.version as i64),
                        &doc.body,
                        &(expected_version as i64),
                    ],
                )
                .map_err(|e| map_conflict(e, "a document with this lookup exists"))?;
            Ok(n == 1)
        })
    }

    fn delete_document(&self, kind: &str, tenant_id: u128, id: &str) -> Result<bool> {
        self.with_once(|c| {
            let n = c
                .execute(
                    "DELETE FROM documents WHERE kind = $1 AND tenant_id = $2 AND id = $3",
                    &[&kind, &uuid(tenant_id), &id],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn documents(&self, q: &DocumentQuery<'_>) -> Result<Vec<Document>> {
        let (after_at, after_id) = q.after.clone().unwrap_or((0, String::new()));
        let from = if q.after.is_some() { q.from.max(after_at) } else { q.from };
        self.with(|c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {DOCUMENT_COLUMNS} FROM documents \
                         WHERE kind = $1 AND tenant_id = $2 AND created_at >= $3 AND created_at < $4 \
                           AND ($5::TEXT IS NULL OR owner = $5) AND (created_at > $6 OR id > $7) \
                         ORDER BY created_at, id LIMIT $8"
                    ),
                    &[
                        &q.kind,
                        &uuid(q.tenant_id),
                        &(from as i64),
                        &(q.to.min(i64::MAX as u64) as i64),
                        &q.owner,
                        &(after_at as i64),
                        &after_id,
                        &(q.limit.min(PAGE_LEN_MAX) as i64),
                    ],
                )
                .map_err(unavailable)?;
            rows.iter().map(document_row).collect()
        })
    }

    fn count_documents(&self, kind: &str, owner: &str) -> Result<u64> {
        self.with(|c| {
            let n: i64 = c
                .query_one("SELECT COUNT(*) FROM documents WHERE kind = $1 AND owner = $2", &[&kind, &owner])
                .map_err(unavailable)?
                .try_get(0)
                .map_err(unavailable)?;
            Ok(n as u64)
        })
    }

    fn documents_by_owner(
        &self,
        kind: &str,
        owner: &str,
        after: Option<&crate::OwnerCursor>,
        limit: usize,
    ) -> Result<Vec<Document>> {
        self.with(|c| {
            let rows = match after {
                None => c.query(&format!("SELECT {DOCUMENT_COLUMNS} {BY_OWNER}"), &[&kind, &owner, &(limit as i64)]),
                Some(a) => c.query(
                    &format!("SELECT {DOCUMENT_COLUMNS} {BY_OWNER_AFTER}"),
                    &[&kind, &owner, &(limit as i64), &(a.created_at as i64), &a.id, &uuid(a.tenant_id)],
                ),
            };
            rows.map_err(unavailable)?.iter().map(document_row).collect()
        })
    }

    fn counter_total(&self, scope: &str, from: u64, to: u64) -> Result<i64> {
        self.with(|c| {
            let n: i64 = c
                .query_one(
                    "SELECT COALESCE(SUM(total), 0)::BIGINT FROM counters WHERE scope = $1 AND period >= $2 AND period < $3",
                    &[&scope, &(from as i64), &(to.min(i64::MAX as u64) as i64)],
                )
                .map_err(unavailable)?
                .try_get(0)
                .map_err(unavailable)?;
            Ok(n)
        })
    }

    fn account(&self, key: AccountKey) -> Result<Option<Account>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE tenant_id = $1 AND id = $2"),
                    &[&uuid(key.tenant.0), &uuid(key.id.0)],
                )
                .map_err(unavailable)?;
            row.map(|r| account_row(&r)?.into_account().map_err(corrupt)).transpose()
        })
    }

    fn entry(&self, key: TransferKey) -> Result<Option<Entry>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    &format!("SELECT {ENTRY_COLUMNS} FROM transfers WHERE tenant_id = $1 AND id = $2"),
                    &[&uuid(key.tenant.0), &uuid(key.id.0)],
                )
                .map_err(unavailable)?;
            row.map(|r| entry_row(&r)?.into_entry().map_err(corrupt)).transpose()
        })
    }

    fn account_transfers(&self, key: AccountKey, page: Page) -> Result<Option<Vec<Transfer>>> {
        let limit = page.limit.min(PAGE_LEN_MAX) as i64;
        let before = page.before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        self.with(|c| {
            // The cursor must be a transfer of this listing, as on the embedded engine (whose
            // chains can only be followed from one of their links).
            if page.before.is_some() {
                let listed = c
                    .query_opt(
                        "SELECT 1 FROM transfers WHERE timestamp = $3 AND tenant_id = $1 AND result = 0 \
                         AND (debit_account_id = $2 OR credit_account_id = $2)",
                        &[&uuid(key.tenant.0), &uuid(key.id.0), &before],
                    )
                    .map_err(unavailable)?;
                if listed.is_none() {
                    return Ok(None);
                }
            }
            let rows = c
                .query(
                    &format!(
                        "SELECT {ENTRY_COLUMNS} FROM (\
                           (SELECT * FROM transfers WHERE tenant_id = $1 AND debit_account_id = $2 AND result = 0 AND timestamp < $3 ORDER BY timestamp DESC LIMIT $4) \
                           UNION \
                           (SELECT * FROM transfers WHERE tenant_id = $1 AND credit_account_id = $2 AND result = 0 AND timestamp < $3 ORDER BY timestamp DESC LIMIT $4)\
                         ) t ORDER BY timestamp DESC LIMIT $4"
                    ),
                    &[&uuid(key.tenant.0), &uuid(key.id.0), &before, &limit],
                )
                .map_err(unavailable)?;
            rows.iter()
                .map(|r| match entry_row(r)?.into_entry().map_err(corrupt)? {
                    Entry::Created(t) => Ok(t),
                    Entry::Failed { .. } => Err(corrupt("failed entry in an account listing".into())),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        })
    }

    fn create_tenant(&self, tenant: &TenantRecord, key: &ApiKeyRecord, secret_hash: &[u8; 32]) -> Result<()> {
        self.with_once(|c| {
            let mut tx = c.transaction().map_err(unavailable)?;
            tx.execute(
                "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)",
                &[&uuid(tenant.id), &tenant.name, &(tenant.created_at as i64)],
            )
            .map_err(|e| map_conflict(e, "tenant id exists"))?;
            tx.execute(
                "INSERT INTO api_keys (id, tenant_id, secret_hash, created_at, scopes) VALUES ($1, $2, $3, $4, $5)",
                &[&uuid(key.id), &uuid(key.tenant_id), &&secret_hash[..], &(key.created_at as i64), &key.scopes],
            )
            .map_err(|e| map_conflict(e, "api key exists"))?;
            tx.commit().map_err(unavailable)
        })
    }

    fn tenant(&self, id: u128) -> Result<Option<TenantRecord>> {
        self.with(|c| {
            let row =
                c.query_opt("SELECT name, created_at FROM tenants WHERE id = $1", &[&uuid(id)]).map_err(unavailable)?;
            row.map(|r| {
                Ok(TenantRecord {
                    id,
                    name: r.try_get(0).map_err(unavailable)?,
                    created_at: r.try_get::<_, i64>(1).map_err(unavailable)? as u64,
                })
            })
            .transpose()
        })
    }

    fn create_api_key(&self, key: &ApiKeyRecord, secret_hash: &[u8; 32]) -> Result<()> {
        self.with_once(|c| {
            c.execute(
                "INSERT INTO api_keys (id, tenant_id, secret_hash, created_at, scopes) VALUES ($1, $2, $3, $4, $5)",
                &[&uuid(key.id), &uuid(key.tenant_id), &&secret_hash[..], &(key.created_at as i64), &key.scopes],
            )
            .map_err(|e| map_conflict(e, "api key exists"))?;
            Ok(())
        })
    }

    fn revoke_api_key(&self, tenant_id: u128, key_id: u128, at: Timestamp) -> Result<bool> {
        self.with_once(|c| {
            let n = c
                .execute(
                    "UPDATE api_keys SET revoked_at = $3 WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL",
                    &[&uuid(tenant_id), &uuid(key_id), &(at as i64)],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn api_key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    "SELECT id, tenant_id, created_at, revoked_at, scopes FROM api_keys WHERE secret_hash = $1",
                    &[&&secret_hash[..]],
                )
                .map_err(unavailable)?;
            row.map(|r| {
                Ok(ApiKeyRecord {
                    id: r.try_get::<_, Uuid>(0).map_err(unavailable)?.as_u128(),
                    tenant_id: r.try_get::<_, Uuid>(1).map_err(unavailable)?.as_u128(),
                    created_at: r.try_get::<_, i64>(2).map_err(unavailable)? as u64,
                    revoked_at: r.try_get::<_, Option<i64>>(3).map_err(unavailable)?.map(|v| v as u64),
                    scopes: r.try_get(4).map_err(unavailable)?,
                })
            })
            .transpose()
        })
    }

    fn scan(&self, accounts: &mut dyn FnMut(Account), entries: &mut dyn FnMut(Entry)) -> Result<()> {
        self.with_once(|c| {
            // REPEATABLE READ: accounts and transfers from one snapshot, read in portions.
            let mut tx = c
                .build_transaction()
                .isolation_level(::postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(unavailable)?;
            let stmt = tx.prepare(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts")).map_err(unavailable)?;
            let portal = tx.bind(&stmt, &[]).map_err(unavailable)?;
            loop {
                let rows = tx.query_portal(&portal, 10_000).map_err(unavailable)?;
                if rows.is_empty() {
                    break;
                }
                for row in &rows {
                    accounts(account_row(row)?.into_account().map_err(corrupt)?);
                }
            }
            let stmt = tx
                .prepare(&format!("SELECT {ENTRY_COLUMNS} FROM transfers ORDER BY timestamp"))
                .map_err(unavailable)?;
            let portal = tx.bind(&stmt, &[]).map_err(unavailable)?;
            loop {
                let rows = tx.query_portal(&portal, 10_000).map_err(unavailable)?;
                if rows.is_empty() {
                    break;
                }
                for row in &rows {
                    entries(entry_row(row)?.into_entry().map_err(corrupt)?);
                }
            }
            tx.commit().map_err(unavailable)
        })
    }

    fn ping(&self) -> Result<()> {
        // Ready only while this node may write: once a newer rtpay migrated the database, this
        // node's batches are refused (see `lock_batch`), and a node that refuses every write must
        // take no traffic (a rolling upgrade routes it to the upgraded nodes).
        self.with(|c| refuse_newer_schema(c, POSTGRES))
    }

    fn ledger_clock(&self) -> Result<Timestamp> {
        let t: i64 = self.with(|c| {
            c.query_one("SELECT last_timestamp FROM ledger_meta WHERE id = 1", &[])
                .and_then(|r| r.try_get(0))
                .map_err(unavailable)
        })?;
        u64::try_from(t).map_err(|_| corrupt(format!("the ledger's clock reads {t}")))
    }

    fn database_time(&self) -> Result<Option<Timestamp>> {
        // Microseconds: PostgreSQL's timestamps go no finer.
        let micros: i64 = self.with(|c| {
            c.query_one("SELECT floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint", &[])
                .and_then(|r| r.try_get(0))
                .map_err(unavailable)
        })?;
        let micros = u64::try_from(micros).map_err(|_| corrupt(format!("the database's clock reads {micros} µs")))?;
        Ok(Some(micros.saturating_mul(1000)))
    }

    fn create_oauth_client(&self, client: &OAuthClientRecord, secret_hash: &[u8; 32]) -> Result<()> {
        self.with_once(|c| {
            c.execute(
                "INSERT INTO oauth_clients (id, tenant_id, secret_hash, scopes, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[&uuid(client.id), &uuid(client.tenant_id), &&secret_hash[..], &client.scopes, &(client.created_at as i64)],
            )
            .map_err(|e| map_conflict(e, "oauth client exists"))?;
            Ok(())
        })
    }

    fn oauth_client(&self, id: u128) -> Result<Option<(OAuthClientRecord, [u8; 32])>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    "SELECT tenant_id, secret_hash, scopes, created_at, revoked_at FROM oauth_clients WHERE id = $1",
                    &[&uuid(id)],
                )
                .map_err(unavailable)?;
            row.map(|r| {
                Ok((
                    OAuthClientRecord {
                        id,
                        tenant_id: r.try_get::<_, Uuid>(0).map_err(unavailable)?.as_u128(),
                        scopes: r.try_get(2).map_err(unavailable)?,
                        created_at: r.try_get::<_, i64>(3).map_err(unavailable)? as u64,
                        revoked_at: r.try_get::<_, Option<i64>>(4).map_err(unavailable)?.map(|t| t as u64),
                    },
                    hash_of(r.try_get::<_, &[u8]>(1).map_err(unavailable)?)?,
                ))
            })
            .transpose()
        })
    }

    fn revoke_oauth_client(&self, tenant_id: u128, id: u128, at: Timestamp) -> Result<bool> {
        self.with_once(|c| {
            let n = c
                .execute(
                    "UPDATE oauth_clients SET revoked_at = $3 WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL",
                    &[&uuid(tenant_id), &uuid(id), &(at as i64)],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn data_key(&self, tenant_id: u128) -> Result<Option<DataKeyRecord>> {
        self.with(|c| {
            let row = c
                .query_opt("SELECT kek_version, wrapped FROM data_keys WHERE tenant_id = $1", &[&uuid(tenant_id)])
                .map_err(unavailable)?;
            row.map(|r| {
                Ok(DataKeyRecord {
                    tenant_id,
                    kek_version: r.try_get::<_, i32>(0).map_err(unavailable)? as u32,
                    wrapped: r.try_get(1).map_err(unavailable)?,
                })
            })
            .transpose()
        })
    }

    fn create_data_key(&self, key: &DataKeyRecord) -> Result<()> {
        self.with_once(|c| {
            c.execute(
                "INSERT INTO data_keys (tenant_id, kek_version, wrapped) VALUES ($1, $2, $3)",
                &[&uuid(key.tenant_id), &(key.kek_version as i32), &key.wrapped],
            )
            .map_err(|e| map_conflict(e, "the tenant has a data key"))?;
            Ok(())
        })
    }

    fn data_keys(&self) -> Result<Vec<DataKeyRecord>> {
        self.with(|c| {
            let rows = c.query("SELECT tenant_id, kek_version, wrapped FROM data_keys", &[]).map_err(unavailable)?;
            rows.iter()
                .map(|r| {
                    Ok(DataKeyRecord {
                        tenant_id: r.try_get::<_, Uuid>(0).map_err(unavailable)?.as_u128(),
                        kek_version: r.try_get::<_, i32>(1).map_err(unavailable)? as u32,
                        wrapped: r.try_get(2).map_err(unavailable)?,
                    })
                })
                .collect()
        })
    }

    fn rewrap_data_key(&self, key: &DataKeyRecord, old_kek_version: u32) -> Result<bool> {
        self.with_once(|c| {
            let n = c
                .execute(
                    "UPDATE data_keys SET kek_version = $2, wrapped = $3 WHERE tenant_id = $1 AND kek_version = $4",
                    &[&uuid(key.tenant_id), &(key.kek_version as i32), &key.wrapped, &(old_kek_version as i32)],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn key_rotation_turn(&self) -> Result<Box<dyn Send>> {
        // A session lock on a connection of its own, never pooled: dropping the guard closes the
        // session, which releases the lock (so does the server, should this process die).
        let mut client = connect(&self.url)?;
        client.execute("SELECT pg_advisory_lock($1)", &[&KEY_ROTATION_LOCK]).map_err(unavailable)?;
        Ok(Box::new(client))
    }

    fn create_holder(&self, h: &HolderRecord) -> Result<()> {
        self.with_once(|c| {
            c.execute(
                "INSERT INTO holders (tenant_id, id, kind, name_sealed, document_sealed, document_index, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &uuid(h.tenant_id),
                    &uuid(h.id),
                    &h.kind,
                    &h.name_sealed,
                    &h.document_sealed,
                    &&h.document_index[..],
                    &(h.created_at as i64),
                ],
            )
            .map_err(|e| map_conflict(e, "a holder with this id or document exists"))?;
            Ok(())
        })
    }

    fn create_card_product(&self, tenant_id: u128, id: u128, bin: &str, body: &str) -> Result<()> {
        self.with_once(|c| {
            c.execute(
                "INSERT INTO card_products (tenant_id, id, bin, body) VALUES ($1, $2, $3, $4)",
                &[&uuid(tenant_id), &uuid(id), &bin, &body],
            )
            .map_err(|e| map_conflict(e, "a card product with this id or BIN exists"))?;
            Ok(())
        })
    }

    fn card_bin_taken(&self, bin: &str) -> Result<bool> {
        self.with(|c| {
            let row = c
                .query_one("SELECT EXISTS (SELECT 1 FROM card_products WHERE bin = $1)", &[&bin])
                .map_err(unavailable)?;
            Ok(row.get(0))
        })
    }

    fn card_product(&self, tenant_id: u128, id: u128) -> Result<Option<String>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    "SELECT body FROM card_products WHERE tenant_id = $1 AND id = $2",
                    &[&uuid(tenant_id), &uuid(id)],
                )
                .map_err(unavailable)?;
            row.map(|r| r.try_get(0).map_err(unavailable)).transpose()
        })
    }

    fn create_card(&self, card: &CardRow) -> Result<()> {
        self.with_once(|c| {
            c.execute(
                "INSERT INTO cards (tenant_id, id, pan_index, status, body) VALUES ($1, $2, $3, $4, $5)",
                &[&uuid(card.tenant_id), &uuid(card.id), &&card.pan_index[..], &card.status, &card.body],
            )
            .map_err(|e| map_conflict(e, "a card with this id or number exists"))?;
            Ok(())
        })
    }

    fn card(&self, tenant_id: u128, id: u128) -> Result<Option<CardRow>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    "SELECT tenant_id, id, pan_index, status, body FROM cards WHERE tenant_id = $1 AND id = $2",
                    &[&uuid(tenant_id), &uuid(id)],
                )
                .map_err(unavailable)?;
            row.map(|r| card_row(&r)).transpose()
        })
    }

    fn card_by_index(&self, pan_index: &[u8; 32]) -> Result<Option<CardRow>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    "SELECT tenant_id, id, pan_index, status, body FROM cards WHERE pan_index = $1",
                    &[&&pan_index[..]],
                )
                .map_err(unavailable)?;
            row.map(|r| card_row(&r)).transpose()
        })
    }

    fn update_card(&self, card: &CardRow, expected: &str) -> Result<bool> {
        self.with_once(|c| {
            let n = c
                .execute(
                    "UPDATE cards SET status = $3, body = $4 WHERE tenant_id = $1 AND id = $2 AND status = $5",
                    &[&uuid(card.tenant_id), &uuid(card.id), &card.status, &card.body, &expected],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn save_authorization(&self, row: &AuthorizationRow, message: Option<(&[u8; 32], &[u8])>) -> Result<()> {
        self.with_once(|c| {
            let mut tx = c.transaction().map_err(unavailable)?;
            write_authorization(&mut tx, row, message, false)?;
            tx.commit().map_err(unavailable)
        })
    }

    fn authorization(&self, tenant_id: u128, id: u128) -> Result<Option<AuthorizationRow>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    &format!("SELECT {AUTH_COLUMNS} FROM card_authorizations WHERE tenant_id = $1 AND id = $2"),
                    &[&uuid(tenant_id), &uuid(id)],
                )
                .map_err(unavailable)?;
            row.map(|r| authorization_row(&r)).transpose()
        })
    }

    fn authorization_by_rrn(&self, card_id: u128, rrn: &str) -> Result<Option<AuthorizationRow>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    &format!(
                        "SELECT {AUTH_COLUMNS} FROM card_authorizations WHERE card_id = $1 AND rrn = $2                          ORDER BY created_at DESC LIMIT 1"
                    ),
                    &[&uuid(card_id), &rrn],
                )
                .map_err(unavailable)?;
            row.map(|r| authorization_row(&r)).transpose()
        })
    }

    fn card_authorizations(&self, tenant_id: u128, card_id: u128, limit: usize) -> Result<Vec<AuthorizationRow>> {
        self.with(|c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {AUTH_COLUMNS} FROM card_authorizations WHERE card_id = $2 AND tenant_id = $1                          ORDER BY created_at DESC LIMIT $3"
                    ),
                    &[&uuid(tenant_id), &uuid(card_id), &(limit as i64)],
                )
                .map_err(unavailable)?;
            rows.iter().map(authorization_row).collect()
        })
    }

    fn card_message(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            let row =
                c.query_opt("SELECT response FROM card_messages WHERE key = $1", &[&&key[..]]).map_err(unavailable)?;
            row.map(|r| r.try_get(0).map_err(unavailable)).transpose()
        })
    }

    fn card_spent(
        &self,
        card_id: u128,
        day: Timestamp,
        month: Timestamp,
        minute: Timestamp,
        now: Timestamp,
    ) -> Result<(u64, u64, u32)> {
        self.with(|c| {
            // Less the holds that lapsed (the ledger released them), made since the month began.
            let r = c
                .query_one(
                    "SELECT COALESCE(SUM(CASE WHEN day >= $2 THEN spend END), 0)::bigint, COALESCE(SUM(spend), 0)::bigint, \
                     (SELECT COUNT(*) FROM (SELECT 1 FROM card_authorizations WHERE card_id = $1 AND created_at >= $4 \
                      LIMIT $5) AS recent), \
                     (SELECT COALESCE(SUM(CASE WHEN created_at >= $6 THEN spend END), 0)::bigint FROM card_authorizations \
                      WHERE card_id = $1 AND held_until > 0 AND held_until >= $7 AND held_until <= $8 AND created_at >= $7), \
                     (SELECT COALESCE(SUM(spend), 0)::bigint FROM card_authorizations \
                      WHERE card_id = $1 AND held_until > 0 AND held_until >= $7 AND held_until <= $8 AND created_at >= $7) \
                     FROM card_spend WHERE card_id = $1 AND day >= $3",
                    &[
                        &uuid(card_id),
                        &((day / DAY_NANOS) as i64),
                        &((month / DAY_NANOS) as i64),
                        &(minute as i64),
                        &RECENT_COUNT_MAX,
                        &(day as i64),
                        &(month as i64),
                        &(now as i64),
                    ],
                )
                .map_err(unavailable)?;
            let get = |i: usize| r.try_get::<_, i64>(i).map_err(unavailable);
            Ok(((get(0)? - get(3)?).max(0) as u64, (get(1)? - get(4)?).max(0) as u64, get(2)? as u32))
        })
    }

    fn holder(&self, tenant_id: u128, id: u128) -> Result<Option<HolderRecord>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    "SELECT kind, name_sealed, document_sealed, document_index, created_at FROM holders \
                     WHERE tenant_id = $1 AND id = $2",
                    &[&uuid(tenant_id), &uuid(id)],
                )
                .map_err(unavailable)?;
            row.map(|r| {
                Ok(HolderRecord {
                    tenant_id,
                    id,
                    kind: r.try_get(0).map_err(unavailable)?,
                    name_sealed: r.try_get(1).map_err(unavailable)?,
                    document_sealed: r.try_get(2).map_err(unavailable)?,
                    document_index: hash_of(r.try_get::<_, &[u8]>(3).map_err(unavailable)?)?,
                    created_at: r.try_get::<_, i64>(4).map_err(unavailable)? as u64,
                })
            })
            .transpose()
        })
    }

    fn audit_entries(&self, after: u64, limit: usize, tenant: Option<u128>) -> Result<Vec<audit::Entry>> {
        self.with(|c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {AUDIT_COLUMNS} FROM audit_entries \
                         WHERE seq > $1 AND ($3::uuid IS NULL OR tenant_id = $3) ORDER BY seq LIMIT $2"
                    ),
                    &[&(after as i64), &(limit as i64), &tenant.map(uuid)],
                )
                .map_err(unavailable)?;
            rows.iter().map(|r| Ok(audit_row(r)?.0)).collect()
        })
    }

    fn audit_head(&self) -> Result<Option<SignedHead>> {
        self.with(|c| {
            c.query_opt("SELECT size, time, root, signature FROM audit_heads ORDER BY size DESC LIMIT 1", &[])
                .map_err(unavailable)?
                .map(|r| head_row(&r))
                .transpose()
        })
    }

    fn audit_first_head(&self) -> Result<Option<SignedHead>> {
        self.with(|c| {
            c.query_opt("SELECT size, time, root, signature FROM audit_heads ORDER BY size ASC LIMIT 1", &[])
                .map_err(unavailable)?
                .map(|r| head_row(&r))
                .transpose()
        })
    }

    fn audit_node(&self, level: u8, index: u64) -> Result<Option<audit::Hash>> {
        self.with(|c| {
            let row = if level == 0 {
                c.query_opt("SELECT leaf_hash FROM audit_entries WHERE seq = $1", &[&(index as i64 + 1)])
            } else {
                c.query_opt(
                    "SELECT hash FROM audit_nodes WHERE last_leaf = $2 AND level = $1",
                    &[&i16::from(level), &(crate::audit_log::last_leaf(level, index) as i64)],
                )
            }
            .map_err(unavailable)?;
            row.map(|r| hash_of(r.try_get::<_, &[u8]>(0).map_err(unavailable)?)).transpose()
        })
    }

    fn audit_scan(&self, visit: &mut dyn FnMut(AuditItem) -> bool) -> Result<()> {
        self.with_once(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(::postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(unavailable)?;
            let entries = tx
                .prepare(&format!("SELECT {AUDIT_COLUMNS}, leaf_hash FROM audit_entries ORDER BY seq"))
                .map_err(unavailable)?;
            let heads =
                tx.prepare("SELECT size, time, root, signature FROM audit_heads ORDER BY size").map_err(unavailable)?;
            let entries = tx.bind(&entries, &[]).map_err(unavailable)?;
            let heads = tx.bind(&heads, &[]).map_err(unavailable)?;
            // Both streams read from one transaction, in portions; each keeps its own buffer.
            let tx = std::cell::RefCell::new(tx);
            let mut entry_buf = std::collections::VecDeque::new();
            let mut head_buf = std::collections::VecDeque::new();
            crate::audit_log::merge_scan(
                || {
                    if entry_buf.is_empty() {
                        for row in tx.borrow_mut().query_portal(&entries, 10_000).map_err(unavailable)? {
                            let (entry, leaf) = audit_row(&row)?;
                            let leaf =
                                leaf.ok_or_else(|| corrupt(format!("audit entry {} has no leaf hash", entry.seq)))?;
                            entry_buf.push_back((entry, leaf));
                        }
                    }
                    Ok(entry_buf.pop_front())
                },
                || {
                    if head_buf.is_empty() {
                        for row in tx.borrow_mut().query_portal(&heads, 10_000).map_err(unavailable)? {
                            head_buf.push_back(head_row(&row)?);
                        }
                    }
                    Ok(head_buf.pop_front())
                },
                visit,
            )?;
            let tx = tx.into_inner();
            tx.commit().map_err(unavailable)
        })
    }
}

const AUDIT_COLUMNS: &str = "seq, time, tenant_id, actor, action, resource, request_id, source, outcome";

fn hash_of(bytes: &[u8]) -> Result<audit::Hash> {
    bytes.try_into().map_err(|_| corrupt(format!("audit hash of {} bytes", bytes.len())))
}

fn audit_row(row: &Row) -> Result<(audit::Entry, Option<audit::Hash>)> {
    let seq: i64 = row.try_get(0).map_err(unavailable)?;
    let time: i64 = row.try_get(1).map_err(unavailable)?;
    let entry = audit::Entry {
        seq: u64::try_from(seq).map_err(|_| corrupt(format!("audit seq {seq}")))?,
        time: u64::try_from(time).map_err(|_| corrupt(format!("audit time {time}")))?,
        draft: audit::Draft {
            tenant: row.try_get::<_, Option<Uuid>>(2).map_err(unavailable)?.map(|u| u.as_u128()),
            actor: row.try_get(3).map_err(unavailable)?,
            action: row.try_get(4).map_err(unavailable)?,
            resource: row.try_get(5).map_err(unavailable)?,
            request_id: row.try_get(6).map_err(unavailable)?,
            source: row.try_get(7).map_err(unavailable)?,
            outcome: row.try_get(8).map_err(unavailable)?,
        },
    };
    let leaf = if row.len() > 9 { Some(hash_of(row.try_get::<_, &[u8]>(9).map_err(unavailable)?)?) } else { None };
    Ok((entry, leaf))
}

/// What a batch reads under its lock: the ledger clock, the audit edge, the count of commits, the
/// earliest hold's expiry and the newest signed head.
type LockRead = (u64, audit::Frontier, i64, Option<Timestamp>, Option<SignedHead>);

/// A signed head from a simple query's row (text: numbers in decimal, bytea as `\x` and hex).
fn text_head_row(row: &::postgres::SimpleQueryRow) -> Result<SignedHead> {
    let number = |i: usize| -> Result<u64> {
        row.get(i).and_then(|t| t.parse::<u64>().ok()).ok_or_else(|| corrupt(format!("audit head column {i}")))
    };
    let bytes = |i: usize| -> Result<Vec<u8>> {
        row.get(i)
            .and_then(|t| t.strip_prefix("\\x"))
            .and_then(audit::unhex)
            .ok_or_else(|| corrupt(format!("audit head column {i} is not hex bytea")))
    };
    Ok(SignedHead {
        head: audit::TreeHead { size: number(0)?, time: number(1)?, root: hash_of(&bytes(2)?)? },
        signature: bytes(3)?,
    })
}

fn head_row(row: &Row) -> Result<SignedHead> {
    let size: i64 = row.try_get(0).map_err(unavailable)?;
    let time: i64 = row.try_get(1).map_err(unavailable)?;
    Ok(SignedHead {
        head: audit::TreeHead {
            size: u64::try_from(size).map_err(|_| corrupt(format!("audit head size {size}")))?,
            time: u64::try_from(time).map_err(|_| corrupt(format!("audit head time {time}")))?,
            root: hash_of(row.try_get::<_, &[u8]>(2).map_err(unavailable)?)?,
        },
        signature: row.try_get(3).map_err(unavailable)?,
    })
}

#[cfg(test)]
mod tests {
    /// The lines of an `EXPLAIN`'s plan.
    fn plan_lines(client: &mut ::postgres::Client, explain: &str) -> Vec<String> {
        client
            .simple_query(explain)
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                ::postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect()
    }

    /// As SQLite's: spending counters named by a holder alone move to names of the tenant and
    /// the holder (migration 11; see `testing::spend_counters`).
    #[test]
    fn version_10_spend_counters_move_to_their_tenants_names() {
        use crate::testing::spend_counters;
        let url = crate::testing::fresh_postgres_database();
        {
            let mut client = super::connect(&url).unwrap();
            assert_eq!(
                super::apply_migrations(&mut client, &super::POSTGRES[..10]).unwrap(),
                (1..=10).collect::<Vec<_>>()
            );
            for (i, (tenant, holder)) in spend_counters::holders().into_iter().enumerate() {
                client
                    .execute(
                        "INSERT INTO holders (tenant_id, id, kind, name_sealed, document_sealed, document_index, created_at) \
                         VALUES ($1, $2, 'person', '\\x00', '\\x00', $3, 1)",
                        &[&super::uuid(tenant), &super::uuid(holder), &vec![i as u8]],
                    )
                    .unwrap();
            }
            for (scope, period, total) in spend_counters::old_counters() {
                client
                    .execute(
                        "INSERT INTO counters (scope, period, total) VALUES ($1, $2, $3)",
                        &[&scope, &period, &total],
                    )
                    .unwrap();
            }
        }
        let store = crate::Store::open(&crate::Location::Postgres(url.clone())).unwrap();
        spend_counters::check(store.queries.as_ref());
        store.close();
    }

    /// As SQLite's: authorizations stored before migration 12 take their hold's lapse (see
    /// `testing::lapsing_holds`).
    #[test]
    fn version_11_authorizations_take_their_holds_lapse() {
        use crate::testing::lapsing_holds;
        let url = crate::testing::fresh_postgres_database();
        let mut client = super::connect(&url).unwrap();
        assert_eq!(super::apply_migrations(&mut client, &super::POSTGRES[..11]).unwrap(), (1..=11).collect::<Vec<_>>());
        for (i, (tenant, id, expires_at)) in lapsing_holds::holds().into_iter().enumerate() {
            client
                .execute(
                    "INSERT INTO transfers (tenant_id, id, timestamp, result, kind, amount_defaulted, timeout_seconds, \
                     expires_at, code, state) VALUES ($1, $2, $3, 0, 0, false, 1, $4, 1, 1)",
                    &[&super::uuid(tenant), &super::uuid(id), &(i as i64 + 1), &expires_at],
                )
                .unwrap();
        }
        for (id, body, _) in lapsing_holds::authorizations() {
            client
                .execute(
                    "INSERT INTO card_authorizations (tenant_id, id, card_id, rrn, created_at, spend, body) \
                     VALUES ($1, $2, $3, 'r', 1, 1, $4)",
                    &[&super::uuid(lapsing_holds::TENANT), &super::uuid(id), &super::uuid(9), &body],
                )
                .unwrap();
        }
        // The commands beside the servers ask for a migrated database.
        let refused = crate::Store::open_queries(&crate::Location::Postgres(url.clone())).err().unwrap();
        assert!(refused.to_string().contains("run `rtpay migrate` first"), "{refused}");
        crate::Store::open(&crate::Location::Postgres(url.clone())).unwrap().close();
        crate::Store::open_queries(&crate::Location::Postgres(url.clone())).unwrap();
        for (id, body, held_until) in lapsing_holds::authorizations() {
            let stored: i64 = client
                .query_one("SELECT held_until FROM card_authorizations WHERE id = $1", &[&super::uuid(id)])
                .unwrap()
                .get(0);
            assert_eq!(stored, held_until, "{body}");
        }
    }

    /// A node whose database a newer rtpay migrated writes nothing and is not ready, until the
    /// newer version is gone (here: its row).
    #[test]
    fn a_node_behind_the_schema_refuses_writes_and_is_not_ready() {
        let url = crate::testing::fresh_postgres_database();
        let store = crate::Store::open(&crate::Location::Postgres(url.clone())).unwrap();
        let mut client = super::connect(&url).unwrap();
        let future = super::POSTGRES.last().unwrap().version as i32 + 1;
        client
            .execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, 'future', 0)", &[&future])
            .unwrap();
        let ping = store.queries.ping();
        assert!(matches!(&ping, Err(crate::StoreError::Unavailable(why)) if why.contains("newer")), "{ping:?}");
        let draft = || audit::Draft {
            tenant: None,
            actor: "operator".into(),
            action: "test".into(),
            resource: String::new(),
            request_id: String::new(),
            source: "test".into(),
            outcome: "200".into(),
        };
        let write = store.engine.execute(crate::Command::Audit(vec![draft()]));
        assert!(matches!(&write, Err(crate::StoreError::Unavailable(why)) if why.contains("newer")), "{write:?}");
        client.execute("DELETE FROM schema_migrations WHERE version = $1", &[&future]).unwrap();
        store.queries.ping().unwrap();
        store.engine.execute(crate::Command::Audit(vec![draft()])).unwrap();
        store.close();
    }

    /// The writer's session plans each statement once, and on empty tables still plans look-ups by
    /// key: the plan cached at the start stays right as the tables grow.
    #[test]
    fn the_writer_plans_index_lookups_on_empty_tables() {
        let url = crate::testing::fresh_postgres_database();
        super::migrate_only(&url).unwrap();
        let mut conn = super::Conn::open(&url).unwrap();
        let plan = |client: &mut ::postgres::Client| -> String {
            let sql = super::load_transfers_sql();
            client.batch_execute(&format!("DEALLOCATE ALL; PREPARE p(uuid[], uuid[]) AS {sql}")).unwrap();
            plan_lines(client, "EXPLAIN EXECUTE p(ARRAY[gen_random_uuid()], ARRAY[gen_random_uuid()])").join("\n")
        };
        let writer_plan = plan(&mut conn.client);
        assert!(writer_plan.contains("Index Scan using transfers_pkey"), "{writer_plan}");
        assert!(!writer_plan.contains("Seq Scan"), "{writer_plan}");
        // The same statement on a session with the server's defaults scans the empty table: the
        // settings are what makes the difference.
        let mut plain = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        plain.batch_execute("SET plan_cache_mode = force_generic_plan").unwrap();
        let default_plan = plan(&mut plain);
        assert!(default_plan.contains("Seq Scan on transfers"), "{default_plan}");
    }

    /// Every session commits durably and gives up a stalled transaction, whatever the database's
    /// defaults say.
    #[test]
    fn sessions_commit_durably_and_end_stalled_transactions() {
        let url = crate::testing::fresh_postgres_database();
        let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        let database: String = admin.query_one("SELECT current_database()", &[]).unwrap().get(0);
        admin
            .batch_execute(&format!(
                "ALTER DATABASE \"{database}\" SET synchronous_commit = off; \
                 ALTER DATABASE \"{database}\" SET idle_in_transaction_session_timeout = 0"
            ))
            .unwrap();
        let setting = |client: &mut ::postgres::Client, name: &str| -> String {
            client.query_one(&format!("SHOW {name}"), &[]).unwrap().get(0)
        };
        let mut plain = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        assert_eq!(setting(&mut plain, "synchronous_commit"), "off", "the database's default");
        let mut ours = super::connect(&url).unwrap();
        assert_eq!(setting(&mut ours, "synchronous_commit"), "on");
        assert_eq!(setting(&mut ours, "idle_in_transaction_session_timeout"), "30s");
        assert_eq!(setting(&mut ours, "transaction_isolation"), "read committed");
        // A stricter setting is kept.
        admin.batch_execute(&format!("ALTER DATABASE \"{database}\" SET synchronous_commit = remote_apply")).unwrap();
        let mut ours = super::connect(&url).unwrap();
        assert_eq!(setting(&mut ours, "synchronous_commit"), "remote_apply");
    }

    /// An owner's documents can be listed in the owner index's order, without a sort (on empty
    /// tables the planner prefers a scan, so scans are switched off to ask what the index allows).
    #[test]
    fn an_owners_documents_are_listed_in_index_order() {
        let url = crate::testing::fresh_postgres_database();
        super::migrate_only(&url).unwrap();
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        client
            .batch_execute(&format!(
                "SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan; \
                 PREPARE p(text, text, bigint) AS SELECT {columns} {}; \
                 PREPARE q(text, text, bigint, bigint, text, uuid) AS SELECT {columns} {}",
                super::BY_OWNER,
                super::BY_OWNER_AFTER,
                columns = super::DOCUMENT_COLUMNS,
            ))
            .unwrap();
        for explain in [
            "EXPLAIN EXECUTE p('pix-payment', 'in-flight', 100)",
            "EXPLAIN EXECUTE q('pix-payment', 'in-flight', 100, 1, 'a', '00000000-0000-0000-0000-000000000007')",
        ] {
            let plan = plan_lines(&mut client, explain);
            assert!(plan.iter().any(|step| step.contains("Index Scan using documents_by_owner")), "{plan:?}");
            assert!(!plan.iter().any(|step| step.contains("Sort")), "no sort: {plan:?}");
        }
    }
}
