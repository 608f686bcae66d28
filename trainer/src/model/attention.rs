//! Causal grouped-query attention as one operation with its own backward pass on the CPU
//! backend.
//!
//! Under autodiff burn takes its unfused fallback: the grouped keys and values copied out to
//! every query head, a causal mask built on the host for each call, then a matmul, a scale, a
//! masked fill, a softmax of several tracked passes and a second matmul, each saving its
//! inputs. Here the query heads that share a key head are stacked into one matrix (`[group ·
//! len, head_dim]`), so each product is one batched gemm against the unwidened keys and values
//! and the key and value gradients sum over the group inside that gemm; the scale, the causal
//! mask and the softmax are one pass over each row on rayon's threads, and the backward pass
//! saves only the inputs and the attention weights. Other backends (wgpu) keep burn's
//! attention.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Shape, Tensor};
use rayon::prelude::*;

use super::flex::contiguous_f32;

/// Rows of one task on rayon's threads.
const ROWS_PER_TASK: usize = 64;

/// `softmax(q kᵀ / √head_dim + causal mask) v` for queries `[batch, heads, len, head_dim]` and
/// keys and values `[batch, kv_heads, len, head_dim]` (query head `h` reads key head
/// `h / (heads / kv_heads)`), all at positions `0..len`; `None` off the CPU backend, where the
/// caller takes burn's attention.
pub fn causal_attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Option<Tensor<4>> {
    let [batch, heads, len, head_dim] = q.dims();
    let [_, kv_heads, _, _] = k.dims();
    if kv_heads == 0 || len == 0 || heads % kv_heads != 0 || k.dims() != v.dims() {
        return None;
    }
    let shape = Geometry {
        batch,
        heads,
        kv_heads,
        len,
        head_dim,
    };
    if let (Ok(q), Ok(k), Ok(v)) = (
        q.clone().try_into_primitive::<Flex>(),
        k.clone().try_into_primitive::<Flex>(),
        v.clone().try_into_primitive::<Flex>(),
    ) {
        let (out, _) = shape.forward(q, k, v)?;
        return Some(Tensor::from_primitive::<Flex>(out));
    }
    let tracked = q.is_autodiff() || k.is_autodiff() || v.is_autodiff();
    let lift = |t: &Tensor<4>| {
        if tracked {
            t.clone().autodiff()
        } else {
            t.clone()
        }
    };
    let (q, k, v) = (
        lift(q).try_into_primitive::<Autodiff<Flex>>().ok()?,
        lift(k).try_into_primitive::<Autodiff<Flex>>().ok()?,
        lift(v).try_into_primitive::<Autodiff<Flex>>().ok()?,
    );
    let (q, q_node) = q.into_parts();
    let (k, k_node) = k.into_parts();
    let (v, v_node) = v.into_parts();
    let (out, saved) = shape.forward(q, k, v)?;
    #[cfg(test)]
    RECORDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = match AttentionBackward
        .prepare::<NoCheckpointing>([q_node, k_node, v_node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(saved, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex>>(out))
}

/// Tracked attentions computed here (tests check their path ran).
#[cfg(test)]
static RECORDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The dimensions of one attention call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    len: usize,
    head_dim: usize,
}

/// What the backward pass reads: the stacked queries, the keys, the values, the weights.
#[derive(Debug, Clone)]
struct Saved {
    shape: Geometry,
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    weights: FlexTensor,
}

impl Geometry {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// `[batch, kv_heads, group · len, head_dim]`: a group's query heads one above another.
    fn stacked(&self, t: FlexTensor) -> FlexTensor {
        contiguous_f32(t).reshape(Shape::new([
            self.batch,
            self.kv_heads,
            self.group() * self.len,
            self.head_dim,
        ]))
    }

    /// `[batch, heads, len, head_dim]` from the stacked layout.
    fn unstacked(&self, t: FlexTensor) -> FlexTensor {
        t.reshape(Shape::new([
            self.batch,
            self.heads,
            self.len,
            self.head_dim,
        ]))
    }

    /// The output and the backward pass's state, or `None` for inputs this op does not take.
    fn forward(&self, q: FlexTensor, k: FlexTensor, v: FlexTensor) -> Option<(FlexTensor, Saved)> {
        if [&q, &k, &v].iter().any(|t| t.dtype() != DType::F32) {
            return None;
        }
        let q = self.stacked(q);
        let (k, v) = (contiguous_f32(k), contiguous_f32(v));
        let mut weights = Flex::float_matmul(q.clone(), k.transpose(2, 3));
        let rows = weights.try_storage_mut::<f32>()?;
        let (len, scale) = (self.len, self.scale());
        rows.par_chunks_mut(len * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, rows)| {
                for (i, row) in rows.chunks_mut(len).enumerate() {
                    causal_softmax(row, (task * ROWS_PER_TASK + i) % len, scale);
                }
            });
        let out = self.unstacked(Flex::float_matmul(weights.clone(), v.clone()));
        let saved = Saved {
            shape: *self,
            q,
            k,
            v,
            weights,
        };
        Some((out, saved))
    }
}

/// Row `scores` of a query at `position` in place: `softmax(scale · scores)` over the keys at
/// or before it, zero after it.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn causal_softmax(scores: &mut [f32], position: usize, scale: f32) {
    let (seen, unseen) = scores.split_at_mut(position + 1);
    for s in seen.iter_mut() {
        *s *= scale;
    }
    let max = crate::vmath::max(seen);
    for s in seen.iter_mut() {
        *s = crate::vmath::exp(*s - max);
    }
    let sum = crate::vmath::sum_f64(seen) as f32;
    let inverse = 1.0 / sum;
    seen.iter_mut().for_each(|s| *s *= inverse);
    unseen.fill(0.0);
}

