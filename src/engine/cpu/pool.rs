//! A fixed team of threads for the forward's parallel sections.
//!
//! A decode step has a few hundred parallel sections (four matmuls and the
//! attention per layer), each a fraction of a millisecond. A general work-
//! stealing pool spends microseconds waking threads for each; here every
//! thread has a fixed share (task `t` runs on thread `t`) and waits between
//! sections by spinning briefly on a generation counter, then sleeping, so a
//! section starts within a few hundred nanoseconds while steps keep coming and
//! an idle engine burns no CPU.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    generation: AtomicU64,
    done: AtomicU64,
    job: UnsafeCell<Option<Job>>,
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread in `run` while no worker reads
// it (every worker has reported the previous section done), and published to
// the workers by the release store of `generation`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The threads; `run` executes one section on all of them.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    handles: Vec<JoinHandle<()>>,
    /// `run` must not be entered from two threads at once: not `Sync`.
    _single_caller: std::marker::PhantomData<std::cell::Cell<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

/// Spins before a waiting worker sleeps (about a hundred microseconds).
const SPINS: u32 = 1 << 16;

impl Pool {
    /// `threads` including the caller's own.
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            done: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let handles = (1..threads)
            .map(|t| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("sgl-engine-{t}"))
                    .spawn(move || worker(&s, t))
                    .expect("spawning an engine thread")
            })
            .collect();
        Pool {
            shared,
            threads,
            handles,
            _single_caller: std::marker::PhantomData,
        }
    }

    /// Threads from `SGL_THREADS`, else every core.
    pub fn default_threads() -> usize {
        std::env::var("SGL_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f(t)` for `t` in `0..threads`, task `t` on thread `t` (0 is the
    /// caller); returns when all are done. `tasks` below `threads` leaves the
    /// rest idle for this section.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 || tasks <= 1 {
            for t in 0..tasks.min(self.threads).max(1) {
                f(t);
            }
            return;
        }
        let wrapped = |t: usize| {
            if t < tasks {
                f(t)
            }
        };
        let job: &(dyn Fn(usize) + Sync) = &wrapped;
        // SAFETY: the lifetime is erased only until this call returns, and it
        // returns after every worker has finished with the job.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        let s = &*self.shared;
        // SAFETY: no worker reads `job` now (see `Shared`).
        unsafe { *s.job.get() = Some(job) };
        let target = s.done.load(Ordering::Relaxed) + (self.threads as u64 - 1);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        wrapped(0);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < target {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

fn worker(s: &Shared, t: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for the next section: spin, then sleep.
        let mut spins = 0u32;
        let mut g = s.generation.load(Ordering::Acquire);
        while g == seen {
            if spins < SPINS {
                spins += 1;
                // Now and then let a preempted peer (the caller, when the
                // machine is oversubscribed) have this core.
                if spins.is_multiple_of(256) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            } else {
                let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.generation.load(Ordering::SeqCst) == seen {
                    guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
            }
            g = s.generation.load(Ordering::Acquire);
        }
        seen = g;
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: published by the generation store; valid until `done`
        // reaches the caller's target, which this thread's increment gates.
        if let Some(job) = unsafe { *s.job.get() } {
            unsafe { (*job)(t) };
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_section() {
        let pool = Pool::new(3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(3, &|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1000);
        }
        // Fewer tasks than threads, and a pause long enough for sleeping.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let n = AtomicUsize::new(0);
        pool.run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
