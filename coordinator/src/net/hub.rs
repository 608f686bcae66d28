//! The hub: one tokio task that owns the round engine, the metadata database and the registry of
//! connected trainers. Connection tasks talk to it through [`Command`]s; it feeds the engine,
//! drains its actions in order and does their I/O. It holds no round rules of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};
use tributary_shared::aggregate::OptimizerState;
use tributary_shared::config::ExperimentConfig;
use tributary_shared::ledger::{LedgerEntry, RoundMetrics};
use tributary_shared::selection::RoundSecret;
use tributary_shared::wire::{ClientMessage, RejectReason, ServerMessage, UploadHeader};
use tributary_shared::{BlobHash, RoundId, TaskId, TrainerId};

use crate::admission::Admission;
use crate::derive::{
    derive_from_store, encode_exact, encode_state, DeriveError, Derived, RoundInputs,
};
use crate::engine::{Action, Engine, HeaderDecision, Phase, Refusal, RoundClose, UploadTicket};
use crate::metrics::Metrics;
use crate::net::connection::Outbox;
use crate::store::blobs::BlobStore;
use crate::store::db::Db;
use crate::store::StoredBlobs;
use tributary_shared::ledger::CheckVerdict;

/// Most commands handled in one wake-up (and so in one transaction).
const MAX_COMMANDS_PER_WAKE: usize = 1024;

/// A message from a connection task (or the aggregation worker) to the hub.
#[derive(Debug)]
pub enum Command {
    /// An upload a standby node staged, read from the database (see `net::relay`).
    Staged(Box<crate::store::staged::StagedUpload>),
    /// A staged upload whose row cannot be read back (`reason`): decided as lost.
    StagedUnreadable {
        /// Its task.
        task: TaskId,
        /// Its hash.
        hash: BlobHash,
        /// What is wrong with the row.
        reason: String,
    },
    /// A trainer completed the handshake.
    Joined {
        /// Who.
        trainer: TrainerId,
        /// Its agent string.
        agent: String,
        /// Distinguishes this connection from an older one of the same trainer.
        connection_id: u64,
        /// Where its control messages go; also closes the connection (when a newer one
        /// replaces it).
        outbox: Outbox,
    },
    /// May this trainer join? Asked after its hello's signature checked out.
    Admit {
        /// Who.
        trainer: TrainerId,
        /// The enrollment token it presented.
        token: Option<String>,
        /// Its IPv4 address or IPv6 /64.
        address: std::net::IpAddr,
        /// The decision.
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// A connection ended.
    Left {
        /// Who.
        trainer: TrainerId,
        /// Which connection.
        connection_id: u64,
        /// Its IPv4 address or IPv6 /64 (as admitted).
        address: std::net::IpAddr,
    },
    /// A control message from a trainer.
    Client {
        /// Who.
        trainer: TrainerId,
        /// What.
        message: ClientMessage,
    },
    /// An upload header: may the body be received?
    Header {
        /// The connection's identity.
        trainer: TrainerId,
        /// The header.
        upload: Box<UploadHeader>,
        /// The decision.
        reply: oneshot::Sender<HeaderDecision>,
    },
    /// An upload body was received and checked.
    UploadDone {
        /// The ticket it was received under.
        ticket: UploadTicket,
        /// The outcome of the byte-level checks, with the body when it is small enough to be
        /// stored in the database.
        result: Result<Option<Vec<u8>>, Refusal>,
    },
    /// A ticketed upload could not start now (too many in progress); its trainer should send
    /// it again after `retry_after`.
    UploadDeferred {
        /// The ticket it came with.
        ticket: UploadTicket,
        /// When to try again.
        retry_after: std::time::Duration,
    },
    /// A refusal outside any ticket (malformed header, limits).
    Violation {
        /// Who, if known.
        trainer: Option<TrainerId>,
        /// What.
        refusal: Refusal,
    },
    /// Is `hash` downloadable by `trainer` (an adapter, the base model, or the delta of a
    /// loss check it holds)? Replies with where it is.
    Downloadable {
        /// The blob.
        hash: BlobHash,
        /// Who asks.
        trainer: TrainerId,
        /// Where to read it, if it is downloadable.
        reply: oneshot::Sender<Option<Download>>,
    },
    /// The operator set the fleet's duty cycle; replies, once the order is durable, with the
    /// trainers told, or why it was not taken.
    Throttle {
        /// Allowed duty cycle, in millionths.
        duty_ppm: u32,
        /// When the operator issued the order.
        issued_ms: u64,
        /// How many connected trainers were told.
        reply: oneshot::Sender<Result<usize, String>>,
    },
    /// The aggregation worker finished.
    Derived {
        /// The hub's state generation the round was closed in (a reload starts a new one, and
        /// work from an older one is dropped).
        generation: u64,
        /// The round.
        round: Box<RoundClose>,
        /// Its result.
        result: Result<Box<DerivedRound>, DeriveFailure>,
    },
}

/// Why a round could not be derived.
#[derive(Debug)]
pub enum DeriveFailure {
    /// These accepted deltas are gone or damaged for good: the round goes on without them.
    Unreadable(Vec<(BlobHash, String)>),
    /// Something that may pass (disk full, too many open files, a bug): tried again later.
    Transient(String),
}

/// First wait before a failed aggregation is tried again; it doubles up to
/// [`MAX_DERIVE_RETRY`].
const MIN_DERIVE_RETRY: std::time::Duration = std::time::Duration::from_millis(500);
/// Longest wait between aggregation attempts.
const MAX_DERIVE_RETRY: std::time::Duration = std::time::Duration::from_secs(60);
/// First pause after a failed database batch; it doubles up to [`MAX_STORAGE_RETRY`].
const MIN_STORAGE_RETRY: std::time::Duration = std::time::Duration::from_millis(200);
/// Longest pause after failed database batches.
const MAX_STORAGE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a downloadable blob's bytes are.
#[derive(Debug, Clone)]
pub enum Download {
    /// The current adapter, held in memory: most downloads are of it.
    Memory(Arc<Vec<u8>>),
    /// An older adapter, in the blob directory, of this length.
    File(u64),
}

/// A round derived and written to the blob store, ready to commit.
#[derive(Debug)]
pub struct DerivedRound {
    entry: LedgerEntry,
    /// The next round's secret, committed to in `entry`.
    next_secret: RoundSecret,
    adapter_bytes: Arc<Vec<u8>>,
    adapter_len: u64,
    state: OptimizerState,
}

/// What every ledger entry of this coordinator binds to, and the key that signs it.
#[derive(Debug)]
pub struct LedgerSigner {
    /// The coordinator's ledger key.
    pub key: tributary_shared::identity::Identity,
    /// The experiment's random id.
    pub experiment_uid: tributary_shared::ExperimentUid,
    /// This coordinator's certificate hash.
    pub coordinator: tributary_shared::CertificateHash,
    /// blake3 of the experiment's stored configuration.
    pub config_hash: BlobHash,
}

/// What the outside world can watch.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Progress {
    /// The open round.
    pub round: RoundId,
    /// Rounds committed (in total, across restarts).
    pub rounds_closed: u64,
    /// The latest ledger entry's hash.
    pub ledger_head: Option<BlobHash>,
    /// The current adapter.
    pub adapter: Option<BlobHash>,
    /// Every round done.
    pub finished: bool,
    /// Trainers connected now.
    pub connected: usize,
    /// The fleet's allowed duty cycle in millionths (the pause button; 1,000,000 = no limit).
    pub fleet_duty_ppm: u32,
    /// Connected trainers that reported computing at or below the fleet duty.
    pub trainers_obeying: usize,
    /// Evaluations queued or in progress.
    pub evaluations_pending: usize,
    /// Deltas accepted in the open round so far.
    pub accepted_in_round: usize,
}

