//! The single writer: requests queue up while the previous batch commits, and the next batch takes
//! them all (group commit). One transaction per batch, one fsync per batch, replies after it.
//!
//! A writer may leave its commits' sync to the engine ([`crate::Writer::deferred_sync`]): then a
//! syncer thread makes each committed batch durable and sends its replies, while the writer
//! applies the next batch (see `crate::durable`). One sync covers every batch committed before it
//! began.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ledger::*;

use crate::{Result, StoreError, Writer};

/// Requests waiting for the writer. A full queue answers `Busy` at once rather than letting
/// latency grow without bound.
pub const QUEUE_LEN_MAX: usize = 16 * 1024;

/// Ledger events (and audit drafts) waiting for the writer, over all queued requests: four full
/// batches. Past it, a request is answered `Busy` too: requests of 8,190 transfers each, sent
/// while the writer waits on a database that went away, would otherwise fill `QUEUE_LEN_MAX`
/// slots with gigabytes.
pub const QUEUED_EVENTS_MAX: usize = 4 * BATCH_EVENTS_MAX;

/// The most ledger events one batch applies: one commit, one fsync.
pub const BATCH_EVENTS_MAX: usize = 4 * BATCH_LEN_MAX;

/// How often the writer looks for pending transfers whose timeout passed.
pub const EXPIRY_INTERVAL: Duration = Duration::from_millis(500);

/// How many expired holds one sweep releases; the next sweep takes the rest.
pub const EXPIRY_SWEEP_MAX: usize = 4096;

/// How many sweeps in a row a batch's jobs wait for while a backlog of due holds is released
/// (about a million holds); past that they are applied, so that a backlog refilled as fast as it
/// drains (or holds storage cannot release, many of them) never holds every writer job back.
pub const BACKLOG_SWEEPS_MAX: u32 = 256;

/// What a client asks the writer to do.
#[derive(Debug, Clone)]
pub enum Command {
    Accounts(Vec<AccountCommand>),
    /// Events of one request. Linked chains may not run past the request's last event.
    Transfers(Vec<TransferEvent>),
    /// Audit entries to append (actions that are not ledger commands: the control plane, failed
    /// authentication, reveals).
    Audit(Vec<audit::Draft>),
}

