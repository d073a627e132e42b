//! The engine boundary: what the HTTP layer submits and the events it gets back.
//!
//! Handlers only see the [`Engine`] trait, so they can be tested against a mock engine and
//! the real one ([`LocalEngine`]) can own the model on its own OS thread. Requests
//! arrive already tokenized and validated; events carry token ids *and* the text they
//! release (the engine detokenizes because stop strings decide when generation ends).

mod local;
mod options;
mod params;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod speculate;
mod worker;

use tokio::sync::mpsc;

use crate::text::grammar::Guide;

pub use local::LocalEngine;
pub use options::{EngineOptions, StateCacheOptions};
pub use params::{ChoiceCount, OutOfRange, SamplingParams};
pub use speculate::SpeculativeOptions;

/// One prompt to continue `n` times.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// For logs and spans.
    pub id: String,
    /// Never empty (checked at submission). The HTTP layer keeps every id below the
    /// vocabulary size; the model fails the step of a request that bypasses it.
    pub prompt: Vec<u32>,
    /// Continuations of the one prompt; the prompt is processed once and its state forked.
    pub n: ChoiceCount,
    pub sampling: SamplingParams,
    /// 0 is allowed (score the prompt only).
    pub max_tokens: usize,
    /// End-of-sequence and stop strings are ignored before this many tokens.
    pub min_tokens: usize,
    /// Generation ends before any of these; they never appear in the text.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report each generated token's logprob with this many alternatives.
    pub logprobs: Option<usize>,
    /// Report each prompt token's logprob with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// Structured output: every choice's tokens must follow this grammar (each choice gets
    /// its own copy); a choice whose grammar ends finishes with `stop`.
    pub guide: Option<Guide>,
}

/// A token's log-probability under the model, with the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine reports about one request, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// Once, first, when the request resumed from the conversation state cache: this many
    /// prompt tokens were not recomputed (`usage.prompt_tokens_details.cached_tokens`).
    Cached(usize),
    /// Once, after the prompt is processed, when prompt logprobs were asked for: one entry
    /// per prompt token from the second on (the first has no context to be predicted from).
    Prompt(Vec<TokenLogprob>),
    /// A generated token and the text it completes (possibly empty: an unfinished UTF-8
    /// character or the possible start of a stop string is held back).
    Token {
        choice: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// A choice is done; `text` is whatever was still held back and belongs to the output.
    Finished {
        choice: usize,
        reason: FinishReason,
        text: String,
    },
    /// The request failed; no more events follow.
    Failed(EngineError),
}

pub type EventReceiver = mpsc::UnboundedReceiver<Event>;
pub type EventSender = mpsc::UnboundedSender<Event>;

/// Failures the engine reports, at submission or later as [`Event::Failed`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The waiting queue is full.
    #[error("the server is overloaded ({0} requests waiting); retry later")]
    Overloaded(usize),
    /// The engine thread is gone.
    #[error("the inference engine has stopped")]
    Stopped,
    /// The request cannot be served as asked.
    #[error("{0}")]
    Invalid(String),
    /// The model failed on a step this request was part of.
    #[error("model error: {0}")]
    Model(String),
    /// The server is stopping and its drain grace period is over.
    #[error("the server is shutting down; retry on another replica or later")]
    ShuttingDown,
}

/// Runs generation requests. Implementations must be cheap to call from async handlers.
pub trait Engine: Send + Sync {
    /// Queues a request. Dropping the receiver cancels it (its slot is freed at the next step).
    fn submit(&self, request: GenerationRequest) -> Result<EventReceiver, EngineError>;

    /// Ends serving: every queued and running request fails with
    /// [`EngineError::ShuttingDown`] (streams get it as their last event), and so does every
    /// later submission. Called when a shutdown's drain grace period is over.
    fn shut_down(&self) {}
}
