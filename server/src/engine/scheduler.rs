//! Batch planning, kept free of model types so the policy is easy to test.
//!
//! Each step runs every decoding sequence (one token each) and fills what is left of the
//! step's token budget with prefill chunks: requests resumed from the state cache first
//! (their rest of prompt is short, so one chunk gives them their first token), then the
//! others oldest first, no chunk beside another shorter than [`MIN_SIDE_CHUNK`] unless it
//! finishes its prompt ([`plan_prefill`]). Decodes come first because they are what
//! streaming clients are waiting on; a long prompt is split across steps so it cannot stall
//! them.
//!
//! The budget: with nobody decoding, a step takes `max_batch_tokens` of prompt (reading
//! prompts in large chunks is fastest). While sequences decode, every step delays each of
//! their next tokens by its whole duration, so with a step latency target the prefill part
//! is cut to what fits the target after the decodes, from running estimates of what a
//! decode-only step and a prompt token cost ([`StepBudget`]; vLLM's chunked prefill sizes
//! its steps the same way, by a token budget that decodes fill first).
//!
//! While nothing decodes, a request whose prompt is read waits for the prompts being read
//! alongside it when they will all be in soon ([`keep_waiting`]), so that the wave's
//! prompts are read in full steps and its streams start together.
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
///
/// A chunk after the step's first one must finish its prompt or be at least
/// [`MIN_SIDE_CHUNK`] tokens; a shorter piece waits for a later step (and a later request
/// that the rest finishes goes instead). With nothing decoding, it must finish its prompt:
/// nobody waits on the step, and a prompt read whole in the next step costs less than a
/// piece now and a continuation then. Every chunk costs a fixed part whatever its length
/// (its own attention pass over the window, the global cache's bookkeeping, a row of the LM
/// head: measured ~35-45 ms beside another chunk, `cargo bench --bench decode -- --mixed`),
/// and a piece cut off the front of a prompt turns the rest of it into continuation chunks,
/// which attend to a full window and cost ~25% more a token than a prompt's first chunk.
pub fn plan_prefill(budget: usize, decodes: usize, groups: &[Prefilling]) -> Vec<usize> {
    let mut left = budget.saturating_sub(decodes);
    let mut chunks = vec![0; groups.len()];
    let order = (0..groups.len())
        .filter(|&i| groups[i].warm)
        .chain((0..groups.len()).filter(|&i| !groups[i].warm));
    let mut first = true;
    let min_side = if decodes == 0 {
        usize::MAX
    } else {
        MIN_SIDE_CHUNK
    };
    for i in order {
        let take = groups[i].remaining.min(left);
        let piece = take < groups[i].remaining && take < min_side;
        if take == 0 || (piece && !first) {
            continue;
        }
        first = false;
        left -= take;
        chunks[i] = take;
    }
    chunks
}

/// The shortest chunk that shares a step with another and does not finish its prompt
/// (see [`plan_prefill`]).
pub const MIN_SIDE_CHUNK: usize = 64;

/// Groups whose prompts are read, waiting to start decoding together (see
/// [`keep_waiting`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Some sequence is decoding (every step is then cut to the step target anyway).
    pub decoding: bool,
    /// Prompt tokens the groups still reading theirs have left.
    pub reading: usize,
    /// How long the longest-waiting ready group has waited.
    pub waited: Duration,
}

/// Whether groups whose prompts are read wait (their first tokens not yet sampled) for
/// the prompts read alongside theirs, so that the streams start together.
///
/// Why: while nothing decodes, a step reads a full `max_batch_tokens` of prompt and
/// nobody waits on its duration. The first stream to start turns every later step of
/// the wave into a decode pass for a handful of streams plus a prompt chunk cut to the
/// step target, until the last prompt is read; and streams that start together decode
/// as one full batch. So they wait, while nothing decodes, as long as every prompt being
/// read will be in within `max_wait` of the first ready group's wait (`estimate`: how long
/// the tokens left take, [`StepBudget::prompt_time`]; unknown before the first step).
/// A wave that will not be in by then starts at once: a long wait buys little.
pub fn keep_waiting(ready: Ready, max_wait: Option<Duration>, estimate: Option<Duration>) -> bool {
    let Some(max_wait) = max_wait else {
        return false;
    };
    !ready.decoding && ready.reading > 0 && ready.waited + estimate.unwrap_or_default() <= max_wait
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
    cost: StepCost,
}

