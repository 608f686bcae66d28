//! Delta codecs and the one canonical byte encoding of a [`Delta`].
//!
//! [`encode`] turns a delta into bytes under a [`Codec`]; the blake3 hash of those bytes
//! ([`crate::BlobHash::of`]) is the delta's id. [`decode`] accepts only bytes that [`encode`] could
//! have produced: for every `bytes` that decodes, `encode(decode(bytes))` gives `bytes` back, so two
//! different byte strings never carry the same delta under the same codec. [`peek_layout`] reads
//! names and shapes without decoding values, and [`ErrorFeedback`] carries what a lossy codec
//! dropped over to the next round.
//!
//! This module does no I/O and never panics on input bytes; every length read from the bytes is
//! checked against what is left of them (and against the caller's element limit) before anything
//! is allocated.
//!
//! # Byte layout
//!
//! All integers and floats are little-endian.
//!
//! | Field             | Size      | Meaning                                                        |
//! |-------------------|-----------|----------------------------------------------------------------|
//! | magic             | 4         | `b"TRBD"`                                                      |
//! | version           | u8        | [`FORMAT_VERSION`], `1`                                        |
//! | codec tag         | u8        | `0` f32, `1` f16, `2` int8, `3` int4, `4` top-k               |
//! | codec parameter   | u32       | block size (int8, int4); `fraction.to_bits()` (top-k); `0` (f32, f16) |
//! | tensor count      | u32       |                                                                |
//! | *per tensor, in strictly increasing byte order of names:* | |                                 |
//! | name length       | u16       | `1..=512`                                                      |
//! | name              | length    | UTF-8                                                          |
//! | rank              | u8        | `0..=8` (rank 0 is a scalar: one element)                      |
//! | dims              | 8 × rank  | each a u64; `len` below is their product                       |
//! | payload           | see below | the tensor's values under the codec                           |
//!
//! Payloads, for a tensor of `len` values:
//!
//! | Codec | Payload                                                                                  |
//! |-------|------------------------------------------------------------------------------------------|
//! | f32   | `len` × f32, the exact bits                                                              |
//! | f16   | `len` × IEEE binary16 (round to nearest even; every NaN is written as `0x7e00`)           |
//! | int8  | per block of `block` values (the last may be shorter): f32 `scale`, then one i8 `q` per value; value = `q × scale` |
//! | int4  | per block: f32 `min`, f32 `scale`, then `ceil(n / 2)` bytes, value `2i` in the low nibble and `2i + 1` in the high nibble of byte `i`; value = `min + q × scale` |
//! | top-k | nothing if `len == 0`; else f32 `scale`, then `k` indices as LEB128 gaps (the first index itself, then `index − previous − 1`), then `k` × i8 `q`; kept value = `q × scale`, all others 0 |
//!
//! Quantization rounds to nearest, ties to even, and clamps: int8 `q = round(v × r)`, int4
//! `q = round((v − min) × r)`, top-k as int8, where `r = 1 / scale` is computed once per block
//! (`v / scale` instead when that reciprocal overflows, for a subnormal scale). Decoding computes
//! `q × scale` and `min + (q × scale)` in f32.
//!
//! Top-k keeps `k = max(1, ceil(fraction × len × (1 − 2⁻²⁴)))` values, computed in f64 and at most
//! `len` (the factor absorbs `fraction`'s f32 rounding, so 0.1 of 10 values is 1); `k` is not
//! stored.
//!
//! # Canonical form
//!
//! Quantized payloads are canonical when re-encoding the decoded values reproduces them exactly.
//! [`decode`] checks this and rejects anything else, among it:
//!
//! - int8 and top-k: `scale` must be `+0.0` (then every `q` is 0) or a positive finite value with
//!   `(127 × scale) / 127 == scale`, some `|q| == 127`, and no `q == -128`;
//! - int4: `min` is never `-0.0`, `scale` is `(max − min) / 15` of the decoded block, some `q` is 0
//!   and some is 15 (when `scale > 0`), and the unused high nibble of an odd-length block is 0;
//! - top-k: indices strictly increase and stay below `len`, LEB128 gaps use the fewest bytes, and a
//!   kept `q == 0` must sit at position `p` with index `p` (re-encoding the zeros it decodes to would
//!   pick the lowest free indices);
//! - f16: NaN only as `0x7e00`.
//!
//! When an int4 block spans only a few ulps of its values, `min + q × scale` collapses neighbouring
//! levels and the first quantization may not survive decode-and-encode; [`encode`] then repeats
//! decode-and-encode on the block until it is a fixed point (one or two rounds in practice), so
//! what it writes always decodes.
//!
//! # Example
//!
//! ```
//! use tributary_shared::codec::{decode, encode_to_vec, Codec};
//! use tributary_shared::{BlobHash, Delta, NamedTensor};
//!
//! let values = vec![0.5, -1.0, 0.25, 0.0];
//! let tensor = NamedTensor::new("lora_A", vec![2, 2], values.clone()).unwrap();
//! let delta = Delta::new(vec![tensor]).unwrap();
//! let codec = Codec::Int8 { block: 64 };
//! let bytes = encode_to_vec(&delta, codec).unwrap();
//! let id = BlobHash::of(&bytes);
//!
//! let decoded = decode(&bytes, delta.element_count()).unwrap();
//! let bound = codec.max_abs_error(&values);
//! for (got, want) in decoded.tensors()[0].values().iter().zip(&values) {
//!     assert!((got - want).abs() <= bound);
//! }
//! // Encoding the decoded delta gives the same bytes, hence the same id.
//! assert_eq!(BlobHash::of(&encode_to_vec(&decoded, codec).unwrap()), id);
//! ```

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use crate::delta::{
    element_count, Delta, DeltaError, Layout, NamedTensor, MAX_ELEMENTS, MAX_NAME_LEN,
};

/// The first four bytes of every encoded delta.
pub const MAGIC: [u8; 4] = *b"TRBD";
/// The format version this module writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Highest tensor rank the encoding carries.
pub const MAX_RANK: usize = 8;
/// Smallest block size of the block-wise codecs.
pub const MIN_BLOCK: u32 = 8;
/// Largest block size of the block-wise codecs.
pub const MAX_BLOCK: u32 = 65536;

/// How a delta's values are compressed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Codec {
    /// Lossless: the exact f32 bits.
    F32,
    /// IEEE half precision, round to nearest even.
    F16,
    /// Block-wise symmetric 8-bit: per block an f32 scale `absmax / 127`.
    Int8 {
        /// Values per block, in `8..=65536`.
        block: u32,
    },
    /// Block-wise asymmetric 4-bit: per block an f32 `min` and scale `(max - min) / 15`, two values
    /// per byte.
    Int4 {
        /// Values per block, even, in `8..=65536`.
        block: u32,
    },
    /// Per tensor, the `ceil(fraction × len)` (at least one; see the module docs for the exact
    /// count) values of largest magnitude, ties to the lower index, as int8 with one scale per
    /// tensor; all other values become 0.
    TopK {
        /// Share of values kept, in `(0, 1]`.
        fraction: f32,
    },
}

impl Default for Codec {
    fn default() -> Self {
        Codec::Int8 { block: 64 }
    }
}

impl Codec {
    /// Checks the parameter: a block in `8..=65536` (even for int4), a finite fraction in `(0, 1]`.
    pub fn validate(&self) -> Result<(), CodecError> {
        let detail = match *self {
            Codec::F32 | Codec::F16 => return Ok(()),
            Codec::Int8 { block } if (MIN_BLOCK..=MAX_BLOCK).contains(&block) => return Ok(()),
            Codec::Int8 { .. } => "block must be in 8..=65536",
            Codec::Int4 { block } if (MIN_BLOCK..=MAX_BLOCK).contains(&block) && block % 2 == 0 => {
                return Ok(())
            }
            Codec::Int4 { .. } => "block must be even and in 8..=65536",
            Codec::TopK { fraction } if fraction > 0.0 && fraction <= 1.0 => return Ok(()),
            Codec::TopK { .. } => "fraction must be in (0, 1]",
        };
        Err(CodecError::InvalidCodec {
            codec: *self,
            detail,
        })
    }

    /// A short lower-case name: `"f32"`, `"f16"`, `"int8"`, `"int4"` or `"topk"`.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::F16 => "f16",
            Codec::Int8 { .. } => "int8",
            Codec::Int4 { .. } => "int4",
            Codec::TopK { .. } => "topk",
        }
    }

    /// An upper bound on `|decoded - original|` for every element of one tensor holding `values`
    /// (blocks start at the tensor's first value).
    ///
    /// - f32: 0.
    /// - f16: `absmax × 2⁻¹¹ + 2⁻²⁵` (relative rounding error, plus half the smallest subnormal);
    ///   infinite when some value is not finite or rounds past the largest half (65504).
    /// - int8: `absmax / 254 × (1 + 10⁻⁴)` plus the smallest normal f32.
    /// - int4: the largest over blocks of `(max - min) / 30 × (1 + 10⁻⁴) + 2⁻²⁰ × max(|min|, |max|)`
    ///   plus the smallest normal f32; the second term covers rounding of `min + q × scale`.
    /// - top-k: the int8 bound, for kept values only. A dropped value decodes to 0, so its error is
    ///   its own magnitude, which is at most the k-th largest magnitude of the tensor.
    ///
    /// The quantized codecs give infinity when some value is not finite ([`encode`] rejects those).
    pub fn max_abs_error(&self, values: &[f32]) -> f32 {
        match *self {
            Codec::F32 => 0.0,
            Codec::F16 => {
                let absmax_bits = abs_max_bits(values);
                let absmax = f32::from_bits(absmax_bits);
                if absmax_bits >= INFINITY_BITS || absmax >= F16_OVERFLOW {
                    f32::INFINITY
                } else {
                    absmax * F16_RELATIVE_ERROR + F16_ABSOLUTE_ERROR
                }
            }
            Codec::Int8 { .. } | Codec::TopK { .. } => {
                let absmax_bits = abs_max_bits(values);
                if absmax_bits >= INFINITY_BITS {
                    f32::INFINITY
                } else {
                    f32::from_bits(absmax_bits) / 254.0 * (1.0 + BOUND_SLACK) + f32::MIN_POSITIVE
                }
            }
            Codec::Int4 { block } => values
                .chunks(block.max(2) as usize)
                .map(int4_block_bound)
                .fold(0.0, f32::max),
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Codec::F32 => TAG_F32,
            Codec::F16 => TAG_F16,
            Codec::Int8 { .. } => TAG_INT8,
            Codec::Int4 { .. } => TAG_INT4,
            Codec::TopK { .. } => TAG_TOPK,
        }
    }

    fn parameter(&self) -> u32 {
        match *self {
            Codec::F32 | Codec::F16 => 0,
            Codec::Int8 { block } | Codec::Int4 { block } => block,
            Codec::TopK { fraction } => fraction.to_bits(),
        }
    }

    /// The codec a header names, rejecting unknown tags and parameters that are not canonical.
    fn from_header(tag: u8, parameter: u32, offset: usize) -> Result<Self, CodecError> {
        let codec = match tag {
            TAG_F32 => Codec::F32,
            TAG_F16 => Codec::F16,
            TAG_INT8 => Codec::Int8 { block: parameter },
            TAG_INT4 => Codec::Int4 { block: parameter },
            TAG_TOPK => Codec::TopK {
                fraction: f32::from_bits(parameter),
            },
            _ => return Err(CodecError::UnknownCodec { tag, offset }),
        };
        if codec.parameter() != parameter || codec.validate().is_err() {
            return Err(CodecError::InvalidParameter {
                codec: codec.name(),
                parameter,
                offset: offset + 1,
            });
        }
        Ok(codec)
    }
}

