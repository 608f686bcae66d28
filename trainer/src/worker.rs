//! `tributary-trainer join`: connect to a coordinator, take tasks, train them with burn, and upload
//! compressed, signed deltas; reconnect after faults, and re-send a finished but unacknowledged
//! upload instead of training again.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use tributary_shared::codec::{self, CodecError, ErrorFeedback};
use tributary_shared::delta::Delta;
use tributary_shared::identity::Identity;
use tributary_shared::wire::{
    ClientMessage, DataAssignment, EvalSpec, RejectReason, ServerMessage, SubmissionHeader,
    TaskSpec, TrainMetrics, TrainingPlan, UploadHeader,
};
use tributary_shared::{BlobHash, TaskId};

use crate::attack::Cheat;
use crate::data::{DataError, DataSpec, Document, PackedData};
use crate::lora::{LoraAdapter, LoraError, LoraMode, LoraSettings};
use crate::model::{self, LoadedModel, ModelError, Target};
use crate::net::client::Session;
use crate::net::NetError;
use crate::optim::OptimSettings;
use crate::tiny;
use crate::train::{self, TrainSettings};

/// How one trainer joins.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Every coordinator node's address (a cluster's; one for a single coordinator), tried in
    /// turn.
    pub coordinators: Vec<SocketAddr>,
    /// The trainer's key.
    pub identity: Identity,
    /// Enrollment token, when the coordinator asks for one.
    pub enrollment_token: Option<String>,
    /// The base model file (`.gguf`) or folder.
    pub model: PathBuf,
    /// The Shakespeare plays, for `shakespeare` tasks.
    pub shakespeare: PathBuf,
    /// The volunteer's own data folder, for `local` tasks.
    pub local_data: Option<PathBuf>,
    /// Where named datasets live (`NAME/CLIENT.jsonl`…), for tasks naming one.
    pub datasets: PathBuf,
    /// Where base models downloaded from the coordinator are kept (`<blake3 hex>.gguf`).
    pub model_cache: PathBuf,
    /// Give up after this long without a connection.
    pub reconnect_for: Duration,
    /// The owner's limit on the fraction of wall time spent computing, in millionths.
    pub max_duty_ppm: u32,
    /// The duty cycle in effect (the lower of the owner's and the fleet's), in millionths; read
    /// by the training thread between steps.
    pub duty: Arc<AtomicU64>,
    /// Set while the owner uses the machine (`--only-idle`): compute waits.
    pub machine_in_use: Arc<AtomicBool>,
    /// Seconds spent computing so far, in microseconds (for status and tests).
    pub busy_us: Arc<AtomicU64>,
    /// Print a live status line on stderr.
    pub status_line: bool,
    /// Red-team only: do every task differently than asked while claiming it was done
    /// ([`crate::attack::Cheat`]), to test the coordinator's checks. `None` for volunteers.
    pub cheat: Option<crate::attack::Cheat>,
    /// How the base model's large weights are held (`None`: by size, [`model::load_as`]).
    pub base_storage: Option<model::BaseStorage>,
    /// Recompute each layer's activations in the backward pass (gradient checkpointing).
    pub recompute_layers: bool,
}

/// What a trainer did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinReport {
    /// Tasks received.
    pub tasks: u64,
    /// Uploads acknowledged.
    pub accepted: u64,
    /// Uploads refused (with the coordinator's reason).
    pub rejected: Vec<String>,
    /// Compressed bytes uploaded.
    pub bytes_up: u64,
    /// What those deltas would have been as raw f32.
    pub raw_bytes: u64,
    /// Tokens trained.
    pub tokens: u64,
    /// Connections made.
    pub connections: u32,
    /// Whether the experiment finished.
    pub finished: bool,
    /// Mean training loss of each task, in order.
    pub losses: Vec<f32>,
    /// Evaluation tasks done: the round that made the adapter (`None`: the initial one) and
    /// its held-out loss.
    pub evaluations: Vec<(Option<u64>, f32)>,
    /// Compressed bytes of each task's upload, in order.
    pub upload_bytes: Vec<u64>,
    /// Loss checks done: the start adapter's loss, the loss with the delta added, and the
    /// milliseconds spent scoring both.
    pub loss_checks: Vec<(f32, f32, u64)>,
}

/// A task that could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Network trouble.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The base model could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The adapter does not fit the model.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// The task's data could not be had.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A delta could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The task cannot be done here.
    #[error("{0}")]
    Task(String),
    /// Reconnecting failed for too long.
    #[error("gave up reconnecting: {0}")]
    GaveUp(String),
}

/// Shortest wait before an upload is sent again.
const MIN_UPLOAD_RETRY: Duration = Duration::from_millis(250);
/// Longest wait before an upload is sent again.
const MAX_UPLOAD_RETRY: Duration = Duration::from_secs(60);

/// How long an upload of `len` bytes, once sent, waits for its answer before it is sent again
/// (an acknowledgement lost, a standby's staged copy the leader could not read): longer than
/// the coordinator's queue wait plus the time it allows the body. While a send is still under
/// way nothing is sent again. The coordinator answers a repeat of what it has without counting
/// it against the trainer.
fn answer_wait(len: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_secs(len as u64 / (64 * 1024))
}

/// Clears the "send under way" flag when a send task ends, however it ends.
struct SendDone(Arc<AtomicBool>);

