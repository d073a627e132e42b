use super::*;

fn msgs() -> Vec<Message> {
    vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
    ]
}

#[test]
fn chatml_matches_the_reference_layout() {
    let text = ChatTemplate::chatml(&Specials::default())
        .render(&msgs(), true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chatml_ranges_cover_assistant_turns_and_their_end() {
    let t = ChatTemplate::chatml(&Specials::default());
    let msgs = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "Bye"),
        Message::new("assistant", "See you."),
    ];
    let (text, ranges) = t.render_conversation(&msgs).unwrap();
    let ranges = ranges.unwrap();
    assert_eq!(ranges.len(), 2);
    assert_eq!(&text[ranges[0].clone()], "Hello!<|im_end|>\n");
    assert_eq!(&text[ranges[1].clone()], "See you.<|im_end|>\n");
}

#[test]
fn python_methods_block_trimming_and_raise_exception_work() {
    let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n{{ m.content.strip().upper() }}|{% endfor %}";
    let specials = Specials {
        bos: Some("<s>".into()),
        eos: None,
    };
    let t = ChatTemplate::new(src, &specials).unwrap();
    let mut m = msgs();
    m[1].content = "  hi  ".into();
    assert_eq!(t.render(&m, true).unwrap(), "<s>BE BRIEF.|HI|");
    m[1].role = "tool".into();
    let err = t.render(&m, true).unwrap_err();
    assert!(err.to_string().contains("no tools"), "{err}");
}

#[test]
fn a_folder_s_template_follows_one_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "chat_template": [
            {"name": "tool_use", "template": "T{{ bos_token }}"},
            {"name": "default", "template": "D{{ bos_token }}{{ eos_token }}"}
        ],
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
    });
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    // Nothing: ChatML.
    assert!(ChatTemplate::from_folder(dir.path()).unwrap().is_fallback());
    // tokenizer_config.json: its default template, with its special tokens.
    write("tokenizer_config.json", &config.to_string());
    let t = ChatTemplate::from_folder(dir.path()).unwrap();
    assert_eq!(t.render(&msgs(), true).unwrap(), "D<s></s>");
    // Both: chat_template.jinja wins, as in transformers.
    write("chat_template.jinja", "J{{ bos_token }}");
    let t = ChatTemplate::from_folder(dir.path()).unwrap();
    assert_eq!(t.render(&msgs(), true).unwrap(), "J<s>");
    assert!(!t.is_fallback());
    // A broken template names its file.
    write("chat_template.jinja", "{% for %}");
    let e = ChatTemplate::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("chat_template.jinja"), "{e}");
}

#[test]
fn strftime_formats_a_known_date() {
    // 2024-07-23 13:45:06 UTC
    assert_eq!(
        strftime("%d %b %Y %H:%M:%S %B %%", 1_721_742_306),
        "23 Jul 2024 13:45:06 July %"
    );
    assert_eq!(civil_from_days(0), (1970, 1, 1));
}
