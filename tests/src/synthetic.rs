//! The synthetic trainer: speaks the real protocol but makes up its deltas (no burn). It can be
//! told to misbehave once, in one of the ways a real peer might, to test the coordinator's
//! defences, or to attack the learning in every task (a hostile volunteer).
//!
//! With `descend`, honest deltas step towards a fixed target adapter (see [`objective`]), so the
//! merged adapter has somewhere to go and an attack has something to spoil; with `evaluate`,
//! honest evaluators report that objective as their held-out loss.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::SeedableRng;
use tokio::sync::watch;
use tributary_shared::codec::{self, Codec, ErrorFeedback};
use tributary_shared::config::SplitMix64;
use tributary_shared::identity::Identity;
use tributary_shared::wire::{
    ClientMessage, RejectReason, ServerMessage, SubmissionHeader, TaskSpec, TrainMetrics,
    UploadHeader,
};
use tributary_shared::{BlobHash, Delta, NamedTensor, RoundId};

use crate::client::Session;

/// A way to misbehave, applied to the first task only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Behave.
    None,
    /// Send half the bytes, then drop the connection (and reconnect).
    DisconnectMidUpload,
    /// Announce a hash other than the bytes'.
    WrongHash,
    /// Send a NaN.
    NonFinite,
    /// Send a tensor of the wrong shape.
    WrongShape,
    /// Send more bytes than announced.
    Oversized,
    /// After an accepted upload, send its bytes again for the same task under new claims.
    Replay,
    /// Sign the submission with a key the connection did not authenticate as.
    UnknownKey,
    /// Attack, every task: claim 1,000,000 samples and send `100 × (−target − adapter)` (model
    /// replacement, boosted, away from the honest target).
    Boosted,
    /// Attack, every task: the honest delta sign-flipped and scaled ten times.
    SignFlip,
    /// Attack, every task: random values with ten times the honest delta's norm.
    Noise,
    /// Attack, every task: a zero delta (credit without work).
    FreeRider,
    /// Attack, every task: re-sign and send another trainer's delta (taken from `leak`).
    Copier,
    /// Attack: honest deltas, but every evaluation answered with a made-up, too-good loss.
    LyingEvaluator,
    /// Attack: honest deltas, but it drops its connection whenever it is asked to evaluate.
    EvalDisconnector,
}

impl Fault {
    /// Every attack on the learning (each applied to every task).
    pub const ATTACKS: [Fault; 7] = [
        Fault::Boosted,
        Fault::SignFlip,
        Fault::Noise,
        Fault::FreeRider,
        Fault::Copier,
        Fault::LyingEvaluator,
        Fault::EvalDisconnector,
    ];

    /// True for the attacks, which last the whole run (protocol faults happen once).
    pub fn is_attack(self) -> bool {
        Self::ATTACKS.contains(&self)
    }

    /// Every misbehaviour.
    pub const ALL_FAULTS: [Fault; 7] = [
        Fault::DisconnectMidUpload,
        Fault::WrongHash,
        Fault::NonFinite,
        Fault::WrongShape,
        Fault::Oversized,
        Fault::Replay,
        Fault::UnknownKey,
    ];

    /// The reason the coordinator should give.
    pub fn expected_reason(self) -> Option<RejectReason> {
        match self {
            Fault::None => None,
            Fault::DisconnectMidUpload => Some(RejectReason::Interrupted),
            Fault::WrongHash => Some(RejectReason::HashMismatch),
            Fault::NonFinite => Some(RejectReason::NonFinite),
            Fault::WrongShape => Some(RejectReason::WrongShape),
            Fault::Oversized => Some(RejectReason::TooLarge),
            Fault::Replay => Some(RejectReason::Replay),
            Fault::UnknownKey => Some(RejectReason::UnknownTrainer),
            Fault::Copier => Some(RejectReason::Replay),
            Fault::Boosted
            | Fault::SignFlip
            | Fault::Noise
            | Fault::FreeRider
            | Fault::LyingEvaluator
            | Fault::EvalDisconnector => None,
        }
    }
}

/// Lets honest trainers hold their first upload until every faulty trainer has misbehaved, so a
/// test sees each fault judged inside the round rather than racing its close.
#[derive(Debug)]
pub struct Gate {
    needed: usize,
    arrived: watch::Sender<usize>,
}

