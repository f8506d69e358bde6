//! The embedded engine: SQLite in WAL mode with `synchronous=FULL`, in a data directory.
//!
//! The writer owns one connection and keeps the accounts it read or wrote lately in memory (at
//! most `--account-cache` at the start of a batch; none are read at start). Other accounts, and
//! transfers, are read from the database when a batch names them. Readers use their own
//! connections and see only committed data.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use ledger::*;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::durable::Durability;
use crate::generations::Generations;
use crate::migrations::{Migration, SQLITE};

use crate::rows::{u128_of, uuid_bytes, AccountRow, EntryRow, ACCOUNT_COLUMNS, ENTRY_COLUMNS};
use crate::sqlite_stmt::{self, Statements, Value};
use crate::*;

pub(crate) const DB_FILE: &str = "rtpay.db";

/// Page cache per connection, in KiB (negative = KiB in SQLite's `cache_size`).
const CACHE_KIB: i64 = 64 * 1024;
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 128;

/// Reader connections kept open for reuse; more readers at once wait for one (up to
/// `READER_WAIT`, then open a connection of their own), since a connection opened per read pays
/// the open, the pragmas and a cold page cache each time.
const READERS_MAX: usize = 8;
const READER_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// A value for a transfer's debit and credit account: their numbers, or their previous links.
type Pair = [Option<i64>; 2];

/// The most broken listing links `rtpay verify` reports.
const LISTING_VIOLATIONS_MAX: usize = 100;

/// Finds a transfer by id through the id index (two tenants may use one id).
const BY_ID: &str = "id = ?1 AND tenant_id = ?2";

fn by_id(key: &TransferKey) -> ([u8; 16], [u8; 16]) {
    (uuid_bytes(key.id.0), uuid_bytes(key.tenant.0))
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

fn corrupt(e: String) -> StoreError {
    StoreError::Corrupt(e)
}

fn connect(path: &Path) -> Result<Connection> {
    crate::sqlite_pcache::install();
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if crate::sqlite_wal::install() {
        Connection::open_with_flags_and_vfs(path, flags, crate::sqlite_wal::VFS_NAME)
    } else {
        Connection::open_with_flags(path, flags)
    }
    .map_err(unavailable)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(unavailable)?;
    // rusqlite keeps 16 prepared statements by default; the writer's batch alone runs more than
    // that, and an evicted one is parsed and planned again on its next use.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -{CACHE_KIB}; \
         PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(unavailable)?;
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).map_err(unavailable)?;
    if mode != "wal" {
        return Err(StoreError::Unavailable(format!("sqlite refused WAL mode (got {mode})")));
    }
    // Every commit syncs the WAL: what is acknowledged is durable, and `sqlite_wal` writes its
    // gathered frames at that sync, before any other connection can see them committed.
    let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).map_err(unavailable)?;
    assert_eq!(synchronous, 2, "every connection commits with synchronous = FULL");
    // No connection checkpoints after its own commits: the writer's WAL is mostly past SQLite's
    // default 1,000 pages, so every write through `Queries` (a document, a card, a tenant) ran a
    // checkpoint of its own, fsyncs included, on the request's thread, beside the server's
    // checkpointer (see `Checkpointer`). A process without one (the command line) leaves what it
    // wrote to SQLite's checkpoint when its last connection closes, or to the next server's.
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0;").map_err(unavailable)?;
    Ok(conn)
}

fn apply_migrations(conn: &mut Connection, migrations: &[Migration]) -> Result<Vec<u32>> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .map_err(unavailable)?;
    refuse_newer_schema(conn, migrations)?;
    let mut applied = Vec::new();
    for m in migrations {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(unavailable)?;
        let done: Option<u32> = tx
            .query_row("SELECT version FROM schema_migrations WHERE version = ?1", [m.version], |r| r.get(0))
            .optional()
            .map_err(unavailable)?;
        if done.is_none() {
            tx.execute_batch(m.sql).map_err(unavailable)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                params![m.version, m.name, now_nanos() as i64],
            )
            .map_err(unavailable)?;
            applied.push(m.version);
        }
        tx.commit().map_err(unavailable)?;
    }
    Ok(applied)
}

/// Refuses a database written by a later rtpay (see `migrations::refuse_newer`).
fn refuse_newer_schema(conn: &Connection, migrations: &[Migration]) -> Result<()> {
    crate::migrations::refuse_newer(schema_version(conn)?, migrations)
}

/// Refuses a database at another version than this rtpay's, newer or not yet migrated (see
/// `migrations::refuse_other`): for the commands that work beside the servers.
fn refuse_other_schema(conn: &Connection) -> Result<()> {
    crate::migrations::refuse_other(schema_version(conn)?, SQLITE)
}

fn schema_version(conn: &Connection) -> Result<Option<u32>> {
    conn.query_row("SELECT max(version) FROM schema_migrations", [], |r| r.get(0)).map_err(unavailable)
}

fn db_path(dir: &Path) -> Result<PathBuf> {
    // A directory made here is its owner's only: the ledger (balances, metadata) is in it.
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::Unavailable(format!("cannot create data directory {}: {e}", dir.display())))?;
    Ok(dir.join(DB_FILE))
}

pub(crate) fn migrate_only(dir: &Path) -> Result<Vec<u32>> {
    let path = db_path(dir)?;
    // Not beside a running server: its writer keeps account numbers, listing heads and accounts
    // in memory, which a migration could change under it.
    let _lock = lock_dir(dir)?;
    let mut conn = connect(&path)?;
    apply_migrations(&mut conn, SQLITE)
}

pub(crate) fn open_queries(dir: &Path) -> Result<Arc<dyn Queries>> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Err(StoreError::Unavailable(format!("no rtpay data in {}", dir.display())));
    }
    refuse_other_schema(&connect(&path)?)?;
    // No writer of this process commits: nothing to wait for. (A server's commits are visible
    // to other processes once written, before its syncer makes them durable: a report read
    // beside a running server may hold its last milliseconds, which a crash could still undo.)
    Ok(Arc::new(SqliteQueries::new(path, None)))
}

/// Takes the data directory's lock: one writer process per directory, or the in-memory account
/// state of one would silently go stale under the other's writes.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "another rtpay process is using {}; one process per data directory",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Unavailable(format!("cannot lock {}: {e}", path.display())))
        }
    }
}

/// The ledger clock and the audit tree's right edge, as committed.
fn read_meta(conn: &Connection) -> Result<(Clock, audit::Frontier)> {
    let (last, frontier): (i64, Option<Vec<u8>>) = conn
        .query_row("SELECT last_timestamp, audit_frontier FROM ledger_meta WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(unavailable)?;
    let frontier = frontier.map(|f| audit::Frontier::decode(&f).map_err(corrupt)).transpose()?.unwrap_or_default();
    Ok((Clock { last: u64::try_from(last).map_err(|_| corrupt("negative clock".into()))? }, frontier))
}

/// The newest signed tree head, on the writer's connection.
fn newest_head(conn: &Connection) -> Result<Option<SignedHead>> {
    let mut stmt = conn
        .prepare_cached("SELECT size, time, root, signature FROM audit_heads ORDER BY size DESC LIMIT 1")
        .map_err(unavailable)?;
    let mut rows = stmt.query([]).map_err(unavailable)?;
    rows.next().map_err(unavailable)?.map(head_row).transpose()
}

/// Changes whenever another connection commits (never for this connection's own commits).
fn data_version(conn: &Connection) -> Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(unavailable)
}

