//! `verify`: re-derives every round from the stored deltas and checks the ledger chain.
//!
//! For each experiment it checks that the round-0 adapter is the one the configuration and seed
//! produce, that every stored ledger entry hashes to its recorded hash and links to the previous
//! one, and that aggregating each round's accepted deltas (read back from the blob store and
//! checked against their hashes) with the experiment's rules gives exactly the recorded replica
//! checks, aggregate, adapter and optimizer state.

use std::path::Path;

use tributary_shared::aggregate::OptimizerState;
use tributary_shared::config::ExperimentConfig;
use tributary_shared::frame::from_payload;
use tributary_shared::identity::verify_submission;
use tributary_shared::ledger::justified_weight;
use tributary_shared::ledger::{
    check_chain, verify_signatures, AcceptedDelta, CheckVerdict, LedgerEntry, RoundVerification,
};
use tributary_shared::wire::UploadHeader;
use tributary_shared::{BlobHash, ExperimentId, RoundId, TrainerId};

use crate::derive::{
    derive_from_store, encode_exact, encode_state, LossCheckInput, RefereeInput, RoundInputs,
};
use crate::store::db::Db;
use crate::store::{BlobSource, StoredBlobs};

/// One experiment that checked out.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The experiment.
    pub experiment: ExperimentId,
    /// Rounds re-derived.
    pub rounds: u64,
    /// Hash of the last ledger entry.
    pub head: Option<BlobHash>,
    /// The adapter after the last round.
    pub adapter: Option<BlobHash>,
}

/// The first thing that does not hold.
#[derive(Debug, Clone, thiserror::Error)]
#[error("experiment {experiment}{}: {detail}", round.map(|r| format!(", round {r}")).unwrap_or_default())]
pub struct VerifyError {
    /// The experiment.
    pub experiment: ExperimentId,
    /// The first bad round, when the fault is in a round.
    pub round: Option<RoundId>,
    /// What is wrong.
    pub detail: String,
}

/// Checks that the submissions the coordinator acknowledged in a round are exactly the ones its
/// ledger entry counts, and that each one's stored header is signed by its trainer and says what
/// the entry says (hash, length, claim, loss, round), and that each weight is the one the
/// configuration justifies.
fn check_submissions(
    db: &Db,
    id: &ExperimentId,
    entry: &LedgerEntry,
    task_budget: u64,
) -> Result<(), String> {
    let stored = db
        .round_submissions(id, entry.round)
        .map_err(|e| e.to_string())?;
    let acknowledged: Vec<BlobHash> = stored.iter().map(|(hash, _)| *hash).collect();
    let counted: Vec<BlobHash> = entry.accepted.iter().map(|a| a.hash).collect();
    if acknowledged != counted {
        let missing = acknowledged.iter().find(|h| !counted.contains(h));
        let extra = counted.iter().find(|h| !acknowledged.contains(h));
        return Err(format!(
            "{} acknowledged submissions but {} counted in the ledger (acknowledged, not \
             counted: {missing:?}; counted, not acknowledged: {extra:?})",
            acknowledged.len(),
            counted.len()
        ));
    }
    for ((_, bytes), accepted) in stored.iter().zip(&entry.accepted) {
        let upload: UploadHeader = from_payload(bytes)
            .map_err(|e| format!("stored header of {} does not parse: {e}", accepted.hash))?;
        verify_submission(&upload)
            .map_err(|e| format!("delta {}: signature: {e}", accepted.hash))?;
        let header = &upload.header;
        let matches = header.hash == accepted.hash
            && header.trainer == accepted.trainer
            && header.sample_count == accepted.claimed_samples
            && accepted.weight == justified_weight(header.sample_count, task_budget)
            && header.byte_len == accepted.byte_len
            && header.metrics.train_loss.to_bits() == accepted.reported_train_loss.to_bits()
            && header.round == entry.round
            && header.experiment_uid == entry.experiment_uid
            && header.coordinator == entry.coordinator
            && &header.experiment == id;
        if !matches {
            return Err(format!(
                "delta {}: the signed header differs from the ledger",
                accepted.hash
            ));
        }
    }
    Ok(())
}

