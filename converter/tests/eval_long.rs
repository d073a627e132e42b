//! `eval` past the window, on tiny random models: scoring chunks in segments that carry
//! their state gives the one-forward numbers (Liger and Transformer models, every context
//! bucket), pass-key prompts have the asked length and depth and are answered by model and
//! reference (the reference only within its context), `--loops` counts looping answers of
//! both, and the new flags fail on one line.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use liger_converter::eval::passkey::PromptBuilder;
use liger_converter::eval::{loops, ContextBucket, EvalReport, LoopsOptions, PasskeyOptions};
use liger_converter::{EvalOptions, Progress};
use liger_model::testing::{Family, TinyCheckpoint};
use liger_model::LigerConfig;
use serde_json::json;

/// Writes a tiny model of `family` (converted with `liger` when given) with the tokenizer.
fn tiny(dir: &Path, family: Family, liger: Option<LigerConfig>) -> PathBuf {
    single_threaded();
    let mut ck = TinyCheckpoint::new(family, 5).unwrap();
    if let Some(l) = liger {
        ck = ck.with_liger(&l);
    }
    ck.write_folder(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    dir.to_owned()
}

/// A tiny Llama and its Liger conversion with an 8-token window.
fn liger_pair(root: &Path) -> (PathBuf, PathBuf) {
    let liger = LigerConfig {
        window: 8,
        ..Default::default()
    };
    (
        tiny(&root.join("llama"), Family::Llama, None),
        tiny(&root.join("liger"), Family::Llama, Some(liger)),
    )
}

/// About 1,000 characters (tokens) of text.
fn text_file(root: &Path) -> PathBuf {
    let p = root.join("long.txt");
    let text = "the quick brown fox jumps over the lazy dog. a cat sat on the mat, and the \
        dog ran off!\nwe test small models with short text: it is fast, and it is enough.\n";
    std::fs::write(&p, text.repeat(6)).unwrap();
    p
}

fn eval(model: &Path, reference: &Path, data: &Path, seq_len: usize, segment: usize) -> EvalReport {
    let mut e = EvalOptions::new(model, vec![data.to_owned()]);
    e.reference = Some(reference.to_owned());
    e.seq_len = seq_len;
    e.batch = 3;
    e.segment = segment;
    liger_converter::evaluate(&e, &Progress::hidden()).unwrap()
}

/// Asserts `a` and `b` agree to `1e-5` relative.
fn assert_close(what: &str, a: f64, b: f64) {
    assert!(
        (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
        "{what}: {a} segmented, {b} in one forward"
    );
}

fn assert_same_report(seg: &EvalReport, one: &EvalReport, segment: usize) {
    let at = |what: &str| format!("segment {segment}: {what}");
    assert_eq!((seg.tokens, seg.chunks), (one.tokens, one.chunks));
    assert_close(&at("nll"), seg.model.nll, one.model.nll);
    let (rs, ro) = (seg.reference.as_ref(), one.reference.as_ref());
    assert_close(&at("reference nll"), rs.unwrap().nll, ro.unwrap().nll);
    let pairs = [
        ("ratio", seg.perplexity_ratio, one.perplexity_ratio),
        ("agreement", seg.agreement, one.agreement),
        ("KL", seg.kl, one.kl),
    ];
    for (what, a, b) in pairs {
        assert_close(&at(what), a.unwrap(), b.unwrap());
    }
    assert_eq!(seg.by_context.len(), one.by_context.len());
    for (a, b) in seg.by_context.iter().zip(&one.by_context) {
        assert_eq!((a.from, a.to, a.tokens), (b.from, b.to, b.tokens));
        let name = |m: &str| at(&format!("{m} at {}-{}", a.from, a.to));
        let get = |c: &ContextBucket| {
            [
                c.perplexity,
                c.perplexity_ratio.unwrap(),
                c.agreement.unwrap(),
                c.kl.unwrap(),
            ]
        };
        for (m, (x, y)) in ["perplexity", "ratio", "agreement", "KL"]
            .iter()
            .zip(get(a).into_iter().zip(get(b)))
        {
            assert_close(&name(m), x, y);
        }
    }
}

/// Every segment length gives the one-forward report (a segment as long as the chunk):
/// for a Liger model (window 8, so windows and recurrent chunks straddle segment ends)
/// against its original, a sliding-window Transformer against a full-attention one, and a
/// Liger model with a global cache (6 places, 2 sinks) against its original.
#[test]
fn segmented_scoring_equals_one_forward() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = text_file(r);
    let (llama, liger) = liger_pair(r);
    let mistral = tiny(&r.join("mistral"), Family::Mistral, None);
    let qwen = tiny(&r.join("qwen"), Family::Qwen2, None);
    let global = LigerConfig {
        window: 8,
        global_cache: 6,
        sinks: 2,
        ..Default::default()
    };
    let cached = tiny(&r.join("global"), Family::Llama, Some(global));
    let seq_len = 200;
    for (model, reference) in [(&liger, &llama), (&mistral, &qwen), (&cached, &llama)] {
        let one = eval(model, reference, &data, seq_len, seq_len);
        assert!(one.chunks >= 4 && one.tokens > 700, "{one:?}");
        assert!(one.kl.unwrap() > 0.01, "the two models differ");
        for segment in [1, 7, 37, 64, 199] {
            let seg = eval(model, reference, &data, seq_len, segment);
            assert_same_report(&seg, &one, segment);
        }
    }
}

/// Chunks longer than a segment (and than the tiny models' 256 positions) are scored in
/// full: the buckets reach their length and still split every position.
#[test]
fn long_chunks_fill_far_context_buckets() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = text_file(r);
    let (llama, liger) = liger_pair(r);
    let rep = eval(&liger, &llama, &data, 600, 128);
    let ranges: Vec<_> = rep.by_context.iter().map(|b| (b.from, b.to)).collect();
    assert_eq!(
        ranges,
        [(1, 64), (65, 128), (129, 256), (257, 512), (513, 1024)]
    );
    assert_eq!(
        rep.by_context.iter().map(|b| b.tokens).sum::<u64>(),
        rep.tokens
    );
    assert!(rep.model.perplexity.is_finite() && rep.perplexity_ratio.unwrap() > 0.0);
}

