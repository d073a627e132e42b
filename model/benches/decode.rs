//! Decode benchmark on the SmolLM2-135M-Instruct fixture: per-token decode latency at growing
//! context lengths for the original Transformer and its Liger conversions (same runtime,
//! same weights), and the bytes of state each keeps per sequence.
//!
//! ```text
//! cargo bench -p liger-model --bench decode -- [--contexts 256,1024,4096,16384] [--steps 32]
//!     [--dtype f32|f16|bf16] [--quantize q8_0|q4k] [--json PATH]
//!     [--variants gla,hgrn2,gsa,gla-h8,window] [--batches 1,8,32] [--transformer-up-to N]
//!     [--device cpu|cuda] [--general] [--prefill 512,4096 [--reps 5] [--prefill-batches 1,8]]
//!     [--mixed 0,8,32 [--mixed-chunks 64,128,256] [--reps 5]]
//! ```
//!
//! `--prefill N,...` measures prefill instead of decode: every model (the Transformer and the
//! variants) reads an `N`-token prompt from a fresh state in 512-token chunks, `--reps` times,
//! the models taking turns (the first one moves each round) so that the machine's drift
//! falls on all of them alike; the table gives the median time, tokens/s and the time as a
//! ratio to the first variant's. `--prefill-batches B,...` also reads `B` different prompts
//! of each length together (every step advances each by a chunk of `512 / B` tokens, at
//! least 32, as one batch through `forward_batch`), tokens/s then counting all `B` prompts.
//!
//! `--mixed D,...` measures a server's mixed step for the first variant: `D` sequences
//! decode (forks at the smallest context) while one prompt is read a chunk further, in ONE
//! `forward_batch`, as liger-serve's steps are while prompts arrive. For each chunk length
//! of `--mixed-chunks` it times the mixed step, the decodes alone and the chunk alone (each
//! from the same states every repetition, taking turns: the chunk's state is backed up and
//! restored, as a speculative step's is), for a first chunk (a fresh state)
//! and a continuation (after 256 prompt tokens, so the chunk pushes tokens out of the window
//! into the global cache's choice). `prompt ms/token` is what the chunk adds to the decodes:
//! (mixed - decodes alone) / chunk; `alone ms/token` is the chunk alone's.
//!
//! `--chunk-size N` sets the chunked recurrent form's chunk (`RuntimeOptions::chunk_size`).
//!
//! `--general` turns the fused CPU decode step off (`RuntimeOptions::fast_decode`): decode
//! then runs on the general path, the fused step's reference, for a side-by-side figure.
//!
//! `--device cuda` needs the `cuda` feature (`cargo bench -p liger-model --features cuda`).
//!
//! `--step-times` prints every decode step's time besides the median.
//!
//! `--span N` times one sequence checking `N` tokens in a step (a speculative draft's
//! check, every token's logits) against one token, each step undone after.
//!
//! `--greedy` marks every decode step's sequences as wanting only their argmax
//! (`SeqStep::argmax_only`), as liger-serve's greedy requests are: the fused step then reads
//! the LM head's Q8_0 screen (`RuntimeOptions::head_screen`; `--no-screen` turns it off).
//!
//! `--huge-pages` moves the weights onto transparent huge pages after loading, as
//! liger-serve does by default (`liger_model::hugepages`).
//!
//! `--transformer-up-to N` measures the Transformer baseline only at contexts up to N (its
//! prefill is quadratic: 16K tokens take minutes on two cores).
//!
//! `--batches` adds batched decode: `B` sequences (forks of the smallest context) step
//! together, one token each, and the table gives the step time and aggregate tokens/s.
//!
//! `--variants` picks the Liger structures to compare (default `gla`): `gla`, `hgrn2`, `gsa`
//! (64 slots), `gla-h8` (GLA with full attention at layers 7, 15, 23: `every:8`) and
//! `window` (sliding-window attention alone), `gla-w256` (a 256-token window) and
//! `gla-w256-g64` (the same plus a 64-place global cache with 4 sinks), `window-w256-g64`
//! (that window and cache with no recurrent read-out: the memory only chooses the cache) and
//! `window-w256-g64-a16` (16 of those places given by attention instead), and
//! `window-w240-g80-a16` (a 240-token window, 4 sinks, 60 places by recall and 16 by
//! attention), `window-w240-g80-a16-c4096` (the same with kept tokens scored at most 4,096
//! back) and `window-w240-g384-a320-c4096-f16` (the default model's structure: rows stored
//! in f16, so 384 places, 320 of them by attention, fit the same state bytes).
//!
//! The context is built once per model by chunked prefill and grown between measurements,
//! so each model pays one prefill to the largest context. Figures are medians over `--steps`
//! decode tokens; compare ratios from one run (this machine is noisy).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use liger_model::gguf::import_gguf;
use liger_model::layers::Quantization;
use liger_model::testing::model_from_tensors;
use liger_model::{LigerConfig, Logits, Model, ModelConfig, SeqStep, Variant};

