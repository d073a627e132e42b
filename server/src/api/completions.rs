//! `POST /v1/completions`: one or more prompts (text or token ids), each with its own `n`
//! choices (index = prompt_index * n + i). `echo` prepends the prompt, and with `logprobs`
//! reports the prompt tokens' logprobs too (the first is null), in the legacy format that
//! lm-eval-harness's `local-completions` reads; `max_tokens: 0` with `echo` scores only.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::Instrument;

use super::body::Params;
use super::output::{collect, Completeness, CompletionLogprobs, TokenNames, Usage};
use super::params::{CompletionRequest, Prompt};
use super::prepare::{
    begin, check_prompt, compile_grammar, generation_request, tokenize, unix_now,
};
use super::stream::{sse_response, Chunker, Envelope};
use super::AppState;
use crate::engine::{Event, EventReceiver};
use crate::error::ApiError;
use crate::text::Codec;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Serialize)]
struct Completion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<CompletionChoice>,
    usage: Usage,
}

#[derive(Serialize)]
struct CompletionChoice {
    index: usize,
    text: String,
    logprobs: Option<CompletionLogprobs>,
    finish_reason: Option<&'static str>,
}

/// A tokenized prompt and the text echo shows for it.
struct Prepared {
    tokens: Vec<u32>,
    text: String,
}

pub async fn completions(
    State(app): State<Arc<AppState>>,
    params: Params,
) -> Result<Response, ApiError> {
    let (ready, req, id, span) = begin::<CompletionRequest>(&app, params, "cmpl", "completions")?;
    async move {
        let common = req.common();
        let n = common.n().get();
        let mut prepared = Vec::with_capacity(req.prompts().len());
        let mut receivers: Vec<EventReceiver> = Vec::with_capacity(req.prompts().len());
        let prompt_logprobs = req.logprobs().filter(|_| req.echo());
        let guide = compile_grammar(&ready, common).await?;
        for prompt in req.prompts() {
            let (tokens, text) = match prompt {
                Prompt::Text(t) => {
                    let owned = t.clone();
                    (
                        tokenize(&ready.codec, "prompt", move |c| c.encode(&owned, true)).await?,
                        t.clone(),
                    )
                }
                Prompt::Tokens(ids) => (ids.clone(), ready.codec.decode_ids(ids, false)),
            };
            let max_tokens = check_prompt(
                &tokens,
                common,
                &ready.limits,
                "prompt",
                Some(DEFAULT_MAX_TOKENS),
            )?;
            let mut gen = generation_request(
                &id,
                tokens.clone(),
                common,
                max_tokens,
                req.logprobs(),
                prompt_logprobs,
            );
            gen.guide = guide.clone();
            // On failure the receivers so far are dropped, which cancels those prompts.
            receivers.push(ready.engine.submit(gen)?);
            prepared.push(Prepared { tokens, text });
        }
        let prompt_tokens: usize = prepared.iter().map(|p| p.tokens.len()).sum();
        tracing::debug!(
            prompts = prepared.len(),
            prompt_tokens,
            n,
            stream = common.stream(),
            "completions request"
        );
        let created = unix_now();
        let model = app.config.served_model_name.clone();
        let names = TokenNames {
            codec: &ready.codec,
            as_ids: common.tokens_as_ids(),
        };
        if common.stream() {
            let offsets = prepared
                .iter()
                .flat_map(|p| {
                    let start = if req.echo() {
                        0
                    } else {
                        p.text.chars().count()
                    };
                    std::iter::repeat_n(start, n)
                })
                .collect();
            let chunker = CompletionChunker {
                head: Envelope {
                    id,
                    object: "text_completion",
                    created,
                    model,
                    include_usage: common.include_usage(),
                    prompt_tokens,
                    completion_tokens: 0,
                    cached_tokens: 0,
                    done: Completeness::new(n * req.prompts().len()),
                },
                n,
                echo: req.echo(),
                logprobs: req.logprobs().is_some(),
                codec: ready.codec.clone(),
                tokens_as_ids: common.tokens_as_ids(),
                prompts: prepared,
                offsets,
            };
            return Ok(sse_response(receivers, chunker));
        }
        let mut choices = Vec::new();
        let (mut completion_tokens, mut cached_tokens) = (0, 0);
        for (p, (rx, prep)) in receivers.into_iter().zip(&prepared).enumerate() {
            let out = collect(rx, n).await?;
            completion_tokens += out.completion_tokens();
            cached_tokens += out.cached_tokens;
            for (i, c) in out.choices.iter().enumerate() {
                let mut offset = if req.echo() {
                    0
                } else {
                    prep.text.chars().count()
                };
                let logprobs = req.logprobs().map(|_| {
                    let mut lps = if req.echo() {
                        CompletionLogprobs::prompt(
                            names,
                            &prep.tokens,
                            &out.prompt_logprobs,
                            &mut offset,
                        )
                    } else {
                        CompletionLogprobs::default()
                    };
                    for (t, lp) in c.tokens.iter().zip(&c.logprobs) {
                        lps.push(names, *t, Some(lp), &mut offset);
                    }
                    lps
                });
                let text = if req.echo() {
                    format!("{}{}", prep.text, c.text)
                } else {
                    c.text.clone()
                };
                choices.push(CompletionChoice {
                    index: p * n + i,
                    text,
                    logprobs,
                    finish_reason: c.finish.map(|f| f.as_str()),
                });
            }
        }
        let body = Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices,
            usage: Usage::new(prompt_tokens, completion_tokens, cached_tokens),
        };
        Ok(Json(body).into_response())
    }
    .instrument(span)
    .await
}

