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
    let taken = std::sync::atomic::AtomicUsize::new(0);
    rayon::broadcast(|_| {
        if lower_this_thread(by) {
            taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    taken.into_inner()
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
