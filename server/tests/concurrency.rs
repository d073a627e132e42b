//! Continuous batching keeps requests isolated: concurrent seeded requests produce exactly
//! what they produce alone, chunked prefill matches whole prefill, a client that goes away
//! gives its slot back, and a failing step fails only its requests.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use candle_core::{DType, Device};
use common::*;
use futures::StreamExt;
use liger_server::engine::{
    ChoiceCount, Engine, EngineError, EngineOptions, Event, EventReceiver, GenerationRequest,
    LocalEngine, SamplingParams,
};
use liger_server::error::ApiError;
use liger_server::metrics::Metrics;
use liger_server::text::Codec;
use serde_json::{json, Value};
use tower::ServiceExt;

fn ids(choice: &Value) -> Vec<u32> {
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

fn all_ids(resp: &Value) -> Vec<Vec<u32>> {
    resp["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect()
}

/// Prompts of many lengths (some longer than the 64-token budget, so they are prefilled in
/// chunks across steps while others decode).
fn request(i: usize) -> Value {
    let len = 3 + i * 7;
    let prompt: Vec<u32> = (0..len)
        .map(|k| byte_token(b'a' + ((i + k) % 26) as u8))
        .collect();
    json!({"prompt": prompt, "max_tokens": 12 + i % 5, "seed": 1000 + i, "temperature": 0.9, "top_p": 0.95,
        "n": if i.is_multiple_of(4) { 2 } else { 1 }, "ignore_eos": true, "logprobs": 0, "return_tokens_as_token_ids": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_requests_match_their_solo_runs() {
    let s = server(|a| {
        a.max_running = Some(8);
        a.max_batch_tokens = Some(64);
    });
    let mut solo = Vec::new();
    for i in 0..16 {
        let (status, resp) = post_json(&s.app, "/v1/completions", request(i)).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        solo.push(all_ids(&resp));
    }
    let futures = (0..16).map(|i| {
        let app = s.app.clone();
        tokio::spawn(async move { post_json(&app, "/v1/completions", request(i)).await })
    });
    let together: Vec<Vec<Vec<u32>>> = futures::future::join_all(futures)
        .await
        .into_iter()
        .map(|r| {
            let (status, resp) = r.unwrap();
            assert_eq!(status, StatusCode::OK, "{resp}");
            all_ids(&resp)
        })
        .collect();
    for i in 0..16 {
        assert_eq!(
            together[i], solo[i],
            "request {i} changed when batched with others"
        );
    }
    let steps = metric(&s.app, "liger_engine_steps_total").await;
    let generated = metric(&s.app, "liger_generation_tokens_total").await;
    assert!(
        steps < generated,
        "batching: fewer steps ({steps}) than generated tokens ({generated})"
    );
    wait_metric(&s.app, "liger_state_pool_slots_in_use", 0.0).await;
}

#[tokio::test]
async fn chunked_prefill_matches_whole_prefill() {
    let small = server(|a| a.max_batch_tokens = Some(16));
    let big = server(|a| a.max_batch_tokens = Some(512));
    let prompt: Vec<u32> = (0..120)
        .map(|k| byte_token(b'a' + (k * 7 % 26) as u8))
        .collect();
    let body = json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "echo": true, "logprobs": 1,
        "ignore_eos": true, "return_tokens_as_token_ids": true});
    let (_, a) = post_json(&small.app, "/v1/completions", body.clone()).await;
    let (_, b) = post_json(&big.app, "/v1/completions", body).await;
    assert_eq!(ids(&a["choices"][0]), ids(&b["choices"][0]));
    let lps = |r: &Value| -> Vec<f64> {
        r["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()[1..]
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    for (x, y) in lps(&a).iter().zip(lps(&b)) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    let s = server(|_| {});
    let body = json!({"prompt": "a", "max_tokens": 250, "ignore_eos": true, "stream": true});
    let resp = s
        .app
        .clone()
        .oneshot(post("/v1/completions", &body))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.into_body().into_data_stream();
    // Past the Liger window (4) the state no longer grows: the pool holds exactly one
    // constant-size state however long the context gets.
    for _ in 0..12 {
        stream.next().await.unwrap().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let spec = liger_model::checkpoint::load_model(dir.path(), DType::F32, &Device::Cpu)
        .unwrap()
        .state_spec()
        .clone();
    assert_eq!(spec.bytes_at(10), spec.bytes_at(1_000_000));
    assert_eq!(
        metric(&s.app, "liger_state_pool_bytes").await,
        spec.bytes_at(1_000_000) as f64
    );
    let by_kind = spec.bytes_by_kind_at(1_000_000);
    for (kind, want) in [
        ("recurrent", by_kind.recurrent),
        ("window", by_kind.window),
        ("global", by_kind.global),
        ("kv_cache", by_kind.kv_cache),
    ] {
        let name = format!("liger_state_pool_bytes_by_kind{{kind=\"{kind}\"}}");
        assert_eq!(metric(&s.app, &name).await, want as f64, "{name}");
    }
    assert_eq!(metric(&s.app, "liger_running_sequences").await, 1.0);
    assert_eq!(metric(&s.app, "liger_cancelled_requests_total").await, 0.0);
    drop(stream);
    wait_metric(&s.app, "liger_cancelled_requests_total", 1.0).await;
    wait_metric(&s.app, "liger_running_sequences", 0.0).await;
    wait_metric(&s.app, "liger_state_pool_slots_in_use", 0.0).await;
    wait_metric(&s.app, "liger_state_pool_bytes", 0.0).await;

    // A non-streaming client that gives up is cancelled too.
    let body = json!({"prompt": "a", "max_tokens": 250, "ignore_eos": true});
    let app = s.app.clone();
    let call = tokio::spawn(async move { post_json(&app, "/v1/completions", body).await });
    wait_metric(&s.app, "liger_running_sequences", 1.0).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    wait_metric(&s.app, "liger_cancelled_requests_total", 2.0).await;
    wait_metric(&s.app, "liger_state_pool_slots_in_use", 0.0).await;
}

#[tokio::test]
async fn a_full_queue_answers_429() {
    let s = server(|a| {
        a.max_running = Some(1);
        a.max_waiting = Some(1);
    });
    let long = json!({"prompt": "a", "max_tokens": 250, "ignore_eos": true, "stream": true});
    // One request runs, one waits; the third finds the queue full.
    let r1 = s
        .app
        .clone()
        .oneshot(post("/v1/completions", &long))
        .await
        .unwrap();
    let mut s1 = r1.into_body().into_data_stream();
    s1.next().await.unwrap().unwrap();
    wait_metric(&s.app, "liger_running_sequences", 1.0).await;
    let r2 = s
        .app
        .clone()
        .oneshot(post("/v1/completions", &long))
        .await
        .unwrap();
    assert_eq!(r2.status(), StatusCode::OK);
    let (status, body) = post_json(&s.app, "/v1/completions", json!({"prompt": "a"})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    drop(s1);
    drop(r2);
    wait_metric(&s.app, "liger_state_pool_slots_in_use", 0.0).await;
    wait_metric(&s.app, "liger_waiting_requests", 0.0).await;
    let (status, _) = post_json(
        &s.app,
        "/v1/completions",
        json!({"prompt": "a", "max_tokens": 2}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "serving again once the queue drains"
    );
}

/// The real engine on the tiny test model, with `max_running` slots and a context of
/// `max_model_len`.
fn tiny_engine(max_running: usize, max_model_len: usize) -> (LocalEngine, Arc<Metrics>) {
    tiny_engine_with(|o| {
        o.max_running = max_running;
        o.max_model_len = max_model_len;
    })
}

/// [`tiny_engine`] with options of the caller's choosing (from 4 slots, a 256-token context).
fn tiny_engine_with(options: impl FnOnce(&mut EngineOptions)) -> (LocalEngine, Arc<Metrics>) {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let model = liger_model::checkpoint::load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let codec = Arc::new(Codec::load(dir.path(), &[IM_END]).unwrap());
    let metrics = Arc::new(Metrics::default());
    let mut o = EngineOptions {
        max_running: 4,
        max_waiting: 8,
        max_batch_tokens: 64,
        step_target: None,
        start_wait: None,
        max_model_len: 256,
        state_cache: Default::default(),
        speculative: Default::default(),
    };
    options(&mut o);
    let engine = LocalEngine::start(model, codec, o, metrics.clone()).unwrap();
    (engine, metrics)
}

/// Tokens a one-choice request's events carry before it finishes (anything else fails).
async fn tokens_until_finished(events: &mut EventReceiver) -> usize {
    let mut tokens = 0;
    while let Some(e) = events.recv().await {
        match e {
            Event::Token { .. } => tokens += 1,
            Event::Finished { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    tokens
}

/// `max_tokens` seeded samples of `prompt`, past end-of-sequence tokens.
fn generation(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        id: "t".into(),
        prompt,
        n: ChoiceCount::ONE,
        sampling: SamplingParams::default().with_seed(1),
        max_tokens,
        min_tokens: 0,
        stop: Vec::new(),
        ignore_eos: true,
        logprobs: None,
        prompt_logprobs: None,
        guide: None,
    }
}

#[tokio::test]
async fn a_failing_step_fails_its_requests_and_the_engine_keeps_serving() {
    let (engine, metrics) = tiny_engine(4, 256);
    // Bypasses the HTTP validation: an out-of-vocabulary id makes the forward pass fail.
    let mut bad = engine
        .submit(generation(vec![5, VOCAB as u32 + 3], 3))
        .unwrap();
    match bad.recv().await {
        Some(Event::Failed(e)) => assert!(e.to_string().contains("out of range"), "{e}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(bad.recv().await.is_none(), "nothing after the failure");
    let mut good = engine.submit(generation(vec![5, 6, 7], 3)).unwrap();
    assert_eq!(tokens_until_finished(&mut good).await, 3);
    assert_eq!(
        metrics
            .step_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn after_the_grace_period_requests_in_flight_and_queued_fail_cleanly() {
    let (engine, _) = tiny_engine(1, 100_000);
    let request = || generation(vec![5, 6, 7], 50_000);
    // One long generation running, one waiting for its slot.
    let mut running = engine.submit(request()).unwrap();
    let mut queued = engine.submit(request()).unwrap();
    assert!(matches!(running.recv().await, Some(Event::Token { .. })));
    engine.shut_down();
    for (name, rx) in [("running", &mut running), ("queued", &mut queued)] {
        let last = loop {
            match rx.recv().await {
                Some(Event::Token { .. }) => continue,
                other => break other,
            }
        };
        assert!(
            matches!(last, Some(Event::Failed(EngineError::ShuttingDown))),
            "{name}: {last:?}"
        );
        assert!(
            rx.recv().await.is_none(),
            "{name}: nothing after the failure"
        );
    }
    assert!(matches!(
        engine.submit(request()),
        Err(EngineError::ShuttingDown)
    ));
    // What the HTTP layer answers: 503, OpenAI-shaped.
    let api = ApiError::from(EngineError::ShuttingDown);
    assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.body()["error"]["code"], "shutting_down");
}

#[tokio::test]
async fn streams_whose_prompts_are_read_together_start_together() {
    // Two short prompts read in the first step, and a long one read 16 tokens a step
    // after them.
    let (engine, metrics) = tiny_engine_with(|o| {
        o.max_batch_tokens = 16;
        o.max_model_len = 2048;
        o.start_wait = Some(std::time::Duration::from_secs(600));
    });
    let long: Vec<u32> = (0..1500).map(|k| 5 + (k % 40) as u32).collect();
    let mut streams = Vec::new();
    for p in [vec![5, 6, 7], vec![8, 9, 10], long] {
        streams.push(engine.submit(generation(p, 4)).unwrap());
    }
    for s in &mut streams {
        assert_eq!(tokens_until_finished(s).await, 4);
    }
    // The short ones waited for the long prompt: no step decoded beside a prompt chunk
    // (starting at once, they decode beside its chunks; with `start_wait: None` this
    // test fails).
    let mixed = metrics
        .mixed_steps
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(mixed, 0);
}
