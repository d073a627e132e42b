//! `--passkey`: can the model still retrieve what it read far past its window?
//!
//! Perplexity says little about recall: a model can predict filler well and still have lost
//! a number it read 8,000 tokens ago. The pass-key test (Landmark Attention, LongLoRA) hides
//! a random 5-digit key at a given depth of repetitive filler, asks for it at the end, and
//! checks the greedy answer. The filler is easy, so a model that fails has forgotten, not
//! misunderstood. Each (length, depth) gets `keys` random keys from the seed; prompts are
//! prefilled in segments (memory bounded whatever the length), then about ten tokens are
//! generated greedily; the answer is correct when it contains the key's five digits. The
//! reference is only run on lengths within its `max_position_embeddings` (longer ones are
//! reported for the model alone).

use candle_core::{Tensor, D};
use liger_model::rng::SplitMix;
use liger_model::text::Text;
use liger_model::{Logits, Model};
use serde::Serialize;
use tokenizers::Tokenizer;

use super::Loaded;
use crate::progress::Progress;
use crate::recover::selfdistill::stop_ids;
use crate::{Error, Result};

/// What `--passkey` measures.
#[derive(Debug, Clone, PartialEq)]
pub struct PasskeyOptions {
    /// Prompt lengths, in tokens of the model's tokenizer.
    pub lengths: Vec<usize>,
    /// Where the key sits, in percent of the filler (0: first, 100: last).
    pub depths: Vec<u32>,
    /// Keys per (length, depth).
    pub keys: usize,
    pub seed: u64,
}

impl Default for PasskeyOptions {
    fn default() -> Self {
        Self {
            lengths: vec![1024, 2048, 4096, 8192, 16384],
            depths: vec![10, 30, 50, 70, 90],
            keys: 1,
            seed: 0,
        }
    }
}

/// What `--passkey` found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PasskeyReport {
    /// How prompts are given: `completion` (plain text; see [`FORMAT`]).
    pub format: &'static str,
    pub keys: usize,
    pub seed: u64,
    /// Longest prompt the reference is asked (its `max_position_embeddings`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_max_tokens: Option<usize>,
    /// Correct answers over all prompts.
    pub model_accuracy: f64,
    /// Correct answers over the prompts the reference was asked.
    pub reference_accuracy: Option<f64>,
    pub by_length: Vec<PasskeyLength>,
    /// Per depth, over all lengths (the reference's over the lengths it was asked).
    pub by_depth: Vec<PasskeyDepth>,
    pub trials: Vec<PasskeyTrial>,
}

/// Accuracy at one prompt length.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PasskeyLength {
    pub tokens: usize,
    pub model: f64,
    /// `None` past the reference's context length.
    pub reference: Option<f64>,
}

/// Accuracy at one depth.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PasskeyDepth {
    pub depth: u32,
    pub model: f64,
    pub reference: Option<f64>,
}

/// One prompt and its answers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PasskeyTrial {
    /// The asked length; the prompt is at most this long.
    pub length: usize,
    pub prompt_tokens: usize,
    pub depth: u32,
    pub key: u32,
    pub model_answer: String,
    pub model_correct: bool,
    pub reference_answer: Option<String>,
    pub reference_correct: Option<bool>,
}

const INSTRUCTION: &str = "There is an important info hidden inside a lot of irrelevant text. \
Find it and memorize it. I will quiz you about the important information there.";
/// Filler sentences, repeated in this order; whole sentences are the unit of length.
const FILLER: [&str; 5] = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
];
const QUESTION: &str = "What is the pass key?";
const ANSWER_START: &str = "The pass key is";
/// Greedy tokens generated per answer: the key's digits and a little slack.
const ANSWER_TOKENS: usize = 12;

/// How prompts are given: plain text, not through the chat template.
///
/// SmolLM2-135M-Instruct (the original of the default model) is the judge: a format in
/// which it fails is measuring the format. With the key on its own line (LongLoRA's layout)
/// and one key per length and depth, it answered 15 of 15 prompts of 1K, 2K and 4K tokens
/// correctly as plain text ending in "What is the pass key? The pass key is", and 13 of 15
/// as a user message of its chat template with the assistant's answer started by "The pass
/// key is" (at 10% depth it repeats "the pass key", or invents "a magical item"). With the
/// key inside the filler's line instead, it scored 100/60/40% as plain text and 80/20/0%
/// through the template. So: plain text, the key on its own line.
pub const FORMAT: &str = "completion";

