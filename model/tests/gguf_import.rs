//! GGUF import: the SmolLM2 fixture against golden fingerprints and token ids, small synthetic
//! GGUF files for every quantization path and the q/k un-permutation, a SentencePiece-style
//! vocabulary, and one clear error for each kind of bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use liger_model::gguf::import_gguf;

// ---------------------------------------------------------------------------------------------
// Fixture against the golden references
// ---------------------------------------------------------------------------------------------

/// Compare JSON values, numbers to f32 rounding (the golden file was written from f32 data).
fn assert_json_close(got: &serde_json::Value, want: &serde_json::Value, at: &str) {
    use serde_json::Value as J;
    match (got, want) {
        (J::Number(a), J::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!(
                a as f32 == b as f32 || (a - b).abs() <= 1e-6 * b.abs(),
                "{at}: {a} != {b}"
            );
        }
        (J::Object(a), J::Object(b)) => {
            let ka: std::collections::BTreeSet<_> = a.keys().collect();
            let kb: std::collections::BTreeSet<_> = b.keys().collect();
            assert_eq!(ka, kb, "{at}: keys differ");
            for (k, v) in b {
                assert_json_close(&a[k], v, &format!("{at}.{k}"));
            }
        }
        (J::Array(a), J::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}: lengths differ");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_json_close(x, y, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

fn rel_close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-9)
}

#[test]
fn fixture_matches_golden_fingerprint() {
    let imp = common::import_fixture();
    let golden = common::golden_json("smollm2_135m_weights_fingerprint.json");
    assert_json_close(&imp.config, &golden["config"], "config");

    // 1 embedding + final norm + 30 layers x 9 tensors; tied, so no lm_head.
    assert_eq!(imp.tensors.len(), 2 + 30 * 9);
    let names: Vec<&str> = imp.tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "tensors must be sorted by name");
    assert!(!names.contains(&"lm_head.weight"));
    let by_name: HashMap<&str, &Tensor> =
        imp.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();

    for (name, want) in golden["tensors"].as_object().unwrap() {
        let t = by_name
            .get(name.as_str())
            .unwrap_or_else(|| panic!("missing tensor {name}"));
        assert_eq!(t.dtype(), DType::F32, "{name}");
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims(), shape.as_slice(), "{name}: shape");
        let t64 = t.to_dtype(DType::F64).unwrap();
        let sum = t64.sum_all().unwrap().to_scalar::<f64>().unwrap();
        let abs_sum = t64
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let want_sum = want["sum"].as_f64().unwrap();
        let want_abs = want["abs_sum"].as_f64().unwrap();
        assert!(
            rel_close(sum, want_sum, 1e-3),
            "{name}: sum {sum} vs {want_sum}"
        );
        assert!(
            rel_close(abs_sum, want_abs, 1e-3),
            "{name}: abs_sum {abs_sum} vs {want_abs}"
        );

        let rows: Vec<Vec<f32>> = if t.rank() == 1 {
            vec![t.to_vec1().unwrap()]
        } else {
            (0..2)
                .map(|r| t.get(r).unwrap().to_vec1().unwrap())
                .collect()
        };
        for (r, key) in ["row0_first8", "row1_first8"].iter().enumerate() {
            let Some(vals) = want[key].as_array() else {
                continue;
            };
            for (i, v) in vals.iter().enumerate() {
                let (g, w) = (rows[r][i], v.as_f64().unwrap() as f32);
                assert!(
                    (g - w).abs() <= 1e-5,
                    "{name}: {key}[{i}] = {g}, golden {w}"
                );
            }
        }
    }
}

