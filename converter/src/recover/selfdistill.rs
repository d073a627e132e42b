//! `--self-distill N`: the teacher answers N prompts and the conversations become training
//! text. The student then learns the teacher's own behaviour on the kind of input it will
//! serve (chat), with no outside data set.
//!
//! Generation batches sequences with [`Model::forward_batch`]: each step feeds every active
//! sequence its pending tokens (a whole prompt for a newcomer, one token otherwise), and a
//! finished sequence's slot goes to the next prompt at once, so the batch stays full.
//!
//! The first pass over the prompts is greedy (the teacher's most likely answer); further
//! passes, when N exceeds the prompts, sample at temperature 0.8 from the 40 most likely
//! tokens with a generator seeded per response, so the text differs but is reproducible.

use candle_core::D;
use indicatif::ProgressBar;
use liger_model::rng::SplitMix;
use liger_model::{Logits, Model, SeqStep, SequenceState};

use crate::Result;
use liger_model::chat::Message;
use liger_model::text::Text;

/// How the teacher writes.
#[derive(Debug, Clone, Copy)]
pub struct GenSettings {
    /// Responses to write.
    pub count: usize,
    /// Longest response, in tokens.
    pub max_tokens: usize,
    /// Sequences generated together.
    pub batch: usize,
    pub seed: u64,
}

const TEMPERATURE: f32 = 0.8;
const TOP_K: usize = 40;
/// Turn-closing tokens of common chat formats, besides the config's EOS ids.
const END_MARKERS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
];

struct Active {
    job: usize,
    state: SequenceState,
    pending: Vec<u32>,
    out: Vec<u32>,
    rng: Option<SplitMix>,
}

/// Token ids that end a response: the model's (as serving stops) and the usual
/// end-of-turn markers its tokenizer knows.
pub fn stop_ids(text: &Text) -> Vec<u32> {
    let mut ids = text.eos_token_ids().to_vec();
    ids.extend(
        END_MARKERS
            .iter()
            .filter_map(|m| text.tokenizer().token_to_id(m)),
    );
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The teacher's answers: conversation `j` answers `prompts[j % prompts.len()]`.
pub fn generate(
    teacher: &Model,
    text: &Text,
    prompts: &[Vec<Message>],
    s: GenSettings,
    bar: &ProgressBar,
    on_done: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<Message>>> {
    if prompts.is_empty() || s.count == 0 {
        return Ok(Vec::new());
    }
    let stops = stop_ids(text);
    let mut encoded = Vec::with_capacity(prompts.len());
    for p in prompts {
        let rendered = text.template().render(p, true)?;
        encoded.push(text.encode_rendered(&rendered)?.get_ids().to_vec());
    }
    let mut results: Vec<Option<String>> = vec![None; s.count];
    let mut next_job = 0;
    let mut slots: Vec<Active> = Vec::new();
    let mut done = 0;
    while done < s.count {
        while slots.len() < s.batch.max(1) && next_job < s.count {
            let job = next_job;
            next_job += 1;
            let sample = job >= prompts.len();
            slots.push(Active {
                job,
                state: teacher.new_state()?,
                pending: encoded[job % prompts.len()].clone(),
                out: Vec::new(),
                rng: sample.then(|| {
                    SplitMix(s.seed ^ (job as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
                }),
            });
        }
        let logits = {
            let mut steps: Vec<SeqStep> = slots
                .iter_mut()
                .map(|a| SeqStep {
                    tokens: &a.pending,
                    state: &mut a.state,
                    argmax_only: false,
                })
                .collect();
            teacher.forward_batch(&mut steps, Logits::Last)?
        };
        let mut finished = Vec::new();
        for (i, (a, l)) in slots.iter_mut().zip(logits).enumerate() {
            let next = match &mut a.rng {
                None => l.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?,
                Some(rng) => sample(&l.squeeze(0)?.to_vec1::<f32>()?, rng),
            };
            let stop = stops.contains(&next);
            if !stop {
                a.out.push(next);
            }
            if stop || a.out.len() >= s.max_tokens {
                finished.push(i);
            } else {
                a.pending = vec![next];
            }
        }
        for &i in finished.iter().rev() {
            let a = slots.swap_remove(i);
            results[a.job] = Some(text.decode(&a.out, true)?.trim().to_owned());
            done += 1;
            bar.inc(1);
            on_done(done);
        }
    }
    Ok(results
        .into_iter()
        .enumerate()
        .filter_map(|(j, r)| {
            let r = r.filter(|t| !t.is_empty())?;
            let mut conv = prompts[j % prompts.len()].clone();
            conv.push(Message::new("assistant", r));
            Some(conv)
        })
        .collect())
}

/// Samples from `logits` at [`TEMPERATURE`] among the [`TOP_K`] most likely tokens.
fn sample(logits: &[f32], rng: &mut SplitMix) -> u32 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let k = TOP_K.min(idx.len());
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_unstable_by(cmp);
    let max = logits[idx[0]];
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / TEMPERATURE) as f64).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.uniform() as f64 * total;
    for (&i, &wi) in idx.iter().zip(&w) {
        if u < wi {
            return i as u32;
        }
        u -= wi;
    }
    idx[k - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_seeded_and_prefers_likely_tokens() {
        let mut logits = vec![0f32; 100];
        logits[7] = 10.0;
        let a: Vec<u32> = (0..20)
            .map({
                let mut r = SplitMix(1);
                move |_| sample(&logits, &mut r)
            })
            .collect();
        assert!(a.iter().filter(|&&t| t == 7).count() >= 19);
        let logits = vec![0f32; 100];
        let draw = |seed| {
            let mut r = SplitMix(seed);
            (0..10).map(|_| sample(&logits, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert!(draw(3).iter().all(|&t| t < 40), "only the top 40 are drawn");
    }
}