/// Appends the canonical encoding of `delta` under `codec` to `out`.
///
/// On error `out` is left as it was. Errors: an invalid codec, a tensor of rank above
/// [`MAX_RANK`], and for the quantized codecs a non-finite value or a block whose range overflows
/// f32.
pub fn encode(delta: &Delta, codec: Codec, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    let result = encode_into(delta, codec, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// [`encode`] into a new vector.
pub fn encode_to_vec(delta: &Delta, codec: Codec) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode(delta, codec, &mut out)?;
    Ok(out)
}

/// Decodes canonical bytes. Never panics on any input.
///
/// `max_elements` bounds the total elements the decoded delta may have (a tiny top-k payload can
/// describe a huge tensor, so pass the expected layout's element count); exceeding it is an error
/// before anything is allocated. Values decoded from f32 and f16 payloads may be NaN or infinite;
/// run [`Delta::check_finite`] where that matters.
pub fn decode(bytes: &[u8], max_elements: usize) -> Result<Delta, CodecError> {
    let mut reader = Reader::new(bytes);
    let (codec, count) = read_header(&mut reader)?;
    let limit = max_elements.min(MAX_ELEMENTS);
    let mut total = 0usize;
    let mut scratch = Scratch::default();
    let mut tensors: Vec<NamedTensor> = Vec::with_capacity(count.min(PREALLOCATED_TENSORS));
    for _ in 0..count {
        let head = read_tensor_head(&mut reader, tensors.last().map(NamedTensor::name))?;
        total = total.saturating_add(head.len);
        if total > limit {
            return Err(CodecError::TooManyElements {
                elements: total,
                max: limit,
            });
        }
        let values = decode_payload(&mut reader, codec, &head, &mut scratch)?;
        tensors.push(NamedTensor::new(head.name, head.shape, values)?);
    }
    reader.finish()?;
    Ok(Delta::new(tensors)?)
}

/// Reads only the header: the codec and the layout (names and shapes), skipping the values
/// without decoding or checking them.
pub fn peek_layout(bytes: &[u8]) -> Result<(Codec, Layout), CodecError> {
    let mut reader = Reader::new(bytes);
    let (codec, count) = read_header(&mut reader)?;
    let mut total = 0usize;
    let mut tensors: Vec<(String, Vec<usize>)> =
        Vec::with_capacity(count.min(PREALLOCATED_TENSORS));
    for _ in 0..count {
        let previous = tensors.last().map(|(name, _)| name.as_str());
        let head = read_tensor_head(&mut reader, previous)?;
        total = total.saturating_add(head.len);
        if total > MAX_ELEMENTS {
            return Err(CodecError::TooManyElements {
                elements: total,
                max: MAX_ELEMENTS,
            });
        }
        skip_payload(&mut reader, codec, &head)?;
        tensors.push((head.name, head.shape));
    }
    reader.finish()?;
    Ok((codec, Layout { tensors }))
}

/// Error feedback (EF-SGD style): keeps what compression dropped and adds it to the next delta.
#[derive(Clone, Debug, Default)]
pub struct ErrorFeedback {
    residual: Option<Delta>,
}

impl ErrorFeedback {
    /// No residual yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compresses `delta` plus the residual and keeps the new residual.
    ///
    /// `corrected = delta + residual` (the residual is dropped if its layout differs from
    /// `delta`'s); the returned bytes are `encode(corrected)`; the residual becomes
    /// `corrected - decode(bytes)`. On error the residual is left unchanged.
    pub fn compress(&mut self, delta: &Delta, codec: Codec) -> Result<Vec<u8>, CodecError> {
        let mut corrected = delta.clone();
        if let Some(residual) = &self.residual {
            // A layout mismatch leaves `corrected` untouched; the stale residual is dropped below.
            let _ = corrected.add_scaled(residual, 1.0);
        }
        let bytes = encode_to_vec(&corrected, codec)?;
        let decoded = decode(&bytes, corrected.element_count())?;
        corrected.add_scaled(&decoded, -1.0)?;
        self.residual = Some(corrected);
        Ok(bytes)
    }

    /// What compression has dropped so far and not yet sent, if anything was compressed.
    pub fn residual(&self) -> Option<&Delta> {
        self.residual.as_ref()
    }

    /// Forgets the residual, e.g. when the adapter is replaced.
    pub fn reset(&mut self) {
        self.residual = None;
    }
}

/// Bytes that are not a canonical encoded delta, or a delta the codec cannot encode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The codec's parameter is out of range.
    #[error("invalid codec {codec:?}: {detail}")]
    InvalidCodec {
        /// The codec as given.
        codec: Codec,
        /// What is wrong with it.
        detail: &'static str,
    },
    /// The bytes end too early.
    #[error("input ends early at offset {offset}: {needed} bytes needed, {remaining} left")]
    Truncated {
        /// Where the missing field starts.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left from `offset`.
        remaining: usize,
    },
    /// The bytes do not start with [`MAGIC`].
    #[error("bad magic {found:02x?}, expected \"TRBD\"")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A format version other than [`FORMAT_VERSION`].
    #[error("unsupported format version {version}, expected {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The version byte.
        version: u8,
    },
    /// A codec tag this version does not know.
    #[error("unknown codec tag {tag} at offset {offset}")]
    UnknownCodec {
        /// The tag byte.
        tag: u8,
        /// Its offset.
        offset: usize,
    },
    /// A codec parameter that is invalid or not canonical.
    #[error("invalid {codec} parameter {parameter:#010x} at offset {offset}")]
    InvalidParameter {
        /// The codec's name.
        codec: &'static str,
        /// The parameter as read.
        parameter: u32,
        /// Its offset.
        offset: usize,
    },
    /// More tensors than the count field holds.
    #[error("{count} tensors, more than the format can count")]
    TooManyTensors {
        /// Number of tensors.
        count: usize,
    },
    /// A tensor name that is empty, too long or not UTF-8.
    #[error("bad tensor name at offset {offset}: {detail}")]
    BadName {
        /// Offset of the name's length field.
        offset: usize,
        /// What is wrong with it.
        detail: &'static str,
    },
    /// Tensor names not in strictly increasing order (unsorted or duplicate).
    #[error("tensor {name:?} at offset {offset} does not sort after {previous:?}")]
    Unsorted {
        /// Offset of the tensor.
        offset: usize,
        /// Its name.
        name: String,
        /// The name before it.
        previous: String,
    },
    /// A tensor of rank above [`MAX_RANK`].
    #[error("tensor {name:?} has rank {rank}, more than {MAX_RANK}")]
    RankTooLarge {
        /// Tensor name.
        name: String,
        /// Its rank.
        rank: usize,
    },
    /// Dimensions whose product overflows.
    #[error("tensor {name:?} has an impossible shape {shape:?}")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// The dimensions as read.
        shape: Vec<u64>,
    },
    /// More elements in total than allowed.
    #[error("delta has at least {elements} elements, more than the {max} allowed")]
    TooManyElements {
        /// Elements counted so far.
        elements: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes left over after the last tensor.
    #[error("{count} trailing bytes at offset {offset}")]
    TrailingBytes {
        /// Where they start.
        offset: usize,
        /// How many.
        count: usize,
    },
    /// A NaN or infinite value, which the quantized codecs cannot carry.
    #[error(
        "tensor {name:?} has a non-finite value at index {index}, which {codec} cannot encode"
    )]
    NonFinite {
        /// Tensor name.
        name: String,
        /// Flat index of the first bad value.
        index: usize,
        /// The codec's name.
        codec: &'static str,
    },
    /// A block whose values are too large for the codec's f32 scale.
    #[error("tensor {name:?} block {block} is out of range for {codec}")]
    OutOfRange {
        /// Tensor name.
        name: String,
        /// Block index within the tensor (0 for top-k).
        block: usize,
        /// The codec's name.
        codec: &'static str,
    },
    /// A block for which no canonical int4 encoding was found; not expected to happen.
    #[error("no canonical int4 encoding found for block {block} of tensor {name:?}")]
    NoCanonicalForm {
        /// Tensor name.
        name: String,
        /// Block index within the tensor.
        block: usize,
    },
    /// A payload that decodes but is not the one [`encode`] would write.
    #[error("non-canonical {codec} payload for tensor {name:?} at offset {offset}: {detail}")]
    NonCanonical {
        /// Where the offending block or field starts.
        offset: usize,
        /// Tensor name.
        name: String,
        /// The codec's name.
        codec: &'static str,
        /// What is wrong.
        detail: &'static str,
    },
    /// A top-k index past the end of its tensor.
    #[error(
        "tensor {name:?} top-k index {index} at offset {offset} is out of range for {len} values"
    )]
    IndexOutOfRange {
        /// Where the index starts.
        offset: usize,
        /// Tensor name.
        name: String,
        /// The index.
        index: u64,
        /// The tensor's length.
        len: usize,
    },
    /// The decoded tensors do not form a valid delta.
    #[error(transparent)]
    Delta(#[from] DeltaError),
}

const TAG_F32: u8 = 0;
const TAG_F16: u8 = 1;
const TAG_INT8: u8 = 2;
const TAG_INT4: u8 = 3;
const TAG_TOPK: u8 = 4;

/// Magic, version, tag, parameter and count.
const HEADER_LEN: usize = 14;
/// Bits of `f32::INFINITY`; any absolute value's bits at or above this are not finite.
const INFINITY_BITS: u32 = 0x7F80_0000;
/// The f16 NaN every NaN is written as.
const F16_CANONICAL_NAN: u16 = 0x7E00;
/// Values at or above this magnitude round to infinity in f16.
const F16_OVERFLOW: f32 = 65520.0;
const F16_RELATIVE_ERROR: f32 = 1.0 / 2048.0;
const F16_ABSOLUTE_ERROR: f32 = 1.0 / 33_554_432.0;
/// Relative slack in the quantized bounds for f32 rounding of scales and products.
const BOUND_SLACK: f32 = 1e-4;
/// Values converted per step of the f16 loops.
const F16_CHUNK: usize = 256;
/// Adding `1.5 × 2²³` rounds a float in `[-2²², 2²²]` to an integer (ties to even) held in the low
/// mantissa bits.
const ROUND_SIGNED: f32 = 12_582_912.0;
const ROUND_SIGNED_BITS: u32 = 0x4B40_0000;
/// Adding `2²³` does the same for a float in `[0, 2²³]`.
const ROUND_UNSIGNED: f32 = 8_388_608.0;
const ROUND_UNSIGNED_BITS: u32 = 0x4B00_0000;
/// `1 − 2⁻²⁴`: see [`topk_count`].
const TOPK_SLACK: f64 = 1.0 - 1.0 / 16_777_216.0;
/// Most tensor slots reserved up front when decoding; more grow as tensors actually arrive.
const PREALLOCATED_TENSORS: usize = 1024;
/// Rounds of re-encoding tried when an int4 block is not a fixed point at once.
const MAX_CANONICAL_ROUNDS: usize = 32;

/// Buffers reused across blocks and tensors of one call.
#[derive(Default)]
struct Scratch {
    floats: Vec<f32>,
    bytes: Vec<u8>,
    above: Vec<u32>,
    cut: Vec<u32>,
    magnitudes: Vec<u32>,
    indices: Vec<u32>,
    quantized: Vec<i8>,
}

/// Why a block could not be quantized.
enum BlockProblem {
    NonFinite,
    OutOfRange,
    NoCanonicalForm,
}

