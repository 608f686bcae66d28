//! Spot re-execution over real QUIC with real burn trainers on `experiments/ci-tiny.toml`: every
//! task is replicated (`[verification] replicate = 1`), so each round holds three pairs of
//! trainers given the same task, and disputes go to a referee in the next round. One trainer of
//! eight cheats in each run: it uploads a zero delta without training, re-signs the last merged
//! change, trains on another client than assigned, or trains half the steps. Honest CPU trainers
//! compute the same update for the same task; the cheater's deltas are far from its partner's.
//!
//! What must hold: every check that involves the cheater disagrees and keeps its delta out of
//! the aggregate; every check between honest trainers agrees (the test prints their distances,
//! the calibration figures); every referee flags the cheater and never an honest trainer, and
//! after two flags the cheater gets no more work; the credits show it flagged and never
//! verified; `verify` re-derives every check and every referee's decision.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use tributary_shared::ledger::{CheckVerdict, LedgerEntry};
use tributary_shared::{ExperimentId, TrainerId};
use tributary_trainer::attack::Cheat;

const ROUNDS: u64 = 5;
const TRAINERS: u64 = 8;

/// What one run left in its ledger.
struct Outcome {
    ledger: Vec<LedgerEntry>,
    cheater: TrainerId,
    credits: Vec<tributary_coordinator::credits::Credit>,
    /// Loss checks the honest trainers answered: (baseline, loss, milliseconds).
    loss_checks: Vec<(f32, f32, u64)>,
}

/// Every task replicated.
const REPLICATE_ALL: &str = "replicate = 1.0\nloss_check = 0.0\n";

/// A fleet of `TRAINERS` over `ROUNDS` rounds.
async fn run(name: &str, cheat: Option<Cheat>, verification: &str) -> Outcome {
    run_sized(name, cheat, verification, TRAINERS, ROUNDS, None).await
}

/// A run of `trainers` trainers over `rounds` rounds; the one that may cheat (`Outcome::cheater`)
/// trains on `device` when given, else on the CPU like the rest.
async fn run_sized(
    name: &str,
    cheat: Option<Cheat>,
    verification: &str,
    trainers: u64,
    rounds: u64,
    device: Option<burn::tensor::Device>,
) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tributary_trainer::tiny::write_gguf(&model, 11).unwrap();
    let toml = include_str!("../../experiments/ci-tiny.toml")
        .replace("name = \"ci-tiny\"", &format!("name = \"{name}\""))
        .replace("rounds = 3", &format!("rounds = {rounds}"))
        // Rounds start with seven: after the cheater is dropped the rest go on at once.
        .replace(
            "min_trainers = 3",
            &format!("min_trainers = {}", trainers - 1),
        )
        + "\n[verification]\n"
        + verification;
    let data_dir = dir.path().join("coordinator");
    let running = start(&data_dir, Some(parse(&toml)), vec![]).await;
    let cheater_seed = 1000;
    let cheater = identity(cheater_seed).id();
    let honest: Vec<_> = (1..trainers)
        .map(|i| {
            spawn_burn_trainer(
                &running,
                &model,
                1000 + i,
                tributary_trainer::worker::FULL_DUTY as u32,
                Arc::default(),
            )
        })
        .collect();
    let cheating = spawn_trainer_on(
        &running,
        &model,
        cheater_seed,
        tributary_trainer::worker::FULL_DUTY as u32,
        Arc::default(),
        cheat,
        device.unwrap_or_else(burn::tensor::Device::flex),
    );
    // A cheater's refused upload gets a replacement task that may still be training when the
    // round closes with enough deltas: "late" is the only refusal an honest trainer may see.
    let mut loss_checks = Vec::new();
    for handle in honest {
        let report = tokio::time::timeout(std::time::Duration::from_secs(300), handle)
            .await
            .expect("trainer finished in time")
            .expect("trainer task did not panic")
            .expect("trainer ran without error");
        assert!(report.finished);
        loss_checks.extend(report.loss_checks.iter().copied());
        assert!(
            report.rejected.iter().all(|r| r.starts_with("late")),
            "{:?}",
            report.rejected
        );
    }
    // The cheater may see refusals (a free rider's zero delta repeats, a replay); it must end.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(300), cheating)
        .await
        .expect("the cheater ends too");
    finish_and_verify(running, &data_dir).await;
    let db = tributary_coordinator::store::db::Db::open_read_only(&data_dir.join("tributary.db"))
        .unwrap();
    let ledger: Vec<LedgerEntry> = db
        .ledger(&ExperimentId(name.into()))
        .unwrap()
        .into_iter()
        .map(|(_, entry)| entry)
        .collect();
    assert_eq!(ledger.len() as u64, rounds);
    let credits = tributary_coordinator::credits::credits(&ledger);
    Outcome {
        ledger,
        cheater,
        credits,
        loss_checks,
    }
}

