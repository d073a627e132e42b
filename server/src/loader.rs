//! Getting a servable model: a local folder or a Hugging Face hub id (downloaded with
//! hf-hub into its cache), the device and dtype, the weights, the tokenizer, and the engine
//! thread that will own the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device};
use liger_model::device::DeviceKind;
use liger_model::hub::HubOptions;
use liger_model::ModelConfig;
use tracing::info;

use crate::api::{Limits, Ready};
use crate::engine::{EngineOptions, LocalEngine, StateCacheOptions};
use crate::metrics::Metrics;
use crate::settings::{DTypeArg, DeviceArg, Settings};
use crate::text::grammar::Grammars;
use crate::text::Codec;

/// Loads everything and starts the engine.
pub async fn load(settings: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<Ready> {
    let dir = resolve_model_dir(&settings.model, settings.revision.as_deref()).await?;
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || load_dir(&dir, &settings, metrics))
        .await
        .context("loader task")?
}

/// Folds a PEFT LoRA adapter into the weights: serving a merged model costs nothing extra
/// per token, and the adapter (a few MB) can ship apart from the base weights. A quantized
/// checkpoint keeps the adapter unmerged.
fn merge_adapter(model: &mut liger_model::Model, dir: &Path) -> anyhow::Result<()> {
    let context = || format!("--adapter {}", dir.display());
    let (cfg, tensors) = liger_model::lora::load_adapter(dir).with_context(context)?;
    model.apply_lora(&cfg, &tensors).with_context(context)?;
    if model.is_quantized() {
        // GGML blocks cannot absorb the update; the adapter runs beside them (two small
        // extra products per adapted projection).
        info!(adapter = %dir.display(), rank = cfg.rank, projections = tensors.len() / 2, "adapter applied unmerged (quantized weights)");
        return Ok(());
    }
    model.merge_lora().with_context(context)?;
    info!(adapter = %dir.display(), rank = cfg.rank, projections = tensors.len() / 2, "adapter merged");
    Ok(())
}