fn encode_into(delta: &Delta, codec: Codec, out: &mut Vec<u8>) -> Result<(), CodecError> {
    codec.validate()?;
    let count = delta.tensors().len();
    let count_field = u32::try_from(count).map_err(|_| CodecError::TooManyTensors { count })?;
    out.reserve(encoded_len_hint(delta, codec));
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(codec.tag());
    out.extend_from_slice(&codec.parameter().to_le_bytes());
    out.extend_from_slice(&count_field.to_le_bytes());
    let mut scratch = Scratch::default();
    for tensor in delta.tensors() {
        let name = tensor.name();
        let rank = tensor.shape().len();
        if rank > MAX_RANK {
            return Err(CodecError::RankTooLarge {
                name: name.to_owned(),
                rank,
            });
        }
        let name_len =
            u16::try_from(name.len()).expect("NamedTensor names are at most MAX_NAME_LEN bytes");
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(rank as u8);
        for &dim in tensor.shape() {
            out.extend_from_slice(&(dim as u64).to_le_bytes());
        }
        match codec {
            Codec::F32 => encode_f32(tensor.values(), out),
            Codec::F16 => encode_f16(tensor.values(), out),
            Codec::Int8 { block } => encode_int8(tensor, block as usize, out)?,
            Codec::Int4 { block } => encode_int4(tensor, block as usize, out, &mut scratch)?,
            Codec::TopK { fraction } => encode_topk(tensor, fraction, out, &mut scratch)?,
        }
    }
    Ok(())
}

/// Bytes the encoding takes (exact except for top-k, where it assumes two-byte indices).
fn encoded_len_hint(delta: &Delta, codec: Codec) -> usize {
    delta
        .tensors()
        .iter()
        .map(|tensor| {
            let len = tensor.values().len();
            let payload = payload_len(codec, len)
                .unwrap_or_else(|| 4 + 3 * topk_count(codec_fraction(codec), len));
            2 + tensor.name().len() + 1 + 8 * tensor.shape().len() + payload
        })
        .fold(HEADER_LEN, usize::saturating_add)
}

fn codec_fraction(codec: Codec) -> f32 {
    match codec {
        Codec::TopK { fraction } => fraction,
        _ => 1.0,
    }
}

/// Payload bytes of a tensor of `len` values, for the codecs whose payload size is fixed; `None`
/// for top-k or on overflow.
fn payload_len(codec: Codec, len: usize) -> Option<usize> {
    match codec {
        Codec::F32 => len.checked_mul(4),
        Codec::F16 => len.checked_mul(2),
        Codec::Int8 { block } => {
            let blocks = len.div_ceil(block.max(1) as usize);
            len.checked_add(blocks.checked_mul(4)?)
        }
        Codec::Int4 { block } => {
            let blocks = len.div_ceil(block.max(1) as usize);
            len.div_ceil(2).checked_add(blocks.checked_mul(8)?)
        }
        Codec::TopK { .. } => None,
    }
}

/// Values kept by top-k in a tensor of `len` values: `ceil(fraction × len × (1 − 2⁻²⁴))` in f64,
/// at least 1 and at most `len`. The factor absorbs the error of `fraction` as an f32, so a decimal
/// fraction keeps what one expects (0.1 of 10 values is 1, not 2).
fn topk_count(fraction: f32, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let kept = (f64::from(fraction) * len as f64 * TOPK_SLACK).ceil();
    (kept as usize).clamp(1, len)
}

/// Grows `out` by `len` zero bytes and returns them.
fn grow(out: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let start = out.len();
    out.resize(start + len, 0);
    &mut out[start..]
}

fn encode_f32(values: &[f32], out: &mut Vec<u8>) {
    let payload = grow(out, values.len() * 4);
    for (dst, value) in payload.chunks_exact_mut(4).zip(values) {
        dst.copy_from_slice(&value.to_le_bytes());
    }
}

fn encode_f16(values: &[f32], out: &mut Vec<u8>) {
    let payload = grow(out, values.len() * 2);
    let mut halves = [f16::ZERO; F16_CHUNK];
    for (src, dst) in values
        .chunks(F16_CHUNK)
        .zip(payload.chunks_mut(2 * F16_CHUNK))
    {
        let halves = &mut halves[..src.len()];
        halves.convert_from_f32_slice(src);
        for (half, bytes) in halves.iter().zip(dst.chunks_exact_mut(2)) {
            let bits = half.to_bits();
            let bits = if bits & 0x7FFF > 0x7C00 {
                F16_CANONICAL_NAN
            } else {
                bits
            };
            bytes.copy_from_slice(&bits.to_le_bytes());
        }
    }
}

fn encode_int8(tensor: &NamedTensor, block: usize, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let values = tensor.values();
    let payload = grow(out, values.len() + 4 * values.len().div_ceil(block));
    for (block_index, (chunk, src)) in payload
        .chunks_mut(4 + block)
        .zip(values.chunks(block))
        .enumerate()
    {
        let absmax_bits = abs_max_bits(src);
        if absmax_bits >= INFINITY_BITS {
            return Err(non_finite(tensor, block_index * block, "int8"));
        }
        let scale =
            int8_scale(f32::from_bits(absmax_bits)).ok_or_else(|| CodecError::OutOfRange {
                name: tensor.name().to_owned(),
                block: block_index,
                codec: "int8",
            })?;
        let (head, quantized) = chunk.split_at_mut(4);
        head.copy_from_slice(&scale.to_le_bytes());
        quantize_int8(src, scale, quantized);
    }
    Ok(())
}

fn encode_int4(
    tensor: &NamedTensor,
    block: usize,
    out: &mut Vec<u8>,
    scratch: &mut Scratch,
) -> Result<(), CodecError> {
    let values = tensor.values();
    let payload = grow(
        out,
        values.len().div_ceil(2) + 8 * values.len().div_ceil(block),
    );
    for (block_index, (chunk, src)) in payload
        .chunks_mut(8 + block / 2)
        .zip(values.chunks(block))
        .enumerate()
    {
        let (head, packed) = chunk.split_at_mut(8);
        let (min, scale) = encode_int4_block(src, packed, scratch).map_err(|problem| {
            let name = tensor.name().to_owned();
            match problem {
                BlockProblem::NonFinite => non_finite(tensor, block_index * block, "int4"),
                BlockProblem::OutOfRange => CodecError::OutOfRange {
                    name,
                    block: block_index,
                    codec: "int4",
                },
                BlockProblem::NoCanonicalForm => CodecError::NoCanonicalForm {
                    name,
                    block: block_index,
                },
            }
        })?;
        head[..4].copy_from_slice(&min.to_le_bytes());
        head[4..].copy_from_slice(&scale.to_le_bytes());
    }
    Ok(())
}

fn encode_topk(
    tensor: &NamedTensor,
    fraction: f32,
    out: &mut Vec<u8>,
    scratch: &mut Scratch,
) -> Result<(), CodecError> {
    let values = tensor.values();
    if values.is_empty() {
        return Ok(());
    }
    let k = topk_count(fraction, values.len());
    let absmax_bits =
        select_top(values, k, scratch).map_err(|index| non_finite(tensor, index, "topk"))?;
    let scale = int8_scale(f32::from_bits(absmax_bits)).ok_or_else(|| CodecError::OutOfRange {
        name: tensor.name().to_owned(),
        block: 0,
        codec: "topk",
    })?;
    let Scratch {
        indices, quantized, ..
    } = scratch;
    quantized.clear();
    let kept = indices.iter().map(|&index| values[index as usize]);
    let inverse = 1.0 / scale;
    if scale == 0.0 {
        quantized.resize(k, 0);
    } else if inverse.is_finite() {
        quantized.extend(kept.map(|value| round_int8(value * inverse)));
    } else {
        quantized.extend(kept.map(|value| round_int8(value / scale)));
    }
    if quantized.contains(&0) {
        move_zeros_to_lowest_free(indices, quantized, k);
    }

    out.reserve(4 + 6 * k);
    out.extend_from_slice(&scale.to_le_bytes());
    let mut next = 0u32;
    for &index in indices.iter() {
        push_varint(out, index - next);
        next = index + 1;
    }
    out.extend(quantized.iter().map(|&q| q as u8));
    Ok(())
}

/// Rewrites a top-k selection in which some kept values quantized to 0 into the one that
/// re-encoding its decoded values would choose: the non-zero entries, then zeros at the lowest
/// indices not already taken.
fn move_zeros_to_lowest_free(indices: &mut Vec<u32>, quantized: &mut Vec<i8>, k: usize) {
    let nonzero: Vec<(u32, i8)> = indices
        .iter()
        .zip(quantized.iter())
        .filter(|(_, &q)| q != 0)
        .map(|(&index, &q)| (index, q))
        .collect();
    indices.clear();
    quantized.clear();
    let mut zeros_left = k - nonzero.len();
    let mut nonzero_iter = nonzero.iter().peekable();
    let mut candidate = 0u32;
    while zeros_left > 0 {
        match nonzero_iter.peek() {
            Some(&&(index, q)) if index == candidate => {
                indices.push(index);
                quantized.push(q);
                nonzero_iter.next();
            }
            _ => {
                indices.push(candidate);
                quantized.push(0);
                zeros_left -= 1;
            }
        }
        candidate += 1;
    }
    for &(index, q) in nonzero_iter {
        indices.push(index);
        quantized.push(q);
    }
}

/// Writes the indices of the `k` values of largest magnitude (ties to the lower index) into
/// `scratch.indices`, in increasing order, and returns the largest magnitude's bits. Err holds the
/// index of a non-finite value.
///
/// A histogram over the high bits of the magnitudes finds the bucket the cut falls in; one more
/// pass collects, without branching, the indices above that bucket (all kept) and those in it;
/// only the latter need a selection.
fn select_top(values: &[f32], k: usize, scratch: &mut Scratch) -> Result<u32, usize> {
    // Exponent and two mantissa bits: a bucket spans a quarter of an octave.
    const BUCKETS: usize = 1024;
    // Interleaved histograms, so runs of values in one bucket do not wait on each other's
    // increments.
    const WAYS: usize = 4;
    let bucket_of = |value: f32| ((value.to_bits() & 0x7FFF_FFFF) >> 21) as usize & (BUCKETS - 1);
    let mut histograms = [[0u32; BUCKETS]; WAYS];
    let mut absmax = [0u32; WAYS];
    let chunks = values.chunks_exact(WAYS);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((histogram, absmax), &value) in histograms.iter_mut().zip(&mut absmax).zip(chunk) {
            *absmax = (*absmax).max(value.to_bits() & 0x7FFF_FFFF);
            histogram[bucket_of(value)] += 1;
        }
    }
    for &value in rest {
        absmax[0] = absmax[0].max(value.to_bits() & 0x7FFF_FFFF);
        histograms[0][bucket_of(value)] += 1;
    }
    let absmax_bits = absmax.into_iter().fold(0, u32::max);
    if absmax_bits >= INFINITY_BITS {
        let index = values.iter().position(|value| !value.is_finite());
        return Err(index.expect("a non-finite magnitude came from some value"));
    }
    let mut n_above = 0usize;
    let mut cut_bucket = 0usize;
    let mut n_cut = 0usize;
    for bucket in (0..BUCKETS).rev() {
        let count: usize = histograms.iter().map(|h| h[bucket] as usize).sum();
        if n_above + count >= k {
            cut_bucket = bucket;
            n_cut = count;
            break;
        }
        n_above += count;
    }

    let Scratch {
        indices,
        above,
        cut,
        magnitudes,
        ..
    } = scratch;
    // Every index is written; only the right ones advance their cursor. The spare slot at the
    // end of each list takes the writes after its last entry.
    above.clear();
    above.resize(n_above + 1, 0);
    cut.clear();
    cut.resize(n_cut + 1, 0);
    let mut above_count = 0usize;
    let mut cut_count = 0usize;
    for (index, &value) in values.iter().enumerate() {
        let bucket = bucket_of(value);
        above[above_count] = index as u32;
        above_count += usize::from(bucket > cut_bucket);
        cut[cut_count] = index as u32;
        cut_count += usize::from(bucket == cut_bucket);
    }
    above.truncate(n_above);
    cut.truncate(n_cut);

    // Keep the `needed` largest of the cut bucket: those above the threshold magnitude, then
    // those at it in index order.
    let needed = k - n_above;
    let magnitude_at = |index: u32| values[index as usize].to_bits() & 0x7FFF_FFFF;
    if needed < n_cut {
        magnitudes.clear();
        magnitudes.extend(cut.iter().map(|&index| magnitude_at(index)));
        let (_, &mut threshold, _) = magnitudes.select_nth_unstable_by(needed - 1, |a, b| b.cmp(a));
        let mut ties = needed - magnitudes.iter().filter(|&&m| m > threshold).count();
        cut.retain(|&index| {
            let magnitude = magnitude_at(index);
            let tie = magnitude == threshold && ties > 0;
            ties -= usize::from(tie);
            magnitude > threshold || tie
        });
    }

    // Merge the two increasing lists.
    indices.clear();
    indices.reserve(k);
    let (mut from_above, mut from_cut) = (above.iter().peekable(), cut.iter().peekable());
    loop {
        let next = match (from_above.peek(), from_cut.peek()) {
            (Some(&&a), Some(&&c)) if a < c => from_above.next(),
            (Some(_), Some(_)) | (None, Some(_)) => from_cut.next(),
            (Some(_), None) => from_above.next(),
            (None, None) => break,
        };
        indices.extend(next);
    }
    debug_assert_eq!(indices.len(), k);
    Ok(absmax_bits)
}

