//! Counters for the Prometheus `/metrics` page, shared between the hub and connection tasks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tributary_shared::wire::RejectReason;

/// Process-wide counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Rounds committed since start.
    pub rounds_closed: AtomicU64,
    /// The open round.
    pub current_round: AtomicU64,
    /// Trainers connected now.
    pub trainers_connected: AtomicU64,
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes refused.
    pub handshakes_refused: AtomicU64,
    /// Deltas accepted.
    pub accepted: AtomicU64,
    /// Bytes received on upload streams.
    pub bytes_in: AtomicU64,
    /// Bytes sent on download streams.
    pub bytes_out: AtomicU64,
    /// Tasks issued.
    pub tasks_issued: AtomicU64,
    /// Replica tasks among them: the training spent on spot re-execution.
    pub replica_tasks: AtomicU64,
    /// Referee tasks: disputes handed to a third trainer.
    pub referee_tasks: AtomicU64,
    /// Trainers flagged by a referee.
    pub flags: AtomicU64,
    /// Replica checks whose two deltas agreed.
    pub checks_agreed: AtomicU64,
    /// Replica checks whose two deltas disagreed.
    pub checks_disagreed: AtomicU64,
    /// Loss checks recorded, by outcome: lowered, not lowered (flagged), inconclusive.
    pub loss_checks: [AtomicU64; 3],
    /// Loss checks the experiment's end left unsettled or unrecorded.
    pub loss_checks_abandoned: AtomicU64,
    /// Evaluation answers that crossed their cancellation and were dropped.
    pub late_answers: AtomicU64,
    /// Adapter evaluations recorded.
    pub evaluations: AtomicU64,
    /// The fleet's allowed duty cycle, in millionths (the pause button).
    pub fleet_duty_ppm: AtomicU64,
    /// Uploads waiting for a receive slot now.
    pub uploads_waiting: AtomicU64,
    /// Uploads told to come back later (back-pressure, not refusals).
    pub uploads_deferred: AtomicU64,
    /// Uploads this node staged for the leader (a standby node of a cluster).
    pub uploads_staged: AtomicU64,
    /// Staged uploads this node, leading, took from the database and decided on.
    pub uploads_unstaged: AtomicU64,
    /// Connections still in the handshake (before their hello is checked).
    pub handshakes_in_flight: AtomicU64,
    /// Round aggregations or commits that failed and were scheduled again.
    pub aggregation_failures: AtomicU64,
    /// Database write batches that failed and were rolled back (the hub reloaded its state).
    pub storage_failures: AtomicU64,
    /// Evaluators that declined, timed out or left with an evaluation in hand.
    pub evaluator_failures: AtomicU64,
    /// Unreferenced blob files removed.
    pub gc_removed: AtomicU64,
    /// Bytes those files held.
    pub gc_bytes_freed: AtomicU64,
    rejected: Mutex<BTreeMap<RejectReason, u64>>,
    limited: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts one rejection.
    pub fn count_rejection(&self, reason: RejectReason) {
        let mut rejected = self
            .rejected
            .lock()
            .expect("metrics lock is never poisoned");
        *rejected.entry(reason).or_default() += 1;
    }

    /// Rejections so far for `reason`.
    pub fn rejections(&self, reason: RejectReason) -> u64 {
        let rejected = self
            .rejected
            .lock()
            .expect("metrics lock is never poisoned");
        rejected.get(&reason).copied().unwrap_or(0)
    }

    /// Counts one peer held to `limit` (refused, cut off or disconnected).
    pub fn count_limit(&self, limit: &'static str) {
        let mut limited = self.limited.lock().expect("metrics lock is never poisoned");
        *limited.entry(limit).or_default() += 1;
    }

    /// Times a peer was held to `limit` so far.
    pub fn limited(&self, limit: &str) -> u64 {
        let limited = self.limited.lock().expect("metrics lock is never poisoned");
        limited.get(limit).copied().unwrap_or(0)
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "tributary_rounds_closed_total",
            "Rounds committed since start.",
            "counter",
            load(&self.rounds_closed),
        );
        gauge(
            &mut out,
            "tributary_round",
            "The open round.",
            "gauge",
            load(&self.current_round),
        );
        gauge(
            &mut out,
            "tributary_trainers_connected",
            "Trainers connected now.",
            "gauge",
            load(&self.trainers_connected),
        );
        gauge(
            &mut out,
            "tributary_fleet_duty_ppm",
            "Allowed duty cycle of the fleet in millionths (0 = paused).",
            "gauge",
            load(&self.fleet_duty_ppm),
        );
        gauge(
            &mut out,
            "tributary_handshakes_total",
            "Trainer handshakes completed.",
            "counter",
            load(&self.handshakes),
        );
        gauge(
            &mut out,
            "tributary_handshakes_refused_total",
            "Trainer handshakes refused.",
            "counter",
            load(&self.handshakes_refused),
        );
        gauge(
            &mut out,
            "tributary_evaluations_total",
            "Adapter evaluations recorded.",
            "counter",
            load(&self.evaluations),
        );
        gauge(
            &mut out,
            "tributary_tasks_issued_total",
            "Tasks sent to trainers.",
            "counter",
            load(&self.tasks_issued),
        );
        gauge(
            &mut out,
            "tributary_replica_tasks_total",
            "Tasks sent as unannounced replicas of another task (spot re-execution); over \
             tributary_tasks_issued_total, the share of training spent on checking.",
            "counter",
            load(&self.replica_tasks),
        );
        gauge(
            &mut out,
            "tributary_referee_tasks_total",
            "Disputes handed to a third trainer to settle.",
            "counter",
            load(&self.referee_tasks),
        );
        gauge(
            &mut out,
            "tributary_trainers_flagged_total",
            "Flags: disputes a referee settled against a trainer, and failed loss checks.",
            "counter",
            load(&self.flags),
        );
        let _ = writeln!(out, "# HELP tributary_replica_checks_total Replicated tasks whose two deltas were compared, by verdict.\n# TYPE tributary_replica_checks_total counter");
        for (verdict, value) in [
            ("agree", load(&self.checks_agreed)),
            ("disagree", load(&self.checks_disagreed)),
        ] {
            let _ = writeln!(
                out,
                "tributary_replica_checks_total{{verdict=\"{verdict}\"}} {value}"
            );
        }
        let _ = writeln!(out, "# HELP tributary_loss_checks_total Counted deltas whose loss on their own training data evaluators checked, by outcome.\n# TYPE tributary_loss_checks_total counter");
        for (outcome, counter) in ["lowered", "not_lowered", "inconclusive"]
            .into_iter()
            .zip(&self.loss_checks)
        {
            let _ = writeln!(
                out,
                "tributary_loss_checks_total{{outcome=\"{outcome}\"}} {}",
                load(counter)
            );
        }
        gauge(
            &mut out,
            "tributary_loss_checks_abandoned_total",
            "Loss checks the experiment's end left unsettled or unrecorded (no later ledger entry could hold them).",
            "counter",
            load(&self.loss_checks_abandoned),
        );
        gauge(
            &mut out,
            "tributary_evaluation_answers_late_total",
            "Evaluation answers that crossed their cancellation and were dropped.",
            "counter",
            load(&self.late_answers),
        );
        gauge(
            &mut out,
            "tributary_submissions_accepted_total",
            "Deltas accepted.",
            "counter",
            load(&self.accepted),
        );
        gauge(
            &mut out,
            "tributary_bytes_in_total",
            "Bytes received on upload streams.",
            "counter",
            load(&self.bytes_in),
        );
        gauge(
            &mut out,
            "tributary_bytes_out_total",
            "Bytes sent on download streams.",
            "counter",
            load(&self.bytes_out),
        );
        gauge(
            &mut out,
            "tributary_uploads_waiting",
            "Uploads waiting for a receive slot.",
            "gauge",
            load(&self.uploads_waiting),
        );
        gauge(
            &mut out,
            "tributary_uploads_deferred_total",
            "Uploads told to retry later because the coordinator was busy.",
            "counter",
            load(&self.uploads_deferred),
        );
        gauge(
            &mut out,
            "tributary_uploads_staged_total",
            "Uploads this standby node checked and staged for the leader.",
            "counter",
            load(&self.uploads_staged),
        );
        gauge(
            &mut out,
            "tributary_uploads_unstaged_total",
            "Uploads staged by standby nodes that this leader decided on.",
            "counter",
            load(&self.uploads_unstaged),
        );
        gauge(
            &mut out,
            "tributary_aggregation_failures_total",
            "Round closes that failed (storage) and were tried again.",
            "counter",
            load(&self.aggregation_failures),
        );
        gauge(
            &mut out,
            "tributary_evaluator_failures_total",
            "Evaluators that declined, timed out or left with an evaluation in hand.",
            "counter",
            load(&self.evaluator_failures),
        );
        gauge(
            &mut out,
            "tributary_storage_failures_total",
            "Database write batches that failed, were rolled back and retried.",
            "counter",
            load(&self.storage_failures),
        );
        gauge(
            &mut out,
            "tributary_gc_removed_total",
            "Unreferenced blob files removed.",
            "counter",
            load(&self.gc_removed),
        );
        gauge(
            &mut out,
            "tributary_gc_bytes_freed_total",
            "Bytes held by the unreferenced blob files removed.",
            "counter",
            load(&self.gc_bytes_freed),
        );
        gauge(
            &mut out,
            "tributary_handshakes_in_flight",
            "Connections whose handshake is not finished.",
            "gauge",
            load(&self.handshakes_in_flight),
        );
        {
            let _ = writeln!(out, "# HELP tributary_limit_hits_total Peers held to a resource limit, by limit.\n# TYPE tributary_limit_hits_total counter");
            let limited = self.limited.lock().expect("metrics lock is never poisoned");
            for (limit, count) in limited.iter() {
                let _ = writeln!(
                    out,
                    "tributary_limit_hits_total{{limit=\"{limit}\"}} {count}"
                );
            }
        }
        let _ = writeln!(out, "# HELP tributary_submissions_rejected_total Submissions refused, by reason.\n# TYPE tributary_submissions_rejected_total counter");
        let rejected = self
            .rejected
            .lock()
            .expect("metrics lock is never poisoned");
        for reason in RejectReason::ALL {
            let count = rejected.get(&reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "tributary_submissions_rejected_total{{reason=\"{reason}\"}} {count}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_reason_and_counts() {
        let metrics = Metrics::default();
        metrics.count_rejection(RejectReason::NonFinite);
        metrics.count_rejection(RejectReason::NonFinite);
        Metrics::add(&metrics.accepted, 3);
        let text = metrics.render();
        assert!(text.contains("tributary_submissions_rejected_total{reason=\"non_finite\"} 2"));
        assert!(text.contains("tributary_submissions_rejected_total{reason=\"replay\"} 0"));
        assert!(text.contains("tributary_submissions_accepted_total 3"));
    }
}