struct Registered {
    connection_id: u64,
    outbox: Outbox,
    /// The duty cycle the trainer last said it applies.
    applied_duty: Option<u32>,
}

/// The hub's owned state.
pub struct Hub {
    config: Arc<ExperimentConfig>,
    engine: Engine,
    db: Db,
    blobs: BlobStore,
    metrics: Arc<Metrics>,
    registry: HashMap<TrainerId, Registered>,
    ledger_head: Option<BlobHash>,
    optimizer_state: OptimizerState,
    progress: watch::Sender<Progress>,
    commands: mpsc::Sender<Command>,
    rounds_closed: u64,
    data_dir: std::path::PathBuf,
    /// The current adapter's bytes, served to downloads from memory.
    current_adapter: Option<(BlobHash, Arc<Vec<u8>>)>,
    /// Small verified bodies waiting for their `PersistSubmission` in this wake-up.
    inline_bodies: HashMap<BlobHash, Vec<u8>>,
    /// The fleet's allowed duty cycle (the pause button), in millionths.
    fleet_duty: u32,
    /// Operator orders recorded in the open batch, answered once it commits.
    throttled: Vec<oneshot::Sender<Result<usize, String>>>,
    /// The base model file served by hash, and its length.
    base_model: Option<(BlobHash, u64)>,
    /// A round whose aggregation failed for a reason that may pass, and when to try again.
    derive_retry: Option<(Instant, Box<RoundClose>)>,
    /// Consecutive failed aggregation attempts.
    derive_failures: u32,
    /// Who may join.
    admission: Admission,
    /// Signs the ledger entries.
    signer: Option<Arc<LedgerSigner>>,
    /// Counts state reloads; aggregation results of an older generation are dropped.
    generation: u64,
    /// Consecutive failed database batches.
    storage_failures: u32,
    /// After a failed batch: when to reload the state from the database and take commands
    /// again.
    storage_retry_at: Option<Instant>,
    /// Another node took the leader lease: this hub's writes are fenced off, and it stops.
    deposed: bool,
}

/// Whether `error` says that this node no longer holds the leader lease.
pub fn is_fenced(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<crate::store::db::DbError>(),
            Some(crate::store::db::DbError::Fenced { .. })
        )
    })
}

