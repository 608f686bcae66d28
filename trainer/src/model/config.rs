//! The shape of a Llama-family decoder, read from a checkpoint's metadata.
//!
//! One decoder runs Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3: they differ only in options this
//! config names (biases, per-head query/key norms, head size, sliding window, RoPE scaling).
//! Every option a checkpoint sets is either read into a field here or refused by name; nothing is
//! silently dropped, so a loaded model computes what its authors' code computes.

use serde::Deserialize;

use crate::gguf::Gguf;

use super::ModelError;

/// A decoder family (Hugging Face `model_type`; GGUF `general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2 and 3.x, SmolLM2 (GGUF `llama`).
    Llama,
    /// Mistral (GGUF files store it as `llama`).
    Mistral,
    /// Qwen2 and Qwen2.5 (GGUF `qwen2`).
    Qwen2,
    /// Qwen3 dense models (GGUF `qwen3`).
    Qwen3,
}

impl Architecture {
    /// Hugging Face's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// Hugging Face's model class (`architectures` in `config.json`).
    pub fn class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    fn from_model_type(name: &str) -> Option<Self> {
        [Self::Llama, Self::Mistral, Self::Qwen2, Self::Qwen3]
            .into_iter()
            .find(|arch| arch.model_type() == name)
    }

    /// Whether llama.cpp stores this family's query and key rows permuted to interleaved rotary
    /// pairs (its `llama` architecture); Qwen's GGUF files keep Hugging Face's rotate-half order.
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }
}

/// Hyper-parameters that fix a Llama-family decoder's shape and numerics.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// The family the checkpoint names.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Size of one attention head (usually `hidden_size / num_heads`; Qwen3 and some Mistral
    /// models set it wider).
    pub head_dim: usize,
    /// Biases on the query, key and value projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the attention output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Each position attends only to the last this many positions, itself included (Mistral).
    pub sliding_window: Option<usize>,
    /// Rotary embedding base.
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled for longer contexts.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// How a checkpoint scales its rotary frequencies (`rope_scaling`/`rope_parameters` in a
/// Hugging Face config; `rope.scaling.*` keys or a `rope_freqs.weight` tensor in GGUF).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.x: wavelengths longer than `original / low_freq_factor` are divided by
    /// `factor`, those shorter than `original / high_freq_factor` kept, and the ones between
    /// blended smoothly.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Where the low band starts, as a divisor of the original context.
        low_freq_factor: f64,
        /// Where the high band starts, as a divisor of the original context.
        high_freq_factor: f64,
        /// The context length the model was first trained at.
        original_max_position_embeddings: f64,
    },
    /// A divisor per frequency, as llama.cpp stores Llama 3's (`rope_freqs.weight`).
    Divisors(Vec<f64>),
    /// Dynamic NTK scaling: plain RoPE up to `original_max_position_embeddings`, a larger base
    /// computed from the sequence length beyond it. The decoder runs such a model within that
    /// context only (where it is exactly plain RoPE) and refuses longer sequences.
    Dynamic {
        /// How far the context stretches.
        factor: f64,
        /// Positions up to which nothing changes.
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// The divisor of frequency `inv_freq` (index `i`).
    fn divisor(&self, i: usize, inv_freq: f64) -> f64 {
        match self {
            Self::None | Self::Dynamic { .. } => 1.0,
            Self::Linear { factor } => *factor,
            Self::Divisors(divisors) => divisors.get(i).copied().unwrap_or(1.0),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            } => {
                let wavelength = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelength < original / high_freq_factor {
                    1.0
                } else if wavelength > original / low_freq_factor {
                    *factor
                } else {
                    let smooth = (original / wavelength - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            }
        }
    }

    /// Reads a Hugging Face `rope_scaling` or `rope_parameters` object (`None` or `default`:
    /// no scaling); `context` is the config's `max_position_embeddings`. Any other type is an
    /// error naming it.
    fn from_hf(parameters: &serde_json::Value, context: f64) -> Result<Self, ModelError> {
        let kind = parameters
            .get("rope_type")
            .or_else(|| parameters.get("type"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| -> Result<f64, ModelError> {
            parameters
                .get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| {
                    ModelError::Config(format!("RoPE scaling {kind:?} needs a number {key:?}"))
                })
        };
        let scaling = match kind {
            "default" => Self::None,
            "linear" => Self::Linear {
                factor: number("factor")?,
            },
            "llama3" => Self::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            },
            "dynamic" => Self::Dynamic {
                factor: number("factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")
                    .unwrap_or(context),
            },
            other => {
                return Err(ModelError::Config(format!(
                    "RoPE scaling type {other:?} is not supported (default, linear, llama3, \
                     dynamic)"
                )))
            }
        };
        scaling.validate()?;
        Ok(scaling)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let positive = |value: f64| value.is_finite() && value > 0.0;
        let ok = match self {
            Self::None => true,
            Self::Linear { factor } => positive(*factor),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive(*factor)
                    && positive(*low_freq_factor)
                    && positive(*original_max_position_embeddings)
                    && high_freq_factor > low_freq_factor
                    && high_freq_factor.is_finite()
            }
            Self::Divisors(divisors) => divisors.iter().all(|d| positive(*d)),
            Self::Dynamic {
                factor,
                original_max_position_embeddings,
            } => positive(*factor) && positive(*original_max_position_embeddings),
        };
        if ok {
            Ok(())
        } else {
            Err(ModelError::Config(format!(
                "RoPE scaling parameters are not usable: {self:?}"
            )))
        }
    }
}

