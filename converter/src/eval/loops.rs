//! `--loops`: how often greedy answers fall into repeating themselves.
//!
//! A linearized model that has lost track of what it already wrote tends to write it again
//! ("A lone ship, A lone ship, A lone ship, ..."), which held-out perplexity hardly shows.
//! The model and the reference answer the same prompts greedily through the chat template
//! (the generation code of self-distillation), and each answer is checked by [`repeated`]:
//!
//! **An answer loops when some run of [`RUN_WORDS`] (8) consecutive words occurs at least
//! [`RUN_REPEATS`] (3) times in it** (overlapping occurrences count). Words are the answer's
//! runs of letters and digits, lowercased, so punctuation and case do not hide a repeat. A
//! phrase said over and over ("A lone ship, A lone ship, ...") or a sentence repeated is
//! flagged; a list whose items share a few words ("1. Use a ...", "2. Use a ...") is not.
//! Shorter runs flag normal writing: on the original model's own answers (up to 200 tokens,
//! data/heldout-chats.jsonl), 4-word runs said three times flag 22 of the 42 chat answers,
//! among them plain ones that name their topic thrice ("the Earth's oceans", "communicate
//! with each other") or list "X development: the creation of ..."; 8-word runs flag 10,
//! each a clause really said three times ("a skill that can be learned and practiced").

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use liger_model::Model;
use serde::Serialize;

use super::Loaded;
use crate::progress::Progress;
use crate::recover::data::{self, Entry};
use crate::recover::selfdistill::{generate, GenSettings};
use crate::{Error, Result};
use liger_model::chat::Message;

/// Words in a run that, repeated, makes an answer loop.
pub const RUN_WORDS: usize = 8;
/// Occurrences of one run that make an answer loop.
pub const RUN_REPEATS: usize = 3;
/// Looping answers of the model kept as examples.
const EXAMPLES: usize = 3;
/// Answers generated together.
const BATCH: usize = 8;

/// What `--loops` measures.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopsOptions {
    /// JSON Lines with `messages` (a last assistant turn is dropped) or `prompt`.
    pub prompts: PathBuf,
    /// Longest answer, in tokens.
    pub max_tokens: usize,
}

impl LoopsOptions {
    pub fn new(prompts: impl Into<PathBuf>) -> Self {
        Self {
            prompts: prompts.into(),
            max_tokens: 128,
        }
    }
}

/// What `--loops` found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoopsReport {
    pub prompts: usize,
    pub max_tokens: usize,
    /// Share of the prompts whose model answer loops.
    pub model: f64,
    pub model_looping: usize,
    pub reference: Option<f64>,
    pub reference_looping: Option<usize>,
    /// Up to three looping answers of the model.
    pub examples: Vec<LoopExample>,
}

/// A looping answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoopExample {
    /// The last user message.
    pub prompt: String,
    pub answer: String,
    /// The run of words that repeats.
    pub repeated: String,
}

/// The answer's words: runs of letters and digits, lowercased.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The first run of [`RUN_WORDS`] words that occurs [`RUN_REPEATS`] times in `text`
/// (overlapping occurrences count), joined by spaces; `None` when the text does not loop.
pub fn repeated(text: &str) -> Option<String> {
    let w = words(text);
    let mut seen: HashMap<&[String], usize> = HashMap::new();
    for run in w.windows(RUN_WORDS) {
        let n = seen.entry(run).or_default();
        *n += 1;
        if *n >= RUN_REPEATS {
            return Some(run.join(" "));
        }
    }
    None
}

/// The prompts of `path`: conversations without their last assistant turn.
fn read_prompts(path: &Path) -> Result<Vec<Vec<Message>>> {
    let shown = path.display();
    let mut out = Vec::new();
    for e in data::read_file(path)? {
        let mut msgs = match e {
            Entry::Prompt(m) | Entry::Conversation(m) => m,
            Entry::Text(_) => {
                return Err(Error::Data(format!(
                    "--loops {shown}: needs `messages` or `prompt` records, not `text`"
                )))
            }
        };
        if msgs.last().is_some_and(|m| m.role == "assistant") {
            msgs.pop();
        }
        if !msgs.iter().any(|m| m.role == "user") {
            return Err(Error::Data(format!(
                "--loops {shown}: a conversation has no user turn to answer"
            )));
        }
        out.push(msgs);
    }
    Ok(out)
}

pub(super) fn validate(o: &LoopsOptions) -> Result<()> {
    if o.max_tokens == 0 {
        return Err(Error::flag("--loops-max-tokens", "must be at least 1"));
    }
    Ok(())
}

