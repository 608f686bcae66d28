//! A burn trainer killed mid-round: the round still closes on quorum at its deadline, and the
//! same trainer (same key) rejoins and contributes to the next round.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tributary_coordinator::verify::verify_data_dir;
use tributary_trainer::tiny;
use tributary_trainer::worker::FULL_DUTY;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainer_does_not_stall_the_round_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny::write_gguf(&model, 11).unwrap();
    let toml = include_str!("../../experiments/ci-tiny.toml")
        .replace("rounds = 3", "rounds = 2")
        .replace("quorum = 3", "quorum = 2")
        .replace("round_timeout_secs = 120", "round_timeout_secs = 6");
    let data_dir = dir.path().join("coordinator");
    let running = start(&data_dir, Some(parse(&toml)), vec![]).await;

    let fast_a = spawn_burn_trainer(&running, &model, 31, FULL_DUTY as u32, Arc::default());
    let fast_b = spawn_burn_trainer(&running, &model, 32, FULL_DUTY as u32, Arc::default());
    // The victim computes 2 % of the time, so it is still training when it is killed.
    let victim_busy = Arc::new(AtomicU64::new(0));
    let victim = spawn_burn_trainer(&running, &model, 33, 20_000, victim_busy.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while victim_busy.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the victim never started training"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.abort();
    let killed_at = Instant::now();

    // Round 0 closes on the quorum of two at its deadline.
    let mut progress = running.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        progress.wait_for(|p| p.rounds_closed >= 1),
    )
    .await
    .expect("round 0 closes without the killed trainer")
    .unwrap();
    eprintln!("round 0 closed {:?} after the kill", killed_at.elapsed());

    // The same trainer comes back and is part of round 1 (min_trainers = 3 waits for it).
    let again = spawn_burn_trainer(&running, &model, 33, FULL_DUTY as u32, Arc::default());
    let report = tokio::time::timeout(Duration::from_secs(120), again)
        .await
        .expect("the rejoined trainer finishes")
        .unwrap()
        .unwrap();
    assert!(report.finished);
    assert_eq!(report.accepted, 1, "it contributed to round 1: {report:?}");
    for handle in [fast_a, fast_b] {
        let report = tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(report.accepted, 2, "{report:?}");
    }
    running.shutdown().await.unwrap();
    let verified = verify_data_dir(&data_dir).expect("verify passes");
    assert_eq!(verified.len(), 1);
}