/// Appends audit entries from beside a running writer (`rtpay keys rotate` on the command
/// line): under SQLite's write lock, after the committed clock and audit edge. The writer sees
/// the commit through `PRAGMA data_version` and reads both again before its next batch. Only
/// the clock and the audit tables are touched, which the writer does not otherwise cache.
pub(crate) fn append_audit_beside(
    dir: &Path,
    signer: &audit::Signer,
    drafts: Vec<audit::Draft>,
    now: Timestamp,
) -> Result<()> {
    let conn = connect(&db_path(dir)?)?;
    // Declared after `conn`: finalized before it closes.
    let mut statements = Statements::default();
    conn.execute_batch("BEGIN IMMEDIATE").map_err(unavailable)?;
    let result = (|| {
        refuse_other_schema(&conn)?;
        let (clock, frontier) = read_meta(&conn)?;
        crate::audit_log::check_edge(&frontier, newest_head(&conn)?.as_ref(), signer)?;
        let mut time = clock.last;
        let timed: Vec<(Timestamp, audit::Draft)> = drafts
            .into_iter()
            .map(|d| {
                time = now.max(time + 1);
                (time, d)
            })
            .collect();
        write_audit(&conn, &mut statements, &frontier, &timed, signer)?;
        conn.execute("UPDATE ledger_meta SET last_timestamp = ?1 WHERE id = 1", [time as i64]).map_err(unavailable)?;
        conn.execute_batch("COMMIT").map_err(unavailable)
    })();
    if result.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

pub(crate) fn open(dir: &Path, signer: Arc<audit::Signer>) -> Result<(Box<dyn Writer>, Arc<dyn Queries>)> {
    let (writer, queries) = open_writer(dir, signer, account_cache_max())?;
    Ok((Box::new(writer), Arc::new(queries)))
}

/// [`open`], with the writer as it is and its account cache's bound.
fn open_writer(
    dir: &Path,
    signer: Arc<audit::Signer>,
    account_cache_max: usize,
) -> Result<(SqliteWriter, SqliteQueries)> {
    let path = db_path(dir)?;
    let lock = lock_dir(dir)?;
    let mut conn = connect(&path)?;
    apply_migrations(&mut conn, SQLITE)?;
    let (clock, frontier) = read_meta(&conn)?;
    let trusted_edge = crate::audit_log::check_edge(&frontier, newest_head(&conn)?.as_ref(), &signer)?;
    let data_version = data_version(&conn)?;
    // Accounts are read as batches name them (`load_accounts`), not all at start: a restart
    // reads no more with a million accounts than with ten.
    let next_no: i64 =
        conn.query_row("SELECT coalesce(max(no), 0) + 1 FROM accounts", [], |r| r.get(0)).map_err(unavailable)?;
    let id_max: Option<Vec<u8>> =
        conn.query_row("SELECT max(id) FROM transfers", [], |r| r.get(0)).map_err(unavailable)?;
    let id_max = id_max.map(|id| u128_of(&id)).transpose().map_err(corrupt)?;
    // The writer never checkpoints itself: see `Checkpointer` and `Gate`.
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 268435456;").map_err(unavailable)?;
    let checkpointer = Checkpointer::start(path.clone())?;
    let durability = Arc::new(Durability::default());
    let writer = SqliteWriter {
        statements: Statements::default(),
        conn,
        accounts: Generations::default(),
        account_cache_max,
        batch_heads: Map::default(),
        id_max,
        batch_id_max: None,
        next_no,
        assigned: Map::default(),
        clock,
        data_version,
        in_tx: false,
        signer,
        frontier,
        trusted_edge,
        pending_frontier: None,
        checkpointer,
        wal: wal_path(&path),
        durability: durability.clone(),
        sync_owed: false,
        _lock: lock,
    };
    let queries = SqliteQueries::new(path, Some(durability));
    Ok((writer, queries))
}

fn account_row(row: &rusqlite::Row<'_>) -> Result<AccountRow> {
    let get_id = |i: usize| -> Result<u128> {
        let bytes: Vec<u8> = row.get(i).map_err(unavailable)?;
        u128_of(&bytes).map_err(corrupt)
    };
    Ok(AccountRow {
        tenant_id: get_id(0)?,
        id: get_id(1)?,
        currency: row.get(2).map_err(unavailable)?,
        code: row.get(3).map_err(unavailable)?,
        flags: row.get(4).map_err(unavailable)?,
        credit_limit: row.get(5).map_err(unavailable)?,
        metadata: row.get(6).map_err(unavailable)?,
        timestamp: row.get(7).map_err(unavailable)?,
        debits_posted: row.get(8).map_err(unavailable)?,
        credits_posted: row.get(9).map_err(unavailable)?,
        debits_pending: row.get(10).map_err(unavailable)?,
        credits_pending: row.get(11).map_err(unavailable)?,
        holder_id: row
            .get::<_, Option<Vec<u8>>>(12)
            .map_err(unavailable)?
            .map(|b| u128_of(&b))
            .transpose()
            .map_err(corrupt)?,
    })
}

fn entry_row(row: &rusqlite::Row<'_>) -> Result<EntryRow<'static>> {
    let id = |i: usize| -> Result<u128> {
        let bytes: Vec<u8> = row.get(i).map_err(unavailable)?;
        u128_of(&bytes).map_err(corrupt)
    };
    let opt_id = |i: usize| -> Result<Option<u128>> {
        let bytes: Option<Vec<u8>> = row.get(i).map_err(unavailable)?;
        bytes.map(|b| u128_of(&b).map_err(corrupt)).transpose()
    };
    Ok(EntryRow {
        timestamp: row.get(0).map_err(unavailable)?,
        tenant_id: id(1)?,
        id: id(2)?,
        result: row.get(3).map_err(unavailable)?,
        kind: row.get(4).map_err(unavailable)?,
        debit_account_id: opt_id(5)?,
        credit_account_id: opt_id(6)?,
        amount: row.get(7).map_err(unavailable)?,
        currency: row.get::<_, Option<String>>(8).map_err(unavailable)?.map(Cow::Owned),
        pending_id: opt_id(9)?,
        amount_defaulted: row.get(10).map_err(unavailable)?,
        timeout_seconds: row.get(11).map_err(unavailable)?,
        expires_at: row.get(12).map_err(unavailable)?,
        code: row.get(13).map_err(unavailable)?,
        metadata: row.get::<_, Option<String>>(14).map_err(unavailable)?.map(Cow::Owned),
        state: row.get(15).map_err(unavailable)?,
    })
}

/// An account as committed, with what the writer adds to its row.
struct Stored {
    account: Account,
    /// Its internal number (`accounts.no`).
    no: i64,
    /// Its newest listed transfer (`accounts.head`): where the next one links to.
    head: Option<i64>,
}

struct SqliteWriter {
    /// The batch's statements, prepared once. Declared before `conn`: finalized before it closes.
    statements: Statements,
    conn: Connection,
    /// Accounts read or written lately, as committed: updated only after a commit succeeds, and
    /// bounded by `account_cache_max` at the start of a batch (those no batch named in the last
    /// two generations are forgotten). A batch reads the accounts it names that are not here
    /// (`load_accounts`), so every account its changes name is here or new to storage.
    accounts: Generations<AccountKey, Stored>,
    account_cache_max: usize,
    /// Heads moved by the open batch, and whether the batch's account writes wrote them; kept
    /// only if it commits.
    batch_heads: Map<AccountKey, (i64, bool)>,
    /// The greatest transfer id stored, of any tenant, as committed: an id above it cannot be
    /// stored, so its look-up is skipped (with time-ordered ids, every new id's). Exact, because
    /// this writer is the only one that inserts transfers into its data directory.
    id_max: Option<u128>,
    /// The greatest id the open batch inserts; kept only if it commits.
    batch_id_max: Option<u128>,
    next_no: i64,
    /// Numbers given to accounts created in the open batch; kept only if it commits.
    assigned: Map<AccountKey, i64>,
    clock: Clock,
    /// `PRAGMA data_version` after this writer's last look: another value means another
    /// connection committed (an audit entry from the command line), so the clock and the audit
    /// edge are read again.
    data_version: i64,
    in_tx: bool,
    signer: Arc<audit::Signer>,
    /// The audit tree's right edge, as committed.
    frontier: audit::Frontier,
    /// The last edge this writer wrote or held to its signed head (see `check_edge`).
    trusted_edge: crate::audit_log::Edge,
    /// The edge after the open batch's entries; kept only if it commits.
    pending_frontier: Option<audit::Frontier>,
    checkpointer: Checkpointer,
    /// The WAL file, which the syncer syncs: the writer's `COMMIT` leaves that to it.
    wal: PathBuf,
    durability: Arc<Durability>,
    /// A commit was attempted since the engine last asked.
    sync_owed: bool,
    /// Held for the writer's life; released when the process ends, however it ends.
    _lock: std::fs::File,
}

/// WAL length (in 4 KiB frames: 256 MiB) past which the checkpointer makes the WAL start over.
/// Each start-over holds the writer for a moment: rare is better, and the disk space is cheap.
const WAL_FRAMES_MAX: i64 = 64 * 1024;

/// Before holding the writer, the checkpointer catches up to within this many frames...
const CATCH_UP_FRAMES: i64 = 256;
/// ...trying at most this many passes.
const CATCH_UP_PASSES_MAX: usize = 50;

/// How often the background thread checkpoints the WAL: often, so that each pass has few pages
/// to trickle to the disk (see `sqlite_wal::trickle`). In the card benchmark, 25 ms against
/// 100 ms took the authorization p99 from 2.2 to 1.7–1.9 ms.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(25);

/// The longest the checkpointer waits for the writer to reach the gate (an idle writer never does,
/// and then needs no holding).
const QUIESCE_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(250);
/// The longest the writer is held: only a checkpointer that died mid-pass could make it this long.
/// A writer that outpaces the checkpointer is held as long as the copy takes: that back-pressure is
/// what bounds the WAL.
const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Where the writer and the checkpointer meet. The WAL can only start over once a checkpoint has
/// copied every frame, which never happens while the writer keeps appending; so, when the WAL is
/// long, the checkpointer asks the writer to hold its next batch for the moment it takes to copy
/// the last few frames (it copied the rest already, in the background).
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    quiesce: bool,
    writer_waiting: bool,
}

impl Gate {
    /// Called by the writer before each batch.
    fn pass(&self) {
        let mut state = self.state.lock().expect("gate lock");
        if !state.quiesce {
            return;
        }
        state.writer_waiting = true;
        self.changed.notify_all();
        let (mut state, _) = self.changed.wait_timeout_while(state, HOLD_MAX, |s| s.quiesce).expect("gate lock");
        state.writer_waiting = false;
    }

    /// Called by the checkpointer: holds the writer between batches while `f` runs.
    fn quiesced(&self, f: impl FnOnce()) {
        let mut state = self.state.lock().expect("gate lock");
        state.quiesce = true;
        let (state, timeout) =
            self.changed.wait_timeout_while(state, QUIESCE_WAIT_MAX, |s| !s.writer_waiting).expect("gate lock");
        drop(state);
        if !timeout.timed_out() {
            f();
        }
        self.state.lock().expect("gate lock").quiesce = false;
        self.changed.notify_all();
    }
}

/// Copies committed WAL frames into the database file, off the writer's path. Stops when dropped.
struct Checkpointer {
    gate: Arc<Gate>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: PathBuf) -> Result<Checkpointer> {
        let conn = connect(&path)?;
        let gate = Arc::new(Gate::default());
        let thread_gate = gate.clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        // PASSIVE never blocks the writer; frames it could not copy are taken next time. Returns
        // (frames in the WAL, frames not yet copied).
        let checkpoint = move |conn: &Connection| -> Option<(i64, i64)> {
            match conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
            {
                Ok((log, copied)) => Some((log, log - copied)),
                Err(e) => {
                    tracing::warn!(error = %e, "wal checkpoint failed");
                    None
                }
            }
        };
        // The checkpoints' copies are handed to the disk as they are made (see
        // `sqlite_wal::trickle`); write-back is per file, so this descriptor (the thread's for its
        // life) serves for all. It is never closed: closing any descriptor of a file releases
        // every POSIX lock the process holds on it, SQLite's connections' included (SQLite's
        // own descriptors defer their closes for this reason), so the readers still running at
        // shutdown would lose theirs. One descriptor per store opened.
        let file = std::mem::ManuallyDrop::new(
            std::fs::File::open(&path)
                .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?,
        );
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*file);
        let trickle = move |pace: bool| crate::sqlite_wal::trickle(fd, pace);
        let thread = std::thread::Builder::new()
            .name("rtpay-checkpoint".into())
            .spawn(move || loop {
                match stopped.recv_timeout(CHECKPOINT_INTERVAL) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let paced = trickle(true);
                let Some((log, _)) = checkpoint(&conn) else { continue };
                if log <= WAL_FRAMES_MAX {
                    continue;
                }
                // Catch up as close as the running writer allows, so that the pass made with
                // the writer held has only a few frames left to copy.
                for _ in 0..CATCH_UP_PASSES_MAX {
                    match checkpoint(&conn) {
                        Some((_, behind)) if behind > CATCH_UP_FRAMES => {}
                        _ => break,
                    }
                }
                // Flush what the passes copied now, so that the pass below, which must sync the
                // database file before the WAL may start over, has little left to flush.
                if let Err(e) = file.sync_data() {
                    tracing::warn!(error = %e, "syncing the database file failed");
                }
                // With the writer held, this pass copies the last frames; the writer's next batch
                // then writes the WAL from its start.
                drop(paced);
                thread_gate.quiesced(|| {
                    let _unpaced = trickle(false);
                    let _ = checkpoint(&conn);
                });
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { gate, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Writer for SqliteWriter {
    fn begin(&mut self) -> Result<Clock> {
        assert!(!self.in_tx, "one batch at a time");
        self.checkpointer.gate.pass();
        // Only between batches: within one, `write` needs every account the batch read.
        self.accounts.bound(self.account_cache_max);
        // Prepared once, like the batch's other statements (`execute_batch` parses every time).
        self.statements.get(&self.conn, "BEGIN IMMEDIATE").and_then(|s| s.execute(&[])).map_err(unavailable)?;
        self.in_tx = true;
        let version = data_version(&self.conn)?;
        if version != self.data_version {
            let (clock, frontier) = read_meta(&self.conn)?;
            if crate::audit_log::edge_of(&frontier) != self.trusted_edge {
                let newest = newest_head(&self.conn)?;
                self.trusted_edge = crate::audit_log::check_edge(&frontier, newest.as_ref(), &self.signer)?;
            }
            self.clock.last = self.clock.last.max(clock.last);
            self.frontier = frontier;
            self.data_version = version;
        }
        Ok(self.clock)
    }

    fn document_version(&mut self, kind: &str, tenant_id: u128, id: &str) -> Result<u64> {
        let version: Option<i64> = self
            .conn
            .prepare_cached("SELECT version FROM documents WHERE kind = ?1 AND tenant_id = ?2 AND id = ?3")
            .map_err(unavailable)?
            .query_row(params![kind, uuid_bytes(tenant_id), id], |r| r.get(0))
            .optional()
            .map_err(unavailable)?;
        Ok(version.unwrap_or(0) as u64)
    }

    fn counter_total(&mut self, scope: &str, period: u64) -> Result<i64> {
        let total: Option<i64> = self
            .conn
            .prepare_cached("SELECT total FROM counters WHERE scope = ?1 AND period = ?2")
            .map_err(unavailable)?
            .query_row(params![scope, period as i64], |r| r.get(0))
            .optional()
            .map_err(unavailable)?;
        Ok(total.unwrap_or(0))
    }

    fn authorization_body(&mut self, tenant_id: u128, id: u128) -> Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT body FROM card_authorizations WHERE tenant_id = ?1 AND id = ?2")
            .map_err(unavailable)?
            .query_row(params![uuid_bytes(tenant_id), uuid_bytes(id)], |r| r.get(0))
            .optional()
            .map_err(unavailable)
    }

    fn load_transfers(&mut self, keys: &[TransferKey], into: &mut MemoryLedger) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {ENTRY_COLUMNS} FROM transfers WHERE {BY_ID}"))
            .map_err(unavailable)?;
        // In id order, so consecutive look-ups walk neighbouring index pages; none above the
        // greatest id stored.
        let Some(id_max) = self.id_max else { return Ok(()) };
        let mut ordered: Vec<&TransferKey> = keys.iter().filter(|k| k.id.0 <= id_max).collect();
        ordered.sort_unstable_by_key(|k| k.id.0);
        for key in ordered {
            let mut rows = stmt.query(by_id(key)).map_err(unavailable)?;
            if let Some(row) = rows.next().map_err(unavailable)? {
                let entry = entry_row(row)?.into_entry().map_err(corrupt)?;
                into.transfers.insert(*key, entry);
            }
        }
        Ok(())
    }

    fn load_accounts(&mut self, keys: &[AccountKey], into: &mut MemoryLedger) -> Result<()> {
        for key in keys {
            if into.accounts.contains_key(key) {
                continue;
            }
            if !self.accounts.touch(key) {
                static READ: LazyLock<String> = LazyLock::new(|| {
                    format!("SELECT {ACCOUNT_COLUMNS}, no, head FROM accounts WHERE tenant_id = ?1 AND id = ?2")
                });
                let mut stmt = self.conn.prepare_cached(&READ).map_err(unavailable)?;
                let mut rows =
                    stmt.query(params![uuid_bytes(key.tenant.0), uuid_bytes(key.id.0)]).map_err(unavailable)?;
                // An account not stored is left out, as the ledger expects of an unknown one.
                let Some(row) = rows.next().map_err(unavailable)? else { continue };
                let account = account_row(row)?.into_account().map_err(corrupt)?;
                let stored =
                    Stored { account, no: row.get(13).map_err(unavailable)?, head: row.get(14).map_err(unavailable)? };
                // Read inside the batch's transaction, before it writes: as committed.
                self.accounts.insert(*key, stored);
            }
            if let Some(stored) = self.accounts.get(key) {
                into.accounts.insert(*key, stored.account.clone());
            }
        }
        Ok(())
    }

    fn due_pendings(&mut self, now: Timestamp, limit: usize) -> Result<Vec<TransferKey>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT tenant_id, id FROM transfers WHERE state = 1 AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2",
            )
            .map_err(unavailable)?;
        let mut rows = stmt.query(params![now as i64, limit as i64]).map_err(unavailable)?;
        let mut keys = Vec::new();
        while let Some(row) = rows.next().map_err(unavailable)? {
            let tenant: Vec<u8> = row.get(0).map_err(unavailable)?;
            let id: Vec<u8> = row.get(1).map_err(unavailable)?;
            keys.push(TransferKey {
                tenant: TenantId(u128_of(&tenant).map_err(corrupt)?),
                id: TransferId(u128_of(&id).map_err(corrupt)?),
            });
        }
        Ok(keys)
    }

    fn earliest_due(&mut self) -> Result<Option<Timestamp>> {
        // The partial index `transfers_due` answers it from its first entry that is not null. A
        // value that is no timestamp (edited storage) reads as due: the sweep then finds what it
        // cannot read and leaves it out (see `engine::sweep_due`).
        let due: Option<i64> = self
            .conn
            .prepare_cached("SELECT min(expires_at) FROM transfers WHERE state = 1")
            .map_err(unavailable)?
            .query_row([], |r| {
                Ok(match r.get_ref(0)? {
                    rusqlite::types::ValueRef::Null => None,
                    rusqlite::types::ValueRef::Integer(t) => Some(t),
                    _ => Some(0),
                })
            })
            .map_err(unavailable)?;
        Ok(due.map(|t| t.max(0) as Timestamp))
    }

    fn commit(&mut self, changes: &[Changes], audit: &[(Timestamp, audit::Draft)], records: &[Record]) -> Result<()> {
        assert!(self.in_tx, "commit inside a batch");
        self.write(changes)?;
        if !audit.is_empty() {
            self.write_audit(audit)?;
        }
        for record in records {
            match record {
                Record::Authorization { row, message } => {
                    write_authorization(&self.conn, row, message.as_ref().map(|(k, r)| (k, r.as_slice())), true)?
                }
                Record::Document(doc) => upsert_document(&self.conn, doc)?,
                Record::Count { scope, period, delta } => add_count(&self.conn, scope, *period, *delta)?,
            }
        }
        // The commit is visible to other connections when `COMMIT` returns, and durable once the
        // syncer's next sync returns (see `crate::durable`).
        let number = self.durability.start_commit();
        self.sync_owed = true;
        let committed = {
            let _deferred = crate::sqlite_wal::defer_syncs();
            self.statements.get(&self.conn, "COMMIT").and_then(|s| s.execute(&[]))
        };
        self.durability.commit_written(number);
        committed.map_err(unavailable)?;
        self.in_tx = false;
        if let Some(frontier) = self.pending_frontier.take() {
            self.trusted_edge = crate::audit_log::edge_of(&frontier);
            self.frontier = frontier;
        }
        let numbered = std::mem::take(&mut self.assigned);
        self.next_no = numbered.values().fold(self.next_no, |next, no| next.max(no + 1));
        for change in changes {
            for account in &change.accounts {
                match self.accounts.get_mut(&account.key) {
                    Some(stored) => stored.account = account.clone(),
                    None => {
                        let no = *numbered.get(&account.key).expect("a changed account was read or numbered");
                        self.accounts.insert(account.key, Stored { account: account.clone(), no, head: None });
                    }
                }
            }
            self.clock.last = self.clock.last.max(change.clock.last);
        }
        for (key, (head, _)) in self.batch_heads.drain() {
            // Both accounts of a listed transfer changed, so both are here.
            if let Some(stored) = self.accounts.get_mut(&key) {
                stored.head = Some(head);
            }
        }
        self.id_max = self.id_max.max(self.batch_id_max.take());
        Ok(())
    }

    fn deferred_sync(&mut self) -> Option<Box<dyn DeferredSync>> {
        Some(Box::new(WalSync { wal: self.wal.clone(), file: None, durability: self.durability.clone() }))
    }

    fn sync_owed(&mut self) -> bool {
        std::mem::take(&mut self.sync_owed)
    }

    fn cached_accounts(&self) -> usize {
        self.accounts.len()
    }

    fn rollback(&mut self) {
        self.assigned.clear();
        self.batch_heads.clear();
        self.batch_id_max = None;
        self.pending_frontier = None;
        if self.in_tx {
            // A failed ROLLBACK (the transaction already ended by a statement `OR ROLLBACK`) leaves
            // nothing open; otherwise SQLite rolls back on its own when the connection closes.
            let _ = self.conn.execute_batch("ROLLBACK");
            self.in_tx = false;
        }
        crate::sqlite_wal::discard_pending(&self.conn);
    }
}

/// Writes `drafts` after `frontier` inside the open transaction: entries, completed subtrees, the
/// signed head and the new edge (returned; it is this connection's only once the commit succeeds).
fn write_audit(
    conn: &Connection,
    statements: &mut Statements,
    frontier: &audit::Frontier,
    drafts: &[(Timestamp, audit::Draft)],
    signer: &audit::Signer,
) -> Result<audit::Frontier> {
    let append = crate::audit_log::append(frontier, drafts, signer);
    static ENTRIES: MultiRowInsert = MultiRowInsert::new(
        || {
            "INSERT OR ROLLBACK INTO audit_entries (seq, time, tenant_id, actor, action, resource, request_id, source, outcome, leaf_hash)".into()
        },
        10,
    );
    insert_rows(conn, statements, &ENTRIES, &append.entries, |e, values| {
        let d = e.draft;
        values.extend([
            Value::Int(e.seq as i64),
            Value::Int(e.time as i64),
            d.tenant.map_or(Value::Null, sqlite_stmt::uuid),
            Value::Text(&d.actor),
            Value::Text(&d.action),
            Value::Text(&d.resource),
            Value::Text(&d.request_id),
            Value::Text(&d.source),
            Value::Text(&d.outcome),
            Value::Blob(&e.leaf),
        ]);
    })?;
    static NODES: MultiRowInsert =
        MultiRowInsert::new(|| "INSERT OR ROLLBACK INTO audit_nodes (last_leaf, level, hash)".into(), 3);
    insert_rows(conn, statements, &NODES, &append.nodes, |n, values| {
        let last = crate::audit_log::last_leaf(n.level, n.index) as i64;
        values.extend([Value::Int(last), Value::Int(n.level.into()), Value::Blob(&n.hash)]);
    })?;
    let h = &append.head;
    statements
        .get(conn, "INSERT OR ROLLBACK INTO audit_heads (size, time, root, signature) VALUES (?1, ?2, ?3, ?4)")
        .and_then(|s| {
            s.execute(&[
                Value::Int(h.head.size as i64),
                Value::Int(h.head.time as i64),
                Value::Blob(&h.head.root),
                Value::Blob(&h.signature),
            ])
        })
        .map_err(unavailable)?;
    let frontier = append.frontier.encode();
    statements
        .get(conn, "UPDATE ledger_meta SET audit_frontier = ?1 WHERE id = 1")
        .and_then(|s| s.execute(&[Value::Blob(&frontier)]))
        .map_err(unavailable)?;
    Ok(append.frontier)
}

