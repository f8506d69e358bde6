//! The operating system's file layer as SQLite uses it, with the WAL's writes gathered.
//!
//! SQLite appends each WAL frame with two `pwrite`s: its 24-byte header, then its page. A commit
//! of 130 pages is 260 system calls, each taking the file's lock, updating its times and walking
//! the page cache for the folios it touches; in the Pix benchmark that was a third of the writer
//! thread. A measurement outside SQLite (130 frames, then `fdatasync`) took 400 µs as separate
//! writes and 100 µs as one.
//!
//! This VFS forwards everything to SQLite's default one, except that writes to a WAL file are
//! kept in memory while they continue each other and go to the file as one `pwrite` just before
//! anything that could need them there: a sync, a read of the file, its size, a truncation, a file
//! control, a write elsewhere in it, closing it, or [`PENDING_LEN_MAX`] bytes; in writes of at
//! most 128 KiB, the most the default VFS takes at once (about 30 frames per system call).
//!
//! Why that is safe: another connection reads a WAL frame only once the wal-index header says it
//! is committed, and SQLite writes that header after the commit's sync — which, here, writes the
//! frames first. That holds only if every commit syncs the WAL, so every connection opened on
//! this VFS must use `synchronous = FULL` (`sqlite::connect` sets it and checks it). A crash
//! before the sync loses frames that no one was told were committed, as it always could.
//!
//! The writer's `COMMIT` runs with its syncs deferred ([`defer_syncs`]): the sync still writes the
//! gathered frames, but leaves the `fdatasync` to the engine's syncer thread (`crate::durable`).
//!
//! The database file's writes (a checkpoint's copies) can also be *trickled* ([`trickle`]): every
//! few pages, the stretch of the file they span is handed to the disk (`sync_file_range`, which
//! starts the write-back and waits for nothing), and, when pacing, a short sleep follows. A
//! checkpoint copies pages in ascending order, so a stretch is mostly contiguous and goes as a few
//! large requests; handing each page alone cost a request and a virtual-disk notification per
//! page, a tenth of the server's CPU in the HTTP benchmark. Without it a
//! checkpoint's pages wait in memory until its closing `fsync`, and then go to the disk together —
//! and every commit's WAL sync in those milliseconds waits behind them (the card authorizations'
//! tail). Durability is unchanged: the checkpoint still syncs the file before the WAL may start
//! over; trickling only changes when the bytes travel.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// How the database file's writes are trickled on this thread, while a [`Trickle`] guard lives.
#[derive(Clone, Copy)]
struct Trickling {
    /// A descriptor of the database file (write-back is per file, so any descriptor does).
    fd: std::os::raw::c_int,
    pace: bool,
    written: u32,
    /// The stretch of the file written since it was last handed to the disk (`from == to`: none).
    from: i64,
    to: i64,
    /// Stretches handed to the disk.
    handed: u32,
}

impl Trickling {
    /// Starts the write-back of the stretch written so far.
    fn hand(&mut self) {
        if self.from < self.to {
            // SAFETY: a plain system call on a descriptor the guard's owner keeps open; it fails
            // harmlessly (EBADF, EINVAL) otherwise, and then the checkpoint's own sync writes the
            // pages as before.
            #[cfg(target_os = "linux")]
            unsafe {
                libc::sync_file_range(self.fd, self.from, self.to - self.from, libc::SYNC_FILE_RANGE_WRITE);
            }
            self.handed += 1;
        }
        self.from = 0;
        self.to = 0;
    }
}

thread_local! {
    static TRICKLING: std::cell::Cell<Option<Trickling>> = const { std::cell::Cell::new(None) };
}

/// Every this many pages written, their stretch is handed to the disk and, when pacing, a sleep of
/// [`PACE_SLEEP`] follows: at most about 16 pages per 0.2 ms, 320 MB/s, above what a checkpoint
/// behind any of our loads needs.
const PACE_PAGES: u32 = 16;
const PACE_SLEEP: std::time::Duration = std::time::Duration::from_micros(200);

