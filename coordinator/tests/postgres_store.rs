//! The metadata store on a real PostgreSQL server (started here with `initdb`), against the
//! same writes on SQLite, and what PostgreSQL adds: lost connections, aborted transactions,
//! read-only sessions, schema versions, and data directories bound to a database.

use tributary_coordinator::store::db::{bind_data_dir, location_of, Db, Location, NewExperiment};
use tributary_coordinator::store::test_postgres::TestPostgres;
use tributary_shared::ledger::{AcceptedDelta, RejectedSubmission};
use tributary_shared::selection::RoundSecret;
use tributary_shared::wire::RejectReason;
use tributary_shared::{BlobHash, ExperimentId, ExperimentUid, RoundId, TaskId, TrainerId};

fn experiment() -> ExperimentId {
    ExperimentId("store".into())
}

fn create(db: &mut Db) {
    db.create_experiment(&NewExperiment {
        id: &experiment(),
        config_json: r#"{"experiment":{"publish_deltas":true}}"#,
        initial_adapter: BlobHash([1; 32]),
        adapter_len: 1234,
        first_secret: &RoundSecret([2; 32]),
        uid: ExperimentUid([3; 32]),
        signer: TrainerId([4; 32]),
        now_ms: 10,
    })
    .unwrap();
}

fn delta(n: u8, task: u64) -> AcceptedDelta {
    AcceptedDelta {
        hash: BlobHash([n; 32]),
        trainer: TrainerId([n.wrapping_add(100); 32]),
        weight: u64::from(n) * 3,
        claimed_samples: 1,
        reported_train_loss: 2.5,
        byte_len: 4096 + u64::from(n),
        task: TaskId(task),
        reported_steps: 1,
        reported_tokens: 1,
        reported_train_ms: 1,
        signature: Vec::new(),
    }
}

/// A round's worth of writes, in one batch as the hub makes them.
fn write_a_round(db: &mut Db) {
    let id = experiment();
    db.begin_batch().unwrap();
    // Hash order differs from task order, and bytes above 0x7f sort after the rest.
    for (n, task) in [(0xf0u8, 1u64), (0x10, 2), (0x80, 3)] {
        let delta = delta(n, task);
        db.record_task(&id, RoundId(0), delta.task, delta.trainer, None, None, 20)
            .unwrap();
        db.record_trainer(delta.trainer, "trainer/1.0", 20 + i64::from(n))
            .unwrap();
        db.put_inline(&delta.hash, &[n; 100]).unwrap();
        db.record_submission(&id, RoundId(0), delta.task, &delta, &[n, 1, 2, 3], 30)
            .unwrap();
    }
    db.record_task(
        &id,
        RoundId(0),
        TaskId(4),
        TrainerId([9; 32]),
        Some(TaskId(1)),
        None,
        21,
    )
    .unwrap();
    db.record_rejection(
        &id,
        RoundId(0),
        &RejectedSubmission {
            trainer: Some(TrainerId([9; 32])),
            hash: None,
            reason: RejectReason::BadSignature,
            detail: "ünïcode détail".into(),
        },
        40,
    )
    .unwrap();
    db.record_rejection(
        &id,
        RoundId(0),
        &RejectedSubmission {
            trainer: None,
            hash: Some(BlobHash([7; 32])),
            reason: RejectReason::HashMismatch,
            detail: String::new(),
        },
        41,
    )
    .unwrap();
    db.record_token_binding(&tributary_coordinator::admission::TokenBinding {
        token: [5; 32],
        trainer: TrainerId([6; 32]),
    })
    .unwrap();
    db.commit_batch().unwrap();
}

/// Everything the readers see, as text.
fn reads(db: &Db) -> Vec<String> {
    let id = experiment();
    vec![
        format!("{:?}", db.experiments().unwrap()),
        serde_json::to_string(&db.status(&id).unwrap()).unwrap(),
        format!("{:?}", db.round_submissions(&id, RoundId(0)).unwrap()),
        format!("{:?}", db.rejections(&id, RoundId(0)).unwrap()),
        format!("{:?}", db.token_bindings().unwrap()),
        format!("{:?}", db.referenced_blobs().unwrap()),
        format!("{:?}", db.inline_blob(&BlobHash([0x80; 32])).unwrap()),
        format!("{:?}", db.blob_visibility(&BlobHash([0x10; 32])).unwrap()),
        format!("{:?}", db.adapter_len(&BlobHash([1; 32])).unwrap()),
        format!("{:?}", db.round_start(&id, RoundId(0)).unwrap()),
    ]
}

