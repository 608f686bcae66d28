//! The language-model loss over the full vocabulary, computed in row chunks with its gradient
//! written by hand: no logits tensor is kept for the backward pass (burn's graph keeps several
//! `[tokens, vocab]` buffers, 100 MB each for SmolLM2 at 512 tokens), and at most
//! [`CHUNK_BYTES`] of logits exist at once.
//!
//! Each chunk's logits, softmax and `softmax − one-hot` live only while that chunk is done;
//! what is kept is the gradient of the loss with respect to the final hidden states
//! (`[tokens, hidden]`). The loss returned carries that gradient into burn's autodiff through
//! `s − detach(s) + loss`, where `s = Σ hidden ⊙ grad`: its value is the loss (`s − detach(s)`
//! is exactly zero, the same bits subtracted) and its gradient with respect to `hidden` is
//! `grad`. The LM head is a frozen base weight, so it needs no gradient.

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

/// Bytes of one chunk's logits (and of each buffer derived from them).
pub const CHUNK_BYTES: usize = 128 << 20;

/// Rows of logits computed at once: as many as [`CHUNK_BYTES`] holds, and at least 64. Each
/// chunk's matrix products pack the whole LM head again, so few large chunks beat many small
/// ones (measured on SmolLM2 at 512 rows: 64-row chunks cost about a third more a step than one chunk,
/// 256-row chunks a few per cent); SmolLM2's 512 tokens a step fit in one chunk, a
/// 152,000-word vocabulary takes 220 rows at a time.
fn chunk_rows(head: &Tensor<2>) -> usize {
    let vocab = head.dims()[1].max(1);
    (CHUNK_BYTES / (vocab * std::mem::size_of::<f32>())).max(64)
}

/// Mean next-token negative log-likelihood `[1]` of the logits `hidden · head` (`hidden`
/// `[n, d]`, `head` `[d, vocab]`) against `targets` (`[n]`). With `weights` (`[n]`, 1 or 0)
/// only the targets weighted 1 count, and the sum is divided by `counted` (at least 1): the
/// loss of instruction data. Differentiable with respect to `hidden` only. `head_rows`, when
/// given, is the head's transpose `[vocab, d]` held contiguous (a tied embedding matrix): the
/// backward product reads it instead of a strided view of `head`, which gemm packs more slowly.
pub fn lm_head_loss(
    hidden: Tensor<2>,
    head: &Tensor<2>,
    head_rows: Option<&Tensor<2>>,
    targets: Tensor<1, Int>,
    weights: Option<Tensor<1>>,
    counted: usize,
) -> Tensor<1> {
    let rows = chunk_rows(head);
    let rows_by = RowKernel::for_device(head);
    chunked(
        hidden, head, head_rows, targets, weights, counted, rows, true, rows_by,
    )
}

/// [`lm_head_loss`]'s value alone, for evaluation: no gradient is computed or carried.
pub fn lm_head_loss_value(
    hidden: Tensor<2>,
    head: &Tensor<2>,
    head_rows: Option<&Tensor<2>>,
    targets: Tensor<1, Int>,
    weights: Option<Tensor<1>>,
    counted: usize,
) -> Tensor<1> {
    let rows = chunk_rows(head);
    let rows_by = RowKernel::for_device(head);
    chunked(
        hidden, head, head_rows, targets, weights, counted, rows, false, rows_by,
    )
}

/// What computes each chunk's softmax, losses and `d loss / d logits` from its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKernel {
    /// burn tensor operations (any backend; on the CPU backend, each one a single-threaded pass
    /// over the whole chunk: eight of them, 100 MB each for SmolLM2's 512 rows).
    Graph,
    /// One loop per row on rayon's threads over the logits' host memory: two passes, in place
    /// (the CPU backend, whose tensors live in host memory anyway).
    Host,
}