/// Rows one multi-row `INSERT` takes at most; a batch's rows go in statements of 16, 8, 4, 2 and 1
/// rows, each prepared once. One statement of many rows saves each row the statement's own start
/// and finish (opening its cursors, seeking the table's edge): in the HTTP benchmark's batches a
/// third of the writer's time went to inserting rows one statement each.
///
/// The batch's own rows go in with `INSERT OR ROLLBACK` (and its balance updates with `UPDATE OR
/// ROLLBACK`): a constraint they break ends the whole transaction, which the writer rolls back
/// on any error anyway. With the default (`ABORT`), SQLite must be able to undo a statement that
/// fails halfway while keeping the rest of the transaction, so it copies every page a multi-row
/// statement is about to change into a statement journal first: 7 % of the writer's time in the
/// HTTP benchmark.
const ROWS_PER_INSERT_MAX: usize = 16;

/// A multi-row `INSERT`: `head VALUES (?, …), (?, …), …`, `width` values a row; its text for each
/// count of rows is made once per process, not on every batch.
struct MultiRowInsert {
    head: fn() -> String,
    width: usize,
    texts: OnceLock<[String; 5]>,
}

/// The counts of rows the statements take, largest first.
const ROWS_PER_INSERT: [usize; 5] = [ROWS_PER_INSERT_MAX, 8, 4, 2, 1];

impl MultiRowInsert {
    const fn new(head: fn() -> String, width: usize) -> MultiRowInsert {
        MultiRowInsert { head, width, texts: OnceLock::new() }
    }

    /// The statement's text for `rows` rows (one of [`ROWS_PER_INSERT`]).
    fn text(&'static self, rows: usize) -> &'static str {
        let texts = self.texts.get_or_init(|| {
            let head = (self.head)();
            // Each `?` is numbered one above the one before it.
            let row = format!("({})", vec!["?"; self.width].join(", "));
            ROWS_PER_INSERT.map(|n| format!("{head} VALUES {}", vec![row.as_str(); n].join(", ")))
        });
        &texts[ROWS_PER_INSERT.iter().position(|n| *n == rows).expect("one of the counts made above")]
    }
}

/// Inserts `rows` with `insert`'s statements; `values(row, into)` appends one row's `width` values.
fn insert_rows<'a, R>(
    conn: &Connection,
    statements: &mut Statements,
    insert: &'static MultiRowInsert,
    rows: &'a [R],
    mut values: impl FnMut(&'a R, &mut Vec<Value<'a>>),
) -> Result<()> {
    let mut bound = Vec::with_capacity(insert.width * ROWS_PER_INSERT_MAX.min(rows.len()));
    let mut rest = rows;
    while !rest.is_empty() {
        let n = ROWS_PER_INSERT.into_iter().find(|n| *n <= rest.len()).expect("1 fits");
        bound.clear();
        for row in &rest[..n] {
            values(row, &mut bound);
        }
        debug_assert_eq!(bound.len(), n * insert.width, "each row gives `width` values");
        statements.get(conn, insert.text(n)).and_then(|s| s.execute(&bound)).map_err(unavailable)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// An account's internal number: as committed, or given in the open batch.
fn number_of(
    accounts: &Generations<AccountKey, Stored>,
    assigned: &Map<AccountKey, i64>,
    key: &AccountKey,
) -> Option<i64> {
    accounts.get(key).map(|s| s.no).or_else(|| assigned.get(key).copied())
}

impl SqliteWriter {
    fn write_audit(&mut self, drafts: &[(Timestamp, audit::Draft)]) -> Result<()> {
        self.pending_frontier =
            Some(write_audit(&self.conn, &mut self.statements, &self.frontier, drafts, &self.signer)?);
        Ok(())
    }

    fn number(&self, key: &AccountKey) -> Option<i64> {
        number_of(&self.accounts, &self.assigned, key)
    }

    fn write(&mut self, changes: &[Changes]) -> Result<()> {
        // Accounts first: transfers of the batch may name accounts it created.
        let mut last = self.clock;
        for change in changes {
            for account in &change.accounts {
                if self.number(&account.key).is_none() {
                    let no = self.next_no + self.assigned.len() as i64;
                    self.assigned.insert(account.key, no);
                }
            }
            last.last = last.last.max(change.clock.last);
        }
        // Link each created transfer, in time order, behind its accounts' newest ones; each row
        // gets its accounts' numbers and previous links ([debit, credit]). Only created transfers
        // are listed per account.
        let mut rows: Vec<(EntryRow, Pair, Pair)> =
            changes.iter().flat_map(|c| c.inserted.iter()).map(|e| (EntryRow::of(e), [None; 2], [None; 2])).collect();
        rows.sort_unstable_by_key(|(r, ..)| r.timestamp);
        {
            let (accounts, assigned, batch_heads) = (&self.accounts, &self.assigned, &mut self.batch_heads);
            for (r, nos, prevs) in &mut rows {
                let (Some(debit), Some(credit)) = (r.debit_account_id, r.credit_account_id) else { continue };
                if r.result != 0 {
                    continue;
                }
                let tenant = TenantId(r.tenant_id);
                for (side, account) in [debit, credit].into_iter().enumerate() {
                    let key = AccountKey { tenant, id: AccountId(account) };
                    nos[side] = number_of(accounts, assigned, &key);
                    prevs[side] = match batch_heads.entry(key) {
                        std::collections::hash_map::Entry::Occupied(mut seen) => {
                            Some(std::mem::replace(seen.get_mut(), (r.timestamp, false)).0)
                        }
                        std::collections::hash_map::Entry::Vacant(first) => {
                            first.insert((r.timestamp, false));
                            accounts.get(&key).and_then(|s| s.head)
                        }
                    };
                }
            }
        }
        // A new account is inserted, never upserted: one already stored would have been read
        // (`load_accounts`), so a conflict here means a stored account was about to get a second
        // number, and the batch is refused whole instead.
        static INSERT: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT OR ROLLBACK INTO accounts ({ACCOUNT_COLUMNS}, no, head) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            )
        });
        const UPDATE: &str = "UPDATE OR ROLLBACK accounts SET flags = ?3, debits_posted = ?4, credits_posted = ?5, \
             debits_pending = ?6, credits_pending = ?7, head = ?8 WHERE tenant_id = ?1 AND id = ?2";
        // An account stored before, or created earlier in this batch, is updated: only its balances,
        // flags and head change, and an update builds no more than those.
        let mut created: Map<AccountKey, ()> = Map::default();
        for change in changes {
            for account in &change.accounts {
                let r = AccountRow::of(account);
                let no = self.number(&account.key).expect("numbered above");
                let head = match self.batch_heads.get_mut(&account.key) {
                    Some((head, written)) => {
                        *written = true;
                        Some(*head)
                    }
                    None => self.accounts.get(&account.key).and_then(|s| s.head),
                };
                if self.accounts.contains_key(&account.key) || created.contains_key(&account.key) {
                    let n = self
                        .statements
                        .get(&self.conn, UPDATE)
                        .and_then(|s| {
                            s.execute(&[
                                sqlite_stmt::uuid(r.tenant_id),
                                sqlite_stmt::uuid(r.id),
                                r.flags.into(),
                                r.debits_posted.into(),
                                r.credits_posted.into(),
                                r.debits_pending.into(),
                                r.credits_pending.into(),
                                head.into(),
                            ])
                        })
                        .map_err(unavailable)?;
                    assert_eq!(n, 1, "a numbered account is stored");
                    continue;
                }
                self.statements
                    .get(&self.conn, INSERT.as_str())
                    .and_then(|s| {
                        s.execute(&[
                            sqlite_stmt::uuid(r.tenant_id),
                            sqlite_stmt::uuid(r.id),
                            Value::Text(&r.currency),
                            r.code.into(),
                            r.flags.into(),
                            r.credit_limit.into(),
                            r.metadata.as_deref().into(),
                            r.timestamp.into(),
                            r.debits_posted.into(),
                            r.credits_posted.into(),
                            r.debits_pending.into(),
                            r.credits_pending.into(),
                            r.holder_id.map_or(Value::Null, sqlite_stmt::uuid),
                            no.into(),
                            head.into(),
                        ])
                    })
                    .map_err(unavailable)?;
                created.insert(account.key, ());
            }
        }
        // Every transfer changes both its accounts' balances, so the account writes wrote every moved
        // head; this is for safety only.
        if self.batch_heads.values().any(|(_, written)| !written) {
            let mut update = self
                .conn
                .prepare_cached("UPDATE accounts SET head = ?3 WHERE tenant_id = ?1 AND id = ?2")
                .map_err(unavailable)?;
            for (key, (head, written)) in &self.batch_heads {
                if !written {
                    update
                        .execute(params![uuid_bytes(key.tenant.0), uuid_bytes(key.id.0), head])
                        .map_err(unavailable)?;
                }
            }
        }
        // Rows go in id order: the id index then takes its inserts left to right, and the table,
        // keyed by timestamp, still only grows at its right edge.
        // (The rows stay put; references to them are sorted.)
        let mut rows: Vec<&(EntryRow, Pair, Pair)> = rows.iter().collect();
        rows.sort_unstable_by_key(|(r, ..)| r.id);
        self.batch_id_max = rows.last().map(|(r, ..)| r.id).max(self.batch_id_max);
        static TRANSFERS: MultiRowInsert = MultiRowInsert::new(
            || {
                format!(
                    "INSERT OR ROLLBACK INTO transfers ({ENTRY_COLUMNS}, debit_no, credit_no, debit_prev, credit_prev)"
                )
            },
            20,
        );
        insert_rows(
            &self.conn,
            &mut self.statements,
            &TRANSFERS,
            &rows,
            |(r, [debit_no, credit_no], [debit_prev, credit_prev]), values| {
                values.extend([
                    Value::Int(r.timestamp),
                    sqlite_stmt::uuid(r.tenant_id),
                    sqlite_stmt::uuid(r.id),
                    r.result.into(),
                    r.kind.into(),
                    r.debit_account_id.map_or(Value::Null, sqlite_stmt::uuid),
                    r.credit_account_id.map_or(Value::Null, sqlite_stmt::uuid),
                    r.amount.into(),
                    r.currency.as_deref().into(),
                    r.pending_id.map_or(Value::Null, sqlite_stmt::uuid),
                    r.amount_defaulted.into(),
                    r.timeout_seconds.into(),
                    r.expires_at.into(),
                    r.code.into(),
                    r.metadata.as_deref().into(),
                    r.state.into(),
                    (*debit_no).into(),
                    (*credit_no).into(),
                    (*debit_prev).into(),
                    (*credit_prev).into(),
                ]);
            },
        )?;
        let mut update_state =
            self.conn.prepare_cached(&format!("UPDATE transfers SET state = ?3 WHERE {BY_ID}")).map_err(unavailable)?;
        for change in changes {
            for (key, state) in &change.pending_updates {
                let (i, t) = by_id(key);
                let n = update_state.execute(params![i, t, *state as i16]).map_err(unavailable)?;
                assert_eq!(n, 1, "a pending update names a stored transfer");
            }
        }
        drop(update_state);
        self.statements
            .get(&self.conn, "UPDATE ledger_meta SET last_timestamp = ?1 WHERE id = 1")
            .and_then(|s| s.execute(&[Value::Int(last.last as i64)]))
            .map_err(unavailable)?;
        Ok(())
    }
}

/// The WAL file of a database file.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// The sync the writer's commits leave to the engine's syncer thread: `fdatasync` of the WAL,
/// through a descriptor of its own (a sync is of the file, whichever descriptor asks).
struct WalSync {
    wal: PathBuf,
    file: Option<std::fs::File>,
    durability: Arc<Durability>,
}

impl DeferredSync for WalSync {
    fn sync(&mut self) -> std::io::Result<()> {
        let through = self.durability.syncable();
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                let file = std::fs::OpenOptions::new().write(true).open(&self.wal)?;
                // The WAL may have been created by this process: its directory entry must be
                // durable too (SQLite's own first sync of a new file does the same).
                let dir = self.wal.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                std::fs::File::open(dir)?.sync_all()?;
                self.file.insert(file)
            }
        };
        file.sync_data()?;
        self.durability.synced(through);
        Ok(())
    }
}

struct SqliteQueries {
    path: PathBuf,
    /// The writer's, when this process has one: reads wait until what they saw is durable.
    durability: Option<Arc<Durability>>,
    pool: Arc<Pool>,
}

#[derive(Default)]
struct Pool {
    state: Mutex<ReaderPool>,
    returned: std::sync::Condvar,
}

#[derive(Default)]
struct ReaderPool {
    idle: Vec<Connection>,
    /// Pooled connections in existence (idle or lent).
    open: usize,
}

/// A connection lent by a [`Pool`], or opened for one use when the pool had none to lend.
struct Lent {
    conn: Connection,
    pooled: bool,
}

impl Pool {
    /// A pooled connection, a new one while fewer than READERS_MAX exist, or (after waiting
    /// READER_WAIT for one to come back) a connection of this use alone.
    fn lend(&self, path: &Path) -> Result<Lent> {
        let (conn, pooled) = {
            let mut pool = self.state.lock().expect("pool lock");
            if pool.idle.is_empty() && pool.open >= READERS_MAX {
                pool = self.returned.wait_timeout_while(pool, READER_WAIT, |p| p.idle.is_empty()).expect("pool lock").0;
            }
            match pool.idle.pop() {
                Some(c) => (Some(c), true),
                None if pool.open < READERS_MAX => {
                    pool.open += 1;
                    (None, true)
                }
                None => (None, false),
            }
        };
        match conn {
            Some(conn) => Ok(Lent { conn, pooled }),
            None => match connect(path) {
                Ok(conn) => Ok(Lent { conn, pooled }),
                Err(e) => {
                    if pooled {
                        self.state.lock().expect("pool lock").open -= 1;
                    }
                    Err(e)
                }
            },
        }
    }

    fn give_back(&self, lent: Lent) {
        if lent.pooled {
            self.state.lock().expect("pool lock").idle.push(lent.conn);
            self.returned.notify_one();
        }
    }

    /// For a lent connection that is not given back (closed instead).
    fn forget(&self, lent: Lent) {
        if lent.pooled {
            self.state.lock().expect("pool lock").open -= 1;
            self.returned.notify_one();
        }
    }
}

/// The connection a read session (see `crate::read_deferring`) reads from on this thread, and
/// whether its read transaction is open.
struct HeldRead {
    /// Which pool lent it: a session may use two stores (tests do); reads of another end it.
    pool: Arc<Pool>,
    lent: Lent,
    open: bool,
}

thread_local! {
    static HELD: std::cell::RefCell<Option<HeldRead>> = const { std::cell::RefCell::new(None) };
}

/// Ends the read transaction of this thread's session, if one is open, so that what follows
/// (a write, or the reads after it) sees the newest commits.
fn end_held_read() {
    HELD.with(|h| {
        if let Some(held) = h.borrow_mut().as_mut() {
            close_read(held);
        }
    });
}

fn close_read(held: &mut HeldRead) {
    if std::mem::take(&mut held.open) {
        // A read transaction changed nothing: its end cannot fail but for a closed connection,
        // and `end_read_session` then closes it rather than pooling it.
        if held.lent.conn.prepare_cached("COMMIT").and_then(|mut s| s.raw_execute()).is_err() {
            let _ = held.lent.conn.execute_batch("ROLLBACK");
        }
    }
}

/// Gives this thread's session connection back to its pool, if it holds one: at the session's
/// end (`crate::read_deferring`), or when a read of another store takes its place.
pub(crate) fn end_read_session() {
    if let Some(mut held) = HELD.with(|h| h.borrow_mut().take()) {
        close_read(&mut held);
        if held.lent.conn.is_autocommit() {
            held.pool.give_back(held.lent);
        } else {
            held.pool.forget(held.lent);
        }
    }
}

impl SqliteQueries {
    fn new(path: PathBuf, durability: Option<Arc<Durability>>) -> SqliteQueries {
        SqliteQueries { path, durability, pool: Arc::default() }
    }