impl Drop for SendDone {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Full duty (compute all the time), in millionths.
pub const FULL_DUTY: u64 = 1_000_000;

/// How long a connection and its handshake may take before the next node is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until the experiment finishes or reconnecting fails for `reconnect_for`.
pub async fn run(
    endpoint: quinn::Endpoint,
    options: JoinOptions,
    device: Device,
) -> Result<JoinReport, WorkerError> {
    let standby =
        crate::net::client::StandbySessions::new(endpoint.clone(), options.identity.clone());
    let mut worker = Worker {
        options,
        device,
        model: None,
        verified_models: std::collections::HashMap::new(),
        feedback: ErrorFeedback::new(),
        pending: None,
        coordinator: tributary_shared::CertificateHash::default(),
        upload_retry: None,
        upload_attempts: 0,
        sending: Arc::new(AtomicBool::new(false)),
        jobs: Jobs::default(),
        eval_queue: VecDeque::new(),
        previous_start: None,
        finish_by: None,
        report: JoinReport::default(),
        standby,
        control_node: None,
    };
    let mut nodes = crate::net::failover::Coordinators::new(worker.options.coordinators.clone())
        .ok_or_else(|| WorkerError::GaveUp("no coordinator address".into()))?;
    let mut last_connected = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        // A node that does not answer (gone, or cut off) costs a few seconds, not QUIC's idle
        // timeout, when another node may be serving.
        let session = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Session::connect(
                &endpoint,
                nodes.current(),
                &worker.options.identity,
                worker.options.enrollment_token.clone(),
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(NetError::Protocol(format!(
                "no answer within {CONNECT_TIMEOUT:?}"
            )))
        });
        let mut session = match session {
            Ok(session) => session,
            // A standby node of a cluster sends control sessions on to the leader.
            Err(NetError::Refused { reason, detail }) if reason != RejectReason::WrongNode => {
                return Err(NetError::Refused { reason, detail }.into())
            }
            Err(error) => {
                if last_connected.elapsed() > worker.options.reconnect_for {
                    tracing::warn!(%error, node = %nodes.current(), "giving up reconnecting");
                    return Err(WorkerError::GaveUp(error.to_string()));
                }
                tracing::debug!(%error, node = %nodes.current(), ?backoff, "connect failed");
                if nodes.failed() {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                continue;
            }
        };
        nodes.connected();
        worker.report.connections += 1;
        worker.coordinator = session.coordinator;
        worker.control_node = Some(nodes.current());
        backoff = Duration::from_millis(100);
        tracing::info!(trainer = %session.trainer, experiment = %session.experiment.0, "connected");
        let outcome = worker.serve(&mut session).await;
        last_connected = Instant::now();
        match outcome {
            Ok(true) => return Ok(worker.report),
            // The experiment is over; only an evaluation was still being reported.
            Ok(false) | Err(WorkerError::Net(_)) if worker.finish_by.is_some() => {
                return Ok(worker.report)
            }
            Ok(false) => tracing::info!("coordinator closed the session; reconnecting"),
            Err(WorkerError::Net(error)) => tracing::warn!(%error, "connection lost; reconnecting"),
            Err(error) => return Err(error),
        }
        // The node may be gone (a cluster's leader that died): the next one is tried first.
        nodes.failed();
    }
}

struct Worker {
    options: JoinOptions,
    device: Device,
    model: Option<(PathBuf, Arc<LoadedModel>)>,
    feedback: ErrorFeedback,
    /// Base model files already checked against a hash.
    verified_models: std::collections::HashMap<BlobHash, PathBuf>,
    /// A finished upload the coordinator has not acknowledged yet.
    pending: Option<(TaskId, UploadHeader, Vec<u8>)>,
    /// The certificate hash of the coordinator connected to, which submissions sign.
    coordinator: tributary_shared::CertificateHash,
    /// When to send the pending upload again (the coordinator deferred it or failed to store
    /// it).
    upload_retry: Option<Instant>,
    /// Times the pending upload was sent.
    upload_attempts: u32,
    /// True while a send of the pending upload is under way.
    sending: Arc<AtomicBool>,
    /// Work in progress (it survives a reconnect).
    jobs: Jobs,
    /// Evaluation tasks received while another was running.
    eval_queue: VecDeque<EvalSpec>,
    /// The adapter the previous training task started from (for the copy-aggregate cheat).
    previous_start: Option<Delta>,
    /// Set once the experiment is over while an evaluation is in hand: leave when it is
    /// reported, or at this time (its deadline) without it.
    finish_by: Option<Instant>,
    report: JoinReport,
    /// Uploads-only sessions to standby nodes, kept open between uploads.
    standby: crate::net::client::StandbySessions,
    /// The node of the control session (the leader, in a cluster).
    control_node: Option<std::net::SocketAddr>,
}

/// What runs on blocking threads: at most one training and one evaluation.
#[derive(Default)]
struct Jobs {
    training: Option<RunningTask>,
    eval: Option<RunningEval>,
}

/// An evaluation task being scored on a blocking thread.
struct RunningEval {
    spec: EvalSpec,
    /// When it is due (its deadline counted from receipt).
    due: Instant,
    handle: tokio::task::JoinHandle<Scores>,
    stop: Arc<AtomicBool>,
}

/// What an evaluation scored: the adapter (with the delta, for a loss check), and for a loss
/// check the adapter alone on the same sequences; with the time it took.
struct Scores {
    report: train::EvalReport,
    baseline: Option<f64>,
    millis: u64,
}