/// Checks that each replica the entry compares was acknowledged: stored with the header its
/// trainer signed, for this round, with the weight the configuration justifies.
fn check_replicas_stored(
    db: &Db,
    id: &ExperimentId,
    entry: &LedgerEntry,
    recorded: &RoundVerification,
    task_budget: u64,
) -> Result<(), String> {
    let stored = db
        .round_replicas(id, entry.round)
        .map_err(|e| e.to_string())?;
    for check in &recorded.checks {
        let replica = &check.replica;
        let expected = replica.upload(entry);
        let found = stored.iter().any(|(hash, bytes)| {
            *hash == replica.hash
                && from_payload::<UploadHeader>(bytes).is_ok_and(|upload| upload == expected)
        });
        if !found {
            return Err(format!(
                "replica {} of task {} is not among the stored replicas with the header the ledger \
                 records",
                replica.hash, replica.task
            ));
        }
        if replica.weight != justified_weight(replica.claimed_samples, task_budget) {
            return Err(format!("replica {}: weight is not justified", replica.hash));
        }
        if !entry.accepted.iter().any(|a| a.hash == check.counted) {
            return Err(format!(
                "replica {} is compared with {}, which the round did not count",
                replica.hash, check.counted
            ));
        }
    }
    Ok(())
}

/// Checks that each loss check names a delta counted in its round (this entry's or an earlier
/// one) by the trainer it names, and that no delta is checked twice.
fn check_loss_checks(
    recorded: &RoundVerification,
    counted_by: &std::collections::BTreeMap<BlobHash, (RoundId, TrainerId)>,
    loss_checked: &mut std::collections::BTreeSet<BlobHash>,
) -> Result<(), String> {
    for check in &recorded.loss_checks {
        match counted_by.get(&check.delta) {
            Some((round, trainer)) if *round == check.round && *trainer == check.trainer => {}
            _ => {
                return Err(format!(
                    "a loss check names delta {} of {} in round {}, which no entry counted",
                    check.delta.short(),
                    check.trainer,
                    check.round
                ))
            }
        }
        if !loss_checked.insert(check.delta) {
            return Err(format!(
                "delta {} is loss-checked twice",
                check.delta.short()
            ));
        }
    }
    Ok(())
}

/// Checks that each referee check settles a dispute an earlier entry recorded and nothing
/// settled before, and that its delta is stored with the header the ledger records; then
/// records this entry's disputes as open.
fn check_referees(
    db: &Db,
    id: &ExperimentId,
    entry: &LedgerEntry,
    recorded: &RoundVerification,
    open_disputes: &mut Vec<(RoundId, BlobHash, TrainerId, BlobHash, TrainerId)>,
) -> Result<(), String> {
    let stored = db
        .round_referees(id, entry.round)
        .map_err(|e| e.to_string())?;
    for check in &recorded.referees {
        let dispute = (
            check.round,
            check.counted,
            check.counted_trainer,
            check.replica,
            check.replica_trainer,
        );
        let Some(position) = open_disputes.iter().position(|open| *open == dispute) else {
            return Err(format!(
                "a referee settles a dispute of round {} over {} that no earlier entry left open",
                check.round, check.counted
            ));
        };
        open_disputes.remove(position);
        let expected = check.referee.upload(entry);
        let found = stored.iter().any(|(round, counted, bytes)| {
            *round == check.round
                && *counted == check.counted
                && from_payload::<UploadHeader>(bytes).is_ok_and(|upload| upload == expected)
        });
        if !found {
            return Err(format!(
                "referee delta {} is not stored with the header the ledger records",
                check.referee.hash
            ));
        }
    }
    for check in recorded
        .checks
        .iter()
        .filter(|check| check.verdict != CheckVerdict::Agree)
    {
        let counted = entry
            .accepted
            .iter()
            .find(|a| a.hash == check.counted)
            .ok_or_else(|| format!("disputed delta {} was not counted", check.counted))?;
        open_disputes.push((
            entry.round,
            check.counted,
            counted.trainer,
            check.replica.hash,
            check.replica.trainer,
        ));
    }
    Ok(())
}

