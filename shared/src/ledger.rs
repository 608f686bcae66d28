//! The append-only, hash-linked ledger: one entry per closed round.
//!
//! An entry's hash is the blake3 of its canonical bytes ([`LedgerEntry::to_bytes`]); each entry
//! names the previous entry's hash, so changing any past round changes every later hash.
//!
//! # Versions
//! Version 1 entries are the bincode encoding of [`LedgerEntry`] without its `verification`.
//! Version 2 entries, written when a round has a verification record, are
//! [`ENTRY_V2_MAGIC`] followed by the encoding of the version 1 fields and then of the
//! [`RoundVerification`]. A version 1 entry starts with the varint length of the experiment name,
//! whose first byte is never `0xff`, so the two cannot be confused, and an entry stored before
//! version 2 existed keeps its bytes and therefore its hash.
//! Version 3 entries ([`ENTRY_V3_MAGIC`]) hold the whole [`RoundVerification`], with its
//! barred deltas and loss checks; version 2 holds only its screening, replica checks and
//! referees. The encoding follows the content: a record whose barred deltas and loss checks
//! are empty is written as version 2, so entries stored by a version 2 coordinator re-encode
//! to the same bytes (and hashes, and signed bytes).

use serde::{Deserialize, Serialize};

use crate::frame::{from_payload_unbounded, to_payload};
use crate::identity::{verify, verify_submission, Identity, IdentityError, LEDGER_DOMAIN};
use crate::ids::{
    BlobHash, CertificateHash, ExperimentId, ExperimentUid, RoundId, TaskId, TrainerId,
};
use crate::selection::RoundSecret;
use crate::wire::{RejectReason, SubmissionHeader, TrainMetrics, UploadHeader};

/// The record of one closed round, signed by the coordinator that ran it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The experiment.
    pub experiment: ExperimentId,
    /// The experiment's random id, which every submission signed.
    pub experiment_uid: ExperimentUid,
    /// The certificate hash of the coordinator instance, which every submission signed.
    pub coordinator: CertificateHash,
    /// blake3 of the experiment's configuration as stored (its canonical JSON): the rules the
    /// round was run by.
    pub config_hash: BlobHash,
    /// The round.
    pub round: RoundId,
    /// Hash of the previous round's entry; `None` for round 0.
    pub previous: Option<BlobHash>,
    /// The adapter the round started from.
    pub adapter_before: BlobHash,
    /// The adapter after the server step.
    pub adapter_after: BlobHash,
    /// Hash of the aggregated delta (f32 canonical encoding).
    pub aggregate: BlobHash,
    /// The server optimizer state after this round, when the optimizer has one.
    pub optimizer_state: Option<BlobHash>,
    /// Accepted deltas, sorted by hash (the aggregation order).
    pub accepted: Vec<AcceptedDelta>,
    /// Refused submissions, in the order they were refused.
    pub rejected: Vec<RejectedSubmission>,
    /// Round figures.
    pub metrics: RoundMetrics,
    /// The commitment to this round's secret, published before the round (round 0's with the
    /// experiment, later ones as the previous entry's `next_commitment`).
    pub secret_commitment: BlobHash,
    /// This round's secret, revealed: it ordered the selection and seeded the tasks
    /// ([`crate::selection`]).
    pub secret: RoundSecret,
    /// The commitment to the next round's secret.
    pub next_commitment: BlobHash,
    /// The coordinator's ledger key.
    pub signer: TrainerId,
    /// Its ed25519 signature over the entry without this field ([`LedgerEntry::signed_bytes`]).
    pub signature: Vec<u8>,
    /// How the round's deltas were checked (version 2 entries; `None` in version 1 entries,
    /// written before verification existed or for rounds with nothing to record).
    #[serde(skip)]
    pub verification: Option<RoundVerification>,
}

/// The first bytes of a version 2 entry (see the module docs).
pub const ENTRY_V2_MAGIC: [u8; 4] = [0xff, b'T', b'L', 2];
/// The first bytes of a version 3 entry (see the module docs).
pub const ENTRY_V3_MAGIC: [u8; 4] = [0xff, b'T', b'L', 3];

