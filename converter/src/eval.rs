//! `eval`: how close a model is to a reference on held-out text.
//!
//! Over every position of the data (cut into `seq_len` chunks, each run from a fresh
//! state) it measures:
//! - perplexity, `exp(mean next-token NLL)`, of the model and of the reference, and their
//!   ratio (the number recovery is judged by: 1.0 means as good as the original);
//! - greedy agreement: how often the model's most likely next token is the reference's;
//! - mean KL(reference || model) between the next-token distributions, in nats.
//!
//! With `--adapter` the model is evaluated with a LoRA adapter applied on the fly, so an
//! adapter can be judged before it is merged.
//!
//! The same numbers are also given by how much context the prediction had (1-64 tokens,
//! 65-128, 129-256, ...): a linearized model sees the first tokens exactly through its
//! window, and later ones only through its recurrent state, so where its gap to the original
//! lies says whether the window or the state is short.
//!
//! Each report also gives the bytes of state one sequence holds at `seq_len` tokens, split
//! by kind, and with `decode_latency` the median time of a decode step after a `seq_len`
//! prefill, so structures can be compared in one table ([`render_comparison`]).

use std::fmt::Write as _;
use std::path::PathBuf;

use candle_core::{DType, Tensor, D};
use liger_model::{lora, Logits, Model, SeqStep};
use serde::Serialize;

use crate::adapter::DeviceChoice;
use crate::inspect::human_bytes;
use crate::progress::Progress;
use crate::recover::data::{self, TokenStream};
use crate::recover::load_tokenizer;
use crate::recover::template::ChatTemplate;
use crate::{Error, Result};
use liger_model::layers::Quantization;

/// Everything `liger-convert eval` takes.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: PathBuf,
    /// LoRA adapter applied to `model` without merging.
    pub adapter: Option<PathBuf>,
    pub reference: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub seq_len: usize,
    /// Chunks run together.
    pub batch: usize,
    pub device: DeviceChoice,
    /// Quantize the model (after merging the adapter) to measure what it costs.
    pub quantize: Option<Quantization>,
    /// Also time decode steps (adapter merged) after a `seq_len`-token prefill.
    pub decode_latency: bool,
}

impl EvalOptions {
    pub fn new(model: impl Into<PathBuf>, data: Vec<PathBuf>) -> Self {
        Self {
            model: model.into(),
            adapter: None,
            reference: None,
            data,
            seq_len: 512,
            batch: 2,
            device: DeviceChoice::Cpu,
            quantize: None,
            decode_latency: false,
        }
    }
}

/// One model's numbers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scores {
    pub path: PathBuf,
    /// Mean next-token negative log-likelihood, nats.
    pub nll: f64,
    pub perplexity: f64,
}

/// What `eval` reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    pub model: Scores,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<&'static str>,
    pub reference: Option<Scores>,
    /// Model perplexity / reference perplexity.
    pub perplexity_ratio: Option<f64>,
    /// Fraction of positions where both predict the same next token.
    pub agreement: Option<f64>,
    /// Mean KL(reference || model), nats per position.
    pub kl: Option<f64>,
    /// Predicted positions.
    pub tokens: u64,
    pub chunks: usize,
    pub seq_len: usize,
    /// One sequence's state after `seq_len` tokens.
    pub state: StateBytesReport,
    /// Median decode step after a `seq_len`-token prefill, when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_ms_per_token: Option<f64>,
    /// The same measures by context length, shortest first.
    pub by_context: Vec<ContextBucket>,
}

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

/// [`liger_model::StateBytes`] for the report.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct StateBytesReport {
    pub total: usize,
    pub recurrent: usize,
    pub window: usize,
    pub kv_cache: usize,
}

impl From<liger_model::StateBytes> for StateBytesReport {
    fn from(b: liger_model::StateBytes) -> Self {
        Self {
            total: b.total(),
            recurrent: b.recurrent,
            window: b.window,
            kv_cache: b.kv_cache,
        }
    }
}

/// Decode steps timed for [`EvalOptions::decode_latency`].
const LATENCY_STEPS: usize = 16;

