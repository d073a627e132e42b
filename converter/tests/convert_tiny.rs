//! Converting tiny generated checkpoints of every family, through the CLI and the library:
//! the written folder must load and compute exactly what the same weights converted in
//! memory compute, for the reference settings and for non-default flags, in every output
//! dtype, single-file and sharded; and `inspect` must report the runtime's state sizes.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use liger_converter::inspect::render_table;
use liger_converter::output::DEFAULT_SHARD_LIMIT;
use liger_converter::{ConvertOptions, FullAttention, LigerSettings, Progress};
use liger_model::config::KvDtype;
use liger_model::layers::Quantization;
use liger_model::testing::{Family, TinyCheckpoint, ALL_FAMILIES};
use liger_model::{LigerConfig, ModelConfig, StateSpec, Variant};

fn family_name(f: Family) -> &'static str {
    match f {
        Family::Llama => "llama",
        Family::Mistral => "mistral",
        Family::Qwen2 => "qwen2",
    }
}

/// Writes the tiny checkpoint of `family` into `root/name` and returns its path as a string.
fn write_source(root: &Path, family: Family, seed: u64) -> String {
    let dir = root.join(format!("src-{}", family_name(family)));
    TinyCheckpoint::new(family, seed)
        .unwrap()
        .write_folder(&dir)
        .unwrap();
    dir.to_str().unwrap().to_owned()
}

/// Raw bytes of every tensor of the safetensors files in `dir`.
fn raw_tensors(dir: &Path) -> HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = HashMap::new();
    for f in liger_model::weights::safetensors_files(dir).unwrap() {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            out.insert(
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            );
        }
    }
    out
}

/// Converts `family` with `flags`, checks the written config's `liger` section equals
/// `expected` (plus the source) and that the folder computes what the in-memory conversion
/// computes, in `dtype`.
fn check_conversion(family: Family, flags: &[&str], expected: LigerConfig, dtype: DType) {
    let root = tempfile::tempdir().unwrap();
    let src = write_source(root.path(), family, 7);
    let out = root.path().join("out");
    let mut args = vec![
        "convert",
        "--from",
        &src,
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(flags);
    let printed = run_ok(&args);
    assert!(printed.is_empty(), "--quiet printed: {printed}");
    assert_only(
        root.path(),
        &[&format!("src-{}", family_name(family)), "out"],
    );

    let config = read_json(&out.join("config.json"));
    let expected = LigerConfig {
        source: Some(src.clone()),
        ..expected
    };
    let written: LigerConfig = serde_json::from_value(config["liger"].clone()).unwrap();
    assert_eq!(written, expected, "{family:?} {flags:?}");
    let torch = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    assert_eq!(config["torch_dtype"], torch);
    // Everything else in the config is the source's.
    let mut rest = config.clone();
    rest.as_object_mut().unwrap().remove("liger");
    rest["torch_dtype"] = "float32".into();
    assert_eq!(rest, liger_model::testing::tiny_config(family));

    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        readme.contains(&src) && readme.contains("liger-convert recover"),
        "{readme}"
    );
    assert!(
        readme.contains("liger-convert convert --from"),
        "command line in the card"
    );

    let ck = TinyCheckpoint::new(family, 7)
        .unwrap()
        .with_liger(&expected);
    let want = ck.model(dtype).unwrap();
    let got = load(&out, dtype);
    assert_eq!(got.config().liger, Some(expected.clone()));
    // Longer than the window so both branches and the window limit are exercised.
    let toks = tokens(40, 61, 3);
    assert_eq!(
        logits(&got, &toks),
        logits(&want, &toks),
        "{family:?} {flags:?} {dtype:?}"
    );

    let src_raw = raw_tensors(Path::new(&src));
    let out_raw = raw_tensors(&out);
    assert_eq!(src_raw.len(), out_raw.len());
    for (name, (sd, shape, data)) in &src_raw {
        let (od, oshape, odata) = &out_raw[name];
        assert_eq!(shape, oshape, "{name}");
        if dtype == DType::F32 {
            assert_eq!((sd, data), (od, odata), "{name} must be kept byte for byte");
        } else {
            assert_eq!(*od, dtype.into(), "{name}");
        }
    }
}