    /// Runs `f` on a connection of its own, outside any read session's transaction (ended first).
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        end_held_read();
        let mut lent = self.pool.lend(&self.path)?;
        let result = f(&mut lent.conn);
        self.pool.give_back(lent);
        if let Some(durability) = &self.durability {
            crate::durable::after_read(durability);
        }
        result
    }

    /// A point read: inside a read session (see `crate::read_deferring`), in the session's read
    /// transaction, which the first one opens; otherwise as [`SqliteQueries::with`].
    fn read<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        if !crate::durable::in_read_session() {
            return self.with(f);
        }
        if HELD.with(|h| h.borrow().as_ref().is_some_and(|held| !Arc::ptr_eq(&held.pool, &self.pool))) {
            end_read_session();
        }
        let result = HELD.with(|h| -> Result<T> {
            let mut h = h.borrow_mut();
            if h.is_none() {
                let lent = self.pool.lend(&self.path)?;
                *h = Some(HeldRead { pool: self.pool.clone(), lent, open: false });
            }
            let held = h.as_mut().expect("set above");
            if !held.open {
                held.lent.conn.prepare_cached("BEGIN").and_then(|mut s| s.raw_execute()).map_err(unavailable)?;
                held.open = true;
            }
            f(&mut held.lent.conn)
        });
        if let Some(durability) = &self.durability {
            crate::durable::after_read(durability);
        }
        result
    }
}

/// An authorization, inserted or replaced, and the answer to its message: a message seen before
/// is `Conflict`, or (for the writer, `keep_first`) keeps its first answer.
fn write_authorization(
    conn: &Connection,
    row: &AuthorizationRow,
    message: Option<(&[u8; 32], &[u8])>,
    keep_first: bool,
) -> Result<()> {
    // The change to the card's spend on the authorization's day.
    let before: i64 = conn
        .prepare_cached("SELECT spend FROM card_authorizations WHERE tenant_id = ?1 AND id = ?2")
        .map_err(unavailable)?
        .query_row(params![uuid_bytes(row.tenant_id), uuid_bytes(row.id)], |r| r.get(0))
        .optional()
        .map_err(unavailable)?
        .unwrap_or(0);
    let delta = row.spend as i64 - before;
    if delta != 0 {
        conn.prepare_cached(
            "INSERT INTO card_spend (card_id, day, spend) VALUES (?1, ?2, ?3) \
             ON CONFLICT (card_id, day) DO UPDATE SET spend = spend + excluded.spend",
        )
        .map_err(unavailable)?
        .execute(params![uuid_bytes(row.card_id), (row.created_at / DAY_NANOS) as i64, delta])
        .map_err(unavailable)?;
    }
    conn.prepare_cached(
        "INSERT INTO card_authorizations (tenant_id, id, card_id, rrn, created_at, spend, body, held_until) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT (tenant_id, id) DO UPDATE SET spend = excluded.spend, body = excluded.body, \
         held_until = excluded.held_until",
    )
    .map_err(unavailable)?
    .execute(params![
        uuid_bytes(row.tenant_id),
        uuid_bytes(row.id),
        uuid_bytes(row.card_id),
        row.rrn,
        row.created_at as i64,
        row.spend as i64,
        row.body,
        row.held_until as i64
    ])
    .map_err(unavailable)?;
    if let Some((key, response)) = message {
        let sql = if keep_first {
            "INSERT INTO card_messages (key, response) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING"
        } else {
            "INSERT INTO card_messages (key, response) VALUES (?1, ?2)"
        };
        conn.prepare_cached(sql)
            .map_err(unavailable)?
            .execute(params![&key[..], response])
            .map_err(|e| map_conflict(e, "this message was answered before"))?;
    }
    Ok(())
}

/// Nanoseconds in a UTC day: `card_spend.day` is days since the epoch.
const DAY_NANOS: u64 = 86_400_000_000_000;
/// Recent authorizations are counted up to this many (above any velocity limit a product may set).
const RECENT_COUNT_MAX: i64 = 100_000;

const AUTH_COLUMNS: &str = "tenant_id, id, card_id, rrn, created_at, spend, body, held_until";

fn card_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<CardRow>> {
    let (tenant, id, index): (Vec<u8>, Vec<u8>, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
    let (status, body): (String, String) = (r.get(3)?, r.get(4)?);
    Ok((|| {
        Ok(CardRow {
            tenant_id: u128_of(&tenant).map_err(corrupt)?,
            id: u128_of(&id).map_err(corrupt)?,
            pan_index: hash_of(&index)?,
            status,
            body,
        })
    })())
}

fn authorization_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<AuthorizationRow>> {
    let (tenant, id, card): (Vec<u8>, Vec<u8>, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
    let (rrn, created_at, spend, body): (String, i64, i64, String) = (r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?);
    let held_until: i64 = r.get(7)?;
    Ok((|| {
        Ok(AuthorizationRow {
            tenant_id: u128_of(&tenant).map_err(corrupt)?,
            id: u128_of(&id).map_err(corrupt)?,
            card_id: u128_of(&card).map_err(corrupt)?,
            rrn,
            created_at: created_at as u64,
            spend: spend as u64,
            held_until: held_until as u64,
            body,
        })
    })())
}

const DOCUMENT_COLUMNS: &str = "kind, tenant_id, id, lookup, owner, created_at, version, body";

/// An owner's documents, oldest first: in the order of the `documents_by_owner` index.
const BY_OWNER: &str = "FROM documents WHERE kind = ?1 AND owner = ?2 ORDER BY created_at, id, tenant_id LIMIT ?3";
/// The same, after a cursor: `(created_at, id, tenant_id)` past `(?4, ?5, ?6)`.
const BY_OWNER_AFTER: &str =
    "FROM documents WHERE kind = ?1 AND owner = ?2 AND (created_at, id, tenant_id) > (?4, ?5, ?6) \
                              ORDER BY created_at, id, tenant_id LIMIT ?3";

fn document_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Document>> {
    let tenant: Vec<u8> = r.get(1)?;
    let (created_at, version): (i64, i64) = (r.get(5)?, r.get(6)?);
    let (kind, id, lookup, owner, body) = (r.get(0)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(7)?);
    Ok(u128_of(&tenant).map_err(corrupt).map(|tenant_id| Document {
        kind,
        tenant_id,
        id,
        lookup,
        owner,
        created_at: created_at as u64,
        version: version as u64,
        body,
    }))
}

fn upsert_document(conn: &Connection, doc: &Document) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO documents (kind, tenant_id, id, lookup, owner, created_at, version, body) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (kind, tenant_id, id) DO UPDATE SET \
         lookup = excluded.lookup, owner = excluded.owner, version = excluded.version, body = excluded.body",
    )
    .map_err(unavailable)?
    .execute(params![
        doc.kind,
        uuid_bytes(doc.tenant_id),
        doc.id,
        doc.lookup,
        doc.owner,
        doc.created_at as i64,
        doc.version as i64,
        doc.body
    ])
    .map_err(|e| map_conflict(e, "a document with this lookup exists"))?;
    Ok(())
}

/// `Conflict` if the id (per kind and tenant) or the lookup (per kind) exists.
fn insert_document_row(conn: &Connection, doc: &Document) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO documents (kind, tenant_id, id, lookup, owner, created_at, version, body) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(unavailable)?
    .execute(params![
        doc.kind,
        uuid_bytes(doc.tenant_id),
        doc.id,
        doc.lookup,
        doc.owner,
        doc.created_at as i64,
        doc.version as i64,
        doc.body
    ])
    .map_err(|e| map_conflict(e, "a document with this id or lookup exists"))?;
    Ok(())
}

fn add_count(conn: &Connection, scope: &str, period: u64, delta: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO counters (scope, period, total) VALUES (?1, ?2, ?3) \
         ON CONFLICT (scope, period) DO UPDATE SET total = total + excluded.total",
    )
    .map_err(unavailable)?
    .execute(params![scope, period as i64, delta])
    .map_err(unavailable)?;
    Ok(())
}

fn map_conflict(e: rusqlite::Error, what: &str) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::Conflict(what.to_owned())
        }
        e => unavailable(e),
    }
}

impl Queries for SqliteQueries {
    fn point_reads_inline(&self) -> bool {
        true
    }

    fn insert_document(&self, doc: &Document) -> Result<()> {
        self.with(|c| insert_document_row(c, doc))
    }