/// While the guard lives, writes this thread makes to a database file (not a WAL) opened on this
/// VFS are started towards the disk at once; with `pace`, spread out as well. `fd` is a descriptor
/// of that database file (the checkpointer's thread writes no other), open for the guard's life.
pub(crate) fn trickle(fd: std::os::raw::c_int, pace: bool) -> Trickle {
    TRICKLING.with(|t| t.set(Some(Trickling { fd, pace, written: 0, from: 0, to: 0, handed: 0 })));
    Trickle(std::marker::PhantomData)
}

/// Ends the trickling when dropped; bound to its thread.
pub(crate) struct Trickle(std::marker::PhantomData<*const ()>);

impl Trickle {
    /// Writes trickled so far under this guard.
    #[cfg(test)]
    fn written(&self) -> u32 {
        TRICKLING.with(|t| t.get().map_or(0, |t| t.written))
    }

    /// Stretches handed to the disk so far under this guard.
    #[cfg(test)]
    fn handed(&self) -> u32 {
        TRICKLING.with(|t| t.get().map_or(0, |t| t.handed))
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        if let Some(mut t) = TRICKLING.with(|t| t.take()) {
            t.hand();
        }
    }
}

/// Notes `len` bytes at `offset`, just written to the database file, for the disk, if this thread
/// trickles; every [`PACE_PAGES`] writes, hands their stretch over (and paces).
fn trickled(offset: i64, len: c_int) {
    let Some(mut t) = TRICKLING.with(|t| t.get()) else { return };
    let end = offset + i64::from(len);
    if t.from == t.to {
        (t.from, t.to) = (offset, end);
    } else {
        (t.from, t.to) = (t.from.min(offset), t.to.max(end));
    }
    t.written += 1;
    let due = t.written % PACE_PAGES == 0;
    if due {
        t.hand();
    }
    TRICKLING.with(|cell| cell.set(Some(t)));
    if due && t.pace {
        std::thread::sleep(PACE_SLEEP);
    }
}

thread_local! {
    static DEFERRING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the guard lives, a WAL sync asked for on this thread writes the WAL's gathered frames to
/// the file and returns without syncing: the caller owes the sync, and must make it (on any
/// descriptor of the WAL file) before it tells anyone the commit is durable. For the writer's
/// `COMMIT` only; see `crate::durable`.
pub(crate) fn defer_syncs() -> DeferSyncs {
    DEFERRING.with(|d| d.set(true));
    DeferSyncs(std::marker::PhantomData)
}

#[cfg(test)]
thread_local! {
    /// WAL syncs made on this thread (not deferred), for tests.
    static REAL_SYNCS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Ends the deferring when dropped; bound to its thread.
pub(crate) struct DeferSyncs(std::marker::PhantomData<*const ()>);

impl Drop for DeferSyncs {
    fn drop(&mut self) {
        DEFERRING.with(|d| d.set(false));
    }
}

/// The name connections open with.
pub(crate) const VFS_NAME: &str = "rtpay-wal";
const VFS_NAME_C: &CStr = c"rtpay-wal";

/// The most a WAL file keeps unwritten (a batch of 8,000 transfers writes about 6 MiB of frames).
pub(crate) const PENDING_LEN_MAX: usize = 16 << 20;

/// The most the default VFS writes in one call: its `seekAndWriteFd` keeps only the low 17 bits
/// of a length (its own writes are a page or a frame), so a longer write would be cut short.
const WRITE_LEN_MAX: usize = 0x1ffff;

/// What the VFS puts in front of the default VFS's file: SQLite allocates `szOsFile` bytes, this
/// struct first and the default file after it.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// Writes are gathered (a WAL file).
    gather: bool,
    /// The main database file: its writes may be trickled.
    main_db: bool,
    /// Bytes not yet written, which belong at `pending_at`.
    pending: Vec<u8>,
    pending_at: i64,
    /// The WAL's header (offset 0) was written since the last sync: the WAL is starting over.
    header_unsynced: bool,
}

/// `File`'s size, rounded up so that the default file after it is aligned.
const FILE_LEN: usize = std::mem::size_of::<File>().next_multiple_of(16);

struct Vfs {
    ours: ffi::sqlite3_vfs,
    real: *mut ffi::sqlite3_vfs,
}
// SQLite's default VFS lives for the process and is safe to call from any thread; ours is only
// read after registration.
unsafe impl Send for Vfs {}
unsafe impl Sync for Vfs {}

static VFS: OnceLock<Option<Box<Vfs>>> = OnceLock::new();

/// Registers the VFS once per process (not as the default). False if SQLite has no default VFS
/// to wrap, or refused the registration: connections then use the default VFS.
pub(crate) fn install() -> bool {
    VFS.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS (initializing SQLite if needed),
        // which lives for the process; the copy we register is boxed and never freed or moved.
        unsafe {
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            if real.is_null() {
                return None;
            }
            let mut ours: ffi::sqlite3_vfs = std::ptr::read(real);
            ours.szOsFile = c_int::try_from(FILE_LEN).ok()? + (*real).szOsFile;
            ours.zName = VFS_NAME_C.as_ptr();
            ours.pNext = std::ptr::null_mut();
            ours.xOpen = Some(x_open);
            let mut vfs = Box::new(Vfs { ours, real });
            if ffi::sqlite3_vfs_register(&mut vfs.ours, 0) != ffi::SQLITE_OK {
                return None;
            }
            Some(vfs)
        }
    })
    .is_some()
}

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    VFS.get().and_then(|v| v.as_ref()).expect("installed before use").real
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = real_vfs();
    // SAFETY: SQLite gives `szOsFile` bytes at `file`, of which the default file's are after ours.
    unsafe {
        let real = (file as *mut u8).add(FILE_LEN) as *mut ffi::sqlite3_file;
        (*file).pMethods = std::ptr::null();
        let rc = ((*real_vfs).xOpen.expect("xOpen"))(real_vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            // SQLite calls no method of a file whose `pMethods` is null (the default file's own
            // failure leaves nothing to close).
            return rc;
        }
        if (*(*real).pMethods).iVersion < METHODS.iVersion {
            // Every method of ours forwards to one of the default file's; it must have them all.
            ((*(*real).pMethods).xClose.expect("xClose"))(real);
            return ffi::SQLITE_CANTOPEN;
        }
        std::ptr::write(
            file as *mut File,
            File {
                base: ffi::sqlite3_file { pMethods: &METHODS },
                real,
                gather: flags & ffi::SQLITE_OPEN_WAL != 0,
                main_db: flags & ffi::SQLITE_OPEN_MAIN_DB != 0,
                pending: Vec::new(),
                pending_at: 0,
                header_unsynced: false,
            },
        );
        ffi::SQLITE_OK
    }
}

