//! Deriving a round's result from its inputs: the one computation both `serve` (closing a round)
//! and `verify` (re-checking it later) run, so they cannot disagree.
//!
//! The adapter before the round, the accepted deltas (sorted by hash, with their weights), the
//! second deltas of replicated tasks and the server optimizer state determine the replica checks,
//! the aggregate, the adapter after and the new optimizer state, bit for bit. A counted delta
//! whose replica disagrees is withheld from the aggregate, and so is every delta of a trainer a
//! referee has flagged (in an earlier round or this one).

use std::collections::BTreeSet;
use tributary_shared::aggregate::{
    aggregate_rows, AggregateError, Aggregated, OptimizerState, Summary,
};
use tributary_shared::codec::{self, Codec, CodecError};
use tributary_shared::config::ExperimentConfig;

use tributary_shared::ledger::{
    AcceptedDelta, BarredDelta, LossCheck, RefereeCheck, ReplicaCheck, RoundVerification,
};
use tributary_shared::loss_check::{judge, LossAnswer, LossOutcome};
use tributary_shared::replica::{compare, referee, Tolerance};
use tributary_shared::{BlobHash, Delta, Layout};
use tributary_shared::{RoundId, TrainerId};

use crate::store::blobs::BlobError;
use crate::store::BlobSource;

mod spill;

pub use spill::Scratch;
use spill::{Spill, SpillRows};

/// A round's inputs could not be loaded or combined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeriveError {
    /// A blob is missing or corrupt.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// A blob does not decode.
    #[error("blob {hash} does not decode: {source}")]
    Decode {
        /// Which blob.
        hash: BlobHash,
        /// Why.
        source: CodecError,
    },
    /// Aggregation or the server step failed.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// The new adapter holds a NaN or an infinity.
    #[error("the new adapter is not finite: {source}")]
    NonFinite {
        /// Where.
        source: tributary_shared::DeltaError,
    },
    /// Accepted deltas whose stored bytes are gone or damaged for good (missing, corrupt,
    /// undecodable): the round can only go on without them.
    #[error("accepted deltas are unreadable: {}", describe(.deltas))]
    Unreadable {
        /// Each delta and what is wrong with it.
        deltas: Vec<(BlobHash, String)>,
    },
    /// An accepted delta does not have the adapter's layout.
    #[error("delta {hash} does not have the adapter's layout: {source}")]
    Layout {
        /// Which delta.
        hash: BlobHash,
        /// What differs.
        source: tributary_shared::DeltaError,
    },
    /// The scratch space a round's deltas are spilled to failed.
    #[error("scratch space for the round's deltas: {source}")]
    Scratch {
        /// The i/o error.
        source: std::io::Error,
    },
    /// The optimizer state blob is malformed.
    #[error("optimizer state blob {hash} is malformed: {detail}")]
    State {
        /// Which blob.
        hash: BlobHash,
        /// Why.
        detail: String,
    },
}

/// What a round produces.
#[derive(Debug, Clone)]
pub struct Derived {
    /// The aggregated delta.
    pub aggregate: Delta,
    /// The adapter after the server step.
    pub adapter_after: Delta,
    /// The optimizer state after the step.
    pub state: OptimizerState,
    /// The round's replica checks, and what they kept out of the aggregate.
    pub verification: RoundVerification,
}

/// The second delta of a replicated task, beside the hash of the pair's counted delta.
pub type Replica = (BlobHash, AcceptedDelta, Delta);

/// A referee's delta and the dispute it settles.
#[derive(Clone, Debug, PartialEq)]
pub struct RefereeInput {
    /// The disputed round.
    pub round: RoundId,
    /// The disputed counted delta.
    pub counted: BlobHash,
    /// Its trainer.
    pub counted_trainer: TrainerId,
    /// The disputed replica.
    pub replica: BlobHash,
    /// Its trainer.
    pub replica_trainer: TrainerId,
    /// The referee's delta, as its trainer signed it.
    pub referee: AcceptedDelta,
}

impl From<&(crate::engine::Dispute, AcceptedDelta)> for RefereeInput {
    fn from((dispute, referee): &(crate::engine::Dispute, AcceptedDelta)) -> Self {
        Self {
            round: dispute.round,
            counted: dispute.counted,
            counted_trainer: dispute.counted_trainer,
            replica: dispute.replica,
            replica_trainer: dispute.replica_trainer,
            referee: referee.clone(),
        }
    }
}

impl From<&RefereeCheck> for RefereeInput {
    fn from(check: &RefereeCheck) -> Self {
        Self {
            round: check.round,
            counted: check.counted,
            counted_trainer: check.counted_trainer,
            replica: check.replica,
            replica_trainer: check.replica_trainer,
            referee: check.referee.clone(),
        }
    }
}

/// A referee's input with the three deltas loaded: referee, counted, replica.
pub type Refereed = (RefereeInput, Delta, Delta, Delta);

