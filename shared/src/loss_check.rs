//! The loss check: did a delta lower the loss on the data its task trained on?
//!
//! Evaluators score the task's start adapter and the start adapter plus the delta on the same
//! training sequences (those the task's seeded batches visit), each answering both losses, so
//! an answer's improvement is a paired difference that hardware noise barely moves. The
//! verdict is taken on the median improvement over the answers, in f64 in a fixed order, so the
//! numbers recorded in the ledger re-derive bit for bit and one lying evaluator among three
//! cannot flip it.

use serde::{Deserialize, Serialize};

use crate::TrainerId;

/// One evaluator's answer to a loss check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossAnswer {
    /// Who answered.
    pub evaluator: TrainerId,
    /// Mean loss per token of the start adapter on the scored sequences, in nats.
    pub baseline: f32,
    /// Mean loss per token of the start adapter plus the delta on the same sequences.
    pub loss: f32,
    /// Tokens scored.
    pub tokens: u64,
}

impl LossAnswer {
    /// How much the delta lowered this evaluator's loss: `baseline − loss`, in f64.
    pub fn improvement(&self) -> f64 {
        f64::from(self.baseline) - f64::from(self.loss)
    }
}

/// What a loss check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossOutcome {
    /// The median improvement is positive: the delta learned something from its data.
    Lowered,
    /// The median improvement is zero or negative: the delta did not train on its data (or
    /// trained on other data), and its trainer is flagged.
    NotLowered,
    /// Fewer than a majority of the wanted evaluators answered: nobody is judged.
    Inconclusive,
}

/// The median improvement of `answers` (0 when there are none) and the outcome, when `wanted`
/// evaluators were asked for: a majority of them must have answered.
pub fn judge(answers: &[LossAnswer], wanted: u32) -> (f64, LossOutcome) {
    let mut improvements: Vec<f64> = answers.iter().map(LossAnswer::improvement).collect();
    improvements.sort_by(f64::total_cmp);
    let n = improvements.len();
    let median = match n {
        0 => 0.0,
        _ if n % 2 == 1 => improvements[n / 2],
        _ => (improvements[n / 2 - 1] + improvements[n / 2]) / 2.0,
    };
    let majority = (wanted.max(1) as usize) / 2 + 1;
    let outcome = if n < majority || !median.is_finite() {
        LossOutcome::Inconclusive
    } else if median > 0.0 {
        LossOutcome::Lowered
    } else {
        LossOutcome::NotLowered
    };
    (median, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(n: u8, baseline: f32, loss: f32) -> LossAnswer {
        LossAnswer {
            evaluator: TrainerId([n; 32]),
            baseline,
            loss,
            tokens: 64,
        }
    }

    #[test]
    fn the_median_improvement_decides_and_one_liar_of_three_cannot_flip_it() {
        let honest = [answer(1, 3.0, 2.9), answer(2, 3.0, 2.91)];
        // A liar claiming the delta made things much worse.
        let with_liar = [honest[0].clone(), honest[1].clone(), answer(3, 1.0, 9.0)];
        let (median, outcome) = judge(&with_liar, 3);
        assert_eq!(outcome, LossOutcome::Lowered);
        assert!((median - 0.09).abs() < 1e-6, "{median}");
        // A free rider's zero delta: nothing changes.
        let zero = [
            answer(1, 3.0, 3.0),
            answer(2, 3.0, 3.0),
            answer(3, 1.0, 0.5),
        ];
        assert_eq!(judge(&zero, 3).1, LossOutcome::NotLowered);
        // Too few answers judge nobody.
        assert_eq!(judge(&zero[..1], 3).1, LossOutcome::Inconclusive);
        assert_eq!(judge(&[], 3), (0.0, LossOutcome::Inconclusive));
        assert_eq!(judge(&zero[..1], 1).1, LossOutcome::NotLowered);
        // Order does not matter.
        let mut reversed = with_liar.to_vec();
        reversed.reverse();
        assert_eq!(judge(&reversed, 3), judge(&with_liar, 3));
        // NaN never flags.
        assert_eq!(
            judge(&[answer(1, f32::NAN, 1.0), answer(2, f32::NAN, 1.0)], 2).1,
            LossOutcome::Inconclusive
        );
    }
}
