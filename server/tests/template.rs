//! One chat template for serving, training and evaluation: a folder with both template
//! sources renders the same prompt in the server as in `liger-convert`'s recovery and eval
//! (which read it with `ChatTemplate::from_folder`).

mod common;

use liger_model::chat::{ChatTemplate, Message};
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
    let recovery = ChatTemplate::from_folder(dir.path()).unwrap();
    assert_eq!(recovery.render(&messages, true).unwrap(), want);
    // Serving.
    let codec = Codec::load(dir.path(), &[common::IM_END]).unwrap();
    let served: Vec<ChatMessage> = messages.to_vec();
    assert_eq!(codec.render_chat(&served).unwrap(), want);
}