/// Settles each dispute: the referee's delta against both disputed ones, in the order of
/// (disputed round, counted hash, referee task).
pub fn settle_disputes(config: &ExperimentConfig, refereed: &[Refereed]) -> Vec<RefereeCheck> {
    let tolerance = config.verification().tolerance();
    let mut checks: Vec<RefereeCheck> = refereed
        .iter()
        .map(|(input, by_referee, counted, replica)| {
            referee_check(&tolerance, input, by_referee, counted, replica)
        })
        .collect();
    sort_referee_checks(&mut checks);
    checks
}

/// The order referee decisions are recorded in: (disputed round, counted hash, referee task).
fn sort_referee_checks(checks: &mut [RefereeCheck]) {
    checks.sort_by_key(|check| (check.round, check.counted, check.referee.task));
}

/// One dispute settled: the referee's delta against the counted and the replica delta.
fn referee_check(
    tolerance: &Tolerance,
    input: &RefereeInput,
    by_referee: &Delta,
    counted: &Delta,
    replica: &Delta,
) -> RefereeCheck {
    let (to_counted, to_replica, outcome) = referee(tolerance, by_referee, counted, replica);
    RefereeCheck {
        round: input.round,
        counted: input.counted,
        counted_trainer: input.counted_trainer,
        replica: input.replica,
        replica_trainer: input.replica_trainer,
        referee: input.referee.clone(),
        distance_to_counted: to_counted.distance,
        distance_to_replica: to_replica.distance,
        outcome,
    }
}

/// Encodes an adapter or aggregate canonically (lossless f32): its hash is its id.
pub fn encode_exact(delta: &Delta) -> Vec<u8> {
    codec::encode_to_vec(delta, Codec::F32).expect("f32 encoding accepts every delta")
}

/// Loads and decodes a blob as a delta of at most `max_elements` values.
pub fn load_delta(
    blobs: &dyn BlobSource,
    hash: &BlobHash,
    max_elements: usize,
) -> Result<Delta, DeriveError> {
    let bytes = blobs.get(hash)?;
    codec::decode(&bytes, max_elements).map_err(|source| DeriveError::Decode {
        hash: *hash,
        source,
    })
}

/// Compares each replicated task's two deltas under the experiment's tolerance, in the order of
/// the counted delta's hash. A replica whose counted delta is not among `deltas` is skipped.
pub fn check_replicas(
    config: &ExperimentConfig,
    deltas: &[(AcceptedDelta, Delta)],
    replicas: &[Replica],
) -> RoundVerification {
    let tolerance = config.verification().tolerance();
    let mut sorted: Vec<&Replica> = replicas.iter().collect();
    sorted.sort_by_key(|(counted, replica, _)| (*counted, replica.task));
    let checks = sorted
        .into_iter()
        .filter_map(|(counted, replica, delta)| {
            let (_, first) = deltas
                .iter()
                .find(|(accepted, _)| accepted.hash == *counted)?;
            Some(replica_check(&tolerance, *counted, replica, first, delta))
        })
        .collect();
    verification_with(checks)
}

/// A verification record holding only `checks`.
fn verification_with(checks: Vec<ReplicaCheck>) -> RoundVerification {
    RoundVerification {
        screening: Vec::new(),
        checks,
        referees: Vec::new(),
        barred: Vec::new(),
        loss_checks: Vec::new(),
    }
}

/// One replicated task's check: its counted delta `first` against the replica's `second`.
fn replica_check(
    tolerance: &Tolerance,
    counted: BlobHash,
    replica: &AcceptedDelta,
    first: &Delta,
    second: &Delta,
) -> ReplicaCheck {
    let comparison = compare(first, second);
    ReplicaCheck {
        counted,
        replica: replica.clone(),
        distance: comparison.distance,
        cosine: comparison.cosine,
        verdict: tolerance.verdict(&comparison),
    }
}

/// A settled loss check: the delta, its trainer and the evaluators' answers, to be judged
/// ([`tributary_shared::loss_check::judge`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LossCheckInput {
    /// The round the delta was counted in.
    pub round: RoundId,
    /// The delta.
    pub delta: BlobHash,
    /// Its trainer.
    pub trainer: TrainerId,
    /// The answers.
    pub answers: Vec<LossAnswer>,
    /// Evaluators asked for.
    pub wanted: u32,
}

impl From<&LossCheck> for LossCheckInput {
    fn from(check: &LossCheck) -> Self {
        Self {
            round: check.round,
            delta: check.delta,
            trainer: check.trainer,
            answers: check.answers.clone(),
            wanted: check.wanted,
        }
    }
}

/// Judges each loss check, in the order of (round, delta); one that fails on a delta among
/// `deltas` (this round's) withholds it.
pub fn judge_loss_checks(inputs: &[LossCheckInput], deltas: &[AcceptedDelta]) -> Vec<LossCheck> {
    let mut sorted: Vec<&LossCheckInput> = inputs.iter().collect();
    sorted.sort_by_key(|input| (input.round, input.delta));
    sorted
        .into_iter()
        .map(|input| {
            let mut answers = input.answers.clone();
            answers.sort_by_key(|answer| answer.evaluator);
            let (improvement, outcome) = judge(&answers, input.wanted);
            let withheld = outcome == LossOutcome::NotLowered
                && deltas.iter().any(|accepted| accepted.hash == input.delta);
            LossCheck {
                round: input.round,
                delta: input.delta,
                trainer: input.trainer,
                answers,
                wanted: input.wanted,
                improvement,
                outcome,
                withheld,
            }
        })
        .collect()
}

