//! Parse, don't validate: request JSON becomes a [`ChatRequest`] or [`CompletionRequest`]
//! whose every field is in range, or a 400 that names the offending parameter. Their fields
//! are private and `parse` is their only constructor, so nothing downstream re-checks a
//! value; the ranges the engine relies on are its own checked types ([`SamplingParams`],
//! [`ChoiceCount`]), whose refusals are worded here as 400s.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::body::{json_kind, Params};
use super::format::{parse_grammar, Constraint};
use super::inputs::{parse_messages, parse_prompts};
pub use super::inputs::{Limits, Prompt};
use super::tools::{parse_tools, Tools};
use crate::engine::{ChoiceCount, OutOfRange, SamplingParams};
use crate::error::ApiError;
use crate::text::ChatMessage;

/// Logprob alternatives OpenAI allows per token.
pub const MAX_TOP_LOGPROBS: usize = 20;
const MAX_STOPS: usize = 16;

/// Parameters both endpoints share.
#[derive(Debug, Clone)]
pub struct Common {
    model: Option<String>,
    n: ChoiceCount,
    stream: bool,
    include_usage: bool,
    sampling: SamplingParams,
    stop: Vec<String>,
    max_tokens: Option<usize>,
    max_tokens_param: &'static str,
    min_tokens: usize,
    ignore_eos: bool,
    tokens_as_ids: bool,
    grammar: Option<Constraint>,
}

impl Common {
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Checked against [`Limits::max_n`].
    pub fn n(&self) -> ChoiceCount {
        self.n
    }

    pub fn stream(&self) -> bool {
        self.stream
    }

    pub fn include_usage(&self) -> bool {
        self.include_usage
    }

    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// At most `MAX_STOPS`, none empty.
    pub fn stop(&self) -> &[String] {
        &self.stop
    }

    /// As requested; the default depends on the endpoint and the prompt length.
    pub fn max_tokens(&self) -> Option<usize> {
        self.max_tokens
    }

    /// Which name the client used for `max_tokens`, for error messages.
    pub fn max_tokens_param(&self) -> &'static str {
        self.max_tokens_param
    }

    /// Never above `max_tokens` when that was sent.
    pub fn min_tokens(&self) -> usize {
        self.min_tokens
    }

    pub fn ignore_eos(&self) -> bool {
        self.ignore_eos
    }

    /// vLLM's option: logprob tokens as `token_id:<id>`, exact where text would be lossy.
    pub fn tokens_as_ids(&self) -> bool {
        self.tokens_as_ids
    }

    /// Structured output: what the generated text must match (compiled by the handler).
    pub fn grammar(&self) -> Option<&Constraint> {
        self.grammar.as_ref()
    }
}

/// A validated `/v1/chat/completions` request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    common: Common,
    messages: Vec<ChatMessage>,
    tools: Option<Tools>,
    logprobs: Option<usize>,
}

/// A validated `/v1/completions` request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    common: Common,
    prompts: Vec<Prompt>,
    echo: bool,
    logprobs: Option<usize>,
}

impl ChatRequest {
    pub fn parse(mut p: Params, limits: &Limits) -> Result<Self, ApiError> {
        // The deprecated function-calling fields: `tools` replaced them.
        reject_unsupported(&mut p, &["functions", "function_call"])?;
        let messages = parse_messages(&mut p)?;
        let tools = parse_tools(&mut p)?;
        let logprobs = p.take::<bool>("logprobs")?.unwrap_or(false);
        let top = p.take::<u64>("top_logprobs")?;
        let logprobs = match (logprobs, top) {
            (false, Some(_)) => {
                return Err(ApiError::param(
                    "top_logprobs",
                    "`top_logprobs` requires `logprobs: true`",
                ))
            }
            (false, None) => None,
            (true, top) => Some(check_top("top_logprobs", top.unwrap_or(0))?),
        };
        let mut common = parse_common(&mut p, limits, &["max_completion_tokens", "max_tokens"])?;
        if let Some(spec) = tools.as_ref().and_then(Tools::grammar) {
            if let Some(other) = &common.grammar {
                return Err(ApiError::param(
                    other.param,
                    "cannot be combined with a required or named tool_choice",
                ));
            }
            common.grammar = Some(Constraint {
                param: "tool_choice",
                spec,
            });
        }
        if common.max_tokens == Some(0) {
            return Err(ApiError::param(
                common.max_tokens_param,
                "must be at least 1",
            ));
        }
        Ok(Self {
            common,
            messages,
            tools,
            logprobs,
        })
    }

    pub fn common(&self) -> &Common {
        &self.common
    }

