//! Starting a coordinator: open the data directory, resolve the experiment, resume its state,
//! bind the QUIC endpoint and the optional HTTP listener, and spawn the hub and accept loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tributary_shared::config::ExperimentConfig;
use tributary_shared::{BlobHash, ExperimentId, TaskId};

use crate::net::hub::Command;

use crate::derive::encode_exact;
use crate::engine::{Engine, EngineConfig};
use crate::metrics::Metrics;
use crate::net::address_quota::AddressQuota;
use crate::net::connection::HandshakeGuard;
use crate::net::connection::{self, ConnectionContext, ConnectionLimits};
use crate::net::hub::{now_ms, Hub, Progress};
use crate::net::tls::{self, TransportLimits};
use crate::net::upload_queue::{UploadQueue, UploadQueueLimits};
use crate::store::blobs::BlobStore;
use crate::store::db::Db;

/// Where the TLS certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// Made on first start and kept in `DATA_DIR/tls`, for these subject names.
    SelfSigned {
        /// DNS names or IP addresses.
        names: Vec<String>,
    },
    /// Given by the operator (PEM files).
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The data directory (database, blobs, TLS identity).
    pub data_dir: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// The experiment to run; `None` resumes the latest unfinished one in the data directory.
    pub experiment: Option<ExperimentConfig>,
    /// HTTP listen address for `/healthz`, `/metrics`, `/status`, the hub and the operator's
    /// pause button.
    pub http: Option<SocketAddr>,
    /// Allow `http` to be a non-loopback address (the hub and `/metrics` become reachable
    /// from the network; put a reverse proxy with TLS in front).
    pub http_public: bool,
    /// TLS certificate source.
    pub tls: TlsSource,
    /// A base model file to serve to trainers by hash (trainers without it download it once).
    pub base_model: Option<PathBuf>,
    /// Connection-level limits.
    pub limits: ServerLimits,
    /// The leader lease's timing, when the metadata is in PostgreSQL (where several nodes may
    /// share it; with SQLite the data directory's lock already keeps one writer).
    pub lease: crate::lease::LeaseTiming,
}

/// Limits on what peers may use. Each limit that turns a peer away is counted in `/metrics`
/// (`tributary_limit_hits_total{limit=..}`).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Per-connection limits.
    pub connection: ConnectionLimits,
    /// QUIC transport limits.
    pub transport: TransportLimits,
    /// Connections at once from one IPv4 address or one IPv6 /64 (one household or host: a
    /// peer holding many IPv6 addresses of its /64 counts once).
    pub connections_per_address: usize,
    /// Connections in their handshake at once, across all peers (`handshakes_in_flight`).
    pub max_handshakes: usize,
    /// Above this many connections in their handshake, a peer whose address QUIC has not
    /// validated is first sent a Retry, so spoofed source addresses cannot use up the
    /// handshake or per-address limits.
    pub retry_above_handshakes: usize,
    /// Uploads received at once, and the queue of those waiting.
    pub uploads: UploadQueueLimits,
    /// Downloads of file-backed blobs (older adapters, the base model) at once: each holds a
    /// file open.
    pub concurrent_file_downloads: usize,
    /// The HTTP listener's limits.
    pub http: crate::http::HttpLimits,
    /// How often unreferenced blob files are collected (also once at start).
    pub gc_interval: std::time::Duration,
    /// How old an unreferenced blob file must be to be collected.
    pub gc_grace: std::time::Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            connection: ConnectionLimits::default(),
            transport: TransportLimits::default(),
            connections_per_address: 64,
            max_handshakes: 1024,
            retry_above_handshakes: 64,
            uploads: UploadQueueLimits::default(),
            concurrent_file_downloads: 256,
            http: crate::http::HttpLimits::default(),
            gc_interval: std::time::Duration::from_secs(600),
            gc_grace: crate::store::gc::DEFAULT_GRACE,
        }
    }
}

