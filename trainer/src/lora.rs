//! LoRA adapters: their settings, their tensors on the device, and their conversion to and from
//! the shared crate's [`Delta`] in PEFT's layout (`lora_A.weight` `[rank, in]`, `lora_B.weight`
//! `[out, rank]`), which is what the coordinator aggregates and what the hub publishes.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tributary_shared::config::AdapterSpec;
use tributary_shared::delta::{Delta, NamedTensor};
use tributary_shared::peft::{self, AdapterConfig};

use crate::model::{transpose, AdapterTensors, LlamaConfig, LoraPair, Target};

/// Which LoRA factors train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraMode {
    /// Train `A` and `B` (classic LoRA).
    #[default]
    Full,
    /// Keep `A` frozen at its seeded initial value and train `B` only (FFA-LoRA): averaging `B`
    /// across trainers is then exactly averaging the weight updates, and uploads are half the size.
    FreezeA,
}

/// How an adapter is shaped and trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    /// Rank of the factors.
    pub rank: usize,
    /// Scale numerator: the update is `alpha / rank · A B`.
    pub alpha: f32,
    /// Dropout on the LoRA branch's input while training.
    pub dropout: f32,
    /// Adapted projections.
    pub targets: Vec<Target>,
    /// Which factors train.
    pub mode: LoraMode,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec![Target::Q, Target::V],
            mode: LoraMode::Full,
        }
    }
}