impl Gate {
    /// A gate that opens after `needed` arrivals.
    pub fn new(needed: usize) -> Arc<Self> {
        Arc::new(Self {
            needed,
            arrived: watch::channel(0).0,
        })
    }

    /// Counts one arrival.
    pub fn arrive(&self) {
        self.arrived.send_modify(|count| *count += 1);
    }

    /// Waits until the gate is open.
    pub async fn wait(&self) {
        let mut arrived = self.arrived.subscribe();
        let _ = arrived.wait_for(|count| *count >= self.needed).await;
    }
}

/// How to run one synthetic trainer.
#[derive(Debug, Clone)]
pub struct SyntheticOptions {
    /// Every coordinator node's address, tried in turn.
    pub coordinators: Vec<SocketAddr>,
    /// Its identity.
    pub identity: Identity,
    /// Its misbehaviour.
    pub fault: Fault,
    /// Enrollment token.
    pub enrollment_token: Option<String>,
    /// Faulty trainers arrive at this gate once they misbehaved; honest ones wait on it before
    /// uploading in `hold_round`.
    pub gate: Option<Arc<Gate>>,
    /// The round whose upload an honest trainer holds until the gate opens.
    pub hold_round: RoundId,
    /// Receives every control message this trainer gets (for tests that await events).
    pub events:
        Option<tokio::sync::mpsc::UnboundedSender<(tributary_shared::TrainerId, ServerMessage)>>,
    /// Give up reconnecting after this long without a connection.
    pub reconnect_for: Duration,
    /// Examples each delta claims.
    pub samples: u64,
    /// Honest deltas step towards the [`objective`]'s target instead of being noise.
    pub descend: bool,
    /// Answer evaluations with the [`objective`] (otherwise decline them: no model).
    pub evaluate: bool,
    /// Where honest trainers leave their latest accepted delta body and a [`Fault::Copier`]
    /// takes it (a published delta, or a colluder's).
    pub leak: Option<Arc<std::sync::Mutex<Option<Vec<u8>>>>>,
    /// Send each delta to the node `coordinators[task % n]` (a standby node stages it for the
    /// leader), falling back to the control connection when that node is the one in use or
    /// does not take it.
    pub spread_uploads: bool,
    /// Send every delta to this node instead (a standby stages it), unless it is the control
    /// node; falls back as `spread_uploads` does.
    pub upload_node: Option<SocketAddr>,
}

/// The synthetic learning problem: the mean squared distance from an adapter to a fixed target
/// (each value's target depends only on its tensor's name and index). Honest evaluators report
/// it as their held-out loss (plus one, so it is never zero).
pub fn objective(adapter: &Delta) -> f32 {
    let mut sum = 0.0f64;
    let mut count = 0usize;
    for tensor in adapter.tensors() {
        for (index, value) in tensor.values().iter().enumerate() {
            let gap = f64::from(*value - target_value(tensor.name(), index));
            sum += gap * gap;
            count += 1;
        }
    }
    (1.0 + sum / count.max(1) as f64) as f32
}

/// The target of value `index` of tensor `name`: uniform in ±0.05.
pub fn target_value(name: &str, index: usize) -> f32 {
    let mut hasher = blake3::Hasher::new_derive_key("tributary synthetic target v1");
    hasher.update(name.as_bytes());
    hasher.update(&(index as u64).to_le_bytes());
    let bytes = hasher.finalize();
    let unit = u32::from_le_bytes(bytes.as_bytes()[..4].try_into().expect("4 bytes")) as f32
        / u32::MAX as f32;
    (unit - 0.5) * 0.1
}

/// What a synthetic trainer saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Uploads acknowledged.
    pub accepted: u64,
    /// Uploads a standby node staged for the leader.
    pub staged: u64,
    /// Refusals received.
    pub rejected: Vec<(RejectReason, String)>,
    /// Tasks received.
    pub tasks: u64,
    /// When each round close was announced.
    pub rounds_closed: Vec<(RoundId, Instant)>,
    /// Connections made.
    pub connections: u32,
    /// When the first handshake completed.
    pub first_connected: Option<Instant>,
    /// Body bytes uploaded.
    pub bytes_up: u64,
    /// Uploads sent (each should end accepted or rejected; a deferred one is sent again and
    /// counted once).
    pub uploads: u64,
    /// Times an upload was deferred by a busy coordinator (and sent again).
    pub deferred: u64,
    /// For each acknowledged upload: time from the coordinator having every byte (the upload
    /// stream acknowledged) to its `SubmissionAccepted`.
    pub ack_latencies: Vec<Duration>,
    /// Whether the experiment finished.
    pub finished: bool,
    /// Evaluations answered.
    pub evaluations: u64,
}