/// A started coordinator.
#[derive(Debug)]
pub struct Running {
    /// The bound QUIC address.
    pub addr: SocketAddr,
    /// The bound HTTP address, if any.
    pub http_addr: Option<SocketAddr>,
    /// SHA-256 of the certificate, for trainers to pin.
    pub fingerprint: String,
    /// The experiment served.
    pub experiment: ExperimentId,
    /// Round progress.
    pub progress: watch::Receiver<Progress>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    hub: JoinHandle<anyhow::Result<()>>,
    endpoint: quinn::Endpoint,
    /// The leader lease, when several nodes share the database.
    leadership: Option<crate::leadership::Leadership>,
    /// Held while serving: no second `serve` on the same data directory.
    _lock: crate::durable::DataDirLock,
}

impl Running {
    /// Stops serving and waits for the hub to end.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"shutting down");
        let result = self.hub.await.context("the hub task panicked")?;
        self.endpoint.wait_idle().await;
        // The hub has written its last batch: a standby node may take over at once.
        if let Some(leadership) = self.leadership {
            leadership.release().await;
        }
        result
    }

    /// Waits until the hub ends on its own (a storage failure), this node loses the leader
    /// lease ([`crate::lease::LostLeadership`]), or `stop` resolves.
    pub async fn wait(mut self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let lost = async {
            match self.leadership.as_mut() {
                Some(leadership) => {
                    let _ = leadership.lost.wait_for(|lost| *lost).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            result = &mut self.hub => {
                self.endpoint.close(quinn::VarInt::from_u32(0), b"coordinator stopped");
                result.context("the hub task panicked")?
            }
            _ = lost => {
                // Stop at once: another node may lead already, and this one's writes are
                // fenced off anyway.
                let _ = self.shutdown.send(true);
                self.endpoint.close(quinn::VarInt::from_u32(0), b"no longer the leader");
                let _ = (&mut self.hub).await;
                Err(anyhow::Error::new(crate::lease::LostLeadership))
            }
            _ = stop => self.shutdown().await,
        }
    }
}

/// Opens the data directory and the experiment, and starts serving.
pub async fn start(options: ServeOptions) -> anyhow::Result<Running> {
    if let Some(http) = options.http {
        if !http.ip().is_loopback() && !options.http_public {
            bail!(
                "--http {http} is not a loopback address: the hub, /metrics and /admin would be \
                 reachable from the network; pass --http-public to mean it"
            );
        }
    }
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("cannot create {}", options.data_dir.display()))?;
    let lock = crate::durable::lock_data_dir(&options.data_dir)?;
    let blobs = BlobStore::open_in(&options.data_dir).context("cannot open the blob store")?;
    let location = crate::store::db::location_of(&options.data_dir)?;
    let identity = match &options.tls {
        TlsSource::SelfSigned { names } => tls::load_or_create(&options.data_dir, names)?,
        TlsSource::Files { cert, key } => tls::load_pem(cert, key)?,
    };
    let server_config = tls::server_config(&identity, &options.limits.transport)?;
    let endpoint = bind_endpoint(&options.data_dir, server_config, options.listen)?;
    let addr = endpoint.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    let operator = crate::operator::load_or_create(&options.data_dir)
        .context("cannot read or create the operator key")?;
    let http_context = |role| crate::http::HttpContext {
        metrics: metrics.clone(),
        role,
        operator: operator.id(),
        data_dir: options.data_dir.clone(),
        limits: options.limits.http.clone(),
        blobs: blobs.clone(),
        last_order_ms: 0,
    };
    let mut http_at = options.http;
    // Several nodes may share a PostgreSQL database: only the lease holder runs the
    // experiment. Until this node holds it, trainers are refused (they try the next node),
    // and its HTTP listener serves the hub pages from the shared stores, then hands its
    // address over to the leader's listener.
    let leadership = match &location {
        crate::store::db::Location::Postgres(_) => {
            let node = crate::leadership::node_id(&options.data_dir)?;
            let standby_http = match options.http {
                Some(http) => {
                    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                    let stopped = async {
                        let _ = stopped.await;
                    };
                    let (bound, task) =
                        crate::http::spawn(http, http_context(crate::http::Role::Standby), stopped)
                            .await?;
                    http_at = Some(bound);
                    Some((stop, task))
                }
                None => None,
            };
            // Meanwhile trainers' uploads are checked and staged for the leader here; control
            // sessions are sent on to the leader.
            let (relay_tx, relay) = watch::channel(None);
            let (stop_standby, standby_stopped) = watch::channel(false);
            let relay_inputs = RelayInputs {
                experiment: options
                    .experiment
                    .as_ref()
                    .map(|config| config.experiment.name.clone()),
                location: location.clone(),
                node: node.clone(),
                fingerprint: identity.fingerprint.clone(),
                blobs: blobs.clone(),
                metrics: metrics.clone(),
                limits: options.limits.clone(),
            };
            // Usually the leader made the experiment already: the relay is ready before the
            // first connection is accepted.
            let ready = match initial_relay(&relay_inputs) {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "standby: cannot stage uploads yet"
                    );
                    None
                }
            };
            let _ = relay_tx.send(ready);
            // Follows the leader: a new leader, or the next experiment, changes the relay.
            tokio::spawn(follow_leader_experiment(
                relay_inputs,
                relay_tx,
                wait_for(standby_stopped.clone()),
            ));
            let standby = tokio::spawn(accept_loop(
                endpoint.clone(),
                metrics.clone(),
                AcceptLimits::of(&options.limits),
                wait_for(standby_stopped),
                move |incoming, _id, handshake| {
                    let relay = relay.borrow().clone();
                    async move {
                        match relay {
                            Some(relay) => crate::net::relay::run(relay, incoming, handshake).await,
                            None => incoming.refuse(),
                        }
                    }
                },
            ));
            tracing::info!(node, %addr, "waiting for the leader lease");
            let acquired =
                crate::leadership::acquire(&location, &node, &addr.to_string(), options.lease)
                    .await;
            let _ = stop_standby.send(true);
            let _ = standby.await;
            if let Some((stop, task)) = standby_http {
                let _ = stop.send(());
                let _ = task.await;
            }
            let (lease_db, holder) = acquired?;
            Some(crate::leadership::Leadership::keep(lease_db, node, holder))
        }
        crate::store::db::Location::Sqlite(_) => None,
    };
    let mut db = Db::open_at(&location)
        .with_context(|| format!("cannot open the database at {location}"))?;
    // Every batch this node commits checks that it still holds the lease.
    db.set_fence(
        leadership
            .as_ref()
            .map(|leadership| leadership.fence.clone()),
    );
    let served_model = match options.base_model.clone() {
        Some(path) => {
            let blobs = blobs.clone();
            let served =
                tokio::task::spawn_blocking(move || serve_base_model(&blobs, &path)).await??;
            Some(served)
        }
        None => None,
    };
    // A new experiment started with a served model pins that model's hash in its stored
    // configuration, so a restart with another file is refused rather than silently mixing
    // base models.
    let requested = options.experiment.clone().map(|mut config| {
        if let (None, Some((hash, _))) = (&config.model.hash, served_model) {
            config.model.hash = Some(hash.to_hex());
        }
        config
    });
    let ledger_key = crate::operator::load_or_create_key(
        &options.data_dir.join(crate::operator::LEDGER_KEY_FILE),
    )
    .context("cannot read or create the ledger key")?;
    let config = resolve_experiment(&mut db, &blobs, requested.as_ref(), &ledger_key)?;
    let experiment = ExperimentId(config.experiment.name.clone());
    if leadership.is_some() {
        // Standby nodes stage uploads for the experiment the leader runs.
        db.record_led_experiment(crate::store::leases::LEADER, &experiment.0)
            .context("cannot record which experiment this leader runs")?;
    }
    let stored = db
        .experiment(&experiment)?
        .context("the experiment was just resolved")?;
    if stored.signer != ledger_key.id() {
        bail!(
            "experiment {experiment}'s ledger is signed by key {}, but this data directory's \
             {} is {}: restore the original key",
            stored.signer,
            crate::operator::LEDGER_KEY_FILE,
            ledger_key.id()
        );
    }
    let resume = db.resume_state(&experiment)?;
    let max_elements = config.adapter.layout()?.element_count();
    let (head, rounds_closed, optimizer_state) =
        crate::net::hub::load_chain(&db, &blobs, &experiment, max_elements)?;
    tracing::info!(
        experiment = %experiment,
        round = %resume.round,
        rounds_closed,
        accepted_in_round = resume.accepted.len(),
        "experiment loaded"
    );
    let mut engine_config = EngineConfig::from_experiment(&config)?;
    if let (Some((hash, bytes)), Some(path)) = (served_model, &options.base_model) {
        if let Some(pinned) = engine_config.base_model_hash {
            if pinned != hash {
                bail!(
                    "{} has hash {hash}, but the experiment pins model.hash = {pinned}",
                    path.display()
                );
            }
        }
        engine_config.base_model_hash = Some(hash);
        tracing::info!(model = %path.display(), %hash, bytes, "serving the base model");
    }
    let certificate = certificate_of(&identity.fingerprint)?;
    // Submissions are signed for this experiment instance and this coordinator.
    engine_config.experiment_uid = stored.uid;
    engine_config.coordinator = tributary_shared::CertificateHash(certificate);
    let engine = Engine::new(engine_config, resume);
    let admission = load_admission(&config.admission, &db)?;
    let signer = Arc::new(crate::net::hub::LedgerSigner {
        key: ledger_key,
        experiment_uid: stored.uid,
        coordinator: tributary_shared::CertificateHash(certificate),
        config_hash: BlobHash::of(stored.config_json.as_bytes()),
    });

    metrics
        .current_round
        .store(engine.round().0, std::sync::atomic::Ordering::Relaxed);
    let last_order = crate::operator::last_order(&db, &options.data_dir)
        .context("cannot read the operator's last order")?;
    Metrics::set(&metrics.fleet_duty_ppm, u64::from(last_order.duty_ppm));
    // Bounded: a flood from peers slows them down (back-pressure) instead of growing memory.
    let (commands, inbox) = mpsc::channel(COMMAND_QUEUE);
    let (progress_tx, progress) = watch::channel(Progress::default());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let hub = Hub::new(
        Arc::new(config),
        engine,
        db,
        blobs.clone(),
        metrics.clone(),
        (head, rounds_closed),
        optimizer_state,
        progress_tx,
        commands.clone(),
        options.data_dir.clone(),
        last_order.duty_ppm,
    )
    .serving_base_model(served_model)
    .admitting(admission)
    .signing(signer);
    let hub = tokio::spawn(hub.run(inbox, wait_for(shutdown_rx.clone())));
    tokio::spawn(collect_garbage(
        options.data_dir.clone(),
        served_model.map(|(hash, _)| hash).into_iter().collect(),
        options.limits.clone(),
        metrics.clone(),
        wait_for(shutdown_rx.clone()),
    ));

    let http_commands = commands.clone();
    let context = Arc::new(ConnectionContext {
        commands,
        blobs: blobs.clone(),
        metrics: metrics.clone(),
        limits: options.limits.connection.clone(),
        transport: options.limits.transport.clone(),
        uploads: Arc::new(UploadQueue::new(
            options.limits.uploads.clone(),
            metrics.clone(),
        )),
        file_downloads: Arc::new(Semaphore::new(
            options.limits.concurrent_file_downloads.max(1),
        )),
        experiment: experiment.clone(),
        server_certificate: certificate,
    });
    if let crate::store::db::Location::Postgres(_) = &location {
        tokio::spawn(feed_staged_uploads(
            location.clone(),
            experiment.clone(),
            context.commands.clone(),
            wait_for(shutdown_rx.clone()),
        ));
    }
    tokio::spawn(accept_loop(
        endpoint.clone(),
        metrics.clone(),
        AcceptLimits::of(&options.limits),
        wait_for(shutdown_rx.clone()),
        move |incoming, id, handshake| connection::run(context.clone(), incoming, id, handshake),
    ));

    let http_addr = match http_at {
        Some(http) => {
            let role = crate::http::Role::Leader {
                progress: progress.clone(),
                commands: http_commands,
            };
            let context = crate::http::HttpContext {
                last_order_ms: last_order.issued_ms,
                ..http_context(role)
            };
            Some(
                crate::http::spawn(http, context, wait_for(shutdown_rx))
                    .await?
                    .0,
            )
        }
        None => None,
    };
    tracing::info!(%addr, fingerprint = %identity.fingerprint, "coordinator listening");
    Ok(Running {
        addr,
        http_addr,
        fingerprint: identity.fingerprint,
        experiment,
        progress,
        metrics,
        shutdown,
        hub,
        endpoint,
        leadership,
        _lock: lock,
    })
}