    /// Never empty.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Tools the model may call (absent with none, or `tool_choice: "none"`).
    pub fn tools(&self) -> Option<&Tools> {
        self.tools.as_ref()
    }

    /// `Some(k)`: report logprobs with `k` (at most [`MAX_TOP_LOGPROBS`]) alternatives.
    pub fn logprobs(&self) -> Option<usize> {
        self.logprobs
    }
}

impl CompletionRequest {
    pub fn parse(mut p: Params, limits: &Limits) -> Result<Self, ApiError> {
        reject_unsupported(&mut p, &["suffix"])?;
        let prompts = parse_prompts(&mut p, limits)?;
        let echo = p.take::<bool>("echo")?.unwrap_or(false);
        let logprobs = p
            .take::<u64>("logprobs")?
            .map(|k| check_top("logprobs", k))
            .transpose()?;
        let common = parse_common(&mut p, limits, &["max_tokens"])?;
        if let Some(best_of) = p.take::<u64>("best_of")? {
            if best_of as usize != common.n.get() {
                return Err(ApiError::param(
                    "best_of",
                    "only best_of equal to n is supported",
                ));
            }
        }
        if common.max_tokens == Some(0) && !echo {
            return Err(ApiError::param(
                "max_tokens",
                "must be at least 1 (0 is allowed with `echo` to score the prompt)",
            ));
        }
        if common.max_tokens == Some(0) && common.stream {
            return Err(ApiError::param(
                "max_tokens",
                "0 (score only) cannot be streamed",
            ));
        }
        Ok(Self {
            common,
            prompts,
            echo,
            logprobs,
        })
    }

    pub fn common(&self) -> &Common {
        &self.common
    }

    /// Never empty; token ids are below the vocabulary size.
    pub fn prompts(&self) -> &[Prompt] {
        &self.prompts
    }

    /// Whether the answer repeats the prompt (and its logprobs).
    pub fn echo(&self) -> bool {
        self.echo
    }

    /// `Some(k)`: report logprobs with `k` (at most [`MAX_TOP_LOGPROBS`]) alternatives.
    pub fn logprobs(&self) -> Option<usize> {
        self.logprobs
    }
}