/// Loads a local folder and starts the engine (blocking).
pub fn load_dir(dir: &Path, settings: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<Ready> {
    let device = select_device(settings.device)?;
    let dtype = resolve_dtype(settings.dtype, &device);
    info!(dir = %dir.display(), ?dtype, device = ?settings.device, "loading weights");
    let mut model = liger_model::weights::load_model(dir, dtype, &device)
        .with_context(|| format!("loading the model from {}", dir.display()))?;
    if let Some(adapter) = &settings.adapter {
        merge_adapter(&mut model, adapter)?;
    }
    if let Some(q) = settings.quantize {
        let counts = model.quantize(q).context("--quantize")?;
        info!(format = q.name(), projections = ?counts, "weights quantized");
    }
    let cfg = model.config().clone();
    let max_model_len = resolve_max_model_len(settings.max_model_len, &cfg)?;
    let codec = Arc::new(Codec::load(dir, &cfg.eos_token_ids).context("loading the tokenizer")?);
    if codec.vocab_size() > cfg.vocab_size {
        tracing::warn!(
            tokenizer = codec.vocab_size(),
            model = cfg.vocab_size,
            "the tokenizer knows more tokens than the model has embeddings; prompts using them get 400"
        );
    }
    let state = model.state_spec().bytes_by_kind_at(max_model_len);
    info!(
        kind = if cfg.liger.is_some() {
            "liger"
        } else {
            "transformer"
        },
        layers = cfg.num_layers,
        state_bytes_at_max_len = state.total(),
        recurrent_bytes = state.recurrent,
        window_bytes = state.window,
        global_cache_bytes = state.global,
        kv_cache_bytes_at_max_len = state.kv_cache,
        "model ready"
    );
    let options = EngineOptions {
        max_running: settings.max_running,
        max_waiting: settings.max_waiting,
        max_batch_tokens: settings.max_batch_tokens,
        step_target: settings.step_target,
        max_model_len,
        state_cache: StateCacheOptions {
            budget_bytes: settings.state_cache_bytes,
            dir: settings.state_cache_dir.clone(),
        },
    };
    let limits = Limits {
        max_model_len,
        vocab_size: cfg.vocab_size,
        max_n: settings.max_running,
    };
    let grammars = Grammars::new(codec.clone(), cfg.vocab_size)
        .map_err(|e| anyhow!("preparing structured output for the tokenizer: {e}"))?;
    let engine = LocalEngine::start(model, codec.clone(), options, metrics)
        .context("starting the engine thread")?;
    Ok(Ready {
        engine: Arc::new(engine),
        codec,
        grammars: Arc::new(grammars),
        limits,
    })
}

/// Transformers are bounded by their position embeddings; Liger models (constant-size
/// state) may be run past them on request.
pub fn resolve_max_model_len(flag: Option<usize>, cfg: &ModelConfig) -> anyhow::Result<usize> {
    let native = cfg.max_position_embeddings;
    match flag {
        None => Ok(native),
        Some(n) if n <= native || cfg.liger.is_some() => Ok(n),
        Some(n) => bail!(
            "--max-model-len {n} exceeds this Transformer's max_position_embeddings ({native}); \
             only converted Liger models may run past it"
        ),
    }
}

pub fn resolve_dtype(arg: DTypeArg, device: &Device) -> DType {
    match arg {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
        // bf16 on the CPU widens to f32 on every matmul (slow); GPUs want half precision.
        DTypeArg::Auto if device.is_cuda() => DType::BF16,
        DTypeArg::Auto if device.is_metal() => DType::F16,
        DTypeArg::Auto => DType::F32,
    }
}

pub fn select_device(arg: DeviceArg) -> anyhow::Result<Device> {
    let kind = match arg {
        DeviceArg::Cpu => DeviceKind::Cpu,
        DeviceArg::Cuda => DeviceKind::Cuda,
        DeviceArg::Metal => DeviceKind::Metal,
    };
    liger_model::device::open(kind).map_err(|e| match e {
        liger_model::Error::Device(why) => anyhow!("--device {why}"),
        other => anyhow!("--device: {other}"),
    })
}

/// A local folder as is; a hub id `owner/name` is fetched into the Hugging Face cache (or
/// found there when the hub is unreachable or `HF_HUB_OFFLINE` is set), the same way
/// `liger-convert` does it ([`liger_model::hub`]).
pub async fn resolve_model_dir(spec: &str, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() || !liger_model::hub::looks_like_hub_id(spec) {
        bail!("--model {spec}: no such model folder (nor a hub id owner/name)");
    }
    let opts = HubOptions {
        revision: revision.map(str::to_owned),
        token: std::env::var("HF_TOKEN").ok(),
    };
    info!(
        repo = spec,
        "fetching from the Hugging Face hub (or its cache)"
    );
    let id = spec.to_owned();
    // The download runs its own runtime: off this one's worker threads.
    tokio::task::spawn_blocking(move || liger_model::hub::download(&id, &opts, || ()))
        .await
        .context("the download task")?
        .with_context(|| {
            format!("--model {spec}: not a local folder, and fetching it from the Hugging Face hub failed")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_liger_models_run_past_their_position_embeddings() {
        use liger_model::testing::{Family, TinyCheckpoint};
        let t = TinyCheckpoint::new(Family::Llama, 0).unwrap();
        let plain = t.model_config().unwrap();
        let liger = t.with_liger(&Default::default()).model_config().unwrap();
        assert_eq!(resolve_max_model_len(None, &plain).unwrap(), 256);
        assert_eq!(resolve_max_model_len(Some(100), &plain).unwrap(), 100);
        assert!(resolve_max_model_len(Some(1000), &plain).is_err());
        assert_eq!(resolve_max_model_len(Some(1000), &liger).unwrap(), 1000);
    }

    #[tokio::test]
    async fn model_specs_that_are_neither_folders_nor_hub_ids_are_refused() {
        for spec in ["./no/such/folder", "plain-name", "a/b/c"] {
            let e = resolve_model_dir(spec, None).await.unwrap_err().to_string();
            assert!(e.contains("no such model folder"), "{spec}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().to_str().unwrap();
        assert_eq!(resolve_model_dir(spec, None).await.unwrap(), dir.path());
    }

    #[test]
    fn devices_not_compiled_in_are_refused_clearly() {
        assert!(select_device(DeviceArg::Cpu).is_ok());
        #[cfg(not(feature = "cuda"))]
        {
            let e = select_device(DeviceArg::Cuda).unwrap_err().to_string();
            assert!(e.starts_with("--device cuda:"), "{e}");
            assert!(e.contains("built without the `cuda` feature"), "{e}");
        }
        #[cfg(not(feature = "metal"))]
        assert!(select_device(DeviceArg::Metal).is_err());
        assert_eq!(resolve_dtype(DTypeArg::Auto, &Device::Cpu), DType::F32);
    }

    #[test]
    fn an_adapter_is_merged_kept_beside_quantized_weights_and_a_bad_one_is_refused() {
        use candle_core::Tensor;
        use liger_model::lora::{self, LoraConfig};
        use liger_model::testing::{max_abs_diff, Family, TinyCheckpoint};
        use liger_model::Logits;
        let t = TinyCheckpoint::new(Family::Llama, 3).unwrap();
        let base = t.model(DType::F32).unwrap();
        // A non-zero adapter (training's init has B = 0, which would prove nothing).
        let cfg = LoraConfig::liger_default();
        let mut with = base.clone();
        let vars = with.attach_lora(&cfg, 7).unwrap();
        // Seeded, so the margins below hold run after run (candle's randn is unseeded, and
        // one draw in many broke the 8-bit bound on this tiny random model).
        let mut rng = liger_model::testing::SplitMix(11);
        for (_, v) in &vars {
            let values: Vec<f32> = (0..v.elem_count()).map(|_| 0.1 * rng.normal()).collect();
            v.set(&Tensor::from_vec(values, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        lora::save_adapter(dir.path(), &cfg, &with.lora_tensors(), None).unwrap();

        let logits = |m: &liger_model::Model| {
            let mut st = m.new_state().unwrap();
            m.forward(&[1, 5, 9, 2], &mut st, Logits::Last).unwrap()
        };
        let mut merged = base.clone();
        merge_adapter(&mut merged, dir.path()).unwrap();
        let d = max_abs_diff(&logits(&merged), &logits(&with));
        assert!(d < 1e-4, "merged vs adapter: {d}");
        let moved = max_abs_diff(&logits(&merged), &logits(&base));
        assert!(moved > 1e-3, "the adapter changed nothing");

        // Quantized weights keep the adapter unmerged: base blocks plus the update (how
        // close that is to the dense model is liger-model's tests' business; this random
        // tiny model amplifies 8-bit rounding).
        let mut quantized = base.clone();
        quantized
            .quantize(liger_model::layers::Quantization::Q8_0)
            .unwrap();
        let plain = logits(&quantized);
        merge_adapter(&mut quantized, dir.path()).unwrap();
        assert_eq!(quantized.lora_tensors().len(), with.lora_tensors().len());
        let d = max_abs_diff(&logits(&quantized), &logits(&with));
        let q_moved = max_abs_diff(&logits(&quantized), &plain);
        assert!(
            d < 0.25 * moved && q_moved > 0.5 * moved,
            "{d} {q_moved} {moved}"
        );

        let e = merge_adapter(&mut base.clone(), Path::new("/no/such/adapter")).unwrap_err();
        assert!(
            format!("{e:#}").contains("--adapter /no/such/adapter"),
            "{e:#}"
        );
    }

    #[tokio::test]
    async fn missing_local_paths_are_not_sent_to_the_hub() {
        let e = resolve_model_dir("./does/not/exist", None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no such model folder"), "{e}");
    }
}
