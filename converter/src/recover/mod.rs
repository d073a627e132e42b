//! `recover`: restores the quality a Liger conversion lost, by training LoRA adapters on the
//! converted model (the student) against the original (the teacher).
//!
//! Stages (LIGER.md §3):
//! 1. `transfer` — attention transfer: each Liger layer's LoRA on q/k/v learns to make its
//!    attention output (before `o_proj`) match the teacher layer's, both fed the teacher's
//!    hidden states. Layers are independent, so one teacher pass per batch serves all of
//!    them and no gradient crosses layers: cheap.
//! 2. `distill` — end to end: KL(teacher || student) on next-token distributions (plus,
//!    optionally, cross-entropy), LoRA on q/k/v of every layer, all else frozen.
//! 3. `lm` — Liger's own recipe: next-token cross-entropy alone (assistant tokens only for
//!    conversations).
//!
//! `all` runs transfer then distill. The result is written as a merged model folder or,
//! with `--adapter-only`, as a PEFT adapter; either way through a temporary folder renamed
//! into place. Checkpoints in `OUT.ckpt/` let `--resume` continue an interrupted run to
//! the bit-identical result.
//!
//! - [`data`]: data files to token chunks; [`template`]: chat templates;
//! - [`selfdistill`] and [`prompts`]: training text written by the teacher;
//!   [`conversations`]: that text as a file (the `self-distill` command);
//! - [`teacher`]: the teacher's top-k targets; [`loss`]: the losses; [`head`]: the LM
//!   head and losses fused into one op (CPU);
//! - [`optim`]: AdamW with saveable state; [`checkpoint`]: checkpoints;
//! - [`stats`]: what is reported; [`train`]: the training loops.

pub mod checkpoint;
pub mod conversations;
pub mod data;
pub mod head;
pub mod loss;
pub mod optim;
pub mod prompts;
pub mod selfdistill;
pub mod stats;
pub mod teacher;
pub mod train;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::DType;
use liger_model::checkpoint::{Checkpoint, LoadOptions};
use liger_model::lora::{self, LoraConfig};
use liger_model::text::{Text, TOKENIZER_FILE};
use liger_model::{LayerKind, Model, RuntimeOptions};
use serde::Serialize;
use serde_json::{json, Value};

use crate::adapter::DeviceChoice;
use crate::folder::{Config, ModelFolder, SideFiles, Weights};
use crate::output::{self, PartialDir, WeightFormat};
use crate::progress::Progress;
use crate::{Error, Result};
use checkpoint::{first_difference, Checkpoints};
use conversations::write_conversations;
pub use conversations::{self_distill, SelfDistillOptions, SelfDistillSummary};
use data::{Chunk, Entry, TokenStream};
use liger_model::chat::Message;
use stats::StageStats;

/// One kind of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Transfer,
    Distill,
    Lm,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Transfer => "transfer",
            Stage::Distill => "distill",
            Stage::Lm => "lm",
        }
    }

    /// Default optimizer steps (transfer: per layer, all layers at once).
    fn default_steps(self) -> usize {
        match self {
            Stage::Transfer => 150,
            Stage::Distill | Stage::Lm => 300,
        }
    }

    /// Default peak learning rate: LIGER.md's prototype used 2e-3 for transfer; the
    /// paper's recipe is 1e-3.
    fn default_lr(self) -> f64 {
        match self {
            Stage::Transfer => 2e-3,
            Stage::Distill | Stage::Lm => 1e-3,
        }
    }
}

/// What `--stage` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StageChoice {
    Transfer,
    Distill,
    Lm,
    /// Transfer, then distill.
    #[default]
    All,
}

impl StageChoice {
    pub fn stages(self) -> Vec<Stage> {
        match self {
            StageChoice::Transfer => vec![Stage::Transfer],
            StageChoice::Distill => vec![Stage::Distill],
            StageChoice::Lm => vec![Stage::Lm],
            StageChoice::All => vec![Stage::Transfer, Stage::Distill],
        }
    }
}

