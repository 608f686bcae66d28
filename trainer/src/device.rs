//! Choosing where training runs: a GPU through wgpu when the build has it and one is found,
//! otherwise burn's pure-Rust CPU backend (`flex`).

use burn::tensor::{Device, Tensor};

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// The GPU when one works, else the CPU.
    #[default]
    Auto,
    /// burn's wgpu backend (Vulkan, Metal, DX12); fails when the build lacks it or no GPU works.
    Gpu,
    /// burn's CPU backend.
    Cpu,
}

/// A device that could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The GPU backend is not compiled in.
    #[error(
        "this build has no GPU backend (built with --no-default-features; rebuild without it)"
    )]
    NoGpuBackend,
    /// The GPU backend found no working device.
    #[error("no working GPU: {0}")]
    NoGpu(String),
}

/// The chosen device and a line describing it.
///
/// `Auto` takes a hardware GPU (discrete, then integrated) and otherwise the CPU backend: a
/// software Vulkan driver such as lavapipe works (the tests run on it) but is slower than burn's
/// own CPU backend. `Gpu` takes whatever adapter wgpu prefers, software ones included.
pub fn select(choice: BackendChoice) -> Result<(Device, String), DeviceError> {
    match choice {
        BackendChoice::Cpu => Ok(cpu()),
        BackendChoice::Gpu => gpu(GpuKind::Any),
        BackendChoice::Auto => {
            let mut why: Vec<String> = Vec::new();
            for kind in [GpuKind::Discrete, GpuKind::Integrated] {
                match gpu(kind) {
                    Ok(found) => return Ok(found),
                    Err(error) => {
                        let error = error.to_string();
                        if !why.contains(&error) {
                            why.push(error);
                        }
                    }
                }
            }
            tracing::info!("no hardware GPU ({}); using the CPU", why.join("; "));
            Ok(cpu())
        }
    }
}

/// The backend behind `device`, for reports: `burn wgpu` or `burn flex`.
pub fn backend_name(device: &Device) -> &'static str {
    if format!("{device:?}").contains("Wgpu") {
        "burn wgpu"
    } else {
        "burn flex"
    }
}

/// Which wgpu adapters to accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GpuKind {
    Discrete,
    Integrated,
    /// wgpu's preferred adapter, whatever it is (a software driver included).
    Any,
}

fn cpu() -> (Device, String) {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    (
        Device::flex(),
        format!("cpu (burn flex, {threads} threads)"),
    )
}

#[cfg(feature = "wgpu")]
fn gpu(kind: GpuKind) -> Result<(Device, String), DeviceError> {
    use burn::tensor::DeviceKind;
    let device_kind = match kind {
        GpuKind::Discrete => DeviceKind::DiscreteGpu(0),
        GpuKind::Integrated => DeviceKind::IntegratedGpu(0),
        GpuKind::Any => DeviceKind::DefaultDevice,
    };
    // wgpu panics when no such adapter exists; the probe also catches a driver that computes
    // wrongly at training shapes, here rather than in the first training step. The panic message
    // is not an error for the user, so the hook is silenced meanwhile.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        let device = Device::wgpu(device_kind);
        let verdict = probe_against_cpu(&device);
        (device, verdict)
    });
    std::panic::set_hook(hook);
    match probe {
        Ok((device, Ok(()))) => {
            let name = format!("gpu (burn wgpu, {kind:?} adapter)");
            Ok((device, name))
        }
        Ok((_, Err(what))) => Err(DeviceError::NoGpu(format!("{kind:?} adapter: {what}"))),
        Err(_) => Err(DeviceError::NoGpu(format!("no {kind:?} adapter"))),
    }
}

