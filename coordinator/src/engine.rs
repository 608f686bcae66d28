//! The round engine: a pure state machine that runs an experiment's rounds.
//!
//! It never reads the clock, touches sockets, files or SQLite. The driver feeds it events through
//! `handle_*` methods, each taking `now`, and then drains [`Engine::poll_action`] until it returns
//! `None` and re-arms one timer at [`Engine::poll_timeout`]. `now` must never go backwards.
//!
//! # Method groups
//! - Fleet: [`Engine::handle_trainer_joined`], [`Engine::handle_trainer_left`],
//!   [`Engine::handle_task_declined`].
//! - Submissions: [`Engine::handle_submission_header`] decides whether an upload's body may be
//!   received; [`Engine::handle_upload_finished`] reports the driver's byte-level checks;
//!   [`Engine::handle_submission_persisted`] reports that the delta is durable, which is when the
//!   trainer is acknowledged.
//! - Rounds: [`Engine::handle_timeout`], [`Engine::handle_round_committed`].
//!
//! # Round rules
//! A round hands out `ceil(trainers_per_round × over_selection)` tasks, at most one per trainer,
//! to connected idle trainers in a seeded pseudo-random order. It closes as soon as
//! `trainers_per_round` deltas are accepted, or at its deadline with at least `quorum`; without a
//! quorum the deadline is extended and replacement tasks go to idle trainers. When a task fails
//! (trainer left, declined, upload rejected) a replacement is sent if an idle trainer exists.
//!
//! # Spot re-execution
//! A share `replicate` of tasks, picked by a keyed hash of the task id under the round's
//! unrevealed secret ([`RoundSecret::replicates`]), is also given to a second idle trainer in
//! selection order: a replica task with its own id but the original's data and seed, so nothing
//! in it tells its trainer that it is a check. Replicas are extra: they do not count towards
//! `tasks_per_round`. Of a pair, the delta that arrives first counts like any other; the second
//! is kept beside it for comparison ([`RoundClose::replicas`]), even when its bytes are
//! identical. A round that has its deltas waits for the second delta of a pair whose first one
//! counts, while that task is still live, but never past its deadline.
//!
//! # Referees and flags
//! A pair that disagreed is a [`Dispute`] ([`Engine::handle_verdicts`], from the committed
//! entry). In a later round it goes to a third idle trainer (a veteran when one is idle, never
//! one of the two, never a flagged trainer) as a referee task: the disputed round's start
//! adapter, data and seed, under the current round's id. Its delta is kept beside the round
//! ([`RoundClose::referees`]) and the derivation decides whom it agrees with. A round waits for
//! its live referee tasks as for replicas; an unfinished one goes back to the queue, at most
//! three times. A flagged trainer goes back on probation and checks nobody again; at
//! `exclude_after` flags it gets no task and its joins are ignored.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use tributary_shared::config::ExperimentConfig;
use tributary_shared::ledger::{AcceptedDelta, RejectedSubmission};
use tributary_shared::selection::RoundSecret;
use tributary_shared::wire::{
    DataAssignment, EvalSpec, LossCheckSpec, RejectReason, ServerMessage, TaskSpec, TrainingPlan,
    UploadHeader,
};

use crate::derive::LossCheckInput;
use crate::evaluation::Evaluations;
use crate::evaluation::Settled;
pub use crate::evaluation::{
    EvalAnswer, EvalConfig, EvalFailure, EvalOutcome, EvalTarget, EvaluatorEvent, LossCheckTarget,
};
use tributary_shared::loss_check::LossAnswer;
use tributary_shared::{
    BlobHash, CertificateHash, ExperimentId, ExperimentUid, Layout, RoundId, TaskId, TrainerId,
};

/// What the engine needs to know about the experiment.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The experiment's id.
    pub experiment: ExperimentId,
    /// The experiment's random id, which submissions must have signed (set by the driver).
    pub experiment_uid: ExperimentUid,
    /// This coordinator's certificate hash, which submissions must have signed (set by the
    /// driver).
    pub coordinator: CertificateHash,
    /// Rounds to run.
    pub rounds: u64,
    /// Seed for selection order and task seeds.
    pub seed: u64,
    /// Accepted deltas that close a round.
    pub trainers_per_round: u32,
    /// Tasks per round.
    pub tasks_per_round: u32,
    /// Fewest accepted deltas to close at the deadline.
    pub quorum: u32,
    /// Trainers needed before a round starts.
    pub min_trainers: u32,
    /// Deadline of a round, from its first task.
    pub round_timeout: Duration,
    /// How long to wait for `min_trainers` before starting with at least `quorum`.
    pub gather_timeout: Duration,
    /// Base model name sent in tasks.
    pub base_model: String,
    /// The base model file's hash, sent in tasks (trainers fetch it by hash when the
    /// coordinator serves it, and check it otherwise).
    pub base_model_hash: Option<BlobHash>,
    /// Local training settings sent in tasks.
    pub plan: TrainingPlan,
    /// Data assignment settings.
    pub data: tributary_shared::config::DataSection,
    /// Upload cap.
    pub max_upload_bytes: u64,
    /// Largest sample count a submission may claim (a larger claim is malformed).
    pub max_sample_count: u64,
    /// What one task is worth as a FedAvg weight ([`ExperimentConfig::task_budget`]); a claim
    /// can only lower a delta's weight below it.
    pub task_budget: u64,
    /// Most of a round's tasks that go to identities on probation (no delta accepted in an
    /// earlier round), as a fraction; 1 is no limit.
    pub probation_share: f64,
    /// Largest absolute value a delta may hold.
    pub max_abs_value: f32,
    /// The adapter's layout; every delta must match it.
    pub layout: Layout,
    /// Held-out evaluation of each adapter, when on.
    pub evaluation: Option<EvalConfig>,
    /// Share of tasks also given to a second trainer (spot re-execution), 0 to 1.
    pub replicate: f64,
    /// Flags after which a trainer gets no more tasks.
    pub exclude_after: u32,
    /// Share of counted deltas whose loss on their training data evaluators check, 0 to 1
    /// (0 without evaluation, or on synthetic or local data).
    pub loss_check: f64,
}

impl EngineConfig {
    /// Derives the engine's settings from a validated experiment file.
    pub fn from_experiment(
        config: &ExperimentConfig,
    ) -> Result<Self, tributary_shared::config::ConfigError> {
        let selection = &config.selection;
        Ok(Self {
            experiment: ExperimentId(config.experiment.name.clone()),
            experiment_uid: ExperimentUid::default(),
            coordinator: CertificateHash::default(),
            rounds: config.experiment.rounds,
            seed: config.experiment.seed,
            trainers_per_round: selection.trainers_per_round,
            tasks_per_round: selection.tasks_per_round(),
            quorum: selection.quorum,
            min_trainers: selection.min_trainers,
            round_timeout: Duration::from_secs_f64(selection.round_timeout_secs),
            gather_timeout: Duration::from_secs_f64(selection.gather_timeout_secs),
            base_model: config.model.name.clone(),
            base_model_hash: config.model.hash.as_deref().and_then(|h| h.parse().ok()),
            plan: config.training.plan(&config.adapter),
            data: config.data.clone(),
            max_upload_bytes: config.max_upload_bytes(),
            max_sample_count: config.limits.max_sample_count,
            task_budget: config.task_budget(),
            probation_share: config.admission.probation_share(),
            max_abs_value: config.limits.max_abs_value,
            layout: config.adapter.layout()?,
            evaluation: config
                .evaluation
                .assignment(&config.data)
                .map(|data| EvalConfig {
                    data,
                    max_sequences: config.evaluation.max_sequences,
                    timeout: Duration::from_secs_f64(config.evaluation.timeout_secs),
                    evaluators: config.evaluation.evaluators,
                }),
            replicate: config.verification().replicate,
            exclude_after: config.verification().exclude_after,
            loss_check: match config.data.dataset.as_str() {
                "synthetic" | "local" => 0.0,
                _ if config.evaluation.assignment(&config.data).is_none() => 0.0,
                _ => config.verification().loss_check,
            },
        })
    }
}

/// Where a restarted engine picks up: the open round as the store recorded it.
#[derive(Clone, Debug)]
pub struct ResumeState {
    /// The round that is open (the next to run).
    pub round: RoundId,
    /// The adapter that round starts from, and its encoded length.
    pub adapter: Option<(BlobHash, u64)>,
    /// Tasks already issued in this round: (task, trainer).
    pub tasks: Vec<(TaskId, TrainerId)>,
    /// Replica tasks among them: (replica, the task it repeats).
    pub repeats: Vec<(TaskId, TaskId)>,
    /// Deltas accepted in this round, with their tasks.
    pub accepted: Vec<(TaskId, AcceptedDelta)>,
    /// Second deltas of replicated tasks in this round, with their tasks.
    pub replicas: Vec<(TaskId, AcceptedDelta)>,
    /// Disputes of committed rounds that no referee has settled, oldest first.
    pub disputes: Vec<Dispute>,
    /// Referee deltas stored in this round, with their disputes (which are then not queued).
    pub referee_results: Vec<(Dispute, AcceptedDelta)>,
    /// Flags per trainer, from the ledger.
    pub flags: Vec<(TrainerId, u32)>,
    /// Submissions refused in this round.
    pub rejected: Vec<RejectedSubmission>,
    /// Every delta hash ever accepted in this experiment (replay protection).
    pub known_hashes: Vec<BlobHash>,
    /// The next unused task id.
    pub next_task: TaskId,
    /// True when every round has been committed.
    pub finished: bool,
    /// Adapters of this experiment with no recorded evaluation yet, oldest first.
    pub unevaluated: Vec<EvalTarget>,
    /// The open round's secret (it orders selection and seeds tasks; revealed when the round
    /// closes).
    pub secret: RoundSecret,
    /// Answers already recorded for the unevaluated adapters: (adapter, answer).
    pub eval_answers: Vec<(BlobHash, EvalAnswer)>,
    /// Trainers with a delta accepted in a committed round (off probation).
    pub veterans: Vec<TrainerId>,
}

impl Default for ResumeState {
    fn default() -> Self {
        Self {
            round: RoundId::default(),
            adapter: None,
            tasks: Vec::new(),
            repeats: Vec::new(),
            accepted: Vec::new(),
            replicas: Vec::new(),
            disputes: Vec::new(),
            referee_results: Vec::new(),
            flags: Vec::new(),
            rejected: Vec::new(),
            known_hashes: Vec::new(),
            next_task: TaskId::default(),
            finished: false,
            unevaluated: Vec::new(),
            secret: RoundSecret([0; 32]),
            eval_answers: Vec::new(),
            veterans: Vec::new(),
        }
    }
}

/// A side effect for the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send a control message to a connected trainer.
    Send {
        /// Recipient.
        trainer: TrainerId,
        /// The message.
        message: ServerMessage,
    },
    /// Record an issued task (before or with sending it).
    RecordTask {
        /// The round.
        round: RoundId,
        /// The task.
        task: TaskId,
        /// Its trainer.
        trainer: TrainerId,
        /// For a replica task, the task whose data and seed it repeats.
        repeats: Option<TaskId>,
        /// For a referee task, the round of the dispute it settles.
        referee_of: Option<RoundId>,
    },
    /// Durably record an accepted delta (its blob is already stored); then call
    /// [`Engine::handle_submission_persisted`].
    PersistSubmission {
        /// The round.
        round: RoundId,
        /// The task it answers.
        task: TaskId,
        /// The delta.
        accepted: AcceptedDelta,
        /// The signed header it came with, kept so anyone can re-check the signature.
        upload: Box<UploadHeader>,
        /// For the second delta of a replicated task, the delta of the pair that counts: this
        /// one is kept for comparison, not counted.
        replica_of: Option<BlobHash>,
        /// For a referee's delta, the dispute it settles (kept, not counted).
        referee_of: Option<Box<Dispute>>,
    },
    /// Count a refused submission, and record it when `recorded` (a flood of refusals is
    /// counted but not stored, so a peer cannot bloat the ledger).
    RecordRejection {
        /// The round whose ledger entry will list it.
        round: RoundId,
        /// What was refused.
        rejected: RejectedSubmission,
        /// Whether to store it.
        recorded: bool,
    },
    /// Aggregate the round, store the new adapter and ledger entry, open the next round; then
    /// call [`Engine::handle_round_committed`].
    CloseRound(RoundClose),
    /// Every round is done.
    Finished {
        /// The final adapter.
        adapter: BlobHash,
        /// Loss checks left unsettled or unrecorded: no later ledger entry could hold them.
        abandoned_loss_checks: usize,
    },
    /// An evaluation answer crossed the cancellation its trainer was sent and was dropped (not
    /// a fault; counted so an operator sees how often it happens).
    LateAnswer {
        /// Who answered.
        trainer: TrainerId,
    },
    /// Remove an accepted submission whose stored delta turned out unreadable, so that the
    /// round's record counts exactly what it aggregates (its refusal is recorded alongside).
    ExcludeSubmission {
        /// The round.
        round: RoundId,
        /// The delta.
        hash: BlobHash,
    },
    /// Record an issued evaluation task (so its id is never reused after a restart).
    RecordEvalTask {
        /// The task.
        task: TaskId,
        /// Its trainer.
        trainer: TrainerId,
        /// The adapter to score.
        adapter: BlobHash,
    },
    /// Durably record what one evaluator did: its answer or its failure.
    RecordEvaluator(EvaluatorEvent),
    /// Durably record an adapter's settled held-out score (the median of its evaluators).
    RecordEvaluation(EvalOutcome),
    /// An evaluation was given up without any answer (log it).
    EvaluationAbandoned(EvalTarget),
    /// A trainer was dropped from the experiment (flagged `exclude_after` times): close its
    /// connection; the driver refuses its hellos from now on ([`Engine::is_excluded`]).
    Dismiss {
        /// The trainer.
        trainer: TrainerId,
        /// Why, for the trainer.
        detail: String,
    },
}

/// Everything the driver needs to close a round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundClose {
    /// The round.
    pub round: RoundId,
    /// The adapter it started from.
    pub adapter_before: BlobHash,
    /// Accepted deltas sorted by hash.
    pub accepted: Vec<AcceptedDelta>,
    /// Replicated tasks whose two deltas arrived: (the counted delta, the other one), sorted by
    /// the counted delta's hash.
    pub replicas: Vec<(BlobHash, AcceptedDelta)>,
    /// Referee deltas that arrived, with the disputes they settle.
    pub referees: Vec<(Dispute, AcceptedDelta)>,
    /// Trainers flagged by referees in committed rounds: their deltas do not count.
    pub flagged: BTreeSet<TrainerId>,
    /// Loss checks settled since the last commit.
    pub loss_checks: Vec<LossCheckInput>,
    /// Refused submissions in order.
    pub rejected: Vec<RejectedSubmission>,
    /// Time from the round's first task to its close.
    pub duration: Duration,
    /// The round's secret, to be revealed in its ledger entry.
    pub secret: RoundSecret,
}

/// A replicated task whose two deltas disagreed, waiting for a referee: what to run again and
/// who disagreed. Everything in it comes from the disputed round's ledger entry
/// ([`Dispute::from_entry`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Dispute {
    /// The disputed round.
    pub round: RoundId,
    /// Its start adapter and encoded length.
    pub adapter: BlobHash,
    /// The adapter's encoded length.
    pub adapter_len: u64,
    /// The task whose data the pair trained on (the original: the lower id of the two).
    pub spec_task: TaskId,
    /// Its seed under the disputed round's secret.
    pub seed: u64,
    /// The counted delta and its trainer.
    pub counted: BlobHash,
    /// Who sent it.
    pub counted_trainer: TrainerId,
    /// The replica and its trainer.
    pub replica: BlobHash,
    /// Who sent it.
    pub replica_trainer: TrainerId,
}

impl Dispute {
    /// The disputes a committed entry records (its disagreeing checks), with the length of its
    /// start adapter.
    pub fn from_entry(
        entry: &tributary_shared::ledger::LedgerEntry,
        adapter_len: u64,
    ) -> Vec<Dispute> {
        let Some(verification) = &entry.verification else {
            return Vec::new();
        };
        verification
            .checks
            .iter()
            .filter(|check| check.verdict != tributary_shared::ledger::CheckVerdict::Agree)
            .filter_map(|check| {
                let counted = entry.accepted.iter().find(|a| a.hash == check.counted)?;
                let spec_task = counted.task.min(check.replica.task);
                Some(Dispute {
                    round: entry.round,
                    adapter: entry.adapter_before,
                    adapter_len,
                    spec_task,
                    seed: entry.secret.task_seed(spec_task),
                    counted: counted.hash,
                    counted_trainer: counted.trainer,
                    replica: check.replica.hash,
                    replica_trainer: check.replica.trainer,
                })
            })
            .collect()
    }

    /// Whether `trainer` is one of the two in the dispute.
    pub fn involves(&self, trainer: &TrainerId) -> bool {
        self.counted_trainer == *trainer || self.replica_trainer == *trainer
    }
}

/// Times a dispute is handed to a referee before it is given up (left unsettled).
pub const MAX_REFEREE_ATTEMPTS: u32 = 3;

/// What the engine makes of an upload's header ([`Engine::handle_submission_header`]).
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderDecision {
    /// Receive and check the body, then call [`Engine::handle_upload_finished`].
    Receive(UploadTicket),
    /// Refused and recorded; the driver sends the refusal and drops the body.
    Refused(Refusal),
    /// The trainer sent again the upload this round already has from it for the same task (the
    /// same signed header and bytes, accepted, being stored or being received), as after a
    /// lost acknowledgement or a reconnection. Nothing is recorded against it: the engine answers it itself (the
    /// acknowledgement again, or "try later" while the first copy is in flight) and the
    /// driver drops the body.
    Repeat,
}

#[cfg(test)]
impl HeaderDecision {
    /// The ticket or the refusal, a repeat reading as an (unrecorded) replay: tests' shorthand.
    fn ticket(self) -> Result<UploadTicket, Refusal> {
        match self {
            HeaderDecision::Receive(ticket) => Ok(ticket),
            HeaderDecision::Refused(refusal) => Err(refusal),
            HeaderDecision::Repeat => Err(Refusal::new(RejectReason::Replay, "a repeat")),
        }
    }
}

/// Permission to receive an upload's body.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadTicket {
    /// The uploader.
    pub trainer: TrainerId,
    /// The round.
    pub round: RoundId,
    /// The task.
    pub task: TaskId,
    /// The claimed hash.
    pub hash: BlobHash,
    /// Exact body length to expect.
    pub byte_len: u64,
    /// Layout the decoded delta must have.
    pub layout: Layout,
    /// Largest absolute value the delta may hold.
    pub max_abs_value: f32,
}

/// A refusal with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: RejectReason,
    /// Human-readable detail.
    pub detail: String,
}

impl Refusal {
    /// A refusal; the detail is cut to [`MAX_DETAIL_CHARS`] characters, since it may quote a
    /// peer and ends up in the ledger.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        let mut detail: String = detail.into();
        if let Some((cut, _)) = detail.char_indices().nth(MAX_DETAIL_CHARS) {
            detail.truncate(cut);
            detail.push('…');
        }
        Self { reason, detail }
    }
}

impl Refusal {
    /// True when the refusal is the coordinator's doing (too busy, storage failure), not the
    /// trainer's: its task stays open for another upload.
    pub fn is_coordinator_fault(&self) -> bool {
        self.reason.is_coordinator_fault()
    }

    /// The message telling the trainer (task 0 when the task is unknown).
    pub fn message(&self, task: TaskId, hash: Option<BlobHash>) -> ServerMessage {
        ServerMessage::SubmissionRejected {
            task,
            hash,
            reason: self.reason,
            detail: self.detail.clone(),
        }
    }
}

/// Longest refusal detail kept, in characters.
pub const MAX_DETAIL_CHARS: usize = 200;
/// How long a trainer repeating an upload still in flight is told to wait, in milliseconds:
/// long enough that a slow first copy is not chased by a copy a second.
pub const REPEAT_RETRY_MS: u32 = 30_000;
/// Refusals recorded (in the ledger and the database) per round; later ones are only counted.
pub const MAX_RECORDED_REFUSALS_PER_ROUND: usize = 256;
/// Refusals recorded per trainer per round; later ones are only counted.
pub const MAX_RECORDED_REFUSALS_PER_TRAINER: u32 = 4;

/// The engine's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for enough trainers to start the round.
    Gathering,
    /// Tasks are out; collecting deltas.
    Collecting,
    /// Aggregation requested; waiting for the driver to commit.
    Closing,
    /// All rounds done.
    Finished,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TaskStatus {
    /// Sent; no upload yet.
    Working,
    /// Its upload is being received.
    Uploading(BlobHash),
    /// Verified bytes, waiting for the store.
    Persisting(BlobHash),
    /// Counted.
    Accepted(BlobHash),
    /// Will not produce a delta.
    Failed,
}

