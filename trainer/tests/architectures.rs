//! Each decoder family against Hugging Face transformers and PEFT.
//!
//! `scripts/reference_architectures.py` builds a tiny Llama 3.x, Mistral, Qwen2 and Qwen3 from a
//! config, with sharp attention and non-trivial biases and norms, and records transformers'
//! float64 logits with and without a PEFT LoRA adapter on all seven projections. Here the same
//! files go through the trainer's loaders (Hugging Face folder and GGUF) and decoder.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Deserialize;
use tributary_shared::peft;
use tributary_trainer::lora::LoraAdapter;
use tributary_trainer::model::checkpoint::{Checkpoint, GgufCheckpoint, HfCheckpoint};
use tributary_trainer::model::{Architecture, KvCache, Llama};

/// Largest absolute logit difference allowed against transformers' float64 logits. The trainer
/// computes in f32: measured differences are 3e-6 to 1.3e-5 without the adapter and up to 6.4e-5
/// with it, on logits reaching ±28. A wrong RoPE, scale, mask, bias or norm moves them by whole
/// units (the fixtures' attention is sharp and their smallest top-1/top-2 margin is 8e-3).
const TOLERANCE: f32 = 2e-4;

#[derive(Deserialize)]
struct Reference {
    ids: Vec<Vec<i64>>,
    vocab: usize,
    logits: Vec<f64>,
    lora_logits: Vec<f64>,
    inv_freq: Vec<f64>,
    min_margin: f64,
    attention_peak: f64,
    /// Mistral's logits with its sliding window switched off (what llama.cpp's GGUF computes).
    full_attention_logits: Option<Vec<f64>>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch")
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixtures().join(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokens(reference: &Reference, device: &Device) -> Tensor<2, Int> {
    let rows = reference.ids.len();
    let cols = reference.ids[0].len();
    let flat: Vec<i64> = reference.ids.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows, cols]), device)
}

fn read(logits: Tensor<3>) -> Vec<f32> {
    logits.into_data().try_to_vec::<f32>().unwrap()
}

/// The largest difference, after checking that every confident top-1 token agrees.
fn compare(name: &str, got: &[f32], want: &[f64], vocab: usize) -> f32 {
    assert_eq!(got.len(), want.len(), "{name}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).abs() as f32)
        .fold(0.0, f32::max);
    for (position, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let argmax = |row: &mut dyn Iterator<Item = f64>| {
            row.enumerate().fold(
                (0, f64::MIN),
                |best, (i, v)| if v > best.1 { (i, v) } else { best },
            )
        };
        let (want_top, want_value) = argmax(&mut w.iter().copied());
        let runner_up = w
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != want_top)
            .map(|(_, v)| *v)
            .fold(f64::MIN, f64::max);
        if want_value - runner_up > 2.0 * f64::from(TOLERANCE) {
            let (got_top, _) = argmax(&mut g.iter().map(|v| f64::from(*v)));
            assert_eq!(
                got_top, want_top,
                "{name}: top token at position {position}"
            );
        }
    }
    worst
}

