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
//! lies says whether the window or the state is short. Chunks are fed in segments of
//! `segment` tokens carrying their state ([`score`]), so long chunks (8,192 tokens and
//! more) need memory linear in their length.
//!
//! Two measures of what a model remembers past its window go beyond perplexity:
//! - `--passkey` ([`passkey`]): a 5-digit key hidden in filler at several lengths and
//!   depths, retrieved by greedy generation;
//! - `--loops` ([`loops`]): the share of greedy chat answers that repeat themselves.
//!
//! Each report also gives the bytes of state one sequence holds at `seq_len` tokens, split
//! by kind, and with `decode_latency` the median time of a decode step after a `seq_len`
//! prefill, so structures can be compared in one table ([`render_comparison`]).

use std::path::PathBuf;

use candle_core::{DType, D};
use liger_model::{Logits, Model};
use serde::Serialize;

use crate::adapter::DeviceChoice;
use crate::progress::Progress;
use crate::recover::data::{self, TokenStream};
use crate::recover::load_text;
use crate::{Error, Result};
use liger_model::checkpoint::{Checkpoint, LoadOptions};
use liger_model::layers::Quantization;
use liger_model::text::Text;

pub mod loops;
pub mod passkey;
mod render;
mod score;

pub use loops::{LoopExample, LoopsOptions, LoopsReport};
pub use passkey::{PasskeyOptions, PasskeyReport};
pub use render::{render, render_comparison};
pub use score::ContextBucket;

/// Everything `liger-convert eval` takes.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: PathBuf,
    /// LoRA adapter applied to `model` without merging.
    pub adapter: Option<PathBuf>,
    pub reference: Option<PathBuf>,
    /// Held-out text; may be empty only when `passkey` or `loops` is asked for.
    pub data: Vec<PathBuf>,
    pub seq_len: usize,
    /// Chunks run together.
    pub batch: usize,
    /// Most tokens of a chunk (or a pass-key prompt) fed to a model in one forward.
    pub segment: usize,
    pub device: DeviceChoice,
    /// Quantize the model (after merging the adapter) to measure what it costs.
    pub quantize: Option<Quantization>,
    /// Also time decode steps (adapter merged) after a `seq_len`-token prefill.
    pub decode_latency: bool,
    /// Also run the pass-key retrieval test.
    pub passkey: Option<PasskeyOptions>,
    /// Also measure how often greedy chat answers loop.
    pub loops: Option<LoopsOptions>,
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
            segment: 512,
            device: DeviceChoice::Cpu,
            quantize: None,
            decode_latency: false,
            passkey: None,
            loops: None,
        }
    }
}

/// One model's numbers (NaN, null in JSON, when no data was given).
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
    /// Predicted positions (0 when no data was given).
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passkey: Option<PasskeyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loops: Option<LoopsReport>,
}

/// [`liger_model::StateBytes`] for the report.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct StateBytesReport {
    pub total: usize,
    pub recurrent: usize,
    pub window: usize,
    /// Global caches (kept tokens and the saliences they are chosen by).
    pub global: usize,
    pub kv_cache: usize,
}

impl From<liger_model::StateBytes> for StateBytesReport {
    fn from(b: liger_model::StateBytes) -> Self {
        Self {
            total: b.total(),
            recurrent: b.recurrent,
            window: b.window,
            global: b.global,
            kv_cache: b.kv_cache,
        }
    }
}

/// Decode steps timed for [`EvalOptions::decode_latency`].
const LATENCY_STEPS: usize = 16;

/// The models under evaluation and what turns text into their tokens.
pub(crate) struct Loaded {
    pub model: Model,
    pub reference: Option<Model>,
    pub text: Text,
}

/// Rejects unusable options before anything is loaded.
fn validate(opts: &EvalOptions) -> Result<()> {
    if opts.seq_len < 2 {
        return Err(Error::flag(
            "--seq-len",
            "must be at least 2 (one prediction)",
        ));
    }
    if opts.batch == 0 {
        return Err(Error::flag("--batch", "must be at least 1"));
    }
    if opts.segment == 0 {
        return Err(Error::flag("--segment", "must be at least 1"));
    }
    if opts.data.is_empty() && opts.passkey.is_none() && opts.loops.is_none() {
        return Err(Error::flag(
            "--data",
            "give at least one file to evaluate on (only --passkey or --loops run without it)",
        ));
    }
    if let Some(p) = &opts.passkey {
        passkey::validate(p)?;
    }
    if let Some(l) = &opts.loops {
        loops::validate(l)?;
    }
    Ok(())
}