/// The experiment's admission rules, with its tokens or allowlist file read and the token
/// bindings already made.
fn load_admission(
    section: &tributary_shared::config::AdmissionSection,
    db: &Db,
) -> anyhow::Result<crate::admission::Admission> {
    use tributary_shared::config::AdmissionMode;
    let read =
        |path: &str| std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"));
    let tokens = match (&section.mode, &section.tokens_file) {
        (AdmissionMode::Token, Some(path)) => crate::admission::parse_tokens(&read(path)?)
            .map_err(|error| anyhow::anyhow!("{path}: {error}"))?,
        _ => Vec::new(),
    };
    let allowlist = match (&section.mode, &section.allowlist_file) {
        (AdmissionMode::Allowlist, Some(path)) => {
            crate::admission::parse_allowlist(&read(path)?)
                .map_err(|error| anyhow::anyhow!("{path}: {error}"))?
        }
        _ => Default::default(),
    };
    tracing::info!(
        mode = ?section.mode,
        tokens = tokens.len(),
        allowlisted = allowlist.len(),
        identities_per_address = section.identities_per_address,
        "admission"
    );
    Ok(crate::admission::Admission::new(
        section.mode,
        tokens,
        db.token_bindings()?,
        allowlist,
        section.identities_per_address,
    ))
}

