//! `liger-convert`: the command-line front end of `liger_converter`.
//!
//! Only flag parsing, logging setup, the interrupt handler and printing live here; the work
//! is in the library. Failures print `error: <one line>` on stderr and exit non-zero
//! (1 for errors, 2 for unusable flags, 130 when interrupted).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use liger_converter::eval::{LoopsOptions, PasskeyOptions};
use liger_converter::inspect::{human_bytes, render_table};
use liger_converter::output::WeightFormat;
use liger_converter::source::HubOptions;
use liger_converter::{
    ApplyOptions, ConvertOptions, DeviceChoice, EvalOptions, FullAttention, ImportOptions,
    LigerSettings, Progress, QuantizeOptions, RecoverOptions, SelfDistillOptions, StageChoice,
    Summary,
};
use liger_model::config::KvDtype;
use liger_model::layers::Quantization;
use liger_model::lora::LoraConfig;
use liger_model::Variant;

#[derive(Parser)]
#[command(
    name = "liger-convert",
    version,
    about = "Convert Transformers (Hugging Face folders, hub ids, GGUF files) into linearized Liger models",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Transformer into a Liger checkpoint (weights unchanged, config gains `liger`).
    Convert(ConvertArgs),
    /// Import a GGUF file as a plain Hugging Face Transformer folder (the recovery teacher).
    Import(ImportArgs),
    /// Describe a model folder: architecture, layers, Liger settings, state memory.
    Inspect(InspectArgs),
    /// Recover a converted model's quality by LoRA training against the original.
    Recover(Box<RecoverArgs>),
    /// Let a model answer prompts and save the conversations (JSON Lines) for recovery data.
    SelfDistill(SelfDistillArgs),
    /// Perplexity, agreement and KL of a model against a reference on held-out text.
    Eval(EvalArgs),
    /// Merge a LoRA adapter (PEFT layout) into a model folder.
    ApplyAdapter(ApplyAdapterArgs),
    /// Store a model folder's projections as 8- or 4-bit GGML blocks (q8_0, q4k).
    Quantize(QuantizeArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// The model folder to quantize (original, converted, or recovered and merged).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Output folder (written atomically).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Block format of the projections: q8_0 (8.5 bits per weight) or q4k (4.5).
    #[arg(long, value_name = "FORMAT")]
    format: Quantization,
    /// Dtype of the tensors kept dense (embeddings, norms) [default: the folder's].
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    #[command(flatten)]
    write: WriteArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum StageArg {
    /// Attention transfer: each Liger layer mimics the original's attention output.
    Transfer,
    /// Distillation: KL to the original's next-token distributions, end to end.
    Distill,
    /// Next-token cross-entropy (the Liger paper's recipe).
    Lm,
    /// Transfer, then distill.
    All,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
        }
    }
}

