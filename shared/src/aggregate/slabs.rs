//! Aggregation a slab of coordinates at a time, so that memory follows a budget instead of the
//! number of contributions times their size.
//!
//! Every rule is coordinate-wise, and every sum over a contribution's values (the agreement
//! filter's dot products and norms) runs in coordinate order, so a round can be taken in slabs
//! of consecutive coordinates (in the flattened layout: tensors in name order, values in index
//! order) and give the same bits as taking it whole. Each contribution is first read once in
//! full, one at a time, for its [`Summary`] (the norms clipping and screening need); its values
//! are then read again slab by slab through [`Rows`], from wherever the caller keeps them (in
//! memory, or a scratch file past one machine's memory). [`super::aggregate`] and
//! [`super::screen`] run this same code over deltas in memory, so the two cannot disagree.

use std::ops::Range;

use crate::delta::{Delta, Layout, NamedTensor};
use crate::ids::BlobHash;

use super::{
    clipping_norm, median, merge_exchange_network, AggregateError, AggregationConfig,
    AggregationRule, Screening,
};

/// What aggregation needs of a contribution beyond its values, found in one pass over it.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The contribution's hash.
    pub hash: BlobHash,
    /// Its FedAvg weight.
    pub weight: f64,
    /// Its L2 norm, summed as clipping sums it.
    pub norm: f64,
    /// The L2 norm of each tensor, in name order (each a plain sum of squares in index order).
    pub tensor_norms: Vec<f64>,
}

impl Summary {
    /// Summarises `delta`.
    ///
    /// # Errors
    ///
    /// [`AggregateError::NonFinite`] when it holds a NaN or an infinity.
    pub fn of(hash: BlobHash, weight: f64, delta: &Delta) -> Result<Self, AggregateError> {
        delta
            .check_finite()
            .map_err(|source| AggregateError::NonFinite { hash, source })?;
        Ok(Self {
            hash,
            weight,
            norm: clipping_norm(delta),
            tensor_norms: delta
                .tensors()
                .iter()
                .map(|tensor| {
                    tensor
                        .values()
                        .iter()
                        .map(|&v| f64::from(v) * f64::from(v))
                        .sum::<f64>()
                        .sqrt()
                })
                .collect(),
        })
    }
}

/// The contributions' values, read a slab of coordinates at a time.
pub trait Rows {
    /// Copies the values of contribution `index` (its position among the summaries) at
    /// flattened coordinates `start..start + out.len()` into `out`.
    ///
    /// # Errors
    ///
    /// Whatever kept the values from being read, in words.
    fn read(&mut self, index: usize, start: usize, out: &mut [f32]) -> Result<(), String>;
}

/// Contributions held in memory, as [`Rows`].
pub struct DeltaRows<'a> {
    deltas: Vec<&'a Delta>,
}

impl<'a> DeltaRows<'a> {
    /// Rows over `deltas`, in the order of their summaries.
    pub fn new(deltas: Vec<&'a Delta>) -> Self {
        Self { deltas }
    }
}

impl Rows for DeltaRows<'_> {
    fn read(&mut self, index: usize, start: usize, out: &mut [f32]) -> Result<(), String> {
        let delta = self
            .deltas
            .get(index)
            .ok_or_else(|| format!("no contribution {index}"))?;
        copy_flat(delta, start, out)
    }
}

/// Copies `delta`'s values at flattened coordinates `start..start + out.len()` into `out`.
///
/// # Errors
///
/// When the range runs past the delta's end.
pub fn copy_flat(delta: &Delta, start: usize, out: &mut [f32]) -> Result<(), String> {
    let mut offset = 0usize;
    let mut written = 0usize;
    for tensor in delta.tensors() {
        let values = tensor.values();
        let (begin, end) = (offset, offset + values.len());
        offset = end;
        let want = start + written;
        if written == out.len() {
            break;
        }
        if want >= end {
            continue;
        }
        let from = want - begin;
        let take = (values.len() - from).min(out.len() - written);
        out[written..written + take].copy_from_slice(&values[from..from + take]);
        written += take;
    }
    if written == out.len() {
        Ok(())
    } else {
        Err(format!(
            "coordinates {start}..{} run past the delta's {offset} values",
            start + out.len()
        ))
    }
}

