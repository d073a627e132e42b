//! Tool calling on `/v1/chat/completions`: `tools`, `tool_choice`, `parallel_tool_calls`.
//!
//! - **Prompt.** A template that renders `tools` itself (Qwen2.5, Llama 3.1, Hermes...) gets
//!   them as OpenAI sends them, with the conversation's tool calls and results in Hugging
//!   Face's message fields. Any other template (SmolLM2's ChatML among them) gets the tools
//!   in a system message, in the Hermes format that Qwen's templates also write:
//!   signatures inside `<tools></tools>`, calls answered as
//!   `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; earlier calls are written
//!   back that way and tool results become user turns wrapped in
//!   `<tool_response></tool_response>`.
//! - **Output.** `<tool_call>` blocks naming a known function with JSON arguments become
//!   `tool_calls` (ids `call_...`, `finish_reason: "tool_calls"`); the text around them is
//!   the message content. Streams send each call as one delta with its `index`, once its
//!   block is complete.
//! - **Constraint.** With `tool_choice: "required"` or a named function, the output is
//!   constrained to `<tool_call>` blocks whose arguments follow the function's JSON schema
//!   (one block, or several when `parallel_tool_calls`); with `auto` the model chooses
//!   freely and only well-formed calls are reported as calls; `none` leaves tools out of
//!   the prompt.

use serde::Deserialize;
use serde_json::{json, Value};

use super::body::{json_kind, Params};
use crate::engine::FinishReason;
use crate::error::ApiError;
use crate::text::grammar::{bounded_whitespace, GrammarSpec};
use crate::text::ChatMessage;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema for the arguments object.
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    Required,
    Named(String),
}

/// A validated tool request (absent when there are no tools or `tool_choice` is `none`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

#[derive(Deserialize)]
struct RawTool {
    #[serde(rename = "type")]
    kind: String,
    function: RawFunction,
}

#[derive(Deserialize)]
struct RawFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

/// Takes `tools`, `tool_choice` and `parallel_tool_calls` out of `p`.
pub fn parse_tools(p: &mut Params) -> Result<Option<Tools>, ApiError> {
    let raw = p.take::<Vec<RawTool>>("tools")?.unwrap_or_default();
    let parallel = p.take::<bool>("parallel_tool_calls")?.unwrap_or(true);
    let mut functions: Vec<Function> = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let param = format!("tools[{i}]");
        if t.kind != "function" {
            return Err(ApiError::param(
                &param,
                format!("tool type `{}` is not supported (only function)", t.kind),
            ));
        }
        let f = t.function;
        let valid = !f.name.is_empty()
            && f.name.len() <= 64
            && f.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(ApiError::param(
                &format!("{param}.function.name"),
                "must be 1 to 64 letters, digits, underscores or dashes",
            ));
        }
        if functions.iter().any(|g| g.name == f.name) {
            return Err(ApiError::param(
                &format!("{param}.function.name"),
                format!("`{}` is defined twice", f.name),
            ));
        }
        let parameters = match f.parameters {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(v @ Value::Object(_)) => v,
            Some(other) => {
                return Err(ApiError::param(
                    &format!("{param}.function.parameters"),
                    format!("must be a JSON schema object, not {}", json_kind(&other)),
                ))
            }
        };
        functions.push(Function {
            name: f.name,
            description: f.description,
            parameters,
        });
    }
    let choice = match p.take_value("tool_choice") {
        None => Some(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" => Some(ToolChoice::Auto),
            "required" => Some(ToolChoice::Required),
            other => {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("must be none, auto, required or a function, not {other:?}"),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::param(
                        "tool_choice",
                        "a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("`{name}` is not one of the tools"),
                ));
            }
            Some(ToolChoice::Named(name.to_string()))
        }
    };
    match choice {
        None => Ok(None),
        Some(ToolChoice::Auto) if functions.is_empty() => Ok(None),
        Some(_) if functions.is_empty() => Err(ApiError::param("tool_choice", "requires `tools`")),
        Some(choice) => Ok(Some(Tools {
            functions,
            choice,
            parallel,
        })),
    }
}

