//! Quantized base weights kept on the GPU in their blocks and dequantized there, per use.
//!
//! A weight in [`QuantizedMatrix`] lives on the host; on the CPU backend each use dequantizes
//! it on rayon's threads. On a GPU that would mean dequantizing the whole model on the host
//! and sending it over the bus twice a step (forward, backward): for a 7B base, 28 GB of f32
//! each way. Here the weights are uploaded once as packed integer codes (eight 4-bit or four
//! 8-bit codes to an `i32` word) with one f32 scale (and minimum) per group of 32 or 16 values,
//! computed on the host as the host's dequantization computes them, and each use unpacks them
//! with a handful of element-wise tensor operations on the device, which burn's fusion compiles
//! into few kernels. Every type the models use is covered: `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`,
//! `Q8_0`, and the K-quants `Q4_K`, `Q5_K`, `Q6_K` (llama.cpp's `Q4_K_M` and `Q5_K_M` mixes);
//! others (`Q2_K`, `Q3_K`) stay on the host path. The arithmetic is the host's, operation for
//! operation (`(q + c) · d + m`), so the values are the host's too (a GPU may contract
//! `· d + m` into one rounding for the types with a minimum).

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::blocks::QuantizedMatrix;
use crate::quant::TensorType;

/// How one block type's codes become values.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Format {
    /// 4 or 8.
    bits: usize,
    /// 8-bit codes are two's complement (`Q8_0`).
    signed: bool,
    /// Added to each code before the scale (`Q4_0`: −8, `Q5_0`: −16).
    offset: f32,
    /// Whether each group has a minimum added after the scale.
    minimum: bool,
    /// Values sharing one scale (and minimum).
    group: usize,
}

impl Format {
    fn of(kind: TensorType) -> Option<Self> {
        let format = |bits, signed, offset, minimum, group| Format {
            bits,
            signed,
            offset,
            minimum,
            group,
        };
        Some(match kind {
            TensorType::Q4_0 => format(4, false, -8.0, false, 32),
            TensorType::Q4_1 => format(4, false, 0.0, true, 32),
            TensorType::Q5_0 => format(8, false, -16.0, false, 32),
            TensorType::Q5_1 => format(8, false, 0.0, true, 32),
            TensorType::Q8_0 => format(8, true, 0.0, false, 32),
            TensorType::Q4_K => format(4, false, 0.0, true, 32),
            TensorType::Q5_K => format(8, false, 0.0, true, 32),
            TensorType::Q6_K => format(8, false, -32.0, false, 16),
            _ => return None,
        })
    }

    fn codes_per_word(&self) -> usize {
        32 / self.bits
    }
}

/// A `[rows, cols]` matrix's blocks on a device: codes packed into words, scales per group.
#[derive(Debug, Clone)]
pub struct DeviceBlocks {
    rows: usize,
    cols: usize,
    format: Format,
    /// `[rows, cols / codes_per_word, 1]`.
    words: Tensor<3, Int>,
    /// `[rows, cols / group, 1]`.
    scales: Tensor<3>,
    /// `[rows, cols / group, 1]`, for the types with a minimum.
    minimums: Option<Tensor<3>>,
    /// `[1, 1, codes_per_word]`: where each code sits in its word (uploaded once).
    shifts: Tensor<3, Int>,
}

