//! The pause button: a signed `throttle` order reaches every connected burn trainer within
//! seconds, they report it, and the fleet's compute (the fraction of wall time spent in training
//! steps) drops to the ordered duty; `pause` stops it and `resume` restores it. Forged and
//! replayed orders are refused.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tributary_coordinator::operator::{self, ThrottleOrder};
use tributary_trainer::tiny;
use tributary_trainer::worker::FULL_DUTY;

/// Fraction of wall time the fleet spends computing over `window` (summed over trainers).
async fn compute_rate(busy: &[Arc<AtomicU64>], window: Duration) -> f64 {
    let total = || busy.iter().map(|b| b.load(Ordering::Relaxed)).sum::<u64>();
    let before = total();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    (total() - before) as f64 / 1e6 / started.elapsed().as_secs_f64()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_pause_and_resume_reach_the_fleet() {
    pause_and_resume(Deployment::Embedded).await;
}

/// The same on PostgreSQL and S3-compatible storage, with two standby nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_pause_and_resume_reach_the_fleet_of_a_three_node_cluster() {
    pause_and_resume(Deployment::Cluster).await;
}

async fn pause_and_resume(deployment: Deployment) {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny::write_gguf(&model_path, 11).unwrap();
    // A round that never ends on its own: each task is a very long local run.
    let toml = include_str!("../../experiments/ci-tiny.toml")
        .replace("local_steps = 8", "local_steps = 1000000")
        .replace("trainers_per_round = 3", "trainers_per_round = 2")
        .replace("quorum = 3", "quorum = 2")
        .replace("min_trainers = 3", "min_trainers = 2");
    let data_dir = dir.path().join("coordinator");
    let running = start_on(deployment, &data_dir, Some(parse(&toml))).await;
    let http = running.http_addr.unwrap();

    let busy: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let handles: Vec<_> = busy
        .iter()
        .enumerate()
        .map(|(i, busy)| {
            spawn_burn_trainer(
                &running,
                &model_path,
                900 + i as u64,
                FULL_DUTY as u32,
                busy.clone(),
            )
        })
        .collect();

    // Both trainers are training.
    let deadline = Instant::now() + Duration::from_secs(60);
    while busy.iter().any(|b| b.load(Ordering::Relaxed) == 0) {
        assert!(Instant::now() < deadline, "trainers never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let full = compute_rate(&busy, Duration::from_secs(2)).await;
    eprintln!("fleet compute at full duty: {full:.2}");
    assert!(
        full > 1.0,
        "two trainers should compute most of the time: {full}"
    );

    let operator = operator::load_or_create(&data_dir).unwrap();
    let mut progress = running.progress.clone();
    let order = |duty_ppm: u32| {
        serde_json::to_string(&ThrottleOrder::sign(&operator, duty_ppm, now_ms())).unwrap()
    };

    // Throttle to 5 %: every trainer is told and reports it within seconds.
    let sent = Instant::now();
    let throttle = order(50_000);
    let response = http_post_json(http, "/admin/throttle", &throttle).await;
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    assert!(response.contains("\"trainers\":2"), "{response}");
    tokio::time::timeout(
        Duration::from_secs(5),
        progress.wait_for(|p| p.fleet_duty_ppm == 50_000 && p.trainers_obeying == 2),
    )
    .await
    .expect("both trainers report the new duty within 5 s")
    .unwrap();
    eprintln!("acknowledged by both trainers after {:?}", sent.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let throttled = compute_rate(&busy, Duration::from_secs(4)).await;
    eprintln!(
        "fleet compute at 5 % duty: {throttled:.3} ({:.1} % of full)",
        throttled / full * 100.0
    );
    assert!(
        throttled < full * 0.15,
        "throttled {throttled} vs full {full}"
    );

    // A replayed order and one signed by another key are refused.
    let replay = http_post_json(http, "/admin/throttle", &throttle).await;
    assert!(replay.contains("403"), "{replay}");
    let stranger = identity(1);
    let forged =
        serde_json::to_string(&ThrottleOrder::sign(&stranger, 1_000_000, now_ms())).unwrap();
    let refused = http_post_json(http, "/admin/throttle", &forged).await;
    assert!(refused.contains("403"), "{refused}");

    // Pause: compute stops.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let response = http_post_json(http, "/admin/throttle", &order(0)).await;
    assert!(response.contains("\"duty_ppm\":0"), "{response}");
    tokio::time::timeout(
        Duration::from_secs(5),
        progress.wait_for(|p| p.fleet_duty_ppm == 0 && p.trainers_obeying == 2),
    )
    .await
    .expect("both trainers report the pause")
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let paused = compute_rate(&busy, Duration::from_secs(2)).await;
    eprintln!("fleet compute paused: {paused:.4}");
    assert!(paused < full * 0.02, "paused {paused} vs full {full}");

    // In a cluster, the pause outlives its leader: the node taking over applies it to the
    // trainers that fail over to it, and takes the next order.
    let (running, http) = match deployment {
        Deployment::Embedded => (Some(running), http),
        Deployment::Cluster => {
            let standbys = standby_http_of(running.addr);
            // Meanwhile the standby nodes serve the hub pages from the shared database and
            // blobs, name the leader, and leave operator orders to it.
            let body = |response: String| {
                let at = response.find("\r\n\r\n").map_or(0, |at| at + 4);
                response[at..].to_owned()
            };
            let experiments = body(http_get(http, "/hub/experiments").await);
            assert!(experiments.contains("initial_adapter"), "{experiments}");
            for &standby in &standbys {
                let status = http_get(standby, "/status").await;
                assert!(status.contains("\"role\":\"standby\""), "{status}");
                assert!(status.contains(&running.addr.to_string()), "{status}");
                assert_eq!(
                    body(http_get(standby, "/hub/experiments").await),
                    experiments
                );
                let refused = http_post_json(standby, "/admin/throttle", &order(1_000_000)).await;
                assert!(
                    refused.contains("503") && refused.contains("stands by"),
                    "{refused}"
                );
            }
            running.shutdown().await.unwrap();
            let (http, status) = tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    for &http in &standbys {
                        // A standby's status has no trainers until that node leads.
                        if let Ok(Ok(status)) = tokio::time::timeout(
                            Duration::from_secs(2),
                            try_http_get(http, "/status"),
                        )
                        .await
                        {
                            if status.contains("\"trainers_obeying\":2") {
                                return (http, status);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
            .await
            .expect("a standby node leads and both trainers obey it within 60 s");
            assert!(status.contains("\"fleet_duty_ppm\":0"), "{status}");
            let paused = compute_rate(&busy, Duration::from_secs(2)).await;
            eprintln!("fleet compute paused, after the leader changed: {paused:.4}");
            assert!(paused < full * 0.02, "paused {paused} vs full {full}");
            (None, http)
        }
    };

    // Resume: compute comes back.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let response = http_post_json(http, "/admin/throttle", &order(1_000_000)).await;
    assert!(response.contains("\"trainers\":2"), "{response}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resumed = compute_rate(&busy, Duration::from_secs(2)).await;
    eprintln!("fleet compute resumed: {resumed:.2}");
    assert!(resumed > full * 0.5, "resumed {resumed} vs full {full}");
    let metrics = http_get(http, "/metrics").await;
    assert!(
        metrics.contains("tributary_fleet_duty_ppm 1000000"),
        "{metrics}"
    );

    for handle in handles {
        handle.abort();
    }
    if let Some(running) = running {
        running.shutdown().await.unwrap();
    }
}
