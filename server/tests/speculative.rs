//! Speculative decoding (n-gram drafts) against plain decoding, through the real loader
//! and engine thread on the tiny random Liger model: the same tokens, greedy or seeded,
//! streamed or not, within every limit, and a state that resumes the next turn.

mod common;

use common::*;
use serde_json::{json, Value};

/// Token ids of a completions choice requested with `return_tokens_as_token_ids`.
fn ids_of(choice: &Value) -> Vec<u32> {
    choice["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap()["token_id:".len()..].parse().unwrap())
        .collect()
}

fn logprobs_of(choice: &Value) -> Vec<f64> {
    choice["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_f64().unwrap())
        .collect()
}

/// A lone stream drafts; the other server never does.
fn pair() -> (TestServer, TestServer) {
    pair_for(write_model)
}

fn pair_for(write: fn(&std::path::Path)) -> (TestServer, TestServer) {
    let spec = server_for(write, |a| a.speculative_ngram_min = Some(1));
    let plain = server_for(write, |a| a.speculative_tokens = Some(0));
    (spec, plain)
}

/// The tiny model with a global cache as the default structure has one: both kinds of
/// places, a distance cap, rows stored in f16. A rejected draft then gives back kept rows
/// that its step wrote over in place (`Backup::restore`).
fn write_model_with_global(dir: &std::path::Path) {
    write_model_with(
        dir,
        &liger_model::LigerConfig {
            window: 4,
            global_cache: 4,
            sinks: 1,
            attention_places: 1,
            max_distance: Some(12),
            kv_dtype: Some(liger_model::config::KvDtype::F16),
            ..Default::default()
        },
    );
}

async fn drafts(app: &axum::Router) -> f64 {
    metric(app, "liger_spec_decode_draft_tokens_total").await
}

async fn complete(s: &TestServer, body: Value) -> Value {
    let (status, resp) = post_json(&s.app, "/v1/completions", body).await;
    assert_eq!(status, 200, "{resp}");
    resp
}

/// Prompts whose text repeats (so drafts are found) and one that does not.
const PROMPTS: [&str; 3] = [
    "one two three four one two three four one two three",
    "the cat sat on the mat and the cat sat on the",
    "Quick zephyrs blow, vexing daft Jim.",
];

#[tokio::test]
async fn drafts_change_the_speed_not_the_tokens() {
    let (spec, plain) = pair();
    same_tokens(&spec, &plain).await;
}

#[tokio::test]
async fn drafts_change_the_speed_not_the_tokens_with_a_global_cache() {
    let (spec, plain) = pair_for(write_model_with_global);
    same_tokens(&spec, &plain).await;
}

async fn same_tokens(spec: &TestServer, plain: &TestServer) {
    for prompt in PROMPTS {
        for sampling in [
            json!({"temperature": 0}),
            json!({"temperature": 0.9, "seed": 11}),
        ] {
            let mut body = json!({"prompt": prompt, "max_tokens": 48, "ignore_eos": true,
                "logprobs": 1, "return_tokens_as_token_ids": true});
            body.as_object_mut()
                .unwrap()
                .extend(sampling.as_object().unwrap().clone());
            let a = complete(spec, body.clone()).await;
            let b = complete(plain, body).await;
            let (a, b) = (&a["choices"][0], &b["choices"][0]);
            assert_eq!(ids_of(a), ids_of(b), "{prompt:?} {sampling}");
            assert_eq!(ids_of(a).len(), 48);
            assert_eq!(a["text"], b["text"]);
            assert_eq!(a["finish_reason"], "length");
            // Logprobs come from the step's rows: a draft's row is a prompt-chunk row,
            // which rounds differently from a one-token step, hence the tolerance.
            for (x, y) in logprobs_of(a).iter().zip(logprobs_of(b)) {
                assert!((x - y).abs() < 1e-3, "{prompt:?}: logprob {x} vs {y}");
            }
        }
    }
    let drafted = metric(&spec.app, "liger_spec_decode_draft_tokens_total").await;
    let accepted = metric(&spec.app, "liger_spec_decode_accepted_tokens_total").await;
    assert!(
        accepted > 0.0 && accepted <= drafted,
        "{accepted} of {drafted}"
    );
    assert_eq!(
        metric(&plain.app, "liger_spec_decode_draft_tokens_total").await,
        0.0
    );
    // Every token is counted once, however many a step yields.
    assert_eq!(
        metric(&spec.app, "liger_generation_tokens_total").await,
        metric(&plain.app, "liger_generation_tokens_total").await
    );
}

#[tokio::test]
async fn drafts_respect_limits_stops_and_streams() {
    let (spec, plain) = pair();
    let prompt = PROMPTS[0];
    // Few tokens left: drafts are cut to what may still be generated.
    for max_tokens in [1, 2, 3, 5] {
        let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": true});
        let a = complete(&spec, body.clone()).await;
        let b = complete(&plain, body).await;
        assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
        assert_eq!(a["usage"]["completion_tokens"], max_tokens);
    }
    // A stop string inside a step's accepted drafts ends the text there.
    let free = complete(
        &plain,
        json!({"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().skip(12).take(3).collect();
    let body = json!({"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": true,
        "stop": [stop]});
    let a = complete(&spec, body.clone()).await;
    let b = complete(&plain, body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_eq!(a["choices"][0]["finish_reason"], "stop");
    // Streamed, a step's tokens arrive as several chunks with the same text in the end.
    let (status, data) = post_stream(
        &spec.app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": true,
            "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let streamed: String = chunks(&data)
        .iter()
        .filter_map(|c| c["choices"].get(0)?["text"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, text);
    // `n` choices decode side by side: both draft (within the stream limit), and each
    // still matches its plain twin; above the limit, none drafts.
    let body = json!({"prompt": prompt, "max_tokens": 20, "n": 2, "temperature": 0.8,
        "seed": 5, "ignore_eos": true});
    let before = drafts(&spec.app).await;
    let a = complete(&spec, body.clone()).await;
    let b = complete(&plain, body.clone()).await;
    assert_eq!(a["choices"], b["choices"]);
    assert!(drafts(&spec.app).await > before, "two streams draft");
    let one = server_for(write_model, |a| {
        a.speculative_ngram_min = Some(1);
        a.speculative_max_streams = Some(1);
    });
    assert_eq!(complete(&one, body).await["choices"], b["choices"]);
    assert_eq!(
        drafts(&one.app).await,
        0.0,
        "two streams are more than --speculative-max-streams 1"
    );
}

#[tokio::test]
async fn a_speculated_answer_resumes_the_next_turn() {
    let (spec, plain) = pair();
    let prompt: Vec<u32> = PROMPTS[1].bytes().map(byte_token).collect();
    let first = json!({"prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": true,
        "logprobs": 0, "return_tokens_as_token_ids": true});
    let a = complete(&spec, first.clone()).await;
    assert_eq!(
        ids_of(&a["choices"][0]),
        ids_of(&complete(&plain, first).await["choices"][0])
    );
    // The next turn repeats the prompt and the answer: the finished answer's snapshot
    // holds every token its state read, past the prompt.
    let next: Vec<u32> = [
        prompt.clone(),
        ids_of(&a["choices"][0]),
        vec![byte_token(b'.')],
    ]
    .concat();
    let body = json!({"prompt": next, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let a = complete(&spec, body.clone()).await;
    let b = complete(&plain, body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let cached = a["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap() as usize;
    assert!(
        cached > prompt.len() && cached < next.len(),
        "resumed from {cached} of {} tokens (prompt {})",
        next.len(),
        prompt.len()
    );
}
