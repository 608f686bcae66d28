//! The wgpu backend against the CPU backend on the tiny model: the same forward pass and the same
//! short training run must agree within float tolerance.
//!
//! Compiled only with the `wgpu` feature (the default) and run only when `TRIBUTARY_WGPU_TEST=1`: a broken Vulkan
//! driver can kill the process (a segfault is not a panic), so CI cannot just try it. Run it with
//! `TRIBUTARY_WGPU_TEST=1 cargo test -p tributary-trainer --features wgpu --test wgpu_backend`.
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, Int, Tensor, TensorData};
use tributary_trainer::data::PackedData;
use tributary_trainer::device::{self, BackendChoice};
use tributary_trainer::lora::{LoraAdapter, LoraSettings};
use tributary_trainer::model::checkpoint::GgufCheckpoint;
use tributary_trainer::model::{Llama, Target};
use tributary_trainer::optim::OptimSettings;
use tributary_trainer::tiny;
use tributary_trainer::tokenizer::TextTokenizer;
use tributary_trainer::train::{train, TrainSettings};

fn enabled() -> bool {
    let on = std::env::var("TRIBUTARY_WGPU_TEST").is_ok_and(|v| v == "1");
    if !on {
        eprintln!(
            "skipped: set TRIBUTARY_WGPU_TEST=1 where a working Vulkan/Metal/DX12 device exists"
        );
    }
    on
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The GPU `device::select` picks (named on stderr) and the CPU.
fn devices() -> (Device, Device) {
    let (gpu, name) = device::select(BackendChoice::Gpu).expect("a working GPU device");
    eprintln!("device: {name}");
    (gpu, Device::flex())
}

/// The tiny model written to a fresh folder (kept alive by the returned guard).
fn tiny_model() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny::write_gguf(&path, 11).unwrap();
    (dir, path)
}

