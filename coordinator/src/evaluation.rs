//! Evaluation tasks: every adapter an experiment reaches (the initial one, then each round's
//! merged one) is scored once on held-out data by one trainer, since the coordinator has no model
//! of its own. Pure bookkeeping; the [`crate::engine::Engine`] owns it and turns its decisions
//! into actions.
//!
//! Rules: one evaluation at a time per trainer; idle trainers are preferred; a trainer that left,
//! declined or missed the deadline hands the evaluation back, and after
//! [`MAX_EVAL_ATTEMPTS`] declines or timeouts it is abandoned (it is a measurement, not work the
//! experiment waits for).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tributary_shared::wire::{DataAssignment, RejectReason};
use tributary_shared::{BlobHash, RoundId, TaskId, TrainerId};

use crate::engine::Refusal;

/// Declines and timeouts after which an evaluation is abandoned.
pub const MAX_EVAL_ATTEMPTS: u32 = 3;
/// Losses at or above this (nats per token) are not believable and are refused.
pub const MAX_EVAL_LOSS: f32 = 1e3;

/// What evaluations score.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalConfig {
    /// The held-out data.
    pub data: DataAssignment,
    /// Most sequences scored.
    pub max_sequences: u32,
    /// Time a trainer has to answer.
    pub timeout: Duration,
}

/// An adapter to be scored.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalTarget {
    /// The round that produced it (`None`: the initial adapter).
    pub after_round: Option<RoundId>,
    /// The adapter.
    pub adapter: BlobHash,
    /// Its encoded length.
    pub adapter_len: u64,
}

/// A scored adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOutcome {
    /// What was scored.
    pub target: EvalTarget,
    /// Who scored it.
    pub trainer: TrainerId,
    /// Mean loss per token.
    pub loss: f32,
    /// Tokens scored.
    pub tokens: u64,
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
    assigned: Option<Assignment>,
    failures: u32,
    tried: BTreeSet<TrainerId>,
    /// Trainers that said they cannot do it (no model, no data): never asked again.
    declined: BTreeSet<TrainerId>,
}

/// Evaluations waiting for a trainer or for its answer, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Evaluations {
    pending: Vec<Pending>,
    /// Connected trainers that declined an evaluation: they cannot evaluate (no model, no
    /// data) and are not asked for later ones either until they reconnect.
    unable: BTreeSet<TrainerId>,
}

impl Evaluations {
    /// Queues `target` unless it is already queued.
    pub fn enqueue(&mut self, target: EvalTarget) {
        if self
            .pending
            .iter()
            .all(|p| p.target.adapter != target.adapter)
        {
            self.pending.push(Pending {
                target,
                assigned: None,
                failures: 0,
                tried: BTreeSet::new(),
                declined: BTreeSet::new(),
            });
        }
    }

    /// Evaluations not yet answered.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// True when `task` is an evaluation in flight.
    pub fn is_eval_task(&self, task: TaskId) -> bool {
        self.assignment_index(task).is_some()
    }

    /// Hands unassigned evaluations to `candidates` (in preference order), at most one per
    /// trainer, each with a task id from `next_task`. A trainer that already failed an
    /// evaluation gets it again only when no one else can take it.
    pub fn dispatch(
        &mut self,
        now: Instant,
        timeout: Duration,
        candidates: &[TrainerId],
        mut next_task: impl FnMut() -> TaskId,
    ) -> Vec<(TaskId, TrainerId, EvalTarget)> {
        let mut busy: BTreeSet<TrainerId> = self
            .pending
            .iter()
            .filter_map(|p| p.assigned.as_ref().map(|a| a.trainer))
            .collect();
        let mut sent = Vec::new();
        for pending in self.pending.iter_mut().filter(|p| p.assigned.is_none()) {
            let unable = &self.unable;
            let free = || {
                candidates.iter().filter(|t| {
                    !busy.contains(t) && !pending.declined.contains(t) && !unable.contains(t)
                })
            };
            let Some(&trainer) = free()
                .find(|t| !pending.tried.contains(t))
                .or_else(|| free().next())
            else {
                break;
            };
            let task = next_task();
            busy.insert(trainer);
            pending.tried.insert(trainer);
            pending.assigned = Some(Assignment {
                task,
                trainer,
                deadline: now + timeout,
            });
            sent.push((task, trainer, pending.target.clone()));
        }
        sent
    }