/// The part of a [`RoundVerification`] a version 2 entry holds, in its field order.
type VerificationV2 = (
    Vec<crate::aggregate::Screening>,
    Vec<ReplicaCheck>,
    Vec<RefereeCheck>,
);

/// The verification record of one round: what was checked, the numbers, and the decisions.
/// Everything in it is re-derived from the round's stored deltas by `verify`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundVerification {
    /// Every aggregated delta's screening (norm, clipping, agreement with the majority,
    /// per-tensor ratio, and whether it was kept), in aggregation order.
    pub screening: Vec<crate::aggregate::Screening>,
    /// Replicated tasks whose two deltas both arrived, in the order of the counted delta's hash.
    pub checks: Vec<ReplicaCheck>,
    /// Disputes of earlier rounds settled by a third trainer in this round, in the order of
    /// (disputed round, counted delta's hash).
    pub referees: Vec<RefereeCheck>,
    /// Accepted deltas kept out of the aggregate because their trainer was flagged by a
    /// referee, in an earlier entry or in this one's `referees`, in hash order. A flagged
    /// trainer's later work does not count.
    pub barred: Vec<BarredDelta>,
    /// Loss checks settled while this round was open, in the order of (round, delta hash).
    pub loss_checks: Vec<LossCheck>,
}

/// A loss check (see [`crate::loss_check`]): evaluators scored a counted delta's start adapter
/// with and without it on the sequences its task trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossCheck {
    /// The round the delta was counted in (this entry's or an earlier one).
    pub round: RoundId,
    /// The delta.
    pub delta: BlobHash,
    /// Its trainer.
    pub trainer: TrainerId,
    /// The answers, in evaluator order.
    pub answers: Vec<crate::loss_check::LossAnswer>,
    /// Evaluators asked for.
    pub wanted: u32,
    /// The median improvement (`baseline − loss`, nats per token).
    pub improvement: f64,
    /// The decision.
    pub outcome: crate::loss_check::LossOutcome,
    /// Whether it kept the delta out of this entry's aggregate (a delta of this round that
    /// did not lower the loss).
    pub withheld: bool,
}

impl LossCheck {
    /// The trainer this check found at fault, if any.
    pub fn flagged(&self) -> Option<TrainerId> {
        (self.outcome == crate::loss_check::LossOutcome::NotLowered).then_some(self.trainer)
    }
}

/// An accepted delta whose trainer had been flagged (see [`RoundVerification::barred`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarredDelta {
    /// The delta.
    pub hash: BlobHash,
    /// Its trainer.
    pub trainer: TrainerId,
}

impl RoundVerification {
    /// Whether there is nothing to record.
    pub fn is_empty(&self) -> bool {
        self.screening.is_empty()
            && self.checks.is_empty()
            && self.referees.is_empty()
            && self.barred.is_empty()
            && self.loss_checks.is_empty()
    }

    /// Trainers this round's referees and loss checks found at fault.
    pub fn flagged(&self) -> impl Iterator<Item = TrainerId> + '_ {
        self.referees
            .iter()
            .filter_map(RefereeCheck::flagged)
            .chain(self.loss_checks.iter().filter_map(LossCheck::flagged))
    }

    /// Hashes of accepted deltas this record keeps out of the aggregate: those whose replica
    /// disagreed, those that failed a loss check, then those of flagged trainers (each once).
    pub fn withheld(&self) -> impl Iterator<Item = BlobHash> + '_ {
        self.disputed()
            .chain(
                self.loss_checks
                    .iter()
                    .filter(|check| check.withheld)
                    .map(|check| check.delta),
            )
            .chain(self.barred.iter().map(|barred| barred.hash))
    }

    /// Hashes of counted deltas whose replica disagreed.
    pub fn disputed(&self) -> impl Iterator<Item = BlobHash> + '_ {
        self.checks
            .iter()
            .filter(|check| check.verdict != CheckVerdict::Agree)
            .map(|check| check.counted)
    }
}

