//! Batch planning, kept free of model types so the policy is easy to test.
//!
//! Each step runs every decoding sequence (one token each) and fills what is left of the
//! step's token budget with prefill chunks: requests resumed from the state cache first
//! (their rest of prompt is short, so one chunk gives them their first token), then the
//! others oldest first. Decodes come first because they are what streaming clients are
//! waiting on; a long prompt is split across steps so it cannot stall them.
//!
//! The budget: with nobody decoding, a step takes `max_batch_tokens` of prompt (reading
//! prompts in large chunks is fastest). While sequences decode, every step delays each of
//! their next tokens by its whole duration, so with a step latency target the prefill part
//! is cut to what fits the target after the decodes, from running estimates of what a
//! decode-only step and a prompt token cost ([`StepBudget`]; vLLM's chunked prefill sizes
//! its steps the same way, by a token budget that decodes fill first).
//!
//! Admission takes whole requests (all of a request's `n` slots at once: forking after the
//! prompt must never wait for a slot): warm requests first (a cached prefix leaves them at
//! most one step of prompt, and they give their slots back soon), then the others first-in
//! first-out, stopping at the first that does not fit so no cold request is overtaken by a
//! later cold one.

use std::time::Duration;

/// A prefilling request, as the plan sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefilling {
    /// Prompt tokens left to read.
    pub remaining: usize,
    /// Resumed from the state cache.
    pub warm: bool,
}

/// Chunk lengths for the prefilling requests, in their order (0: not this step): what
/// `budget` leaves after `decodes`, warm requests served before cold ones.
pub fn plan_prefill(budget: usize, decodes: usize, groups: &[Prefilling]) -> Vec<usize> {
    let mut left = budget.saturating_sub(decodes);
    let mut chunks = vec![0; groups.len()];
    let order = (0..groups.len())
        .filter(|&i| groups[i].warm)
        .chain((0..groups.len()).filter(|&i| !groups[i].warm));
    for i in order {
        let take = groups[i].remaining.min(left);
        left -= take;
        chunks[i] = take;
    }
    chunks
}

/// A queued request, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// State slots it needs (its `n`).
    pub need: usize,
    /// The state cache holds a prefix of its prompt that leaves at most one step to read.
    pub warm: bool,
}

/// Queue indices to admit into `free` slots, in admission order (see the module docs).
pub fn admit(free: usize, queue: &[Waiting]) -> Vec<usize> {
    let mut free = free;
    let mut take = |i: usize, picked: &mut Vec<usize>| {
        let fits = queue[i].need <= free;
        if fits {
            free -= queue[i].need;
            picked.push(i);
        }
        fits
    };
    let mut picked = Vec::new();
    for i in (0..queue.len()).filter(|&i| queue[i].warm) {
        take(i, &mut picked);
    }
    for i in (0..queue.len()).filter(|&i| !queue[i].warm) {
        if !take(i, &mut picked) {
            break;
        }
    }
    picked
}

/// Sizes each step's token budget to a step latency target (see the module docs).
#[derive(Debug, Clone)]
pub struct StepBudget {
    max_tokens: usize,
    /// `None`: every step may take `max_tokens`.
    target: Option<Duration>,
    /// Seconds of a decode-only step, and of a prompt token in a step (running averages).
    decode_step: Option<f64>,
    per_prompt_token: Option<f64>,
}

/// Prompt tokens a step takes while others decode, whatever the estimates say: prompts
/// must keep moving even when decodes alone fill the target.
pub const MIN_PREFILL_CHUNK: usize = 32;

/// Weight of the newest observation in the running averages.
const SMOOTHING: f64 = 0.2;

impl StepBudget {
    pub fn new(max_tokens: usize, target: Option<Duration>) -> Self {
        Self {
            max_tokens,
            target,
            decode_step: None,
            per_prompt_token: None,
        }
    }

    /// Tokens the next step may take when `decodes` sequences decode in it.
    pub fn tokens(&self, decodes: usize) -> usize {
        let (Some(target), true) = (self.target, decodes > 0) else {
            return self.max_tokens;
        };
        let Some(per_token) = self.per_prompt_token else {
            // Not measured yet: the first steps measure.
            return self.max_tokens;
        };
        // While prompts wait, every step mixes them with decodes and no decode-only step
        // is seen: count a decode token as a prompt token until one is.
        let step = self.decode_step.unwrap_or(per_token * decodes as f64);
        let room = (target.as_secs_f64() - step).max(0.0);
        let prefill = (room / per_token.max(1e-9)) as usize;
        let most = self
            .max_tokens
            .saturating_sub(decodes)
            .max(MIN_PREFILL_CHUNK);
        decodes + prefill.clamp(MIN_PREFILL_CHUNK, most)
    }

