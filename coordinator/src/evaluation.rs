//! Evaluation tasks: every adapter an experiment reaches (the initial one, then each round's
//! merged one) is scored on held-out data by `k` trainers, since the coordinator has no model of
//! its own, and the score recorded is their median, with how many agreed. One liar moves a
//! median of three nowhere. Pure bookkeeping; the [`crate::engine::Engine`] owns it and turns its
//! decisions into actions.
//!
//! Rules:
//! - Evaluators are drawn at random: trainers without a training task first, each group in the
//!   order of a keyed hash of the coordinator's unrevealed round secret, the adapter and the
//!   trainer, so no trainer can arrange to be the one asked. An adapter never counts two answers
//!   from one trainer; one that failed it is asked again only when no one else can be, and a
//!   trainer holds one evaluation at a time.
//! - Declining, missing the deadline and leaving with an evaluation in hand are failures of that
//!   evaluator, reported so they can be recorded; its slot goes to another trainer.
//! - An adapter is settled when `k` answers are in; or, with fewer, when
//!   [`MAX_FAILURES_PER_EVALUATOR`]` × k + 1` attempts failed, or no trainer that was not asked yet
//!   has been connected for a whole timeout (a fleet smaller than `k`): then with the answers it
//!   has, or abandoned without any.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tributary_shared::wire::{DataAssignment, RejectReason};
use tributary_shared::{BlobHash, RoundId, TaskId, TrainerId};

use crate::engine::Refusal;

/// Failed attempts per wanted evaluator (plus one) after which an adapter is settled with what
/// it has.
pub const MAX_FAILURES_PER_EVALUATOR: u32 = 2;
/// Losses at or above this (nats per token) are not believable and are refused.
pub const MAX_EVAL_LOSS: f32 = 1e3;
/// An answer agrees with the median when its loss is within this fraction of it and it scored
/// the same number of tokens. Honest evaluators compute the same sum on the same sequences;
/// different hardware changes it by far less.
pub const AGREEMENT_TOLERANCE: f32 = 0.01;

/// What evaluations score.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalConfig {
    /// The held-out data.
    pub data: DataAssignment,
    /// Most sequences scored.
    pub max_sequences: u32,
    /// Time a trainer has to answer.
    pub timeout: Duration,
    /// Evaluators wanted per adapter (`k`).
    pub evaluators: u32,
}

/// An adapter to be scored.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalTarget {
    /// The round that produced it (`None`: the initial adapter); for a loss check, the round
    /// it started.
    pub after_round: Option<RoundId>,
    /// The adapter.
    pub adapter: BlobHash,
    /// Its encoded length.
    pub adapter_len: u64,
    /// Present for a loss check of a delta trained from `adapter`.
    pub check: Option<LossCheckTarget>,
}

impl EvalTarget {
    /// A held-out evaluation of `adapter`.
    pub fn held_out(after_round: Option<RoundId>, adapter: BlobHash, adapter_len: u64) -> Self {
        Self {
            after_round,
            adapter,
            adapter_len,
            check: None,
        }
    }

    /// What identifies it among the pending ones: the adapter, or a loss check's delta.
    pub fn key(&self) -> BlobHash {
        self.check
            .as_ref()
            .map_or(self.adapter, |check| check.delta)
    }
}

/// The delta a loss check scores, and the task that trained it.
#[derive(Clone, Debug, PartialEq)]
pub struct LossCheckTarget {
    /// The delta.
    pub delta: BlobHash,
    /// Its encoded length.
    pub delta_len: u64,
    /// Its trainer, who never evaluates it.
    pub trainer: TrainerId,
    /// The task's data.
    pub data: DataAssignment,
    /// The task's seed.
    pub seed: u64,
}

/// One evaluator's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalAnswer {
    /// Who.
    pub trainer: TrainerId,
    /// Mean loss per token it reported.
    pub loss: f32,
    /// Tokens it reported scoring.
    pub tokens: u64,
    /// A loss check's loss of the adapter alone on the same tokens.
    pub baseline: Option<f32>,
}

/// How an evaluator failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalFailure {
    /// It said it cannot.
    Declined,
    /// Its deadline passed.
    TimedOut,
    /// It disconnected with the evaluation in hand.
    Left,
}

impl EvalFailure {
    /// Its name in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            EvalFailure::Declined => "declined",
            EvalFailure::TimedOut => "timed_out",
            EvalFailure::Left => "left",
        }
    }
}

