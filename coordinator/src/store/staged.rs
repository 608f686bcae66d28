//! Uploads a standby node of a cluster has checked and stored for the leader (`net::relay`):
//! one row per task at most, written by the standby once the delta's bytes are durable (or
//! once they failed a check: the refusal is the leader's to record, as for an upload of its
//! own), read by the leader, which decides on each as on an upload of its own and deletes the
//! row in the batch that records the decision.
//!
//! The checks a standby can make without the leader's memory are made before a row exists: the
//! signature, the bytes (hash, decoding, layout, finiteness), and against the database that the
//! task was issued to this trainer in this round, that the round is open and that no delta was
//! recorded for the task. What only the leader knows (a task given up on, a round full, a
//! replayed hash) it decides when it reads the row.

use tributary_shared::frame::{from_payload, to_payload};
use tributary_shared::wire::{RejectReason, UploadHeader};
use tributary_shared::{ExperimentId, RoundId, TaskId, TrainerId};

use crate::store::db::{Db, DbError};
use crate::store::sql::values;

/// The table of staged uploads. Like the lease, it is coordination state beside the versioned
/// experiment schema, created (if missing) under the schema's lock. At most one row per task:
/// a second upload for a staged task is refused, so the table holds at most one round's tasks.
pub(crate) const STAGED_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS staged_uploads (
    experiment TEXT NOT NULL,
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    hash BLOB NOT NULL,
    signed_header BLOB NOT NULL,
    body BLOB,
    refusal_reason TEXT,
    refusal_detail TEXT,
    node TEXT NOT NULL,
    staged_ms INTEGER NOT NULL,
    PRIMARY KEY (experiment, task)
);
";

/// Claims on tasks' uploads, taken by a standby before it takes a body (see [`Db::claim_upload`]):
/// while one node receives a task's body no other node takes one, and once the leader decided a
/// staged upload the claim stays, decided, until the round closes, so a trainer cannot make the
/// standbys take body after body for one task.
pub(crate) const CLAIMS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS upload_claims (
    experiment TEXT NOT NULL,
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    hash BLOB NOT NULL,
    node TEXT NOT NULL,
    decided INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (experiment, task)
);
";

/// Whether a node may take a task's upload body ([`Db::claim_upload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Claimed by the caller: it may take the body.
    Taken,
    /// Another upload of the task is being received (its claim has not expired).
    Receiving,
    /// An upload of the task was decided by the leader in this round.
    Decided,
}

/// An upload a standby node checked and stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StagedUpload {
    /// The signed header, as the trainer sent it.
    pub upload: UploadHeader,
    /// The body when it is small enough to live in the database; larger ones are in the blob
    /// store under their hash.
    pub body: Option<Vec<u8>>,
    /// Why the body failed the standby's checks (then there is no body anywhere).
    pub refusal: Option<(RejectReason, String)>,
    /// The node that took it.
    pub node: String,
}

/// Where a task stands, as far as the database tells a standby node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStanding {
    /// No such task in this experiment.
    Unknown,
    /// Issued to another trainer.
    Others,
    /// Issued to this trainer in another round.
    OtherRound(RoundId),
    /// Its round is closed.
    RoundClosed,
    /// A delta is already recorded for it, or another upload is staged.
    Taken,
    /// Issued to this trainer in this open round, with nothing recorded or staged yet.
    Open,
}

fn to_i64(value: u64, what: &str) -> Result<i64, DbError> {
    i64::try_from(value).map_err(|_| DbError::Corrupt(format!("{what} {value} is too large")))
}