impl Command {
    fn len(&self) -> usize {
        match self {
            Command::Accounts(c) => c.len(),
            Command::Transfers(e) => e.len(),
            Command::Audit(d) => d.len(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Reply {
    Accounts(Vec<(AccountResult, Option<Account>)>),
    Transfers(Vec<Outcome>),
    Audited,
}

impl Reply {
    /// The outcome of a command as one linked chain: its first failure that names a cause (the
    /// events around it fail as `LinkedEventFailed`), else `LinkedEventFailed` when some event
    /// failed only so (a chain stored as failed, repeated in part), else `Exists` when every
    /// transfer existed already, else `Created` (also for replies that carry no transfers).
    pub fn chain_result(&self) -> ledger::TransferResult {
        use ledger::TransferResult;
        match self {
            Reply::Transfers(outcomes) => {
                let results = || outcomes.iter().map(|o| o.result);
                let failed = results().find(|r| {
                    !matches!(r, TransferResult::Created | TransferResult::Exists | TransferResult::LinkedEventFailed)
                });
                failed.unwrap_or(if results().any(|r| r == TransferResult::LinkedEventFailed) {
                    TransferResult::LinkedEventFailed
                } else if results().all(|r| r == TransferResult::Exists) {
                    TransferResult::Exists
                } else {
                    TransferResult::Created
                })
            }
            _ => TransferResult::Created,
        }
    }
}

pub type Callback = Box<dyn FnOnce(Result<Reply>) + Send>;

/// Rows that go with a command's ledger work, made from its reply inside the batch and committed
/// with it (a card authorization and the answer to its message).
pub type RecordsFn = Box<dyn Fn(&Reply) -> Vec<crate::Record> + Send>;

struct Job {
    command: Command,
    /// The request's audit entry, appended in the same commit as its ledger work; an empty
    /// `outcome` is filled from the reply.
    audit: Option<audit::Draft>,
    records: Option<RecordsFn>,
    /// Documents that must be at these versions for the job to apply (see [`crate::Guard`]).
    guards: Vec<crate::Guard>,
    reply: Callback,
}

/// Counters for `/metrics`, updated by the writer.
#[derive(Default)]
pub struct EngineStats {
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub commit_failures: AtomicU64,
    pub expired: AtomicU64,
    pub queue_depth: AtomicU64,
    /// Events of the requests queued (see [`QUEUED_EVENTS_MAX`]).
    pub queued_events: AtomicU64,
    /// Commit latency histogram, upper bounds in [`COMMIT_BUCKETS_US`] (+Inf last).
    pub commit_us_buckets: [AtomicU64; 12],
    pub commit_us_sum: AtomicU64,
    /// Syncs made by the syncer thread (a writer that syncs within its commits counts none), and
    /// their total time.
    pub syncs: AtomicU64,
    pub sync_us_sum: AtomicU64,
    /// Their latency histogram, upper bounds in [`COMMIT_BUCKETS_US`] (+Inf last): a slow disk
    /// holds every reply waiting for the sync, so the tail is what an operator needs to see.
    pub sync_us_buckets: [AtomicU64; 12],
    /// Batch size histogram, upper bounds in [`BATCH_BUCKETS`] (+Inf last).
    pub batch_len_buckets: [AtomicU64; 9],
    /// Accounts the writer keeps in memory, after its latest batch.
    pub cached_accounts: AtomicU64,
}

pub const COMMIT_BUCKETS_US: [u64; 11] = [100, 250, 500, 1000, 2000, 5000, 10_000, 25_000, 50_000, 100_000, 250_000];
pub const BATCH_BUCKETS: [u64; 8] = [1, 4, 16, 64, 256, 1024, 4096, 16384];

fn observe(buckets: &[AtomicU64], bounds: &[u64], value: u64) {
    let i = bounds.iter().position(|b| value <= *b).unwrap_or(bounds.len());
    buckets[i].fetch_add(1, Ordering::Relaxed);
}

/// Handle to the writer thread.
pub struct Engine {
    sender: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<EngineStats>,
}

/// The longest the writer waits, with a batch to commit, for the sync in flight: see [`run`].
const GATHER_MAX: Duration = Duration::from_millis(2);

impl Engine {
    pub(crate) fn start(writer: Box<dyn Writer>, clock: Arc<dyn Fn() -> Timestamp + Send + Sync>) -> Engine {
        Engine::start_gathering(writer, clock, GATHER_MAX)
    }

    fn start_gathering(
        writer: Box<dyn Writer>,
        clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
        gather_max: Duration,
    ) -> Engine {
        abort_on_engine_panics();
        let (sender, receiver) = mpsc::sync_channel(QUEUE_LEN_MAX);
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || run(writer, receiver, clock, thread_stats, gather_max))
            .expect("spawning the writer thread");
        Engine { sender: Some(sender), thread: Some(thread), stats }
    }

    /// Queues a command; `reply` is called from the writer thread once the batch is durable (or
    /// failed). Returns `Busy` at once when the queue is full.
    pub fn submit(&self, command: Command, reply: Callback) -> Result<()> {
        self.submit_audited(command, None, reply)
    }

    /// Like [`Engine::submit`], with the request's audit entry committed together with it.
    pub fn submit_audited(&self, command: Command, audit: Option<audit::Draft>, reply: Callback) -> Result<()> {
        self.submit_with(command, audit, None, reply)
    }

    /// Like [`Engine::submit_audited`], with rows made from the reply committed in the same
    /// transaction.
    pub fn submit_with(
        &self,
        command: Command,
        audit: Option<audit::Draft>,
        records: Option<RecordsFn>,
        reply: Callback,
    ) -> Result<()> {
        self.submit_guarded(command, audit, records, Vec::new(), reply)
    }

    /// Like [`Engine::submit_with`], applied only if every guarded document is at its version when
    /// the batch applies (checked under the batch's lock, so across a cluster); otherwise nothing of
    /// it is applied and `reply` gets [`StoreError::Conflict`].
    pub fn submit_guarded(
        &self,
        command: Command,
        audit: Option<audit::Draft>,
        records: Option<RecordsFn>,
        guards: Vec<crate::Guard>,
        reply: Callback,
    ) -> Result<()> {
        if let Command::Transfers(events) = &command {
            assert!(events.last().is_none_or(|e| !e.linked), "a request's last event must close its chain");
        }
        if command.len() == 0 && audit.is_none() && records.is_none() && guards.is_empty() {
            reply(Ok(match command {
                Command::Accounts(_) => Reply::Accounts(Vec::new()),
                Command::Transfers(_) => Reply::Transfers(Vec::new()),
                Command::Audit(_) => Reply::Audited,
            }));
            return Ok(());
        }
        let sender = self.sender.as_ref().expect("engine running");
        let events = command.len() as u64;
        if self.stats.queued_events.fetch_add(events, Ordering::Relaxed) + events > QUEUED_EVENTS_MAX as u64 {
            self.stats.queued_events.fetch_sub(events, Ordering::Relaxed);
            return Err(StoreError::Busy);
        }
        // Counted before the send: the writer may take the job, and count it out, first (a
        // gauge read between the two showed 2^64 - 1).
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        match sender.try_send(Job { command, audit, records, guards, reply }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.stats.queued_events.fetch_sub(events, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => Err(StoreError::Busy),
                    TrySendError::Disconnected(_) => Err(StoreError::Unavailable("writer stopped".into())),
                }
            }
        }
    }

    /// Queues a command and waits for its reply (for the CLI, benchmarks and tests).
    pub fn execute(&self, command: Command) -> Result<Reply> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(command, Box::new(move |r| drop(tx.send(r))))?;
        rx.recv().map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    pub fn transfers(&self, events: Vec<TransferEvent>) -> Result<Vec<Outcome>> {
        match self.execute(Command::Transfers(events))? {
            Reply::Transfers(outcomes) => Ok(outcomes),
            _ => unreachable!("transfers get transfer replies"),
        }
    }

    pub fn accounts(&self, commands: Vec<AccountCommand>) -> Result<Vec<(AccountResult, Option<Account>)>> {
        match self.execute(Command::Accounts(commands))? {
            Reply::Accounts(results) => Ok(results),
            _ => unreachable!("accounts get account replies"),
        }
    }

    /// Stops the writer after what is queued, and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Replies of one batch, with what each gets.
type Answers = Vec<(Callback, Result<Reply>)>;

/// The writer thread. With a syncer (the embedded engine), a batch is committed and handed to
/// the syncer, and the writer goes on. When the next batch is ready while a sync still runs, the
/// writer first waits for that sync (at most `gather_max`): the batch then takes everything that
/// arrived meanwhile. Its replies could not have gone out before that sync ended anyway, and one
/// larger batch writes fewer WAL pages than two (each rewrites the pages its rows share: the
/// tables' last pages, the accounts', the head): at the HTTP peak, 26–32 transfers a batch
/// instead of 16–21, a tenth less writer time per transfer, and a steadier p99 at half rate (see
/// BENCHMARKS.md, session 16). A lone request finds no sync running and does not wait.
fn run(
    mut writer: Box<dyn Writer>,
    receiver: Receiver<Job>,
    clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    stats: Arc<EngineStats>,
    gather_max: Duration,
) {
    let progress = Arc::new(SyncProgress::default());
    let syncer = writer.deferred_sync().map(|sync| {
        // At most this many committed batches wait for their sync; then the writer waits too.
        let (sender, receiver) = mpsc::sync_channel::<Answers>(64);
        let stats = stats.clone();
        let progress = progress.clone();
        let thread = std::thread::Builder::new()
            .name(SYNCER_THREAD.into())
            .spawn(move || sync_then_reply(sync, receiver, &stats, &progress))
            .expect("spawning the syncer thread");
        (sender, thread)
    });
    let deliver = |writer: &mut dyn Writer, answers: Answers| match &syncer {
        Some((to_syncer, _)) if writer.sync_owed() => {
            progress.state.lock().expect("sync progress").0 += 1;
            to_syncer.send(answers).expect("the syncer lives as long as the writer");
        }
        _ => {
            for (reply, result) in answers {
                reply(result);
            }
        }
    };
    let gather = || progress.wait_idle(gather_max);
    run_batches(writer.as_mut(), &receiver, clock.as_ref(), &stats, deliver, gather);
    if let Some((to_syncer, thread)) = syncer {
        drop(to_syncer);
        let _ = thread.join();
    }
}

/// Makes a panic on the writer's or the syncer's thread stop the process (SIGABRT), before
/// anything unwinds. A writer or syncer that panicked (a broken invariant, a reply that panicked)
/// would leave a node answering 503 to every write while `/readyz` still said ready; and
/// unwinding would drop the writer's connection, whose write-ahead log would then write out the
/// frames its unfinished batch had gathered, where another connection's commit may have put its
/// own. As after a failed sync, only a restart, which reads storage back, is sound. The hook set
/// before runs first (the server's withholds the message, which may quote data); installed once
/// per process, around whatever hook was set then: a hook set later replaces it.
fn abort_on_engine_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if matches!(std::thread::current().name(), Some(WRITER_THREAD | SYNCER_THREAD)) {
                std::process::abort();
            }
        }));
    });
}