impl LlamaConfig {
    /// The rotary inverse frequencies, one per pair of head dimensions, scaling applied.
    pub fn inv_freqs(&self) -> Vec<f64> {
        let head_dim = self.head_dim();
        (0..head_dim / 2)
            .map(|i| {
                let inv_freq = self.rope_theta.powf(-((2 * i) as f64) / head_dim as f64);
                inv_freq / self.rope_scaling.divisor(i, inv_freq)
            })
            .collect()
    }

    /// One line naming the family, the shape and every option that is on.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "{} — {} layers, width {}, {} heads of {} sharing {} key/value heads, MLP {}, \
             vocabulary {}, RoPE base {}",
            self.architecture.model_type(),
            self.num_layers,
            self.hidden_size,
            self.num_heads,
            self.head_dim,
            self.num_kv_heads,
            self.intermediate_size,
            self.vocab_size,
            self.rope_theta
        );
        let scaling = match &self.rope_scaling {
            RopeScaling::None => None,
            RopeScaling::Linear { factor } => Some(format!("linear RoPE scaling ×{factor}")),
            RopeScaling::Llama3 { factor, .. } => Some(format!("llama3 RoPE scaling ×{factor}")),
            RopeScaling::Divisors(_) => Some("RoPE frequency divisors".to_string()),
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => Some(format!(
                "dynamic RoPE scaling ×{factor} past {original_max_position_embeddings}"
            )),
        };
        let options = [
            scaling,
            self.qkv_bias.then(|| "q/k/v biases".to_string()),
            self.o_bias.then(|| "output bias".to_string()),
            self.qk_norm.then(|| "q/k norms".to_string()),
            self.sliding_window
                .map(|window| format!("sliding window {window}")),
            self.tie_word_embeddings
                .then(|| "tied embeddings".to_string()),
        ];
        for option in options.into_iter().flatten() {
            line.push_str(", ");
            line.push_str(&option);
        }
        line
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Width of the query projection's output (and the output projection's input).
    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the key and value projections.
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks that the numbers describe a buildable model.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fail = |what: String| Err(ModelError::Config(what));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return fail("vocab size, width and layer count must be positive".into());
        }
        if self.num_heads == 0 || self.head_dim == 0 {
            return fail("head count and head size must be positive".into());
        }
        if self.sliding_window == Some(0) {
            return fail("a sliding window must hold at least one position".into());
        }
        // Each family's own code fixes which options combine; anything else is a model its
        // authors' code would not build.
        let arch = self.architecture;
        let biases_fit = match arch {
            Architecture::Qwen2 => self.qkv_bias && !self.o_bias,
            Architecture::Mistral => !self.qkv_bias && !self.o_bias,
            Architecture::Llama | Architecture::Qwen3 => self.qkv_bias == self.o_bias,
        };
        if !biases_fit {
            return fail(format!(
                "{arch:?} with q/k/v biases {} and an output bias {}",
                self.qkv_bias, self.o_bias
            ));
        }
        if self.qk_norm != (arch == Architecture::Qwen3) {
            return fail(format!("{arch:?} with query/key norms {}", self.qk_norm));
        }
        if self.sliding_window.is_some() && arch != Architecture::Mistral {
            return fail(format!("{arch:?} with a sliding window"));
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail(format!(
                "head size {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fail(format!(
                "{} query heads cannot share {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps > 0.0) {
            return fail("rope base and norm epsilon must be positive".into());
        }
        if let RopeScaling::Divisors(divisors) = &self.rope_scaling {
            if divisors.len() != self.head_dim() / 2 {
                return fail(format!(
                    "{} RoPE frequency divisors for heads of size {}",
                    divisors.len(),
                    self.head_dim()
                ));
            }
        }
        self.rope_scaling.validate()
    }

    /// Reads a GGUF file's `{arch}.*` metadata (`llama`, `qwen2` or `qwen3`) and which
    /// optional tensors it holds (biases, query/key norms, RoPE divisors).
    pub fn from_gguf(file: &Gguf) -> Result<Self, ModelError> {
        let name = file.get_str("general.architecture")?;
        let architecture = match name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(ModelError::Config(format!(
                    "architecture {other:?} is not supported (llama, qwen2, qwen3)"
                )))
            }
        };
        let key = |leaf: &str| format!("{name}.{leaf}");
        let int = |leaf: &str| -> Result<usize, ModelError> {
            Ok(usize::try_from(file.get_u64(&key(leaf))?).unwrap_or(usize::MAX))
        };
        let num_heads = int("attention.head_count")?;
        let hidden_size = int("embedding_length")?;
        // Options this decoder does not implement: refused by name, never ignored.
        if file
            .get_u64(&key("expert_count"))
            .is_ok_and(|experts| experts > 0)
        {
            return Err(ModelError::Config(format!(
                "{}: mixture-of-experts models are not supported",
                key("expert_count")
            )));
        }
        for leaf in ["attention.sliding_window", "attention.logit_softcapping"] {
            if file.get_u64(&key(leaf)).is_ok() || file.get_f64(&key(leaf)).is_ok() {
                return Err(ModelError::Config(format!(
                    "{} is set; this decoder has no such option",
                    key(leaf)
                )));
            }
        }
        let rope_scaling = match file.get_str(&key("rope.scaling.type")) {
            Err(_) | Ok("none") => RopeScaling::None,
            Ok("linear") => RopeScaling::Linear {
                factor: file.get_f64(&key("rope.scaling.factor"))?,
            },
            Ok(other) => {
                return Err(ModelError::Config(format!(
                    "{} {other:?} is not supported (none, linear)",
                    key("rope.scaling.type")
                )))
            }
        };
        // Llama 3's scaling, as llama.cpp's converter stores it: a divisor per frequency.
        let rope_scaling = match file.tensor("rope_freqs.weight") {
            Ok(_) if rope_scaling != RopeScaling::None => {
                return Err(ModelError::Config(format!(
                    "both {} and rope_freqs.weight are set",
                    key("rope.scaling.type")
                )))
            }
            Ok(_) => RopeScaling::Divisors(
                file.dequantize("rope_freqs.weight")?
                    .into_iter()
                    .map(f64::from)
                    .collect(),
            ),
            Err(_) => rope_scaling,
        };
        let vocab_size = match file.get_u64(&key("vocab_size")) {
            Ok(value) => value as usize,
            Err(_) => file
                .tensor("token_embd.weight")?
                .dims
                .get(1)
                .copied()
                .unwrap_or(0),
        };
        let has = |tensor: &str| file.tensor(tensor).is_ok();
        let head_dim = match int("attention.key_length") {
            Ok(size) => size,
            Err(_) if num_heads > 0 && hidden_size.is_multiple_of(num_heads) => {
                hidden_size / num_heads
            }
            Err(_) => {
                return Err(ModelError::Config(format!(
                    "width {hidden_size} is not a multiple of {num_heads} heads"
                )))
            }
        };
        if let Ok(value_size) = int("attention.value_length") {
            if value_size != head_dim {
                return Err(ModelError::Config(format!(
                    "{} {value_size} differs from the key size {head_dim}",
                    key("attention.value_length")
                )));
            }
        }
        let config = Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            qkv_bias: architecture == Architecture::Qwen2 || has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            qk_norm: architecture == Architecture::Qwen3 || has("blk.0.attn_q_norm.weight"),
            sliding_window: None,
            rope_theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: int("context_length").unwrap_or(2048),
            tie_word_embeddings: file.tensor("output.weight").is_err(),
        };
        if let Ok(rotary) = file.get_u64(&key("rope.dimension_count")) {
            if rotary as usize != config.head_dim() {
                return Err(ModelError::Config(format!(
                    "{} {rotary}: rotary embedding on part of a head (size {}) is not supported",
                    key("rope.dimension_count"),
                    config.head_dim()
                )));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a Hugging Face `config.json` (`model_type` `llama`, `mistral`, `qwen2` or
    /// `qwen3`; transformers 4 and 5 layouts).
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct HfConfig {
            model_type: Option<String>,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            rope_theta: Option<f64>,
            /// transformers 4's scaling.
            rope_scaling: Option<serde_json::Value>,
            /// transformers 5 keeps the base and the scaling here.
            rope_parameters: Option<serde_json::Value>,
            attention_bias: Option<bool>,
            mlp_bias: Option<bool>,
            hidden_act: Option<String>,
            rms_norm_eps: f64,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
            head_dim: Option<usize>,
            sliding_window: Option<usize>,
            use_sliding_window: Option<bool>,
            layer_types: Option<Vec<String>>,
            partial_rotary_factor: Option<f64>,
        }
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|error| ModelError::Config(format!("config.json: {error}")))?;
        let model_type = hf.model_type.as_deref().unwrap_or("llama");
        let architecture = Architecture::from_model_type(model_type).ok_or_else(|| {
            ModelError::Config(format!(
                "model_type {model_type:?} is not supported (llama, mistral, qwen2, qwen3)"
            ))
        })?;
        if hf.mlp_bias == Some(true) {
            return Err(ModelError::Config(
                "mlp_bias: biased MLP projections are not supported".into(),
            ));
        }
        if architecture == Architecture::Qwen2 && hf.attention_bias == Some(false) {
            return Err(ModelError::Config(
                "attention_bias false: Qwen2 always has q/k/v biases".into(),
            ));
        }
        if let Some(act) = hf.hidden_act.as_deref().filter(|act| *act != "silu") {
            return Err(ModelError::Config(format!(
                "hidden_act {act:?} is not supported (silu)"
            )));
        }
        if hf.partial_rotary_factor.is_some_and(|factor| factor != 1.0) {
            return Err(ModelError::Config(
                "partial_rotary_factor: rotary embedding on part of a head is not supported".into(),
            ));
        }
        // Qwen's sliding window applies only to some layers when switched on; Mistral's to all.
        let sliding_window = match architecture {
            Architecture::Mistral => hf.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 if hf.use_sliding_window == Some(true) => {
                return Err(ModelError::Config(
                    "use_sliding_window: per-layer sliding-window attention is not supported"
                        .into(),
                ))
            }
            _ => None,
        };
        if let Some(kind) = hf
            .layer_types
            .iter()
            .flatten()
            .find(|kind| *kind != "full_attention")
        {
            return Err(ModelError::Config(format!(
                "layer_types {kind:?}: only full attention in every layer is supported"
            )));
        }
        // transformers 5 writes `rope_parameters`; 4 writes `rope_theta` and `rope_scaling`.
        let rope = hf.rope_parameters.as_ref().filter(|value| !value.is_null());
        let rope_theta = rope
            .and_then(|value| value.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
            .or(hf.rope_theta)
            .unwrap_or(10_000.0);
        let rope_scaling = match (rope, hf.rope_scaling.as_ref().filter(|v| !v.is_null())) {
            (Some(_), Some(_)) => {
                return Err(ModelError::Config(
                    "both rope_parameters and rope_scaling are set".into(),
                ))
            }
            (Some(parameters), None) | (None, Some(parameters)) => RopeScaling::from_hf(
                parameters,
                hf.max_position_embeddings.unwrap_or(2048) as f64,
            )?,
            (None, None) => RopeScaling::None,
        };
        let heads = hf.num_attention_heads;
        let head_dim = match hf.head_dim {
            Some(size) => size,
            None if heads > 0 && hf.hidden_size.is_multiple_of(heads) => hf.hidden_size / heads,
            None => {
                return Err(ModelError::Config(format!(
                    "width {} is not a multiple of {heads} heads",
                    hf.hidden_size
                )))
            }
        };
        let attention_bias = hf.attention_bias.unwrap_or(false);
        let config = Self {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim,
            // Qwen2 biases q, k and v whatever the config says; Llama and Qwen3's
            // `attention_bias` biases all four projections; Mistral has none.
            qkv_bias: match architecture {
                Architecture::Qwen2 => true,
                Architecture::Mistral => false,
                Architecture::Llama | Architecture::Qwen3 => attention_bias,
            },
            o_bias: matches!(architecture, Architecture::Llama | Architecture::Qwen3)
                && attention_bias,
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            rope_theta,
            rope_scaling,
            rms_norm_eps: hf.rms_norm_eps,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` Hugging Face would write for this model (per-frequency divisors, which
    /// only GGUF stores, are left out).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "dynamic",
                "factor": factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::None | RopeScaling::Divisors(_) => serde_json::Value::Null,
        };
        let mut json = serde_json::json!({
            "rope_scaling": rope_scaling,
            "architectures": [self.architecture.class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let fields = json.as_object_mut().expect("an object literal");
        match self.architecture {
            Architecture::Llama | Architecture::Qwen3 => {
                fields.insert("attention_bias".into(), self.o_bias.into());
            }
            Architecture::Mistral => {
                fields.insert("sliding_window".into(), self.sliding_window.into());
            }
            Architecture::Qwen2 => {
                fields.insert("use_sliding_window".into(), false.into());
            }
        }
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(architecture: Architecture) -> LlamaConfig {
        LlamaConfig {
            architecture,
            vocab_size: 100,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            sliding_window: None,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
        }
    }

    #[test]
    fn hf_config_round_trips_for_every_family() {
        let configs = [
            small(Architecture::Llama),
            LlamaConfig {
                qkv_bias: true,
                o_bias: true,
                ..small(Architecture::Llama)
            },
            LlamaConfig {
                head_dim: 12,
                sliding_window: Some(4096),
                ..small(Architecture::Mistral)
            },
            LlamaConfig {
                qkv_bias: true,
                ..small(Architecture::Qwen2)
            },
            LlamaConfig {
                head_dim: 16,
                qk_norm: true,
                ..small(Architecture::Qwen3)
            },
        ];
        for config in configs {
            config.validate().unwrap();
            let text = config.to_hf_json().to_string();
            assert_eq!(LlamaConfig::from_hf_json(&text).unwrap(), config, "{text}");
        }
    }

    #[test]
    fn each_family_reads_its_own_options() {
        let base = r#""vocab_size":10,"hidden_size":32,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-6"#;
        let read = |extra: &str| LlamaConfig::from_hf_json(&format!("{{{base}{extra}}}"));
        // Qwen2's biases come with the family, not from a key.
        let qwen2 =
            read(r#","model_type":"qwen2","use_sliding_window":false,"sliding_window":4096"#)
                .unwrap();
        assert!(qwen2.qkv_bias && !qwen2.o_bias && qwen2.sliding_window.is_none());
        // Qwen3: norms on, heads wider than width / heads.
        let qwen3 = read(r#","model_type":"qwen3","head_dim":16,"layer_types":["full_attention"]"#)
            .unwrap();
        assert!(qwen3.qk_norm && !qwen3.qkv_bias);
        assert_eq!((qwen3.q_size(), qwen3.kv_size()), (64, 32));
        // Mistral: the window is read; a null window is none.
        let mistral = read(r#","model_type":"mistral","sliding_window":4096"#).unwrap();
        assert_eq!(mistral.sliding_window, Some(4096));
        let mistral = read(r#","model_type":"mistral","sliding_window":null"#).unwrap();
        assert_eq!(mistral.sliding_window, None);
        // Llama's attention_bias biases all four projections.
        let llama = read(r#","model_type":"llama","attention_bias":true"#).unwrap();
        assert!(llama.qkv_bias && llama.o_bias);
        for (extra, named) in [
            (
                r#","model_type":"qwen2","use_sliding_window":true"#,
                "use_sliding_window",
            ),
            (
                r#","model_type":"qwen2","attention_bias":false"#,
                "attention_bias",
            ),
            (
                r#","model_type":"qwen3","layer_types":["sliding_attention"]"#,
                "sliding_attention",
            ),
            (r#","model_type":"phi3""#, "\"phi3\""),
            (r#","partial_rotary_factor":0.5"#, "partial_rotary_factor"),
        ] {
            let error = read(extra).unwrap_err().to_string();
            assert!(error.contains(named), "{extra}: {error}");
        }
    }

    fn llama31_8b_rope() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        }
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones() {
        // Llama 3.1 8B: base 500,000, heads of 128.
        let hf = r#"{"model_type":"llama","vocab_size":10,"hidden_size":4096,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":32,"num_key_value_heads":8,
            "rms_norm_eps":1e-5,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3",
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192}}"#;
        let config = LlamaConfig::from_hf_json(hf).unwrap();
        assert_eq!(config.rope_scaling, llama31_8b_rope());
        let plain = LlamaConfig {
            rope_scaling: RopeScaling::None,
            ..config.clone()
        };
        let (scaled, base) = (config.inv_freqs(), plain.inv_freqs());
        assert_eq!(scaled.len(), 64);
        // Wavelength 2π: far shorter than 8192 / 4, unchanged.
        assert_eq!(scaled[0], base[0]);
        // Pair 40: wavelength 2π · 500000^(80/128) ≈ 22,900 > 8192: divided by 8.
        assert_eq!(scaled[40], base[40] / 8.0);
        // Pair 30: wavelength ≈ 2,950, between 2048 and 8192: smooth = (8192/λ − 1) / 3.
        let wavelength = 2.0 * std::f64::consts::PI / base[30];
        assert!((2048.0..8192.0).contains(&wavelength), "{wavelength}");
        let smooth = (8192.0 / wavelength - 1.0) / 3.0;
        let expected = base[30] * ((1.0 - smooth) / 8.0 + smooth);
        assert!((scaled[30] - expected).abs() <= 1e-15 * expected);
        // The GGUF form (a divisor per frequency) gives the same frequencies.
        let divisors: Vec<f64> = base.iter().zip(&scaled).map(|(b, s)| b / s).collect();
        let stored = LlamaConfig {
            rope_scaling: RopeScaling::Divisors(divisors),
            ..config.clone()
        };
        for (a, b) in stored.inv_freqs().iter().zip(&scaled) {
            assert!((a - b).abs() <= 1e-15 * b);
        }
        // And it survives the config.json round trip.
        let again = LlamaConfig::from_hf_json(&config.to_hf_json().to_string()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        // A small Llama saved by transformers 5: the base lives in `rope_parameters`.
        let hf = r#"{"model_type":"llama","vocab_size":10,"hidden_size":32,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"rms_norm_eps":1e-5,
            "rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}}"#;
        let config = LlamaConfig::from_hf_json(hf).unwrap();
        assert_eq!(config.rope_theta, 500_000.0);
        assert_eq!(config.rope_scaling, RopeScaling::None);
        let linear = hf.replace(
            r#""rope_type":"default""#,
            r#""rope_type":"linear","factor":2.0"#,
        );
        let config = LlamaConfig::from_hf_json(&linear).unwrap();
        assert_eq!(config.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let base = LlamaConfig {
            rope_scaling: RopeScaling::None,
            ..config.clone()
        };
        assert_eq!(config.inv_freqs()[3], base.inv_freqs()[3] / 2.0);
    }

    #[test]
    fn dynamic_rope_scaling_is_plain_rope_within_the_original_context() {
        let hf = r#"{"model_type":"llama","vocab_size":10,"hidden_size":32,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"rms_norm_eps":1e-5,
            "max_position_embeddings":4096,"rope_scaling":{"type":"dynamic","factor":2.0}}"#;
        let config = LlamaConfig::from_hf_json(hf).unwrap();
        assert_eq!(
            config.rope_scaling,
            RopeScaling::Dynamic {
                factor: 2.0,
                original_max_position_embeddings: 4096.0
            }
        );
        let plain = LlamaConfig {
            rope_scaling: RopeScaling::None,
            ..config.clone()
        };
        assert_eq!(config.inv_freqs(), plain.inv_freqs());
        let again = LlamaConfig::from_hf_json(&config.to_hf_json().to_string()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn options_this_decoder_lacks_are_named_errors() {
        let base = r#"{"model_type":"llama","vocab_size":10,"hidden_size":32,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"rms_norm_eps":1e-5"#;
        for (extra, named) in [
            (
                r#","rope_scaling":{"rope_type":"yarn","factor":4.0}"#,
                "\"yarn\"",
            ),
            (
                r#","rope_scaling":{"type":"longrope","factor":2.0}"#,
                "\"longrope\"",
            ),
            (
                r#","rope_scaling":{"rope_type":"llama3","factor":8.0}"#,
                "low_freq_factor",
            ),
            (r#","mlp_bias":true"#, "mlp_bias"),
            (r#","hidden_act":"gelu""#, "\"gelu\""),
            (
                r#","rope_scaling":{"rope_type":"linear","factor":2.0},"rope_parameters":{"rope_theta":1.0}"#,
                "both",
            ),
        ] {
            let text = format!("{base}{extra}}}");
            let error = LlamaConfig::from_hf_json(&text).unwrap_err().to_string();
            assert!(error.contains(named), "{extra}: {error}");
        }
        // Explicit defaults are fine.
        let text =
            format!(r#"{base},"attention_bias":false,"hidden_act":"silu","rope_scaling":null}}"#);
        assert!(LlamaConfig::from_hf_json(&text).is_ok());
    }

    /// A GGUF header of a Llama with heads of 8 (4 rotary pairs), changed by `edit`.
    fn from_gguf_with(
        edit: impl FnOnce(&mut crate::gguf::GgufWriter),
    ) -> Result<LlamaConfig, ModelError> {
        use crate::gguf::{GgufWriter, Value};
        let mut writer = GgufWriter::new();
        writer
            .metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.vocab_size", Value::Uint(10))
            .metadata("llama.embedding_length", Value::Uint(32))
            .metadata("llama.feed_forward_length", Value::Uint(8))
            .metadata("llama.block_count", Value::Uint(1))
            .metadata("llama.attention.head_count", Value::Uint(4))
            .metadata("llama.rope.freq_base", Value::Float(10_000.0))
            .metadata("llama.attention.layer_norm_rms_epsilon", Value::Float(1e-5));
        edit(&mut writer);
        let file = Gguf::parse(writer.to_bytes()).expect("a valid file");
        LlamaConfig::from_gguf(&file)
    }

    #[test]
    fn gguf_rope_options_are_read_or_refused_by_name() {
        use crate::gguf::Value;
        assert_eq!(
            from_gguf_with(|_| {}).unwrap().rope_scaling,
            RopeScaling::None
        );
        // Llama 3's divisors, as llama.cpp stores them.
        let config = from_gguf_with(|w| {
            w.tensor_f32("rope_freqs.weight", vec![4], &[1.0, 1.5, 4.0, 8.0]);
        })
        .unwrap();
        assert_eq!(
            config.rope_scaling,
            RopeScaling::Divisors(vec![1.0, 1.5, 4.0, 8.0])
        );
        let plain = LlamaConfig {
            rope_scaling: RopeScaling::None,
            ..config.clone()
        };
        assert_eq!(config.inv_freqs()[3], plain.inv_freqs()[3] / 8.0);
        let linear = from_gguf_with(|w| {
            w.metadata("llama.rope.scaling.type", Value::String("linear".into()))
                .metadata("llama.rope.scaling.factor", Value::Float(4.0));
        })
        .unwrap();
        assert_eq!(linear.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        let refused = |edit: &dyn Fn(&mut crate::gguf::GgufWriter), named: &str| {
            let error = from_gguf_with(edit).unwrap_err().to_string();
            assert!(error.contains(named), "{error}");
        };
        refused(
            &|w| {
                w.metadata("llama.rope.scaling.type", Value::String("yarn".into()));
            },
            "\"yarn\"",
        );
        refused(
            &|w| {
                w.metadata("llama.expert_count", Value::Uint(8));
            },
            "expert_count",
        );
        refused(
            &|w| {
                w.metadata("llama.rope.dimension_count", Value::Uint(4));
            },
            "dimension_count",
        );
        refused(
            &|w| {
                w.tensor_f32("rope_freqs.weight", vec![2], &[1.0, 2.0]);
            },
            "divisors",
        );
        refused(
            &|w| {
                w.tensor_f32("rope_freqs.weight", vec![4], &[1.0, 0.0, 1.0, 1.0]);
            },
            "not usable",
        );
    }

    #[test]
    fn odd_shapes_are_refused() {
        let bad = r#"{"vocab_size":10,"hidden_size":30,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"rms_norm_eps":1e-5}"#;
        let error = LlamaConfig::from_hf_json(bad).unwrap_err().to_string();
        assert!(error.contains("not a multiple"), "{error}");
        let other = r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":32,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"rms_norm_eps":1e-5}"#;
        assert!(LlamaConfig::from_hf_json(other).is_err());
    }
}
