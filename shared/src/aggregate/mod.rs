//! Aggregation of client deltas and the server optimizers that apply the result.
//!
//! A round ends with a set of accepted [`Contribution`]s (a delta, its content hash and its
//! weight). [`aggregate`] turns them into one delta under an [`AggregationConfig`]: optional norm
//! clipping, then FedAvg, a coordinate-wise trimmed mean or a coordinate-wise median. A
//! [`ServerOptimizer`] then applies that delta to the adapter, carrying its moments across rounds
//! in an [`OptimizerState`].
//!
//! # Determinism
//!
//! Every result here is reproducible bit for bit on any IEEE-754 machine and for any arrival
//! order:
//!
//! - contributions are sorted first, by hash, then weight, then content (so even duplicate hashes
//!   cannot make the order depend on arrival);
//! - every sum runs in f64 in that sorted order, one coordinate at a time, with no parallel or
//!   tree reduction; values are cast to f32 once, at the end (the one exception, the norm used
//!   for clipping, uses a fixed set of interleaved partial sums, see [`aggregate`]);
//! - coordinate-wise rules sort each coordinate's values (negative zeros made positive), so that
//!   equal values are identical bit patterns and the sorted column is unique;
//! - the optimizers work element by element with f32 operations in the order their docs spell
//!   out. Rust never fuses a multiply and an add on its own, and `sqrt` is correctly rounded.
//!
//! Non-finite values (NaN, infinity) in any contribution are rejected under every rule.
//!
//! This module deliberately does not decide which contributions to accept, nor does it hash,
//! decode or store deltas; the coordinator does.
//!
//! # Example
//!
//! ```
//! use tributary_shared::aggregate::{aggregate, AggregationConfig, Contribution, OptimizerState, ServerOptimizer};
//! use tributary_shared::{BlobHash, Delta, NamedTensor};
//!
//! let delta = |values: Vec<f32>| Delta::new(vec![NamedTensor::new("w", vec![2], values).unwrap()]).unwrap();
//! let (small, large) = (delta(vec![1.0, 2.0]), delta(vec![5.0, 6.0]));
//! let contributions = [
//!     Contribution { hash: BlobHash::of(b"small"), weight: 1.0, delta: &small },
//!     Contribution { hash: BlobHash::of(b"large"), weight: 3.0, delta: &large },
//! ];
//! let averaged = aggregate(&AggregationConfig::default(), &contributions).unwrap();
//! assert_eq!(averaged.tensors()[0].values(), &[4.0, 5.0]);
//!
//! let mut adapter = delta(vec![0.0, 0.0]);
//! let mut state = OptimizerState::default();
//! ServerOptimizer::default().apply(&mut state, &mut adapter, &averaged).unwrap();
//! assert_eq!(adapter.tensors()[0].values(), &[4.0, 5.0]);
//! assert_eq!(state.step, 1);
//! ```

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::delta::{Delta, DeltaError, Layout};
use crate::ids::BlobHash;

mod slabs;

pub use slabs::{aggregate_rows, copy_flat, Aggregated, DeltaRows, Rows, Summary};

/// One accepted client update.
#[derive(Clone, Copy, Debug)]
pub struct Contribution<'a> {
    /// The hash of the delta's content (its blob hash). It orders the contributions; two
    /// contributions with equal hashes are ordered by weight, then by content.
    pub hash: BlobHash,
    /// The weight under FedAvg, normally the number of training samples: finite and > 0. The
    /// trimmed mean and the median are unweighted but check it all the same.
    pub weight: f64,
    /// The update: adapter after minus adapter before.
    pub delta: &'a Delta,
}

/// How contributions are combined, coordinate by coordinate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AggregationRule {
    /// Mean weighted by [`Contribution::weight`].
    #[default]
    FedAvg,
    /// Per coordinate: drop the `floor(trim_fraction * n)` lowest and as many highest values, and
    /// take the unweighted mean of the rest (Yin et al. 2018).
    TrimmedMean {
        /// Fraction trimmed at each end, in `[0, 0.5)`.
        trim_fraction: f64,
    },
    /// Per coordinate median, unweighted; the mean of the two middle values for even `n`.
    Median,
    /// The default for experiments open to strangers: the trimmed mean when the round has at
    /// least `min_contributions` deltas (enough that trimming cannot remove the honest
    /// majority), else FedAvg. Combine it with `clip_to_median`, which bounds every delta's
    /// pull in either case.
    Robust {
        /// Fraction trimmed at each end when trimming, in `[0, 0.5)`.
        trim_fraction: f64,
        /// Fewest deltas for which the trimmed mean is used.
        min_contributions: u32,
    },
}

/// Aggregation settings of an experiment.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AggregationConfig {
    /// The combining rule.
    pub rule: AggregationRule,
    /// If set, each contribution is first scaled down to this L2 norm when its norm is larger
    /// (norm clipping, as in DP-FedAvg). Finite and > 0.
    pub clip_norm: Option<f64>,
    /// If set, each contribution is first scaled down to this multiple of the round's median
    /// contribution norm when its norm is larger: a bound that follows the honest deltas' own
    /// scale, whatever it is. Finite and ≥ 1. With `clip_norm` too, the smaller bound applies.
    pub clip_to_median: Option<f64>,
    /// If set, from three contributions up, a (clipped) contribution whose cosine similarity
    /// with the round's coordinate-wise median is below this fraction of the contributions'
    /// median similarity is left out: noise, sign flips and zero deltas point nowhere the honest
    /// majority does, however small their norm. In `(0, 1]`.
    pub min_agreement: Option<f64>,
}

impl AggregationConfig {
    /// The default for an experiment open to strangers: deltas clipped to twice the round's
    /// median norm, those that disagree with the majority's direction left out (less than half
    /// the median cosine similarity with the coordinate-wise median), then the trimmed mean
    /// (20 % at each end) from five deltas up, FedAvg below.
    pub fn robust() -> Self {
        Self {
            rule: AggregationRule::Robust {
                trim_fraction: 0.2,
                min_contributions: 5,
            },
            clip_norm: None,
            clip_to_median: Some(2.0),
            min_agreement: Some(0.5),
        }
    }
}

impl AggregationConfig {
    /// Checks the values: `trim_fraction` in `[0, 0.5)`, `clip_norm` finite and > 0.
    pub fn validate(&self) -> Result<(), AggregateError> {
        if let AggregationRule::TrimmedMean { trim_fraction }
        | AggregationRule::Robust { trim_fraction, .. } = self.rule
        {
            if !(0.0..0.5).contains(&trim_fraction) {
                return Err(invalid(
                    "trim_fraction",
                    format!("{trim_fraction} is not in [0, 0.5)"),
                ));
            }
        }
        if let Some(clip_norm) = self.clip_norm {
            if !(clip_norm.is_finite() && clip_norm > 0.0) {
                return Err(invalid(
                    "clip_norm",
                    format!("{clip_norm} is not a finite positive number"),
                ));
            }
        }
        if let Some(fraction) = self.min_agreement {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(invalid(
                    "min_agreement",
                    format!("{fraction} is not in (0, 1]"),
                ));
            }
        }
        if let Some(multiple) = self.clip_to_median {
            if !(multiple.is_finite() && multiple >= 1.0) {
                return Err(invalid(
                    "clip_to_median",
                    format!("{multiple} is not a finite number of at least 1"),
                ));
            }
        }
        Ok(())
    }
}