#[test]
fn fixture_side_files() {
    let imp = common::import_fixture();
    let tc = &imp.tokenizer_config;
    assert_eq!(tc["tokenizer_class"], "GPT2Tokenizer");
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["model_max_length"], 8192);
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(tc["added_tokens_decoder"]["1"]["content"], "<|im_start|>");
    assert_eq!(tc["added_tokens_decoder"]["1"]["special"], true);
    assert_eq!(tc["added_tokens_decoder"].as_object().unwrap().len(), 17);
    let gen = imp.generation_config.as_ref().expect("generation config");
    assert_eq!(gen["bos_token_id"], 1);
    assert_eq!(gen["eos_token_id"], 2);
    assert_eq!(gen["pad_token_id"], 2);
    assert_eq!(imp.name.as_deref(), Some("Smollm2 135M 8k Lc100K Mix1 Ep2"));
}

#[test]
fn fixture_tokenizer_matches_golden_ids() {
    let imp = common::import_fixture();
    let golden = common::golden_json("smollm2_135m_logits.json");
    let cases = golden["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let enc = imp.tokenizer.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), want.as_slice(), "ids for {text:?}");
        assert_eq!(imp.tokenizer.decode(&want, false).unwrap(), text);
    }
    // Digits are split one by one and no space is invented at the start.
    let ids = imp.tokenizer.encode("2024 x", true).unwrap();
    let toks = ids.get_tokens();
    assert_eq!(&toks[..4], ["2", "0", "2", "4"]);
}

// ---------------------------------------------------------------------------------------------
// Synthetic GGUF files
// ---------------------------------------------------------------------------------------------

type Meta = Vec<(String, Value)>;

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|x| s(x)).collect())
}

fn write_gguf(path: &Path, meta: &Meta, tensors: &[(String, QTensor)]) {
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &tensors).unwrap();
}

/// Deterministic values in [-1, 1) (a 64-bit LCG; no dependence on a random crate's streams).
fn pseudo_random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let vals: Vec<f32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(vals, shape, &Device::Cpu).unwrap()
}

/// llama.cpp's q/k permutation, written with explicit indices (independent of the import's
/// reshape): within each head, row `2j + half` holds the original row `half * d/2 + j`.
fn llama_cpp_permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    let hd = rows / heads;
    let src: Vec<Vec<f32>> = w.to_vec2().unwrap();
    let mut out = vec![0f32; rows * cols];
    for h in 0..heads {
        for j in 0..hd / 2 {
            for half in 0..2 {
                let dst_row = h * hd + 2 * j + half;
                let src_row = h * hd + half * hd / 2 + j;
                out[dst_row * cols..(dst_row + 1) * cols].copy_from_slice(&src[src_row]);
            }
        }
    }
    Tensor::from_vec(out, (rows, cols), &Device::Cpu).unwrap()
}

/// A tiny byte-level BPE vocabulary: "ab" and " ab" are tokens.
fn tiny_gpt2_tokenizer(meta: &mut Meta) {
    let tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"];
    meta.push(("tokenizer.ggml.model".into(), s("gpt2")));
    meta.push(("tokenizer.ggml.pre".into(), s("gpt2")));
    meta.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array([3, 1, 1, 1, 1, 1].iter().map(|&t| Value::I32(t)).collect()),
    ));
    meta.push(("tokenizer.ggml.merges".into(), strings(&["a b", "Ġ ab"])));
    meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(0)));
    meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(0)));
}

const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const FFN: usize = 512;
const VOCAB: usize = 8;

/// A one-layer llama GGUF whose tensors use many quantization types. Returns the metadata,
/// the GGUF tensors, and for each Hugging Face name the original f32 weight and its type.
struct Synthetic {
    meta: Meta,
    tensors: Vec<(String, QTensor)>,
    originals: Vec<(String, Tensor, GgmlDType)>,
}

/// (GGUF name, Hugging Face name, shape, stored type, heads to permute for q/k)
type TensorSpec = (
    &'static str,
    &'static str,
    Vec<usize>,
    GgmlDType,
    Option<usize>,
);

