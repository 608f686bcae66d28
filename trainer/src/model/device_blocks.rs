//! Quantized base weights kept on the GPU in their blocks and dequantized there, per use.
//!
//! A weight in [`QuantizedMatrix`] lives on the host; on the CPU backend each use dequantizes
//! it on rayon's threads. On a GPU that would mean dequantizing the whole model on the host
//! and sending it over the bus twice a step (forward, backward): for a 7B base, 28 GB of f32
//! each way. Here the 32-value block types (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`) are uploaded
//! once as packed integer codes (eight 4-bit or four 8-bit codes to an `i32` word) with one f32
//! scale (and minimum) per block, and each use unpacks them with a handful of element-wise
//! tensor operations on the device, which burn's fusion compiles into few kernels. The
//! arithmetic is the host's, operation for operation (`(q + c) · d + m`), so the values are the
//! host's too (a GPU may contract `· d + m` into one rounding for the types with a minimum).
//! Other types (the K-quants) stay on the host path.

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::blocks::QuantizedMatrix;
use crate::quant::TensorType;

/// Values in one block of the types kept here.
const BLOCK: usize = 32;

/// How one block type's codes become values.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Format {
    /// 4 or 8.
    bits: usize,
    /// 8-bit codes are two's complement (`Q8_0`).
    signed: bool,
    /// Added to each code before the scale (`Q4_0`: −8, `Q5_0`: −16).
    offset: f32,
    /// Whether each block has a minimum added after the scale.
    minimum: bool,
}

impl Format {
    fn of(kind: TensorType) -> Option<Self> {
        let format = |bits, signed, offset, minimum| Format {
            bits,
            signed,
            offset,
            minimum,
        };
        Some(match kind {
            TensorType::Q4_0 => format(4, false, -8.0, false),
            TensorType::Q4_1 => format(4, false, 0.0, true),
            TensorType::Q5_0 => format(8, false, -16.0, false),
            TensorType::Q5_1 => format(8, false, 0.0, true),
            TensorType::Q8_0 => format(8, true, 0.0, false),
            _ => return None,
        })
    }

    fn codes_per_word(&self) -> usize {
        32 / self.bits
    }
}

/// A `[rows, cols]` matrix's blocks on a device: codes packed into words, scales per block.
#[derive(Debug, Clone)]
pub struct DeviceBlocks {
    rows: usize,
    cols: usize,
    format: Format,
    /// `[rows, cols / codes_per_word, 1]`.
    words: Tensor<3, Int>,
    /// `[rows, cols / 32, 1]`.
    scales: Tensor<3>,
    /// `[rows, cols / 32, 1]`, for the types with a minimum.
    minimums: Option<Tensor<3>>,
}

impl DeviceBlocks {
    /// Uploads `matrix` to `device` in its blocks (rows in the matrix's order, llama.cpp's
    /// permutation undone); `None` for a type kept on the host.
    pub fn upload(matrix: &QuantizedMatrix, device: &Device) -> Option<Self> {
        let format = Format::of(matrix.kind())?;
        let (rows, cols) = matrix.dims();
        let blocks = cols / BLOCK;
        let per_word = format.codes_per_word();
        let mut words: Vec<i32> = Vec::with_capacity(rows * cols / per_word);
        let mut scales = Vec::with_capacity(rows * blocks);
        let mut minimums = Vec::with_capacity(if format.minimum { rows * blocks } else { 0 });
        let (_, block_bytes) = matrix.kind().block();
        let mut codes = [0u8; BLOCK];
        for row in 0..rows {
            for block in matrix.stored_row(row).chunks_exact(block_bytes) {
                let (d, m) = block_codes(matrix.kind(), block, &mut codes);
                scales.push(d);
                if format.minimum {
                    minimums.push(m);
                }
                for word in codes.chunks_exact(per_word) {
                    let packed = word
                        .iter()
                        .enumerate()
                        .fold(0u32, |w, (i, &c)| w | u32::from(c) << (i * format.bits));
                    words.push(packed as i32);
                }
            }
        }
        let float = |values: Vec<f32>| {
            Tensor::<3>::from_data(TensorData::new(values, [rows, blocks, 1]), device)
        };
        Some(Self {
            rows,
            cols,
            format,
            words: Tensor::from_data(TensorData::new(words, [rows, cols / per_word, 1]), device),
            scales: float(scales),
            minimums: format.minimum.then(|| float(minimums)),
        })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held on the device (codes as 32-bit words, f32 scales and minimums).
    pub fn byte_len(&self) -> usize {
        let per_block = if self.format.minimum { 8 } else { 4 };
        self.rows * self.cols / self.format.codes_per_word() * 4
            + self.rows * self.cols / BLOCK * per_block
    }

    /// The whole matrix, `[rows, cols]`, dequantized on the device.
    pub fn dequantize(&self) -> Tensor<2> {
        let values = dequantize_words(
            self.format,
            self.words.clone(),
            self.scales.clone(),
            self.minimums.clone(),
        );
        values.reshape([self.rows, self.cols])
    }

    /// Rows `ids` (`[n]`), `[n, cols]`, dequantized on the device: an embedding lookup whose
    /// ids never leave the device.
    pub fn dequantize_rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        let n = ids.dims()[0];
        let values = dequantize_words(
            self.format,
            self.words.clone().select(0, ids.clone()),
            self.scales.clone().select(0, ids.clone()),
            self.minimums.clone().map(|m| m.select(0, ids)),
        );
        values.reshape([n, self.cols])
    }
}

