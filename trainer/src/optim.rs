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
    /// norm before clipping.
    pub fn step(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
        lr: f64,
    ) -> (Vec<Tensor<2>>, f64) {
        let norm = global_norm(&grads);
        let clip = match self.settings.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.steps += 1;
        let s = &self.settings;
        let bias1 = 1.0 - s.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - s.beta2.powi(self.steps as i32);
        let mut out = Vec::with_capacity(params.len());
        for (index, (param, grad)) in params.into_iter().zip(grads).enumerate() {
            let grad = if clip < 1.0 {
                grad.mul_scalar(clip)
            } else {
                grad
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
        (out, norm)
    }
}

/// The L2 norm of all tensors together.
pub fn global_norm(tensors: &[Tensor<2>]) -> f64 {
    let mut total = 0.0f64;
    for tensor in tensors {
        let sum: f32 = tensor.clone().square().sum().into_scalar();
        total += f64::from(sum);
    }
    total.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

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