struct Args {
    contexts: Vec<usize>,
    variants: Vec<&'static str>,
    batches: Vec<usize>,
    transformer_up_to: usize,
    steps: usize,
    dtype: DType,
    quantize: Option<Quantization>,
    json: Option<PathBuf>,
    device: Device,
    general: bool,
    prefill: Vec<usize>,
    prefill_batches: Vec<usize>,
    chunk_size: Option<usize>,
    reps: usize,
    /// Print every decode step's time, not only the median (`--step-times`).
    step_times: bool,
    /// Spans of this many tokens checked in one step, as a speculative draft's (`--span`).
    span: Option<usize>,
    /// Weights moved onto huge pages after loading, as liger-serve does (`--huge-pages`).
    huge_pages: bool,
    /// Decode steps ask for their argmax alone (`--greedy`).
    greedy: bool,
    /// The LM head's screen off (`--no-screen`).
    no_screen: bool,
    mixed: Vec<usize>,
    mixed_chunks: Vec<usize>,
}

fn parse_args() -> Args {
    let mut a = Args {
        contexts: vec![256, 1024, 4096, 16384],
        variants: vec!["gla"],
        batches: Vec::new(),
        transformer_up_to: usize::MAX,
        steps: 32,
        dtype: DType::F32,
        quantize: None,
        json: None,
        device: Device::Cpu,
        general: false,
        prefill: Vec::new(),
        prefill_batches: vec![1],
        chunk_size: None,
        reps: 5,
        step_times: false,
        span: None,
        huge_pages: false,
        greedy: false,
        no_screen: false,
        mixed: Vec::new(),
        mixed_chunks: vec![64, 128, 256],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--contexts" => a.contexts = list(&val(), "context"),
            "--variants" => {
                a.variants = val()
                    .split(',')
                    .map(|v| {
                        VARIANTS
                            .iter()
                            .map(|(name, _)| *name)
                            .find(|name| *name == v.trim())
                            .unwrap_or_else(|| panic!("unknown variant {v}"))
                    })
                    .collect()
            }
            "--batches" => a.batches = list(&val(), "batch size"),
            "--transformer-up-to" => a.transformer_up_to = val().parse().expect("context"),
            "--steps" => a.steps = val().parse().expect("steps"),
            "--dtype" => {
                a.dtype = match val().as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    d => panic!("unknown dtype {d}"),
                }
            }
            "--quantize" => {
                a.quantize = Some(match val().as_str() {
                    "q8_0" => Quantization::Q8_0,
                    "q4k" => Quantization::Q4K,
                    q => panic!("unknown quantization {q}"),
                })
            }
            "--json" => a.json = Some(val().into()),
            "--device" => {
                a.device = match val().as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => {
                        Device::new_cuda(0).expect("a CUDA device (build with --features cuda)")
                    }
                    d => panic!("unknown device {d}"),
                }
            }
            "--general" => a.general = true,
            "--prefill" => a.prefill = list(&val(), "prompt length"),
            "--prefill-batches" => {
                a.prefill_batches = list(&val(), "batch size")
                    .into_iter()
                    .filter(|&b| b > 0)
                    .collect()
            }
            "--chunk-size" => a.chunk_size = Some(val().parse().expect("chunk size")),
            "--mixed" => a.mixed = list(&val(), "decode count"),
            "--mixed-chunks" => a.mixed_chunks = list(&val(), "chunk length"),
            "--reps" => a.reps = val().parse().expect("repetitions"),
            "--step-times" => a.step_times = true,
            "--span" => a.span = Some(val().parse().expect("span length")),
            "--huge-pages" => a.huge_pages = true,
            "--greedy" => a.greedy = true,
            "--no-screen" => a.no_screen = true,
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    a.contexts.sort_unstable();
    a
}

