//! Recovery and evaluation on tiny random models: each stage lowers its loss, the merged
//! output computes what base + adapter computes, a resumed run ends on the same bits as an
//! uninterrupted one (and the same seed twice gives the same result), bad data files are
//! reported on one line, a model evaluated against itself scores ratio 1 and 100%, and
//! `self-distill` writes the very conversations `recover --self-distill` trains on.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::*;
use liger_converter::recover::StageChoice;
use liger_converter::{EvalOptions, Progress, RecoverOptions, SelfDistillOptions};
use liger_model::layers::Quantization;
use liger_model::lora;
use liger_model::testing::{Family, TinyCheckpoint};
use liger_model::LigerConfig;
use serde_json::json;

/// `root/teacher` (tiny Llama) and `root/student` (its Liger conversion), with tokenizers.
fn pair(root: &Path) -> (PathBuf, PathBuf) {
    single_threaded();
    let (t, s) = (root.join("teacher"), root.join("student"));
    let ck = TinyCheckpoint::new(Family::Llama, 5).unwrap();
    ck.write_folder(&t).unwrap();
    let liger = LigerConfig {
        window: 3,
        ..Default::default()
    };
    TinyCheckpoint::new(Family::Llama, 5)
        .unwrap()
        .with_liger(&liger)
        .write_folder(&s)
        .unwrap();
    for d in [&t, &s] {
        std::fs::write(d.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
        std::fs::write(
            d.join("tokenizer_config.json"),
            r#"{"eos_token": "<|im_end|>"}"#,
        )
        .unwrap();
    }
    (t, s)
}

const TEXT: &str =
    "the quick brown fox jumps over the lazy dog. a cat sat on the mat, and the dog ran off!\n\
    we test small models with short text: it is fast, and it is enough to see a loss go down.\n";

/// A text file and a JSON Lines file of conversations.
fn data(root: &Path) -> Vec<PathBuf> {
    let txt = root.join("train.txt");
    std::fs::write(&txt, TEXT.repeat(2)).unwrap();
    let jsonl = root.join("chat.jsonl");
    let lines = [
        json!({"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there, friend!"}]}),
        json!({"messages": [{"role": "user", "content": "count to five"}, {"role": "assistant", "content": "1, 2, 3, 4, 5."}]}),
        json!({"text": "plain text in a json line works too."}),
    ];
    std::fs::write(&jsonl, lines.map(|l| l.to_string()).join("\n")).unwrap();
    vec![txt, jsonl]
}

fn options(root: &Path, out: &str, stage: StageChoice) -> RecoverOptions {
    single_threaded();
    let (t, s) = pair(root);
    let mut o = RecoverOptions::new(t, s, data(root), root.join(out));
    o.stage = stage;
    o.seq_len = 32;
    o.batch = 2;
    o.steps = Some(4);
    o.checkpoint_every = 2;
    o.adapter_only = true;
    o
}

fn recovery_json(dir: &Path) -> serde_json::Value {
    read_json(&dir.join("recovery.json"))
}