/// Everything `liger-convert recover` takes.
#[derive(Debug, Clone)]
pub struct RecoverOptions {
    /// The original model folder.
    pub teacher: PathBuf,
    /// The converted (Liger) folder.
    pub student: PathBuf,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub stage: StageChoice,
    pub lora: LoraConfig,
    /// Peak learning rate of every stage (default per stage).
    pub lr: Option<f64>,
    /// Overrides `lr` for transfer.
    pub transfer_lr: Option<f64>,
    pub weight_decay: f64,
    /// Optimizer steps of every stage.
    pub steps: Option<usize>,
    /// Training tokens of every stage (instead of `steps`).
    pub tokens: Option<u64>,
    /// Overrides `steps` / `tokens` for transfer.
    pub transfer_steps: Option<usize>,
    pub seq_len: usize,
    /// Distill and lm run each chunk through the student in pieces of this many tokens,
    /// carrying the state from piece to piece but not its gradient (truncated
    /// backpropagation through time), so chunks far longer than the window train in memory
    /// linear in their length. 0: the whole chunk at once.
    pub segment: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Overrides `batch` for transfer.
    pub transfer_batch: Option<usize>,
    /// Chunks the transfer stage trains on, their teacher activations kept in memory
    /// (0: every chunk, nothing kept).
    pub transfer_chunks: usize,
    pub seed: u64,
    pub device: DeviceChoice,
    pub resume: bool,
    /// Checkpoint every K steps (0: only at stage ends).
    pub checkpoint_every: usize,
    pub adapter_only: bool,
    /// Start the adapters from this one (PEFT layout) instead of fresh ones.
    pub init_adapter: Option<PathBuf>,
    /// Responses for the teacher to write (0: none).
    pub self_distill: usize,
    /// Longest self-distilled response, in tokens.
    pub self_distill_tokens: usize,
    /// Also write the self-distilled conversations here (JSON Lines).
    pub self_distill_save: Option<PathBuf>,
    /// Weight of the cross-entropy term added to the distillation KL.
    pub ce_weight: f64,
    /// Teacher tokens kept per position for distillation.
    pub top_k: usize,
    /// Gradient clipping (global L2 norm) for distill and lm; 0 disables.
    pub max_grad_norm: f64,
    pub force: bool,
    pub command_line: Option<String>,
    /// Test hook: stop (as if interrupted) after this many optimizer steps in this run.
    pub stop_after: Option<usize>,
}

impl RecoverOptions {
    pub fn new(
        teacher: impl Into<PathBuf>,
        student: impl Into<PathBuf>,
        data: Vec<PathBuf>,
        out: impl Into<PathBuf>,
    ) -> Self {
        Self {
            teacher: teacher.into(),
            student: student.into(),
            data,
            out: out.into(),
            stage: StageChoice::All,
            lora: LoraConfig::liger_default(),
            lr: None,
            transfer_lr: None,
            weight_decay: 0.01,
            steps: None,
            tokens: None,
            transfer_steps: None,
            seq_len: 256,
            segment: 0,
            batch: 4,
            transfer_batch: None,
            transfer_chunks: 32,
            seed: 0,
            device: DeviceChoice::Cpu,
            resume: false,
            checkpoint_every: 50,
            adapter_only: false,
            init_adapter: None,
            self_distill: 0,
            self_distill_tokens: 200,
            self_distill_save: None,
            ce_weight: 0.0,
            top_k: 64,
            max_grad_norm: 1.0,
            force: false,
            command_line: None,
            stop_after: None,
        }
    }

    fn validate(&self) -> Result<()> {
        self.lora
            .validate()
            .map_err(|e| Error::flag("--rank/--alpha/--targets", e.to_string()))?;
        let positive = |flag: &str, v: usize| {
            if v == 0 {
                Err(Error::flag(flag, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("--seq-len", self.seq_len)?;
        positive("--batch", self.batch)?;
        positive("--top-k", self.top_k)?;
        if self.seq_len < 2 {
            return Err(Error::flag(
                "--seq-len",
                "must be at least 2 (one prediction)",
            ));
        }
        if let Some(b) = self.transfer_batch {
            positive("--transfer-batch", b)?;
        }
        for (flag, v) in [
            ("--steps", self.steps),
            ("--transfer-steps", self.transfer_steps),
        ] {
            if let Some(v) = v {
                positive(flag, v)?;
            }
        }
        if self.tokens == Some(0) {
            return Err(Error::flag("--tokens", "must be at least 1"));
        }
        for (flag, v) in [("--lr", self.lr), ("--transfer-lr", self.transfer_lr)] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::flag(flag, "must be a positive number"));
                }
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::flag("--weight-decay", "must be zero or positive"));
        }
        if !(self.ce_weight.is_finite() && self.ce_weight >= 0.0) {
            return Err(Error::flag("--ce-weight", "must be zero or positive"));
        }
        if self.data.is_empty() && self.self_distill == 0 {
            return Err(Error::flag(
                "--data",
                "give at least one data file, or let the teacher write the data with --self-distill N",
            ));
        }
        Ok(())
    }

