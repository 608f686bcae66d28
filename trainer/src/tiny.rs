//! Tiny random Llama models for tests and CI: written as a llama.cpp-style GGUF file (with its
//! byte-level BPE tokenizer and permuted Q/K rows) and as a Hugging Face folder holding the same
//! weights, so both loaders can be checked against each other in seconds.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use tributary_shared::config::SplitMix64;

use crate::gguf::{GgufWriter, Value};
use crate::model::checkpoint::{gguf_name, permute_rows};
use crate::model::LlamaConfig;

/// GPT-2's reversible map from bytes to printable characters (the alphabet of byte-level BPE).
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&byte) || (0xA1..=0xAC).contains(&byte) || byte >= 0xAE;
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            let c = char::from_u32(next).unwrap_or('?');
            next += 1;
            c
        };
    }
    table
}

/// The tiny model's chat template: ChatML, as SmolLM2 and Qwen write conversations.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The tiny model's shape: 2 layers, width 32, 4 query heads sharing 2 key/value heads.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architecture: crate::model::Architecture::Llama,
        vocab_size: 0, // set from the vocabulary
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        sliding_window: None,
        rope_theta: 10_000.0,
        rope_scaling: crate::model::RopeScaling::None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
    }
}

/// A tiny vocabulary: the 256 byte symbols, a few merges, and three control tokens.
fn vocabulary() -> (Vec<String>, Vec<u64>, Vec<String>) {
    let table = byte_to_char();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1u64; 256];
    let space = table[b' ' as usize];
    let merges = vec![
        (format!("{space}"), "t".to_string()),
        ("h".into(), "e".into()),
        (format!("{space}t"), "he".into()),
        ("e".into(), "r".into()),
        ("i".into(), "n".into()),
    ];
    for (a, b) in &merges {
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(special.into());
        types.push(3);
    }
    let merges = merges
        .into_iter()
        .map(|(a, b)| format!("{a} {b}"))
        .collect();
    (tokens, types, merges)
}

/// Random weights for `config` under Hugging Face names and layout (`[out, in]`).
pub fn random_weights(config: &LlamaConfig, seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix64(seed);
    let mut normal = |len: usize, std: f32| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.next_unit() * 2.0 - 1.0) * std * 1.732)
            .collect()
    };
    let (d, kv, ffn, vocab) = (
        config.hidden_size,
        config.kv_size(),
        config.intermediate_size,
        config.vocab_size,
    );
    let mut out = BTreeMap::new();
    out.insert(
        "model.embed_tokens.weight".to_string(),
        (vec![vocab, d], normal(vocab * d, 0.5)),
    );
    out.insert("model.norm.weight".to_string(), (vec![d], vec![1.0; d]));
    let std = 1.0 / (d as f32).sqrt();
    for i in 0..config.num_layers {
        let name = |leaf: &str| format!("model.layers.{i}.{leaf}.weight");
        for (leaf, rows, cols) in [
            ("self_attn.q_proj", d, d),
            ("self_attn.k_proj", kv, d),
            ("self_attn.v_proj", kv, d),
            ("self_attn.o_proj", d, d),
            ("mlp.gate_proj", ffn, d),
            ("mlp.up_proj", ffn, d),
            ("mlp.down_proj", d, ffn),
        ] {
            out.insert(name(leaf), (vec![rows, cols], normal(rows * cols, std)));
        }
        let norm: Vec<f32> = normal(d, 0.1).into_iter().map(|v| 1.0 + v).collect();
        out.insert(name("input_layernorm"), (vec![d], norm.clone()));
        out.insert(name("post_attention_layernorm"), (vec![d], norm));
    }
    out
}

/// Writes a tiny model as GGUF to `path` and returns its configuration.
pub fn write_gguf(path: &Path, seed: u64) -> std::io::Result<LlamaConfig> {
    let (tokens, types, merges) = vocabulary();
    let mut config = tiny_config();
    config.vocab_size = tokens.len();
    let weights = random_weights(&config, seed);
    let mut writer = GgufWriter::new();
    let uint = |v: usize| Value::Uint(v as u64);
    writer
        .metadata("general.architecture", Value::String("llama".into()))
        .metadata("general.name", Value::String("tributary-tiny".into()))
        .metadata("llama.vocab_size", uint(config.vocab_size))
        .metadata("llama.context_length", uint(config.max_position_embeddings))
        .metadata("llama.embedding_length", uint(config.hidden_size))
        .metadata("llama.feed_forward_length", uint(config.intermediate_size))
        .metadata("llama.block_count", uint(config.num_layers))
        .metadata("llama.attention.head_count", uint(config.num_heads))
        .metadata("llama.attention.head_count_kv", uint(config.num_kv_heads))
        .metadata("llama.rope.freq_base", Value::Float(config.rope_theta))
        .metadata(
            "llama.attention.layer_norm_rms_epsilon",
            Value::Float(config.rms_norm_eps),
        )
        .metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", Value::String("smollm".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().cloned().map(Value::String).collect()),
        )
        .metadata(
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::Int(t as i64)).collect()),
        )
        .metadata(
            "tokenizer.ggml.merges",
            Value::Array(merges.into_iter().map(Value::String).collect()),
        )
        .metadata(
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        )
        .metadata("tokenizer.ggml.bos_token_id", uint(tokens.len() - 2))
        .metadata("tokenizer.ggml.eos_token_id", uint(tokens.len() - 1));
    for (name, (shape, values)) in &weights {
        let Some(gguf) = gguf_name(name) else {
            continue;
        };
        let cols = shape.last().copied().unwrap_or(1);
        let stored = if name.ends_with("q_proj.weight") {
            permute_rows(values, config.num_heads, cols)
        } else if name.ends_with("k_proj.weight") {
            permute_rows(values, config.num_kv_heads, cols)
        } else {
            values.clone()
        };
        let dims: Vec<usize> = shape.iter().rev().copied().collect();
        writer.tensor_f32(&gguf, dims, &stored);
    }
    std::fs::write(path, writer.to_bytes())?;
    Ok(config)
}

/// Writes the same tiny model (same `seed`) as a Hugging Face folder: `config.json` and
/// `model.safetensors`.
pub fn write_hf_folder(dir: &Path, seed: u64) -> std::io::Result<LlamaConfig> {
    let (tokens, _, _) = vocabulary();
    let mut config = tiny_config();
    config.vocab_size = tokens.len();
    let weights = random_weights(&config, seed);
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), config.to_hf_json().to_string())?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .into_iter()
        .map(|(name, (shape, values))| {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, data)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok((name.clone(), view))
        })
        .collect::<std::io::Result<_>>()?;
    let serialized =
        safetensors::serialize(views, None).map_err(|e| std::io::Error::other(e.to_string()))?;
    std::fs::write(dir.join("model.safetensors"), serialized)?;
    Ok(config)
}

/// Text a tiny model can learn in a few steps: one short phrase per client, repeated with numbers.
pub fn client_text(client: usize, lines: usize) -> String {
    const PHRASES: [&str; 4] = [
        "the river meets the sea",
        "in the hall the king is here",
        "her letter went north",
        "then the winter ends",
    ];
    let phrase = PHRASES[client % PHRASES.len()];
    (0..lines)
        .map(|i| format!("{phrase} {}.", i % 10))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The client number of a tiny-dataset client id (`client-3` → 3; anything else hashes).
pub fn client_index(id: &str) -> usize {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| id.bytes().map(usize::from).sum())
}
