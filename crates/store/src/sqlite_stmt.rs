//! The writer's own prepared statements: found by their text's address, bound without copies.
//!
//! rusqlite's `prepare_cached` finds a statement by hashing its whole text (the batch's multi-row
//! `INSERT`s are kilobytes long) and takes it out of and back into an LRU on every use; its
//! binding copies every text and blob into SQLite (`SQLITE_TRANSIENT`). In the HTTP benchmark's
//! batches that was a seventh of the writer's time. Here a statement is prepared once per
//! connection and found by the address of its `'static` text, and values are bound in place
//! (`SQLITE_STATIC`): [`Statement::execute`] borrows them for the call, and clears the bindings
//! before it returns, so SQLite never holds a pointer past their life.

use std::os::raw::{c_char, c_int, c_void};
use std::ptr::NonNull;

use rusqlite::{ffi, Connection};

/// A value to bind, borrowed for one [`Statement::execute`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
    /// A UUID's 16 bytes, held in the value itself.
    Uuid([u8; 16]),
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<i32> for Value<'_> {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}

impl From<i16> for Value<'_> {
    fn from(v: i16) -> Self {
        Value::Int(v.into())
    }
}

impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Int(v.into())
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Blob(v)
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A UUID (as its `u128`) bound as its 16 big-endian bytes, as `rows::uuid_bytes` stores it.
pub(crate) fn uuid(v: u128) -> Value<'static> {
    Value::Uuid(crate::rows::uuid_bytes(v))
}

/// One prepared statement of one connection. Finalized when dropped, which must happen before the
/// connection closes: [`Statements`] sits beside its connection, declared before it.
pub(crate) struct Statement {
    raw: NonNull<ffi::sqlite3_stmt>,
    db: NonNull<ffi::sqlite3>,
}

// SAFETY: a statement is used only by the thread holding `&mut` to it, with the connection it was
// prepared on (SQLite is built thread-safe: `SQLITE_THREADSAFE=1`); like rusqlite's own statements
// moving with their connection.
unsafe impl Send for Statement {}

impl Statement {
    fn prepare(conn: &Connection, sql: &str) -> rusqlite::Result<Statement> {
        // SAFETY: the handle stays valid while `conn` lives, and the caller keeps the statement
        // no longer than that (see `Statements`).
        let db = unsafe { conn.handle() };
        let db = NonNull::new(db).ok_or(rusqlite::Error::InvalidQuery)?;
        let len = c_int::try_from(sql.len()).map_err(|_| rusqlite::Error::InvalidQuery)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `sql` is valid for `len` bytes; SQLite writes the statement to `raw`.
        let code = unsafe {
            ffi::sqlite3_prepare_v3(
                db.as_ptr(),
                sql.as_ptr().cast::<c_char>(),
                len,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut raw,
                std::ptr::null_mut(),
            )
        };
        if code != ffi::SQLITE_OK {
            return Err(error(db, code));
        }
        let raw = NonNull::new(raw).ok_or(rusqlite::Error::InvalidQuery)?;
        Ok(Statement { raw, db })
    }

