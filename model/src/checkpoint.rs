//! A model on disk: the one way `liger-serve` and `liger-convert` reach a model.
//!
//! 1. [`Source::parse`] says what a command line names: a local Hugging Face folder, a
//!    GGUF file, or a hub id `owner/name` (an existing local path wins; otherwise something
//!    shaped like `owner/name` is a hub id).
//! 2. [`Source::into_folder`] fetches a hub id into the Hugging Face cache with the one
//!    downloader ([`crate::hub`]); a GGUF file must be imported first (`liger-convert`
//!    reads it with [`crate::gguf`]).
//! 3. [`Checkpoint::open`] reads the folder's config and safetensors headers (nothing is
//!    loaded yet), optionally with a LoRA adapter ([`Checkpoint::with_adapter`]).
//! 4. [`Checkpoint::load`] builds the [`Model`] on a device in a dtype, the adapter applied
//!    (and merged where the weights are dense), quantized if asked; [`Checkpoint::text`]
//!    reads its tokenizer, chat template and stop ids ([`Text`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::files::{safetensors_files, CONFIG_FILE};
use crate::hub::{self, HubOptions, Progress};
use crate::layers::{Quantization, WeightSource};
use crate::lora::{self, LoraConfig};
use crate::model::Model;
use crate::text::Text;
use crate::weights::{quantized_entries, read_quantized, QuantizedEntry};
use crate::{Error, Result};

/// What a model argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Folder(PathBuf),
    Gguf(PathBuf),
    Hub(String),
}

impl Source {
    /// Decides what `spec` is (the rules are in the module header).
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.is_dir() {
                return Ok(Self::Folder(path.to_path_buf()));
            }
            if has_gguf_extension(path) || has_gguf_magic(path) {
                return Ok(Self::Gguf(path.to_path_buf()));
            }
            return Err(Error::Invalid(format!(
                "{spec} is a file but not a GGUF file (expected a Hugging Face model folder, a .gguf file or a hub id owner/name)"
            )));
        }
        if has_gguf_extension(path) {
            return Err(Error::Invalid(format!("{spec}: no such GGUF file")));
        }
        if hub::looks_like_hub_id(spec) {
            return Ok(Self::Hub(spec.to_owned()));
        }
        Err(Error::Invalid(format!(
            "{spec}: no such file or folder, and not a hub id of the form owner/name"
        )))
    }

    /// The Hugging Face folder this source is: a folder as is, a hub id downloaded into
    /// the cache (or found there offline). A GGUF file is refused: it holds no Hugging
    /// Face folder until `liger-convert` imports it.
    pub fn into_folder<P: Progress + Clone + Send + Sync + 'static>(
        self,
        hub_options: &HubOptions,
        bar: impl Fn() -> P,
    ) -> Result<PathBuf> {
        match self {
            Self::Folder(dir) => Ok(dir),
            Self::Hub(id) => hub::download(&id, hub_options, bar),
            Self::Gguf(path) => Err(Error::Invalid(format!(
                "{} is a GGUF file: convert it first (`liger-convert convert {} OUT`) and use the folder it writes",
                path.display(),
                path.display()
            ))),
        }
    }
}

fn has_gguf_extension(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn has_gguf_magic(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// A LoRA adapter read from its PEFT folder.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub tensors: HashMap<String, Tensor>,
}

impl Adapter {
    /// Projections it adapts (each has an `A` and a `B`).
    pub fn projections(&self) -> usize {
        self.tensors.len() / 2
    }
}

/// How [`Checkpoint::load`] builds the model beyond the stored weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Fold the adapter into dense weights (serving: no extra work per token). A quantized
    /// checkpoint keeps it beside its blocks whatever this says, and an adapter is always
    /// merged before quantizing.
    pub merge_adapter: bool,
    /// Quantize the projections after loading.
    pub quantize: Option<Quantization>,
}

/// An opened model folder: what is there, before anything is loaded.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    files: Vec<PathBuf>,
    stored_dtype: DType,
    quantized: BTreeMap<String, QuantizedEntry>,
    adapter: Option<Adapter>,
}