impl Tools {
    /// OpenAI's `tools` array, for templates that render it.
    pub fn as_template_value(&self) -> Value {
        Value::Array(self.functions.iter().map(function_json).collect())
    }

    /// The output constraint `tool_choice` asks for, if any.
    pub fn grammar(&self) -> Option<GrammarSpec> {
        let allowed: Vec<&Function> = match &self.choice {
            ToolChoice::Auto => return None,
            ToolChoice::Required => self.functions.iter().collect(),
            ToolChoice::Named(n) => self.functions.iter().filter(|f| &f.name == n).collect(),
        };
        let mut lark = String::new();
        let repeat = if self.parallel { "(\"\\n\" call)*" } else { "" };
        lark.push_str(&format!("start: call {repeat}\n"));
        let alts: Vec<String> = (0..allowed.len()).map(|i| format!("f{i}")).collect();
        lark.push_str(&format!(
            "call: {} \"\\n\" ({}) \"\\n\" {}\n",
            Value::from(OPEN),
            alts.join(" | "),
            Value::from(CLOSE)
        ));
        for (i, f) in allowed.iter().enumerate() {
            let schema = bounded_whitespace(json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }));
            lark.push_str(&format!("f{i}: %json {schema}\n"));
        }
        Some(GrammarSpec::Lark(lark))
    }

    /// The system-message text that describes the tools to a template without `tools`.
    fn system_text(&self) -> String {
        let sigs: Vec<String> = self
            .functions
            .iter()
            .map(|f| function_json(f).to_string())
            .collect();
        format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n\
             <tools>\n{}\n</tools>\n\n\
             For each function call, return a json object with function name and arguments \
             within <tool_call></tool_call> XML tags:\n\
             <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
            sigs.join("\n")
        )
    }
}

fn function_json(f: &Function) -> Value {
    let mut function = json!({"name": f.name, "parameters": f.parameters});
    if let Some(d) = &f.description {
        function["description"] = json!(d);
    }
    json!({"type": "function", "function": function})
}

/// The messages as a template without tool support should see them: tools described in
/// the system message, earlier calls written as `<tool_call>` blocks, tool results as user
/// turns. Unchanged when there is nothing tool-related.
pub fn plain_messages(messages: &[ChatMessage], tools: Option<&Tools>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(t) = tools {
        let text = t.system_text();
        match messages.first() {
            Some(m) if m.role == "system" => out.push(ChatMessage::new(
                "system",
                format!("{}\n\n{text}", m.content),
            )),
            _ => out.push(ChatMessage::new("system", text)),
        }
    }
    let skip = usize::from(tools.is_some() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for c in &m.tool_calls {
                    let args: Value = serde_json::from_str(&c.function.arguments)
                        .unwrap_or_else(|_| Value::from(c.function.arguments.as_str()));
                    let call = json!({"name": c.function.name, "arguments": args});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("{OPEN}\n{call}\n{CLOSE}"));
                }
                out.push(ChatMessage::new("assistant", text));
            }
            "tool" => out.push(ChatMessage::new(
                "user",
                format!("<tool_response>\n{}\n</tool_response>", m.content),
            )),
            _ => out.push(ChatMessage::new(&m.role, m.content.clone())),
        }
    }
    out
}

/// A call found in the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    /// JSON text of the arguments object.
    pub arguments: String,
}

impl Call {
    pub fn to_json(&self, index: Option<usize>) -> Value {
        let mut v = json!({"id": self.id, "type": "function",
            "function": {"name": self.name, "arguments": self.arguments}});
        if let Some(i) = index {
            v["index"] = json!(i);
        }
        v
    }
}

/// The finish reason to report: a choice that ended by itself after making calls ended to
/// let them run (OpenAI's `tool_calls`); `length` stays `length`.
pub fn finish_reason(reason: FinishReason, made_calls: bool) -> &'static str {
    match reason {
        FinishReason::Stop if made_calls => "tool_calls",
        other => other.as_str(),
    }
}

