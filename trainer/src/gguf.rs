//! Reading GGUF model files (llama.cpp's format, versions 2 and 3) and dequantizing their tensors.
//!
//! The format is small enough that a focused reader is simpler than a dependency: a header, typed
//! metadata, tensor descriptions, then aligned tensor data. We need the metadata (model shape,
//! tokenizer) and f32 weights, so tensors are dequantized ([`crate::quant`]: F32, F16, BF16,
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K to Q8_K). Every length and offset read from the file is checked; a malformed file is an error,
//! never a panic.
//!
//! Dimensions are reported as GGUF stores them: `dims[0]` varies fastest. A PyTorch `Linear`
//! weight of shape `[out, in]` is stored with `dims = [in, out]`.
//!
//! llama.cpp's converter also permutes the rows of `attn_q` and `attn_k` for the llama
//! architecture (it regroups each head's rotary pairs). The model code must either use the
//! matching rotary layout or undo the permutation, and a LoRA `lora_B` for `q_proj`/`k_proj`
//! trained on these weights must be un-permuted before it is exported in PEFT's layout.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use half::f16;

/// A GGUF file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a GGUF file.
    #[error("not a gguf file (magic {found:?})")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A GGUF version this reader does not know.
    #[error("gguf version {0} is not supported (2 and 3 are)")]
    Version(u32),
    /// The file ends early or a length is impossible.
    #[error("truncated or corrupt gguf at byte {offset}: {detail}")]
    Corrupt {
        /// Where.
        offset: usize,
        /// What.
        detail: String,
    },
    /// A tensor type this reader cannot dequantize.
    #[error("tensor {name:?} has type {kind}, which is not supported")]
    UnsupportedType {
        /// The tensor.
        name: String,
        /// Its GGML type id.
        kind: u32,
    },
    /// No tensor or metadata key of that name.
    #[error("{0:?} not found in the gguf file")]
    Missing(String),
    /// A metadata value of another type than expected.
    #[error("metadata {key:?} is not a {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// The type wanted.
        expected: &'static str,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Unsigned integer (u8, u16, u32, u64).
    Uint(u64),
    /// Signed integer (i8, i16, i32, i64).
    Int(i64),
    /// Float (f32, f64).
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Uint(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::Uint(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

pub use crate::quant::{dequantize, TensorType};

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, fastest-varying first.
    pub dims: Vec<usize>,
    /// Storage type; `Err(id)` for types this reader does not dequantize.
    pub kind: Result<TensorType, u32>,
    /// Byte offset of its data within the file.
    pub offset: usize,
    /// Byte length of its data (when the type is known).
    pub byte_len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn element_count(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file with its bytes.
#[derive(Debug)]
pub struct Gguf {
    /// Format version.
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    /// The whole file, shared with the base weights kept in their blocks
    /// ([`crate::model::QuantizedMatrix`]), so they cost no copy.
    bytes: Arc<Vec<u8>>,
}

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_DIMS: u32 = 8;
const DEFAULT_ALIGNMENT: usize = 32;

impl Gguf {
    /// Reads and parses a file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let bytes = std::fs::read(path).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(bytes)
    }

    /// Parses a whole file held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, GgufError> {
        let mut reader = Reader {
            bytes: &bytes,
            offset: 0,
        };
        let magic: [u8; 4] = reader.take(4)?.try_into().expect("took 4 bytes");
        if &magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = reader.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let tensor_count = reader.count()?;
        let kv_count = reader.count()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = reader.string()?;
            let kind = reader.u32()?;
            let value = reader.value(kind, 0)?;
            metadata.insert(key, value);
        }
        // Reserve modestly: a corrupt count must fail on the bytes, not on an allocation.
        let mut tensors = Vec::with_capacity(tensor_count.min(4096));
        for _ in 0..tensor_count {
            let name = reader.string()?;
            let n_dims = reader.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(reader.corrupt(format!("tensor {name:?} has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(reader.count()?);
            }
            let kind_id = reader.u32()?;
            let relative = reader.count()?;
            tensors.push((name, dims, kind_id, relative));
        }
        let alignment = match metadata.get("general.alignment") {
            Some(value) => value
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two() && *a <= 1 << 16)
                .ok_or_else(|| reader.corrupt("bad general.alignment".into()))?
                as usize,
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = reader.offset.div_ceil(alignment) * alignment;
        let mut infos = Vec::with_capacity(tensors.len());
        for (name, dims, kind_id, relative) in tensors {
            let elements = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| reader.corrupt(format!("tensor {name:?} is impossibly large")))?;
            let kind = TensorType::from_id(kind_id).ok_or(kind_id);
            let byte_len = match kind {
                Ok(kind) => kind.byte_len(elements).ok_or_else(|| {
                    reader.corrupt(format!(
                        "tensor {name:?}: {elements} values are not whole blocks"
                    ))
                })?,
                Err(_) => 0,
            };
            let offset = data_start
                .checked_add(relative)
                .filter(|start| {
                    start
                        .checked_add(byte_len)
                        .is_some_and(|end| end <= bytes.len())
                })
                .ok_or_else(|| reader.corrupt(format!("tensor {name:?} lies outside the file")))?;
            infos.push(TensorInfo {
                name,
                dims,
                kind,
                offset,
                byte_len,
            });
        }
        Ok(Self {
            version,
            metadata,
            tensors: infos,
            bytes: Arc::new(bytes),
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::Missing(key.to_owned()))
    }

    /// A metadata value that must be a non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)?.as_u64().ok_or_else(|| GgufError::WrongType {
            key: key.to_owned(),
            expected: "non-negative integer",
        })
    }

    /// A metadata value that must be numeric.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)?.as_f64().ok_or_else(|| GgufError::WrongType {
            key: key.to_owned(),
            expected: "number",
        })
    }

    /// A metadata value that must be a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)?.as_str().ok_or_else(|| GgufError::WrongType {
            key: key.to_owned(),
            expected: "string",
        })
    }

    /// A tensor's description.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::Missing(name.to_owned()))
    }

    /// A tensor's values as f32, row-major with `dims[0]` fastest.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name)?;
        let kind = info.kind.map_err(|kind| GgufError::UnsupportedType {
            name: name.to_owned(),
            kind,
        })?;
        let data = &self.bytes[info.offset..info.offset + info.byte_len];
        Ok(dequantize(kind, data, info.element_count()))
    }

    /// The whole file's bytes (a tensor's data lies at its [`TensorInfo::offset`]).
    pub fn shared_bytes(&self) -> &Arc<Vec<u8>> {
        &self.bytes
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, detail: String) -> GgufError {
        GgufError::Corrupt {
            offset: self.offset,
            detail,
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .offset
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| self.corrupt(format!("needs {len} more bytes")))?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A u64 count, length or offset; at most 2^40, so arithmetic on it cannot overflow. Callers
    /// check it against the bytes it describes.
    fn count(&mut self) -> Result<usize, GgufError> {
        let value = self.u64()?;
        usize::try_from(value)
            .ok()
            .filter(|v| *v <= 1 << 40)
            .ok_or_else(|| self.corrupt(format!("impossible count {value}")))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.count()?;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.corrupt("string is not utf-8".into()))
    }

    fn value(&mut self, kind: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match kind {
            0 => Value::Uint(u64::from(self.array::<1>()?[0])),
            1 => Value::Int(i64::from(self.array::<1>()?[0] as i8)),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.array()?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.array()?))),
            4 => Value::Uint(u64::from(self.u32()?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.array()?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.array()?))),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(self.corrupt(format!("bool byte {other}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.corrupt("arrays nested too deeply".into()));
                }
                let item_kind = self.u32()?;
                let len = self.count()?;
                // Every item takes at least one byte: a length beyond the file is corrupt.
                if len > self.bytes.len() - self.offset {
                    return Err(self.corrupt(format!("array of {len} items overruns the file")));
                }
                let mut items = Vec::with_capacity(len.min(4096));
                for _ in 0..len {
                    items.push(self.value(item_kind, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.array()?)),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(self.corrupt(format!("unknown metadata type {other}"))),
        })
    }
}