fn losses(v: &serde_json::Value, stage: usize) -> Vec<f64> {
    v["stages"][stage]["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn each_stage_lowers_its_loss() {
    for (stage, lr) in [
        (StageChoice::Transfer, 1e-2),
        (StageChoice::Distill, 1e-2),
        (StageChoice::Lm, 1e-2),
    ] {
        let root = tempfile::tempdir().unwrap();
        let mut o = options(root.path(), "out", stage);
        // One batch holding all the data, so every step sees the same examples.
        o.seq_len = 512;
        o.batch = 4;
        o.steps = Some(8);
        o.lr = Some(lr);
        let s = liger_converter::recover(&o, &Progress::hidden()).unwrap();
        let v = recovery_json(&s.out);
        let l = losses(&v, 0);
        assert_eq!(l.len(), 8);
        assert!(
            l[7] < 0.9 * l[0],
            "{stage:?}: loss {} -> {} did not fall",
            l[0],
            l[7]
        );
        if stage == StageChoice::Transfer {
            // Every Liger layer improved, and the per-layer record is there.
            let layers = v["stages"][0]["layers"].as_array().unwrap();
            assert_eq!(layers.len(), 3);
            for x in layers {
                assert!(x["last"].as_f64() < x["first"].as_f64(), "{x}");
            }
        }
        let names = entries(&s.out);
        assert_eq!(
            names,
            [
                "README.md",
                "adapter_config.json",
                "adapter_model.safetensors",
                "recovery.json"
            ]
        );
    }
}

#[test]
fn merged_output_computes_base_plus_adapter() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let mut o = options(r, "adapter", StageChoice::All);
    o.steps = Some(3);
    o.lr = Some(1e-2);
    liger_converter::recover(&o, &Progress::hidden()).unwrap();
    o.adapter_only = false;
    o.out = r.join("merged");
    liger_converter::recover(&o, &Progress::hidden()).unwrap();

    let merged_dir = r.join("merged");
    assert_eq!(
        entries(&merged_dir),
        [
            "README.md",
            "config.json",
            "model.safetensors",
            "recovery.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert!(read_json(&merged_dir.join("config.json"))["liger"].is_object());
    let merged = load(&merged_dir, DType::F32);
    let mut base = load(&o.student, DType::F32);
    let (cfg, tensors) = lora::load_adapter(&r.join("adapter")).unwrap();
    assert_eq!(tensors.len(), 3 * 3 * 2);
    base.apply_lora(&cfg, &tensors).unwrap();
    let toks = tokens(40, 61, 9);
    let (a, b) = (logits(&merged, &toks), logits(&base, &toks));
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "merged vs base + adapter: {diff}");
    // The adapter moved the model away from the zero-shot conversion.
    let zero_shot = logits(&load(&o.student, DType::F32), &toks);
    let moved = a
        .iter()
        .flatten()
        .zip(zero_shot.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "{moved}");

    // apply-adapter gives the same folder contents as recover's merge.
    let applied = r.join("applied");
    run_ok(&[
        "apply-adapter",
        "--model",
        o.student.to_str().unwrap(),
        "--adapter",
        r.join("adapter").to_str().unwrap(),
        "--out",
        applied.to_str().unwrap(),
        "--quiet",
    ]);
    let c = logits(&load(&applied, DType::F32), &toks);
    let diff = a
        .iter()
        .flatten()
        .zip(c.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "apply-adapter vs merged: {diff}");
    assert!(applied.join("tokenizer.json").is_file());

    // --quantize stores the merged projections as blocks: exactly what quantizing the dense
    // merge at load time gives. A quantized base takes no merge.
    let applied_q = r.join("applied-q8");
    let adapter_dir = r.join("adapter");
    let apply = |model: &Path, out: &Path| {
        vec![
            "apply-adapter".to_owned(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--adapter".into(),
            adapter_dir.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--quantize".into(),
            "q8_0".into(),
        ]
    };
    let printed = run_ok(
        &apply(&o.student, &applied_q)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(printed.contains("with q8_0 projections"), "{printed}");
    let mut at_load = load(&applied, DType::F32);
    at_load.quantize(Quantization::Q8_0).unwrap();
    let quantized = load(&applied_q, DType::F32);
    assert!(quantized.is_quantized());
    assert_eq!(logits(&quantized, &toks), logits(&at_load, &toks));
    let refused = r.join("refused");
    run_err(
        &apply(&applied_q, &refused)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &["quantized checkpoint", "dense model"],
    );
    assert!(!refused.exists());

    // eval --adapter on the base equals eval of the merged model.
    let mut e = EvalOptions::new(&merged_dir, data(r));
    e.seq_len = 64;
    let m = liger_converter::evaluate(&e, &Progress::hidden()).unwrap();
    e.model = o.student.clone();
    e.adapter = Some(r.join("adapter"));
    let a = liger_converter::evaluate(&e, &Progress::hidden()).unwrap();
    assert!(
        (m.model.nll - a.model.nll).abs() < 1e-4,
        "{} vs {}",
        m.model.nll,
        a.model.nll
    );
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(lora::ADAPTER_WEIGHTS)).unwrap()
}

#[test]
fn resumed_runs_end_on_the_same_bits() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let mut o = options(r, "full", StageChoice::All);
    o.self_distill = 3;
    o.self_distill_tokens = 6;
    let full = liger_converter::recover(&o, &Progress::hidden()).unwrap();
    let want = adapter_bytes(&full.out);

    // Same seed again: same bits. Another seed: different ones.
    o.out = r.join("again");
    assert_eq!(
        adapter_bytes(
            &liger_converter::recover(&o, &Progress::hidden())
                .unwrap()
                .out
        ),
        want
    );
    o.out = r.join("other-seed");
    o.seed = 1;
    assert_ne!(
        adapter_bytes(
            &liger_converter::recover(&o, &Progress::hidden())
                .unwrap()
                .out
        ),
        want
    );
    o.seed = 0;

    // Interrupted mid-transfer (step 3: the last checkpoint is step 2), in distill (step 6 of
    // 8), and right at the stage boundary (step 4): each resume ends on the same bits.
    for (name, stop) in [("mid-transfer", 3), ("mid-distill", 6), ("boundary", 4)] {
        o.out = r.join(name);
        o.stop_after = Some(stop);
        let err = liger_converter::recover(&o, &Progress::hidden()).unwrap_err();
        assert!(err.to_string().contains("--resume"), "{err}");
        assert!(!o.out.exists());
        let ckpt = r.join(format!("{name}.ckpt"));
        assert!(ckpt.join("latest/meta.json").is_file());
        assert!(ckpt.join("selfdistill.jsonl").is_file());

        // Without --resume the checkpoint is not silently overwritten.
        o.stop_after = None;
        let err = liger_converter::recover(&o, &Progress::hidden()).unwrap_err();
        assert!(err.to_string().contains("--resume"), "{err}");

        o.resume = true;
        let s = liger_converter::recover(&o, &Progress::hidden()).unwrap();
        o.resume = false;
        assert!(s.resumed);
        assert_eq!(adapter_bytes(&s.out), want, "{name}: resumed run differs");
        assert!(!ckpt.exists(), "the checkpoint is removed after success");
        let v = recovery_json(&s.out);
        assert_eq!(losses(&v, 0).len(), 4);
        assert_eq!(losses(&v, 1).len(), 4);
    }
}

#[test]
fn resume_refuses_other_settings() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let mut o = options(r, "out", StageChoice::Transfer);
    o.stop_after = Some(2);
    liger_converter::recover(&o, &Progress::hidden()).unwrap_err();
    o.stop_after = None;
    o.resume = true;
    o.seed = 7;
    let err = liger_converter::recover(&o, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(err.contains("seed: 0 vs 7"), "{err}");
}

#[test]
fn the_cli_runs_recover_with_resume() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (t, s) = pair(r);
    let files = data(r);
    let out = r.join("out");
    let base = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "recover",
            "--teacher",
            t.to_str().unwrap(),
            "--student",
            s.to_str().unwrap(),
            "--data",
            files[0].to_str().unwrap(),
            files[1].to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--stage",
            "lm",
            "--steps",
            "4",
            "--checkpoint-every",
            "2",
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--targets",
            "q_proj,v_proj",
            "--quiet",
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let args = base(&["--stop-after", "2"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_err(&refs, &["stopped after 2 steps", "--resume"]);
    let args = base(&["--resume"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&refs);
    let model = load(&out, DType::F32);
    assert_eq!(model.config().vocab_size, 61);
    assert!(std::fs::read_to_string(out.join("README.md"))
        .unwrap()
        .contains("--stage lm"));
    let cfg = read_json(&out.join("recovery.json"));
    assert_eq!(cfg["lora"]["rank"], 4);
    assert_eq!(cfg["lora"]["targets"], json!(["q_proj", "v_proj"]));
}

#[test]
fn bad_data_files_are_named_on_one_line() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (t, s) = pair(r);
    let out = r.join("out");
    let check = |name: &str, body: Option<&[u8]>, needles: &[&str]| {
        let f = r.join(name);
        if let Some(b) = body {
            std::fs::write(&f, b).unwrap();
        }
        run_err(
            &[
                "recover",
                "--teacher",
                t.to_str().unwrap(),
                "--student",
                s.to_str().unwrap(),
                "--data",
                f.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--quiet",
            ],
            needles,
        );
        assert!(!out.exists());
        assert!(!r.join("out.ckpt").exists());
    };
    check("missing.txt", None, &["missing.txt", "no such file"]);
    check("empty.txt", Some(b"\n \n"), &["empty.txt", "empty"]);
    check(
        "bad.jsonl",
        Some(b"{\"text\": \"ok\"}\n{\"text\": oops}\n"),
        &["bad.jsonl", "line 2", "invalid JSON"],
    );
    check(
        "norole.jsonl",
        Some(br#"{"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]}"#),
        &["norole.jsonl", "line 1", "messages[1] has no `role`"],
    );
    check(
        "latin1.txt",
        Some(b"caf\xe9\n"),
        &["latin1.txt", "not UTF-8", "line 1"],
    );
    check(
        "what.jsonl",
        Some(br#"{"input": "x"}"#),
        &["what.jsonl", "line 1", "`text`, `messages` or `prompt`"],
    );
    // Flags.
    run_err(
        &[
            "recover",
            "--teacher",
            t.to_str().unwrap(),
            "--student",
            t.to_str().unwrap(),
            "--data",
            r.join("empty.txt").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
        &["--student", "not a Liger conversion"],
    );
    run_err(
        &[
            "recover",
            "--teacher",
            t.to_str().unwrap(),
            "--student",
            s.to_str().unwrap(),
            "--self-distill",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cuda",
            "--quiet",
        ],
        &["--device"],
    );
}

#[test]
fn eval_of_a_model_against_itself_is_perfect() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (t, s) = pair(r);
    let files = data(r);
    let json_out = run_ok(&[
        "eval",
        "--model",
        s.to_str().unwrap(),
        "--reference",
        s.to_str().unwrap(),
        "--data",
        files[0].to_str().unwrap(),
        files[1].to_str().unwrap(),
        "--seq-len",
        "64",
        "--json",
        "--quiet",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert!(
        (v["perplexity_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{v}"
    );
    assert_eq!(v["agreement"].as_f64().unwrap(), 1.0);
    assert!(v["kl"].as_f64().unwrap().abs() < 1e-6);
    assert!(v["tokens"].as_u64().unwrap() > 100);

    // Against the teacher: a real gap, shown as a table.
    let table = run_ok(&[
        "eval",
        "--model",
        s.to_str().unwrap(),
        "--reference",
        t.to_str().unwrap(),
        "--data",
        files[0].to_str().unwrap(),
        "--quiet",
    ]);
    for needle in ["perplexity ratio", "top-1 agreement", "KL(ref || model)"] {
        assert!(table.contains(needle), "{table}");
    }
    // Several models in one table (teacher and student, an adapter slot left empty), with
    // state sizes from the runtime and timed decode steps.
    let compare = |format: &str| {
        let mut args = vec![
            "eval",
            "--model",
            t.to_str().unwrap(),
            "--model",
            s.to_str().unwrap(),
            "--adapter",
            "-",
            "--adapter",
            "-",
            "--reference",
            t.to_str().unwrap(),
            "--data",
            files[0].to_str().unwrap(),
            "--seq-len",
            "64",
            "--latency",
            "--quiet",
        ];
        if format == "json" {
            args.push("--json");
        }
        run_ok(&args)
    };
    let v: serde_json::Value = serde_json::from_str(&compare("json")).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!((rows[0]["perplexity_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    for (row, dir) in rows.iter().zip([&t, &s]) {
        let m = liger_model::checkpoint::load_model(dir, DType::F32, &Device::Cpu).unwrap();
        let want = m.state_spec().bytes_by_kind_at(64);
        assert_eq!(row["state"]["total"].as_u64(), Some(want.total() as u64));
        assert_eq!(
            row["state"]["kv_cache"].as_u64(),
            Some(want.kv_cache as u64)
        );
        assert!(row["decode_ms_per_token"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(
        rows[0]["state"]["recurrent"], 0,
        "the teacher keeps a KV cache only"
    );
    assert!(rows[1]["state"]["recurrent"].as_u64().unwrap() > 0);
    let table = compare("table");
    assert!(
        table.contains("| model | perplexity | ratio |") && table.matches("| 1.00x |").count() == 1,
        "{table}"
    );
    run_err(
        &[
            "eval",
            "--model",
            t.to_str().unwrap(),
            "--model",
            s.to_str().unwrap(),
            "--adapter",
            t.to_str().unwrap(),
            "--data",
            files[0].to_str().unwrap(),
        ],
        &["--adapter: 1 given for 2 --model"],
    );

    // Without a reference: perplexity only.
    let mut e = EvalOptions::new(&t, vec![files[0].clone()]);
    e.device = liger_converter::DeviceChoice::Cpu;
    let rep = liger_converter::evaluate(&e, &Progress::hidden()).unwrap();
    assert!(rep.reference.is_none() && rep.agreement.is_none());
    assert!(rep.model.perplexity > 1.0);
    assert!(rep.by_context.iter().all(|b| b.perplexity_ratio.is_none()));

    // By context length: the buckets split the positions (1-64, 65-128, 129-256 tokens of
    // context at seq_len 200), and their token-weighted means are the whole data's.
    let mut e = EvalOptions::new(&s, files.clone());
    e.reference = Some(t.clone());
    e.seq_len = 200;
    let rep = liger_converter::evaluate(&e, &Progress::hidden()).unwrap();
    let ranges: Vec<_> = rep.by_context.iter().map(|b| (b.from, b.to)).collect();
    assert_eq!(ranges, [(1, 64), (65, 128), (129, 256)]);
    let n: u64 = rep.by_context.iter().map(|b| b.tokens).sum();
    assert_eq!(n, rep.tokens);
    let mean = |f: &dyn Fn(&liger_converter::eval::ContextBucket) -> f64| {
        rep.by_context
            .iter()
            .map(|b| b.tokens as f64 * f(b))
            .sum::<f64>()
            / n as f64
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    assert!(
        close(mean(&|b| b.perplexity.ln()), rep.model.nll),
        "{rep:?}"
    );
    assert!(close(
        mean(&|b| b.perplexity_ratio.unwrap().ln()),
        rep.perplexity_ratio.unwrap().ln()
    ));
    assert!(close(
        mean(&|b| b.agreement.unwrap()),
        rep.agreement.unwrap()
    ));
    assert!(close(mean(&|b| b.kl.unwrap()), rep.kl.unwrap()));
    let table = liger_converter::eval::render(&rep);
    assert!(
        table.contains("65-128") && table.contains("agreement"),
        "{table}"
    );
    let _ = Device::Cpu;
}

#[test]
fn init_adapter_continues_where_an_earlier_run_stopped() {
    let root = tempfile::tempdir().unwrap();
    let mut first = options(root.path(), "first", StageChoice::Distill);
    first.seq_len = 512;
    first.batch = 4;
    first.steps = Some(6);
    first.lr = Some(1e-2);
    let a = liger_converter::recover(&first, &Progress::hidden()).unwrap();
    let trained = losses(&recovery_json(&a.out), 0);

    // The same data and schedule, started from the first run's adapter: its first loss is
    // where the first run ended, not where a fresh adapter starts.
    let mut second = first.clone();
    second.out = root.path().join("second");
    second.init_adapter = Some(a.out.clone());
    let b = liger_converter::recover(&second, &Progress::hidden()).unwrap();
    let continued = losses(&recovery_json(&b.out), 0);
    assert!(
        continued[0] < 0.95 * trained[0] && continued[0] <= trained[5] * 1.05,
        "fresh start {} -> {}; continued from {}",
        trained[0],
        trained[5],
        continued[0]
    );

    // A lower rank is refused by name: it would drop part of the adapter.
    let mut wrong = second.clone();
    wrong.out = root.path().join("wrong");
    wrong.lora.rank = 4;
    wrong.lora.alpha = 4.0;
    let e = liger_converter::recover(&wrong, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--init-adapter") && e.contains("rank 8"), "{e}");
    assert!(!root.path().join("wrong").exists());

    // Naming more projections grows the adapter: the new ones start at B = 0, so the first
    // loss is the continued run's, and the result adapts o_proj too.
    let mut grown = second.clone();
    grown.out = root.path().join("grown");
    grown.lora.targets.push("o_proj".into());
    let g = liger_converter::recover(&grown, &Progress::hidden()).unwrap();
    let grown_losses = losses(&recovery_json(&g.out), 0);
    assert_same_first_loss("grown", grown_losses[0], continued[0]);
    let (cfg, tensors) = lora::load_adapter(&g.out).unwrap();
    assert!(
        cfg.targets.contains(&"o_proj".to_string()),
        "{:?}",
        cfg.targets
    );
    let o_b = tensors
        .iter()
        .find(|(n, _)| n.contains(".o_proj.lora_B"))
        .map(|(_, t)| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .expect("an o_proj adapter");
    assert!(o_b > 0.0, "o_proj's B trained away from zero");

    // Fewer projections than the adapter has is refused: that would drop its training.
    let mut shrunk = second.clone();
    shrunk.out = root.path().join("shrunk");
    shrunk.lora.targets = vec!["q_proj".into()];
    let e = liger_converter::recover(&shrunk, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least its projections"), "{e}");

    // A higher rank widens the adapter: its slots come first, the new ones start at B = 0,
    // and B is rescaled for the new alpha / rank (here 8 / 8 -> 8 / 16), so the first loss
    // is again the continued run's.
    let mut widened = second.clone();
    widened.out = root.path().join("widened");
    widened.lora.rank = 16;
    let w = liger_converter::recover(&widened, &Progress::hidden()).unwrap();
    let widened_losses = losses(&recovery_json(&w.out), 0);
    assert_same_first_loss("widened", widened_losses[0], continued[0]);
    let (cfg, tensors) = lora::load_adapter(&w.out).unwrap();
    assert_eq!((cfg.rank, cfg.alpha), (16, 8.0));
    let (name, b) = tensors
        .iter()
        .find(|(n, _)| n.contains(".q_proj.lora_B"))
        .expect("a q_proj adapter");
    assert_eq!(b.dims()[1], 16, "{name}");
    let new_half = b.narrow(1, 8, 8).unwrap().abs().unwrap().max_all().unwrap();
    assert!(
        new_half.to_scalar::<f32>().unwrap() > 0.0,
        "the new slots trained"
    );
}

/// A run that started from an earlier adapter plus fresh parts (B = 0) must begin exactly
/// where the earlier adapter alone did.
fn assert_same_first_loss(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "{what} {got} vs continued {want}"
    );
}

/// A prompt file of two questions.
fn prompt_file(root: &Path) -> PathBuf {
    let f = root.join("prompts.jsonl");
    let lines = [
        json!({"prompt": "name a color."}),
        json!({"messages": [{"role": "user", "content": "what is two and two?"}]}),
    ];
    std::fs::write(&f, lines.map(|l| l.to_string()).join("\n")).unwrap();
    f
}

#[test]
fn self_distill_writes_what_recover_trains_on() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let prompts = prompt_file(r);

    // `recover --self-distill 3 --self-distill-save`: generation inside a training run.
    let mut o = options(r, "out", StageChoice::Lm);
    o.steps = Some(1);
    o.self_distill = 3;
    o.self_distill_tokens = 6;
    o.self_distill_save = Some(r.join("from-recover.jsonl"));
    o.data.push(prompts.clone());
    liger_converter::recover(&o, &Progress::hidden()).unwrap();
    let want = std::fs::read_to_string(r.join("from-recover.jsonl")).unwrap();

    // The command alone writes the same conversations: same prompts, seed and length.
    let mut d = SelfDistillOptions::new(r.join("teacher"), 3, r.join("chats.jsonl"));
    d.prompts = vec![prompts];
    d.max_tokens = 6;
    let s = liger_converter::self_distill(&d, &Progress::hidden()).unwrap();
    let got = std::fs::read_to_string(&d.out).unwrap();
    assert_eq!(got, want);

    // The jobs are both prompts in order, then the first again (the sampled second pass);
    // an empty answer (the random model's first token ends the turn) is dropped.
    let rows: Vec<serde_json::Value> = got
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), s.conversations);
    assert!(s.conversations >= 1, "every answer was empty");
    assert!(s.answer_tokens >= s.conversations && s.answer_tokens <= 3 * 6);
    let mut jobs = ["name a color.", "what is two and two?", "name a color."].iter();
    for row in &rows {
        let q = row["messages"][0]["content"].as_str().unwrap();
        assert!(jobs.any(|j| *j == q), "{q:?} out of order");
        assert_eq!(row["messages"][1]["role"], "assistant");
        assert!(!row["messages"][1]["content"].as_str().unwrap().is_empty());
    }

    // No temporary file is left, an existing output is kept without --force, and with it
    // the same seed writes the same bytes again.
    let leftovers: Vec<_> = std::fs::read_dir(r)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty());
    let err = liger_converter::self_distill(&d, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    d.force = true;
    liger_converter::self_distill(&d, &Progress::hidden()).unwrap();
    assert_eq!(std::fs::read_to_string(&d.out).unwrap(), want);
}

#[test]
fn the_cli_runs_self_distill_and_names_bad_input() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (t, _) = pair(r);
    let (t, out) = (t.to_str().unwrap(), r.join("chats.jsonl"));
    let out = out.to_str().unwrap();

    // Built-in prompts when no file is given.
    run_ok(&[
        "self-distill",
        "--teacher",
        t,
        "--count",
        "2",
        "--max-tokens",
        "4",
        "--out",
        out,
        "--quiet",
    ]);
    let text = std::fs::read_to_string(out).unwrap();
    let builtin = &liger_converter::recover::prompts::PROMPTS[..2];
    assert!((1..=2).contains(&text.lines().count()), "{text}");
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let q = row["messages"][0]["content"].as_str().unwrap();
        assert!(builtin.contains(&q), "{q:?}");
    }

    let base = |extra: &[&str], needles: &[&str]| {
        let mut a = vec!["self-distill", "--teacher", t, "--out", out];
        a.extend_from_slice(extra);
        run_err(&a, needles);
    };
    base(&["--count", "2"], &["already exists", "--force"]);
    base(&["--count", "0", "--force"], &["--count", "at least 1"]);
    base(
        &["--count", "1", "--max-tokens", "0", "--force"],
        &["--max-tokens"],
    );
    let text_only = r.join("notes.jsonl");
    std::fs::write(&text_only, r#"{"text": "no question here"}"#).unwrap();
    base(
        &[
            "--count",
            "1",
            "--force",
            "--prompts",
            text_only.to_str().unwrap(),
        ],
        &["notes.jsonl", "no prompts"],
    );
    // A failed run leaves the earlier file as it was.
    assert_eq!(std::fs::read_to_string(out).unwrap(), text);
}

#[test]
fn segmented_distillation_is_exact_forward_and_learns() {
    // Chunks far longer than the 3-token window, run in pieces of 16 tokens with the state
    // carried across: the forward pass (hence the first loss) is the whole chunk's, and
    // the loss still falls although the gradient stops at piece boundaries. Also with a
    // global cache, whose state is carried the same way.
    for global in [false, true] {
        let root = tempfile::tempdir().unwrap();
        let mut whole = options(root.path(), "whole", StageChoice::Distill);
        whole.seq_len = 512;
        whole.batch = 4;
        whole.steps = Some(6);
        whole.lr = Some(1e-2);
        if global {
            let cfg = whole.student.join("config.json");
            let mut v = read_json(&cfg);
            v["liger"]["global_cache"] = json!(4);
            v["liger"]["sinks"] = json!(1);
            std::fs::write(&cfg, v.to_string()).unwrap();
        }
        let a = liger_converter::recover(&whole, &Progress::hidden()).unwrap();
        let mut pieces = whole.clone();
        pieces.out = root.path().join("pieces");
        pieces.segment = 16;
        let b = liger_converter::recover(&pieces, &Progress::hidden()).unwrap();
        let (lw, lp) = (
            losses(&recovery_json(&a.out), 0),
            losses(&recovery_json(&b.out), 0),
        );
        assert_same_first_loss("segmented", lp[0], lw[0]);
        assert!(
            lp[5] < 0.9 * lp[0],
            "global {global}: segmented loss {} -> {} did not fall",
            lp[0],
            lp[5]
        );
        assert_eq!(recovery_json(&b.out)["segment"], json!(16));
    }
}