/// Pass-key prompts: the asked length less at most one filler sentence, the key twice on
/// its own line after `depth` percent of the filler, the question last.
#[test]
fn passkey_prompts_have_the_asked_length_and_depth() {
    let root = tempfile::tempdir().unwrap();
    let dir = tiny(&root.path().join("m"), Family::Llama, None);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let b = PromptBuilder {
        tokenizer: &tokenizer,
    };
    // One character per token: a sentence and its space are at most 22 tokens.
    for length in [400, 1000, 3000] {
        for depth in [0, 25, 50, 100] {
            let p = b.build(length, depth, 12345).unwrap();
            assert!(p.tokens.len() <= length, "{length}: {}", p.tokens.len());
            assert!(p.tokens.len() + 22 > length, "{length}: {}", p.tokens.len());
            let n = p.before + p.after;
            assert_eq!(p.before, (n * depth as usize + 50) / 100);
            assert_eq!(p.text.matches("12345").count(), 2, "{}", p.text);
            let lines: Vec<&str> = p.text.lines().collect();
            let needle = lines
                .iter()
                .position(|l| l.starts_with("The pass key is 12345."))
                .unwrap();
            assert_eq!(needle, if p.before == 0 { 1 } else { 2 }, "{}", p.text);
            assert!(p.text.starts_with("There is an important info hidden"));
            assert!(p.text.ends_with("What is the pass key? The pass key is"));
        }
    }
    let short = b.build(100, 50, 12345).unwrap_err().to_string();
    assert!(short.contains("--passkey-lengths") && short.contains("100 tokens"));
}

/// `--passkey` runs every (length, depth, key) on the model and, up to its 256 positions,
/// on the reference; a model asked against itself answers as the reference does.
#[test]
fn passkey_asks_model_and_reference_within_its_context() {
    let root = tempfile::tempdir().unwrap();
    let (llama, liger) = liger_pair(root.path());
    let mut e = EvalOptions::new(&liger, Vec::new());
    e.reference = Some(llama.clone());
    e.segment = 64;
    e.passkey = Some(PasskeyOptions {
        lengths: vec![256, 300, 500],
        depths: vec![0, 50, 100],
        keys: 2,
        seed: 3,
    });
    let rep = liger_converter::evaluate(&e, &Progress::hidden()).unwrap();
    assert_eq!(rep.tokens, 0);
    assert!(rep.model.perplexity.is_nan() && rep.perplexity_ratio.is_none());
    let p = rep.passkey.as_ref().unwrap();
    assert_eq!(p.trials.len(), 3 * 3 * 2);
    assert_eq!(p.reference_max_tokens, Some(256));
    let asked: Vec<bool> = p.by_length.iter().map(|l| l.reference.is_some()).collect();
    assert_eq!(asked, [true, false, false]);
    for t in &p.trials {
        assert!((10_000..100_000).contains(&t.key));
        assert!(t.prompt_tokens <= t.length && t.prompt_tokens + 22 > t.length);
        assert_eq!(t.model_correct, t.model_answer.contains(&t.key.to_string()));
        assert_eq!(t.reference_answer.is_some(), t.length <= 256);
    }
    assert_eq!(p.by_depth.len(), 3);
    assert!(p.reference_accuracy.is_some());

    // Against itself: the same answers; and a second run draws the same keys.
    e.reference = Some(liger.clone());
    e.passkey.as_mut().unwrap().lengths = vec![256];
    let again = liger_converter::evaluate(&e, &Progress::hidden()).unwrap();
    let q = again.passkey.unwrap();
    for (t, u) in q.trials.iter().zip(&p.trials) {
        assert_eq!(t.reference_answer.as_ref(), Some(&t.model_answer));
        assert_eq!(t.key, u.key);
    }
    assert_eq!(q.reference_accuracy, Some(q.model_accuracy));
}

