//! The request parameters whose ranges the engine relies on, checked when built: a
//! [`SamplingParams`] or [`ChoiceCount`] out of range cannot exist, so nothing after
//! construction re-checks them. The HTTP layer builds them from the client's JSON (and
//! names the parameter in its 400); tests and benches go through the same checks.

use std::num::NonZeroUsize;

/// A value a checked constructor refused. The message states the allowed range in the
/// client's terms, so the HTTP layer can pass it on as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OutOfRange(String);

/// How many continuations of one prompt a request asks for: at least one, and no more than
/// the bound it was checked against (the server's sequence slots: a request needing more
/// could never be admitted and would block the queue behind it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChoiceCount(NonZeroUsize);

impl ChoiceCount {
    pub const ONE: Self = Self(NonZeroUsize::MIN);

    /// `n` choices, where `max` is the most the engine can hold at once.
    pub fn new(n: u64, max: usize) -> Result<Self, OutOfRange> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= max)
            .and_then(NonZeroUsize::new)
            .map(Self)
            .ok_or_else(|| OutOfRange(format!("must be between 1 and {max}")))
    }

    pub fn get(self) -> usize {
        self.0.get()
    }
}

/// How to pick the next token. Starts neutral ([`Default`]: the model's own distribution)
/// and changes only through the checked `with_*` methods, so every field is in range.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    temperature: f32,
    top_p: f32,
    top_k: usize,
    min_p: f32,
    seed: Option<u64>,
    presence_penalty: f32,
    frequency_penalty: f32,
    repetition_penalty: f32,
    /// Sorted by token id.
    logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

/// `v` when it is finite and `ok`; otherwise the `rule` it breaks.
fn in_range(v: f32, ok: impl Fn(f32) -> bool, rule: &str) -> Result<f32, OutOfRange> {
    if v.is_finite() && ok(v) {
        Ok(v)
    } else {
        Err(OutOfRange(rule.to_string()))
    }
}

/// The most a logit may be biased either way (OpenAI's range).
const MAX_BIAS: f32 = 100.0;

impl SamplingParams {
    /// 0 means greedy.
    pub fn with_temperature(mut self, t: f32) -> Result<Self, OutOfRange> {
        self.temperature = in_range(t, |t| t >= 0.0, "must be >= 0")?;
        Ok(self)
    }

    /// 1 means off.
    pub fn with_top_p(mut self, p: f32) -> Result<Self, OutOfRange> {
        self.top_p = in_range(p, |p| p > 0.0 && p <= 1.0, "must be in (0, 1]")?;
        Ok(self)
    }

    /// 0 means off; any other count is a valid cut.
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// 0 means off.
    pub fn with_min_p(mut self, p: f32) -> Result<Self, OutOfRange> {
        self.min_p = in_range(p, |p| (0.0..=1.0).contains(&p), "must be in [0, 1]")?;
        Ok(self)
    }

    /// Seeds the request's own RNG, so its output does not depend on what else runs.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub fn with_presence_penalty(mut self, p: f32) -> Result<Self, OutOfRange> {
        self.presence_penalty = penalty(p)?;
        Ok(self)
    }

    pub fn with_frequency_penalty(mut self, p: f32) -> Result<Self, OutOfRange> {
        self.frequency_penalty = penalty(p)?;
        Ok(self)
    }

    /// 1 means off.
    pub fn with_repetition_penalty(mut self, p: f32) -> Result<Self, OutOfRange> {
        self.repetition_penalty = in_range(p, |p| p > 0.0, "must be > 0")?;
        Ok(self)
    }

    /// Added to the logits of these tokens before anything else. Token ids are not checked
    /// here (the engine does not know the vocabulary; the HTTP layer checks them against the
    /// model and the sampler skips ids beyond the logits).
    pub fn with_logit_bias(mut self, mut bias: Vec<(u32, f32)>) -> Result<Self, OutOfRange> {
        if let Some(&(id, _)) = bias
            .iter()
            .find(|&&(_, b)| !(b.is_finite() && (-MAX_BIAS..=MAX_BIAS).contains(&b)))
        {
            return Err(OutOfRange(format!(
                "bias for token {id} must be in [-100, 100]"
            )));
        }
        // By id, so equal requests compare equal whatever order the client listed them in.
        bias.sort_by_key(|&(id, _)| id);
        self.logit_bias = bias;
        Ok(self)
    }

    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    pub fn top_p(&self) -> f32 {
        self.top_p
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    pub fn min_p(&self) -> f32 {
        self.min_p
    }

    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    pub fn presence_penalty(&self) -> f32 {
        self.presence_penalty
    }

    pub fn frequency_penalty(&self) -> f32 {
        self.frequency_penalty
    }

    pub fn repetition_penalty(&self) -> f32 {
        self.repetition_penalty
    }

    /// Whether a pick is the argmax of the model's logits as they are: temperature 0 and
    /// nothing that moves a logit first (bias, penalties).
    pub fn picks_argmax(&self) -> bool {
        self.temperature == 0.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.repetition_penalty == 1.0
            && self.logit_bias.is_empty()
    }

    pub fn logit_bias(&self) -> &[(u32, f32)] {
        &self.logit_bias
    }
}