/// Bars the accepted deltas of trainers flagged before this round (`flagged`) or by this
/// round's referees and loss checks, in hash order; a delta already withheld otherwise is left
/// to that.
fn bar_flagged(
    verification: &mut RoundVerification,
    deltas: &[AcceptedDelta],
    flagged: &BTreeSet<TrainerId>,
) {
    let flagged: BTreeSet<TrainerId> = flagged
        .iter()
        .copied()
        .chain(verification.flagged())
        .collect();
    let disputed: BTreeSet<BlobHash> = verification.withheld().collect();
    let mut barred: Vec<BarredDelta> = deltas
        .iter()
        .filter(|accepted| {
            flagged.contains(&accepted.trainer) && !disputed.contains(&accepted.hash)
        })
        .map(|accepted| BarredDelta {
            hash: accepted.hash,
            trainer: accepted.trainer,
        })
        .collect();
    barred.sort_by_key(|barred| barred.hash);
    verification.barred = barred;
}

/// What a round's deltas are checked against, loaded.
#[derive(Clone, Copy, Debug, Default)]
pub struct Checks<'a> {
    /// Second deltas of replicated tasks.
    pub replicas: &'a [Replica],
    /// Referee deltas with the disputes they settle.
    pub refereed: &'a [Refereed],
    /// Loss checks settled while the round was open.
    pub loss_checks: &'a [LossCheckInput],
    /// Trainers flagged in earlier entries.
    pub flagged: Option<&'a BTreeSet<TrainerId>>,
}

/// Runs the replica checks, referees and loss checks, bars flagged trainers' deltas,
/// aggregates the rest and takes the server step. With every delta withheld the aggregate is
/// zero.
pub fn derive_round(
    config: &ExperimentConfig,
    adapter_before: &Delta,
    deltas: &[(AcceptedDelta, Delta)],
    checks: Checks<'_>,
    state: &OptimizerState,
) -> Result<Derived, DeriveError> {
    let mut verification = check_replicas(config, deltas, checks.replicas);
    verification.referees = settle_disputes(config, checks.refereed);
    let mut sorted: Vec<&(AcceptedDelta, Delta)> = deltas.iter().collect();
    sorted.sort_by(|(a, _), (b, _)| a.hash.cmp(&b.hash).then(a.weight.cmp(&b.weight)));
    let scratch = Scratch {
        in_memory: usize::MAX,
        ..Scratch::in_dir(std::env::temp_dir())
    };
    let mut loaded = Loaded::new(adapter_before.layout(), sorted.len(), &scratch)?;
    for (accepted, delta) in sorted {
        loaded.push(accepted, delta)?;
    }
    finish(
        config,
        adapter_before,
        loaded,
        verification,
        checks.loss_checks,
        checks.flagged.unwrap_or(&BTreeSet::new()),
        state,
        scratch.slab,
    )
}

/// A round's accepted deltas, loaded in hash order: what each trainer signed, what aggregation
/// needs to know of each delta, and their values, spilled.
struct Loaded {
    layout: Layout,
    accepted: Vec<AcceptedDelta>,
    summaries: Vec<Summary>,
    spill: Spill,
}

impl Loaded {
    fn new(layout: Layout, expected: usize, scratch: &Scratch) -> Result<Self, DeriveError> {
        let spill = Spill::new(layout.element_count(), expected, scratch)
            .map_err(|source| DeriveError::Scratch { source })?;
        Ok(Self {
            layout,
            accepted: Vec::with_capacity(expected),
            summaries: Vec::with_capacity(expected),
            spill,
        })
    }

    /// Adds the next delta (in hash order): checked against the adapter's layout, summarised,
    /// spilled.
    fn push(&mut self, accepted: &AcceptedDelta, delta: &Delta) -> Result<(), DeriveError> {
        delta
            .check_layout(&self.layout)
            .map_err(|source| DeriveError::Layout {
                hash: accepted.hash,
                source,
            })?;
        self.summaries
            .push(Summary::of(accepted.hash, accepted.weight as f64, delta)?);
        self.spill
            .push(delta)
            .map_err(|source| DeriveError::Scratch { source })?;
        self.accepted.push(accepted.clone());
        Ok(())
    }

    /// The loaded delta with this hash, read back.
    fn delta(&mut self, hash: &BlobHash) -> Result<Option<Delta>, DeriveError> {
        // In hash order: a binary search.
        let Ok(row) = self.accepted.binary_search_by(|a| a.hash.cmp(hash)) else {
            return Ok(None);
        };
        self.spill
            .delta(row, &self.layout)
            .map(Some)
            .map_err(|source| DeriveError::Scratch { source })
    }
}