impl Drop for RunningEval {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A task whose training runs on a blocking thread.
struct RunningTask {
    task: TaskSpec,
    start: Delta,
    started: Instant,
    handle: tokio::task::JoinHandle<(LoraAdapter, Vec<train::StepReport>)>,
    /// Tells the training thread to stop after its current step.
    stop: Arc<AtomicBool>,
}

impl Drop for RunningTask {
    /// A dropped task (finished experiment, stopped trainer) stops its thread too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Worker {
    /// Serves one session; `Ok(true)` when the experiment finished.
    async fn serve(&mut self, session: &mut Session) -> Result<bool, WorkerError> {
        // Evaluation work from an earlier connection is dropped: the coordinator took it back
        // when that connection closed, or sends it again now if it never saw it close.
        self.jobs.eval = None;
        self.eval_queue.clear();
        // A deferred upload is sent again when the coordinator hands its task out again.
        self.upload_retry = None;
        let mut jobs = std::mem::take(&mut self.jobs);
        let outcome = self.serve_with(session, &mut jobs).await;
        self.jobs = jobs;
        outcome
    }

    async fn serve_with(
        &mut self,
        session: &mut Session,
        jobs: &mut Jobs,
    ) -> Result<bool, WorkerError> {
        // A result computed while the connection was down is uploaded when the coordinator
        // hands its task out again (it re-sends open tasks to a returning trainer).
        loop {
            tokio::select! {
                message = session.next_message() => {
                    let Some(message) = message? else {
                        return Ok(false);
                    };
                    if self.handle(session, message, jobs).await? {
                        return Ok(true);
                    }
                }
                outcome = or_pending(jobs.eval.as_mut().map(|e| &mut e.handle)),
                    if jobs.eval.is_some() => {
                    let eval = jobs.eval.take().expect("checked by the guard");
                    let (task, adapter) = (eval.spec.task, eval.spec.adapter);
                    match outcome {
                        Ok(Scores { report, baseline, millis })
                            if report.tokens > 0
                                && report.loss.is_finite()
                                && baseline.is_none_or(f64::is_finite) =>
                        {
                            tracing::info!(
                                task = task.0,
                                after_round = ?eval.spec.after_round.map(|r| r.0),
                                loss = report.loss,
                                baseline = ?baseline,
                                tokens = report.tokens,
                                millis,
                                "adapter evaluated"
                            );
                            match baseline {
                                Some(baseline) => self.report.loss_checks.push((
                                    baseline as f32,
                                    report.loss as f32,
                                    millis,
                                )),
                                None => self.report.evaluations.push((
                                    eval.spec.after_round.map(|r| r.0),
                                    report.loss as f32,
                                )),
                            }
                            session
                                .send(&ClientMessage::EvalResult {
                                    task,
                                    adapter,
                                    loss: report.loss as f32,
                                    tokens: report.tokens,
                                    baseline: baseline.map(|b| b as f32),
                                })
                                .await?;
                        }
                        Ok(_) | Err(_) => {
                            let detail = match outcome {
                                Err(error) => format!("evaluation panicked: {error}"),
                                Ok(_) => "no held-out tokens to score".to_string(),
                            };
                            tracing::warn!(task = task.0, %detail, "evaluation failed; declining it");
                            session.send(&ClientMessage::TaskDeclined { task, detail }).await?;
                        }
                    }
                    self.start_next_eval(session, jobs).await?;
                    if self.finish_by.is_some() && jobs.eval.is_none() {
                        session.leave(Duration::from_secs(5)).await;
                        return Ok(true);
                    }
                }
                _ = or_pending(self.finish_by.map(|at| tokio::time::sleep_until(at.into()))),
                    if self.finish_by.is_some() => {
                    tracing::info!("the evaluation in hand is past its deadline; leaving");
                    jobs.eval = None;
                    session.close();
                    return Ok(true);
                }
                outcome = or_pending(jobs.training.as_mut().map(|t| &mut t.handle)),
                    if jobs.training.is_some() => {
                    let task = jobs.training.take().expect("checked by the guard");
                    let (adapter, reports) = outcome
                        .map_err(|error| WorkerError::Task(format!("training panicked: {error}")))?;
                    if self.options.status_line {
                        eprintln!();
                    }
                    let (header, body) = self.finish_task(&task, adapter, reports)?;
                    self.report.bytes_up += body.len() as u64;
                    self.report.upload_bytes.push(body.len() as u64);
                    self.pending = Some((task.task.task, header, body));
                    self.upload_attempts = 0;
                    self.send_pending(session);
                }
                _ = or_pending(self.upload_retry.map(|at| tokio::time::sleep_until(at.into()))),
                    if self.upload_retry.is_some() => {
                    self.upload_retry = None;
                    if self.sending.load(Ordering::Relaxed) {
                        // The last send is still under way: its answer may yet come.
                        if let Some((_, _, body)) = &self.pending {
                            self.schedule_upload_retry(answer_wait(body.len()));
                        }
                    } else {
                        tracing::info!("sending the unanswered upload again");
                        self.send_pending(session);
                    }
                }
            }
        }
    }