#[derive(Args)]
struct RecoverArgs {
    /// The original model folder (e.g. from `liger-convert import`).
    #[arg(long, value_name = "ORIG")]
    teacher: PathBuf,
    /// The converted Liger folder (from `liger-convert convert`).
    #[arg(long, value_name = "CONVERTED")]
    student: PathBuf,
    /// Training data: text files, or JSON Lines with `text`, `messages` or `prompt`.
    #[arg(long, value_name = "FILES", num_args = 1..)]
    data: Vec<PathBuf>,
    /// Output folder: the merged model (or the adapter with --adapter-only).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// What to train.
    #[arg(long, value_enum, default_value_t = StageArg::All)]
    stage: StageArg,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 8.0)]
    alpha: f64,
    /// Projections to adapt.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj")]
    targets: Vec<String>,
    /// Peak learning rate of every stage [default: transfer 2e-3, distill and lm 1e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// Peak learning rate of the transfer stage (overrides --lr there).
    #[arg(long)]
    transfer_lr: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Optimizer steps of every stage [default: transfer 150, distill and lm 300].
    #[arg(long, conflicts_with = "tokens")]
    steps: Option<usize>,
    /// Training tokens of every stage, instead of --steps.
    #[arg(long)]
    tokens: Option<u64>,
    /// Optimizer steps of the transfer stage (overrides --steps / --tokens there).
    #[arg(long)]
    transfer_steps: Option<usize>,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Distill and lm: run each sequence through the student in pieces of N tokens,
    /// carrying its state (not its gradient) from piece to piece, so long sequences train
    /// in memory linear in their length [default: 0, the whole sequence at once].
    #[arg(long, value_name = "N", default_value_t = 0)]
    segment: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Sequences per batch in the transfer stage (overrides --batch there).
    #[arg(long)]
    transfer_batch: Option<usize>,
    /// Chunks the transfer stage trains on, with the teacher's activations kept in memory
    /// (about 36 MB per 256-token chunk of SmolLM2; 0: every chunk, nothing kept).
    #[arg(long, value_name = "N", default_value_t = 32)]
    transfer_chunks: usize,
    /// Seed of the adapter initialization, the data order and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Continue from the checkpoint in DIR.ckpt (bit-identical to an uninterrupted run).
    #[arg(long)]
    resume: bool,
    /// Save a checkpoint every K steps (0: only between stages).
    #[arg(long, value_name = "K", default_value_t = 50)]
    checkpoint_every: usize,
    /// Write only the LoRA adapter (PEFT layout) and recovery.json.
    #[arg(long)]
    adapter_only: bool,
    /// Start from this LoRA adapter (PEFT layout, e.g. an earlier `--adapter-only` result)
    /// instead of fresh adapters: continue a recovery with another stage or schedule. --rank
    /// may be higher and --targets may name more projections: what it lacks starts fresh.
    #[arg(long, value_name = "DIR")]
    init_adapter: Option<PathBuf>,
    /// Let the teacher answer N prompts (the data's `prompt` records, else built-in ones)
    /// and train on those conversations too.
    #[arg(long, value_name = "N", default_value_t = 0)]
    self_distill: usize,
    /// Longest self-distilled answer, in tokens.
    #[arg(long, value_name = "N", default_value_t = 200)]
    self_distill_tokens: usize,
    /// Also save the self-distilled conversations (JSON Lines) to FILE.
    #[arg(long, value_name = "FILE")]
    self_distill_save: Option<PathBuf>,
    /// Weight of next-token cross-entropy added to the distillation KL.
    #[arg(long, default_value_t = 0.0)]
    ce_weight: f64,
    /// Teacher tokens kept per position for distillation (the rest is one bucket).
    #[arg(long, default_value_t = 64)]
    top_k: usize,
    /// Clip the gradient's global norm in distill and lm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Replace DIR if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bars or summary.
    #[arg(long, short)]
    quiet: bool,
    /// CPU threads [default: all; RAYON_NUM_THREADS wins]. On a busy machine 1 can be faster.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Testing: stop after N optimizer steps, as if interrupted.
    #[arg(long, hide = true, value_name = "N")]
    stop_after: Option<usize>,
}