    /// Learns from a finished step of `decodes` decode tokens and `prompt` prompt tokens.
    pub fn observe(&mut self, decodes: usize, prompt: usize, took: Duration) {
        let secs = took.as_secs_f64();
        let blend =
            |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + SMOOTHING * (new - o)));
        match (decodes, prompt) {
            (0, 0) => {}
            (_, 0) => self.decode_step = blend(self.decode_step, secs),
            (d, p) => {
                // The prompt's share: what the decodes would have taken alone comes off.
                let decode_part = if d > 0 {
                    self.decode_step.unwrap_or(0.0)
                } else {
                    0.0
                };
                let share = (secs - decode_part).max(0.0) / p as f64;
                self.per_prompt_token = blend(self.per_prompt_token, share);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cold(remaining: usize) -> Prefilling {
        Prefilling {
            remaining,
            warm: false,
        }
    }

    fn warm(remaining: usize) -> Prefilling {
        Prefilling {
            remaining,
            warm: true,
        }
    }

    #[test]
    fn decodes_first_then_prefill_chunks_in_order() {
        assert_eq!(
            plan_prefill(10, 3, &[cold(4), cold(5), cold(2)]),
            vec![4, 3, 0]
        );
        assert_eq!(
            plan_prefill(10, 12, &[cold(4)]),
            vec![0],
            "decodes alone exceed the budget"
        );
        assert_eq!(
            plan_prefill(512, 0, &[cold(2000)]),
            vec![512],
            "long prompts are chunked"
        );
    }

    #[test]
    fn warm_requests_read_before_cold_ones() {
        assert_eq!(
            plan_prefill(10, 2, &[cold(20), warm(3), cold(1), warm(4)]),
            vec![1, 3, 0, 4]
        );
    }

    #[test]
    fn admission_is_fifo_and_all_or_nothing_per_request() {
        let q = |needs: &[usize]| -> Vec<Waiting> {
            needs
                .iter()
                .map(|&need| Waiting { need, warm: false })
                .collect()
        };
        assert_eq!(admit(3, &q(&[1, 2, 1])), vec![0, 1]);
        assert!(
            admit(3, &q(&[4, 1])).is_empty(),
            "the head is not overtaken"
        );
        assert!(admit(0, &q(&[1])).is_empty());
    }

    #[test]
    fn warm_requests_are_admitted_first() {
        let w = |need, warm| Waiting { need, warm };
        // The warm one at the back goes first; the cold head then no longer fits, and the
        // cold one behind it must not overtake it.
        assert_eq!(admit(3, &[w(3, false), w(1, false), w(1, true)]), vec![2]);
        assert_eq!(
            admit(4, &[w(2, false), w(1, true), w(1, false)]),
            vec![1, 0, 2]
        );
        // A warm request that does not fit does not block the others.
        assert_eq!(admit(2, &[w(1, false), w(5, true)]), vec![0]);
    }

    #[test]
    fn without_a_target_or_decodes_a_step_takes_the_whole_budget() {
        let mut b = StepBudget::new(512, None);
        b.observe(4, 0, Duration::from_millis(80));
        b.observe(4, 100, Duration::from_millis(280));
        assert_eq!(b.tokens(4), 512);
        let mut b = StepBudget::new(512, Some(Duration::from_millis(200)));
        assert_eq!(b.tokens(4), 512, "nothing measured yet");
        b.observe(4, 0, Duration::from_millis(80));
        b.observe(4, 100, Duration::from_millis(280));
        assert_eq!(b.tokens(0), 512, "nobody waits on a token");
        // Only prompt steps seen so far (every step since had prompts in it): the decodes
        // are counted as prompt tokens, (200 - 4 x 2) / 2 = 96 prompt tokens.
        let mut b = StepBudget::new(512, Some(Duration::from_millis(200)));
        b.observe(0, 100, Duration::from_millis(200));
        assert_eq!(b.tokens(4), 4 + 96);
    }

    #[test]
    fn the_prefill_part_fits_the_target_after_the_decodes() {
        let mut b = StepBudget::new(512, Some(Duration::from_millis(200)));
        // Decode-only steps of 80 ms; prompt tokens at 2 ms each beside 4 decodes.
        b.observe(4, 0, Duration::from_millis(80));
        b.observe(4, 100, Duration::from_millis(280));
        // (200 - 80) / 2 = 60 prompt tokens, plus the 4 decodes.
        assert_eq!(b.tokens(4), 64);
        // Decodes alone fill the target: prompts still move by the minimum chunk.
        b.observe(8, 0, Duration::from_millis(400));
        b.observe(8, 0, Duration::from_millis(400));
        assert_eq!(b.tokens(8), 8 + MIN_PREFILL_CHUNK);
        // A fast machine: capped by the budget.
        let mut fast = StepBudget::new(512, Some(Duration::from_millis(200)));
        fast.observe(1, 0, Duration::from_millis(5));
        fast.observe(0, 512, Duration::from_millis(50));
        assert_eq!(fast.tokens(1), 512);
    }

    #[test]
    fn estimates_follow_the_machine() {
        let mut b = StepBudget::new(512, Some(Duration::from_millis(200)));
        b.observe(2, 0, Duration::from_millis(40));
        b.observe(0, 100, Duration::from_millis(100)); // 1 ms a token
        let before = b.tokens(2);
        // The machine slows down: prompt tokens now cost 4 ms.
        for _ in 0..30 {
            b.observe(0, 100, Duration::from_millis(400));
        }
        let after = b.tokens(2);
        assert!(after < before / 2, "{before} -> {after}");
        assert_eq!(after, 2 + 40);
    }
}