/// Prompt tokens a step takes while others decode, whatever the estimates say: prompts
/// must keep moving even when decodes alone fill the target.
pub const MIN_PREFILL_CHUNK: usize = 32;

impl StepBudget {
    pub fn new(max_tokens: usize, target: Option<Duration>) -> Self {
        Self {
            max_tokens,
            target,
            cost: StepCost::default(),
        }
    }

    /// Tokens the next step may take when `decodes` sequences decode in it.
    pub fn tokens(&self, decodes: usize) -> usize {
        let (Some(target), true) = (self.target, decodes > 0) else {
            return self.max_tokens;
        };
        let Some(cost) = self.cost.fit() else {
            // Not measured yet: the first steps measure.
            return self.max_tokens;
        };
        let room = (target.as_secs_f64() - cost.decodes(decodes)).max(0.0);
        let prefill = (room / cost.per_prompt_token) as usize;
        let most = self
            .max_tokens
            .saturating_sub(decodes)
            .max(MIN_PREFILL_CHUNK);
        decodes + prefill.clamp(MIN_PREFILL_CHUNK, most)
    }

    /// About how long reading `tokens` prompt tokens takes: at the recent steps' mean time
    /// per prompt token (their decodes' share included, so on the high side); `None` until
    /// a step with prompt tokens was measured. Not the fit's per-token cost: fitted to
    /// chunks of similar lengths, its slope may be far off for a whole wave of prompts
    /// (two prefill steps of 271 and 289 tokens, 140 and 213 ms, make it 4 ms a token).
    pub fn prompt_time(&self, tokens: usize) -> Option<Duration> {
        let (secs, prompt) = self.cost.prompt_steps_total;
        (prompt > 0.0).then(|| Duration::from_secs_f64(tokens as f64 * secs / prompt))
    }

    /// Learns from a finished step of `decodes` decode tokens and `prompt` prompt tokens.
    pub fn observe(&mut self, decodes: usize, prompt: usize, took: Duration) {
        if decodes + prompt > 0 {
            self.cost.observe(decodes, prompt, took.as_secs_f64());
        }
    }
}

/// A step's duration as `base + per_decode * decodes + per_prompt_token * prompt`, fitted
/// to the recent steps by least squares, older steps weighing less ([`FORGET`] per step).
///
/// One model for both parts is what keeps the estimate honest under load: a decode-only
/// step is rarely seen while prompts wait, and its cost grows with the number of decodes,
/// so subtracting a remembered decode-only time from a mixed step charged the prompt for
/// decodes it did not cause. With 32 streams that made each prompt token look 2-3x dearer
/// than it was, the chunks shrank to the minimum and prompts were read at a third of the
/// machine's speed (TTFT p99 91 s on `scripts/bench-http.sh --concurrency 32
/// --prompt-tokens 256`).
#[derive(Debug, Clone, Default)]
struct StepCost {
    /// Weighted sums of `x x^T` and `x y` over the steps, `x = (1, decodes, prompt)`.
    xx: [[f64; 3]; 3],
    xy: [f64; 3],
    /// Weighted count of steps that read prompt tokens.
    prompt_steps: f64,
    /// Weighted sums of those steps' seconds and prompt tokens.
    prompt_steps_total: (f64, f64),
}

/// Weight kept by every older step at each new one: about the last ten steps count.
const FORGET: f64 = 0.9;

/// A fitted [`StepCost`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fit {
    base: f64,
    per_decode: f64,
    per_prompt_token: f64,
}

impl Fit {
    /// Seconds of a step of `d` decodes and no prompt.
    fn decodes(&self, d: usize) -> f64 {
        (self.base + self.per_decode * d as f64).max(0.0)
    }
}

