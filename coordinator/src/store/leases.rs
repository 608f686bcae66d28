//! The leader lease's row (`leases`) and the fence every leader batch checks. What the record
//! means and when to touch it is [`crate::lease`]'s business; this is only its storage.

use crate::lease::LeaseRecord;
use crate::store::db::{Db, DbError};
use crate::store::sql::{values, Connection};

/// The lease that picks the node running the round engine.
pub const LEADER: &str = "leader";

/// The lease table. Not part of the versioned experiment schema: it holds coordination
/// state, not experiment data, and is created (if missing) under the schema's lock.
pub(crate) const LEASE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    beat INTEGER NOT NULL,
    address TEXT NOT NULL
);
";

/// Which experiment each lease's holder runs: standby nodes stage uploads for that one. Beside
/// the lease rather than in it, so databases made before it existed need no migration.
pub(crate) const LED_EXPERIMENT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS led_experiments (
    lease TEXT PRIMARY KEY,
    experiment TEXT NOT NULL
);
";

/// A lease the writer must still hold for its batches to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lease's name.
    pub name: String,
    /// The holding node.
    pub holder: String,
    /// The token it was taken with.
    pub token: i64,
}

impl Fence {
    /// Checks, inside the open transaction, that the lease is still held with this token.
    /// The statement locks the lease row until the transaction ends, so a takeover (which
    /// updates that row) waits for this commit and cannot slip in between check and commit.
    pub(crate) fn check(&self, conn: &Connection) -> Result<(), DbError> {
        let held = conn.execute(
            "UPDATE leases SET beat = beat WHERE name = $1 AND holder = $2 AND token = $3",
            values![self.name.as_str(), self.holder.as_str(), self.token],
        )?;
        if held == 1 {
            Ok(())
        } else {
            Err(DbError::Fenced { token: self.token })
        }
    }
}

impl Db {
    /// Reads the lease `name`.
    pub fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, DbError> {
        let row = self.conn().query_opt(
            "SELECT holder, token, beat, address FROM leases WHERE name = $1",
            values![name],
        )?;
        row.map(|row| {
            Ok(LeaseRecord {
                holder: row.text(0)?,
                token: row.int(1)?,
                beat: row.int(2)?,
                address: row.text(3)?,
            })
        })
        .transpose()
    }

