//! GGML tensor types: their block layouts and dequantization to f32.
//!
//! Each function reads whole blocks and computes every value with the same f32 operations, in
//! the same order, as llama.cpp's reference dequantization (`ggml-quants.c`, mirrored by the
//! `gguf` Python package), so the values are bit-identical to it; a test checks that against
//! fixtures the `gguf` package wrote (`scripts/gguf_dequant_fixtures.py`).
//!
//! Layouts (little-endian; "f16" is an IEEE half):
//! - `Q4_0` (32 values, 18 bytes): f16 scale `d`, 16 bytes of 4-bit `q` (low nibbles are values
//!   0–15, high nibbles 16–31); `x = (q − 8)·d`.
//! - `Q4_1` (32, 20): f16 `d`, f16 minimum `m`, 16 bytes of nibbles; `x = q·d + m`.
//! - `Q5_0` (32, 22): f16 `d`, a u32 of fifth bits (bit `i` for value `i`), 16 bytes of nibbles;
//!   `x = (q − 16)·d`.
//! - `Q5_1` (32, 24): f16 `d`, f16 `m`, u32 of fifth bits, 16 bytes of nibbles; `x = q·d + m`.
//! - `Q8_0` (32, 34): f16 `d`, 32 signed bytes; `x = q·d`.
//! - K-quants, 256 values a super-block in 16 or 8 sub-blocks, each with its own scale (and
//!   minimum) quantized against the super-block's f16 `d` (and `dmin`):
//!   - `Q2_K` (84): 16 bytes of sub-block scales (low nibble scale, high nibble minimum), 64
//!     bytes of 2-bit `q`, f16 `d`, f16 `dmin`; `x = (d·s)·q − dmin·m` per 16 values.
//!   - `Q3_K` (110): 32 bytes of high bits, 64 bytes of 2-bit low parts, 12 bytes packing 16
//!     6-bit scales (offset by 32), f16 `d`; `q = low − 4` when the high bit is clear, `x =
//!     (d·s)·q` per 16 values.
//!   - `Q4_K` (144): f16 `d`, f16 `dmin`, 12 bytes packing 8 6-bit scales and 8 6-bit minima,
//!     128 bytes of nibbles; `x = (d·s)·q − dmin·m` per 32 values.
//!   - `Q5_K` (176): like `Q4_K` with 32 bytes of fifth bits before the nibbles.
//!   - `Q6_K` (210): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed scales,
//!     f16 `d`; `x = (d·s)·(q − 32)` per 16 values.
//!   - `Q8_K` (292): f32 `d`, 256 signed bytes, 16 i16 block sums (used by llama.cpp's dot
//!     products, not here); `x = d·q`.
//! - `BF16`: the upper half of an f32.

use half::f16;

/// Values in a K-quant super-block.
pub const QK_K: usize = 256;

/// The GGML tensor types this reader handles, named as llama.cpp names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[allow(non_camel_case_types)]
pub enum TensorType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    BF16,
    /// 32 values: scale, 4-bit values offset by 8.
    Q4_0,
    /// 32 values: scale, minimum, 4-bit values.
    Q4_1,
    /// 32 values: scale, 5-bit values offset by 16.
    Q5_0,
    /// 32 values: scale, minimum, 5-bit values.
    Q5_1,
    /// 32 values: scale, signed bytes.
    Q8_0,
    /// 256 values, 2.625 bits each.
    Q2_K,
    /// 256 values, 3.4375 bits each.
    Q3_K,
    /// 256 values, 4.5 bits each.
    Q4_K,
    /// 256 values, 5.5 bits each.
    Q5_K,
    /// 256 values, 6.5625 bits each.
    Q6_K,
    /// 256 values: f32 scale, signed bytes and block sums.
    Q8_K,
}

