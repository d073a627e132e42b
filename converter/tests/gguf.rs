//! The real SmolLM2-135M-Instruct GGUF through the CLI: `import` must write a Hugging Face
//! folder that matches the independent golden references (weights fingerprint, tokenizer
//! ids, the original model's logits), and `convert --from the.gguf` one that matches the
//! golden zero-shot Liger-GLA logits.
//!
//! Both commands run once per test binary, side by side, into one folder under Cargo's
//! target tmp dir; the last test to finish removes it (and a run that was cut short is
//! cleaned up by the next one).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use common::*;
use liger_model::{LigerConfig, Model};
use serde_json::Value;

const TESTS_IN_THIS_FILE: usize = 4;
static REMAINING: AtomicUsize = AtomicUsize::new(TESTS_IN_THIS_FILE);
const PREFIX: &str = "gguf-fixture-";

struct Fixture {
    root: PathBuf,
    gguf: PathBuf,
    imported: PathBuf,
    converted: PathBuf,
}

/// Counts this test as finished when dropped (also on panic); the last one cleans up.
struct Done;

impl Drop for Done {
    fn drop(&mut self) {
        if REMAINING.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(f) = FIXTURE.get() {
                let _ = std::fs::remove_dir_all(&f.root);
            }
        }
    }
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Folders of earlier runs whose process is gone (for example a filtered run, where
        // not every test ran to count down).
        if let Ok(rd) = std::fs::read_dir(tmp) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix(PREFIX) {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let root = tmp.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let gguf = smollm2_gguf();
        let imported = root.join("imported");
        let converted = root.join("converted");
        let spawn = |cmd: &str, out: &Path| {
            Command::new(env!("CARGO_BIN_EXE_liger-convert"))
                .args([
                    cmd,
                    "--from",
                    gguf.to_str().unwrap(),
                    "--out",
                    out.to_str().unwrap(),
                ])
                .output()
                .unwrap()
        };
        let (import, convert) = std::thread::scope(|s| {
            let i = s.spawn(|| spawn("import", &imported));
            let c = s.spawn(|| spawn("convert", &converted));
            (i.join().unwrap(), c.join().unwrap())
        });
        for (what, o) in [("import", &import), ("convert", &convert)] {
            assert!(o.status.success(), "{what} failed:\n{}", stderr(o));
            // Not a terminal: no progress bars, only the summary on stdout.
            assert!(stderr(o).is_empty(), "{what} stderr: {}", stderr(o));
            assert!(stdout(o).contains(&format!("{what}ed ")), "{}", stdout(o));
        }
        Fixture {
            root,
            gguf,
            imported,
            converted,
        }
    })
}

fn case() -> Value {
    golden_json("smollm2_135m_logits.json")["cases"][0].clone()
}

fn ids(case: &Value) -> Vec<u32> {
    case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// At every golden position of the first case: the same top-5 ids, and each golden top-5
/// logit within 1e-2.
fn check_logits(model: &Model, kind: &str) {
    let case = case();
    let rows = logits(model, &ids(&case));
    for g in case[kind].as_array().unwrap() {
        let pos = g["pos"].as_u64().unwrap() as usize;
        let row = &rows[pos];
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let ours: Vec<u64> = order[..5].iter().map(|&i| i as u64).collect();
        let want: Vec<u64> = g["top_ids"].as_array().unwrap()[..5]
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ours, want, "{kind}: top-5 at pos {pos}");
        for (id, logit) in want.iter().zip(g["top_logits"].as_array().unwrap()) {
            let (got, logit) = (row[*id as usize], logit.as_f64().unwrap() as f32);
            assert!(
                (got - logit).abs() < 1e-2,
                "{kind}: logit of {id} at pos {pos}: {got} vs {logit}"
            );
        }
    }
}

#[test]
fn import_writes_the_golden_weights() {
    let _done = Done;
    let f = fixture();
    assert_eq!(
        entries(&f.imported),
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let golden = golden_json("smollm2_135m_weights_fingerprint.json");
    let config = read_json(&f.imported.join("config.json"));
    assert!(config.get("liger").is_none());
    for (k, v) in golden["config"].as_object().unwrap() {
        match (v.as_f64(), config[k].as_f64()) {
            (Some(want), Some(got)) => assert!(
                (want - got).abs() <= 1e-6 * want.abs(),
                "config.{k}: {got} vs {want}"
            ),
            _ => assert_eq!(&config[k], v, "config.{k}"),
        }
    }

    // SAFETY: read-only map of a file this test owns.
    let st = unsafe { MmapedSafetensors::new(f.imported.join("model.safetensors")) }.unwrap();
    assert_eq!(st.tensors().len(), 2 + 30 * 9);
    for (name, want) in golden["tensors"].as_object().unwrap() {
        let t = st.load(name, &Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::F32, "{name}");
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        let (got, want) = (sum(&t), want["sum"].as_f64().unwrap());
        assert!(
            (got - want).abs() <= 1e-3 * want.abs(),
            "{name}: sum {got} vs {want}"
        );
    }

    let gen = read_json(&f.imported.join("generation_config.json"));
    assert_eq!(
        (gen["bos_token_id"].as_u64(), gen["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );
    let tc = read_json(&f.imported.join("tokenizer_config.json"));
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let card = std::fs::read_to_string(f.imported.join("README.md")).unwrap();
    assert!(
        card.contains("Smollm2 135M") && card.contains("liger-convert import"),
        "{card}"
    );
}

#[test]
fn imported_tokenizer_encodes_the_golden_ids() {
    let _done = Done;
    let f = fixture();
    let tok = tokenizers::Tokenizer::from_file(f.imported.join("tokenizer.json")).unwrap();
    for case in golden_json("smollm2_135m_logits.json")["cases"]
        .as_array()
        .unwrap()
    {
        let text = case["text"].as_str().unwrap();
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), ids(case).as_slice(), "{text:?}");
    }
    // The converted folder carries the same tokenizer.
    let a = std::fs::read(f.imported.join("tokenizer.json")).unwrap();
    let b = std::fs::read(f.converted.join("tokenizer.json")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn imported_model_matches_the_golden_transformer() {
    let _done = Done;
    let f = fixture();
    let model = load(&f.imported, DType::F32);
    assert!(model.config().liger.is_none());
    check_logits(&model, "transformer");
}

#[test]
fn converted_gguf_matches_the_golden_liger_gla() {
    let _done = Done;
    let f = fixture();
    let config = read_json(&f.converted.join("config.json"));
    let liger: LigerConfig = serde_json::from_value(config["liger"].clone()).unwrap();
    assert_eq!(
        liger,
        LigerConfig {
            source: Some(f.gguf.to_str().unwrap().to_owned()),
            ..LigerConfig::default()
        }
    );
    assert_eq!(config["torch_dtype"], "float32");
    check_logits(&load(&f.converted, DType::F32), "liger_gla");

    // inspect: 30 Liger layers whose state does not grow; the original's KV cache does.
    let json: Value = serde_json::from_str(&run_ok(&[
        "inspect",
        f.converted.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["layers"].as_array().unwrap().len(), 30);
    let s = json["state"].as_array().unwrap();
    assert_eq!(s[0]["liger_bytes"], s[1]["liger_bytes"]);
    assert!(s[1]["transformer_kv_bytes"].as_u64() > s[0]["transformer_kv_bytes"].as_u64());
}
