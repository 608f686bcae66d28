//! A cluster's standby nodes take uploads: each checks an upload, stores the delta in the shared
//! bucket and stages it in the shared database; the leader decides on it as on its own, so the
//! trainer hears `SubmissionAccepted` from the leader once it is durable, and `verify` passes.

mod common;

use std::time::Duration;

use common::*;
use tributary_coordinator::store::db::{location_of, Db};
use tributary_shared::wire::{RejectReason, ServerMessage};
use tributary_shared::ExperimentId;
use tributary_tests::client::Session;
use tributary_tests::synthetic::Fault;
use tributary_trainer::net::NetError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_nodes_stage_uploads_and_the_leader_decides_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("leader");
    let config = parse(&experiment_toml("spread", 6, 1000, 5, 5, 5, 5));
    let running = start_on(Deployment::Cluster, &data_dir, Some(config)).await;
    let nodes = nodes_of(running.addr);
    assert_eq!(nodes.len(), 3);

    // A standby node sends control sessions on to the leader, and the leader takes no
    // uploads-only session: each is refused as the wrong node, which trainers move on from.
    let endpoint = endpoint_for(&running.fingerprint, 1);
    let someone = identity(1);
    match Session::connect(&endpoint, nodes[1], &someone, None).await {
        Err(NetError::Refused { reason, .. }) => assert_eq!(reason, RejectReason::WrongNode),
        other => panic!("a standby took a control session: {other:?}"),
    }
    match Session::connect_for_uploads(&endpoint, running.addr, &someone).await {
        Err(NetError::Refused { reason, .. }) => assert_eq!(reason, RejectReason::WrongNode),
        other => panic!("the leader took an uploads-only session: {other:?}"),
    }

    // Four honest trainers and one whose first delta's hash is wrong, each sending its delta
    // to the node its task id picks.
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let mut handles = Vec::new();
    for (seed, fault) in [
        (10, Fault::None),
        (11, Fault::None),
        (12, Fault::None),
        (13, Fault::None),
        (14, Fault::WrongHash),
    ] {
        let mut options = options(running.addr, seed, fault, None);
        options.spread_uploads = true;
        options.events = Some(events.clone());
        handles.push((fault, spawn_trainer(&running.fingerprint, options)));
    }
    drop(events);
    let reports = fault_reports(handles, Duration::from_secs(120)).await;
    let staged: u64 = reports.iter().map(|(_, r)| r.staged).sum();
    let accepted: u64 = reports.iter().map(|(_, r)| r.accepted).sum();
    eprintln!("{staged} of {accepted} accepted deltas went through a standby node");
    assert!(staged > 0, "no upload went through a standby node");
    for (fault, report) in &reports {
        match fault {
            Fault::None => assert!(report.rejected.is_empty(), "{:?}", report.rejected),
            // Refused wherever it went (by the leader, or staged as refused and recorded by
            // the leader), and told to the trainer.
            _ => assert!(
                report
                    .rejected
                    .iter()
                    .any(|(reason, _)| *reason == RejectReason::HashMismatch),
                "{:?}",
                report.rejected
            ),
        }
    }

    // Every staged delta was then accepted by the leader, on the trainer's control session.
    let mut staged_uploads = Vec::new();
    let mut acknowledged = Vec::new();
    while let Ok((trainer, message)) = received.try_recv() {
        match message {
            ServerMessage::UploadStaged { task, hash } => {
                staged_uploads.push((trainer, task, hash))
            }
            ServerMessage::SubmissionAccepted { task, hash } => {
                acknowledged.push((trainer, task, hash))
            }
            _ => {}
        }
    }
    assert!(!staged_uploads.is_empty());
    let liar = identity(14).id();
    for upload in staged_uploads
        .iter()
        .filter(|(trainer, _, _)| *trainer != liar)
    {
        assert!(
            acknowledged.contains(upload),
            "{upload:?} staged, never accepted"
        );
    }

    // The standby nodes counted what they staged; the leader what it took; nothing is left.
    let metric = |page: &str, name: &str| -> u64 {
        page.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    };
    let (mut staged_by_standbys, mut sessions_on_standbys) = (0, 0);
    for http in standby_http_of(running.addr) {
        let page = http_get(http, "/metrics").await;
        staged_by_standbys += metric(&page, "tributary_uploads_staged_total");
        sessions_on_standbys += metric(&page, "tributary_handshakes_total");
    }
    assert!(
        staged_by_standbys >= staged_uploads.len() as u64,
        "{staged_by_standbys}"
    );
    // A trainer keeps its uploads-only session to a standby open between uploads: at most
    // one each per standby, however many deltas went through.
    assert!(
        sessions_on_standbys <= 5 * 2 && staged_by_standbys > sessions_on_standbys,
        "{sessions_on_standbys} sessions for {staged_by_standbys} staged uploads"
    );
    let leader_page = http_get(running.http_addr.unwrap(), "/metrics").await;
    assert_eq!(
        metric(&leader_page, "tributary_uploads_unstaged_total"),
        staged_by_standbys
    );
    let location = location_of(&data_dir).unwrap();
    let db = Db::open_at(&location).unwrap();
    assert!(db
        .staged_uploads(&ExperimentId("spread".into()))
        .unwrap()
        .is_empty());
    drop(db);
    finish_and_verify(running, &data_dir).await;
}

