//! A frozen base weight, held densely or in its file's blocks, and the projection `x · w`.
//!
//! A weight in blocks is dequantized for each use into a transient f32 matrix. Where `x` is
//! tracked by autodiff, burn's own matmul would keep that f32 matrix alive until the backward
//! pass (it saves its right operand whenever the left one is tracked), which would undo the
//! memory saving; [`project`] therefore records its own operation, [`DequantizedMatmul`],
//! whose state is the shared blocks and whose backward pass dequantizes them again to compute
//! the input's gradient (a frozen weight needs none of its own). Its forward and backward run
//! the very kernels burn's matmul runs on the same operands, so a base in blocks gives the bits
//! a dense base gives.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, Backend, DispatchAutodiffContext, DispatchKindConversion, DispatchTensor, Flex,
    TensorMetadata,
};
use burn::tensor::{Device, Tensor, TensorData};

use super::blocks::QuantizedMatrix;
use super::device_blocks::DeviceBlocks;

/// A frozen projection weight, applied as `x · w` with `w` `[in, out]`.
// A tensor handle is large (a dispatch enum); a model holds a few dozen of these.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// Values on the device, `[in, out]`.
    Dense(Tensor<2>),
    /// Blocks on the host, `[out, in]` as the file stores them; dequantized per use.
    Blocks(Arc<QuantizedMatrix>),
    /// Blocks on the device, `[out, in]`; dequantized there per use.
    DeviceBlocks(Arc<DeviceBlocks>),
}

impl FrozenWeight {
    /// The weight as a dense `[in, out]` tensor on `device` (a transient copy for one in blocks).
    pub fn to_dense(&self, device: &Device) -> Tensor<2> {
        match self {
            Self::Dense(w) => w.clone(),
            Self::Blocks(blocks) => dense_of(blocks, device),
            Self::DeviceBlocks(blocks) => blocks.dequantize().transpose(),
        }
    }

    /// `x · w` for `x` `[n, in]`.
    pub fn project(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Dense(w) => x.matmul(w.clone()),
            Self::Blocks(blocks) => project(x, blocks),
            Self::DeviceBlocks(blocks) => project_on_device(x, blocks),
        }
    }

    /// Bytes this weight holds (on the device when dense, on the host in blocks).
    pub fn byte_len(&self) -> usize {
        match self {
            Self::Dense(w) => w.shape().num_elements() * std::mem::size_of::<f32>(),
            Self::Blocks(blocks) => blocks.byte_len(),
            Self::DeviceBlocks(blocks) => blocks.byte_len(),
        }
    }
}

fn transposed_data(blocks: &QuantizedMatrix) -> TensorData {
    let (rows, cols) = blocks.dims();
    TensorData::new(blocks.dequantize_transposed(), [cols, rows])
}

/// The dense `[in, out]` weight as a plain (untracked) tensor on `device`.
fn dense_of(blocks: &QuantizedMatrix, device: &Device) -> Tensor<2> {
    Tensor::from_data(transposed_data(blocks), &device.clone().inner())
}

/// `x · w` for a weight in blocks; see the module's documentation.
pub fn project(x: Tensor<2>, blocks: &Arc<QuantizedMatrix>) -> Tensor<2> {
    let dispatch = x.into_dispatch();
    let tracked = matches!(dispatch.autodiff, DispatchAutodiffContext::Enabled(_));
    let x = Tensor::<2>::from_dispatch(dispatch);
    if tracked {
        if let Ok(primitive) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
            let out = record::<Flex>(primitive, blocks.clone());
            return Tensor::from_primitive::<Autodiff<Flex>>(out);
        }
        #[cfg(feature = "wgpu")]
        if let Ok(primitive) = x
            .clone()
            .try_into_primitive::<Autodiff<burn::backend::Cube>>()
        {
            let out = record::<burn::backend::Cube>(primitive, blocks.clone());
            return Tensor::from_primitive::<Autodiff<burn::backend::Cube>>(out);
        }
        // Another backend or checkpointing strategy: correct, but the graph keeps the
        // dequantized weight until the backward pass.
        tracing::debug!("projection through burn's matmul: no dequantizing op for this backend");
    }
    let device = x.device();
    x.matmul(dense_of(blocks, &device))
}

/// `x · w` for a weight in blocks on the device: as [`project`], with the weight dequantized
/// on the device (forward, and again in the backward pass) instead of on the host.
pub fn project_on_device(x: Tensor<2>, blocks: &Arc<DeviceBlocks>) -> Tensor<2> {
    let dispatch = x.into_dispatch();
    let tracked = matches!(dispatch.autodiff, DispatchAutodiffContext::Enabled(_));
    let x = Tensor::<2>::from_dispatch(dispatch);
    if tracked {
        if let Ok(primitive) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
            if let Some(out) = record_on_device::<Flex>(primitive, blocks.clone()) {
                return Tensor::from_primitive::<Autodiff<Flex>>(out);
            }
        }
        #[cfg(feature = "wgpu")]
        if let Ok(primitive) = x
            .clone()
            .try_into_primitive::<Autodiff<burn::backend::Cube>>()
        {
            if let Some(out) = record_on_device::<burn::backend::Cube>(primitive, blocks.clone()) {
                return Tensor::from_primitive::<Autodiff<burn::backend::Cube>>(out);
            }
        }
        tracing::debug!("projection through burn's matmul: no dequantizing op for this backend");
    }
    x.matmul(blocks.dequantize().transpose())
}

