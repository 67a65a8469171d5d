//! A fixed team of threads for the forward's parallel sections.
//!
//! A decode step has a few hundred parallel sections (four matmuls and the
//! attention per layer), each a fraction of a millisecond. A general work-
//! stealing pool spends microseconds waking threads for each; here every
//! thread has a fixed share (task `t` runs on thread `t`) and waits between
//! sections by spinning briefly on a generation counter, then sleeping, so a
//! section starts within a few hundred nanoseconds while steps keep coming and
//! an idle engine burns no CPU.
//!
//! A section borrows the caller's stack (the closure and what it captures),
//! so [`Pool::run`] returns, or unwinds, only after every thread has left the
//! section, as `std::thread::scope` does. A panic in any share is caught
//! where it happens; once all threads are done, the first one is resumed on
//! the caller, and the pool stays usable for the next section.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
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
    /// Set when a worker's share of the current section panicked; the
    /// payload waits in `panic` for the caller.
    panicked: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
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
            panicked: AtomicBool::new(false),
            panic: Mutex::new(None),
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
    ///
    /// # Panics
    /// If a share panics, after every thread has finished its share: the
    /// caller's own panic, else the first worker's. The pool stays usable.
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
        // SAFETY: the lifetime is erased only until this call returns or
        // unwinds, and `section` below (declared after `wrapped`, so dropped
        // before it) waits on every exit path until every worker has
        // finished with the job.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        let s = &*self.shared;
        // SAFETY: no worker reads `job` now (see `Shared`).
        unsafe { *s.job.get() = Some(job) };
        let section = Section {
            shared: s,
            target: s.done.load(Ordering::Relaxed) + (self.threads as u64 - 1),
        };
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // A panic here unwinds through `section`, which waits for the workers.
        wrapped(0);
        if let Some(payload) = section.wait() {
            drop(section);
            resume_unwind(payload);
        }
    }
}

/// One section in flight: waiting for it is the way out of [`Pool::run`],
/// unwinding included.
struct Section<'a> {
    shared: &'a Shared,
    /// The value of `done` once every worker has finished this section.
    target: u64,
}

impl Section<'_> {
    /// Wait until every worker has finished its share; the first panic among
    /// the shares, if any. Waiting again returns at once with `None`.
    fn wait(&self) -> Option<Box<dyn Any + Send>> {
        let s = self.shared;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < self.target {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if !s.panicked.swap(false, Ordering::Relaxed) {
            return None;
        }
        s.panic.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for Section<'_> {
    fn drop(&mut self) {
        // Reached by unwinding from the caller's share: the workers may still
        // run the job, which borrows the unwinding frame. A worker's panic is
        // dropped here (a second panic while unwinding would abort); the
        // caller's is the one that goes on.
        if let Some(payload) = self.wait() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
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
            // SAFETY: as above; the caller's frame outlives this call.
            let share = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(t) }));
            if let Err(payload) = share {
                let later = {
                    let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
                    if slot.is_none() {
                        *slot = Some(payload);
                        None
                    } else {
                        Some(payload)
                    }
                };
                // Published to the caller by the release increment below.
                s.panicked.store(true, Ordering::Relaxed);
                // Not the first panic of the section: dropped here, where a
                // payload whose drop panics cannot stop this thread.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(later)));
            }
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

    /// `run` on `pool`, with a panic turned into its message.
    fn run_caught(pool: &Pool, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Result<(), String> {
        std::panic::catch_unwind(AssertUnwindSafe(|| pool.run(tasks, f))).map_err(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        })
    }

    #[test]
    fn a_panicking_share_reaches_the_caller_after_every_thread_is_done() {
        let pool = Pool::new(3);
        for panicking in 0..3 {
            // The other shares finish late: `run` must not return (or unwind)
            // before they have, since they borrow this frame.
            let finished = AtomicUsize::new(0);
            let got = run_caught(&pool, 3, &|t| {
                if t == panicking {
                    panic!("share {t} failed");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                finished.fetch_add(1, Ordering::SeqCst);
            });
            assert_eq!(got, Err(format!("share {panicking} failed")));
            assert_eq!(finished.load(Ordering::SeqCst), 2, "share {panicking}");
            // The pool runs the next section on every thread, panic-free.
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..100 {
                pool.run(3, &|t| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 100));
        }
        // Every share panicking at once: one panic comes out, none is left
        // over for the next section.
        assert!(run_caught(&pool, 3, &|t| panic!("all {t}")).is_err());
        assert_eq!(run_caught(&pool, 3, &|_| {}), Ok(()));
    }
}