#[test]
fn every_family_converts_with_reference_settings() {
    for f in ALL_FAMILIES {
        check_conversion(f, &[], LigerConfig::default(), DType::F32);
    }
}

#[test]
fn non_default_flags() {
    let hgrn2 = LigerConfig {
        variant: Variant::Hgrn2,
        window: 5,
        window_weight: 0.75,
        recurrent_weight: 0.25,
        gate_normalizer: 1.0,
        full_attention_layers: vec![1],
        slots: None,
        global_cache: 4,
        sinks: 1,
        attention_places: 2,
        max_distance: Some(9),
        kv_dtype: Some(KvDtype::F16),
        source: None,
    };
    check_conversion(
        Family::Llama,
        &[
            "--variant",
            "hgrn2",
            "--window",
            "5",
            "--mix",
            "0.25",
            "--full-attention-layers",
            "every:2",
            "--global-cache",
            "4",
            "--sinks",
            "1",
            "--attention-places",
            "2",
            "--max-distance",
            "9",
            "--kv-dtype",
            "f16",
        ],
        hgrn2,
        DType::F32,
    );
    // GSA with the tiny head dim of 8 pooled into 4 slots.
    let gsa = LigerConfig {
        variant: Variant::Gsa,
        slots: Some(4),
        ..LigerConfig::default()
    };
    check_conversion(
        Family::Qwen2,
        &["--variant", "gsa", "--slots", "4"],
        gsa,
        DType::F32,
    );
    let gla = LigerConfig {
        window: 3,
        window_weight: 0.0,
        recurrent_weight: 1.0,
        gate_normalizer: 4.0,
        full_attention_layers: vec![0, 2],
        ..LigerConfig::default()
    };
    check_conversion(
        Family::Mistral,
        &[
            "--window",
            "3",
            "--mix",
            "1",
            "--gate-normalizer",
            "4",
            "--full-attention-layers",
            "2,0",
        ],
        gla,
        DType::F32,
    );
    let list = LigerConfig {
        window: 1,
        full_attention_layers: vec![2],
        ..LigerConfig::default()
    };
    check_conversion(
        Family::Qwen2,
        &[
            "--window",
            "1",
            "--full-attention-layers",
            "every:3",
            "--dtype",
            "f32",
        ],
        list,
        DType::F32,
    );
}

#[test]
fn half_precision_outputs() {
    check_conversion(
        Family::Qwen2,
        &["--dtype", "f16"],
        LigerConfig::default(),
        DType::F16,
    );
    check_conversion(
        Family::Llama,
        &["--dtype", "bf16"],
        LigerConfig::default(),
        DType::BF16,
    );
}

