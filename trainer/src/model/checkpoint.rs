//! Reading base-model weights from GGUF files and Hugging Face folders.
//!
//! Every weight is handed out under its Hugging Face name (`model.layers.3.self_attn.q_proj.weight`)
//! and in Hugging Face layout (row-major `[out, in]`), whatever the file. GGUF files of llama.cpp's
//! `llama` architecture store the rows of the query and key projections permuted (pairs of rotary
//! halves interleaved); [`GgufCheckpoint`] undoes that, so the model and its LoRA adapters live in
//! the layout PEFT expects. Qwen's GGUF files keep Hugging Face's order.
//!
//! A checkpoint holding a weight the decoder would not use is refused, naming it: an extra tensor
//! means a model this decoder does not compute.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::gguf::Gguf;

use super::{LlamaConfig, ModelError, QuantizedMatrix};
use crate::quant::TensorType;

/// A weight on the host: row-major values and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, slowest-varying first.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// A source of base-model weights, read one tensor at a time (so peak memory stays near one copy
/// of the model).
pub trait Checkpoint {
    /// The model's shape.
    fn config(&self) -> &LlamaConfig;
    /// The weight named `name` (Hugging Face naming and layout), as f32.
    fn load(&self, name: &str) -> Result<HostTensor, ModelError>;
    /// A stable description of the weights (file name and size), for model cards.
    fn describe(&self) -> String;
    /// The matrix named `name` in its file's quantized blocks (Hugging Face row order), when the
    /// file keeps it in a type other than f32; `None` when it has no such form.
    fn blocks(&self, name: &str) -> Result<Option<QuantizedMatrix>, ModelError> {
        let _ = name;
        Ok(None)
    }
}

/// Opens a `.gguf` file or a Hugging Face model folder.
pub fn open(path: &Path) -> Result<Box<dyn Checkpoint + Send + Sync>, ModelError> {
    if path.is_dir() {
        Ok(Box::new(HfCheckpoint::open(path)?))
    } else {
        Ok(Box::new(GgufCheckpoint::open(path)?))
    }
}

/// A llama.cpp GGUF file.
pub struct GgufCheckpoint {
    file: Gguf,
    config: LlamaConfig,
    path: PathBuf,
}

impl GgufCheckpoint {
    /// Reads and parses the file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = Gguf::open(path)?;
        Self::from_gguf(file, path.to_path_buf())
    }

    /// Wraps a parsed file.
    pub fn from_gguf(file: Gguf, path: PathBuf) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(&file)?;
        refuse_unused_tensors(&file, &config)?;
        Ok(Self { file, config, path })
    }

    /// The parsed file (for the tokenizer).
    pub fn gguf(&self) -> &Gguf {
        &self.file
    }
}

/// An error naming the tensors of `file` that `config`'s decoder would not read.
pub fn refuse_unused_tensors(file: &Gguf, config: &LlamaConfig) -> Result<(), ModelError> {
    let used: std::collections::HashSet<String> = used_weights(config)
        .iter()
        .filter_map(|hf| gguf_name(hf))
        .collect();
    let unused: Vec<&str> = file
        .tensors
        .iter()
        .map(|tensor| tensor.name.as_str())
        .filter(|name| *name != "rope_freqs.weight" && !used.contains(*name))
        .collect();
    match unused.first() {
        Some(first) => Err(ModelError::Config(format!(
            "{} tensors this decoder would not use, so it would compute a different model \
             (first: {first})",
            unused.len()
        ))),
        None => Ok(()),
    }
}

/// The Hugging Face names of every weight `config`'s decoder reads.
pub fn used_weights(config: &LlamaConfig) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for i in 0..config.num_layers {
        let mut leaves = vec![
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ];
        if config.qkv_bias {
            leaves.extend([
                "self_attn.q_proj.bias",
                "self_attn.k_proj.bias",
                "self_attn.v_proj.bias",
            ]);
        }
        if config.o_bias {
            leaves.push("self_attn.o_proj.bias");
        }
        if config.qk_norm {
            leaves.extend(["self_attn.q_norm.weight", "self_attn.k_norm.weight"]);
        }
        names.extend(leaves.iter().map(|leaf| format!("model.layers.{i}.{leaf}")));
    }
    names
}

/// The GGUF name of a Hugging Face weight name.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    match hf_name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = leaf.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// Undoes llama.cpp's row permutation of a query or key projection (`[heads * head_dim, in]`;
/// a bias is one column).
///
/// llama.cpp's converter reorders each head's rows from `[2, head_dim / 2]` (Hugging Face's
/// rotate-half pairs) to `[head_dim / 2, 2]` (interleaved pairs), so GGUF row `2 i + j` of a head
/// holds Hugging Face row `j head_dim / 2 + i`.
pub fn unpermute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    reorder_rows(values, heads, cols, true)
}

/// The inverse of [`unpermute_rows`] (Hugging Face layout to llama.cpp's), for writing test files.
pub fn permute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    reorder_rows(values, heads, cols, false)
}

/// For each Hugging Face row of a query or key projection with `rows` rows in `heads` heads,
/// the GGUF row that holds it (the row order [`unpermute_rows`] applies).
pub fn hf_row_sources(rows: usize, heads: usize) -> Vec<u32> {
    let head_dim = rows / heads.max(1);
    let half = head_dim / 2;
    let mut sources: Vec<u32> = (0..rows as u32).collect();
    for head in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = head * head_dim + 2 * i + j;
                let hf = head * head_dim + j * half + i;
                sources[hf] = gguf as u32;
            }
        }
    }
    sources
}