/// Something an evaluator did, to be recorded against it.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluatorEvent {
    /// The adapter it was asked to score.
    pub target: EvalTarget,
    /// Who.
    pub trainer: TrainerId,
    /// Its answer, or how it failed.
    pub result: Result<(f32, u64), EvalFailure>,
}

/// A settled score.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOutcome {
    /// What was scored.
    pub target: EvalTarget,
    /// The answers, in trainer order.
    pub answers: Vec<EvalAnswer>,
    /// The median loss (the mean of the middle two for an even count).
    pub loss: f32,
    /// The median token count.
    pub tokens: u64,
    /// Highest minus lowest loss answered.
    pub spread: f32,
    /// Answers that agree with the median (see [`AGREEMENT_TOLERANCE`]).
    pub agreeing: u32,
    /// Evaluators wanted.
    pub wanted: u32,
}

impl EvalOutcome {
    /// Settles `answers` (at least one).
    fn settle(target: EvalTarget, mut answers: Vec<EvalAnswer>, wanted: u32) -> Self {
        answers.sort_by_key(|a| a.trainer);
        let mut losses: Vec<f32> = answers.iter().map(|a| a.loss).collect();
        losses.sort_by(f32::total_cmp);
        let mut tokens: Vec<u64> = answers.iter().map(|a| a.tokens).collect();
        tokens.sort_unstable();
        let n = losses.len();
        let loss = if n % 2 == 1 {
            losses[n / 2]
        } else {
            (losses[n / 2 - 1] + losses[n / 2]) / 2.0
        };
        let median_tokens = tokens[(n - 1) / 2];
        let agreeing = answers
            .iter()
            .filter(|a| {
                (a.loss - loss).abs() <= AGREEMENT_TOLERANCE * loss.abs()
                    && a.tokens == median_tokens
            })
            .count() as u32;
        Self {
            target,
            spread: losses[n - 1] - losses[0],
            loss,
            tokens: median_tokens,
            agreeing,
            answers,
            wanted,
        }
    }
}

/// What an answer led to.
#[derive(Clone, Debug, PartialEq)]
pub struct Answered {
    /// The answer, to record against its evaluator.
    pub event: EvaluatorEvent,
    /// The settled score, when this was the last answer wanted.
    pub outcome: Option<EvalOutcome>,
}

/// What time, a departure or a refusal settled.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settled {
    /// Evaluators that failed, to record.
    pub failed: Vec<EvaluatorEvent>,
    /// Evaluation tasks taken back (their trainers are told to stop).
    pub cancelled: Vec<(TaskId, TrainerId)>,
    /// Adapters settled with fewer answers than wanted.
    pub outcomes: Vec<EvalOutcome>,
    /// Adapters given up without any answer.
    pub abandoned: Vec<EvalTarget>,
}

#[derive(Clone, Debug)]
struct Assignment {
    task: TaskId,
    trainer: TrainerId,
    deadline: Instant,
}

#[derive(Clone, Debug)]
struct Pending {
    target: EvalTarget,
    assigned: Vec<Assignment>,
    answers: Vec<EvalAnswer>,
    failures: u32,
    /// Trainers that answered or are working on it: not asked again.
    asked: BTreeSet<TrainerId>,
    /// Trainers that failed it: asked again only when no one else can be.
    failed: BTreeSet<TrainerId>,
    /// Since when an open slot has had no trainer that could ever take it.
    starving_since: Option<Instant>,
}

impl Pending {
    fn open_slots(&self, wanted: u32) -> usize {
        (wanted as usize).saturating_sub(self.answers.len() + self.assigned.len())
    }
}

/// Evaluations waiting for trainers or for their answers, oldest first.
#[derive(Clone, Debug)]
pub struct Evaluations {
    pending: Vec<Pending>,
    /// Evaluators wanted per adapter.
    wanted: u32,
    /// Connected trainers that declined an evaluation: they cannot evaluate (no model, no
    /// data) and are not asked for later ones either until they reconnect.
    unable: BTreeSet<TrainerId>,
}

impl Default for Evaluations {
    fn default() -> Self {
        Self::new(1)
    }
}

impl Evaluations {
    /// No evaluations yet; each adapter will want `evaluators` answers (at least one).
    pub fn new(evaluators: u32) -> Self {
        Self {
            pending: Vec::new(),
            wanted: evaluators.max(1),
            unable: BTreeSet::new(),
        }
    }