/// Collects unreferenced blob files at start and then every `gc_interval`, off the async
/// threads; a failure is logged and tried again next time.
async fn collect_garbage(
    data_dir: PathBuf,
    roots: std::collections::BTreeSet<BlobHash>,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (dir, roots_now) = (data_dir.clone(), roots.clone());
        let grace = limits.gc_grace;
        let collected = tokio::task::spawn_blocking(move || {
            crate::store::gc::collect(&dir, &roots_now, grace, false)
        })
        .await;
        match collected {
            Ok(Ok(report)) => {
                Metrics::add(&metrics.gc_removed, report.removed);
                Metrics::add(&metrics.gc_bytes_freed, report.bytes_freed);
                if report.removed > 0 {
                    tracing::info!(
                        removed = report.removed,
                        bytes = report.bytes_freed,
                        "unreferenced blobs collected"
                    );
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "blob collection failed"),
            Err(error) => tracing::warn!(%error, "blob collection panicked"),
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(limits.gc_interval) => {}
        }
    }
}

/// Puts the base model file into the blob store (once; it is named by its hash) so that
/// downloads can stream it; returns its hash and length.
fn serve_base_model(blobs: &BlobStore, path: &std::path::Path) -> anyhow::Result<(BlobHash, u64)> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the base model {}", path.display()))?;
    let hash = BlobHash::of(&bytes);
    if blobs.stored_len(&hash)?.is_none() {
        blobs
            .put_hashed(hash, &bytes)
            .context("cannot store the base model")?;
    }
    Ok((hash, bytes.len() as u64))
}

