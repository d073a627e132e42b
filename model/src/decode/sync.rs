//! The two synchronization pieces of the fused decode step: buffers that threads write in
//! disjoint parts, and a barrier that separates the phases of a layer.
//!
//! Why not rayon: a decode token of a 30-layer model is ~150 dependent phases of a few tens
//! of microseconds each. Handing each to rayon costs a wake-up (futex, `sched_yield`) per
//! phase, which measured as a fifth of batch-1 decode time. Here the same threads live for
//! the whole token and meet at a spinning barrier between phases.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

/// A buffer shared by the step's threads. Between two barriers each part of it is either
/// read by any number of threads or written by exactly one: the phase structure of
/// `super::worker` guarantees that, and the accessors' safety contracts state it.
pub(crate) struct Shared<'a, T = f32> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: `Shared` is a `&mut [T]` split among threads under the phase discipline above;
// the `T`s used (f32, f16) are plain `Copy` numbers without drop glue or interior pointers.
unsafe impl<T: Copy + Send> Send for Shared<'_, T> {}
unsafe impl<T: Copy + Send> Sync for Shared<'_, T> {}

impl<'a, T: Copy> Shared<'a, T> {
    pub fn new(buf: &'a mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _borrow: PhantomData,
        }
    }

    /// The whole buffer, to read.
    ///
    /// # Safety
    /// No thread may write any of it while the returned slice is alive.
    pub unsafe fn read(&self) -> &[T] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }

    /// Elements `range`, to write.
    ///
    /// # Safety
    /// No other thread may read or write any of `range` while the returned slice is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, range: Range<usize>) -> &mut [T] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "{range:?} outside a buffer of {}",
            self.len
        );
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len())
    }
}

/// A reusable barrier for a fixed number of threads that spins, then sleeps: the phases it
/// separates last microseconds, far less than a futex wake-up, so a thread spins first; but
/// when the thread it waits for was descheduled (on a small machine, the HTTP server's or
/// a client's threads take its core now and then), spinning keeps this core busy while the
/// thread waits for one. Asleep, this core goes idle and the scheduler moves the waiting
/// thread onto it (measured in liger-serve with one stream: decode steps of ~36 ms among
/// 27 ms ones, a few per request, when it yielded instead of sleeping).
///
/// If a thread panics while others wait, they would wait forever; [`PanicGuard`] marks the
/// barrier poisoned (and wakes the sleepers) so they panic too and the scope unwinds
/// instead of hanging.
pub(crate) struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
    /// Threads asleep in `wait`, or about to be: the last to arrive wakes them.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// Spins before sleeping: enough to cover the end of a phase on a busy core (a band or a
/// mixing unit, ~0.2 ms), no more.
const SPINS: u32 = 1 << 12;