/// Every check of a run: (counted trainer, replica trainer, distance, cosine, verdict).
fn checks(outcome: &Outcome) -> Vec<(TrainerId, TrainerId, f64, f64, CheckVerdict)> {
    let mut out = Vec::new();
    for entry in &outcome.ledger {
        for check in entry
            .verification
            .iter()
            .flat_map(|verification| &verification.checks)
        {
            let counted = entry
                .accepted
                .iter()
                .find(|a| a.hash == check.counted)
                .expect("a check compares a counted delta")
                .trainer;
            out.push((
                counted,
                check.replica.trainer,
                check.distance,
                check.cosine,
                check.verdict,
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cheat_is_caught_by_its_replica_and_honest_pairs_always_agree() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut honest_distances = Vec::new();
    let mut flags_total = 0;
    let mut honest_cosines = Vec::new();
    for cheat in Cheat::ALL {
        let outcome = run(
            &format!("verify-{}", cheat.name()),
            Some(cheat),
            REPLICATE_ALL,
        )
        .await;
        let checks = checks(&outcome);
        type Check = (TrainerId, TrainerId, f64, f64, CheckVerdict);
        let (with_cheater, honest): (Vec<&Check>, Vec<&Check>) = checks
            .iter()
            .partition(|c| c.0 == outcome.cheater || c.1 == outcome.cheater);
        eprintln!(
            "{}: cheater's checks (distance, cosine): {:?}",
            cheat.name(),
            with_cheater.iter().map(|c| (c.2, c.3)).collect::<Vec<_>>()
        );
        assert!(
            !with_cheater.is_empty(),
            "{}: the cheater's work was checked at least once",
            cheat.name()
        );
        for check in &with_cheater {
            assert_eq!(
                check.4,
                CheckVerdict::Disagree,
                "{}: caught ({check:?})",
                cheat.name()
            );
        }
        for check in &honest {
            assert_eq!(check.4, CheckVerdict::Agree, "honest pair {check:?}");
            honest_distances.push(check.2);
            honest_cosines.push(check.3);
        }
        // Referees flag the cheater and nobody else; two flags and it gets no more work.
        let referees: Vec<_> = outcome
            .ledger
            .iter()
            .flat_map(|e| e.verification.iter().flat_map(|v| &v.referees))
            .collect();
        let flagged: Vec<TrainerId> = referees.iter().filter_map(|r| r.flagged()).collect();
        eprintln!(
            "{}: referees (to counted, to replica, outcome): {:?}",
            cheat.name(),
            referees
                .iter()
                .map(|r| (r.distance_to_counted, r.distance_to_replica, r.outcome))
                .collect::<Vec<_>>()
        );
        // Every dispute before the last round is settled in a later one (the selection is
        // random, so the cheater may hold no task in some rounds; a dispute of the last round
        // has no later round to be settled in).
        let last = outcome.ledger.len() - 1;
        let disputes_before_last = outcome.ledger[..last]
            .iter()
            .flat_map(|e| e.verification.iter().flat_map(|v| &v.checks))
            .filter(|c| c.verdict == CheckVerdict::Disagree)
            .count();
        assert_eq!(
            referees.len(),
            disputes_before_last,
            "{}: every dispute before the last round is settled",
            cheat.name()
        );
        flags_total += flagged.len();
        assert!(
            flagged.iter().all(|t| *t == outcome.cheater),
            "{}: only the cheater is flagged",
            cheat.name()
        );
        if let Some(second_flag) = outcome
            .ledger
            .iter()
            .filter(|e| {
                e.verification
                    .iter()
                    .flat_map(|v| v.flagged())
                    .any(|t| t == outcome.cheater)
            })
            .nth(1)
        {
            for entry in outcome
                .ledger
                .iter()
                .filter(|e| e.round > second_flag.round)
            {
                assert!(
                    !entry.accepted.iter().any(|d| d.trainer == outcome.cheater),
                    "{}: dropped after two flags",
                    cheat.name()
                );
            }
        }
        for credit in &outcome.credits {
            let expected = u64::from(credit.trainer == outcome.cheater.to_hex()) * credit.flagged;
            assert_eq!(
                credit.flagged, expected,
                "honest trainers are never flagged"
            );
        }
        // The cheater's counted deltas are withheld: no verified task, and no work credited
        // for a disputed one.
        let cheater = outcome
            .credits
            .iter()
            .find(|c| c.trainer == outcome.cheater.to_hex())
            .expect("the cheater appears in the credits");
        assert_eq!(cheater.verified, 0, "{}", cheat.name());
        assert_eq!(cheater.flagged as usize, flagged.len(), "{}", cheat.name());
        let withheld: BTreeSet<_> = outcome
            .ledger
            .iter()
            .flat_map(|e| e.verification.iter().flat_map(|v| v.withheld()))
            .collect();
        for entry in &outcome.ledger {
            for delta in entry
                .accepted
                .iter()
                .filter(|d| d.trainer == outcome.cheater)
            {
                let checked = entry
                    .verification
                    .iter()
                    .flat_map(|v| &v.checks)
                    .any(|c| c.counted == delta.hash);
                if checked {
                    assert!(withheld.contains(&delta.hash));
                }
            }
        }
        // Once flagged (in the entry of round f), the cheater's deltas from round f on are
        // barred, and nobody else's ever are.
        let first_flag = outcome
            .ledger
            .iter()
            .find(|e| {
                e.verification
                    .iter()
                    .flat_map(|v| v.flagged())
                    .any(|t| t == outcome.cheater)
            })
            .map(|e| e.round);
        for entry in &outcome.ledger {
            let barred: BTreeSet<_> = entry
                .verification
                .iter()
                .flat_map(|v| &v.barred)
                .map(|b| b.hash)
                .collect();
            let disputed: BTreeSet<_> = entry
                .verification
                .iter()
                .flat_map(|v| v.disputed())
                .collect();
            for delta in &entry.accepted {
                let expected = delta.trainer == outcome.cheater
                    && first_flag.is_some_and(|f| entry.round >= f)
                    && !disputed.contains(&delta.hash);
                assert_eq!(
                    barred.contains(&delta.hash),
                    expected,
                    "{}: round {} delta of {}",
                    cheat.name(),
                    entry.round,
                    delta.trainer
                );
            }
        }
        eprintln!(
            "{}: first flagged in round {first_flag:?}; barred deltas: {}",
            cheat.name(),
            outcome
                .ledger
                .iter()
                .flat_map(|e| e.verification.iter().flat_map(|v| &v.barred))
                .count()
        );
    }
    honest_distances.sort_by(f64::total_cmp);
    honest_cosines.sort_by(f64::total_cmp);
    eprintln!(
        "honest CPU pairs: {} checks; relative L2 distance min {:.3e} median {:.3e} max {:.3e}; \
         cosine min {:.6}",
        honest_distances.len(),
        honest_distances[0],
        honest_distances[honest_distances.len() / 2],
        honest_distances[honest_distances.len() - 1],
        honest_cosines[0],
    );
    assert!(
        flags_total >= 4,
        "referees flagged cheaters {flags_total} times"
    );
    assert!(
        honest_distances.len() >= 20,
        "at least 20 honest checks, got {}",
        honest_distances.len()
    );
}

/// The loss check alone (no replicas): every counted delta is scored by three evaluators with
/// and without it on the sequences its task trained on. A free rider's delta does not lower
/// that loss and its trainer is flagged, then barred and dropped; an honest delta always lowers
/// it. Prints the improvements (the calibration figures) and the cost against training.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loss_check_flags_a_free_rider_and_never_an_honest_trainer() {
    use tributary_shared::ledger::LossCheck;
    use tributary_shared::loss_check::LossOutcome;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // Four trainers, three tasks a round: the free rider works early, and each check has
    // three evaluators besides the delta's trainer.
    const CHECKED_ROUNDS: u64 = 10;
    let outcome = run_sized(
        "loss-check",
        Some(Cheat::FreeRide),
        "replicate = 0.0\nloss_check = 1.0\n",
        4,
        CHECKED_ROUNDS,
        None,
    )
    .await;
    let checks: Vec<_> = outcome
        .ledger
        .iter()
        .flat_map(|e| e.verification.iter().flat_map(|v| &v.loss_checks))
        .collect();
    let (cheater, honest): (Vec<&LossCheck>, Vec<&LossCheck>) =
        checks.iter().partition(|c| c.trainer == outcome.cheater);
    eprintln!(
        "loss checks: honest improvements {:?}; free rider {:?}",
        honest.iter().map(|c| c.improvement).collect::<Vec<_>>(),
        cheater
            .iter()
            .map(|c| (c.improvement, c.outcome))
            .collect::<Vec<_>>()
    );
    assert!(
        honest.len() >= 4,
        "honest deltas were checked: {}",
        honest.len()
    );
    for check in &honest {
        assert_ne!(
            check.outcome,
            LossOutcome::NotLowered,
            "an honest delta is never flagged: {check:?}"
        );
        assert_eq!(check.answers.len(), 3, "three evaluators answered");
        assert!(
            check.answers.iter().all(|a| a.evaluator != check.trainer),
            "nobody checks its own delta"
        );
    }
    // Its first zero delta counts; the same zero delta is a replay after that. A check
    // settles in a later round, so one of a round before the last few is always recorded.
    let first_delta = outcome
        .ledger
        .iter()
        .find(|e| e.accepted.iter().any(|d| d.trainer == outcome.cheater))
        .map(|e| e.round.0);
    eprintln!("the free rider's delta counted in round {first_delta:?}");
    assert!(first_delta.is_some(), "the free rider worked");
    if first_delta.is_some_and(|round| round + 4 <= CHECKED_ROUNDS) {
        assert!(
            cheater.iter().any(|c| c.outcome == LossOutcome::NotLowered),
            "the free rider is caught"
        );
    }
    for check in &cheater {
        assert_ne!(check.outcome, LossOutcome::Lowered, "{check:?}");
    }
    for credit in &outcome.credits {
        if credit.trainer != outcome.cheater.to_hex() {
            assert_eq!(credit.flagged, 0, "honest trainers are never flagged");
        }
    }
    // No replicas ran: the checks are the evaluators' forward passes only.
    assert!(outcome
        .ledger
        .iter()
        .all(|e| e.verification.iter().all(|v| v.checks.is_empty())));
    // Cost: scoring both adapters against training the task.
    let train_ms: Vec<u64> = outcome
        .ledger
        .iter()
        .flat_map(|e| &e.accepted)
        .filter(|d| d.trainer != outcome.cheater)
        .map(|d| d.reported_train_ms)
        .collect();
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let check_ms: Vec<u64> = outcome.loss_checks.iter().map(|c| c.2).collect();
    eprintln!(
        "cost: a loss check's two scorings take {:.0} ms per evaluator against {:.0} ms to \
         train the task ({} evaluators: {:.2}x a task's training per checked delta)",
        mean(&check_ms),
        mean(&train_ms),
        3,
        3.0 * mean(&check_ms) / mean(&train_ms).max(1.0)
    );
}

/// An honest trainer on burn's wgpu backend (Mesa's lavapipe in CI) among seven on the CPU, every
/// task replicated: its deltas agree with the CPU trainers' deltas of the same tasks, and nobody
/// is flagged. Built with `--features wgpu`, run when `TRIBUTARY_WGPU_TEST=1` (see `.ci/run`).
#[cfg(feature = "wgpu")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_wgpu_trainer_agrees_with_its_cpu_replicas() {
    if std::env::var_os("TRIBUTARY_WGPU_TEST").is_none() {
        eprintln!("skipped: set TRIBUTARY_WGPU_TEST=1 to run on a Vulkan driver");
        return;
    }
    let (device, name) =
        tributary_trainer::device::select(tributary_trainer::device::BackendChoice::Gpu)
            .expect("a Vulkan driver (lavapipe) is installed");
    eprintln!("wgpu trainer on {name}");
    let outcome = run_sized(
        "verify-wgpu",
        None,
        REPLICATE_ALL,
        TRAINERS,
        ROUNDS,
        Some(device),
    )
    .await;
    let wgpu = outcome.cheater;
    let all = checks(&outcome);
    let with_wgpu: Vec<_> = all.iter().filter(|c| c.0 == wgpu || c.1 == wgpu).collect();
    eprintln!(
        "wgpu against CPU (distance, cosine): {:?}",
        with_wgpu.iter().map(|c| (c.2, c.3)).collect::<Vec<_>>()
    );
    assert!(
        !with_wgpu.is_empty(),
        "the wgpu trainer's work was checked at least once"
    );
    // Three pairs a round; the CPU-only test checks more.
    assert!(all.len() >= 10, "at least 10 checked tasks: {}", all.len());
    for check in &all {
        assert_eq!(check.4, CheckVerdict::Agree, "{check:?}");
    }
    for credit in &outcome.credits {
        assert_eq!(credit.flagged, 0, "nobody is flagged");
    }
}