/// Finds or creates the experiment in the database; returns its configuration.
fn resolve_experiment(
    db: &mut Db,
    blobs: &BlobStore,
    requested: Option<&ExperimentConfig>,
    ledger_key: &tributary_shared::identity::Identity,
) -> anyhow::Result<ExperimentConfig> {
    let Some(config) = requested else {
        let stored = db.experiments()?;
        let Some(latest) = stored.iter().rev().find(|e| !e.finished).or(stored.last()) else {
            bail!("the data directory holds no experiment: pass --experiment FILE");
        };
        return serde_json::from_str(&latest.config_json)
            .with_context(|| format!("stored configuration of {} does not parse", latest.id));
    };
    let id = ExperimentId(config.experiment.name.clone());
    // Defaults are written into what is stored, so they can change without changing a round.
    let pinned = config.pinned();
    let json = serde_json::to_string(&pinned)?;
    if let Some(stored) = db.experiment(&id)? {
        let stored_config: ExperimentConfig = serde_json::from_str(&stored.config_json)
            .with_context(|| format!("stored configuration of {id} does not parse"))?;
        if stored_config != pinned && &stored_config != config {
            bail!(
                "experiment {id} already exists in this data directory with a different \
                 configuration; rename the experiment or use another --data-dir"
            );
        }
        return Ok(stored_config);
    }
    let initial = config.adapter.initial_adapter(config.experiment.seed)?;
    let bytes = encode_exact(&initial);
    let hash = blobs.put(&bytes)?;
    // Round 0's secret; its commitment is published with the experiment.
    let first_secret = tributary_shared::selection::RoundSecret::generate(&mut rand::rngs::OsRng);
    db.create_experiment(&crate::store::db::NewExperiment {
        id: &id,
        config_json: &json,
        initial_adapter: hash,
        adapter_len: bytes.len() as u64,
        first_secret: &first_secret,
        uid: tributary_shared::ExperimentUid(rand::random()),
        signer: ledger_key.id(),
        now_ms: now_ms(),
    })?;
    tracing::info!(experiment = %id, adapter = %hash.short(), params = initial.element_count(), "experiment created");
    Ok(pinned)
}

