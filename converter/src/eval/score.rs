//! Next-token scoring of held-out chunks with memory linear in their length.
//!
//! A chunk is fed to the models in segments of at most `segment` tokens, each segment
//! carrying the state the one before it left (a Liger layer's window cache and recurrent
//! memory, a Transformer's KV cache), and each segment's predictions are scored as soon as
//! its log-probabilities exist. Only one segment's `[tokens, vocab]` log-probabilities and
//! one segment's attention mask are ever held, so an 8,192-token chunk costs what a
//! 512-token one does, besides a reference's growing KV cache. A segment as long as the
//! chunk is the one-forward form the segmented one is tested against.
//!
//! The context of a prediction is its position in the whole chunk, so the by-context
//! buckets (1-64, 65-128, ... tokens) reach as far as the chunks do.

use candle_core::{DType, Tensor, D};
use liger_model::{Logits, Model, SeqStep, SequenceState};
use serde::Serialize;

use crate::Result;

/// Predictions made with `from..=to` tokens of context (the predicting token included).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContextBucket {
    pub from: usize,
    pub to: usize,
    pub tokens: u64,
    pub perplexity: f64,
    pub perplexity_ratio: Option<f64>,
    pub agreement: Option<f64>,
    pub kl: Option<f64>,
}

/// Context lengths of the first bucket; each later one is twice as long as the one before.
const FIRST_BUCKET: usize = 64;

/// The bucket of a prediction made with `context` tokens: 1-64 -> 0, 65-128 -> 1, ...
fn bucket_of(context: usize) -> usize {
    let (mut hi, mut b) = (FIRST_BUCKET, 0);
    while context > hi {
        hi *= 2;
        b += 1;
    }
    b
}

/// The context lengths `(from, to)` of bucket `b`.
fn bucket_range(b: usize) -> (usize, usize) {
    let to = FIRST_BUCKET << b;
    (if b == 0 { 1 } else { to / 2 + 1 }, to)
}

/// Sums over positions, in f64.
#[derive(Default, Clone)]
pub(super) struct Acc {
    pub nll: f64,
    pub ref_nll: f64,
    agree: u64,
    kl: f64,
    pub n: u64,
}

impl Acc {
    fn add(&mut self, p: &Prediction) {
        self.nll += p.nll;
        self.ref_nll += p.ref_nll;
        self.agree += u64::from(p.agree);
        self.kl += p.kl;
        self.n += 1;
    }

    fn perplexity(&self) -> f64 {
        (self.nll / self.n.max(1) as f64).exp()
    }

    /// Ratio, agreement and KL against the reference, when there is one (and positions).
    pub fn comparison(&self, has_ref: bool) -> (Option<f64>, Option<f64>, Option<f64>) {
        if !has_ref || self.n == 0 {
            return (None, None, None);
        }
        let n = self.n as f64;
        let ratio = ((self.nll - self.ref_nll) / n).exp();
        (Some(ratio), Some(self.agree as f64 / n), Some(self.kl / n))
    }
}

/// One position's numbers (the reference's are zero without one).
struct Prediction {
    nll: f64,
    ref_nll: f64,
    agree: bool,
    kl: f64,
}

/// The whole data's sums and each context bucket's.
#[derive(Default)]
pub(super) struct Totals {
    pub all: Acc,
    by_context: Vec<Acc>,
}

impl Totals {
    fn add(&mut self, context: usize, p: &Prediction) {
        self.all.add(p);
        let b = bucket_of(context);
        if self.by_context.len() <= b {
            self.by_context.resize(b + 1, Acc::default());
        }
        self.by_context[b].add(p);
    }

    pub fn buckets(&self, has_ref: bool) -> Vec<ContextBucket> {
        self.by_context
            .iter()
            .enumerate()
            .filter(|(_, a)| a.n > 0)
            .map(|(b, a)| {
                let (from, to) = bucket_range(b);
                let (perplexity_ratio, agreement, kl) = a.comparison(has_ref);
                ContextBucket {
                    from,
                    to,
                    tokens: a.n,
                    perplexity: a.perplexity(),
                    perplexity_ratio,
                    agreement,
                    kl,
                }
            })
            .collect()
    }
}

/// The models one group of chunks is scored with.
pub(super) struct Scorer<'a> {
    pub model: &'a Model,
    pub reference: Option<&'a Model>,
    /// Most tokens of a chunk fed in one forward.
    pub segment: usize,
}

