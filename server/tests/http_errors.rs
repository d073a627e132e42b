//! The HTTP layer against a scripted mock engine: every error code and its OpenAI body,
//! auth, loading state, request validation reaching the engine, and the stream framing.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::*;
use liger_server::api::{router, ApiConfig, AppState, Limits, Ready};
use liger_server::engine::{
    Engine, EngineError, Event, EventReceiver, FinishReason, GenerationRequest,
};
use liger_server::metrics::Metrics;
use liger_server::text::grammar::Grammars;
use liger_server::text::Codec;
use serde_json::{json, Value};

/// Answers every choice with "hi" (two tokens), or refuses as overloaded, or (cut short)
/// stops after the first token as a dying engine would.
#[derive(Default)]
struct Mock {
    overloaded: bool,
    cut_short: bool,
    seen: Mutex<Vec<GenerationRequest>>,
}

impl Engine for Mock {
    fn submit(&self, req: GenerationRequest) -> Result<EventReceiver, EngineError> {
        if self.overloaded {
            return Err(EngineError::Overloaded(3));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for choice in 0..req.n.get() {
            for (b, text) in [(b'h', "h"), (b'i', "i")] {
                let token = byte_token(b);
                tx.send(Event::Token {
                    choice,
                    token,
                    text: text.into(),
                    logprob: None,
                })
                .unwrap();
                if self.cut_short {
                    return Ok(rx);
                }
            }
            tx.send(Event::Finished {
                choice,
                reason: FinishReason::Length,
                text: String::new(),
            })
            .unwrap();
        }
        self.seen.lock().unwrap().push(req);
        Ok(rx)
    }
}

struct Fixture {
    app: axum::Router,
    state: Arc<AppState>,
    mock: Arc<Mock>,
    codec: Arc<Codec>,
    _dir: tempfile::TempDir,
}

fn fixture(api_key: Option<&str>, overloaded: bool, ready: bool) -> Fixture {
    fixture_with(
        api_key,
        ready,
        Mock {
            overloaded,
            ..Default::default()
        },
    )
}

fn fixture_with(api_key: Option<&str>, ready: bool, mock: Mock) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let codec = Arc::new(Codec::load(dir.path(), &[IM_END]).unwrap());
    let mock = Arc::new(mock);
    let state = AppState::new(
        ApiConfig {
            served_model_name: MODEL.into(),
            api_key: api_key.map(str::to_string),
            max_body_bytes: 4096,
        },
        Arc::new(Metrics::default()),
    );
    if ready {
        state.set_ready(Ready {
            engine: mock.clone(),
            codec: codec.clone(),
            grammars: Arc::new(Grammars::new(codec.clone(), VOCAB).unwrap()),
            limits: Limits {
                max_model_len: 100,
                vocab_size: VOCAB,
                max_n: 4,
            },
        });
    }
    Fixture {
        app: router(state.clone()),
        state,
        mock,
        codec,
        _dir: dir,
    }
}

fn chat_body() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}]})
}

fn assert_openai_error(body: &Value, code: Option<&str>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some(), "{body}");
    assert_eq!(e["code"].as_str(), code, "{body}");
}

