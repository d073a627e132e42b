//! Resolving SRC: a local Hugging Face folder, a `.gguf` file, or a hub id `owner/name`.
//!
//! The rules, in order: an existing local path wins (a file is GGUF, a folder is a Hugging
//! Face folder); otherwise something shaped like `owner/name` is a hub id; anything else is
//! an error that says which of the three was expected. Hub models are downloaded into the
//! usual Hugging Face cache, so other tools (and the next run) reuse them, and the cached
//! snapshot folder is then read like any local folder.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::DType;
use hf_hub::api::tokio::{ApiBuilder, Progress as HubProgress};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::ProgressBar;
use liger_model::weights::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use serde_json::Value;

use crate::progress::Progress;
use crate::tensors::TensorSet;
use crate::{Error, Result};

/// Tokenizer and generation files copied from a Hugging Face folder when present.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// What SRC names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    Folder(PathBuf),
    Gguf(PathBuf),
    Hub(String),
}

/// Decides what `src` is (see the module docs for the rules).
pub fn classify(src: &str) -> Result<SourceKind> {
    let path = Path::new(src);
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            return Ok(SourceKind::Folder(path.to_path_buf()));
        }
        if has_gguf_extension(path) || has_gguf_magic(path) {
            return Ok(SourceKind::Gguf(path.to_path_buf()));
        }
        return Err(Error::Source(format!(
            "{src} is a file but not a GGUF file (SRC must be a Hugging Face model folder, a .gguf file or a hub id owner/name)"
        )));
    }
    if has_gguf_extension(path) {
        return Err(Error::missing(path, "no such GGUF file"));
    }
    if looks_like_hub_id(src) {
        return Ok(SourceKind::Hub(src.to_owned()));
    }
    Err(Error::Source(format!(
        "{src}: no such file or folder, and not a hub id of the form owner/name"
    )))
}

fn has_gguf_extension(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn has_gguf_magic(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// `owner/name` with the characters the hub allows.
pub fn looks_like_hub_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match s.split_once('/') {
        Some((owner, name)) => ok(owner) && ok(name),
        None => false,
    }
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
    pub kind: SourceKind,
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
        kind: SourceKind::Folder(dir.to_path_buf()),
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
        kind: SourceKind::Gguf(path.to_path_buf()),
    })
}

/// Options for hub downloads.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Branch, tag or commit; `main` when `None`.
    pub revision: Option<String>,
    /// Access token (gated and private models); the cached `huggingface-cli login` token
    /// is used when `None`.
    pub token: Option<String>,
}