impl Db {
    /// Where `task` stands for `trainer` uploading for `round` (see [`TaskStanding`]).
    pub fn task_standing(
        &self,
        experiment: &ExperimentId,
        task: TaskId,
        trainer: &TrainerId,
        round: RoundId,
    ) -> Result<TaskStanding, DbError> {
        let task_id = to_i64(task.0, "task")?;
        let row = self.conn().query_opt(
            "SELECT round, trainer FROM tasks WHERE experiment = $1 AND task = $2",
            values![&experiment.0, task_id],
        )?;
        let Some(row) = row else {
            return Ok(TaskStanding::Unknown);
        };
        let issued_round = RoundId(u64::try_from(row.int(0)?).unwrap_or(0));
        if row.bytes(1)? != trainer.0 {
            return Ok(TaskStanding::Others);
        }
        if issued_round != round {
            return Ok(TaskStanding::OtherRound(issued_round));
        }
        let closed = self
            .conn()
            .query_opt(
                "SELECT closed FROM rounds WHERE experiment = $1 AND round = $2",
                values![&experiment.0, to_i64(round.0, "round")?],
            )?
            .map(|row| row.int(0))
            .transpose()?;
        if closed != Some(0) {
            return Ok(TaskStanding::RoundClosed);
        }
        let taken = self.conn().query_opt(
            "SELECT 1 FROM submissions WHERE experiment = $1 AND task = $2
             UNION ALL SELECT 1 FROM replicas WHERE experiment = $1 AND task = $2
             UNION ALL SELECT 1 FROM referees WHERE experiment = $1 AND task = $2
             UNION ALL SELECT 1 FROM staged_uploads WHERE experiment = $1 AND task = $2",
            values![&experiment.0, task_id],
        )?;
        Ok(if taken.is_some() {
            TaskStanding::Taken
        } else {
            TaskStanding::Open
        })
    }

    /// Records `staged` (committed on its own, durable when this returns); `false` when an
    /// upload for the same task is staged already.
    pub fn stage_upload(&mut self, staged: &StagedUpload, now_ms: u64) -> Result<bool, DbError> {
        let header = &staged.upload.header;
        let signed = to_payload(&staged.upload)
            .map_err(|error| DbError::Corrupt(format!("cannot encode a header: {error}")))?;
        let (task, round, staged_ms) = (
            to_i64(header.task.0, "task")?,
            to_i64(header.round.0, "round")?,
            to_i64(now_ms, "time")?,
        );
        self.atomically(|conn| {
            let inserted = conn.execute(
                "INSERT INTO staged_uploads (experiment, task, round, hash, signed_header, body,
                 refusal_reason, refusal_detail, node, staged_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (experiment, task) DO NOTHING",
                values![
                    &header.experiment.0,
                    task,
                    round,
                    &header.hash.0,
                    &signed[..],
                    staged.body.as_deref(),
                    staged.refusal.as_ref().map(|(reason, _)| reason.as_str()),
                    staged.refusal.as_ref().map(|(_, detail)| detail.as_str()),
                    staged.node.as_str(),
                    staged_ms
                ],
            )?;
            Ok(inserted == 1)
        })
    }

    /// Claims `task`'s upload (of `hash`, in `round`) for `node` until `expires_ms`: taken
    /// when nobody holds the task, or when the last claim is undecided and expired at `now_ms`
    /// (a node that died while receiving). Committed on its own.
    #[allow(clippy::too_many_arguments)]
    pub fn claim_upload(
        &mut self,
        experiment: &ExperimentId,
        task: TaskId,
        round: RoundId,
        hash: tributary_shared::BlobHash,
        node: &str,
        now_ms: u64,
        expires_ms: u64,
    ) -> Result<Claim, DbError> {
        let (task, round) = (to_i64(task.0, "task")?, to_i64(round.0, "round")?);
        let (now_ms, expires_ms) = (to_i64(now_ms, "time")?, to_i64(expires_ms, "time")?);
        self.atomically(|conn| {
            let claimed = conn.execute(
                "INSERT INTO upload_claims (experiment, task, round, hash, node, decided, expires_ms)
                 VALUES ($1, $2, $3, $4, $5, 0, $6)
                 ON CONFLICT (experiment, task) DO UPDATE
                 SET round = excluded.round, hash = excluded.hash, node = excluded.node,
                     expires_ms = excluded.expires_ms
                 WHERE upload_claims.decided = 0 AND upload_claims.expires_ms < $7",
                values![&experiment.0, task, round, &hash.0, node, expires_ms, now_ms],
            )?;
            if claimed == 1 {
                return Ok(Claim::Taken);
            }
            let decided = conn
                .query_opt(
                    "SELECT decided FROM upload_claims WHERE experiment = $1 AND task = $2",
                    values![&experiment.0, task],
                )?
                .map(|row| row.int(0))
                .transpose()?;
            Ok(match decided {
                Some(0) => Claim::Receiving,
                Some(_) => Claim::Decided,
                // Removed in between (its round closed): the caller's header check said open.
                None => Claim::Receiving,
            })
        })
    }