#[derive(Args)]
struct SelfDistillArgs {
    /// The model that answers: the original (e.g. from `liger-convert import`).
    #[arg(long, value_name = "ORIG")]
    teacher: PathBuf,
    /// JSON Lines with `prompt` records (or `messages` ending in a user turn)
    /// [default: built-in prompts].
    #[arg(long, value_name = "FILES", num_args = 1..)]
    prompts: Vec<PathBuf>,
    /// Answers to write: each prompt once, greedily, then sampled answers if N is larger.
    #[arg(long, value_name = "N")]
    count: usize,
    /// Longest answer, in tokens.
    #[arg(long, value_name = "N", default_value_t = 200)]
    max_tokens: usize,
    /// Output file (JSON Lines with `messages`, usable as `recover --data`).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Seed of the sampled answers.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bars or summary.
    #[arg(long, short)]
    quiet: bool,
    /// CPU threads [default: all; RAYON_NUM_THREADS wins].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    /// The model folder to evaluate; repeat to compare several in one table.
    #[arg(long, value_name = "DIR", required = true)]
    model: Vec<PathBuf>,
    /// Apply this LoRA adapter (PEFT layout) without merging it; with several --model, one
    /// per model in the same order (`-` for none).
    #[arg(long, value_name = "ADAPTER_DIR")]
    adapter: Vec<PathBuf>,
    /// Also time decode steps after a --seq-len prefill (adapter merged first).
    #[arg(long)]
    latency: bool,
    /// Quantize the model's projections (q8_0 or q4k) to measure the quality it costs.
    #[arg(long, value_name = "FORMAT")]
    quantize: Option<Quantization>,
    /// The model to compare with (the original).
    #[arg(long, value_name = "ORIG")]
    reference: Option<PathBuf>,
    /// Held-out text: text files or JSON Lines (`text`, `messages`); optional with
    /// --passkey or --loops alone.
    #[arg(long, value_name = "FILES", num_args = 1..)]
    data: Vec<PathBuf>,
    /// Tokens per evaluated chunk.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Chunks run together.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Most tokens fed per forward: chunks and pass-key prompts go through in segments
    /// that carry their state, so memory grows linearly with --seq-len.
    #[arg(long, value_name = "N", default_value_t = 512)]
    segment: usize,
    /// Also test pass-key retrieval: a 5-digit key hidden in filler, asked for at the end.
    #[arg(long)]
    passkey: bool,
    /// Pass-key prompt lengths, in tokens.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384"
    )]
    passkey_lengths: Vec<usize>,
    /// Where the key sits in the filler, in percent.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "10,30,50,70,90"
    )]
    passkey_depths: Vec<u32>,
    /// Keys per length and depth.
    #[arg(long, value_name = "N", default_value_t = 1)]
    passkey_keys: usize,
    /// Seed of the keys.
    #[arg(long, value_name = "N", default_value_t = 0)]
    passkey_seed: u64,
    /// Also answer these prompts greedily (JSON Lines with `messages`; a last assistant turn
    /// is dropped) and report the share of answers that loop.
    #[arg(long, value_name = "PROMPTS")]
    loops: Option<PathBuf>,
    /// Longest answer for --loops, in tokens.
    #[arg(long, value_name = "N", default_value_t = 128)]
    loops_max_tokens: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// CPU threads [default: all; RAYON_NUM_THREADS wins].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct ApplyAdapterArgs {
    /// The model folder the adapter was trained on.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_name = "ADAPTER_DIR")]
    adapter: PathBuf,
    /// Output folder (written atomically).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Store the merged projections as GGML blocks (q8_0 or q4k).
    #[arg(long, value_name = "FORMAT")]
    quantize: Option<Quantization>,
    /// Replace DIR if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bars or summary.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum VariantArg {
    /// Gated linear attention (Liger-GLA, the reference).
    Gla,
    /// HGRN2: the key is replaced by 1 - gate.
    Hgrn2,
    /// Gated slot attention: two gated memories of --slots slots, read through a softmax.
    Gsa,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Args)]
