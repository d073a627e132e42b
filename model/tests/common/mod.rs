//! Shared test support: the SmolLM2-135M-Instruct GGUF fixture, its one-time import, and the
//! golden reference files made by an independent implementation.
//!
//! Tests that need the fixture fail (never skip) when it cannot be obtained, so a green run
//! always means the real model was checked. Each test binary uses a subset of these helpers,
//! hence the `dead_code` allowances.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use liger_model::gguf::{import_gguf, GgufImport};

/// The workspace root (this crate's parent directory).
#[allow(dead_code)]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the model crate lives inside the workspace")
        .to_path_buf()
}

/// Path of the SmolLM2-135M-Instruct Q4_1 GGUF: `$LIGER_SMOLLM2_GGUF` if set, otherwise the
/// file `scripts/fetch-smollm2.sh` downloads (sha256-checked) or finds in its cache.
#[allow(dead_code)]
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

/// `/work/shared/golden` (the workspace's sibling `shared/golden`).
#[allow(dead_code)]
pub fn golden_dir() -> PathBuf {
    let dir = workspace_root().join("../shared/golden");
    assert!(
        dir.is_dir(),
        "golden reference directory {} is missing",
        dir.display()
    );
    dir
}

/// Parse a JSON file from the golden directory.
#[allow(dead_code)]
pub fn golden_json(name: &str) -> serde_json::Value {
    let path = golden_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The fixture imported once per test binary (the import dequantizes ~135M weights).
#[allow(dead_code)]
pub fn import_fixture() -> &'static GgufImport {
    static IMPORT: OnceLock<GgufImport> = OnceLock::new();
    IMPORT.get_or_init(|| {
        let path = smollm2_gguf();
        import_gguf(&path).unwrap_or_else(|e| panic!("importing {}: {e}", path.display()))
    })
}
