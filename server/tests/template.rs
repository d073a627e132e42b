//! One chat template for serving, training and evaluation: a folder with both template
//! sources renders and tokenizes the same prompt in the server as in `liger-convert`'s
//! recovery and eval (which read a folder's text side with `Checkpoint::text`, that is
//! `liger_model::text::Text::load`).

mod common;

use liger_model::chat::Message;
use liger_model::text::Text;
use liger_server::text::{ChatMessage, Codec};
use serde_json::json;

#[test]
fn a_folder_with_both_template_sources_renders_one_prompt_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
    write("tokenizer.json", common::tokenizer_json().to_string());
    write(
        "tokenizer_config.json",
        json!({
            "chat_template": "CONFIG {% for m in messages %}{{ m.content }}{% endfor %}",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
        })
        .to_string(),
    );
    write(
        "chat_template.jinja",
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
    );
    let messages = [Message::new("user", "the tin")];
    let want = "<|endoftext|><|im_start|>user\nthe tin<|im_end|>\n<|im_start|>assistant\n";
    // Training and eval.
    let recovery = Text::load(dir.path(), &[common::IM_END]).unwrap();
    let rendered = recovery.template().render(&messages, true).unwrap();
    assert_eq!(rendered, want);
    let trained = recovery
        .encode_rendered(&rendered)
        .unwrap()
        .get_ids()
        .to_vec();
    // Serving.
    let codec = Codec::load(dir.path(), &[common::IM_END]).unwrap();
    let served: Vec<ChatMessage> = messages.to_vec();
    assert_eq!(codec.render_chat(&served).unwrap(), want);
    assert_eq!(codec.encode_chat(&served).unwrap(), trained);
    assert_eq!(codec.eos_token_ids(), recovery.eos_token_ids());
}

/// A template that renders tools itself (as Qwen2.5's does, reduced): the tool list, the
/// calls of an assistant turn with their arguments as objects, and tool results.
const TOOL_TEMPLATE: &str = "{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}\
{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\
{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments.city }} {{ c.function.arguments | tojson }}{% endfor %}\
{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[tokio::test]
async fn templates_with_tools_render_them_and_the_conversation_s_calls() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let write = |dir: &std::path::Path| {
        common::write_model(dir);
        std::fs::write(dir.join("chat_template.jinja"), TOOL_TEMPLATE).unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let codec = Codec::load(dir.path(), &[common::IM_END]).unwrap();
    assert!(codec.template().supports_tools());
    let messages = json!([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}
    ]);
    let parsed: Vec<ChatMessage> = serde_json::from_value(messages.clone()).unwrap();
    let text = codec.render_chat_with_tools(&parsed, Some(&tools)).unwrap();
    assert_eq!(
        text,
        // (trim_blocks eats the newline after `endif`, as in Hugging Face's rendering.)
        "TOOLS: get_weather<|im_start|>user\nWeather?<|im_end|>\n\
         <|im_start|>assistant\nCALL get_weather Paris {\"city\": \"Paris\"}<|im_end|>\n\
         <|im_start|>tool\n22 C(for call_1)<|im_end|>\n<|im_start|>assistant\n"
    );
    // The server renders exactly that (no system message of its own) for such a template.
    let s = common::server_for(write, |_| {});
    let (status, resp) = common::post_json(
        &s.app,
        "/v1/chat/completions",
        json!({"model": common::MODEL, "messages": messages, "tools": tools, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, axum::http::StatusCode::OK, "{resp}");
    let want = codec.encode_chat_with_tools(&parsed, Some(&tools)).unwrap();
    assert_eq!(
        resp["usage"]["prompt_tokens"].as_u64(),
        Some(want.len() as u64)
    );
}
