//! Downloading a model from the Hugging Face hub into the usual cache, one way for every
//! front end (`liger-convert`'s hub sources, `liger-serve --model owner/name`).
//!
//! Hub models land in the Hugging Face cache, so other tools (and the next run) reuse them,
//! and the cached snapshot folder is then read like any local folder. Files of the
//! revision's current commit already cached are not fetched again; when the hub cannot be
//! reached, or `HF_HUB_OFFLINE` is set, a completely cached model still opens, from the
//! snapshot the cache's ref (or the given commit hash) points to.

use std::path::{Path, PathBuf};

use hf_hub::api::tokio::ApiBuilder;
pub use hf_hub::api::tokio::Progress;
use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value;

use crate::weights::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
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

/// Options for hub downloads.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Branch, tag or commit; `main` when `None`.
    pub revision: Option<String>,
    /// Access token (gated and private models); the cached `huggingface-cli login` token
    /// is used when `None`.
    pub token: Option<String>,
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
pub fn download<P: Progress + Clone + Send + Sync + 'static>(
    id: &str,
    opts: &HubOptions,
    bar: impl Fn() -> P,
) -> Result<PathBuf> {
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
            let bar = &bar;
            let (listed, cached) = (listed(&file), cached(&file));
            async move {
                if let Some(p) = cached {
                    return Ok(Some(p));
                }
                match api {
                    Some(api) if listed => {
                        let r = api.repo(repo).download_with_progress(&file, bar()).await;
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
            let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
                path: index.clone(),
                source,
            })?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| Error::weights(&index, format!("not valid JSON: {e}")))?;
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
}
