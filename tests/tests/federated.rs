//! End to end: a coordinator and three real burn trainers (`tributary_trainer::worker`) fine-tune
//! a tiny Llama over QUIC on loopback with `experiments/ci-tiny.toml`; the merged adapter lowers
//! the held-out loss, `verify` passes, and the published adapter is the ledger's final one.

mod common;

use std::sync::Arc;
use std::time::Duration;

use burn::tensor::Device;
use common::*;
use tributary_coordinator::publish::publish;
use tributary_coordinator::verify::verify_data_dir;
use tributary_trainer::data::PackedData;
use tributary_trainer::lora::LoraAdapter;
use tributary_trainer::model;
use tributary_trainer::tiny;
use tributary_trainer::train::evaluate;
use tributary_trainer::worker::FULL_DUTY;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_burn_trainers_learn_together() {
    learn_together(Deployment::Embedded).await;
}

/// The same run on PostgreSQL and S3-compatible storage, with two standby nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_burn_trainers_learn_together_on_a_three_node_cluster() {
    learn_together(Deployment::Cluster).await;
}

async fn learn_together(deployment: Deployment) {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny::write_gguf(&model_path, 11).unwrap();
    let config = parse(include_str!("../../experiments/ci-tiny.toml"));
    let data_dir = dir.path().join("coordinator");
    let running = start_on(deployment, &data_dir, Some(config)).await;

    let handles: Vec<_> = (0..3)
        .map(|seed| {
            spawn_burn_trainer(
                &running,
                &model_path,
                700 + seed,
                FULL_DUTY as u32,
                Arc::default(),
            )
        })
        .collect();
    let reports = finished_reports(handles).await;
    // Every adapter (the initial one and each round's merged one) was scored by each of the
    // three trainers (the experiment's default: three evaluators), on evaluation tasks the
    // coordinator handed out.
    let evaluations: Vec<(Option<u64>, f32)> = reports
        .iter()
        .flat_map(|r| r.evaluations.iter().copied())
        .collect();
    assert_eq!(evaluations.len(), 12, "{evaluations:?}");
    let accepted: u64 = reports.iter().map(|r| r.accepted).sum();
    assert_eq!(accepted, 9, "3 trainers x 3 rounds");
    // int8 deltas are under half their f32 size even at this size (names and block scales
    // weigh more on tensors this small; on SmolLM2 they are about a quarter).
    let (up, raw): (u64, u64) = reports
        .iter()
        .fold((0, 0), |(u, r), x| (u + x.bytes_up, r + x.raw_bytes));
    assert!(up * 2 < raw, "{up} bytes up for {raw} raw");
    let mut watch = running.progress.clone();
    let final_adapter = tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|p| p.finished && p.evaluations_pending == 0),
    )
    .await
    .unwrap()
    .unwrap()
    .adapter
    .unwrap();

    // The hub serves the ledger, every adapter by hash, and the latest adapter as a PEFT folder.
    let http = running.http_addr.unwrap();
    let (status, body) = http_get_bytes(http, "/hub/ledger").await;
    assert!(status.contains("200"), "{status}");
    let ledger: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ledger.as_array().unwrap().len(), 3);
    // The coordinator recorded those scores: held-out loss falls round after round.
    let (_, body) = http_get_bytes(http, "/hub/evaluations").await;
    let rows: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let rows = rows.as_array().unwrap();
    let losses: Vec<f64> = rows
        .iter()
        .map(|row| row["evaluation"]["loss"].as_f64().unwrap())
        .collect();
    let rounds: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| row["evaluation"]["after_round"].clone())
        .collect();
    eprintln!("held-out loss of the initial adapter, then after each round: {losses:?}");
    for row in rows {
        assert_eq!(row["evaluation"]["evaluators"], 3, "{row}");
        assert_eq!(
            row["evaluation"]["agreeing"], 3,
            "honest evaluators agree: {row}"
        );
    }
    assert_eq!(
        serde_json::Value::Array(rounds),
        serde_json::json!([null, 0, 1, 2])
    );
    assert!(
        losses[3] < losses[0] * 0.9 && losses[2] < losses[0],
        "{losses:?}"
    );
    assert_eq!(
        rows[3]["evaluation"]["adapter"].as_str().unwrap(),
        final_adapter.to_hex()
    );
    let (_, blob) = http_get_bytes(http, &format!("/hub/adapters/{final_adapter}")).await;
    assert_eq!(tributary_shared::BlobHash::of(&blob), final_adapter);
    let (status, safetensors) = http_get_bytes(http, "/hub/latest/adapter_model.safetensors").await;
    assert!(status.contains("200"), "{status}");
    let served = tributary_shared::peft::from_safetensors(&safetensors).unwrap();
    let encoded = tributary_coordinator::derive::encode_exact(&served);
    assert_eq!(tributary_shared::BlobHash::of(&encoded), final_adapter);
    let (_, card) = http_get_bytes(http, "/hub/latest/README.md").await;
    let card = String::from_utf8(card).unwrap();
    assert!(card.contains("3 contributors"));
    assert!(
        card.contains("| 3 of 3 |"),
        "the card shows how many evaluators agreed"
    );
    let (status, _) = http_get_bytes(http, "/hub/adapters/not-a-hash").await;
    assert!(status.contains("400"), "{status}");
    running.shutdown().await.unwrap();

    let verified = verify_data_dir(&data_dir).expect("verify passes");
    assert_eq!(verified.len(), 1);

    let out = dir.path().join("published");
    let published = publish(&data_dir, Some("ci-tiny"), &out).unwrap();
    assert_eq!(published.adapter, final_adapter);

    // The merged adapter lowers the loss on every client's text, compared with the base model.
    let device = Device::flex();
    let loaded = model::load(&model_path, &device, 64).unwrap();
    let adapter = LoraAdapter::load_peft(&out, loaded.model.config(), &device).unwrap();
    let held_out: Vec<_> = (0..3).map(|c| tiny::client_text(c, 30).into()).collect();
    let data = PackedData::pack(&held_out, &loaded.tokenizer, 32, loaded.tokenizer.eos).unwrap();
    let base = evaluate(&loaded.model, None, &data, 8, None);
    let merged = evaluate(&loaded.model, Some(&adapter), &data, 8, None);
    eprintln!(
        "held-out loss: base {:.4}, merged {:.4}",
        base.loss, merged.loss
    );
    assert!(
        merged.loss < base.loss * 0.9,
        "base {} merged {}",
        base.loss,
        merged.loss
    );
}