const WRITER_THREAD: &str = "rtpay-writer";
const SYNCER_THREAD: &str = "rtpay-syncer";

/// Batches handed to the syncer, and batches it synced.
#[derive(Default)]
struct SyncProgress {
    state: std::sync::Mutex<(u64, u64)>,
    changed: std::sync::Condvar,
}

impl SyncProgress {
    /// Waits, at most `max`, until every batch handed to the syncer is synced.
    fn wait_idle(&self, max: Duration) {
        let state = self.state.lock().expect("sync progress");
        let _ = self.changed.wait_timeout_while(state, max, |(sent, done)| done < sent);
    }
}

/// The syncer thread: syncs once for every committed batch waiting, then sends their replies, in
/// the order they committed.
fn sync_then_reply(
    mut sync: Box<dyn crate::DeferredSync>,
    receiver: Receiver<Answers>,
    stats: &EngineStats,
    progress: &SyncProgress,
) {
    while let Ok(first) = receiver.recv() {
        let mut batches = vec![first];
        batches.extend(receiver.try_iter());
        let started = Instant::now();
        if let Err(error) = sync.sync() {
            // See `crate::durable`: what is on disk is unknown now; only a restart can tell.
            tracing::error!(%error, "the write-ahead log could not be synced: stopping the process");
            for (reply, _) in batches.into_iter().flatten() {
                reply(Err(StoreError::Unavailable(format!(
                    "{}: the commit could not be made durable; the server stops",
                    crate::COMMIT_IN_DOUBT
                ))));
            }
            std::process::abort();
        }
        let elapsed_us = started.elapsed().as_micros() as u64;
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.sync_us_sum.fetch_add(elapsed_us, Ordering::Relaxed);
        observe(&stats.sync_us_buckets, &COMMIT_BUCKETS_US, elapsed_us);
        progress.state.lock().expect("sync progress").1 += batches.len() as u64;
        progress.changed.notify_all();
        for (reply, result) in batches.into_iter().flatten() {
            reply(result);
        }
    }
}

