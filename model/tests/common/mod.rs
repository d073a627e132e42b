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

/// The fixture in f32 converted to the structure liger-serve runs by default: a 240-token
/// window, a 384-place global cache (320 places by attention, 4 sinks, kept tokens scored at
/// most 4,096 back), rows in f16, no recurrent read-out.
#[allow(dead_code)]
pub fn fixture_in_default_structure() -> liger_model::Model {
    use liger_model::config::{KvDtype, LigerConfig};
    let import = import_fixture();
    let cfg = liger_model::ModelConfig::from_json(import.config.clone()).unwrap();
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        import.tensors.iter().cloned().collect();
    let structure = LigerConfig {
        window: 240,
        window_weight: 1.0,
        recurrent_weight: 0.0,
        global_cache: 384,
        sinks: 4,
        attention_places: 320,
        max_distance: Some(4096),
        kv_dtype: Some(KvDtype::F16),
        ..Default::default()
    };
    liger_model::testing::model_from_tensors(
        cfg.with_liger(structure).unwrap(),
        &tensors,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}
