//! The metadata store: experiments, rounds, tasks, trainers, submissions and the ledger.
//!
//! SQLite by default: one file in WAL mode with `synchronous = FULL`. Past one machine,
//! PostgreSQL with `synchronous_commit = on`. Either way a transaction that returned is on
//! disk, so whatever the coordinator acknowledged survives a crash. The same statements run on
//! both ([`super::sql`]); only this module speaks SQL.

use std::path::Path;

use super::postgres::PgConnection;
pub use super::sql::Location;
use super::sql::{values, Connection, Row};
use tributary_shared::frame::from_payload;
use tributary_shared::ledger::{AcceptedDelta, LedgerEntry, RejectedSubmission};
use tributary_shared::selection::RoundSecret;
use tributary_shared::wire::{RejectReason, UploadHeader};
use tributary_shared::{BlobHash, ExperimentId, ExperimentUid, RoundId, TaskId, TrainerId};

use crate::engine::ResumeState;

/// A metadata store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL reported an error, or the connection failed.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The connection to PostgreSQL dropped; an open transaction went with it.
    #[error("postgres: the connection was lost (an open transaction was rolled back)")]
    Lost,
    /// A transaction failed earlier, so its commit was refused (and it was rolled back).
    #[error(
        "postgres: the transaction was aborted by an earlier error ({0}); nothing of it was kept"
    )]
    Aborted(String),
    /// A statement got no answer in time; the connection was dropped.
    #[error("postgres: no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The database location or its settings are unusable.
    #[error("database: {0}")]
    Config(String),
    /// A stored value does not parse.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// This node no longer holds the leader lease it wrote under (another node took over);
    /// the batch was rolled back.
    #[error("the leader lease (token {token}) is held by another node now; nothing of the batch was kept")]
    Fenced {
        /// The token this node held.
        token: i64,
    },
}

impl From<tokio_postgres::Error> for DbError {
    /// Keeps the server's own message (the error's `Display` alone says only "db error").
    fn from(error: tokio_postgres::Error) -> Self {
        let text = match error.as_db_error() {
            Some(db) => format!("{} [{}]", db.message(), db.code().code()),
            None => {
                let mut text = error.to_string();
                let mut source = std::error::Error::source(&error);
                while let Some(cause) = source {
                    text.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                text
            }
        };
        Self::Postgres(text)
    }
}

/// An experiment as stored.
#[derive(Debug, Clone)]
pub struct StoredExperiment {
    /// Its id.
    pub id: ExperimentId,
    /// The validated configuration, as JSON.
    pub config_json: String,
    /// The round-0 adapter.
    pub initial_adapter: BlobHash,
    /// The commitment to round 0's secret, published when the experiment was created.
    pub first_commitment: BlobHash,
    /// Its random id.
    pub uid: ExperimentUid,
    /// The coordinator's ledger key, which signs its entries.
    pub signer: TrainerId,
    /// True once every round is committed.
    pub finished: bool,
}

/// What a new experiment is created with.
#[derive(Debug, Clone, Copy)]
pub struct NewExperiment<'a> {
    /// Its name.
    pub id: &'a ExperimentId,
    /// Its validated configuration as JSON (its hash is what ledger entries commit to).
    pub config_json: &'a str,
    /// The round-0 adapter.
    pub initial_adapter: BlobHash,
    /// Its encoded length.
    pub adapter_len: u64,
    /// Round 0's secret (its commitment is published with the experiment).
    pub first_secret: &'a RoundSecret,
    /// Its random id.
    pub uid: ExperimentUid,
    /// The coordinator's ledger key.
    pub signer: TrainerId,
    /// When, ms since the Unix epoch.
    pub now_ms: i64,
}

/// Counts for `status` and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExperimentStatus {
    /// Rounds committed.
    pub rounds_closed: u64,
    /// Accepted submissions, all rounds.
    pub accepted: u64,
    /// Rejected submissions by reason, all rounds.
    pub rejected: Vec<(String, u64)>,
    /// Distinct trainers ever seen.
    pub trainers: u64,
    /// Head of the ledger.
    pub ledger_head: Option<String>,
    /// Latest adapter.
    pub adapter: Option<String>,
    /// True when all rounds ran.
    pub finished: bool,
    /// Held-out scores of the adapters, oldest first.
    pub evaluations: Vec<StoredEvaluation>,
    /// Each committed round's figures, from its ledger entry.
    pub rounds: Vec<RoundSummary>,
    /// Training tasks issued, all rounds (replicas included).
    pub tasks: u64,
    /// Of them, replicas of another task (spot re-execution).
    pub replica_tasks: u64,
    /// The training spent on checking: replica tasks over the other tasks.
    pub verification_share: f64,
}

/// One committed round, as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoundSummary {
    /// The round.
    pub round: u64,
    /// Weighted mean of the training losses the trainers reported (self-reported).
    pub reported_train_loss: Option<f64>,
    /// Held-out loss of the adapter it produced, when evaluated: the median of its evaluators.
    pub eval_loss: Option<f64>,
    /// Evaluators that answered for it.
    pub eval_evaluators: Option<u32>,
    /// Of them, how many agreed with the median.
    pub eval_agreeing: Option<u32>,
    /// Highest minus lowest answer.
    pub eval_spread: Option<f64>,
    /// Compressed bytes of the accepted deltas.
    pub bytes_up: u64,
    /// Their size as raw f32.
    pub raw_bytes: u64,
    /// Deltas aggregated.
    pub accepted: usize,
    /// Submissions refused (recorded ones).
    pub rejected: usize,
    /// Training tasks issued in the round (replicas included).
    pub tasks: u64,
    /// Of them, replicas of another task.
    pub replica_tasks: u64,
    /// Replicated tasks whose two deltas were compared.
    pub checks: usize,
    /// Of those, the pairs that disagreed (the counted delta was withheld).
    pub disagreements: usize,
    /// The largest relative L2 distance among the agreeing pairs: how close honest pairs
    /// come to the tolerance (for calibrating it).
    pub agreeing_distance_max: Option<f64>,
    /// Loss checks recorded in the round's entry (of its own deltas or earlier ones).
    pub loss_checks: usize,
    /// Of those, deltas that did not lower their loss (their trainers were flagged).
    pub loss_checks_failed: usize,
    /// The smallest median improvement among the checks that passed, nats per token.
    pub loss_improvement_min: Option<f64>,
    /// The adapter it produced, hex.
    pub adapter: String,
    /// Its ledger entry's hash, hex.
    pub ledger_hash: String,
}

/// Who may read a blob from the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Anyone (merged adapters; deltas of experiments that publish them).
    Public,
    /// Auditors only.
    Private,
}

/// An adapter's held-out score, as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredEvaluation {
    /// The round that produced the adapter; `None` for the initial adapter.
    pub after_round: Option<u64>,
    /// The adapter, hex.
    pub adapter: String,
    /// The evaluator whose answer is nearest the median, hex.
    pub trainer: String,
    /// Mean loss per token, in nats: the median of the evaluators' answers.
    pub loss: f64,
    /// Tokens scored (the median count).
    pub tokens: u64,
    /// When it was recorded, ms since the Unix epoch.
    pub at_ms: i64,
    /// Evaluators that answered.
    pub evaluators: u32,
    /// Answers within 1 % of the median (and over the same tokens).
    pub agreeing: u32,
    /// Evaluators wanted.
    pub wanted: u32,
    /// Highest minus lowest answer.
    pub spread: f64,
}

/// From the ledger: unsettled disputes, and flags per trainer.
type Verdicts = (Vec<crate::engine::Dispute>, Vec<(TrainerId, u32)>);

