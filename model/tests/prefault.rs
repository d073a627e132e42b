//! `threads::prefault_heap` leaves mapped memory behind for the threads that will use it:
//! after it, allocating and writing as much again on rayon's threads takes (almost) no page
//! faults. Its own test binary: the fault counter is the whole process's.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn memory_touched_in_advance_is_handed_out_again_without_page_faults() {
    use liger_model::threads::{prefault_heap, tune_allocator};

    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        // Field 10 (minflt), counted after the parenthesized command name.
        let rest = stat.rsplit(')').next().unwrap();
        rest.split_whitespace().nth(7).unwrap().parse().unwrap()
    }
    /// Allocates and writes `per_thread` bytes on each of rayon's threads, in blocks the
    /// size of a state's cache buffers, then frees them.
    fn use_heap(per_thread: usize) {
        rayon::broadcast(|_| {
            let blocks: Vec<Vec<u8>> = (0..per_thread / (300 << 10))
                .map(|_| vec![7u8; 300 << 10])
                .collect();
            std::hint::black_box(blocks);
        });
    }

    tune_allocator();
    let threads = rayon::current_num_threads();
    let per_thread = 48 << 20;
    prefault_heap(2 * per_thread * threads);
    let before = minor_faults();
    use_heap(per_thread);
    let faults = minor_faults() - before;
    let pages = (per_thread * threads / 4096) as u64;
    assert!(
        faults < pages / 10,
        "{faults} page faults for {pages} pages written after prefault_heap"
    );
}
