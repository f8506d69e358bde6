//! SQLite's own page cache, with one needless cost taken out.
//!
//! When a B-tree page splits, SQLite (`balance_nonroot`) puts the new pages in page-number order by
//! swapping two pages' keys through a temporary one: the page holding the "pending byte" at 1 GiB
//! (page 262,145 with 4 KiB pages), which no database file uses. The default page cache
//! (`pcache1`) remembers the largest key it ever held, and at the end of every write transaction
//! SQLite asks it to drop the pages past the end of the database; since that largest key is now
//! far past the end, `pcache1` walks its whole hash table — every page in the cache — on every
//! commit after a split. With a 64 MiB cache that walk was 11–16 % of the writer thread's time
//! (`perf`, the card and Pix benchmarks).
//!
//! This wrapper keeps the default cache and forwards every call, but tracks the largest key a page
//! really holds (ignoring the swap's temporary key, which no page keeps past the swap) and skips a
//! truncation that cannot drop anything: every page it holds is below the limit. A truncation that
//! can drop pages is forwarded as before.
//!
//! Installed once per process, before SQLite is initialized ([`install`]); if SQLite was
//! initialized earlier (another library opened a database first), the default cache stays.

use std::os::raw::{c_int, c_uint, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// SQLite's default `PENDING_BYTE`.
const PENDING_BYTE: c_uint = 0x4000_0000;

struct Methods(ffi::sqlite3_pcache_methods2);
// The default methods are plain function pointers and SQLite's global argument; SQLite itself
// calls them from any thread.
unsafe impl Send for Methods {}
unsafe impl Sync for Methods {}

static DEFAULT: OnceLock<Methods> = OnceLock::new();
static INSTALLED: OnceLock<bool> = OnceLock::new();

#[repr(C)]
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// The swap's temporary key for this cache's page size.
    pending: c_uint,
    /// No page of the cache has a larger key (0: none).
    max_key: c_uint,
}

fn default() -> &'static ffi::sqlite3_pcache_methods2 {
    &DEFAULT.get().expect("installed before use").0
}

unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    // SAFETY: every pointer SQLite passes back is one `x_create` returned, alive until `x_destroy`,
    // and used by one connection at a time.
    unsafe { &mut *(p as *mut Cache) }
}

