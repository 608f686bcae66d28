//! Choosing where training runs: a GPU through wgpu when the build has it and one is found,
//! otherwise burn's pure-Rust CPU backend (`flex`).

use burn::tensor::Device;
#[cfg(feature = "wgpu")]
use burn::tensor::Tensor;

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
    #[error("this build has no GPU backend (rebuild with `--features wgpu`)")]
    NoGpuBackend,
    /// The GPU backend found no working device.
    #[error("no working GPU: {0}")]
    NoGpu(String),
}

/// The chosen device and a line describing it.
pub fn select(choice: BackendChoice) -> Result<(Device, String), DeviceError> {
    match choice {
        BackendChoice::Cpu => Ok(cpu()),
        BackendChoice::Gpu => gpu(),
        BackendChoice::Auto => Ok(gpu().unwrap_or_else(|error| {
            tracing::info!("{error}; using the CPU");
            cpu()
        })),
    }
}

fn cpu() -> (Device, String) {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    (
        Device::flex(),
        format!("cpu (burn flex, {threads} threads)"),
    )
}

#[cfg(feature = "wgpu")]
fn gpu() -> Result<(Device, String), DeviceError> {
    // wgpu panics when no adapter exists; probe with a small matmul so a broken driver is caught
    // here rather than in the first training step.
    let probe = std::panic::catch_unwind(|| {
        let device = Device::wgpu(Default::default());
        let a = Tensor::<2>::ones([8, 8], &device);
        let sum: f32 = a.clone().matmul(a).sum().into_scalar();
        (device, sum)
    });
    match probe {
        Ok((device, sum)) if (sum - 512.0).abs() < 1e-3 => {
            let name = format!("gpu (burn wgpu, {device:?})");
            Ok((device, name))
        }
        Ok((_, sum)) => Err(DeviceError::NoGpu(format!(
            "probe matmul gave {sum}, expected 512"
        ))),
        Err(_) => Err(DeviceError::NoGpu(
            "the wgpu backend panicked while starting".into(),
        )),
    }
}

#[cfg(not(feature = "wgpu"))]
fn gpu() -> Result<(Device, String), DeviceError> {
    Err(DeviceError::NoGpuBackend)
}
