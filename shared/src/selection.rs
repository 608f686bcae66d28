//! Per-round randomness that no trainer can know before its round is drawn, and everything
//! derived from it: the order in which trainers are selected and the seeds of their tasks.
//!
//! Each round has a fresh 32-byte secret from the operating system's CSPRNG. Its commitment
//! ([`RoundSecret::commitment`]) is published before the round (round 0's with the experiment,
//! round r+1's in round r's ledger entry); the secret itself is revealed in the round's own
//! entry. So a trainer cannot grind keys for a good rank (its rank depends on a secret it has not
//! seen), and the coordinator cannot pick the secret after seeing who connected (it committed to
//! it first). Anyone can check afterwards that the revealed secret matches its commitment and
//! recompute every rank and seed.
//!
//! ```
//! use tributary_shared::selection::RoundSecret;
//! use tributary_shared::{TaskId, TrainerId};
//!
//! let secret = RoundSecret([7; 32]);
//! let commitment = secret.commitment();
//! assert!(secret.matches(&commitment));
//! assert_ne!(secret.rank(&TrainerId([1; 32])), RoundSecret([8; 32]).rank(&TrainerId([1; 32])));
//! assert_eq!(secret.task_seed(TaskId(3)), secret.task_seed(TaskId(3)));
//! ```

use std::fmt;

use crate::ids::{BlobHash, TaskId, TrainerId};

/// One round's secret; see the module docs. Its `Debug` form hides it (it must not reach logs
/// before it is revealed).
/// Serialized as hex in JSON and as raw bytes in bincode, like the ids.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RoundSecret(pub [u8; 32]);

impl RoundSecret {
    /// A fresh secret from `rng` (the coordinator passes the operating system's CSPRNG).
    pub fn generate(rng: &mut (impl rand::RngCore + rand::CryptoRng)) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The commitment published before the round.
    pub fn commitment(&self) -> BlobHash {
        self.derive("tributary round secret commitment v1", &[])
    }

    /// True when this secret is the one `commitment` committed to.
    pub fn matches(&self, commitment: &BlobHash) -> bool {
        self.commitment() == *commitment
    }

    /// A trainer's place in the round's selection order (lower goes first).
    pub fn rank(&self, trainer: &TrainerId) -> [u8; 32] {
        self.derive("tributary selection rank v1", &trainer.0).0
    }

    /// A trainer's place in the order evaluators of `adapter` are drawn in (lower first).
    pub fn evaluator_rank(&self, adapter: &BlobHash, trainer: &TrainerId) -> [u8; 32] {
        let mut input = [0u8; 64];
        input[..32].copy_from_slice(&adapter.0);
        input[32..].copy_from_slice(&trainer.0);
        self.derive("tributary evaluator rank v1", &input).0
    }

    /// The training seed of a task of this round.
    pub fn task_seed(&self, task: TaskId) -> u64 {
        let hash = self.derive("tributary task seed v1", &task.0.to_le_bytes());
        u64::from_le_bytes(hash.0[..8].try_into().expect("32 bytes hold 8"))
    }

    /// Whether `task` of this round is also given, unannounced, to a second trainer: true for
    /// a fraction `rate` of tasks (clamped to 0..=1), decided by a keyed hash of the task id, so
    /// nobody can tell before the round which tasks are checked, and anyone can confirm the
    /// choice once the secret is revealed.
    pub fn replicates(&self, task: TaskId, rate: f64) -> bool {
        self.draws("tributary replicated task v1", task, rate)
    }

    /// Whether the delta of counted task `task` gets a loss check, at rate `rate`: like
    /// [`RoundSecret::replicates`], with an independent draw.
    pub fn loss_checks(&self, task: TaskId, rate: f64) -> bool {
        self.draws("tributary loss-checked task v1", task, rate)
    }

    /// A keyed uniform draw in `[0, 1)` for `task` under `context`, below `rate`.
    fn draws(&self, context: &str, task: TaskId, rate: f64) -> bool {
        if rate <= 0.0 || rate.is_nan() {
            return false;
        }
        let hash = self.derive(context, &task.0.to_le_bytes());
        let draw = u64::from_le_bytes(hash.0[..8].try_into().expect("32 bytes hold 8"));
        // A uniform draw in [0, 1) with 53 bits, compared in f64.
        ((draw >> 11) as f64 / (1u64 << 53) as f64) < rate
    }

    fn derive(&self, context: &str, input: &[u8]) -> BlobHash {
        let mut hasher = blake3::Hasher::new_derive_key(context);
        hasher.update(&self.0);
        hasher.update(input);
        BlobHash::from(hasher.finalize())
    }
}

impl fmt::Debug for RoundSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RoundSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_matches_only_its_own_commitment_and_ranks_differ_per_secret() {
        let a = RoundSecret([1; 32]);
        let b = RoundSecret([2; 32]);
        assert!(a.matches(&a.commitment()));
        assert!(!b.matches(&a.commitment()));
        let trainers: Vec<TrainerId> = (0..50u8).map(|n| TrainerId([n; 32])).collect();
        let order = |secret: &RoundSecret| {
            let mut sorted = trainers.clone();
            sorted.sort_by_key(|t| secret.rank(t));
            sorted
        };
        assert_ne!(order(&a), order(&b));
        assert_ne!(a.task_seed(TaskId(1)), a.task_seed(TaskId(2)));
        assert_eq!(format!("{a:?}"), "RoundSecret(..)");
    }

    #[test]
    fn about_the_configured_share_of_tasks_is_replicated() {
        let secret = RoundSecret([7; 32]);
        let replicated = (0..10_000u64)
            .filter(|&task| secret.replicates(TaskId(task), 0.1))
            .count();
        assert!((900..1100).contains(&replicated), "{replicated}");
        assert!((0..1000u64).all(|task| !secret.replicates(TaskId(task), 0.0)));
        assert!((0..1000u64).all(|task| secret.replicates(TaskId(task), 1.0)));
        let other = RoundSecret([8; 32]);
        assert!((0..1000u64)
            .any(|t| secret.replicates(TaskId(t), 0.5) != other.replicates(TaskId(t), 0.5)));
        // The loss-check draw is independent of the replica draw.
        let checked = (0..10_000u64)
            .filter(|&task| secret.loss_checks(TaskId(task), 0.1))
            .count();
        assert!((900..1100).contains(&checked), "{checked}");
        let both = (0..10_000u64)
            .filter(|&t| secret.loss_checks(TaskId(t), 0.5) && secret.replicates(TaskId(t), 0.5))
            .count();
        assert!((2300..2700).contains(&both), "{both}");
    }
}