fn push_varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn non_finite(tensor: &NamedTensor, from: usize, codec: &'static str) -> CodecError {
    let values = tensor.values();
    let index = values[from..]
        .iter()
        .position(|value| !value.is_finite())
        .map_or(from, |offset| from + offset);
    CodecError::NonFinite {
        name: tensor.name().to_owned(),
        index,
        codec,
    }
}

/// The largest `|value|`'s bits; at or above [`INFINITY_BITS`] when some value is not finite.
fn abs_max_bits(values: &[f32]) -> u32 {
    values
        .iter()
        .fold(0u32, |max, value| max.max(value.to_bits() & 0x7FFF_FFFF))
}

/// The int8 scale for a block whose largest magnitude is `absmax`, or `None` when decoding it
/// would overflow. For every finite `absmax` this module has checked (all of them) the result is a
/// fixed point: `int8_scale(127 × scale) == scale`.
fn int8_scale(absmax: f32) -> Option<f32> {
    let scale = absmax / 127.0;
    (127.0 * scale).is_finite().then_some(scale)
}

/// Whether `scale` with largest `|q|` of `max_q` is what encoding the decoded values gives.
fn int8_scale_is_canonical(scale: f32, max_q: u8) -> bool {
    if scale.to_bits() == 0 {
        max_q == 0
    } else {
        scale > 0.0 && max_q == 127 && int8_scale(127.0 * scale) == Some(scale)
    }
}

/// Rounds to the nearest integer in `-127..=127`, ties to even. `x` must not be NaN.
#[inline(always)]
fn round_int8(x: f32) -> i8 {
    let clamped = x.clamp(-127.0, 127.0);
    (clamped + ROUND_SIGNED)
        .to_bits()
        .wrapping_sub(ROUND_SIGNED_BITS) as i8
}

/// Rounds to the nearest integer in `0..=15`, ties to even. `x` must not be NaN.
#[inline(always)]
fn round_int4(x: f32) -> u8 {
    let clamped = x.clamp(0.0, 15.0);
    (clamped + ROUND_UNSIGNED)
        .to_bits()
        .wrapping_sub(ROUND_UNSIGNED_BITS) as u8
}

fn quantize_int8(src: &[f32], scale: f32, dst: &mut [u8]) {
    if scale == 0.0 {
        dst.fill(0);
        return;
    }
    let inverse = 1.0 / scale;
    if inverse.is_finite() {
        for (q, &value) in dst.iter_mut().zip(src) {
            *q = round_int8(value * inverse) as u8;
        }
    } else {
        // A subnormal scale: its reciprocal overflows, so divide.
        for (q, &value) in dst.iter_mut().zip(src) {
            *q = round_int8(value / scale) as u8;
        }
    }
}

/// The lowest and highest value, and whether all are finite.
fn min_max(values: &[f32]) -> (f32, f32, bool) {
    const LANES: usize = 8;
    let mut low = [f32::INFINITY; LANES];
    let mut high = [f32::NEG_INFINITY; LANES];
    // Stays 0 unless some value is NaN or infinite (infinity × 0 is NaN).
    let mut poison = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (((low, high), poison), &value) in low
            .iter_mut()
            .zip(high.iter_mut())
            .zip(poison.iter_mut())
            .zip(chunk)
        {
            *low = if value < *low { value } else { *low };
            *high = if value > *high { value } else { *high };
            *poison += value * 0.0;
        }
    }
    for &value in rest {
        low[0] = if value < low[0] { value } else { low[0] };
        high[0] = if value > high[0] { value } else { high[0] };
        poison[0] += value * 0.0;
    }
    let low = low
        .iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
    let high = high
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let finite = poison.iter().all(|&p| p == 0.0);
    (low, high, finite)
}

fn int4_scale(range: f32) -> f32 {
    if range > 0.0 {
        range / 15.0
    } else {
        0.0
    }
}

/// Quantizes one int4 block into `packed` (`ceil(n / 2)` bytes) and returns `(min, scale)`.
fn int4_quantize(src: &[f32], packed: &mut [u8]) -> Result<(f32, f32), BlockProblem> {
    let (low, high, finite) = min_max(src);
    if !finite {
        return Err(BlockProblem::NonFinite);
    }
    if src.is_empty() {
        return Ok((0.0, 0.0));
    }
    // Adding +0.0 turns a -0.0 minimum into +0.0, so `min + 0 × scale` gives `min` back.
    let min = low + 0.0;
    let range = high - min;
    if !range.is_finite() {
        return Err(BlockProblem::OutOfRange);
    }
    let scale = int4_scale(range);
    if scale == 0.0 {
        packed.fill(0);
        return Ok((min, 0.0));
    }
    let inverse = 1.0 / scale;
    if inverse.is_finite() {
        pack_int4(src, packed, |value| (value - min) * inverse);
    } else {
        pack_int4(src, packed, |value| (value - min) / scale);
    }
    Ok((min, scale))
}

#[inline(always)]
fn pack_int4(src: &[f32], packed: &mut [u8], scaled: impl Fn(f32) -> f32) {
    let pairs = src.chunks_exact(2);
    let tail = pairs.remainder();
    for (byte, pair) in packed.iter_mut().zip(pairs) {
        *byte = round_int4(scaled(pair[0])) | (round_int4(scaled(pair[1])) << 4);
    }
    if let [last] = tail {
        if let Some(byte) = packed.last_mut() {
            *byte = round_int4(scaled(*last));
        }
    }
}

fn int4_dequantize(min: f32, scale: f32, packed: &[u8], dst: &mut [f32]) {
    let mut pairs = dst.chunks_exact_mut(2);
    for (pair, &byte) in (&mut pairs).zip(packed) {
        pair[0] = min + f32::from(byte & 0x0F) * scale;
        pair[1] = min + f32::from(byte >> 4) * scale;
    }
    if let [last] = pairs.into_remainder() {
        if let Some(&byte) = packed.last() {
            *last = min + f32::from(byte & 0x0F) * scale;
        }
    }
}

/// A cheap sufficient condition for an int4 block to be canonical (`true` means re-encoding the
/// decoded block reproduces it; `false` means "check the slow way").
///
/// With `top = min + 15 × scale`: decoding is monotone in `q`, so when some `q` is 0 and some is 15
/// the decoded block's minimum is `min` and its maximum is `top`, and the scale re-encoding derives
/// is `int4_scale(top - min)`, required to equal `scale`. Each decoded value is then
/// `min + q × scale` within `1.5 ulp(M) + 15 × scale × 2⁻²⁴`, `M = max(|min|, |top|)`, so when
/// `scale ≥ 8 ulp(M)` re-quantizing it lands within 0.19 of `q` and rounds back to `q`.
fn int4_fast_canonical(min: f32, scale: f32, packed: &[u8], n: usize) -> bool {
    if min.to_bits() == 0x8000_0000 || !min.is_finite() || !scale.is_normal() || scale < 0.0 {
        return false;
    }
    let top = min + 15.0 * scale;
    if !top.is_finite() || int4_scale(top - min) != scale {
        return false;
    }
    let magnitude = min.abs().max(top.abs());
    let ulp = f32::from_bits(magnitude.to_bits() & INFINITY_BITS) * (1.0 / 8_388_608.0);
    if scale < 8.0 * ulp {
        return false;
    }
    let (full, tail) = packed.split_at(n / 2);
    let mut lowest = 15u8;
    let mut highest = 0u8;
    for &byte in full {
        lowest = lowest.min(byte & 0x0F).min(byte >> 4);
        highest = highest.max(byte & 0x0F).max(byte >> 4);
    }
    for &byte in tail {
        if byte >> 4 != 0 {
            return false;
        }
        lowest = lowest.min(byte);
        highest = highest.max(byte);
    }
    lowest == 0 && highest == 15
}

/// Whether re-encoding `decoded` (the block `min`, `scale`, `packed` decodes to) reproduces it.
fn int4_literal_canonical(
    min: f32,
    scale: f32,
    packed: &[u8],
    decoded: &[f32],
    bytes: &mut Vec<u8>,
) -> bool {
    bytes.clear();
    bytes.resize(packed.len(), 0);
    match int4_quantize(decoded, bytes) {
        Ok((min_again, scale_again)) => {
            min_again.to_bits() == min.to_bits()
                && scale_again.to_bits() == scale.to_bits()
                && bytes.as_slice() == packed
        }
        Err(_) => false,
    }
}

