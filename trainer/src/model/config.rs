//! The shape of a Llama-family decoder, read from a checkpoint's metadata.

use serde::Deserialize;

use crate::gguf::Gguf;

use super::ModelError;

/// Hyper-parameters that fix a Llama-family decoder's shape and numerics.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
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
    /// Rotary embedding base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Width of the key and value projections.
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim()
    }

    /// Checks that the numbers describe a buildable model.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fail = |what: String| Err(ModelError::Config(what));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return fail("vocab size, width and layer count must be positive".into());
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return fail(format!(
                "width {} is not a multiple of {} heads",
                self.hidden_size, self.num_heads
            ));
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
        Ok(())
    }

    /// Reads the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(file: &Gguf) -> Result<Self, ModelError> {
        let arch = file.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Config(format!(
                "architecture {arch:?} is not supported (only llama)"
            )));
        }
        let int = |key: &str| -> Result<usize, ModelError> {
            Ok(usize::try_from(file.get_u64(&format!("llama.{key}"))?).unwrap_or(usize::MAX))
        };
        let num_heads = int("attention.head_count")?;
        let vocab_size = match file.get_u64("llama.vocab_size") {
            Ok(value) => value as usize,
            Err(_) => file
                .tensor("token_embd.weight")?
                .dims
                .get(1)
                .copied()
                .unwrap_or(0),
        };
        let config = Self {
            vocab_size,
            hidden_size: int("embedding_length")?,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
            rope_theta: file.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_norm_eps: file.get_f64("llama.attention.layer_norm_rms_epsilon")?,
            max_position_embeddings: int("context_length").unwrap_or(2048),
            tie_word_embeddings: file.tensor("output.weight").is_err(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses a Hugging Face `config.json`.
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
            rms_norm_eps: f64,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
            head_dim: Option<usize>,
        }
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|error| ModelError::Config(format!("config.json: {error}")))?;
        if let Some(kind) = hf.model_type.as_deref() {
            if kind != "llama" {
                return Err(ModelError::Config(format!(
                    "model_type {kind:?} is not supported (only llama)"
                )));
            }
        }
        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: hf.rms_norm_eps,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        if let Some(head_dim) = hf.head_dim {
            if head_dim != config.head_dim() {
                return Err(ModelError::Config(format!(
                    "head_dim {head_dim} differs from hidden_size / heads = {}",
                    config.head_dim()
                )));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` Hugging Face would write for this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_round_trips() {
        let config = LlamaConfig {
            vocab_size: 100,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
        };
        let text = config.to_hf_json().to_string();
        assert_eq!(LlamaConfig::from_hf_json(&text).unwrap(), config);
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