    /// Steps, batch and learning rate of each stage.
    pub fn plans(&self) -> Vec<StagePlan> {
        self.stage
            .stages()
            .into_iter()
            .map(|stage| {
                let transfer = stage == Stage::Transfer;
                let batch = if transfer {
                    self.transfer_batch.unwrap_or(self.batch)
                } else {
                    self.batch
                };
                let generic = self.steps.or_else(|| {
                    self.tokens
                        .map(|t| t.div_ceil((batch * self.seq_len) as u64) as usize)
                });
                let steps = if transfer {
                    self.transfer_steps.or(generic)
                } else {
                    generic
                }
                .unwrap_or(stage.default_steps());
                let lr = if transfer {
                    self.transfer_lr.or(self.lr)
                } else {
                    self.lr
                }
                .unwrap_or(stage.default_lr());
                StagePlan {
                    stage,
                    steps,
                    batch,
                    lr,
                }
            })
            .collect()
    }
}

/// One stage as it will run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StagePlan {
    pub stage: Stage,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RecoverSummary {
    pub out: PathBuf,
    pub adapter_only: bool,
    pub stages: Vec<StageStats>,
    /// Training chunks and their tokens.
    pub chunks: usize,
    pub data_tokens: u64,
    /// Conversations the teacher wrote.
    pub self_distilled: usize,
    pub seconds: f64,
    /// Whether the run continued from a checkpoint.
    pub resumed: bool,
}

