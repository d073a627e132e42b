//! The prompt parameters: chat `messages` (roles, string or text-part content) and the
//! completions `prompt` (a string, strings, token ids, or lists of token ids).

use serde::Deserialize;
use serde_json::Value;

use super::body::{json_kind, Params};
use crate::error::ApiError;
use crate::text::{ChatMessage, ToolCall};

/// What the loaded model allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Prompt plus generated tokens.
    pub max_model_len: usize,
    /// Token ids must be below this (the model's embedding rows).
    pub vocab_size: usize,
    /// Largest `n` (the engine's state slots).
    pub max_n: usize,
}

impl Limits {
    /// The one rule for every token id a request brings (prompt ids, `logit_bias` keys,
    /// the tokenizer's output): below the model's vocabulary size, else a 400 naming `param`.
    pub fn check_token(&self, param: &str, id: u64) -> Result<u32, ApiError> {
        u32::try_from(id)
            .ok()
            .filter(|&t| (t as usize) < self.vocab_size)
            .ok_or_else(|| {
                ApiError::param(
                    param,
                    format!(
                        "token id {id} is outside the model's vocabulary (size {})",
                        self.vocab_size
                    ),
                )
            })
    }
}

/// One prompt of a completions request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<RawContent>,
    /// An assistant turn's calls (OpenAI's shape).
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` turn: the call it answers.
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawContent {
    Text(String),
    Parts(Vec<RawPart>),
}

#[derive(Deserialize)]
struct RawPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

pub(super) fn parse_messages(p: &mut Params) -> Result<Vec<ChatMessage>, ApiError> {
    let raw = p
        .take::<Vec<RawMessage>>("messages")?
        .ok_or_else(|| ApiError::param("messages", "`messages` is required"))?;
    if raw.is_empty() {
        return Err(ApiError::param(
            "messages",
            "must hold at least one message",
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "user" | "assistant" | "tool" => m.role,
                // OpenAI's newer name for the system role.
                "developer" => "system".to_string(),
                other => {
                    return Err(ApiError::param(
                        &format!("messages[{i}].role"),
                        format!(
                            "role `{other}` is not supported (use system, user, assistant or tool)"
                        ),
                    ))
                }
            };
            let tool_calls = m.tool_calls.unwrap_or_default();
            if !tool_calls.is_empty() && role != "assistant" {
                return Err(ApiError::param(
                    &format!("messages[{i}].tool_calls"),
                    "only assistant messages carry tool calls",
                ));
            }
            if role == "tool" && m.tool_call_id.is_none() {
                return Err(ApiError::param(
                    &format!("messages[{i}].tool_call_id"),
                    "a tool message needs the `tool_call_id` it answers",
                ));
            }
            let content = match m.content {
                Some(RawContent::Text(t)) => t,
                Some(RawContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.into_iter().enumerate() {
                        let param = format!("messages[{i}].content[{j}]");
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => texts.push(t),
                            ("text", None) => {
                                return Err(ApiError::param(&param, "a text part needs `text`"))
                            }
                            (other, _) => {
                                return Err(ApiError::param(
                                    &param,
                                    format!("content type `{other}` is not supported (only text)"),
                                ))
                            }
                        }
                    }
                    // vLLM joins text parts with newlines.
                    texts.join("\n")
                }
                None if role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::param(
                        &format!("messages[{i}].content"),
                        "`content` is required",
                    ))
                }
            };
            Ok(ChatMessage {
                role,
                content,
                tool_calls,
                tool_call_id: m.tool_call_id,
            })
        })
        .collect()
}

pub(super) fn parse_prompts(p: &mut Params, limits: &Limits) -> Result<Vec<Prompt>, ApiError> {
    let v = p
        .take_value("prompt")
        .ok_or_else(|| ApiError::param("prompt", "`prompt` is required"))?;
    let token = |v: &Value| -> Result<u32, ApiError> {
        let id = v.as_u64().ok_or_else(|| {
            ApiError::param(
                "prompt",
                format!("token ids must be non-negative integers, not {v}"),
            )
        })?;
        limits.check_token("prompt", id)
    };
    let tokens = |a: &[Value]| a.iter().map(token).collect::<Result<Vec<u32>, _>>();
    let prompts = match v {
        Value::String(s) => vec![Prompt::Text(s)],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::param("prompt", "must not be empty"));
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .into_iter()
                .map(|i| match i {
                    Value::String(s) => Ok(Prompt::Text(s)),
                    other => Err(ApiError::param("prompt", format!("a list of strings cannot hold {}", json_kind(&other)))),
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![Prompt::Tokens(tokens(&items)?)],
            Value::Array(_) => items
                .iter()
                .map(|i| match i {
                    Value::Array(a) => Ok(Prompt::Tokens(tokens(a)?)),
                    other => Err(ApiError::param("prompt", format!("a list of token lists cannot hold {}", json_kind(other)))),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(ApiError::param(
                    "prompt",
                    format!("must be a string, a list of strings, a list of token ids or a list of such lists, not a list of {}", json_kind(other)),
                ))
            }
        },
        other => {
            return Err(ApiError::param("prompt", format!("must be a string or a list, not {}", json_kind(&other))));
        }
    };
    Ok(prompts)
}

/// What the request parsers' tests run against.
#[cfg(test)]
pub(super) const TEST_LIMITS: Limits = Limits {
    max_model_len: 100,
    vocab_size: 50,
    max_n: 4,
};

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = TEST_LIMITS;

    #[test]
    fn token_ids_below_the_vocabulary_pass() {
        assert_eq!(LIMITS.check_token("prompt", 0).unwrap(), 0);
        assert_eq!(LIMITS.check_token("prompt", 49).unwrap(), 49);
    }

    #[test]
    fn token_ids_at_or_beyond_the_vocabulary_are_named() {
        // u32::MAX + 1 must not wrap to an id in range.
        for id in [50, 51, u64::from(u32::MAX) + 1, u64::MAX] {
            match LIMITS.check_token("logit_bias", id).unwrap_err() {
                ApiError::InvalidRequest { message, param } => {
                    assert_eq!(param.as_deref(), Some("logit_bias"));
                    assert_eq!(
                        message,
                        format!("token id {id} is outside the model's vocabulary (size 50)")
                    );
                }
                other => panic!("not a 400: {other:?}"),
            }
        }
    }
}