struct CompletionChunker {
    head: Envelope,
    n: usize,
    echo: bool,
    logprobs: bool,
    codec: Arc<Codec>,
    tokens_as_ids: bool,
    prompts: Vec<Prepared>,
    /// Per choice: the next token's `text_offset`.
    offsets: Vec<usize>,
}

impl CompletionChunker {
    fn names(&self) -> TokenNames<'_> {
        TokenNames {
            codec: &self.codec,
            as_ids: self.tokens_as_ids,
        }
    }

    fn chunk(
        &self,
        index: usize,
        text: &str,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&str>,
    ) -> Value {
        self.head.chunk(
            json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]),
        )
    }

    /// The echoed prompt, once per choice of prompt `p`.
    fn echo_chunks(&self, p: usize, lps: &[crate::engine::TokenLogprob]) -> Vec<Value> {
        let prep = &self.prompts[p];
        (0..self.n)
            .map(|i| {
                let logprobs = self.logprobs.then(|| {
                    let mut offset = 0;
                    CompletionLogprobs::prompt(self.names(), &prep.tokens, lps, &mut offset)
                });
                self.chunk(p * self.n + i, &prep.text, logprobs, None)
            })
            .collect()
    }
}

impl Chunker for CompletionChunker {
    fn start(&mut self) -> Vec<Value> {
        if !self.echo || self.logprobs {
            // With logprobs the echo waits for the prompt's logprobs (Event::Prompt).
            return Vec::new();
        }
        (0..self.prompts.len())
            .flat_map(|p| self.echo_chunks(p, &[]))
            .collect()
    }

    fn event(&mut self, p: usize, event: Event) -> Vec<Value> {
        if let Some(error) = self.head.count(&event) {
            return vec![error];
        }
        match event {
            Event::Cached(_) | Event::Failed(_) => Vec::new(),
            Event::Prompt(lps) => {
                if self.echo {
                    let names = self.names();
                    let end: usize = self.prompts[p].tokens.iter().map(|&t| names.chars(t)).sum();
                    self.offsets[p * self.n..(p + 1) * self.n].fill(end);
                    self.echo_chunks(p, &lps)
                } else {
                    Vec::new()
                }
            }
            Event::Token {
                choice,
                token,
                text,
                logprob,
            } => {
                let index = p * self.n + choice;
                let names = TokenNames {
                    codec: &self.codec,
                    as_ids: self.tokens_as_ids,
                };
                let offset = &mut self.offsets[index];
                let logprobs = logprob.map(|lp| {
                    let mut l = CompletionLogprobs::default();
                    l.push(names, token, Some(&lp), offset);
                    l
                });
                if text.is_empty() && logprobs.is_none() {
                    return Vec::new();
                }
                vec![self.chunk(index, &text, logprobs, None)]
            }
            Event::Finished {
                choice,
                reason,
                text,
            } => vec![self.chunk(p * self.n + choice, &text, None, Some(reason.as_str()))],
        }
    }

    fn end(&mut self) -> Vec<Value> {
        self.head.end()
    }
}