impl SpinBarrier {
    pub fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Returns once all threads have called `wait_doing` for this generation. Everything a
    /// thread wrote before its call is visible to every thread after theirs (acquire/release
    /// on `generation`, and the `AcqRel` counter orders the arrivals).
    ///
    /// Calls `idle` while this thread waits for the others (not when it is the last to
    /// arrive) until it returns `false`: short pieces of work that are useful now and
    /// harmless if cut off, such as prefetching what the next phase reads.
    pub fn wait_doing(&self, mut idle: impl FnMut() -> bool) {
        if self.threads == 1 {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            // Last to arrive: reset for the next round, then release the others. Nobody
            // touches `arrived` again until they have seen the new generation.
            self.arrived.store(0, Ordering::Relaxed);
            // SeqCst here and on `sleepers` in both places: either this sees a sleeper's
            // count, or the sleeper sees the new generation before it sleeps.
            self.generation.fetch_add(1, Ordering::SeqCst);
            if self.sleepers.load(Ordering::SeqCst) > 0 {
                self.wake_all();
            }
            return;
        }
        let mut busy = true;
        for _ in 0..SPINS {
            if self.generation.load(Ordering::Acquire) != generation {
                return;
            }
            self.check_poison();
            busy = busy && idle();
            if !busy {
                std::hint::spin_loop();
            }
        }
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        while self.generation.load(Ordering::SeqCst) == generation
            && !self.poisoned.load(Ordering::SeqCst)
        {
            guard = self
                .wake
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        if self.generation.load(Ordering::Acquire) == generation {
            self.check_poison();
        }
    }

    fn check_poison(&self) {
        if self.poisoned.load(Ordering::Relaxed) {
            panic!("another thread of the decode step panicked");
        }
    }

    /// Wakes every sleeper (under the lock, so none is between its check and its sleep).
    fn wake_all(&self) {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.wake.notify_all();
    }
}

/// Poisons the barrier if its thread unwinds (see [`SpinBarrier`]).
pub(crate) struct PanicGuard<'a>(pub &'a SpinBarrier);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poisoned.store(true, Ordering::SeqCst);
            self.0.wake_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `threads` threads run `rounds` rounds: each writes its own slot, then (after the
    /// barrier) checks that it sees every other thread's write of that round. Thread 0
    /// first sleeps `late` each round. Returns the barrier, to inspect.
    fn rounds(threads: usize, rounds: usize, late: Duration) -> SpinBarrier {
        let mut slots = vec![0f32; threads];
        let shared = Shared::new(&mut slots);
        let barrier = SpinBarrier::new(threads);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (shared, barrier) = (&shared, &barrier);
                s.spawn(move || {
                    for round in 1..=rounds {
                        if t == 0 {
                            std::thread::sleep(late);
                        }
                        // SAFETY: slot t is this thread's alone in the write phase.
                        unsafe { shared.part(t..t + 1)[0] = round as f32 };
                        barrier.wait_doing(|| false);
                        // SAFETY: nobody writes until the next barrier.
                        let seen = unsafe { shared.read() }.to_vec();
                        assert!(seen.iter().all(|&v| v == round as f32), "{seen:?}");
                        barrier.wait_doing(|| false);
                    }
                });
            }
        });
        barrier
    }

    /// Whether a thread waiting at a two-thread barrier unwinds when the other panics
    /// `after` a delay, instead of hanging.
    fn panics_through(after: Duration) -> bool {
        let barrier = SpinBarrier::new(2);
        let result = std::panic::catch_unwind(|| {
            std::thread::scope(|s| {
                let b = &barrier;
                s.spawn(move || {
                    let _guard = PanicGuard(b);
                    std::thread::sleep(after);
                    panic!("boom");
                });
                let _guard = PanicGuard(b);
                b.wait_doing(|| false);
            })
        });
        result.is_err()
    }

    #[test]
    fn only_a_waiting_thread_does_idle_work_and_stops_when_told() {
        let barrier = SpinBarrier::new(2);
        let calls = [AtomicUsize::new(0), AtomicUsize::new(0)];
        std::thread::scope(|s| {
            for t in 0..2 {
                let (barrier, calls) = (&barrier, &calls);
                s.spawn(move || {
                    if t == 0 {
                        // Last to arrive: it has nobody to wait for.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    barrier.wait_doing(|| calls[t].fetch_add(1, Ordering::Relaxed) + 1 < 10);
                });
            }
        });
        assert_eq!(calls[0].load(Ordering::Relaxed), 0);
        assert_eq!(calls[1].load(Ordering::Relaxed), 10);
    }

    #[test]
    fn barrier_orders_phases() {
        rounds(4, 199, Duration::ZERO);
    }

    #[test]
    fn a_panicking_thread_does_not_hang_the_others() {
        assert!(panics_through(Duration::ZERO));
    }

    #[test]
    fn a_late_thread_finds_the_others_asleep_and_wakes_them() {
        // Thread 0 arrives milliseconds late each round, long past the spinning: the
        // others sleep, and must wake to see its write.
        let barrier = rounds(3, 5, Duration::from_millis(5));
        assert_eq!(barrier.sleepers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_sleeping_thread_is_woken_by_a_panic() {
        // Long enough for the waiting thread to be asleep.
        assert!(panics_through(Duration::from_millis(20)));
    }
}
