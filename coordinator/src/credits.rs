//! Credit per trainer, derived from the ledger alone, so anyone holding it computes the same
//! table: deltas that counted, the work they stand for (the weight their tasks justified: tokens
//! trained, or samples of synthetic data), what spot re-execution verified or disputed, and what
//! was refused and why. Pure.
//!
//! Work is credited for deltas that were aggregated, for replicas that agreed with the task
//! they repeated and for referees that settled a dispute (checking is work for the experiment
//! too); a delta withheld because its replica disagreed earns nothing until a referee clears
//! it, and then counts as verified. The trainer a referee finds at fault, or whose delta failed
//! a loss check, is flagged, and its deltas accepted after that are barred: they earn nothing.
//! Loss checks also measure usefulness: the mean improvement a trainer's checked deltas made
//! on their own training sequences.

use std::collections::BTreeMap;

use serde::Serialize;
use tributary_shared::ledger::{CheckVerdict, LedgerEntry};
use tributary_shared::loss_check::LossOutcome;
use tributary_shared::wire::RejectReason;
use tributary_shared::TrainerId;

/// One trainer's record in an experiment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Credit {
    /// The trainer's public key, hex.
    pub trainer: String,
    /// Deltas counted in a round (aggregated, or withheld by a disputed check).
    pub accepted: u64,
    /// Tasks whose delta matched an independent re-execution of the same task (as the counted
    /// delta or as the replica).
    pub verified: u64,
    /// Tasks in a replicated pair whose two deltas disagreed and that no referee has cleared
    /// yet (its own or its partner's fault).
    pub disputed: u64,
    /// Disputes a referee settled against it, and loss checks it failed.
    pub flagged: u64,
    /// Deltas accepted after it was flagged, which did not count.
    pub barred: u64,
    /// Its deltas whose loss on their own training data was checked (conclusively).
    pub loss_checked: u64,
    /// How useful its work measured: the mean of those checks' median improvements (the
    /// training loss its delta took off its task's sequences, nats per token).
    pub improvement: Option<f64>,
    /// Rounds it contributed to.
    pub rounds: u64,
    /// The work those deltas stand for: the sum of their justified weights (tokens trained, or
    /// samples for synthetic data).
    pub work: u64,
    /// Its share of all the work credited, in `[0, 1]`.
    pub share: f64,
    /// Submissions of its refused and recorded in the ledger.
    pub refused: u64,
    /// Of those, refusals for its own fault (every reason but `internal`, `late` and
    /// `rate_limited`, which are the coordinator's or the clock's).
    pub refused_at_fault: u64,
    /// First and last round it contributed to.
    pub first_round: Option<u64>,
    /// Last round it contributed to.
    pub last_round: Option<u64>,
}

