//! End to end through the router, the real loader and the engine thread, on a tiny random
//! Liger model with a byte-level tokenizer: every endpoint, streaming, stop strings, `n`,
//! seeds, logprobs, echo scoring, UTF-8 in streams, limits.

mod common;

use axum::http::StatusCode;
use candle_core::{DType, Device};
use common::*;
use liger_model::{Logits, Model};
use liger_server::text::Codec;
use serde_json::{json, Value};

fn text_of(resp: &Value, i: usize) -> String {
    resp["choices"][i]["text"].as_str().unwrap().to_string()
}

/// Token ids of a completions choice requested with `logprobs` and
/// `return_tokens_as_token_ids`.
fn ids_of(choice: &Value) -> Vec<u32> {
    choice["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t.as_str()
                .unwrap()
                .strip_prefix("token_id:")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

/// The model and tokenizer of a test server's folder, for independent reference values.
fn reference(dir: &std::path::Path) -> (Model, Codec) {
    let model = liger_model::checkpoint::load_model(dir, DType::F32, &Device::Cpu).unwrap();
    let codec = Codec::load(dir, &[IM_END]).unwrap();
    (model, codec)
}

#[tokio::test]
async fn chat_completion_has_the_openai_shape() {
    let s = server(|_| {});
    let (status, resp) = post_json(
        &s.app,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Say the"}]}], "max_tokens": 12, "seed": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["object"], "chat.completion");
    assert_eq!(resp["model"], MODEL);
    assert!(resp["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &resp["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let u = &resp["usage"];
    assert!(u["completion_tokens"].as_u64().unwrap() <= 12);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    let (status, models) = get(&s.app, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(get(&s.app, "/health").await.0, StatusCode::OK);
}

#[tokio::test]
async fn completions_accept_every_prompt_shape() {
    let s = server(|_| {});
    let body = |prompt: Value| json!({"prompt": prompt, "max_tokens": 5, "n": 2, "seed": 3, "ignore_eos": true});
    let (status, resp) = post_json(
        &s.app,
        "/v1/completions",
        body(json!(["the cat", [10, 20, 30], "in"])),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "mixed lists are rejected: {resp}"
    );

    let (status, resp) = post_json(
        &s.app,
        "/v1/completions",
        body(json!(["the cat", "in the"])),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["object"], "text_completion");
    let idx: Vec<u64> = resp["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2, 3], "index = prompt * n + choice");
    assert_eq!(resp["usage"]["completion_tokens"], 20);
    let (_, one) = post_json(&s.app, "/v1/completions", body(json!("in the"))).await;
    assert_eq!(
        text_of(&resp, 2),
        text_of(&one, 0),
        "each prompt is generated independently"
    );
    assert_eq!(text_of(&resp, 3), text_of(&one, 1));

    let (status, resp) =
        post_json(&s.app, "/v1/completions", body(json!([[10, 20, 30], [40]]))).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["choices"].as_array().unwrap().len(), 4);
    assert_eq!(resp["usage"]["prompt_tokens"], 4);
    let (status, resp) = post_json(&s.app, "/v1/completions", body(json!([10, 20, 30]))).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn streams_match_the_non_streamed_answer() {
    let s = server(|_| {});
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 16,
        "seed": 11, "ignore_eos": true, "n": 2});
    let (_, whole) = post_json(&s.app, "/v1/chat/completions", chat.clone()).await;
    let mut streamed = chat;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, data) = post_stream(&s.app, "/v1/chat/completions", streamed).await;
    assert_eq!(status, StatusCode::OK);
    let chunks = common::chunks(&data);
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|c| c["index"] == i)
            .collect();
        assert_eq!(
            mine[0]["delta"]["role"], "assistant",
            "the role comes first"
        );
        let text: String = mine
            .iter()
            .filter_map(|c| c["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            text,
            whole["choices"][i]["message"]["content"].as_str().unwrap()
        );
        assert_eq!(
            mine.last().unwrap()["finish_reason"],
            whole["choices"][i]["finish_reason"]
        );
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);

    let comp = json!({"prompt": "the", "max_tokens": 10, "seed": 4, "ignore_eos": true});
    let (_, whole) = post_json(&s.app, "/v1/completions", comp.clone()).await;
    let mut streamed = comp;
    streamed["stream"] = json!(true);
    let (_, data) = post_stream(&s.app, "/v1/completions", streamed).await;
    let chunks = common::chunks(&data);
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, text_of(&whole, 0));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage unless asked"
    );
}

#[tokio::test]
async fn stop_strings_end_generation_and_never_appear() {
    let s = server(|_| {});
    let base = json!({"prompt": "in the", "max_tokens": 40, "seed": 21, "ignore_eos": true, "temperature": 1.0});
    let (_, free) = post_json(&s.app, "/v1/completions", base.clone()).await;
    let full = text_of(&free, 0);
    // A two-character stop string from the middle of the free-running text.
    let chars: Vec<char> = full.chars().collect();
    let at = (2..chars.len() - 1)
        .find(|&i| chars[i..i + 2].iter().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| panic!("no printable pair in {full:?}"));
    let stop: String = chars[at..at + 2].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];

    let mut body = base.clone();
    body["stop"] = json!(["\u{1}never", stop]);
    let (_, resp) = post_json(&s.app, "/v1/completions", body.clone()).await;
    assert_eq!(text_of(&resp, 0), expected);
    assert_eq!(resp["choices"][0]["finish_reason"], "stop");

    body["stream"] = json!(true);
    let (_, data) = post_stream(&s.app, "/v1/completions", body).await;
    let chunks = common::chunks(&data);
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, expected, "streamed text stops at the same place");
    assert!(!text.contains(&stop));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn n_choices_share_one_prefill() {
    let s = server(|_| {});
    let prompt: Vec<u32> = (0..40).map(|i| byte_token(b'a' + (i % 26) as u8)).collect();
    let before = metric(&s.app, "liger_prompt_tokens_total").await;
    let body = json!({"prompt": prompt, "max_tokens": 8, "n": 2, "seed": 9, "ignore_eos": true});
    let (status, resp) = post_json(&s.app, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let after = metric(&s.app, "liger_prompt_tokens_total").await;
    assert_eq!(
        after - before,
        40.0,
        "the prompt went through the model once for both choices"
    );
    assert_eq!(resp["usage"]["prompt_tokens"], 40);
    assert_eq!(resp["usage"]["completion_tokens"], 16);
    assert_ne!(
        text_of(&resp, 0),
        text_of(&resp, 1),
        "forked choices sample independently"
    );

    let (_, single) = post_json(
        &s.app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 8, "seed": 9, "ignore_eos": true}),
    )
    .await;
    assert_eq!(
        text_of(&single, 0),
        text_of(&resp, 0),
        "choice 0 uses the request's seed"
    );
}

