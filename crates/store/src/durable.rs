//! Commits that become durable beside the writer's next batch.
//!
//! The embedded engine's writer commits a batch, and SQLite makes it visible to other connections
//! at once; the sync that makes it durable (`fdatasync` of the WAL) is left to the engine's syncer
//! thread, while the writer goes on with the next batch. Without this the writer waited for each
//! sync, and so did every request queued behind it: at the HTTP peak the two cores were idle a
//! quarter of the time, waiting for the disk.
//!
//! What keeps "nothing is seen before it is durable" true:
//! - **Replies.** A batch's replies go out from the syncer, after a sync that began after the
//!   batch's `COMMIT` returned, so after its frames were written to the file.
//! - **Reads.** Each commit takes a number ([`Durability::start_commit`]) before its `COMMIT`. A
//!   read, once it ran, waits until everything up to the newest number taken is durable
//!   ([`Durability::mark`], [`Durability::wait`]): whatever the read saw was committed under a
//!   number at most that. Reads wait at most about one sync.
//! - **Other connections' writes** sync the WAL themselves when they commit, which makes every
//!   frame before theirs durable too; the checkpointer's pass syncs the WAL before it copies any
//!   frame into the database file (SQLite's own rule), so the file never gets a page whose frame
//!   could be lost.
//!
//! A sync that fails leaves the file in a state no one can know (Linux may drop the pages it could
//! not write, and a second `fdatasync` then succeeds): the process stops, as PostgreSQL does, and
//! the restart reads back what is really on disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Where the writer, the syncer and the readers of one embedded store meet.
#[derive(Default)]
pub(crate) struct Durability {
    /// The number of the newest commit begun (its `COMMIT` issued, or about to be).
    committing: AtomicU64,
    /// The number of the newest commit whose `COMMIT` returned (frames written, or the commit
    /// failed): what a sync starting now covers.
    written: AtomicU64,
    state: Mutex<Durable>,
    changed: Condvar,
}

#[derive(Default)]
struct Durable {
    through: u64,
    /// Called once `through` reaches their number.
    waiting: Vec<(u64, Box<dyn FnOnce() + Send>)>,
}

