//! Spot re-execution: how the two deltas of a replicated task are compared.
//!
//! A replicated task is given to two trainers with the same start adapter, data, seed and
//! hyper-parameters. Honest trainers on the same backend compute the same update; what still
//! differs is compression's error feedback (each trainer adds back what its previous uploads
//! dropped) and, across backends, floating-point order. A free rider, a copier of another
//! task's delta, or a trainer that used other data or fewer steps lands far outside that.
//!
//! Every sum here runs in f64 in one fixed order (tensors by name, values by index), so the
//! numbers recorded in the ledger re-derive bit for bit.

use serde::{Deserialize, Serialize};

use crate::delta::Delta;
use crate::ledger::{CheckVerdict, RefereeOutcome};

/// How far two deltas of the same task may be apart and still agree.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// Largest relative L2 distance `‖a − b‖ / max(‖a‖, ‖b‖)`.
    pub max_distance: f64,
    /// Smallest cosine similarity.
    pub min_cosine: f64,
}

/// The numbers two deltas are judged by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    /// Relative L2 distance: `‖a − b‖ / max(‖a‖, ‖b‖)`, 0 when both are zero, infinite when the
    /// layouts differ.
    pub distance: f64,
    /// Cosine similarity, 0 when either is zero or the layouts differ.
    pub cosine: f64,
}

impl Tolerance {
    /// Agree when the distance is at most `max_distance` and the cosine at least `min_cosine`;
    /// two zero deltas agree (both trainers did nothing, which the screening of zero deltas
    /// and the loss check judge, not this comparison).
    pub fn verdict(&self, comparison: &Comparison) -> CheckVerdict {
        let both_zero = comparison.distance == 0.0 && comparison.cosine == 0.0;
        let close = comparison.distance <= self.max_distance;
        if close && (both_zero || comparison.cosine >= self.min_cosine) {
            CheckVerdict::Agree
        } else {
            CheckVerdict::Disagree
        }
    }
}

/// Settles a dispute: the referee's delta for the same task is compared with both disputed
/// deltas under `tolerance`; the side it agrees with alone is cleared and the other flagged.
/// Returns the comparison with the counted delta, with the replica, and the outcome.
pub fn referee(
    tolerance: &Tolerance,
    referee: &Delta,
    counted: &Delta,
    replica: &Delta,
) -> (Comparison, Comparison, RefereeOutcome) {
    let (to_counted, to_replica) = (compare(referee, counted), compare(referee, replica));
    let agrees = |comparison: &Comparison| tolerance.verdict(comparison) == CheckVerdict::Agree;
    let outcome = match (agrees(&to_counted), agrees(&to_replica)) {
        (true, false) => RefereeOutcome::ReplicaFlagged,
        (false, true) => RefereeOutcome::CountedFlagged,
        _ => RefereeOutcome::Inconclusive,
    };
    (to_counted, to_replica, outcome)
}