impl TensorType {
    /// Every type, in GGML id order.
    pub const ALL: [TensorType; 14] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
        Self::BF16,
    ];

    /// The type with GGML id `id`, if this reader handles it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.id() == id)
    }

    /// The GGML type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// Its name as llama.cpp writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
        }
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2_K => (QK_K, 84),
            Self::Q3_K => (QK_K, 110),
            Self::Q4_K => (QK_K, 144),
            Self::Q5_K => (QK_K, 176),
            Self::Q6_K => (QK_K, 210),
            Self::Q8_K => (QK_K, 292),
        }
    }

    /// Bytes holding `elements` values (which must be a whole number of blocks).
    pub fn byte_len(self, elements: usize) -> Option<usize> {
        let (per_block, bytes) = self.block();
        if !elements.is_multiple_of(per_block) {
            return None;
        }
        (elements / per_block).checked_mul(bytes)
    }
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantizes `elements` values of type `kind` from `data` (which must hold exactly them).
///
/// # Panics
/// If `data` has another length than `kind.byte_len(elements)`; callers check it.
pub fn dequantize(kind: TensorType, data: &[u8], elements: usize) -> Vec<f32> {
    assert_eq!(
        Some(data.len()),
        kind.byte_len(elements),
        "data must hold exactly the tensor"
    );
    let mut out = Vec::with_capacity(elements);
    dequantize_into(kind, data, &mut out);
    out
}

/// Appends the values of `data`, whole blocks of type `kind`, to `out`.
pub fn dequantize_into(kind: TensorType, data: &[u8], out: &mut Vec<f32>) {
    let (_, block_bytes) = kind.block();
    let blocks = data.chunks_exact(block_bytes);
    match kind {
        TensorType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        TensorType::F16 => out.extend(blocks.map(half)),
        TensorType::BF16 => out.extend(
            blocks.map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
        ),
        TensorType::Q4_0 => blocks.for_each(|b| q4_0(b, out)),
        TensorType::Q4_1 => blocks.for_each(|b| q4_1(b, out)),
        TensorType::Q5_0 => blocks.for_each(|b| q5_0(b, out)),
        TensorType::Q5_1 => blocks.for_each(|b| q5_1(b, out)),
        TensorType::Q8_0 => blocks.for_each(|b| q8_0(b, out)),
        TensorType::Q2_K => blocks.for_each(|b| q2_k(b, out)),
        TensorType::Q3_K => blocks.for_each(|b| q3_k(b, out)),
        TensorType::Q4_K => blocks.for_each(|b| q4_k(b, out)),
        TensorType::Q5_K => blocks.for_each(|b| q5_k(b, out)),
        TensorType::Q6_K => blocks.for_each(|b| q6_k(b, out)),
        TensorType::Q8_K => blocks.for_each(|b| q8_k(b, out)),
    }
}

/// The f16 at the start of `bytes`, as f32.
pub(crate) fn half(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

// The 32-value types fill a stack array with straight-line loops (which the compiler
// vectorizes) and append it whole: several times faster than pushing value by value, the same
// arithmetic, so the same bits.

fn q4_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half(block);
    let quants = &block[2..18];
    let mut values = [0.0f32; 32];
    for i in 0..16 {
        values[i] = (f32::from(quants[i] & 0x0F) - 8.0) * d;
        values[i + 16] = (f32::from(quants[i] >> 4) - 8.0) * d;
    }
    out.extend_from_slice(&values);
}

fn q4_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half(block), half(&block[2..]));
    let quants = &block[4..20];
    let mut values = [0.0f32; 32];
    for i in 0..16 {
        values[i] = f32::from(quants[i] & 0x0F) * d + m;
        values[i + 16] = f32::from(quants[i] >> 4) * d + m;
    }
    out.extend_from_slice(&values);
}

/// The 5-bit values of a `Q5_0`/`Q5_1` block whose fifth bits start at `high`.
pub(crate) fn five_bits(block: &[u8], high: usize) -> [u8; 32] {
    let bits = u32::from_le_bytes([
        block[high],
        block[high + 1],
        block[high + 2],
        block[high + 3],
    ]);
    let quants = &block[high + 4..high + 20];
    let mut values = [0u8; 32];
    for i in 0..16 {
        values[i] = (quants[i] & 0x0F) | ((((bits >> i) & 1) as u8) << 4);
        values[i + 16] = (quants[i] >> 4) | ((((bits >> (i + 16)) & 1) as u8) << 4);
    }
    values
}