#[test]
fn sharded_output_loads_back_identically() {
    let root = tempfile::tempdir().unwrap();
    let src = write_source(root.path(), Family::Mistral, 11);
    let out = root.path().join("sharded");
    // Through the library, with a limit far below the ~60 KB of weights.
    let opts = ConvertOptions {
        shard_limit: 8_000,
        settings: LigerSettings {
            full_attention: FullAttention::Every(3),
            ..Default::default()
        },
        ..ConvertOptions::new(&src, &out)
    };
    let summary = liger_converter::convert(&opts, &Progress::hidden()).unwrap();
    assert!(summary.weight_files.len() > 3, "{:?}", summary.weight_files);
    let n = summary.weight_files.len();
    for (i, f) in summary.weight_files.iter().enumerate() {
        assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let size = std::fs::metadata(out.join(f)).unwrap().len();
        assert!(size < 8_000 + 4_096, "{f}: {size} bytes");
    }
    assert!(!out.join("model.safetensors").exists());
    let index = read_json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let raw = raw_tensors(&out);
    assert_eq!(map.len(), raw.len());
    let data: u64 = raw.values().map(|(_, _, d)| d.len() as u64).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(data));
    assert_eq!(summary.weight_bytes, data);

    let expected = LigerConfig {
        full_attention_layers: vec![2],
        source: Some(src.clone()),
        ..LigerConfig::default()
    };
    let want = TinyCheckpoint::new(Family::Mistral, 11)
        .unwrap()
        .with_liger(&expected)
        .model(DType::F32)
        .unwrap();
    let toks = tokens(30, 61, 5);
    assert_eq!(logits(&load(&out, DType::F32), &toks), logits(&want, &toks));
    assert_eq!(
        raw,
        raw_tensors(Path::new(&src)),
        "sharding keeps every tensor's bytes"
    );

    // The sharded folder is itself a valid source (re-conversion replaces the settings),
    // and the CLI's size flag shards too.
    let again = root.path().join("again");
    run_ok(&[
        "convert",
        "--from",
        out.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--quiet",
        "--max-shard-size",
        "20KB",
    ]);
    let files = liger_model::weights::safetensors_files(&again).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let expected = LigerConfig {
        source: Some(out.to_str().unwrap().to_owned()),
        ..LigerConfig::default()
    };
    let want = TinyCheckpoint::new(Family::Mistral, 11)
        .unwrap()
        .with_liger(&expected)
        .model(DType::F32)
        .unwrap();
    assert_eq!(
        logits(&load(&again, DType::F32), &toks),
        logits(&want, &toks)
    );
    assert_eq!(DEFAULT_SHARD_LIMIT, 2_000_000_000);
}

/// A tiny checkpoint whose projections have inputs of 256 and 512, so that Q4K's
/// super-blocks of 256 fit (the standard tiny one's 32 and 48 only fit Q8_0, or nothing).
fn wide_checkpoint(family: Family, seed: u64) -> TinyCheckpoint {
    let mut config = liger_model::testing::tiny_config(family);
    config["hidden_size"] = 256.into();
    config["intermediate_size"] = 512.into();
    config["num_hidden_layers"] = 2.into();
    let tensors = liger_model::testing::random_weights(&config, seed).unwrap();
    TinyCheckpoint { config, tensors }
}