/// A round aggregated, with what screening found.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregated {
    /// The aggregated delta.
    pub delta: Delta,
    /// Every contribution's screening, in the summaries' order.
    pub screening: Vec<Screening>,
}

/// Aggregates contributions that `rows` holds, a slab of coordinates at a time, under `config`,
/// with the results [`super::aggregate`] and [`super::screen`] give for the same contributions
/// in memory, bit for bit. A slab takes at most `budget` bytes of values (at least one
/// coordinate); the passes over the rows are one for the agreement filter and the screening
/// (from three contributions up) and one for the rule.
///
/// `summaries` must be in aggregation order (ascending hash, then weight); `layout` is every
/// contribution's (the caller checks each against it).
///
/// # Errors
///
/// A bad config, no contributions, summaries out of order, a bad weight, a failed read, or a
/// non-finite result.
pub fn aggregate_rows(
    config: &AggregationConfig,
    layout: &Layout,
    summaries: &[Summary],
    rows: &mut dyn Rows,
    budget: usize,
) -> Result<Aggregated, AggregateError> {
    aggregate_slabs(config, layout, summaries, rows, budget, true)
}

/// [`aggregate_rows`]; with `screening` false, the agreement pass runs only when the filter
/// needs it, and the screening returned is empty.
pub(super) fn aggregate_slabs(
    config: &AggregationConfig,
    layout: &Layout,
    summaries: &[Summary],
    rows: &mut dyn Rows,
    budget: usize,
    screening: bool,
) -> Result<Aggregated, AggregateError> {
    config.validate()?;
    if summaries.is_empty() {
        return Err(AggregateError::NoContributions);
    }
    check_order_and_weights(summaries)?;
    let n = summaries.len();
    let elements = layout.element_count();
    let slab = (budget / (n * std::mem::size_of::<f32>())).clamp(1, elements.max(1));
    let mut reader = SlabReader {
        hashes: summaries.iter().map(|summary| summary.hash).collect(),
        rows,
        buffer: Vec::new(),
        slab,
        elements,
    };
    let scales = clip_scales(config, summaries);
    let similarities = if n >= 3 && (screening || config.min_agreement.is_some()) {
        Some(similarities(&mut reader, &scales)?)
    } else {
        None
    };
    let kept: Vec<bool> = match (config.min_agreement, &similarities) {
        (Some(fraction), Some(similarities)) => agreeing(similarities, fraction),
        _ => vec![true; n],
    };
    let kept_rows: Vec<usize> = (0..n).filter(|&i| kept[i]).collect();
    let kept_scales: Vec<f64> = kept_rows.iter().map(|&i| scales[i]).collect();
    let n_kept = kept_rows.len();
    let rule = match config.rule {
        AggregationRule::Robust {
            trim_fraction,
            min_contributions,
        } if n_kept >= min_contributions as usize => AggregationRule::TrimmedMean { trim_fraction },
        AggregationRule::Robust { .. } => AggregationRule::FedAvg,
        rule => rule,
    };
    let mut output = vec![0.0f32; elements];
    let all_finite = match rule {
        AggregationRule::Robust { .. } => unreachable!("resolved above"),
        AggregationRule::FedAvg => {
            let mut total_weight = 0.0f64;
            for &i in &kept_rows {
                total_weight += summaries[i].weight;
            }
            let coefficients: Vec<f64> = kept_rows
                .iter()
                .zip(&kept_scales)
                .map(|(&i, &scale)| (summaries[i].weight / total_weight) * scale)
                .collect();
            reader.for_each_slab(&kept_rows, &mut output, |values, len, out| {
                weighted_sum(values, len, &coefficients, out)
            })?
        }
        AggregationRule::TrimmedMean { trim_fraction } => {
            // `trim_fraction < 0.5` keeps at least one value.
            let n_trimmed = (trim_fraction * n_kept as f64).floor() as usize;
            let ranks = RankMeans::new(n_kept, n_trimmed..n_kept - n_trimmed);
            reader.for_each_slab(&kept_rows, &mut output, |values, len, out| {
                ranks.apply(values, len, &kept_scales, out)
            })?
        }
        AggregationRule::Median => {
            // The middle rank, or the two middle ranks of an even count.
            let ranks = RankMeans::new(n_kept, (n_kept - 1) / 2..n_kept / 2 + 1);
            reader.for_each_slab(&kept_rows, &mut output, |values, len, out| {
                ranks.apply(values, len, &kept_scales, out)
            })?
        }
    };
    if !all_finite {
        return Err(AggregateError::NonFiniteResult);
    }
    let delta = unflatten(layout, output)?;
    let screening = if screening {
        screenings(summaries, &scales, similarities.as_deref(), &kept)
    } else {
        Vec::new()
    };
    Ok(Aggregated { delta, screening })
}

