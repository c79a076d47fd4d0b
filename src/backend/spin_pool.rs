//! A tiny fork-join pool for the CPU decoder's 16-bit MatMul: the calling thread works too, and helpers spin
//! briefly after each job before sleeping. Decoding one token runs ~170 matrix products of a few hundred
//! microseconds each; waking sleeping threads for every one of them (rayon, or ONNX Runtime's pool without
//! spinning) costs as much as the products, while spinning forever (ONNX Runtime's default, llama.cpp) collapses
//! when other processes share the cores. Here helpers spin for `SPIN` after their last task, then park.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

const SPIN: Duration = Duration::from_micros(300);
/// State word: generation (24 bits) | task count (20 bits) | next task (20 bits).
const FIELD: u64 = 1 << 20;

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    state: AtomicU64,
    /// The current job's closure (a `*const Task` erased to usize); valid while any of its tasks is unfinished.
    job: AtomicUsize,
    done: AtomicUsize,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

pub struct SpinPool {
    shared: &'static Shared,
    /// One job at a time; a second caller runs its tasks alone.
    submit: Mutex<()>,
    helpers: usize,
}

fn split(s: u64) -> (u64, usize, usize) {
    (
        s / (FIELD * FIELD),
        ((s / FIELD) % FIELD) as usize,
        (s % FIELD) as usize,
    )
}

impl Shared {
    /// Claims and runs tasks of the job published as `state` until none is left; true if it ran any.
    fn work(&self) -> bool {
        let mut ran = false;
        loop {
            let s = self.state.load(Ordering::Acquire);
            let (_, tasks, next) = split(s);
            if next >= tasks {
                return ran;
            }
            if self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            // SAFETY: the claimed task is unfinished, so the job (published before `state`) is still alive.
            let f = unsafe { &*(self.job.load(Ordering::Acquire) as *const Task) };
            f(next);
            self.done.fetch_add(1, Ordering::Release);
            ran = true;
        }
    }

    fn helper(&self) {
        let mut last = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.work() {
                last = Instant::now();
                continue;
            }
            // The clock is read every 64 spins (a few microseconds), not on each.
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || last.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut sleepers = self.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            let (_, tasks, next) = split(self.state.load(Ordering::Acquire));
            if next < tasks {
                continue;
            }
            *sleepers += 1;
            let mut s = self.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
            *s -= 1;
            last = Instant::now();
        }
    }
}

impl SpinPool {
    /// The process-wide pool: one helper per further core.
    pub fn global() -> &'static SpinPool {
        static POOL: OnceLock<SpinPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let helpers = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .saturating_sub(1);
            let shared: &'static Shared = Box::leak(Box::new(Shared {
                state: AtomicU64::new(0),
                job: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
                sleepers: Mutex::new(0),
                wake: Condvar::new(),
            }));
            let mut started = 0;
            for i in 0..helpers {
                let ok = std::thread::Builder::new()
                    .name(format!("trt-diff-matmul-{i}"))
                    .spawn(move || shared.helper())
                    .is_ok();
                started += ok as usize;
            }
            SpinPool {
                shared,
                submit: Mutex::new(()),
                helpers: started,
            }
        })
    }

    /// Runs `f(0..tasks)` on the caller and the helpers; returns when all are done.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = self.submit.try_lock();
        if self.helpers == 0 || tasks < 2 || tasks as u64 >= FIELD || guard.is_err() {
            (0..tasks).for_each(f);
            return;
        }
        let sh = self.shared;
        let generation = (split(sh.state.load(Ordering::Acquire)).0 + 1) % (1 << 24);
        sh.done.store(0, Ordering::Relaxed);
        let erased: Task = f;
        sh.job
            .store(&erased as *const Task as usize, Ordering::Release);
        sh.state.store(
            generation * FIELD * FIELD + tasks as u64 * FIELD,
            Ordering::Release,
        );
        if *self
            .shared
            .sleepers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            > 0
        {
            sh.wake.notify_all();
        }
        sh.work();
        while sh.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        drop(guard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_task_once_across_jobs_and_callers() {
        let pool = SpinPool::global();
        std::thread::scope(|s| {
            for t in 0..3 {
                s.spawn(move || {
                    for round in 0..200 {
                        let n = 1 + (round * 7 + t) % 50;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        pool.run(n, &|i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
    }
}
