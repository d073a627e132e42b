//! Time to first token along a scripted chat, with the conversation state cache on and off,
//! on the SmolLM2-135M-Instruct fixture converted to Liger-GLA (the engine and tokenizer the
//! server uses, without HTTP).
//!
//! ```text
//! cargo bench -p liger-server --bench state_cache -- [--turns 20] [--max-tokens 32]
//! ```
//!
//! Each turn appends a user message to the conversation, renders it with the chat template
//! and asks for a greedy answer, which is appended for the next turn. Both runs see the same
//! transcript (the cache changes no answer; checked here). Figures from one run, same
//! machine: compare the ratio.

mod common;

use std::time::{Duration, Instant};

use liger_server::engine::{
    ChoiceCount, Engine, EngineOptions, Event, GenerationRequest, LocalEngine, SamplingParams,
    StateCacheOptions,
};
use liger_server::text::ChatMessage;
use liger_server::text::Codec;

const QUESTIONS: &[&str] = &[
    "What is the capital of France?",
    "And what river flows through it?",
    "Name a famous museum there.",
    "What is its most famous painting?",
    "Who painted it?",
    "When did he live?",
    "What else did he invent or design?",
    "Which of those is the most famous?",
    "Tell me one fact about flight.",
    "What is gravity?",
    "Who described it first?",
    "What is an apple?",
    "Name three fruits.",
    "Which one has the most vitamin C?",
    "What is vitamin C good for?",
    "How much water should a person drink?",
    "What is the boiling point of water?",
    "And the freezing point?",
    "What is ice?",
    "Thank you. Summarize our talk in one sentence.",
];

struct Turn {
    ttft: Duration,
    prompt_tokens: usize,
    cached: usize,
    answer: Vec<u32>,
}

fn parse_args() -> (usize, usize) {
    let (mut turns, mut max_tokens) = (20, 32);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .parse::<usize>()
                .expect("a number")
        };
        match flag.as_str() {
            "--turns" => turns = val().min(QUESTIONS.len()),
            "--max-tokens" => max_tokens = val(),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    (turns, max_tokens)
}

async fn conversation(
    engine: &LocalEngine,
    codec: &Codec,
    turns: usize,
    max_tokens: usize,
) -> Vec<Turn> {
    let mut messages: Vec<ChatMessage> = Vec::new();
    let mut out = Vec::new();
    for q in &QUESTIONS[..turns] {
        messages.push(ChatMessage {
            tool_calls: Vec::new(),
            tool_call_id: None,
            role: "user".into(),
            content: (*q).into(),
        });
        let prompt = codec.encode_chat(&messages).expect("template");
        let started = Instant::now();
        let mut rx = engine
            .submit(GenerationRequest {
                id: "bench".into(),
                prompt: prompt.clone(),
                n: ChoiceCount::ONE,
                sampling: SamplingParams::default()
                    .with_temperature(0.0)
                    .expect("in range"),
                max_tokens,
                min_tokens: 0,
                stop: Vec::new(),
                ignore_eos: false,
                logprobs: None,
                prompt_logprobs: None,
                guide: None,
            })
            .expect("submit");
        let (mut ttft, mut cached, mut answer, mut text) = (None, 0, Vec::new(), String::new());
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Cached(n) => cached = n,
                Event::Token { token, text: t, .. } => {
                    ttft.get_or_insert_with(|| started.elapsed());
                    answer.push(token);
                    text.push_str(&t);
                }
                Event::Finished { text: t, .. } => {
                    text.push_str(&t);
                    break;
                }
                Event::Failed(e) => panic!("{e}"),
                Event::Prompt(_) => {}
            }
        }
        messages.push(ChatMessage {
            tool_calls: Vec::new(),
            tool_call_id: None,
            role: "assistant".into(),
            content: text,
        });
        out.push(Turn {
            ttft: ttft.expect("a token"),
            prompt_tokens: prompt.len(),
            cached,
            answer,
        });
    }
    out
}

fn main() {
    let threads = liger_model::threads::init(None);
    let (turns, max_tokens) = parse_args();
    let (model, codec) = common::smollm2_liger();
    eprintln!("SmolLM2-135M-Instruct as Liger-GLA, f32, {threads} threads, {turns} turns, answers of up to {max_tokens} tokens");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut runs = Vec::new();
    for budget in [0usize, 512 << 20] {
        let options = EngineOptions {
            max_running: 4,
            max_waiting: 4,
            max_batch_tokens: 512,
            step_target: None,
            start_wait: None,
            max_model_len: 32768,
            state_cache: StateCacheOptions {
                budget_bytes: budget,
                dir: None,
            },
            speculative: Default::default(),
        };
        let engine = common::engine(&model, &codec, options);
        let run = rt.block_on(conversation(&engine, &codec, turns, max_tokens));
        for (i, t) in run.iter().enumerate() {
            eprintln!(
                "cache {:>3}: turn {:>2}: prompt {:>5} tokens, cached {:>5}, ttft {:>8.1} ms",
                if budget > 0 { "on" } else { "off" },
                i + 1,
                t.prompt_tokens,
                t.cached,
                t.ttft.as_secs_f64() * 1e3
            );
        }
        runs.push(run);
    }
    let (off, on) = (&runs[0], &runs[1]);
    for (i, (a, b)) in off.iter().zip(on).enumerate() {
        assert_eq!(
            a.answer,
            b.answer,
            "turn {}: the cache changed the answer",
            i + 1
        );
    }
    println!(
        "| turn | prompt tokens | cached tokens | TTFT cache off | TTFT cache on | speed-up |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for i in [1usize, 5, 10, 20].into_iter().filter(|&i| i <= turns) {
        let (a, b) = (&off[i - 1], &on[i - 1]);
        println!(
            "| {i} | {} | {} | {:.0} ms | {:.0} ms | {:.1}x |",
            a.prompt_tokens,
            b.cached,
            a.ttft.as_secs_f64() * 1e3,
            b.ttft.as_secs_f64() * 1e3,
            a.ttft.as_secs_f64() / b.ttft.as_secs_f64()
        );
    }
}
