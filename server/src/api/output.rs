//! Response pieces both endpoints share: usage, the two logprobs formats (chat's
//! `content[]` and the legacy completions arrays that lm-eval-harness reads), and collecting
//! an engine's events into finished choices for non-streaming responses.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::{Event, EventReceiver, FinishReason, TokenLogprob};
use crate::error::ApiError;
use crate::text::Codec;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// As OpenAI reports it: prompt tokens served from the cache (here: the conversation state
/// cache) instead of being read again.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// JSON cannot hold -inf; OpenAI reports impossible tokens as -9999.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

/// Names tokens the way logprobs show them.
#[derive(Clone, Copy)]
pub struct TokenNames<'a> {
    pub codec: &'a Codec,
    /// vLLM's `return_tokens_as_token_ids`.
    pub as_ids: bool,
}

impl TokenNames<'_> {
    pub fn name(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            self.codec.token_text(id)
        }
    }

    /// Length of the token's text in characters (for `text_offset`).
    pub fn chars(&self, id: u32) -> usize {
        self.codec.token_text(id).chars().count()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

pub fn chat_logprob(names: TokenNames<'_>, lp: &TokenLogprob) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: names.name(lp.token),
        logprob: finite(lp.logprob),
        bytes: names.codec.token_bytes(lp.token),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(id, l)| ChatTopLogprob {
                token: names.name(id),
                logprob: finite(l),
                bytes: names.codec.token_bytes(id),
            })
            .collect(),
    }
}

/// The legacy completions format: parallel arrays, `None` for the first prompt token.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends one token at character offset `*offset`, advancing it.
    pub fn push(
        &mut self,
        names: TokenNames<'_>,
        token: u32,
        lp: Option<&TokenLogprob>,
        offset: &mut usize,
    ) {
        self.tokens.push(names.name(token));
        self.token_logprobs.push(lp.map(|l| finite(l.logprob)));
        self.top_logprobs.push(lp.map(|l| {
            let mut m = BTreeMap::new();
            for &(id, v) in &l.top {
                // Two tokens can share a text; the more likely (listed first) keeps it.
                m.entry(names.name(id)).or_insert(finite(v));
            }
            m
        }));
        self.text_offset.push(*offset);
        *offset += names.chars(token);
    }

    /// The prompt's tokens: the first has no logprob, token i uses `lps[i - 1]`.
    pub fn prompt(
        names: TokenNames<'_>,
        prompt: &[u32],
        lps: &[TokenLogprob],
        offset: &mut usize,
    ) -> Self {
        let mut out = Self::default();
        for (i, &t) in prompt.iter().enumerate() {
            let lp = i.checked_sub(1).and_then(|j| lps.get(j));
            out.push(names, t, lp, offset);
        }
        out
    }
}

/// One finished choice of a non-streaming response.
#[derive(Debug, Clone, Default)]
pub struct ChoiceOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
}

/// Everything a request produced.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    /// Prompt tokens resumed from the state cache.
    pub cached_tokens: usize,
    pub prompt_logprobs: Vec<TokenLogprob>,
    pub choices: Vec<ChoiceOutput>,
}

impl Collected {
    pub fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens.len()).sum()
    }
}

/// Waits for every choice to finish.
pub async fn collect(mut rx: EventReceiver, n: usize) -> Result<Collected, ApiError> {
    let mut out = Collected {
        cached_tokens: 0,
        prompt_logprobs: Vec::new(),
        choices: vec![ChoiceOutput::default(); n],
    };
    while let Some(event) = rx.recv().await {
        match event {
            Event::Cached(n) => out.cached_tokens += n,
            Event::Prompt(lps) => out.prompt_logprobs = lps,
            Event::Token {
                choice,
                token,
                text,
                logprob,
            } => {
                if let Some(c) = out.choices.get_mut(choice) {
                    c.text.push_str(&text);
                    c.tokens.push(token);
                    c.logprobs.extend(logprob);
                }
            }
            Event::Finished {
                choice,
                reason,
                text,
            } => {
                if let Some(c) = out.choices.get_mut(choice) {
                    c.text.push_str(&text);
                    c.finish = Some(reason);
                }
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    if out.choices.iter().any(|c| c.finish.is_none()) {
        return Err(ApiError::Internal(
            "the engine stopped before the request finished".into(),
        ));
    }
    Ok(out)
}

/// Tracks whether a stream delivered every choice's end, so one cut short by a dead engine
/// ends with an error chunk rather than silently.
#[derive(Debug, Default)]
pub struct Completeness {
    pub expected: usize,
    pub finished: usize,
    pub failed: bool,
}

impl Completeness {
    pub fn new(expected: usize) -> Self {
        Self {
            expected,
            ..Default::default()
        }
    }

    /// The error chunk to send at the end, if the stream was cut short.
    pub fn error_at_end(&self) -> Option<serde_json::Value> {
        (!self.failed && self.finished < self.expected).then(|| {
            ApiError::Internal("the engine stopped before the request finished".into()).body()
        })
    }
}