/// Instruction tuning over QUIC: the experiment names a chat dataset
/// (`experiments/datasets/chat-tiny`, one `.jsonl` file per client), each trainer renders its
/// client's conversations with the tiny model's chat template and trains on the assistant's
/// tokens only, and the evaluators' held-out loss (on those tokens) falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainers_learn_from_a_named_chat_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny::write_gguf(&model_path, 11).unwrap();
    let mut config = parse(include_str!("../../experiments/ci-tiny.toml"));
    config.data.dataset = "chat-tiny".into();
    config.training.learning_rate = 0.02;
    let running = start(&dir.path().join("coordinator"), Some(config), vec![]).await;
    let handles: Vec<_> = (0..3)
        .map(|seed| {
            spawn_burn_trainer(
                &running,
                &model_path,
                740 + seed,
                FULL_DUTY as u32,
                Arc::default(),
            )
        })
        .collect();
    let reports = finished_reports(handles).await;
    let accepted: u64 = reports.iter().map(|r| r.accepted).sum();
    assert_eq!(accepted, 9, "3 trainers x 3 rounds");
    let mut watch = running.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|p| p.finished && p.evaluations_pending == 0),
    )
    .await
    .unwrap()
    .unwrap();
    let (_, body) = http_get_bytes(running.http_addr.unwrap(), "/hub/evaluations").await;
    let rows: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let losses: Vec<f64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["evaluation"]["loss"].as_f64().unwrap())
        .collect();
    eprintln!("assistant-token loss of the initial adapter, then after each round: {losses:?}");
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0] * 0.9, "{losses:?}");
    running.shutdown().await.unwrap();
}
