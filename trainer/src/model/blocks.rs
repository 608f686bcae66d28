//! Frozen base weights kept in their file's quantized blocks (QLoRA's memory saving): a 7B
//! model's projections take 3.6 GiB as `Q4_0` instead of 25.6 GiB as f32. Each use
//! dequantizes the weight into a transient f32 matrix with the same values, in the same layout,
//! as a base loaded densely would hold, so the model's arithmetic (and every bit of its
//! results) does not depend on how the base is kept.

use std::sync::Arc;

use rayon::prelude::*;

use crate::quant::{dequantize_into, TensorType};

use super::ModelError;

/// Output columns (input features) dequantized by one task of [`QuantizedMatrix::dequantize_transposed`]:
/// one K-quant block, eight 32-value blocks, and few enough output rows that their cache lines
/// stay in cache while every weight row is visited.
const COLUMNS_PER_TASK: usize = 256;

/// Rows of one task of [`QuantizedMatrix::dequantize`].
const ROWS_PER_TASK: usize = 64;

/// Rows dequantized together before they are written out transposed: 16 f32 values, one
/// cache line of each output row.
const TILE_ROWS: usize = 16;

/// A `[rows, cols]` matrix (rows are output features, as GGUF and Hugging Face store
/// projections) held as the blocks of a file, each row a whole number of blocks.
#[derive(Clone)]
pub struct QuantizedMatrix {
    bytes: Arc<Vec<u8>>,
    offset: usize,
    kind: TensorType,
    rows: usize,
    cols: usize,
    /// Row `r` of the matrix is stored row `sources[r]` (llama.cpp's permuted query and key
    /// rows); `None` when rows are stored in order.
    sources: Option<Arc<[u32]>>,
}

impl std::fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedMatrix")
            .field("kind", &self.kind)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("reordered", &self.sources.is_some())
            .finish()
    }
}

impl QuantizedMatrix {
    /// The matrix whose `rows * cols` values of type `kind` start at `offset` in `bytes`.
    /// Refuses a row that is not a whole number of blocks or data past the end of `bytes`.
    pub fn new(
        bytes: Arc<Vec<u8>>,
        offset: usize,
        kind: TensorType,
        rows: usize,
        cols: usize,
    ) -> Result<Self, ModelError> {
        let row_bytes = kind.byte_len(cols).ok_or_else(|| {
            ModelError::Format(format!(
                "a row of {cols} values is not a whole number of {kind} blocks"
            ))
        })?;
        let end = row_bytes
            .checked_mul(rows)
            .and_then(|len| len.checked_add(offset));
        if end.is_none_or(|end| end > bytes.len()) {
            return Err(ModelError::Format(format!(
                "a {rows}x{cols} {kind} matrix at byte {offset} lies outside its file"
            )));
        }
        Ok(Self {
            bytes,
            offset,
            kind,
            rows,
            cols,
            sources: None,
        })
    }

    /// The same matrix with its rows taken in another order: row `r` is stored row `sources[r]`.
    ///
    /// # Panics
    /// If `sources` is not a permutation of the rows.
    pub fn with_row_sources(mut self, sources: Vec<u32>) -> Self {
        let mut seen = vec![false; self.rows];
        for &source in &sources {
            let slot = &mut seen[source as usize];
            assert!(!*slot, "row sources must be a permutation");
            *slot = true;
        }
        assert_eq!(sources.len(), self.rows, "one source per row");
        self.sources = Some(sources.into());
        self
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The storage type.
    pub fn kind(&self) -> TensorType {
        self.kind
    }

    /// Bytes of the blocks.
    pub fn byte_len(&self) -> usize {
        self.row_bytes() * self.rows
    }

    fn row_bytes(&self) -> usize {
        self.kind
            .byte_len(self.cols)
            .expect("checked when the matrix was made")
    }

    /// The blocks of row `row` (in the matrix's order: a permuted row is read where it is
    /// stored).
    pub fn stored_row(&self, row: usize) -> &[u8] {
        self.row_span(row, 0, self.cols)
    }

    /// The stored bytes of row `row`'s columns `[start, end)` (block-aligned).
    fn row_span(&self, row: usize, start: usize, end: usize) -> &[u8] {
        let stored = self.sources.as_ref().map_or(row, |s| s[row] as usize);
        let (per_block, block_bytes) = self.kind.block();
        let base = self.offset + stored * self.row_bytes();
        &self.bytes[base + start / per_block * block_bytes..base + end / per_block * block_bytes]
    }

    /// Whether every value is finite (checked once, when a model is loaded; on rayon's threads).
    pub fn all_finite(&self) -> bool {
        (0..self.rows).into_par_iter().all(|row| {
            let mut values = Vec::with_capacity(self.cols);
            dequantize_into(self.kind, self.row_span(row, 0, self.cols), &mut values);
            values.iter().all(|v| v.is_finite())
        })
    }

    /// Rows `ids`, dequantized: `[ids.len(), cols]` row-major (an embedding lookup).
    ///
    /// # Panics
    /// If an id is not a row.
    pub fn dequantize_rows(&self, ids: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            assert!(id < self.rows, "row {id} of {}", self.rows);
            dequantize_into(self.kind, self.row_span(id, 0, self.cols), &mut out);
        }
        out
    }