/// The schema's version, kept in SQLite's `user_version`. A database of another version is
/// refused rather than half-used.
const SCHEMA_VERSION: i64 = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    initial_adapter BLOB NOT NULL,
    first_commitment BLOB NOT NULL,
    uid BLOB NOT NULL,
    signer BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    adapter_before BLOB NOT NULL,
    adapter_len INTEGER NOT NULL,
    secret BLOB NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (experiment, round)
);
CREATE TABLE IF NOT EXISTS tasks (
    task INTEGER PRIMARY KEY,
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    trainer BLOB NOT NULL,
    issued_ms INTEGER NOT NULL,
    repeats INTEGER,
    referee_of INTEGER
);
CREATE TABLE IF NOT EXISTS referees (
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    task INTEGER NOT NULL,
    hash BLOB NOT NULL,
    dispute_round INTEGER NOT NULL,
    counted BLOB NOT NULL,
    trainer BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    signed_header BLOB NOT NULL,
    PRIMARY KEY (experiment, task)
);
CREATE TABLE IF NOT EXISTS replicas (
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    task INTEGER NOT NULL,
    hash BLOB NOT NULL,
    counted BLOB NOT NULL,
    trainer BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    signed_header BLOB NOT NULL,
    PRIMARY KEY (experiment, task)
);
CREATE TABLE IF NOT EXISTS submissions (
    hash BLOB NOT NULL,
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    task INTEGER NOT NULL,
    trainer BLOB NOT NULL,
    weight INTEGER NOT NULL,
    train_loss REAL NOT NULL,
    byte_len INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    signed_header BLOB NOT NULL,
    PRIMARY KEY (experiment, hash)
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    trainer BLOB,
    hash BLOB,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    hash BLOB NOT NULL,
    entry BLOB NOT NULL,
    PRIMARY KEY (experiment, round)
);
CREATE TABLE IF NOT EXISTS adapters (
    hash BLOB PRIMARY KEY,
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    byte_len INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inline_blobs (
    hash BLOB PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    experiment TEXT NOT NULL,
    adapter BLOB NOT NULL,
    after_round INTEGER,
    trainer BLOB NOT NULL,
    loss REAL NOT NULL,
    tokens INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    evaluators INTEGER NOT NULL DEFAULT 1,
    agreeing INTEGER NOT NULL DEFAULT 1,
    wanted INTEGER NOT NULL DEFAULT 1,
    spread REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (experiment, adapter)
);
CREATE TABLE IF NOT EXISTS eval_answers (
    experiment TEXT NOT NULL,
    adapter BLOB NOT NULL,
    trainer BLOB NOT NULL,
    loss REAL,
    tokens INTEGER,
    failure TEXT,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (experiment, adapter, trainer)
);
CREATE TABLE IF NOT EXISTS eval_tasks (
    task INTEGER PRIMARY KEY,
    experiment TEXT NOT NULL,
    adapter BLOB NOT NULL,
    trainer BLOB NOT NULL,
    issued_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS token_bindings (
    token BLOB NOT NULL,
    trainer BLOB NOT NULL,
    PRIMARY KEY (token, trainer)
);
CREATE TABLE IF NOT EXISTS trainers (
    id BLOB PRIMARY KEY,
    agent TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
";

/// The metadata database: a SQLite file (the embedded default) or a PostgreSQL database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    in_batch: bool,
    /// The lease every committed transaction must still hold (a cluster's leader).
    fence: Option<crate::store::leases::Fence>,
}

/// The name of the file in a data directory that points its metadata at PostgreSQL.
pub const DATABASE_FILE: &str = "database.url";

/// Where a data directory's metadata lives: the URL in its [`DATABASE_FILE`], else its
/// `tributary.db`.
pub fn location_of(data_dir: &Path) -> Result<Location, DbError> {
    let pointer = data_dir.join(DATABASE_FILE);
    match std::fs::read_to_string(&pointer) {
        Ok(url) => Ok(Location::Postgres(url.trim().to_owned())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Ok(Location::Sqlite(data_dir.join("tributary.db")))
        }
        Err(error) => Err(DbError::Config(format!(
            "cannot read {}: {error}",
            pointer.display()
        ))),
    }
}

/// Points a data directory at `location` for good (so `verify`, `status`, `publish` and the
/// hub find it), or checks that it already points there. A directory that holds a SQLite
/// database, or points at another PostgreSQL database, is refused: its state lives elsewhere.
pub fn bind_data_dir(data_dir: &Path, location: &Location) -> Result<(), DbError> {
    let current = location_of(data_dir)?;
    match (location, &current) {
        (Location::Sqlite(_), Location::Sqlite(_)) => Ok(()),
        (Location::Postgres(url), Location::Postgres(bound)) if url == bound => Ok(()),
        (Location::Postgres(url), Location::Sqlite(path)) if !path.exists() => {
            crate::durable::write_atomically(
                &data_dir.join(DATABASE_FILE),
                format!("{url}\n").as_bytes(),
                true,
            )
            .map_err(|error| DbError::Config(format!("cannot write {DATABASE_FILE}: {error}")))
        }
        _ => Err(DbError::Config(format!(
            "the data directory {} keeps its metadata in {current}, not {location}; use \
             another data directory",
            data_dir.display()
        ))),
    }
}

impl Db {
    /// Opens (creating) the database file.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Self::open_at(&Location::Sqlite(path.to_owned()))
    }

    /// Opens (creating the schema in) the database at `location`.
    pub fn open_at(location: &Location) -> Result<Self, DbError> {
        let conn = match location {
            Location::Sqlite(path) => {
                let conn = Connection::sqlite(path, false)?;
                migrate_sqlite(&conn)?;
                conn
            }
            Location::Postgres(url) => {
                let conn = Connection::Postgres(PgConnection::connect(url, false)?);
                create_postgres_schema(&conn)?;
                conn
            }
        };
        Ok(Self {
            conn,
            in_batch: false,
            fence: None,
        })
    }

    /// Opens a data directory's database (see [`location_of`]).
    pub fn open_in(data_dir: &Path) -> Result<Self, DbError> {
        Self::open_at(&location_of(data_dir)?)
    }

    /// Opens an existing database read-only (for `verify` and `status` beside a running server).
    pub fn open_read_only(path: &Path) -> Result<Self, DbError> {
        Self::open_read_only_at(&Location::Sqlite(path.to_owned()))
    }

    /// Opens the database at `location` read-only.
    pub fn open_read_only_at(location: &Location) -> Result<Self, DbError> {
        let conn = match location {
            Location::Sqlite(path) => Connection::sqlite(path, true)?,
            Location::Postgres(url) => Connection::Postgres(PgConnection::connect(url, true)?),
        };
        Ok(Self {
            conn,
            in_batch: false,
            fence: None,
        })
    }

    /// Opens a data directory's database read-only (see [`location_of`]).
    pub fn open_read_only_in(data_dir: &Path) -> Result<Self, DbError> {
        Self::open_read_only_at(&location_of(data_dir)?)
    }

    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// From now on, every transaction this handle commits first checks that `fence`'s lease
    /// is still held with its token, and is rolled back with [`DbError::Fenced`] when not.
    pub fn set_fence(&mut self, fence: Option<crate::store::leases::Fence>) {
        self.fence = fence;
    }

    /// Commits the open transaction after the fence check, or rolls it back.
    fn fenced_commit(&self) -> Result<(), DbError> {
        if let Some(fence) = &self.fence {
            if let Err(error) = fence.check(&self.conn) {
                if let Err(undo) = self.conn.batch("ROLLBACK") {
                    tracing::warn!(error = %undo, "cannot roll back a fenced transaction");
                }
                return Err(error);
            }
        }
        self.conn.batch("COMMIT")
    }

    fn begin_statement(&self) -> &'static str {
        if self.conn.is_postgres() {
            "BEGIN"
        } else {
            // Take the write lock now, not at the first write.
            "BEGIN IMMEDIATE"
        }
    }

    /// Opens a write batch (a transaction) unless one is open; writes until
    /// [`Db::commit_batch`] become durable together.
    pub fn begin_batch(&mut self) -> Result<(), DbError> {
        if !self.in_batch {
            self.conn.batch(self.begin_statement())?;
            self.in_batch = true;
        }
        Ok(())
    }

    /// Commits the open batch, if any. When the commit fails the batch stays open (or the
    /// engine has already rolled it back); [`Db::rollback_batch`] ends it either way.
    pub fn commit_batch(&mut self) -> Result<(), DbError> {
        if self.in_batch {
            let committed = self.fenced_commit();
            if matches!(committed, Err(DbError::Fenced { .. })) {
                self.in_batch = false;
            }
            committed?;
            self.in_batch = false;
        }
        Ok(())
    }

    /// Discards every write since [`Db::begin_batch`], whether or not the engine already rolled
    /// the transaction back after an error.
    pub fn rollback_batch(&mut self) -> Result<(), DbError> {
        let was_open = std::mem::replace(&mut self.in_batch, false);
        match &self.conn {
            Connection::Sqlite(conn) if conn.is_autocommit() => Ok(()),
            // A PostgreSQL batch is a transaction only between `begin_batch` and its end.
            Connection::Postgres(_) if !was_open => Ok(()),
            conn => conn.batch("ROLLBACK"),
        }
    }

    /// Runs `writes` all or nothing: in a transaction of its own, or under a savepoint of the
    /// open batch.
    pub(crate) fn atomically<T>(
        &mut self,
        writes: impl FnOnce(&Connection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let nested = self.in_batch;
        let (begin, commit, undo) = if nested {
            (
                "SAVEPOINT atomic",
                "RELEASE SAVEPOINT atomic",
                "ROLLBACK TO SAVEPOINT atomic; RELEASE SAVEPOINT atomic",
            )
        } else {
            (self.begin_statement(), "COMMIT", "ROLLBACK")
        };
        self.conn.batch(begin)?;
        match writes(&self.conn) {
            Ok(value) => {
                if nested {
                    self.conn.batch(commit)?;
                } else {
                    self.fenced_commit()?;
                }
                Ok(value)
            }
            Err(error) => {
                if let Err(undo_error) = self.conn.batch(undo) {
                    tracing::warn!(error = %undo_error, "cannot undo a failed write");
                }
                Err(error)
            }
        }
    }

    /// Creates an experiment with its round 0 open on its initial adapter.
    pub fn create_experiment(&mut self, new: &NewExperiment<'_>) -> Result<(), DbError> {
        let NewExperiment {
            id,
            config_json,
            initial_adapter,
            adapter_len,
            first_secret,
            uid,
            signer,
            now_ms,
        } = *new;
        self.atomically(|conn| {
            conn.execute(
                "INSERT INTO experiments (id, config_json, initial_adapter, first_commitment, uid, signer, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                values![
                    &id.0,
                    config_json,
                    &initial_adapter.0,
                    &first_secret.commitment().0,
                    &uid.0,
                    &signer.0,
                    now_ms
                ],
            )?;
            conn.execute(
                "INSERT INTO rounds (experiment, round, adapter_before, adapter_len, secret) VALUES ($1, 0, $2, $3, $4)",
                values![&id.0, &initial_adapter.0, adapter_len as i64, &first_secret.0],
            )?;
            conn.execute(
                "INSERT INTO adapters (hash, experiment, round, byte_len) VALUES ($1, $2, -1, $3)
                 ON CONFLICT DO NOTHING",
                values![&initial_adapter.0, &id.0, adapter_len as i64],
            )?;
            Ok(())
        })
    }

    /// Looks an experiment up.
    pub fn experiment(&self, id: &ExperimentId) -> Result<Option<StoredExperiment>, DbError> {
        self.conn
            .query_opt(
                "SELECT id, config_json, initial_adapter, finished, first_commitment, uid, signer FROM experiments WHERE id = $1",
                values![&id.0],
            )?
            .map(|row| row_to_experiment(&row))
            .transpose()
    }

    /// Every experiment, oldest first.
    pub fn experiments(&self) -> Result<Vec<StoredExperiment>, DbError> {
        self.conn
            .query(
                "SELECT id, config_json, initial_adapter, finished, first_commitment, uid, signer FROM experiments ORDER BY created_ms, id",
                values![],
            )?
            .iter()
            .map(row_to_experiment)
            .collect()
    }

    /// Where a (re)started engine picks up this experiment.
    pub fn resume_state(&self, id: &ExperimentId) -> Result<ResumeState, DbError> {
        let finished = self
            .conn
            .query_one(
                "SELECT finished FROM experiments WHERE id = $1",
                values![&id.0],
            )?
            .int(0)?
            != 0;
        let open = self.conn.query_opt(
            "SELECT round, adapter_before, adapter_len, secret FROM rounds
             WHERE experiment = $1 AND closed = 0 ORDER BY round LIMIT 1",
            values![&id.0],
        )?;
        // Training and evaluation tasks share one id space.
        let next_task = self
            .conn
            .query_one(
                "SELECT COALESCE(MAX(task), 0) + 1 FROM
                 (SELECT task FROM tasks UNION ALL SELECT task FROM eval_tasks) AS issued",
                values![],
            )?
            .int(0)?;
        let unevaluated = self.unevaluated(id)?;
        let eval_answers = self.unsettled_answers(id)?;
        let veterans = self.veterans(id)?;
        let known_hashes = self.hashes(
            "SELECT hash FROM submissions WHERE experiment = $1
             UNION SELECT hash FROM replicas WHERE experiment = $1
             UNION SELECT hash FROM referees WHERE experiment = $1",
            id,
        )?;
        let (disputes, flags) = self.verdicts(id)?;
        let Some(open) = open else {
            // Finished: the last adapter is the last ledger entry's output.
            let last = self.ledger(id)?.pop();
            let adapter = last.map(|(_, entry)| entry.adapter_after);
            let len = match adapter {
                Some(hash) => self.adapter_len(&hash)?.unwrap_or(0),
                None => 0,
            };
            return Ok(ResumeState {
                round: RoundId(self.rounds_closed(id)?),
                adapter: adapter.map(|hash| (hash, len)),
                flags,
                unevaluated,
                eval_answers,
                veterans,
                known_hashes,
                next_task: TaskId(next_task as u64),
                finished: true,
                ..ResumeState::default()
            });
        };
        let round = open.int(0)?;
        let adapter = hash_from(&open.bytes(1)?)?;
        let adapter_len = open.int(2)?;
        let secret = open.bytes(3)?;
        let mut state = ResumeState {
            round: RoundId(round as u64),
            adapter: Some((adapter, adapter_len as u64)),
            secret: RoundSecret(hash_from(&secret)?.0),
            unevaluated,
            eval_answers,
            veterans,
            known_hashes,
            next_task: TaskId(next_task as u64),
            finished,
            flags,
            ..ResumeState::default()
        };
        // Referee tasks are not restored: their disputes, still unsettled in the ledger, are
        // queued again, except those whose referee delta is already stored this round.
        let mut disputes = disputes;
        for (dispute_round, counted, signed_header) in
            self.round_referees(id, RoundId(round as u64))?
        {
            let position = disputes
                .iter()
                .position(|d| d.round == dispute_round && d.counted == counted);
            if let Some(position) = position {
                let dispute = disputes.remove(position);
                let upload: UploadHeader = from_payload(&signed_header)
                    .map_err(|error| DbError::Corrupt(format!("stored header: {error}")))?;
                state
                    .referee_results
                    .push((dispute, AcceptedDelta::from_upload(&upload, u64::MAX)));
            }
        }
        state.disputes = disputes;
        for row in self.conn.query(
            "SELECT task, trainer, repeats FROM tasks
             WHERE experiment = $1 AND round = $2 AND referee_of IS NULL
             ORDER BY task",
            values![&id.0, round],
        )? {
            let task = TaskId(row.int(0)? as u64);
            state
                .tasks
                .push((task, TrainerId(hash_from(&row.bytes(1)?)?.0)));
            if let Some(repeats) = row.opt_int(2)? {
                state.repeats.push((task, TaskId(repeats as u64)));
            }
        }
        let parse = |signed_header: &[u8]| -> Result<(TaskId, AcceptedDelta), DbError> {
            let upload: UploadHeader = from_payload(signed_header)
                .map_err(|error| DbError::Corrupt(format!("stored header: {error}")))?;
            Ok((
                upload.header.task,
                AcceptedDelta::from_upload(&upload, u64::MAX),
            ))
        };
        // Each accepted delta comes back from the header its trainer signed.
        for (_, signed_header) in self.round_submissions(id, RoundId(round as u64))? {
            state.accepted.push(parse(&signed_header)?);
        }
        for (_, signed_header) in self.round_replicas(id, RoundId(round as u64))? {
            state.replicas.push(parse(&signed_header)?);
        }
        state.rejected = self.rejections(id, RoundId(round as u64))?;
        Ok(state)
    }

    /// Records an adapter's settled held-out score: the median of its evaluators' answers (a
    /// repeated score of the same adapter replaces it). `trainer` is the evaluator whose answer
    /// is nearest the median.
    pub fn record_evaluation(
        &self,
        id: &ExperimentId,
        outcome: &crate::engine::EvalOutcome,
        now_ms: i64,
    ) -> Result<(), DbError> {
        let nearest = outcome
            .answers
            .iter()
            .min_by(|a, b| {
                (a.loss - outcome.loss)
                    .abs()
                    .total_cmp(&(b.loss - outcome.loss).abs())
            })
            .map_or([0u8; 32], |answer| answer.trainer.0);
        self.conn.execute(
            "INSERT INTO evaluations
                 (experiment, adapter, after_round, trainer, loss, tokens, at_ms,
                  evaluators, agreeing, wanted, spread)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (experiment, adapter) DO UPDATE SET
                 after_round = excluded.after_round, trainer = excluded.trainer,
                 loss = excluded.loss, tokens = excluded.tokens, at_ms = excluded.at_ms,
                 evaluators = excluded.evaluators, agreeing = excluded.agreeing,
                 wanted = excluded.wanted, spread = excluded.spread",
            values![
                &id.0,
                &outcome.target.adapter.0,
                outcome.target.after_round.map(|r| r.0 as i64),
                &nearest,
                f64::from(outcome.loss),
                outcome.tokens as i64,
                now_ms,
                outcome.answers.len() as i64,
                i64::from(outcome.agreeing),
                i64::from(outcome.wanted),
                f64::from(outcome.spread),
            ],
        )?;
        Ok(())
    }

    /// Records what one evaluator did with an adapter: its answer, or how it failed.
    pub fn record_evaluator(
        &self,
        id: &ExperimentId,
        event: &crate::engine::EvaluatorEvent,
        now_ms: i64,
    ) -> Result<(), DbError> {
        let (loss, tokens, failure) = match event.result {
            Ok((loss, tokens)) => (Some(f64::from(loss)), Some(tokens as i64), None),
            Err(failure) => (None, None, Some(failure.as_str())),
        };
        self.conn.execute(
            "INSERT INTO eval_answers
                 (experiment, adapter, trainer, loss, tokens, failure, at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (experiment, adapter, trainer) DO UPDATE SET
                 loss = excluded.loss, tokens = excluded.tokens,
                 failure = excluded.failure, at_ms = excluded.at_ms",
            values![
                &id.0,
                &event.target.adapter.0,
                &event.trainer.0,
                loss,
                tokens,
                failure,
                now_ms
            ],
        )?;
        Ok(())
    }

    /// Trainers with a delta accepted in a committed round of the experiment.
    fn veterans(&self, id: &ExperimentId) -> Result<Vec<TrainerId>, DbError> {
        self.hashes(
            "SELECT s.trainer FROM submissions s
             JOIN rounds r ON r.experiment = s.experiment AND r.round = s.round
             WHERE s.experiment = $1 AND r.closed = 1
             UNION
             SELECT p.trainer FROM replicas p
             JOIN rounds r ON r.experiment = p.experiment AND r.round = p.round
             WHERE p.experiment = $1 AND r.closed = 1",
            id,
        )
        .map(|hashes| hashes.into_iter().map(|h| TrainerId(h.0)).collect())
    }

    /// Answers recorded for adapters that have no settled score yet.
    fn unsettled_answers(
        &self,
        id: &ExperimentId,
    ) -> Result<Vec<(BlobHash, crate::engine::EvalAnswer)>, DbError> {
        self.conn
            .query(
                "SELECT adapter, trainer, loss, tokens FROM eval_answers
                 WHERE experiment = $1 AND failure IS NULL AND loss IS NOT NULL
                   AND adapter NOT IN (SELECT adapter FROM evaluations WHERE experiment = $1)
                 ORDER BY at_ms, trainer",
                values![&id.0],
            )?
            .iter()
            .map(|row| {
                Ok((
                    hash_from(&row.bytes(0)?)?,
                    crate::engine::EvalAnswer {
                        trainer: TrainerId(hash_from(&row.bytes(1)?)?.0),
                        loss: row.real(2)? as f32,
                        tokens: row.int(3)?.max(0) as u64,
                        baseline: None,
                    },
                ))
            })
            .collect()
    }

    /// Every recorded evaluation of an experiment, oldest adapter first.
    pub fn evaluations(&self, id: &ExperimentId) -> Result<Vec<StoredEvaluation>, DbError> {
        // A SQLite data directory last written by a version without evaluations, opened
        // read-only, has no such table: it has no evaluations either.
        if !self.conn.is_postgres()
            && self
                .conn
                .query_opt(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'evaluations'",
                    values![],
                )?
                .is_none()
        {
            return Ok(Vec::new());
        }
        let count = |value: i64| value.clamp(0, i64::from(u32::MAX)) as u32;
        self.conn
            .query(
                "SELECT after_round, adapter, trainer, loss, tokens, at_ms,
                        evaluators, agreeing, wanted, spread FROM evaluations
                 WHERE experiment = $1 ORDER BY COALESCE(after_round, -1)",
                values![&id.0],
            )?
            .iter()
            .map(|row| {
                Ok(StoredEvaluation {
                    after_round: row.opt_int(0)?.map(|r| r as u64),
                    adapter: hex::encode(row.bytes(1)?),
                    trainer: hex::encode(row.bytes(2)?),
                    loss: row.real(3)?,
                    tokens: row.int(4)? as u64,
                    at_ms: row.int(5)?,
                    evaluators: count(row.int(6)?),
                    agreeing: count(row.int(7)?),
                    wanted: count(row.int(8)?),
                    spread: row.real(9)?,
                })
            })
            .collect()
    }

    /// Records an issued evaluation task.
    pub fn record_eval_task(
        &self,
        id: &ExperimentId,
        task: TaskId,
        trainer: TrainerId,
        adapter: &BlobHash,
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO eval_tasks (task, experiment, adapter, trainer, issued_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (task) DO UPDATE SET experiment = excluded.experiment,
                 adapter = excluded.adapter, trainer = excluded.trainer,
                 issued_ms = excluded.issued_ms",
            values![task.0 as i64, &id.0, &adapter.0, &trainer.0, now_ms],
        )?;
        Ok(())
    }

    /// The experiment's adapters (the initial one, then each committed round's) that have no
    /// recorded evaluation, oldest first.
    fn unevaluated(&self, id: &ExperimentId) -> Result<Vec<crate::engine::EvalTarget>, DbError> {
        let Some(experiment) = self.experiment(id)? else {
            return Ok(Vec::new());
        };
        let evaluated: std::collections::HashSet<String> = self
            .evaluations(id)?
            .into_iter()
            .map(|e| e.adapter)
            .collect();
        let mut adapters = vec![(None, experiment.initial_adapter)];
        for (_, entry) in self.ledger(id)? {
            adapters.push((Some(entry.round), entry.adapter_after));
        }
        let mut out = Vec::new();
        for (after_round, adapter) in adapters {
            if evaluated.contains(&adapter.to_hex()) {
                continue;
            }
            if let Some(adapter_len) = self.adapter_len(&adapter)? {
                out.push(crate::engine::EvalTarget::held_out(
                    after_round,
                    adapter,
                    adapter_len,
                ));
            }
        }
        Ok(out)
    }

    /// Records an issued task (a replica of `repeats`, or a referee task for a dispute of
    /// round `referee_of`, when given).
    #[allow(clippy::too_many_arguments)]
    pub fn record_task(
        &self,
        id: &ExperimentId,
        round: RoundId,
        task: TaskId,
        trainer: TrainerId,
        repeats: Option<TaskId>,
        referee_of: Option<RoundId>,
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO tasks (task, experiment, round, trainer, issued_ms, repeats, referee_of)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (task) DO UPDATE SET experiment = excluded.experiment,
                 round = excluded.round, trainer = excluded.trainer,
                 issued_ms = excluded.issued_ms, repeats = excluded.repeats,
                 referee_of = excluded.referee_of",
            values![
                task.0 as i64,
                &id.0,
                round.0 as i64,
                &trainer.0,
                now_ms,
                repeats.map(|task| task.0 as i64),
                referee_of.map(|round| round.0 as i64)
            ],
        )?;
        Ok(())
    }

    /// Records a referee's delta for `dispute` (its blob must already be durable).
    #[allow(clippy::too_many_arguments)]
    pub fn record_referee(
        &self,
        id: &ExperimentId,
        round: RoundId,
        task: TaskId,
        delta: &AcceptedDelta,
        dispute: &crate::engine::Dispute,
        signed_header: &[u8],
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO referees (experiment, round, task, hash, dispute_round, counted, trainer, received_ms, signed_header)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            values![
                &id.0,
                round.0 as i64,
                task.0 as i64,
                &delta.hash.0,
                dispute.round.0 as i64,
                &dispute.counted.0,
                &delta.trainer.0,
                now_ms,
                signed_header
            ],
        )?;
        Ok(())
    }

    /// Referee deltas stored in one round: (disputed round, disputed counted hash, signed
    /// header bytes), by task.
    pub fn round_referees(
        &self,
        id: &ExperimentId,
        round: RoundId,
    ) -> Result<Vec<(RoundId, BlobHash, Vec<u8>)>, DbError> {
        self.conn
            .query(
                "SELECT dispute_round, counted, signed_header FROM referees
                 WHERE experiment = $1 AND round = $2 ORDER BY task",
                values![&id.0, round.0 as i64],
            )?
            .iter()
            .map(|row| {
                Ok((
                    RoundId(row.int(0)? as u64),
                    hash_from(&row.bytes(1)?)?,
                    row.bytes(2)?,
                ))
            })
            .collect()
    }

    /// The start adapter of `round` and its encoded length.
    pub fn round_start(
        &self,
        id: &ExperimentId,
        round: RoundId,
    ) -> Result<Option<(BlobHash, u64)>, DbError> {
        self.conn
            .query_opt(
                "SELECT adapter_before, adapter_len FROM rounds WHERE experiment = $1 AND round = $2",
                values![&id.0, round.0 as i64],
            )?
            .map(|row| Ok((hash_from(&row.bytes(0)?)?, row.int(1)? as u64)))
            .transpose()
    }

    /// From the ledger: the disputes no referee has settled, oldest first, and each flagged
    /// trainer's flags.
    fn verdicts(&self, id: &ExperimentId) -> Result<Verdicts, DbError> {
        let mut disputes: Vec<crate::engine::Dispute> = Vec::new();
        let mut flags: std::collections::BTreeMap<TrainerId, u32> = Default::default();
        for (_, entry) in self.ledger(id)? {
            for check in entry
                .verification
                .iter()
                .flat_map(|verification| &verification.referees)
            {
                disputes.retain(|d| !(d.round == check.round && d.counted == check.counted));
                if let Some(trainer) = check.flagged() {
                    *flags.entry(trainer).or_default() += 1;
                }
            }
            let adapter_len = self.round_start(id, entry.round)?.map_or(0, |(_, len)| len);
            disputes.extend(crate::engine::Dispute::from_entry(&entry, adapter_len));
        }
        Ok((disputes, flags.into_iter().collect()))
    }

    /// Records the second delta of a replicated task, kept beside the pair's counted delta
    /// `counted` for comparison (its blob must already be durable).
    #[allow(clippy::too_many_arguments)]
    pub fn record_replica(
        &self,
        id: &ExperimentId,
        round: RoundId,
        task: TaskId,
        delta: &AcceptedDelta,
        counted: &BlobHash,
        signed_header: &[u8],
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO replicas (experiment, round, task, hash, counted, trainer, received_ms, signed_header)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            values![
                &id.0,
                round.0 as i64,
                task.0 as i64,
                &delta.hash.0,
                &counted.0,
                &delta.trainer.0,
                now_ms,
                signed_header
            ],
        )?;
        Ok(())
    }

    /// Second deltas of replicated tasks of one round: (delta hash, signed header bytes), by
    /// task.
    pub fn round_replicas(
        &self,
        id: &ExperimentId,
        round: RoundId,
    ) -> Result<Vec<(BlobHash, Vec<u8>)>, DbError> {
        self.signed_headers(
            "SELECT hash, signed_header FROM replicas WHERE experiment = $1 AND round = $2
             ORDER BY task",
            id,
            round,
        )
    }

    /// (hash, signed header) rows of one round from `sql`, which takes the experiment and the
    /// round as `$1` and `$2`.
    fn signed_headers(
        &self,
        sql: &str,
        id: &ExperimentId,
        round: RoundId,
    ) -> Result<Vec<(BlobHash, Vec<u8>)>, DbError> {
        self.conn
            .query(sql, values![&id.0, round.0 as i64])?
            .iter()
            .map(|row| Ok((hash_from(&row.bytes(0)?)?, row.bytes(1)?)))
            .collect()
    }

    /// Records an accepted submission (its blob must already be durable).
    pub fn record_submission(
        &self,
        id: &ExperimentId,
        round: RoundId,
        task: TaskId,
        delta: &AcceptedDelta,
        signed_header: &[u8],
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO submissions (hash, experiment, round, task, trainer, weight, train_loss, byte_len, received_ms, signed_header)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            values![
                &delta.hash.0,
                &id.0,
                round.0 as i64,
                task.0 as i64,
                &delta.trainer.0,
                delta.weight as i64,
                f64::from(delta.reported_train_loss),
                delta.byte_len as i64,
                now_ms,
                signed_header
            ],
        )?;
        Ok(())
    }

    /// Every blob the database refers to, in every experiment: initial adapters, each round's
    /// starting adapter, ledger entries' adapters, aggregates, optimizer states and accepted
    /// deltas, the open round's accepted deltas, recorded adapters, bodies staged by standby
    /// nodes for the leader, and pinned base models.
    /// The blob collector keeps exactly these (and whatever is too young to judge).
    pub fn referenced_blobs(&self) -> Result<std::collections::BTreeSet<BlobHash>, DbError> {
        let mut out = std::collections::BTreeSet::new();
        for query in [
            "SELECT initial_adapter FROM experiments",
            "SELECT adapter_before FROM rounds",
            "SELECT hash FROM submissions",
            "SELECT hash FROM replicas",
            "SELECT hash FROM referees",
            "SELECT hash FROM adapters",
            // Bodies a standby stored for the leader, however long the leader takes.
            "SELECT hash FROM staged_uploads",
        ] {
            for row in self.conn.query(query, values![])? {
                out.insert(hash_from(&row.bytes(0)?)?);
            }
        }
        for experiment in self.experiments()? {
            for (_, entry) in self.ledger(&experiment.id)? {
                out.insert(entry.adapter_before);
                out.insert(entry.adapter_after);
                out.insert(entry.aggregate);
                out.extend(entry.optimizer_state);
                out.extend(entry.accepted.iter().map(|accepted| accepted.hash));
                out.extend(
                    entry
                        .verification
                        .iter()
                        .flat_map(|verification| &verification.checks)
                        .map(|check| check.replica.hash),
                );
                out.extend(
                    entry
                        .verification
                        .iter()
                        .flat_map(|verification| &verification.referees)
                        .map(|check| check.referee.hash),
                );
            }
            let config: serde_json::Value =
                serde_json::from_str(&experiment.config_json).unwrap_or_default();
            if let Some(pinned) = config
                .pointer("/model/hash")
                .and_then(|hash| hash.as_str())
                .and_then(|hash| hash.parse().ok())
            {
                out.insert(pinned);
            }
        }
        Ok(out)
    }

    /// Records that an enrollment token admitted an identity (for good).
    pub fn record_token_binding(
        &self,
        binding: &crate::admission::TokenBinding,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO token_bindings (token, trainer) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            values![&binding.token, &binding.trainer.0],
        )?;
        Ok(())
    }

    /// Every identity each enrollment token admitted.
    pub fn token_bindings(&self) -> Result<Vec<crate::admission::TokenBinding>, DbError> {
        self.conn
            .query("SELECT token, trainer FROM token_bindings", values![])?
            .iter()
            .map(|row| {
                Ok(crate::admission::TokenBinding {
                    token: hash_from(&row.bytes(0)?)?.0,
                    trainer: TrainerId(hash_from(&row.bytes(1)?)?.0),
                })
            })
            .collect()
    }

    /// Removes an accepted submission from its round (its stored delta was found unreadable;
    /// the refusal recorded with it says why).
    pub fn exclude_submission(
        &self,
        id: &ExperimentId,
        round: RoundId,
        hash: &BlobHash,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "DELETE FROM submissions WHERE experiment = $1 AND round = $2 AND hash = $3",
            values![&id.0, round.0 as i64, &hash.0],
        )?;
        Ok(())
    }

    /// Accepted submissions of one round: (delta hash, signed header bytes), by hash.
    pub fn round_submissions(
        &self,
        id: &ExperimentId,
        round: RoundId,
    ) -> Result<Vec<(BlobHash, Vec<u8>)>, DbError> {
        self.signed_headers(
            "SELECT hash, signed_header FROM submissions WHERE experiment = $1 AND round = $2 ORDER BY hash",
            id,
            round,
        )
    }

    /// Stores a small blob in the database (idempotent).
    pub fn put_inline(&self, hash: &BlobHash, data: &[u8]) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO inline_blobs (hash, data) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            values![&hash.0, data],
        )?;
        Ok(())
    }

    /// Whether a blob is stored in the database.
    pub fn has_inline(&self, hash: &BlobHash) -> Result<bool, DbError> {
        Ok(self
            .conn
            .query_opt(
                "SELECT 1 FROM inline_blobs WHERE hash = $1",
                values![&hash.0],
            )?
            .is_some())
    }

    /// A blob stored in the database, unverified.
    pub fn inline_blob(&self, hash: &BlobHash) -> Result<Option<Vec<u8>>, DbError> {
        self.conn
            .query_opt(
                "SELECT data FROM inline_blobs WHERE hash = $1",
                values![&hash.0],
            )?
            .map(|row| row.bytes(0))
            .transpose()
    }

    /// Records a refused submission.
    pub fn record_rejection(
        &self,
        id: &ExperimentId,
        round: RoundId,
        rejected: &RejectedSubmission,
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO rejections (experiment, round, trainer, hash, reason, detail, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            values![
                &id.0,
                round.0 as i64,
                rejected.trainer.as_ref().map(|t| &t.0),
                rejected.hash.as_ref().map(|h| &h.0),
                rejected.reason.as_str(),
                &rejected.detail,
                now_ms
            ],
        )?;
        Ok(())
    }

    /// Records a trainer's visit.
    pub fn record_trainer(
        &self,
        trainer: TrainerId,
        agent: &str,
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO trainers (id, agent, first_seen_ms, last_seen_ms) VALUES ($1, $2, $3, $3)
             ON CONFLICT(id) DO UPDATE SET agent = excluded.agent, last_seen_ms = excluded.last_seen_ms",
            values![&trainer.0, agent, now_ms],
        )?;
        Ok(())
    }

    /// Commits a closed round in one transaction: its ledger entry, the new adapter, and the next
    /// round opened (or the experiment marked finished).
    pub fn commit_round(
        &mut self,
        entry: &LedgerEntry,
        adapter_len: u64,
        finished: bool,
        next_secret: &RoundSecret,
    ) -> Result<BlobHash, DbError> {
        let id = &entry.experiment;
        let round = entry.round.0 as i64;
        let entry_hash = entry.hash();
        // Its own transaction, or a savepoint nested in an open batch.
        self.atomically(|conn| {
            conn.execute(
                "INSERT INTO ledger (experiment, round, hash, entry) VALUES ($1, $2, $3, $4)",
                values![&id.0, round, &entry_hash.0, &entry.to_bytes()[..]],
            )?;
            conn.execute(
                "UPDATE rounds SET closed = 1 WHERE experiment = $1 AND round = $2",
                values![&id.0, round],
            )?;
            // A closed round's tasks take no upload: their claims have nothing left to guard.
            conn.execute(
                "DELETE FROM upload_claims WHERE experiment = $1 AND round <= $2",
                values![&id.0, round],
            )?;
            conn.execute(
                "INSERT INTO adapters (hash, experiment, round, byte_len) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                values![&entry.adapter_after.0, &id.0, round, adapter_len as i64],
            )?;
            if finished {
                conn.execute(
                    "UPDATE experiments SET finished = 1 WHERE id = $1",
                    values![&id.0],
                )?;
            } else {
                conn.execute(
                    "INSERT INTO rounds (experiment, round, adapter_before, adapter_len, secret) VALUES ($1, $2, $3, $4, $5)",
                    values![
                        &id.0,
                        round + 1,
                        &entry.adapter_after.0,
                        adapter_len as i64,
                        &next_secret.0
                    ],
                )?;
            }
            Ok(())
        })?;
        Ok(entry_hash)
    }

    /// The ledger, first round first: (stored hash, parsed entry).
    pub fn ledger(&self, id: &ExperimentId) -> Result<Vec<(BlobHash, LedgerEntry)>, DbError> {
        self.conn
            .query(
                "SELECT hash, entry FROM ledger WHERE experiment = $1 ORDER BY round",
                values![&id.0],
            )?
            .iter()
            .map(|row| {
                let entry = LedgerEntry::from_bytes(&row.bytes(1)?)
                    .map_err(|error| DbError::Corrupt(error.to_string()))?;
                Ok((hash_from(&row.bytes(0)?)?, entry))
            })
            .collect()
    }

    /// Who may read blob `hash` from the hub: merged adapters are public; an accepted delta is
    /// public when its experiment publishes deltas; anything else (other deltas, aggregates,
    /// optimizer states, unknown hashes) is private.
    pub fn blob_visibility(&self, hash: &BlobHash) -> Result<Visibility, DbError> {
        if self.adapter_len(hash)?.is_some() {
            return Ok(Visibility::Public);
        }
        let configs = self.conn.query(
            "SELECT e.config_json FROM submissions s JOIN experiments e ON e.id = s.experiment
             WHERE s.hash = $1",
            values![&hash.0],
        )?;
        let mut published = false;
        for row in configs {
            published |=
                serde_json::from_str::<tributary_shared::config::ExperimentConfig>(&row.text(0)?)
                    .is_ok_and(|config| config.experiment.publish_deltas);
        }
        Ok(if published {
            Visibility::Public
        } else {
            Visibility::Private
        })
    }

    /// The stored length of an adapter blob, if it is a known adapter.
    pub fn adapter_len(&self, hash: &BlobHash) -> Result<Option<u64>, DbError> {
        self.conn
            .query_opt(
                "SELECT byte_len FROM adapters WHERE hash = $1",
                values![&hash.0],
            )?
            .map(|row| row.int(0).map(|len| len as u64))
            .transpose()
    }

    /// Refused submissions of one round, in order.
    pub fn rejections(
        &self,
        id: &ExperimentId,
        round: RoundId,
    ) -> Result<Vec<RejectedSubmission>, DbError> {
        self.conn
            .query(
                "SELECT trainer, hash, reason, detail FROM rejections WHERE experiment = $1 AND round = $2 ORDER BY id",
                values![&id.0, round.0 as i64],
            )?
            .iter()
            .map(|row| {
                let reason = row.text(2)?;
                Ok(RejectedSubmission {
                    trainer: row
                        .opt_bytes(0)?
                        .map(|t| hash_from(&t).map(|h| TrainerId(h.0)))
                        .transpose()?,
                    hash: row.opt_bytes(1)?.map(|h| hash_from(&h)).transpose()?,
                    reason: RejectReason::from_name(&reason)
                        .ok_or_else(|| DbError::Corrupt(format!("unknown reason {reason:?}")))?,
                    detail: row.text(3)?,
                })
            })
            .collect()
    }

    /// Counts for `status`.
    pub fn status(&self, id: &ExperimentId) -> Result<ExperimentStatus, DbError> {
        let accepted = self
            .conn
            .query_one(
                "SELECT COUNT(*) FROM submissions WHERE experiment = $1",
                values![&id.0],
            )?
            .int(0)?;
        let rejected = self
            .conn
            .query(
                "SELECT reason, COUNT(*) FROM rejections WHERE experiment = $1 GROUP BY reason ORDER BY reason",
                values![&id.0],
            )?
            .iter()
            .map(|row| Ok((row.text(0)?, row.int(1)? as u64)))
            .collect::<Result<Vec<_>, DbError>>()?;
        let trainers = self
            .conn
            .query_one("SELECT COUNT(*) FROM trainers", values![])?
            .int(0)?;
        let ledger = self.ledger(id)?;
        let finished = self.experiment(id)?.is_some_and(|e| e.finished);
        let evaluations = self.evaluations(id)?;
        let task_counts: std::collections::BTreeMap<u64, (u64, u64)> = self
            .conn
            .query(
                "SELECT round, COUNT(*), COUNT(repeats) FROM tasks WHERE experiment = $1
                 GROUP BY round",
                values![&id.0],
            )?
            .iter()
            .map(|row| Ok((row.int(0)? as u64, (row.int(1)? as u64, row.int(2)? as u64))))
            .collect::<Result<_, DbError>>()?;
        let tasks: u64 = task_counts.values().map(|(all, _)| all).sum();
        let replica_tasks: u64 = task_counts.values().map(|(_, replicas)| replicas).sum();
        let rounds = ledger
            .iter()
            .map(|(hash, entry)| {
                let adapter = entry.adapter_after.to_hex();
                let evaluation = evaluations.iter().find(|e| e.adapter == adapter);
                let (round_tasks, round_replicas) =
                    task_counts.get(&entry.round.0).copied().unwrap_or_default();
                let checks = entry
                    .verification
                    .as_ref()
                    .map_or(&[][..], |verification| &verification.checks[..]);
                let loss_checks = entry
                    .verification
                    .as_ref()
                    .map_or(&[][..], |verification| &verification.loss_checks[..]);
                RoundSummary {
                    round: entry.round.0,
                    reported_train_loss: entry.metrics.reported_train_loss,
                    eval_loss: evaluation.map(|e| e.loss),
                    eval_evaluators: evaluation.map(|e| e.evaluators),
                    eval_agreeing: evaluation.map(|e| e.agreeing),
                    eval_spread: evaluation.map(|e| e.spread),
                    bytes_up: entry.metrics.bytes_up,
                    raw_bytes: entry.metrics.raw_bytes,
                    accepted: entry.accepted.len(),
                    rejected: entry.rejected.len(),
                    tasks: round_tasks,
                    replica_tasks: round_replicas,
                    checks: checks.len(),
                    disagreements: checks
                        .iter()
                        .filter(|check| {
                            check.verdict != tributary_shared::ledger::CheckVerdict::Agree
                        })
                        .count(),
                    agreeing_distance_max: checks
                        .iter()
                        .filter(|check| {
                            check.verdict == tributary_shared::ledger::CheckVerdict::Agree
                        })
                        .map(|check| check.distance)
                        .max_by(f64::total_cmp),
                    loss_checks: loss_checks.len(),
                    loss_checks_failed: loss_checks
                        .iter()
                        .filter(|check| check.flagged().is_some())
                        .count(),
                    loss_improvement_min: loss_checks
                        .iter()
                        .filter(|check| {
                            check.outcome == tributary_shared::loss_check::LossOutcome::Lowered
                        })
                        .map(|check| check.improvement)
                        .min_by(f64::total_cmp),
                    adapter,
                    ledger_hash: hash.to_hex(),
                }
            })
            .collect();
        Ok(ExperimentStatus {
            rounds_closed: ledger.len() as u64,
            accepted: accepted as u64,
            rejected,
            trainers: trainers as u64,
            ledger_head: ledger.last().map(|(hash, _)| hash.to_hex()),
            adapter: ledger.last().map(|(_, entry)| entry.adapter_after.to_hex()),
            finished,
            evaluations,
            rounds,
            tasks,
            replica_tasks,
            verification_share: replica_tasks as f64
                / tasks.saturating_sub(replica_tasks).max(1) as f64,
        })
    }

    fn rounds_closed(&self, id: &ExperimentId) -> Result<u64, DbError> {
        let count = self
            .conn
            .query_one(
                "SELECT COUNT(*) FROM ledger WHERE experiment = $1",
                values![&id.0],
            )?
            .int(0)?;
        Ok(count as u64)
    }

    /// The 32-byte values in the first column of `sql`, which takes the experiment as `$1`.
    fn hashes(&self, sql: &str, id: &ExperimentId) -> Result<Vec<BlobHash>, DbError> {
        self.conn
            .query(sql, values![&id.0])?
            .iter()
            .map(|row| hash_from(&row.bytes(0)?))
            .collect()
    }
}