unsafe fn ours<'a>(file: *mut ffi::sqlite3_file) -> &'a mut File {
    // SAFETY: every file SQLite hands to `METHODS` was made by `x_open`, and one connection uses a
    // file at a time.
    unsafe { &mut *(file as *mut File) }
}

unsafe fn methods(real: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the default file was opened successfully, so its methods are set for its life.
    unsafe { &*(*real).pMethods }
}

impl File {
    /// Writes what is pending. The pending bytes are dropped either way: after a failed write
    /// SQLite abandons the transaction (its frames are never committed).
    unsafe fn flush(&mut self) -> c_int {
        if self.pending.is_empty() {
            return ffi::SQLITE_OK;
        }
        let mut rc = ffi::SQLITE_OK;
        let mut at = self.pending_at;
        for chunk in self.pending.chunks(WRITE_LEN_MAX) {
            let len = c_int::try_from(chunk.len()).expect("WRITE_LEN_MAX fits");
            // SAFETY: the default file's own write, with a buffer that lives through the call.
            rc = unsafe {
                (methods(self.real).xWrite.expect("xWrite"))(self.real, chunk.as_ptr() as *const c_void, len, at)
            };
            if rc != ffi::SQLITE_OK {
                break;
            }
            at += len as i64;
        }
        self.pending.clear();
        rc
    }
}