/// Judges the loss checks, bars flagged trainers' deltas, aggregates the rest slab by slab and
/// takes the server step.
#[allow(clippy::too_many_arguments)]
fn finish(
    config: &ExperimentConfig,
    adapter_before: &Delta,
    loaded: Loaded,
    mut verification: RoundVerification,
    loss_checks: &[LossCheckInput],
    flagged: &BTreeSet<TrainerId>,
    state: &OptimizerState,
    slab: usize,
) -> Result<Derived, DeriveError> {
    let Loaded {
        layout,
        accepted,
        summaries,
        mut spill,
    } = loaded;
    verification.loss_checks = judge_loss_checks(loss_checks, &accepted);
    bar_flagged(&mut verification, &accepted, flagged);
    let withheld: BTreeSet<BlobHash> = verification.withheld().collect();
    let rows: Vec<usize> = (0..accepted.len())
        .filter(|&row| !withheld.contains(&accepted[row].hash))
        .collect();
    let aggregated = if rows.is_empty() && !accepted.is_empty() {
        Delta::zeros(&adapter_before.layout()).expect("the adapter's layout is valid")
    } else {
        let kept: Vec<Summary> = rows.iter().map(|&row| summaries[row].clone()).collect();
        let mut reader = SpillRows {
            spill: &mut spill,
            rows,
        };
        let Aggregated { delta, screening } =
            aggregate_rows(&config.aggregation(), &layout, &kept, &mut reader, slab)?;
        verification.screening = screening;
        delta
    };
    let mut adapter_after = adapter_before.clone();
    let mut state = state.clone();
    config
        .server_optimizer
        .apply(&mut state, &mut adapter_after, &aggregated)?;
    adapter_after
        .check_finite()
        .map_err(|source| DeriveError::NonFinite { source })?;
    Ok(Derived {
        aggregate: aggregated,
        adapter_after,
        state,
        verification,
    })
}

/// What a round's ledger entry (or the engine, at close) names as its inputs; the deltas
/// themselves are loaded from the blob store.
#[derive(Clone, Copy, Debug)]
pub struct RoundInputs<'a> {
    /// The adapter the round started from.
    pub adapter_before: &'a BlobHash,
    /// Its accepted deltas, sorted by hash.
    pub accepted: &'a [AcceptedDelta],
    /// Second deltas of replicated tasks, beside the counted delta's hash.
    pub replicas: &'a [(BlobHash, AcceptedDelta)],
    /// Referee deltas and the disputes they settle.
    pub referees: &'a [RefereeInput],
    /// Loss checks settled while the round was open.
    pub loss_checks: &'a [LossCheckInput],
    /// Trainers flagged in earlier entries.
    pub flagged: &'a BTreeSet<TrainerId>,
}

/// Loads a round's inputs from the blob store and derives it, with the result
/// [`derive_round`] gives for the same deltas in memory.
///
/// The accepted deltas stream from the store once, in hash order, a batch at a time: each is
/// decoded, checked, summarised and spilled (`scratch`), and aggregation then reads them back a
/// slab of coordinates at a time. Replicas and referees are compared one dispute at a time.
/// Memory holds one batch of encoded deltas, a few decoded ones and one slab, however many
/// trainers the round had.
pub fn derive_from_store(
    config: &ExperimentConfig,
    blobs: &dyn BlobSource,
    inputs: RoundInputs<'_>,
    state: &OptimizerState,
    scratch: &Scratch,
) -> Result<Derived, DeriveError> {
    let RoundInputs {
        adapter_before,
        accepted,
        replicas,
        referees,
        loss_checks,
        flagged,
    } = inputs;
    let max_elements = config
        .adapter
        .layout()
        .map(|layout| layout.element_count())
        .unwrap_or(usize::MAX);
    let tolerance = config.verification().tolerance();
    let adapter = load_delta(blobs, adapter_before, max_elements)?;
    let mut unreadable = Vec::new();
    let mut sorted: Vec<&AcceptedDelta> = accepted.iter().collect();
    sorted.sort_by(|a, b| a.hash.cmp(&b.hash).then(a.weight.cmp(&b.weight)));
    let mut loaded = Loaded::new(adapter.layout(), sorted.len(), scratch)?;
    if loaded.spill.on_disk() {
        tracing::info!(
            deltas = sorted.len(),
            values = adapter.element_count(),
            "the round's deltas exceed the in-memory limit: spilling them to a scratch file"
        );
    }
    for_each_loaded(
        blobs,
        &sorted,
        max_elements,
        &mut unreadable,
        |_, item, delta| loaded.push(item, &delta),
    )?;
    // Replicas, in the order of the counted delta's hash: each compared as it arrives.
    let mut ordered: Vec<&(BlobHash, AcceptedDelta)> = replicas.iter().collect();
    ordered.sort_by_key(|(counted, replica)| (*counted, replica.task));
    let mut checks = Vec::new();
    let replica_list: Vec<&AcceptedDelta> = ordered.iter().map(|(_, replica)| replica).collect();
    for_each_loaded(
        blobs,
        &replica_list,
        max_elements,
        &mut unreadable,
        |index, replica, delta| {
            let counted = ordered[index].0;
            if let Some(first) = loaded.delta(&counted)? {
                checks.push(replica_check(&tolerance, counted, replica, &first, &delta));
            }
            Ok(())
        },
    )?;
    let mut verification = verification_with(checks);
    // Referees: the three deltas of one dispute at a time. The disputed deltas were stored in
    // earlier rounds; one that is gone leaves its dispute unsettled rather than stopping the
    // round.
    for_each_loaded(
        blobs,
        &referees
            .iter()
            .map(|input| &input.referee)
            .collect::<Vec<_>>(),
        max_elements,
        &mut unreadable,
        |index, _, by_referee| {
            let input = &referees[index];
            let counted = load_delta(blobs, &input.counted, max_elements);
            let replica = load_delta(blobs, &input.replica, max_elements);
            match (counted, replica) {
                (Ok(counted), Ok(replica)) => verification.referees.push(referee_check(
                    &tolerance,
                    input,
                    &by_referee,
                    &counted,
                    &replica,
                )),
                (Err(error @ DeriveError::Blob(BlobError::Io { .. })), _)
                | (_, Err(error @ DeriveError::Blob(BlobError::Io { .. }))) => return Err(error),
                _ => {}
            }
            Ok(())
        },
    )?;
    sort_referee_checks(&mut verification.referees);
    if !unreadable.is_empty() {
        return Err(DeriveError::Unreadable { deltas: unreadable });
    }
    finish(
        config,
        &adapter,
        loaded,
        verification,
        loss_checks,
        flagged,
        state,
        scratch.slab,
    )
}

