//! Transparent huge pages for memory the model streams every token ([`back_with_huge_pages`]).
//!
//! A batch-1 decode step reads every weight once (538 MB for SmolLM2-135M in f32), and on
//! 4 KiB pages that is a TLB miss every 4 KiB and a hardware prefetcher that stops at every
//! page boundary. With the weights on 2 MiB pages the same step took 13.15 / 13.09 against
//! 13.85 / 14.04 ms in the decode bench (`--huge-pages`, alternating; Zen 5 VM), and one
//! f32 stream's ITL p50 over HTTP was 9.2 against 10.4 ms. Putting the whole heap there
//! (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`) gained nothing more, and needs setting up
//! before the process starts; instead the weights are
//! moved onto huge pages after loading, with `madvise(MADV_HUGEPAGE)` (so that the kernel
//! keeps them there) and `madvise(MADV_COLLAPSE)` (Linux 6.1+, which does it now rather
//! than when `khugepaged` gets to it, minutes later). Neither changes a byte of the memory.
//!
//! The weights are heap buffers of a few MB each, sharing the heap with other buffers, so
//! each is widened to the whole huge pages that hold it (within its mapping): a huge page
//! is all one kind of page, and what else lies in it only gains from it.

use std::ops::Range;

/// A transparent huge page's size on x86-64 and most arm64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// What [`back_with_huge_pages`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HugePages {
    /// Bytes of the huge-page ranges asked for (the regions widened to whole huge pages).
    pub asked: usize,
    /// Bytes of them now on huge pages.
    pub collapsed: usize,
    /// Why some or all were not (the first failure), if any.
    pub failure: Option<String>,
}