/// Parses one block's body: `{"name": known, "arguments": {...}}`.
fn parse_call(body: &str, tools: &Tools) -> Option<Call> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    if !tools.functions.iter().any(|f| f.name == name) {
        return None;
    }
    let args = match v.get("arguments") {
        Some(a @ Value::Object(_)) => a.to_string(),
        // Some models write the arguments as JSON text.
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok_and(|a| a.is_object()) => {
            s.clone()
        }
        None => "{}".to_string(),
        _ => return None,
    };
    Some(Call {
        id: format!("call_{:024x}", rand::random::<u128>() >> 32),
        name: name.to_string(),
        arguments: args,
    })
}

/// Splits generated text into content and calls, as it streams: text that may still turn
/// into a `<tool_call>` block is held back until it is known.
#[derive(Debug, Default)]
pub struct CallSplitter {
    held: String,
}

/// What a piece of text released.
#[derive(Debug, Default, PartialEq)]
pub struct Split {
    pub content: String,
    pub calls: Vec<Call>,
}

impl CallSplitter {
    pub fn push(&mut self, text: &str, tools: &Tools) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.held.find(OPEN) {
                Some(start) => {
                    let Some(end) = self.held[start..].find(CLOSE).map(|e| start + e) else {
                        // An open block: release what comes before it.
                        out.content.push_str(&self.held[..start]);
                        self.held.drain(..start);
                        return out;
                    };
                    let body = &self.held[start + OPEN.len()..end];
                    match parse_call(body, tools) {
                        Some(call) => {
                            out.content.push_str(&self.held[..start]);
                            out.calls.push(call);
                        }
                        // Not a call of ours: it stays text.
                        None => out.content.push_str(&self.held[..end + CLOSE.len()]),
                    }
                    self.held.drain(..end + CLOSE.len());
                }
                None => {
                    // Keep a tail that could be the start of `<tool_call>`.
                    let keep = (1..OPEN.len())
                        .rev()
                        .find(|&k| self.held.len() >= k && self.held.ends_with(&OPEN[..k]))
                        .unwrap_or(0);
                    let cut = self.held.len() - keep;
                    out.content.push_str(&self.held[..cut]);
                    self.held.drain(..cut);
                    return out;
                }
            }
        }
    }

    /// The end of the output: whatever is held is content (an unfinished block included).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The whole output at once: (content, calls). Content around calls is trimmed, and `None`
