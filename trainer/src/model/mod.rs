//! The base model: its shape ([`LlamaConfig`]), its weights ([`checkpoint`]) and the decoder
//! itself ([`Llama`]).

pub mod attention;
pub mod blocks;
pub mod checkpoint;
mod config;
pub mod device_blocks;
mod flex;
pub mod frozen;
mod llama;
pub mod norm;
pub mod swiglu;

pub use blocks::QuantizedMatrix;
pub use config::{Architecture, LlamaConfig, RopeScaling};
pub use frozen::FrozenWeight;
pub use llama::{AdapterTensors, BaseStorage, KvCache, Llama, LoraPair};

use crate::gguf::GgufError;

/// A model that could not be read or built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The GGUF file is malformed or lacks a key.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A weight file is malformed.
    #[error("bad weight file: {0}")]
    Format(String),
    /// The model's configuration is unusable.
    #[error("model configuration: {0}")]
    Config(String),
    /// A weight the model needs is absent.
    #[error("weight {0} is missing")]
    MissingWeight(String),
    /// A weight has the wrong shape.
    #[error("weight {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The weight.
        name: String,
        /// What the configuration implies.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// A linear layer LoRA can adapt, named as PEFT names it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Target {
    /// Query projection.
    #[serde(rename = "q_proj")]
    Q,
    /// Key projection.
    #[serde(rename = "k_proj")]
    K,
    /// Value projection.
    #[serde(rename = "v_proj")]
    V,
    /// Attention output projection.
    #[serde(rename = "o_proj")]
    O,
    /// MLP gate projection.
    #[serde(rename = "gate_proj")]
    Gate,
    /// MLP up projection.
    #[serde(rename = "up_proj")]
    Up,
    /// MLP down projection.
    #[serde(rename = "down_proj")]
    Down,
}

impl Target {
    /// All targets, in a fixed order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// Position in [`Target::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// PEFT's module name (`q_proj`, …).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Parses a PEFT module name; also accepts the short forms `q k v o gate up down`.
    pub fn parse(name: &str) -> Option<Target> {
        let short = name.strip_suffix("_proj").unwrap_or(name);
        Target::ALL
            .into_iter()
            .find(|t| t.peft_name().strip_suffix("_proj") == Some(short))
    }

    /// `(in, out)` features of this projection in `config`'s model.
    pub fn dims(self, config: &LlamaConfig) -> (usize, usize) {
        let (d, q, kv, ffn) = (
            config.hidden_size,
            config.q_size(),
            config.kv_size(),
            config.intermediate_size,
        );
        match self {
            Target::Q => (d, q),
            Target::O => (q, d),
            Target::K | Target::V => (d, kv),
            Target::Gate | Target::Up => (d, ffn),
            Target::Down => (ffn, d),
        }
    }
}

/// A model ready to run: weights on a device, its tokenizer, and a description of its file.
pub struct LoadedModel {
    /// The decoder.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: crate::tokenizer::TextTokenizer,
    /// The file it came from (name and format), for model cards.
    pub description: String,
}

/// Loads a `.gguf` file (tokenizer from its metadata) or a Hugging Face folder (tokenizer from
/// `tokenizer.json`) onto `device`, with rotary tables for `max_positions` positions, its large
/// weights dense.
pub fn load(
    path: &std::path::Path,
    device: &burn::tensor::Device,
    max_positions: usize,
) -> Result<LoadedModel, ModelError> {
    load_as(path, device, max_positions, Some(BaseStorage::Dense))
}

/// Dense f32 base weights past this many bytes are kept in blocks instead when the storage is
/// left to [`load_as`]: small models stay dense and fastest, a 1B model's 4.7 GB of f32 do not.
pub const AUTO_BLOCKS_ABOVE: usize = 2 << 30;

/// [`load`], holding the large weights as `storage` says; `None` picks blocks for a GGUF file
/// whose weights as f32 would pass [`AUTO_BLOCKS_ABOVE`], dense otherwise.
pub fn load_as(
    path: &std::path::Path,
    device: &burn::tensor::Device,
    max_positions: usize,
    storage: Option<BaseStorage>,
) -> Result<LoadedModel, ModelError> {
    use crate::tokenizer::TextTokenizer;
    let tokenizer_error = |e: crate::tokenizer::TokenizerError| ModelError::Format(e.to_string());
    if path.is_dir() {
        let checkpoint = checkpoint::HfCheckpoint::open(path)?;
        let tokenizer = TextTokenizer::from_folder(path).map_err(tokenizer_error)?;
        Ok(LoadedModel {
            model: Llama::load(&checkpoint, device, max_positions)?,
            tokenizer,
            description: checkpoint::Checkpoint::describe(&checkpoint),
        })
    } else {
        let checkpoint = checkpoint::GgufCheckpoint::open(path)?;
        let tokenizer = TextTokenizer::from_gguf(checkpoint.gguf()).map_err(tokenizer_error)?;
        let storage = storage.unwrap_or_else(|| {
            let elements: usize = checkpoint
                .gguf()
                .tensors
                .iter()
                .map(|t| t.element_count())
                .sum();
            if elements.saturating_mul(std::mem::size_of::<f32>()) > AUTO_BLOCKS_ABOVE {
                BaseStorage::Blocks
            } else {
                BaseStorage::Dense
            }
        });
        Ok(LoadedModel {
            model: Llama::load_as(&checkpoint, device, max_positions, storage)?,
            tokenizer,
            description: checkpoint::Checkpoint::describe(&checkpoint),
        })
    }
}

/// What would stop a GGUF file from training here, each named (empty: everything in it is
/// supported): tensor types this reader cannot dequantize, an architecture or option the
/// decoder lacks, a tokenizer it cannot build. `tributary-trainer inspect` prints them.
pub fn gguf_problems(file: &crate::gguf::Gguf) -> Vec<String> {
    let mut problems = Vec::new();
    let mut unknown: std::collections::BTreeMap<u32, Vec<&str>> = Default::default();
    for tensor in &file.tensors {
        if let Err(id) = tensor.kind {
            unknown.entry(id).or_default().push(&tensor.name);
        }
    }
    for (id, names) in unknown {
        problems.push(format!(
            "{} tensors of GGML type {id}, which this reader cannot dequantize (first: {})",
            names.len(),
            names[0]
        ));
    }
    match LlamaConfig::from_gguf(file) {
        Ok(config) => {
            if let Err(error) = checkpoint::refuse_unused_tensors(file, &config) {
                problems.push(error.to_string());
            }
        }
        Err(error) => problems.push(error.to_string()),
    }
    if let Err(error) = crate::tokenizer::TextTokenizer::from_gguf(file) {
        problems.push(error.to_string());
    }
    problems
}

#[cfg(test)]
mod problems {
    use crate::gguf::{Gguf, GgufWriter, Value};

    #[test]
    fn a_supported_file_has_no_problems_and_an_unsupported_one_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_gguf(&path, 1).unwrap();
        let file = Gguf::open(&path).unwrap();
        assert_eq!(super::gguf_problems(&file), Vec::<String>::new());
        let mut writer = GgufWriter::new();
        writer
            .metadata("general.architecture", Value::String("phi3".into()))
            .metadata("tokenizer.ggml.model", Value::String("rwkv".into()));
        let file = Gguf::parse(writer.to_bytes()).unwrap();
        let problems = super::gguf_problems(&file).join("\n");
        assert!(problems.contains("\"phi3\""), "{problems}");
        assert!(problems.contains("tokenizer model \"rwkv\""), "{problems}");
    }
}