/// The huge-page-aligned ranges that hold `regions`, each within the mapping (of `maps`)
/// its first byte lies in: a region is widened to whole huge pages, then cut to the whole
/// huge pages of its mapping. Sorted, overlaps and neighbours merged. Regions outside
/// every mapping, and those whose mapping holds no whole huge page around them, are left
/// out.
pub fn huge_ranges(regions: &[Range<usize>], maps: &[Range<usize>]) -> Vec<Range<usize>> {
    let down = |a: usize| a / HUGE_PAGE * HUGE_PAGE;
    let up = |a: usize| a.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let mut ranges: Vec<Range<usize>> = regions
        .iter()
        .filter(|r| !r.is_empty())
        .filter_map(|r| {
            let map = maps.iter().find(|m| m.contains(&r.start))?;
            let start = down(r.start).max(up(map.start));
            let end = up(r.end).min(down(map.end));
            (start < end).then_some(start..end)
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Moves the memory holding `regions` onto transparent huge pages (see the module docs).
/// Best effort: what cannot be moved stays as it was, and [`HugePages::failure`] says why.
/// `regions` are address ranges ([`span`]) of memory the process holds.
pub fn back_with_huge_pages(regions: &[Range<usize>]) -> HugePages {
    imp::back(regions)
}

/// The addresses `bytes` spans.
pub fn span(bytes: &[u8]) -> Range<usize> {
    let start = bytes.as_ptr() as usize;
    start..start + bytes.len()
}

#[cfg(target_os = "linux")]
mod imp {
    use super::{huge_ranges, HugePages};
    use std::ops::Range;

    /// The process's mappings, from `/proc/self/maps`.
    fn maps() -> std::io::Result<Vec<Range<usize>>> {
        let text = std::fs::read_to_string("/proc/self/maps")?;
        Ok(text.lines().filter_map(parse_range).collect())
    }

    /// `start-end` at the head of a maps or smaps line, in hex.
    pub(super) fn parse_range(line: &str) -> Option<Range<usize>> {
        let span = line.split_whitespace().next()?;
        let (a, b) = span.split_once('-')?;
        Some(usize::from_str_radix(a, 16).ok()?..usize::from_str_radix(b, 16).ok()?)
    }

    fn advise(range: &Range<usize>, advice: libc::c_int) -> std::io::Result<()> {
        // SAFETY: the range lies within the process's own mappings (`huge_ranges` cut it to
        // one), and neither advice changes their contents: MADV_HUGEPAGE sets a flag,
        // MADV_COLLAPSE copies pages into huge ones under the kernel's locks.
        let rc = unsafe { libc::madvise(range.start as *mut libc::c_void, range.len(), advice) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    pub fn back(regions: &[Range<usize>]) -> HugePages {
        let maps = match maps() {
            Ok(m) => m,
            Err(e) => {
                return HugePages {
                    failure: Some(format!("cannot read /proc/self/maps: {e}")),
                    ..HugePages::default()
                }
            }
        };
        let ranges = huge_ranges(regions, &maps);
        let mut done = HugePages {
            asked: ranges.iter().map(|r| r.len()).sum(),
            ..HugePages::default()
        };
        for r in &ranges {
            let result = advise(r, libc::MADV_HUGEPAGE)
                .and_then(|()| advise(r, libc::MADV_COLLAPSE))
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EINVAL) => format!(
                        "madvise: {e} (MADV_COLLAPSE needs Linux 6.1+ built with transparent huge pages)"
                    ),
                    _ => format!("madvise: {e}"),
                });
            match result {
                Ok(()) => done.collapsed += r.len(),
                Err(e) => {
                    done.failure.get_or_insert(e);
                }
            }
        }
        done
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::HugePages;
    use std::ops::Range;

    pub fn back(regions: &[Range<usize>]) -> HugePages {
        HugePages {
            failure: (!regions.is_empty())
                .then(|| "transparent huge pages are asked for on Linux only".to_string()),
            ..HugePages::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: usize = HUGE_PAGE;

    /// `huge_ranges` of `(start, end)` pairs, in huge pages.
    fn widened(regions: &[(usize, usize)]) -> Vec<(usize, usize)> {
        let maps = [10 * H + 4096..20 * H, 30 * H..31 * H - 4096];
        let regions: Vec<Range<usize>> = regions.iter().map(|&(a, b)| a..b).collect();
        huge_ranges(&regions, &maps)
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect()
    }

    #[test]
    fn regions_widen_to_whole_huge_pages_within_their_mapping() {
        // Widened out to the huge pages around it.
        assert_eq!(widened(&[(12 * H + 5, 13 * H + 7)]), [(12 * H, 14 * H)]);
        // Cut to the mapping's whole huge pages: it starts mid-page.
        assert_eq!(widened(&[(10 * H + 8192, 12 * H)]), [(11 * H, 12 * H)]);
        // Its mapping holds no whole huge page: nothing to ask.
        assert!(widened(&[(30 * H + 4096, 30 * H + 8192)]).is_empty());
        // Outside every mapping, or empty: left out.
        assert!(widened(&[(40 * H, 41 * H), (12 * H, 12 * H)]).is_empty());
        // Neighbours and overlaps merge, in order.
        assert_eq!(
            widened(&[
                (15 * H + 1, 15 * H + 2),
                (12 * H, 13 * H),
                (13 * H + 1, 14 * H),
                (12 * H + 9, 12 * H + 10),
            ]),
            [(12 * H, 14 * H), (15 * H, 16 * H)]
        );
    }

    /// Bytes of `range` the kernel maps with huge pages, from `/proc/self/smaps`, counting
    /// each mapping that overlaps it in full.
    #[cfg(target_os = "linux")]
    fn huge_bytes_around(range: Range<usize>) -> usize {
        let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut total = 0;
        let mut inside = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("AnonHugePages:") {
                if inside {
                    let kb: usize = rest.split_whitespace().next().unwrap().parse().unwrap();
                    total += kb << 10;
                }
            } else if let Some(m) = line
                .split_whitespace()
                .next()
                .filter(|s| s.contains('-'))
                .and_then(|_| imp::parse_range(line))
            {
                inside = m.start < range.end && range.start < m.end;
            }
        }
        total
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_buffer_keeps_its_bytes_and_says_what_it_got() {
        // A buffer of several huge pages, filled before it is moved.
        let buf: Vec<u8> = (0..5 * H).map(|i| (i * 7 + i / 4096) as u8).collect();
        let before: u64 = buf.iter().map(|&b| b as u64).sum();
        let got = back_with_huge_pages(&[span(&buf)]);
        assert!(got.asked >= 5 * H - 2 * H, "{got:?}");
        assert!(got.collapsed <= got.asked);
        let after: u64 = buf.iter().map(|&b| b as u64).sum();
        assert_eq!(before, after, "the memory's contents are untouched");
        assert!(buf
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i * 7 + i / 4096) as u8));
        let start = buf.as_ptr() as usize;
        let huge = huge_bytes_around(start..start + buf.len());
        match &got.failure {
            // Where the kernel did it, smaps shows it.
            None => assert!(huge >= got.collapsed, "{huge} < {got:?}"),
            // Where it cannot (an older kernel, huge pages off), it says why.
            Some(why) => assert!(why.starts_with("madvise"), "{why}"),
        }
    }
}