#[derive(Clone, Debug)]
struct TaskState {
    trainer: TrainerId,
    status: TaskStatus,
    header: Option<UploadHeader>,
    /// For a replica task, the task it repeats (whose data and seed it carries).
    repeats: Option<TaskId>,
    /// For a replicated task, its replica.
    replica: Option<TaskId>,
    /// When its delta is its pair's second: the pair's counted delta, which it is kept beside
    /// (it is not counted itself).
    second: Option<BlobHash>,
    /// For a referee task, the dispute it settles.
    referee: Option<Box<Dispute>>,
    /// For a referee task, how many times its dispute has been handed out, this one included.
    referee_attempts: u32,
}

impl TaskState {
    fn new(trainer: TrainerId, repeats: Option<TaskId>) -> Self {
        Self {
            trainer,
            status: TaskStatus::Working,
            header: None,
            repeats,
            replica: None,
            second: None,
            referee: None,
            referee_attempts: 0,
        }
    }

    /// The other task of its pair, when replicated.
    fn partner(&self) -> Option<TaskId> {
        self.repeats.or(self.replica)
    }

    /// Whether it is one of the round's counted tasks (not a replica or a referee task).
    fn counts(&self) -> bool {
        self.repeats.is_none() && self.referee.is_none()
    }

    /// Whether a delta it delivers will count (not a pair's second, not a referee's).
    fn delivers_counted(&self) -> bool {
        self.second.is_none() && self.referee.is_none()
    }
}

/// A trainer's place in the current round's selection order.
type SelectionKey = ([u8; 32], TrainerId);

/// Whether a task may still produce a delta: not failed, and either its trainer is connected or
/// its upload is already under way or done.
fn is_live(status: &TaskStatus, connected: bool) -> bool {
    *status != TaskStatus::Failed && (connected || *status != TaskStatus::Working)
}

/// The round state machine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    phase: Phase,
    round: RoundId,
    adapter: BlobHash,
    adapter_len: u64,
    /// Connected trainers, each with its key in this round's selection order.
    connected: BTreeMap<TrainerId, SelectionKey>,
    /// Connected trainers in this round's selection order.
    order: BTreeSet<SelectionKey>,
    /// Connected trainers without a task this round, in selection order.
    idle: BTreeSet<SelectionKey>,
    /// The veterans among them (off probation), in selection order.
    idle_veterans: BTreeSet<SelectionKey>,
    /// Connected veterans.
    veterans_connected: usize,
    tasks: BTreeMap<TaskId, TaskState>,
    /// Each trainer's latest task this round.
    task_of: BTreeMap<TrainerId, TaskId>,
    /// Tasks that may still produce a delta (see [`is_live`]), kept as a count so that joins
    /// and leaves cost O(log n).
    live_tasks: usize,
    /// Hashes of verified deltas waiting for the store.
    persisting: BTreeSet<BlobHash>,
    accepted: BTreeMap<BlobHash, AcceptedDelta>,
    /// Second deltas of replicated tasks, by the hash of the pair's counted delta.
    replicas: BTreeMap<BlobHash, AcceptedDelta>,
    /// Replicated tasks of this round: (original, replica).
    pairs: Vec<(TaskId, TaskId)>,
    /// Referee tasks of this round.
    referee_tasks: Vec<TaskId>,
    /// Tasks of this round picked for replication that wait for an idle trainer.
    pending_replicas: VecDeque<TaskId>,
    /// Disputes waiting for a referee, with the times each was handed out.
    disputes: VecDeque<(Dispute, u32)>,
    /// Referee deltas stored this round.
    referee_results: Vec<(Dispute, AcceptedDelta)>,
    /// Loss checks settled and not yet in a committed entry, oldest first.
    loss_results: Vec<LossCheckInput>,
    /// How many of them the round being closed carries (dropped once it commits).
    loss_results_closing: usize,
    /// Flags per trainer.
    flags: BTreeMap<TrainerId, u32>,
    /// Trainers with `exclude_after` flags: no tasks, joins ignored.
    excluded: BTreeSet<TrainerId>,
    rejected: Vec<RejectedSubmission>,
    /// Refusals made while the round is closing; they belong to the next round's entry.
    rejected_next: Vec<RejectedSubmission>,
    /// Refusals counted this round per trainer (None: unknown peer), for the recording caps.
    refusal_counts: BTreeMap<Option<TrainerId>, u32>,
    known_hashes: BTreeSet<BlobHash>,
    next_task: TaskId,
    gather_started: Option<Instant>,
    round_started: Option<Instant>,
    deadline: Option<Instant>,
    evals: Evaluations,
    /// Whether trainers were told the experiment is over (after its last adapter is scored).
    finish_announced: bool,
    /// Trainers with a delta accepted in a committed round; the rest are on probation.
    veterans: BTreeSet<TrainerId>,
    /// Tasks of this round given to trainers on probation.
    probation_tasks: usize,
    actions: VecDeque<Action>,
    /// The open round's secret.
    secret: RoundSecret,
}

impl Engine {
    /// An engine for `config`, resuming from `resume` (use the default for a new experiment,
    /// with `resume.adapter` set to the initial adapter).
    pub fn new(config: EngineConfig, resume: ResumeState) -> Self {
        let (adapter, adapter_len) = resume.adapter.unwrap_or((BlobHash([0; 32]), 0));
        let mut tasks = BTreeMap::new();
        for (task, trainer) in resume.tasks {
            tasks.insert(task, TaskState::new(trainer, None));
        }
        let mut pairs = Vec::new();
        for (replica, original) in resume.repeats {
            if !tasks.contains_key(&original) {
                continue;
            }
            if let Some(state) = tasks.get_mut(&replica) {
                state.repeats = Some(original);
                pairs.push((original, replica));
            }
            if let Some(state) = tasks.get_mut(&original) {
                state.replica = Some(replica);
            }
        }
        let mut accepted = BTreeMap::new();
        for (task, mut delta) in resume.accepted {
            // The store keeps what the trainer signed; the weight is derived again here.
            delta.weight = tributary_shared::ledger::justified_weight(
                delta.claimed_samples,
                config.task_budget,
            );
            if let Some(state) = tasks.get_mut(&task) {
                state.status = TaskStatus::Accepted(delta.hash);
            }
            accepted.insert(delta.hash, delta);
        }
        let mut replicas = BTreeMap::new();
        for (task, delta) in resume.replicas {
            let counted = tasks
                .get(&task)
                .and_then(TaskState::partner)
                .and_then(|partner| tasks.get(&partner))
                .and_then(|partner| match partner.status {
                    TaskStatus::Accepted(hash) => Some(hash),
                    _ => None,
                });
            if let (Some(counted), Some(state)) = (counted, tasks.get_mut(&task)) {
                state.status = TaskStatus::Accepted(delta.hash);
                state.second = Some(counted);
                replicas.insert(counted, delta);
            }
        }
        let mut engine = Self {
            phase: if resume.finished {
                Phase::Finished
            } else {
                Phase::Gathering
            },
            round: resume.round,
            adapter,
            adapter_len,
            connected: BTreeMap::new(),
            order: BTreeSet::new(),
            idle: BTreeSet::new(),
            idle_veterans: BTreeSet::new(),
            veterans_connected: 0,
            task_of: BTreeMap::new(),
            live_tasks: 0,
            persisting: BTreeSet::new(),
            tasks,
            accepted,
            replicas,
            pairs,
            referee_tasks: Vec::new(),
            pending_replicas: VecDeque::new(),
            disputes: resume.disputes.into_iter().map(|d| (d, 0)).collect(),
            referee_results: resume.referee_results,
            loss_results: Vec::new(),
            loss_results_closing: 0,
            flags: resume.flags.into_iter().collect(),
            excluded: BTreeSet::new(),
            rejected: resume.rejected,
            rejected_next: Vec::new(),
            refusal_counts: BTreeMap::new(),
            known_hashes: resume.known_hashes.into_iter().collect(),
            next_task: resume.next_task,
            gather_started: None,
            round_started: None,
            deadline: None,
            evals: Evaluations::new(config.evaluation.as_ref().map_or(1, |eval| eval.evaluators)),
            actions: VecDeque::new(),
            finish_announced: false,
            veterans: resume.veterans.into_iter().collect(),
            probation_tasks: 0,
            secret: resume.secret,
            config,
        };
        let exclude_after = engine.config.exclude_after.max(1);
        engine.excluded = engine
            .flags
            .iter()
            .filter(|(_, flags)| **flags >= exclude_after)
            .map(|(trainer, _)| *trainer)
            .collect();
        for trainer in engine.flags.keys() {
            engine.veterans.remove(trainer);
        }
        engine.task_of = engine
            .tasks
            .iter()
            .map(|(task, state)| (state.trainer, *task))
            .collect();
        // Tasks picked for replication whose replica was not issued before the restart.
        engine.pending_replicas = engine
            .tasks
            .iter()
            .filter(|(task, state)| {
                state.repeats.is_none()
                    && state.replica.is_none()
                    && engine.secret.replicates(**task, engine.config.replicate)
            })
            .map(|(task, _)| *task)
            .collect();
        engine.probation_tasks = engine
            .tasks
            .values()
            .filter(|state| !engine.veterans.contains(&state.trainer))
            .count();
        // No trainer is connected yet: only tasks with a delta are live.
        engine.live_tasks = engine
            .tasks
            .values()
            .filter(|state| state.counts() && is_live(&state.status, false))
            .count();
        if engine.config.evaluation.is_some() {
            for target in resume.unevaluated {
                engine.evals.enqueue(target);
            }
            for (adapter, answer) in resume.eval_answers {
                engine.evals.restore_answer(adapter, answer);
            }
        }
        engine.finish_announced = engine.phase == Phase::Finished && engine.evals.is_empty();
        // A round that already has its deltas (the process died while aggregating) closes at
        // once; one with tasks out keeps collecting as soon as time starts.
        if engine.phase == Phase::Gathering && engine.accepted.len() >= engine.target() {
            engine.close_round(None);
        }
        engine
    }

    // ---- getters ----

    /// Whether `trainer` was dropped from the experiment (see [`Action::Dismiss`]).
    pub fn is_excluded(&self, trainer: &TrainerId) -> bool {
        self.excluded.contains(trainer)
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The open (or closing) round.
    pub fn round(&self) -> RoundId {
        self.round
    }

    /// The adapter the current round trains from.
    pub fn adapter(&self) -> BlobHash {
        self.adapter
    }

    /// Connected trainers.
    pub fn connected(&self) -> usize {
        self.connected.len()
    }

    /// Deltas accepted so far in the current round.
    pub fn accepted_count(&self) -> usize {
        self.accepted.len()
    }

    /// Tasks issued in the current round.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// The experiment id.
    pub fn experiment(&self) -> &ExperimentId {
        &self.config.experiment
    }

    /// What the engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Evaluations queued or in progress.
    pub fn evaluations_pending(&self) -> usize {
        self.evals.len()
    }

    // ---- outputs ----

    /// The next side effect, in order.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Engine::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let round = match self.phase {
            Phase::Gathering => self
                .gather_started
                .map(|start| start + self.config.gather_timeout),
            Phase::Collecting => self.deadline,
            Phase::Closing | Phase::Finished => None,
        };
        let evals = self
            .config
            .evaluation
            .as_ref()
            .and_then(|eval| self.evals.next_deadline(eval.timeout));
        match (round, evals) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- inputs: fleet ----

    /// A trainer completed the handshake.
    pub fn handle_trainer_joined(&mut self, now: Instant, trainer: TrainerId) {
        if self.excluded.contains(&trainer) {
            return;
        }
        self.set_connected(trainer, true);
        // A delta of this round counted while the trainer was away (its acknowledgement went
        // to a closed connection, or a standby staged it meanwhile) is acknowledged again, so
        // the trainer stops waiting for the answer.
        let counted =
            self.task_of
                .get(&trainer)
                .and_then(|task| match self.tasks.get(task)?.status {
                    TaskStatus::Accepted(hash) => Some((*task, hash)),
                    _ => None,
                });
        if let Some((task, hash)) = counted {
            self.actions.push_back(Action::Send {
                trainer,
                message: ServerMessage::SubmissionAccepted { task, hash },
            });
        }
        // Evaluations first: even after the last round, a trainer that joins may still score
        // the final adapter before it hears that the experiment is over. One still assigned to
        // it (its old connection was replaced before it was seen to leave) is sent again: the
        // trainer drops evaluation work from earlier connections.
        let assigned = self.evals.assigned_to(trainer);
        if let (Some(eval), Some((task, target, deadline))) = (&self.config.evaluation, assigned) {
            let remaining = deadline.saturating_duration_since(now);
            let message = self.eval_message(eval, task, &target, remaining);
            self.actions.push_back(Action::Send { trainer, message });
        }
        self.dispatch_evaluations_to(now, Some(trainer));
        match self.phase {
            // While adapters wait for scores, a trainer that joins is an evaluator.
            Phase::Finished if self.finish_announced => self.actions.push_back(Action::Send {
                trainer,
                message: ServerMessage::ExperimentFinished {
                    adapter: self.adapter,
                },
            }),
            Phase::Finished => {}
            Phase::Gathering => {
                self.gather_started.get_or_insert(now);
                self.try_start(now, false);
            }
            Phase::Collecting => {
                // A trainer that reconnects with its task still open gets it again, so it can
                // upload what it trained; otherwise it may fill a free slot.
                let open_task = self.task_of.get(&trainer).copied().filter(|task| {
                    self.tasks
                        .get(task)
                        .is_some_and(|state| state.status == TaskStatus::Working)
                });
                if let Some(task) = open_task {
                    let message = self.task_message(now, task);
                    self.actions.push_back(Action::Send { trainer, message });
                } else {
                    self.top_up(now);
                }
            }
            Phase::Closing => {}
        }
    }

    /// A trainer's connection ended.
    pub fn handle_trainer_left(&mut self, now: Instant, trainer: TrainerId) {
        self.set_connected(trainer, false);
        // Its working task stays valid until the deadline (it may reconnect and upload), but a
        // replacement is sent now so the round does not wait on it.
        if self.phase == Phase::Collecting {
            self.top_up(now);
            self.close_when_complete(now);
        }
        let settled = self.evals.trainer_left(trainer);
        if !settled.failed.is_empty() {
            self.apply_settled(settled);
            self.dispatch_evaluations(now);
        }
    }

    /// A trainer refused its task (a training or an evaluation task).
    pub fn handle_task_declined(&mut self, now: Instant, trainer: TrainerId, task: TaskId) {
        if self.evals.is_eval_task(task) {
            let settled = self.evals.declined(trainer, task);
            self.apply_settled(settled);
            self.dispatch_evaluations(now);
            return;
        }
        let working = self
            .tasks
            .get(&task)
            .is_some_and(|state| state.trainer == trainer && state.status == TaskStatus::Working);
        if working {
            self.set_status(task, TaskStatus::Failed);
            self.top_up(now);
            self.close_when_complete(now);
        }
    }

    // ---- inputs: submissions ----

    /// A trainer (authenticated as `connection_trainer`) announced an upload: see
    /// [`HeaderDecision`]. A refusal is already recorded; the driver only sends it.
    pub fn handle_submission_header(
        &mut self,
        now: Instant,
        connection_trainer: TrainerId,
        upload: &UploadHeader,
    ) -> HeaderDecision {
        if self.answer_repeat(connection_trainer, upload) {
            return HeaderDecision::Repeat;
        }
        match self.check_header(connection_trainer, upload) {
            Ok(ticket) => {
                if let Some(state) = self.tasks.get_mut(&ticket.task) {
                    state.header = Some(upload.clone());
                }
                self.set_status(ticket.task, TaskStatus::Uploading(ticket.hash));
                HeaderDecision::Receive(ticket)
            }
            Err(refusal) => {
                self.reject(
                    Some(connection_trainer),
                    Some(upload.header.hash),
                    refusal.clone(),
                );
                // A refused upload for the trainer's own open task ends that task, as a
                // refused body does, and a replacement goes out: otherwise a trainer could keep
                // the round (or a replicated pair) waiting until its deadline by sending only
                // refusable uploads, such as a replay of an earlier delta.
                let task = upload.header.task;
                let own_open_task = self.tasks.get(&task).is_some_and(|state| {
                    state.trainer == connection_trainer && state.status == TaskStatus::Working
                });
                if own_open_task && !refusal.is_coordinator_fault() {
                    self.set_status(task, TaskStatus::Failed);
                    self.top_up(now);
                    self.close_when_complete(now);
                }
                HeaderDecision::Refused(refusal)
            }
        }
    }

    /// Answers `upload` when it repeats what this round has from its trainer for its task (see
    /// [`HeaderDecision::Repeat`]); whether it did.
    fn answer_repeat(&mut self, connection_trainer: TrainerId, upload: &UploadHeader) -> bool {
        let header = &upload.header;
        if header.trainer != connection_trainer
            || header.round != self.round
            || header.experiment_uid != self.config.experiment_uid
            || header.coordinator != self.config.coordinator
        {
            return false;
        }
        let Some(state) = self.tasks.get(&header.task) else {
            return false;
        };
        // The very upload (its signed header too, where this engine still has it; one taken
        // over from the database has only its hash): other claims on the same bytes are a
        // second submission, not a repeat.
        if state.trainer != connection_trainer
            || state.header.as_ref().is_some_and(|sent| sent != upload)
        {
            return false;
        }
        let message = match state.status {
            TaskStatus::Accepted(hash) if hash == header.hash => {
                ServerMessage::SubmissionAccepted {
                    task: header.task,
                    hash,
                }
            }
            // The acknowledgement goes out once the store has it.
            TaskStatus::Persisting(hash) if hash == header.hash => return true,
            TaskStatus::Uploading(hash) if hash == header.hash => ServerMessage::UploadDeferred {
                task: header.task,
                hash,
                retry_after_ms: REPEAT_RETRY_MS,
            },
            _ => return false,
        };
        self.actions.push_back(Action::Send {
            trainer: connection_trainer,
            message,
        });
        true
    }

    /// The driver finished receiving an upload it had a ticket for: `Ok` when the bytes were
    /// complete, matched the hash, decoded, had the right layout and finite values, and the blob
    /// is durably stored; `Err` with the first failed check.
    pub fn handle_upload_finished(
        &mut self,
        now: Instant,
        ticket: &UploadTicket,
        result: Result<(), Refusal>,
    ) {
        let state = self
            .tasks
            .get_mut(&ticket.task)
            .filter(|state| state.status == TaskStatus::Uploading(ticket.hash));
        let Some(state) = state else {
            // Another copy of this very upload (staged by a standby) completed the task while
            // these bytes arrived: nothing to decide, whatever became of them.
            let completed_by_another_copy = ticket.round == self.round
                && self.tasks.get(&ticket.task).is_some_and(|state| {
                    state.trainer == ticket.trainer
                        && matches!(state.status,
                            TaskStatus::Persisting(hash) | TaskStatus::Accepted(hash)
                                if hash == ticket.hash)
                });
            if completed_by_another_copy {
                return;
            }
            // The round moved on while the bytes arrived: still a refusal to record and report.
            let refusal = result.err().unwrap_or_else(|| {
                Refusal::new(RejectReason::Late, "the round closed during the upload")
            });
            self.reject(Some(ticket.trainer), Some(ticket.hash), refusal.clone());
            self.send_rejection(ticket.trainer, ticket.task, Some(ticket.hash), &refusal);
            return;
        };
        let trainer = state.trainer;
        let header = state.header.clone();
        let referee_of = state.referee.clone();
        let replica_of = self.partner_delta(ticket.task);
        let kept_beside = replica_of.is_some() || referee_of.is_some();
        let may_repeat = self.may_repeat(ticket.task, &ticket.hash);
        let full = !kept_beside && self.accepted.len() + self.persisting.len() >= self.target();
        let outcome = match result {
            Err(refusal) => Err(refusal),
            Ok(()) if ticket.round != self.round || self.phase != Phase::Collecting => Err(
                Refusal::new(RejectReason::Late, "the round closed during the upload"),
            ),
            Ok(()) if full => Err(Refusal::new(
                RejectReason::Late,
                "the round already has all the deltas it needs",
            )),
            Ok(())
                if !may_repeat
                    && (self.accepted.contains_key(&ticket.hash)
                        || self.persisting.contains(&ticket.hash)) =>
            {
                Err(Refusal::new(
                    RejectReason::Replay,
                    "an identical delta was accepted during this upload",
                ))
            }
            Ok(()) => Ok(()),
        };
        match (outcome, header) {
            (Ok(()), Some(upload)) => {
                if let Some(state) = self.tasks.get_mut(&ticket.task) {
                    state.second = replica_of;
                }
                self.set_status(ticket.task, TaskStatus::Persisting(ticket.hash));
                self.actions.push_back(Action::PersistSubmission {
                    round: self.round,
                    task: ticket.task,
                    accepted: AcceptedDelta::from_upload(&upload, self.config.task_budget),
                    upload: Box::new(upload),
                    replica_of,
                    referee_of,
                });
            }
            (Ok(()), None) => {
                self.set_status(ticket.task, TaskStatus::Failed);
            }
            (Err(refusal), _) => {
                // When the fault is ours (busy, storage), the trainer keeps its task and may
                // upload again; otherwise the task is over and a replacement goes out.
                let retryable = refusal.is_coordinator_fault();
                let status = if retryable {
                    TaskStatus::Working
                } else {
                    TaskStatus::Failed
                };
                self.set_status(ticket.task, status);
                self.reject(Some(trainer), Some(ticket.hash), refusal.clone());
                self.send_rejection(trainer, ticket.task, Some(ticket.hash), &refusal);
                if !retryable && self.phase == Phase::Collecting {
                    self.top_up(now);
                }
                self.close_when_complete(now);
            }
        }
    }

