//! A coordinator process killed with SIGKILL mid-round restarts into a consistent state and the
//! round completes with every acknowledged delta; in a three-node cluster on PostgreSQL and S3,
//! another node takes over from a killed leader; a store away for 10 s loses nothing.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tributary_shared::wire::ServerMessage;
use tributary_shared::{BlobHash, ExperimentId, RoundId};
use tributary_tests::synthetic::{Fault, Gate};

const BINARY: &str = env!("CARGO_BIN_EXE_coordinator-under-test");

/// Starts the coordinator binary and reads its address and fingerprint from stdout.
async fn spawn_coordinator(
    data_dir: &Path,
    experiment: &Path,
    listen: &str,
    storage: &Storage,
) -> (Child, SocketAddr, String) {
    let mut child = Command::new(BINARY)
        .args(["serve", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", listen, "--experiment"])
        .arg(experiment)
        .args(&storage.args)
        .envs(storage.env.iter().cloned())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(data_dir.with_extension("log"))
                .unwrap(),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("coordinator binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut addr, mut fingerprint) = (None, None);
    while addr.is_none() || fingerprint.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("coordinator prints its address in time")
            .unwrap()
            .expect("coordinator stdout stays open");
        if let Some(rest) = line.strip_prefix("listening on ") {
            addr = Some(rest.trim().parse::<SocketAddr>().unwrap());
        }
        if let Some(rest) = line.strip_prefix("certificate sha-256 fingerprint: ") {
            fingerprint = Some(rest.trim().to_owned());
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr.unwrap(), fingerprint.unwrap())
}

/// Four synthetic trainers of one run. Trainer 0 holds its round-1 upload until `gate` opens
/// (and sends it to `held_upload_node` when given); the others upload at once.
struct Fleet {
    gate: Arc<Gate>,
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<tributary_tests::synthetic::Report>>>,
    received: mpsc::UnboundedReceiver<(tributary_shared::TrainerId, ServerMessage)>,
    round_of_task: std::collections::BTreeMap<tributary_shared::TaskId, RoundId>,
    /// Every acknowledged delta, and those of round 1.
    acknowledged: BTreeSet<BlobHash>,
    acknowledged_in_round_1: BTreeSet<BlobHash>,
    /// Deltas of round 1 a standby staged.
    staged_in_round_1: BTreeSet<BlobHash>,
}

impl Fleet {
    fn start(
        coordinators: &[SocketAddr],
        fingerprint: &str,
        first_seed: u64,
        reconnect_for: Duration,
        held_upload_node: Option<SocketAddr>,
    ) -> Self {
        let gate = Gate::new(1);
        let (events, received) = mpsc::unbounded_channel();
        let mut handles = Vec::new();
        for seed in 0..4u64 {
            let mut options = options(coordinators[0], first_seed + seed, Fault::None, None);
            options.coordinators = coordinators.to_vec();
            options.reconnect_for = reconnect_for;
            options.events = Some(events.clone());
            if seed == 0 {
                options.gate = Some(gate.clone());
                options.hold_round = RoundId(1);
                options.upload_node = held_upload_node;
            }
            handles.push(spawn_trainer(fingerprint, options));
        }
        Self {
            gate,
            handles,
            received,
            round_of_task: Default::default(),
            acknowledged: BTreeSet::new(),
            acknowledged_in_round_1: BTreeSet::new(),
            staged_in_round_1: BTreeSet::new(),
        }
    }

    fn note(&mut self, message: ServerMessage) {
        match message {
            ServerMessage::Task(task) => {
                self.round_of_task.insert(task.task, task.round);
            }
            ServerMessage::SubmissionAccepted { task, hash } => {
                self.acknowledged.insert(hash);
                if self.round_of_task.get(&task) == Some(&RoundId(1)) {
                    self.acknowledged_in_round_1.insert(hash);
                }
            }
            ServerMessage::UploadStaged { task, hash }
                if self.round_of_task.get(&task) == Some(&RoundId(1)) =>
            {
                self.staged_in_round_1.insert(hash);
            }
            _ => {}
        }
    }

    /// Waits until a standby staged a delta of round 1.
    async fn staged_in_round_1(&mut self) -> BlobHash {
        loop {
            if let Some(hash) = self.staged_in_round_1.first() {
                return *hash;
            }
            let (_, message) = tokio::time::timeout(Duration::from_secs(60), self.received.recv())
                .await
                .expect("a standby stages the held delta")
                .unwrap();
            self.note(message);
        }
    }

    /// Waits for three acknowledgements in round 1 (tracked by task, from the trainers' events).
    async fn three_acknowledged_in_round_1(&mut self) {
        self.acknowledged_in_round_1_at_least(3).await;
    }

    /// Waits until `count` deltas of round 1 are acknowledged to their trainers.
    async fn acknowledged_in_round_1_at_least(&mut self, count: usize) {
        while self.acknowledged_in_round_1.len() < count {
            let (_, message) = tokio::time::timeout(Duration::from_secs(60), self.received.recv())
                .await
                .expect("round 1 progresses")
                .unwrap();
            self.note(message);
        }
    }

    /// Waits for every trainer to finish; returns their reports and notes the events since.
    async fn finish(&mut self) -> Vec<tributary_tests::synthetic::Report> {
        let mut reports = Vec::new();
        for handle in self.handles.drain(..) {
            let report = tokio::time::timeout(Duration::from_secs(120), handle)
                .await
                .expect("trainers finish in time")
                .unwrap()
                .expect("trainer ran to the end");
            assert!(report.finished);
            reports.push(report);
        }
        while let Ok((_, message)) = self.received.try_recv() {
            self.note(message);
        }
        reports
    }
}

/// Where the coordinator keeps its state: extra `serve` arguments and environment.
#[derive(Default)]
struct Storage {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_round_loses_no_acknowledged_delta() {
    sigkill_mid_round(Storage::default()).await;
}

/// The same crash with the metadata in PostgreSQL and the blobs in S3-compatible storage
/// (real servers, started here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_round_loses_no_acknowledged_delta_in_postgres_and_s3() {
    let (_postgres, _objects, storage) = external_storage("crash");
    sigkill_mid_round(storage).await;
}

async fn sigkill_mid_round(storage: Storage) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let experiment = dir.path().join("crash.toml");
    // Four trainers, a round needs all four deltas.
    std::fs::write(&experiment, experiment_toml("crash", 3, 4096, 4, 4, 4, 4)).unwrap();
    let started = std::time::Instant::now();
    let (mut child, addr, fingerprint) =
        spawn_coordinator(&data_dir, &experiment, "127.0.0.1:0", &storage).await;

    let mut fleet = Fleet::start(&[addr], &fingerprint, 300, Duration::from_secs(60), None);
    fleet.three_acknowledged_in_round_1().await;

    eprintln!("three acks after {:?}", started.elapsed());
    // Kill it mid-round: three deltas acknowledged, one outstanding.
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    // Restarted without the storage arguments: the data directory remembers them.
    let restart = Storage {
        env: storage.env.clone(),
        ..Storage::default()
    };
    let (mut child, _, fingerprint_again) =
        spawn_coordinator(&data_dir, &experiment, &addr.to_string(), &restart).await;
    assert_eq!(
        fingerprint_again, fingerprint,
        "the certificate survives restarts"
    );

    eprintln!("restarted after {:?}", started.elapsed());
    // Let the held trainer go: it reconnects, gets its task again and completes the round.
    fleet.gate.arrive();
    for report in fleet.finish().await {
        assert!(
            report.connections >= 2,
            "every trainer reconnected after the crash"
        );
    }
    eprintln!("trainers done after {:?}", started.elapsed());
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    if storage.args.iter().any(|arg| arg == "--blobs") {
        let files = tributary_coordinator::store::blobs::BlobStore::at(data_dir.join("blobs"))
            .list()
            .unwrap();
        assert!(
            files.is_empty(),
            "blobs went to the data directory: {files:?}"
        );
    }
    // The data directory remembers where its metadata went.
    let db = tributary_coordinator::store::db::Db::open_read_only_in(&data_dir).unwrap();
    let ledger = db.ledger(&ExperimentId("crash".into())).unwrap();
    assert_eq!(ledger.len(), 3, "all rounds closed");
    let round1: BTreeSet<BlobHash> = ledger[1].1.accepted.iter().map(|a| a.hash).collect();
    assert_eq!(round1.len(), 4);
    assert!(
        fleet.acknowledged_in_round_1.is_subset(&round1),
        "an acknowledged delta is missing from round 1"
    );
    let stdout = verify(&data_dir, &storage);
    assert!(stdout.contains("3 rounds re-derived"), "{stdout}");
}

/// Runs `verify` on the data directory; returns what it printed once it passed.
fn verify(data_dir: &Path, storage: &Storage) -> String {
    let output = std::process::Command::new(BINARY)
        .args(["verify", "--data-dir"])
        .arg(data_dir)
        .envs(storage.env.iter().cloned())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "verify failed: {stdout}");
    stdout
}

/// A store the coordinator depends on, taken away and brought back.
enum Outage<'a> {
    Database(&'a mut tributary_coordinator::store::test_postgres::TestPostgres),
    Objects(&'a mut tributary_coordinator::store::test_garage::TestGarage),
}

impl Outage<'_> {
    fn stop(&mut self) {
        match self {
            Self::Database(server) => server.stop(),
            Self::Objects(server) => server.stop(),
        }
    }

    fn start(&mut self) {
        match self {
            Self::Database(server) => server.start_again().unwrap(),
            Self::Objects(server) => drop(server.start_again().unwrap()),
        }
    }
}

/// PostgreSQL and Garage, started here, and the `serve` arguments that use them.
fn external_storage(
    name: &str,
) -> (
    tributary_coordinator::store::test_postgres::TestPostgres,
    tributary_coordinator::store::test_garage::TestGarage,
    Storage,
) {
    use tributary_coordinator::store::{test_garage::TestGarage, test_postgres::TestPostgres};
    let postgres = TestPostgres::start().unwrap();
    let objects = TestGarage::start().unwrap();
    let storage = Storage {
        args: vec![
            "--database".into(),
            postgres.create_database(name).unwrap(),
            "--blobs".into(),
            objects.url(name),
        ],
        env: objects.env(),
    };
    (postgres, objects, storage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_away_for_ten_seconds_mid_round_loses_nothing() {
    let (mut postgres, _objects, storage) = external_storage("db_away");
    store_away_mid_round(storage, Outage::Database(&mut postgres)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_away_for_ten_seconds_at_round_close_loses_nothing() {
    let (_postgres, mut objects, storage) = external_storage("objects_away");
    store_away_mid_round(storage, Outage::Objects(&mut objects)).await;
}

/// Three deltas of round 1 acknowledged, then the store goes away for 10 s while the fourth is
/// uploaded and the round closes (the database records the upload and the round; the object
/// store takes the round's aggregate and adapter). Nothing acknowledged may be lost, and the run
/// must finish and verify once the store is back.
async fn store_away_mid_round(storage: Storage, mut outage: Outage<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let experiment = dir.path().join("outage.toml");
    std::fs::write(&experiment, experiment_toml("outage", 3, 4096, 4, 4, 4, 4)).unwrap();
    let (mut child, addr, fingerprint) =
        spawn_coordinator(&data_dir, &experiment, "127.0.0.1:0", &storage).await;
    let mut fleet = Fleet::start(&[addr], &fingerprint, 400, Duration::from_secs(90), None);
    fleet.three_acknowledged_in_round_1().await;
    outage.stop();
    fleet.gate.arrive();
    tokio::time::sleep(Duration::from_secs(10)).await;
    outage.start();
    let back = std::time::Instant::now();
    fleet.finish().await;
    eprintln!("finished {:?} after the store came back", back.elapsed());
    let log = std::fs::read_to_string(data_dir.with_extension("log")).unwrap();
    let noticed = match outage {
        Outage::Database(_) => "a database batch failed",
        Outage::Objects(_) => "cannot close the round",
    };
    assert!(log.contains(noticed), "the outage went unnoticed:\n{log}");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let db = tributary_coordinator::store::db::Db::open_read_only_in(&data_dir).unwrap();
    let ledger = db.ledger(&ExperimentId("outage".into())).unwrap();
    assert_eq!(ledger.len(), 3, "all rounds closed");
    let accepted: BTreeSet<BlobHash> = ledger
        .iter()
        .flat_map(|(_, entry)| entry.accepted.iter().map(|a| a.hash))
        .collect();
    assert!(ledger.iter().all(|(_, entry)| entry.accepted.len() == 4));
    assert!(
        fleet.acknowledged.is_subset(&accepted),
        "an acknowledged delta is missing from the ledger"
    );
    verify(&data_dir, &storage);
}

/// A coordinator node of a cluster, run as a process; its output lines (stdout and the log)
/// arrive on `lines` and are also appended to `DATA_DIR.log`.
struct Node {
    child: Child,
    addr: SocketAddr,
    data_dir: std::path::PathBuf,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Node {
    async fn spawn(
        dir: &Path,
        name: &str,
        experiment: &Path,
        storage: &Storage,
        env: &[(&str, &str)],
    ) -> Self {
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir).unwrap();
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut child = Command::new(BINARY)
            .args(["serve", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", &addr.to_string(), "--lease-seconds", "2"])
            .arg("--experiment")
            .arg(experiment)
            .args(&storage.args)
            .envs(storage.env.iter().cloned())
            .envs(
                env.iter()
                    .map(|(key, value)| (key.to_string(), value.to_string())),
            )
            .env("RUST_LOG", "info,quinn=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("coordinator binary starts");
        let (sender, lines) = mpsc::unbounded_channel();
        let log = data_dir.with_extension("log");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for reader in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(stderr),
        ] {
            let (sender, log) = (sender.clone(), log.clone());
            tokio::spawn(async move {
                use std::io::Write as _;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap();
                let mut reader = BufReader::new(reader).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let _ = writeln!(file, "{line}");
                    let _ = sender.send(line);
                }
            });
        }
        Self {
            child,
            addr,
            data_dir,
            lines,
        }
    }

    /// Waits for a line containing every one of `parts`; returns it.
    async fn wait_for(&mut self, parts: &[&str], within: Duration) -> String {
        tokio::time::timeout(within, async {
            loop {
                let line = self
                    .lines
                    .recv()
                    .await
                    .expect("the node's output stays open");
                if parts.iter().all(|part| line.contains(part)) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no line with {parts:?} within {within:?}"))
    }

    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let status = self.child.wait().await.unwrap();
        assert!(!status.success());
    }
}

/// Gives `to` the cluster's identity from `from`: the TLS certificate (trainers pin it and
/// sign for it), the ledger key (it signs every entry) and the operator key.
fn copy_identity(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("tls")).unwrap();
    for file in ["tls/cert.pem", "tls/key.pem", "ledger.key", "operator.key"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

/// Where a cluster's failover is triggered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KillLeader {
    /// Three deltas of round 1 acknowledged, one outstanding.
    MidRound,
    /// Every delta of round 1 in, the round's aggregation under way.
    MidAggregation,
    /// Not killed: frozen (SIGSTOP) mid-round for three lease durations, then let go. It
    /// must find itself deposed and step down, and none of its writes after the takeover
    /// may land (the fencing token). While it is frozen, the round's last delta goes to a
    /// standby, which stages it: the new leader must take it over from the staged row.
    Frozen,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_mid_round_is_replaced_and_loses_nothing() {
    leader_killed(KillLeader::MidRound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_aggregation_is_replaced_and_loses_nothing() {
    leader_killed(KillLeader::MidAggregation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_replaced_and_steps_down_when_it_wakes() {
    leader_killed(KillLeader::Frozen).await;
}

fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("the node runs").to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Three nodes on one PostgreSQL database and one bucket; four trainers that know all three
/// addresses. The leader is killed with SIGKILL; another node must take over within seconds,
/// and the run must finish with every acknowledged delta in the ledger and verify.
async fn leader_killed(when: KillLeader) {
    let name = match when {
        KillLeader::MidRound => "failover_round",
        KillLeader::MidAggregation => "failover_aggregation",
        KillLeader::Frozen => "failover_frozen",
    };
    let (_postgres, _objects, storage) = external_storage(name);
    let dir = tempfile::tempdir().unwrap();
    let experiment = dir.path().join("failover.toml");
    std::fs::write(&experiment, experiment_toml(name, 3, 4096, 4, 4, 4, 4)).unwrap();
    // The first leader holds each aggregation for a while, so the kill lands inside one.
    let hold: &[(&str, &str)] = match when {
        KillLeader::MidRound | KillLeader::Frozen => &[],
        KillLeader::MidAggregation => &[("TRIBUTARY_FAULT_DERIVE_DELAY_MS", "3000")],
    };
    let mut a = Node::spawn(dir.path(), "a", &experiment, &storage, hold).await;
    let fingerprint = a
        .wait_for(
            &["certificate sha-256 fingerprint: "],
            Duration::from_secs(60),
        )
        .await
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    for standby in ["b", "c"] {
        copy_identity(&a.data_dir, &dir.path().join(standby));
    }
    let mut b = Node::spawn(dir.path(), "b", &experiment, &storage, &[]).await;
    let mut c = Node::spawn(dir.path(), "c", &experiment, &storage, &[]).await;
    for node in [&mut b, &mut c] {
        node.wait_for(&["standby: another node leads"], Duration::from_secs(30))
            .await;
    }

    let nodes = [a.addr, b.addr, c.addr];
    let held_upload_node = (when == KillLeader::Frozen).then_some(c.addr);
    let mut fleet = Fleet::start(
        &nodes,
        &fingerprint,
        500,
        Duration::from_secs(60),
        held_upload_node,
    );
    fleet.three_acknowledged_in_round_1().await;
    if when == KillLeader::MidAggregation {
        fleet.gate.arrive();
        // The round closes once its fourth delta is committed; its acknowledgement goes out
        // after the commit and may trail the log line, and a kill before it reaches the trainer
        // would lose it (the trainer's re-sent upload is then a replay).
        fleet.acknowledged_in_round_1_at_least(4).await;
        a.wait_for(&["closing round", "round=1"], Duration::from_secs(60))
            .await;
    }
    let killed = std::time::Instant::now();
    let mut staged = None;
    if when == KillLeader::Frozen {
        signal(&a.child, "-STOP");
        fleet.gate.arrive();
        staged = Some(fleet.staged_in_round_1().await);
    } else {
        a.kill().await;
    }
    let leader_is_b = tokio::select! {
        _ = b.wait_for(&["listening on"], Duration::from_secs(30)) => true,
        _ = c.wait_for(&["listening on"], Duration::from_secs(30)) => false,
    };
    let takeover = killed.elapsed();
    eprintln!(
        "{when:?}: node {} took over {takeover:?} after the leader was killed (lease 2 s)",
        if leader_is_b { "b" } else { "c" }
    );
    assert!(
        takeover < Duration::from_secs(15),
        "took over after {takeover:?}"
    );
    if when == KillLeader::Frozen {
        tokio::time::sleep(Duration::from_secs(6).saturating_sub(killed.elapsed())).await;
        signal(&a.child, "-CONT");
        a.wait_for(&["lost the leader lease; exiting"], Duration::from_secs(20))
            .await;
        let status = tokio::time::timeout(Duration::from_secs(20), a.child.wait())
            .await
            .expect("a deposed leader exits")
            .unwrap();
        assert_eq!(
            status.code(),
            Some(75),
            "EX_TEMPFAIL: restart it to stand by"
        );
    }
    if when == KillLeader::MidRound {
        fleet.gate.arrive();
    }
    for report in fleet.finish().await {
        assert!(
            report.connections >= 2,
            "every trainer moved to the new leader"
        );
    }
    let (leader, standby) = if leader_is_b {
        (&mut b, &mut c)
    } else {
        (&mut c, &mut b)
    };
    // The other standby node never led.
    while let Ok(line) = standby.lines.try_recv() {
        assert!(!line.contains("listening on"), "two leaders: {line}");
    }
    let data_dir = leader.data_dir.clone();
    leader.kill().await;
    standby.kill().await;

    let db = tributary_coordinator::store::db::Db::open_read_only_in(&data_dir).unwrap();
    let ledger = db.ledger(&ExperimentId(name.into())).unwrap();
    assert_eq!(ledger.len(), 3, "all rounds closed");
    assert!(ledger.iter().all(|(_, entry)| entry.accepted.len() == 4));
    let accepted: BTreeSet<BlobHash> = ledger
        .iter()
        .flat_map(|(_, entry)| entry.accepted.iter().map(|a| a.hash))
        .collect();
    assert!(
        fleet.acknowledged.is_subset(&accepted),
        "an acknowledged delta is missing from the ledger"
    );
    match staged {
        // Staged while the old leader was frozen and decided by the new one from the staged
        // row. The round may close on it before its trainer is back to hear so.
        Some(hash) => {
            let round_1 = ledger
                .iter()
                .find(|(_, entry)| entry.round == RoundId(1))
                .expect("round 1 closed");
            assert!(
                round_1.1.accepted.iter().any(|delta| delta.hash == hash),
                "the staged delta is not in round 1"
            );
            assert!(db
                .staged_uploads(&ExperimentId(name.into()))
                .unwrap()
                .is_empty());
        }
        None => assert_eq!(fleet.acknowledged_in_round_1.len(), 4),
    }
    let stdout = verify(&data_dir, &storage);
    assert!(stdout.contains("3 rounds re-derived"), "{stdout}");
}