/// The prompts, and how models answer them.
struct Answering<'a> {
    m: &'a Loaded,
    prompts: Vec<Vec<Message>>,
    max_tokens: usize,
    progress: &'a Progress,
}

impl Answering<'_> {
    /// Greedy answers of `model`: each prompt's last message with its answer.
    fn answers(&self, model: &Model, label: &str) -> Result<Vec<(String, String)>> {
        let bar = self.progress.items(self.prompts.len() as u64, label);
        let settings = GenSettings {
            // One answer per prompt: greedy (sampling starts only past the prompts).
            count: self.prompts.len(),
            max_tokens: self.max_tokens,
            batch: BATCH,
            seed: 0,
        };
        let convs = generate(
            model,
            &self.m.text,
            &self.prompts,
            settings,
            &bar,
            &mut |_| {},
        )?;
        bar.finish_and_clear();
        // Empty answers are left out by `generate`; they do not loop.
        Ok(convs
            .into_iter()
            .map(|mut c| {
                let answer = c.pop().map(|a| a.content).unwrap_or_default();
                let prompt = c.pop().map(|p| p.content).unwrap_or_default();
                (prompt, answer)
            })
            .collect())
    }
}

/// Answers every prompt with the model and the reference and counts the looping answers.
pub(super) fn run(o: &LoopsOptions, m: &Loaded, progress: &Progress) -> Result<LoopsReport> {
    let asked = Answering {
        m,
        prompts: read_prompts(&o.prompts)?,
        max_tokens: o.max_tokens,
        progress,
    };
    let n = asked.prompts.len();
    let mut examples = Vec::new();
    let mut model_looping = 0;
    for (prompt, answer) in asked.answers(&m.model, "loops")? {
        if let Some(run) = repeated(&answer) {
            model_looping += 1;
            if examples.len() < EXAMPLES {
                examples.push(LoopExample {
                    prompt,
                    answer,
                    repeated: run,
                });
            }
        }
    }
    let reference_looping = match &m.reference {
        Some(r) => Some(
            asked
                .answers(r, "loops (reference)")?
                .iter()
                .filter(|(_, a)| repeated(a).is_some())
                .count(),
        ),
        None => None,
    };
    let share = |k: usize| k as f64 / n.max(1) as f64;
    Ok(LoopsReport {
        prompts: n,
        max_tokens: o.max_tokens,
        model: share(model_looping),
        model_looping,
        reference: reference_looping.map(share),
        reference_looping,
        examples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_phrase_loops() {
        let ship = "A lone ship, A lone ship, A lone ship, A lone ship, A lone ship";
        assert_eq!(
            repeated(ship).as_deref(),
            Some("a lone ship a lone ship a lone")
        );
        assert_eq!(
            repeated(&ship[..ship.len() - 13]),
            None,
            "four times is not enough"
        );
        let sentence = "The sea is calm tonight. ".repeat(4);
        assert!(repeated(&sentence).is_some(), "{sentence}");
        let clause = "it's a skill that can be learned and practiced, and ";
        assert!(repeated(&format!("First aid: {}.", clause.repeat(3))).is_some());
        let word = "very ".repeat(10);
        assert_eq!(
            repeated(&word).as_deref(),
            Some("very very very very very very very very")
        );
    }

    #[test]
    fn lists_and_prose_do_not_loop() {
        let list = "Here are three tips for staying healthy:\n\
            1. Eat a balanced diet: fruits, vegetables and whole grains give you the \
            nutrients you need.\n\
            2. Exercise regularly: aim for at least 30 minutes of activity a day.\n\
            3. Get enough sleep: adults need seven to nine hours a night.\n\
            4. Drink enough water: it keeps you hydrated and helps your body work.";
        assert_eq!(repeated(list), None);
        let tips = "1. Use a strong password for each account.\n\
            2. Use a password manager to keep them.\n\
            3. Use a second factor when a site offers one.\n\
            4. Use a different email address for shopping.";
        assert_eq!(repeated(tips), None);
        let topic = "Tides come from the pull of the moon on the Earth's oceans. The Earth's \
            oceans bulge toward the moon, and the Earth's oceans bulge on the far side too.";
        assert_eq!(repeated(topic), None, "a topic named thrice is not a loop");
        let prose = "The capital of France is Paris. Paris is known for the Eiffel Tower, \
            and the city is also famous for its museums. It is the capital of France and \
            its largest city.";
        assert_eq!(repeated(prose), None, "a phrase said twice is not a loop");
        assert_eq!(repeated(""), None);
        assert_eq!(repeated("one two three"), None);
    }
}