/// Aggregates `contributions` into one delta with their common layout.
///
/// The result is bit-for-bit identical for any order of `contributions`. The steps, in order:
///
/// 1. The contributions are sorted by hash, then weight (`total_cmp`), then content.
/// 2. With a clipping bound `b` (`clip_norm`, or `clip_to_median × m` where `m` is the median
///    of the contributions' norms — the middle one in ascending `total_cmp` order, or the mean
///    of the two middle ones, `(lo + hi) / 2`, for an even count — or the smaller of the two),
///    contribution `i` gets `scale_i = b / norm_i` when its L2 norm exceeds `b`, else
///    `scale_i = 1`. The norm is summed in f64 in a fixed order that vectorises: within each
///    tensor, the square of value `k` goes to partial sum `k % 8`, in index order; the 8 partial
///    sums are added in lane order, the tensor totals in tensor (name) order, and the square root
///    is taken last. It can differ from [`Delta::l2_norm`] (one sequential chain, several times
///    slower) in the last bits.
///    With `min_agreement`, contributions that disagree with the majority's direction are then
///    left out before the rule runs (see `agreeing`: cosine similarity with the coordinate-wise
///    median of the scaled contributions, against a fraction of the median similarity).
/// 3. FedAvg: `total = (0 + w_0) + w_1 + ...` in sorted order (f64); each coordinate is
///    `((0 + c_0 * x_0) + c_1 * x_1) + ...` in f64, in sorted order, with
///    `c_i = (w_i / total) * scale_i`, then cast to f32.
/// 4. Trimmed mean and median: each coordinate's values `x_i * scale_i + 0` (f64; adding 0 makes
///    a negative zero positive) are sorted ascending. Both rules then average a range of ranks:
///    `((0 + v_lo) + v_lo+1 + ... + v_hi) / (hi - lo + 1)` in f64, then cast to f32. The trimmed
///    mean keeps ranks `k..n-k` with `k = floor(trim_fraction * n)`; the median keeps the middle
///    rank, or the two middle ranks of an even count. `Robust` is the trimmed mean from
///    `min_contributions` up and FedAvg below.
///
/// # Errors
///
/// [`AggregateError::InvalidConfig`] for a bad `config`, [`AggregateError::NoContributions`] for
/// an empty slice, and, naming the first offending contribution in sorted order,
/// [`AggregateError::BadWeight`], [`AggregateError::LayoutMismatch`] (against the first
/// contribution in sorted order) and [`AggregateError::NonFinite`].
pub fn aggregate(
    config: &AggregationConfig,
    contributions: &[Contribution<'_>],
) -> Result<Delta, AggregateError> {
    in_memory(config, contributions, false).map(|aggregated| aggregated.delta)
}

/// Bytes of values one slab takes when contributions in memory are aggregated: the rules copy
/// one slab of every contribution at a time.
const IN_MEMORY_SLAB_BUDGET: usize = 32 << 20;

/// [`aggregate`] and, with `screening`, [`screen`], through [`aggregate_rows`]'s code.
fn in_memory(
    config: &AggregationConfig,
    contributions: &[Contribution<'_>],
    screening: bool,
) -> Result<Aggregated, AggregateError> {
    config.validate()?;
    let sorted = sorted_and_checked(contributions)?;
    let summaries = sorted
        .iter()
        .map(|c| Summary::of(c.hash, c.weight, c.delta))
        .collect::<Result<Vec<_>, _>>()?;
    let layout = sorted[0].delta.layout();
    let mut rows = DeltaRows::new(sorted.iter().map(|c| c.delta).collect());
    slabs::aggregate_slabs(
        config,
        &layout,
        &summaries,
        &mut rows,
        IN_MEMORY_SLAB_BUDGET,
        screening,
    )
}

/// A server-side optimizer applying the aggregated delta to the adapter.
///
/// Each variant updates every element independently, with f32 operations in exactly the order
/// written (left to right, parentheses as shown), so results are reproducible bit for bit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerOptimizer {
    /// `adapter += learning_rate * aggregated` (learning rate 1.0 is classic FedAvg).
    Plain {
        /// Server learning rate, finite and > 0.
        learning_rate: f32,
    },
    /// DiLoCo-style outer step (Douillard et al. 2023). The outer gradient is
    /// `g = -aggregated`; `m = beta * m + g`; `step = nesterov ? g + beta * m : m`;
    /// `adapter -= learning_rate * step`. Keeps `m` in [`OptimizerState::first_moment`].
    Momentum {
        /// Outer learning rate, finite and > 0.
        learning_rate: f32,
        /// Momentum, in `[0, 1)`.
        beta: f32,
        /// Nesterov momentum (DiLoCo's default) instead of heavy-ball.
        nesterov: bool,
    },
    /// FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"), without bias correction:
    /// `g = -aggregated`; `m = beta1 * m + (1 - beta1) * g`;
    /// `v = beta2 * v + (1 - beta2) * (g * g)`;
    /// `adapter -= (learning_rate * m) / (sqrt(v) + epsilon)`. Keeps `m` and `v` in the state.
    Adam {
        /// Server learning rate, finite and > 0.
        learning_rate: f32,
        /// First-moment decay, in `[0, 1)`.
        beta1: f32,
        /// Second-moment decay, in `[0, 1)`.
        beta2: f32,
        /// Adaptivity floor, finite and > 0 (the paper suggests 1e-3).
        epsilon: f32,
    },
}

impl Default for ServerOptimizer {
    fn default() -> Self {
        Self::Plain { learning_rate: 1.0 }
    }
}

impl ServerOptimizer {
    /// Checks the values: learning rate finite and > 0, betas in `[0, 1)`, epsilon finite and > 0.
    pub fn validate(&self) -> Result<(), AggregateError> {
        match *self {
            Self::Plain { learning_rate } => check_learning_rate(learning_rate),
            Self::Momentum {
                learning_rate,
                beta,
                nesterov: _,
            } => {
                check_learning_rate(learning_rate)?;
                check_beta("beta", beta)
            }
            Self::Adam {
                learning_rate,
                beta1,
                beta2,
                epsilon,
            } => {
                check_learning_rate(learning_rate)?;
                check_beta("beta1", beta1)?;
                check_beta("beta2", beta2)?;
                if !(epsilon.is_finite() && epsilon > 0.0) {
                    return Err(invalid(
                        "epsilon",
                        format!("{epsilon} is not a finite positive number"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Applies one server step: updates `state` and `adapter` in place and counts the step.
    ///
    /// Moments missing from `state` are created as zeros with the adapter's layout; moments the
    /// variant does not use are left as they are. `aggregated` is expected to be finite, as
    /// [`aggregate`] guarantees.
    ///
    /// # Errors
    ///
    /// [`AggregateError::InvalidConfig`] for bad settings, [`AggregateError::StateMismatch`] when
    /// `aggregated` or a stored moment does not have the adapter's layout. On error nothing is
    /// changed.
    pub fn apply(
        &self,
        state: &mut OptimizerState,
        adapter: &mut Delta,
        aggregated: &Delta,
    ) -> Result<(), AggregateError> {
        self.validate()?;
        let layout = adapter.layout();
        aggregated
            .check_layout(&layout)
            .map_err(|source| AggregateError::StateMismatch {
                what: "aggregated delta",
                source,
            })?;
        match *self {
            Self::Plain { learning_rate } => {
                for (tensor, update) in adapter.tensors_mut().zip(aggregated.tensors()) {
                    for (value, &update) in tensor.values_mut().iter_mut().zip(update.values()) {
                        *value += learning_rate * update;
                    }
                }
            }
            Self::Momentum {
                learning_rate,
                beta,
                nesterov,
            } => {
                check_moment(state.first_moment.as_ref(), &layout, "first moment")?;
                let first_moment = moment_or_zeros(&mut state.first_moment, &layout);
                let tensors = adapter
                    .tensors_mut()
                    .zip(first_moment.tensors_mut())
                    .zip(aggregated.tensors());
                for ((tensor, momentum), update) in tensors {
                    let elements = tensor
                        .values_mut()
                        .iter_mut()
                        .zip(momentum.values_mut())
                        .zip(update.values());
                    for ((value, momentum), &update) in elements {
                        let gradient = -update;
                        *momentum = beta * *momentum + gradient;
                        let step = if nesterov {
                            gradient + beta * *momentum
                        } else {
                            *momentum
                        };
                        *value -= learning_rate * step;
                    }
                }
            }
            Self::Adam {
                learning_rate,
                beta1,
                beta2,
                epsilon,
            } => {
                check_moment(state.first_moment.as_ref(), &layout, "first moment")?;
                check_moment(state.second_moment.as_ref(), &layout, "second moment")?;
                let first_moment = moment_or_zeros(&mut state.first_moment, &layout);
                let second_moment = moment_or_zeros(&mut state.second_moment, &layout);
                let one_minus_beta1 = 1.0 - beta1;
                let one_minus_beta2 = 1.0 - beta2;
                let tensors = adapter
                    .tensors_mut()
                    .zip(first_moment.tensors_mut())
                    .zip(second_moment.tensors_mut())
                    .zip(aggregated.tensors());
                for (((tensor, first), second), update) in tensors {
                    let elements = tensor
                        .values_mut()
                        .iter_mut()
                        .zip(first.values_mut())
                        .zip(second.values_mut())
                        .zip(update.values());
                    for (((value, first), second), &update) in elements {
                        let gradient = -update;
                        *first = beta1 * *first + one_minus_beta1 * gradient;
                        *second = beta2 * *second + one_minus_beta2 * (gradient * gradient);
                        *value -= (learning_rate * *first) / (second.sqrt() + epsilon);
                    }
                }
            }
        }
        state.step = state.step.saturating_add(1);
        Ok(())
    }
}

/// Server optimizer state carried across rounds; the coordinator persists it between rounds as
/// deltas. Moments have the adapter's layout once created.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct OptimizerState {
    /// Server steps applied so far.
    pub step: u64,
    /// Momentum (`Momentum`) or first moment (`Adam`); `None` until first needed.
    pub first_moment: Option<Delta>,
    /// Second moment (`Adam`); `None` until first needed.
    pub second_moment: Option<Delta>,
}

/// Why an aggregation or a server step was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// Nothing to aggregate.
    #[error("no contributions to aggregate")]
    NoContributions,
    /// A weight that is not a finite positive number, or weights whose sum overflows.
    #[error("contribution {hash} has weight {weight}; weights must be finite, positive and have a finite sum")]
    BadWeight {
        /// The contribution.
        hash: BlobHash,
        /// Its weight.
        weight: f64,
    },
    /// A contribution's names or shapes differ from the first contribution's (in hash order).
    #[error("contribution {hash} does not match the layout of contribution {reference}: {source}")]
    LayoutMismatch {
        /// The offending contribution.
        hash: BlobHash,
        /// The contribution whose layout was expected.
        reference: BlobHash,
        /// What differs.
        source: DeltaError,
    },
    /// A contribution holds a NaN or an infinity.
    #[error("contribution {hash} has a non-finite value: {source}")]
    NonFinite {
        /// The offending contribution.
        hash: BlobHash,
        /// Where.
        source: DeltaError,
    },
    /// A setting out of range.
    #[error("invalid setting {key}: {detail}")]
    InvalidConfig {
        /// The setting's name, e.g. `trim_fraction`.
        key: &'static str,
        /// The bad value and the allowed range.
        detail: String,
    },
    /// Summaries handed to [`aggregate_rows`] out of aggregation order.
    #[error("contribution {hash} is out of aggregation order (ascending hash, then weight)")]
    Unsorted {
        /// The first contribution out of order.
        hash: BlobHash,
    },
    /// A contribution's values could not be read back ([`Rows::read`]).
    #[error("cannot read contribution {hash}: {detail}")]
    Read {
        /// The contribution.
        hash: BlobHash,
        /// Why.
        detail: String,
    },
    /// Finite contributions gave a non-finite result (it cannot happen: the coefficients are a
    /// convex combination and the scales at most 1).
    #[error("the aggregate is not finite")]
    NonFiniteResult,
    /// The aggregated delta or a stored optimizer moment does not have the adapter's layout.
    #[error("{what} does not match the adapter's layout: {source}")]
    StateMismatch {
        /// `aggregated delta`, `first moment` or `second moment`.
        what: &'static str,
        /// What differs.
        source: DeltaError,
    },
}

/// Partial sums in [`clipping_norm`].
const NORM_LANES: usize = 8;

fn invalid(key: &'static str, detail: String) -> AggregateError {
    AggregateError::InvalidConfig { key, detail }
}

fn check_learning_rate(learning_rate: f32) -> Result<(), AggregateError> {
    if learning_rate.is_finite() && learning_rate > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            "learning_rate",
            format!("{learning_rate} is not a finite positive number"),
        ))
    }
}

fn check_beta(key: &'static str, beta: f32) -> Result<(), AggregateError> {
    if (0.0..1.0).contains(&beta) {
        Ok(())
    } else {
        Err(invalid(key, format!("{beta} is not in [0, 1)")))
    }
}

fn check_moment(
    moment: Option<&Delta>,
    layout: &Layout,
    what: &'static str,
) -> Result<(), AggregateError> {
    match moment {
        Some(moment) => moment
            .check_layout(layout)
            .map_err(|source| AggregateError::StateMismatch { what, source }),
        None => Ok(()),
    }
}

fn moment_or_zeros<'a>(moment: &'a mut Option<Delta>, layout: &Layout) -> &'a mut Delta {
    moment.get_or_insert_with(|| Delta::zeros(layout).expect("the adapter's own layout is valid"))
}

/// Sorts by hash, weight and content, then checks weights and layouts in that order.
fn sorted_and_checked<'c, 'd>(
    contributions: &'c [Contribution<'d>],
) -> Result<Vec<&'c Contribution<'d>>, AggregateError> {
    if contributions.is_empty() {
        return Err(AggregateError::NoContributions);
    }
    let mut sorted: Vec<&Contribution<'_>> = contributions.iter().collect();
    // Elements comparing equal are identical in hash, weight bits and content, so an unstable
    // sort yields one order whatever the input order.
    sorted.sort_unstable_by(|left, right| {
        left.hash
            .cmp(&right.hash)
            .then_with(|| left.weight.total_cmp(&right.weight))
            .then_with(|| compare_deltas(left.delta, right.delta))
    });
    let mut total_weight = 0.0f64;
    for contribution in &sorted {
        total_weight += contribution.weight;
        let weight = contribution.weight;
        if !(weight.is_finite() && weight > 0.0 && total_weight.is_finite()) {
            return Err(AggregateError::BadWeight {
                hash: contribution.hash,
                weight,
            });
        }
    }
    let reference = sorted[0];
    let layout = reference.delta.layout();
    for contribution in &sorted[1..] {
        contribution.delta.check_layout(&layout).map_err(|source| {
            AggregateError::LayoutMismatch {
                hash: contribution.hash,
                reference: reference.hash,
                source,
            }
        })?;
    }
    Ok(sorted)
}