/// Records `x · w` on `B`'s autodiff graph with the device blocks as the backward pass's
/// state; `None` when the blocks are not on `B`.
fn record_on_device<B: Backend>(
    x: FloatTensor<Autodiff<B>>,
    blocks: Arc<DeviceBlocks>,
) -> Option<FloatTensor<Autodiff<B>>>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let w = blocks
        .dequantize()
        .transpose()
        .try_into_primitive::<B>()
        .ok()?;
    RECORDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (x, node) = x.into_parts();
    let out = B::float_matmul(x, w);
    Some(
        match DeviceDequantizedMatmul
            .prepare::<NoCheckpointing>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(blocks, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    )
}

/// The backward pass of `x · w` for a weight in device blocks: `dx = dy · wᵀ`, with `w`
/// dequantized again on the device.
#[derive(Debug)]
struct DeviceDequantizedMatmul;

impl<B: Backend> Backward<B, 1> for DeviceDequantizedMatmul
where
    DispatchTensor: DispatchKindConversion<B>,
{
    type State = Arc<DeviceBlocks>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let blocks = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            // `[out, in]` as dequantized: the transpose of the forward pass's weight.
            let w = blocks
                .dequantize()
                .try_into_primitive::<B>()
                .unwrap_or_else(|_| unreachable!("the forward pass found the blocks on B"));
            B::float_matmul(grad, w)
        });
    }
}

/// Projections recorded by [`record`], in this process.
static RECORDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many tracked projections through a weight in blocks ran as the dequantizing op (and not
/// through burn's matmul, which keeps the dequantized weight in the graph): for tests.
pub fn recorded_projections() -> usize {
    RECORDED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Records `x · w` on `B`'s autodiff graph with the blocks as the backward pass's state.
fn record<B: Backend>(
    x: FloatTensor<Autodiff<B>>,
    blocks: Arc<QuantizedMatrix>,
) -> FloatTensor<Autodiff<B>> {
    RECORDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let device = x.primitive().device();
    let (x, node) = x.into_parts();
    let w = B::float_from_data(transposed_data(&blocks), &device);
    let out = B::float_matmul(x, w);
    match DequantizedMatmul
        .prepare::<NoCheckpointing>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(Dequantize { blocks, device }, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// The backward pass of `x · w` for a weight in blocks: `dx = dy · wᵀ`, with `w` dequantized
/// again.
#[derive(Debug)]
struct DequantizedMatmul;

/// What [`DequantizedMatmul`] keeps for the backward pass: the blocks (shared, not copied).
#[derive(Debug, Clone)]
struct Dequantize<D> {
    blocks: Arc<QuantizedMatrix>,
    device: D,
}

impl<B: Backend> Backward<B, 1> for DequantizedMatmul {
    type State = Dequantize<B::Device>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let Dequantize { blocks, device } = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            // `[out, in]` as stored: the transpose burn's matmul backward takes of the dense
            // `[in, out]` weight, without transposing twice (gemm packs either the same way).
            let (rows, cols) = blocks.dims();
            let w = TensorData::new(blocks.dequantize(), [rows, cols]);
            B::float_matmul(grad, B::float_from_data(w, &device))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize_q5_0, TensorType};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_values::uniform(n, seed, 1.0)
    }

    fn bits(t: Tensor<2>) -> Vec<u32> {
        t.into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    #[test]
    fn blocks_project_with_the_bits_of_the_dense_weight_forward_and_backward() {
        // The bits are a CPU backend's promise (a GPU's autotuned kernels may differ by call).
        let device = Device::flex();
        let (out, inp, n) = (48, 64, 5);
        let encoded = quantize_q5_0(&values(out * inp, 1));
        let blocks = Arc::new(
            QuantizedMatrix::new(Arc::new(encoded), 0, TensorType::Q5_0, out, inp).unwrap(),
        );
        let dense = FrozenWeight::Dense(dense_of(&blocks, &device));
        let quantized = FrozenWeight::Blocks(blocks);
        let x = Tensor::<2>::from_data(TensorData::new(values(n * inp, 2), [n, inp]), &device);
        let a = Tensor::<2>::from_data(TensorData::new(values(inp * inp, 3), [inp, inp]), &device);
        let upstream =
            Tensor::<2>::from_data(TensorData::new(values(n * out, 4), [n, out]), &device);

        // Untracked: a plain product.
        assert_eq!(
            bits(dense.project(x.clone())),
            bits(quantized.project(x.clone()))
        );

        // Tracked through a trainable factor before the projection.
        let run = |weight: &FrozenWeight| {
            let leaf = a.clone().autodiff().require_grad();
            let y = weight.project(x.clone().matmul(leaf.clone()));
            let loss = (y.clone() * upstream.clone()).sum();
            let grads = loss.backward();
            (bits(y.detach().inner()), bits(leaf.grad(&grads).unwrap()))
        };
        let (dense_y, dense_grad) = run(&dense);
        let recorded = RECORDED.load(std::sync::atomic::Ordering::Relaxed);
        let (blocks_y, blocks_grad) = run(&quantized);
        assert!(RECORDED.load(std::sync::atomic::Ordering::Relaxed) > recorded);
        assert_eq!(dense_y, blocks_y);
        assert_eq!(dense_grad, blocks_grad);
        assert!(blocks_grad.iter().any(|b| *b != 0));
    }
}
