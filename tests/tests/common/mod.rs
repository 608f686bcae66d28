//! Shared set-up for the end-to-end tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tributary_coordinator::service::{self, Running, ServeOptions, ServerLimits, TlsSource};
use tributary_coordinator::settings::load_experiment_str;
use tributary_shared::config::ExperimentConfig;
use tributary_shared::identity::Identity;
use tributary_shared::RoundId;
use tributary_tests::client::client_endpoint;
use tributary_tests::synthetic::{self, Fault, Gate, Report, SyntheticOptions};
use tributary_tests::tls::ServerTrust;

/// A synthetic experiment as TOML.
pub fn experiment_toml(
    name: &str,
    rounds: u64,
    params: u64,
    target: u32,
    tasks: u32,
    quorum: u32,
    min_trainers: u32,
) -> String {
    let over_selection = f64::from(tasks) / f64::from(target);
    format!(
        r#"
[experiment]
name = "{name}"
rounds = {rounds}
seed = 11

[adapter]
kind = "synthetic"
params = {params}
tensors = 4

[selection]
trainers_per_round = {target}
over_selection = {over_selection}
quorum = {quorum}
min_trainers = {min_trainers}
round_timeout_secs = 30
gather_timeout_secs = 30

[training]
codec = {{ kind = "int8", block = 64 }}

[aggregation]
rule = {{ kind = "fed_avg" }}
clip_norm = 10.0

[server_optimizer]
kind = "momentum"
learning_rate = 1.0
beta = 0.5
nesterov = true
"#
    )
}

pub fn parse(toml: &str) -> ExperimentConfig {
    load_experiment_str(toml, "test.toml", Default::default(), &[])
        .expect("test experiment is valid")
}

/// Where an in-process coordinator keeps its state, and how many nodes serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// One node, SQLite and a blob folder in its data directory.
    Embedded,
    /// PostgreSQL and Garage (real servers, started once per test binary) shared by three
    /// nodes: the returned one leads, two more stand by on their own data directories and
    /// ports, and trainers made by this module know all three addresses.
    Cluster,
}

/// The test binary's PostgreSQL and Garage, for [`Deployment::Cluster`].
struct Stores {
    postgres: tributary_coordinator::store::test_postgres::TestPostgres,
    garage: tributary_coordinator::store::test_garage::TestGarage,
    clusters: std::sync::atomic::AtomicU32,
}

fn stores() -> &'static Stores {
    static STORES: std::sync::OnceLock<Stores> = std::sync::OnceLock::new();
    STORES.get_or_init(|| {
        // The servers die with the thread that started them (`setpriv --pdeathsig`), and a
        // test's thread ends with its test: start them on a thread that lives as long as the
        // binary, or the first cluster test to end would stop them under the others.
        let (started, servers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let garage = tributary_coordinator::store::test_garage::TestGarage::start()
                .expect("Garage starts");
            let postgres = tributary_coordinator::store::test_postgres::TestPostgres::start()
                .expect("PostgreSQL starts");
            let _ = started.send((postgres, garage));
            loop {
                std::thread::park();
            }
        });
        let (postgres, garage) = servers.recv().expect("the test servers start");
        // Every node of every cluster in this binary reads its object-store settings from the
        // process environment, as `serve` does.
        for (key, value) in garage.env() {
            std::env::set_var(key, value);
        }
        Stores {
            postgres,
            garage,
            clusters: Default::default(),
        }
    })
}

/// The standby nodes' addresses of each cluster, by its leader's address.
fn standbys() -> &'static std::sync::Mutex<std::collections::HashMap<SocketAddr, Vec<SocketAddr>>> {
    static STANDBYS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<SocketAddr, Vec<SocketAddr>>>,
    > = std::sync::OnceLock::new();
    STANDBYS.get_or_init(Default::default)
}

/// The HTTP addresses the standby nodes of each cluster serve on once they lead, by its
/// leader's address.
fn standby_http(
) -> &'static std::sync::Mutex<std::collections::HashMap<SocketAddr, Vec<SocketAddr>>> {
    static HTTP: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<SocketAddr, Vec<SocketAddr>>>,
    > = std::sync::OnceLock::new();
    HTTP.get_or_init(Default::default)
}

/// Where the standby nodes of the cluster led from `addr` serve HTTP once one of them leads.
pub fn standby_http_of(addr: SocketAddr) -> Vec<SocketAddr> {
    standby_http()
        .lock()
        .unwrap()
        .get(&addr)
        .cloned()
        .unwrap_or_default()
}

/// Every node address a trainer of the coordinator at `addr` should know.
pub fn nodes_of(addr: SocketAddr) -> Vec<SocketAddr> {
    let mut nodes = vec![addr];
    if let Some(more) = standbys().lock().unwrap().get(&addr) {
        nodes.extend(more);
    }
    nodes
}

