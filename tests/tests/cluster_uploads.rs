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
    let config = parse(&experiment_toml("spread", 3, 1000, 5, 5, 5, 5));
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
    let mut staged_by_standbys = 0;
    for http in standby_http_of(running.addr) {
        staged_by_standbys += metric(
            &http_get(http, "/metrics").await,
            "tributary_uploads_staged_total",
        );
    }
    assert!(
        staged_by_standbys >= staged_uploads.len() as u64,
        "{staged_by_standbys}"
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
