//! A PostgreSQL connection that the metadata store uses synchronously, as it uses SQLite.
//!
//! A thread owns the `tokio-postgres` client and drives its connection on a current-thread
//! runtime; callers hand it statements and wait for the answer. Waiting on a channel, unlike
//! entering a second runtime, is allowed from any thread, the coordinator's async tasks
//! included (they already wait for SQLite's fsync the same way).
//!
//! What the store relies on, kept here:
//! - **Durable when acknowledged:** every session sets `synchronous_commit = on`, so a
//!   `COMMIT` that returned is flushed to the server's disk, whatever the server's default.
//! - **No half batches:** PostgreSQL answers `COMMIT` to a transaction that an earlier error
//!   aborted by rolling it back *without* an error. This session remembers the error and fails
//!   the `COMMIT` instead. A connection lost inside a transaction fails every statement until
//!   the store rolls back; it is never silently reopened mid-transaction.
//! - **Any text a stranger sends is storable:** a NUL, which PostgreSQL's text refuses, is
//!   stored as U+FFFD.
//! - **Authenticated server over TLS** when the URL asks for it ([`super::postgres_tls`]).
//! - **Bounded waits:** a statement that gets no answer in [`STATEMENT_TIMEOUT`] fails and the
//!   connection is dropped, so a stalled server cannot hang the coordinator.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, Config, NoTls, Statement};

use super::db::DbError;
use super::sql::{Row, Value};

/// How long one statement may take before the connection is given up.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection string with its password, if any, replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

enum Work {
    Execute(String, Vec<Value>),
    Query(String, Vec<Value>),
    Batch(String),
}

enum Answer {
    Changed(u64),
    Rows(Vec<Row>),
    Done,
}

struct Request {
    work: Work,
    reply: std_mpsc::SyncSender<Result<Answer, DbError>>,
}

/// A synchronous handle on a PostgreSQL session.
#[derive(Debug)]
pub(crate) struct PgConnection {
    requests: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Request")
    }
}

impl PgConnection {
    /// Connects to `url` (a `postgres://` connection string; the password may also come from
    /// `PGPASSWORD`). A read-only session refuses every write.
    pub(crate) fn connect(url: &str, read_only: bool) -> Result<Self, DbError> {
        let split = super::postgres_tls::split_url(url)?;
        let tls = match split.tls {
            true => Some(super::postgres_tls::connector(split.root_cert.as_deref())?),
            false => None,
        };
        let mut config: Config = split
            .url
            .parse()
            .map_err(|error| DbError::Config(format!("{}: {error}", redacted(url))))?;
        if config.get_password().is_none() {
            if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("tributary-coordinator");
        config.keepalives_idle(Duration::from_secs(10));
        let (requests, receiver) = mpsc::unbounded_channel();
        let (ready, connected) = std_mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("postgres".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(DbError::Config(format!("runtime: {error}"))));
                        return;
                    }
                };
                runtime.block_on(serve(config, tls, read_only, receiver, ready));
            })
            .map_err(|error| DbError::Config(format!("cannot start a thread: {error}")))?;
        connected.recv().map_err(|_| DbError::Lost)??;
        Ok(Self { requests })
    }

    fn call(&self, work: Work) -> Result<Answer, DbError> {
        let (reply, answer) = std_mpsc::sync_channel(1);
        self.requests
            .send(Request { work, reply })
            .map_err(|_| DbError::Lost)?;
        answer.recv().map_err(|_| DbError::Lost)?
    }

    pub(crate) fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self.call(Work::Execute(sql.to_owned(), params.to_vec()))? {
            Answer::Changed(rows) => Ok(rows),
            _ => Ok(0),
        }
    }

    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self.call(Work::Query(sql.to_owned(), params.to_vec()))? {
            Answer::Rows(rows) => Ok(rows),
            _ => Ok(Vec::new()),
        }
    }

    pub(crate) fn batch(&self, sql: &str) -> Result<(), DbError> {
        self.call(Work::Batch(sql.to_owned())).map(|_| ())
    }
}

/// The connection thread's loop.
async fn serve(
    config: Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    read_only: bool,
    mut requests: mpsc::UnboundedReceiver<Request>,
    ready: std_mpsc::SyncSender<Result<(), DbError>>,
) {
    let mut session = Session {
        config,
        tls,
        read_only,
        client: None,
        statements: HashMap::new(),
        in_transaction: false,
        aborted: None,
    };
    if let Err(error) = session.connect().await {
        let _ = ready.send(Err(error));
        return;
    }
    let _ = ready.send(Ok(()));
    while let Some(request) = requests.recv().await {
        let answer = session.run(request.work).await;
        let _ = request.reply.send(answer);
    }
}

/// Drives a connection until it closes.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::warn!(%error, "the PostgreSQL connection closed");
    }
}

struct Session {
    config: Config,
    /// TLS with the server's certificate verified, when the URL asks for it.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    read_only: bool,
    client: Option<Client>,
    statements: HashMap<String, Statement>,
    in_transaction: bool,
    /// Why the open transaction can no longer commit.
    aborted: Option<String>,
}