fn check_family(name: &str, architecture: Architecture) {
    let device = Device::flex();
    let reference = reference(name);
    // The fixture is only a test if attention is sharp and top tokens are told apart.
    assert!(
        reference.attention_peak > 0.6,
        "{name}: {}",
        reference.attention_peak
    );
    assert!(reference.min_margin > 2.0 * f64::from(TOLERANCE), "{name}");
    let folder = fixtures().join(name);
    let checkpoint = HfCheckpoint::open(&folder).unwrap();
    let config = checkpoint.config().clone();
    assert_eq!(config.architecture, architecture);
    for (ours, theirs) in config.inv_freqs().iter().zip(&reference.inv_freq) {
        // transformers computes the frequencies in f32.
        assert!(
            (ours - theirs).abs() <= 1e-6 * theirs,
            "{name}: {ours} vs {theirs}"
        );
    }
    assert_eq!(config.inv_freqs().len(), reference.inv_freq.len());
    let model = Llama::load(&checkpoint, &device, 64).unwrap();
    let ids = tokens(&reference, &device);
    let plain = read(model.forward(ids.clone(), None, None));
    let worst = compare(name, &plain, &reference.logits, reference.vocab);
    eprintln!("{name}: largest logit difference {worst:.2e}");
    assert!(worst <= TOLERANCE, "{name}: {worst}");

    // Generation's path: a prefix, then one token at a time through the KV cache.
    let [rows, cols] = ids.dims();
    let mut cache = KvCache::default();
    let split = 5;
    let mut stepped = vec![read(model.forward(
        ids.clone().slice([0..rows, 0..split]),
        None,
        Some(&mut cache),
    ))];
    for position in split..cols {
        let step = ids.clone().slice([0..rows, position..position + 1]);
        stepped.push(read(model.forward(step, None, Some(&mut cache))));
    }
    let vocab = reference.vocab;
    for row in 0..rows {
        let mut got = Vec::new();
        got.extend_from_slice(&stepped[0][row * split * vocab..(row + 1) * split * vocab]);
        for step in &stepped[1..] {
            got.extend_from_slice(&step[row * vocab..(row + 1) * vocab]);
        }
        let want = &reference.logits[row * cols * vocab..(row + 1) * cols * vocab];
        let worst = compare(name, &got, want, vocab);
        assert!(worst <= TOLERANCE, "{name} with the KV cache: {worst}");
    }

    // PEFT's adapter, as PEFT saved it, changes the logits as it does in PEFT.
    let adapter = LoraAdapter::load_peft(&folder.join("adapter"), &config, &device).unwrap();
    let tensors = adapter.tensors();
    let adapted = read(model.forward(ids.clone(), Some(&tensors), None));
    let worst = compare(name, &adapted, &reference.lora_logits, vocab);
    eprintln!("{name}: largest logit difference with LoRA {worst:.2e}");
    assert!(worst <= TOLERANCE, "{name} with LoRA: {worst}");

    // Exported again, it is the same file content PEFT wrote: same keys, shapes and values.
    let out = tempfile::tempdir().unwrap();
    adapter.save_peft(out.path(), name).unwrap();
    let load = |dir: &Path| {
        peft::from_safetensors(&std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
            .unwrap()
    };
    assert_eq!(load(out.path()), load(&folder.join("adapter")), "{name}");
    let config_of = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        let mut config = peft::AdapterConfig::from_json(&text).unwrap();
        config.target_modules.sort();
        (config.r, config.lora_alpha, config.target_modules)
    };
    assert_eq!(config_of(out.path()), config_of(&folder.join("adapter")));
    // `TRIBUTARY_PEFT_EXPORT=DIR` keeps the exports, for PEFT itself to load them:
    // `scripts/reference_architectures.py --check-adapter DIR/NAME --arch NAME`.
    if let Some(keep) = std::env::var_os("TRIBUTARY_PEFT_EXPORT") {
        adapter
            .save_peft(&Path::new(&keep).join(name), name)
            .unwrap();
    }

    // The GGUF file llama.cpp's converter writes computes the same model. It converts Mistral as
    // `llama` and drops the sliding window, so llama.cpp attends to the whole context: that file
    // is Llama here too, and matches transformers with the window switched off.
    let checkpoint = GgufCheckpoint::open(&fixtures().join(format!("{name}.gguf"))).unwrap();
    let from_gguf = checkpoint.config();
    let (gguf_architecture, want) = match &reference.full_attention_logits {
        Some(whole) => (Architecture::Llama, whole),
        None => (architecture, &reference.logits),
    };
    assert_eq!(from_gguf.architecture, gguf_architecture, "{name}");
    assert_eq!(from_gguf.sliding_window, None, "{name}");
    assert_eq!(
        (from_gguf.head_dim, from_gguf.num_kv_heads),
        (config.head_dim, config.num_kv_heads),
        "{name}"
    );
    assert_eq!(
        (from_gguf.qkv_bias, from_gguf.o_bias, from_gguf.qk_norm),
        (config.qkv_bias, config.o_bias, config.qk_norm)
    );
    let model = Llama::load(&checkpoint, &device, 64).unwrap();
    let logits = read(model.forward(ids, None, None));
    let worst = compare(name, &logits, want, vocab);
    eprintln!("{name}: largest logit difference from GGUF {worst:.2e}");
    assert!(worst <= TOLERANCE, "{name} from GGUF: {worst}");
}

#[test]
fn llama_3_with_llama3_rope_scaling_and_attention_biases_matches_transformers() {
    check_family("llama", Architecture::Llama);
}

#[test]
fn mistral_with_a_sliding_window_and_wide_heads_matches_transformers() {
    check_family("mistral", Architecture::Mistral);
}

#[test]
fn qwen2_with_qkv_biases_matches_transformers() {
    check_family("qwen2", Architecture::Qwen2);
}

#[test]
fn qwen3_with_query_key_norms_matches_transformers() {
    check_family("qwen3", Architecture::Qwen3);
}

#[test]
fn a_gguf_tensor_the_decoder_would_not_use_is_refused_by_name() {
    use tributary_trainer::gguf::{Gguf, GgufWriter};
    let file = Gguf::open(&fixtures().join("qwen2.gguf")).unwrap();
    let mut writer = GgufWriter::new();
    for (key, value) in &file.metadata {
        writer.metadata(key, value.clone());
    }
    for tensor in &file.tensors {
        let values = file.dequantize(&tensor.name).unwrap();
        writer.tensor_f32(&tensor.name, tensor.dims.clone(), &values);
    }
    writer.tensor_f32("blk.0.ffn_gate_inp.weight", vec![4], &[0.0; 4]);
    let bytes = writer.to_bytes();
    let error = GgufCheckpoint::from_gguf(Gguf::parse(bytes).unwrap(), "x.gguf".into())
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("blk.0.ffn_gate_inp.weight"), "{error}");
}

#[test]
fn dynamic_rope_scaling_runs_within_its_original_context_and_refuses_beyond() {
    let device = Device::flex();
    let reference = reference("mistral");
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("mistral");
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["rope_parameters"] = serde_json::json!({
        "rope_type": "dynamic", "rope_theta": 1000000.0, "factor": 4.0,
        "original_max_position_embeddings": 16
    });
    std::fs::write(&config_path, config.to_string()).unwrap();
    let checkpoint = HfCheckpoint::open(dir.path()).unwrap();
    // Within 16 positions, dynamic scaling is plain RoPE: transformers' logits still hold.
    let model = Llama::load(&checkpoint, &device, 16).unwrap();
    let logits = read(model.forward(tokens(&reference, &device), None, None));
    let worst = compare(
        "mistral (dynamic)",
        &logits,
        &reference.logits,
        reference.vocab,
    );
    assert!(worst <= TOLERANCE, "{worst}");
    let error = Llama::load(&checkpoint, &device, 64)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("dynamic RoPE scaling"), "{error}");
}