/// `dv = Pᵀ dO`, `dP = dO vᵀ`, `dS = scale · P ⊙ (dP − rowsum(P ⊙ dP))`, `dq = dS k`,
/// `dk = dSᵀ q`, with `P` the saved weights.
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = Saved;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let Saved {
            shape,
            q,
            k,
            v,
            weights,
        } = ops.state;
        let d_out = shape.stacked(grads.consume::<Flex>(&ops.node));
        let [q_node, k_node, v_node] = ops.parents;
        if let Some(node) = v_node {
            let dv = Flex::float_matmul(weights.transpose(2, 3), d_out.clone());
            grads.register::<Flex>(node.id, dv);
        }
        if q_node.is_none() && k_node.is_none() {
            return;
        }
        let mut d_scores = Flex::float_matmul(d_out, v.transpose(2, 3));
        let Some(w) = weights.as_slice::<f32>() else {
            unreachable!("the forward pass wrote the weights contiguously");
        };
        let (len, scale) = (shape.len, shape.scale());
        d_scores
            .storage_mut::<f32>()
            .par_chunks_mut(len * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, rows)| {
                let start = task * ROWS_PER_TASK * len;
                for (i, d) in rows.chunks_mut(len).enumerate() {
                    let p = &w[start + i * len..start + (i + 1) * len];
                    let dot: f32 = p.iter().zip(d.iter()).map(|(p, d)| p * d).sum();
                    for (d, p) in d.iter_mut().zip(p) {
                        *d = scale * p * (*d - dot);
                    }
                }
            });
        if let Some(node) = q_node {
            let dq = shape.unstacked(Flex::float_matmul(d_scores.clone(), k));
            grads.register::<Flex>(node.id, dq);
        }
        if let Some(node) = k_node {
            let dk = Flex::float_matmul(d_scores.transpose(2, 3), q);
            grads.register::<Flex>(node.id, dk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{assert_close, host, uniform};
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, TensorData};

    /// burn's causal attention, keys and values widened to every query head.
    fn plain(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let [batch, heads, len, head_dim] = q.dims();
        let kv_heads = k.dims()[1];
        let group = heads / kv_heads;
        let widen = |t: Tensor<4>| {
            t.unsqueeze_dim::<5>(2)
                .expand([batch, kv_heads, group, len, head_dim])
                .reshape([batch, heads, len, head_dim])
        };
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        attention(q, widen(k), widen(v), None, None, options)
    }

    #[test]
    fn fused_attention_and_its_gradients_match_burns_attention() {
        let device = Device::flex();
        // Grouped (3 queries a key head) and plain heads; a length past one task's rows.
        for (heads, kv_heads, len) in [(6, 2, 37), (2, 2, 70)] {
            let (batch, head_dim) = (2, 8);
            let tensor = |n: usize, seed: u64, dims: [usize; 4]| {
                Tensor::<4>::from_data(TensorData::new(uniform(n, seed, 2.0), dims), &device)
            };
            let q_dims = [batch, heads, len, head_dim];
            let kv_dims = [batch, kv_heads, len, head_dim];
            let q = tensor(q_dims.iter().product(), 1, q_dims);
            let k = tensor(kv_dims.iter().product(), 2, kv_dims);
            let v = tensor(kv_dims.iter().product(), 3, kv_dims);
            let upstream = tensor(q_dims.iter().product(), 4, q_dims);

            let fused = causal_attention(&q, &k, &v).unwrap();
            assert_close(
                &host(fused),
                &host(plain(q.clone(), k.clone(), v.clone())),
                1e-5,
            );

            type Attend = dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>;
            let run = |f: &Attend, track_k: bool| {
                let q = q.clone().autodiff().require_grad();
                let k = if track_k {
                    k.clone().autodiff().require_grad()
                } else {
                    k.clone()
                };
                let v = v.clone().autodiff().require_grad();
                let out = f(q.clone(), k.clone(), v.clone());
                let grads = (out.clone() * upstream.clone()).sum().backward();
                let dk = track_k.then(|| host(k.grad(&grads).unwrap()));
                (
                    host(out.inner()),
                    host(q.grad(&grads).unwrap()),
                    dk,
                    host(v.grad(&grads).unwrap()),
                )
            };
            for track_k in [true, false] {
                let recorded = RECORDED.load(std::sync::atomic::Ordering::Relaxed);
                let fused = run(&|q, k, v| causal_attention(&q, &k, &v).unwrap(), track_k);
                assert!(RECORDED.load(std::sync::atomic::Ordering::Relaxed) > recorded);
                let plain = run(&plain, track_k);
                assert_close(&fused.0, &plain.0, 1e-5);
                assert_close(&fused.1, &plain.1, 1e-5);
                assert_close(&fused.3, &plain.3, 1e-5);
                assert_eq!(fused.2.is_some(), plain.2.is_some());
                if let (Some(a), Some(b)) = (&fused.2, &plain.2) {
                    assert_close(a, b, 1e-5);
                }
            }
        }
    }

    #[test]
    fn the_first_query_sees_only_the_first_key() {
        let mut row = [1.0f32, 5.0, -3.0];
        causal_softmax(&mut row, 0, 0.5);
        assert_eq!(row, [1.0, 0.0, 0.0]);
        let mut row = [0.0f32, 2.0f32.ln() * 2.0, 7.0];
        causal_softmax(&mut row, 1, 0.5);
        assert!((row[0] - 1.0 / 3.0).abs() < 1e-6 && (row[1] - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(row[2], 0.0);
    }
}
