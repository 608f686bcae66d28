//! The Llama-family decoder in burn: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU
//! MLP, tied or untied output head, and a KV cache for generation. The options that make it
//! Mistral (sliding window), Qwen2 (q/k/v biases) or Qwen3 (per-head query/key RMSNorm, wide
//! heads) come from [`LlamaConfig`].
//!
//! The base weights are plain (non-autodiff) tensors: autodiff treats them as constants, so they
//! get no gradients and no optimizer state. LoRA factors come in per call through
//! [`AdapterTensors`], which is how training makes only them autodiff leaves. The large base
//! weights (projections, token embeddings, output head) are either dense on the device or kept
//! in the file's quantized blocks and dequantized per use ([`BaseStorage`], [`FrozenWeight`]);
//! both give the same bits.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use std::cell::RefCell;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use tributary_shared::config::SplitMix64;

use std::sync::Arc;

use super::blocks::QuantizedMatrix;
use super::checkpoint::{Checkpoint, HostTensor};
use super::device_blocks::DeviceBlocks;
use super::frozen::FrozenWeight;
use super::norm::rms_norm;
use super::{transpose, LlamaConfig, ModelError, Target};

/// How the base model's large weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseStorage {
    /// Dense f32 on the device: fastest, 4 bytes a weight.
    #[default]
    Dense,
    /// In the file's quantized blocks (GGUF types other than f32), dequantized per use: memory
    /// follows the file's size (QLoRA). Weights a file stores as f32 stay dense. On the CPU the
    /// blocks stay on the host; on a GPU the types [`DeviceBlocks`] takes are uploaded and
    /// dequantized there, the others on the host.
    Blocks,
    /// As [`BaseStorage::Blocks`], with the blocks [`DeviceBlocks`] takes on the device whatever
    /// it is (the CPU included: for tests of the GPU's path).
    DeviceBlocks,
}

impl BaseStorage {
    /// Whether blocks are kept on `device` (where their type allows).
    fn blocks_on_device(self, device: &Device) -> bool {
        match self {
            Self::Dense => false,
            Self::Blocks => crate::device::backend_name(device) != "burn flex",
            Self::DeviceBlocks => true,
        }
    }
}

/// The token embeddings `[vocab, hidden]`.
// A tensor handle is large (a dispatch enum); a model holds a few dozen of these.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Embeddings {
    Dense(Tensor<2>),
    Blocks(Arc<QuantizedMatrix>),
    DeviceBlocks(Arc<DeviceBlocks>),
}

/// The frozen base model on a device.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed: Embeddings,
    layers: Vec<Layer>,
    norm: Tensor<1>,
    /// `[hidden, vocab]`.
    lm_head: FrozenWeight,
    rope: Rope,
    device: Device,
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor<1>,
    /// Projections stored `[in, out]`, so a projection is `x @ w`.
    q: FrozenWeight,
    k: FrozenWeight,
    v: FrozenWeight,
    o: FrozenWeight,
    ffn_norm: Tensor<1>,
    gate: FrozenWeight,
    up: FrozenWeight,
    down: FrozenWeight,
    /// Per-target biases ([`Target::index`]; only q, k, v and o ever have one).
    biases: [Option<Tensor<1>>; 7],
    /// Per-head RMSNorm weights of queries and keys (`[head_dim]`, Qwen3).
    q_norm: Option<Tensor<1>>,
    k_norm: Option<Tensor<1>>,
}

impl Layer {
    /// The seven projections, in [`Target::ALL`]'s order.
    fn projections(&self) -> [&FrozenWeight; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

/// One LoRA pair on the device: `a` is `[in, rank]`, `b` is `[rank, out]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down projection.
    pub a: Tensor<2>,
    /// Up projection.
    pub b: Tensor<2>,
}

/// The LoRA factors a forward pass applies: `y = x w + scale · dropout(x) a b`.
#[derive(Debug, Clone)]
pub struct AdapterTensors {
    /// `alpha / rank`.
    pub scale: f64,
    /// Probability of zeroing an input of the LoRA branch (training only).
    pub dropout: f64,
    /// Draws the dropout masks (on the host, so a seed fixes them whatever else uses the device).
    pub dropout_rng: RefCell<SplitMix64>,
    /// Per layer, per target module (indexed by [`Target::index`]).
    pub pairs: Vec<[Option<LoraPair>; 7]>,
}

/// Cached keys and values of earlier positions, per layer (`[batch, kv_heads, seen, head_dim]`).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    seen: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.seen
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }
}

