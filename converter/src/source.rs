//! Resolving SRC: a local Hugging Face folder, a `.gguf` file, or a hub id `owner/name`.
//!
//! The rules, in order: an existing local path wins (a file is GGUF, a folder is a Hugging
//! Face folder); otherwise something shaped like `owner/name` is a hub id; anything else is
//! an error that says which of the three was expected. Hub models are downloaded into the
//! usual Hugging Face cache, so other tools (and the next run) reuse them, and the cached
//! snapshot folder is then read like any local folder.

use std::path::{Path, PathBuf};

use candle_core::DType;
use indicatif::ProgressBar;
use liger_model::hub::Progress as HubProgress;
pub use liger_model::hub::{looks_like_hub_id, HubOptions, SIDE_FILES};
use liger_model::weights::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use serde_json::Value;

use crate::progress::Progress;
use crate::tensors::TensorSet;
use crate::{Error, Result};

pub use liger_model::checkpoint::Source;

/// Decides what `src` is (see the module docs for the rules).
pub fn classify(src: &str) -> Result<Source> {
    Source::parse(src).map_err(|e| match e {
        liger_model::Error::Invalid(why) => Error::Source(why),
        other => other.into(),
    })
}

/// How a tokenizer or generation file gets into the output.
pub enum SideContent {
    /// Copied from this file.
    Copy(PathBuf),
    /// Written as this JSON.
    Json(Value),
    /// Written with `Tokenizer::save` (GGUF imports).
    Tokenizer(Box<tokenizers::Tokenizer>),
}

/// A source, read: its config, weights and side files.
pub struct LoadedSource {
    pub config: Value,
    pub tensors: TensorSet,
    /// Output file name and content.
    pub side_files: Vec<(String, SideContent)>,
    /// The dtype to write when the user does not choose one.
    pub native_dtype: DType,
    /// A human name for the model card (GGUF `general.name`).
    pub name: Option<String>,
    pub kind: Source,
}

/// Reads a local Hugging Face folder (the weights are memory-mapped, not read).
pub fn load_folder(dir: &Path, progress: &Progress) -> Result<LoadedSource> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::missing(
            config_path,
            "a Hugging Face model folder needs config.json",
        ));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: Value = serde_json::from_str(&text).map_err(|e| {
        liger_model::Error::config("config.json", format!("{}: {e}", config_path.display()))
    })?;
    // Parse now so an unsupported architecture is reported before the weights are opened.
    liger_model::ModelConfig::from_json(config.clone())?;

    let index = dir.join(INDEX_FILE);
    let single = dir.join(SINGLE_FILE);
    let index = if index.is_file() {
        Some(index)
    } else if single.is_file() {
        None
    } else {
        let has_bin = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten().any(|e| {
                    e.path()
                        .extension()
                        .is_some_and(|x| x == "bin" || x == "pt")
                })
            })
            .unwrap_or(false);
        let hint = if has_bin {
            "PyTorch .bin weights are not supported; save the model with safetensors first"
        } else {
            "expected model.safetensors or model.safetensors.index.json"
        };
        return Err(Error::missing(
            single,
            format!("no safetensors weights in {}; {hint}", dir.display()),
        ));
    };
    let files = liger_model::weights::safetensors_files(dir).map_err(|e| match e {
        // Name the shard that is missing rather than failing with a bare IO error.
        liger_model::Error::Io { path, source }
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Error::missing(path, "listed in model.safetensors.index.json")
        }
        e => e.into(),
    })?;
    for path in &files {
        if let Some(name) = liger_model::weights::quantized_entries(path)?.keys().next() {
            // Blocks cannot be cast, converted or quantized again without dequantizing
            // first, which would pass the rounding off as the original weights.
            return Err(liger_model::Error::weights(
                path,
                format!(
                    "holds block-quantized tensors (`{name}`, ...); use the dense model it \
                     was quantized from"
                ),
            )
            .into());
        }
    }
    let tensors = TensorSet::open_files(&files, index.as_deref(), progress)?;
    let side_files = SIDE_FILES
        .iter()
        .map(|f| (f, dir.join(f)))
        .filter(|(_, p)| p.is_file())
        .map(|(f, p)| (f.to_string(), SideContent::Copy(p)))
        .collect();
    Ok(LoadedSource {
        config,
        native_dtype: tensors.dominant_float_dtype(),
        tensors,
        side_files,
        name: None,
        kind: Source::Folder(dir.to_path_buf()),
    })
}

