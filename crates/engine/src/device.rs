//! Where the model runs and in which precision.
//!
//! MLX's CPU backend is several times slower with bf16 activations than with float32 (measured on the
//! project's x86_64 machines: 0.07 vs 0.45 tok/s on an E2B-shaped 4-bit model), while on Apple GPUs bf16
//! halves memory traffic. So the compute dtype is chosen per device, and `jemma doctor` reports the choice.

use mlx_rs::{Device, Dtype};
use serde::Serialize;

use crate::Result;

/// The kind of device MLX computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// MLX's CPU backend (x86_64 Linux here, or a Mac forced to CPU).
    Cpu,
    /// Metal on Apple Silicon.
    Gpu,
}

impl DeviceKind {
    /// The MLX device handle for this kind.
    pub fn device(self) -> Device {
        match self {
            DeviceKind::Cpu => Device::cpu(),
            DeviceKind::Gpu => Device::gpu(),
        }
    }

    /// The activation dtype the engine uses on this device unless told otherwise.
    pub fn default_compute_dtype(self) -> Dtype {
        match self {
            DeviceKind::Cpu => Dtype::Float32,
            DeviceKind::Gpu => Dtype::Bfloat16,
        }
    }
}

/// Whether MLX was built with a usable Metal device (false on the Linux CPU build).
pub fn metal_available() -> bool {
    let mut available = false;
    // SAFETY: mlx_metal_is_available only writes the bool it is given.
    let status = unsafe { mlx_sys::mlx_metal_is_available(&mut available) };
    status == 0 && available
}

/// The MLX library version linked into this binary (e.g. "0.32.2").
pub fn mlx_version() -> String {
    // SAFETY: the string handle is created, filled by mlx_version and freed here; the data pointer is
    // copied before the free.
    unsafe {
        let mut s = mlx_sys::mlx_string_new();
        let out = if mlx_sys::mlx_version(&mut s) == 0 {
            let data = mlx_sys::mlx_string_data(s);
            if data.is_null() {
                String::from("unknown")
            } else {
                std::ffi::CStr::from_ptr(data)
                    .to_string_lossy()
                    .into_owned()
            }
        } else {
            String::from("unknown")
        };
        mlx_sys::mlx_string_free(s);
        out
    }
}

/// Picks the device: `JEMMA_DEVICE=cpu|gpu` if set, else the GPU when Metal is available, else the CPU.
pub fn select_device() -> Result<DeviceKind> {
    match std::env::var("JEMMA_DEVICE").ok().as_deref() {
        Some("cpu") => Ok(DeviceKind::Cpu),
        Some("gpu") if metal_available() => Ok(DeviceKind::Gpu),
        Some("gpu") => Err(crate::EngineError::Unsupported(
            "JEMMA_DEVICE=gpu but this MLX build has no Metal device".into(),
        )),
        Some(other) if !other.is_empty() => Err(crate::EngineError::Unsupported(format!(
            "JEMMA_DEVICE={other}: expected cpu or gpu"
        ))),
        _ if metal_available() => Ok(DeviceKind::Gpu),
        _ => Ok(DeviceKind::Cpu),
    }
}

/// MLX's allocator figures, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MlxMemory {
    /// Bytes held by live arrays.
    pub active_bytes: u64,
    /// Highest `active_bytes` since the last reset.
    pub peak_bytes: u64,
    /// Bytes kept in MLX's buffer cache for reuse.
    pub cache_bytes: u64,
}

/// Reads MLX's memory counters (zeros if MLX cannot report them).
pub fn mlx_memory() -> MlxMemory {
    use mlx_rs::memory;
    MlxMemory {
        active_bytes: memory::active_memory().unwrap_or(0) as u64,
        peak_bytes: memory::peak_memory().unwrap_or(0) as u64,
        cache_bytes: memory::cache_memory().unwrap_or(0) as u64,
    }
}

/// Resident set size of this process in bytes (0 if the OS will not say).
pub fn process_rss_bytes() -> u64 {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let pid = Pid::from_u32(std::process::id());
    let mut sys = System::new();
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_memory(),
    );
    sys.process(pid).map(|p| p.memory()).unwrap_or(0)
}

/// A summary of the MLX runtime for `jemma doctor` and `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct MlxInfo {
    /// Linked MLX version.
    pub mlx_version: String,
    /// Whether Metal is usable.
    pub metal_available: bool,
    /// The device the engine will use.
    pub device: DeviceKind,
    /// The activation dtype used on that device.
    pub compute_dtype: String,
}

/// Describes the MLX runtime as the engine would use it.
pub fn mlx_info() -> Result<MlxInfo> {
    let device = select_device()?;
    Ok(MlxInfo {
        mlx_version: mlx_version(),
        metal_available: metal_available(),
        device,
        compute_dtype: format!("{:?}", device.default_compute_dtype()).to_lowercase(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::{Array, ops, with_device};

    /// Proves the MLX build links and computes: a matmul on the CPU device, checked against hand-computed
    /// values (a wrong link, missing symbol or broken backend fails here first).
    #[test]
    fn matmul_runs_on_cpu_device() {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let b = Array::from_slice(&[7.0f32, 8.0, 9.0, 10.0, 11.0, 12.0], &[3, 2]);
        let c = with_device(Device::cpu(), || ops::matmul(&a, &b)).unwrap();
        c.eval().unwrap();
        assert_eq!(c.shape(), &[2, 2]);
        assert_eq!(c.as_slice::<f32>(), &[58.0, 64.0, 139.0, 154.0]);
    }

    #[test]
    fn version_is_the_pinned_mlx() {
        assert_eq!(mlx_version(), "0.32.2");
    }

    #[test]
    fn cpu_computes_in_float32() {
        assert_eq!(DeviceKind::Cpu.default_compute_dtype(), Dtype::Float32);
        assert_eq!(DeviceKind::Gpu.default_compute_dtype(), Dtype::Bfloat16);
    }
}