    /// Binds `values` to the parameters `1..=values.len()`, runs the statement to its end (it
    /// returns no rows), and resets it with its bindings cleared. Returns the rows it changed.
    pub(crate) fn execute(&mut self, values: &[Value<'_>]) -> rusqlite::Result<usize> {
        let result = self.bind(values).and_then(|()| self.step());
        // SAFETY: a live statement; afterwards SQLite holds no pointer into `values`.
        unsafe {
            ffi::sqlite3_reset(self.raw.as_ptr());
            ffi::sqlite3_clear_bindings(self.raw.as_ptr());
        }
        result
    }

    fn bind(&mut self, values: &[Value<'_>]) -> rusqlite::Result<()> {
        let stmt = self.raw.as_ptr();
        // SAFETY: a live statement.
        let count = unsafe { ffi::sqlite3_bind_parameter_count(stmt) };
        if usize::try_from(count).ok() != Some(values.len()) {
            return Err(rusqlite::Error::InvalidParameterCount(values.len(), count as usize));
        }
        for (i, value) in values.iter().enumerate() {
            let at = i as c_int + 1;
            // SAFETY: `SQLITE_STATIC` pointers into `values`, which outlive this call; `execute`
            // clears the bindings before it returns.
            let code = unsafe {
                match value {
                    Value::Null => ffi::sqlite3_bind_null(stmt, at),
                    Value::Int(v) => ffi::sqlite3_bind_int64(stmt, at, *v),
                    Value::Text(s) => ffi::sqlite3_bind_text(
                        stmt,
                        at,
                        s.as_ptr().cast::<c_char>(),
                        c_int::try_from(s.len()).map_err(|_| rusqlite::Error::InvalidQuery)?,
                        ffi::SQLITE_STATIC(),
                    ),
                    // An empty slice's pointer is not null, but SQLite is told so plainly.
                    Value::Blob([]) => ffi::sqlite3_bind_zeroblob(stmt, at, 0),
                    Value::Blob(b) => ffi::sqlite3_bind_blob(
                        stmt,
                        at,
                        b.as_ptr().cast::<c_void>(),
                        c_int::try_from(b.len()).map_err(|_| rusqlite::Error::InvalidQuery)?,
                        ffi::SQLITE_STATIC(),
                    ),
                    Value::Uuid(b) => {
                        ffi::sqlite3_bind_blob(stmt, at, b.as_ptr().cast::<c_void>(), 16, ffi::SQLITE_STATIC())
                    }
                }
            };
            if code != ffi::SQLITE_OK {
                return Err(error(self.db, code));
            }
        }
        Ok(())
    }

    fn step(&mut self) -> rusqlite::Result<usize> {
        // SAFETY: a live statement with every parameter bound.
        match unsafe { ffi::sqlite3_step(self.raw.as_ptr()) } {
            // SAFETY: the connection is live.
            ffi::SQLITE_DONE => Ok(unsafe { ffi::sqlite3_changes64(self.db.as_ptr()) } as usize),
            ffi::SQLITE_ROW => Err(rusqlite::Error::ExecuteReturnedResults),
            code => Err(error(self.db, code)),
        }
    }
}

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: finalized once; the connection is still open (see `Statements`).
        unsafe { ffi::sqlite3_finalize(self.raw.as_ptr()) };
    }
}

/// The error SQLite reports for `code` on `db`, as rusqlite would give it.
fn error(db: NonNull<ffi::sqlite3>, code: c_int) -> rusqlite::Error {
    // SAFETY: the connection is live; the message is copied at once.
    let (extended, message) = unsafe {
        let extended = ffi::sqlite3_extended_errcode(db.as_ptr());
        let message = std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr())).to_string_lossy().into_owned();
        (extended, message)
    };
    let extended = if extended & 0xff == code & 0xff { extended } else { code };
    rusqlite::Error::SqliteFailure(ffi::Error::new(extended), Some(message))
}

/// One connection's statements, each found by the address of its `'static` text.
///
/// Must be dropped before the connection they were prepared on: declare it before the
/// connection in a struct, or after it among a function's locals.
#[derive(Default)]
pub(crate) struct Statements {
    prepared: Vec<(usize, Statement)>,
}

