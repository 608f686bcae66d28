//! Local training and evaluation of a LoRA adapter on a frozen base model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::{Batch, Batches, PackedData};
use crate::lora::LoraAdapter;
use crate::loss::{lm_head_loss, lm_head_loss_value};
use crate::model::{AdapterTensors, Llama};
use crate::optim::{AdamW, OptimSettings};

/// How a local run trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one step.
    pub grad_accum: usize,
    /// Seeds batch order and dropout.
    pub seed: u64,
    /// Optimizer and schedule.
    pub optim: OptimSettings,
    /// Keep only each decoder layer's input from the forward pass and recompute the layer's
    /// activations during the backward pass (gradient checkpointing): about a third more
    /// compute for activations of one layer instead of all. The results are the same bits.
    #[serde(default)]
    pub recompute_layers: bool,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            steps: 20,
            batch_size: 4,
            grad_accum: 1,
            seed: 0,
            optim: OptimSettings::default(),
            recompute_layers: false,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based step.
    pub step: u64,
    /// Mean next-token loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens in this step.
    pub tokens: u64,
    /// Wall time of this step.
    pub seconds: f64,
}

/// Mean next-token negative log-likelihood `[1]` of `logits` (`[n, vocab]`) against `targets`
/// (`[n]`).
pub fn lm_loss(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    token_nll(logits, targets).mean()
}

