//! CPU thread and allocator setup for binaries ([`init`]).
//!
//! candle asks for its thread count on every matmul, and when `RAYON_NUM_THREADS` is unset it
//! computes it by parsing `/proc/cpuinfo` (`num_cpus::get_physical`) each time: on SmolLM2-135M
//! that was about 11% of CPU time. Fixing the count once at start-up removes that cost and
//! makes the choice explicit.
//!
//! candle also keeps a second pool of its own (`CANDLE_NUM_THREADS`, default: as many
//! threads as rayon's) for elementwise ops, whose workers spin for a while after each op
//! before they sleep. The heavy work here (gemm, the host attention, the recurrence scan,
//! the decode kernels) runs on rayon's pool, so those spinning workers take cores from it:
//! on two cores a 512-token prefill took 1.17-1.25 s with that pool and 1.04-1.07 s without
//! it (the decode bench did not change). So unless the user sets it, candle's pool gets one
//! thread, the caller: its elementwise ops run where they are called, and every other
//! thread is rayon's.

/// Sets `RAYON_NUM_THREADS` (unless the user already did) to `threads`, or to the number of
/// CPUs this process may use, and `CANDLE_NUM_THREADS` to 1 (same; see the module docs),
/// and tunes the allocator ([`tune_allocator`]). Call at the very start of `main`, before
/// any thread exists: changing the environment while other threads read it is a data race.
pub fn init(threads: Option<usize>) -> usize {
    tune_allocator();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let n = match std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        Some(n) => n,
        None => {
            let n = threads
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            n
        }
    };
    // Named, so that `top -H` and profiles tell them from the HTTP server's threads (a pool
    // built on first use takes the name of the thread that first used it).
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("liger-compute-{i}"))
        .build_global();
    n
}

/// Lowers the priority of rayon's threads, the ones that compute, by `by` nice steps below
/// the rest of the process (at most to 19; Linux, a no-op elsewhere and for 0): a thread
/// that wakes to move a result on (an HTTP server's) then gets a core at once. Returns how
/// many threads took it.
pub fn set_compute_nice(by: i32) -> usize {
    if by <= 0 {
        return 0;
    }
    on_each_compute_thread(|_| lower_this_thread(by))
}

/// Pins each of rayon's threads, the ones that compute, to a CPU of its own, when the pool
/// has one thread per CPU the process may use (Linux; a no-op elsewhere). Returns how many
/// threads were pinned.
///
/// Why: a decode step's threads meet at a barrier after every phase, and one that waits
/// long enough sleeps. When it wakes while the other CPU runs something else (an HTTP
/// thread, a client on the same machine), Linux may queue it on the CPU where its partner
/// runs, and the two then take turns on one core while the other idles until the load
/// balancer moves one (milliseconds): a single stream's slowest steps on the 2-vCPU VM
/// took 12-24 ms with both threads on one CPU at every barrier, against ~7 ms for a step.
/// llama.cpp's threads never meet that case because they spin between steps instead of
/// sleeping.
///
/// Only with a thread per allowed CPU: a pool smaller than the CPUs it sees (a container
/// whose CPU quota `available_parallelism` honours while every core of the node stays
/// visible, or a `RAYON_NUM_THREADS` below the count) would otherwise pin every such
/// process to the same first CPUs; and a larger pool has no CPU of its own to give each.
pub fn pin_compute_threads() -> usize {
    let allowed = allowed_cpus();
    let Some(cpus) = cpus_to_pin(&allowed, rayon::current_num_threads()) else {
        return 0;
    };
    on_each_compute_thread(|i| pin_this_thread(cpus[i]))
}

