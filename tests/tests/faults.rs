//! End to end over real QUIC on loopback: 20 synthetic trainers, 5 rounds, seven of them
//! misbehaving once; every fault is refused with its reason, the rounds close, `verify` passes.

mod common;

use std::time::Duration;

use common::*;
use tributary_coordinator::verify::verify_data_dir;
use tributary_shared::wire::RejectReason;
use tributary_shared::RoundId;
use tributary_tests::synthetic::{Fault, Gate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_trainers_five_rounds_with_seven_faults() {
    seven_faults(Deployment::Embedded).await;
}

/// The same run on PostgreSQL and S3-compatible storage, with two standby nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_trainers_five_rounds_with_seven_faults_on_a_three_node_cluster() {
    seven_faults(Deployment::Cluster).await;
}

async fn seven_faults(deployment: Deployment) {
    let dir = tempfile::tempdir().unwrap();
    // 20 tasks a round; a round closes at 14 accepted deltas, so the 13 honest trainers plus the
    // replaying one (whose first upload is honest) close round 0 only after every fault.
    let config = parse(&experiment_toml("faults", 5, 1000, 14, 20, 10, 20));
    let running = start_on(deployment, dir.path(), Some(config)).await;
    let gate = Gate::new(Fault::ALL_FAULTS.len());
    let mut handles = Vec::new();
    for (index, fault) in Fault::ALL_FAULTS.iter().enumerate() {
        let options = options(running.addr, 100 + index as u64, *fault, Some(gate.clone()));
        handles.push((*fault, spawn_trainer(&running.fingerprint, options)));
    }
    for index in 0..13 {
        let options = options(running.addr, 200 + index, Fault::None, Some(gate.clone()));
        handles.push((Fault::None, spawn_trainer(&running.fingerprint, options)));
    }
    let reports = fault_reports(handles, Duration::from_secs(120)).await;
    let mut watch = running.progress.clone();
    let progress = tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|p| p.finished))
        .await
        .expect("the coordinator finishes")
        .unwrap()
        .clone();
    assert!(progress.finished);
    assert_eq!(progress.rounds_closed, 5);

    // Each fault was refused with its own reason, told to the trainer and counted.
    for (fault, report) in &reports {
        let Some(reason) = fault.expected_reason() else {
            continue;
        };
        assert!(
            running.metrics.rejections(reason) >= 1,
            "{reason} was not counted"
        );
        if *fault != Fault::DisconnectMidUpload {
            assert!(
                report.rejected.iter().any(|(r, _)| *r == reason),
                "{fault:?} was not told {reason}: {:?}",
                report.rejected
            );
        }
    }
    let metrics_page = http_get(running.http_addr.unwrap(), "/metrics").await;
    assert!(metrics_page.contains("tributary_submissions_rejected_total{reason=\"non_finite\"} 1"));
    assert!(metrics_page.contains("tributary_rounds_closed_total 5"));
    assert!(http_get(running.http_addr.unwrap(), "/healthz")
        .await
        .ends_with("ok\n"));
    running.shutdown().await.unwrap();

    // The ledger holds every fault in round 0, and everything re-derives.
    let db = tributary_coordinator::store::db::Db::open_read_only_in(dir.path()).unwrap();
    let ledger = db
        .ledger(&tributary_shared::ExperimentId("faults".into()))
        .unwrap();
    assert_eq!(ledger.len(), 5);
    let round0: Vec<RejectReason> = ledger[0].1.rejected.iter().map(|r| r.reason).collect();
    for fault in Fault::ALL_FAULTS {
        let reason = fault.expected_reason().unwrap();
        assert!(
            round0.contains(&reason),
            "round 0 ledger lacks {reason}: {round0:?}"
        );
    }
    assert_eq!(ledger[0].1.accepted.len(), 14);
    let verified = verify_data_dir(dir.path()).expect("verify passes");
    assert_eq!(verified[0].rounds, 5);

    // Corrupting one stored delta of round 2 (small deltas live in the database) makes verify
    // name round 2.
    let victim = ledger[2].1.accepted[0].hash;
    drop(db);
    match deployment {
        Deployment::Embedded => {
            let raw = rusqlite::Connection::open(dir.path().join("tributary.db")).unwrap();
            let changed = raw
                .execute(
                    "UPDATE inline_blobs SET data = x'00' WHERE hash = ?1",
                    [&victim.0[..]],
                )
                .unwrap();
            assert_eq!(changed, 1, "the delta is stored inline");
        }
        Deployment::Cluster => cluster_sql(
            dir.path(),
            &format!(
                "UPDATE inline_blobs SET data = '\\x00'::bytea WHERE hash = '\\x{}'::bytea",
                victim.to_hex()
            ),
        ),
    }
    let error = verify_data_dir(dir.path()).expect_err("verify notices the tampering");
    assert_eq!(error.round, Some(RoundId(2)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let config = parse(&experiment_toml("tokens", 1, 100, 1, 1, 1, 1));
    let running = start(dir.path(), Some(config), vec!["sesame".into()]).await;
    let endpoint = tributary_tests::client::client_endpoint(
        &tributary_tests::tls::ServerTrust::Fingerprint(running.fingerprint.clone()),
    )
    .unwrap();
    let refused = tributary_tests::client::Session::connect(
        &endpoint,
        running.addr,
        &identity(1),
        Some("wrong".into()),
    )
    .await
    .expect_err("a wrong token is refused");
    assert!(
        refused.to_string().contains("unknown_trainer"),
        "{refused:#}"
    );
    let session = tributary_tests::client::Session::connect(
        &endpoint,
        running.addr,
        &identity(1),
        Some("sesame".into()),
    )
    .await
    .expect("the right token is accepted");
    assert_eq!(session.trainer, identity(1).id());
    // A pin that does not match refuses the connection at the TLS layer.
    let wrong_pin = tributary_tests::client::client_endpoint(
        &tributary_tests::tls::ServerTrust::Fingerprint("00".repeat(32)),
    )
    .unwrap();
    assert!(tributary_tests::client::Session::connect(
        &wrong_pin,
        running.addr,
        &identity(2),
        Some("sesame".into())
    )
    .await
    .is_err());
    assert_eq!(
        running.metrics.rejections(RejectReason::UnknownTrainer),
        0,
        "handshake refusals are not submission rejections"
    );
    running.shutdown().await.unwrap();
}
