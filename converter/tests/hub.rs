//! Hub ids, without a network: a model placed in a private Hugging Face cache (`HF_HOME`)
//! converts when the hub is unreachable or `HF_HUB_OFFLINE` is set, by branch or by commit,
//! and an uncached one fails with one clear line. Nothing here contacts a real host: the
//! "unreachable hub" is a closed port on the loopback address.

mod common;

use std::path::Path;

use candle_core::DType;
use common::*;
use liger_model::testing::{Family, TinyCheckpoint};
use liger_model::LigerConfig;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// `HF_HOME` with `org/tiny` cached at `COMMIT`, which `refs/main` points to.
fn fake_cache(home: &Path) {
    let repo = home.join("hub/models--org--tiny");
    let snap = repo.join("snapshots").join(COMMIT);
    TinyCheckpoint::new(Family::Qwen2, 9)
        .unwrap()
        .write_folder(&snap)
        .unwrap();
    std::fs::write(
        snap.join("tokenizer_config.json"),
        "{\"model_max_length\": 256}\n",
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
}

fn convert_from_hub(
    home: &Path,
    out: &Path,
    env: &[(&str, &str)],
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = bin();
    cmd.args([
        "convert",
        "--from",
        "org/tiny",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ])
    .args(extra)
    .env("HF_HOME", home)
    .env_remove("HF_HUB_OFFLINE")
    .env_remove("HF_ENDPOINT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn cached_hub_model_converts_offline() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("hf");
    fake_cache(&home);

    let out = root.path().join("offline");
    let o = convert_from_hub(&home, &out, &[("HF_HUB_OFFLINE", "1")], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["liger"]["source"], "org/tiny");
    assert_eq!(
        read_json(&out.join("tokenizer_config.json"))["model_max_length"],
        256
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("base_model: org/tiny"), "{card}");
    let want = TinyCheckpoint::new(Family::Qwen2, 9)
        .unwrap()
        .with_liger(&LigerConfig {
            source: Some("org/tiny".into()),
            ..LigerConfig::default()
        })
        .model(DType::F32)
        .unwrap();
    let toks = tokens(20, 61, 1);
    assert_eq!(logits(&load(&out, DType::F32), &toks), logits(&want, &toks));

    // Unreachable hub: falls back to the cache and says so.
    let out2 = root.path().join("unreachable");
    let o = convert_from_hub(&home, &out2, &[("HF_ENDPOINT", "http://127.0.0.1:1")], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("hub unavailable"), "{}", stderr(&o));

    // A commit hash finds its snapshot without a ref.
    std::fs::remove_file(home.join("hub/models--org--tiny/refs/main")).unwrap();
    let out3 = root.path().join("by-commit");
    let o = convert_from_hub(
        &home,
        &out3,
        &[("HF_HUB_OFFLINE", "1")],
        &["--revision", COMMIT],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // Without the ref, `main` is unknown offline.
    let out4 = root.path().join("missing");
    let o = convert_from_hub(&home, &out4, &[("HF_HUB_OFFLINE", "1")], &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.trim().lines().count() == 1
            && err.contains("org/tiny@main: config.json is not in the local cache"),
        "{err}"
    );
    assert_only(root.path(), &["by-commit", "hf", "offline", "unreachable"]);
}