/// Brings a SQLite database to [`SCHEMA_VERSION`] (kept in its `user_version`), creating it
/// when empty. A database of another version is refused rather than half-used.
fn migrate_sqlite(conn: &Connection) -> Result<(), DbError> {
    let mut version = conn.query_one("PRAGMA user_version", values![])?.int(0)?;
    let tables = conn
        .query_one(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
            values![],
        )?
        .int(0)?;
    if tables > 0 && version == 2 {
        // Version 3 scores each adapter by several evaluators.
        conn.batch(
            "BEGIN;
             ALTER TABLE evaluations ADD COLUMN evaluators INTEGER NOT NULL DEFAULT 1;
             ALTER TABLE evaluations ADD COLUMN agreeing INTEGER NOT NULL DEFAULT 1;
             ALTER TABLE evaluations ADD COLUMN wanted INTEGER NOT NULL DEFAULT 1;
             ALTER TABLE evaluations ADD COLUMN spread REAL NOT NULL DEFAULT 0;
             PRAGMA user_version = 3;
             COMMIT;",
        )?;
        version = 3;
    }
    if tables > 0 && version == 3 {
        // Version 4 replicates tasks and referees disputes (the `replicas` and `referees`
        // tables come with the schema below).
        conn.batch(
            "BEGIN;
             ALTER TABLE tasks ADD COLUMN repeats INTEGER;
             ALTER TABLE tasks ADD COLUMN referee_of INTEGER;
             PRAGMA user_version = 4;
             COMMIT;",
        )?;
        version = 4;
    }
    if tables > 0 && version != SCHEMA_VERSION {
        return Err(DbError::Corrupt(format!(
            "the database has schema version {version}, this coordinator needs \
             {SCHEMA_VERSION}; use a new data directory"
        )));
    }
    conn.batch(SCHEMA)?;
    conn.batch(crate::store::leases::LEASE_SCHEMA)?;
    conn.batch(crate::store::leases::LED_EXPERIMENT_SCHEMA)?;
    conn.batch(crate::store::fleet::FLEET_SCHEMA)?;
    conn.batch(crate::store::staged::STAGED_SCHEMA)?;
    conn.batch(crate::store::staged::CLAIMS_SCHEMA)?;
    conn.batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
}

