//! Speculative decoding with n-gram drafts (prompt lookup, as vLLM's `ngram` method and
//! llama.cpp's `ngram-simple`): no draft model, the draft is what followed the latest
//! earlier occurrence of the sequence's last few tokens in its prompt and output.
//!
//! A lone decoding stream reads every weight once per token, whatever the number of rows
//! the step carries (538 MB a token for SmolLM2-135M in f32). Feeding the next token
//! together with `k` drafted ones costs one step, and yields every draft the model agrees
//! with plus one token of its own. Each draft is checked by sampling that position as
//! plain decoding would (same sampler, same random draw) and comparing: the output is the
//! one plain decoding gives, greedy or sampled, and a draft is taken with the model's own
//! probability for it, the acceptance rule of speculative sampling for a one-token-certain
//! draft.
//!
//! A recurrent state cannot drop the tokens it has read. The engine keeps a backup of the
//! state from before the step (reference counts, and the global-cache rows the step writes
//! over: see `SequenceState::backup`); when a draft is rejected it goes back to it
//! (`Backup::restore`), and the tokens that were right but are now unread are
//! fed again at the front of the next step, which reads its rows anyway. A step without
//! drafts feeds them all, so a sequence lags its output by at most `2k + 1` tokens.

/// Speculative decoding settings (off when `tokens` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculativeOptions {
    /// Drafted tokens per step and sequence, at most.
    pub tokens: usize,
    /// Longest and shortest suffix looked up; the longest that occurs earlier wins.
    pub ngram_max: usize,
    pub ngram_min: usize,
    /// Steps with more decoding sequences than this (or with a prompt chunk) do not draft:
    /// with many streams the step shares its weight reads among them already, and the
    /// extra rows would cost compute that the other streams wait for. (Within the limit,
    /// drafts also share what one fused decode step takes: see the worker's `draft`.)
    pub max_streams: usize,
}

impl SpeculativeOptions {
    pub const OFF: Self = Self {
        tokens: 0,
        ngram_max: 3,
        ngram_min: 1,
        max_streams: 1,
    };

    pub fn enabled(&self) -> bool {
        self.tokens > 0
    }
}

impl Default for SpeculativeOptions {
    fn default() -> Self {
        Self::OFF
    }
}

/// Up to `opts.tokens` (and `limit`) tokens predicted to follow `prompt ++ generated`: for
/// the longest suffix of `ngram_max` down to `ngram_min` tokens that occurs earlier, the
/// tokens after its latest earlier occurrence. Empty when nothing matches.
pub fn draft(
    prompt: &[u32],
    generated: &[u32],
    opts: &SpeculativeOptions,
    limit: usize,
) -> Vec<u32> {
    let want = opts.tokens.min(limit);
    if want == 0 {
        return Vec::new();
    }
    let len = prompt.len() + generated.len();
    let at = |i: usize| {
        if i < prompt.len() {
            prompt[i]
        } else {
            generated[i - prompt.len()]
        }
    };
    for n in (opts.ngram_min.max(1)..=opts.ngram_max).rev() {
        if n >= len {
            continue;
        }
        let suffix = len - n;
        // Latest first: recent text predicts the next tokens best (a loop, the line being
        // copied). `start < suffix`, so at least one token follows the occurrence.
        for start in (0..suffix).rev() {
            if (0..n).all(|j| at(start + j) == at(suffix + j)) {
                let from = start + n;
                let to = (from + want).min(len);
                return (from..to).map(at).collect();
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(tokens: usize, ngram_max: usize, ngram_min: usize) -> SpeculativeOptions {
        SpeculativeOptions {
            tokens,
            ngram_max,
            ngram_min,
            max_streams: 1,
        }
    }

    /// The obvious version: search the joined history as one slice.
    fn naive(history: &[u32], o: &SpeculativeOptions, limit: usize) -> Vec<u32> {
        for n in (o.ngram_min.max(1)..=o.ngram_max).rev() {
            if n >= history.len() {
                continue;
            }
            let tail = &history[history.len() - n..];
            let found = (0..history.len() - n)
                .filter(|&i| &history[i..i + n] == tail)
                .max();
            if let Some(i) = found {
                let end = (i + n + o.tokens.min(limit)).min(history.len());
                return history[i + n..end].to_vec();
            }
        }
        Vec::new()
    }

    #[test]
    fn drafts_what_followed_the_latest_occurrence_of_the_longest_suffix() {
        let o = opts(3, 3, 1);
        // "1 2 3" occurred twice; the latest is followed by 7 8 9.
        let prompt = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 6];
        assert_eq!(draft(&prompt, &[1, 2, 3], &o, 10), vec![7, 8, 9]);
        // Only "3" matches at length 1 when the longer suffixes never occurred.
        assert_eq!(draft(&[3, 5, 6, 0, 3], &[], &o, 10), vec![5, 6, 0]);
        // Capped by the caller's limit, and by the end of the history.
        assert_eq!(draft(&prompt, &[1, 2, 3], &o, 2), vec![7, 8]);
        assert_eq!(draft(&[4, 9, 4], &[], &o, 10), vec![9, 4]);
        // Nothing matches, or nothing is asked for.
        assert!(draft(&[1, 2, 3], &[4], &o, 10).is_empty());
        assert!(draft(&prompt, &[1, 2, 3], &o, 0).is_empty());
        assert!(draft(&prompt, &[1, 2, 3], &opts(0, 3, 1), 10).is_empty());
        // ngram_min above 1 ignores a lone matching token.
        assert!(draft(&[3, 5, 6, 0, 3], &[], &opts(3, 3, 2), 10).is_empty());
    }

    #[test]
    fn split_history_matches_the_joined_search() {
        // A small alphabet, so that suffixes recur at every length.
        let mut x = 0x2545_f491_u64;
        let history: Vec<u32> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 5) as u32
            })
            .collect();
        for (tokens, max, min) in [(4, 3, 1), (2, 4, 2), (8, 2, 2), (5, 6, 3)] {
            let o = opts(tokens, max, min);
            for len in [1, 2, 3, 10, 57, 300] {
                for split in [0, len / 3, len] {
                    let (p, g) = history[..len].split_at(split);
                    assert_eq!(
                        draft(p, g, &o, 6),
                        naive(&history[..len], &o, 6),
                        "len {len} split {split} opts {o:?}"
                    );
                }
            }
        }
    }
}