    /// Queues `target` unless it is already queued. A loss check is never given to the
    /// delta's own trainer.
    pub fn enqueue(&mut self, target: EvalTarget) {
        let key = target.key();
        if self.pending.iter().all(|p| p.target.key() != key) {
            let asked = target.check.iter().map(|check| check.trainer).collect();
            self.pending.push(Pending {
                target,
                assigned: Vec::new(),
                answers: Vec::new(),
                failures: 0,
                asked,
                failed: BTreeSet::new(),
                starving_since: None,
            });
        }
    }

    /// The length of delta `hash` when `trainer` holds a loss check of it.
    pub fn loss_check_assigned(&self, trainer: TrainerId, hash: &BlobHash) -> Option<u64> {
        self.pending.iter().find_map(|p| {
            let check = p.target.check.as_ref()?;
            (check.delta == *hash && p.assigned.iter().any(|a| a.trainer == trainer))
                .then_some(check.delta_len)
        })
    }

    /// Drops every pending loss check (the experiment is over: no later ledger entry can
    /// record them); returns the tasks to take back.
    pub fn drop_loss_checks(&mut self) -> (usize, Vec<(TaskId, TrainerId)>) {
        let (checks, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.target.check.is_some());
        self.pending = kept;
        let count = checks.len();
        let assignments = checks
            .into_iter()
            .flat_map(|p| p.assigned.into_iter().map(|a| (a.task, a.trainer)))
            .collect();
        (count, assignments)
    }

    /// Restores an answer recorded before a restart (its target must be queued).
    pub fn restore_answer(&mut self, adapter: BlobHash, answer: EvalAnswer) {
        if let Some(pending) = self
            .pending
            .iter_mut()
            .find(|p| p.target.check.is_none() && p.target.adapter == adapter)
        {
            if pending.asked.insert(answer.trainer) && pending.answers.len() < self.wanted as usize
            {
                pending.answers.push(answer);
            }
        }
    }

    /// Adapters not yet settled.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// True when `task` is an evaluation in flight.
    pub fn is_eval_task(&self, task: TaskId) -> bool {
        self.find_task(task).is_some()
    }

    /// True when an adapter has an open slot.
    pub fn has_unassigned(&self) -> bool {
        self.pending.iter().any(|p| p.open_slots(self.wanted) > 0)
    }

    /// Fills open slots from `free` (trainers without a training task) and then `training`,
    /// each in the order of `rank(adapter, trainer)` (lowest first), skipping trainers that
    /// hold an evaluation, were asked for this adapter already, or declined one. Each task id
    /// comes from `next_task`.
    pub fn dispatch(
        &mut self,
        now: Instant,
        timeout: Duration,
        free: &[TrainerId],
        training: &[TrainerId],
        rank: impl Fn(&BlobHash, &TrainerId) -> [u8; 32],
        mut next_task: impl FnMut() -> TaskId,
    ) -> Vec<(TaskId, TrainerId, EvalTarget)> {
        let mut busy: BTreeSet<TrainerId> = self
            .pending
            .iter()
            .flat_map(|p| p.assigned.iter().map(|a| a.trainer))
            .collect();
        let mut sent = Vec::new();
        for pending in &mut self.pending {
            let slots = pending.open_slots(self.wanted);
            if slots == 0 {
                pending.starving_since = None;
                continue;
            }
            let adapter = pending.target.key();
            let never_asked =
                |t: &&TrainerId| !pending.asked.contains(t) && !self.unable.contains(t);
            // Could anyone connected ever fill the slots? If not, the adapter is starving.
            let possible = free
                .iter()
                .chain(training)
                .filter(never_asked)
                .take(slots)
                .count();
            if possible < slots {
                pending.starving_since.get_or_insert(now);
            } else {
                pending.starving_since = None;
            }
            let mut chosen: Vec<TrainerId> = Vec::new();
            // Fresh trainers first (free, then training), then ones that failed it before.
            for (group, retry) in [
                (free, false),
                (training, false),
                (free, true),
                (training, true),
            ] {
                let need = slots - chosen.len();
                if need == 0 {
                    break;
                }
                let mut ranked: Vec<([u8; 32], TrainerId)> = group
                    .iter()
                    .filter(never_asked)
                    .filter(|t| pending.failed.contains(t) == retry)
                    .filter(|t| !busy.contains(t) && !chosen.contains(t))
                    .map(|t| (rank(&adapter, t), *t))
                    .collect();
                if ranked.len() > need {
                    ranked.select_nth_unstable(need - 1);
                    ranked.truncate(need);
                }
                ranked.sort_unstable();
                chosen.extend(ranked.into_iter().map(|(_, t)| t));
            }
            for trainer in chosen {
                let task = next_task();
                busy.insert(trainer);
                pending.asked.insert(trainer);
                pending.assigned.push(Assignment {
                    task,
                    trainer,
                    deadline: now + timeout,
                });
                sent.push((task, trainer, pending.target.clone()));
            }
        }
        sent
    }

