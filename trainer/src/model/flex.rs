//! The CPU backend's host memory, for the trainer's fused operations ([`super::norm`],
//! [`super::swiglu`]).

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

/// Contiguous f32 values of `t`, if it has them.
pub(crate) fn f32_values(t: &FlexTensor) -> Option<&[f32]> {
    if t.dtype() != DType::F32 {
        return None;
    }
    t.as_slice::<f32>()
}

/// `t` with contiguous f32 values (a gradient handed to a backward pass may be a view).
pub(crate) fn contiguous_f32(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() && t.dtype() == DType::F32 {
        t
    } else {
        t.to_contiguous()
    }
}