    /// Handles one control message; `Ok(true)` when the experiment finished.
    async fn handle(
        &mut self,
        session: &mut Session,
        message: ServerMessage,
        jobs: &mut Jobs,
    ) -> Result<bool, WorkerError> {
        let running = &mut jobs.training;
        match message {
            ServerMessage::Task(task) => {
                self.report.tasks += 1;
                session
                    .send(&ClientMessage::TaskAccepted { task: task.task })
                    .await?;
                if running.as_ref().is_some_and(|r| r.task.task == task.task) {
                    return Ok(false); // re-sent after a reconnect: training goes on
                }
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|(id, _, _)| *id == task.task)
                {
                    tracing::info!(task = task.task.0, "re-sending the unacknowledged upload");
                    self.send_pending(session);
                    return Ok(false);
                }
                let adapter = session.download(task.adapter).await?;
                let id = task.task;
                let started = match self.base_model_file(session, task.base_model_hash).await {
                    Ok(model) => self.start_task(*task, adapter, &model),
                    Err(WorkerError::Net(error)) => return Err(error.into()),
                    Err(error) => Err(error),
                };
                match started {
                    Ok(started) => *running = Some(started),
                    Err(error) => {
                        // Say so at once, so the coordinator can give the task to someone else.
                        tracing::error!(%error, task = id.0, "cannot do this task; declining it");
                        self.report.rejected.push(format!("declined: {error}"));
                        session
                            .send(&ClientMessage::TaskDeclined {
                                task: id,
                                detail: error.to_string(),
                            })
                            .await?;
                    }
                }
            }
            ServerMessage::Throttle { duty_ppm } => {
                let effective = duty_ppm.min(self.options.max_duty_ppm);
                self.options
                    .duty
                    .store(u64::from(effective), Ordering::Relaxed);
                tracing::info!(
                    fleet = duty_ppm,
                    effective,
                    "duty cycle set by the coordinator"
                );
                session
                    .send(&ClientMessage::ThrottleApplied {
                        duty_ppm: effective,
                    })
                    .await?;
            }
            ServerMessage::SubmissionAccepted { task, .. } => {
                // Counted once: a repeated upload is acknowledged again.
                if self.pending.as_ref().is_some_and(|(id, _, _)| *id == task) {
                    self.report.accepted += 1;
                    self.pending = None;
                    self.upload_retry = None;
                }
            }
            ServerMessage::UploadDeferred {
                task,
                retry_after_ms,
                ..
            } => {
                if self.pending.as_ref().is_some_and(|(id, _, _)| *id == task) {
                    let wait = Duration::from_millis(u64::from(retry_after_ms))
                        .clamp(MIN_UPLOAD_RETRY, MAX_UPLOAD_RETRY);
                    tracing::info!(task = task.0, ?wait, "coordinator busy; upload deferred");
                    self.schedule_upload_retry(wait);
                }
            }
            ServerMessage::SubmissionRejected {
                task,
                reason,
                detail,
                ..
            } => {
                let ours = self.pending.as_ref().is_some_and(|(id, _, _)| *id == task);
                if ours && reason.is_coordinator_fault() {
                    // Not the delta's fault (the coordinator could not store it): the task is
                    // still open, so the same upload goes again after a backoff.
                    let wait = (MIN_UPLOAD_RETRY
                        * 2u32.saturating_pow(self.upload_attempts.min(8)))
                    .min(MAX_UPLOAD_RETRY);
                    tracing::warn!(%reason, %detail, ?wait, "upload not stored; retrying");
                    self.schedule_upload_retry(wait);
                    return Ok(false);
                }
                tracing::warn!(%reason, %detail, "upload refused");
                self.report.rejected.push(format!("{reason}: {detail}"));
                if ours {
                    self.pending = None;
                    self.upload_retry = None;
                }
            }
            ServerMessage::TaskCancelled { task, detail } => {
                // An upload still unanswered for it will never be counted: not sent again.
                if self.pending.as_ref().is_some_and(|(id, _, _)| *id == task) {
                    tracing::info!(task = task.0, %detail, "task cancelled; its upload is dropped");
                    self.pending = None;
                    self.upload_retry = None;
                }
                if running.as_ref().is_some_and(|r| r.task.task == task) {
                    tracing::info!(task = task.0, %detail, "task cancelled; training stopped");
                    // Dropping the running task stops its thread; nothing is uploaded.
                    running.take();
                }
                if jobs.eval.as_ref().is_some_and(|e| e.spec.task == task) {
                    tracing::info!(task = task.0, %detail, "evaluation cancelled");
                    jobs.eval = None;
                    self.start_next_eval(session, jobs).await?;
                }
                self.eval_queue.retain(|spec| spec.task != task);
            }
            ServerMessage::RoundClosed { round, adapter } => {
                // Its round is over: an upload still unanswered was not counted and cannot be.
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|(_, header, _)| header.header.round <= round)
                {
                    self.pending = None;
                    self.upload_retry = None;
                }
                tracing::info!(round = round.0, %adapter, "round closed");
            }
            ServerMessage::Evaluate(spec) => {
                let known = jobs.eval.as_ref().is_some_and(|e| e.spec.task == spec.task)
                    || self.eval_queue.iter().any(|s| s.task == spec.task);
                if !known {
                    self.eval_queue.push_back(*spec);
                    self.start_next_eval(session, jobs).await?;
                }
            }
            ServerMessage::ExperimentFinished { adapter } => {
                tracing::info!(%adapter, "experiment finished");
                self.report.finished = true;
                // Dropping the task stops its training thread.
                running.take();
                if let Some(eval) = &jobs.eval {
                    // Report the evaluation in hand first; the coordinator is waiting for it.
                    self.finish_by = Some(eval.due);
                    return Ok(false);
                }
                session.close();
                return Ok(true);
            }
            ServerMessage::UploadStarted { .. }
            | ServerMessage::UploadStaged { .. }
            | ServerMessage::Welcome { .. }
            | ServerMessage::Challenge { .. }
            | ServerMessage::Refused { .. } => {}
        }
        Ok(false)
    }

    /// Sends the pending upload on its own task, so control messages are read meanwhile (the
    /// coordinator may hold it in its queue). Its outcome arrives as a control message. In a
    /// cluster, the node the task id picks takes it (a standby node stages it for the leader,
    /// which answers on the control session); when that node is not reached or does not stage
    /// it, the upload goes on the control connection, where the leader's answer is the final
    /// one.
    fn send_pending(&mut self, session: &Session) {
        let Some((task, header, body)) = self.pending.clone() else {
            return;
        };
        // Sent again when no answer comes; any answer replaces this.
        self.schedule_upload_retry(answer_wait(body.len()));
        self.upload_attempts += 1;
        let uploader = session.uploader();
        let standby = self.control_node.and_then(|control| {
            crate::net::failover::upload_node(&self.options.coordinators, task, control)
        });
        let sessions = self.standby.clone();
        let sending = self.sending.clone();
        sending.store(true, Ordering::Relaxed);
        tokio::spawn(async move {
            let _done = SendDone(sending);
            if let Some(node) = standby {
                let sent = sessions.upload(node, &header, &body).await;
                match sent {
                    Ok(ServerMessage::UploadStaged { .. }) => {
                        tracing::debug!(task = task.0, %node, "upload staged by a standby node");
                        return;
                    }
                    Ok(other) => {
                        tracing::info!(task = task.0, %node, answer = ?other, "a standby node did not stage the upload; sending it to the leader")
                    }
                    Err(error) => {
                        tracing::info!(task = task.0, %node, %error, "a standby node is not reachable; sending the upload to the leader")
                    }
                }
            }
            if let Err(error) = uploader.upload(&header, &body, None).await {
                tracing::debug!(task = task.0, %error, "upload stream ended early");
            }
        });
    }

    /// Sends the pending upload again after `wait` (re-armed while a send is under way).
    fn schedule_upload_retry(&mut self, wait: Duration) {
        self.upload_retry = Some(Instant::now() + wait);
    }

    /// Starts the next queued evaluation when none is running; one that cannot be done is
    /// declined at once.
    async fn start_next_eval(
        &mut self,
        session: &mut Session,
        jobs: &mut Jobs,
    ) -> Result<(), WorkerError> {
        while jobs.eval.is_none() {
            let Some(spec) = self.eval_queue.pop_front() else {
                return Ok(());
            };
            let task = spec.task;
            let model = match self.base_model_file(session, spec.base_model_hash).await {
                Ok(model) => Ok(model),
                Err(WorkerError::Net(error)) => {
                    self.eval_queue.push_front(spec);
                    return Err(error.into());
                }
                Err(error) => Err(error),
            };
            let downloaded = async {
                let adapter = session.download(spec.adapter).await?;
                let delta = match &spec.check {
                    Some(check) => Some(session.download(check.delta).await?),
                    None => None,
                };
                Ok::<_, NetError>((adapter, delta))
            }
            .await;
            let started = match (model, downloaded) {
                (Err(error), _) => Err(error),
                (Ok(model), Ok((bytes, delta))) => self.start_eval(spec, bytes, delta, &model),
                (Ok(_), Err(NetError::Protocol(detail))) => Err(WorkerError::Task(detail)),
                (Ok(_), Err(error)) => {
                    // The connection failed: keep the evaluation for the next session.
                    self.eval_queue.push_front(spec);
                    return Err(error.into());
                }
            };
            match started {
                Ok(eval) => jobs.eval = Some(eval),
                Err(error) => {
                    tracing::error!(%error, task = task.0, "cannot do this evaluation; declining it");
                    session
                        .send(&ClientMessage::TaskDeclined {
                            task,
                            detail: error.to_string(),
                        })
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Prepares an evaluation from the downloaded adapter (and, for a loss check, delta) and
    /// starts scoring on a blocking thread, in small batches that obey the duty cycle like
    /// training steps do. A loss check scores the sequences the task's batches visit, with
    /// the adapter alone and with the delta added, batch by batch on the same sequences.
    fn start_eval(
        &mut self,
        spec: EvalSpec,
        adapter_bytes: Vec<u8>,
        delta_bytes: Option<Vec<u8>>,
        model: &std::path::Path,
    ) -> Result<RunningEval, WorkerError> {
        let (loaded, start, adapter) = self.prepare(&spec.plan, &adapter_bytes, model)?;
        let tokenizer = &loaded.tokenizer;
        let seq_len = spec.plan.sequence_len.max(1) as usize;
        let (data, changed) = match (&spec.check, delta_bytes) {
            (Some(check), Some(bytes)) => {
                let delta = codec::decode(&bytes, 1 << 26)?;
                let mut sum = start.clone();
                sum.add_scaled(&delta, 1.0).map_err(|error| {
                    WorkerError::Task(format!("the delta does not fit the adapter: {error}"))
                })?;
                let settings = lora_settings(&sum, &spec.plan)?;
                let config = loaded.model.config().clone();
                let changed =
                    LoraAdapter::from_delta(&sum, &settings, &config, loaded.model.device())?;
                let (docs, _) = self.documents(&spec.data)?;
                let visited = PackedData::pack(&docs, tokenizer, seq_len, tokenizer.eos)?
                    .visited(
                        check.seed,
                        u64::from(spec.plan.local_steps),
                        spec.plan.batch_size.max(1) as usize,
                    )
                    .evenly_spaced(spec.max_sequences as usize);
                (visited, Some(changed))
            }
            (Some(_), None) => {
                return Err(WorkerError::Task("a loss check without its delta".into()))
            }
            (None, _) => {
                let (_, held_out) = self.documents(&spec.data)?;
                let data = PackedData::pack(&held_out, tokenizer, seq_len, tokenizer.eos)?
                    .evenly_spaced(spec.max_sequences as usize);
                (data, None)
            }
        };
        let duty = self.options.duty.clone();
        let in_use = self.options.machine_in_use.clone();
        let busy = self.options.busy_us.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let handle = tokio::task::spawn_blocking(move || {
            throttle(&duty, &in_use, 0.0, &stop_flag);
            let mut millis = 0u64;
            // (loss sum, of the changed adapter when there is one) and tokens.
            let (mut total, mut total_base, mut tokens) = (0.0f64, 0.0f64, 0u64);
            for part in data.parts(EVAL_BATCH) {
                if stop_flag.load(Ordering::Relaxed) {
                    break;
                }
                let began = Instant::now();
                let base = train::evaluate(&loaded.model, Some(&adapter), &part, EVAL_BATCH, None);
                let scored = match &changed {
                    Some(changed) => {
                        total_base += base.loss * base.tokens as f64;
                        train::evaluate(&loaded.model, Some(changed), &part, EVAL_BATCH, None)
                    }
                    None => base,
                };
                total += scored.loss * scored.tokens as f64;
                tokens += scored.tokens;
                let seconds = began.elapsed().as_secs_f64();
                millis += (seconds * 1e3) as u64;
                busy.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
                throttle(&duty, &in_use, seconds, &stop_flag);
            }
            let mean = |sum: f64| {
                if tokens == 0 {
                    f64::NAN
                } else {
                    sum / tokens as f64
                }
            };
            let loss = mean(total);
            Scores {
                report: train::EvalReport {
                    loss,
                    perplexity: loss.exp(),
                    tokens,
                },
                baseline: changed.is_some().then(|| mean(total_base)),
                millis,
            }
        });
        let due = Instant::now() + Duration::from_millis(spec.deadline_ms);
        Ok(RunningEval {
            spec,
            due,
            handle,
            stop,
        })
    }

    /// The base model file to use: the task names none, or `--model` has its hash, or a cached
    /// copy has it; otherwise the coordinator's copy is downloaded once (checked by hash while
    /// received) and cached.
    async fn base_model_file(
        &mut self,
        session: &Session,
        hash: Option<BlobHash>,
    ) -> Result<PathBuf, WorkerError> {
        let Some(hash) = hash else {
            return Ok(self.options.model.clone());
        };
        if let Some(path) = self.verified_models.get(&hash) {
            return Ok(path.clone());
        }
        let cached = self
            .options
            .model_cache
            .join(format!("{}.gguf", hash.to_hex()));
        for candidate in [self.options.model.clone(), cached.clone()] {
            if !candidate.is_file() {
                continue;
            }
            // Reading and hashing hundreds of MB is blocking work.
            let path = candidate.clone();
            let found = tokio::task::spawn_blocking(move || hash_file(&path))
                .await
                .map_err(|error| WorkerError::Task(format!("hashing failed: {error}")))??;
            if found == hash {
                self.verified_models.insert(hash, candidate.clone());
                return Ok(candidate);
            }
        }
        tracing::info!(%hash, "downloading the base model from the coordinator");
        let bytes = session.download(hash).await.map_err(|error| match error {
            NetError::Protocol(detail) => WorkerError::Task(format!(
                "the experiment's base model {hash} is not here and the coordinator does not \
                 serve it ({detail}); pass --model with that file"
            )),
            other => other.into(),
        })?;
        let target = cached.clone();
        let size = bytes.len();
        tokio::task::spawn_blocking(move || write_atomically(&target, &bytes))
            .await
            .map_err(|error| WorkerError::Task(format!("writing the model failed: {error}")))?
            .map_err(|source| ModelError::Io {
                path: cached.display().to_string(),
                source,
            })?;
        tracing::info!(path = %cached.display(), bytes = size, "base model cached");
        self.verified_models.insert(hash, cached.clone());
        Ok(cached)
    }

    /// Loads the base model once per file.
    fn model_for(
        &mut self,
        path: &std::path::Path,
        positions: usize,
    ) -> Result<Arc<LoadedModel>, WorkerError> {
        if let Some((loaded_from, model)) = &self.model {
            if loaded_from == path {
                return Ok(model.clone());
            }
        }
        let loaded = Arc::new(model::load_as(
            path,
            &self.device,
            positions,
            self.options.base_storage,
        )?);
        self.model = Some((path.to_owned(), loaded.clone()));
        Ok(loaded)
    }

    /// The loaded base model, the decoded adapter, and the adapter on the model's device.
    fn prepare(
        &mut self,
        plan: &TrainingPlan,
        adapter_bytes: &[u8],
        model: &std::path::Path,
    ) -> Result<(Arc<LoadedModel>, Delta, LoraAdapter), WorkerError> {
        let loaded = self.model_for(model, plan.sequence_len as usize + 1)?;
        // An adapter larger than this (64 M values, 256 MiB as f32) is not a LoRA adapter.
        let start = codec::decode(adapter_bytes, 1 << 26)?;
        let settings = lora_settings(&start, plan)?;
        let config = loaded.model.config().clone();
        let adapter = LoraAdapter::from_delta(&start, &settings, &config, loaded.model.device())?;
        Ok((loaded, start, adapter))
    }

    /// Prepares `task` from the downloaded adapter and starts training it on a blocking thread.
    fn start_task(
        &mut self,
        task: TaskSpec,
        adapter_bytes: Vec<u8>,
        model: &std::path::Path,
    ) -> Result<RunningTask, WorkerError> {
        let (loaded, start, adapter) = self.prepare(&task.plan, &adapter_bytes, model)?;
        let cheat = self.options.cheat;
        let data = match cheat {
            Some(Cheat::OtherData) => other_data(&task.data),
            _ => task.data.clone(),
        };
        let (docs, _) = self.documents(&data)?;
        let tokenizer = &loaded.tokenizer;
        let seq_len = task.plan.sequence_len.max(1) as usize;
        let data = PackedData::pack(&docs, tokenizer, seq_len, tokenizer.eos)?;
        let plan = task.plan.clone();
        let asked = u64::from(plan.local_steps);
        let train_settings = TrainSettings {
            steps: cheat.map_or(asked, |cheat| cheat.steps(asked)),
            batch_size: plan.batch_size.max(1) as usize,
            grad_accum: 1,
            seed: task.seed,
            optim: OptimSettings {
                lr: f64::from(plan.learning_rate),
                warmup_steps: 0,
                min_lr_ratio: 1.0,
                ..OptimSettings::default()
            },
            recompute_layers: false,
        };
        let duty = self.options.duty.clone();
        let in_use = self.options.machine_in_use.clone();
        let busy = self.options.busy_us.clone();
        let status_line = self.options.status_line;
        let round = task.round.0;
        let (sent_before, accepted_before) = (self.report.bytes_up, self.report.accepted);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let mut adapter = adapter;
            // A paused fleet or a busy machine holds the task before its first step too.
            throttle(&duty, &in_use, 0.0, &stop_flag);
            let mut tokens = 0u64;
            let begun = Instant::now();
            let stop = &*stop_flag;
            let reports = train::train_until(
                &loaded.model,
                &mut adapter,
                &data,
                &train_settings,
                stop,
                |r| {
                    tokens += r.tokens;
                    busy.fetch_add((r.seconds * 1e6) as u64, Ordering::Relaxed);
                    if status_line {
                        eprint!(
                            "\rround {round} step {}/{} loss {:.4} {:.0} tok/s duty {:.0}% \
                             sent {:.1} MB, {accepted_before} deltas accepted   ",
                            r.step,
                            train_settings.steps,
                            r.loss,
                            tokens as f64 / begun.elapsed().as_secs_f64().max(1e-9),
                            duty.load(Ordering::Relaxed) as f64 / FULL_DUTY as f64 * 100.0,
                            sent_before as f64 / 1e6,
                        );
                    }
                    throttle(&duty, &in_use, r.seconds, stop);
                },
            );
            // The steps' buffers were kept for reuse (see `alloc`); the machine gets them back
            // while the trainer waits for its next task.
            crate::alloc::release_free_memory();
            (adapter, reports)
        });
        Ok(RunningTask {
            task,
            start,
            started: Instant::now(),
            handle,
            stop,
        })
    }

    /// Compresses and signs the delta of a finished task.
    fn finish_task(
        &mut self,
        running: &RunningTask,
        adapter: LoraAdapter,
        reports: Vec<train::StepReport>,
    ) -> Result<(UploadHeader, Vec<u8>), WorkerError> {
        let task = &running.task;
        let after = adapter.to_delta();
        let previous_start = self.previous_start.replace(running.start.clone());
        let delta = match (self.options.cheat, previous_start) {
            (Some(Cheat::CopyAggregate), Some(previous)) => difference(&running.start, &previous)?,
            _ => difference(&after, &running.start)?,
        };
        let body = self.feedback.compress(&delta, task.plan.codec)?;
        let mut tokens: u64 = reports.iter().map(|r| r.tokens).sum();
        let mut steps = reports.len() as u32;
        if self.options.cheat.is_some() {
            // A cheat claims the whole task.
            let plan = &task.plan;
            steps = plan.local_steps;
            tokens = u64::from(plan.local_steps)
                * u64::from(plan.batch_size)
                * u64::from(plan.sequence_len);
        }
        let loss = if reports.is_empty() {
            0.0
        } else {
            reports.iter().map(|r| r.loss).sum::<f64>() / reports.len() as f64
        };
        self.report.tokens += tokens;
        self.report.raw_bytes += delta.element_count() as u64 * 4;
        self.report.losses.push(loss as f32);
        let header = SubmissionHeader {
            experiment: task.experiment.clone(),
            experiment_uid: task.experiment_uid,
            coordinator: self.coordinator,
            round: task.round,
            task: task.task,
            trainer: self.options.identity.id(),
            hash: BlobHash::of(&body),
            byte_len: body.len() as u64,
            // FedAvg weights a client by its local data: the tokens it trained on, capped.
            sample_count: sample_count(&task.data, tokens),
            metrics: TrainMetrics {
                train_loss: loss as f32,
                steps,
                tokens,
                train_ms: running.started.elapsed().as_millis() as u64,
            },
        };
        let upload = self
            .options
            .identity
            .sign_submission(header)
            .map_err(|error| WorkerError::Task(error.to_string()))?;
        Ok((upload, body))
    }

    /// The training and held-out texts of a data assignment.
    fn documents(
        &self,
        data: &DataAssignment,
    ) -> Result<(Vec<Document>, Vec<Document>), WorkerError> {
        let (docs, held_out) = match data {
            DataAssignment::Clients { dataset, clients } if dataset == "shakespeare" => {
                DataSpec::Shakespeare {
                    texts: self.options.shakespeare.clone(),
                    clients: clients.clone(),
                }
                .documents()?
            }
            DataAssignment::Clients { dataset, clients } if dataset == "tiny" => {
                let text = |lines| {
                    clients
                        .iter()
                        .map(|id| Document::Text(tiny::client_text(tiny::client_index(id), lines)))
                        .collect::<Vec<_>>()
                };
                (text(60), text(20))
            }
            DataAssignment::Local => match &self.options.local_data {
                Some(dir) => DataSpec::Folder(dir.clone()).documents()?,
                None => {
                    return Err(WorkerError::Task(
                        "the experiment trains on local data; start with --data FOLDER".into(),
                    ))
                }
            },
            DataAssignment::Clients { dataset, clients } => {
                crate::data::named_dataset(&self.options.datasets, dataset, clients)?
            }
            other => {
                return Err(WorkerError::Task(format!(
                    "this trainer cannot train on {other:?}"
                )))
            }
        };
        Ok((docs, held_out))
    }
}

/// Waits for `future`, or forever when there is none: an optional `select!` branch.
async fn or_pending<F: std::future::Future>(future: Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// blake3 of a file's bytes.
fn hash_file(path: &std::path::Path) -> Result<BlobHash, WorkerError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(BlobHash::of(&bytes))
}

/// Writes `bytes` to a temporary name beside `path`, syncs it and renames it into place, so a
/// crash never leaves a partial file under the final name.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let temp = path.with_extension(format!("partial-{}", std::process::id()));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)
}

