//! The coordinator serves the base model by hash: trainers that lack it (or hold another model
//! under the path they were given) download it once, check it, cache it and train with it; a
//! coordinator whose file does not match the experiment's pinned hash refuses to start.

mod common;

use std::sync::Arc;

use common::*;
use tributary_coordinator::service::{self, ServeOptions, ServerLimits, TlsSource};
use tributary_shared::BlobHash;
use tributary_trainer::tiny;
use tributary_trainer::worker::FULL_DUTY;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainers_without_the_model_download_it_by_hash() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.gguf");
    tiny::write_gguf(&served, 11).unwrap();
    let hash = BlobHash::of(&std::fs::read(&served).unwrap());
    let mut config = parse(include_str!("../../experiments/ci-tiny.toml"));
    config.experiment.rounds = 1;
    let running = start_serving(
        &dir.path().join("coordinator"),
        Some(config),
        vec![],
        Some(served),
    )
    .await;

    // Trainer 0 has no model file at all; trainer 1 has a different model under its path.
    let missing = dir.path().join("t0/none.gguf");
    std::fs::create_dir_all(dir.path().join("t1")).unwrap();
    let other = dir.path().join("t1/other.gguf");
    tiny::write_gguf(&other, 12).unwrap();
    std::fs::create_dir_all(dir.path().join("t2")).unwrap();
    let third = dir.path().join("t2/none.gguf");
    let handles: Vec<_> = [&missing, &other, &third]
        .iter()
        .enumerate()
        .map(|(i, path)| {
            spawn_burn_trainer(
                &running,
                path,
                800 + i as u64,
                FULL_DUTY as u32,
                Arc::default(),
            )
        })
        .collect();
    for report in finished_reports(handles).await {
        assert_eq!(report.accepted, 1);
    }
    // Each downloaded the served file into its cache, under its hash.
    for (path, seed) in [(&missing, 800), (&other, 801), (&third, 802)] {
        let cached = path
            .with_file_name(format!("model-cache-{seed}"))
            .join(format!("{}.gguf", hash.to_hex()));
        assert_eq!(BlobHash::of(&std::fs::read(&cached).unwrap()), hash);
    }
    // The other model under trainer 1's path was left alone.
    assert_ne!(BlobHash::of(&std::fs::read(&other).unwrap()), hash);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_served_model_must_match_the_pinned_hash() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.gguf");
    tiny::write_gguf(&served, 11).unwrap();
    let mut config = parse(include_str!("../../experiments/ci-tiny.toml"));
    config.model.hash = Some(BlobHash::of(b"some other model").to_hex());
    let error = service::start(ServeOptions {
        data_dir: dir.path().join("coordinator"),
        listen: "127.0.0.1:0".parse().unwrap(),
        experiment: Some(config),
        http: None,
        http_public: false,
        tls: TlsSource::SelfSigned {
            names: vec!["localhost".into()],
        },
        base_model: Some(served),
        lease: Default::default(),
        limits: ServerLimits::default(),
    })
    .await
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("pins model.hash"),
        "{error:#}"
    );
}