/// Builds pass-key prompts of a given length, measured with one tokenizer.
pub struct PromptBuilder<'a> {
    pub tokenizer: &'a Tokenizer,
}

/// One prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Filler sentences before and after the needle.
    pub before: usize,
    pub after: usize,
}

impl PromptBuilder<'_> {
    /// The prompt with `n` filler sentences, the needle after `n * depth / 100` of them,
    /// and how many come before the needle.
    fn text(n: usize, depth: u32, key: u32) -> (String, usize) {
        let before = (n * depth as usize + 50) / 100;
        let needle = format!("The pass key is {key}. Remember it. {key} is the pass key.");
        let filler = |r: std::ops::Range<usize>| r.map(|i| FILLER[i % FILLER.len()]);
        let join = |r| filler(r).collect::<Vec<_>>().join(" ");
        // As in LongLoRA's prompts: one line each for the task, the filler before the key,
        // the key, the filler after it and the question (an empty filler has no line).
        let lines = [
            INSTRUCTION.to_owned(),
            join(0..before),
            needle,
            join(before..n),
            QUESTION.to_owned(),
        ];
        let lines: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| !l.is_empty())
            .collect();
        (format!("{} {ANSWER_START}", lines.join("\n")), before)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| liger_model::Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    fn tokens(&self, n: usize, depth: u32, key: u32) -> Result<Vec<u32>> {
        self.encode(&Self::text(n, depth, key).0)
    }

    /// The longest prompt of at most `length` tokens: as many filler sentences as fit.
    pub fn build(&self, length: usize, depth: u32, key: u32) -> Result<Prompt> {
        let bare = self.tokens(0, depth, key)?.len();
        if bare > length {
            return Err(Error::flag(
                "--passkey-lengths",
                format!("{length} tokens cannot hold the prompt, which has {bare} without filler"),
            ));
        }
        // Tokens per sentence, measured, gives a first guess; then step to the exact fit.
        const PROBE: usize = 100;
        let per = (self.tokens(PROBE, depth, key)?.len() - bare) as f64 / PROBE as f64;
        let mut n = ((length - bare) as f64 / per) as usize;
        let mut tokens = self.tokens(n, depth, key)?;
        while tokens.len() > length && n > 0 {
            n -= 1;
            tokens = self.tokens(n, depth, key)?;
        }
        loop {
            let more = self.tokens(n + 1, depth, key)?;
            if more.len() > length {
                break;
            }
            (n, tokens) = (n + 1, more);
        }
        let (text, before) = Self::text(n, depth, key);
        Ok(Prompt {
            text,
            tokens,
            before,
            after: n - before,
        })
    }
}

/// Random 5-digit keys, `count` of them, reproducible from `seed` and the cell.
fn keys(seed: u64, length: usize, depth: u32, count: usize) -> Vec<u32> {
    let mut rng = SplitMix(
        seed ^ (length as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (depth as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    (0..count)
        .map(|_| 10_000 + (rng.next_u64() % 90_000) as u32)
        .collect()
}

/// One model answering pass-key prompts greedily.
struct Answerer<'a> {
    model: &'a Model,
    text: &'a Text,
    /// Tokens that end an answer.
    stops: Vec<u32>,
    /// Prompt tokens fed per forward.
    segment: usize,
}

impl<'a> Answerer<'a> {
    fn new(model: &'a Model, text: &'a Text, segment: usize) -> Self {
        Self {
            model,
            text,
            stops: stop_ids(text),
            segment,
        }
    }

    /// The greedy answer to `prompt`, prefilled `segment` tokens at a time.
    fn answer(&self, prompt: &[u32]) -> Result<String> {
        let mut state = self.model.new_state()?;
        let mut logits = self.model.prefill(prompt, &mut state, self.segment)?;
        let mut out = Vec::with_capacity(ANSWER_TOKENS);
        for _ in 0..ANSWER_TOKENS {
            let next = argmax(&logits)?;
            if self.stops.contains(&next) {
                break;
            }
            out.push(next);
            logits = self.model.forward(&[next], &mut state, Logits::Last)?;
        }
        Ok(self.text.decode(&out, true)?)
    }
}

fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?)
}