impl Statements {
    /// The statement for `sql` on `conn`, prepared on first use. Every call for one `Statements`
    /// must pass the same connection.
    pub(crate) fn get(&mut self, conn: &Connection, sql: &'static str) -> rusqlite::Result<&mut Statement> {
        let key = sql.as_ptr() as usize;
        let at = match self.prepared.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.prepared.push((key, Statement::prepare(conn, sql)?));
                self.prepared.len() - 1
            }
        };
        Ok(&mut self.prepared[at].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (i INTEGER PRIMARY KEY, s TEXT, b BLOB, n INTEGER)").unwrap();
        conn
    }

    #[test]
    fn values_are_stored_as_rusqlite_would_store_them() {
        let conn = table();
        let mut statements = Statements::default();
        static INSERT: &str = "INSERT INTO t (i, s, b, n) VALUES (?, ?, ?, ?)";
        let text = String::from("olá, \0 mundo");
        let blob = vec![1u8, 2, 3];
        let rows: [[Value<'_>; 4]; 4] = [
            [Value::Int(1), Value::Text(&text), Value::Blob(&blob), Value::Null],
            [Value::Int(2), Value::Text(""), Value::Blob(&[]), Value::Int(-7)],
            [Value::Int(3), Value::from(None::<&str>), uuid(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10), true.into()],
            [Value::Int(4), Value::from(Some("x")), Value::from(Some(&blob[..1])), i16::MIN.into()],
        ];
        for row in &rows {
            assert_eq!(statements.get(&conn, INSERT).unwrap().execute(row).unwrap(), 1);
        }
        // The statement was prepared once, and kept.
        assert_eq!(statements.prepared.len(), 1);
        drop(text);
        drop(blob);

        type Row = (i64, Option<String>, Option<Vec<u8>>, Option<i64>);
        let stored: Vec<Row> = conn
            .prepare("SELECT i, s, b, n FROM t ORDER BY i")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let uuid_bytes: Vec<u8> = (1..=16).collect();
        assert_eq!(
            stored,
            vec![
                (1, Some("olá, \0 mundo".into()), Some(vec![1, 2, 3]), None),
                (2, Some(String::new()), Some(vec![]), Some(-7)),
                (3, None, Some(uuid_bytes), Some(1)),
                (4, Some("x".into()), Some(vec![1]), Some(i16::MIN.into())),
            ]
        );
        // An empty blob is a blob, not NULL, as rusqlite binds it.
        let kind: String = conn.query_row("SELECT typeof(b) FROM t WHERE i = 2", [], |r| r.get(0)).unwrap();
        assert_eq!(kind, "blob");
    }

    #[test]
    fn a_broken_constraint_is_an_error_with_sqlites_code_and_the_statement_runs_again() {
        let conn = table();
        let mut statements = Statements::default();
        static INSERT: &str = "INSERT INTO t (i) VALUES (?)";
        statements.get(&conn, INSERT).unwrap().execute(&[Value::Int(1)]).unwrap();
        let error = statements.get(&conn, INSERT).unwrap().execute(&[Value::Int(1)]).unwrap_err();
        match error {
            rusqlite::Error::SqliteFailure(e, Some(message)) => {
                assert_eq!(e.code, rusqlite::ErrorCode::ConstraintViolation);
                assert_eq!(e.extended_code, ffi::SQLITE_CONSTRAINT_PRIMARYKEY);
                assert!(message.contains("UNIQUE constraint failed: t.i"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Reset after the failure: the same statement goes on.
        assert_eq!(statements.get(&conn, INSERT).unwrap().execute(&[Value::Int(2)]).unwrap(), 1);
        let count: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(count, 2);
    }

    #[test]
    fn a_wrong_number_of_values_is_refused_before_anything_runs() {
        let conn = table();
        let mut statements = Statements::default();
        static INSERT: &str = "INSERT INTO t (i, s) VALUES (?, ?)";
        let error = statements.get(&conn, INSERT).unwrap().execute(&[Value::Int(1)]).unwrap_err();
        assert!(matches!(error, rusqlite::Error::InvalidParameterCount(1, 2)), "{error:?}");
        let count: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(count, 0);
    }

    #[test]
    fn updates_count_the_rows_they_changed() {
        let conn = table();
        conn.execute_batch("INSERT INTO t (i, n) VALUES (1, 0), (2, 0), (3, 5)").unwrap();
        let mut statements = Statements::default();
        static UPDATE: &str = "UPDATE t SET n = ?1 WHERE n = ?2";
        assert_eq!(statements.get(&conn, UPDATE).unwrap().execute(&[Value::Int(9), Value::Int(0)]).unwrap(), 2);
        assert_eq!(statements.get(&conn, UPDATE).unwrap().execute(&[Value::Int(9), Value::Int(4)]).unwrap(), 0);
    }
}