    fn insert_document_within(&self, doc: &Document, max: u64) -> Result<bool> {
        self.with(|c| {
            // One write transaction: SQLite lets one writer in at a time, so nothing is inserted
            // between the count and the insert.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(unavailable)?;
            if let Some(owner) = &doc.owner {
                let count: i64 = tx
                    .prepare_cached("SELECT COUNT(*) FROM documents WHERE kind = ?1 AND owner = ?2")
                    .map_err(unavailable)?
                    .query_row(params![doc.kind, owner], |r| r.get(0))
                    .map_err(unavailable)?;
                if count as u64 >= max {
                    return Ok(false);
                }
            }
            insert_document_row(&tx, doc)?;
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
    }

    fn document(&self, kind: &str, tenant_id: u128, id: &str) -> Result<Option<Document>> {
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {DOCUMENT_COLUMNS} FROM documents WHERE kind = ?1 AND tenant_id = ?2 AND id = ?3"
            ))
            .map_err(unavailable)?
            .query_row(params![kind, uuid_bytes(tenant_id), id], document_row)
            .optional()
            .map_err(unavailable)?
            .transpose()
        })
    }

    fn document_by_lookup(&self, kind: &str, lookup: &str) -> Result<Option<Document>> {
        self.read(|c| {
            c.prepare_cached(&format!("SELECT {DOCUMENT_COLUMNS} FROM documents WHERE kind = ?1 AND lookup = ?2"))
                .map_err(unavailable)?
                .query_row(params![kind, lookup], document_row)
                .optional()
                .map_err(unavailable)?
                .transpose()
        })
    }

    fn update_document(&self, doc: &Document, expected_version: u64) -> Result<bool> {
        self.with(|c| {
            let n = c
                .prepare_cached(
                    "UPDATE documents SET lookup = ?4, owner = ?5, version = ?6, body = ?7 \
                     WHERE kind = ?1 AND tenant_id = ?2 AND id = ?3 AND version = ?8",
                )
                .map_err(unavailable)?
                .execute(params![
                    doc.kind,
                    uuid_bytes(doc.tenant_id),
                    doc.id,
                    doc.lookup,
                    doc.owner,
                    doc.version as i64,
                    doc.body,
                    expected_version as i64
                ])
                .map_err(|e| map_conflict(e, "a document with this lookup exists"))?;
            Ok(n == 1)
        })
    }

    fn delete_document(&self, kind: &str, tenant_id: u128, id: &str) -> Result<bool> {
        self.with(|c| {
            let n = c
                .execute(
                    "DELETE FROM documents WHERE kind = ?1 AND tenant_id = ?2 AND id = ?3",
                    params![kind, uuid_bytes(tenant_id), id],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn documents(&self, q: &DocumentQuery<'_>) -> Result<Vec<Document>> {
        let (after_at, after_id) = q.after.clone().unwrap_or((0, String::new()));
        let from = if q.after.is_some() { q.from.max(after_at) } else { q.from };
        self.with(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {DOCUMENT_COLUMNS} FROM documents \
                     WHERE kind = ?1 AND tenant_id = ?2 AND created_at >= ?3 AND created_at < ?4 \
                       AND (?5 IS NULL OR owner = ?5) AND (created_at > ?6 OR id > ?7) \
                     ORDER BY created_at, id LIMIT ?8"
                ))
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(
                    params![
                        q.kind,
                        uuid_bytes(q.tenant_id),
                        from as i64,
                        q.to.min(i64::MAX as u64) as i64,
                        q.owner,
                        after_at as i64,
                        if q.after.is_some() { after_id } else { String::new() },
                        q.limit.min(PAGE_LEN_MAX) as i64
                    ],
                    document_row,
                )
                .map_err(unavailable)?;
            rows.map(|r| r.map_err(unavailable)?).collect()
        })
    }

    fn count_documents(&self, kind: &str, owner: &str) -> Result<u64> {
        self.read(|c| {
            let n: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM documents WHERE kind = ?1 AND owner = ?2")
                .map_err(unavailable)?
                .query_row(params![kind, owner], |r| r.get(0))
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
        self.read(|c| {
            let rows: rusqlite::Result<Vec<Result<Document>>> = match after {
                None => c
                    .prepare_cached(&format!("SELECT {DOCUMENT_COLUMNS} {BY_OWNER}"))
                    .and_then(|mut s| s.query_map(params![kind, owner, limit as i64], document_row)?.collect()),
                Some(a) => {
                    c.prepare_cached(&format!("SELECT {DOCUMENT_COLUMNS} {BY_OWNER_AFTER}")).and_then(|mut s| {
                        let values =
                            params![kind, owner, limit as i64, a.created_at as i64, a.id, uuid_bytes(a.tenant_id)];
                        s.query_map(values, document_row)?.collect()
                    })
                }
            };
            rows.map_err(unavailable)?.into_iter().collect()
        })
    }

    fn counter_total(&self, scope: &str, from: u64, to: u64) -> Result<i64> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT COALESCE(SUM(total), 0) FROM counters WHERE scope = ?1 AND period >= ?2 AND period < ?3",
            )
            .map_err(unavailable)?
            .query_row(params![scope, from as i64, to.min(i64::MAX as u64) as i64], |r| r.get(0))
            .map_err(unavailable)
        })
    }

    fn account(&self, key: AccountKey) -> Result<Option<Account>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE tenant_id = ?1 AND id = ?2"))
                .map_err(unavailable)?;
            let mut rows = stmt.query(params![uuid_bytes(key.tenant.0), uuid_bytes(key.id.0)]).map_err(unavailable)?;
            match rows.next().map_err(unavailable)? {
                Some(row) => Ok(Some(account_row(row)?.into_account().map_err(corrupt)?)),
                None => Ok(None),
            }
        })
    }

    fn entry(&self, key: TransferKey) -> Result<Option<Entry>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(&format!("SELECT {ENTRY_COLUMNS} FROM transfers WHERE {BY_ID}"))
                .map_err(unavailable)?;
            let mut rows = stmt.query(by_id(&key)).map_err(unavailable)?;
            match rows.next().map_err(unavailable)? {
                Some(row) => Ok(Some(entry_row(row)?.into_entry().map_err(corrupt)?)),
                None => Ok(None),
            }
        })
    }

    fn account_transfers(&self, key: AccountKey, page: Page) -> Result<Option<Vec<Transfer>>> {
        let limit = page.limit.min(PAGE_LEN_MAX);
        self.with(|c| {
            // The account's chain, newest first, from its head or from the cursor's transfer,
            // inside one read transaction: one snapshot.
            let tx = c.transaction().map_err(unavailable)?;
            let account: Option<(i64, Option<i64>)> = tx
                .prepare_cached("SELECT no, head FROM accounts WHERE tenant_id = ?1 AND id = ?2")
                .map_err(unavailable)?
                .query_row(params![uuid_bytes(key.tenant.0), uuid_bytes(key.id.0)], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(unavailable)?;
            let Some((no, head)) = account else { return Ok(page.before.is_none().then(Vec::new)) };
            let mut link = tx
                .prepare_cached(&format!(
                    "SELECT {ENTRY_COLUMNS}, debit_no, credit_no, debit_prev, credit_prev FROM transfers \
                     WHERE timestamp = ?1 AND result = 0"
                ))
                .map_err(unavailable)?;
            // The previous link of this account's chain, from a row of `link`; `None` if the row
            // is not in the chain.
            let prev_of = |row: &rusqlite::Row<'_>| -> Result<Option<Option<i64>>> {
                let (debit_no, credit_no): (Option<i64>, Option<i64>) =
                    (row.get(16).map_err(unavailable)?, row.get(17).map_err(unavailable)?);
                Ok(if debit_no == Some(no) {
                    Some(row.get(18).map_err(unavailable)?)
                } else if credit_no == Some(no) {
                    Some(row.get(19).map_err(unavailable)?)
                } else {
                    None
                })
            };
            let mut next = match page.before {
                None => head,
                Some(before) => {
                    let Ok(before) = i64::try_from(before) else { return Ok(None) };
                    let mut rows = link.query([before]).map_err(unavailable)?;
                    match rows.next().map_err(unavailable)? {
                        Some(row) => match prev_of(row)? {
                            Some(prev) => prev,
                            None => return Ok(None),
                        },
                        None => return Ok(None),
                    }
                }
            };
            let mut out = Vec::new();
            while let Some(at) = next.filter(|_| out.len() < limit) {
                let mut rows = link.query([at]).map_err(unavailable)?;
                let Some(row) = rows.next().map_err(unavailable)? else {
                    return Err(corrupt(format!(
                        "account {:032x}'s listing links to a missing transfer {at}",
                        key.id.0
                    )));
                };
                let prev = prev_of(row)?.ok_or_else(|| {
                    corrupt(format!("account {:032x}'s listing links to transfer {at}, not its own", key.id.0))
                })?;
                if prev.is_some_and(|p| p >= at) {
                    return Err(corrupt(format!("account {:032x}'s listing goes forward at transfer {at}", key.id.0)));
                }
                match entry_row(row)?.into_entry().map_err(corrupt)? {
                    Entry::Created(t) => out.push(t),
                    Entry::Failed { .. } => return Err(corrupt("failed entry in an account listing".into())),
                }
                next = prev;
            }
            Ok(Some(out))
        })
    }

    fn create_tenant(&self, tenant: &TenantRecord, key: &ApiKeyRecord, secret_hash: &[u8; 32]) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(unavailable)?;
            tx.execute(
                "INSERT INTO tenants (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![uuid_bytes(tenant.id), tenant.name, tenant.created_at as i64],
            )
            .map_err(|e| map_conflict(e, "tenant id exists"))?;
            tx.execute(
                "INSERT INTO api_keys (id, tenant_id, secret_hash, created_at, scopes) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    uuid_bytes(key.id),
                    uuid_bytes(key.tenant_id),
                    &secret_hash[..],
                    key.created_at as i64,
                    key.scopes
                ],
            )
            .map_err(|e| map_conflict(e, "api key exists"))?;
            tx.commit().map_err(unavailable)
        })
    }

    fn tenant(&self, id: u128) -> Result<Option<TenantRecord>> {
        self.read(|c| {
            c.query_row("SELECT name, created_at FROM tenants WHERE id = ?1", [uuid_bytes(id)], |r| {
                Ok(TenantRecord { id, name: r.get(0)?, created_at: r.get::<_, i64>(1)? as u64 })
            })
            .optional()
            .map_err(unavailable)
        })
    }

    fn create_api_key(&self, key: &ApiKeyRecord, secret_hash: &[u8; 32]) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO api_keys (id, tenant_id, secret_hash, created_at, scopes) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    uuid_bytes(key.id),
                    uuid_bytes(key.tenant_id),
                    &secret_hash[..],
                    key.created_at as i64,
                    key.scopes
                ],
            )
            .map_err(|e| map_conflict(e, "api key exists"))?;
            Ok(())
        })
    }

    fn revoke_api_key(&self, tenant_id: u128, key_id: u128, at: Timestamp) -> Result<bool> {
        self.with(|c| {
            let n = c
                .execute(
                    "UPDATE api_keys SET revoked_at = ?3 WHERE tenant_id = ?1 AND id = ?2 AND revoked_at IS NULL",
                    params![uuid_bytes(tenant_id), uuid_bytes(key_id), at as i64],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn api_key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>> {
        self.with(|c| {
            let row = c
                .query_row(
                    "SELECT id, tenant_id, created_at, revoked_at, scopes FROM api_keys WHERE secret_hash = ?1",
                    [&secret_hash[..]],
                    |r| {
                        Ok((
                            r.get::<_, Vec<u8>>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                            r.get::<_, Option<String>>(4)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(id, tenant, created, revoked, scopes)| {
                Ok(ApiKeyRecord {
                    id: u128_of(&id).map_err(corrupt)?,
                    tenant_id: u128_of(&tenant).map_err(corrupt)?,
                    created_at: created as u64,
                    revoked_at: revoked.map(|v| v as u64),
                    scopes,
                })
            })
            .transpose()
        })
    }

    fn scan(&self, accounts: &mut dyn FnMut(Account), entries: &mut dyn FnMut(Entry)) -> Result<()> {
        self.with(|c| {
            // One read transaction: accounts and transfers from the same snapshot.
            let tx = c.transaction().map_err(unavailable)?;
            {
                let mut stmt = tx.prepare(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts")).map_err(unavailable)?;
                let mut rows = stmt.query([]).map_err(unavailable)?;
                while let Some(row) = rows.next().map_err(unavailable)? {
                    accounts(account_row(row)?.into_account().map_err(corrupt)?);
                }
                let mut stmt = tx
                    .prepare(&format!("SELECT {ENTRY_COLUMNS} FROM transfers ORDER BY timestamp"))
                    .map_err(unavailable)?;
                let mut rows = stmt.query([]).map_err(unavailable)?;
                while let Some(row) = rows.next().map_err(unavailable)? {
                    entries(entry_row(row)?.into_entry().map_err(corrupt)?);
                }
            }
            tx.commit().map_err(unavailable)
        })
    }

    fn listing_violations(&self) -> Result<Vec<String>> {
        self.with(|c| {
            // Replays the links in time order: each listed transfer must link, for both its
            // accounts, to the one listed just before it, and each account's head to its last.
            let tx = c.transaction().map_err(unavailable)?;
            let mut last: HashMap<i64, i64> = HashMap::new();
            let mut violations = Vec::new();
            // A few are enough to act on; a wholly broken table must not fill memory with them.
            let report = |violations: &mut Vec<String>, text: String| {
                if violations.len() < LISTING_VIOLATIONS_MAX {
                    violations.push(text);
                }
            };
            {
                let mut stmt = tx
                    .prepare(
                        "SELECT timestamp, debit_no, credit_no, debit_prev, credit_prev FROM transfers \
                         WHERE result = 0 ORDER BY timestamp",
                    )
                    .map_err(unavailable)?;
                let mut rows = stmt.query([]).map_err(unavailable)?;
                while let Some(row) = rows.next().map_err(unavailable)? {
                    let ts: i64 = row.get(0).map_err(unavailable)?;
                    for (side, no, prev) in [("debit", 1, 3), ("credit", 2, 4)] {
                        let no: Option<i64> = row.get(no).map_err(unavailable)?;
                        let prev: Option<i64> = row.get(prev).map_err(unavailable)?;
                        let Some(no) = no else {
                            report(&mut violations, format!("transfer at {ts} has no {side} account number"));
                            continue;
                        };
                        let expected = last.insert(no, ts);
                        if prev != expected {
                            report(
                                &mut violations,
                                format!(
                                "transfer at {ts} links its {side} account's listing to {prev:?}, not to {expected:?}"
                            ),
                            );
                        }
                    }
                }
                let mut stmt = tx.prepare("SELECT id, no, head FROM accounts").map_err(unavailable)?;
                let mut rows = stmt.query([]).map_err(unavailable)?;
                while let Some(row) = rows.next().map_err(unavailable)? {
                    let id: Vec<u8> = row.get(0).map_err(unavailable)?;
                    let no: i64 = row.get(1).map_err(unavailable)?;
                    let head: Option<i64> = row.get(2).map_err(unavailable)?;
                    let expected = last.get(&no).copied();
                    if head != expected {
                        let id = u128_of(&id).map_err(corrupt)?;
                        report(
                            &mut violations,
                            format!(
                            "account {id:032x}'s listing starts at {head:?}, not at its newest transfer {expected:?}"
                        ),
                        );
                    }
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(violations)
        })
    }

    fn ping(&self) -> Result<()> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
    }

    fn database_time(&self) -> Result<Option<Timestamp>> {
        Ok(None)
    }

    fn ledger_clock(&self) -> Result<Timestamp> {
        self.with(|c| {
            let t: i64 = c
                .query_row("SELECT last_timestamp FROM ledger_meta WHERE id = 1", [], |r| r.get(0))
                .map_err(unavailable)?;
            u64::try_from(t).map_err(|_| corrupt(format!("the ledger's clock reads {t}")))
        })
    }

    fn create_oauth_client(&self, client: &OAuthClientRecord, secret_hash: &[u8; 32]) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO oauth_clients (id, tenant_id, secret_hash, scopes, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    uuid_bytes(client.id),
                    uuid_bytes(client.tenant_id),
                    &secret_hash[..],
                    client.scopes,
                    client.created_at as i64
                ],
            )
            .map_err(|e| map_conflict(e, "oauth client exists"))?;
            Ok(())
        })
    }

    fn oauth_client(&self, id: u128) -> Result<Option<(OAuthClientRecord, [u8; 32])>> {
        self.read(|c| {
            let row = c
                .query_row(
                    "SELECT tenant_id, secret_hash, scopes, created_at, revoked_at FROM oauth_clients WHERE id = ?1",
                    [uuid_bytes(id)],
                    |r| {
                        Ok((
                            r.get::<_, Vec<u8>>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, Option<i64>>(4)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(tenant, hash, scopes, created_at, revoked_at)| {
                Ok((
                    OAuthClientRecord {
                        id,
                        tenant_id: u128_of(&tenant).map_err(corrupt)?,
                        scopes,
                        created_at: created_at as u64,
                        revoked_at: revoked_at.map(|t| t as u64),
                    },
                    hash_of(&hash)?,
                ))
            })
            .transpose()
        })
    }

    fn revoke_oauth_client(&self, tenant_id: u128, id: u128, at: Timestamp) -> Result<bool> {
        self.with(|c| {
            let n = c
                .execute(
                    "UPDATE oauth_clients SET revoked_at = ?3 WHERE tenant_id = ?1 AND id = ?2 AND revoked_at IS NULL",
                    params![uuid_bytes(tenant_id), uuid_bytes(id), at as i64],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn data_key(&self, tenant_id: u128) -> Result<Option<DataKeyRecord>> {
        self.read(|c| {
            c.query_row(
                "SELECT kek_version, wrapped FROM data_keys WHERE tenant_id = ?1",
                [uuid_bytes(tenant_id)],
                |r| Ok(DataKeyRecord { tenant_id, kek_version: r.get(0)?, wrapped: r.get(1)? }),
            )
            .optional()
            .map_err(unavailable)
        })
    }

    fn create_data_key(&self, key: &DataKeyRecord) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO data_keys (tenant_id, kek_version, wrapped) VALUES (?1, ?2, ?3)",
                params![uuid_bytes(key.tenant_id), key.kek_version, key.wrapped],
            )
            .map_err(|e| map_conflict(e, "the tenant has a data key"))?;
            Ok(())
        })
    }

    fn data_keys(&self) -> Result<Vec<DataKeyRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT tenant_id, kek_version, wrapped FROM data_keys").map_err(unavailable)?;
            let mut rows = stmt.query([]).map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(unavailable)? {
                let tenant: Vec<u8> = r.get(0).map_err(unavailable)?;
                out.push(DataKeyRecord {
                    tenant_id: u128_of(&tenant).map_err(corrupt)?,
                    kek_version: r.get(1).map_err(unavailable)?,
                    wrapped: r.get(2).map_err(unavailable)?,
                });
            }
            Ok(out)
        })
    }

    fn rewrap_data_key(&self, key: &DataKeyRecord, old_kek_version: u32) -> Result<bool> {
        self.with(|c| {
            let n = c
                .execute(
                    "UPDATE data_keys SET kek_version = ?2, wrapped = ?3 WHERE tenant_id = ?1 AND kek_version = ?4",
                    params![uuid_bytes(key.tenant_id), key.kek_version, key.wrapped, old_kek_version],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn key_rotation_turn(&self) -> Result<Box<dyn Send>> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let mut name = self.path.as_os_str().to_owned();
        name.push(".rotation-lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&name)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", PathBuf::from(&name).display())))?;
        loop {
            // SAFETY: flock on a descriptor this function owns; blocks until granted, and is
            // released when the guard (the file) is dropped.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Box::new(lock));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(StoreError::Unavailable(format!("cannot lock {}: {e}", PathBuf::from(&name).display())));
            }
        }
    }

    fn create_holder(&self, h: &HolderRecord) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO holders (tenant_id, id, kind, name_sealed, document_sealed, document_index, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    uuid_bytes(h.tenant_id),
                    uuid_bytes(h.id),
                    h.kind,
                    h.name_sealed,
                    h.document_sealed,
                    &h.document_index[..],
                    h.created_at as i64
                ],
            )
            .map_err(|e| map_conflict(e, "a holder with this id or document exists"))?;
            Ok(())
        })
    }

    fn create_card_product(&self, tenant_id: u128, id: u128, bin: &str, body: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO card_products (tenant_id, id, bin, body) VALUES (?1, ?2, ?3, ?4)",
                params![uuid_bytes(tenant_id), uuid_bytes(id), bin, body],
            )
            .map_err(|e| map_conflict(e, "a card product with this id or BIN exists"))?;
            Ok(())
        })
    }

    fn card_bin_taken(&self, bin: &str) -> Result<bool> {
        self.read(|c| {
            c.query_row("SELECT EXISTS (SELECT 1 FROM card_products WHERE bin = ?1)", params![bin], |r| r.get(0))
                .map_err(unavailable)
        })
    }

    fn card_product(&self, tenant_id: u128, id: u128) -> Result<Option<String>> {
        self.read(|c| {
            c.query_row(
                "SELECT body FROM card_products WHERE tenant_id = ?1 AND id = ?2",
                params![uuid_bytes(tenant_id), uuid_bytes(id)],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)
        })
    }

    fn create_card(&self, card: &CardRow) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO cards (tenant_id, id, pan_index, status, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![uuid_bytes(card.tenant_id), uuid_bytes(card.id), &card.pan_index[..], card.status, card.body],
            )
            .map_err(|e| map_conflict(e, "a card with this id or number exists"))?;
            Ok(())
        })
    }

    fn card(&self, tenant_id: u128, id: u128) -> Result<Option<CardRow>> {
        self.read(|c| {
            c.query_row(
                "SELECT tenant_id, id, pan_index, status, body FROM cards WHERE tenant_id = ?1 AND id = ?2",
                params![uuid_bytes(tenant_id), uuid_bytes(id)],
                card_row,
            )
            .optional()
            .map_err(unavailable)?
            .transpose()
        })
    }

    fn card_by_index(&self, pan_index: &[u8; 32]) -> Result<Option<CardRow>> {
        self.read(|c| {
            c.prepare_cached("SELECT tenant_id, id, pan_index, status, body FROM cards WHERE pan_index = ?1")
                .map_err(unavailable)?
                .query_row([&pan_index[..]], card_row)
                .optional()
                .map_err(unavailable)?
                .transpose()
        })
    }

    fn update_card(&self, card: &CardRow, expected: &str) -> Result<bool> {
        self.with(|c| {
            let n = c
                .execute(
                    "UPDATE cards SET status = ?3, body = ?4 WHERE tenant_id = ?1 AND id = ?2 AND status = ?5",
                    params![uuid_bytes(card.tenant_id), uuid_bytes(card.id), card.status, card.body, expected],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn save_authorization(&self, row: &AuthorizationRow, message: Option<(&[u8; 32], &[u8])>) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(unavailable)?;
            write_authorization(&tx, row, message, false)?;
            tx.commit().map_err(unavailable)
        })
    }

    fn authorization(&self, tenant_id: u128, id: u128) -> Result<Option<AuthorizationRow>> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {AUTH_COLUMNS} FROM card_authorizations WHERE tenant_id = ?1 AND id = ?2"),
                params![uuid_bytes(tenant_id), uuid_bytes(id)],
                authorization_row,
            )
            .optional()
            .map_err(unavailable)?
            .transpose()
        })
    }

    fn authorization_by_rrn(&self, card_id: u128, rrn: &str) -> Result<Option<AuthorizationRow>> {
        // By the (card, RRN) index: left to itself, SQLite's planner takes the (card, time) one for
        // the `ORDER BY ... LIMIT 1`, and reads every authorization of the card to find none under
        // a new RRN, as every authorization now asks (the card benchmark's queue grew to seconds).
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {AUTH_COLUMNS} FROM card_authorizations INDEXED BY card_authorizations_by_rrn \
                 WHERE card_id = ?1 AND rrn = ?2 ORDER BY created_at DESC LIMIT 1"
            ))
            .map_err(unavailable)?
            .query_row(params![uuid_bytes(card_id), rrn], authorization_row)
            .optional()
            .map_err(unavailable)?
            .transpose()
        })
    }

    fn card_authorizations(&self, tenant_id: u128, card_id: u128, limit: usize) -> Result<Vec<AuthorizationRow>> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {AUTH_COLUMNS} FROM card_authorizations WHERE card_id = ?2 AND tenant_id = ?1                      ORDER BY created_at DESC LIMIT ?3"
                ))
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![uuid_bytes(tenant_id), uuid_bytes(card_id), limit as i64], authorization_row)
                .map_err(unavailable)?;
            rows.map(|r| r.map_err(unavailable)?).collect()
        })
    }

    fn card_message(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        self.read(|c| {
            c.prepare_cached("SELECT response FROM card_messages WHERE key = ?1")
                .map_err(unavailable)?
                .query_row([&key[..]], |r| r.get(0))
                .optional()
                .map_err(unavailable)
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
        self.read(|c| {
            let (today, this_month) = c
                .prepare_cached(
                    "SELECT COALESCE(SUM(CASE WHEN day >= ?2 THEN spend END), 0), COALESCE(SUM(spend), 0) \
                     FROM card_spend WHERE card_id = ?1 AND day >= ?3",
                )
                .map_err(unavailable)?
                .query_row(params![uuid_bytes(card_id), (day / DAY_NANOS) as i64, (month / DAY_NANOS) as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(unavailable)?;
            // Less the holds that lapsed (the ledger released them), made since the month began.
            let (lapsed_today, lapsed_month) = c
                .prepare_cached(
                    "SELECT COALESCE(SUM(CASE WHEN created_at >= ?2 THEN spend END), 0), COALESCE(SUM(spend), 0) \
                     FROM card_authorizations WHERE card_id = ?1 AND held_until > 0 AND held_until >= ?3 \
                     AND held_until <= ?4 AND created_at >= ?3",
                )
                .map_err(unavailable)?
                .query_row(params![uuid_bytes(card_id), day as i64, month as i64, now as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(unavailable)?;
            let (today, this_month) = (today - lapsed_today, this_month - lapsed_month);
            let recent: i64 = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM card_authorizations WHERE card_id = ?1 AND created_at >= ?2 \
                     LIMIT ?3)",
                )
                .map_err(unavailable)?
                .query_row(params![uuid_bytes(card_id), minute as i64, RECENT_COUNT_MAX], |r| r.get(0))
                .map_err(unavailable)?;
            Ok((today.max(0) as u64, this_month.max(0) as u64, recent as u32))
        })
    }

    fn holder(&self, tenant_id: u128, id: u128) -> Result<Option<HolderRecord>> {
        self.read(|c| {
            let row = c
                .query_row(
                    "SELECT kind, name_sealed, document_sealed, document_index, created_at FROM holders \
                     WHERE tenant_id = ?1 AND id = ?2",
                    params![uuid_bytes(tenant_id), uuid_bytes(id)],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                            r.get::<_, Vec<u8>>(3)?,
                            r.get::<_, i64>(4)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(kind, name_sealed, document_sealed, index, created_at)| {
                Ok(HolderRecord {
                    tenant_id,
                    id,
                    kind,
                    name_sealed,
                    document_sealed,
                    document_index: hash_of(&index)?,
                    created_at: created_at as u64,
                })
            })
            .transpose()
        })
    }

    fn audit_entries(&self, after: u64, limit: usize, tenant: Option<u128>) -> Result<Vec<audit::Entry>> {
        self.with(|c| {
            let mut out = Vec::new();
            let (sql, tenant) = match tenant {
                Some(t) => (
                    format!("SELECT {AUDIT_COLUMNS} FROM audit_entries WHERE tenant_id = ?3 AND seq > ?1 ORDER BY seq LIMIT ?2"),
                    Some(uuid_bytes(t)),
                ),
                None => (
                    format!("SELECT {AUDIT_COLUMNS} FROM audit_entries WHERE seq > ?1 AND ?3 IS NULL ORDER BY seq LIMIT ?2"),
                    None,
                ),
            };
            let mut stmt = c.prepare_cached(&sql).map_err(unavailable)?;
            let mut rows = stmt.query(params![after as i64, limit as i64, tenant]).map_err(unavailable)?;
            while let Some(row) = rows.next().map_err(unavailable)? {
                out.push(audit_row(row)?.0);
            }
            Ok(out)
        })
    }

    fn audit_head(&self) -> Result<Option<SignedHead>> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached("SELECT size, time, root, signature FROM audit_heads ORDER BY size DESC LIMIT 1")
                .map_err(unavailable)?;
            let mut rows = stmt.query([]).map_err(unavailable)?;
            rows.next().map_err(unavailable)?.map(head_row).transpose()
        })
    }

    fn audit_first_head(&self) -> Result<Option<SignedHead>> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached("SELECT size, time, root, signature FROM audit_heads ORDER BY size ASC LIMIT 1")
                .map_err(unavailable)?;
            let mut rows = stmt.query([]).map_err(unavailable)?;
            rows.next().map_err(unavailable)?.map(head_row).transpose()
        })
    }

    fn audit_node(&self, level: u8, index: u64) -> Result<Option<audit::Hash>> {
        self.with(|c| {
            let hash: Option<Vec<u8>> = if level == 0 {
                c.prepare_cached("SELECT leaf_hash FROM audit_entries WHERE seq = ?1")
                    .and_then(|mut s| s.query_row([index as i64 + 1], |r| r.get(0)).optional())
            } else {
                let last = crate::audit_log::last_leaf(level, index) as i64;
                c.prepare_cached("SELECT hash FROM audit_nodes WHERE last_leaf = ?1 AND level = ?2")
                    .and_then(|mut s| s.query_row(params![last, level], |r| r.get(0)).optional())
            }
            .map_err(unavailable)?;
            hash.map(|h| hash_of(&h)).transpose()
        })
    }

    fn audit_scan(&self, visit: &mut dyn FnMut(AuditItem) -> bool) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction().map_err(unavailable)?;
            {
                let mut entries = tx
                    .prepare(&format!("SELECT {AUDIT_COLUMNS}, leaf_hash FROM audit_entries ORDER BY seq"))
                    .map_err(unavailable)?;
                let mut heads = tx
                    .prepare("SELECT size, time, root, signature FROM audit_heads ORDER BY size")
                    .map_err(unavailable)?;
                let mut entry_rows = entries.query([]).map_err(unavailable)?;
                let mut head_rows = heads.query([]).map_err(unavailable)?;
                crate::audit_log::merge_scan(
                    || {
                        let Some(row) = entry_rows.next().map_err(unavailable)? else { return Ok(None) };
                        let (entry, leaf) = audit_row(row)?;
                        // Selected, so absent only if stored as something else than bytes.
                        let leaf =
                            leaf.ok_or_else(|| corrupt(format!("audit entry {} has no leaf hash", entry.seq)))?;
                        Ok(Some((entry, leaf)))
                    },
                    || head_rows.next().map_err(unavailable)?.map(head_row).transpose(),
                    visit,
                )?;
            }
            tx.commit().map_err(unavailable)
        })
    }
}

