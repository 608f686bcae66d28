//! The operator's key and signed orders: the fleet-wide pause button.
//!
//! `serve` keeps an ed25519 operator key in `DATA_DIR/operator.key` (owner-readable only). A
//! throttle order is signed with it over the duty and the time it was issued; the coordinator
//! takes it only when the signature is the operator key's, the time is within
//! [`MAX_CLOCK_SKEW_MS`] of its own clock, and it is newer than the last order taken (so a
//! captured order cannot be replayed).

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tributary_shared::identity::{self, Identity, OPERATOR_DOMAIN};
use tributary_shared::wire::FULL_DUTY_PPM;
use tributary_shared::TrainerId;

/// How far in the past an order's time may be.
pub const MAX_CLOCK_SKEW_MS: u64 = 120_000;

/// How far in the future an order's time may be (small: a later order from a correct clock must
/// not be refused as older than one from a clock running ahead).
pub const MAX_FUTURE_SKEW_MS: u64 = 5_000;

/// The operator key file inside a data directory.
pub const KEY_FILE: &str = "operator.key";

/// The coordinator's ledger key file inside a data directory: it signs every ledger entry.
pub const LEDGER_KEY_FILE: &str = "ledger.key";

/// Reads the operator key in `data_dir`, or makes one.
pub fn load_or_create(data_dir: &Path) -> std::io::Result<Identity> {
    load_or_create_key(&data_dir.join(KEY_FILE))
}

/// Reads the ed25519 key at `path` (hex, owner-readable only), or makes one.
pub fn load_or_create_key(path: &Path) -> std::io::Result<Identity> {
    let path = path.to_owned();
    match std::fs::read_to_string(&path) {
        Ok(text) => Identity::from_secret_hex(text.trim()).map_err(|error| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {error}", path.display()),
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let identity = Identity::generate(&mut rand::rngs::OsRng);
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path)?;
            writeln!(file, "{}", identity.secret_hex())?;
            file.sync_all()?;
            Ok(identity)
        }
        Err(error) => Err(error),
    }
}

/// A signed order to change the fleet's duty cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleOrder {
    /// Allowed duty cycle in millionths (0 pauses, 1,000,000 resumes fully).
    pub duty_ppm: u32,
    /// When it was issued, milliseconds since the Unix epoch.
    pub issued_ms: u64,
    /// The operator's signature, hex.
    pub signature: String,
}

/// Why an order was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// Duty above 100 %.
    #[error("duty {0} ppm is above 1,000,000")]
    Duty(u32),
    /// Not signed by the operator key.
    #[error("the signature is not the operator key's")]
    Signature,
    /// Too far from the coordinator's clock.
    #[error("issued {0} ms away from the coordinator's clock (at most {MAX_CLOCK_SKEW_MS} before it, {MAX_FUTURE_SKEW_MS} after)")]
    Stale(u64),
    /// Not newer than the last order taken.
    #[error("not newer than the last order taken (a replay?)")]
    Replayed,
}

impl ThrottleOrder {
    /// Signs an order with the operator key.
    pub fn sign(operator: &Identity, duty_ppm: u32, issued_ms: u64) -> Self {
        let signature = operator.sign(
            OPERATOR_DOMAIN,
            &identity::throttle_message(duty_ppm, issued_ms),
        );
        Self {
            duty_ppm,
            issued_ms,
            signature: hex::encode(signature),
        }
    }

    /// Checks the order against the operator's public key, the clock and the last order taken.
    pub fn verify(
        &self,
        operator: &TrainerId,
        now_ms: u64,
        last_issued_ms: u64,
    ) -> Result<(), OrderError> {
        if self.duty_ppm > FULL_DUTY_PPM {
            return Err(OrderError::Duty(self.duty_ppm));
        }
        let signature = hex::decode(&self.signature).map_err(|_| OrderError::Signature)?;
        identity::verify(
            operator,
            OPERATOR_DOMAIN,
            &identity::throttle_message(self.duty_ppm, self.issued_ms),
            &signature,
        )
        .map_err(|_| OrderError::Signature)?;
        let skew = now_ms.abs_diff(self.issued_ms);
        let limit = if self.issued_ms > now_ms {
            MAX_FUTURE_SKEW_MS
        } else {
            MAX_CLOCK_SKEW_MS
        };
        if skew > limit {
            return Err(OrderError::Stale(skew));
        }
        if self.issued_ms <= last_issued_ms {
            return Err(OrderError::Replayed);
        }
        Ok(())
    }
}