impl Checkpoint {
    /// Reads `dir`'s `config.json` and its safetensors headers (single file or shards).
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let stored_dtype = stored_dtype(&config.raw);
        let files = safetensors_files(dir)?;
        let mut quantized = BTreeMap::new();
        for f in &files {
            quantized.extend(quantized_entries(f)?);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            files,
            stored_dtype,
            quantized,
            adapter: None,
        })
    }

    /// The same checkpoint with the PEFT LoRA adapter in `dir`, read now so a bad one is
    /// reported before the weights are loaded.
    pub fn with_adapter(mut self, dir: &Path) -> Result<Self> {
        let (config, tensors) = lora::load_adapter(dir)?;
        self.adapter = Some(Adapter {
            dir: dir.to_path_buf(),
            config,
            tensors,
        });
        Ok(self)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The safetensors files holding the weights.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The dtype the dense weights are stored in (`torch_dtype`; f32 when unset).
    pub fn stored_dtype(&self) -> DType {
        self.stored_dtype
    }

    /// The block-quantized tensors by name (empty for a dense checkpoint).
    pub fn quantized(&self) -> &BTreeMap<String, QuantizedEntry> {
        &self.quantized
    }

    pub fn is_quantized(&self) -> bool {
        !self.quantized.is_empty()
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// The model, its dense weights as `dtype` on `device`.
    pub fn load(&self, device: &Device, dtype: DType, options: &LoadOptions) -> Result<Model> {
        let blocks = read_quantized(&self.files, device)?;
        // SAFETY: the files are mapped read-only and were checked by `open`.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&self.files, dtype, device)? };
        let mut model = Model::load(self.config.clone(), WeightSource::new(vb, blocks)).map_err(
            |e| match e {
                Error::Candle(c) => {
                    Error::weights(&self.dir, format!("weights do not match config.json: {c}"))
                }
                e => e,
            },
        )?;
        if let Some(a) = &self.adapter {
            let named = |e: Error| Error::Invalid(format!("adapter {}: {e}", a.dir.display()));
            model.apply_lora(&a.config, &a.tensors).map_err(named)?;
            // GGML blocks cannot absorb the update: it runs beside them.
            if (options.merge_adapter || options.quantize.is_some()) && !model.is_quantized() {
                model.merge_lora().map_err(named)?;
            }
        }
        if let Some(q) = options.quantize {
            model.quantize(q)?;
        }
        Ok(model)
    }

    /// The tokenizer, chat template and stop ids of this folder.
    pub fn text(&self) -> Result<Text> {
        Text::load(&self.dir, &self.config.eos_token_ids)
    }
}

/// Loads `dir`'s model as stored (no adapter, no quantization) as `dtype` on `device`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
    Checkpoint::open(dir)?.load(device, dtype, &LoadOptions::default())
}

/// `torch_dtype` of a `config.json` (f32 when unset or unknown).
fn stored_dtype(config: &Value) -> DType {
    match config.get("torch_dtype").and_then(Value::as_str) {
        Some("float16") => DType::F16,
        Some("bfloat16") => DType::BF16,
        _ => DType::F32,
    }
}