/// Hashes ascending (then weights), every weight finite and positive, their sum finite.
fn check_order_and_weights(summaries: &[Summary]) -> Result<(), AggregateError> {
    for pair in summaries.windows(2) {
        let order = pair[0]
            .hash
            .cmp(&pair[1].hash)
            .then_with(|| pair[0].weight.total_cmp(&pair[1].weight));
        if order.is_gt() {
            return Err(AggregateError::Unsorted { hash: pair[1].hash });
        }
    }
    let mut total_weight = 0.0f64;
    for summary in summaries {
        total_weight += summary.weight;
        let weight = summary.weight;
        if !(weight.is_finite() && weight > 0.0 && total_weight.is_finite()) {
            return Err(AggregateError::BadWeight {
                hash: summary.hash,
                weight,
            });
        }
    }
    Ok(())
}

/// The clipping scale of each contribution (all 1 without clipping).
fn clip_scales(config: &AggregationConfig, summaries: &[Summary]) -> Vec<f64> {
    if config.clip_norm.is_none() && config.clip_to_median.is_none() {
        return vec![1.0; summaries.len()];
    }
    let norms: Vec<f64> = summaries.iter().map(|summary| summary.norm).collect();
    let median_bound = config
        .clip_to_median
        .map(|multiple| multiple * median(&norms));
    let bound = match (config.clip_norm, median_bound) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).expect("one bound is set"),
    };
    norms
        .iter()
        .map(|&norm| if norm > bound { bound / norm } else { 1.0 })
        .collect()
}

/// Each contribution's cosine similarity with the majority's direction (`n ≥ 3`): the
/// coordinate-wise median `m` of the scaled contributions, as the median rule takes it; then
/// `dot(scale_i * x_i, m) / (norm(scale_i * x_i) * norm(m))`, the dot product and the norms
/// summed in f64 in coordinate order (0 for a zero vector or a non-finite dot product).
fn similarities(reader: &mut SlabReader<'_>, scales: &[f64]) -> Result<Vec<f64>, AggregateError> {
    let n = scales.len();
    let all: Vec<usize> = (0..n).collect();
    let ranks = RankMeans::new(n, (n - 1) / 2..n / 2 + 1);
    let (mut dot, mut own) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut other = 0.0f64;
    let mut center = Vec::new();
    let mut start = 0;
    while start < reader.elements {
        let values = reader.read_slab(&all, start)?;
        let len = values.len() / n;
        center.resize(len, 0.0f32);
        // Non-finite inputs never get this far (summaries refuse them).
        let _ = ranks.apply(values, len, scales, &mut center);
        for &m in &center {
            let m = f64::from(m);
            other += m * m;
        }
        for (row, &scale) in scales.iter().enumerate() {
            let (mut row_dot, mut row_own) = (dot[row], own[row]);
            for (&x, &m) in values[row * len..(row + 1) * len].iter().zip(&center) {
                let (x, m) = (f64::from(x) * scale, f64::from(m));
                row_dot += x * m;
                row_own += x * x;
            }
            (dot[row], own[row]) = (row_dot, row_own);
        }
        start += len;
    }
    let other = other.sqrt();
    Ok(dot
        .iter()
        .zip(&own)
        .map(|(&dot, &own)| {
            let own = own.sqrt();
            if own > 0.0 && other > 0.0 && dot.is_finite() {
                dot / (own * other)
            } else {
                0.0
            }
        })
        .collect())
}

/// Whether each contribution agrees with the majority: its similarity is at least `fraction`
/// of the median similarity; all agree when that median is not positive (no direction).
fn agreeing(similarities: &[f64], fraction: f64) -> Vec<bool> {
    let typical = median(similarities);
    if typical.is_nan() || typical <= 0.0 {
        return vec![true; similarities.len()];
    }
    let threshold = fraction * typical;
    similarities
        .iter()
        .map(|&similarity| similarity >= threshold)
        .collect()
}

