//! The correctness probe a GPU passes before `--backend auto` trusts it: one decoder layer at
//! training shapes, forward and backward, on the device and on the CPU backend.
//!
//! Drivers have been reported to multiply wrongly only past some row count (Metal at `M` of
//! about 500, some AMD and Intel Vulkan drivers), so a small matmul proves nothing. The probe
//! runs what a training step runs, at the shapes it runs them: a SmolLM2-135M layer (width
//! 576, 9 query heads sharing 3 key heads, MLP 1536) on 4 sequences of 128 tokens, with LoRA on
//! q and v, and compares the output, the input's gradient and the adapter's gradients.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use tributary_shared::config::SplitMix64;

use crate::lora::{LoraAdapter, LoraSettings};
use crate::model::checkpoint::{Checkpoint, HostTensor};
use crate::model::{Architecture, Llama, LlamaConfig, ModelError, RopeScaling};

/// Sequences in the probe's batch.
const BATCH: usize = 4;
/// Tokens in each sequence.
const LEN: usize = 128;
/// Largest difference allowed, as a fraction of the largest CPU value of each result.
const TOLERANCE: f32 = 1e-3;

/// The results compared, in the order [`run`] returns them.
const RESULTS: [&str; 4] = [
    "layer output",
    "input gradient",
    "LoRA A gradients",
    "LoRA B gradients",
];

/// Runs the probe on `device` and on the CPU backend; `Err` names the first result that
/// differs by more than 1e-3 of its largest value (or is not finite).
pub fn layer_against_cpu(device: &Device) -> Result<(), String> {
    let gpu = run(device).map_err(|error| format!("probe could not run: {error}"))?;
    let cpu = run(&Device::flex()).map_err(|error| format!("probe could not run: {error}"))?;
    compare(&gpu, &cpu)
}

/// One SmolLM2-135M decoder layer's shape, with a small vocabulary (the probe skips the head).
fn probe_config() -> LlamaConfig {
    LlamaConfig {
        architecture: Architecture::Llama,
        vocab_size: 64,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 1,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        sliding_window: None,
        rope_theta: 100_000.0,
        rope_scaling: RopeScaling::None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: LEN,
        tie_word_embeddings: true,
    }
}

/// Seeded random weights held in memory.
struct RandomCheckpoint {
    config: LlamaConfig,
    weights: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Checkpoint for RandomCheckpoint {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
        let (shape, values) = self
            .weights
            .get(name)
            .ok_or_else(|| ModelError::MissingWeight(name.to_string()))?;
        Ok(HostTensor {
            shape: shape.clone(),
            values: values.clone(),
        })
    }

    fn describe(&self) -> String {
        "the device probe's random layer".to_string()
    }
}

/// The layer's output, the input's gradient and the adapter's gradients on `device`.
fn run(device: &Device) -> Result<Vec<Vec<f32>>, String> {
    let config = probe_config();
    let checkpoint = RandomCheckpoint {
        weights: crate::tiny::random_weights(&config, 0x7072_6f62_6501),
        config: config.clone(),
    };
    let model = Llama::load(&checkpoint, device, LEN).map_err(|e| e.to_string())?;
    let settings = LoraSettings::default();
    let adapter = LoraAdapter::init(&settings, &config, 0x7072_6f62_6502, device)
        .map_err(|e| e.to_string())?;
    let mut rng = SplitMix64(0x7072_6f62_6503);
    let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_unit() - 0.5).collect() };
    // B starts at zero in a fresh adapter; random factors make every path carry a gradient.
    let leaves: Vec<Tensor<2>> = adapter
        .trainable()
        .iter()
        .map(|factor| {
            let dims = factor.dims();
            let data = TensorData::new(values(dims[0] * dims[1]), dims);
            Tensor::<2>::from_data(data, device)
                .autodiff()
                .require_grad()
        })
        .collect();
    let tensors = adapter.with_leaves(&leaves, 0.0, 0);
    let rows = BATCH * LEN;
    let d = config.hidden_size;
    let matrix = |data: Vec<f32>| Tensor::<2>::from_data(TensorData::new(data, [rows, d]), device);
    let x = matrix(values(rows * d)).autodiff().require_grad();
    let weights = matrix(values(rows * d)).autodiff();
    let out = model.decoder_layer(0, x.clone(), Some(&tensors), None, BATCH, LEN, 0);
    let grads = (out.clone() * weights).sum().backward();
    let read = |t: Option<Tensor<2>>| -> Vec<f32> {
        t.and_then(|t| t.into_data().convert::<f32>().try_to_vec::<f32>().ok())
            .unwrap_or_default()
    };
    // Leaves alternate A, B per adapted projection.
    let (mut a_grads, mut b_grads) = (Vec::new(), Vec::new());
    for (i, leaf) in leaves.iter().enumerate() {
        let grad = read(leaf.grad(&grads));
        if grad.is_empty() {
            return Err(format!("LoRA factor {i} got no gradient"));
        }
        if i % 2 == 0 {
            &mut a_grads
        } else {
            &mut b_grads
        }
        .extend(grad);
    }
    Ok(vec![
        read(Some(out.detach().inner())),
        read(x.grad(&grads)),
        a_grads,
        b_grads,
    ])
}

/// The probe's verdict on the device's results against the CPU's, in [`RESULTS`]' order.
fn compare(gpu: &[Vec<f32>], cpu: &[Vec<f32>]) -> Result<(), String> {
    if gpu.len() != RESULTS.len() || cpu.len() != RESULTS.len() {
        return Err("probe results are missing".to_string());
    }
    for (what, (g, c)) in RESULTS.iter().zip(gpu.iter().zip(cpu)) {
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        // A NaN anywhere is as wrong as it gets (`f32::max` would skip it).
        let worst = g.iter().zip(c).fold(0f32, |m, (a, b)| {
            let d = (a - b).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                m.max(d)
            }
        });
        if g.len() != c.len() || c.is_empty() || !scale.is_finite() || worst > TOLERANCE * scale {
            return Err(format!(
                "probe {what} differs from the CPU backend by {worst} (largest value {scale})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_passes_the_cpu_and_names_a_wrong_result() {
        // The CPU backend against itself: every path of the layer runs and agrees.
        let results = run(&Device::flex()).unwrap();
        assert_eq!(compare(&results, &results), Ok(()));
        let sizes: Vec<usize> = results.iter().map(Vec::len).collect();
        // Output and input gradient [512, 576]; A and B of q and v at rank 8.
        assert_eq!(sizes, [512 * 576, 512 * 576, 576 * 8 * 2, 8 * (576 + 192)]);
        assert!(results
            .iter()
            .all(|r| r.iter().all(|v| v.is_finite()) && r.iter().any(|v| *v != 0.0)));
        assert_eq!(layer_against_cpu(&Device::flex()), Ok(()));

        let mut wrong = results.clone();
        wrong[1][7] += 0.01 * wrong[1].iter().fold(0f32, |m, v| m.max(v.abs()));
        let error = compare(&wrong, &results).unwrap_err();
        assert!(error.contains("input gradient"), "{error}");
        let mut empty = results.clone();
        empty[3].clear();
        assert!(compare(&empty, &results).is_err());
        let mut nan = results.clone();
        nan[2][0] = f32::NAN;
        assert!(compare(&nan, &results).unwrap_err().contains("LoRA A"));
    }
}