/// `--loops` answers each prompt (a conversation's last assistant turn dropped) with model
/// and reference; the examples are looping answers of the model.
#[test]
fn loops_counts_looping_answers_of_model_and_reference() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (llama, liger) = liger_pair(r);
    let prompts = r.join("prompts.jsonl");
    let lines = [
        json!({"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there!"}]}),
        json!({"messages": [{"role": "user", "content": "count to five"}]}),
        json!({"prompt": "what is the sky like?"}),
        json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]}),
    ];
    std::fs::write(&prompts, lines.map(|l| l.to_string()).join("\n")).unwrap();
    let mut e = EvalOptions::new(&liger, Vec::new());
    e.reference = Some(llama);
    e.loops = Some(LoopsOptions {
        prompts: prompts.clone(),
        max_tokens: 48,
    });
    let rep = liger_converter::evaluate(&e, &Progress::hidden()).unwrap();
    let l = rep.loops.as_ref().unwrap();
    assert_eq!((l.prompts, l.max_tokens), (4, 48));
    assert!(l.model_looping <= 4 && l.reference_looping.unwrap() <= 4);
    assert!((l.model - l.model_looping as f64 / 4.0).abs() < 1e-12);
    assert_eq!(l.examples.len(), l.model_looping.min(3));
    for x in &l.examples {
        assert_eq!(loops::repeated(&x.answer).as_ref(), Some(&x.repeated));
    }
    let table = liger_converter::eval::render(&rep);
    assert!(table.contains("looping answers"), "{table}");
    assert!(
        !table.contains("perplexity"),
        "no data, no perplexity: {table}"
    );
}

/// The flags through the binary: pass key alone in JSON and as a table, `--data` needed
/// otherwise, and unusable values refused on one line.
#[test]
fn new_flags_work_and_fail_on_one_line() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (llama, liger) = liger_pair(r);
    let data = text_file(r);
    let (m, rf, d) = (
        liger.to_str().unwrap(),
        llama.to_str().unwrap(),
        data.to_str().unwrap(),
    );
    let base = ["eval", "--model", m, "--reference", rf, "--quiet"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    let json_out = run_ok(&with(
        &base,
        &[
            "--passkey",
            "--passkey-lengths",
            "256,400",
            "--passkey-depths",
            "20,80",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v["tokens"], 0);
    assert_eq!(v["passkey"]["trials"].as_array().unwrap().len(), 4);
    assert!(v["passkey"]["by_length"][1]["reference"].is_null());
    assert!(v.get("loops").is_none());
    let table = run_ok(&with(
        &base,
        &[
            "--passkey",
            "--passkey-lengths",
            "256",
            "--data",
            d,
            "--seq-len",
            "300",
            "--segment",
            "100",
        ],
    ));
    for needle in [
        "perplexity ratio",
        "257-512",
        "pass key",
        "256 tokens",
        "depth 50%",
    ] {
        assert!(table.contains(needle), "{needle}: {table}");
    }
    // Without the new flags the JSON has no pass-key or loop section.
    let plain = run_ok(&with(&base, &["--data", d, "--seq-len", "64", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&plain).unwrap();
    assert!(v.get("passkey").is_none() && v.get("loops").is_none());

    run_err(&base, &["--data", "--passkey"]);
    run_err(
        &with(&base, &["--data", d, "--segment", "0"]),
        &["--segment"],
    );
    run_err(
        &with(&base, &["--passkey", "--passkey-depths", "50,120"]),
        &["--passkey-depths"],
    );
    run_err(
        &with(&base, &["--passkey", "--passkey-keys", "0"]),
        &["--passkey-keys"],
    );
    run_err(
        &with(&base, &["--passkey", "--passkey-lengths", "40"]),
        &["--passkey-lengths", "40 tokens"],
    );
    run_err(
        &with(&base, &["--loops", d]),
        &["--loops", "needs `messages` or `prompt` records"],
    );
    run_err(
        &with(&base, &["--loops", d, "--loops-max-tokens", "0"]),
        &["--loops-max-tokens"],
    );
}