/// Forwards a method to the default file after writing what is pending.
macro_rules! flushed {
    ($name:ident, $method:ident ($($arg:ident : $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: see `ours` and `methods`.
            unsafe {
                let f = ours(file);
                let rc = f.flush();
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                (methods(f.real).$method.expect(stringify!($method)))(f.real $(, $arg)*)
            }
        }
    };
}

/// Forwards a method to the default file.
macro_rules! forwarded {
    ($name:ident, $method:ident ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> $ret {
            // SAFETY: see `ours` and `methods`.
            unsafe {
                let f = ours(file);
                (methods(f.real).$method.expect(stringify!($method)))(f.real $(, $arg)*)
            }
        }
    };
}

flushed!(x_read, xRead(buf: *mut c_void, amount: c_int, offset: i64));
flushed!(x_truncate, xTruncate(size: i64));
unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: see `ours` and `methods`.
    unsafe {
        let f = ours(file);
        let rc = f.flush();
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        // A WAL starting over writes its new header (a new salt), then syncs it before the first
        // frame after it: were the frames durable and the header not, recovery would read the
        // old header and take the previous generation's frames still in the file as live, older
        // page images over newer ones. That sync is not deferred; it happens once per start-over.
        if f.gather && !f.header_unsynced && DEFERRING.with(|d| d.get()) {
            // The frames are in the file; the syncer makes them durable (see `defer_syncs`).
            return ffi::SQLITE_OK;
        }
        f.header_unsynced = false;
        #[cfg(test)]
        REAL_SYNCS.with(|n| n.set(n.get() + 1));
        (methods(f.real).xSync.expect("xSync"))(f.real, flags)
    }
}
flushed!(x_file_size, xFileSize(size: *mut i64));
flushed!(x_file_control, xFileControl(op: c_int, arg: *mut c_void));
flushed!(x_fetch, xFetch(offset: i64, amount: c_int, page: *mut *mut c_void));
forwarded!(x_lock, xLock(level: c_int) -> c_int);
forwarded!(x_unlock, xUnlock(level: c_int) -> c_int);
forwarded!(x_check_reserved_lock, xCheckReservedLock(out: *mut c_int) -> c_int);
forwarded!(x_sector_size, xSectorSize() -> c_int);
forwarded!(x_device_characteristics, xDeviceCharacteristics() -> c_int);
forwarded!(x_shm_map, xShmMap(region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int);
forwarded!(x_shm_lock, xShmLock(offset: c_int, n: c_int, flags: c_int) -> c_int);
forwarded!(x_shm_barrier, xShmBarrier() -> ());
forwarded!(x_shm_unmap, xShmUnmap(delete: c_int) -> c_int);
forwarded!(x_unfetch, xUnfetch(offset: i64, page: *mut c_void) -> c_int);

unsafe extern "C" fn x_write(file: *mut ffi::sqlite3_file, buf: *const c_void, amount: c_int, offset: i64) -> c_int {
    // SAFETY: see `ours` and `methods`; SQLite's buffer holds `amount` bytes for the call.
    unsafe {
        let f = ours(file);
        if !f.gather {
            let rc = (methods(f.real).xWrite.expect("xWrite"))(f.real, buf, amount, offset);
            if rc == ffi::SQLITE_OK && f.main_db {
                trickled(offset, amount);
            }
            return rc;
        }
        if !f.pending.is_empty() && offset != f.pending_at + f.pending.len() as i64 {
            let rc = f.flush();
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if f.pending.is_empty() {
            f.pending_at = offset;
        }
        if offset == 0 {
            f.header_unsynced = true;
        }
        let bytes = std::slice::from_raw_parts(buf as *const u8, usize::try_from(amount).unwrap_or(0));
        f.pending.extend_from_slice(bytes);
        if f.pending.len() >= PENDING_LEN_MAX {
            return f.flush();
        }
        ffi::SQLITE_OK
    }
}

/// The WAL file `conn` has open on this VFS, if any (SQLite's, open while the connection is).
fn our_wal(conn: &rusqlite::Connection) -> Option<*mut ffi::sqlite3_file> {
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: the connection's handle is valid for the call; the file control stores the WAL's
    // file (or the rollback journal's, or null) into `file`; only a file opened by this VFS is
    // taken as ours.
    unsafe {
        let rc = ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            &mut file as *mut *mut ffi::sqlite3_file as *mut c_void,
        );
        (rc == ffi::SQLITE_OK && !file.is_null() && std::ptr::eq((*file).pMethods, &METHODS)).then_some(file)
    }
}

/// Drops the WAL bytes `conn` gathered and has not written: a rolled-back transaction's frames
/// (a cache spill writes frames before the commit). Written later, after another connection
/// committed frames at the same offsets, they would overwrite those.
pub(crate) fn discard_pending(conn: &rusqlite::Connection) {
    if let Some(file) = our_wal(conn) {
        // SAFETY: our file, which the connection (borrowed here, so not in use) keeps open.
        unsafe { ours(file) }.pending.clear();
    }
}

/// Bytes `conn`'s WAL holds gathered and not written (for tests).
#[cfg(test)]
pub(crate) fn pending_len(conn: &rusqlite::Connection) -> usize {
    // SAFETY: as in `discard_pending`.
    our_wal(conn).map_or(0, |file| unsafe { ours(file) }.pending.len())
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: see `ours` and `methods`; after this SQLite never uses the file again, so its
    // buffer is dropped here.
    unsafe {
        let f = ours(file);
        let flushed = f.flush();
        let rc = (methods(f.real).xClose.expect("xClose"))(f.real);
        std::ptr::drop_in_place(&mut f.pending);
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            rc
        }
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection, OpenFlags};

    fn open(path: &std::path::Path) -> Connection {
        assert!(super::install());
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let conn = Connection::open_with_flags_and_vfs(path, flags, super::VFS_NAME).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0;")
            .unwrap();
        conn
    }

    /// A scratch directory holding a database on this VFS with one table `t (k, v)`: the
    /// directory, the database's path and the connection that made it.
    fn scratch(name: &str) -> (std::path::PathBuf, std::path::PathBuf, Connection) {
        let dir = std::env::temp_dir().join(format!("rtpay-{name}-{}-{}", std::process::id(), crate::now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let writer = open(&path);
        writer.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)").unwrap();
        (dir, path, writer)
    }

    /// Commits of every size — one frame, more than one default-VFS write, more than the pending
    /// limit — are whole for another connection and after reopening, rolled-back ones leave
    /// nothing, and the WAL on disk holds every committed frame (checked without this VFS).
    #[test]
    fn gathered_wal_writes_are_whole_at_every_commit() {
        let (dir, path, mut writer) = scratch("walvfs");
        let reader = open(&path);
        let count = |c: &Connection| -> (i64, i64) {
            c.query_row("SELECT count(*), coalesce(sum(length(v)), 0) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
        };
        let mut expected = (0i64, 0i64);
        // Rows of 3 KiB: 1 row ≈ 1 frame; 60 rows > 128 KiB; 7,000 rows > PENDING_LEN_MAX.
        for (round, rows) in [1i64, 60, 7_000, 3].into_iter().enumerate() {
            for commit in [false, true] {
                let tx = writer.transaction().unwrap();
                for i in 0..rows {
                    let k = expected.0 + i + 1;
                    tx.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", params![k, vec![round as u8; 3072]]).unwrap();
                }
                if commit {
                    tx.commit().unwrap();
                    expected = (expected.0 + rows, expected.1 + rows * 3072);
                } else {
                    tx.rollback().unwrap();
                }
                assert_eq!(count(&reader), expected, "round {round}, commit {commit}");
            }
        }
        drop(reader);
        // A connection on the default VFS reads the WAL as the file holds it.
        let plain = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        assert_eq!(count(&plain), expected);
        drop(plain);
        // The last connection checkpoints at close; what it copied is there at reopening.
        drop(writer);
        assert_eq!(count(&open(&path)), expected);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A commit whose sync is deferred has written its frames to the file when `COMMIT` returns:
    /// another connection sees it, and so does one on the default VFS, which reads the file
    /// itself. Only this thread defers, and only while the guard lives.
    #[test]
    fn a_deferred_commit_is_in_the_file_when_it_returns() {
        let (dir, path, writer) = scratch("defer");
        let reader = open(&path);
        for rows in [1i64, 100] {
            let guard = super::defer_syncs();
            assert!(std::thread::spawn(|| !super::DEFERRING.with(|d| d.get())).join().unwrap());
            writer.execute_batch("BEGIN").unwrap();
            for _ in 0..rows {
                writer.execute("INSERT INTO t (v) VALUES (?1)", params![vec![1u8; 3072]]).unwrap();
            }
            writer.execute_batch("COMMIT").unwrap();
            drop(guard);
            assert!(!super::DEFERRING.with(|d| d.get()));
            let count = |c: &Connection| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap();
            let plain = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let expected = if rows == 1 { 1 } else { 101 };
            assert_eq!((count(&reader), count(&plain)), (expected, expected));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A WAL starting over syncs its new header before its frames even while syncs are deferred
    /// (power lost with the frames on the disk and not the header would make recovery take the
    /// old generation's frames as live); the commits after it leave their syncs to the syncer.
    #[test]
    fn a_wal_starting_over_syncs_its_header_even_when_deferring() {
        let (dir, _path, writer) = scratch("restart");
        let syncs = || super::REAL_SYNCS.with(|n| n.get());
        writer.execute("INSERT INTO t (v) VALUES (?1)", params![vec![1u8; 100]]).unwrap();
        // Copied and emptied: the next commit starts the WAL over, header first.
        writer.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        let guard = super::defer_syncs();
        let before = syncs();
        writer.execute("INSERT INTO t (v) VALUES (?1)", params![vec![2u8; 100]]).unwrap();
        assert_eq!(syncs() - before, 1, "the new header's sync");
        writer.execute("INSERT INTO t (v) VALUES (?1)", params![vec![3u8; 100]]).unwrap();
        assert_eq!(syncs() - before, 1, "the next commit's sync is deferred");
        drop(guard);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Frames a transaction spilled before rolling back are dropped, not written later (over
    /// frames another connection may have committed at the same offsets meanwhile).
    #[test]
    fn a_rolled_back_spill_is_discarded() {
        let (dir, path, writer) = scratch("spill");
        let other = open(&path);
        writer.execute_batch("PRAGMA cache_size = 8").unwrap();
        writer.execute_batch("BEGIN").unwrap();
        for _ in 0..200 {
            writer.execute("INSERT INTO t (v) VALUES (?1)", params![vec![4u8; 3072]]).unwrap();
        }
        assert!(super::pending_len(&writer) > 0, "the cache spilled frames into the WAL's buffer");
        writer.execute_batch("ROLLBACK").unwrap();
        super::discard_pending(&writer);
        assert_eq!(super::pending_len(&writer), 0);
        // Another connection commits at the same offsets; the writer reads it intact.
        other.execute("INSERT INTO t (v) VALUES (?1)", params![vec![5u8; 3072]]).unwrap();
        let rows: Vec<u8> = writer
            .prepare("SELECT v FROM t")
            .unwrap()
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|v| v.unwrap()[0])
            .collect();
        assert_eq!(rows, [5]);
        drop(other);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A checkpoint made while trickling (paced or not) copies every committed page into the
    /// database file, through the trickle: the file alone, without its WAL, holds every row.
    #[test]
    fn trickled_checkpoints_copy_every_page() {
        let (dir, path, writer) = scratch("trickle");
        let checkpointer = open(&path);
        let file = std::fs::File::open(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut rows = 0i64;
        for pace in [true, false] {
            // 200 rows of 3 KiB: about 200 pages, several pacing sleeps.
            for _ in 0..200 {
                rows += 1;
                writer.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", params![rows, vec![7u8; 3072]]).unwrap();
            }
            let guard = super::trickle(fd, pace);
            let (log, copied): (i64, i64) =
                checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?))).unwrap();
            assert_eq!(log, copied, "every frame copied (pace {pace})");
            assert!(guard.written() >= 200, "{} writes trickled (pace {pace})", guard.written());
            // The pages go to the disk a stretch at a time, not one by one.
            assert_eq!(guard.handed(), guard.written() / super::PACE_PAGES, "pace {pace}");
            drop(guard);
            // Another thread does not trickle.
            assert!(std::thread::spawn(|| super::TRICKLING.with(|t| t.get()).is_none()).join().unwrap());
            let copy = dir.join(format!("copy-{pace}.db"));
            std::fs::copy(&path, &copy).unwrap();
            let alone = Connection::open_with_flags(&copy, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let (n, bytes): (i64, i64) =
                alone.query_row("SELECT count(*), sum(length(v)) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
            assert_eq!((n, bytes), (rows, rows * 3072), "pace {pace}");
        }
        assert!(super::TRICKLING.with(|t| t.get()).is_none(), "the guard's drop ends the trickling");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