/// Runs until the experiment finishes, or reconnecting fails for `reconnect_for`.
pub async fn run(endpoint: quinn::Endpoint, options: SyntheticOptions) -> anyhow::Result<Report> {
    let standby = crate::client::StandbySessions::new(endpoint.clone(), options.identity.clone());
    let mut trainer = Trainer {
        options,
        report: Report::default(),
        feedback: ErrorFeedback::new(),
        fault_pending: true,
        last_upload: None,
        upload_done: Arc::default(),
        rng: SplitMix64(0),
        control_node: None,
        staged: Arc::default(),
        standby,
        acknowledged: Default::default(),
    };
    trainer.rng = SplitMix64(u64::from_le_bytes(
        trainer.options.identity.id().0[..8]
            .try_into()
            .expect("8 bytes"),
    ));
    if trainer.options.fault == Fault::None {
        trainer.fault_pending = false;
    }
    let mut nodes =
        tributary_trainer::net::failover::Coordinators::new(trainer.options.coordinators.clone())
            .ok_or_else(|| anyhow::anyhow!("no coordinator address"))?;
    let mut last_connected = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let session = Session::connect(
            &endpoint,
            nodes.current(),
            &trainer.options.identity,
            trainer.options.enrollment_token.clone(),
        )
        .await;
        let mut session = match session {
            Ok(session) => session,
            Err(error) => {
                if last_connected.elapsed() > trainer.options.reconnect_for {
                    return Err(anyhow::Error::new(error).context("gave up reconnecting"));
                }
                if nodes.failed() {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                continue;
            }
        };
        nodes.connected();
        trainer.report.connections += 1;
        trainer
            .report
            .first_connected
            .get_or_insert_with(Instant::now);
        backoff = Duration::from_millis(50);
        if trainer.report.connections > 1
            && trainer.options.fault == Fault::DisconnectMidUpload
            && !trainer.fault_pending
        {
            if let Some(gate) = trainer.options.gate.take() {
                gate.arrive();
            }
        }
        trainer.control_node = Some(nodes.current());
        let outcome = trainer.serve(&mut session).await;
        trainer.report.staged = trainer.staged.load(std::sync::atomic::Ordering::Relaxed);
        last_connected = Instant::now();
        match outcome {
            Ok(true) => return Ok(trainer.report),
            Ok(false) => {}
            Err(error) => tracing::debug!(%error, "session ended"),
        }
        nodes.failed();
    }
}

struct Trainer {
    options: SyntheticOptions,
    report: Report,
    feedback: ErrorFeedback,
    fault_pending: bool,
    last_upload: Option<(UploadHeader, Vec<u8>)>,
    /// When the coordinator had every byte of the latest upload.
    upload_done: Arc<std::sync::Mutex<Option<Instant>>>,
    rng: SplitMix64,
    /// The node of the control session.
    control_node: Option<SocketAddr>,
    /// Uploads a standby node staged.
    staged: Arc<std::sync::atomic::AtomicU64>,
    /// Uploads-only sessions to standby nodes, kept open between uploads.
    standby: crate::client::StandbySessions,
    /// Tasks whose delta was acknowledged (a trainer that reconnects hears it again).
    acknowledged: std::collections::HashSet<tributary_shared::TaskId>,
}