/// A total order on deltas: tensor by tensor, name, shape, then values by `total_cmp`.
fn compare_deltas(left: &Delta, right: &Delta) -> Ordering {
    if std::ptr::eq(left, right) {
        return Ordering::Equal;
    }
    for (left, right) in left.tensors().iter().zip(right.tensors()) {
        let ordering = left
            .name()
            .cmp(right.name())
            .then_with(|| left.shape().cmp(right.shape()))
            .then_with(|| compare_values(left.values(), right.values()));
        if ordering.is_ne() {
            return ordering;
        }
    }
    left.tensors().len().cmp(&right.tensors().len())
}

fn compare_values(left: &[f32], right: &[f32]) -> Ordering {
    for (left, right) in left.iter().zip(right) {
        let ordering = left.total_cmp(right);
        if ordering.is_ne() {
            return ordering;
        }
    }
    left.len().cmp(&right.len())
}

/// What screening found for one contribution: the numbers aggregation decided on, recorded in
/// the round's ledger entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Screening {
    /// The contribution's hash.
    pub hash: BlobHash,
    /// Its L2 norm, summed as clipping sums it.
    pub norm: f64,
    /// The clipping scale applied (1 when not clipped).
    pub scale: f64,
    /// Cosine similarity of the clipped contribution with the round's coordinate-wise median
    /// (`None` below three contributions, where there is no majority to agree with).
    pub cosine: Option<f64>,
    /// The largest ratio of one of its tensors' norm to the median norm of that tensor over the
    /// round (a delta that puts its weight in one layer stands out here).
    pub max_tensor_ratio: f64,
    /// Whether it was aggregated; `false` when the agreement filter left it out.
    pub kept: bool,
}