/// Quantizes one int4 block into a canonical form: the quantization of `src` when that is a fixed
/// point of decode-then-encode, else the fixed point that repeating decode-then-encode reaches.
fn encode_int4_block(
    src: &[f32],
    packed: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(f32, f32), BlockProblem> {
    let (mut min, mut scale) = int4_quantize(src, packed)?;
    if int4_fast_canonical(min, scale, packed, src.len()) {
        #[cfg(test)]
        assert!(int4_is_fixed_point(min, scale, packed, src.len()));
        return Ok((min, scale));
    }
    let Scratch { floats, bytes, .. } = scratch;
    floats.clear();
    floats.resize(src.len(), 0.0);
    bytes.clear();
    bytes.resize(packed.len(), 0);
    for _ in 0..MAX_CANONICAL_ROUNDS {
        int4_dequantize(min, scale, packed, floats);
        let (min_again, scale_again) = int4_quantize(floats, bytes)?;
        if min_again.to_bits() == min.to_bits()
            && scale_again.to_bits() == scale.to_bits()
            && bytes.as_slice() == &*packed
        {
            return Ok((min, scale));
        }
        min = min_again;
        scale = scale_again;
        packed.copy_from_slice(bytes);
    }
    Err(BlockProblem::NoCanonicalForm)
}

#[cfg(test)]
fn int4_is_fixed_point(min: f32, scale: f32, packed: &[u8], n: usize) -> bool {
    let mut decoded = vec![0.0; n];
    int4_dequantize(min, scale, packed, &mut decoded);
    int4_literal_canonical(min, scale, packed, &decoded, &mut Vec::new())
}

fn int4_block_bound(values: &[f32]) -> f32 {
    let (low, high, finite) = min_max(values);
    if !finite || values.is_empty() {
        return if finite { 0.0 } else { f32::INFINITY };
    }
    let range = high - low;
    if !range.is_finite() {
        return f32::INFINITY;
    }
    let magnitude = low.abs().max(high.abs());
    range / 30.0 * (1.0 + BOUND_SLACK) + magnitude * (1.0 / 1_048_576.0) + f32::MIN_POSITIVE
}

/// A cursor over untrusted bytes; every read checks what is left.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    fn truncated(&self, needed: usize) -> CodecError {
        CodecError::Truncated {
            offset: self.position,
            needed,
            remaining: self.remaining(),
        }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], CodecError> {
        if count > self.remaining() {
            return Err(self.truncated(count));
        }
        let slice = &self.bytes[self.position..self.position + count];
        self.position += count;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_le_bytes)
    }

    fn f32(&mut self) -> Result<f32, CodecError> {
        self.array().map(f32::from_le_bytes)
    }

    /// Reads one canonical LEB128 u32: at most five bytes, no overlong form.
    fn varint(&mut self) -> Result<u32, CodecError> {
        let start = self.position;
        let mut value = 0u32;
        for shift in (0..35).step_by(7) {
            let byte = self.u8()?;
            let part = u32::from(byte & 0x7F);
            if shift == 28 && part > 0x0F {
                return Err(self.bad_varint(start, "varint overflows u32"));
            }
            value |= part << shift;
            if byte & 0x80 == 0 {
                if byte == 0 && shift > 0 {
                    return Err(self.bad_varint(start, "overlong varint"));
                }
                return Ok(value);
            }
        }
        Err(self.bad_varint(start, "varint longer than five bytes"))
    }

    fn bad_varint(&self, offset: usize, detail: &'static str) -> CodecError {
        CodecError::NonCanonical {
            offset,
            name: String::new(),
            codec: "topk",
            detail,
        }
    }

    fn finish(&self) -> Result<(), CodecError> {
        if self.remaining() > 0 {
            return Err(CodecError::TrailingBytes {
                offset: self.position,
                count: self.remaining(),
            });
        }
        Ok(())
    }
}

/// Reads magic, version, codec and tensor count.
fn read_header(reader: &mut Reader<'_>) -> Result<(Codec, usize), CodecError> {
    let found = reader.array::<4>()?;
    if found != MAGIC {
        return Err(CodecError::BadMagic { found });
    }
    let version = reader.u8()?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { version });
    }
    let tag_offset = reader.position;
    let tag = reader.u8()?;
    let parameter = reader.u32()?;
    let codec = Codec::from_header(tag, parameter, tag_offset)?;
    let count = reader.u32()? as usize;
    // Each tensor takes at least four bytes: name length, a one-byte name, rank.
    if count > reader.remaining() / 4 {
        return Err(reader.truncated(count.saturating_mul(4)));
    }
    Ok((codec, count))
}

/// A tensor's name and shape as read, before its payload.
struct TensorHead {
    name: String,
    shape: Vec<usize>,
    len: usize,
}

fn read_tensor_head(
    reader: &mut Reader<'_>,
    previous: Option<&str>,
) -> Result<TensorHead, CodecError> {
    let offset = reader.position;
    let name_len = usize::from(reader.u16()?);
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err(CodecError::BadName {
            offset,
            detail: "length must be in 1..=512",
        });
    }
    let name = std::str::from_utf8(reader.take(name_len)?).map_err(|_| CodecError::BadName {
        offset,
        detail: "not utf-8",
    })?;
    if let Some(previous) = previous {
        if name <= previous {
            return Err(CodecError::Unsorted {
                offset,
                name: name.to_owned(),
                previous: previous.to_owned(),
            });
        }
    }
    let name = name.to_owned();
    let rank = usize::from(reader.u8()?);
    if rank > MAX_RANK {
        return Err(CodecError::RankTooLarge { name, rank });
    }
    let mut dims = [0u64; MAX_RANK];
    for dim in &mut dims[..rank] {
        *dim = reader.u64()?;
    }
    let dims = &dims[..rank];
    let shape: Option<Vec<usize>> = dims.iter().map(|&dim| usize::try_from(dim).ok()).collect();
    let Some((shape, len)) = shape.and_then(|shape| element_count(&shape).map(|len| (shape, len)))
    else {
        return Err(CodecError::ShapeOverflow {
            name,
            shape: dims.to_vec(),
        });
    };
    Ok(TensorHead { name, shape, len })
}

fn decode_payload(
    reader: &mut Reader<'_>,
    codec: Codec,
    head: &TensorHead,
    scratch: &mut Scratch,
) -> Result<Vec<f32>, CodecError> {
    let start = reader.position;
    let non_canonical = |offset: usize, detail: &'static str| CodecError::NonCanonical {
        offset,
        name: head.name.clone(),
        codec: codec.name(),
        detail,
    };
    match codec {
        Codec::TopK { fraction } => decode_topk(reader, head, fraction, scratch),
        Codec::F32 => Ok(take_payload(reader, codec, head.len)?
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .collect()),
        Codec::F16 => {
            let payload = take_payload(reader, codec, head.len)?;
            let mut values = vec![0.0f32; head.len];
            let mut halves = [f16::ZERO; F16_CHUNK];
            for (chunk_index, (src, dst)) in payload
                .chunks(2 * F16_CHUNK)
                .zip(values.chunks_mut(F16_CHUNK))
                .enumerate()
            {
                let halves = &mut halves[..dst.len()];
                let mut bad_nan = false;
                for (half, bytes) in halves.iter_mut().zip(src.chunks_exact(2)) {
                    let bits = u16::from_le_bytes([bytes[0], bytes[1]]);
                    bad_nan |= bits & 0x7FFF > 0x7C00 && bits != F16_CANONICAL_NAN;
                    *half = f16::from_bits(bits);
                }
                if bad_nan {
                    let offset = start + chunk_index * 2 * F16_CHUNK;
                    return Err(non_canonical(offset, "nan other than 0x7e00"));
                }
                halves.convert_to_f32_slice(dst);
            }
            Ok(values)
        }
        Codec::Int8 { block } => {
            let payload = take_payload(reader, codec, head.len)?;
            let block = block as usize;
            let mut values = vec![0.0f32; head.len];
            for (block_index, (chunk, dst)) in payload
                .chunks(4 + block)
                .zip(values.chunks_mut(block))
                .enumerate()
            {
                let (head_bytes, quantized) = chunk.split_at(4);
                let scale = f32::from_le_bytes([
                    head_bytes[0],
                    head_bytes[1],
                    head_bytes[2],
                    head_bytes[3],
                ]);
                let max_q = quantized
                    .iter()
                    .fold(0u8, |max, &q| max.max((q as i8).unsigned_abs()));
                if !int8_scale_is_canonical(scale, max_q) {
                    let offset = start + block_index * (4 + block);
                    return Err(non_canonical(offset, "scale or values not as encoded"));
                }
                for (value, &q) in dst.iter_mut().zip(quantized) {
                    *value = f32::from(q as i8) * scale;
                }
            }
            Ok(values)
        }
        Codec::Int4 { block } => {
            let payload = take_payload(reader, codec, head.len)?;
            let block = block as usize;
            let mut values = vec![0.0f32; head.len];
            for (block_index, (chunk, dst)) in payload
                .chunks(8 + block / 2)
                .zip(values.chunks_mut(block))
                .enumerate()
            {
                let (head_bytes, packed) = chunk.split_at(8);
                let min = f32::from_le_bytes([
                    head_bytes[0],
                    head_bytes[1],
                    head_bytes[2],
                    head_bytes[3],
                ]);
                let scale = f32::from_le_bytes([
                    head_bytes[4],
                    head_bytes[5],
                    head_bytes[6],
                    head_bytes[7],
                ]);
                int4_dequantize(min, scale, packed, dst);
                let canonical = if int4_fast_canonical(min, scale, packed, dst.len()) {
                    #[cfg(test)]
                    assert!(int4_is_fixed_point(min, scale, packed, dst.len()));
                    true
                } else {
                    int4_literal_canonical(min, scale, packed, dst, &mut scratch.bytes)
                };
                if !canonical {
                    let offset = start + block_index * (8 + block / 2);
                    return Err(non_canonical(offset, "block does not re-encode to itself"));
                }
            }
            Ok(values)
        }
    }
}

/// The payload of a codec whose payload size follows from `len`, checked against what is left.
fn take_payload<'a>(
    reader: &mut Reader<'a>,
    codec: Codec,
    len: usize,
) -> Result<&'a [u8], CodecError> {
    let size = payload_len(codec, len).ok_or_else(|| reader.truncated(usize::MAX))?;
    reader.take(size)
}

fn decode_topk(
    reader: &mut Reader<'_>,
    head: &TensorHead,
    fraction: f32,
    scratch: &mut Scratch,
) -> Result<Vec<f32>, CodecError> {
    let len = head.len;
    if len == 0 {
        return Ok(Vec::new());
    }
    let k = topk_count(fraction, len);
    // Scale, then at least one byte per index and one per value.
    let needed = k.saturating_mul(2).saturating_add(4);
    if needed > reader.remaining() {
        return Err(reader.truncated(needed));
    }
    let start = reader.position;
    let scale = reader.f32()?;
    let indices = &mut scratch.indices;
    indices.clear();
    indices.reserve(k);
    let mut next = 0u64;
    for _ in 0..k {
        let offset = reader.position;
        let gap = reader.varint().map_err(|error| match error {
            CodecError::NonCanonical {
                offset,
                codec,
                detail,
                ..
            } => CodecError::NonCanonical {
                offset,
                name: head.name.clone(),
                codec,
                detail,
            },
            other => other,
        })?;
        let index = next + u64::from(gap);
        if index >= len as u64 {
            return Err(CodecError::IndexOutOfRange {
                offset,
                name: head.name.clone(),
                index,
                len,
            });
        }
        indices.push(index as u32);
        next = index + 1;
    }
    let quantized = reader.take(k)?;
    let mut values = vec![0.0f32; len];
    let mut max_q = 0u8;
    for (position, (&index, &q)) in indices.iter().zip(quantized).enumerate() {
        let q = q as i8;
        max_q = max_q.max(q.unsigned_abs());
        if q == 0 && index as usize != position {
            return Err(CodecError::NonCanonical {
                offset: start,
                name: head.name.clone(),
                codec: "topk",
                detail: "a kept zero is not at the lowest free index",
            });
        }
        values[index as usize] = f32::from(q) * scale;
    }
    if !int8_scale_is_canonical(scale, max_q) {
        return Err(CodecError::NonCanonical {
            offset: start,
            name: head.name.clone(),
            codec: "topk",
            detail: "scale or values not as encoded",
        });
    }
    Ok(values)
}

