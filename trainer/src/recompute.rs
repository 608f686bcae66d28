//! Gradient checkpointing by decoder layer: the forward pass keeps only each layer's input
//! (each layer's graph is dropped once its output is read); the backward pass then goes from
//! the top layer down, rebuilding one layer's graph at a time from its input and pulling the
//! gradient arriving at its output back through it. Memory holds the layer inputs
//! (`layers × tokens × hidden` floats) and one layer's activations, instead of every layer's;
//! the price is one more forward pass.
//!
//! Each layer is rebuilt from the same input, with the same dropout masks (the generator's
//! state is saved per layer), as the same graph the full pass builds (inputs and factors
//! tracked alike, since burn runs some operations on untracked tensors with other kernels),
//! and fed the same upstream gradient (`Σ out ⊙ upstream` has gradient `upstream`, exactly):
//! the losses and gradients are the bits of the full pass, so a trainer's choice does not
//! change what its result verifies against.

use burn::tensor::{Gradients, Int, Tensor};
use tributary_shared::config::SplitMix64;

use crate::lora::LoraAdapter;
use crate::model::Llama;

/// Each leaf's gradient in `gradients`, zero for a leaf the loss does not depend on.
pub fn gradients_of(leaves: &[Tensor<2>], gradients: &Gradients) -> Vec<Tensor<2>> {
    leaves
        .iter()
        .map(|leaf| {
            leaf.grad(gradients)
                .unwrap_or_else(|| leaf.clone().inner().zeros_like())
        })
        .collect()
}

/// The loss of `inputs` (`[batch, len]`) and its gradient with respect to the adapter's
/// trainable factors `params` (in [`LoraAdapter::trainable`]'s order), recomputing each layer's
/// activations during the backward pass. `head` turns the final normalised hidden states into
/// the loss (differentiable with respect to them).
pub fn loss_and_gradients(
    model: &Llama,
    adapter: &LoraAdapter,
    params: &[Tensor<2>],
    inputs: Tensor<2, Int>,
    dropout: f64,
    dropout_seed: u64,
    head: impl FnOnce(Tensor<2>) -> Tensor<1>,
) -> (Tensor<1>, Vec<Tensor<2>>) {
    let [batch, len] = inputs.dims();
    // Layer `index` on `input` (a plain tensor), with dropout drawn from `rng`: its output and
    // what its gradients are read from. The layer runs as the full pass runs it (input and
    // factors tracked), so its values are the full pass's bits: burn computes some operations
    // on untracked tensors with other kernels (attention, for one).
    let run_layer = |index: usize, input: Tensor<2>, rng: SplitMix64| {
        let leaves: Vec<Tensor<2>> = params
            .iter()
            .map(|p| p.clone().autodiff().require_grad())
            .collect();
        let tensors = adapter.with_leaves(&leaves, dropout, 0);
        *tensors.dropout_rng.borrow_mut() = rng;
        // The first layer's input is the embeddings, a constant, as in the full pass.
        let input = if index == 0 {
            input
        } else {
            input.autodiff().require_grad()
        };
        let out = model.decoder_layer(index, input.clone(), Some(&tensors), None, batch, len, 0);
        let rng = tensors.dropout_rng.borrow().clone();
        (out, input, leaves, rng)
    };

    // Forward: each layer's graph is dropped as soon as its output is read.
    let mut rng = SplitMix64(dropout_seed);
    let mut x = model.embed(inputs.reshape([batch * len]));
    let mut saved = Vec::with_capacity(model.num_layers());
    for index in 0..model.num_layers() {
        saved.push((x.clone(), rng.clone()));
        let (out, _, _, next) = run_layer(index, x, rng);
        (x, rng) = (out.inner(), next);
        sweep_dropped_graphs(model);
    }

    // The head: the loss and its gradient at the last layer's output.
    let top = x.autodiff().require_grad();
    let loss = head(model.final_norm(top.clone()));
    let gradients = loss.backward();
    let mut upstream = top
        .grad(&gradients)
        .unwrap_or_else(|| top.clone().inner().zeros_like());
    let loss = loss.detach();

    // Down the layers, one graph at a time.
    let mut grads: Vec<Option<Tensor<2>>> = vec![None; params.len()];
    for index in (0..model.num_layers()).rev() {
        let (input, rng) = saved.pop().expect("one saved input per layer");
        let (out, input, leaves, _) = run_layer(index, input, rng);
        let gradients = (out * upstream).sum().backward();
        for (slot, leaf) in grads.iter_mut().zip(&leaves) {
            if let Some(grad) = leaf.grad(&gradients) {
                *slot = Some(grad);
            }
        }
        upstream = match input.grad(&gradients) {
            Some(grad) => grad,
            None => input.inner().zeros_like(),
        };
    }
    let grads = grads
        .into_iter()
        .zip(params)
        .map(|(grad, param)| grad.unwrap_or_else(|| param.zeros_like()))
        .collect();
    (loss, grads)
}

/// Frees the graphs no tensor refers to any more. burn's autodiff only sweeps them during a
/// backward pass, so without this every layer's graph from the forward pass (with the
/// activations it saved) would live until the head's backward pass: all of them at once, the
/// memory this module exists to save. A backward pass through a one-element leaf does the sweep.
fn sweep_dropped_graphs(model: &Llama) {
    let probe = Tensor::<1>::zeros([1], model.device())
        .autodiff()
        .require_grad();
    let _ = probe.sum().backward();
}