/// Every trainer that appears in `ledger`, most work first (ties by key).
pub fn credits(ledger: &[LedgerEntry]) -> Vec<Credit> {
    let mut by_trainer: BTreeMap<TrainerId, Credit> = BTreeMap::new();
    let blank = |trainer: &TrainerId| Credit {
        trainer: trainer.to_hex(),
        accepted: 0,
        verified: 0,
        disputed: 0,
        flagged: 0,
        barred: 0,
        loss_checked: 0,
        improvement: None,
        rounds: 0,
        work: 0,
        share: 0.0,
        refused: 0,
        refused_at_fault: 0,
        first_round: None,
        last_round: None,
    };
    // Disputed deltas by (round, counted hash): (counted trainer, weight, replica trainer,
    // weight), to credit the side a referee clears.
    let mut disputes: BTreeMap<(u64, tributary_shared::BlobHash), [(TrainerId, u64); 2]> =
        BTreeMap::new();
    for entry in ledger {
        let round = entry.round.0;
        let checks = entry
            .verification
            .iter()
            .flat_map(|verification| &verification.checks);
        let mut verdicts = BTreeMap::new();
        for check in checks.clone() {
            verdicts.insert(check.counted, check.verdict);
        }
        let barred: std::collections::BTreeSet<_> = entry
            .verification
            .iter()
            .flat_map(|verification| {
                verification.barred.iter().map(|barred| barred.hash).chain(
                    verification
                        .loss_checks
                        .iter()
                        .filter(|check| check.withheld)
                        .map(|check| check.delta),
                )
            })
            .collect();
        let credit_work = |trainer: &TrainerId, weight: u64, by_trainer: &mut BTreeMap<_, _>| {
            let credit: &mut Credit = by_trainer.entry(*trainer).or_insert_with(|| blank(trainer));
            credit.work = credit.work.saturating_add(weight);
            if credit.last_round != Some(round) {
                credit.rounds += 1;
            }
            credit.first_round.get_or_insert(round);
            credit.last_round = Some(round);
        };
        for delta in &entry.accepted {
            let verdict = verdicts.get(&delta.hash).copied();
            let is_barred = barred.contains(&delta.hash);
            if verdict != Some(CheckVerdict::Disagree) && !is_barred {
                credit_work(&delta.trainer, delta.weight, &mut by_trainer);
            }
            let credit = by_trainer
                .entry(delta.trainer)
                .or_insert_with(|| blank(&delta.trainer));
            credit.accepted += 1;
            credit.barred += u64::from(is_barred);
            match verdict {
                Some(CheckVerdict::Agree) => credit.verified += 1,
                Some(CheckVerdict::Disagree) => credit.disputed += 1,
                None => {}
            }
        }
        for check in checks.clone() {
            let replica = &check.replica;
            if check.verdict == CheckVerdict::Agree {
                credit_work(&replica.trainer, replica.weight, &mut by_trainer);
            } else if let Some(counted) = entry.accepted.iter().find(|a| a.hash == check.counted) {
                disputes.insert(
                    (round, check.counted),
                    [
                        (counted.trainer, counted.weight),
                        (replica.trainer, replica.weight),
                    ],
                );
            }
            let credit = by_trainer
                .entry(replica.trainer)
                .or_insert_with(|| blank(&replica.trainer));
            match check.verdict {
                CheckVerdict::Agree => credit.verified += 1,
                CheckVerdict::Disagree => credit.disputed += 1,
            }
        }
        for check in entry
            .verification
            .iter()
            .flat_map(|verification| &verification.referees)
        {
            let Some(cleared) = check.cleared() else {
                continue;
            };
            let referee = &check.referee;
            credit_work(&referee.trainer, referee.weight, &mut by_trainer);
            by_trainer
                .get_mut(&referee.trainer)
                .expect("credited above")
                .verified += 1;
            if let Some(flagged) = check.flagged() {
                by_trainer
                    .entry(flagged)
                    .or_insert_with(|| blank(&flagged))
                    .flagged += 1;
            }
            let Some(sides) = disputes.remove(&(check.round.0, check.counted)) else {
                continue;
            };
            for (trainer, weight) in sides {
                if trainer == cleared {
                    credit_work(&trainer, weight, &mut by_trainer);
                    let credit = by_trainer.get_mut(&trainer).expect("credited above");
                    credit.disputed = credit.disputed.saturating_sub(1);
                    credit.verified += 1;
                }
            }
        }
        for check in entry
            .verification
            .iter()
            .flat_map(|verification| &verification.loss_checks)
            .filter(|check| check.outcome != LossOutcome::Inconclusive)
        {
            let credit = by_trainer
                .entry(check.trainer)
                .or_insert_with(|| blank(&check.trainer));
            credit.loss_checked += 1;
            credit.flagged += u64::from(check.flagged().is_some());
            // A running mean, in ledger order.
            let mean = credit.improvement.unwrap_or(0.0);
            credit.improvement =
                Some(mean + (check.improvement - mean) / credit.loss_checked as f64);
        }
        for refused in &entry.rejected {
            let Some(trainer) = refused.trainer else {
                continue;
            };
            let credit = by_trainer.entry(trainer).or_insert_with(|| blank(&trainer));
            credit.refused += 1;
            if !matches!(
                refused.reason,
                RejectReason::Internal | RejectReason::Late | RejectReason::RateLimited
            ) {
                credit.refused_at_fault += 1;
            }
        }
    }
    let total: u64 = by_trainer.values().map(|c| c.work).sum();
    let mut out: Vec<Credit> = by_trainer
        .into_values()
        .map(|mut credit| {
            credit.share = if total == 0 {
                0.0
            } else {
                credit.work as f64 / total as f64
            };
            credit
        })
        .collect();
    out.sort_by(|a, b| b.work.cmp(&a.work).then_with(|| a.trainer.cmp(&b.trainer)));
    out
}

/// The table as CSV, with a header line.
pub fn to_csv(credits: &[Credit]) -> String {
    let mut out = String::from(
        "trainer,accepted,verified,disputed,flagged,barred,loss_checked,improvement,rounds,work,share,refused,refused_at_fault,first_round,last_round\n",
    );
    let round = |r: Option<u64>| r.map(|r| r.to_string()).unwrap_or_default();
    for c in credits {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{:.6},{},{},{},{}\n",
            c.trainer,
            c.accepted,
            c.verified,
            c.disputed,
            c.flagged,
            c.barred,
            c.loss_checked,
            c.improvement.map(|i| format!("{i:.6}")).unwrap_or_default(),
            c.rounds,
            c.work,
            c.share,
            c.refused,
            c.refused_at_fault,
            round(c.first_round),
            round(c.last_round)
        ));
    }
    out
}

