//! The model, LoRA and training on a tiny random model the tests write themselves (real burn, CPU
//! backend).

use burn::tensor::{Device, Int, Tensor, TensorData};
use tributary_trainer::data::PackedData;
use tributary_trainer::gguf::Gguf;
use tributary_trainer::lora::{LoraAdapter, LoraMode, LoraSettings};
use tributary_trainer::model::checkpoint::{self, Checkpoint, GgufCheckpoint};
use tributary_trainer::model::{KvCache, Llama, Target};
use tributary_trainer::optim::OptimSettings;
use tributary_trainer::tiny;
use tributary_trainer::tokenizer::TextTokenizer;
use tributary_trainer::train::{evaluate, generate, train, TrainSettings};

struct Fixture {
    _dir: tempfile::TempDir,
    model: Llama,
    tokenizer: TextTokenizer,
    gguf_path: std::path::PathBuf,
    hf_dir: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let gguf_path = dir.path().join("tiny.gguf");
    let hf_dir = dir.path().join("tiny-hf");
    tiny::write_gguf(&gguf_path, 11).unwrap();
    tiny::write_hf_folder(&hf_dir, 11).unwrap();
    let checkpoint = GgufCheckpoint::open(&gguf_path).unwrap();
    let tokenizer = TextTokenizer::from_gguf(checkpoint.gguf()).unwrap();
    let model = Llama::load(&checkpoint, &Device::flex(), 256).unwrap();
    Fixture {
        _dir: dir,
        model,
        tokenizer,
        gguf_path,
        hf_dir,
    }
}