/// Runs recovery as `opts` says.
pub fn recover(opts: &RecoverOptions, progress: &Progress) -> Result<RecoverSummary> {
    opts.validate()?;
    output::check_destination(&opts.out, opts.force)?;
    output::check_not_source(&opts.out, &opts.student)?;
    output::check_not_source(&opts.out, &opts.teacher)?;
    let started = Instant::now();
    let ckpt = Checkpoints::for_output(&opts.out);
    if ckpt.exists() && !opts.resume {
        return Err(Error::checkpoint(
            &ckpt.dir,
            "exists from an earlier run: add --resume to continue it, or delete it to start over",
        ));
    }
    let restored = if opts.resume { ckpt.load()? } else { None };
    let device = opts.device.device()?;
    let log = Log::new(progress);

    // Models: both in f32, whatever they are stored in (training needs the precision).
    let spinner = progress.spinner("load");
    let (teacher_dir, student_dir) = (
        Checkpoint::open(&opts.teacher)?,
        Checkpoint::open(&opts.student)?,
    );
    if student_dir.is_quantized() {
        // GGML block products have no backward pass: no gradient would reach earlier layers.
        return Err(Error::flag(
            "--student",
            format!(
                "{} is a quantized checkpoint; recover the dense conversion (quantize after)",
                opts.student.display()
            ),
        ));
    }
    let as_stored = LoadOptions::default();
    let teacher = teacher_dir.load(&device, DType::F32, &as_stored)?;
    let mut student = student_dir.load(&device, DType::F32, &as_stored)?;
    spinner.finish_and_clear();
    check_pair(&teacher, &student)?;
    student.set_options(RuntimeOptions {
        chunk_size: TRAIN_CHUNK,
        differentiable: true,
        ..Default::default()
    })?;
    let text = load_text(&[&student_dir, &teacher_dir])?;
    let eos = *student.config().eos_token_ids.first().ok_or_else(|| {
        Error::Training("config.json names no eos_token_id (needed between documents)".into())
    })?;

    // Data: files, then the teacher's conversations.
    let mut entries = data::read_files(&opts.data)?;
    let prompts: Vec<Vec<Message>> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Prompt(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    if !prompts.is_empty() && opts.self_distill == 0 {
        log.line(&format!(
            "note: {} prompt record(s) in the data are used only with --self-distill",
            prompts.len()
        ));
    }
    let mut self_distilled = 0;
    if opts.self_distill > 0 {
        let answering = conversations::Teacher {
            model: &teacher,
            text: &text,
        };
        let convs = self_distill_data(opts, &ckpt, &answering, &prompts, progress, &log)?;
        self_distilled = convs.len();
        if let Some(path) = &opts.self_distill_save {
            write_conversations(path, &convs)?;
        }
        entries.extend(convs.into_iter().map(Entry::Conversation));
    }
    let mut stream = TokenStream::default();
    stream.extend(&entries, &text, eos)?;
    let chunks = stream.chunks(opts.seq_len);
    if chunks.is_empty() {
        return Err(Error::Data(
            "the data holds fewer than two tokens: nothing to train on".into(),
        ));
    }
    let data_tokens: u64 = chunks.iter().map(|c| c.tokens.len() as u64).sum();
    let n_chunks = chunks.len();
    log.line(&format!(
        "data: {} documents, {data_tokens} tokens in {} chunks of up to {}{}",
        stream.documents,
        chunks.len(),
        opts.seq_len,
        if self_distilled > 0 {
            format!(" ({self_distilled} conversations written by the teacher)")
        } else {
            String::new()
        }
    ));

    let plans = opts.plans();
    let init = match &opts.init_adapter {
        Some(dir) => Some(InitAdapter::read(dir, &opts.lora)?),
        None => None,
    };
    let settings = settings_json(opts, &plans, &chunks, init.as_ref());
    if let Some(r) = &restored {
        if let Some(d) = first_difference(&r.meta.settings, &settings) {
            return Err(Error::checkpoint(
                &ckpt.dir,
                format!("was made with other settings or data ({d}); rerun with those, or delete it to start over"),
            ));
        }
    }

    let vars = student.attach_lora(&opts.lora, opts.seed)?;
    if let Some(init) = &init {
        let fresh = init.load_into(&vars)?;
        if fresh > 0 {
            log.line(&format!(
                "--init-adapter covers {}; {} new adapter tensors start fresh",
                init.targets.join(","),
                fresh
            ));
        }
        if init.rank < opts.lora.rank {
            log.line(&format!(
                "--init-adapter has rank {}: its slots are the first of {}, the rest start fresh",
                init.rank, opts.lora.rank
            ));
        }
    }
    let resumed = restored.is_some();
    let mut trainer = train::Trainer::new(train::TrainerParts {
        opts,
        plans: plans.clone(),
        settings,
        teacher,
        student,
        vars,
        chunks,
        ckpt,
        progress: progress.clone(),
        log: log.clone(),
    })?;
    if let Some(r) = restored {
        log.line(&format!(
            "resuming from {} (stage {}, step {})",
            trainer.ckpt_dir().display(),
            plans
                .get(r.meta.stage_index)
                .map_or("done", |p| p.stage.name()),
            r.meta.step
        ));
        trainer.restore(r)?;
    }
    trainer.run()?;

    let (student, stats, ckpt, elapsed_before) = trainer.finish();
    let seconds = elapsed_before + started.elapsed().as_secs_f64();
    let summary = RecoverSummary {
        out: opts.out.clone(),
        adapter_only: opts.adapter_only,
        stages: stats,
        chunks: n_chunks,
        data_tokens,
        self_distilled,
        seconds,
        resumed,
    };
    let stored = student_dir.stored_dtype();
    let summary = write_result(opts, (student, stored), summary, &plans, progress)?;
    ckpt.remove();
    Ok(summary)
}

/// Chunk length of the chunked GLA form in training. The intra-chunk decay tensors grow
/// with it and dominate the backward pass: on SmolLM2 (256-token sequences) a layer's
/// transfer step took about 0.3 s with 8, 0.4 s with 16 and 1.5 s with 64; 4 was no faster.
const TRAIN_CHUNK: usize = 8;

/// The student must be a Liger conversion of the teacher's architecture.
fn check_pair(teacher: &Model, student: &Model) -> Result<()> {
    let (t, s) = (teacher.config(), student.config());
    if s.liger.is_none() {
        return Err(Error::flag(
            "--student",
            "is not a Liger conversion (its config.json has no `liger` section); convert it first",
        ));
    }
    let same = t.num_layers == s.num_layers
        && t.hidden_size == s.hidden_size
        && t.num_heads == s.num_heads
        && t.num_kv_heads == s.num_kv_heads
        && t.head_dim == s.head_dim
        && t.vocab_size == s.vocab_size
        && t.intermediate_size == s.intermediate_size;
    if !same {
        return Err(Error::flag(
            "--teacher",
            format!(
                "does not match the student (teacher: {} layers, hidden {}, vocab {}; student: {} layers, hidden {}, vocab {})",
                t.num_layers, t.hidden_size, t.vocab_size, s.num_layers, s.hidden_size, s.vocab_size
            ),
        ));
    }
    Ok(())
}

/// The text side (tokenizer, template, stop ids) of the first folder that has a
/// tokenizer: a student folder written without one still trains on its teacher's.
pub fn load_text(folders: &[&Checkpoint]) -> Result<Text> {
    let has = |c: &&&Checkpoint| c.dir().join(TOKENIZER_FILE).is_file();
    let first = folders.iter().find(has).or(folders.first());
    Ok(first.expect("at least one folder").text()?)
}

/// The teacher's conversations: read back from the checkpoint folder when resuming (so
/// they need not be written again), else generated and stored there.
fn self_distill_data(
    opts: &RecoverOptions,
    ckpt: &Checkpoints,
    teacher: &conversations::Teacher,
    data_prompts: &[Vec<Message>],
    progress: &Progress,
    log: &Log,
) -> Result<Vec<Vec<Message>>> {
    let saved = ckpt.dir.join(checkpoint::SELF_DISTILL);
    if opts.resume && saved.is_file() {
        let entries = data::read_file(&saved)?;
        let convs: Vec<Vec<Message>> = entries
            .into_iter()
            .filter_map(|e| match e {
                Entry::Conversation(m) => Some(m),
                _ => None,
            })
            .collect();
        log.line(&format!(
            "self-distill: {} conversations reused from {}",
            convs.len(),
            saved.display()
        ));
        return Ok(convs);
    }
    let convs = conversations::teacher_conversations(
        teacher,
        data_prompts,
        selfdistill::GenSettings {
            count: opts.self_distill,
            max_tokens: opts.self_distill_tokens,
            batch: 16,
            seed: opts.seed,
        },
        progress,
        log,
    )?;
    ckpt.create()?;
    write_conversations(&saved, &convs)?;
    Ok(convs)
}

/// An earlier adapter to continue training from (`--init-adapter`). It may target fewer
/// projections than this run: the others start fresh (`B` = 0, so they change nothing at
/// first), which lets a run add o_proj or MLP adapters without losing earlier training.
/// It may also have a lower rank: its `A` rows and `B` columns fill the first slots and the
/// rest start fresh, `B` rescaled so `scale * B A` is unchanged, which widens an adapter
/// that has stopped improving without starting over.
struct InitAdapter {
    dir: PathBuf,
    /// The projections it adapts.
    targets: Vec<String>,
    rank: usize,
    /// Multiplies its `B`: its scale (alpha / rank) over this run's.
    b_factor: f64,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    /// Of its weights file, so a checkpoint is resumed only from the same start.
    fingerprint: String,
}

impl InitAdapter {
    fn read(dir: &Path, want: &LoraConfig) -> Result<Self> {
        let flag = |msg: String| Error::flag("--init-adapter", format!("{}: {msg}", dir.display()));
        let (cfg, tensors) = lora::load_adapter(dir).map_err(|e| flag(e.to_string()))?;
        let covered = cfg.targets.iter().all(|t| want.targets.contains(t));
        if cfg.rank > want.rank || !covered {
            return Err(flag(format!(
                "has rank {} on {} but this run trains rank {} on {} \
                 (pass --rank at least the adapter's, and --targets naming at least its projections)",
                cfg.rank,
                cfg.targets.join(","),
                want.rank,
                want.targets.join(",")
            )));
        }
        let weights = dir.join(lora::ADAPTER_WEIGHTS);
        let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            rank: cfg.rank,
            b_factor: cfg.scale() / want.scale(),
            targets: cfg.targets,
            tensors,
            fingerprint: data::fingerprint_bytes(&bytes),
        })
    }

    /// Whether a student variable (PEFT name `...{block}.{target}.lora_{A,B}.weight`)
    /// belongs to a projection this adapter trained.
    fn covers(&self, name: &str) -> bool {
        self.targets
            .iter()
            .any(|t| name.contains(&format!(".{t}.lora_")))
    }

    /// Sets every variable of the adapter's projections from it (each must be there, with
    /// its shape up to the rank); variables of projections it lacks, and the slots beyond
    /// its rank, keep their fresh values. Returns how many variables it left fresh.
    fn load_into(&self, vars: &[(String, candle_core::Var)]) -> Result<usize> {
        let flag =
            |msg: String| Error::flag("--init-adapter", format!("{}: {msg}", self.dir.display()));
        let covered: Vec<_> = vars.iter().filter(|(n, _)| self.covers(n)).collect();
        if covered.len() != self.tensors.len() {
            return Err(flag(format!(
                "holds {} tensors but the student's adapters on {} have {} (another model?)",
                self.tensors.len(),
                self.targets.join(","),
                covered.len()
            )));
        }
        for (name, var) in covered {
            let t = self
                .tensors
                .get(name)
                .ok_or_else(|| flag(format!("lacks `{name}` (another model?)")))?;
            // A is [rank, in] and B is [out, rank]: the rank is A's rows and B's columns.
            let is_b = name.ends_with(".lora_B.weight");
            let rank_dim = usize::from(is_b);
            let mut expect = var.dims().to_vec();
            expect[rank_dim] = self.rank;
            if t.dims() != expect.as_slice() {
                return Err(flag(format!(
                    "`{name}` is {:?}, the student needs {:?}",
                    t.dims(),
                    expect
                )));
            }
            let mut t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            if is_b && self.b_factor != 1.0 {
                t = t.affine(self.b_factor, 0.0)?;
            }
            let extra = var.dims()[rank_dim] - self.rank;
            if extra > 0 {
                let fresh = var.as_tensor().narrow(rank_dim, self.rank, extra)?;
                t = candle_core::Tensor::cat(&[&t, &fresh], rank_dim)?;
            }
            var.set(&t)?;
        }
        Ok(vars.len() - self.tensors.len())
    }
}

