//! A LoRA experiment run over QUIC by synthetic trainers, then published as a PEFT folder whose
//! safetensors hold exactly the ledger's final adapter; the hub serves merged adapters to
//! anyone and individual deltas only to auditors, unless the experiment publishes them.

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
    let (running, _) = run_to_the_end(dir.path(), parse(LORA)).await;
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

/// Runs `config` to the end with three synthetic trainers; returns the coordinator, still
/// serving, and one accepted delta's hash.
async fn run_to_the_end(
    dir: &std::path::Path,
    config: tributary_shared::config::ExperimentConfig,
) -> (
    tributary_coordinator::service::Running,
    tributary_shared::BlobHash,
) {
    let running = start(dir, Some(config.clone()), vec![]).await;
    let handles: Vec<_> = (0..3)
        .map(|seed| {
            spawn_trainer(
                &running.fingerprint,
                options(running.addr, 600 + seed, Fault::None, None),
            )
        })
        .collect();
    synthetic_reports(handles, Duration::from_secs(60)).await;
    let db =
        tributary_coordinator::store::db::Db::open_read_only(&dir.join("tributary.db")).unwrap();
    let experiment = tributary_shared::ExperimentId(config.experiment.name.clone());
    let ledger = db.ledger(&experiment).unwrap();
    let delta = ledger[0].1.accepted[0].hash;
    (running, delta)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_are_private_unless_the_experiment_publishes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (running, delta) = run_to_the_end(dir.path(), parse(LORA)).await;
    let http = running.http_addr.unwrap();
    let adapter = running.progress.borrow().adapter.unwrap();
    let (status, body) = http_get_bytes(http, &format!("/hub/adapters/{adapter}")).await;
    assert!(
        status.contains("200"),
        "merged adapters are public: {status}"
    );
    assert_eq!(tributary_shared::BlobHash::of(&body), adapter);
    let path = format!("/hub/adapters/{delta}");
    let (status, _) = http_get_bytes(http, &path).await;
    assert!(
        status.contains("403"),
        "a volunteer's delta is private: {status}"
    );
    let (status, _) = http_get_with(http, &path, &["Authorization: Bearer audit-guess"]).await;
    assert!(status.contains("403"), "{status}");
    let token = tributary_coordinator::auditors::new_token(dir.path()).unwrap();
    let bearer = format!("Authorization: Bearer {token}");
    let (status, body) = http_get_with(http, &path, &[&bearer]).await;
    assert!(status.contains("200"), "an auditor reads it: {status}");
    assert_eq!(tributary_shared::BlobHash::of(&body), delta);
    assert!(running.metrics.limited("private_blob") >= 2);
    // Over QUIC too: a trainer holding no loss check of the delta (here a stranger who read its
    // hash in the public ledger) is told it does not exist; the merged adapter it may fetch.
    let stranger = identity(699);
    let endpoint = endpoint_for(&running.fingerprint, 699);
    let session =
        tributary_trainer::net::client::Session::connect(&endpoint, running.addr, &stranger, None)
            .await
            .expect("the stranger is welcomed");
    let refused = session.download(delta).await;
    assert!(
        refused.is_err(),
        "a delta is served to its loss checkers only"
    );
    let merged = session
        .download(adapter)
        .await
        .expect("the merged adapter is served");
    assert_eq!(tributary_shared::BlobHash::of(&merged), adapter);
    // Credit, from the ledger alone: three trainers, two deltas each; the work is what their
    // tasks justified (these trainers claim 15, 16 and 10 samples, under the task's 64).
    let (status, body) = http_get_bytes(http, "/hub/contributors").await;
    assert!(status.contains("200"), "{status}");
    let rows: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let rows = rows.as_array().unwrap();
    let works: Vec<u64> = rows
        .iter()
        .map(|row| row["credit"]["work"].as_u64().unwrap())
        .collect();
    assert_eq!(works, vec![32, 30, 20], "most work first");
    for row in rows {
        assert_eq!(row["credit"]["accepted"], 2, "{row}");
        assert_eq!(row["credit"]["rounds"], 2, "{row}");
    }
    let share: f64 = rows
        .iter()
        .map(|row| row["credit"]["share"].as_f64().unwrap())
        .sum();
    assert!((share - 1.0).abs() < 1e-9);
    let (_, card) = http_get_bytes(http, "/hub/latest/README.md").await;
    let card = String::from_utf8(card).unwrap();
    assert_eq!(card.matches(" | 2 | 0 | 0 | 2 | ").count(), 3, "{card}");
    running.shutdown().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut config = parse(LORA);
    config.experiment.publish_deltas = true;
    let (running, delta) = run_to_the_end(dir.path(), config).await;
    let http = running.http_addr.unwrap();
    let (status, body) = http_get_bytes(http, &format!("/hub/adapters/{delta}")).await;
    assert!(
        status.contains("200"),
        "a transparent experiment publishes deltas: {status}"
    );
    assert_eq!(tributary_shared::BlobHash::of(&body), delta);
    running.shutdown().await.unwrap();
}