/// Compares two deltas of the same task.
pub fn compare(a: &Delta, b: &Delta) -> Comparison {
    if a.layout() != b.layout() {
        return Comparison {
            distance: f64::INFINITY,
            cosine: 0.0,
        };
    }
    let (mut dot, mut norm_a, mut norm_b, mut difference) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (left, right) in a.tensors().iter().zip(b.tensors()) {
        for (&x, &y) in left.values().iter().zip(right.values()) {
            let (x, y) = (f64::from(x), f64::from(y));
            dot += x * y;
            norm_a += x * x;
            norm_b += y * y;
            difference += (x - y) * (x - y);
        }
    }
    let (norm_a, norm_b) = (norm_a.sqrt(), norm_b.sqrt());
    let scale = norm_a.max(norm_b);
    let distance = if scale > 0.0 {
        difference.sqrt() / scale
    } else {
        0.0
    };
    let cosine = if norm_a > 0.0 && norm_b > 0.0 {
        dot / (norm_a * norm_b)
    } else {
        0.0
    };
    let finite = |value: f64, fallback: f64| if value.is_finite() { value } else { fallback };
    Comparison {
        distance: finite(distance, f64::INFINITY),
        cosine: finite(cosine, 0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::NamedTensor;
    use proptest::prelude::*;

    fn delta(values: &[f32]) -> Delta {
        Delta::new(vec![NamedTensor::new(
            "a",
            vec![values.len()],
            values.to_vec(),
        )
        .unwrap()])
        .unwrap()
    }

    const TOLERANCE: Tolerance = Tolerance {
        max_distance: 0.1,
        min_cosine: 0.99,
    };

    #[test]
    fn cheats_land_far_outside_the_tolerance_and_small_noise_inside() {
        let honest = delta(&[1.0, -2.0, 0.5, 3.0]);
        let agree = |other: &Delta| TOLERANCE.verdict(&compare(&honest, other));
        assert_eq!(agree(&honest), CheckVerdict::Agree);
        assert_eq!(
            agree(&delta(&[1.01, -1.99, 0.5, 3.02])),
            CheckVerdict::Agree
        );
        // A free rider (zero), a scaled copy (half the steps), a flipped sign, other data.
        assert_eq!(agree(&delta(&[0.0; 4])), CheckVerdict::Disagree);
        assert_eq!(
            agree(&delta(&[0.5, -1.0, 0.25, 1.5])),
            CheckVerdict::Disagree
        );
        assert_eq!(
            agree(&delta(&[-1.0, 2.0, -0.5, -3.0])),
            CheckVerdict::Disagree
        );
        assert_eq!(
            agree(&delta(&[3.0, 1.0, -2.0, 0.5])),
            CheckVerdict::Disagree
        );
        let zero = compare(&delta(&[0.0; 4]), &delta(&[0.0; 4]));
        assert_eq!((zero.distance, zero.cosine), (0.0, 0.0));
        let other_layout =
            Delta::new(vec![NamedTensor::new("b", vec![4], vec![1.0; 4]).unwrap()]).unwrap();
        assert_eq!(agree(&other_layout), CheckVerdict::Disagree);
    }

    #[test]
    fn a_referee_flags_the_side_it_disagrees_with_and_nobody_when_unsure() {
        let honest = delta(&[1.0, -2.0, 0.5, 3.0]);
        let cheat = delta(&[0.0; 4]);
        let settle = |referee: &Delta, counted: &Delta, replica: &Delta| {
            super::referee(&TOLERANCE, referee, counted, replica).2
        };
        assert_eq!(
            settle(&honest, &cheat, &honest),
            RefereeOutcome::CountedFlagged
        );
        assert_eq!(
            settle(&honest, &honest, &cheat),
            RefereeOutcome::ReplicaFlagged
        );
        // A referee that matches neither (a third cheat) decides nothing.
        let other = delta(&[-1.0, 2.0, -0.5, -3.0]);
        assert_eq!(
            settle(&other, &honest, &cheat),
            RefereeOutcome::Inconclusive
        );
    }

    proptest! {
        #[test]
        fn the_comparison_is_symmetric_bounded_and_finite(
            values in prop::collection::vec((-1e6f32..1e6, -1e6f32..1e6), 1..64),
        ) {
            let a = delta(&values.iter().map(|v| v.0).collect::<Vec<_>>());
            let b = delta(&values.iter().map(|v| v.1).collect::<Vec<_>>());
            let (ab, ba) = (compare(&a, &b), compare(&b, &a));
            prop_assert_eq!(ab.distance.to_bits(), ba.distance.to_bits());
            prop_assert_eq!(ab.cosine.to_bits(), ba.cosine.to_bits());
            prop_assert!(ab.distance.is_finite() && (0.0..=2.0 + 1e-9).contains(&ab.distance));
            prop_assert!((-1.0 - 1e-9..=1.0 + 1e-9).contains(&ab.cosine));
            let same = compare(&a, &a);
            prop_assert_eq!(same.distance, 0.0);
            prop_assert_eq!(TOLERANCE.verdict(&same), CheckVerdict::Agree);
        }
    }
}