/// One spot re-execution: a task was also given, unannounced, to a second trainer with the same
/// start adapter, data, seed and hyper-parameters; the two deltas are compared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaCheck {
    /// The delta that arrived first, listed in the entry's `accepted`.
    pub counted: BlobHash,
    /// The other delta of the pair, with what its trainer signed.
    pub replica: AcceptedDelta,
    /// Relative L2 distance `‖a − b‖ / max(‖a‖, ‖b‖)` (0 for two zero deltas).
    pub distance: f64,
    /// Cosine similarity of the two deltas (0 when either is zero).
    pub cosine: f64,
    /// The decision under the experiment's tolerance.
    pub verdict: CheckVerdict,
}

/// A dispute (a replica check that disagreed) settled by a third trainer: the referee ran the
/// same task (the disputed round's start adapter, data, seed and hyper-parameters) in a later
/// round, and its delta is compared with both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefereeCheck {
    /// The round of the dispute.
    pub round: RoundId,
    /// The disputed counted delta and its trainer.
    pub counted: BlobHash,
    /// Who sent it.
    pub counted_trainer: TrainerId,
    /// The disputed replica and its trainer.
    pub replica: BlobHash,
    /// Who sent it.
    pub replica_trainer: TrainerId,
    /// The referee's delta, with what its trainer signed (for this entry's round).
    pub referee: AcceptedDelta,
    /// Relative L2 distance from the referee's delta to the counted one.
    pub distance_to_counted: f64,
    /// Relative L2 distance from the referee's delta to the replica.
    pub distance_to_replica: f64,
    /// The decision.
    pub outcome: RefereeOutcome,
}

impl RefereeCheck {
    /// The trainer found at fault, if any.
    pub fn flagged(&self) -> Option<TrainerId> {
        match self.outcome {
            RefereeOutcome::CountedFlagged => Some(self.counted_trainer),
            RefereeOutcome::ReplicaFlagged => Some(self.replica_trainer),
            RefereeOutcome::Inconclusive => None,
        }
    }

    /// The trainer the referee agreed with, if any.
    pub fn cleared(&self) -> Option<TrainerId> {
        match self.outcome {
            RefereeOutcome::CountedFlagged => Some(self.replica_trainer),
            RefereeOutcome::ReplicaFlagged => Some(self.counted_trainer),
            RefereeOutcome::Inconclusive => None,
        }
    }
}

/// What a referee decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefereeOutcome {
    /// The referee agrees with the replica only: the counted delta's trainer is flagged.
    CountedFlagged,
    /// The referee agrees with the counted delta only: the replica's trainer is flagged.
    ReplicaFlagged,
    /// The referee agrees with both or neither: nobody is flagged.
    Inconclusive,
}

/// What a replica check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckVerdict {
    /// Within tolerance: the counted delta counts, and both trainers' work is verified.
    Agree,
    /// Outside tolerance: one of the two did not do the task as specified. The counted delta is
    /// withheld from the aggregate until a referee decides which.
    Disagree,
}

/// One delta that counted, with everything its trainer signed, so anyone holding the ledger can
/// check the signature ([`verify_signatures`]) without the coordinator's database.
///
/// Fields named `reported_*` and `claimed_*` are the trainer's word, kept because it signed
/// them; nothing is decided on them except that a claim can lower the weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcceptedDelta {
    /// The delta's blob hash.
    pub hash: BlobHash,
    /// Who sent it.
    pub trainer: TrainerId,
    /// Its FedAvg weight, derived by the coordinator: what its task asked for
    /// ([`justified_weight`]), lowered by the trainer's claim when the claim is smaller.
    pub weight: u64,
    /// The sample count the trainer claimed (self-reported).
    pub claimed_samples: u64,
    /// The trainer's mean training loss (self-reported).
    pub reported_train_loss: f32,
    /// Encoded size in bytes.
    pub byte_len: u64,
    /// The task it answered.
    pub task: TaskId,
    /// Local steps (self-reported).
    pub reported_steps: u32,
    /// Tokens processed (self-reported).
    pub reported_tokens: u64,
    /// Local training time in milliseconds (self-reported).
    pub reported_train_ms: u64,
    /// The trainer's ed25519 signature over the submission header.
    pub signature: Vec<u8>,
}