/// [`SCHEMA`] in PostgreSQL's types: 64-bit integers, double floats, `bytea` for bytes, and an
/// identity column where SQLite numbers rows itself.
fn postgres_schema() -> String {
    to_postgres_types(SCHEMA)
}

/// A SQLite table definition in PostgreSQL's types.
fn to_postgres_types(schema: &str) -> String {
    schema
        .replace(
            "INTEGER PRIMARY KEY AUTOINCREMENT",
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        )
        .replace("INTEGER", "BIGINT")
        .replace("REAL", "DOUBLE PRECISION")
        .replace("BLOB", "BYTEA")
}

/// Creates the schema in a PostgreSQL database, or checks the version of the one there.
/// Nodes starting together take turns (a transaction-scoped advisory lock).
fn create_postgres_schema(conn: &Connection) -> Result<(), DbError> {
    conn.batch(
        "BEGIN;
         SELECT pg_advisory_xact_lock(7340189);
         CREATE TABLE IF NOT EXISTS tributary_schema (version BIGINT NOT NULL);",
    )?;
    let created = (|| {
        let version = conn.query_opt("SELECT version FROM tributary_schema", values![])?;
        match version {
            None => {
                conn.batch(&postgres_schema())?;
                conn.batch(&to_postgres_types(crate::store::leases::LEASE_SCHEMA))?;
                conn.batch(&to_postgres_types(
                    crate::store::leases::LED_EXPERIMENT_SCHEMA,
                ))?;
                conn.batch(&to_postgres_types(crate::store::fleet::FLEET_SCHEMA))?;
                conn.batch(&to_postgres_types(crate::store::staged::STAGED_SCHEMA))?;
                conn.batch(&to_postgres_types(crate::store::staged::CLAIMS_SCHEMA))?;
                conn.execute(
                    "INSERT INTO tributary_schema (version) VALUES ($1)",
                    values![SCHEMA_VERSION],
                )?;
            }
            Some(row) if row.int(0)? == SCHEMA_VERSION => {
                // Coordination state, not versioned with the experiment schema: added to
                // databases made before it existed.
                conn.batch(&to_postgres_types(crate::store::leases::LEASE_SCHEMA))?;
                conn.batch(&to_postgres_types(
                    crate::store::leases::LED_EXPERIMENT_SCHEMA,
                ))?;
                conn.batch(&to_postgres_types(crate::store::fleet::FLEET_SCHEMA))?;
                conn.batch(&to_postgres_types(crate::store::staged::STAGED_SCHEMA))?;
                conn.batch(&to_postgres_types(crate::store::staged::CLAIMS_SCHEMA))?;
            }
            Some(row) => {
                return Err(DbError::Corrupt(format!(
                    "the database has schema version {}, this coordinator needs \
                     {SCHEMA_VERSION}; use a new database",
                    row.int(0)?
                )))
            }
        }
        Ok(())
    })();
    match created {
        Ok(()) => conn.batch("COMMIT"),
        Err(error) => {
            let _ = conn.batch("ROLLBACK");
            Err(error)
        }
    }
}