/// Checks the options before any model is loaded.
pub(super) fn validate(o: &PasskeyOptions) -> Result<()> {
    if o.lengths.is_empty() || o.lengths.contains(&0) {
        return Err(Error::flag(
            "--passkey-lengths",
            "give one or more lengths in tokens",
        ));
    }
    if o.depths.is_empty() || o.depths.iter().any(|&d| d > 100) {
        return Err(Error::flag(
            "--passkey-depths",
            "give one or more depths between 0 and 100 (percent)",
        ));
    }
    if o.keys == 0 {
        return Err(Error::flag("--passkey-keys", "must be at least 1"));
    }
    Ok(())
}

/// Runs every (length, depth, key) on the model and, within its context, the reference.
pub(super) fn run(
    o: &PasskeyOptions,
    m: &Loaded,
    segment: usize,
    progress: &Progress,
) -> Result<PasskeyReport> {
    let builder = PromptBuilder {
        tokenizer: m.text.tokenizer(),
    };
    let model = Answerer::new(&m.model, &m.text, segment);
    let reference = m
        .reference
        .as_ref()
        .map(|r| Answerer::new(r, &m.text, segment));
    let ref_max = m
        .reference
        .as_ref()
        .map(|r| r.config().max_position_embeddings);
    let total = o.lengths.len() * o.depths.len() * o.keys;
    let bar = progress.items(total as u64, "pass key");
    let mut trials = Vec::with_capacity(total);
    for &length in &o.lengths {
        for &depth in &o.depths {
            for key in keys(o.seed, length, depth, o.keys) {
                let prompt = builder.build(length, depth, key)?;
                let model_answer = model.answer(&prompt.tokens)?;
                let reference_answer = match &reference {
                    Some(r) if ref_max.is_some_and(|max| length <= max) => {
                        Some(r.answer(&prompt.tokens)?)
                    }
                    _ => None,
                };
                let digits = key.to_string();
                trials.push(PasskeyTrial {
                    length,
                    prompt_tokens: prompt.tokens.len(),
                    depth,
                    key,
                    model_correct: model_answer.contains(&digits),
                    model_answer,
                    reference_correct: reference_answer.as_ref().map(|a| a.contains(&digits)),
                    reference_answer,
                });
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    Ok(summarize(o, ref_max, trials))
}

/// Share of `trials` answered correctly by the model, and by the reference (over the ones
/// it was asked; `None` when none).
fn accuracy<'a>(trials: impl Iterator<Item = &'a PasskeyTrial> + Clone) -> (f64, Option<f64>) {
    let share = |hits: usize, n: usize| hits as f64 / n.max(1) as f64;
    let n = trials.clone().count();
    let model = trials.clone().filter(|t| t.model_correct).count();
    let asked: Vec<bool> = trials.filter_map(|t| t.reference_correct).collect();
    let reference =
        (!asked.is_empty()).then(|| share(asked.iter().filter(|&&c| c).count(), asked.len()));
    (share(model, n), reference)
}

fn summarize(
    o: &PasskeyOptions,
    reference_max_tokens: Option<usize>,
    trials: Vec<PasskeyTrial>,
) -> PasskeyReport {
    let by_length = o
        .lengths
        .iter()
        .map(|&tokens| {
            let (model, reference) = accuracy(trials.iter().filter(|t| t.length == tokens));
            PasskeyLength {
                tokens,
                model,
                reference,
            }
        })
        .collect();
    let by_depth = o
        .depths
        .iter()
        .map(|&depth| {
            let (model, reference) = accuracy(trials.iter().filter(|t| t.depth == depth));
            PasskeyDepth {
                depth,
                model,
                reference,
            }
        })
        .collect();
    let (model_accuracy, reference_accuracy) = accuracy(trials.iter());
    PasskeyReport {
        format: FORMAT,
        keys: o.keys,
        seed: o.seed,
        reference_max_tokens,
        model_accuracy,
        reference_accuracy,
        by_length,
        by_depth,
        trials,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_five_digits_and_seeded() {
        let a = keys(7, 1024, 50, 20);
        assert!(a.iter().all(|k| (10_000..100_000).contains(k)));
        assert_eq!(a, keys(7, 1024, 50, 20));
        assert_ne!(a, keys(8, 1024, 50, 20));
        assert_ne!(keys(7, 1024, 10, 1), keys(7, 1024, 30, 1));
    }
}