/// Runs `f` on each of rayon's threads with its index; returns on how many it succeeded.
fn on_each_compute_thread(f: impl Fn(usize) -> bool + Sync) -> usize {
    let done = std::sync::atomic::AtomicUsize::new(0);
    rayon::broadcast(|ctx| {
        if f(ctx.index()) {
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    done.into_inner()
}

/// The CPU for each of `threads` pool threads (thread `i` on the `i`th), or `None`: pinned
/// only with one thread per allowed CPU, and at least two (see [`pin_compute_threads`]).
fn cpus_to_pin(allowed: &[usize], threads: usize) -> Option<&[usize]> {
    (threads >= 2 && allowed.len() == threads).then_some(allowed)
}

/// The CPUs the calling thread may run on (its affinity mask: `taskset`, a cgroup's
/// cpuset), in order.
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity(0) fills it for
    // the calling thread, and CPU_ISSET reads it within CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

#[cfg(target_os = "linux")]
fn pin_this_thread(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set and `cpu` is below CPU_SETSIZE (it
    // came from `allowed_cpus`); sched_setaffinity(0) changes only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn pin_this_thread(_cpu: usize) -> bool {
    false
}

#[cfg(target_os = "linux")]
fn lower_this_thread(by: i32) -> bool {
    // SAFETY: gettid has no preconditions; getpriority and setpriority on our own thread id
    // read and change only this thread's nice value (on Linux a per-thread attribute).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + by).min(19)) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_thread(_by: i32) -> bool {
    false
}

/// Keeps freed buffers in the process instead of handing them back to the kernel.
///
/// Tensors of megabytes are allocated and freed at every op of training, and at every
/// decode step (a batch-32 step's new recurrent memories are 47 MB); glibc serves those with
/// fresh `mmap`s (or trims the heap after them), and the kernel zeroes every new page: that
/// was a third of the CPU time of a distillation step on SmolLM2-135M, and ~5% of a batch-32
/// decode step. A fixed mmap threshold at glibc's maximum (32 MiB) and no trimming make the
/// heap reuse the memory. Called by [`init`], before other threads exist.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// Touches `bytes` of heap on rayon's threads (split among them) and frees it, so that the
/// allocator, which keeps freed memory ([`tune_allocator`]), hands those pages out again
/// already mapped.
///
/// Why: a decode step that starts many sequences copies their caches into new buffers,
/// and memory the process never had costs a page fault per 4 KiB, ~6 us each on the VMs
/// this was measured on: the first step after a wave of 8 prompts took 23,000 faults and
/// 136 ms of its 167 (a step takes ~30). Servers call this once at start-up for the
/// states they may hold (llama.cpp allocates and clears its KV cache at start-up too).
pub fn prefault_heap(bytes: usize) {
    let per_thread = bytes / rayon::current_num_threads().max(1);
    rayon::broadcast(|_| prefault_this_thread(per_thread));
}

/// [`prefault_heap`] for the calling thread's own heap alone: for a thread outside rayon's
/// pool that allocates a step's buffers, such as a server's engine loop (whose logits, a
/// fresh ~200 KB a row each step, kept landing on pages it had never touched: 2,075 faults
/// in 8 one-stream requests in liger-serve, every one of them in that buffer's zeroing).
pub fn prefault_this_thread(bytes: usize) {
    // Blocks the size of a few cache buffers, well under the mmap threshold, so they come
    // from (and go back to) the thread's own heap.
    const BLOCK: usize = 1 << 20;
    const PAGE: usize = 4096;
    let mut blocks = Vec::with_capacity(bytes.div_ceil(BLOCK));
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOCK);
        let mut block = vec![0u8; n];
        // `vec!` of zeros may map pages without touching them: write one per page.
        for i in (0..n).step_by(PAGE) {
            block[i] = 1;
        }
        blocks.push(std::hint::black_box(block));
        left -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_pinned_only_one_per_allowed_cpu() {
        assert_eq!(cpus_to_pin(&[0, 1], 2), Some(&[0, 1][..]));
        // A cpuset or taskset: the allowed CPUs, whatever their numbers.
        assert_eq!(cpus_to_pin(&[4, 6, 7], 3), Some(&[4, 6, 7][..]));
        // A quota (or RAYON_NUM_THREADS) below the CPUs in view: every such process would
        // pin to the same first CPUs.
        assert_eq!(cpus_to_pin(&[0, 1, 2, 3], 2), None);
        // More threads than CPUs: none has a CPU of its own.
        assert_eq!(cpus_to_pin(&[0, 1], 4), None);
        // One thread: nothing to keep apart.
        assert_eq!(cpus_to_pin(&[3], 1), None);
        assert_eq!(cpus_to_pin(&[], 0), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pinned_thread_runs_on_its_cpu() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "the process may run somewhere");
        // The last allowed CPU, on a thread of its own (pinning the test's thread would
        // hold other tests to one CPU).
        let cpu = *cpus.last().unwrap();
        let (pinned, ran_on, allowed_after) = std::thread::spawn(move || {
            let pinned = pin_this_thread(cpu);
            // SAFETY: sched_getcpu has no preconditions.
            let ran_on = unsafe { libc::sched_getcpu() };
            (pinned, ran_on, allowed_cpus())
        })
        .join()
        .unwrap();
        assert!(pinned);
        assert_eq!(ran_on, cpu as i32);
        assert_eq!(allowed_after, vec![cpu]);
    }
}