struct ConvertArgs {
    /// Source: a Hugging Face model folder, a .gguf file, or a hub id (owner/name).
    #[arg(long, value_name = "SRC")]
    from: String,
    /// Output folder (written atomically; see --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Gated recurrent branch.
    #[arg(long, value_enum, default_value_t = VariantArg::Gla)]
    variant: VariantArg,
    /// Sliding-window keys each query sees besides itself (64 = the reference's 65 keys).
    #[arg(long, value_name = "N", default_value_t = 64)]
    window: usize,
    /// Weight of the recurrent branch, 0..=1; the window branch gets 1 - X.
    #[arg(
        long,
        value_name = "X",
        default_value_t = 0.5,
        allow_negative_numbers = true
    )]
    mix: f64,
    /// GSA's slot count M; it must divide the head dim [default: 64].
    #[arg(long, value_name = "M")]
    slots: Option<usize>,
    /// Global cache: besides the window, each layer keeps up to N older tokens per KV head
    /// for the window branch (sinks, then --attention-places, the rest to the tokens its
    /// recurrent memory recalls worst); constant memory.
    #[arg(long, value_name = "N", default_value_t = 0)]
    global_cache: usize,
    /// Attention sinks: the first N tokens keep places in the global cache for good.
    #[arg(long, value_name = "N", default_value_t = 0)]
    sinks: usize,
    /// Of the global cache's places beyond the sinks, N go to the tokens that got the most
    /// attention while in the window (the rest: those the recurrent memory recalls worst).
    #[arg(long, value_name = "N", default_value_t = 0)]
    attention_places: usize,
    /// Score global-cache tokens more than N positions back as if they were N back (RoPE
    /// breaks on distances the model was never trained on); must exceed --window; 0: no cap
    /// [default with --global-cache: half the model's max_position_embeddings].
    #[arg(long, value_name = "N")]
    max_distance: Option<usize>,
    /// How served states store the keys and values they keep (window and global cache
    /// rows); f16 halves their bytes, so twice the rows fit one state [default: the model's
    /// dtype].
    #[arg(long, value_enum, value_name = "DTYPE")]
    kv_dtype: Option<DtypeArg>,
    /// Divisor of the log-gate [default: 16 for gla and gsa, 1 for hgrn2].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    gate_normalizer: Option<f64>,
    /// Layers that keep full softmax attention: a list (0,7,15) or every:N (layers N-1, 2N-1, ...).
    #[arg(long, value_name = "LIST")]
    full_attention_layers: Option<String>,
    /// Output dtype [default: the source's; f32 for GGUF].
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Also store the projections as GGML blocks (q8_0 or q4k), as `quantize` does.
    #[arg(long, value_name = "FORMAT")]
    quantize: Option<Quantization>,
    /// Hub revision (branch, tag or commit) for hub ids.
    #[arg(long, value_name = "REV")]
    revision: Option<String>,
    /// Hub access token for gated or private models.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    #[command(flatten)]
    write: WriteArgs,
}

#[derive(Args)]
struct WriteArgs {
    /// Replace DIR if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bars or summary.
    #[arg(long, short)]
    quiet: bool,
    /// Largest weight file before sharding, e.g. 2GB, 500MB, 1GiB or bytes.
    #[arg(long, value_name = "SIZE", default_value = "2GB", value_parser = parse_size)]
    max_shard_size: u64,
}

#[derive(Args)]
struct ImportArgs {
    /// The .gguf file (llama architecture).
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// Output folder (written atomically; see --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    write: WriteArgs,
}

#[derive(Args)]
struct InspectArgs {
    /// Model folder (converted or not).
    dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl Cli {
    /// CPU threads asked for by the command, if it takes `--threads`.
    fn threads(&self) -> Option<usize> {
        match &self.command {
            Command::Recover(a) => a.threads,
            Command::SelfDistill(a) => a.threads,
            Command::Eval(a) => a.threads,
            _ => None,
        }
    }
}

/// `2GB` -> 2e9, `1GiB` -> 2^30, plain numbers are bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 2GB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown unit `{u}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = num * mult;
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(format!("`{s}` must be at least one byte"));
    }
    Ok(bytes as u64)
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// The command line as a shell would need it, with any token value hidden (for the card).
fn command_line() -> String {
    let mut out = vec!["liger-convert".to_owned()];
    let mut hide_next = false;
    for a in std::env::args().skip(1) {
        let a = if hide_next {
            "***".to_owned()
        } else if a.starts_with("--token=") {
            "--token=***".to_owned()
        } else {
            a
        };
        hide_next = a == "--token";
        let plain = !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
        out.push(if plain {
            a
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        });
    }
    out.join(" ")
}