/// Values `[rows, blocks, 32]` of packed `words` (`[rows, words, 1]`).
fn dequantize_words(
    format: Format,
    words: Tensor<3, Int>,
    scales: Tensor<3>,
    minimums: Option<Tensor<3>>,
) -> Tensor<3> {
    let [rows, count, _] = words.dims();
    let per_word = format.codes_per_word();
    let device = words.device();
    let shifts: Vec<i32> = (0..per_word).map(|i| (i * format.bits) as i32).collect();
    let shifts = Tensor::<3, Int>::from_data(TensorData::new(shifts, [1, 1, per_word]), &device)
        .expand([rows, count, per_word]);
    let mask = (1i32 << format.bits) - 1;
    let codes = words
        .expand([rows, count, per_word])
        .bitwise_right_shift(shifts)
        .bitwise_and_scalar(mask);
    // Two's complement of the low byte, without depending on the device's integer width.
    let codes = if format.signed {
        codes.clone() - codes.bitwise_right_shift_scalar(7).mul_scalar(256)
    } else {
        codes
    };
    let blocks = rows * count * per_word / BLOCK;
    let mut values = codes.float().reshape([rows, blocks / rows.max(1), BLOCK]);
    if format.offset != 0.0 {
        values = values.add_scalar(format.offset);
    }
    let values = values * scales.expand([rows, blocks / rows.max(1), BLOCK]);
    match minimums {
        Some(m) => values + m.expand([rows, blocks / rows.max(1), BLOCK]),
        None => values,
    }
}

/// The 32 codes of `block` (as the host's dequantization reads them, before the offset) and
/// its scale and minimum (0 where it has none).
fn block_codes(kind: TensorType, block: &[u8], codes: &mut [u8; BLOCK]) -> (f32, f32) {
    let half = |at: usize| half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
    match kind {
        TensorType::Q4_0 | TensorType::Q4_1 => {
            let start = if kind == TensorType::Q4_0 { 2 } else { 4 };
            for (i, &byte) in block[start..start + 16].iter().enumerate() {
                codes[i] = byte & 0x0F;
                codes[i + 16] = byte >> 4;
            }
        }
        TensorType::Q5_0 | TensorType::Q5_1 => {
            let start = if kind == TensorType::Q5_0 { 2 } else { 4 };
            *codes = crate::quant::five_bits(block, start);
        }
        TensorType::Q8_0 => codes.copy_from_slice(&block[2..34]),
        _ => unreachable!("Format::of admits only the 32-value types"),
    }
    let minimum = match kind {
        TensorType::Q4_1 | TensorType::Q5_1 => half(2),
        _ => 0.0,
    };
    (half(0), minimum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn bits(t: Tensor<2>) -> Vec<u32> {
        let values = t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        values.into_iter().map(f32::to_bits).collect()
    }

    /// `count` blocks of `kind` with random codes and finite random scales and minimums.
    fn random_blocks(kind: TensorType, count: usize, seed: u64) -> Vec<u8> {
        let mut rng = tributary_shared::config::SplitMix64(seed);
        let (_, block_bytes) = kind.block();
        let halves = if Format::of(kind).is_some_and(|f| f.minimum) {
            2
        } else {
            1
        };
        let mut out = Vec::with_capacity(count * block_bytes);
        for _ in 0..count {
            for _ in 0..halves {
                let value = rng.next_unit() * 2.0 - 1.0;
                out.extend_from_slice(&half::f16::from_f32(value).to_le_bytes());
            }
            out.extend((2 * halves..block_bytes).map(|_| rng.next_u64() as u8));
        }
        out
    }

    #[test]
    fn device_blocks_dequantize_to_the_hosts_bits() {
        let device = Device::flex();
        let (rows, cols) = (6, 96);
        for kind in [
            TensorType::Q4_0,
            TensorType::Q4_1,
            TensorType::Q5_0,
            TensorType::Q5_1,
            TensorType::Q8_0,
        ] {
            let bytes = random_blocks(kind, rows * cols / BLOCK, 9);
            let matrix = QuantizedMatrix::new(Arc::new(bytes), 0, kind, rows, cols)
                .unwrap()
                .with_row_sources(vec![3, 0, 5, 1, 4, 2]);
            let host = matrix.dequantize();
            let on_device = DeviceBlocks::upload(&matrix, &device).unwrap();
            let expected: Vec<u32> = host.iter().map(|v| v.to_bits()).collect();
            assert_eq!(bits(on_device.dequantize()), expected, "{kind}");
            assert!(host.iter().any(|v| *v < 0.0) && host.iter().any(|v| *v > 0.0));

            let ids = Tensor::<1, Int>::from_data(TensorData::new(vec![4i64, 0, 4], [3]), &device);
            let rows_of = matrix.dequantize_rows(&[4, 0, 4]);
            let expected: Vec<u32> = rows_of.iter().map(|v| v.to_bits()).collect();
            assert_eq!(bits(on_device.dequantize_rows(ids)), expected, "{kind}");
        }
    }

    #[test]
    fn k_quants_stay_on_the_host() {
        assert!(Format::of(TensorType::Q4_K).is_none());
        assert!(Format::of(TensorType::Q6_K).is_none());
        assert_eq!(Format::of(TensorType::Q4_0).map(|f| f.bits), Some(4));
    }
}