/// `convert --quantize` and `quantize` store the projections as GGML blocks; the folder
/// loads quantized and computes exactly what the dense conversion quantized at load
/// computes, in a prefill (dense product with the dequantized blocks) and in decode steps
/// (GGML's kernels). Everything else is kept byte for byte.
#[test]
fn quantized_checkpoints_equal_quantizing_at_load() {
    let cases = [
        (Family::Llama, Quantization::Q8_0, false),
        (Family::Mistral, Quantization::Q8_0, false),
        (Family::Llama, Quantization::Q4K, true),
        (Family::Qwen2, Quantization::Q4K, true),
    ];
    for (family, format, wide) in cases {
        let what = format!("{family:?} {}", format.name());
        let root = tempfile::tempdir().unwrap();
        let ckpt = if wide {
            wide_checkpoint(family, 3)
        } else {
            TinyCheckpoint::new(family, 3).unwrap()
        };
        let src = root.path().join("src");
        ckpt.write_folder(&src).unwrap();
        let path = |name: &str| root.path().join(name).to_str().unwrap().to_owned();
        let (src, dense, quant, requant) = (path("src"), path("dense"), path("q"), path("rq"));
        run_ok(&["convert", "--from", &src, "--out", &dense, "--quiet"]);
        let f = format.name();
        run_ok(&[
            "convert",
            "--from",
            &src,
            "--out",
            &quant,
            "--quantize",
            f,
            "--quiet",
        ]);
        // Sharded, so that each shard's metadata lists its own blocks.
        let printed = run_ok(&[
            "quantize",
            "--model",
            &dense,
            "--out",
            &requant,
            "--format",
            f,
            "--max-shard-size",
            "20KB",
        ]);
        let shards = liger_model::weights::safetensors_files(Path::new(&requant)).unwrap();
        assert!(shards.len() > 2, "{what}: {shards:?}");
        assert!(
            printed.contains(&format!("with {f} projections")),
            "{printed}"
        );

        let raw = raw_tensors(Path::new(&quant));
        assert_eq!(
            raw,
            raw_tensors(Path::new(&requant)),
            "{what}: same bytes either way"
        );
        let source = raw_tensors(Path::new(&src));
        let mut blocks = 0;
        for (name, (dtype, shape, bytes)) in &source {
            let (d, s, b) = &raw[name];
            let quantized =
                liger_model::weights::is_quantizable(name) && format.format_for(shape[1]).is_some();
            if quantized {
                assert_eq!(*d, safetensors::Dtype::U8, "{what}: {name}");
                assert!(s[0] < bytes.len() / 3, "{what}: {name} is {s:?} bytes");
                blocks += 1;
            } else {
                assert_eq!((d, s, b), (dtype, shape, bytes), "{what}: {name} kept");
            }
        }
        // A tied model gains the head's blocks, made from the embeddings.
        let tied = family == Family::Llama;
        assert_eq!(raw.len(), source.len() + usize::from(tied), "{what}");
        assert_eq!(raw["lm_head.weight"].0, safetensors::Dtype::U8, "{what}");

        let loaded = load(Path::new(&quant), DType::F32);
        assert!(loaded.is_quantized(), "{what}");
        let mut want = load(Path::new(&dense), DType::F32);
        assert!(!want.is_quantized());
        want.quantize(format).unwrap();
        assert_eq!(loaded.fingerprint().unwrap(), want.fingerprint().unwrap());
        let sharded = load(Path::new(&requant), DType::F32);
        for n in [40, 5] {
            let toks = tokens(n, 61, 8);
            let got = logits(&loaded, &toks);
            assert_eq!(got, logits(&want, &toks), "{what}, {n} tokens");
            assert_eq!(got, logits(&sharded, &toks), "{what}, {n} tokens, sharded");
        }

        let report = liger_converter::inspect(Path::new(&quant)).unwrap();
        let counted: usize = report.quantized.values().sum();
        assert_eq!(counted, blocks + usize::from(tied), "{what}");
        let dense_report = liger_converter::inspect(Path::new(&dense)).unwrap();
        assert_eq!(report.parameters, dense_report.parameters, "{what}");
        assert!(
            report.weight_bytes < dense_report.weight_bytes / 2,
            "{what}"
        );
        assert!(render_table(&report).contains("quantized: "), "{what}");

        // Blocks are never converted or quantized again: that would dequantize silently.
        let again = path("again");
        for args in [
            vec![
                "quantize", "--model", &quant, "--out", &again, "--format", "q8_0",
            ],
            vec!["convert", "--from", &quant, "--out", &again],
        ] {
            run_err(&args, &["block-quantized", "dense model"]);
            assert!(!Path::new(&again).exists());
        }
    }
}