impl DeviceBlocks {
    /// Uploads `matrix` to `device` in its blocks (rows in the matrix's order, llama.cpp's
    /// permutation undone); `None` for a type kept on the host.
    pub fn upload(matrix: &QuantizedMatrix, device: &Device) -> Option<Self> {
        let format = Format::of(matrix.kind())?;
        let (rows, cols) = matrix.dims();
        let groups = cols / format.group;
        let per_word = format.codes_per_word();
        let mut words: Vec<i32> = Vec::with_capacity(rows * cols / per_word);
        let mut scales = Vec::with_capacity(rows * groups);
        let mut minimums = Vec::with_capacity(rows * groups);
        let (_, block_bytes) = matrix.kind().block();
        let mut codes = Vec::with_capacity(cols);
        for row in 0..rows {
            codes.clear();
            for block in matrix.stored_row(row).chunks_exact(block_bytes) {
                decode(matrix.kind(), block, &mut codes, &mut scales, &mut minimums);
            }
            for word in codes.chunks_exact(per_word) {
                let packed = word
                    .iter()
                    .enumerate()
                    .fold(0u32, |w, (i, &c)| w | u32::from(c) << (i * format.bits));
                words.push(packed as i32);
            }
        }
        let float = |values: Vec<f32>| {
            Tensor::<3>::from_data(TensorData::new(values, [rows, groups, 1]), device)
        };
        Some(Self {
            rows,
            cols,
            format,
            words: Tensor::from_data(TensorData::new(words, [rows, cols / per_word, 1]), device),
            scales: float(scales),
            minimums: format.minimum.then(|| float(minimums)),
            shifts: Tensor::from_data(
                TensorData::new(
                    (0..per_word).map(|i| (i * format.bits) as i32).collect(),
                    [1, 1, per_word],
                ),
                device,
            ),
        })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held on the device (codes as 32-bit words, f32 scales and minimums).
    pub fn byte_len(&self) -> usize {
        let per_group = if self.format.minimum { 8 } else { 4 };
        self.rows * self.cols / self.format.codes_per_word() * 4
            + self.rows * self.cols / self.format.group * per_group
    }

    /// The whole matrix, `[rows, cols]`, dequantized on the device.
    pub fn dequantize(&self) -> Tensor<2> {
        let values = dequantize_words(
            self.format,
            self.shifts.clone(),
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
            self.shifts.clone(),
            self.words.clone().select(0, ids.clone()),
            self.scales.clone().select(0, ids.clone()),
            self.minimums.clone().map(|m| m.select(0, ids)),
        );
        values.reshape([n, self.cols])
    }
}

/// Values `[rows, groups, group]` of packed `words` (`[rows, words, 1]`).
fn dequantize_words(
    format: Format,
    shifts: Tensor<3, Int>,
    words: Tensor<3, Int>,
    scales: Tensor<3>,
    minimums: Option<Tensor<3>>,
) -> Tensor<3> {
    let [rows, count, _] = words.dims();
    let per_word = format.codes_per_word();
    let shifts = shifts.expand([rows, count, per_word]);
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
    let group = format.group;
    let groups = count * per_word / group;
    let mut values = codes.float().reshape([rows, groups, group]);
    if format.offset != 0.0 {
        values = values.add_scalar(format.offset);
    }
    let values = values * scales.expand([rows, groups, group]);
    match minimums {
        Some(m) => values + m.expand([rows, groups, group]),
        None => values,
    }
}

/// Appends `block`'s codes (as the host's dequantization reads them, before the offset), its
/// groups' scales and, for the types with one, minimums, each computed as the host computes it.
fn decode(
    kind: TensorType,
    block: &[u8],
    codes: &mut Vec<u8>,
    scales: &mut Vec<f32>,
    minimums: &mut Vec<f32>,
) {
    use crate::quant::{half, k_nibble, scales_and_minima, QK_K};
    match kind {
        TensorType::Q4_0 | TensorType::Q4_1 => {
            let start = if kind == TensorType::Q4_0 { 2 } else { 4 };
            let nibbles = &block[start..start + 16];
            codes.extend(nibbles.iter().map(|b| b & 0x0F));
            codes.extend(nibbles.iter().map(|b| b >> 4));
        }
        TensorType::Q5_0 | TensorType::Q5_1 => {
            let start = if kind == TensorType::Q5_0 { 2 } else { 4 };
            codes.extend(crate::quant::five_bits(block, start));
        }
        TensorType::Q8_0 => codes.extend_from_slice(&block[2..34]),
        TensorType::Q4_K | TensorType::Q5_K => {
            let (d, dmin) = (half(block), half(&block[2..]));
            let (scale, minimum) = scales_and_minima(&block[4..16]);
            for (&scale, &minimum) in scale.iter().zip(&minimum) {
                scales.push(d * f32::from(scale));
                // `q · dl − ml` on the host: `q · dl + (−ml)` is the same operation.
                minimums.push(-(dmin * f32::from(minimum)));
            }
            if kind == TensorType::Q4_K {
                codes.extend((0..QK_K).map(|i| k_nibble(&block[16..144], i)));
            } else {
                let (high, quants) = (&block[16..48], &block[48..176]);
                codes.extend(
                    (0..QK_K)
                        .map(|i| k_nibble(quants, i) | (((high[i % 32] >> (i / 32)) & 1) << 4)),
                );
            }
            return;
        }
        TensorType::Q6_K => {
            let (low, high, group_scales) = (&block[..128], &block[128..192], &block[192..208]);
            let d = half(&block[208..]);
            scales.extend(group_scales.iter().map(|&s| d * f32::from(s as i8)));
            codes.extend((0..QK_K).map(|i| {
                let (h, within) = (i / 128, i % 128);
                let nibble = (low[h * 64 + within % 64] >> (4 * (within / 64))) & 0x0F;
                let top = (high[h * 32 + within % 32] >> (2 * (within / 32))) & 3;
                nibble | (top << 4)
            }));
            return;
        }
        _ => unreachable!("Format::of admits only these types"),
    }
    scales.push(half(block));
    if matches!(kind, TensorType::Q4_1 | TensorType::Q5_1) {
        minimums.push(half(&block[2..]));
    }
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
            let bytes = random_blocks(kind, rows * cols / 32, 9);
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
    fn k_quants_dequantize_to_the_hosts_bits_and_the_rest_stay_on_the_host() {
        use crate::quant::{quantize_q4_k, quantize_q6_k};
        let device = Device::flex();
        let (rows, cols) = (3, 512);
        let values = crate::test_values::uniform(rows * cols, 4, 2.0);
        for (kind, bytes) in [
            (TensorType::Q4_K, quantize_q4_k(&values)),
            (TensorType::Q6_K, quantize_q6_k(&values)),
            (
                TensorType::Q5_K,
                random_blocks(TensorType::Q5_K, rows * cols / 256, 2),
            ),
        ] {
            let matrix = QuantizedMatrix::new(Arc::new(bytes), 0, kind, rows, cols).unwrap();
            let expected: Vec<u32> = matrix.dequantize().iter().map(|v| v.to_bits()).collect();
            let on_device = DeviceBlocks::upload(&matrix, &device).unwrap();
            assert_eq!(bits(on_device.dequantize()), expected, "{kind}");
        }
        assert!(Format::of(TensorType::Q2_K).is_none());
        assert!(Format::of(TensorType::Q3_K).is_none());
    }
}
