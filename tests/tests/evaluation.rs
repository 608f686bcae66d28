//! Evaluation tasks over real QUIC: a trainer that cannot evaluate (a synthetic one has no
//! model) declines and is not asked again; the evaluation goes to burn trainers that join
//! later, and every adapter ends up scored by as many as the experiment wants, who agree.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tributary_shared::wire::ServerMessage;
use tributary_tests::synthetic::Fault;
use tributary_trainer::tiny;
use tributary_trainer::worker::FULL_DUTY;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_evaluation_goes_to_a_trainer_that_can_do_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny::write_gguf(&model, 11).unwrap();
    let mut config = parse(include_str!("../../experiments/ci-tiny.toml"));
    config.experiment.rounds = 1;
    // Two of the three trainers can evaluate.
    config.evaluation.evaluators = 2;
    let running = start(&dir.path().join("coordinator"), Some(config), vec![]).await;

    // The synthetic trainer comes first, so the initial adapter's evaluation is offered to it.
    let (events, mut inbox) = tokio::sync::mpsc::unbounded_channel();
    let mut synthetic_options = options(running.addr, 1, Fault::None, None);
    synthetic_options.events = Some(events);
    let synthetic_id = synthetic_options.identity.id();
    let synthetic = spawn_trainer(&running.fingerprint, synthetic_options);
    let offered = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some((_, message)) = inbox.recv().await {
            if matches!(message, ServerMessage::Evaluate(_)) {
                return;
            }
        }
    })
    .await;
    assert!(
        offered.is_ok(),
        "the lone trainer was offered the evaluation"
    );

    let burn: Vec<_> = (0..2)
        .map(|i| spawn_burn_trainer(&running, &model, 900 + i, FULL_DUTY as u32, Arc::default()))
        .collect();
    let reports = finished_reports(burn).await;
    let report = tokio::time::timeout(Duration::from_secs(60), synthetic)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(report.finished);
    let mut watch = running.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        watch.wait_for(|p| p.finished && p.evaluations_pending == 0),
    )
    .await
    .expect("every evaluation done")
    .unwrap();

    // Both adapters (initial, after round 0) were scored by both burn trainers.
    let scored: usize = reports.iter().map(|r| r.evaluations.len()).sum();
    assert_eq!(scored, 4);
    let (_, body) = http_get_bytes(running.http_addr.unwrap(), "/hub/evaluations").await;
    let rows: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        let evaluation = &row["evaluation"];
        assert_ne!(
            evaluation["trainer"].as_str().unwrap(),
            synthetic_id.to_hex()
        );
        // Honest evaluators of the same adapter on the same held-out text agree.
        assert_eq!(evaluation["evaluators"], 2);
        assert_eq!(evaluation["agreeing"], 2);
        assert!(evaluation["spread"].as_f64().unwrap() < 1e-3);
    }
    // The synthetic trainer was asked once and never again after declining.
    let mut offers = 1;
    while let Ok((_, message)) = inbox.try_recv() {
        if matches!(message, ServerMessage::Evaluate(_)) {
            offers += 1;
        }
    }
    assert_eq!(offers, 1);
    running.shutdown().await.unwrap();
}