/// Every step's time in ms (`--step-times`): what a median hides, such as a cache copied
/// every few dozen tokens or a machine that stalls now and then.
fn print_step_times(name: &str, times: &[f64]) {
    let ms: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
    eprintln!("{name} step times (ms): {}", ms.join(" "));
}

/// A comma-separated list of counts (`what` names them in the panic on a bad one).
fn list(v: &str, what: &str) -> Vec<usize> {
    v.split(',')
        .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{what}: {s}")))
        .collect()
}

/// Builds a variant's `liger` section for a model of the given layer count.
type MakeLiger = fn(usize) -> LigerConfig;

/// The Liger structures `--variants` can name.
const VARIANTS: [(&str, MakeLiger); 12] = [
    ("gla", |_| LigerConfig::default()),
    ("hgrn2", |_| LigerConfig {
        variant: Variant::Hgrn2,
        gate_normalizer: 1.0,
        ..Default::default()
    }),
    ("gsa", |_| LigerConfig {
        variant: Variant::Gsa,
        slots: Some(64),
        ..Default::default()
    }),
    ("gla-h8", |layers| LigerConfig {
        full_attention_layers: (1..=layers / 8).map(|k| 8 * k - 1).collect(),
        ..Default::default()
    }),
    ("window", |_| LigerConfig {
        window_weight: 1.0,
        recurrent_weight: 0.0,
        ..Default::default()
    }),
    // Structures the project's adapters were trained for: a 256-token window, the same with
    // a global cache of 64 places (4 of them sinks), and that window and cache without the
    // recurrent read-out (the memory kept only to choose the cache).
    ("gla-w256", |_| LigerConfig {
        window: 256,
        ..Default::default()
    }),
    ("gla-w256-g64", |_| LigerConfig {
        window: 256,
        global_cache: 64,
        sinks: 4,
        ..Default::default()
    }),
    ("window-w256-g64", |_| window_with_cache(256, 64, 0)),
    ("window-w256-g64-a16", |_| window_with_cache(256, 64, 16)),
    ("window-w240-g80-a16", |_| window_with_cache(240, 80, 16)),
    ("window-w240-g80-a16-c4096", |_| LigerConfig {
        max_distance: Some(4096),
        ..window_with_cache(240, 80, 16)
    }),
    // Rows in f16: 384 places (60 by recall, 320 by attention) in the same state bytes.
    ("window-w240-g384-a320-c4096-f16", |_| LigerConfig {
        max_distance: Some(4096),
        kv_dtype: Some(liger_model::config::KvDtype::F16),
        ..window_with_cache(240, 384, 320)
    }),
];

/// Window attention alone (read-out off) with a global cache of `places`, 4 of them sinks
/// and `attention` given by attention, the rest by the memory's recall.
fn window_with_cache(window: usize, places: usize, attention: usize) -> LigerConfig {
    LigerConfig {
        window,
        window_weight: 1.0,
        recurrent_weight: 0.0,
        global_cache: places,
        sinks: 4,
        attention_places: attention,
        ..Default::default()
    }
}