/// The PostgreSQL database name a cluster node's data directory points at.
pub fn cluster_database(data_dir: &Path) -> String {
    let url = std::fs::read_to_string(data_dir.join("database.url")).unwrap();
    let path = url.trim().rsplit('/').next().unwrap();
    path.split('?').next().unwrap().to_owned()
}

/// Runs SQL in a cluster's database (as the superuser), e.g. to tamper with it.
pub fn cluster_sql(data_dir: &Path, sql: &str) {
    stores()
        .postgres
        .run_sql(&cluster_database(data_dir), sql)
        .unwrap();
}

/// Starts an in-process coordinator on an ephemeral loopback port.
pub async fn start(
    data_dir: &Path,
    config: Option<ExperimentConfig>,
    tokens: Vec<String>,
) -> Running {
    start_serving(data_dir, config, tokens, None).await
}

/// [`start`] as `deployment`.
pub async fn start_on(
    deployment: Deployment,
    data_dir: &Path,
    config: Option<ExperimentConfig>,
) -> Running {
    match deployment {
        Deployment::Embedded => start(data_dir, config, vec![]).await,
        Deployment::Cluster => start_cluster(data_dir, config).await,
    }
}

/// Three nodes on the binary's PostgreSQL and Garage: the first leads (it is returned), the
/// other two stand by on data directories beside `data_dir`, with the cluster's identity.
async fn start_cluster(data_dir: &Path, config: Option<ExperimentConfig>) -> Running {
    use tributary_coordinator::store::{blobs::bind_blobs, db};
    let stores = stores();
    let n = stores
        .clusters
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("cluster_{}_{n}", std::process::id());
    let url = stores.postgres.create_database(&name).unwrap();
    let standby_dirs: Vec<_> = (1..=2)
        .map(|i| data_dir.with_extension(format!("standby{i}")))
        .collect();
    for dir in std::iter::once(data_dir).chain(standby_dirs.iter().map(|d| d.as_path())) {
        std::fs::create_dir_all(dir).unwrap();
        db::bind_data_dir(dir, &db::Location::Postgres(url.clone())).unwrap();
        bind_blobs(dir, &stores.garage.url(&name)).unwrap();
    }
    let leader = start(data_dir, config.clone(), vec![]).await;
    let mut addrs = Vec::new();
    let mut https = Vec::new();
    for dir in standby_dirs {
        std::fs::create_dir_all(dir.join("tls")).unwrap();
        for file in ["tls/cert.pem", "tls/key.pem", "ledger.key", "operator.key"] {
            std::fs::copy(data_dir.join(file), dir.join(file)).unwrap();
        }
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        addrs.push(addr);
        let http = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        https.push(http);
        let options = ServeOptions {
            data_dir: dir,
            listen: addr,
            experiment: config.clone(),
            http: Some(http),
            http_public: false,
            tls: TlsSource::SelfSigned {
                names: vec!["localhost".into()],
            },
            base_model: None,
            lease: Default::default(),
            limits: ServerLimits::default(),
        };
        // Stands by until the leader is gone, then leads until the test ends.
        tokio::spawn(async move {
            match service::start(options).await {
                Ok(running) => {
                    let _ = running.wait(std::future::pending()).await;
                }
                Err(error) => eprintln!("standby node failed: {error:#}"),
            }
        });
    }
    standbys().lock().unwrap().insert(leader.addr, addrs);
    standby_http().lock().unwrap().insert(leader.addr, https);
    leader
}

/// [`start`], also serving `base_model` to trainers by hash.
pub async fn start_serving(
    data_dir: &Path,
    config: Option<ExperimentConfig>,
    tokens: Vec<String>,
    base_model: Option<std::path::PathBuf>,
) -> Running {
    // Tokens, when given, go into a tokens file (hashes only) and the experiment admits by token.
    let config = config.map(|mut config| {
        if !tokens.is_empty() {
            let path = data_dir.with_extension("tokens");
            let lines: String = tokens
                .iter()
                .map(|token| format!("{} 4\n", blake3::hash(token.as_bytes()).to_hex()))
                .collect();
            std::fs::write(&path, lines).unwrap();
            config.admission.mode = tributary_shared::config::AdmissionMode::Token;
            config.admission.tokens_file = Some(path.display().to_string());
        }
        config
    });
    service::start(ServeOptions {
        data_dir: data_dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        experiment: config,
        http: Some("127.0.0.1:0".parse().unwrap()),
        http_public: false,
        tls: TlsSource::SelfSigned {
            names: vec!["localhost".into()],
        },
        base_model,
        lease: Default::default(),
        limits: ServerLimits::default(),
    })
    .await
    .expect("coordinator starts")
}

