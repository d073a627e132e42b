//! From one row of logits to the next token: logit bias, banned tokens, repetition /
//! presence / frequency penalties, temperature, min-p, top-k, top-p, then a draw from the
//! choice's own seeded RNG; and log-probabilities for the `logprobs` options.
//!
//! Everything here is a pure function of the logits, the history and the RNG, so a seeded
//! request samples the same tokens whatever else shares its batch.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{SamplingParams, TokenLogprob};

/// Tokens seen so far, for the penalties.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// How often each token was generated (presence / frequency penalties).
    pub output_counts: HashMap<u32, u32>,
}

/// A choice's sampler: its parameters and its RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: StdRng,
}

impl Sampler {
    /// Choice 0 of a seeded request uses the seed itself, so `n = 1` reproduces the first
    /// choice of `n = 2`; other choices get derived, distinct seeds.
    pub fn new(seed: Option<u64>, choice: usize) -> Self {
        let base = seed.unwrap_or_else(rand::random::<u64>);
        let seed = if choice == 0 {
            base
        } else {
            splitmix(base ^ (choice as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        };
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Picks a token. `logits` is scratch space (its values are changed). `banned` tokens
    /// (end of sequence before `min_tokens`) cannot be picked.
    pub fn sample(
        &mut self,
        params: &SamplingParams,
        logits: &mut [f32],
        prompt_tokens: &HashSet<u32>,
        history: &History,
        banned: &[u32],
    ) -> u32 {
        process(params, logits, prompt_tokens, history, banned);
        if params.temperature() == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / params.temperature();
        // Unnormalized probabilities relative to the most likely token (which gets 1).
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .filter(|&(_, p)| p > 0.0)
            .collect();
        if params.min_p() > 0.0 {
            cands.retain(|&(_, p)| p >= params.min_p());
        }
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if params.top_k() > 0 && params.top_k() < cands.len() {
            cands.select_nth_unstable_by(params.top_k() - 1, by_prob);
            cands.truncate(params.top_k());
        }
        if params.top_p() < 1.0 {
            cands.sort_unstable_by(by_prob);
            let total: f32 = cands.iter().map(|c| c.1).sum();
            let mut acc = 0.0;
            let keep = cands
                .iter()
                .position(|c| {
                    acc += c.1;
                    acc >= params.top_p() * total
                })
                .map_or(cands.len(), |i| i + 1);
            cands.truncate(keep);
        }
        let total: f64 = cands.iter().map(|c| c.1 as f64).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(id, p) in &cands {
            u -= p as f64;
            if u < 0.0 {
                return id;
            }
        }
        cands.last().map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// Applies bias, bans and penalties in place (vLLM's order).
fn process(
    params: &SamplingParams,
    logits: &mut [f32],
    prompt_tokens: &HashSet<u32>,
    history: &History,
    banned: &[u32],
) {
    for l in logits.iter_mut() {
        if l.is_nan() {
            *l = f32::NEG_INFINITY;
        }
    }
    let vocab = logits.len();
    for &(id, bias) in params.logit_bias() {
        if (id as usize) < vocab {
            logits[id as usize] += bias;
        }
    }
    for &id in banned {
        if (id as usize) < vocab {
            logits[id as usize] = f32::NEG_INFINITY;
        }
    }
    if params.repetition_penalty() != 1.0 {
        let p = params.repetition_penalty();
        let seen = prompt_tokens.iter().chain(history.output_counts.keys());
        let unique: HashSet<u32> = seen.copied().collect();
        for id in unique {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
    if params.presence_penalty() != 0.0 || params.frequency_penalty() != 0.0 {
        for (&id, &count) in &history.output_counts {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= params.frequency_penalty() * count as f32 + params.presence_penalty();
            }
        }
    }
}

/// Index of the largest value; the lowest index wins ties, so greedy is deterministic.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// `log(sum(exp(logits)))`, accumulated in f64.
pub fn logsumexp(logits: &[f32]) -> f32 {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| ((l - max) as f64).exp())
        .sum();
    max + sum.ln() as f32
}

/// The model's log-probability of `token` and its `top` most likely alternatives, from raw
/// logits (before penalties and temperature: the model's own distribution, which is what
/// scoring harnesses compare).
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let lse = logsumexp(logits);
    let lp = |id: u32| {
        logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse)
    };
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = top.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit);
    }
    idx.truncate(k);
    idx.sort_unstable_by(by_logit);
    TokenLogprob {
        token,
        logprob: lp(token),
        top: idx.into_iter().map(|id| (id, lp(id))).collect(),
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn draw(p: &SamplingParams, logits: &[f32], seed: u64, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(Some(seed), 0);
        (0..n)
            .map(|_| {
                s.sample(
                    p,
                    &mut logits.to_vec(),
                    &HashSet::new(),
                    &History::default(),
                    &[],
                )
            })
            .collect()
    }

    #[test]
    fn greedy_picks_the_argmax_and_respects_bias_and_bans() {
        let p = params().with_temperature(0.0).unwrap();
        let logits = [0.0, 3.0, 1.0, 3.0];
        assert_eq!(draw(&p, &logits, 0, 1), vec![1], "lowest index wins ties");
        let p = p.with_logit_bias(vec![(2, 5.0)]).unwrap();
        assert_eq!(draw(&p, &logits, 0, 1), vec![2]);
        let mut s = Sampler::new(None, 0);
        assert_eq!(
            s.sample(
                &p,
                &mut logits.to_vec(),
                &HashSet::new(),
                &History::default(),
                &[2]
            ),
            1
        );
    }

    #[test]
    fn same_seed_same_draws_and_choices_differ() {
        let p = params();
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        assert_eq!(draw(&p, &logits, 42, 20), draw(&p, &logits, 42, 20));
        let mut a = Sampler::new(Some(42), 0);
        let mut b = Sampler::new(Some(42), 1);
        let h = History::default();
        let e = HashSet::new();
        let da: Vec<u32> = (0..20)
            .map(|_| a.sample(&p, &mut logits.clone(), &e, &h, &[]))
            .collect();
        let db: Vec<u32> = (0..20)
            .map(|_| b.sample(&p, &mut logits.clone(), &e, &h, &[]))
            .collect();
        assert_ne!(da, db);
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 0.0, -1.0, -2.0];
        let p = params().with_top_k(2);
        assert!(draw(&p, &logits, 1, 200).iter().all(|&t| t < 2));
        let p = params().with_top_p(0.5).unwrap();
        assert!(draw(&p, &logits, 1, 200).iter().all(|&t| t == 0));
        let p = params().with_min_p(0.5).unwrap();
        assert!(draw(&p, &logits, 1, 200).iter().all(|&t| t < 2));
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let greedy = params().with_temperature(0.0).unwrap();
        let p = greedy.clone().with_presence_penalty(2.0).unwrap();
        let mut h = History::default();
        h.output_counts.insert(0, 1);
        let mut s = Sampler::new(None, 0);
        let e = HashSet::new();
        assert_eq!(s.sample(&p, &mut [1.0, 0.5], &e, &h, &[]), 1);
        let p = greedy.with_repetition_penalty(4.0).unwrap();
        let prompt: HashSet<u32> = [0].into();
        assert_eq!(
            s.sample(&p, &mut [1.0, 0.5], &prompt, &History::default(), &[]),
            1
        );
    }

    #[test]
    fn logprobs_are_normalized_and_sorted() {
        let logits = [1.0f32, 3.0, 2.0];
        let lp = token_logprob(&logits, 2, 2);
        let total: f32 = logits.iter().map(|l| (l - logsumexp(&logits)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.logprob - lp.top[1].1).abs() < 1e-7);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }
}