/// A copy of `file` with its weight matrices re-quantized to `target` (a K-quant), as llama.cpp
/// would: matrices whose rows (`dims[0]`) are whole super-blocks take `target`; other matrices
/// whose rows are whole 32-value blocks take llama.cpp's fallback for `target` (`Q5_0` for
/// `Q4_K`, `Q8_0` for `Q6_K`); everything else (norms, odd shapes) keeps its type and bytes.
/// The output matrix (`output.weight`, or `token_embd.weight` when the embedding is tied to
/// it) takes `Q6_K` (fallback `Q8_0`) whatever `target` is, as llama.cpp gives it under every
/// K-quant. Metadata is copied. For measuring what a quantization costs.
pub fn requantize(file: &Gguf, target: TensorType) -> Result<GgufWriter, GgufError> {
    let plan = |kind: TensorType| match kind {
        TensorType::Q4_K => Ok(QuantPlan {
            kind,
            quantize: crate::quant::quantize_q4_k,
            fallback: TensorType::Q5_0,
            quantize_fallback: crate::quant::quantize_q5_0,
        }),
        TensorType::Q6_K => Ok(QuantPlan {
            kind,
            quantize: crate::quant::quantize_q6_k,
            fallback: TensorType::Q8_0,
            quantize_fallback: quantize_q8_0,
        }),
        other => Err(GgufError::Corrupt {
            offset: 0,
            detail: format!("re-quantizing to {other} is not implemented (Q4_K, Q6_K)"),
        }),
    };
    let (weights, output) = (plan(target)?, plan(TensorType::Q6_K)?);
    let output_name = if file.tensors.iter().any(|t| t.name == "output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let mut writer = GgufWriter::new();
    for (key, value) in &file.metadata {
        writer.metadata(key, value.clone());
    }
    for info in &file.tensors {
        let kind = info.kind.map_err(|kind| GgufError::UnsupportedType {
            name: info.name.clone(),
            kind,
        })?;
        let row = info.dims.first().copied().unwrap_or(0);
        let matrix = info.dims.len() >= 2;
        let plan = if info.name == output_name {
            &output
        } else {
            &weights
        };
        let (kind, data) = if matrix && row.is_multiple_of(crate::quant::QK_K) {
            (plan.kind, (plan.quantize)(&file.dequantize(&info.name)?))
        } else if matrix && row.is_multiple_of(32) && kind != plan.fallback {
            (
                plan.fallback,
                (plan.quantize_fallback)(&file.dequantize(&info.name)?),
            )
        } else {
            (
                kind,
                file.bytes[info.offset..info.offset + info.byte_len].to_vec(),
            )
        };
        writer.tensor_bytes(&info.name, info.dims.clone(), kind, data);
    }
    Ok(writer)
}

/// How one class of matrices is re-quantized: a K-quant, and llama.cpp's fallback for rows
/// that are not whole super-blocks.
struct QuantPlan {
    kind: TensorType,
    quantize: fn(&[f32]) -> Vec<u8>,
    fallback: TensorType,
    quantize_fallback: fn(&[f32]) -> Vec<u8>,
}

/// Writes GGUF files for tests: integers as u64/i64, floats as f64, data aligned to 32 bytes.
/// (llama.cpp checks metadata types strictly, so files meant for it need its exact types.)
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, TensorType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn metadata(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_owned(), value));
        self
    }

    /// Adds a tensor from its already-encoded bytes.
    pub fn tensor_bytes(
        &mut self,
        name: &str,
        dims: Vec<usize>,
        kind: TensorType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push((name.to_owned(), dims, kind, data));
        self
    }

    /// Adds an f32 tensor.
    pub fn tensor_f32(&mut self, name: &str, dims: Vec<usize>, values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor_bytes(name, dims, TensorType::F32, data)
    }

    /// The file's bytes (version 3, alignment 32).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            write_value(&mut out, value, true);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, kind, data) in &self.tensors {
            write_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for dim in dims {
                out.extend_from_slice(&(*dim as u64).to_le_bytes());
            }
            out.extend_from_slice(&kind.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        out.resize(out.len().div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT, 0);
        let start = out.len();
        for ((_, _, _, data), offset) in self.tensors.iter().zip(offsets) {
            out.resize(start + offset, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &Value, with_type: bool) {
    let (kind, body): (u32, Vec<u8>) = match value {
        Value::Uint(v) => (10, v.to_le_bytes().to_vec()),
        Value::Int(v) => (11, v.to_le_bytes().to_vec()),
        Value::Float(v) => (12, v.to_le_bytes().to_vec()),
        Value::Bool(v) => (7, vec![u8::from(*v)]),
        Value::String(s) => {
            let mut body = Vec::new();
            write_string(&mut body, s);
            (8, body)
        }
        Value::Array(items) => {
            let mut body = Vec::new();
            let item_kind = items.first().map_or(8, value_kind);
            body.extend_from_slice(&item_kind.to_le_bytes());
            body.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(&mut body, item, false);
            }
            (9, body)
        }
    };
    if with_type {
        out.extend_from_slice(&kind.to_le_bytes());
    }
    out.extend_from_slice(&body);
}

fn value_kind(value: &Value) -> u32 {
    match value {
        Value::Uint(_) => 10,
        Value::Int(_) => 11,
        Value::Float(_) => 12,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
    }
}

/// Quantizes f32 values to Q8_0 blocks (test and export helper).
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = f16::from_f32(max / 127.0);
        let inverse = if scale.to_f32() > 0.0 {
            1.0 / scale.to_f32()
        } else {
            0.0
        };
        out.extend_from_slice(&scale.to_le_bytes());
        out.extend(
            block
                .iter()
                .map(|v| (v * inverse).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
    out
}

/// Quantizes f32 values to Q4_1 blocks (test and export helper).
pub fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        let min = block.iter().fold(f32::INFINITY, |m, v| m.min(*v));
        let max = block.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let scale = f16::from_f32((max - min) / 15.0);
        let minimum = f16::from_f32(min);
        let inverse = if scale.to_f32() > 0.0 {
            1.0 / scale.to_f32()
        } else {
            0.0
        };
        out.extend_from_slice(&scale.to_le_bytes());
        out.extend_from_slice(&minimum.to_le_bytes());
        let q = |v: f32| ((v - minimum.to_f32()) * inverse).round().clamp(0.0, 15.0) as u8;
        for j in 0..16 {
            out.push(q(block[j]) | (q(block[j + 16]) << 4));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requantizing_takes_k_quants_for_whole_super_block_rows_and_keeps_the_rest() {
        let values: Vec<f32> = (0..1024)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0)
            .collect();
        let mut writer = GgufWriter::new();
        writer
            .metadata("general.architecture", Value::String("llama".into()))
            .tensor_f32("wide", vec![256, 4], &values)
            .tensor_f32("narrow", vec![32, 2], &values[..64])
            .tensor_f32("norm", vec![32], &values[..32])
            .tensor_f32("token_embd.weight", vec![32, 4], &values[..128]);
        let file = Gguf::parse(writer.to_bytes()).unwrap();
        // llama.cpp's fallbacks for rows that are not whole super-blocks.
        for (target, fallback) in [
            (TensorType::Q4_K, TensorType::Q5_0),
            (TensorType::Q6_K, TensorType::Q8_0),
        ] {
            let again = Gguf::parse(requantize(&file, target).unwrap().to_bytes()).unwrap();
            assert_eq!(again.get_str("general.architecture").unwrap(), "llama");
            let kinds: Vec<_> = again.tensors.iter().map(|t| t.kind).collect();
            // The tied embedding is the output matrix: Q6_K's fallback whatever the target.
            assert_eq!(
                kinds,
                vec![
                    Ok(target),
                    Ok(fallback),
                    Ok(TensorType::F32),
                    Ok(TensorType::Q8_0)
                ]
            );
            let narrow = again.dequantize("narrow").unwrap();
            let worst = narrow
                .iter()
                .zip(&values[..64])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 0.01, "{fallback}: {worst}");
            let wide = again.dequantize("wide").unwrap();
            let worst = wide
                .iter()
                .zip(&values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 0.01, "{target}: {worst}");
            assert_eq!(again.dequantize("norm").unwrap(), values[..32].to_vec());
        }
        assert!(requantize(&file, TensorType::Q8_0).is_err());
    }
    use proptest::prelude::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 - n as f32 / 2.0) / 17.0).collect()
    }

    #[test]
    fn every_type_round_trips_within_its_precision() {
        let values = ramp(64);
        let halves: Vec<u8> = values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let mut q4_0 = Vec::new();
        for block in values.chunks(32) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = f16::from_f32(max / 8.0);
            q4_0.extend_from_slice(&scale.to_le_bytes());
            let q = |v: f32| ((v / scale.to_f32()).round() + 8.0).clamp(0.0, 15.0) as u8;
            for j in 0..16 {
                q4_0.push(q(block[j]) | (q(block[j + 16]) << 4));
            }
        }
        let mut writer = GgufWriter::new();
        writer
            .metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", Value::Uint(2))
            .metadata(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            )
            .tensor_f32("f32", vec![16, 4], &values)
            .tensor_bytes("f16", vec![64], TensorType::F16, halves)
            .tensor_bytes("q8", vec![32, 2], TensorType::Q8_0, quantize_q8_0(&values))
            .tensor_bytes("q4_1", vec![64], TensorType::Q4_1, quantize_q4_1(&values))
            .tensor_bytes("q4_0", vec![64], TensorType::Q4_0, q4_0);
        let file = Gguf::parse(writer.to_bytes()).unwrap();
        assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(file.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(file.tensor("f32").unwrap().dims, vec![16, 4]);
        let span = 64.0 / 17.0;
        for (name, tolerance) in [
            ("f32", 0.0),
            ("f16", 2e-3),
            ("q8", span / 2.0 / 127.0 + 1e-3),
            ("q4_1", span / 2.0 / 15.0 + 2e-3),
            ("q4_0", span / 2.0 / 8.0 + 2e-3),
        ] {
            let decoded = file.dequantize(name).unwrap();
            assert_eq!(decoded.len(), 64);
            for (got, want) in decoded.iter().zip(&values) {
                assert!((got - want).abs() <= tolerance, "{name}: {got} vs {want}");
            }
        }
        assert!(matches!(
            file.dequantize("nope"),
            Err(GgufError::Missing(_))
        ));
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(matches!(
            Gguf::parse(b"GGML\x03\0\0\0".to_vec()),
            Err(GgufError::BadMagic { .. })
        ));
        let mut writer = GgufWriter::new();
        writer.tensor_f32("t", vec![4], &[1.0, 2.0, 3.0, 4.0]);
        let bytes = writer.to_bytes();
        for cut in 0..bytes.len() {
            assert!(Gguf::parse(bytes[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        let mut wrong_version = bytes.clone();
        wrong_version[4] = 9;
        assert!(matches!(
            Gguf::parse(wrong_version),
            Err(GgufError::Version(9))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn arbitrary_or_flipped_bytes_never_panic(index in 0usize..400, value in any::<u8>(), noise in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Gguf::parse(noise);
            let mut writer = GgufWriter::new();
            writer
                .metadata("k", Value::Array(vec![Value::Uint(1), Value::Uint(2)]))
                .tensor_bytes("q", vec![32], TensorType::Q4_1, quantize_q4_1(&ramp(32)));
            let mut bytes = writer.to_bytes();
            let index = index % bytes.len();
            bytes[index] = value;
            if let Ok(file) = Gguf::parse(bytes) {
                let _ = file.dequantize("q");
            }
        }
    }
}
