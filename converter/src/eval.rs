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

use std::fmt::Write as _;
use std::path::PathBuf;

use candle_core::{DType, Tensor, D};
use liger_model::{lora, Logits, Model, SeqStep};
use serde::Serialize;

use crate::adapter::DeviceChoice;
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
}

/// Sums over positions, in f64.
#[derive(Default)]
struct Acc {
    nll: f64,
    ref_nll: f64,
    agree: u64,
    kl: f64,
    n: u64,
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
        // Served quantized models have their adapters merged first; so here.
        model.merge_lora()?;
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
    let mut acc = Acc::default();
    for group in chunks.chunks(opts.batch) {
        let toks: Vec<&[u32]> = group.iter().map(|c| c.tokens.as_slice()).collect();
        let m = all_logits(&model, &toks)?;
        let r = reference
            .as_ref()
            .map(|r| all_logits(r, &toks))
            .transpose()?;
        score(&m, r.as_ref(), &toks, &mut acc)?;
        bar.inc(group.len() as u64);
    }
    bar.finish_and_clear();
    let n = acc.n.max(1) as f64;
    let scores = |path: &PathBuf, nll: f64| Scores {
        path: path.clone(),
        nll: nll / n,
        perplexity: (nll / n).exp(),
    };
    let model_scores = scores(&opts.model, acc.nll);
    let ref_scores = opts.reference.as_ref().map(|p| scores(p, acc.ref_nll));
    let has_ref = ref_scores.is_some();
    Ok(EvalReport {
        perplexity_ratio: ref_scores
            .as_ref()
            .map(|r| model_scores.perplexity / r.perplexity),
        agreement: has_ref.then(|| acc.agree as f64 / n),
        kl: has_ref.then(|| acc.kl / n),
        model: model_scores,
        adapter: opts.adapter.clone(),
        quantize: opts.quantize.map(Quantization::name),
        reference: ref_scores,
        tokens: acc.n,
        chunks: chunks.len(),
        seq_len: opts.seq_len,
    })
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

/// Adds the positions that have a next token to `acc`.
fn score(m: &Tensor, r: Option<&Tensor>, seqs: &[&[u32]], acc: &mut Acc) -> Result<()> {
    let device = m.device();
    // Rows with a next token, and that token.
    let mut rows = Vec::new();
    let mut next = Vec::new();
    let mut start = 0u32;
    for s in seqs {
        for t in 0..s.len() - 1 {
            rows.push(start + t as u32);
            next.push(s[t + 1]);
        }
        start += s.len() as u32;
    }
    let rows = Tensor::new(rows.as_slice(), device)?;
    let next = Tensor::new(next.as_slice(), device)?.unsqueeze(1)?;
    let m = m.index_select(&rows, 0)?;
    let sum =
        |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    acc.nll -= sum(m.gather(&next, 1)?)?;
    acc.n += next.dim(0)? as u64;
    if let Some(r) = r {
        let r = r.index_select(&rows, 0)?;
        acc.ref_nll -= sum(r.gather(&next, 1)?)?;
        let same = m.argmax(D::Minus1)?.eq(&r.argmax(D::Minus1)?)?;
        acc.agree += same.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as u64;
        acc.kl += sum((r.exp()? * (&r - &m)?)?)?;
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
    s
}
