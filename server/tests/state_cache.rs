//! The conversation state cache: a request resumes from the longest cached prefix of its
//! prompt, and what it generates is exactly what it generates without the cache, for chat
//! turns, shared prefixes, n > 1, after eviction, and after a restart from disk.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use common::*;
use liger_model::config::{LigerConfig, Variant};
use liger_model::testing::count_files;
use liger_server::engine::{
    ChoiceCount, Engine, EngineOptions, Event, GenerationRequest, LocalEngine, SamplingParams,
    StateCacheOptions,
};
use liger_server::metrics::Metrics;
use liger_server::text::Codec;
use serde_json::{json, Value};

fn cached(resp: &Value) -> u64 {
    resp["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {resp}"))
}

/// Plays a scripted chat: each turn adds a user message and the model's greedy answer.
/// Returns (answer, prompt_tokens, cached_tokens) per turn.
async fn chat(s: &TestServer, turns: usize) -> Vec<(String, u64, u64)> {
    let mut messages = vec![json!({"role": "system", "content": "You answer briefly."})];
    let mut out = Vec::new();
    for t in 0..turns {
        messages
            .push(json!({"role": "user", "content": format!("Question number {t}: the weather?")}));
        let (status, resp) = post_json(
            &s.app,
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{resp}");
        let answer = resp["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        out.push((
            answer.clone(),
            resp["usage"]["prompt_tokens"].as_u64().unwrap(),
            cached(&resp),
        ));
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    out
}

#[tokio::test]
async fn chat_turns_resume_from_the_previous_turn_and_answer_the_same() {
    // A Liger model may run past its position embeddings (the tiny one has 256).
    let on = server(|a| a.max_model_len = Some(2048));
    let off = server(|a| {
        a.max_model_len = Some(2048);
        a.state_cache_mb = Some(0)
    });
    let with = chat(&on, 5).await;
    let without = chat(&off, 5).await;
    for (t, (a, b)) in with.iter().zip(&without).enumerate() {
        assert_eq!(a.0, b.0, "turn {t}: answers differ with the cache");
        assert_eq!(
            a.1, b.1,
            "turn {t}: prompt_tokens counts the whole prompt either way"
        );
        assert_eq!(b.2, 0, "no cache, nothing cached");
    }
    assert_eq!(with[0].2, 0, "the first turn has nothing to resume");
    for t in 1..with.len() {
        // At least the previous turn's prompt is reused; usually its answer too.
        assert!(
            with[t].2 >= with[t - 1].1 && with[t].2 < with[t].1,
            "turn {t}: cached {} of {} (previous prompt {})",
            with[t].2,
            with[t].1,
            with[t - 1].1
        );
    }
    assert_eq!(metric(&on.app, "liger_state_cache_hits_total").await, 4.0);
    assert_eq!(metric(&on.app, "liger_state_cache_misses_total").await, 1.0);
    let hit_tokens: u64 = with.iter().map(|t| t.2).sum();
    assert_eq!(
        metric(&on.app, "liger_state_cache_hit_tokens_total").await,
        hit_tokens as f64
    );
    assert!(metric(&on.app, "liger_state_cache_bytes").await > 0.0);
    assert_eq!(
        metric(&on.app, "liger_state_cache_write_failures_total").await,
        0.0
    );
}

fn header() -> Vec<u32> {
    (0..40)
        .map(|k| byte_token(b'a' + (k * 7 % 26) as u8))
        .collect()
}

#[tokio::test]
async fn shared_prefixes_and_n_choices_sample_the_same_with_the_cache() {
    shared_prefixes_and_n_choices(write_model).await;
}

/// The same for an inter-layer hybrid whose Liger layers are GSA: its states hold all
/// three kinds of memory (recurrent slots, window caches, and layer 1's growing KV cache),
/// and snapshots and n > 1 forks must carry every one.
#[tokio::test]
async fn a_gsa_hybrid_with_a_full_attention_layer_caches_and_forks_exactly() {
    let hybrid = |dir: &std::path::Path| {
        write_model_with(
            dir,
            &LigerConfig {
                variant: Variant::Gsa,
                slots: Some(4),
                window: 4,
                full_attention_layers: vec![1],
                ..Default::default()
            },
        )
    };
    shared_prefixes_and_n_choices(hybrid).await;
    let s = server_for(hybrid, |_| {});
    chat(&s, 2).await;
    let turn = chat(&s, 3).await;
    assert!(turn[2].2 > 0, "the third turn resumes a cached state");
}

/// The same for a Liger model with a global cache and sinks: snapshots, restarts and forks
/// carry the kept tokens and the window's saliences, so answers stay those without the cache.
#[tokio::test]
async fn a_global_cache_model_caches_and_forks_exactly() {
    let global = |dir: &std::path::Path| {
        write_model_with(
            dir,
            &LigerConfig {
                window: 4,
                global_cache: 3,
                sinks: 1,
                ..Default::default()
            },
        )
    };
    shared_prefixes_and_n_choices(global).await;
    let s = server_for(global, |_| {});
    chat(&s, 2).await;
    let turn = chat(&s, 3).await;
    assert!(turn[2].2 > 0, "the third turn resumes a cached state");
}

async fn shared_prefixes_and_n_choices(write: fn(&std::path::Path)) {
    let on = server_for(write, |_| {});
    let off = server_for(write, |a| a.state_cache_mb = Some(0));
    let mut results = Vec::new();
    for s in [&on, &off] {
        let mut per_server = Vec::new();
        for (i, tail) in ["xyz", "xyq", "hello there", "x", "xyq!"]
            .iter()
            .enumerate()
        {
            let prompt: Vec<u32> = header()
                .into_iter()
                .chain(tail.bytes().map(byte_token))
                .collect();
            // Seeded sampling with three choices: each choice's stream must not depend on
            // where its state came from.
            let (status, resp) = post_json(
                &s.app,
                "/v1/completions",
                json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "n": 3, "seed": 11 + i,
                       "temperature": 0.8, "ignore_eos": true}),
            )
            .await;
            assert_eq!(status, 200, "{resp}");
            let texts: Vec<String> = resp["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["text"].as_str().unwrap().to_string())
                .collect();
            per_server.push((texts, cached(&resp)));
        }
        results.push(per_server);
    }
    for (i, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
        assert_eq!(a.0, b.0, "request {i}: choices differ with the cache");
    }
    // Stored keys: whole prompts, finished choices, and the points where a prompt left
    // the stored keys ("header+xy" for the second, "header" for the third), which is
    // what lets the fourth resume from the shared header alone.
    let hits: Vec<u64> = results[0].iter().map(|r| r.1).collect();
    let h = header().len() as u64;
    assert_eq!(hits, [0, 0, 0, h, h + 3]);
}