fn q5_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half(block);
    let quants = five_bits(block, 2);
    let mut values = [0.0f32; 32];
    for (value, q) in values.iter_mut().zip(quants) {
        *value = d * f32::from(q as i8 - 16);
    }
    out.extend_from_slice(&values);
}

fn q5_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half(block), half(&block[2..]));
    let quants = five_bits(block, 4);
    let mut values = [0.0f32; 32];
    for (value, q) in values.iter_mut().zip(quants) {
        *value = d * f32::from(q) + m;
    }
    out.extend_from_slice(&values);
}

fn q8_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half(block);
    let mut values = [0.0f32; 32];
    for (value, &q) in values.iter_mut().zip(&block[2..34]) {
        *value = f32::from(q as i8) * d;
    }
    out.extend_from_slice(&values);
}

fn q2_k(block: &[u8], out: &mut Vec<f32>) {
    let (scales, quants) = (&block[..16], &block[16..80]);
    let (d, dmin) = (half(&block[80..]), half(&block[82..]));
    for i in 0..QK_K {
        // Two halves of 128 values, each four 2-bit planes of 32 bytes.
        let (h, plane, j) = (i / 128, (i % 128) / 32, i % 32);
        let q = (quants[h * 32 + j] >> (2 * plane)) & 3;
        let s = scales[i / 16];
        let dl = d * f32::from(s & 0x0F);
        let ml = dmin * f32::from(s >> 4);
        out.push(dl * f32::from(q) - ml);
    }
}

fn q3_k(block: &[u8], out: &mut Vec<f32>) {
    let (high, quants, packed) = (&block[..32], &block[32..96], &block[96..108]);
    let d = half(&block[108..]);
    let scales: [f32; 16] = std::array::from_fn(|i| {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let top = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        f32::from(((low | (top << 4)) as i8) - 32)
    });
    for i in 0..QK_K {
        let (h, plane, j) = (i / 128, (i % 128) / 32, i % 32);
        let low = ((quants[h * 32 + j] >> (2 * plane)) & 3) as i8;
        // A clear high bit subtracts 4.
        let bit = (high[j] >> (i / 32)) & 1;
        let q = low - (((bit ^ 1) << 2) as i8);
        out.push((d * scales[i / 16]) * f32::from(q));
    }
}

/// The eight 6-bit scales and minima of a `Q4_K`/`Q5_K` super-block.
pub(crate) fn scales_and_minima(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let scale = std::array::from_fn(|j| {
        if j < 4 {
            packed[j] & 0x3F
        } else {
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 2) & 0x30)
        }
    });
    let minimum = std::array::from_fn(|j| {
        if j < 4 {
            packed[j + 4] & 0x3F
        } else {
            (packed[j + 4] >> 4) | ((packed[j] >> 2) & 0x30)
        }
    });
    (scale, minimum)
}

/// A `Q4_K`/`Q5_K` super-block: `value(i)` is the quantized value `i`.
fn k_with_minima(block: &[u8], value: impl Fn(usize) -> u8, out: &mut Vec<f32>) {
    let (d, dmin) = (half(block), half(&block[2..]));
    let (scale, minimum) = scales_and_minima(&block[4..16]);
    for i in 0..QK_K {
        let group = i / 32;
        let dl = d * f32::from(scale[group]);
        let ml = dmin * f32::from(minimum[group]);
        out.push(dl * f32::from(value(i)) - ml);
    }
}

/// Value `i` of 256 stored as 4-bit nibbles in 128 bytes: chunks of 64 values, the low nibbles
/// of 32 bytes and then their high nibbles.
pub(crate) fn k_nibble(quants: &[u8], i: usize) -> u8 {
    let (chunk, upper, j) = (i / 64, (i % 64) / 32, i % 32);
    (quants[chunk * 32 + j] >> (4 * upper)) & 0x0F
}