/// Loads each delta in order and hands it to `each`; those gone or damaged for good are added
/// to `unreadable` and left out, any other error is one that may pass (i/o). Deltas are fetched
/// a batch at a time (an object store serves a batch concurrently), at most [`FETCH_BATCH`] of
/// them and [`FETCH_BATCH_BYTES`] of encoded bytes, and decoded one at a time.
fn for_each_loaded(
    blobs: &dyn BlobSource,
    items: &[&AcceptedDelta],
    max_elements: usize,
    unreadable: &mut Vec<(BlobHash, String)>,
    mut each: impl FnMut(usize, &AcceptedDelta, Delta) -> Result<(), DeriveError>,
) -> Result<(), DeriveError> {
    let mut rest = items;
    while !rest.is_empty() {
        let mut take = 0;
        let mut bytes = 0u64;
        while take < rest.len() && take < FETCH_BATCH {
            bytes = bytes.saturating_add(rest[take].byte_len);
            if take > 0 && bytes > FETCH_BATCH_BYTES {
                break;
            }
            take += 1;
        }
        let (batch, after) = rest.split_at(take);
        let first = items.len() - rest.len();
        rest = after;
        let hashes: Vec<BlobHash> = batch.iter().map(|item| item.hash).collect();
        for (offset, (item, fetched)) in batch.iter().zip(blobs.get_many(&hashes)).enumerate() {
            let loaded = fetched.map_err(DeriveError::from).and_then(|bytes| {
                codec::decode(&bytes, max_elements).map_err(|source| DeriveError::Decode {
                    hash: item.hash,
                    source,
                })
            });
            match loaded {
                Ok(delta) => each(first + offset, item, delta)?,
                Err(
                    error @ (DeriveError::Blob(
                        BlobError::NotFound { .. } | BlobError::Corrupt { .. },
                    )
                    | DeriveError::Decode { .. }),
                ) => unreadable.push((item.hash, error.to_string())),
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}

/// Most deltas fetched together by [`for_each_loaded`].
const FETCH_BATCH: usize = 64;

/// Most encoded bytes fetched together by [`for_each_loaded`] (one delta at least).
const FETCH_BATCH_BYTES: u64 = 64 << 20;

fn describe(deltas: &[(BlobHash, String)]) -> String {
    deltas
        .iter()
        .map(|(hash, detail)| format!("{}: {detail}", hash.short()))
        .collect::<Vec<_>>()
        .join("; ")
}

const STATE_MAGIC: &[u8; 4] = b"TRBS";

/// Serializes optimizer state: magic, step, then each moment as a length-prefixed f32 delta.
pub fn encode_state(state: &OptimizerState) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&state.step.to_le_bytes());
    for moment in [&state.first_moment, &state.second_moment] {
        match moment {
            Some(delta) => {
                let bytes = encode_exact(delta);
                out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                out.extend_from_slice(&bytes);
            }
            None => out.extend_from_slice(&u64::MAX.to_le_bytes()),
        }
    }
    out
}

/// Parses [`encode_state`]'s output.
pub fn decode_state(
    hash: BlobHash,
    bytes: &[u8],
    max_elements: usize,
) -> Result<OptimizerState, DeriveError> {
    let bad = |detail: &str| DeriveError::State {
        hash,
        detail: detail.to_owned(),
    };
    let rest = bytes
        .strip_prefix(STATE_MAGIC)
        .ok_or_else(|| bad("bad magic"))?;
    let (step, mut rest) = split_u64(rest).ok_or_else(|| bad("truncated step"))?;
    let mut moments = [None, None];
    for moment in &mut moments {
        let (len, tail) = split_u64(rest).ok_or_else(|| bad("truncated moment length"))?;
        rest = tail;
        if len == u64::MAX {
            continue;
        }
        let len = usize::try_from(len).map_err(|_| bad("moment too long"))?;
        if len > rest.len() {
            return Err(bad("truncated moment"));
        }
        let (body, tail) = rest.split_at(len);
        rest = tail;
        *moment = Some(
            codec::decode(body, max_elements)
                .map_err(|source| DeriveError::Decode { hash, source })?,
        );
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    let [first_moment, second_moment] = moments;
    Ok(OptimizerState {
        step,
        first_moment,
        second_moment,
    })
}

fn split_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (head, tail) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*head), tail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::NamedTensor;

    #[test]
    fn state_round_trips() {
        let moment = Delta::new(vec![
            NamedTensor::new("a", vec![2], vec![1.0, -2.0]).unwrap()
        ])
        .unwrap();
        for state in [
            OptimizerState::default(),
            OptimizerState {
                step: 7,
                first_moment: Some(moment.clone()),
                second_moment: None,
            },
            OptimizerState {
                step: 9,
                first_moment: Some(moment.clone()),
                second_moment: Some(moment),
            },
        ] {
            let bytes = encode_state(&state);
            let hash = BlobHash::of(&bytes);
            assert_eq!(decode_state(hash, &bytes, 100).unwrap(), state);
            assert!(decode_state(hash, &bytes[..bytes.len() - 1], 100).is_err());
        }
    }
}

