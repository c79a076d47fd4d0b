//! Receives TensorRT's log and builder progress from C++: log lines go to `tracing` by severity (target
//! "tensorrt"), progress phases become progress bars, the streamed plan is hashed on the way to disk.
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;

pub struct BuildObserver {
    errors: Mutex<Vec<String>>,
    bars: Mutex<HashMap<String, ProgressBar>>,
    multi: MultiProgress,
    plan_hash: Mutex<Sha256>,
}

impl BuildObserver {
    pub fn new(show_progress: bool) -> Self {
        let target = if show_progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            errors: Mutex::new(Vec::new()),
            bars: Mutex::new(HashMap::new()),
            multi: MultiProgress::with_draw_target(target),
            plan_hash: Mutex::new(Sha256::new()),
        }
    }

    /// Error-severity messages TensorRT logged, for the final error report.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn plan_sha256(&self) -> String {
        let h = self.plan_hash.lock().map(|h| h.clone()).unwrap_or_default();
        crate::fsutil::hex(&h.finalize())
    }

    // Called from C++ (see ffi.rs). None of these may panic: a panic across the bridge aborts.
    pub(crate) fn log(&self, severity: i32, msg: &str) {
        match severity {
            0 | 1 => {
                tracing::error!(target: "tensorrt", "{msg}");
                if let Ok(mut e) = self.errors.lock() {
                    e.push(msg.to_string());
                }
            }
            2 => tracing::warn!(target: "tensorrt", "{msg}"),
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
        if let Ok(mut h) = self.plan_hash.lock() {
            h.update(data);
        }
    }
}