/// What the accept loop enforces; see [`ServerLimits`].
#[derive(Debug, Clone, Copy)]
struct AcceptLimits {
    per_address: usize,
    max_handshakes: usize,
    retry_above: usize,
}

impl AcceptLimits {
    fn of(limits: &ServerLimits) -> Self {
        Self {
            per_address: limits.connections_per_address,
            max_handshakes: limits.max_handshakes,
            retry_above: limits.retry_above_handshakes,
        }
    }
}

/// The certificate's SHA-256 from its hex fingerprint (what hellos and submissions sign).
fn certificate_of(fingerprint: &str) -> anyhow::Result<[u8; 32]> {
    let mut certificate = [0u8; 32];
    hex::decode_to_slice(fingerprint, &mut certificate)
        .context("the certificate fingerprint is 32 bytes of hex")?;
    Ok(certificate)
}

/// What a standby node reads its relay's setup from.
struct RelayInputs {
    /// The experiment `--experiment` names (else the latest unfinished one).
    experiment: Option<String>,
    location: crate::store::db::Location,
    node: String,
    /// The cluster certificate's SHA-256, as hex.
    fingerprint: String,
    blobs: BlobStore,
    metrics: Arc<Metrics>,
    limits: ServerLimits,
}

/// Keeps the standby node's relay (`net::relay`) on the experiment the leader runs: every 2 s
/// it reads which one that is and sets the relay up again when it changed (a new leader, the
/// next experiment). Until the database holds one, every connection is refused.
async fn follow_leader_experiment(
    inputs: RelayInputs,
    relay: watch::Sender<Option<Arc<crate::net::relay::RelayContext>>>,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let inputs = Arc::new(inputs);
    let mut warned = false;
    // One connection for the reads, opened again after an error.
    let mut reader: Option<Db> = None;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
        let current = relay.borrow().as_ref().map(|context| {
            (
                context.config.experiment.clone(),
                context.config.experiment_uid,
            )
        });
        let attempt = inputs.clone();
        let held = reader.take();
        let checked = tokio::task::spawn_blocking(move || {
            let db = match held {
                Some(db) => db,
                None => Db::open_at(&attempt.location)
                    .context("cannot open the database for the relay")?,
            };
            let changed = match relay_experiment(&db, &attempt)? {
                Some(found) if Some((found.id.clone(), found.uid)) != current => {
                    let relay_db = Db::open_at(&attempt.location)
                        .context("cannot open the database for the relay")?;
                    Some(standby_relay(&attempt, relay_db, &found)?)
                }
                _ => None,
            };
            Ok::<_, anyhow::Error>((db, changed))
        })
        .await;
        match checked {
            Ok(Ok((db, changed))) => {
                reader = Some(db);
                if let Some(context) = changed {
                    let _ = relay.send(Some(context));
                }
                warned = false;
            }
            Ok(Err(error)) if !warned => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "standby: cannot follow the leader's experiment"
                );
                warned = true;
            }
            _ => {}
        }
    }
}