/// Rotary embedding tables in Hugging Face's rotate-half convention.
#[derive(Debug, Clone)]
struct Rope {
    /// `[positions, head_dim]`.
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    fn new(config: &LlamaConfig, positions: usize, device: &Device) -> Self {
        let head_dim = config.head_dim();
        let inv_freqs = config.inv_freqs();
        let mut cos = Vec::with_capacity(positions * head_dim);
        let mut sin = Vec::with_capacity(positions * head_dim);
        for position in 0..positions {
            let row: Vec<f64> = inv_freqs
                .iter()
                .map(|inv_freq| position as f64 * inv_freq)
                .collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|angle| angle.cos() as f32));
                sin.extend(row.iter().map(|angle| angle.sin() as f32));
            }
        }
        let table = |values: Vec<f32>| {
            Tensor::<2>::from_data(TensorData::new(values, [positions, head_dim]), device)
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// Rotates `x` (`[batch, heads, len, head_dim]`) for positions `start..start + len`.
    fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let [batch, heads, len, head_dim] = x.dims();
        let half = head_dim / 2;
        let cos = self
            .cos
            .clone()
            .slice([start..start + len, 0..head_dim])
            .reshape([1, 1, len, head_dim]);
        let sin = self
            .sin
            .clone()
            .slice([start..start + len, 0..head_dim])
            .reshape([1, 1, len, head_dim]);
        let first = x.clone().slice([0..batch, 0..heads, 0..len, 0..half]);
        let second = x
            .clone()
            .slice([0..batch, 0..heads, 0..len, half..head_dim]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos + rotated * sin
    }
}

fn upload<const D: usize>(host: HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(host.values, host.shape), device)
}

/// `name`'s blocks when `storage` keeps blocks and the checkpoint has them for `name`, checked
/// to be `[out, in]` and to hold only finite values.
fn load_blocks(
    checkpoint: &dyn Checkpoint,
    name: &str,
    out: usize,
    inp: usize,
    storage: BaseStorage,
) -> Result<Option<Arc<QuantizedMatrix>>, ModelError> {
    if storage == BaseStorage::Dense {
        return Ok(None);
    }
    let Some(blocks) = checkpoint.blocks(name)? else {
        return Ok(None);
    };
    if blocks.dims() != (out, inp) {
        let (rows, cols) = blocks.dims();
        return Err(ModelError::Shape {
            name: name.to_string(),
            expected: vec![out, inp],
            found: vec![rows, cols],
        });
    }
    if !blocks.all_finite() {
        return Err(ModelError::Format(format!(
            "{name} holds NaN or infinite values"
        )));
    }
    Ok(Some(Arc::new(blocks)))
}

/// Loads `name`, checks it is `[out, in]`, and keeps it as `storage` says: in blocks, or
/// uploaded transposed to `[in, out]`.
fn load_projection(
    checkpoint: &dyn Checkpoint,
    name: &str,
    out: usize,
    inp: usize,
    device: &Device,
    storage: BaseStorage,
) -> Result<FrozenWeight, ModelError> {
    if let Some(blocks) = load_blocks(checkpoint, name, out, inp, storage)? {
        return Ok(frozen_blocks(blocks, device, storage));
    }
    let host = checkpoint.load(name)?;
    expect_shape(name, &host, &[out, inp])?;
    let values = transpose(&host.values, out, inp);
    Ok(FrozenWeight::Dense(Tensor::from_data(
        TensorData::new(values, [inp, out]),
        device,
    )))
}

/// Blocks kept on `device` when `storage` says so and their type allows, else on the host.
fn frozen_blocks(
    blocks: Arc<QuantizedMatrix>,
    device: &Device,
    storage: BaseStorage,
) -> FrozenWeight {
    if storage.blocks_on_device(device) {
        if let Some(on_device) = DeviceBlocks::upload(&blocks, device) {
            return FrozenWeight::DeviceBlocks(Arc::new(on_device));
        }
    }
    FrozenWeight::Blocks(blocks)
}

fn expect_shape(name: &str, host: &HostTensor, shape: &[usize]) -> Result<(), ModelError> {
    if host.shape != shape || host.values.len() != shape.iter().product::<usize>() {
        return Err(ModelError::Shape {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: host.shape.clone(),
        });
    }
    if host.values.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::Format(format!(
            "{name} holds NaN or infinite values"
        )));
    }
    Ok(())
}