/// Imports a GGUF file: dequantizes every tensor to f32 and rebuilds the tokenizer.
pub fn load_gguf(path: &Path, progress: &Progress) -> Result<LoadedSource> {
    let spinner = progress.spinner("load");
    spinner.set_message(format!(
        "{} (dequantizing to f32)",
        crate::tensors::file_name(path)
    ));
    let imp = liger_model::gguf::import_gguf(path);
    spinner.finish_and_clear();
    let imp = imp?;
    let mut side_files = vec![
        (
            "tokenizer.json".to_owned(),
            SideContent::Tokenizer(Box::new(imp.tokenizer)),
        ),
        (
            "tokenizer_config.json".to_owned(),
            SideContent::Json(imp.tokenizer_config),
        ),
    ];
    if let Some(g) = imp.generation_config {
        side_files.push(("generation_config.json".to_owned(), SideContent::Json(g)));
    }
    Ok(LoadedSource {
        config: imp.config,
        tensors: TensorSet::from_memory(imp.tensors)?,
        side_files,
        // The import dequantized to f32; anything smaller would lose precision silently.
        native_dtype: DType::F32,
        name: imp.name,
        kind: Source::Gguf(path.to_path_buf()),
    })
}

/// Shows hf-hub's download callbacks on an indicatif bar.
#[derive(Clone)]
struct DownloadBar(ProgressBar);

impl HubProgress for DownloadBar {
    async fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_owned());
    }

    async fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    async fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Downloads `id` (see [`liger_model::hub`]) with a byte bar per file.
pub fn download(id: &str, opts: &HubOptions, progress: &Progress) -> Result<PathBuf> {
    let bar = || DownloadBar(progress.bytes(0, "download"));
    Source::Hub(id.to_owned())
        .into_folder(opts, bar)
        .map_err(|e| match e {
            liger_model::Error::Hub(why) => Error::Hub(why),
            other => other.into(),
        })
}

/// Reads SRC of any kind, downloading hub models first.
pub fn load(src: &str, hub: &HubOptions, progress: &Progress) -> Result<LoadedSource> {
    match classify(src)? {
        Source::Folder(dir) => load_folder(&dir, progress),
        Source::Gguf(path) => load_gguf(&path, progress),
        Source::Hub(id) => {
            let dir = download(&id, hub, progress)?;
            let mut loaded = load_folder(&dir, progress)?;
            loaded.kind = Source::Hub(id);
            Ok(loaded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(
            classify(d.to_str().unwrap()).unwrap(),
            Source::Folder(d.into())
        );
        let g = d.join("m.bin");
        std::fs::write(&g, b"GGUF\x03\0\0\0").unwrap();
        assert_eq!(
            classify(g.to_str().unwrap()).unwrap(),
            Source::Gguf(g.clone())
        );
        let t = d.join("notes.txt");
        std::fs::write(&t, b"hello").unwrap();
        assert!(classify(t.to_str().unwrap())
            .unwrap_err()
            .to_string()
            .contains("not a GGUF"));
        let missing = d.join("nope.gguf");
        assert!(classify(missing.to_str().unwrap())
            .unwrap_err()
            .to_string()
            .contains("no such GGUF"));
        assert_eq!(
            classify("org/name").unwrap(),
            Source::Hub("org/name".into())
        );
        assert!(classify("./org/name/x").is_err());
    }
}