    /// The earliest answer deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .iter()
            .filter_map(|p| p.assigned.as_ref().map(|a| a.deadline))
            .min()
    }

    /// Takes back evaluations whose deadline passed. Returns the tasks taken back (their
    /// trainers should be told to stop) and the evaluations abandoned.
    pub fn expire(&mut self, now: Instant) -> (Vec<(TaskId, TrainerId)>, Vec<EvalTarget>) {
        let mut expired = Vec::new();
        for pending in &mut self.pending {
            if let Some(assignment) = pending.assigned.take_if(|a| now >= a.deadline) {
                expired.push((assignment.task, assignment.trainer));
                pending.failures += 1;
            }
        }
        (expired, self.abandon_failed())
    }

    /// The evaluation `trainer` is working on, with its task id and deadline (to send again to
    /// a trainer whose connection was replaced).
    pub fn assigned_to(&self, trainer: TrainerId) -> Option<(TaskId, EvalTarget, Instant)> {
        self.pending.iter().find_map(|p| {
            p.assigned
                .as_ref()
                .filter(|a| a.trainer == trainer)
                .map(|a| (a.task, p.target.clone(), a.deadline))
        })
    }

    /// `trainer` left: its evaluation goes back to the queue (not counted as a failure).
    /// Returns whether it had one.
    pub fn trainer_left(&mut self, trainer: TrainerId) -> bool {
        self.unable.remove(&trainer);
        let mut had = false;
        for pending in &mut self.pending {
            if pending
                .assigned
                .as_ref()
                .is_some_and(|a| a.trainer == trainer)
            {
                pending.assigned = None;
                had = true;
            }
        }
        had
    }

    /// True when an evaluation waits for a trainer.
    pub fn has_unassigned(&self) -> bool {
        self.pending.iter().any(|p| p.assigned.is_none())
    }

    /// `trainer` declined evaluation `task`; returns the evaluations abandoned.
    pub fn declined(&mut self, trainer: TrainerId, task: TaskId) -> Vec<EvalTarget> {
        if let Some(index) = self.assignment_index(task) {
            let pending = &mut self.pending[index];
            if pending
                .assigned
                .as_ref()
                .is_some_and(|a| a.trainer == trainer)
            {
                pending.assigned = None;
                pending.failures += 1;
                pending.declined.insert(trainer);
                self.unable.insert(trainer);
            }
        }
        self.abandon_failed()
    }

    /// Checks and takes a result. A refusal leaves the evaluation as it was.
    pub fn answer(
        &mut self,
        trainer: TrainerId,
        task: TaskId,
        adapter: BlobHash,
        loss: f32,
        tokens: u64,
    ) -> Result<EvalOutcome, Refusal> {
        let Some(index) = self.assignment_index(task) else {
            return Err(Refusal::new(
                RejectReason::NotSelected,
                format!("task {} is not an evaluation in progress", task.0),
            ));
        };
        let pending = &self.pending[index];
        if pending.assigned.as_ref().map(|a| a.trainer) != Some(trainer) {
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
        let pending = self.pending.remove(index);
        Ok(EvalOutcome {
            target: pending.target,
            trainer,
            loss,
            tokens,
        })
    }

    fn assignment_index(&self, task: TaskId) -> Option<usize> {
        self.pending
            .iter()
            .position(|p| p.assigned.as_ref().is_some_and(|a| a.task == task))
    }

    fn abandon_failed(&mut self) -> Vec<EvalTarget> {
        let (failed, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.failures >= MAX_EVAL_ATTEMPTS);
        self.pending = kept;
        failed.into_iter().map(|p| p.target).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trainer(n: u8) -> TrainerId {
        TrainerId([n; 32])
    }

    fn target(n: u8) -> EvalTarget {
        EvalTarget {
            after_round: Some(RoundId(u64::from(n))),
            adapter: BlobHash([n; 32]),
            adapter_len: 10,
        }
    }

    fn counter() -> impl FnMut() -> TaskId {
        let mut next = 100;
        move || {
            next += 1;
            TaskId(next)
        }
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn each_adapter_is_queued_once_and_trainers_get_one_at_a_time() {
        let now = Instant::now();
        let mut evals = Evaluations::default();
        evals.enqueue(target(1));
        evals.enqueue(target(1));
        evals.enqueue(target(2));
        assert_eq!(evals.len(), 2);
        let sent = evals.dispatch(now, T, &[trainer(7)], counter());
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].2, target(1));
        // The only trainer is busy: the second waits.
        assert!(evals.dispatch(now, T, &[trainer(7)], counter()).is_empty());
        let sent = evals.dispatch(now, T, &[trainer(7), trainer(8)], counter());
        assert_eq!((sent.len(), sent[0].1), (1, trainer(8)));
    }

    #[test]
    fn only_the_assigned_trainer_may_answer_and_bad_losses_are_refused() {
        let now = Instant::now();
        let mut evals = Evaluations::default();
        evals.enqueue(target(1));
        let (task, who, _) = evals.dispatch(now, T, &[trainer(7)], counter())[0].clone();
        let adapter = target(1).adapter;
        let refuse = |evals: &mut Evaluations, trainer, task, adapter, loss, tokens| {
            evals
                .answer(trainer, task, adapter, loss, tokens)
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
        let outcome = evals.answer(who, task, adapter, 2.5, 640).unwrap();
        assert_eq!((outcome.loss, outcome.tokens), (2.5, 640));
        assert!(evals.is_empty());
        // A replayed answer finds nothing.
        assert_eq!(
            refuse(&mut evals, who, task, adapter, 2.5, 640),
            RejectReason::NotSelected
        );
    }

    #[test]
    fn a_departed_or_slow_trainer_hands_the_evaluation_to_another() {
        let now = Instant::now();
        let mut evals = Evaluations::default();
        evals.enqueue(target(1));
        let both = [trainer(7), trainer(8)];
        let first = evals.dispatch(now, T, &both, counter())[0].clone();
        assert_eq!(first.1, trainer(7));
        evals.trainer_left(trainer(7));
        let second = evals.dispatch(now, T, &both, counter())[0].clone();
        assert_eq!(second.1, trainer(8), "someone who has not tried it yet");
        assert_eq!(evals.next_deadline(), Some(now + T));
        assert_eq!(evals.expire(now + T / 2), (vec![], vec![]));
        assert_eq!(evals.assigned_to(trainer(8)).map(|a| a.0), Some(second.0));
        assert_eq!(
            evals.expire(now + T),
            (vec![(second.0, trainer(8))], vec![])
        );
        assert_eq!(evals.assigned_to(trainer(8)), None);
        // Everyone has tried: it goes back to the first free trainer.
        let third = evals.dispatch(now + T, T, &both, counter())[0].clone();
        assert_eq!(third.1, trainer(7));
        assert!(evals
            .answer(trainer(8), second.0, second.2.adapter, 1.0, 1)
            .is_err());
    }

    #[test]
    fn a_trainer_that_declined_is_not_asked_again_and_declines_abandon_it() {
        let now = Instant::now();
        let mut evals = Evaluations::default();
        evals.enqueue(target(1));
        let mut next = counter();
        let everyone: Vec<TrainerId> = (1..=MAX_EVAL_ATTEMPTS as u8).map(trainer).collect();
        for attempt in 1..=MAX_EVAL_ATTEMPTS {
            let sent = evals.dispatch(now, T, &everyone, &mut next);
            let (task, who, _) = sent[0].clone();
            assert_eq!(who, trainer(attempt as u8), "each asked once");
            let abandoned = evals.declined(who, task);
            assert_eq!(abandoned.len(), usize::from(attempt == MAX_EVAL_ATTEMPTS));
        }
        assert!(evals.is_empty());
        // With only a trainer that declined connected, the evaluation waits for another.
        evals.enqueue(target(2));
        let (task, who, _) = evals.dispatch(now, T, &[trainer(9)], &mut next)[0].clone();
        assert!(evals.declined(who, task).is_empty());
        assert!(evals.dispatch(now, T, &[trainer(9)], &mut next).is_empty());
        let sent = evals.dispatch(now, T, &[trainer(9), trainer(10)], &mut next);
        assert_eq!(sent[0].1, trainer(10));
    }
}