/// A standby takes at most one body for a task: once the leader decided the task's staged
/// upload, another upload for it is refused before its body is read, and a trainer that keeps
/// sending refusable uploads is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_one_body_per_task() {
    use tributary_shared::wire::{ClientMessage, SubmissionHeader, TrainMetrics};
    use tributary_shared::{BlobHash, CertificateHash};

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("leader");
    let config = parse(&experiment_toml("claims", 1, 1000, 1, 1, 1, 1));
    let running = start_on(Deployment::Cluster, &data_dir, Some(config)).await;
    let (standby, standby_http) = (nodes_of(running.addr)[1], standby_http_of(running.addr)[0]);
    let mallory = identity(40);
    let endpoint = endpoint_for(&running.fingerprint, 40);
    let mut control = Session::connect(&endpoint, running.addr, &mallory, None)
        .await
        .unwrap();
    let task = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(ServerMessage::Task(task)) = control.next_message().await.unwrap() {
                break task;
            }
        }
    })
    .await
    .expect("a task");
    control
        .send(&ClientMessage::TaskAccepted { task: task.task })
        .await
        .unwrap();
    let mut certificate = [0u8; 32];
    hex::decode_to_slice(&running.fingerprint, &mut certificate).unwrap();
    let signed = |body: &[u8]| {
        mallory
            .sign_submission(SubmissionHeader {
                experiment: task.experiment.clone(),
                experiment_uid: task.experiment_uid,
                coordinator: CertificateHash(certificate),
                round: task.round,
                task: task.task,
                trainer: mallory.id(),
                hash: BlobHash::of(body),
                byte_len: body.len() as u64,
                sample_count: 1,
                metrics: TrainMetrics::default(),
            })
            .unwrap()
    };
    let bytes_in = || async {
        http_get(standby_http, "/metrics")
            .await
            .lines()
            .find_map(|line| line.strip_prefix("tributary_bytes_in_total "))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut uploads = Session::connect_for_uploads(&endpoint, standby, &mallory)
        .await
        .unwrap();

    // Bytes that are no delta: the standby takes them, stages them as refused, and the leader
    // records the refusal and tells the trainer on its control session.
    let junk = vec![7u8; 600];
    uploads.upload(&signed(&junk), &junk, None).await.unwrap();
    assert!(matches!(
        answer(&mut uploads).await.unwrap(),
        Some(ServerMessage::UploadStaged { .. })
    ));
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(ServerMessage::SubmissionRejected { reason, .. }) =
                control.next_message().await.unwrap()
            {
                break reason;
            }
        }
    })
    .await
    .expect("the leader decides");
    assert!(!refused.is_coordinator_fault(), "{refused}");
    let taken = bytes_in().await;
    assert!(taken >= junk.len() as u64, "{taken}");

    // Other bytes for the decided task: refused before the body is read. Each refusal here is
    // a strike (the junk was the leader's to refuse, so none); after `MAX_STRIKES` the trainer
    // is refused at once, as busy, on this connection and at the hello of a new one.
    for attempt in 0..tributary_coordinator::net::relay::MAX_STRIKES + 1 {
        let other = vec![attempt as u8; 600];
        uploads.upload(&signed(&other), &other, None).await.unwrap();
        let reason = match answer(&mut uploads).await.unwrap() {
            Some(ServerMessage::SubmissionRejected { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        let expected = if attempt < tributary_coordinator::net::relay::MAX_STRIKES {
            RejectReason::Replay
        } else {
            RejectReason::RateLimited
        };
        assert_eq!(reason, expected, "upload {attempt}");
    }
    match Session::connect_for_uploads(&endpoint, standby, &mallory).await {
        Err(NetError::Refused { reason, .. }) => assert_eq!(reason, RejectReason::RateLimited),
        other => panic!("a trainer out of strikes was let in: {other:?}"),
    }
    assert_eq!(bytes_in().await, taken, "a refused upload's body was read");
    running.shutdown().await.unwrap();
}

/// The next message on `session`, within 30 s.
async fn answer(session: &mut Session) -> Result<Option<ServerMessage>, NetError> {
    tokio::time::timeout(Duration::from_secs(30), session.next_message())
        .await
        .expect("an answer")
}