/// The last throttle order a coordinator took: the one recorded in the database, or, for a
/// data directory from before orders were kept there, the duty and order time its files hold.
pub fn last_order(
    db: &crate::store::db::Db,
    data_dir: &Path,
) -> Result<crate::store::fleet::FleetOrder, crate::store::db::DbError> {
    Ok(db
        .fleet_order()?
        .unwrap_or_else(|| crate::store::fleet::FleetOrder {
            duty_ppm: load_duty(data_dir),
            issued_ms: load_last_order(data_dir),
        }))
}

/// The fleet duty kept in `DATA_DIR/fleet-duty` by coordinators before orders were kept in the
/// database.
pub fn load_duty(data_dir: &Path) -> u32 {
    std::fs::read_to_string(data_dir.join("fleet-duty"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .map_or(FULL_DUTY_PPM, |duty: u32| duty.min(FULL_DUTY_PPM))
}

/// The issue time of the last order taken, kept in `DATA_DIR/operator-last-order` by
/// coordinators before orders were kept in the database.
pub fn load_last_order(data_dir: &Path) -> u64 {
    std::fs::read_to_string(data_dir.join("operator-last-order"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_need_the_operator_key_a_fresh_time_and_no_replay() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let operator = Identity::generate(&mut rng);
        let other = Identity::generate(&mut rng);
        let now = 1_700_000_000_000;
        let order = ThrottleOrder::sign(&operator, 50_000, now);
        assert_eq!(order.verify(&operator.id(), now + 10, 0), Ok(()));
        assert_eq!(
            order.verify(&other.id(), now, 0),
            Err(OrderError::Signature)
        );
        assert_eq!(
            order.verify(&operator.id(), now, now),
            Err(OrderError::Replayed)
        );
        assert!(matches!(
            order.verify(&operator.id(), now + MAX_CLOCK_SKEW_MS + 1, 0),
            Err(OrderError::Stale(_))
        ));
        // From the future only a little.
        assert!(matches!(
            order.verify(&operator.id(), now - MAX_FUTURE_SKEW_MS - 1, 0),
            Err(OrderError::Stale(_))
        ));
        let mut forged = order.clone();
        forged.duty_ppm = 1_000_000;
        assert_eq!(
            forged.verify(&operator.id(), now, 0),
            Err(OrderError::Signature)
        );
        let too_much = ThrottleOrder::sign(&operator, 2_000_000, now);
        assert_eq!(
            too_much.verify(&operator.id(), now, 0),
            Err(OrderError::Duty(2_000_000))
        );
    }

    #[test]
    fn the_last_order_comes_from_the_database_or_else_the_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = crate::store::db::Db::open_in(dir.path()).unwrap();
        let order = |duty_ppm, issued_ms| crate::store::fleet::FleetOrder {
            duty_ppm,
            issued_ms,
        };
        assert_eq!(
            last_order(&db, dir.path()).unwrap(),
            order(FULL_DUTY_PPM, 0)
        );
        // A data directory from before orders were kept in the database.
        std::fs::write(dir.path().join("fleet-duty"), "0\n").unwrap();
        std::fs::write(dir.path().join("operator-last-order"), "42\n").unwrap();
        assert_eq!(last_order(&db, dir.path()).unwrap(), order(0, 42));
        db.record_fleet_order(order(50_000, 43)).unwrap();
        assert_eq!(last_order(&db, dir.path()).unwrap(), order(50_000, 43));
        let key = load_or_create(dir.path()).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap().id(), key.id());
    }
}