/// Deterministic identities: the seed is printed by the caller on failure.
pub fn identity(seed: u64) -> Identity {
    use rand::SeedableRng;
    Identity::generate(&mut rand::rngs::StdRng::seed_from_u64(seed))
}

pub fn options(
    addr: std::net::SocketAddr,
    seed: u64,
    fault: Fault,
    gate: Option<Arc<Gate>>,
) -> SyntheticOptions {
    SyntheticOptions {
        coordinators: nodes_of(addr),
        identity: identity(seed),
        fault,
        enrollment_token: None,
        gate,
        hold_round: RoundId(0),
        events: None,
        reconnect_for: Duration::from_secs(20),
        samples: 10 + seed % 7,
        descend: false,
        evaluate: false,
        leak: None,
        spread_uploads: false,
        upload_node: None,
    }
}

/// A client endpoint on a loopback address of its own for trainer `seed` (each machine of a
/// real fleet has its own address; the coordinator counts identities per address).
pub fn endpoint_for(fingerprint: &str, seed: u64) -> quinn::Endpoint {
    tributary_tests::client::client_endpoint_at(
        tributary_tests::load::loopback_address(200_000 + (seed as u32 % 50_000) * 8),
        &ServerTrust::Fingerprint(fingerprint.to_owned()),
    )
    .unwrap()
}

pub fn spawn_trainer(
    fingerprint: &str,
    options: SyntheticOptions,
) -> JoinHandle<anyhow::Result<Report>> {
    let seed = u64::from_le_bytes(options.identity.id().0[..8].try_into().unwrap());
    let endpoint = endpoint_for(fingerprint, seed);
    tokio::spawn(synthetic::run(endpoint, options))
}

/// Fetches a page from the coordinator's HTTP listener (plain HTTP/1.0 over loopback TCP).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    try_http_get(addr, path).await.unwrap()
}

/// [`http_get`], or the error when nothing answers.
pub async fn try_http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// Posts a JSON body to the coordinator's HTTP listener; returns the whole response.
pub async fn http_post_json(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Fetches a page as bytes; returns the status line and the body.
pub async fn http_get_bytes(addr: std::net::SocketAddr, path: &str) -> (String, Vec<u8>) {
    http_get_with(addr, path, &[]).await
}

/// [`http_get_bytes`] with extra request headers (`name: value` lines).
pub async fn http_get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[&str],
) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let status = String::from_utf8_lossy(&response[..split])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    (status, response[split + 4..].to_vec())
}

/// Waits (at most `limit` each) for synthetic trainers to end, and checks that each saw the
/// experiment finish.
pub async fn synthetic_reports(
    handles: Vec<JoinHandle<anyhow::Result<Report>>>,
    limit: Duration,
) -> Vec<Report> {
    let labelled = handles.into_iter().map(|h| (Fault::None, h)).collect();
    fault_reports(labelled, limit)
        .await
        .into_iter()
        .map(|(_, report)| report)
        .collect()
}

/// [`synthetic_reports`] for trainers each labelled with its fault (named when one fails).
pub async fn fault_reports(
    handles: Vec<(Fault, JoinHandle<anyhow::Result<Report>>)>,
    limit: Duration,
) -> Vec<(Fault, Report)> {
    let mut reports = Vec::new();
    for (fault, handle) in handles {
        let report = tokio::time::timeout(limit, handle)
            .await
            .expect("trainer finished in time")
            .expect("trainer task did not panic")
            .unwrap_or_else(|error| panic!("trainer with fault {fault:?} failed: {error:#}"));
        assert!(report.finished, "{fault:?} saw the experiment finish");
        reports.push((fault, report));
    }
    reports
}

/// Waits until the experiment is over and every adapter scored, stops the coordinator and runs
/// `verify` on its data directory.
pub async fn finish_and_verify(running: Running, data_dir: &Path) {
    let mut progress = running.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        progress.wait_for(|p| p.finished && p.evaluations_pending == 0),
    )
    .await
    .expect("every adapter scored")
    .unwrap();
    running.shutdown().await.unwrap();
    tributary_coordinator::verify::verify_data_dir(data_dir).expect("verify passes");
}

/// Waits (at most 300 s each) for burn trainers to end, and checks that each saw the experiment
/// finish and had nothing refused.
pub async fn finished_reports(
    handles: Vec<
        JoinHandle<
            Result<tributary_trainer::worker::JoinReport, tributary_trainer::worker::WorkerError>,
        >,
    >,
) -> Vec<tributary_trainer::worker::JoinReport> {
    let mut reports = Vec::new();
    for handle in handles {
        let report = tokio::time::timeout(Duration::from_secs(300), handle)
            .await
            .expect("trainer finished in time")
            .expect("trainer task did not panic")
            .expect("trainer ran without error");
        assert!(report.finished);
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        reports.push(report);
    }
    reports
}