fn check_top(param: &str, k: u64) -> Result<usize, ApiError> {
    if k as usize > MAX_TOP_LOGPROBS {
        return Err(ApiError::param(
            param,
            format!("must be at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    Ok(k as usize)
}

/// Parameters that change what is asked of the model in ways we do not implement: better a
/// clear 400 than a silently different answer.
fn reject_unsupported(p: &mut Params, names: &[&str]) -> Result<(), ApiError> {
    for &name in names {
        match p.take_value(name) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::String(s)) if s.is_empty() || s == "none" => {}
            Some(_) => {
                return Err(ApiError::param(
                    name,
                    format!("`{name}` is not supported by this server"),
                ))
            }
        }
    }
    Ok(())
}

fn parse_common(
    p: &mut Params,
    limits: &Limits,
    max_names: &[&'static str],
) -> Result<Common, ApiError> {
    let model = p.take::<String>("model")?;
    let n = ChoiceCount::new(p.take::<u64>("n")?.unwrap_or(1), limits.max_n)
        .map_err(|e| ApiError::param("n", e.to_string()))?;
    let stream = p.take::<bool>("stream")?.unwrap_or(false);
    #[derive(Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: bool,
    }
    let include_usage = p
        .take::<StreamOptions>("stream_options")?
        .is_some_and(|o| o.include_usage);

    let mut max_tokens = None;
    let mut max_tokens_param = max_names[0];
    for &name in max_names {
        if let Some(v) = p.take::<u64>(name)? {
            // The first name listed (the newer one) wins when both are sent.
            if max_tokens.is_none() {
                max_tokens = Some(v as usize);
                max_tokens_param = name;
            }
        }
    }
    let min_tokens = p.take::<u64>("min_tokens")?.unwrap_or(0) as usize;
    if let Some(max) = max_tokens {
        if min_tokens > max {
            return Err(ApiError::param(
                "min_tokens",
                format!("must not exceed {max_tokens_param} ({max})"),
            ));
        }
    }

    let sampling = parse_sampling(p, limits)?;
    let stop = match p.take_value("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(ApiError::param(
                    "stop",
                    format!("must hold strings, not {}", json_kind(&other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::param(
                "stop",
                format!(
                    "must be a string or a list of strings, not {}",
                    json_kind(&other)
                ),
            ))
        }
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::param(
            "stop",
            format!("at most {MAX_STOPS} stop sequences"),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop sequences must not be empty"));
    }
    let ignore_eos = p.take::<bool>("ignore_eos")?.unwrap_or(false);
    let tokens_as_ids = p
        .take::<bool>("return_tokens_as_token_ids")?
        .unwrap_or(false);
    // Accepted for OpenAI compatibility: type-checked, not used.
    p.take::<String>("user")?;
    Ok(Common {
        model,
        n,
        stream,
        include_usage,
        sampling,
        stop,
        max_tokens,
        max_tokens_param,
        min_tokens,
        ignore_eos,
        tokens_as_ids,
        grammar: parse_grammar(p)?,
    })
}

/// The sampling parameters, in the order their errors are reported. Their ranges are
/// [`SamplingParams`]' own; parameters not sent keep its neutral defaults.
fn parse_sampling(p: &mut Params, limits: &Limits) -> Result<SamplingParams, ApiError> {
    let s = SamplingParams::default();
    let s = float(p, "temperature", s, SamplingParams::with_temperature)?;
    let s = float(p, "top_p", s, SamplingParams::with_top_p)?;
    let s = s.with_top_k(top_k(p)?);
    let s = float(p, "min_p", s, SamplingParams::with_min_p)?;
    let s = match p.take::<serde_json::Number>("seed")? {
        Some(n) => s.with_seed(seed(&n)?),
        None => s,
    };
    let s = float(
        p,
        "presence_penalty",
        s,
        SamplingParams::with_presence_penalty,
    )?;
    let s = float(
        p,
        "frequency_penalty",
        s,
        SamplingParams::with_frequency_penalty,
    )?;
    let s = float(
        p,
        "repetition_penalty",
        s,
        SamplingParams::with_repetition_penalty,
    )?;
    s.with_logit_bias(parse_logit_bias(p, limits)?)
        .map_err(|e| ApiError::param("logit_bias", e.to_string()))
}

/// Applies the float `name`, when sent, through `set`'s range check; a refusal is a 400
/// with the rule and the value as the client sent it.
fn float(
    p: &mut Params,
    name: &str,
    s: SamplingParams,
    set: fn(SamplingParams, f32) -> Result<SamplingParams, OutOfRange>,
) -> Result<SamplingParams, ApiError> {
    match p.take::<f64>(name)? {
        None => Ok(s),
        Some(v) => {
            set(s, v as f32).map_err(|rule| ApiError::param(name, format!("{rule} (got {v})")))
        }
    }
}

/// vLLM's convention: -1 and 0 both turn top-k off.
fn top_k(p: &mut Params) -> Result<usize, ApiError> {
    match p.take::<i64>("top_k")? {
        None | Some(-1) | Some(0) => Ok(0),
        Some(k) if k > 0 => Ok(k as usize),
        Some(_) => Err(ApiError::param(
            "top_k",
            "must be -1 or 0 (off), or positive",
        )),
    }
}

/// Any integer: negative seeds are reinterpreted, not rejected (clients send them).
fn seed(n: &serde_json::Number) -> Result<u64, ApiError> {
    n.as_u64()
        .or_else(|| n.as_i64().map(|i| i as u64))
        .ok_or_else(|| ApiError::param("seed", "must be an integer"))
}

/// Token ids and their biases; the biases' range is checked by [`SamplingParams`].
fn parse_logit_bias(p: &mut Params, limits: &Limits) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = p.take::<HashMap<String, f64>>("logit_bias")? else {
        return Ok(Vec::new());
    };
    map.into_iter()
        .map(|(k, v)| {
            let id: u32 = k.parse().map_err(|_| {
                ApiError::param("logit_bias", format!("key `{k}` is not a token id"))
            })?;
            Ok((limits.check_token("logit_bias", id.into())?, v as f32))
        })
        .collect()
}

/// The parameter a 400 names (for the request parsers' tests).
#[cfg(test)]
pub(super) fn param_of(e: ApiError) -> String {
    match e {
        ApiError::InvalidRequest { param, .. } => param.unwrap_or_default(),
        other => panic!("not a 400: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = crate::api::inputs::TEST_LIMITS;

    fn chat(v: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(Params::from_value(v).unwrap(), &LIMITS)
    }

    fn completion(v: Value) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(Params::from_value(v).unwrap(), &LIMITS)
    }

    #[test]
    fn chat_accepts_text_parts_and_defaults() {
        let r = chat(json!({"model": "m", "messages": [
            {"role": "developer", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null}
        ], "max_completion_tokens": 5, "max_tokens": 9, "stop": "x", "seed": -1}))
        .unwrap();
        assert_eq!(r.messages[0].role, "system");
        assert_eq!(r.messages[1].content, "a\nb");
        assert_eq!(r.common.max_tokens, Some(5));
        assert_eq!(r.common.stop, vec!["x"]);
        assert_eq!(r.common.sampling.seed(), Some(u64::MAX));
        assert_eq!(r.common.sampling.temperature(), 1.0);
        assert_eq!(r.logprobs, None);
    }

    #[test]
    fn every_bad_parameter_is_named() {
        let base = || json!({"messages": [{"role": "user", "content": "hi"}]});
        let cases: Vec<(Value, &str)> = vec![
            (json!({"temperature": -1}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 2}), "min_p"),
            (json!({"n": 0}), "n"),
            (json!({"n": 5}), "n"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
            (json!({"frequency_penalty": -3}), "frequency_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"logit_bias": {"x": 1}}), "logit_bias"),
            (json!({"logit_bias": {"99": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1": 101}}), "logit_bias"),
            (json!({"stop": 3}), "stop"),
            (json!({"stop": [""]}), "stop"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 2, "min_tokens": 3}), "min_tokens"),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (json!({"stream": "yes"}), "stream"),
            (json!({"tools": [{"type": "function"}]}), "tools[0]"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"seed": 1.5}), "seed"),
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"messages": [{"role": "critic", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0]",
            ),
            (json!({"messages": [{"content": "x"}]}), "messages[0]"),
        ];
        for (patch, param) in cases {
            let mut body = base();
            for (k, v) in patch.as_object().unwrap() {
                body[k] = v.clone();
            }
            let got = param_of(chat(body.clone()).expect_err(&body.to_string()));
            assert_eq!(got, param, "{body}");
        }
    }

    #[test]
    fn range_errors_keep_their_wording() {
        let base = || json!({"messages": [{"role": "user", "content": "hi"}]});
        let cases = [
            (json!({"n": 5}), "must be between 1 and 4"),
            (json!({"top_p": 1.5}), "must be in (0, 1] (got 1.5)"),
            (json!({"temperature": -1}), "must be >= 0 (got -1)"),
            (json!({"repetition_penalty": 0}), "must be > 0 (got 0)"),
            (
                json!({"logit_bias": {"3": -101}}),
                "bias for token 3 must be in [-100, 100]",
            ),
        ];
        for (patch, want) in cases {
            let mut body = base();
            for (k, v) in patch.as_object().unwrap() {
                body[k] = v.clone();
            }
            let e = chat(body).unwrap_err();
            assert_eq!(e.to_string(), want, "{patch}");
        }
    }

    #[test]
    fn logit_bias_comes_sorted_by_token() {
        let r = chat(json!({"messages": [{"role": "user", "content": "hi"}],
            "logit_bias": {"9": 1, "2": -1, "30": 0.5}}))
        .unwrap();
        assert_eq!(
            r.common.sampling.logit_bias(),
            &[(2, -1.0), (9, 1.0), (30, 0.5)]
        );
    }

    #[test]
    fn completion_prompt_shapes() {
        let p = |v: Value| completion(json!({"prompt": v})).map(|r| r.prompts);
        assert_eq!(p(json!("hi")).unwrap(), vec![Prompt::Text("hi".into())]);
        assert_eq!(p(json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(p(json!([1, 2])).unwrap(), vec![Prompt::Tokens(vec![1, 2])]);
        assert_eq!(
            p(json!([[1], [2, 3]])).unwrap()[1],
            Prompt::Tokens(vec![2, 3])
        );
        for bad in [
            json!([]),
            json!([1, "a"]),
            json!([60]),
            json!([-1]),
            json!(5),
            json!([{}]),
        ] {
            assert_eq!(
                param_of(p(bad.clone()).expect_err(&bad.to_string())),
                "prompt"
            );
        }
        assert_eq!(param_of(completion(json!({})).unwrap_err()), "prompt");
    }

    #[test]
    fn completion_echo_rules() {
        assert!(
            completion(json!({"prompt": "x", "max_tokens": 0, "echo": true, "logprobs": 1}))
                .is_ok()
        );
        assert_eq!(
            param_of(completion(json!({"prompt": "x", "max_tokens": 0})).unwrap_err()),
            "max_tokens"
        );
        assert_eq!(
            param_of(completion(json!({"prompt": "x", "logprobs": 21})).unwrap_err()),
            "logprobs"
        );
        assert_eq!(
            param_of(completion(json!({"prompt": "x", "suffix": "y"})).unwrap_err()),
            "suffix"
        );
    }
}