/// Fresh states, one per chunk of a group.
fn fresh(model: &Model, n: usize) -> Result<Vec<SequenceState>> {
    Ok((0..n)
        .map(|_| model.new_state())
        .collect::<liger_model::Result<_>>()?)
}

impl Scorer<'_> {
    /// Adds every prediction of `chunks` (run together) to `totals`. A chunk's last token
    /// predicts nothing, so only the tokens before it are fed.
    pub fn score_group(&self, chunks: &[&[u32]], totals: &mut Totals) -> Result<()> {
        let fed: Vec<&[u32]> = chunks.iter().map(|c| &c[..c.len() - 1]).collect();
        let longest = fed.iter().map(|f| f.len()).max().unwrap_or(0);
        let mut states = fresh(self.model, chunks.len())?;
        let mut ref_states = self.reference.map(|r| fresh(r, chunks.len())).transpose()?;
        for start in (0..longest).step_by(self.segment.max(1)) {
            let pieces: Vec<&[u32]> = fed
                .iter()
                .map(|f| &f[start.min(f.len())..(start + self.segment).min(f.len())])
                .collect();
            let m = log_probs(self.model, &mut states, &pieces)?;
            let r = match (self.reference, ref_states.as_mut()) {
                (Some(r), Some(s)) => Some(log_probs(r, s, &pieces)?),
                _ => None,
            };
            // The token each fed position predicts, and the context it had.
            let mut next = Vec::new();
            let mut context = Vec::new();
            for (chunk, piece) in chunks.iter().zip(&pieces) {
                if piece.is_empty() {
                    continue;
                }
                let positions = start..start + piece.len();
                next.extend_from_slice(&chunk[positions.start + 1..positions.end + 1]);
                context.extend(positions.map(|t| t + 1));
            }
            score(&m, r.as_ref(), &next, &context, totals)?;
        }
        Ok(())
    }
}

/// Log-probabilities at every token of the non-empty `pieces`, each read by its own state
/// (which advances past it), concatenated in order: `[tokens, vocab]`.
fn log_probs(model: &Model, states: &mut [SequenceState], pieces: &[&[u32]]) -> Result<Tensor> {
    let mut steps: Vec<SeqStep> = states
        .iter_mut()
        .zip(pieces)
        .filter(|(_, p)| !p.is_empty())
        .map(|(state, tokens)| SeqStep {
            tokens,
            state,
            argmax_only: false,
        })
        .collect();
    let out = model.forward_batch(&mut steps, Logits::All)?;
    Ok(candle_nn::ops::log_softmax(
        &Tensor::cat(&out, 0)?,
        D::Minus1,
    )?)
}

/// Adds one row of log-probabilities per prediction (`m`, and `r` of the reference) to
/// `totals`: row `i` predicts `next[i]` with `context[i]` tokens of context.
fn score(
    m: &Tensor,
    r: Option<&Tensor>,
    next: &[u32],
    context: &[usize],
    totals: &mut Totals,
) -> Result<()> {
    let next = Tensor::new(next, m.device())?.unsqueeze(1)?;
    let per_row = |t: Tensor| -> Result<Vec<f64>> {
        Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    };
    let nll = per_row(m.gather(&next, 1)?.neg()?)?;
    let (ref_nll, agree, kl) = match r {
        Some(r) => {
            let same = m.argmax(D::Minus1)?.eq(&r.argmax(D::Minus1)?)?;
            (
                per_row(r.gather(&next, 1)?.neg()?)?,
                per_row(same)?.into_iter().map(|x| x != 0.0).collect(),
                per_row((r.exp()? * (r - m)?)?.sum(D::Minus1)?)?,
            )
        }
        None => (
            vec![0.0; nll.len()],
            vec![false; nll.len()],
            vec![0.0; nll.len()],
        ),
    };
    for (i, &c) in context.iter().enumerate() {
        let p = Prediction {
            nll: nll[i],
            ref_nll: ref_nll[i],
            agree: agree[i],
            kl: kl[i],
        };
        totals.add(c, &p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_buckets_double_from_64() {
        let got: Vec<usize> = [1, 64, 65, 128, 129, 256, 257, 512, 513, 8192, 8193]
            .into_iter()
            .map(bucket_of)
            .collect();
        assert_eq!(got, [0, 0, 1, 1, 2, 2, 3, 3, 4, 7, 8]);
        for b in 0..9 {
            let (from, to) = bucket_range(b);
            assert_eq!((bucket_of(from), bucket_of(to)), (b, b));
            assert_eq!(bucket_of(to + 1), b + 1);
        }
        assert_eq!(bucket_range(7), (4097, 8192));
    }
}