fn q4_k(block: &[u8], out: &mut Vec<f32>) {
    let quants = &block[16..144];
    k_with_minima(block, |i| k_nibble(quants, i), out);
}

fn q5_k(block: &[u8], out: &mut Vec<f32>) {
    let (high, quants) = (&block[16..48], &block[48..176]);
    k_with_minima(
        block,
        |i| k_nibble(quants, i) | (((high[i % 32] >> (i / 32)) & 1) << 4),
        out,
    );
}

fn q6_k(block: &[u8], out: &mut Vec<f32>) {
    let (low, high, scales) = (&block[..128], &block[128..192], &block[192..208]);
    let d = half(&block[208..]);
    for i in 0..QK_K {
        let h = i / 128;
        let within = i % 128;
        let nib = (low[h * 64 + within % 64] >> (4 * (within / 64))) & 0x0F;
        let top = (high[h * 32 + within % 32] >> (2 * (within / 32))) & 3;
        let q = ((nib | (top << 4)) as i8) - 32;
        let dl = d * f32::from(scales[i / 16] as i8);
        out.push(dl * f32::from(q));
    }
}

fn q8_k(block: &[u8], out: &mut Vec<f32>) {
    let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    out.extend(block[4..4 + QK_K].iter().map(|&q| d * f32::from(q as i8)));
}