/// Reads SRC of any kind, downloading hub models first.
pub fn load(src: &str, hub: &HubOptions, progress: &Progress) -> Result<LoadedSource> {
    match classify(src)? {
        SourceKind::Folder(dir) => load_folder(&dir, progress),
        SourceKind::Gguf(path) => load_gguf(&path, progress),
        SourceKind::Hub(id) => {
            let dir = download(&id, hub, progress)?;
            let mut loaded = load_folder(&dir, progress)?;
            loaded.kind = SourceKind::Hub(id);
            Ok(loaded)
        }
    }
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

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

/// Whether `rev` is a full commit hash (then it names a snapshot folder directly).
fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// The hub's listing of one revision.
struct Listing {
    /// The commit the revision resolves to now.
    sha: String,
    files: Vec<String>,
}

/// Downloads `id` (config, safetensors weights, tokenizer and generation files) into the
/// Hugging Face cache and returns the snapshot folder holding them.
///
/// Files of the revision's current commit already in the cache are not fetched again. When
/// the hub cannot be reached (or `HF_HUB_OFFLINE` is set) a completely cached model still
/// converts, from the snapshot the cache's ref (or the given commit hash) points to.
pub fn download(id: &str, opts: &HubOptions, progress: &Progress) -> Result<PathBuf> {
    let revision = opts.revision.clone().unwrap_or_else(|| "main".to_owned());
    let repo = Repo::with_revision(id.to_owned(), RepoType::Model, revision.clone());
    let label = format!("{id}@{revision}");
    let cache = Cache::from_env();
    let snapshots = cache.path().join(repo.folder_name()).join("snapshots");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Hub(format!("cannot start the download runtime: {e}")))?;

    rt.block_on(async {
        let (api, listing, unavailable) = if hub_offline() {
            (None, None, "HF_HUB_OFFLINE is set".to_owned())
        } else {
            let mut builder = ApiBuilder::from_env().with_progress(false);
            if let Some(t) = &opts.token {
                builder = builder.with_token(Some(t.clone()));
            }
            let api = builder.build().map_err(|e| Error::Hub(format!("{label}: {e}")))?;
            match api.repo(repo.clone()).info().await {
                Ok(info) => {
                    let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
                    (Some(api), Some(Listing { sha: info.sha, files }), String::new())
                }
                Err(e) => {
                    let mut why = e.to_string();
                    if why.contains("401") || why.contains("403") {
                        why.push_str("; gated or private models need HF_TOKEN");
                    } else if why.contains("404") {
                        why.push_str("; no such model or revision");
                    }
                    (None, None, why)
                }
            }
        };
        // Which snapshot to look in: the listed commit when online (so a moved branch is
        // noticed), otherwise what the cache says the revision is.
        let snapshot = match &listing {
            Some(l) => Some(snapshots.join(&l.sha)),
            None if is_commit_hash(&revision) => Some(snapshots.join(&revision)),
            None => cache
                .repo(repo.clone())
                .get(CONFIG_FILE)
                .and_then(|p| p.parent().map(Path::to_path_buf)),
        };
        let listed = |f: &str| listing.as_ref().is_some_and(|l| l.files.iter().any(|x| x == f));
        let cached = |f: &str| {
            snapshot
                .as_ref()
                .map(|s| s.join(f))
                .filter(|p| p.is_file())
        };

        // One file: from the snapshot, else downloaded; `Ok(None)` when it does not exist.
        let fetch = |file: String, required: bool| {
            let (api, repo, label, why) = (api.clone(), repo.clone(), &label, &unavailable);
            let (listed, cached) = (listed(&file), cached(&file));
            async move {
                if let Some(p) = cached {
                    return Ok(Some(p));
                }
                match api {
                    Some(api) if listed => {
                        let bar = progress.bytes(0, "download");
                        let r = api
                            .repo(repo)
                            .download_with_progress(&file, DownloadBar(bar.clone()))
                            .await;
                        bar.finish_and_clear();
                        r.map(Some)
                            .map_err(|e| Error::Hub(format!("{label}: downloading {file}: {e}")))
                    }
                    _ if !required => Ok(None),
                    Some(_) => Err(Error::Hub(format!("{label} has no {file}"))),
                    None => Err(Error::Hub(format!(
                        "{label}: {file} is not in the local cache and the hub is unavailable ({why})"
                    ))),
                }
            }
        };

        let config = fetch(CONFIG_FILE.to_owned(), true).await?.expect("required");
        let dir = config
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::Hub(format!("{label}: odd cache path {}", config.display())))?;
        if listing.is_none() {
            tracing::warn!("hub unavailable ({unavailable}); using the cached snapshot {}", dir.display());
        }

        // Sharded or single weights: prefer the index when the repo has one.
        if listed(INDEX_FILE) || (listing.is_none() && cached(INDEX_FILE).is_some()) {
            let index = fetch(INDEX_FILE.to_owned(), true).await?.expect("required");
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| liger_model::Error::weights(&index, format!("not valid JSON: {e}")))?;
            let mut shards: Vec<String> = json
                .get("weight_map")
                .and_then(Value::as_object)
                .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                fetch(shard, true).await?;
            }
        } else if listed(SINGLE_FILE) || listing.is_none() {
            fetch(SINGLE_FILE.to_owned(), true).await?;
        } else {
            return Err(Error::Hub(format!(
                "{label} has no safetensors weights (model.safetensors or {INDEX_FILE})"
            )));
        }
        for f in SIDE_FILES {
            fetch((*f).to_owned(), false).await?;
        }
        Ok(dir)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_hub_id("meta-llama/Llama-3.1-8B"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("/abs"));
        assert!(!looks_like_hub_id("./x"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("plain"));
        assert!(!looks_like_hub_id("a b/c"));
    }

    #[test]
    fn classification() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(
            classify(d.to_str().unwrap()).unwrap(),
            SourceKind::Folder(d.into())
        );
        let g = d.join("m.bin");
        std::fs::write(&g, b"GGUF\x03\0\0\0").unwrap();
        assert_eq!(
            classify(g.to_str().unwrap()).unwrap(),
            SourceKind::Gguf(g.clone())
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
            SourceKind::Hub("org/name".into())
        );
        assert!(classify("./org/name/x").is_err());
    }
}