    /// The next time [`Evaluations::expire`] has something to do: an answer deadline, or a
    /// starving adapter's give-up time.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.pending
            .iter()
            .flat_map(|p| {
                p.assigned
                    .iter()
                    .map(|a| a.deadline)
                    .chain(p.starving_since.map(|since| since + timeout))
            })
            .min()
    }

    /// Takes back evaluations whose deadline passed (failures of their evaluators) and settles
    /// adapters that starved for `timeout` or failed too often.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Settled {
        let mut settled = Settled::default();
        for pending in &mut self.pending {
            let (late, on_time): (Vec<_>, Vec<_>) = std::mem::take(&mut pending.assigned)
                .into_iter()
                .partition(|a| now >= a.deadline);
            pending.assigned = on_time;
            for assignment in late {
                pending.failures += 1;
                pending.asked.remove(&assignment.trainer);
                pending.failed.insert(assignment.trainer);
                settled
                    .cancelled
                    .push((assignment.task, assignment.trainer));
                settled.failed.push(EvaluatorEvent {
                    target: pending.target.clone(),
                    trainer: assignment.trainer,
                    result: Err(EvalFailure::TimedOut),
                });
            }
        }
        let starved = |p: &Pending| {
            p.assigned.is_empty() && p.starving_since.is_some_and(|since| now >= since + timeout)
        };
        self.settle_where(starved, &mut settled);
        settled
    }

    /// The evaluation `trainer` is working on, with its task id and deadline (to send again to
    /// a trainer whose connection was replaced).
    pub fn assigned_to(&self, trainer: TrainerId) -> Option<(TaskId, EvalTarget, Instant)> {
        self.pending.iter().find_map(|p| {
            p.assigned
                .iter()
                .find(|a| a.trainer == trainer)
                .map(|a| (a.task, p.target.clone(), a.deadline))
        })
    }

    /// `trainer` left: an evaluation in its hands is a failure of it, and its slot reopens.
    pub fn trainer_left(&mut self, trainer: TrainerId) -> Settled {
        self.unable.remove(&trainer);
        self.fail(trainer, None, EvalFailure::Left)
    }

    /// `trainer` declined evaluation `task`: a failure of it, and (for a held-out score) it is
    /// not asked again until it reconnects.
    pub fn declined(&mut self, trainer: TrainerId, task: TaskId) -> Settled {
        let settled = self.fail(trainer, Some(task), EvalFailure::Declined);
        // A declined loss check (its delta or data could not be had) says nothing about the
        // trainer's held-out scoring.
        if settled
            .failed
            .iter()
            .any(|event| event.target.check.is_none())
        {
            self.unable.insert(trainer);
        }
        settled
    }

    /// Checks and takes an answer. A refusal leaves the evaluation as it was.
    pub fn answer(
        &mut self,
        trainer: TrainerId,
        task: TaskId,
        adapter: BlobHash,
        loss: f32,
        tokens: u64,
        baseline: Option<f32>,
    ) -> Result<Answered, Refusal> {
        let Some((index, slot)) = self.find_task(task) else {
            return Err(Refusal::new(
                RejectReason::NotSelected,
                format!("task {} is not an evaluation in progress", task.0),
            ));
        };
        let pending = &self.pending[index];
        if pending.assigned[slot].trainer != trainer {
            return Err(Refusal::new(
                RejectReason::NotSelected,
                format!("evaluation {} was given to another trainer", task.0),
            ));
        }
        if adapter != pending.target.adapter {
            return Err(Refusal::new(
                RejectReason::HashMismatch,
                format!(
                    "evaluation {} is of adapter {}, not {}",
                    task.0,
                    pending.target.adapter.short(),
                    adapter.short()
                ),
            ));
        }
        if !(loss.is_finite() && (0.0..MAX_EVAL_LOSS).contains(&loss)) {
            return Err(Refusal::new(
                RejectReason::NonFinite,
                format!("evaluation loss {loss} is not a loss"),
            ));
        }
        if tokens == 0 {
            return Err(Refusal::new(
                RejectReason::Malformed,
                "an evaluation must score at least one token",
            ));
        }
        match (pending.target.check.is_some(), baseline) {
            (true, Some(baseline))
                if baseline.is_finite() && (0.0..MAX_EVAL_LOSS).contains(&baseline) => {}
            (true, Some(baseline)) => {
                return Err(Refusal::new(
                    RejectReason::NonFinite,
                    format!("loss check baseline {baseline} is not a loss"),
                ))
            }
            (true, None) => {
                return Err(Refusal::new(
                    RejectReason::Malformed,
                    format!(
                        "evaluation {} is a loss check: the baseline is missing",
                        task.0
                    ),
                ))
            }
            (false, Some(_)) => {
                return Err(Refusal::new(
                    RejectReason::Malformed,
                    format!(
                        "evaluation {} is not a loss check: no baseline is wanted",
                        task.0
                    ),
                ))
            }
            (false, None) => {}
        }
        let pending = &mut self.pending[index];
        pending.assigned.swap_remove(slot);
        pending.answers.push(EvalAnswer {
            trainer,
            loss,
            tokens,
            baseline,
        });
        let event = EvaluatorEvent {
            target: pending.target.clone(),
            trainer,
            result: Ok((loss, tokens)),
        };
        let outcome = if pending.answers.len() >= self.wanted as usize {
            let pending = self.pending.remove(index);
            Some(EvalOutcome::settle(
                pending.target,
                pending.answers,
                self.wanted,
            ))
        } else {
            None
        };
        Ok(Answered { event, outcome })
    }

    fn fail(&mut self, trainer: TrainerId, task: Option<TaskId>, how: EvalFailure) -> Settled {
        let mut settled = Settled::default();
        for pending in &mut self.pending {
            let before = pending.assigned.len();
            pending
                .assigned
                .retain(|a| !(a.trainer == trainer && task.is_none_or(|task| a.task == task)));
            if pending.assigned.len() < before {
                pending.failures += 1;
                pending.asked.remove(&trainer);
                pending.failed.insert(trainer);
                settled.failed.push(EvaluatorEvent {
                    target: pending.target.clone(),
                    trainer,
                    result: Err(how),
                });
            }
        }
        self.settle_where(|_| false, &mut settled);
        settled
    }

    /// Settles adapters that failed too often, or for which `also` holds, with the answers they
    /// have (abandoned without any).
    fn settle_where(&mut self, also: impl Fn(&Pending) -> bool, settled: &mut Settled) {
        let limit = MAX_FAILURES_PER_EVALUATOR * self.wanted + 1;
        let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.failures >= limit || also(p));
        self.pending = kept;
        for pending in done {
            for assignment in &pending.assigned {
                settled
                    .cancelled
                    .push((assignment.task, assignment.trainer));
            }
            if pending.answers.is_empty() {
                settled.abandoned.push(pending.target);
            } else {
                settled.outcomes.push(EvalOutcome::settle(
                    pending.target,
                    pending.answers,
                    self.wanted,
                ));
            }
        }
    }

    fn find_task(&self, task: TaskId) -> Option<(usize, usize)> {
        self.pending.iter().enumerate().find_map(|(index, p)| {
            p.assigned
                .iter()
                .position(|a| a.task == task)
                .map(|slot| (index, slot))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trainer(n: u8) -> TrainerId {
        TrainerId([n; 32])
    }

    fn target(n: u8) -> EvalTarget {
        EvalTarget::held_out(Some(RoundId(u64::from(n))), BlobHash([n; 32]), 10)
    }

    fn counter() -> impl FnMut() -> TaskId {
        let mut next = 100;
        move || {
            next += 1;
            TaskId(next)
        }
    }

    /// A rank that follows a salt, as the engine's keyed hash does.
    fn ranked(salt: u8) -> impl Fn(&BlobHash, &TrainerId) -> [u8; 32] {
        move |adapter, trainer| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&[salt]);
            hasher.update(&adapter.0);
            hasher.update(&trainer.0);
            *hasher.finalize().as_bytes()
        }
    }

    const T: Duration = Duration::from_secs(10);

    fn fleet(n: u8) -> Vec<TrainerId> {
        (1..=n).map(trainer).collect()
    }

    #[test]
    fn three_distinct_evaluators_score_each_adapter_and_the_median_is_kept() {
        let now = Instant::now();
        let mut evals = Evaluations::new(3);
        evals.enqueue(target(1));
        evals.enqueue(target(1));
        assert_eq!(evals.len(), 1);
        let sent = evals.dispatch(now, T, &fleet(5), &[], ranked(0), counter());
        assert_eq!(sent.len(), 3);
        let who: BTreeSet<TrainerId> = sent.iter().map(|s| s.1).collect();
        assert_eq!(who.len(), 3, "three different trainers");
        // A liar's answer does not move the median; its answer does not agree.
        let losses = [2.0, 2.01, 0.1];
        let mut outcome = None;
        for ((task, trainer, target), loss) in sent.iter().zip(losses) {
            let answered = evals
                .answer(*trainer, *task, target.adapter, loss, 640, None)
                .unwrap();
            assert_eq!(answered.event.result, Ok((loss, 640)));
            outcome = answered.outcome;
        }
        let outcome = outcome.expect("the third answer settles it");
        assert_eq!(outcome.loss, 2.0);
        assert_eq!((outcome.agreeing, outcome.wanted), (2, 3));
        assert!((outcome.spread - 1.91).abs() < 1e-6);
        assert!(evals.is_empty());
    }

    #[test]
    fn evaluators_are_drawn_by_the_secret_rank_free_trainers_first() {
        let now = Instant::now();
        let everyone = fleet(40);
        let (free, training) = everyone.split_at(20);
        let draw = |salt| {
            let mut evals = Evaluations::new(3);
            evals.enqueue(target(1));
            let sent = evals.dispatch(now, T, free, training, ranked(salt), counter());
            sent.into_iter().map(|s| s.1).collect::<BTreeSet<_>>()
        };
        let first = draw(1);
        assert!(first.iter().all(|t| free.contains(t)));
        // Not the first idle ones: the draw follows the secret.
        let draws: BTreeSet<BTreeSet<TrainerId>> = (0..8).map(draw).collect();
        assert!(
            draws.len() > 1,
            "different secrets pick different evaluators"
        );
        assert_ne!(first, free[..3].iter().copied().collect());
    }

    #[test]
    fn only_the_assigned_trainer_may_answer_and_bad_losses_are_refused() {
        let now = Instant::now();
        let mut evals = Evaluations::new(1);
        evals.enqueue(target(1));
        let (task, who, _) =
            evals.dispatch(now, T, &[trainer(7)], &[], ranked(0), counter())[0].clone();
        let adapter = target(1).adapter;
        let refuse = |evals: &mut Evaluations, trainer, task, adapter, loss, tokens| {
            evals
                .answer(trainer, task, adapter, loss, tokens, None)
                .unwrap_err()
                .reason
        };
        assert_eq!(
            refuse(&mut evals, trainer(8), task, adapter, 2.0, 10),
            RejectReason::NotSelected
        );
        assert_eq!(
            refuse(&mut evals, who, TaskId(999), adapter, 2.0, 10),
            RejectReason::NotSelected
        );
        assert_eq!(
            refuse(&mut evals, who, task, BlobHash([9; 32]), 2.0, 10),
            RejectReason::HashMismatch
        );
        for loss in [f32::NAN, f32::INFINITY, -1.0, 5e3] {
            assert_eq!(
                refuse(&mut evals, who, task, adapter, loss, 10),
                RejectReason::NonFinite
            );
        }
        assert_eq!(
            refuse(&mut evals, who, task, adapter, 2.0, 0),
            RejectReason::Malformed
        );
        let outcome = evals
            .answer(who, task, adapter, 2.5, 640, None)
            .unwrap()
            .outcome;
        assert_eq!(
            outcome.map(|o| (o.loss, o.tokens, o.agreeing)),
            Some((2.5, 640, 1))
        );
        assert!(evals.is_empty());
        // A replayed answer finds nothing.
        assert_eq!(
            refuse(&mut evals, who, task, adapter, 2.5, 640),
            RejectReason::NotSelected
        );
    }

    #[test]
    fn leaving_timing_out_and_declining_are_failures_and_the_slot_goes_to_someone_new() {
        let now = Instant::now();
        let mut evals = Evaluations::new(2);
        evals.enqueue(target(1));
        let everyone = fleet(6);
        let mut next = counter();
        let sent = evals.dispatch(now, T, &everyone, &[], ranked(3), &mut next);
        let (a, b) = (sent[0].clone(), sent[1].clone());

        let left = evals.trainer_left(a.1);
        assert_eq!(left.failed.len(), 1);
        assert_eq!(left.failed[0].result, Err(EvalFailure::Left));
        let replacement = evals.dispatch(now, T, &everyone, &[], ranked(3), &mut next);
        assert_eq!(replacement.len(), 1);
        assert!(
            ![a.1, b.1].contains(&replacement[0].1),
            "never the same trainer twice"
        );
        // The one that left may not answer after all.
        assert!(evals.answer(a.1, a.0, a.2.adapter, 2.0, 1, None).is_err());

        let declined = evals.declined(b.1, b.0);
        assert_eq!(declined.failed[0].result, Err(EvalFailure::Declined));
        assert_eq!(evals.next_deadline(T), Some(now + T));
        let expired = evals.expire(now + T, T);
        assert_eq!(
            expired.cancelled,
            vec![(replacement[0].0, replacement[0].1)]
        );
        assert_eq!(expired.failed[0].result, Err(EvalFailure::TimedOut));
        // Three failures of five allowed (2 × 2 + 1): two more settle it, without an answer,
        // and the evaluator still in flight is told to stop.
        let last = evals.dispatch(now + T, T, &everyone, &[], ranked(3), &mut next);
        assert_eq!(last.len(), 2);
        assert_eq!(evals.trainer_left(last[0].1).abandoned, vec![]);
        let replacement = evals.dispatch(now + T, T, &everyone, &[], ranked(3), &mut next);
        assert_eq!(replacement.len(), 1, "the sixth and last trainer");
        let gone = evals.trainer_left(last[1].1);
        assert_eq!(gone.abandoned, vec![target(1)]);
        assert_eq!(gone.cancelled, vec![(replacement[0].0, replacement[0].1)]);
        assert!(evals.is_empty());
    }

    #[test]
    fn a_fleet_smaller_than_k_settles_with_the_answers_it_has_after_a_timeout() {
        let now = Instant::now();
        let mut evals = Evaluations::new(3);
        evals.enqueue(target(1));
        let two = fleet(2);
        let mut next = counter();
        let sent = evals.dispatch(now, T, &two, &[], ranked(0), &mut next);
        assert_eq!(sent.len(), 2);
        for (task, trainer, target) in &sent {
            let answered = evals
                .answer(*trainer, *task, target.adapter, 3.0, 64, None)
                .unwrap();
            assert_eq!(answered.outcome, None);
        }
        assert!(evals
            .dispatch(now, T, &two, &[], ranked(0), &mut next)
            .is_empty());
        assert_eq!(evals.next_deadline(T), Some(now + T));
        assert_eq!(evals.expire(now + T / 2, T), Settled::default());
        let settled = evals.expire(now + T, T);
        assert_eq!(settled.outcomes.len(), 1);
        let outcome = &settled.outcomes[0];
        assert_eq!(
            (outcome.answers.len(), outcome.agreeing, outcome.wanted),
            (2, 2, 3)
        );
        // A third trainer arriving in time would have been asked instead.
        let mut evals = Evaluations::new(3);
        evals.enqueue(target(2));
        let sent = evals.dispatch(now, T, &two, &[], ranked(0), &mut next);
        assert_eq!(sent.len(), 2);
        let third = evals.dispatch(now + T / 2, T, &fleet(3), &[], ranked(0), &mut next);
        assert_eq!(third.len(), 1);
        assert_eq!(evals.expire(now + T, T).outcomes, vec![]);
    }

    #[test]
    fn one_that_failed_is_asked_again_when_no_one_else_can_be() {
        let now = Instant::now();
        let mut evals = Evaluations::new(3);
        evals.enqueue(target(1));
        let three = fleet(3);
        let mut next = counter();
        let sent = evals.dispatch(now, T, &three, &[], ranked(0), &mut next);
        assert_eq!(sent.len(), 3);
        // One drops its connection and comes back: with nobody fresh, it is asked again.
        evals.trainer_left(sent[0].1);
        let again = evals.dispatch(now, T, &three, &[], ranked(0), &mut next);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1, sent[0].1);
        // With a fresh trainer around, the fresh one goes first.
        evals.trainer_left(again[0].1);
        let fresh = evals.dispatch(now, T, &fleet(4), &[], ranked(0), &mut next);
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].1, trainer(4));
    }

    #[test]
    fn a_trainer_that_declined_is_not_asked_again_until_it_reconnects() {
        let now = Instant::now();
        let mut evals = Evaluations::new(1);
        evals.enqueue(target(1));
        let mut next = counter();
        let (task, who, _) =
            evals.dispatch(now, T, &[trainer(9)], &[], ranked(0), &mut next)[0].clone();
        assert!(evals.declined(who, task).abandoned.is_empty());
        evals.enqueue(target(2));
        assert!(evals
            .dispatch(now, T, &[trainer(9)], &[], ranked(0), &mut next)
            .is_empty());
        let sent = evals.dispatch(
            now,
            T,
            &[trainer(9), trainer(10)],
            &[],
            ranked(0),
            &mut next,
        );
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1, trainer(10));
        // After it reconnects it may score the other adapter.
        evals.trainer_left(trainer(9));
        let sent = evals.dispatch(now, T, &[trainer(9)], &[], ranked(0), &mut next);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].2, target(2));
    }

    #[test]
    fn restored_answers_count_and_their_evaluators_are_not_asked_again() {
        let now = Instant::now();
        let mut evals = Evaluations::new(3);
        evals.enqueue(target(1));
        for n in 1..=2 {
            evals.restore_answer(
                target(1).adapter,
                EvalAnswer {
                    trainer: trainer(n),
                    loss: 2.0,
                    tokens: 10,
                    baseline: None,
                },
            );
        }
        let sent = evals.dispatch(now, T, &fleet(4), &[], ranked(0), counter());
        assert_eq!(sent.len(), 1);
        assert!(![trainer(1), trainer(2)].contains(&sent[0].1));
        let answered = evals
            .answer(sent[0].1, sent[0].0, target(1).adapter, 2.0, 10, None)
            .unwrap();
        assert_eq!(answered.outcome.map(|o| o.agreeing), Some(3));
    }
}