    /// The whole matrix, dequantized: `[rows, cols]` row-major. Runs on rayon's threads.
    pub fn dequantize(&self) -> Vec<f32> {
        let cols = self.cols;
        let mut out = vec![0.0f32; self.rows * cols];
        if out.is_empty() {
            return out;
        }
        out.par_chunks_mut(cols * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, chunk)| {
                let mut values = Vec::with_capacity(cols);
                for (i, row) in chunk.chunks_mut(cols).enumerate() {
                    values.clear();
                    let span = self.row_span(task * ROWS_PER_TASK + i, 0, cols);
                    dequantize_into(self.kind, span, &mut values);
                    row.copy_from_slice(&values);
                }
            });
        out
    }

    /// The whole matrix, dequantized and transposed: `[cols, rows]` row-major, so `x · w` is a
    /// projection of `x` (`[n, cols]`). Runs on rayon's threads, each writing its own output rows.
    pub fn dequantize_transposed(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let mut out = vec![0.0f32; rows * cols];
        if out.is_empty() {
            return out;
        }
        out.par_chunks_mut(COLUMNS_PER_TASK * rows)
            .enumerate()
            .for_each(|(task, slab)| {
                let start = task * COLUMNS_PER_TASK;
                let end = (start + COLUMNS_PER_TASK).min(cols);
                let width = end - start;
                // A tile of rows is dequantized whole, then written out column by column: each
                // output row receives a run of TILE_ROWS values (one cache line), not one.
                let mut tile = Vec::with_capacity(TILE_ROWS * width);
                for first in (0..rows).step_by(TILE_ROWS) {
                    let last = (first + TILE_ROWS).min(rows);
                    tile.clear();
                    for row in first..last {
                        dequantize_into(self.kind, self.row_span(row, start, end), &mut tile);
                    }
                    for column in 0..width {
                        let run = &mut slab[column * rows + first..column * rows + last];
                        for (i, value) in run.iter_mut().enumerate() {
                            *value = tile[i * width + column];
                        }
                    }
                }
            });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::transpose;
    use crate::quant::{dequantize, quantize_q4_k, quantize_q5_0};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_values::uniform(n, seed, 1.0)
    }

    /// A file holding some bytes, then the matrix.
    fn stored(encoded: &[u8]) -> Arc<Vec<u8>> {
        let mut bytes = vec![7u8; 40];
        bytes.extend_from_slice(encoded);
        Arc::new(bytes)
    }

    #[test]
    fn transposed_dequantization_equals_dequantizing_then_transposing() {
        // Widths under, at and past one task's columns, in 32- and 256-value blocks.
        for (kind, rows, cols) in [
            (TensorType::Q5_0, 3, 32),
            (TensorType::Q5_0, 70, 288),
            (TensorType::Q5_0, 5, 800),
            (TensorType::Q4_K, 9, 768),
        ] {
            let source = values(rows * cols, rows as u64);
            let encoded = match kind {
                TensorType::Q4_K => quantize_q4_k(&source),
                _ => quantize_q5_0(&source),
            };
            let matrix = QuantizedMatrix::new(stored(&encoded), 40, kind, rows, cols).unwrap();
            let dense = dequantize(kind, &encoded, rows * cols);
            let expected = transpose(&dense, rows, cols);
            assert_eq!(matrix.dequantize(), dense);
            let got = matrix.dequantize_transposed();
            assert!(
                got.iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kind} {rows}x{cols}"
            );
            assert_eq!(matrix.dequantize_rows(&[rows - 1, 0]), {
                let mut rows_wanted = dense[(rows - 1) * cols..].to_vec();
                rows_wanted.extend_from_slice(&dense[..cols]);
                rows_wanted
            });
            assert_eq!(matrix.byte_len(), encoded.len());
        }
    }

    #[test]
    fn reordered_rows_come_from_their_sources() {
        let (rows, cols) = (4, 64);
        let source = values(rows * cols, 3);
        let encoded = quantize_q5_0(&source);
        let dense = dequantize(TensorType::Q5_0, &encoded, rows * cols);
        let matrix = QuantizedMatrix::new(stored(&encoded), 40, TensorType::Q5_0, rows, cols)
            .unwrap()
            .with_row_sources(vec![2, 0, 3, 1]);
        let got = matrix.dequantize_rows(&[0, 1]);
        assert_eq!(&got[..cols], &dense[2 * cols..3 * cols]);
        assert_eq!(&got[cols..], &dense[..cols]);
        let transposed = matrix.dequantize_transposed();
        // Column 0 of the transposed matrix is row 0's first value: stored row 2's.
        assert_eq!(transposed[0], dense[2 * cols]);
        assert_eq!(transposed[3], dense[cols]);
    }

    #[test]
    fn a_matrix_past_its_file_or_in_partial_blocks_is_refused() {
        let encoded = quantize_q5_0(&values(64, 1));
        let bytes = stored(&encoded);
        assert!(QuantizedMatrix::new(bytes.clone(), 40, TensorType::Q5_0, 2, 32).is_ok());
        assert!(QuantizedMatrix::new(bytes.clone(), 41, TensorType::Q5_0, 2, 32).is_err());
        assert!(QuantizedMatrix::new(bytes.clone(), 40, TensorType::Q5_0, 3, 32).is_err());
        assert!(QuantizedMatrix::new(bytes.clone(), 40, TensorType::Q5_0, 1, 48).is_err());
        assert!(QuantizedMatrix::new(bytes, usize::MAX, TensorType::Q5_0, 1, 32).is_err());
    }
}