#[test]
fn inspect_reports_runtime_state_sizes() {
    let root = tempfile::tempdir().unwrap();
    let src = write_source(root.path(), Family::Mistral, 2);
    let out = root.path().join("out");
    run_ok(&[
        "convert",
        "--from",
        &src,
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--full-attention-layers",
        "1",
        "--window",
        "16",
        "--kv-dtype",
        "f16",
    ]);

    let cfg = ModelConfig::from_file(&out.join("config.json")).unwrap();
    let original = ModelConfig::from_json(cfg.to_json_with_liger(None)).unwrap();
    let liger = StateSpec::new(&cfg, DType::F32, &Device::Cpu);
    let kv = StateSpec::new(&original, DType::F32, &Device::Cpu);

    let json: serde_json::Value =
        serde_json::from_str(&run_ok(&["inspect", out.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(json["converted"], true);
    assert_eq!(json["architecture"], "mistral");
    assert_eq!(json["num_layers"], 3);
    assert_eq!(json["dtype"], "float32");
    let params: u64 = TinyCheckpoint::new(Family::Mistral, 2)
        .unwrap()
        .tensors
        .values()
        .map(|t| t.elem_count() as u64)
        .sum();
    assert_eq!(json["parameters"].as_u64(), Some(params));
    let kinds: Vec<&str> = json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["liger", "attention", "liger"]);
    assert_eq!(json["liger"]["window"], 16);
    let state = json["state"].as_array().unwrap();
    assert_eq!(state.len(), 2);
    let table = run_ok(&["inspect", out.to_str().unwrap()]);
    assert!(table.contains("stored in f16"), "{table}");
    // The sizes below are of rows stored in f16, though the model computes in f32.
    assert_eq!(liger.cache_dtype, DType::F16);
    for (row, ctx) in state.iter().zip([4096usize, 32768]) {
        assert_eq!(row["context"].as_u64(), Some(ctx as u64));
        assert_eq!(
            row["liger_bytes"].as_u64(),
            Some(liger.bytes_at(ctx) as u64)
        );
        assert_eq!(
            row["transformer_kv_bytes"].as_u64(),
            Some(kv.bytes_at(ctx) as u64)
        );
        assert!(
            table.contains(&format!("({} B)", liger.bytes_at(ctx))),
            "{table}"
        );
        assert!(
            table.contains(&format!("({} B)", kv.bytes_at(ctx))),
            "{table}"
        );
    }
    assert!(
        table.contains("0: liger") && table.contains("1: full attention (window 5)"),
        "{table}"
    );
    // Mistral's own window (6 keys in Hugging Face counting) bounds the original's cache too.
    assert_eq!(kv.bytes_at(4096), kv.bytes_at(32768));

    // GSA's state is two M x d memories per KV head instead of one d x d: with M = 2 slots
    // (head dim 8) each Liger layer holds half of GLA's recurrent bytes.
    let gsa = root.path().join("gsa");
    run_ok(&[
        "convert",
        "--from",
        &src,
        "--out",
        gsa.to_str().unwrap(),
        "--quiet",
        "--variant",
        "gsa",
        "--slots",
        "2",
    ]);
    let gsa_cfg = ModelConfig::from_file(&gsa.join("config.json")).unwrap();
    let gsa_spec = StateSpec::new(&gsa_cfg, DType::F32, &Device::Cpu);
    let (hkv, d) = (gsa_cfg.num_kv_heads, gsa_cfg.head_dim);
    let window_bytes = 2 * 64 * hkv * d * 4;
    assert_eq!(
        gsa_spec.bytes_at(4096),
        3 * (hkv * 2 * 2 * d * 4 + window_bytes)
    );
    let json: serde_json::Value =
        serde_json::from_str(&run_ok(&["inspect", gsa.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(
        json["state"][0]["liger_bytes"].as_u64(),
        Some(gsa_spec.bytes_at(4096) as u64)
    );
    assert_eq!(json["liger"]["slots"], 2);
    let table = run_ok(&["inspect", gsa.to_str().unwrap()]);
    assert!(table.contains("gsa (2 slots)"), "{table}");

    // An unconverted folder reports only the KV cache.
    let json: serde_json::Value =
        serde_json::from_str(&run_ok(&["inspect", &src, "--json"])).unwrap();
    assert_eq!(json["converted"], false);
    assert!(json["state"][0]["liger_bytes"].is_null());
}

#[test]
fn library_reports_typed_errors() {
    // The library reports errors as values the front end can match on.
    let root = tempfile::tempdir().unwrap();
    let src = write_source(root.path(), Family::Llama, 1);
    let out = root.path().join("o");
    std::fs::create_dir(&out).unwrap();
    let e = liger_converter::convert(&ConvertOptions::new(&src, &out), &Progress::hidden())
        .unwrap_err();
    assert!(matches!(e, liger_converter::Error::OutputExists(_)), "{e}");
}