/// An engine over the tiny model with the given cache.
fn engine(cache: StateCacheOptions) -> (LocalEngine, Arc<Metrics>, usize, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let model = liger_model::checkpoint::load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let one_state = model.state_spec().bytes_at(256);
    let codec = Arc::new(Codec::load(dir.path(), &[IM_END]).unwrap());
    let metrics = Arc::new(Metrics::default());
    let options = EngineOptions {
        max_running: 4,
        max_waiting: 16,
        max_batch_tokens: 16,
        step_target: None,
        start_wait: None,
        max_model_len: 256,
        state_cache: cache,
        speculative: Default::default(),
    };
    let e = LocalEngine::start(model, codec, options, metrics.clone()).unwrap();
    (e, metrics, one_state, dir)
}

/// Greedy tokens of one request, and how many prompt tokens it resumed.
async fn generate(e: &LocalEngine, prompt: Vec<u32>) -> (Vec<u32>, usize) {
    let mut rx = e
        .submit(GenerationRequest {
            id: "t".into(),
            prompt,
            n: ChoiceCount::ONE,
            sampling: SamplingParams::default()
                .with_temperature(0.0)
                .expect("in range"),
            max_tokens: 5,
            min_tokens: 0,
            stop: Vec::new(),
            ignore_eos: true,
            logprobs: None,
            prompt_logprobs: None,
            guide: None,
        })
        .unwrap();
    let (mut tokens, mut cached) = (Vec::new(), 0);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Cached(n) => cached = n,
            Event::Token { token, .. } => tokens.push(token),
            Event::Finished { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    (tokens, cached)
}

/// Four conversations, turns interleaved; each turn's prompt is the last prompt, its
/// answer, and a new message. Returns every answer and every cached count.
async fn conversations(e: &LocalEngine) -> Vec<(Vec<u32>, usize)> {
    let mut prompts: Vec<Vec<u32>> = (0..4)
        .map(|c| {
            (0..12)
                .map(|k| byte_token(b'a' + ((c * 5 + k) % 26) as u8))
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    for turn in 0..3 {
        for (c, p) in prompts.iter_mut().enumerate() {
            let (answer, cached) = generate(e, p.clone()).await;
            p.extend_from_slice(&answer);
            p.extend((0..4).map(|k| byte_token(b'A' + ((turn + c + k) % 26) as u8)));
            out.push((answer, cached));
        }
    }
    out
}

#[tokio::test]
async fn eviction_under_a_small_budget_changes_no_answer() {
    let (off, ..) = engine(StateCacheOptions::default());
    let want = conversations(&off).await;
    let (_, _, one_state, _d) = engine(StateCacheOptions::default());
    // Room for about two snapshots: most are evicted before their conversation returns.
    let (small, metrics, ..) = engine(StateCacheOptions {
        budget_bytes: 2 * one_state + one_state / 2,
        dir: None,
    });
    let got = conversations(&small).await;
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(a.0, b.0, "request {i}: answers differ under eviction");
    }
    assert!(
        metrics
            .state_cache_evictions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // The last conversation's next turn is always still cached.
    let (big, ..) = engine(StateCacheOptions {
        budget_bytes: 64 * one_state,
        dir: None,
    });
    let all = conversations(&big).await;
    for (i, (a, b)) in all.iter().zip(&want).enumerate() {
        assert_eq!(a.0, b.0, "request {i}: answers differ with the cache");
        if i >= 4 {
            // The whole previous prompt and answer (but the last token) are resumed.
            assert!(a.1 >= 12 + 4, "request {i} resumed only {}", a.1);
        }
    }
}

#[tokio::test]
async fn a_restarted_engine_resumes_from_the_state_dir() {
    let store = tempfile::tempdir().unwrap();
    let opts = StateCacheOptions {
        budget_bytes: 64 << 20,
        dir: Some(store.path().to_path_buf()),
    };
    let prompt: Vec<u32> = (0..20).map(|k| byte_token(b'a' + k as u8)).collect();
    let (first_answer, _) = {
        let (e, ..) = engine(opts.clone());
        generate(&e, prompt.clone()).await
    };
    // The writer thread finishes in the background; wait for the prompt's and the
    // answer's snapshots.
    for _ in 0..500 {
        if count_files(store.path(), "state") >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let next: Vec<u32> = [prompt.clone(), first_answer.clone(), vec![byte_token(b'!')]].concat();
    let (restarted, ..) = engine(opts);
    let (answer, cached) = generate(&restarted, next.clone()).await;
    assert_eq!(cached, prompt.len() + first_answer.len() - 1);
    let (off, ..) = engine(StateCacheOptions::default());
    assert_eq!(answer, generate(&off, next).await.0);
}