/// Sums over positions, in f64.
#[derive(Default, Clone)]
struct Acc {
    nll: f64,
    ref_nll: f64,
    agree: u64,
    kl: f64,
    n: u64,
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

    /// Ratio, agreement and KL against the reference, when there is one.
    fn comparison(&self, has_ref: bool) -> (Option<f64>, Option<f64>, Option<f64>) {
        let n = self.n.max(1) as f64;
        if !has_ref {
            return (None, None, None);
        }
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
struct Totals {
    all: Acc,
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

    fn buckets(&self, has_ref: bool) -> Vec<ContextBucket> {
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

/// Evaluates `opts.model` (and compares it with `opts.reference`).
pub fn evaluate(opts: &EvalOptions, progress: &Progress) -> Result<EvalReport> {
    if opts.seq_len < 2 {
        return Err(Error::flag(
            "--seq-len",
            "must be at least 2 (one prediction)",
        ));
    }
    if opts.batch == 0 {
        return Err(Error::flag("--batch", "must be at least 1"));
    }
    if opts.data.is_empty() {
        return Err(Error::flag(
            "--data",
            "give at least one file to evaluate on",
        ));
    }
    let device = opts.device.device()?;
    let entries = data::read_files(&opts.data)?;
    let spinner = progress.spinner("load");
    let mut model = liger_model::weights::load_model(&opts.model, DType::F32, &device)?;
    if let Some(a) = &opts.adapter {
        let (cfg, tensors) = lora::load_adapter(a)?;
        model.apply_lora(&cfg, &tensors)?;
    }
    if let Some(q) = opts.quantize {
        // Served quantized models have their adapters merged first; so here (a quantized
        // checkpoint keeps its blocks and its adapter unmerged, as the server does).
        if !model.is_quantized() {
            model.merge_lora()?;
        }
        model.quantize(q)?;
    }
    let reference = opts
        .reference
        .as_ref()
        .map(|r| liger_model::weights::load_model(r, DType::F32, &device))
        .transpose()?;
    spinner.finish_and_clear();
    if let Some(r) = &reference {
        if r.config().vocab_size != model.config().vocab_size {
            return Err(Error::flag(
                "--reference",
                format!(
                    "has a vocabulary of {} tokens, the model {}",
                    r.config().vocab_size,
                    model.config().vocab_size
                ),
            ));
        }
    }
    let tokenizer = load_tokenizer(
        &opts.model,
        opts.reference.as_deref().unwrap_or(&opts.model),
    )?;
    let template = ChatTemplate::from_folder(&opts.model)?;
    let eos = model.config().eos_token_ids.first().copied().unwrap_or(0);
    let mut stream = TokenStream::default();
    stream.extend(&entries, &tokenizer, &template, eos)?;
    let chunks = stream.chunks(opts.seq_len);
    if chunks.is_empty() {
        return Err(Error::Data(
            "the data holds fewer than two tokens: nothing to evaluate".into(),
        ));
    }
    let bar = progress.items(chunks.len() as u64, "eval");
    let mut totals = Totals::default();
    for group in chunks.chunks(opts.batch) {
        let toks: Vec<&[u32]> = group.iter().map(|c| c.tokens.as_slice()).collect();
        let m = all_logits(&model, &toks)?;
        let r = reference
            .as_ref()
            .map(|r| all_logits(r, &toks))
            .transpose()?;
        score(&m, r.as_ref(), &toks, &mut totals)?;
        bar.inc(group.len() as u64);
    }
    bar.finish_and_clear();
    let decode_ms_per_token = if opts.decode_latency {
        model.merge_lora()?;
        Some(decode_latency(&model, &chunks[0].tokens)?)
    } else {
        None
    };
    let acc = &totals.all;
    let n = acc.n.max(1) as f64;
    let scores = |path: &PathBuf, nll: f64| Scores {
        path: path.clone(),
        nll: nll / n,
        perplexity: (nll / n).exp(),
    };
    let model_scores = scores(&opts.model, acc.nll);
    let ref_scores = opts.reference.as_ref().map(|p| scores(p, acc.ref_nll));
    let has_ref = ref_scores.is_some();
    let (perplexity_ratio, agreement, kl) = acc.comparison(has_ref);
    Ok(EvalReport {
        perplexity_ratio,
        agreement,
        kl,
        model: model_scores,
        adapter: opts.adapter.clone(),
        quantize: opts.quantize.map(Quantization::name),
        reference: ref_scores,
        tokens: acc.n,
        chunks: chunks.len(),
        seq_len: opts.seq_len,
        state: model.state_spec().bytes_by_kind_at(opts.seq_len).into(),
        decode_ms_per_token,
        by_context: totals.buckets(has_ref),
    })
}

/// Median milliseconds of a one-token step after prefilling `prompt`.
fn decode_latency(model: &Model, prompt: &[u32]) -> Result<f64> {
    let mut state = model.new_state()?;
    let mut logits = model.prefill(prompt, &mut state, 512)?;
    let mut times = Vec::with_capacity(LATENCY_STEPS);
    for _ in 0..LATENCY_STEPS {
        let next = logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?;
        let t = std::time::Instant::now();
        logits = model.forward(&[next], &mut state, Logits::Last)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Log-probabilities at every position of fresh sequences, concatenated: `[tokens, vocab]`.
fn all_logits(model: &Model, seqs: &[&[u32]]) -> Result<Tensor> {
    let mut states = seqs
        .iter()
        .map(|_| model.new_state())
        .collect::<liger_model::Result<Vec<_>>>()?;
    let mut steps: Vec<SeqStep> = states
        .iter_mut()
        .zip(seqs)
        .map(|(s, t)| SeqStep {
            tokens: t,
            state: s,
        })
        .collect();
    let out = model.forward_batch(&mut steps, Logits::All)?;
    Ok(candle_nn::ops::log_softmax(
        &Tensor::cat(&out, 0)?,
        D::Minus1,
    )?)
}

/// Adds the positions that have a next token to `totals`.
fn score(m: &Tensor, r: Option<&Tensor>, seqs: &[&[u32]], totals: &mut Totals) -> Result<()> {
    let device = m.device();
    // Rows with a next token, that token, and the context the prediction had.
    let mut rows = Vec::new();
    let mut next = Vec::new();
    let mut context = Vec::new();
    let mut start = 0u32;
    for s in seqs {
        for t in 0..s.len() - 1 {
            rows.push(start + t as u32);
            next.push(s[t + 1]);
            context.push(t + 1);
        }
        start += s.len() as u32;
    }
    let rows = Tensor::new(rows.as_slice(), device)?;
    let next = Tensor::new(next.as_slice(), device)?.unsqueeze(1)?;
    let per_row = |t: Tensor| -> Result<Vec<f64>> {
        Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    };
    let m = m.index_select(&rows, 0)?;
    let nll = per_row(m.gather(&next, 1)?.neg()?)?;
    let (ref_nll, agree, kl) = match r {
        Some(r) => {
            let r = r.index_select(&rows, 0)?;
            let same = m.argmax(D::Minus1)?.eq(&r.argmax(D::Minus1)?)?;
            (
                per_row(r.gather(&next, 1)?.neg()?)?,
                per_row(same)?.into_iter().map(|x| x != 0.0).collect(),
                per_row((r.exp()? * (&r - &m)?)?.sum(D::Minus1)?)?,
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

/// The report as a table.
pub fn render(r: &EvalReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "data        {} tokens predicted, {} chunks of up to {}",
        r.tokens, r.chunks, r.seq_len
    );
    let mut model = match &r.adapter {
        Some(a) => format!("{} + adapter {}", r.model.path.display(), a.display()),
        None => r.model.path.display().to_string(),
    };
    if let Some(q) = r.quantize {
        model.push_str(&format!(", quantized to {q}"));
    }
    let _ = writeln!(s, "model       {model}");
    if let Some(rf) = &r.reference {
        let _ = writeln!(s, "reference   {}", rf.path.display());
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<24} {:>12} {:>12}", "", "model", "reference");
    let refv = |f: &dyn Fn(&Scores) -> f64| {
        r.reference
            .as_ref()
            .map_or("-".to_owned(), |x| format!("{:.3}", f(x)))
    };
    let _ = writeln!(
        s,
        "{:<24} {:>12.3} {:>12}",
        "perplexity",
        r.model.perplexity,
        refv(&|x| x.perplexity)
    );
    let _ = writeln!(
        s,
        "{:<24} {:>12.4} {:>12}",
        "NLL (nats/token)",
        r.model.nll,
        r.reference
            .as_ref()
            .map_or("-".to_owned(), |x| format!("{:.4}", x.nll))
    );
    if let (Some(ratio), Some(agree), Some(kl)) = (r.perplexity_ratio, r.agreement, r.kl) {
        let _ = writeln!(s, "{:<24} {:>11.3}x", "perplexity ratio", ratio);
        let _ = writeln!(s, "{:<24} {:>11.1}%", "top-1 agreement", 100.0 * agree);
        let _ = writeln!(s, "{:<24} {:>12.4}", "KL(ref || model), nats", kl);
    }
    let _ = writeln!(
        s,
        "{:<24} {:>12}",
        format!("state at {} tokens", r.seq_len),
        human_bytes(r.state.total as u64)
    );
    if let Some(ms) = r.decode_ms_per_token {
        let _ = writeln!(s, "{:<24} {:>9.1} ms", "decode step", ms);
    }
    if r.by_context.len() > 1 {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:>8} {:>12} {:>9} {:>10} {:>8}",
            "context", "tokens", "perplexity", "ratio", "agreement", "KL"
        );
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_owned(), f);
        for b in &r.by_context {
            let _ = writeln!(
                s,
                "{:<12} {:>8} {:>12.3} {:>9} {:>10} {:>8}",
                format!("{}-{}", b.from, b.to),
                b.tokens,
                b.perplexity,
                opt(b.perplexity_ratio, &|x| format!("{x:.3}x")),
                opt(b.agreement, &|x| format!("{:.1}%", 100.0 * x)),
                opt(b.kl, &|x| format!("{x:.4}")),
            );
        }
    }
    s
}

/// Several reports (same data and reference) as one Markdown table.
pub fn render_comparison(reports: &[EvalReport]) -> String {
    let mut s = String::new();
    let Some(first) = reports.first() else {
        return s;
    };
    let _ = writeln!(
        s,
        "{} tokens predicted in chunks of up to {}{}\n",
        first.tokens,
        first.seq_len,
        first.reference.as_ref().map_or(String::new(), |r| format!(
            ", reference {} (perplexity {:.3})",
            r.path.display(),
            r.perplexity
        ))
    );
    let _ = writeln!(
        s,
        "| model | perplexity | ratio | agreement | KL | decode ms/token | state at {} (recurrent + window + KV) |",
        first.seq_len
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_owned(), f);
    for r in reports {
        let name = match &r.adapter {
            Some(a) => format!("{} + {}", r.model.path.display(), a.display()),
            None => r.model.path.display().to_string(),
        };
        let _ = writeln!(
            s,
            "| {name} | {:.3} | {} | {} | {} | {} | {} ({} + {} + {}) |",
            r.model.perplexity,
            opt(r.perplexity_ratio, &|x| format!("{x:.2}x")),
            opt(r.agreement, &|x| format!("{:.1}%", 100.0 * x)),
            opt(r.kl, &|x| format!("{x:.3}")),
            opt(r.decode_ms_per_token, &|x| format!("{x:.1}")),
            human_bytes(r.state.total as u64),
            human_bytes(r.state.recurrent as u64),
            human_bytes(r.state.window as u64),
            human_bytes(r.state.kv_cache as u64),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_buckets_double_from_64() {
        let got: Vec<usize> = [1, 64, 65, 128, 129, 256, 257, 512, 513]
            .into_iter()
            .map(bucket_of)
            .collect();
        assert_eq!(got, [0, 0, 1, 1, 2, 2, 3, 3, 4]);
        for b in 0..5 {
            let (from, to) = bucket_range(b);
            assert_eq!((bucket_of(from), bucket_of(to)), (b, b));
            assert_eq!(bucket_of(to + 1), b + 1);
        }
    }
}
