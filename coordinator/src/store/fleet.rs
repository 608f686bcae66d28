//! The operator's last throttle order (the pause button's setting), kept in the database so
//! that every node of a cluster, and above all a node that takes over the lead, applies it and
//! refuses a replay of an older order.

use crate::store::db::{Db, DbError};
use crate::store::sql::values;

/// The table of operator orders. Like the lease table it is coordination state, not experiment
/// data, outside the versioned schema: created (if missing) under the schema's lock.
pub(crate) const FLEET_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS fleet_orders (
    name TEXT PRIMARY KEY,
    duty_ppm INTEGER NOT NULL,
    issued_ms INTEGER NOT NULL
);
";

/// The row holding the throttle order.
const THROTTLE: &str = "throttle";

/// A throttle order as taken: the fleet's duty and when the operator issued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetOrder {
    /// Allowed duty cycle, in millionths.
    pub duty_ppm: u32,
    /// The order's issue time (ms since the Unix epoch, the operator's clock).
    pub issued_ms: u64,
}

impl Db {
    /// The last throttle order taken, if any.
    pub fn fleet_order(&self) -> Result<Option<FleetOrder>, DbError> {
        let row = self.conn().query_opt(
            "SELECT duty_ppm, issued_ms FROM fleet_orders WHERE name = $1",
            values![THROTTLE],
        )?;
        row.map(|row| {
            let number = |index: usize| -> Result<u64, DbError> {
                u64::try_from(row.int(index)?)
                    .map_err(|_| DbError::Corrupt("a negative number in fleet_orders".into()))
            };
            Ok(FleetOrder {
                duty_ppm: u32::try_from(number(0)?).unwrap_or(u32::MAX),
                issued_ms: number(1)?,
            })
        })
        .transpose()
    }

    /// Records `order` (in the open batch, or on its own) unless a newer one is recorded;
    /// whether it was.
    pub fn record_fleet_order(&mut self, order: FleetOrder) -> Result<bool, DbError> {
        let issued = i64::try_from(order.issued_ms)
            .map_err(|_| DbError::Corrupt(format!("order time {} too large", order.issued_ms)))?;
        self.atomically(|conn| {
            let changed = conn.execute(
                "INSERT INTO fleet_orders (name, duty_ppm, issued_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET duty_ppm = excluded.duty_ppm, \
                 issued_ms = excluded.issued_ms WHERE fleet_orders.issued_ms < excluded.issued_ms",
                values![THROTTLE, i64::from(order.duty_ppm), issued],
            )?;
            Ok(changed == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_newer_order_replaces_the_recorded_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("tributary.db")).unwrap();
        assert_eq!(db.fleet_order().unwrap(), None);
        let paused = FleetOrder {
            duty_ppm: 0,
            issued_ms: 2_000,
        };
        assert!(db.record_fleet_order(paused).unwrap());
        let older = FleetOrder {
            duty_ppm: 1_000_000,
            issued_ms: 1_000,
        };
        assert!(!db.record_fleet_order(older).unwrap());
        assert!(!db.record_fleet_order(paused).unwrap());
        assert_eq!(db.fleet_order().unwrap(), Some(paused));
        let resumed = FleetOrder {
            duty_ppm: 1_000_000,
            issued_ms: 3_000,
        };
        assert!(db.record_fleet_order(resumed).unwrap());
        drop(db);
        let db = Db::open(&dir.path().join("tributary.db")).unwrap();
        assert_eq!(db.fleet_order().unwrap(), Some(resumed));
    }
}
