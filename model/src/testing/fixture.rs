//! The SmolLM2-135M-Instruct fixture and the golden references beside the repository, for
//! every crate's tests and benchmarks.
//!
//! Tests that need the fixture fail (never skip) when it cannot be obtained, so a green run
//! always means the real model was checked. These helpers panic with a message that says
//! what to do, which is what a test wants.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of the `model` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the model crate lives inside the workspace")
        .to_path_buf()
}

/// Path of the SmolLM2-135M-Instruct Q4_1 GGUF: `$LIGER_SMOLLM2_GGUF` if set, otherwise the
/// file `scripts/fetch-smollm2.sh` downloads (sha256-checked) or finds in its cache.
pub fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("LIGER_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "LIGER_SMOLLM2_GGUF={} is not a file",
            p.display()
        );
        return p;
    }
    let script = workspace_root().join("scripts/fetch-smollm2.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}); set LIGER_SMOLLM2_GGUF to a local copy of the fixture.\nstderr:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("{} printed no path", script.display()));
    let path = PathBuf::from(last.trim());
    assert!(
        path.is_file(),
        "{} printed `{}`, which is not a file",
        script.display(),
        path.display()
    );
    path
}

/// The golden references: `shared/golden` beside the repository.
pub fn golden_dir() -> PathBuf {
    let dir = workspace_root().join("../shared/golden");
    assert!(
        dir.is_dir(),
        "golden reference directory {} is missing",
        dir.display()
    );
    dir
}

/// A JSON file from [`golden_dir`].
pub fn golden_json(name: &str) -> serde_json::Value {
    let path = golden_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}
