//! A hostile or overloaded network against a coordinator with its default limits, over real QUIC
//! on loopback: finished work is never thrown away, a lost blob costs one delta and a failing
//! database a pause, never the coordinator, and peers that hold resources are cut off without
//! honest trainers noticing.

mod common;

use std::time::Duration;

use common::*;
use tributary_coordinator::verify::verify_data_dir;
use tributary_shared::wire::{ClientMessage, RejectReason};
use tributary_shared::{BlobHash, ExperimentId, RoundId, TaskId};
use tributary_tests::client::{client_endpoint, Session};
use tributary_tests::load::{run_trainers, LocalCoordinator};
use tributary_tests::synthetic::Fault;
use tributary_tests::tls::ServerTrust;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_trainers_finishing_at_once_lose_nothing_with_default_limits() {
    // 500 trainers a round against 64 receive slots: the rest queue (or are told when to come
    // back), and every upload is accepted. Rounds close on their deltas, long before their
    // 600 s deadline.
    let trainers = 500;
    let local = LocalCoordinator::start(trainers, 2, 1000, "f32")
        .await
        .unwrap();
    let report = tokio::time::timeout(
        Duration::from_secs(240),
        run_trainers(local.running.addr, &local.running.fingerprint, trainers),
    )
    .await
    .expect("the rounds closed on their deltas, not their deadline")
    .unwrap();
    assert_eq!(report.rounds_closed, 2);
    assert!(
        report.rejected.is_empty(),
        "{:?}",
        &report.rejected[..5.min(report.rejected.len())]
    );
    assert_eq!(report.lost(), 0);
    assert_eq!(report.accepted, 2 * u64::from(trainers));
    let metrics = local.running.metrics.clone();
    assert_eq!(metrics.rejections(RejectReason::RateLimited), 0);
    eprintln!(
        "500 trainers: {:.1} s, deferred and re-sent {}, limits hit: connections_per_address {}",
        report.total.as_secs_f64(),
        report.deferred,
        metrics.limited("connections_per_address")
    );
    local.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_lost_from_storage_mid_round_is_left_out_and_the_coordinator_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Deltas of 100,000 int8 values are blob files (over 64 KiB), which the test can remove.
    let config = parse(&experiment_toml("storage-fault", 2, 100_000, 4, 4, 3, 4));
    let running = start(dir.path(), Some(config), vec![]).await;
    let (gate, handles) = hold_round_open(&running, 900).await;
    let mut progress = running.progress.clone();
    // Remove one accepted delta's blob behind the coordinator's back.
    let experiment = ExperimentId("storage-fault".into());
    let db = tributary_coordinator::store::db::Db::open_read_only(&dir.path().join("tributary.db"))
        .unwrap();
    let (victim, _) = db.round_submissions(&experiment, RoundId(0)).unwrap()[0].clone();
    drop(db);
    let blob = blob_path(dir.path(), &victim);
    std::fs::remove_file(&blob).expect("the delta is a blob file");
    gate.arrive();

    synthetic_reports(handles, Duration::from_secs(120)).await;
    let finished = tokio::time::timeout(Duration::from_secs(30), progress.wait_for(|p| p.finished))
        .await
        .expect("the experiment finishes")
        .unwrap()
        .clone();
    assert_eq!(finished.rounds_closed, 2);
    running.shutdown().await.unwrap();

    let db = tributary_coordinator::store::db::Db::open_read_only(&dir.path().join("tributary.db"))
        .unwrap();
    let ledger = db.ledger(&experiment).unwrap();
    let round0 = &ledger[0].1;
    assert_eq!(round0.accepted.len(), 3, "round 0 closed with the rest");
    assert!(round0.accepted.iter().all(|a| a.hash != victim));
    let refusal = round0
        .rejected
        .iter()
        .find(|r| r.hash == Some(victim))
        .expect("the ledger says why the delta is missing");
    assert_eq!(refusal.reason, RejectReason::Internal);
    assert_eq!(ledger[1].1.accepted.len(), 4);
    verify_data_dir(dir.path()).expect("verify passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_database_pauses_the_hub_which_recovers_without_losing_work() {
    let dir = tempfile::tempdir().unwrap();
    let config = parse(&experiment_toml("db-fault", 2, 1000, 4, 4, 4, 4));
    let running = start(dir.path(), Some(config), vec![]).await;
    let (gate, handles) = hold_round_open(&running, 950).await;
    // A real SQLite error inside the hub's batches: from now on, recording a task fails. Closing
    // round 0 records round 1's tasks, so the batch holding the round's ledger entry fails.
    let db_path = dir.path().join("tributary.db");
    let outside = rusqlite::Connection::open(&db_path).unwrap();
    outside.busy_timeout(Duration::from_secs(10)).unwrap();
    outside
        .execute_batch(
            "CREATE TRIGGER injected_fault BEFORE INSERT ON tasks \
             BEGIN SELECT RAISE(ABORT, 'injected storage fault'); END;",
        )
        .unwrap();
    gate.arrive();
    let metrics = running.metrics.clone();
    tokio::time::timeout(Duration::from_secs(60), async {
        while metrics
            .storage_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            < 3
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the hub retries the failing batch with a backoff");
    // Nothing of a failed batch is visible: round 0 is not committed.
    assert_eq!(running.progress.borrow().rounds_closed, 0);
    outside
        .execute_batch("DROP TRIGGER injected_fault;")
        .unwrap();
    drop(outside);

    for report in synthetic_reports(handles, Duration::from_secs(120)).await {
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        assert_eq!(
            report.accepted, 2,
            "each trainer's two deltas were acknowledged once"
        );
    }
    finish_and_verify(running, dir.path()).await;
    let experiment = ExperimentId("db-fault".into());
    let db = tributary_coordinator::store::db::Db::open_read_only(&db_path).unwrap();
    let ledger = db.ledger(&experiment).unwrap();
    assert_eq!(ledger.len(), 2);
    assert!(ledger.iter().all(|(_, entry)| entry.accepted.len() == 4));
}

fn blob_path(data_dir: &std::path::Path, hash: &BlobHash) -> std::path::PathBuf {
    let hex = hash.to_hex();
    data_dir.join("blobs").join(&hex[..2]).join(hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_cut_off_and_honest_trainers_finish() {
    let dir = tempfile::tempdir().unwrap();
    let config = parse(&experiment_toml("hostile", 3, 1000, 4, 4, 4, 4));
    let running = start(dir.path(), Some(config), vec![]).await;
    let trust = ServerTrust::Fingerprint(running.fingerprint.clone());
    let before = rss_bytes();

    // 200 connections that finish TLS and then send nothing: before the hello they may open no
    // stream, and each is dropped at the handshake deadline.
    let mut silent = Vec::new();
    for index in 0..200u32 {
        let endpoint = tributary_tests::client::client_endpoint_at(
            tributary_tests::load::loopback_address(index * 8),
            &trust,
        )
        .unwrap();
        let connection = endpoint
            .connect(running.addr, "localhost")
            .unwrap()
            .await
            .expect("tls completes");
        if index < 3 {
            // Streams are not granted before the hello.
            let opened =
                tokio::time::timeout(Duration::from_millis(300), connection.open_uni()).await;
            assert!(opened.is_err(), "a stream was granted before the hello");
        }
        silent.push((endpoint, connection));
    }

    // A trainer that floods evaluation results and never reads its control stream.
    let flooder_endpoint = client_endpoint(&trust).unwrap();
    let mut flooder = Session::connect(&flooder_endpoint, running.addr, &identity(77), None)
        .await
        .unwrap();
    let flood = async {
        for task in 0..100_000u64 {
            let result = flooder
                .send(&ClientMessage::EvalResult {
                    task: TaskId(task),
                    adapter: BlobHash::of(b"nothing"),
                    loss: 1.0,
                    tokens: 1,
                    baseline: None,
                })
                .await;
            if result.is_err() {
                return task;
            }
        }
        u64::MAX
    };
    let sent = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the flooder is disconnected");
    assert!(
        sent < 100_000,
        "the flooder was cut off after {sent} messages"
    );
    assert!(running.metrics.limited("control_rate") >= 1);

    // Honest trainers still run every round.
    let mut handles = Vec::new();
    for seed in 0..4u64 {
        let options = options(running.addr, 500 + seed, Fault::None, None);
        handles.push(spawn_trainer(&running.fingerprint, options));
    }
    for handle in handles {
        let report = tokio::time::timeout(Duration::from_secs(120), handle)
            .await
            .expect("honest trainer finished in time")
            .unwrap()
            .unwrap();
        assert!(report.finished);
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    }
    // The silent connections were dropped at the handshake deadline (10 s).
    for (_, connection) in &silent {
        tokio::time::timeout(Duration::from_secs(30), connection.closed())
            .await
            .expect("a silent connection is closed");
    }
    assert!(running.metrics.limited("handshake_timeout") >= 200);
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 256 << 20,
        "memory grew by {} MiB under hostile peers",
        grown >> 20
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_downloader_holds_a_bounded_number_of_streams() {
    let dir = tempfile::tempdir().unwrap();
    // A 16 MB adapter: more than a connection's send window, so unread downloads stay open.
    let config = parse(&experiment_toml("hoard", 1, 4_000_000, 1, 1, 1, 2));
    let running = start(dir.path(), Some(config), vec![]).await;
    let trust = ServerTrust::Fingerprint(running.fingerprint.clone());
    let adapter = current_adapter(&running).await;
    // A trainer that opens many downloads and never reads them: past its per-connection
    // allowance the streams are reset at once, and what it holds is bounded by its windows.
    let endpoint = client_endpoint(&trust).unwrap();
    let hoarder = Session::connect(&endpoint, running.addr, &identity(78), None)
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        let (mut send, recv) = hoarder.connection().open_bi().await.unwrap();
        tributary_tests::client::write_frame(
            &mut send,
            &tributary_shared::wire::DownloadRequest { hash: adapter },
        )
        .await
        .unwrap();
        held.push((send, recv));
    }
    // Downloads past the allowance are reset at once.
    wait_for_limit(&running, "downloads_per_connection", 4).await;
    hoarder.close();
    drop(held);
    running.shutdown().await.unwrap();
}