/// Verifies every experiment in the data directory.
pub fn verify_data_dir(data_dir: &Path) -> Result<Vec<Verified>, VerifyError> {
    let setup = |detail: String| VerifyError {
        experiment: ExperimentId("?".into()),
        round: None,
        detail,
    };
    let location = crate::store::db::location_of(data_dir).map_err(|e| setup(e.to_string()))?;
    if let crate::store::db::Location::Sqlite(path) = &location {
        if !path.is_file() {
            return Err(setup(format!("no database at {}", path.display())));
        }
    }
    let db = Db::open_read_only_at(&location).map_err(|e| setup(e.to_string()))?;
    let blobs = StoredBlobs::open(data_dir).map_err(|e| setup(e.to_string()))?;
    let experiments = db.experiments().map_err(|e| setup(e.to_string()))?;
    let mut out = Vec::new();
    for stored in experiments {
        out.push(verify_experiment(&db, &blobs, &stored)?);
    }
    Ok(out)
}

fn verify_experiment(
    db: &Db,
    blobs: &StoredBlobs,
    stored: &crate::store::db::StoredExperiment,
) -> Result<Verified, VerifyError> {
    let (id, config_json, initial_adapter) = (
        &stored.id,
        stored.config_json.as_str(),
        stored.initial_adapter,
    );
    let fail = |round: Option<RoundId>, detail: String| VerifyError {
        experiment: id.clone(),
        round,
        detail,
    };
    let config: ExperimentConfig = serde_json::from_str(config_json)
        .map_err(|e| fail(None, format!("stored configuration does not parse: {e}")))?;
    let initial = config
        .adapter
        .initial_adapter(config.experiment.seed)
        .map_err(|e| fail(None, e.to_string()))?;
    let expected_initial = BlobHash::of(&encode_exact(&initial));
    if expected_initial != initial_adapter {
        return Err(fail(
            None,
            format!("round-0 adapter {initial_adapter} is not the one the configuration makes ({expected_initial})"),
        ));
    }
    let ledger = db.ledger(id).map_err(|e| fail(None, e.to_string()))?;
    for (stored_hash, entry) in &ledger {
        if entry.hash() != *stored_hash {
            return Err(fail(
                Some(entry.round),
                "ledger entry does not match its recorded hash".into(),
            ));
        }
    }
    let entries: Vec<_> = ledger.into_iter().map(|(_, entry)| entry).collect();
    let head = check_chain(&entries).map_err(|e| {
        let round = match &e {
            tributary_shared::ledger::LedgerError::BrokenLink { round, .. }
            | tributary_shared::ledger::LedgerError::AdapterGap { round, .. }
            | tributary_shared::ledger::LedgerError::OutOfOrder { round, .. }
            | tributary_shared::ledger::LedgerError::Secret { round, .. } => Some(*round),
            _ => None,
        };
        fail(round, e.to_string())
    })?;
    if let Some(first) = entries.first() {
        if first.adapter_before != initial_adapter {
            return Err(fail(
                Some(first.round),
                "does not start from the round-0 adapter".into(),
            ));
        }
        if first.secret_commitment != stored.first_commitment {
            return Err(fail(
                Some(first.round),
                "its secret is not the one committed to when the experiment was created".into(),
            ));
        }
    }
    let config_hash = BlobHash::of(config_json.as_bytes());
    let mut state = OptimizerState::default();
    // Disputes recorded so far and not yet settled: (round, counted, counted trainer, replica,
    // replica trainer).
    let mut open_disputes = Vec::new();
    // Rounds too large for memory spill to the system's temporary folder (verify may run on a
    // read-only copy of a data directory).
    let scratch = crate::derive::Scratch::in_dir(std::env::temp_dir());
    // Trainers flagged by referees in the entries so far: their later deltas must be barred.
    let mut flagged = std::collections::BTreeSet::new();
    // Every counted delta so far, with its round and trainer; and the deltas loss-checked.
    let mut counted_by = std::collections::BTreeMap::new();
    let mut loss_checked = std::collections::BTreeSet::new();
    for entry in &entries {
        let round = Some(entry.round);
        entry
            .verify_signature(Some(&stored.signer))
            .map_err(|e| fail(round, e.to_string()))?;
        if entry.config_hash != config_hash {
            return Err(fail(
                round,
                "the entry commits to another configuration than the experiment's".into(),
            ));
        }
        if entry.experiment_uid != stored.uid {
            return Err(fail(
                round,
                format!(
                    "the entry is for experiment instance {}",
                    entry.experiment_uid
                ),
            ));
        }
        if &entry.experiment != id {
            return Err(fail(
                round,
                format!("entry names experiment {:?}", entry.experiment.0),
            ));
        }
        verify_signatures(entry).map_err(|error| fail(round, error.to_string()))?;
        check_submissions(db, id, entry, config.task_budget())
            .map_err(|detail| fail(round, detail))?;
        let mut sorted = entry.accepted.clone();
        sorted.sort_by_key(|a| a.hash);
        if sorted != entry.accepted {
            return Err(fail(round, "accepted deltas are not in hash order".into()));
        }
        let recorded = entry.verification.clone().unwrap_or_default();
        check_replicas_stored(db, id, entry, &recorded, config.task_budget())
            .map_err(|detail| fail(round, detail))?;
        let replicas: Vec<(BlobHash, AcceptedDelta)> = recorded
            .checks
            .iter()
            .map(|check| (check.counted, check.replica.clone()))
            .collect();
        check_referees(db, id, entry, &recorded, &mut open_disputes)
            .map_err(|detail| fail(round, detail))?;
        let referees: Vec<RefereeInput> =
            recorded.referees.iter().map(RefereeInput::from).collect();
        counted_by.extend(
            entry
                .accepted
                .iter()
                .map(|delta| (delta.hash, (entry.round, delta.trainer))),
        );
        check_loss_checks(&recorded, &counted_by, &mut loss_checked)
            .map_err(|detail| fail(round, detail))?;
        let loss_checks: Vec<LossCheckInput> = recorded
            .loss_checks
            .iter()
            .map(LossCheckInput::from)
            .collect();
        let derived = derive_from_store(
            &config,
            blobs,
            RoundInputs {
                adapter_before: &entry.adapter_before,
                accepted: &entry.accepted,
                replicas: &replicas,
                referees: &referees,
                loss_checks: &loss_checks,
                flagged: &flagged,
            },
            &state,
            &scratch,
        )
        .map_err(|e| fail(round, e.to_string()))?;
        flagged.extend(recorded.flagged());
        if derived.verification != recorded {
            return Err(fail(
                round,
                "the verification record (replica checks, referees, barred deltas, screening) does not re-derive to what the ledger records".into(),
            ));
        }
        let aggregate = BlobHash::of(&encode_exact(&derived.aggregate));
        if aggregate != entry.aggregate {
            return Err(fail(
                round,
                format!(
                    "aggregate re-derives to {aggregate}, the ledger says {}",
                    entry.aggregate
                ),
            ));
        }
        let adapter = BlobHash::of(&encode_exact(&derived.adapter_after));
        if adapter != entry.adapter_after {
            return Err(fail(
                round,
                format!(
                    "adapter re-derives to {adapter}, the ledger says {}",
                    entry.adapter_after
                ),
            ));
        }
        let state_hash = (derived.state.first_moment.is_some()
            || derived.state.second_moment.is_some())
        .then(|| BlobHash::of(&encode_state(&derived.state)));
        if state_hash != entry.optimizer_state {
            return Err(fail(round, "optimizer state does not re-derive".into()));
        }
        for (what, hash) in [
            ("adapter", Some(entry.adapter_after)),
            ("aggregate", Some(entry.aggregate)),
            ("optimizer state", entry.optimizer_state),
        ] {
            if let Some(hash) = hash {
                blobs
                    .get(&hash)
                    .map_err(|e| fail(round, format!("{what} blob: {e}")))?;
            }
        }
        state = derived.state;
    }
    Ok(Verified {
        experiment: id.clone(),
        rounds: entries.len() as u64,
        head,
        adapter: entries.last().map(|e| e.adapter_after),
    })
}