impl StepCost {
    fn observe(&mut self, decodes: usize, prompt: usize, secs: f64) {
        let x = [1.0, decodes as f64, prompt as f64];
        for (i, row) in self.xx.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = FORGET * *v + x[i] * x[j];
            }
            self.xy[i] = FORGET * self.xy[i] + x[i] * secs;
        }
        self.prompt_steps = FORGET * self.prompt_steps + f64::from(u8::from(prompt > 0));
        if prompt > 0 {
            let (s, p) = self.prompt_steps_total;
            self.prompt_steps_total = (FORGET * s + secs, FORGET * p + prompt as f64);
        }
    }

    /// The least-squares coefficients; `None` until a step with prompt tokens was seen.
    /// Directions the steps do not tell apart (all steps with the same mix) are settled by a
    /// small ridge, so the prediction for mixes like the observed ones stays right; a
    /// per-token cost that does not come out positive falls back to the mean cost of a
    /// token of either kind.
    fn fit(&self) -> Option<Fit> {
        if self.prompt_steps < 1e-3 {
            return None;
        }
        let scale = (self.xx[0][0] + self.xx[1][1] + self.xx[2][2]) / 3.0;
        let mut a = self.xx;
        for (i, row) in a.iter_mut().enumerate() {
            row[i] += 1e-9 * scale.max(1.0);
        }
        let [base, per_decode, per_prompt_token] = solve3(a, self.xy)?;
        let fit = Fit {
            base,
            per_decode,
            per_prompt_token,
        };
        if fit.per_prompt_token > 0.0 && fit.per_prompt_token.is_finite() {
            return Some(fit);
        }
        // Mean seconds per token of the observed steps.
        let per_token = self.xy[0] / (self.xx[0][1] + self.xx[0][2]).max(1e-9);
        Some(Fit {
            base: 0.0,
            per_decode: per_token,
            per_prompt_token: per_token.max(1e-9),
        })
    }
}

