//! Bytes copied between host and device by trt-diff's own calls (buffer uploads and downloads, engine inputs and
//! outputs passed through host memory), counted so that a run can show what its GPU loop copies: `generate`
//! reports it per step and per token. Copies inside ONNX Runtime or TensorRT that trt-diff does not ask for are
//! not seen.
use std::sync::atomic::{AtomicU64, Ordering};

static HOST_TO_DEVICE: AtomicU64 = AtomicU64::new(0);
static DEVICE_TO_HOST: AtomicU64 = AtomicU64::new(0);

pub fn host_to_device(bytes: usize) {
    HOST_TO_DEVICE.fetch_add(bytes as u64, Ordering::Relaxed);
}

pub fn device_to_host(bytes: usize) {
    DEVICE_TO_HOST.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Totals since the process started; subtract two readings for what happened between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    pub host_to_device: u64,
    pub device_to_host: u64,
}

impl Transfers {
    pub fn now() -> Self {
        Transfers {
            host_to_device: HOST_TO_DEVICE.load(Ordering::Relaxed),
            device_to_host: DEVICE_TO_HOST.load(Ordering::Relaxed),
        }
    }

    /// What was copied since `earlier`.
    pub fn since(earlier: Transfers) -> Self {
        let now = Self::now();
        Transfers {
            host_to_device: now.host_to_device - earlier.host_to_device,
            device_to_host: now.device_to_host - earlier.device_to_host,
        }
    }

    pub fn total(&self) -> u64 {
        self.host_to_device + self.device_to_host
    }
}