/// The Hugging Face name of a dtype, as `torch_dtype` spells it.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{save_adapter, LoraConfig};
    use crate::testing::{max_abs_diff, Family, SplitMix, TinyCheckpoint};
    use crate::Logits;
    use candle_core::quantized::GgmlDType;

    fn logits(m: &Model) -> Tensor {
        let mut st = m.new_state().unwrap();
        m.forward(&[1, 5, 9, 2], &mut st, Logits::Last).unwrap()
    }

    #[test]
    fn an_adapter_is_merged_kept_beside_quantized_weights_and_a_bad_one_is_refused() {
        let t = TinyCheckpoint::new(Family::Llama, 3).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (dense_dir, q_dir, a_dir) = (
            tmp.path().join("dense"),
            tmp.path().join("q8"),
            tmp.path().join("adapter"),
        );
        t.write_folder(&dense_dir).unwrap();
        t.write_quantized_folder(&q_dir, GgmlDType::Q8_0).unwrap();
        // A non-zero adapter (training's init has B = 0, which would prove nothing),
        // seeded so the margins below hold run after run.
        let base = t.model(DType::F32).unwrap();
        let cfg = LoraConfig::liger_default();
        let mut with = base.clone();
        let vars = with.attach_lora(&cfg, 7).unwrap();
        let mut rng = SplitMix(11);
        for (_, v) in &vars {
            let values: Vec<f32> = (0..v.elem_count()).map(|_| 0.1 * rng.normal()).collect();
            v.set(&Tensor::from_vec(values, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
        std::fs::create_dir_all(&a_dir).unwrap();
        save_adapter(&a_dir, &cfg, &with.lora_tensors(), None).unwrap();
        let load = |dir: &Path, adapter: bool, merge_adapter: bool| {
            let mut c = Checkpoint::open(dir).unwrap();
            if adapter {
                c = c.with_adapter(&a_dir).unwrap();
            }
            let options = LoadOptions {
                merge_adapter,
                quantize: None,
            };
            c.load(&Device::Cpu, DType::F32, &options).unwrap()
        };

        let merged = load(&dense_dir, true, true);
        assert!(merged.lora_tensors().is_empty(), "merged into the weights");
        let d = max_abs_diff(&logits(&merged), &logits(&with));
        assert!(d < 1e-4, "merged vs adapter: {d}");
        let moved = max_abs_diff(&logits(&merged), &logits(&base));
        assert!(moved > 1e-3, "the adapter changed nothing");
        let beside = load(&dense_dir, true, false);
        assert_eq!(beside.lora_tensors().len(), with.lora_tensors().len());
        assert!(max_abs_diff(&logits(&beside), &logits(&with)) < 1e-4);

        // A quantized checkpoint keeps the adapter unmerged: base blocks plus the update
        // (how close that is to the dense model is the quantization tests' business; this
        // random tiny model amplifies 8-bit rounding).
        let plain = load(&q_dir, false, true);
        assert!(plain.is_quantized());
        let quantized = load(&q_dir, true, true);
        assert_eq!(quantized.lora_tensors().len(), with.lora_tensors().len());
        let d = max_abs_diff(&logits(&quantized), &logits(&with));
        let q_moved = max_abs_diff(&logits(&quantized), &logits(&plain));
        assert!(
            d < 0.25 * moved && q_moved > 0.5 * moved,
            "{d} {q_moved} {moved}"
        );

        let e = Checkpoint::open(&dense_dir)
            .unwrap()
            .with_adapter(Path::new("/no/such/adapter"))
            .unwrap_err();
        assert!(e.to_string().contains("/no/such/adapter"), "{e}");
    }

    #[test]
    fn a_checkpoint_reports_what_it_stores_before_loading() {
        let t = TinyCheckpoint::new(Family::Qwen2, 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        t.write_quantized_folder(tmp.path(), GgmlDType::Q8_0)
            .unwrap();
        let c = Checkpoint::open(tmp.path()).unwrap();
        assert_eq!(c.stored_dtype(), DType::F32);
        assert_eq!(c.files().len(), 1);
        assert!(c.is_quantized());
        assert!(c
            .quantized()
            .keys()
            .all(|n| crate::weights::is_quantizable(n)));
        assert_eq!(c.config().num_layers, t.model_config().unwrap().num_layers);
        let m = c
            .load(&Device::Cpu, DType::F32, &LoadOptions::default())
            .unwrap();
        assert!(m.is_quantized());
    }

    #[test]
    fn sources_are_folders_gguf_files_or_hub_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let spec = |p: &Path| p.to_str().unwrap().to_owned();
        assert_eq!(Source::parse(&spec(d)).unwrap(), Source::Folder(d.into()));
        let g = d.join("m.bin");
        std::fs::write(&g, b"GGUF\x03\0\0\0").unwrap();
        assert_eq!(Source::parse(&spec(&g)).unwrap(), Source::Gguf(g.clone()));
        let e = Source::Gguf(g)
            .into_folder(&HubOptions::default(), || ())
            .unwrap_err();
        assert!(e.to_string().contains("convert it first"), "{e}");
        let txt = d.join("notes.txt");
        std::fs::write(&txt, b"hello").unwrap();
        assert!(Source::parse(&spec(&txt))
            .unwrap_err()
            .to_string()
            .contains("not a GGUF"));
        assert!(Source::parse(&spec(&d.join("nope.gguf")))
            .unwrap_err()
            .to_string()
            .contains("no such GGUF"));
        assert_eq!(
            Source::parse("org/name").unwrap(),
            Source::Hub("org/name".into())
        );
        for bad in ["./org/name/x", "plain-name"] {
            let e = Source::parse(bad).unwrap_err().to_string();
            assert!(e.contains("no such file or folder"), "{bad}: {e}");
        }
    }
}
