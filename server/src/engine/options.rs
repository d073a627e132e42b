//! The engine's settings (from the server's), shared by its handle ([`super::LocalEngine`])
//! and its thread.

use std::path::PathBuf;

use liger_model::cache::StateCache;
use liger_model::Model;

use super::speculate::SpeculativeOptions;

/// Engine limits, from the server settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// State slots: sequences decoding or prefilling at once.
    pub max_running: usize,
    /// Requests queued for a slot before new ones get 429.
    pub max_waiting: usize,
    /// Tokens per forward pass (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// While sequences decode, steps are cut to about this long ([`super::scheduler`]).
    pub step_target: Option<std::time::Duration>,
    /// While nothing decodes, how long streams whose prompts are read may wait for the
    /// rest of their wave ([`super::scheduler::keep_waiting`]); `None`: they never wait.
    pub start_wait: Option<std::time::Duration>,
    /// Prompt plus generated tokens per sequence.
    pub max_model_len: usize,
    pub state_cache: StateCacheOptions,
    /// N-gram drafts for lone streams ([`super::speculate`]).
    pub speculative: SpeculativeOptions,
}

/// The conversation state cache (see [`liger_model::cache`]).
#[derive(Debug, Clone, Default)]
pub struct StateCacheOptions {
    /// Bytes of snapshots kept in memory; 0 turns the cache off.
    pub budget_bytes: usize,
    /// Also keep snapshots here, for restarts and replicas of the same model.
    pub dir: Option<PathBuf>,
}

impl StateCacheOptions {
    /// The cache these options ask for, if any.
    pub(super) fn build(&self, model: &Model) -> std::io::Result<Option<StateCache>> {
        if self.budget_bytes == 0 {
            return Ok(None);
        }
        let Some(dir) = &self.dir else {
            return Ok(Some(StateCache::new(self.budget_bytes)));
        };
        let made = model.fingerprint().and_then(|id| {
            StateCache::with_dir(self.budget_bytes, dir, model.state_spec().clone(), &id)
        });
        made.map(Some)
            .map_err(|e| std::io::Error::other(format!("--state-cache-dir {}: {e}", dir.display())))
    }
}