/// `a x = b` for a symmetric positive semi-definite 3 x 3 `a`, by elimination with partial
/// pivoting; `None` when it is singular.
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..3 {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (v, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; 3];
    for row in (0..3).rev() {
        let tail: f64 = (row + 1..3).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
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
            vec![4, 0, 2],
            "a short piece of the second prompt waits; the third fits whole"
        );
        assert_eq!(
            plan_prefill(200, 3, &[cold(4), cold(500), cold(2)]),
            vec![4, 193, 0]
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
    fn a_short_piece_only_leads_a_step() {
        let side = MIN_SIDE_CHUNK;
        // Beside another chunk (and a decode), a piece shorter than the minimum waits...
        assert_eq!(
            plan_prefill(1 + 100 + side - 1, 1, &[cold(100), cold(1000)]),
            vec![100, 0]
        );
        // ...one of the minimum goes...
        assert_eq!(
            plan_prefill(1 + 100 + side, 1, &[cold(100), cold(1000)]),
            vec![100, side]
        );
        // ...and a piece that finishes its prompt goes whatever its length.
        assert_eq!(
            plan_prefill(1 + 100 + side, 1, &[cold(100), cold(1000), cold(5)]),
            vec![100, side, 0]
        );
        assert_eq!(
            plan_prefill(1 + 110, 1, &[cold(100), cold(1000), cold(5)]),
            vec![100, 0, 5]
        );
        // The step's first chunk is never held back: a small budget still moves prompts.
        assert_eq!(plan_prefill(10, 2, &[cold(1000)]), vec![8]);
        assert_eq!(plan_prefill(10, 2, &[warm(1000), cold(3)]), vec![8, 0]);
    }

    #[test]
    fn with_nothing_decoding_prompts_are_not_split_to_fill_a_step() {
        // Eight 284-token prompts and a 512-token budget: one whole prompt a step, not a
        // prompt and a 228-token piece of the next.
        let wave = [cold(284); 8];
        assert_eq!(
            plan_prefill(512, 0, &wave),
            [vec![284], vec![0; 7]].concat()
        );
        // Prompts that fit whole still share a step, and a later one that fits goes.
        assert_eq!(
            plan_prefill(512, 0, &[cold(200), cold(350), cold(250)]),
            vec![200, 0, 250]
        );
        // The step's first chunk is still cut to the budget.
        assert_eq!(plan_prefill(512, 0, &[cold(2000), cold(5)]), vec![512, 0]);
        // With streams decoding, a long enough piece fills the step as before.
        assert_eq!(
            plan_prefill(513, 1, &wave),
            [vec![284, 228], vec![0; 6]].concat()
        );
    }

    #[test]
    fn warm_requests_read_before_cold_ones() {
        assert_eq!(
            plan_prefill(10, 2, &[cold(20), warm(3), cold(1), warm(4)]),
            vec![0, 3, 1, 4]
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

    /// Feeds `b` steps whose duration is `20 ms + 6 ms x decodes + 2 ms x prompt token`.
    fn feed(b: &mut StepBudget, steps: &[(usize, usize)]) {
        feed_slowed(b, steps, 1.0);
    }

    /// Observes `steps` (decodes, prompt tokens) on a machine where a step takes
    /// `slowdown * (20 + 6 d + 2 p)` ms.
    fn feed_slowed(b: &mut StepBudget, steps: &[(usize, usize)], slowdown: f64) {
        for &(d, p) in steps {
            let ms = slowdown * (20.0 + 6.0 * d as f64 + 2.0 * p as f64);
            b.observe(d, p, Duration::from_secs_f64(ms / 1e3));
        }
    }

    #[test]
    fn without_a_target_or_decodes_a_step_takes_the_whole_budget() {
        let mut b = StepBudget::new(512, None);
        feed(&mut b, &[(4, 0), (4, 100)]);
        assert_eq!(b.tokens(4), 512);
        let mut b = StepBudget::new(512, Some(Duration::from_millis(200)));
        assert_eq!(b.tokens(4), 512, "nothing measured yet");
        feed(&mut b, &[(4, 0)]);
        assert_eq!(b.tokens(4), 512, "no prompt token measured yet");
        feed(&mut b, &[(4, 100)]);
        assert_eq!(b.tokens(0), 512, "nobody waits on a token");
    }

    #[test]
    fn the_prefill_part_fits_the_target_after_the_decodes() {
        let mut b = StepBudget::new(512, Some(Duration::from_millis(300)));
        feed(
            &mut b,
            &[(4, 0), (4, 100), (8, 0), (2, 50), (8, 200), (0, 512)],
        );
        // (300 - 20 - 6 x 4) / 2 = 128 prompt tokens, plus the 4 decodes (within a token:
        // the fit is floating point).
        assert!((131..=132).contains(&b.tokens(4)), "{}", b.tokens(4));
        // (300 - 20 - 6 x 30) / 2 = 50.
        assert!((79..=80).contains(&b.tokens(30)), "{}", b.tokens(30));
        // Decodes alone fill the target: prompts still move by the minimum chunk.
        assert_eq!(b.tokens(60), 60 + MIN_PREFILL_CHUNK);
        // A fast machine: capped by the budget.
        let mut fast = StepBudget::new(512, Some(Duration::from_millis(200)));
        fast.observe(1, 0, Duration::from_millis(5));
        fast.observe(0, 512, Duration::from_millis(50));
        fast.observe(1, 256, Duration::from_millis(30));
        assert_eq!(fast.tokens(1), 512);
    }

    #[test]
    fn many_decodes_are_not_charged_to_the_prompt() {
        // Under load: one decode-only step with one stream, then every step mixes many
        // decodes with a prompt chunk. Subtracting the one-stream decode time from those
        // steps would price a prompt token at (20 + 6 x 31 + 2 p - 26) / p: 7 ms at p = 32.
        let mut b = StepBudget::new(512, Some(Duration::from_millis(500)));
        feed(&mut b, &[(1, 0), (0, 512)]);
        for i in 0..20 {
            let d = 24 + i % 8;
            let p = b.tokens(d) - d;
            feed(&mut b, &[(d, p)]);
        }
        // The truth: (500 - 20 - 6 x 31) / 2 = 147.
        let got = b.tokens(31) - 31;
        assert!((140..=154).contains(&got), "{got}");
    }

    #[test]
    fn one_mix_only_still_predicts_that_mix() {
        // Eight streams decoding beside the same chunk every step: base and per-decode cost
        // cannot be told apart, but their sum at 8 decodes can.
        let mut b = StepBudget::new(512, Some(Duration::from_millis(300)));
        feed(&mut b, &[(8, 100), (8, 120), (8, 100), (8, 120)]);
        // (300 - 20 - 48) / 2 = 116.
        let got = b.tokens(8) - 8;
        assert!((112..=120).contains(&got), "{got}");
    }

    #[test]
    fn estimates_follow_the_machine() {
        let mut b = StepBudget::new(512, Some(Duration::from_millis(200)));
        feed(&mut b, &[(2, 0), (0, 100), (2, 40), (1, 60)]);
        let before = b.tokens(2);
        // The machine slows down: everything now takes four times as long.
        let mix = [(2, 0), (0, 100), (2, 40), (1, 60)];
        for _ in 0..10 {
            feed_slowed(&mut b, &mix, 4.0);
        }
        let after = b.tokens(2);
        assert!(after < before / 2, "{before} -> {after}");
        // (200 - 4 x 32) / 8 = 9 prompt tokens: below the minimum chunk.
        assert_eq!(after, 2 + MIN_PREFILL_CHUNK);
    }

    #[test]
    fn ready_streams_wait_for_their_wave_while_nothing_decodes() {
        let ms = Duration::from_millis;
        let ready = |decoding, reading, waited| Ready {
            decoding,
            reading,
            waited: ms(waited),
        };
        let max = Some(ms(1000));
        // The wave will be in within the wait: keep waiting.
        assert!(keep_waiting(ready(false, 300, 100), max, Some(ms(600))));
        assert!(keep_waiting(ready(false, 300, 400), max, Some(ms(600))));
        // Not before it ends: start now (a long wait buys little).
        assert!(!keep_waiting(ready(false, 300, 401), max, Some(ms(600))));
        assert!(!keep_waiting(ready(false, 5000, 0), max, Some(ms(1001))));
        // Nothing measured yet: the wait alone bounds it.
        assert!(keep_waiting(ready(false, 5000, 999), max, None));
        assert!(!keep_waiting(ready(false, 5000, 1001), max, None));
        // Every prompt is in, or streams decode already (steps are cut anyway), or the
        // wait is off: start now.
        assert!(!keep_waiting(ready(false, 0, 0), max, Some(ms(0))));
        assert!(!keep_waiting(ready(true, 300, 0), max, Some(ms(1))));
        assert!(!keep_waiting(ready(false, 300, 0), None, Some(ms(1))));
    }

    #[test]
    fn prompt_time_goes_by_the_mean_cost_of_a_prompt_token() {
        let mut b = StepBudget::new(512, Some(Duration::from_millis(200)));
        assert_eq!(b.prompt_time(100), None, "nothing measured yet");
        feed(&mut b, &[(4, 0)]);
        assert_eq!(b.prompt_time(100), None, "no prompt token measured yet");
        // Two steps of 20 ms + 2 ms a token, the second weighing 1 and the first 0.9.
        feed(&mut b, &[(0, 100), (0, 300)]);
        let ms = |b: &StepBudget, tokens| b.prompt_time(tokens).unwrap().as_secs_f64() * 1e3;
        let per_token = (0.9 * 220.0 + 620.0) / (0.9 * 100.0 + 300.0);
        assert!(
            (ms(&b, 1000) - 1000.0 * per_token).abs() < 0.1,
            "{}",
            ms(&b, 1000)
        );
        // Close in size, far apart in time: a fitted slope would say 4 ms a token and put
        // 2,000 tokens at 8 s; the mean says ~0.6 ms.
        let mut b = StepBudget::new(512, Some(Duration::from_millis(200)));
        b.observe(0, 271, Duration::from_millis(140));
        b.observe(0, 289, Duration::from_millis(213));
        let got = ms(&b, 2000);
        assert!((1200.0..1400.0).contains(&got), "{got}");
    }

    #[test]
    fn solve3_inverts_a_known_system() {
        let a = [[4.0, 1.0, 2.0], [1.0, 3.0, 0.0], [2.0, 0.0, 5.0]];
        let x = [1.0, -2.0, 0.5];
        let b = [0, 1, 2].map(|i| (0..3).map(|j| a[i][j] * x[j]).sum::<f64>());
        let got = solve3(a, b).unwrap();
        for (g, w) in got.iter().zip(x) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert!(solve3([[0.0; 3]; 3], [1.0; 3]).is_none());
    }
}
