//! Test fixtures: a tiny random Liger model written as a real model folder (config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json) so the real loading path runs,
//! and helpers to call the router in-process.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use liger_model::testing::{random_weights, tiny_config, Family, TinyCheckpoint};
use liger_model::LigerConfig;
use liger_server::api::{router, ApiConfig, AppState};
use liger_server::metrics::Metrics;
use liger_server::settings::{Args, Settings};
use liger_server::text::{byte_encoder, CHATML};
use serde_json::{json, Value};
use tower::ServiceExt;

pub const MODEL: &str = "tiny-liger";
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then the 256 bytes, then the merges.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const IM_END: u32 = 2;
const MERGES: [(&str, &str); 5] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")];
pub const VOCAB: usize = 3 + 256 + MERGES.len();

/// The id of byte `b`.
pub fn byte_token(b: u8) -> u32 {
    3 + b as u32
}

/// A byte-level BPE tokenizer (GPT-2 byte alphabet) with ChatML special tokens.
pub fn tokenizer_json() -> Value {
    let enc = byte_encoder();
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for b in 0..=255u8 {
        vocab.insert(enc[&b].to_string(), json!(byte_token(b)));
    }
    for (i, (a, b)) in MERGES.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(259 + i));
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    })
}

/// Writes the tiny Liger model folder into `dir`.
pub fn write_model(dir: &Path) {
    write_model_with(
        dir,
        &LigerConfig {
            window: 4,
            ..Default::default()
        },
    );
}

/// The tiny test model (3 layers, head dim 8) converted with `liger`.
pub fn write_model_with(dir: &Path, liger: &LigerConfig) {
    let mut config = tiny_config(Family::Llama);
    config["vocab_size"] = json!(VOCAB);
    config["eos_token_id"] = json!(IM_END);
    config["bos_token_id"] = json!(1);
    let ckpt = TinyCheckpoint {
        tensors: random_weights(&config, 7).unwrap(),
        config,
    }
    .with_liger(liger);
    ckpt.write_folder(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let tok_config = json!({"chat_template": CHATML, "bos_token": null, "eos_token": "<|im_end|>"});
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
}

/// Settings for a model folder with small limits suitable for tests.
pub fn settings(dir: &Path, extra: impl FnOnce(&mut Args)) -> Settings {
    let mut args = Args {
        model: Some(dir.display().to_string()),
        served_model_name: Some(MODEL.into()),
        max_running: Some(8),
        max_waiting: Some(64),
        max_batch_tokens: Some(64),
        ..Default::default()
    };
    extra(&mut args);
    Settings::resolve(args).unwrap()
}

/// A router over a loaded tiny model (through the real loader and engine thread).
pub struct TestServer {
    pub app: Router,
    pub state: Arc<AppState>,
    pub metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

pub fn server(extra: impl FnOnce(&mut Args)) -> TestServer {
    server_for(write_model, extra)
}

/// A server over the model `write` puts in its folder.
pub fn server_for(write: impl FnOnce(&Path), extra: impl FnOnce(&mut Args)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let s = settings(dir.path(), extra);
    let metrics = Arc::new(Metrics::default());
    let state = AppState::new(
        ApiConfig {
            served_model_name: s.served_model_name.clone(),
            api_key: s.api_key.clone(),
            max_body_bytes: s.max_body_bytes,
        },
        metrics.clone(),
    );
    let ready = liger_server::loader::load_dir(dir.path(), &s, metrics.clone()).unwrap();
    state.set_ready(ready);
    TestServer {
        app: router(state.clone()),
        state,
        metrics,
        _dir: dir,
    }
}

pub fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// Sends a request; returns the status and the body parsed as JSON (or as a string).
pub async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

pub async fn post_json(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    send(app, post(path, &body)).await
}

pub async fn get(app: &Router, path: &str) -> (StatusCode, Value) {
    send(app, Request::get(path).body(Body::empty()).unwrap()).await
}

/// A streamed response: the `data:` payloads in order (the last should be `[DONE]`).
pub async fn post_stream(app: &Router, path: &str, body: Value) -> (StatusCode, Vec<String>) {
    let resp = app.clone().oneshot(post(path, &body)).await.unwrap();
    let status = resp.status();
    let mut stream = resp.into_body().into_data_stream();
    let mut raw = Vec::new();
    while let Some(chunk) = stream.next().await {
        raw.extend_from_slice(&chunk.unwrap());
    }
    (status, sse_data(&String::from_utf8(raw).unwrap()))
}

/// Splits an SSE body into its `data:` payloads, checking the framing on the way.
pub fn sse_data(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body must end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"));
            assert!(!data.contains('\n'), "one line per event");
            data.to_string()
        })
        .collect()
}

/// The JSON chunks of a stream, asserting it ends with `[DONE]`.
pub fn chunks(data: &[String]) -> Vec<Value> {
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "stream must end with [DONE]"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk is not JSON ({e}): {d}")))
        .collect()
}

/// Reads one sample from the server's /metrics.
pub async fn metric(app: &Router, name: &str) -> f64 {
    let (_, body) = get(app, "/metrics").await;
    liger_server::metrics::sample(body.as_str().unwrap(), name)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Waits until the metric reaches `want` (the engine updates gauges after each step).
pub async fn wait_metric(app: &Router, name: &str, want: f64) {
    for _ in 0..500 {
        if metric(app, name).await == want {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "{name} never reached {want} (now {})",
        metric(app, name).await
    );
}