fn synthetic_llama() -> Synthetic {
    let mut meta: Meta = vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s("tiny test llama")),
        ("llama.block_count".into(), Value::U32(1)),
        ("llama.context_length".into(), Value::U32(128)),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FFN as u32)),
        (
            "llama.attention.head_count".into(),
            Value::U32(HEADS as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(KV_HEADS as u32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(HEAD_DIM as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
    ];
    tiny_gpt2_tokenizer(&mut meta);
    let q_rows = HEADS * HEAD_DIM;
    let kv_rows = KV_HEADS * HEAD_DIM;
    let spec: Vec<TensorSpec> = vec![
        (
            "token_embd.weight",
            "model.embed_tokens.weight",
            vec![VOCAB, HIDDEN],
            GgmlDType::Q8_0,
            None,
        ),
        (
            "output.weight",
            "lm_head.weight",
            vec![VOCAB, HIDDEN],
            GgmlDType::Q4_1,
            None,
        ),
        (
            "output_norm.weight",
            "model.norm.weight",
            vec![HIDDEN],
            GgmlDType::F32,
            None,
        ),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
            vec![HIDDEN],
            GgmlDType::F32,
            None,
        ),
        (
            "blk.0.ffn_norm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            vec![HIDDEN],
            GgmlDType::F32,
            None,
        ),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            vec![q_rows, HIDDEN],
            GgmlDType::F16,
            Some(HEADS),
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            vec![kv_rows, HIDDEN],
            GgmlDType::Q4K,
            Some(KV_HEADS),
        ),
        (
            "blk.0.attn_v.weight",
            "model.layers.0.self_attn.v_proj.weight",
            vec![kv_rows, HIDDEN],
            GgmlDType::Q5_0,
            None,
        ),
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
            vec![HIDDEN, q_rows],
            GgmlDType::BF16,
            None,
        ),
        (
            "blk.0.ffn_gate.weight",
            "model.layers.0.mlp.gate_proj.weight",
            vec![FFN, HIDDEN],
            GgmlDType::Q6K,
            None,
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            vec![FFN, HIDDEN],
            GgmlDType::Q5_1,
            None,
        ),
        (
            "blk.0.ffn_down.weight",
            "model.layers.0.mlp.down_proj.weight",
            vec![HIDDEN, FFN],
            GgmlDType::Q4_0,
            None,
        ),
    ];
    let mut tensors = Vec::new();
    let mut originals = Vec::new();
    for (i, (gguf, hf, shape, dtype, heads)) in spec.into_iter().enumerate() {
        let w = pseudo_random(&shape, i as u64 + 1);
        let stored = match heads {
            Some(n) => llama_cpp_permute(&w, n),
            None => w.clone(),
        };
        tensors.push((gguf.to_owned(), QTensor::quantize(&stored, dtype).unwrap()));
        originals.push((hf.to_owned(), w, dtype));
    }
    Synthetic {
        meta,
        tensors,
        originals,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn synthetic_llama_round_trips_every_quantization() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let syn = synthetic_llama();
    write_gguf(&path, &syn.meta, &syn.tensors);
    let imp = import_gguf(&path).unwrap();

    assert_eq!(imp.config["tie_word_embeddings"], false);
    assert_eq!(imp.config["num_key_value_heads"], KV_HEADS);
    assert_eq!(imp.config["head_dim"], HEAD_DIM);
    assert_eq!(imp.config["vocab_size"], VOCAB);
    assert_eq!(imp.name.as_deref(), Some("tiny test llama"));
    let got: HashMap<&str, &Tensor> = imp.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    assert_eq!(got.len(), syn.originals.len());

    for (name, w, dtype) in &syn.originals {
        let t = got[name.as_str()];
        assert_eq!(t.dims(), w.dims(), "{name}");
        // Quantization works on blocks inside a row and the permutation moves whole rows, so
        // the import must equal quantize-then-dequantize of the *unpermuted* weight exactly:
        // this checks the dequantization, the layout and the un-permutation at once.
        let exact = QTensor::quantize(w, *dtype)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(
            max_abs_diff(t, &exact),
            0.0,
            "{name} ({dtype:?}) differs from its round trip"
        );
        // And the values are close to the originals (|w| < 1), to the precision of the type.
        let tol = match dtype {
            GgmlDType::F32 => 0.0,
            GgmlDType::F16 | GgmlDType::BF16 => 4e-3,
            GgmlDType::Q8_0 => 0.02,
            GgmlDType::Q6K => 0.04,
            GgmlDType::Q5_0 | GgmlDType::Q5_1 => 0.07,
            _ => 0.15,
        };
        let err = max_abs_diff(t, w);
        assert!(err <= tol, "{name} ({dtype:?}): max error {err} > {tol}");
    }
}

