//! Adapters in the layout the ecosystem already uses: PEFT's `adapter_model.safetensors` plus
//! `adapter_config.json`.
//!
//! Tensor names are PEFT's saved names, which are also Tributary's adapter names
//! (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, shape `[rank, d_in]`;
//! `lora_B` `[d_out, rank]`), so conversion is a change of container, not of layout. Everything
//! here works on bytes in memory; writing the files is the caller's job.
//!
//! ```
//! use tributary_shared::config::AdapterSpec;
//! use tributary_shared::peft::{from_safetensors, to_safetensors, AdapterConfig};
//!
//! let spec = AdapterSpec::Lora {
//!     layers: 1, hidden_size: 8, kv_size: 4, q_size: None, intermediate_size: 16, rank: 2, alpha: 4.0,
//!     targets: vec!["q_proj".into(), "v_proj".into()],
//! };
//! let adapter = spec.initial_adapter(7).unwrap();
//! let bytes = to_safetensors(&adapter).unwrap();
//! assert_eq!(from_safetensors(&bytes).unwrap(), adapter);
//! let config = AdapterConfig::from_spec(&spec, "HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
//! assert_eq!(config.r, 2);
//! ```

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::AdapterSpec;
use crate::delta::{Delta, DeltaError, NamedTensor};

/// A PEFT file that cannot be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
    /// The safetensors container is malformed.
    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),
    /// A tensor is not f32 (f16 and bf16 are converted; other types are refused).
    #[error("tensor {name:?} has dtype {dtype}, expected a float type")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The tensors do not form a valid delta.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// The adapter is not a LoRA adapter.
    #[error("only LoRA adapters have a PEFT form")]
    NotLora,
    /// `adapter_config.json` does not parse.
    #[error("adapter_config.json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes an adapter as `adapter_model.safetensors` bytes (f32, little-endian).
pub fn to_safetensors(adapter: &Delta) -> Result<Vec<u8>, PeftError> {
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = adapter
        .tensors()
        .iter()
        .map(|tensor| {
            let bytes = tensor
                .values()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (tensor.name().to_owned(), tensor.shape().to_vec(), bytes)
        })
        .collect();
    let mut views = Vec::with_capacity(buffers.len());
    for (name, shape, bytes) in &buffers {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes)?,
        ));
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_owned(), "pt".to_owned());
    Ok(safetensors::serialize(
        views,
        Some(metadata.into_iter().collect()),
    )?)
}

/// Decodes `adapter_model.safetensors` bytes (f32, f16 or bf16 tensors) into an adapter.
pub fn from_safetensors(bytes: &[u8]) -> Result<Delta, PeftError> {
    let file = safetensors::SafeTensors::deserialize(bytes)?;
    let mut tensors = Vec::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(PeftError::Dtype {
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        tensors.push(NamedTensor::new(name, view.shape().to_vec(), values)?);
    }
    Ok(Delta::new(tensors)?)
}

/// PEFT's `adapter_config.json` for a LoRA adapter (the fields PEFT reads when loading).
///
/// Reading accepts what PEFT itself writes (`null` where a value is unset). Options that would
/// make PEFT build a different adapter than the plain one Tributary trains are read too, so
/// [`AdapterConfig::unsupported`] can name them; they are never written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub task_type: String,
    /// The base model, as a hub id or path.
    #[serde(default, deserialize_with = "null_as_default")]
    pub base_model_name_or_path: String,
    /// LoRA rank.
    pub r: u32,
    /// LoRA alpha; the scale is `lora_alpha / r`.
    pub lora_alpha: f32,
    /// Dropout used in training.
    #[serde(default, deserialize_with = "null_as_default")]
    pub lora_dropout: f32,
    /// Adapted modules.
    pub target_modules: Vec<String>,
    /// Bias handling (`none`).
    #[serde(default = "no_bias", deserialize_with = "null_as_no_bias")]
    pub bias: String,
    /// Whether weights are stored transposed (`false` for Llama's `Linear`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Loaded for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// rsLoRA scaling (`false`: the scale is alpha / r).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (`false`).
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module ranks (must be empty here).
    #[serde(default, skip_serializing, deserialize_with = "null_as_default")]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    /// Per-module alphas (must be empty here).
    #[serde(default, skip_serializing, deserialize_with = "null_as_default")]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    /// Only some layers adapted (must be unset here).
    #[serde(default, skip_serializing)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// Whole modules trained and saved beside the adapter (must be unset here).
    #[serde(default, skip_serializing)]
    pub modules_to_save: Option<serde_json::Value>,
    /// A bias on the LoRA B factor (must be `false` here).
    #[serde(default, skip_serializing)]
    pub lora_bias: bool,
    /// Adapted parameters rather than modules (must be unset here).
    #[serde(default, skip_serializing)]
    pub target_parameters: Option<serde_json::Value>,
    /// Embedding rows trained beside the adapter (must be unset here).
    #[serde(default, skip_serializing)]
    pub trainable_token_indices: Option<serde_json::Value>,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn no_bias() -> String {
    "none".into()
}

fn null_as_no_bias<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_else(no_bias))
}

