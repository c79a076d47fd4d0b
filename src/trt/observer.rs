//! Receives TensorRT's log and builder progress from C++: log lines go to `tracing` by severity (target
//! "tensorrt"), progress phases become progress bars, the streamed plan is hashed on the way to disk.
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::sync::Mutex;

pub struct BuildObserver {
    errors: Mutex<Vec<String>>,
    warnings: Mutex<Vec<String>>,
    /// Without a GPU, TensorRT-RTX logs CUDA-runtime errors from probes it recovers from; those are kept quiet
    /// (debug level) and only reported if the build fails.
    gpu_present: bool,
    bars: Mutex<HashMap<String, ProgressBar>>,
    multi: MultiProgress,
    plan_hash: Mutex<xxhash_rust::xxh3::Xxh3>,
    plan_hash_nanos: std::sync::atomic::AtomicU64,
}

impl BuildObserver {
    pub fn new(show_progress: bool, gpu_present: bool) -> Self {
        let target = if show_progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            errors: Mutex::new(Vec::new()),
            warnings: Mutex::new(Vec::new()),
            gpu_present,
            bars: Mutex::new(HashMap::new()),
            multi: MultiProgress::with_draw_target(target),
            plan_hash: Mutex::new(xxhash_rust::xxh3::Xxh3::new()),
            plan_hash_nanos: Default::default(),
        }
    }

    /// Error-severity messages TensorRT logged, for the final error report.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Warning-severity messages TensorRT logged.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn plan_xxh3(&self) -> String {
        match self.plan_hash.lock() {
            Ok(h) => crate::fsutil::xxh3_hex(&h),
            Err(_) => String::new(),
        }
    }

    // Called from C++ (see ffi.rs). None of these may panic: a panic across the bridge aborts.
    pub(crate) fn log(&self, severity: i32, msg: &str) {
        match severity {
            0 | 1 => {
                if !self.gpu_present && is_no_cuda_message(msg) {
                    tracing::debug!(target: "tensorrt", "{msg}");
                } else {
                    tracing::error!(target: "tensorrt", "{msg}");
                }
                if let Ok(mut e) = self.errors.lock() {
                    e.push(msg.to_string());
                }
            }
            2 => {
                tracing::warn!(target: "tensorrt", "{msg}");
                if let Ok(mut w) = self.warnings.lock() {
                    w.push(msg.to_string());
                }
            }
            3 => tracing::debug!(target: "tensorrt", "{msg}"),
            _ => tracing::trace!(target: "tensorrt", "{msg}"),
        }
    }

    pub(crate) fn phase_start(&self, parent: &str, phase: &str, steps: i32) {
        tracing::debug!(target: "tensorrt", "phase '{phase}' started ({steps} steps, parent '{parent}')");
        let bar = self.multi.add(ProgressBar::new(steps.max(0) as u64));
        let style =
            ProgressStyle::with_template("{spinner} {msg:40} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_message(phase.to_string());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(phase.to_string(), bar);
        }
    }

    pub(crate) fn step_complete(&self, phase: &str, step: i32) -> bool {
        if let Ok(bars) = self.bars.lock()
            && let Some(bar) = bars.get(phase)
        {
            bar.set_position(step.max(0) as u64 + 1);
        }
        true
    }

    pub(crate) fn phase_finish(&self, phase: &str) {
        tracing::debug!(target: "tensorrt", "phase '{phase}' finished");
        if let Ok(mut bars) = self.bars.lock()
            && let Some(bar) = bars.remove(phase)
        {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }

    pub(crate) fn plan_chunk(&self, data: &[u8]) {
        let t = std::time::Instant::now();
        if let Ok(mut h) = self.plan_hash.lock() {
            h.update(data);
        }
        let ns = t.elapsed().as_nanos() as u64;
        self.plan_hash_nanos
            .fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// Time spent hashing the plan inside TensorRT's write callbacks (ours, not TensorRT's).
    pub fn plan_hash_seconds(&self) -> f64 {
        self.plan_hash_nanos
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            * 1e-9
    }
}

/// TensorRT's log from the runtime (no build in progress).
pub(crate) fn runtime_log(severity: i32, msg: &str) {
    match severity {
        0 | 1 => tracing::error!(target: "tensorrt", "{msg}"),
        2 => tracing::warn!(target: "tensorrt", "{msg}"),
        3 => tracing::debug!(target: "tensorrt", "{msg}"),
        _ => tracing::trace!(target: "tensorrt", "{msg}"),
    }
}

/// TensorRT's messages for "no usable CUDA driver/device".
pub fn is_no_cuda_message(msg: &str) -> bool {
    msg.contains("cudaError 35")
        || msg.contains("CUDA driver version is insufficient")
        || msg.contains("CHECK(status == CUDA_SUCCESS)")
        || msg.contains("cudaError 100")
}