/// Fault injection for the failover tests: `TRIBUTARY_FAULT_DERIVE_DELAY_MS` holds every
/// aggregation that long before it starts, so a test can kill a node mid-aggregation. Unset
/// in any real deployment.
fn fault_injection_delay() {
    let delay = std::env::var("TRIBUTARY_FAULT_DERIVE_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok());
    if let Some(ms) = delay {
        tracing::warn!(ms, "fault injection: aggregation held");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What the ledger says about an experiment's chain: its head, its length and the optimizer
/// state the next round starts from.
pub(crate) fn load_chain(
    db: &Db,
    blobs: &BlobStore,
    experiment: &tributary_shared::ExperimentId,
    max_elements: usize,
) -> anyhow::Result<(Option<BlobHash>, u64, OptimizerState)> {
    let ledger = db.ledger(experiment)?;
    let optimizer_state = match ledger.last().and_then(|(_, entry)| entry.optimizer_state) {
        Some(hash) => crate::derive::decode_state(hash, &blobs.get(&hash)?, max_elements)?,
        None => OptimizerState::default(),
    };
    let head = ledger.last().map(|(hash, _)| *hash);
    Ok((head, ledger.len() as u64, optimizer_state))
}

impl Hub {
    /// Assembles a hub. `commands` is the sender side of the channel [`Hub::run`] reads;
    /// `fleet_duty` is the duty of the operator's last order taken.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<ExperimentConfig>,
        engine: Engine,
        db: Db,
        blobs: BlobStore,
        metrics: Arc<Metrics>,
        (ledger_head, rounds_closed): (Option<BlobHash>, u64),
        optimizer_state: OptimizerState,
        progress: watch::Sender<Progress>,
        commands: mpsc::Sender<Command>,
        data_dir: std::path::PathBuf,
        fleet_duty: u32,
    ) -> Self {
        Self {
            config,
            engine,
            db,
            blobs,
            metrics,
            registry: HashMap::new(),
            ledger_head,
            optimizer_state,
            progress,
            commands,
            rounds_closed,
            current_adapter: None,
            fleet_duty,
            throttled: Vec::new(),
            data_dir,
            inline_bodies: HashMap::new(),
            base_model: None,
            derive_retry: None,
            derive_failures: 0,
            signer: None,
            generation: 0,
            storage_failures: 0,
            storage_retry_at: None,
            deposed: false,
            admission: Admission::new(
                tributary_shared::config::AdmissionMode::Open,
                vec![],
                vec![],
                Default::default(),
                u32::MAX,
            ),
        }
    }

    /// Signs ledger entries with `signer` (required before rounds can close).
    pub fn signing(mut self, signer: Arc<LedgerSigner>) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Applies these admission rules (the default admits anyone).
    pub fn admitting(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// Also serves the base model file (already in the blob store) to downloads.
    pub fn serving_base_model(mut self, base_model: Option<(BlobHash, u64)>) -> Self {
        self.base_model = base_model;
        self
    }

    /// Runs until `shutdown` resolves or a storage failure makes going on unsafe.
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let adapter = self.engine.adapter();
        match self.blobs.get(&adapter) {
            Ok(bytes) => self.current_adapter = Some((adapter, Arc::new(bytes))),
            Err(error) => tracing::warn!(%error, "current adapter not cached"),
        }
        let now = Instant::now();
        if let Err(error) = self.drain(now) {
            self.storage_failed(now, &error);
        }
        loop {
            if self.deposed {
                return Err(anyhow::Error::new(crate::lease::LostLeadership));
            }
            // After a failed batch, nothing is taken in until the state is reloaded.
            let storage_retry_at = self.storage_retry_at;
            let healthy = storage_retry_at.is_none();
            let timeout = self.engine.poll_timeout();
            let retry_at = self.derive_retry.as_ref().map(|(at, _)| *at);
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = sleep_until(storage_retry_at), if !healthy => {
                    let now = Instant::now();
                    self.storage_retry_at = None;
                    let reloaded = self.reload(now).and_then(|()| self.drain(now));
                    match reloaded {
                        Ok(()) => self.storage_failures = 0,
                        Err(error) => self.storage_failed(now, &error),
                    }
                }
                _ = sleep_until(retry_at), if healthy => {
                    if let Some((_, close)) = self.derive_retry.take() {
                        self.spawn_derive(*close);
                    }
                }
                _ = sleep_until(timeout), if healthy => {
                    let now = Instant::now();
                    self.engine.handle_timeout(now);
                    if let Err(error) = self.drain(now) {
                        self.storage_failed(now, &error);
                    }
                }
                command = inbox.recv(), if healthy => {
                    let Some(command) = command else { return Ok(()) };
                    let now = Instant::now();
                    if let Err(error) = self.wake(now, command, &mut inbox) {
                        self.storage_failed(now, &error);
                    }
                }
            }
        }
    }

    /// Handles `command` and what else is already waiting, so one transaction covers it all.
    fn wake(
        &mut self,
        now: Instant,
        command: Command,
        inbox: &mut mpsc::Receiver<Command>,
    ) -> anyhow::Result<()> {
        self.db
            .begin_batch()
            .context("cannot begin a transaction")?;
        self.handle(now, command);
        for _ in 0..MAX_COMMANDS_PER_WAKE {
            let Ok(command) = inbox.try_recv() else { break };
            self.handle(now, command);
        }
        self.drain(now)
    }

    /// A database batch failed: nothing of it happened. Its writes are rolled back, and the
    /// messages and acknowledgements waiting on it are dropped (trainers hear nothing they
    /// could rely on). After a pause that doubles with each consecutive failure, the hub
    /// reloads its state from the database, as a restart would, keeping its connections.
    fn storage_failed(&mut self, now: Instant, error: &anyhow::Error) {
        if is_fenced(error) {
            tracing::error!(
                error = format!("{error:#}"),
                "another node leads now; this node's batch was rolled back and it stops"
            );
            let _ = self.db.rollback_batch();
            self.inline_bodies.clear();
            self.throttled.clear();
            self.deposed = true;
            return;
        }
        let wait = MIN_STORAGE_RETRY
            .saturating_mul(1 << self.storage_failures.min(10))
            .min(MAX_STORAGE_RETRY);
        self.storage_failures += 1;
        Metrics::add(&self.metrics.storage_failures, 1);
        tracing::error!(
            error = format!("{error:#}"), attempt = self.storage_failures, retry_in = ?wait,
            "a database batch failed; rolled back, reloading the state after a pause"
        );
        if let Err(error) = self.db.rollback_batch() {
            tracing::error!(%error, "cannot roll the batch back");
        }
        self.inline_bodies.clear();
        self.throttled.clear();
        self.storage_retry_at = Some(now + wait);
    }

    /// Rebuilds the engine and the chain state from the database, and tells the new engine
    /// who is connected (a trainer with its task still open gets it again, and re-sends an
    /// upload that was not acknowledged).
    fn reload(&mut self, now: Instant) -> anyhow::Result<()> {
        let experiment = self.engine.experiment().clone();
        let resume = self.db.resume_state(&experiment)?;
        let max_elements = self.config.adapter.layout()?.element_count();
        let (head, rounds_closed, optimizer_state) =
            load_chain(&self.db, &self.blobs, &experiment, max_elements)?;
        let current_adapter = match resume.adapter {
            Some((hash, _)) => Some((hash, Arc::new(self.blobs.get(&hash)?))),
            None => None,
        };
        let mut engine = Engine::new(self.engine.config().clone(), resume);
        let mut trainers: Vec<TrainerId> = self.registry.keys().copied().collect();
        trainers.sort_unstable();
        for trainer in trainers {
            engine.handle_trainer_joined(now, trainer);
        }
        self.engine = engine;
        self.generation += 1;
        self.ledger_head = head;
        self.rounds_closed = rounds_closed;
        self.optimizer_state = optimizer_state;
        if current_adapter.is_some() {
            self.current_adapter = current_adapter;
        }
        self.derive_retry = None;
        self.derive_failures = 0;
        // An order of a failed batch was not taken: its operator hears so (the reply is
        // dropped), and the duty is the recorded one.
        self.throttled.clear();
        self.fleet_duty = crate::operator::last_order(&self.db, &self.data_dir)?.duty_ppm;
        Metrics::set(&self.metrics.fleet_duty_ppm, u64::from(self.fleet_duty));
        self.metrics
            .current_round
            .store(self.engine.round().0, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            round = %self.engine.round(), rounds_closed, generation = self.generation,
            "state reloaded from the database"
        );
        Ok(())
    }

    fn handle(&mut self, now: Instant, command: Command) {
        match command {
            Command::Joined {
                trainer,
                agent,
                connection_id,
                outbox,
            } => {
                if let Err(error) = self.db.record_trainer(trainer, &agent, now_ms()) {
                    tracing::error!(%error, "cannot record trainer");
                }
                let previous = self.registry.insert(
                    trainer,
                    Registered {
                        connection_id,
                        outbox: outbox.clone(),
                        applied_duty: None,
                    },
                );
                outbox.send(ServerMessage::Throttle {
                    duty_ppm: self.fleet_duty,
                });
                if let Some(previous) = previous {
                    previous.outbox.close(b"replaced by a newer connection");
                } else {
                    Metrics::add(&self.metrics.trainers_connected, 1);
                }
                self.engine.handle_trainer_joined(now, trainer);
            }
            Command::Admit {
                trainer,
                token,
                address,
                reply,
            } => {
                let decision = if self.engine.is_excluded(&trainer) {
                    Err(Refusal::new(
                        RejectReason::NotSelected,
                        "dropped from this experiment: referees found its work not done as \
                         specified",
                    ))
                } else {
                    self.admission.admit(trainer, token.as_deref(), address)
                };
                let decision = match decision {
                    Ok(Some(binding)) => self
                        .db
                        .record_token_binding(&binding)
                        .map_err(|error| Refusal::new(RejectReason::Internal, error.to_string())),
                    Ok(None) => Ok(()),
                    Err(refusal) => Err(refusal),
                };
                if let Err(refusal) = &decision {
                    self.metrics.count_limit(match refusal.reason {
                        RejectReason::RateLimited => "identities_per_address",
                        _ => "admission",
                    });
                }
                if reply.send(decision).is_err() {
                    // The connection is gone; it will not send `Left`.
                    self.admission.left(trainer, address);
                }
            }
            Command::Left {
                trainer,
                connection_id,
                address,
            } => {
                self.admission.left(trainer, address);
                let current = self
                    .registry
                    .get(&trainer)
                    .is_some_and(|r| r.connection_id == connection_id);
                if current {
                    self.registry.remove(&trainer);
                    self.metrics
                        .trainers_connected
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    self.engine.handle_trainer_left(now, trainer);
                }
            }
            Command::Client { trainer, message } => match message {
                ClientMessage::TaskDeclined { task, detail } => {
                    let detail: String = detail.chars().take(200).collect();
                    tracing::debug!(%trainer, %task, detail = ?detail, "task declined");
                    self.engine.handle_task_declined(now, trainer, task);
                }
                ClientMessage::TaskAccepted { task } => {
                    tracing::debug!(%trainer, %task, "task accepted");
                }
                ClientMessage::Hello { .. } => {
                    tracing::warn!(%trainer, "second hello ignored");
                }
                ClientMessage::EvalResult {
                    task,
                    adapter,
                    loss,
                    tokens,
                    baseline,
                } => {
                    self.engine
                        .handle_eval_result(now, trainer, task, adapter, loss, tokens, baseline);
                }
                ClientMessage::ThrottleApplied { duty_ppm } => {
                    tracing::debug!(%trainer, duty_ppm, "trainer applies the fleet duty");
                    if let Some(entry) = self.registry.get_mut(&trainer) {
                        entry.applied_duty = Some(duty_ppm);
                    }
                }
            },
            Command::Throttle {
                duty_ppm,
                issued_ms,
                reply,
            } => {
                let order = crate::store::fleet::FleetOrder {
                    duty_ppm: duty_ppm.min(tributary_shared::wire::FULL_DUTY_PPM),
                    issued_ms,
                };
                // Recorded in this wake-up's batch: trainers and the operator hear of it once
                // it is durable, and a node that takes over the lead applies it.
                match self.db.record_fleet_order(order) {
                    Ok(true) => {
                        self.fleet_duty = order.duty_ppm;
                        self.throttled.push(reply);
                    }
                    Ok(false) => {
                        let _ = reply.send(Err("a newer order was taken already".into()));
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot record the operator's order");
                        let _ = reply.send(Err("cannot record the order durably".into()));
                    }
                }
            }
            Command::Header {
                trainer,
                upload,
                reply,
            } => {
                let decision = self.engine.handle_submission_header(now, trainer, &upload);
                let _ = reply.send(decision);
            }
            Command::UploadDone { ticket, result } => {
                let result = result.map(|inline| {
                    if let Some(body) = inline {
                        self.inline_bodies.insert(ticket.hash, body);
                    }
                });
                self.engine.handle_upload_finished(now, &ticket, result);
            }
            Command::Staged(staged) => {
                let header = &staged.upload.header;
                let (task, hash) = (header.task, header.hash);
                if !self.take_staged(task, header.round, hash) {
                    return;
                }
                // Kept until the batch ends whatever the decision: another upload of the same
                // bytes in this batch may need it.
                if let Some(body) = staged.body {
                    self.inline_bodies.entry(hash).or_insert(body);
                }
                let refusal = staged
                    .refusal
                    .map(|(reason, detail)| Refusal::new(reason, detail));
                let taken = self
                    .engine
                    .handle_staged_upload(now, &staged.upload, refusal);
                tracing::debug!(%task, hash = %hash.short(), node = %staged.node, taken = taken.is_some(), "staged upload decided");
            }
            Command::StagedUnreadable { task, hash, reason } => {
                if !self.take_staged(task, self.engine.round(), hash) {
                    return;
                }
                tracing::error!(%task, hash = %hash.short(), %reason, "a staged upload cannot be read back");
                // Whose it was is unreadable too: the refusal names no trainer, and the
                // trainer, unanswered, sends its upload again to the leader.
                self.engine.handle_protocol_violation(
                    None,
                    Some(hash),
                    Refusal::new(
                        RejectReason::Internal,
                        format!("a staged upload for task {task} could not be read back: {reason}"),
                    ),
                );
            }
            Command::UploadDeferred {
                ticket,
                retry_after,
            } => {
                self.engine
                    .handle_upload_deferred(now, &ticket, retry_after);
            }
            Command::Violation { trainer, refusal } => {
                self.engine
                    .handle_protocol_violation(trainer, None, refusal);
            }
            Command::Downloadable {
                hash,
                trainer,
                reply,
            } => {
                let loss_check_delta = self.engine.loss_check_download(trainer, &hash);
                let found = match &self.current_adapter {
                    Some((current, bytes)) if *current == hash => {
                        Some(Download::Memory(bytes.clone()))
                    }
                    _ if self.base_model.is_some_and(|(model, _)| model == hash) => {
                        self.base_model.map(|(_, len)| Download::File(len))
                    }
                    _ if loss_check_delta.is_some() => {
                        // Small deltas are stored inline in the database.
                        match self.db.inline_blob(&hash) {
                            Ok(Some(bytes)) => Some(Download::Memory(Arc::new(bytes))),
                            Ok(None) => loss_check_delta.map(Download::File),
                            Err(error) => {
                                tracing::error!(%error, "cannot read an inline delta");
                                None
                            }
                        }
                    }
                    _ => self
                        .db
                        .adapter_len(&hash)
                        .unwrap_or_else(|error| {
                            tracing::error!(%error, "cannot look up adapter");
                            None
                        })
                        .map(Download::File),
                };
                let _ = reply.send(found);
            }
            Command::Derived { generation, .. } if generation != self.generation => {
                tracing::info!("an aggregation from before a state reload is dropped");
            }
            Command::Derived { round, result, .. } => match result {
                Ok(derived) => {
                    if let Err(error) = self.commit(now, *derived) {
                        if is_fenced(&error) {
                            self.storage_failed(now, &error);
                        } else {
                            self.retry_derive(now, round, format!("{error:#}"));
                        }
                    }
                }
                Err(DeriveFailure::Unreadable(unreadable)) => {
                    for (hash, detail) in &unreadable {
                        tracing::error!(
                            round = %round.round, hash = %hash.short(), %detail,
                            "an accepted delta is unreadable; the round goes on without it"
                        );
                    }
                    self.derive_failures = 0;
                    self.engine
                        .handle_round_inputs_unreadable(now, round.round, unreadable);
                }
                Err(DeriveFailure::Transient(detail)) => self.retry_derive(now, round, detail),
            },
        }
    }

    /// Takes a staged upload off the table, and marks its task's claim decided, in this
    /// wake-up's batch: whether this hand-over decides it. Only the hand-over whose delete
    /// removes the row decides, so one already decided (earlier in this batch, or committed)
    /// is not decided again, and a failed batch leaves the row to be read and decided again.
    fn take_staged(&mut self, task: TaskId, round: RoundId, hash: BlobHash) -> bool {
        let experiment = self.engine.experiment().clone();
        match self.db.unstage_upload(&experiment, task, round, hash) {
            Ok(true) => {
                Metrics::add(&self.metrics.uploads_unstaged, 1);
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::error!(%error, %task, "cannot take a staged upload");
                false
            }
        }
    }

    /// Drains the engine's actions in order, doing their I/O.
    ///
    /// Database writes made while handling a wake-up and its actions go into one transaction
    /// (group commit: one fsync for many submissions). Messages to trainers wait until that
    /// transaction has committed, and acknowledgements are only produced after it, so nothing
    /// is announced before it is durable.
    fn drain(&mut self, now: Instant) -> anyhow::Result<()> {
        let experiment = self.engine.experiment().clone();
        loop {
            let mut outgoing = Vec::new();
            let mut dismissed = Vec::new();
            let mut persisted = Vec::new();
            let mut closing = Vec::new();
            self.db
                .begin_batch()
                .context("cannot begin a transaction")?;
            while let Some(action) = self.engine.poll_action() {
                match action {
                    Action::Send { trainer, message } => outgoing.push((trainer, message)),
                    Action::RecordTask {
                        round,
                        task,
                        trainer,
                        repeats,
                        referee_of,
                    } => {
                        Metrics::add(&self.metrics.tasks_issued, 1);
                        if repeats.is_some() {
                            Metrics::add(&self.metrics.replica_tasks, 1);
                        }
                        if referee_of.is_some() {
                            Metrics::add(&self.metrics.referee_tasks, 1);
                        }
                        self.db
                            .record_task(
                                &experiment,
                                round,
                                task,
                                trainer,
                                repeats,
                                referee_of,
                                now_ms(),
                            )
                            .context("cannot record a task")?;
                    }
                    Action::PersistSubmission {
                        round,
                        task,
                        accepted,
                        upload,
                        replica_of,
                        referee_of,
                    } => {
                        let kept_beside = match (&replica_of, &referee_of) {
                            (_, Some(dispute)) => KeptBeside::Dispute(dispute),
                            (Some(counted), None) => KeptBeside::Counted(counted),
                            (None, None) => KeptBeside::Nothing,
                        };
                        let persisted_ok = self.persist_submission(
                            &experiment,
                            round,
                            task,
                            &accepted,
                            &upload,
                            kept_beside,
                        );
                        match persisted_ok {
                            Ok(()) => persisted.push((round, task, accepted)),
                            Err(error) => {
                                tracing::error!(%error, "cannot record a submission");
                                self.engine
                                    .handle_persist_failed(now, task, error.to_string());
                            }
                        }
                    }
                    Action::RecordRejection {
                        round,
                        rejected,
                        recorded,
                    } => {
                        self.metrics.count_rejection(rejected.reason);
                        if !recorded {
                            continue;
                        }
                        tracing::warn!(
                            round = %round,
                            trainer = ?rejected.trainer,
                            reason = %rejected.reason,
                            detail = %rejected.detail,
                            "submission rejected"
                        );
                        self.db
                            .record_rejection(&experiment, round, &rejected, now_ms())
                            .context("cannot record a rejection")?;
                    }
                    Action::CloseRound(close) => closing.push(close),
                    Action::Finished {
                        adapter,
                        abandoned_loss_checks,
                    } => {
                        tracing::info!(adapter = %adapter, abandoned_loss_checks, "experiment finished");
                        Metrics::add(
                            &self.metrics.loss_checks_abandoned,
                            abandoned_loss_checks as u64,
                        );
                    }
                    Action::LateAnswer { trainer } => {
                        tracing::debug!(%trainer, "an evaluation answer crossed its cancellation");
                        Metrics::add(&self.metrics.late_answers, 1);
                    }
                    Action::ExcludeSubmission { round, hash } => {
                        self.db
                            .exclude_submission(&experiment, round, &hash)
                            .context("cannot exclude a submission")?;
                    }
                    Action::RecordEvalTask {
                        task,
                        trainer,
                        adapter,
                    } => {
                        self.db
                            .record_eval_task(&experiment, task, trainer, &adapter, now_ms())
                            .context("cannot record an evaluation task")?;
                    }
                    Action::RecordEvaluation(outcome) => {
                        Metrics::add(&self.metrics.evaluations, 1);
                        tracing::info!(
                            after_round = ?outcome.target.after_round.map(|r| r.0),
                            adapter = %outcome.target.adapter.short(),
                            median_loss = outcome.loss,
                            tokens = outcome.tokens,
                            evaluators = outcome.answers.len(),
                            agreeing = outcome.agreeing,
                            spread = outcome.spread,
                            "adapter evaluated"
                        );
                        self.db
                            .record_evaluation(&experiment, &outcome, now_ms())
                            .context("cannot record an evaluation")?;
                    }
                    Action::RecordEvaluator(event) => {
                        match &event.result {
                            Ok((loss, tokens)) => tracing::debug!(
                                adapter = %event.target.adapter.short(),
                                trainer = %event.trainer, loss, tokens, "evaluator answered"
                            ),
                            Err(failure) => {
                                Metrics::add(&self.metrics.evaluator_failures, 1);
                                tracing::info!(
                                    adapter = %event.target.adapter.short(),
                                    trainer = %event.trainer, failure = failure.as_str(),
                                    "evaluator failed"
                                );
                            }
                        }
                        self.db
                            .record_evaluator(&experiment, &event, now_ms())
                            .context("cannot record an evaluator")?;
                    }
                    Action::Dismiss { trainer, detail } => {
                        tracing::warn!(%trainer, %detail, "trainer dropped from the experiment");
                        outgoing.push((
                            trainer,
                            ServerMessage::Refused {
                                reason: RejectReason::NotSelected,
                                detail,
                            },
                        ));
                        dismissed.push(trainer);
                    }
                    Action::EvaluationAbandoned(target) => {
                        tracing::warn!(
                            adapter = %target.adapter.short(),
                            after_round = ?target.after_round.map(|r| r.0),
                            "evaluation abandoned: every evaluator asked failed"
                        );
                    }
                }
            }
            self.commit_batch().context("cannot commit a transaction")?;
            // Bodies of uploads the engine refused are not kept.
            self.inline_bodies.clear();
            // Watchers see the new state no later than trainers hear of it.
            self.publish_progress();
            self.announce_duty();
            for (trainer, message) in outgoing {
                if let Some(registered) = self.registry.get(&trainer) {
                    registered.outbox.send(message);
                }
            }
            // A dropped trainer's connection closes; its hellos are refused from now on.
            for trainer in dismissed.drain(..) {
                if let Some(registered) = self.registry.get(&trainer) {
                    registered.outbox.close(b"dropped from the experiment");
                }
            }
            for close in closing {
                self.spawn_derive(close);
            }
            if persisted.is_empty() {
                break;
            }
            for (round, task, accepted) in persisted {
                Metrics::add(&self.metrics.accepted, 1);
                tracing::info!(
                    round = %round, trainer = %accepted.trainer, hash = %accepted.hash.short(),
                    "delta accepted"
                );
                self.engine.handle_submission_persisted(now, task, accepted);
            }
        }
        Ok(())
    }

    /// Tells every trainer the fleet duty of the operator orders this batch made durable, and
    /// the operator how many were told.
    fn announce_duty(&mut self) {
        if self.throttled.is_empty() {
            return;
        }
        let duty_ppm = self.fleet_duty;
        let mut told = 0;
        for entry in self.registry.values_mut() {
            entry.applied_duty = None;
            if entry.outbox.send(ServerMessage::Throttle { duty_ppm }) {
                told += 1;
            }
        }
        tracing::info!(
            duty_ppm,
            trainers = told,
            "fleet duty changed by the operator"
        );
        Metrics::set(&self.metrics.fleet_duty_ppm, u64::from(duty_ppm));
        for reply in self.throttled.drain(..) {
            let _ = reply.send(Ok(told));
        }
    }

    /// Commits the open batch. The commit waits for an fsync, so on a multi-threaded runtime
    /// the runtime is told to move other tasks off this thread meanwhile.
    fn commit_batch(&mut self) -> Result<(), crate::store::db::DbError> {
        let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|handle| {
            handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        });
        if multi_thread {
            tokio::task::block_in_place(|| self.db.commit_batch())
        } else {
            self.db.commit_batch()
        }
    }

    /// Writes a submission's row, and its body when it is stored inline, in the open batch.
    fn persist_submission(
        &mut self,
        experiment: &tributary_shared::ExperimentId,
        round: RoundId,
        task: TaskId,
        accepted: &tributary_shared::ledger::AcceptedDelta,
        upload: &UploadHeader,
        kept_beside: KeptBeside<'_>,
    ) -> Result<(), crate::store::db::DbError> {
        if let Some(body) = self.inline_bodies.remove(&accepted.hash) {
            self.db.put_inline(&accepted.hash, &body)?;
        }
        let signed_header = tributary_shared::frame::to_payload(upload)
            .map_err(|error| crate::store::db::DbError::Corrupt(error.to_string()))?;
        match kept_beside {
            KeptBeside::Dispute(dispute) => self.db.record_referee(
                experiment,
                round,
                task,
                accepted,
                dispute,
                &signed_header,
                now_ms(),
            ),
            KeptBeside::Counted(counted) => self.db.record_replica(
                experiment,
                round,
                task,
                accepted,
                counted,
                &signed_header,
                now_ms(),
            ),
            KeptBeside::Nothing => self.db.record_submission(
                experiment,
                round,
                task,
                accepted,
                &signed_header,
                now_ms(),
            ),
        }
    }

    fn spawn_derive(&self, close: RoundClose) {
        tracing::info!(round = %close.round, accepted = close.accepted.len(), "closing round");
        let config = self.config.clone();
        let blobs = self.blobs.clone();
        let data_dir = self.data_dir.clone();
        let state = self.optimizer_state.clone();
        let previous = self.ledger_head;
        let commands = self.commands.clone();
        let signer = self.signer.clone();
        let generation = self.generation;
        tokio::task::spawn_blocking(move || {
            fault_injection_delay();
            // A panic while aggregating must come back as an error, not leave the round
            // closing forever.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let signer = signer.ok_or_else(|| {
                    DeriveFailure::Transient("no ledger key to sign the round with".into())
                })?;
                derive_and_store(
                    &config, &data_dir, &blobs, &close, &state, previous, &signer,
                )
            }))
            .unwrap_or_else(|_| Err(DeriveFailure::Transient("aggregation panicked".into())))
            .map(Box::new);
            let _ = commands.blocking_send(Command::Derived {
                generation,
                round: Box::new(close),
                result,
            });
        });
    }

    /// Schedules another attempt at a round whose aggregation or commit failed for a reason
    /// that may pass, with a doubling backoff: the coordinator keeps serving meanwhile.
    fn retry_derive(&mut self, now: Instant, round: Box<RoundClose>, detail: String) {
        let wait = MIN_DERIVE_RETRY
            .saturating_mul(1 << self.derive_failures.min(10))
            .min(MAX_DERIVE_RETRY);
        self.derive_failures += 1;
        Metrics::add(&self.metrics.aggregation_failures, 1);
        tracing::error!(
            round = %round.round, attempt = self.derive_failures, retry_in = ?wait, %detail,
            "cannot close the round; trying again"
        );
        self.derive_retry = Some((now + wait, round));
    }

    fn commit(&mut self, now: Instant, derived: DerivedRound) -> anyhow::Result<()> {
        let round = derived.entry.round;
        let finished = round.next().0 >= self.config.experiment.rounds;
        let head = self
            .db
            .commit_round(
                &derived.entry,
                derived.adapter_len,
                finished,
                &derived.next_secret,
            )
            .context("cannot commit the round")?;
        self.derive_failures = 0;
        self.ledger_head = Some(head);
        self.optimizer_state = derived.state;
        self.current_adapter = Some((derived.entry.adapter_after, derived.adapter_bytes));
        self.rounds_closed += 1;
        Metrics::add(&self.metrics.rounds_closed, 1);
        for check in derived
            .entry
            .verification
            .iter()
            .flat_map(|verification| &verification.checks)
        {
            let (counter, agree) = match check.verdict {
                CheckVerdict::Agree => (&self.metrics.checks_agreed, true),
                CheckVerdict::Disagree => (&self.metrics.checks_disagreed, false),
            };
            Metrics::add(counter, 1);
            if !agree {
                tracing::warn!(
                    round = %round,
                    counted = %check.counted.short(),
                    replica = %check.replica.hash.short(),
                    replica_trainer = %check.replica.trainer,
                    distance = check.distance,
                    cosine = check.cosine,
                    "a replicated task's two deltas disagree; the counted one was withheld"
                );
            }
        }
        for check in derived
            .entry
            .verification
            .iter()
            .flat_map(|verification| &verification.loss_checks)
        {
            use tributary_shared::loss_check::LossOutcome;
            let index = match check.outcome {
                LossOutcome::Lowered => 0,
                LossOutcome::NotLowered => 1,
                LossOutcome::Inconclusive => 2,
            };
            Metrics::add(&self.metrics.loss_checks[index], 1);
            if check.outcome == LossOutcome::NotLowered {
                tracing::warn!(
                    round = %round, checked_round = %check.round,
                    delta = %check.delta.short(), trainer = %check.trainer,
                    improvement = check.improvement, answers = check.answers.len(),
                    "a delta did not lower the loss on its own training data; its trainer is flagged"
                );
            } else {
                tracing::info!(
                    round = %round, checked_round = %check.round,
                    delta = %check.delta.short(), outcome = ?check.outcome,
                    improvement = check.improvement, answers = check.answers.len(),
                    "loss check recorded"
                );
            }
        }
        for barred in derived
            .entry
            .verification
            .iter()
            .flat_map(|verification| &verification.barred)
        {
            tracing::info!(
                round = %round,
                delta = %barred.hash.short(),
                trainer = %barred.trainer,
                "a flagged trainer's delta was barred from the aggregate"
            );
        }
        tracing::info!(
            round = %round,
            adapter = %derived.entry.adapter_after.short(),
            ledger = %head.short(),
            reported_train_loss = ?derived.entry.metrics.reported_train_loss,
            "round committed"
        );
        // Disputes wait for referees; flagged trainers lose standing (before the next round's
        // selection, which the commit starts).
        let adapter_len = self
            .db
            .round_start(&self.engine.experiment().clone(), round)
            .ok()
            .flatten()
            .map_or(0, |(_, len)| len);
        let disputes = crate::engine::Dispute::from_entry(&derived.entry, adapter_len);
        let flagged: Vec<_> = derived
            .entry
            .verification
            .iter()
            .flat_map(|verification| verification.flagged())
            .collect();
        for check in derived
            .entry
            .verification
            .iter()
            .flat_map(|verification| &verification.referees)
        {
            tracing::warn!(
                round = %round,
                disputed_round = %check.round,
                outcome = ?check.outcome,
                flagged = ?check.flagged(),
                to_counted = check.distance_to_counted,
                to_replica = check.distance_to_replica,
                "a referee settled a dispute"
            );
        }
        Metrics::add(&self.metrics.flags, flagged.len() as u64);
        self.engine.handle_verdicts(now, disputes, flagged);
        self.engine.handle_round_committed(
            now,
            round,
            derived.entry.adapter_after,
            derived.adapter_len,
            derived.next_secret,
        );
        self.metrics
            .current_round
            .store(self.engine.round().0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn publish_progress(&self) {
        let progress = Progress {
            round: self.engine.round(),
            rounds_closed: self.rounds_closed,
            ledger_head: self.ledger_head,
            adapter: Some(self.engine.adapter()),
            finished: self.engine.phase() == Phase::Finished,
            connected: self.registry.len(),
            fleet_duty_ppm: self.fleet_duty,
            trainers_obeying: self
                .registry
                .values()
                .filter(|entry| entry.applied_duty.is_some_and(|d| d <= self.fleet_duty))
                .count(),
            evaluations_pending: self.engine.evaluations_pending(),
            accepted_in_round: self.engine.accepted_count(),
        };
        self.progress.send_if_modified(|current| {
            if *current == progress {
                false
            } else {
                *current = progress;
                true
            }
        });
    }
}

/// What a stored delta is kept beside, when it does not count itself.
enum KeptBeside<'a> {
    /// It counts.
    Nothing,
    /// A pair's second, beside the counted delta.
    Counted(&'a BlobHash),
    /// A referee's, settling the dispute.
    Dispute(&'a crate::engine::Dispute),
}

/// Aggregates a round, writes the adapter, aggregate and optimizer state blobs, and builds the
/// ledger entry. Runs on a blocking thread.
fn derive_and_store(
    config: &ExperimentConfig,
    data_dir: &std::path::Path,
    blobs: &BlobStore,
    close: &RoundClose,
    state: &OptimizerState,
    previous: Option<BlobHash>,
    signer: &LedgerSigner,
) -> Result<DerivedRound, DeriveFailure> {
    let transient = |error: &dyn std::fmt::Display| DeriveFailure::Transient(error.to_string());
    let stored = StoredBlobs::open(data_dir).map_err(|e| transient(&e))?;
    let Derived {
        aggregate,
        adapter_after,
        state,
        verification,
    } = derive_from_store(
        config,
        &stored,
        RoundInputs {
            adapter_before: &close.adapter_before,
            accepted: &close.accepted,
            replicas: &close.replicas,
            referees: &close
                .referees
                .iter()
                .map(crate::derive::RefereeInput::from)
                .collect::<Vec<_>>(),
            loss_checks: &close.loss_checks,
            flagged: &close.flagged,
        },
        state,
        &crate::derive::Scratch::in_dir(data_dir),
    )
    .map_err(|error| match error {
        DeriveError::Unreadable { deltas } => DeriveFailure::Unreadable(deltas),
        other => transient(&other),
    })?;
    let adapter_bytes = encode_exact(&adapter_after);
    let adapter_hash = blobs.put(&adapter_bytes).map_err(|e| transient(&e))?;
    let aggregate_hash = blobs
        .put(&encode_exact(&aggregate))
        .map_err(|e| transient(&e))?;
    let state_hash = if state.first_moment.is_some() || state.second_moment.is_some() {
        Some(
            blobs
                .put(&encode_state(&state))
                .map_err(|e| transient(&e))?,
        )
    } else {
        None
    };
    let total_weight: f64 = close.accepted.iter().map(|a| a.weight as f64).sum();
    let reported_train_loss = (total_weight > 0.0).then(|| {
        close
            .accepted
            .iter()
            .map(|a| f64::from(a.reported_train_loss) * a.weight as f64)
            .sum::<f64>()
            / total_weight
    });
    let raw_per_delta = aggregate.element_count() as u64 * 4;
    // The next round's secret is drawn now, from the operating system, and only its commitment
    // is published before that round.
    let next_secret = RoundSecret::generate(&mut rand::rngs::OsRng);
    let mut entry = LedgerEntry {
        experiment: tributary_shared::ExperimentId(config.experiment.name.clone()),
        experiment_uid: signer.experiment_uid,
        coordinator: signer.coordinator,
        config_hash: signer.config_hash,
        round: close.round,
        previous,
        adapter_before: close.adapter_before,
        adapter_after: adapter_hash,
        aggregate: aggregate_hash,
        optimizer_state: state_hash,
        accepted: close.accepted.clone(),
        rejected: close.rejected.clone(),
        metrics: RoundMetrics {
            reported_train_loss,
            eval_loss: None,
            bytes_up: close.accepted.iter().map(|a| a.byte_len).sum(),
            raw_bytes: raw_per_delta * close.accepted.len() as u64,
            duration_ms: close.duration.as_millis() as u64,
            aggregate_norm: aggregate.l2_norm(),
        },
        secret_commitment: close.secret.commitment(),
        secret: close.secret,
        next_commitment: next_secret.commitment(),
        signer: signer.key.id(),
        signature: Vec::new(),
        verification: (!verification.is_empty()).then_some(verification),
    };
    entry.sign(&signer.key);
    Ok(DerivedRound {
        entry,
        next_secret,
        adapter_len: adapter_bytes.len() as u64,
        adapter_bytes: Arc::new(adapter_bytes),
        state,
    })
}

/// Milliseconds since the Unix epoch, for stored timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