/// An adapter that does not fit the model or the settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// The settings are unusable.
    #[error("LoRA settings: {0}")]
    Settings(String),
    /// A tensor is missing or mis-shaped.
    #[error("adapter does not match the model: {0}")]
    Mismatch(String),
    /// The PEFT files could not be read or written.
    #[error("PEFT adapter: {0}")]
    Peft(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl LoraSettings {
    /// The shared crate's description of this adapter on `model`.
    pub fn spec(&self, model: &LlamaConfig) -> Result<AdapterSpec, LoraError> {
        if self.rank == 0 || self.targets.is_empty() {
            return Err(LoraError::Settings(
                "rank and the target list must be non-empty".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Settings(format!(
                "dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        let mut targets = self.targets.clone();
        targets.sort();
        targets.dedup();
        Ok(AdapterSpec::Lora {
            layers: model.num_layers as u32,
            hidden_size: model.hidden_size as u32,
            kv_size: model.kv_size() as u32,
            q_size: (model.q_size() != model.hidden_size).then_some(model.q_size() as u32),
            intermediate_size: model.intermediate_size as u32,
            rank: self.rank as u32,
            alpha: self.alpha,
            targets: targets.iter().map(|t| t.peft_name().to_string()).collect(),
        })
    }

    /// The settings a PEFT `adapter_config.json` describes.
    pub fn from_peft(config: &AdapterConfig) -> Result<Self, LoraError> {
        let targets = config
            .target_modules
            .iter()
            .map(|name| {
                Target::parse(name)
                    .ok_or_else(|| LoraError::Settings(format!("unknown target module {name:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unsupported = config.unsupported();
        if !unsupported.is_empty() {
            return Err(LoraError::Settings(format!(
                "adapter_config.json sets options this trainer does not implement: {}",
                unsupported.join(", ")
            )));
        }
        Ok(Self {
            rank: config.r as usize,
            alpha: config.lora_alpha,
            dropout: config.lora_dropout,
            targets,
            mode: LoraMode::Full,
        })
    }
}

fn peft_prefix(layer: usize, target: Target) -> String {
    let parent = match target {
        Target::Q | Target::K | Target::V | Target::O => "self_attn",
        Target::Gate | Target::Up | Target::Down => "mlp",
    };
    format!(
        "base_model.model.model.layers.{layer}.{parent}.{}",
        target.peft_name()
    )
}

/// An adapter's factors on a device (plain tensors; training makes autodiff leaves of them).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    settings: LoraSettings,
    config: LlamaConfig,
    /// Per layer, per target: `a` `[in, rank]`, `b` `[rank, out]`.
    pairs: Vec<[Option<LoraPair>; 7]>,
}

impl LoraAdapter {
    /// The seeded initial adapter (`A` Kaiming-uniform as PEFT draws it, `B` zero), identical to
    /// the coordinator's round-0 adapter for the same seed.
    pub fn init(
        settings: &LoraSettings,
        config: &LlamaConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, LoraError> {
        let spec = settings.spec(config)?;
        let delta = spec
            .initial_adapter(seed)
            .map_err(|error| LoraError::Settings(error.to_string()))?;
        Self::from_delta(&delta, settings, config, device)
    }

    /// Uploads a PEFT-layout delta; every target in `settings` must be present with its shape.
    pub fn from_delta(
        delta: &Delta,
        settings: &LoraSettings,
        config: &LlamaConfig,
        device: &Device,
    ) -> Result<Self, LoraError> {
        let spec = settings.spec(config)?;
        let layout = spec
            .layout()
            .map_err(|error| LoraError::Settings(error.to_string()))?;
        delta
            .check_layout(&layout)
            .map_err(|error| LoraError::Mismatch(error.to_string()))?;
        delta
            .check_finite()
            .map_err(|error| LoraError::Mismatch(error.to_string()))?;
        let rank = settings.rank;
        let mut pairs: Vec<[Option<LoraPair>; 7]> = vec![Default::default(); config.num_layers];
        for (layer, slots) in pairs.iter_mut().enumerate() {
            for &target in &settings.targets {
                let (d_in, d_out) = target.dims(config);
                let prefix = peft_prefix(layer, target);
                let get = |suffix: &str| {
                    let name = format!("{prefix}.{suffix}");
                    delta
                        .get(&name)
                        .ok_or_else(|| LoraError::Mismatch(format!("{name} is missing")))
                };
                let a = get("lora_A.weight")?;
                let b = get("lora_B.weight")?;
                let a = transpose(a.values(), rank, d_in);
                let b = transpose(b.values(), d_out, rank);
                slots[target.index()] = Some(LoraPair {
                    a: Tensor::from_data(TensorData::new(a, [d_in, rank]), device),
                    b: Tensor::from_data(TensorData::new(b, [rank, d_out]), device),
                });
            }
        }
        Ok(Self {
            settings: settings.clone(),
            config: config.clone(),
            pairs,
        })
    }

    /// Downloads the factors as a PEFT-layout delta.
    pub fn to_delta(&self) -> Delta {
        let rank = self.settings.rank;
        let mut tensors = Vec::new();
        for (layer, slots) in self.pairs.iter().enumerate() {
            for target in Target::ALL {
                let Some(pair) = &slots[target.index()] else {
                    continue;
                };
                let (d_in, d_out) = target.dims(&self.config);
                let read = |t: &Tensor<2>| {
                    t.clone()
                        .into_data()
                        .try_to_vec::<f32>()
                        .unwrap_or_default()
                };
                let prefix = peft_prefix(layer, target);
                let a = transpose(&read(&pair.a), d_in, rank);
                let b = transpose(&read(&pair.b), rank, d_out);
                tensors.push(
                    NamedTensor::new(format!("{prefix}.lora_A.weight"), vec![rank, d_in], a)
                        .expect("shape matches the values"),
                );
                tensors.push(
                    NamedTensor::new(format!("{prefix}.lora_B.weight"), vec![d_out, rank], b)
                        .expect("shape matches the values"),
                );
            }
        }
        Delta::new(tensors).expect("adapter tensor names are unique")
    }

    /// Changes which factors train from now on.
    pub fn set_mode(&mut self, mode: LoraMode) {
        self.settings.mode = mode;
    }

    /// The settings this adapter was made with.
    pub fn settings(&self) -> &LoraSettings {
        &self.settings
    }

    /// The factors as a forward pass takes them, without dropout (evaluation, generation).
    pub fn tensors(&self) -> AdapterTensors {
        AdapterTensors {
            scale: f64::from(self.settings.alpha) / self.settings.rank as f64,
            dropout: 0.0,
            dropout_rng: std::cell::RefCell::new(tributary_shared::config::SplitMix64(0)),
            pairs: self.pairs.clone(),
        }
    }

    /// The trainable factors, in a fixed order (layer, target, `a` before `b`); with
    /// [`LoraMode::FreezeA`] only the `b`s.
    pub fn trainable(&self) -> Vec<Tensor<2>> {
        let mut out = Vec::new();
        for slots in &self.pairs {
            for pair in slots.iter().flatten() {
                if self.settings.mode == LoraMode::Full {
                    out.push(pair.a.clone());
                }
                out.push(pair.b.clone());
            }
        }
        out
    }

    /// Replaces the trainable factors with `values` (same order as [`LoraAdapter::trainable`]).
    pub fn set_trainable(&mut self, values: Vec<Tensor<2>>) {
        let full = self.settings.mode == LoraMode::Full;
        let mut values = values.into_iter();
        for slots in &mut self.pairs {
            for pair in slots.iter_mut().flatten() {
                if full {
                    pair.a = values.next().expect("one value per trainable factor");
                }
                pair.b = values.next().expect("one value per trainable factor");
            }
        }
    }

    /// Forward-pass tensors whose trainable factors are `leaves` (autodiff tensors that require
    /// gradients), with `dropout` masks drawn from `dropout_seed`.
    pub fn with_leaves(
        &self,
        leaves: &[Tensor<2>],
        dropout: f64,
        dropout_seed: u64,
    ) -> AdapterTensors {
        let mut tensors = self.tensors();
        tensors.dropout = dropout;
        tensors.dropout_rng =
            std::cell::RefCell::new(tributary_shared::config::SplitMix64(dropout_seed));
        let full = self.settings.mode == LoraMode::Full;
        let mut leaves = leaves.iter();
        for slots in &mut tensors.pairs {
            for pair in slots.iter_mut().flatten() {
                if full {
                    pair.a = leaves
                        .next()
                        .expect("one leaf per trainable factor")
                        .clone();
                }
                pair.b = leaves
                    .next()
                    .expect("one leaf per trainable factor")
                    .clone();
            }
        }
        tensors
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), LoraError> {
        let io = |path: &Path, source| LoraError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let spec = self.settings.spec(&self.config)?;
        let mut config = AdapterConfig::from_spec(&spec, base_model)
            .map_err(|error| LoraError::Peft(error.to_string()))?;
        config.lora_dropout = self.settings.dropout;
        let bytes =
            peft::to_safetensors(&self.to_delta()).map_err(|e| LoraError::Peft(e.to_string()))?;
        let weights = dir.join("adapter_model.safetensors");
        std::fs::write(&weights, bytes).map_err(|e| io(&weights, e))?;
        let config_path = dir.join("adapter_config.json");
        std::fs::write(&config_path, config.to_json()).map_err(|e| io(&config_path, e))?;
        Ok(())
    }

    /// Reads a PEFT adapter folder for `config`'s model.
    pub fn load_peft(dir: &Path, config: &LlamaConfig, device: &Device) -> Result<Self, LoraError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| LoraError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        let config_text = String::from_utf8(read("adapter_config.json")?)
            .map_err(|_| LoraError::Peft("adapter_config.json is not UTF-8".into()))?;
        let peft_config =
            AdapterConfig::from_json(&config_text).map_err(|e| LoraError::Peft(e.to_string()))?;
        let settings = LoraSettings::from_peft(&peft_config)?;
        let delta = peft::from_safetensors(&read("adapter_model.safetensors")?)
            .map_err(|e| LoraError::Peft(e.to_string()))?;
        Self::from_delta(&delta, &settings, config, device)
    }
}
