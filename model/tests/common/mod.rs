//! Shared test support: the SmolLM2-135M-Instruct GGUF fixture, its one-time import, and the
//! golden reference files made by an independent implementation.
//!
//! Tests that need the fixture fail (never skip) when it cannot be obtained, so a green run
//! always means the real model was checked. Each test binary uses a subset of these helpers,
//! hence the `dead_code` allowances.

use std::sync::OnceLock;

use liger_model::gguf::{import_gguf, GgufImport};

#[allow(unused_imports)]
pub use liger_model::testing::fixture::{golden_dir, golden_json, smollm2_gguf, workspace_root};

/// The fixture imported once per test binary (the import dequantizes ~135M weights).
#[allow(dead_code)]
pub fn import_fixture() -> &'static GgufImport {
    static IMPORT: OnceLock<GgufImport> = OnceLock::new();
    IMPORT.get_or_init(|| {
        let path = smollm2_gguf();
        import_gguf(&path).unwrap_or_else(|e| panic!("importing {}: {e}", path.display()))
    })
}