fn load_vector(
    checkpoint: &dyn Checkpoint,
    name: &str,
    len: usize,
    device: &Device,
) -> Result<Tensor<1>, ModelError> {
    let host = checkpoint.load(name)?;
    expect_shape(name, &host, &[len])?;
    Ok(upload(host, device))
}

impl Llama {
    /// Loads every weight from `checkpoint` onto `device`, one tensor at a time, dense.
    /// `max_positions` bounds the rotary tables (the longest sequence this instance will see).
    pub fn load(
        checkpoint: &dyn Checkpoint,
        device: &Device,
        max_positions: usize,
    ) -> Result<Self, ModelError> {
        Self::load_as(checkpoint, device, max_positions, BaseStorage::Dense)
    }

    /// [`Llama::load`], holding the large weights as `storage` says.
    pub fn load_as(
        checkpoint: &dyn Checkpoint,
        device: &Device,
        max_positions: usize,
        storage: BaseStorage,
    ) -> Result<Self, ModelError> {
        let config = checkpoint.config().clone();
        config.validate()?;
        if let crate::model::RopeScaling::Dynamic {
            original_max_position_embeddings: context,
            ..
        } = config.rope_scaling
        {
            if max_positions as f64 > context {
                return Err(ModelError::Config(format!(
                    "dynamic RoPE scaling changes positions past {context}; sequences here are \
                     limited to that context, and {max_positions} positions were asked for"
                )));
            }
        }
        let (d, q_size, kv, ffn, vocab) = (
            config.hidden_size,
            config.q_size(),
            config.kv_size(),
            config.intermediate_size,
            config.vocab_size,
        );
        let embed_name = "model.embed_tokens.weight";
        // The embeddings, and the head too when it is tied to them.
        let tie = config.tie_word_embeddings;
        let (embed, tied_head) = match load_blocks(checkpoint, embed_name, vocab, d, storage)? {
            Some(blocks) => match frozen_blocks(blocks.clone(), device, storage) {
                FrozenWeight::DeviceBlocks(on_device) => {
                    let head = tie.then(|| FrozenWeight::DeviceBlocks(on_device.clone()));
                    (Embeddings::DeviceBlocks(on_device), head)
                }
                _ => {
                    let head = tie.then(|| FrozenWeight::Blocks(blocks.clone()));
                    (Embeddings::Blocks(blocks), head)
                }
            },
            None => {
                let host = checkpoint.load(embed_name)?;
                expect_shape(embed_name, &host, &[vocab, d])?;
                let head = tie.then(|| {
                    let values = transpose(&host.values, vocab, d);
                    FrozenWeight::Dense(Tensor::from_data(
                        TensorData::new(values, [d, vocab]),
                        device,
                    ))
                });
                (Embeddings::Dense(upload(host, device)), head)
            }
        };
        let lm_head = match tied_head {
            Some(head) => head,
            None => load_projection(checkpoint, "lm_head.weight", vocab, d, device, storage)?,
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let name = |leaf: &str| format!("model.layers.{i}.{leaf}.weight");
            let proj = |leaf: &str, out: usize, inp: usize| {
                load_projection(checkpoint, &name(leaf), out, inp, device, storage)
            };
            let mut biases: [Option<Tensor<1>>; 7] = Default::default();
            for (target, on) in [
                (Target::Q, config.qkv_bias),
                (Target::K, config.qkv_bias),
                (Target::V, config.qkv_bias),
                (Target::O, config.o_bias),
            ] {
                if on {
                    let bias = format!("model.layers.{i}.self_attn.{}.bias", target.peft_name());
                    let (_, out) = target.dims(&config);
                    biases[target.index()] = Some(load_vector(checkpoint, &bias, out, device)?);
                }
            }
            let head_norm =
                |leaf: &str| load_vector(checkpoint, &name(leaf), config.head_dim(), device);
            layers.push(Layer {
                attn_norm: load_vector(checkpoint, &name("input_layernorm"), d, device)?,
                q: proj("self_attn.q_proj", q_size, d)?,
                k: proj("self_attn.k_proj", kv, d)?,
                v: proj("self_attn.v_proj", kv, d)?,
                o: proj("self_attn.o_proj", d, q_size)?,
                ffn_norm: load_vector(checkpoint, &name("post_attention_layernorm"), d, device)?,
                gate: proj("mlp.gate_proj", ffn, d)?,
                up: proj("mlp.up_proj", ffn, d)?,
                down: proj("mlp.down_proj", d, ffn)?,
                biases,
                q_norm: config
                    .qk_norm
                    .then(|| head_norm("self_attn.q_norm"))
                    .transpose()?,
                k_norm: config
                    .qk_norm
                    .then(|| head_norm("self_attn.k_norm"))
                    .transpose()?,
            });
        }
        let norm = load_vector(checkpoint, "model.norm.weight", d, device)?;
        let positions = max_positions.max(1);
        Ok(Self {
            rope: Rope::new(&config, positions, device),
            config,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest sequence (cache included) the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.rope.cos.dims()[0]
    }

    /// Every base weight, flattened, in a fixed order (for tests that prove training leaves the
    /// base untouched).
    pub fn base_weights(&self) -> Vec<Vec<f32>> {
        let read2 = |t: &Tensor<2>| {
            t.clone()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        };
        let read1 = |t: &Tensor<1>| {
            t.clone()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        };
        let embed = match &self.embed {
            Embeddings::Dense(w) => read2(w),
            Embeddings::Blocks(blocks) => blocks.dequantize(),
            Embeddings::DeviceBlocks(blocks) => read2(&blocks.dequantize()),
        };
        let dense = |w: &FrozenWeight| read2(&w.to_dense(&self.device));
        let mut out = vec![embed, dense(&self.lm_head), read1(&self.norm)];
        for layer in &self.layers {
            out.push(read1(&layer.attn_norm));
            out.push(read1(&layer.ffn_norm));
            for vector in layer
                .biases
                .iter()
                .chain([&layer.q_norm, &layer.k_norm])
                .flatten()
            {
                out.push(read1(vector));
            }
            for w in layer.projections() {
                out.push(dense(w));
            }
        }
        out
    }

    /// Logits `[batch, len, vocab]` for `tokens` (`[batch, len]`), continuing after what `cache`
    /// holds (and extending it) when one is given.
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        adapter: Option<&AdapterTensors>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [batch, len] = tokens.dims();
        let hidden = self.hidden_states(tokens, adapter, cache);
        self.lm_head(hidden)
            .reshape([batch, len, self.config.vocab_size])
    }

    /// Logits `[n, vocab]` of final hidden states `[n, hidden]`.
    pub fn lm_head(&self, hidden: Tensor<2>) -> Tensor<2> {
        self.lm_head.project(hidden)
    }

    /// The LM head's weight `[hidden, vocab]`, dense (a transient copy when the base is kept
    /// in blocks).
    pub fn lm_head_weight(&self) -> Tensor<2> {
        self.lm_head.to_dense(&self.device)
    }

    /// The LM head's transpose `[vocab, hidden]`, contiguous, when the model holds it anyway:
    /// the dense embedding matrix of a model whose head is tied to it.
    pub fn lm_head_rows(&self) -> Option<Tensor<2>> {
        match (&self.embed, self.config.tie_word_embeddings) {
            (Embeddings::Dense(embed), true) => Some(embed.clone()),
            _ => None,
        }
    }

    /// Bytes the base model's weights hold, wherever they are kept.
    pub fn base_bytes(&self) -> usize {
        let vector = |t: &Tensor<1>| t.dims()[0] * std::mem::size_of::<f32>();
        let embed = match &self.embed {
            Embeddings::Dense(w) => w.shape().num_elements() * std::mem::size_of::<f32>(),
            Embeddings::Blocks(blocks) => blocks.byte_len(),
            Embeddings::DeviceBlocks(blocks) => blocks.byte_len(),
        };
        let tied = matches!(
            (&self.embed, &self.lm_head),
            (Embeddings::Blocks(_), FrozenWeight::Blocks(_))
                | (Embeddings::DeviceBlocks(_), FrozenWeight::DeviceBlocks(_))
        ) && self.config.tie_word_embeddings;
        let head = if tied { 0 } else { self.lm_head.byte_len() };
        let layers: usize = self
            .layers
            .iter()
            .map(|layer| {
                layer
                    .projections()
                    .iter()
                    .map(|w| w.byte_len())
                    .sum::<usize>()
                    + vector(&layer.attn_norm)
                    + vector(&layer.ffn_norm)
            })
            .sum();
        embed + head + layers + vector(&self.norm)
    }

    /// The final normalised hidden states `[batch * len, hidden]`.
    pub fn hidden_states(
        &self,
        tokens: Tensor<2, Int>,
        adapter: Option<&AdapterTensors>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<2> {
        let [batch, len] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.seen);
        assert!(
            start + len <= self.max_positions(),
            "sequence of {} positions exceeds the model's {} (raise max_positions)",
            start + len,
            self.max_positions()
        );
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers.resize(self.layers.len(), None);
        }
        let mut x = self.embed(tokens.reshape([batch * len]));
        for index in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[index]);
            x = self.decoder_layer(index, x, adapter, slot, batch, len, start);
        }
        if let Some(cache) = cache {
            cache.seen = start + len;
        }
        self.final_norm(x)
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The last layer's output `[n, hidden]`, normalised: what the LM head reads.
    pub fn final_norm(&self, x: Tensor<2>) -> Tensor<2> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    /// Decoder layer `index` on `x` (`[batch * len, hidden]`, positions from `start`), with the
    /// adapter's pairs of that layer, and the layer's slot of a KV cache when generating.
    #[allow(clippy::too_many_arguments)]
    pub fn decoder_layer(
        &self,
        index: usize,
        x: Tensor<2>,
        adapter: Option<&AdapterTensors>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        batch: usize,
        len: usize,
        start: usize,
    ) -> Tensor<2> {
        let layer = &self.layers[index];
        let lora = adapter.map(|a| (a, &a.pairs[index]));
        let normed = rms_norm(x.clone(), &layer.attn_norm, self.config.rms_norm_eps);
        let attn = self.attention(layer, normed, lora, cache, batch, len, start);
        let x = x + attn;
        let normed = rms_norm(x.clone(), &layer.ffn_norm, self.config.rms_norm_eps);
        let gate = project(normed.clone(), &layer.gate, None, lora, Target::Gate);
        let up = project(normed, &layer.up, None, lora, Target::Up);
        let act = super::swiglu::swiglu(gate, up);
        x + project(act, &layer.down, None, lora, Target::Down)
    }

    /// The embeddings `[n, hidden]` of `ids` (`[n]`).
    pub fn embed(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        match &self.embed {
            Embeddings::Dense(w) => w.clone().select(0, ids),
            Embeddings::DeviceBlocks(blocks) => blocks.dequantize_rows(ids),
            Embeddings::Blocks(blocks) => {
                let (vocab, d) = blocks.dims();
                let ids: Vec<usize> = ids
                    .into_data()
                    .convert::<i64>()
                    .try_into_vec::<i64>()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|id| usize::try_from(id).unwrap_or(usize::MAX).min(vocab))
                    .collect();
                assert!(
                    ids.iter().all(|id| *id < vocab),
                    "token id past the vocabulary of {vocab}"
                );
                let n = ids.len();
                Tensor::from_data(
                    TensorData::new(blocks.dequantize_rows(&ids), [n, d]),
                    &self.device.clone().inner(),
                )
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: Tensor<2>,
        lora: Option<(&AdapterTensors, &[Option<LoraPair>; 7])>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        batch: usize,
        len: usize,
        start: usize,
    ) -> Tensor<2> {
        let heads = self.config.num_heads;
        let kv_heads = self.config.num_kv_heads;
        let head_dim = self.config.head_dim();
        let eps = self.config.rms_norm_eps;
        // Heads split off, each normalised on its own when the model has query/key norms.
        let split = |t: Tensor<2>, n: usize, norm: Option<&Tensor<1>>| -> Tensor<4> {
            let t = match norm {
                Some(weight) => rms_norm(t.reshape([batch * len * n, head_dim]), weight, eps),
                None => t,
            };
            t.reshape([batch, len, n, head_dim]).swap_dims(1, 2)
        };
        let bias = |target: Target| layer.biases[target.index()].as_ref();
        let q = project(x.clone(), &layer.q, bias(Target::Q), lora, Target::Q);
        let k = project(x.clone(), &layer.k, bias(Target::K), lora, Target::K);
        let v = project(x, &layer.v, bias(Target::V), lora, Target::V);
        let q = split(q, heads, layer.q_norm.as_ref());
        let k = split(k, kv_heads, layer.k_norm.as_ref());
        let v = split(v, kv_heads, None);
        let q = self.rope.apply(q, start);
        let mut k = self.rope.apply(k, start);
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((past_k, past_v)) = slot.take() {
                k = Tensor::cat(vec![past_k, k], 2);
                v = Tensor::cat(vec![past_v, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let total = k.dims()[2];
        let window = self.config.sliding_window.filter(|window| *window < total);
        let merge = |out: Tensor<4>| {
            let merged = out.swap_dims(1, 2).reshape([batch * len, heads * head_dim]);
            project(merged, &layer.o, bias(Target::O), lora, Target::O)
        };
        if window.is_none() && start == 0 && len > 1 && total == len {
            if let Some(out) = super::attention::causal_attention(&q, &k, &v) {
                return merge(out);
            }
        }
        let group = heads / kv_heads;
        let widen = |t: Tensor<4>| -> Tensor<4> {
            if group == 1 {
                t
            } else {
                t.unsqueeze_dim::<5>(2)
                    .expand([batch, kv_heads, group, total, head_dim])
                    .reshape([batch, heads, total, head_dim])
            }
        };
        let (k, v) = (widen(k), widen(v));
        let (mask, is_causal) = if window.is_some() || (start > 0 && len > 1) {
            (
                Some(causal_mask(batch, heads, len, start, window, &self.device)),
                false,
            )
        } else {
            (None, len > 1)
        };
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal,
        };
        merge(attention(q, k, v, mask, None, options))
    }
}

/// `true` where query `i` (at position `start + i`) must not see key `j`: keys after it, and
/// with a sliding `window` keys `window` or more positions before it.
fn causal_mask(
    batch: usize,
    heads: usize,
    len: usize,
    start: usize,
    window: Option<usize>,
    device: &Device,
) -> Tensor<4, Bool> {
    let total = start + len;
    let mut values = Vec::with_capacity(len * total);
    for i in 0..len {
        let position = start + i;
        for j in 0..total {
            let too_old = window.is_some_and(|window| position >= j + window);
            values.push(j > position || too_old);
        }
    }
    Tensor::<2, Bool>::from_data(TensorData::new(values, [len, total]), device)
        .reshape([1, 1, len, total])
        .expand([batch, heads, len, total])
}

/// `x @ w + bias`, plus the LoRA branch for `target` when the adapter has one.
fn project(
    x: Tensor<2>,
    w: &FrozenWeight,
    bias: Option<&Tensor<1>>,
    lora: Option<(&AdapterTensors, &[Option<LoraPair>; 7])>,
    target: Target,
) -> Tensor<2> {
    let base = w.project(x.clone());
    let base = match bias {
        Some(bias) => {
            let out = bias.dims()[0];
            base + bias.clone().reshape([1, out])
        }
        None => base,
    };
    let Some((adapter, pairs)) = lora else {
        return base;
    };
    let Some(pair) = &pairs[target.index()] else {
        return base;
    };
    let input = if adapter.dropout > 0.0 {
        let dims = x.dims();
        let values = dropout_mask(
            &mut adapter.dropout_rng.borrow_mut(),
            dims[0] * dims[1],
            adapter.dropout,
        );
        let mask = Tensor::<2>::from_data(TensorData::new(values, dims), &x.device().inner());
        x * mask
    } else {
        x
    };
    base + input
        .matmul(pair.a.clone())
        .matmul(pair.b.clone())
        .mul_scalar(adapter.scale)
}

/// `n` values, each `1 / (1 - p)` with probability `1 - p` and 0 otherwise (16-bit resolution).
fn dropout_mask(rng: &mut SplitMix64, n: usize, p: f64) -> Vec<f32> {
    let keep = 1.0 - p;
    let threshold = (keep * 65536.0).round() as u32;
    let kept = (1.0 / keep) as f32;
    let mut out = Vec::with_capacity(n + 3);
    while out.len() < n {
        let bits = rng.next_u64();
        for lane in 0..4 {
            let draw = ((bits >> (16 * lane)) & 0xFFFF) as u32;
            out.push(if draw < threshold { kept } else { 0.0 });
        }
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_keeps_the_expected_fraction_and_mean() {
        let mut rng = SplitMix64(1);
        let mask = dropout_mask(&mut rng, 100_000, 0.1);
        let kept = mask.iter().filter(|v| **v > 0.0).count() as f64 / 1e5;
        assert!((kept - 0.9).abs() < 0.01, "{kept}");
        let mean = mask.iter().map(|v| f64::from(*v)).sum::<f64>() / 1e5;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
    }
}