fn skip_payload(
    reader: &mut Reader<'_>,
    codec: Codec,
    head: &TensorHead,
) -> Result<(), CodecError> {
    let Codec::TopK { fraction } = codec else {
        take_payload(reader, codec, head.len)?;
        return Ok(());
    };
    if head.len == 0 {
        return Ok(());
    }
    let k = topk_count(fraction, head.len);
    let needed = k.saturating_mul(2).saturating_add(4);
    if needed > reader.remaining() {
        return Err(reader.truncated(needed));
    }
    reader.take(4)?;
    let rest = &reader.bytes[reader.position..];
    let mut ends = 0usize;
    let mut varint_bytes = rest.len();
    for (position, &byte) in rest.iter().enumerate() {
        if byte & 0x80 == 0 {
            ends += 1;
            if ends == k {
                varint_bytes = position + 1;
                break;
            }
        }
    }
    if ends < k {
        return Err(reader.truncated(rest.len() + 1));
    }
    reader.take(varint_bytes)?;
    reader.take(k)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Encodes one tensor of `input` under `codec`, checks the decoded values bit for bit against
    /// `expected` and that re-encoding the decoded delta gives the same bytes. Returns the bytes.
    fn check(codec: Codec, input: &[f32], expected: &[f32]) -> Vec<u8> {
        let delta = delta_of(vec![("t", vec![input.len()], input.to_vec())]);
        let bytes = encode_to_vec(&delta, codec).unwrap();
        let decoded = decode(&bytes, input.len()).unwrap();
        let got = decoded.tensors()[0].values();
        assert_eq!(
            bits(got),
            bits(expected),
            "{codec:?}: got {got:?}, expected {expected:?}"
        );
        assert_eq!(encode_to_vec(&decoded, codec).unwrap(), bytes, "{codec:?}");
        assert_eq!(peek_layout(&bytes).unwrap(), (codec, delta.layout()));
        bytes
    }

    fn delta_of(tensors: Vec<(&str, Vec<usize>, Vec<f32>)>) -> Delta {
        Delta::new(
            tensors
                .into_iter()
                .map(|(name, shape, values)| NamedTensor::new(name, shape, values).unwrap())
                .collect(),
        )
        .unwrap()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|value| value.to_bits()).collect()
    }

    /// A hand-built header.
    fn header(tag: u8, parameter: u32, count: u32) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.push(FORMAT_VERSION);
        bytes.push(tag);
        bytes.extend_from_slice(&parameter.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes
    }

    /// Appends a hand-built tensor head.
    fn push_head(bytes: &mut Vec<u8>, name: &[u8], dims: &[u64]) {
        bytes.extend_from_slice(&(name.len() as u16).to_le_bytes());
        bytes.extend_from_slice(name);
        bytes.push(dims.len() as u8);
        for dim in dims {
            bytes.extend_from_slice(&dim.to_le_bytes());
        }
    }

    fn test_seed() -> u64 {
        std::env::var("TRIBUTARY_TEST_SEED")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0x7121_b0a7)
    }

    #[test]
    fn f32_is_exact() {
        let odd_nan = f32::from_bits(0x7FA0_0001);
        let input = [1.5, -0.0, f32::INFINITY, odd_nan, 1e-45, -3.25e30];
        check(Codec::F32, &input, &input);
    }

    #[test]
    fn f16_rounds_to_nearest() {
        let canonical_nan = f32::from_bits(0x7FC0_0000);
        check(
            Codec::F16,
            &[
                1.0,
                0.1,
                65504.0,
                65520.0,
                1e-8,
                -0.0,
                f32::from_bits(0xFFA0_0001),
            ],
            &[
                1.0,
                0.099_975_586,
                65504.0,
                f32::INFINITY,
                0.0,
                -0.0,
                canonical_nan,
            ],
        );
    }

    #[test]
    fn int8_is_symmetric_per_block() {
        // Scale 1: halves round to even.
        check(
            Codec::Int8 { block: 8 },
            &[127.0, -63.5, 0.4, 0.5, 1.5, -127.0, 2.5, 0.0],
            &[127.0, -64.0, 0.0, 0.0, 2.0, -127.0, 2.0, 0.0],
        );
        // A second, shorter block gets its own scale.
        let scale = 2.0f32 / 127.0;
        check(
            Codec::Int8 { block: 8 },
            &[0.0; 8].into_iter().chain([2.0, -1.1]).collect::<Vec<_>>(),
            &[0.0; 8]
                .into_iter()
                .chain([127.0 * scale, -70.0 * scale])
                .collect::<Vec<_>>(),
        );
    }

    #[test]
    fn int4_is_asymmetric_per_block() {
        let bytes = check(
            Codec::Int4 { block: 8 },
            &[0.0, 15.0, 7.4, 7.6, 3.0, 12.0, 1.0, 14.0, -5.0],
            &[0.0, 15.0, 7.0, 8.0, 3.0, 12.0, 1.0, 14.0, -5.0],
        );
        // The odd last block: min -5, scale 0, one byte whose high nibble stays 0.
        let tail = &bytes[bytes.len() - 9..];
        assert_eq!(tail[..4], (-5.0f32).to_le_bytes());
        assert_eq!(tail[4..8], 0.0f32.to_le_bytes());
        assert_eq!(tail[8], 0);
        // A -0.0 minimum is written as +0.0.
        check(
            Codec::Int4 { block: 8 },
            &[-0.0, 0.0, -0.0, 0.0],
            &[0.0, 0.0, 0.0, 0.0],
        );
    }

    #[test]
    fn topk_keeps_the_largest_magnitudes() {
        let scale = 4.0f32 / 127.0;
        check(
            Codec::TopK { fraction: 0.5 },
            &[1.0, -4.0, 3.0, 0.5],
            &[0.0, -127.0 * scale, 95.0 * scale, 0.0],
        );
        // Ties go to the lower index; ceil(0.1 × 4) = 1 is kept.
        let scale = 1.0f32 / 127.0;
        check(
            Codec::TopK { fraction: 0.5 },
            &[1.0, 1.0, -1.0, 1.0],
            &[127.0 * scale, 127.0 * scale, 0.0, 0.0],
        );
        check(
            Codec::TopK { fraction: 0.1 },
            &[1.0, -1.0, -1.0, 1.0],
            &[127.0 * scale, 0.0, 0.0, 0.0],
        );
        // An all-zero tensor keeps the lowest indices.
        check(Codec::TopK { fraction: 0.5 }, &[0.0; 4], &[0.0; 4]);
    }

    #[test]
    fn topk_kept_zeros_move_to_the_lowest_free_index() {
        // 0.001 is kept but quantizes to 0; re-encoding would keep index 0 instead, so encoding
        // already does.
        let scale = 5.0f32 / 127.0;
        let bytes = check(
            Codec::TopK { fraction: 0.5 },
            &[0.0, 5.0, 0.001, 0.0],
            &[0.0, 127.0 * scale, 0.0, 0.0],
        );
        let payload = &bytes[bytes.len() - 8..];
        assert_eq!(payload[..4], scale.to_le_bytes());
        assert_eq!(payload[4..], [0, 0, 0, 127], "gaps 0, 0; values 0, 127");
    }

    #[test]
    fn topk_indices_are_leb128_gaps() {
        let mut input = vec![0.0f32; 1000];
        input[3] = 1.0;
        input[900] = -1.0;
        let codec = Codec::TopK { fraction: 0.002 };
        let bytes = encode_to_vec(&delta_of(vec![("t", vec![1000], input)]), codec).unwrap();
        // 900 - 3 - 1 = 896 = 0x380: LEB128 0x80 0x07.
        assert_eq!(bytes[bytes.len() - 5..], [3, 0x80, 0x07, 127, 0x81]);
    }

    #[test]
    fn layout_is_as_documented() {
        let delta = delta_of(vec![
            ("b", vec![], vec![0.5]),
            ("a", vec![2], vec![1.0, -1.0]),
        ]);
        let bytes = encode_to_vec(&delta, Codec::Int8 { block: 8 }).unwrap();
        let mut expected = b"TRBD\x01\x02".to_vec();
        expected.extend_from_slice(&8u32.to_le_bytes());
        expected.extend_from_slice(&2u32.to_le_bytes());
        push_head(&mut expected, b"a", &[2]);
        expected.extend_from_slice(&(1.0f32 / 127.0).to_le_bytes());
        expected.extend_from_slice(&[0x7F, 0x81]);
        push_head(&mut expected, b"b", &[]);
        expected.extend_from_slice(&(0.5f32 / 127.0).to_le_bytes());
        expected.push(0x7F);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn encode_errors_leave_the_buffer_alone() {
        let delta = delta_of(vec![
            ("a", vec![2], vec![1.0, 2.0]),
            ("b", vec![3], vec![1.0, f32::NAN, 0.0]),
        ]);
        for codec in [
            Codec::Int8 { block: 8 },
            Codec::Int4 { block: 8 },
            Codec::TopK { fraction: 0.5 },
        ] {
            let mut out = vec![9u8];
            let err = encode(&delta, codec, &mut out).unwrap_err();
            assert_eq!(
                err,
                CodecError::NonFinite {
                    name: "b".into(),
                    index: 1,
                    codec: codec.name()
                }
            );
            assert_eq!(out, [9]);
        }
        assert!(encode_to_vec(&delta, Codec::F16).is_ok());
        let huge = delta_of(vec![("a", vec![2], vec![f32::MAX, -f32::MAX])]);
        assert!(matches!(
            encode_to_vec(&huge, Codec::Int4 { block: 8 }),
            Err(CodecError::OutOfRange { block: 0, .. })
        ));
        let deep = delta_of(vec![("a", vec![1; 9], vec![1.0])]);
        assert!(matches!(
            encode_to_vec(&deep, Codec::F32),
            Err(CodecError::RankTooLarge { rank: 9, .. })
        ));
        assert!(matches!(
            encode_to_vec(&deep, Codec::Int8 { block: 7 }),
            Err(CodecError::InvalidCodec { .. })
        ));
    }

    #[test]
    fn codec_parameters_are_validated() {
        let valid = [
            Codec::F32,
            Codec::F16,
            Codec::Int8 { block: 8 },
            Codec::Int8 { block: 65536 },
            Codec::Int8 { block: 33 },
            Codec::Int4 { block: 8 },
            Codec::TopK { fraction: 1.0 },
            Codec::TopK { fraction: 1e-9 },
        ];
        for codec in valid {
            assert_eq!(codec.validate(), Ok(()), "{codec:?}");
        }
        let invalid = [
            Codec::Int8 { block: 7 },
            Codec::Int8 { block: 65537 },
            Codec::Int4 { block: 33 },
            Codec::Int4 { block: 0 },
            Codec::TopK { fraction: 0.0 },
            Codec::TopK { fraction: -0.5 },
            Codec::TopK { fraction: 1.5 },
            Codec::TopK { fraction: f32::NAN },
            Codec::TopK {
                fraction: f32::INFINITY,
            },
        ];
        for codec in invalid {
            assert!(codec.validate().is_err(), "{codec:?}");
        }
        assert_eq!(Codec::default(), Codec::Int8 { block: 64 });
        let names: Vec<_> = valid.iter().map(Codec::name).collect();
        assert_eq!(
            names,
            ["f32", "f16", "int8", "int8", "int8", "int4", "topk", "topk"]
        );
    }

    #[test]
    fn decode_rejects_bad_headers() {
        let good = encode_to_vec(&delta_of(vec![("a", vec![1], vec![1.0])]), Codec::F32).unwrap();
        assert!(decode(&good, 1).is_ok());
        let with = |at: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[at] = byte;
            decode(&bytes, 1).unwrap_err()
        };
        assert!(matches!(with(0, b'X'), CodecError::BadMagic { .. }));
        assert_eq!(with(4, 2), CodecError::UnsupportedVersion { version: 2 });
        assert_eq!(with(5, 9), CodecError::UnknownCodec { tag: 9, offset: 5 });
        assert!(matches!(
            with(6, 1),
            CodecError::InvalidParameter { codec: "f32", .. }
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode(&trailing, 1),
            Err(CodecError::TrailingBytes {
                offset: good.len(),
                count: 1
            })
        );
        assert!(matches!(
            decode(&good[..good.len() - 1], 1),
            Err(CodecError::Truncated { .. })
        ));
        assert!(matches!(decode(&[], 1), Err(CodecError::Truncated { .. })));
        for parameter in [7, 65537, 0] {
            let bytes = header(TAG_INT8, parameter, 0);
            assert!(matches!(
                decode(&bytes, 0),
                Err(CodecError::InvalidParameter { codec: "int8", .. })
            ));
        }
        assert!(decode(&header(TAG_INT4, 9, 0), 0).is_err());
        for fraction in [0.0f32, -0.0, 1.5, f32::NAN] {
            assert!(decode(&header(TAG_TOPK, fraction.to_bits(), 0), 0).is_err());
        }
        assert!(decode(&header(TAG_TOPK, 0.25f32.to_bits(), 0), 0).is_ok());
        // A count the remaining bytes cannot hold fails before anything is allocated.
        assert!(matches!(
            decode(&header(TAG_F32, 0, u32::MAX), 0),
            Err(CodecError::Truncated { .. })
        ));
    }

    #[test]
    fn decode_rejects_bad_names_and_shapes() {
        let tensor = |name: &[u8], dims: &[u64]| {
            let mut bytes = Vec::new();
            push_head(&mut bytes, name, dims);
            bytes.extend_from_slice(&1.0f32.to_le_bytes());
            bytes
        };
        let two = |first: &[u8], second: &[u8]| {
            let mut bytes = header(TAG_F32, 0, 2);
            bytes.extend(tensor(first, &[]));
            bytes.extend(tensor(second, &[]));
            decode(&bytes, 10)
        };
        assert!(two(b"a", b"b").is_ok());
        assert!(matches!(two(b"b", b"a"), Err(CodecError::Unsorted { .. })));
        assert!(matches!(two(b"a", b"a"), Err(CodecError::Unsorted { .. })));
        assert!(matches!(
            two(b"a", b"\xff"),
            Err(CodecError::BadName { .. })
        ));
        assert!(matches!(two(b"", b"a"), Err(CodecError::BadName { .. })));
        let one = |dims: &[u64]| {
            let mut bytes = header(TAG_F32, 0, 1);
            bytes.extend(tensor(b"a", dims));
            decode(&bytes, 10)
        };
        assert!(one(&[1, 1, 1, 1, 1, 1, 1, 1]).is_ok());
        assert!(matches!(
            one(&[1; 9]),
            Err(CodecError::RankTooLarge { rank: 9, .. })
        ));
        assert!(matches!(
            one(&[u64::MAX, 2]),
            Err(CodecError::ShapeOverflow { .. })
        ));
        // A zero dimension means no values, so the four payload bytes are left over.
        assert!(matches!(one(&[0]), Err(CodecError::TrailingBytes { .. })));
    }

    #[test]
    fn decode_checks_the_element_limit_first() {
        // A top-k tensor of 2^40 values in a few bytes.
        let mut bytes = header(TAG_TOPK, 1e-12f32.to_bits(), 1);
        push_head(&mut bytes, b"a", &[1 << 40]);
        bytes.extend_from_slice(&1.0f32.to_le_bytes());
        bytes.extend_from_slice(&[0, 127]);
        assert_eq!(
            decode(&bytes, 1 << 20),
            Err(CodecError::TooManyElements {
                elements: 1 << 40,
                max: 1 << 20
            })
        );
        assert!(matches!(
            peek_layout(&bytes),
            Err(CodecError::TooManyElements { .. })
        ));
        // Within the limit it decodes.
        let mut bytes = header(TAG_TOPK, 1e-3f32.to_bits(), 1);
        push_head(&mut bytes, b"a", &[1000]);
        bytes.extend_from_slice(&(2.0f32 / 127.0).to_le_bytes());
        bytes.extend_from_slice(&[0x80, 0x07, 127]);
        let delta = decode(&bytes, 1000).unwrap();
        assert_eq!(delta.tensors()[0].values()[896], 127.0 * (2.0f32 / 127.0));
        assert_eq!(
            decode(&bytes, 999),
            Err(CodecError::TooManyElements {
                elements: 1000,
                max: 999
            })
        );
    }

    /// Bytes of one tensor "t" of `len` values under `codec`, with `payload` as its payload.
    fn with_payload(codec: Codec, len: u64, payload: &[u8]) -> Vec<u8> {
        let mut bytes = header(codec.tag(), codec.parameter(), 1);
        push_head(&mut bytes, b"t", &[len]);
        bytes.extend_from_slice(payload);
        bytes
    }

    fn non_canonical(bytes: &[u8]) -> bool {
        matches!(decode(bytes, 1 << 20), Err(CodecError::NonCanonical { .. }))
    }

    #[test]
    fn decode_rejects_non_canonical_quantized_payloads() {
        let int8 = Codec::Int8 { block: 8 };
        let scale = (1.0f32 / 127.0).to_le_bytes();
        let payload = |scale: [u8; 4], q: &[u8]| [&scale[..], q].concat();
        assert!(decode(&with_payload(int8, 2, &payload(scale, &[0x7F, 0x01])), 2).is_ok());
        assert!(non_canonical(&with_payload(
            int8,
            2,
            &payload(scale, &[0x7E, 0x01])
        )));
        assert!(non_canonical(&with_payload(
            int8,
            2,
            &payload(scale, &[0x7F, 0x80])
        )));
        let negative = (-1.0f32 / 127.0).to_le_bytes();
        assert!(non_canonical(&with_payload(
            int8,
            2,
            &payload(negative, &[0x7F, 0])
        )));
        let nan = f32::NAN.to_le_bytes();
        assert!(non_canonical(&with_payload(
            int8,
            2,
            &payload(nan, &[0x7F, 0])
        )));
        let zero = 0.0f32.to_le_bytes();
        assert!(decode(&with_payload(int8, 2, &payload(zero, &[0, 0])), 2).is_ok());
        assert!(non_canonical(&with_payload(
            int8,
            2,
            &payload(zero, &[0, 1])
        )));
        let minus_zero = (-0.0f32).to_le_bytes();
        assert!(non_canonical(&with_payload(
            int8,
            2,
            &payload(minus_zero, &[0, 0])
        )));

        let int4 = Codec::Int4 { block: 8 };
        let head = [0.0f32.to_le_bytes(), 1.0f32.to_le_bytes()].concat();
        assert!(decode(
            &with_payload(int4, 3, &[&head[..], &[0xF0, 0x03]].concat()),
            3
        )
        .is_ok());
        // The unused high nibble of an odd-length block.
        assert!(non_canonical(&with_payload(
            int4,
            3,
            &[&head[..], &[0xF0, 0x13]].concat()
        )));
        // No value at 15, so the scale is not (max - min) / 15.
        assert!(non_canonical(&with_payload(
            int4,
            3,
            &[&head[..], &[0xE0, 0x03]].concat()
        )));
        let minus_zero_min = [(-0.0f32).to_le_bytes(), 1.0f32.to_le_bytes()].concat();
        let bytes = with_payload(int4, 3, &[&minus_zero_min[..], &[0xF0, 0x03]].concat());
        assert!(non_canonical(&bytes));

        let topk = Codec::TopK { fraction: 0.5 };
        let payload = |indices: &[u8], q: &[u8]| [&scale[..], indices, q].concat();
        assert!(decode(&with_payload(topk, 4, &payload(&[1, 0], &[0x7F, 1])), 4).is_ok());
        // Index 1 + 0 + 1 + 2 = 4 is past the end.
        assert!(matches!(
            decode(&with_payload(topk, 4, &payload(&[1, 2], &[0x7F, 1])), 4),
            Err(CodecError::IndexOutOfRange { index: 4, .. })
        ));
        // An overlong varint for 1.
        assert!(non_canonical(&with_payload(
            topk,
            4,
            &payload(&[0x81, 0x00, 0], &[0x7F, 1])
        )));
        // A kept zero at index 2 while index 0 is free.
        assert!(non_canonical(&with_payload(
            topk,
            4,
            &payload(&[1, 0], &[0x7F, 0])
        )));
        assert!(decode(&with_payload(topk, 4, &payload(&[0, 0], &[0, 0x7F])), 4).is_ok());

        let f16 = Codec::F16;
        assert!(decode(&with_payload(f16, 1, &[0x00, 0x7E]), 1).is_ok());
        assert!(non_canonical(&with_payload(f16, 1, &[0x01, 0x7E])));
        assert!(non_canonical(&with_payload(f16, 1, &[0x00, 0xFE])));
    }

    #[test]
    fn peek_reads_names_and_shapes_only() {
        let delta = delta_of(vec![
            ("x.lora_B", vec![8, 2], vec![0.25; 16]),
            ("x.lora_A", vec![2, 8], vec![-1.0; 16]),
        ]);
        for codec in [
            Codec::F32,
            Codec::F16,
            Codec::Int8 { block: 8 },
            Codec::Int4 { block: 8 },
            Codec::TopK { fraction: 0.3 },
        ] {
            let mut bytes = encode_to_vec(&delta, codec).unwrap();
            assert_eq!(peek_layout(&bytes).unwrap(), (codec, delta.layout()));
            bytes.push(0);
            assert!(matches!(
                peek_layout(&bytes),
                Err(CodecError::TrailingBytes { count: 1, .. })
            ));
        }
        // Values are not checked: a bad int8 scale still peeks.
        let bytes = with_payload(Codec::Int8 { block: 8 }, 1, &[0, 0, 0xC0, 0xFF, 0x7F]);
        assert!(peek_layout(&bytes).is_ok());
        assert!(decode(&bytes, 1).is_err());
    }

    #[test]
    fn int4_near_degenerate_blocks_stay_canonical() {
        let seed = test_seed();
        let mut rng = StdRng::seed_from_u64(seed);
        let codec = Codec::Int4 { block: 8 };
        for round in 0..3000 {
            let center: f32 = rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-30..30));
            let spread_ulps = [1i32, 3, 15, 40, 200][round % 5];
            let values: Vec<f32> = (0..rng.gen_range(1..=8))
                .map(|_| {
                    let bits = center.to_bits() as i32 + rng.gen_range(-spread_ulps..=spread_ulps);
                    f32::from_bits(bits as u32)
                })
                .collect();
            let delta = delta_of(vec![("t", vec![values.len()], values.clone())]);
            let bytes = encode_to_vec(&delta, codec)
                .unwrap_or_else(|err| panic!("seed {seed} round {round} {values:?}: {err}"));
            let decoded = decode(&bytes, values.len()).unwrap();
            assert_eq!(
                encode_to_vec(&decoded, codec).unwrap(),
                bytes,
                "seed {seed}"
            );
            let bound = codec.max_abs_error(&values);
            for (original, got) in values.iter().zip(decoded.tensors()[0].values()) {
                assert!((original - got).abs() <= bound, "seed {seed} {values:?}");
            }
        }
    }

    #[test]
    fn subnormal_values_stay_canonical() {
        // Scales whose reciprocal overflows take the division path.
        let values = [1e-40, -3e-41, 5e-45, 0.0, -1e-39, 2e-42, 7e-44, -0.0, 1e-41];
        for codec in [
            Codec::Int8 { block: 8 },
            Codec::Int4 { block: 8 },
            Codec::TopK { fraction: 0.5 },
            Codec::F16,
        ] {
            let delta = delta_of(vec![("t", vec![values.len()], values.to_vec())]);
            let bytes = encode_to_vec(&delta, codec).unwrap();
            let decoded = decode(&bytes, values.len()).unwrap();
            assert_within_bound(codec, &values, decoded.tensors()[0].values());
            assert_eq!(encode_to_vec(&decoded, codec).unwrap(), bytes, "{codec:?}");
        }
    }

    #[test]
    fn error_feedback_carries_what_was_dropped() {
        let first = delta_of(vec![("a", vec![4], vec![1.0, 0.2, 0.1, -0.3])]);
        let mut feedback = ErrorFeedback::new();
        assert!(feedback.residual().is_none());
        let bytes = feedback
            .compress(&first, Codec::TopK { fraction: 0.25 })
            .unwrap();
        let sent = decode(&bytes, 4).unwrap();
        assert_eq!(sent.tensors()[0].values()[1..], [0.0, 0.0, 0.0]);
        let residual = feedback.residual().unwrap().tensors()[0].values().to_vec();
        assert_eq!(residual[1..], [0.2, 0.1, -0.3]);
        // The next round sends the largest corrected value: -0.3 + -0.3.
        let second = delta_of(vec![("a", vec![4], vec![0.0, 0.0, 0.0, -0.3])]);
        let bytes = feedback
            .compress(&second, Codec::TopK { fraction: 0.25 })
            .unwrap();
        let sent = decode(&bytes, 4).unwrap();
        assert!(sent.tensors()[0].values()[3] < -0.59);
        // A new layout drops the residual.
        let other = delta_of(vec![("b", vec![1], vec![1.0])]);
        feedback.compress(&other, Codec::F32).unwrap();
        assert_eq!(feedback.residual().unwrap().tensors()[0].values(), [0.0]);
        feedback.reset();
        assert!(feedback.residual().is_none());
        // An encoding error leaves the residual as it was.
        let bad = delta_of(vec![("b", vec![1], vec![f32::NAN])]);
        feedback.compress(&other, Codec::Int8 { block: 8 }).unwrap();
        let before = feedback.residual().cloned();
        assert!(feedback.compress(&bad, Codec::Int8 { block: 8 }).is_err());
        assert_eq!(feedback.residual().cloned(), before);
    }

    #[test]
    fn error_feedback_topk_tracks_the_true_sum() {
        let seed = test_seed();
        let mut rng = StdRng::seed_from_u64(seed);
        let layout = Layout::new(vec![("a".into(), vec![8, 32]), ("b".into(), vec![100])]);
        let codec = Codec::TopK { fraction: 0.1 };
        let mut feedback = ErrorFeedback::new();
        let n_values = layout.element_count();
        let mut true_sum = vec![0.0f64; n_values];
        let mut sent_sum = vec![0.0f64; n_values];
        let mut largest_norm = 0.0f64;
        for round in 0..200 {
            let mut delta = Delta::zeros(&layout).unwrap();
            for tensor in delta.tensors_mut() {
                for value in tensor.values_mut() {
                    *value = rng.gen_range(-1.0..1.0);
                }
            }
            largest_norm = largest_norm.max(delta.l2_norm());
            let bytes = feedback.compress(&delta, codec).unwrap();
            let sent = decode(&bytes, n_values).unwrap();
            let flat = |delta: &Delta| -> Vec<f32> {
                delta
                    .tensors()
                    .iter()
                    .flat_map(|tensor| tensor.values().iter().copied())
                    .collect()
            };
            let residual = feedback.residual().unwrap();
            for (index, ((value, sent), residual)) in flat(&delta)
                .into_iter()
                .zip(flat(&sent))
                .zip(flat(residual))
                .enumerate()
            {
                true_sum[index] += f64::from(value);
                sent_sum[index] += f64::from(sent);
                let gap = true_sum[index] - sent_sum[index] - f64::from(residual);
                assert!(
                    gap.abs() < 1e-3,
                    "seed {seed} round {round} index {index}: {gap}"
                );
            }
            assert!(
                residual.l2_norm() <= 25.0 * largest_norm,
                "seed {seed} round {round}: residual {} vs delta {largest_norm}",
                residual.l2_norm()
            );
        }
    }

    fn arb_codec() -> impl Strategy<Value = Codec> {
        prop_oneof![
            Just(Codec::F32),
            Just(Codec::F16),
            (8u32..=80).prop_map(|block| Codec::Int8 { block }),
            (4u32..=40).prop_map(|half| Codec::Int4 { block: 2 * half }),
            (0.001f32..=1.0).prop_map(|fraction| Codec::TopK { fraction }),
        ]
    }

    /// 1 to 4 tensors of random shapes (up to 3 dimensions of up to 11), values drawn in one of
    /// several styles: uniform at a random scale, sparse, a few ulps around a centre, small
    /// integers (many ties), or magnitudes spread over 60 decades.
    fn arb_delta() -> impl Strategy<Value = Delta> {
        prop::collection::btree_set("[a-z_.]{1,6}", 1..=4)
            .prop_flat_map(|names| {
                let shapes =
                    prop::collection::vec(prop::collection::vec(0usize..12, 0..=3), names.len());
                (Just(names), shapes, any::<u64>(), 0u8..5)
            })
            .prop_map(|(names, shapes, seed, style)| {
                let mut rng = StdRng::seed_from_u64(seed);
                let tensors = names
                    .into_iter()
                    .zip(shapes)
                    .map(|(name, shape)| {
                        let len = element_count(&shape).unwrap();
                        let scale = 10f32.powf(rng.gen_range(-4.0..4.0));
                        let centre = rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-3..6));
                        let values = (0..len)
                            .map(|_| match style {
                                0 => rng.gen_range(-1.0..1.0) * scale,
                                1 if rng.gen_bool(0.8) => [0.0, -0.0][rng.gen_range(0..2)],
                                1 => rng.gen_range(-10.0..10.0),
                                2 => f32::from_bits(
                                    (centre.to_bits() as i32 + rng.gen_range(-4..=4)) as u32,
                                ),
                                3 => rng.gen_range(-20i32..=20) as f32,
                                _ => {
                                    let sign = if rng.gen_bool(0.5) { -1.0 } else { 1.0 };
                                    sign * 10f32.powf(rng.gen_range(-30.0..30.0))
                                }
                            })
                            .collect();
                        NamedTensor::new(name, shape, values).unwrap()
                    })
                    .collect();
                Delta::new(tensors).unwrap()
            })
    }

    /// Every decoded value is within the codec's bound (for top-k: or dropped, and no larger
    /// than the k-th largest magnitude).
    fn assert_within_bound(codec: Codec, original: &[f32], decoded: &[f32]) {
        if codec == Codec::F32 {
            assert_eq!(bits(original), bits(decoded));
            return;
        }
        let bound = codec.max_abs_error(original);
        let kth_largest = match codec {
            Codec::TopK { fraction } if !original.is_empty() => {
                let k = topk_count(fraction, original.len());
                let mut magnitudes: Vec<f32> = original.iter().map(|v| v.abs()).collect();
                magnitudes.sort_by(|a, b| b.total_cmp(a));
                assert!(decoded.iter().filter(|v| **v != 0.0).count() <= k);
                magnitudes[k - 1]
            }
            _ => 0.0,
        };
        for (index, (original, decoded)) in original.iter().zip(decoded).enumerate() {
            let error = (original - decoded).abs();
            let dropped = *decoded == 0.0 && original.abs() <= kth_largest;
            assert!(
                error <= bound || dropped || bound.is_infinite(),
                "{codec:?} index {index}: {original} -> {decoded}, bound {bound}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(192))]

        #[test]
        fn round_trip_is_within_bound_and_canonical(delta in arb_delta(), codec in arb_codec()) {
            let bytes = encode_to_vec(&delta, codec).unwrap();
            prop_assert_eq!(peek_layout(&bytes).unwrap(), (codec, delta.layout()));
            let decoded = decode(&bytes, delta.element_count()).unwrap();
            prop_assert_eq!(decoded.layout(), delta.layout());
            for (original, got) in delta.tensors().iter().zip(decoded.tensors()) {
                assert_within_bound(codec, original.values(), got.values());
            }
            prop_assert_eq!(encode_to_vec(&decoded, codec).unwrap(), bytes);
        }

        #[test]
        fn corrupted_encodings_fail_or_stay_canonical(
            delta in arb_delta(),
            codec in arb_codec(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = encode_to_vec(&delta, codec).unwrap();
            for (at, mask) in flips {
                let at = at.index(bytes.len());
                bytes[at] ^= mask;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let peeked = peek_layout(&bytes);
            if let Ok(decoded) = decode(&bytes, 1 << 16) {
                let (codec, layout) = peeked.unwrap();
                prop_assert_eq!(layout, decoded.layout());
                prop_assert_eq!(encode_to_vec(&decoded, codec).unwrap(), bytes);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            tag in 0u8..6,
            parameter in prop_oneof![
                Just(0u32), Just(8), Just(16), Just(7), Just(0.5f32.to_bits()), any::<u32>()
            ],
            count in 0u32..4,
            tail in prop::collection::vec(any::<u8>(), 0..200),
            raw in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = decode(&raw, 1 << 16);
            let _ = peek_layout(&raw);
            let mut bytes = header(tag, parameter, count);
            bytes.extend_from_slice(&tail);
            let peeked = peek_layout(&bytes);
            if let Ok(decoded) = decode(&bytes, 1 << 16) {
                let (codec, _) = peeked.unwrap();
                prop_assert_eq!(encode_to_vec(&decoded, codec).unwrap(), bytes);
            }
        }

        #[test]
        fn error_feedback_residual_completes_the_decoded_value(
            (first, second) in arb_delta().prop_flat_map(|delta| {
                let layout = delta.layout();
                (Just(delta), any::<u64>().prop_map(move |seed| {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let mut next = Delta::zeros(&layout).unwrap();
                    for tensor in next.tensors_mut() {
                        for value in tensor.values_mut() {
                            *value = rng.gen_range(-2.0..2.0);
                        }
                    }
                    next
                }))
            }),
            codec in arb_codec(),
        ) {
            let mut feedback = ErrorFeedback::new();
            let mut corrected = first.clone();
            for delta in [&first, &second] {
                if let Some(residual) = feedback.residual() {
                    corrected = delta.clone();
                    corrected.add_scaled(residual, 1.0).unwrap();
                }
                let bytes = feedback.compress(delta, codec).unwrap();
                let sent = decode(&bytes, delta.element_count()).unwrap();
                let residual = feedback.residual().unwrap();
                for ((want, sent), residual) in corrected
                    .tensors()
                    .iter()
                    .zip(sent.tensors())
                    .zip(residual.tensors())
                {
                    for ((&want, &sent), &residual) in
                        want.values().iter().zip(sent.values()).zip(residual.values())
                    {
                        if !sent.is_finite() {
                            continue; // f16 overflow: nothing sensible to carry.
                        }
                        let tolerance = want.abs().max(sent.abs()) * 2e-7 + f32::MIN_POSITIVE;
                        prop_assert!(
                            (residual + sent - want).abs() <= tolerance,
                            "{:?}: {} + {} != {}", codec, residual, sent, want
                        );
                    }
                }
            }
        }
    }
}