/// Each target's negative log-likelihood, `[n, 1]`.
fn token_nll(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<2> {
    let [n, _] = logits.dims();
    let max = logits.clone().detach().max_dim(1);
    let log_sum_exp = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let picked = logits.gather(1, targets.reshape([n, 1]));
    log_sum_exp - picked
}

/// Mean next-token negative log-likelihood `[1]` over the targets whose `weights` (`[n]`, 1 or
/// 0) are 1: the loss of instruction data, where only the assistant's tokens count. A batch
/// without any counted target has loss 0.
pub fn masked_lm_loss(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Tensor<1>,
    counted: usize,
) -> Tensor<1> {
    let [n, _] = logits.dims();
    (token_nll(logits, targets).reshape([n]) * weights)
        .sum()
        .div_scalar(counted.max(1) as f64)
}

/// Splits `batch` into input tokens `[b, len]` and targets `[b * len]` on the model's device.
fn batch_tensors(model: &Llama, batch: &[&[u32]]) -> (Tensor<2, Int>, Tensor<1, Int>) {
    let len = batch[0].len() - 1;
    let mut inputs = Vec::with_capacity(batch.len() * len);
    let mut targets = Vec::with_capacity(batch.len() * len);
    for sequence in batch {
        inputs.extend(sequence[..len].iter().map(|&t| i64::from(t)));
        targets.extend(sequence[1..].iter().map(|&t| i64::from(t)));
    }
    let device = model.device();
    let n = batch.len();
    (
        Tensor::from_data(TensorData::new(inputs, [n, len]), device),
        Tensor::from_data(TensorData::new(targets, [n * len]), device),
    )
}

/// The batch's loss: every target's when it has no masks, else only the counted ones'. With
/// `with_gradient` it carries its gradient with respect to the adapter ([`lm_head_loss`]).
fn loss_of(
    model: &Llama,
    adapter: Option<&AdapterTensors>,
    batch: &Batch<'_>,
    with_gradient: bool,
) -> Tensor<1> {
    let (inputs, targets) = batch_tensors(model, &batch.sequences);
    let hidden = model.hidden_states(inputs, adapter, None);
    head_loss(model, hidden, targets, batch, with_gradient)
}

/// The loss of the final normalised hidden states `hidden` against `targets`, as [`loss_of`].
fn head_loss(
    model: &Llama,
    hidden: Tensor<2>,
    targets: Tensor<1, Int>,
    batch: &Batch<'_>,
    with_gradient: bool,
) -> Tensor<1> {
    let loss = if with_gradient {
        lm_head_loss
    } else {
        lm_head_loss_value
    };
    let head = model.lm_head_weight();
    let head_rows = model.lm_head_rows();
    match &batch.masks {
        None => {
            let n = hidden.dims()[0];
            loss(hidden, &head, head_rows.as_ref(), targets, None, n)
        }
        Some(masks) => {
            let weights: Vec<f32> = masks
                .iter()
                .flat_map(|mask| mask.iter().map(|&on| if on { 1.0 } else { 0.0 }))
                .collect();
            let n = weights.len();
            let weights = Tensor::from_data(TensorData::new(weights, [n]), model.device());
            loss(
                hidden,
                &head,
                head_rows.as_ref(),
                targets,
                Some(weights),
                batch.target_tokens(),
            )
        }
    }
}

/// Trains `adapter` on `data` for `settings.steps` optimizer steps, calling `on_step` after each.
/// Seeded and reproducible on the CPU backend.
pub fn train(
    model: &Llama,
    adapter: &mut LoraAdapter,
    data: &PackedData,
    settings: &TrainSettings,
    on_step: impl FnMut(&StepReport),
) -> Vec<StepReport> {
    train_until(
        model,
        adapter,
        data,
        settings,
        &AtomicBool::new(false),
        on_step,
    )
}

/// [`train`], stopping early (after the step in progress) once `stop` is set.
pub fn train_until(
    model: &Llama,
    adapter: &mut LoraAdapter,
    data: &PackedData,
    settings: &TrainSettings,
    stop: &AtomicBool,
    mut on_step: impl FnMut(&StepReport),
) -> Vec<StepReport> {
    let mut batches = Batches::new(data, settings.seed);
    let mut optimizer = AdamW::new(settings.optim.clone(), &adapter.trainable());
    let dropout = f64::from(adapter.settings().dropout);
    let accum = settings.grad_accum.max(1);
    let mut reports = Vec::with_capacity(settings.steps as usize);
    for step in 0..settings.steps {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let started = Instant::now();
        let params = adapter.trainable();
        let mut grads: Option<Vec<Tensor<2>>> = None;
        // Read back once the step's work is queued, not after each backward pass (a host sync
        // on a GPU).
        let mut losses = Vec::with_capacity(accum);
        let mut tokens = 0u64;
        for micro_step in 0..accum {
            let batch = batches.next_batch(settings.batch_size.max(1));
            tokens += batch.target_tokens() as u64;
            let dropout_seed = settings.seed ^ (step << 20) ^ micro_step as u64 ^ 0x6472_6f70;
            let (loss, micro) = if settings.recompute_layers {
                let (inputs, targets) = batch_tensors(model, &batch.sequences);
                crate::recompute::loss_and_gradients(
                    model,
                    adapter,
                    &params,
                    inputs,
                    dropout,
                    dropout_seed,
                    |hidden| head_loss(model, hidden, targets, &batch, true),
                )
            } else {
                let leaves: Vec<Tensor<2>> = params
                    .iter()
                    .map(|p| p.clone().autodiff().require_grad())
                    .collect();
                let tensors = adapter.with_leaves(&leaves, dropout, dropout_seed);
                let loss = loss_of(model, Some(&tensors), &batch, true);
                let gradients = loss.backward();
                let micro = crate::recompute::gradients_of(&leaves, &gradients);
                (loss.detach(), micro)
            };
            losses.push(loss);
            grads = Some(match grads {
                None => micro,
                Some(sum) => sum.into_iter().zip(micro).map(|(a, b)| a + b).collect(),
            });
        }
        let grads: Vec<Tensor<2>> = grads
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.div_scalar(accum as f64))
            .collect();
        let lr = settings.optim.lr_at(step, settings.steps);
        let (updated, grad_norm) = optimizer.step(params, grads, lr);
        adapter.set_trainable(updated);
        let loss_sum: f64 = losses
            .into_iter()
            .map(|loss| f64::from(loss.into_scalar::<f32>()))
            .sum();
        let report = StepReport {
            step: step + 1,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        };
        on_step(&report);
        reports.push(report);
    }
    reports
}

/// Held-out quality of a model (with or without an adapter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Mean next-token negative log-likelihood (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Target tokens scored.
    pub tokens: u64,
}