/// The FedAvg weight of a delta: what its task asked for (`task_budget`), lowered by the
/// trainer's claim when that is smaller, never raised by it.
pub fn justified_weight(claimed: u64, task_budget: u64) -> u64 {
    claimed.min(task_budget).max(1)
}

impl AcceptedDelta {
    /// The record of a signed upload answering a task worth `task_budget`.
    pub fn from_upload(upload: &UploadHeader, task_budget: u64) -> Self {
        let header = &upload.header;
        Self {
            hash: header.hash,
            trainer: header.trainer,
            weight: justified_weight(header.sample_count, task_budget),
            claimed_samples: header.sample_count,
            reported_train_loss: header.metrics.train_loss,
            byte_len: header.byte_len,
            task: header.task,
            reported_steps: header.metrics.steps,
            reported_tokens: header.metrics.tokens,
            reported_train_ms: header.metrics.train_ms,
            signature: upload.signature.clone(),
        }
    }

    /// The signed upload header this record of `entry` stands for.
    pub fn upload(&self, entry: &LedgerEntry) -> UploadHeader {
        UploadHeader {
            header: SubmissionHeader {
                experiment: entry.experiment.clone(),
                experiment_uid: entry.experiment_uid,
                coordinator: entry.coordinator,
                round: entry.round,
                task: self.task,
                trainer: self.trainer,
                hash: self.hash,
                byte_len: self.byte_len,
                sample_count: self.claimed_samples,
                metrics: TrainMetrics {
                    train_loss: self.reported_train_loss,
                    steps: self.reported_steps,
                    tokens: self.reported_tokens,
                    train_ms: self.reported_train_ms,
                },
            },
            signature: self.signature.clone(),
        }
    }
}

/// Checks the signature of every accepted delta, replica and referee delta in `entry`.
pub fn verify_signatures(entry: &LedgerEntry) -> Result<(), LedgerError> {
    let replicas = entry
        .verification
        .iter()
        .flat_map(|verification| &verification.checks)
        .map(|check| &check.replica);
    let referees = entry
        .verification
        .iter()
        .flat_map(|verification| &verification.referees)
        .map(|check| &check.referee);
    for accepted in entry.accepted.iter().chain(replicas).chain(referees) {
        verify_submission(&accepted.upload(entry)).map_err(|error| LedgerError::BadSignature {
            round: entry.round,
            hash: accepted.hash,
            detail: error.to_string(),
        })?;
    }
    Ok(())
}

/// One refused submission.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectedSubmission {
    /// Who sent it (when known).
    pub trainer: Option<TrainerId>,
    /// The claimed hash (when the header was readable).
    pub hash: Option<BlobHash>,
    /// Why it was refused.
    pub reason: RejectReason,
    /// Human-readable detail.
    pub detail: String,
}

/// Round-level figures recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// Weighted mean of the trainers' self-reported training losses (a trainer's word, shown
    /// for information; nothing is decided on it).
    pub reported_train_loss: Option<f64>,
    /// Held-out loss of the new adapter, when an evaluation ran.
    pub eval_loss: Option<f64>,
    /// Compressed bytes received for accepted deltas.
    pub bytes_up: u64,
    /// What those deltas would weigh as raw f32.
    pub raw_bytes: u64,
    /// Milliseconds from round open to close.
    pub duration_ms: u64,
    /// L2 norm of the aggregated delta.
    pub aggregate_norm: f64,
}