/// Screens every contribution as [`aggregate`] would, in its sorted order: norm, clipping
/// scale, cosine with the coordinate-wise median, per-tensor norm ratio, and whether the
/// agreement filter keeps it. The same code decides in [`aggregate`], so the record cannot
/// disagree with the aggregate.
///
/// # Errors
///
/// As [`aggregate`]: a bad config, no contributions, a bad weight, a layout mismatch, or a
/// non-finite value.
pub fn screen(
    config: &AggregationConfig,
    contributions: &[Contribution<'_>],
) -> Result<Vec<Screening>, AggregateError> {
    in_memory(config, contributions, true).map(|aggregated| aggregated.screening)
}

/// The median of `values` (not empty): the middle one in ascending `total_cmp` order, or the
/// mean of the two middle ones.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The L2 norm used for clipping, in the fixed order [`aggregate`] documents: within each tensor,
/// the square of value `k` (in f64) is added to partial sum `k % NORM_LANES`, in index order; the
/// partial sums are added in lane order, the tensor totals in tensor (name) order, and the square
/// root is taken last.
fn clipping_norm(delta: &Delta) -> f64 {
    let mut total = 0.0f64;
    for tensor in delta.tensors() {
        let mut lanes = [0.0f64; NORM_LANES];
        let chunks = tensor.values().chunks_exact(NORM_LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (lane, &value) in lanes.iter_mut().zip(chunk) {
                let value = f64::from(value);
                *lane += value * value;
            }
        }
        for (lane, &value) in lanes.iter_mut().zip(tail) {
            let value = f64::from(value);
            *lane += value * value;
        }
        let mut tensor_total = 0.0f64;
        for lane in lanes {
            tensor_total += lane;
        }
        total += tensor_total;
    }
    total.sqrt()
}

/// Batcher's merge-exchange sorting network for `n` inputs (Knuth, TAOCP vol. 3, 5.2.2,
/// Algorithm M): compare-exchange pairs `(low, high)`, `low < high`, to apply in order. 63 pairs
/// for 16 inputs.
fn merge_exchange_network(n: usize) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    if n < 2 {
        return pairs;
    }
    let t = usize::BITS - (n - 1).leading_zeros(); // ceil(log2 n)
    let mut p = 1usize << (t - 1);
    while p > 0 {
        let (mut q, mut r, mut d) = (1usize << (t - 1), 0usize, p);
        loop {
            for i in 0..n - d {
                if i & p == r {
                    pairs.push((i, i + d));
                }
            }
            if q == p {
                break;
            }
            d = q - p;
            q /= 2;
            r = p;
        }
        p /= 2;
    }
    pairs
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::aggregate::*;
    use crate::delta::NamedTensor;

    /// A one-tensor delta named `w` of shape `[values.len()]`.
    fn delta(values: &[f32]) -> Delta {
        Delta::new(vec![NamedTensor::new(
            "w",
            vec![values.len()],
            values.to_vec(),
        )
        .unwrap()])
        .unwrap()
    }

    fn hash(index: usize) -> BlobHash {
        BlobHash::of(&index.to_le_bytes())
    }

    fn aggregate_values(
        config: AggregationConfig,
        inputs: &[(f64, &[f32])],
    ) -> Result<Vec<f32>, AggregateError> {
        let deltas: Vec<Delta> = inputs.iter().map(|(_, values)| delta(values)).collect();
        let contributions: Vec<Contribution<'_>> = inputs
            .iter()
            .zip(&deltas)
            .enumerate()
            .map(|(index, ((weight, _), delta))| Contribution {
                hash: hash(index),
                weight: *weight,
                delta,
            })
            .collect();
        aggregate(&config, &contributions).map(|result| result.tensors()[0].values().to_vec())
    }

    /// Aggregates `(weight, values)` inputs and compares with `expected` within 1e-6.
    fn check(config: AggregationConfig, inputs: &[(f64, &[f32])], expected: &[f32]) {
        let actual = aggregate_values(config, inputs).unwrap();
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (a - e).abs() <= 1e-6 * e.abs().max(1.0),
                "{config:?}: got {actual:?}, expected {expected:?}"
            );
        }
    }

    fn config(rule: AggregationRule, clip_norm: Option<f64>) -> AggregationConfig {
        AggregationConfig {
            rule,
            clip_norm,
            clip_to_median: None,
            min_agreement: None,
        }
    }

    const FED_AVG: AggregationRule = AggregationRule::FedAvg;
    const MEDIAN: AggregationRule = AggregationRule::Median;

    fn trimmed(trim_fraction: f64) -> AggregationRule {
        AggregationRule::TrimmedMean { trim_fraction }
    }

    #[test]
    fn fed_avg_weights_by_sample_count() {
        check(config(FED_AVG, None), &[(1.0, &[1.0, 2.0])], &[1.0, 2.0]);
        check(
            config(FED_AVG, None),
            &[(1.0, &[1.0, 2.0]), (3.0, &[5.0, 6.0])],
            &[4.0, 5.0],
        );
        check(
            config(FED_AVG, None),
            &[(2.0, &[-1.0, 0.0]), (2.0, &[1.0, 8.0]), (4.0, &[0.5, -2.0])],
            &[0.25, 1.0],
        );
    }

    #[test]
    fn clipping_scales_large_deltas_only() {
        let clipped = config(FED_AVG, Some(1.0));
        check(clipped, &[(1.0, &[3.0, 4.0])], &[0.6, 0.8]);
        check(clipped, &[(1.0, &[0.3, 0.4])], &[0.3, 0.4]);
        check(
            clipped,
            &[(1.0, &[30.0, 40.0]), (1.0, &[0.3, 0.4])],
            &[0.45, 0.6],
        );
        // The clipped contribution's norm is the clip norm.
        let values = aggregate_values(clipped, &[(1.0, &[30.0, 40.0, 0.0])]).unwrap();
        assert!((delta(&values).l2_norm() - 1.0).abs() < 1e-6, "{values:?}");
        // Clipping applies before the coordinate-wise rules too.
        check(
            config(MEDIAN, Some(1.0)),
            &[(1.0, &[3.0, 4.0]), (1.0, &[0.3, 0.4]), (1.0, &[0.9, 0.0])],
            &[0.6, 0.4],
        );
    }

    #[test]
    fn robust_rules_resist_one_huge_outlier() {
        let inputs: &[(f64, &[f32])] = &[
            (1.0, &[1.0, -3.0]),
            (1.0, &[2.0, -2.0]),
            (1.0, &[3.0, -1.0]),
            (1.0, &[4.0, 0.0]),
            (100.0, &[1e9, -1e9]),
        ];
        check(config(trimmed(0.2), None), inputs, &[3.0, -2.0]);
        check(
            config(trimmed(0.1), None),
            inputs,
            &[(1e9 + 10.0) / 5.0, -2e8 - 1.2],
        );
        check(
            config(trimmed(0.0), None),
            inputs,
            &[(1e9 + 10.0) / 5.0, -2e8 - 1.2],
        );
        check(config(MEDIAN, None), inputs, &[3.0, -2.0]);
        check(config(MEDIAN, None), &inputs[1..], &[3.5, -1.5]);
        check(config(trimmed(0.49), None), &inputs[1..], &[3.5, -1.5]);
        // Weights play no part in the coordinate-wise rules.
        check(
            config(MEDIAN, None),
            &[(1.0, &[1.0]), (99.0, &[3.0])],
            &[2.0],
        );
    }

    #[test]
    fn aggregation_errors() {
        assert_eq!(
            aggregate_values(AggregationConfig::default(), &[]),
            Err(AggregateError::NoContributions)
        );
        for weight in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let result = aggregate_values(
                AggregationConfig::default(),
                &[(1.0, &[1.0]), (weight, &[2.0])],
            );
            assert!(
                matches!(result, Err(AggregateError::BadWeight { hash: h, .. }) if h == hash(1)),
                "{weight}: {result:?}"
            );
        }
        let overflow = aggregate_values(
            AggregationConfig::default(),
            &[(f64::MAX, &[1.0]), (f64::MAX, &[2.0])],
        );
        assert!(
            matches!(overflow, Err(AggregateError::BadWeight { .. })),
            "{overflow:?}"
        );

        for rule in [FED_AVG, MEDIAN, trimmed(0.25)] {
            for clip_norm in [None, Some(1.0)] {
                let result = aggregate_values(
                    config(rule, clip_norm),
                    &[
                        (1.0, &[1.0, 2.0]),
                        (1.0, &[f32::NAN, 0.0]),
                        (1.0, &[0.0, 0.0]),
                    ],
                );
                assert!(
                    matches!(&result, Err(AggregateError::NonFinite { hash: h, .. }) if *h == hash(1)),
                    "{rule:?}: {result:?}"
                );
                let result = aggregate_values(
                    config(rule, clip_norm),
                    &[(1.0, &[1.0]), (1.0, &[f32::INFINITY]), (1.0, &[0.0])],
                );
                assert!(
                    matches!(&result, Err(AggregateError::NonFinite { .. })),
                    "{rule:?}: {result:?}"
                );
            }
        }

        // A different shape and a different name: the error names the odd one out and the
        // reference, which is the first contribution in hash order.
        let (first, second) = (delta(&[1.0, 2.0]), delta(&[1.0]));
        let renamed =
            Delta::new(vec![NamedTensor::new("v", vec![2], vec![1.0, 2.0]).unwrap()]).unwrap();
        let (low, high) = (BlobHash([0; 32]), BlobHash([1; 32]));
        for odd in [&second, &renamed] {
            for order in [[0, 1], [1, 0]] {
                let all = [
                    Contribution {
                        hash: low,
                        weight: 1.0,
                        delta: &first,
                    },
                    Contribution {
                        hash: high,
                        weight: 1.0,
                        delta: odd,
                    },
                ];
                let contributions = [all[order[0]], all[order[1]]];
                let result = aggregate(&AggregationConfig::default(), &contributions);
                assert!(
                    matches!(
                        &result,
                        Err(AggregateError::LayoutMismatch { hash, reference, .. })
                            if *hash == high && *reference == low
                    ),
                    "{result:?}"
                );
            }
        }
    }

    #[test]
    fn invalid_configs_are_named() {
        let cases = [
            (config(trimmed(0.5), None), "trim_fraction"),
            (config(trimmed(-0.1), None), "trim_fraction"),
            (config(trimmed(f64::NAN), None), "trim_fraction"),
            (config(FED_AVG, Some(0.0)), "clip_norm"),
            (config(MEDIAN, Some(-1.0)), "clip_norm"),
            (config(FED_AVG, Some(f64::INFINITY)), "clip_norm"),
            (config(FED_AVG, Some(f64::NAN)), "clip_norm"),
        ];
        for (config, key) in cases {
            let expected = Err(key);
            let key_of = |result: Result<_, AggregateError>| {
                result.map_err(|error| match error {
                    AggregateError::InvalidConfig { key, .. } => key,
                    other => panic!("{other:?}"),
                })
            };
            assert_eq!(key_of(config.validate()), expected);
            assert_eq!(
                key_of(aggregate_values(config, &[(1.0, &[1.0])]).map(drop)),
                expected
            );
        }
        assert_eq!(config(trimmed(0.0), Some(1e-9)).validate(), Ok(()));
        assert_eq!(AggregationConfig::default().rule, FED_AVG);
    }

    /// Runs `optimizer` from a zero adapter of one element, one step per `(aggregated, adapter)`
    /// pair, checking the adapter within 1e-6 after each; returns the final state.
    fn check_optimizer(optimizer: ServerOptimizer, steps: &[(f32, f32)]) -> OptimizerState {
        let mut state = OptimizerState::default();
        let mut adapter = delta(&[0.0]);
        for (step, &(aggregated, expected)) in steps.iter().enumerate() {
            optimizer
                .apply(&mut state, &mut adapter, &delta(&[aggregated]))
                .unwrap();
            let actual = adapter.tensors()[0].values()[0];
            assert!(
                (actual - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                "{optimizer:?} step {step}: got {actual}, expected {expected}"
            );
            assert_eq!(state.step, step as u64 + 1);
        }
        state
    }

    fn moment(moment: &Option<Delta>) -> f32 {
        moment.as_ref().unwrap().tensors()[0].values()[0]
    }

    #[test]
    fn plain_adds_scaled_delta() {
        let state = check_optimizer(ServerOptimizer::default(), &[(1.0, 1.0), (-0.5, 0.5)]);
        assert_eq!(state.first_moment, None);
        check_optimizer(
            ServerOptimizer::Plain { learning_rate: 0.5 },
            &[(1.0, 0.5), (2.0, 1.5), (-4.0, -0.5)],
        );
    }

    #[test]
    fn momentum_heavy_ball_and_nesterov() {
        // g = -1 each step, beta 0.5: m = -1, -1.5, -1.75.
        let heavy_ball = ServerOptimizer::Momentum {
            learning_rate: 1.0,
            beta: 0.5,
            nesterov: false,
        };
        let state = check_optimizer(heavy_ball, &[(1.0, 1.0), (1.0, 2.5), (1.0, 4.25)]);
        assert_eq!(moment(&state.first_moment), -1.75);
        assert_eq!(state.second_moment, None);
        // Nesterov steps by g + beta * m: -1.5, -1.75, -1.875.
        let nesterov = ServerOptimizer::Momentum {
            learning_rate: 1.0,
            beta: 0.5,
            nesterov: true,
        };
        let state = check_optimizer(nesterov, &[(1.0, 1.5), (1.0, 3.25), (1.0, 5.125)]);
        assert_eq!(moment(&state.first_moment), -1.75);
        // Learning rate 2 doubles every step.
        let doubled = ServerOptimizer::Momentum {
            learning_rate: 2.0,
            beta: 0.5,
            nesterov: true,
        };
        check_optimizer(doubled, &[(1.0, 3.0), (1.0, 6.5)]);
    }

    #[test]
    fn adam_follows_the_formula() {
        // beta1 0.5, beta2 0.75, epsilon 1: g = -2 gives m = -1, v = 1, step 1 / 2;
        // then g = -1 twice gives m = -1, v = 1, step 1 / 2 each.
        let adam = ServerOptimizer::Adam {
            learning_rate: 1.0,
            beta1: 0.5,
            beta2: 0.75,
            epsilon: 1.0,
        };
        let state = check_optimizer(adam, &[(2.0, 0.5), (1.0, 1.0), (1.0, 1.5)]);
        assert_eq!(
            (moment(&state.first_moment), moment(&state.second_moment)),
            (-1.0, 1.0)
        );

        // Usual settings, checked against the formula evaluated in f64.
        let (learning_rate, beta1, beta2, epsilon) = (0.01f32, 0.9f32, 0.99f32, 1e-3f32);
        let adam = ServerOptimizer::Adam {
            learning_rate,
            beta1,
            beta2,
            epsilon,
        };
        let (mut m, mut v, mut x) = (0.0f64, 0.0f64, 0.0f64);
        let mut steps = Vec::new();
        for aggregated in [0.3f32, -0.1, 0.2] {
            let g = -f64::from(aggregated);
            m = f64::from(beta1) * m + (1.0 - f64::from(beta1)) * g;
            v = f64::from(beta2) * v + (1.0 - f64::from(beta2)) * g * g;
            x -= f64::from(learning_rate) * m / (v.sqrt() + f64::from(epsilon));
            steps.push((aggregated, x as f32));
        }
        check_optimizer(adam, &steps);
    }

    #[test]
    fn optimizer_errors_change_nothing() {
        let cases = [
            (
                ServerOptimizer::Plain { learning_rate: 0.0 },
                "learning_rate",
            ),
            (
                ServerOptimizer::Plain {
                    learning_rate: f32::NAN,
                },
                "learning_rate",
            ),
            (
                ServerOptimizer::Plain {
                    learning_rate: f32::INFINITY,
                },
                "learning_rate",
            ),
            (
                ServerOptimizer::Momentum {
                    learning_rate: 1.0,
                    beta: 1.0,
                    nesterov: true,
                },
                "beta",
            ),
            (
                ServerOptimizer::Momentum {
                    learning_rate: 1.0,
                    beta: -0.1,
                    nesterov: false,
                },
                "beta",
            ),
            (
                ServerOptimizer::Adam {
                    learning_rate: 1.0,
                    beta1: 1.0,
                    beta2: 0.9,
                    epsilon: 1e-3,
                },
                "beta1",
            ),
            (
                ServerOptimizer::Adam {
                    learning_rate: 1.0,
                    beta1: 0.9,
                    beta2: f32::NAN,
                    epsilon: 1e-3,
                },
                "beta2",
            ),
            (
                ServerOptimizer::Adam {
                    learning_rate: 1.0,
                    beta1: 0.9,
                    beta2: 0.9,
                    epsilon: 0.0,
                },
                "epsilon",
            ),
            (
                ServerOptimizer::Adam {
                    learning_rate: -1.0,
                    beta1: 0.9,
                    beta2: 0.9,
                    epsilon: 1.0,
                },
                "learning_rate",
            ),
        ];
        for (optimizer, key) in cases {
            let mut state = OptimizerState::default();
            let mut adapter = delta(&[1.0]);
            let result = optimizer.apply(&mut state, &mut adapter, &delta(&[1.0]));
            assert!(
                matches!(&result, Err(AggregateError::InvalidConfig { key: k, .. }) if *k == key),
                "{optimizer:?}: {result:?}"
            );
            assert_eq!((state, adapter), (OptimizerState::default(), delta(&[1.0])));
        }

        let adam = ServerOptimizer::Adam {
            learning_rate: 1.0,
            beta1: 0.9,
            beta2: 0.99,
            epsilon: 1e-3,
        };
        let mut adapter = delta(&[1.0, 2.0]);
        let mut state = OptimizerState::default();
        let result = adam.apply(&mut state, &mut adapter, &delta(&[1.0]));
        assert!(
            matches!(
                &result,
                Err(AggregateError::StateMismatch {
                    what: "aggregated delta",
                    ..
                })
            ),
            "{result:?}"
        );
        // A stale second moment is refused before the first moment is created.
        state.second_moment = Some(delta(&[0.0]));
        let before = state.clone();
        let result = adam.apply(&mut state, &mut adapter, &delta(&[1.0, 1.0]));
        assert!(
            matches!(
                &result,
                Err(AggregateError::StateMismatch {
                    what: "second moment",
                    ..
                })
            ),
            "{result:?}"
        );
        assert_eq!((state, adapter), (before, delta(&[1.0, 2.0])));
    }

    #[test]
    fn merge_exchange_network_sorts_every_zero_one_input() {
        // By the 0-1 principle, a comparator network that sorts every 0-1 input sorts everything.
        for n in 0..=12usize {
            let network = merge_exchange_network(n);
            for pattern in 0u32..1 << n {
                let mut values: Vec<u32> = (0..n).map(|bit| (pattern >> bit) & 1).collect();
                for &(low, high) in &network {
                    assert!(low < high && high < n);
                    if values[low] > values[high] {
                        values.swap(low, high);
                    }
                }
                assert!(
                    values.windows(2).all(|pair| pair[0] <= pair[1]),
                    "n {n}: {values:?}"
                );
            }
        }
        assert_eq!(merge_exchange_network(16).len(), 63);
    }

    #[test]
    fn clipping_norm_matches_l2_norm() {
        let values: Vec<f32> = (0..1000).map(|index| (index as f32 * 0.37).sin()).collect();
        let mixed = two_tensor_delta(&values);
        let (lanes, sequential) = (clipping_norm(&mixed), mixed.l2_norm());
        assert!(
            (lanes - sequential).abs() <= 1e-12 * sequential,
            "{lanes} vs {sequential}"
        );
        assert_eq!(clipping_norm(&delta(&[3.0, 4.0])), 5.0);
        assert_eq!(clipping_norm(&Delta::default()), 0.0);
    }

    /// Random contributions: 1–8 deltas of two tensors (`a`: 1–6 values, `b`: 3 values) with
    /// distinct or repeated hashes and weights, values across many magnitudes.
    fn contributions_strategy() -> impl Strategy<Value = Vec<(u8, f64, Vec<f32>)>> {
        (1usize..=6).prop_flat_map(|len_a| {
            let value = prop_oneof![
                -1.0f32..1.0,
                -1e6f32..1e6,
                -1e-6f32..1e-6,
                Just(0.0f32),
                Just(-0.0f32),
            ];
            prop::collection::vec(
                (
                    0u8..6,
                    0.5f64..1000.0,
                    prop::collection::vec(value, len_a + 3),
                ),
                1..=8,
            )
        })
    }

    /// The contributions of `inputs` (hash byte, weight, values), over their `deltas`.
    fn contributions_of<'d>(
        inputs: &[(u8, f64, Vec<f32>)],
        deltas: &'d [Delta],
    ) -> Vec<Contribution<'d>> {
        inputs
            .iter()
            .zip(deltas)
            .map(|((hash_byte, weight, _), delta)| Contribution {
                hash: BlobHash([*hash_byte; 32]),
                weight: *weight,
                delta,
            })
            .collect()
    }

    fn two_tensor_delta(values: &[f32]) -> Delta {
        let split = values.len() - 3;
        Delta::new(vec![
            NamedTensor::new("b", vec![3], values[split..].to_vec()).unwrap(),
            NamedTensor::new("a", vec![split], values[..split].to_vec()).unwrap(),
        ])
        .unwrap()
    }

    /// Rows that remember the widest read.
    struct CountingRows<'a> {
        inner: DeltaRows<'a>,
        widest: usize,
    }

    impl Rows for CountingRows<'_> {
        fn read(&mut self, index: usize, start: usize, out: &mut [f32]) -> Result<(), String> {
            self.widest = self.widest.max(out.len());
            self.inner.read(index, start, out)
        }
    }

    #[test]
    fn rows_out_of_order_and_failed_reads_are_errors() {
        let (a, b) = (delta(&[1.0, 2.0]), delta(&[3.0, 4.0]));
        let (low, high) = (BlobHash([1; 32]), BlobHash([2; 32]));
        let summaries = vec![
            Summary::of(high, 1.0, &a).unwrap(),
            Summary::of(low, 1.0, &b).unwrap(),
        ];
        let mut rows = DeltaRows::new(vec![&a, &b]);
        let config = AggregationConfig::default();
        assert_eq!(
            aggregate_rows(&config, &a.layout(), &summaries, &mut rows, 64),
            Err(AggregateError::Unsorted { hash: low })
        );
        let summaries: Vec<Summary> = summaries.into_iter().rev().collect();
        let mut short = DeltaRows::new(vec![&b]);
        assert!(matches!(
            aggregate_rows(&config, &a.layout(), &summaries, &mut short, 64),
            Err(AggregateError::Read { hash, .. }) if hash == high
        ));
        let nan = delta(&[f32::NAN, 0.0]);
        assert!(matches!(
            Summary::of(low, 1.0, &nan),
            Err(AggregateError::NonFinite { hash, .. }) if hash == low
        ));
    }

    #[test]
    fn copy_flat_crosses_tensors_and_refuses_to_run_past_the_end() {
        let delta = two_tensor_delta(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        // Name order: "a" (the first two values), then "b".
        let mut out = [0.0f32; 3];
        copy_flat(&delta, 1, &mut out).unwrap();
        assert_eq!(out, [2.0, 3.0, 4.0]);
        assert!(copy_flat(&delta, 3, &mut out).is_err());
    }

    fn rule_strategy() -> impl Strategy<Value = AggregationConfig> {
        let rule = prop_oneof![
            Just(FED_AVG),
            Just(MEDIAN),
            (0.0f64..0.5).prop_map(trimmed),
            (0.0f64..0.5, 1u32..6).prop_map(|(trim_fraction, min_contributions)| {
                AggregationRule::Robust {
                    trim_fraction,
                    min_contributions,
                }
            }),
        ];
        let clip_norm = prop_oneof![Just(None), (0.1f64..100.0).prop_map(Some)];
        let clip_to_median = prop_oneof![Just(None), (1.0f64..4.0).prop_map(Some)];
        let min_agreement = prop_oneof![Just(None), (0.01f64..1.0).prop_map(Some)];
        (rule, clip_norm, clip_to_median, min_agreement).prop_map(
            |(rule, clip_norm, clip_to_median, min_agreement)| AggregationConfig {
                rule,
                clip_norm,
                clip_to_median,
                min_agreement,
            },
        )
    }

    #[test]
    fn the_robust_default_bounds_one_delta_pull_whatever_its_size_or_weight() {
        use crate::config::SplitMix64;
        let mut rng = SplitMix64(9);
        let honest: Vec<Vec<f32>> = (0..7)
            .map(|_| (0..64).map(|_| rng.next_unit() - 0.5).collect())
            .collect();
        let norm = |values: &[f32]| {
            values
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let mut norms: Vec<f64> = honest.iter().map(|v| norm(v)).collect();
        norms.sort_by(f64::total_cmp);
        let median_norm = norms[3];
        let honest_mean: Vec<f64> = (0..64)
            .map(|k| honest.iter().map(|v| f64::from(v[k])).sum::<f64>() / 7.0)
            .collect();
        // Model replacement: a huge delta with a huge claimed weight.
        let attack: Vec<f32> = (0..64)
            .map(|k| if k % 2 == 0 { 1e6 } else { -1e6 })
            .collect();
        let deviation = |config: AggregationConfig, n_attackers: usize, weight: f64| {
            let mut inputs: Vec<(f64, &[f32])> =
                honest.iter().map(|v| (1.0, v.as_slice())).collect();
            for _ in 0..n_attackers {
                inputs.push((weight, attack.as_slice()));
            }
            let merged = aggregate_values(config, &inputs).unwrap();
            merged
                .iter()
                .zip(&honest_mean)
                .map(|(a, b)| (f64::from(*a) - b).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        // Plain FedAvg is taken over by one delta.
        assert!(deviation(AggregationConfig::default(), 1, 1e6) > 1e5);
        // Clipped to twice the median norm, one delta among eight moves the mean by at most
        // (its clipped norm + the honest mean's norm) / 8, whatever weight it claims (below the
        // trimming threshold FedAvg is used, so the weight is the engine's to bound).
        // The bounds of clipping and trimming alone (these honest deltas are noise with no
        // common direction, so the agreement filter has no majority to follow here).
        let robust = AggregationConfig {
            min_agreement: None,
            ..AggregationConfig::robust()
        };
        let fed_avg_bound = (2.0 * median_norm
            + norm(&honest_mean.iter().map(|v| *v as f32).collect::<Vec<_>>()))
            / 8.0;
        let clipped_fed_avg = AggregationConfig {
            rule: FED_AVG,
            ..robust
        };
        assert!(deviation(clipped_fed_avg, 1, 1.0) <= fed_avg_bound * 1.0001);
        // With trimming (eight deltas, two hostile), the hostile values are cut per coordinate.
        let trimmed_deviation = deviation(robust, 2, 1.0);
        assert!(
            trimmed_deviation <= median_norm,
            "{trimmed_deviation} > {median_norm}"
        );
    }

    #[test]
    fn deltas_that_point_elsewhere_than_the_majority_are_left_out() {
        // Five honest deltas along (1, 1, 1, 1) with small differences; a sign flip, a zero and
        // an orthogonal delta of the same size.
        let honest: Vec<Vec<f32>> = (0..5)
            .map(|i| {
                let e = 0.05 * i as f32;
                vec![1.0 + e, 1.0 - e, 1.0, 1.0 + e / 2.0]
            })
            .collect();
        let flip = vec![-1.0f32, -1.0, -1.0, -1.0];
        let zero = vec![0.0f32; 4];
        let orthogonal = vec![1.0f32, -1.0, 1.0, -1.0];
        let mut inputs: Vec<(f64, &[f32])> = honest.iter().map(|v| (1.0, v.as_slice())).collect();
        let honest_only = aggregate_values(
            AggregationConfig {
                min_agreement: Some(0.5),
                ..config(FED_AVG, None)
            },
            &inputs,
        )
        .unwrap();
        inputs.extend([(1.0, flip.as_slice()), (1.0, &zero), (1.0, &orthogonal)]);
        let filtered = AggregationConfig {
            min_agreement: Some(0.5),
            ..config(FED_AVG, None)
        };
        assert_eq!(
            aggregate_values(filtered, &inputs).unwrap(),
            honest_only,
            "the three dissenters are left out"
        );
        // Without the filter they pull the mean away.
        let plain = aggregate_values(config(FED_AVG, None), &inputs).unwrap();
        assert!(plain[0] < 0.8 * honest_only[0], "{plain:?}");
        // Two deltas are too few to tell a majority: both are kept.
        let pair = [(1.0, honest[0].as_slice()), (1.0, flip.as_slice())];
        assert_eq!(
            aggregate_values(filtered, &pair).unwrap(),
            aggregate_values(config(FED_AVG, None), &pair).unwrap()
        );
        assert!(AggregationConfig {
            min_agreement: Some(0.0),
            ..filtered
        }
        .validate()
        .is_err());
    }

    fn bits(delta: &Delta) -> Vec<u32> {
        delta
            .tensors()
            .iter()
            .flat_map(|tensor| tensor.values().iter().map(|value| value.to_bits()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn aggregation_is_bitwise_order_invariant(
            (inputs, order) in contributions_strategy().prop_flat_map(|inputs| {
                let order: Vec<usize> = (0..inputs.len()).collect();
                (Just(inputs), Just(order).prop_shuffle())
            }),
            config in rule_strategy(),
        ) {
            let deltas: Vec<Delta> = inputs.iter().map(|(_, _, values)| two_tensor_delta(values)).collect();
            let contributions = contributions_of(&inputs, &deltas);
            let shuffled: Vec<Contribution<'_>> = order.iter().map(|&index| contributions[index]).collect();
            let expected = aggregate(&config, &contributions).unwrap();
            let actual = aggregate(&config, &shuffled).unwrap();
            prop_assert_eq!(expected.layout(), actual.layout());
            prop_assert_eq!(bits(&expected), bits(&actual));
        }

        #[test]
        fn slabs_of_any_size_give_the_bits_of_the_whole(
            inputs in contributions_strategy(),
            config in rule_strategy(),
            fraction in prop::option::of(0.1f64..1.0),
            slab in 1usize..12,
        ) {
            let config = AggregationConfig { min_agreement: fraction, ..config };
            let deltas: Vec<Delta> = inputs.iter().map(|(_, _, values)| two_tensor_delta(values)).collect();
            let contributions = contributions_of(&inputs, &deltas);
            let whole = aggregate(&config, &contributions).unwrap();
            let screened = screen(&config, &contributions).unwrap();
            let sorted = sorted_and_checked(&contributions).unwrap();
            let summaries: Vec<Summary> = sorted
                .iter()
                .map(|c| Summary::of(c.hash, c.weight, c.delta).unwrap())
                .collect();
            let mut rows = CountingRows {
                inner: DeltaRows::new(sorted.iter().map(|c| c.delta).collect()),
                widest: 0,
            };
            let budget = slab * contributions.len() * 4;
            let slabbed = aggregate_rows(&config, &whole.layout(), &summaries, &mut rows, budget).unwrap();
            prop_assert_eq!(bits(&slabbed.delta), bits(&whole));
            prop_assert_eq!(&slabbed.screening, &screened);
            prop_assert!(rows.widest <= slab, "read {} coordinates at once, budget {}", rows.widest, slab);
        }

        #[test]
        fn screening_records_exactly_what_aggregation_decided(
            (inputs, order) in contributions_strategy().prop_flat_map(|inputs| {
                let order: Vec<usize> = (0..inputs.len()).collect();
                (Just(inputs), Just(order).prop_shuffle())
            }),
            fraction in 0.1f64..1.0,
        ) {
            let deltas: Vec<Delta> = inputs.iter().map(|(_, _, values)| two_tensor_delta(values)).collect();
            let contributions = contributions_of(&inputs, &deltas);
            let filtered = AggregationConfig {
                min_agreement: Some(fraction),
                ..AggregationConfig::default()
            };
            let screened = screen(&filtered, &contributions).unwrap();
            prop_assert_eq!(screened.len(), contributions.len());
            // The same record whatever order the deltas came in.
            let shuffled: Vec<Contribution<'_>> = order.iter().map(|&index| contributions[index]).collect();
            prop_assert_eq!(&screen(&filtered, &shuffled).unwrap(), &screened);
            // Aggregating only the deltas it kept, without the filter, gives the same bits.
            let sorted = sorted_and_checked(&contributions).unwrap();
            let kept: Vec<Contribution<'_>> = screened
                .iter()
                .zip(sorted)
                .filter(|(s, _)| s.kept)
                .map(|(s, c)| {
                    assert_eq!(s.hash, c.hash);
                    *c
                })
                .collect();
            prop_assert!(!kept.is_empty());
            let expected = aggregate(&filtered, &contributions).unwrap();
            let actual = aggregate(&AggregationConfig::default(), &kept).unwrap();
            prop_assert_eq!(bits(&expected), bits(&actual));
            for s in &screened {
                prop_assert!(s.norm.is_finite() && s.norm >= 0.0);
                prop_assert_eq!(s.scale, 1.0);
                prop_assert_eq!(s.cosine.is_some(), contributions.len() >= 3);
                prop_assert!(s.max_tensor_ratio >= 0.0);
            }
        }

        #[test]
        fn fed_avg_of_identical_deltas_is_that_delta(
            inputs in contributions_strategy(),
        ) {
            let delta = two_tensor_delta(&inputs[0].2);
            let contributions: Vec<Contribution<'_>> = inputs
                .iter()
                .enumerate()
                .map(|(index, (_, weight, _))| Contribution { hash: hash(index), weight: *weight, delta: &delta })
                .collect();
            let result = aggregate(&AggregationConfig::default(), &contributions).unwrap();
            for (actual, expected) in all_values(&result).zip(all_values(&delta)) {
                prop_assert!(
                    (actual - expected).abs() <= expected.abs() * 2.0 * f32::EPSILON,
                    "{} vs {}", actual, expected
                );
            }
        }

        #[test]
        fn merge_exchange_network_sorts(values in prop::collection::vec(any::<i32>(), 0..40)) {
            let mut sorted_by_network = values.clone();
            for (low, high) in merge_exchange_network(values.len()) {
                let (a, b) = (sorted_by_network[low], sorted_by_network[high]);
                sorted_by_network[low] = a.min(b);
                sorted_by_network[high] = a.max(b);
            }
            let mut expected = values;
            expected.sort_unstable();
            prop_assert_eq!(sorted_by_network, expected);
        }

        #[test]
        fn median_lies_within_the_range(inputs in contributions_strategy()) {
            let deltas: Vec<Delta> = inputs.iter().map(|(_, _, values)| two_tensor_delta(values)).collect();
            let contributions: Vec<Contribution<'_>> = deltas
                .iter()
                .enumerate()
                .map(|(index, delta)| Contribution { hash: hash(index), weight: 1.0, delta })
                .collect();
            let median = aggregate(&config(MEDIAN, None), &contributions).unwrap();
            for (coordinate, value) in all_values(&median).enumerate() {
                let column = deltas.iter().map(|delta| all_values(delta).nth(coordinate).unwrap());
                let low = column.clone().fold(f32::INFINITY, f32::min);
                let high = column.fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(low <= value && value <= high, "{} not in [{}, {}]", value, low, high);
            }
        }
    }

    /// All values of a delta, tensor by tensor.
    fn all_values(delta: &Delta) -> impl Iterator<Item = f32> + Clone + '_ {
        delta
            .tensors()
            .iter()
            .flat_map(|tensor| tensor.values().iter().copied())
    }
}