struct Row {
    model: &'static str,
    context: usize,
    ms_per_token: f64,
    state_bytes: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A deterministic token stream; decode cost does not depend on content.
fn token(m: &Model, i: usize) -> u32 {
    ((i as u64 * 2654435761 % m.config().vocab_size as u64) as u32).max(3)
}

/// A state that has read the first `ctx` tokens of the deterministic stream.
fn read_context(m: &Model, ctx: usize) -> liger_model::Result<liger_model::SequenceState> {
    let prompt: Vec<u32> = (0..ctx).map(|i| token(m, i)).collect();
    let mut state = m.new_state()?;
    m.prefill(&prompt, &mut state, 512)?;
    Ok(state)
}

/// Batched decode at the smallest context: `b` forks of one state step together.
fn run_batches(
    name: &'static str,
    m: &Model,
    args: &Args,
    rows: &mut Vec<BatchRow>,
) -> liger_model::Result<()> {
    let ctx = args.contexts[0];
    let base = read_context(m, ctx)?;
    for &b in &args.batches {
        let mut states: Vec<_> = (0..b).map(|_| base.clone()).collect();
        let toks: Vec<[u32; 1]> = (0..b).map(|j| [token(m, ctx + j)]).collect();
        let mut times = Vec::with_capacity(args.steps);
        for _ in 0..args.steps.max(4) {
            let mut steps: Vec<SeqStep> = states
                .iter_mut()
                .zip(&toks)
                .map(|(state, t)| SeqStep {
                    tokens: t,
                    state,
                    argmax_only: args.greedy,
                })
                .collect();
            let t = Instant::now();
            m.forward_batch(&mut steps, Logits::Last)?;
            // GPU work is asynchronous: wait for it, or the clock stops at the last launch.
            m.device().synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // The first step copies every cache the forks share (the one a server pays when
        // a prompt's state starts decoding beside its cached snapshot).
        let first = times[0];
        if args.step_times {
            print_step_times(name, &times);
        }
        let ms = median(times);
        eprintln!(
            "{name:>11} batch {b:>3} at context {ctx}: {ms:7.2} ms/step, {:7.1} tok/s, first step {first:.2} ms",
            b as f64 * 1e3 / ms
        );
        rows.push(BatchRow {
            model: name,
            batch: b,
            ms_per_step: ms,
        });
    }
    Ok(())
}

/// One sequence at the smallest context checking a span of `span` tokens per step (all
/// their logits, as a speculative draft's check), against one token per step: each step
/// runs under a backup that is then restored (a rejected draft), so the context stays put.
/// The two kinds of step alternate, so that this machine's shifts of speed (within
/// seconds) reach both alike.
fn run_span(name: &'static str, m: &Model, args: &Args, span: usize) -> liger_model::Result<()> {
    let ctx = args.contexts[0];
    let mut state = read_context(m, ctx)?;
    let lens = [1, span];
    let tokens: Vec<Vec<u32>> = lens
        .iter()
        .map(|&len| (0..len).map(|j| token(m, ctx + j)).collect())
        .collect();
    let mut times: [Vec<f64>; 2] = std::array::from_fn(|_| Vec::with_capacity(args.steps));
    for _ in 0..args.steps.max(4) {
        for (tokens, times) in tokens.iter().zip(&mut times) {
            let backup = state.backup();
            let t = Instant::now();
            step(m, tokens, &mut state, (Logits::All, args.greedy))?;
            m.device().synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            backup.restore(&mut state)?;
        }
    }
    let mut medians = Vec::new();
    for times in times {
        if args.step_times {
            print_step_times(name, &times);
        }
        medians.push(median(times));
    }
    eprintln!(
        "{name:>11} at context {ctx}: a step of 1 token {:.2} ms, of {span} tokens {:.2} ms ({:.2}x)",
        medians[0],
        medians[1],
        medians[1] / medians[0]
    );
    Ok(())
}

/// One sequence's step, asking for its argmax alone when `greedy`.
fn step(
    m: &Model,
    tokens: &[u32],
    state: &mut liger_model::SequenceState,
    (logits, greedy): (Logits, bool),
) -> liger_model::Result<candle_core::Tensor> {
    let mut one = [SeqStep {
        tokens,
        state,
        argmax_only: greedy,
    }];
    Ok(m.forward_batch(&mut one, logits)?.remove(0))
}

struct BatchRow {
    model: &'static str,
    batch: usize,
    ms_per_step: f64,
}

fn run(name: &'static str, m: &Model, args: &Args, rows: &mut Vec<Row>) -> liger_model::Result<()> {
    let token = |i: usize| token(m, i);
    let mut state = m.new_state()?;
    let mut filled = 0;
    let limit = if name == "transformer" {
        args.transformer_up_to
    } else {
        usize::MAX
    };
    for &ctx in args.contexts.iter().filter(|&&c| c <= limit) {
        let t0 = Instant::now();
        let prompt: Vec<u32> = (filled..ctx).map(token).collect();
        if !prompt.is_empty() {
            m.prefill(&prompt, &mut state, 512)?;
        }
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut times = Vec::with_capacity(args.steps);
        let mut next = token(ctx);
        for _ in 0..args.steps {
            let t = Instant::now();
            let logits = step(m, &[next], &mut state, (Logits::Last, args.greedy))?;
            next = logits
                .argmax(candle_core::D::Minus1)?
                .squeeze(0)?
                .to_scalar::<u32>()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        filled = state.position();
        if args.step_times {
            print_step_times(name, &times);
        }
        let ms = median(times);
        eprintln!(
            "{name:>11} context {ctx:>6}: {ms:7.2} ms/token ({:6.1} tok/s), state {:>10} bytes, prefill of {} tokens {prefill_s:.1}s",
            1e3 / ms,
            state.size_bytes(),
            prompt.len()
        );
        rows.push(Row {
            model: name,
            context: ctx,
            ms_per_token: ms,
            state_bytes: state.size_bytes(),
        });
    }
    Ok(())
}

/// Prefill of each prompt length by every model, in turns (see the header).
fn run_prefill(models: &[(&'static str, Model)], args: &Args) -> liger_model::Result<()> {
    println!(
        "| prompt tokens | batch | model | median ms | tokens/s | time / {} |",
        models[1].0
    );
    println!("|---:|---:|---|---:|---:|---:|");
    for &n in &args.prefill {
        for &b in &args.prefill_batches {
            let mut times = vec![Vec::with_capacity(args.reps); models.len()];
            for rep in 0..args.reps.max(1) {
                for k in 0..models.len() {
                    let i = (rep + k) % models.len();
                    let (_, m) = &models[i];
                    times[i].push(prefill_batch(m, n, b)?);
                }
            }
            let medians: Vec<f64> = times.into_iter().map(median).collect();
            for ((name, _), ms) in models.iter().zip(&medians) {
                println!(
                    "| {n} | {b} | {name} | {ms:.0} | {:.1} | {:.2}x |",
                    (n * b) as f64 * 1e3 / ms,
                    ms / medians[1]
                );
            }
        }
    }
    Ok(())
}

/// Mixed steps (see the header): decodes beside a prompt chunk, against each alone.
fn run_mixed(name: &str, m: &Model, args: &Args) -> liger_model::Result<()> {
    let ctx = args.contexts[0];
    let base = read_context(m, ctx)?;
    // A continued chunk starts after this much of its prompt: past the default window.
    const READ: usize = 256;
    let most = args.mixed_chunks.iter().copied().max().unwrap_or(0);
    let prompt: Vec<u32> = (0..READ + most).map(|i| token(m, 7 * i + 11)).collect();
    let mut fresh = m.new_state()?;
    let mut read = m.new_state()?;
    m.prefill(&prompt[..READ], &mut read, 512)?;
    println!("\n{name}: mixed steps, decodes at context {ctx} beside one prompt chunk (median ms)");
    println!("| decodes | chunk | at | mixed | decodes alone | chunk alone | prompt ms/token | alone ms/token |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    let toks: Vec<[u32; 1]> = (0..args.mixed.iter().copied().max().unwrap_or(0))
        .map(|j| [token(m, ctx + j)])
        .collect();
    for &d in &args.mixed {
        for &c in &args.mixed_chunks {
            for (at, start) in [("first", 0), ("continued", READ)] {
                let from = if start == 0 { &mut fresh } else { &mut read };
                let chunk = &prompt[start..start + c];
                // 0: mixed, 1: decodes alone, 2: chunk alone.
                let mut times = [Vec::new(), Vec::new(), Vec::new()];
                for rep in 0..args.reps.max(1) {
                    for k in 0..3 {
                        let kind = (rep + k) % 3;
                        if kind == 1 && d == 0 {
                            continue;
                        }
                        let mut states: Vec<_> = (0..d).map(|_| base.clone()).collect();
                        // The chunk's state is backed up and restored, as liger-serve's
                        // speculation does with a step of drafts (a clone would share the
                        // global caches' rooms, and the step would copy them).
                        let backup = from.backup();
                        let mut steps: Vec<SeqStep> = Vec::new();
                        if kind != 2 {
                            steps.extend(states.iter_mut().zip(&toks).map(|(state, t)| SeqStep {
                                tokens: t,
                                state,
                                argmax_only: false,
                            }));
                        }
                        if kind != 1 {
                            steps.push(SeqStep {
                                tokens: chunk,
                                state: &mut *from,
                                argmax_only: false,
                            });
                        }
                        let t = Instant::now();
                        m.forward_batch(&mut steps, Logits::Last)?;
                        m.device().synchronize()?;
                        times[kind].push(t.elapsed().as_secs_f64() * 1e3);
                        drop(steps);
                        backup.restore(from)?;
                    }
                }
                let [mixed, decodes, alone] =
                    times.map(|t| if t.is_empty() { 0.0 } else { median(t) });
                println!(
                    "| {d} | {c} | {at} | {mixed:.1} | {decodes:.1} | {alone:.1} | {:.2} | {:.2} |",
                    (mixed - decodes) / c as f64,
                    alone / c as f64
                );
            }
        }
    }
    Ok(())
}

/// Milliseconds to read `b` different `n`-token prompts from fresh states, together: one
/// prompt in 512-token chunks, several in chunks of `512 / b` (at least 32) per step.
fn prefill_batch(m: &Model, n: usize, b: usize) -> liger_model::Result<f64> {
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|s| (0..n).map(|j| token(m, j + s * 7919)).collect())
        .collect();
    let mut states = (0..b)
        .map(|_| m.new_state())
        .collect::<liger_model::Result<Vec<_>>>()?;
    let chunk = (512 / b).max(32);
    let t = Instant::now();
    let mut at = 0;
    while at < n {
        let end = (at + chunk).min(n);
        let mut steps: Vec<SeqStep> = states
            .iter_mut()
            .zip(&prompts)
            .map(|(state, p)| SeqStep {
                tokens: &p[at..end],
                state,
                argmax_only: false,
            })
            .collect();
        m.forward_batch(&mut steps, Logits::Last)?;
        at = end;
    }
    m.device().synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn main() -> liger_model::Result<()> {
    let threads = liger_model::threads::init(None);
    let args = parse_args();
    let import = import_gguf(&liger_model::testing::fixture::smollm2_gguf())?;
    let tensors = import.tensors.iter().cloned().collect();
    let cfg = ModelConfig::from_json(import.config.clone())?;
    eprintln!(
        "SmolLM2-135M-Instruct on {:?}, {:?}{}, threads: {threads}, {} decode steps per point{}",
        args.device,
        args.dtype,
        args.quantize
            .map_or(String::new(), |q| format!(" quantized to {}", q.name())),
        args.steps,
        if args.general {
            ", general path (fused decode off)"
        } else {
            ""
        }
    );
    let mut rows = Vec::new();
    let quantized = |mut m: Model| -> liger_model::Result<Model> {
        if let Some(q) = args.quantize {
            m.quantize(q)?;
        }
        let options = m.options();
        m.set_options(liger_model::RuntimeOptions {
            fast_decode: !args.general,
            head_screen: !args.no_screen,
            chunk_size: args.chunk_size.unwrap_or(options.chunk_size),
            ..options
        })?;
        if args.huge_pages {
            let got = liger_model::hugepages::back_with_huge_pages(&m.weight_memory());
            eprintln!("huge pages: {got:?}");
        }
        Ok(m)
    };
    // A `--variants` name's Liger conversion of the fixture, quantized and set up as asked.
    let variant = |name: &str| -> liger_model::Result<Model> {
        let (_, make) = VARIANTS.iter().find(|(n, _)| *n == name).expect("parsed");
        quantized(model_from_tensors(
            cfg.with_liger(make(cfg.num_layers))?,
            &tensors,
            args.dtype,
            &args.device,
        )?)
    };
    let transformer = quantized(model_from_tensors(
        cfg.clone(),
        &tensors,
        args.dtype,
        &args.device,
    )?)?;
    if !args.prefill.is_empty() {
        let mut models = vec![("transformer", transformer)];
        for &name in &args.variants {
            models.push((name, variant(name)?));
        }
        return run_prefill(&models, &args);
    }
    if !args.mixed.is_empty() {
        drop(transformer);
        let name = args.variants[0];
        return run_mixed(name, &variant(name)?, &args);
    }
    let mut batch_rows = Vec::new();
    run("transformer", &transformer, &args, &mut rows)?;
    run_batches("transformer", &transformer, &args, &mut batch_rows)?;
    drop(transformer);
    for &name in &args.variants {
        let m = variant(name)?;
        run(name, &m, &args, &mut rows)?;
        run_batches(name, &m, &args, &mut batch_rows)?;
        if let Some(span) = args.span {
            run_span(name, &m, &args, span)?;
        }
    }

    let at = |model: &str, ctx: usize| {
        rows.iter()
            .find(|r| r.model == model && r.context == ctx)
            .expect("measured")
    };
    let baseline = |ctx: usize| {
        rows.iter()
            .find(|r| r.model == "transformer" && r.context == ctx)
    };
    let or_dash = |x: Option<String>| x.unwrap_or_else(|| "-".to_owned());
    print!("| context | Transformer ms/token |");
    for v in &args.variants {
        print!(" {v} ms/token | {v} speed-up |");
    }
    println!(
        " Transformer state |{}",
        args.variants
            .iter()
            .map(|v| format!(" {v} state |"))
            .collect::<String>()
    );
    println!(
        "|---:|---:|{}---:|{}",
        "---:|---:|".repeat(args.variants.len()),
        "---:|".repeat(args.variants.len())
    );
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    for &ctx in &args.contexts {
        let t = baseline(ctx);
        print!(
            "| {ctx} | {} |",
            or_dash(t.map(|t| format!("{:.2}", t.ms_per_token)))
        );
        for v in &args.variants {
            let l = at(v, ctx);
            print!(
                " {:.2} | {} |",
                l.ms_per_token,
                or_dash(t.map(|t| format!("{:.2}x", t.ms_per_token / l.ms_per_token)))
            );
        }
        print!(
            " {} |",
            or_dash(t.map(|t| format!("{:.1} MiB", mib(t.state_bytes))))
        );
        for v in &args.variants {
            print!(" {:.2} MiB |", mib(at(v, ctx).state_bytes));
        }
        println!();
    }
    if !args.batches.is_empty() {
        println!(
            "\nBatched decode at context {}: ms per step (aggregate tokens/s)\n",
            args.contexts[0]
        );
        print!("| model |");
        for b in &args.batches {
            print!(" batch {b} |");
        }
        println!("\n|---|{}", "---:|".repeat(args.batches.len()));
        for name in std::iter::once(&"transformer").chain(&args.variants) {
            print!("| {name} |");
            for r in batch_rows.iter().filter(|r| r.model == *name) {
                print!(
                    " {:.1} ms ({:.0} tok/s) |",
                    r.ms_per_step,
                    r.batch as f64 * 1e3 / r.ms_per_step
                );
            }
            println!();
        }
    }
    let (first, last) = (args.contexts[0], *args.contexts.last().expect("contexts"));
    for v in &args.variants {
        println!(
            "\n{v} decode latency at context {last} / at {first}: {:.2}x",
            at(v, last).ms_per_token / at(v, first).ms_per_token
        );
    }
    if let Some(path) = &args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"model": r.model, "context": r.context,
                "ms_per_token": r.ms_per_token, "state_bytes": r.state_bytes})
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json).unwrap())
            .map_err(|e| liger_model::Error::io(path, e))?;
    }
    Ok(())
}