/// A ledger that does not hold together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The entry bytes do not parse.
    #[error("round {round}: entry bytes do not parse: {detail}")]
    Malformed {
        /// Which round (position).
        round: u64,
        /// Why.
        detail: String,
    },
    /// Rounds are not numbered 0, 1, 2, ….
    #[error("entry {position} is for round {round}")]
    OutOfOrder {
        /// Position in the chain.
        position: u64,
        /// The round it names.
        round: RoundId,
    },
    /// An entry's `previous` is not the hash of the entry before it.
    #[error("round {round}: previous hash {found:?} does not match {expected:?}")]
    BrokenLink {
        /// The round.
        round: RoundId,
        /// Hash of the actual previous entry.
        expected: Option<BlobHash>,
        /// What the entry says.
        found: Option<BlobHash>,
    },
    /// An accepted delta's signature does not hold.
    #[error("round {round}: delta {hash}: {detail}")]
    BadSignature {
        /// The round.
        round: RoundId,
        /// The delta.
        hash: BlobHash,
        /// Why.
        detail: String,
    },
    /// A revealed secret does not match its commitment, or a commitment is not the one
    /// published before the round.
    #[error("round {round}: {detail}")]
    Secret {
        /// The round.
        round: RoundId,
        /// What does not match.
        detail: String,
    },
    /// The coordinator's signature over an entry does not hold.
    #[error("round {round}: entry signature: {detail}")]
    BadEntrySignature {
        /// The round.
        round: RoundId,
        /// Why.
        detail: String,
    },
    /// A round does not start from the adapter the previous one produced.
    #[error("round {round}: starts from adapter {found}, previous round produced {expected}")]
    AdapterGap {
        /// The round.
        round: RoundId,
        /// The previous round's output.
        expected: BlobHash,
        /// This round's input.
        found: BlobHash,
    },
}

impl LedgerEntry {
    /// The bytes the coordinator signs: the canonical bytes with an empty signature.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        unsigned.to_bytes()
    }

    /// Signs the entry with the coordinator's ledger key (setting `signer` and `signature`).
    pub fn sign(&mut self, key: &Identity) {
        self.signer = key.id();
        self.signature.clear();
        self.signature = key.sign(LEDGER_DOMAIN, &self.signed_bytes());
    }

    /// Checks the coordinator's signature, by `expected` when given.
    pub fn verify_signature(&self, expected: Option<&TrainerId>) -> Result<(), LedgerError> {
        let bad = |detail: String| LedgerError::BadEntrySignature {
            round: self.round,
            detail,
        };
        if let Some(expected) = expected {
            if *expected != self.signer {
                return Err(bad(format!(
                    "signed by {}, not the experiment's coordinator {}",
                    self.signer, expected
                )));
            }
        }
        verify(
            &self.signer,
            LEDGER_DOMAIN,
            &self.signed_bytes(),
            &self.signature,
        )
        .map_err(|error: IdentityError| bad(error.to_string()))
    }

    /// The canonical bytes that are hashed and stored: version 1 without a verification
    /// record, version 2 with one that has no barred deltas or loss checks, version 3 otherwise
    /// (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        const SERIALIZABLE: &str = "ledger entries contain only serializable fields";
        match &self.verification {
            None => to_payload(self).expect(SERIALIZABLE),
            Some(verification)
                if verification.barred.is_empty() && verification.loss_checks.is_empty() =>
            {
                let mut bytes = ENTRY_V2_MAGIC.to_vec();
                let fields = (
                    &verification.screening,
                    &verification.checks,
                    &verification.referees,
                );
                bytes.extend(to_payload(&(self, fields)).expect(SERIALIZABLE));
                bytes
            }
            Some(verification) => {
                let mut bytes = ENTRY_V3_MAGIC.to_vec();
                bytes.extend(to_payload(&(self, verification)).expect(SERIALIZABLE));
                bytes
            }
        }
    }

    /// Parses canonical bytes of either version (from trusted storage: no size limit beyond
    /// the input's).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        let malformed = |error: crate::frame::FrameError| LedgerError::Malformed {
            round: 0,
            detail: error.to_string(),
        };
        if let Some(rest) = bytes.strip_prefix(&ENTRY_V3_MAGIC[..]) {
            let (mut entry, verification): (LedgerEntry, RoundVerification) =
                from_payload_unbounded(rest).map_err(malformed)?;
            entry.verification = Some(verification);
            return Ok(entry);
        }
        match bytes.strip_prefix(&ENTRY_V2_MAGIC[..]) {
            Some(rest) => {
                let (mut entry, (screening, checks, referees)): (LedgerEntry, VerificationV2) =
                    from_payload_unbounded(rest).map_err(malformed)?;
                entry.verification = Some(RoundVerification {
                    screening,
                    checks,
                    referees,
                    ..RoundVerification::default()
                });
                Ok(entry)
            }
            None => from_payload_unbounded(bytes).map_err(malformed),
        }
    }

    /// The entry's hash.
    pub fn hash(&self) -> BlobHash {
        BlobHash::of(&self.to_bytes())
    }
}

