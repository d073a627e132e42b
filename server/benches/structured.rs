//! What structured output costs: decode tokens/s with and without a JSON schema, at 1 and 8
//! concurrent streams, on the SmolLM2-135M-Instruct fixture as Liger-GLA (the engine the
//! server uses, without HTTP).
//!
//! ```text
//! cargo bench -p liger-server --bench structured -- [--streams 1,8] [--tokens 64] [--rounds 3]
//! ```
//!
//! Free streams generate `--tokens` tokens past end-of-sequence; constrained ones follow a
//! schema that cannot end sooner (an array of 40 short strings), so both decode the same
//! number of tokens. Runs alternate (free, constrained) for `--rounds` rounds; the table
//! gives the medians and their ratio, from one run on one machine.

mod common;

use std::time::Instant;

use liger_server::engine::{
    ChoiceCount, Engine, EngineOptions, Event, GenerationRequest, LocalEngine, SamplingParams,
    StateCacheOptions,
};
use liger_server::text::grammar::{GrammarSpec, Grammars};
use serde_json::json;

struct Args {
    streams: Vec<usize>,
    tokens: usize,
    rounds: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        streams: vec![1, 8],
        tokens: 64,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--streams" => {
                a.streams = val()
                    .split(',')
                    .map(|s| s.parse().expect("a number"))
                    .collect()
            }
            "--tokens" => a.tokens = val().parse().expect("a number"),
            "--rounds" => a.rounds = val().parse().expect("a number"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Aggregate decode tokens/s of `streams` concurrent requests: each stream's tokens after
/// its first, over the time from its first token to its last, summed over streams.
async fn run(engine: &LocalEngine, reqs: Vec<GenerationRequest>, tokens: usize) -> f64 {
    let mut rxs = Vec::new();
    for r in reqs {
        rxs.push(engine.submit(r).expect("submitted"));
    }
    let mut tasks = Vec::new();
    for mut rx in rxs {
        tasks.push(tokio::spawn(async move {
            let (mut first, mut last, mut n) = (None, Instant::now(), 0usize);
            while let Some(e) = rx.recv().await {
                match e {
                    Event::Token { .. } => {
                        n += 1;
                        last = Instant::now();
                        first.get_or_insert(last);
                    }
                    Event::Failed(e) => panic!("{e}"),
                    _ => {}
                }
            }
            assert_eq!(n, tokens, "every stream decodes the same number of tokens");
            (n - 1) as f64 / (last - first.expect("tokens")).as_secs_f64()
        }));
    }
    let mut total = 0.0;
    for t in tasks {
        total += t.await.expect("stream task");
    }
    total
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let threads = liger_model::threads::init(None);
    let args = parse_args();
    let (model, codec) = common::smollm2_liger();
    let grammars = Grammars::new(codec.clone(), model.config().vocab_size).expect("grammars");
    let schema = GrammarSpec::JsonSchema(json!({
        "type": "object", "additionalProperties": false, "required": ["items"],
        "properties": {"items": {"type": "array", "minItems": 40, "maxItems": 40,
                                 "items": {"type": "string", "maxLength": 12}}}
    }));
    let prompt = codec
        .encode_chat(&[liger_server::text::ChatMessage::new(
            "user",
            "List forty fruits as JSON.",
        )])
        .expect("prompt");
    eprintln!(
        "SmolLM2-135M-Instruct as Liger-GLA, f32, {threads} threads; {} tokens per stream, {} rounds",
        args.tokens, args.rounds
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let max = *args.streams.iter().max().unwrap_or(&1);
    let engine = common::engine(
        &model,
        &codec,
        EngineOptions {
            max_running: max,
            max_waiting: max,
            max_batch_tokens: 512,
            step_target: None,
            start_wait: None,
            max_model_len: 4096,
            state_cache: StateCacheOptions {
                budget_bytes: 0,
                dir: None,
            },
            speculative: Default::default(),
        },
    );
    let request = |i: usize, constrained: bool| GenerationRequest {
        id: format!("bench-{i}"),
        prompt: prompt.clone(),
        n: ChoiceCount::ONE,
        sampling: SamplingParams::default()
            .with_temperature(0.7)
            .expect("in range")
            .with_seed(i as u64),
        max_tokens: args.tokens,
        min_tokens: 0,
        stop: Vec::new(),
        ignore_eos: !constrained,
        logprobs: None,
        prompt_logprobs: None,
        guide: constrained.then(|| grammars.compile(&schema).expect("schema compiles")),
    };
    println!("| streams | decode tok/s, free | with a JSON schema | ratio |");
    println!("|---:|---:|---:|---:|");
    for &streams in &args.streams {
        let (mut free, mut guided) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            for constrained in [false, true] {
                let reqs = (0..streams)
                    .map(|i| request(round * streams + i, constrained))
                    .collect();
                let rate = rt.block_on(run(&engine, reqs, args.tokens));
                eprintln!(
                    "streams {streams}, round {round}, {}: {rate:.1} tok/s",
                    if constrained { "schema" } else { "free" }
                );
                if constrained {
                    guided.push(rate)
                } else {
                    free.push(rate)
                }
            }
        }
        let (f, g) = (median(free), median(guided));
        println!("| {streams} | {f:.1} | {g:.1} | {:.3} |", g / f);
    }
}