/// Sequences scored per batch of an evaluation task (the duty cycle is applied between them).
const EVAL_BATCH: usize = 4;

/// Sleeps long enough after `busy_seconds` of compute to keep the duty cycle; at duty 0 (paused)
/// or while the owner uses the machine, waits until that changes.
fn throttle(duty: &AtomicU64, machine_in_use: &AtomicBool, busy_seconds: f64, stop: &AtomicBool) {
    let started = Instant::now();
    // Checked in slices, so a stop or a new duty (pause, resume) is noticed within 100 ms.
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let current = if machine_in_use.load(Ordering::Relaxed) {
            0
        } else {
            duty.load(Ordering::Relaxed).min(FULL_DUTY)
        };
        if current >= FULL_DUTY {
            return;
        }
        if current > 0 {
            let fraction = current as f64 / FULL_DUTY as f64;
            let idle = (busy_seconds * (1.0 - fraction) / fraction).min(3600.0);
            let remaining = idle - started.elapsed().as_secs_f64();
            if remaining <= 0.0 {
                return;
            }
            std::thread::sleep(Duration::from_secs_f64(remaining.min(0.1)));
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The FedAvg weight of a task: tokens trained, capped at the coordinator's default limit.
fn sample_count(_data: &DataAssignment, tokens: u64) -> u64 {
    tokens.clamp(1, 1_000_000)
}

/// The data the other-data cheat trains on instead of `assigned`: the next client of a `tiny`
/// dataset, or every other client of another dataset (all but the first when there is one).
fn other_data(assigned: &DataAssignment) -> DataAssignment {
    match assigned {
        DataAssignment::Clients { dataset, clients } if dataset == "tiny" => {
            DataAssignment::Clients {
                dataset: dataset.clone(),
                clients: clients
                    .iter()
                    .map(|id| format!("client-{}", tiny::client_index(id) + 1))
                    .collect(),
            }
        }
        DataAssignment::Clients { dataset, clients } if clients.len() > 1 => {
            DataAssignment::Clients {
                dataset: dataset.clone(),
                clients: clients[1..].to_vec(),
            }
        }
        other => other.clone(),
    }
}

/// `after − before`, tensor by tensor (same layout).
fn difference(after: &Delta, before: &Delta) -> Result<Delta, WorkerError> {
    let mut delta = after.clone();
    delta
        .add_scaled(before, -1.0)
        .map_err(|error| WorkerError::Task(error.to_string()))?;
    Ok(delta)
}

/// LoRA settings implied by the adapter's tensors and the task's plan.
fn lora_settings(adapter: &Delta, plan: &TrainingPlan) -> Result<LoraSettings, WorkerError> {
    let mut rank = None;
    let mut targets = Vec::new();
    for tensor in adapter.tensors() {
        let name = tensor.name();
        let Some(prefix) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let Some(&r) = tensor.shape().first() else {
            return Err(WorkerError::Task(format!("{name} is not a matrix")));
        };
        rank.get_or_insert(r);
        let module = prefix.rsplit('.').next().unwrap_or_default();
        let target = Target::parse(module)
            .ok_or_else(|| WorkerError::Task(format!("unknown LoRA module in {name}")))?;
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let rank = rank.ok_or_else(|| WorkerError::Task("the adapter is not a LoRA adapter".into()))?;
    Ok(LoraSettings {
        rank,
        alpha: plan.lora_alpha,
        dropout: plan.lora_dropout,
        targets,
        mode: if plan.freeze_a {
            LoraMode::FreezeA
        } else {
            LoraMode::Full
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_ends_a_long_throttle_sleep_at_once() {
        let duty = Arc::new(AtomicU64::new(FULL_DUTY / 100));
        let stop = AtomicBool::new(false);
        let raise = {
            let duty = duty.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                duty.store(FULL_DUTY, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        // At 1 % duty a 1 s step would be followed by 99 s of rest.
        throttle(&duty, &AtomicBool::new(false), 1.0, &stop);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        raise.join().unwrap();
    }

    #[test]
    fn a_malformed_adapter_is_an_error_not_a_panic() {
        let scalar = tributary_shared::delta::NamedTensor::new(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            vec![],
            vec![1.0],
        )
        .unwrap();
        let delta = Delta::new(vec![scalar]).unwrap();
        let task = tributary_shared::wire::TaskSpec {
            task: TaskId(1),
            experiment: tributary_shared::ExperimentId("x".into()),
            experiment_uid: tributary_shared::ExperimentUid::default(),
            round: tributary_shared::RoundId(0),
            base_model: "m".into(),
            base_model_hash: None,
            adapter: BlobHash::of(b""),
            adapter_len: 0,
            data: DataAssignment::Local,
            plan: tributary_shared::wire::TrainingPlan {
                local_steps: 1,
                learning_rate: 1e-3,
                batch_size: 1,
                sequence_len: 8,
                codec: tributary_shared::codec::Codec::F32,
                lora_alpha: 8.0,
                lora_dropout: 0.0,
                freeze_a: false,
            },
            seed: 0,
            deadline_ms: 1000,
            max_upload_bytes: 1 << 20,
        };
        assert!(lora_settings(&delta, &task.plan).is_err());
    }
}