/// ci-tiny's pinned configuration (the robust default) on a synthetic adapter.
#[cfg(test)]
fn ci_tiny_synthetic(params: u64, tensors: u32) -> ExperimentConfig {
    let mut config: ExperimentConfig = crate::settings::load_experiment_str(
        include_str!("../../../experiments/ci-tiny.toml"),
        "ci-tiny",
        Default::default(),
        &[],
    )
    .expect("ci-tiny loads")
    .pinned();
    config.adapter = tributary_shared::config::AdapterSpec::Synthetic { params, tensors };
    config
}

#[cfg(test)]
mod barring {
    use super::*;
    use tributary_shared::config::ExperimentConfig;
    use tributary_shared::{NamedTensor, TaskId};

    fn accepted(n: u8) -> AcceptedDelta {
        AcceptedDelta {
            hash: BlobHash([n; 32]),
            trainer: TrainerId([n; 32]),
            weight: 1,
            claimed_samples: 1,
            reported_train_loss: 1.0,
            byte_len: 8,
            task: TaskId(u64::from(n)),
            reported_steps: 1,
            reported_tokens: 1,
            reported_train_ms: 1,
            signature: Vec::new(),
        }
    }

    /// ci-tiny's pinned configuration on a two-value adapter, a zero start adapter, and four
    /// deltas from trainers 1 to 4.
    fn round_of_four() -> (ExperimentConfig, Delta, Vec<(AcceptedDelta, Delta)>) {
        let config = ci_tiny_synthetic(2, 1);
        let deltas = (1..=4u8)
            .map(|n| (accepted(n), delta([f32::from(n), 1.0])))
            .collect();
        (config, delta([0.0, 0.0]), deltas)
    }

    fn delta(values: [f32; 2]) -> Delta {
        Delta::new(vec![
            NamedTensor::new("w", vec![2], values.to_vec()).unwrap()
        ])
        .unwrap()
    }

    #[test]
    fn a_flagged_trainers_deltas_are_barred_and_the_rest_aggregate_as_if_it_were_absent() {
        let (config, before, deltas) = round_of_four();
        let state = OptimizerState::default();
        let flagged: BTreeSet<TrainerId> = [TrainerId([3; 32])].into();
        let checks = |flagged| Checks {
            flagged: Some(flagged),
            ..Checks::default()
        };
        let with_flag = derive_round(&config, &before, &deltas, checks(&flagged), &state).unwrap();
        assert_eq!(
            with_flag.verification.barred,
            vec![BarredDelta {
                hash: BlobHash([3; 32]),
                trainer: TrainerId([3; 32]),
            }]
        );
        let without: Vec<_> = deltas
            .iter()
            .filter(|(a, _)| a.trainer.0[0] != 3)
            .cloned()
            .collect();
        let nobody = BTreeSet::new();
        let absent = derive_round(&config, &before, &without, checks(&nobody), &state).unwrap();
        assert_eq!(with_flag.aggregate, absent.aggregate);
        assert!(absent.verification.barred.is_empty());
    }

