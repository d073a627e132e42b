//! `POST /v1/chat/completions`: render the conversation with the model's chat template,
//! generate, and answer as one `chat.completion` or a stream of `chat.completion.chunk`s
//! (a role delta first, then content deltas, then one chunk per choice with its
//! `finish_reason`, then the usage chunk when `stream_options.include_usage` is set).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::Instrument;

use super::body::Params;
use super::output::{chat_logprob, collect, ChatLogprobs, Completeness, TokenNames, Usage};
use super::params::ChatRequest;
use super::prepare::{
    check_model, check_prompt, compile_grammar, generation_request, new_id, tokenize, unix_now,
};
use super::stream::{sse_response, Chunker};
use super::AppState;
use crate::engine::Event;
use crate::error::ApiError;
use crate::text::Codec;

#[derive(Serialize)]
struct ChatCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<ChatChoice>,
    usage: Usage,
}

#[derive(Serialize)]
struct ChatChoice {
    index: usize,
    message: AssistantMessage,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: String,
}

pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    params: Params,
) -> Result<Response, ApiError> {
    let ready = app.ready()?;
    let req = ChatRequest::parse(params, &ready.limits)?;
    check_model(&app, req.common.model.as_deref())?;
    let id = new_id("chatcmpl");
    let span = tracing::info_span!("request", id = %id, endpoint = "chat");
    async move {
        let messages = req.messages.clone();
        let prompt = tokenize(&ready.codec, "messages", move |c| c.encode_chat(&messages)).await?;
        let max_tokens = check_prompt(&prompt, &req.common, &ready.limits, "messages", None)?;
        let prompt_len = prompt.len();
        tracing::debug!(
            prompt_tokens = prompt_len,
            max_tokens,
            n = req.common.n,
            stream = req.common.stream,
            "chat request"
        );
        let mut gen = generation_request(&id, prompt, &req.common, max_tokens, req.logprobs, None);
        gen.guide = compile_grammar(&ready, &req.common).await?;
        let rx = ready.engine.submit(gen)?;
        let created = unix_now();
        let model = app.config.served_model_name.clone();
        if req.common.stream {
            let chunker = ChatChunker {
                id,
                created,
                model,
                n: req.common.n,
                include_usage: req.common.include_usage,
                codec: ready.codec.clone(),
                tokens_as_ids: req.common.tokens_as_ids,
                prompt_tokens: prompt_len,
                completion_tokens: 0,
                cached_tokens: 0,
                done: Completeness::new(req.common.n),
            };
            return Ok(sse_response(vec![rx], chunker));
        }
        let out = collect(rx, req.common.n).await?;
        let names = TokenNames {
            codec: &ready.codec,
            as_ids: req.common.tokens_as_ids,
        };
        let usage = Usage::new(prompt_len, out.completion_tokens(), out.cached_tokens);
        let choices = out
            .choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChatChoice {
                index,
                logprobs: req.logprobs.map(|_| ChatLogprobs {
                    content: c
                        .logprobs
                        .iter()
                        .map(|lp| chat_logprob(names, lp))
                        .collect(),
                }),
                message: AssistantMessage {
                    role: "assistant",
                    content: c.text,
                },
                finish_reason: c.finish.map(|f| f.as_str()),
            })
            .collect();
        let body = ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices,
            usage,
        };
        Ok(Json(body).into_response())
    }
    .instrument(span)
    .await
}

struct ChatChunker {
    id: String,
    created: u64,
    model: String,
    n: usize,
    include_usage: bool,
    codec: Arc<Codec>,
    tokens_as_ids: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    done: Completeness,
}

impl ChatChunker {
    fn chunk(&self, choices: Value) -> Value {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        });
        if self.include_usage {
            // OpenAI sends `usage: null` on every chunk but the last when usage is asked for.
            c["usage"] = Value::Null;
        }
        c
    }

    fn choice(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        self.chunk(json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]))
    }
}

impl Chunker for ChatChunker {
    fn start(&mut self) -> Vec<Value> {
        (0..self.n)
            .map(|i| {
                self.choice(
                    i,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                )
            })
            .collect()
    }

    fn event(&mut self, _prompt: usize, event: Event) -> Vec<Value> {
        match event {
            Event::Cached(n) => {
                self.cached_tokens += n;
                Vec::new()
            }
            Event::Prompt(_) => Vec::new(),
            Event::Token {
                choice,
                text,
                logprob,
                ..
            } => {
                self.completion_tokens += 1;
                if text.is_empty() && logprob.is_none() {
                    return Vec::new();
                }
                let names = TokenNames {
                    codec: &self.codec,
                    as_ids: self.tokens_as_ids,
                };
                let lp = logprob.map_or(
                    Value::Null,
                    |lp| json!({"content": [chat_logprob(names, &lp)]}),
                );
                vec![self.choice(choice, json!({"content": text}), lp, None)]
            }
            Event::Finished {
                choice,
                reason,
                text,
            } => {
                self.done.finished += 1;
                let mut out = Vec::new();
                if !text.is_empty() {
                    out.push(self.choice(choice, json!({"content": text}), Value::Null, None));
                }
                out.push(self.choice(choice, json!({}), Value::Null, Some(reason.as_str())));
                out
            }
            Event::Failed(e) => {
                self.done.failed = true;
                vec![ApiError::from(e).body()]
            }
        }
    }

    fn end(&mut self) -> Vec<Value> {
        let mut out: Vec<Value> = self.done.error_at_end().into_iter().collect();
        if self.include_usage {
            let mut c = self.chunk(json!([]));
            c["usage"] = json!(Usage::new(
                self.prompt_tokens,
                self.completion_tokens,
                self.cached_tokens,
            ));
            out.push(c);
        }
        out
    }
}