/// Starts a real burn trainer (`tributary_trainer::worker`) with the tiny model at `model`,
/// computing at most `duty_ppm` of the time and counting its busy time in `busy`.
pub fn spawn_burn_trainer(
    running: &Running,
    model: &Path,
    seed: u64,
    duty_ppm: u32,
    busy: Arc<std::sync::atomic::AtomicU64>,
) -> JoinHandle<Result<tributary_trainer::worker::JoinReport, tributary_trainer::worker::WorkerError>>
{
    spawn_cheating_trainer(running, model, seed, duty_ppm, busy, None)
}

/// [`spawn_burn_trainer`] that does every task differently than asked with `cheat`.
pub fn spawn_cheating_trainer(
    running: &Running,
    model: &Path,
    seed: u64,
    duty_ppm: u32,
    busy: Arc<std::sync::atomic::AtomicU64>,
    cheat: Option<tributary_trainer::attack::Cheat>,
) -> JoinHandle<Result<tributary_trainer::worker::JoinReport, tributary_trainer::worker::WorkerError>>
{
    spawn_trainer_on(
        running,
        model,
        seed,
        duty_ppm,
        busy,
        cheat,
        burn::tensor::Device::flex(),
    )
}

/// [`spawn_cheating_trainer`] on `device`.
pub fn spawn_trainer_on(
    running: &Running,
    model: &Path,
    seed: u64,
    duty_ppm: u32,
    busy: Arc<std::sync::atomic::AtomicU64>,
    cheat: Option<tributary_trainer::attack::Cheat>,
    device: burn::tensor::Device,
) -> JoinHandle<Result<tributary_trainer::worker::JoinReport, tributary_trainer::worker::WorkerError>>
{
    use std::sync::atomic::AtomicU64;
    let endpoint = client_endpoint(&ServerTrust::Fingerprint(running.fingerprint.clone())).unwrap();
    let options = tributary_trainer::worker::JoinOptions {
        coordinators: nodes_of(running.addr),
        identity: identity(seed),
        enrollment_token: None,
        model: model.to_owned(),
        shakespeare: model.with_file_name("no-shakespeare"),
        local_data: None,
        datasets: Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/datasets"),
        model_cache: model.with_file_name(format!("model-cache-{seed}")),
        reconnect_for: Duration::from_secs(20),
        max_duty_ppm: duty_ppm,
        duty: Arc::new(AtomicU64::new(u64::from(duty_ppm))),
        machine_in_use: Arc::default(),
        busy_us: busy,
        status_line: false,
        cheat,
        base_storage: None,
        recompute_layers: false,
    };
    tokio::spawn(tributary_trainer::worker::run(endpoint, options, device))
}

/// Starts four synthetic trainers (identities `first_seed..+4`) on an experiment of four deltas
/// a round, the last of which holds its round-0 upload until the returned gate opens, and waits
/// until the other three deltas are accepted: a round held open with work in it.
pub async fn hold_round_open(
    running: &Running,
    first_seed: u64,
) -> (Arc<Gate>, Vec<JoinHandle<anyhow::Result<Report>>>) {
    let gate = Gate::new(1);
    let mut handles = Vec::new();
    for seed in first_seed..first_seed + 4 {
        let held = (seed == first_seed + 3).then(|| gate.clone());
        let options = options(running.addr, seed, Fault::None, held);
        handles.push(spawn_trainer(&running.fingerprint, options));
    }
    let mut progress = running.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        progress.wait_for(|p| p.accepted_in_round >= 3),
    )
    .await
    .expect("three deltas accepted")
    .unwrap();
    (gate, handles)
}

/// Resident memory of this process, in bytes (Linux).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// The coordinator's current adapter, once the hub has published its state.
pub async fn current_adapter(running: &Running) -> tributary_shared::BlobHash {
    let mut progress = running.progress.clone();
    let adapter = tokio::time::timeout(
        Duration::from_secs(30),
        progress.wait_for(|p| p.adapter.is_some()),
    )
    .await
    .expect("the hub publishes its state")
    .expect("the hub is running")
    .adapter;
    adapter.expect("checked by the wait")
}

/// Waits (10 s at most) until `limit` has turned peers away `at_least` times. Counters have no
/// notification, so this polls; the timeout is the failure bound.
pub async fn wait_for_limit(running: &Running, limit: &str, at_least: u64) {
    let metrics = running.metrics.clone();
    let reached = tokio::time::timeout(Duration::from_secs(10), async {
        while metrics.limited(limit) < at_least {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{limit} was hit {} times, not {at_least}",
        metrics.limited(limit)
    );
}