    #[test]
    fn a_failed_loss_check_withholds_a_delta_of_this_round_and_bars_its_trainer_later() {
        let (config, before, deltas) = round_of_four();
        let answer = |evaluator: u8, baseline: f32, loss: f32| LossAnswer {
            evaluator: TrainerId([evaluator; 32]),
            baseline,
            loss,
            tokens: 64,
        };
        let check = |round: u64, hash: u8, n: u8, loss: f32| LossCheckInput {
            round: RoundId(round),
            delta: BlobHash([hash; 32]),
            trainer: TrainerId([n; 32]),
            // Out of evaluator order: the record sorts them.
            answers: vec![
                answer(9, 3.0, loss),
                answer(8, 3.0, loss),
                answer(7, 9.0, 0.0),
            ],
            wanted: 3,
        };
        // Delta 2 of this round did not lower the loss; delta 1 did; trainer 3's delta of an
        // earlier round did not either.
        let inputs = [
            check(5, 2, 2, 3.0),
            check(5, 1, 1, 2.5),
            check(4, 30, 3, 3.1),
        ];
        let state = OptimizerState::default();
        let nobody = BTreeSet::new();
        let derived = derive_round(
            &config,
            &before,
            &deltas,
            Checks {
                loss_checks: &inputs,
                flagged: Some(&nobody),
                ..Checks::default()
            },
            &state,
        )
        .unwrap();
        let record = &derived.verification;
        let outcomes: Vec<_> = record
            .loss_checks
            .iter()
            .map(|c| (c.round.0, c.delta.0[0], c.outcome, c.withheld))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                (4, 30, LossOutcome::NotLowered, false),
                (5, 1, LossOutcome::Lowered, false),
                (5, 2, LossOutcome::NotLowered, true),
            ]
        );
        assert!(record.loss_checks[0]
            .answers
            .windows(2)
            .all(|w| w[0].evaluator < w[1].evaluator));
        assert_eq!(record.loss_checks[1].improvement, 0.5);
        let flagged: BTreeSet<TrainerId> = record.flagged().collect();
        assert_eq!(flagged, [TrainerId([2; 32]), TrainerId([3; 32])].into());
        // Trainer 3's delta here is barred; delta 2 is withheld by its check, not barred.
        assert_eq!(
            record
                .barred
                .iter()
                .map(|b| b.hash.0[0])
                .collect::<Vec<_>>(),
            vec![3]
        );
        let withheld: BTreeSet<BlobHash> = record.withheld().collect();
        assert_eq!(withheld, [BlobHash([2; 32]), BlobHash([3; 32])].into());
        let kept: Vec<_> = deltas
            .iter()
            .filter(|(a, _)| !withheld.contains(&a.hash))
            .cloned()
            .collect();
        let plain = derive_round(&config, &before, &kept, Checks::default(), &state).unwrap();
        assert_eq!(derived.aggregate, plain.aggregate);
    }
}

#[cfg(test)]
mod streaming {
    use super::*;
    use crate::store::blobs::BlobStore;
    use tributary_shared::config::ExperimentConfig;
    use tributary_shared::{NamedTensor, TaskId};

    const PARAMS: usize = 40;

    fn delta(seed: u32, sign: f32) -> Delta {
        let values = |offset: u32, len: usize| -> Vec<f32> {
            (0..len as u32)
                .map(|i| {
                    let x = (seed * 7919 + (i + offset) * 104_729) % 1000;
                    sign * (0.5 + x as f32 / 1000.0)
                })
                .collect()
        };
        Delta::new(vec![
            NamedTensor::new("w", vec![PARAMS - 10], values(0, PARAMS - 10)).unwrap(),
            NamedTensor::new("v", vec![10], values(500, 10)).unwrap(),
        ])
        .unwrap()
    }

    fn accepted(bytes: &[u8], n: u32) -> AcceptedDelta {
        AcceptedDelta {
            hash: BlobHash::of(bytes),
            trainer: TrainerId([n as u8; 32]),
            weight: u64::from(n % 5 + 1),
            claimed_samples: 1,
            reported_train_loss: 1.0,
            byte_len: bytes.len() as u64,
            task: TaskId(u64::from(n)),
            reported_steps: 1,
            reported_tokens: 1,
            reported_train_ms: 1,
            signature: Vec::new(),
        }
    }

    /// The robust default, on the synthetic layout of [`delta`].
    fn config() -> ExperimentConfig {
        super::ci_tiny_synthetic(PARAMS as u64, 2)
    }