#[test]
fn synthetic_tokenizer_and_bos_template() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut syn = synthetic_llama();
    syn.meta
        .push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
    write_gguf(&path, &syn.meta, &syn.tensors);
    let imp = import_gguf(&path).unwrap();
    let enc = imp.tokenizer.encode("ab ab<|endoftext|>", true).unwrap();
    assert_eq!(
        enc.get_ids(),
        [0, 3, 5, 0],
        "BOS, `ab`, ` ab`, special token"
    );
    assert_eq!(imp.tokenizer.decode(enc.get_ids(), true).unwrap(), "ab ab");
    assert_eq!(imp.tokenizer_config["add_bos_token"], true);
}

// ---------------------------------------------------------------------------------------------
// SentencePiece ("llama" tokenizer model)
// ---------------------------------------------------------------------------------------------

#[test]
fn sentencepiece_vocab_encodes_and_decodes() {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or",
        "ld", "▁wor", "▁world",
    ];
    for p in pieces {
        tokens.push(p.into());
        types.push(1);
    }
    // Longer pieces score higher, so they are merged first (scores decrease with the id in
    // real Llama vocabularies; here we only need a consistent order).
    let scores: Vec<f32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i < 259 {
                0.0
            } else {
                t.chars().count() as f32 - i as f32 * 1e-3
            }
        })
        .collect();
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;

    let mut syn = synthetic_llama();
    syn.meta.retain(|(k, _)| !k.starts_with("tokenizer."));
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    syn.meta.extend([
        ("tokenizer.ggml.model".to_owned(), s("llama")),
        ("tokenizer.ggml.tokens".to_owned(), strings(&token_refs)),
        (
            "tokenizer.ggml.scores".to_owned(),
            Value::Array(scores.iter().map(|&x| Value::F32(x)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array(types.iter().map(|&x| Value::I32(x)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".to_owned(), Value::U32(0)),
    ]);
    // The embedding needs a row per token.
    let rows = tokens.len().div_ceil(8) * 8;
    for (name, q) in syn.tensors.iter_mut() {
        if name == "token_embd.weight" || name == "output.weight" {
            *q = QTensor::quantize(&pseudo_random(&[rows, HIDDEN], 7), GgmlDType::Q8_0).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    write_gguf(&path, &syn.meta, &syn.tensors);
    let imp = import_gguf(&path).unwrap();
    let tok = &imp.tokenizer;
    assert_eq!(imp.tokenizer_config["tokenizer_class"], "LlamaTokenizer");

    // BOS is added by default for SentencePiece models, spaces become ▁ pieces, and a
    // character missing from the vocabulary falls back to its UTF-8 bytes.
    let enc = tok.encode("hello world!", true).unwrap();
    assert_eq!(
        enc.get_ids(),
        [id("<s>"), id("▁hello"), id("▁world"), id("<0x21>")],
        "tokens: {:?}",
        enc.get_tokens()
    );
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hello world!");
    let enc = tok.encode("hello wé", false).unwrap();
    assert_eq!(
        enc.get_ids(),
        [id("▁hello"), id("▁w"), id("<0xC3>"), id("<0xA9>")],
        "tokens: {:?}",
        enc.get_tokens()
    );
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "hello wé");
    // Control tokens in the text are single tokens.
    let enc = tok.encode("hello</s>", false).unwrap();
    assert_eq!(enc.get_ids(), [id("▁hello"), id("</s>")]);
}

// ---------------------------------------------------------------------------------------------
// Bad input: each error is one line that names the problem
// ---------------------------------------------------------------------------------------------

fn import_err(path: &Path) -> String {
    match import_gguf(path) {
        Ok(_) => panic!("{} imported, expected an error", path.display()),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            msg
        }
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

#[test]
fn truncated_fixture_is_reported() {
    let fixture = common::smollm2_gguf();
    let bytes = std::fs::read(&fixture).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Inside the metadata (the vocabulary alone is about a megabyte), then inside tensor data.
    for cut in [100_000, bytes.len() / 2] {
        let path = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert_contains(&import_err(&path), &["truncated"]);
    }
}

#[test]
fn not_a_gguf_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [
        ("text.gguf", &b"{\"this\": \"is json, not gguf\"}"[..]),
        ("empty.gguf", &b""[..]),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        assert_contains(&import_err(&path), &["not a GGUF file"]);
    }
    let missing = dir.path().join("does-not-exist.gguf");
    assert_contains(&import_err(&missing), &["does-not-exist.gguf"]);
}

#[test]
fn other_architecture_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    let meta: Meta = vec![("general.architecture".into(), s("gpt2"))];
    let t = QTensor::quantize(&pseudo_random(&[4, 32], 1), GgmlDType::F32).unwrap();
    write_gguf(&path, &meta, &[("token_embd.weight".into(), t)]);
    assert_contains(
        &import_err(&path),
        &["gpt2", "llama", "unsupported architecture"],
    );
}

/// A GGUF v3 file written byte by byte, whose one tensor has GGML type 16 (IQ2_XXS), which
/// candle cannot decode (and so cannot write either).
#[test]
fn unsupported_tensor_type_is_reported() {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes()); // version
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    string(&mut b, "llama");
    string(&mut b, "blk.0.attn_q.weight");
    b.extend(2u32.to_le_bytes()); // dimensions
    b.extend(256u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(16u32.to_le_bytes()); // IQ2_XXS
    b.extend(0u64.to_le_bytes()); // offset
    b.resize(b.len().div_ceil(32) * 32 + 4 * 66, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq2.gguf");
    std::fs::write(&path, &b).unwrap();
    assert_contains(
        &import_err(&path),
        &["blk.0.attn_q.weight", "type 16", "IQ2_XXS", "not supported"],
    );
}

fn write_synthetic(dir: &Path, name: &str, syn: &Synthetic) -> PathBuf {
    let path = dir.join(name);
    write_gguf(&path, &syn.meta, &syn.tensors);
    path
}

#[test]
fn missing_metadata_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "llama.block_count",
        "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.tokens",
    ] {
        let mut syn = synthetic_llama();
        syn.meta.retain(|(k, _)| k != key);
        let path = write_synthetic(dir.path(), "missing.gguf", &syn);
        assert_contains(&import_err(&path), &[key]);
    }
}

#[test]
fn inconsistent_tensor_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut syn = synthetic_llama();
    for (name, q) in syn.tensors.iter_mut() {
        if name == "blk.0.attn_v.weight" {
            *q = QTensor::quantize(&pseudo_random(&[64, HIDDEN], 3), GgmlDType::F32).unwrap();
        }
    }
    let path = write_synthetic(dir.path(), "shape.gguf", &syn);
    assert_contains(
        &import_err(&path),
        &["blk.0.attn_v.weight", "[64, 256]", "[128, 256]"],
    );

    let mut syn = synthetic_llama();
    syn.tensors.retain(|(n, _)| n != "blk.0.ffn_up.weight");
    let path = write_synthetic(dir.path(), "missing-tensor.gguf", &syn);
    assert_contains(&import_err(&path), &["blk.0.ffn_up.weight", "missing"]);
}

#[test]
fn unsupported_tokenizer_model_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut syn = synthetic_llama();
    for (k, v) in syn.meta.iter_mut() {
        if k == "tokenizer.ggml.model" {
            *v = s("bert");
        }
    }
    let path = write_synthetic(dir.path(), "bert-vocab.gguf", &syn);
    assert_contains(&import_err(&path), &["bert", "tokenizer.ggml.model"]);
}