    /// Takes the lease `name` for `holder` if it is still exactly `seen` (`None`: there is no
    /// record yet). Returns the new fencing token, or `None` when another node changed the
    /// record first.
    pub fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        address: &str,
        seen: Option<&LeaseRecord>,
    ) -> Result<Option<i64>, DbError> {
        match seen {
            None => {
                let inserted = self.conn().execute(
                    "INSERT INTO leases (name, holder, token, beat, address) \
                     VALUES ($1, $2, 1, 0, $3) ON CONFLICT (name) DO NOTHING",
                    values![name, holder, address],
                )?;
                Ok((inserted == 1).then_some(1))
            }
            Some(seen) => {
                let updated = self.conn().execute(
                    "UPDATE leases SET holder = $2, token = token + 1, beat = 0, address = $3 \
                     WHERE name = $1 AND holder = $4 AND token = $5 AND beat = $6",
                    values![
                        name,
                        holder,
                        address,
                        seen.holder.as_str(),
                        seen.token,
                        seen.beat
                    ],
                )?;
                Ok((updated == 1).then_some(seen.token + 1))
            }
        }
    }

    /// Renews the lease; `false` when it is no longer held with `token`.
    pub fn renew_lease(&self, name: &str, holder: &str, token: i64) -> Result<bool, DbError> {
        let updated = self.conn().execute(
            "UPDATE leases SET beat = beat + 1 WHERE name = $1 AND holder = $2 AND token = $3",
            values![name, holder, token],
        )?;
        Ok(updated == 1)
    }

    /// Records that the holder of lease `name` runs `experiment`, and drops the uploads staged
    /// for other experiments with their claims: no leader will read them, and their bodies
    /// would stay collection roots (committed on its own, and only while this node holds the
    /// lease when a fence is set).
    pub fn record_led_experiment(&mut self, name: &str, experiment: &str) -> Result<(), DbError> {
        self.atomically(|conn| {
            conn.execute(
                "INSERT INTO led_experiments (lease, experiment) VALUES ($1, $2)
                 ON CONFLICT (lease) DO UPDATE SET experiment = excluded.experiment",
                values![name, experiment],
            )?;
            conn.execute(
                "DELETE FROM staged_uploads WHERE experiment <> $1",
                values![experiment],
            )?;
            conn.execute(
                "DELETE FROM upload_claims WHERE experiment <> $1",
                values![experiment],
            )?;
            Ok(())
        })
    }

    /// The experiment the holder of lease `name` last said it runs.
    pub fn led_experiment(&self, name: &str) -> Result<Option<String>, DbError> {
        self.conn()
            .query_opt(
                "SELECT experiment FROM led_experiments WHERE lease = $1",
                values![name],
            )?
            .map(|row| row.text(0))
            .transpose()
    }

    /// Lets the lease go, so a standby node takes it at once; `false` when it was no longer
    /// held with `token`.
    pub fn release_lease(&self, name: &str, holder: &str, token: i64) -> Result<bool, DbError> {
        let updated = self.conn().execute(
            "UPDATE leases SET holder = '', beat = beat + 1 \
             WHERE name = $1 AND holder = $2 AND token = $3",
            values![name, holder, token],
        )?;
        Ok(updated == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::db::Location;

    fn records_the_led_experiment(db: &mut Db) {
        let staged = |db: &Db, experiment: &str| {
            let count = |table: &str| {
                db.conn()
                    .query_one(
                        &format!("SELECT COUNT(*) FROM {table} WHERE experiment = $1"),
                        values![experiment],
                    )
                    .unwrap()
                    .int(0)
                    .unwrap()
            };
            (count("staged_uploads"), count("upload_claims"))
        };
        for (experiment, task) in [("first", 1i64), ("second", 2)] {
            db.conn()
                .execute(
                    "INSERT INTO staged_uploads (experiment, task, round, hash, signed_header,
                     node, staged_ms) VALUES ($1, $2, 0, $3, $3, 'b', 0)",
                    values![experiment, task, &[7u8; 32][..]],
                )
                .unwrap();
            db.conn()
                .execute(
                    "INSERT INTO upload_claims (experiment, task, round, hash, node, decided,
                     expires_ms) VALUES ($1, $2, 0, $3, 'b', 0, 0)",
                    values![experiment, task, &[7u8; 32][..]],
                )
                .unwrap();
        }
        assert_eq!(db.led_experiment(LEADER).unwrap(), None);
        db.record_led_experiment(LEADER, "first").unwrap();
        assert_eq!(db.led_experiment(LEADER).unwrap().as_deref(), Some("first"));
        assert_eq!(staged(db, "first"), (1, 1), "its own are kept");
        assert_eq!(staged(db, "second"), (0, 0), "no leader reads the others");
        db.record_led_experiment(LEADER, "second").unwrap();
        assert_eq!(
            db.led_experiment(LEADER).unwrap().as_deref(),
            Some("second")
        );
        assert_eq!(staged(db, "first"), (0, 0));
        assert_eq!(db.led_experiment("another lease").unwrap(), None);
    }

    #[test]
    fn the_led_experiment_in_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        records_the_led_experiment(&mut Db::open(&dir.path().join("tributary.db")).unwrap());
    }

    #[test]
    fn the_led_experiment_in_postgres() {
        let server = crate::store::test_postgres::TestPostgres::start().unwrap();
        let url = server.create_database("led").unwrap();
        records_the_led_experiment(&mut Db::open_at(&Location::Postgres(url)).unwrap());
    }
}