    /// Gives up `node`'s undecided claim on `task` for `hash`, the one that expires at
    /// `expires_ms` (its own failure: the trainer may send the upload again). Committed on its
    /// own.
    pub fn release_claim(
        &mut self,
        experiment: &ExperimentId,
        task: TaskId,
        hash: tributary_shared::BlobHash,
        node: &str,
        expires_ms: u64,
    ) -> Result<(), DbError> {
        let (task, expires_ms) = (to_i64(task.0, "task")?, to_i64(expires_ms, "time")?);
        self.atomically(|conn| {
            conn.execute(
                "DELETE FROM upload_claims WHERE experiment = $1 AND task = $2 AND hash = $3
                 AND node = $4 AND expires_ms = $5 AND decided = 0",
                values![&experiment.0, task, &hash.0, node, expires_ms],
            )?;
            Ok(())
        })
    }

    /// The keys (task, hash) of the uploads staged for `experiment`, oldest first.
    pub fn staged_keys(
        &self,
        experiment: &ExperimentId,
    ) -> Result<Vec<(TaskId, tributary_shared::BlobHash)>, DbError> {
        self.conn()
            .query(
                "SELECT task, hash FROM staged_uploads WHERE experiment = $1
                 ORDER BY staged_ms, task",
                values![&experiment.0],
            )?
            .iter()
            .filter_map(|row| {
                // A key that cannot be read cannot be decided by key either: left for the
                // operator, and it does not hold up the others.
                let key = (|| {
                    let task = u64::try_from(row.int(0)?)
                        .map_err(|_| DbError::Corrupt("a negative staged task".into()))?;
                    let hash = <[u8; 32]>::try_from(row.bytes(1)?.as_slice())
                        .map_err(|_| DbError::Corrupt("a staged hash is not 32 bytes".into()))?;
                    Ok::<_, DbError>((TaskId(task), tributary_shared::BlobHash(hash)))
                })();
                key.map_err(|error| tracing::error!(%error, "a staged upload's key is unreadable"))
                    .ok()
            })
            .map(Ok)
            .collect()
    }

    /// The upload staged for `task` with `hash`: `None` when there is none (decided since),
    /// `Some(Err)` when its row cannot be read back (the reason), for the leader to decide as
    /// lost.
    pub fn staged_upload(
        &self,
        experiment: &ExperimentId,
        task: TaskId,
        hash: tributary_shared::BlobHash,
    ) -> Result<Option<Result<StagedUpload, String>>, DbError> {
        let row = self.conn().query_opt(
            "SELECT signed_header, body, node, refusal_reason, refusal_detail
             FROM staged_uploads WHERE experiment = $1 AND task = $2 AND hash = $3",
            values![&experiment.0, to_i64(task.0, "task")?, &hash.0],
        )?;
        let Some(row) = row else {
            return Ok(None);
        };
        // Whatever is wrong with the row is its own problem, not the read's.
        let staged = (|| {
            let upload: UploadHeader = from_payload(&row.bytes(0)?)
                .map_err(|error| DbError::Corrupt(format!("its header: {error}")))?;
            if upload.header.task != task || upload.header.hash != hash {
                return Err(DbError::Corrupt(
                    "its header names another task or hash".into(),
                ));
            }
            let refusal = match row.opt_text(3)? {
                Some(name) => Some((
                    RejectReason::from_name(&name).ok_or_else(|| {
                        DbError::Corrupt(format!("unknown refusal reason {name:?}"))
                    })?,
                    row.opt_text(4)?.unwrap_or_default(),
                )),
                None => None,
            };
            Ok(StagedUpload {
                upload,
                body: row.opt_bytes(1)?,
                refusal,
                node: row.text(2)?,
            })
        })();
        Ok(Some(staged.map_err(|error| error.to_string())))
    }

    /// The uploads staged for `experiment`, oldest first (rows that cannot be read back are
    /// left out).
    pub fn staged_uploads(&self, experiment: &ExperimentId) -> Result<Vec<StagedUpload>, DbError> {
        let mut out = Vec::new();
        for (task, hash) in self.staged_keys(experiment)? {
            if let Some(Ok(staged)) = self.staged_upload(experiment, task, hash)? {
                out.push(staged);
            }
        }
        Ok(out)
    }