/// Runs a training step's kinds of work on `device` and on the CPU backend and compares them:
/// a `[512, 576] × [576, 1536]` matmul (the row counts at which some drivers have been reported
/// to multiply wrongly) with its input gradient, and causal attention over 9 heads of 128
/// positions with its query gradient. Differences above 1e-3 of the largest value are errors.
pub fn probe_against_cpu(device: &Device) -> Result<(), String> {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::TensorData;
    let mut rng = tributary_shared::config::SplitMix64(0x7072_6f62_6500);
    let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_unit() - 0.5).collect() };
    let (m, k, n) = (512, 576, 1536);
    let (a, b, weights) = (values(m * k), values(k * n), values(m * n));
    let (heads, len, dim) = (9, 128, 64);
    let (q, kk, v) = (
        values(heads * len * dim),
        values(heads * len * dim),
        values(heads * len * dim),
    );
    let run = |device: &Device| -> Vec<Vec<f32>> {
        let matrix = |data: &[f32], shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(data.to_vec(), shape), device)
        };
        let a = matrix(&a, [m, k]).autodiff().require_grad();
        let product = a.clone().matmul(matrix(&b, [k, n]));
        let loss = (product.clone() * matrix(&weights, [m, n]).autodiff()).sum();
        let grads = loss.backward();
        let a_grad = a.grad(&grads).map(|g| g.into_data());
        let heads_of = |data: &[f32]| {
            Tensor::<4>::from_data(TensorData::new(data.to_vec(), [1, heads, len, dim]), device)
        };
        let query = heads_of(&q).autodiff().require_grad();
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let out = attention(
            query.clone(),
            heads_of(&kk).autodiff(),
            heads_of(&v).autodiff(),
            None,
            None,
            options,
        );
        let grads = (out.clone() * out.clone()).sum().backward();
        let q_grad = query.grad(&grads).map(|g| g.into_data());
        let read = |data: Option<TensorData>| {
            data.and_then(|d| d.convert::<f32>().try_to_vec::<f32>().ok())
                .unwrap_or_default()
        };
        vec![
            read(Some(product.detach().inner().into_data())),
            read(a_grad),
            read(Some(out.detach().inner().into_data())),
            read(q_grad),
        ]
    };
    compare_probe(&run(device), &run(&Device::flex()))
}

/// The probe's verdict on the device's results against the CPU's, in the probe's order.
fn compare_probe(gpu: &[Vec<f32>], cpu: &[Vec<f32>]) -> Result<(), String> {
    for (what, (g, c)) in [
        "matmul",
        "matmul gradient",
        "attention",
        "attention gradient",
    ]
    .iter()
    .zip(gpu.iter().zip(cpu))
    {
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        // A NaN anywhere is as wrong as it gets (`f32::max` would skip it).
        let worst = g.iter().zip(c).fold(0f32, |m, (a, b)| {
            let d = (a - b).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                m.max(d)
            }
        });
        if g.len() != c.len() || c.is_empty() || !scale.is_finite() || worst > 1e-3 * scale {
            return Err(format!(
                "probe {what} differs from the CPU backend by {worst} (largest value {scale})"
            ));
        }
    }
    Ok(())
}

#[cfg(not(feature = "wgpu"))]
fn gpu(_kind: GpuKind) -> Result<(Device, String), DeviceError> {
    Err(DeviceError::NoGpuBackend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_passes_a_correct_device_and_names_a_wrong_result() {
        // The CPU backend against itself: the probe's own arithmetic agrees.
        assert_eq!(probe_against_cpu(&Device::flex()), Ok(()));
        let right = vec![vec![1.0, -2.0, 4.0]; 4];
        assert_eq!(compare_probe(&right, &right), Ok(()));
        let mut wrong = right.clone();
        wrong[1][2] = 4.01;
        let error = compare_probe(&wrong, &right).unwrap_err();
        assert!(error.contains("matmul gradient"), "{error}");
        let mut empty = right.clone();
        empty[3].clear();
        assert!(compare_probe(&empty, &right).is_err());
        let mut nan = right.clone();
        nan[0][0] = f32::NAN;
        assert!(compare_probe(&nan, &right).is_err());
    }
}