impl Trainer {
    /// Serves one session; `Ok(true)` when the experiment finished.
    async fn serve(&mut self, session: &mut Session) -> anyhow::Result<bool> {
        while let Some(message) = session.next_message().await? {
            if let Some(events) = &self.options.events {
                let _ = events.send((self.options.identity.id(), message.clone()));
            }
            match message {
                ServerMessage::Task(task) => {
                    self.report.tasks += 1;
                    session
                        .send(&ClientMessage::TaskAccepted { task: task.task })
                        .await?;
                    self.do_task(session, &task).await?;
                }
                ServerMessage::SubmissionAccepted { task, .. } => {
                    if !self.acknowledged.insert(task) {
                        continue; // said again after a reconnection
                    }
                    self.report.accepted += 1;
                    // An accepted delta is what a copier could get hold of (published, or from
                    // a colluder).
                    if let (Some(leak), Fault::None) = (&self.options.leak, self.options.fault) {
                        if let Some((_, body)) = &self.last_upload {
                            *leak.lock().expect("never poisoned") = Some(body.clone());
                        }
                    }
                    let done = self.upload_done.lock().expect("never poisoned").take();
                    // No time yet: the acknowledgement overtook the stream's own completion.
                    self.report
                        .ack_latencies
                        .push(done.map_or(Duration::ZERO, |done| done.elapsed()));
                    if self.fault_pending && self.options.fault == Fault::Replay {
                        // The accepted bytes again under new claims (more samples, for more
                        // weight): a second submission for the task. Sent unchanged it would be
                        // a repeat, answered with the acknowledgement again.
                        if let Some((upload, body)) = self.last_upload.clone() {
                            self.fault_pending = false;
                            self.report.uploads += 1;
                            let mut claims = upload.header;
                            claims.sample_count += 1;
                            let replay = self.options.identity.sign_submission(claims)?;
                            let _ = session.upload(&replay, &body, None).await;
                        }
                    }
                }
                ServerMessage::UploadDeferred { retry_after_ms, .. } => {
                    // Back-pressure: the same upload goes again after the given wait.
                    self.report.deferred += 1;
                    tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms))).await;
                    if let Some((header, body)) = self.last_upload.clone() {
                        self.spawn_upload(session, header, body);
                    }
                }
                ServerMessage::SubmissionRejected { reason, detail, .. } => {
                    self.report.rejected.push((reason, detail));
                    if self.options.fault != Fault::None
                        && self.options.fault != Fault::DisconnectMidUpload
                        && !self.fault_pending
                    {
                        if let Some(gate) = self.options.gate.take() {
                            gate.arrive();
                        }
                    }
                }
                ServerMessage::RoundClosed { round, .. } => {
                    self.report.rounds_closed.push((round, Instant::now()));
                }
                ServerMessage::ExperimentFinished { .. } => {
                    self.report.finished = true;
                    session.close();
                    return Ok(true);
                }
                ServerMessage::Evaluate(spec) => match self.options.fault {
                    Fault::EvalDisconnector => {
                        session
                            .connection()
                            .close(quinn::VarInt::from_u32(9), b"leaving instead of evaluating");
                        return Ok(false);
                    }
                    _ if self.options.evaluate => {
                        let bytes = session.download(spec.adapter).await?;
                        let adapter = codec::decode(&bytes, usize::MAX >> 1)
                            .context("adapter does not decode")?;
                        let loss = if self.options.fault == Fault::LyingEvaluator {
                            0.01
                        } else {
                            objective(&adapter)
                        };
                        self.report.evaluations += 1;
                        session
                            .send(&ClientMessage::EvalResult {
                                task: spec.task,
                                adapter: spec.adapter,
                                loss,
                                tokens: 64,
                                // Synthetic experiments have no loss checks.
                                baseline: None,
                            })
                            .await?;
                    }
                    _ => {
                        // No model here: say so, so the coordinator asks someone else.
                        session
                            .send(&ClientMessage::TaskDeclined {
                                task: spec.task,
                                detail: "a synthetic trainer has no model to evaluate with".into(),
                            })
                            .await?;
                    }
                },
                ServerMessage::TaskCancelled { .. }
                | ServerMessage::UploadStarted { .. }
                | ServerMessage::Welcome { .. }
                | ServerMessage::Challenge { .. }
                | ServerMessage::Refused { .. }
                | ServerMessage::UploadStaged { .. }
                | ServerMessage::Throttle { .. } => {}
            }
        }
        Ok(false)
    }

    async fn do_task(&mut self, session: &mut Session, task: &TaskSpec) -> anyhow::Result<()> {
        let adapter_bytes = session.download(task.adapter).await?;
        let adapter =
            codec::decode(&adapter_bytes, usize::MAX >> 1).context("adapter does not decode")?;
        let delta = self.make_delta(&adapter, task.seed)?;
        let fault = if self.fault_pending {
            self.options.fault
        } else {
            Fault::None
        };
        let (body, codec_used) = match fault {
            Fault::Boosted | Fault::SignFlip | Fault::Noise | Fault::FreeRider => {
                let lie = self.attack(fault, &adapter, &delta)?;
                (
                    codec::encode_to_vec(&lie, task.plan.codec)?,
                    task.plan.codec,
                )
            }
            Fault::Copier => (self.leaked().await?, task.plan.codec),
            Fault::NonFinite => {
                let mut bad = delta.clone();
                if let Some(tensor) = bad.tensors_mut().next() {
                    tensor.values_mut()[0] = f32::NAN;
                }
                (codec::encode_to_vec(&bad, Codec::F32)?, Codec::F32)
            }
            Fault::WrongShape => {
                let mut tensors = delta.clone().into_tensors();
                let first = tensors.remove(0);
                let mut values = first.into_values();
                values.push(0.5);
                let name = adapter.tensors()[0].name().to_owned();
                tensors.push(NamedTensor::new(name, vec![values.len()], values)?);
                (
                    codec::encode_to_vec(&Delta::new(tensors)?, Codec::F32)?,
                    Codec::F32,
                )
            }
            _ => (
                self.feedback.compress(&delta, task.plan.codec)?,
                task.plan.codec,
            ),
        };
        let _ = codec_used;
        let mut header = SubmissionHeader {
            experiment: task.experiment.clone(),
            experiment_uid: task.experiment_uid,
            coordinator: session.coordinator,
            round: task.round,
            task: task.task,
            trainer: self.options.identity.id(),
            hash: BlobHash::of(&body),
            byte_len: body.len() as u64,
            sample_count: if fault == Fault::Boosted {
                1_000_000
            } else {
                self.options.samples
            },
            metrics: TrainMetrics {
                train_loss: 2.0 / (1.0 + task.round.0 as f32),
                steps: task.plan.local_steps,
                tokens: 0,
                train_ms: 0,
            },
        };
        let mut signer = self.options.identity.clone();
        let mut sent_body = body.clone();
        let mut cut = None;
        match fault {
            Fault::WrongHash => header.hash = BlobHash::of(b"not these bytes"),
            Fault::Oversized => sent_body.extend(std::iter::repeat_n(7u8, 4096)),
            Fault::UnknownKey => {
                signer =
                    Identity::generate(&mut rand::rngs::StdRng::seed_from_u64(self.rng.next_u64()));
                header.trainer = signer.id();
            }
            Fault::DisconnectMidUpload => cut = Some(body.len() / 2),
            _ => {}
        }
        let upload = signer.sign_submission(header)?;
        if self.options.fault == Fault::None && task.round == self.options.hold_round {
            if let Some(gate) = &self.options.gate {
                gate.wait().await;
            }
        }
        if fault != Fault::None && fault != Fault::Replay && !fault.is_attack() {
            self.fault_pending = false;
        }
        self.last_upload = Some((upload.clone(), sent_body.clone()));
        self.report.bytes_up += sent_body.len() as u64;
        self.report.uploads += 1;
        if fault != Fault::DisconnectMidUpload {
            // On its own task, so that control messages are read while the coordinator holds
            // the upload in its queue.
            self.spawn_upload(session, upload, sent_body);
            return Ok(());
        }
        let result = session.upload(&upload, &sent_body, cut).await;
        if fault == Fault::DisconnectMidUpload {
            // Wait until the coordinator is receiving the body, then drop the connection.
            while let Some(message) = session.next_message().await? {
                if matches!(message, ServerMessage::UploadStarted { .. }) {
                    break;
                }
            }
            session
                .connection()
                .close(quinn::VarInt::from_u32(9), b"simulated network fault");
            anyhow::bail!("dropped the connection mid-upload on purpose");
        }
        if let Err(error) = result {
            tracing::debug!(%error, "upload stream ended early");
        }
        Ok(())
    }

    /// The node that takes `upload` when uploads are spread and it is not the control node.
    fn upload_node(&self, upload: &UploadHeader) -> Option<SocketAddr> {
        let control = self.control_node?;
        if let Some(node) = self.options.upload_node {
            return (node != control).then_some(node);
        }
        if !self.options.spread_uploads {
            return None;
        }
        tributary_trainer::net::failover::upload_node(
            &self.options.coordinators,
            upload.header.task,
            control,
        )
    }

    /// Uploads on its own task and notes when the coordinator had every byte.
    fn spawn_upload(&self, session: &Session, header: UploadHeader, body: Vec<u8>) {
        let uploader = session.uploader();
        let done = self.upload_done.clone();
        *done.lock().expect("never poisoned") = None;
        let relay = self.upload_node(&header).map(|node| {
            (
                node,
                self.options.events.clone(),
                self.staged.clone(),
                self.standby.clone(),
            )
        });
        tokio::spawn(async move {
            if let Some((node, events, staged, sessions)) = relay {
                match sessions.upload(node, &header, &body).await {
                    Ok(message) => {
                        let taken = matches!(message, ServerMessage::UploadStaged { .. });
                        let theirs = matches!(&message, ServerMessage::SubmissionRejected { reason, .. }
                            if !reason.is_coordinator_fault());
                        if let Some(events) = &events {
                            let _ = events.send((sessions.trainer(), message));
                        }
                        if taken {
                            staged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            *done.lock().expect("never poisoned") = Some(Instant::now());
                        }
                        if taken || theirs {
                            return;
                        }
                    }
                    Err(error) => tracing::debug!(%error, %node, "upload node unavailable"),
                }
            }
            match uploader.upload(&header, &body, None).await {
                Ok(()) => *done.lock().expect("never poisoned") = Some(Instant::now()),
                Err(error) => tracing::debug!(%error, "upload stream ended early"),
            }
        });
    }
    /// What an attacking trainer sends instead of its honest `delta` from `adapter`.
    fn attack(&mut self, fault: Fault, adapter: &Delta, delta: &Delta) -> anyhow::Result<Delta> {
        let mut lie = delta.clone();
        let norm = delta.l2_norm();
        for tensor in lie.tensors_mut() {
            let name = tensor.name().to_owned();
            let before = adapter
                .get(&name)
                .map(|t| t.values().to_vec())
                .unwrap_or_default();
            for (index, value) in tensor.values_mut().iter_mut().enumerate() {
                let current = before.get(index).copied().unwrap_or(0.0);
                *value = match fault {
                    Fault::Boosted => 100.0 * (-target_value(&name, index) - current),
                    Fault::SignFlip => -10.0 * *value,
                    Fault::Noise => self.rng.next_unit() - 0.5,
                    _ => 0.0,
                };
            }
        }
        if fault == Fault::Noise {
            let scale = 10.0 * norm / lie.l2_norm().max(1e-12);
            for tensor in lie.tensors_mut() {
                for value in tensor.values_mut() {
                    *value *= scale as f32;
                }
            }
        }
        Ok(lie)
    }

    /// Another trainer's latest delta body, once one has been left in the leak.
    async fn leaked(&self) -> anyhow::Result<Vec<u8>> {
        let leak = self
            .options
            .leak
            .as_ref()
            .context("a copier needs a leak to copy from")?;
        for _ in 0..500 {
            if let Some(body) = leak.lock().expect("never poisoned").clone() {
                return Ok(body);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("nothing to copy")
    }

    /// A small made-up update with the adapter's layout: noise, or with `descend` a step half
    /// way to the objective's target plus a little noise. The noise comes from the task's seed,
    /// so two honest trainers given the same task (a replicated one) compute the same update.
    fn make_delta(&mut self, adapter: &Delta, seed: u64) -> anyhow::Result<Delta> {
        let descend = self.options.descend;
        let mut rng = SplitMix64(seed);
        let tensors = adapter
            .tensors()
            .iter()
            .map(|tensor| {
                let values = (0..tensor.values().len())
                    .map(|index| {
                        let noise = (rng.next_unit() - 0.5) * 0.02;
                        if descend {
                            let gap = target_value(tensor.name(), index) - tensor.values()[index];
                            0.5 * gap + 0.1 * noise
                        } else {
                            noise
                        }
                    })
                    .collect();
                NamedTensor::new(tensor.name(), tensor.shape().to_vec(), values)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Delta::new(tensors)?)
    }
}