fn postgres(server: &TestPostgres, name: &str) -> Location {
    Location::Postgres(server.create_database(name).unwrap())
}

#[test]
fn the_same_writes_read_back_the_same_from_sqlite_and_postgres() {
    let server = TestPostgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = Db::open(&dir.path().join("tributary.db")).unwrap();
    let mut pg = Db::open_at(&postgres(&server, "same")).unwrap();
    for db in [&mut sqlite, &mut pg] {
        create(db);
        write_a_round(db);
    }
    let (from_sqlite, from_postgres) = (reads(&sqlite), reads(&pg));
    for (a, b) in from_sqlite.iter().zip(&from_postgres) {
        assert_eq!(a, b);
    }
    // Aggregation reads the round's deltas in hash order, bytes compared unsigned.
    let order: Vec<u8> = pg
        .round_submissions(&experiment(), RoundId(0))
        .unwrap()
        .iter()
        .map(|(hash, _)| hash.0[0])
        .collect();
    assert_eq!(order, [0x10, 0x80, 0xf0]);
    // Another session (another node) sees what was committed.
    let other = Db::open_read_only_at(&Location::Postgres(server.url("same"))).unwrap();
    assert_eq!(reads(&other), from_postgres);
}

#[test]
fn a_batch_with_a_failed_statement_commits_nothing() {
    let server = TestPostgres::start().unwrap();
    let mut db = Db::open_at(&postgres(&server, "aborted")).unwrap();
    create(&mut db);
    let id = experiment();
    db.begin_batch().unwrap();
    db.record_trainer(TrainerId([1; 32]), "a", 1).unwrap();
    db.record_submission(&id, RoundId(0), TaskId(1), &delta(1, 1), b"h", 1)
        .unwrap();
    // The same delta twice: PostgreSQL aborts the transaction, and would answer a COMMIT by
    // rolling back without an error.
    let duplicate = db.record_submission(&id, RoundId(0), TaskId(1), &delta(1, 1), b"h", 1);
    assert!(duplicate.is_err());
    let commit = db.commit_batch().unwrap_err();
    assert!(commit.to_string().contains("aborted"), "{commit}");
    db.rollback_batch().unwrap();
    let status = db.status(&id).unwrap();
    assert_eq!((status.accepted, status.trainers), (0, 0));
    // The session is usable again.
    db.record_trainer(TrainerId([2; 32]), "b", 2).unwrap();
    assert_eq!(db.status(&id).unwrap().trainers, 1);
}

#[test]
fn a_connection_lost_inside_a_batch_fails_the_batch_and_the_store_reconnects() {
    let server = TestPostgres::start().unwrap();
    let mut db = Db::open_at(&postgres(&server, "lost")).unwrap();
    create(&mut db);
    let id = experiment();
    db.begin_batch().unwrap();
    db.record_trainer(TrainerId([1; 32]), "a", 1).unwrap();
    server
        .run_sql(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'lost'",
        )
        .unwrap();
    // Never reopened silently mid-transaction: the rest of the batch would commit alone.
    assert!(db
        .record_submission(&id, RoundId(0), TaskId(1), &delta(1, 1), b"h", 1)
        .is_err());
    assert!(db.commit_batch().is_err());
    db.rollback_batch().unwrap();
    db.record_trainer(TrainerId([2; 32]), "b", 2).unwrap();
    let status = db.status(&id).unwrap();
    assert_eq!((status.accepted, status.trainers), (0, 1));
}

#[test]
fn text_from_strangers_is_stored_even_with_a_nul() {
    let server = TestPostgres::start().unwrap();
    let mut db = Db::open_at(&postgres(&server, "nul")).unwrap();
    create(&mut db);
    db.begin_batch().unwrap();
    db.record_trainer(TrainerId([1; 32]), "evil\0agent", 1)
        .unwrap();
    db.record_rejection(
        &experiment(),
        RoundId(0),
        &RejectedSubmission {
            trainer: None,
            hash: None,
            reason: RejectReason::Malformed,
            detail: "bad \0 frame".into(),
        },
        2,
    )
    .unwrap();
    db.commit_batch().unwrap();
    assert_eq!(db.status(&experiment()).unwrap().trainers, 1);
    assert_eq!(
        db.rejections(&experiment(), RoundId(0)).unwrap()[0].detail,
        "bad \u{fffd} frame"
    );
}