    /// An upload a standby node of the cluster received and checked (signature, bytes, layout,
    /// finiteness): with `body_refusal` `None` its body is stored durably, otherwise it failed
    /// that check. Decided on as an upload received here, so acceptance, lateness, replays and
    /// the refusal's consequences (recorded, the task given up, a replacement sent) are this
    /// engine's calls; the trainer hears the outcome on its control connection. Returns the
    /// ticket when the upload goes on to be persisted.
    pub fn handle_staged_upload(
        &mut self,
        now: Instant,
        upload: &UploadHeader,
        body_refusal: Option<Refusal>,
    ) -> Option<UploadTicket> {
        let (trainer, task, hash) = (
            upload.header.trainer,
            upload.header.task,
            upload.header.hash,
        );
        // A node that took over a round with tasks out collects again at its first input, and
        // a staged upload (sent while the last leader was gone) may come before any trainer is
        // back: it would otherwise be refused as late and its honest trainer lose the task.
        if self.phase == Phase::Gathering && !self.tasks.is_empty() {
            self.try_start(now, false);
        }
        // The same upload may still be arriving here directly (the trainer sent it to both
        // nodes, or again after a timeout): the checked, stored copy completes it, so a direct
        // copy that then breaks off cannot cost the trainer its task.
        if body_refusal.is_none() {
            if let Some(ticket) = self.arriving_copy_of(upload) {
                self.handle_upload_finished(now, &ticket, Ok(()));
                let persisting = self
                    .tasks
                    .get(&task)
                    .is_some_and(|state| state.status == TaskStatus::Persisting(hash));
                return persisting.then_some(ticket);
            }
        }
        match self.handle_submission_header(now, trainer, upload) {
            HeaderDecision::Receive(ticket) => {
                let passed = body_refusal.is_none();
                self.handle_upload_finished(now, &ticket, body_refusal.map_or(Ok(()), Err));
                passed.then_some(ticket)
            }
            HeaderDecision::Refused(refusal) => {
                self.send_rejection(trainer, task, Some(hash), &refusal);
                None
            }
            HeaderDecision::Repeat => None,
        }
    }

    /// The ticket of `upload` when this very upload (the same signed header) is still arriving
    /// here for its task.
    fn arriving_copy_of(&self, upload: &UploadHeader) -> Option<UploadTicket> {
        let header = &upload.header;
        let state = self.tasks.get(&header.task)?;
        let arriving = header.round == self.round
            && state.trainer == header.trainer
            && state.status == TaskStatus::Uploading(header.hash)
            && state.header.as_ref() == Some(upload);
        arriving.then(|| self.ticket(header.trainer, header))
    }

    /// The ticket to receive the body `header` announces from `trainer` in the open round.
    fn ticket(
        &self,
        trainer: TrainerId,
        header: &tributary_shared::wire::SubmissionHeader,
    ) -> UploadTicket {
        UploadTicket {
            trainer,
            round: self.round,
            task: header.task,
            hash: header.hash,
            byte_len: header.byte_len,
            layout: self.config.layout.clone(),
            max_abs_value: self.config.max_abs_value,
        }
    }

    /// The driver could not start receiving a ticketed upload now (too many in progress): the
    /// task goes back to working and its trainer is told to send it again after `retry_after`.
    /// Back-pressure is not a refusal: nothing is recorded against the trainer.
    pub fn handle_upload_deferred(
        &mut self,
        now: Instant,
        ticket: &UploadTicket,
        retry_after: Duration,
    ) {
        let _ = now;
        let uploading = self
            .tasks
            .get(&ticket.task)
            .is_some_and(|state| state.status == TaskStatus::Uploading(ticket.hash));
        if !uploading {
            return;
        }
        self.set_status(ticket.task, TaskStatus::Working);
        self.actions.push_back(Action::Send {
            trainer: ticket.trainer,
            message: ServerMessage::UploadDeferred {
                task: ticket.task,
                hash: ticket.hash,
                retry_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
            },
        });
    }

    /// A refusal that happened outside a ticket (malformed upload header, a limit): recorded in
    /// the round's ledger entry.
    pub fn handle_protocol_violation(
        &mut self,
        trainer: Option<TrainerId>,
        hash: Option<BlobHash>,
        refusal: Refusal,
    ) {
        self.reject(trainer, hash, refusal);
    }

    /// The store has durably recorded a submission: acknowledge it and count it.
    pub fn handle_submission_persisted(
        &mut self,
        now: Instant,
        task: TaskId,
        delta: AcceptedDelta,
    ) {
        let Some(state) = self.tasks.get(&task) else {
            return;
        };
        if state.status != TaskStatus::Persisting(delta.hash) {
            return;
        }
        let trainer = state.trainer;
        // A pair's second delta was stored beside the first (see `handle_upload_finished`).
        let counted = state.second;
        let referee = state.referee.clone();
        self.set_status(task, TaskStatus::Accepted(delta.hash));
        self.known_hashes.insert(delta.hash);
        self.actions.push_back(Action::Send {
            trainer,
            message: ServerMessage::SubmissionAccepted {
                task,
                hash: delta.hash,
            },
        });
        match (counted, referee) {
            (_, Some(dispute)) => self.referee_results.push((*dispute, delta)),
            (Some(counted), None) => {
                self.replicas.insert(counted, delta);
            }
            (None, None) => {
                self.accepted.insert(delta.hash, delta);
            }
        }
        self.close_when_complete(now);
    }

    /// The store failed to record a verified submission: refuse it (the trainer may retry).
    pub fn handle_persist_failed(&mut self, now: Instant, task: TaskId, detail: String) {
        let _ = now;
        let Some(state) = self.tasks.get(&task) else {
            return;
        };
        let TaskStatus::Persisting(hash) = state.status else {
            return;
        };
        let trainer = state.trainer;
        // Our fault: the task stays open for the trainer to upload again.
        self.set_status(task, TaskStatus::Working);
        if let Some(state) = self.tasks.get_mut(&task) {
            state.second = None;
        }
        let refusal = Refusal::new(RejectReason::Internal, detail);
        self.reject(Some(trainer), Some(hash), refusal.clone());
        self.send_rejection(trainer, task, Some(hash), &refusal);
    }

    // ---- inputs: time and rounds ----