/// Everything the result depends on; a checkpoint is resumed only under the same.
fn settings_json(
    opts: &RecoverOptions,
    plans: &[StagePlan],
    chunks: &[Chunk],
    init: Option<&InitAdapter>,
) -> Value {
    json!({
        "init_adapter": init.map(|i| i.fingerprint.clone()),
        "stages": plans,
        "seq_len": opts.seq_len,
        "segment": opts.segment,
        "seed": opts.seed,
        "lora": { "rank": opts.lora.rank, "alpha": opts.lora.alpha, "targets": opts.lora.targets },
        "weight_decay": opts.weight_decay,
        "ce_weight": opts.ce_weight,
        "top_k": opts.top_k,
        "max_grad_norm": opts.max_grad_norm,
        "transfer_chunks": opts.transfer_chunks,
        "self_distill": opts.self_distill,
        "self_distill_tokens": opts.self_distill_tokens,
        "data": { "chunks": chunks.len(), "fingerprint": data::fingerprint(chunks) },
    })
}

/// Writes the merged model or the adapter, plus `recovery.json` and a card.
/// `student` with the dtype its folder stores (the merged model is written in it).
fn write_result(
    opts: &RecoverOptions,
    (mut student, stored): (Model, DType),
    mut summary: RecoverSummary,
    plans: &[StagePlan],
    progress: &Progress,
) -> Result<RecoverSummary> {
    let out = PartialDir::begin(&opts.out, opts.force)?;
    let record = json!({
        "teacher": opts.teacher,
        "student": opts.student,
        "data": opts.data,
        "command": opts.command_line,
        "init_adapter": opts.init_adapter,
        "plans": plans,
        "lora": { "rank": opts.lora.rank, "alpha": opts.lora.alpha, "targets": opts.lora.targets },
        "seed": opts.seed,
        "seq_len": opts.seq_len,
        "segment": opts.segment,
        "self_distilled": summary.self_distilled,
        "data_tokens": summary.data_tokens,
        "data_chunks": summary.chunks,
        "seconds": summary.seconds,
        "resumed": summary.resumed,
        "stages": summary.stages,
    });
    if opts.adapter_only {
        // An adapter folder, not a model: the adapter, the record, the card.
        let dir = out.path().to_path_buf();
        lora::save_adapter(
            &dir,
            &opts.lora,
            &student.lora_tensors(),
            Some(&opts.student.display().to_string()),
        )?;
        output::write_json(&dir.join("recovery.json"), &record)?;
        let readme = dir.join("README.md");
        std::fs::write(&readme, card(opts, &summary)).map_err(|e| Error::io(&readme, e))?;
        summary.out = out.commit()?;
        return Ok(summary);
    }
    student.merge_lora()?;
    let format = WeightFormat::dense(stored);
    let folder = ModelFolder {
        config: Config::CopyFrom(&opts.student),
        weights: Weights::Model(&student),
        format: &format,
        side_files: SideFiles::CopyFrom(&opts.student),
        records: vec![("recovery.json", record)],
    };
    let card = card(opts, &summary);
    summary.out = folder.write(out, |_| card, progress)?.0;
    Ok(summary)
}