#[test]
fn a_read_only_session_refuses_writes() {
    let server = TestPostgres::start().unwrap();
    let location = postgres(&server, "readonly");
    create(&mut Db::open_at(&location).unwrap());
    let reader = Db::open_read_only_at(&location).unwrap();
    assert_eq!(reader.experiments().unwrap().len(), 1);
    let error = reader
        .record_trainer(TrainerId([1; 32]), "a", 1)
        .unwrap_err();
    assert!(error.to_string().contains("read-only"), "{error}");
}

#[test]
fn a_database_of_another_schema_version_is_refused() {
    let server = TestPostgres::start().unwrap();
    let location = postgres(&server, "version");
    drop(Db::open_at(&location).unwrap());
    // Opening again (another node starting) keeps it.
    drop(Db::open_at(&location).unwrap());
    server
        .run_sql("version", "UPDATE tributary_schema SET version = 99")
        .unwrap();
    let error = Db::open_at(&location).unwrap_err();
    assert!(error.to_string().contains("schema version 99"), "{error}");
}

#[test]
fn a_data_directory_stays_bound_to_its_database() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = location_of(dir.path()).unwrap();
    assert_eq!(sqlite, Location::Sqlite(dir.path().join("tributary.db")));
    let pg = Location::Postgres("postgres://tributary@db.internal/one".into());
    bind_data_dir(dir.path(), &pg).unwrap();
    bind_data_dir(dir.path(), &pg).unwrap();
    assert_eq!(location_of(dir.path()).unwrap(), pg);
    let other = Location::Postgres("postgres://tributary@db.internal/two".into());
    assert!(bind_data_dir(dir.path(), &other).is_err());
    assert!(bind_data_dir(dir.path(), &sqlite).is_err());
    // A directory that already holds a SQLite database is not moved under PostgreSQL.
    let used = tempfile::tempdir().unwrap();
    drop(Db::open(&used.path().join("tributary.db")).unwrap());
    assert!(bind_data_dir(used.path(), &pg).is_err());
}

/// The hub pages' shared sessions: 32 concurrent reads use at most the pool's 4 server
/// connections, and each sees the committed data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_page_reads_share_a_few_sessions() {
    use std::sync::Arc;
    use tributary_coordinator::store::read_pool::ReadPool;
    let server = TestPostgres::start().unwrap();
    let location = postgres(&server, "pool");
    let mut db = Db::open_at(&location).unwrap();
    create(&mut db);
    let pool = Arc::new(ReadPool::new(location, 4));
    let reads: Vec<_> = (0..32)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.read(|db| {
                    // Hold the session a moment, so the reads overlap.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    db.experiments()
                        .map(|list| list.len())
                        .map_err(anyhow::Error::from)
                })
                .await
            })
        })
        .collect();
    for read in reads {
        assert_eq!(read.await.unwrap().unwrap(), 1);
    }
    let sessions = pool.idle();
    assert!((1..=4).contains(&sessions), "{sessions} sessions opened");
}

/// TLS to a server that requires it: the session verifies the server against the CA given,
/// and a server whose certificate no trusted CA signed is refused.
#[test]
fn tls_sessions_verify_the_server() {
    let server = TestPostgres::start_with_tls().unwrap();
    let url = server.create_database("tls").unwrap();
    assert!(url.contains("sslmode=verify-full"), "{url}");
    let mut db = Db::open_at(&Location::Postgres(url)).unwrap();
    create(&mut db);
    assert_eq!(db.experiments().unwrap().len(), 1);

    // The server rejects plain TCP, so the session above was TLS.
    let plain = Db::open_at(&Location::Postgres(server.plain_url("tls"))).unwrap_err();
    assert!(plain.to_string().contains("no encryption"), "{plain}");
    // Without the CA, the system's roots do not vouch for this server.
    let base = server.plain_url("tls");
    let unverified =
        Db::open_at(&Location::Postgres(format!("{base}&sslmode=require"))).unwrap_err();
    assert!(
        unverified.to_string().contains("certificate"),
        "{unverified}"
    );
    // Another CA does not either.
    let other = TestPostgres::start_with_tls().unwrap();
    let wrong_ca = format!(
        "{base}&sslmode=verify-full&sslrootcert={}",
        other.ca_file().display()
    );
    let refused = Db::open_at(&Location::Postgres(wrong_ca)).unwrap_err();
    assert!(refused.to_string().contains("certificate"), "{refused}");
}