/// The table as aligned text.
pub fn to_table(credits: &[Credit]) -> String {
    let mut out = format!(
        "{:<16} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>6} {:>12} {:>7} {:>7} {:>9}\n",
        "trainer",
        "accepted",
        "verified",
        "disputed",
        "flagged",
        "barred",
        "improves",
        "rounds",
        "work",
        "share",
        "refused",
        "at fault"
    );
    for c in credits {
        out.push_str(&format!(
            "{:<16} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>6} {:>12} {:>6.1}% {:>7} {:>9}\n",
            &c.trainer[..16.min(c.trainer.len())],
            c.accepted,
            c.verified,
            c.disputed,
            c.flagged,
            c.barred,
            c.improvement
                .map_or_else(|| "-".to_string(), |i| format!("{i:.4}")),
            c.rounds,
            c.work,
            100.0 * c.share,
            c.refused,
            c.refused_at_fault
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::ledger::{AcceptedDelta, RejectedSubmission};
    use tributary_shared::{BlobHash, RoundId, TaskId};

    fn accepted(trainer: u8, weight: u64) -> AcceptedDelta {
        AcceptedDelta {
            hash: BlobHash([trainer; 32]),
            trainer: TrainerId([trainer; 32]),
            weight,
            claimed_samples: 1_000_000,
            reported_train_loss: 1.0,
            byte_len: 10,
            task: TaskId(1),
            reported_steps: 1,
            reported_tokens: 0,
            reported_train_ms: 0,
            signature: vec![],
        }
    }

    fn refused(trainer: u8, reason: RejectReason) -> RejectedSubmission {
        RejectedSubmission {
            trainer: Some(TrainerId([trainer; 32])),
            hash: None,
            reason,
            detail: String::new(),
        }
    }

    fn entry(
        round: u64,
        deltas: Vec<AcceptedDelta>,
        rejected: Vec<RejectedSubmission>,
    ) -> LedgerEntry {
        let zero = BlobHash([0; 32]);
        LedgerEntry {
            experiment: tributary_shared::ExperimentId("credits".into()),
            experiment_uid: tributary_shared::ExperimentUid([0; 32]),
            coordinator: tributary_shared::CertificateHash([0; 32]),
            config_hash: zero,
            round: RoundId(round),
            previous: None,
            adapter_before: zero,
            adapter_after: zero,
            aggregate: zero,
            optimizer_state: None,
            accepted: deltas,
            rejected,
            metrics: Default::default(),
            secret_commitment: zero,
            secret: tributary_shared::selection::RoundSecret([0; 32]),
            next_commitment: zero,
            signer: TrainerId([0; 32]),
            signature: vec![],
            verification: None,
        }
    }

    #[test]
    fn work_counts_justified_weight_and_faults_are_told_apart() {
        let ledger = vec![
            entry(
                0,
                vec![accepted(1, 64), accepted(2, 64)],
                vec![
                    refused(3, RejectReason::Replay),
                    refused(2, RejectReason::Late),
                ],
            ),
            entry(1, vec![accepted(1, 64), accepted(3, 32)], vec![]),
        ];
        let table = credits(&ledger);
        let ids: Vec<&str> = table.iter().map(|c| &c.trainer[..2]).collect();
        assert_eq!(ids, vec!["01", "02", "03"], "most work first");
        let first = &table[0];
        assert_eq!((first.accepted, first.rounds, first.work), (2, 2, 128));
        assert_eq!((first.first_round, first.last_round), (Some(0), Some(1)));
        assert!((first.share - 128.0 / 224.0).abs() < 1e-12);
        // A claim of a million samples bought nothing: the work is the justified weight.
        assert_eq!(table[2].work, 32);
        // Being late is not a fault; a replay is.
        assert_eq!((table[1].refused, table[1].refused_at_fault), (1, 0));
        assert_eq!((table[2].refused, table[2].refused_at_fault), (1, 1));
        assert!((table.iter().map(|c| c.share).sum::<f64>() - 1.0).abs() < 1e-12);
        let csv = to_csv(&table);
        assert_eq!(csv.lines().count(), 4);
        assert!(to_table(&table).lines().count() == 4);
        assert!(credits(&[]).is_empty());
    }

    #[test]
    fn agreeing_replicas_verify_both_trainers_and_a_dispute_withholds_the_work() {
        use tributary_shared::ledger::{ReplicaCheck, RoundVerification};
        let check = |counted: u8, replica: u8, verdict| ReplicaCheck {
            counted: BlobHash([counted; 32]),
            replica: accepted(replica, 64),
            distance: 0.0,
            cosine: 1.0,
            verdict,
        };
        let mut round = entry(0, vec![accepted(1, 64), accepted(2, 64)], vec![]);
        round.verification = Some(RoundVerification {
            barred: Vec::new(),
            loss_checks: Vec::new(),
            screening: Vec::new(),
            checks: vec![
                check(1, 3, CheckVerdict::Agree),
                check(2, 4, CheckVerdict::Disagree),
            ],
            referees: Vec::new(),
        });
        let table = credits(&[round]);
        let find = |n: u8| {
            table
                .iter()
                .find(|c| c.trainer == TrainerId([n; 32]).to_hex())
                .unwrap()
                .clone()
        };
        assert_eq!(
            (find(1).verified, find(1).work, find(1).accepted),
            (1, 64, 1)
        );
        assert_eq!(
            (find(3).verified, find(3).work, find(3).accepted),
            (1, 64, 0)
        );
        assert_eq!(
            (find(2).disputed, find(2).work, find(2).accepted),
            (1, 0, 1)
        );
        assert_eq!((find(4).disputed, find(4).work), (1, 0));
        assert_eq!(find(4).rounds, 0, "no credited work, no round");

        // A referee in the next round agrees with the replica: the counted side is flagged, the
        // replica's trainer cleared and credited, the referee credited for the check.
        let mut disputed = entry(0, vec![accepted(1, 64), accepted(2, 64)], vec![]);
        disputed.verification = Some(RoundVerification {
            barred: Vec::new(),
            loss_checks: Vec::new(),
            screening: Vec::new(),
            checks: vec![check(2, 4, CheckVerdict::Disagree)],
            referees: Vec::new(),
        });
        let mut settled = entry(1, vec![accepted(1, 64)], vec![]);
        settled.verification = Some(RoundVerification {
            barred: Vec::new(),
            loss_checks: Vec::new(),
            screening: Vec::new(),
            checks: Vec::new(),
            referees: vec![tributary_shared::ledger::RefereeCheck {
                round: RoundId(0),
                counted: BlobHash([2; 32]),
                counted_trainer: TrainerId([2; 32]),
                replica: BlobHash([4; 32]),
                replica_trainer: TrainerId([4; 32]),
                referee: accepted(5, 64),
                distance_to_counted: 1.0,
                distance_to_replica: 0.0,
                outcome: tributary_shared::ledger::RefereeOutcome::CountedFlagged,
            }],
        });
        // Its next delta is barred: accepted, but no work credited.
        let mut later = entry(2, vec![accepted(2, 64)], vec![]);
        later.verification = Some(RoundVerification {
            barred: vec![tributary_shared::ledger::BarredDelta {
                hash: BlobHash([2; 32]),
                trainer: TrainerId([2; 32]),
            }],
            ..RoundVerification::default()
        });
        // A loss check of trainer 1's delta: it lowered the loss by 0.25.
        let answer = tributary_shared::loss_check::LossAnswer {
            evaluator: TrainerId([9; 32]),
            baseline: 3.0,
            loss: 2.75,
            tokens: 64,
        };
        later.verification.as_mut().unwrap().loss_checks =
            vec![tributary_shared::ledger::LossCheck {
                round: RoundId(1),
                delta: BlobHash([1; 32]),
                trainer: TrainerId([1; 32]),
                answers: vec![answer],
                wanted: 1,
                improvement: 0.25,
                outcome: LossOutcome::Lowered,
                withheld: false,
            }];
        let table = credits(&[disputed, settled, later]);
        let find = |n: u8| {
            table
                .iter()
                .find(|c| c.trainer == TrainerId([n; 32]).to_hex())
                .unwrap()
                .clone()
        };
        assert_eq!(
            (
                find(2).flagged,
                find(2).disputed,
                find(2).work,
                find(2).barred
            ),
            (1, 1, 0, 1)
        );
        assert_eq!(find(2).accepted, 2);
        assert_eq!((find(1).loss_checked, find(1).improvement), (1, Some(0.25)));
        assert_eq!(find(1).flagged, 0);
        assert_eq!(find(4).improvement, None);
        assert_eq!(
            (find(4).flagged, find(4).disputed, find(4).verified),
            (0, 0, 1)
        );
        assert_eq!(find(4).work, 64, "the cleared replica is credited");
        assert_eq!((find(5).verified, find(5).work), (1, 64), "the referee");
    }
}