/// The experiment a standby node stages uploads for: the one the leader says it runs, else the
/// one `--experiment` names, else the latest unfinished one; `None` while there is none.
fn relay_experiment(
    db: &Db,
    inputs: &RelayInputs,
) -> anyhow::Result<Option<crate::store::db::StoredExperiment>> {
    let stored = db.experiments()?;
    let led = db.led_experiment(crate::store::leases::LEADER)?;
    let found = match led.as_ref().or(inputs.experiment.as_ref()) {
        Some(name) => stored.into_iter().find(|e| &e.id.0 == name),
        None => stored.into_iter().rev().find(|e| !e.finished),
    };
    Ok(found)
}

/// The standby's relay when the database already holds the leader's experiment (see
/// [`relay_experiment`]); `None` while it does not.
fn initial_relay(
    inputs: &RelayInputs,
) -> anyhow::Result<Option<Arc<crate::net::relay::RelayContext>>> {
    let db = Db::open_at(&inputs.location).context("cannot open the database for the relay")?;
    match relay_experiment(&db, inputs)? {
        Some(found) => standby_relay(inputs, db, &found).map(Some),
        None => Ok(None),
    }
}

/// What a standby node needs to stage uploads for the leader's experiment `found`: its
/// configuration with its instance id and the cluster's certificate.
fn standby_relay(
    inputs: &RelayInputs,
    db: Db,
    found: &crate::store::db::StoredExperiment,
) -> anyhow::Result<Arc<crate::net::relay::RelayContext>> {
    let config: ExperimentConfig = serde_json::from_str(&found.config_json)
        .with_context(|| format!("stored configuration of {} does not parse", found.id))?;
    let mut engine_config = EngineConfig::from_experiment(&config)?;
    let certificate = certificate_of(&inputs.fingerprint)?;
    engine_config.experiment_uid = found.uid;
    engine_config.coordinator = tributary_shared::CertificateHash(certificate);
    tracing::info!(experiment = %found.id, "standby: staging uploads for the leader");
    let limits = &inputs.limits;
    Ok(Arc::new(crate::net::relay::RelayContext {
        node: inputs.node.clone(),
        config: engine_config,
        db: Arc::new(std::sync::Mutex::new(db)),
        blobs: inputs.blobs.clone(),
        metrics: inputs.metrics.clone(),
        limits: limits.connection.clone(),
        transport: limits.transport.clone(),
        uploads: Arc::new(UploadQueue::new(
            limits.uploads.clone(),
            inputs.metrics.clone(),
        )),
        server_certificate: certificate,
        strikes: Default::default(),
    }))
}

/// Hands the uploads standby nodes staged to the hub, reading the database every
/// [`crate::net::relay::INGEST_EVERY`]. A row is handed over again while it is still there a
/// second later (the batch deciding on it failed, or has not committed yet); the hub decides
/// once per engine generation.
async fn feed_staged_uploads(
    location: crate::store::db::Location,
    experiment: ExperimentId,
    commands: mpsc::Sender<Command>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    const AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
    tokio::pin!(shutdown);
    let reads = Arc::new(crate::store::read_pool::ReadPool::new(location, 1));
    let mut handed: std::collections::HashMap<(TaskId, BlobHash), std::time::Instant> =
        Default::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(crate::net::relay::INGEST_EVERY) => {}
        }
        let id = experiment.clone();
        let keys = reads
            .read(move |db| db.staged_keys(&id).map_err(anyhow::Error::from))
            .await;
        let keys = match keys {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot read the staged uploads"
                );
                continue;
            }
        };
        let now = std::time::Instant::now();
        let present: std::collections::HashSet<_> = keys.iter().copied().collect();
        handed.retain(|key, _| present.contains(key));
        for (task, hash) in keys {
            if handed
                .get(&(task, hash))
                .is_some_and(|at| now.saturating_duration_since(*at) < AGAIN_AFTER)
            {
                continue;
            }
            let id = experiment.clone();
            let row = reads
                .read(move |db| {
                    db.staged_upload(&id, task, hash)
                        .map_err(anyhow::Error::from)
                })
                .await;
            let command = match row {
                Ok(Some(Ok(upload))) => Command::Staged(Box::new(upload)),
                Ok(Some(Err(reason))) => Command::StagedUnreadable { task, hash, reason },
                // Decided since the keys were read.
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "cannot read a staged upload");
                    break;
                }
            };
            handed.insert((task, hash), now);
            if commands.send(command).await.is_err() {
                return;
            }
        }
    }
}