    /// Time passed; call when [`Engine::poll_timeout`] is reached.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(timeout) = self.config.evaluation.as_ref().map(|eval| eval.timeout) {
            let settled = self.evals.expire(now, timeout);
            self.apply_settled(settled);
            self.dispatch_evaluations(now);
        }
        match self.phase {
            Phase::Gathering => {
                let expired = self
                    .gather_started
                    .is_some_and(|start| now >= start + self.config.gather_timeout);
                if expired {
                    self.try_start(now, true);
                    if self.phase == Phase::Gathering {
                        self.gather_started = Some(now);
                    }
                }
            }
            Phase::Collecting => {
                let Some(deadline) = self.deadline else {
                    return;
                };
                if now < deadline {
                    return;
                }
                if self.accepted.len() >= self.config.quorum as usize {
                    self.close_round(Some(now));
                } else {
                    // No quorum: every task still working is given up on, and the round goes
                    // on with a fresh deadline and replacements.
                    let working: Vec<TaskId> = self
                        .tasks
                        .iter()
                        .filter(|(_, state)| state.status == TaskStatus::Working)
                        .map(|(task, _)| *task)
                        .collect();
                    for task in working {
                        self.set_status(task, TaskStatus::Failed);
                    }
                    self.deadline = Some(now + self.config.round_timeout);
                    self.top_up_with(now, true);
                }
            }
            Phase::Closing | Phase::Finished => {}
        }
    }

    /// The driver committed the round: the next round starts from `adapter`, with the secret
    /// whose commitment the committed entry published.
    pub fn handle_round_committed(
        &mut self,
        now: Instant,
        round: RoundId,
        adapter: BlobHash,
        adapter_len: u64,
        next_secret: RoundSecret,
    ) {
        if self.phase != Phase::Closing || round != self.round {
            return;
        }
        // After the last round no entry could record a loss check.
        let loss_checks = if round.0 + 1 >= self.config.rounds {
            Vec::new()
        } else {
            self.loss_check_targets(round)
        };
        self.secret = next_secret;
        self.adapter = adapter;
        self.adapter_len = adapter_len;
        // Work in a committed round ends a trainer's probation (a replica's too).
        self.veterans.extend(
            self.accepted
                .values()
                .chain(self.replicas.values())
                .map(|delta| delta.trainer),
        );
        self.probation_tasks = 0;
        self.accepted.clear();
        self.replicas.clear();
        self.pairs.clear();
        self.referee_tasks.clear();
        self.pending_replicas.clear();
        self.referee_results.clear();
        self.loss_results
            .drain(..self.loss_results_closing.min(self.loss_results.len()));
        self.loss_results_closing = 0;
        self.rejected = std::mem::take(&mut self.rejected_next);
        self.refusal_counts.clear();
        self.tasks.clear();
        self.task_of.clear();
        self.live_tasks = 0;
        self.persisting.clear();
        self.round = round.next();
        self.reorder_connected();
        self.round_started = None;
        self.deadline = None;
        if self.config.evaluation.is_some() {
            self.evals
                .enqueue(EvalTarget::held_out(Some(round), adapter, adapter_len));
            for target in loss_checks {
                self.evals.enqueue(target);
            }
            self.dispatch_evaluations(now);
        }
        let connected: Vec<TrainerId> = self.connected_trainers().collect();
        for trainer in &connected {
            self.actions.push_back(Action::Send {
                trainer: *trainer,
                message: ServerMessage::RoundClosed { round, adapter },
            });
        }
        if self.round.0 >= self.config.rounds {
            self.phase = Phase::Finished;
            // No later entry could record them.
            let mut abandoned_loss_checks = std::mem::take(&mut self.loss_results).len();
            let (unsettled, assignments) = self.evals.drop_loss_checks();
            abandoned_loss_checks += unsettled;
            for (task, trainer) in assignments {
                self.actions.push_back(Action::Send {
                    trainer,
                    message: ServerMessage::TaskCancelled {
                        task,
                        detail: "the experiment is over".into(),
                    },
                });
            }
            // The evaluators freed score the final adapter.
            self.dispatch_evaluations(now);
            self.actions.push_back(Action::Finished {
                adapter,
                abandoned_loss_checks,
            });
            self.announce_finish_when_scored();
        } else {
            self.phase = Phase::Gathering;
            self.gather_started = Some(now);
            self.try_start(now, false);
        }
    }

    /// The committed round's verdicts, before [`Engine::handle_round_committed`]: its
    /// disputes wait for referees, and each flagged trainer goes back on probation, checks
    /// nobody again, and at `exclude_after` flags is dropped from the fleet (no tasks, no
    /// evaluations, joins ignored).
    pub fn handle_verdicts(
        &mut self,
        now: Instant,
        disputes: Vec<Dispute>,
        flagged: Vec<TrainerId>,
    ) {
        self.disputes
            .extend(disputes.into_iter().map(|dispute| (dispute, 0)));
        for trainer in flagged {
            let flags = {
                let flags = self.flags.entry(trainer).or_default();
                *flags += 1;
                *flags
            };
            let excluded = flags >= self.config.exclude_after.max(1);
            if self.veterans.contains(&trainer) {
                // Re-registered below without veteran status.
                let connected = self.is_connected(&trainer);
                self.set_connected(trainer, false);
                self.veterans.remove(&trainer);
                if connected {
                    self.set_connected(trainer, true);
                }
            }
            if excluded && self.excluded.insert(trainer) {
                self.set_connected(trainer, false);
                self.actions.push_back(Action::Dismiss {
                    trainer,
                    detail: format!(
                        "dropped from experiment {}: referees found {} of its tasks not done as \
                         specified",
                        self.config.experiment.0, flags
                    ),
                });
                let settled = self.evals.trainer_left(trainer);
                if !settled.failed.is_empty() {
                    self.apply_settled(settled);
                    self.dispatch_evaluations(now);
                }
            }
        }
    }

    /// Closing the round found accepted deltas whose stored bytes are gone or damaged for good.
    /// They leave the round as refusals (`internal`: the trainers were not at fault), and the
    /// round closes again at once with the rest if they still make a quorum, or goes on
    /// collecting.
    pub fn handle_round_inputs_unreadable(
        &mut self,
        now: Instant,
        round: RoundId,
        unreadable: Vec<(BlobHash, String)>,
    ) {
        if self.phase != Phase::Closing || round != self.round {
            return;
        }
        // Back to collecting first, so the refusals land in this round's entry.
        self.phase = Phase::Collecting;
        for (hash, detail) in unreadable {
            // A pair loses its check when either delta is gone; the counted one also leaves.
            self.replicas
                .retain(|counted, replica| *counted != hash && replica.hash != hash);
            // A referee's delta that is gone hands its dispute back.
            let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.referee_results)
                .into_iter()
                .partition(|(_, referee)| referee.hash == hash);
            self.referee_results = kept;
            for (dispute, _) in lost {
                self.disputes.push_back((dispute, 1));
            }
            let Some(delta) = self.accepted.remove(&hash) else {
                continue;
            };
            let task = self
                .tasks
                .iter()
                .find(|(_, state)| state.status == TaskStatus::Accepted(hash))
                .map(|(task, _)| *task);
            if let Some(task) = task {
                self.set_status(task, TaskStatus::Failed);
            }
            self.actions
                .push_back(Action::ExcludeSubmission { round, hash });
            self.reject(
                Some(delta.trainer),
                Some(hash),
                Refusal::new(
                    RejectReason::Internal,
                    format!("the stored delta is unreadable and was left out: {detail}"),
                ),
            );
        }
        if self.accepted.len() >= self.config.quorum.max(1) as usize {
            self.close_round(Some(now));
        } else {
            let deadline = self.deadline.filter(|d| *d > now);
            self.deadline = Some(deadline.unwrap_or(now + self.config.round_timeout));
            self.top_up_with(now, true);
        }
    }

    // ---- inputs: evaluations ----

    /// A trainer reported the score of an evaluation task (the fields of
    /// [`tributary_shared::wire::ClientMessage::EvalResult`]).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_eval_result(
        &mut self,
        now: Instant,
        trainer: TrainerId,
        task: TaskId,
        adapter: BlobHash,
        loss: f32,
        tokens: u64,
        baseline: Option<f32>,
    ) {
        match self
            .evals
            .answer(trainer, task, adapter, loss, tokens, baseline)
        {
            Ok(answered) => {
                // A loss check's answers go to the next ledger entry, not to the scores.
                if answered.event.target.check.is_none() {
                    self.actions
                        .push_back(Action::RecordEvaluator(answered.event));
                }
                if let Some(outcome) = answered.outcome {
                    self.record_outcome(outcome);
                }
                self.dispatch_evaluations(now);
                self.announce_finish_when_scored();
            }
            Err(refusal) => {
                // An answer to an evaluation taken back a moment ago (settled, cancelled, the
                // experiment over) crossed the cancellation its trainer was sent: dropped, not
                // a fault.
                let issued = task < self.next_task
                    && !self.tasks.contains_key(&task)
                    && !self.evals.is_eval_task(task);
                if refusal.reason == RejectReason::NotSelected && issued {
                    self.actions.push_back(Action::LateAnswer { trainer });
                    return;
                }
                // Counted, not recorded: the ledger lists refused deltas, and an evaluation is
                // not one.
                self.actions.push_back(Action::RecordRejection {
                    round: self.round,
                    rejected: RejectedSubmission {
                        trainer: Some(trainer),
                        hash: Some(adapter),
                        reason: refusal.reason,
                        detail: refusal.detail.clone(),
                    },
                    recorded: false,
                });
                self.send_rejection(trainer, task, Some(adapter), &refusal);
            }
        }
    }

    // ---- helpers ----

    /// Gives queued evaluations to connected trainers: those without a training task first.
    /// Costs O(n) in connected trainers, so it runs on events that free an evaluation (a round,
    /// an answer, a departure, a timeout), not on every join.
    fn dispatch_evaluations(&mut self, now: Instant) {
        self.dispatch_evaluations_to(now, None);
    }

    /// [`Engine::dispatch_evaluations`], offering only `only` when given (a trainer that just
    /// joined: O(log n)).
    fn dispatch_evaluations_to(&mut self, now: Instant, only: Option<TrainerId>) {
        let Some(eval) = self.config.evaluation.clone() else {
            return;
        };
        if !self.evals.has_unassigned() {
            return;
        }
        let working = |trainer: &TrainerId| {
            self.task_of.get(trainer).is_some_and(|task| {
                self.tasks
                    .get(task)
                    .is_some_and(|state| state.status == TaskStatus::Working)
            })
        };
        let (training, free): (Vec<TrainerId>, Vec<TrainerId>) = match only {
            Some(trainer) => (vec![], vec![trainer]),
            None => self.order.iter().map(|(_, t)| *t).partition(working),
        };
        // Evaluators are drawn by the unrevealed round secret: no trainer can know or arrange
        // that it will be asked.
        let secret = self.secret;
        let next_task = &mut self.next_task;
        let sent = self.evals.dispatch(
            now,
            eval.timeout,
            &free,
            &training,
            |adapter, trainer| secret.evaluator_rank(adapter, trainer),
            || {
                let task = *next_task;
                *next_task = TaskId(task.0 + 1);
                task
            },
        );
        for (task, trainer, target) in sent {
            self.actions.push_back(Action::RecordEvalTask {
                task,
                trainer,
                adapter: target.key(),
            });
            let message = self.eval_message(&eval, task, &target, eval.timeout);
            self.actions.push_back(Action::Send { trainer, message });
        }
    }

    /// Records what an evaluation event settled: evaluator failures, tasks taken back, scores
    /// settled short, adapters abandoned.
    fn apply_settled(&mut self, settled: Settled) {
        let Settled {
            failed,
            cancelled,
            outcomes,
            abandoned,
        } = settled;
        for event in failed.into_iter().filter(|e| e.target.check.is_none()) {
            self.actions.push_back(Action::RecordEvaluator(event));
        }
        for (task, trainer) in cancelled {
            self.actions.push_back(Action::Send {
                trainer,
                message: ServerMessage::TaskCancelled {
                    task,
                    detail: "the evaluation was taken back (its deadline passed, or the \
                             adapter was settled)"
                        .into(),
                },
            });
        }
        for outcome in outcomes {
            self.record_outcome(outcome);
        }
        for target in abandoned {
            self.actions.push_back(Action::EvaluationAbandoned(target));
        }
        self.announce_finish_when_scored();
    }

    /// Records a settled score, or keeps a settled loss check for the next ledger entry.
    fn record_outcome(&mut self, outcome: EvalOutcome) {
        let Some(check) = &outcome.target.check else {
            self.actions.push_back(Action::RecordEvaluation(outcome));
            return;
        };
        let Some(round) = outcome.target.after_round else {
            return;
        };
        self.loss_results.push(LossCheckInput {
            round,
            delta: check.delta,
            trainer: check.trainer,
            answers: outcome
                .answers
                .iter()
                .map(|answer| LossAnswer {
                    evaluator: answer.trainer,
                    baseline: answer.baseline.unwrap_or(f32::NAN),
                    loss: answer.loss,
                    tokens: answer.tokens,
                })
                .collect(),
            wanted: outcome.wanted,
        });
    }

    /// After the last round, trainers hear that the experiment is over only once every adapter
    /// is scored: until then they are the evaluators.
    fn announce_finish_when_scored(&mut self) {
        if self.phase != Phase::Finished || self.finish_announced || !self.evals.is_empty() {
            return;
        }
        self.finish_announced = true;
        let adapter = self.adapter;
        let connected: Vec<TrainerId> = self.connected_trainers().collect();
        for trainer in connected {
            self.actions.push_back(Action::Send {
                trainer,
                message: ServerMessage::ExperimentFinished { adapter },
            });
        }
    }

    /// The message handing out evaluation `task` of `target`, due in `due`.
    fn eval_message(
        &self,
        eval: &EvalConfig,
        task: TaskId,
        target: &EvalTarget,
        due: Duration,
    ) -> ServerMessage {
        ServerMessage::Evaluate(Box::new(EvalSpec {
            task,
            experiment: self.config.experiment.clone(),
            after_round: target.after_round,
            base_model: self.config.base_model.clone(),
            base_model_hash: self.config.base_model_hash,
            adapter: target.adapter,
            adapter_len: target.adapter_len,
            data: target
                .check
                .as_ref()
                .map_or_else(|| eval.data.clone(), |check| check.data.clone()),
            plan: self.config.plan.clone(),
            max_sequences: eval.max_sequences,
            deadline_ms: due.as_millis() as u64,
            check: target.check.as_ref().map(|check| LossCheckSpec {
                delta: check.delta,
                delta_len: check.delta_len,
                seed: check.seed,
            }),
        }))
    }

    fn target(&self) -> usize {
        self.config.trainers_per_round as usize
    }

    fn connected_trainers(&self) -> impl Iterator<Item = TrainerId> + '_ {
        self.connected.keys().copied()
    }

    fn is_connected(&self, trainer: &TrainerId) -> bool {
        self.connected.contains_key(trainer)
    }

    /// The key that places `trainer` in this round's selection order: its rank under the
    /// round's secret, which no trainer knows before the round.
    fn selection_key(&self, trainer: TrainerId) -> SelectionKey {
        (self.secret.rank(&trainer), trainer)
    }

    /// Marks `trainer` connected or not, keeping the selection indexes and the live-task count
    /// in step. O(log n); repeating the current state changes nothing.
    fn set_connected(&mut self, trainer: TrainerId, connected: bool) {
        if self.is_connected(&trainer) == connected {
            return;
        }
        let open_task = self
            .task_of
            .get(&trainer)
            .and_then(|task| self.tasks.get(task))
            .map(|state| (state.status.clone(), state.counts()));
        // Replica tasks are extra and never counted as live (see the module docs).
        let was_live = open_task
            .as_ref()
            .is_some_and(|(status, counts)| *counts && is_live(status, !connected));
        let now_live = open_task
            .as_ref()
            .is_some_and(|(status, counts)| *counts && is_live(status, connected));
        let veteran = self.veterans.contains(&trainer);
        if connected {
            let key = self.selection_key(trainer);
            self.connected.insert(trainer, key);
            self.order.insert(key);
            if open_task.is_none() {
                self.idle.insert(key);
                if veteran {
                    self.idle_veterans.insert(key);
                }
            }
            if veteran {
                self.veterans_connected += 1;
            }
        } else if let Some(key) = self.connected.remove(&trainer) {
            self.order.remove(&key);
            self.idle.remove(&key);
            if veteran {
                self.idle_veterans.remove(&key);
                self.veterans_connected -= 1;
            }
        }
        match (was_live, now_live) {
            (false, true) => self.live_tasks += 1,
            (true, false) => self.live_tasks -= 1,
            _ => {}
        }
    }

    /// Sets a task's status, keeping the live-task count and the persisting set in step.
    fn set_status(&mut self, task: TaskId, status: TaskStatus) {
        let Some(state) = self.tasks.get(&task) else {
            return;
        };
        let connected = self.is_connected(&state.trainer);
        let counts = state.counts();
        let was_live = counts && is_live(&state.status, connected);
        // Only deltas that will count are in `persisting`.
        if state.delivers_counted() {
            if let TaskStatus::Persisting(hash) = state.status {
                self.persisting.remove(&hash);
            }
            if let TaskStatus::Persisting(hash) = status {
                self.persisting.insert(hash);
            }
        }
        let now_live = counts && is_live(&status, connected);
        // A referee task given up hands its dispute back, a few times.
        if status == TaskStatus::Failed && state.status != TaskStatus::Failed {
            if let Some(dispute) = &state.referee {
                if state.referee_attempts < MAX_REFEREE_ATTEMPTS {
                    self.disputes
                        .push_back(((**dispute).clone(), state.referee_attempts));
                }
            }
        }
        if let Some(state) = self.tasks.get_mut(&task) {
            state.status = status;
        }
        match (was_live, now_live) {
            (false, true) => self.live_tasks += 1,
            (true, false) => self.live_tasks -= 1,
            _ => {}
        }
    }

    /// Re-keys the connected trainers for a new round's selection order (O(n log n), once a
    /// round); every connected trainer is idle again.
    fn reorder_connected(&mut self) {
        let trainers: Vec<TrainerId> = self.connected.keys().copied().collect();
        self.order.clear();
        self.idle.clear();
        self.idle_veterans.clear();
        self.veterans_connected = 0;
        for trainer in trainers {
            let key = self.selection_key(trainer);
            self.connected.insert(trainer, key);
            self.order.insert(key);
            self.idle.insert(key);
            if self.veterans.contains(&trainer) {
                self.idle_veterans.insert(key);
                self.veterans_connected += 1;
            }
        }
    }

    fn try_start(&mut self, now: Instant, gather_expired: bool) {
        let connected = self.connected();
        let enough = connected >= self.config.min_trainers as usize
            || (gather_expired && connected >= self.config.quorum as usize);
        // A resumed round with tasks already out starts collecting again at once.
        if enough || !self.tasks.is_empty() {
            self.phase = Phase::Collecting;
            self.round_started = Some(now);
            self.deadline = Some(now + self.config.round_timeout);
            // Restored tasks go again to their trainers that are back.
            let restored: Vec<(TaskId, TrainerId)> = self
                .tasks
                .iter()
                .filter(|(_, state)| state.status == TaskStatus::Working)
                .map(|(task, state)| (*task, state.trainer))
                .filter(|(_, trainer)| self.is_connected(trainer))
                .collect();
            for (task, trainer) in restored {
                let message = self.task_message(now, task);
                self.actions.push_back(Action::Send { trainer, message });
            }
            self.top_up(now);
        }
    }

    /// Sends tasks until the round has `tasks_per_round` tasks that may still produce a delta,
    /// or no idle connected trainer is left.
    fn top_up(&mut self, now: Instant) {
        self.top_up_with(now, false);
    }

    /// [`Engine::top_up`]; with `retry_failed`, trainers whose task failed this round may get
    /// another (used when a deadline passes without a quorum, so a fixed fleet cannot stall).
    fn top_up_with(&mut self, now: Instant, retry_failed: bool) {
        if self.phase != Phase::Collecting {
            return;
        }
        self.issue_originals(now, retry_failed);
        // A dispute holds back an honest volunteer's withheld delta until it is settled, so
        // referees go before new checks when idle trainers are scarce.
        self.issue_referees(now);
        self.issue_pending_replicas(now);
    }

    /// Hands each queued dispute to an idle trainer that is neither of the two and has no flag
    /// (a veteran when one is idle), in selection order.
    fn issue_referees(&mut self, now: Instant) {
        while let Some((dispute, attempts)) = self.disputes.pop_front() {
            let eligible =
                |key: &&SelectionKey| !dispute.involves(&key.1) && !self.flags.contains_key(&key.1);
            let trainer = self
                .idle_veterans
                .iter()
                .find(eligible)
                .or_else(|| self.idle.iter().find(eligible))
                .map(|key| key.1);
            let Some(trainer) = trainer else {
                self.disputes.push_front((dispute, attempts));
                return;
            };
            let task = self.issue_task_of(now, trainer, None, Some(Box::new(dispute)));
            if let Some(state) = self.tasks.get_mut(&task) {
                state.referee_attempts = attempts + 1;
            }
        }
    }

    /// The part of [`Engine::top_up_with`] that sends counted tasks.
    fn issue_originals(&mut self, now: Instant, retry_failed: bool) {
        let wanted = (self.config.tasks_per_round as usize).saturating_sub(self.live_tasks);
        if wanted == 0 || (self.idle.is_empty() && !retry_failed) {
            return;
        }
        // Fresh trainers first, then (when retrying) those whose task failed; within each, the
        // round's selection order. Trainers on probation get at most their share of the round's
        // tasks while anyone off probation is connected (a retry after a deadline without a
        // quorum lifts the cap: a round must end).
        let cap = ((self.config.probation_share * f64::from(self.config.tasks_per_round)).ceil()
            as usize)
            .max(1);
        let capped =
            !retry_failed && self.config.probation_share < 1.0 && self.veterans_connected > 0;
        let mut probation_room = cap.saturating_sub(self.probation_tasks);
        let mut candidates: Vec<TrainerId> = Vec::with_capacity(wanted);
        // Everyone in order while there is room on probation; after that, veterans only,
        // from where that stopped: O(wanted + log n).
        let mut last = None;
        for key in &self.idle {
            if candidates.len() == wanted || (capped && probation_room == 0) {
                break;
            }
            if capped && !self.veterans.contains(&key.1) {
                probation_room -= 1;
            }
            candidates.push(key.1);
            last = Some(*key);
        }
        if capped && probation_room == 0 && candidates.len() < wanted {
            let rest = match last {
                Some(after) => self
                    .idle_veterans
                    .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
                None => self.idle_veterans.range::<SelectionKey, _>(..),
            };
            let room = wanted - candidates.len();
            candidates.extend(rest.take(room).map(|key| key.1));
        }
        if retry_failed && candidates.len() < wanted {
            let mut failed: Vec<SelectionKey> = self
                .task_of
                .iter()
                .filter(|(_, task)| {
                    self.tasks
                        .get(task)
                        .is_some_and(|state| state.status == TaskStatus::Failed)
                })
                .filter_map(|(trainer, _)| self.connected.get(trainer).copied())
                .collect();
            failed.sort();
            let room = wanted - candidates.len();
            candidates.extend(failed.into_iter().take(room).map(|(_, t)| t));
        }
        for trainer in candidates {
            let task = self.issue_task(now, trainer, None);
            if self.secret.replicates(task, self.config.replicate) {
                self.pending_replicas.push_back(task);
            }
        }
    }

    /// Gives each replicated task that has no replica yet to the next idle trainer in
    /// selection order (a veteran once the probation share is used), while its task may still
    /// produce a delta. Replicas are extra trainers beyond `tasks_per_round`.
    fn issue_pending_replicas(&mut self, now: Instant) {
        let cap = ((self.config.probation_share * f64::from(self.config.tasks_per_round)).ceil()
            as usize)
            .max(1);
        let capped = self.config.probation_share < 1.0 && self.veterans_connected > 0;
        while let Some(&original) = self.pending_replicas.front() {
            let live = self
                .tasks
                .get(&original)
                .is_some_and(|state| state.replica.is_none() && is_live(&state.status, true));
            if !live {
                self.pending_replicas.pop_front();
                continue;
            }
            let room = !capped || self.probation_tasks < cap;
            let next = if room {
                self.idle.first()
            } else {
                self.idle_veterans.first()
            };
            let Some(&(_, trainer)) = next else {
                return;
            };
            self.pending_replicas.pop_front();
            let replica = self.issue_task(now, trainer, Some(original));
            if let Some(state) = self.tasks.get_mut(&original) {
                state.replica = Some(replica);
            }
            self.pairs.push((original, replica));
        }
    }

    /// Gives `trainer` a new task of this round (a replica of `repeats`, when given).
    fn issue_task(&mut self, now: Instant, trainer: TrainerId, repeats: Option<TaskId>) -> TaskId {
        self.issue_task_of(now, trainer, repeats, None)
    }

    /// [`Engine::issue_task`], or a referee task for `referee`.
    fn issue_task_of(
        &mut self,
        now: Instant,
        trainer: TrainerId,
        repeats: Option<TaskId>,
        referee: Option<Box<Dispute>>,
    ) -> TaskId {
        if !self.veterans.contains(&trainer) {
            self.probation_tasks += 1;
        }
        let task = self.next_task;
        self.next_task = TaskId(task.0 + 1);
        let counts = repeats.is_none() && referee.is_none();
        let referee_round = referee.as_ref().map(|dispute| dispute.round);
        let mut state = TaskState::new(trainer, repeats);
        if referee.is_some() {
            self.referee_tasks.push(task);
        }
        state.referee = referee;
        self.tasks.insert(task, state);
        self.task_of.insert(trainer, task);
        if let Some(key) = self.connected.get(&trainer) {
            self.idle.remove(key);
            self.idle_veterans.remove(key);
        }
        if counts {
            self.live_tasks += 1;
        }
        self.actions.push_back(Action::RecordTask {
            round: self.round,
            task,
            trainer,
            repeats,
            referee_of: referee_round,
        });
        let message = self.task_message(now, task);
        self.actions.push_back(Action::Send { trainer, message });
        task
    }

    /// Whether an upload of `task` may carry `hash` although it is known: a pair's second may
    /// equal its first, a referee's delta either disputed one.
    fn may_repeat(&self, task: TaskId, hash: &BlobHash) -> bool {
        if self.partner_delta(task) == Some(*hash) {
            return true;
        }
        self.tasks
            .get(&task)
            .and_then(|state| state.referee.as_ref())
            .is_some_and(|dispute| dispute.counted == *hash || dispute.replica == *hash)
    }

    /// The delta of `task`'s partner when it is being stored or counted: an upload of `task`
    /// is then the pair's second delta.
    fn partner_delta(&self, task: TaskId) -> Option<BlobHash> {
        let partner = self.tasks.get(&task)?.partner()?;
        match self.tasks.get(&partner)?.status {
            TaskStatus::Persisting(hash) | TaskStatus::Accepted(hash) => Some(hash),
            _ => None,
        }
    }

    /// Whether a pair whose first delta counts still waits for its second, or a referee task
    /// is still running, from a task that may still deliver.
    fn awaiting_replicas(&self) -> bool {
        let referee_running = self.referee_tasks.iter().any(|task| {
            self.tasks.get(task).is_some_and(|state| {
                !matches!(state.status, TaskStatus::Accepted(_))
                    && is_live(&state.status, self.is_connected(&state.trainer))
            })
        });
        referee_running
            || self.pairs.iter().any(|(original, replica)| {
                let status =
                    |task: &TaskId| self.tasks.get(task).map(|state| (&state.status, state));
                match (status(original), status(replica)) {
                    (Some((TaskStatus::Accepted(_), _)), Some((other, state)))
                    | (Some((other, state)), Some((TaskStatus::Accepted(_), _))) => {
                        !matches!(other, TaskStatus::Accepted(_))
                            && is_live(other, self.is_connected(&state.trainer))
                    }
                    _ => false,
                }
            })
    }

    /// Closes the round when it has its deltas and no pair is waiting for its second.
    fn close_when_complete(&mut self, now: Instant) {
        if self.phase == Phase::Collecting
            && self.accepted.len() >= self.target()
            && !self.awaiting_replicas()
        {
            self.close_round(Some(now));
        }
    }

    fn task_message(&self, now: Instant, task: TaskId) -> ServerMessage {
        // A replica carries the data and seed of the task it repeats, and nothing else of it.
        let state = self.tasks.get(&task);
        let referee = state.and_then(|state| state.referee.as_deref());
        let spec = referee
            .map(|dispute| dispute.spec_task)
            .or_else(|| state.and_then(|state| state.repeats))
            .unwrap_or(task);
        // A referee task starts from the disputed round's adapter with that round's seed.
        let (adapter, adapter_len, seed) = match referee {
            Some(dispute) => (dispute.adapter, dispute.adapter_len, dispute.seed),
            None => (self.adapter, self.adapter_len, self.secret.task_seed(spec)),
        };
        let deadline_ms = self
            .deadline
            .map(|deadline| deadline.saturating_duration_since(now).as_millis() as u64)
            .unwrap_or(0);
        let data = self.data_assignment(spec);
        ServerMessage::Task(Box::new(TaskSpec {
            task,
            experiment: self.config.experiment.clone(),
            experiment_uid: self.config.experiment_uid,
            round: self.round,
            base_model: self.config.base_model.clone(),
            base_model_hash: self.config.base_model_hash,
            adapter,
            adapter_len,
            data,
            plan: self.config.plan.clone(),
            seed,
            deadline_ms,
            max_upload_bytes: self.config.max_upload_bytes,
        }))
    }

    /// Loss checks of the committed round's counted deltas drawn under its secret (before the
    /// engine moves on to the next round). They go out only once the round is committed, so
    /// no evaluator sees a delta while it could still submit a copy of it in the same round.
    fn loss_check_targets(&self, round: RoundId) -> Vec<EvalTarget> {
        if self.config.loss_check <= 0.0 || self.config.evaluation.is_none() {
            return Vec::new();
        }
        self.accepted
            .values()
            .filter(|delta| self.secret.loss_checks(delta.task, self.config.loss_check))
            .map(|delta| {
                let spec = self
                    .tasks
                    .get(&delta.task)
                    .and_then(|state| state.repeats)
                    .unwrap_or(delta.task);
                EvalTarget {
                    after_round: Some(round),
                    adapter: self.adapter,
                    adapter_len: self.adapter_len,
                    check: Some(LossCheckTarget {
                        delta: delta.hash,
                        delta_len: delta.byte_len,
                        trainer: delta.trainer,
                        data: self.data_assignment(spec),
                        seed: self.secret.task_seed(spec),
                    }),
                }
            })
            .collect()
    }

    /// Whether `trainer` may download `hash` as the delta of a loss check it was given, and
    /// its length. Deltas are otherwise never served.
    pub fn loss_check_download(&self, trainer: TrainerId, hash: &BlobHash) -> Option<u64> {
        self.evals.loss_check_assigned(trainer, hash)
    }

    /// The data task `spec` trains on.
    fn data_assignment(&self, spec: TaskId) -> DataAssignment {
        match self.config.data.dataset.as_str() {
            "synthetic" => DataAssignment::Synthetic {
                samples: self.config.data.samples_per_task,
            },
            "local" => DataAssignment::Local,
            dataset => {
                let clients = &self.config.data.clients;
                let per_task = self.config.data.clients_per_task.max(1) as usize;
                let start = (spec.0 as usize).wrapping_mul(per_task) % clients.len().max(1);
                DataAssignment::Clients {
                    dataset: dataset.to_owned(),
                    clients: clients
                        .iter()
                        .cycle()
                        .skip(start)
                        .take(per_task.min(clients.len()))
                        .cloned()
                        .collect(),
                }
            }
        }
    }

    fn check_header(
        &self,
        connection_trainer: TrainerId,
        upload: &UploadHeader,
    ) -> Result<UploadTicket, Refusal> {
        let header = &upload.header;
        // A trainer excluded by its referees has no connection here, but a cluster's standby
        // nodes stage uploads for it all the same.
        if self.excluded.contains(&connection_trainer) {
            return Err(Refusal::new(
                RejectReason::NotSelected,
                "this trainer was excluded from the experiment",
            ));
        }
        if header.trainer != connection_trainer {
            return Err(Refusal::new(
                RejectReason::UnknownTrainer,
                format!(
                    "submission names key {} but the connection authenticated as {}",
                    header.trainer, connection_trainer
                ),
            ));
        }
        if header.experiment != self.config.experiment
            || header.experiment_uid != self.config.experiment_uid
        {
            return Err(Refusal::new(
                RejectReason::Stale,
                format!(
                    "signed for experiment {:?} ({}), which is not running here",
                    header.experiment.0, header.experiment_uid
                ),
            ));
        }
        if header.coordinator != self.config.coordinator {
            return Err(Refusal::new(
                RejectReason::Stale,
                format!(
                    "signed for coordinator {}, not this one",
                    header.coordinator
                ),
            ));
        }
        if header.round != self.round {
            return Err(Refusal::new(
                RejectReason::Stale,
                format!(
                    "round {} is not the open round {}",
                    header.round, self.round
                ),
            ));
        }
        if self.phase != Phase::Collecting {
            return Err(Refusal::new(
                RejectReason::Late,
                format!("round {} is no longer collecting", self.round),
            ));
        }
        // The second delta of a replicated task may be byte-identical to the first.
        let seconds_its_pair = self.may_repeat(header.task, &header.hash);
        if !seconds_its_pair
            && (self.known_hashes.contains(&header.hash)
                || self.accepted.contains_key(&header.hash))
        {
            return Err(Refusal::new(
                RejectReason::Replay,
                format!("delta {} was already submitted", header.hash.short()),
            ));
        }
        let Some(task) = self.tasks.get(&header.task) else {
            return Err(Refusal::new(
                RejectReason::NotSelected,
                format!("task {} is not open in round {}", header.task, self.round),
            ));
        };
        if task.trainer != connection_trainer {
            return Err(Refusal::new(
                RejectReason::NotSelected,
                format!("task {} belongs to another trainer", header.task),
            ));
        }
        match &task.status {
            TaskStatus::Working => {}
            TaskStatus::Accepted(_) | TaskStatus::Persisting(_) | TaskStatus::Uploading(_) => {
                return Err(Refusal::new(
                    RejectReason::Replay,
                    format!("task {} already has a submission", header.task),
                ))
            }
            TaskStatus::Failed => {
                return Err(Refusal::new(
                    RejectReason::Late,
                    format!("task {} was given up on", header.task),
                ))
            }
        }
        if header.byte_len > self.config.max_upload_bytes {
            return Err(Refusal::new(
                RejectReason::TooLarge,
                format!(
                    "{} bytes exceeds the limit of {}",
                    header.byte_len, self.config.max_upload_bytes
                ),
            ));
        }
        if header.sample_count == 0 || header.sample_count > self.config.max_sample_count {
            return Err(Refusal::new(
                RejectReason::Malformed,
                format!(
                    "sample_count {} is not between 1 and {}",
                    header.sample_count, self.config.max_sample_count
                ),
            ));
        }
        if !header.metrics.train_loss.is_finite() {
            return Err(Refusal::new(
                RejectReason::Malformed,
                "train_loss must be a finite number",
            ));
        }
        Ok(self.ticket(connection_trainer, header))
    }

    fn reject(&mut self, trainer: Option<TrainerId>, hash: Option<BlobHash>, refusal: Refusal) {
        // Refusals built elsewhere (the driver) get the same cap on their detail.
        let refusal = Refusal::new(refusal.reason, refusal.detail);
        let rejected = RejectedSubmission {
            trainer,
            hash,
            reason: refusal.reason,
            detail: refusal.detail,
        };
        let count = self.refusal_counts.entry(trainer).or_default();
        *count += 1;
        let closing = self.phase == Phase::Closing;
        let list = if closing {
            &mut self.rejected_next
        } else {
            &mut self.rejected
        };
        let recorded = *count <= MAX_RECORDED_REFUSALS_PER_TRAINER
            && list.len() < MAX_RECORDED_REFUSALS_PER_ROUND;
        if recorded {
            list.push(rejected.clone());
        }
        self.actions.push_back(Action::RecordRejection {
            round: if closing {
                self.round.next()
            } else {
                self.round
            },
            rejected,
            recorded,
        });
    }

    fn send_rejection(
        &mut self,
        trainer: TrainerId,
        task: TaskId,
        hash: Option<BlobHash>,
        refusal: &Refusal,
    ) {
        self.actions.push_back(Action::Send {
            trainer,
            message: refusal.message(task, hash),
        });
    }

    fn close_round(&mut self, now: Option<Instant>) {
        self.phase = Phase::Closing;
        let duration = match (now, self.round_started) {
            (Some(now), Some(start)) => now.saturating_duration_since(start),
            _ => Duration::ZERO,
        };
        let mut cancelled = Vec::new();
        for (task, state) in &self.tasks {
            if matches!(state.status, TaskStatus::Working | TaskStatus::Uploading(_)) {
                cancelled.push((*task, state.trainer));
            }
        }
        for (task, trainer) in cancelled {
            if self.is_connected(&trainer) {
                self.actions.push_back(Action::Send {
                    trainer,
                    message: ServerMessage::TaskCancelled {
                        task,
                        detail: format!("round {} closed with enough deltas", self.round),
                    },
                });
            }
        }
        self.loss_results_closing = self.loss_results.len();
        self.actions.push_back(Action::CloseRound(RoundClose {
            round: self.round,
            adapter_before: self.adapter,
            accepted: self.accepted.values().cloned().collect(),
            replicas: self
                .replicas
                .iter()
                .filter(|(counted, _)| self.accepted.contains_key(counted))
                .map(|(counted, delta)| (*counted, delta.clone()))
                .collect(),
            referees: self.referee_results.clone(),
            flagged: self.flags.keys().copied().collect(),
            loss_checks: self.loss_results.clone(),
            rejected: self.rejected.clone(),
            duration,
            secret: self.secret,
        }));
        // Referee tasks that did not deliver are given up, which hands their disputes back.
        let unfinished: Vec<TaskId> = self
            .referee_tasks
            .iter()
            .copied()
            .filter(|task| {
                self.tasks.get(task).is_some_and(|state| {
                    matches!(state.status, TaskStatus::Working | TaskStatus::Uploading(_))
                })
            })
            .collect();
        for task in unfinished {
            self.set_status(task, TaskStatus::Failed);
        }
    }
}