fn run_batches(
    writer: &mut dyn Writer,
    receiver: &Receiver<Job>,
    clock: &(dyn Fn() -> Timestamp + Send + Sync),
    stats: &EngineStats,
    deliver: impl Fn(&mut dyn Writer, Answers),
    // Called with a batch's first job in hand, before the rest of the queue is taken.
    gather: impl Fn(),
) {
    let mut held: Option<Job> = None;
    // A batch's jobs put off while a backlog of due holds is released (see `apply_batch`), and for
    // how many sweeps so far.
    let mut waiting: Vec<Job> = Vec::new();
    let mut waited = 0;
    let mut last_sweep = Instant::now();
    // Whether a batch sweeps as soon as a hold is due (see `apply_batch`).
    let mut due_sweeps = true;
    loop {
        if !waiting.is_empty() {
            let mut jobs = std::mem::take(&mut waiting);
            let events = jobs.iter().map(|job| job.command.len()).sum();
            last_sweep = Instant::now();
            waited += 1;
            let may_wait = waited < BACKLOG_SWEEPS_MAX;
            waiting = run_batch(writer, clock(), &mut jobs, events, true, may_wait, &mut due_sweeps, stats, &deliver);
            continue;
        }
        waited = 0;
        let first = match held.take() {
            Some(job) => Some(job),
            None => match receiver.recv_timeout(EXPIRY_INTERVAL) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        let mut jobs = Vec::new();
        let mut events = 0;
        if let Some(job) = first {
            gather();
            events += job.command.len();
            jobs.push(job);
            while events < BATCH_EVENTS_MAX {
                match receiver.try_recv() {
                    Ok(job) if events + job.command.len() > BATCH_EVENTS_MAX => {
                        held = Some(job);
                        break;
                    }
                    Ok(job) => {
                        events += job.command.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
        }
        stats.queue_depth.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
        stats.queued_events.fetch_sub(events as u64, Ordering::Relaxed);
        let sweep = last_sweep.elapsed() >= EXPIRY_INTERVAL || jobs.is_empty();
        if sweep {
            last_sweep = Instant::now();
        }
        waiting = run_batch(writer, clock(), &mut jobs, events, sweep, true, &mut due_sweeps, stats, &deliver);
    }
}

/// Applies a batch of `events` and answers its jobs; the jobs [`apply_batch`] put off are given
/// back.
#[allow(clippy::too_many_arguments)]
fn run_batch(
    writer: &mut dyn Writer,
    now: Timestamp,
    jobs: &mut Vec<Job>,
    events: usize,
    sweep: bool,
    may_wait: bool,
    due_sweeps: &mut bool,
    stats: &EngineStats,
    deliver: &impl Fn(&mut dyn Writer, Answers),
) -> Vec<Job> {
    let started = Instant::now();
    let result = apply_batch(writer, now, jobs, sweep, may_wait, due_sweeps, stats);
    let elapsed_us = started.elapsed().as_micros() as u64;
    stats.cached_accounts.store(writer.cached_accounts() as u64, Ordering::Relaxed);
    let jobs = std::mem::take(jobs);
    if matches!(result, Ok(Some(_))) && !jobs.is_empty() {
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.events.fetch_add(events as u64, Ordering::Relaxed);
        observe(&stats.batch_len_buckets, &BATCH_BUCKETS, events as u64);
        observe(&stats.commit_us_buckets, &COMMIT_BUCKETS_US, elapsed_us);
        stats.commit_us_sum.fetch_add(elapsed_us, Ordering::Relaxed);
    }
    match result {
        Ok(Some(replies)) => {
            let answers = jobs.into_iter().zip(replies).map(|(job, reply)| {
                let result = reply.ok_or_else(|| {
                    StoreError::Conflict(
                        "what the request read changed before it could commit; nothing was applied".into(),
                    )
                });
                (job.reply, result)
            });
            deliver(writer, answers.collect());
            Vec::new()
        }
        Ok(None) => {
            // The sweep alone was committed: it is synced as any batch (nothing to answer).
            deliver(writer, Vec::new());
            jobs
        }
        Err(error) => {
            writer.rollback();
            stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            if !jobs.is_empty() {
                tracing::warn!(%error, jobs = jobs.len(), "batch not committed");
            }
            deliver(writer, jobs.into_iter().map(|job| (job.reply, Err(error.clone()))).collect());
            Vec::new()
        }
    }
}

/// Releases the holds due by `now` (at most [`EXPIRY_SWEEP_MAX`]), judged as a post or void
/// would judge them (`Clock::judged_at`: a hold too late to resolve is released even while the wall
/// clock is behind): how many it found, how many it released, and the change, not yet applied.
/// A hold or account storage cannot read is left out (with its holds), not the whole sweep: the
/// holds due after it are released all the same.
fn sweep_due(writer: &mut dyn Writer, snapshot: &mut MemoryLedger, now: Timestamp) -> Result<(usize, usize, Changes)> {
    let due = writer.due_pendings(snapshot.clock.judged_at(now), EXPIRY_SWEEP_MAX)?;
    if due.is_empty() {
        return Ok((0, 0, Changes::default()));
    }
    load_readable(&due, snapshot, |keys, into| writer.load_transfers(keys, into))?;
    let mut accounts = Vec::with_capacity(due.len() * 2);
    for key in &due {
        if let Some(Entry::Created(t)) = snapshot.transfers.get(key) {
            accounts.push(AccountKey { tenant: key.tenant, id: t.debit_account_id });
            accounts.push(AccountKey { tenant: key.tenant, id: t.credit_account_id });
        }
    }
    accounts.sort_unstable();
    accounts.dedup();
    load_readable(&accounts, snapshot, |keys, into| writer.load_accounts(keys, into))?;
    // Holds whose entry or accounts were left out are skipped (`expire_pending` finds them absent).
    let (expired, change) = expire_pending(&*snapshot, snapshot.clock, now, &due);
    Ok((due.len(), expired, change))
}

/// Loads `keys` with `load`; when storage holds one it cannot read, the others one by one, leaving
/// out the unreadable (logged once per sweep).
fn load_readable<K>(
    keys: &[K],
    into: &mut MemoryLedger,
    mut load: impl FnMut(&[K], &mut MemoryLedger) -> Result<()>,
) -> Result<()> {
    match load(keys, into) {
        Err(StoreError::Corrupt(error)) => {
            tracing::warn!(%error, "the expiry sweep leaves out what storage holds and cannot read; run `rtpay verify`");
            for key in keys {
                match load(std::slice::from_ref(key), into) {
                    Ok(()) | Err(StoreError::Corrupt(_)) => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(())
        }
        other => other,
    }
}

/// Applies a batch: one reply per job, `None` for a job whose guards failed (nothing of it applied).
/// The jobs' audit drafts are taken (moved into the commit). `Ok(None)`: only the sweep was
/// committed, and the jobs wait for the next batch (a backlog of due holds, below; only when
/// `may_wait`).
fn apply_batch(
    writer: &mut dyn Writer,
    now: Timestamp,
    jobs: &mut [Job],
    sweep: bool,
    may_wait: bool,
    due_sweeps: &mut bool,
    stats: &EngineStats,
) -> Result<Option<Vec<Option<Reply>>>> {
    let clock = writer.begin()?;
    let mut snapshot = MemoryLedger { clock, ..MemoryLedger::default() };
    let mut changes: Vec<Changes> = Vec::with_capacity(3);
    // Holds released by the sweep, counted once their release is committed.
    let mut released = 0;

    // Besides the timed sweep, any batch once a hold is due: a hold past its expiry must not
    // reserve funds the batch's transfers are checked against, when a post or void of it would
    // already be refused as expired. A sweep that leaves due holds behind (storage it cannot
    // read, or accounts that do not cover them: `rtpay verify` reports both) turns that off, so
    // they cost no batch a sweep; the timed sweep looks again, and turns it back on once it
    // releases all it finds.
    let sweep =
        sweep || (*due_sweeps && writer.earliest_due()?.is_some_and(|due| due <= snapshot.clock.judged_at(now)));
    // More holds due than one sweep releases (they fell due while no node ran batches, or while
    // the writer waited on its storage): the jobs are not judged against holds that reserve
    // nothing any more. Each batch commits one sweep alone until the backlog is released, and the
    // jobs wait; what a transfer failed here would stay failed under its id. Only while a sweep
    // releases something, and for `BACKLOG_SWEEPS_MAX` sweeps at most (`may_wait`), so that holds
    // storage cannot release, or a backlog refilled as fast as it drains, never hold the jobs back.
    let mut backlog = false;
    if sweep {
        match sweep_due(writer, &mut snapshot, now) {
            Ok((found, expired, change)) => {
                backlog = may_wait && found == EXPIRY_SWEEP_MAX && expired > 0;
                if expired < found && *due_sweeps {
                    tracing::warn!(
                        left = found - expired,
                        "expired holds that storage cannot read, or their accounts do not cover, stay pending; \
                         run `rtpay verify`"
                    );
                }
                *due_sweeps = expired == found;
                if found > 0 {
                    released = expired as u64;
                    snapshot.commit(change.clone());
                    changes.push(change);
                }
            }
            Err(error) => return Err(error),
        }
    }
    if jobs.is_empty() || backlog {
        if changes.iter().all(Changes::is_empty) {
            writer.rollback();
        } else {
            writer.commit(&changes, &[], &[])?;
            stats.expired.fetch_add(released, Ordering::Relaxed);
        }
        return Ok(jobs.is_empty().then(Vec::new));
    }

    // Guards, under the batch's lock: each document or counter once per batch (the records of a
    // job admitted first may change it), as stated.
    #[derive(PartialEq, Eq, Hash)]
    enum Claim<'a> {
        Document(&'a str, u128, &'a str),
        Counter(&'a str, u64),
        Authorization(u128, u128),
    }
    fn claim(g: &crate::Guard) -> Claim<'_> {
        match g {
            crate::Guard::Document { kind, tenant_id, id, .. } => Claim::Document(kind, *tenant_id, id),
            crate::Guard::CounterAtMost { scope, period, .. } => Claim::Counter(scope, *period),
            crate::Guard::Authorization { tenant_id, id, .. } => Claim::Authorization(*tenant_id, *id),
        }
    }
    let mut claimed = std::collections::HashSet::new();
    let mut admitted = Vec::with_capacity(jobs.len());
    for job in jobs.iter() {
        let mut ok = true;
        for g in &job.guards {
            let holds = !claimed.contains(&claim(g))
                && match g {
                    crate::Guard::Document { kind, tenant_id, id, version } => {
                        writer.document_version(kind, *tenant_id, id)? == *version
                    }
                    crate::Guard::CounterAtMost { scope, period, max } => writer.counter_total(scope, *period)? <= *max,
                    crate::Guard::Authorization { tenant_id, id, body } => {
                        writer.authorization_body(*tenant_id, *id)? == *body
                    }
                };
            if !holds {
                ok = false;
                break;
            }
        }
        if ok {
            claimed.extend(job.guards.iter().map(claim));
        }
        admitted.push(ok);
    }
    let mut account_commands = Vec::new();
    let mut events = Vec::new();
    for job in jobs.iter().zip(&admitted).filter(|(_, ok)| **ok).map(|(j, _)| j) {
        match &job.command {
            Command::Accounts(c) => account_commands.extend(c.iter().cloned()),
            Command::Transfers(e) => events.extend(e.iter().cloned()),
            Command::Audit(_) => {}
        }
    }
    let mut account_results = Vec::new();
    if !account_commands.is_empty() {
        let mut keys: Vec<AccountKey> = account_commands.iter().map(AccountCommand::key).collect();
        keys.sort_unstable();
        keys.dedup();
        writer.load_accounts(&keys, &mut snapshot)?;
        let mut clock = snapshot.clock;
        let (results, change) = apply_accounts(&snapshot, &mut clock, now, &account_commands);
        snapshot.commit(change.clone());
        changes.push(change);
        account_results = results;
    }
    let mut outcomes = Vec::new();
    if !events.is_empty() {
        let prefetch = Prefetch::of_transfers(&events);
        let missing: Vec<TransferKey> =
            prefetch.transfers.into_iter().filter(|k| !snapshot.transfers.contains_key(k)).collect();
        writer.load_transfers(&missing, &mut snapshot)?;
        let accounts = Prefetch::accounts_of(&events, &snapshot);
        writer.load_accounts(&accounts, &mut snapshot)?;
        let mut clock = snapshot.clock;
        let (results, change) = apply_transfers(&snapshot, &mut clock, now, &events);
        changes.push(change);
        outcomes = results;
    }
    // Split the answers back per job, in order.
    let mut account_results = account_results.into_iter();
    let mut outcomes = outcomes.into_iter();
    let replies: Vec<Option<Reply>> = jobs
        .iter()
        .zip(&admitted)
        .map(|(job, ok)| {
            ok.then(|| match &job.command {
                Command::Accounts(c) => Reply::Accounts(account_results.by_ref().take(c.len()).collect()),
                Command::Transfers(e) => Reply::Transfers(outcomes.by_ref().take(e.len()).collect()),
                Command::Audit(_) => Reply::Audited,
            })
        })
        .collect();

    // Audit entries take their times from the ledger clock, after the batch's ledger work.
    let mut clock = Clock { last: changes.iter().map(|c| c.clock.last).max().unwrap_or(0).max(snapshot.clock.last) };
    let mut drafts: Vec<(Timestamp, audit::Draft)> = Vec::new();
    for (job, reply) in jobs.iter_mut().zip(&replies) {
        if let (Command::Audit(d), Some(_)) = (&mut job.command, reply) {
            drafts.extend(std::mem::take(d).into_iter().map(|d| (clock.tick(now), d.bounded())));
        }
        if let Some(mut draft) = job.audit.take() {
            // A request refused by its guards is recorded too, as refused.
            if draft.outcome.is_empty() {
                draft.outcome = reply.as_ref().map_or_else(|| "conflict".to_owned(), outcome_of);
            }
            drafts.push((clock.tick(now), draft.bounded()));
        }
    }
    if !drafts.is_empty() {
        changes.push(Changes { clock, ..Changes::default() });
    }
    let records: Vec<crate::Record> = jobs
        .iter()
        .zip(&replies)
        .filter_map(|(job, reply)| Some((job.records.as_ref()?)(reply.as_ref()?)))
        .flatten()
        .collect();
    writer.commit(&changes, &drafts, &records)?;
    stats.expired.fetch_add(released, Ordering::Relaxed);
    Ok(Some(replies))
}

/// A ledger reply in a few words, for the audit log: the one result code, or counts.
fn outcome_of(reply: &Reply) -> String {
    fn summarize<'a>(codes: impl Iterator<Item = &'a str>) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for code in codes {
            match counts.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += 1,
                None => counts.push((code, 1)),
            }
        }
        match counts.as_slice() {
            [(code, 1)] => (*code).to_owned(),
            _ => counts.iter().map(|(c, n)| format!("{c}={n}")).collect::<Vec<_>>().join(" "),
        }
    }
    match reply {
        Reply::Accounts(r) => summarize(r.iter().map(|(result, _)| result.as_str())),
        Reply::Transfers(o) => summarize(o.iter().map(|o| o.result.as_str())),
        Reply::Audited => "ok".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeferredSync;

    /// A writer whose commits succeed at once and leave their sync to the engine.
    struct DeferringWriter {
        commits: Arc<AtomicU64>,
        owed: bool,
        sync: Option<Box<dyn DeferredSync>>,
    }

    impl Writer for DeferringWriter {
        fn begin(&mut self) -> Result<Clock> {
            Ok(Clock::default())
        }
        fn load_transfers(&mut self, _: &[TransferKey], _: &mut MemoryLedger) -> Result<()> {
            Ok(())
        }
        fn load_accounts(&mut self, _: &[AccountKey], _: &mut MemoryLedger) -> Result<()> {
            Ok(())
        }
        fn document_version(&mut self, _: &str, _: u128, _: &str) -> Result<u64> {
            Ok(0)
        }
        fn counter_total(&mut self, _: &str, _: u64) -> Result<i64> {
            Ok(0)
        }
        fn authorization_body(&mut self, _: u128, _: u128) -> Result<Option<String>> {
            Ok(None)
        }
        fn due_pendings(&mut self, _: Timestamp, _: usize) -> Result<Vec<TransferKey>> {
            Ok(Vec::new())
        }
        fn earliest_due(&mut self) -> Result<Option<Timestamp>> {
            Ok(None)
        }
        fn commit(&mut self, _: &[Changes], _: &[(Timestamp, audit::Draft)], _: &[crate::Record]) -> Result<()> {
            self.commits.fetch_add(1, Ordering::SeqCst);
            self.owed = true;
            Ok(())
        }
        fn rollback(&mut self) {}
        fn deferred_sync(&mut self) -> Option<Box<dyn DeferredSync>> {
            self.sync.take()
        }
        fn sync_owed(&mut self) -> bool {
            std::mem::take(&mut self.owed)
        }
    }

    /// A sync that returns once a permit arrives, or after 10 s: a test whose assertion failed
    /// drops the engine (which waits for the syncer) before the permits' sender.
    struct GatedSync(Receiver<()>);

    impl DeferredSync for GatedSync {
        fn sync(&mut self) -> std::io::Result<()> {
            let _ = self.0.recv_timeout(Duration::from_secs(10));
            Ok(())
        }
    }

    /// A sync that fails, as `fdatasync` does when the disk gives up.
    struct FailingSync;

    impl DeferredSync for FailingSync {
        fn sync(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("injected"))
        }
    }

    /// A sync that fails stops the process (SIGABRT): what the disk holds is unknown then, and only
    /// a restart reads it back. Run in a child process: this test's binary, with this test alone.
    #[test]
    fn a_failed_sync_stops_the_process() {
        aborts_in_a_child("a_failed_sync_stops_the_process", || {
            let writer = DeferringWriter {
                commits: Arc::new(AtomicU64::new(0)),
                owed: false,
                sync: Some(Box::new(FailingSync)),
            };
            let engine = Engine::start(Box::new(writer), Arc::new(|| 1_000));
            let (tx, rx) = mpsc::channel();
            engine.submit(Command::Audit(vec![draft(1)]), Box::new(move |r| drop(tx.send(r)))).unwrap();
            let _ = rx.recv_timeout(Duration::from_secs(10));
            std::thread::sleep(Duration::from_secs(10));
        });
    }

    /// Runs `body` in a child process (this test binary, with the test `name` alone) and asserts
    /// that it stopped with SIGABRT rather than return.
    fn aborts_in_a_child(name: &str, body: impl FnOnce()) {
        const CHILD: &str = "RTPAY_TEST_ABORT_CHILD";
        if std::env::var_os(CHILD).is_some() {
            body();
            println!("the process outlived it");
            return;
        }
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("engine::tests::{name}"), "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&child.stdout);
        assert!(!stdout.contains("outlived"), "{stdout}");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&child.status), Some(libc::SIGABRT), "{stdout}");
    }

    /// A panic on the writer's thread (here, a reply that panics) stops the process (SIGABRT), as
    /// a failed sync does, rather than leaving a node that can no longer write. Run in a child
    /// process: this test's binary, with this test alone.
    #[test]
    fn a_panic_on_the_writers_thread_stops_the_process() {
        aborts_in_a_child("a_panic_on_the_writers_thread_stops_the_process", || {
            let writer = DeferringWriter { commits: Arc::new(AtomicU64::new(0)), owed: false, sync: None };
            let engine = Engine::start(Box::new(writer), Arc::new(|| 1_000));
            engine.submit(Command::Audit(vec![draft(1)]), Box::new(|_| panic!("injected"))).unwrap();
            std::thread::sleep(Duration::from_secs(10));
        });
    }

    /// A chain's result names its cause; a chain whose events all failed only for being linked
    /// to a failure (repeated in part) is not taken for a success.
    #[test]
    fn a_chain_result_is_its_named_failure_or_the_link_failure() {
        use ledger::{Outcome, TransferResult as R};
        let chain = |results: &[R]| {
            Reply::Transfers(results.iter().map(|&result| Outcome { result, transfer: None }).collect()).chain_result()
        };
        assert_eq!(chain(&[R::LinkedEventFailed, R::InsufficientFunds, R::LinkedEventFailed]), R::InsufficientFunds);
        assert_eq!(chain(&[R::LinkedEventFailed]), R::LinkedEventFailed);
        assert_eq!(chain(&[R::Exists, R::LinkedEventFailed]), R::LinkedEventFailed);
        assert_eq!(chain(&[R::Exists, R::Exists]), R::Exists);
        assert_eq!(chain(&[R::Exists, R::Created]), R::Created);
        assert_eq!(Reply::Audited.chain_result(), R::Created);
    }

    fn draft(n: usize) -> audit::Draft {
        audit::Draft { actor: "operator".into(), action: "test".into(), resource: n.to_string(), ..Default::default() }
    }

    /// An engine whose every sync waits for a permit (sent on the sender returned), with a
    /// gathering bound far above the tests' waits, so that only the sync ends one; and its count of
    /// commits.
    fn gated_engine() -> (Engine, Arc<AtomicU64>, mpsc::Sender<()>) {
        let commits = Arc::new(AtomicU64::new(0));
        let (permit, permits) = mpsc::channel();
        let writer =
            DeferringWriter { commits: commits.clone(), owed: false, sync: Some(Box::new(GatedSync(permits))) };
        (Engine::start_gathering(Box::new(writer), Arc::new(|| 1_000), Duration::from_secs(30)), commits, permit)
    }

    /// Waits, at most 10 s, until `commits` reaches `n`.
    fn wait_for_commits(commits: &AtomicU64, n: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while commits.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "{what} was never committed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A batch ready while a sync runs waits for it and takes what arrives meanwhile; a request
    /// that finds no sync running is committed at once.
    #[test]
    fn a_batch_gathers_what_arrives_while_a_sync_runs() {
        let (engine, commits, permit) = gated_engine();
        let (replied, replies) = mpsc::channel();
        let submit = |n: usize| {
            let replied = replied.clone();
            engine.submit(Command::Audit(vec![draft(n)]), Box::new(move |r| replied.send((n, r)).unwrap())).unwrap();
        };
        let started = Instant::now();
        submit(1);
        wait_for_commits(&commits, 1, "the first request");
        assert!(started.elapsed() < Duration::from_secs(5), "a lone request waited for nothing");
        // Its sync is held: the next requests wait for it, uncommitted.
        for n in 2..=4 {
            submit(n);
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(commits.load(Ordering::SeqCst), 1, "committed while the sync before it ran");
        permit.send(()).unwrap();
        assert_eq!(replies.recv_timeout(Duration::from_secs(10)).map(|(n, r)| (n, r.is_ok())), Ok((1, true)));
        // The three go in one batch, answered after its own sync.
        wait_for_commits(&commits, 2, "the gathered batch");
        assert!(replies.recv_timeout(Duration::from_millis(200)).is_err(), "no reply before its sync");
        permit.send(()).unwrap();
        let answered: Vec<usize> = (0..3).map(|_| replies.recv_timeout(Duration::from_secs(10)).unwrap().0).collect();
        assert_eq!(answered, [2, 3, 4]);
        assert_eq!(commits.load(Ordering::SeqCst), 2);
        assert_eq!(engine.stats.batches.load(Ordering::Relaxed), 2);
        assert_eq!(engine.stats.events.load(Ordering::Relaxed), 4);
        engine.stop();
    }

    /// Past `QUEUED_EVENTS_MAX` events waiting, over all queued requests, a request is answered
    /// `Busy` at once, however few requests wait; once the writer takes them, requests are
    /// accepted again.
    #[test]
    fn a_queue_holding_its_most_events_answers_busy() {
        let (engine, commits, permit) = gated_engine();
        let (replied, replies) = mpsc::channel();
        let submit = |n: usize| {
            let replied = replied.clone();
            let drafts = (0..n).map(draft).collect();
            engine.submit(
                Command::Audit(drafts),
                Box::new(move |r| {
                    let _ = replied.send(r.is_ok());
                }),
            )
        };
        submit(1).unwrap();
        wait_for_commits(&commits, 1, "the first request");
        // Its sync is held: what follows waits in the queue.
        for _ in 0..QUEUED_EVENTS_MAX / BATCH_EVENTS_MAX {
            submit(BATCH_EVENTS_MAX).unwrap();
        }
        assert!(matches!(submit(1), Err(StoreError::Busy)), "five requests, but the queue's events are at the bound");
        for _ in 0..8 {
            permit.send(()).unwrap();
        }
        for _ in 0..5 {
            assert_eq!(replies.recv_timeout(Duration::from_secs(30)), Ok(true));
        }
        submit(1).unwrap();
        assert_eq!(replies.recv_timeout(Duration::from_secs(30)), Ok(true));
        assert_eq!(engine.stats.queued_events.load(Ordering::Relaxed), 0);
        engine.stop();
    }

    /// A writer over a ledger in memory holding one pending transfer, due; its commits apply, or
    /// fail when `failing`.
    struct SweptWriter {
        ledger: MemoryLedger,
        failing: bool,
        sweeps: Arc<AtomicU64>,
        /// A hold storage cannot read: loading it fails as corrupt.
        unreadable: Option<TransferKey>,
    }

    impl SweptWriter {
        fn new(failing: bool, sweeps: Arc<AtomicU64>) -> SweptWriter {
            let tenant = TenantId(1);
            let mut ledger = MemoryLedger::default();
            let accounts: Vec<AccountCommand> = (1..=2)
                .map(|id| {
                    AccountCommand::Create(NewAccount {
                        key: AccountKey { tenant, id: AccountId(id) },
                        currency: Currency::parse("BRL").unwrap(),
                        code: 1,
                        flags: AccountFlags::default(),
                        credit_limit: 0,
                        metadata: None,
                        holder: None,
                    })
                })
                .collect();
            let mut clock = ledger.clock;
            let (_, change) = apply_accounts(&ledger, &mut clock, 1_000, &accounts);
            ledger.commit(change);
            let hold = TransferEvent {
                key: TransferKey { tenant, id: TransferId(10) },
                kind: EventKind::Pending { debit: AccountId(1), credit: AccountId(2), amount: 5, timeout_seconds: 1 },
                code: 1,
                metadata: None,
                linked: false,
            };
            let (outcomes, change) = apply_transfers(&ledger, &mut clock, 2_000, &[hold]);
            assert_eq!(outcomes[0].result, TransferResult::Created);
            ledger.commit(change);
            SweptWriter { ledger, failing, sweeps, unreadable: None }
        }

        /// A writer whose due hold the sweep cannot release: its debit account does not cover it
        /// (`unreadable`: false), or the hold cannot be read at all.
        fn stuck(unreadable: bool, sweeps: Arc<AtomicU64>) -> SweptWriter {
            let mut writer = SweptWriter::new(false, sweeps);
            let debit = AccountKey { tenant: TenantId(1), id: AccountId(1) };
            writer.ledger.accounts.get_mut(&debit).expect("opened").debits_pending = 0;
            writer.unreadable = unreadable.then_some(TransferKey { tenant: TenantId(1), id: TransferId(10) });
            writer
        }

        /// With a second hold (id 11), due as the first is.
        fn and_another_hold(mut self) -> SweptWriter {
            let hold = TransferEvent {
                key: TransferKey { tenant: TenantId(1), id: TransferId(11) },
                kind: EventKind::Pending { debit: AccountId(1), credit: AccountId(2), amount: 7, timeout_seconds: 1 },
                code: 1,
                metadata: None,
                linked: false,
            };
            let mut clock = self.ledger.clock;
            let (outcomes, change) = apply_transfers(&self.ledger, &mut clock, 3_000, &[hold]);
            assert_eq!(outcomes[0].result, TransferResult::Created);
            self.ledger.commit(change);
            self
        }
    }

    impl Writer for SweptWriter {
        fn begin(&mut self) -> Result<Clock> {
            Ok(self.ledger.clock)
        }
        fn load_transfers(&mut self, keys: &[TransferKey], into: &mut MemoryLedger) -> Result<()> {
            if self.unreadable.is_some_and(|k| keys.contains(&k)) {
                return Err(StoreError::Corrupt("injected".into()));
            }
            for key in keys {
                if let Some(entry) = self.ledger.transfers.get(key) {
                    into.transfers.insert(*key, entry.clone());
                }
            }
            Ok(())
        }
        fn load_accounts(&mut self, keys: &[AccountKey], into: &mut MemoryLedger) -> Result<()> {
            for key in keys {
                if let Some(account) = self.ledger.accounts.get(key) {
                    into.accounts.insert(*key, account.clone());
                }
            }
            Ok(())
        }
        fn document_version(&mut self, _: &str, _: u128, _: &str) -> Result<u64> {
            Ok(0)
        }
        fn counter_total(&mut self, _: &str, _: u64) -> Result<i64> {
            Ok(0)
        }
        fn authorization_body(&mut self, _: u128, _: u128) -> Result<Option<String>> {
            Ok(None)
        }
        fn due_pendings(&mut self, now: Timestamp, _: usize) -> Result<Vec<TransferKey>> {
            self.sweeps.fetch_add(1, Ordering::SeqCst);
            let due = |e: &Entry| match e {
                Entry::Created(t) => t.state == PendingState::Pending && t.expires_at.is_some_and(|at| at <= now),
                _ => false,
            };
            Ok(self.ledger.transfers.iter().filter(|(_, e)| due(e)).map(|(k, _)| *k).collect())
        }
        fn earliest_due(&mut self) -> Result<Option<Timestamp>> {
            let pending = |e: &Entry| match e {
                Entry::Created(t) if t.state == PendingState::Pending => t.expires_at,
                _ => None,
            };
            Ok(self.ledger.transfers.values().filter_map(pending).min())
        }
        fn commit(&mut self, changes: &[Changes], _: &[(Timestamp, audit::Draft)], _: &[crate::Record]) -> Result<()> {
            if self.failing {
                return Err(StoreError::Unavailable("injected".into()));
            }
            for change in changes {
                self.ledger.commit(change.clone());
            }
            Ok(())
        }
        fn rollback(&mut self) {}
        fn deferred_sync(&mut self) -> Option<Box<dyn DeferredSync>> {
            None
        }
        fn sync_owed(&mut self) -> bool {
            false
        }
    }

    /// `rtpay_ledger_holds_expired_total` counts holds whose release was committed: a sweep whose
    /// commit fails counts none (a reader polling the counter would otherwise look too soon).
    #[test]
    fn released_holds_are_counted_once_committed() {
        for failing in [true, false] {
            let sweeps = Arc::new(AtomicU64::new(0));
            let writer = SweptWriter::new(failing, sweeps.clone());
            let engine = Engine::start(Box::new(writer), Arc::new(|| 10_000_000_000));
            let deadline = Instant::now() + Duration::from_secs(10);
            // Three sweeps: the first two have run to their end (commit included) by then.
            while sweeps.load(Ordering::SeqCst) < 3 {
                assert!(Instant::now() < deadline, "the writer swept {} times", sweeps.load(Ordering::SeqCst));
                std::thread::sleep(Duration::from_millis(10));
            }
            let expired = engine.stats.expired.load(Ordering::Relaxed);
            assert_eq!(expired, if failing { 0 } else { 1 }, "failing commits: {failing}");
            engine.stop();
        }
    }

    /// A due hold the sweep cannot release (its accounts do not cover it, or storage cannot read
    /// it: `rtpay verify` reports both) costs one sweep, not one a batch, and fails no batch: the
    /// batches are answered, and only the timed sweep looks again.
    #[test]
    fn a_hold_the_sweep_cannot_release_is_not_swept_by_every_batch() {
        for unreadable in [false, true] {
            let sweeps = Arc::new(AtomicU64::new(0));
            let engine =
                Engine::start(Box::new(SweptWriter::stuck(unreadable, sweeps.clone())), Arc::new(|| 10_000_000_000));
            let started = Instant::now();
            for n in 0..20 {
                let (replied, reply) = mpsc::channel();
                engine.submit(Command::Audit(vec![draft(n)]), Box::new(move |r| replied.send(r).unwrap())).unwrap();
                let reply = reply.recv_timeout(Duration::from_secs(10)).expect("answered");
                assert!(matches!(reply, Ok(Reply::Audited)), "unreadable: {unreadable}: {reply:?}");
            }
            // The first batch's sweep, and the timed one every `EXPIRY_INTERVAL` meanwhile.
            let timed = (started.elapsed().as_millis() / EXPIRY_INTERVAL.as_millis()) as u64;
            let swept = sweeps.load(Ordering::SeqCst);
            assert!(swept <= 1 + timed, "unreadable: {unreadable}: {swept} sweeps for 20 batches");
            assert_eq!(engine.stats.expired.load(Ordering::Relaxed), 0);
            engine.stop();
        }
    }

    /// A hold storage cannot read is left out of the sweep, not the holds due beside it.
    #[test]
    fn the_sweep_releases_the_holds_beside_one_it_cannot_read() {
        let mut writer = SweptWriter::new(false, Arc::default()).and_another_hold();
        writer.unreadable = Some(TransferKey { tenant: TenantId(1), id: TransferId(10) });
        let engine = Engine::start(Box::new(writer), Arc::new(|| 10_000_000_000));
        let (replied, reply) = mpsc::channel();
        engine.submit(Command::Audit(vec![draft(1)]), Box::new(move |r| replied.send(r).unwrap())).unwrap();
        let reply = reply.recv_timeout(Duration::from_secs(10)).expect("answered");
        assert!(matches!(reply, Ok(Reply::Audited)), "{reply:?}");
        assert_eq!(engine.stats.expired.load(Ordering::Relaxed), 1, "hold 11 released, hold 10 left");
        engine.stop();
    }

    #[test]
    fn replies_wait_for_the_sync_while_the_writer_goes_on() {
        let commits = Arc::new(AtomicU64::new(0));
        let (permit, permits) = mpsc::channel();
        let writer =
            DeferringWriter { commits: commits.clone(), owed: false, sync: Some(Box::new(GatedSync(permits))) };
        let engine = Engine::start(Box::new(writer), Arc::new(|| 1_000));
        let (replied, replies) = mpsc::channel();
        let submit = |n: usize| {
            let replied = replied.clone();
            engine.submit(Command::Audit(vec![draft(n)]), Box::new(move |r| replied.send((n, r)).unwrap())).unwrap();
        };
        let wait_for_commits = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while commits.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "the writer committed {} of {n}", commits.load(Ordering::SeqCst));
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        submit(1);
        wait_for_commits(1);
        // The first batch is committed and its sync is held: the writer commits the next one
        // meanwhile, and neither is answered.
        submit(2);
        wait_for_commits(2);
        assert!(replies.recv_timeout(Duration::from_millis(200)).is_err(), "no reply before a sync");
        // Each sync answers what committed before it began, in commit order.
        permit.send(()).unwrap();
        let (first, reply) = replies.recv_timeout(Duration::from_secs(10)).expect("answered after the sync");
        assert_eq!(first, 1);
        assert!(matches!(reply, Ok(Reply::Audited)));
        permit.send(()).unwrap();
        let (second, reply) = replies.recv_timeout(Duration::from_secs(10)).expect("answered after its sync");
        assert_eq!(second, 2);
        assert!(matches!(reply, Ok(Reply::Audited)));
        // Each sync is counted once in the latency histogram, in the bucket of its time: the first
        // was held for 200 ms, so one took over 100 ms. (A syncer slow to wake finds both batches
        // queued and makes one sync of them.)
        let buckets: Vec<u64> = engine.stats.sync_us_buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let syncs = engine.stats.syncs.load(Ordering::Relaxed);
        assert_eq!(buckets.iter().sum::<u64>(), syncs);
        assert!((1..=2).contains(&syncs), "{syncs}");
        let over_100ms: u64 =
            COMMIT_BUCKETS_US.iter().zip(&buckets).filter(|(b, _)| **b > 100_000).map(|(_, n)| n).sum::<u64>()
                + buckets[COMMIT_BUCKETS_US.len()];
        assert!(over_100ms >= 1, "{buckets:?}");
        // Stopping waits for the syncer: what was committed is answered first.
        submit(3);
        wait_for_commits(3);
        permit.send(()).unwrap();
        engine.stop();
        assert_eq!(replies.try_recv().map(|(n, r)| (n, r.is_ok())), Ok((3, true)));
    }
}