pub use crate::net::address_quota::address_key;

async fn accept_loop<F>(
    endpoint: quinn::Endpoint,
    metrics: Arc<Metrics>,
    limits: AcceptLimits,
    shutdown: impl std::future::Future<Output = ()>,
    serve: impl Fn(quinn::Incoming, u64, HandshakeGuard) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let quota = AddressQuota::new(limits.per_address);
    let mut next_id = 0u64;
    loop {
        let incoming = tokio::select! {
            _ = &mut shutdown => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let in_flight = metrics
            .handshakes_in_flight
            .load(std::sync::atomic::Ordering::Relaxed) as usize;
        // Under load, make the peer prove its address before it costs a handshake or counts
        // against an address's quota.
        if in_flight >= limits.retry_above && !incoming.remote_address_validated() {
            if incoming.may_retry() {
                metrics.count_limit("address_validation_retry");
                let _ = incoming.retry();
            } else {
                incoming.ignore();
            }
            continue;
        }
        if in_flight >= limits.max_handshakes {
            metrics.count_limit("handshakes_in_flight");
            incoming.refuse();
            continue;
        }
        let Some(slot) = quota.try_acquire(incoming.remote_address().ip()) else {
            tracing::warn!(
                address = %address_key(incoming.remote_address().ip()),
                "connection refused: too many from this address"
            );
            metrics.count_limit("connections_per_address");
            incoming.refuse();
            continue;
        };
        next_id += 1;
        let handshake = HandshakeGuard::new(metrics.clone());
        let served = serve(incoming, next_id, handshake);
        tokio::spawn(async move {
            served.await;
            drop(slot);
        });
    }
}

/// Binds the QUIC endpoint with a stateless-reset key (and connection-id key) kept in the data directory: after a
/// restart, trainers still holding a connection to the old process get a valid stateless reset
/// on their next packet and reconnect at once, instead of waiting for their idle timeout.
fn bind_endpoint(
    data_dir: &std::path::Path,
    server_config: quinn::ServerConfig,
    listen: SocketAddr,
) -> anyhow::Result<quinn::Endpoint> {
    let key_path = data_dir.join("tls").join("reset.key");
    let secret = match std::fs::read(&key_path) {
        Ok(secret) if secret.len() == 64 => secret,
        _ => {
            let secret: Vec<u8> = (0..64).map(|_| rand::random::<u8>()).collect();
            std::fs::create_dir_all(data_dir.join("tls"))?;
            crate::durable::write_atomically(&key_path, &secret, true)
                .with_context(|| format!("cannot write {}", key_path.display()))?;
            secret
        }
    };
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // Connection ids must also validate after a restart, or the new process drops the old
    // connections' packets before considering a reset.
    let cid_key = u64::from_le_bytes(
        blake3::hash(&secret).as_bytes()[..8]
            .try_into()
            .expect("a blake3 hash has 8 bytes to spare"),
    );
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = bind_udp(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let runtime = quinn::default_runtime().context("no async runtime for quic")?;
    quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
        .with_context(|| format!("cannot start quic on {listen}"))
}

/// Commands waiting for the hub at most; senders wait beyond that.
const COMMAND_QUEUE: usize = 8192;

/// Receive buffer asked for the QUIC socket; the kernel caps it at `net.core.rmem_max`.
const UDP_RECEIVE_BUFFER: usize = 8 << 20;

/// Binds the UDP socket with a large receive buffer: one socket serves every trainer, and with
/// the default (about 200 KiB on Linux) bursts from hundreds of trainers overflow it, which
/// QUIC then pays for with retransmissions.
fn bind_udp(listen: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        // Accept IPv4-mapped peers too where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    if let Err(error) = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        tracing::warn!(%error, "cannot enlarge the udp receive buffer");
    }
    let _ = socket.set_send_buffer_size(UDP_RECEIVE_BUFFER);
    socket.bind(&listen.into())?;
    match socket.recv_buffer_size() {
        Ok(size) if size < UDP_RECEIVE_BUFFER => tracing::info!(
            bytes = size,
            "udp receive buffer is capped by the system (raise net.core.rmem_max for large fleets)"
        ),
        _ => {}
    }
    Ok(socket.into())
}

async fn wait_for(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}