unsafe extern "C" fn x_init(arg: *mut c_void) -> c_int {
    match default().xInit {
        Some(f) => unsafe { f(arg) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn x_shutdown(arg: *mut c_void) {
    if let Some(f) = default().xShutdown {
        unsafe { f(arg) }
    }
}

unsafe extern "C" fn x_create(page: c_int, extra: c_int, purgeable: c_int) -> *mut ffi::sqlite3_pcache {
    let inner = unsafe { (default().xCreate.expect("xCreate"))(page, extra, purgeable) };
    if inner.is_null() {
        return inner;
    }
    let pending = PENDING_BYTE / (page.max(1) as c_uint) + 1;
    Box::into_raw(Box::new(Cache { inner, pending, max_key: 0 })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn x_cachesize(p: *mut ffi::sqlite3_pcache, n: c_int) {
    unsafe { (default().xCachesize.expect("xCachesize"))(cache(p).inner, n) }
}

unsafe extern "C" fn x_pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    unsafe { (default().xPagecount.expect("xPagecount"))(cache(p).inner) }
}

unsafe extern "C" fn x_fetch(p: *mut ffi::sqlite3_pcache, key: c_uint, create: c_int) -> *mut ffi::sqlite3_pcache_page {
    let c = unsafe { cache(p) };
    let page = unsafe { (default().xFetch.expect("xFetch"))(c.inner, key, create) };
    if !page.is_null() {
        c.max_key = c.max_key.max(key);
    }
    page
}

unsafe extern "C" fn x_unpin(p: *mut ffi::sqlite3_pcache, page: *mut ffi::sqlite3_pcache_page, discard: c_int) {
    unsafe { (default().xUnpin.expect("xUnpin"))(cache(p).inner, page, discard) }
}

unsafe extern "C" fn x_rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    let c = unsafe { cache(p) };
    // The swap's temporary key is given up again by the next call of the same swap.
    if new != c.pending {
        c.max_key = c.max_key.max(new);
    }
    unsafe { (default().xRekey.expect("xRekey"))(c.inner, page, old, new) }
}

unsafe extern "C" fn x_truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    let c = unsafe { cache(p) };
    // Drops pages with keys >= limit: with none held, nothing to do (and nothing to walk).
    if limit <= c.max_key {
        unsafe { (default().xTruncate.expect("xTruncate"))(c.inner, limit) };
        c.max_key = limit.saturating_sub(1);
    }
}

unsafe extern "C" fn x_destroy(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: `p` came from `x_create` and SQLite never uses it again.
    let c = unsafe { Box::from_raw(p as *mut Cache) };
    unsafe { (default().xDestroy.expect("xDestroy"))(c.inner) }
}

unsafe extern "C" fn x_shrink(p: *mut ffi::sqlite3_pcache) {
    if let Some(f) = default().xShrink {
        unsafe { f(cache(p).inner) }
    }
}

/// Puts the wrapper in place of the default page cache, once per process. Returns whether it is
/// in place (false when SQLite had been initialized already).
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        let mut methods = std::mem::MaybeUninit::<ffi::sqlite3_pcache_methods2>::zeroed();
        // SAFETY: SQLITE_CONFIG_GETPCACHE2 writes the current methods into the struct it is given;
        // the configuration calls are made before any connection (SQLite refuses them afterwards
        // with SQLITE_MISUSE, and then nothing changes).
        unsafe {
            if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, methods.as_mut_ptr()) != ffi::SQLITE_OK {
                return false;
            }
            let methods = methods.assume_init();
            if methods.xCreate.is_none() || methods.xFetch.is_none() || methods.xTruncate.is_none() {
                return false;
            }
            let _ = DEFAULT.set(Methods(methods));
            let wrapper = ffi::sqlite3_pcache_methods2 {
                iVersion: methods.iVersion,
                pArg: methods.pArg,
                xInit: Some(x_init),
                xShutdown: Some(x_shutdown),
                xCreate: Some(x_create),
                xCachesize: Some(x_cachesize),
                xPagecount: Some(x_pagecount),
                xFetch: Some(x_fetch),
                xUnpin: Some(x_unpin),
                xRekey: Some(x_rekey),
                xTruncate: Some(x_truncate),
                xDestroy: Some(x_destroy),
                xShrink: Some(x_shrink),
            };
            // SQLite copies the struct.
            ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &wrapper as *const ffi::sqlite3_pcache_methods2)
                == ffi::SQLITE_OK
        }
    })
}

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection};

    /// Page splits (random keys), a rolled-back transaction that grew the file (its pages past
    /// the end must be dropped, or the next growth would find their stale contents), and the data
    /// read back: what SQLite's own integrity check and the rows say.
    #[test]
    fn the_wrapped_cache_keeps_every_page_right_through_splits_and_rollbacks() {
        assert!(super::install(), "installed before SQLite starts");
        let dir = std::env::temp_dir().join(format!("rtpay-pcache-{}-{}", std::process::id(), crate::now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA cache_size = -4096; \
             CREATE TABLE t (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
        )
        .unwrap();
        let key = |i: u64| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_be_bytes().to_vec();
        let value = |i: u64, round: u64| vec![(i % 251) as u8 ^ round as u8; 200];
        let insert = |conn: &mut Connection, range: std::ops::Range<u64>, round: u64, commit: bool| {
            let tx = conn.transaction().unwrap();
            for i in range {
                tx.execute("INSERT OR REPLACE INTO t (k, v) VALUES (?1, ?2)", params![key(i), value(i, round)])
                    .unwrap();
            }
            if commit {
                tx.commit().unwrap()
            } else {
                tx.rollback().unwrap()
            }
        };
        for batch in 0..20 {
            insert(&mut conn, batch * 500..(batch + 1) * 500, 1, true);
        }
        // Grows the file by thousands of pages, then rolls back; then other rows take those pages.
        insert(&mut conn, 10_000..30_000, 2, false);
        insert(&mut conn, 40_000..50_000, 3, true);
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let n: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 20_000);
        for i in (0..10_000).step_by(97).chain((40_000..50_000).step_by(89)) {
            let v: Vec<u8> = conn.query_row("SELECT v FROM t WHERE k = ?1", [key(i)], |r| r.get(0)).unwrap();
            assert_eq!(v, value(i, if i < 10_000 { 1 } else { 3 }), "row {i}");
        }
        let missing: Option<Vec<u8>> = conn.query_row("SELECT v FROM t WHERE k = ?1", [key(15_000)], |r| r.get(0)).ok();
        assert_eq!(missing, None, "a rolled-back row");
        // A second connection's cache is cleared (truncated to nothing) when the first writes:
        // it must see the new value, not the page it holds.
        let reader = Connection::open(&path).unwrap();
        let read =
            |k: u64| -> Vec<u8> { reader.query_row("SELECT v FROM t WHERE k = ?1", [key(k)], |r| r.get(0)).unwrap() };
        assert_eq!(read(7), value(7, 1));
        insert(&mut conn, 0..100, 4, true);
        assert_eq!(read(7), value(7, 4), "the reader sees the write");
        drop(reader);
        drop(conn);
        let _ = std::fs::remove_dir_all(dir);
    }
}
