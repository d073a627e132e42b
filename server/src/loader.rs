//! Getting a servable model: a local folder or a Hugging Face hub id (downloaded with
//! hf-hub into its cache), the device and dtype, the weights, the tokenizer, and the engine
//! thread that will own the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device};
use liger_model::checkpoint::{Checkpoint, LoadOptions, Source};
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

/// Moves the weights a decode step reads onto huge pages (`liger_model::hugepages`), and
/// says how much and how long it took (~1.2 s for SmolLM2-135M at f32,
/// 40-430 ms at q8_0), or why not.
fn back_with_huge_pages(model: &liger_model::Model) {
    let started = std::time::Instant::now();
    let got = liger_model::hugepages::back_with_huge_pages(&model.weight_memory());
    let ms = started.elapsed().as_secs_f64() * 1e3;
    match &got.failure {
        None => info!(
            mib = got.collapsed >> 20,
            ms = format!("{ms:.0}"),
            "weights moved onto huge pages"
        ),
        Some(why) => tracing::warn!(
            mib = got.collapsed >> 20,
            of_mib = got.asked >> 20,
            reason = %why,
            "weights not (all) moved onto huge pages; decoding works, a few percent slower"
        ),
    }
}

/// Loads a local folder and starts the engine (blocking).
pub fn load_dir(dir: &Path, settings: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<Ready> {
    let device = select_device(settings.device)?;
    let dtype = resolve_dtype(settings.dtype, &device);
    info!(dir = %dir.display(), ?dtype, device = ?settings.device, "loading weights");
    let stored = open_checkpoint(dir, settings.adapter.as_deref())?;
    let options = LoadOptions {
        merge_adapter: true,
        quantize: settings.quantize,
    };
    let mut model = stored
        .load(&device, dtype, &options)
        .with_context(|| format!("loading the model from {}", dir.display()))?;
    model.set_options(liger_model::RuntimeOptions {
        head_screen: settings.head_screen,
        ..model.options()
    })?;
    log_adaptations(&stored, settings);
    // Packed now, not by the first request (a few hundred ms for SmolLM2-135M at f32).
    let (packed, bytes) = model.pack_weights();
    if packed > 0 {
        info!(
            weights = packed,
            mib = bytes >> 20,
            "weights packed for the AVX-512 kernel (a copy beside the loaded weights)"
        );
    }
    if settings.huge_pages && device.is_cpu() {
        back_with_huge_pages(&model);
    }
    let cfg = model.config().clone();
    let max_model_len = resolve_max_model_len(settings.max_model_len, &cfg)?;
    let text = stored.text().context("loading the tokenizer")?;
    let codec = Arc::new(Codec::new(text));
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
        start_wait: settings.start_wait,
        max_model_len,
        state_cache: StateCacheOptions {
            budget_bytes: settings.state_cache_bytes,
            dir: settings.state_cache_dir.clone(),
        },
        speculative: settings.speculative,
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

/// `dir` with the `--adapter` folder, read before any weight is loaded.
fn open_checkpoint(dir: &Path, adapter: Option<&Path>) -> anyhow::Result<Checkpoint> {
    let stored = Checkpoint::open(dir)
        .with_context(|| format!("loading the model from {}", dir.display()))?;
    match adapter {
        None => Ok(stored),
        Some(a) => stored
            .with_adapter(a)
            .with_context(|| format!("--adapter {}", a.display())),
    }
}

/// What the loader did beyond the stored weights. An adapter is merged into dense weights
/// (serving a merged model costs nothing extra per token); quantized blocks cannot absorb
/// it, so it runs beside them (two small extra products per adapted projection).
fn log_adaptations(stored: &Checkpoint, settings: &Settings) {
    if let Some(a) = stored.adapter() {
        let (rank, projections) = (a.config.rank, a.projections());
        let adapter = a.dir.display();
        if stored.is_quantized() {
            info!(%adapter, rank, projections, "adapter applied unmerged (quantized weights)");
        } else {
            info!(%adapter, rank, projections, "adapter merged");
        }
    }
    if let Some(q) = settings.quantize {
        info!(format = q.name(), "weights quantized");
    }
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
/// `liger-convert` does it ([`liger_model::checkpoint::Source`]).
pub async fn resolve_model_dir(spec: &str, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    let source = Source::parse(spec).map_err(|e| anyhow!("--model: no such model folder: {e}"))?;
    let id = match source {
        Source::Hub(id) => id,
        local => {
            return local
                .into_folder(&HubOptions::default(), || ())
                .map_err(|e| anyhow!("--model: {e}"))
        }
    };
    let opts = HubOptions {
        revision: revision.map(str::to_owned),
        token: std::env::var("HF_TOKEN").ok(),
    };
    info!(
        repo = spec,
        "fetching from the Hugging Face hub (or its cache)"
    );
    // The download runs its own runtime: off this one's worker threads.
    tokio::task::spawn_blocking(move || Source::Hub(id).into_folder(&opts, || ()))
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

    #[tokio::test]
    async fn missing_local_paths_are_not_sent_to_the_hub() {
        let e = resolve_model_dir("./does/not/exist", None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no such model folder"), "{e}");
    }
}
