//! One SQL interface over the two metadata engines: SQLite (embedded, the default) and
//! PostgreSQL (past one machine).
//!
//! Statements are written once, in the SQL both engines accept, with `$1`, `$2`, … parameters
//! (turned into SQLite's `?1`, `?2`, … here). Values cross as [`Value`]: integers, floats, text
//! and bytes, which both engines store the same way, so what one stores the other reads back
//! identically (byte strings also sort the same: by their bytes).

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};

use super::db::DbError;
use super::postgres::PgConnection;

/// A parameter or column value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Bytes(Vec<u8>),
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Self::Real(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Self::Text(value.to_owned())
    }
}

impl From<&String> for Value {
    fn from(value: &String) -> Self {
        Self::Text(value.clone())
    }
}

impl From<&[u8]> for Value {
    fn from(value: &[u8]) -> Self {
        Self::Bytes(value.to_vec())
    }
}

impl From<&[u8; 32]> for Value {
    fn from(value: &[u8; 32]) -> Self {
        Self::Bytes(value.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map_or(Self::Null, Into::into)
    }
}

/// Builds a parameter list: `values![a, b]` is `&[Value::from(a), Value::from(b)]`.
macro_rules! values {
    ($($value:expr),* $(,)?) => {
        &[$($crate::store::sql::Value::from($value)),*][..]
    };
}
pub(crate) use values;

/// One result row.
#[derive(Debug)]
pub(crate) struct Row(pub(crate) Vec<Value>);

impl Row {
    fn column(&self, index: usize) -> Result<&Value, DbError> {
        self.0
            .get(index)
            .ok_or_else(|| DbError::Corrupt(format!("a row has no column {index}")))
    }

    fn mismatch(&self, index: usize, wanted: &str) -> DbError {
        DbError::Corrupt(format!(
            "column {index} holds {:?}, not {wanted}",
            self.0.get(index)
        ))
    }

    /// An integer column (a boolean reads as 0 or 1).
    pub(crate) fn int(&self, index: usize) -> Result<i64, DbError> {
        self.opt_int(index)?
            .ok_or_else(|| self.mismatch(index, "an integer"))
    }

    /// A nullable integer column.
    pub(crate) fn opt_int(&self, index: usize) -> Result<Option<i64>, DbError> {
        match self.column(index)? {
            Value::Null => Ok(None),
            Value::Int(value) => Ok(Some(*value)),
            _ => Err(self.mismatch(index, "an integer")),
        }
    }

    /// A float column.
    pub(crate) fn real(&self, index: usize) -> Result<f64, DbError> {
        self.opt_real(index)?
            .ok_or_else(|| self.mismatch(index, "a number"))
    }

    /// A nullable float column (SQLite may hand back a whole number as an integer).
    pub(crate) fn opt_real(&self, index: usize) -> Result<Option<f64>, DbError> {
        match self.column(index)? {
            Value::Null => Ok(None),
            Value::Real(value) => Ok(Some(*value)),
            Value::Int(value) => Ok(Some(*value as f64)),
            _ => Err(self.mismatch(index, "a number")),
        }
    }

    /// A text column.
    pub(crate) fn text(&self, index: usize) -> Result<String, DbError> {
        match self.column(index)? {
            Value::Text(value) => Ok(value.clone()),
            _ => Err(self.mismatch(index, "text")),
        }
    }

    /// A nullable text column.
    pub(crate) fn opt_text(&self, index: usize) -> Result<Option<String>, DbError> {
        match self.column(index)? {
            Value::Null => Ok(None),
            Value::Text(value) => Ok(Some(value.clone())),
            _ => Err(self.mismatch(index, "text")),
        }
    }

    /// A bytes column.
    pub(crate) fn bytes(&self, index: usize) -> Result<Vec<u8>, DbError> {
        self.opt_bytes(index)?
            .ok_or_else(|| self.mismatch(index, "bytes"))
    }

    /// A nullable bytes column.
    pub(crate) fn opt_bytes(&self, index: usize) -> Result<Option<Vec<u8>>, DbError> {
        match self.column(index)? {
            Value::Null => Ok(None),
            Value::Bytes(value) => Ok(Some(value.clone())),
            _ => Err(self.mismatch(index, "bytes")),
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(value) => ToSqlOutput::Borrowed(ValueRef::Integer(*value)),
            Value::Real(value) => ToSqlOutput::Borrowed(ValueRef::Real(*value)),
            Value::Text(value) => ToSqlOutput::Borrowed(ValueRef::Text(value.as_bytes())),
            Value::Bytes(value) => ToSqlOutput::Borrowed(ValueRef::Blob(value)),
        })
    }
}

fn from_sqlite(value: ValueRef<'_>) -> Result<Value, DbError> {
    Ok(match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(value) => Value::Int(value),
        ValueRef::Real(value) => Value::Real(value),
        ValueRef::Text(value) => Value::Text(
            std::str::from_utf8(value)
                .map_err(|error| DbError::Corrupt(format!("stored text: {error}")))?
                .to_owned(),
        ),
        ValueRef::Blob(value) => Value::Bytes(value.to_vec()),
    })
}

/// `$1` → `?1`: SQLite's numbered parameters. (No statement here has a `$` anywhere else.)
fn sqlite_parameters(sql: &str) -> String {
    sql.replace('$', "?")
}

/// Which engine, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection string (`postgres://user@host:port/database`).
    Postgres(String),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => write!(f, "{}", super::postgres::redacted(url)),
        }
    }
}

/// A connection to either engine.
#[derive(Debug)]
pub(crate) enum Connection {
    Sqlite(rusqlite::Connection),
    Postgres(PgConnection),
}

impl Connection {
    /// Opens a SQLite file, read-only or not.
    pub(crate) fn sqlite(path: &Path, read_only: bool) -> Result<Self, DbError> {
        let conn = if read_only {
            rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?
        } else {
            let conn = rusqlite::Connection::open(path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn
        };
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self::Sqlite(conn))
    }

    /// Which engine this is.
    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// Runs one statement; returns the rows it changed.
    pub(crate) fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self {
            Self::Sqlite(conn) => {
                let mut statement = conn.prepare_cached(&sqlite_parameters(sql))?;
                Ok(statement.execute(rusqlite::params_from_iter(params))? as u64)
            }
            Self::Postgres(conn) => conn.execute(sql, params),
        }
    }

    /// Runs one query; returns every row.
    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            Self::Sqlite(conn) => {
                let mut statement = conn.prepare_cached(&sqlite_parameters(sql))?;
                let columns = statement.column_count();
                let mut rows = statement.query(rusqlite::params_from_iter(params))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let values = (0..columns)
                        .map(|index| from_sqlite(row.get_ref(index)?))
                        .collect::<Result<Vec<_>, DbError>>()?;
                    out.push(Row(values));
                }
                Ok(out)
            }
            Self::Postgres(conn) => conn.query(sql, params),
        }
    }

    /// The first row of a query, if any.
    pub(crate) fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row of a query, which must exist.
    pub(crate) fn query_one(&self, sql: &str, params: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| DbError::Corrupt(format!("no row from {sql:?}")))
    }

    /// Runs statements without parameters (schema, transaction control).
    pub(crate) fn batch(&self, sql: &str) -> Result<(), DbError> {
        match self {
            Self::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Self::Postgres(conn) => conn.batch(sql),
        }
    }
}
