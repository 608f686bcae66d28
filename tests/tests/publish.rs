//! A LoRA experiment run over QUIC by synthetic trainers, then published as a PEFT folder whose
//! safetensors hold exactly the ledger's final adapter.

mod common;

use std::time::Duration;

use common::*;
use tributary_coordinator::publish::publish;
use tributary_shared::peft::{from_safetensors, AdapterConfig};
use tributary_tests::synthetic::Fault;

const LORA: &str = r#"
[experiment]
name = "tiny-lora"
description = "A tiny LoRA for the publish test."
rounds = 2
seed = 5

[model]
name = "smollm2-135m-instruct-q4_1"
hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"

[adapter]
kind = "lora"
layers = 2
hidden_size = 16
kv_size = 8
intermediate_size = 32
rank = 4
alpha = 8.0
targets = ["q_proj", "v_proj"]

[selection]
trainers_per_round = 3
quorum = 3
min_trainers = 3
round_timeout_secs = 30

[training]
codec = { kind = "f16" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_lora_experiment_publishes_as_peft() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), Some(parse(LORA)), vec![]).await;
    let handles: Vec<_> = (0..3)
        .map(|seed| {
            spawn_trainer(
                &running.fingerprint,
                options(running.addr, 500 + seed, Fault::None, None),
            )
        })
        .collect();
    for handle in handles {
        let report = tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("trainer finished in time")
            .unwrap()
            .unwrap();
        assert!(report.finished);
    }
    let mut watch = running.progress.clone();
    let final_adapter =
        tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|p| p.finished))
            .await
            .expect("the coordinator finishes")
            .unwrap()
            .adapter
            .unwrap();
    running.shutdown().await.unwrap();

    let out = dir.path().join("published");
    let published = publish(dir.path(), Some("tiny-lora"), &out).unwrap();
    assert_eq!(published.rounds, 2);
    assert_eq!(published.adapter, final_adapter);
    let adapter =
        from_safetensors(&std::fs::read(out.join("adapter_model.safetensors")).unwrap()).unwrap();
    let encoded = tributary_coordinator::derive::encode_exact(&adapter);
    assert_eq!(
        tributary_shared::BlobHash::of(&encoded),
        final_adapter,
        "the file holds the final adapter"
    );
    assert!(adapter
        .get("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
        .is_some_and(|t| t.shape() == [8, 4]));
    let config = AdapterConfig::from_json(
        &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!((config.r, config.lora_alpha), (4, 8.0));
    assert_eq!(
        config.base_model_name_or_path,
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains(&published.ledger_head.unwrap().to_hex()),
        "{card}"
    );
    assert!(card.contains("3 contributors"), "{card}");
    // Publishing into a non-empty folder is refused.
    assert!(publish(dir.path(), Some("tiny-lora"), &out).is_err());
}