/// Every contribution's screening record.
fn screenings(
    summaries: &[Summary],
    scales: &[f64],
    similarities: Option<&[f64]>,
    kept: &[bool],
) -> Vec<Screening> {
    let n_tensors = summaries.first().map_or(0, |s| s.tensor_norms.len());
    let medians: Vec<f64> = (0..n_tensors)
        .map(|t| {
            median(
                &summaries
                    .iter()
                    .map(|summary| summary.tensor_norms[t])
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    summaries
        .iter()
        .enumerate()
        .map(|(i, summary)| Screening {
            hash: summary.hash,
            norm: summary.norm,
            scale: scales[i],
            cosine: similarities.map(|s| s[i]),
            max_tensor_ratio: summary
                .tensor_norms
                .iter()
                .zip(&medians)
                .map(|(&norm, &median)| match (norm > 0.0, median > 0.0) {
                    (false, _) => 0.0,
                    (true, true) => norm / median,
                    (true, false) => f64::MAX,
                })
                .fold(0.0, f64::max),
            kept: kept[i],
        })
        .collect()
}

/// The flattened values as a delta of `layout`.
fn unflatten(layout: &Layout, values: Vec<f32>) -> Result<Delta, AggregateError> {
    let mut rest = values.as_slice();
    let mut tensors = Vec::with_capacity(layout.tensors.len());
    for (name, shape) in &layout.tensors {
        let len = crate::delta::element_count(shape).unwrap_or(usize::MAX);
        let (mine, after) = rest.split_at(len.min(rest.len()));
        rest = after;
        tensors.push(
            NamedTensor::new(name.clone(), shape.clone(), mine.to_vec()).map_err(|source| {
                AggregateError::StateMismatch {
                    what: "aggregated delta",
                    source,
                }
            })?,
        );
    }
    Delta::new(tensors).map_err(|source| AggregateError::StateMismatch {
        what: "aggregated delta",
        source,
    })
}

/// Reads slabs of rows into one reused buffer.
struct SlabReader<'r> {
    hashes: Vec<BlobHash>,
    rows: &'r mut dyn Rows,
    buffer: Vec<f32>,
    slab: usize,
    elements: usize,
}

impl SlabReader<'_> {
    /// Rows `which` at coordinates `start..` (one slab, shorter at the end), row-major.
    fn read_slab(&mut self, which: &[usize], start: usize) -> Result<&[f32], AggregateError> {
        let len = self.slab.min(self.elements - start);
        self.buffer.resize(which.len() * len, 0.0);
        for (slot, &row) in which.iter().enumerate() {
            self.rows
                .read(row, start, &mut self.buffer[slot * len..(slot + 1) * len])
                .map_err(|detail| AggregateError::Read {
                    hash: self.hashes[row],
                    detail,
                })?;
        }
        Ok(&self.buffer)
    }

    /// Runs `kernel(values, len, out)` over every slab of rows `which`, writing `output`;
    /// whether every result was finite.
    fn for_each_slab(
        &mut self,
        which: &[usize],
        output: &mut [f32],
        mut kernel: impl FnMut(&[f32], usize, &mut [f32]) -> bool,
    ) -> Result<bool, AggregateError> {
        let mut all_finite = true;
        let mut start = 0;
        while start < self.elements {
            let values = self.read_slab(which, start)?;
            let len = values.len() / which.len();
            all_finite &= kernel(values, len, &mut output[start..start + len]);
            start += len;
        }
        Ok(all_finite)
    }
}

/// Coordinates summed together in [`weighted_sum`]: one 64-byte cache line of each input.
const LANES: usize = 16;

/// Coordinates sorted together in [`RankMeans::apply`].
const RANK_BLOCK: usize = 64;

/// Writes `sum_i coefficients[i] * x_i` into `out` for the rows of `values` (row-major, `len`
/// coordinates each), accumulating in f64 in row order per coordinate: `((0 + c_0 * x_0) +
/// c_1 * x_1) + ...`, cast to f32; returns whether every result is finite.
///
/// Coordinates are taken [`LANES`] at a time with the sums held in registers while every row's
/// matching cache line streams through.
fn weighted_sum(values: &[f32], len: usize, coefficients: &[f64], out: &mut [f32]) -> bool {
    let mut all_finite = true;
    let n_full = len / LANES * LANES;
    let (full, tail) = out.split_at_mut(n_full);
    for (chunk_index, out_chunk) in full.chunks_exact_mut(LANES).enumerate() {
        let start = chunk_index * LANES;
        let mut sums = [0.0f64; LANES];
        for (row, &coefficient) in coefficients.iter().enumerate() {
            let offset = row * len + start;
            let chunk: &[f32; LANES] = values[offset..offset + LANES]
                .try_into()
                .expect("a whole chunk");
            for (sum, &value) in sums.iter_mut().zip(chunk) {
                *sum += coefficient * f64::from(value);
            }
        }
        let mut chunk_finite = true;
        for (out, &sum) in out_chunk.iter_mut().zip(&sums) {
            *out = sum as f32;
            chunk_finite &= sum.is_finite();
        }
        all_finite &= chunk_finite;
    }
    for (offset, out) in tail.iter_mut().enumerate() {
        let coordinate = n_full + offset;
        let mut sum = 0.0f64;
        for (row, &coefficient) in coefficients.iter().enumerate() {
            sum += coefficient * f64::from(values[row * len + coordinate]);
        }
        *out = sum as f32;
        all_finite &= sum.is_finite();
    }
    all_finite
}

/// The mean of a range of ranks, coordinate by coordinate (the trimmed mean and the median).
struct RankMeans {
    network: Vec<(usize, usize)>,
    kept: Range<usize>,
}

impl RankMeans {
    fn new(n_rows: usize, kept: Range<usize>) -> Self {
        Self {
            network: merge_exchange_network(n_rows),
            kept,
        }
    }

    /// For each coordinate: sorts the values `x_i * scales[i] + 0` (f64, ascending) and writes
    /// the mean of the ranks in `kept` as f32, summing `((0 + v_lo) + v_lo+1) + ...` from the
    /// lowest kept rank up and dividing by their count; returns whether every value is finite.
    ///
    /// Adding 0 turns a negative zero into a positive one, so among finite values equal means
    /// identical and the sorted column is unique. Coordinates go [`RANK_BLOCK`] at a time: row
    /// `i` of the block holds contribution `i`'s values, and a sorting network
    /// ([`merge_exchange_network`]) sorts every column at once with branch-free min and max,
    /// which the compiler vectorises.
    fn apply(&self, values: &[f32], len: usize, scales: &[f64], out: &mut [f32]) -> bool {
        let n_rows = scales.len();
        let mut block = vec![0.0f64; n_rows * RANK_BLOCK];
        let mut sums = [0.0f64; RANK_BLOCK];
        let count = self.kept.len() as f64;
        let mut all_finite = true;
        for (block_index, out_block) in out[..len].chunks_mut(RANK_BLOCK).enumerate() {
            let start = block_index * RANK_BLOCK;
            let width = out_block.len();
            let mut block_finite = true;
            for (row, (slots, &scale)) in block.chunks_exact_mut(RANK_BLOCK).zip(scales).enumerate()
            {
                let offset = row * len + start;
                for (slot, &value) in slots[..width]
                    .iter_mut()
                    .zip(&values[offset..offset + width])
                {
                    let value = f64::from(value) * scale + 0.0;
                    block_finite &= value.is_finite();
                    *slot = value;
                }
            }
            all_finite &= block_finite;
            for &(low, high) in &self.network {
                let (head, tail) = block.split_at_mut(high * RANK_BLOCK);
                let low_row = &mut head[low * RANK_BLOCK..low * RANK_BLOCK + width];
                let high_row = &mut tail[..width];
                for (low_value, high_value) in low_row.iter_mut().zip(high_row.iter_mut()) {
                    let (a, b) = (*low_value, *high_value);
                    *low_value = a.min(b);
                    *high_value = a.max(b);
                }
            }
            let sums = &mut sums[..width];
            sums.fill(0.0);
            for row in block
                .chunks_exact(RANK_BLOCK)
                .skip(self.kept.start)
                .take(self.kept.len())
            {
                for (sum, &value) in sums.iter_mut().zip(&row[..width]) {
                    *sum += value;
                }
            }
            for (out, &sum) in out_block.iter_mut().zip(sums.iter()) {
                *out = (sum / count) as f32;
            }
        }
        all_finite
    }
}