    /// Deletes the staged upload of `task` (in `round`) with `hash` and leaves the task's claim
    /// decided (in the open batch, with the decision on it); whether there was one to delete.
    pub fn unstage_upload(
        &mut self,
        experiment: &ExperimentId,
        task: TaskId,
        round: RoundId,
        hash: tributary_shared::BlobHash,
    ) -> Result<bool, DbError> {
        let (task, round) = (to_i64(task.0, "task")?, to_i64(round.0, "round")?);
        self.atomically(|conn| {
            let deleted = conn.execute(
                "DELETE FROM staged_uploads WHERE experiment = $1 AND task = $2 AND hash = $3",
                values![&experiment.0, task, &hash.0],
            )?;
            if deleted == 1 {
                conn.execute(
                    "INSERT INTO upload_claims (experiment, task, round, hash, node, decided,
                     expires_ms) VALUES ($1, $2, $3, $4, '', 1, 0)
                     ON CONFLICT (experiment, task) DO UPDATE SET decided = 1",
                    values![&experiment.0, task, round, &hash.0],
                )?;
            }
            Ok(deleted == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::db::{Location, NewExperiment};
    use tributary_shared::identity::Identity;
    use tributary_shared::selection::RoundSecret;
    use tributary_shared::wire::{SubmissionHeader, TrainMetrics};
    use tributary_shared::{BlobHash, CertificateHash, ExperimentUid};

    fn upload(trainer: &Identity, task: u64, body: &[u8]) -> UploadHeader {
        trainer
            .sign_submission(SubmissionHeader {
                experiment: ExperimentId("staging".into()),
                experiment_uid: ExperimentUid([1; 32]),
                coordinator: CertificateHash([2; 32]),
                round: RoundId(0),
                task: TaskId(task),
                trainer: trainer.id(),
                hash: BlobHash::of(body),
                byte_len: body.len() as u64,
                sample_count: 3,
                metrics: TrainMetrics::default(),
            })
            .unwrap()
    }

    fn stages_and_unstages(db: &mut Db) {
        use rand::SeedableRng;
        let id = ExperimentId("staging".into());
        db.create_experiment(&NewExperiment {
            id: &id,
            config_json: "{}",
            initial_adapter: BlobHash([9; 32]),
            adapter_len: 1,
            first_secret: &RoundSecret([3; 32]),
            uid: ExperimentUid([1; 32]),
            signer: TrainerId([4; 32]),
            now_ms: 0,
        })
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (alice, bob) = (Identity::generate(&mut rng), Identity::generate(&mut rng));
        for task in [1, 2] {
            db.record_task(&id, RoundId(0), TaskId(task), alice.id(), None, None, 0)
                .unwrap();
        }
        let standing = |db: &Db, task: u64, who: &Identity, round: u64| {
            db.task_standing(&id, TaskId(task), &who.id(), RoundId(round))
                .unwrap()
        };
        assert_eq!(standing(db, 9, &alice, 0), TaskStanding::Unknown);
        assert_eq!(standing(db, 1, &bob, 0), TaskStanding::Others);
        assert_eq!(
            standing(db, 1, &alice, 1),
            TaskStanding::OtherRound(RoundId(0))
        );
        assert_eq!(standing(db, 1, &alice, 0), TaskStanding::Open);

        let passed = StagedUpload {
            upload: upload(&alice, 1, b"one"),
            body: Some(b"one".to_vec()),
            refusal: None,
            node: "b".into(),
        };
        assert!(db.stage_upload(&passed, 10).unwrap());
        assert!(!db.stage_upload(&passed, 11).unwrap(), "one per task");
        assert_eq!(standing(db, 1, &alice, 0), TaskStanding::Taken);
        let refused = StagedUpload {
            upload: upload(&alice, 2, b"two"),
            body: None,
            refusal: Some((RejectReason::HashMismatch, "bytes hash to x".into())),
            node: "c".into(),
        };
        assert!(db.stage_upload(&refused, 12).unwrap());
        assert_eq!(
            db.staged_uploads(&id).unwrap(),
            vec![passed.clone(), refused.clone()]
        );
        assert!(db
            .staged_uploads(&ExperimentId("other".into()))
            .unwrap()
            .is_empty());

        assert_eq!(
            db.staged_keys(&id).unwrap(),
            vec![
                (TaskId(1), passed.upload.header.hash),
                (TaskId(2), refused.upload.header.hash)
            ]
        );
        // A row that does not decode is reported as such, not as an error of the whole read.
        let garbled = StagedUpload {
            upload: upload(&alice, 4, b"four"),
            body: None,
            refusal: None,
            node: "b".into(),
        };
        assert!(db.stage_upload(&garbled, 13).unwrap());
        db.conn()
            .execute(
                "UPDATE staged_uploads SET signed_header = $1 WHERE task = 4",
                values![&b"not a header"[..]],
            )
            .unwrap();
        let four = garbled.upload.header.hash;
        assert!(matches!(
            db.staged_upload(&id, TaskId(4), four).unwrap(),
            Some(Err(_))
        ));
        assert_eq!(db.staged_uploads(&id).unwrap().len(), 2);
        assert!(db.unstage_upload(&id, TaskId(4), RoundId(0), four).unwrap());
        assert!(db.staged_upload(&id, TaskId(4), four).unwrap().is_none());

        let one = passed.upload.header.hash;
        assert!(!db
            .unstage_upload(&id, TaskId(1), RoundId(0), BlobHash([0; 32]))
            .unwrap());
        assert!(db.unstage_upload(&id, TaskId(1), RoundId(0), one).unwrap());
        assert!(
            !db.unstage_upload(&id, TaskId(1), RoundId(0), one).unwrap(),
            "decided once"
        );
        assert_eq!(db.staged_uploads(&id).unwrap(), vec![refused]);
        assert_eq!(standing(db, 1, &alice, 0), TaskStanding::Open);

        // Claims: one receiver per task; a dead receiver's claim expires; a decided upload's
        // claim never does (until its round closes); a node's own failure releases it.
        let claim = |db: &mut Db, task: u64, hash: u8, node: &str, now: u64| {
            db.claim_upload(
                &id,
                TaskId(task),
                RoundId(0),
                BlobHash([hash; 32]),
                node,
                now,
                now + 100,
            )
            .unwrap()
        };
        assert_eq!(
            claim(db, 1, 1, "b", 0),
            Claim::Decided,
            "task 1 was decided"
        );
        assert_eq!(claim(db, 1, 1, "b", 1_000), Claim::Decided, "for good");
        assert_eq!(claim(db, 3, 1, "b", 0), Claim::Taken);
        assert_eq!(claim(db, 3, 2, "c", 50), Claim::Receiving);
        assert_eq!(claim(db, 3, 2, "c", 101), Claim::Taken, "b's claim expired");
        db.release_claim(&id, TaskId(3), BlobHash([1; 32]), "b", 100)
            .unwrap();
        assert_eq!(
            claim(db, 3, 1, "b", 102),
            Claim::Receiving,
            "not b's any more"
        );
        db.release_claim(&id, TaskId(3), BlobHash([2; 32]), "c", 200)
            .unwrap();
        assert_eq!(
            claim(db, 3, 1, "b", 102),
            Claim::Receiving,
            "another claim of c's"
        );
        db.release_claim(&id, TaskId(3), BlobHash([2; 32]), "c", 201)
            .unwrap();
        assert_eq!(claim(db, 3, 1, "b", 102), Claim::Taken, "released");
        db.conn()
            .execute(
                "UPDATE rounds SET closed = 1 WHERE experiment = $1",
                values![&id.0],
            )
            .unwrap();
        assert_eq!(standing(db, 1, &alice, 0), TaskStanding::RoundClosed);
    }

    #[test]
    fn staged_uploads_in_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        stages_and_unstages(&mut Db::open(&dir.path().join("tributary.db")).unwrap());
    }

    #[test]
    fn staged_uploads_in_postgres() {
        let server = crate::store::test_postgres::TestPostgres::start().unwrap();
        let url = server.create_database("staged").unwrap();
        stages_and_unstages(&mut Db::open_at(&Location::Postgres(url)).unwrap());
    }
}