fn print_summary(verb: &str, source: &str, s: &Summary) {
    println!(
        "{verb} {source} -> {}: {} tensors, {} parameters, {}, {} ({})",
        s.out.display(),
        s.tensors,
        s.parameters,
        liger_converter::convert::format_label(&WeightFormat {
            quantize: s.quantize,
            ..WeightFormat::dense(s.dtype)
        }),
        if s.weight_files.len() > 2 {
            format!("{} shards", s.weight_files.len())
        } else {
            s.weight_files.join(", ")
        },
        human_bytes(s.weight_bytes)
    );
    if verb == "quantized" {
        return;
    }
    if let Some(l) = &s.liger {
        let full = if l.full_attention_layers.is_empty() {
            "none".to_owned()
        } else {
            l.full_attention_layers
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "liger: variant {}, window {}, mix {} window + {} recurrent, gate normalizer {}, full attention layers {full}, global cache {} ({} sinks, {} by attention, {} by recall{})",
            liger_converter::settings::variant_label(l), l.window, l.window_weight, l.recurrent_weight, l.gate_normalizer, l.global_cache, l.sinks,
            l.attention_places, l.recall_places(),
            l.max_distance.map_or(String::new(), |m| format!(", scored at most {m} back"))
        );
        if let Some(d) = l.kv_dtype {
            println!("states keep their key and value rows in {}", d.name());
        }
        println!(
            "next: recovery training restores quality: liger-convert recover --teacher ORIG --student {} --data FILES --out DIR",
            s.out.display()
        );
    }
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let adapters: Vec<Option<PathBuf>> = match a.adapter.len() {
        0 => vec![None; a.model.len()],
        n if n == a.model.len() => a
            .adapter
            .into_iter()
            .map(|p| (p.as_os_str() != "-").then_some(p))
            .collect(),
        n => anyhow::bail!(
            "--adapter: {n} given for {} --model; give one per model in the same order (`-` for none)",
            a.model.len()
        ),
    };
    let passkey = a.passkey.then(|| PasskeyOptions {
        lengths: a.passkey_lengths.clone(),
        depths: a.passkey_depths.clone(),
        keys: a.passkey_keys,
        seed: a.passkey_seed,
    });
    let loops = a.loops.as_ref().map(|p| LoopsOptions {
        prompts: p.clone(),
        max_tokens: a.loops_max_tokens,
    });
    let progress = Progress::new(!a.quiet);
    let mut reports = Vec::with_capacity(a.model.len());
    for (model, adapter) in a.model.into_iter().zip(adapters) {
        let opts = EvalOptions {
            model,
            adapter,
            reference: a.reference.clone(),
            data: a.data.clone(),
            seq_len: a.seq_len,
            batch: a.batch,
            segment: a.segment,
            device: a.device.into(),
            quantize: a.quantize,
            decode_latency: a.latency,
            passkey: passkey.clone(),
            loops: loops.clone(),
        };
        reports.push(liger_converter::evaluate(&opts, &progress)?);
    }
    match (a.json, reports.len()) {
        (true, 1) => println!("{}", serde_json::to_string_pretty(&reports[0])?),
        (true, _) => println!("{}", serde_json::to_string_pretty(&reports)?),
        (false, 1) => print!("{}", liger_converter::eval::render(&reports[0])),
        (false, _) => print!("{}", liger_converter::eval::render_comparison(&reports)),
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert(a) => {
            let full_attention = match &a.full_attention_layers {
                Some(s) => s.parse::<FullAttention>()?,
                None => FullAttention::None,
            };
            let opts = ConvertOptions {
                source: a.from.clone(),
                out: a.out,
                settings: LigerSettings {
                    variant: match a.variant {
                        VariantArg::Gla => Variant::Gla,
                        VariantArg::Hgrn2 => Variant::Hgrn2,
                        VariantArg::Gsa => Variant::Gsa,
                    },
                    window: a.window,
                    mix: Some(a.mix),
                    gate_normalizer: a.gate_normalizer,
                    full_attention,
                    slots: a.slots,
                    global_cache: a.global_cache,
                    sinks: a.sinks,
                    attention_places: a.attention_places,
                    max_distance: a.max_distance,
                    kv_dtype: a.kv_dtype.map(|d| match d {
                        DtypeArg::F32 => KvDtype::F32,
                        DtypeArg::F16 => KvDtype::F16,
                        DtypeArg::Bf16 => KvDtype::Bf16,
                    }),
                },
                dtype: a.dtype.map(Into::into),
                quantize: a.quantize,
                hub: HubOptions {
                    revision: a.revision,
                    token: a.token.filter(|t| !t.is_empty()),
                },
                force: a.write.force,
                shard_limit: a.write.max_shard_size,
                command_line: Some(command_line()),
            };
            let summary = liger_converter::convert(&opts, &Progress::new(!a.write.quiet))?;
            if !a.write.quiet {
                print_summary("converted", &a.from, &summary);
            }
        }
        Command::Import(a) => {
            let opts = ImportOptions {
                source: a.from.clone(),
                out: a.out,
                force: a.write.force,
                shard_limit: a.write.max_shard_size,
                command_line: Some(command_line()),
            };
            let summary = liger_converter::import(&opts, &Progress::new(!a.write.quiet))?;
            if !a.write.quiet {
                print_summary("imported", &a.from.display().to_string(), &summary);
            }
        }
        Command::Recover(a) => run_recover(*a)?,
        Command::SelfDistill(a) => run_self_distill(a)?,
        Command::Eval(a) => run_eval(a)?,
        Command::ApplyAdapter(a) => {
            let opts = ApplyOptions {
                model: a.model,
                adapter: a.adapter,
                out: a.out,
                quantize: a.quantize,
                force: a.force,
                command_line: Some(command_line()),
            };
            let r = liger_converter::apply_adapter(&opts, &Progress::new(!a.quiet))?;
            if !a.quiet {
                println!(
                    "merged {} adapted projections -> {} ({}, {})",
                    r.adapted,
                    r.out.display(),
                    liger_converter::convert::format_label(&WeightFormat {
                        quantize: r.quantize,
                        ..WeightFormat::dense(r.dtype)
                    }),
                    r.weight_files.join(", ")
                );
            }
        }
        Command::Quantize(a) => {
            let opts = QuantizeOptions {
                model: a.model,
                out: a.out,
                format: a.format,
                dtype: a.dtype.map(Into::into),
                force: a.write.force,
                shard_limit: a.write.max_shard_size,
                command_line: Some(command_line()),
            };
            let summary = liger_converter::quantize(&opts, &Progress::new(!a.write.quiet))?;
            if !a.write.quiet {
                print_summary("quantized", &opts.model.display().to_string(), &summary);
            }
        }
        Command::Inspect(a) => {
            let report = liger_converter::inspect(&a.dir)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render_table(&report));
            }
        }
    }
    Ok(())
}