/// when calls leave nothing else.
pub fn split_output(text: &str, tools: &Tools) -> (Option<String>, Vec<Call>) {
    let mut s = CallSplitter::default();
    let mut split = s.push(text, tools);
    split.content.push_str(&s.finish());
    if split.calls.is_empty() {
        return (Some(split.content), split.calls);
    }
    let content = split.content.trim();
    (
        (!content.is_empty()).then(|| content.to_string()),
        split.calls,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::params::param_of;
    use crate::text::ToolCall;

    fn tools(choice: ToolChoice) -> Tools {
        Tools {
            functions: vec![Function {
                name: "get_weather".into(),
                description: Some("Weather of a city".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]}),
            }],
            choice,
            parallel: true,
        }
    }

    fn parse(v: Value) -> Result<Option<Tools>, ApiError> {
        parse_tools(&mut Params::from_value(v).unwrap())
    }

    #[test]
    fn tool_requests_parse_and_bad_ones_name_the_field() {
        let t = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let got = parse(json!({"tools": t})).unwrap().unwrap();
        assert_eq!(got.choice, ToolChoice::Auto);
        assert!(got.parallel);
        assert_eq!(
            parse(json!({"tools": t, "tool_choice": "none"})).unwrap(),
            None
        );
        assert_eq!(parse(json!({})).unwrap(), None);
        let named = parse(
            json!({"tools": t, "tool_choice": {"type": "function", "function": {"name": "f"}},
                                 "parallel_tool_calls": false}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(named.choice, ToolChoice::Named("f".into()));
        assert!(!named.parallel);
        for (body, param) in [
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": t, "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": t, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
            ),
            (
                json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}),
                "tools[0]",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
                "tools[0].function.parameters",
            ),
            (json!({"tools": [t[0], t[0]]}), "tools[1].function.name"),
        ] {
            assert_eq!(param_of(parse(body.clone()).unwrap_err()), param, "{body}");
        }
    }

    #[test]
    fn calls_are_split_from_text_however_the_stream_cuts_it() {
        let t = tools(ToolChoice::Auto);
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"nope\", \"arguments\": {}}\n</tool_call> <tool_";
        let (content, calls) = split_output(text, &t);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].arguments).unwrap(),
            json!({"city": "Paris"})
        );
        assert!(calls[0].id.starts_with("call_"));
        let content = content.unwrap();
        assert!(
            content.starts_with("Let me check.")
                && content.contains("\"nope\"")
                && content.ends_with("<tool_"),
            "{content}"
        );
        // Streamed one character at a time: the same content and calls.
        for step in [1, 3, 7] {
            let mut s = CallSplitter::default();
            let (mut streamed, mut names) = (String::new(), Vec::new());
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(step) {
                let split = s.push(&piece.iter().collect::<String>(), &t);
                streamed.push_str(&split.content);
                names.extend(split.calls.into_iter().map(|c| c.name));
            }
            streamed.push_str(&s.finish());
            assert_eq!(names, vec!["get_weather"]);
            assert_eq!(streamed.trim(), content);
        }
        assert_eq!(
            split_output("no calls here", &t),
            (Some("no calls here".into()), vec![])
        );
    }

    impl Call {
        /// As the assistant message of the next turn carries it.
        fn to_message_call(&self) -> ToolCall {
            ToolCall {
                id: self.id.clone(),
                kind: "function".into(),
                function: crate::text::FunctionCall {
                    name: self.name.clone(),
                    arguments: self.arguments.clone(),
                },
            }
        }
    }

    #[test]
    fn plain_messages_describe_tools_and_rewrite_tool_turns() {
        let t = tools(ToolChoice::Auto);
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.tool_calls = vec![Call {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: "{\"city\":\"Paris\"}".into(),
        }
        .to_message_call()];
        let mut result = ChatMessage::new("tool", "22 C");
        result.tool_call_id = Some("call_1".into());
        let msgs = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Paris?"),
            assistant,
            result,
        ];
        let plain = plain_messages(&msgs, Some(&t));
        assert_eq!(plain.len(), 4);
        assert!(
            plain[0].content.starts_with("Be brief.\n\n# Tools")
                && plain[0].content.contains("\"get_weather\"")
        );
        let call = json!({"name": "get_weather", "arguments": {"city": "Paris"}});
        assert_eq!(
            plain[2].content,
            format!("<tool_call>\n{call}\n</tool_call>")
        );
        assert_eq!(
            (plain[3].role.as_str(), plain[3].content.as_str()),
            ("user", "<tool_response>\n22 C\n</tool_response>")
        );
        assert!(plain.iter().all(|m| m.tool_calls.is_empty()));
        // Without tools, only the tool turns are rewritten.
        let plain = plain_messages(&msgs, None);
        assert_eq!(plain[0].content, "Be brief.");
    }

    #[test]
    fn required_and_named_choices_compile_to_call_grammars() {
        let mut t = tools(ToolChoice::Required);
        let Some(GrammarSpec::Lark(g)) = t.grammar() else {
            panic!()
        };
        assert!(
            g.contains("%json") && g.contains("get_weather") && g.contains("(\"\\n\" call)*"),
            "{g}"
        );
        t.parallel = false;
        let Some(GrammarSpec::Lark(g)) = t.grammar() else {
            panic!()
        };
        assert!(!g.contains("call)*"), "{g}");
        assert_eq!(tools(ToolChoice::Auto).grammar(), None);
    }
}