const AUDIT_COLUMNS: &str = "seq, time, tenant_id, actor, action, resource, request_id, source, outcome";

fn hash_of(bytes: &[u8]) -> Result<audit::Hash> {
    bytes.try_into().map_err(|_| corrupt(format!("audit hash of {} bytes", bytes.len())))
}

/// An entry row; with its stored leaf hash when the query selected it (column 9).
fn audit_row(row: &rusqlite::Row<'_>) -> Result<(audit::Entry, Option<audit::Hash>)> {
    let seq: i64 = row.get(0).map_err(unavailable)?;
    let time: i64 = row.get(1).map_err(unavailable)?;
    let tenant: Option<Vec<u8>> = row.get(2).map_err(unavailable)?;
    let entry = audit::Entry {
        seq: u64::try_from(seq).map_err(|_| corrupt(format!("audit seq {seq}")))?,
        time: u64::try_from(time).map_err(|_| corrupt(format!("audit time {time}")))?,
        draft: audit::Draft {
            tenant: tenant.map(|t| u128_of(&t).map_err(corrupt)).transpose()?,
            actor: row.get(3).map_err(unavailable)?,
            action: row.get(4).map_err(unavailable)?,
            resource: row.get(5).map_err(unavailable)?,
            request_id: row.get(6).map_err(unavailable)?,
            source: row.get(7).map_err(unavailable)?,
            outcome: row.get(8).map_err(unavailable)?,
        },
    };
    let leaf = match row.get::<_, Option<Vec<u8>>>(9) {
        Ok(Some(bytes)) => Some(hash_of(&bytes)?),
        _ => None,
    };
    Ok((entry, leaf))
}