impl AdapterConfig {
    /// The config describing adapters made from `spec`.
    pub fn from_spec(spec: &AdapterSpec, base_model: &str) -> Result<Self, PeftError> {
        let AdapterSpec::Lora {
            rank,
            alpha,
            targets,
            ..
        } = spec
        else {
            return Err(PeftError::NotLora);
        };
        Ok(Self {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            base_model_name_or_path: base_model.to_owned(),
            r: *rank,
            lora_alpha: *alpha,
            lora_dropout: 0.0,
            target_modules: targets.clone(),
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            use_rslora: false,
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            modules_to_save: None,
            lora_bias: false,
            target_parameters: None,
            trainable_token_indices: None,
        })
    }

    /// The options set in this config that make PEFT build something other than plain LoRA
    /// with one rank and one alpha on every target module of every layer, each named.
    pub fn unsupported(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let set = |value: &Option<serde_json::Value>| value.as_ref().is_some_and(|v| !v.is_null());
        for (name, on) in [
            ("use_dora", self.use_dora),
            ("use_rslora", self.use_rslora),
            ("fan_in_fan_out", self.fan_in_fan_out),
            ("bias", self.bias != "none"),
            ("lora_bias", self.lora_bias),
            ("rank_pattern", !self.rank_pattern.is_empty()),
            ("alpha_pattern", !self.alpha_pattern.is_empty()),
            ("layers_to_transform", set(&self.layers_to_transform)),
            ("modules_to_save", set(&self.modules_to_save)),
            ("target_parameters", set(&self.target_parameters)),
            (
                "trainable_token_indices",
                set(&self.trainable_token_indices),
            ),
        ] {
            if on {
                out.push(name);
            }
        }
        if self.peft_type != "LORA" {
            out.push("peft_type");
        }
        out
    }

    /// Pretty JSON, as PEFT writes it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the config has only serializable fields")
    }

    /// Parses `adapter_config.json` (unknown PEFT fields are ignored).
    pub fn from_json(text: &str) -> Result<Self, PeftError> {
        Ok(serde_json::from_str(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AdapterSpec {
        AdapterSpec::Lora {
            layers: 2,
            hidden_size: 8,
            kv_size: 4,
            q_size: None,
            intermediate_size: 16,
            rank: 2,
            alpha: 16.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        }
    }

    #[test]
    fn safetensors_round_trip_is_exact() {
        let mut adapter = spec().initial_adapter(3).unwrap();
        for tensor in adapter.tensors_mut() {
            for (i, v) in tensor.values_mut().iter_mut().enumerate() {
                *v += i as f32 * 0.25;
            }
        }
        let bytes = to_safetensors(&adapter).unwrap();
        let again = from_safetensors(&bytes).unwrap();
        assert_eq!(again, adapter);
        assert!(from_safetensors(&bytes[..bytes.len() - 1]).is_err());
        assert!(from_safetensors(b"not safetensors").is_err());
    }

    #[test]
    fn config_names_rank_alpha_and_targets() {
        let config = AdapterConfig::from_spec(&spec(), "base").unwrap();
        let json = config.to_json();
        assert!(json.contains("\"peft_type\": \"LORA\""), "{json}");
        assert!(json.contains("\"lora_alpha\": 16.0"), "{json}");
        assert_eq!(AdapterConfig::from_json(&json).unwrap(), config);
        let synthetic = AdapterSpec::Synthetic {
            params: 4,
            tensors: 1,
        };
        assert!(matches!(
            AdapterConfig::from_spec(&synthetic, "x"),
            Err(PeftError::NotLora)
        ));
        assert!(config.unsupported().is_empty());
        assert!(!json.contains("rank_pattern"), "{json}");
    }

    #[test]
    fn what_peft_writes_is_read_and_options_that_change_the_adapter_are_named() {
        // PEFT 0.21 writes nulls for unset fields and many options Tributary does not use.
        let written = r#"{"peft_type":"LORA","task_type":null,"base_model_name_or_path":null,
            "r":4,"lora_alpha":8,"lora_dropout":0.0,"bias":"none","fan_in_fan_out":false,
            "inference_mode":true,"use_rslora":false,"use_dora":false,"rank_pattern":{},
            "alpha_pattern":{},"layers_to_transform":null,"modules_to_save":null,
            "lora_bias":false,"target_parameters":null,"trainable_token_indices":null,
            "loftq_config":{},"target_modules":["q_proj","v_proj"]}"#;
        let config = AdapterConfig::from_json(written).unwrap();
        assert_eq!((config.r, config.base_model_name_or_path.as_str()), (4, ""));
        assert!(config.unsupported().is_empty());
        for (change, named) in [
            (r#""rank_pattern":{}"#, r#""rank_pattern":{"q_proj":8}"#),
            (
                r#""layers_to_transform":null"#,
                r#""layers_to_transform":[0]"#,
            ),
            (
                r#""modules_to_save":null"#,
                r#""modules_to_save":["lm_head"]"#,
            ),
            (r#""bias":"none""#, r#""bias":"all""#),
            (r#""use_dora":false"#, r#""use_dora":true"#),
        ] {
            let text = written.replace(change, named);
            let config = AdapterConfig::from_json(&text).unwrap();
            let key = named.split('"').nth(1).unwrap();
            assert_eq!(config.unsupported(), [key], "{text}");
        }
    }
}
