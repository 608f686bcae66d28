//! Choosing where training runs: a GPU through wgpu when the build has it and one is found,
//! otherwise burn's pure-Rust CPU backend (`flex`).

use burn::tensor::Device;

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
        let verdict = crate::probe::layer_against_cpu(&device);
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

#[cfg(not(feature = "wgpu"))]
fn gpu(_kind: GpuKind) -> Result<(Device, String), DeviceError> {
    Err(DeviceError::NoGpuBackend)
}