fn run_recover(a: RecoverArgs) -> Result<()> {
    let opts = RecoverOptions {
        teacher: a.teacher,
        student: a.student,
        data: a.data,
        out: a.out,
        stage: match a.stage {
            StageArg::Transfer => StageChoice::Transfer,
            StageArg::Distill => StageChoice::Distill,
            StageArg::Lm => StageChoice::Lm,
            StageArg::All => StageChoice::All,
        },
        lora: LoraConfig {
            rank: a.rank,
            alpha: a.alpha,
            targets: a.targets,
        },
        lr: a.lr,
        transfer_lr: a.transfer_lr,
        weight_decay: a.weight_decay,
        steps: a.steps,
        tokens: a.tokens,
        transfer_steps: a.transfer_steps,
        seq_len: a.seq_len,
        segment: a.segment,
        batch: a.batch,
        transfer_batch: a.transfer_batch,
        transfer_chunks: a.transfer_chunks,
        seed: a.seed,
        device: a.device.into(),
        resume: a.resume,
        checkpoint_every: a.checkpoint_every,
        adapter_only: a.adapter_only,
        init_adapter: a.init_adapter,
        self_distill: a.self_distill,
        self_distill_tokens: a.self_distill_tokens,
        self_distill_save: a.self_distill_save,
        ce_weight: a.ce_weight,
        top_k: a.top_k,
        max_grad_norm: a.max_grad_norm,
        force: a.force,
        command_line: Some(command_line()),
        stop_after: a.stop_after,
    };
    let s = liger_converter::recover(&opts, &Progress::new(!a.quiet))?;
    if !a.quiet {
        for st in &s.stages {
            println!("{}", st.summary());
        }
        println!(
            "recovered -> {} ({}) in {:.0} s",
            s.out.display(),
            if s.adapter_only {
                "LoRA adapter"
            } else {
                "merged model"
            },
            s.seconds
        );
    }
    Ok(())
}