/// Mean next-token loss over `data` (every sequence once), in batches of `batch_size`; at most
/// `max_sequences` sequences when given.
pub fn evaluate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    data: &PackedData,
    batch_size: usize,
    max_sequences: Option<usize>,
) -> EvalReport {
    let tensors = adapter.map(LoraAdapter::tensors);
    let take = max_sequences
        .unwrap_or(usize::MAX)
        .min(data.sequences.len());
    let mut total = 0.0f64;
    let mut tokens = 0u64;
    let indices: Vec<usize> = (0..take).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = data.batch(chunk);
        let loss: f32 = loss_of(model, tensors.as_ref(), &batch, false).into_scalar();
        let n = batch.target_tokens() as u64;
        total += f64::from(loss) * n as f64;
        tokens += n;
    }
    let loss = if tokens == 0 {
        f64::NAN
    } else {
        total / tokens as f64
    };
    EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
    }
}

/// Greedy or temperature sampling of up to `max_new` tokens after `prompt`, with a KV cache;
/// stops at `eos`.
pub fn generate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    max_new: usize,
    temperature: f64,
    seed: u64,
    eos: Option<u32>,
) -> Vec<u32> {
    let tensors = adapter.map(LoraAdapter::tensors);
    let device = model.device();
    let mut rng = tributary_shared::config::SplitMix64(seed);
    let mut cache = crate::model::KvCache::default();
    let room = model.max_positions().saturating_sub(prompt.len());
    let mut out = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    for _ in 0..max_new.min(room) {
        let ids: Vec<i64> = input.iter().map(|&t| i64::from(t)).collect();
        let len = ids.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), device);
        let logits = model.forward(tokens, tensors.as_ref(), Some(&mut cache));
        let vocab = model.config().vocab_size;
        let last: Vec<f32> = logits
            .slice([0..1, len - 1..len, 0..vocab])
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        let next = pick(&last, temperature, &mut rng);
        out.push(next);
        if Some(next) == eos {
            break;
        }
        input = vec![next];
    }
    out
}

fn pick(logits: &[f32], temperature: f64, rng: &mut tributary_shared::config::SplitMix64) -> u32 {
    let argmax = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32);
    if temperature <= 0.0 {
        return argmax;
    }
    let max = logits[argmax as usize] as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut target = f64::from(rng.next_unit()) * total;
    for (index, weight) in weights.iter().enumerate() {
        target -= weight;
        if target <= 0.0 {
            return index as u32;
        }
    }
    argmax
}

/// Formats a duration as `1h02m`, `3m05s` or `12s`.
pub fn format_eta(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn masked_loss_counts_only_the_kept_targets_and_gives_the_others_no_gradient() {
        let device = Device::flex();
        let values: Vec<f32> = (0..12).map(|i| ((i * 7) % 5) as f32 * 0.3 - 0.5).collect();
        let logits = || {
            Tensor::<2>::from_data(TensorData::new(values.clone(), [4, 3]), &device)
                .autodiff()
                .require_grad()
        };
        let targets =
            Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2, 1, 1], [4]), &device);
        let weights =
            Tensor::<1>::from_data(TensorData::new(vec![0.0f32, 1.0, 0.0, 1.0], [4]), &device);
        let leaf = logits();
        let masked = masked_lm_loss(leaf.clone(), targets.clone(), weights, 2);
        // The same as the plain loss over rows 1 and 3 alone.
        let kept = |t: Tensor<2>| {
            Tensor::cat(
                vec![t.clone().slice([1..2, 0..3]), t.slice([3..4, 0..3])],
                0,
            )
        };
        let kept_targets =
            Tensor::<1, Int>::from_data(TensorData::new(vec![2i64, 1], [2]), &device);
        let plain = lm_loss(kept(logits()), kept_targets);
        let (a, b): (f32, f32) = (
            masked.clone().detach().into_scalar(),
            plain.detach().into_scalar(),
        );
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        let gradients = masked.backward();
        let grad = leaf
            .grad(&gradients)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert!(
            grad[0..3].iter().chain(&grad[6..9]).all(|g| *g == 0.0),
            "{grad:?}"
        );
        assert!(grad[3..6].iter().any(|g| *g != 0.0));
        // Nothing counted: zero, not NaN.
        let none = Tensor::<1>::zeros([4], &device);
        let zero: f32 = masked_lm_loss(logits(), targets, none, 0)
            .detach()
            .into_scalar();
        assert_eq!(zero, 0.0);
    }
}