#[tokio::test]
async fn seeds_reproduce_and_differ() {
    let s = server(|_| {});
    let body = |seed: u64| json!({"prompt": "the", "max_tokens": 24, "seed": seed, "ignore_eos": true, "top_p": 0.9, "top_k": 50});
    let (_, a) = post_json(&s.app, "/v1/completions", body(1)).await;
    let (_, b) = post_json(&s.app, "/v1/completions", body(1)).await;
    let (_, c) = post_json(&s.app, "/v1/completions", body(2)).await;
    assert_eq!(text_of(&a, 0), text_of(&b, 0));
    assert_ne!(text_of(&a, 0), text_of(&c, 0));
}

#[tokio::test]
async fn chat_logprobs_have_the_openai_shape() {
    let s = server(|_| {});
    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "logprobs": true,
        "top_logprobs": 3, "seed": 2, "ignore_eos": true});
    let (status, resp) = post_json(&s.app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let content = resp["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 6);
    for t in content {
        assert!(t["token"].is_string());
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert!(t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b.as_u64().unwrap() < 256));
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lps: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "most likely first");
        assert!(t["logprob"].as_f64().unwrap() <= lps[0] + 1e-6);
    }
    let (_, plain) = post_json(
        &s.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
    )
    .await;
    assert!(plain["choices"][0]["logprobs"].is_null());
}