fn tokens(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn data(f: &Fixture, client: usize) -> PackedData {
    let text = tiny::client_text(client, 60);
    PackedData::pack(&[text.into()], &f.tokenizer, 32, f.tokenizer.eos).unwrap()
}

#[test]
fn gguf_and_safetensors_loaders_agree() {
    let f = fixture();
    let hf = checkpoint::open(&f.hf_dir).unwrap();
    let from_hf = Llama::load(hf.as_ref(), &Device::flex(), 256).unwrap();
    let ids = f
        .tokenizer
        .encode("the king is here, then the winter")
        .unwrap();
    let a = to_vec(f.model.forward(tokens(&ids, &Device::flex()), None, None));
    let b = to_vec(from_hf.forward(tokens(&ids, &Device::flex()), None, None));
    assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
    // The GGUF stores Q/K permuted; reading it without undoing that would change the logits.
    let raw = Gguf::open(&f.gguf_path).unwrap();
    let stored = raw.dequantize("blk.0.attn_q.weight").unwrap();
    let loaded = GgufCheckpoint::open(&f.gguf_path)
        .unwrap()
        .load("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_ne!(stored, loaded.values);
    assert_eq!(checkpoint::unpermute_rows(&stored, 4, 32), loaded.values);
}

#[test]
fn kv_cache_matches_a_full_forward() {
    let f = fixture();
    let device = Device::flex();
    let ids = f
        .tokenizer
        .encode("her letter went north in the hall")
        .unwrap();
    let full = to_vec(f.model.forward(tokens(&ids, &device), None, None));
    let vocab = f.model.config().vocab_size;
    let mut cache = KvCache::default();
    let split = 3;
    let first = to_vec(
        f.model
            .forward(tokens(&ids[..split], &device), None, Some(&mut cache)),
    );
    assert_eq!(cache.len(), split);
    assert!(max_diff(&first, &full[..split * vocab]) < 1e-5);
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let step = to_vec(
            f.model
                .forward(tokens(&[id], &device), None, Some(&mut cache)),
        );
        let expected = &full[i * vocab..(i + 1) * vocab];
        assert!(
            max_diff(&step, expected) < 1e-4,
            "position {i}: {}",
            max_diff(&step, expected)
        );
    }
    // Two tokens at once after a prefix exercise the offset causal mask.
    let mut cache = KvCache::default();
    f.model
        .forward(tokens(&ids[..2], &device), None, Some(&mut cache));
    let pair = to_vec(
        f.model
            .forward(tokens(&ids[2..4], &device), None, Some(&mut cache)),
    );
    assert!(max_diff(&pair, &full[2 * vocab..4 * vocab]) < 1e-4);
}

#[test]
fn a_fresh_adapter_is_the_identity_and_b_changes_the_output() {
    let f = fixture();
    let device = Device::flex();
    let settings = LoraSettings {
        targets: vec![Target::Q, Target::V, Target::Down],
        ..LoraSettings::default()
    };
    let adapter = LoraAdapter::init(&settings, f.model.config(), 5, &device).unwrap();
    let ids = f.tokenizer.encode("then the winter ends").unwrap();
    let base = to_vec(f.model.forward(tokens(&ids, &device), None, None));
    let same = to_vec(
        f.model
            .forward(tokens(&ids, &device), Some(&adapter.tensors()), None),
    );
    assert_eq!(base, same);
    let mut delta = adapter.to_delta();
    for tensor in delta.tensors_mut() {
        if tensor.name().ends_with("lora_B.weight") {
            tensor.values_mut().iter_mut().for_each(|v| *v = 0.05);
        }
    }
    let changed = LoraAdapter::from_delta(&delta, &settings, f.model.config(), &device).unwrap();
    let other = to_vec(
        f.model
            .forward(tokens(&ids, &device), Some(&changed.tensors()), None),
    );
    assert!(max_diff(&base, &other) > 1e-3);
}

fn quick_settings(steps: u64) -> TrainSettings {
    TrainSettings {
        steps,
        batch_size: 4,
        grad_accum: 1,
        seed: 3,
        optim: OptimSettings {
            lr: 1e-2,
            warmup_steps: 2,
            ..OptimSettings::default()
        },
        recompute_layers: false,
    }
}

#[test]
fn training_lowers_the_loss_and_leaves_the_base_untouched() {
    let f = fixture();
    let device = Device::flex();
    let data = data(&f, 0);
    let settings = LoraSettings {
        rank: 4,
        targets: vec![Target::Q, Target::K, Target::V, Target::O, Target::Up],
        ..LoraSettings::default()
    };
    let mut adapter = LoraAdapter::init(&settings, f.model.config(), 1, &device).unwrap();
    let before_weights = f.model.base_weights();
    let before = evaluate(&f.model, Some(&adapter), &data, 8, None);
    let reports = train(&f.model, &mut adapter, &data, &quick_settings(30), |_| {});
    let after = evaluate(&f.model, Some(&adapter), &data, 8, None);
    assert_eq!(reports.len(), 30);
    assert!(reports
        .iter()
        .all(|r| r.loss.is_finite() && r.grad_norm.is_finite()));
    assert!(
        after.loss < before.loss * 0.7,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
    assert!(
        f.model.base_weights() == before_weights,
        "base weights changed"
    );
}

#[test]
fn training_is_reproducible_with_a_seed() {
    let f = fixture();
    let device = Device::flex();
    let data = data(&f, 1);
    let settings = LoraSettings {
        rank: 2,
        dropout: 0.1,
        ..LoraSettings::default()
    };
    let run = |seed: u64| {
        let mut adapter = LoraAdapter::init(&settings, f.model.config(), 9, &device).unwrap();
        let mut s = quick_settings(4);
        s.seed = seed;
        train(&f.model, &mut adapter, &data, &s, |_| {});
        adapter.to_delta()
    };
    let first = run(3);
    assert_eq!(first, run(3), "same seed, different adapter");
    assert_ne!(first, run(4));
}

#[test]
fn freeze_a_mode_trains_only_b() {
    let f = fixture();
    let device = Device::flex();
    let data = data(&f, 2);
    let settings = LoraSettings {
        rank: 4,
        mode: LoraMode::FreezeA,
        ..LoraSettings::default()
    };
    let mut adapter = LoraAdapter::init(&settings, f.model.config(), 2, &device).unwrap();
    let initial = adapter.to_delta();
    assert_eq!(adapter.trainable().len(), 2 * f.model.config().num_layers);
    train(&f.model, &mut adapter, &data, &quick_settings(5), |_| {});
    let trained = adapter.to_delta();
    for (before, after) in initial.tensors().iter().zip(trained.tensors()) {
        if before.name().ends_with("lora_A.weight") {
            assert_eq!(before, after, "{} moved", before.name());
        } else {
            assert_ne!(
                before.values(),
                after.values(),
                "{} did not train",
                before.name()
            );
        }
    }
}

#[test]
fn gradient_accumulation_matches_one_big_batch() {
    let f = fixture();
    let device = Device::flex();
    let data = data(&f, 3);
    let settings = LoraSettings {
        rank: 2,
        dropout: 0.0,
        ..LoraSettings::default()
    };
    // With a single step the batches are the same sequences either way (the first epoch order).
    let run = |batch: usize, accum: usize| {
        let mut adapter = LoraAdapter::init(&settings, f.model.config(), 4, &device).unwrap();
        let mut s = quick_settings(1);
        s.batch_size = batch;
        s.grad_accum = accum;
        let reports = train(&f.model, &mut adapter, &data, &s, |_| {});
        (adapter.to_delta(), reports[0].loss)
    };
    let (big, big_loss) = run(4, 1);
    let (accumulated, accumulated_loss) = run(2, 2);
    assert!((big_loss - accumulated_loss).abs() < 1e-4);
    let diff = big
        .tensors()
        .iter()
        .zip(accumulated.tensors())
        .map(|(a, b)| max_diff(a.values(), b.values()))
        .fold(0.0, f32::max);
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn peft_folders_round_trip() {
    let f = fixture();
    let device = Device::flex();
    let data = data(&f, 0);
    let settings = LoraSettings {
        rank: 4,
        alpha: 8.0,
        targets: vec![Target::K, Target::Gate],
        ..LoraSettings::default()
    };
    let mut adapter = LoraAdapter::init(&settings, f.model.config(), 6, &device).unwrap();
    train(&f.model, &mut adapter, &data, &quick_settings(3), |_| {});
    let dir = tempfile::tempdir().unwrap();
    adapter.save_peft(dir.path(), "tiny").unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["k_proj", "gate_proj"])
    );
    let loaded = LoraAdapter::load_peft(dir.path(), f.model.config(), &device).unwrap();
    assert_eq!(loaded.to_delta(), adapter.to_delta());
    let delta = adapter.to_delta();
    let a = delta
        .get("base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), &[4, 32]);
    let b = delta
        .get("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), &[16, 4]);
}

#[test]
fn generation_is_deterministic_and_stops_at_the_limit() {
    let f = fixture();
    let prompt = f.tokenizer.encode("the river").unwrap();
    let a = generate(&f.model, None, &prompt, 8, 0.0, 1, None);
    let b = generate(&f.model, None, &prompt, 8, 0.0, 1, None);
    assert_eq!(a.len(), 8);
    assert_eq!(a, b);
    let sampled = generate(&f.model, None, &prompt, 8, 1.0, 1, None);
    assert_eq!(sampled, generate(&f.model, None, &prompt, 8, 1.0, 1, None));
}

#[test]
fn tiny_tokenizer_round_trips_and_splits_digits() {
    let f = fixture();
    let text = "the river 2024 ends <|im_end|> here";
    let ids = f.tokenizer.encode(text).unwrap();
    let end = f.tokenizer.eos.unwrap();
    assert!(
        ids.contains(&end),
        "special token not matched whole: {ids:?}"
    );
    let digits: Vec<u32> = f.tokenizer.encode("2024").unwrap();
    assert_eq!(digits.len(), 4);
    assert_eq!(
        f.tokenizer.decode(&ids).unwrap(),
        "the river 2024 ends  here"
    );
    let the = f.tokenizer.encode(" the").unwrap();
    assert_eq!(the.len(), 1, "merges not applied: {the:?}");
}

#[test]
fn the_study_runs_every_arm_and_federation_beats_the_base_model() {
    use tributary_trainer::study::{self, StudyClient, StudySettings};
    let f = fixture();
    let clients: Vec<StudyClient> = (0..3)
        .map(|c| StudyClient {
            id: format!("client-{c}"),
            train: data(&f, c),
            held_out: PackedData::pack(
                &[tiny::client_text(c, 20).into()],
                &f.tokenizer,
                32,
                f.tokenizer.eos,
            )
            .unwrap()
            .evenly_spaced(4),
        })
        .collect();
    let settings = StudySettings {
        rounds: 3,
        local_steps: 3,
        fedsgd_max_rounds: 4,
        batch_size: 4,
        learning_rate: 1e-2,
        lora: LoraSettings {
            rank: 4,
            dropout: 0.0,
            ..LoraSettings::default()
        },
        codec: tributary_shared::codec::Codec::Int8 { block: 64 },
        seed: 5,
    };
    let mut lines = 0;
    let results = study::run(&f.model, &clients, &settings, |_| lines += 1).unwrap();
    assert_eq!(results.local.len(), 3);
    assert_eq!(results.fedavg.len(), 3);
    assert!(!results.fedsgd.is_empty() && results.fedsgd.len() <= 4);
    assert!(lines >= 3 + 3 + results.fedsgd.len());
    let final_fedavg = results.fedavg.last().unwrap().mean;
    assert!(
        final_fedavg < results.base.mean,
        "{final_fedavg} vs {}",
        results.base.mean
    );
    // Each local-only adapter improves its own client.
    for (i, local) in results.local.iter().enumerate() {
        assert!(local.per_client[i] < results.base.per_client[i]);
    }
    assert!(results.fedavg_rounds_to_target.is_some());
    let (up, raw) = results.fedavg_bytes;
    assert!(up > 0 && up < raw);
    let markdown = results.markdown();
    assert!(markdown.contains("| federated (FedAvg) |"), "{markdown}");
    assert!(results.svg().starts_with("<svg"));
}

#[test]
fn instruction_tuning_trains_only_the_assistant_tokens_and_lowers_their_loss() {
    use tributary_trainer::data::{DataSpec, Document};
    let f = fixture();
    let device = Device::flex();
    let folder =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/datasets/chat-tiny");
    let (train_docs, _) = DataSpec::Folder(folder).documents().unwrap();
    assert!(train_docs
        .iter()
        .all(|doc| matches!(doc, Document::Chat { .. })));
    let data = PackedData::pack(&train_docs, &f.tokenizer, 32, f.tokenizer.eos).unwrap();
    assert_eq!(data.masks.len(), data.sequences.len());

    // The token stream is each conversation's whole rendering tokenized at once (what the model
    // sees at inference), and the targets that carry loss, read back as text, are exactly the
    // assistant replies with their end of turn, in order.
    let template = f.tokenizer.chat_template().unwrap();
    let mut stream = Vec::new();
    let mut replies = Vec::new();
    for doc in &train_docs {
        let Document::Chat { messages, .. } = doc else {
            unreachable!()
        };
        let rendered = template.render(messages, false).unwrap();
        stream.extend(f.tokenizer.encode(&rendered).unwrap());
        for message in messages.iter().filter(|m| m.role == "assistant") {
            replies.push(format!("{}<|im_end|>\n", message.content));
        }
    }
    // Consecutive sequences overlap by one token, so their targets in order are the stream
    // from its second token.
    let targets: Vec<(u32, bool)> = data
        .sequences
        .iter()
        .zip(&data.masks)
        .flat_map(|(sequence, mask)| sequence[1..].iter().copied().zip(mask.iter().copied()))
        .collect();
    let ids: Vec<u32> = targets.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids[..], stream[1..=ids.len()]);
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = false;
    for &(id, on) in &targets {
        match (on, previous) {
            (true, true) => runs.last_mut().unwrap().push(id),
            (true, false) => runs.push(vec![id]),
            _ => {}
        }
        previous = on;
    }
    // Packing drops the stream's last partial sequence, which may cut the last run short.
    let last = runs.pop().unwrap();
    let texts: Vec<String> = runs
        .iter()
        .map(|run| f.tokenizer.decode_with_special_tokens(run).unwrap())
        .collect();
    assert!(
        texts.len() * 10 >= replies.len() * 8,
        "{} of {}",
        texts.len(),
        replies.len()
    );
    assert_eq!(texts[..], replies[..texts.len()]);
    let last = f.tokenizer.decode_with_special_tokens(&last).unwrap();
    assert!(replies[texts.len()].starts_with(&last), "{last:?}");
    let prompt_tokens = data.sequences.len() * data.seq_len - data.target_tokens();
    assert!(
        prompt_tokens > data.target_tokens(),
        "the prompts are the larger part"
    );

    // Training lowers the assistant tokens' loss.
    let settings = LoraSettings {
        rank: 4,
        targets: vec![Target::Q, Target::K, Target::V, Target::O, Target::Up],
        ..LoraSettings::default()
    };
    let mut adapter = LoraAdapter::init(&settings, f.model.config(), 3, &device).unwrap();
    let before = evaluate(&f.model, Some(&adapter), &data, 8, None);
    assert_eq!(before.tokens as usize, data.target_tokens());
    let reports = train(&f.model, &mut adapter, &data, &quick_settings(40), |_| {});
    // A batch may fall wholly inside prompts: it counts no tokens and has loss 0, never NaN.
    assert!(reports.iter().all(|r| r.loss.is_finite()));
    assert!(reports.iter().map(|r| r.tokens).sum::<u64>() > 0);
    let after = evaluate(&f.model, Some(&adapter), &data, 8, None);
    eprintln!(
        "assistant-token loss {:.3} -> {:.3} over {} tokens ({} prompt tokens carry none)",
        before.loss, after.loss, before.tokens, prompt_tokens
    );
    assert!(
        after.loss < before.loss * 0.7,
        "{} -> {}",
        before.loss,
        after.loss
    );
}

/// The tiny model re-quantized (`Q5_0` projections, `Q8_0` embeddings) and written next to the
/// fixture's f32 file.
fn quantized_copy(f: &Fixture) -> std::path::PathBuf {
    let file = Gguf::open(&f.gguf_path).unwrap();
    let writer =
        tributary_trainer::gguf::requantize(&file, tributary_trainer::gguf::TensorType::Q4_K)
            .unwrap();
    let path = f.gguf_path.with_file_name("tiny-q.gguf");
    std::fs::write(&path, writer.to_bytes()).unwrap();
    path
}

#[test]
fn a_base_kept_in_blocks_computes_the_bits_of_the_dense_base() {
    use tributary_trainer::model::BaseStorage;
    let f = fixture();
    let device = Device::flex();
    let checkpoint = GgufCheckpoint::open(&quantized_copy(&f)).unwrap();
    let dense = Llama::load_as(&checkpoint, &device, 256, BaseStorage::Dense).unwrap();
    let blocks = Llama::load_as(&checkpoint, &device, 256, BaseStorage::Blocks).unwrap();
    // Q5_0 and Q8_0 take 5.5 and 8.5 bits a weight, against f32's 32.
    assert!(
        blocks.base_bytes() * 3 < dense.base_bytes(),
        "{} bytes in blocks, {} dense",
        blocks.base_bytes(),
        dense.base_bytes()
    );
    assert!(dense.base_weights() == blocks.base_weights());

    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 200).collect();
    let logits = |model: &Llama| to_vec(model.forward(tokens(&ids, &device), None, None));
    let (from_dense, from_blocks) = (logits(&dense), logits(&blocks));
    assert!(from_dense
        .iter()
        .zip(&from_blocks)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // Against the f32 weights the file was quantized from: within quantization's error (Q5_0
    // weights give this random model an RMS error of 0.086 of the logits' RMS; 0.15 allowed).
    let exact = logits(&f.model);
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let (sum, n) = v.fold((0.0f64, 0usize), |(s, n), x| (s + f64::from(x * x), n + 1));
        (sum / n as f64).sqrt()
    };
    let error = rms(&mut exact.iter().zip(&from_blocks).map(|(a, b)| a - b));
    let size = rms(&mut exact.iter().copied());
    assert!(
        error > 0.0 && error < 0.15 * size,
        "RMS error {error} against logits of RMS {size}"
    );

    // Training: the same adapter, bit for bit.
    let data = data(&f, 2);
    let settings = LoraSettings {
        rank: 4,
        dropout: 0.1,
        targets: vec![Target::Q, Target::K, Target::V, Target::O, Target::Down],
        ..LoraSettings::default()
    };
    let run = |model: &Llama| {
        let mut adapter = LoraAdapter::init(&settings, model.config(), 9, &device).unwrap();
        train(model, &mut adapter, &data, &quick_settings(4), |_| {});
        adapter.to_delta()
    };
    let trained = run(&blocks);
    assert_eq!(run(&dense), trained);

    // The GPU's path, blocks unpacked on the device by tensor operations, run on the CPU:
    // the same weights, logits and adapter.
    let on_device = Llama::load_as(&checkpoint, &device, 256, BaseStorage::DeviceBlocks).unwrap();
    assert!(on_device.base_bytes() * 3 < dense.base_bytes());
    assert!(dense.base_weights() == on_device.base_weights());
    assert!(from_dense
        .iter()
        .zip(&logits(&on_device))
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let recorded = tributary_trainer::model::frozen::recorded_projections();
    assert_eq!(run(&on_device), trained);
    assert!(tributary_trainer::model::frozen::recorded_projections() > recorded);
    let untrained = LoraAdapter::init(&settings, blocks.config(), 9, &device)
        .unwrap()
        .to_delta();
    assert_ne!(trained, untrained);
}

#[test]
fn recomputing_layers_gives_the_bits_of_the_full_backward_pass() {
    let f = fixture();
    let device = Device::flex();
    let data = data(&f, 3);
    for targets in [vec![Target::Q, Target::V], Target::ALL.to_vec()] {
        let settings = LoraSettings {
            rank: 4,
            dropout: 0.1,
            targets,
            ..LoraSettings::default()
        };
        let run = |recompute_layers: bool| {
            let mut adapter = LoraAdapter::init(&settings, f.model.config(), 9, &device).unwrap();
            let mut s = quick_settings(3);
            s.grad_accum = 2;
            s.recompute_layers = recompute_layers;
            let reports = train(&f.model, &mut adapter, &data, &s, |_| {});
            let figures: Vec<(u64, u64)> = reports
                .iter()
                .map(|r| (r.loss.to_bits(), r.grad_norm.to_bits()))
                .collect();
            (adapter.to_delta(), figures)
        };
        let (full, recomputed) = (run(false), run(true));
        assert_eq!(full.1, recomputed.1, "losses and gradient norms");
        assert!(full.0 == recomputed.0, "trained adapters differ");
    }
}