impl RowKernel {
    fn for_device(head: &Tensor<2>) -> Self {
        if head
            .clone()
            .try_into_primitive::<burn::backend::Flex>()
            .is_ok()
        {
            Self::Host
        } else {
            Self::Graph
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn chunked(
    hidden: Tensor<2>,
    head: &Tensor<2>,
    head_rows: Option<&Tensor<2>>,
    targets: Tensor<1, Int>,
    weights: Option<Tensor<1>>,
    counted: usize,
    chunk_rows: usize,
    with_gradient: bool,
    rows_by: RowKernel,
) -> Tensor<1> {
    let [n, _] = hidden.dims();
    let vocab = head.dims()[1];
    let device = head.device();
    let scale = 1.0 / counted.max(1) as f64;
    // Plain, not merely detached: the chunk's work pays no autodiff dispatch.
    let fixed = hidden.clone().inner();
    let head_t = match head_rows {
        Some(rows) => rows.clone(),
        None => head.clone().transpose(),
    };
    // The host kernel's inputs, read once: targets and each row's share of the loss.
    let host = (rows_by == RowKernel::Host).then(|| {
        let ids = host_values::<i64>(targets.clone().into_data().convert::<i64>());
        let shares: Vec<f32> = match &weights {
            Some(weights) => host_values::<f32>(weights.clone().into_data())
                .into_iter()
                .map(|w| w * scale as f32)
                .collect(),
            None => vec![scale as f32; n],
        };
        (ids, shares)
    });
    let mut losses = Vec::with_capacity(n.div_ceil(chunk_rows));
    let mut host_loss = 0.0f64;
    let mut grads = Vec::with_capacity(n.div_ceil(chunk_rows));
    let mut start = 0;
    while start < n {
        let rows = chunk_rows.min(n - start);
        let logits = fixed.clone().narrow(0, start, rows).matmul(head.clone());
        if let Some((ids, shares)) = &host {
            let mut values = host_values::<f32>(logits.into_data());
            let range = start..start + rows;
            let nll = host_rows(
                &mut values,
                vocab,
                &ids[range.clone()],
                &shares[range.clone()],
                with_gradient,
            );
            host_loss += nll
                .iter()
                .zip(&shares[range])
                .map(|(nll, share)| f64::from(nll * share))
                .sum::<f64>();
            if with_gradient {
                let dlogits =
                    Tensor::<2>::from_data(TensorData::new(values, [rows, vocab]), &device);
                grads.push(dlogits.matmul(head_t.clone()));
            }
            start += rows;
            continue;
        }
        let picked = targets.clone().narrow(0, start, rows).reshape([rows, 1]);
        let max = logits.clone().max_dim(1);
        let exp = (logits.clone() - max.clone()).exp();
        let sum = exp.clone().sum_dim(1);
        let nll = sum.clone().log() + max - logits.gather(1, picked.clone());
        // Each row's share of the loss: 1/counted, times its weight.
        let share = match &weights {
            Some(weights) => weights
                .clone()
                .narrow(0, start, rows)
                .reshape([rows, 1])
                .mul_scalar(scale),
            None => nll.ones_like().mul_scalar(scale),
        };
        losses.push((nll.clone() * share.clone()).sum());
        if !with_gradient {
            start += rows;
            continue;
        }
        // d loss / d logits = share · (softmax − one-hot(target)).
        let minus_one = nll.ones_like().neg();
        let dlogits = (exp / sum).scatter(1, picked, minus_one, IndexingUpdateOp::Add) * share;
        grads.push(dlogits.matmul(head_t.clone()));
        start += rows;
    }
    let loss = if host.is_some() {
        Tensor::<1>::from_data(TensorData::new(vec![host_loss as f32], [1]), &device)
    } else {
        Tensor::cat(losses, 0).sum()
    };
    if !with_gradient {
        return loss;
    }
    let grad = Tensor::cat(grads, 0);
    let carrier = (hidden * grad).sum();
    carrier.clone() - carrier.detach() + loss
}

/// A tensor's values on the host.
///
/// # Panics
/// If they are not of type `E` (the callers convert first).
fn host_values<E: burn::tensor::Element>(data: TensorData) -> Vec<E> {
    data.try_into_vec::<E>()
        .expect("values of the element type asked for")
}

/// Each row's negative log-likelihood of its target, for `logits` (`rows × vocab`, row-major);
/// with `with_gradient`, `logits` is overwritten by `d loss / d logits` = `share · (softmax −
/// one-hot(target))`. Rows run on rayon's threads; each row's arithmetic is fixed (sums in
/// f64, in order), so the results are the same bits on any number of threads.
///
/// # Panics
/// If a target is not a column.
fn host_rows(
    logits: &mut [f32],
    vocab: usize,
    targets: &[i64],
    shares: &[f32],
    with_gradient: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    logits
        .par_chunks_mut(vocab)
        .zip(targets)
        .zip(shares)
        .map(|((row, &target), &share)| {
            let target = usize::try_from(target)
                .ok()
                .filter(|t| *t < vocab)
                .expect("target id within the vocabulary");
            softmax_row(row, target, share, with_gradient)
        })
        .collect()
}

/// One row's loss `ln Σ e^v − v[target]`; with `with_gradient`, the row becomes
/// `share · (softmax − one-hot(target))`. Vectorized for the CPU it runs on, with the same
/// bits on any (see [`crate::vmath`]).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn softmax_row(row: &mut [f32], target: usize, share: f32, with_gradient: bool) -> f32 {
    let picked = row[target];
    let max = crate::vmath::max(row);
    for value in row.iter_mut() {
        *value = crate::vmath::exp(*value - max);
    }
    let sum = crate::vmath::sum_f64(row) as f32;
    if with_gradient {
        let factor = share / sum;
        for value in row.iter_mut() {
            *value *= factor;
        }
        row[target] -= share;
    }
    sum.ln() + max - picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    use crate::train::{lm_loss, masked_lm_loss};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_values::uniform(n, seed, 1.0)
    }

    /// The loss and `d loss / d hidden`, by `loss_of`.
    fn loss_and_grad(
        loss_of: impl Fn(Tensor<2>) -> Tensor<1>,
        hidden: &[f32],
        shape: [usize; 2],
        device: &Device,
    ) -> (f32, Vec<f32>) {
        let leaf = Tensor::<2>::from_data(TensorData::new(hidden.to_vec(), shape), device)
            .autodiff()
            .require_grad();
        let loss = loss_of(leaf.clone());
        let value: f32 = loss.clone().detach().into_scalar();
        let gradients = loss.backward();
        let grad = leaf
            .grad(&gradients)
            .expect("hidden has a gradient")
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        (value, grad)
    }

    #[test]
    fn the_chunked_loss_and_its_gradient_match_the_plain_graph() {
        let device = Device::flex();
        // 70 rows: four chunks of 16 and a remainder of 6.
        let (n, d, vocab) = (70, 12, 97);
        let hidden = values(n * d, 1);
        let head =
            Tensor::<2>::from_data(TensorData::new(values(d * vocab, 2), [d, vocab]), &device)
                .mul_scalar(3.0);
        let ids: Vec<i64> = values(n, 3)
            .iter()
            .map(|v| ((v + 1.0) * 48.0) as i64 % vocab as i64)
            .collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &device);
        let mask: Vec<f32> = (0..n).map(|i| f32::from(u8::from(i % 3 != 0))).collect();
        let counted = mask.iter().filter(|w| **w == 1.0).count();
        let weights = Tensor::<1>::from_data(TensorData::new(mask, [n]), &device);
        let close = |(a, ga): (f32, Vec<f32>), (b, gb): (f32, Vec<f32>)| {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "loss {a} vs {b}");
            let scale = gb.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            assert!(scale > 0.0);
            for (x, y) in ga.iter().zip(&gb) {
                assert!((x - y).abs() <= 1e-5 * scale, "gradient {x} vs {y}");
            }
        };
        let plain = loss_and_grad(
            |h| lm_loss(h.matmul(head.clone()), targets.clone()),
            &hidden,
            [n, d],
            &device,
        );
        for kernel in [RowKernel::Graph, RowKernel::Host] {
            let fused = loss_and_grad(
                |h| chunked(h, &head, None, targets.clone(), None, n, 16, true, kernel),
                &hidden,
                [n, d],
                &device,
            );
            close(fused, plain.clone());
        }
        let plain = loss_and_grad(
            |h| {
                masked_lm_loss(
                    h.matmul(head.clone()),
                    targets.clone(),
                    weights.clone(),
                    counted,
                )
            },
            &hidden,
            [n, d],
            &device,
        );
        for kernel in [RowKernel::Graph, RowKernel::Host] {
            let fused = loss_and_grad(
                |h| {
                    chunked(
                        h,
                        &head,
                        None,
                        targets.clone(),
                        Some(weights.clone()),
                        counted,
                        16,
                        true,
                        kernel,
                    )
                },
                &hidden,
                [n, d],
                &device,
            );
            close(fused, plain.clone());
        }
    }

    #[test]
    fn the_chunked_loss_is_the_same_bits_every_run() {
        let device = Device::flex();
        let (n, d, vocab) = (40, 8, 33);
        let head =
            Tensor::<2>::from_data(TensorData::new(values(d * vocab, 5), [d, vocab]), &device);
        let ids: Vec<i64> = (0..n as i64).map(|i| (i * 7) % vocab as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &device);
        let run = || {
            loss_and_grad(
                |h| lm_head_loss(h, &head, None, targets.clone(), None, n),
                &values(n * d, 6),
                [n, d],
                &device,
            )
        };
        let (a, ga) = run();
        let (b, gb) = run();
        assert_eq!(a.to_bits(), b.to_bits());
        assert!(ga.iter().zip(&gb).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
