//! The Llama-family decoder in burn: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU
//! MLP, tied or untied output head, and a KV cache for generation. The options that make it
//! Mistral (sliding window), Qwen2 (q/k/v biases) or Qwen3 (per-head query/key RMSNorm, wide
//! heads) come from [`LlamaConfig`].
//!
//! The base weights are plain (non-autodiff) tensors: autodiff treats them as constants, so they
//! get no gradients and no optimizer state. LoRA factors come in per call through
//! [`AdapterTensors`], which is how training makes only them autodiff leaves.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use std::cell::RefCell;

use burn::tensor::{activation, Bool, Device, Int, Tensor, TensorData};
use tributary_shared::config::SplitMix64;

use super::checkpoint::{Checkpoint, HostTensor};
use super::{transpose, LlamaConfig, ModelError, Target};

/// The frozen base model on a device.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor<2>,
    layers: Vec<Layer>,
    norm: Tensor<1>,
    /// `[hidden, vocab]`.
    lm_head: Tensor<2>,
    rope: Rope,
    device: Device,
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor<1>,
    /// Projections stored `[in, out]`, so a projection is `x @ w`.
    q: Tensor<2>,
    k: Tensor<2>,
    v: Tensor<2>,
    o: Tensor<2>,
    ffn_norm: Tensor<1>,
    gate: Tensor<2>,
    up: Tensor<2>,
    down: Tensor<2>,
    /// Per-target biases ([`Target::index`]; only q, k, v and o ever have one).
    biases: [Option<Tensor<1>>; 7],
    /// Per-head RMSNorm weights of queries and keys (`[head_dim]`, Qwen3).
    q_norm: Option<Tensor<1>>,
    k_norm: Option<Tensor<1>>,
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

/// Loads `name`, checks it is `[out, in]`, and uploads it transposed to `[in, out]`.
fn load_projection(
    checkpoint: &dyn Checkpoint,
    name: &str,
    out: usize,
    inp: usize,
    device: &Device,
) -> Result<Tensor<2>, ModelError> {
    let host = checkpoint.load(name)?;
    expect_shape(name, &host, &[out, inp])?;
    let values = transpose(&host.values, out, inp);
    Ok(Tensor::from_data(
        TensorData::new(values, [inp, out]),
        device,
    ))
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
    /// Loads every weight from `checkpoint` onto `device`, one tensor at a time. `max_positions`
    /// bounds the rotary tables (the longest sequence this instance will see).
    pub fn load(
        checkpoint: &dyn Checkpoint,
        device: &Device,
        max_positions: usize,
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
        let embed_host = checkpoint.load("model.embed_tokens.weight")?;
        expect_shape("model.embed_tokens.weight", &embed_host, &[vocab, d])?;
        let lm_head_values = if config.tie_word_embeddings {
            transpose(&embed_host.values, vocab, d)
        } else {
            let head = checkpoint.load("lm_head.weight")?;
            expect_shape("lm_head.weight", &head, &[vocab, d])?;
            transpose(&head.values, vocab, d)
        };
        let lm_head = Tensor::from_data(TensorData::new(lm_head_values, [d, vocab]), device);
        let embed = upload(embed_host, device);
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let name = |leaf: &str| format!("model.layers.{i}.{leaf}.weight");
            let proj = |leaf: &str, out: usize, inp: usize| {
                load_projection(checkpoint, &name(leaf), out, inp, device)
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
        let mut out = vec![read2(&self.embed), read2(&self.lm_head), read1(&self.norm)];
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
            for w in [
                &layer.q,
                &layer.k,
                &layer.v,
                &layer.o,
                &layer.gate,
                &layer.up,
                &layer.down,
            ] {
                out.push(read2(w));
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
        hidden.matmul(self.lm_head.clone())
    }

    /// The LM head's weight `[hidden, vocab]`.
    pub fn lm_head_weight(&self) -> &Tensor<2> {
        &self.lm_head
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
        let ids = tokens.reshape([batch * len]);
        let mut x = self.embed.clone().select(0, ids);
        for (index, layer) in self.layers.iter().enumerate() {
            let lora = adapter.map(|a| (a, &a.pairs[index]));
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[index]);
            let normed = rms_norm(x.clone(), &layer.attn_norm, self.config.rms_norm_eps);
            let attn = self.attention(layer, normed, lora, slot, batch, len, start);
            x = x + attn;
            let normed = rms_norm(x.clone(), &layer.ffn_norm, self.config.rms_norm_eps);
            let gate = project(normed.clone(), &layer.gate, None, lora, Target::Gate);
            let up = project(normed, &layer.up, None, lora, Target::Up);
            let act = activation::silu(gate) * up;
            x = x + project(act, &layer.down, None, lora, Target::Down);
        }
        if let Some(cache) = cache {
            cache.seen = start + len;
        }
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
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
        let window = self.config.sliding_window.filter(|window| *window < total);
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
        let out = attention(q, k, v, mask, None, options);
        let merged = out.swap_dims(1, 2).reshape([batch * len, heads * head_dim]);
        project(merged, &layer.o, bias(Target::O), lora, Target::O)
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

fn rms_norm(x: Tensor<2>, weight: &Tensor<1>, eps: f64) -> Tensor<2> {
    let [_, d] = x.dims();
    let scale = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    x * scale * weight.clone().reshape([1, d])
}

/// `x @ w + bias`, plus the LoRA branch for `target` when the adapter has one.
fn project(
    x: Tensor<2>,
    w: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    lora: Option<(&AdapterTensors, &[Option<LoraPair>; 7])>,
    target: Target,
) -> Tensor<2> {
    let base = x.clone().matmul(w.clone());
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