/// Quantizes `values` (a whole number of 256-value super-blocks) to `Q6_K`: each 16-value
/// sub-block's signed extreme maps to −32, sub-block scales are signed bytes against the
/// super-block's f16 `d`, values are rounded to nearest. Simpler than llama.cpp's search for
/// the best scale, and decoded by the same layout.
///
/// # Panics
/// If `values.len()` is not a multiple of [`QK_K`].
pub fn quantize_q6_k(values: &[f32]) -> Vec<u8> {
    assert!(values.len().is_multiple_of(QK_K), "whole super-blocks only");
    let mut out = Vec::with_capacity(values.len() / QK_K * 210);
    for x in values.chunks_exact(QK_K) {
        // Each sub-block's scale: its value of largest magnitude maps to −32.
        let scales: Vec<f32> = x
            .chunks_exact(16)
            .map(|sub| {
                let extreme = sub
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                extreme / -32.0
            })
            .collect();
        let largest = scales.iter().fold(0f32, |m, s| m.max(s.abs()));
        let d = f16::from_f32(largest / 127.0);
        let df = d.to_f32();
        let int_scales: Vec<i8> = scales
            .iter()
            .map(|s| {
                if df == 0.0 {
                    0
                } else {
                    (s / df).round().clamp(-128.0, 127.0) as i8
                }
            })
            .collect();
        let mut low = [0u8; 128];
        let mut high = [0u8; 64];
        for (i, &v) in x.iter().enumerate() {
            let step = df * f32::from(int_scales[i / 16]);
            let q = if step == 0.0 {
                0
            } else {
                (v / step).round().clamp(-32.0, 31.0) as i8
            };
            let stored = (q + 32) as u8;
            let (h, within) = (i / 128, i % 128);
            low[h * 64 + within % 64] |= (stored & 0x0F) << (4 * (within / 64));
            high[h * 32 + within % 32] |= (stored >> 4) << (2 * (within / 32));
        }
        out.extend_from_slice(&low);
        out.extend_from_slice(&high);
        out.extend(int_scales.iter().map(|&s| s as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

/// Quantizes f32 values to `Q5_0` blocks of 32 as llama.cpp's reference quantizer does: the
/// value of largest magnitude `max` (with its sign) sets `d = max / -16`; each value becomes
/// `min(31, trunc(x / d + 16.5))`, its low four bits in the nibbles (value `i` and `i + 16` share
/// a byte) and its fifth bit in bit `i` of the `u32`. A trailing partial block is padded with
/// zeros.
pub fn quantize_q5_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len().div_ceil(32) * 22);
    for chunk in values.chunks(32) {
        let mut block = [0f32; 32];
        block[..chunk.len()].copy_from_slice(chunk);
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in &block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
        let mut high = 0u32;
        let mut nibbles = [0u8; 16];
        for j in 0..16 {
            let (low, upper) = (q(block[j]), q(block[j + 16]));
            nibbles[j] = (low & 0x0f) | ((upper & 0x0f) << 4);
            high |= u32::from((low & 0x10) >> 4) << j;
            high |= u32::from((upper & 0x10) >> 4) << (j + 16);
        }
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&high.to_le_bytes());
        out.extend_from_slice(&nibbles);
    }
    out
}

/// Quantizes `values` (a whole number of 256-value super-blocks) to `Q4_K`: each 32-value
/// sub-block spans its minimum (at most 0) to its maximum in 15 steps, and the sub-block scales
/// and minima are 6-bit integers against the super-block's f16 `d` and `dmin`; values are
/// rounded to nearest. Simpler than llama.cpp's search, and decoded by the same layout.
///
/// # Panics
/// If `values.len()` is not a multiple of [`QK_K`].
pub fn quantize_q4_k(values: &[f32]) -> Vec<u8> {
    assert!(values.len().is_multiple_of(QK_K), "whole super-blocks only");
    let mut out = Vec::with_capacity(values.len() / QK_K * 144);
    for x in values.chunks_exact(QK_K) {
        let mut scales = [0f32; 8];
        let mut minima = [0f32; 8];
        for (j, sub) in x.chunks_exact(32).enumerate() {
            let min = sub.iter().fold(0f32, |m, &v| m.min(v));
            let max = sub.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            scales[j] = (max - min) / 15.0;
            minima[j] = -min;
        }
        let d = f16::from_f32(scales.iter().fold(0f32, |m, &s| m.max(s)) / 63.0);
        let dmin = f16::from_f32(minima.iter().fold(0f32, |m, &s| m.max(s)) / 63.0);
        let (df, dminf) = (d.to_f32(), dmin.to_f32());
        let six = |value: f32, unit: f32| -> u8 {
            if unit == 0.0 {
                0
            } else {
                (value / unit).round().clamp(0.0, 63.0) as u8
            }
        };
        let ls: [u8; 8] = std::array::from_fn(|j| six(scales[j], df));
        let lm: [u8; 8] = std::array::from_fn(|j| six(minima[j], dminf));
        let mut packed = [0u8; 12];
        for j in 0..4 {
            packed[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
            packed[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
            packed[j + 8] = (ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4);
        }
        let mut quants = [0u8; 128];
        for (i, &v) in x.iter().enumerate() {
            let group = i / 32;
            let step = df * f32::from(ls[group]);
            let offset = dminf * f32::from(lm[group]);
            let q = if step == 0.0 {
                0
            } else {
                ((v + offset) / step).round().clamp(0.0, 15.0) as u8
            };
            let (chunk, upper, j) = (i / 64, (i % 64) / 32, i % 32);
            quants[chunk * 32 + j] |= q << (4 * upper);
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&packed);
        out.extend_from_slice(&quants);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative RMS error of `kind`'s round trip of `values`.
    fn round_trip_error(kind: TensorType, values: &[f32], encoded: &[u8]) -> f64 {
        let decoded = dequantize(kind, encoded, values.len());
        let (mut err, mut norm) = (0f64, 0f64);
        for (a, b) in values.iter().zip(&decoded) {
            err += f64::from(a - b).powi(2);
            norm += f64::from(*a).powi(2);
        }
        (err / norm).sqrt()
    }

    #[test]
    fn k_quantizers_round_trip_within_their_precision() {
        // Weight-like values: normal, with a few outliers.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let values: Vec<f32> = (0..QK_K * 16)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                let v = ((u - 0.5) * 0.1) as f32;
                if i % 97 == 0 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect();
        let q6 = quantize_q6_k(&values);
        assert_eq!(q6.len(), TensorType::Q6_K.byte_len(values.len()).unwrap());
        let q4 = quantize_q4_k(&values);
        assert_eq!(q4.len(), TensorType::Q4_K.byte_len(values.len()).unwrap());
        let (e6, e4) = (
            round_trip_error(TensorType::Q6_K, &values, &q6),
            round_trip_error(TensorType::Q4_K, &values, &q4),
        );
        eprintln!("relative RMS error: Q6_K {e6:.4}, Q4_K {e4:.4}");
        assert!(e6 < 0.03, "Q6_K error {e6}");
        assert!(e4 < 0.12, "Q4_K error {e4}");
        assert!(e6 < e4 / 2.0, "Q6_K is finer: {e6} against {e4}");
        let q5 = quantize_q5_0(&values);
        assert_eq!(q5.len(), TensorType::Q5_0.byte_len(values.len()).unwrap());
        let e5 = round_trip_error(TensorType::Q5_0, &values, &q5);
        eprintln!("relative RMS error: Q5_0 {e5:.4}");
        assert!(e5 < 0.08 && e5 < e4, "Q5_0 error {e5} (Q4_K {e4})");
        // Zeros stay zeros.
        let zeros = vec![0f32; QK_K];
        for (kind, bytes) in [
            (TensorType::Q6_K, quantize_q6_k(&zeros)),
            (TensorType::Q4_K, quantize_q4_k(&zeros)),
            (TensorType::Q5_0, quantize_q5_0(&zeros)),
        ] {
            assert!(dequantize(kind, &bytes, QK_K).iter().all(|v| *v == 0.0));
        }
    }

    #[derive(serde::Deserialize)]
    struct Fixtures {
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        #[serde(rename = "type")]
        kind: String,
        id: u32,
        elements: usize,
        blocks_hex: String,
        values_f32_le_hex: String,
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[derive(serde::Deserialize)]
    struct QuantFixtures {
        cases: Vec<QuantCase>,
    }

    #[derive(serde::Deserialize)]
    struct QuantCase {
        #[serde(rename = "type")]
        kind: String,
        values_f32_le_hex: String,
        blocks_hex: String,
    }

    #[test]
    fn quantization_matches_the_gguf_reference_byte_for_byte() {
        let fixtures: QuantFixtures =
            serde_json::from_str(include_str!("../tests/fixtures/gguf_quant.json")).unwrap();
        assert_eq!(fixtures.cases.len(), 1);
        for case in fixtures.cases {
            let values: Vec<f32> = unhex(&case.values_f32_le_hex)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let quantize = match case.kind.as_str() {
                "Q5_0" => quantize_q5_0,
                other => panic!("no quantizer for {other}"),
            };
            assert_eq!(quantize(&values), unhex(&case.blocks_hex), "{}", case.kind);
        }
    }

    #[test]
    fn dequantization_matches_the_gguf_reference_bit_for_bit() {
        let fixtures: Fixtures =
            serde_json::from_str(include_str!("../tests/fixtures/gguf_dequant.json")).unwrap();
        assert_eq!(fixtures.cases.len(), 12);
        for case in fixtures.cases {
            let kind = TensorType::from_id(case.id).expect("a handled type");
            assert_eq!(kind.name(), case.kind);
            let data = unhex(&case.blocks_hex);
            let expected: Vec<u32> = unhex(&case.values_f32_le_hex)
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(expected.len(), case.elements);
            let got: Vec<u32> = dequantize(kind, &data, case.elements)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let first_difference = got.iter().zip(&expected).position(|(a, b)| a != b);
            assert_eq!(
                first_difference, None,
                "{kind}: value {first_difference:?} differs"
            );
        }
    }

    #[test]
    fn ids_round_trip_and_block_sizes_are_llama_cpps() {
        for kind in TensorType::ALL {
            assert_eq!(TensorType::from_id(kind.id()), Some(kind));
        }
        assert_eq!(TensorType::from_id(4), None, "Q4_2 was removed from GGML");
        assert_eq!(TensorType::Q4_K.byte_len(512), Some(288));
        assert_eq!(TensorType::Q6_K.byte_len(100), None);
    }
}