#[cfg(test)]
impl Engine {
    /// Checks the incremental indexes against a recount from the tasks (tests only).
    fn assert_indexes_exact(&self) {
        let connected: BTreeSet<TrainerId> = self.connected.keys().copied().collect();
        let order: BTreeSet<TrainerId> = self.order.iter().map(|(_, t)| *t).collect();
        assert_eq!(
            connected, order,
            "order holds exactly the connected trainers"
        );
        for (trainer, key) in &self.connected {
            assert_eq!(*key, self.selection_key(*trainer), "keys are this round's");
        }
        let idle: BTreeSet<TrainerId> = connected
            .iter()
            .filter(|t| !self.task_of.contains_key(t))
            .copied()
            .collect();
        let indexed: BTreeSet<TrainerId> = self.idle.iter().map(|(_, t)| *t).collect();
        assert_eq!(indexed, idle, "idle = connected without a task this round");
        let idle_veterans: BTreeSet<TrainerId> = idle
            .iter()
            .filter(|t| self.veterans.contains(t))
            .copied()
            .collect();
        let indexed: BTreeSet<TrainerId> = self.idle_veterans.iter().map(|(_, t)| *t).collect();
        assert_eq!(indexed, idle_veterans, "idle veterans");
        assert_eq!(
            self.veterans_connected,
            connected
                .iter()
                .filter(|t| self.veterans.contains(t))
                .count(),
            "connected veterans"
        );
        let live = self
            .tasks
            .values()
            .filter(|s| s.counts() && is_live(&s.status, self.is_connected(&s.trainer)))
            .count();
        assert_eq!(self.live_tasks, live, "live-task count");
        let persisting: BTreeSet<BlobHash> = self
            .tasks
            .values()
            .filter(|s| s.delivers_counted())
            .filter_map(|s| match s.status {
                TaskStatus::Persisting(hash) => Some(hash),
                _ => None,
            })
            .collect();
        assert_eq!(self.persisting, persisting);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tributary_shared::codec::Codec;
    use tributary_shared::config::DataSection;
    use tributary_shared::identity::Identity;
    use tributary_shared::wire::{SubmissionHeader, TrainMetrics};

    /// Owns an engine and simulated trainers; applies store actions at once, on virtual time.
    struct Harness {
        engine: Engine,
        now: Instant,
        trainers: Vec<Identity>,
        inbox: BTreeMap<TrainerId, Vec<ServerMessage>>,
        rejections: Vec<RejectedSubmission>,
        closes: Vec<RoundClose>,
        finished: bool,
        evaluations: Vec<EvalOutcome>,
        evaluator_events: Vec<EvaluatorEvent>,
        /// Deltas the simulated store cannot read back when a round closes.
        unreadable: BTreeSet<BlobHash>,
        /// Submissions the engine asked to exclude.
        excluded: Vec<BlobHash>,
        /// Verdicts to hand the engine when the next round commits.
        verdicts: Option<(Vec<Dispute>, Vec<TrainerId>)>,
        /// Trainers the engine dropped.
        dismissed: Vec<TrainerId>,
        /// Evaluation answers dropped because they crossed their cancellation.
        late_answers: Vec<TrainerId>,
    }

    fn config(
        target: u32,
        tasks: u32,
        quorum: u32,
        min_trainers: u32,
        rounds: u64,
    ) -> EngineConfig {
        EngineConfig {
            experiment: ExperimentId("sim".into()),
            experiment_uid: ExperimentUid([5; 32]),
            coordinator: CertificateHash([6; 32]),
            rounds,
            seed: 42,
            trainers_per_round: target,
            tasks_per_round: tasks,
            quorum,
            min_trainers,
            round_timeout: Duration::from_secs(60),
            gather_timeout: Duration::from_secs(30),
            base_model: "synthetic".into(),
            base_model_hash: None,
            plan: TrainingPlan {
                local_steps: 1,
                learning_rate: 0.1,
                batch_size: 1,
                sequence_len: 1,
                codec: Codec::F32,
                lora_alpha: 0.0,
                lora_dropout: 0.0,
                freeze_a: false,
            },
            data: DataSection::default(),
            max_upload_bytes: 1000,
            max_sample_count: 1000,
            task_budget: 64,
            probation_share: 1.0,
            max_abs_value: 1e4,
            layout: Layout::new(vec![("w".into(), vec![4])]),
            evaluation: None,
            replicate: 0.0,
            exclude_after: 2,
            loss_check: 0.0,
        }
    }

    impl Harness {
        fn new(config: EngineConfig, n_trainers: usize) -> Self {
            Self::resumed(
                config,
                n_trainers,
                ResumeState {
                    adapter: Some((BlobHash::of(b"adapter-0"), 100)),
                    next_task: TaskId(1),
                    unevaluated: vec![EvalTarget::held_out(None, BlobHash::of(b"adapter-0"), 100)],
                    ..ResumeState::default()
                },
            )
        }

        fn resumed(config: EngineConfig, n_trainers: usize, resume: ResumeState) -> Self {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            Self {
                engine: Engine::new(config, resume),
                now: Instant::now(),
                trainers: (0..n_trainers)
                    .map(|_| Identity::generate(&mut rng))
                    .collect(),
                inbox: BTreeMap::new(),
                rejections: Vec::new(),
                closes: Vec::new(),
                finished: false,
                evaluations: Vec::new(),
                evaluator_events: Vec::new(),
                unreadable: BTreeSet::new(),
                excluded: Vec::new(),
                verdicts: None,
                dismissed: Vec::new(),
                late_answers: Vec::new(),
            }
        }

        fn id(&self, index: usize) -> TrainerId {
            self.trainers[index].id()
        }

        /// Drains actions, applying store effects at once and committing rounds.
        fn drain(&mut self) {
            while let Some(action) = self.engine.poll_action() {
                match action {
                    Action::Send { trainer, message } => {
                        self.inbox.entry(trainer).or_default().push(message)
                    }
                    Action::RecordTask { .. } => {}
                    Action::PersistSubmission { task, accepted, .. } => self
                        .engine
                        .handle_submission_persisted(self.now, task, accepted),
                    Action::RecordRejection { rejected, .. } => self.rejections.push(rejected),
                    Action::CloseRound(close) => {
                        let round = close.round;
                        let lost: Vec<(BlobHash, String)> = close
                            .accepted
                            .iter()
                            .chain(close.replicas.iter().map(|(_, replica)| replica))
                            .chain(close.referees.iter().map(|(_, referee)| referee))
                            .filter(|a| self.unreadable.contains(&a.hash))
                            .map(|a| (a.hash, "gone".to_string()))
                            .collect();
                        if !lost.is_empty() {
                            self.engine
                                .handle_round_inputs_unreadable(self.now, round, lost);
                            continue;
                        }
                        self.closes.push(close);
                        if let Some((disputes, flagged)) = self.verdicts.take() {
                            self.engine.handle_verdicts(self.now, disputes, flagged);
                        }
                        let adapter = BlobHash::of(format!("adapter-{}", round.0 + 1).as_bytes());
                        let next_secret = harness_secret(round.next());
                        self.engine.handle_round_committed(
                            self.now,
                            round,
                            adapter,
                            100,
                            next_secret,
                        );
                    }
                    Action::Finished { .. } => self.finished = true,
                    Action::RecordEvaluation(outcome) => self.evaluations.push(outcome),
                    Action::RecordEvaluator(event) => self.evaluator_events.push(event),
                    Action::RecordEvalTask { .. } => {}
                    Action::EvaluationAbandoned(_) => {}
                    Action::LateAnswer { trainer } => self.late_answers.push(trainer),
                    Action::ExcludeSubmission { hash, .. } => self.excluded.push(hash),
                    Action::Dismiss { trainer, .. } => self.dismissed.push(trainer),
                }
            }
        }

        fn join_all(&mut self) {
            for index in 0..self.trainers.len() {
                self.engine.handle_trainer_joined(self.now, self.id(index));
                self.drain();
            }
        }

        fn advance_to_timeout(&mut self) {
            let at = self.engine.poll_timeout().expect("a timer is armed");
            self.now = self.now.max(at);
            self.engine.handle_timeout(self.now);
            self.drain();
        }

        /// The trainer's newest task that was not cancelled.
        fn open_task(&self, index: usize) -> Option<TaskSpec> {
            let messages = self.inbox.get(&self.id(index))?;
            let mut open: Option<TaskSpec> = None;
            for message in messages {
                match message {
                    ServerMessage::Task(task) => open = Some((**task).clone()),
                    ServerMessage::TaskCancelled { task, .. }
                    | ServerMessage::SubmissionRejected { task, .. }
                        if open.as_ref().is_some_and(|t| t.task == *task) =>
                    {
                        open = None
                    }
                    _ => {}
                }
            }
            open.filter(|task| task.round == self.engine.round())
        }

        fn header(&self, index: usize, task: &TaskSpec, body: &[u8]) -> UploadHeader {
            self.trainers[index]
                .sign_submission(SubmissionHeader {
                    experiment: task.experiment.clone(),
                    experiment_uid: task.experiment_uid,
                    coordinator: CertificateHash([6; 32]),
                    round: task.round,
                    task: task.task,
                    trainer: self.id(index),
                    hash: BlobHash::of(body),
                    byte_len: body.len() as u64,
                    sample_count: 10,
                    metrics: TrainMetrics::default(),
                })
                .unwrap()
        }

        /// Trainer `index`'s signed upload of `body` for its open task, admitted and arriving.
        fn start_upload(&mut self, index: usize, body: &[u8]) -> (UploadHeader, UploadTicket) {
            let task = self.open_task(index).unwrap();
            let upload = self.header(index, &task, body);
            let ticket = self
                .engine
                .handle_submission_header(self.now, self.id(index), &upload)
                .ticket()
                .unwrap();
            (upload, ticket)
        }

        /// Trainer 0's signed upload of `body` for task 4 of round 0 (see
        /// [`Harness::take_over_round_0`]).
        fn task_4_upload(&self, body: &[u8]) -> UploadHeader {
            let config = &self.engine.config;
            self.trainers[0]
                .sign_submission(SubmissionHeader {
                    experiment: config.experiment.clone(),
                    experiment_uid: config.experiment_uid,
                    coordinator: config.coordinator,
                    round: RoundId(0),
                    task: TaskId(4),
                    trainer: self.id(0),
                    hash: BlobHash::of(body),
                    byte_len: body.len() as u64,
                    sample_count: 10,
                    metrics: TrainMetrics::default(),
                })
                .unwrap()
        }

        /// Replaces the engine with one that took over round 0 from the database: tasks 4
        /// (trainer 0) and 5 (trainer 1) out, `accepted` counted, no trainer connected.
        fn take_over_round_0(&mut self, accepted: Vec<(TaskId, AcceptedDelta)>) {
            let resume = ResumeState {
                round: RoundId(0),
                adapter: Some((BlobHash::of(b"adapter-0"), 100)),
                tasks: vec![(TaskId(4), self.id(0)), (TaskId(5), self.id(1))],
                accepted,
                next_task: TaskId(6),
                ..ResumeState::default()
            };
            self.engine = Engine::new(self.engine.config.clone(), resume);
        }

        /// Runs an upload whose header the engine admits but whose byte-level checks (or
        /// signature) fail in the driver with `refusal`.
        fn fail_upload(&mut self, index: usize, upload: &UploadHeader, refusal: Refusal) {
            let ticket = self
                .engine
                .handle_submission_header(self.now, self.id(index), upload)
                .ticket()
                .unwrap();
            self.engine
                .handle_upload_finished(self.now, &ticket, Err(refusal));
            self.drain();
        }

        /// Runs one trainer's whole upload with a body unique to it; returns the refusal if any.
        fn submit(&mut self, index: usize) -> Result<(), Refusal> {
            let task = self.open_task(index).expect("trainer has a task");
            let body = format!("delta {} {}", index, task.round);
            let upload = self.header(index, &task, body.as_bytes());
            let ticket = self
                .engine
                .handle_submission_header(self.now, self.id(index), &upload)
                .ticket()?;
            self.drain();
            self.engine
                .handle_upload_finished(self.now, &ticket, Ok(()));
            self.drain();
            Ok(())
        }

        /// Runs one trainer's whole upload of `body`; returns the refusal if any.
        fn submit_body(&mut self, index: usize, body: &[u8]) -> Result<(), Refusal> {
            let task = self.open_task(index).expect("trainer has a task");
            let upload = self.header(index, &task, body);
            let ticket = self
                .engine
                .handle_submission_header(self.now, self.id(index), &upload)
                .ticket()?;
            self.drain();
            self.engine
                .handle_upload_finished(self.now, &ticket, Ok(()));
            self.drain();
            match self.rejections.last() {
                Some(rejected) if rejected.hash == Some(upload.header.hash) => {
                    Err(Refusal::new(rejected.reason, rejected.detail.clone()))
                }
                _ => Ok(()),
            }
        }

        /// The round's replicated pairs as (original, replica) trainer indexes: tasks with the
        /// same seed and data, the lower task id first.
        fn pairs(&self) -> Vec<(usize, usize)> {
            let specs: Vec<(usize, TaskSpec)> = self
                .tasked()
                .into_iter()
                .map(|index| (index, self.open_task(index).unwrap()))
                .collect();
            let mut pairs = Vec::new();
            for (i, (a, first)) in specs.iter().enumerate() {
                for (b, second) in &specs[i + 1..] {
                    if first.seed == second.seed && first.data == second.data {
                        if first.task < second.task {
                            pairs.push((*a, *b));
                        } else {
                            pairs.push((*b, *a));
                        }
                    }
                }
            }
            pairs
        }

        fn tasked(&self) -> Vec<usize> {
            (0..self.trainers.len())
                .filter(|&index| self.open_task(index).is_some())
                .collect()
        }

        fn accepted_acks(&self, index: usize) -> usize {
            self.inbox.get(&self.id(index)).map_or(0, |messages| {
                messages
                    .iter()
                    .filter(|m| matches!(m, ServerMessage::SubmissionAccepted { .. }))
                    .count()
            })
        }
    }

    fn with_evaluation(config: EngineConfig) -> EngineConfig {
        with_evaluators(config, 1)
    }

    fn with_evaluators(mut config: EngineConfig, evaluators: u32) -> EngineConfig {
        config.evaluation = Some(EvalConfig {
            data: DataAssignment::Clients {
                dataset: "tiny".into(),
                clients: vec!["held-out".into()],
            },
            max_sequences: 8,
            timeout: Duration::from_secs(20),
            evaluators,
        });
        config
    }

    impl Harness {
        /// Evaluation tasks each trainer received, in order.
        fn eval_tasks(&self) -> Vec<(usize, EvalSpec)> {
            let mut out = Vec::new();
            for index in 0..self.trainers.len() {
                for message in self.inbox.get(&self.id(index)).into_iter().flatten() {
                    if let ServerMessage::Evaluate(spec) = message {
                        out.push((index, (**spec).clone()));
                    }
                }
            }
            out.sort_by_key(|(_, spec)| spec.task);
            out
        }

        fn answer_evals(&mut self, loss: f32) {
            let answered: BTreeSet<BlobHash> =
                self.evaluations.iter().map(|e| e.target.adapter).collect();
            for (index, spec) in self.eval_tasks() {
                if !answered.contains(&spec.adapter) {
                    let trainer = self.id(index);
                    self.engine.handle_eval_result(
                        self.now,
                        trainer,
                        spec.task,
                        spec.adapter,
                        loss,
                        64,
                        None,
                    );
                    self.drain();
                }
            }
        }
    }

    #[test]
    fn every_adapter_is_scored_once_including_the_initial_and_the_final_one() {
        let mut h = Harness::new(with_evaluation(config(2, 2, 2, 2, 2)), 3);
        h.join_all();
        let first = h.eval_tasks();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].1.after_round, None);
        assert_eq!(first[0].1.adapter, BlobHash::of(b"adapter-0"));
        assert_eq!(first[0].1.max_sequences, 8);
        assert_eq!(h.engine.evaluations_pending(), 1);
        h.answer_evals(4.0);
        assert_eq!(h.evaluations.len(), 1);
        assert_eq!(h.engine.evaluations_pending(), 0);
        for _ in 0..2 {
            for index in h.tasked() {
                h.submit(index).unwrap();
            }
            h.answer_evals(3.0);
        }
        assert!(h.finished);
        let rounds: Vec<Option<u64>> = h
            .evaluations
            .iter()
            .map(|e| e.target.after_round.map(|r| r.0))
            .collect();
        assert_eq!(rounds, vec![None, Some(0), Some(1)]);
        assert_eq!(h.evaluations[2].target.adapter, BlobHash::of(b"adapter-2"));
        // The final adapter's evaluation reached its trainer before the news that the
        // experiment is over, so the trainer knows to finish it first.
        let (index, last) = h.eval_tasks().pop().unwrap();
        let inbox = &h.inbox[&h.id(index)];
        let eval_at = inbox
            .iter()
            .position(|m| matches!(m, ServerMessage::Evaluate(s) if s.task == last.task))
            .unwrap();
        let finished_at = inbox
            .iter()
            .position(|m| matches!(m, ServerMessage::ExperimentFinished { .. }))
            .unwrap();
        assert!(eval_at < finished_at);
        assert_eq!(h.engine.evaluations_pending(), 0);
        assert_eq!(h.engine.poll_timeout(), None);
    }

    #[test]
    fn three_evaluators_score_each_adapter_and_trainers_hear_of_the_end_after_the_last_score() {
        let mut h = Harness::new(with_evaluators(config(2, 2, 2, 4, 1), 3), 4);
        h.join_all();
        let first = h.eval_tasks();
        assert_eq!(first.len(), 3);
        let evaluators: BTreeSet<usize> = first.iter().map(|(index, _)| *index).collect();
        assert_eq!(evaluators.len(), 3, "three different trainers");
        // One of them lies: the median is an honest answer, and the liar does not agree.
        for ((index, spec), loss) in first.iter().zip([4.0, 0.5, 4.01]) {
            let trainer = h.id(*index);
            h.engine
                .handle_eval_result(h.now, trainer, spec.task, spec.adapter, loss, 64, None);
            h.drain();
        }
        assert_eq!(h.evaluations.len(), 1);
        let scored = &h.evaluations[0];
        assert_eq!((scored.loss, scored.agreeing, scored.wanted), (4.0, 2, 3));
        assert_eq!(h.evaluator_events.len(), 3, "every answer is recorded");

        for index in h.tasked() {
            h.submit(index).unwrap();
        }
        assert!(h.finished, "the last round committed");
        let told = |h: &Harness| {
            (0..4)
                .filter(|&i| {
                    h.inbox[&h.id(i)]
                        .iter()
                        .any(|m| matches!(m, ServerMessage::ExperimentFinished { .. }))
                })
                .count()
        };
        assert_eq!(told(&h), 0, "the final adapter is not scored yet");
        h.answer_evals(3.0);
        assert_eq!(h.evaluations.len(), 2);
        assert_eq!(told(&h), 4, "now everyone hears of the end");
    }

    #[test]
    fn bad_evaluation_results_are_refused_and_kept_out_of_the_ledger() {
        let mut h = Harness::new(with_evaluation(config(2, 2, 2, 2, 1)), 2);
        h.join_all();
        let (index, spec) = h.eval_tasks().pop().unwrap();
        let other = 1 - index;
        let (who, stranger) = (h.id(index), h.id(other));
        h.engine
            .handle_eval_result(h.now, stranger, spec.task, spec.adapter, 3.0, 64, None);
        h.engine
            .handle_eval_result(h.now, who, spec.task, spec.adapter, f32::NAN, 64, None);
        h.engine
            .handle_eval_result(h.now, who, spec.task, BlobHash::of(b"x"), 3.0, 64, None);
        h.drain();
        let reasons: Vec<RejectReason> = h.rejections.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            vec![
                RejectReason::NotSelected,
                RejectReason::NonFinite,
                RejectReason::HashMismatch
            ]
        );
        assert!(h.evaluations.is_empty());
        h.engine
            .handle_eval_result(h.now, who, spec.task, spec.adapter, 3.0, 64, None);
        h.drain();
        assert_eq!(h.evaluations.len(), 1);
        for index in h.tasked() {
            h.submit(index).unwrap();
        }
        assert!(
            h.closes[0].rejected.is_empty(),
            "evaluations are not deltas"
        );
    }

    #[test]
    fn an_evaluation_moves_on_when_its_trainer_leaves_or_stalls() {
        let mut h = Harness::new(with_evaluation(config(1, 1, 1, 1, 3)), 3);
        h.join_all();
        let (first, spec) = h.eval_tasks().pop().unwrap();
        h.engine.handle_trainer_left(h.now, h.id(first));
        h.drain();
        let (second, again) = h.eval_tasks().pop().unwrap();
        assert_ne!(second, first);
        assert_eq!(again.adapter, spec.adapter);
        assert_ne!(again.task, spec.task);
        // The second one stalls past its deadline: it is told to stop, and a third trainer
        // gets the evaluation.
        h.now += Duration::from_secs(21);
        h.engine.handle_timeout(h.now);
        h.drain();
        assert!(h.inbox[&h.id(second)].iter().any(
            |m| matches!(m, ServerMessage::TaskCancelled { task, .. } if *task == again.task)
        ));
        let (third, last) = h.eval_tasks().pop().unwrap();
        assert!(third != first && third != second);
        assert_eq!(last.adapter, spec.adapter);
        // The stalled trainer's late answer no longer counts, and is counted as late.
        h.engine.handle_eval_result(
            h.now,
            h.id(second),
            again.task,
            again.adapter,
            3.0,
            64,
            None,
        );
        h.drain();
        assert_eq!(h.late_answers, [h.id(second)]);
        assert!(h.evaluations.is_empty());
        h.answer_evals(3.0);
        assert_eq!(h.evaluations.len(), 1);
        assert_eq!(h.evaluations[0].answers[0].trainer, h.id(third));
        let failures: Vec<_> = h
            .evaluator_events
            .iter()
            .map(|e| (e.trainer, e.result))
            .collect();
        assert_eq!(
            failures,
            vec![
                (h.id(first), Err(EvalFailure::Left)),
                (h.id(second), Err(EvalFailure::TimedOut)),
                (h.id(third), Ok((3.0, 64))),
            ],
            "leaving and stalling are recorded against the evaluator"
        );
    }

    #[test]
    fn a_trainer_whose_connection_was_replaced_gets_its_evaluation_again() {
        let mut h = Harness::new(with_evaluation(config(1, 1, 1, 1, 2)), 1);
        h.join_all();
        let (_, first) = h.eval_tasks().pop().unwrap();
        // A new connection of the same trainer, before the old one was seen to close.
        h.now += Duration::from_secs(5);
        h.engine.handle_trainer_joined(h.now, h.id(0));
        h.drain();
        let evals = h.eval_tasks();
        assert_eq!(evals.len(), 2);
        let again = &evals[1].1;
        assert_eq!((again.task, again.adapter), (first.task, first.adapter));
        assert_eq!(again.deadline_ms, 15_000, "the deadline runs on");
    }

    #[test]
    fn a_resumed_engine_scores_every_adapter_that_was_not_scored() {
        let targets: Vec<EvalTarget> = (0u64..3)
            .map(|r| {
                EvalTarget::held_out(
                    r.checked_sub(1).map(RoundId),
                    BlobHash::of(format!("adapter-{r}").as_bytes()),
                    100,
                )
            })
            .collect();
        let resume = ResumeState {
            round: RoundId(2),
            adapter: Some((targets[2].adapter, 100)),
            next_task: TaskId(40),
            unevaluated: targets.clone(),
            ..ResumeState::default()
        };
        let mut h = Harness::resumed(with_evaluation(config(1, 1, 1, 1, 4)), 3, resume);
        h.join_all();
        let sent: Vec<(BlobHash, TaskId)> = h
            .eval_tasks()
            .iter()
            .map(|(_, spec)| (spec.adapter, spec.task))
            .collect();
        assert_eq!(sent.len(), 3);
        for target in &targets {
            assert!(sent.iter().any(|(adapter, _)| *adapter == target.adapter));
        }
        assert!(
            sent.iter().all(|(_, task)| task.0 >= 40),
            "ids are never reused"
        );
        assert_eq!(h.engine.evaluations_pending(), 3);
    }

    #[test]
    fn thousands_of_trainers_run_every_round() {
        let mut harness = Harness::new(config(100, 120, 80, 500, 5), 2000);
        harness.join_all();
        let mut participants = BTreeSet::new();
        for round in 0..5 {
            assert_eq!(harness.engine.round(), RoundId(round));
            let tasked = harness.tasked();
            assert_eq!(tasked.len(), 120, "over-selection hands out 120 tasks");
            for &index in tasked.iter().take(100) {
                harness.submit(index).unwrap();
                participants.insert(index);
            }
        }
        assert!(harness.finished);
        assert_eq!(harness.engine.phase(), Phase::Finished);
        assert_eq!(harness.closes.len(), 5);
        for close in &harness.closes {
            assert_eq!(close.accepted.len(), 100);
            let mut sorted = close.accepted.clone();
            sorted.sort_by_key(|a| a.hash);
            assert_eq!(
                sorted, close.accepted,
                "accepted deltas come sorted by hash"
            );
        }
        // The seeded shuffle changes the selection between rounds.
        assert!(
            participants.len() > 300,
            "{} distinct participants",
            participants.len()
        );
        assert!(harness.rejections.is_empty());
    }

    #[test]
    fn a_staged_upload_is_decided_as_one_received_here() {
        let mut harness = Harness::new(config(3, 5, 2, 5, 3), 9);
        harness.join_all();
        let tasked = harness.tasked();
        let (a, b, c) = (tasked[0], tasked[1], tasked[2]);
        // Staged with its body stored: persisted, then acknowledged on the control session.
        let task_a = harness.open_task(a).unwrap();
        let upload_a = harness.header(a, &task_a, b"delta a");
        let now = harness.now;
        assert!(harness
            .engine
            .handle_staged_upload(now, &upload_a, None)
            .is_some());
        harness.drain();
        assert_eq!(harness.accepted_acks(a), 1);
        // Staged as refused (its body failed the standby's checks): recorded with that reason,
        // told to the trainer, the task given up and a replacement sent out.
        let task_b = harness.open_task(b).unwrap();
        let upload_b = harness.header(b, &task_b, b"bad");
        let refusal = Refusal::new(RejectReason::HashMismatch, "bytes hash to something else");
        assert!(harness
            .engine
            .handle_staged_upload(now, &upload_b, Some(refusal))
            .is_none());
        harness.drain();
        assert_eq!(
            harness.rejections.last().unwrap().reason,
            RejectReason::HashMismatch
        );
        assert!(harness.inbox[&harness.id(b)].iter().any(|m| matches!(
            m,
            ServerMessage::SubmissionRejected {
                reason: RejectReason::HashMismatch,
                ..
            }
        )));
        assert!(harness.open_task(b).is_none());
        assert_eq!(harness.tasked().len(), 5, "the refused task was replaced");
        // The same upload staged again (sent twice, through two nodes): a repeat, answered
        // with the acknowledgement again and recorded against nobody.
        let recorded = harness.rejections.len();
        assert!(harness
            .engine
            .handle_staged_upload(now, &upload_a, None)
            .is_none());
        harness.drain();
        assert_eq!(harness.rejections.len(), recorded);
        assert_eq!(harness.accepted_acks(a), 2);
        // Other bytes for the accepted task: a replay, refused and recorded.
        let other = harness.header(a, &task_a, b"delta a, again");
        assert!(harness
            .engine
            .handle_staged_upload(now, &other, None)
            .is_none());
        harness.drain();
        assert_eq!(
            harness.rejections.last().unwrap().reason,
            RejectReason::Replay
        );
        // Another trainer's task staged under its own key: the header checks still apply.
        let upload = harness.header(c, &task_a, b"delta c");
        assert!(harness
            .engine
            .handle_staged_upload(now, &upload, None)
            .is_none());
        harness.drain();
        assert_eq!(
            harness.rejections.last().unwrap().reason,
            RejectReason::NotSelected
        );
    }

    #[test]
    fn a_staged_copy_completes_an_upload_still_arriving_directly() {
        let mut harness = Harness::new(config(3, 5, 2, 5, 3), 9);
        harness.join_all();
        let a = harness.tasked()[0];
        let (upload, direct) = harness.start_upload(a, b"delta a");
        let now = harness.now;
        // A standby staged the same upload, checked and stored, while the direct copy is
        // still arriving: the staged copy is taken and acknowledged.
        assert!(harness
            .engine
            .handle_staged_upload(now, &upload, None)
            .is_some());
        harness.drain();
        assert_eq!(harness.accepted_acks(a), 1);
        // The direct copy then breaks off: nothing is recorded and the task stays counted.
        let truncated = Refusal::new(RejectReason::Interrupted, "the stream ended early");
        harness
            .engine
            .handle_upload_finished(now, &direct, Err(truncated));
        harness.drain();
        assert!(harness.rejections.is_empty(), "{:?}", harness.rejections);
        assert_eq!(harness.accepted_acks(a), 1);
        assert!(!harness.inbox[&harness.id(a)]
            .iter()
            .any(|m| matches!(m, ServerMessage::SubmissionRejected { .. })));

        // A staged copy that failed the standby's checks leaves a direct copy to decide.
        let b = harness.tasked()[1];
        let (upload, direct) = harness.start_upload(b, b"delta b");
        let refusal = Refusal::new(RejectReason::LengthMismatch, "the stream ended early");
        assert!(harness
            .engine
            .handle_staged_upload(now, &upload, Some(refusal))
            .is_none());
        harness.engine.handle_upload_finished(now, &direct, Ok(()));
        harness.drain();
        assert_eq!(harness.accepted_acks(b), 1);
        assert!(harness.rejections.is_empty(), "{:?}", harness.rejections);
    }

    #[test]
    fn a_repeated_upload_is_answered_not_refused() {
        let mut harness = Harness::new(config(3, 5, 2, 5, 3), 9);
        harness.join_all();
        let tasked = harness.tasked();
        let (a, b) = (tasked[0], tasked[1]);
        let task = harness.open_task(a).unwrap();
        let (upload, ticket) = harness.start_upload(a, b"delta a");
        let now = harness.now;
        // Sent again while the first copy is still arriving (a reconnection): told to wait.
        assert_eq!(
            harness
                .engine
                .handle_submission_header(now, harness.id(a), &upload),
            HeaderDecision::Repeat
        );
        harness.drain();
        assert!(harness.inbox[&harness.id(a)].iter().any(|m| matches!(
            m,
            ServerMessage::UploadDeferred { retry_after_ms, .. } if *retry_after_ms == REPEAT_RETRY_MS
        )));
        harness.engine.handle_upload_finished(now, &ticket, Ok(()));
        harness.drain();
        assert_eq!(harness.accepted_acks(a), 1);
        // Sent again once accepted (the acknowledgement was lost): acknowledged again.
        assert_eq!(
            harness
                .engine
                .handle_submission_header(now, harness.id(a), &upload),
            HeaderDecision::Repeat
        );
        harness.drain();
        assert_eq!(harness.accepted_acks(a), 2);
        assert!(harness.rejections.is_empty(), "{:?}", harness.rejections);
        // The same signed upload from another trainer's connection is no repeat.
        let refused = harness
            .engine
            .handle_submission_header(now, harness.id(b), &upload)
            .ticket()
            .unwrap_err();
        assert_eq!(refused.reason, RejectReason::UnknownTrainer);
        // The same bytes under other claims, or other bytes, for the accepted task: replays.
        let mut claims = upload.header.clone();
        claims.sample_count += 1;
        let resigned = harness.trainers[a].sign_submission(claims).unwrap();
        let refused = harness
            .engine
            .handle_submission_header(now, harness.id(a), &resigned)
            .ticket()
            .unwrap_err();
        assert_eq!(refused.reason, RejectReason::Replay);
        let other = harness.header(a, &task, b"delta a, changed");
        let refused = harness
            .engine
            .handle_submission_header(now, harness.id(a), &other)
            .ticket()
            .unwrap_err();
        assert_eq!(refused.reason, RejectReason::Replay);
    }

    #[test]
    fn a_trainer_back_from_a_disconnection_hears_its_delta_was_counted() {
        let mut harness = Harness::new(config(3, 5, 2, 5, 3), 9);
        harness.join_all();
        let tasked = harness.tasked();
        let (a, b) = (tasked[0], tasked[1]);
        harness.submit(a).unwrap();
        assert_eq!(harness.accepted_acks(a), 1);
        harness
            .engine
            .handle_trainer_left(harness.now, harness.id(a));
        harness.drain();
        harness
            .engine
            .handle_trainer_joined(harness.now, harness.id(a));
        harness.drain();
        assert_eq!(harness.accepted_acks(a), 2, "acknowledged again");
        // One whose task is still open hears nothing of the kind.
        harness
            .engine
            .handle_trainer_left(harness.now, harness.id(b));
        harness.drain();
        harness
            .engine
            .handle_trainer_joined(harness.now, harness.id(b));
        harness.drain();
        assert_eq!(harness.accepted_acks(b), 0);
    }

    #[test]
    fn every_bad_submission_is_refused_with_its_reason() {
        // Spare trainers: each refusal of a trainer's own upload ends its task, and a
        // replacement goes out.
        let mut harness = Harness::new(config(3, 5, 2, 5, 3), 9);
        harness.join_all();
        let tasked = harness.tasked();
        assert_eq!(tasked.len(), 5);
        let (a, b, c, d, e) = (tasked[0], tasked[1], tasked[2], tasked[3], tasked[4]);
        let task_a = harness.open_task(a).unwrap();
        let check =
            |harness: &mut Harness, index: usize, upload: UploadHeader, reason: RejectReason| {
                let id = harness.id(index);
                let result = harness
                    .engine
                    .handle_submission_header(harness.now, id, &upload)
                    .ticket();
                let refusal = result.expect_err("refused");
                assert_eq!(refusal.reason, reason);
                // The driver sends a header's refusal.
                harness
                    .inbox
                    .entry(id)
                    .or_default()
                    .push(refusal.message(upload.header.task, Some(upload.header.hash)));
                harness.drain();
                assert_eq!(harness.rejections.last().unwrap().reason, reason);
            };
        // Signed by a key other than the connection's.
        let upload = harness.header(a, &task_a, b"x");
        check(&mut harness, b, upload, RejectReason::UnknownTrainer);
        // Another trainer's task.
        let upload = harness.header(c, &task_a, b"x");
        check(&mut harness, c, upload, RejectReason::NotSelected);
        // A future round.
        let mut future = task_a.clone();
        future.round = RoundId(5);
        let upload = harness.header(a, &future, b"x");
        check(&mut harness, a, upload, RejectReason::Stale);
        assert_eq!(harness.tasked().len(), 5, "the refused task was replaced");
        // Too large.
        let task_d = harness.open_task(d).unwrap();
        let big = vec![0u8; 2000];
        let upload = harness.header(d, &task_d, &big);
        check(&mut harness, d, upload, RejectReason::TooLarge);
        // A failed byte-level check is recorded, sent, and the task replaced.
        let task_e = harness.open_task(e).unwrap();
        let upload = harness.header(e, &task_e, b"nan");
        harness.fail_upload(
            e,
            &upload,
            Refusal::new(RejectReason::NonFinite, "nan at 0"),
        );
        assert_eq!(
            harness.rejections.last().unwrap().reason,
            RejectReason::NonFinite
        );
        assert!(harness.inbox[&harness.id(e)].iter().any(|m| matches!(
            m,
            ServerMessage::SubmissionRejected {
                reason: RejectReason::NonFinite,
                ..
            }
        )));
        assert_eq!(harness.tasked().len(), 5, "the failed task was replaced");
        // A good upload, then the same task again: replay.
        harness.submit(b).unwrap();
        assert_eq!(harness.accepted_acks(b), 1);
        let task_b = harness.open_task(b).unwrap();
        let upload = harness.header(b, &task_b, b"other bytes");
        check(&mut harness, b, upload, RejectReason::Replay);
        // Same bytes as b's delta from another trainer: replay by hash, and that trainer's
        // task is over (a copier cannot hold the round until its deadline).
        let task_c = harness.open_task(c).unwrap();
        let body = format!("delta {} {}", b, task_b.round);
        let upload = harness.header(c, &task_c, body.as_bytes());
        check(&mut harness, c, upload, RejectReason::Replay);
        assert!(harness.open_task(c).is_none());
        // Close round 0, then a submission for it is stale.
        let remaining: Vec<usize> = harness
            .tasked()
            .into_iter()
            .filter(|&i| i != b && i != c)
            .collect();
        harness.submit(remaining[0]).unwrap();
        harness.submit(remaining[1]).unwrap();
        assert_eq!(harness.engine.round(), RoundId(1));
        let upload = harness.header(b, &task_b, b"late");
        check(&mut harness, b, upload, RejectReason::Stale);
        let reasons: Vec<RejectReason> = harness.closes[0]
            .rejected
            .iter()
            .map(|r| r.reason)
            .collect();
        assert!(
            reasons.contains(&RejectReason::NonFinite) && reasons.contains(&RejectReason::Replay)
        );
    }

    #[test]
    fn a_signature_the_driver_finds_bad_fails_the_task_and_a_deferral_keeps_it() {
        let mut harness = Harness::new(config(2, 3, 1, 3, 2), 4);
        harness.join_all();
        let tasked = harness.tasked();
        let (a, b) = (tasked[0], tasked[1]);
        // The engine's checks are the cheap ones; the driver checks the signature after the
        // ticket, off the hub, and reports a bad one like any failed byte-level check.
        let task_a = harness.open_task(a).unwrap();
        let mut upload = harness.header(a, &task_a, b"x");
        upload.header.sample_count += 1;
        harness.fail_upload(
            a,
            &upload,
            Refusal::new(RejectReason::BadSignature, "forged"),
        );
        assert_eq!(
            harness.rejections.last().unwrap().reason,
            RejectReason::BadSignature
        );
        assert!(harness.open_task(a).is_none());
        let now_tasked = harness.tasked();
        assert_eq!(now_tasked.len(), 3, "the failed task was replaced");
        assert!(now_tasked.iter().any(|i| !tasked.contains(i)));
        // A deferred upload is not a refusal: the task stays open and the same upload is
        // accepted when sent again.
        let refusals = harness.rejections.len();
        let task_b = harness.open_task(b).unwrap();
        let body = format!("delta {} {}", b, task_b.round);
        let upload = harness.header(b, &task_b, body.as_bytes());
        let ticket = harness
            .engine
            .handle_submission_header(harness.now, harness.id(b), &upload)
            .ticket()
            .unwrap();
        harness
            .engine
            .handle_upload_deferred(harness.now, &ticket, Duration::from_millis(700));
        harness.drain();
        assert_eq!(harness.rejections.len(), refusals);
        assert!(harness.inbox[&harness.id(b)].iter().any(|m| matches!(
            m,
            ServerMessage::UploadDeferred {
                retry_after_ms: 700,
                ..
            }
        )));
        harness.submit(b).unwrap();
        assert_eq!(harness.accepted_acks(b), 1);
    }

    #[test]
    fn new_identities_get_at_most_their_share_of_a_round_while_veterans_are_online() {
        let mut probation = config(4, 4, 4, 4, 3);
        probation.probation_share = 0.5;
        // Forty identities are online from the start; round 0 has no veterans, so anyone may
        // take its four tasks.
        let n = 40;
        let mut h = Harness::new(probation, n);
        h.join_all();
        let veterans = h.tasked();
        assert_eq!(veterans.len(), 4);
        for &index in &veterans {
            h.submit(index).unwrap();
        }
        assert_eq!(h.engine.round(), RoundId(1));
        // Round 1: the four who did work are off probation; the 36 others share at most half
        // of the tasks (by rank alone they would get most).
        let tasked = |h: &Harness, round: RoundId, among: &dyn Fn(usize) -> bool| -> Vec<usize> {
            (0..n)
                .filter(|&i| among(i))
                .filter(|&i| h.open_task(i).is_some_and(|t| t.round == round))
                .collect()
        };
        let round_one = tasked(&h, RoundId(1), &|_| true);
        assert_eq!(round_one.len(), 4);
        let fresh = round_one.iter().filter(|i| !veterans.contains(i)).count();
        assert_eq!(
            fresh, 2,
            "{round_one:?}: half the tasks to identities on probation"
        );
        h.engine.assert_indexes_exact();
        for index in round_one.clone() {
            h.submit(index).unwrap();
        }
        assert_eq!(h.engine.round(), RoundId(2));
        // With every veteran gone, identities on probation fill the round: it must run.
        let gone: BTreeSet<usize> = veterans.iter().chain(&round_one).copied().collect();
        for &index in &gone {
            h.engine.handle_trainer_left(h.now, h.id(index));
            h.drain();
        }
        let round_two = tasked(&h, RoundId(2), &|i| !gone.contains(&i));
        assert_eq!(round_two.len(), 4, "a round of newcomers only still runs");
        h.engine.assert_indexes_exact();
    }

    #[test]
    fn churn_keeps_the_selection_indexes_exact() {
        let seed: u64 = std::env::var("TRIBUTARY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7);
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut churned = config(6, 9, 3, 4, 20);
        churned.probation_share = 0.5;
        let mut harness = Harness::new(churned, 40);
        let mut online = [false; 40];
        for _ in 0..4000 {
            let index = rand::Rng::gen_range(&mut rng, 0..40);
            let id = harness.id(index);
            match rand::Rng::gen_range(&mut rng, 0..10) {
                0..=3 => {
                    online[index] = !online[index];
                    if online[index] {
                        harness.engine.handle_trainer_joined(harness.now, id);
                    } else {
                        harness.engine.handle_trainer_left(harness.now, id);
                    }
                }
                4 => {
                    if let Some(task) = harness.open_task(index) {
                        harness
                            .engine
                            .handle_task_declined(harness.now, id, task.task);
                    }
                }
                5 => harness.now += Duration::from_secs(7),
                6 => {
                    if harness.engine.poll_timeout().is_some() {
                        harness.advance_to_timeout();
                    }
                }
                _ => {
                    if online[index] && harness.open_task(index).is_some() {
                        let _ = harness.submit(index);
                    }
                }
            }
            harness.drain();
            harness.engine.assert_indexes_exact();
            if harness.engine.phase() == Phase::Finished {
                break;
            }
        }
        assert!(
            harness.closes.len() >= 3,
            "rounds go on under churn: {} closed",
            harness.closes.len()
        );
    }

    #[test]
    fn an_unreadable_delta_leaves_the_round_which_closes_with_the_rest() {
        let mut harness = Harness::new(config(3, 3, 2, 3, 2), 4);
        harness.join_all();
        let tasked = harness.tasked();
        let lost_task = harness.open_task(tasked[0]).unwrap();
        let lost = BlobHash::of(format!("delta {} {}", tasked[0], lost_task.round).as_bytes());
        harness.unreadable.insert(lost);
        for &index in &tasked {
            harness.submit(index).unwrap();
        }
        assert_eq!(harness.excluded, vec![lost]);
        assert_eq!(
            harness.closes.len(),
            1,
            "closed again at once with a quorum"
        );
        let close = &harness.closes[0];
        assert_eq!(close.accepted.len(), 2);
        assert!(close.accepted.iter().all(|a| a.hash != lost));
        let refusal = close
            .rejected
            .iter()
            .find(|r| r.hash == Some(lost))
            .unwrap();
        assert_eq!(refusal.reason, RejectReason::Internal);
        assert_eq!(harness.engine.round(), RoundId(1));

        // Without a quorum left, the round goes back to collecting and fills the gap.
        let mut harness = Harness::new(config(2, 2, 2, 2, 1), 3);
        harness.join_all();
        let tasked = harness.tasked();
        for &index in &tasked {
            let task = harness.open_task(index).unwrap();
            harness.unreadable.insert(BlobHash::of(
                format!("delta {} {}", index, task.round).as_bytes(),
            ));
        }
        harness.unreadable.remove(&BlobHash::of(
            format!("delta {} {}", tasked[1], RoundId(0)).as_bytes(),
        ));
        for &index in &tasked {
            harness.submit(index).unwrap();
        }
        assert!(harness.closes.is_empty());
        assert_eq!(harness.engine.phase(), Phase::Collecting);
        let spare = (0..3).find(|i| !tasked.contains(i)).unwrap();
        harness.submit(spare).unwrap();
        assert_eq!(harness.closes.len(), 1);
        assert_eq!(harness.closes[0].accepted.len(), 2);
        harness.engine.assert_indexes_exact();
    }

    #[test]
    fn a_claimed_sample_count_can_lower_the_weight_but_never_raise_it() {
        let mut harness = Harness::new(config(2, 2, 2, 2, 1), 2);
        harness.join_all();
        for (index, claim) in [(0, 1000), (1, 5)] {
            let task = harness.open_task(index).unwrap();
            let body = format!("delta {index} {}", task.round);
            let mut header = harness.header(index, &task, body.as_bytes()).header;
            header.sample_count = claim;
            let upload = harness.trainers[index].sign_submission(header).unwrap();
            let ticket = harness
                .engine
                .handle_submission_header(harness.now, harness.id(index), &upload)
                .ticket()
                .unwrap();
            harness
                .engine
                .handle_upload_finished(harness.now, &ticket, Ok(()));
            harness.drain();
        }
        let close = &harness.closes[0];
        let weight_of = |index: usize| {
            let id = harness.id(index);
            let delta = close.accepted.iter().find(|a| a.trainer == id).unwrap();
            (delta.claimed_samples, delta.weight)
        };
        assert_eq!(
            weight_of(0),
            (1000, 64),
            "capped at what the task asked for"
        );
        assert_eq!(weight_of(1), (5, 5), "a smaller claim lowers it");
    }

    /// The secret the harness draws for `round` (round 0's comes from the resume state).
    fn harness_secret(round: RoundId) -> RoundSecret {
        RoundSecret(*blake3::hash(&round.0.to_le_bytes()).as_bytes())
    }

    #[test]
    fn selection_follows_the_round_secret_which_no_trainer_sees_before_the_round() {
        let n_trainers = 40;
        let mut harness = Harness::new(config(10, 10, 10, 40, 3), n_trainers);
        harness.join_all();
        let ranked = |secret: &RoundSecret, harness: &Harness| {
            let mut ids: Vec<TrainerId> = (0..n_trainers).map(|i| harness.id(i)).collect();
            ids.sort_by_key(|id| secret.rank(id));
            ids.truncate(10);
            ids.sort();
            ids
        };
        let selected = |harness: &Harness| {
            let mut ids: Vec<TrainerId> = harness.tasked().iter().map(|&i| harness.id(i)).collect();
            ids.sort();
            ids
        };
        // Round 0 follows its secret (the default resume secret here).
        assert_eq!(selected(&harness), ranked(&RoundSecret([0; 32]), &harness));
        // Everything trainers were sent before round 1 is drawn...
        let mut seen = Vec::new();
        for index in harness.tasked() {
            harness.submit(index).unwrap();
        }
        assert_eq!(harness.engine.round(), RoundId(1));
        for messages in harness.inbox.values() {
            for message in messages {
                if !matches!(message, ServerMessage::Task(task) if task.round == RoundId(1)) {
                    seen.extend(tributary_shared::frame::to_payload(message).unwrap());
                }
            }
        }
        // ...holds no trace of round 1's secret, yet round 1's selection is its ranking.
        let secret = harness_secret(RoundId(1));
        assert!(
            !seen.windows(32).any(|w| w == secret.0),
            "the secret leaked"
        );
        assert_eq!(selected(&harness), ranked(&secret, &harness));
        // And the task seeds derive from it too.
        for index in harness.tasked() {
            let task = harness.open_task(index).unwrap();
            assert_eq!(task.seed, secret.task_seed(task.task));
        }
        // Keys alone decide nothing: other secrets select other trainers, so grinding keys
        // offline buys no slot.
        let mut selections = std::collections::BTreeSet::new();
        for n in 0..32u8 {
            selections.insert(ranked(&RoundSecret([n; 32]), &harness));
        }
        assert!(
            selections.len() >= 30,
            "{} distinct selections",
            selections.len()
        );
    }

    #[test]
    fn a_submission_signed_for_another_coordinator_or_experiment_instance_is_stale() {
        let mut harness = Harness::new(config(2, 2, 2, 2, 1), 2);
        harness.join_all();
        let task = harness.open_task(0).unwrap();
        for tamper in [0, 1] {
            let mut header = harness.header(0, &task, b"x").header;
            if tamper == 0 {
                header.coordinator = CertificateHash([9; 32]);
            } else {
                header.experiment_uid = ExperimentUid([9; 32]);
            }
            let upload = harness.trainers[0].sign_submission(header).unwrap();
            let refused = harness
                .engine
                .handle_submission_header(harness.now, harness.id(0), &upload)
                .ticket()
                .unwrap_err();
            assert_eq!(refused.reason, RejectReason::Stale, "{}", refused.detail);
        }
        assert!(harness.open_task(0).is_some(), "the task is still open");
    }

    #[test]
    fn replicated_tasks_go_unannounced_to_a_second_trainer_and_the_round_waits_for_both() {
        let mut config = config(3, 3, 3, 3, 2);
        config.replicate = 1.0;
        let mut harness = Harness::new(config, 8);
        harness.join_all();
        // Every task is replicated: six trainers, three pairs with the same seed and data.
        assert_eq!(harness.tasked().len(), 6);
        let pairs = harness.pairs();
        assert_eq!(pairs.len(), 3);
        let (a, b) = (
            harness.open_task(pairs[0].0).unwrap(),
            harness.open_task(pairs[0].1).unwrap(),
        );
        assert_ne!(a.task, b.task, "a replica has its own id");
        assert_eq!((a.adapter, &a.plan, a.round), (b.adapter, &b.plan, b.round));
        assert_ne!(
            harness.open_task(pairs[0].0).unwrap().seed,
            harness.open_task(pairs[1].0).unwrap().seed
        );
        // The three first deltas reach the target, but the round waits for the replicas.
        for &(original, _) in &pairs {
            harness.submit(original).unwrap();
        }
        assert!(harness.closes.is_empty());
        assert_eq!(harness.engine.accepted_count(), 3);
        // A byte-identical replica is not a replay; a different one is kept as well.
        let (original, replica) = pairs[0];
        let task = harness.open_task(original).unwrap();
        let same = format!("delta {} {}", original, task.round);
        harness.submit_body(replica, same.as_bytes()).unwrap();
        harness.submit(pairs[1].1).unwrap();
        assert!(harness.closes.is_empty());
        // The second delta of a pair may also come first: the last replica's partner is
        // already counted, so its delta is the kept one.
        harness.submit(pairs[2].1).unwrap();
        assert_eq!(
            harness.closes.len(),
            1,
            "closed once every pair is complete"
        );
        let close = &harness.closes[0];
        assert_eq!(close.accepted.len(), 3);
        assert_eq!(close.replicas.len(), 3);
        for (counted, replica) in &close.replicas {
            assert!(close.accepted.iter().any(|a| a.hash == *counted));
            assert!(!close.accepted.iter().any(|a| a.trainer == replica.trainer));
        }
        for index in [pairs[0].1, pairs[1].1, pairs[2].1] {
            assert_eq!(harness.accepted_acks(index), 1, "replicas are acknowledged");
        }
        assert!(harness.rejections.is_empty(), "{:?}", harness.rejections);
    }

    /// A persistent cheater holds some task most rounds; it is caught whenever that task is in
    /// a replicated pair: as an original that is replicated (probability `p`) or as a replica.
    /// A share `p / (1 + p)` of all tasks are replicas, so a task is checked with probability
    /// `q = p / (1 + p) + p / (1 + p) = 2p / (1 + p)`, and `n = ln(0.01) / ln(1 - q)` of its
    /// tasks catch it with 99 % probability (0.182 and 23 tasks at `p = 0.1`). This runs
    /// thousands of rounds on virtual time and compares.
    #[test]
    fn a_persistent_cheater_is_checked_at_the_rate_the_configuration_predicts() {
        let p = 0.1;
        let rounds = 4000;
        let mut config = config(10, 10, 10, 20, rounds);
        config.replicate = p;
        let mut harness = Harness::new(config, 20);
        harness.join_all();
        let cheater = 0;
        let (mut held, mut checked, mut since) = (0u64, 0u64, 0u64);
        let mut gaps = Vec::new();
        let (mut tasks, mut replicas) = (0usize, 0usize);
        for _ in 0..rounds {
            let tasked = harness.tasked();
            let pairs = harness.pairs();
            tasks += tasked.len();
            replicas += pairs.len();
            if tasked.contains(&cheater) {
                held += 1;
                since += 1;
                if pairs.iter().any(|&(a, b)| a == cheater || b == cheater) {
                    checked += 1;
                    gaps.push(since);
                    since = 0;
                }
            }
            let seconds: BTreeSet<usize> = pairs.iter().map(|pair| pair.1).collect();
            for &index in tasked.iter().filter(|i| !seconds.contains(i)) {
                harness.submit(index).unwrap();
            }
            for &index in &seconds {
                harness.submit(index).unwrap();
            }
            // Keep only this round's messages (the simulation would otherwise rescan them all).
            for messages in harness.inbox.values_mut() {
                if let Some(last) = messages
                    .iter()
                    .rposition(|m| matches!(m, ServerMessage::RoundClosed { .. }))
                {
                    messages.drain(..=last);
                }
            }
        }
        assert!(harness.finished);
        let predicted = 2.0 * p / (1.0 + p);
        let observed = checked as f64 / held as f64;
        let replica_share = replicas as f64 / (tasks - replicas) as f64;
        let predicted_tasks = (0.01f64.ln() / (1.0 - predicted).ln()).ceil();
        gaps.sort_unstable();
        let observed_tasks = gaps[(gaps.len() * 99) / 100];
        eprintln!(
            "replicate {p}: {replicas} replicas for {} tasks ({replica_share:.3}); the cheater \
             held {held} tasks, {checked} checked ({observed:.3}, predicted {predicted:.3}); \
             caught within {observed_tasks} of its tasks in 99 % of stretches (predicted \
             {predicted_tasks})",
            tasks - replicas
        );
        assert!(held > 1000, "{held}");
        assert!((replica_share - p).abs() < 0.01, "{replica_share}");
        assert!(
            (observed - predicted).abs() < 0.03,
            "{observed} against {predicted}"
        );
        assert!(
            (observed_tasks as f64 - predicted_tasks).abs() <= 0.35 * predicted_tasks,
            "{observed_tasks} against {predicted_tasks}"
        );
    }

    #[test]
    fn a_dispute_goes_to_a_third_trainer_with_the_disputed_task_and_the_round_waits_for_it() {
        let mut harness = Harness::new(config(2, 2, 2, 5, 3), 5);
        harness.join_all();
        let tasked = harness.tasked();
        let (a, b) = (tasked[0], tasked[1]);
        let disputed = harness.open_task(a).unwrap();
        let counted_body = format!("delta {} {}", a, disputed.round);
        let dispute = Dispute {
            round: RoundId(0),
            adapter: disputed.adapter,
            adapter_len: disputed.adapter_len,
            spec_task: disputed.task,
            seed: disputed.seed,
            counted: BlobHash::of(counted_body.as_bytes()),
            counted_trainer: harness.id(a),
            replica: BlobHash::of(b"the other one"),
            replica_trainer: harness.id(b),
        };
        harness.verdicts = Some((vec![dispute.clone()], Vec::new()));
        harness.submit(a).unwrap();
        harness.submit(b).unwrap();
        assert_eq!(harness.engine.round(), RoundId(1));
        // Round 1: two counted tasks and one referee task, to neither disputant.
        let tasked = harness.tasked();
        assert_eq!(tasked.len(), 3);
        let referee = tasked
            .iter()
            .copied()
            .find(|&i| harness.open_task(i).unwrap().adapter == dispute.adapter)
            .expect("a referee task starts from the disputed round's adapter");
        assert!(referee != a && referee != b);
        let spec = harness.open_task(referee).unwrap();
        assert_eq!((spec.seed, spec.round), (dispute.seed, RoundId(1)));
        assert_eq!(spec.data, disputed.data);
        // The counted tasks arrive; the round waits for the referee, whose delta may repeat
        // a disputed one byte for byte.
        for &index in tasked.iter().filter(|&&i| i != referee) {
            harness.submit(index).unwrap();
        }
        assert_eq!(harness.closes.len(), 1, "waits for the referee");
        harness
            .submit_body(referee, counted_body.as_bytes())
            .unwrap();
        assert_eq!(harness.closes.len(), 2);
        let close = &harness.closes[1];
        assert_eq!(close.accepted.len(), 2);
        assert_eq!(close.referees.len(), 1);
        assert_eq!(close.referees[0].0, dispute);
        assert_eq!(close.referees[0].1.trainer, harness.id(referee));
        harness.engine.assert_indexes_exact();
    }

    #[test]
    fn a_referee_delta_that_is_unreadable_hands_its_dispute_to_the_next_round() {
        let mut harness = Harness::new(config(2, 2, 2, 5, 3), 5);
        harness.join_all();
        let tasked = harness.tasked();
        let (a, b) = (tasked[0], tasked[1]);
        let dispute = Dispute {
            round: RoundId(0),
            adapter: BlobHash::of(b"adapter-0"),
            adapter_len: 100,
            spec_task: harness.open_task(a).unwrap().task,
            seed: 1,
            counted: BlobHash::of(b"c"),
            counted_trainer: harness.id(a),
            replica: BlobHash::of(b"r"),
            replica_trainer: harness.id(b),
        };
        harness.verdicts = Some((vec![dispute.clone()], Vec::new()));
        harness.submit(a).unwrap();
        harness.submit(b).unwrap();
        let referee = harness
            .tasked()
            .into_iter()
            .find(|&i| harness.open_task(i).unwrap().adapter == dispute.adapter)
            .unwrap();
        harness
            .unreadable
            .insert(BlobHash::of(b"lost referee delta"));
        for index in harness.tasked().into_iter().filter(|&i| i != referee) {
            harness.submit(index).unwrap();
        }
        harness.submit_body(referee, b"lost referee delta").unwrap();
        // Round 1 closed without the referee, and round 2 hands the dispute out again.
        assert_eq!(harness.closes.len(), 2);
        assert!(harness.closes[1].referees.is_empty());
        assert_eq!(harness.closes[1].accepted.len(), 2);
        let again = harness
            .tasked()
            .into_iter()
            .find(|&i| harness.open_task(i).unwrap().adapter == dispute.adapter);
        assert!(again.is_some(), "the dispute is handed out again");
        harness.engine.assert_indexes_exact();
    }

    #[test]
    fn a_referee_that_fails_hands_the_dispute_on_and_a_twice_flagged_trainer_is_dropped() {
        // Five trainers start a round, so the fleet goes on without the dropped one.
        let mut harness = Harness::new(config(2, 2, 2, 5, 4), 6);
        harness.join_all();
        let tasked = harness.tasked();
        let (a, b) = (tasked[0], tasked[1]);
        let dispute = Dispute {
            round: RoundId(0),
            adapter: BlobHash::of(b"adapter-0"),
            adapter_len: 100,
            spec_task: harness.open_task(a).unwrap().task,
            seed: 1,
            counted: BlobHash::of(b"c"),
            counted_trainer: harness.id(a),
            replica: BlobHash::of(b"r"),
            replica_trainer: harness.id(b),
        };
        harness.verdicts = Some((vec![dispute.clone()], vec![harness.id(a)]));
        harness.submit(a).unwrap();
        harness.submit(b).unwrap();
        let referee_of = |harness: &Harness| {
            harness
                .tasked()
                .into_iter()
                .find(|&i| harness.open_task(i).unwrap().adapter == dispute.adapter)
        };
        let first = referee_of(&harness).unwrap();
        assert_ne!(first, a, "a flagged trainer referees nobody");
        // The referee declines: another trainer gets the dispute in the same round.
        let task = harness.open_task(first).unwrap().task;
        harness
            .engine
            .handle_task_declined(harness.now, harness.id(first), task);
        harness.drain();
        let second = referee_of(&harness).expect("handed on");
        assert!(second != first && second != a && second != b);
        // A second flag drops the trainer: no task, and its joins are ignored.
        harness.verdicts = Some((Vec::new(), vec![harness.id(a)]));
        let round_1: Vec<usize> = harness
            .tasked()
            .into_iter()
            .filter(|&i| i != first)
            .collect();
        for index in round_1 {
            harness.submit(index).unwrap();
        }
        assert_eq!(harness.engine.round(), RoundId(2));
        assert_eq!(harness.dismissed, vec![harness.id(a)]);
        assert!(harness.engine.is_excluded(&harness.id(a)));
        assert!(harness.open_task(a).is_none());
        harness
            .engine
            .handle_trainer_joined(harness.now, harness.id(a));
        harness.drain();
        assert!(harness.open_task(a).is_none());
        for _ in 0..2 {
            for index in harness.tasked() {
                harness.submit(index).unwrap();
            }
            assert!(harness.open_task(a).is_none());
        }
        assert!(harness.finished);
        harness.engine.assert_indexes_exact();
    }

    #[test]
    fn a_replica_that_stalls_or_leaves_never_holds_the_round_past_its_deadline() {
        let mut config = config(2, 2, 2, 2, 3);
        config.replicate = 1.0;
        let mut harness = Harness::new(config, 4);
        harness.join_all();
        let pairs = harness.pairs();
        assert_eq!(pairs.len(), 2);
        harness.submit(pairs[0].0).unwrap();
        harness.submit(pairs[1].0).unwrap();
        assert!(harness.closes.is_empty());
        // One replica leaves: its pair no longer waits; the other stalls until the deadline.
        harness
            .engine
            .handle_trainer_left(harness.now, harness.id(pairs[0].1));
        harness.drain();
        assert!(harness.closes.is_empty());
        harness.advance_to_timeout();
        assert_eq!(harness.closes.len(), 1);
        assert!(harness.closes[0].replicas.is_empty());
        assert_eq!(harness.closes[0].accepted.len(), 2);
        harness.engine.assert_indexes_exact();
    }

    #[test]
    fn about_the_configured_share_of_tasks_is_replicated_and_replicas_are_extra() {
        let mut config = config(100, 100, 100, 100, 20);
        config.replicate = 0.1;
        let mut harness = Harness::new(config, 150);
        harness.join_all();
        let (mut tasks, mut replicas) = (0, 0);
        for _ in 0..20 {
            let tasked = harness.tasked();
            let pairs = harness.pairs();
            tasks += tasked.len();
            replicas += pairs.len();
            assert_eq!(tasked.len(), 100 + pairs.len(), "replicas come on top");
            harness.engine.assert_indexes_exact();
            let firsts: BTreeSet<usize> = pairs.iter().map(|p| p.1).collect();
            for index in tasked {
                if !firsts.contains(&index) {
                    harness.submit(index).unwrap();
                }
            }
            for &(_, replica) in &pairs {
                harness.submit(replica).unwrap();
            }
        }
        assert_eq!(harness.closes.len(), 20);
        let share = replicas as f64 / (tasks - replicas) as f64;
        assert!((0.06..0.14).contains(&share), "{share}");
        let checked: usize = harness.closes.iter().map(|c| c.replicas.len()).sum();
        assert_eq!(checked, replicas);
    }

    #[test]
    fn a_resumed_round_keeps_its_pairs() {
        let mut config = config(2, 2, 2, 2, 2);
        config.replicate = 1.0;
        let mut harness = Harness::new(config.clone(), 4);
        harness.join_all();
        let pairs = harness.pairs();
        harness.submit(pairs[0].0).unwrap();
        harness.submit(pairs[0].1).unwrap();
        let task_of = |index: usize| harness.open_task(index).map(|t| t.task);
        let replica_task = harness.inbox[&harness.id(pairs[1].1)]
            .iter()
            .find_map(|m| match m {
                ServerMessage::Task(task) => Some(task.task),
                _ => None,
            })
            .unwrap();
        let original_task = task_of(pairs[1].0).unwrap();
        let spec = harness.open_task(pairs[1].1).unwrap();
        let first = harness.closes.is_empty();
        assert!(first);
        // What the store would hand back after a crash.
        let engine = &harness.engine;
        let resume = ResumeState {
            round: engine.round(),
            adapter: Some((engine.adapter(), 100)),
            tasks: engine
                .tasks
                .iter()
                .map(|(task, state)| (*task, state.trainer))
                .collect(),
            repeats: engine
                .tasks
                .iter()
                .filter_map(|(task, state)| state.repeats.map(|of| (*task, of)))
                .collect(),
            accepted: engine
                .tasks
                .iter()
                .filter_map(|(task, state)| match state.status {
                    TaskStatus::Accepted(hash) => {
                        engine.accepted.get(&hash).map(|d| (*task, d.clone()))
                    }
                    _ => None,
                })
                .collect(),
            replicas: engine
                .tasks
                .iter()
                .filter_map(|(task, state)| match state.status {
                    TaskStatus::Accepted(hash) if !engine.accepted.contains_key(&hash) => engine
                        .replicas
                        .values()
                        .find(|d| d.hash == hash)
                        .map(|d| (*task, d.clone())),
                    _ => None,
                })
                .collect(),
            next_task: engine.next_task,
            secret: engine.secret,
            ..ResumeState::default()
        };
        assert_eq!(resume.replicas.len(), 1);
        let mut resumed = Harness::resumed(config, 4, resume);
        resumed.trainers = harness.trainers.clone();
        resumed.join_all();
        // The replica task comes back with the original's seed and data.
        let again = resumed.open_task(pairs[1].1).unwrap();
        assert_eq!(again.task, replica_task);
        assert_eq!((again.seed, &again.data), (spec.seed, &spec.data));
        assert_eq!(resumed.open_task(pairs[1].0).unwrap().task, original_task);
        resumed.submit(pairs[1].0).unwrap();
        resumed.submit(pairs[1].1).unwrap();
        assert_eq!(resumed.closes.len(), 1);
        assert_eq!(resumed.closes[0].replicas.len(), 2);
        resumed.engine.assert_indexes_exact();
    }

    #[test]
    fn upload_finishing_after_close_is_late() {
        let mut harness = Harness::new(config(2, 3, 1, 3, 2), 3);
        harness.join_all();
        let tasked = harness.tasked();
        let slow = tasked[2];
        let task = harness.open_task(slow).unwrap();
        let upload = harness.header(slow, &task, b"slow");
        let ticket = harness
            .engine
            .handle_submission_header(harness.now, harness.id(slow), &upload)
            .ticket()
            .unwrap();
        harness.submit(tasked[0]).unwrap();
        harness.submit(tasked[1]).unwrap();
        assert_eq!(harness.closes.len(), 1);
        harness
            .engine
            .handle_upload_finished(harness.now, &ticket, Ok(()));
        harness.drain();
        assert_eq!(
            harness.rejections.last().unwrap().reason,
            RejectReason::Late
        );
    }

    #[test]
    fn verified_uploads_beyond_the_target_are_late_not_acknowledged() {
        let mut harness = Harness::new(config(1, 2, 1, 2, 1), 2);
        harness.join_all();
        let tasked = harness.tasked();
        let mut tickets = Vec::new();
        for &index in &tasked {
            let task = harness.open_task(index).unwrap();
            let upload = harness.header(index, &task, format!("d{index}").as_bytes());
            let id = harness.id(index);
            tickets.push(
                harness
                    .engine
                    .handle_submission_header(harness.now, id, &upload)
                    .ticket()
                    .unwrap(),
            );
        }
        // Both finish before the store answers: only one may be persisted and acknowledged.
        for ticket in &tickets {
            harness
                .engine
                .handle_upload_finished(harness.now, ticket, Ok(()));
        }
        harness.drain();
        assert_eq!(harness.closes[0].accepted.len(), 1);
        let acks: usize = tasked.iter().map(|&i| harness.accepted_acks(i)).sum();
        assert_eq!(acks, 1);
        assert_eq!(
            harness.rejections.last().unwrap().reason,
            RejectReason::Late
        );
    }

    #[test]
    fn a_flood_of_refusals_is_counted_but_recorded_only_up_to_the_caps() {
        let mut harness = Harness::new(config(2, 2, 1, 2, 1), 2);
        harness.join_all();
        let index = harness.tasked()[0];
        let task = harness.open_task(index).unwrap();
        let mut counted = 0;
        let mut recorded_count = 0;
        for attempt in 0..1000u32 {
            let mut future = task.clone();
            future.round = RoundId(9);
            let upload = harness.header(index, &future, &attempt.to_le_bytes());
            let id = harness.id(index);
            assert!(harness
                .engine
                .handle_submission_header(harness.now, id, &upload)
                .ticket()
                .is_err());
            while let Some(action) = harness.engine.poll_action() {
                if let Action::RecordRejection { recorded, .. } = action {
                    counted += 1;
                    recorded_count += usize::from(recorded);
                }
            }
        }
        assert_eq!(counted, 1000, "every refusal is counted");
        assert_eq!(
            recorded_count, MAX_RECORDED_REFUSALS_PER_TRAINER as usize,
            "only the first few are recorded"
        );
    }

    #[test]
    fn oversized_weights_and_non_finite_losses_are_refused() {
        let mut harness = Harness::new(config(2, 2, 1, 2, 1), 2);
        harness.join_all();
        let index = harness.tasked()[0];
        let task = harness.open_task(index).unwrap();
        let id = harness.id(index);
        let mut header = harness.header(index, &task, b"x").header;
        header.sample_count = 1001;
        let upload = harness.trainers[index]
            .sign_submission(header.clone())
            .unwrap();
        let refusal = harness
            .engine
            .handle_submission_header(harness.now, id, &upload)
            .ticket()
            .unwrap_err();
        assert_eq!(refusal.reason, RejectReason::Malformed);
        // That ended the task; the other trainer's upload claims a NaN loss.
        let index = harness.tasked()[1];
        let task = harness.open_task(index).unwrap();
        let id = harness.id(index);
        let mut header = harness.header(index, &task, b"y").header;
        header.metrics.train_loss = f32::NAN;
        let upload = harness.trainers[index].sign_submission(header).unwrap();
        let refusal = harness
            .engine
            .handle_submission_header(harness.now, id, &upload)
            .ticket()
            .unwrap_err();
        assert_eq!(refusal.reason, RejectReason::Malformed);
    }

    #[test]
    fn a_fixed_fleet_that_missed_the_deadline_is_tasked_again() {
        let mut harness = Harness::new(config(3, 3, 2, 3, 1), 3);
        harness.join_all();
        let first: Vec<TaskId> = (0..3).map(|i| harness.open_task(i).unwrap().task).collect();
        // Nobody made it in time: with no idle trainer left, the same three are re-tasked.
        harness.advance_to_timeout();
        for index in 0..3 {
            let task = harness.open_task(index).expect("re-tasked");
            assert!(
                !first.contains(&task.task),
                "a fresh task for trainer {index}"
            );
        }
        harness.submit(0).unwrap();
        harness.submit(1).unwrap();
        harness.advance_to_timeout();
        assert_eq!(harness.closes.len(), 1, "the round closed on its quorum");
    }

    #[test]
    fn a_refusal_that_is_our_fault_leaves_the_task_open() {
        let mut harness = Harness::new(config(2, 2, 1, 2, 1), 2);
        harness.join_all();
        let index = harness.tasked()[0];
        let task = harness.open_task(index).unwrap();
        let upload = harness.header(index, &task, b"busy");
        let id = harness.id(index);
        let ticket = harness
            .engine
            .handle_submission_header(harness.now, id, &upload)
            .ticket()
            .unwrap();
        harness.engine.handle_upload_finished(
            harness.now,
            &ticket,
            Err(Refusal::new(RejectReason::RateLimited, "busy")),
        );
        harness.drain();
        // The same task may upload again, and it counts.
        let ticket = harness
            .engine
            .handle_submission_header(harness.now, id, &upload)
            .ticket()
            .unwrap();
        harness
            .engine
            .handle_upload_finished(harness.now, &ticket, Ok(()));
        harness.drain();
        assert_eq!(harness.accepted_acks(index), 1);
    }

    #[test]
    fn deadline_closes_on_quorum_or_extends_and_replaces() {
        let mut harness = Harness::new(config(4, 4, 2, 4, 1), 6);
        harness.join_all();
        let first = harness.tasked();
        assert_eq!(first.len(), 4);
        harness.submit(first[0]).unwrap();
        // Deadline with 1 of quorum 2: the round goes on with replacements to idle trainers.
        let deadline = harness.engine.poll_timeout().unwrap();
        harness.advance_to_timeout();
        assert_eq!(harness.closes.len(), 0);
        assert!(harness.engine.poll_timeout().unwrap() > deadline);
        let second = harness.tasked();
        let newcomers: Vec<usize> = second
            .iter()
            .copied()
            .filter(|i| !first.contains(i))
            .collect();
        assert_eq!(
            newcomers.len(),
            2,
            "the two idle trainers got tasks: {second:?}"
        );
        harness.submit(newcomers[0]).unwrap();
        harness.advance_to_timeout();
        assert_eq!(harness.closes.len(), 1);
        assert_eq!(harness.closes[0].accepted.len(), 2);
        assert!(harness.finished);
    }

    #[test]
    fn gathering_waits_for_min_trainers_then_quorum_after_timeout() {
        let mut harness = Harness::new(config(3, 3, 2, 5, 1), 2);
        harness.join_all();
        assert_eq!(harness.engine.phase(), Phase::Gathering);
        assert!(harness.tasked().is_empty());
        harness.advance_to_timeout();
        assert_eq!(harness.engine.phase(), Phase::Collecting);
        assert_eq!(harness.tasked().len(), 2);
    }

    #[test]
    fn a_departed_trainer_is_replaced_and_may_come_back_to_upload() {
        let mut harness = Harness::new(config(2, 2, 2, 2, 1), 3);
        harness.join_all();
        let tasked = harness.tasked();
        let idle = (0..3).find(|i| !tasked.contains(i)).unwrap();
        let gone = tasked[0];
        harness
            .engine
            .handle_trainer_left(harness.now, harness.id(gone));
        harness.drain();
        assert!(
            harness.open_task(idle).is_some(),
            "the idle trainer replaced the departed one"
        );
        // It comes back: it is sent its open task again and its upload counts.
        let before = harness.inbox[&harness.id(gone)].len();
        harness
            .engine
            .handle_trainer_joined(harness.now, harness.id(gone));
        harness.drain();
        assert!(matches!(
            harness.inbox[&harness.id(gone)][before],
            ServerMessage::Task(_)
        ));
        harness.submit(gone).unwrap();
        harness.submit(idle).unwrap();
        assert_eq!(harness.closes.len(), 1);
    }

    #[test]
    fn resumed_round_with_all_deltas_closes_at_once() {
        let delta = |n: u8| AcceptedDelta {
            hash: BlobHash([n; 32]),
            trainer: TrainerId([n; 32]),
            weight: 1,
            claimed_samples: 1,
            reported_train_loss: 0.5,
            byte_len: 10,
            task: TaskId(u64::from(n) + 6),
            reported_steps: 1,
            reported_tokens: 0,
            reported_train_ms: 0,
            signature: Vec::new(),
        };
        let resume = ResumeState {
            round: RoundId(3),
            adapter: Some((BlobHash::of(b"a3"), 10)),
            tasks: vec![
                (TaskId(7), TrainerId([1; 32])),
                (TaskId(8), TrainerId([2; 32])),
            ],
            accepted: vec![(TaskId(7), delta(1)), (TaskId(8), delta(2))],
            next_task: TaskId(9),
            ..ResumeState::default()
        };
        let mut harness = Harness::resumed(config(2, 2, 1, 2, 5), 0, resume);
        harness.drain();
        assert_eq!(harness.closes.len(), 1);
        assert_eq!(harness.closes[0].round, RoundId(3));
        assert_eq!(harness.closes[0].accepted.len(), 2);
        assert_eq!(harness.engine.round(), RoundId(4));
    }

    #[test]
    fn a_resumed_round_takes_a_staged_upload_before_any_trainer_is_back() {
        // A standby staged the delta while no node led; the node that took over reads it
        // before any trainer has reconnected.
        let mut harness = Harness::new(config(2, 2, 2, 2, 1), 3);
        let upload = harness.task_4_upload(b"staged during the takeover");
        harness.take_over_round_0(Vec::new());
        let now = harness.now;
        assert!(harness
            .engine
            .handle_staged_upload(now, &upload, None)
            .is_some());
        harness.drain();
        assert!(harness.rejections.is_empty(), "{:?}", harness.rejections);
        assert_eq!(harness.engine.phase(), Phase::Collecting);
        // Its trainer, back, hears that the delta was counted.
        harness
            .engine
            .handle_trainer_joined(harness.now, harness.id(0));
        harness.drain();
        assert!(harness.accepted_acks(0) >= 1);
    }

    #[test]
    fn a_resumed_round_acknowledges_a_repeat_of_what_it_took_over() {
        // The leader that accepted the delta died before its acknowledgement went out; the
        // trainer sends the same upload to the one that resumed the round.
        let mut harness = Harness::new(config(2, 2, 2, 2, 1), 3);
        let upload = harness.task_4_upload(b"accepted before the takeover");
        let accepted = AcceptedDelta::from_upload(&upload, harness.engine.config.task_budget);
        harness.take_over_round_0(vec![(TaskId(4), accepted)]);
        harness
            .engine
            .handle_trainer_joined(harness.now, harness.id(0));
        harness.drain();
        assert_eq!(harness.accepted_acks(0), 1, "told when it joins");
        let now = harness.now;
        assert_eq!(
            harness
                .engine
                .handle_submission_header(now, harness.id(0), &upload),
            HeaderDecision::Repeat
        );
        harness.drain();
        assert_eq!(
            harness.accepted_acks(0),
            2,
            "and when it sends the upload again"
        );
        assert!(harness.rejections.is_empty(), "{:?}", harness.rejections);
    }

    #[test]
    fn resumed_round_keeps_its_tasks_and_ids() {
        let mut harness = Harness::new(config(2, 2, 2, 2, 1), 3);
        let (t0, t1) = (harness.id(0), harness.id(1));
        let resume = ResumeState {
            round: RoundId(0),
            adapter: Some((BlobHash::of(b"adapter-0"), 100)),
            tasks: vec![(TaskId(4), t0), (TaskId(5), t1)],
            next_task: TaskId(6),
            ..ResumeState::default()
        };
        harness.engine = Engine::new(harness.engine.config.clone(), resume);
        harness.engine.handle_trainer_joined(harness.now, t0);
        harness.drain();
        let task = harness.open_task(0).unwrap();
        assert_eq!(task.task, TaskId(4), "the stored task is sent again");
        harness
            .engine
            .handle_trainer_joined(harness.now, harness.id(2));
        harness.drain();
        // Trainer 1 is disconnected, so trainer 2 fills its slot with a fresh id.
        assert_eq!(harness.open_task(2).unwrap().task, TaskId(6));
    }
}