#[tokio::test]
async fn completion_logprobs_and_echo_scoring_match_the_model() {
    let s = server(|_| {});
    let (status, resp) = post_json(
        &s.app,
        "/v1/completions",
        json!({"prompt": "the cat", "max_tokens": 5, "logprobs": 2, "seed": 5, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let lp = &resp["choices"][0]["logprobs"];
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[key].as_array().unwrap().len(), 5, "{key}");
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 7, "offsets continue after the prompt");
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    assert!(lp["top_logprobs"][0].as_object().unwrap().len() <= 2);

    // Echo with max_tokens 0 scores the prompt; compare with the model run directly.
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let (model, codec) = reference(dir.path());
    let prompt = codec.encode("the cat sat on the mat", true).unwrap();
    let (status, resp) = post_json(
        &s.app,
        "/v1/completions",
        json!({"prompt": "the cat sat on the mat", "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let choice = &resp["choices"][0];
    assert_eq!(choice["text"], "the cat sat on the mat");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(resp["usage"]["completion_tokens"], 0);
    assert_eq!(resp["usage"]["prompt_tokens"], prompt.len());
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len());
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    assert_eq!(lp["text_offset"][0], 0);

    let mut state = model.new_state().unwrap();
    let logits = model
        .forward(&prompt, &mut state, Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for i in 1..prompt.len() {
        let row = &logits[i - 1];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        let want = row[prompt[i] as usize] - lse;
        let got = lp["token_logprobs"][i].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-4, "token {i}: {got} vs {want}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        let best = top.values().next().unwrap().as_f64().unwrap() as f32;
        assert!(
            (best - (max - lse)).abs() < 1e-4,
            "top logprob of token {i}"
        );
    }

    // Greedy decoding picks the model's argmax.
    let (_, greedy) = post_json(
        &s.app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 0, "return_tokens_as_token_ids": true, "ignore_eos": true}),
    )
    .await;
    let last = logits.last().unwrap();
    let argmax = (0..last.len())
        .max_by(|&a, &b| last[a].total_cmp(&last[b]))
        .unwrap() as u32;
    assert_eq!(ids_of(&greedy["choices"][0]), vec![argmax]);
}

#[tokio::test]
async fn streamed_utf8_is_never_split() {
    let s = server(|_| {});
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let codec = Codec::load(dir.path(), &[IM_END]).unwrap();
    // Make the model emit only the two bytes of "é" (C3 A9), in random order: both biased
    // far above the rest, top_k keeps just them, a high temperature evens them out.
    let bias = json!({byte_token(0xC3).to_string(): 100, byte_token(0xA9).to_string(): 100});
    let body = json!({"prompt": "x", "max_tokens": 40, "seed": 8, "logit_bias": bias, "ignore_eos": true,
        "top_k": 2, "temperature": 50,
        "stream": true, "logprobs": 0, "return_tokens_as_token_ids": true});
    let (_, data) = post_stream(&s.app, "/v1/completions", body).await;
    let chunks = common::chunks(&data);
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    let ids: Vec<u32> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["logprobs"].is_null())
        .flat_map(|c| ids_of(&c["choices"][0]))
        .collect();
    assert_eq!(ids.len(), 40);
    assert_eq!(
        text,
        codec.decode_ids(&ids, true),
        "stream = one-shot decoding of the same tokens"
    );
    assert!(
        text.contains('é'),
        "the test must exercise a two-byte character: {text:?}"
    );
}

#[tokio::test]
async fn limits_give_400_and_length() {
    let s = server(|a| a.max_model_len = Some(40));
    let long: Vec<u32> = vec![byte_token(b'a'); 40];
    let (status, resp) = post_json(&s.app, "/v1/completions", json!({"prompt": long})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(resp["error"]["param"], "prompt");
    let (status, resp) = post_json(
        &s.app,
        "/v1/completions",
        json!({"prompt": vec![byte_token(b'a'); 30], "max_tokens": 11}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(resp["error"]["param"], "max_tokens");
    // Chat without max_tokens runs to the end of the context.
    let (status, resp) = post_json(
        &s.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["usage"]["total_tokens"], 40);
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn min_tokens_holds_off_end_of_sequence() {
    let s = server(|_| {});
    // A huge bias makes <|im_end|> the only choice, yet min_tokens must come first.
    let body = json!({"prompt": "a", "max_tokens": 10, "min_tokens": 4, "logit_bias": {IM_END.to_string(): 100}, "seed": 1});
    let (_, resp) = post_json(&s.app, "/v1/completions", body).await;
    assert_eq!(
        resp["usage"]["completion_tokens"], 5,
        "4 forced tokens, then end of sequence"
    );
    assert_eq!(resp["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn streamed_echo_and_logprobs() {
    let s = server(|_| {});
    let body = json!({"prompt": "the cat", "max_tokens": 4, "seed": 2, "ignore_eos": true, "echo": true,
        "logprobs": 1, "stream": true});
    let (_, data) = post_stream(&s.app, "/v1/completions", body.clone()).await;
    let chunks = common::chunks(&data);
    let first = &chunks[0]["choices"][0];
    assert_eq!(first["text"], "the cat", "the echo comes first");
    let prompt_lp = &first["logprobs"];
    let n_prompt = prompt_lp["tokens"].as_array().unwrap().len();
    assert!(prompt_lp["token_logprobs"][0].is_null());
    assert_eq!(
        prompt_lp["token_logprobs"].as_array().unwrap().len(),
        n_prompt
    );
    let generated: Vec<&Value> = chunks[1..]
        .iter()
        .map(|c| &c["choices"][0])
        .filter(|c| !c["logprobs"].is_null())
        .collect();
    assert_eq!(generated.len(), 4, "one logprobs entry per generated token");
    let mut whole = body;
    whole["stream"] = json!(false);
    let (_, resp) = post_json(&s.app, "/v1/completions", whole).await;
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, text_of(&resp, 0));
    let offsets: Vec<&Value> = std::iter::once(prompt_lp)
        .chain(generated.iter().map(|c| &c["logprobs"]))
        .flat_map(|l| l["text_offset"].as_array().unwrap())
        .collect();
    assert_eq!(
        offsets,
        resp["choices"][0]["logprobs"]["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
    );

    let chat = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": true,
        "top_logprobs": 2, "stream": true, "ignore_eos": true});
    let (_, data) = post_stream(&s.app, "/v1/chat/completions", chat).await;
    let entries: usize = common::chunks(&data)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(|a| a.len())
        .sum();
    assert_eq!(entries, 3);
}

/// Greedy requests read the LM head's screen (`--head-screen`, on by default) when nothing
/// needs their other logits: the same tokens as with the full head, alone or side by side,
/// drafting or not; requests that need every logit (logprobs, sampling, penalties) are
/// untouched.
#[tokio::test]
async fn the_head_screen_changes_no_token() {
    let screened = server(|_| {});
    let full = server(|a| a.head_screen = Some(false));
    let prompts = [
        "one two three four one two three four one two three",
        "Quick zephyrs blow, vexing daft Jim.",
        "the cat sat on the mat",
        "abc",
    ];
    let bodies = |extra: Value| -> Vec<Value> {
        prompts
            .iter()
            .map(|p| {
                let mut body = json!({"prompt": p, "max_tokens": 40, "ignore_eos": true});
                body.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                body
            })
            .collect()
    };
    let all = |s: &TestServer, bodies: Vec<Value>| {
        let app = s.app.clone();
        async move {
            let answers = bodies.into_iter().map(|b| {
                let app = app.clone();
                async move { post_json(&app, "/v1/completions", b).await }
            });
            futures::future::join_all(answers).await
        }
    };
    let before = liger_model::testing::screened_rows();
    for extra in [
        json!({"temperature": 0}),
        json!({"temperature": 0, "logprobs": 2}),
        json!({"temperature": 0, "frequency_penalty": 0.5}),
        json!({"temperature": 0.8, "seed": 3}),
    ] {
        let a = all(&screened, bodies(extra.clone())).await;
        let b = all(&full, bodies(extra.clone())).await;
        for ((sa, ra), (sb, rb)) in a.iter().zip(&b) {
            assert_eq!((*sa, *sb), (StatusCode::OK, StatusCode::OK), "{ra} {rb}");
            assert_eq!(
                ra["choices"][0]["text"], rb["choices"][0]["text"],
                "{extra}"
            );
            assert_eq!(ra["usage"]["completion_tokens"], 40);
        }
    }
    assert!(
        liger_model::testing::screened_rows() > before,
        "greedy steps read the screen"
    );
}