/// Presence and frequency penalties share OpenAI's range.
fn penalty(p: f32) -> Result<f32, OutOfRange> {
    in_range(p, |p| (-2.0..=2.0).contains(&p), "must be in [-2, 2]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule<T: std::fmt::Debug>(r: Result<T, OutOfRange>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn choice_count_is_between_one_and_the_bound() {
        assert_eq!(ChoiceCount::new(1, 4).unwrap(), ChoiceCount::ONE);
        assert_eq!(ChoiceCount::new(4, 4).unwrap().get(), 4);
        assert_eq!(rule(ChoiceCount::new(0, 4)), "must be between 1 and 4");
        assert_eq!(rule(ChoiceCount::new(5, 4)), "must be between 1 and 4");
        assert_eq!(
            rule(ChoiceCount::new(u64::MAX, 4)),
            "must be between 1 and 4"
        );
    }

    #[test]
    fn default_is_neutral_and_in_range() {
        let d = SamplingParams::default();
        let rebuilt = SamplingParams::default()
            .with_temperature(d.temperature())
            .and_then(|s| s.with_top_p(d.top_p()))
            .and_then(|s| s.with_min_p(d.min_p()))
            .and_then(|s| s.with_presence_penalty(d.presence_penalty()))
            .and_then(|s| s.with_frequency_penalty(d.frequency_penalty()))
            .and_then(|s| s.with_repetition_penalty(d.repetition_penalty()))
            .and_then(|s| s.with_logit_bias(d.logit_bias().to_vec()))
            .unwrap();
        assert_eq!(rebuilt, d);
        assert_eq!((d.top_k(), d.seed()), (0, None));
    }

    #[test]
    fn floats_out_of_range_are_refused_with_their_rule() {
        type Set = fn(SamplingParams, f32) -> Result<SamplingParams, OutOfRange>;
        let cases: [(Set, &[f32], &[f32], &str); 6] = [
            (
                SamplingParams::with_temperature,
                &[0.0, 0.7, 30.0],
                &[-0.1],
                "must be >= 0",
            ),
            (
                SamplingParams::with_top_p,
                &[0.01, 1.0],
                &[0.0, 1.01, 5.0],
                "must be in (0, 1]",
            ),
            (
                SamplingParams::with_min_p,
                &[0.0, 1.0],
                &[-0.1, 1.5],
                "must be in [0, 1]",
            ),
            (
                SamplingParams::with_presence_penalty,
                &[-2.0, 2.0],
                &[-2.5, 3.0],
                "must be in [-2, 2]",
            ),
            (
                SamplingParams::with_frequency_penalty,
                &[-2.0, 0.5],
                &[2.1],
                "must be in [-2, 2]",
            ),
            (
                SamplingParams::with_repetition_penalty,
                &[0.5, 4.0],
                &[0.0, -1.0],
                "must be > 0",
            ),
        ];
        for (set, good, bad, want) in cases {
            for &v in good {
                assert!(set(SamplingParams::default(), v).is_ok(), "{want}: {v}");
            }
            for &v in bad.iter().chain(&[f32::NAN, f32::INFINITY]) {
                assert_eq!(rule(set(SamplingParams::default(), v)), want, "{v}");
            }
        }
    }

    #[test]
    fn logit_bias_is_range_checked_and_sorted() {
        let s = SamplingParams::default()
            .with_logit_bias(vec![(9, 100.0), (2, -100.0)])
            .unwrap();
        assert_eq!(s.logit_bias(), &[(2, -100.0), (9, 100.0)]);
        for bad in [100.5, -101.0, f32::NAN] {
            assert_eq!(
                rule(SamplingParams::default().with_logit_bias(vec![(1, 0.0), (7, bad)])),
                "bias for token 7 must be in [-100, 100]"
            );
        }
    }
}
