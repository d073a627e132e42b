//! From a validated request and its tokenized prompt to an engine [`GenerationRequest`]:
//! the checks that need the prompt's length (context limit, `max_tokens` default).

use std::sync::Arc;

use super::body::Params;
use super::params::{ChatRequest, Common, CompletionRequest, Limits};
use super::{AppState, Ready};
use crate::engine::GenerationRequest;
use crate::error::ApiError;
use crate::text::grammar::Guide;
use crate::text::{Codec, TextError};

/// A parsed request of either endpoint.
pub trait Parsed: Sized {
    fn parse(p: Params, limits: &Limits) -> Result<Self, ApiError>;
    fn common(&self) -> &Common;
}

impl Parsed for ChatRequest {
    fn parse(p: Params, limits: &Limits) -> Result<Self, ApiError> {
        ChatRequest::parse(p, limits)
    }
    fn common(&self) -> &Common {
        ChatRequest::common(self)
    }
}

impl Parsed for CompletionRequest {
    fn parse(p: Params, limits: &Limits) -> Result<Self, ApiError> {
        CompletionRequest::parse(p, limits)
    }
    fn common(&self) -> &Common {
        CompletionRequest::common(self)
    }
}

/// What both handlers start with: the loaded model (503 while loading), the validated
/// request (400 naming the parameter), the `model` field checked (404), a fresh id with
/// `prefix` and the request's tracing span.
pub fn begin<R: Parsed>(
    app: &AppState,
    params: Params,
    prefix: &str,
    endpoint: &'static str,
) -> Result<(Ready, R, String, tracing::Span), ApiError> {
    let ready = app.ready()?;
    let req = R::parse(params, &ready.limits)?;
    check_model(app, req.common().model())?;
    let id = new_id(prefix);
    let span = tracing::info_span!("request", id = %id, endpoint);
    Ok((ready, req, id, span))
}

/// The `model` field, when sent, must name the served model.
pub fn check_model(app: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != app.config.served_model_name => Err(ApiError::ModelNotFound(m.to_string())),
        _ => Ok(()),
    }
}

/// Runs tokenizer work (chat template, encoding) off the async threads: a 4 MiB prompt
/// takes long enough to stall other connections.
pub async fn tokenize<F>(
    codec: &Arc<Codec>,
    param: &'static str,
    f: F,
) -> Result<Vec<u32>, ApiError>
where
    F: FnOnce(&Codec) -> Result<Vec<u32>, TextError> + Send + 'static,
{
    let codec = codec.clone();
    tokio::task::spawn_blocking(move || f(&codec))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| match e {
            TextError::Template(m) => ApiError::param(
                param,
                format!("the chat template rejected the conversation: {m}"),
            ),
            other => ApiError::param(param, other.to_string()),
        })
}

/// Compiles the request's output constraint against the model's vocabulary, off the async
/// threads (a large schema takes milliseconds). A constraint that cannot be compiled is the
/// client's error, named after the field it came in.
pub async fn compile_grammar(ready: &Ready, common: &Common) -> Result<Option<Guide>, ApiError> {
    let Some(constraint) = common.grammar().cloned() else {
        return Ok(None);
    };
    let grammars = ready.grammars.clone();
    tokio::task::spawn_blocking(move || grammars.compile(&constraint.spec))
        .await
        .map_err(|e| ApiError::Internal(format!("grammar task failed: {e}")))?
        .map(Some)
        .map_err(|m| ApiError::param(constraint.param, m))
}

/// Checks the prompt against the model and settles `max_tokens`.
pub fn check_prompt(
    prompt: &[u32],
    common: &Common,
    limits: &Limits,
    param: &str,
    default_max_tokens: Option<usize>,
) -> Result<usize, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::param(
            param,
            "the prompt is empty after tokenization",
        ));
    }
    // The tokenizer may know more ids than the model has embedding rows.
    for &id in prompt {
        limits.check_token(param, id.into())?;
    }
    let len = prompt.len();
    if len >= limits.max_model_len {
        return Err(ApiError::param(
            param,
            format!(
                "the prompt is {len} tokens; this model's maximum context is {} tokens (prompt plus completion)",
                limits.max_model_len
            ),
        ));
    }
    let room = limits.max_model_len - len;
    match common.max_tokens() {
        Some(m) if m > room => Err(ApiError::param(
            common.max_tokens_param(),
            format!(
                "this model's maximum context is {} tokens, but {len} are in the prompt and {m} were requested for the completion",
                limits.max_model_len
            ),
        )),
        Some(m) => Ok(m),
        None => Ok(default_max_tokens.map_or(room, |d| d.min(room))),
    }
}

pub fn generation_request(
    id: &str,
    prompt: Vec<u32>,
    common: &Common,
    max_tokens: usize,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
) -> GenerationRequest {
    GenerationRequest {
        id: id.to_string(),
        prompt,
        n: common.n(),
        sampling: common.sampling().clone(),
        max_tokens,
        min_tokens: common.min_tokens().min(max_tokens),
        stop: common.stop().to_vec(),
        ignore_eos: common.ignore_eos(),
        logprobs,
        prompt_logprobs,
        guide: None,
    }
}

/// `chatcmpl-…` / `cmpl-…` ids, random like OpenAI's.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
