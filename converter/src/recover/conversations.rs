//! The teacher's conversations as a file: the `self-distill` command, and the generation
//! step that `recover --self-distill` shares with it.
//!
//! `recover --self-distill N` writes its conversations and trains on them in one run. To
//! hold some out for evaluation, review them, or mix them with other data in chosen
//! proportions, they are wanted on their own first; `liger-convert self-distill` does only
//! that, without loading a student or starting to train.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use serde_json::json;

use super::data::{self, Entry};
use super::selfdistill::{self, GenSettings};
use super::{prompts, Log, PLAIN_EVERY};
use crate::adapter::DeviceChoice;
use crate::output;
use crate::progress::Progress;
use crate::{Error, Result};
use liger_model::chat::Message;
use liger_model::checkpoint::{Checkpoint, LoadOptions};
use liger_model::text::Text;

/// What `liger-convert self-distill` is asked to do.
#[derive(Debug, Clone)]
pub struct SelfDistillOptions {
    /// The model that answers (usually the original, the recovery teacher).
    pub teacher: PathBuf,
    /// Files whose `prompt` (or `messages`) records are the questions; none: built-in ones.
    pub prompts: Vec<PathBuf>,
    /// Answers to write: the prompts in order, then (if more) sampled second answers.
    pub count: usize,
    /// Longest answer, in tokens.
    pub max_tokens: usize,
    /// Where the conversations go (JSON Lines with `messages`).
    pub out: PathBuf,
    pub seed: u64,
    pub device: DeviceChoice,
    /// Replace `out` if it exists.
    pub force: bool,
}

impl SelfDistillOptions {
    pub fn new(teacher: impl Into<PathBuf>, count: usize, out: impl Into<PathBuf>) -> Self {
        Self {
            teacher: teacher.into(),
            prompts: Vec::new(),
            count,
            max_tokens: 200,
            out: out.into(),
            seed: 0,
            device: DeviceChoice::Cpu,
            force: false,
        }
    }
}

/// What `self-distill` wrote.
#[derive(Debug, Clone)]
pub struct SelfDistillSummary {
    pub out: PathBuf,
    pub conversations: usize,
    /// Tokens of the answers alone.
    pub answer_tokens: usize,
    pub seconds: f64,
}

/// Has the teacher answer `opts.count` prompts and writes the conversations to `opts.out`
/// (through a temporary file renamed into place, so an existing file is never half
/// replaced).
pub fn self_distill(opts: &SelfDistillOptions, progress: &Progress) -> Result<SelfDistillSummary> {
    if opts.count == 0 {
        return Err(Error::flag("--count", "must be at least 1"));
    }
    if opts.max_tokens == 0 {
        return Err(Error::flag("--max-tokens", "must be at least 1"));
    }
    output::check_destination(&opts.out, opts.force)?;
    let prompts = prompt_records(&opts.prompts)?;
    let started = Instant::now();
    let device = opts.device.device()?;
    let spinner = progress.spinner("load");
    let stored = Checkpoint::open(&opts.teacher)?;
    let teacher = stored.load(&device, DType::F32, &LoadOptions::default())?;
    spinner.finish_and_clear();
    let text = stored.text()?;
    let convs = teacher_conversations(
        &Teacher {
            model: &teacher,
            text: &text,
        },
        &prompts,
        GenSettings {
            count: opts.count,
            max_tokens: opts.max_tokens,
            batch: 16,
            seed: opts.seed,
        },
        progress,
        &Log::new(progress),
    )?;
    let mut answer_tokens = 0;
    for c in &convs {
        let answer = c.last().map_or("", |m| m.content.as_str());
        answer_tokens += text
            .encode(answer, false)
            .map_err(|e| Error::Data(format!("tokenizing an answer: {e}")))?
            .len();
    }
    write_conversations(&opts.out, &convs)?;
    Ok(SelfDistillSummary {
        out: opts.out.clone(),
        conversations: convs.len(),
        answer_tokens,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The prompts in `files`: their `prompt` records (a conversation's messages up to its
/// last user turn). A file given with no prompt in it is an error rather than a silent
/// fall back to the built-in prompts.
fn prompt_records(files: &[PathBuf]) -> Result<Vec<Vec<Message>>> {
    let mut out = Vec::new();
    for f in files {
        let found: Vec<Vec<Message>> = data::read_file(f)?
            .into_iter()
            .filter_map(|e| match e {
                Entry::Prompt(m) => Some(m),
                _ => None,
            })
            .collect();
        if found.is_empty() {
            return Err(Error::Data(format!(
                "prompt file {}: no prompts (JSON Lines records with `prompt`, or `messages` ending in a user turn)",
                f.display()
            )));
        }
        out.extend(found);
    }
    Ok(out)
}

/// The answering model with what it needs to read and write text.
pub(super) struct Teacher<'a> {
    pub model: &'a liger_model::Model,
    pub text: &'a Text,
}

/// The teacher's answers to `prompts` (the built-in prompts when empty), as conversations.
pub(super) fn teacher_conversations(
    teacher: &Teacher,
    prompts: &[Vec<Message>],
    gen: GenSettings,
    progress: &Progress,
    log: &Log,
) -> Result<Vec<Vec<Message>>> {
    let builtin;
    let prompts = if prompts.is_empty() {
        builtin = prompts::PROMPTS
            .iter()
            .map(|p| vec![Message::new("user", *p)])
            .collect::<Vec<_>>();
        &builtin
    } else {
        prompts
    };
    let bar = progress.items(gen.count as u64, "generate");
    let t0 = Instant::now();
    let mut last_line = Instant::now();
    let mut on_done = |done: usize| {
        if log.wants_plain() && last_line.elapsed() >= PLAIN_EVERY {
            last_line = Instant::now();
            log.line(&format!(
                "self-distill: {done}/{} answers written ({:.0} s)",
                gen.count,
                t0.elapsed().as_secs_f64()
            ));
        }
    };
    let convs = selfdistill::generate(
        teacher.model,
        teacher.text,
        prompts,
        gen,
        &bar,
        &mut on_done,
    )?;
    bar.finish_and_clear();
    log.line(&format!(
        "self-distill: the teacher answered {} of {} prompts in {:.0} s",
        convs.len(),
        gen.count,
        t0.elapsed().as_secs_f64()
    ));
    Ok(convs)
}

/// Writes conversations as JSON Lines (`{"messages": [...]}` per line), through a temporary
/// file in the same folder renamed over `path`.
pub(super) fn write_conversations(path: &Path, convs: &[Vec<Message>]) -> Result<()> {
    let mut text = String::new();
    for c in convs {
        text.push_str(&serde_json::to_string(&json!({ "messages": c })).expect("plain data"));
        text.push('\n');
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::flag("--out", format!("`{}` is not a file", path.display())))?;
    let temp = path.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&temp, text).map_err(|e| Error::io(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        Error::io(path, e)
    })
}
