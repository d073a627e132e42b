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
    begin, check_prompt, compile_grammar, generation_request, tokenize, unix_now,
};
use super::stream::{sse_response, Chunker, Envelope};
use super::tools::{finish_reason, plain_messages, split_output, CallSplitter, Tools};
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
    /// `null` when the answer is tool calls alone (as OpenAI answers).
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Value>,
}

pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    params: Params,
) -> Result<Response, ApiError> {
    let (ready, req, id, span) = begin::<ChatRequest>(&app, params, "chatcmpl", "chat")?;
    async move {
        let common = req.common();
        let n = common.n().get();
        let messages = req.messages().to_vec();
        let tools = req.tools().cloned();
        let prompt = tokenize(&ready.codec, "messages", move |c| {
            if c.template().supports_tools() {
                let listed = tools.as_ref().map(Tools::as_template_value);
                c.encode_chat_with_tools(&messages, listed.as_ref())
            } else {
                c.encode_chat(&plain_messages(&messages, tools.as_ref()))
            }
        })
        .await?;
        let max_tokens = check_prompt(&prompt, common, &ready.limits, "messages", None)?;
        let prompt_len = prompt.len();
        tracing::debug!(
            prompt_tokens = prompt_len,
            max_tokens,
            n,
            stream = common.stream(),
            "chat request"
        );
        let mut gen = generation_request(&id, prompt, common, max_tokens, req.logprobs(), None);
        gen.guide = compile_grammar(&ready, common).await?;
        let rx = ready.engine.submit(gen)?;
        let created = unix_now();
        let model = app.config.served_model_name.clone();
        if common.stream() {
            let chunker = ChatChunker {
                head: Envelope {
                    id,
                    object: "chat.completion.chunk",
                    created,
                    model,
                    include_usage: common.include_usage(),
                    prompt_tokens: prompt_len,
                    completion_tokens: 0,
                    cached_tokens: 0,
                    done: Completeness::new(n),
                },
                n,
                codec: ready.codec.clone(),
                tokens_as_ids: common.tokens_as_ids(),
                splitters: req.tools().cloned().map(|t| {
                    let per_choice = (0..n).map(|_| (CallSplitter::default(), 0)).collect();
                    (t, per_choice)
                }),
            };
            return Ok(sse_response(vec![rx], chunker));
        }
        let out = collect(rx, n).await?;
        let names = TokenNames {
            codec: &ready.codec,
            as_ids: common.tokens_as_ids(),
        };
        let usage = Usage::new(prompt_len, out.completion_tokens(), out.cached_tokens);
        let choices = out
            .choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let logprobs = req.logprobs().map(|_| ChatLogprobs {
                    content: c
                        .logprobs
                        .iter()
                        .map(|lp| chat_logprob(names, lp))
                        .collect(),
                });
                let (content, calls) = match req.tools() {
                    Some(tools) => split_output(&c.text, tools),
                    None => (Some(c.text), Vec::new()),
                };
                ChatChoice {
                    index,
                    logprobs,
                    message: AssistantMessage {
                        role: "assistant",
                        content,
                        tool_calls: calls.iter().map(|c| c.to_json(None)).collect(),
                    },
                    finish_reason: c.finish.map(|f| finish_reason(f, !calls.is_empty())),
                }
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
    head: Envelope,
    n: usize,
    codec: Arc<Codec>,
    tokens_as_ids: bool,
    /// With tools: per choice, the splitter that finds calls in the text and how many
    /// calls it has sent (the next call's `index`).
    splitters: Option<(Tools, Vec<(CallSplitter, usize)>)>,
}

impl ChatChunker {
    /// The deltas `text` releases for `choice`: content, then any calls it completes.
    fn deltas(&mut self, choice: usize, text: &str, end: bool) -> Vec<Value> {
        let Some((tools, per_choice)) = &mut self.splitters else {
            return if text.is_empty() {
                Vec::new()
            } else {
                vec![json!({"content": text})]
            };
        };
        let (splitter, sent) = &mut per_choice[choice];
        let mut split = splitter.push(text, tools);
        if end {
            split.content.push_str(&splitter.finish());
        }
        let mut out = Vec::new();
        if !split.content.is_empty() {
            out.push(json!({"content": split.content}));
        }
        for call in split.calls {
            out.push(json!({"tool_calls": [call.to_json(Some(*sent))]}));
            *sent += 1;
        }
        out
    }

    fn made_calls(&self, choice: usize) -> bool {
        self.splitters
            .as_ref()
            .is_some_and(|(_, per_choice)| per_choice[choice].1 > 0)
    }

    fn choice(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        self.head.chunk(
            json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]),
        )
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
        if let Some(error) = self.head.count(&event) {
            return vec![error];
        }
        match event {
            Event::Cached(_) | Event::Prompt(_) | Event::Failed(_) => Vec::new(),
            Event::Token {
                choice,
                text,
                logprob,
                ..
            } => {
                if text.is_empty() && logprob.is_none() {
                    return Vec::new();
                }
                let names = TokenNames {
                    codec: &self.codec,
                    as_ids: self.tokens_as_ids,
                };
                let mut lp = logprob.map_or(
                    Value::Null,
                    |lp| json!({"content": [chat_logprob(names, &lp)]}),
                );
                let mut deltas = self.deltas(choice, &text, false);
                if deltas.is_empty() && !lp.is_null() {
                    // Text held back (a possible tool call): the logprob still goes out.
                    deltas.push(json!({"content": ""}));
                }
                deltas
                    .into_iter()
                    .map(|d| self.choice(choice, d, std::mem::take(&mut lp), None))
                    .collect()
            }
            Event::Finished {
                choice,
                reason,
                text,
            } => {
                let deltas = self.deltas(choice, &text, true);
                let mut out: Vec<Value> = deltas
                    .into_iter()
                    .map(|d| self.choice(choice, d, Value::Null, None))
                    .collect();
                let reason = finish_reason(reason, self.made_calls(choice));
                out.push(self.choice(choice, json!({}), Value::Null, Some(reason)));
                out
            }
        }
    }

    fn end(&mut self) -> Vec<Value> {
        self.head.end()
    }
}