#[tokio::test]
async fn health_is_503_until_the_model_is_ready() {
    let f = fixture(None, false, false);
    let (status, body) = get(&f.app, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_openai_error(&body, Some("model_loading"));
    let (status, _) = post_json(&f.app, "/v1/chat/completions", chat_body()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = get(&f.app, "/v1/models").await;
    assert_eq!(status, StatusCode::OK, "models are listed while loading");
    assert_eq!(body["data"][0]["id"], MODEL);

    f.state.set_ready(Ready {
        engine: f.mock.clone(),
        codec: f.codec.clone(),
        grammars: Arc::new(Grammars::new(f.codec.clone(), VOCAB).unwrap()),
        limits: Limits {
            max_model_len: 100,
            vocab_size: VOCAB,
            max_n: 4,
        },
    });
    assert_eq!(get(&f.app, "/health").await.0, StatusCode::OK);
    assert_eq!(
        post_json(&f.app, "/v1/chat/completions", chat_body())
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn api_key_is_required_on_v1_only() {
    let f = fixture(Some("sekret"), false, true);
    let with = |key: Option<&str>| {
        let mut r =
            Request::post("/v1/chat/completions").header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header(header::AUTHORIZATION, k);
        }
        r.body(Body::from(chat_body().to_string())).unwrap()
    };
    for bad in [
        None,
        Some("Bearer nope"),
        Some("sekret"),
        Some("Bearer sekret2"),
    ] {
        let (status, body) = send(&f.app, with(bad)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad:?}");
        assert_openai_error(&body, Some("invalid_api_key"));
    }
    assert_eq!(
        send(&f.app, with(Some("Bearer sekret"))).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&f.app, "/health").await.0,
        StatusCode::OK,
        "probes need no key"
    );
    assert_eq!(get(&f.app, "/metrics").await.0, StatusCode::OK);
}

#[tokio::test]
async fn unknown_model_and_route_are_404_in_openai_format() {
    let f = fixture(None, false, true);
    let mut body = chat_body();
    body["model"] = json!("gpt-4");
    let (status, resp) = post_json(&f.app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&resp, Some("model_not_found"));
    assert_eq!(resp["error"]["param"], "model");

    let (status, resp) = get(&f.app, "/v1/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&resp, Some("not_found"));
    assert_eq!(
        get(&f.app, "/v1/models/other").await.0,
        StatusCode::NOT_FOUND
    );
    let (status, card) = get(&f.app, &format!("/v1/models/{MODEL}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(card["max_model_len"], 100);
}

#[tokio::test]
async fn wrong_method_is_405_in_openai_format() {
    let f = fixture(None, false, true);
    let (status, body) = get(&f.app, "/v1/chat/completions").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_openai_error(&body, Some("method_not_allowed"));
    let (status, _) = post_json(&f.app, "/v1/models", json!({})).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let f = fixture(None, false, true);
    let mut body = chat_body();
    body["messages"][0]["content"] = json!("x".repeat(5000));
    let (status, resp) = post_json(&f.app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_openai_error(&resp, Some("request_too_large"));
}

#[tokio::test]
async fn malformed_requests_are_400_naming_the_parameter() {
    let f = fixture(None, false, true);
    let raw = |text: &str| {
        Request::post("/v1/completions")
            .header("content-type", "application/json")
            .body(Body::from(text.to_string()))
            .unwrap()
    };
    for text in ["{not json", "[1, 2]", ""] {
        let (status, body) = send(&f.app, raw(text)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_openai_error(&body, None);
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let cases = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "warm"}),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 500}),
            "max_tokens",
        ),
        ("/v1/completions", json!({"prompt": [1, 99999]}), "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "x".repeat(300)}),
            "prompt",
        ),
        ("/v1/completions", json!({"prompt": "x", "n": 9}), "n"),
        (
            "/v1/completions",
            json!({"prompt": "x", "stop": ["a", 1]}),
            "stop",
        ),
    ];
    for (path, body, param) in cases {
        let (status, resp) = post_json(&f.app, path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(resp["error"]["param"], param, "{resp}");
    }
    assert!(
        f.mock.seen.lock().unwrap().is_empty(),
        "nothing invalid reaches the engine"
    );
}

#[tokio::test]
async fn overload_is_429_with_retry_after() {
    let f = fixture(None, true, true);
    let resp =
        tower::ServiceExt::oneshot(f.app.clone(), post("/v1/chat/completions", &chat_body()))
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_openai_error(
        &serde_json::from_slice(&bytes).unwrap(),
        Some("rate_limit_exceeded"),
    );
}

#[tokio::test]
async fn the_engine_gets_a_validated_request() {
    let f = fixture(None, false, true);
    let body = json!({"model": MODEL, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        "stop": "zz", "seed": 5, "top_k": -1, "min_tokens": 2, "ignore_eos": true, "logit_bias": {"7": -100}});
    let (status, resp) = post_json(&f.app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let seen = f.mock.seen.lock().unwrap().pop().unwrap();
    let rendered = f.codec.decode_ids(&seen.prompt, false);
    assert_eq!(
        rendered,
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(seen.prompt[0], 1, "<|im_start|> is one special token");
    assert_eq!(
        seen.max_tokens,
        100 - seen.prompt.len(),
        "chat defaults to the rest of the context"
    );
    assert_eq!(seen.stop, vec!["zz"]);
    assert_eq!(seen.sampling.seed(), Some(5));
    assert_eq!(seen.sampling.top_k(), 0);
    assert_eq!(seen.sampling.logit_bias(), vec![(7, -100.0)]);
    assert!(seen.ignore_eos && seen.min_tokens == 2);

    let (_, resp) = post_json(&f.app, "/v1/completions", json!({"prompt": "abc"})).await;
    let seen = f.mock.seen.lock().unwrap().pop().unwrap();
    assert_eq!(seen.max_tokens, 16, "completions default to 16 tokens");
    assert_eq!(resp["choices"][0]["text"], "hi");
}

#[tokio::test]
async fn mock_stream_has_openai_framing() {
    let f = fixture(None, false, true);
    let mut body = chat_body();
    body["stream"] = json!(true);
    body["n"] = json!(2);
    body["stream_options"] = json!({"include_usage": true});
    let (status, data) = post_stream(&f.app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK);
    let chunks = common::chunks(&data);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
    for i in 0..2 {
        let text: String = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().iter())
            .filter(|c| c["index"] == i)
            .filter_map(|c| c["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "hi");
        let finishes = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().iter())
            .filter(|c| c["index"] == i && c["finish_reason"] == "length")
            .count();
        assert_eq!(finishes, 1);
    }
}

#[tokio::test]
async fn requests_are_counted_by_endpoint_and_status() {
    let f = fixture(None, false, true);
    post_json(&f.app, "/v1/chat/completions", chat_body()).await;
    post_json(&f.app, "/v1/chat/completions", json!({"messages": []})).await;
    get(&f.app, "/nope").await;
    let (_, text) = get(&f.app, "/metrics").await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("liger_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("liger_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("liger_requests_total{endpoint=\"unmatched\",status=\"404\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_request_cut_short_by_the_engine_is_an_error_not_a_silent_end() {
    let f = fixture_with(
        None,
        true,
        Mock {
            cut_short: true,
            ..Default::default()
        },
    );
    let (status, body) = post_json(&f.app, "/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_openai_error(&body, Some("internal_error"));
    let (status, data) = post_stream(
        &f.app,
        "/v1/completions",
        json!({"prompt": "x", "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the stream had started");
    let chunks = common::chunks(&data);
    assert_eq!(chunks[0]["choices"][0]["text"], "h");
    assert_openai_error(chunks.last().unwrap(), Some("internal_error"));
}