fn card(opts: &RecoverOptions, s: &RecoverSummary) -> String {
    let name = opts
        .student
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mut c = String::new();
    let _ = writeln!(
        c,
        "---\nlibrary_name: liger\ntags:\n- liger\n- linear-attention\n- lora\n---\n"
    );
    if opts.adapter_only {
        let _ = writeln!(c, "# Recovery adapter for {name}\n");
        let _ = writeln!(
            c,
            "A LoRA adapter (PEFT layout: `adapter_config.json`, `adapter_model.safetensors`) \
             trained by `liger-convert recover` {} to restore the quality that Liger conversion \
             cost `{}`, with `{}` as the teacher. Merge it with \
             `liger-convert apply-adapter --model {} --adapter <this folder> --out <dir>`.\n",
            env!("CARGO_PKG_VERSION"),
            opts.student.display(),
            opts.teacher.display(),
            opts.student.display()
        );
    } else {
        let _ = writeln!(c, "# {name}, recovered\n");
        let _ = writeln!(
            c,
            "The Liger conversion `{}` after recovery training by `liger-convert recover` {} \
             with `{}` as the teacher; the LoRA adapters (rank {}, alpha {}, on {}) are merged \
             into the weights, so it serves like any Liger checkpoint.\n",
            opts.student.display(),
            env!("CARGO_PKG_VERSION"),
            opts.teacher.display(),
            opts.lora.rank,
            opts.lora.alpha,
            opts.lora.targets.join(", ")
        );
    }
    c.push_str("## Training\n\n| stage | steps | batch x tokens | lr | loss first -> last | tokens | time |\n|---|---|---|---|---|---|---|\n");
    for st in &s.stages {
        let f = |x: Option<f32>| x.map_or("-".to_owned(), |v| format!("{v:.4}"));
        let _ = writeln!(
            c,
            "| {} | {} | {} x {} | {} | {} -> {} | {} | {:.0} s |",
            st.stage,
            st.steps,
            st.batch,
            st.seq_len,
            st.lr,
            f(st.first_loss()),
            f(st.last_loss()),
            st.tokens,
            st.seconds
        );
    }
    let _ =
        writeln!(
        c,
        "\nData: {} tokens{}; seed {}; total {:.0} s. Per-step losses are in `recovery.json`.\n",
        s.data_tokens,
        if s.self_distilled > 0 {
            format!(", including {} conversations written by the teacher", s.self_distilled)
        } else {
            String::new()
        },
        opts.seed,
        s.seconds
    );
    if let Some(cmd) = &opts.command_line {
        let _ = writeln!(c, "## How it was made\n\n```sh\n{cmd}\n```\n");
    }
    c.push_str("Evaluate it with `liger-convert eval --model <folder> --reference <teacher> --data <held-out files>`.\n");
    c
}

/// Which layers the transfer stage trains.
pub fn liger_layers(model: &Model) -> Vec<usize> {
    let cfg = model.config();
    (0..cfg.num_layers)
        .filter(|&i| matches!(cfg.layer_kind(i), LayerKind::Liger))
        .collect()
}

/// Status lines: on stderr above the bars in a terminal, and (when not quiet) as plain
/// lines every so often when stderr is a file, so a log of a long background run shows
/// progress too.
#[derive(Clone)]
pub struct Log {
    enabled: bool,
    progress: Progress,
    plain: bool,
}

impl Log {
    fn new(progress: &Progress) -> Self {
        Self {
            enabled: progress.is_enabled(),
            progress: progress.clone(),
            plain: !std::io::stderr().is_terminal(),
        }
    }

    /// A line that stays.
    pub fn line(&self, msg: &str) {
        if self.enabled {
            self.progress.println(msg);
        }
    }

    /// Whether periodic plain progress lines are wanted (no bar is visible).
    pub fn wants_plain(&self) -> bool {
        self.enabled && self.plain
    }
}

/// How often a plain progress line is printed when there is no visible bar.
pub const PLAIN_EVERY: Duration = Duration::from_secs(30);