fn reorder_rows(values: &[f32], heads: usize, cols: usize, to_hf: bool) -> Vec<f32> {
    let rows = values.len() / cols.max(1);
    let head_dim = rows / heads.max(1);
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for head in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = head * head_dim + 2 * i + j;
                let hf = head * head_dim + j * half + i;
                let (from, to) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

impl Checkpoint for GgufCheckpoint {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
        let gguf = gguf_name(name).ok_or_else(|| ModelError::MissingWeight(name.to_string()))?;
        let info = self
            .file
            .tensor(&gguf)
            .map_err(|_| ModelError::MissingWeight(format!("{name} ({gguf})")))?;
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        let values = self.file.dequantize(&gguf)?;
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        let permuted = self.config.architecture.gguf_permutes_qk();
        let values = if permuted && name.contains("self_attn.q_proj.") {
            unpermute_rows(&values, self.config.num_heads, cols)
        } else if permuted && name.contains("self_attn.k_proj.") {
            unpermute_rows(&values, self.config.num_kv_heads, cols)
        } else {
            values
        };
        Ok(HostTensor { shape, values })
    }

    fn blocks(&self, name: &str) -> Result<Option<QuantizedMatrix>, ModelError> {
        let gguf = gguf_name(name).ok_or_else(|| ModelError::MissingWeight(name.to_string()))?;
        let info = self
            .file
            .tensor(&gguf)
            .map_err(|_| ModelError::MissingWeight(format!("{name} ({gguf})")))?;
        let kind = match info.kind {
            Ok(TensorType::F32) | Err(_) => return Ok(None),
            Ok(kind) => kind,
        };
        let &[cols, rows] = info.dims.as_slice() else {
            return Ok(None);
        };
        let matrix = QuantizedMatrix::new(
            self.file.shared_bytes().clone(),
            info.offset,
            kind,
            rows,
            cols,
        )?;
        let permuted = self.config.architecture.gguf_permutes_qk();
        let heads = if permuted && name.contains("self_attn.q_proj.") {
            Some(self.config.num_heads)
        } else if permuted && name.contains("self_attn.k_proj.") {
            Some(self.config.num_kv_heads)
        } else {
            None
        };
        Ok(Some(match heads {
            Some(heads) => matrix.with_row_sources(hf_row_sources(rows, heads)),
            None => matrix,
        }))
    }

    fn describe(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{name} (GGUF v{})", self.file.version)
    }
}

/// A Hugging Face model folder: `config.json` and `model.safetensors` (or shards listed in
/// `model.safetensors.index.json`).
pub struct HfCheckpoint {
    config: LlamaConfig,
    dir: PathBuf,
    /// Weight name to the shard file holding it.
    shards: BTreeMap<String, PathBuf>,
    /// Shard contents, read once.
    bytes: BTreeMap<PathBuf, Vec<u8>>,
}

impl HfCheckpoint {
    /// Reads the folder's config and weights.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ModelError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        let config_text = String::from_utf8(read(&dir.join("config.json"))?)
            .map_err(|_| ModelError::Config("config.json is not UTF-8".into()))?;
        let config = LlamaConfig::from_hf_json(&config_text)?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let parsed: Index = serde_json::from_slice(&read(&index)?)
                .map_err(|error| ModelError::Config(format!("{}: {error}", index.display())))?;
            let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
            files.sort();
            files.dedup();
            files
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = BTreeMap::new();
        let mut bytes = BTreeMap::new();
        for file in files {
            let data = read(&file)?;
            let parsed = SafeTensors::deserialize(&data)
                .map_err(|error| ModelError::Format(format!("{}: {error}", file.display())))?;
            for name in parsed.names() {
                shards.insert(name.to_string(), file.clone());
            }
            bytes.insert(file, data);
        }
        Ok(Self {
            config,
            dir: dir.to_path_buf(),
            shards,
            bytes,
        })
    }
}

impl Checkpoint for HfCheckpoint {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
        let file = self
            .shards
            .get(name)
            .ok_or_else(|| ModelError::MissingWeight(name.to_string()))?;
        let data = &self.bytes[file];
        let parsed = SafeTensors::deserialize(data)
            .map_err(|error| ModelError::Format(format!("{}: {error}", file.display())))?;
        let view = parsed
            .tensor(name)
            .map_err(|error| ModelError::Format(format!("{name}: {error}")))?;
        let raw = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Format(format!(
                    "{name}: dtype {other:?} is not supported (f32, f16, bf16)"
                )))
            }
        };
        Ok(HostTensor {
            shape: view.shape().to_vec(),
            values,
        })
    }

    fn describe(&self) -> String {
        let name = self
            .dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{name} (safetensors)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips_and_matches_llama_cpp() {
        // Two heads of size 4, two columns: rows are (head, j, i) in HF order.
        let heads = 2;
        let cols = 2;
        let hf: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let gguf = permute_rows(&hf, heads, cols);
        // llama.cpp: reshape(heads, 2, hd/2, cols).swapaxes(1, 2): GGUF row 1 of head 0 is HF row 2.
        assert_eq!(&gguf[2..4], &hf[4..6]);
        assert_eq!(unpermute_rows(&gguf, heads, cols), hf);
    }

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
    }
}
