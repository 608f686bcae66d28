//! Hostile updates: what a lying volunteer sends instead of its honest delta. Used to measure what
//! the coordinator's defences hold against (the `robustness` study, the adversarial tests and
//! red-team runs of `join --attack`); an honest trainer never calls it.

use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tributary_shared::delta::Delta;

/// One way of lying with a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attack {
    /// The honest delta, sign-flipped and boosted: pushes the model back the way it learned.
    Flip,
    /// Random values with `boost` times the honest delta's norm.
    Noise,
    /// Model replacement: `clients × (X − global)` for a random adapter `X` with the global
    /// adapter's norm, so that a plain average lands on `X`.
    Replace,
    /// Nothing at all (a free rider that wants credit without training).
    Zero,
}

impl Attack {
    /// Every attack, in a fixed order.
    pub const ALL: [Attack; 4] = [Attack::Flip, Attack::Noise, Attack::Replace, Attack::Zero];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Attack::Flip => "flip",
            Attack::Noise => "noise",
            Attack::Replace => "replace",
            Attack::Zero => "zero",
        }
    }

    /// The delta sent instead of `honest` (trained from `global`), in a federation of `clients`.
    /// `boost` scales the flip and the noise; `seed` makes the random ones repeatable.
    pub fn corrupt(
        self,
        honest: &Delta,
        global: &Delta,
        boost: f32,
        clients: usize,
        seed: u64,
    ) -> Delta {
        let mut out = honest.clone();
        match self {
            Attack::Flip => scale(&mut out, -boost),
            Attack::Zero => scale(&mut out, 0.0),
            Attack::Noise => {
                let target = f64::from(boost) * honest.l2_norm();
                fill_random(&mut out, seed, target);
            }
            Attack::Replace => {
                // X − global, with X random at the global adapter's norm, times the crowd.
                fill_random(&mut out, seed, global.l2_norm());
                for (mine, theirs) in out.tensors_mut().zip(global.tensors()) {
                    for (a, b) in mine.values_mut().iter_mut().zip(theirs.values()) {
                        *a = (*a - b) * clients as f32;
                    }
                }
            }
        }
        out
    }
}

/// One way of not doing a task as it was specified while claiming that it was: what spot
/// re-execution must catch. Used by the verification tests and red-team runs of
/// `join --cheat`; an honest trainer never sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cheat {
    /// Upload a zero delta without training (a free rider).
    FreeRide,
    /// Upload the last merged change (the adapter minus the one before it), re-signed: a copier
    /// that needs no accomplice, since merged adapters are public.
    CopyAggregate,
    /// Train on other data than assigned (the next client of the dataset).
    OtherData,
    /// Train half the steps asked (at least one).
    FewerSteps,
}

impl Cheat {
    /// Every cheat, in a fixed order.
    pub const ALL: [Cheat; 4] = [
        Cheat::FreeRide,
        Cheat::CopyAggregate,
        Cheat::OtherData,
        Cheat::FewerSteps,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Cheat::FreeRide => "free-ride",
            Cheat::CopyAggregate => "copy-aggregate",
            Cheat::OtherData => "other-data",
            Cheat::FewerSteps => "fewer-steps",
        }
    }

    /// The local steps actually run for a task asking `steps`.
    pub fn steps(self, steps: u64) -> u64 {
        match self {
            Cheat::FreeRide | Cheat::CopyAggregate => 0,
            Cheat::FewerSteps => (steps / 2).max(1),
            Cheat::OtherData => steps,
        }
    }
}

impl std::str::FromStr for Cheat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cheat::ALL
            .into_iter()
            .find(|cheat| cheat.name() == s)
            .ok_or_else(|| {
                format!("unknown cheat {s:?}: free-ride, copy-aggregate, other-data or fewer-steps")
            })
    }
}

impl std::str::FromStr for Attack {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Attack::ALL
            .into_iter()
            .find(|attack| attack.name() == s)
            .ok_or_else(|| format!("unknown attack {s:?}: flip, noise, replace or zero"))
    }
}

impl std::fmt::Display for Attack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn scale(delta: &mut Delta, factor: f32) {
    for tensor in delta.tensors_mut() {
        for value in tensor.values_mut() {
            *value *= factor;
        }
    }
}

/// Overwrites `delta` with uniform random values scaled to L2 norm `norm`.
fn fill_random(delta: &mut Delta, seed: u64, norm: f64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for tensor in delta.tensors_mut() {
        for value in tensor.values_mut() {
            *value = rng.gen_range(-1.0f32..1.0);
        }
    }
    let current = delta.l2_norm();
    if current > 0.0 {
        scale(delta, (norm / current) as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::delta::NamedTensor;

    fn delta(values: Vec<f32>) -> Delta {
        let n = values.len();
        Delta::new(vec![NamedTensor::new("t", vec![n], values).unwrap()]).unwrap()
    }

    #[test]
    fn each_attack_does_what_it_says() {
        let honest = delta(vec![1.0, -2.0, 2.0]);
        let global = delta(vec![0.5, 0.5, 0.5]);
        let flip = Attack::Flip.corrupt(&honest, &global, 10.0, 8, 1);
        assert_eq!(flip.tensors()[0].values(), &[-10.0, 20.0, -20.0]);
        let zero = Attack::Zero.corrupt(&honest, &global, 10.0, 8, 1);
        assert_eq!(zero.l2_norm(), 0.0);
        let noise = Attack::Noise.corrupt(&honest, &global, 10.0, 8, 1);
        assert!((noise.l2_norm() - 30.0).abs() < 1e-3, "{}", noise.l2_norm());
        // A plain average of the replacement with seven zero deltas lands on X, whose norm is
        // the global adapter's.
        let replace = Attack::Replace.corrupt(&honest, &global, 10.0, 8, 1);
        let mut landed = global.clone();
        landed.add_scaled(&replace, 1.0 / 8.0).unwrap();
        assert!((landed.l2_norm() - global.l2_norm()).abs() < 1e-4);
        assert_ne!(landed, global);
        assert_eq!("noise".parse::<Attack>().unwrap(), Attack::Noise);
        assert!("nice".parse::<Attack>().is_err());
    }
}