/// Checks numbering, hash links and adapter continuity of a chain, first round first.
/// Returns the head hash (`None` for an empty chain).
pub fn check_chain(entries: &[LedgerEntry]) -> Result<Option<BlobHash>, LedgerError> {
    let mut previous: Option<&LedgerEntry> = None;
    let mut previous_hash = None;
    for (position, entry) in entries.iter().enumerate() {
        if entry.round != RoundId(position as u64) {
            return Err(LedgerError::OutOfOrder {
                position: position as u64,
                round: entry.round,
            });
        }
        if entry.previous != previous_hash {
            return Err(LedgerError::BrokenLink {
                round: entry.round,
                expected: previous_hash,
                found: entry.previous,
            });
        }
        if !entry.secret.matches(&entry.secret_commitment) {
            return Err(LedgerError::Secret {
                round: entry.round,
                detail: "the revealed secret does not match its commitment".into(),
            });
        }
        if let Some(before) = previous {
            if before.adapter_after != entry.adapter_before {
                return Err(LedgerError::AdapterGap {
                    round: entry.round,
                    expected: before.adapter_after,
                    found: entry.adapter_before,
                });
            }
            if before.next_commitment != entry.secret_commitment {
                return Err(LedgerError::Secret {
                    round: entry.round,
                    detail: "its secret is not the one the previous entry committed to".into(),
                });
            }
        }
        previous_hash = Some(entry.hash());
        previous = Some(entry);
    }
    Ok(previous_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> crate::identity::Identity {
        crate::identity::Identity::from_secret([5; 32])
    }

    fn signed_delta(round: RoundId) -> AcceptedDelta {
        let upload = signer()
            .sign_submission(SubmissionHeader {
                experiment: ExperimentId("e".into()),
                experiment_uid: ExperimentUid([3; 32]),
                coordinator: CertificateHash([4; 32]),
                round,
                task: TaskId(4),
                trainer: signer().id(),
                hash: BlobHash::of(b"d"),
                byte_len: 9,
                sample_count: 3,
                metrics: TrainMetrics {
                    train_loss: 1.5,
                    steps: 2,
                    tokens: 100,
                    train_ms: 7,
                },
            })
            .unwrap();
        AcceptedDelta::from_upload(&upload, 1000)
    }

    #[test]
    fn signatures_in_the_ledger_can_be_checked_alone() {
        let mut entries = chain(2);
        for entry in &entries {
            verify_signatures(entry).unwrap();
        }
        entries[1].accepted[0].claimed_samples = 30;
        assert!(matches!(
            verify_signatures(&entries[1]),
            Err(LedgerError::BadSignature {
                round: RoundId(1),
                ..
            })
        ));
    }

    #[test]
    fn a_claim_can_lower_the_weight_but_never_raise_it() {
        assert_eq!(justified_weight(1_000_000, 512), 512);
        assert_eq!(justified_weight(100, 512), 100);
        assert_eq!(justified_weight(0, 512), 1);
        let delta = signed_delta(RoundId(0));
        assert_eq!((delta.claimed_samples, delta.weight), (3, 3));
    }

    fn chain(length: u64) -> Vec<LedgerEntry> {
        let mut entries: Vec<LedgerEntry> = Vec::new();
        for round in 0..length {
            let adapter_before = match entries.last() {
                Some(last) => last.adapter_after,
                None => BlobHash::of(b"initial"),
            };
            let mut entry = LedgerEntry {
                experiment: ExperimentId("e".into()),
                experiment_uid: ExperimentUid([3; 32]),
                coordinator: CertificateHash([4; 32]),
                config_hash: BlobHash::of(b"config"),
                round: RoundId(round),
                previous: entries.last().map(LedgerEntry::hash),
                adapter_before,
                adapter_after: BlobHash::of(&round.to_le_bytes()),
                aggregate: BlobHash::of(b"aggregate"),
                optimizer_state: None,
                accepted: vec![signed_delta(RoundId(round))],
                rejected: vec![RejectedSubmission {
                    trainer: None,
                    hash: None,
                    reason: RejectReason::NonFinite,
                    detail: "nan".into(),
                }],
                metrics: RoundMetrics::default(),
                secret_commitment: RoundSecret([round as u8; 32]).commitment(),
                secret: RoundSecret([round as u8; 32]),
                next_commitment: RoundSecret([round as u8 + 1; 32]).commitment(),
                signer: TrainerId([0; 32]),
                signature: Vec::new(),
                verification: None,
            };
            entry.sign(&coordinator_key());
            entries.push(entry);
        }
        entries
    }

    fn coordinator_key() -> Identity {
        Identity::from_secret([6; 32])
    }

    #[test]
    fn entries_carry_the_coordinators_signature() {
        let entries = chain(2);
        let key = coordinator_key().id();
        entries[1].verify_signature(Some(&key)).unwrap();
        let mut forged = entries[1].clone();
        forged.accepted.clear();
        assert!(forged.verify_signature(Some(&key)).is_err());
        let mut resigned = entries[1].clone();
        resigned.sign(&Identity::from_secret([7; 32]));
        resigned.verify_signature(None).unwrap();
        assert!(matches!(
            resigned.verify_signature(Some(&key)),
            Err(LedgerError::BadEntrySignature { .. })
        ));
    }

    #[test]
    fn a_secret_must_match_its_commitment_and_the_previous_entry() {
        let mut entries = chain(3);
        entries[1].secret = RoundSecret([9; 32]);
        assert!(matches!(
            check_chain(&entries),
            Err(LedgerError::Secret {
                round: RoundId(1),
                ..
            })
        ));
        let mut entries = chain(3);
        entries[1].next_commitment = RoundSecret([9; 32]).commitment();
        // Re-link the chain so only the commitment is wrong.
        entries[2].previous = Some(entries[1].hash());
        assert!(matches!(
            check_chain(&entries),
            Err(LedgerError::Secret {
                round: RoundId(2),
                ..
            })
        ));
    }

    #[test]
    fn a_good_chain_holds_and_bytes_round_trip() {
        let entries = chain(4);
        let head = check_chain(&entries).unwrap();
        assert_eq!(head, Some(entries[3].hash()));
        let again = LedgerEntry::from_bytes(&entries[2].to_bytes()).unwrap();
        assert_eq!(again, entries[2]);
        assert_eq!(check_chain(&[]), Ok(None));
    }

    #[test]
    fn a_verification_record_makes_a_version_2_entry_that_round_trips_and_is_signed() {
        let mut entries = chain(2);
        let version_1 = entries[1].to_bytes();
        assert_ne!(version_1[0], ENTRY_V2_MAGIC[0]);
        let mut replica = signed_delta(RoundId(1));
        replica.task = TaskId(9);
        replica.signature = signer()
            .sign_submission(replica.upload(&entries[1]).header)
            .unwrap()
            .signature;
        entries[1].verification = Some(RoundVerification {
            barred: Vec::new(),
            loss_checks: Vec::new(),
            screening: Vec::new(),
            checks: vec![ReplicaCheck {
                counted: entries[1].accepted[0].hash,
                replica,
                distance: 0.25,
                cosine: 0.5,
                verdict: CheckVerdict::Disagree,
            }],
            referees: Vec::new(),
        });
        entries[1].sign(&coordinator_key());
        let version_2 = entries[1].to_bytes();
        assert!(version_2.starts_with(&ENTRY_V2_MAGIC));
        let again = LedgerEntry::from_bytes(&version_2).unwrap();
        assert_eq!(again, entries[1]);
        again
            .verify_signature(Some(&coordinator_key().id()))
            .unwrap();
        verify_signatures(&again).unwrap();
        assert_eq!(
            again
                .verification
                .as_ref()
                .unwrap()
                .withheld()
                .collect::<Vec<_>>(),
            vec![again.accepted[0].hash]
        );
        // The coordinator's signature covers the record, and the replica's signature is checked.
        let mut tampered = again.clone();
        tampered.verification.as_mut().unwrap().checks[0].verdict = CheckVerdict::Agree;
        assert!(tampered.verify_signature(None).is_err());
        let mut forged = again;
        forged.verification.as_mut().unwrap().checks[0]
            .replica
            .claimed_samples = 99;
        assert!(matches!(
            verify_signatures(&forged),
            Err(LedgerError::BadSignature { .. })
        ));
        // A barred delta makes it a version 3 entry, which round-trips too; the version 2
        // bytes of the same record without it are the layout a version 2 coordinator wrote
        // (the record's first three fields, in order).
        let mut barred = entries[1].clone();
        barred.verification.as_mut().unwrap().barred = vec![BarredDelta {
            hash: BlobHash([4; 32]),
            trainer: TrainerId([5; 32]),
        }];
        let version_3 = barred.to_bytes();
        assert!(version_3.starts_with(&ENTRY_V3_MAGIC));
        assert_eq!(LedgerEntry::from_bytes(&version_3).unwrap(), barred);
        #[derive(Serialize)]
        struct WrittenByVersion2<'a> {
            screening: &'a Vec<crate::aggregate::Screening>,
            checks: &'a Vec<ReplicaCheck>,
            referees: &'a Vec<RefereeCheck>,
        }
        let record = entries[1].verification.as_ref().unwrap();
        let mut old = ENTRY_V2_MAGIC.to_vec();
        old.extend(
            to_payload(&(
                &entries[1],
                WrittenByVersion2 {
                    screening: &record.screening,
                    checks: &record.checks,
                    referees: &record.referees,
                },
            ))
            .unwrap(),
        );
        assert_eq!(old, version_2);
        // Truncated or trailing bytes of any version do not parse.
        assert!(LedgerEntry::from_bytes(&version_2[..version_2.len() - 1]).is_err());
        assert!(LedgerEntry::from_bytes(&version_3[..version_3.len() - 1]).is_err());
        let mut trailing = version_1;
        trailing.push(0);
        assert!(LedgerEntry::from_bytes(&trailing).is_err());
    }

    #[test]
    fn version_1_bytes_are_unchanged_so_stored_hashes_still_hold() {
        // Pinned from an entry written before version 2 existed: the same fields must keep
        // encoding to the same bytes, or every stored ledger would fail `verify`.
        let entries = chain(1);
        assert_eq!(
            entries[0].hash().to_string(),
            "765a215ebea2b5a3049218804864d33c4725033c4b2d6a3951c9810f5d2da3eb"
        );
    }

    #[test]
    fn tampering_is_found_at_the_next_link() {
        let mut entries = chain(4);
        entries[1].accepted[0].weight = 1000;
        assert!(matches!(
            check_chain(&entries),
            Err(LedgerError::BrokenLink {
                round: RoundId(2),
                ..
            })
        ));
        let mut entries = chain(3);
        entries[2].adapter_before = BlobHash::of(b"elsewhere");
        assert!(matches!(
            check_chain(&entries),
            Err(LedgerError::AdapterGap {
                round: RoundId(2),
                ..
            })
        ));
        let mut entries = chain(3);
        entries.remove(1);
        assert!(matches!(
            check_chain(&entries),
            Err(LedgerError::OutOfOrder { position: 1, .. })
        ));
    }
}
