//! AdamW with a warm-up + cosine learning-rate schedule and global-norm gradient clipping, over
//! the adapter's factors.
//!
//! Written out rather than taken from `burn::optim` because it works on the flat list of LoRA
//! factors that training owns, clips by the global norm across all of them (as PyTorch's
//! `clip_grad_norm_` does, which PEFT recipes assume), and keeps state small and explicit.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Optimizer and schedule settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimSettings {
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Learning rate at the end of the cosine, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this (none when `None`).
    pub max_grad_norm: Option<f64>,
}

impl Default for OptimSettings {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            max_grad_norm: Some(1.0),
        }
    }
}

impl OptimSettings {
    /// Learning rate of optimizer step `step` (0-based) out of `total`: linear warm-up from
    /// `lr / warmup`, then a cosine down to `min_lr_ratio · lr` at the last step.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = total.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// AdamW state for a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    settings: OptimSettings,
    first: Vec<Tensor<2>>,
    second: Vec<Tensor<2>>,
    steps: u64,
}

impl AdamW {
    /// Fresh state (zero moments) for parameters shaped like `params`.
    pub fn new(settings: OptimSettings, params: &[Tensor<2>]) -> Self {
        let zeros: Vec<Tensor<2>> = params.iter().map(|p| p.zeros_like()).collect();
        Self {
            settings,
            first: zeros.clone(),
            second: zeros,
            steps: 0,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update at learning rate `lr`. Returns the new parameters and the gradients' global
    /// norm before clipping. The norm and the clipping factor stay on the device; the norm is
    /// read back once, after the whole update is queued (one host sync a step on a GPU, not
    /// one per tensor).
    pub fn step(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
        lr: f64,
    ) -> (Vec<Tensor<2>>, f64) {
        let norm = global_norm(&grads);
        // min(1, max / (norm + 1e-6)): exactly 1 (no change to the gradient) below the limit.
        let clip = self.settings.max_grad_norm.map(|max| {
            norm.clone()
                .add_scalar(1e-6)
                .recip()
                .mul_scalar(max)
                .clamp_max(1.0)
                .reshape([1, 1])
        });
        self.steps += 1;
        let s = &self.settings;
        let bias1 = 1.0 - s.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - s.beta2.powi(self.steps as i32);
        let mut out = Vec::with_capacity(params.len());
        for (index, (param, grad)) in params.into_iter().zip(grads).enumerate() {
            let grad = match &clip {
                Some(clip) => grad * clip.clone(),
                None => grad,
            };
            let m = self.first[index].clone().mul_scalar(s.beta1)
                + grad.clone().mul_scalar(1.0 - s.beta1);
            let v = self.second[index].clone().mul_scalar(s.beta2)
                + grad.square().mul_scalar(1.0 - s.beta2);
            let update = m.clone().div_scalar(bias1)
                / (v.clone().div_scalar(bias2).sqrt().add_scalar(s.eps));
            let decayed = if s.weight_decay > 0.0 {
                param.mul_scalar(1.0 - lr * s.weight_decay)
            } else {
                param
            };
            out.push(decayed - update.mul_scalar(lr));
            self.first[index] = m;
            self.second[index] = v;
        }
        let norm: f32 = norm.into_scalar();
        (out, f64::from(norm))
    }
}

/// The L2 norm `[1]` of all `tensors` together (at least one), on their device.
pub fn global_norm(tensors: &[Tensor<2>]) -> Tensor<1> {
    let squares: Vec<Tensor<1>> = tensors.iter().map(|t| t.clone().square().sum()).collect();
    Tensor::cat(squares, 0).sum().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn matrix(values: &[f32], shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), &Device::flex())
    }

    fn read(tensor: &Tensor<2>) -> Vec<f32> {
        tensor.clone().into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn the_global_norm_spans_every_tensor() {
        let tensors = [
            matrix(&[3.0, 0.0], [1, 2]),
            matrix(&[0.0, 4.0, 12.0, 0.0], [2, 2]),
        ];
        let norm: f32 = global_norm(&tensors).into_scalar();
        assert!((norm - 13.0).abs() < 1e-5, "{norm}");
    }

    #[test]
    fn gradients_over_the_limit_are_scaled_to_it_and_those_under_are_untouched() {
        // Adam's update does not change when every gradient is scaled alike, so clipping shows
        // when the norm changes between steps: first norm `first`, then 0.5.
        let run = |max_grad_norm: Option<f64>, first: f32| {
            let settings = OptimSettings {
                lr: 0.1,
                max_grad_norm,
                ..OptimSettings::default()
            };
            let params = vec![matrix(&[0.0, 0.0], [1, 2])];
            let mut adam = AdamW::new(settings, &params);
            let (params, norm) = adam.step(
                params,
                vec![matrix(&[0.6 * first, 0.8 * first], [1, 2])],
                0.1,
            );
            let (params, _) = adam.step(params, vec![matrix(&[0.4, 0.3], [1, 2])], 0.1);
            (read(&params[0]), norm)
        };
        let (clipped, norm) = run(Some(1.0), 5.0);
        assert!(
            (norm - 5.0).abs() < 1e-5,
            "the norm before clipping: {norm}"
        );
        // Norm 5 is scaled to norm 1 (less 1e-6); norm 0.5 is left alone.
        let (unit, _) = run(None, 1.0 / (1.0 + 1e-6));
        for (a, b) in clipped.iter().zip(&unit) {
            assert!((a - b).abs() < 1e-6, "{clipped:?} vs {unit:?}");
        }
        let (unclipped, _) = run(None, 5.0);
        assert!(
            clipped
                .iter()
                .zip(&unclipped)
                .any(|(a, b)| (a - b).abs() > 1e-4),
            "{clipped:?} vs {unclipped:?}"
        );
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = OptimSettings {
            lr: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            ..OptimSettings::default()
        };
        assert!((s.lr_at(0, 20) - 0.25).abs() < 1e-12);
        assert!((s.lr_at(3, 20) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(4, 20) - 1.0).abs() < 1e-12);
        assert!(s.lr_at(12, 20) < 1.0 && s.lr_at(12, 20) > 0.1);
        assert!((s.lr_at(20, 20) - 0.1).abs() < 1e-12);
        assert!(s.lr_at(10, 20) > s.lr_at(11, 20));
    }
}
