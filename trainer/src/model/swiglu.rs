//! The MLP's gate, `silu(gate) ⊙ up`, as one operation with its own backward pass on the CPU
//! backend.
//!
//! burn builds it from a sigmoid, two products and their backward passes: five single-threaded
//! passes over `[tokens, intermediate]` forward, more backward, three saved tensors. Here it is
//! one pass each way on rayon's threads, saving only its two inputs. Other backends (wgpu) keep
//! burn's operations, which their own compilers fuse.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{activation, Tensor, TensorData};
use rayon::prelude::*;

use super::flex::{contiguous_f32, f32_values as values};

/// Elements of one task on rayon's threads.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// `silu(gate) ⊙ up`, for tensors of the same shape.
pub fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    if let (Ok(g), Ok(u)) = (
        gate.clone().try_into_primitive::<Flex>(),
        up.clone().try_into_primitive::<Flex>(),
    ) {
        if let Some(out) = host_forward(&g, &u) {
            return Tensor::from_primitive::<Flex>(out);
        }
    }
    // One tracked input makes both autodiff tensors (the other a constant), as burn's operations
    // would treat it.
    let (gate, up) = if gate.is_autodiff() || up.is_autodiff() {
        (gate.autodiff(), up.autodiff())
    } else {
        (gate, up)
    };
    if let (Ok(g), Ok(u)) = (
        gate.clone().try_into_primitive::<Autodiff<Flex>>(),
        up.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        let (g, g_node) = g.into_parts();
        let (u, u_node) = u.into_parts();
        if let Some(out) = host_forward(&g, &u) {
            #[cfg(test)]
            RECORDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let out = match SwiGluBackward
                .prepare::<NoCheckpointing>([g_node, u_node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((g, u), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            return Tensor::from_primitive::<Autodiff<Flex>>(out);
        }
    }
    activation::silu(gate) * up
}

/// Tracked gates computed here (tests check their path ran).
#[cfg(test)]
static RECORDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

use crate::vmath::sigmoid;

/// `out = silu(g) ⊙ u` over one task's elements.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn forward_chunk(out: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

/// The gradients of one task's elements; an empty output is not wanted.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn backward_chunk(d_gate: &mut [f32], d_up: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    if !d_up.is_empty() {
        for ((d, &g), &dy) in d_up.iter_mut().zip(g).zip(dy) {
            *d = dy * (g * sigmoid(g));
        }
    }
    if !d_gate.is_empty() {
        for (((d, &g), &u), &dy) in d_gate.iter_mut().zip(g).zip(u).zip(dy) {
            let s = sigmoid(g);
            *d = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

fn host_forward(gate: &FlexTensor, up: &FlexTensor) -> Option<FlexTensor> {
    let shape = gate.layout().shape().clone();
    if *up.layout().shape() != shape {
        return None;
    }
    let (g, u) = (values(gate)?, values(up)?);
    let mut out = vec![0.0f32; g.len()];
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .enumerate()
        .for_each(|(task, out)| {
            let start = task * ELEMENTS_PER_TASK;
            let (g, u) = (&g[start..start + out.len()], &u[start..start + out.len()]);
            forward_chunk(out, g, u);
        });
    Some(FlexTensor::from_data(TensorData::new(out, shape)))
}

/// `d gate = dy ⊙ up ⊙ σ(g) (1 + g (1 − σ(g)))`, `d up = dy ⊙ silu(g)`.
#[derive(Debug)]
struct SwiGluBackward;

impl Backward<Flex, 2> for SwiGluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (gate, up) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let dy = contiguous_f32(dy);
        let shape = gate.layout().shape().clone();
        let (Some(g), Some(u), Some(dy)) = (values(&gate), values(&up), values(&dy)) else {
            unreachable!("the forward pass checked both inputs; the gradient was made contiguous");
        };
        let [gate_node, up_node] = ops.parents;
        let mut d_gate = vec![0.0f32; if gate_node.is_some() { g.len() } else { 0 }];
        let mut d_up = vec![0.0f32; if up_node.is_some() { g.len() } else { 0 }];
        let tasks = g.len().div_ceil(ELEMENTS_PER_TASK);
        let mut gate_chunks: Vec<&mut [f32]> = d_gate.chunks_mut(ELEMENTS_PER_TASK).collect();
        let mut up_chunks: Vec<&mut [f32]> = d_up.chunks_mut(ELEMENTS_PER_TASK).collect();
        gate_chunks.resize_with(tasks, Default::default);
        up_chunks.resize_with(tasks, Default::default);
        gate_chunks
            .into_par_iter()
            .zip(up_chunks)
            .enumerate()
            .for_each(|(task, (d_gate, d_up))| {
                let start = task * ELEMENTS_PER_TASK;
                let end = (start + ELEMENTS_PER_TASK).min(g.len());
                let range = start..end;
                backward_chunk(
                    d_gate,
                    d_up,
                    &g[range.clone()],
                    &u[range.clone()],
                    &dy[range],
                );
            });
        if let Some(node) = gate_node {
            let grad = FlexTensor::from_data(TensorData::new(d_gate, shape.clone()));
            grads.register::<Flex>(node.id, grad);
        }
        if let Some(node) = up_node {
            let grad = FlexTensor::from_data(TensorData::new(d_up, shape));
            grads.register::<Flex>(node.id, grad);
        }
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
        assert_close(a, b, 1e-6);
    }

    #[test]
    fn the_fused_gate_and_its_gradients_match_burns_operations() {
        let device = Device::flex();
        // Past one task's elements, with a partial last task.
        let shape = [37, 901];
        let n = shape[0] * shape[1];
        let tensor =
            |seed| Tensor::<2>::from_data(TensorData::new(values(n, seed), shape), &device);
        let (gate, up, upstream) = (tensor(1), tensor(2), tensor(3));

        close(
            &host(swiglu(gate.clone(), up.clone())),
            &host(activation::silu(gate.clone()) * up.clone()),
        );

        let run = |f: &dyn Fn(Tensor<2>, Tensor<2>) -> Tensor<2>, track_up: bool| {
            let g = gate.clone().autodiff().require_grad();
            let u = if track_up {
                up.clone().autodiff().require_grad()
            } else {
                up.clone()
            };
            let out = f(g.clone(), u.clone());
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let d_up = track_up.then(|| host(u.grad(&grads).unwrap()));
            (host(out.inner()), host(g.grad(&grads).unwrap()), d_up)
        };
        for track_up in [true, false] {
            let recorded = RECORDED.load(std::sync::atomic::Ordering::Relaxed);
            let fused = run(&|g, u| swiglu(g, u), track_up);
            assert!(RECORDED.load(std::sync::atomic::Ordering::Relaxed) > recorded);
            let plain = run(&|g, u| activation::silu(g) * u, track_up);
            close(&fused.0, &plain.0);
            close(&fused.1, &plain.1);
            assert_eq!(fused.2.is_some(), plain.2.is_some());
            if let (Some(a), Some(b)) = (&fused.2, &plain.2) {
                close(a, b);
            }
        }
    }
}
