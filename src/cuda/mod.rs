//! CUDA through cudarc (driver API, loaded dynamically): a machine without a driver gets an error value, never a
//! panic. `query` says what GPUs exist; `device` holds the kernels run between engine calls; `host` the same
//! operations on host buffers; `transfers` counts what crosses between them.
pub mod buffer;
pub mod device;
pub mod host;
pub mod transfers;

use cudarc::driver::{result, sys};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct GpuInfo {
    pub ordinal: i32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: u64,
}

impl GpuInfo {
    /// "sm90", "sm120", ... as TensorRT-RTX targets are named.
    pub fn sm(&self) -> String {
        format!(
            "sm{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CudaReport {
    /// The driver's CUDA version, e.g. "13.0".
    pub driver_cuda_version: String,
    pub gpus: Vec<GpuInfo>,
}

/// Queries the driver without creating contexts. `Err` explains why no GPU can be used (no driver, init failed).
pub fn query() -> Result<CudaReport, String> {
    // SAFETY: only probes whether libcuda can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err("no NVIDIA driver (libcuda.so not found)".into());
    }
    result::init().map_err(|e| format!("the NVIDIA driver failed to initialise: {e}"))?;
    let mut version = 0;
    // SAFETY: a plain out-parameter call after cuInit succeeded.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion failed: {e}"))?;
    let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
    let mut gpus = Vec::new();
    for ordinal in 0..count {
        let dev = result::device::get(ordinal).map_err(|e| e.to_string())?;
        let attr = |a| unsafe { result::device::get_attribute(dev, a) }.unwrap_or(0);
        gpus.push(GpuInfo {
            ordinal,
            name: result::device::get_name(dev).unwrap_or_else(|_| "?".into()),
            compute_capability: (
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            ),
            // SAFETY: dev comes from cuDeviceGet.
            memory_bytes: unsafe { result::device::total_mem(dev) }.unwrap_or(0) as u64,
        });
    }
    Ok(CudaReport {
        driver_cuda_version: format!("{}.{}", version / 1000, (version % 1000) / 10),
        gpus,
    })
}
