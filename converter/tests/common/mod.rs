//! Shared test support: running the built `liger-convert`, checking that failed runs leave
//! nothing behind, comparing models, and the SmolLM2-135M-Instruct GGUF fixture with its
//! golden references.
//!
//! Each test binary uses a subset of these helpers, hence the `dead_code` and
//! `unused_imports` allowances.

#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use liger_model::{Logits, Model};

// Each test binary uses a subset of these.
#[allow(unused_imports)]
pub use liger_model::testing::fixture::workspace_root;

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_liger-convert"))
}

/// Runs `liger-convert ARGS`.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("liger-convert runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts success and returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "liger-convert {args:?} failed ({}):\n{}",
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts a failure reported as one `error: ...` line containing every one of `needles`,
/// and returns that line.
pub fn run_err(args: &[&str], needles: &[&str]) -> String {
    let o = run(args);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "liger-convert {args:?} succeeded:\n{}",
        stdout(&o)
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line for {args:?}, got:\n{err}"
    );
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for n in needles {
        assert!(line.contains(n), "error for {args:?} lacks `{n}`: {line}");
    }
    line.to_owned()
}

/// Names in `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that `dir` holds exactly `names` (no output, no `.partial-` folder).
pub fn assert_only(dir: &Path, names: &[&str]) {
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(
        entries(dir),
        want,
        "unexpected leftovers in {}",
        dir.display()
    );
}

/// Deterministic token ids.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    liger_model::testing::SplitMix(seed).tokens(n, vocab)
}

/// All-position logits of `model` for `toks`, as rows.
pub fn logits(model: &Model, toks: &[u32]) -> Vec<Vec<f32>> {
    let mut state = model.new_state().unwrap();
    model
        .forward(toks, &mut state, Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Loads a written folder as `dtype`.
pub fn load(dir: &Path, dtype: DType) -> Model {
    liger_model::checkpoint::load_model(dir, dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Sum of a tensor in f64.
pub fn sum(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// SmolLM2 fixture
// ---------------------------------------------------------------------------------------------

#[allow(unused_imports)]
pub use liger_model::testing::fixture::{golden_dir, golden_json, smollm2_gguf};

/// Characters of the tiny tokenizer, after the three special tokens (ids 0-2) and the
/// unknown-character token (id 3): 57 more, 61 in all (the tiny models' vocabulary).
pub const CHARS: &str = "abcdefghijklmnopqrstuvwxyz .,!?'\n0123456789ABCDEFGHIJTW:-";

/// A character-level tokenizer with ChatML's special tokens, as `tokenizer.json`.
pub fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "~"]
        .iter()
        .enumerate()
    {
        vocab.insert((*t).to_owned(), serde_json::json!(i));
    }
    for (i, c) in CHARS.chars().enumerate() {
        vocab.insert(c.to_string(), serde_json::json!(i + 4));
    }
    assert_eq!(vocab.len(), 61);
    let added: Vec<_> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "~", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}
    })
}

/// One candle thread per test (tests already run side by side; on a busy machine candle's
/// spinning thread pool is much slower than one thread). Child processes inherit it.
pub fn single_threaded() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("RAYON_NUM_THREADS", "1"));
}