#[cfg(test)]
mod loss_checks {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    fn check_target(delta: u8, trainer: u8) -> EvalTarget {
        EvalTarget {
            after_round: Some(RoundId(0)),
            adapter: BlobHash([1; 32]),
            adapter_len: 10,
            check: Some(LossCheckTarget {
                delta: BlobHash([delta; 32]),
                delta_len: 8,
                trainer: TrainerId([trainer; 32]),
                data: DataAssignment::Local,
                seed: 3,
            }),
        }
    }

    fn counter() -> impl FnMut() -> TaskId {
        let mut next = 0;
        move || {
            next += 1;
            TaskId(next)
        }
    }

    #[test]
    fn a_loss_check_never_goes_to_the_deltas_trainer_and_wants_a_baseline() {
        let now = Instant::now();
        let mut evals = Evaluations::new(2);
        // Two checks of deltas trained from the same adapter, and the adapter's own score:
        // three separate targets.
        evals.enqueue(check_target(5, 1));
        evals.enqueue(check_target(6, 2));
        evals.enqueue(EvalTarget::held_out(
            Some(RoundId(0)),
            BlobHash([1; 32]),
            10,
        ));
        evals.enqueue(check_target(5, 1));
        assert_eq!(evals.len(), 3);
        let fleet: Vec<TrainerId> = (1..=6).map(|n| TrainerId([n; 32])).collect();
        let sent = evals.dispatch(now, T, &fleet, &[], |_, t| t.0, counter());
        for (_, trainer, target) in &sent {
            if let Some(check) = &target.check {
                assert_ne!(*trainer, check.trainer, "nobody checks its own delta");
            }
        }
        let (task, who, target) = sent
            .iter()
            .find(|(_, _, target)| target.key() == BlobHash([5; 32]))
            .cloned()
            .expect("the first check went out");
        assert_ne!(who, TrainerId([1; 32]));
        let refuse = |evals: &mut Evaluations, baseline| {
            evals
                .answer(who, task, target.adapter, 2.0, 64, baseline)
                .unwrap_err()
                .reason
        };
        assert_eq!(refuse(&mut evals, None), RejectReason::Malformed);
        assert_eq!(refuse(&mut evals, Some(f32::NAN)), RejectReason::NonFinite);
        let answered = evals
            .answer(who, task, target.adapter, 2.0, 64, Some(2.5))
            .unwrap();
        assert_eq!(answered.outcome, None, "two answers wanted");
        // A held-out score must not carry a baseline.
        let (task, who, target) = sent
            .iter()
            .find(|(_, _, target)| target.check.is_none())
            .cloned()
            .expect("the held-out evaluation went out");
        assert_eq!(
            evals
                .answer(who, task, target.adapter, 2.0, 64, Some(2.5))
                .unwrap_err()
                .reason,
            RejectReason::Malformed
        );
        // The experiment ends: loss checks go, the held-out score stays.
        let (dropped, cancelled) = evals.drop_loss_checks();
        assert!(dropped >= 1 && !cancelled.is_empty());
        assert_eq!(evals.len(), 1);
        assert!(evals.pending.iter().all(|p| p.target.check.is_none()));
    }
}