impl Session {
    async fn connect(&mut self) -> Result<(), DbError> {
        let client = match &self.tls {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                tokio::spawn(drive(connection));
                client
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                tokio::spawn(drive(connection));
                client
            }
        };
        // Notices ("relation already exists, skipping") are not worth a log line each start.
        let settings = if self.read_only {
            "SET default_transaction_read_only = on; SET client_min_messages = warning"
        } else {
            "SET synchronous_commit = on; SET client_min_messages = warning"
        };
        client.batch_execute(settings).await?;
        self.client = Some(client);
        self.statements.clear();
        Ok(())
    }

    async fn run(&mut self, work: Work) -> Result<Answer, DbError> {
        let keyword = match &work {
            Work::Batch(sql) => sql.trim_start().to_ascii_uppercase(),
            _ => String::new(),
        };
        let ends_transaction = (keyword.starts_with("ROLLBACK") && !keyword.contains(" TO "))
            || keyword.starts_with("COMMIT");
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            if keyword.starts_with("ROLLBACK") && ends_transaction {
                // Whatever was open went with the connection: nothing to roll back.
                self.in_transaction = false;
                self.aborted = None;
                return Ok(Answer::Done);
            }
            if self.in_transaction {
                // The server rolled the transaction back with the connection.
                return Err(DbError::Lost);
            }
            self.connect().await?;
        }
        if let Some(reason) = &self.aborted {
            if keyword.starts_with("COMMIT") {
                let reason = reason.clone();
                let _ = self.exchange(Work::Batch("ROLLBACK".into())).await;
                self.in_transaction = false;
                self.aborted = None;
                return Err(DbError::Aborted(reason));
            }
        }
        let result = match tokio::time::timeout(STATEMENT_TIMEOUT, self.exchange(work)).await {
            Ok(result) => result,
            Err(_) => {
                self.client = None;
                Err(DbError::Timeout(STATEMENT_TIMEOUT))
            }
        };
        match &result {
            Ok(_) if keyword.starts_with("BEGIN") => self.in_transaction = true,
            Ok(_) if keyword.starts_with("ROLLBACK TO") => self.aborted = None,
            _ => {}
        }
        if ends_transaction {
            self.in_transaction = false;
            self.aborted = None;
        } else if let Err(error) = &result {
            if self.in_transaction && self.aborted.is_none() {
                self.aborted = Some(error.to_string());
            }
        }
        result
    }

    async fn exchange(&mut self, work: Work) -> Result<Answer, DbError> {
        let client = self.client.as_ref().ok_or(DbError::Lost)?;
        match work {
            Work::Batch(sql) => {
                client.batch_execute(&sql).await?;
                Ok(Answer::Done)
            }
            Work::Execute(sql, params) => {
                let statement = prepared(client, &mut self.statements, &sql).await?;
                let params: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                Ok(Answer::Changed(client.execute(&statement, &params).await?))
            }
            Work::Query(sql, params) => {
                let statement = prepared(client, &mut self.statements, &sql).await?;
                let params: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                let rows = client.query(&statement, &params).await?;
                rows.iter()
                    .map(from_postgres)
                    .collect::<Result<_, _>>()
                    .map(Answer::Rows)
            }
        }
    }
}

/// The prepared statement for `sql`, prepared once per connection.
async fn prepared(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    sql: &str,
) -> Result<Statement, DbError> {
    if let Some(statement) = statements.get(sql) {
        return Ok(statement.clone());
    }
    let statement = client.prepare(sql).await?;
    statements.insert(sql.to_owned(), statement.clone());
    Ok(statement)
}

fn from_postgres(row: &tokio_postgres::Row) -> Result<Row, DbError> {
    let mut values = Vec::with_capacity(row.len());
    for (index, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(index)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(index)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(index)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(index)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::FLOAT8 {
            row.try_get::<_, Option<f64>>(index)?.map(Value::Real)
        } else if *ty == Type::FLOAT4 {
            row.try_get::<_, Option<f32>>(index)?
                .map(|v| Value::Real(v.into()))
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(index)?.map(Value::Bytes)
        } else if [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(ty) {
            row.try_get::<_, Option<String>>(index)?.map(Value::Text)
        } else {
            return Err(DbError::Corrupt(format!(
                "column {} has type {ty}, which the store does not read",
                column.name()
            )));
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(value) if *ty == Type::INT4 => i32::try_from(*value)?.to_sql(ty, out),
            Value::Int(value) if *ty == Type::INT2 => i16::try_from(*value)?.to_sql(ty, out),
            Value::Int(value) if *ty == Type::BOOL => (*value != 0).to_sql(ty, out),
            Value::Int(value) if *ty == Type::FLOAT8 => (*value as f64).to_sql(ty, out),
            Value::Int(value) => value.to_sql(ty, out),
            Value::Real(value) => value.to_sql(ty, out),
            // PostgreSQL text cannot hold NUL, which SQLite's can, and text such as a trainer's
            // agent string comes from strangers: one NUL must not fail the hub's batch.
            Value::Text(value) if value.contains('\0') => {
                value.replace('\0', "\u{fffd}").to_sql(ty, out)
            }
            Value::Text(value) => value.to_sql(ty, out),
            Value::Bytes(value) => value.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("postgres://alice:s3cret@db.example:5432/tributary"),
            "postgres://alice:***@db.example:5432/tributary"
        );
        assert_eq!(
            redacted("postgres://alice@db.example/tributary"),
            "postgres://alice@db.example/tributary"
        );
    }
}
