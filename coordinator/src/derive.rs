//! Deriving a round's result from its inputs: the one computation both `serve` (closing a round)
//! and `verify` (re-checking it later) run, so they cannot disagree.
//!
//! The adapter before the round, the accepted deltas (sorted by hash, with their weights) and the
//! server optimizer state determine the aggregate, the adapter after and the new optimizer state,
//! bit for bit.

use tributary_shared::aggregate::{aggregate, AggregateError, Contribution, OptimizerState};
use tributary_shared::codec::{self, Codec, CodecError};
use tributary_shared::config::ExperimentConfig;
use tributary_shared::ledger::AcceptedDelta;
use tributary_shared::{BlobHash, Delta};

use crate::store::blobs::BlobError;
use crate::store::BlobSource;

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

/// Runs aggregation and the server step.
pub fn derive_round(
    config: &ExperimentConfig,
    adapter_before: &Delta,
    deltas: &[(AcceptedDelta, Delta)],
    state: &OptimizerState,
) -> Result<Derived, DeriveError> {
    let contributions: Vec<Contribution<'_>> = deltas
        .iter()
        .map(|(accepted, delta)| Contribution {
            hash: accepted.hash,
            weight: accepted.weight as f64,
            delta,
        })
        .collect();
    let aggregated = aggregate(&config.aggregation(), &contributions)?;
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
    })
}

/// Loads a round's inputs from the blob store and derives it.
pub fn derive_from_store(
    config: &ExperimentConfig,
    blobs: &dyn BlobSource,
    adapter_before: &BlobHash,
    accepted: &[AcceptedDelta],
    state: &OptimizerState,
) -> Result<Derived, DeriveError> {
    let max_elements = config
        .adapter
        .layout()
        .map(|layout| layout.element_count())
        .unwrap_or(usize::MAX);
    let adapter = load_delta(blobs, adapter_before, max_elements)?;
    let deltas = load_accepted(blobs, accepted, max_elements)?;
    derive_round(config, &adapter, &deltas, state)
}

/// Loads every accepted delta; [`DeriveError::Unreadable`] names all that are gone or damaged
/// for good, any other error is one that may pass (i/o).
fn load_accepted(
    blobs: &dyn BlobSource,
    accepted: &[AcceptedDelta],
    max_elements: usize,
) -> Result<Vec<(AcceptedDelta, Delta)>, DeriveError> {
    let mut deltas = Vec::with_capacity(accepted.len());
    let mut unreadable = Vec::new();
    for item in accepted {
        match load_delta(blobs, &item.hash, max_elements) {
            Ok(delta) => deltas.push((item.clone(), delta)),
            Err(
                error @ (DeriveError::Blob(BlobError::NotFound { .. } | BlobError::Corrupt { .. })
                | DeriveError::Decode { .. }),
            ) => unreadable.push((item.hash, error.to_string())),
            Err(error) => return Err(error),
        }
    }
    if unreadable.is_empty() {
        Ok(deltas)
    } else {
        Err(DeriveError::Unreadable { deltas: unreadable })
    }
}

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