    /// A round streamed from the store, spilled to a scratch file and aggregated a few
    /// coordinates at a time, derives the bits the same deltas give in memory: aggregate,
    /// adapter, state, screening, replica checks (one agreeing, one a sign flip) and referees.
    #[test]
    fn a_round_streamed_from_the_store_derives_the_bits_of_the_round_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let scratch_dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let config = config();
        let put = |delta: &Delta, n: u32| {
            let bytes = codec::encode_to_vec(delta, Codec::Int8 { block: 8 }).unwrap();
            blobs.put(&bytes).unwrap();
            // What the store path decodes, for the in-memory path.
            let decoded = codec::decode(&bytes, PARAMS).unwrap();
            (accepted(&bytes, n), decoded)
        };
        let before = delta(999, 0.1);
        let before_hash = blobs.put(&encode_exact(&before)).unwrap();
        // Eleven honest deltas and two liars (a sign flip and a large one).
        let mut deltas: Vec<(AcceptedDelta, Delta)> =
            (0..11).map(|n| put(&delta(n, 1.0), n)).collect();
        deltas.push(put(&delta(11, -1.0), 11));
        deltas.push(put(&delta(12, 40.0), 12));
        deltas.sort_by_key(|(a, _)| a.hash);
        // Replicas: one agreeing with its counted delta, one not.
        let agreeing = put(&delta(3, 1.0), 20);
        let flipped = put(&delta(5, -1.0), 21);
        let counted = |n: u8| deltas.iter().find(|(a, _)| a.trainer.0[0] == n).unwrap();
        let replicas = vec![
            (counted(3).0.hash, agreeing.0.clone(), agreeing.1.clone()),
            (counted(5).0.hash, flipped.0.clone(), flipped.1.clone()),
        ];
        // A referee settling an earlier dispute between deltas 1 and 2, siding with 1.
        let referee = put(&delta(1, 1.0), 30);
        let input = RefereeInput {
            round: RoundId(0),
            counted: counted(1).0.hash,
            counted_trainer: counted(1).0.trainer,
            replica: counted(2).0.hash,
            replica_trainer: counted(2).0.trainer,
            referee: referee.0.clone(),
        };
        let refereed = vec![(
            input.clone(),
            referee.1.clone(),
            counted(1).1.clone(),
            counted(2).1.clone(),
        )];
        let state = OptimizerState::default();
        let nobody = BTreeSet::new();
        let in_memory = derive_round(
            &config,
            &before,
            &deltas,
            Checks {
                replicas: &replicas,
                refereed: &refereed,
                loss_checks: &[],
                flagged: Some(&nobody),
            },
            &state,
        )
        .unwrap();
        assert_eq!(in_memory.verification.checks.len(), 2);
        // Delta 5 (its replica disagrees) and delta 2 (its trainer lost the dispute here).
        assert_eq!(in_memory.verification.withheld().count(), 2);
        assert!(in_memory.verification.screening.iter().any(|s| !s.kept));
        let accepted: Vec<AcceptedDelta> = deltas.iter().map(|(a, _)| a.clone()).collect();
        let replica_inputs: Vec<(BlobHash, AcceptedDelta)> = replicas
            .iter()
            .map(|(counted, replica, _)| (*counted, replica.clone()))
            .collect();
        for (in_memory_bytes, slab_bytes) in [(usize::MAX, 64 << 20), (0, 3 * 13 * 4), (0, 1)] {
            let scratch = Scratch {
                dir: scratch_dir.path().to_path_buf(),
                in_memory: in_memory_bytes,
                slab: slab_bytes,
            };
            let streamed = derive_from_store(
                &config,
                &blobs,
                RoundInputs {
                    adapter_before: &before_hash,
                    accepted: &accepted,
                    replicas: &replica_inputs,
                    referees: std::slice::from_ref(&input),
                    loss_checks: &[],
                    flagged: &nobody,
                },
                &state,
                &scratch,
            )
            .unwrap();
            assert_eq!(
                encode_exact(&streamed.aggregate),
                encode_exact(&in_memory.aggregate)
            );
            assert_eq!(
                encode_exact(&streamed.adapter_after),
                encode_exact(&in_memory.adapter_after)
            );
            assert_eq!(streamed.verification, in_memory.verification);
            assert_eq!(streamed.state, in_memory.state);
        }
        assert_eq!(std::fs::read_dir(scratch_dir.path()).unwrap().count(), 0);
    }

    /// A delta gone from the store is reported unreadable with the others, whatever the batch.
    #[test]
    fn missing_deltas_are_reported_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let config = config();
        let before = delta(999, 0.1);
        let before_hash = blobs.put(&encode_exact(&before)).unwrap();
        let mut accepted_deltas = Vec::new();
        for n in 0..70 {
            let bytes = codec::encode_to_vec(&delta(n, 1.0), Codec::F32).unwrap();
            if n % 30 != 7 {
                blobs.put(&bytes).unwrap();
            }
            accepted_deltas.push(accepted(&bytes, n));
        }
        accepted_deltas.sort_by_key(|a| a.hash);
        let error = derive_from_store(
            &config,
            &blobs,
            RoundInputs {
                adapter_before: &before_hash,
                accepted: &accepted_deltas,
                replicas: &[],
                referees: &[],
                loss_checks: &[],
                flagged: &BTreeSet::new(),
            },
            &OptimizerState::default(),
            &Scratch::in_dir(dir.path()),
        )
        .unwrap_err();
        match error {
            DeriveError::Unreadable { deltas } => assert_eq!(deltas.len(), 3),
            other => panic!("{other}"),
        }
    }
}