impl Durability {
    /// Called by the writer just before `COMMIT`: the commit's number.
    pub(crate) fn start_commit(&self) -> u64 {
        self.committing.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Called by the writer once `COMMIT` returned, whatever it returned.
    pub(crate) fn commit_written(&self, number: u64) {
        self.written.fetch_max(number, Ordering::SeqCst);
    }

    /// The number a sync starting now makes durable.
    pub(crate) fn syncable(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Called by the syncer after a sync: everything up to `number` is durable.
    pub(crate) fn synced(&self, number: u64) {
        let ready = {
            let mut state = self.state.lock().expect("durability lock");
            state.through = state.through.max(number);
            let through = state.through;
            let (ready, waiting): (Vec<_>, Vec<_>) = state.waiting.drain(..).partition(|(n, _)| *n <= through);
            state.waiting = waiting;
            ready
        };
        self.changed.notify_all();
        for (_, then) in ready {
            then();
        }
    }

    /// For a read that has just run: the number that must be durable before it answers.
    pub(crate) fn mark(&self) -> u64 {
        self.committing.load(Ordering::SeqCst)
    }

    pub(crate) fn is_durable(&self, number: u64) -> bool {
        self.state.lock().expect("durability lock").through >= number
    }

    /// Blocks until everything up to `number` is durable.
    pub(crate) fn wait(&self, number: u64) {
        let state = self.state.lock().expect("durability lock");
        drop(self.changed.wait_while(state, |s| s.through < number).expect("durability lock"));
    }

    /// Calls `then` once everything up to `number` is durable: at once, on this thread, if it is.
    pub(crate) fn when_durable(&self, number: u64, then: Box<dyn FnOnce() + Send>) {
        let mut state = self.state.lock().expect("durability lock");
        if state.through >= number {
            drop(state);
            then();
        } else {
            state.waiting.push((number, then));
        }
    }
}

thread_local! {
    /// Set while [`read_deferring`] runs on this thread: reads record what they must wait for
    /// here instead of waiting.
    static DEFERRED: std::cell::RefCell<Option<ReadFence>> = const { std::cell::RefCell::new(None) };
}

/// What a read run under [`read_deferring`] must wait for before it answers.
#[derive(Default)]
pub struct ReadFence(Option<(Arc<Durability>, u64)>);

impl ReadFence {
    /// Whether the read may answer now.
    pub fn is_passed(&self) -> bool {
        self.0.as_ref().is_none_or(|(d, n)| d.is_durable(*n))
    }

    /// Calls `then` once the read may answer: at once, on this thread, if it may now.
    pub fn when_passed(self, then: Box<dyn FnOnce() + Send>) {
        match self.0 {
            None => then(),
            Some((durability, number)) => durability.when_durable(number, then),
        }
    }
}

/// The fences of a flow's reads that it owes before it answers, when the flow reads and then
/// commits: its commit's reply comes after a sync that began once the commit was written, and
/// that sync made durable every commit its earlier reads could have seen. So the reads before a
/// commit of the flow's own are let off by it ([`FencesOwed::committed`]); an answer made without
/// one waits for the fences still owed ([`FencesOwed::take`]).
#[derive(Default)]
pub struct FencesOwed(Mutex<Vec<ReadFence>>);

impl FencesOwed {
    /// A read's fence, owed until the flow commits (nothing, if it has passed).
    pub fn owe(&self, fence: ReadFence) {
        if !fence.is_passed() {
            self.0.lock().expect("fences owed").push(fence);
        }
    }

    /// A commit of the flow's own, made after the reads so far, is durable.
    pub fn committed(&self) {
        self.0.lock().expect("fences owed").clear();
    }

    /// The fences still owed, not yet passed: to wait for before answering.
    pub fn take(&self) -> Vec<ReadFence> {
        let owed = std::mem::take(&mut *self.0.lock().expect("fences owed"));
        owed.into_iter().filter(|f| !f.is_passed()).collect()
    }
}

/// Runs `read` (calls of [`crate::Queries`] on this thread) without blocking for durability, and
/// returns what its answer must wait for: for an async task, which awaits [`ReadFence::when_passed`]
/// instead of blocking its thread.
///
/// It is also a read session: an embedded engine answers `read`'s consecutive point reads from
/// one connection and one read transaction (one snapshot, one lock of the WAL index), and a write
/// through `Queries` ends that transaction first, so the reads after it see it. What the session
/// held is given back when the outermost `read_deferring` ends, however it ends.
pub fn read_deferring<T>(read: impl FnOnce() -> T) -> (T, ReadFence) {
    let outer = DEFERRED.with(|d| d.replace(Some(ReadFence::default())));
    let session = Session { outer: Some(outer) };
    let result = read();
    (result, session.finish())
}

/// One [`read_deferring`]: restores the outer fence and, when outermost, ends the read session —
/// when it finishes, or when `read` unwinds.
struct Session {
    outer: Option<Option<ReadFence>>,
}

impl Session {
    fn finish(mut self) -> ReadFence {
        self.end().unwrap_or_default()
    }

    /// This session's fence.
    fn end(&mut self) -> Option<ReadFence> {
        let outer = self.outer.take()?;
        let outermost = outer.is_none();
        let fence = DEFERRED.with(|d| d.replace(outer));
        if outermost {
            crate::sqlite::end_read_session();
        }
        fence
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.end();
    }
}

/// Whether a read session (see [`read_deferring`]) runs on this thread.
pub(crate) fn in_read_session() -> bool {
    DEFERRED.with(|d| d.borrow().is_some())
}

/// Called by a read of an embedded store once it ran: waits until what it could have seen is
/// durable, or, under [`read_deferring`], records that for the caller.
pub(crate) fn after_read(durability: &Arc<Durability>) {
    let number = durability.mark();
    let deferred = DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        let Some(fence) = d.as_mut() else { return false };
        match &mut fence.0 {
            Some((_, n)) => *n = (*n).max(number),
            None => fence.0 = Some((durability.clone(), number)),
        }
        true
    });
    if !deferred {
        durability.wait(number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_read_waits_for_every_commit_begun_before_it_ended() {
        let d = Arc::new(Durability::default());
        // No commit yet: nothing to wait for.
        after_read(&d);
        let first = d.start_commit();
        let second = d.start_commit();
        d.commit_written(first);
        assert_eq!(d.syncable(), first, "a sync now covers only the commit whose COMMIT returned");
        let (tx, rx) = mpsc::channel();
        let reader = {
            let d = d.clone();
            std::thread::spawn(move || {
                after_read(&d);
                tx.send(()).unwrap();
            })
        };
        d.synced(first);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "the second commit is not durable yet");
        d.commit_written(second);
        d.synced(d.syncable());
        rx.recv_timeout(Duration::from_secs(10)).expect("the read answers once both are durable");
        reader.join().unwrap();
    }

    /// A flow's reads before its own commit owe nothing once it is durable; reads after it, and
    /// a flow that never commits, still owe their fences until the syncs pass them.
    #[test]
    fn fences_owed_are_let_off_by_the_flows_own_commit_only() {
        let d = Arc::new(Durability::default());
        let seen = d.start_commit();
        let owed = FencesOwed::default();
        owed.owe(read_deferring(|| after_read(&d)).1);
        owed.owe(read_deferring(|| after_read(&d)).1);
        // The flow's commit, after its reads: durable once synced (with the one the reads saw).
        let own = d.start_commit();
        d.commit_written(own);
        d.synced(own);
        owed.committed();
        assert!(owed.take().is_empty(), "the reads before the commit owe nothing");
        // A read after the commit, and a flow that answers without committing, owe theirs.
        let later = d.start_commit();
        owed.owe(read_deferring(|| after_read(&d)).1);
        let unsynced = owed.take();
        assert_eq!(unsynced.len(), 1);
        assert!(!unsynced[0].is_passed());
        assert!(owed.take().is_empty(), "taken once");
        let again = FencesOwed::default();
        owed.owe(read_deferring(|| after_read(&d)).1);
        again.owe(read_deferring(|| after_read(&d)).1);
        d.commit_written(later);
        d.synced(later);
        assert!(again.take().is_empty(), "a fence passed by a sync is not waited for");
        assert!(seen < own && own < later);
        // A read that saw nothing unsynced owes nothing.
        let fresh = FencesOwed::default();
        fresh.owe(read_deferring(|| after_read(&d)).1);
        assert!(fresh.take().is_empty());
    }

    #[test]
    fn a_deferred_read_returns_its_fence_and_is_called_back_once_durable() {
        let d = Arc::new(Durability::default());
        let n = d.start_commit();
        let ((), fence) = read_deferring(|| after_read(&d));
        assert!(!fence.is_passed());
        let (tx, rx) = mpsc::channel();
        fence.when_passed(Box::new(move || tx.send(()).unwrap()));
        assert!(rx.try_recv().is_err(), "not before the sync");
        d.commit_written(n);
        d.synced(n);
        rx.try_recv().expect("called by the syncer's thread as it marks the commit durable");
        // Once durable, a fence calls back at once, and a read outside `read_deferring` does not wait.
        let ((), fence) = read_deferring(|| after_read(&d));
        assert!(fence.is_passed());
        let (tx, rx) = mpsc::channel();
        fence.when_passed(Box::new(move || tx.send(()).unwrap()));
        rx.try_recv().expect("at once");
        after_read(&d);
        // Nested: the inner fence covers the inner reads only, and the outer one is kept.
        let m = d.start_commit();
        let ((((), inner), ()), outer) = read_deferring(|| (read_deferring(|| after_read(&d)), after_read(&d)));
        assert!(!inner.is_passed() && !outer.is_passed());
        d.commit_written(m);
        d.synced(m);
        assert!(inner.is_passed() && outer.is_passed());
    }
}