#[test]
fn wgpu_forward_and_training_match_the_cpu() {
    if !enabled() {
        return;
    }
    let (gpu, cpu) = devices();
    let (_dir, path) = tiny_model();
    let checkpoint = GgufCheckpoint::open(&path).unwrap();
    let tokenizer = TextTokenizer::from_gguf(checkpoint.gguf()).unwrap();
    let on_cpu = Llama::load(&checkpoint, &cpu, 256).unwrap();
    let on_gpu = Llama::load(&checkpoint, &gpu, 256).unwrap();

    let ids = tokenizer
        .encode("the king is here, then the winter")
        .unwrap();
    let input = |device: &Device| -> Tensor<2, Int> {
        let data: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
        Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
    };
    let logits = |model: &Llama, device: &Device| -> Vec<f32> {
        model
            .forward(input(device), None, None)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let forward_diff = max_diff(&logits(&on_cpu, &cpu), &logits(&on_gpu, &gpu));
    eprintln!("forward: max |cpu - gpu| = {forward_diff:e}");
    assert!(forward_diff < 1e-3, "forward differs by {forward_diff}");

    let data = PackedData::pack(
        &[tiny::client_text(0, 60).into()],
        &tokenizer,
        32,
        tokenizer.eos,
    )
    .unwrap();
    let lora = LoraSettings {
        rank: 4,
        dropout: 0.1,
        targets: vec![Target::Q, Target::V, Target::Up],
        ..LoraSettings::default()
    };
    let settings = TrainSettings {
        steps: 6,
        batch_size: 4,
        grad_accum: 1,
        seed: 3,
        optim: OptimSettings {
            lr: 1e-2,
            warmup_steps: 2,
            ..OptimSettings::default()
        },
        recompute_layers: false,
    };
    let initial = LoraAdapter::init(&lora, on_cpu.config(), 1, &cpu)
        .unwrap()
        .to_delta();
    let run = |model: &Llama, device: &Device| {
        let mut adapter = LoraAdapter::init(&lora, model.config(), 1, device).unwrap();
        let losses: Vec<f64> = train(model, &mut adapter, &data, &settings, |_| {})
            .iter()
            .map(|r| r.loss)
            .collect();
        (losses, adapter.to_delta())
    };
    let (cpu_losses, cpu_delta) = run(&on_cpu, &cpu);
    let (gpu_losses, gpu_delta) = run(&on_gpu, &gpu);
    eprintln!("losses cpu {cpu_losses:?}\nlosses gpu {gpu_losses:?}");
    for (step, (a, b)) in cpu_losses.iter().zip(&gpu_losses).enumerate() {
        assert!(
            (a - b).abs() < 1e-3 * a.abs().max(1.0),
            "step {step}: {a} vs {b}"
        );
    }
    assert!(
        cpu_losses.last() < cpu_losses.first(),
        "training did not lower the loss"
    );
    let mut worst = 0.0f32;
    for (a, b) in cpu_delta.tensors().iter().zip(gpu_delta.tensors()) {
        assert_eq!(a.name(), b.name());
        worst = worst.max(max_diff(a.values(), b.values()));
    }
    eprintln!("adapter after training: max |cpu - gpu| = {worst:e}");
    assert!(worst < 1e-3, "adapters differ by {worst}");
    // The same task trained on the two backends is an honest replicated pair: its two training
    // deltas must agree under the default spot re-execution tolerance, with room to spare.
    let training_delta = |after: &tributary_shared::Delta| {
        let mut delta = after.clone();
        delta.add_scaled(&initial, -1.0).unwrap();
        delta
    };
    let comparison = tributary_shared::replica::compare(
        &training_delta(&cpu_delta),
        &training_delta(&gpu_delta),
    );
    eprintln!(
        "training delta, cpu against gpu: relative L2 distance {:e}, cosine {}",
        comparison.distance, comparison.cosine
    );
    let tolerance = tributary_shared::config::VerificationSection::default();
    assert!(
        comparison.distance < tolerance.max_distance / 2.0
            && comparison.cosine > 1.0 - (1.0 - tolerance.min_cosine) / 2.0,
        "a CPU and a GPU trainer would be near or past the replica tolerance: {comparison:?}"
    );
}

#[test]
fn a_base_in_blocks_trains_on_wgpu_as_the_dense_base_on_the_cpu() {
    if !enabled() {
        return;
    }
    use tributary_trainer::model::{frozen, BaseStorage};
    let (gpu, cpu) = devices();
    let (dir, path) = tiny_model();
    let file = tributary_trainer::gguf::Gguf::open(&path).unwrap();
    let quantized = dir.path().join("tiny-q.gguf");
    let writer =
        tributary_trainer::gguf::requantize(&file, tributary_trainer::gguf::TensorType::Q4_K)
            .unwrap();
    std::fs::write(&quantized, writer.to_bytes()).unwrap();
    let checkpoint = GgufCheckpoint::open(&quantized).unwrap();
    let tokenizer = TextTokenizer::from_gguf(checkpoint.gguf()).unwrap();
    let on_cpu = Llama::load_as(&checkpoint, &cpu, 256, BaseStorage::Dense).unwrap();
    let on_gpu = Llama::load_as(&checkpoint, &gpu, 256, BaseStorage::Blocks).unwrap();
    assert!(on_gpu.base_bytes() * 3 < on_cpu.base_bytes());

    let data = PackedData::pack(
        &[tiny::client_text(1, 60).into()],
        &tokenizer,
        32,
        tokenizer.eos,
    )
    .unwrap();
    let lora = LoraSettings {
        rank: 4,
        dropout: 0.1,
        targets: vec![Target::Q, Target::V, Target::Down],
        ..LoraSettings::default()
    };
    let run = |model: &Llama, device: &Device, recompute_layers: bool| {
        let settings = TrainSettings {
            steps: 4,
            batch_size: 4,
            grad_accum: 1,
            seed: 5,
            optim: OptimSettings {
                lr: 1e-2,
                warmup_steps: 1,
                ..OptimSettings::default()
            },
            recompute_layers,
        };
        let mut adapter = LoraAdapter::init(&lora, model.config(), 2, device).unwrap();
        let losses: Vec<f64> = train(model, &mut adapter, &data, &settings, |_| {})
            .iter()
            .map(|r| r.loss)
            .collect();
        (losses, adapter.to_delta())
    };
    let (cpu_losses, cpu_delta) = run(&on_cpu, &cpu, false);
    let recorded = frozen::recorded_projections();
    let (gpu_losses, gpu_delta) = run(&on_gpu, &gpu, true);
    assert!(
        frozen::recorded_projections() > recorded,
        "the GPU's projections through blocks did not run as the dequantizing op"
    );
    eprintln!("losses cpu {cpu_losses:?}\nlosses gpu {gpu_losses:?}");
    for (step, (a, b)) in cpu_losses.iter().zip(&gpu_losses).enumerate() {
        assert!(
            (a - b).abs() < 1e-3 * a.abs().max(1.0),
            "step {step}: {a} vs {b}"
        );
    }
    let mut worst = 0.0f32;
    for (a, b) in cpu_delta.tensors().iter().zip(gpu_delta.tensors()) {
        worst = worst.max(max_diff(a.values(), b.values()));
    }
    eprintln!("adapter after training: max |cpu - gpu| = {worst:e}");
    assert!(worst < 1e-3, "adapters differ by {worst}");
}