fn run_self_distill(a: SelfDistillArgs) -> Result<()> {
    let opts = SelfDistillOptions {
        teacher: a.teacher,
        prompts: a.prompts,
        count: a.count,
        max_tokens: a.max_tokens,
        out: a.out,
        seed: a.seed,
        device: a.device.into(),
        force: a.force,
    };
    let s = liger_converter::self_distill(&opts, &Progress::new(!a.quiet))?;
    if !a.quiet {
        println!(
            "{} conversations ({} answer tokens) -> {} in {:.0} s",
            s.conversations,
            s.answer_tokens,
            s.out.display(),
            s.seconds
        );
    }
    Ok(())
}

/// Prints `error: <message>` on one line.
fn report(msg: &str) {
    let one_line = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("error: {one_line}");
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help, --version, and the help shown when no command is given.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            // clap's message is its first paragraph (which may list the missing flags or the
            // possible values); the usage and tips that follow are noise here.
            let text = e.to_string();
            let first = text.split("\n\n").next().unwrap_or("invalid arguments");
            report(first.trim().strip_prefix("error:").unwrap_or(first));
            return ExitCode::from(2);
        }
    };
    // Before any other thread exists: fixes candle's thread count once (see
    // liger_model::threads); `--threads` of recover/eval chooses it.
    liger_model::threads::init(cli.threads());
    // As liger-serve: LIGER_LOG_FORMAT=json for log collectors (the prepare job's container),
    // colour only on a terminal.
    let json = match std::env::var("LIGER_LOG_FORMAT").as_deref().map(str::trim) {
        Err(_) | Ok("") | Ok("text") => false,
        Ok("json") => true,
        Ok(other) => {
            report(&format!(
                "LIGER_LOG_FORMAT={other:?} is not a log format (use text or json)"
            ));
            return ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal())
            .without_time()
            .init();
    }
    // Ctrl-C or SIGTERM: remove the half-written output folder, then leave.
    if let Err(e) = ctrlc::set_handler(|| {
        liger_converter::output::abort_pending();
        eprintln!("error: interrupted; partial output removed");
        std::process::exit(130);
    }) {
        tracing::warn!("cannot install the interrupt handler: {e}");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1.5 MiB"), Ok(1_572_864));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("2XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn cli_parses_the_documented_flags() {
        let cli = Cli::try_parse_from([
            "liger-convert",
            "convert",
            "--from",
            "org/name",
            "--out",
            "x",
            "--variant",
            "hgrn2",
            "--window",
            "32",
            "--mix",
            "0.25",
            "--full-attention-layers",
            "every:8",
            "--dtype",
            "bf16",
            "--revision",
            "v1",
            "--force",
            "--quiet",
        ])
        .unwrap();
        let Command::Convert(a) = cli.command else {
            panic!("convert expected")
        };
        assert!(matches!(a.variant, VariantArg::Hgrn2));
        assert_eq!((a.window, a.mix), (32, 0.25));
        assert!(a.write.force && a.write.quiet);
        assert_eq!(a.write.max_shard_size, 2_000_000_000);
        assert!(Cli::try_parse_from(["liger-convert", "inspect", "dir", "--json"]).is_ok());
    }
}
