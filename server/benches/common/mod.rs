//! What the server's benches share: the SmolLM2-135M-Instruct fixture as Liger-GLA (f32)
//! with its tokenizer, and an engine over it.

use std::sync::Arc;

use candle_core::{DType, Device};
use liger_model::gguf::import_gguf;
use liger_model::testing::model_from_tensors;
use liger_model::{LigerConfig, Model, ModelConfig};
use liger_server::engine::{EngineOptions, LocalEngine};
use liger_server::metrics::Metrics;
use liger_server::text::Codec;

/// The fixture converted with the default Liger settings, and its tokenizer.
pub fn smollm2_liger() -> (Model, Arc<Codec>) {
    let import = import_gguf(&liger_model::testing::fixture::smollm2_gguf()).expect("fixture");
    let tensors = import.tensors.iter().cloned().collect();
    let cfg = ModelConfig::from_json(import.config.clone())
        .and_then(|c| c.with_liger(LigerConfig::default()))
        .expect("config");
    let model = model_from_tensors(cfg, &tensors, DType::F32, &Device::Cpu).expect("model");
    let codec = Codec::from_parts(
        import.tokenizer.clone(),
        &import.tokenizer_config,
        import.generation_config.as_ref(),
        None,
        &model.config().eos_token_ids,
    )
    .expect("tokenizer");
    (model, Arc::new(codec))
}

pub fn engine(model: &Model, codec: &Arc<Codec>, options: EngineOptions) -> LocalEngine {
    LocalEngine::start(
        model.clone(),
        codec.clone(),
        options,
        Arc::new(Metrics::default()),
    )
    .expect("engine")
}