fn row_to_experiment(row: &Row) -> Result<StoredExperiment, DbError> {
    Ok(StoredExperiment {
        id: ExperimentId(row.text(0)?),
        config_json: row.text(1)?,
        initial_adapter: hash_from(&row.bytes(2)?)?,
        finished: row.int(3)? != 0,
        first_commitment: hash_from(&row.bytes(4)?)?,
        uid: ExperimentUid(hash_from(&row.bytes(5)?)?.0),
        signer: TrainerId(hash_from(&row.bytes(6)?)?.0),
    })
}

fn hash_from(bytes: &[u8]) -> Result<BlobHash, DbError> {
    let raw: [u8; 32] = bytes
        .try_into()
        .map_err(|_| DbError::Corrupt(format!("a 32-byte id has {} bytes", bytes.len())))?;
    Ok(BlobHash(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EvalAnswer, EvalOutcome, EvalTarget};

    #[test]
    fn a_restart_finds_the_open_disputes_and_the_flags_in_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        restart_finds_disputes_and_flags(&mut Db::open(&dir.path().join("tributary.db")).unwrap());
    }

    #[test]
    fn a_restart_finds_the_open_disputes_and_the_flags_in_postgres() {
        let server = crate::store::test_postgres::TestPostgres::start().unwrap();
        let url = server.create_database("disputes").unwrap();
        restart_finds_disputes_and_flags(&mut Db::open_at(&Location::Postgres(url)).unwrap());
    }

    fn restart_finds_disputes_and_flags(db: &mut Db) {
        use tributary_shared::ledger::{
            CheckVerdict, RefereeCheck, RefereeOutcome, ReplicaCheck, RoundMetrics,
            RoundVerification,
        };
        let id = ExperimentId("disputes".into());
        let secrets: Vec<RoundSecret> = (0..4u8).map(|n| RoundSecret([n; 32])).collect();
        let adapter = |n: u8| BlobHash([100 + n; 32]);
        db.create_experiment(&NewExperiment {
            id: &id,
            config_json: "{}",
            initial_adapter: adapter(0),
            adapter_len: 77,
            first_secret: &secrets[0],
            uid: ExperimentUid([1; 32]),
            signer: TrainerId([2; 32]),
            now_ms: 0,
        })
        .unwrap();
        let delta = |n: u8, task: u64| AcceptedDelta {
            hash: BlobHash([n; 32]),
            trainer: TrainerId([n; 32]),
            weight: 1,
            claimed_samples: 1,
            reported_train_loss: 1.0,
            byte_len: 1,
            task: TaskId(task),
            reported_steps: 1,
            reported_tokens: 1,
            reported_train_ms: 1,
            signature: Vec::new(),
        };
        let entry = |round: u8, verification: Option<RoundVerification>| LedgerEntry {
            experiment: id.clone(),
            experiment_uid: ExperimentUid([1; 32]),
            coordinator: tributary_shared::CertificateHash([0; 32]),
            config_hash: BlobHash([0; 32]),
            round: RoundId(u64::from(round)),
            previous: None,
            adapter_before: adapter(round),
            adapter_after: adapter(round + 1),
            aggregate: BlobHash([9; 32]),
            optimizer_state: None,
            accepted: vec![delta(10, 5)],
            rejected: Vec::new(),
            metrics: RoundMetrics::default(),
            secret_commitment: secrets[usize::from(round)].commitment(),
            secret: secrets[usize::from(round)],
            next_commitment: secrets[usize::from(round) + 1].commitment(),
            signer: TrainerId([2; 32]),
            signature: Vec::new(),
            verification,
        };
        // Round 0: task 5 (trainer 10) counted, its replica (task 6, trainer 11) disagrees.
        let disputed = RoundVerification {
            barred: Vec::new(),
            loss_checks: Vec::new(),
            screening: Vec::new(),
            checks: vec![ReplicaCheck {
                counted: BlobHash([10; 32]),
                replica: delta(11, 6),
                distance: 1.0,
                cosine: 0.0,
                verdict: CheckVerdict::Disagree,
            }],
            referees: Vec::new(),
        };
        db.commit_round(&entry(0, Some(disputed)), 80, false, &secrets[1])
            .unwrap();
        db.commit_round(&entry(1, None), 80, false, &secrets[2])
            .unwrap();
        let resume = db.resume_state(&id).unwrap();
        assert_eq!(resume.disputes.len(), 1);
        let dispute = &resume.disputes[0];
        assert_eq!(
            (dispute.round, dispute.adapter, dispute.adapter_len),
            (RoundId(0), adapter(0), 77)
        );
        assert_eq!(
            dispute.spec_task,
            TaskId(5),
            "the original is the lower task id"
        );
        assert_eq!(dispute.seed, secrets[0].task_seed(TaskId(5)));
        assert_eq!(
            (dispute.counted_trainer, dispute.replica_trainer),
            (TrainerId([10; 32]), TrainerId([11; 32]))
        );
        assert!(resume.flags.is_empty());
        // Round 2 settles it against the counted side.
        let settled = RoundVerification {
            barred: Vec::new(),
            loss_checks: Vec::new(),
            screening: Vec::new(),
            checks: Vec::new(),
            referees: vec![RefereeCheck {
                round: RoundId(0),
                counted: BlobHash([10; 32]),
                counted_trainer: TrainerId([10; 32]),
                replica: BlobHash([11; 32]),
                replica_trainer: TrainerId([11; 32]),
                referee: delta(12, 20),
                distance_to_counted: 1.0,
                distance_to_replica: 0.0,
                outcome: RefereeOutcome::CountedFlagged,
            }],
        };
        db.commit_round(&entry(2, Some(settled)), 80, false, &secrets[3])
            .unwrap();
        let resume = db.resume_state(&id).unwrap();
        assert!(resume.disputes.is_empty());
        assert_eq!(resume.flags, vec![(TrainerId([10; 32]), 1)]);
        // The ledger entries of version 2 come back whole.
        let ledger = db.ledger(&id).unwrap();
        assert_eq!(ledger[2].1.verification.as_ref().unwrap().referees.len(), 1);
    }

    #[test]
    fn a_version_2_database_is_migrated_and_keeps_its_scores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tributary.db");
        let id = ExperimentId("old".into());
        let target = EvalTarget::held_out(None, BlobHash([1; 32]), 10);
        drop(Db::open(&path).unwrap());
        {
            // What version 2 had: one evaluator per score, no answers table.
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(
                "DROP TABLE eval_answers;
                 DROP TABLE replicas;
                 DROP TABLE referees;
                 ALTER TABLE tasks DROP COLUMN repeats;
                 ALTER TABLE tasks DROP COLUMN referee_of;
                 ALTER TABLE evaluations DROP COLUMN evaluators;
                 ALTER TABLE evaluations DROP COLUMN agreeing;
                 ALTER TABLE evaluations DROP COLUMN wanted;
                 ALTER TABLE evaluations DROP COLUMN spread;
                 PRAGMA user_version = 2;",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO evaluations (experiment, adapter, after_round, trainer, loss, tokens, at_ms)
                 VALUES ('old', ?1, NULL, ?2, 4.5, 64, 1)",
                rusqlite::params![&target.adapter.0[..], &[7u8; 32][..]],
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let scores = db.evaluations(&id).unwrap();
        assert_eq!(scores.len(), 1);
        assert_eq!(
            (scores[0].loss, scores[0].evaluators, scores[0].agreeing),
            (4.5, 1, 1)
        );
        // New scores carry their evaluators.
        let answers: Vec<EvalAnswer> = [4.0f32, 4.02, 9.0]
            .iter()
            .enumerate()
            .map(|(i, &loss)| EvalAnswer {
                trainer: TrainerId([i as u8 + 1; 32]),
                loss,
                tokens: 64,
                baseline: None,
            })
            .collect();
        let outcome = EvalOutcome {
            target: EvalTarget {
                adapter: BlobHash([2; 32]),
                ..target
            },
            answers,
            loss: 4.02,
            tokens: 64,
            spread: 5.0,
            agreeing: 2,
            wanted: 3,
        };
        db.record_evaluation(&id, &outcome, 2).unwrap();
        let scores = db.evaluations(&id).unwrap();
        assert_eq!(scores.len(), 2);
        let new = scores
            .iter()
            .find(|s| s.adapter == outcome.target.adapter.to_hex())
            .unwrap();
        assert_eq!((new.evaluators, new.agreeing, new.wanted), (3, 2, 3));
        assert_eq!(
            new.trainer,
            TrainerId([2; 32]).to_hex(),
            "the answer at the median"
        );
        drop(db);
        let version: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }
}