/// Loads the model (adapter applied, quantized if asked), the reference and the tokenizer.
fn load(opts: &EvalOptions, progress: &Progress) -> Result<Loaded> {
    let device = opts.device.device()?;
    let spinner = progress.spinner("load");
    let mut stored = Checkpoint::open(&opts.model)?;
    if let Some(a) = &opts.adapter {
        stored = stored.with_adapter(a)?;
    }
    // The adapter stays unmerged unless the model is quantized: served quantized models
    // have their adapters merged first (a quantized checkpoint keeps its blocks and its
    // adapter unmerged, as the server does).
    let options = LoadOptions {
        merge_adapter: false,
        quantize: opts.quantize,
    };
    let model = stored.load(&device, DType::F32, &options)?;
    let reference_dir = opts
        .reference
        .as_deref()
        .map(Checkpoint::open)
        .transpose()?;
    let reference = reference_dir
        .as_ref()
        .map(|r| r.load(&device, DType::F32, &LoadOptions::default()))
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
    let text = match &reference_dir {
        Some(r) => load_text(&[&stored, r])?,
        None => load_text(&[&stored])?,
    };
    Ok(Loaded {
        model,
        reference,
        text,
    })
}

/// What scoring the held-out data gave (all empty without data).
#[derive(Default)]
struct Scored {
    /// Sums over all positions and by context.
    totals: score::Totals,
    chunks: usize,
    /// The first chunk's tokens (decode latency is timed after prefilling them).
    first_chunk: Vec<u32>,
}

/// Scores the held-out data.
fn score_data(opts: &EvalOptions, m: &Loaded, progress: &Progress) -> Result<Scored> {
    let entries = data::read_files(&opts.data)?;
    let eos = m.model.config().eos_token_ids.first().copied().unwrap_or(0);
    let mut stream = TokenStream::default();
    stream.extend(&entries, &m.text, eos)?;
    let chunks = stream.chunks(opts.seq_len);
    if chunks.is_empty() {
        return Err(Error::Data(
            "the data holds fewer than two tokens: nothing to evaluate".into(),
        ));
    }
    let scorer = score::Scorer {
        model: &m.model,
        reference: m.reference.as_ref(),
        segment: opts.segment,
    };
    let bar = progress.items(chunks.len() as u64, "eval");
    let mut totals = score::Totals::default();
    for group in chunks.chunks(opts.batch) {
        let toks: Vec<&[u32]> = group.iter().map(|c| c.tokens.as_slice()).collect();
        scorer.score_group(&toks, &mut totals)?;
        bar.inc(group.len() as u64);
    }
    bar.finish_and_clear();
    Ok(Scored {
        totals,
        chunks: chunks.len(),
        first_chunk: chunks[0].tokens.clone(),
    })
}

/// Evaluates `opts.model` (and compares it with `opts.reference`).
pub fn evaluate(opts: &EvalOptions, progress: &Progress) -> Result<EvalReport> {
    validate(opts)?;
    let mut m = load(opts, progress)?;
    let text = (!opts.data.is_empty())
        .then(|| score_data(opts, &m, progress))
        .transpose()?;
    let passkey = opts
        .passkey
        .as_ref()
        .map(|p| passkey::run(p, &m, opts.segment, progress))
        .transpose()?;
    let loops = opts
        .loops
        .as_ref()
        .map(|l| loops::run(l, &m, progress))
        .transpose()?;
    let Scored {
        totals,
        chunks,
        first_chunk,
    } = text.unwrap_or_default();
    let decode_ms_per_token = if opts.decode_latency && !first_chunk.is_empty() {
        m.model.merge_lora()?;
        Some(decode_latency(&m.model, &first_chunk)?)
    } else {
        None
    };
    let acc = &totals.all;
    let scores = |path: &PathBuf, nll: f64| {
        let nll = if acc.n == 0 {
            f64::NAN
        } else {
            nll / acc.n as f64
        };
        Scores {
            path: path.clone(),
            nll,
            perplexity: nll.exp(),
        }
    };
    let ref_scores = opts.reference.as_ref().map(|p| scores(p, acc.ref_nll));
    let has_ref = ref_scores.is_some();
    let (perplexity_ratio, agreement, kl) = acc.comparison(has_ref);
    Ok(EvalReport {
        perplexity_ratio,
        agreement,
        kl,
        model: scores(&opts.model, acc.nll),
        adapter: opts.adapter.clone(),
        quantize: opts.quantize.map(Quantization::name),
        reference: ref_scores,
        tokens: acc.n,
        chunks,
        seq_len: opts.seq_len,
        state: m.model.state_spec().bytes_by_kind_at(opts.seq_len).into(),
        decode_ms_per_token,
        by_context: totals.buckets(has_ref),
        passkey,
        loops,
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
