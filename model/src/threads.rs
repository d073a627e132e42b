//! CPU thread setup for binaries.
//!
//! candle asks for its thread count on every matmul, and when `RAYON_NUM_THREADS` is unset it
//! computes it by parsing `/proc/cpuinfo` (`num_cpus::get_physical`) each time: on SmolLM2-135M
//! that was about 11% of CPU time. Fixing the count once at start-up removes that cost and
//! makes the choice explicit.

/// Sets `RAYON_NUM_THREADS` (unless the user already did) to `threads`, or to the number of
/// CPUs this process may use. Call at the very start of `main`, before any thread exists:
/// changing the environment while other threads read it is a data race.
pub fn init(threads: Option<usize>) -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let n = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}