fn head_row(row: &rusqlite::Row<'_>) -> Result<SignedHead> {
    let size: i64 = row.get(0).map_err(unavailable)?;
    let time: i64 = row.get(1).map_err(unavailable)?;
    let root: Vec<u8> = row.get(2).map_err(unavailable)?;
    Ok(SignedHead {
        head: audit::TreeHead {
            size: u64::try_from(size).map_err(|_| corrupt(format!("audit head size {size}")))?,
            time: u64::try_from(time).map_err(|_| corrupt(format!("audit head time {time}")))?,
            root: hash_of(&root)?,
        },
        signature: row.get(3).map_err(unavailable)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// SQLite is built without its process-wide locks on every page fetch and allocation
    /// (`.cargo/config.toml`): each connection's page cache is its own, and allocations keep no
    /// statistics. With either lock back, the writer waits on the readers.
    #[test]
    fn sqlite_is_built_without_process_wide_cache_and_malloc_locks() {
        let conn = Connection::open_in_memory().unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(options.iter().any(|o| o == "THREADSAFE=1"), "{options:?}");
        assert!(!options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"), "{options:?}");
        assert!(options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"), "{options:?}");
    }

    /// A connection leaves checkpoints to the server's checkpointer: past SQLite's default of
    /// 1,000 pages it used to checkpoint after its own commit (fsyncs and all), and the WAL then
    /// started over. Here about 1,500 pages committed in 300 transactions all stay in the WAL.
    #[test]
    fn no_connection_checkpoints_after_its_own_commits() {
        let dir = std::env::temp_dir().join(format!("rtpay-autocheckpoint-{}-{}", std::process::id(), now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        let conn = connect(&dir.join("t.db")).unwrap();
        conn.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        for _ in 0..300 {
            conn.execute("INSERT INTO t VALUES (zeroblob(16000))", []).unwrap();
        }
        let frames: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1)).unwrap();
        assert!(frames >= 1_200, "the WAL holds {frames} frames: it was checkpointed and started over");
        drop(conn);
        std::fs::remove_dir_all(dir).ok();
    }

    /// A data directory written by schema version 1 (ids looked up by hash) opens under version 2
    /// with every transfer still found by id, and passes verification.
    #[test]
    fn version_1_data_migrates_to_the_id_index() {
        let dir = std::env::temp_dir().join(format!("rtpay-migrate-{}-{}", std::process::id(), now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let mut conn = connect(&dir.join(DB_FILE)).unwrap();
            assert_eq!(apply_migrations(&mut conn, &SQLITE[..1]).unwrap(), vec![1]);
            let (tenant, a, b, t) = (uuid_bytes(7), uuid_bytes(1), uuid_bytes(2), uuid_bytes(99));
            conn.execute_batch("UPDATE ledger_meta SET last_timestamp = 30").unwrap();
            for (no, id, ts, debits, credits) in [(1, a, 10, 5, 0), (2, b, 11, 0, 5)] {
                conn.execute(
                    "INSERT INTO accounts VALUES (?1, ?2, ?3, 'USD', 1, 0, 0, NULL, ?4, ?5, ?6, 0, 0)",
                    params![tenant, id, no, ts, debits, credits],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO transfers (timestamp, id_hash, tenant_id, id, result, kind, debit_no, credit_no, \
                 debit_account_id, credit_account_id, amount, currency, amount_defaulted, timeout_seconds, code, state) \
                 VALUES (30, 12345, ?1, ?2, 0, 0, 1, 2, ?3, ?4, 5, 'USD', 0, 0, 1, 0)",
                params![tenant, t, a, b],
            )
            .unwrap();
        }
        let store = crate::Store::open(&crate::Location::Embedded(dir.clone())).unwrap();
        let key = TransferKey { tenant: TenantId(7), id: ledger::TransferId(99) };
        match store.queries.entry(key).unwrap() {
            Some(Entry::Created(t)) => assert_eq!((t.amount, t.timestamp), (5, 30)),
            other => panic!("transfer not found after migration: {other:?}"),
        }
        let listed = store
            .queries
            .account_transfers(
                AccountKey { tenant: TenantId(7), id: ledger::AccountId(2) },
                crate::Page { limit: 10, before: None },
            )
            .unwrap()
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert!(store.verify().unwrap().violations.is_empty());
        let versions: Vec<u32> = {
            let conn = connect(&dir.join(DB_FILE)).unwrap();
            let mut stmt = conn.prepare("SELECT version FROM schema_migrations ORDER BY version").unwrap();
            stmt.query_map([], |r| r.get(0)).unwrap().map(|v| v.unwrap()).collect()
        };
        assert_eq!(versions, (1..=SQLITE.len() as u32).collect::<Vec<_>>());
        let conn = connect(&dir.join(DB_FILE)).unwrap();
        let plan: String = conn
            .query_row(
                &format!("EXPLAIN QUERY PLAN SELECT {ENTRY_COLUMNS} FROM transfers WHERE {BY_ID}"),
                by_id(&key),
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("transfers_by_id"), "look-ups by id must use the id index: {plan}");
        drop(conn);
        store.close();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// An owner's documents are listed in the owner index's order, without sorting them all
    /// first (the sweep lists a page of in-flight payments however many there are).
    #[test]
    fn an_owners_documents_are_listed_in_index_order() {
        let dir = std::env::temp_dir().join(format!("rtpay-owner-plan-{}-{}", std::process::id(), now_nanos()));
        let store = crate::Store::open(&crate::Location::Embedded(dir.clone())).unwrap();
        let conn = connect(&dir.join(DB_FILE)).unwrap();
        let plan = |query: &str, values: &[&dyn rusqlite::ToSql]| -> Vec<String> {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN SELECT {DOCUMENT_COLUMNS} {query}")).unwrap();
            stmt.query_map(values, |r| r.get(3)).unwrap().map(|r| r.unwrap()).collect()
        };
        for plan in [
            plan(BY_OWNER, params!["pix-payment", "in-flight", 100]),
            plan(BY_OWNER_AFTER, params!["pix-payment", "in-flight", 100, 1, "a", uuid_bytes(7)]),
        ] {
            assert!(plan.iter().any(|step| step.contains("documents_by_owner")), "{plan:?}");
            assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "no sort: {plan:?}");
        }
        drop(conn);
        store.close();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Transfers stored before version 9 (listed through indexes) are linked into per-account
    /// chains by the migration: the listings, paged, are what the indexes gave, failures stay
    /// out, verification passes, and new transfers link behind the old ones.
    #[test]
    fn version_8_data_migrates_to_listing_chains() {
        let dir = std::env::temp_dir().join(format!("rtpay-migrate9-{}-{}", std::process::id(), now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        let tenant = 7u128;
        // (timestamp, id, debit, credit, amount); account 1, 2, 3 are numbers 1, 2, 3.
        let created = [(10, 100, 1, 2, 5), (11, 101, 2, 3, 2), (12, 102, 1, 3, 1), (14, 104, 3, 1, 3)];
        {
            let mut conn = connect(&dir.join(DB_FILE)).unwrap();
            assert_eq!(apply_migrations(&mut conn, &SQLITE[..8]).unwrap(), (1..=8).collect::<Vec<_>>());
            conn.execute_batch("UPDATE ledger_meta SET last_timestamp = 14").unwrap();
            for (no, debits, credits) in [(1u128, 6, 3), (2, 2, 5), (3, 3, 3)] {
                conn.execute(
                    "INSERT INTO accounts (tenant_id, id, no, currency, code, flags, credit_limit, timestamp, \
                     debits_posted, credits_posted, debits_pending, credits_pending) \
                     VALUES (?1, ?2, ?3, 'USD', 1, 0, 0, ?3, ?4, ?5, 0, 0)",
                    params![uuid_bytes(tenant), uuid_bytes(no), no as i64, debits, credits],
                )
                .unwrap();
            }
            let insert = "INSERT INTO transfers (timestamp, tenant_id, id, result, kind, debit_no, credit_no, \
                 debit_account_id, credit_account_id, amount, currency, amount_defaulted, timeout_seconds, code, state) \
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9, 'USD', 0, 0, 1, 0)";
            for (ts, id, d, c, amount) in created {
                conn.execute(
                    insert,
                    params![
                        ts,
                        uuid_bytes(tenant),
                        uuid_bytes(id),
                        0,
                        d as i64,
                        c as i64,
                        uuid_bytes(d),
                        uuid_bytes(c),
                        amount
                    ],
                )
                .unwrap();
            }
            let failed = ledger::TransferResult::InsufficientFunds as i64;
            conn.execute(
                insert,
                params![
                    13,
                    uuid_bytes(tenant),
                    uuid_bytes(103u128),
                    failed,
                    None::<i64>,
                    None::<i64>,
                    uuid_bytes(1u128),
                    uuid_bytes(2u128),
                    1_000
                ],
            )
            .unwrap();
        }
        let store = crate::Store::open(&crate::Location::Embedded(dir.clone())).unwrap();
        let listing = |account: u128, limit: usize| -> Vec<u128> {
            let key = AccountKey { tenant: TenantId(tenant), id: ledger::AccountId(account) };
            let (mut out, mut before) = (Vec::new(), None);
            loop {
                let page = store.queries.account_transfers(key, crate::Page { limit, before }).unwrap().unwrap();
                out.extend(page.iter().map(|t| t.key.id.0));
                match page.last() {
                    Some(t) if page.len() == limit => before = Some(t.timestamp),
                    _ => return out,
                }
            }
        };
        assert_eq!(listing(1, 1), [104, 102, 100]);
        assert_eq!(listing(2, 1), [101, 100]);
        assert_eq!(listing(3, 2), [104, 102, 101]);
        assert!(store.verify().unwrap().violations.is_empty(), "{:?}", store.verify().unwrap().violations);
        let event = ledger::TransferEvent {
            key: TransferKey { tenant: TenantId(tenant), id: ledger::TransferId(105) },
            kind: ledger::EventKind::Posted { debit: ledger::AccountId(2), credit: ledger::AccountId(1), amount: 1 },
            code: 1,
            metadata: None,
            linked: false,
        };
        assert_eq!(store.engine.transfers(vec![event]).unwrap()[0].result, ledger::TransferResult::Created);
        assert_eq!(listing(1, 2), [105, 104, 102, 100]);
        assert_eq!(listing(2, 5), [105, 101, 100]);
        assert!(store.verify().unwrap().violations.is_empty());
        store.close();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Documents stored in the version 9 table (WITHOUT ROWID) come through the move to a rowid
    /// table whole: found by id, by lookup, by owner and by time; the id and the lookup stay
    /// unique; a document without a lookup or owner is still found by id and time.
    #[test]
    fn version_9_documents_migrate_to_a_rowid_table() {
        let dir = std::env::temp_dir().join(format!("rtpay-migrate10-{}-{}", std::process::id(), now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        let tenant = 7u128;
        let doc = |id: &str, lookup: Option<&str>, owner: Option<&str>, at: u64| Document {
            kind: "pix-payment".into(),
            tenant_id: tenant,
            id: id.into(),
            lookup: lookup.map(Into::into),
            owner: owner.map(Into::into),
            created_at: at,
            version: 1,
            body: format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(600)),
        };
        let old = [
            doc("b", Some("E2"), Some("acct:1"), 20),
            doc("a", Some("E1"), Some("acct:1"), 10),
            doc("c", None, None, 30),
        ];
        {
            let mut conn = connect(&dir.join(DB_FILE)).unwrap();
            assert_eq!(apply_migrations(&mut conn, &SQLITE[..9]).unwrap(), (1..=9).collect::<Vec<_>>());
            for d in &old {
                insert_document_row(&conn, d).unwrap();
            }
            let without_rowid: String =
                conn.query_row("SELECT sql FROM sqlite_schema WHERE name = 'documents'", [], |r| r.get(0)).unwrap();
            assert!(without_rowid.contains("WITHOUT ROWID"));
        }
        let store = crate::Store::open(&crate::Location::Embedded(dir.clone())).unwrap();
        let q = &store.queries;
        for d in &old {
            assert_eq!(q.document("pix-payment", tenant, &d.id).unwrap().as_ref(), Some(d));
        }
        assert_eq!(q.document_by_lookup("pix-payment", "E1").unwrap().unwrap().id, "a");
        assert_eq!(q.count_documents("pix-payment", "acct:1").unwrap(), 2);
        let owned: Vec<String> =
            q.documents_by_owner("pix-payment", "acct:1", None, 10).unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(owned, ["a", "b"]);
        let listed = q
            .documents(&DocumentQuery {
                kind: "pix-payment",
                tenant_id: tenant,
                from: 0,
                to: u64::MAX,
                owner: None,
                after: None,
                limit: 10,
            })
            .unwrap();
        assert_eq!(listed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        // Still unique: the id per kind and tenant, the lookup per kind (two without one are fine).
        assert!(matches!(q.insert_document(&doc("a", Some("E9"), None, 40)), Err(StoreError::Conflict(_))));
        assert!(matches!(q.insert_document(&doc("d", Some("E1"), None, 40)), Err(StoreError::Conflict(_))));
        q.insert_document(&doc("e", None, None, 50)).unwrap();
        assert_eq!(q.document("pix-payment", tenant, "e").unwrap().unwrap().created_at, 50);
        store.close();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Pix spending counters named by a holder alone move to names of the tenant and the holder
    /// (migration 13; see `testing::spend_counters`).
    #[test]
    fn version_12_spend_counters_move_to_their_tenants_names() {
        use crate::testing::spend_counters;
        let dir = std::env::temp_dir().join(format!("rtpay-migrate13-{}-{}", std::process::id(), now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let mut conn = connect(&dir.join(DB_FILE)).unwrap();
            assert_eq!(apply_migrations(&mut conn, &SQLITE[..12]).unwrap(), (1..=12).collect::<Vec<_>>());
            for (i, (tenant, holder)) in spend_counters::holders().into_iter().enumerate() {
                conn.execute(
                    "INSERT INTO holders (tenant_id, id, kind, name_sealed, document_sealed, document_index, created_at) \
                     VALUES (?1, ?2, 'person', x'00', x'00', ?3, 1)",
                    params![uuid_bytes(tenant), uuid_bytes(holder), vec![i as u8]],
                )
                .unwrap();
            }
            for (scope, period, total) in spend_counters::old_counters() {
                conn.execute(
                    "INSERT INTO counters (scope, period, total) VALUES (?1, ?2, ?3)",
                    params![scope, period, total],
                )
                .unwrap();
            }
        }
        let store = crate::Store::open(&crate::Location::Embedded(dir.clone())).unwrap();
        spend_counters::check(store.queries.as_ref());
        store.close();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Authorizations stored before migration 14 take their hold's lapse (see
    /// `testing::lapsing_holds`).
    #[test]
    fn version_13_authorizations_take_their_holds_lapse() {
        use crate::testing::lapsing_holds;
        let dir = std::env::temp_dir().join(format!("rtpay-migrate14-{}-{}", std::process::id(), now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let mut conn = connect(&dir.join(DB_FILE)).unwrap();
            assert_eq!(apply_migrations(&mut conn, &SQLITE[..13]).unwrap(), (1..=13).collect::<Vec<_>>());
            for (i, (tenant, id, expires_at)) in lapsing_holds::holds().into_iter().enumerate() {
                conn.execute(
                    "INSERT INTO transfers (timestamp, tenant_id, id, result, kind, amount_defaulted, timeout_seconds, \
                     expires_at, code, state) VALUES (?1, ?2, ?3, 0, 0, 0, 1, ?4, 1, 1)",
                    params![i as i64 + 1, uuid_bytes(tenant), uuid_bytes(id), expires_at],
                )
                .unwrap();
            }
            for (id, body, _) in lapsing_holds::authorizations() {
                conn.execute(
                    "INSERT INTO card_authorizations (tenant_id, id, card_id, rrn, created_at, spend, body) \
                     VALUES (?1, ?2, ?3, 'r', 1, 1, ?4)",
                    params![uuid_bytes(lapsing_holds::TENANT), uuid_bytes(id), uuid_bytes(9), body],
                )
                .unwrap();
            }
        }
        // The commands beside the servers ask for a migrated database.
        let refused = crate::Store::open_queries(&crate::Location::Embedded(dir.clone())).err().unwrap();
        assert!(refused.to_string().contains("run `rtpay migrate` first"), "{refused}");
        crate::Store::open(&crate::Location::Embedded(dir.clone())).unwrap().close();
        crate::Store::open_queries(&crate::Location::Embedded(dir.clone())).unwrap();
        let conn = connect(&dir.join(DB_FILE)).unwrap();
        for (id, body, held_until) in lapsing_holds::authorizations() {
            let stored: i64 = conn
                .query_row("SELECT held_until FROM card_authorizations WHERE id = ?1", [uuid_bytes(id)], |r| r.get(0))
                .unwrap();
            assert_eq!(stored, held_until, "{body}");
        }
        drop(conn);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A command creating a plain USD account.
    fn create_usd(key: AccountKey) -> ledger::AccountCommand {
        ledger::AccountCommand::Create(ledger::NewAccount {
            key,
            currency: ledger::Currency::parse("USD").unwrap(),
            code: 1,
            flags: ledger::AccountFlags(0),
            credit_limit: 0,
            metadata: None,
            holder: None,
        })
    }

    /// A writer keeping at most four accounts in memory reads the others from storage as batches
    /// name them: balances, numbers and listing links stay right across evictions and a reopen
    /// (which reads no account at all), and a stored account that was not read is never numbered
    /// again: the batch that would do it is refused whole.
    #[test]
    fn a_writer_keeping_few_accounts_reads_the_others_from_storage() {
        let dir = std::env::temp_dir().join(format!("rtpay-account-cache-{}-{}", std::process::id(), now_nanos()));
        let tenant = TenantId(7);
        let key = |id: u128| AccountKey { tenant, id: ledger::AccountId(id) };
        let posted = |id: u128, debit: u128, credit: u128, amount: u64| ledger::TransferEvent {
            key: TransferKey { tenant, id: ledger::TransferId(id) },
            kind: ledger::EventKind::Posted {
                debit: ledger::AccountId(debit),
                credit: ledger::AccountId(credit),
                amount,
            },
            code: 1,
            metadata: None,
            linked: false,
        };
        // One batch as the engine runs it: accounts read, then created, then transfers applied.
        let batch = |writer: &mut SqliteWriter, create: &[u128], transfers: &[ledger::TransferEvent]| -> Result<()> {
            let mut clock = writer.begin()?;
            assert!(writer.accounts.len() <= 4, "{} accounts kept", writer.accounts.len());
            let mut snapshot = MemoryLedger { clock, ..MemoryLedger::default() };
            let keys: Vec<AccountKey> = create.iter().map(|&id| key(id)).collect();
            writer.load_accounts(&keys, &mut snapshot)?;
            let commands: Vec<_> = keys.iter().map(|&k| create_usd(k)).collect();
            let (results, accounts) = ledger::apply_accounts(&snapshot, &mut clock, now_nanos(), &commands);
            assert!(results.iter().all(|(r, _)| *r == ledger::AccountResult::Created), "{results:?}");
            snapshot.commit(accounts.clone());
            let keys = ledger::Prefetch::accounts_of(transfers, &snapshot);
            writer.load_accounts(&keys, &mut snapshot)?;
            let (outcomes, moved) = ledger::apply_transfers(&snapshot, &mut clock, now_nanos(), transfers);
            assert!(outcomes.iter().all(|o| o.result == TransferResult::Created), "{outcomes:?}");
            let result = writer.commit(&[accounts, moved], &[], &[]);
            match result {
                Ok(()) => writer
                    .deferred_sync()
                    .expect("the embedded writer defers its syncs")
                    .sync()
                    .map_err(|e| StoreError::Unavailable(e.to_string())),
                Err(e) => {
                    writer.rollback();
                    Err(e)
                }
            }
        };
        // Expected: each account's net credits, and its listed transfers, oldest first.
        let mut net = [0i64; 15];
        let mut listed: Vec<Vec<u128>> = vec![Vec::new(); 15];
        let mut expect = |t: &ledger::TransferEvent| {
            let ledger::EventKind::Posted { debit, credit, amount } = t.kind else { unreachable!() };
            net[debit.0 as usize] -= amount as i64;
            net[credit.0 as usize] += amount as i64;
            listed[debit.0 as usize].push(t.key.id.0);
            listed[credit.0 as usize].push(t.key.id.0);
        };
        let (mut writer, queries) = open_writer(&dir, crate::ephemeral_signer(), 4).unwrap();
        batch(&mut writer, &(1..=12).collect::<Vec<_>>(), &[]).unwrap();
        let mut id = 100;
        for round in 0..6u128 {
            // Each batch names four accounts, most of them evicted since they were last named.
            let transfers: Vec<_> = (0..2)
                .map(|k| {
                    id += 1;
                    let debit = (round * 5 + k * 7) % 12 + 1;
                    posted(id, debit, debit % 12 + 1, (id % 9 + 1) as u64)
                })
                .collect();
            transfers.iter().for_each(&mut expect);
            batch(&mut writer, &[], &transfers).unwrap();
        }
        drop(writer);

        // Reopened: accounts are read as named; new accounts get numbers of their own.
        let (mut writer, _) = open_writer(&dir, crate::ephemeral_signer(), 4).unwrap();
        assert_eq!(writer.accounts.len(), 0, "nothing read at open");
        let transfers = [posted(200, 13, 1, 3), posted(201, 2, 14, 4), posted(202, 14, 13, 1)];
        transfers.iter().for_each(&mut expect);
        batch(&mut writer, &[13, 14], &transfers).unwrap();

        // Account 5 is stored and not in memory: a batch creating it without reading it first
        // (which the engine never does) would number it again, and is refused with nothing kept.
        assert!(!writer.accounts.contains_key(&key(5)));
        let mut clock = writer.begin().unwrap();
        let snapshot = MemoryLedger { clock, ..MemoryLedger::default() };
        let (_, again) = ledger::apply_accounts(&snapshot, &mut clock, now_nanos(), &[create_usd(key(5))]);
        assert!(writer.commit(&[again], &[], &[]).is_err(), "a second number for a stored account");
        writer.rollback();
        batch(&mut writer, &[], &[]).unwrap();

        for id in 1..=14u128 {
            let account = queries.account(key(id)).unwrap().unwrap();
            let got = account.credits_posted as i64 - account.debits_posted as i64;
            assert_eq!(got, net[id as usize], "account {id}");
            let page = queries.account_transfers(key(id), crate::Page { before: None, limit: 100 }).unwrap().unwrap();
            let newest_first: Vec<u128> = listed[id as usize].iter().rev().copied().collect();
            assert_eq!(page.iter().map(|t| t.key.id.0).collect::<Vec<_>>(), newest_first, "account {id}");
        }
        assert!(queries.listing_violations().unwrap().is_empty());
        let numbers: i64 = Connection::open(db_path(&dir).unwrap())
            .unwrap()
            .query_row("SELECT count(DISTINCT no) FROM accounts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(numbers, 14);
        drop(writer);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A read that sees a commit whose sync the writer left owed answers only once the sync is
    /// made; a read that comes after the sync does not wait.
    #[test]
    fn a_read_of_a_commit_not_yet_synced_waits_for_the_sync() {
        let dir = std::env::temp_dir().join(format!("rtpay-unsynced-{}-{}", std::process::id(), now_nanos()));
        let (mut writer, queries) = open(&dir, crate::ephemeral_signer()).unwrap();
        let mut sync = writer.deferred_sync().expect("the embedded writer defers its syncs");
        let key = AccountKey { tenant: TenantId(7), id: ledger::AccountId(1) };
        let mut clock = writer.begin().unwrap();
        let snapshot = MemoryLedger { clock, ..MemoryLedger::default() };
        let (_, accounts) = ledger::apply_accounts(&snapshot, &mut clock, now_nanos(), &[create_usd(key)]);
        writer.commit(&[accounts], &[], &[]).unwrap();
        assert!(writer.sync_owed());
        let (read, answered) = std::sync::mpsc::channel();
        let reader = {
            let queries = queries.clone();
            std::thread::spawn(move || read.send(queries.account(key).unwrap().is_some()).unwrap())
        };
        assert!(
            answered.recv_timeout(std::time::Duration::from_millis(300)).is_err(),
            "the read answered before the commit it saw was synced"
        );
        sync.sync().unwrap();
        assert_eq!(answered.recv_timeout(std::time::Duration::from_secs(10)), Ok(true));
        reader.join().unwrap();
        assert!(queries.account(key).unwrap().is_some(), "after the sync, at once");
        // An async read gets its fence instead of blocking.
        let (found, fence) = crate::read_deferring(|| queries.account(key).unwrap().is_some());
        assert!(found && fence.is_passed());
        drop(writer);
        std::fs::remove_dir_all(&dir).ok();
    }

    fn session_doc(id: &str) -> Document {
        Document {
            kind: "test".into(),
            tenant_id: 7,
            id: id.into(),
            lookup: None,
            owner: None,
            created_at: 1,
            version: 1,
            body: "{}".into(),
        }
    }

    /// Commits one account through the writer, synced.
    fn commit_account(writer: &mut Box<dyn Writer>, key: AccountKey) {
        let mut clock = writer.begin().unwrap();
        let snapshot = MemoryLedger { clock, ..MemoryLedger::default() };
        let (_, accounts) = ledger::apply_accounts(&snapshot, &mut clock, now_nanos(), &[create_usd(key)]);
        writer.commit(&[accounts], &[], &[]).unwrap();
        writer.deferred_sync().unwrap().sync().unwrap();
    }

    /// A read session's reads share one snapshot and one pooled connection; a write through
    /// `Queries` inside it ends the snapshot first, so the reads after it see the write; the
    /// session gives its connection back when it ends.
    #[test]
    fn a_read_session_reads_one_snapshot_and_sees_its_own_writes() {
        let dir = std::env::temp_dir().join(format!("rtpay-session-{}-{}", std::process::id(), now_nanos()));
        let (mut writer, _) = open(&dir, crate::ephemeral_signer()).unwrap();
        let queries = SqliteQueries::new(db_path(&dir).unwrap(), None);
        let (a, b) = (
            AccountKey { tenant: TenantId(7), id: AccountId(1) },
            AccountKey { tenant: TenantId(7), id: AccountId(2) },
        );
        commit_account(&mut writer, a);
        let ((), fence) = crate::read_deferring(|| {
            assert!(queries.account(a).unwrap().is_some());
            // Committed by the writer after the session's first read: not in its snapshot.
            commit_account(&mut writer, b);
            assert!(queries.account(b).unwrap().is_none(), "a session's reads see one snapshot");
            assert!(queries.document("test", 7, "d").unwrap().is_none());
            // A write through `Queries` ends the snapshot: what follows sees it, and the writer's.
            queries.insert_document(&session_doc("d")).unwrap();
            assert!(queries.document("test", 7, "d").unwrap().is_some(), "a session sees its own writes");
            assert!(queries.account(b).unwrap().is_some(), "and what was committed before them");
        });
        assert!(fence.is_passed());
        // Outside a session, every read sees the newest commit.
        commit_account(&mut writer, AccountKey { tenant: TenantId(7), id: AccountId(3) });
        assert!(queries.account(AccountKey { tenant: TenantId(7), id: AccountId(3) }).unwrap().is_some());
        HELD.with(|h| assert!(h.borrow().is_none(), "the session gave its connection back"));
        drop(writer);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A session whose reads panic still ends: no read transaction is left open on the thread
    /// (it would keep the WAL from ever starting over), and the connection goes back to the pool.
    #[test]
    fn a_read_session_that_panics_still_ends_its_transaction() {
        let dir = std::env::temp_dir().join(format!("rtpay-session-panic-{}-{}", std::process::id(), now_nanos()));
        let (mut writer, _) = open(&dir, crate::ephemeral_signer()).unwrap();
        let queries = SqliteQueries::new(db_path(&dir).unwrap(), None);
        let a = AccountKey { tenant: TenantId(7), id: AccountId(1) };
        commit_account(&mut writer, a);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::read_deferring(|| {
                assert!(queries.account(a).unwrap().is_some());
                panic!("a read that panics");
            })
        }));
        assert!(panicked.is_err());
        HELD.with(|h| assert!(h.borrow().is_none(), "the session ended on unwind"));
        let state = queries.pool.state.lock().unwrap();
        assert_eq!(state.idle.len(), state.open, "every pooled connection is back");
        assert!(state.idle.iter().all(Connection::is_autocommit), "none holds a transaction");
        drop(state);
        drop(writer);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// One session reading two stores (two data directories) reads each from its own pool.
    #[test]
    fn a_read_session_over_two_stores_reads_each_from_its_own() {
        let dirs: Vec<_> = (0..2)
            .map(|i| std::env::temp_dir().join(format!("rtpay-session-two-{i}-{}-{}", std::process::id(), now_nanos())))
            .collect();
        let (mut w1, _) = open(&dirs[0], crate::ephemeral_signer()).unwrap();
        let (w2, _) = open(&dirs[1], crate::ephemeral_signer()).unwrap();
        let (q1, q2) = (
            SqliteQueries::new(db_path(&dirs[0]).unwrap(), None),
            SqliteQueries::new(db_path(&dirs[1]).unwrap(), None),
        );
        let a = AccountKey { tenant: TenantId(7), id: AccountId(1) };
        commit_account(&mut w1, a);
        crate::read_deferring(|| {
            assert!(q1.account(a).unwrap().is_some());
            assert!(q2.account(a).unwrap().is_none());
            assert!(q1.account(a).unwrap().is_some());
        });
        HELD.with(|h| assert!(h.borrow().is_none()));
        for q in [&q1, &q2] {
            let state = q.pool.state.lock().unwrap();
            assert_eq!((state.idle.len(), state.open), (1, 1), "one connection each, back in its pool");
        }
        drop((w1, w2));
        for dir in dirs {
            std::fs::remove_dir_all(&dir).ok();
        }
    }

    /// One batch whose parts write the same account more than once (its creation, then a transfer
    /// to it; an expiry and a transfer on one account) links and stores the heads right.
    #[test]
    fn an_account_written_by_two_parts_of_one_batch_keeps_its_listing() {
        let dir = std::env::temp_dir().join(format!("rtpay-parts-{}-{}", std::process::id(), now_nanos()));
        let (mut writer, queries) = open(&dir, crate::ephemeral_signer()).unwrap();
        let tenant = TenantId(7);
        let key = |id: u128| AccountKey { tenant, id: ledger::AccountId(id) };
        let create = |id: u128| create_usd(key(id));
        let posted = |id: u128, debit: u128, credit: u128| ledger::TransferEvent {
            key: TransferKey { tenant, id: ledger::TransferId(id) },
            kind: ledger::EventKind::Posted {
                debit: ledger::AccountId(debit),
                credit: ledger::AccountId(credit),
                amount: 5,
            },
            code: 1,
            metadata: None,
            linked: false,
        };
        let now = now_nanos();
        let mut clock = writer.begin().unwrap();
        let mut snapshot = MemoryLedger { clock, ..MemoryLedger::default() };
        let (_, accounts) = ledger::apply_accounts(&snapshot, &mut clock, now, &[create(1), create(2)]);
        snapshot.commit(accounts.clone());
        let (_, transfers) = ledger::apply_transfers(&snapshot, &mut clock, now, &[posted(10, 1, 2), posted(11, 2, 1)]);
        // Both accounts appear in both parts.
        writer.commit(&[accounts, transfers], &[], &[]).unwrap();
        // Without an engine, the test makes the sync the commit left owed; reads wait for it.
        assert!(writer.sync_owed());
        writer.deferred_sync().expect("the embedded writer defers its syncs").sync().unwrap();
        let listed = |id: u128| -> Vec<u128> {
            let page = queries.account_transfers(key(id), crate::Page { before: None, limit: 10 }).unwrap().unwrap();
            page.iter().map(|t| t.key.id.0).collect()
        };
        assert_eq!(listed(1), [11, 10]);
        assert_eq!(listed(2), [11, 10]);
        assert!(queries.listing_violations().unwrap().is_empty());
        drop(writer);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A batch whose rows break a constraint (here: an audit entry whose number is taken, halfway
    /// through a multi-row insert) leaves nothing of itself, its transfer included; the writer's
    /// `OR ROLLBACK` statements end the transaction, nothing stays open, and the next batch commits.
    #[test]
    fn a_batch_breaking_a_constraint_leaves_nothing_and_the_writer_goes_on() {
        let dir = std::env::temp_dir().join(format!("rtpay-constraint-{}-{}", std::process::id(), now_nanos()));
        let (mut writer, queries) = open(&dir, crate::ephemeral_signer()).unwrap();
        let tenant = TenantId(7);
        let key = |id: u128| AccountKey { tenant, id: ledger::AccountId(id) };
        let mut clock = writer.begin().unwrap();
        let snapshot = MemoryLedger { clock, ..MemoryLedger::default() };
        let (_, accounts) =
            ledger::apply_accounts(&snapshot, &mut clock, now_nanos(), &[create_usd(key(1)), create_usd(key(2))]);
        writer.commit(&[accounts], &[], &[]).unwrap();
        writer.deferred_sync().expect("the embedded writer defers its syncs").sync().unwrap();

        // Another connection takes audit entry 2: the batch's second entry.
        let other = Connection::open(db_path(&dir).unwrap()).unwrap();
        other.busy_timeout(std::time::Duration::from_millis(200)).unwrap();
        let take =
            "INSERT INTO audit_entries (seq, time, actor, action, resource, request_id, source, outcome, leaf_hash) \
                    VALUES (2, 1, 'a', 'b', 'c', 'd', 'e', 'f', x'00')";
        other.execute(take, []).unwrap();
        let transfer = ledger::TransferEvent {
            key: TransferKey { tenant, id: ledger::TransferId(10) },
            kind: ledger::EventKind::Posted { debit: ledger::AccountId(1), credit: ledger::AccountId(2), amount: 5 },
            code: 1,
            metadata: None,
            linked: false,
        };
        let draft =
            |n: u32| audit::Draft { actor: format!("test {n}"), outcome: "created".into(), ..audit::Draft::default() };
        let attempt = |writer: &mut Box<dyn Writer>| -> Result<()> {
            let mut clock = writer.begin()?;
            let mut snapshot = MemoryLedger { clock, ..MemoryLedger::default() };
            writer.load_accounts(&[key(1), key(2)], &mut snapshot)?;
            let (_, transfers) =
                ledger::apply_transfers(&snapshot, &mut clock, now_nanos(), std::slice::from_ref(&transfer));
            let result = writer.commit(&[transfers], &[(clock.last, draft(1)), (clock.last + 1, draft(2))], &[]);
            if result.is_err() {
                writer.rollback();
            }
            result
        };
        assert!(attempt(&mut writer).is_err(), "entry 2 is taken");
        let entries: i64 = other.query_row("SELECT count(*) FROM audit_entries", [], |r| r.get(0)).unwrap();
        assert_eq!(entries, 1, "only the other connection's entry");
        assert_eq!(queries.entry(transfer.key).unwrap(), None, "the transfer went with the batch");
        assert_eq!(queries.account(key(1)).unwrap().unwrap().debits_posted, 0);
        // No transaction is left open: the other connection can write at once.
        other.execute("DELETE FROM audit_entries WHERE seq = 2", []).unwrap();

        attempt(&mut writer).unwrap();
        writer.deferred_sync().expect("the embedded writer defers its syncs").sync().unwrap();
        assert!(queries.entry(transfer.key).unwrap().is_some());
        assert_eq!(queries.account(key(1)).unwrap().unwrap().debits_posted, 5);
        let entries: i64 = other.query_row("SELECT count(*) FROM audit_entries", [], |r| r.get(0)).unwrap();
        assert_eq!(entries, 2);
        drop(writer);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A data directory written by a later rtpay (a schema version this one does not know) is
    /// refused, and left as it was.
    #[test]
    fn a_newer_schema_is_refused_at_open() {
        let dir = std::env::temp_dir().join(format!("rtpay-newer-{}-{}", std::process::id(), now_nanos()));
        drop(crate::Store::open(&crate::Location::Embedded(dir.clone())).unwrap());
        let future = SQLITE.len() as u32 + 1;
        connect(&dir.join(DB_FILE))
            .unwrap()
            .execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, 'future', 0)", [future])
            .unwrap();
        let refused = crate::Store::open(&crate::Location::Embedded(dir.clone())).err().expect("refused");
        assert!(refused.to_string().contains(&format!("schema version {future}")), "{refused}");
        assert!(crate::Store::migrate(&crate::Location::Embedded(dir.clone())).is_err());
        // Reading (`rtpay verify`) and appending beside a server (`rtpay keys rotate`) too.
        assert!(crate::Store::open_queries(&crate::Location::Embedded(dir.clone())).is_err());
        let appended = append_audit_beside(&dir, &crate::ephemeral_signer(), Vec::new(), now_nanos());
        assert!(appended.is_err_and(|e| e.to_string().contains("newer than this rtpay knows")));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A listing chain edited behind rtpay's back is reported by verification.
    #[test]
    fn verification_reports_a_broken_listing_chain() {
        let dir = std::env::temp_dir().join(format!("rtpay-chain-{}-{}", std::process::id(), now_nanos()));
        let location = crate::Location::Embedded(dir.clone());
        let tenant = TenantId(7);
        {
            let store = crate::Store::open(&location).unwrap();
            let accounts = [1u128, 2].map(|id| create_usd(AccountKey { tenant, id: ledger::AccountId(id) }));
            store.engine.accounts(accounts.to_vec()).unwrap();
            let events: Vec<ledger::TransferEvent> = (1..=3u128)
                .map(|id| ledger::TransferEvent {
                    key: TransferKey { tenant, id: ledger::TransferId(id) },
                    kind: ledger::EventKind::Posted {
                        debit: ledger::AccountId(1),
                        credit: ledger::AccountId(2),
                        amount: 1,
                    },
                    code: 1,
                    metadata: None,
                    linked: false,
                })
                .collect();
            store.engine.transfers(events).unwrap();
            assert!(store.verify().unwrap().violations.is_empty());
            store.close();
        }
        let conn = connect(&dir.join(DB_FILE)).unwrap();
        // The newest transfer skips the middle one.
        conn.execute_batch(
            "UPDATE transfers SET debit_prev = (SELECT min(timestamp) FROM transfers) \
             WHERE timestamp = (SELECT max(timestamp) FROM transfers)",
        )
        .unwrap();
        drop(conn);
        let queries = crate::Store::open_queries(&location).unwrap();
        let report = crate::verify_with(queries.as_ref()).unwrap();
        assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
        assert!(report.violations[0].0.contains("debit account's listing"), "{:?}", report.violations);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// While the checkpointer runs its quiesced pass, no batch starts; afterwards batches go on.
    #[test]
    fn the_gate_holds_the_writer_only_during_the_quiesced_pass() {
        let gate = Arc::new(Gate::default());
        let in_pass = Arc::new(AtomicBool::new(false));
        let batches = Arc::new(AtomicU64::new(0));
        let violations = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (gate, in_pass, batches, violations, stop) =
                (gate.clone(), in_pass.clone(), batches.clone(), violations.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    gate.pass();
                    // A batch: must never overlap the quiesced pass.
                    if in_pass.load(Ordering::SeqCst) {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                    batches.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            })
        };
        let mut ran = 0;
        for _ in 0..20 {
            gate.quiesced(|| {
                in_pass.store(true, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(2));
                in_pass.store(false, Ordering::SeqCst);
                ran += 1;
            });
            let before = batches.load(Ordering::SeqCst);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while batches.load(Ordering::SeqCst) <= before {
                assert!(std::time::Instant::now() < deadline, "the writer goes on after the pass");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert_eq!(ran, 20, "every pass found the writer waiting");
        assert_eq!(violations.load(Ordering::SeqCst), 0, "a batch ran during a quiesced pass");
    }

    /// With no writer, the checkpointer does not wait forever: it gives up after the bound.
    #[test]
    fn the_gate_gives_up_without_a_writer() {
        let gate = Gate::default();
        let started = std::time::Instant::now();
        let mut ran = false;
        gate.quiesced(|| ran = true);
        assert!(!ran);
        assert!(started.elapsed() >= QUIESCE_WAIT_MAX);
        gate.pass(); // not held: quiesce was cleared
    }
}
