//! Every way a conversion can fail is reported as one `error:` line with a non-zero exit,
//! and leaves neither an output folder nor a temporary folder behind; an existing output is
//! refused without `--force` (and left untouched) and replaced with it; Ctrl-C removes the
//! partial output.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use liger_model::testing::{Family, TinyCheckpoint};

/// A temp root with the tiny Llama checkpoint at `root/src`.
fn setup() -> (tempfile::TempDir, String, String) {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    TinyCheckpoint::new(Family::Llama, 1)
        .unwrap()
        .write_folder(&src)
        .unwrap();
    let out = root.path().join("out");
    (
        root,
        src.to_str().unwrap().to_owned(),
        out.to_str().unwrap().to_owned(),
    )
}

/// Runs `convert --from src --out out EXTRA` expecting a failure naming `needles`, then
/// checks that only `src` remains in the root.
fn convert_fails(root: &Path, src: &str, out: &str, extra: &[&str], needles: &[&str]) {
    let mut args = vec!["convert", "--from", src, "--out", out];
    args.extend_from_slice(extra);
    run_err(&args, needles);
    assert_only(root, &["src"]);
}

#[test]
fn missing_sources() {
    let (root, src, out) = setup();
    let r = root.path();
    let nowhere = r.join("nowhere").join("model");
    convert_fails(
        r,
        nowhere.to_str().unwrap(),
        &out,
        &[],
        &["no such file or folder"],
    );
    let gguf = r.join("absent.gguf");
    convert_fails(
        r,
        gguf.to_str().unwrap(),
        &out,
        &[],
        &["absent.gguf", "no such GGUF file"],
    );
    convert_fails(
        r,
        "not-a-hub-id",
        &out,
        &[],
        &["not-a-hub-id", "owner/name"],
    );

    std::fs::remove_file(Path::new(&src).join("config.json")).unwrap();
    convert_fails(r, &src, &out, &[], &["config.json", "missing"]);
    TinyCheckpoint::new(Family::Llama, 1)
        .unwrap()
        .write_folder(Path::new(&src))
        .unwrap();
    std::fs::remove_file(Path::new(&src).join("model.safetensors")).unwrap();
    convert_fails(
        r,
        &src,
        &out,
        &[],
        &["model.safetensors", "no safetensors weights"],
    );

    // An index that names a shard which is not there.
    let index = serde_json::json!({"metadata": {"total_size": 1},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(
        Path::new(&src).join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    convert_fails(
        r,
        &src,
        &out,
        &[],
        &["model-00001-of-00002.safetensors", "missing"],
    );

    // `import` only takes GGUF files.
    run_err(
        &["import", "--from", &src, "--out", &out],
        &["not a GGUF file"],
    );
    assert_only(r, &["src"]);
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let (root, src, out) = setup();
    let mut ck = TinyCheckpoint::new(Family::Llama, 1).unwrap();
    ck.config["model_type"] = "gpt2".into();
    ck.config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    ck.write_folder(Path::new(&src)).unwrap();
    convert_fails(
        root.path(),
        &src,
        &out,
        &[],
        &[
            "unsupported architecture `gpt2`",
            "llama",
            "mistral",
            "qwen2",
        ],
    );
}

#[test]
fn corrupt_and_truncated_weights() {
    let (root, src, out) = setup();
    let weights = Path::new(&src).join("model.safetensors");
    let full = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &full[..full.len() - 100]).unwrap();
    convert_fails(
        root.path(),
        &src,
        &out,
        &[],
        &["model.safetensors", "not a valid safetensors file"],
    );
    std::fs::write(&weights, b"garbage").unwrap();
    convert_fails(root.path(), &src, &out, &[], &["model.safetensors"]);
}

#[test]
fn config_contradicting_weights_names_the_tensor() {
    let (root, src, out) = setup();
    let mut ck = TinyCheckpoint::new(Family::Llama, 1).unwrap();
    ck.config["hidden_size"] = 40.into(); // the weights are 32 wide
                                          // The weights were generated before the edit, so they stay 32 wide.
    ck.write_folder(Path::new(&src)).unwrap();
    convert_fails(
        root.path(),
        &src,
        &out,
        &[],
        &[
            "config.json contradicts the weights",
            "model.embed_tokens.weight",
            "[61, 32]",
            "[61, 40]",
        ],
    );

    // A tensor the model needs is absent.
    let mut ck = TinyCheckpoint::new(Family::Qwen2, 1).unwrap();
    ck.tensors.remove("model.layers.1.self_attn.v_proj.bias");
    ck.write_folder(Path::new(&src)).unwrap();
    convert_fails(
        root.path(),
        &src,
        &out,
        &[],
        &["model.layers.1.self_attn.v_proj.bias", "missing"],
    );
}

#[test]
fn bad_flag_values() {
    let (root, src, out) = setup();
    let r = root.path();
    convert_fails(
        r,
        &src,
        &out,
        &["--window", "0"],
        &["--window", "at least 1"],
    );
    convert_fails(r, &src, &out, &["--mix", "1.5"], &["--mix", "1.5"]);
    convert_fails(
        r,
        &src,
        &out,
        &["--slots", "4"],
        &["--slots", "only --variant gsa"],
    );
    // The tiny model's head dim is 8: 3 slots cannot pool it, nor can the default 64.
    convert_fails(
        r,
        &src,
        &out,
        &["--variant", "gsa", "--slots", "3"],
        &["--slots", "3 does not divide", "head dim 8"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &["--variant", "gsa"],
        &["--slots", "64 does not divide"],
    );
    convert_fails(r, &src, &out, &["--mix", "-0.1"], &["--mix"]);
    // Sinks take places in the global cache; places beyond them need a GLA/HGRN2 memory.
    convert_fails(
        r,
        &src,
        &out,
        &["--sinks", "4", "--global-cache", "2"],
        &["--sinks", "--global-cache 4"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &["--variant", "gsa", "--slots", "4", "--global-cache", "8"],
        &["--global-cache", "gsa"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &[
            "--global-cache",
            "4",
            "--sinks",
            "2",
            "--attention-places",
            "3",
        ],
        &["--attention-places", "--global-cache 5"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &[
            "--global-cache",
            "4",
            "--window",
            "8",
            "--max-distance",
            "8",
        ],
        &["--max-distance", "must exceed --window 8"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &["--gate-normalizer", "0"],
        &["--gate-normalizer"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &["--full-attention-layers", "1,3"],
        &[
            "--full-attention-layers",
            "layer 3 is out of range",
            "3 layers",
        ],
    );
    convert_fails(
        r,
        &src,
        &out,
        &["--full-attention-layers", "every:9"],
        &["every:9"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &["--full-attention-layers", "every:x"],
        &["every:N"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &["--full-attention-layers", "0,1,2"],
        &["every layer"],
    );
    convert_fails(
        r,
        &src,
        &out,
        &["--full-attention-layers", "1,1"],
        &["listed twice"],
    );
    // Values clap itself rejects are one line too.
    convert_fails(r, &src, &out, &["--variant", "mamba"], &["mamba"]);
    convert_fails(r, &src, &out, &["--dtype", "f8"], &["f8"]);
    convert_fails(r, &src, &out, &["--window", "many"], &["many"]);
    convert_fails(
        r,
        &src,
        &out,
        &["--max-shard-size", "2XB"],
        &["unknown unit"],
    );
}

#[test]
fn existing_output_needs_force() {
    let (root, src, out) = setup();
    let outp = Path::new(&out);
    std::fs::create_dir(outp).unwrap();
    std::fs::write(outp.join("keep.txt"), "mine").unwrap();
    run_err(
        &["convert", "--from", &src, "--out", &out],
        &["already exists", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(outp.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_only(root.path(), &["out", "src"]);

    // A failing --force run keeps the old folder too.
    run_err(
        &[
            "convert", "--from", &src, "--out", &out, "--force", "--window", "0",
        ],
        &["--window"],
    );
    run_err(
        &[
            "convert",
            "--from",
            "/no/such/src",
            "--out",
            &out,
            "--force",
        ],
        &["no such"],
    );
    assert_eq!(entries(outp), ["keep.txt"]);

    run_ok(&[
        "convert", "--from", &src, "--out", &out, "--force", "--quiet",
    ]);
    assert!(!outp.join("keep.txt").exists());
    assert_eq!(
        entries(outp),
        ["README.md", "config.json", "model.safetensors"]
    );
    assert_only(root.path(), &["out", "src"]);

    // Replacing the source itself (or a folder holding it) is refused even with --force.
    run_err(
        &["convert", "--from", &src, "--out", &src, "--force"],
        &["--out", "would delete the source"],
    );
    run_err(
        &[
            "convert",
            "--from",
            &src,
            "--out",
            root.path().to_str().unwrap(),
            "--force",
        ],
        &["would delete the source"],
    );
    assert_only(root.path(), &["out", "src"]);
    assert!(Path::new(&src).join("model.safetensors").is_file());

    // Also refused: `import` over an existing folder, before the GGUF is even looked at.
    run_err(
        &["import", "--from", "/no/such.gguf", "--out", &out],
        &["already exists"],
    );
}

/// Writes a GGUF header by hand: one metadata string and one tensor of GGML type `ty`.
fn handmade_gguf(path: &Path, ty: u32) {
    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensor count
    b.extend(1u64.to_le_bytes()); // metadata count
    put_str(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string value
    put_str(&mut b, "llama");
    put_str(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(8u64.to_le_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32 + 256 * 8 * 4, 0);
    std::fs::write(path, b).unwrap();
}

#[test]
fn bad_gguf_files() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let out = r.join("out");
    let out = out.to_str().unwrap();

    // The real fixture, cut short.
    let fixture = std::fs::read(smollm2_gguf()).unwrap();
    let cut = r.join("cut.gguf");
    std::fs::write(&cut, &fixture[..fixture.len() / 3]).unwrap();
    drop(fixture);
    for cmd in ["import", "convert"] {
        run_err(
            &[cmd, "--from", cut.to_str().unwrap(), "--out", out],
            &["cut.gguf", "truncated"],
        );
    }

    let iq2 = r.join("iq2.gguf");
    handmade_gguf(&iq2, 16);
    run_err(
        &["import", "--from", iq2.to_str().unwrap(), "--out", out],
        &["token_embd.weight", "IQ2_XXS", "not supported"],
    );

    let junk = r.join("junk.gguf");
    std::fs::write(&junk, b"{\"not\": \"gguf\"}").unwrap();
    run_err(
        &["convert", "--from", junk.to_str().unwrap(), "--out", out],
        &["not a GGUF file"],
    );
    assert_only(r, &["cut.gguf", "iq2.gguf", "junk.gguf"]);
}

#[test]
fn interrupt_removes_the_partial_output() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let out = r.join("out");
    let gguf = smollm2_gguf();
    let mut child = bin()
        .args([
            "import",
            "--from",
            gguf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The partial folder exists from before the GGUF is decoded until the rename.
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        if let Some(p) = entries(r)
            .into_iter()
            .find(|n| n.starts_with(".out.partial-"))
        {
            break p;
        }
        assert!(Instant::now() < deadline, "no partial folder appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "import finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(partial.ends_with(&child.id().to_string()));
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_eq!(status.code(), Some(130));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("interrupted"), "{err}");
    assert_only(r, &[]);
}

#[test]
fn log_format_is_checked_and_json_is_one_object_per_line() {
    let (root, src, out) = setup();
    let o = bin()
        .env("LIGER_LOG_FORMAT", "xml")
        .args(["inspect", &src])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with("error: ") && err.contains("LIGER_LOG_FORMAT"),
        "{err}"
    );
    assert_only(root.path(), &["src"]);

    // For log collectors (the prepare job in a container): JSON lines, no colour codes.
    // Converting a conversion again logs a warning.
    run_ok(&["convert", "--from", &src, "--out", &out, "-q"]);
    let again = root.path().join("again");
    let o = bin()
        .env("LIGER_LOG_FORMAT", "json")
        .args([
            "convert",
            "--from",
            &out,
            "--out",
            again.to_str().unwrap(),
            "-q",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let logs: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(
        logs.iter()
            .any(|l| l.contains("already a Liger conversion")),
        "no JSON warning in:\n{err}"
    );
    for l in &logs {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string(), "{l}");
    }
    assert!(!err.contains('\u{1b}'), "{err}");
}
