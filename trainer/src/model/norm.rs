//! RMSNorm, `x / sqrt(mean(x²) + eps) ⊙ w` over each row, with a frozen weight `w`.
//!
//! burn builds it from seven operations (square, mean, add, sqrt, reciprocal, two products),
//! each a single-threaded pass over `[tokens, hidden]` on the CPU backend, and more in the
//! backward pass. On the CPU backend it is one operation here: a pass over each row forward
//! and one backward, rows on rayon's threads, saving the input and each row's scale. Other
//! backends (wgpu) keep burn's operations.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::flex::{contiguous_f32, f32_values as values};
use std::sync::Arc;

/// RMSNorm of each row of `x` (`[n, d]`) with `weight` (`[d]`, no gradient).
pub fn rms_norm(x: Tensor<2>, weight: &Tensor<1>, eps: f64) -> Tensor<2> {
    if let Ok(w) = weight.clone().try_into_primitive::<Flex>() {
        if let Some(w) = values(&w).map(<[f32]>::to_vec) {
            if let Ok(plain) = x.clone().try_into_primitive::<Flex>() {
                if let Some((out, _)) = forward(&plain, &w, eps) {
                    return Tensor::from_primitive::<Flex>(out);
                }
            }
            if let Ok(tracked) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
                let (x_prim, node) = tracked.into_parts();
                if let Some((out, scales)) = forward(&x_prim, &w, eps) {
                    #[cfg(test)]
                    RECORDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let out = match RmsNormBackward
                        .prepare::<NoCheckpointing>([node])
                        .compute_bound()
                        .stateful()
                    {
                        OpsKind::Tracked(prep) => prep.finish(
                            Saved {
                                x: x_prim,
                                weight: Arc::new(w),
                                scales: Arc::new(scales),
                            },
                            out,
                        ),
                        OpsKind::UnTracked(prep) => prep.finish(out),
                    };
                    return Tensor::from_primitive::<Autodiff<Flex>>(out);
                }
            }
        }
    }
    graph_rms_norm(x, weight, eps)
}

/// Tracked norms computed here (tests check their path ran).
#[cfg(test)]
static RECORDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// RMSNorm in burn's operations (the reference the tests compare with, and other backends').
pub fn graph_rms_norm(x: Tensor<2>, weight: &Tensor<1>, eps: f64) -> Tensor<2> {
    let [_, d] = x.dims();
    let scale = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    x * scale * weight.clone().reshape([1, d])
}

/// The normalised rows and each row's scale `1 / sqrt(mean(x²) + eps)`.
fn forward(x: &FlexTensor, weight: &[f32], eps: f64) -> Option<(FlexTensor, Vec<f32>)> {
    let shape = x.layout().shape().clone();
    let d = weight.len();
    let values = values(x)?;
    if shape.num_dims() != 2 || shape[1] != d || d == 0 {
        return None;
    }
    let mut out = vec![0.0f32; values.len()];
    let scales: Vec<f32> = out
        .par_chunks_mut(d)
        .zip(values.par_chunks(d))
        .map(|(out, row)| {
            let mean = row.iter().map(|v| f64::from(v * v)).sum::<f64>() / d as f64;
            let scale = (1.0 / (mean + eps).sqrt()) as f32;
            for ((o, &x), &w) in out.iter_mut().zip(row).zip(weight) {
                *o = x * scale * w;
            }
            scale
        })
        .collect();
    Some((FlexTensor::from_data(TensorData::new(out, shape)), scales))
}

#[derive(Debug)]
struct RmsNormBackward;

/// The input, the weight and each row's scale.
#[derive(Debug, Clone)]
struct Saved {
    x: FlexTensor,
    weight: Arc<Vec<f32>>,
    scales: Arc<Vec<f32>>,
}

impl Backward<Flex, 1> for RmsNormBackward {
    type State = Saved;

    /// With `g = dy ⊙ w` and `s` the row's scale: `dx = s g − x s³ (Σ g ⊙ x) / d`.
    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let Saved { x, weight, scales } = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        let Some(parent) = parent else {
            return;
        };
        let dy = contiguous_f32(dy);
        let shape = x.layout().shape().clone();
        let d = weight.len();
        let (Some(x), Some(dy)) = (values(&x), values(&dy)) else {
            unreachable!("the forward pass checked the input; the gradient was made contiguous");
        };
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(dy.par_chunks(d))
            .zip(scales.par_iter())
            .for_each(|(((dx, x), dy), &scale)| {
                let dot: f64 = dy
                    .iter()
                    .zip(weight.iter())
                    .zip(x)
                    .map(|((dy, w), x)| f64::from(dy * w * x))
                    .sum();
                let correction = (dot / d as f64) as f32 * scale * scale * scale;
                for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(weight.iter()) {
                    *dx = scale * dy * w - x * correction;
                }
            });
        grads.register::<Flex>(parent.id, FlexTensor::from_data(TensorData::new(dx, shape)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{assert_close, host, uniform};
    use burn::tensor::Device;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        uniform(n, seed, 4.0)
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_close(a, b, 2e-6);
    }

    #[test]
    fn the_fused_norm_and_its_gradient_match_burns_operations() {
        let device = Device::flex();
        let (n, d) = (37, 96);
        let x = Tensor::<2>::from_data(TensorData::new(values(n * d, 1), [n, d]), &device);
        let weight = Tensor::<1>::from_data(TensorData::new(values(d, 2), [d]), &device);
        let upstream = Tensor::<2>::from_data(TensorData::new(values(n * d, 3), [n, d]), &device);
        close(
            &host(rms_norm(x.clone(), &weight, 1e-5)),
            &host(graph_rms_norm(x.clone(), &weight, 1e-5)),
        );
        let run = |f: &dyn Fn(Tensor<2>) -> Tensor<2>| {
            let leaf = x.clone().autodiff().require_grad();
            let out = f(leaf.clone());
            let grads = (out.clone() * upstream.clone()).sum().backward();
            (host(out.inner()), host(leaf.grad(&grads).unwrap()))
        };
        let recorded = RECORDED.load(std::sync::atomic::Ordering::Relaxed);
        let fused = run(&|x| rms_norm(x, &weight, 1e-5));
        assert!(RECORDED.load(std::sync::atomic::Ordering::Relaxed) > recorded);
        let plain = run(&|x| graph_rms_norm(x, &weight, 1e-5));
        close(&fused.0, &plain.0);
        close(&fused.1, &plain.1);
    }
}
